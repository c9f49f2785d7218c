//! O_DIRECT without its alignment rules leaking to the layers above.
//!
//! The kernel refuses (EINVAL) a direct transfer whose file offset, length
//! or buffer address is not aligned, but nothing above `file` aligns its
//! requests: clients send any byte range, `cow` reads below into plain
//! heap buffers. So, per request:
//!
//! * offset and length aligned, buffer aligned: straight through the
//!   O_DIRECT descriptor;
//! * offset and length aligned, buffer not: through an aligned per-thread
//!   bounce buffer, still O_DIRECT (one copy, no page cache);
//! * offset or length not aligned: through a second descriptor opened
//!   without O_DIRECT. This also covers the unaligned tail of a file,
//!   which a direct write could only reach by extending the file.
//!
//! The kernel keeps the two descriptors coherent for transfers that do not
//! run at the same time: a direct transfer writes back the cached pages of
//! its range first and a direct write drops them after. Run at the same
//! time, a buffered transfer can leave a stale cached page (or large
//! folio, which may span more than the alignment) behind a direct write,
//! even where their byte ranges do not overlap. So direct transfers share
//! a lock that buffered ones take alone; the buffered path is the rare,
//! unaligned one.
//!
//! Where the kernel refuses a transfer we took for aligned (alignment
//! unknown, guessed too small), it is redone through the buffered
//! descriptor, with one warning per file, and from then on every transfer
//! of that file goes through the page cache.

use nbdhost_plugin_api::host;
use std::cell::RefCell;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

/// The alignment assumed where the kernel does not say.
const DEFAULT_ALIGN: u64 = 4096;

/// Bounce transfers go in chunks of this much (rounded up to the offset
/// alignment), so a thread's bounce buffer stays small.
const BOUNCE_CHUNK: usize = 1 << 20;

/// One file's O_DIRECT state.
pub struct DirectIo {
    /// The same file without O_DIRECT, for unaligned requests.
    buffered: File,
    /// File offsets and lengths must be multiples of this.
    offset_align: u64,
    /// Buffer addresses must be multiples of this.
    mem_align: usize,
    /// Whether the kernel has refused an aligned transfer (warned once;
    /// everything goes through `buffered` since).
    refused: AtomicBool,
    /// Shared by direct transfers, taken alone by buffered ones.
    mix: RwLock<()>,
}

impl DirectIo {
    /// `direct_fd` is the O_DIRECT descriptor (asked for its alignment);
    /// `buffered` the same file opened without O_DIRECT.
    pub fn new(direct_fd: &File, buffered: File, path: &Path) -> DirectIo {
        let (offset_align, mem_align) = match dio_alignment(direct_fd) {
            Some((mem, off)) => (u64::from(off), (mem as usize).max(1)),
            None => {
                host::debug(&format!(
                    "{}: the kernel does not report O_DIRECT alignment; assuming {DEFAULT_ALIGN} bytes",
                    path.display()
                ));
                (DEFAULT_ALIGN, DEFAULT_ALIGN as usize)
            }
        };
        // At least a page, so the aligned path is whole pages.
        let offset_align = offset_align.max(page_size()).next_power_of_two();
        DirectIo { buffered, offset_align, mem_align, refused: AtomicBool::new(false), mix: RwLock::new(()) }
    }

    fn direct_ok(&self, offset: u64, len: usize) -> bool {
        self.aligned_range(offset, len) && !self.refused.load(Ordering::Relaxed)
    }

    fn buffered_read(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let _alone = self.mix.write().unwrap_or_else(|e| e.into_inner());
        self.buffered.read_exact_at(buf, offset)
    }

    fn buffered_write(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let _alone = self.mix.write().unwrap_or_else(|e| e.into_inner());
        self.buffered.write_all_at(buf, offset)
    }

    fn aligned_range(&self, offset: u64, len: usize) -> bool {
        offset.is_multiple_of(self.offset_align) && (len as u64).is_multiple_of(self.offset_align)
    }

