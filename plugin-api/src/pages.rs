//! Facts about memory a plugin lends.

/// The kernel's page size, if it says.
fn page_size() -> Option<usize> {
    // SAFETY: sysconf with a valid name, no pointers.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => Some(n as usize),
        _ => None,
    }
}

/// Whether every page of `bytes` is in memory: for a file mapping, whether
/// the file's pages are in the page cache (`mincore`). A plugin that lends
/// a file mapping for writes (`pwrite_lend`) asks this first: storing to
/// an uncached page through a mapping makes the kernel read it from disk
/// before the store, which a `pwrite` of whole pages avoids. A failure
/// counts as not cached.
pub fn pages_cached(bytes: &[u8]) -> bool {
    if bytes.is_empty() {
        return true;
    }
    let Some(page) = page_size() else { return false };
    let (first, end) = (bytes.as_ptr() as usize & !(page - 1), bytes.as_ptr() as usize + bytes.len());
    let mut vec = [0u8; 256];
    let mut at = first;
    while at < end {
        let span = (end - at).min(vec.len() * page);
        // SAFETY: `mincore` on page-aligned addresses covering pages of
        // `bytes` (memory we can read, so mapped), writing one byte per
        // page of `span` into `vec`, which has room for them.
        let rc = unsafe { libc::mincore(at as *mut libc::c_void, span, vec.as_mut_ptr()) };
        if rc != 0 || vec[..span.div_ceil(page)].iter().any(|b| b & 1 == 0) {
            return false;
        }
        at += span;
    }
    true
}

/// Drop this process's page-table entries for the pages of `bytes`, a
/// range of a shared file mapping about to be filled for a write (the data
/// stays in the page cache; later accesses map it again). A page mapped
/// read-only (after a read through the mapping, or after the kernel wrote
/// it back and write-protected it) takes a write-protect fault on the
/// first store, and on a large folio ext4 walks the whole folio for each
/// such 4 KiB fault: 1 MiB writes into written-back pages ran at 0.7 GiB/s
/// so, against 3.9-4.3 GiB/s when the entries were dropped first and the
/// stores faulted the pages in afresh (one fault maps a whole folio). Where
/// the entries were already writable it costs a little (4.1-4.5 against
/// 4.0 GiB/s). A failure is ignored: it only costs the slower faults.
///
/// # Safety
/// `bytes` must lie in a `MAP_SHARED` mapping of a file, and so must the
/// rest of the pages it touches: on private or anonymous memory
/// `MADV_DONTNEED` zeroes whole pages, neighbours' bytes included.
pub unsafe fn drop_page_tables(bytes: &mut [u8]) {
    if bytes.is_empty() {
        return;
    }
    let Some(page) = page_size() else { return };
    let first = bytes.as_ptr() as usize & !(page - 1);
    let end = (bytes.as_ptr() as usize + bytes.len()).div_ceil(page) * page;
    // SAFETY: MADV_DONTNEED on whole pages of a shared file mapping (the
    // caller's contract): only page-table entries go; the file's data,
    // dirty or not, stays in the page cache and is mapped again on the next
    // access (the rounding may take a neighbour's entries too, the same).
    unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_DONTNEED) };
}

/// Counts of the pages (of the kernel's page size) of a file range in the
/// page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachedPages {
    /// Pages the range touches.
    pub pages: u64,
    /// Of which in the page cache.
    pub cached: u64,
    /// Of which dirty (written, not yet written back).
    pub dirty: u64,
}

/// What the page cache holds of `[offset, offset+len)` of the file open as
/// `fd` (`cachestat`, Linux 6.5), or `None` where the kernel lacks it.
pub fn cached_pages(fd: std::os::fd::BorrowedFd<'_>, offset: u64, len: u64) -> Option<CachedPages> {
    use linux_raw_sys::general::{__NR_cachestat, cachestat, cachestat_range};
    use std::os::fd::AsRawFd;
    let range = cachestat_range { off: offset, len };
    let mut out = cachestat { nr_cache: 0, nr_dirty: 0, nr_writeback: 0, nr_evicted: 0, nr_recently_evicted: 0 };
    // SAFETY: cachestat(2) on a descriptor the caller keeps open, reading
    // `range` and writing `out`, both live and of the kernel's layout.
    let rc = unsafe {
        libc::syscall(
            __NR_cachestat as libc::c_long,
            fd.as_raw_fd(),
            &range as *const cachestat_range,
            &mut out as *mut cachestat,
            0u32,
        )
    };
    let page = page_size()? as u64;
    let pages = offset.saturating_add(len).div_ceil(page) - offset / page;
    (rc == 0).then_some(CachedPages { pages, cached: out.nr_cache, dirty: out.nr_dirty })
}

