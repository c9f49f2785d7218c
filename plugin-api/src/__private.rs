//! Machinery behind [`crate::export_backend!`]. Not a stable interface.

use crate::abi::{self, BlockSize, ExtentSink, Handle, HostApi, Instance, OpenInfo, Param, PluginTable};
use crate::traits::*;
use crate::{Error, Params};
use std::ffi::CStr;
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

pub use crate::filter::filter_entry;

/// Copy the first `declared` bytes of a peer's table into a zeroed `T`:
/// fields the peer did not have read as zero / `None`.
///
/// # Safety
/// `src` must point to at least `declared` readable bytes, and an all-zero
/// `T` must be valid (true for ABI tables: integers, raw pointers and
/// `Option<fn>`).
pub unsafe fn copy_prefix<T>(src: *const T, declared: u32) -> T {
    let mut out = std::mem::MaybeUninit::<T>::zeroed();
    let n = (declared as usize).min(std::mem::size_of::<T>());
    // SAFETY: per the caller's contract, `n` bytes are readable at `src`, and
    // `out` has room for `size_of::<T>() >= n` bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(src as *const u8, out.as_mut_ptr() as *mut u8, n);
        out.assume_init()
    }
}

type PwriteFn = unsafe extern "C" fn(Handle, *const u8, u64, u64, u32) -> i32;
type FlushFn = unsafe extern "C" fn(Handle, u32) -> i32;
type RangeFn = unsafe extern "C" fn(Handle, u64, u64, u32) -> i32;
type ExtentsFn = unsafe extern "C" fn(Handle, u64, u64, u32, *mut ExtentSink) -> i32;
/// A `pread_lend` callback (backend or filter table).
pub type LendFn = unsafe extern "C" fn(Handle, u64, u64, u32, abi::LendSink, *mut std::ffi::c_void) -> i32;
/// A `pwrite_lend` callback (backend or filter table).
pub type LendMutFn = unsafe extern "C" fn(Handle, u64, u64, u32, abi::LendSinkMut, *mut std::ffi::c_void) -> i32;

/// The optional callbacks found by probing the handle type.
pub struct OptionalOps {
    /// [`Pwrite`]
    pub pwrite: Option<PwriteFn>,
    /// [`Flush`]
    pub flush: Option<FlushFn>,
    /// [`Trim`]
    pub trim: Option<RangeFn>,
    /// [`Zero`]
    pub zero: Option<RangeFn>,
    /// [`Extents`]
    pub extents: Option<ExtentsFn>,
    /// [`Cache`]
    pub cache: Option<RangeFn>,
    /// [`LendRead`]
    pub pread_lend: Option<LendFn>,
    /// [`LendWrite`]
    pub pwrite_lend: Option<LendMutFn>,
}

/// Autoref-specialisation probe: `(&Probe::<B>::new()).trim_fn()` resolves
/// to the `Some` implementation when `B::Handle: Trim` and to the `None`
/// fallback otherwise. Works because the macro names a concrete type.
pub struct Probe<B>(PhantomData<B>);
impl<B> Probe<B> {
    /// A probe for `B`.
    pub fn new() -> Self {
        Probe(PhantomData)
    }
}
impl<B> Default for Probe<B> {
    fn default() -> Self {
        Self::new()
    }
}

