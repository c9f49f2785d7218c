//! Plugins built outside the workspace, panicking and failing plugins, and
//! clear errors for plugins that cannot be loaded.

use nbdhost_tests::*;

fn faulty_server(ex: &Exports) -> Server {
    let dir = build_test_plugin("faulty");
    ex.snippet("bad", "description = \"misbehaving test plugin\"\n[[layer]]\nplugin = \"faulty\"\nsize = \"16M\"\n");
    ex.snippet("mem", "[[layer]]\nplugin = \"memory\"\nsize = \"1M\"\n");
    let art = artifacts();
    Server::start(ex, &["--plugin-dir", dir.to_str().unwrap(), "--plugin-dir", art.to_str().unwrap()])
}

#[test]
fn out_of_tree_plugin_is_loaded_from_the_named_plugin_dir() {
    if !require_tool("nbdinfo") {
        return;
    }
    let ex = Exports::new();
    let srv = faulty_server(&ex);
    let out = run_ok("nbdinfo", &["--size", &srv.uri("bad")]);
    assert_eq!(out.trim(), (16u64 << 20).to_string());
    assert!(srv.log().contains("export `bad`: faulty"), "{}", srv.log());
}

const PANIC_SCRIPT: &str = r#"
import nbd, sys, threading
uri = sys.argv[1]
h = nbd.NBD()
h.set_debug(True)  # libnbd logs the server's structured error messages
h.connect_uri(uri)
h.pwrite(b"\xab" * 4096, 0)
assert h.pread(4096, 0) == b"\xab" * 4096

# A read that makes the plugin panic fails with EIO and a message...
try:
    h.pread(4096, 1 << 20)
    print("FAIL: panicking read succeeded")
    sys.exit(1)
except nbd.Error as e:
    assert e.errno == "EIO", e.errno
    print("panic ->", e.string)

# ...and the same connection keeps working.
assert h.pread(4096, 0) == b"\xab" * 4096

# An error returned by the plugin reaches the client with its message.
try:
    h.pread(512, 2 << 20)
    print("FAIL: failing read succeeded")
    sys.exit(1)
except nbd.Error as e:
    assert e.errno == "EIO", e.errno
    print("error ->", e.string)

# Panics on several connections at once do not disturb the others.
errors = []
def worker(i):
    try:
        g = nbd.NBD()
        g.connect_uri(uri)
        for _ in range(20):
            try:
                g.pread(4096, 1 << 20)
                errors.append("panic read succeeded")
            except nbd.Error as e:
                if e.errno != "EIO":
                    errors.append("errno %s" % e.errno)
            if g.pread(4096, 0) != b"\xab" * 4096:
                errors.append("bad data")
        g.shutdown()
    except Exception as e:
        errors.append(repr(e))
ts = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
[t.start() for t in ts]
[t.join() for t in ts]
assert not errors, errors
h.shutdown()
print("OK")
"#;

#[test]
fn panicking_plugin_fails_one_request_and_the_server_keeps_serving() {
    if !require_python_nbd() {
        return;
    }
    let ex = Exports::new();
    let mut srv = faulty_server(&ex);
    let o = python(PANIC_SCRIPT, &[&srv.uri("bad")]);
    let out = String::from_utf8_lossy(&o.stdout);
    let debug = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && out.contains("OK"), "{out}\n{debug}\nserver log:\n{}", srv.log());
    // The plugin's messages reached the client in structured error chunks.
    assert!(
        debug.contains("structured error server message: plugin panicked in pread: faulty plugin: deliberate panic reading offset 1048576"),
        "{debug}"
    );
    assert!(
        debug.contains("structured error server message: faulty plugin: injected failure at offset 2097152"),
        "{debug}"
    );
    assert!(srv.alive(), "server died:\n{}", srv.log());
    // Other exports are untouched.
    let o = python(
        "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\nh.pwrite(b'z'*512,0)\nassert h.pread(512,0)==b'z'*512\nprint('OK')",
        &[&srv.uri("mem")],
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("OK"), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(srv.wait_for_log("plugin panicked in pread"), "panic not logged:\n{}", srv.log());
}

