//! Configuration: the server's own settings (flags and an optional main
//! config file) and one TOML snippet per export in `exports.d/`.
//!
//! A snippet looks like this (layers are listed from the client side down;
//! the last one is the backend):
//!
//! ```toml
//! description = "1 GiB scratch disk in RAM"
//! readonly = false
//!
//! [[layer]]
//! plugin = "memory"
//! size = "1G"
//! ```
//!
//! Every error names the file, the line where it can, and the key.

use crate::loader::{LoadedPlugin, ParamInfo};
use nbdhost_plugin_api::{params::parse_bool, params::parse_size, ParamKind};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// A configuration error, located as precisely as we can.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// File at fault.
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// What is wrong (names the key or layer).
    pub message: String,
}

impl ConfigError {
    fn new(file: &Path, line: Option<usize>, message: impl Into<String>) -> Self {
        ConfigError { file: file.to_path_buf(), line, message: message.into() }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{}: {}", self.file.display(), l, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}
impl std::error::Error for ConfigError {}

/// Several errors at once, so an operator fixes them in one pass.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}
impl std::error::Error for ConfigErrors {}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

fn toml_error(file: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let line = e.span().map(|s| line_of(text, s.start));
    ConfigError::new(file, line, e.message().trim().to_string())
}

// ------------------------------------------------------------ main config

/// The optional main config file (`--config`). Flags override it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MainConfig {
    /// TCP addresses to listen on (`host:port`).
    pub listen: Option<Vec<String>>,
    /// Unix socket path.
    pub unix: Option<PathBuf>,
    /// Plugin directories, searched in order.
    pub plugin_dir: Option<Vec<PathBuf>>,
    /// Directory of export snippets.
    pub exports_dir: Option<PathBuf>,
    /// error, warn, info, debug or trace.
    pub log_level: Option<String>,
    /// Export served to clients that ask for the empty name.
    pub default_export: Option<String>,
    /// Seconds a client may take to finish the handshake.
    pub handshake_timeout: Option<u64>,
    /// Most simultaneous client connections.
    pub max_connections: Option<usize>,
    /// Plugins whose debug messages are shown.
    pub plugin_debug: Option<Vec<String>>,
    /// TLS mode: off, on or require.
    pub tls: Option<String>,
    /// Directory with ca-cert.pem, server-cert.pem, server-key.pem, ca-crl.pem.
    pub tls_certificates: Option<PathBuf>,
    /// Server certificate chain (PEM).
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// CA certificates client certificates are checked against (PEM).
    pub tls_ca: Option<PathBuf>,
    /// Certificate revocation list(s) (PEM).
    pub tls_crl: Option<PathBuf>,
    /// Require and verify client certificates.
    pub tls_verify_peer: Option<bool>,
    /// TLS-PSK key file (refused: rustls has no external PSK support).
    pub tls_psk: Option<PathBuf>,
}

impl MainConfig {
    /// Read and parse `path`; relative paths inside are resolved against its
    /// directory.
    pub fn load(path: &Path) -> Result<MainConfig, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::new(path, None, format!("cannot read: {e}")))?;
        let mut c: MainConfig = toml::from_str(&text).map_err(|e| toml_error(path, &text, &e))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(d) = c.plugin_dir.as_mut() {
            d.iter_mut().for_each(fix);
        }
        if let Some(d) = c.exports_dir.as_mut() {
            fix(d);
        }
        if let Some(d) = c.unix.as_mut() {
            fix(d);
        }
        for d in
            [&mut c.tls_certificates, &mut c.tls_cert, &mut c.tls_key, &mut c.tls_ca, &mut c.tls_crl, &mut c.tls_psk]
        {
            if let Some(d) = d.as_mut() {
                fix(d);
            }
        }
        Ok(c)
    }
}

// ---------------------------------------------------------------- snippets

/// Whether a layer names a backend plugin or a filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// A backend (`plugin = "..."`).
    Plugin,
    /// A filter (`filter = "..."`).
    Filter,
}

