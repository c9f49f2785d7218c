//! Real clients against the bundled memory and file backends.

use nbdhost_tests::*;

const MIB: usize = 1 << 20;

fn mem_and_file(ex: &Exports, size: &str) {
    ex.snippet(
        "mem",
        &format!("description = \"RAM disk for tests\"\n[[layer]]\nplugin = \"memory\"\nsize = \"{size}\"\n"),
    );
    ex.snippet(
        "disk",
        &format!("description = \"file-backed disk\"\n[[layer]]\nplugin = \"file\"\npath = \"disk.img\"\nsize = \"{size}\"\n"),
    );
}

#[test]
fn qemu_img_convert_round_trips_64mib_through_memory_and_file() {
    if !require_tool("qemu-img") {
        return;
    }
    let ex = Exports::new();
    mem_and_file(&ex, "64M");
    let src = ex.path("src.img");
    let data = random_bytes(64 * MIB, 0x5eed);
    std::fs::write(&src, &data).unwrap();
    let srv = Server::start(&ex, &[]);
    for export in ["mem", "disk"] {
        let uri = srv.uri(export);
        run_ok("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", src.to_str().unwrap(), &uri]);
        let back = ex.path(&format!("back-{export}.img"));
        run_ok("qemu-img", &["convert", "-f", "raw", "-O", "raw", &uri, back.to_str().unwrap()]);
        let got = std::fs::read(&back).unwrap();
        assert_eq!(got.len(), data.len(), "{export}: size after round trip");
        assert!(got == data, "{export}: data after round trip differs");
        let cmp = run("qemu-img", &["compare", "-f", "raw", "-F", "raw", src.to_str().unwrap(), &uri]);
        assert!(cmp.status.success(), "{export}: qemu-img compare: {}", String::from_utf8_lossy(&cmp.stdout));
    }
    // The file export really wrote the backing file.
    assert!(std::fs::read(ex.path("disk.img")).unwrap() == data, "disk.img on disk differs from what was written");
}

