//! Plugin authors: plugins written in C against `nbdhost-plugin.h` and
//! compiled with gcc here, the guide's out-of-tree Rust crates, ABI
//! evolution (shorter and longer tables, refused libraries), the
//! `nbdhost plugins` listing, and the host services a plugin sees.

use nbdhost_tests::*;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

// ------------------------------------------------------------ helpers

/// The C test plugins, compiled once per test process: `good` holds the
/// working ones, `broken` one library per refusal case.
struct CPlugins {
    good: PathBuf,
    broken: PathBuf,
}

/// Refusal cases built from tests/c/evolution/broken.c: (file stem, what
/// the host must say about it).
const BROKEN: &[(&str, &str)] = &[
    ("bad_major", "built for ABI 2.0, this host speaks ABI 1.x"),
    ("null_table", "its entry point refused this host (host ABI 1.5)"),
    ("tiny_table", "table is 8 bytes, smaller than the 56-byte ABI header"),
    ("bad_kind", "unknown kind 9 (this host knows backends and filters)"),
    ("no_entry", "no `nbdhost_plugin_entry` symbol, not an nbdhost plugin"),
    ("no_pread", "a backend must provide create, open, get_size and pread"),
    ("bad_children", "declares between 2 and 1 layers below it"),
];

fn gcc(src: &Path, out: &Path, defines: &[String]) {
    let include = workspace_root().join("plugin-api/include");
    let o = std::process::Command::new("gcc")
        .args(["-shared", "-fPIC", "-std=c11", "-pedantic", "-Wall", "-Wextra", "-Werror"])
        .args(defines)
        .arg("-I")
        .arg(&include)
        .arg("-o")
        .arg(out)
        .arg(src)
        .arg("-lpthread")
        .output()
        .expect("run gcc");
    assert!(o.status.success(), "gcc {} failed:\n{}", src.display(), String::from_utf8_lossy(&o.stderr));
}

