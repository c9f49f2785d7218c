//! `xor`: XOR every byte with a key on its way to and from the layer below.

use nbdhost_plugin_api::abi::ParamSpec;
use nbdhost_plugin_api::{
    export_filter, param, Error, Filter, FilterConnection, Flags, Next, OpenContext, ParamKind, Params, Result,
};
use std::ffi::CStr;

/// Per export: the key.
pub struct Xor(u8);
/// Per connection: the layer below and the key.
pub struct XorHandle(Next, u8);

impl Filter for Xor {
    type Handle = XorHandle;
    const NAME: &'static CStr = c"xor";
    const VERSION: &'static CStr = c"0.1.0";
    const DESCRIPTION: &'static CStr = c"XOR every byte with a key (the plugin guide's filter)";
    const PARAMS: &'static [ParamSpec] = &[param(c"key", ParamKind::Int, false, Some(c"255"), c"byte to XOR with")];

    fn create(params: &Params) -> Result<Self> {
        let key = params.int("key")?.unwrap_or(255);
        let key = u8::try_from(key).map_err(|_| Error::invalid(format!("xor: key {key} is not a byte")))?;
        Ok(Xor(key))
    }

    fn open(&self, _ctx: &OpenContext, mut below: Vec<Next>) -> Result<XorHandle> {
        Ok(XorHandle(below.remove(0), self.0))
    }
}

impl FilterConnection for XorHandle {
    fn next(&self) -> &Next {
        &self.0 // everything not overridden below passes through to it
    }
    fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        self.0.pread(buf, offset, flags)?;
        buf.iter_mut().for_each(|b| *b ^= self.1);
        Ok(())
    }
    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        let scrambled: Vec<u8> = buf.iter().map(|b| b ^ self.1).collect();
        self.0.pwrite(&scrambled, offset, flags)
    }
    // Zeros and holes below read back as `key` through us: let the host
    // zero by writing through pwrite, and report every block as data.
    fn can_zero(&self) -> Result<bool> {
        Ok(false)
    }
    fn can_extents(&self) -> Result<bool> {
        Ok(false)
    }
}

export_filter!(Xor);
