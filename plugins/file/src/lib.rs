//! `file` backend: serves a regular file or a block device.
//!
//! * reads and writes with `pread`/`pwrite` on one descriptor shared by every
//!   connection (so the page cache is shared and multi-conn is safe);
//! * flush is `fdatasync`; FUA is emulated by the host with a flush;
//! * trim punches a hole, zero uses `fallocate` (ZERO_RANGE, or PUNCH_HOLE
//!   when the client allows holes), falling back to written zeros where the
//!   filesystem cannot;
//! * extents come from `SEEK_DATA`/`SEEK_HOLE`, so sparse files show holes;
//! * large reads of regular files are lent (ABI 1.1) from a shared mapping
//!   of the file, so the host sends them from the page cache without
//!   copying them into a buffer first (see [`Segment::lendable`] for what
//!   keeps a file that shrinks from faulting);
//! * large writes to regular files are received into the same (writable)
//!   mapping (ABI 1.2 `pwrite_lend`, with 1.5's declines and
//!   `FLAG_KERNEL_FILL`), one copy from the socket into the
//!   page cache instead of two (socket to buffer, buffer to page cache);
//!   only where the host fills it through the kernel and the pages are
//!   already cached (see [`Segment::lendable_for_write`]), otherwise it
//!   declines and the host calls `pwrite`;
//! * `direct = true` opens with O_DIRECT but takes any range and buffer
//!   (see [`direct`] for how unaligned requests are served).

mod direct;

use nbdhost_plugin_api::abi::{EXTENT_HOLE, EXTENT_ZERO};
use nbdhost_plugin_api::{
    export_backend, host, param, ready_for_mapped_write, Backend, Cache, Connection, Error, ExtentList, Extents, Flags,
    Flush, LendRead, LendWrite, OpenContext, ParamKind, Params, Pwrite, Result, Support, Trim, Zero,
};
use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The opened file, shared by the export's connections.
pub struct OpenFile {
    file: File,
    path: PathBuf,
    writable: bool,
    is_block_device: bool,
    /// Set when `file` is opened with O_DIRECT.
    direct: Option<direct::DirectIo>,
}