fn c_plugins() -> Option<&'static CPlugins> {
    if !require_tool("gcc") {
        return None;
    }
    static BUILT: OnceLock<CPlugins> = OnceLock::new();
    Some(BUILT.get_or_init(|| {
        let base = target_dir().join("c-plugins");
        // Directories of earlier test processes that are gone.
        if let Ok(entries) = std::fs::read_dir(&base) {
            for e in entries.flatten() {
                let pid = e.file_name().to_string_lossy().into_owned();
                if !Path::new("/proc").join(&pid).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let root = base.join(std::process::id().to_string());
        let (good, broken) = (root.join("good"), root.join("broken"));
        std::fs::create_dir_all(&good).unwrap();
        std::fs::create_dir_all(&broken).unwrap();
        let c = workspace_root().join("tests/c");
        for (src, name) in [
            ("cdisk.c", "cdisk"),
            ("cxor.c", "cxor"),
            ("cpattern.c", "cpattern"),
            ("evolution/oldminor.c", "oldminor"),
            ("evolution/newminor.c", "newminor"),
        ] {
            gcc(&c.join(src), &good.join(format!("{name}.so")), &[]);
        }
        for (name, _) in BROKEN {
            let define = format!("-DCASE_{}", name.to_ascii_uppercase());
            gcc(&c.join("evolution/broken.c"), &broken.join(format!("{name}.so")), &[define]);
        }
        CPlugins { good, broken }
    }))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Start a server on `ex` with these plugin directories (in order).
fn serve(ex: &Exports, dirs: &[&Path], extra: &[&str]) -> Server {
    let mut args: Vec<&str> = Vec::new();
    for d in dirs {
        args.extend(["--plugin-dir", s(d)]);
    }
    args.extend_from_slice(extra);
    Server::start(ex, &args)
}

/// `nbdinfo --json` of one export.
fn nbdinfo(uri: &str) -> serde_json::Value {
    let out = run_ok("nbdinfo", &["--json", uri]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo --json output");
    v["exports"][0].clone()
}

/// Run a libnbd Python script; assert it printed OK and return stderr
/// (libnbd's debug output when the script turns it on).
fn py_ok(script: &str, uri: &str, srv: &Server) -> String {
    let o = python(script, &[uri]);
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        o.status.success() && out.contains("OK"),
        "python failed ({}):\n{out}\n{}\nserver log:\n{}",
        o.status,
        err.lines().filter(|l| !l.contains("libnbd: debug")).collect::<Vec<_>>().join("\n"),
        srv.log()
    );
    err
}

/// Upload `data` with `qemu-img convert -n`, download the whole export
/// again and compare.
fn qemu_img_round_trip(srv: &Server, export: &str, data: &[u8], dir: &Path) {
    let src = dir.join(format!("{export}-up.img"));
    let back = dir.join(format!("{export}-down.img"));
    std::fs::write(&src, data).unwrap();
    let uri = srv.uri(export);
    run_ok("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", s(&src), &uri]);
    run_ok("qemu-img", &["convert", "-f", "raw", "-O", "raw", &uri, s(&back)]);
    let got = std::fs::read(&back).unwrap();
    assert_eq!(got.len(), data.len(), "size of {export} after the round trip");
    assert!(got == data, "{export}: data read back differs from what qemu-img wrote");
}

/// Random data with a 1 MiB run of zeros in the middle (so qemu-img zeroes
/// instead of writing there).
fn image(len: usize, seed: u64) -> Vec<u8> {
    let mut v = random_bytes(len, seed);
    let mid = len / 2;
    v[mid - (1 << 19)..mid + (1 << 19)].fill(0);
    v
}

fn plugins_cmd(args: &[&str]) -> Output {
    let mut all = vec!["plugins"];
    all.extend_from_slice(args);
    run(s(&nbdhost_bin()), &all)
}

/// Whitespace-normalised text, so column alignment does not matter.
fn norm(t: &str) -> String {
    t.lines().map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")).collect::<Vec<_>>().join("\n")
}

/// The listing as (name, kind, version, abi, description) rows.
fn listing_rows(out: &str) -> Vec<[String; 5]> {
    let mut lines = out.lines();
    assert_eq!(norm(lines.next().unwrap_or("")), "NAME KIND VERSION ABI DESCRIPTION", "{out}");
    lines
        .map(|l| {
            let mut it = l.split_whitespace();
            let mut next = || it.next().unwrap_or("").to_string();
            let (a, b, c, d) = (next(), next(), next(), next());
            [a, b, c, d, it.collect::<Vec<_>>().join(" ")]
        })
        .collect()
}

// ------------------------------------------------------------ the guide

/// Code blocks of docs/writing-plugins.md preceded by `<!-- KIND: NAME -->`:
/// (kind, name, block text).
fn guide_blocks() -> Vec<(String, String, String)> {
    let guide = std::fs::read_to_string(workspace_root().join("docs/writing-plugins.md")).expect("the guide");
    let lines: Vec<&str> = guide.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i].trim();
        if let Some(marker) = l.strip_prefix("<!-- ").and_then(|m| m.strip_suffix(" -->")) {
            let (kind, name) = marker.split_once(": ").expect("marker is `KIND: NAME`");
            assert!(lines.get(i + 1).is_some_and(|f| f.starts_with("```")), "no code block after {l}");
            let end = (i + 2..lines.len()).find(|&j| lines[j] == "```").expect("closing fence");
            let mut body = lines[i + 2..end].join("\n");
            body.push('\n');
            out.push((kind.to_string(), name.to_string(), body));
            i = end;
        }
        i += 1;
    }
    out
}

#[test]
fn the_guides_code_blocks_are_the_files_the_tests_build() {
    let blocks = guide_blocks();
    let files: Vec<&str> = blocks.iter().filter(|b| b.0 == "file").map(|b| b.1.as_str()).collect();
    for want in [
        "tests/plugins/guide-backend/Cargo.toml",
        "tests/plugins/guide-backend/src/lib.rs",
        "tests/plugins/guide-filter/Cargo.toml",
        "tests/plugins/guide-filter/src/lib.rs",
        "tests/c/cpattern.c",
    ] {
        assert!(files.contains(&want), "the guide no longer shows {want}");
    }
    for (kind, name, body) in &blocks {
        match kind.as_str() {
            "file" => {
                let on_disk = std::fs::read_to_string(workspace_root().join(name))
                    .unwrap_or_else(|e| panic!("the guide shows {name}, which cannot be read: {e}"));
                assert!(
                    *body == on_disk,
                    "docs/writing-plugins.md shows {name} differently from the file the tests build; \
                     copy the file into the guide (or the guide into the file)"
                );
            }
            "snippet" => assert!(body.contains("[[layer]]"), "snippet {name} has no layer"),
            "output" => assert!(body.starts_with("$ nbdhost "), "output block without its command: {body}"),
            other => panic!("unknown guide marker kind `{other}`"),
        }
    }
    // The guide says how long its examples are: keep them short.
    let lines = |n: &str| blocks.iter().find(|b| b.1 == n).map(|b| b.2.lines().count()).unwrap();
    assert!(lines("tests/plugins/guide-backend/src/lib.rs") <= 70);
    assert!(lines("tests/plugins/guide-filter/src/lib.rs") <= 70);
}

