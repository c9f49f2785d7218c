//! `error` filter: make requests fail on purpose, to test how clients and
//! the layers above cope.
//!
//! A request fails, before it reaches the layer below, when all of these
//! hold:
//! - its operation is listed in `ops` (default: read, write, trim, zero,
//!   flush);
//! - `range` is unset, or the request touches one of its ranges (a flush,
//!   which has no range, then never matches);
//! - `file` is unset, or that file exists (create and remove it to switch
//!   failures on and off while the server runs);
//! - a random draw is below `rate` (default 1: every matching request; 0:
//!   none). `rate = 1` and `rate = 0` are fully deterministic.
//!
//! The client gets `error` (default EIO) with a message saying it was
//! injected.
//!
//! While reads may be failed, block status reports the bytes they may fail
//! on as data: a hole claims to read as zeros, which those bytes do not.
//! This also keeps the host from answering a large read over a hole with
//! hole chunks without reading it, which would bypass the injection.

use nbdhost_plugin_api::abi::ParamSpec;
use nbdhost_plugin_api::params::parse_size;
use nbdhost_plugin_api::{
    export_filter, host, param, Error, ExtentList, Filter, FilterConnection, Flags, Next, OpenContext, ParamKind,
    Params, Result,
};
use std::ffi::CStr;
use std::path::PathBuf;
use std::sync::Arc;

/// Operations errors can be injected into.
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

const ALL_OPS: [Op; 7] = [Op::Read, Op::Write, Op::Trim, Op::Zero, Op::Flush, Op::Extents, Op::Cache];

impl Op {
    fn bit(self) -> u32 {
        1 << (self as u32)
    }
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

/// Errors that can be injected. NBD carries only a few error values; the
/// others reach the client as the nearest of those (EROFS as EPERM...).
const ERRNOS: &[(&str, i32)] = &[
    ("EIO", libc::EIO),
    ("ENOSPC", libc::ENOSPC),
    ("EPERM", libc::EPERM),
    ("ENOMEM", libc::ENOMEM),
    ("EINVAL", libc::EINVAL),
    ("ENOTSUP", libc::ENOTSUP),
    ("EOPNOTSUPP", libc::EOPNOTSUPP),
    ("EOVERFLOW", libc::EOVERFLOW),
    ("ESHUTDOWN", libc::ESHUTDOWN),
    ("EROFS", libc::EROFS),
    ("EACCES", libc::EACCES),
    ("EDQUOT", libc::EDQUOT),
    ("EFBIG", libc::EFBIG),
];

/// `EIO` (any case) to its errno and canonical name.
pub fn parse_errno(s: &str) -> std::result::Result<(i32, &'static str), String> {
    let want = s.trim().to_ascii_uppercase();
    ERRNOS.iter().find(|(n, _)| *n == want).map(|&(n, e)| (e, n)).ok_or_else(|| {
        let names: Vec<&str> = ERRNOS.iter().map(|(n, _)| *n).collect();
        format!("unknown error `{s}`; use one of {}", names.join(", "))
    })
}

/// A probability: `0.25`, `25%`, `0`, `1`.
pub fn parse_rate(s: &str) -> std::result::Result<f64, String> {
    let t = s.trim();
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|v| v / 100.0),
        None => t.parse::<f64>(),
    }
    .map_err(|_| format!("`{s}` is not a probability (a number from 0 to 1, or a percentage)"))?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("{s} is not between 0 and 1 (0% and 100%)"));
    }
    Ok(v)
}

