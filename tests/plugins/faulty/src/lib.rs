//! `faulty`: an in-memory disk that misbehaves on purpose, for tests.
//!
//! * reading any byte of `[panic_at, panic_at + 4096)` panics inside the
//!   plugin (the host must turn it into EIO for that request only);
//! * reading any byte of `[fail_at, fail_at + 4096)` returns EIO with a
//!   message naming the offset (which must reach the client).
//! * reading any byte of `[delay_at, delay_at + 4096)` takes `delay_ms`
//!   (to hold a request in flight);
//! * `min_block` / `max_block` declare block-size constraints.
//! * `lend` (ABI 1.1 `pread_lend`, which the host uses for reads of 64 KiB
//!   or more): `copy` (default: lends a copy made by `pread`, so every rule
//!   above holds), `good` (lends its memory), `short` (lends one byte too
//!   few), `panic` (panics before lending), `twice` (calls the sink again),
//!   `gone` (lends a mapping of a file truncated to nothing, whose pages
//!   fault: a host that loads them itself dies of SIGBUS).
//! * `lend_write` (ABI 1.2 `pwrite_lend`, which the host uses for writes of
//!   16 KiB or more still arriving): `copy` (default: lends a scratch
//!   buffer, then `pwrite`s it), `good` (lends its memory, in two pieces),
//!   `short` (one byte too few), `panic` (panics before lending), `twice`
//!   (calls the sink again), `refuse` (fails with ENOSPC without lending),
//!   `fail` (fails with EIO after the sink filled its memory).
//! Every other byte reads back what was written (initially zero).

use nbdhost_plugin_api::{
    export_backend, param, Backend, BlockSize, Connection, Error, Flags, LendRead, LendWrite, OpenContext, ParamKind, Params,
    Pwrite, Result,
};
use std::sync::{Arc, RwLock};

#[derive(Clone)]
pub struct Faulty {
    data: Arc<RwLock<Vec<u8>>>,
    panic_at: u64,
    fail_at: u64,
    delay_at: u64,
    delay_ms: u64,
    min_block: u32,
    max_block: u32,
    lend: String,
    lend_write: String,
}

pub struct FaultyHandle(Faulty);

fn hits(offset: u64, len: usize, at: u64) -> bool {
    offset < at + 4096 && at < offset + len as u64
}

impl Backend for Faulty {
    type Handle = FaultyHandle;
    const NAME: &'static std::ffi::CStr = c"faulty";
    const VERSION: &'static std::ffi::CStr = c"0.0.1";
    const DESCRIPTION: &'static std::ffi::CStr = c"test backend that panics or fails on chosen blocks";
    const PARAMS: &'static [nbdhost_plugin_api::abi::ParamSpec] = &[
        param(c"size", ParamKind::Size, false, Some(c"16M"), c"disk size"),
        param(c"panic_at", ParamKind::Size, false, Some(c"1M"), c"reads of this 4 KiB block panic"),
        param(c"fail_at", ParamKind::Size, false, Some(c"2M"), c"reads of this 4 KiB block fail with EIO"),
        param(c"delay_at", ParamKind::Size, false, Some(c"3M"), c"reads of this 4 KiB block are slow"),
        param(c"delay_ms", ParamKind::Int, false, Some(c"1500"), c"how slow, in milliseconds"),
        param(c"min_block", ParamKind::Size, false, Some(c"0"), c"minimum block size to declare (0: none)"),
        param(c"max_block", ParamKind::Size, false, Some(c"0"), c"maximum payload to declare (0: default)"),
        param(c"lend", ParamKind::String, false, Some(c"copy"), c"pread_lend: copy, good, short, panic, twice, gone"),
        param(
            c"lend_write",
            ParamKind::String,
            false,
            Some(c"copy"),
            c"pwrite_lend: copy, good, short, panic, twice, refuse, fail",
        ),
    ];

    fn create(p: &Params) -> Result<Self> {
        let size = p.size("size")?.unwrap_or(16 << 20);
        Ok(Faulty {
            data: Arc::new(RwLock::new(vec![0; size as usize])),
            panic_at: p.size("panic_at")?.unwrap_or(1 << 20),
            fail_at: p.size("fail_at")?.unwrap_or(2 << 20),
            delay_at: p.size("delay_at")?.unwrap_or(3 << 20),
            delay_ms: p.int("delay_ms")?.unwrap_or(1500) as u64,
            min_block: p.size("min_block")?.unwrap_or(0) as u32,
            max_block: p.size("max_block")?.unwrap_or(0) as u32,
            lend: p.get("lend").unwrap_or("copy").to_string(),
            lend_write: p.get("lend_write").unwrap_or("copy").to_string(),
        })
    }

    fn open(&self, _: &OpenContext) -> Result<FaultyHandle> {
        Ok(FaultyHandle(self.clone()))
    }
}

