//! The copy-on-write overlay: a sparse data file holding block `i` at
//! `i * block_size`, and one state byte per block.
//!
//! Persistent overlays keep the states in a map file next to the data file
//! and are crash-consistent: [`Overlay::sync`] snapshots the changed map
//! pages, makes the data durable, then writes and syncs the snapshot, so the
//! map on disk never claims a block whose data is not on disk. A state only
//! becomes "in overlay" after the block's data was written, so anything in
//! a snapshot is covered by the data sync that follows it.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

/// The block is not in the overlay: read it from the layer below.
pub const BELOW: u8 = 0;
/// The block's data is in the overlay file.
pub const DATA: u8 = 1;
/// The block reads as zeros (trimmed or zeroed); nothing is stored.
pub const ZERO: u8 = 2;

const MAGIC: &[u8; 8] = b"NBDHCOW\x01";
const HEADER: u64 = 4096;
/// Map bytes written per dirty page.
const MAP_PAGE: u64 = 4096;

/// Something went wrong with the overlay files.
#[derive(Debug)]
pub struct OverlayError(pub String);

impl std::fmt::Display for OverlayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn io_err(what: impl std::fmt::Display, e: std::io::Error) -> OverlayError {
    OverlayError(format!("{what}: {e}"))
}

/// The persistent map file and its dirty pages.
struct MapFile {
    file: File,
    path: PathBuf,
    dirty: Mutex<BTreeSet<u64>>,
}

/// A copy-on-write overlay over a disk of `size` bytes.
pub struct Overlay {
    data: File,
    data_path: Option<PathBuf>,
    block: u64,
    size: u64,
    states: Vec<AtomicU8>,
    map: Option<MapFile>,
    /// Striped per-block locks for first copies and partial updates.
    stripes: Vec<Mutex<()>>,
    /// Serialises syncs so two flushes do not interleave map writes.
    sync_lock: Mutex<()>,
    /// A temporary overlay's data, mapped shared and writable for lent
    /// reads and writes.
    mapped: Option<memmap2::MmapRaw>,
}

impl Overlay {
    fn blocks(size: u64, block: u64) -> u64 {
        size.div_ceil(block)
    }

    fn new(
        data: File,
        data_path: Option<PathBuf>,
        block: u64,
        size: u64,
        states: Vec<AtomicU8>,
        map: Option<MapFile>,
    ) -> Self {
        Overlay {
            data,
            data_path,
            block,
            size,
            states,
            map,
            stripes: (0..1024).map(|_| Mutex::new(())).collect(),
            sync_lock: Mutex::new(()),
            mapped: None,
        }
    }

    /// A temporary overlay: an unlinked file in `dir`, gone at exit.
    pub fn temporary(dir: &Path, block: u64, size: u64) -> Result<Overlay, OverlayError> {
        let data =
            tempfile::tempfile_in(dir).map_err(|e| io_err(format!("creating an overlay in {}", dir.display()), e))?;
        data.set_len(size).map_err(|e| io_err("sizing the temporary overlay", e))?;
        let n = Self::blocks(size, block);
        let mut ov = Self::new(data, None, block, size, (0..n).map(|_| AtomicU8::new(BELOW)).collect(), None);
        ov.mapped = ov.map_for_lending();
        Ok(ov)
    }

    /// Map the data file so reads of overlay blocks can be lent and writes
    /// received into it. Only for temporary overlays: the file is unlinked
    /// and ours alone, so nothing can shrink it under the mapping (a
    /// persistent one could be truncated by someone else; its blocks are
    /// read and written through buffers).
    fn map_for_lending(&self) -> Option<memmap2::MmapRaw> {
        if self.size == 0 || usize::try_from(self.size).is_err() {
            return None;
        }
        // A shared writable mapping of an unlinked file we own and keep
        // open (and at `size` bytes) for the mapping's lifetime. Its bytes
        // are only ever handed to the kernel (to send, or to fill from a
        // socket), never loaded or stored by this process: see `lendable`
        // and `lendable_for_write`.
        memmap2::MmapOptions::new().len(self.size as usize).map_raw(&self.data).ok()
    }

    /// Whether overlay blocks can be lent ([`Overlay::lendable`]).
    pub fn is_mapped(&self) -> bool {
        self.mapped.is_some()
    }

    /// The mapping's `[offset, offset+len)`, if mapped and in bounds.
    fn mapped_range(&self, offset: u64, len: u64) -> Option<*mut u8> {
        let m = self.mapped.as_ref()?;
        offset.checked_add(len).filter(|&e| e <= m.len() as u64)?;
        // In bounds (checked above).
        Some(m.as_mut_ptr().wrapping_add(offset as usize))
    }

