//! `null` backend: a bottomless disk. Reads return zeros, writes, trims and
//! zeroing are accepted and discarded, block status reports one hole that
//! reads as zeros. Like nbdkit's null plugin it measures what the protocol
//! and the host cost with no storage behind them, so every operation does
//! as little as it can.

use nbdhost_plugin_api::abi::{ParamSpec, EXTENT_HOLE, EXTENT_ZERO};
use nbdhost_plugin_api::{
    export_backend, param, Backend, Cache, Connection, Error, ExtentList, Extents, Flags, Flush, OpenContext,
    ParamKind, Params, Pwrite, Result, Support, Trim, Zero,
};
use std::ffi::CStr;

/// Per-export state: only the size.
pub struct Null {
    size: u64,
}

/// Per-connection handle.
pub struct NullHandle {
    size: u64,
}

/// Largest size a disk may have (offsets are signed 64-bit in many clients).
const MAX_SIZE: u64 = i64::MAX as u64;

impl Backend for Null {
    type Handle = NullHandle;
    const NAME: &'static CStr = c"null";
    const VERSION: &'static CStr = c"0.1.0";
    const DESCRIPTION: &'static CStr = c"reads return zeros, writes are discarded (protocol-cost benchmark target)";
    const PARAMS: &'static [ParamSpec] =
        &[param(c"size", ParamKind::Size, false, Some(c"0"), c"virtual size in bytes (K/M/G/T suffixes; default 0)")];

    fn create(params: &Params) -> Result<Self> {
        let size = params.size("size")?.unwrap_or(0);
        if size > MAX_SIZE {
            return Err(Error::invalid(format!("parameter `size`: {size} is larger than {MAX_SIZE} bytes")));
        }
        Ok(Null { size })
    }

    fn open(&self, _ctx: &OpenContext) -> Result<NullHandle> {
        Ok(NullHandle { size: self.size })
    }
}

impl Connection for NullHandle {
    fn get_size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn pread(&self, buf: &mut [u8], _offset: u64, _flags: Flags) -> Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn can_fua(&self) -> Result<Support> {
        // Nothing is stored, so everything is as durable as it will ever be.
        Ok(Support::Native)
    }
    fn can_multi_conn(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_cache(&self) -> Result<Support> {
        Ok(Support::Native)
    }
}

impl Pwrite for NullHandle {
    fn pwrite(&self, _buf: &[u8], _offset: u64, _flags: Flags) -> Result<()> {
        Ok(())
    }
}

impl Flush for NullHandle {
    fn flush(&self, _flags: Flags) -> Result<()> {
        Ok(())
    }
}

impl Trim for NullHandle {
    fn trim(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Ok(())
    }
}

impl Zero for NullHandle {
    fn zero(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        // Always fast, so FAST_ZERO requests succeed too.
        Ok(())
    }
}

impl Extents for NullHandle {
    fn extents(&self, count: u64, offset: u64, _flags: Flags, out: &mut ExtentList<'_>) -> Result<()> {
        out.add(offset, count, EXTENT_HOLE | EXTENT_ZERO)
    }
}

impl Cache for NullHandle {
    fn cache(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Ok(())
    }
}

export_backend!(Null);

#[cfg(test)]
mod tests {
    use super::*;

    fn open(size: &str) -> NullHandle {
        Null::create(&Params::from_pairs([("size", size)])).unwrap().open(&ctx()).unwrap()
    }

    fn ctx() -> OpenContext {
        OpenContext { readonly: false, export_name: "n".into(), peer: "unix".into() }
    }

    #[test]
    fn reads_zeros_after_writes() {
        let h = open("1048576");
        assert_eq!(h.get_size().unwrap(), 1 << 20);
        h.pwrite(&[0xffu8; 4096], 0, Flags(0)).unwrap();
        let mut buf = vec![0x55u8; 4096];
        h.pread(&mut buf, 0, Flags(0)).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }

    #[test]
    fn one_hole_extent() {
        let h = open("1048576");
        let e = ExtentList::collect(|l| h.extents(65536, 4096, Flags(0), l)).unwrap();
        assert_eq!(e, vec![(4096, 65536, EXTENT_HOLE | EXTENT_ZERO)]);
    }

    #[test]
    fn too_large_is_refused() {
        assert!(Null::create(&Params::from_pairs([("size", u64::MAX.to_string())])).is_err());
        assert_eq!(Null::create(&Params::default()).unwrap().size, 0);
    }
}