#[test]
fn qemu_io_sees_eio_for_a_panicking_block_and_reads_the_rest() {
    if !require_tool("qemu-io") {
        return;
    }
    let ex = Exports::new();
    let mut srv = faulty_server(&ex);
    let o = run("qemu-io", &["-f", "raw", "-c", "read 1M 4k", &srv.uri("bad")]);
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(text.contains("Input/output error"), "{text}");
    run_ok("qemu-io", &["-f", "raw", "-c", "read -P 0 0 1M", "-c", "read -P 0 3M 1M", &srv.uri("bad")]);
    assert!(srv.alive());
}

fn check(ex: &Exports, extra: &[&str]) -> (bool, String) {
    let mut args = vec!["--check", "--exports-dir"];
    let d = ex.dir_str();
    args.push(&d);
    args.extend_from_slice(extra);
    let o = run(nbdhost_bin().to_str().unwrap(), &args);
    (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned() + &String::from_utf8_lossy(&o.stdout))
}

#[test]
fn a_missing_plugin_is_a_clear_error_naming_the_dirs_searched() {
    let ex = Exports::new();
    ex.snippet("x", "[[layer]]\nplugin = \"nosuch\"\n");
    let (ok, text) = check(&ex, &["--plugin-dir", "/nonexistent/plugins"]);
    assert!(!ok);
    assert!(text.contains("x.toml:2"), "{text}");
    assert!(text.contains("plugin `nosuch` not found"), "{text}");
    assert!(text.contains("/nonexistent/plugins"), "{text}");
    assert!(text.contains("nosuch.so"), "{text}");
}

