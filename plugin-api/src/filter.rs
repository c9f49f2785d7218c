//! Filters: layers that sit above other layers and transform requests on
//! the way down. Implement [`Filter`] for the per-export state and
//! [`FilterConnection`] for the per-connection handle, then call
//! [`crate::export_filter!`]. Every [`FilterConnection`] method has a default
//! that passes the call to the layer below unchanged, so a filter overrides
//! only what it changes.

use crate::__private::{copy_prefix, guard, lend_to_host, lent_slices, open_context, params_from_raw};
use crate::abi::{self, BlockSize, ExtentSink, Handle, HostApi, Instance, NextOps, OpenInfo, Param};
use crate::{Error, ExtentList, Flags, OpenContext, Params, Result, Support, ThreadModel};
use std::ffi::CStr;
use std::sync::OnceLock;

/// A layer below a filter. Every call goes through the host's checks for
/// that layer. Errors it returns keep the lower layer's message for the
/// client when the filter returns them unchanged.
pub struct Next {
    ops: NextOps,
}

// SAFETY: NextOps is Send + Sync (host-owned, thread-safe callbacks).
unsafe impl Send for Next {}
// SAFETY: as above.
unsafe impl Sync for Next {}

fn rc(r: i32) -> Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(Error::below(r))
    }
}

impl Next {
    /// # Safety
    /// `p` must be a `NextOps` given by the host to `open`, valid until the
    /// handle is closed.
    unsafe fn from_raw(p: *const NextOps) -> Next {
        // SAFETY: per contract; fields past the host's size read as zero:
        // every field up to `cache` exists since ABI 1.0, and `pread_lend`
        // (1.3) is an `Option` that a 1.2 host's table leaves `None`.
        Next { ops: unsafe { copy_prefix(p, (*p).struct_size) } }
    }

