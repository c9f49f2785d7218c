//! `stats` filter: per-operation request counts, errors, bytes and latency
//! (average, percentiles, maximum) for an export, across all its
//! connections. A summary goes to the server log on SIGUSR1 and when the
//! export is destroyed (server exit), and, with `statsfile`, to that file
//! as well (rewritten atomically each time).
//!
//! ```text
//! [stats] export `disk` (SIGUSR1): 3 connections (1 open) in 12.345 s; 112 requests, 1 error, 4259840 bytes
//! [stats] disk: read: 100 ops, 0 errors, 409600 bytes (400.0 KiB); latency avg 0.012 ms, p50 0.011 ms, p90 0.016 ms, p99 0.064 ms, max 0.200 ms
//! [stats] disk: write: 12 ops, 1 error, 3850240 bytes (3.7 MiB); latency ...
//! [stats] disk: trim: 0 ops
//! ```
//!
//! Bytes count successful requests only (the range of trim, zero, cache
//! and extents requests; nothing for flush). Latency counts every request.
//! Percentiles come from a histogram with four buckets per power of two,
//! so they are upper bounds at most 25 % above the true value.
//!
//! What is counted are the calls reaching the filter: the host may split a
//! large client read into several reads, and asks for extents before a
//! read of 64 KiB or more (holes are then not read at all).

use nbdhost_plugin_api::abi::ParamSpec;
use nbdhost_plugin_api::{
    export_filter, host, param, Error, ExtentList, Filter, FilterConnection, FilterLendRead, Flags, Next, OpenContext,
    ParamKind, Params, Result,
};
use signal_hook::consts::SIGUSR1;
use signal_hook::iterator::Signals;
use std::ffi::CStr;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

/// The operations counted, in report order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// pread
    Read,
    /// pwrite
    Write,
    /// trim
    Trim,
    /// zero
    Zero,
    /// flush
    Flush,
    /// extents (block status)
    Extents,
    /// cache
    Cache,
}

const OPS: [Op; 7] = [Op::Read, Op::Write, Op::Trim, Op::Zero, Op::Flush, Op::Extents, Op::Cache];

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Trim => "trim",
            Op::Zero => "zero",
            Op::Flush => "flush",
            Op::Extents => "extents",
            Op::Cache => "cache",
        }
    }
}

/// Histogram buckets: values 0..3 exactly, then four per power of two.
const BUCKETS: usize = 4 * 63;

fn bucket(ns: u64) -> usize {
    if ns < 4 {
        return ns as usize;
    }
    let log2 = 63 - ns.leading_zeros() as usize;
    let sub = ((ns >> (log2 - 2)) & 3) as usize;
    4 * (log2 - 1) + sub
}

/// Exclusive upper bound of a bucket.
fn bucket_upper(i: usize) -> u64 {
    if i < 4 {
        return i as u64 + 1;
    }
    let log2 = i / 4 + 1;
    let sub = (i % 4) as u128;
    ((5 + sub) << (log2 - 2)).min(u64::MAX as u128) as u64
}

/// Counters of one operation, updated lock-free.
struct OpStats {
    count: AtomicU64,
    errors: AtomicU64,
    bytes: AtomicU64,
    total_ns: AtomicU64,
    max_ns: AtomicU64,
    hist: Vec<AtomicU64>,
}

impl OpStats {
    fn new() -> Self {
        OpStats {
            count: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            total_ns: AtomicU64::new(0),
            max_ns: AtomicU64::new(0),
            hist: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn record(&self, ns: u64, bytes: u64, ok: bool) {
        self.count.fetch_add(1, Ordering::Relaxed);
        if ok {
            self.bytes.fetch_add(bytes, Ordering::Relaxed);
        } else {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.total_ns.fetch_add(ns, Ordering::Relaxed);
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
        self.hist[bucket(ns)].fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            count: self.count.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            total_ns: self.total_ns.load(Ordering::Relaxed),
            max_ns: self.max_ns.load(Ordering::Relaxed),
            hist: self.hist.iter().map(|h| h.load(Ordering::Relaxed)).collect(),
        }
    }
}

/// A consistent-enough copy of one operation's counters.
struct Snapshot {
    count: u64,
    errors: u64,
    bytes: u64,
    total_ns: u64,
    max_ns: u64,
    hist: Vec<u64>,
}

impl Snapshot {
    /// Upper bound of the `q` quantile (0..1), never above the maximum.
    fn quantile(&self, q: f64) -> u64 {
        let total: u64 = self.hist.iter().sum();
        if total == 0 {
            return 0;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, n) in self.hist.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return (bucket_upper(i) - 1).min(self.max_ns);
            }
        }
        self.max_ns
    }
}

/// Statistics shared by every connection of the export.
struct Shared {
    ops: Vec<OpStats>,
    export: OnceLock<String>,
    conns_total: AtomicU64,
    conns_open: AtomicU64,
    created: Instant,
    statsfile: Option<PathBuf>,
}

fn ms(ns: u64) -> String {
    format!("{:.3} ms", ns as f64 / 1e6)
}