#[test]
fn nbdinfo_list_shows_every_export_with_its_description() {
    if !require_tool("nbdinfo") {
        return;
    }
    let ex = Exports::new();
    mem_and_file(&ex, "8M");
    ex.snippet(
        "ro",
        "description = \"read-only scratch\"\nreadonly = true\n[[layer]]\nplugin = \"memory\"\nsize = \"1M\"\n",
    );
    let srv = Server::start(&ex, &[]);
    let out = run_ok("nbdinfo", &["--list", "--json", &format!("nbd://{}", srv.addr)]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo --json output");
    let exports = v["exports"].as_array().expect("exports array");
    let find = |name: &str| {
        exports.iter().find(|e| e["export-name"] == name).unwrap_or_else(|| panic!("{name} missing: {out}"))
    };
    assert_eq!(exports.len(), 3, "{out}");
    assert_eq!(find("mem")["description"], "RAM disk for tests");
    assert_eq!(find("disk")["description"], "file-backed disk");
    assert_eq!(find("ro")["description"], "read-only scratch");
    assert_eq!(find("mem")["export-size"], 8 * MIB as u64);
    assert_eq!(find("ro")["is_read_only"], true);
    assert_eq!(find("mem")["is_read_only"], false);
    assert_eq!(find("mem")["can_multi_conn"], true);
    assert_eq!(find("mem")["can_flush"], true);
    assert_eq!(find("mem")["can_fua"], true);
    assert_eq!(v["protocol"], "newstyle-fixed");
}

#[test]
fn qemu_io_writes_and_reads_back_patterns() {
    if !require_tool("qemu-io") {
        return;
    }
    let ex = Exports::new();
    mem_and_file(&ex, "16M");
    let srv = Server::start(&ex, &[]);
    for export in ["mem", "disk"] {
        let uri = srv.uri(export);
        // Writes in one connection...
        run_ok(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0xa5 0 64k",
                "-c",
                "write -P 0x3c 1000 3000", // unaligned
                "-c",
                "write -P 0x77 15M 1M", // up to the last byte
                "-c",
                "write -P 0xee 4M 2M",
                "-c",
                "write -z 5M 512k", // zeroes over data
                "-c",
                "write -P 0x11 8M 1M",
                "-c",
                "discard 8M 1M",
                "-c",
                "flush",
                &uri,
            ],
        );
        // ...read back in another, so the data really lives in the export.
        let out = run_ok(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "read -P 0xa5 0 1000",
                "-c",
                "read -P 0x3c 1000 3000",
                "-c",
                "read -P 0xa5 4000 61536",
                "-c",
                "read -P 0x77 15M 1M",
                "-c",
                "read -P 0xee 4M 1M",
                "-c",
                "read -P 0 5M 512k",
                "-c",
                "read -P 0xee 5632k 512k",
                "-c",
                "read -P 0 64k 960k",
                &uri,
            ],
        );
        assert!(!out.contains("Pattern verification failed"), "{export}: {out}");
        assert_eq!(out.matches("read ").count(), 8, "{export}: {out}");
        // Past the end is refused, not wrapped or truncated.
        let past = run("qemu-io", &["-f", "raw", "-c", "read 16M 512", &uri]);
        let text = String::from_utf8_lossy(&past.stdout).to_string() + &String::from_utf8_lossy(&past.stderr);
        assert!(
            text.contains("Input/output error")
                || text.contains("Invalid argument")
                || text.contains("out of range")
                || !past.status.success(),
            "{export}: read past end: {text}"
        );
    }
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    if !require_tool("qemu-io") {
        return;
    }
    let ex = Exports::new();
    ex.snippet("ro", "readonly = true\n[[layer]]\nplugin = \"memory\"\nsize = \"1M\"\n");
    let srv = Server::start(&ex, &[]);
    // qemu-io opens read-only exports read-only; force a raw write through
    // libnbd instead if it is there, else check qemu-io's refusal.
    let o = run("qemu-io", &["-f", "raw", "-c", "write -P 1 0 4k", &srv.uri("ro")]);
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        text.contains("read-only") || text.contains("Operation not permitted") || text.contains("Permission denied"),
        "{text}"
    );
    if require_python_nbd() {
        let o = python(
            r#"
import nbd, sys
h = nbd.NBD()
h.set_strict_mode(0)  # let the request reach the server: we test its answer
h.connect_uri(sys.argv[1])
assert h.is_read_only()
try:
    h.pwrite(b"x" * 512, 0)
    print("write succeeded")
except nbd.Error as e:
    print("errno", e.errno)
"#,
            &[&srv.uri("ro")],
        );
        let out = String::from_utf8_lossy(&o.stdout);
        // The server answers NBD_EPERM.
        assert!(out.contains("errno EPERM"), "{out} {}", String::from_utf8_lossy(&o.stderr));
    }
}

#[test]
fn unix_socket_and_default_export() {
    if !require_tool("nbdinfo") || !require_tool("qemu-img") {
        return;
    }
    let ex = Exports::new();
    mem_and_file(&ex, "4M");
    let sock = ex.path("nbd.sock");
    let srv = Server::start_args(
        &[
            "--exports-dir".into(),
            ex.dir_str(),
            "--unix".into(),
            sock.to_string_lossy().into_owned(),
            "--default-export".into(),
            "mem".into(),
        ],
        false,
    );
    let out = run_ok("nbdinfo", &["--size", &format!("nbd+unix:///disk?socket={}", sock.display())]);
    assert_eq!(out.trim(), (4 * MIB).to_string());
    // The empty export name means the default export.
    let info = run_ok("qemu-img", &["info", "--output=json", &format!("nbd+unix://?socket={}", sock.display())]);
    assert!(info.contains(&format!("\"virtual-size\": {}", 4 * MIB)), "{info}");
    drop(srv);
}

