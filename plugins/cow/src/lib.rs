//! `cow` filter: copy-on-write. Writes, trims and zeroes land in an overlay;
//! the layer below is opened read-only and never written.
//!
//! * `shared = true` (default): one overlay for every connection of the
//!   export (multi-conn safe); `shared = false`: a private, temporary
//!   overlay per connection (nbd-server's `copyonwrite`).
//! * `overlay = PATH`: a persistent overlay (`PATH` holds the data, `PATH.map`
//!   the block map) that survives restarts and crashes: after `kill -9`,
//!   every write acknowledged before a completed FLUSH (or with FUA) is
//!   there. Without it the overlay is an unlinked temporary file in `dir`.
//! * `blocksize`: copy granularity, a power of two of at least 4 KiB.
//! * `copy-on-read`: blocks read from below are copied into the overlay.
//!
//! Block status merges the overlay with the layer below.
//!
//! A temporary overlay is mapped: reads of its blocks are lent from the
//! mapping (ABI 1.3) and large writes are received straight into it (ABI
//! 1.5 `FilterTable::pwrite_lend`), one copy from the socket instead of
//! two. See [`FilterLendWrite for CowHandle`](CowHandle) for which writes.

mod overlay;

use nbdhost_plugin_api::abi::{EXTENT_HOLE, EXTENT_ZERO};
use nbdhost_plugin_api::{
    export_filter, host, lend_in_order, param, zero_pieces, Error, ExtentList, Filter, FilterConnection,
    FilterLendRead, FilterLendWrite, Flags, LendSource, Next, OpenContext, ParamKind, Params, Result, Support,
};
use overlay::{Overlay, OverlayError, BELOW, DATA, ZERO};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub use overlay::Overlay as CowOverlay;

fn ov_err(e: OverlayError) -> Error {
    Error::io(e.0)
}

/// Per-export settings and, when shared, the overlay.
pub struct Cow {
    block: u64,
    shared: bool,
    persistent: Option<PathBuf>,
    dir: PathBuf,
    copy_on_read: bool,
    overlay: Mutex<Option<Arc<Overlay>>>,
}

/// Per-connection handle.
pub struct CowHandle {
    next: Next,
    ov: Arc<Overlay>,
    copy_on_read: bool,
    shared: bool,
}

impl Filter for Cow {
    type Handle = CowHandle;
    const NAME: &'static std::ffi::CStr = c"cow";
    const VERSION: &'static std::ffi::CStr = c"0.1.0";
    const DESCRIPTION: &'static std::ffi::CStr = c"copy-on-write overlay over a read-only layer";
    const PARAMS: &'static [nbdhost_plugin_api::abi::ParamSpec] = &[
        param(c"blocksize", ParamKind::Size, false, Some(c"64K"), c"copy granularity: a power of two, at least 4K"),
        param(
            c"shared",
            ParamKind::Bool,
            false,
            Some(c"true"),
            c"one overlay for all connections (false: one per connection)",
        ),
        param(
            c"overlay",
            ParamKind::Path,
            false,
            None,
            c"persistent overlay file (its map goes to FILE.map); default: temporary",
        ),
        param(c"dir", ParamKind::Path, false, None, c"directory for temporary overlays (default: $TMPDIR or /tmp)"),
        param(c"copy-on-read", ParamKind::Bool, false, Some(c"false"), c"copy blocks read from below into the overlay"),
    ];
    const CHILD_READONLY: bool = true;

    fn create(p: &Params) -> Result<Self> {
        let block = p.size("blocksize")?.unwrap_or(64 * 1024);
        if !block.is_power_of_two() || !(4096..=64 << 20).contains(&block) {
            return Err(Error::invalid(format!("blocksize {block} must be a power of two between 4K and 64M")));
        }
        let shared = p.bool("shared")?.unwrap_or(true);
        let persistent = p.path("overlay");
        if persistent.is_some() && !shared {
            return Err(Error::invalid(
                "a persistent `overlay` must be shared (per-connection overlays are temporary)",
            ));
        }
        let dir = p.path("dir").unwrap_or_else(std::env::temp_dir);
        if !dir.is_dir() {
            return Err(Error::invalid(format!("dir {} is not a directory", dir.display())));
        }
        Ok(Cow {
            block,
            shared,
            persistent,
            dir,
            copy_on_read: p.bool("copy-on-read")?.unwrap_or(false),
            overlay: Mutex::new(None),
        })
    }

    fn open(&self, ctx: &OpenContext, mut children: Vec<Next>) -> Result<CowHandle> {
        let next = children.remove(0);
        let size = next.get_size()?;
        let ov = if self.shared {
            let mut slot = self.overlay.lock().unwrap_or_else(|e| e.into_inner());
            match &*slot {
                Some(ov) if ov.size() == size => ov.clone(),
                Some(ov) => {
                    return Err(Error::io(format!(
                        "the layer below is now {size} bytes, the overlay was made for {}",
                        ov.size()
                    )))
                }
                None => {
                    let ov = Arc::new(match &self.persistent {
                        Some(p) => Overlay::persistent(p, self.block, size).map_err(ov_err)?,
                        None => Overlay::temporary(&self.dir, self.block, size).map_err(ov_err)?,
                    });
                    if let Some(p) = &self.persistent {
                        host::info(&format!("export `{}`: persistent overlay {}", ctx.export_name, p.display()));
                    }
                    *slot = Some(ov.clone());
                    ov
                }
            }
        } else {
            Arc::new(Overlay::temporary(&self.dir, self.block, size).map_err(ov_err)?)
        };
        Ok(CowHandle { next, ov, copy_on_read: self.copy_on_read, shared: self.shared })
    }
}