    /// Size of the layer below.
    pub fn get_size(&self) -> Result<u64> {
        let mut out = 0;
        // SAFETY: host callback with its own ctx and a valid out-pointer.
        rc(unsafe { (self.ops.get_size)(self.ops.ctx, &mut out) })?;
        Ok(out)
    }
    /// Block-size constraints of the layer below (defaults filled in).
    pub fn block_size(&self) -> Result<BlockSize> {
        let mut out = BlockSize::default();
        // SAFETY: as above.
        rc(unsafe { (self.ops.block_size)(self.ops.ctx, &mut out) })?;
        Ok(out)
    }
    /// A capability of the layer below (`abi::CAN_*`).
    pub fn can(&self, which: u32) -> Result<u32> {
        let mut out = 0;
        // SAFETY: as above.
        rc(unsafe { (self.ops.can)(self.ops.ctx, which, &mut out) })?;
        Ok(out)
    }
    fn can_bool(&self, which: u32) -> Result<bool> {
        self.can(which).map(|v| v != 0)
    }
    fn can_support(&self, which: u32) -> Result<Support> {
        Ok(match self.can(which)? {
            abi::SUPPORT_NATIVE => Support::Native,
            abi::SUPPORT_EMULATE => Support::Emulate,
            _ => Support::None,
        })
    }
    /// Read from the layer below.
    pub fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        // SAFETY: `buf` is writable for its length during the call.
        rc(unsafe { (self.ops.pread)(self.ops.ctx, buf.as_mut_ptr(), buf.len() as u64, offset, flags.0) })
    }
    /// Lend `[offset, offset+count)` of the layer below: `sink` is called
    /// once with pieces covering the range in order, valid only while it
    /// runs, and what it returns is returned. An `ENOTSUP` error without
    /// `sink` having run means the layer below declined this range: return
    /// it, and the host reads with `pread` instead. Where the layer below
    /// does not lend at all (or the host predates ABI 1.3), the data is
    /// read into a buffer first and that is lent. Calling it again from
    /// inside `sink` holds the first range below (and its locks) while the
    /// next is taken: do that only over a layer nothing writes meanwhile
    /// (as `cow`'s read-only child) or across different layers (as
    /// `concat`'s parts), never for two ranges of one written layer, where
    /// a writer queued between them deadlocks both.
    pub fn pread_lend(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        sink: &mut dyn FnMut(&[&[u8]]) -> Result<()>,
    ) -> Result<()> {
        let Some(f) = self.ops.pread_lend else {
            let len = usize::try_from(count).map_err(|_| Error::invalid("read too large"))?;
            let mut buf = vec![0u8; len];
            self.pread(&mut buf, offset, flags)?;
            return sink(&[&buf]);
        };
        struct Ctx<'a> {
            sink: &'a mut dyn FnMut(&[&[u8]]) -> Result<()>,
            calls: u32,
            failed: Option<Error>,
        }
        unsafe extern "C" fn receive(ctx: *mut std::ffi::c_void, pieces: *const abi::LendPiece, n: usize) -> i32 {
            // SAFETY: `ctx` is the `Ctx` below, alive and otherwise unused
            // while the host runs this.
            let ctx = unsafe { &mut *(ctx as *mut Ctx<'_>) };
            ctx.calls += 1;
            // SAFETY: the host keeps the `n` pieces readable and unchanged
            // until this returns.
            let slices = match unsafe { lent_slices(pieces, n) } {
                Some(slices) if ctx.calls == 1 => slices,
                _ => return libc::EIO,
            };
            // The filter's closure must not unwind into the host.
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (ctx.sink)(&slices))) {
                Ok(Ok(())) => 0,
                Ok(Err(e)) => {
                    let errno = e.errno.max(1);
                    ctx.failed = Some(e);
                    errno
                }
                Err(_) => {
                    ctx.failed = Some(Error::io("the filter panicked while sending lent data"));
                    libc::EIO
                }
            }
        }
        let mut ctx = Ctx { sink, calls: 0, failed: None };
        // SAFETY: host callback with its own ctx; `receive` gets `ctx`,
        // which outlives the call.
        let r = unsafe {
            f(self.ops.ctx, count, offset, flags.0, receive, &mut ctx as *mut Ctx<'_> as *mut std::ffi::c_void)
        };
        // The filter's own error (with its message) rather than the errno
        // the host passed back for it.
        if let Some(e) = ctx.failed {
            return Err(e);
        }
        rc(r)?;
        if ctx.calls != 1 {
            return Err(Error::io(format!("the host lent {} times instead of once", ctx.calls)));
        }
        Ok(())
    }
    /// [`Next::pread_lend`] that tells a decline apart: `None` where the
    /// read was declined (the filter should decline too, with
    /// [`Error::unsupported`], and will see the range again in `pread`),
    /// else the result. For filters that log or count their reads, so a
    /// declined read is not counted twice. A decline is ENOTSUP from below
    /// before `sink` ran, or ENOTSUP from `sink` itself: the host's own
    /// sink never returns it, so that is a layer above (a `concat` or
    /// `cow` that nests its next source inside this sink) declining.
    pub fn try_pread_lend(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        sink: &mut dyn FnMut(&[&[u8]]) -> Result<()>,
    ) -> Option<Result<()>> {
        let (mut sunk, mut sink_declined) = (false, false);
        let r = self.pread_lend(count, offset, flags, &mut |pieces: &[&[u8]]| {
            sunk = true;
            let r = sink(pieces);
            sink_declined = r.as_ref().is_err_and(|e| e.errno == libc::ENOTSUP);
            r
        });
        match r {
            Err(e) if e.errno == libc::ENOTSUP && (!sunk || sink_declined) => None,
            r => Some(r),
        }
    }
    /// Write to the layer below.
    pub fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        // SAFETY: `buf` is readable for its length during the call.
        rc(unsafe { (self.ops.pwrite)(self.ops.ctx, buf.as_ptr(), buf.len() as u64, offset, flags.0) })
    }
    /// Flush the layer below.
    pub fn flush(&self, flags: Flags) -> Result<()> {
        // SAFETY: host callback with its own ctx.
        rc(unsafe { (self.ops.flush)(self.ops.ctx, flags.0) })
    }
    /// Trim in the layer below.
    pub fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        // SAFETY: host callback with its own ctx.
        rc(unsafe { (self.ops.trim)(self.ops.ctx, count, offset, flags.0) })
    }
    /// Zero in the layer below.
    pub fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        // SAFETY: host callback with its own ctx.
        rc(unsafe { (self.ops.zero)(self.ops.ctx, count, offset, flags.0) })
    }
    /// Extents of the layer below, reported into `out`. Unless `flags` asks
    /// for one extent, the host describes the whole range (asking a layer
    /// that stops short again), so a filter never has to loop.
    pub fn extents(&self, count: u64, offset: u64, flags: Flags, out: &mut ExtentList<'_>) -> Result<()> {
        let sink: *mut ExtentSink = out.sink;
        // SAFETY: the sink is valid for the duration of the call.
        rc(unsafe { (self.ops.extents)(self.ops.ctx, count, offset, flags.0, sink) })
    }
    /// Extents of the layer below, collected as `(offset, length, flags)`.
    pub fn extents_vec(&self, count: u64, offset: u64, flags: Flags) -> Result<Vec<(u64, u64, u32)>> {
        ExtentList::collect(|list| self.extents(count, offset, flags, list))
    }
    /// Cache in the layer below.
    pub fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        // SAFETY: host callback with its own ctx.
        rc(unsafe { (self.ops.cache)(self.ops.ctx, count, offset, flags.0) })
    }
}

