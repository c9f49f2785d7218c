//! The canonical, C-compatible plugin ABI (version 1).
//!
//! Everything in this module is `#[repr(C)]` and is the contract between the
//! host and a plugin shared object. A plugin exports exactly one symbol,
//! [`ENTRY_POINT`], of type [`EntryPoint`]. The host calls it once with a
//! [`HostApi`] table and receives a [`PluginTable`] (or a [`FilterTable`]).
//!
//! The same definitions exist in C in `include/nbdhost-plugin.h` (struct
//! `nbdhost_host_api`, `nbdhost_plugin_table`, ..., constants prefixed with
//! `NBDHOST_`); `tests/c_header.rs` compiles the header and checks every
//! size, offset and constant against this module. `docs/plugin-abi.md`
//! expands on the rules below, with the tests that hold the host to them.
//!
//! # Compatibility rules (what may change between versions)
//!
//! * Both tables start with `abi_major`, `abi_minor` and `struct_size`. The
//!   reader copies `min(own size, peer's struct_size)` bytes and treats every
//!   field past that as absent (`None` / zero).
//! * A **minor** version only *appends* fields at the end of a table. An
//!   appended callback is always an `Option<fn>`, and absent means
//!   "unsupported": the host falls back (FUA is emulated with flush, zero with
//!   write, cache with read or nothing, capabilities are derived from which
//!   callbacks exist). So a plugin built for 1.0 loads in a 1.7 host, and a
//!   plugin built for 1.7 loads in a 1.0 host, which ignores the extra fields.
//! * Fields are never removed, reordered, retyped or given a new meaning
//!   within a major version. Flag bits are only ever added; a plugin must
//!   reject nothing because of flag bits it does not know *on capability
//!   queries*, and the host only passes operation flags the plugin declared it
//!   understands (via its capabilities).
//! * A change to any existing field is a new **major** version, and a host
//!   refuses a plugin whose major differs from its own with a clear message.
//!
//! # Conventions
//! * Every callback returns `i32`: `0` for success or a positive POSIX
//!   `errno` value (`EIO`, `ENOSPC`, ...). A human-readable message for the
//!   client may be set beforehand with [`HostApi::set_error`].
//! * Strings in tables are NUL-terminated UTF-8. Data buffers are pointer +
//!   length.
//! * Capability queries write their answer to an out-parameter.
//! * Panics and C++ exceptions must never unwind through these functions; the
//!   Rust export macro catches them and returns `EIO`.

use core::ffi::{c_char, c_void};

/// Major version: bumped only for incompatible changes.
pub const ABI_MAJOR: u16 = 1;
/// Minor version: bumped when fields are appended to a table.
///
/// * 1.0: the first table.
/// * 1.1: `PluginTable::pread_lend`.
/// * 1.2: `PluginTable::pwrite_lend`.
/// * 1.3: `FilterTable::pread_lend` and `NextOps::pread_lend`.
/// * 1.4: `HostApi::checking_only`.
/// * 1.5: `pwrite_lend` may decline (`ENOTSUP` before its sink) and gets
///   [`FLAG_KERNEL_FILL`]; `FilterTable::pwrite_lend`. The plugin-api
///   offers `pwrite_lend` only to hosts of 1.5 or later, which honour the
///   decline.
pub const ABI_MINOR: u16 = 5;

/// Name of the single symbol a plugin exports (without the trailing NUL).
pub const ENTRY_POINT: &str = "nbdhost_plugin_entry";
/// Same as [`ENTRY_POINT`], NUL-terminated, for `dlsym`.
pub const ENTRY_POINT_CSTR: &[u8] = b"nbdhost_plugin_entry\0";

/// The entry point's type. `host` stays valid for as long as the plugin is
/// loaded; the returned table must also stay valid (normally a `static`).
/// Returning NULL refuses the load. The table is a [`PluginTable`] or a
/// [`FilterTable`]; both begin with the same header (major, minor, size,
/// kind), and `kind` says which it is.
pub type EntryPoint = unsafe extern "C" fn(host: *const HostApi) -> *const PluginTable;