impl OpenFile {
    fn size(&self) -> Result<u64> {
        if self.is_block_device {
            // SAFETY: lseek on a descriptor we own; SEEK_END returns the size
            // of a block device without moving any shared state that pread
            // relies on (pread/pwrite take explicit offsets).
            let end = unsafe { libc::lseek(self.file.as_raw_fd(), 0, libc::SEEK_END) };
            if end < 0 {
                return Err(self.os_error("lseek(SEEK_END)"));
            }
            return Ok(end as u64);
        }
        Ok(self.file.metadata().map_err(|e| Error::from_io(self.path.display(), &e))?.len())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.direct {
            None => self.file.read_exact_at(buf, offset),
            Some(d) => d.read(&self.file, &self.path, buf, offset),
        }
        .map_err(|e| Error::from_io(format!("{}: read {offset}+{}", self.path.display(), buf.len()), &e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        match &self.direct {
            None => self.file.write_all_at(buf, offset),
            Some(d) => d.write(&self.file, &self.path, buf, offset),
        }
        .map_err(|e| Error::from_io(format!("{}: write {offset}+{}", self.path.display(), buf.len()), &e))
    }

    fn os_error(&self, what: &str) -> Error {
        let e = std::io::Error::last_os_error();
        Error::from_io(format!("{}: {what}", self.path.display()), &e)
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> std::result::Result<(), i32> {
        // SAFETY: fallocate on our own descriptor with plain integer arguments.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset as i64, len as i64) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO))
        }
    }

    fn seek(&self, offset: u64, whence: i32) -> Option<u64> {
        // SAFETY: lseek on our own descriptor; only the return value is used.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), offset as i64, whence) };
        (r >= 0).then_some(r as u64)
    }
}

/// One file of the export and where it starts.
struct Segment {
    file: OpenFile,
    start: u64,
    size: u64,
    /// The file mapped shared as it was at start (regular files opened
    /// without O_DIRECT, not empty), for lent reads and, if the file is
    /// writable (then so is the mapping), lent writes.
    map: Option<memmap2::MmapRaw>,
}

impl Segment {
    fn map(file: &OpenFile, size: u64, direct: bool) -> Option<memmap2::MmapRaw> {
        if file.is_block_device || direct || size == 0 {
            return None;
        }
        let mut opts = memmap2::MmapOptions::new();
        opts.len(size as usize);
        // A shared mapping of a file we keep open for the mapping's
        // lifetime. Its bytes can change under us (our own writes, or other
        // processes), which is fine for bytes only the kernel reads or
        // writes; a file that shrinks (or a hole the filesystem has no room
        // to allocate) makes an access fault, which is why the host copies
        // lent bytes, both ways, only through the kernel, which turns the
        // fault into EFAULT for that request instead of a SIGBUS. See
        // `lendable` and `lendable_for_write`.
        let mapped = if file.writable { opts.map_raw(&file.file) } else { opts.map_raw_read_only(&file.file) };
        match mapped {
            Ok(m) => Some(m),
            Err(e) => {
                host::warn(&format!(
                    "{}: cannot map it for lent I/O ({e}); reads and writes are copied",
                    file.path.display()
                ));
                None
            }
        }
    }

    /// The mapping's `[o, o+l)`, if mapped and the file still covers it
    /// (a file truncated since start is read with `pread`, which reports
    /// the short file as an error).
    fn mapped(&self, o: u64, l: u64) -> Option<*mut u8> {
        let map = self.map.as_ref()?;
        let end = o.checked_add(l)?;
        if end > map.len() as u64 || self.file.size().ok()? < end {
            return None;
        }
        // In bounds (checked above), so the offset stays inside the mapping.
        Some(map.as_mut_ptr().wrapping_add(o as usize))
    }

    /// The mapped bytes `[o, o+l)` of this file, to lend for a read.
    fn lendable(&self, o: u64, l: u64) -> Option<&[u8]> {
        let p = self.mapped(o, l)?;
        // SAFETY: `p..p+l` lies inside the mapping (checked by `mapped`),
        // which lives as long as `self`. The bytes may change while
        // borrowed (writes by other requests or processes); the host only
        // hands them to the kernel, never reads them itself.
        Some(unsafe { std::slice::from_raw_parts(p, l as usize) })
    }

    /// The mapped bytes `[o, o+l)` of this file, to lend for a write: only
    /// if the mapping is writable, the file covers the range and
    /// [`ready_for_mapped_write`] says yes (all its pages in the page
    /// cache, read-only page-table entries dropped), so a write to cold
    /// parts of a large image declines and goes through `pwrite`.
    #[allow(clippy::mut_from_ref)]
    fn lendable_for_write(&self, o: u64, l: u64) -> Option<&mut [u8]> {
        if !self.file.writable {
            return None;
        }
        let p = self.mapped(o, l)?;
        // SAFETY: `p..p+l` lies inside the writable mapping (checked by
        // `mapped`), alive as long as `self`. The slice goes only to
        // `ready_for_mapped_write` (which hands its address to the kernel)
        // and to the host, which fills it only through the kernel (the caller checks
        // `FLAG_KERNEL_FILL`): no code of this process loads or stores
        // through it, so another request lending an overlapping range at
        // the same time (overlapping writes in flight, which NBD leaves
        // undefined, as for two `pwrite`s) cannot be miscompiled, and a
        // fault is EFAULT for this write, not a SIGBUS.
        let bytes = unsafe { std::slice::from_raw_parts_mut(p, l as usize) };
        // SAFETY: `bytes` is the shared mapping of this file at `o`.
        unsafe { ready_for_mapped_write(self.file.file.as_fd(), o, bytes) }.then_some(bytes)
    }
}

/// The files of an export laid end to end (one file in the usual case).
pub struct Files {
    segs: Vec<Segment>,
    size: u64,
    writable: bool,
}

impl Files {
    /// Split `[offset, offset+len)` by file: (segment, offset in the file,
    /// length, offset in the request).
    fn split(&self, offset: u64, len: u64) -> impl Iterator<Item = (&Segment, u64, u64, usize)> + '_ {
        let end = offset + len;
        self.segs.iter().filter_map(move |s| {
            let a = offset.max(s.start);
            let b = end.min(s.start + s.size);
            (a < b).then(|| (s, a - s.start, b - a, (a - offset) as usize))
        })
    }
}

/// Per-export state.
pub struct FileBackend {
    files: Arc<Files>,
}

/// Per-connection handle.
pub struct FileHandle {
    files: Arc<Files>,
}

fn open_one(path: &Path, direct: bool) -> Result<OpenFile> {
    let open = |write: bool, flags: i32| {
        OpenOptions::new().read(true).write(write).custom_flags(flags).open(path).map_err(|e| {
            if flags & libc::O_DIRECT != 0 && e.raw_os_error() == Some(libc::EINVAL) {
                Error::invalid(format!(
                    "{}: this filesystem does not support O_DIRECT; remove `direct = true`",
                    path.display()
                ))
            } else {
                Error::from_io(format!("opening {}", path.display()), &e)
            }
        })
    };
    let flags = if direct { libc::O_DIRECT } else { 0 };
    let (file, writable) = match open(true, flags) {
        Ok(f) => (f, true),
        Err(e) if matches!(e.errno, libc::EACCES | libc::EROFS | libc::EPERM) => {
            let f = open(false, flags)?;
            host::warn(&format!("{} is not writable ({e}); serving it read-only", path.display()));
            (f, false)
        }
        Err(e) => return Err(e),
    };
    let ft = file.metadata().map_err(|e| Error::from_io(path.display(), &e))?.file_type();
    if !(ft.is_file() || ft.is_block_device()) {
        return Err(Error::invalid(format!("{} is neither a regular file nor a block device", path.display())));
    }
    let direct = match direct {
        true => Some(direct::DirectIo::new(&file, open(writable, 0)?, path)),
        false => None,
    };
    Ok(OpenFile { file, path: path.to_path_buf(), writable, is_block_device: ft.is_block_device(), direct })
}

/// nbd-server's multifile layout: `BASE.0`, `BASE.1`, ... up to the first
/// missing index; `BASE.0` must exist.
fn multifile_paths(base: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    loop {
        let p = PathBuf::from(format!("{}.{}", base.display(), out.len()));
        if !p.exists() {
            break;
        }
        out.push(p);
    }
    if out.is_empty() {
        return Err(Error::invalid(format!("multifile: {}.0 does not exist", base.display())));
    }
    Ok(out)
}

impl Backend for FileBackend {
    type Handle = FileHandle;
    const NAME: &'static std::ffi::CStr = c"file";
    const VERSION: &'static std::ffi::CStr = c"0.1.0";
    const DESCRIPTION: &'static std::ffi::CStr = c"regular files or block devices, one or several laid end to end";
    const PARAMS: &'static [nbdhost_plugin_api::abi::ParamSpec] = &[
        param(
            c"path",
            ParamKind::Path,
            false,
            None,
            c"file or block device to serve (or, with multifile, the base name)",
        ),
        param(
            c"multifile",
            ParamKind::Bool,
            false,
            Some(c"false"),
            c"serve PATH.0, PATH.1, ... end to end (nbd-server layout)",
        ),
        param(c"paths", ParamKind::PathList, false, None, c"serve these files end to end, in order (instead of path)"),
        param(c"size", ParamKind::Size, false, None, c"create missing files (path or paths) with this size, sparse"),
        param(c"direct", ParamKind::Bool, false, Some(c"false"), c"open with O_DIRECT (bypass the page cache)"),
    ];

