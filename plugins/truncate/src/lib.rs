//! `truncate` filter: change the size of the layer below.
//!
//! Set exactly one of `size` (an absolute size), `round-up = N` or
//! `round-down = N` (the size below rounded to a multiple of `N`).
//!
//! A smaller size simply hides the end of the layer below. A larger size
//! adds a virtual tail past the end of the layer below that reads as zeros
//! and is reported as a hole that reads as zeros. Writing zeros there, and
//! zeroing or trimming there, succeed and change nothing; writing anything
//! else there fails with `ENOSPC` before any part of the request is written.

use nbdhost_plugin_api::abi::{EXTENT_HOLE, EXTENT_ZERO};
use nbdhost_plugin_api::{
    export_filter, param, zero_pieces, Error, ExtentList, Filter, FilterConnection, FilterLendRead, Flags, Next,
    OpenContext, ParamKind, Params, Result,
};

/// How the exported size is derived from the size below.
#[derive(Debug, Clone, Copy)]
enum Rule {
    Size(u64),
    RoundUp(u64),
    RoundDown(u64),
}

/// Per-export settings.
pub struct Truncate {
    rule: Rule,
}

/// Per-connection handle.
pub struct TruncateHandle {
    next: Next,
    /// Size of the layer below: bytes from here on are virtual.
    below: u64,
    /// Exported size.
    size: u64,
}

impl Filter for Truncate {
    type Handle = TruncateHandle;
    const NAME: &'static std::ffi::CStr = c"truncate";
    const VERSION: &'static std::ffi::CStr = c"0.1.0";
    const DESCRIPTION: &'static std::ffi::CStr = c"shrink, grow or round the size of the layer below";
    const PARAMS: &'static [nbdhost_plugin_api::abi::ParamSpec] = &[
        param(
            c"size",
            ParamKind::Size,
            false,
            None,
            c"exported size; past the end of the layer below reads are zeros and only zeros can be written",
        ),
        param(c"round-up", ParamKind::Size, false, None, c"round the size below up to a multiple of this"),
        param(c"round-down", ParamKind::Size, false, None, c"round the size below down to a multiple of this"),
    ];

    fn create(p: &Params) -> Result<Self> {
        let multiple = |key: &str| -> Result<Option<u64>> {
            match p.size(key)? {
                Some(0) => Err(Error::invalid(format!("parameter `{key}` must be at least 1 byte"))),
                v => Ok(v),
            }
        };
        let rule = match (p.size("size")?, multiple("round-up")?, multiple("round-down")?) {
            (Some(s), None, None) => Rule::Size(s),
            (None, Some(n), None) => Rule::RoundUp(n),
            (None, None, Some(n)) => Rule::RoundDown(n),
            (None, None, None) => {
                return Err(Error::invalid("set one of the parameters `size`, `round-up` or `round-down`"))
            }
            _ => {
                return Err(Error::invalid(
                    "the parameters `size`, `round-up` and `round-down` exclude each other: set only one",
                ))
            }
        };
        Ok(Truncate { rule })
    }

    fn open(&self, _ctx: &OpenContext, mut children: Vec<Next>) -> Result<TruncateHandle> {
        let next = children.remove(0);
        let below = next.get_size()?;
        let size = match self.rule {
            Rule::Size(s) => s,
            Rule::RoundDown(n) => below / n * n,
            Rule::RoundUp(n) => below
                .div_ceil(n)
                .checked_mul(n)
                .ok_or_else(|| Error::invalid(format!("rounding {below} bytes up to a multiple of {n} overflows")))?,
        };
        Ok(TruncateHandle { next, below, size })
    }
}

impl TruncateHandle {
    /// How many of the `count` bytes at `offset` exist in the layer below.
    fn real(&self, count: u64, offset: u64) -> u64 {
        self.below.saturating_sub(offset).min(count)
    }
}

impl FilterConnection for TruncateHandle {
    fn next(&self) -> &Next {
        &self.next
    }
    fn get_size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        let (real, past) = buf.split_at_mut(self.real(buf.len() as u64, offset) as usize);
        past.fill(0);
        if real.is_empty() {
            return Ok(());
        }
        self.next.pread(real, offset, flags)
    }
    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        let (real, past) = buf.split_at(self.real(buf.len() as u64, offset) as usize);
        if let Some(i) = past.iter().position(|&b| b != 0) {
            return Err(Error::no_space(format!(
                "cannot store data at byte {}: the layer below ends at {} and only zeros can be written past it",
                offset + (real.len() + i) as u64,
                self.below
            )));
        }
        if real.is_empty() {
            return Ok(());
        }
        self.next.pwrite(real, offset, flags)
    }
    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        match self.real(count, offset) {
            0 => Ok(()),
            n => self.next.trim(n, offset, flags),
        }
    }
    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        match self.real(count, offset) {
            0 => Ok(()),
            n => self.next.zero(n, offset, flags),
        }
    }
    fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        match self.real(count, offset) {
            0 => Ok(()),
            n => self.next.cache(n, offset, flags),
        }
    }
    fn extents(&self, count: u64, offset: u64, flags: Flags, out: &mut ExtentList<'_>) -> Result<()> {
        let mut end = offset;
        let real = self.real(count, offset);
        if real > 0 {
            for (o, l, f) in self.next.extents_vec(real, offset, flags)? {
                out.add(o, l, f)?;
                end = o + l;
            }
        }
        // The virtual tail continues the answer only where the layer below
        // described everything up to its end.
        if end >= self.below && end < offset + count {
            out.add(end, offset + count - end, EXTENT_HOLE | EXTENT_ZERO)?;
        }
        Ok(())
    }
}

/// Lends what exists below as the layer below lends it, and the grown tail
/// (if the read reaches it) as zeros.
impl FilterLendRead for TruncateHandle {
    fn pread_lend(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        sink: &mut dyn FnMut(&[&[u8]]) -> Result<()>,
    ) -> Result<()> {
        let real = self.real(count, offset);
        let zeros = zero_pieces(count - real);
        if real == 0 {
            return sink(&zeros);
        }
        if zeros.is_empty() {
            return self.next.pread_lend(real, offset, flags, sink);
        }
        self.next.pread_lend(real, offset, flags, &mut |below: &[&[u8]]| {
            let all: Vec<&[u8]> = below.iter().chain(zeros.iter()).copied().collect();
            sink(&all)
        })
    }
}

export_filter!(Truncate);