/// What a table describes.
pub const PLUGIN_KIND_BACKEND: u32 = 1;
/// A filter: a layer with one or more layers below it, reached through
/// [`NextOps`] tables. Its entry point returns a [`FilterTable`].
pub const PLUGIN_KIND_FILTER: u32 = 2;

/// Thread models, from most to least restrictive. The host serialises calls
/// accordingly; the most restrictive layer of a pipeline wins.
pub const THREAD_MODEL_SERIALIZE_CONNECTIONS: u32 = 0;
/// One request at a time across all connections of the export.
pub const THREAD_MODEL_SERIALIZE_ALL_REQUESTS: u32 = 1;
/// One request at a time per connection; connections run in parallel.
pub const THREAD_MODEL_SERIALIZE_REQUESTS: u32 = 2;
/// Any number of concurrent calls, on any handles.
pub const THREAD_MODEL_PARALLEL: u32 = 3;

/// Log levels for [`HostApi::log`].
pub const LOG_ERROR: u32 = 1;
/// Warning.
pub const LOG_WARN: u32 = 2;
/// Informational.
pub const LOG_INFO: u32 = 3;
/// Debug (shown when the plugin's debug flag or the host's level allows).
pub const LOG_DEBUG: u32 = 4;

/// Operation flag: force unit access — the data must be durable on return.
pub const FLAG_FUA: u32 = 1 << 0;
/// `zero`: the plugin may deallocate (punch a hole) instead of writing zeros.
pub const FLAG_MAY_TRIM: u32 = 1 << 1;
/// `zero`: fail at once with `ENOTSUP` unless zeroing is fast.
pub const FLAG_FAST_ZERO: u32 = 1 << 2;
/// `extents`: only the first extent is needed.
pub const FLAG_REQ_ONE: u32 = 1 << 3;
/// `pwrite_lend` (ABI 1.5): the host fills this call's pieces only through
/// the kernel (socket reads, `process_vm_writev`), so a piece that faults
/// (a file mapping past a shrunk file's end, or a hole the filesystem has
/// no room to allocate) fails this write with `EIO` instead of killing
/// the server. Without it the host may copy with ordinary stores: lend
/// only memory that cannot fault, or decline.
pub const FLAG_KERNEL_FILL: u32 = 1 << 4;

/// Extent flag: not allocated.
pub const EXTENT_HOLE: u32 = 1 << 0;
/// Extent flag: reads as zeros.
pub const EXTENT_ZERO: u32 = 1 << 1;

/// `can_fua` / `can_cache` answers.
pub const SUPPORT_NONE: u32 = 0;
/// The host emulates (FUA with flush, cache with read).
pub const SUPPORT_EMULATE: u32 = 1;
/// The plugin handles the flag or operation itself.
pub const SUPPORT_NATIVE: u32 = 2;

/// Parameter types a plugin can declare. The host validates and normalises
/// values before `create` sees them (sizes become decimal byte counts,
/// booleans `true`/`false`, paths absolute).
pub const PARAM_STRING: u32 = 0;
/// Signed 64-bit decimal integer.
pub const PARAM_INT: u32 = 1;
/// Byte size, with optional K/M/G/T/P suffix (powers of 1024).
pub const PARAM_SIZE: u32 = 2;
/// Boolean.
pub const PARAM_BOOL: u32 = 3;
/// Filesystem path; relative paths are resolved against the directory of
/// the config snippet that names them.
pub const PARAM_PATH: u32 = 4;
/// A list of paths (a TOML array of strings, or one comma-separated
/// string), resolved like [`PARAM_PATH`]; the plugin receives them joined by
/// newlines. A host that predates this kind passes the value unchanged.
pub const PARAM_PATH_LIST: u32 = 5;

