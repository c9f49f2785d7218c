//! The choke point between the protocol and the layers (like nbdkit's
//! `backend.c`). Every call into a layer goes through [`CheckedLayer`]:
//! range and permission checks, capability caching, fallbacks for what a
//! plugin lacks (FUA by flush, zero by write, cache by read), validation of
//! what the plugin returns, thread-model locking and tracing all live here
//! once. Filters (when they arrive) reach the layer below through the same
//! type, so their calls get the same checks.

use crate::error::{NbdErrno, OpError};
use crate::loader::{LendFiller, LendReceiver, NextTable, NextTarget, PluginError, PluginHandle, Provided};
use nbdhost_plugin_api::abi::{self, BlockSize};
use nbdhost_plugin_api::ThreadModel;
use std::sync::{Arc, Mutex, MutexGuard};

/// Largest request payload the host accepts by default (the spec's
/// interoperable limit, 32 MiB).
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// How a capability with an emulated form is provided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    /// Not available.
    None,
    /// The host provides it on top of other operations.
    Emulated,
    /// The layer does it.
    Native,
}

/// What a layer can do, queried once when the connection opens it. The
/// answers are clamped to what the layer's callbacks can deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// Size in bytes.
    pub size: u64,
    /// Writes allowed (plugin side; the export may still be read-only).
    pub writable: bool,
    /// FLUSH.
    pub flush: bool,
    /// FUA on writes.
    pub fua: Support,
    /// TRIM.
    pub trim: bool,
    /// WRITE_ZEROES (emulated with writes when not native).
    pub zero: Support,
    /// FAST_ZERO can succeed (native zeroing that claims to be fast).
    pub fast_zero: bool,
    /// Safe for several connections.
    pub multi_conn: bool,
    /// Real allocation information.
    pub extents: bool,
    /// CACHE.
    pub cache: Support,
    /// Rotational hint.
    pub rotational: bool,
    /// Block-size constraints, defaults filled in.
    pub block_size: BlockSize,
    /// Reads can be lent instead of copied (ABI 1.1 `pread_lend`).
    pub lend: bool,
    /// Writes can be received into lent memory (ABI 1.2 `pwrite_lend`).
    pub lend_write: bool,
}

fn yes(v: Option<u32>, default: bool) -> bool {
    v.map(|v| v != 0).unwrap_or(default)
}

impl Capabilities {
    /// Query a layer and clamp its answers to what it can do.
    pub fn query(h: &dyn Layer) -> Result<Capabilities, PluginError> {
        let p = h.provided();
        let size = h.get_size()?;
        let writable = p.pwrite && yes(h.can(abi::CAN_WRITE)?, true);
        let flush = p.flush && yes(h.can(abi::CAN_FLUSH)?, true);
        let fua = if !writable {
            Support::None
        } else {
            match h.can(abi::CAN_FUA)?.unwrap_or(if flush { abi::SUPPORT_EMULATE } else { abi::SUPPORT_NONE }) {
                abi::SUPPORT_NATIVE => Support::Native,
                abi::SUPPORT_EMULATE if flush => Support::Emulated,
                _ => Support::None,
            }
        };
        let trim = writable && p.trim && yes(h.can(abi::CAN_TRIM)?, true);
        let zero = if !writable {
            Support::None
        } else if p.zero && yes(h.can(abi::CAN_ZERO)?, true) {
            Support::Native
        } else {
            Support::Emulated
        };
        let fast_zero = zero == Support::Native && yes(h.can(abi::CAN_FAST_ZERO)?, true);
        let extents = p.extents && yes(h.can(abi::CAN_EXTENTS)?, true);
        let cache =
            match h.can(abi::CAN_CACHE)?.unwrap_or(if p.cache { abi::SUPPORT_NATIVE } else { abi::SUPPORT_NONE }) {
                abi::SUPPORT_NATIVE if p.cache => Support::Native,
                abi::SUPPORT_NATIVE | abi::SUPPORT_EMULATE => Support::Emulated,
                _ => Support::None,
            };
        let declared = h.block_size()?;
        let block_size = normalise_block_size(declared).map_err(|m| PluginError {
            errno: libc::EINVAL,
            message: format!("{} declares invalid block sizes: {m}", h.name()),
        })?;
        Ok(Capabilities {
            size,
            writable,
            flush,
            fua,
            trim,
            zero,
            fast_zero,
            multi_conn: yes(h.can(abi::CAN_MULTI_CONN)?, false),
            extents,
            cache,
            rotational: yes(h.can(abi::CAN_ROTATIONAL)?, false),
            block_size,
            lend: p.pread_lend,
            lend_write: writable && p.pwrite_lend,
        })
    }
}

