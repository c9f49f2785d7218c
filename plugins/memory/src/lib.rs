//! `memory` backend: a sparse in-memory disk. Pages are allocated on first
//! write and freed again by trim/zero, so a 1 TiB export costs only what is
//! written. One store per export, shared by every connection (hence safe to
//! advertise multi-conn). Contents vanish when the server exits.

use nbdhost_plugin_api::abi::{EXTENT_HOLE, EXTENT_ZERO};
use nbdhost_plugin_api::{
    export_backend, param, Backend, Cache, Connection, Error, ExtentList, Extents, Flags, Flush, LendRead, LendWrite,
    OpenContext, ParamKind, Params, Pwrite, Result, Support, Trim, Zero,
};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, RwLock};

/// Page size of the sparse store. 32 KiB keeps metadata small for large
/// disks while a 4 KiB random write only allocates one page.
const PAGE: u64 = 32 * 1024;
/// Lock shards; pages are spread over them by index so parallel requests
/// rarely contend.
const SHARDS: usize = 64;

/// A page has its own lock: the shard's lock is held only to find or
/// insert it, never while its 32 KiB are copied, so requests that touch
/// different pages of one shard do not wait for each other.
type Page = Arc<RwLock<PageBuf>>;

/// A page's bytes, and whether `zero` has taken the page out of the store.
/// A writer finds a page and then locks it; if `zero` removed it in
/// between (it had become all zeros), writing into it would be lost, so a
/// writer that finds it removed looks again (and gets a new page).
struct PageBuf {
    bytes: Box<[u8]>,
    removed: bool,
}

impl std::ops::Deref for PageBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

impl std::ops::DerefMut for PageBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.bytes
    }
}

fn new_page() -> Page {
    Arc::new(RwLock::new(PageBuf { bytes: vec![0u8; PAGE as usize].into_boxed_slice(), removed: false }))
}

/// Hashes page indexes with one multiplication instead of SipHash: the
/// keys are our own page numbers, not attacker-chosen strings, and the
/// lookup is on every request's path. The high half of the product is
/// folded into the low bits, where the map takes its bucket from.
#[derive(Default)]
struct PageHasher(u64);