/// A filter: one value per export that uses it.
pub trait Filter: Sized + Send + Sync + 'static {
    /// Per-connection handle.
    type Handle: FilterConnection;
    /// Short name, e.g. `c"offset"`.
    const NAME: &'static CStr;
    /// Version.
    const VERSION: &'static CStr;
    /// One-line description.
    const DESCRIPTION: &'static CStr;
    /// Declared parameters.
    const PARAMS: &'static [abi::ParamSpec];
    /// Concurrency tolerated (a filter can only restrict its pipeline).
    const THREAD_MODEL: ThreadModel = ThreadModel::Parallel;
    /// Fewest layers below.
    const MIN_CHILDREN: u32 = 1;
    /// Most layers below.
    const MAX_CHILDREN: u32 = 1;
    /// Open the layers below read-only whatever the export says.
    const CHILD_READONLY: bool = false;

    /// Build the per-export state.
    fn create(params: &Params) -> Result<Self>;
    /// Open a handle for one connection over the layers below (one for an
    /// ordinary filter).
    fn open(&self, ctx: &OpenContext, children: Vec<Next>) -> Result<Self::Handle>;
}

/// A filter's per-connection handle. Every method defaults to passing the
/// call to [`FilterConnection::next`] unchanged, so a filter overrides only
/// what it changes. The host checks every request against *this* layer's
/// answers (size, capabilities, block sizes) before calling, and checks the
/// filter's calls to [`Next`] against the layer below.
pub trait FilterConnection: Send + Sync + 'static {
    /// The layer calls pass through to by default.
    fn next(&self) -> &Next;

    /// Size this layer presents (default: the size below).
    fn get_size(&self) -> Result<u64> {
        self.next().get_size()
    }
    /// Block-size constraints this layer presents (default: those below).
    fn block_size(&self) -> Result<Option<BlockSize>> {
        self.next().block_size().map(Some)
    }
    /// Writable? (default: as below).
    fn can_write(&self) -> Result<bool> {
        self.next().can_bool(abi::CAN_WRITE)
    }
    /// Flush supported? (default: as below).
    fn can_flush(&self) -> Result<bool> {
        self.next().can_bool(abi::CAN_FLUSH)
    }
    /// Rotational media? (default: as below).
    fn is_rotational(&self) -> Result<bool> {
        self.next().can_bool(abi::CAN_ROTATIONAL)
    }
    /// Trim supported? (default: as below).
    fn can_trim(&self) -> Result<bool> {
        self.next().can_bool(abi::CAN_TRIM)
    }
    /// Native zeroing through [`FilterConnection::zero`]? Answer `false` to
    /// make the host zero by writing zeros through
    /// [`FilterConnection::pwrite`] (default: as below).
    fn can_zero(&self) -> Result<bool> {
        self.next().can_bool(abi::CAN_ZERO)
    }
    /// Can zeroing be fast? (default: as below).
    fn can_fast_zero(&self) -> Result<bool> {
        self.next().can_bool(abi::CAN_FAST_ZERO)
    }
    /// FUA support (default: as below).
    fn can_fua(&self) -> Result<Support> {
        self.next().can_support(abi::CAN_FUA)
    }
    /// Consistent across connections? (default: as below).
    fn can_multi_conn(&self) -> Result<bool> {
        self.next().can_bool(abi::CAN_MULTI_CONN)
    }
    /// Are [`FilterConnection::extents`] meaningful? Answer `false` to make
    /// the host report everything as data (default: as below).
    fn can_extents(&self) -> Result<bool> {
        self.next().can_bool(abi::CAN_EXTENTS)
    }
    /// Cache support (default: as below).
    fn can_cache(&self) -> Result<Support> {
        self.next().can_support(abi::CAN_CACHE)
    }
    /// Read `buf.len()` bytes at `offset` (default: read below).
    fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        self.next().pread(buf, offset, flags)
    }
    /// Write `buf` at `offset` (default: write below).
    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.next().pwrite(buf, offset, flags)
    }
    /// Flush (default: flush below).
    fn flush(&self, flags: Flags) -> Result<()> {
        self.next().flush(flags)
    }
    /// Trim (default: trim below).
    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.next().trim(count, offset, flags)
    }
    /// Zero (default: zero below).
    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.next().zero(count, offset, flags)
    }
    /// Report extents of `[offset, offset+count)` in this layer's offsets
    /// (default: those below, unchanged).
    fn extents(&self, count: u64, offset: u64, flags: Flags, out: &mut ExtentList<'_>) -> Result<()> {
        self.next().extents(count, offset, flags, out)
    }
    /// Cache (default: cache below).
    fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.next().cache(count, offset, flags)
    }
}

