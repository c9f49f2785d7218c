//! The C header `include/nbdhost-plugin.h` describes the same ABI as
//! `nbdhost_plugin_api::abi`: compile a C program with gcc that prints the
//! size, alignment and every field's offset and size of each struct, and
//! every constant, and compare with what Rust says. Also: the header
//! compiles warning-free as C99, C11 and C++.

use nbdhost_plugin_api::abi::*;
use std::mem::{align_of, offset_of, size_of};
use std::path::{Path, PathBuf};
use std::process::Command;

fn size_of_field<T, F>(_: fn(&T) -> &F) -> usize {
    size_of::<F>()
}

/// One struct: C name, Rust size, Rust alignment, fields (name, offset, size).
struct Layout {
    c_name: &'static str,
    size: usize,
    align: usize,
    fields: Vec<(&'static str, usize, usize)>,
}

macro_rules! layouts {
    ($($rs:ident => $c:literal { $($f:ident),* $(,)? })*) => {
        vec![$(Layout {
            c_name: $c,
            size: size_of::<$rs>(),
            align: align_of::<$rs>(),
            fields: vec![$((stringify!($f), offset_of!($rs, $f), size_of_field(|s: &$rs| &s.$f))),*],
        }),*]
    };
}

fn rust_layouts() -> Vec<Layout> {
    layouts! {
        HostApi => "nbdhost_host_api" {
            abi_major, abi_minor, struct_size, ctx, log, set_error, debug_enabled, last_error, checking_only,
        }
        ParamSpec => "nbdhost_param_spec" { name, kind, required, default_value, help }
        Param => "nbdhost_param" { key, value }
        OpenInfo => "nbdhost_open_info" { struct_size, readonly, export_name, export_name_len, peer, peer_len }
        BlockSize => "nbdhost_block_size" { minimum, preferred, maximum }
        ExtentSink => "nbdhost_extent_sink" { ctx, add }
        PluginTable => "nbdhost_plugin_table" {
            abi_major, abi_minor, struct_size, kind, thread_model, name, version, description, params, n_params,
            create, destroy, open, close, get_size, block_size, can_write, can_flush, is_rotational, can_trim,
            can_zero, can_fast_zero, can_fua, can_multi_conn, can_extents, can_cache, pread, pwrite, flush, trim,
            zero, extents, cache, pread_lend, pwrite_lend,
        }
        LendPiece => "nbdhost_lend_piece" { data, len }
        LendPieceMut => "nbdhost_lend_piece_mut" { data, len }
        NextOps => "nbdhost_next_ops" {
            struct_size, ctx, get_size, block_size, can, pread, pwrite, flush, trim, zero, extents, cache,
            pread_lend,
        }
        FilterTable => "nbdhost_filter_table" {
            abi_major, abi_minor, struct_size, kind, thread_model, name, version, description, params, n_params,
            min_children, max_children, child_readonly, create, destroy, open, close, get_size, block_size,
            can_write, can_flush, is_rotational, can_trim, can_zero, can_fast_zero, can_fua, can_multi_conn,
            can_extents, can_cache, pread, pwrite, flush, trim, zero, extents, cache, pread_lend, pwrite_lend,
        }
    }
}

/// Every constant of the ABI module: (C macro name, Rust value).
fn rust_constants() -> Vec<(&'static str, u64)> {
    macro_rules! consts {
        ($($name:ident),* $(,)?) => { vec![$((concat!("NBDHOST_", stringify!($name)), $name as u64)),*] };
    }
    consts![
        ABI_MAJOR,
        ABI_MINOR,
        PLUGIN_KIND_BACKEND,
        PLUGIN_KIND_FILTER,
        THREAD_MODEL_SERIALIZE_CONNECTIONS,
        THREAD_MODEL_SERIALIZE_ALL_REQUESTS,
        THREAD_MODEL_SERIALIZE_REQUESTS,
        THREAD_MODEL_PARALLEL,
        LOG_ERROR,
        LOG_WARN,
        LOG_INFO,
        LOG_DEBUG,
        FLAG_FUA,
        FLAG_MAY_TRIM,
        FLAG_FAST_ZERO,
        FLAG_REQ_ONE,
        FLAG_KERNEL_FILL,
        EXTENT_HOLE,
        EXTENT_ZERO,
        SUPPORT_NONE,
        SUPPORT_EMULATE,
        SUPPORT_NATIVE,
        PARAM_STRING,
        PARAM_INT,
        PARAM_SIZE,
        PARAM_BOOL,
        PARAM_PATH,
        PARAM_PATH_LIST,
        CAN_WRITE,
        CAN_FLUSH,
        CAN_ROTATIONAL,
        CAN_TRIM,
        CAN_ZERO,
        CAN_FAST_ZERO,
        CAN_FUA,
        CAN_MULTI_CONN,
        CAN_EXTENTS,
        CAN_CACHE,
    ]
}

fn header_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("include")
}

