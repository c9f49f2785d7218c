//! `concat`: a composite layer whose parts (each a whole stack of layers)
//! are laid end to end. Written as `plugin = "concat"` with `[[layer.part]]`
//! tables. Requests that cross a part boundary are split; flush goes to
//! every part that can flush.

use nbdhost_plugin_api::abi::{self, BlockSize};
use nbdhost_plugin_api::{
    export_filter, lend_in_order, Error, ExtentList, Filter, FilterConnection, FilterLendRead, Flags, LendSource, Next,
    OpenContext, Params, Result, Support,
};

/// Most parts one lent read may cross; each nests a lending call, so a
/// read across more is declined (and read with `pread`).
const MAX_LENT_PARTS: usize = 16;

/// The layer (no settings of its own).
pub struct Concat;

/// What a connection knows about one part.
struct Part {
    next: Next,
    start: u64,
    size: u64,
    writable: bool,
    flush: bool,
    trim: bool,
    fua: bool,
    cache: bool,
}

/// Per-connection handle: the parts, in order.
pub struct ConcatHandle {
    parts: Vec<Part>,
    size: u64,
}

impl Filter for Concat {
    type Handle = ConcatHandle;
    const NAME: &'static std::ffi::CStr = c"concat";
    const VERSION: &'static std::ffi::CStr = c"0.1.0";
    const DESCRIPTION: &'static std::ffi::CStr = c"parts (each a stack of layers) laid end to end";
    const PARAMS: &'static [nbdhost_plugin_api::abi::ParamSpec] = &[];
    const MIN_CHILDREN: u32 = 1;
    const MAX_CHILDREN: u32 = u32::MAX;

    fn create(_: &Params) -> Result<Self> {
        Ok(Concat)
    }

    fn open(&self, _: &OpenContext, children: Vec<Next>) -> Result<ConcatHandle> {
        let mut parts = Vec::with_capacity(children.len());
        let mut start = 0u64;
        for next in children {
            let size = next.get_size()?;
            let can = |w| next.can(w).map(|v| v != 0);
            let part = Part {
                start,
                size,
                writable: can(abi::CAN_WRITE)?,
                flush: can(abi::CAN_FLUSH)?,
                trim: can(abi::CAN_TRIM)?,
                fua: next.can(abi::CAN_FUA)? == abi::SUPPORT_NATIVE,
                cache: next.can(abi::CAN_CACHE)? != abi::SUPPORT_NONE,
                next,
            };
            start =
                start.checked_add(size).ok_or_else(|| Error::invalid("the parts add up to more than 2^64 bytes"))?;
            parts.push(part);
        }
        Ok(ConcatHandle { parts, size: start })
    }
}

impl ConcatHandle {
    /// Split `[offset, offset+count)` by part: (part, offset in part,
    /// length, offset in the request).
    fn split(&self, offset: u64, count: u64) -> impl Iterator<Item = (&Part, u64, u64, u64)> + '_ {
        let end = offset + count;
        self.parts.iter().filter(|p| p.size > 0).filter_map(move |p| {
            let s = offset.max(p.start);
            let e = end.min(p.start + p.size);
            (s < e).then(|| (p, s - p.start, e - s, s - offset))
        })
    }

    fn all(&self, f: impl Fn(&Part) -> bool) -> bool {
        self.parts.iter().all(f)
    }
}