/// Comma-separated ranges, each `START-END` (END excluded) or
/// `START+LENGTH`, with size suffixes: `1M-2M`, `0+4K,10M-11M`.
pub fn parse_ranges(s: &str) -> std::result::Result<Vec<(u64, u64)>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim) {
        let size = |v: &str| parse_size(v).ok_or_else(|| format!("`{}` in `{part}` is not a size", v.trim()));
        let (start, end) = if let Some((a, b)) = part.split_once('-') {
            (size(a)?, size(b)?)
        } else if let Some((a, b)) = part.split_once('+') {
            let start = size(a)?;
            (start, start.checked_add(size(b)?).ok_or_else(|| format!("`{part}` overflows"))?)
        } else {
            return Err(format!("`{part}` is not a range: write START-END or START+LENGTH, e.g. 1M-2M"));
        };
        if start >= end {
            return Err(format!("range `{part}` is empty (it must end after it starts)"));
        }
        out.push((start, end));
    }
    Ok(out)
}

/// Comma- or space-separated operation names, or `all`.
pub fn parse_ops(s: &str) -> std::result::Result<u32, String> {
    let mut bits = 0;
    for word in s.split(|c: char| c == ',' || c.is_whitespace()).filter(|w| !w.is_empty()) {
        bits |= match word.to_ascii_lowercase().as_str() {
            "all" => ALL_OPS.iter().fold(0, |b, o| b | o.bit()),
            "read" | "pread" => Op::Read.bit(),
            "write" | "pwrite" => Op::Write.bit(),
            "trim" => Op::Trim.bit(),
            "zero" | "write_zeroes" | "write-zeroes" => Op::Zero.bit(),
            "flush" => Op::Flush.bit(),
            "extents" | "block_status" | "block-status" => Op::Extents.bit(),
            "cache" => Op::Cache.bit(),
            _ => {
                return Err(format!(
                    "unknown operation `{word}`; use read, write, trim, zero, flush, extents, cache or all"
                ))
            }
        };
    }
    if bits == 0 {
        return Err("no operation given".into());
    }
    Ok(bits)
}

/// What to inject, where and when.
#[derive(Debug)]
struct Config {
    errno: i32,
    errno_name: &'static str,
    rate: f64,
    ranges: Vec<(u64, u64)>,
    ops: u32,
    file: Option<PathBuf>,
}

impl Config {
    fn describe(&self) -> String {
        let ops: Vec<&str> = ALL_OPS.iter().filter(|o| self.ops & o.bit() != 0).map(|o| o.name()).collect();
        let mut s = format!("injecting {} into {} requests", self.errno_name, ops.join(","));
        if !self.ranges.is_empty() {
            let r: Vec<String> = self.ranges.iter().map(|(a, b)| format!("{a}-{b}")).collect();
            s += &format!(" touching bytes {}", r.join(","));
        }
        if self.rate < 1.0 {
            s += &format!(" with probability {}", self.rate);
        }
        if let Some(f) = &self.file {
            s += &format!(" while {} exists", f.display());
        }
        s
    }
}

/// The filter's per-export state.
pub struct ErrorFilter {
    cfg: Arc<Config>,
}

/// Per-connection handle.
pub struct ErrorHandle {
    next: Next,
    cfg: Arc<Config>,
}

fn bad(key: &str, msg: String) -> Error {
    Error::invalid(format!("parameter `{key}`: {msg}"))
}