impl Drop for Cow {
    fn drop(&mut self) {
        // A clean shutdown keeps everything, flushed or not.
        if let Some(ov) = self.overlay.lock().unwrap_or_else(|e| e.into_inner()).take() {
            if let Err(e) = ov.sync() {
                host::error(&format!("cow: final sync failed: {e}"));
            }
        }
    }
}

/// One block-sized piece of a request.
struct Piece {
    /// Block index.
    block: u64,
    /// Offset of the piece inside the block.
    within: u64,
    /// Length of the piece.
    len: u64,
    /// Offset of the piece inside the request.
    at: usize,
    /// Length of the whole block (the last block may be short).
    block_len: u64,
}

impl CowHandle {
    fn pieces(&self, offset: u64, count: u64) -> impl Iterator<Item = Piece> + '_ {
        let b = self.ov.block();
        let size = self.ov.size();
        let end = offset + count;
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let block = pos / b;
            let within = pos % b;
            let block_len = b.min(size - block * b);
            let len = (block_len - within).min(end - pos);
            let p = Piece { block, within, len, at: (pos - offset) as usize, block_len };
            pos += len;
            Some(p)
        })
    }

    /// Bring block `i` into the overlay (under its lock), applying `patch`
    /// to the block's current contents first. Returns once it is DATA.
    fn materialize(&self, i: u64, block_len: u64, patch: impl FnOnce(&mut [u8])) -> Result<()> {
        let mut blk = vec![0u8; block_len as usize];
        match self.ov.state(i) {
            BELOW => self.next.pread(&mut blk, i * self.ov.block(), Flags::default())?,
            DATA => self.ov.read_data(&mut blk, i * self.ov.block()).map_err(ov_err)?,
            _ => {}
        }
        patch(&mut blk);
        self.ov.store_block(i, &blk).map_err(ov_err)
    }

    /// Runs of blocks with the same state: (offset, length, state).
    fn runs(&self, offset: u64, count: u64) -> Vec<(u64, u64, u8)> {
        let mut out: Vec<(u64, u64, u8)> = Vec::new();
        for p in self.pieces(offset, count) {
            let st = self.ov.state(p.block);
            let start = offset + p.at as u64;
            match out.last_mut() {
                Some(last) if last.2 == st => last.1 += p.len,
                _ => out.push((start, p.len, st)),
            }
        }
        out
    }

    fn sync_if(&self, flags: Flags) -> Result<()> {
        if flags.fua() {
            self.ov.sync().map_err(ov_err)?;
        }
        Ok(())
    }

    fn zero_range(&self, count: u64, offset: u64) -> Result<()> {
        for p in self.pieces(offset, count) {
            if p.len == p.block_len {
                let _g = self.ov.lock(p.block);
                self.ov.zero_block(p.block);
                continue;
            }
            match self.ov.state(p.block) {
                ZERO => {}
                DATA => {
                    let zeros = vec![0u8; p.len as usize];
                    self.ov.write_data(&zeros, p.block * self.ov.block() + p.within).map_err(ov_err)?;
                }
                _ => {
                    let _g = self.ov.lock(p.block);
                    if self.ov.state(p.block) == DATA {
                        let zeros = vec![0u8; p.len as usize];
                        self.ov.write_data(&zeros, p.block * self.ov.block() + p.within).map_err(ov_err)?;
                    } else if self.ov.state(p.block) == BELOW {
                        let (w, l) = (p.within as usize, p.len as usize);
                        self.materialize(p.block, p.block_len, |b| b[w..w + l].fill(0))?;
                    }
                }
            }
        }
        Ok(())
    }
}

