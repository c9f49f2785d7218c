//! The ABI boundary: finding, loading and calling plugin shared objects.
//!
//! This is the only module of the host with `unsafe` code. Everything above
//! it sees safe types: [`LoadedPlugin`] (a library and its copied table),
//! [`PluginInstance`] (per-export state) and [`PluginHandle`] (per-connection
//! state). Callbacks a plugin lacks are reported as absent so the layer above
//! can fall back. Host services (logging, error messages) are given to each
//! plugin as its own [`HostApi`] table.
//!
//! Libraries are never unloaded: a plugin may have spawned threads or
//! registered thread-local destructors, and `dlclose` under them would crash
//! the server. Reloading configuration reuses the loaded library.

use nbdhost_plugin_api::__private::{lent_slices, raw_pieces};
use nbdhost_plugin_api::abi::{
    self, BlockSize, CanFn, ExtentSink, FilterTable, Handle, HostApi, NextOps, OpenInfo, Param, PluginTable,
};
use nbdhost_plugin_api::{ParamKind, ThreadModel};
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why a plugin could not be loaded. Messages name the path and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError(pub String);

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for LoadError {}

/// An error returned by a plugin callback: errno plus message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginError {
    /// POSIX errno the plugin returned.
    pub errno: i32,
    /// Message the plugin attached, or the errno's description.
    pub message: String,
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// A parameter a plugin declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamInfo {
    /// Name as written in snippets.
    pub name: String,
    /// Type.
    pub kind: ParamKind,
    /// Must be set.
    pub required: bool,
    /// Default value, if any.
    pub default: Option<String>,
    /// Help text.
    pub help: String,
}

/// Per-plugin context behind the host table's `ctx` pointer.
struct HostCtx {
    name: String,
    debug: bool,
}

thread_local! {
    /// Message a plugin attached with `set_error` during the current call.
    static LAST_ERROR: RefCell<Option<String>> = const { RefCell::new(None) };
}

unsafe extern "C" fn host_log(ctx: *mut c_void, level: u32, msg: *const u8, len: usize) {
    let _ = catch_unwind(|| {
        // SAFETY: `ctx` is the `HostCtx` we created for this plugin, alive as
        // long as the (never unloaded) plugin; `msg` has `len` bytes.
        let (ctx, msg) = unsafe { (&*(ctx as *const HostCtx), std::slice::from_raw_parts(msg, len)) };
        let msg = String::from_utf8_lossy(msg);
        let level = match level {
            abi::LOG_ERROR => log::Level::Error,
            abi::LOG_WARN => log::Level::Warn,
            abi::LOG_INFO => log::Level::Info,
            // `--plugin-debug NAME` shows this plugin's debug messages
            // whatever the host's own log level is.
            _ if ctx.debug => {
                log::info!(target: "plugin", "[{}] debug: {msg}", ctx.name);
                return;
            }
            _ => log::Level::Debug,
        };
        log::log!(target: "plugin", level, "[{}] {msg}", ctx.name);
    });
}

unsafe extern "C" fn host_set_error(_ctx: *mut c_void, msg: *const u8, len: usize) {
    let _ = catch_unwind(|| {
        // SAFETY: the plugin passes `len` readable bytes.
        let msg = unsafe { std::slice::from_raw_parts(msg, len) };
        let msg = String::from_utf8_lossy(msg).into_owned();
        LAST_ERROR.with(|e| *e.borrow_mut() = Some(msg));
    });
}

unsafe extern "C" fn host_last_error(_ctx: *mut c_void, buf: *mut u8, cap: usize) -> usize {
    catch_unwind(|| {
        LAST_ERROR.with(|m| {
            let m = m.borrow();
            let Some(msg) = m.as_deref() else { return 0 };
            let n = msg.len().min(cap);
            // SAFETY: the plugin passes `cap` writable bytes at `buf`.
            unsafe { std::ptr::copy_nonoverlapping(msg.as_ptr(), buf, n) };
            msg.len()
        })
    })
    .unwrap_or(0)
}

/// Set by `nbdhost --check` before any plugin instance is created.
static CHECKING_ONLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// From now on, tell plugins that the host only checks the configuration.
pub fn set_checking_only() {
    CHECKING_ONLY.store(true, std::sync::atomic::Ordering::Relaxed);
}

unsafe extern "C" fn host_checking_only(_ctx: *mut c_void) -> u32 {
    CHECKING_ONLY.load(std::sync::atomic::Ordering::Relaxed) as u32
}

unsafe extern "C" fn host_debug_enabled(ctx: *mut c_void) -> u32 {
    // SAFETY: `ctx` is this plugin's `HostCtx`.
    let ctx = unsafe { &*(ctx as *const HostCtx) };
    (ctx.debug || log::log_enabled!(target: "plugin", log::Level::Debug)) as u32
}

/// Turn a callback's return code into a result, collecting the message the
/// plugin set on this thread.
fn check(rc: i32, what: &str, plugin: &str) -> Result<(), PluginError> {
    let msg = LAST_ERROR.with(|e| e.borrow_mut().take());
    if rc == 0 {
        return Ok(());
    }
    let errno = if rc > 0 { rc } else { libc::EIO };
    let message =
        msg.unwrap_or_else(|| format!("{plugin}: {what} failed: {}", std::io::Error::from_raw_os_error(errno)));
    Err(PluginError { errno, message })
}

/// Run one plugin callback. Clears the per-thread message first. A Rust
/// panic cannot cross an `extern "C"` boundary (it aborts), so a panicking
/// plugin must catch its own panics; the plugin-api macro does.
fn call(plugin: &str, what: &str, f: impl FnOnce() -> i32) -> Result<(), PluginError> {
    LAST_ERROR.with(|e| e.borrow_mut().take());
    let rc = f();
    check(rc, what, plugin)
}

