//! `zero` backend: a read-only disk of zeros. Block status reports one hole
//! that reads as zeros; writes are refused (the backend has no write
//! operation, so the host advertises the export read-only).

use nbdhost_plugin_api::abi::{ParamSpec, EXTENT_HOLE, EXTENT_ZERO};
use nbdhost_plugin_api::{
    export_backend, param, Backend, Cache, Connection, Error, ExtentList, Extents, Flags, OpenContext, ParamKind,
    Params, Result, Support,
};
use std::ffi::CStr;

/// Per-export state: only the size.
pub struct ZeroDisk {
    size: u64,
}

/// Per-connection handle.
pub struct ZeroHandle {
    size: u64,
}

/// Largest size a disk may have (offsets are signed 64-bit in many clients).
const MAX_SIZE: u64 = i64::MAX as u64;

impl Backend for ZeroDisk {
    type Handle = ZeroHandle;
    const NAME: &'static CStr = c"zero";
    const VERSION: &'static CStr = c"0.1.0";
    const DESCRIPTION: &'static CStr = c"read-only disk of zeros";
    const PARAMS: &'static [ParamSpec] =
        &[param(c"size", ParamKind::Size, false, Some(c"0"), c"virtual size in bytes (K/M/G/T suffixes; default 0)")];

    fn create(params: &Params) -> Result<Self> {
        let size = params.size("size")?.unwrap_or(0);
        if size > MAX_SIZE {
            return Err(Error::invalid(format!("parameter `size`: {size} is larger than {MAX_SIZE} bytes")));
        }
        Ok(ZeroDisk { size })
    }

    fn open(&self, _ctx: &OpenContext) -> Result<ZeroHandle> {
        Ok(ZeroHandle { size: self.size })
    }
}

impl Connection for ZeroHandle {
    fn get_size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn pread(&self, buf: &mut [u8], _offset: u64, _flags: Flags) -> Result<()> {
        buf.fill(0);
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

impl Extents for ZeroHandle {
    fn extents(&self, count: u64, offset: u64, _flags: Flags, out: &mut ExtentList<'_>) -> Result<()> {
        out.add(offset, count, EXTENT_HOLE | EXTENT_ZERO)
    }
}

impl Cache for ZeroHandle {
    fn cache(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Ok(())
    }
}

export_backend!(ZeroDisk);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_and_one_hole() {
        let d = ZeroDisk::create(&Params::from_pairs([("size", "8192")])).unwrap();
        let h = d.open(&OpenContext { readonly: true, export_name: "z".into(), peer: "unix".into() }).unwrap();
        assert_eq!(h.get_size().unwrap(), 8192);
        let mut buf = vec![7u8; 100];
        h.pread(&mut buf, 8000, Flags(0)).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        let e = ExtentList::collect(|l| h.extents(8192, 0, Flags(0), l)).unwrap();
        assert_eq!(e, vec![(0, 8192, EXTENT_HOLE | EXTENT_ZERO)]);
    }
}
