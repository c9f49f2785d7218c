//! # nbdhost plugin API
//!
//! Plugins for the nbdhost NBD server are shared objects loaded at run time.
//! The contract between host and plugin is the C ABI in [`abi`] (also
//! shipped as a C header, `include/nbdhost-plugin.h`); it is versioned and
//! size-prefixed so a plugin keeps working across host releases without
//! being rebuilt.
//!
//! Rust authors do not touch the C ABI directly: implement [`Backend`] for a
//! per-export type, [`Connection`] for its per-connection handle, and any of
//! the optional operation traits ([`Pwrite`], [`Flush`], [`Trim`], [`Zero`],
//! [`Extents`], [`Cache`]), then call [`export_backend!`]. The macro fills
//! exactly the callbacks the handle type implements and wraps each one so
//! that a panic becomes an `EIO` for that request instead of unwinding into
//! the host. A filter implements [`Filter`] and [`FilterConnection`] and
//! calls [`export_filter!`].
//!
//! A complete backend (build it as a `cdylib`):
//!
//! ```
//! use nbdhost_plugin_api::abi::ParamSpec;
//! use nbdhost_plugin_api::{export_backend, param, Backend, Connection, Flags, OpenContext, ParamKind, Params, Result};
//! use std::ffi::CStr;
//!
//! /// A disk that reads as zeros.
//! pub struct Zeros(u64);
//!
//! impl Backend for Zeros {
//!     type Handle = Zeros;
//!     const NAME: &'static CStr = c"zeros";
//!     const VERSION: &'static CStr = c"1.0";
//!     const DESCRIPTION: &'static CStr = c"a disk of zeros";
//!     const PARAMS: &'static [ParamSpec] = &[param(c"size", ParamKind::Size, false, Some(c"1M"), c"disk size")];
//!
//!     fn create(params: &Params) -> Result<Self> {
//!         Ok(Zeros(params.size("size")?.unwrap_or(1 << 20)))
//!     }
//!     fn open(&self, _ctx: &OpenContext) -> Result<Zeros> {
//!         Ok(Zeros(self.0))
//!     }
//! }
//!
//! impl Connection for Zeros {
//!     fn get_size(&self) -> Result<u64> {
//!         Ok(self.0)
//!     }
//!     fn pread(&self, buf: &mut [u8], _offset: u64, _flags: Flags) -> Result<()> {
//!         buf.fill(0);
//!         Ok(())
//!     }
//! }
//!
//! export_backend!(Zeros);
//! # fn main() {}
//! ```
//!
//! # Lifecycle
//!
//! The host loads a plugin once (calling its entry point), calls
//! [`Backend::create`] once per export that uses it with validated
//! parameters, [`Backend::open`] once per client connection (the handle is
//! dropped when the connection ends), and drops the per-export value after
//! its last handle, when the export goes away. Libraries are never
//! unloaded.
//!
//! # Errors and threads
//!
//! Operations return [`Result`]; an [`Error`] is an errno plus a message
//! that reaches the client (NBD structured error chunk) and the server log.
//! A panic fails only the request that panicked, with `EIO`. The host
//! enforces [`Backend::THREAD_MODEL`]; types must be `Send + Sync` whatever
//! the model.
//!
//! # More
//!
//! `docs/writing-plugins.md` in the nbdhost repository takes a new author
//! from `cargo new` to a served backend and filter, in Rust and in C;
//! `docs/plugin-abi.md` states what may change between ABI versions.

#![warn(missing_docs)]

pub mod abi;
mod error;
mod filter;
pub mod host;
mod pages;
/// Parameter declarations and value parsing shared by host and plugins.
pub mod params;
mod traits;

#[doc(hidden)]
pub mod __private;

pub use error::{Error, Result};
pub use filter::{
    lend_in_order, zero_pieces, Filter, FilterConnection, FilterLendRead, FilterLendWrite, LendSource, Next,
};
pub use pages::{cached_pages, drop_page_tables, pages_cached, ready_for_mapped_write, CachedPages};
pub use params::{param, ParamKind, Params};
pub use traits::{
    Backend, BlockSize, Cache, Connection, ExtentList, Extents, Flags, Flush, LendRead, LendWrite, OpenContext, Pwrite,
    Support, ThreadModel, Trim, Zero,
};

/// Export a [`Backend`] implementation as an nbdhost plugin.
///
/// Expands to the `nbdhost_plugin_entry` symbol. Only the optional
/// operations the backend's handle type implements are filled in; the host
/// falls back for the rest. Use it once per `cdylib`.
#[macro_export]
macro_rules! export_backend {
    ($backend:ty) => {
        /// The plugin's entry point, called once by the host at load.
        ///
        /// # Safety
        /// Called by the nbdhost loader with a valid host table.
        #[no_mangle]
        pub unsafe extern "C" fn nbdhost_plugin_entry(
            host: *const $crate::abi::HostApi,
        ) -> *const $crate::abi::PluginTable {
            #[allow(unused_imports)]
            use $crate::__private::probes::*;
            let probe = &$crate::__private::Probe::<$backend>::new();
            let ops = $crate::__private::OptionalOps {
                pwrite: probe.pwrite_fn(),
                flush: probe.flush_fn(),
                trim: probe.trim_fn(),
                zero: probe.zero_fn(),
                extents: probe.extents_fn(),
                cache: probe.cache_fn(),
                pread_lend: probe.pread_lend_fn(),
                pwrite_lend: probe.pwrite_lend_fn(),
            };
            // SAFETY: `host` comes from the nbdhost loader and lives as long
            // as this library stays loaded.
            unsafe { $crate::__private::entry::<$backend>(host, ops) }
        }
    };
}

/// Export a [`Filter`] implementation as an nbdhost filter plugin.
///
/// Expands to the `nbdhost_plugin_entry` symbol. Every callback is filled
/// in; the [`FilterConnection`] defaults pass calls through to the layer
/// below. `pread_lend` is filled in only if the handle type implements
/// [`FilterLendRead`], and `pwrite_lend` if it implements [`FilterLendWrite`]. Use it once per `cdylib`.
#[macro_export]
macro_rules! export_filter {
    ($filter:ty) => {
        /// The filter's entry point, called once by the host at load.
        ///
        /// # Safety
        /// Called by the nbdhost loader with a valid host table.
        #[no_mangle]
        pub unsafe extern "C" fn nbdhost_plugin_entry(
            host: *const $crate::abi::HostApi,
        ) -> *const $crate::abi::PluginTable {
            #[allow(unused_imports)]
            use $crate::__private::probes::*;
            let probe = &$crate::__private::Probe::<$filter>::new();
            let pread_lend = probe.filter_pread_lend_fn();
            let pwrite_lend = probe.filter_pwrite_lend_fn();
            // SAFETY: `host` comes from the nbdhost loader.
            unsafe { $crate::__private::filter_entry::<$filter>(host, pread_lend, pwrite_lend) }
        }
    };
}