/// The probe traits; `use`d by the macro.
pub mod probes {
    use super::*;
    macro_rules! probe {
        ($has:ident, $no:ident, $method:ident, $tr:ident, $ty:ty, $shim:ident) => {
            /// Chosen when the handle implements the operation.
            pub trait $has {
                /// The callback.
                fn $method(&self) -> Option<$ty>;
            }
            impl<B: Backend> $has for Probe<B>
            where
                B::Handle: $tr,
            {
                fn $method(&self) -> Option<$ty> {
                    Some($shim::<B>)
                }
            }
            /// Fallback when it does not.
            pub trait $no {
                /// No callback.
                fn $method(&self) -> Option<$ty> {
                    None
                }
            }
            impl<B> $no for &Probe<B> {}
        };
    }
    probe!(HasPwrite, NoPwrite, pwrite_fn, Pwrite, PwriteFn, shim_pwrite);
    probe!(HasFlush, NoFlush, flush_fn, Flush, FlushFn, shim_flush);
    probe!(HasTrim, NoTrim, trim_fn, Trim, RangeFn, shim_trim);
    probe!(HasZero, NoZero, zero_fn, Zero, RangeFn, shim_zero);
    probe!(HasExtents, NoExtents, extents_fn, Extents, ExtentsFn, shim_extents);
    probe!(HasCache, NoCache, cache_fn, Cache, RangeFn, shim_cache);
    probe!(HasLendRead, NoLendRead, pread_lend_fn, LendRead, LendFn, shim_pread_lend);
    probe!(HasLendWrite, NoLendWrite, pwrite_lend_fn, LendWrite, LendMutFn, shim_pwrite_lend);

    /// Chosen when a filter's handle implements [`crate::FilterLendRead`].
    pub trait HasFilterLendRead {
        /// The callback.
        fn filter_pread_lend_fn(&self) -> Option<LendFn>;
    }
    impl<F: crate::Filter> HasFilterLendRead for Probe<F>
    where
        F::Handle: crate::FilterLendRead,
    {
        fn filter_pread_lend_fn(&self) -> Option<LendFn> {
            Some(crate::filter::f_pread_lend::<F>)
        }
    }
    /// Fallback when it does not.
    pub trait NoFilterLendRead {
        /// No callback.
        fn filter_pread_lend_fn(&self) -> Option<LendFn> {
            None
        }
    }
    impl<F> NoFilterLendRead for &Probe<F> {}

    /// Chosen when a filter's handle implements [`crate::FilterLendWrite`].
    pub trait HasFilterLendWrite {
        /// The callback.
        fn filter_pwrite_lend_fn(&self) -> Option<LendMutFn>;
    }
    impl<F: crate::Filter> HasFilterLendWrite for Probe<F>
    where
        F::Handle: crate::FilterLendWrite,
    {
        fn filter_pwrite_lend_fn(&self) -> Option<LendMutFn> {
            Some(crate::filter::f_pwrite_lend::<F>)
        }
    }
    /// Fallback when it does not.
    pub trait NoFilterLendWrite {
        /// No callback.
        fn filter_pwrite_lend_fn(&self) -> Option<LendMutFn> {
            None
        }
    }
    impl<F> NoFilterLendWrite for &Probe<F> {}
}

/// Run `f`, turning an `Err` into its errno (with the message handed to the
/// host) and a panic into `EIO`. Nothing unwinds past this point.
pub(crate) fn guard(what: &str, f: impl FnOnce() -> crate::Result<()>) -> i32 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            if !e.from_below {
                crate::host::set_error(&e.message);
            }
            e.errno.max(1)
        }
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic payload".into());
            let msg = format!("plugin panicked in {what}: {why}");
            crate::host::error(&msg);
            crate::host::set_error(&msg);
            libc::EIO
        }
    }
}

/// # Safety
/// `h` must be a handle produced by `shim_open::<B>` and not yet closed.
unsafe fn handle<'a, B: Backend>(h: Handle) -> &'a B::Handle {
    // SAFETY: per the contract above, `h` is a live `Box<B::Handle>`.
    unsafe { &*(h as *const B::Handle) }
}

/// Turn a C parameter array into [`Params`].
///
/// # Safety
/// `params` must point to `n` valid pairs of NUL-terminated strings.
pub(crate) unsafe fn params_from_raw(params: *const Param, n: usize) -> Params {
    let mut pairs = Vec::with_capacity(n);
    for i in 0..n {
        // SAFETY: per the contract, `n` valid pairs.
        let p = unsafe { &*params.add(i) };
        // SAFETY: as above.
        let (k, v) = unsafe { (CStr::from_ptr(p.key), CStr::from_ptr(p.value)) };
        pairs.push((k.to_string_lossy().into_owned(), v.to_string_lossy().into_owned()));
    }
    Params::from_pairs(pairs)
}

