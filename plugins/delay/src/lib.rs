//! `delay` filter: sleep before passing requests to the layer below, to
//! imitate a slow disk or network.
//!
//! Each parameter delays one kind of request: `rdelay` reads, `wdelay`
//! writes, `zdelay` write-zeroes, `trimdelay` trims, `flushdelay` flushes.
//! A delay is a number of milliseconds, or a number with an `ms` or `s`
//! suffix (`250`, `250ms`, `0.25s`). The request then goes through
//! unchanged. Only the delayed request waits: other requests are not held
//! up (unless another layer of the pipeline serialises requests).

use nbdhost_plugin_api::{
    export_filter, param, Error, Filter, FilterConnection, Flags, Next, OpenContext, ParamKind, Params, Result,
};
use std::time::Duration;

/// Delays per kind of request (zero: none).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Delays {
    read: Duration,
    write: Duration,
    zero: Duration,
    trim: Duration,
    flush: Duration,
}

/// Per-connection handle.
pub struct DelayHandle {
    next: Next,
    delays: Delays,
}

impl Filter for Delays {
    type Handle = DelayHandle;
    const NAME: &'static std::ffi::CStr = c"delay";
    const VERSION: &'static std::ffi::CStr = c"0.1.0";
    const DESCRIPTION: &'static std::ffi::CStr = c"delay requests to imitate a slow disk";
    const PARAMS: &'static [nbdhost_plugin_api::abi::ParamSpec] = &[
        param(
            c"rdelay",
            ParamKind::String,
            false,
            None,
            c"delay before each read: milliseconds, or with ms or s suffix (250, 0.25s)",
        ),
        param(
            c"wdelay",
            ParamKind::String,
            false,
            None,
            c"delay before each write: milliseconds, or with ms or s suffix (250, 0.25s)",
        ),
        param(
            c"zdelay",
            ParamKind::String,
            false,
            None,
            c"delay before each write-zeroes: milliseconds, or with ms or s suffix (250, 0.25s)",
        ),
        param(
            c"trimdelay",
            ParamKind::String,
            false,
            None,
            c"delay before each trim: milliseconds, or with ms or s suffix (250, 0.25s)",
        ),
        param(
            c"flushdelay",
            ParamKind::String,
            false,
            None,
            c"delay before each flush: milliseconds, or with ms or s suffix (250, 0.25s)",
        ),
    ];

    fn create(p: &Params) -> Result<Self> {
        let get = |key: &str| -> Result<Duration> {
            match p.get(key) {
                None => Ok(Duration::ZERO),
                Some(v) => parse_delay(v).map_err(|m| Error::invalid(format!("parameter `{key}`: {m}"))),
            }
        };
        Ok(Delays {
            read: get("rdelay")?,
            write: get("wdelay")?,
            zero: get("zdelay")?,
            trim: get("trimdelay")?,
            flush: get("flushdelay")?,
        })
    }

    fn open(&self, _ctx: &OpenContext, mut children: Vec<Next>) -> Result<DelayHandle> {
        Ok(DelayHandle { next: children.remove(0), delays: *self })
    }
}

/// Parse `250`, `250ms` or `0.25s`.
fn parse_delay(v: &str) -> std::result::Result<Duration, String> {
    let bad = || format!("`{v}` is not a delay (milliseconds, or a number with ms or s suffix)");
    let t = v.trim();
    let (num, unit_secs) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else {
        (t, 1e-3)
    };
    let x: f64 = num.trim().parse().map_err(|_| bad())?;
    if !x.is_finite() || x < 0.0 {
        return Err(bad());
    }
    Duration::try_from_secs_f64(x * unit_secs).map_err(|_| format!("`{v}` is too long a delay"))
}

fn pause(d: Duration) {
    if !d.is_zero() {
        std::thread::sleep(d);
    }
}

impl FilterConnection for DelayHandle {
    fn next(&self) -> &Next {
        &self.next
    }
    fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        pause(self.delays.read);
        self.next.pread(buf, offset, flags)
    }
    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        pause(self.delays.write);
        self.next.pwrite(buf, offset, flags)
    }
    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        pause(self.delays.zero);
        self.next.zero(count, offset, flags)
    }
    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        pause(self.delays.trim);
        self.next.trim(count, offset, flags)
    }
    fn flush(&self, flags: Flags) -> Result<()> {
        pause(self.delays.flush);
        self.next.flush(flags)
    }
}

export_filter!(Delays);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_parse() {
        assert_eq!(parse_delay("250"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_delay(" 250ms "), Ok(Duration::from_millis(250)));
        assert_eq!(parse_delay("0.25s"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_delay("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_delay("0"), Ok(Duration::ZERO));
        for bad in ["", "fast", "-1", "1m", "nan", "inf", "1 h"] {
            assert!(parse_delay(bad).is_err(), "{bad}");
        }
        assert!(parse_delay("1e30s").unwrap_err().contains("too long"));
    }
}