/// Large writes from a real client, over TCP and a Unix socket, are
/// received straight into the memory backend's pages (ABI 1.2
/// `pwrite_lend`, traced at `trace` level) and read back intact.
#[test]
fn nbdcopy_writes_land_in_lent_memory_over_tcp_and_unix() {
    if !require_tool("nbdcopy") {
        return;
    }
    let ex = Exports::new();
    mem_and_file(&ex, "16M");
    let sock = ex.path("nbd.sock");
    let srv = Server::start(&ex, &["--unix", sock.to_str().unwrap(), "--log-level", "trace"]);
    // Start waits for the TCP listener; the Unix one is bound after it.
    assert!(srv.wait_for_log("listening on unix"), "{}", srv.log());
    let data = random_bytes(16 * MIB, 0x1e7d);
    let src = ex.path("src.img");
    std::fs::write(&src, &data).unwrap();
    let unix = format!("nbd+unix:///mem?socket={}", sock.display());
    for (how, uri) in [("tcp", srv.uri("mem")), ("unix", unix)] {
        let before = srv.log().matches("mem: pwrite_lend").count();
        run_ok("nbdcopy", &["--request-size=1048576", "--requests=8", src.to_str().unwrap(), &uri]);
        let back = ex.path(&format!("back-{how}.img"));
        run_ok("nbdcopy", &[&uri, back.to_str().unwrap()]);
        assert!(std::fs::read(&back).unwrap() == data, "{how}: data read back differs");
        let lent = |log: &str| log.matches("mem: pwrite_lend").count() - before;
        srv.wait_for(|log| lent(log) >= 16);
        let lent = lent(&srv.log());
        assert!(lent >= 16, "{how}: only {lent} parts of 16 1 MiB writes were received into lent memory");
    }
}

/// Large writes to `file` are received straight into its shared mapping
/// (ABI 1.2 `pwrite_lend`) where the pages are already in the page cache,
/// and declined (ABI 1.5) where they are not (a fresh sparse file: writing
/// an uncached page through a mapping would read it from disk first), so
/// the host writes those with `pwrite`. Both ways, over TCP and a Unix
/// socket, the file on disk ends up holding exactly what a real client
/// wrote, and reads back so.
#[test]
fn nbdcopy_writes_go_into_a_mapped_file_where_cached_and_through_pwrite_where_not() {
    if !require_tool("nbdcopy") {
        return;
    }
    let ex = Exports::new();
    // One file per transport: pages the server has mapped (lent) stay
    // cached whatever we advise.
    for name in ["tcp", "unix"] {
        ex.snippet(name, &format!("[[layer]]\nplugin = \"file\"\npath = \"{name}.img\"\nsize = \"16M\"\n"));
    }
    let sock = ex.path("nbd.sock");
    let srv = Server::start(&ex, &["--unix", sock.to_str().unwrap(), "--log-level", "trace"]);
    assert!(srv.wait_for_log("listening on unix"), "{}", srv.log());
    let unix = format!("nbd+unix:///unix?socket={}", sock.display());
    for (n, (how, uri)) in [("tcp", srv.uri("tcp")), ("unix", unix)].into_iter().enumerate() {
        let count = |log: &str| {
            (log.matches(&format!("{how}: pwrite_lend")).count(), log.matches(&format!("{how}: pwrite ")).count())
        };
        for cached in [false, true] {
            if cached {
                // Reading the whole disk brings its pages into the page cache.
                run_ok("nbdcopy", &[&uri, ex.path("warm.img").to_str().unwrap()]);
            } else {
                // Pages of a file no one has read or written yet are not
                // cached: drop the file's (clean, just written back).
                let f = std::fs::File::open(ex.path(&format!("{how}.img"))).unwrap();
                f.sync_all().unwrap();
                // SAFETY: advisory call on a descriptor we own.
                let rc = unsafe {
                    libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, libc::POSIX_FADV_DONTNEED)
                };
                assert_eq!(rc, 0);
            }
            let data = random_bytes(16 * MIB, 0xf11e + 2 * n as u64 + cached as u64);
            let src = ex.path("src.img");
            std::fs::write(&src, &data).unwrap();
            let (lent0, copied0) = count(&srv.log());
            run_ok("nbdcopy", &["--request-size=1048576", "--requests=8", src.to_str().unwrap(), &uri]);
            // The page cache, which the mapping shares, is what a read sees.
            assert!(
                std::fs::read(ex.path(&format!("{how}.img"))).unwrap() == data,
                "{how}, cached={cached}: the file differs"
            );
            let back = ex.path("back.img");
            run_ok("nbdcopy", &[&uri, back.to_str().unwrap()]);
            assert!(std::fs::read(&back).unwrap() == data, "{how}, cached={cached}: data read back differs");
            let (lent, copied) = count(&srv.log());
            let (lent, copied) = (lent - lent0, copied - copied0);
            if cached {
                assert!(copied == 0 && lent >= 16, "{how}: {lent} parts lent, {copied} written with pwrite");
            } else {
                // Parts on pages not cached are declined, and the rest of
                // their write goes out in one `pwrite`; writes that sleep in
                // the filesystem (allocating blocks) may also run on workers,
                // which write with `pwrite` without offering. (A `pwrite`
                // may also bring in a large folio that covers a later write's
                // pages, which are then lent.)
                assert!(copied >= 16, "{how}: {lent} parts offered, {copied} written with pwrite");
            }
        }
    }
}

