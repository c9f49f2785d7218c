use crate::abi;
use crate::{Params, Result};
use std::ffi::CStr;

pub use crate::abi::BlockSize;

/// How much concurrency a plugin tolerates. The host enforces it; in a
/// pipeline the most restrictive layer wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u32)]
pub enum ThreadModel {
    /// One connection at a time for the whole export.
    SerializeConnections = abi::THREAD_MODEL_SERIALIZE_CONNECTIONS,
    /// One request at a time across all connections.
    SerializeAllRequests = abi::THREAD_MODEL_SERIALIZE_ALL_REQUESTS,
    /// One request at a time per connection.
    SerializeRequests = abi::THREAD_MODEL_SERIALIZE_REQUESTS,
    /// Fully parallel.
    Parallel = abi::THREAD_MODEL_PARALLEL,
}

/// Answer to `can_fua` / `can_cache`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u32)]
pub enum Support {
    /// Not supported.
    None = abi::SUPPORT_NONE,
    /// Let the host emulate it (FUA by flush, cache by read).
    Emulate = abi::SUPPORT_EMULATE,
    /// The plugin handles it itself.
    Native = abi::SUPPORT_NATIVE,
}

/// Operation flags (`abi::FLAG_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flags(pub u32);

impl Flags {
    /// Force unit access.
    pub fn fua(self) -> bool {
        self.0 & abi::FLAG_FUA != 0
    }
    /// `zero` may punch holes.
    pub fn may_trim(self) -> bool {
        self.0 & abi::FLAG_MAY_TRIM != 0
    }
    /// `zero` must be fast or fail with `ENOTSUP`.
    pub fn fast_zero(self) -> bool {
        self.0 & abi::FLAG_FAST_ZERO != 0
    }
    /// `extents`: the first extent is enough.
    pub fn req_one(self) -> bool {
        self.0 & abi::FLAG_REQ_ONE != 0
    }
    /// `pwrite_lend`: the host fills the lent slices only through the
    /// kernel, so memory that may fault (a file mapping) may be lent.
    pub fn kernel_fill(self) -> bool {
        self.0 & abi::FLAG_KERNEL_FILL != 0
    }
}

/// Facts about the connection a handle is opened for.
#[derive(Debug, Clone)]
pub struct OpenContext {
    /// The export is read-only for this connection.
    pub readonly: bool,
    /// Export name chosen by the client.
    pub export_name: String,
    /// Peer address (`127.0.0.1:5000`, `unix`).
    pub peer: String,
}

/// A backend plugin: one value per configured export (shared by all its
/// connections), created from the export's validated parameters.
pub trait Backend: Sized + Send + Sync + 'static {
    /// Per-connection handle.
    type Handle: Connection;
    /// Short name, e.g. `c"memory"`.
    const NAME: &'static CStr;
    /// Plugin version.
    const VERSION: &'static CStr;
    /// One-line description.
    const DESCRIPTION: &'static CStr;
    /// Declared parameters, built with [`crate::param`].
    const PARAMS: &'static [abi::ParamSpec];
    /// Concurrency the plugin tolerates.
    const THREAD_MODEL: ThreadModel = ThreadModel::Parallel;

    /// Build the per-export state.
    fn create(params: &Params) -> Result<Self>;
    /// Open a handle for one client connection.
    fn open(&self, ctx: &OpenContext) -> Result<Self::Handle>;
}

/// The operations every handle has. Capability answers are clamped by the
/// host to what the handle can actually do (e.g. `can_write` is ignored
/// unless the handle implements [`Pwrite`]).
pub trait Connection: Send + Sync + 'static {
    /// Export size in bytes.
    fn get_size(&self) -> Result<u64>;
    /// Fill `buf` with the bytes at `offset`.
    fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()>;

    /// Block-size constraints; `None` for none.
    fn block_size(&self) -> Result<Option<BlockSize>> {
        Ok(None)
    }
    /// Writable (given [`Pwrite`])?
    fn can_write(&self) -> Result<bool> {
        Ok(true)
    }
    /// Flush available (given [`Flush`])?
    fn can_flush(&self) -> Result<bool> {
        Ok(true)
    }
    /// Rotational media?
    fn is_rotational(&self) -> Result<bool> {
        Ok(false)
    }
    /// Trim available (given [`Trim`])?
    fn can_trim(&self) -> Result<bool> {
        Ok(true)
    }
    /// Native zeroing (given [`Zero`])?
    fn can_zero(&self) -> Result<bool> {
        Ok(true)
    }
    /// Is zeroing fast (given [`Zero`])?
    fn can_fast_zero(&self) -> Result<bool> {
        Ok(true)
    }
    /// FUA support. `Emulate` (the default) needs [`Flush`]; `Native` means
    /// the write operations honour [`Flags::fua`] themselves.
    fn can_fua(&self) -> Result<Support> {
        Ok(Support::Emulate)
    }
    /// Do all connections of the export see one consistent state, so that a
    /// flush on one covers writes made on another?
    fn can_multi_conn(&self) -> Result<bool> {
        Ok(false)
    }
    /// Are extents meaningful (given [`Extents`])?
    fn can_extents(&self) -> Result<bool> {
        Ok(true)
    }
    /// Cache support. `Native` needs [`Cache`].
    fn can_cache(&self) -> Result<Support> {
        Ok(Support::Native)
    }
}

