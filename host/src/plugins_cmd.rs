//! `nbdhost plugins [NAME]`: what is installed in the plugin directories.
//!
//! Without a name, every `*.so` in the plugin directories is loaded and
//! listed on one line (name, kind, version, ABI, description); a file that
//! cannot be loaded is listed with its load error instead of stopping the
//! listing. A name found in several directories is listed once, from the
//! first directory, like the server resolves it. With a name, that plugin
//! is shown in full: parameters, thread model, filter shape, and which
//! capabilities are fixed by its table and which it decides per
//! connection.

use crate::loader::{candidate_files, LoadedPlugin, PluginDirectory};
use nbdhost_plugin_api::abi;
use nbdhost_plugin_api::{ParamKind, ThreadModel};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

/// Subcommands of `nbdhost` (the server runs when none is given).
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// List the plugins and filters in the plugin directories, or show one
    /// in full (parameters, thread model, capabilities).
    Plugins {
        /// Show this plugin in full.
        name: Option<String>,
    },
}

/// One `.so` found in a plugin directory.
struct Found {
    /// The name a snippet uses to load it.
    name: String,
    path: PathBuf,
}

/// The plugin name a file answers to (`NAME.so` or
/// `libnbdhost_plugin_NAME.so`), if it is a candidate at all.
fn name_of(file: &str) -> Option<String> {
    let stem = file.strip_suffix(".so")?;
    let name = stem.strip_prefix("libnbdhost_plugin_").unwrap_or(stem);
    let valid = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    // Make sure the server would really find this file under that name.
    (valid && candidate_files(name).iter().any(|c| c == file)).then(|| name.to_string())
}

/// Every candidate file, the first directory winning for a name.
fn scan(dirs: &[PathBuf]) -> Vec<Found> {
    let mut found: Vec<Found> = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        let mut here: Vec<Found> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_file())
            .filter_map(|e| {
                let file = e.file_name().to_string_lossy().into_owned();
                name_of(&file).map(|name| Found { name, path: e.path() })
            })
            .collect();
        // Within one directory the server tries NAME.so first.
        here.sort_by(|a, b| a.name.cmp(&b.name).then(a.path.cmp(&b.path)));
        for f in here {
            if !found.iter().any(|g| g.name == f.name) {
                found.push(f);
            }
        }
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    found
}

fn kind_of(p: &LoadedPlugin) -> &'static str {
    if p.filter_shape().is_some() {
        "filter"
    } else {
        "backend"
    }
}

fn thread_model_name(m: ThreadModel) -> &'static str {
    match m {
        ThreadModel::SerializeConnections => "serialize_connections",
        ThreadModel::SerializeAllRequests => "serialize_all_requests",
        ThreadModel::SerializeRequests => "serialize_requests",
        ThreadModel::Parallel => "parallel",
    }
}

fn param_kind_name(k: ParamKind) -> &'static str {
    match k {
        ParamKind::String => "string",
        ParamKind::Int => "int",
        ParamKind::Size => "size",
        ParamKind::Bool => "bool",
        ParamKind::Path => "path",
        ParamKind::PathList => "path-list",
    }
}

/// One line per plugin: name, kind, version, ABI, description.
fn listing(dirs: &[PathBuf]) -> String {
    let rows: Vec<[String; 5]> = scan(dirs)
        .into_iter()
        .map(|f| match LoadedPlugin::load(&f.path, false) {
            Ok(p) => [
                f.name.clone(),
                kind_of(&p).into(),
                p.version.clone(),
                format!("{}.{}", p.abi.0, p.abi.1),
                if p.name.replace('-', "_") != f.name.replace('-', "_") {
                    format!("{} (declares name `{}`)", p.description, p.name)
                } else {
                    p.description.clone()
                },
            ],
            Err(e) => [f.name, "broken".into(), "-".into(), "-".into(), e.to_string()],
        })
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    let head = ["NAME", "KIND", "VERSION", "ABI", "DESCRIPTION"].map(String::from);
    let width = |i: usize| rows.iter().chain([&head]).map(|r| r[i].chars().count()).max().unwrap_or(0);
    let w: Vec<usize> = (0..4).map(width).collect();
    let mut out = String::new();
    for r in [&head].into_iter().chain(rows.iter()) {
        let cols: Vec<String> = (0..4).map(|i| format!("{:w$}", r[i], w = w[i])).collect();
        let _ = writeln!(out, "{}  {}", cols.join("  "), r[4]);
    }
    out
}

