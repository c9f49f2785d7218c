//! Exports as the server runs them: a built pipeline per export, opened
//! once per connection, and the set of exports clients can choose from.

use crate::config::{validate_params, ConfigError, ConfigErrors, ExportSpec, LayerKind, LayerSpec};
use crate::error::OpError;
use crate::loader::{LoadedPlugin, OpenRequest, PluginDirectory, PluginInstance};
use crate::pipeline::{request_lock_for, CheckedLayer, FilterLayer, Layer, RequestLock};
use nbdhost_plugin_api::ThreadModel;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// One connection at a time, for pipelines that serialise connections.
#[derive(Default)]
pub struct ConnectionGate {
    busy: Mutex<bool>,
    freed: Condvar,
}

/// Held by the connection that owns a serialised export.
pub struct GateTicket(Arc<ConnectionGate>);

impl ConnectionGate {
    fn enter(self: &Arc<Self>) -> GateTicket {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        while *busy {
            busy = self.freed.wait(busy).unwrap_or_else(|e| e.into_inner());
        }
        *busy = true;
        GateTicket(self.clone())
    }
}

impl Drop for GateTicket {
    fn drop(&mut self) {
        *self.0.busy.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.0.freed.notify_one();
    }
}

/// A built export.
pub struct Export {
    /// Name clients ask for.
    pub name: String,
    /// Description for LIST and INFO.
    pub description: String,
    /// Writes refused.
    pub readonly: bool,
    /// The snippet that defined it.
    pub spec: ExportSpec,
    /// Most restrictive thread model of the pipeline.
    pub thread_model: ThreadModel,
    stack: Vec<BuiltLayer>,
    export_lock: RequestLock,
    gate: Arc<ConnectionGate>,
    connections: Arc<AtomicUsize>,
}

/// Counts an open pipeline against its export's connection limit.
struct ConnectionCount(Arc<AtomicUsize>);

impl Drop for ConnectionCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An export opened for one connection.
pub struct OpenExport {
    /// The checked pipeline.
    pub layer: CheckedLayer,
    _ticket: Option<GateTicket>,
    _count: ConnectionCount,
}

