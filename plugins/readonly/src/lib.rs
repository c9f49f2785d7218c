//! `readonly` filter: the export below is served read-only, and the layers
//! below are opened read-only too, so nothing under it can be written.

use nbdhost_plugin_api::{export_filter, Filter, FilterConnection, FilterLendRead, Next, OpenContext, Params, Result};

/// The filter (no settings).
pub struct ReadOnly;

/// Per-connection handle.
pub struct ReadOnlyHandle {
    next: Next,
}

impl Filter for ReadOnly {
    type Handle = ReadOnlyHandle;
    const NAME: &'static std::ffi::CStr = c"readonly";
    const VERSION: &'static std::ffi::CStr = c"0.1.0";
    const DESCRIPTION: &'static std::ffi::CStr = c"refuse every write";
    const PARAMS: &'static [nbdhost_plugin_api::abi::ParamSpec] = &[];
    const CHILD_READONLY: bool = true;

    fn create(_: &Params) -> Result<Self> {
        Ok(ReadOnly)
    }
    fn open(&self, _: &OpenContext, mut children: Vec<Next>) -> Result<ReadOnlyHandle> {
        Ok(ReadOnlyHandle { next: children.remove(0) })
    }
}

impl FilterConnection for ReadOnlyHandle {
    fn next(&self) -> &Next {
        &self.next
    }
    fn can_write(&self) -> Result<bool> {
        Ok(false)
    }
}

/// Reads pass through unchanged, and so does lending.
impl FilterLendRead for ReadOnlyHandle {}

export_filter!(ReadOnly);