fn cstr(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: plugin tables hold NUL-terminated 'static strings (ABI rule).
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

type PreadFn = unsafe extern "C" fn(Handle, *mut u8, u64, u64, u32) -> i32;
type PwriteFn = unsafe extern "C" fn(Handle, *const u8, u64, u64, u32) -> i32;
type FlushFn = unsafe extern "C" fn(Handle, u32) -> i32;
type RangeFn = unsafe extern "C" fn(Handle, u64, u64, u32) -> i32;
type ExtentsFn = unsafe extern "C" fn(Handle, u64, u64, u32, *mut ExtentSink) -> i32;
type LendFn = unsafe extern "C" fn(Handle, u64, u64, u32, abi::LendSink, *mut c_void) -> i32;
type LendMutFn = unsafe extern "C" fn(Handle, u64, u64, u32, abi::LendSinkMut, *mut c_void) -> i32;

/// What receives a layer's lent pieces: `Err` carries an errno.
pub type LendReceiver<'a> = dyn FnMut(&[&[u8]]) -> Result<(), i32> + 'a;
/// What fills the memory a layer lends for a write: `Err` carries an errno.
pub type LendFiller<'a> = dyn FnMut(&mut [&mut [u8]]) -> Result<(), i32> + 'a;
type CreateFn = unsafe extern "C" fn(*const Param, usize, *mut abi::Instance) -> i32;

/// The per-handle callbacks, which backends and filters share.
#[derive(Clone, Copy)]
struct Ops {
    create: Option<CreateFn>,
    destroy: Option<unsafe extern "C" fn(abi::Instance)>,
    close: Option<unsafe extern "C" fn(Handle)>,
    get_size: Option<unsafe extern "C" fn(Handle, *mut u64) -> i32>,
    block_size: Option<unsafe extern "C" fn(Handle, *mut BlockSize) -> i32>,
    can_write: Option<CanFn>,
    can_flush: Option<CanFn>,
    is_rotational: Option<CanFn>,
    can_trim: Option<CanFn>,
    can_zero: Option<CanFn>,
    can_fast_zero: Option<CanFn>,
    can_fua: Option<CanFn>,
    can_multi_conn: Option<CanFn>,
    can_extents: Option<CanFn>,
    can_cache: Option<CanFn>,
    pread: Option<PreadFn>,
    pwrite: Option<PwriteFn>,
    flush: Option<FlushFn>,
    trim: Option<RangeFn>,
    zero: Option<RangeFn>,
    extents: Option<ExtentsFn>,
    cache: Option<RangeFn>,
    /// Backends (ABI 1.1) and filters (ABI 1.3).
    pread_lend: Option<LendFn>,
    /// Backends only (ABI 1.2).
    pwrite_lend: Option<LendMutFn>,
}

macro_rules! ops_from {
    ($t:expr) => {
        Ops {
            create: $t.create,
            destroy: $t.destroy,
            close: $t.close,
            get_size: $t.get_size,
            block_size: $t.block_size,
            can_write: $t.can_write,
            can_flush: $t.can_flush,
            is_rotational: $t.is_rotational,
            can_trim: $t.can_trim,
            can_zero: $t.can_zero,
            can_fast_zero: $t.can_fast_zero,
            can_fua: $t.can_fua,
            can_multi_conn: $t.can_multi_conn,
            can_extents: $t.can_extents,
            can_cache: $t.can_cache,
            pread: $t.pread,
            pwrite: $t.pwrite,
            flush: $t.flush,
            trim: $t.trim,
            zero: $t.zero,
            extents: $t.extents,
            cache: $t.cache,
            pread_lend: None,
            pwrite_lend: None,
        }
    };
}

/// What kind of layer a plugin provides, with its kind-specific callbacks.
#[derive(Clone, Copy)]
enum Kind {
    Backend {
        open: unsafe extern "C" fn(abi::Instance, *const OpenInfo, *mut Handle) -> i32,
    },
    Filter {
        open: unsafe extern "C" fn(abi::Instance, *const OpenInfo, *const *const NextOps, usize, *mut Handle) -> i32,
        min_children: u32,
        max_children: u32,
        child_readonly: bool,
    },
}

/// A filter's structural declarations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilterShape {
    /// Fewest layers below.
    pub min_children: u32,
    /// Most layers below.
    pub max_children: u32,
    /// Opens the layers below read-only.
    pub child_readonly: bool,
}

/// A loaded plugin library with its copied table.
pub struct LoadedPlugin {
    /// Name the plugin declares.
    pub name: String,
    /// Plugin's own version string.
    pub version: String,
    /// Description.
    pub description: String,
    /// The shared object it came from.
    pub path: PathBuf,
    /// ABI version the plugin was built for.
    pub abi: (u16, u16),
    /// Declared parameters.
    pub params: Vec<ParamInfo>,
    /// Declared thread model.
    pub thread_model: ThreadModel,
    kind: Kind,
    ops: Ops,
    // Kept alive (and never freed) for the plugin's host callbacks.
    _host: &'static HostApi,
}

// SAFETY: the copied table holds function pointers and pointers to 'static
// data inside a library that is never unloaded; the plugin's thread model
// is enforced by the layer above.
unsafe impl Send for LoadedPlugin {}
// SAFETY: as above.
unsafe impl Sync for LoadedPlugin {}

impl fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedPlugin").field("name", &self.name).field("path", &self.path).finish()
    }
}