    fn create(params: &Params) -> Result<Self> {
        let path = params.path("path");
        let list = params.path_list("paths");
        let multifile = params.bool("multifile")?.unwrap_or(false);
        let create_size = params.size("size")?;
        let direct = params.bool("direct")?.unwrap_or(false);
        let paths = match (path, list.is_empty(), multifile) {
            (Some(_), false, _) => return Err(Error::invalid("set either `path` or `paths`, not both")),
            (None, true, _) => return Err(Error::invalid("set `path` (one file) or `paths` (several)")),
            (None, false, true) => {
                return Err(Error::invalid("`multifile` goes with `path` (the base name), not `paths`"))
            }
            (None, false, false) => list,
            (Some(base), true, true) => multifile_paths(&base)?,
            (Some(p), true, false) => vec![p],
        };
        if let Some(size) = create_size {
            if multifile {
                return Err(Error::invalid("`size` cannot create files in multifile mode (BASE.0, ... must exist)"));
            }
            for path in paths.iter().filter(|p| !p.exists()) {
                if host::checking_only() {
                    // `nbdhost --check`: say what would be created, create nothing.
                    host::check_can_create(path)?;
                    host::info(&format!("would create {} ({size} bytes, sparse)", path.display()));
                    continue;
                }
                let f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .map_err(|e| Error::from_io(format!("creating {}", path.display()), &e))?;
                f.set_len(size).map_err(|e| Error::from_io(format!("sizing {}", path.display()), &e))?;
                host::info(&format!("created {} ({size} bytes, sparse)", path.display()));
            }
        }
        let mut segs = Vec::with_capacity(paths.len());
        let mut start = 0u64;
        for p in &paths {
            if create_size.is_some() && !p.exists() {
                // Only when checking: otherwise it was created above.
                continue;
            }
            let file = open_one(p, direct)?;
            let size = file.size()?;
            let map = Segment::map(&file, size, direct);
            segs.push(Segment { file, start, size, map });
            start += size;
        }
        let writable = segs.iter().all(|s| s.file.writable);
        if !writable && segs.len() > 1 {
            host::warn("some files are not writable: serving all of them read-only");
        }
        Ok(FileBackend { files: Arc::new(Files { segs, size: start, writable }) })
    }

