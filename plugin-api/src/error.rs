use std::fmt;

/// An error returned by a plugin operation: a POSIX `errno` value (which the
/// host maps to an NBD error code) and a message that reaches the client in a
/// structured error chunk and the server log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// POSIX errno, e.g. `libc::EIO`.
    pub errno: i32,
    /// Human-readable reason.
    pub message: String,
    /// The error came from the layer below a filter and the host already
    /// holds its message: returning it unchanged keeps that message.
    pub(crate) from_below: bool,
}

/// Result type of plugin operations.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An error with an explicit errno.
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        let errno = if errno > 0 { errno } else { libc::EIO };
        Error { errno, message: message.into(), from_below: false }
    }
    /// `EIO`: an I/O failure.
    pub fn io(message: impl Into<String>) -> Self {
        Self::new(libc::EIO, message)
    }
    /// `EINVAL`: a bad argument or parameter.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(libc::EINVAL, message)
    }
    /// `ENOSPC`: out of space.
    pub fn no_space(message: impl Into<String>) -> Self {
        Self::new(libc::ENOSPC, message)
    }
    /// `ENOTSUP`: the operation is not supported here; for `zero` this makes
    /// the host fall back to writing zeros.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(libc::ENOTSUP, message)
    }
    /// An error reported by the layer below a filter (see [`crate::Next`]).
    pub(crate) fn below(errno: i32) -> Self {
        let message = crate::host::last_error()
            .unwrap_or_else(|| format!("the layer below failed: {}", std::io::Error::from_raw_os_error(errno)));
        let mut e = Self::new(errno, message);
        e.from_below = true;
        e
    }
    /// Wrap an `std::io::Error`, keeping its errno, with context.
    pub fn from_io(context: impl fmt::Display, e: &std::io::Error) -> Self {
        Self::new(e.raw_os_error().unwrap_or(libc::EIO), format!("{context}: {e}"))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (errno {})", self.message, self.errno)
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Self::new(e.raw_os_error().unwrap_or(libc::EIO), e.to_string())
    }
}