/// `cow` receives large writes straight into its temporary overlay's
/// mapping (ABI 1.5 `FilterTable::pwrite_lend`) once the overlay's pages
/// are cached (the first pass over a fresh, sparse overlay is declined and
/// written with `pwrite`), whole blocks and partial ones already copied up
/// alike; a persistent overlay declines every time. Either way the client
/// reads back what it wrote and the file below is untouched.
#[test]
fn nbdcopy_writes_into_a_cow_overlay_go_into_its_mapping_and_leave_the_base_alone() {
    if !require_tool("nbdcopy") {
        return;
    }
    let ex = Exports::new();
    let base = random_bytes(8 * MIB, 0xba5e);
    std::fs::write(ex.path("base.img"), &base).unwrap();
    let below = "[[layer]]\nplugin = \"file\"\npath = \"base.img\"\n";
    ex.snippet("tmp", &format!("[[layer]]\nfilter = \"cow\"\nblocksize = \"64K\"\n{below}"));
    let ov = ex.path("ov");
    ex.snippet(
        "kept",
        &format!("[[layer]]\nfilter = \"cow\"\noverlay = \"{}\"\nblocksize = \"64K\"\n{below}", ov.display()),
    );
    let srv = Server::start(&ex, &["--log-level", "trace"]);
    // The top layer traces under the export's name.
    let count = |log: &str, export: &str| {
        (log.matches(&format!("{export}: pwrite_lend")).count(), log.matches(&format!("{export}: pwrite ")).count())
    };
    let src = ex.path("src.img");
    let back = ex.path("back.img");
    for (export, round) in [("tmp", 0u64), ("tmp", 1), ("kept", 0), ("kept", 1)] {
        let uri = srv.uri(export);
        let data = random_bytes(8 * MIB, 0xc0 + round);
        std::fs::write(&src, &data).unwrap();
        let (lent0, copied0) = count(&srv.log(), export);
        run_ok("nbdcopy", &["--request-size=1048576", "--requests=8", src.to_str().unwrap(), &uri]);
        run_ok("nbdcopy", &[&uri, back.to_str().unwrap()]);
        assert!(std::fs::read(&back).unwrap() == data, "{export} round {round}: data read back differs");
        assert!(std::fs::read(ex.path("base.img")).unwrap() == base, "{export}: the file below was written");
        let (lent, copied) = count(&srv.log(), export);
        let (lent, copied) = (lent - lent0, copied - copied0);
        match (export, round) {
            ("tmp", 1) => {
                assert!(lent >= 8, "only {lent} parts offered");
                assert_eq!(copied, 0, "the overlay is cached now: every part lent");
            }
            // A fresh overlay has no pages cached, nor blocks copied up
            // (a `pwrite` may bring in a large folio covering later parts).
            ("tmp", _) => assert!(copied > 0, "{lent} parts offered, none declined"),
            // Declined, or on workers (which do not offer): one `pwrite`
            // per write at least.
            _ => assert!(copied >= 8, "{export} round {round}: {lent} offered, {copied} written with pwrite"),
        }
    }
}