impl LoadedPlugin {
    /// Load the plugin at `path`. `debug` turns on its debug messages.
    pub fn load(path: &Path, debug: bool) -> Result<Arc<LoadedPlugin>, LoadError> {
        let shown = path.display();
        // SAFETY: loading a library runs its initialisers. Plugins are code
        // the operator chose to install in the plugin directory; that trust
        // is the point of a plugin host.
        let lib = unsafe { libloading::Library::new(path) }
            .map_err(|e| LoadError(format!("plugin {shown}: cannot load: {e}")))?;
        // SAFETY: the symbol's type is fixed by ABI v1; a library exporting
        // the name with another type is not an nbdhost plugin, which we
        // cannot detect beyond this point (the version check below).
        let entry: abi::EntryPoint = unsafe {
            *lib.get::<abi::EntryPoint>(abi::ENTRY_POINT_CSTR).map_err(|e| {
                LoadError(format!("plugin {shown}: no `{}` symbol, not an nbdhost plugin ({e})", abi::ENTRY_POINT))
            })?
        };
        let ctx = Box::leak(Box::new(HostCtx {
            name: path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
            debug,
        }));
        let host: &'static HostApi = Box::leak(Box::new(HostApi {
            abi_major: abi::ABI_MAJOR,
            abi_minor: abi::ABI_MINOR,
            struct_size: std::mem::size_of::<HostApi>() as u32,
            ctx: ctx as *mut HostCtx as *mut c_void,
            log: Some(host_log),
            set_error: Some(host_set_error),
            debug_enabled: Some(host_debug_enabled),
            last_error: Some(host_last_error),
            checking_only: Some(host_checking_only),
        }));
        // SAFETY: calling the entry point with our table, per ABI v1.
        let table_ptr = unsafe { entry(host) };
        if table_ptr.is_null() {
            return Err(LoadError(format!(
                "plugin {shown}: its entry point refused this host (host ABI {}.{}); rebuild it against a compatible nbdhost-plugin-api",
                abi::ABI_MAJOR,
                abi::ABI_MINOR
            )));
        }
        // SAFETY: non-null table from the plugin; the header fields are
        // present in every version of the ABI.
        let (major, minor, size, kind) = unsafe {
            let t = &*table_ptr;
            (t.abi_major, t.abi_minor, t.struct_size, t.kind)
        };
        if major != abi::ABI_MAJOR {
            return Err(LoadError(format!(
                "plugin {shown}: built for ABI {major}.{minor}, this host speaks ABI {}.x",
                abi::ABI_MAJOR
            )));
        }
        let header = std::mem::offset_of!(PluginTable, create) as u32;
        if size < header {
            return Err(LoadError(format!(
                "plugin {shown}: table is {size} bytes, smaller than the {header}-byte ABI header"
            )));
        }
        // SAFETY (both arms): the plugin declared `size` readable bytes of
        // the table its `kind` names; fields beyond them stay zero (=
        // absent), which is valid for every field type.
        let (kind, ops, common) = match kind {
            abi::PLUGIN_KIND_BACKEND => {
                let t: PluginTable = unsafe { nbdhost_plugin_api::__private::copy_prefix(table_ptr, size) };
                if t.create.is_none() || t.open.is_none() || t.get_size.is_none() || t.pread.is_none() {
                    return Err(LoadError(format!(
                        "plugin {shown}: a backend must provide create, open, get_size and pread"
                    )));
                }
                let common = (t.thread_model, t.name, t.version, t.description, t.params, t.n_params);
                let ops = Ops { pread_lend: t.pread_lend, pwrite_lend: t.pwrite_lend, ..ops_from!(t) };
                (Kind::Backend { open: t.open.expect("checked") }, ops, common)
            }
            abi::PLUGIN_KIND_FILTER => {
                let t: FilterTable =
                    unsafe { nbdhost_plugin_api::__private::copy_prefix(table_ptr as *const FilterTable, size) };
                if t.create.is_none() || t.open.is_none() {
                    return Err(LoadError(format!("plugin {shown}: a filter must provide create and open")));
                }
                if t.pread_lend.is_some() && t.pread.is_none() {
                    return Err(LoadError(format!(
                        "plugin {shown}: a filter with pread_lend must provide pread too (the host reads with it \
                         wherever it does not lend)"
                    )));
                }
                if t.pwrite_lend.is_some() && t.pwrite.is_none() {
                    return Err(LoadError(format!(
                        "plugin {shown}: a filter with pwrite_lend must provide pwrite too (the host writes with it \
                         wherever it does not lend)"
                    )));
                }
                if t.min_children > t.max_children || t.max_children == 0 {
                    return Err(LoadError(format!(
                        "plugin {shown}: declares between {} and {} layers below it",
                        t.min_children, t.max_children
                    )));
                }
                let common = (t.thread_model, t.name, t.version, t.description, t.params, t.n_params);
                let kind = Kind::Filter {
                    open: t.open.expect("checked"),
                    min_children: t.min_children,
                    max_children: t.max_children,
                    child_readonly: t.child_readonly != 0,
                };
                (kind, Ops { pread_lend: t.pread_lend, pwrite_lend: t.pwrite_lend, ..ops_from!(t) }, common)
            }
            other => {
                return Err(LoadError(format!(
                    "plugin {shown}: unknown kind {other} (this host knows backends and filters)"
                )))
            }
        };
        let (thread_model, name, version, description, params_ptr, n_params) = common;
        let thread_model = match thread_model {
            abi::THREAD_MODEL_SERIALIZE_CONNECTIONS => ThreadModel::SerializeConnections,
            abi::THREAD_MODEL_SERIALIZE_ALL_REQUESTS => ThreadModel::SerializeAllRequests,
            abi::THREAD_MODEL_SERIALIZE_REQUESTS => ThreadModel::SerializeRequests,
            abi::THREAD_MODEL_PARALLEL => ThreadModel::Parallel,
            // An unknown (future) model: be safe.
            _ => ThreadModel::SerializeConnections,
        };
        let mut params = Vec::with_capacity(n_params);
        for i in 0..n_params {
            // SAFETY: `params` points to `n_params` entries ('static data).
            let p = unsafe { &*params_ptr.add(i) };
            let kind = match p.kind {
                abi::PARAM_INT => ParamKind::Int,
                abi::PARAM_SIZE => ParamKind::Size,
                abi::PARAM_BOOL => ParamKind::Bool,
                abi::PARAM_PATH => ParamKind::Path,
                abi::PARAM_PATH_LIST => ParamKind::PathList,
                _ => ParamKind::String,
            };
            params.push(ParamInfo {
                name: cstr(p.name),
                kind,
                required: p.required != 0,
                default: (!p.default_value.is_null()).then(|| cstr(p.default_value)),
                help: cstr(p.help),
            });
        }
        let name = cstr(name);
        ctx.name = if name.is_empty() { ctx.name.clone() } else { name.clone() };
        // Never unload (see module docs).
        std::mem::forget(lib);
        Ok(Arc::new(LoadedPlugin {
            name: ctx.name.clone(),
            version: cstr(version),
            description: cstr(description),
            path: path.to_path_buf(),
            abi: (major, minor),
            params,
            thread_model,
            kind,
            ops,
            _host: host,
        }))
    }

    /// The filter's declarations, or `None` for a backend.
    pub fn filter_shape(&self) -> Option<FilterShape> {
        match self.kind {
            Kind::Backend { .. } => None,
            Kind::Filter { min_children, max_children, child_readonly, .. } => {
                Some(FilterShape { min_children, max_children, child_readonly })
            }
        }
    }

    /// Names of the per-handle callbacks present in the plugin's table, in
    /// table order (`get_size`, `can_write`, `pread`, ...). Absent ones are
    /// what the host falls back for (or, in a filter, passes through).
    pub fn callbacks(&self) -> Vec<&'static str> {
        let t = &self.ops;
        [
            ("get_size", t.get_size.is_some()),
            ("block_size", t.block_size.is_some()),
            ("can_write", t.can_write.is_some()),
            ("can_flush", t.can_flush.is_some()),
            ("is_rotational", t.is_rotational.is_some()),
            ("can_trim", t.can_trim.is_some()),
            ("can_zero", t.can_zero.is_some()),
            ("can_fast_zero", t.can_fast_zero.is_some()),
            ("can_fua", t.can_fua.is_some()),
            ("can_multi_conn", t.can_multi_conn.is_some()),
            ("can_extents", t.can_extents.is_some()),
            ("can_cache", t.can_cache.is_some()),
            ("pread", t.pread.is_some()),
            ("pwrite", t.pwrite.is_some()),
            ("flush", t.flush.is_some()),
            ("trim", t.trim.is_some()),
            ("zero", t.zero.is_some()),
            ("extents", t.extents.is_some()),
            ("cache", t.cache.is_some()),
            ("pread_lend", t.pread_lend.is_some()),
            ("pwrite_lend", t.pwrite_lend.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, present)| present.then_some(name))
        .collect()
    }

    /// Create per-export state from validated, normalised parameters.
    pub fn create(self: &Arc<Self>, params: &[(String, String)]) -> Result<Arc<PluginInstance>, PluginError> {
        let owned: Vec<(CString, CString)> = params
            .iter()
            .map(|(k, v)| {
                let c = |s: &str| CString::new(s.replace('\0', "")).expect("NULs removed");
                (c(k), c(v))
            })
            .collect();
        let raw: Vec<Param> = owned.iter().map(|(k, v)| Param { key: k.as_ptr(), value: v.as_ptr() }).collect();
        let create = self.ops.create.expect("checked at load");
        let mut inst: abi::Instance = std::ptr::null_mut();
        // SAFETY: `raw` holds valid NUL-terminated pairs for this call; `inst`
        // is a valid out-pointer.
        call(&self.name, "create", || unsafe { create(raw.as_ptr(), raw.len(), &mut inst) })?;
        Ok(Arc::new(PluginInstance { plugin: self.clone(), ptr: inst }))
    }
}

