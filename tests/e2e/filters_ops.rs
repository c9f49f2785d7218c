//! The operational filters (log, stats, error) and the synthetic backends
//! (null, zero, pattern), driven by real clients: exact bytes, exact errno
//! names, log lines and statistics checked against what the clients did.

use nbdhost_tests::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// Run a libnbd Python script; `args` become sys.argv[1:]. Returns stdout.
fn py(srv: &Server, script: &str, args: &[&str]) -> String {
    let o = python(script, args);
    assert!(
        o.status.success(),
        "python failed ({}):\nstdout: {}\nstderr: {}\nserver log:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        srv.log()
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Shared Python helpers: `connect(uri)` (with base:allocation and the
/// server's error messages collected in `msgs`), `fails(code, f)`.
const PRELUDE: &str = r#"
import nbd, os, sys
msgs = []
def connect(uri):
    h = nbd.NBD()
    h.set_debug_callback(lambda ctx, m: msgs.append(m))
    h.set_debug(True)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h
def server_says(text):
    return any(m.startswith("structured error server message: ") and text in m for m in msgs)
def fails(code, f, what=""):
    try:
        f()
    except nbd.Error as e:
        assert e.errno == code, (what, code, e.errno, e.string)
        return
    raise AssertionError("%s: no error (expected %s)" % (what, code))
def extents(h, count, off, flags=0):
    seen = []
    def cb(ctx, o, entries, err):
        seen.append(list(entries))
        return 0
    h.block_status(count, off, cb, flags)
    return seen[-1]
M = 1 << 20
"#;

fn script(body: &str) -> String {
    format!("{PRELUDE}\n{body}")
}

/// Wait (at most 10 s) until `path` exists and `pred` holds for its
/// content; returns the content.
fn wait_for_file(path: &Path, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if pred(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "{} never got the expected content:\n{text}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The bytes of the pattern disk at `offset`: each 8-byte aligned word
/// holds its own offset, big-endian.
fn pattern(offset: u64, len: u64) -> Vec<u8> {
    (offset..offset + len).map(|o| (o & !7).to_be_bytes()[(o % 8) as usize]).collect()
}

// ------------------------------------------------------------- backends

#[test]
fn null_reads_zeros_accepts_everything_and_is_one_hole() {
    if !require_python_nbd() {
        return;
    }
    let ex = Exports::new();
    ex.snippet("nul", "[[layer]]\nplugin = \"null\"\nsize = \"64M\"\n");
    ex.snippet("empty", "[[layer]]\nplugin = \"null\"\n");
    let srv = Server::start(&ex, &[]);
    py(
        &srv,
        &script(
            r#"
h = connect(sys.argv[1])
assert h.get_size() == 64 * M
assert not h.is_read_only()
assert h.can_multi_conn() and h.can_fast_zero() and h.can_zero() and h.can_trim()
assert h.can_flush() and h.can_fua() and h.can_cache()
h.pwrite(b"\xab" * 65536, 0, nbd.CMD_FLAG_FUA)
assert h.pread(65536, 0) == bytes(65536)
assert h.pread(13, 64 * M - 13) == bytes(13)
assert h.pread(32 * M, 7) == bytes(32 * M)
h.zero(64 * M, 0, nbd.CMD_FLAG_FAST_ZERO)
h.zero(M, M, nbd.CMD_FLAG_NO_HOLE)
h.trim(M, 5 * M)
h.cache(M, 0)
h.flush()
assert extents(h, 64 * M, 0) == [64 * M, 3], extents(h, 64 * M, 0)
assert extents(h, 4096, 12345) == [4096, 3]
h.set_strict_mode(0)
fails("EINVAL", lambda: h.pread(512, 64 * M), "read past the end")
assert h.pread(4096, 0) == bytes(4096)
h.shutdown()
e = connect(sys.argv[2])
assert e.get_size() == 0
print("OK")
"#,
        ),
        &[&srv.uri("nul"), &srv.uri("empty")],
    );
    if require_tool("qemu-io") {
        let out = run_ok(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 7 0 64k",
                "-c",
                "read -P 0 0 64k",
                "-c",
                "read -P 0 63M 1M",
                &srv.uri("nul"),
            ],
        );
        assert!(out.contains("read 65536/65536 bytes at offset 0"), "{out}");
        assert!(out.contains("read 1048576/1048576 bytes at offset 66060288"), "{out}");
        assert!(!out.contains("Pattern verification failed"), "{out}");
    }
    if require_tool("nbdinfo") {
        let info = run_ok("nbdinfo", &["--json", &srv.uri("nul")]);
        let v: serde_json::Value = serde_json::from_str(&info).expect("nbdinfo --json");
        let e = &v["exports"][0];
        assert_eq!(e["export-size"], 64 * MIB, "{info}");
        assert_eq!(e["can_multi_conn"], true, "{info}");
        assert_eq!(e["is_read_only"], false, "{info}");
    }
}

#[test]
fn zero_is_a_read_only_disk_of_zeros() {
    if !require_python_nbd() {
        return;
    }
    let ex = Exports::new();
    ex.snippet("zeros", "[[layer]]\nplugin = \"zero\"\nsize = \"8M\"\n");
    ex.snippet("nothing", "[[layer]]\nplugin = \"zero\"\n");
    let srv = Server::start(&ex, &[]);
    py(
        &srv,
        &script(
            r#"
h = connect(sys.argv[1])
assert h.get_size() == 8 * M
assert h.is_read_only()
assert h.can_multi_conn() and h.can_cache()
assert h.pread(M, 3 * M + 1) == bytes(M)
assert h.pread(1, 8 * M - 1) == b"\0"
assert extents(h, 8 * M, 0) == [8 * M, 3]
h.cache(M, 0)
h.set_strict_mode(0)
fails("EPERM", lambda: h.pwrite(b"x" * 512, 0), "write")
fails("EPERM", lambda: h.zero(4096, 0), "zero")
fails("EPERM", lambda: h.trim(4096, 0), "trim")
assert h.pread(4096, 0) == bytes(4096), "still served after refused writes"
e = connect(sys.argv[2])
assert e.get_size() == 0 and e.is_read_only()
print("OK")
"#,
        ),
        &[&srv.uri("zeros"), &srv.uri("nothing")],
    );
}

#[test]
fn pattern_words_hold_their_offsets_at_any_alignment() {
    if !require_python_nbd() {
        return;
    }
    let ex = Exports::new();
    // Not a multiple of 8: the last word is cut short.
    let size = 3 * MIB + 5;
    ex.snippet("pat", &format!("[[layer]]\nplugin = \"pattern\"\nsize = \"{size}\"\n"));
    ex.snippet("big", "[[layer]]\nplugin = \"pattern\"\nsize = \"1T\"\n");
    let srv = Server::start(&ex, &[]);
    // Reads at odd offsets and lengths, compared with values computed here.
    let reads: Vec<(u64, u64)> =
        vec![(0, 8), (0, 1), (1, 7), (3, 5), (5, 17), (4093, 4099), (MIB - 3, 70001), (size - 13, 13), (size - 1, 1)];
    let spec: Vec<String> = reads.iter().map(|(o, l)| format!("{o}:{l}")).collect();
    let out = py(
        &srv,
        &script(
            r#"
h = connect(sys.argv[1])
assert h.is_read_only() and h.can_multi_conn()
for item in sys.argv[3].split(","):
    o, l = map(int, item.split(":"))
    print(item, h.pread(l, o).hex())
assert extents(h, 65536, 4096) == [65536, 0]
h.set_strict_mode(0)
fails("EPERM", lambda: h.pwrite(b"x" * 8, 0), "write")
b = connect(sys.argv[2])
assert b.get_size() == 1 << 40
print("big", b.pread(24, (1 << 40) - 24).hex())
"#,
        ),
        &[&srv.uri("pat"), &srv.uri("big"), &spec.join(",")],
    );
    let mut lines = out.lines();
    for (o, l) in &reads {
        let line = lines.next().expect("a line per read");
        let (key, hex) = line.split_once(' ').unwrap();
        assert_eq!(key, format!("{o}:{l}"));
        let want: String = pattern(*o, *l).iter().map(|b| format!("{b:02x}")).collect();
        assert!(hex == want, "read of {l} bytes at {o} differs:\n got {hex}\nwant {want}");
    }
    let big = lines.next().unwrap();
    let want: String = pattern((1 << 40) - 24, 24).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(big, format!("big {want}"));
    // The whole disk through nbdcopy (several connections, large requests).
    if require_tool("nbdcopy") {
        let dst = ex.path("pat.img");
        run_ok("nbdcopy", &["--connections=2", &srv.uri("pat"), dst.to_str().unwrap()]);
        let got = std::fs::read(&dst).unwrap();
        assert_eq!(got.len() as u64, size);
        assert!(got == pattern(0, size), "nbdcopy of the pattern disk differs");
    }
}

// ------------------------------------------------------------------- log

/// Split a log line into (timestamp, fields after it).
fn log_fields(line: &str) -> (&str, Vec<&str>) {
    let (ts, rest) = line.split_once(' ').unwrap_or_else(|| panic!("no timestamp in {line:?}"));
    let b = ts.as_bytes();
    assert!(
        ts.len() == 24 && b[4] == b'-' && b[10] == b'T' && b[19] == b'.' && ts.ends_with('Z'),
        "bad timestamp in {line:?}"
    );
    (ts, rest.split(' ').collect())
}

#[test]
fn log_writes_a_line_per_request_with_its_result() {
    if !require_python_nbd() {
        return;
    }
    let ex = Exports::new();
    ex.snippet(
        "logged",
        "[[layer]]\nfilter = \"log\"\nlogfile = \"requests.log\"\n[[layer]]\nplugin = \"memory\"\nsize = \"16M\"\n",
    );
    let logfile = ex.path("requests.log");
    // The log is appended to, never truncated.
    std::fs::write(&logfile, "an older line\n").unwrap();
    let srv = Server::start(&ex, &[]);
    py(
        &srv,
        &script(
            r#"
h = connect(sys.argv[1])
h.pwrite(b"\x11" * 4096, 0, nbd.CMD_FLAG_FUA)
assert h.pread(8192, 4096) == bytes(8192)
h.zero(65536, M, nbd.CMD_FLAG_FAST_ZERO)
h.zero(65536, 2 * M, nbd.CMD_FLAG_NO_HOLE)
h.trim(65536, 3 * M)
h.flush()
assert extents(h, M, 0) == [32768, 0, M - 32768, 3]
assert extents(h, M, 0, nbd.CMD_FLAG_REQ_ONE) == [32768, 0]
h.cache(4096, 0)
h.shutdown()
h2 = connect(sys.argv[1])
assert h2.pread(4096, 0) == b"\x11" * 4096
h2.shutdown()
"#,
        ),
        &[&srv.uri("logged")],
    );
    let text = wait_for_file(&logfile, |t| t.matches(" Disconnect ").count() == 2);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("an older line"));
    // Lines of one connection, in order; the connections may overlap
    // (the server closes the first one after the client has moved on).
    let mut got: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut peers: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in lines {
        let (_, f) = log_fields(line);
        let conn = f[0].to_string();
        assert!(f[1].starts_with("peer=127.0.0.1:"), "{line}");
        peers.entry(conn.clone()).or_default().insert(f[1].to_string());
        assert_eq!(f[2], "export=logged", "{line}");
        let body = f[3..].join(" ");
        let entry = if f[3] == "Connect" {
            format!("{conn} {body}")
        } else if f[3] == "Disconnect" {
            assert!(f[6].starts_with("duration=") && f[6].ends_with('s'), "{line}");
            format!("{conn} {}", f[3..6].join(" "))
        } else {
            // `<op> <args> -> <result> (<ms> ms)`
            let (req, res) = body.split_once(" -> ").unwrap_or_else(|| panic!("no result in {line}"));
            let (res, ms) = res.rsplit_once(" (").unwrap();
            assert!(ms.ends_with(" ms)") && ms.trim_end_matches(" ms)").parse::<f64>().is_ok(), "{line}");
            format!("{conn} {req} -> {res}")
        };
        got.entry(conn).or_default().push(entry);
    }
    let got: Vec<String> = got.into_values().flatten().collect();
    let want = [
        "conn=1 Connect readonly=false size=16777216",
        "conn=1 Write offset=0 count=4096 fua=1 -> ok",
        "conn=1 Read offset=4096 count=8192 -> ok",
        "conn=1 Zero offset=1048576 count=65536 fua=0 may_trim=1 fast=1 -> ok",
        "conn=1 Zero offset=2097152 count=65536 fua=0 may_trim=0 fast=0 -> ok",
        "conn=1 Trim offset=3145728 count=65536 fua=0 -> ok",
        "conn=1 Flush -> ok",
        "conn=1 Extents offset=0 count=1048576 req_one=0 -> ok extents=[0+32768 data, 32768+1015808 hole,zero]",
        "conn=1 Extents offset=0 count=1048576 req_one=1 -> ok extents=[0+32768 data]",
        "conn=1 Cache offset=0 count=4096 -> ok",
        "conn=1 Disconnect requests=9 errors=0",
        "conn=2 Connect readonly=false size=16777216",
        "conn=2 Read offset=0 count=4096 -> ok",
        "conn=2 Disconnect requests=1 errors=0",
    ];
    assert_eq!(got, want, "log file:\n{text}");
    // Each connection has one peer address on all its lines.
    assert!(peers.values().all(|p| p.len() == 1), "{text}");
}

#[test]
fn log_records_failures_from_below_and_the_connection_keeps_working() {
    if !require_python_nbd() {
        return;
    }
    let ex = Exports::new();
    ex.snippet(
        "flaky",
        r#"[[layer]]
filter = "log"
logfile = "flaky.log"
[[layer]]
filter = "error"
error = "ENOSPC"
ops = "write"
range = "1M-2M"
[[layer]]
plugin = "memory"
size = "8M"
"#,
    );
    let logfile = ex.path("flaky.log");
    let srv = Server::start(&ex, &[]);
    py(
        &srv,
        &script(
            r#"
h = connect(sys.argv[1])
h.pwrite(b"a" * 4096, 0)
fails("ENOSPC", lambda: h.pwrite(b"b" * 4096, M + 4096), "write in the range")
assert server_says("injected ENOSPC by the error filter (write offset=1052672 count=4096)"), msgs
# The failed write never reached the disk, and the connection goes on.
assert h.pread(4096, M + 4096) == bytes(4096)
h.pwrite(b"c" * 4096, 3 * M)
assert h.pread(4096, 3 * M) == b"c" * 4096
assert h.pread(4096, 0) == b"a" * 4096
h.shutdown()
"#,
        ),
        &[&srv.uri("flaky")],
    );
    let text = wait_for_file(&logfile, |t| t.contains(" Disconnect "));
    let results: Vec<String> =
        text.lines().filter_map(|l| l.split_once(" export=flaky ").map(|(_, r)| r.to_string())).collect();
    assert_eq!(results.len(), 8, "{text}");
    assert!(results[1].starts_with("Write offset=0 count=4096 fua=0 -> ok ("), "{text}");
    assert!(results[2].starts_with("Write offset=1052672 count=4096 fua=0 -> ENOSPC: "), "{text}");
    assert!(results[2].ends_with(" ms)"), "{text}");
    assert!(results[3].starts_with("Read offset=1052672 count=4096 -> ok ("), "{text}");
    assert!(results[7].starts_with("Disconnect requests=6 errors=1 "), "{text}");
}

#[test]
fn log_lines_stay_whole_under_parallel_requests() {
    if !require_python_nbd() {
        return;
    }
    let ex = Exports::new();
    ex.snippet(
        "busy",
        "[[layer]]\nfilter = \"log\"\nlogfile = \"busy.log\"\n[[layer]]\nplugin = \"memory\"\nsize = \"64M\"\n",
    );
    let logfile = ex.path("busy.log");
    let srv = Server::start(&ex, &[]);
    // Four connections, each with 64 requests in flight at once. Requests
    // stay under the host's sparse-read threshold (64 KiB), above which it
    // asks the layers for extents first and the log shows those calls too.
    py(
        &srv,
        &script(
            r#"
import threading
errors = []
def client(i):
    try:
        h = connect(sys.argv[1])
        bufs = []
        for k in range(64):
            off = (i * 64 + k) * 32768
            if k % 2 == 0:
                b = nbd.Buffer.from_bytearray(bytearray([k]) * 32768)
                h.aio_pwrite(b, off)
            else:
                b = nbd.Buffer(32768)
                h.aio_pread(b, off)
            bufs.append(b)
        while h.aio_in_flight() > 0:
            h.poll(-1)
        h.shutdown()
    except Exception as e:
        errors.append(repr(e))
ts = [threading.Thread(target=client, args=(i,)) for i in range(4)]
[t.start() for t in ts]
[t.join() for t in ts]
assert not errors, errors
"#,
        ),
        &[&srv.uri("busy")],
    );
    let text = wait_for_file(&logfile, |t| t.matches(" Disconnect ").count() == 4);
    let mut requests = 0;
    let mut conns = BTreeSet::new();
    for line in text.lines() {
        let (_, f) = log_fields(line);
        assert!(f[0].starts_with("conn=") && f[1].starts_with("peer=") && f[2] == "export=busy", "{line}");
        conns.insert(f[0].to_string());
        match f[3] {
            "Connect" => assert_eq!(f.len(), 6, "{line}"),
            "Disconnect" => assert!(f[4] == "requests=64" && f[5] == "errors=0", "{line}"),
            "Read" | "Write" => {
                assert!(f[5] == "count=32768" && line.contains(" -> ok (") && line.ends_with(" ms)"), "{line}");
                let off: u64 = f[4].strip_prefix("offset=").unwrap().parse().unwrap();
                assert_eq!((off / 32768) & 1 == 0, f[3] == "Write", "{line}");
                requests += 1;
            }
            _ => panic!("unexpected line {line}"),
        }
    }
    assert_eq!(requests, 256, "{text}");
    let want: BTreeSet<String> = (1..=4).map(|i| format!("conn={i}")).collect();
    assert_eq!(conns, want);
}

// ----------------------------------------------------------------- stats

/// The `[stats]` lines of the latest summary for `reason` in the server log.
fn stats_summary(log: &str, export: &str, reason: &str) -> Vec<String> {
    let header = format!("[stats] export `{export}` ({reason}): ");
    let mine = format!("export `{export}` (");
    let lines: Vec<&str> = log.lines().collect();
    let start = lines.iter().rposition(|l| l.contains(&header)).unwrap_or_else(|| panic!("no {header}in\n{log}"));
    lines[start..]
        .iter()
        .filter_map(|l| l.split_once("[stats] ").map(|(_, s)| s.to_string()))
        .filter(|l| l.starts_with(&format!("{export}: ")) || l.starts_with(&mine))
        .take(8)
        .collect()
}

#[test]
fn stats_counts_every_operation_and_reports_on_sigusr1() {
    if !require_python_nbd() {
        return;
    }
    let ex = Exports::new();
    ex.snippet(
        "mem",
        "[[layer]]\nfilter = \"stats\"\nstatsfile = \"stats.txt\"\n[[layer]]\nplugin = \"memory\"\nsize = \"16M\"\n",
    );
    ex.snippet(
        "bad",
        r#"[[layer]]
filter = "stats"
[[layer]]
filter = "error"
ops = "read"
range = "0+4K"
[[layer]]
plugin = "memory"
size = "1M"
"#,
    );
    let statsfile = ex.path("stats.txt");
    let srv = Server::start(&ex, &[]);
    py(
        &srv,
        &script(
            r#"
a = connect(sys.argv[1])
b = connect(sys.argv[1])
for k in range(3):
    a.pwrite(b"w" * 65536, k * 65536)
for k in range(5):
    assert a.pread(4096, k * 4096) == b"w" * 4096
a.flush()
b.trim(65536, 4 * M)
b.trim(65536, 5 * M)
b.zero(131072, 6 * M)
extents(b, M, 0)
b.cache(M, 0)
a.shutdown()
b.shutdown()
c = connect(sys.argv[2])
fails("EIO", lambda: c.pread(512, 0))
fails("EIO", lambda: c.pread(512, 4095))
assert c.pread(4096, 4096) == bytes(4096)
c.shutdown()
"#,
        ),
        &[&srv.uri("mem"), &srv.uri("bad")],
    );
    srv.signal(libc::SIGUSR1);
    assert!(srv.wait_for_log("[stats] bad: cache: 0 ops"), "{}", srv.log());
    assert!(srv.wait_for_log("[stats] mem: cache: 1 op,"), "{}", srv.log());
    let log = srv.log();
    let mem = stats_summary(&log, "mem", "SIGUSR1");
    assert!(
        mem[0].contains("): 2 connections (") && mem[0].ends_with("; 14 requests, 0 errors, 2576384 bytes"),
        "{log}"
    );
    let expect = [
        "mem: read: 5 ops, 0 errors, 20480 bytes (20.0 KiB); latency avg ",
        "mem: write: 3 ops, 0 errors, 196608 bytes (192.0 KiB); latency avg ",
        "mem: trim: 2 ops, 0 errors, 131072 bytes (128.0 KiB); latency avg ",
        "mem: zero: 1 op, 0 errors, 131072 bytes (128.0 KiB); latency avg ",
        "mem: flush: 1 op, 0 errors, 0 bytes; latency avg ",
        "mem: extents: 1 op, 0 errors, 1048576 bytes (1.0 MiB); latency avg ",
        "mem: cache: 1 op, 0 errors, 1048576 bytes (1.0 MiB); latency avg ",
    ];
    for (line, want) in mem[1..].iter().zip(expect) {
        assert!(line.starts_with(want), "{line:?} does not start with {want:?}\n{log}");
        // avg, p50, p90, p99 and max are all in milliseconds; p99 <= max.
        let nums: Vec<f64> =
            line.split(" ms").filter_map(|p| p.rsplit(' ').next().and_then(|n| n.parse().ok())).collect();
        assert_eq!(nums.len(), 5, "{line}");
        assert!(nums[3] <= nums[4] && nums[1] <= nums[3], "{line}");
    }
    // Failed requests are counted, their bytes are not.
    let bad = stats_summary(&log, "bad", "SIGUSR1");
    assert!(bad[0].contains("): 1 connection (") && bad[0].ends_with("; 3 requests, 2 errors, 4096 bytes"), "{log}");
    assert!(bad[1].starts_with("bad: read: 3 ops, 2 errors, 4096 bytes (4.0 KiB); latency"), "{log}");
    assert_eq!(bad[2], "bad: write: 0 ops");
    // The stats file holds the same summary.
    let file = wait_for_file(&statsfile, |t| t.contains("mem: cache: 1 op,"));
    let file: Vec<&str> = file.lines().collect();
    assert_eq!(file.len(), 8, "{file:?}");
    assert!(file[0].starts_with("export `mem` (SIGUSR1): 2 connections"), "{file:?}");
    assert_eq!(file[1..], mem[1..].iter().map(String::as_str).collect::<Vec<_>>()[..]);

    // More work, another signal: the counts grow and the file is replaced.
    py(&srv, &script("h = connect(sys.argv[1])\nh.pread(512, 0)\nh.shutdown()\n"), &[&srv.uri("mem")]);
    srv.signal(libc::SIGUSR1);
    assert!(srv.wait_for_log("[stats] mem: read: 6 ops, 0 errors, 20992 bytes"), "{}", srv.log());
    let file = wait_for_file(&statsfile, |t| t.contains("mem: read: 6 ops"));
    assert_eq!(file.lines().count(), 8, "{file}");
    assert!(file.starts_with("export `mem` (SIGUSR1): 3 connections"), "{file}");
}

/// A last summary when the server exits: the host destroys every export
/// (and so the filter's instance) before it returns from main.
#[test]
fn stats_reports_once_more_when_the_server_exits() {
    if !require_python_nbd() {
        return;
    }
    let ex = Exports::new();
    ex.snippet(
        "mem",
        "[[layer]]\nfilter = \"stats\"\nstatsfile = \"stats.txt\"\n[[layer]]\nplugin = \"memory\"\nsize = \"1M\"\n",
    );
    let mut srv = Server::start(&ex, &["--log-level", "debug"]);
    py(&srv, &script("h = connect(sys.argv[1])\nh.pwrite(b'x' * 512, 0)\nh.shutdown()\n"), &[&srv.uri("mem")]);
    assert!(srv.wait_for_log("disconnected"), "{}", srv.log());
    assert!(srv.terminate().success());
    assert!(srv.wait_for_log("[stats] mem: cache: 0 ops"), "{}", srv.log());
    let exit = stats_summary(&srv.log(), "mem", "exit");
    assert!(exit[2].starts_with("mem: write: 1 op, 0 errors, 512 bytes;"), "{exit:?}");
    let file = std::fs::read_to_string(ex.path("stats.txt")).unwrap();
    assert!(file.starts_with("export `mem` (exit): 1 connection (0 open)"), "{file}");
}

// ----------------------------------------------------------------- error

#[test]
fn error_fails_exactly_the_requests_touching_its_range() {
    if !require_python_nbd() {
        return;
    }
    let ex = Exports::new();
    ex.snippet(
        "holey",
        "[[layer]]\nfilter = \"error\"\nrange = \"1M-2M\"\n[[layer]]\nplugin = \"memory\"\nsize = \"8M\"\n",
    );
    let srv = Server::start(&ex, &[]);
    py(
        &srv,
        &script(
            r#"
h = connect(sys.argv[1])
assert h.pread(4096, 0) == bytes(4096)
assert h.pread(4096, M - 4096) == bytes(4096), "ends where the range starts"
fails("EIO", lambda: h.pread(8192, M - 4096), "read across the start")
assert server_says("injected EIO by the error filter (read offset=1044480 count=8192)"), msgs
fails("EIO", lambda: h.pread(1, 2 * M - 1), "last byte of the range")
assert h.pread(4096, 2 * M) == bytes(4096), "the end is excluded"
fails("EIO", lambda: h.pread(4 * M, 0), "read covering the range")
fails("EIO", lambda: h.pwrite(b"x" * 4096, M + M // 2), "write")
fails("EIO", lambda: h.zero(4096, M), "zero")
fails("EIO", lambda: h.trim(2 * M, M // 2), "trim")
# Flush has no range; extents and cache are not failed by default. Where
# reads fail, block status says data (a hole would claim zeros).
h.flush()
assert extents(h, 4 * M, 0) == [M, 3, M, 0, 2 * M, 3], extents(h, 4 * M, 0)
h.cache(M, M)
h.pwrite(b"y" * 4096, 3 * M)
assert h.pread(4096, 3 * M) == b"y" * 4096
print("OK")
"#,
        ),
        &[&srv.uri("holey")],
    );
    // qemu-io keeps going after a failed request on the same connection.
    if require_tool("qemu-io") {
        let o = run(
            "qemu-io",
            &["-f", "raw", "-c", "read 0 4k", "-c", "read 1M 4k", "-c", "read 3M 4k", &srv.uri("holey")],
        );
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains("read 4096/4096 bytes at offset 0"), "{out}");
        assert!(out.contains("read failed: Input/output error"), "{out}");
        assert!(out.contains("read 4096/4096 bytes at offset 3145728"), "{out}");
    }
}

#[test]
fn error_toggle_file_switches_failures_on_and_off() {
    if !require_python_nbd() {
        return;
    }
    let ex = Exports::new();
    ex.snippet(
        "toggled",
        "[[layer]]\nfilter = \"error\"\nfile = \"fail-now\"\n[[layer]]\nplugin = \"memory\"\nsize = \"1M\"\n",
    );
    let toggle = ex.path("fail-now");
    let srv = Server::start(&ex, &[]);
    py(
        &srv,
        &script(
            r#"
h = connect(sys.argv[1])
toggle = sys.argv[2]
for round in range(3):
    h.pwrite(bytes([round + 1]) * 4096, 0)
    assert h.pread(4096, 0) == bytes([round + 1]) * 4096
    h.flush()
    open(toggle, "w").close()
    fails("EIO", lambda: h.pread(4096, 0), "read while the file exists")
    fails("EIO", lambda: h.pwrite(b"z" * 4096, 0), "write while the file exists")
    fails("EIO", lambda: h.flush(), "flush while the file exists")
    os.remove(toggle)
    assert h.pread(4096, 0) == bytes([round + 1]) * 4096, "the failed write did not land"
print("OK")
"#,
        ),
        &[&srv.uri("toggled"), toggle.to_str().unwrap()],
    );
}

#[test]
fn error_settings_choose_errno_operations_and_rate() {
    if !require_python_nbd() {
        return;
    }
    let ex = Exports::new();
    let mem = "[[layer]]\nplugin = \"memory\"\nsize = \"1M\"\n";
    let layer = |params: &str| format!("[[layer]]\nfilter = \"error\"\n{params}\n{mem}");
    ex.snippet("enospc-writes", &layer("error = \"ENOSPC\"\nops = \"write\""));
    ex.snippet("eperm-flush", &layer("error = \"eperm\"\nops = \"flush\""));
    ex.snippet("meta", &layer("rate = \"100%\"\nops = \"extents, cache\""));
    ex.snippet("never", &layer("rate = 0\nops = \"all\""));
    ex.snippet("half", &layer("rate = \"0.5\"\nops = \"read\""));
    for e in ["EIO", "ENOSPC", "EPERM", "ENOMEM", "EINVAL", "ENOTSUP"] {
        ex.snippet(&format!("read-{e}"), &layer(&format!("error = \"{e}\"\nops = \"read\"")));
    }
    let srv = Server::start(&ex, &[]);
    let base = format!("nbd://{}/", srv.addr);
    py(
        &srv,
        &script(
            r#"
base = sys.argv[1]
h = connect(base + "enospc-writes")
fails("ENOSPC", lambda: h.pwrite(b"x" * 512, 0), "write")
assert h.pread(512, 0) == bytes(512)
h.zero(4096, 0)
h.flush()

h = connect(base + "eperm-flush")
h.pwrite(b"x" * 512, 0)
fails("EPERM", lambda: h.flush(), "flush")
assert h.pread(512, 0) == b"x" * 512

h = connect(base + "meta")
fails("EIO", lambda: extents(h, 4096, 0), "block status")
fails("EIO", lambda: h.cache(4096, 0), "cache")
h.pwrite(b"y" * 512, 0)
assert h.pread(512, 0) == b"y" * 512

h = connect(base + "never")
for k in range(200):
    h.pwrite(b"n" * 512, k * 512)
    assert h.pread(512, k * 512) == b"n" * 512
h.flush()
extents(h, 4096, 0)

h = connect(base + "half")
failed = 0
for k in range(400):
    try:
        h.pread(512, 0)
    except nbd.Error as e:
        assert e.errno == "EIO", e.errno
        failed += 1
# 400 fair coin flips: all equal has probability 2**-399.
assert 0 < failed < 400, failed
h.pwrite(b"h" * 512, 0)

for code in ["EIO", "ENOSPC", "EPERM", "ENOMEM", "EINVAL", "ENOTSUP"]:
    h = connect(base + "read-" + code)
    fails(code, lambda: h.pread(512, 0), code)
    assert server_says("injected %s by the error filter (read offset=0 count=512)" % code), (code, msgs)
    h.pwrite(b"w" * 512, 0)
print("OK")
"#,
        ),
        &[&base],
    );
}

// ----------------------------------------------------- configuration errors

#[test]
fn bad_parameters_are_refused_by_check_naming_the_key() {
    let ex = Exports::new();
    let mem = "[[layer]]\nplugin = \"memory\"\nsize = \"1M\"\n";
    let filter = |name: &str, params: &str| format!("[[layer]]\nfilter = \"{name}\"\n{params}\n{mem}");
    let cases: Vec<(&str, String, &[&str])> = vec![
        ("e-errno", filter("error", "error = \"EFOO\""), &["parameter `error`", "EFOO", "EIO, ENOSPC"]),
        ("e-rate", filter("error", "rate = \"1.5\""), &["parameter `rate`", "1.5"]),
        ("e-rate-word", filter("error", "rate = \"often\""), &["parameter `rate`", "often"]),
        ("e-range", filter("error", "range = \"2M-1M\""), &["parameter `range`", "2M-1M"]),
        ("e-range-size", filter("error", "range = \"1X-2M\""), &["parameter `range`", "1X"]),
        ("e-ops", filter("error", "ops = \"read,reed\""), &["parameter `ops`", "reed"]),
        ("l-missing", filter("log", ""), &["missing required parameter `logfile`"]),
        ("l-dir", filter("log", "logfile = \"no/such/dir/x.log\""), &["parameter `logfile`", "no/such/dir/x.log"]),
        ("s-dir", filter("stats", "statsfile = \"nodir/stats.txt\""), &["parameter `statsfile`", "nodir"]),
        ("p-size", "[[layer]]\nplugin = \"pattern\"\n".into(), &["missing required parameter `size`"]),
        ("n-size", "[[layer]]\nplugin = \"null\"\nsize = \"12Q\"\n".into(), &["parameter `size`", "12Q"]),
        (
            "z-size",
            "[[layer]]\nplugin = \"zero\"\nsize = \"9223372036854775808\"\n".into(),
            &["parameter `size`", "9223372036854775808"],
        ),
    ];
    for (name, body, _) in &cases {
        ex.snippet(name, body);
    }
    let bin = nbdhost_bin();
    let o = run(bin.to_str().unwrap(), &["--check", "--exports-dir", &ex.dir_str()]);
    assert!(!o.status.success(), "--check accepted broken snippets");
    let err = String::from_utf8_lossy(&o.stderr);
    for (name, _, needles) in &cases {
        // Every broken snippet is reported, each naming its key.
        let line = err
            .lines()
            .find(|l| l.contains(&format!("{name}.toml")))
            .unwrap_or_else(|| panic!("{name}.toml is not reported:\n{err}"));
        for n in *needles {
            assert!(line.contains(n), "{name}: {n:?} missing from {line:?}\n{err}");
        }
    }

    // A TOML float reaches the plugin as text: `rate = 0.5` works as well
    // as `rate = "0.5"`, and a float where a size is due is refused.
    let float = Exports::new();
    float.snippet("e-float", &filter("error", "rate = 0.5"));
    let o = run(bin.to_str().unwrap(), &["--check", "--exports-dir", &float.dir_str()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let float = Exports::new();
    float.snippet("e-size", "[[layer]]\nplugin = \"null\"\nsize = 1.5\n");
    let o = run(bin.to_str().unwrap(), &["--check", "--exports-dir", &float.dir_str()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("e-size.toml") && err.contains("`1.5` is not a size"), "{err}");

    // The same plugins with good settings pass, and nothing is reported
    // for exports that never served anything.
    let good = Exports::new();
    good.snippet("n", "[[layer]]\nplugin = \"null\"\nsize = \"1G\"\n");
    good.snippet("z", "[[layer]]\nplugin = \"zero\"\nsize = \"1M\"\n");
    good.snippet("p", "[[layer]]\nplugin = \"pattern\"\nsize = \"1M\"\n");
    good.snippet(
        "f",
        r#"[[layer]]
filter = "log"
logfile = "f.log"
[[layer]]
filter = "stats"
statsfile = "f.stats"
[[layer]]
filter = "error"
error = "enospc"
rate = "25%"
range = "0+4K, 1M-2M"
ops = "read write"
file = "never-created"
[[layer]]
plugin = "pattern"
size = "4M"
"#,
    );
    let o = run(bin.to_str().unwrap(), &["--check", "--exports-dir", &good.dir_str()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("configuration OK: 4 export(s)"));
    assert!(err.contains("[error] injecting ENOSPC into read,write requests touching bytes 0-4096,1048576-2097152 with probability 0.25 while "), "{err}");
    assert!(!err.contains("[stats]"), "{err}");
}
