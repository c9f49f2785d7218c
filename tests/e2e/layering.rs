//! Layered exports: the design's own example (three files concatenated with
//! copy-on-write on the middle one only), multifile, persistent overlays
//! that survive `kill -9`, private and shared overlays.

use nbdhost_tests::*;
use std::time::Duration;

const MIB: usize = 1 << 20;

const THREE_FILES: &str = r#"
description = "three files end to end; copy-on-write on the middle one only"

[[layer]]
plugin = "concat"

[[layer.part]]
  [[layer.part.layer]]
  plugin = "file"
  path = "a.img"

[[layer.part]]
  [[layer.part.layer]]
  filter = "cow"
  [[layer.part.layer]]
  plugin = "file"
  path = "b.img"

[[layer.part]]
  [[layer.part.layer]]
  plugin = "file"
  path = "c.img"
"#;

#[test]
fn three_files_with_cow_on_the_middle_one_only() {
    if !require_python_nbd() || !require_tool("qemu-img") {
        return;
    }
    let ex = Exports::new();
    let originals: Vec<Vec<u8>> = (0..3).map(|i| random_bytes(4 * MIB, 100 + i)).collect();
    for (name, data) in ["a.img", "b.img", "c.img"].iter().zip(&originals) {
        std::fs::write(ex.path(name), data).unwrap();
    }
    ex.snippet("three", THREE_FILES);
    let srv = Server::start(&ex, &[]);
    assert!(srv.log().contains("export `three`: concat[file | cow > file | file]"), "{}", srv.log());
    // One write across all three parts (3 MiB .. 9 MiB), plus small ones
    // straddling each boundary.
    let o = python(
        r#"
import nbd, sys
M = 1 << 20
h = nbd.NBD()
h.connect_uri(sys.argv[1])
assert h.get_size() == 12 * M
big = bytes((i * 7 + 3) % 256 for i in range(6 * M))
h.pwrite(big, 3 * M)
h.pwrite(b"\xee" * 8192, 4 * M - 4096)
h.pwrite(b"\xdd" * 8192, 8 * M - 4096)
h.flush()
exp = bytearray(big)
exp[M - 4096 : M + 4096] = b"\xee" * 8192
exp[5 * M - 4096 : 5 * M + 4096] = b"\xdd" * 8192
assert h.pread(6 * M, 3 * M) == bytes(exp)
open(sys.argv[2], "wb").write(bytes(exp))
print("OK")
"#,
        &[&srv.uri("three"), ex.path("expected.bin").to_str().unwrap()],
    );
    assert!(assert_ok("python", &o).contains("OK"));
    let exp = std::fs::read(ex.path("expected.bin")).unwrap();
    // On disk: the outer files changed, the middle one did not.
    let a = std::fs::read(ex.path("a.img")).unwrap();
    let b = std::fs::read(ex.path("b.img")).unwrap();
    let c = std::fs::read(ex.path("c.img")).unwrap();
    assert!(a[..3 * MIB] == originals[0][..3 * MIB], "a.img before the write changed");
    assert!(a[3 * MIB..] == exp[..MIB], "a.img does not hold the written bytes");
    assert!(b == originals[1], "b.img (under cow) was modified");
    assert!(c[..MIB] == exp[5 * MIB..], "c.img does not hold the written bytes");
    assert!(c[MIB..] == originals[2][MIB..], "c.img after the write changed");
    // And a real client reading the whole export sees the overlay.
    let whole = ex.path("whole.img");
    run_ok("qemu-img", &["convert", "-f", "raw", "-O", "raw", &srv.uri("three"), whole.to_str().unwrap()]);
    let whole = std::fs::read(whole).unwrap();
    assert!(whole[3 * MIB..9 * MIB] == exp[..], "export contents differ from what was written");
    assert!(whole[..3 * MIB] == originals[0][..3 * MIB]);
}

#[test]
fn private_overlays_isolate_clients_and_shared_ones_do_not() {
    if !require_python_nbd() {
        return;
    }
    let ex = Exports::new();
    std::fs::write(ex.path("base.img"), vec![0x11u8; 4 * MIB]).unwrap();
    ex.snippet(
        "private",
        "[[layer]]\nfilter = \"cow\"\nshared = false\n[[layer]]\nplugin = \"file\"\npath = \"base.img\"\n",
    );
    ex.snippet("shared", "[[layer]]\nfilter = \"cow\"\n[[layer]]\nplugin = \"file\"\npath = \"base.img\"\n");
    let srv = Server::start(&ex, &[]);
    let script = r#"
import nbd, sys
a = nbd.NBD(); a.connect_uri(sys.argv[1])
b = nbd.NBD(); b.connect_uri(sys.argv[1])
a.pwrite(b"\xaa" * 5000, 100)
a.flush()
seen_a = a.pread(5000, 100)
seen_b = b.pread(5000, 100)
print("multi_conn", a.can_multi_conn())
print("a_sees_own", seen_a == b"\xaa" * 5000)
print("b_sees_a", seen_b == b"\xaa" * 5000)
print("b_sees_base", seen_b == b"\x11" * 5000)
a.shutdown()
c = nbd.NBD(); c.connect_uri(sys.argv[1])
print("later_sees_a", c.pread(5000, 100) == b"\xaa" * 5000)
"#;
    let out = assert_ok("python", &python(script, &[&srv.uri("private")]));
    for want in ["multi_conn False", "a_sees_own True", "b_sees_a False", "b_sees_base True", "later_sees_a False"] {
        assert!(out.contains(want), "private: expected {want}: {out}");
    }
    let out = assert_ok("python", &python(script, &[&srv.uri("shared")]));
    for want in ["multi_conn True", "a_sees_own True", "b_sees_a True", "later_sees_a True"] {
        assert!(out.contains(want), "shared: expected {want}: {out}");
    }
    assert!(std::fs::read(ex.path("base.img")).unwrap().iter().all(|&x| x == 0x11), "base written through cow");
}

