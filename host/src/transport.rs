//! Transports: plain TCP and Unix stream sockets behind one type, and the
//! option phase's channel, which STARTTLS turns into a TLS session.

use crate::tls::{TlsServer, TlsStream};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// An accepted client connection.
#[derive(Debug)]
pub enum Stream {
    /// TCP (TCP_NODELAY set on accept).
    Tcp(TcpStream),
    /// Unix domain stream socket.
    Unix(UnixStream),
}

impl Stream {
    /// A second handle to the same socket (for a separate reader/writer or
    /// for shutting it down from another thread).
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }
    /// Limit how long a read may block (`None`: forever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }
    /// Whether a read would return at once (bytes or end of stream are
    /// waiting), found without blocking and without consuming anything. A
    /// zero-timeout poll: unlike a peeking recv it does not take the socket
    /// lock, so the peer's sends are not slowed by our looking.
    pub fn readable_now(&self) -> bool {
        self.readable_within(Duration::ZERO)
    }

    /// Wait up to `timeout` for [`Stream::readable_now`] to become true.
    pub fn readable_within(&self, timeout: Duration) -> bool {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let mut fds = [PollFd::new(self, PollFlags::IN)];
        let t = Timespec { tv_sec: timeout.as_secs() as _, tv_nsec: timeout.subsec_nanos() as _ };
        match poll(&mut fds, Some(&t)) {
            Ok(n) => n > 0,
            // Let the real read report any error.
            Err(e) => e != rustix::io::Errno::INTR,
        }
    }
    /// Send as much of `bufs` (in order) as the socket takes without
    /// blocking; returns how many bytes went. Nothing was sent if the
    /// socket is full (`Ok(0)`).
    pub fn send_nonblocking(&self, bufs: &[&[u8]]) -> io::Result<usize> {
        use rustix::net::{sendmsg, SendAncillaryBuffer, SendFlags};
        let mut sent = 0;
        // sendmsg takes at most IOV_MAX (1024) pieces at a time.
        for group in bufs.chunks(512) {
            let iov: Vec<io::IoSlice<'_>> = group.iter().map(|b| io::IoSlice::new(b)).collect();
            let want: usize = group.iter().map(|b| b.len()).sum();
            let flags = SendFlags::DONTWAIT | SendFlags::NOSIGNAL;
            match sendmsg(self, &iov, &mut SendAncillaryBuffer::default(), flags) {
                Ok(n) => {
                    sent += n;
                    if n < want {
                        break;
                    }
                }
                Err(e) if e == rustix::io::Errno::AGAIN || e == rustix::io::Errno::INTR => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(sent)
    }

    /// Shut down one or both directions.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        }
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// The byte stream of the option phase: plain until a STARTTLS upgrades it.
pub enum Channel {
    /// No TLS.
    Plain(Stream),
    /// After a successful STARTTLS.
    Tls(Box<TlsStream>),
    /// A TLS handshake failed; nothing more can be sent or received.
    Broken,
}

impl Channel {
    /// Is TLS up?
    pub fn is_tls(&self) -> bool {
        matches!(self, Channel::Tls(_))
    }

    /// Names in the client's certificate (empty without TLS or without one).
    pub fn peer_identities(&self) -> &[String] {
        match self {
            Channel::Tls(t) => t.identities(),
            _ => &[],
        }
    }

    /// Switch to TLS (right after the STARTTLS ACK was sent). `Ok(Err(why))`:
    /// the handshake failed and the channel is unusable.
    pub fn start_tls(&mut self, tls: &TlsServer) -> io::Result<Result<(), String>> {
        let Channel::Plain(s) = std::mem::replace(self, Channel::Broken) else {
            return Ok(Err("TLS is already active".into()));
        };
        match tls.accept(s)? {
            Ok(t) => {
                *self = Channel::Tls(Box::new(t));
                Ok(Ok(()))
            }
            Err(why) => Ok(Err(why)),
        }
    }
}

fn broken() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the TLS handshake failed")
}

impl Read for Channel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Channel::Plain(s) => s.read(buf),
            Channel::Tls(t) => t.read(buf),
            Channel::Broken => Err(broken()),
        }
    }
}

impl Write for Channel {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Channel::Plain(s) => s.write(buf),
            Channel::Tls(t) => t.write(buf),
            Channel::Broken => Err(broken()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Channel::Plain(s) => s.flush(),
            Channel::Tls(t) => t.flush(),
            Channel::Broken => Err(broken()),
        }
    }
}