const GUIDE_SCRIPT: &str = r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
assert h.get_size() == 64 << 20
h.pwrite(b"hello, plugin authors" * 100, 12345, nbd.CMD_FLAG_FUA)
assert h.pread(2100, 12345) == b"hello, plugin authors" * 100
# A fresh block reads as the key (90 = 0x5a): the layer below holds zeros.
assert h.pread(4096, 32 << 20) == b"\x5a" * 4096
# Zeroing through the filter is emulated by writing: zeros read back.
h.zero(8192, 12288)
assert h.pread(8192, 12288) == bytes(8192)
assert h.can_zero()
# ...and a request to zero fast fails at once instead of writing.
try:
    h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)
    print("FAIL: fast zero succeeded")
    sys.exit(1)
except nbd.Error as e:
    assert e.errno in ("ENOTSUP", "EOPNOTSUPP"), e.errno
h.flush()
h.shutdown()
print("OK")
"#;

#[test]
fn the_guides_rust_backend_and_filter_are_built_out_of_tree_and_served() {
    let rust = build_test_plugin("guide-backend");
    assert_eq!(build_test_plugin("guide-filter"), rust, "both guide crates share the test target dir");
    let ex = Exports::new();
    for (kind, name, body) in guide_blocks() {
        if kind == "snippet" && name != "pattern.toml" {
            std::fs::write(ex.path(&name), body).unwrap();
        }
    }
    let srv = serve(&ex, &[&rust], &[]);
    if require_tool("nbdinfo") {
        let e = nbdinfo(&srv.uri("ram"));
        assert_eq!(e["export-size"], 64u64 << 20);
        assert_eq!(e["description"], "the guide's RAM disk");
        assert_eq!((e["can_multi_conn"].clone(), e["can_flush"].clone()), (true.into(), true.into()), "{e}");
        assert_eq!(e["is_read_only"], false);
    }
    if require_tool("qemu-img") {
        qemu_img_round_trip(&srv, "ram", &image(64 << 20, 7), ex.dir.path());
    }
    if require_python_nbd() {
        py_ok(GUIDE_SCRIPT, &srv.uri("scrambled"), &srv);
    }
    // The backend's host::info line, with the plugin's name, the peer and
    // the export it was opened for.
    assert!(srv.wait_for_log("[ramdisk] 127.0.0.1:"), "{}", srv.log());
    assert!(srv.log().contains("opened export `ram`"), "{}", srv.log());
}

#[test]
fn the_guides_nbdhost_plugins_transcripts_are_what_the_command_prints() {
    let rust = build_test_plugin("guide-backend");
    build_test_plugin("guide-filter");
    // The guide's `plugins` directory, holding both guide plugins.
    let dir = tempfile::tempdir().unwrap();
    for f in ["libnbdhost_plugin_ramdisk.so", "libnbdhost_plugin_xor.so"] {
        std::fs::copy(rust.join(f), dir.path().join(f)).unwrap();
    }
    let outputs: Vec<String> = guide_blocks().into_iter().filter(|b| b.0 == "output").map(|b| b.2).collect();
    assert_eq!(outputs.len(), 2, "the guide shows a listing and one plugin in full");
    for block in outputs {
        let (command, want) = block.split_once('\n').unwrap();
        let args: Vec<String> =
            command.strip_prefix("$ nbdhost ").unwrap().split_whitespace().map(String::from).collect();
        // `--plugin-dir plugins` means the directory made above.
        let mut real: Vec<String> = Vec::new();
        let mut it = args.iter().peekable();
        while let Some(a) = it.next() {
            real.push(a.clone());
            if a == "--plugin-dir" {
                assert_eq!(it.next().map(String::as_str), Some("plugins"), "{command}");
                real.push(s(dir.path()).to_string());
            }
        }
        let real: Vec<&str> = real.iter().map(String::as_str).collect();
        let got = assert_ok(command, &run(s(&nbdhost_bin()), &real)).replace(s(dir.path()), "plugins");
        assert_eq!(got, want, "docs/writing-plugins.md shows different output for `{command}`");
    }
}

