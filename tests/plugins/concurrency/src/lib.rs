//! `concurrency`: reads take 20 ms and are counted. A read at offset 0
//! returns, instead of data, three little-endian u32: the most calls ever
//! running at once in the whole plugin, the most at once on one handle,
//! and the most handles ever open at once.

use nbdhost_plugin_api::{export_backend, Backend, Connection, Flags, OpenContext, Params, Result, ThreadModel};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

#[derive(Default)]
struct Stats {
    running: AtomicU32,
    max_running: AtomicU32,
    handles: AtomicU32,
    max_handles: AtomicU32,
    max_per_handle: AtomicU32,
}

pub struct Concurrency {
    stats: Arc<Stats>,
}

pub struct Handle {
    stats: Arc<Stats>,
    running: AtomicU32,
}

impl Backend for Concurrency {
    type Handle = Handle;
    const NAME: &'static std::ffi::CStr = c"concurrency";
    const VERSION: &'static std::ffi::CStr = c"0.0.1";
    const DESCRIPTION: &'static std::ffi::CStr = c"counts concurrent calls";
    const PARAMS: &'static [nbdhost_plugin_api::abi::ParamSpec] = &[];
    #[cfg(feature = "serialize_connections")]
    const THREAD_MODEL: ThreadModel = ThreadModel::SerializeConnections;
    #[cfg(feature = "serialize_all_requests")]
    const THREAD_MODEL: ThreadModel = ThreadModel::SerializeAllRequests;
    #[cfg(feature = "serialize_requests")]
    const THREAD_MODEL: ThreadModel = ThreadModel::SerializeRequests;
    #[cfg(not(any(feature = "serialize_connections", feature = "serialize_all_requests", feature = "serialize_requests")))]
    const THREAD_MODEL: ThreadModel = ThreadModel::Parallel;

    fn create(_: &Params) -> Result<Self> {
        Ok(Concurrency { stats: Arc::default() })
    }

    fn open(&self, _: &OpenContext) -> Result<Handle> {
        let n = self.stats.handles.fetch_add(1, Ordering::SeqCst) + 1;
        self.stats.max_handles.fetch_max(n, Ordering::SeqCst);
        Ok(Handle { stats: self.stats.clone(), running: AtomicU32::new(0) })
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.stats.handles.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Connection for Handle {
    fn get_size(&self) -> Result<u64> {
        Ok(1 << 20)
    }
    fn pread(&self, buf: &mut [u8], offset: u64, _: Flags) -> Result<()> {
        let s = &self.stats;
        if offset == 0 {
            buf.fill(0);
            for (i, v) in [&s.max_running, &s.max_per_handle, &s.max_handles].iter().enumerate() {
                if buf.len() >= 4 * i + 4 {
                    buf[4 * i..4 * i + 4].copy_from_slice(&v.load(Ordering::SeqCst).to_le_bytes());
                }
            }
            return Ok(());
        }
        let all = s.running.fetch_add(1, Ordering::SeqCst) + 1;
        let mine = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        s.max_running.fetch_max(all, Ordering::SeqCst);
        s.max_per_handle.fetch_max(mine, Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(20));
        self.running.fetch_sub(1, Ordering::SeqCst);
        s.running.fetch_sub(1, Ordering::SeqCst);
        buf.fill(0);
        Ok(())
    }
}

export_backend!(Concurrency);
