//! Transports: plain TCP and Unix stream sockets behind one type, and the
//! option phase's channel, which STARTTLS turns into a TLS session.

use crate::tls::{TlsServer, TlsStream};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A request source that may hold input the socket no longer shows: a TLS
/// session keeps decrypted bytes (and whole records) of its own. The
/// transmission phase asks before it decides to wait on the socket, or a
/// request already received would sit until the client sent another.
pub trait PendingInput {
    /// Whether a read would return at once from input this reader already
    /// holds, without a system call. May do buffered work, such as
    /// decrypting records already received.
    fn holds_input(&mut self) -> bool;

    /// Whether a read would return at once (bytes or the end of the stream
    /// waiting), looking at the socket as well: one system call, and for
    /// TLS a read of what the socket has, which cannot block.
    fn input_ready(&mut self) -> bool;

    /// How many bytes reads can return now without waiting for the client
    /// (plain: what the socket holds; TLS: the plaintext of the records
    /// already received). 0 when an error waits for the next read.
    fn available(&mut self) -> io::Result<usize>;

    /// Block until a read would return at once: bytes have come, the
    /// stream has ended, or an error waits for the next read.
    fn wait_for_input(&mut self) -> io::Result<()>;

    /// Read into `bufs` (in order) only what is here: `WouldBlock` instead
    /// of waiting when nothing is, 0 at the end of the stream.
    fn read_now(&mut self, bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<usize>;

    /// Whether [`Self::read_now`] stores into `bufs` only through the
    /// kernel (a socket read), so memory that faults there is `EFAULT`
    /// rather than SIGBUS (`FLAG_KERNEL_FILL`). False unless said so.
    fn fills_through_kernel(&self) -> bool {
        false
    }
}

/// Buffered input for the transmission phase. Unlike `std::io::BufReader`,
/// it can top its buffer up while bytes remain in it, so a request whose
/// payload straddles two reads can still be used where it lies, and the
/// replies already built need not go out before the rest arrives.
pub struct RequestReader<R> {
    inner: R,
    buf: Box<[u8]>,
    /// `buf[pos..filled]` is buffered input not yet consumed.
    pos: usize,
    filled: usize,
    /// The most bytes the next [`Self::fill_more`] reads (0: no limit).
    next_fill_max: usize,
}

impl<R: Read> RequestReader<R> {
    /// A reader with a buffer of `capacity` bytes.
    pub fn with_capacity(capacity: usize, inner: R) -> Self {
        RequestReader { inner, buf: vec![0; capacity].into_boxed_slice(), pos: 0, filled: 0, next_fill_max: 0 }
    }

    /// The input buffered and not consumed yet.
    pub fn buffer(&self) -> &[u8] {
        &self.buf[self.pos..self.filled]
    }