/// How a capability comes about, as far as the table alone says.
fn capabilities(p: &LoadedPlugin) -> Vec<(&'static str, String)> {
    let cb = p.callbacks();
    let has = |n: &str| cb.contains(&n);
    let asked = |q: &str| format!("decided per connection ({q})");
    let mut v = Vec::new();
    if p.filter_shape().is_some() {
        // A filter's absent callbacks pass through to the layer below.
        for (cap, q) in [
            ("write", "can_write"),
            ("flush", "can_flush"),
            ("rotational", "is_rotational"),
            ("trim", "can_trim"),
            ("zero", "can_zero"),
            ("fast zero", "can_fast_zero"),
            ("fua", "can_fua"),
            ("multi-conn", "can_multi_conn"),
            ("extents", "can_extents"),
            ("cache", "can_cache"),
        ] {
            v.push((cap, if has(q) { asked(q) } else { "as the layer below".to_string() }));
        }
        return v;
    }
    let no = |why: &str| format!("no ({why})");
    let pwrite = has("pwrite");
    let write = if !pwrite {
        no("no pwrite")
    } else if has("can_write") {
        asked("can_write")
    } else {
        "yes".into()
    };
    let flush = if !has("flush") {
        no("no flush")
    } else if has("can_flush") {
        asked("can_flush")
    } else {
        "yes".into()
    };
    let fua = if !pwrite {
        no("no pwrite")
    } else if has("can_fua") {
        asked("can_fua")
    } else if has("flush") {
        "emulated with flush".into()
    } else {
        no("no flush to emulate it with")
    };
    let trim = if !pwrite {
        no("no pwrite")
    } else if !has("trim") {
        no("no trim")
    } else if has("can_trim") {
        asked("can_trim")
    } else {
        "yes".into()
    };
    let zero = if !pwrite {
        no("no pwrite")
    } else if !has("zero") {
        "emulated with pwrite".into()
    } else if has("can_zero") {
        asked("can_zero")
    } else {
        "native".into()
    };
    let fast_zero = if !(pwrite && has("zero")) {
        no("fast-zero requests fail at once")
    } else if has("can_fast_zero") || has("can_zero") {
        asked("can_fast_zero")
    } else {
        "yes".into()
    };
    let extents = if !has("extents") {
        no("every block reads as allocated data")
    } else if has("can_extents") {
        asked("can_extents")
    } else {
        "yes".into()
    };
    let cache = match (has("can_cache"), has("cache")) {
        (true, true) => asked("can_cache"),
        (true, false) => "emulated with pread, or none (can_cache)".into(),
        (false, true) => "native".into(),
        (false, false) => no("no cache"),
    };
    let multi = if has("can_multi_conn") { asked("can_multi_conn") } else { "no".into() };
    let rot = if has("is_rotational") { asked("is_rotational") } else { "no".into() };
    v.extend([
        ("write", write),
        ("flush", flush),
        ("rotational", rot),
        ("trim", trim),
        ("zero", zero),
        ("fast zero", fast_zero),
        ("fua", fua),
        ("multi-conn", multi),
        ("extents", extents),
        ("cache", cache),
    ]);
    v
}

/// Everything about one plugin.
fn details(name: &str, p: &Arc<LoadedPlugin>) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "name:           {name}");
    if p.name != name {
        let _ = writeln!(o, "declared name:  {}", p.name);
    }
    let _ = writeln!(o, "file:           {}", p.path.display());
    let _ = writeln!(o, "kind:           {}", kind_of(p));
    let _ = writeln!(o, "version:        {}", p.version);
    let _ = writeln!(o, "abi:            {}.{} (this host: {}.{})", p.abi.0, p.abi.1, abi::ABI_MAJOR, abi::ABI_MINOR);
    let _ = writeln!(o, "description:    {}", p.description);
    let _ = writeln!(o, "thread model:   {}", thread_model_name(p.thread_model));
    if let Some(s) = p.filter_shape() {
        let max = if s.max_children == u32::MAX { "unlimited".to_string() } else { s.max_children.to_string() };
        let _ = writeln!(o, "children:       min {} max {max}", s.min_children);
        let _ = writeln!(o, "child readonly: {}", if s.child_readonly { "yes" } else { "no" });
    }
    if p.params.is_empty() {
        let _ = writeln!(o, "parameters:     none");
    } else {
        let _ = writeln!(o, "parameters:");
        let w = p.params.iter().map(|q| q.name.len()).max().unwrap_or(0);
        for q in &p.params {
            let req = match (&q.default, q.required) {
                (_, true) => "required".to_string(),
                (Some(d), false) => format!("default {d}"),
                (None, false) => "optional".to_string(),
            };
            let _ = writeln!(o, "  {:w$}  {:9}  {:18}  {}", q.name, param_kind_name(q.kind), req, q.help);
        }
    }
    let _ = writeln!(o, "callbacks:      {}", p.callbacks().join(" "));
    let _ = writeln!(o, "capabilities:");
    for (cap, how) in capabilities(p) {
        let _ = writeln!(o, "  {cap:10}  {how}");
    }
    o
}

/// Run `nbdhost plugins [NAME]` against the server's plugin directories.
pub fn run(name: Option<&str>, plugins: &PluginDirectory) -> Result<(), String> {
    let dirs = plugins.dirs();
    match name {
        None => {
            let text = listing(dirs);
            if text.is_empty() {
                let shown: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
                return Err(format!("no plugins found in {}", shown.join(", ")));
            }
            print!("{text}");
            Ok(())
        }
        Some(name) => {
            let p = plugins.get(name).map_err(|e| e.to_string())?;
            print!("{}", details(name, &p));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_map_to_the_names_the_server_resolves() {
        assert_eq!(name_of("memory.so").as_deref(), Some("memory"));
        assert_eq!(name_of("libnbdhost_plugin_memory.so").as_deref(), Some("memory"));
        assert_eq!(name_of("libnbdhost_plugin_my_filter.so").as_deref(), Some("my_filter"));
        assert_eq!(name_of("notes.txt"), None);
        assert_eq!(name_of("lib.so.6"), None);
        assert_eq!(name_of("we ird.so"), None);
    }
}