#[test]
fn the_guides_c_backend_is_compiled_with_gcc_and_served() {
    let Some(c) = c_plugins() else { return };
    let ex = Exports::new();
    let (_, _, snippet) = guide_blocks().into_iter().find(|b| b.1 == "pattern.toml").expect("pattern snippet");
    std::fs::write(ex.path("pattern.toml"), snippet).unwrap();
    let srv = serve(&ex, &[&c.good], &[]);
    let want: Vec<u8> = (0..4u64 << 20).map(|i| (i % 251) as u8).collect();
    if require_tool("nbdinfo") {
        let e = nbdinfo(&srv.uri("pattern"));
        assert_eq!(e["export-size"], 4u64 << 20);
        assert_eq!(e["is_read_only"], true, "no pwrite: the export is read-only");
    }
    if require_tool("qemu-img") {
        let out = ex.path("pattern.img");
        run_ok("qemu-img", &["convert", "-f", "raw", "-O", "raw", &srv.uri("pattern"), s(&out)]);
        assert!(std::fs::read(&out).unwrap() == want, "pattern read through qemu-img is wrong");
    }
}

#[test]
fn a_c_filter_over_a_rust_filter_over_the_guides_rust_backend() {
    let Some(c) = c_plugins() else { return };
    if !require_python_nbd() {
        return;
    }
    let rust = build_test_plugin("guide-backend");
    build_test_plugin("guide-filter");
    let ex = Exports::new();
    ex.snippet(
        "mixed",
        "[[layer]]\nfilter = \"cxor\"\nkey = 3\n\n[[layer]]\nfilter = \"xor\"\nkey = 5\n\n\
         [[layer]]\nplugin = \"ramdisk\"\nsize = \"1M\"\n",
    );
    let srv = serve(&ex, &[&c.good, &rust], &[]);
    py_ok(
        r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
assert h.pread(16, 0) == b"\x06" * 16      # zeros below, XOR 5, then XOR 3
h.pwrite(b"round trip", 100)
assert h.pread(10, 100) == b"round trip"
print("OK")
"#,
        &srv.uri("mixed"),
        &srv,
    );
}

// ------------------------------------------------------------ C examples

#[test]
fn c_backend_is_served_to_nbdinfo_and_qemu_img() {
    let Some(c) = c_plugins() else { return };
    let ex = Exports::new();
    ex.snippet("cd", "description = \"C disk\"\n[[layer]]\nplugin = \"cdisk\"\nsize = \"8M\"\n");
    let srv = serve(&ex, &[&c.good], &[]);
    if require_tool("nbdinfo") {
        let e = nbdinfo(&srv.uri("cd"));
        assert_eq!(e["export-size"], 8u64 << 20, "{e}");
        for cap in ["can_multi_conn", "can_fua", "can_flush", "can_trim", "can_zero", "can_fast_zero"] {
            assert_eq!(e[cap], true, "{cap}: {e}");
        }
        assert_eq!(e["is_read_only"], false);
    }
    if require_tool("qemu-img") {
        qemu_img_round_trip(&srv, "cd", &image(8 << 20, 3), ex.dir.path());
        let info = run_ok("qemu-img", &["info", "--output=json", &srv.uri("cd")]);
        assert!(info.contains("\"virtual-size\": 8388608"), "{info}");
    }
}