    /// The most input the buffer can hold.
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Mark `n` buffered bytes as used.
    pub fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.filled);
        if self.pos == self.filled {
            (self.pos, self.filled) = (0, 0);
        }
    }

    /// The source underneath.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// One read of the source into the room behind the buffered input
    /// (moving that input to the front first if need be). May block like
    /// the source's read. Returns how many bytes came: 0 at the end of the
    /// stream or when the buffered input fills the whole buffer.
    pub fn fill_more(&mut self) -> io::Result<usize> {
        // Move the input to the front when it is small (cheap), or when
        // the buffer is full behind it (a request that fits the buffer
        // must be able to lie in it whole).
        if self.pos > 0 && (self.filled - self.pos < self.buf.len() / 2 || self.filled == self.buf.len()) {
            self.buf.copy_within(self.pos..self.filled, 0);
            (self.pos, self.filled) = (0, self.filled - self.pos);
        }
        if self.filled == self.buf.len() {
            return Ok(0);
        }
        let end = match std::mem::take(&mut self.next_fill_max) {
            0 => self.buf.len(),
            max => (self.filled + max).min(self.buf.len()),
        };
        let n = loop {
            match self.inner.read(&mut self.buf[self.filled..end]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r?,
            }
        };
        self.filled += n;
        Ok(n)
    }

    /// Make the next [`Self::fill_more`] read at most `n` bytes: after a
    /// large write received into lent memory the next request is likely
    /// another, and a full read would take the start of its payload into
    /// this buffer, to be copied a second time into the layer's memory.
    /// Reading just its header leaves the payload in the socket for one
    /// `readv` straight to where it belongs.
    pub fn limit_next_fill(&mut self, n: usize) {
        self.next_fill_max = n;
    }

    /// Fill `out` entirely: buffered input first, then the source (large
    /// remainders straight into `out`, small ones through the buffer).
    /// `UnexpectedEof` if the stream ends first.
    pub fn read_exact(&mut self, out: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < out.len() {
            let have = self.buffer();
            if !have.is_empty() {
                let n = have.len().min(out.len() - done);
                out[done..done + n].copy_from_slice(&have[..n]);
                self.consume(n);
                done += n;
                continue;
            }
            if out.len() - done >= self.buf.len() {
                return self.inner.read_exact(&mut out[done..]);
            }
            if self.fill_more()? == 0 {
                return Err(eof());
            }
        }
        Ok(())
    }

    /// Fill every piece entirely, in order, from input that is already
    /// here (buffered input first, then as many pieces per read as it
    /// takes): never waits. `WouldBlock` if less was here than asked for,
    /// `UnexpectedEof` if the stream ended. `got` counts the bytes taken,
    /// whatever the outcome, so the caller can skip the rest.
    /// `kernel_only`: the pieces are a layer's memory that may fault (a
    /// file mapping), so they are filled only by the kernel (the socket
    /// read, and [`fill_lent`] for buffered input) and a fault is `EFAULT`,
    /// with the bytes not taken still in the stream, instead of a SIGBUS.
    pub fn read_pieces_now(&mut self, pieces: &mut [&mut [u8]], got: &mut usize, kernel_only: bool) -> io::Result<()>
    where
        R: PendingInput,
    {
        let (mut idx, mut at) = (0, 0);
        while idx < pieces.len() && (at == pieces[idx].len() || !self.buffer().is_empty()) {
            let n = (pieces[idx].len() - at).min(self.filled - self.pos);
            let (src, dst) = (&self.buf[self.pos..self.pos + n], &mut pieces[idx][at..at + n]);
            if kernel_only {
                // What it could not fill stays buffered, for the caller
                // to drop with the rest of the payload.
                fill_lent(src, dst)?;
            } else {
                dst.copy_from_slice(src);
            }
            self.consume(n);
            (at, *got) = (at + n, *got + n);
            if at == pieces[idx].len() {
                (idx, at) = (idx + 1, 0);
            }
        }
        let Some((first, rest)) = pieces[idx..].split_first_mut() else { return Ok(()) };
        let mut iov: Vec<io::IoSliceMut<'_>> = std::iter::once(io::IoSliceMut::new(&mut first[at..]))
            .chain(rest.iter_mut().map(|p| io::IoSliceMut::new(p)))
            .collect();
        let mut bufs = &mut iov[..];
        io::IoSliceMut::advance_slices(&mut bufs, 0);
        while !bufs.is_empty() {
            let n = match self.inner.read_now(bufs) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => r?,
            };
            if n == 0 {
                return Err(eof());
            }
            *got += n;
            io::IoSliceMut::advance_slices(&mut bufs, n);
        }
        Ok(())
    }

    /// Read and drop `n` bytes (a payload no one will use). May block.
    pub fn skip(&mut self, mut n: usize) -> io::Result<()> {
        while n > 0 {
            if self.buffer().is_empty() && self.fill_more()? == 0 {
                return Err(eof());
            }
            let k = n.min(self.buffer().len());
            self.consume(k);
            n -= k;
        }
        Ok(())
    }
}

/// Copy `src` into `dst`, memory a layer lent for a write, by asking the
/// kernel to (`process_vm_writev` on ourselves): where a CPU store to an
/// unbacked page of a mapped file raises SIGBUS, the kernel's copy stops
/// with `EFAULT`.
pub fn fill_lent(src: &[u8], dst: &mut [u8]) -> io::Result<()> {
    use nix::sys::uio::{process_vm_writev, RemoteIoVec};
    debug_assert_eq!(src.len(), dst.len());
    let mut done = 0;
    while done < src.len() {
        let local = [io::IoSlice::new(&src[done..])];
        let remote = [RemoteIoVec { base: dst[done..].as_mut_ptr() as usize, len: src.len() - done }];
        match process_vm_writev(nix::unistd::Pid::this(), &local, &remote) {
            Ok(0) => return Err(io::Error::from_raw_os_error(libc::EFAULT)),
            Ok(n) => done += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Whether [`fill_lent`] works here (a seccomp filter may refuse
/// `process_vm_writev`). Without it, writes are never received into memory
/// that may fault.
pub fn can_fill_lent() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let mut out = [0u8; 8];
        let ok = fill_lent(&[1u8; 8], &mut out).is_ok() && out == [1u8; 8];
        if !ok {
            log::warn!("process_vm_writev is not available: writes are not received into mapped files");
        }
        ok
    })
}

/// The error for a client that closed its end in the middle of a request.
pub fn eof() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "the client closed the connection")
}

