//! Typed request errors and their one mapping to NBD error codes.

use crate::loader::PluginError;
use crate::protocol::consts::*;
use std::fmt;

/// The NBD error values a reply may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NbdErrno {
    /// Write-type command on a read-only export.
    Perm,
    /// I/O failure (also: a plugin that panicked).
    Io,
    /// Out of memory (avoided where possible).
    NoMem,
    /// Bad request: range, alignment, flags, unknown command.
    Inval,
    /// Write past the end, or out of space.
    NoSpc,
    /// DF read too large, or effect length over the maximum.
    Overflow,
    /// FAST_ZERO that cannot be fast.
    NotSup,
    /// Server is shutting down.
    Shutdown,
}

impl NbdErrno {
    /// Value on the wire.
    pub fn code(self) -> u32 {
        match self {
            NbdErrno::Perm => NBD_EPERM,
            NbdErrno::Io => NBD_EIO,
            NbdErrno::NoMem => NBD_ENOMEM,
            NbdErrno::Inval => NBD_EINVAL,
            NbdErrno::NoSpc => NBD_ENOSPC,
            NbdErrno::Overflow => NBD_EOVERFLOW,
            NbdErrno::NotSup => NBD_ENOTSUP,
            NbdErrno::Shutdown => NBD_ESHUTDOWN,
        }
    }

    /// The POSIX errno a filter sees for this error from the layer below.
    pub fn to_posix(self) -> i32 {
        match self {
            NbdErrno::Perm => libc::EPERM,
            NbdErrno::Io => libc::EIO,
            NbdErrno::NoMem => libc::ENOMEM,
            NbdErrno::Inval => libc::EINVAL,
            NbdErrno::NoSpc => libc::ENOSPC,
            NbdErrno::Overflow => libc::EOVERFLOW,
            NbdErrno::NotSup => libc::ENOTSUP,
            NbdErrno::Shutdown => libc::ESHUTDOWN,
        }
    }

    /// Map a POSIX errno from a plugin. Unknown values become EIO: something
    /// failed, and EINVAL would blame the client.
    pub fn from_posix(errno: i32) -> Self {
        match errno {
            libc::EPERM | libc::EROFS | libc::EACCES => NbdErrno::Perm,
            libc::ENOMEM => NbdErrno::NoMem,
            libc::EINVAL => NbdErrno::Inval,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => NbdErrno::NoSpc,
            libc::EOVERFLOW => NbdErrno::Overflow,
            libc::ENOTSUP => NbdErrno::NotSup,
            libc::ESHUTDOWN => NbdErrno::Shutdown,
            _ => NbdErrno::Io,
        }
    }
}

/// A failed request: what the client is told and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    /// Error value for the reply.
    pub errno: NbdErrno,
    /// Message for the structured error chunk and the log.
    pub message: String,
}

impl OpError {
    /// Construct.
    pub fn new(errno: NbdErrno, message: impl Into<String>) -> Self {
        OpError { errno, message: message.into() }
    }
    /// EINVAL.
    pub fn inval(message: impl Into<String>) -> Self {
        Self::new(NbdErrno::Inval, message)
    }
}

impl fmt::Display for OpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.errno, self.message)
    }
}

impl From<PluginError> for OpError {
    fn from(e: PluginError) -> Self {
        OpError { errno: NbdErrno::from_posix(e.errno), message: e.message }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn posix_mapping() {
        assert_eq!(NbdErrno::from_posix(libc::EDQUOT), NbdErrno::NoSpc);
        assert_eq!(NbdErrno::from_posix(libc::EFBIG), NbdErrno::NoSpc);
        assert_eq!(NbdErrno::from_posix(libc::EROFS), NbdErrno::Perm);
        assert_eq!(NbdErrno::from_posix(libc::ENOENT), NbdErrno::Io);
        assert_eq!(NbdErrno::Shutdown.code(), 108);
        assert_eq!(NbdErrno::NotSup.code(), 95);
        for e in [
            NbdErrno::Perm,
            NbdErrno::Io,
            NbdErrno::NoMem,
            NbdErrno::Inval,
            NbdErrno::NoSpc,
            NbdErrno::Overflow,
            NbdErrno::NotSup,
            NbdErrno::Shutdown,
        ] {
            assert_eq!(NbdErrno::from_posix(e.to_posix()), e, "{e:?} survives a trip through a filter");
        }
    }
}