/// Per-export plugin state. Destroyed when the last handle and the export
/// that owns it are gone.
pub struct PluginInstance {
    plugin: Arc<LoadedPlugin>,
    ptr: abi::Instance,
}

// SAFETY: the instance pointer is only passed back to the plugin, whose
// thread model the layers above enforce.
unsafe impl Send for PluginInstance {}
// SAFETY: as above.
unsafe impl Sync for PluginInstance {}

impl Drop for PluginInstance {
    fn drop(&mut self) {
        if let Some(destroy) = self.plugin.ops.destroy {
            // SAFETY: every handle holds an Arc to us, so none is open; the
            // pointer came from `create` and is destroyed exactly once.
            unsafe { destroy(self.ptr) };
        }
    }
}

/// Connection facts handed to `open`.
pub struct OpenRequest<'a> {
    /// Read-only for this connection.
    pub readonly: bool,
    /// Export name.
    pub export_name: &'a str,
    /// Peer address.
    pub peer: &'a str,
}

impl PluginInstance {
    fn open_info(req: &OpenRequest<'_>) -> OpenInfo {
        OpenInfo {
            struct_size: std::mem::size_of::<OpenInfo>() as u32,
            readonly: req.readonly as u32,
            export_name: req.export_name.as_ptr(),
            export_name_len: req.export_name.len(),
            peer: req.peer.as_ptr(),
            peer_len: req.peer.len(),
        }
    }

    /// Open a backend's per-connection handle.
    pub fn open(self: &Arc<Self>, req: &OpenRequest<'_>) -> Result<PluginHandle, PluginError> {
        let Kind::Backend { open } = self.plugin.kind else {
            return Err(PluginError { errno: libc::EINVAL, message: format!("{} is a filter", self.plugin.name) });
        };
        let info = Self::open_info(req);
        let mut h: Handle = std::ptr::null_mut();
        // SAFETY: live instance, `info` valid for the call, valid out-pointer.
        call(&self.plugin.name, "open", || unsafe { open(self.ptr, &info, &mut h) })?;
        Ok(PluginHandle { inst: self.clone(), ptr: h })
    }

    /// Open a filter's per-connection handle over `children`, which must
    /// outlive the handle.
    pub fn open_filter(
        self: &Arc<Self>,
        req: &OpenRequest<'_>,
        children: &[NextTable],
    ) -> Result<PluginHandle, PluginError> {
        let Kind::Filter { open, .. } = self.plugin.kind else {
            return Err(PluginError { errno: libc::EINVAL, message: format!("{} is not a filter", self.plugin.name) });
        };
        let info = Self::open_info(req);
        let ptrs: Vec<*const NextOps> = children.iter().map(|c| &*c.ops as *const NextOps).collect();
        let mut h: Handle = std::ptr::null_mut();
        // SAFETY: live instance; `info` and the child table pointers are
        // valid for the call, and the caller keeps the tables alive until
        // the handle is closed; valid out-pointer.
        call(&self.plugin.name, "open", || unsafe { open(self.ptr, &info, ptrs.as_ptr(), ptrs.len(), &mut h) })?;
        Ok(PluginHandle { inst: self.clone(), ptr: h })
    }
}

/// A plugin's per-connection handle; closed on drop.
pub struct PluginHandle {
    inst: Arc<PluginInstance>,
    ptr: abi::Handle,
}

// SAFETY: see PluginInstance.
unsafe impl Send for PluginHandle {}
// SAFETY: see PluginInstance.
unsafe impl Sync for PluginHandle {}

impl Drop for PluginHandle {
    fn drop(&mut self) {
        if let Some(close) = self.inst.plugin.ops.close {
            // SAFETY: handle from `open`, closed exactly once.
            unsafe { close(self.ptr) };
        }
    }
}