impl Filter for ErrorFilter {
    type Handle = ErrorHandle;
    const NAME: &'static CStr = c"error";
    const VERSION: &'static CStr = c"0.1.0";
    const DESCRIPTION: &'static CStr = c"inject errors by operation, byte range, probability and toggle file";
    const PARAMS: &'static [ParamSpec] = &[
        param(c"error", ParamKind::String, false, Some(c"EIO"), c"errno to fail with: EIO, ENOSPC, EPERM, ..."),
        param(c"rate", ParamKind::String, false, Some(c"1"), c"probability per request: 0..1 or 0%..100%"),
        param(c"range", ParamKind::String, false, None, c"only requests touching START-END or START+LEN (list)"),
        param(
            c"ops",
            ParamKind::String,
            false,
            Some(c"read,write,trim,zero,flush"),
            c"operations to fail: read, write, trim, zero, flush, extents, cache, all",
        ),
        param(c"file", ParamKind::Path, false, None, c"inject only while this file exists"),
    ];

    fn create(p: &Params) -> Result<Self> {
        let (errno, errno_name) = parse_errno(p.get("error").unwrap_or("EIO")).map_err(|m| bad("error", m))?;
        let rate = parse_rate(p.get("rate").unwrap_or("1")).map_err(|m| bad("rate", m))?;
        let ranges = match p.get("range") {
            Some(r) => parse_ranges(r).map_err(|m| bad("range", m))?,
            None => Vec::new(),
        };
        let ops = parse_ops(p.get("ops").unwrap_or("read,write,trim,zero,flush")).map_err(|m| bad("ops", m))?;
        let cfg = Config { errno, errno_name, rate, ranges, ops, file: p.path("file") };
        host::info(&cfg.describe());
        Ok(ErrorFilter { cfg: Arc::new(cfg) })
    }

    fn open(&self, _ctx: &OpenContext, mut children: Vec<Next>) -> Result<ErrorHandle> {
        Ok(ErrorHandle { next: children.remove(0), cfg: self.cfg.clone() })
    }
}

impl ErrorHandle {
    /// Can a read fail right now (ignoring the byte range)?
    fn reads_may_fail(&self) -> bool {
        let c = &*self.cfg;
        c.ops & Op::Read.bit() != 0 && c.rate > 0.0 && c.file.as_ref().is_none_or(|f| f.symlink_metadata().is_ok())
    }

    /// Fail `op` on `[offset, offset+count)` (None: no range) if the
    /// settings say so.
    fn inject(&self, op: Op, range: Option<(u64, u64)>) -> Result<()> {
        let c = &*self.cfg;
        if c.ops & op.bit() == 0 {
            return Ok(());
        }
        if !c.ranges.is_empty() {
            let Some((off, len)) = range else { return Ok(()) };
            let end = off.saturating_add(len);
            if !c.ranges.iter().any(|&(s, e)| off < e && end > s) {
                return Ok(());
            }
        }
        if c.file.as_ref().is_some_and(|f| std::fs::symlink_metadata(f).is_err()) {
            return Ok(());
        }
        if c.rate < 1.0 && !(c.rate > 0.0 && fastrand::f64() < c.rate) {
            return Ok(());
        }
        let what = match range {
            Some((off, len)) => format!("{} offset={off} count={len}", op.name()),
            None => op.name().to_string(),
        };
        let msg = format!("injected {} by the error filter ({what})", c.errno_name);
        host::debug(&msg);
        Err(Error::new(c.errno, msg))
    }
}

impl FilterConnection for ErrorHandle {
    fn next(&self) -> &Next {
        &self.next
    }
    fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        self.inject(Op::Read, Some((offset, buf.len() as u64)))?;
        self.next.pread(buf, offset, flags)
    }
    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.inject(Op::Write, Some((offset, buf.len() as u64)))?;
        self.next.pwrite(buf, offset, flags)
    }
    fn flush(&self, flags: Flags) -> Result<()> {
        self.inject(Op::Flush, None)?;
        self.next.flush(flags)
    }
    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.inject(Op::Trim, Some((offset, count)))?;
        self.next.trim(count, offset, flags)
    }
    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.inject(Op::Zero, Some((offset, count)))?;
        self.next.zero(count, offset, flags)
    }
    fn extents(&self, count: u64, offset: u64, flags: Flags, out: &mut ExtentList<'_>) -> Result<()> {
        self.inject(Op::Extents, Some((offset, count)))?;
        if !self.reads_may_fail() {
            return self.next.extents(count, offset, flags, out);
        }
        for (o, l, f) in self.next.extents_vec(count, offset, flags)? {
            for (po, pl, pf) in mark_failing_as_data(&self.cfg.ranges, o, l, f) {
                out.add(po, pl, pf)?;
            }
        }
        Ok(())
    }
    fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.inject(Op::Cache, Some((offset, count)))?;
        self.next.cache(count, offset, flags)
    }
}