/// One parameter as written in a snippet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawParam {
    /// Key.
    pub key: String,
    /// Value as text (integers and booleans stringified; the elements of a
    /// list of strings joined by newlines).
    pub value: String,
    /// Written as a TOML array.
    pub list: bool,
    /// Line in the snippet.
    pub line: usize,
}

/// One layer of an export's stack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSpec {
    /// Plugin or filter.
    pub kind: LayerKind,
    /// Plugin/filter name.
    pub name: String,
    /// Parameters in file order.
    pub params: Vec<RawParam>,
    /// Line of the layer's `plugin`/`filter` key.
    pub line: usize,
    /// Where it is, for messages: `layer 2`, `layer 1, part 3, layer 1`.
    pub location: String,
    /// For a composite layer (e.g. `concat`): its parts, each a whole stack
    /// (client side first), in order.
    pub parts: Vec<Vec<LayerSpec>>,
}

/// An export as described by its snippet (not yet built).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    /// Export name clients ask for.
    pub name: String,
    /// Free text shown by `nbdinfo --list`.
    pub description: String,
    /// Refuse writes.
    pub readonly: bool,
    /// Most simultaneous connections to this export (None: no limit).
    pub max_connections: Option<usize>,
    /// `tls = "required"`: served only to clients that did STARTTLS.
    pub tls_required: bool,
    /// `tls-identities`: only TLS clients whose certificate names one of
    /// these (subject CN or a subject alternative name) may use the export.
    pub tls_identities: Vec<String>,
    /// The snippet file.
    pub source: PathBuf,
    /// Layers, client side first; the last is the backend.
    pub stack: Vec<LayerSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSnippet {
    name: Option<String>,
    description: Option<String>,
    #[serde(default)]
    readonly: bool,
    max_connections: Option<usize>,
    tls: Option<toml::Spanned<String>>,
    #[serde(rename = "tls-identities")]
    tls_identities: Option<toml::Spanned<Vec<String>>>,
    #[serde(default)]
    layer: Vec<BTreeMap<String, toml::Spanned<toml::Value>>>,
}

/// Keys of a layer table that are not plugin parameters.
const LAYER_KEYS: [&str; 3] = ["plugin", "filter", "part"];

/// A layer table's entries with the line each value is on.
type RawLayer = Vec<(String, toml::Value, usize)>;

/// Parses (possibly nested) stacks of layer tables.
struct StackParser<'a> {
    path: &'a Path,
    export: &'a str,
}