/// Services the host offers to a plugin. Each loaded plugin gets its own
/// table, so `ctx` identifies the plugin (e.g. for log prefixes).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct HostApi {
    /// Host's [`ABI_MAJOR`].
    pub abi_major: u16,
    /// Host's [`ABI_MINOR`].
    pub abi_minor: u16,
    /// `size_of::<HostApi>()` as the host compiled it.
    pub struct_size: u32,
    /// Opaque; pass back to every host callback.
    pub ctx: *mut c_void,
    /// Write a log line attributed to this plugin. `msg` is UTF-8, not
    /// NUL-terminated.
    pub log: Option<unsafe extern "C" fn(ctx: *mut c_void, level: u32, msg: *const u8, len: usize)>,
    /// Attach a message to the error the *current* callback is about to
    /// return on this thread. It reaches the client in a structured error
    /// chunk. Ignored if the callback then returns 0.
    pub set_error: Option<unsafe extern "C" fn(ctx: *mut c_void, msg: *const u8, len: usize)>,
    /// Non-zero if debug messages of this plugin are wanted.
    pub debug_enabled: Option<unsafe extern "C" fn(ctx: *mut c_void) -> u32>,
    /// The message of the last failed [`NextOps`] call on this thread:
    /// copies up to `cap` bytes (UTF-8) into `buf` and returns the full
    /// length (0: none).
    pub last_error: Option<unsafe extern "C" fn(ctx: *mut c_void, buf: *mut u8, cap: usize) -> usize>,
    /// (ABI 1.4; absent in older hosts' tables) Non-zero while the host
    /// only checks the configuration (`nbdhost --check`): `create` should
    /// validate its parameters and what they name, and change nothing
    /// (create no file, write nothing). The instance is destroyed unused.
    pub checking_only: Option<unsafe extern "C" fn(ctx: *mut c_void) -> u32>,
}

/// One declared parameter of a plugin.
#[repr(C)]
pub struct ParamSpec {
    /// Parameter name as written in a config snippet.
    pub name: *const c_char,
    /// One of the `PARAM_*` constants.
    pub kind: u32,
    /// Non-zero if the snippet must set it.
    pub required: u32,
    /// Default value (NULL for none), in the same syntax as a snippet value.
    pub default_value: *const c_char,
    /// One-line help text.
    pub help: *const c_char,
}

/// A validated `key = value` pair handed to `create`.
#[repr(C)]
pub struct Param {
    /// Parameter name, NUL-terminated.
    pub key: *const c_char,
    /// Normalised value, NUL-terminated.
    pub value: *const c_char,
}

/// Per-connection facts passed to `open`.
#[repr(C)]
pub struct OpenInfo {
    /// `size_of::<OpenInfo>()` as the host compiled it; fields past it are
    /// absent.
    pub struct_size: u32,
    /// Non-zero if the export is read-only for this connection.
    pub readonly: u32,
    /// Export name the client chose (UTF-8).
    pub export_name: *const u8,
    /// Length of `export_name`.
    pub export_name_len: usize,
    /// Peer address as text (`127.0.0.1:51234`, `unix`).
    pub peer: *const u8,
    /// Length of `peer`.
    pub peer_len: usize,
}

/// Block-size constraints of a handle (all zero: no constraints).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct BlockSize {
    /// Minimum block size: power of two, 1..=65536.
    pub minimum: u32,
    /// Preferred block size: power of two, >= max(minimum, 512).
    pub preferred: u32,
    /// Maximum payload of one request, >= preferred.
    pub maximum: u32,
}

/// Where `extents` reports what it found. Provided by the host.
#[repr(C)]
pub struct ExtentSink {
    /// Opaque host state.
    pub ctx: *mut c_void,
    /// Append one extent. Extents must be contiguous and ascending, starting
    /// at the requested offset; returns non-zero (an errno) if the extent is
    /// refused, in which case the plugin should stop and return that value.
    pub add: unsafe extern "C" fn(ctx: *mut c_void, offset: u64, length: u64, flags: u32) -> i32,
}

/// Opaque per-export plugin state returned by `create`.
pub type Instance = *mut c_void;
/// Opaque per-connection plugin state returned by `open`.
pub type Handle = *mut c_void;