    fn open(&self, _ctx: &OpenContext) -> Result<FileHandle> {
        Ok(FileHandle { files: self.files.clone() })
    }
}

impl Connection for FileHandle {
    fn get_size(&self) -> Result<u64> {
        // A single block device or file is asked each time (it may be
        // resized); several files are fixed at start.
        match self.files.segs.as_slice() {
            [only] => only.file.size(),
            _ => Ok(self.files.size),
        }
    }
    fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        for (s, o, l, at) in self.files.split(offset, buf.len() as u64) {
            s.file.read_at(&mut buf[at..at + l as usize], o)?;
        }
        Ok(())
    }
    fn can_write(&self) -> Result<bool> {
        Ok(self.files.writable)
    }
    fn can_multi_conn(&self) -> Result<bool> {
        // One descriptor per file shared by all connections: a flush on
        // any of them covers every write.
        Ok(true)
    }
    fn can_fua(&self) -> Result<Support> {
        Ok(Support::Emulate)
    }
    fn can_extents(&self) -> Result<bool> {
        Ok(self.files.segs.iter().all(|s| !s.file.is_block_device))
    }
}

impl LendRead for FileHandle {
    fn pread_lend(
        &self,
        count: u64,
        offset: u64,
        _flags: Flags,
        sink: &mut dyn FnMut(&[&[u8]]) -> Result<()>,
    ) -> Result<()> {
        let pieces: Option<Vec<&[u8]>> = self.files.split(offset, count).map(|(s, o, l, _)| s.lendable(o, l)).collect();
        match pieces {
            Some(pieces) => sink(&pieces),
            // Not mapped (block device, O_DIRECT) or shrunk: decline, and
            // the host reads it with `pread` (outside its reply lock, and
            // reporting a shrunk file as the error it is).
            None => Err(Error::unsupported("this range is not mapped; read it with pread")),
        }
    }
}