#[test]
fn shared_objects_that_are_not_plugins_are_refused_with_the_reason() {
    let ex = Exports::new();
    let plugdir = ex.path("plugins");
    std::fs::create_dir(&plugdir).unwrap();
    // Not an ELF file at all: the dlopen error text is shown.
    std::fs::write(plugdir.join("garbage.so"), b"this is not a shared object").unwrap();
    ex.snippet("g", "[[layer]]\nplugin = \"garbage\"\n");
    let (ok, text) = check(&ex, &["--plugin-dir", plugdir.to_str().unwrap()]);
    assert!(!ok);
    assert!(text.contains("garbage.so") && text.contains("cannot load"), "{text}");

    // A real shared object without our entry point.
    let libm = [
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/usr/lib/x86_64-linux-gnu/libm.so.6",
        "/lib64/libm.so.6",
        "/usr/lib64/libm.so.6",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
    .expect("a libm to use as a non-plugin shared object");
    std::fs::remove_file(ex.path("g.toml")).unwrap();
    std::os::unix::fs::symlink(libm, plugdir.join("libmath.so")).unwrap();
    ex.snippet("m", "[[layer]]\nplugin = \"libmath\"\n");
    let (ok, text) = check(&ex, &["--plugin-dir", plugdir.to_str().unwrap()]);
    assert!(!ok);
    assert!(text.contains("not an nbdhost plugin") && text.contains("nbdhost_plugin_entry"), "{text}");
}

#[test]
fn plugin_parameters_are_validated_against_the_plugins_declarations() {
    let ex = Exports::new();
    ex.snippet("m", "[[layer]]\nplugin = \"memory\"\nszie = \"1G\"\n");
    let (ok, text) = check(&ex, &[]);
    assert!(!ok);
    assert!(
        text.contains("m.toml:3") && text.contains("unknown parameter `szie`") && text.contains("takes: size"),
        "{text}"
    );

    std::fs::remove_file(ex.path("m.toml")).unwrap();
    ex.snippet("m", "[[layer]]\nplugin = \"memory\"\nsize = \"lots\"\n");
    let (ok, text) = check(&ex, &[]);
    assert!(!ok);
    assert!(
        text.contains("m.toml:3") && text.contains("parameter `size`") && text.contains("`lots` is not a size"),
        "{text}"
    );

    std::fs::remove_file(ex.path("m.toml")).unwrap();
    ex.snippet("m", "[[layer]]\nplugin = \"memory\"\n");
    let (ok, text) = check(&ex, &[]);
    assert!(!ok);
    assert!(text.contains("missing required parameter `size`"), "{text}");
}

/// Run 4 connections x 8 concurrent reads against the `concurrency` plugin
/// built for `feature`, and return what it observed:
/// (max calls at once, max calls at once on one handle, max open handles).
fn observed_concurrency(feature: Option<&str>) -> (u32, u32, u32) {
    let dir = build_test_plugin_with("concurrency", feature.as_slice());
    let ex = Exports::new();
    ex.snippet("c", "[[layer]]\nplugin = \"concurrency\"\n");
    let srv = Server::start(&ex, &["--plugin-dir", dir.to_str().unwrap()]);
    let o = python(
        r#"
import nbd, sys, threading, struct
uri = sys.argv[1]
errors = []
def client(i):
    try:
        h = nbd.NBD()
        h.connect_uri(uri)
        bufs = [nbd.Buffer(4096) for _ in range(8)]
        for k in range(8):
            h.aio_pread(bufs[k], 4096 * (k + 1))
        while h.aio_in_flight() > 0:
            h.poll(-1)
        h.shutdown()
    except Exception as e:
        errors.append(repr(e))
ts = [threading.Thread(target=client, args=(i,)) for i in range(4)]
[t.start() for t in ts]
[t.join() for t in ts]
assert not errors, errors
h = nbd.NBD()
h.connect_uri(uri)
print("stats", *struct.unpack("<3I", h.pread(12, 0)))
"#,
        &[&srv.uri("c")],
    );
    let out = assert_ok("python", &o);
    let line = out.lines().find_map(|l| l.strip_prefix("stats ")).expect("stats line");
    let v: Vec<u32> = line.split_whitespace().map(|x| x.parse().unwrap()).collect();
    (v[0], v[1], v[2])
}

#[test]
fn each_thread_model_is_enforced_by_the_host() {
    if !require_python_nbd() {
        return;
    }
    let (all, per_handle, handles) = observed_concurrency(None);
    assert!(all > 1 && per_handle > 1, "parallel plugin never ran calls at once: {all} {per_handle}");
    assert!(handles > 1, "{handles}");
    let (all, per_handle, _) = observed_concurrency(Some("serialize_requests"));
    assert_eq!(per_handle, 1, "two calls at once on one connection");
    assert!(all > 1, "connections should still run in parallel: {all}");
    let (all, per_handle, _) = observed_concurrency(Some("serialize_all_requests"));
    assert_eq!((all, per_handle), (1, 1), "two calls at once across connections");
    let (all, _, handles) = observed_concurrency(Some("serialize_connections"));
    assert_eq!((all, handles), (1, 1), "two connections served at once");
}

/// ABI 1.2 lending for writes, through the `faulty` plugin's modes (a
/// write of 16 KiB or more that is not all buffered is received into
/// memory the plugin lends; 256 KiB is more than the read buffer holds):
/// lent memory receives the data intact; a plugin that lends too little,
/// refuses, panics, calls the sink twice or fails after filling fails that
/// write with the right error, its payload is consumed (the next request
/// parses), and the connection and the server go on.
#[test]
fn lent_writes_land_whole_and_broken_lending_fails_only_that_write() {
    let dir = build_test_plugin("faulty");
    let data = random_bytes(256 << 10, 4);
    let at = 8u64 << 20; // clear of the blocks that panic, fail or sleep
                         // (mode, errno of the write, whether its data (or, failed, a part of
                         // it) lands)
    let modes = [
        ("good", 0, true),
        ("copy", 0, true),
        ("short", 5, false),
        ("panic", 5, false),
        ("refuse", 28, false),
        ("twice", 5, true),
        ("fail", 5, true),
    ];
    for (mode, errno, lands) in modes {
        let ex = Exports::new();
        ex.snippet("f", &format!("[[layer]]\nplugin = \"faulty\"\nlend_write = \"{mode}\"\n"));
        let mut srv = Server::start(&ex, &["--plugin-dir", dir.to_str().unwrap()]);
        let mut r = Raw::fixed(&srv.addr);
        r.go("f");
        r.request(0, 1, 1, at, data.len() as u32, &data);
        assert_eq!(r.simple_reply(), (errno, 1), "{mode}: write\n{}", srv.log());
        // Framing held: the next request is parsed as one.
        r.request(0, 0, 2, at, data.len() as u32, &[]);
        assert_eq!(r.simple_reply(), (0, 2), "{mode}: read back");
        let back = r.try_read(data.len()).unwrap();
        if errno == 0 {
            assert!(back == data, "{mode}: the lent write did not land whole");
        } else if lands {
            // A write that failed after filling: the parts before the
            // failure landed (all of it if it came as one part), nothing
            // else.
            let k = back.iter().zip(&data).position(|(a, b)| a != b).unwrap_or(data.len());
            assert!(k > 0 && back[k..].iter().all(|&b| b == 0), "{mode}: not a prefix of the write ({k})");
        } else {
            assert!(back.iter().all(|&b| b == 0), "{mode}: a refused write changed the disk");
        }
        // A small write (not lent) and a large one still work.
        r.request(0, 1, 3, at, 4096, &data[..4096]);
        assert_eq!(r.simple_reply(), (0, 3), "{mode}: small write");
        if errno == 5 {
            assert!(srv.wait_for_log("WRITE 8388608+262144"), "{mode}: the failure is logged\n{}", srv.log());
        }
        assert!(srv.alive(), "{mode}: server died\n{}", srv.log());
    }
}

/// A lent write that arrives in odd pieces (a pause after 20000 bytes, or
/// dribbled 1000 bytes at a time) is taken in parts that keep to the
/// layer's 4 KiB minimum block, and lands whole.
#[test]
fn lent_writes_arriving_in_odd_pieces_keep_to_the_minimum_block() {
    let dir = build_test_plugin("faulty");
    let ex = Exports::new();
    ex.snippet("f", "[[layer]]\nplugin = \"faulty\"\nlend_write = \"good\"\nmin_block = \"4K\"\n");
    let mut srv = Server::start(&ex, &["--plugin-dir", dir.to_str().unwrap()]);
    let mut r = Raw::fixed(&srv.addr);
    r.go("f");
    let at = 8u64 << 20;
    for (cookie, piece, pause_ms) in [(1u64, 20_000usize, 100u64), (2, 1000, 1)] {
        let data = random_bytes(256 << 10, cookie);
        r.request(0, 1, cookie, at, data.len() as u32, &[]);
        for p in data.chunks(piece) {
            r.send(p);
            if piece == 20_000 && p.as_ptr() != data.as_ptr() {
                continue; // one pause, after the first piece
            }
            std::thread::sleep(std::time::Duration::from_millis(pause_ms));
        }
        assert_eq!(r.simple_reply(), (0, cookie), "pieces of {piece}\n{}", srv.log());
        r.request(0, 0, 10 + cookie, at, data.len() as u32, &[]);
        assert_eq!(r.simple_reply(), (0, 10 + cookie));
        assert!(r.try_read(data.len()).unwrap() == data, "pieces of {piece}: the write did not land whole");
    }
    assert!(srv.alive());
}

/// A GO over a Unix socket, by hand (the harness's `Raw` is TCP-only).
fn unix_go(path: &std::path::Path, name: &str) -> std::os::unix::net::UnixStream {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let data = Raw::info_data(name, &[]);
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&7u32.to_be_bytes());
    opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
    opt.extend_from_slice(&data);
    s.write_all(&opt).unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut d = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
        s.read_exact(&mut d).unwrap();
        assert!(kind & 0x8000_0000 == 0, "GO failed: {kind:#x}");
        if kind == 1 {
            return s;
        }
    }
}