impl FilterConnection for ConcatHandle {
    fn next(&self) -> &Next {
        &self.parts[0].next
    }
    fn get_size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn block_size(&self) -> Result<Option<BlockSize>> {
        // The strictest constraints of any part apply everywhere.
        let mut b = BlockSize { minimum: 1, preferred: 4096, maximum: u32::MAX };
        for p in &self.parts {
            let pb = p.next.block_size()?;
            b.minimum = b.minimum.max(pb.minimum);
            b.preferred = b.preferred.max(pb.preferred);
            b.maximum = b.maximum.min(pb.maximum);
        }
        Ok(Some(b))
    }
    fn can_write(&self) -> Result<bool> {
        // Parts that cannot be written refuse writes themselves (EPERM).
        Ok(self.parts.iter().any(|p| p.writable))
    }
    fn can_flush(&self) -> Result<bool> {
        Ok(self.parts.iter().any(|p| p.flush))
    }
    fn is_rotational(&self) -> Result<bool> {
        Ok(self.parts.iter().any(|p| p.next.can(abi::CAN_ROTATIONAL).unwrap_or(0) != 0))
    }
    fn can_trim(&self) -> Result<bool> {
        Ok(self.parts.iter().any(|p| p.trim))
    }
    fn can_zero(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_fast_zero(&self) -> Result<bool> {
        Ok(self.all(|p| p.next.can(abi::CAN_FAST_ZERO).unwrap_or(0) != 0))
    }
    fn can_fua(&self) -> Result<Support> {
        Ok(if self.all(|p| !p.writable || p.fua) { Support::Native } else { Support::Emulate })
    }
    fn can_multi_conn(&self) -> Result<bool> {
        Ok(self.all(|p| p.next.can(abi::CAN_MULTI_CONN).unwrap_or(0) != 0))
    }
    fn can_extents(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_cache(&self) -> Result<Support> {
        Ok(if self.parts.iter().any(|p| p.cache) { Support::Native } else { Support::None })
    }

    fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        for (p, o, l, at) in self.split(offset, buf.len() as u64) {
            p.next.pread(&mut buf[at as usize..(at + l) as usize], o, flags)?;
        }
        Ok(())
    }
    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        for (p, o, l, at) in self.split(offset, buf.len() as u64) {
            p.next.pwrite(&buf[at as usize..(at + l) as usize], o, flags)?;
        }
        Ok(())
    }
    fn flush(&self, flags: Flags) -> Result<()> {
        for p in self.parts.iter().filter(|p| p.flush) {
            p.next.flush(flags)?;
        }
        Ok(())
    }
    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        // Trim is advisory: parts that cannot trim keep their data.
        for (p, o, l, _) in self.split(offset, count).filter(|(p, ..)| p.trim) {
            p.next.trim(l, o, flags)?;
        }
        Ok(())
    }
    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        for (p, o, l, _) in self.split(offset, count) {
            p.next.zero(l, o, flags)?;
        }
        Ok(())
    }
    fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        for (p, o, l, _) in self.split(offset, count).filter(|(p, ..)| p.cache) {
            p.next.cache(l, o, flags)?;
        }
        Ok(())
    }
    fn extents(&self, count: u64, offset: u64, flags: Flags, out: &mut ExtentList<'_>) -> Result<()> {
        // The host describes each part's whole range (see `Next`).
        for (p, o, l, _) in self.split(offset, count) {
            for (eo, el, ef) in p.next.extents_vec(l, o, flags)? {
                out.add(p.start + eo, el, ef)?;
            }
            if flags.req_one() {
                break;
            }
        }
        Ok(())
    }
}

/// A read is lent by the parts it crosses, each nesting its lending call
/// in the one before, so the whole read leaves as one reply from where the
/// parts keep their data. The host asks only when every part lends.
impl FilterLendRead for ConcatHandle {
    fn pread_lend(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        sink: &mut dyn FnMut(&[&[u8]]) -> Result<()>,
    ) -> Result<()> {
        let pieces: Vec<(&Part, u64, u64)> = self.split(offset, count).map(|(p, o, l, _)| (p, o, l)).collect();
        match pieces.as_slice() {
            [(p, o, l)] => p.next.pread_lend(*l, *o, flags, sink),
            _ if pieces.len() > MAX_LENT_PARTS => {
                Err(Error::unsupported("concat: read crosses too many parts to lend"))
            }
            _ => {
                let sources: Vec<Box<LendSource<'_>>> = pieces
                    .iter()
                    .map(|&(p, o, l)| -> Box<LendSource<'_>> {
                        Box::new(move |then| p.next.pread_lend(l, o, flags, then))
                    })
                    .collect();
                lend_in_order(&sources, sink)
            }
        }
    }
}

export_filter!(Concat);
