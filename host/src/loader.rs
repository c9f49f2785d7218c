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

use nbdhost_plugin_api::abi::{self, BlockSize, ExtentSink, HostApi, OpenInfo, Param, PluginTable};
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
        let level = match level {
            abi::LOG_ERROR => log::Level::Error,
            abi::LOG_WARN => log::Level::Warn,
            abi::LOG_INFO => log::Level::Info,
            _ => log::Level::Debug,
        };
        log::log!(target: "plugin", level, "[{}] {}", ctx.name, String::from_utf8_lossy(msg));
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
    table: PluginTable,
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
        if kind != abi::PLUGIN_KIND_BACKEND {
            return Err(LoadError(format!(
                "plugin {shown}: kind {kind} is not a backend (filters are loaded as filters)"
            )));
        }
        // SAFETY: the plugin declared `size` readable bytes; fields beyond
        // them stay zero (= absent), which is valid for every field type.
        let table = unsafe { nbdhost_plugin_api::__private::copy_prefix(table_ptr, size) };
        let thread_model = match table.thread_model {
            abi::THREAD_MODEL_SERIALIZE_CONNECTIONS => ThreadModel::SerializeConnections,
            abi::THREAD_MODEL_SERIALIZE_ALL_REQUESTS => ThreadModel::SerializeAllRequests,
            abi::THREAD_MODEL_SERIALIZE_REQUESTS => ThreadModel::SerializeRequests,
            abi::THREAD_MODEL_PARALLEL => ThreadModel::Parallel,
            // An unknown (future, less restrictive?) model: be safe.
            _ => ThreadModel::SerializeConnections,
        };
        let mut params = Vec::with_capacity(table.n_params);
        for i in 0..table.n_params {
            // SAFETY: `params` points to `n_params` entries ('static data).
            let p = unsafe { &*table.params.add(i) };
            let kind = match p.kind {
                abi::PARAM_INT => ParamKind::Int,
                abi::PARAM_SIZE => ParamKind::Size,
                abi::PARAM_BOOL => ParamKind::Bool,
                abi::PARAM_PATH => ParamKind::Path,
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
        if table.create.is_none() || table.open.is_none() || table.get_size.is_none() || table.pread.is_none() {
            return Err(LoadError(format!("plugin {shown}: a backend must provide create, open, get_size and pread")));
        }
        let name = cstr(table.name);
        ctx.name = if name.is_empty() { ctx.name.clone() } else { name.clone() };
        // Never unload (see module docs).
        std::mem::forget(lib);
        Ok(Arc::new(LoadedPlugin {
            name: ctx.name.clone(),
            version: cstr(table.version),
            description: cstr(table.description),
            path: path.to_path_buf(),
            abi: (major, minor),
            params,
            thread_model,
            table,
            _host: host,
        }))
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
        let create = self.table.create.expect("checked at load");
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
        if let Some(destroy) = self.plugin.table.destroy {
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
    /// The plugin behind this instance.
    pub fn plugin(&self) -> &Arc<LoadedPlugin> {
        &self.plugin
    }

    /// Open a per-connection handle.
    pub fn open(self: &Arc<Self>, req: &OpenRequest<'_>) -> Result<PluginHandle, PluginError> {
        let info = OpenInfo {
            struct_size: std::mem::size_of::<OpenInfo>() as u32,
            readonly: req.readonly as u32,
            export_name: req.export_name.as_ptr(),
            export_name_len: req.export_name.len(),
            peer: req.peer.as_ptr(),
            peer_len: req.peer.len(),
        };
        let open = self.plugin.table.open.expect("checked at load");
        let mut h: abi::Handle = std::ptr::null_mut();
        // SAFETY: live instance, `info` valid for the call, valid out-pointer.
        call(&self.plugin.name, "open", || unsafe { open(self.ptr, &info, &mut h) })?;
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
        if let Some(close) = self.inst.plugin.table.close {
            // SAFETY: handle from `open`, closed exactly once.
            unsafe { close(self.ptr) };
        }
    }
}

/// Which optional operations a plugin provides.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Provided {
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
}

macro_rules! can_query {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        /// `None` when the plugin has no such query.
        pub fn $name(&self) -> Result<Option<u32>, PluginError> {
            let Some(f) = self.table().$name else { return Ok(None) };
            let mut out = 0u32;
            // SAFETY: live handle and valid out-pointer.
            self.call(stringify!($name), || unsafe { f(self.ptr, &mut out) })?;
            Ok(Some(out))
        }
    };
}

impl PluginHandle {
    fn table(&self) -> &PluginTable {
        &self.inst.plugin.table
    }
    fn call(&self, what: &str, f: impl FnOnce() -> i32) -> Result<(), PluginError> {
        call(&self.inst.plugin.name, what, f)
    }

    /// The plugin this handle belongs to.
    pub fn plugin(&self) -> &Arc<LoadedPlugin> {
        &self.inst.plugin
    }

    /// Optional operations present in the table.
    pub fn provided(&self) -> Provided {
        let t = self.table();
        Provided {
            pwrite: t.pwrite.is_some(),
            flush: t.flush.is_some(),
            trim: t.trim.is_some(),
            zero: t.zero.is_some(),
            extents: t.extents.is_some(),
            cache: t.cache.is_some(),
        }
    }

    /// Export size.
    pub fn get_size(&self) -> Result<u64, PluginError> {
        let f = self.table().get_size.expect("checked at load");
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

    can_query!(
        /// Raw `can_write` answer.
        can_write
    );
    can_query!(
        /// Raw `can_flush` answer.
        can_flush
    );
    can_query!(
        /// Raw `is_rotational` answer.
        is_rotational
    );
    can_query!(
        /// Raw `can_trim` answer.
        can_trim
    );
    can_query!(
        /// Raw `can_zero` answer.
        can_zero
    );
    can_query!(
        /// Raw `can_fast_zero` answer.
        can_fast_zero
    );
    can_query!(
        /// Raw `can_fua` answer (`SUPPORT_*`).
        can_fua
    );
    can_query!(
        /// Raw `can_multi_conn` answer.
        can_multi_conn
    );
    can_query!(
        /// Raw `can_extents` answer.
        can_extents
    );
    can_query!(
        /// Raw `can_cache` answer (`SUPPORT_*`).
        can_cache
    );

    /// Read into `buf`.
    pub fn pread(&self, buf: &mut [u8], offset: u64, flags: u32) -> Result<(), PluginError> {
        let f = self.table().pread.expect("checked at load");
        // SAFETY: `buf` is writable for its length during the call.
        self.call("pread", || unsafe { f(self.ptr, buf.as_mut_ptr(), buf.len() as u64, offset, flags) })
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