impl StackParser<'_> {
    fn err(&self, line: Option<usize>, msg: String) -> ConfigError {
        let sep = if msg.starts_with("layer ") { ", " } else { ": " };
        ConfigError::new(self.path, line, format!("export `{}`{sep}{msg}", self.export))
    }

    /// Parse one stack. `prefix` locates it (`""` for the export's own
    /// stack, `layer 1, part 2, ` for a part).
    fn stack(&self, prefix: &str, layers: Vec<RawLayer>, line: Option<usize>) -> Result<Vec<LayerSpec>, ConfigError> {
        if layers.is_empty() {
            let what =
                if prefix.is_empty() { "the stack".to_string() } else { prefix.trim_end_matches(", ").to_string() };
            return Err(self.err(line, format!("{what} is empty; add a [[layer]] table with `plugin = \"...\"`")));
        }
        let mut stack = Vec::with_capacity(layers.len());
        for (i, entries) in layers.into_iter().enumerate() {
            stack.push(self.layer(&format!("{prefix}layer {}", i + 1), entries)?);
        }
        let last = stack.last().expect("non-empty");
        if last.kind == LayerKind::Filter {
            return Err(self.err(
                Some(last.line),
                format!(
                    "{}: the bottom layer `{}` is a filter; a stack must end with a plugin",
                    last.location, last.name
                ),
            ));
        }
        if let Some(l) = stack[..stack.len() - 1].iter().find(|l| l.kind == LayerKind::Plugin) {
            return Err(
                self.err(Some(l.line), format!("{}: plugin `{}` can only be the bottom layer", l.location, l.name))
            );
        }
        Ok(stack)
    }

    fn layer(&self, location: &str, entries: RawLayer) -> Result<LayerSpec, ConfigError> {
        let first_line = entries.iter().map(|e| e.2).min();
        let get_name = |key: &str| -> Result<Option<(String, usize)>, ConfigError> {
            match entries.iter().find(|e| e.0 == key) {
                None => Ok(None),
                Some((_, toml::Value::String(s), l)) => Ok(Some((s.clone(), *l))),
                Some((_, _, l)) => Err(self.err(Some(*l), format!("{location}: key `{key}` must be a string"))),
            }
        };
        let (kind, name, line) = match (get_name("plugin")?, get_name("filter")?) {
            (Some((n, l)), None) => (LayerKind::Plugin, n, l),
            (None, Some((n, l))) => (LayerKind::Filter, n, l),
            (Some(_), Some((_, l))) => {
                return Err(self.err(Some(l), format!("{location}: set either `plugin` or `filter`, not both")))
            }
            (None, None) => return Err(self.err(first_line, format!("{location}: missing key `plugin` (or `filter`)"))),
        };
        let mut params = Vec::new();
        let mut parts = Vec::new();
        for (key, v, pline) in &entries {
            if key == "part" {
                parts = self.parts(location, &name, v, *pline)?;
                continue;
            }
            if LAYER_KEYS.contains(&key.as_str()) {
                continue;
            }
            let mut list = false;
            let value = match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(n) => n.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                // Plugins that take fractions declare a string parameter
                // and parse it; typed parameters reject it with a message.
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Array(items) if items.iter().all(|i| i.is_str()) => {
                    list = true;
                    items.iter().filter_map(|i| i.as_str()).collect::<Vec<_>>().join("\n")
                }
                other => {
                    return Err(self.err(
                        Some(*pline),
                        format!(
                            "{location} ({name}): key `{key}` must be a string, integer, boolean or list of strings, not {}",
                            other.type_str()
                        ),
                    ))
                }
            };
            params.push(RawParam { key: key.clone(), value, list, line: *pline });
        }
        params.sort_by_key(|p| p.line);
        if kind == LayerKind::Filter && !parts.is_empty() {
            return Err(self.err(
                Some(line),
                format!("{location}: filter `{name}` cannot have parts; a layer with parts is a plugin (`plugin = \"{name}\"`)"),
            ));
        }
        Ok(LayerSpec { kind, name, params, line, location: location.to_string(), parts })
    }

    /// `part = [ { layer = [...] }, ... ]` of a composite layer.
    fn parts(
        &self,
        location: &str,
        name: &str,
        v: &toml::Value,
        line: usize,
    ) -> Result<Vec<Vec<LayerSpec>>, ConfigError> {
        let bad = || {
            self.err(Some(line), format!("{location} ({name}): `part` must be a list of tables, each with a `layer` list ([[layer.part]] then [[layer.part.layer]])"))
        };
        let toml::Value::Array(items) = v else { return Err(bad()) };
        let mut parts = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let toml::Value::Table(t) = item else { return Err(bad()) };
            if let Some(k) = t.keys().find(|k| *k != "layer") {
                return Err(self.err(
                    Some(line),
                    format!("{location}, part {}: unknown key `{k}` (a part holds only `layer` tables)", i + 1),
                ));
            }
            let layers = match t.get("layer") {
                None => Vec::new(),
                Some(toml::Value::Array(ls)) => {
                    let mut out = Vec::with_capacity(ls.len());
                    for l in ls {
                        let toml::Value::Table(lt) = l else { return Err(bad()) };
                        // Nested values carry no positions of their own: they
                        // are reported at the `part` key's line.
                        out.push(lt.iter().map(|(k, v)| (k.clone(), v.clone(), line)).collect());
                    }
                    out
                }
                Some(_) => return Err(bad()),
            };
            parts.push(self.stack(&format!("{location}, part {}, ", i + 1), layers, Some(line))?);
        }
        Ok(parts)
    }
}