const CDISK_SCRIPT: &str = r#"
import nbd, sys
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(sys.argv[1])
assert h.get_size() == 1 << 20
assert h.can_fua() and h.can_flush() and h.can_trim() and h.can_zero() and h.can_fast_zero()
assert h.can_multi_conn() and h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.pwrite(b"\x11" * 8192, 0, nbd.CMD_FLAG_FUA)
h.pwrite(b"\x22" * 4096, 65536)
h.flush()
assert h.pread(8192, 0) == b"\x11" * 8192
h.zero(4096, 4096, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(8192, 0) == b"\x11" * 4096 + bytes(4096)
assert h.pread(4096, 65536) == b"\x22" * 4096
h.trim(4096, 65536)
assert h.pread(4096, 65536) == bytes(4096)
ext = []
def cb(meta, offset, entries, err):
    if meta == nbd.CONTEXT_BASE_ALLOCATION:
        ext.extend(entries)
    return 0
h.block_status(1 << 20, 0, cb)
# page 0 written; page 1 zeroed (freed); page 16 trimmed (freed); the rest never written
assert ext == [4096, 0, (1 << 20) - 4096, 3], ext
h.shutdown()
print("OK")
"#;

#[test]
fn c_backend_handles_every_operation_from_python_libnbd() {
    let Some(c) = c_plugins() else { return };
    if !require_python_nbd() {
        return;
    }
    let ex = Exports::new();
    ex.snippet("cd", "[[layer]]\nplugin = \"cdisk\"\n");
    let srv = serve(&ex, &[&c.good], &[]);
    py_ok(CDISK_SCRIPT, &srv.uri("cd"), &srv);
}

const CXOR_SCRIPT: &str = r#"
import nbd, sys
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(sys.argv[1])
size = h.get_size()
# Nothing written yet: zeros below, read through XOR 90.
assert h.pread(512, 2 << 20) == b"\x5a" * 512
h.pwrite(b"abc" * 1000, 777)
assert h.pread(3000, 777) == b"abc" * 1000
# Zeroing is emulated through the filter's pwrite, so zeros read back,
# and a request to zero fast fails at once.
assert h.can_zero()
h.zero(65536, 65536)
assert h.pread(65536, 65536) == bytes(65536)
try:
    h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)
    print("FAIL: fast zero succeeded")
    sys.exit(1)
except nbd.Error as e:
    assert e.errno in ("ENOTSUP", "EOPNOTSUPP"), e.errno
# No extents through the filter: everything is data.
ext = []
def cb(meta, offset, entries, err):
    if meta == nbd.CONTEXT_BASE_ALLOCATION:
        ext.extend(entries)
    return 0
h.block_status(size, 0, cb)
assert ext == [size, 0], ext
h.shutdown()
print("OK")
"#;

#[test]
fn c_filter_scrambles_what_the_c_backend_stores_and_round_trips_through_qemu_img() {
    let Some(c) = c_plugins() else { return };
    let ex = Exports::new();
    ex.snippet("x", "[[layer]]\nfilter = \"cxor\"\nkey = 90\n\n[[layer]]\nplugin = \"cdisk\"\nsize = \"4M\"\n");
    let srv = serve(&ex, &[&c.good], &[]);
    if require_python_nbd() {
        py_ok(CXOR_SCRIPT, &srv.uri("x"), &srv);
    }
    if require_tool("qemu-img") {
        qemu_img_round_trip(&srv, "x", &image(4 << 20, 11), ex.dir.path());
    }
    if require_tool("nbdinfo") {
        let e = nbdinfo(&srv.uri("x"));
        assert_eq!(e["export-size"], 4u64 << 20);
        assert_eq!(e["can_fua"], true, "FUA passes through the filter to cdisk: {e}");
    }
}

// ------------------------------------------------------------ evolution

const OLDMINOR_SCRIPT: &str = r#"
import nbd, sys
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(sys.argv[1])
assert h.get_size() == 1 << 20
# FUA is offered (emulated with flush), zero too (emulated with writes),
# cache is not, and zeroing fast fails at once: the callbacks lie past the
# table's end.
assert h.can_fua() and h.can_flush() and h.can_zero()
assert not h.can_cache() and not h.can_trim()
try:
    h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)
    print("FAIL: fast zero succeeded")
    sys.exit(1)
except nbd.Error as e:
    assert e.errno in ("ENOTSUP", "EOPNOTSUPP"), e.errno
h.pwrite(b"\x33" * 4096, 0, nbd.CMD_FLAG_FUA)
h.pwrite(b"\x44" * 8192, 65536)
h.zero(8192, 65536)
assert h.pread(8192, 65536) == bytes(8192)
assert h.pread(4096, 0) == b"\x33" * 4096
ext = []
def cb(meta, offset, entries, err):
    if meta == nbd.CONTEXT_BASE_ALLOCATION:
        ext.extend(entries)
    return 0
h.block_status(1 << 20, 0, cb)
assert ext == [1 << 20, 0], ext   # all data: no extents callback
h.shutdown()
print("OK")
"#;