impl Hasher for PageHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64((self.0 << 8) | b as u64);
        }
    }
    fn write_u64(&mut self, n: u64) {
        let p = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = p ^ (p >> 32);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type PageMap = HashMap<u64, Page, BuildHasherDefault<PageHasher>>;

/// The shared sparse store.
pub struct SparseStore {
    size: u64,
    shards: Vec<RwLock<PageMap>>,
}

impl SparseStore {
    /// An all-zero store of `size` bytes.
    pub fn new(size: u64) -> Self {
        SparseStore { size, shards: (0..SHARDS).map(|_| RwLock::new(PageMap::default())).collect() }
    }

    fn shard(&self, page: u64) -> &RwLock<PageMap> {
        // Scattered, not `page % SHARDS`: clients working on slices whose
        // distance is a multiple of SHARDS pages (any power of two of
        // 2 MiB or more) would otherwise move through the same shards in
        // lockstep and wait for each other at every page.
        let h = page.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
        &self.shards[(h as usize) % SHARDS]
    }

    /// Split `[offset, offset+len)` into per-page pieces:
    /// (page index, offset within page, length, offset within the request).
    fn pieces(offset: u64, len: u64) -> impl Iterator<Item = (u64, usize, usize, usize)> {
        let end = offset + len;
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let page = pos / PAGE;
            let in_page = (pos % PAGE) as usize;
            let n = ((PAGE - pos % PAGE).min(end - pos)) as usize;
            let item = (page, in_page, n, (pos - offset) as usize);
            pos += n as u64;
            Some(item)
        })
    }

    fn check(&self, len: u64, offset: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::invalid(format!("range {offset}+{len} is outside the {}-byte disk", self.size))),
        }
    }

    /// The page, if allocated.
    fn page(&self, page: u64) -> Option<Page> {
        self.shard(page).read().unwrap_or_else(|e| e.into_inner()).get(&page).cloned()
    }

    /// The page, allocated if it was not.
    fn page_or_new(&self, page: u64) -> Page {
        if let Some(p) = self.page(page) {
            return p;
        }
        self.shard(page).write().unwrap_or_else(|e| e.into_inner()).entry(page).or_insert_with(new_page).clone()
    }

    /// Read into `buf` from `offset`.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(buf.len() as u64, offset)?;
        for (page, at, n, boff) in Self::pieces(offset, buf.len() as u64) {
            let dst = &mut buf[boff..boff + n];
            match self.page(page) {
                Some(p) => dst.copy_from_slice(&p.read().unwrap_or_else(|e| e.into_inner())[at..at + n]),
                None => dst.fill(0),
            }
        }
        Ok(())
    }

    /// Hand `sink` the bytes of `[offset, offset+len)` where they lie: the
    /// pages (read-locked while it runs) and, for holes, a shared zero page.
    /// All pages are found first and then locked, so no shard lock is taken
    /// while page locks are held (`zero` holds a shard lock while it waits
    /// for a page lock).
    pub fn lend(&self, len: u64, offset: u64, sink: &mut dyn FnMut(&[&[u8]]) -> Result<()>) -> Result<()> {
        static ZERO_PAGE: [u8; PAGE as usize] = [0; PAGE as usize];
        self.check(len, offset)?;
        let found: Vec<(Option<Page>, usize, usize)> =
            Self::pieces(offset, len).map(|(page, at, n, _)| (self.page(page), at, n)).collect();
        let guards: Vec<_> =
            found.iter().map(|(p, _, _)| p.as_ref().map(|p| p.read().unwrap_or_else(|e| e.into_inner()))).collect();
        let slices: Vec<&[u8]> = found
            .iter()
            .zip(&guards)
            .map(|(&(_, at, n), g)| match g {
                Some(g) => &g[at..at + n],
                None => &ZERO_PAGE[..n],
            })
            .collect();
        sink(&slices)
    }

    /// Hand `sink` the memory of `[offset, offset+len)` to fill with a
    /// write's data: the pages, allocated if need be and write-locked while
    /// it runs (so no reader sees the range half-written). Pages are found
    /// first and then locked in ascending order, as in [`Self::lend`].
    pub fn lend_for_write(
        &self,
        len: u64,
        offset: u64,
        sink: &mut dyn FnMut(&mut [&mut [u8]]) -> Result<()>,
    ) -> Result<()> {
        self.check(len, offset)?;
        loop {
            let found: Vec<(Page, usize, usize)> =
                Self::pieces(offset, len).map(|(page, at, n, _)| (self.page_or_new(page), at, n)).collect();
            let mut guards: Vec<_> =
                found.iter().map(|(p, _, _)| p.write().unwrap_or_else(|e| e.into_inner())).collect();
            if guards.iter().any(|g| g.removed) {
                // `zero` took one out after we found it: find them again.
                continue;
            }
            let mut slices: Vec<&mut [u8]> =
                found.iter().zip(guards.iter_mut()).map(|(&(_, at, n), g)| &mut g[at..at + n]).collect();
            return sink(&mut slices);
        }
    }

    /// Run `f` on page `page`, allocated if need be and write-locked (a
    /// page `zero` removed after it was found is found again).
    fn with_page_mut(&self, page: u64, f: impl FnOnce(&mut [u8])) {
        loop {
            let p = self.page_or_new(page);
            let mut g = p.write().unwrap_or_else(|e| e.into_inner());
            if !g.removed {
                return f(&mut g);
            }
        }
    }

    /// Write `buf` at `offset`, allocating pages as needed.
    pub fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check(buf.len() as u64, offset)?;
        for (page, at, n, boff) in Self::pieces(offset, buf.len() as u64) {
            self.with_page_mut(page, |p| p[at..at + n].copy_from_slice(&buf[boff..boff + n]));
        }
        Ok(())
    }

    /// Zero a range: whole pages are freed, partial pages zeroed in place.
    /// With `keep_allocated` (NO_HOLE) every page of the range ends up
    /// allocated instead, so later writes there need no new memory.
    pub fn zero(&self, len: u64, offset: u64, keep_allocated: bool) -> Result<()> {
        self.check(len, offset)?;
        for (page, at, n, _) in Self::pieces(offset, len) {
            if keep_allocated {
                self.with_page_mut(page, |p| p[at..at + n].fill(0));
                continue;
            }
            let mut shard = self.shard(page).write().unwrap_or_else(|e| e.into_inner());
            if n as u64 == PAGE {
                if let Some(p) = shard.remove(&page) {
                    p.write().unwrap_or_else(|e| e.into_inner()).removed = true;
                }
            } else if let Some(p) = shard.get(&page) {
                // Under the shard lock, so no one can find the page while
                // it is judged all-zero and removed; a writer that found it
                // before sees it marked removed and looks again.
                let mut data = p.write().unwrap_or_else(|e| e.into_inner());
                data[at..at + n].fill(0);
                if data.iter().all(|&b| b == 0) {
                    data.removed = true;
                    drop(data);
                    shard.remove(&page);
                }
            }
        }
        Ok(())
    }

    /// Is the page holding `offset` allocated?
    fn allocated(&self, page: u64) -> bool {
        self.shard(page).read().unwrap_or_else(|e| e.into_inner()).contains_key(&page)
    }

    /// Report extents of `[offset, offset+len)`, merging equal neighbours.
    pub fn extents(&self, len: u64, offset: u64, req_one: bool, out: &mut ExtentList<'_>) -> Result<()> {
        self.check(len, offset)?;
        let end = offset + len;
        let mut start = offset;
        let mut state = None;
        let mut pos = offset;
        while pos < end {
            let page = pos / PAGE;
            let next = ((page + 1) * PAGE).min(end);
            let flags = if self.allocated(page) { 0 } else { EXTENT_HOLE | EXTENT_ZERO };
            match state {
                Some(s) if s == flags => {}
                Some(s) => {
                    out.add(start, pos - start, s)?;
                    if req_one {
                        return Ok(());
                    }
                    start = pos;
                    state = Some(flags);
                }
                None => state = Some(flags),
            }
            pos = next;
        }
        out.add(start, end - start, state.unwrap_or(0))
    }

    /// Bytes of page memory currently allocated.
    pub fn allocated_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.read().unwrap_or_else(|e| e.into_inner()).len() as u64 * PAGE).sum()
    }
}