/// Turn the host's [`OpenInfo`] into an [`OpenContext`].
///
/// # Safety
/// `info` must be valid for reads of its declared size.
pub(crate) unsafe fn open_context(info: *const OpenInfo) -> OpenContext {
    // SAFETY: fields past the host's declared size read as zero.
    let info = unsafe { copy_prefix(info, (*info).struct_size) };
    let text = |p: *const u8, len: usize| {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: host passes `len` readable bytes at `p`.
            String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(p, len) }).into_owned()
        }
    };
    OpenContext {
        readonly: info.readonly != 0,
        export_name: text(info.export_name, info.export_name_len),
        peer: text(info.peer, info.peer_len),
    }
}

unsafe extern "C" fn shim_create<B: Backend>(params: *const Param, n: usize, out: *mut Instance) -> i32 {
    guard("create", || {
        // SAFETY: the host passes `n` valid pairs.
        let inst = B::create(&unsafe { params_from_raw(params, n) })?;
        // SAFETY: `out` is a valid out-pointer from the host.
        unsafe { *out = Box::into_raw(Box::new(inst)) as Instance };
        Ok(())
    })
}

unsafe extern "C" fn shim_destroy<B: Backend>(inst: Instance) {
    guard("destroy", || {
        // SAFETY: `inst` came from `shim_create::<B>` and is destroyed once.
        drop(unsafe { Box::from_raw(inst as *mut B) });
        Ok(())
    });
}

unsafe extern "C" fn shim_open<B: Backend>(inst: Instance, info: *const OpenInfo, out: *mut Handle) -> i32 {
    guard("open", || {
        // SAFETY: `inst` is live (the host destroys it only after every
        // handle is closed) and `info` is valid for this call.
        let (b, ctx) = unsafe { (&*(inst as *const B), open_context(info)) };
        let h = b.open(&ctx)?;
        // SAFETY: `out` is a valid out-pointer from the host.
        unsafe { *out = Box::into_raw(Box::new(h)) as Handle };
        Ok(())
    })
}

unsafe extern "C" fn shim_close<B: Backend>(h: Handle) {
    guard("close", || {
        // SAFETY: `h` came from `shim_open::<B>` and is closed once.
        drop(unsafe { Box::from_raw(h as *mut B::Handle) });
        Ok(())
    });
}

unsafe extern "C" fn shim_get_size<B: Backend>(h: Handle, out: *mut u64) -> i32 {
    // SAFETY: live handle and valid out-pointer (host contract).
    guard("get_size", || unsafe {
        *out = handle::<B>(h).get_size()?;
        Ok(())
    })
}

unsafe extern "C" fn shim_block_size<B: Backend>(h: Handle, out: *mut BlockSize) -> i32 {
    // SAFETY: live handle and valid out-pointer (host contract).
    guard("block_size", || unsafe {
        *out = handle::<B>(h).block_size()?.unwrap_or_default();
        Ok(())
    })
}

macro_rules! can_shim {
    ($name:ident, $method:ident, $conv:expr) => {
        unsafe extern "C" fn $name<B: Backend>(h: Handle, out: *mut u32) -> i32 {
            // SAFETY: live handle and valid out-pointer (host contract).
            guard(stringify!($method), || unsafe {
                *out = ($conv)(handle::<B>(h).$method()?);
                Ok(())
            })
        }
    };
}
can_shim!(shim_can_write, can_write, |b: bool| b as u32);
can_shim!(shim_can_flush, can_flush, |b: bool| b as u32);
can_shim!(shim_is_rotational, is_rotational, |b: bool| b as u32);
can_shim!(shim_can_trim, can_trim, |b: bool| b as u32);
can_shim!(shim_can_zero, can_zero, |b: bool| b as u32);
can_shim!(shim_can_fast_zero, can_fast_zero, |b: bool| b as u32);
can_shim!(shim_can_fua, can_fua, |s: Support| s as u32);
can_shim!(shim_can_multi_conn, can_multi_conn, |b: bool| b as u32);
can_shim!(shim_can_extents, can_extents, |b: bool| b as u32);
can_shim!(shim_can_cache, can_cache, |s: Support| s as u32);