/// Lending reads through a filter (ABI 1.3): implement it for a filter's
/// handle when its reads can be served from memory the layer below lends
/// ([`Next::pread_lend`], with the range shifted or narrowed) or from the
/// filter's own memory, so the host sends the data from there instead of
/// copying it into its buffer first. The host calls it only where every
/// layer below lends too, and still calls [`FilterConnection::pread`]
/// where lending does not suit it, so both must return the same data.
/// Return [`Error::unsupported`] before calling the sink to decline a read
/// (the host then uses `pread`); errors from [`Next::pread_lend`] passed
/// on unchanged decline where the layer below declined. Lent pieces may
/// be pages of a mapped file that fault if it shrinks: pass them on
/// rather than reading them.
pub trait FilterLendRead: FilterConnection {
    /// Call `sink` once with slices covering `[offset, offset+count)` in
    /// order, valid and unchanged while it runs, and return what it returns
    /// (see [`crate::LendRead::pread_lend`]). The default lends the same
    /// range from the layer below: right for a filter whose reads pass
    /// through unchanged (`impl FilterLendRead for MyHandle {}`).
    fn pread_lend(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        sink: &mut dyn FnMut(&[&[u8]]) -> Result<()>,
    ) -> Result<()> {
        self.next().pread_lend(count, offset, flags, sink)
    }
}

/// Lending memory for writes through a filter (ABI 1.5): implement it for
/// a filter's handle when it keeps written data in memory of its own
/// (`cow`'s overlay), so the host receives a write straight into it
/// instead of into a buffer `pwrite` then copies from. The contract is
/// [`crate::LendWrite::pwrite_lend`]'s, declines included; nothing below
/// the filter is involved, and [`FilterConnection::pwrite`] must still
/// work (the host uses it for small, buffered and declined writes).
pub trait FilterLendWrite: FilterConnection {
    /// Call `sink` once with writable slices covering `[offset,
    /// offset+count)` in order, and return what it returns, or decline
    /// with [`Error::unsupported`] before calling it.
    fn pwrite_lend(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        sink: &mut dyn FnMut(&mut [&mut [u8]]) -> Result<()>,
    ) -> Result<()>;
}

/// Pieces of a static buffer of zeros covering `len` bytes, for a filter
/// that lends zeros (a grown tail, a zeroed block).
pub fn zero_pieces(len: u64) -> Vec<&'static [u8]> {
    static ZEROS: [u8; 1 << 20] = [0; 1 << 20];
    (0..len).step_by(ZEROS.len()).map(|at| &ZEROS[..(len - at).min(ZEROS.len() as u64) as usize]).collect()
}

/// One source of a lent read assembled by [`lend_in_order`]: it lends its
/// part of the read by calling the sink it is given once (a
/// [`Next::pread_lend`] of some range, a filter's own mapping, zeros).
pub type LendSource<'a> = dyn Fn(&mut dyn FnMut(&[&[u8]]) -> Result<()>) -> Result<()> + 'a;