impl LendWrite for FileHandle {
    fn pwrite_lend(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        sink: &mut dyn FnMut(&mut [&mut [u8]]) -> Result<()>,
    ) -> Result<()> {
        // A mapping can fault (a file that shrank, a hole with no room to
        // allocate): lent only to a host that fills it through the kernel.
        if !flags.kernel_fill() {
            return Err(Error::unsupported("the host would fill a file mapping with plain stores; use pwrite"));
        }
        let pieces: Option<Vec<&mut [u8]>> =
            self.files.split(offset, count).map(|(s, o, l, _)| s.lendable_for_write(o, l)).collect();
        match pieces {
            Some(mut pieces) => sink(&mut pieces),
            None => Err(Error::unsupported("this range is not mapped or not cached; write it with pwrite")),
        }
    }
}

impl Pwrite for FileHandle {
    fn pwrite(&self, buf: &[u8], offset: u64, _flags: Flags) -> Result<()> {
        for (s, o, l, at) in self.files.split(offset, buf.len() as u64) {
            s.file.write_at(&buf[at..at + l as usize], o)?;
        }
        Ok(())
    }
}

impl Flush for FileHandle {
    fn flush(&self, _flags: Flags) -> Result<()> {
        for s in &self.files.segs {
            s.file.file.sync_data().map_err(|e| Error::from_io(format!("{}: fdatasync", s.file.path.display()), &e))?;
        }
        Ok(())
    }
}

impl Trim for FileHandle {
    fn trim(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        for (s, o, l, _) in self.files.split(offset, count) {
            // Trim is advisory: a filesystem that cannot punch holes just
            // keeps the data, which is a correct (if unhelpful) answer.
            match s.file.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, o, l) {
                Ok(()) | Err(libc::EOPNOTSUPP) => {}
                Err(errno) => return Err(Error::new(errno, format!("{}: punch hole {o}+{l}", s.file.path.display()))),
            }
        }
        Ok(())
    }
}

impl Zero for FileHandle {
    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let attempts: &[i32] = if flags.may_trim() {
            &[
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            ]
        } else {
            &[libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE]
        };
        'pieces: for (s, o, l, _) in self.files.split(offset, count) {
            for &mode in attempts {
                match s.file.fallocate(mode, o, l) {
                    Ok(()) => continue 'pieces,
                    Err(libc::EOPNOTSUPP) | Err(libc::ENODEV) | Err(libc::EINVAL) => continue,
                    Err(errno) => return Err(Error::new(errno, format!("{}: zero {o}+{l}", s.file.path.display()))),
                }
            }
            // Not cheap here: the host writes zeros (or fails a fast-zero
            // request). Pieces already zeroed stay zeroed, which is fine.
            return Err(Error::unsupported("filesystem cannot zero ranges efficiently"));
        }
        Ok(())
    }
}

impl Extents for FileHandle {
    fn extents(&self, count: u64, offset: u64, flags: Flags, out: &mut ExtentList<'_>) -> Result<()> {
        for (s, o, l, _) in self.files.split(offset, count) {
            let end = o + l;
            let mut pos = o;
            while pos < end {
                let (len, f) = match s.file.seek(pos, libc::SEEK_DATA) {
                    None => {
                        // ENXIO: nothing but hole to the end of the file. Any
                        // other failure: we do not know, report data.
                        let errno = std::io::Error::last_os_error().raw_os_error();
                        let f = if errno == Some(libc::ENXIO) { EXTENT_HOLE | EXTENT_ZERO } else { 0 };
                        (end - pos, f)
                    }
                    Some(d) if d > pos => (d.min(end) - pos, EXTENT_HOLE | EXTENT_ZERO),
                    Some(_) => {
                        let hole = s.file.seek(pos, libc::SEEK_HOLE).unwrap_or(end);
                        (hole.min(end).max(pos + 1) - pos, 0)
                    }
                };
                out.add(s.start + pos, len, f)?;
                pos += len;
                if flags.req_one() {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

impl Cache for FileHandle {
    fn cache(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        for (s, o, l, _) in self.files.split(offset, count) {
            // SAFETY: advisory call on our own descriptor with integer arguments.
            unsafe { libc::posix_fadvise(s.file.file.as_raw_fd(), o as i64, l as i64, libc::POSIX_FADV_WILLNEED) };
        }
        Ok(())
    }
}

export_backend!(FileBackend);