/// Capability query: writes the answer to `*out`.
pub type CanFn = unsafe extern "C" fn(h: Handle, out: *mut u32) -> i32;

/// The table a backend plugin's entry point returns (ABI 1.2 layout).
#[repr(C)]
pub struct PluginTable {
    /// Plugin's [`ABI_MAJOR`].
    pub abi_major: u16,
    /// Plugin's [`ABI_MINOR`].
    pub abi_minor: u16,
    /// `size_of::<PluginTable>()` as the plugin compiled it.
    pub struct_size: u32,
    /// [`PLUGIN_KIND_BACKEND`] (filters use a separate table).
    pub kind: u32,
    /// One of the `THREAD_MODEL_*` constants.
    pub thread_model: u32,
    /// Short name (`memory`).
    pub name: *const c_char,
    /// Plugin's own version string.
    pub version: *const c_char,
    /// One-line description.
    pub description: *const c_char,
    /// Declared parameters (may be NULL when `n_params` is 0).
    pub params: *const ParamSpec,
    /// Number of entries in `params`.
    pub n_params: usize,

    /// Create the per-export state from validated parameters.
    pub create: Option<unsafe extern "C" fn(params: *const Param, n: usize, out: *mut Instance) -> i32>,
    /// Destroy the per-export state (after every handle is closed).
    pub destroy: Option<unsafe extern "C" fn(inst: Instance)>,
    /// Open a per-connection handle.
    pub open: Option<unsafe extern "C" fn(inst: Instance, info: *const OpenInfo, out: *mut Handle) -> i32>,
    /// Close a handle.
    pub close: Option<unsafe extern "C" fn(h: Handle)>,

    /// Size of the export in bytes.
    pub get_size: Option<unsafe extern "C" fn(h: Handle, out: *mut u64) -> i32>,
    /// Block-size constraints (absent: none).
    pub block_size: Option<unsafe extern "C" fn(h: Handle, out: *mut BlockSize) -> i32>,
    /// Writable? (absent: true if `pwrite` exists)
    pub can_write: Option<CanFn>,
    /// Flush supported? (absent: true if `flush` exists)
    pub can_flush: Option<CanFn>,
    /// Rotational media hint (absent: false).
    pub is_rotational: Option<CanFn>,
    /// Trim supported? (absent: true if `trim` exists)
    pub can_trim: Option<CanFn>,
    /// Zero supported natively? (absent: true if `zero` exists)
    pub can_zero: Option<CanFn>,
    /// Fast zero honoured? (absent: true if `zero` exists)
    pub can_fast_zero: Option<CanFn>,
    /// FUA support, `SUPPORT_*` (absent: EMULATE if `flush` exists).
    pub can_fua: Option<CanFn>,
    /// Safe for several connections (shared or no cache)? (absent: false)
    pub can_multi_conn: Option<CanFn>,
    /// Extents meaningful? (absent: true if `extents` exists)
    pub can_extents: Option<CanFn>,
    /// Cache support, `SUPPORT_*` (absent: NATIVE if `cache` exists, else NONE).
    pub can_cache: Option<CanFn>,