#[test]
fn cow_records_trim_and_zero_and_merges_block_status() {
    if !require_python_nbd() {
        return;
    }
    let ex = Exports::new();
    // A base with data in the first 2 MiB and a hole after it.
    let f = std::fs::File::create(ex.path("base.img")).unwrap();
    f.set_len(8 * MIB as u64).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![0x22u8; 2 * MIB], 0).unwrap();
    drop(f);
    ex.snippet(
        "c",
        "[[layer]]\nfilter = \"cow\"\nblocksize = \"64K\"\n[[layer]]\nplugin = \"file\"\npath = \"base.img\"\n",
    );
    let srv = Server::start(&ex, &[]);
    let o = python(
        r#"
import nbd, sys
M = 1 << 20
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(sys.argv[1])
h.zero(M, 0)                       # zero recorded over base data
h.trim(65536, M + 65536)           # trim recorded
h.pwrite(b"\x33" * 100, 4 * M + 10)  # partial block in the base's hole
assert h.pread(M, 0) == bytes(M)
assert h.pread(65536, M + 65536) == bytes(65536)
assert h.pread(M - 65536, M + 131072) == b"\x22" * (M - 131072) + bytes(65536)
blk = h.pread(65536, 4 * M)
assert blk[10:110] == b"\x33" * 100 and blk[:10] == bytes(10) and blk[110:] == bytes(65536 - 110)
ext = []
h.block_status(8 * M, 0, lambda ctx, off, e, err: ext.append(list(e)) or 0)
e = ext[0]
pairs = [(e[i], e[i + 1]) for i in range(0, len(e), 2)]
print(pairs)
# zeroed: hole+zero; base data: data; trimmed: hole+zero; data; base hole; overlay block: data; base hole
assert pairs[0] == (M, 3), pairs
assert pairs[1] == (65536, 0), pairs
assert pairs[2] == (65536, 3), pairs
assert pairs[3] == (M - 131072, 0), pairs
assert pairs[4] == (2 * M, 3), pairs
assert pairs[5] == (65536, 0), pairs
assert pairs[6] == (4 * M - 65536, 3), pairs
print("OK")
"#,
        &[&srv.uri("c")],
    );
    assert!(assert_ok("python", &o).contains("OK"));
    let base = std::fs::read(ex.path("base.img")).unwrap();
    assert!(base[..2 * MIB].iter().all(|&x| x == 0x22) && base[2 * MIB..].iter().all(|&x| x == 0));
}