    /// The overlay's bytes `[offset, offset+len)` where they are mapped,
    /// to lend (`None`: read them with [`Overlay::read_data`]). The bytes
    /// of a block change only under its writers; whoever lends them sends
    /// what is there.
    pub fn lendable(&self, offset: u64, len: u64) -> Option<&[u8]> {
        let p = self.mapped_range(offset, len)?;
        // SAFETY: inside the mapping (checked), alive as long as `self`.
        // Writers may change the bytes meanwhile; the host only hands them
        // to the kernel.
        Some(unsafe { std::slice::from_raw_parts(p, len as usize) })
    }

    /// The overlay's bytes `[offset, offset+len)`, to lend for a write,
    /// where mapped and all in the page cache (storing to an uncached page
    /// through the mapping would read it first). The caller holds the
    /// locks of the blocks it covers whole and has the host fill it only
    /// through the kernel.
    #[allow(clippy::mut_from_ref)]
    pub fn lendable_for_write(&self, offset: u64, len: u64) -> Option<&mut [u8]> {
        let p = self.mapped_range(offset, len)?;
        // SAFETY: inside the writable mapping (checked), alive as long as
        // `self`. Only the kernel stores through it (`FLAG_KERNEL_FILL`) or
        // reads it (`mincore`, lent reads), so an overlapping write in
        // flight at the same time cannot be miscompiled; the file is ours
        // and never shrinks, and a store to a hole the filesystem has no
        // room for is EFAULT for that write.
        let bytes = unsafe { std::slice::from_raw_parts_mut(p, len as usize) };
        let fd = std::os::fd::AsFd::as_fd(&self.data);
        // SAFETY: `bytes` is the shared mapping of the overlay file at `offset`.
        unsafe { nbdhost_plugin_api::ready_for_mapped_write(fd, offset, bytes) }.then_some(bytes)
    }

    /// Mark block `i`, whose whole data was just written, as DATA.
    pub fn mark_data(&self, i: u64) {
        self.set_state(i, DATA);
    }

    /// The stripe lock index of block `i` (see [`Overlay::lock_stripe`]).
    pub fn stripe_of(&self, i: u64) -> usize {
        (i % self.stripes.len() as u64) as usize
    }

    /// Lock stripe `s`; a caller taking several takes them in increasing
    /// order (single-block callers hold one at a time).
    pub fn lock_stripe(&self, s: usize) -> std::sync::MutexGuard<'_, ()> {
        self.stripes[s].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A persistent overlay at `path` (data) and `path.map` (block states),
    /// created if missing. An existing one must match `block` and `size`.
    pub fn persistent(path: &Path, block: u64, size: u64) -> Result<Overlay, OverlayError> {
        let map_path = PathBuf::from(format!("{}.map", path.display()));
        let n = Self::blocks(size, block);
        let open = |p: &Path| OpenOptions::new().read(true).write(true).create(true).truncate(false).open(p);
        let data = open(path).map_err(|e| io_err(format!("opening overlay {}", path.display()), e))?;
        let mapf = open(&map_path).map_err(|e| io_err(format!("opening overlay map {}", map_path.display()), e))?;
        // One owner at a time: two overlays (two exports, a reload, or two
        // servers) on the same files would corrupt each other.
        rustix::fs::flock(&mapf, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(|e| {
            OverlayError(format!("overlay {} is in use by another export or process ({e})", path.display()))
        })?;
        let map_len = mapf.metadata().map_err(|e| io_err(map_path.display(), e))?.len();
        let states: Vec<AtomicU8> = if map_len == 0 {
            // New overlay: write the header and an all-BELOW map, durably,
            // before any data can depend on it.
            let mut h = vec![0u8; HEADER as usize];
            h[..8].copy_from_slice(MAGIC);
            h[8..16].copy_from_slice(&block.to_le_bytes());
            h[16..24].copy_from_slice(&size.to_le_bytes());
            mapf.write_all_at(&h, 0).map_err(|e| io_err(map_path.display(), e))?;
            mapf.set_len(HEADER + n).map_err(|e| io_err(map_path.display(), e))?;
            data.set_len(size).map_err(|e| io_err(path.display(), e))?;
            data.sync_all().map_err(|e| io_err(path.display(), e))?;
            mapf.sync_all().map_err(|e| io_err(map_path.display(), e))?;
            sync_dir(path);
            (0..n).map(|_| AtomicU8::new(BELOW)).collect()
        } else {
            let mut h = vec![0u8; HEADER as usize];
            mapf.read_exact_at(&mut h, 0).map_err(|e| io_err(format!("reading {}", map_path.display()), e))?;
            if &h[..8] != MAGIC {
                return Err(OverlayError(format!("{} is not an nbdhost overlay map", map_path.display())));
            }
            let fblock = u64::from_le_bytes(h[8..16].try_into().unwrap());
            let fsize = u64::from_le_bytes(h[16..24].try_into().unwrap());
            if fblock != block || fsize != size {
                return Err(OverlayError(format!(
                    "overlay {} was made for a {fsize}-byte disk with {fblock}-byte blocks, not {size} and {block}; \
                     remove it (and its .map) to start a new one",
                    path.display()
                )));
            }
            if map_len < HEADER + n {
                return Err(OverlayError(format!("{} is truncated", map_path.display())));
            }
            let mut raw = vec![0u8; n as usize];
            mapf.read_exact_at(&mut raw, HEADER).map_err(|e| io_err(format!("reading {}", map_path.display()), e))?;
            if let Some(bad) = raw.iter().position(|&b| b > ZERO) {
                return Err(OverlayError(format!(
                    "{}: block {bad} has an invalid state {}",
                    map_path.display(),
                    raw[bad]
                )));
            }
            raw.into_iter().map(AtomicU8::new).collect()
        };
        let map = MapFile { file: mapf, path: map_path, dirty: Mutex::new(BTreeSet::new()) };
        Ok(Self::new(data, Some(path.to_path_buf()), block, size, states, Some(map)))
    }

    /// Disk size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Block size.
    pub fn block(&self) -> u64 {
        self.block
    }

    /// State of block `i`.
    pub fn state(&self, i: u64) -> u8 {
        self.states[i as usize].load(Ordering::Acquire)
    }

    fn set_state(&self, i: u64, s: u8) {
        self.states[i as usize].store(s, Ordering::Release);
        if let Some(m) = &self.map {
            m.dirty.lock().unwrap_or_else(|e| e.into_inner()).insert(i / MAP_PAGE);
        }
    }

    /// Lock the stripe of block `i`.
    pub fn lock(&self, i: u64) -> std::sync::MutexGuard<'_, ()> {
        self.lock_stripe(self.stripe_of(i))
    }

