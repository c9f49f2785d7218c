//! Services the host offers to a Rust plugin: logging attributed to the
//! plugin and its debug flag. (Error messages for the client are set by
//! returning an [`crate::Error`].)

use crate::abi::{self, HostApi};
use std::sync::atomic::{AtomicPtr, Ordering};

static HOST: AtomicPtr<HostApi> = AtomicPtr::new(std::ptr::null_mut());

/// Record the host table (done by the entry point).
pub(crate) fn install(host: *const HostApi) {
    HOST.store(host as *mut HostApi, Ordering::Release);
}

/// The host's table, if the plugin has been loaded by a host. Fields past
/// the host's `struct_size` read as absent.
fn with_host<R>(f: impl FnOnce(&HostApi) -> Option<R>) -> Option<R> {
    let p = HOST.load(Ordering::Acquire);
    if p.is_null() {
        return None;
    }
    // SAFETY: the pointer was given by the host at entry and stays valid
    // while the library is loaded; the copy below reads only the bytes the
    // host declared in `struct_size`.
    let table = unsafe { crate::__private::copy_prefix::<HostApi>(p, (*p).struct_size) };
    f(&table)
}

/// Log a message at `level` (one of `abi::LOG_*`), attributed to this plugin.
pub fn log(level: u32, msg: &str) {
    let done = with_host(|h| {
        let f = h.log?;
        // SAFETY: host callback with its own ctx and a valid UTF-8 slice.
        unsafe { f(h.ctx, level, msg.as_ptr(), msg.len()) };
        Some(())
    });
    if done.is_none() {
        eprintln!("{msg}");
    }
}

/// Log an error.
pub fn error(msg: &str) {
    log(abi::LOG_ERROR, msg)
}
/// Log a warning.
pub fn warn(msg: &str) {
    log(abi::LOG_WARN, msg)
}
/// Log an informational message.
pub fn info(msg: &str) {
    log(abi::LOG_INFO, msg)
}
/// Log a debug message (only when [`debug_enabled`]).
pub fn debug(msg: &str) {
    if debug_enabled() {
        log(abi::LOG_DEBUG, msg)
    }
}

/// Whether the operator turned on debug output for this plugin.
pub fn debug_enabled() -> bool {
    with_host(|h| {
        let f = h.debug_enabled?;
        // SAFETY: host callback with its own ctx.
        Some(unsafe { f(h.ctx) } != 0)
    })
    .unwrap_or(false)
}

/// Whether the host only checks the configuration (`nbdhost --check`, ABI
/// 1.4): `create` should then validate what it can and change nothing,
/// e.g. not create the files it would create to serve. False in older
/// hosts, which do not say.
pub fn checking_only() -> bool {
    with_host(|h| {
        let f = h.checking_only?;
        // SAFETY: host callback with its own ctx.
        Some(unsafe { f(h.ctx) } != 0)
    })
    .unwrap_or(false)
}

/// For [`checking_only`]: whether serving could create `path`, i.e. its
/// directory exists. The error names both.
pub fn check_can_create(path: &std::path::Path) -> crate::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    if dir.is_dir() {
        return Ok(());
    }
    Err(crate::Error::invalid(format!("cannot create {}: {} is not a directory", path.display(), dir.display())))
}

/// The message of the last failed call to the layer below a filter, on
/// this thread (see [`crate::Next`]).
pub fn last_error() -> Option<String> {
    with_host(|h| {
        let f = h.last_error?;
        let mut buf = vec![0u8; 512];
        // SAFETY: host callback with its own ctx and a writable buffer.
        let n = unsafe { f(h.ctx, buf.as_mut_ptr(), buf.len()) };
        if n == 0 {
            return None;
        }
        if n > buf.len() {
            buf.resize(n, 0);
            // SAFETY: as above, with room for the whole message.
            unsafe { f(h.ctx, buf.as_mut_ptr(), buf.len()) };
        }
        buf.truncate(n);
        Some(String::from_utf8_lossy(&buf).into_owned())
    })
}

/// Attach `msg` to the error the current callback returns.
pub(crate) fn set_error(msg: &str) {
    with_host(|h| {
        let f = h.set_error?;
        // SAFETY: host callback with its own ctx and a valid UTF-8 slice.
        unsafe { f(h.ctx, msg.as_ptr(), msg.len()) };
        Some(())
    });
}