    /// Read `count` bytes at `offset` into `buf`. Flags: none defined.
    pub pread: Option<unsafe extern "C" fn(h: Handle, buf: *mut u8, count: u64, offset: u64, flags: u32) -> i32>,
    /// Write. Flags: [`FLAG_FUA`] (only if `can_fua` said NATIVE).
    pub pwrite: Option<unsafe extern "C" fn(h: Handle, buf: *const u8, count: u64, offset: u64, flags: u32) -> i32>,
    /// Make every completed write durable.
    pub flush: Option<unsafe extern "C" fn(h: Handle, flags: u32) -> i32>,
    /// Discard a range. Flags: [`FLAG_FUA`].
    pub trim: Option<unsafe extern "C" fn(h: Handle, count: u64, offset: u64, flags: u32) -> i32>,
    /// Write zeros. Flags: [`FLAG_FUA`], [`FLAG_MAY_TRIM`], [`FLAG_FAST_ZERO`].
    /// Return `ENOTSUP` to make the host fall back to writing zeros (or to
    /// fail a fast-zero request).
    pub zero: Option<unsafe extern "C" fn(h: Handle, count: u64, offset: u64, flags: u32) -> i32>,
    /// Report allocation of `[offset, offset+count)`. Flags: [`FLAG_REQ_ONE`].
    pub extents:
        Option<unsafe extern "C" fn(h: Handle, count: u64, offset: u64, flags: u32, sink: *mut ExtentSink) -> i32>,
    /// Advisory prefetch.
    pub cache: Option<unsafe extern "C" fn(h: Handle, count: u64, offset: u64, flags: u32) -> i32>,

    /// (ABI 1.1, optional) Lend `[offset, offset+count)` instead of copying
    /// it: call `sink(ctx, pieces, n)` exactly once, with pieces that cover
    /// the range in order, and return what it returned. The pieces must stay
    /// valid and unchanged until `sink` returns; the host sends them from
    /// there. On failure return an errno without calling `sink`; from ABI
    /// 1.3 on, `ENOTSUP` returned without calling `sink` declines (the host
    /// then reads the range with `pread`). The host still calls `pread`
    /// when lending does not suit it (TLS, small reads). It may be called
    /// again on the same thread while `sink` runs (a filter above lending
    /// several ranges in one reply).
    pub pread_lend: Option<
        unsafe extern "C" fn(h: Handle, count: u64, offset: u64, flags: u32, sink: LendSink, ctx: *mut c_void) -> i32,
    >,

    /// (ABI 1.2, optional) Write `[offset, offset+count)` by lending the
    /// memory it goes to: call `sink(ctx, pieces, n)` exactly once, with
    /// writable pieces that cover the range in order, and return what it
    /// returned. The host fills every byte of them with the write's data
    /// before `sink` returns 0; hold whatever locks keep the pieces yours
    /// (and keep readers out) until then. The host only calls it with data
    /// that has already arrived, so the wait is a copy, never the network,
    /// and it may split one client write into several calls. If `sink`
    /// fails the pieces may hold part of the data, as after a failed
    /// `pwrite`. On failure return an errno without calling `sink`; from
    /// ABI 1.5 on, `ENOTSUP` returned without calling `sink` declines (the
    /// host then receives the data into a buffer of its own and calls
    /// `pwrite`). Flags: [`FLAG_FUA`] (only if `can_fua` said NATIVE),
    /// [`FLAG_KERNEL_FILL`]. The host still calls `pwrite` where lending
    /// does not suit it (small or buffered writes).
    pub pwrite_lend: Option<
        unsafe extern "C" fn(
            h: Handle,
            count: u64,
            offset: u64,
            flags: u32,
            sink: LendSinkMut,
            ctx: *mut c_void,
        ) -> i32,
    >,
}

/// One lent piece of data: `len` bytes at `data`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct LendPiece {
    /// First byte.
    pub data: *const u8,
    /// Number of bytes.
    pub len: u64,
}

/// The host's receiver for lent data: `n` pieces at `pieces`. Returns 0, or
/// an errno that `pread_lend` must return unchanged.
pub type LendSink = unsafe extern "C" fn(ctx: *mut c_void, pieces: *const LendPiece, n: usize) -> i32;

/// One lent piece of memory for the host to fill (ABI 1.2): `len` bytes at
/// `data`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct LendPieceMut {
    /// First byte.
    pub data: *mut u8,
    /// Number of bytes.
    pub len: u64,
}

/// The host's filler for lent memory (ABI 1.2): `n` pieces at `pieces`.
/// Returns 0 once every byte is written, or an errno that `pwrite_lend`
/// must return unchanged.
pub type LendSinkMut = unsafe extern "C" fn(ctx: *mut c_void, pieces: *const LendPieceMut, n: usize) -> i32;