impl FilterConnection for CowHandle {
    fn next(&self) -> &Next {
        &self.next
    }
    fn get_size(&self) -> Result<u64> {
        Ok(self.ov.size())
    }
    fn can_write(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_flush(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_trim(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_zero(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_fast_zero(&self) -> Result<bool> {
        // Zeroing only records states (or touches one partial block).
        Ok(true)
    }
    fn can_fua(&self) -> Result<Support> {
        Ok(Support::Native)
    }
    fn can_multi_conn(&self) -> Result<bool> {
        Ok(self.shared)
    }
    fn can_extents(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_cache(&self) -> Result<Support> {
        Ok(Support::Native)
    }

    fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        for (o, l, st) in self.runs(offset, buf.len() as u64) {
            let dst = &mut buf[(o - offset) as usize..(o - offset + l) as usize];
            match st {
                DATA => self.ov.read_data(dst, o).map_err(ov_err)?,
                ZERO => dst.fill(0),
                _ if self.copy_on_read => {
                    for p in self.pieces(o, l) {
                        {
                            let _g = self.ov.lock(p.block);
                            if self.ov.state(p.block) == BELOW {
                                self.materialize(p.block, p.block_len, |_| {})?;
                            }
                        }
                        let at = p.at;
                        self.pread(&mut dst[at..at + p.len as usize], o + at as u64, Flags::default())?;
                    }
                }
                _ => self.next.pread(dst, o, Flags::default())?,
            }
        }
        Ok(())
    }

    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        for p in self.pieces(offset, buf.len() as u64) {
            let src = &buf[p.at..p.at + p.len as usize];
            let at = p.block * self.ov.block() + p.within;
            if p.len == p.block_len {
                let _g = self.ov.lock(p.block);
                self.ov.store_block(p.block, src).map_err(ov_err)?;
                continue;
            }
            if self.ov.state(p.block) == DATA {
                self.ov.write_data(src, at).map_err(ov_err)?;
                continue;
            }
            let _g = self.ov.lock(p.block);
            if self.ov.state(p.block) == DATA {
                self.ov.write_data(src, at).map_err(ov_err)?;
            } else {
                let w = p.within as usize;
                self.materialize(p.block, p.block_len, |b| b[w..w + src.len()].copy_from_slice(src))?;
            }
        }
        self.sync_if(flags)
    }

    fn flush(&self, _flags: Flags) -> Result<()> {
        self.ov.sync().map_err(ov_err)
    }

    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.zero_range(count, offset)?;
        self.sync_if(flags)
    }

    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.zero_range(count, offset)?;
        self.sync_if(flags)
    }

    fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        if !self.copy_on_read {
            return self.next.cache(count, offset, flags);
        }
        for p in self.pieces(offset, count) {
            let _g = self.ov.lock(p.block);
            if self.ov.state(p.block) == BELOW {
                self.materialize(p.block, p.block_len, |_| {})?;
            }
        }
        Ok(())
    }