/// Lend one read made of several sources, in order: `sink` gets all their
/// pieces in one call. Each source is called inside the sink of the one
/// before, so every piece is still valid (its lender has not returned)
/// when `sink` runs. A source that declines (ENOTSUP before its sink)
/// makes the whole read decline, as the trait asks.
pub fn lend_in_order(sources: &[Box<LendSource<'_>>], sink: &mut dyn FnMut(&[&[u8]]) -> Result<()>) -> Result<()> {
    fn after(
        sources: &[Box<LendSource<'_>>],
        lent: &[&[u8]],
        sink: &mut dyn FnMut(&[&[u8]]) -> Result<()>,
    ) -> Result<()> {
        let Some((first, rest)) = sources.split_first() else {
            return sink(lent);
        };
        first(&mut |pieces: &[&[u8]]| {
            if lent.is_empty() {
                return after(rest, pieces, sink);
            }
            let all: Vec<&[u8]> = lent.iter().chain(pieces).copied().collect();
            after(rest, &all, sink)
        })
    }
    after(sources, &[], sink)
}

// ------------------------------------------------------------------ shims

/// # Safety
/// `h` must be a live handle from `shim_open::<F>`.
unsafe fn fh<'a, F: Filter>(h: Handle) -> &'a F::Handle {
    // SAFETY: per contract.
    unsafe { &*(h as *const F::Handle) }
}

unsafe extern "C" fn f_create<F: Filter>(params: *const Param, n: usize, out: *mut Instance) -> i32 {
    guard("create", || {
        // SAFETY: the host passes `n` valid pairs.
        let inst = F::create(&unsafe { params_from_raw(params, n) })?;
        // SAFETY: valid out-pointer.
        unsafe { *out = Box::into_raw(Box::new(inst)) as Instance };
        Ok(())
    })
}

unsafe extern "C" fn f_destroy<F: Filter>(inst: Instance) {
    // SAFETY: `inst` came from `f_create::<F>` and is destroyed once.
    guard("destroy", || {
        drop(unsafe { Box::from_raw(inst as *mut F) });
        Ok(())
    });
}

unsafe extern "C" fn f_open<F: Filter>(
    inst: Instance,
    info: *const OpenInfo,
    children: *const *const NextOps,
    n: usize,
    out: *mut Handle,
) -> i32 {
    guard("open", || {
        // SAFETY: live instance; `info` and `n` child pointers valid for the
        // call, the children until close.
        let (f, ctx) = unsafe { (&*(inst as *const F), open_context(info)) };
        // SAFETY: as above.
        let nexts = (0..n).map(|i| unsafe { Next::from_raw(*children.add(i)) }).collect();
        let h = f.open(&ctx, nexts)?;
        // SAFETY: valid out-pointer.
        unsafe { *out = Box::into_raw(Box::new(h)) as Handle };
        Ok(())
    })
}

unsafe extern "C" fn f_close<F: Filter>(h: Handle) {
    // SAFETY: handle from `f_open::<F>`, closed once.
    guard("close", || {
        drop(unsafe { Box::from_raw(h as *mut F::Handle) });
        Ok(())
    });
}

unsafe extern "C" fn f_get_size<F: Filter>(h: Handle, out: *mut u64) -> i32 {
    // SAFETY: live handle, valid out-pointer.
    guard("get_size", || unsafe {
        *out = fh::<F>(h).get_size()?;
        Ok(())
    })
}

unsafe extern "C" fn f_block_size<F: Filter>(h: Handle, out: *mut BlockSize) -> i32 {
    // SAFETY: live handle, valid out-pointer.
    guard("block_size", || unsafe {
        *out = fh::<F>(h).block_size()?.unwrap_or_default();
        Ok(())
    })
}

macro_rules! f_can {
    ($name:ident, $method:ident, $conv:expr) => {
        unsafe extern "C" fn $name<F: Filter>(h: Handle, out: *mut u32) -> i32 {
            // SAFETY: live handle, valid out-pointer.
            guard(stringify!($method), || unsafe {
                *out = ($conv)(fh::<F>(h).$method()?);
                Ok(())
            })
        }
    };
}
f_can!(f_can_write, can_write, |b: bool| b as u32);
f_can!(f_can_flush, can_flush, |b: bool| b as u32);
f_can!(f_is_rotational, is_rotational, |b: bool| b as u32);
f_can!(f_can_trim, can_trim, |b: bool| b as u32);
f_can!(f_can_zero, can_zero, |b: bool| b as u32);
f_can!(f_can_fast_zero, can_fast_zero, |b: bool| b as u32);
f_can!(f_can_fua, can_fua, |s: Support| s as u32);
f_can!(f_can_multi_conn, can_multi_conn, |b: bool| b as u32);
f_can!(f_can_extents, can_extents, |b: bool| b as u32);
f_can!(f_can_cache, can_cache, |s: Support| s as u32);

unsafe extern "C" fn f_pread<F: Filter>(h: Handle, buf: *mut u8, count: u64, offset: u64, flags: u32) -> i32 {
    guard("pread", || {
        // SAFETY: writable buffer of `count` bytes; live handle.
        let buf = unsafe { std::slice::from_raw_parts_mut(buf, count as usize) };
        unsafe { fh::<F>(h) }.pread(buf, offset, Flags(flags))
    })
}

unsafe extern "C" fn f_pwrite<F: Filter>(h: Handle, buf: *const u8, count: u64, offset: u64, flags: u32) -> i32 {
    guard("pwrite", || {
        // SAFETY: readable buffer of `count` bytes; live handle.
        let buf = unsafe { std::slice::from_raw_parts(buf, count as usize) };
        unsafe { fh::<F>(h) }.pwrite(buf, offset, Flags(flags))
    })
}

unsafe extern "C" fn f_flush<F: Filter>(h: Handle, flags: u32) -> i32 {
    // SAFETY: live handle.
    guard("flush", || unsafe { fh::<F>(h) }.flush(Flags(flags)))
}

unsafe extern "C" fn f_trim<F: Filter>(h: Handle, count: u64, offset: u64, flags: u32) -> i32 {
    // SAFETY: live handle.
    guard("trim", || unsafe { fh::<F>(h) }.trim(count, offset, Flags(flags)))
}

unsafe extern "C" fn f_zero<F: Filter>(h: Handle, count: u64, offset: u64, flags: u32) -> i32 {
    // SAFETY: live handle.
    guard("zero", || unsafe { fh::<F>(h) }.zero(count, offset, Flags(flags)))
}

unsafe extern "C" fn f_cache<F: Filter>(h: Handle, count: u64, offset: u64, flags: u32) -> i32 {
    // SAFETY: live handle.
    guard("cache", || unsafe { fh::<F>(h) }.cache(count, offset, Flags(flags)))
}

unsafe extern "C" fn f_extents<F: Filter>(
    h: Handle,
    count: u64,
    offset: u64,
    flags: u32,
    sink: *mut ExtentSink,
) -> i32 {
    guard("extents", || {
        // SAFETY: the host's sink is valid for the call; live handle.
        let mut list = ExtentList { sink: unsafe { &mut *sink } };
        unsafe { fh::<F>(h) }.extents(count, offset, Flags(flags), &mut list)
    })
}

pub(crate) unsafe extern "C" fn f_pread_lend<F: Filter>(
    h: Handle,
    count: u64,
    offset: u64,
    flags: u32,
    sink: abi::LendSink,
    ctx: *mut std::ffi::c_void,
) -> i32
where
    F::Handle: FilterLendRead,
{
    // SAFETY: live handle; the host's sink and context, valid for the call.
    guard("pread_lend", || unsafe {
        lend_to_host(sink, ctx, |to_host| fh::<F>(h).pread_lend(count, offset, Flags(flags), to_host))
    })
}

pub(crate) unsafe extern "C" fn f_pwrite_lend<F: Filter>(
    h: Handle,
    count: u64,
    offset: u64,
    flags: u32,
    sink: abi::LendSinkMut,
    ctx: *mut std::ffi::c_void,
) -> i32
where
    F::Handle: FilterLendWrite,
{
    // SAFETY: live handle; the host's sink and context, valid for the call.
    guard("pwrite_lend", || unsafe {
        crate::__private::fill_from_host(sink, ctx, |to_host| {
            fh::<F>(h).pwrite_lend(count, offset, Flags(flags), to_host)
        })
    })
}

struct FilterCell(OnceLock<abi::FilterTable>);
// SAFETY: the table holds 'static strings and function pointers only.
unsafe impl Sync for FilterCell {}

/// Build (once) and return the filter's table.
///
/// # Safety
/// `host` must be the host's table, valid while the library is loaded.
#[doc(hidden)]
pub unsafe fn filter_entry<F: Filter>(
    host: *const HostApi,
    pread_lend: Option<crate::__private::LendFn>,
    pwrite_lend: Option<crate::__private::LendMutFn>,
) -> *const abi::PluginTable {
    static TABLE: FilterCell = FilterCell(OnceLock::new());
    if host.is_null() {
        return std::ptr::null();
    }
    // SAFETY: non-null host table.
    if unsafe { (*host).abi_major } != abi::ABI_MAJOR {
        return std::ptr::null();
    }
    crate::host::install(host);
    // SAFETY: as above. A host before ABI 1.5 neither reads the field nor
    // honours a decline.
    let pwrite_lend = if unsafe { (*host).abi_minor } >= 5 { pwrite_lend } else { None };
    let t = TABLE.0.get_or_init(|| abi::FilterTable {
        abi_major: abi::ABI_MAJOR,
        abi_minor: abi::ABI_MINOR,
        struct_size: std::mem::size_of::<abi::FilterTable>() as u32,
        kind: abi::PLUGIN_KIND_FILTER,
        thread_model: F::THREAD_MODEL as u32,
        name: F::NAME.as_ptr(),
        version: F::VERSION.as_ptr(),
        description: F::DESCRIPTION.as_ptr(),
        params: F::PARAMS.as_ptr(),
        n_params: F::PARAMS.len(),
        min_children: F::MIN_CHILDREN,
        max_children: F::MAX_CHILDREN,
        child_readonly: F::CHILD_READONLY as u32,
        create: Some(f_create::<F>),
        destroy: Some(f_destroy::<F>),
        open: Some(f_open::<F>),
        close: Some(f_close::<F>),
        get_size: Some(f_get_size::<F>),
        block_size: Some(f_block_size::<F>),
        can_write: Some(f_can_write::<F>),
        can_flush: Some(f_can_flush::<F>),
        is_rotational: Some(f_is_rotational::<F>),
        can_trim: Some(f_can_trim::<F>),
        can_zero: Some(f_can_zero::<F>),
        can_fast_zero: Some(f_can_fast_zero::<F>),
        can_fua: Some(f_can_fua::<F>),
        can_multi_conn: Some(f_can_multi_conn::<F>),
        can_extents: Some(f_can_extents::<F>),
        can_cache: Some(f_can_cache::<F>),
        pread: Some(f_pread::<F>),
        pwrite: Some(f_pwrite::<F>),
        flush: Some(f_flush::<F>),
        trim: Some(f_trim::<F>),
        zero: Some(f_zero::<F>),
        extents: Some(f_extents::<F>),
        cache: Some(f_cache::<F>),
        pread_lend,
        pwrite_lend,
    });
    t as *const abi::FilterTable as *const abi::PluginTable
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source lending `bytes` from memory that lives only during its call.
    fn local(bytes: &'static [u8]) -> Box<LendSource<'static>> {
        Box::new(move |then| {
            let owned = bytes.to_vec();
            let halves = owned.split_at(owned.len() / 2);
            then(&[halves.0, halves.1])
        })
    }

    #[test]
    fn sources_are_lent_in_order_in_one_sink_call_and_a_decline_declines_all() {
        let sources = vec![
            local(b"abcd"),
            Box::new(|then: &mut dyn FnMut(&[&[u8]]) -> Result<()>| then(&[])) as _,
            local(b"efgh"),
        ];
        let mut calls = Vec::new();
        lend_in_order(&sources, &mut |pieces| {
            calls.push(pieces.concat());
            Ok(())
        })
        .unwrap();
        assert_eq!(calls, vec![b"abcdefgh".to_vec()]);

        // The sink's error comes back out of every level.
        let r = lend_in_order(&sources, &mut |_| Err(Error::new(libc::EPIPE, "gone")));
        assert_eq!(r.unwrap_err().errno, libc::EPIPE);

        // A source that declines (ENOTSUP without calling on) after others
        // have lent: the sink never runs, the decline is what returns.
        let declining: Vec<Box<LendSource<'_>>> =
            vec![local(b"ab"), Box::new(|_: &mut dyn FnMut(&[&[u8]]) -> Result<()>| Err(Error::unsupported("no")))];
        let mut ran = false;
        let r = lend_in_order(&declining, &mut |_| {
            ran = true;
            Ok(())
        });
        assert!(!ran);
        assert_eq!(r.unwrap_err().errno, libc::ENOTSUP);
        let mut empty = Vec::new();
        lend_in_order(&[], &mut |p| {
            empty.push(p.len());
            Ok(())
        })
        .unwrap();
        assert_eq!(empty, vec![0]);
    }
}