/// `4096 bytes (4.0 KiB)`; small counts without the parenthesis.
fn bytes_text(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} bytes");
    }
    let mut v = bytes as f64;
    let mut unit = UNITS[0];
    for u in UNITS {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{bytes} bytes ({v:.1} {unit})")
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

impl Shared {
    fn op(&self, op: Op) -> &OpStats {
        &self.ops[op as usize]
    }

    /// The summary, one entry per line.
    fn summary(&self, reason: &str) -> Vec<String> {
        let name = self.export.get().map(String::as_str).unwrap_or("?");
        let snaps: Vec<Snapshot> = OPS.iter().map(|&o| self.op(o).snapshot()).collect();
        let requests: u64 = snaps.iter().map(|s| s.count).sum();
        let errors: u64 = snaps.iter().map(|s| s.errors).sum();
        let bytes: u64 = snaps.iter().map(|s| s.bytes).sum();
        let mut lines = vec![format!(
            "export `{name}` ({reason}): {} ({} open) in {:.3} s; {}, {}, {bytes} bytes",
            plural(self.conns_total.load(Ordering::Relaxed), "connection", "connections"),
            self.conns_open.load(Ordering::Relaxed),
            self.created.elapsed().as_secs_f64(),
            plural(requests, "request", "requests"),
            plural(errors, "error", "errors"),
        )];
        for (op, s) in OPS.iter().zip(&snaps) {
            let mut l = format!("{name}: {}: {}", op.name(), plural(s.count, "op", "ops"));
            if let Some(avg) = s.total_ns.checked_div(s.count) {
                let _ = write!(
                    l,
                    ", {}, {}; latency avg {}, p50 {}, p90 {}, p99 {}, max {}",
                    plural(s.errors, "error", "errors"),
                    bytes_text(s.bytes),
                    ms(avg),
                    ms(s.quantile(0.50)),
                    ms(s.quantile(0.90)),
                    ms(s.quantile(0.99)),
                    ms(s.max_ns),
                );
            }
            lines.push(l);
        }
        lines
    }

    /// Log the summary and write the stats file.
    fn report(&self, reason: &str) {
        let lines = self.summary(reason);
        for l in &lines {
            host::info(l);
        }
        if let Some(path) = &self.statsfile {
            if let Err(e) = write_atomically(path, &lines) {
                host::warn(&format!("cannot write stats file {}: {e}", path.display()));
            }
        }
    }
}

/// Replace `path` with `lines` so readers never see a half-written file.
fn write_atomically(path: &Path, lines: &[String]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// The filter's per-export state: the statistics and the SIGUSR1 listener.
pub struct Stats {
    shared: Arc<Shared>,
    signals: Option<(signal_hook::iterator::Handle, JoinHandle<()>)>,
}

impl Drop for Stats {
    fn drop(&mut self) {
        if let Some((handle, thread)) = self.signals.take() {
            handle.close();
            let _ = thread.join();
        }
        // A `--check` run creates and destroys the export without serving
        // anything; a summary of nothing is only noise there.
        if self.shared.conns_total.load(Ordering::Relaxed) > 0 {
            self.shared.report("exit");
        }
    }
}

/// Per-connection handle.
pub struct StatsHandle {
    next: Next,
    shared: Arc<Shared>,
}

impl Drop for StatsHandle {
    fn drop(&mut self) {
        self.shared.conns_open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Filter for Stats {
    type Handle = StatsHandle;
    const NAME: &'static CStr = c"stats";
    const VERSION: &'static CStr = c"0.1.0";
    const DESCRIPTION: &'static CStr = c"count requests, bytes and latency per operation; summary on SIGUSR1 and exit";
    const PARAMS: &'static [ParamSpec] = &[param(
        c"statsfile",
        ParamKind::Path,
        false,
        None,
        c"also write the summary to this file (replaced on each summary)",
    )];

    fn create(p: &Params) -> Result<Self> {
        let statsfile = p.path("statsfile");
        if let Some(f) = &statsfile {
            let dir = f.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            if !dir.is_dir() {
                return Err(Error::invalid(format!(
                    "parameter `statsfile`: directory {} does not exist",
                    dir.display()
                )));
            }
            if f.is_dir() {
                return Err(Error::invalid(format!("parameter `statsfile`: {} is a directory", f.display())));
            }
        }
        let shared = Arc::new(Shared {
            ops: OPS.iter().map(|_| OpStats::new()).collect(),
            export: OnceLock::new(),
            conns_total: AtomicU64::new(0),
            conns_open: AtomicU64::new(0),
            created: Instant::now(),
            statsfile,
        });
        let mut signals = Signals::new([SIGUSR1]).map_err(|e| Error::from_io("cannot listen for SIGUSR1", &e))?;
        let handle = signals.handle();
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("stats-sigusr1".into())
            .spawn(move || {
                for _ in signals.forever() {
                    s.report("SIGUSR1");
                }
            })
            .map_err(|e| Error::from_io("cannot start the SIGUSR1 thread", &e))?;
        Ok(Stats { shared, signals: Some((handle, thread)) })
    }

    fn open(&self, ctx: &OpenContext, mut children: Vec<Next>) -> Result<StatsHandle> {
        self.shared.export.get_or_init(|| ctx.export_name.clone());
        self.shared.conns_total.fetch_add(1, Ordering::Relaxed);
        self.shared.conns_open.fetch_add(1, Ordering::Relaxed);
        Ok(StatsHandle { next: children.remove(0), shared: self.shared.clone() })
    }
}

impl StatsHandle {
    fn timed<T>(&self, op: Op, bytes: u64, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let start = Instant::now();
        let r = f();
        self.record(op, start, bytes, r.is_ok());
        r
    }

    fn record(&self, op: Op, start: Instant, bytes: u64, ok: bool) {
        let ns = start.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        self.shared.op(op).record(ns, bytes, ok);
    }
}

impl FilterConnection for StatsHandle {
    fn next(&self) -> &Next {
        &self.next
    }
    fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        let n = buf.len() as u64;
        self.timed(Op::Read, n, || self.next.pread(buf, offset, flags))
    }
    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.timed(Op::Write, buf.len() as u64, || self.next.pwrite(buf, offset, flags))
    }
    fn flush(&self, flags: Flags) -> Result<()> {
        self.timed(Op::Flush, 0, || self.next.flush(flags))
    }
    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.timed(Op::Trim, count, || self.next.trim(count, offset, flags))
    }
    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.timed(Op::Zero, count, || self.next.zero(count, offset, flags))
    }
    fn extents(&self, count: u64, offset: u64, flags: Flags, out: &mut ExtentList<'_>) -> Result<()> {
        self.timed(Op::Extents, count, || self.next.extents(count, offset, flags, out))
    }
    fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.timed(Op::Cache, count, || self.next.cache(count, offset, flags))
    }
}