/// One layer of a pipeline as the choke point sees it: raw operations
/// with plugin semantics (POSIX errnos, ABI flags). Implemented by a
/// backend's handle and by [`FilterLayer`].
pub trait Layer: Send + Sync {
    /// Name for messages (`memory`, `cow`).
    fn name(&self) -> &str;
    /// Which operations can be called.
    fn provided(&self) -> Provided;
    /// Size.
    fn get_size(&self) -> Result<u64, PluginError>;
    /// Declared block sizes.
    fn block_size(&self) -> Result<Option<BlockSize>, PluginError>;
    /// Capability query (`abi::CAN_*`); `None`: no answer, use the default.
    fn can(&self, which: u32) -> Result<Option<u32>, PluginError>;
    /// Read.
    fn pread(&self, buf: &mut [u8], offset: u64, flags: u32) -> Result<(), PluginError>;
    /// Lend instead of reading (backends with `pread_lend` only): `sink`
    /// gets the layer's own pieces, valid while it runs.
    fn pread_lend(
        &self,
        _count: u64,
        _offset: u64,
        _flags: u32,
        _sink: &mut LendReceiver<'_>,
    ) -> Result<(), PluginError> {
        Err(PluginError { errno: libc::EINVAL, message: format!("{} does not lend data", self.name()) })
    }
    /// Write by filling memory the layer lends (backends with
    /// `pwrite_lend` only): `sink` gets the layer's pieces, exclusively
    /// while it runs.
    fn pwrite_lend(
        &self,
        _count: u64,
        _offset: u64,
        _flags: u32,
        _sink: &mut LendFiller<'_>,
    ) -> Result<(), PluginError> {
        Err(PluginError { errno: libc::EINVAL, message: format!("{} does not lend memory for writes", self.name()) })
    }
    /// Write.
    fn pwrite(&self, buf: &[u8], offset: u64, flags: u32) -> Result<(), PluginError>;
    /// Flush.
    fn flush(&self, flags: u32) -> Result<(), PluginError>;
    /// Trim.
    fn trim(&self, count: u64, offset: u64, flags: u32) -> Result<(), PluginError>;
    /// Zero.
    fn zero(&self, count: u64, offset: u64, flags: u32) -> Result<(), PluginError>;
    /// Cache.
    fn cache(&self, count: u64, offset: u64, flags: u32) -> Result<(), PluginError>;
    /// Extents, reported through `add(offset, length, flags)`.
    fn extents(
        &self,
        count: u64,
        offset: u64,
        flags: u32,
        add: &mut dyn FnMut(u64, u64, u32) -> Result<(), i32>,
    ) -> Result<(), PluginError>;
}

impl Layer for PluginHandle {
    fn name(&self) -> &str {
        &self.plugin().name
    }
    fn provided(&self) -> Provided {
        PluginHandle::provided(self)
    }
    fn get_size(&self) -> Result<u64, PluginError> {
        PluginHandle::get_size(self)
    }
    fn block_size(&self) -> Result<Option<BlockSize>, PluginError> {
        PluginHandle::block_size(self)
    }
    fn can(&self, which: u32) -> Result<Option<u32>, PluginError> {
        PluginHandle::can(self, which)
    }
    fn pread(&self, buf: &mut [u8], offset: u64, flags: u32) -> Result<(), PluginError> {
        PluginHandle::pread(self, buf, offset, flags)
    }
    fn pread_lend(&self, count: u64, offset: u64, flags: u32, sink: &mut LendReceiver<'_>) -> Result<(), PluginError> {
        PluginHandle::pread_lend(self, count, offset, flags, sink)
    }
    fn pwrite_lend(&self, count: u64, offset: u64, flags: u32, sink: &mut LendFiller<'_>) -> Result<(), PluginError> {
        PluginHandle::pwrite_lend(self, count, offset, flags, sink)
    }
    fn pwrite(&self, buf: &[u8], offset: u64, flags: u32) -> Result<(), PluginError> {
        PluginHandle::pwrite(self, buf, offset, flags)
    }
    fn flush(&self, flags: u32) -> Result<(), PluginError> {
        PluginHandle::flush(self, flags)
    }
    fn trim(&self, count: u64, offset: u64, flags: u32) -> Result<(), PluginError> {
        PluginHandle::trim(self, count, offset, flags)
    }
    fn zero(&self, count: u64, offset: u64, flags: u32) -> Result<(), PluginError> {
        PluginHandle::zero(self, count, offset, flags)
    }
    fn cache(&self, count: u64, offset: u64, flags: u32) -> Result<(), PluginError> {
        PluginHandle::cache(self, count, offset, flags)
    }
    fn extents(
        &self,
        count: u64,
        offset: u64,
        flags: u32,
        add: &mut dyn FnMut(u64, u64, u32) -> Result<(), i32>,
    ) -> Result<(), PluginError> {
        PluginHandle::extents(self, count, offset, flags, add)
    }
}

/// A filter's handle over the checked layers below it. An operation the
/// filter does not provide goes straight to its only child (through that
/// child's checks).
pub struct FilterLayer {
    // Field order is drop order: the filter is closed before the tables
    // and layers it points into go away.
    handle: PluginHandle,
    _nexts: Vec<NextTable>,
    children: Vec<Arc<CheckedLayer>>,
    own: Provided,
}

