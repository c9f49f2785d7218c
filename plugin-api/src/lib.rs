//! # nbdhost plugin API
//!
//! Plugins for the nbdhost NBD server are shared objects loaded at run time.
//! The contract between host and plugin is the C ABI in [`abi`]; it is
//! versioned and size-prefixed so a plugin keeps working across host releases
//! without being rebuilt.
//!
//! Rust authors do not touch the C ABI directly: implement [`Backend`] for a
//! per-export type, [`Connection`] for its per-connection handle, and any of
//! the optional operation traits ([`Pwrite`], [`Flush`], [`Trim`], [`Zero`],
//! [`Extents`], [`Cache`]), then call [`export_backend!`]. The macro fills
//! exactly the callbacks the handle type implements and wraps each one so
//! that a panic becomes an `EIO` for that request instead of unwinding into
//! the host.
//!
//! ```text
//! struct Zeros { size: u64 }
//! impl Backend for Zeros { ... }
//! nbdhost_plugin_api::export_backend!(Zeros);
//! ```

#![warn(missing_docs)]

pub mod abi;
mod error;
mod filter;
pub mod host;
/// Parameter declarations and value parsing shared by host and plugins.
pub mod params;
mod traits;

#[doc(hidden)]
pub mod __private;

pub use error::{Error, Result};
pub use filter::{Filter, FilterConnection, Next};
pub use params::{param, ParamKind, Params};
pub use traits::{
    Backend, BlockSize, Cache, Connection, ExtentList, Extents, Flags, Flush, OpenContext, Pwrite, Support,
    ThreadModel, Trim, Zero,
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
/// below. Use it once per `cdylib`.
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
            // SAFETY: `host` comes from the nbdhost loader.
            unsafe { $crate::__private::filter_entry::<$filter>(host) }
        }
    };
}