unsafe extern "C" fn shim_pread<B: Backend>(h: Handle, buf: *mut u8, count: u64, offset: u64, flags: u32) -> i32 {
    guard("pread", || {
        // SAFETY: the host passes a writable buffer of `count` bytes.
        let buf = unsafe { std::slice::from_raw_parts_mut(buf, count as usize) };
        // SAFETY: live handle.
        unsafe { handle::<B>(h) }.pread(buf, offset, Flags(flags))
    })
}

unsafe extern "C" fn shim_pwrite<B: Backend>(h: Handle, buf: *const u8, count: u64, offset: u64, flags: u32) -> i32
where
    B::Handle: Pwrite,
{
    guard("pwrite", || {
        // SAFETY: the host passes a readable buffer of `count` bytes.
        let buf = unsafe { std::slice::from_raw_parts(buf, count as usize) };
        // SAFETY: live handle.
        unsafe { handle::<B>(h) }.pwrite(buf, offset, Flags(flags))
    })
}

unsafe extern "C" fn shim_flush<B: Backend>(h: Handle, flags: u32) -> i32
where
    B::Handle: Flush,
{
    // SAFETY: live handle.
    guard("flush", || unsafe { handle::<B>(h) }.flush(Flags(flags)))
}

unsafe extern "C" fn shim_trim<B: Backend>(h: Handle, count: u64, offset: u64, flags: u32) -> i32
where
    B::Handle: Trim,
{
    // SAFETY: live handle.
    guard("trim", || unsafe { handle::<B>(h) }.trim(count, offset, Flags(flags)))
}

unsafe extern "C" fn shim_zero<B: Backend>(h: Handle, count: u64, offset: u64, flags: u32) -> i32
where
    B::Handle: Zero,
{
    // SAFETY: live handle.
    guard("zero", || unsafe { handle::<B>(h) }.zero(count, offset, Flags(flags)))
}

unsafe extern "C" fn shim_cache<B: Backend>(h: Handle, count: u64, offset: u64, flags: u32) -> i32
where
    B::Handle: Cache,
{
    // SAFETY: live handle.
    guard("cache", || unsafe { handle::<B>(h) }.cache(count, offset, Flags(flags)))
}

unsafe extern "C" fn shim_extents<B: Backend>(
    h: Handle,
    count: u64,
    offset: u64,
    flags: u32,
    sink: *mut ExtentSink,
) -> i32
where
    B::Handle: Extents,
{
    guard("extents", || {
        // SAFETY: the host passes a valid sink for the duration of the call.
        let mut list = ExtentList { sink: unsafe { &mut *sink } };
        // SAFETY: live handle.
        unsafe { handle::<B>(h) }.extents(count, offset, Flags(flags), &mut list)
    })
}

unsafe extern "C" fn shim_pread_lend<B: Backend>(
    h: Handle,
    count: u64,
    offset: u64,
    flags: u32,
    sink: abi::LendSink,
    ctx: *mut std::ffi::c_void,
) -> i32
where
    B::Handle: LendRead,
{
    // SAFETY: live handle; the host's sink and context, valid for the call.
    guard("pread_lend", || unsafe {
        lend_to_host(sink, ctx, |to_host| handle::<B>(h).pread_lend(count, offset, Flags(flags), to_host))
    })
}