/// Split the extent `[o, o+l)` with `flags` at the edges of `ranges`
/// (all of the disk when empty); the pieces inside a range become data.
fn mark_failing_as_data(ranges: &[(u64, u64)], o: u64, l: u64, flags: u32) -> Vec<(u64, u64, u32)> {
    let end = o + l;
    if flags == 0 || ranges.is_empty() {
        return vec![(o, l, if ranges.is_empty() { 0 } else { flags })];
    }
    let mut cuts: Vec<u64> = vec![o, end];
    for &(s, e) in ranges {
        cuts.extend([s, e].into_iter().filter(|&c| c > o && c < end));
    }
    cuts.sort_unstable();
    cuts.dedup();
    let mut out: Vec<(u64, u64, u32)> = Vec::new();
    for w in cuts.windows(2) {
        let (a, b) = (w[0], w[1]);
        let f = if ranges.iter().any(|&(s, e)| a < e && b > s) { 0 } else { flags };
        match out.last_mut() {
            Some(last) if last.2 == f => last.1 += b - a,
            _ => out.push((a, b - a, f)),
        }
    }
    out
}

export_filter!(ErrorFilter);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errnos() {
        assert_eq!(parse_errno("eio").unwrap(), (libc::EIO, "EIO"));
        assert_eq!(parse_errno(" ENOSPC ").unwrap(), (libc::ENOSPC, "ENOSPC"));
        assert!(parse_errno("EFOO").unwrap_err().contains("EIO, ENOSPC"));
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("1").unwrap(), 1.0);
        assert_eq!(parse_rate("0").unwrap(), 0.0);
        assert_eq!(parse_rate("0.25").unwrap(), 0.25);
        assert_eq!(parse_rate("50%").unwrap(), 0.5);
        assert!(parse_rate("1.5").is_err());
        assert!(parse_rate("-0.1").is_err());
        assert!(parse_rate("NaN").is_err());
        assert!(parse_rate("often").is_err());
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_ranges("1M-2M").unwrap(), vec![(1 << 20, 2 << 20)]);
        assert_eq!(parse_ranges("0+4K, 10M-11M").unwrap(), vec![(0, 4096), (10 << 20, 11 << 20)]);
        assert!(parse_ranges("2M-1M").is_err());
        assert!(parse_ranges("1M-1M").is_err());
        assert!(parse_ranges("1M").is_err());
        assert!(parse_ranges("1X-2M").is_err());
    }

    #[test]
    fn holes_where_reads_fail_become_data() {
        let m = 1 << 20;
        assert_eq!(mark_failing_as_data(&[], 0, 4 * m, 3), vec![(0, 4 * m, 0)]);
        assert_eq!(mark_failing_as_data(&[(m, 2 * m)], 0, 4 * m, 0), vec![(0, 4 * m, 0)]);
        assert_eq!(mark_failing_as_data(&[(m, 2 * m)], 0, 4 * m, 3), vec![(0, m, 3), (m, m, 0), (2 * m, 2 * m, 3)]);
        assert_eq!(mark_failing_as_data(&[(m, 2 * m)], 3 * m, m, 3), vec![(3 * m, m, 3)]);
        assert_eq!(mark_failing_as_data(&[(0, 10), (20, 30)], 5, 20, 3), vec![(5, 5, 0), (10, 10, 3), (20, 5, 0)]);
    }

    #[test]
    fn ops() {
        assert_eq!(parse_ops("read").unwrap(), Op::Read.bit());
        assert_eq!(parse_ops("write, flush").unwrap(), Op::Write.bit() | Op::Flush.bit());
        assert_eq!(parse_ops("all").unwrap(), 127);
        assert!(parse_ops("reed").is_err());
        assert!(parse_ops(" , ").is_err());
    }
}