/// The per-export plugin state.
pub struct MemoryBackend {
    store: Arc<SparseStore>,
}

/// A connection's handle: a reference to the export's shared store.
pub struct MemoryHandle {
    store: Arc<SparseStore>,
}

impl Backend for MemoryBackend {
    type Handle = MemoryHandle;
    const NAME: &'static std::ffi::CStr = c"memory";
    const VERSION: &'static std::ffi::CStr = c"0.1.0";
    const DESCRIPTION: &'static std::ffi::CStr = c"sparse RAM disk shared by all connections of the export";
    const PARAMS: &'static [nbdhost_plugin_api::abi::ParamSpec] =
        &[param(c"size", ParamKind::Size, true, None, c"disk size in bytes (K/M/G/T suffixes allowed)")];

    fn create(params: &Params) -> Result<Self> {
        let size = params.size("size")?.ok_or_else(|| Error::invalid("parameter `size` is required"))?;
        if size > i64::MAX as u64 {
            return Err(Error::invalid(format!("size {size} is larger than {} bytes", i64::MAX)));
        }
        Ok(MemoryBackend { store: Arc::new(SparseStore::new(size)) })
    }

    fn open(&self, _ctx: &OpenContext) -> Result<MemoryHandle> {
        Ok(MemoryHandle { store: self.store.clone() })
    }
}