impl FilterLayer {
    /// Open `filter` over `children` (already opened and checked).
    pub fn open(
        instance: &Arc<crate::loader::PluginInstance>,
        req: &crate::loader::OpenRequest<'_>,
        children: Vec<Arc<CheckedLayer>>,
    ) -> Result<FilterLayer, PluginError> {
        let nexts: Vec<NextTable> = children.iter().map(|c| NextTable::new(c.clone() as Arc<dyn NextTarget>)).collect();
        let handle = instance.open_filter(req, &nexts)?;
        let own = handle.provided();
        Ok(FilterLayer { handle, _nexts: nexts, children, own })
    }

    /// The child calls pass through to, if there is exactly one.
    fn through(&self) -> Option<&CheckedLayer> {
        match self.children.as_slice() {
            [only] => Some(only),
            _ => None,
        }
    }

    fn missing(&self, what: &str) -> PluginError {
        PluginError { errno: libc::EINVAL, message: format!("{}: no {what} operation", self.handle.plugin().name) }
    }
}

fn below(e: OpError) -> PluginError {
    PluginError { errno: e.errno.to_posix(), message: e.message }
}

impl Layer for FilterLayer {
    fn name(&self) -> &str {
        &self.handle.plugin().name
    }
    fn provided(&self) -> Provided {
        let mut p = self.own;
        if let Some(c) = self.through() {
            let caps = c.caps();
            p.get_size = true;
            p.block_size = true;
            p.pread = true;
            p.pwrite |= !c.readonly();
            p.flush |= caps.flush;
            p.trim |= caps.trim;
            p.zero |= !c.readonly();
            p.extents |= caps.extents;
            p.cache |= caps.cache != Support::None;
        }
        // A filter lends only what the layers below it lend: its own
        // `pread_lend` where every child lends, or theirs where it reads
        // nothing itself.
        p.pread_lend = if self.own.pread_lend {
            self.children.iter().all(|c| c.caps().lend)
        } else {
            !self.own.pread && self.through().is_some_and(|c| c.caps().lend)
        };
        // A filter that lends for writes (ABI 1.5) keeps the data itself
        // (`cow`'s overlay): nothing below is involved. Lending does not
        // pass through a filter that has none.
        p.pwrite_lend = self.own.pwrite_lend;
        p
    }
    fn get_size(&self) -> Result<u64, PluginError> {
        match self.through() {
            Some(c) if !self.own.get_size => Ok(c.caps().size),
            _ => self.handle.get_size(),
        }
    }
    fn block_size(&self) -> Result<Option<BlockSize>, PluginError> {
        match self.through() {
            Some(c) if !self.own.block_size => Ok(Some(c.caps().block_size)),
            _ => self.handle.block_size(),
        }
    }
    fn can(&self, which: u32) -> Result<Option<u32>, PluginError> {
        match (self.handle.can(which)?, self.through()) {
            (Some(v), _) => Ok(Some(v)),
            (None, Some(c)) => c.can(which).map(Some),
            (None, None) => Ok(None),
        }
    }
    fn pread(&self, buf: &mut [u8], offset: u64, flags: u32) -> Result<(), PluginError> {
        match self.through() {
            Some(c) if !self.own.pread => c.read(buf, offset).map_err(below),
            _ => self.handle.pread(buf, offset, flags),
        }
    }
    fn pread_lend(&self, count: u64, offset: u64, flags: u32, sink: &mut LendReceiver<'_>) -> Result<(), PluginError> {
        match self.through() {
            Some(c) if !self.own.pread && !self.own.pread_lend => c.read_lend(count, offset, sink).map_err(below),
            _ => self.handle.pread_lend(count, offset, flags, sink),
        }
    }
    fn pwrite_lend(&self, count: u64, offset: u64, flags: u32, sink: &mut LendFiller<'_>) -> Result<(), PluginError> {
        // Only called where `provided` said the filter lends itself.
        self.handle.pwrite_lend(count, offset, flags, sink)
    }
    fn pwrite(&self, buf: &[u8], offset: u64, flags: u32) -> Result<(), PluginError> {
        match self.through() {
            Some(c) if !self.own.pwrite => c.write(buf, offset, flags & abi::FLAG_FUA != 0).map_err(below),
            _ => self.handle.pwrite(buf, offset, flags),
        }
    }
    fn flush(&self, flags: u32) -> Result<(), PluginError> {
        match self.through() {
            Some(c) if !self.own.flush => c.flush().map_err(below),
            _ => self.handle.flush(flags),
        }
    }
    fn trim(&self, count: u64, offset: u64, flags: u32) -> Result<(), PluginError> {
        match self.through() {
            Some(c) if !self.own.trim => c.trim(count, offset, flags & abi::FLAG_FUA != 0).map_err(below),
            _ => self.handle.trim(count, offset, flags),
        }
    }
    fn zero(&self, count: u64, offset: u64, flags: u32) -> Result<(), PluginError> {
        match self.through() {
            Some(c) if !self.own.zero => NextTarget::zero(c, count, offset, flags),
            _ => self.handle.zero(count, offset, flags),
        }
    }
    fn cache(&self, count: u64, offset: u64, flags: u32) -> Result<(), PluginError> {
        match self.through() {
            Some(c) if !self.own.cache => c.cache(count, offset).map_err(below),
            _ if self.own.cache => self.handle.cache(count, offset, flags),
            _ => Err(self.missing("cache")),
        }
    }
    fn extents(
        &self,
        count: u64,
        offset: u64,
        flags: u32,
        add: &mut dyn FnMut(u64, u64, u32) -> Result<(), i32>,
    ) -> Result<(), PluginError> {
        match self.through() {
            Some(c) if !self.own.extents => {
                let mut pos = offset;
                for e in c.extents(count, offset, flags & abi::FLAG_REQ_ONE != 0).map_err(below)? {
                    add(pos, e.length, e.flags)
                        .map_err(|errno| PluginError { errno, message: "extent refused".into() })?;
                    pos += e.length;
                }
                Ok(())
            }
            _ => self.handle.extents(count, offset, flags, add),
        }
    }
}

