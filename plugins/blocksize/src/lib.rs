//! `blocksize` filter: serve a layer with awkward block-size limits to
//! clients that know nothing of them.
//!
//! The layer below is only ever given requests aligned to a minimum block
//! (`minblock`, raised to the minimum the layer below declares), reads and
//! writes of at most `maxdata` bytes (lowered to the maximum the layer below
//! declares) and trims, zeroes, cache requests and block-status queries of
//! at most `maxlen` bytes. A request that ends at the end of the disk may
//! end there even when the disk size is not a multiple of the block. Clients
//! are told the minimum block is 1 and may send up to the server's maximum
//! payload:
//!
//! * unaligned reads are widened to whole blocks and trimmed;
//! * unaligned writes and zeroes read, modify and write the partial blocks
//!   at their ends. Such read-modify-write cycles exclude every other write
//!   to the export (all its connections), so writes to different bytes of
//!   one block never undo each other;
//! * the unaligned ends of a trim are dropped (a trim is advisory);
//! * large requests are split into pieces.

use nbdhost_plugin_api::abi::FLAG_FUA;
use nbdhost_plugin_api::{
    export_filter, host, param, BlockSize, Error, ExtentList, Filter, FilterConnection, FilterLendRead, Flags, Next,
    OpenContext, ParamKind, Params, Result,
};
use std::sync::{Arc, RwLock};

/// Per-export settings.
pub struct Blocksize {
    minblock: u64,
    maxdata: u64,
    maxlen: u64,
    /// Shared by every connection: writes of whole blocks hold it shared,
    /// read-modify-write cycles exclusively.
    writes: Arc<RwLock<()>>,
}

/// Per-connection handle with the limits in force for the layer below.
pub struct BlocksizeHandle {
    next: Next,
    size: u64,
    /// Block size (a power of two).
    block: u64,
    maxdata: u64,
    maxlen: u64,
    /// Preferred block size advertised to clients.
    preferred: u32,
    writes: Arc<RwLock<()>>,
}

impl Filter for Blocksize {
    type Handle = BlocksizeHandle;
    const NAME: &'static std::ffi::CStr = c"blocksize";
    const VERSION: &'static std::ffi::CStr = c"0.1.0";
    const DESCRIPTION: &'static std::ffi::CStr = c"align and split requests for a layer with block-size limits";
    const PARAMS: &'static [nbdhost_plugin_api::abi::ParamSpec] = &[
        param(
            c"minblock",
            ParamKind::Size,
            false,
            Some(c"512"),
            c"block every request below is aligned to: a power of two, 1 to 64K (raised to the minimum below)",
        ),
        param(
            c"maxdata",
            ParamKind::Size,
            false,
            Some(c"64K"),
            c"largest read or write sent below, a multiple of minblock (lowered to the maximum below)",
        ),
        param(
            c"maxlen",
            ParamKind::Size,
            false,
            Some(c"32M"),
            c"largest trim, zero, cache or block-status request sent below, a multiple of minblock",
        ),
    ];

    fn create(p: &Params) -> Result<Self> {
        let get = |key: &str, default: u64| -> Result<u64> { Ok(p.size(key)?.unwrap_or(default)) };
        let minblock = get("minblock", 512)?;
        if !minblock.is_power_of_two() || minblock > 65536 {
            return Err(Error::invalid(format!(
                "parameter `minblock`: {minblock} is not a power of two between 1 and 65536"
            )));
        }
        // `minblock` is a power of two: a multiple has no bits below it.
        let multiple = |key: &str, v: u64| {
            if v == 0 || v & (minblock - 1) != 0 {
                Err(Error::invalid(format!(
                    "parameter `{key}`: {v} is not a non-zero multiple of minblock ({minblock})"
                )))
            } else {
                Ok(v)
            }
        };
        let maxdata = multiple("maxdata", get("maxdata", 64 << 10)?)?;
        let maxlen = multiple("maxlen", get("maxlen", 32 << 20)?)?;
        Ok(Blocksize { minblock, maxdata, maxlen, writes: Arc::new(RwLock::new(())) })
    }

    fn open(&self, _ctx: &OpenContext, mut children: Vec<Next>) -> Result<BlocksizeHandle> {
        let next = children.remove(0);
        let size = next.get_size()?;
        let below = next.block_size()?;
        let block = self.minblock.max(below.minimum.into());
        if u64::from(below.maximum) < block {
            return Err(Error::invalid(format!(
                "the layer below takes at most {} bytes per request, less than the {block}-byte block",
                below.maximum
            )));
        }
        let whole = |n: u64| (n - n % block).max(block);
        let maxdata = whole(self.maxdata.min(below.maximum.into()));
        let maxlen = whole(self.maxlen);
        let preferred = below.preferred.max(block as u32);
        host::debug(&format!("block {block}, maxdata {maxdata}, maxlen {maxlen}"));
        Ok(BlocksizeHandle { next, size, block, maxdata, maxlen, preferred, writes: self.writes.clone() })
    }
}