/// Lent slices in their C form, for a call to a `LendSink`.
pub fn raw_pieces(pieces: &[&[u8]]) -> Vec<abi::LendPiece> {
    pieces.iter().map(|p| abi::LendPiece { data: p.as_ptr(), len: p.len() as u64 }).collect()
}

/// What a `LendSink` received, as slices (empty pieces left out); `None`
/// if the list or a non-empty piece is a null pointer.
///
/// # Safety
/// Unless `n` is 0 or `pieces` null, `pieces` points to `n` pieces, each
/// readable and unchanged for `'a` (the sink call that received them).
pub unsafe fn lent_slices<'a>(pieces: *const abi::LendPiece, n: usize) -> Option<Vec<&'a [u8]>> {
    if n == 0 {
        return Some(Vec::new());
    }
    if pieces.is_null() {
        return None;
    }
    // SAFETY: per the contract, `n` pieces at `pieces` (non-null).
    let raw = unsafe { std::slice::from_raw_parts(pieces, n) };
    let mut slices = Vec::with_capacity(raw.len());
    for p in raw.iter().filter(|p| p.len > 0) {
        if p.data.is_null() {
            return None;
        }
        // SAFETY: per the contract, readable and unchanged for 'a.
        slices.push(unsafe { std::slice::from_raw_parts(p.data, p.len as usize) });
    }
    Some(slices)
}

/// Run `lend` with a sink that passes its pieces on to the host's `sink`
/// (exactly once), for the backend and filter `pread_lend` shims.
///
/// # Safety
/// `sink` and `ctx` must be the host's, valid for the duration of the call.
pub(crate) unsafe fn lend_to_host(
    sink: abi::LendSink,
    ctx: *mut std::ffi::c_void,
    lend: impl FnOnce(&mut dyn FnMut(&[&[u8]]) -> crate::Result<()>) -> crate::Result<()>,
) -> crate::Result<()> {
    let mut called = false;
    let mut to_host = |pieces: &[&[u8]]| -> crate::Result<()> {
        if std::mem::replace(&mut called, true) {
            return Err(Error::io("pread_lend called its sink twice"));
        }
        let raw = raw_pieces(pieces);
        // SAFETY: the host's sink with its context, given pieces that
        // stay valid for the call (they borrow from `pieces`).
        match unsafe { sink(ctx, raw.as_ptr(), raw.len()) } {
            0 => Ok(()),
            // The host knows why; pass its errno back unchanged.
            errno => Err(Error { errno, message: String::new(), from_below: true }),
        }
    };
    let r = lend(&mut to_host);
    if r.is_ok() && !called {
        return Err(Error::io("pread_lend returned without lending anything"));
    }
    r
}

unsafe extern "C" fn shim_pwrite_lend<B: Backend>(
    h: Handle,
    count: u64,
    offset: u64,
    flags: u32,
    sink: abi::LendSinkMut,
    ctx: *mut std::ffi::c_void,
) -> i32
where
    B::Handle: LendWrite,
{
    guard("pwrite_lend", || {
        // SAFETY: the host's sink and context, valid for the call; live handle.
        unsafe { fill_from_host(sink, ctx, |to_host| handle::<B>(h).pwrite_lend(count, offset, Flags(flags), to_host)) }
    })
}

