//! `file` backend: serves a regular file or a block device.
//!
//! * reads and writes with `pread`/`pwrite` on one descriptor shared by every
//!   connection (so the page cache is shared and multi-conn is safe);
//! * flush is `fdatasync`; FUA is emulated by the host with a flush;
//! * trim punches a hole, zero uses `fallocate` (ZERO_RANGE, or PUNCH_HOLE
//!   when the client allows holes), falling back to written zeros where the
//!   filesystem cannot;
//! * extents come from `SEEK_DATA`/`SEEK_HOLE`, so sparse files show holes.

use nbdhost_plugin_api::abi::{EXTENT_HOLE, EXTENT_ZERO};
use nbdhost_plugin_api::{
    export_backend, host, param, Backend, Cache, Connection, Error, ExtentList, Extents, Flags, Flush, OpenContext,
    ParamKind, Params, Pwrite, Result, Support, Trim, Zero,
};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

/// The opened file, shared by the export's connections.
pub struct OpenFile {
    file: File,
    path: PathBuf,
    writable: bool,
    is_block_device: bool,
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

/// Per-export state.
pub struct FileBackend {
    file: Arc<OpenFile>,
}

/// Per-connection handle.
pub struct FileHandle {
    file: Arc<OpenFile>,
}

impl Backend for FileBackend {
    type Handle = FileHandle;
    const NAME: &'static std::ffi::CStr = c"file";
    const VERSION: &'static std::ffi::CStr = c"0.1.0";
    const DESCRIPTION: &'static std::ffi::CStr = c"a regular file or block device";
    const PARAMS: &'static [nbdhost_plugin_api::abi::ParamSpec] = &[
        param(c"path", ParamKind::Path, true, None, c"file or block device to serve"),
        param(c"size", ParamKind::Size, false, None, c"create the file with this size if it does not exist (sparse)"),
        param(c"direct", ParamKind::Bool, false, Some(c"false"), c"open with O_DIRECT (bypass the page cache)"),
    ];

    fn create(params: &Params) -> Result<Self> {
        let path = params.path("path").ok_or_else(|| Error::invalid("parameter `path` is required"))?;
        let create_size = params.size("size")?;
        let direct = params.bool("direct")?.unwrap_or(false);
        if let Some(size) = create_size {
            if !path.exists() {
                let f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(|e| Error::from_io(format!("creating {}", path.display()), &e))?;
                f.set_len(size).map_err(|e| Error::from_io(format!("sizing {}", path.display()), &e))?;
                host::info(&format!("created {} ({size} bytes, sparse)", path.display()));
            }
        }
        let flags = if direct { libc::O_DIRECT } else { 0 };
        let (file, writable) = match OpenOptions::new().read(true).write(true).custom_flags(flags).open(&path) {
            Ok(f) => (f, true),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EROFS) | Some(libc::EPERM)) => {
                let f = OpenOptions::new()
                    .read(true)
                    .custom_flags(flags)
                    .open(&path)
                    .map_err(|e| Error::from_io(format!("opening {}", path.display()), &e))?;
                host::warn(&format!("{} is not writable ({e}); serving it read-only", path.display()));
                (f, false)
            }
            Err(e) => return Err(Error::from_io(format!("opening {}", path.display()), &e)),
        };
        let ft = file.metadata().map_err(|e| Error::from_io(path.display(), &e))?.file_type();
        if !(ft.is_file() || ft.is_block_device()) {
            return Err(Error::invalid(format!("{} is neither a regular file nor a block device", path.display())));
        }
        Ok(FileBackend { file: Arc::new(OpenFile { file, path, writable, is_block_device: ft.is_block_device() }) })
    }

    fn open(&self, _ctx: &OpenContext) -> Result<FileHandle> {
        Ok(FileHandle { file: self.file.clone() })
    }
}