/// The checked layer seen from a filter above it.
impl NextTarget for CheckedLayer {
    fn get_size(&self) -> Result<u64, PluginError> {
        Ok(self.caps.size)
    }
    fn block_size(&self) -> Result<BlockSize, PluginError> {
        Ok(self.caps.block_size)
    }
    fn can(&self, which: u32) -> Result<u32, PluginError> {
        let c = &self.caps;
        let w = !self.readonly;
        // What the filter can count on when it calls us: our checks emulate
        // FUA, zeroing and caching, so those are "native" from above.
        Ok(match which {
            abi::CAN_WRITE => w as u32,
            abi::CAN_FLUSH => c.flush as u32,
            abi::CAN_ROTATIONAL => c.rotational as u32,
            abi::CAN_TRIM => (w && c.trim) as u32,
            abi::CAN_ZERO => w as u32,
            abi::CAN_FAST_ZERO => (w && c.fast_zero) as u32,
            abi::CAN_FUA => {
                if w && c.fua != Support::None {
                    abi::SUPPORT_NATIVE
                } else {
                    abi::SUPPORT_NONE
                }
            }
            abi::CAN_MULTI_CONN => c.multi_conn as u32,
            abi::CAN_EXTENTS => c.extents as u32,
            abi::CAN_CACHE => {
                if c.cache != Support::None {
                    abi::SUPPORT_NATIVE
                } else {
                    abi::SUPPORT_NONE
                }
            }
            other => return Err(PluginError { errno: libc::EINVAL, message: format!("unknown capability {other}") }),
        })
    }
    fn pread(&self, buf: &mut [u8], offset: u64, _flags: u32) -> Result<(), PluginError> {
        self.read(buf, offset).map_err(below)
    }
    fn pwrite(&self, buf: &[u8], offset: u64, flags: u32) -> Result<(), PluginError> {
        self.write(buf, offset, flags & abi::FLAG_FUA != 0).map_err(below)
    }
    fn flush(&self, _flags: u32) -> Result<(), PluginError> {
        CheckedLayer::flush(self).map_err(below)
    }
    fn trim(&self, count: u64, offset: u64, flags: u32) -> Result<(), PluginError> {
        CheckedLayer::trim(self, count, offset, flags & abi::FLAG_FUA != 0).map_err(below)
    }
    fn zero(&self, count: u64, offset: u64, flags: u32) -> Result<(), PluginError> {
        let may_trim = flags & abi::FLAG_MAY_TRIM != 0;
        let fast = flags & abi::FLAG_FAST_ZERO != 0;
        CheckedLayer::zero(self, count, offset, may_trim, fast, flags & abi::FLAG_FUA != 0).map_err(below)
    }
    /// Unlike a client's BLOCK_STATUS, a filter gets the whole range
    /// described (unless it asked for one extent): a layer that stops short
    /// is asked again from where it stopped, so no filter needs that loop.
    fn extents(&self, count: u64, offset: u64, flags: u32) -> Result<Vec<(u64, u32)>, PluginError> {
        let req_one = flags & abi::FLAG_REQ_ONE != 0;
        let end = offset + count;
        let mut out: Vec<(u64, u32)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let v = CheckedLayer::extents(self, end - pos, pos, req_one).map_err(below)?;
            for e in v {
                let n = e.length.min(end - pos);
                out.push((n, e.flags));
                pos += n;
            }
            if req_one {
                break;
            }
        }
        Ok(out)
    }
    fn cache(&self, count: u64, offset: u64, _flags: u32) -> Result<(), PluginError> {
        CheckedLayer::cache(self, count, offset).map_err(below)
    }
    /// Lends what this layer lends; reads the rest into a buffer of this
    /// thread's and lends that, so a filter can always ask.
    fn pread_lend(&self, count: u64, offset: u64, _flags: u32, sink: &mut LendReceiver<'_>) -> Result<(), PluginError> {
        let refused = |errno: i32| PluginError { errno, message: format!("{}: lent data refused", self.name) };
        if self.caps.lend {
            return self.read_lend(count, offset, sink).map_err(below);
        }
        self.readable(count, offset).map_err(below)?;
        let len = count as usize;
        let mut read_and_lend = |buf: &mut Vec<u8>| -> Result<(), PluginError> {
            if buf.len() < len {
                buf.resize(len, 0);
            }
            self.read(&mut buf[..len], offset).map_err(below)?;
            sink(&[&buf[..len]]).map_err(refused)
        };
        LEND_SCRATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut buf) => {
                let r = read_and_lend(&mut buf);
                if buf.capacity() > LEND_SCRATCH_KEEP {
                    *buf = Vec::new();
                }
                r
            }
            // Lending nested in lending on this thread (a filter that lends
            // from two places below): a buffer of its own.
            Err(_) => read_and_lend(&mut Vec::new()),
        })
    }
}