/// The layer below a filter, as the host offers it. Every call goes through
/// the host's checks for that layer (ranges, flags, capability emulation),
/// so a filter cannot corrupt the layer below by mistake. Valid from the
/// filter's `open` until its `close` returns. Callbacks follow the same
/// conventions as plugin callbacks (0 or an errno; on failure the host has
/// recorded a message, so returning the errno unchanged passes it on).
#[repr(C)]
pub struct NextOps {
    /// `size_of::<NextOps>()` as the host compiled it.
    pub struct_size: u32,
    /// Opaque; pass back to every callback.
    pub ctx: *mut c_void,
    /// Size of the layer below.
    pub get_size: unsafe extern "C" fn(ctx: *mut c_void, out: *mut u64) -> i32,
    /// Its block-size constraints (defaults filled in).
    pub block_size: unsafe extern "C" fn(ctx: *mut c_void, out: *mut BlockSize) -> i32,
    /// Capability query: `which` is one of the `CAN_*` constants; writes the
    /// same kind of answer the plugin callback of that name gives.
    pub can: unsafe extern "C" fn(ctx: *mut c_void, which: u32, out: *mut u32) -> i32,
    /// Read.
    pub pread: unsafe extern "C" fn(ctx: *mut c_void, buf: *mut u8, count: u64, offset: u64, flags: u32) -> i32,
    /// Write (flags: [`FLAG_FUA`]).
    pub pwrite: unsafe extern "C" fn(ctx: *mut c_void, buf: *const u8, count: u64, offset: u64, flags: u32) -> i32,
    /// Flush.
    pub flush: unsafe extern "C" fn(ctx: *mut c_void, flags: u32) -> i32,
    /// Trim (flags: [`FLAG_FUA`]).
    pub trim: unsafe extern "C" fn(ctx: *mut c_void, count: u64, offset: u64, flags: u32) -> i32,
    /// Zero (flags: [`FLAG_FUA`], [`FLAG_MAY_TRIM`], [`FLAG_FAST_ZERO`]).
    pub zero: unsafe extern "C" fn(ctx: *mut c_void, count: u64, offset: u64, flags: u32) -> i32,
    /// Extents (flags: [`FLAG_REQ_ONE`]).
    pub extents:
        unsafe extern "C" fn(ctx: *mut c_void, count: u64, offset: u64, flags: u32, sink: *mut ExtentSink) -> i32,
    /// Cache.
    pub cache: unsafe extern "C" fn(ctx: *mut c_void, count: u64, offset: u64, flags: u32) -> i32,
    /// (ABI 1.3; absent in a 1.2 host's table) Lend `[offset,
    /// offset+count)` of the layer below: the host calls `sink(sink_ctx,
    /// pieces, n)` exactly once with pieces that cover the range in order,
    /// valid and unchanged while it runs, and returns what it returned (or
    /// an errno without calling it: `ENOTSUP` if the layer below declined
    /// to lend this range, which a filter returns as its own decline). Where
    /// the layer below does not lend at all, the host reads into a buffer of
    /// its own and lends that. Calling it again from inside `sink` holds
    /// the first range below while the next is taken: only over a layer
    /// that nothing writes meanwhile (a read-only child, as `cow`'s).
    pub pread_lend: Option<
        unsafe extern "C" fn(
            ctx: *mut c_void,
            count: u64,
            offset: u64,
            flags: u32,
            sink: LendSink,
            sink_ctx: *mut c_void,
        ) -> i32,
    >,
}

