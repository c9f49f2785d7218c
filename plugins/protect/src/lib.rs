//! `protect` filter: make byte ranges of the layer below read-only.
//!
//! `ranges` lists `START-END` byte ranges (inclusive-exclusive, sizes with
//! K/M/G/T suffixes allowed) separated by commas; `START-` runs to the end
//! of the disk. A write, trim or zero that touches a protected range fails
//! with `EPERM`, before anything is written, unless it would leave the
//! protected bytes as they are: writing the data already there, or zeroing
//! bytes that already read as zeros, is allowed. (A trim may leave any
//! data behind, so it is always refused there.) Reads and everything
//! outside the ranges pass through.

use nbdhost_plugin_api::params::parse_size;
use nbdhost_plugin_api::{
    export_filter, param, Error, Filter, FilterConnection, FilterLendRead, Flags, Next, OpenContext, ParamKind, Params,
    Result,
};

/// Largest read made at once to compare a zeroed range with zeros.
const CHUNK: u64 = 1 << 20;

/// Per-export settings: protected ranges, sorted and merged; `None` as the
/// end means the end of the disk.
pub struct Protect {
    ranges: Vec<(u64, Option<u64>)>,
}

/// Per-connection handle.
pub struct ProtectHandle {
    next: Next,
    /// Protected `[start, end)` ranges within the disk, sorted, disjoint.
    ranges: Vec<(u64, u64)>,
}

impl Filter for Protect {
    type Handle = ProtectHandle;
    const NAME: &'static std::ffi::CStr = c"protect";
    const VERSION: &'static std::ffi::CStr = c"0.1.0";
    const DESCRIPTION: &'static std::ffi::CStr = c"make byte ranges of the layer below read-only";
    const PARAMS: &'static [nbdhost_plugin_api::abi::ParamSpec] = &[param(
        c"ranges",
        ParamKind::String,
        true,
        None,
        c"read-only byte ranges, e.g. \"0-1M,4M-5M\" (START-END, end exclusive; START- runs to the end of the disk)",
    )];

    fn create(p: &Params) -> Result<Self> {
        let spec = p.require("ranges")?;
        let ranges = parse_ranges(spec).map_err(|m| Error::invalid(format!("parameter `ranges`: {m}")))?;
        Ok(Protect { ranges })
    }

    fn open(&self, _ctx: &OpenContext, mut children: Vec<Next>) -> Result<ProtectHandle> {
        let next = children.remove(0);
        let size = next.get_size()?;
        let ranges =
            self.ranges.iter().map(|&(s, e)| (s, e.unwrap_or(size).min(size))).filter(|&(s, e)| s < e).collect();
        Ok(ProtectHandle { next, ranges })
    }
}

/// Parse `START-END[,START-END...]` into sorted, merged ranges.
fn parse_ranges(spec: &str) -> std::result::Result<Vec<(u64, Option<u64>)>, String> {
    let mut v = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let bad = || format!("`{item}` is not a range START-END (byte offsets, K/M/G/T suffixes allowed)");
        let (s, e) = item.split_once('-').ok_or_else(bad)?;
        let start = parse_size(s).ok_or_else(bad)?;
        let end = if e.trim().is_empty() { None } else { Some(parse_size(e).ok_or_else(bad)?) };
        if end.is_some_and(|e| e <= start) {
            return Err(format!("range `{item}` is empty: its end must be after its start"));
        }
        v.push((start, end));
    }
    if v.is_empty() {
        return Err(format!("`{spec}` lists no ranges"));
    }
    v.sort_unstable();
    let mut merged: Vec<(u64, Option<u64>)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match merged.last_mut() {
            Some((_, last)) if last.is_none_or(|l| s <= l) => {
                *last = last.zip(e).map(|(a, b)| a.max(b));
            }
            _ => merged.push((s, e)),
        }
    }
    Ok(merged)
}

impl ProtectHandle {
    /// The protected parts of `[offset, offset + count)`, and the protected
    /// range each belongs to.
    fn touched(&self, count: u64, offset: u64) -> impl Iterator<Item = ((u64, u64), (u64, u64))> + '_ {
        let end = offset.saturating_add(count);
        self.ranges.iter().map(move |&(s, e)| ((s.max(offset), e.min(end)), (s, e))).filter(|&((a, b), _)| a < b)
    }

    fn refuse(what: &str, part: (u64, u64), range: (u64, u64)) -> Error {
        Error::new(
            libc::EPERM,
            format!(
                "{what} would change bytes {}..{}, which are in the protected range {}-{}",
                part.0, part.1, range.0, range.1
            ),
        )
    }
}

impl FilterConnection for ProtectHandle {
    fn next(&self) -> &Next {
        &self.next
    }
    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        for ((a, b), range) in self.touched(buf.len() as u64, offset) {
            let new = &buf[(a - offset) as usize..(b - offset) as usize];
            let mut old = vec![0u8; new.len()];
            self.next.pread(&mut old, a, Flags::default())?;
            if old != new {
                return Err(Self::refuse("write", (a, b), range));
            }
        }
        self.next.pwrite(buf, offset, flags)
    }
    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let mut old = Vec::new();
        for ((a, b), range) in self.touched(count, offset) {
            let mut pos = a;
            while pos < b {
                let n = (b - pos).min(CHUNK);
                old.resize(n as usize, 0);
                self.next.pread(&mut old, pos, Flags::default())?;
                if old.iter().any(|&x| x != 0) {
                    return Err(Self::refuse("write zeroes", (a, b), range));
                }
                pos += n;
            }
        }
        self.next.zero(count, offset, flags)
    }
    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        if let Some((part, range)) = self.touched(count, offset).next() {
            return Err(Self::refuse("trim", part, range));
        }
        self.next.trim(count, offset, flags)
    }
}

/// Reads pass through unchanged, and so does lending.
impl FilterLendRead for ProtectHandle {}

export_filter!(Protect);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_sort_and_merge() {
        assert_eq!(parse_ranges("0-1M,4M-5M").unwrap(), vec![(0, Some(1 << 20)), (4 << 20, Some(5 << 20))]);
        assert_eq!(parse_ranges(" 4M-5M , 0-512, 100-2K ").unwrap(), vec![(0, Some(2048)), (4 << 20, Some(5 << 20))]);
        assert_eq!(parse_ranges("1M-2M,2M-3M").unwrap(), vec![(1 << 20, Some(3 << 20))]);
        assert_eq!(parse_ranges("1M-,0-4K,2M-3M").unwrap(), vec![(0, Some(4096)), (1 << 20, None)]);
        assert!(parse_ranges("5M-4M").unwrap_err().contains("is empty"));
        assert!(parse_ranges("1M-1M").unwrap_err().contains("is empty"));
        assert!(parse_ranges("abc").unwrap_err().contains("`abc` is not a range"));
        assert!(parse_ranges("1X-2M").unwrap_err().contains("is not a range"));
        assert!(parse_ranges(" , ").unwrap_err().contains("lists no ranges"));
    }
}