thread_local! {
    /// Where [`NextTarget::pread_lend`] reads what a layer cannot lend.
    static LEND_SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Largest scratch buffer kept for the next lend (bigger ones are freed).
const LEND_SCRATCH_KEEP: usize = 4 << 20;

/// Fill defaults into declared block sizes and check the spec's rules.
pub fn normalise_block_size(declared: Option<BlockSize>) -> Result<BlockSize, String> {
    let Some(b) = declared else {
        return Ok(BlockSize { minimum: 1, preferred: 4096, maximum: DEFAULT_MAX_PAYLOAD });
    };
    let minimum = if b.minimum == 0 { 1 } else { b.minimum };
    let preferred = if b.preferred == 0 { 4096.max(minimum) } else { b.preferred };
    let maximum = if b.maximum == 0 { DEFAULT_MAX_PAYLOAD } else { b.maximum.min(DEFAULT_MAX_PAYLOAD) };
    if !minimum.is_power_of_two() || minimum > 65536 {
        return Err(format!("minimum {minimum} must be a power of two up to 65536"));
    }
    if !preferred.is_power_of_two() || preferred < minimum.max(512) {
        return Err(format!("preferred {preferred} must be a power of two of at least max(minimum, 512)"));
    }
    if maximum < preferred {
        return Err(format!("maximum {maximum} is smaller than preferred {preferred}"));
    }
    Ok(BlockSize { minimum, preferred, maximum })
}

/// One extent of a block-status answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (non-zero).
    pub length: u64,
    /// `abi::EXTENT_*` flags.
    pub flags: u32,
}

/// Serialisation required by the pipeline's thread model.
#[derive(Clone, Default)]
pub struct RequestLock(Option<Arc<Mutex<()>>>);

impl RequestLock {
    /// A lock shared by everyone holding a clone of it.
    pub fn shared() -> Self {
        RequestLock(Some(Arc::new(Mutex::new(()))))
    }
    /// No serialisation.
    pub fn none() -> Self {
        RequestLock(None)
    }
    fn enter(&self) -> Option<MutexGuard<'_, ()>> {
        self.0.as_ref().map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Pick the request lock for a connection given the pipeline's (most
/// restrictive) thread model: all-requests uses the export's shared lock,
/// per-connection serialisation a fresh one.
pub fn request_lock_for(model: ThreadModel, export_lock: &RequestLock) -> RequestLock {
    match model {
        ThreadModel::Parallel => RequestLock::none(),
        ThreadModel::SerializeRequests => RequestLock::shared(),
        ThreadModel::SerializeAllRequests | ThreadModel::SerializeConnections => export_lock.clone(),
    }
}

/// A connection's view of a layer, with every check applied.
pub struct CheckedLayer {
    inner: Box<dyn Layer>,
    caps: Capabilities,
    readonly: bool,
    lock: RequestLock,
    name: String,
}

/// A buffer of zeros used to emulate WRITE_ZEROES without allocating.
static ZEROS: [u8; 1 << 20] = [0u8; 1 << 20];

impl CheckedLayer {
    /// Wrap an opened layer: capabilities are queried here, once.
    pub fn new(inner: Box<dyn Layer>, readonly: bool, lock: RequestLock, name: &str) -> Result<Self, OpError> {
        let caps = Capabilities::query(&*inner)?;
        let readonly = readonly || !caps.writable;
        Ok(CheckedLayer { inner, caps, readonly, lock, name: name.to_string() })
    }

    /// Cached capabilities.
    pub fn caps(&self) -> &Capabilities {
        &self.caps
    }

    /// Whether writes are refused.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// The range and block-size rules every request to this layer obeys,
    /// from a client or from a filter above: inside the layer, aligned to
    /// its minimum block (an unaligned tail is fine at the very end), and
    /// for data-carrying requests no longer than its maximum payload.
    fn range(&self, count: u64, offset: u64, past_end: NbdErrno, what: &str) -> Result<(), OpError> {
        let end = match offset.checked_add(count) {
            Some(end) if end <= self.caps.size => end,
            _ => {
                return Err(OpError::new(
                    past_end,
                    format!(
                        "{}: {what} {offset}+{count} is beyond the end of the export ({} bytes)",
                        self.name, self.caps.size
                    ),
                ))
            }
        };
        let min = self.caps.block_size.minimum as u64;
        if min > 1 && (!offset.is_multiple_of(min) || (!count.is_multiple_of(min) && end != self.caps.size)) {
            return Err(OpError::inval(format!(
                "{}: {what} {offset}+{count} is not aligned to the {min}-byte minimum block",
                self.name
            )));
        }
        Ok(())
    }