/// One piece of a request as the layer below gets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece {
    /// Whole blocks (the last may end at the end of the disk), sent as is.
    Whole { offset: u64, len: u64 },
    /// Part of one block: `len` bytes, `skip` bytes into the block at
    /// `block` of `block_len` bytes (short only at the end of the disk).
    Part { block: u64, block_len: u64, skip: u64, len: u64 },
}

impl Piece {
    /// Offset of the piece's bytes in the request that begins at `start`.
    fn at(self, start: u64) -> usize {
        match self {
            Piece::Whole { offset, .. } => (offset - start) as usize,
            Piece::Part { block, skip, .. } => (block + skip - start) as usize,
        }
    }
}

/// Split `[offset, offset + count)` of a disk of `size` bytes into partial
/// blocks and runs of whole blocks of at most `max` bytes (a multiple of
/// `block`, a power of two).
fn pieces(offset: u64, count: u64, size: u64, block: u64, max: u64) -> impl Iterator<Item = Piece> {
    let end = offset + count;
    // Whole blocks may run up to here: the last block boundary before the
    // end of the request, or the end of the disk itself.
    let whole_end = if end == size { end } else { end - end % block };
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let start = pos - pos % block;
        let block_end = (start + block).min(size);
        let p = if pos != start || end < block_end {
            let len = end.min(block_end) - pos;
            Piece::Part { block: start, block_len: block_end - start, skip: pos - start, len }
        } else {
            Piece::Whole { offset: pos, len: (whole_end - pos).min(max) }
        };
        pos += match p {
            Piece::Whole { len, .. } | Piece::Part { len, .. } => len,
        };
        Some(p)
    })
}

impl BlocksizeHandle {
    fn pieces(&self, offset: u64, count: u64, max: u64) -> impl Iterator<Item = Piece> {
        pieces(offset, count, self.size, self.block, max)
    }

    /// Read the block at `block`, let `patch` change it, write it back.
    fn modify(&self, block: u64, block_len: u64, flags: Flags, patch: impl FnOnce(&mut [u8])) -> Result<()> {
        let mut b = vec![0u8; block_len as usize];
        let _excl = self.writes.write().unwrap_or_else(|e| e.into_inner());
        self.next.pread(&mut b, block, Flags::default())?;
        patch(&mut b);
        self.next.pwrite(&b, block, Flags(flags.0 & FLAG_FUA))
    }
}

impl FilterConnection for BlocksizeHandle {
    fn next(&self) -> &Next {
        &self.next
    }
    fn block_size(&self) -> Result<Option<BlockSize>> {
        Ok(Some(BlockSize { minimum: 1, preferred: self.preferred, maximum: 0 }))
    }
    fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        let mut bounce = Vec::new();
        for p in self.pieces(offset, buf.len() as u64, self.maxdata) {
            let at = p.at(offset);
            match p {
                Piece::Whole { offset, len } => self.next.pread(&mut buf[at..at + len as usize], offset, flags)?,
                Piece::Part { block, block_len, skip, len } => {
                    bounce.resize(block_len as usize, 0);
                    self.next.pread(&mut bounce, block, flags)?;
                    buf[at..at + len as usize].copy_from_slice(&bounce[skip as usize..(skip + len) as usize]);
                }
            }
        }
        Ok(())
    }
    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        for p in self.pieces(offset, buf.len() as u64, self.maxdata) {
            let at = p.at(offset);
            match p {
                Piece::Whole { offset, len } => {
                    let _shared = self.writes.read().unwrap_or_else(|e| e.into_inner());
                    self.next.pwrite(&buf[at..at + len as usize], offset, flags)?;
                }
                Piece::Part { block, block_len, skip, len } => {
                    let data = &buf[at..at + len as usize];
                    self.modify(block, block_len, flags, |b| {
                        b[skip as usize..(skip + len) as usize].copy_from_slice(data)
                    })?;
                }
            }
        }
        Ok(())
    }
    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        // Whole blocks first: if the layer below refuses a fast zero, the
        // first piece fails before anything has changed.
        for p in self.pieces(offset, count, self.maxlen) {
            if let Piece::Whole { offset, len } = p {
                let _shared = self.writes.read().unwrap_or_else(|e| e.into_inner());
                self.next.zero(len, offset, flags)?;
            }
        }
        for p in self.pieces(offset, count, self.maxlen) {
            if let Piece::Part { block, block_len, skip, len } = p {
                self.modify(block, block_len, flags, |b| b[skip as usize..(skip + len) as usize].fill(0))?;
            }
        }
        Ok(())
    }
    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        for p in self.pieces(offset, count, self.maxlen) {
            if let Piece::Whole { offset, len } = p {
                let _shared = self.writes.read().unwrap_or_else(|e| e.into_inner());
                self.next.trim(len, offset, flags)?;
            }
        }
        Ok(())
    }
    fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let mut pos = offset - offset % self.block;
        let end = (offset + count).next_multiple_of(self.block).min(self.size);
        while pos < end {
            let n = (end - pos).min(self.maxlen);
            self.next.cache(n, pos, flags)?;
            pos += n;
        }
        Ok(())
    }
    fn extents(&self, count: u64, offset: u64, flags: Flags, out: &mut ExtentList<'_>) -> Result<()> {
        // The layer below describes whole blocks from before `offset`; pass
        // on what lies from `offset` on (asking again should its first
        // answer stop short of `offset`).
        let mut pos = offset - offset % self.block;
        let end = (offset + count).next_multiple_of(self.block).min(self.size).min(pos + self.maxlen);
        while pos <= offset {
            for (o, l, f) in self.next.extents_vec(end - pos, pos, flags)? {
                if o + l > offset {
                    let from = o.max(offset);
                    out.add(from, o + l - from, f)?;
                }
                pos = o + l;
            }
        }
        Ok(())
    }
}