/// The client side of the crash test: writes 64 KiB blocks with distinct
/// contents to distinct places, several in flight, and flushes now and
/// then. After each FLUSH completes it records (atomically) every write
/// that had been acknowledged before that FLUSH was sent.
const CRASH_WRITER: &str = r#"
import nbd, sys, os, json, random
uri, state, round_no = sys.argv[1], sys.argv[2], int(sys.argv[3])
B = 65536
h = nbd.NBD()
h.connect_uri(uri)
rng = random.Random(round_no)
blocks = h.get_size() // B
slots = list(range(round_no * 200, round_no * 200 + 200))   # blocks this round owns
rng.shuffle(slots)
acked = []          # (block, seed) acknowledged so far
pending = {}        # cookie -> (block, seed, buffer)
flushes = {}        # cookie -> snapshot of acked
def data(block, seed):
    return bytes(((block * 131 + seed * 17 + i) & 0xFF) for i in range(256)) * (B // 256)
i = 0
while slots or pending or flushes:
    while slots and len(pending) < 8:
        blk = slots.pop()
        seed = rng.randrange(1, 250)
        buf = nbd.Buffer.from_bytearray(bytearray(data(blk, seed)))
        c = h.aio_pwrite(buf, blk * B)
        pending[c] = (blk, seed, buf)
        i += 1
        if i % 5 == 0:
            flushes[h.aio_flush()] = list(acked)
    h.poll(-1)
    for c in list(pending):
        if h.aio_command_completed(c):
            blk, seed, _ = pending.pop(c)
            acked.append((blk, seed))
    for c in list(flushes):
        if h.aio_command_completed(c):
            snap = flushes.pop(c)
            tmp = state + ".tmp"
            with open(tmp, "w") as f:
                json.dump(snap, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, state)
print("writer finished", len(acked))
"#;

const CRASH_CHECKER: &str = r#"
import nbd, sys, json
uri, state = sys.argv[1], sys.argv[2]
B = 65536
def data(block, seed):
    return bytes(((block * 131 + seed * 17 + i) & 0xFF) for i in range(256)) * (B // 256)
try:
    flushed = json.load(open(state))
except FileNotFoundError:
    flushed = []
h = nbd.NBD()
h.connect_uri(uri)
bad = [blk for (blk, seed) in flushed if h.pread(B, blk * B) != data(blk, seed)]
print("checked", len(flushed), "lost", len(bad))
"#;

#[test]
fn persistent_overlay_keeps_every_flushed_write_across_kill_9() {
    if !require_python_nbd() {
        return;
    }
    let ex = Exports::new();
    let base = ex.path("base.img");
    std::fs::File::create(&base).unwrap().set_len(128 * MIB as u64).unwrap();
    ex.snippet(
        "p",
        "[[layer]]\nfilter = \"cow\"\noverlay = \"overlay.img\"\n[[layer]]\nplugin = \"file\"\npath = \"base.img\"\n",
    );
    let mut total_checked = 0;
    for round in 0..8u64 {
        let srv = Server::start(&ex, &[]);
        let state = ex.path(&format!("round{round}.json"));
        let mut writer = std::process::Command::new("/usr/bin/python3")
            .args(["-c", CRASH_WRITER, &srv.uri("p"), state.to_str().unwrap(), &round.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Let it get going, then kill the server while writes are in flight.
        std::thread::sleep(Duration::from_millis(150 + 70 * round));
        srv.signal(libc::SIGKILL);
        let _ = writer.wait();
        drop(srv);
        // Restart on the same overlay and check everything flushed.
        let srv = Server::start(&ex, &[]);
        for r in 0..=round {
            let st = ex.path(&format!("round{r}.json"));
            let out = assert_ok("checker", &python(CRASH_CHECKER, &[&srv.uri("p"), st.to_str().unwrap()]));
            assert!(out.contains("lost 0"), "round {round}, checking round {r}: {out}");
            if r == round {
                total_checked += out.split_whitespace().nth(1).and_then(|n| n.parse::<usize>().ok()).unwrap_or(0);
            }
        }
    }
    assert!(total_checked > 0, "no write was ever flushed before a kill: the test proved nothing");
    assert!(std::fs::metadata(&base).unwrap().len() == 128 * MIB as u64);
    assert!(std::fs::read(&base).unwrap().iter().all(|&b| b == 0), "base written through cow");
}

#[test]
fn multifile_reads_the_same_bytes_as_nbd_server() {
    if !require_tool("nbd-server") || !require_tool("nbdcopy") || !require_python_nbd() {
        return;
    }
    let ex = Exports::new();
    // Unequal sizes, as nbd-server allows.
    let sizes = [3 * MIB, MIB + 4096, 2 * MIB];
    for (i, s) in sizes.iter().enumerate() {
        std::fs::write(ex.path(&format!("disk.{i}")), random_bytes(*s, 7 + i as u64)).unwrap();
    }
    ex.snippet("multi", "[[layer]]\nplugin = \"file\"\npath = \"disk\"\nmultifile = true\n");
    ex.snippet("listed", "[[layer]]\nplugin = \"file\"\npaths = [\"disk.0\", \"disk.1\", \"disk.2\"]\n");
    let srv = Server::start(&ex, &[]);
    // nbd-server on the same files.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let conf = ex.path("nbd-server.conf");
    std::fs::write(
        &conf,
        format!(
            "[generic]\nport = {port}\nlistenaddr = 127.0.0.1\nallowlist = true\n[multi]\nexportname = {}\nmultifile = true\nreadonly = true\n",
            ex.path("disk").display()
        ),
    )
    .unwrap();
    let mut peer = std::process::Command::new("nbd-server")
        .args(["-C", conf.to_str().unwrap(), "-d"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // `nbd-server -d` serves exactly one connection: read it all through
    // one libnbd handle.
    let theirs = ex.path("theirs.img");
    let read_all = r#"
import nbd, sys, time
h = nbd.NBD()
for _ in range(50):
    try:
        h.connect_uri(sys.argv[1])
        break
    except nbd.Error:
        time.sleep(0.1)
        h = nbd.NBD()
size = h.get_size()
with open(sys.argv[2], "wb") as f:
    off = 0
    while off < size:
        n = min(1 << 20, size - off)
        f.write(h.pread(n, off))
        off += n
print("OK")
"#;
    let o = python(read_all, &[&format!("nbd://127.0.0.1:{port}/multi"), theirs.to_str().unwrap()]);
    let ok = o.status.success() && String::from_utf8_lossy(&o.stdout).contains("OK");
    let _ = peer.kill();
    let _ = peer.wait();
    assert!(ok, "could not read from nbd-server: {}", String::from_utf8_lossy(&o.stderr));
    let theirs = std::fs::read(theirs).unwrap();
    assert_eq!(theirs.len(), sizes.iter().sum::<usize>());
    for export in ["multi", "listed"] {
        let ours = ex.path(&format!("ours-{export}.img"));
        run_ok("nbdcopy", &[&srv.uri(export), ours.to_str().unwrap()]);
        assert!(std::fs::read(ours).unwrap() == theirs, "{export}: bytes differ from nbd-server's");
    }
    // Writes that cross a file boundary land in both files.
    if require_python_nbd() {
        let o = python(
            "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\nh.pwrite(b'\\x5c'*8192, 3*1024*1024-4096)\nh.flush()\nprint('OK')",
            &[&srv.uri("multi")],
        );
        assert!(assert_ok("python", &o).contains("OK"));
        let f0 = std::fs::read(ex.path("disk.0")).unwrap();
        let f1 = std::fs::read(ex.path("disk.1")).unwrap();
        assert!(f0[3 * MIB - 4096..].iter().all(|&b| b == 0x5c));
        assert!(f1[..4096].iter().all(|&b| b == 0x5c));
    }
}

#[test]
fn layering_mistakes_are_refused_naming_file_export_and_layer() {
    let ex = Exports::new();
    let check = |snippet: &str| -> String {
        for f in std::fs::read_dir(ex.dir.path()).unwrap() {
            std::fs::remove_file(f.unwrap().path()).unwrap();
        }
        ex.snippet("x", snippet);
        let o = run(nbdhost_bin().to_str().unwrap(), &["--check", "--exports-dir", &ex.dir_str()]);
        assert!(!o.status.success(), "accepted: {snippet}");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let e = check("[[layer]]\nfilter = \"memory\"\n[[layer]]\nplugin = \"memory\"\nsize = \"1M\"\n");
    assert!(
        e.contains("x.toml:2")
            && e.contains("export `x`, layer 1")
            && e.contains("`memory` is a backend plugin, not a filter"),
        "{e}"
    );
    let e = check("[[layer]]\nplugin = \"cow\"\n");
    assert!(e.contains("`cow` is a filter"), "{e}");
    let e = check("[[layer]]\nfilter = \"nosuchfilter\"\n[[layer]]\nplugin = \"memory\"\nsize = \"1M\"\n");
    assert!(e.contains("plugin `nosuchfilter` not found"), "{e}");
    let e = check("[[layer]]\nfilter = \"cow\"\nblocksize = \"1000\"\n[[layer]]\nplugin = \"memory\"\nsize = \"1M\"\n");
    assert!(e.contains("layer 1 (cow)") && e.contains("blocksize 1000 must be a power of two"), "{e}");
    let e = check("[[layer]]\nplugin = \"concat\"\n");
    assert!(e.contains("`concat` is a filter") && e.contains("[[layer.part]]"), "{e}");
    let e = check("[[layer]]\nplugin = \"concat\"\n[[layer.part]]\n  [[layer.part.layer]]\n  plugin = \"memory\"\n  szie = \"1M\"\n");
    assert!(e.contains("layer 1, part 1, layer 1 (memory): unknown parameter `szie`"), "{e}");
    let e = check("[[layer]]\nplugin = \"memory\"\nsize = \"1M\"\n[[layer.part]]\n  [[layer.part.layer]]\n  plugin = \"memory\"\n  size = \"1M\"\n");
    assert!(e.contains("backend `memory` takes no parts"), "{e}");
    let e = check("[[layer]]\nplugin = \"file\"\npaths = [\"a\", \"b\"]\npath = \"c\"\n");
    assert!(e.contains("either `path` or `paths`"), "{e}");
    let e = check("[[layer]]\nplugin = \"memory\"\nsize = [\"1M\"]\n");
    assert!(e.contains("parameter `size` takes a single value, not a list"), "{e}");
}

#[test]
fn sighup_reload_adds_changes_and_removes_exports_without_dropping_clients() {
    if !require_python_nbd() || !require_tool("nbdinfo") {
        return;
    }
    let ex = Exports::new();
    ex.snippet("keep", "description = \"kept\"\n[[layer]]\nplugin = \"memory\"\nsize = \"4M\"\n");
    ex.snippet("change", "description = \"before\"\n[[layer]]\nplugin = \"memory\"\nsize = \"4M\"\n");
    ex.snippet("gone", "[[layer]]\nplugin = \"memory\"\nsize = \"4M\"\n");
    let srv = Server::start(&ex, &[]);
    // A client stays connected to each export across the reloads.
    let mut holder = std::process::Command::new("/usr/bin/python3")
        .args([
            "-c",
            r#"
import nbd, sys
hs = {}
for name in ["keep", "change", "gone"]:
    h = nbd.NBD(); h.connect_uri(sys.argv[1] + name)
    h.pwrite(name.encode() * 100, 0)
    hs[name] = h
print("ready", flush=True)
sys.stdin.readline()
for name, h in hs.items():
    assert h.pread(len(name) * 100, 0) == name.encode() * 100, name
print("still connected", flush=True)
"#,
            &format!("nbd://{}/", srv.addr),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(holder.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "ready");

    // A broken snippet: the running configuration stays.
    ex.snippet("broken", "[[layer]]\nplugin = \"memory\"\nszie = \"1M\"\n");
    srv.signal(libc::SIGHUP);
    assert!(srv.wait_for_log("reload refused, keeping the running configuration"), "{}", srv.log());
    assert!(srv.log().contains("broken.toml:3") && srv.log().contains("unknown parameter `szie`"), "{}", srv.log());
    let list = run_ok("nbdinfo", &["--list", &format!("nbd://{}", srv.addr)]);
    assert!(list.contains("gone") && !list.contains("broken"), "{list}");

    // Fix it, change one, remove one.
    std::fs::remove_file(ex.path("broken.toml")).unwrap();
    ex.snippet("new", "description = \"added\"\n[[layer]]\nplugin = \"memory\"\nsize = \"2M\"\n");
    ex.snippet("change", "description = \"after\"\n[[layer]]\nplugin = \"memory\"\nsize = \"8M\"\n");
    std::fs::remove_file(ex.path("gone.toml")).unwrap();
    srv.signal(libc::SIGHUP);
    assert!(srv.wait_for_log("reload done: 1 kept, added [new], changed [change], removed [gone]"), "{}", srv.log());
    let list = run_ok("nbdinfo", &["--list", "--json", &format!("nbd://{}", srv.addr)]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let names: Vec<&str> =
        v["exports"].as_array().unwrap().iter().map(|e| e["export-name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["change", "keep", "new"], "{list}");
    let change = v["exports"].as_array().unwrap().iter().find(|e| e["export-name"] == "change").unwrap();
    assert_eq!(change["description"], "after");
    assert_eq!(change["export-size"], 8 * MIB as u64);
    // The kept export is the same disk: a new client sees what the held
    // client wrote. The removed export takes no new clients.
    let o = python(
        "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\nprint(h.pread(400,0)==b'keep'*100)",
        &[&srv.uri("keep")],
    );
    assert_eq!(assert_ok("python", &o).trim(), "True");
    assert!(!run("nbdinfo", &[&srv.uri("gone")]).status.success());
    // And the clients connected all along were never dropped.
    use std::io::Write;
    holder.stdin.take().unwrap().write_all(b"go\n").unwrap();
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "still connected");
    assert!(holder.wait().unwrap().success());
}

#[test]
fn offset_and_readonly_filters_stack_over_a_file() {
    if !require_python_nbd() {
        return;
    }
    let ex = Exports::new();
    let base = random_bytes(8 * MIB, 55);
    std::fs::write(ex.path("base.img"), &base).unwrap();
    ex.snippet("win", "[[layer]]\nfilter = \"offset\"\noffset = \"1M\"\nrange = \"2M\"\n[[layer]]\nplugin = \"file\"\npath = \"base.img\"\n");
    ex.snippet(
        "ro",
        "[[layer]]\nfilter = \"readonly\"\n[[layer]]\nfilter = \"offset\"\noffset = \"4M\"\n[[layer]]\nplugin = \"file\"\npath = \"base.img\"\n",
    );
    ex.snippet("bad", "[[layer]]\nfilter = \"offset\"\noffset = \"7M\"\nrange = \"2M\"\n[[layer]]\nplugin = \"file\"\npath = \"base.img\"\n");
    let srv = Server::start(&ex, &[]);
    let o = python(
        r#"
import nbd, sys
M = 1 << 20
base = open(sys.argv[2], "rb").read()
w = nbd.NBD(); w.connect_uri(sys.argv[1] + "win")
assert w.get_size() == 2 * M
assert w.pread(2 * M, 0) == base[M:3 * M]
w.pwrite(b"\x77" * 4096, 2 * M - 4096)          # last 4 KiB of the window
w.set_strict_mode(0)
try:
    w.pwrite(b"\x77" * 512, 2 * M)              # just past the window
    raise SystemExit("write past the window succeeded")
except nbd.Error as e:
    assert e.errno == "ENOSPC", e.errno
w.flush()
r = nbd.NBD(); r.set_strict_mode(0); r.connect_uri(sys.argv[1] + "ro")
assert r.is_read_only() and r.get_size() == 4 * M
assert r.pread(4096, 0) == base[4 * M:4 * M + 4096]
try:
    r.pwrite(b"x" * 512, 0)
    raise SystemExit("write through readonly succeeded")
except nbd.Error as e:
    assert e.errno == "EPERM", e.errno
print("OK")
"#,
        &[&format!("nbd://{}/", srv.addr), ex.path("base.img").to_str().unwrap()],
    );
    assert!(assert_ok("python", &o).contains("OK"));
    let now = std::fs::read(ex.path("base.img")).unwrap();
    assert!(now[3 * MIB - 4096..3 * MIB].iter().all(|&b| b == 0x77), "window write did not land at 1M+2M-4K");
    assert!(now[..3 * MIB - 4096] == base[..3 * MIB - 4096] && now[3 * MIB..] == base[3 * MIB..]);
    // A window that does not fit is refused when a client opens it.
    let o = run("nbdinfo", &[&srv.uri("bad")]);
    assert!(!o.status.success());
    assert!(srv.wait_for_log("does not fit in the layer below"), "{}", srv.log());
}

#[test]
fn cow_copy_on_read_keeps_what_was_read_even_if_the_base_changes() {
    if !require_python_nbd() {
        return;
    }
    let ex = Exports::new();
    std::fs::write(ex.path("base.img"), vec![0x41u8; 4 * MIB]).unwrap();
    ex.snippet(
        "cor",
        "[[layer]]\nfilter = \"cow\"\ncopy-on-read = true\n[[layer]]\nplugin = \"file\"\npath = \"base.img\"\n",
    );
    ex.snippet("plain", "[[layer]]\nfilter = \"cow\"\n[[layer]]\nplugin = \"file\"\npath = \"base.img\"\n");
    let srv = Server::start(&ex, &[]);
    let read = |export: &str| {
        let o = python(
            "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\nd=h.pread(65536, 65536)\nprint(d[0], d[-1])",
            &[&srv.uri(export)],
        );
        assert_ok("python", &o).trim().to_string()
    };
    assert_eq!(read("cor"), "65 65");
    assert_eq!(read("plain"), "65 65");
    // Someone changes the base behind the server's back (cow assumes it
    // never changes; this only shows where the data now comes from).
    std::fs::write(ex.path("base.img"), vec![0x42u8; 4 * MIB]).unwrap();
    assert_eq!(read("cor"), "65 65", "copy-on-read did not keep the block");
    assert_eq!(read("plain"), "66 66", "without copy-on-read, reads come from below");
}

/// Filters that only shift or narrow ranges pass lending on (ABI 1.3): a
/// large read through `truncate` over `offset` over `file` is sent from the
/// file's mapping, the grown tail as zeros, without a copy into the host's
/// buffer; every read returns the right data whichever way it went.
#[test]
fn reads_are_lent_through_truncate_and_offset_from_the_file_below() {
    let ex = Exports::new();
    let data = random_bytes(3 * MIB, 0x1e4d);
    std::fs::write(ex.path("disk.img"), &data).unwrap();
    // Window file[1M, 3M) grown to 4 MiB: [2M, 4M) of the export is zeros.
    ex.snippet(
        "w",
        "[[layer]]\nfilter = \"truncate\"\nsize = \"4M\"\n[[layer]]\nfilter = \"offset\"\noffset = \"1M\"\n\
         [[layer]]\nplugin = \"file\"\npath = \"disk.img\"\n",
    );
    let mut srv = Server::start(&ex, &["--log-level", "trace"]);
    let expect = |off: usize, len: usize| -> Vec<u8> {
        (off..off + len).map(|i| if i < 2 * MIB { data[MIB + i] } else { 0 }).collect()
    };
    let mut r = Raw::fixed(&srv.addr);
    r.go("w");
    // The first read of a connection is always lent: half from the file,
    // half grown tail.
    let (off, len) = (3 * MIB / 2, MIB);
    r.request(0, 0, 1, off as u64, len as u32, &[]);
    assert_eq!(r.simple_reply(), (0, 1), "{}", srv.log());
    assert!(r.try_read(len).unwrap() == expect(off, len), "lent data differs");
    for needle in
        ["w: pread_lend 1572864+1048576", "w/offset: pread_lend 1572864+524288", "w/file: pread_lend 2621440+524288"]
    {
        assert!(srv.wait_for_log(needle), "no `{needle}`: the read was not lent through\n{}", srv.log());
    }
    assert!(!srv.log().contains("w/file: pread "), "the file was read into a buffer\n{}", srv.log());
    // More reads, lent or copied as the host sees fit: all inside the file,
    // across the end of the window, all zeros, unaligned.
    for (cookie, (off, len)) in
        [(0, MIB), (MIB + 4096, MIB), (2 * MIB, 2 * MIB), (12345, 300_000), (4 * MIB - 65536, 65536)]
            .into_iter()
            .enumerate()
    {
        let cookie = cookie as u64 + 2;
        r.request(0, 0, cookie, off as u64, len as u32, &[]);
        assert_eq!(r.simple_reply(), (0, cookie), "{}", srv.log());
        assert!(r.try_read(len).unwrap() == expect(off, len), "read {off}+{len} differs");
    }
    // A real client over several connections.
    if require_tool("nbdcopy") {
        let out = ex.path("copy.img");
        run_ok("nbdcopy", &["--connections=2", "--request-size=1048576", &srv.uri("w"), out.to_str().unwrap()]);
        assert!(std::fs::read(&out).unwrap() == expect(0, 4 * MIB), "nbdcopy through the filters differs");
    }
    assert!(srv.alive(), "{}", srv.log());
}

/// `cow` lends the blocks it does not hold from the layer below and its
/// own blocks from its overlay's mapping, in one lent reply: a read across
/// unchanged, written and zeroed blocks returns each from the right place.
/// Where the file below declines (a range it no longer covers), cow passes
/// the decline on and the host reads the usual way, which reports the
/// short file as EIO.
#[test]
fn cow_lends_unchanged_blocks_from_below_and_its_own_from_the_overlay() {
    let ex = Exports::new();
    let data = random_bytes(2 * MIB, 0xc0e);
    std::fs::write(ex.path("base.img"), &data).unwrap();
    ex.snippet(
        "c",
        "[[layer]]\nfilter = \"cow\"\nblocksize = \"64K\"\n[[layer]]\nplugin = \"file\"\npath = \"base.img\"\n",
    );
    let mut srv = Server::start(&ex, &["--log-level", "trace"]);
    let mut expect = data.clone();
    let mut w = Raw::fixed(&srv.addr);
    w.go("c");
    // A whole block and part of another written; a block zeroed.
    let patch = random_bytes(65536 + 1000, 0x9a7c);
    w.request(0, 1, 1, 131072, patch.len() as u32, &patch);
    assert_eq!(w.simple_reply(), (0, 1));
    expect[131072..131072 + patch.len()].copy_from_slice(&patch);
    w.request(0, 6, 2, 327680, 65536, &[]);
    assert_eq!(w.simple_reply(), (0, 2));
    expect[327680..393216].fill(0);
    // A fresh connection, so its first read is lent.
    let mut r = Raw::fixed(&srv.addr);
    r.go("c");
    r.request(0, 0, 3, 0, MIB as u32, &[]);
    assert_eq!(r.simple_reply(), (0, 3), "{}", srv.log());
    assert!(r.try_read(MIB).unwrap() == expect[..MIB], "lent data differs");
    for needle in [
        "c: pread_lend 0+1048576",
        "c/file: pread_lend 0+131072",
        "c/file: pread_lend 262144+65536",
        "c/file: pread_lend 393216+655360",
    ] {
        assert!(srv.wait_for_log(needle), "no `{needle}`\n{}", srv.log());
    }
    // Every alignment, lent or copied.
    for (cookie, (off, len)) in
        [(0, 2 * MIB), (100_000, 400_000), (131072 + 65536, 70_000), (MIB + 7, MIB - 7)].into_iter().enumerate()
    {
        let cookie = cookie as u64 + 4;
        r.request(0, 0, cookie, off as u64, len as u32, &[]);
        assert_eq!(r.simple_reply(), (0, cookie), "{}", srv.log());
        assert!(r.try_read(len).unwrap() == expect[off..off + len], "read {off}+{len} differs");
    }
    // The base shrinks underneath: the file declines what it no longer
    // covers, cow passes that on, and the host's own read fails it alone.
    std::fs::OpenOptions::new().write(true).open(ex.path("base.img")).unwrap().set_len(MIB as u64).unwrap();
    // The writer's connection has read nothing yet, so it still lends.
    w.request(0, 0, 10, MIB as u64, MIB as u32, &[]);
    assert_eq!(w.simple_reply(), (5, 10), "a read past the new end is EIO\n{}", srv.log());
    for needle in ["c: pread_lend 1048576+1048576", "c: pread 1048576+1048576"] {
        assert!(srv.wait_for_log(needle), "no `{needle}`: not declined and read the usual way\n{}", srv.log());
    }
    w.request(0, 0, 11, 0, MIB as u32, &[]);
    assert_eq!(w.simple_reply(), (0, 11), "{}", srv.log());
    assert!(w.try_read(MIB).unwrap() == expect[..MIB], "data before the new end differs");
    assert!(!srv.log().contains("panicked"), "{}", srv.log());
    assert!(srv.alive(), "{}", srv.log());
}

/// `file` with `direct = true` (O_DIRECT) serves any range a client or a
/// filter asks for: unaligned writes and reads straight on it, and `cow`
/// over it reading partial blocks below into its own buffers. The kernel
/// refuses such transfers on an O_DIRECT descriptor (EINVAL), so before
/// the file plugin aligned them these requests failed.
#[test]
fn direct_file_takes_unaligned_requests_alone_and_under_cow() {
    if !require_python_nbd() {
        return;
    }
    let ex = Exports::new();
    // Not a multiple of 4 KiB: the tail cannot be written with O_DIRECT
    // without extending the file.
    let size = 4 * MIB + 1000;
    let base = random_bytes(size, 0xd1);
    std::fs::write(ex.path("d.img"), &base).unwrap();
    std::fs::write(ex.path("c.img"), &base).unwrap();
    ex.snippet("d", "[[layer]]\nplugin = \"file\"\npath = \"d.img\"\ndirect = true\n");
    ex.snippet("c", "[[layer]]\nfilter = \"cow\"\n[[layer]]\nplugin = \"file\"\npath = \"c.img\"\ndirect = true\n");
    let mut srv = Server::start(&ex, &[]);
    let o = python(
        r#"
import nbd, sys
M = 1 << 20
base = bytearray(open(sys.argv[2], "rb").read())
for name in ("d", "c"):
    model = bytearray(base)
    h = nbd.NBD(); h.connect_uri(sys.argv[1] + name)
    assert h.get_size() == len(model)
    for i, (off, ln) in enumerate([(0, 65536), (100, 5000), (4095, 2), (M - 7, 3 * 4096),
                                   (len(model) - 1000, 1000), (len(model) - 5000, 5000),
                                   (2 * M + 512, 512), (3 * M, M)]):
        data = bytes((j * 7 + i + 1) & 0xff for j in range(ln))
        h.pwrite(data, off)
        model[off:off + ln] = data
        assert h.pread(ln, off) == bytes(model[off:off + ln]), (name, off, ln)
        a = off & ~4095; n = min(8192, len(model) - a)
        assert h.pread(n, a) == bytes(model[a:a + n]), (name, off)
    h.flush()
    assert h.pread(len(model), 0) == bytes(model), name
    open(sys.argv[3] + name, "wb").write(model)
print("OK")
"#,
        &[&format!("nbd://{}/", srv.addr), ex.path("d.img").to_str().unwrap(), ex.path("model.").to_str().unwrap()],
    );
    assert!(assert_ok("python", &o).contains("OK"), "{}", srv.log());
    // The writes reached the file itself; cow kept the base untouched.
    assert!(std::fs::read(ex.path("d.img")).unwrap() == std::fs::read(ex.path("model.d")).unwrap());
    assert_eq!(std::fs::metadata(ex.path("d.img")).unwrap().len(), size as u64, "a write extended the file");
    assert!(std::fs::read(ex.path("c.img")).unwrap() == base, "cow wrote to its base");
    assert!(!srv.log().contains("refused an O_DIRECT transfer"), "{}", srv.log());
    assert!(srv.alive(), "{}", srv.log());
}

/// `log`, `blocksize` and `concat` pass lent reads on: a read of whole
/// blocks inside one part, or across mapped parts, is lent by the files
/// below (nested, one reply), and `log` writes one line for it. Where a
/// part declines (an O_DIRECT file is not mapped) or `blocksize` would
/// need its bounce buffer (a partial block), the whole read is declined
/// and read with `pread`, and `log` still writes exactly one line.
#[test]
fn log_blocksize_and_concat_lend_reads_and_log_each_once() {
    let ex = Exports::new();
    let parts: Vec<Vec<u8>> = (0..3).map(|i| random_bytes(MIB, 0xc0 + i)).collect();
    for (i, p) in parts.iter().enumerate() {
        std::fs::write(ex.path(&format!("p{i}.img")), p).unwrap();
    }
    let all: Vec<u8> = parts.concat();
    let logfile = ex.path("reads.log");
    ex.snippet(
        "l",
        &format!(
            "[[layer]]\nfilter = \"log\"\nlogfile = \"{}\"\n[[layer]]\nfilter = \"blocksize\"\nminblock = \"4K\"\n\
             maxdata = \"512K\"\n[[layer]]\nplugin = \"concat\"\n\
             [[layer.part]]\n  [[layer.part.layer]]\n  plugin = \"file\"\n  path = \"p0.img\"\n\
             [[layer.part]]\n  [[layer.part.layer]]\n  plugin = \"file\"\n  path = \"p1.img\"\n\
             [[layer.part]]\n  [[layer.part.layer]]\n  plugin = \"file\"\n  path = \"p2.img\"\n  direct = true\n",
            logfile.display()
        ),
    );
    // `log` inside a part: a read across into a part that declines is
    // declined after `log`'s own layer lent, and must still be logged once.
    let nlog = ex.path("n.log");
    ex.snippet(
        "n",
        &format!(
            "[[layer]]\nplugin = \"concat\"\n\
             [[layer.part]]\n  [[layer.part.layer]]\n  filter = \"log\"\n  logfile = \"{}\"\n\
             [[layer.part.layer]]\n  plugin = \"file\"\n  path = \"p0.img\"\n\
             [[layer.part]]\n  [[layer.part.layer]]\n  plugin = \"file\"\n  path = \"p2.img\"\n  direct = true\n",
            nlog.display()
        ),
    );
    let mut srv = Server::start(&ex, &["--log-level", "trace"]);
    {
        let mut r = Raw::fixed(&srv.addr);
        r.go("n");
        let (off, len) = (MIB - 65536, 131_072);
        r.request(0, 0, 99, off as u64, len as u32, &[]);
        assert_eq!(r.simple_reply(), (0, 99), "{}", srv.log());
        let want: Vec<u8> = parts[0][off..].iter().chain(&parts[2][..off + len - MIB]).copied().collect();
        assert!(r.try_read(len).unwrap() == want, "read across into the O_DIRECT part differs");
        assert!(srv.wait_for_log(&format!("n: pread {off}+{len}")), "not declined\n{}", srv.log());
    }
    // (offset, length, lent): whole blocks in part 0; across parts 0 and 1
    // (both mapped); two of blocksize's pieces (it does not nest lending
    // on one layer: declined); a partial block (declined); across parts 1
    // and 2 (part 2, O_DIRECT, declines); inside part 2 only.
    let reads = [
        (0, MIB / 2, true),
        (MIB - MIB / 4, MIB / 2, true),
        (0, MIB, false),
        (MIB + 100, 200_000, false),
        (2 * MIB - 65536, 131_072, false),
        (2 * MIB + 4096, 65536, false),
    ];
    for (i, &(off, len, lent)) in reads.iter().enumerate() {
        // A connection's first read is always offered for lending (later
        // ones may be copied while the client is slow to read).
        let mut r = Raw::fixed(&srv.addr);
        r.go("l");
        let cookie = i as u64 + 1;
        r.request(0, 0, cookie, off as u64, len as u32, &[]);
        assert_eq!(r.simple_reply(), (0, cookie), "{}", srv.log());
        assert!(r.try_read(len).unwrap() == all[off..off + len], "read {off}+{len} differs");
        let offered = format!("l: pread_lend {off}+{len}");
        assert!(srv.wait_for_log(&offered), "no `{offered}`\n{}", srv.log());
        let copied = format!("l: pread {off}+{len}");
        if lent {
            let trace: String = srv.log().lines().skip_while(|l| !l.contains(&offered)).collect::<Vec<_>>().join("\n");
            assert!(!trace.contains(&copied), "read {off}+{len} was declined\n{trace}");
        } else {
            assert!(srv.wait_for_log(&copied), "read {off}+{len} was not declined\n{}", srv.log());
        }
    }
    assert!(srv.alive(), "{}", srv.log());
    srv.terminate();
    let log = std::fs::read_to_string(&logfile).unwrap();
    for &(off, len, _) in &reads {
        let line = format!("Read offset={off} count={len} -> ok");
        assert_eq!(log.matches(&line).count(), 1, "`{line}` is not logged exactly once:\n{log}");
    }
    assert_eq!(log.matches("Read offset=").count(), reads.len(), "{log}");
    let log = std::fs::read_to_string(&nlog).unwrap();
    let line = format!("Read offset={} count=65536 -> ok", MIB - 65536);
    assert_eq!(log.matches("Read offset=").count(), 1, "{log}");
    assert_eq!(log.matches(&line).count(), 1, "{log}");
}