    /// Data-carrying requests (read, write) may not exceed the maximum
    /// payload. Checked before anything is buffered for them.
    pub fn check_payload(&self, count: u64, what: &str) -> Result<(), OpError> {
        let max = self.caps.block_size.maximum as u64;
        if count > max {
            return Err(OpError::inval(format!(
                "{}: {what} of {count} bytes exceeds the maximum payload {max}",
                self.name
            )));
        }
        Ok(())
    }

    fn writable(&self, what: &str) -> Result<(), OpError> {
        if self.readonly {
            Err(OpError::new(NbdErrno::Perm, format!("{}: {what} on a read-only export", self.name)))
        } else {
            Ok(())
        }
    }

    /// Emulate FUA with a flush after a successful write-type operation.
    fn after_write(&self, fua: bool) -> Result<(), OpError> {
        if fua && self.caps.fua == Support::Emulated {
            self.inner.flush(0)?;
        }
        Ok(())
    }

    fn fua_flag(&self, fua: bool) -> u32 {
        if fua && self.caps.fua == Support::Native {
            abi::FLAG_FUA
        } else {
            0
        }
    }

    /// Read `buf.len()` bytes at `offset`.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), OpError> {
        self.readable(buf.len() as u64, offset)?;
        if buf.is_empty() {
            return Ok(());
        }
        let _g = self.lock.enter();
        log::trace!("{}: pread {}+{}", self.name, offset, buf.len());
        self.inner.pread(buf, offset, 0).map_err(Into::into)
    }

    /// The checks every read passes: payload size and range.
    fn readable(&self, len: u64, offset: u64) -> Result<(), OpError> {
        self.check_payload(len, "read")?;
        self.range(len, offset, NbdErrno::Inval, "read")
    }

    /// Read `len` bytes at `offset` by having the layer lend them to `sink`
    /// (only if [`Capabilities::lend`]); the same checks as [`Self::read`].
    pub fn read_lend(&self, len: u64, offset: u64, sink: &mut LendReceiver<'_>) -> Result<(), OpError> {
        self.readable(len, offset)?;
        if len == 0 {
            return sink(&[])
                .map_err(|errno| OpError::from(PluginError { errno, message: "lent data refused".into() }));
        }
        let _g = self.lock.enter();
        log::trace!("{}: pread_lend {}+{}", self.name, offset, len);
        self.inner.pread_lend(len, offset, 0, sink).map_err(Into::into)
    }

    /// Write `buf` at `offset`.
    pub fn write(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), OpError> {
        self.check_write(buf.len() as u64, offset)?;
        if buf.is_empty() {
            return Ok(());
        }
        let _g = self.lock.enter();
        log::trace!("{}: pwrite {}+{} fua={}", self.name, offset, buf.len(), fua);
        self.inner.pwrite(buf, offset, self.fua_flag(fua))?;
        self.after_write(fua)
    }

    /// The checks every write of `len` bytes at `offset` passes (read-only
    /// export, payload size, range), for a caller that writes it in parts
    /// with [`Self::write_lend`] and must know first that all of it may be
    /// written.
    pub fn check_write(&self, len: u64, offset: u64) -> Result<(), OpError> {
        self.writable("write")?;
        self.check_payload(len, "write")?;
        self.range(len, offset, NbdErrno::NoSpc, "write")
    }

    /// Write `len` bytes at `offset` by having the layer lend the memory
    /// they go to, which `sink` fills (only if [`Capabilities::lend_write`]);
    /// the same checks as [`Self::write`]. One client write may come as
    /// several parts: native FUA goes with each, an emulated one is a
    /// single flush after the `last`. `kernel_fill`: `sink` fills only
    /// through the kernel (ABI 1.5 `FLAG_KERNEL_FILL`), so the layer may
    /// lend memory that can fault. The layer may decline (`NotSup` with
    /// `sink` not run): write that part with [`Self::write`].
    pub fn write_lend(
        &self,
        len: u64,
        offset: u64,
        fua: bool,
        last: bool,
        kernel_fill: bool,
        sink: &mut LendFiller<'_>,
    ) -> Result<(), OpError> {
        self.check_write(len, offset)?;
        if len == 0 {
            return Ok(());
        }
        let _g = self.lock.enter();
        log::trace!("{}: pwrite_lend {}+{} fua={} kernel_fill={}", self.name, offset, len, fua, kernel_fill);
        let flags = self.fua_flag(fua) | if kernel_fill { abi::FLAG_KERNEL_FILL } else { 0 };
        self.inner.pwrite_lend(len, offset, flags, sink)?;
        self.after_write(fua && last)
    }

    /// Flush everything written so far.
    pub fn flush(&self) -> Result<(), OpError> {
        if !self.caps.flush {
            return Err(OpError::inval(format!("{}: flush is not supported", self.name)));
        }
        let _g = self.lock.enter();
        log::trace!("{}: flush", self.name);
        self.inner.flush(0).map_err(Into::into)
    }

