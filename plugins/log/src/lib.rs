//! `log` filter: one line per request to a log file, plus a line when a
//! connection opens and when it closes.
//!
//! ```text
//! 2026-11-24T10:00:00.123Z conn=1 peer=127.0.0.1:40000 export=disk Connect readonly=false size=16777216
//! 2026-11-24T10:00:00.124Z conn=1 peer=127.0.0.1:40000 export=disk Read offset=0 count=4096 -> ok (0.021 ms)
//! 2026-11-24T10:00:00.125Z conn=1 peer=127.0.0.1:40000 export=disk Write offset=1048576 count=512 fua=1 -> EIO: ... (0.009 ms)
//! 2026-11-24T10:00:00.126Z conn=1 peer=127.0.0.1:40000 export=disk Disconnect requests=2 errors=1 duration=0.003s
//! ```
//!
//! The timestamp (UTC) is when the request started; the line is written
//! when it finished, with its result and latency. Each line is one
//! `write(2)` on a file opened in append mode, under a lock, so lines of
//! parallel requests never interleave (not even with another export
//! logging to the same file). Connection ids count up per export from 1.
//!
//! The filter logs the calls that reach it, which are the client's
//! requests as the host passes them down: the host may split a large read
//! into several `Read` lines, and for a read of 64 KiB or more it first
//! asks for `Extents` and does not read the holes at all.

use nbdhost_plugin_api::abi::{ParamSpec, EXTENT_HOLE, EXTENT_ZERO};
use nbdhost_plugin_api::{
    export_filter, host, param, Error, ExtentList, Filter, FilterConnection, FilterLendRead, Flags, Next, OpenContext,
    ParamKind, Params, Result,
};
use std::ffi::CStr;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Most extents written out on one line; the rest are counted.
const MAX_EXTENTS_SHOWN: usize = 32;

/// The filter's per-export state.
pub struct Log {
    shared: Arc<Shared>,
}

struct Shared {
    path: PathBuf,
    file: Mutex<File>,
    next_conn: AtomicU64,
    warned: AtomicBool,
}

impl Shared {
    fn write_line(&self, line: &str) {
        let r = self.file.lock().unwrap_or_else(|e| e.into_inner()).write_all(line.as_bytes());
        if let Err(e) = r {
            // Requests keep being served; say so once rather than per request.
            if !self.warned.swap(true, Ordering::Relaxed) {
                host::warn(&format!(
                    "cannot write to log file {}: {e} (further failures are not reported)",
                    self.path.display()
                ));
            }
        }
    }
}

/// Per-connection handle.
pub struct LogHandle {
    next: Next,
    shared: Arc<Shared>,
    /// `conn=N peer=... export=...`
    tag: String,
    opened: Instant,
    requests: AtomicU64,
    errors: AtomicU64,
}

impl Filter for Log {
    type Handle = LogHandle;
    const NAME: &'static CStr = c"log";
    const VERSION: &'static CStr = c"0.1.0";
    const DESCRIPTION: &'static CStr = c"log every request, its result and latency to a file";
    const PARAMS: &'static [ParamSpec] =
        &[param(c"logfile", ParamKind::Path, true, None, c"file to append log lines to (created if missing)")];

    fn create(p: &Params) -> Result<Self> {
        let path = p.path("logfile").ok_or_else(|| Error::invalid("parameter `logfile` is required"))?;
        let checking = host::checking_only();
        let target = if checking && !path.exists() {
            // `nbdhost --check` creates nothing: the directory must be
            // there, and /dev/null stands in for the file (the instance is
            // destroyed unused).
            host::check_can_create(&path).map_err(|e| Error::invalid(format!("parameter `logfile`: {}", e.message)))?;
            PathBuf::from("/dev/null")
        } else {
            path.clone()
        };
        let file = OpenOptions::new()
            .append(true)
            .create(!checking)
            .open(&target)
            .map_err(|e| Error::from_io(format!("parameter `logfile`: cannot open {}", path.display()), &e))?;
        Ok(Log {
            shared: Arc::new(Shared {
                path,
                file: Mutex::new(file),
                next_conn: AtomicU64::new(1),
                warned: AtomicBool::new(false),
            }),
        })
    }

    fn open(&self, ctx: &OpenContext, mut children: Vec<Next>) -> Result<LogHandle> {
        let next = children.remove(0);
        let conn = self.shared.next_conn.fetch_add(1, Ordering::Relaxed);
        let tag = format!("conn={conn} peer={} export={}", quote(&ctx.peer), quote(&ctx.export_name));
        let size = next.get_size()?;
        let h = LogHandle {
            next,
            shared: self.shared.clone(),
            tag,
            opened: Instant::now(),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        };
        h.event(&format!("Connect readonly={} size={size}", ctx.readonly));
        Ok(h)
    }
}

impl LogHandle {
    /// A line that is not a request.
    fn event(&self, what: &str) {
        self.shared.write_line(&format!("{} {} {what}\n", timestamp(SystemTime::now()), self.tag));
    }

    /// Run a request, then log it with its result. `ok` adds detail to a
    /// successful result.
    fn request<T>(&self, what: String, f: impl FnOnce() -> Result<T>, ok: impl FnOnce(&T) -> String) -> Result<T> {
        let (wall, start) = (SystemTime::now(), Instant::now());
        let r = f();
        self.finished(what, wall, start, &r, ok);
        r
    }