/// A read of whole blocks that the layer below takes in one piece (at
/// most `maxdata`) is lent from below. Anything else is declined and read
/// with `pread`: a partial block needs the bounce buffer, and several
/// pieces would nest lending calls on the same layer below, which may
/// hold locks of the first piece while it waits for those of the next
/// (`memory` does: with a writer queued on a page both pieces share, that
/// is a deadlock).
impl FilterLendRead for BlocksizeHandle {
    fn pread_lend(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        sink: &mut dyn FnMut(&[&[u8]]) -> Result<()>,
    ) -> Result<()> {
        let mut pieces = self.pieces(offset, count, self.maxdata);
        match (pieces.next(), pieces.next()) {
            (Some(Piece::Whole { offset, len }), None) => self.next.pread_lend(len, offset, flags, sink),
            _ => Err(Error::unsupported("blocksize: only reads of whole blocks in one piece are lent")),
        }
    }
}

export_filter!(Blocksize);

#[cfg(test)]
mod tests {
    use super::*;
    use Piece::*;

    fn all(offset: u64, count: u64, size: u64, block: u64, max: u64) -> Vec<Piece> {
        pieces(offset, count, size, block, max).collect()
    }

    #[test]
    fn aligned_requests_are_split_at_max() {
        assert_eq!(
            all(0, 4096, 1 << 20, 512, 2048),
            vec![Whole { offset: 0, len: 2048 }, Whole { offset: 2048, len: 2048 }]
        );
    }

    #[test]
    fn unaligned_ends_become_partial_blocks() {
        assert_eq!(
            all(100, 1000, 1 << 20, 512, 4096),
            vec![
                Part { block: 0, block_len: 512, skip: 100, len: 412 },
                Whole { offset: 512, len: 512 },
                Part { block: 1024, block_len: 512, skip: 0, len: 76 },
            ]
        );
        // Inside one block.
        assert_eq!(all(10, 20, 1 << 20, 512, 4096), vec![Part { block: 0, block_len: 512, skip: 10, len: 20 }]);
    }

    #[test]
    fn the_last_block_may_be_short() {
        // Disk of 1000 bytes, block 512: the second block is 488 bytes.
        assert_eq!(all(600, 400, 1000, 512, 4096), vec![Part { block: 512, block_len: 488, skip: 88, len: 400 }]);
        assert_eq!(all(512, 488, 1000, 512, 4096), vec![Whole { offset: 512, len: 488 }]);
        assert_eq!(all(0, 1000, 1000, 512, 512), vec![Whole { offset: 0, len: 512 }, Whole { offset: 512, len: 488 }]);
        assert_eq!(
            all(0, 900, 1000, 512, 4096),
            vec![Whole { offset: 0, len: 512 }, Part { block: 512, block_len: 488, skip: 0, len: 388 }]
        );
    }

    #[test]
    fn pieces_cover_the_request_exactly() {
        for (size, block, max) in [(1 << 16, 512, 2048), (10_000, 4096, 8192), (777, 1, 64)] {
            for offset in (0..size).step_by(97) {
                for count in [1, 5, 511, 512, 513, 4095, 5000, 20_000] {
                    let count = count.min(size - offset);
                    let mut pos = offset;
                    for p in pieces(offset, count, size, block, max) {
                        assert_eq!(p.at(offset) as u64, pos - offset);
                        pos += match p {
                            Whole { offset: o, len } => {
                                assert!(o % block == 0 && len <= max && (len % block == 0 || o + len == size));
                                len
                            }
                            Part { block: b, block_len, skip, len } => {
                                assert!(b % block == 0 && block_len == block.min(size - b) && skip + len <= block_len);
                                len
                            }
                        };
                    }
                    assert_eq!(pos, offset + count);
                }
            }
        }
    }
}
