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