#[test]
fn an_older_shorter_table_loads_and_the_host_falls_back_for_what_it_lacks() {
    let Some(c) = c_plugins() else { return };
    if !require_python_nbd() {
        return;
    }
    let ex = Exports::new();
    ex.snippet("old", "[[layer]]\nplugin = \"oldminor\"\n");
    let srv = serve(&ex, &[&c.good], &[]);
    // The plugin read only the prefix of the host table it knows.
    assert!(
        srv.log().contains("[oldminor] oldminor: host ABI 1.5, table of 56 bytes, of which this plugin knows 24"),
        "{}",
        srv.log()
    );
    py_ok(OLDMINOR_SCRIPT, &srv.uri("old"), &srv);
    assert!(srv.wait_for_log("pwrite 8192 bytes at 65536 (all zeros)"), "zero not emulated by writing:\n{}", srv.log());
    let log = srv.log();
    // FUA emulated: the write, then a flush the client did not ask for.
    let w = log.find("[oldminor] oldminor: pwrite 4096 bytes at 0\n").expect("the FUA write");
    assert!(log[w..].contains("[oldminor] oldminor: flush"), "FUA not emulated with flush:\n{log}");
    assert!(!log.contains("TRAP"), "the host used fields past the table's struct_size:\n{log}");
}

#[test]
fn a_newer_longer_table_loads_and_its_extra_fields_are_ignored() {
    let Some(c) = c_plugins() else { return };
    let ex = Exports::new();
    ex.snippet("new", "[[layer]]\nplugin = \"newminor\"\n");
    let srv = serve(&ex, &[&c.good], &[]);
    assert!(srv.log().contains("[newminor] newminor: host ABI 1.5 has no future_service"), "{}", srv.log());
    assert!(srv.log().contains("falling back"), "{}", srv.log());
    if require_tool("qemu-img") {
        qemu_img_round_trip(&srv, "new", &image(2 << 20, 5), ex.dir.path());
    }
    if require_tool("nbdinfo") {
        assert_eq!(nbdinfo(&srv.uri("new"))["export-size"], 2u64 << 20);
    }
    let detail = plugins_cmd(&["--plugin-dir", s(&c.good), "newminor"]);
    let text = assert_ok("nbdhost plugins newminor", &detail);
    assert!(norm(&text).contains("abi: 1.7 (this host: 1.5)"), "{text}");
    assert!(!srv.log().contains("TRAP"), "{}", srv.log());
}

#[test]
fn libraries_the_host_cannot_use_are_refused_naming_the_file_and_the_reason() {
    let Some(c) = c_plugins() else { return };
    for (name, reason) in BROKEN {
        let ex = Exports::new();
        ex.snippet("x", &format!("[[layer]]\nplugin = \"{name}\"\n"));
        let o = run(s(&nbdhost_bin()), &["--check", "--exports-dir", &ex.dir_str(), "--plugin-dir", s(&c.broken)]);
        let text = String::from_utf8_lossy(&o.stderr).into_owned() + &String::from_utf8_lossy(&o.stdout);
        assert!(!o.status.success(), "{name} was accepted:\n{text}");
        let want = format!("plugin {}: {reason}", c.broken.join(format!("{name}.so")).display());
        assert!(text.contains(&want), "{name}: expected `{want}` in:\n{text}");
        assert!(text.contains("x.toml"), "{name}: the snippet is not named:\n{text}");
    }
}

// ------------------------------------------------------------ nbdhost plugins