impl Export {
    /// Build an export from its spec, loading plugins from `plugins`.
    pub fn build(spec: &ExportSpec, plugins: &PluginDirectory) -> Result<Export, ConfigError> {
        let stack = build_stack(spec, &spec.stack, plugins)?;
        let thread_model = most_restrictive(&stack);
        Ok(Export {
            name: spec.name.clone(),
            description: spec.description.clone(),
            readonly: spec.readonly,
            spec: spec.clone(),
            thread_model,
            stack,
            export_lock: RequestLock::shared(),
            gate: Arc::new(ConnectionGate::default()),
            connections: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The layers, client side first, as `name > name > ...` with parts in
    /// brackets: `log > concat[file | cow > file | file]`.
    pub fn describe(&self) -> String {
        describe(&self.stack)
    }

    /// Has the export as many connections as its snippet allows?
    pub fn at_connection_limit(&self) -> bool {
        self.spec.max_connections.is_some_and(|m| self.connections.load(Ordering::SeqCst) >= m)
    }

    /// Open the pipeline for a connection from `peer`. Blocks while another
    /// connection holds an export whose pipeline serialises connections.
    pub fn open(&self, peer: &str) -> Result<OpenExport, OpError> {
        self.connections.fetch_add(1, Ordering::SeqCst);
        let count = ConnectionCount(self.connections.clone());
        let ticket = (self.thread_model == ThreadModel::SerializeConnections).then(|| self.gate.enter());
        let lock = request_lock_for(self.thread_model, &self.export_lock);
        let at = OpenAt { export: &self.name, peer };
        let layer = open_stack(&self.stack, self.readonly, &at, lock, &self.name)?;
        Ok(OpenExport { layer, _ticket: ticket, _count: count })
    }
}

/// One built layer: its plugin, per-export instance and (for composite
/// layers) its parts.
struct BuiltLayer {
    plugin: Arc<LoadedPlugin>,
    instance: Arc<PluginInstance>,
    parts: Vec<Vec<BuiltLayer>>,
}

fn build_stack(
    spec: &ExportSpec,
    stack: &[LayerSpec],
    plugins: &PluginDirectory,
) -> Result<Vec<BuiltLayer>, ConfigError> {
    stack.iter().map(|l| build_layer(spec, l, plugins)).collect()
}

fn build_layer(spec: &ExportSpec, layer: &LayerSpec, plugins: &PluginDirectory) -> Result<BuiltLayer, ConfigError> {
    let err = |msg: String| ConfigError {
        file: spec.source.clone(),
        line: Some(layer.line),
        message: format!("export `{}`, {} ({}): {msg}", spec.name, layer.location, layer.name),
    };
    let plugin = plugins.get(&layer.name).map_err(|e| err(e.to_string()))?;
    let n = layer.parts.len();
    match (layer.kind, plugin.filter_shape()) {
        (LayerKind::Filter, None) => {
            return Err(err(format!(
                "`{}` is a backend plugin, not a filter: write `plugin = \"{}\"`",
                layer.name, layer.name
            )))
        }
        (LayerKind::Filter, Some(shape)) if shape.min_children > 1 => {
            return Err(err(format!(
                "`{}` combines {} or more stacks: write it as `plugin = \"{}\"` with [[layer.part]] tables",
                layer.name, shape.min_children, layer.name
            )))
        }
        (LayerKind::Plugin, None) if n > 0 => {
            return Err(err(format!("backend `{}` takes no parts", layer.name)));
        }
        (LayerKind::Plugin, Some(shape)) if n == 0 => {
            return Err(err(format!(
                "`{}` is a filter: put it above a plugin with `filter = \"{}\"`{}",
                layer.name,
                layer.name,
                if shape.max_children > 1 { ", or give it [[layer.part]] tables" } else { "" }
            )))
        }
        (LayerKind::Plugin, Some(shape)) if n < shape.min_children as usize || n > shape.max_children as usize => {
            return Err(err(format!(
                "`{}` takes {} to {} parts, not {n}",
                layer.name, shape.min_children, shape.max_children
            )))
        }
        _ => {}
    }
    let params = validate_params(spec, layer, &plugin)?;
    let instance = plugin.create(&params).map_err(|e| err(e.message))?;
    let parts = layer.parts.iter().map(|p| build_stack(spec, p, plugins)).collect::<Result<Vec<_>, _>>()?;
    Ok(BuiltLayer { plugin, instance, parts })
}

fn most_restrictive(stack: &[BuiltLayer]) -> ThreadModel {
    stack
        .iter()
        .map(|l| {
            l.plugin
                .thread_model
                .min(l.parts.iter().map(|p| most_restrictive(p)).min().unwrap_or(ThreadModel::Parallel))
        })
        .min()
        .unwrap_or(ThreadModel::Parallel)
}

fn describe(stack: &[BuiltLayer]) -> String {
    stack
        .iter()
        .map(|l| {
            if l.parts.is_empty() {
                l.plugin.name.clone()
            } else {
                let parts: Vec<String> = l.parts.iter().map(|p| describe(p)).collect();
                format!("{}[{}]", l.plugin.name, parts.join(" | "))
            }
        })
        .collect::<Vec<_>>()
        .join(" > ")
}

struct OpenAt<'a> {
    export: &'a str,
    peer: &'a str,
}

/// Open a stack for one connection, bottom-up: each filter gets the checked
/// layers below it. Only the top layer takes the thread-model lock (the
/// pipeline's model is already the most restrictive of its layers).
fn open_stack(
    stack: &[BuiltLayer],
    readonly: bool,
    at: &OpenAt<'_>,
    lock: RequestLock,
    name: &str,
) -> Result<CheckedLayer, OpError> {
    let (top, below) = stack.split_first().expect("stacks are never empty");
    let req = OpenRequest { readonly, export_name: at.export, peer: at.peer };
    let inner: Box<dyn Layer> = match top.plugin.filter_shape() {
        None => Box::new(top.instance.open(&req)?),
        Some(shape) => {
            let child_ro = readonly || shape.child_readonly;
            let children = if top.parts.is_empty() {
                let child_name = format!("{}/{}", at.export, below[0].plugin.name);
                vec![Arc::new(open_stack(below, child_ro, at, RequestLock::none(), &child_name)?)]
            } else {
                let mut v = Vec::with_capacity(top.parts.len());
                for (i, p) in top.parts.iter().enumerate() {
                    let child_name = format!("{}/{}#{}", at.export, top.plugin.name, i + 1);
                    v.push(Arc::new(open_stack(p, child_ro, at, RequestLock::none(), &child_name)?));
                }
                v
            };
            Box::new(FilterLayer::open(&top.instance, &req, children)?)
        }
    };
    CheckedLayer::new(inner, readonly, lock, name)
}

/// What a reload did.
#[derive(Debug, Default)]
pub struct ReloadSummary {
    /// Unchanged exports (still the same instance).
    pub kept: Vec<String>,
    /// New exports.
    pub added: Vec<String>,
    /// Exports whose snippet changed (new connections get the new one).
    pub changed: Vec<String>,
    /// Exports that take no new connections.
    pub removed: Vec<String>,
}

/// The exports a server offers, and which one the empty name means.
#[derive(Default)]
pub struct ExportSet {
    exports: BTreeMap<String, Arc<Export>>,
    default: Option<String>,
}

impl ExportSet {
    /// Build every spec; all failures are reported together.
    pub fn build(
        specs: &[ExportSpec],
        plugins: &PluginDirectory,
        default: Option<String>,
    ) -> Result<ExportSet, ConfigErrors> {
        let mut exports = BTreeMap::new();
        let mut errors = Vec::new();
        for s in specs {
            match Export::build(s, plugins) {
                Ok(e) => {
                    exports.insert(e.name.clone(), Arc::new(e));
                }
                Err(e) => errors.push(e),
            }
        }
        if let Some(d) = &default {
            if errors.is_empty() && !exports.contains_key(d) {
                errors.push(ConfigError {
                    file: "default_export".into(),
                    line: None,
                    message: format!("default export `{d}` is not defined by any snippet"),
                });
            }
        }
        if errors.is_empty() {
            Ok(ExportSet { exports, default })
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Build the exports for a reload: an export whose snippet is unchanged
    /// keeps its running instance (a RAM disk keeps its contents, an
    /// overlay stays open once); new and changed snippets are built fresh
    /// and serve new connections. Any error leaves `previous` in charge.
    pub fn rebuild(
        specs: &[ExportSpec],
        plugins: &PluginDirectory,
        default: Option<String>,
        previous: &ExportSet,
    ) -> Result<(ExportSet, ReloadSummary), ConfigErrors> {
        let mut exports = BTreeMap::new();
        let mut errors = Vec::new();
        let mut summary = ReloadSummary::default();
        for s in specs {
            match previous.exports.get(&s.name) {
                Some(old) if old.spec == *s => {
                    exports.insert(s.name.clone(), old.clone());
                    summary.kept.push(s.name.clone());
                }
                old => match Export::build(s, plugins) {
                    Ok(e) => {
                        if old.is_some() { &mut summary.changed } else { &mut summary.added }.push(s.name.clone());
                        exports.insert(e.name.clone(), Arc::new(e));
                    }
                    Err(e) => errors.push(e),
                },
            }
        }
        summary.removed = previous.exports.keys().filter(|n| !exports.contains_key(*n)).cloned().collect();
        if let Some(d) = &default {
            if errors.is_empty() && !exports.contains_key(d) {
                errors.push(ConfigError {
                    file: "default_export".into(),
                    line: None,
                    message: format!("default export `{d}` is not defined by any snippet"),
                });
            }
        }
        if errors.is_empty() {
            Ok((ExportSet { exports, default }, summary))
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Find an export; the empty name means the default export (or the
    /// export literally named "" if a snippet defines one).
    pub fn lookup(&self, name: &str) -> Option<Arc<Export>> {
        if let Some(e) = self.exports.get(name) {
            return Some(e.clone());
        }
        if name.is_empty() {
            return self.default.as_ref().and_then(|d| self.exports.get(d)).cloned();
        }
        None
    }

    /// All exports, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Export>> {
        self.exports.values()
    }

    /// Number of exports.
    pub fn len(&self) -> usize {
        self.exports.len()
    }

    /// No exports at all.
    pub fn is_empty(&self) -> bool {
        self.exports.is_empty()
    }
}