/// Which operations a plugin provides.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Provided {
    /// `get_size`
    pub get_size: bool,
    /// `block_size`
    pub block_size: bool,
    /// `pread`
    pub pread: bool,
    /// `pwrite`
    pub pwrite: bool,
    /// `flush`
    pub flush: bool,
    /// `trim`
    pub trim: bool,
    /// `zero`
    pub zero: bool,
    /// `extents`
    pub extents: bool,
    /// `cache`
    pub cache: bool,
    /// `pread_lend` (backends ABI 1.1, filters ABI 1.3)
    pub pread_lend: bool,
    /// `pwrite_lend` (backends, ABI 1.2)
    pub pwrite_lend: bool,
}

impl PluginHandle {
    fn table(&self) -> &Ops {
        &self.inst.plugin.ops
    }
    fn call(&self, what: &str, f: impl FnOnce() -> i32) -> Result<(), PluginError> {
        call(&self.inst.plugin.name, what, f)
    }

    /// The plugin this handle belongs to.
    pub fn plugin(&self) -> &Arc<LoadedPlugin> {
        &self.inst.plugin
    }

    /// Operations present in the table.
    pub fn provided(&self) -> Provided {
        let t = self.table();
        Provided {
            get_size: t.get_size.is_some(),
            block_size: t.block_size.is_some(),
            pread: t.pread.is_some(),
            pwrite: t.pwrite.is_some(),
            flush: t.flush.is_some(),
            trim: t.trim.is_some(),
            zero: t.zero.is_some(),
            extents: t.extents.is_some(),
            cache: t.cache.is_some(),
            pread_lend: t.pread_lend.is_some(),
            pwrite_lend: t.pwrite_lend.is_some(),
        }
    }

    /// Export size.
    pub fn get_size(&self) -> Result<u64, PluginError> {
        let Some(f) = self.table().get_size else { return Err(absent("get_size", libc::EINVAL)) };
        let mut out = 0u64;
        // SAFETY: live handle and valid out-pointer.
        self.call("get_size", || unsafe { f(self.ptr, &mut out) })?;
        Ok(out)
    }

    /// Block-size constraints (`None`: none declared).
    pub fn block_size(&self) -> Result<Option<BlockSize>, PluginError> {
        let Some(f) = self.table().block_size else {
            return Ok(None);
        };
        let mut out = BlockSize::default();
        // SAFETY: live handle and valid out-pointer.
        self.call("block_size", || unsafe { f(self.ptr, &mut out) })?;
        Ok((out != BlockSize::default()).then_some(out))
    }

    /// Raw answer of the capability query `which` (`abi::CAN_*`); `None`
    /// when the plugin has no such callback.
    pub fn can(&self, which: u32) -> Result<Option<u32>, PluginError> {
        let t = self.table();
        let f = match which {
            abi::CAN_WRITE => t.can_write,
            abi::CAN_FLUSH => t.can_flush,
            abi::CAN_ROTATIONAL => t.is_rotational,
            abi::CAN_TRIM => t.can_trim,
            abi::CAN_ZERO => t.can_zero,
            abi::CAN_FAST_ZERO => t.can_fast_zero,
            abi::CAN_FUA => t.can_fua,
            abi::CAN_MULTI_CONN => t.can_multi_conn,
            abi::CAN_EXTENTS => t.can_extents,
            abi::CAN_CACHE => t.can_cache,
            _ => None,
        };
        let Some(f) = f else { return Ok(None) };
        let mut out = 0u32;
        // SAFETY: live handle and valid out-pointer.
        self.call("capability query", || unsafe { f(self.ptr, &mut out) })?;
        Ok(Some(out))
    }

    /// Read into `buf`.
    pub fn pread(&self, buf: &mut [u8], offset: u64, flags: u32) -> Result<(), PluginError> {
        let Some(f) = self.table().pread else { return Err(absent("pread", libc::EINVAL)) };
        // SAFETY: `buf` is writable for its length during the call.
        self.call("pread", || unsafe { f(self.ptr, buf.as_mut_ptr(), buf.len() as u64, offset, flags) })
    }

    /// Lend `[offset, offset+count)`: `sink` gets the plugin's pieces, valid
    /// only while it runs, and its error (an errno) is what this returns.
    /// Absent callback: `EINVAL` (check [`Provided::pread_lend`] first).
    pub fn pread_lend(
        &self,
        count: u64,
        offset: u64,
        flags: u32,
        sink: &mut LendReceiver<'_>,
    ) -> Result<(), PluginError> {
        let Some(f) = self.table().pread_lend else { return Err(absent("pread_lend", libc::EINVAL)) };
        let mut ctx = LendCtx { sink, total: 0, calls: 0 };
        let ctx_ptr = &mut ctx as *mut LendCtx<'_> as *mut c_void;
        // SAFETY: `lend_sink` is given `ctx_ptr`, which points at `ctx` and
        // outlives the call.
        let r = self.call("pread_lend", || unsafe { f(self.ptr, count, offset, flags, lend_sink, ctx_ptr) });
        match r {
            Ok(()) if ctx.calls != 1 || ctx.total != count => Err(PluginError {
                errno: libc::EIO,
                message: format!(
                    "plugin {}: pread_lend lent {} bytes in {} calls for a read of {count}",
                    self.plugin().name,
                    ctx.total,
                    ctx.calls
                ),
            }),
            r => r,
        }
    }