    /// Trim.
    pub fn trim(&self, count: u64, offset: u64, fua: bool) -> Result<(), OpError> {
        self.writable("trim")?;
        if !self.caps.trim {
            return Err(OpError::inval(format!("{}: trim is not supported", self.name)));
        }
        self.range(count, offset, NbdErrno::Inval, "trim")?;
        if count == 0 {
            return Ok(());
        }
        let _g = self.lock.enter();
        log::trace!("{}: trim {}+{}", self.name, offset, count);
        self.inner.trim(count, offset, self.fua_flag(fua))?;
        self.after_write(fua)
    }

    /// Zero a range. `may_trim`: holes allowed; `fast`: fail with ENOTSUP
    /// unless it is cheap.
    pub fn zero(&self, count: u64, offset: u64, may_trim: bool, fast: bool, fua: bool) -> Result<(), OpError> {
        self.writable("write zeroes")?;
        self.range(count, offset, NbdErrno::NoSpc, "write zeroes")?;
        if count == 0 {
            return Ok(());
        }
        let _g = self.lock.enter();
        log::trace!("{}: zero {}+{} may_trim={} fast={}", self.name, offset, count, may_trim, fast);
        if self.caps.zero == Support::Native {
            let mut flags = self.fua_flag(fua);
            if may_trim {
                flags |= abi::FLAG_MAY_TRIM;
            }
            if fast {
                flags |= abi::FLAG_FAST_ZERO;
            }
            match self.inner.zero(count, offset, flags) {
                Ok(()) => return self.after_write(fua),
                Err(e) if e.errno == libc::ENOTSUP || e.errno == libc::EOPNOTSUPP => {}
                Err(e) => return Err(e.into()),
            }
        }
        if fast {
            return Err(OpError::new(NbdErrno::NotSup, format!("{}: zeroing this range is not fast here", self.name)));
        }
        let mut done = 0u64;
        while done < count {
            let n = (count - done).min(ZEROS.len() as u64) as usize;
            self.inner.pwrite(&ZEROS[..n], offset + done, 0)?;
            done += n as u64;
        }
        self.after_write(fua)
    }

    /// Advisory prefetch.
    pub fn cache(&self, count: u64, offset: u64) -> Result<(), OpError> {
        self.range(count, offset, NbdErrno::Inval, "cache")?;
        if count == 0 {
            return Ok(());
        }
        let _g = self.lock.enter();
        match self.caps.cache {
            Support::Native => self.inner.cache(count, offset, 0).map_err(Into::into),
            Support::Emulated => {
                // Read through the range in bounded chunks, discarding.
                let mut buf = vec![0u8; count.min(1 << 20) as usize];
                let mut done = 0;
                while done < count {
                    let n = (count - done).min(buf.len() as u64) as usize;
                    self.inner.pread(&mut buf[..n], offset + done, 0)?;
                    done += n as u64;
                }
                Ok(())
            }
            Support::None => Err(OpError::inval(format!("{}: cache is not supported", self.name))),
        }
    }