/// Check an export name against the protocol's string rules.
pub fn check_export_name(name: &str) -> Result<(), String> {
    if name.len() > 4096 {
        return Err(format!("export name is {} bytes, over the protocol's 4096-byte limit", name.len()));
    }
    if name.contains('\0') {
        return Err("export name contains a NUL byte".into());
    }
    Ok(())
}

impl ExportSpec {
    /// Parse the snippet at `path` (its text given as `text`).
    pub fn parse(path: &Path, text: &str) -> Result<ExportSpec, ConfigError> {
        let raw: RawSnippet = toml::from_str(text).map_err(|e| toml_error(path, text, &e))?;
        let name = match raw.name {
            Some(n) => n,
            None => path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .ok_or_else(|| ConfigError::new(path, None, "cannot derive an export name from the file name"))?,
        };
        check_export_name(&name).map_err(|m| ConfigError::new(path, None, format!("key `name`: {m}")))?;
        let layers: Vec<RawLayer> = raw
            .layer
            .into_iter()
            .map(|t| t.into_iter().map(|(k, v)| (k, v.get_ref().clone(), line_of(text, v.span().start))).collect())
            .collect();
        let stack = StackParser { path, export: &name }.stack("", layers, None)?;
        let tls_required = match &raw.tls {
            None => false,
            Some(t) => match t.get_ref().as_str() {
                "required" => true,
                "optional" => false,
                other => {
                    return Err(ConfigError::new(
                        path,
                        Some(line_of(text, t.span().start)),
                        format!("key `tls`: `{other}` is not \"required\" or \"optional\""),
                    ))
                }
            },
        };
        let tls_identities = match raw.tls_identities {
            None => Vec::new(),
            Some(ids) if ids.get_ref().is_empty() || ids.get_ref().iter().any(|i| i.is_empty()) => {
                return Err(ConfigError::new(
                    path,
                    Some(line_of(text, ids.span().start)),
                    "key `tls-identities`: list the client identities (certificate CN or SAN) allowed, none empty; \
                     remove the key to allow every client",
                ))
            }
            Some(ids) => ids.into_inner(),
        };
        Ok(ExportSpec {
            name,
            description: raw.description.unwrap_or_default(),
            readonly: raw.readonly,
            max_connections: raw.max_connections,
            tls_required,
            tls_identities,
            source: path.to_path_buf(),
            stack,
        })
    }
}