/// An out-of-band byte in the middle of a write's payload on a Unix socket
/// is data like any other. (It used to be counted by FIONREAD but never
/// read, so the host waited for it while the memory backend held the pages
/// of the write locked: another client's read of them hung.)
#[test]
fn an_out_of_band_byte_is_data_and_never_holds_the_pages_locked() {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    let ex = Exports::new();
    ex.snippet("mem", "[[layer]]\nplugin = \"memory\"\nsize = \"16M\"\n");
    let sock = ex.path("nbd.sock");
    let srv = Server::start(&ex, &["--unix", sock.to_str().unwrap()]);
    // Start waits for the TCP listener; the Unix one is bound after it.
    assert!(srv.wait_for_log("listening on unix"), "{}", srv.log());
    let mut a = unix_go(&sock, "mem");
    let len = 256usize << 10;
    let mut head = 0x2560_9513u32.to_be_bytes().to_vec();
    head.extend_from_slice(&[0, 0, 0, 1]); // flags, WRITE
    head.extend_from_slice(&1u64.to_be_bytes());
    head.extend_from_slice(&0u64.to_be_bytes());
    head.extend_from_slice(&(len as u32).to_be_bytes());
    a.write_all(&head).unwrap();
    a.write_all(&vec![0xaa; 100_000]).unwrap();
    // SAFETY: send(2) of one valid byte on an open socket.
    let sent = unsafe { libc::send(a.as_raw_fd(), b"\xbb".as_ptr().cast(), 1, libc::MSG_OOB) };
    assert_eq!(sent, 1, "send MSG_OOB");
    std::thread::sleep(std::time::Duration::from_millis(300));
    // Another client reads the first pages meanwhile: answered at once.
    let mut b = Raw::fixed(&srv.addr);
    b.go("mem");
    b.request(0, 0, 2, 0, 4096, &[]);
    assert_eq!(b.simple_reply(), (0, 2), "the read of pages a write is arriving into");
    b.try_read(4096).unwrap();
    // The rest of the payload: the out-of-band byte was its 100001st.
    a.write_all(&vec![0xcc; len - 100_001]).unwrap();
    let mut reply = [0u8; 16];
    a.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[4..8], &[0, 0, 0, 0], "the write succeeded");
    b.request(0, 0, 3, 99_999, 3, &[]);
    assert_eq!(b.simple_reply(), (0, 3));
    assert_eq!(b.try_read(3).unwrap(), [0xaa, 0xbb, 0xcc]);
}