impl Connection for FaultyHandle {
    fn get_size(&self) -> Result<u64> {
        Ok(self.0.data.read().unwrap().len() as u64)
    }
    fn block_size(&self) -> Result<Option<BlockSize>> {
        let f = &self.0;
        Ok((f.min_block != 0 || f.max_block != 0).then_some(BlockSize {
            minimum: f.min_block,
            preferred: 0,
            maximum: f.max_block,
        }))
    }
    fn pread(&self, buf: &mut [u8], offset: u64, _: Flags) -> Result<()> {
        let f = &self.0;
        if hits(offset, buf.len(), f.panic_at) {
            panic!("faulty plugin: deliberate panic reading offset {offset}");
        }
        if hits(offset, buf.len(), f.fail_at) {
            return Err(Error::io(format!("faulty plugin: injected failure at offset {offset}")));
        }
        if hits(offset, buf.len(), f.delay_at) {
            std::thread::sleep(std::time::Duration::from_millis(f.delay_ms));
        }
        let d = f.data.read().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
}

impl LendRead for FaultyHandle {
    fn pread_lend(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        sink: &mut dyn FnMut(&[&[u8]]) -> Result<()>,
    ) -> Result<()> {
        let d = self.0.data.read().unwrap();
        let all = &d[offset as usize..(offset + count) as usize];
        let (a, b) = all.split_at(all.len() / 2);
        match self.0.lend.as_str() {
            "copy" => {
                drop(d);
                let mut buf = vec![0u8; count as usize];
                self.pread(&mut buf, offset, flags)?;
                sink(&[&buf])
            }
            "good" => sink(&[a, b]),
            "short" => sink(&[a, &b[..b.len() - 1]]),
            "panic" => panic!("faulty plugin: deliberate panic lending offset {offset}"),
            "twice" => {
                sink(&[a, b])?;
                sink(&[a, b])
            }
            "gone" => {
                drop(d);
                let path = std::env::temp_dir().join(format!("faulty-gone-{}-{offset}", std::process::id()));
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&path)
                    .map_err(|e| Error::from_io(path.display(), &e))?;
                let _ = std::fs::remove_file(&path);
                file.set_len(count).map_err(|e| Error::from_io("set_len", &e))?;
                // SAFETY: a shared read-only mapping of a file this call
                // owns; its pages are made to fault on purpose below, and
                // this plugin never reads them itself.
                let map = unsafe { memmap2::MmapOptions::new().len(count as usize).map(&file) }
                    .map_err(|e| Error::from_io("mmap", &e))?;
                file.set_len(0).map_err(|e| Error::from_io("truncate", &e))?;
                sink(&[&map[..]])
            }
            other => Err(Error::invalid(format!("unknown lend mode {other}"))),
        }
    }
}

impl LendWrite for FaultyHandle {
    fn pwrite_lend(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        sink: &mut dyn FnMut(&mut [&mut [u8]]) -> Result<()>,
    ) -> Result<()> {
        let mode = self.0.lend_write.as_str();
        if mode == "copy" {
            let mut buf = vec![0u8; count as usize];
            sink(&mut [&mut buf])?;
            return self.pwrite(&buf, offset, flags);
        }
        if mode == "panic" {
            // Before taking the lock: a panic under it would poison it.
            panic!("faulty plugin: deliberate panic lending offset {offset} for a write");
        }
        let mut d = self.0.data.write().unwrap();
        let all = &mut d[offset as usize..(offset + count) as usize];
        let (a, b) = all.split_at_mut(all.len() / 2);
        match mode {
            "good" => sink(&mut [a, b]),
            "short" => {
                let n = b.len() - 1;
                sink(&mut [a, &mut b[..n]])
            }
            "twice" => {
                sink(&mut [&mut *a, &mut *b])?;
                sink(&mut [a, b])
            }
            "refuse" => Err(Error::no_space(format!("faulty plugin: no room at offset {offset}"))),
            "fail" => {
                sink(&mut [a, b])?;
                Err(Error::io(format!("faulty plugin: injected failure after filling offset {offset}")))
            }
            other => Err(Error::invalid(format!("unknown lend_write mode {other}"))),
        }
    }
}

impl Pwrite for FaultyHandle {
    fn pwrite(&self, buf: &[u8], offset: u64, _: Flags) -> Result<()> {
        let mut d = self.0.data.write().unwrap();
        d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
}

export_backend!(Faulty);