    /// Allocation map of `[offset, offset+count)`: at least one extent,
    /// contiguous from `offset`, never past the end of the export. Without
    /// extent support the whole range is reported as data.
    pub fn extents(&self, count: u64, offset: u64, req_one: bool) -> Result<Vec<Extent>, OpError> {
        self.range(count, offset, NbdErrno::Inval, "block status")?;
        if count == 0 {
            return Err(OpError::inval(format!("{}: block status of zero length", self.name)));
        }
        if !self.caps.extents {
            return Ok(vec![Extent { length: count, flags: 0 }]);
        }
        let _g = self.lock.enter();
        let size = self.caps.size;
        let mut out: Vec<Extent> = Vec::new();
        let mut next = offset;
        let mut bad: Option<String> = None;
        let mut add = |o: u64, len: u64, flags: u32| -> Result<(), i32> {
            if next >= size {
                // Past the end of the export: nothing to describe.
                return Ok(());
            }
            if o != next || len == 0 {
                bad = Some(format!("extent {o}+{len} does not continue at {next}"));
                return Err(libc::EINVAL);
            }
            let len = len.min(size - o);
            next = o + len;
            let flags = flags & (abi::EXTENT_HOLE | abi::EXTENT_ZERO);
            match out.last_mut() {
                Some(last) if last.flags == flags => last.length += len,
                _ => out.push(Extent { length: len, flags }),
            }
            Ok(())
        };
        let flags = if req_one { abi::FLAG_REQ_ONE } else { 0 };
        let r = self.inner.extents(count, offset, flags, &mut add);
        if let Some(why) = bad {
            return Err(OpError::new(NbdErrno::Io, format!("{}: plugin returned bad extents: {why}", self.name)));
        }
        r?;
        if out.is_empty() {
            return Err(OpError::new(NbdErrno::Io, format!("{}: plugin returned no extents", self.name)));
        }
        if req_one {
            out.truncate(1);
            out[0].length = out[0].length.min(count);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A read-only layer whose byte at `i` is `i % 251`, lending or not.
    struct Counting {
        lends: bool,
    }

    impl Layer for Counting {
        fn name(&self) -> &str {
            "counting"
        }
        fn provided(&self) -> Provided {
            Provided { get_size: true, pread: true, pread_lend: self.lends, ..Provided::default() }
        }
        fn get_size(&self) -> Result<u64, PluginError> {
            Ok(1 << 20)
        }
        fn block_size(&self) -> Result<Option<BlockSize>, PluginError> {
            Ok(None)
        }
        fn can(&self, _which: u32) -> Result<Option<u32>, PluginError> {
            Ok(None)
        }
        fn pread(&self, buf: &mut [u8], offset: u64, _flags: u32) -> Result<(), PluginError> {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = ((offset + i as u64) % 251) as u8;
            }
            Ok(())
        }
        fn pread_lend(
            &self,
            count: u64,
            offset: u64,
            flags: u32,
            sink: &mut LendReceiver<'_>,
        ) -> Result<(), PluginError> {
            // Two pieces, to show they arrive in order.
            let mut buf = vec![0u8; count as usize];
            self.pread(&mut buf, offset, flags)?;
            let (a, b) = buf.split_at(count as usize / 3);
            sink(&[a, b]).map_err(|errno| PluginError { errno, message: "refused".into() })
        }
        fn pwrite(&self, _: &[u8], _: u64, _: u32) -> Result<(), PluginError> {
            unreachable!("read-only")
        }
        fn flush(&self, _: u32) -> Result<(), PluginError> {
            unreachable!("no flush")
        }
        fn trim(&self, _: u64, _: u64, _: u32) -> Result<(), PluginError> {
            unreachable!("read-only")
        }
        fn zero(&self, _: u64, _: u64, _: u32) -> Result<(), PluginError> {
            unreachable!("read-only")
        }
        fn cache(&self, _: u64, _: u64, _: u32) -> Result<(), PluginError> {
            unreachable!("no cache")
        }
        fn extents(
            &self,
            _: u64,
            _: u64,
            _: u32,
            _: &mut dyn FnMut(u64, u64, u32) -> Result<(), i32>,
        ) -> Result<(), PluginError> {
            unreachable!("no extents")
        }
    }

    /// What a filter gets from `NextOps::pread_lend`: the lender's pieces
    /// where it lends, a buffer read for it where it does not, the same
    /// bytes either way; checks first, and the sink's errno passed back.
    #[test]
    fn a_filter_can_always_ask_the_layer_below_to_lend() {
        for lends in [true, false] {
            let layer = CheckedLayer::new(Box::new(Counting { lends }), true, RequestLock::none(), "below").unwrap();
            assert_eq!(layer.caps().lend, lends);
            let (count, offset) = (300_000u64, 4242u64);
            let mut got: Vec<u8> = Vec::new();
            let mut pieces = 0;
            NextTarget::pread_lend(&layer, count, offset, 0, &mut |p: &[&[u8]]| {
                pieces = p.len();
                p.iter().for_each(|p| got.extend_from_slice(p));
                Ok(())
            })
            .unwrap();
            let mut want = vec![0u8; count as usize];
            Counting { lends }.pread(&mut want, offset, 0).unwrap();
            assert!(got == want, "lends={lends}: wrong bytes");
            assert_eq!(pieces, if lends { 2 } else { 1 });
            // Past the end: refused before anything is read or lent.
            let e = NextTarget::pread_lend(&layer, 4096, (1 << 20) - 100, 0, &mut |_: &[&[u8]]| {
                panic!("lent past the end")
            })
            .unwrap_err();
            assert_eq!(e.errno, libc::EINVAL);
            // The sink's error comes back (as an NBD errno: the ABI
            // trampoline hands a filter its own errno back unchanged).
            let e = NextTarget::pread_lend(&layer, 65536, 0, 0, &mut |_: &[&[u8]]| Err(libc::ENOSPC)).unwrap_err();
            assert_eq!(e.errno, libc::ENOSPC, "lends={lends}");
        }
    }

    #[test]
    fn block_size_defaults_and_rules() {
        let d = normalise_block_size(None).unwrap();
        assert_eq!((d.minimum, d.preferred, d.maximum), (1, 4096, DEFAULT_MAX_PAYLOAD));
        let b = normalise_block_size(Some(BlockSize { minimum: 512, preferred: 0, maximum: 0 })).unwrap();
        assert_eq!((b.minimum, b.preferred), (512, 4096));
        assert!(normalise_block_size(Some(BlockSize { minimum: 3, preferred: 4096, maximum: 0 })).is_err());
        assert!(normalise_block_size(Some(BlockSize { minimum: 1 << 17, preferred: 0, maximum: 0 })).is_err());
        assert!(normalise_block_size(Some(BlockSize { minimum: 512, preferred: 256, maximum: 0 })).is_err());
        assert!(normalise_block_size(Some(BlockSize { minimum: 512, preferred: 8192, maximum: 4096 })).is_err());
    }
}