    /// Write `[offset, offset+count)` by filling memory the plugin lends:
    /// `sink` gets its pieces, exclusively and only while it runs, and must
    /// fill them; its error (an errno) is what this returns. Absent
    /// callback: `EINVAL` (check [`Provided::pwrite_lend`] first). The
    /// pieces are checked before `sink` sees them: exactly `count` bytes,
    /// in one call, or `sink` is not run and this fails with `EIO` (the
    /// caller must then still consume the data it meant to write).
    pub fn pwrite_lend(
        &self,
        count: u64,
        offset: u64,
        flags: u32,
        sink: &mut LendFiller<'_>,
    ) -> Result<(), PluginError> {
        let Some(f) = self.table().pwrite_lend else { return Err(absent("pwrite_lend", libc::EINVAL)) };
        // A plugin never sees a flag from after its ABI minor.
        let flags = if self.plugin().abi.1 < 5 { flags & !abi::FLAG_KERNEL_FILL } else { flags };
        let mut ctx = LendMutCtx { sink, count, calls: 0, refused: None, sink_failed: false };
        let ctx_ptr = &mut ctx as *mut LendMutCtx<'_> as *mut c_void;
        // SAFETY: `lend_sink_mut` is given `ctx_ptr`, which points at `ctx`
        // and outlives the call.
        let r = self.call("pwrite_lend", || unsafe { f(self.ptr, count, offset, flags, lend_sink_mut, ctx_ptr) });
        let name = &self.plugin().name;
        if let Some(why) = ctx.refused {
            // Whatever the plugin returned: its pieces were not filled.
            return Err(PluginError { errno: libc::EIO, message: format!("plugin {name}: pwrite_lend {why}") });
        }
        match r {
            Ok(()) if ctx.calls != 1 => Err(PluginError {
                errno: libc::EIO,
                message: format!("plugin {name}: pwrite_lend called its sink {} times, not once", ctx.calls),
            }),
            Ok(()) if ctx.sink_failed => Err(PluginError {
                errno: libc::EIO,
                message: format!("plugin {name}: pwrite_lend returned success although its memory was not filled"),
            }),
            r => r,
        }
    }

    /// Write `buf`. Absent callback: `EROFS`.
    pub fn pwrite(&self, buf: &[u8], offset: u64, flags: u32) -> Result<(), PluginError> {
        let Some(f) = self.table().pwrite else {
            return Err(absent("pwrite", libc::EROFS));
        };
        // SAFETY: `buf` is readable for its length during the call.
        self.call("pwrite", || unsafe { f(self.ptr, buf.as_ptr(), buf.len() as u64, offset, flags) })
    }

    /// Flush.
    pub fn flush(&self, flags: u32) -> Result<(), PluginError> {
        let Some(f) = self.table().flush else {
            return Err(absent("flush", libc::EINVAL));
        };
        // SAFETY: live handle.
        self.call("flush", || unsafe { f(self.ptr, flags) })
    }

    /// Trim.
    pub fn trim(&self, count: u64, offset: u64, flags: u32) -> Result<(), PluginError> {
        let Some(f) = self.table().trim else {
            return Err(absent("trim", libc::EINVAL));
        };
        // SAFETY: live handle.
        self.call("trim", || unsafe { f(self.ptr, count, offset, flags) })
    }

    /// Zero.
    pub fn zero(&self, count: u64, offset: u64, flags: u32) -> Result<(), PluginError> {
        let Some(f) = self.table().zero else {
            return Err(absent("zero", libc::ENOTSUP));
        };
        // SAFETY: live handle.
        self.call("zero", || unsafe { f(self.ptr, count, offset, flags) })
    }

    /// Cache.
    pub fn cache(&self, count: u64, offset: u64, flags: u32) -> Result<(), PluginError> {
        let Some(f) = self.table().cache else {
            return Err(absent("cache", libc::EINVAL));
        };
        // SAFETY: live handle.
        self.call("cache", || unsafe { f(self.ptr, count, offset, flags) })
    }

    /// Extents: `add(offset, length, flags)` is called for each one and may
    /// refuse it by returning an errno.
    pub fn extents(
        &self,
        count: u64,
        offset: u64,
        flags: u32,
        add: &mut dyn FnMut(u64, u64, u32) -> Result<(), i32>,
    ) -> Result<(), PluginError> {
        let Some(f) = self.table().extents else {
            return Err(absent("extents", libc::EINVAL));
        };
        unsafe extern "C" fn trampoline(ctx: *mut c_void, offset: u64, length: u64, flags: u32) -> i32 {
            // SAFETY: `ctx` is the `&mut dyn FnMut` below, alive for the call.
            let add = unsafe { &mut *(ctx as *mut &mut dyn FnMut(u64, u64, u32) -> Result<(), i32>) };
            match catch_unwind(AssertUnwindSafe(|| add(offset, length, flags))) {
                Ok(Ok(())) => 0,
                Ok(Err(e)) => e,
                Err(_) => libc::EIO,
            }
        }
        let mut add_ref: &mut dyn FnMut(u64, u64, u32) -> Result<(), i32> = add;
        let mut sink = ExtentSink { ctx: &mut add_ref as *mut _ as *mut c_void, add: trampoline };
        // SAFETY: live handle; `sink` and the closure it points to outlive
        // the call.
        self.call("extents", || unsafe { f(self.ptr, count, offset, flags, &mut sink) })
    }
}