/// Large reads go out both ways the host has, lent from the backend's
/// memory and copied into the reply first (each connection tries both on
/// its first two and then picks what costs it less CPU), and either way a
/// real client gets exactly what was written: `nbdcopy` reads 256 KiB
/// requests back from `memory` and `file` over TCP and a Unix socket, and
/// the connections' debug summaries show runs sent each way. (Reads of
/// 1 MiB and more that run on workers are split into pieces that are
/// always copied; 256 KiB reads all go through the choice.)
#[test]
fn large_reads_arrive_intact_both_lent_and_copied() {
    if !require_tool("nbdcopy") {
        return;
    }
    let ex = Exports::new();
    mem_and_file(&ex, "16M");
    let sock = ex.path("nbd.sock");
    let srv = Server::start(&ex, &["--unix", sock.to_str().unwrap(), "--log-level", "debug"]);
    assert!(srv.wait_for_log("listening on unix"), "{}", srv.log());
    let data = random_bytes(16 * MIB, 0x5eed);
    let src = ex.path("src.img");
    std::fs::write(&src, &data).unwrap();
    // (lent, copied) runs over the connections whose peer starts so.
    let runs = |log: &str, peer: &str| {
        let (mut lent, mut copied) = (0u64, 0u64);
        for line in log.lines().filter(|l| l.contains(&format!("] {peer}")) && l.contains("large data runs:")) {
            let words: Vec<&str> = line.split_whitespace().collect();
            let at = words.iter().position(|w| *w == "runs:").unwrap();
            lent += words[at + 1].parse::<u64>().unwrap();
            copied += words[at + 3].parse::<u64>().unwrap();
        }
        (lent, copied)
    };
    for export in ["mem", "disk"] {
        let unix = format!("nbd+unix:///{export}?socket={}", sock.display());
        for (peer, uri) in [("127.0.0.1:", srv.uri(export)), ("unix", unix)] {
            run_ok("nbdcopy", &[src.to_str().unwrap(), &uri]);
            let before = runs(&srv.log(), peer);
            let back = ex.path(&format!("back-{export}-{}.img", peer.trim_end_matches(':')));
            run_ok("nbdcopy", &["--request-size=262144", "--requests=8", &uri, back.to_str().unwrap()]);
            assert!(std::fs::read(&back).unwrap() == data, "{export} over {peer}: data read back differs");
            // Summaries are logged as connections end.
            let since = |log: &str| {
                let now = runs(log, peer);
                (now.0 - before.0, now.1 - before.1)
            };
            srv.wait_for(|log| since(log).0 + since(log).1 >= 64);
            let (lent, copied) = since(&srv.log());
            assert_eq!(lent + copied, 64, "{export} over {peer}: 64 reads of 256 KiB\n{}", srv.log());
            assert!(lent > 0 && copied > 0, "{export} over {peer}: {lent} lent, {copied} copied");
        }
    }
}

#[test]
fn unknown_export_gets_a_clear_refusal() {
    if !require_tool("nbdinfo") {
        return;
    }
    let ex = Exports::new();
    mem_and_file(&ex, "1M");
    let srv = Server::start(&ex, &[]);
    let o = run("nbdinfo", &[&srv.uri("nosuch")]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("nosuch"), "{err}");
    // The refusal is ERR_UNKNOWN with a message that says what is wrong.
    let mut r = Raw::fixed(&srv.addr);
    r.option(7, &Raw::info_data("nosuch", &[]));
    let replies = r.opt_replies();
    assert_eq!(replies.len(), 1, "no INFO before ERR_UNKNOWN");
    assert_eq!(replies[0].1, 0x8000_0006);
    assert_eq!(String::from_utf8_lossy(&replies[0].2), "export `nosuch` does not exist");
    // The connection stays usable after a failed GO.
    assert_eq!(r.go("mem").0, 1 << 20);
    // Without a default export the empty name is refused too, and says why.
    let o = run("nbdinfo", &[&format!("nbd://{}", srv.addr)]);
    assert!(!o.status.success());
    let mut r = Raw::fixed(&srv.addr);
    r.option(7, &Raw::info_data("", &[]));
    let (_, kind, msg) = r.opt_reply();
    assert_eq!(kind, 0x8000_0006);
    assert!(String::from_utf8_lossy(&msg).contains("no default export"), "{}", String::from_utf8_lossy(&msg));
}