/// Reads are lent from the layer below and counted as any read (their
/// time includes sending the data). A read the layer below declines is
/// not counted here; the host reads it again with `pread`, which counts it.
impl FilterLendRead for StatsHandle {
    fn pread_lend(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        sink: &mut dyn FnMut(&[&[u8]]) -> Result<()>,
    ) -> Result<()> {
        let start = Instant::now();
        let Some(r) = self.next.try_pread_lend(count, offset, flags, sink) else {
            return Err(Error::unsupported("stats: the layer below declined this read"));
        };
        self.record(Op::Read, start, count, r.is_ok());
        r
    }
}

export_filter!(Stats);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_contain_their_values() {
        let mut last = 0;
        for ns in (0..100_000u64).chain([u64::MAX / 3, u64::MAX - 1, u64::MAX]) {
            let b = bucket(ns);
            assert!(b < BUCKETS, "{ns}");
            assert!(b >= last || ns > 100_000, "{ns}");
            last = b;
            assert!(ns < bucket_upper(b) || bucket_upper(b) == u64::MAX, "{ns} in bucket {b}");
            if b > 0 {
                assert!(ns >= bucket_upper(b - 1), "{ns} in bucket {b}");
            }
        }
    }

    #[test]
    fn quantiles_are_close_upper_bounds() {
        let s = OpStats::new();
        for i in 1..=100u64 {
            s.record(i * 1000, 1, true);
        }
        let snap = s.snapshot();
        let p50 = snap.quantile(0.5);
        assert!((50_000..=62_500).contains(&p50), "{p50}");
        assert_eq!(snap.quantile(1.0), 100_000);
        assert_eq!(snap.count, 100);
        assert_eq!(snap.bytes, 100);
    }

    #[test]
    fn byte_counts_read_well() {
        assert_eq!(bytes_text(8), "8 bytes");
        assert_eq!(bytes_text(4096), "4096 bytes (4.0 KiB)");
        assert_eq!(bytes_text(3 << 30), "3221225472 bytes (3.0 GiB)");
    }

    #[test]
    fn summary_has_a_line_per_operation() {
        let shared = Shared {
            ops: OPS.iter().map(|_| OpStats::new()).collect(),
            export: OnceLock::new(),
            conns_total: AtomicU64::new(1),
            conns_open: AtomicU64::new(0),
            created: Instant::now(),
            statsfile: None,
        };
        shared.export.set("disk".into()).unwrap();
        shared.op(Op::Write).record(2_000_000, 4096, true);
        shared.op(Op::Write).record(1_000_000, 4096, false);
        let lines = shared.summary("test");
        assert_eq!(lines.len(), 8);
        assert!(lines[0].starts_with("export `disk` (test): 1 connection (0 open)"), "{}", lines[0]);
        assert!(lines[0].ends_with("2 requests, 1 error, 4096 bytes"), "{}", lines[0]);
        assert!(lines[2].starts_with("disk: write: 2 ops, 1 error, 4096 bytes (4.0 KiB); latency avg 1.500 ms"));
        assert!(lines[2].ends_with("max 2.000 ms"), "{}", lines[2]);
        assert_eq!(lines[3], "disk: trim: 0 ops");
    }
}