impl Connection for FileHandle {
    fn get_size(&self) -> Result<u64> {
        self.file.size()
    }
    fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        self.file
            .file
            .read_exact_at(buf, offset)
            .map_err(|e| Error::from_io(format!("{}: read {}+{}", self.file.path.display(), offset, buf.len()), &e))
    }
    fn can_write(&self) -> Result<bool> {
        Ok(self.file.writable)
    }
    fn can_multi_conn(&self) -> Result<bool> {
        // One descriptor shared by all connections: a flush on any of them
        // covers every write.
        Ok(true)
    }
    fn can_fua(&self) -> Result<Support> {
        Ok(Support::Emulate)
    }
    fn can_extents(&self) -> Result<bool> {
        Ok(!self.file.is_block_device)
    }
}

impl Pwrite for FileHandle {
    fn pwrite(&self, buf: &[u8], offset: u64, _flags: Flags) -> Result<()> {
        self.file
            .file
            .write_all_at(buf, offset)
            .map_err(|e| Error::from_io(format!("{}: write {}+{}", self.file.path.display(), offset, buf.len()), &e))
    }
}

impl Flush for FileHandle {
    fn flush(&self, _flags: Flags) -> Result<()> {
        self.file.file.sync_data().map_err(|e| Error::from_io(format!("{}: fdatasync", self.file.path.display()), &e))
    }
}

impl Trim for FileHandle {
    fn trim(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        // Trim is advisory: a filesystem that cannot punch holes just keeps
        // the data, which is a correct (if unhelpful) answer.
        match self.file.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, count) {
            Ok(()) | Err(libc::EOPNOTSUPP) => Ok(()),
            Err(errno) => Err(Error::new(errno, format!("{}: punch hole {offset}+{count}", self.file.path.display()))),
        }
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
        for &mode in attempts {
            match self.file.fallocate(mode, offset, count) {
                Ok(()) => return Ok(()),
                Err(libc::EOPNOTSUPP) | Err(libc::ENODEV) | Err(libc::EINVAL) => continue,
                Err(errno) => {
                    return Err(Error::new(errno, format!("{}: zero {offset}+{count}", self.file.path.display())))
                }
            }
        }
        // Not cheap here: the host writes zeros (or fails a fast-zero request).
        Err(Error::unsupported("filesystem cannot zero ranges efficiently"))
    }
}

impl Extents for FileHandle {
    fn extents(&self, count: u64, offset: u64, flags: Flags, out: &mut ExtentList<'_>) -> Result<()> {
        let end = offset + count;
        let mut pos = offset;
        while pos < end {
            // Where does the data at or after `pos` start?
            let data = self.file.seek(pos, libc::SEEK_DATA);
            match data {
                None => {
                    // ENXIO: nothing but hole to the end of file. Any other
                    // failure: we simply do not know, report data.
                    let errno = std::io::Error::last_os_error().raw_os_error();
                    let f = if errno == Some(libc::ENXIO) { EXTENT_HOLE | EXTENT_ZERO } else { 0 };
                    return out.add(pos, end - pos, f);
                }
                Some(d) if d > pos => {
                    let hole_end = d.min(end);
                    out.add(pos, hole_end - pos, EXTENT_HOLE | EXTENT_ZERO)?;
                    pos = hole_end;
                }
                Some(_) => {
                    let hole = self.file.seek(pos, libc::SEEK_HOLE).unwrap_or(end);
                    let data_end = hole.min(end).max(pos + 1);
                    out.add(pos, data_end - pos, 0)?;
                    pos = data_end;
                }
            }
            if flags.req_one() {
                break;
            }
        }
        Ok(())
    }
}

impl Cache for FileHandle {
    fn cache(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        // SAFETY: advisory call on our own descriptor with integer arguments.
        unsafe {
            libc::posix_fadvise(self.file.file.as_raw_fd(), offset as i64, count as i64, libc::POSIX_FADV_WILLNEED)
        };
        Ok(())
    }
}

export_backend!(FileBackend);