#[test]
fn plugins_lists_every_plugin_once_and_broken_files_with_their_error() {
    let Some(c) = c_plugins() else { return };
    let art = artifacts();
    let o = plugins_cmd(&["--plugin-dir", s(&c.good), "--plugin-dir", s(&c.broken), "--plugin-dir", s(&art)]);
    let out = assert_ok("nbdhost plugins", &o);
    let rows = listing_rows(&out);
    let row = |n: &str| rows.iter().find(|r| r[0] == n).unwrap_or_else(|| panic!("{n} is not listed:\n{out}")).clone();
    assert_eq!(row("cdisk"), ["cdisk", "backend", "1.2.3", "1.5", "in-memory disk written in C"].map(String::from));
    assert_eq!(row("cxor"), ["cxor", "filter", "0.9", "1.5", "XOR every byte with a key (C filter)"].map(String::from));
    assert_eq!(row("newminor")[1..4], ["backend", "1.7.0", "1.7"].map(String::from));
    assert_eq!(row("oldminor")[1..4], ["backend", "0.1-old", "1.0"].map(String::from));
    assert_eq!(row("memory")[1], "backend");
    assert_eq!(row("offset")[1], "filter");
    for (name, reason) in BROKEN {
        let r = row(name);
        assert_eq!(r[1], "broken", "{out}");
        assert!(r[4].contains(reason) && r[4].contains(&format!("{name}.so")), "{name}: {}", r[4]);
    }
    // One line per name.
    let mut names: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    let n = names.len();
    names.dedup();
    assert_eq!(names.len(), n, "a name listed twice:\n{out}");

    // Without --plugin-dir: the directory next to the executable.
    let out = assert_ok("nbdhost plugins", &plugins_cmd(&[]));
    let rows = listing_rows(&out);
    for bundled in ["memory", "file", "cow", "offset"] {
        assert!(rows.iter().any(|r| r[0] == bundled), "{bundled} missing from the default listing:\n{out}");
    }

    // The first directory wins, as in the server: a `memory.so` earlier in
    // the search order shadows the bundled one.
    let shadow = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(c.good.join("cdisk.so"), shadow.path().join("memory.so")).unwrap();
    let out = assert_ok("plugins", &plugins_cmd(&["--plugin-dir", s(shadow.path()), "--plugin-dir", s(&art)]));
    let memory = listing_rows(&out).into_iter().find(|r| r[0] == "memory").expect("memory listed");
    assert_eq!(memory[4], "in-memory disk written in C (declares name `cdisk`)", "{out}");
    let o = plugins_cmd(&["--plugin-dir", s(shadow.path()), "--plugin-dir", s(&art), "memory"]);
    let text = assert_ok("plugins memory", &o);
    assert!(text.contains(&format!("{}", shadow.path().join("memory.so").display())), "{text}");
}

