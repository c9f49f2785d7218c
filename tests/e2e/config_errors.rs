//! Broken configuration is refused with messages that name the file, the
//! line and the key, and nothing is served from it.

use nbdhost_tests::*;

fn start_fails(ex: &Exports) -> String {
    let o = run(nbdhost_bin().to_str().unwrap(), &["--exports-dir", &ex.dir_str(), "--listen", "127.0.0.1:0"]);
    assert!(!o.status.success(), "server started on a broken config");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_typo_in_a_snippet_is_refused_naming_file_line_and_key() {
    let ex = Exports::new();
    ex.snippet("scratch", "# a RAM disk\ndescrption = \"oops\"\n[[layer]]\nplugin = \"memory\"\nsize = \"1M\"\n");
    let err = start_fails(&ex);
    let file = ex.path("scratch.toml");
    assert!(err.contains(&format!("{}:2:", file.display())), "{err}");
    assert!(err.contains("unknown field `descrption`"), "{err}");
    assert!(err.contains("description"), "the message lists the valid keys: {err}");
}

#[test]
fn every_broken_snippet_is_reported_at_once() {
    let ex = Exports::new();
    ex.snippet("a", "readonly = \"yes\"\n[[layer]]\nplugin = \"memory\"\nsize = \"1M\"\n");
    ex.snippet("b", "description = \"no layers\"\n");
    ex.snippet("c", "[[layer]]\nfilter = \"cow\"\n");
    ex.snippet("d", "[[layer]]\nplugin = \"memory\"\nsize = \"1M\"\n");
    ex.snippet("e", "name = \"d\"\n[[layer]]\nplugin = \"memory\"\nsize = \"1M\"\n");
    let err = start_fails(&ex);
    assert!(err.contains("a.toml:1:"), "{err}");
    assert!(err.contains("b.toml: export `b`: the stack is empty"), "{err}");
    assert!(err.contains("c.toml:2:") && err.contains("must end with a plugin"), "{err}");
    assert!(err.contains("e.toml: export `d` is already defined by") && err.contains("d.toml"), "{err}");
}

#[test]
fn a_toml_syntax_error_names_the_line() {
    let ex = Exports::new();
    ex.snippet("s", "description = \"ok\"\n[[layer]\nplugin = \"memory\"\n");
    let err = start_fails(&ex);
    assert!(err.contains("s.toml:2:"), "{err}");
}

#[test]
fn check_accepts_the_bundled_exports_d() {
    // The README's run command serves these; they must always be valid.
    let dir = workspace_root().join("exports.d");
    let o = run(nbdhost_bin().to_str().unwrap(), &["--check", "--exports-dir", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("configuration OK"));
}

/// `--check` validates what a snippet names but creates nothing: not the
/// files `file` would create with `size`, not `log`'s log file. A path it
/// could not create is still an error, and serving creates them as usual.
#[test]
fn check_creates_no_files_but_still_refuses_what_could_not_be_created() {
    let ex = Exports::new();
    ex.snippet(
        "f",
        "[[layer]]\nfilter = \"log\"\nlogfile = \"f.log\"\n[[layer]]\nplugin = \"file\"\npaths = [\"a.img\", \"b.img\"]\nsize = \"1M\"\n",
    );
    let check = |ex: &Exports| run(nbdhost_bin().to_str().unwrap(), &["--check", "--exports-dir", &ex.dir_str()]);
    let o = check(&ex);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("configuration OK"));
    assert!(String::from_utf8_lossy(&o.stderr).contains("would create"), "{}", String::from_utf8_lossy(&o.stderr));
    for f in ["a.img", "b.img", "f.log"] {
        assert!(!ex.path(f).exists(), "--check created {f}");
    }
    // Where they could not be created, --check says so.
    let bad = Exports::new();
    bad.snippet("g", "[[layer]]\nplugin = \"file\"\npath = \"no/such/dir/a.img\"\nsize = \"1M\"\n");
    bad.snippet(
        "h",
        "[[layer]]\nfilter = \"log\"\nlogfile = \"no/such/dir/h.log\"\n[[layer]]\nplugin = \"memory\"\nsize = \"1M\"\n",
    );
    let o = check(&bad);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("cannot create") && err.contains("a.img") && err.contains("is not a directory"), "{err}");
    assert!(err.contains("h.log"), "{err}");
    // Serving creates them.
    let mut srv = Server::start(&ex, &[]);
    assert!(srv.alive(), "{}", srv.log());
    assert_eq!(std::fs::metadata(ex.path("a.img")).unwrap().len(), 1 << 20);
    assert!(ex.path("b.img").exists() && ex.path("f.log").exists());
}

#[test]
fn an_empty_exports_dir_and_a_missing_one_are_errors() {
    let ex = Exports::new();
    let err = start_fails(&ex);
    assert!(err.contains("no exports defined"), "{err}");
    let o =
        run(nbdhost_bin().to_str().unwrap(), &["--exports-dir", "/nonexistent/exports.d", "--listen", "127.0.0.1:0"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/exports.d: cannot read exports directory"));
}

#[test]
fn a_bad_main_config_key_is_refused() {
    let ex = Exports::new();
    ex.snippet("m", "[[layer]]\nplugin = \"memory\"\nsize = \"1M\"\n");
    let cfg = ex.path("nbdhost.toml");
    std::fs::write(&cfg, "listen = [\"127.0.0.1:0\"]\nloglevel = \"debug\"\n").unwrap();
    let o = run(nbdhost_bin().to_str().unwrap(), &["--config", cfg.to_str().unwrap(), "--exports-dir", &ex.dir_str()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("nbdhost.toml:2:") && err.contains("unknown field `loglevel`"), "{err}");
}