/// Busy-waiting for the next request, backed off after misses: a wait that
/// finds nothing skips the next 2, 4, ... 64 waits, so a client that is
/// idle or waits for each reply costs next to no CPU.
#[derive(Default)]
pub struct Backoff {
    skip: u32,
    misses: u32,
}

/// Threads busy-waiting for a request right now, server-wide.
static SPINNING: AtomicUsize = AtomicUsize::new(0);

/// At most one thread fewer than the CPUs busy-waits at once, so spinning
/// never takes the last core from threads with work.
fn max_spinning() -> usize {
    static MAX: OnceLock<usize> = OnceLock::new();
    *MAX.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1)))
}

/// Wait up to `window_ns` for `probe` to become readable, yielding the CPU
/// between looks. False if it did not (or if waiting is backed off, or
/// enough other threads are already spinning).
pub fn wait_readable(probe: &Stream, state: &mut Backoff, window_ns: u64) -> bool {
    if !state.due() {
        return false;
    }
    let Some(_slot) = SpinSlot::take() else { return false };
    let found = spin_until_readable(probe, window_ns);
    state.record(found);
    found
}

impl Backoff {
    /// Whether this wait should happen (false: skipped after misses).
    fn due(&mut self) -> bool {
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        true
    }

    /// A wait found bytes, or missed: the next 2, 4, ... 64 are skipped.
    fn record(&mut self, found: bool) {
        if found {
            self.misses = 0;
        } else {
            self.misses = (self.misses + 1).min(6);
            self.skip = 1 << self.misses;
        }
    }
}

/// The right to busy-wait, one of [`max_spinning`]; given back on drop.
struct SpinSlot;