/// What a filter's [`NextOps`] calls into: the checked layer below it.
/// Implemented by the pipeline; errors carry a POSIX errno and a message.
pub trait NextTarget: Send + Sync {
    /// Size.
    fn get_size(&self) -> Result<u64, PluginError>;
    /// Block sizes, defaults filled in.
    fn block_size(&self) -> Result<BlockSize, PluginError>;
    /// Capability `which` (`abi::CAN_*`).
    fn can(&self, which: u32) -> Result<u32, PluginError>;
    /// Read.
    fn pread(&self, buf: &mut [u8], offset: u64, flags: u32) -> Result<(), PluginError>;
    /// Write.
    fn pwrite(&self, buf: &[u8], offset: u64, flags: u32) -> Result<(), PluginError>;
    /// Flush.
    fn flush(&self, flags: u32) -> Result<(), PluginError>;
    /// Trim.
    fn trim(&self, count: u64, offset: u64, flags: u32) -> Result<(), PluginError>;
    /// Zero.
    fn zero(&self, count: u64, offset: u64, flags: u32) -> Result<(), PluginError>;
    /// Extents as `(length, flags)` from `offset` on.
    fn extents(&self, count: u64, offset: u64, flags: u32) -> Result<Vec<(u64, u32)>, PluginError>;
    /// Cache.
    fn cache(&self, count: u64, offset: u64, flags: u32) -> Result<(), PluginError>;
    /// Lend `[offset, offset+count)` to `sink` (once, pieces in order);
    /// where the layer cannot lend, read into a buffer and lend that.
    fn pread_lend(&self, count: u64, offset: u64, flags: u32, sink: &mut LendReceiver<'_>) -> Result<(), PluginError>;
}

/// A [`NextOps`] table for one child of a filter, pointing at its target.
pub struct NextTable {
    ops: Box<NextOps>,
    // The table's ctx points into this box; keep it alive with the table.
    _target: Box<Arc<dyn NextTarget>>,
}

impl NextTable {
    /// A table whose calls go to `target`.
    pub fn new(target: Arc<dyn NextTarget>) -> NextTable {
        let target = Box::new(target);
        let ctx = &*target as *const Arc<dyn NextTarget> as *mut c_void;
        let ops = Box::new(NextOps {
            struct_size: std::mem::size_of::<NextOps>() as u32,
            ctx,
            get_size: next_get_size,
            block_size: next_block_size,
            can: next_can,
            pread: next_pread,
            pwrite: next_pwrite,
            flush: next_flush,
            trim: next_trim,
            zero: next_zero,
            extents: next_extents,
            cache: next_cache,
            pread_lend: Some(next_pread_lend),
        });
        NextTable { ops, _target: target }
    }
}

// SAFETY: the table's ctx points at an `Arc<dyn NextTarget>` (Send + Sync).
unsafe impl Send for NextTable {}
// SAFETY: as above.
unsafe impl Sync for NextTable {}

/// Run a NextOps call: no panic escapes, and a failure leaves its message
/// for whoever returns the errno to the host.
fn next_call(ctx: *mut c_void, f: impl FnOnce(&dyn NextTarget) -> Result<(), PluginError>) -> i32 {
    // SAFETY: `ctx` is the `Arc<dyn NextTarget>` owned by the NextTable the
    // filter was given, alive until the filter's handle is closed.
    let target = unsafe { &*(ctx as *const Arc<dyn NextTarget>) };
    match catch_unwind(AssertUnwindSafe(|| f(&**target))) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            LAST_ERROR.with(|m| *m.borrow_mut() = Some(e.message));
            e.errno.max(1)
        }
        Err(_) => {
            LAST_ERROR.with(|m| *m.borrow_mut() = Some("internal error in the layer below".into()));
            libc::EIO
        }
    }
}

unsafe extern "C" fn next_get_size(ctx: *mut c_void, out: *mut u64) -> i32 {
    next_call(ctx, |t| {
        let v = t.get_size()?;
        // SAFETY: valid out-pointer from the filter.
        unsafe { *out = v };
        Ok(())
    })
}

unsafe extern "C" fn next_block_size(ctx: *mut c_void, out: *mut BlockSize) -> i32 {
    next_call(ctx, |t| {
        let v = t.block_size()?;
        // SAFETY: valid out-pointer from the filter.
        unsafe { *out = v };
        Ok(())
    })
}

unsafe extern "C" fn next_can(ctx: *mut c_void, which: u32, out: *mut u32) -> i32 {
    next_call(ctx, |t| {
        let v = t.can(which)?;
        // SAFETY: valid out-pointer from the filter.
        unsafe { *out = v };
        Ok(())
    })
}

unsafe extern "C" fn next_pread(ctx: *mut c_void, buf: *mut u8, count: u64, offset: u64, flags: u32) -> i32 {
    next_call(ctx, |t| {
        // SAFETY: the filter passes a writable buffer of `count` bytes.
        let buf = unsafe { std::slice::from_raw_parts_mut(buf, count as usize) };
        t.pread(buf, offset, flags)
    })
}

unsafe extern "C" fn next_pwrite(ctx: *mut c_void, buf: *const u8, count: u64, offset: u64, flags: u32) -> i32 {
    next_call(ctx, |t| {
        // SAFETY: the filter passes a readable buffer of `count` bytes.
        let buf = unsafe { std::slice::from_raw_parts(buf, count as usize) };
        t.pwrite(buf, offset, flags)
    })
}

unsafe extern "C" fn next_flush(ctx: *mut c_void, flags: u32) -> i32 {
    next_call(ctx, |t| t.flush(flags))
}

unsafe extern "C" fn next_trim(ctx: *mut c_void, count: u64, offset: u64, flags: u32) -> i32 {
    next_call(ctx, |t| t.trim(count, offset, flags))
}

unsafe extern "C" fn next_zero(ctx: *mut c_void, count: u64, offset: u64, flags: u32) -> i32 {
    next_call(ctx, |t| t.zero(count, offset, flags))
}

unsafe extern "C" fn next_cache(ctx: *mut c_void, count: u64, offset: u64, flags: u32) -> i32 {
    next_call(ctx, |t| t.cache(count, offset, flags))
}

unsafe extern "C" fn next_extents(ctx: *mut c_void, count: u64, offset: u64, flags: u32, sink: *mut ExtentSink) -> i32 {
    next_call(ctx, |t| {
        let extents = t.extents(count, offset, flags)?;
        // SAFETY: the filter's sink is valid for the duration of the call.
        let sink = unsafe { &*sink };
        let mut pos = offset;
        for (len, f) in extents {
            // SAFETY: calling the filter's own sink with its own ctx.
            let rc = unsafe { (sink.add)(sink.ctx, pos, len, f) };
            if rc != 0 {
                return Err(PluginError { errno: rc.max(1), message: "extent refused by the filter".into() });
            }
            pos += len;
        }
        Ok(())
    })
}

unsafe extern "C" fn next_pread_lend(
    ctx: *mut c_void,
    count: u64,
    offset: u64,
    flags: u32,
    sink: abi::LendSink,
    sink_ctx: *mut c_void,
) -> i32 {
    let mut calls = 0u32;
    let mut failed = None;
    let rc = next_call(ctx, |t| {
        t.pread_lend(count, offset, flags, &mut |pieces: &[&[u8]]| {
            calls += 1;
            let raw = raw_pieces(pieces);
            // SAFETY: the filter's sink with its own context, given pieces
            // that stay valid and unchanged for the call (the layer below
            // keeps them so until this closure returns).
            match unsafe { sink(sink_ctx, raw.as_ptr(), raw.len()) } {
                0 => Ok(()),
                errno => {
                    failed = Some(errno.max(1));
                    Err(errno.max(1))
                }
            }
        })
    });
    // What the filter's sink returned goes back to it unchanged (the
    // filter knows why it failed; our message would only say "below").
    match failed {
        Some(errno) => errno,
        None if rc == 0 && calls != 1 => {
            LAST_ERROR.with(|m| *m.borrow_mut() = Some(format!("the layer below lent {calls} times instead of once")));
            libc::EIO
        }
        None => rc,
    }
}