    fn name(&self) -> String {
        self.data_path.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "temporary overlay".into())
    }

    /// Read overlay bytes.
    pub fn read_data(&self, buf: &mut [u8], offset: u64) -> Result<(), OverlayError> {
        self.data.read_exact_at(buf, offset).map_err(|e| io_err(format!("{}: read {offset}", self.name()), e))
    }

    /// Write overlay bytes (the caller updates block states).
    pub fn write_data(&self, buf: &[u8], offset: u64) -> Result<(), OverlayError> {
        self.data.write_all_at(buf, offset).map_err(|e| io_err(format!("{}: write {offset}", self.name()), e))
    }

    /// Store a whole block's data and mark it DATA.
    pub fn store_block(&self, i: u64, data: &[u8]) -> Result<(), OverlayError> {
        self.write_data(data, i * self.block)?;
        self.set_state(i, DATA);
        Ok(())
    }

    /// Mark a whole block as reading zeros and release its space.
    pub fn zero_block(&self, i: u64) {
        if self.state(i) == DATA {
            // Giving space back is an optimisation: ignore filesystems that
            // cannot punch holes.
            let len = self.block.min(self.size - i * self.block);
            let _ = rustix::fs::fallocate(
                &self.data,
                rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                i * self.block,
                len,
            );
        }
        self.set_state(i, ZERO);
    }

    /// Make every change so far durable (no-op beyond fdatasync for a
    /// temporary overlay).
    pub fn sync(&self) -> Result<(), OverlayError> {
        let _g = self.sync_lock.lock().unwrap_or_else(|e| e.into_inner());
        let Some(m) = &self.map else {
            // Nothing survives a restart anyway; still honour the contract
            // for the current process.
            return self.data.sync_data().map_err(|e| io_err(format!("{}: fdatasync", self.name()), e));
        };
        // 1. Snapshot the changed map pages (states only turn DATA after
        //    their data was written).
        let pages: Vec<u64> =
            std::mem::take(&mut *m.dirty.lock().unwrap_or_else(|e| e.into_inner())).into_iter().collect();
        let n = self.states.len() as u64;
        let snapshot: Vec<(u64, Vec<u8>)> = pages
            .iter()
            .map(|&p| {
                let start = p * MAP_PAGE;
                let end = (start + MAP_PAGE).min(n);
                (start, (start..end).map(|i| self.state(i)).collect())
            })
            .collect();
        // 2. Make the data durable.
        if let Err(e) = self.data.sync_data() {
            self.redirty(m, &pages);
            return Err(io_err(format!("{}: fdatasync", self.name()), e));
        }
        // 3. Write and sync the snapshot.
        let mut r = Ok(());
        for (start, bytes) in &snapshot {
            if let Err(e) = m.file.write_all_at(bytes, HEADER + start) {
                r = Err(io_err(format!("{}: write", m.path.display()), e));
                break;
            }
        }
        if r.is_ok() && !snapshot.is_empty() {
            r = m.file.sync_data().map_err(|e| io_err(format!("{}: fdatasync", m.path.display()), e));
        }
        if r.is_err() {
            self.redirty(m, &pages);
        }
        r
    }

    fn redirty(&self, m: &MapFile, pages: &[u64]) {
        m.dirty.lock().unwrap_or_else(|e| e.into_inner()).extend(pages.iter().copied());
    }
}

fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        if let Ok(d) = File::open(if dir.as_os_str().is_empty() { Path::new(".") } else { dir }) {
            let _ = d.sync_all();
        }
    }
}