/// `which` values for [`NextOps::can`], named after the plugin callbacks.
/// The answers are what a filter can count on from above the host's checks
/// for the layer below: FUA, zeroing and cache answer as supported when the
/// host emulates them. An unknown value fails with `EINVAL`; a filter
/// asking for a capability added in a later minor treats that as "no".
pub const CAN_WRITE: u32 = 1;
/// See [`CAN_WRITE`].
pub const CAN_FLUSH: u32 = 2;
/// See [`CAN_WRITE`].
pub const CAN_ROTATIONAL: u32 = 3;
/// See [`CAN_WRITE`].
pub const CAN_TRIM: u32 = 4;
/// See [`CAN_WRITE`]. Answers 1 whenever the layer below is writable: the
/// host's checks for that layer emulate zeroing with writes where it cannot
/// zero natively.
pub const CAN_ZERO: u32 = 5;
/// See [`CAN_WRITE`].
pub const CAN_FAST_ZERO: u32 = 6;
/// See [`CAN_WRITE`]; answers a `SUPPORT_*` value.
pub const CAN_FUA: u32 = 7;
/// See [`CAN_WRITE`].
pub const CAN_MULTI_CONN: u32 = 8;
/// See [`CAN_WRITE`].
pub const CAN_EXTENTS: u32 = 9;
/// See [`CAN_WRITE`]; answers a `SUPPORT_*` value.
pub const CAN_CACHE: u32 = 10;

/// The table a filter's entry point returns (ABI 1.3 layout). Callbacks
/// have the backend signatures; a filter reaches the layers below through
/// the [`NextOps`] it was given in `open` (and keeps them in its handle).
/// A callback the filter lacks passes the call through to its only child
/// (a filter with several children must implement what it supports).
#[repr(C)]
pub struct FilterTable {
    /// Plugin's [`ABI_MAJOR`].
    pub abi_major: u16,
    /// Plugin's [`ABI_MINOR`].
    pub abi_minor: u16,
    /// `size_of::<FilterTable>()` as the plugin compiled it.
    pub struct_size: u32,
    /// [`PLUGIN_KIND_FILTER`].
    pub kind: u32,
    /// One of the `THREAD_MODEL_*` constants (a filter may only make a
    /// pipeline's model more restrictive: the most restrictive layer wins).
    pub thread_model: u32,
    /// Short name (`cow`).
    pub name: *const c_char,
    /// Version string.
    pub version: *const c_char,
    /// One-line description.
    pub description: *const c_char,
    /// Declared parameters.
    pub params: *const ParamSpec,
    /// Number of entries in `params`.
    pub n_params: usize,
    /// Fewest layers below (1 for an ordinary filter).
    pub min_children: u32,
    /// Most layers below (1 for an ordinary filter; `u32::MAX`: no limit).
    pub max_children: u32,
    /// Non-zero: the layers below are opened read-only whatever the export
    /// says (copy-on-write never writes below itself).
    pub child_readonly: u32,

    /// Create the per-export state.
    pub create: Option<unsafe extern "C" fn(params: *const Param, n: usize, out: *mut Instance) -> i32>,
    /// Destroy it.
    pub destroy: Option<unsafe extern "C" fn(inst: Instance)>,
    /// Open a per-connection handle over `n` children (in snippet order).
    pub open: Option<
        unsafe extern "C" fn(
            inst: Instance,
            info: *const OpenInfo,
            children: *const *const NextOps,
            n: usize,
            out: *mut Handle,
        ) -> i32,
    >,
    /// Close a handle (the children stay valid until this returns).
    pub close: Option<unsafe extern "C" fn(h: Handle)>,