/// ABI 1.1 lending, through the `faulty` plugin's modes (reads of 64 KiB
/// or more are lent): lent data reaches the client intact; a plugin that
/// lends too little or panics fails that read with EIO and the connection
/// goes on; one that calls the sink a second time is refused, after the
/// first call's data went out whole.
#[test]
fn lent_reads_reach_the_client_and_broken_lending_fails_only_that_read() {
    let dir = build_test_plugin("faulty");
    let data = random_bytes(256 << 10, 3);
    let at = 8u64 << 20; // clear of the blocks that panic, fail or sleep
    for (mode, lent) in [("good", true), ("copy", true), ("twice", true), ("short", false), ("panic", false)] {
        let ex = Exports::new();
        ex.snippet("f", &format!("[[layer]]\nplugin = \"faulty\"\nlend = \"{mode}\"\n"));
        let mut srv = Server::start(&ex, &["--plugin-dir", dir.to_str().unwrap()]);
        let mut r = Raw::fixed(&srv.addr);
        r.go("f");
        r.request(0, 1, 1, at, data.len() as u32, &data);
        assert_eq!(r.simple_reply(), (0, 1), "{mode}: write");
        r.request(0, 0, 2, at, data.len() as u32, &[]);
        let (err, cookie) = r.simple_reply();
        assert_eq!(cookie, 2);
        if lent {
            assert_eq!(err, 0, "{mode}: lent read\n{}", srv.log());
            assert!(r.try_read(data.len()).unwrap() == data, "{mode}: lent data differs");
        } else {
            assert_eq!(err, 5, "{mode}: a broken lend is EIO\n{}", srv.log());
        }
        // The same connection goes on (a 4 KiB read is not lent).
        r.request(0, 0, 3, at, 4096, &[]);
        assert_eq!(r.simple_reply(), (0, 3), "{mode}: next read");
        assert_eq!(r.try_read(4096).unwrap(), data[..4096], "{mode}");
        if mode == "twice" {
            // The log is read by another thread: wait for it.
            assert!(srv.wait_for_log("failed after lending its data"), "{}", srv.log());
        }
        assert!(srv.alive(), "{mode}: server died\n{}", srv.log());
    }
}

