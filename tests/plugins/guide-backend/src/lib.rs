//! `ramdisk`: a RAM disk shared by every connection of an export.

use nbdhost_plugin_api::abi::ParamSpec;
use nbdhost_plugin_api::{
    export_backend, host, param, Backend, Connection, Error, Flags, Flush, OpenContext, ParamKind, Params, Pwrite,
    Result,
};
use std::ffi::CStr;
use std::sync::{Arc, RwLock};

/// Per export: the disk.
pub struct RamDisk(Arc<RwLock<Vec<u8>>>);
/// Per connection: the same disk.
pub struct RamHandle(Arc<RwLock<Vec<u8>>>);

impl Backend for RamDisk {
    type Handle = RamHandle;
    const NAME: &'static CStr = c"ramdisk";
    const VERSION: &'static CStr = c"0.1.0";
    const DESCRIPTION: &'static CStr = c"a RAM disk (the plugin guide's backend)";
    const PARAMS: &'static [ParamSpec] = &[param(c"size", ParamKind::Size, true, None, c"disk size, at most 1G")];

    fn create(params: &Params) -> Result<Self> {
        let size = params.size("size")?.unwrap_or(0); // validated by the host: required, a size
        if size > 1 << 30 {
            return Err(Error::invalid(format!("ramdisk: {size} bytes is more than 1 GiB")));
        }
        Ok(RamDisk(Arc::new(RwLock::new(vec![0; size as usize]))))
    }

    fn open(&self, ctx: &OpenContext) -> Result<RamHandle> {
        host::info(&format!("{} opened export `{}`", ctx.peer, ctx.export_name));
        Ok(RamHandle(self.0.clone()))
    }
}

impl Connection for RamHandle {
    fn get_size(&self) -> Result<u64> {
        Ok(self.0.read().unwrap().len() as u64)
    }
    fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        // The host has checked that the range lies inside the disk.
        buf.copy_from_slice(&self.0.read().unwrap()[offset as usize..][..buf.len()]);
        Ok(())
    }
    fn can_multi_conn(&self) -> Result<bool> {
        Ok(true) // all connections share one disk
    }
}

impl Pwrite for RamHandle {
    fn pwrite(&self, buf: &[u8], offset: u64, _flags: Flags) -> Result<()> {
        self.0.write().unwrap()[offset as usize..][..buf.len()].copy_from_slice(buf);
        Ok(())
    }
}

impl Flush for RamHandle {
    fn flush(&self, _flags: Flags) -> Result<()> {
        Ok(()) // RAM: nothing to make durable
    }
}

export_backend!(RamDisk);