struct LendCtx<'a> {
    sink: &'a mut LendReceiver<'a>,
    total: u64,
    calls: u32,
}

/// The host's `LendSink`: hands the plugin's pieces to the closure in
/// `LendCtx`. Refuses a second call (the contract is exactly one).
unsafe extern "C" fn lend_sink(ctx: *mut c_void, pieces: *const abi::LendPiece, n: usize) -> i32 {
    // SAFETY: `ctx` is the `LendCtx` that `PluginHandle::pread_lend` passed
    // for this call, alive and not otherwise borrowed while the plugin runs.
    let ctx = unsafe { &mut *(ctx as *mut LendCtx<'_>) };
    ctx.calls += 1;
    // SAFETY: the plugin guarantees its `n` pieces readable and unchanged
    // until this function returns.
    let slices = match unsafe { lent_slices(pieces, n) } {
        Some(slices) if ctx.calls == 1 => slices,
        _ => return libc::EIO,
    };
    ctx.total = slices.iter().map(|s| s.len() as u64).sum();
    // A panic in the host's own closure must not unwind into the plugin.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (ctx.sink)(&slices))) {
        Ok(Ok(())) => 0,
        Ok(Err(errno)) => errno.max(1),
        Err(_) => libc::EIO,
    }
}

struct LendMutCtx<'a> {
    sink: &'a mut LendFiller<'a>,
    count: u64,
    calls: u32,
    /// Why the plugin's pieces were refused unfilled.
    refused: Option<String>,
    /// The filler failed: the pieces may not hold the data.
    sink_failed: bool,
}

/// The host's `LendSinkMut`: checks the plugin's pieces (one call, exactly
/// the requested length, no null data) and hands them to the filler in
/// `LendMutCtx`. Pieces that fail the checks are not written to at all.
unsafe extern "C" fn lend_sink_mut(ctx: *mut c_void, pieces: *const abi::LendPieceMut, n: usize) -> i32 {
    // SAFETY: `ctx` is the `LendMutCtx` that `PluginHandle::pwrite_lend`
    // passed for this call, alive and not otherwise borrowed while the
    // plugin runs.
    let ctx = unsafe { &mut *(ctx as *mut LendMutCtx<'_>) };
    ctx.calls += 1;
    if ctx.calls > 1 {
        ctx.refused.get_or_insert_with(|| "called its sink twice".into());
        return libc::EIO;
    }
    if n > 0 && pieces.is_null() {
        ctx.refused = Some("passed a null piece list".into());
        return libc::EIO;
    }
    let raw: &[abi::LendPieceMut] = if n == 0 {
        &[]
    } else {
        // SAFETY: the plugin passes `n` pieces at `pieces` (checked non-null).
        unsafe { std::slice::from_raw_parts(pieces, n) }
    };
    let total = raw.iter().fold(0u64, |t, p| t.saturating_add(p.len));
    if total != ctx.count || raw.iter().any(|p| p.len > 0 && p.data.is_null()) {
        ctx.refused = Some(format!("lent {total} bytes in {n} pieces for a write of {}", ctx.count));
        return libc::EIO;
    }
    let mut slices: Vec<&mut [u8]> = Vec::with_capacity(raw.len());
    for p in raw.iter().filter(|p| p.len > 0) {
        // SAFETY: the plugin guarantees each piece writable and reserved
        // for us until this function returns; the pieces do not overlap
        // (each is a distinct part of the range being written).
        slices.push(unsafe { std::slice::from_raw_parts_mut(p.data, p.len as usize) });
    }
    // A panic in the host's own closure must not unwind into the plugin.
    let r = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (ctx.sink)(&mut slices))) {
        Ok(Ok(())) => 0,
        Ok(Err(errno)) => errno.max(1),
        Err(_) => libc::EIO,
    };
    ctx.sink_failed = r != 0;
    r
}

fn absent(what: &str, errno: i32) -> PluginError {
    PluginError { errno, message: format!("plugin has no {what} operation") }
}

/// Candidate file names for a plugin called `name` in a directory: `NAME.so`
/// (hand-built or C plugins) and what cargo names a crate
/// `nbdhost-plugin-NAME` (`libnbdhost_plugin_NAME.so`).
pub fn candidate_files(name: &str) -> [String; 2] {
    [format!("{name}.so"), format!("libnbdhost_plugin_{}.so", name.replace('-', "_"))]
}

/// Finds and caches plugins by name in an ordered list of directories.
pub struct PluginDirectory {
    dirs: Vec<PathBuf>,
    debug: Vec<String>,
    loaded: std::sync::Mutex<std::collections::HashMap<String, Arc<LoadedPlugin>>>,
}

impl PluginDirectory {
    /// Search `dirs` in order; plugins named in `debug` get debug output.
    pub fn new(dirs: Vec<PathBuf>, debug: Vec<String>) -> Self {
        PluginDirectory { dirs, debug, loaded: Default::default() }
    }

    /// The directories searched.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Find and load (once) the plugin called `name`.
    pub fn get(&self, name: &str) -> Result<Arc<LoadedPlugin>, LoadError> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(LoadError(format!("`{name}` is not a valid plugin name (letters, digits, `-`, `_`)")));
        }
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = loaded.get(name) {
            return Ok(p.clone());
        }
        let files = candidate_files(name);
        let path =
            self.dirs.iter().flat_map(|d| files.iter().map(move |f| d.join(f))).find(|p| p.exists()).ok_or_else(
                || {
                    let dirs: Vec<String> = self.dirs.iter().map(|d| d.display().to_string()).collect();
                    LoadError(format!(
                        "plugin `{name}` not found: looked for {} in {}",
                        files.join(" and "),
                        if dirs.is_empty() { "no plugin directory".to_string() } else { dirs.join(", ") }
                    ))
                },
            )?;
        let p = LoadedPlugin::load(&path, self.debug.iter().any(|d| d == name))?;
        loaded.insert(name.to_string(), p.clone());
        Ok(p)
    }
}