    fn extents(&self, count: u64, offset: u64, flags: Flags, out: &mut ExtentList<'_>) -> Result<()> {
        for (o, l, st) in self.runs(offset, count) {
            match st {
                DATA => out.add(o, l, 0)?,
                ZERO => out.add(o, l, EXTENT_HOLE | EXTENT_ZERO)?,
                _ => {
                    // The host describes the whole run (see `Next`).
                    for (eo, el, ef) in self.next.extents_vec(l, o, Flags::default())? {
                        out.add(eo, el, ef)?;
                    }
                }
            }
            if flags.req_one() {
                break;
            }
        }
        Ok(())
    }
}

/// Most runs (of blocks below, in the overlay, zeroed) a lent read is made
/// of; each run below nests one lending call, so a read more scattered
/// than this is declined (and read with `pread`).
const MAX_LENT_RUNS: usize = 16;

/// Blocks the overlay does not hold are lent by the layer below, so a read
/// of unchanged data is sent from there (a mapped file, memory) without a
/// copy; blocks it holds are lent from the mapping of a temporary overlay.
/// Anything else (copy-on-read, a persistent overlay's blocks, a read in
/// many runs) is declined, and the host reads it with `pread`.
impl FilterLendRead for CowHandle {
    fn pread_lend(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        sink: &mut dyn FnMut(&[&[u8]]) -> Result<()>,
    ) -> Result<()> {
        let runs = self.runs(offset, count);
        let unmapped = || runs.iter().any(|r| r.2 == DATA) && !self.ov.is_mapped();
        if self.copy_on_read || runs.len() > MAX_LENT_RUNS || unmapped() {
            return Err(Error::unsupported("cow: this read is not lent"));
        }
        match runs.as_slice() {
            [(_, _, st)] if *st == BELOW => self.next.pread_lend(count, offset, flags, sink),
            _ => {
                // One source per run: below nests a lending call, the
                // overlay's blocks come from its mapping, zeros from zeros.
                let sources: Vec<Box<LendSource<'_>>> = runs
                    .iter()
                    .map(|&(o, l, st)| -> Box<LendSource<'_>> {
                        match st {
                            BELOW => Box::new(move |then| self.next.pread_lend(l, o, flags, then)),
                            DATA => Box::new(move |then| match self.ov.lendable(o, l) {
                                Some(mapped) => then(&[mapped]),
                                None => Err(Error::unsupported("cow: overlay data is not mapped")),
                            }),
                            _ => Box::new(move |then| then(&zero_pieces(l))),
                        }
                    })
                    .collect();
                lend_in_order(&sources, sink)
            }
        }
    }
}

/// Writes received straight into a temporary overlay's mapping: the
/// blocks the write covers whole become DATA once filled (their locks held
/// meanwhile, taken in stripe order, so a partial write cannot copy a
/// block from below over them halfway); a block covered only in part must
/// already be DATA (its old bytes are the rest of it). Declined, for the
/// host to call `pwrite`: a persistent overlay, a host that would not
/// fill through the kernel (TLS), pages not in the page cache, a partial
/// block not yet copied up.
impl FilterLendWrite for CowHandle {
    fn pwrite_lend(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        sink: &mut dyn FnMut(&mut [&mut [u8]]) -> Result<()>,
    ) -> Result<()> {
        if !flags.kernel_fill() {
            return Err(Error::unsupported("cow: the host would fill the overlay mapping with plain stores"));
        }
        // Before any lock: a persistent overlay (not mapped) or uncached
        // pages decline without waiting for anyone.
        let Some(mem) = self.ov.lendable_for_write(offset, count) else {
            return Err(Error::unsupported("cow: overlay not mapped, or its pages not cached"));
        };
        let mut whole = Vec::new();
        for p in self.pieces(offset, count) {
            if p.len == p.block_len {
                whole.push(p.block);
            } else if self.ov.state(p.block) != DATA {
                return Err(Error::unsupported("cow: a partial block not in the overlay yet"));
            }
        }
        let mut stripes: Vec<usize> = whole.iter().map(|&b| self.ov.stripe_of(b)).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let locks: Vec<_> = stripes.into_iter().map(|s| self.ov.lock_stripe(s)).collect();
        sink(&mut [mem])?;
        for b in whole {
            self.ov.mark_data(b);
        }
        // Not holding the blocks' locks across a FUA's fdatasync.
        drop(locks);
        self.sync_if(flags)
    }
}

export_filter!(Cow);