    /// As [`PluginTable::get_size`].
    pub get_size: Option<unsafe extern "C" fn(h: Handle, out: *mut u64) -> i32>,
    /// As [`PluginTable::block_size`].
    pub block_size: Option<unsafe extern "C" fn(h: Handle, out: *mut BlockSize) -> i32>,
    /// As [`PluginTable::can_write`].
    pub can_write: Option<CanFn>,
    /// As [`PluginTable::can_flush`].
    pub can_flush: Option<CanFn>,
    /// As [`PluginTable::is_rotational`].
    pub is_rotational: Option<CanFn>,
    /// As [`PluginTable::can_trim`].
    pub can_trim: Option<CanFn>,
    /// As [`PluginTable::can_zero`].
    pub can_zero: Option<CanFn>,
    /// As [`PluginTable::can_fast_zero`].
    pub can_fast_zero: Option<CanFn>,
    /// As [`PluginTable::can_fua`].
    pub can_fua: Option<CanFn>,
    /// As [`PluginTable::can_multi_conn`].
    pub can_multi_conn: Option<CanFn>,
    /// As [`PluginTable::can_extents`].
    pub can_extents: Option<CanFn>,
    /// As [`PluginTable::can_cache`].
    pub can_cache: Option<CanFn>,
    /// As [`PluginTable::pread`].
    pub pread: Option<unsafe extern "C" fn(h: Handle, buf: *mut u8, count: u64, offset: u64, flags: u32) -> i32>,
    /// As [`PluginTable::pwrite`].
    pub pwrite: Option<unsafe extern "C" fn(h: Handle, buf: *const u8, count: u64, offset: u64, flags: u32) -> i32>,
    /// As [`PluginTable::flush`].
    pub flush: Option<unsafe extern "C" fn(h: Handle, flags: u32) -> i32>,
    /// As [`PluginTable::trim`].
    pub trim: Option<unsafe extern "C" fn(h: Handle, count: u64, offset: u64, flags: u32) -> i32>,
    /// As [`PluginTable::zero`].
    pub zero: Option<unsafe extern "C" fn(h: Handle, count: u64, offset: u64, flags: u32) -> i32>,
    /// As [`PluginTable::extents`].
    pub extents:
        Option<unsafe extern "C" fn(h: Handle, count: u64, offset: u64, flags: u32, sink: *mut ExtentSink) -> i32>,
    /// As [`PluginTable::cache`].
    pub cache: Option<unsafe extern "C" fn(h: Handle, count: u64, offset: u64, flags: u32) -> i32>,

    /// (ABI 1.3, optional) As [`PluginTable::pread_lend`]: lend this
    /// layer's `[offset, offset+count)`, typically by passing lending on to
    /// the layer below with [`NextOps::pread_lend`] (shifting or narrowing
    /// the range) and adding pieces of the filter's own memory where it
    /// holds the data itself. `ENOTSUP` returned before the sink runs
    /// declines (pass on what `NextOps::pread_lend` returns and a decline
    /// below declines yours); the host then calls `pread`, which a filter
    /// with this callback must have. The host calls it only where every
    /// layer below the filter lends too; absent, the host calls `pread` (or,
    /// if the filter has no `pread` either, lends from the layer below
    /// directly, as it passes every absent callback through).
    pub pread_lend: Option<
        unsafe extern "C" fn(h: Handle, count: u64, offset: u64, flags: u32, sink: LendSink, ctx: *mut c_void) -> i32,
    >,

    /// (ABI 1.5, optional) As [`PluginTable::pwrite_lend`], for a filter
    /// that keeps written data in memory of its own (`cow`'s overlay): lend
    /// it, or decline with `ENOTSUP` before the sink runs (the host then
    /// calls `pwrite`). Nothing below the filter is involved.
    pub pwrite_lend: Option<
        unsafe extern "C" fn(
            h: Handle,
            count: u64,
            offset: u64,
            flags: u32,
            sink: LendSinkMut,
            ctx: *mut c_void,
        ) -> i32,
    >,
}

// SAFETY: the tables hold only pointers to immutable, 'static data (strings,
// parameter arrays) and function pointers, so sharing them between threads
// is sound.
unsafe impl Sync for PluginTable {}
// SAFETY: as above.
unsafe impl Sync for ParamSpec {}
// SAFETY: as above.
unsafe impl Sync for FilterTable {}
// SAFETY: `ctx` belongs to the host, whose callbacks are thread-safe; the
// pipeline's thread model decides how they may be called concurrently.
unsafe impl Send for NextOps {}
// SAFETY: as above.
unsafe impl Sync for NextOps {}
// SAFETY: `ctx` is only ever passed back to the host's own thread-safe
// callbacks.
unsafe impl Send for HostApi {}
// SAFETY: as above.
unsafe impl Sync for HostApi {}