/// Read every `*.toml` snippet in `dir` (sorted by file name). Other files
/// and hidden files are skipped. All broken snippets are reported together,
/// as are duplicate export names.
pub fn load_snippets(dir: &Path) -> Result<Vec<ExportSpec>, ConfigErrors> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| ConfigErrors(vec![ConfigError::new(dir, None, format!("cannot read exports directory: {e}"))]))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "toml")
                && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'))
                && p.is_file()
        })
        .collect();
    files.sort();
    let mut errors = Vec::new();
    let mut specs: Vec<ExportSpec> = Vec::new();
    for f in files {
        let text = match std::fs::read_to_string(&f) {
            Ok(t) => t,
            Err(e) => {
                errors.push(ConfigError::new(&f, None, format!("cannot read: {e}")));
                continue;
            }
        };
        match ExportSpec::parse(&f, &text) {
            Ok(s) => {
                if let Some(prev) = specs.iter().find(|p| p.name == s.name) {
                    errors.push(ConfigError::new(
                        &f,
                        None,
                        format!("export `{}` is already defined by {}", s.name, prev.source.display()),
                    ));
                } else {
                    specs.push(s);
                }
            }
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(specs)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Check a layer's parameters against the plugin's declarations; returns
/// normalised `(key, value)` pairs with defaults filled in.
pub fn validate_params(
    spec: &ExportSpec,
    layer: &LayerSpec,
    plugin: &LoadedPlugin,
) -> Result<Vec<(String, String)>, ConfigError> {
    let at = |line: usize, msg: String| {
        ConfigError::new(
            &spec.source,
            Some(line),
            format!("export `{}`, {} ({}): {msg}", spec.name, layer.location, layer.name),
        )
    };
    let mut out = Vec::new();
    for p in &layer.params {
        let Some(decl) = plugin.params.iter().find(|d| d.name == p.key) else {
            let known: Vec<&str> = plugin.params.iter().map(|d| d.name.as_str()).collect();
            return Err(at(
                p.line,
                format!(
                    "unknown parameter `{}`; {} takes: {}",
                    p.key,
                    layer.name,
                    if known.is_empty() { "no parameters".to_string() } else { known.join(", ") }
                ),
            ));
        };
        if p.list && decl.kind != ParamKind::PathList {
            return Err(at(p.line, format!("parameter `{}` takes a single value, not a list", p.key)));
        }
        let v = normalise_value(decl, &p.value, &spec.source)
            .map_err(|m| at(p.line, format!("parameter `{}`: {m}", p.key)))?;
        out.push((p.key.clone(), v));
    }
    for d in &plugin.params {
        if out.iter().any(|(k, _)| k == &d.name) {
            continue;
        }
        match (&d.default, d.required) {
            (_, true) => return Err(at(layer.line, format!("missing required parameter `{}` ({})", d.name, d.help))),
            (Some(def), false) => {
                let v = normalise_value(d, def, &spec.source)
                    .map_err(|m| at(layer.line, format!("plugin's default for `{}` is invalid: {m}", d.name)))?;
                out.push((d.name.clone(), v));
            }
            (None, false) => {}
        }
    }
    Ok(out)
}

fn normalise_value(decl: &ParamInfo, v: &str, snippet: &Path) -> Result<String, String> {
    match decl.kind {
        ParamKind::String => Ok(v.to_string()),
        ParamKind::Int => {
            v.trim().parse::<i64>().map(|n| n.to_string()).map_err(|_| format!("`{v}` is not an integer"))
        }
        ParamKind::Size => parse_size(v)
            .map(|n| n.to_string())
            .ok_or_else(|| format!("`{v}` is not a size (bytes, or a number with K, M, G, T, P suffix)")),
        ParamKind::Bool => parse_bool(v).map(|b| b.to_string()).ok_or_else(|| format!("`{v}` is not a boolean")),
        ParamKind::Path => resolve_path(v, snippet),
        ParamKind::PathList => {
            let items: Vec<&str> = if v.contains('\n') { v.split('\n').collect() } else { v.split(',').collect() };
            let resolved = items.iter().map(|i| resolve_path(i.trim(), snippet)).collect::<Result<Vec<_>, _>>()?;
            Ok(resolved.join("\n"))
        }
    }
}

fn resolve_path(v: &str, snippet: &Path) -> Result<String, String> {
    if v.is_empty() {
        return Err("empty path".into());
    }
    let p = Path::new(v);
    let abs = if p.is_relative() { snippet.parent().unwrap_or(Path::new(".")).join(p) } else { p.to_path_buf() };
    Ok(abs.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ExportSpec, ConfigError> {
        ExportSpec::parse(Path::new("/etc/nbdhost/exports.d/disk.toml"), text)
    }

    #[test]
    fn minimal_snippet() {
        let s = parse("description = \"d\"\n[[layer]]\nplugin = \"memory\"\nsize = \"1G\"\n").unwrap();
        assert_eq!(s.name, "disk");
        assert_eq!(s.description, "d");
        assert!(!s.readonly);
        assert_eq!(s.stack.len(), 1);
        assert_eq!(s.stack[0].name, "memory");
        assert_eq!(s.stack[0].params, vec![RawParam { key: "size".into(), value: "1G".into(), list: false, line: 4 }]);
    }

    #[test]
    fn typo_names_file_line_and_key() {
        let e = parse("descrption = \"d\"\n[[layer]]\nplugin = \"memory\"\n").unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("/etc/nbdhost/exports.d/disk.toml:1:"), "{msg}");
        assert!(msg.contains("descrption"), "{msg}");
    }

    #[test]
    fn structural_errors() {
        assert!(parse("description = \"x\"\n").unwrap_err().message.contains("stack is empty"));
        let e = parse("[[layer]]\nfilter = \"cow\"\n[[layer.part]]\n[[layer.part.layer]]\nplugin = \"file\"\n[[layer]]\nplugin = \"m\"\n").unwrap_err();
        assert!(e.message.contains("cannot have parts"), "{e}");
        let e = parse("[[layer]]\nsize = 3\n").unwrap_err();
        assert!(e.message.contains("missing key `plugin`"), "{e}");
        assert_eq!(e.line, Some(2));
        let e = parse("[[layer]]\nfilter = \"cow\"\n").unwrap_err();
        assert!(e.message.contains("must end with a plugin"), "{e}");
        let e = parse("[[layer]]\nplugin = \"file\"\n[[layer]]\nplugin = \"memory\"\n").unwrap_err();
        assert!(e.message.contains("only be the bottom layer"), "{e}");
        let e = parse("[[layer]]\nplugin = \"memory\"\nsize = { a = 1 }\n").unwrap_err();
        assert!(e.message.contains("key `size`") && e.message.contains("table"), "{e}");
        let s = parse("[[layer]]\nfilter = \"error\"\nrate = 0.5\n[[layer]]\nplugin = \"memory\"\n").unwrap();
        assert_eq!(s.stack[0].params[0].value, "0.5");
        let e = parse("readonly = \"yes\"\n[[layer]]\nplugin = \"memory\"\n").unwrap_err();
        assert_eq!(e.line, Some(1), "{e}");
    }

    #[test]
    fn trees_of_stacks() {
        let text = r#"
[[layer]]
filter = "log"
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
"#;
        let s = parse(text).unwrap();
        assert_eq!(s.stack.len(), 2);
        let concat = &s.stack[1];
        assert_eq!(concat.name, "concat");
        assert_eq!(concat.parts.len(), 2);
        assert_eq!(concat.parts[1][0].name, "cow");
        assert_eq!(concat.parts[1][0].location, "layer 2, part 2, layer 1");
        assert_eq!(concat.parts[1][1].params[0].value, "b.img");
        // A part must end with a plugin, and may not be empty.
        let e = parse("[[layer]]\nplugin = \"concat\"\n[[layer.part]]\n[[layer.part.layer]]\nfilter = \"cow\"\n")
            .unwrap_err();
        assert!(e.message.contains("layer 1, part 1, layer 1: the bottom layer `cow` is a filter"), "{e}");
        let e = parse("[[layer]]\nplugin = \"concat\"\n[[layer.part]]\n").unwrap_err();
        assert!(e.message.contains("part 1 is empty"), "{e}");
        let e = parse("[[layer]]\nplugin = \"concat\"\npart = 3\n").unwrap_err();
        assert!(e.message.contains("must be a list of tables"), "{e}");
    }

    #[test]
    fn explicit_name_and_values() {
        let s = parse("name = \"\"\nreadonly = true\n[[layer]]\nplugin = \"file\"\npath = \"a.img\"\ndirect = false\n")
            .unwrap();
        assert_eq!(s.name, "");
        assert!(s.readonly);
        assert_eq!(s.stack[0].params[1].value, "false");
    }

    #[test]
    fn tls_keys() {
        let s = parse(
            "tls = \"required\"\ntls-identities = [\"alice\", \"bob.example\"]\n[[layer]]\nplugin = \"memory\"\n",
        )
        .unwrap();
        assert!(s.tls_required);
        assert_eq!(s.tls_identities, vec!["alice".to_string(), "bob.example".to_string()]);
        let s = parse("tls = \"optional\"\n[[layer]]\nplugin = \"memory\"\n").unwrap();
        assert!(!s.tls_required && s.tls_identities.is_empty());
        let e = parse("readonly = true\ntls = \"yes\"\n[[layer]]\nplugin = \"memory\"\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.message.contains("key `tls`"), "{e}");
        let e = parse("tls-identities = []\n[[layer]]\nplugin = \"memory\"\n").unwrap_err();
        assert!(e.message.contains("tls-identities"), "{e}");
        let e = parse("tls_identities = [\"a\"]\n[[layer]]\nplugin = \"memory\"\n").unwrap_err();
        assert!(e.message.contains("tls_identities"), "{e}");
    }
}
