//! Exports as the server runs them: a built pipeline per export, opened
//! once per connection, and the set of exports clients can choose from.

use crate::config::{validate_params, ConfigError, ConfigErrors, ExportSpec, LayerKind};
use crate::error::OpError;
use crate::loader::{OpenRequest, PluginDirectory, PluginInstance};
use crate::pipeline::{request_lock_for, CheckedLayer, RequestLock};
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
    backend: Arc<PluginInstance>,
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
        let err = |line, msg: String| ConfigError { file: spec.source.clone(), line, message: msg };
        if let Some(f) = spec.stack.iter().find(|l| l.kind == LayerKind::Filter) {
            return Err(err(
                Some(f.line),
                format!(
                    "export `{}`, layer {}: filter `{}`: this nbdhost release has no filter support yet; use a plugin-only stack",
                    spec.name, f.index, f.name
                ),
            ));
        }
        let layer = spec.stack.last().expect("parser guarantees a non-empty stack");
        let plugin = plugins
            .get(&layer.name)
            .map_err(|e| err(Some(layer.line), format!("export `{}`, layer {}: {e}", spec.name, layer.index)))?;
        let params = validate_params(spec, layer, &plugin)?;
        let backend = plugin.create(&params).map_err(|e| {
            err(
                Some(layer.line),
                format!("export `{}`, layer {} ({}): {}", spec.name, layer.index, layer.name, e.message),
            )
        })?;
        Ok(Export {
            name: spec.name.clone(),
            description: spec.description.clone(),
            readonly: spec.readonly,
            spec: spec.clone(),
            thread_model: plugin.thread_model,
            backend,
            export_lock: RequestLock::shared(),
            gate: Arc::new(ConnectionGate::default()),
            connections: Arc::new(AtomicUsize::new(0)),
        })
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
        let handle = self.backend.open(&OpenRequest { readonly: self.readonly, export_name: &self.name, peer })?;
        let lock = request_lock_for(self.thread_model, &self.export_lock);
        let layer = CheckedLayer::new(handle, self.readonly, lock, &self.name)?;
        Ok(OpenExport { layer, _ticket: ticket, _count: count })
    }
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
