//! `pattern` backend: a read-only disk whose every 8-byte aligned word at
//! offset `o` holds `o` as a big-endian 64-bit integer (nbdkit's pattern
//! plugin), so any byte read tells where it came from. Useful to check
//! that filters and clients put data where they should.

use nbdhost_plugin_api::abi::ParamSpec;
use nbdhost_plugin_api::{
    export_backend, param, Backend, Cache, Connection, Error, ExtentList, Extents, Flags, OpenContext, ParamKind,
    Params, Result, Support,
};
use std::ffi::CStr;

/// Per-export state: only the size.
pub struct Pattern {
    size: u64,
}

/// Per-connection handle.
pub struct PatternHandle {
    size: u64,
}

/// Largest size a disk may have (offsets are signed 64-bit in many clients).
const MAX_SIZE: u64 = i64::MAX as u64;

/// Fill `buf` with the pattern bytes starting at disk offset `offset`.
pub fn fill(buf: &mut [u8], offset: u64) {
    let mut pos = 0usize;
    let mut off = offset;
    // A leading partial word.
    let skew = (off % 8) as usize;
    if skew != 0 {
        let word = (off - skew as u64).to_be_bytes();
        let n = (8 - skew).min(buf.len());
        buf[..n].copy_from_slice(&word[skew..skew + n]);
        pos = n;
        off += n as u64;
    }
    // Whole words.
    let whole = (buf.len() - pos) / 8 * 8;
    for w in buf[pos..pos + whole].chunks_exact_mut(8) {
        w.copy_from_slice(&off.to_be_bytes());
        off += 8;
    }
    pos += whole;
    // A trailing partial word.
    if pos < buf.len() {
        let n = buf.len() - pos;
        buf[pos..].copy_from_slice(&off.to_be_bytes()[..n]);
    }
}

impl Backend for Pattern {
    type Handle = PatternHandle;
    const NAME: &'static CStr = c"pattern";
    const VERSION: &'static CStr = c"0.1.0";
    const DESCRIPTION: &'static CStr = c"read-only disk where each 8-byte word holds its own offset (big-endian)";
    const PARAMS: &'static [ParamSpec] =
        &[param(c"size", ParamKind::Size, true, None, c"virtual size in bytes (K/M/G/T suffixes)")];

    fn create(params: &Params) -> Result<Self> {
        let size = params.size("size")?.ok_or_else(|| Error::invalid("parameter `size` is required"))?;
        if size > MAX_SIZE {
            return Err(Error::invalid(format!("parameter `size`: {size} is larger than {MAX_SIZE} bytes")));
        }
        Ok(Pattern { size })
    }

    fn open(&self, _ctx: &OpenContext) -> Result<PatternHandle> {
        Ok(PatternHandle { size: self.size })
    }
}

impl Connection for PatternHandle {
    fn get_size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        fill(buf, offset);
        Ok(())
    }
    fn can_write(&self) -> Result<bool> {
        Ok(false)
    }
    fn can_multi_conn(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_cache(&self) -> Result<Support> {
        Ok(Support::Native)
    }
}

impl Extents for PatternHandle {
    fn extents(&self, count: u64, offset: u64, _flags: Flags, out: &mut ExtentList<'_>) -> Result<()> {
        // All data: word 0 is the only all-zero word, not worth a hole.
        out.add(offset, count, 0)
    }
}

impl Cache for PatternHandle {
    fn cache(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Ok(())
    }
}

export_backend!(Pattern);

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(offset: u64, len: usize) -> Vec<u8> {
        (offset..offset + len as u64).map(|o| ((o & !7) >> (8 * (7 - (o % 8)))) as u8).collect()
    }

    #[test]
    fn every_offset_and_length_matches_the_definition() {
        for offset in 0..40u64 {
            for len in 0..40usize {
                let mut buf = vec![0xaau8; len];
                fill(&mut buf, offset);
                assert_eq!(buf, naive(offset, len), "offset {offset} len {len}");
            }
        }
        let mut buf = vec![0u8; 13];
        fill(&mut buf, (1 << 40) + 5);
        assert_eq!(buf, naive((1 << 40) + 5, 13));
    }

    #[test]
    fn words_hold_their_offset() {
        let mut buf = vec![0u8; 32];
        fill(&mut buf, 4096);
        assert_eq!(&buf[0..8], &4096u64.to_be_bytes());
        assert_eq!(&buf[24..32], &4120u64.to_be_bytes());
    }

    #[test]
    fn size_is_required() {
        assert!(Pattern::create(&Params::default()).is_err());
    }
}
