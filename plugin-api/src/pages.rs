//! Facts about memory a plugin lends.

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
    // SAFETY: sysconf with a valid name, no pointers.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => return false,
    };
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
}