impl SpinSlot {
    fn take() -> Option<SpinSlot> {
        if SPINNING.fetch_add(1, Ordering::Relaxed) >= max_spinning() {
            SPINNING.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(SpinSlot)
    }
}

impl Drop for SpinSlot {
    fn drop(&mut self) {
        SPINNING.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Look at `probe` until it is readable or `window_ns` passed, yielding the
/// CPU between looks.
fn spin_until_readable(probe: &Stream, window_ns: u64) -> bool {
    let start = Instant::now();
    loop {
        if probe.readable_now() {
            return true;
        }
        if start.elapsed().as_nanos() as u64 > window_ns {
            return false;
        }
        std::thread::yield_now();
    }
}

/// Reads the client's socket for the transmission phase. With `spin`, a
/// read that would block first waits a little for bytes (backed off like
/// [`wait_readable`]). That is for TLS: a client sends a large payload as
/// one 16 KiB record per `send`, and slower than we take it in, so a
/// sleeping reader is woken by every record, which costs the client more
/// than it costs us (11-13 % of fio's time with 1 MiB writes). A plain
/// client sends a payload in a few large `send`s: there the spin only
/// burnt CPU, so plain sockets do not spin here.
pub struct SocketReader {
    sock: Stream,
    spin: bool,
    backoff: Backoff,
}

/// How long a read waits for more of a request before it sleeps.
const READ_SPIN_NS: u64 = 50_000;

impl SocketReader {
    /// Read `sock`, spinning before a read that would block if `spin`.
    pub fn new(sock: Stream, spin: bool) -> Self {
        SocketReader { sock, spin, backoff: Backoff::default() }
    }

    /// The socket.
    pub fn socket(&self) -> &Stream {
        &self.sock
    }
}

/// The first non-empty buffer (a spinning read takes vectors one by one).
fn first_nonempty<'b>(bufs: &'b mut [io::IoSliceMut<'_>]) -> Option<&'b mut [u8]> {
    bufs.iter_mut().find(|b| !b.is_empty()).map(|b| &mut **b)
}

impl Read for SocketReader {
    fn read_vectored(&mut self, bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
        match first_nonempty(bufs) {
            Some(first) if self.spin => self.read(first),
            _ => self.sock.read_vectored(bufs),
        }
    }
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use rustix::net::{recv, RecvFlags};
        if !self.spin {
            return self.sock.read(buf);
        }
        // Bytes waiting: the same single system call as a plain read.
        match recv(&self.sock, &mut *buf, RecvFlags::DONTWAIT) {
            Ok((n, _)) => return Ok(n),
            Err(e) if e == rustix::io::Errno::AGAIN || e == rustix::io::Errno::INTR => {}
            Err(e) => return Err(e.into()),
        }
        wait_readable(&self.sock, &mut self.backoff, READ_SPIN_NS);
        self.sock.read(buf)
    }
}

impl PendingInput for SocketReader {
    fn holds_input(&mut self) -> bool {
        false
    }
    fn input_ready(&mut self) -> bool {
        self.sock.readable_now()
    }
    fn available(&mut self) -> io::Result<usize> {
        Ok(rustix::io::ioctl_fionread(&self.sock)? as usize)
    }
    fn fills_through_kernel(&self) -> bool {
        // `read_now` is `recvmsg` straight into the caller's buffers.
        true
    }
    fn read_now(&mut self, bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
        use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvFlags};
        let r = recvmsg(&self.sock, bufs, &mut RecvAncillaryBuffer::default(), RecvFlags::DONTWAIT);
        Ok(r?.bytes)
    }
    fn wait_for_input(&mut self) -> io::Result<()> {
        match self.sock.poll_readable(None) {
            // Errors and hang-ups are for the next read to report.
            Ok(_) | Err(rustix::io::Errno::INTR) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

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
        match self.poll_readable(Some(timeout)) {
            Ok(n) => n > 0,
            // Let the real read report any error.
            Err(e) => e != rustix::io::Errno::INTR,
        }
    }

    /// `poll` for input, up to `timeout` (`None`: until it comes); how
    /// many descriptors are ready (0 or 1).
    fn poll_readable(&self, timeout: Option<Duration>) -> rustix::io::Result<usize> {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let mut fds = [PollFd::new(self, PollFlags::IN)];
        let t = timeout.map(|t| Timespec { tv_sec: t.as_secs() as _, tv_nsec: t.subsec_nanos() as _ });
        poll(&mut fds, t.as_ref())
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
                // What went out before the error is on the wire: report
                // that, and let the caller find the error again (for lent
                // memory that cannot be read, EFAULT) on what is left.
                Err(_) if sent > 0 => break,
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
    fn read_vectored(&mut self, bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read_vectored(bufs),
            Stream::Unix(s) => s.read_vectored(bufs),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A source that hands out its bytes in the pieces given, one per read.
    struct Pieces(std::collections::VecDeque<Vec<u8>>);

    /// An empty piece stands for "nothing here yet": a read that meets one
    /// takes it and returns `WouldBlock`.
    impl PendingInput for Pieces {
        fn holds_input(&mut self) -> bool {
            true
        }
        fn input_ready(&mut self) -> bool {
            true
        }
        fn available(&mut self) -> io::Result<usize> {
            Ok(self.0.iter().take_while(|p| !p.is_empty()).map(Vec::len).sum())
        }
        fn wait_for_input(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn read_now(&mut self, bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
            if self.0.front().is_some_and(Vec::is_empty) {
                self.0.pop_front();
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let Some(first) = bufs.iter_mut().find(|b| !b.is_empty()) else { return Ok(0) };
            self.read(first)
        }
    }

    impl Read for Pieces {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let Some(mut p) = self.0.pop_front() else { return Ok(0) };
            let n = p.len().min(out.len());
            out[..n].copy_from_slice(&p[..n]);
            if n < p.len() {
                self.0.push_front(p.split_off(n));
            }
            Ok(n)
        }
    }

    #[test]
    fn waiting_for_a_request_backs_off_after_misses_and_resets_on_a_hit() {
        // The back-off alone: the server-wide spin slots are shared with
        // other tests running at the same time.
        let mut state = Backoff::default();
        // A miss, then the next 2 waits are skipped...
        assert!(state.due());
        state.record(false);
        assert_eq!((state.misses, state.skip), (1, 2));
        assert!(!state.due() && !state.due());
        assert!(state.due());
        // ...the next miss skips 4, and so on up to 64.
        state.record(false);
        assert_eq!((state.misses, state.skip), (2, 4));
        for _ in 0..20 {
            state.record(false);
        }
        assert_eq!(state.skip, 64, "the back-off is capped");
        // A hit forgets the misses.
        state.record(true);
        assert_eq!(state.misses, 0);
        // The look itself: nothing there, then a byte.
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let probe = Stream::Unix(a);
        assert!(!spin_until_readable(&probe, 1_000));
        b.write_all(b"x").unwrap();
        assert!(spin_until_readable(&probe, 1_000_000_000));
    }

    #[test]
    fn socket_reader_returns_what_is_there_waits_for_the_rest_and_sees_the_end() {
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut r = SocketReader::new(Stream::Unix(a), true);
        b.write_all(b"abc").unwrap();
        assert!(r.input_ready());
        let mut buf = [0u8; 8];
        assert_eq!(r.read(&mut buf).unwrap(), 3);
        assert!(!r.input_ready() && !r.holds_input());
        // Nothing there: the read waits (past its spin) until bytes come.
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            b.write_all(b"late").unwrap();
            b
        });
        assert_eq!(r.read(&mut buf).unwrap(), 4);
        assert_eq!(&buf[..4], b"late");
        drop(late.join().unwrap());
        assert_eq!(r.read(&mut buf).unwrap(), 0, "end of stream");
    }

    #[test]
    fn socket_reader_counts_what_has_arrived_and_waits_for_more() {
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut r = SocketReader::new(Stream::Unix(a), false);
        assert_eq!(r.available().unwrap(), 0);
        b.write_all(b"hello").unwrap();
        assert_eq!(r.available().unwrap(), 5);
        r.wait_for_input().unwrap(); // at once: bytes are there
                                     // One vectored read fills both buffers.
        let (mut x, mut y) = ([0u8; 2], [0u8; 3]);
        let n = r.read_vectored(&mut [io::IoSliceMut::new(&mut x), io::IoSliceMut::new(&mut y)]).unwrap();
        assert_eq!((n, &x, &y), (5, b"he", b"llo"));
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            b.write_all(b"!").unwrap();
            b
        });
        let t = Instant::now();
        r.wait_for_input().unwrap();
        assert!(t.elapsed() >= Duration::from_millis(40), "woke before anything came");
        assert_eq!(r.available().unwrap(), 1);
        drop(late.join().unwrap());
        r.wait_for_input().unwrap(); // the end of the stream wakes it too
    }

    #[test]
    fn request_reader_fills_pieces_from_its_buffer_then_in_one_go_from_the_source() {
        for kernel_only in [false, true] {
            let all: Vec<u8> = (0..40u8).collect();
            let mut r = RequestReader::with_capacity(8, pieces(&[&all[..6], &all[6..]]));
            assert_eq!(r.fill_more().unwrap(), 6);
            r.consume(1);
            // 5 buffered bytes, then the source; an empty piece on the way.
            let (mut p1, mut p2, mut p3, mut p4) = ([0u8; 3], [0u8; 0], [0u8; 10], [0u8; 20]);
            let mut got = 0;
            r.read_pieces_now(&mut [&mut p1, &mut p2, &mut p3, &mut p4], &mut got, kernel_only).unwrap();
            assert_eq!(got, 33);
            assert_eq!(&p1, &all[1..4]);
            assert_eq!(&p3, &all[4..14]);
            assert_eq!(&p4, &all[14..34]);
            assert!(r.buffer().is_empty());
            let mut got = 0;
            let e = r.read_pieces_now(&mut [&mut [0u8; 7]], &mut got, kernel_only).unwrap_err();
            assert_eq!((e.kind(), got), (io::ErrorKind::UnexpectedEof, 6), "6 bytes left, 7 asked");
        }
    }

    /// Lent memory that faults (a mapped file truncated under the
    /// mapping), filled from buffered input: `EFAULT`, not SIGBUS, and the
    /// bytes that did not go in are still there to be dropped.
    #[test]
    fn filling_lent_memory_that_faults_is_an_error_not_a_crash() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(2 * 4096).unwrap();
        // SAFETY: a shared writable mapping of a file only this test uses;
        // its second page is made to fault on purpose and only the kernel
        // (process_vm_writev) writes to it.
        let mut map = unsafe { memmap2::MmapOptions::new().len(2 * 4096).map_mut(&file) }.unwrap();
        file.set_len(4096).unwrap();
        let all = [5u8; 20];
        let mut r = RequestReader::with_capacity(32, pieces(&[&all]));
        assert_eq!(r.fill_more().unwrap(), 20);
        let (good, bad) = map.split_at_mut(4096);
        let mut got = 0;
        let e = r.read_pieces_now(&mut [&mut good[4086..], &mut bad[..10]], &mut got, true).unwrap_err();
        assert_eq!((e.raw_os_error(), got), (Some(libc::EFAULT), 10));
        assert!(good[4086..].iter().all(|&x| x == 5));
        assert_eq!(r.buffer().len(), 10, "what did not go in is still buffered");
        assert!(can_fill_lent());
    }