    /// Log a request that started at `wall` / `start` and gave `r`.
    fn finished<T>(
        &self,
        what: String,
        wall: SystemTime,
        start: Instant,
        r: &Result<T>,
        ok: impl FnOnce(&T) -> String,
    ) {
        let ms = start.elapsed().as_secs_f64() * 1e3;
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut line = format!("{} {} {what} -> ", timestamp(wall), self.tag);
        match r {
            Ok(v) => {
                line.push_str("ok");
                line.push_str(&ok(v));
            }
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                let _ = write!(line, "{}: {}", errno_name(e.errno), one_line(&e.message));
            }
        }
        let _ = writeln!(line, " ({ms:.3} ms)");
        self.shared.write_line(&line);
    }

    fn plain(&self, what: String, f: impl FnOnce() -> Result<()>) -> Result<()> {
        self.request(what, f, |_| String::new())
    }
}

impl Drop for LogHandle {
    fn drop(&mut self) {
        self.event(&format!(
            "Disconnect requests={} errors={} duration={:.3}s",
            self.requests.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
            self.opened.elapsed().as_secs_f64()
        ));
    }
}

impl FilterConnection for LogHandle {
    fn next(&self) -> &Next {
        &self.next
    }
    fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        let what = format!("Read offset={offset} count={}", buf.len());
        self.plain(what, || self.next.pread(buf, offset, flags))
    }
    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        let what = format!("Write offset={offset} count={} fua={}", buf.len(), flags.fua() as u8);
        self.plain(what, || self.next.pwrite(buf, offset, flags))
    }
    fn flush(&self, flags: Flags) -> Result<()> {
        self.plain("Flush".into(), || self.next.flush(flags))
    }
    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let what = format!("Trim offset={offset} count={count} fua={}", flags.fua() as u8);
        self.plain(what, || self.next.trim(count, offset, flags))
    }
    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let what = format!(
            "Zero offset={offset} count={count} fua={} may_trim={} fast={}",
            flags.fua() as u8,
            flags.may_trim() as u8,
            flags.fast_zero() as u8
        );
        self.plain(what, || self.next.zero(count, offset, flags))
    }
    fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.plain(format!("Cache offset={offset} count={count}"), || self.next.cache(count, offset, flags))
    }
    fn extents(&self, count: u64, offset: u64, flags: Flags, out: &mut ExtentList<'_>) -> Result<()> {
        let what = format!("Extents offset={offset} count={count} req_one={}", flags.req_one() as u8);
        let list = self.request(what, || self.next.extents_vec(count, offset, flags), |v| describe_extents(v))?;
        for (o, l, f) in list {
            out.add(o, l, f)?;
        }
        Ok(())
    }
}

fn describe_extents(v: &[(u64, u64, u32)]) -> String {
    let mut s = String::from(" extents=[");
    for (i, (o, l, f)) in v.iter().take(MAX_EXTENTS_SHOWN).enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        let kind = match (f & EXTENT_HOLE != 0, f & EXTENT_ZERO != 0) {
            (true, true) => "hole,zero",
            (true, false) => "hole",
            (false, true) => "zero",
            (false, false) => "data",
        };
        let _ = write!(s, "{o}+{l} {kind}");
    }
    if v.len() > MAX_EXTENTS_SHOWN {
        let _ = write!(s, ", ... {} more", v.len() - MAX_EXTENTS_SHOWN);
    }
    s.push(']');
    s
}

/// A field value: as is when it is a plain word, else double-quoted with
/// escapes, so every line splits on spaces.
fn quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_graphic() && c != '"' && c != '\\') {
        s.to_string()
    } else {
        format!("{s:?}")
    }
}

/// Keep a message on one line.
fn one_line(s: &str) -> String {
    s.replace('\r', "\\r").replace('\n', "\\n")
}

/// `2026-11-24T00:00:00.123Z`
pub fn timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (y, m, day) = civil_from_days((secs / 86400) as i64);
    let rem = secs % 86400;
    format!("{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z", rem / 3600, rem / 60 % 60, rem % 60, d.subsec_millis())
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Symbolic name of an errno.
pub fn errno_name(e: i32) -> String {
    let name = match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::ERANGE => "ERANGE",
        libc::ENOSYS => "ENOSYS",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::ENOTSUP => "ENOTSUP",
        libc::ESHUTDOWN => "ESHUTDOWN",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EDQUOT => "EDQUOT",
        _ => return format!("errno{e}"),
    };
    name.to_string()
}

/// Reads are lent from the layer below and logged as any read: the line
/// is the same, its latency includes sending the data. A read the layer
/// below declines is not logged here; the host reads it again with
/// `pread`, which logs it once.
impl FilterLendRead for LogHandle {
    fn pread_lend(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        sink: &mut dyn FnMut(&[&[u8]]) -> Result<()>,
    ) -> Result<()> {
        let (wall, start) = (SystemTime::now(), Instant::now());
        let Some(r) = self.next.try_pread_lend(count, offset, flags, sink) else {
            return Err(Error::unsupported("log: the layer below declined this read"));
        };
        self.finished(format!("Read offset={offset} count={count}"), wall, start, &r, |_| String::new());
        r
    }
}

export_filter!(Log);

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 (leap day) 12:34:56.789
        let t = UNIX_EPOCH + Duration::from_millis(951_827_696_789);
        assert_eq!(timestamp(t), "2000-02-29T12:34:56.789Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_478_400); // 2026-11-24
        assert_eq!(timestamp(t), "2026-11-24T00:00:00.000Z");
    }

    #[test]
    fn fields_never_contain_spaces() {
        assert_eq!(quote("disk"), "disk");
        assert_eq!(quote(""), "\"\"");
        assert_eq!(quote("my disk"), "\"my disk\"");
        assert_eq!(one_line("a\nb"), "a\\nb");
    }

    #[test]
    fn extents_are_described_compactly() {
        let v = vec![(0, 4096, EXTENT_HOLE | EXTENT_ZERO), (4096, 512, 0)];
        assert_eq!(describe_extents(&v), " extents=[0+4096 hole,zero, 4096+512 data]");
    }
}