impl Connection for MemoryHandle {
    fn get_size(&self) -> Result<u64> {
        Ok(self.store.size)
    }
    fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        self.store.read(buf, offset)
    }
    fn can_fua(&self) -> Result<Support> {
        // RAM is as durable as it gets here: FUA needs no extra work.
        Ok(Support::Native)
    }
    fn can_multi_conn(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_cache(&self) -> Result<Support> {
        Ok(Support::Native)
    }
}

impl Pwrite for MemoryHandle {
    fn pwrite(&self, buf: &[u8], offset: u64, _flags: Flags) -> Result<()> {
        self.store.write(buf, offset)
    }
}

impl LendWrite for MemoryHandle {
    fn pwrite_lend(
        &self,
        count: u64,
        offset: u64,
        _flags: Flags,
        sink: &mut dyn FnMut(&mut [&mut [u8]]) -> Result<()>,
    ) -> Result<()> {
        self.store.lend_for_write(count, offset, sink)
    }
}

impl LendRead for MemoryHandle {
    fn pread_lend(
        &self,
        count: u64,
        offset: u64,
        _flags: Flags,
        sink: &mut dyn FnMut(&[&[u8]]) -> Result<()>,
    ) -> Result<()> {
        self.store.lend(count, offset, sink)
    }
}

impl Flush for MemoryHandle {
    fn flush(&self, _flags: Flags) -> Result<()> {
        Ok(())
    }
}

impl Trim for MemoryHandle {
    fn trim(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        self.store.zero(count, offset, false)
    }
}

impl Zero for MemoryHandle {
    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        // Freeing or zeroing pages is always cheaper than writing zeros, so
        // fast-zero requests succeed. Without MAY_TRIM (the client's
        // NO_HOLE) the pages stay allocated.
        self.store.zero(count, offset, !flags.may_trim())
    }
}

impl Extents for MemoryHandle {
    fn extents(&self, count: u64, offset: u64, flags: Flags, out: &mut ExtentList<'_>) -> Result<()> {
        self.store.extents(count, offset, flags.req_one(), out)
    }
}

impl Cache for MemoryHandle {
    fn cache(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Ok(())
    }
}

