//! `offset` filter: serve a window `[offset, offset + range)` of the layer
//! below as a whole disk.

use nbdhost_plugin_api::{
    export_filter, param, Error, ExtentList, Filter, FilterConnection, FilterLendRead, Flags, Next, OpenContext,
    ParamKind, Params, Result,
};

/// Per-export settings.
pub struct Offset {
    offset: u64,
    range: Option<u64>,
}

/// Per-connection handle.
pub struct OffsetHandle {
    next: Next,
    offset: u64,
    size: u64,
}

impl Filter for Offset {
    type Handle = OffsetHandle;
    const NAME: &'static std::ffi::CStr = c"offset";
    const VERSION: &'static std::ffi::CStr = c"0.1.0";
    const DESCRIPTION: &'static std::ffi::CStr = c"serve a window of the layer below";
    const PARAMS: &'static [nbdhost_plugin_api::abi::ParamSpec] = &[
        param(c"offset", ParamKind::Size, false, Some(c"0"), c"where the window starts in the layer below"),
        param(c"range", ParamKind::Size, false, None, c"window length (default: to the end of the layer below)"),
    ];

    fn create(p: &Params) -> Result<Self> {
        Ok(Offset { offset: p.size("offset")?.unwrap_or(0), range: p.size("range")? })
    }

    fn open(&self, _ctx: &OpenContext, mut children: Vec<Next>) -> Result<OffsetHandle> {
        let next = children.remove(0);
        let below = next.get_size()?;
        let size = match self.range {
            Some(r) => r,
            None => below.checked_sub(self.offset).ok_or_else(|| {
                Error::invalid(format!("offset {} is past the end of the layer below ({below} bytes)", self.offset))
            })?,
        };
        if self.offset.checked_add(size).is_none_or(|end| end > below) {
            return Err(Error::invalid(format!(
                "window {}+{size} does not fit in the layer below ({below} bytes)",
                self.offset
            )));
        }
        Ok(OffsetHandle { next, offset: self.offset, size })
    }
}

impl FilterConnection for OffsetHandle {
    fn next(&self) -> &Next {
        &self.next
    }
    fn get_size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        self.next.pread(buf, offset + self.offset, flags)
    }
    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.next.pwrite(buf, offset + self.offset, flags)
    }
    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.next.trim(count, offset + self.offset, flags)
    }
    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.next.zero(count, offset + self.offset, flags)
    }
    fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.next.cache(count, offset + self.offset, flags)
    }
    fn extents(&self, count: u64, offset: u64, flags: Flags, out: &mut ExtentList<'_>) -> Result<()> {
        for (o, l, f) in self.next.extents_vec(count, offset + self.offset, flags)? {
            out.add(o - self.offset, l, f)?;
        }
        Ok(())
    }
}

/// Reads of the window are the layer below's, shifted: lend them through.
impl FilterLendRead for OffsetHandle {
    fn pread_lend(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        sink: &mut dyn FnMut(&[&[u8]]) -> Result<()>,
    ) -> Result<()> {
        self.next.pread_lend(count, offset + self.offset, flags, sink)
    }
}

export_filter!(Offset);