/// gcc, or a loud skip (a failure under CI=true).
fn have(tool: &str) -> bool {
    let ok = Command::new(tool).arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    if !ok {
        if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
            panic!("`{tool}` is required to check the C header (CI=true: failing instead of skipping)");
        }
        eprintln!("\n######## SKIPPED: `{tool}` is not installed; the C header was not checked ########\n");
    }
    ok
}

fn compile_and_run(compiler: &str, std: &str, source: &str) -> String {
    let dir = std::env::temp_dir().join(format!("nbdhost-c-header-{}-{compiler}-{std}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ext = if compiler == "g++" { "cc" } else { "c" };
    let src = dir.join(format!("layout.{ext}"));
    let exe = dir.join("layout");
    std::fs::write(&src, source).unwrap();
    let o = Command::new(compiler)
        .arg(format!("-std={std}"))
        .args(["-pedantic", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(header_dir())
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("run the compiler");
    assert!(
        o.status.success(),
        "{compiler} -std={std} failed on the header:\n{}\n--- source ---\n{source}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = Command::new(&exe).output().expect("run the layout program");
    assert!(o.status.success());
    let _ = std::fs::remove_dir_all(&dir);
    String::from_utf8(o.stdout).unwrap()
}

/// A C program printing one line per fact, and the lines Rust expects.
fn program_and_expected() -> (String, Vec<String>) {
    let mut c = String::from(
        "#include <stdio.h>\n#include <stddef.h>\n#include \"nbdhost-plugin.h\"\n\
         #define ALIGN(t) offsetof(struct { char c; t x; }, x)\nint main(void) {\n",
    );
    let mut want = Vec::new();
    for l in rust_layouts() {
        let t = format!("struct {}", l.c_name);
        c += &format!("  printf(\"{0} size %zu align %zu\\n\", sizeof({1}), (size_t)ALIGN({1}));\n", l.c_name, t);
        want.push(format!("{} size {} align {}", l.c_name, l.size, l.align));
        for (f, off, sz) in &l.fields {
            c += &format!(
                "  printf(\"{0}.{2} offset %zu size %zu\\n\", offsetof({1}, {2}), sizeof(((({1} *)0)->{2})));\n",
                l.c_name, t, f
            );
            want.push(format!("{}.{f} offset {off} size {sz}", l.c_name));
        }
    }
    for (name, v) in rust_constants() {
        c += &format!("  printf(\"{name} = %llu\\n\", (unsigned long long)({name}));\n");
        want.push(format!("{name} = {v}"));
    }
    c += "  printf(\"NBDHOST_ENTRY_POINT = %s\\n\", NBDHOST_ENTRY_POINT);\n";
    want.push(format!("NBDHOST_ENTRY_POINT = {ENTRY_POINT}"));
    c += "  return 0;\n}\n";
    (c, want)
}

#[test]
fn every_listed_field_accounts_for_the_whole_rust_struct() {
    // Guards the lists above: fields in declaration order, contiguous but
    // for alignment padding, and ending where the struct ends. A field
    // added to a Rust struct but not to the list (and so possibly not to
    // the header) fails here.
    for l in rust_layouts() {
        let mut end = 0;
        for (f, off, sz) in &l.fields {
            assert!(*off >= end && *off - end < 8, "{}.{f} at {off}: gap after byte {end} (field missing?)", l.c_name);
            end = off + sz;
        }
        assert_eq!(end.div_ceil(l.align) * l.align, l.size, "{}: fields missing at the end", l.c_name);
    }
}

#[test]
fn c_header_matches_the_rust_abi_field_for_field() {
    if !have("gcc") {
        return;
    }
    let (source, want) = program_and_expected();
    for std in ["c99", "c11"] {
        let got = compile_and_run("gcc", std, &source);
        let got: Vec<&str> = got.lines().collect();
        let mismatches: Vec<String> = want
            .iter()
            .zip(got.iter().chain(std::iter::repeat(&"<missing>")))
            .filter(|(w, g)| w.as_str() != **g)
            .map(|(w, g)| format!("rust: {w}\n   C: {g}"))
            .collect();
        assert!(mismatches.is_empty(), "the C header disagrees with abi.rs ({std}):\n{}", mismatches.join("\n"));
        assert_eq!(got.len(), want.len());
    }
}

#[test]
fn c_header_compiles_as_cplusplus() {
    if !have("g++") {
        return;
    }
    let (source, want) = program_and_expected();
    // The ALIGN trick (a struct defined inside offsetof) is not C++.
    let source = source.replace("#define ALIGN(t) offsetof(struct { char c; t x; }, x)", "#define ALIGN(t) alignof(t)");
    let got = compile_and_run("g++", "c++11", &source);
    assert_eq!(got.lines().collect::<Vec<_>>(), want);
}