/// A plugin whose lent pages fault while the host sends them (here a
/// mapping of a file truncated to nothing) costs that read, and at most
/// that connection, and nothing else: the host copies lent memory only
/// through the kernel, so there is no SIGBUS. Whether the kernel's send
/// stops before the reply's first byte (EIO, the connection goes on) or
/// after it (the connection must end, its reply cut short) is the kernel's
/// choice; both are checked for what they must do.
#[test]
fn lent_pages_that_fault_fail_that_read_and_the_server_lives() {
    let dir = build_test_plugin("faulty");
    let ex = Exports::new();
    ex.snippet("f", "[[layer]]\nplugin = \"faulty\"\nlend = \"gone\"\n");
    let mut srv = Server::start(&ex, &["--plugin-dir", dir.to_str().unwrap()]);
    let mut r = Raw::fixed(&srv.addr);
    r.go("f");
    r.request(0, 0, 1, 0, 256 << 10, &[]);
    let h = r.try_read(16).expect("a reply header");
    assert_eq!(&h[..4], &[0x67, 0x44, 0x66, 0x98], "simple reply magic");
    if h[4..8] == [0, 0, 0, 5] {
        // Nothing of the reply had left: EIO, and the connection goes on.
        assert!(srv.wait_for_log("lent memory that cannot be read"), "{}", srv.log());
        r.request(0, 0, 2, 0, 4096, &[]);
        assert_eq!(r.simple_reply(), (0, 2), "the connection goes on");
        assert_eq!(r.try_read(4096).unwrap(), vec![0u8; 4096]);
    } else {
        // The header left before the fault: the data must never complete.
        assert_eq!(&h[4..8], &[0, 0, 0, 0]);
        assert!(r.try_read(256 << 10).is_none(), "a cut-short reply must end the connection");
        assert!(srv.wait_for_log("stopped being readable"), "{}", srv.log());
    }
    assert!(srv.alive(), "server died\n{}", srv.log());
    // Other connections are served as before (4 KiB reads are not lent).
    let mut b = Raw::fixed(&srv.addr);
    b.go("f");
    b.request(0, 0, 3, 0, 4096, &[]);
    assert_eq!(b.simple_reply(), (0, 3));
    assert_eq!(b.try_read(4096).unwrap(), vec![0u8; 4096]);
}

/// `file` lends large reads from a mapping of the file. A file truncated
/// under the server is not lent past its new end: that read fails with EIO
/// (what `pread` says of the missing bytes), the connection goes on, and
/// what is still there is lent and right.
#[test]
fn file_lends_reads_and_a_file_truncated_underneath_fails_only_that_read() {
    let ex = Exports::new();
    let mib = 1usize << 20;
    let data = random_bytes(2 * mib, 7);
    std::fs::write(ex.path("disk.img"), &data).unwrap();
    ex.snippet("f", "[[layer]]\nplugin = \"file\"\npath = \"disk.img\"\n");
    let mut srv = Server::start(&ex, &["--log-level", "trace"]);
    let mut r = Raw::fixed(&srv.addr);
    r.go("f");
    r.request(0, 0, 1, mib as u64, mib as u32, &[]);
    assert_eq!(r.simple_reply(), (0, 1));
    assert!(r.try_read(mib).unwrap() == data[mib..], "lent data differs");
    assert!(srv.wait_for_log("f: pread_lend"), "the read was not lent\n{}", srv.log());
    // Another process shrinks the file.
    std::fs::OpenOptions::new().write(true).open(ex.path("disk.img")).unwrap().set_len(mib as u64).unwrap();
    r.request(0, 0, 2, mib as u64, mib as u32, &[]);
    assert_eq!(r.simple_reply(), (5, 2), "a read past the new end is EIO\n{}", srv.log());
    r.request(0, 0, 3, 0, mib as u32, &[]);
    assert_eq!(r.simple_reply(), (0, 3), "{}", srv.log());
    assert!(r.try_read(mib).unwrap() == data[..mib], "data before the new end differs");
    assert!(srv.alive(), "server died\n{}", srv.log());
}