    fn aligned_buf(&self, p: *const u8) -> bool {
        (p as usize).is_multiple_of(self.mem_align)
    }

    fn chunk(&self) -> usize {
        BOUNCE_CHUNK.next_multiple_of(self.offset_align as usize)
    }

    /// Read `buf.len()` bytes at `offset`; `direct` is the O_DIRECT descriptor.
    pub fn read(&self, direct: &File, path: &Path, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if !self.direct_ok(offset, buf.len()) {
            return self.buffered_read(buf, offset);
        }
        let shared = self.mix.read().unwrap_or_else(|e| e.into_inner());
        let r = if self.aligned_buf(buf.as_ptr()) {
            read_whole(direct, buf, offset)
        } else {
            with_bounce(self.chunk(), self.mem_align, |bounce| {
                let chunk = bounce.len();
                for (i, piece) in buf.chunks_mut(chunk).enumerate() {
                    let b = &mut bounce[..piece.len()];
                    read_whole(direct, b, offset + (i * chunk) as u64)?;
                    piece.copy_from_slice(b);
                }
                Ok(())
            })
        };
        drop(shared);
        match r {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                self.refused(path, &e);
                self.buffered_read(buf, offset)
            }
            r => r,
        }
    }

    /// Write `buf` at `offset`; `direct` is the O_DIRECT descriptor.
    pub fn write(&self, direct: &File, path: &Path, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if !self.direct_ok(offset, buf.len()) {
            return self.buffered_write(buf, offset);
        }
        let shared = self.mix.read().unwrap_or_else(|e| e.into_inner());
        let r = if self.aligned_buf(buf.as_ptr()) {
            direct.write_all_at(buf, offset)
        } else {
            with_bounce(self.chunk(), self.mem_align, |bounce| {
                let chunk = bounce.len();
                for (i, piece) in buf.chunks(chunk).enumerate() {
                    let b = &mut bounce[..piece.len()];
                    b.copy_from_slice(piece);
                    direct.write_all_at(b, offset + (i * chunk) as u64)?;
                }
                Ok(())
            })
        };
        drop(shared);
        match r {
            // Rewriting the whole range is safe: a write is idempotent.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                self.refused(path, &e);
                self.buffered_write(buf, offset)
            }
            r => r,
        }
    }

    fn refused(&self, path: &Path, e: &std::io::Error) {
        if !self.refused.swap(true, Ordering::Relaxed) {
            host::warn(&format!(
                "{}: the kernel refused an O_DIRECT transfer aligned to {} bytes (offset) and {} (memory): {e}; \
                 such requests go through the page cache",
                path.display(),
                self.offset_align,
                self.mem_align
            ));
        }
    }
}

