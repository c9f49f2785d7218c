use crate::abi;
use crate::{Error, Result};
use std::ffi::CStr;
use std::path::PathBuf;

/// Type of a declared parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ParamKind {
    /// Any UTF-8 string.
    String = abi::PARAM_STRING,
    /// Signed integer.
    Int = abi::PARAM_INT,
    /// Byte size with optional K/M/G/T/P suffix.
    Size = abi::PARAM_SIZE,
    /// `true` / `false`.
    Bool = abi::PARAM_BOOL,
    /// Filesystem path (resolved relative to the snippet).
    Path = abi::PARAM_PATH,
    /// List of paths (resolved relative to the snippet).
    PathList = abi::PARAM_PATH_LIST,
}

/// Declare a parameter, for [`crate::Backend::PARAMS`].
pub const fn param(
    name: &'static CStr,
    kind: ParamKind,
    required: bool,
    default_value: Option<&'static CStr>,
    help: &'static CStr,
) -> abi::ParamSpec {
    abi::ParamSpec {
        name: name.as_ptr(),
        kind: kind as u32,
        required: required as u32,
        default_value: match default_value {
            Some(d) => d.as_ptr(),
            None => std::ptr::null(),
        },
        help: help.as_ptr(),
    }
}

/// Validated parameters handed to [`crate::Backend::create`]. The host has
/// already checked names, types and required keys against the plugin's
/// declarations and filled in defaults, so the typed getters only fail on a
/// mismatch between a plugin and its own declarations.
#[derive(Debug, Clone, Default)]
pub struct Params {
    pairs: Vec<(String, String)>,
}

impl Params {
    /// Build from key/value pairs (used by the entry shim and by tests).
    pub fn from_pairs<K: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (K, V)>) -> Self {
        Params { pairs: pairs.into_iter().map(|(k, v)| (k.into(), v.into())).collect() }
    }
    /// Raw value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
    /// Value of a required key.
    pub fn require(&self, key: &str) -> Result<&str> {
        self.get(key).ok_or_else(|| Error::invalid(format!("parameter `{key}` is required")))
    }
    /// A size (normalised by the host to a decimal byte count).
    pub fn size(&self, key: &str) -> Result<Option<u64>> {
        self.get(key)
            .map(|v| parse_size(v).ok_or_else(|| Error::invalid(format!("parameter `{key}`: bad size `{v}`"))))
            .transpose()
    }
    /// An integer.
    pub fn int(&self, key: &str) -> Result<Option<i64>> {
        self.get(key)
            .map(|v| v.parse().map_err(|_| Error::invalid(format!("parameter `{key}`: bad integer `{v}`"))))
            .transpose()
    }
    /// A boolean.
    pub fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| parse_bool(v).ok_or_else(|| Error::invalid(format!("parameter `{key}`: bad boolean `{v}`"))))
            .transpose()
    }
    /// A path.
    pub fn path(&self, key: &str) -> Option<PathBuf> {
        self.get(key).map(PathBuf::from)
    }
    /// A list of paths (empty if unset).
    pub fn path_list(&self, key: &str) -> Vec<PathBuf> {
        self.get(key).map(|v| v.split('\n').filter(|s| !s.is_empty()).map(PathBuf::from).collect()).unwrap_or_default()
    }
    /// All pairs in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// Parse a byte size: decimal digits with an optional K, M, G, T, P or E
/// suffix (binary multiples; `KiB`/`KB`/`k` spellings accepted).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        "e" | "eb" | "eib" => 60,
        _ => return None,
    };
    n.checked_mul(1u64.checked_shl(shift)?).filter(|v| shift == 0 || v >> shift == n)
}

/// Parse a boolean the way operators write them.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Some(true),
        "false" | "no" | "off" | "0" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0"), Some(0));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("4K"), Some(4096));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("2 MiB"), Some(2 << 20));
        assert_eq!(parse_size("16E"), None, "overflow must be refused");
        assert_eq!(parse_size("1X"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("-1"), None);
    }

    #[test]
    fn bools() {
        assert_eq!(parse_bool("TRUE"), Some(true));
        assert_eq!(parse_bool("off"), Some(false));
        assert_eq!(parse_bool("maybe"), None);
    }
}