export_backend!(MemoryBackend);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_read_write_zero() {
        let s = SparseStore::new(1 << 20);
        let mut buf = vec![1u8; 100];
        s.read(&mut buf, 5000).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        let data: Vec<u8> = (0..70000u32).map(|i| (i % 251) as u8).collect();
        s.write(&data, 30000).unwrap();
        let mut back = vec![0u8; data.len()];
        s.read(&mut back, 30000).unwrap();
        assert_eq!(back, data);
        assert_eq!(s.allocated_bytes(), 4 * PAGE);
        s.zero(70000, 30000, false).unwrap();
        s.read(&mut back, 30000).unwrap();
        assert!(back.iter().all(|&b| b == 0));
        assert_eq!(s.allocated_bytes(), 0, "fully zeroed pages are freed");
        s.zero(PAGE, 0, true).unwrap();
        assert_eq!(s.allocated_bytes(), PAGE, "NO_HOLE zeroing keeps the range allocated");
    }

    /// Writers on slices a power of two apart (the same shards in lockstep
    /// before pages were scattered) and readers of the same pages: every
    /// slice ends up exactly as its writer left it.
    #[test]
    fn concurrent_writers_and_readers_keep_their_slices() {
        const SLICE: u64 = 64 * PAGE;
        let s = Arc::new(SparseStore::new(4 * SLICE));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 3 * PAGE as usize / 2];
                    for round in 0..50u64 {
                        let off = t * SLICE + (round * 7919 * 512) % (SLICE - buf.len() as u64);
                        buf.fill((t * 50 + round) as u8 | 1);
                        s.write(&buf, off).unwrap();
                        let mut back = vec![0u8; buf.len()];
                        s.read(&mut back, off).unwrap();
                        assert_eq!(back, buf, "thread {t} round {round}: another writer got in");
                        if round % 5 == 0 {
                            s.zero(PAGE, t * SLICE + (round % 64) * PAGE, round % 10 == 0).unwrap();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    /// A write and a zero of different bytes of one page, at the same
    /// time, where the zero leaves the page all zeros (so it frees it):
    /// the write must survive. It used to be lost when the writer had
    /// found the page just before the zero freed it.
    #[test]
    fn a_write_racing_a_zero_of_other_bytes_in_its_page_is_kept() {
        let s = Arc::new(SparseStore::new(2 * PAGE));
        let go = Arc::new(std::sync::Barrier::new(2));
        let rounds = 100_000;
        let zeroer = {
            let (s, go) = (s.clone(), go.clone());
            std::thread::spawn(move || {
                for _ in 0..rounds {
                    go.wait();
                    s.zero(4096, 8192, false).unwrap();
                    go.wait();
                }
            })
        };
        let mut lost = 0;
        for round in 0..rounds {
            go.wait();
            if round % 2 == 0 {
                s.write(&[7], 100).unwrap();
            } else {
                s.lend_for_write(1, 100, &mut |p| {
                    p[0][0] = 7;
                    Ok(())
                })
                .unwrap();
            }
            go.wait();
            let mut b = [0u8];
            s.read(&mut b, 100).unwrap();
            lost += (b[0] != 7) as u32;
            s.zero(PAGE, 0, false).unwrap();
        }
        zeroer.join().unwrap();
        assert_eq!(lost, 0, "{lost} of {rounds} writes lost");
    }

    #[test]
    fn lent_pieces_are_what_a_read_returns() {
        let s = SparseStore::new(8 * PAGE);
        let data: Vec<u8> = (0..3 * PAGE as u32).map(|i| (i % 253) as u8 | 1).collect();
        s.write(&data, PAGE + 100).unwrap();
        for (off, len) in [(0, 8 * PAGE), (PAGE + 50, 2 * PAGE), (5 * PAGE, 3 * PAGE), (7, 1)] {
            let mut want = vec![0u8; len as usize];
            s.read(&mut want, off).unwrap();
            let mut got = Vec::new();
            s.lend(len, off, &mut |pieces| {
                for p in pieces {
                    got.extend_from_slice(p);
                }
                Ok(())
            })
            .unwrap();
            assert_eq!(got, want, "{off}+{len}");
        }
        assert!(s.lend(2, 8 * PAGE - 1, &mut |_| Ok(())).is_err(), "out of range");
    }

    /// A writer filling lent pages holds them: a reader of the range sees
    /// it before or after the write, never half of it.
    #[test]
    fn readers_never_see_a_lent_write_half_done() {
        let s = Arc::new(SparseStore::new(4 * PAGE));
        // Allocated first: a reader that finds a page still unallocated
        // (and so lends zeros) could see a first write half done.
        s.write(&vec![0xff; 4 * PAGE as usize], 0).unwrap();
        let writer = {
            let s = s.clone();
            std::thread::spawn(move || {
                for round in 1..=200u32 {
                    s.lend_for_write(2 * PAGE, PAGE / 2, &mut |pieces| {
                        for p in pieces.iter_mut() {
                            for b in p.iter_mut() {
                                *b = round as u8;
                            }
                        }
                        Ok(())
                    })
                    .unwrap();
                }
            })
        };
        while !writer.is_finished() {
            let mut buf = vec![0u8; 2 * PAGE as usize];
            s.lend(2 * PAGE, PAGE / 2, &mut |pieces| {
                let mut at = 0;
                for p in pieces {
                    buf[at..at + p.len()].copy_from_slice(p);
                    at += p.len();
                }
                Ok(())
            })
            .unwrap();
            assert!(buf.iter().all(|&b| b == buf[0]), "a reader saw a write half done");
            assert!(buf[0] != 0, "pages lent for a write are never lent empty");
        }
        writer.join().unwrap();
        assert!(s.lend_for_write(2, 4 * PAGE - 1, &mut |_| Ok(())).is_err(), "out of range");
    }

    #[test]
    fn out_of_range_is_refused() {
        let s = SparseStore::new(4096);
        assert!(s.write(&[0u8; 2], 4095).is_err());
        assert!(s.read(&mut [0u8; 1], u64::MAX).is_err());
    }

    mod model {
        use super::super::*;
        use nbdhost_plugin_api::abi::EXTENT_ZERO;
        use proptest::prelude::*;

        const SIZE: u64 = 6 * PAGE + 1234;

        #[derive(Debug, Clone)]
        enum Op {
            /// With `true`, through `lend_for_write`.
            Write(u64, Vec<u8>, bool),
            Zero(u64, u64),
            Read(u64, u64),
        }

        fn op() -> impl Strategy<Value = Op> {
            let off = 0..SIZE;
            prop_oneof![
                (off.clone(), 1..(2 * PAGE as usize), any::<u8>(), any::<bool>()).prop_map(|(o, len, seed, lent)| {
                    Op::Write(o, (0..len).map(|i| seed.wrapping_add(i as u8) | 1).collect(), lent)
                }),
                (off.clone(), 1..(3 * PAGE)).prop_map(|(o, l)| Op::Zero(o, l)),
                (off, 1..(3 * PAGE)).prop_map(|(o, l)| Op::Read(o, l)),
            ]
        }

        /// Write `d` at `o` by filling the pieces the store lends.
        fn fill(s: &SparseStore, d: &[u8], o: u64) -> Result<()> {
            s.lend_for_write(d.len() as u64, o, &mut |pieces| {
                let mut at = 0;
                for p in pieces.iter_mut() {
                    p.copy_from_slice(&d[at..at + p.len()]);
                    at += p.len();
                }
                assert_eq!(at, d.len(), "pieces cover the write exactly");
                Ok(())
            })
        }

        fn extents(s: &SparseStore, off: u64, len: u64) -> Vec<(u64, u64, u32)> {
            ExtentList::collect(|list| s.extents(len, off, false, list)).unwrap()
        }

        proptest! {
            #[test]
            fn sparse_store_behaves_like_a_flat_buffer(ops in prop::collection::vec(op(), 1..40)) {
                let store = SparseStore::new(SIZE);
                let mut model = vec![0u8; SIZE as usize];
                for op in ops {
                    match op {
                        Op::Write(o, d, lent) => {
                            let fits = o + d.len() as u64 <= SIZE;
                            let r = if lent { fill(&store, &d, o) } else { store.write(&d, o) };
                            prop_assert_eq!(r.is_ok(), fits);
                            if fits {
                                model[o as usize..o as usize + d.len()].copy_from_slice(&d);
                            }
                        }
                        Op::Zero(o, l) => {
                            let fits = o + l <= SIZE;
                            prop_assert_eq!(store.zero(l, o, l % 2 == 0).is_ok(), fits);
                            if fits {
                                model[o as usize..(o + l) as usize].fill(0);
                            }
                        }
                        Op::Read(o, l) => {
                            let mut buf = vec![0xffu8; l as usize];
                            let fits = o + l <= SIZE;
                            prop_assert_eq!(store.read(&mut buf, o).is_ok(), fits);
                            if fits {
                                prop_assert_eq!(&buf[..], &model[o as usize..(o + l) as usize]);
                            }
                        }
                    }
                }
                // Extents cover the disk contiguously, and whatever they
                // call zero really reads as zeros.
                let ext = extents(&store, 0, SIZE);
                let mut pos = 0;
                for (o, l, f) in ext {
                    prop_assert_eq!(o, pos);
                    prop_assert!(l > 0);
                    if f & EXTENT_ZERO != 0 {
                        prop_assert!(model[o as usize..(o + l) as usize].iter().all(|&b| b == 0));
                    }
                    pos += l;
                }
                prop_assert_eq!(pos, SIZE);
            }
        }
    }
}