/// Fill `buf` from `offset` with one direct read. A short read means the
/// file ends inside the range (a regular file reads short only at its
/// end, and our reads are far below the kernel's 2 GiB cap): that is
/// reported as such, rather than retried at an offset that is no longer
/// aligned (which the kernel would refuse with EINVAL).
fn read_whole(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    loop {
        match f.read_at(buf, offset) {
            Ok(n) if n == buf.len() => return Ok(()),
            Ok(_) => {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the file ends inside this range"))
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The system's page size.
fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as u64
    } else {
        DEFAULT_ALIGN
    }
}

/// (memory, offset) alignment of O_DIRECT transfers on this descriptor,
/// from statx(STATX_DIOALIGN) (Linux 6.1; block devices from 6.11), or
/// None where the kernel or filesystem does not say.
fn dio_alignment(f: &File) -> Option<(u32, u32)> {
    // SAFETY: an all-zero statx is a valid value of this plain C struct.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx on our own descriptor with an empty path
    // (AT_EMPTY_PATH) writes only into `st`, which lives across the call.
    let rc = unsafe { libc::statx(f.as_raw_fd(), c"".as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, &mut st) };
    if rc != 0 || st.stx_mask & libc::STATX_DIOALIGN == 0 || st.stx_dio_offset_align == 0 {
        return None;
    }
    Some((st.stx_dio_mem_align, st.stx_dio_offset_align))
}

thread_local! {
    /// The thread's bounce buffer (over-allocated so an aligned window fits).
    static BOUNCE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Run `f` on an aligned bounce buffer of `len` bytes.
fn with_bounce<T>(len: usize, align: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
    fn window(v: &mut Vec<u8>, len: usize, align: usize) -> &mut [u8] {
        if v.len() < len + align {
            *v = vec![0; len + align];
        }
        let start = v.as_ptr().align_offset(align);
        &mut v[start..start + len]
    }
    BOUNCE.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => f(window(&mut v, len, align)),
        // Not reentered today; a fresh buffer keeps it correct if it ever is.
        Err(_) => f(window(&mut Vec::new(), len, align)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::os::unix::fs::OpenOptionsExt;

    fn open_pair(path: &Path) -> (File, DirectIo) {
        let direct = OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(path).unwrap();
        let buffered = OpenOptions::new().read(true).write(true).open(path).unwrap();
        let d = DirectIo::new(&direct, buffered, path);
        (direct, d)
    }

    #[test]
    fn any_range_and_any_buffer_reads_and_writes_through_o_direct() {
        let dir = std::env::temp_dir().join(format!("nbdhost-direct-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk");
        // A size that is not a multiple of the alignment: the tail is
        // reachable only through the buffered descriptor.
        let mib = 1 << 20;
        let size = 3 * mib + 1000;
        std::fs::write(&path, vec![0u8; size]).unwrap();
        let mut model = vec![0u8; size];
        let (direct, d) = match OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(&path) {
            Ok(_) => open_pair(&path),
            Err(e) => panic!("this filesystem refuses O_DIRECT: {e}"),
        };
        // Aligned, unaligned offset, unaligned length, the tail, and
        // buffers at odd addresses.
        let cases: &[(u64, usize, usize)] = &[
            (0, 65536, 0),
            (4096, 8192, 1),
            (100, 5000, 0),
            (65536 - 7, 14, 3),
            (3 * mib as u64, 1000, 0),
            (3 * mib as u64 - 4096, 5096, 5),
            // Several bounce chunks.
            (8192, 2 * BOUNCE_CHUNK + 4096, 7),
        ];
        for (n, &(off, len, skew)) in cases.iter().enumerate() {
            let mut backing = vec![0u8; len + 64];
            let src = &mut backing[skew..skew + len];
            for (i, b) in src.iter_mut().enumerate() {
                *b = (i as u8).wrapping_mul(31).wrapping_add(n as u8 + 1);
            }
            d.write(&direct, &path, src, off).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(src);
            let mut back = vec![0u8; len + 64];
            d.read(&direct, &path, &mut back[skew + 1..skew + 1 + len], off).unwrap();
            assert_eq!(&back[skew + 1..skew + 1 + len], &model[off as usize..off as usize + len], "case {n}");
        }
        assert_eq!(std::fs::read(&path).unwrap(), model);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), size as u64, "no write extended the file");
        assert!(!d.refused.load(Ordering::Relaxed), "the kernel refused a transfer we took for aligned");
        // The premise: the kernel itself refuses what the cases above sent.
        let mut odd = vec![0u8; 8192 + 1];
        let e = direct.read_exact_at(&mut odd[1..], 0).expect_err("O_DIRECT took a buffer at an odd address");
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        let e = with_bounce(8192, d.mem_align, |b| direct.read_exact_at(b, 100))
            .expect_err("O_DIRECT took an unaligned offset");
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        // A file shrunk under an aligned read: reported as the short file it
        // is, not retried unaligned (which the kernel refuses) nor taken
        // for a refusal of O_DIRECT.
        OpenOptions::new().write(true).open(&path).unwrap().set_len(65536 + 100).unwrap();
        let e = with_bounce(8192, d.mem_align, |b| d.read(&direct, &path, b, 65536)).expect_err("read past the end");
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
        assert!(!d.refused.load(Ordering::Relaxed), "a short file was taken for a refusal of O_DIRECT");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