/// Whether to lend `bytes`, the mapping of `[offset, offset+len)` of the
/// file open as `fd`, for a write the host fills through the kernel,
/// getting it ready if so. Only if all its pages are in the page cache
/// ([`pages_cached`] says why); and unless all are dirty already, the
/// page-table entries are dropped first ([`drop_page_tables`] says why).
/// Dirty pages usually have writable entries (our own last stores made
/// them so); one dirtied by a `pwrite` may still be mapped read-only,
/// which costs only speed. Without `cachestat` they are dropped every time.
///
/// # Safety
/// As for [`drop_page_tables`]: `bytes` lies in a `MAP_SHARED` mapping of
/// the file open as `fd`, at `offset`.
pub unsafe fn ready_for_mapped_write(fd: std::os::fd::BorrowedFd<'_>, offset: u64, bytes: &mut [u8]) -> bool {
    let cached = cached_pages(fd, offset, bytes.len() as u64);
    let lend = match cached {
        Some(c) => c.cached >= c.pages,
        None => pages_cached(bytes),
    };
    if lend && cached.is_none_or(|c| c.dirty < c.pages) {
        // SAFETY: the caller's contract.
        unsafe { drop_page_tables(bytes) };
    }
    lend
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touched_memory_is_cached_and_an_unread_file_mapping_is_not() {
        let v = vec![1u8; 3 << 20];
        assert!(pages_cached(&v[5..(2 << 20) + 7]));
        assert!(pages_cached(&[]));
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        // SAFETY: a read-only mapping of a file only this test uses.
        let m = unsafe { memmap2::Mmap::map(&f) }.unwrap();
        assert!(!pages_cached(&m[..]), "a sparse file no one read has no pages cached");
    }

    #[test]
    fn dropping_page_tables_keeps_what_was_written() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(64 << 10).unwrap();
        // SAFETY: a shared writable mapping of a file only this test uses.
        let mut m = unsafe { memmap2::MmapMut::map_mut(&f) }.unwrap();
        m[5000..5100].fill(7);
        // SAFETY: a shared mapping of a file, as the function requires.
        unsafe { drop_page_tables(&mut m[4097..9000]) };
        assert!(m[5000..5100].iter().all(|&b| b == 7) && m[4999] == 0 && m[5100] == 0);
        let mut back = [0u8; 100];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut back, 5000).unwrap();
        assert_eq!(back, [7u8; 100], "the data is in the file's page cache");
    }

    #[test]
    fn cachestat_counts_cached_and_dirty_pages() {
        use std::os::fd::AsFd;
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        let Some(c) = cached_pages(f.as_fd(), 0, 1 << 20) else {
            eprintln!("cachestat(2) is not available on this kernel: nothing to check");
            return;
        };
        assert_eq!(c, CachedPages { pages: 256, cached: 0, dirty: 0 });
        std::os::unix::fs::FileExt::write_all_at(&f, &[1u8; 8192], 4096 * 10 + 100).unwrap();
        let c = cached_pages(f.as_fd(), 4096 * 10, 3 * 4096 + 1).unwrap();
        assert_eq!((c.pages, c.cached, c.dirty), (4, 3, 3), "{c:?}");
        // SAFETY: a shared writable mapping of a file only this test uses.
        let mut m = unsafe { memmap2::MmapMut::map_mut(&f) }.unwrap();
        // SAFETY: a shared mapping of the file, at the offsets given.
        unsafe {
            assert!(!ready_for_mapped_write(f.as_fd(), 0, &mut m[..8192]), "not cached");
            assert!(ready_for_mapped_write(f.as_fd(), 4096 * 10, &mut m[4096 * 10..4096 * 12]), "cached and dirty");
        }
    }
}