/// Run `lend` with a sink that hands its pieces to the host's `sink` to
/// fill (exactly once), for the backend and filter `pwrite_lend` shims.
///
/// # Safety
/// `sink` and `ctx` are the host's, valid for the duration of the call.
pub(crate) unsafe fn fill_from_host(
    sink: abi::LendSinkMut,
    ctx: *mut std::ffi::c_void,
    lend: impl FnOnce(&mut dyn FnMut(&mut [&mut [u8]]) -> crate::Result<()>) -> crate::Result<()>,
) -> crate::Result<()> {
    let mut called = false;
    let mut to_host = |pieces: &mut [&mut [u8]]| -> crate::Result<()> {
        if std::mem::replace(&mut called, true) {
            return Err(Error::io("pwrite_lend called its sink twice"));
        }
        let raw: Vec<abi::LendPieceMut> =
            pieces.iter_mut().map(|p| abi::LendPieceMut { data: p.as_mut_ptr(), len: p.len() as u64 }).collect();
        // SAFETY: the host's sink with its context, given pieces that stay
        // valid and exclusively ours for the call (they borrow mutably from
        // `pieces`).
        match unsafe { sink(ctx, raw.as_ptr(), raw.len()) } {
            0 => Ok(()),
            // The host knows why; pass its errno back unchanged.
            errno => Err(Error { errno, message: String::new(), from_below: true }),
        }
    };
    let r = lend(&mut to_host);
    if r.is_ok() && !called {
        return Err(Error::io("pwrite_lend returned without lending anything"));
    }
    r
}

struct TableCell(OnceLock<PluginTable>);

/// Build (once) and return the plugin's table.
///
/// # Safety
/// `host` must be the host's table, valid while the library is loaded.
pub unsafe fn entry<B: Backend>(host: *const HostApi, ops: OptionalOps) -> *const PluginTable {
    // One table per cdylib: the macro may be used once per library, so a
    // single static suffices.
    static TABLE: TableCell = TableCell(OnceLock::new());
    if host.is_null() {
        return std::ptr::null();
    }
    // SAFETY: non-null host table from the loader.
    let major = unsafe { (*host).abi_major };
    if major != abi::ABI_MAJOR {
        // A host of another major version would misread our table.
        return std::ptr::null();
    }
    crate::host::install(host);
    // SAFETY: as above.
    let host_minor = unsafe { (*host).abi_minor };
    // Before ABI 1.5 a host failed a write whose `pwrite_lend` declined;
    // such a host gets no `pwrite_lend` and writes with `pwrite`.
    let pwrite_lend = if host_minor >= 5 { ops.pwrite_lend } else { None };
    let t = TABLE.0.get_or_init(|| PluginTable {
        abi_major: abi::ABI_MAJOR,
        abi_minor: abi::ABI_MINOR,
        struct_size: std::mem::size_of::<PluginTable>() as u32,
        kind: abi::PLUGIN_KIND_BACKEND,
        thread_model: B::THREAD_MODEL as u32,
        name: B::NAME.as_ptr(),
        version: B::VERSION.as_ptr(),
        description: B::DESCRIPTION.as_ptr(),
        params: B::PARAMS.as_ptr(),
        n_params: B::PARAMS.len(),
        create: Some(shim_create::<B>),
        destroy: Some(shim_destroy::<B>),
        open: Some(shim_open::<B>),
        close: Some(shim_close::<B>),
        get_size: Some(shim_get_size::<B>),
        block_size: Some(shim_block_size::<B>),
        can_write: Some(shim_can_write::<B>),
        can_flush: Some(shim_can_flush::<B>),
        is_rotational: Some(shim_is_rotational::<B>),
        can_trim: Some(shim_can_trim::<B>),
        can_zero: Some(shim_can_zero::<B>),
        can_fast_zero: Some(shim_can_fast_zero::<B>),
        can_fua: Some(shim_can_fua::<B>),
        can_multi_conn: Some(shim_can_multi_conn::<B>),
        can_extents: Some(shim_can_extents::<B>),
        can_cache: Some(shim_can_cache::<B>),
        pread: Some(shim_pread::<B>),
        pwrite: ops.pwrite,
        flush: ops.flush,
        trim: ops.trim,
        zero: ops.zero,
        extents: ops.extents,
        cache: ops.cache,
        pread_lend: ops.pread_lend,
        pwrite_lend,
    });
    t as *const PluginTable
}

// SAFETY: the table holds 'static strings and function pointers only.
unsafe impl Sync for TableCell {}

#[allow(dead_code)]
fn _assert_error_is_send(e: Error) -> impl Send {
    e
}