/// Writing.
pub trait Pwrite: Connection {
    /// Write `buf` at `offset`. Honour `flags.fua()` if `can_fua` is Native.
    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()>;
}

/// Flushing to stable storage.
pub trait Flush: Connection {
    /// Make every completed write durable.
    fn flush(&self, flags: Flags) -> Result<()>;
}

/// Discarding.
pub trait Trim: Connection {
    /// Discard `[offset, offset+count)`; later reads may return anything.
    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()>;
}

/// Efficient zeroing.
pub trait Zero: Connection {
    /// Make `[offset, offset+count)` read as zeros. Return
    /// [`crate::Error::unsupported`] to make the host write zeros instead
    /// (and always when `flags.fast_zero()` is set but this would be slow).
    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()>;
}

/// Allocation map.
pub trait Extents: Connection {
    /// Describe `[offset, offset+count)` through `out`, ascending and
    /// contiguous from `offset`. Covering less is fine; at least one extent.
    fn extents(&self, count: u64, offset: u64, flags: Flags, out: &mut ExtentList<'_>) -> Result<()>;
}

/// Lending data instead of copying it (ABI 1.1): for backends that hold
/// the data in memory (or map it), so the host can send it from there. The
/// host reads lent memory only through the kernel, so a lent page that
/// faults (a mapped file truncated underneath) fails that read with EIO
/// instead of the server; still, lend only what is there.
pub trait LendRead: Connection {
    /// Call `sink` once with slices covering `[offset, offset+count)` in
    /// order, kept valid and unchanged while it runs (hold your locks), and
    /// return what it returns. Fail without calling it if the range cannot
    /// be read; [`crate::Error::unsupported`] without calling it declines
    /// (ABI 1.3 hosts then read the range with `pread`: use it where this
    /// range cannot be lent, e.g. it is not mapped). `pread` must still
    /// work: the host uses it where lending does not suit it. It may be
    /// called again on the same thread while `sink` runs (a filter above
    /// lending several ranges in one reply), so a per-thread buffer must
    /// not be assumed free.
    fn pread_lend(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        sink: &mut dyn FnMut(&[&[u8]]) -> Result<()>,
    ) -> Result<()>;
}

/// Receiving writes straight into the backend's memory (ABI 1.2): for
/// backends that hold the data in memory, so the host can copy a write from
/// the socket to where it belongs without a buffer in between.
pub trait LendWrite: Pwrite {
    /// Call `sink` once with writable slices covering `[offset,
    /// offset+count)` in order, and return what it returns. The host fills
    /// every byte with the write's data before `sink` returns `Ok`; keep
    /// the slices yours while it runs (hold your locks, which also keeps
    /// readers from seeing a half-written range). Only data that has
    /// already arrived is copied in, so this never waits on the client,
    /// and one client write may come as several calls. If `sink` fails, the
    /// slices may hold part of the data. Fail without calling it if the
    /// range cannot be written, or decline with [`Error::unsupported`]
    /// (before calling it) and the host writes the range with `pwrite`.
    /// Lend memory that may fault (a file mapping) only when
    /// [`Flags::kernel_fill`] says the host fills it through the kernel;
    /// decline otherwise. `pwrite` must still work: the host uses it for
    /// small writes and ones already buffered.
    fn pwrite_lend(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        sink: &mut dyn FnMut(&mut [&mut [u8]]) -> Result<()>,
    ) -> Result<()>;
}

/// Prefetching.
pub trait Cache: Connection {
    /// Advisory: bring `[offset, offset+count)` into a faster tier.
    fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()>;
}

/// The sink a plugin reports extents into.
pub struct ExtentList<'a> {
    pub(crate) sink: &'a mut abi::ExtentSink,
}

impl ExtentList<'_> {
    /// Run `f` against a list that records every extent added, and return
    /// them as `(offset, length, flags)`. For plugin unit tests.
    pub fn collect(f: impl FnOnce(&mut ExtentList<'_>) -> Result<()>) -> Result<Vec<(u64, u64, u32)>> {
        unsafe extern "C" fn add(ctx: *mut std::ffi::c_void, offset: u64, length: u64, flags: u32) -> i32 {
            // SAFETY: `ctx` is the Vec owned by `collect`, alive for the call.
            unsafe { (*(ctx as *mut Vec<(u64, u64, u32)>)).push((offset, length, flags)) };
            0
        }
        let mut got: Vec<(u64, u64, u32)> = Vec::new();
        let mut sink = abi::ExtentSink { ctx: &mut got as *mut Vec<(u64, u64, u32)> as *mut std::ffi::c_void, add };
        f(&mut ExtentList { sink: &mut sink })?;
        Ok(got)
    }

    /// Append an extent (`flags`: `abi::EXTENT_HOLE` | `abi::EXTENT_ZERO`).
    pub fn add(&mut self, offset: u64, length: u64, flags: u32) -> Result<()> {
        // SAFETY: the sink was supplied by the host for the duration of the
        // `extents` call this list is borrowed from.
        let rc = unsafe { (self.sink.add)(self.sink.ctx, offset, length, flags) };
        if rc == 0 {
            Ok(())
        } else {
            Err(crate::Error::new(rc, "extent refused by host"))
        }
    }
}