#[test]
fn plugins_name_shows_parameters_thread_model_shape_and_capabilities() {
    let Some(c) = c_plugins() else { return };
    let show = |dir: &Path, name: &str| norm(&assert_ok(name, &plugins_cmd(&["--plugin-dir", s(dir), name])));

    let t = show(&c.good, "cdisk");
    for want in [
        "name: cdisk",
        &format!("file: {}", c.good.join("cdisk.so").display()),
        "kind: backend",
        "version: 1.2.3",
        "abi: 1.5 (this host: 1.5)",
        "description: in-memory disk written in C",
        "thread model: parallel",
        "size size default 1M disk size (at most 1G)",
        "fail_at size optional reads of the 512 bytes at this offset fail with EIO",
        "callbacks: get_size can_fua can_multi_conn pread pwrite flush trim zero extents",
        "write yes",
        "fua decided per connection (can_fua)",
        "zero native",
        "fast zero yes",
        "extents yes",
        "cache no (no cache)",
        "multi-conn decided per connection (can_multi_conn)",
    ] {
        assert!(t.contains(want), "`{want}` missing from:\n{t}");
    }
    assert!(!t.contains("children"), "{t}");

    let t = show(&c.good, "oldminor");
    for want in [
        "thread model: serialize_all_requests",
        "parameters: none",
        "callbacks: get_size pread pwrite flush",
        "fua emulated with flush",
        "zero emulated with pwrite",
        "fast zero no (fast-zero requests fail at once)",
        "trim no (no trim)",
        "extents no (every block reads as allocated data)",
    ] {
        assert!(t.contains(want), "`{want}` missing from:\n{t}");
    }

    let t = show(&c.good, "cxor");
    for want in [
        "kind: filter",
        "children: min 1 max 1",
        "child readonly: no",
        "key int default 255 byte to XOR the data with (0-255)",
        "zero decided per connection (can_zero)",
        "flush as the layer below",
    ] {
        assert!(t.contains(want), "`{want}` missing from:\n{t}");
    }

    let t = show(&artifacts(), "memory");
    assert!(t.contains("size size required"), "{t}");
    let t = show(&artifacts(), "cow");
    assert!(t.contains("child readonly: yes"), "{t}");

    // A name that is not there, and one that cannot be loaded.
    let o = plugins_cmd(&["--plugin-dir", s(&c.good), "nosuch"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("plugin `nosuch` not found"), "{err}");
    let o = plugins_cmd(&["--plugin-dir", s(&c.broken), "bad_major"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("built for ABI 2.0"), "{err}");
}

// ------------------------------------------------------------ host services

#[test]
fn plugin_log_lines_carry_its_name_and_open_sees_export_name_peer_and_readonly() {
    let Some(c) = c_plugins() else { return };
    if !require_tool("nbdinfo") {
        return;
    }
    let ex = Exports::new();
    ex.snippet("rw-disk", "[[layer]]\nplugin = \"cdisk\"\n");
    ex.snippet("ro-disk", "readonly = true\n[[layer]]\nplugin = \"cdisk\"\n");
    let srv = serve(&ex, &[&c.good], &[]);
    run_ok("nbdinfo", &["--size", &srv.uri("rw-disk")]);
    run_ok("nbdinfo", &["--size", &srv.uri("ro-disk")]);
    for (export, mode) in [("rw-disk", "read-write"), ("ro-disk", "read-only")] {
        let prefix = format!("[cdisk] open export `{export}` for 127.0.0.1:");
        assert!(srv.wait_for_log(&prefix), "{}", srv.log());
        let log = srv.log();
        let rest = &log[log.find(&prefix).unwrap() + prefix.len()..];
        let (port, tail) = rest.split_once(' ').unwrap();
        assert!(port.parse::<u16>().is_ok(), "peer port `{port}` in {log}");
        assert!(tail.starts_with(&format!("({mode})")), "{log}");
    }
}

const ERROR_SCRIPT: &str = r#"
import nbd, sys
h = nbd.NBD()
h.set_debug(True)  # libnbd logs the server's structured error messages
h.connect_uri(sys.argv[1])
assert h.pread(512, 0) == bytes(512)
try:
    h.pread(4096, 65536)
    print("FAIL: read of the failing block succeeded")
    sys.exit(1)
except nbd.Error as e:
    assert e.errno == "EIO", e.errno
h.shutdown()
print("OK")
"#;

#[test]
fn set_error_reaches_the_client_and_last_error_lets_a_filter_pass_it_on() {
    let Some(c) = c_plugins() else { return };
    if !require_python_nbd() {
        return;
    }
    let ex = Exports::new();
    ex.snippet("failing", "[[layer]]\nplugin = \"cdisk\"\nfail_at = \"64K\"\n");
    ex.snippet(
        "filtered",
        "[[layer]]\nfilter = \"cxor\"\nkey = 0\n\n[[layer]]\nplugin = \"cdisk\"\nfail_at = \"64K\"\n",
    );
    let srv = serve(&ex, &[&c.good], &[]);
    let debug = py_ok(ERROR_SCRIPT, &srv.uri("failing"), &srv);
    assert!(debug.contains("structured error server message: cdisk: injected read error at offset 65536"), "{debug}");
    let debug = py_ok(ERROR_SCRIPT, &srv.uri("filtered"), &srv);
    assert!(
        debug.contains(
            "structured error server message: cxor: read below failed: cdisk: injected read error at offset 65536"
        ),
        "{debug}"
    );
}

#[test]
fn debug_messages_appear_only_for_plugins_named_with_plugin_debug() {
    let Some(c) = c_plugins() else { return };
    if !require_python_nbd() {
        return;
    }
    let script = "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\nh.flush()\nh.shutdown()\nprint('OK')\n";
    let ex = Exports::new();
    ex.snippet("d", "[[layer]]\nplugin = \"cdisk\"\n");

    let srv = serve(&ex, &[&c.good], &[]);
    py_ok(script, &srv.uri("d"), &srv);
    assert!(srv.wait_for_log("[cdisk] open export `d`"), "{}", srv.log());
    assert!(!srv.log().contains("[cdisk] debug:"), "debug output without --plugin-debug:\n{}", srv.log());
    drop(srv);

    // Another plugin's debug flag does not turn on cdisk's.
    let srv = serve(&ex, &[&c.good], &["--plugin-debug", "cxor"]);
    py_ok(script, &srv.uri("d"), &srv);
    assert!(srv.wait_for_log("[cdisk] open export `d`"), "{}", srv.log());
    assert!(!srv.log().contains("[cdisk] debug:"), "{}", srv.log());
    drop(srv);

    let srv = serve(&ex, &[&c.good], &["--plugin-debug", "cdisk"]);
    py_ok(script, &srv.uri("d"), &srv);
    assert!(srv.wait_for_log("[cdisk] debug: flush #1"), "{}", srv.log());
    assert!(srv.log().contains("[cdisk] debug: handle 0x"), "{}", srv.log());
}