    /// Less here than promised (a count that was wrong): the read stops
    /// rather than waits, and says how much it took.
    #[test]
    fn request_reader_reading_pieces_now_never_waits() {
        let mut r = RequestReader::with_capacity(8, pieces(&[b"abcd", b"ef", b"", b"gh"]));
        assert_eq!(r.fill_more().unwrap(), 4);
        let (mut a, mut b) = ([0u8; 5], [0u8; 3]);
        let mut got = 0;
        let e = r.read_pieces_now(&mut [&mut a, &mut b], &mut got, false).unwrap_err();
        assert_eq!((e.kind(), got), (io::ErrorKind::WouldBlock, 6));
        assert_eq!((&a, &b[..1]), (b"abcde", &b"f"[..]));
        let mut rest = [0u8; 2];
        r.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"gh", "nothing was lost");
    }

    #[test]
    fn request_reader_skips_across_its_buffer_and_the_source() {
        let all: Vec<u8> = (0..30u8).collect();
        let mut r = RequestReader::with_capacity(8, pieces(&[&all[..5], &all[5..]]));
        assert_eq!(r.fill_more().unwrap(), 5);
        r.skip(20).unwrap();
        let mut next = [0u8; 4];
        r.read_exact(&mut next).unwrap();
        assert_eq!(&next, &all[20..24]);
        assert_eq!(r.skip(7).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    fn pieces(p: &[&[u8]]) -> Pieces {
        Pieces(p.iter().map(|b| b.to_vec()).collect())
    }

    #[test]
    fn request_reader_tops_up_behind_what_it_holds() {
        let mut r = RequestReader::with_capacity(16, pieces(&[b"headPAY", b"LOAD", b"next"]));
        assert_eq!(r.fill_more().unwrap(), 7);
        let mut head = [0u8; 4];
        r.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"head");
        // The payload straddles two reads: after topping up it lies whole
        // in the buffer, where it can be used in place.
        assert_eq!(r.buffer(), b"PAY");
        assert_eq!(r.fill_more().unwrap(), 4);
        assert_eq!(r.buffer(), b"PAYLOAD");
        r.consume(7);
        assert!(r.buffer().is_empty());
        assert_eq!(r.fill_more().unwrap(), 4);
        assert_eq!(r.buffer(), b"next");
        r.consume(4);
        assert_eq!(r.fill_more().unwrap(), 0, "end of stream");
    }

    #[test]
    fn request_reader_moves_what_it_holds_to_make_room() {
        let mut r = RequestReader::with_capacity(8, pieces(&[b"abcdefgh", b"ijkl"]));
        assert_eq!(r.fill_more().unwrap(), 8);
        assert_eq!(r.fill_more().unwrap(), 0, "a full buffer takes nothing");
        r.consume(6);
        assert_eq!(r.fill_more().unwrap(), 4, "the rest moved to the front");
        assert_eq!(r.buffer(), b"ghijkl");
    }

    #[test]
    fn request_reader_makes_room_for_a_request_that_fits_when_full() {
        let mut r = RequestReader::with_capacity(8, pieces(&[b"xabcdefg", b"h"]));
        assert_eq!(r.fill_more().unwrap(), 8);
        r.consume(1);
        // 7 bytes held behind 1 consumed, an 8-byte request: room is made.
        assert_eq!(r.fill_more().unwrap(), 1);
        assert_eq!(r.buffer(), b"abcdefgh");
    }

    #[test]
    fn request_reader_reads_exactly_across_pieces_and_past_its_capacity() {
        let big: Vec<u8> = (0..100u8).collect();
        let mut r = RequestReader::with_capacity(8, pieces(&[&big[..3], &big[3..50], &big[50..]]));
        let mut head = [0u8; 2];
        r.read_exact(&mut head).unwrap();
        // Larger than the buffer: the rest goes straight into the target.
        let mut body = vec![0u8; 90];
        r.read_exact(&mut body).unwrap();
        assert_eq!(&body[..], &big[2..92]);
        let mut tail = [0u8; 8];
        r.read_exact(&mut tail).unwrap();
        assert_eq!(&tail[..], &big[92..]);
        let e = r.read_exact(&mut [0u8; 1]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
