//! The transmission phase: read requests, check them against what was
//! negotiated, run them against the export's checked pipeline, and reply.
//!
//! The connection's thread reads requests and, as long as the layer does not
//! sleep in them, runs them itself: a hand-off to another thread (a wake-up,
//! a context switch, a lock passed back and forth) costs more than a memory
//! or page-cache request does. Replies are built straight into one output
//! buffer (data read by the layer lands right behind its chunk header) and
//! go out in batches: the buffer is sent when it holds enough, and always
//! before the thread could wait on the socket for the next request.
//!
//! Requests of a kind that recently slept in the layer (a disk, a network
//! backend, the delay filter) go to worker threads instead, started as
//! needed up to [`MAX_WORKERS`] on a parallel pipeline, so they overlap.
//! Their replies go out as soon as they are ready, out of order, each
//! written whole by the [`ReplyWriter`]. A large READ on a worker is split
//! into pieces read concurrently and sent as separate OFFSET_DATA chunks. Holes reported by the layer's extents go out as OFFSET_HOLE chunks
//! without being read at all. Memory per connection is bounded: the reader
//! stops reading while the requests in flight hold more than
//! [`MAX_IN_FLIGHT_BYTES`].

use super::codec::{self, ReplyMode, Request};
use super::consts::*;
use super::handshake::Session;
use crate::error::{NbdErrno, OpError};
use crate::pipeline::{CheckedLayer, Extent};
use crate::transport::{wait_readable, Backoff, PendingInput, RequestReader, Stream};
use nbdhost_plugin_api::abi::{EXTENT_HOLE, EXTENT_ZERO};
use nbdhost_plugin_api::ThreadModel;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::Scope;
use std::time::Instant;

/// Most bytes (payloads plus read data) the requests in flight on one
/// connection may hold before the reader waits.
pub const MAX_IN_FLIGHT_BYTES: usize = 64 << 20;
/// Most requests in flight on one connection.
pub const MAX_IN_FLIGHT_REQUESTS: usize = 1024;
/// Worker threads per connection on a parallel pipeline.
pub const MAX_WORKERS: usize = 16;
/// Reads at least this long consult the layer's extents for holes.
pub const SPARSE_READ_MIN: u64 = 64 * 1024;
/// Reads at least this long are split into pieces when they run on workers.
pub const SPLIT_READ_MIN: u64 = 1024 * 1024;
/// Size of one piece of a split read.
pub const SPLIT_PIECE: u64 = 256 * 1024;
/// Most descriptors in one block-status chunk (the spec's SHOULD).
pub const MAX_EXTENTS: usize = 1 << 20;
/// Holes in sparse reads are aligned to this (the spec's SHOULD).
const HOLE_ALIGN: u64 = 512;
/// A kind of request runs on the connection's thread while the share of
/// recent requests of that kind that slept in the layer (a moving average,
/// in 1/1024ths) stays under this: one request that sleeps sends the next
/// ones to workers, about three that do not bring them back.
const BLOCKING_SHARE_MAX: u32 = 1024 / 8;
/// How long the reader looks for the next request before it sleeps.
const SPIN_NS: u64 = 50_000;
/// A connection that sends nothing for this long is idle: its buffers are
/// released while it waits.
const IDLE_AFTER: std::time::Duration = std::time::Duration::from_secs(1);
/// Data runs at least this long are lent by layers that can (memory):
/// sent from the layer's pages instead of copied into the reply first.
const LEND_MIN: usize = 64 * 1024;
/// Writes at least this large that are not all here yet are received into
/// memory the layer lends, in parts of at least this much (or the rest):
/// one TLS record's worth, so a part is one call, not one per packet.
const LEND_WRITE_MIN: usize = 16 * 1024;
/// One large data run in this many is sent the way that has lately cost
/// more, to keep its cost up to date; see [`LendGovernor`].
const LEND_EXPLORE_EVERY: u32 = 32;
/// Runs sent the cheaper way are timed one in this many.
const LEND_MEASURE_EVERY: u32 = 4;
/// Payload buffers kept per connection for reuse.
const POOLED_PAYLOADS: usize = 4;
/// How long replies are held back waiting for the next request.
const COALESCE_NS: u64 = 30_000;
/// Replies held back for one send: at most this many bytes...
const BATCH_BYTES: usize = 64 * 1024;
/// ...and this many replies.
const BATCH_REPLIES: usize = 16;
/// Buffers larger than this are released after use rather than kept for
/// the connection's next request.
const RETAIN_BYTES: usize = 2 << 20;

/// Replies being built: headers and data are written straight into one
/// buffer that goes to the socket in a single write. The buffer stays
/// initialised up to its high-water mark, so a layer reads into it without
/// the buffer being zero-filled each time.
pub struct OutBuf {
    mode: ReplyMode,
    buf: Vec<u8>,
    used: usize,
    replies: usize,
}

impl OutBuf {
    /// An empty buffer for replies in `mode`.
    pub fn new(mode: ReplyMode) -> Self {
        OutBuf { mode, buf: Vec::new(), used: 0, replies: 0 }
    }

    /// The bytes to send.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.used]
    }

    fn is_empty(&self) -> bool {
        self.used == 0
    }

    /// Forget what was sent; release a buffer grown unusually large.
    fn clear(&mut self) {
        self.used = 0;
        self.replies = 0;
        if self.buf.len() > RETAIN_BYTES {
            self.buf = Vec::new();
        }
    }

    /// Drop the (empty) buffer's memory.
    fn release(&mut self) {
        debug_assert!(self.is_empty());
        self.buf = Vec::new();
    }

    /// `len` bytes at the end, appended (not zeroed if already initialised).
    fn slot(&mut self, len: usize) -> &mut [u8] {
        let start = self.used;
        let end = start + len;
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        self.used = end;
        &mut self.buf[start..end]
    }

    fn put(&mut self, b: &[u8]) {
        self.slot(b.len()).copy_from_slice(b);
    }

    fn chunk(&mut self, req: &Request, done: bool, kind: u16, payload_len: u64) {
        let flags = if done { REPLY_FLAG_DONE } else { 0 };
        self.put(codec::chunk_header(self.mode, flags, kind, req.cookie, req.offset, payload_len).as_bytes());
        if done {
            self.replies += 1;
        }
    }

    /// Success without data.
    pub fn ok(&mut self, req: &Request) {
        match self.mode {
            ReplyMode::Extended => self.chunk(req, true, REPLY_TYPE_NONE, 0),
            _ => {
                self.put(codec::simple_reply(0, req.cookie).as_bytes());
                self.replies += 1;
            }
        }
    }

    /// The final NONE chunk of a structured reply.
    pub fn done(&mut self, req: &Request) {
        self.chunk(req, true, REPLY_TYPE_NONE, 0);
    }

    /// An OFFSET_HOLE chunk (`len` must fit the 32-bit size field).
    pub fn hole(&mut self, req: &Request, offset: u64, len: u32, done: bool) {
        self.chunk(req, done, REPLY_TYPE_OFFSET_HOLE, 12);
        self.put(&offset.to_be_bytes());
        self.put(&len.to_be_bytes());
    }

    /// What precedes `len` bytes of read data at `offset`: a simple reply
    /// in simple mode, else an OFFSET_DATA chunk header and its offset.
    fn data_header(&mut self, req: &Request, offset: u64, len: usize, done: bool) {
        if self.mode == ReplyMode::Simple {
            self.put(codec::simple_reply(0, req.cookie).as_bytes());
            self.replies += 1;
        } else {
            self.chunk(req, done, REPLY_TYPE_OFFSET_DATA, 8 + len as u64);
            self.put(&offset.to_be_bytes());
        }
    }

    /// Read `len` bytes at `offset` from `layer` straight into the reply
    /// behind its [`Self::data_header`]. On failure nothing is appended.
    pub fn data(
        &mut self,
        layer: &CheckedLayer,
        req: &Request,
        offset: u64,
        len: usize,
        done: bool,
    ) -> Result<(), OpError> {
        let mark = (self.used, self.replies);
        self.data_header(req, offset, len, done);
        let r = layer.read(self.slot(len), offset);
        if r.is_err() {
            (self.used, self.replies) = mark;
        }
        r
    }

    /// A failed request. Structured modes carry the message (and the
    /// failing offset for ERROR_OFFSET); simple mode only the code.
    pub fn error(&mut self, req: &Request, e: &OpError, at: Option<u64>, done: bool) {
        match self.mode {
            ReplyMode::Simple => {
                self.put(codec::simple_reply(e.errno.code(), req.cookie).as_bytes());
                self.replies += 1;
            }
            _ => {
                let mut h = Vec::with_capacity(64 + e.message.len());
                let flags = if done { REPLY_FLAG_DONE } else { 0 };
                let (code, msg) = (e.errno.code(), &e.message);
                codec::encode_error_chunk(&mut h, self.mode, flags, req.cookie, req.offset, code, msg, at);
                self.put(&h);
                if done {
                    self.replies += 1;
                }
            }
        }
    }

    /// The block-status reply for one context.
    pub fn block_status(&mut self, req: &Request, context: u32, extents: &[(u64, u32)]) {
        let mut h = Vec::with_capacity(48 + 16 * extents.len());
        codec::encode_block_status(&mut h, self.mode, req.cookie, req.offset, context, extents);
        self.put(&h);
        self.replies += 1;
    }
}

/// Serialises replies: whatever a thread built in its [`OutBuf`] (whole
/// replies or whole chunks) goes to the socket as one unbroken write.
pub struct ReplyWriter<W: Write> {
    inner: Mutex<W>,
}

impl<W: Write> ReplyWriter<W> {
    /// Wrap the connection's writing side.
    pub fn new(w: W) -> Self {
        ReplyWriter { inner: Mutex::new(w) }
    }

    /// Send everything in `out` and empty it (also when sending fails).
    pub fn send(&self, out: &mut OutBuf) -> io::Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let r = {
            let mut w = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            w.write_all(out.bytes()).and_then(|()| w.flush())
        };
        out.clear();
        r
    }
}

/// Split the read `[offset, offset+length)` into `(offset, length, hole)`
/// runs according to `extents` (which start at `offset`). Holes are extents
/// that read as zeros, shrunk to 512-byte alignment (except at the end of
/// the request); what is cut off is read as data, as is anything the
/// extents do not cover. Runs are contiguous, non-empty and merged.
pub fn read_segments(offset: u64, length: u64, extents: &[Extent], align: u64) -> Vec<(u64, u64, bool)> {
    debug_assert!(align.is_power_of_two());
    let end = offset + length;
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    let mut push = |o: u64, l: u64, hole: bool| {
        if l == 0 {
            return;
        }
        match out.last_mut() {
            Some(last) if last.2 == hole && last.0 + last.1 == o => last.1 += l,
            _ => out.push((o, l, hole)),
        }
    };
    let mut pos = offset;
    for e in extents {
        if pos >= end {
            break;
        }
        let e_end = pos.saturating_add(e.length).min(end);
        if e.flags & EXTENT_ZERO != 0 {
            let hs = pos.next_multiple_of(align).min(e_end);
            let he = if e_end == end { e_end } else { e_end / align * align };
            if he > hs {
                push(pos, hs - pos, false);
                push(hs, he - hs, true);
                push(he, e_end - he, false);
            } else {
                push(pos, e_end - pos, false);
            }
        } else {
            push(pos, e_end - pos, false);
        }
        pos = e_end;
    }
    push(pos, end - pos, false);
    out
}

fn name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_CACHE => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => "unknown command",
    }
}

/// Which blocking average a command feeds: reads, writes, the rest.
fn kind(cmd: u16) -> usize {
    match cmd {
        CMD_READ => 0,
        CMD_WRITE => 1,
        _ => 2,
    }
}

/// Work for a worker thread.
enum Job {
    /// A whole request (with its payload, if any).
    /// `payload[..len]` is the payload (the buffer is recycled and may be
    /// longer).
    Request { req: Request, payload: Vec<u8>, len: usize, cost: usize },
    /// One piece of a split READ.
    Piece { read: Arc<SplitRead>, offset: u64, len: usize },
}

/// A READ split into pieces: whoever finishes last sends the final chunk.
struct SplitRead {
    req: Request,
    pending: AtomicUsize,
    cost: usize,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
    workers: usize,
    idle: usize,
}

#[derive(Default)]
struct Flight {
    requests: usize,
    bytes: usize,
    /// Threads waiting for `flight_changed` (a condvar wake-up is a
    /// syscall even when nobody waits, so `finish` only wakes if needed).
    waiters: usize,
}

impl Flight {
    /// May one more request of `cost` bytes be in flight? (Always when
    /// none is, so no single request can be refused forever.)
    fn has_room(&self, cost: usize) -> bool {
        self.requests == 0 || (self.requests < MAX_IN_FLIGHT_REQUESTS && self.bytes + cost <= MAX_IN_FLIGHT_BYTES)
    }
}

/// Requests the reader has answered into its output buffer but not yet
/// sent: they stay in flight (and the connection busy) until they are.
#[derive(Default)]
struct Held {
    requests: usize,
    cost: usize,
}

/// What a connection shares between its reader and its workers.
struct Conn<'a, W: Write> {
    layer: &'a CheckedLayer,
    writer: ReplyWriter<W>,
    tflags: u16,
    mode: ReplyMode,
    export: &'a str,
    peer: &'a str,
    shutting_down: &'a AtomicBool,
    allocation_context: Option<u32>,
    /// Requests may run on workers (the pipeline is parallel).
    parallel: bool,
    split_reads: bool,
    /// How often recent reads, writes and other commands slept in the
    /// layer; see [`BLOCKING_SHARE_MAX`].
    blocking: [AtomicU32; 3],
    queue: Mutex<Queue>,
    work_ready: Condvar,
    flight: Mutex<Flight>,
    flight_changed: Condvar,
    /// Requests in flight, visible to the server for shutdown decisions.
    busy: &'a AtomicUsize,
    /// The client's socket, to look for the next request without blocking.
    probe: &'a Stream,
    /// The same socket when replies go onto it as they are (no TLS): lent
    /// read data can then be sent straight from the layer's memory.
    plain: Option<&'a Stream>,
    /// Payload buffers of finished worker requests, for reuse.
    payloads: Mutex<Vec<Vec<u8>>>,
    /// What the socket did not take of lent read data, kept for reuse.
    spill: Mutex<Vec<u8>>,
    /// Whether the next data run is lent or copied.
    lend: LendGovernor,
}

/// How a large data run goes out: lent (sent from the layer's memory) or
/// copied (read into the reply buffer, then sent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RunMode {
    Lend = 0,
    Copy = 1,
}

/// Chooses between lending and copying large data runs by what each has
/// cost this connection lately: the CPU time of the threads that sent them
/// (the layer's work, the copy, if any, and the send with its loopback
/// delivery), per KiB, as a moving average. One run in
/// [`LEND_EXPLORE_EVERY`] goes the other way, so a change (the client
/// falls behind and sockets fill) is noticed. What the clock cannot see:
/// a lent run of a mapped file whose pages are not in the page cache
/// waits for the disk inside the send, holding the connection's reply
/// lock, and that wait is not CPU time.
///
/// Which way is cheaper depends on the machine, so it is measured rather
/// than decided once. Lending saves a copy but sends from memory that is
/// cold in the caches, and what a full socket does not take is copied
/// after all, with an extra send. On an AMD EPYC (2 vCPUs), lending gained
/// 10-30 % on one connection and lost 5-30 % on two to four whose sockets
/// were often full; on an Intel Xeon (2 vCPUs, 2026-12) lending gained
/// 13-35 % on one connection (1 MiB reads, QD 8; memory, file and cow) and
/// was even on four, where a rule made on the first machine (copy for a
/// while after a run the socket did not take whole) copied most runs and
/// gave the gain away. CPU time, not wall time: time spent waiting for a
/// slow client to make room is the client's, not a cost of either way.
/// Races between the connection's threads only blur the averages.
#[derive(Default)]
struct LendGovernor {
    /// Moving average of CPU time per KiB for each [`RunMode`], in 1/16
    /// ns so the average does not stick up to 8 units off the samples
    /// (0: not measured yet).
    cost: [AtomicU32; 2],
    /// Samples taken of each [`RunMode`].
    samples: [AtomicU32; 2],
    /// Large data runs so far.
    runs: AtomicU32,
    /// Of which lent.
    lent: AtomicU32,
}

impl LendGovernor {
    /// How to send the next large data run, and whether to measure what
    /// it costs (the thread CPU clock is a system call that may take the
    /// scheduler's lock: the cheaper way is timed one run in
    /// [`LEND_MEASURE_EVERY`], the other whenever it is tried).
    fn choose(&self) -> (RunMode, bool) {
        let n = self.runs.fetch_add(1, Ordering::Relaxed);
        let lend = self.cost[RunMode::Lend as usize].load(Ordering::Relaxed);
        let copy = self.cost[RunMode::Copy as usize].load(Ordering::Relaxed);
        // Lend first; copy once as soon as lending has a figure.
        let cheaper = match (lend, copy) {
            (0, _) => return (RunMode::Lend, true),
            (_, 0) => return (RunMode::Copy, true),
            (l, c) if l <= c => RunMode::Lend,
            _ => RunMode::Copy,
        };
        if n % LEND_EXPLORE_EVERY == LEND_EXPLORE_EVERY - 1 {
            let other = match cheaper {
                RunMode::Lend => RunMode::Copy,
                RunMode::Copy => RunMode::Lend,
            };
            return (other, true);
        }
        (cheaper, n.is_multiple_of(LEND_MEASURE_EVERY))
    }

    /// A run of `bytes` sent `mode`'s way cost `cpu_ns` of CPU time.
    fn record(&self, mode: RunMode, bytes: usize, cpu_ns: u64) {
        let per_kib = (cpu_ns.saturating_mul(1024 * 16) / bytes.max(1) as u64).clamp(1, u32::MAX as u64) as u32;
        let avg = &self.cost[mode as usize];
        // Each way's first run also pays for warming up (a reply buffer
        // grown to 1 MiB, its pages faulted in): the second sample
        // replaces it instead of being averaged with it.
        if self.samples[mode as usize].fetch_add(1, Ordering::Relaxed) < 2 {
            avg.store(per_kib, Ordering::Relaxed);
            return;
        }
        let old = avg.load(Ordering::Relaxed);
        // Weight 1/8, and no sample counts for more than twice the average:
        // a lasting change moves it within a few runs, one outlier (the
        // thread preempted mid-send, a burst of page faults) does not flip
        // the choice.
        // (`old` is at least 1 here, and so is what it becomes.)
        avg.store(old - old / 8 + per_kib.min(old.saturating_mul(2)) / 8, Ordering::Relaxed);
    }

    /// What it chose and why, for a connection's debug log.
    fn log_summary(&self, peer: &str) {
        let runs = self.runs.load(Ordering::Relaxed);
        if runs > 0 {
            log::debug!(
                "{peer}: large data runs: {} lent, {} copied; CPU per KiB lately: lent {} ns, copied {} ns",
                self.lent.load(Ordering::Relaxed),
                runs - self.lent.load(Ordering::Relaxed).min(runs),
                self.cost[RunMode::Lend as usize].load(Ordering::Relaxed) / 16,
                self.cost[RunMode::Copy as usize].load(Ordering::Relaxed) / 16,
            );
        }
    }
}

/// CPU time the calling thread has used, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// The bytes of `parts` after the first `skip`, appended to `rest`. The
/// first part is ours; the others are memory a layer lent, which is copied
/// through the kernel ([`copy_lent`]) so that a lent page that is gone (a
/// mapped file truncated underneath) fails the copy instead of killing the
/// server with SIGBUS. False if it did: `rest` then ends where the lent
/// memory stopped being readable.
fn copy_unsent(parts: &[&[u8]], mut skip: usize, rest: &mut Vec<u8>) -> bool {
    for (i, p) in parts.iter().enumerate() {
        if skip >= p.len() {
            skip -= p.len();
            continue;
        }
        let tail = &p[skip..];
        skip = 0;
        if i == 0 {
            rest.extend_from_slice(tail);
        } else if !copy_lent(tail, rest) {
            return false;
        }
    }
    true
}

/// Append `src`, memory a layer lent, to `dst` by asking the kernel to copy
/// it (`process_vm_readv` on ourselves): where a CPU load from an unbacked
/// page of a mapped file raises SIGBUS, the kernel's copy stops with EFAULT.
/// False if it stopped; `dst` then holds what was readable.
fn copy_lent(src: &[u8], dst: &mut Vec<u8>) -> bool {
    use nix::sys::uio::{process_vm_readv, RemoteIoVec};
    let start = dst.len();
    dst.resize(start + src.len(), 0);
    let mut done = 0;
    while done < src.len() {
        let mut local = [io::IoSliceMut::new(&mut dst[start + done..])];
        let remote = [RemoteIoVec { base: src[done..].as_ptr() as usize, len: src.len() - done }];
        match process_vm_readv(nix::unistd::Pid::this(), &mut local, &remote) {
            Ok(0) | Err(_) => {
                dst.truncate(start + done);
                return false;
            }
            Ok(n) => done += n,
        }
    }
    true
}

/// Whether [`copy_lent`] works here (a seccomp filter may refuse
/// `process_vm_readv`). Without it nothing is lent for reads: copying lent
/// memory with plain loads could turn a layer's truncated mapping into a
/// crash.
fn can_copy_lent() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        let probe = [1u8; 8];
        let mut out = Vec::new();
        let ok = copy_lent(&probe, &mut out) && out == probe;
        if !ok {
            log::warn!("process_vm_readv is not available: large reads are copied, not lent");
        }
        ok
    })
}

/// Voluntary context switches of the calling thread so far. They grow only
/// when it sleeps (disk or network I/O, a timer, a contended lock), not
/// when it is merely preempted or copies a lot of memory, which is the line
/// between a layer worth overlapping on workers and one that is not: wall
/// time cannot tell a disk read from a 1 MiB copy that lost the CPU for a
/// moment on a busy machine.
fn voluntary_switches() -> std::ffi::c_long {
    use nix::sys::resource::{getrusage, UsageWho};
    getrusage(UsageWho::RUSAGE_THREAD).map_or(0, |u| u.voluntary_context_switches())
}

thread_local! {
    /// Voluntary switches of this thread spent waiting for a client to take
    /// read data that a request's own read sent ([`Conn::data_run`]).
    static CLIENT_WAITS: std::cell::Cell<std::ffi::c_long> = const { std::cell::Cell::new(0) };
    /// Requests of each kind this thread has started, for
    /// [`Conn::start_measuring`]'s sampling (per kind, so a workload that
    /// alternates kinds cannot leave one never measured).
    static REQUESTS_STARTED: [std::cell::Cell<u32>; 3] = const {
        [std::cell::Cell::new(0), std::cell::Cell::new(0), std::cell::Cell::new(0)]
    };
}

/// One request in this many (per thread) is measured for sleeping in the
/// layer: the measure is two `getrusage` calls, 7-9 % of the server's CPU
/// with 4 KiB requests when taken on every one (perf, memory over a Unix
/// socket, four connections), and a layer that starts to sleep (a disk, a
/// network) is still found within a few dozen requests.
const MEASURE_EVERY: u32 = 4;

/// [`voluntary_switches`] less those spent waiting for a client to take
/// the read data a request sent itself: a large read sends its own data,
/// and a full socket there is the client's pace, not a layer that sleeps.
/// Counted as sleeping, it sent reads to workers, where large ones are
/// split and copied (a third of 1 MiB reads with four connections).
fn layer_sleeps() -> std::ffi::c_long {
    voluntary_switches() - CLIENT_WAITS.with(|w| w.get())
}

/// Run `send` (a blocking write of read data to the client), leaving the
/// sleeps it takes out of [`layer_sleeps`] when `measuring`.
fn waiting_for_client<T>(measuring: bool, send: impl FnOnce() -> T) -> T {
    if !measuring {
        return send();
    }
    let before = voluntary_switches();
    let r = send();
    let waited = voluntary_switches() - before;
    CLIENT_WAITS.with(|w| w.set(w.get() + waited));
    r
}

/// Per-connection transmission state and entry point.
pub struct Transmission<'a> {
    session: &'a Session,
    peer: &'a str,
    shutting_down: &'a AtomicBool,
    busy: &'a AtomicUsize,
}

impl<'a> Transmission<'a> {
    /// Set up for a session. `busy` is kept equal to the number of requests
    /// in flight.
    pub fn new(session: &'a Session, peer: &'a str, shutting_down: &'a AtomicBool, busy: &'a AtomicUsize) -> Self {
        Transmission { session, peer, shutting_down, busy }
    }

    /// Serve requests until DISC, EOF or a framing error; every request read
    /// is answered before this returns. `writer` should not buffer: replies
    /// are already batched. `sock` is the client's socket underneath both;
    /// `plain` says whether bytes written to it reach the client as they
    /// are (false under TLS).
    pub fn serve<R: Read + PendingInput, W: Write + Send>(
        &mut self,
        mut reader: RequestReader<R>,
        writer: W,
        sock: &Stream,
        plain: bool,
    ) -> io::Result<()> {
        let s = self.session;
        let parallel = s.export.thread_model == ThreadModel::Parallel;
        let conn = Conn {
            layer: &s.open.layer,
            writer: ReplyWriter::new(writer),
            tflags: s.tflags,
            mode: s.mode,
            export: &s.export.name,
            peer: self.peer,
            shutting_down: self.shutting_down,
            allocation_context: s.allocation_context,
            parallel,
            split_reads: parallel && s.mode != ReplyMode::Simple,
            blocking: Default::default(),
            queue: Mutex::new(Queue::default()),
            work_ready: Condvar::new(),
            flight: Mutex::new(Flight::default()),
            flight_changed: Condvar::new(),
            busy: self.busy,
            probe: sock,
            plain: plain.then_some(sock),
            payloads: Mutex::new(Vec::new()),
            spill: Mutex::new(Vec::new()),
            lend: LendGovernor::default(),
        };
        std::thread::scope(|scope| {
            let r = conn.read_requests(&mut reader, scope);
            // Drain: every request read gets its reply before we close.
            conn.close_queue();
            conn.wait_idle();
            conn.lend.log_summary(self.peer);
            r
        })
    }
}

impl<'a, W: Write + Send> Conn<'a, W> {
    // ------------------------------------------------------------ reader

    fn read_requests<'s, R: Read + PendingInput>(
        &'s self,
        reader: &mut RequestReader<R>,
        scope: &'s Scope<'s, '_>,
    ) -> io::Result<()> {
        let mut out = OutBuf::new(self.mode);
        let mut held = Held::default();
        let mut payload_buf = Vec::new();
        let r = self.reader_loop(reader, &mut out, &mut held, &mut payload_buf, scope);
        // However the loop ended, the replies it built are owed.
        let sent = self.flush(&mut out, &mut held);
        r.and(sent)
    }

    /// Send the reader's held replies; their requests are then done.
    fn flush(&self, out: &mut OutBuf, held: &mut Held) -> io::Result<()> {
        let r = self.writer.send(out);
        if held.requests > 0 {
            self.finish(held.requests, held.cost);
            *held = Held::default();
        }
        r
    }

    fn reader_loop<'s, R: Read + PendingInput>(
        &'s self,
        reader: &mut RequestReader<R>,
        out: &mut OutBuf,
        held: &mut Held,
        payload_buf: &mut Vec<u8>,
        scope: &'s Scope<'s, '_>,
    ) -> io::Result<()> {
        let extended = self.mode == ReplyMode::Extended;
        let hlen = codec::request_header_len(extended);
        let mut hdr = [0u8; 32];
        let (mut coalescing, mut spin) = (Backoff::default(), Backoff::default());
        loop {
            // Short of a header: look for more, unless the buffer is empty
            // and the source holds input (a TLS session may hold whole
            // requests the socket no longer shows): then read straight on.
            let have = reader.buffer().len();
            if have < hlen && (have > 0 || !reader.get_mut().holds_input()) {
                let drained = have == 0;
                // With replies held and the client pipelining, its next
                // request is microseconds away: wait for it so the replies
                // go out together (the client then takes them in on one
                // wake-up). A client waiting for our reply instead makes the
                // wait miss, and backs it off.
                // Under TLS a readable socket may hold no request (a key
                // update, an alert, part of a record): only decrypted input
                // counts, or the replies held could wait on a client that
                // waits for them.
                let p = self.probe;
                let coalesced = drained
                    && !out.is_empty()
                    && wait_readable(p, &mut coalescing, COALESCE_NS)
                    && (self.plain.is_some() || reader.get_mut().input_ready());
                if !coalesced {
                    self.flush(out, held)?;
                    // Look for the next request a little longer before the
                    // read that would put the thread to sleep: a sleeping
                    // server costs the client too, whose send then has to
                    // wake us (on loopback, in the client's own time).
                    if drained && !wait_readable(p, &mut spin, SPIN_NS) && !p.readable_within(IDLE_AFTER) {
                        self.release_buffers(out, payload_buf);
                    }
                }
            }
            match reader.read_exact(&mut hdr[..hlen]) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    log::debug!("{}: closed the connection without NBD_CMD_DISC", self.peer);
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
            let req = match codec::parse_request(&hdr[..hlen], extended) {
                Ok(r) => r,
                Err(e) => {
                    log::warn!("{}: {e}; disconnecting", self.peer);
                    return Ok(());
                }
            };
            let plen = req.payload_len(extended);
            if plen > MAX_PAYLOAD_DEFAULT as u64 {
                // A payload this large is a denial of service: the spec lets
                // us hang up rather than read it.
                log::warn!(
                    "{}: {} payload of {plen} bytes is over 32 MiB; disconnecting",
                    self.peer,
                    name(req.command)
                );
                return Ok(());
            }
            let plen = plen as usize;
            let read_len = if req.command == CMD_READ { req.length.min(MAX_PAYLOAD_DEFAULT as u64) } else { 0 };
            let cost = plen + read_len as usize;
            if !self.try_admit(cost) {
                // Replies we hold count as in flight: send them before
                // waiting for room, or we could wait for ourselves.
                self.flush(out, held)?;
                self.admit(cost);
            }
            let inline = req.command != CMD_DISC && (!self.parallel || self.runs_inline(req.command));
            // The payload is on the wire whatever we decide about the
            // request: read it to keep framing. Run inline, a payload that
            // is already buffered is used where it lies.
            // Top the buffer up with what has arrived, so a payload that
            // straddles a read is still used in place. If it is not all
            // here, the client is sending it (it has sent the header): with
            // replies held, wait a moment for it rather than send them alone.
            let buffered = match self.await_payload(reader, plen, !out.is_empty(), &mut coalescing) {
                Ok(b) => b,
                Err(e) => {
                    self.finish(1, cost);
                    return Err(e);
                }
            };
            if !buffered {
                if let Err(e) = self.flush(out, held) {
                    self.finish(1, cost);
                    return Err(e);
                }
            }
            if !buffered && inline && req.command == CMD_WRITE && self.lends_for(plen) {
                if let Err(e) = self.receive_write(&req, reader, plen, out) {
                    self.finish(1, cost);
                    return Err(e);
                }
                if reader.buffer().is_empty() {
                    reader.limit_next_fill(hlen);
                }
            } else if !inline {
                let mut payload = self.payload_buffer(plen);
                if let Err(e) = reader.read_exact(&mut payload[..plen]) {
                    self.finish(1, cost);
                    return Err(e);
                }
                if req.command == CMD_DISC {
                    self.finish(1, cost);
                    log::debug!("{}: NBD_CMD_DISC", self.peer);
                    return Ok(());
                }
                self.push(Job::Request { req, payload, len: plen, cost }, scope);
                continue;
            } else if buffered {
                self.execute(&req, &reader.buffer()[..plen], cost, out, false, scope);
                reader.consume(plen);
            } else {
                if payload_buf.len() < plen {
                    payload_buf.resize(plen, 0);
                }
                if let Err(e) = reader.read_exact(&mut payload_buf[..plen]) {
                    self.finish(1, cost);
                    return Err(e);
                }
                self.execute(&req, &payload_buf[..plen], cost, out, false, scope);
                if payload_buf.len() > RETAIN_BYTES {
                    *payload_buf = Vec::new();
                }
            }
            held.requests += 1;
            held.cost += cost;
            // An empty buffer here means a large read sent everything held
            // along with its data: those requests are done.
            if out.is_empty() || out.used >= BATCH_BYTES || out.replies >= BATCH_REPLIES {
                self.flush(out, held)?;
            }
        }
    }

    /// Read what has arrived (without blocking) until `len` bytes are
    /// buffered; with `wait`, look for the rest for up to the coalescing
    /// window too. Whether they are buffered.
    fn await_payload<R: Read + PendingInput>(
        &self,
        reader: &mut RequestReader<R>,
        len: usize,
        wait: bool,
        coalescing: &mut Backoff,
    ) -> io::Result<bool> {
        if len > reader.capacity() {
            return Ok(reader.buffer().len() >= len);
        }
        let start = Instant::now();
        loop {
            while reader.buffer().len() < len && reader.get_mut().input_ready() {
                if reader.fill_more()? == 0 {
                    break;
                }
            }
            if reader.buffer().len() >= len || !wait {
                return Ok(reader.buffer().len() >= len);
            }
            let left = COALESCE_NS.saturating_sub(start.elapsed().as_nanos() as u64);
            if left == 0 || !wait_readable(self.probe, coalescing, left) {
                return Ok(false);
            }
        }
    }

    /// Whether a write of `len` bytes still on its way is received into
    /// memory the layer lends.
    fn lends_for(&self, len: usize) -> bool {
        len >= LEND_WRITE_MIN && self.layer.caps().lend_write
    }

    /// Run a WRITE whose payload is still arriving by receiving it into
    /// memory the layer lends (ABI 1.2 `pwrite_lend`) rather than into a
    /// buffer the layer then copies from: each part, once it has arrived,
    /// is read from the socket straight to where it belongs. The layer is
    /// only ever called for data already here, so it never holds its locks
    /// while the client takes its time; a client that sends in dribbles
    /// has them gathered in the read buffer first. The payload is consumed
    /// whatever happens to the request (framing). Appends the reply to
    /// `out`; an error is the connection's.
    fn receive_write<R: Read + PendingInput>(
        &self,
        req: &Request,
        reader: &mut RequestReader<R>,
        len: usize,
        out: &mut OutBuf,
    ) -> io::Result<()> {
        let fua = req.flags & CMD_FLAG_FUA != 0;
        // The whole write is checked before any part of it is written, and
        // every part but the last is a whole number of minimum blocks (the
        // layer is promised aligned calls).
        let mut failed = self.check(req).and_then(|()| self.layer.check_write(len as u64, req.offset)).err();
        let block = (self.layer.caps().block_size.minimum as usize).max(1);
        let part_min = LEND_WRITE_MIN.max(block);
        // Only a plain socket's reads fill lent memory through the kernel
        // (under TLS the plaintext is copied from rustls's buffer).
        let kernel_fill = reader.get_mut().fills_through_kernel() && crate::transport::can_fill_lent();
        let (mut done, mut waited, mut slept, mut measured) = (0, false, false, false);
        while done < len {
            let want = len - done;
            let here = reader.buffer().len() + reader.get_mut().available()?;
            if here < want.min(part_min) {
                if !waited {
                    reader.get_mut().wait_for_input()?;
                    waited = true;
                } else if reader.fill_more()? == 0 {
                    // Woken and still short: take what came into the read
                    // buffer (so this never spins), or the stream ended.
                    // (A full buffer holds more than `part_min`, at most
                    // 64 KiB.)
                    return Err(crate::transport::eof());
                } else {
                    waited = false;
                }
                continue;
            }
            waited = false;
            let n = if here >= want { want } else { here - here % block };
            if failed.is_some() {
                reader.skip(n)?;
                done += n;
                continue;
            }
            let (mut taken, mut short, mut unwritable, mut broken, mut sunk) = (0, false, false, None, false);
            let start = self.start_measuring(CMD_WRITE);
            measured |= start.is_some();
            let (at, last) = (req.offset + done as u64, done + n == len);
            let r = self.layer.write_lend(n as u64, at, fua, last, kernel_fill, &mut |pieces| {
                sunk = true;
                // Only what is here: the layer holds its locks meanwhile.
                match reader.read_pieces_now(pieces, &mut taken, kernel_fill) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        short = true;
                        Err(libc::EIO)
                    }
                    // The layer's memory faulted (a mapped file that shrank,
                    // or a hole with no room to allocate): this write fails,
                    // the stream is intact (the kernel took nothing it could
                    // not store).
                    Err(e) if e.raw_os_error() == Some(libc::EFAULT) => {
                        unwritable = true;
                        Err(libc::EIO)
                    }
                    Err(e) => {
                        broken = Some(e);
                        Err(libc::EIO)
                    }
                }
            });
            if !sunk && r.as_ref().is_err_and(|e| e.errno == NbdErrno::NotSup) {
                // Declined (ABI 1.5): the rest of the write through a buffer
                // and one `pwrite`, as for a layer that does not lend (the
                // client is sending it; the layer holds nothing meanwhile).
                let rest = len - done;
                let mut buf = self.payload_buffer(rest);
                reader.read_exact(&mut buf[..rest])?;
                if let Err(e) = self.layer.write(&buf[..rest], at, fua) {
                    failed = Some(e);
                }
                self.recycle(buf);
                slept |= start.is_some_and(|before| layer_sleeps() > before);
                done = len;
                continue;
            }
            slept |= start.is_some_and(|before| layer_sleeps() > before);
            if let Some(e) = broken {
                return Err(e);
            }
            // The rest of this part, if the layer failed (or lent the wrong
            // pieces) before it was read, or less was here than counted;
            // read now that the layer has let go.
            reader.skip(n - taken)?;
            done += n;
            if short {
                failed = Some(OpError::new(NbdErrno::Io, format!(
                    "WRITE: {} of {n} bytes counted as received were not there (is the client sending out-of-band data?)",
                    n - taken
                )));
            } else if unwritable {
                failed = Some(OpError::new(NbdErrno::Io, format!(
                    "WRITE {at}+{n}: the memory the layer lent for it faulted after {taken} bytes (a mapped file that shrank, or no room to allocate?)"
                )));
            } else if let Err(e) = r {
                failed = Some(e);
            }
        }
        if measured {
            self.note_slept(CMD_WRITE, slept);
        }
        match failed {
            None => out.ok(req),
            Some(e) => {
                self.log_failure(req, &e);
                out.error(req, &e, None, true);
            }
        }
        Ok(())
    }

    /// The client is idle: give back what large requests made this
    /// connection keep, so many idle connections cost little memory.
    fn release_buffers(&self, out: &mut OutBuf, payload_buf: &mut Vec<u8>) {
        if out.buf.capacity() + payload_buf.capacity() > 0 {
            log::debug!("{}: idle; releasing its request buffers", self.peer);
        }
        out.release();
        *payload_buf = Vec::new();
        self.payloads.lock().unwrap_or_else(|e| e.into_inner()).clear();
        *self.spill.lock().unwrap_or_else(|e| e.into_inner()) = Vec::new();
    }

    /// A buffer of at least `len` initialised bytes for a payload: a
    /// recycled one if possible. (Reading into spare capacity would zero it
    /// first on every request; fresh memory costs page faults.)
    fn payload_buffer(&self, len: usize) -> Vec<u8> {
        let mut pool = self.payloads.lock().unwrap_or_else(|e| e.into_inner());
        match pool.iter().position(|b| b.len() >= len) {
            Some(i) => pool.swap_remove(i),
            None => vec![0u8; len],
        }
    }

    /// Keep a payload buffer for reuse (a few, of bounded size).
    fn recycle(&self, buf: Vec<u8>) {
        if buf.is_empty() || buf.len() > RETAIN_BYTES {
            return;
        }
        let mut pool = self.payloads.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < POOLED_PAYLOADS {
            pool.push(buf);
        }
    }

    /// Whether requests like `command` are quick enough to run on the
    /// reader's thread.
    fn runs_inline(&self, command: u16) -> bool {
        self.blocking[kind(command)].load(Ordering::Relaxed) < BLOCKING_SHARE_MAX
    }

    /// Where a request's measurement starts (parallel pipelines only, one
    /// request in [`MEASURE_EVERY`]).
    fn start_measuring(&self, command: u16) -> Option<std::ffi::c_long> {
        if !self.parallel {
            return None;
        }
        let n = REQUESTS_STARTED.with(|c| {
            let c = &c[kind(command)];
            let n = c.get();
            c.set(n.wrapping_add(1));
            n
        });
        n.is_multiple_of(MEASURE_EVERY).then(layer_sleeps)
    }

    /// Feed whether a request slept into its kind's moving average.
    fn record(&self, command: u16, start: Option<std::ffi::c_long>) {
        let Some(before) = start else { return };
        self.note_slept(command, layer_sleeps() > before);
    }

    /// Feed whether a request slept into its kind's moving average
    /// (parallel pipelines only).
    fn note_slept(&self, command: u16, slept: bool) {
        if !self.parallel {
            return;
        }
        // Racy read-modify-write between threads: it is an estimate.
        let avg = &self.blocking[kind(command)];
        let old = avg.load(Ordering::Relaxed);
        avg.store(old - old / 4 + if slept { 1024 / 4 } else { 0 }, Ordering::Relaxed);
    }

    /// Count a request of `cost` bytes in flight if there is room now.
    fn try_admit(&self, cost: usize) -> bool {
        let mut f = self.flight.lock().unwrap_or_else(|e| e.into_inner());
        if !f.has_room(cost) {
            return false;
        }
        self.count_in(&mut f, cost);
        true
    }

    /// Wait until a request of `cost` bytes may be in flight, then count it.
    fn admit(&self, cost: usize) {
        let mut f = self.flight.lock().unwrap_or_else(|e| e.into_inner());
        while !f.has_room(cost) {
            f.waiters += 1;
            f = self.flight_changed.wait(f).unwrap_or_else(|e| e.into_inner());
            f.waiters -= 1;
        }
        self.count_in(&mut f, cost);
    }

    fn count_in(&self, f: &mut Flight, cost: usize) {
        f.requests += 1;
        f.bytes += cost;
        self.busy.store(f.requests, Ordering::SeqCst);
    }

    /// `requests` requests (of `cost` bytes in all) have had their last
    /// reply written.
    fn finish(&self, requests: usize, cost: usize) {
        let mut f = self.flight.lock().unwrap_or_else(|e| e.into_inner());
        f.requests -= requests;
        f.bytes -= cost;
        self.busy.store(f.requests, Ordering::SeqCst);
        if f.waiters > 0 {
            self.flight_changed.notify_all();
        }
    }

    fn wait_idle(&self) {
        let mut f = self.flight.lock().unwrap_or_else(|e| e.into_inner());
        while f.requests > 0 {
            f.waiters += 1;
            f = self.flight_changed.wait(f).unwrap_or_else(|e| e.into_inner());
            f.waiters -= 1;
        }
    }

    // ------------------------------------------------------------ workers

    fn push<'s>(&'s self, job: Job, scope: &'s Scope<'s, '_>) {
        let (spawn, wake) = {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            q.jobs.push_back(job);
            let spawn = q.idle == 0 && q.workers < MAX_WORKERS;
            if spawn {
                q.workers += 1;
            }
            // Busy workers pick the job up when they come back for more;
            // only a sleeping one needs a (syscall) wake-up.
            (spawn, q.idle > 0)
        };
        if spawn {
            let me: &'s Self = self;
            let ok =
                std::thread::Builder::new().name("nbd-worker".into()).spawn_scoped(scope, move || me.worker(scope));
            if let Err(e) = ok {
                log::warn!("{}: cannot start a worker thread ({e}); continuing with fewer", self.peer);
                let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                q.workers -= 1;
                if q.workers == 0 {
                    // Nobody would run the job: run it here instead.
                    let job = q.jobs.pop_back();
                    drop(q);
                    if let Some(job) = job {
                        self.run_job(job, &mut OutBuf::new(self.mode), scope);
                    }
                }
                return;
            }
        }
        if wake {
            self.work_ready.notify_one();
        }
    }

    fn close_queue(&self) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.work_ready.notify_all();
    }

    fn worker<'s>(&'s self, scope: &'s Scope<'s, '_>) {
        let mut out = OutBuf::new(self.mode);
        loop {
            let job = {
                let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if let Some(j) = q.jobs.pop_front() {
                        break Some(j);
                    }
                    if q.closed {
                        q.workers -= 1;
                        break None;
                    }
                    q.idle += 1;
                    q = self.work_ready.wait(q).unwrap_or_else(|e| e.into_inner());
                    q.idle -= 1;
                }
            };
            let Some(job) = job else { return };
            self.run_job(job, &mut out, scope);
        }
    }

    fn run_job<'s>(&'s self, job: Job, out: &mut OutBuf, scope: &'s Scope<'s, '_>) {
        let r = match job {
            Job::Request { req, payload, len, cost } => {
                let complete = self.execute(&req, &payload[..len], cost, out, true, scope);
                self.recycle(payload);
                let r = self.writer.send(out);
                if complete {
                    self.finish(1, cost);
                }
                r
            }
            Job::Piece { read, offset, len } => self.piece(&read, offset, len, out),
        };
        if let Err(e) = r {
            // The client went away mid-reply; the reader will see EOF.
            log::debug!("{}: writing a reply failed: {e}", self.peer);
        }
    }

    // ------------------------------------------------------------ requests

    /// Protocol-level checks: known command, flags valid for it and
    /// advertised, command enabled by the transmission flags, size limits.
    /// Range and permission checks belong to the pipeline.
    fn check(&self, req: &Request) -> Result<(), OpError> {
        let cmd = name(req.command);
        let advertised = |f: u16| self.tflags & f != 0;
        let extended = self.mode == ReplyMode::Extended;
        let mut allowed: u16 = CMD_FLAG_FUA
            | match req.command {
                CMD_READ => CMD_FLAG_DF,
                CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
                CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE => 0,
                other => return Err(OpError::inval(format!("unknown command {other}"))),
            };
        if extended && req.command == CMD_WRITE {
            allowed |= CMD_FLAG_PAYLOAD_LEN;
        }
        if req.flags & !allowed != 0 {
            return Err(OpError::inval(format!(
                "{cmd}: flags {:#x} are not valid for this command",
                req.flags & !allowed
            )));
        }
        if req.flags & CMD_FLAG_FUA != 0 && !advertised(TFLAG_SEND_FUA) {
            return Err(OpError::inval(format!("{cmd}: FUA was not negotiated")));
        }
        if req.flags & CMD_FLAG_DF != 0 && !advertised(TFLAG_SEND_DF) {
            return Err(OpError::inval("READ: DF requires structured replies"));
        }
        if req.flags & CMD_FLAG_FAST_ZERO != 0 && !advertised(TFLAG_SEND_FAST_ZERO) {
            return Err(OpError::inval("WRITE_ZEROES: FAST_ZERO was not negotiated"));
        }
        let write_type = matches!(req.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        if write_type && advertised(TFLAG_READ_ONLY) {
            return Err(OpError::new(NbdErrno::Perm, format!("{cmd}: export `{}` is read-only", self.export)));
        }
        let needs = match req.command {
            CMD_FLUSH => Some(TFLAG_SEND_FLUSH),
            CMD_TRIM => Some(TFLAG_SEND_TRIM),
            CMD_WRITE_ZEROES => Some(TFLAG_SEND_WRITE_ZEROES),
            CMD_CACHE => Some(TFLAG_SEND_CACHE),
            _ => None,
        };
        if let Some(f) = needs {
            if !advertised(f) {
                return Err(OpError::inval(format!("{cmd} is not supported by export `{}`", self.export)));
            }
        }
        if req.command == CMD_BLOCK_STATUS && self.allocation_context.is_none() {
            return Err(OpError::inval("BLOCK_STATUS: no metadata context was negotiated for this export"));
        }
        if req.command == CMD_FLUSH && (req.offset != 0 || req.length != 0) {
            return Err(OpError::inval("FLUSH: offset and length must be 0"));
        }
        // Range and alignment are the pipeline's to check; the payload limit
        // is checked here too because a READ's buffer is sized from it.
        if matches!(req.command, CMD_READ | CMD_WRITE) {
            let max = self.layer.caps().block_size.maximum as u64;
            if req.command == CMD_READ && req.flags & CMD_FLAG_DF != 0 && req.length > max {
                return Err(OpError::new(
                    NbdErrno::Overflow,
                    format!("READ: {} bytes cannot be sent unfragmented (maximum {max})", req.length),
                ));
            }
            self.layer.check_payload(req.length, cmd)?;
        }
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(OpError::new(NbdErrno::Shutdown, "server is shutting down"));
        }
        Ok(())
    }

    fn log_failure(&self, req: &Request, e: &OpError) {
        if e.errno == NbdErrno::Io {
            log::warn!("{}: {} {}+{}: {}", self.peer, name(req.command), req.offset, req.length, e.message);
        } else {
            log::debug!("{}: {} {}+{}: {}", self.peer, name(req.command), req.offset, req.length, e);
        }
    }

    /// Run one request and append its whole reply to `out`. Returns false
    /// when the reply was left to the pieces of a split read (only on a
    /// worker), whose last one finishes the request.
    fn execute<'s>(
        &'s self,
        req: &Request,
        payload: &[u8],
        cost: usize,
        out: &mut OutBuf,
        on_worker: bool,
        scope: &'s Scope<'s, '_>,
    ) -> bool {
        if let Err(e) = self.check(req) {
            self.log_failure(req, &e);
            out.error(req, &e, None, true);
            return true;
        }
        let start = self.start_measuring(req.command);
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let result = match req.command {
            CMD_READ => {
                let complete = self.read(req, cost, out, on_worker, scope);
                if complete {
                    self.record(CMD_READ, start);
                }
                return complete;
            }
            CMD_BLOCK_STATUS => {
                self.block_status(req, out);
                self.record(req.command, start);
                return true;
            }
            CMD_WRITE => self.layer.write(payload, req.offset, fua),
            CMD_FLUSH => self.layer.flush(),
            CMD_TRIM => self.layer.trim(req.length, req.offset, fua),
            CMD_WRITE_ZEROES => {
                let may_trim = req.flags & CMD_FLAG_NO_HOLE == 0;
                let fast = req.flags & CMD_FLAG_FAST_ZERO != 0;
                self.layer.zero(req.length, req.offset, may_trim, fast, fua)
            }
            CMD_CACHE => self.layer.cache(req.length, req.offset),
            _ => Err(OpError::inval(format!("unknown command {}", req.command))),
        };
        self.record(req.command, start);
        match result {
            Ok(()) => out.ok(req),
            Err(e) => {
                self.log_failure(req, &e);
                out.error(req, &e, None, true);
            }
        }
        true
    }

    fn block_status(&self, req: &Request, out: &mut OutBuf) {
        let context = self.allocation_context.expect("checked");
        let req_one = req.flags & CMD_FLAG_REQ_ONE != 0;
        match self.layer.extents(req.length, req.offset, req_one) {
            Ok(extents) => {
                // Never describe past the request: compact descriptors are
                // 32-bit, and REQ_ONE demands it.
                let end = req.offset + req.length;
                let mut pos = req.offset;
                let mut descriptors: Vec<(u64, u32)> = Vec::with_capacity(extents.len().min(MAX_EXTENTS));
                for e in extents {
                    if pos >= end || descriptors.len() >= MAX_EXTENTS {
                        break;
                    }
                    let len = e.length.min(end - pos);
                    let mut flags = 0;
                    if e.flags & EXTENT_HOLE != 0 {
                        flags |= STATE_HOLE;
                    }
                    if e.flags & EXTENT_ZERO != 0 {
                        flags |= STATE_ZERO;
                    }
                    descriptors.push((len, flags));
                    pos += len;
                }
                out.block_status(req, context, &descriptors);
            }
            Err(e) => {
                self.log_failure(req, &e);
                out.error(req, &e, None, true);
            }
        }
    }

    // ------------------------------------------------------------ reads

    /// Append a READ's reply to `out`; false if a split read took it over.
    fn read<'s>(
        &'s self,
        req: &Request,
        cost: usize,
        out: &mut OutBuf,
        on_worker: bool,
        scope: &'s Scope<'s, '_>,
    ) -> bool {
        let len = req.length as usize;
        if self.mode == ReplyMode::Simple {
            if let Err(e) = self.data_run(req, req.offset, len, true, out) {
                self.log_failure(req, &e);
                out.error(req, &e, None, true);
            }
            return true;
        }
        if len == 0 {
            out.done(req);
            return true;
        }
        let df = req.flags & CMD_FLAG_DF != 0;
        // Most reads are one data run: keep that on the stack.
        let whole = [(req.offset, req.length, false)];
        let sparse;
        let segments: &[(u64, u64, bool)] = if !df && req.length >= SPARSE_READ_MIN && self.layer.caps().extents {
            sparse = self.segments(req);
            &sparse
        } else {
            &whole
        };
        // Pieces only pay off where reads are slow enough to be on workers:
        // on the reader's thread one chunk per run costs client and server
        // the least.
        let data_bytes: u64 = segments.iter().filter(|s| !s.2).map(|s| s.1).sum();
        if on_worker && self.split_reads && !df && data_bytes >= SPLIT_READ_MIN && !self.runs_inline(CMD_READ) {
            self.split_read(*req, cost, segments, out, scope);
            return false;
        }
        self.read_runs(req, segments, out);
        true
    }

    /// Data and hole runs of a read, from the layer's extents. Any failure
    /// to get extents just means "all data".
    fn segments(&self, req: &Request) -> Vec<(u64, u64, bool)> {
        match self.layer.extents(req.length, req.offset, false) {
            Ok(extents) => {
                // Holes aligned to the minimum block keep the data runs
                // around them readable from the layer.
                let align = HOLE_ALIGN.max(self.layer.caps().block_size.minimum as u64);
                read_segments(req.offset, req.length, &extents, align)
            }
            Err(_) => vec![(req.offset, req.length, false)],
        }
    }

    /// Append the runs in order, the last chunk carrying DONE.
    fn read_runs(&self, req: &Request, segments: &[(u64, u64, bool)], out: &mut OutBuf) {
        let df = req.flags & CMD_FLAG_DF != 0;
        for (i, &(off, len, hole)) in segments.iter().enumerate() {
            let last = i + 1 == segments.len();
            if hole {
                Self::holes(req, off, len, last, out);
                continue;
            }
            if let Err(e) = self.data_run(req, off, len as usize, last, out) {
                self.log_failure(req, &e);
                // Nothing sent covers `off` yet: report it there. With DF
                // (a single chunk) plain ERROR is the only honest form.
                let at = if df || i == 0 { None } else { Some(off) };
                out.error(req, &e, at, true);
                return;
            }
        }
    }

    /// One data run of a read (the whole reply in simple mode): lent by
    /// the layer and sent from its memory where possible, else read into
    /// `out`. On failure nothing of it was sent.
    fn data_run(&self, req: &Request, offset: u64, len: usize, done: bool, out: &mut OutBuf) -> Result<(), OpError> {
        let sock = match self.plain {
            Some(sock) if len >= LEND_MIN && self.layer.caps().lend && can_copy_lent() => sock,
            _ => return out.data(self.layer, req, offset, len, done),
        };
        let (mode, measure) = self.lend.choose();
        let start = measure.then(thread_cpu_ns);
        let went_its_way = match mode {
            RunMode::Lend => self.lend_run(sock, req, offset, len, done, out)?,
            RunMode::Copy => self.copy_run(sock, req, offset, len, done, out).map(|()| true)?,
        };
        // A run the layer declined to lend was only read, not sent: it says
        // nothing about what either way costs.
        if went_its_way {
            if mode == RunMode::Lend {
                self.lend.lent.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(start) = start {
                self.lend.record(mode, len, thread_cpu_ns().saturating_sub(start));
            }
        }
        Ok(())
    }

    /// Read a data run into `out` and send it with what `out` holds, as
    /// [`Self::lend_run`] does, so the two cost the same things when the
    /// [`LendGovernor`] compares them.
    fn copy_run(
        &self,
        sock: &Stream,
        req: &Request,
        offset: u64,
        len: usize,
        done: bool,
        out: &mut OutBuf,
    ) -> Result<(), OpError> {
        out.data(self.layer, req, offset, len, done)?;
        if let Err(e) = waiting_for_client(self.parallel, || self.writer.send(out)) {
            self.end_stream(sock, &e);
        }
        Ok(())
    }

    /// A write of read data failed with part of a reply possibly on the
    /// wire: the stream cannot go on. Shut the socket, so the reader finds
    /// out from it and the connection ends.
    fn end_stream(&self, sock: &Stream, e: &io::Error) {
        log::debug!("{}: writing a reply failed: {e}", self.peer);
        let _ = sock.shutdown(std::net::Shutdown::Both);
    }

    /// Send a data run straight from the layer's memory: what `out` holds,
    /// the chunk header and the lent pieces go in one non-blocking vectored
    /// send while the layer keeps them stable; whatever the socket did not
    /// take is copied and sent after the layer lets go, so a slow client
    /// never makes the layer hold its locks. The reply lock is held
    /// throughout, so nothing interleaves. False if the layer declined to
    /// lend: the run was then read into `out`, to go out with it.
    fn lend_run(
        &self,
        sock: &Stream,
        req: &Request,
        offset: u64,
        len: usize,
        done: bool,
        out: &mut OutBuf,
    ) -> Result<bool, OpError> {
        let mark = (out.used, out.replies);
        out.data_header(req, offset, len, done);
        let mut w = self.writer.inner.lock().unwrap_or_else(|e| e.into_inner());
        // Under the reply lock, so no other thread of the connection uses it.
        let mut rest = self.spill.lock().unwrap_or_else(|e| e.into_inner());
        rest.clear();
        let mut broken: Option<io::Error> = None;
        // The lent memory could not be read (EFAULT).
        let mut unreadable = false;
        // Bytes of `out` and the run that the socket took; None: no send
        // went through.
        let mut took: Option<usize> = None;
        // The layer called the sink (did not decline or fail first).
        let mut sunk = false;
        let r = {
            let head = out.bytes();
            self.layer.read_lend(len as u64, offset, &mut |pieces: &[&[u8]]| {
                sunk = true;
                if pieces.iter().map(|p| p.len()).sum::<usize>() != len {
                    return Err(libc::EIO);
                }
                let mut all: Vec<&[u8]> = Vec::with_capacity(pieces.len() + 1);
                all.push(head);
                all.extend_from_slice(pieces);
                match sock.send_nonblocking(&all) {
                    Ok(n) => {
                        took = Some(n);
                        if !copy_unsent(&all, n, &mut rest) {
                            unreadable = true;
                            return Err(libc::EFAULT);
                        }
                        Ok(())
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EFAULT) => {
                        unreadable = true;
                        Err(libc::EFAULT)
                    }
                    Err(e) => {
                        broken = Some(e);
                        Err(libc::EPIPE)
                    }
                }
            })
        };
        let cannot_be_read = || OpError::new(NbdErrno::Io, "READ: the layer lent memory that cannot be read");
        if took.is_none() && broken.is_none() {
            (out.used, out.replies) = mark;
            if !sunk && r.as_ref().is_err_and(|e| e.errno == NbdErrno::NotSup) {
                // Declined (ABI 1.3: ENOTSUP before the sink): this range
                // is read the usual way, without the reply lock held.
                drop(rest);
                drop(w);
                return out.data(self.layer, req, offset, len, done).map(|()| false);
            }
            if unreadable {
                return Err(cannot_be_read());
            }
            return r.and(Err(OpError::new(NbdErrno::Io, "READ: the layer lent nothing")));
        }
        // A fault before any byte of this run's chunk left (the socket took
        // only held replies, or part of them) lets the run fail on its own:
        // only the rest of the held replies goes out.
        let fails_alone = unreadable && took.is_some_and(|n| n <= mark.0);
        if fails_alone {
            rest.truncate(mark.0 - took.unwrap_or(0));
        } else if unreadable {
            log::warn!(
                "{}: READ {offset}+{len}: the layer's lent memory stopped being readable while it was sent \
                 (a mapped file truncated?); closing the connection, whose reply cannot be completed",
                self.peer
            );
        } else if let (Err(e), Some(_)) = (&r, took) {
            log::warn!("{}: READ {offset}+{len}: the layer failed after lending its data: {e}", self.peer);
        }
        out.clear();
        let finished = match broken {
            Some(e) => Err(e),
            None => {
                waiting_for_client(self.parallel && !rest.is_empty(), || w.write_all(&rest).and_then(|()| w.flush()))
            }
        };
        if rest.capacity() > RETAIN_BYTES {
            *rest = Vec::new();
        }
        if let Err(e) = finished {
            self.end_stream(sock, &e);
        } else if unreadable && !fails_alone {
            // Held replies before this run went out whole; this run's chunk
            // is cut short, so the client must see the stream end here.
            let _ = sock.shutdown(std::net::Shutdown::Both);
        }
        if fails_alone {
            return Err(cannot_be_read());
        }
        Ok(true)
    }

    fn holes(req: &Request, mut off: u64, mut len: u64, done: bool, out: &mut OutBuf) {
        // The hole size field is 32 bits.
        let max = (u32::MAX as u64) / HOLE_ALIGN * HOLE_ALIGN;
        while len > 0 {
            let n = len.min(max);
            out.hole(req, off, n as u32, done && n == len);
            off += n;
            len -= n;
        }
    }

    /// Hand the data runs of a read to workers in pieces; send the holes
    /// from here. The last to finish sends the final NONE chunk.
    fn split_read<'s>(
        &'s self,
        req: Request,
        cost: usize,
        segments: &[(u64, u64, bool)],
        out: &mut OutBuf,
        scope: &'s Scope<'s, '_>,
    ) {
        let mut pieces = Vec::new();
        for &(off, len, hole) in segments {
            if hole {
                continue;
            }
            let mut o = off;
            while o < off + len {
                let n = SPLIT_PIECE.min(off + len - o);
                pieces.push((o, n as usize));
                o += n;
            }
        }
        // One share for us (we send the holes), one per piece.
        let read = Arc::new(SplitRead { req, pending: AtomicUsize::new(pieces.len() + 1), cost });
        for (offset, len) in pieces {
            self.push(Job::Piece { read: read.clone(), offset, len }, scope);
        }
        for &(off, len, hole) in segments {
            if hole {
                Self::holes(&req, off, len, false, out);
            }
        }
        if let Err(e) = self.writer.send(out).and_then(|()| self.piece_done(&read, out)) {
            log::debug!("{}: writing a reply failed: {e}", self.peer);
        }
    }

    fn piece(&self, read: &SplitRead, offset: u64, len: usize, out: &mut OutBuf) -> io::Result<()> {
        let start = self.start_measuring(CMD_READ);
        if let Err(e) = out.data(self.layer, &read.req, offset, len, false) {
            self.log_failure(&read.req, &e);
            out.error(&read.req, &e, Some(offset), false);
        }
        self.record(CMD_READ, start);
        let r = self.writer.send(out);
        r.and(self.piece_done(read, out))
    }

    fn piece_done(&self, read: &SplitRead, out: &mut OutBuf) -> io::Result<()> {
        if read.pending.fetch_sub(1, Ordering::AcqRel) != 1 {
            return Ok(());
        }
        out.done(&read.req);
        let r = self.writer.send(out);
        self.finish(1, read.cost);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn unsent_bytes_are_copied_from_where_the_send_stopped() {
        let (head, a, b) = ([1u8, 2, 3], vec![4u8; 5000], vec![5u8; 70_000]);
        for skip in [0, 2, 3, 4000, 5003, 75_003] {
            let mut rest = Vec::new();
            assert!(copy_unsent(&[&head, &a, &b], skip, &mut rest));
            let all: Vec<u8> = [&head[..], &a, &b].concat();
            assert_eq!(rest, all[skip..], "skip {skip}");
        }
    }

    /// Runs of 1 MiB through `g` whose CPU cost is `cost(mode, i)` ns for
    /// the i-th run; the share of them that were lent.
    fn lent_share(g: &LendGovernor, runs: u32, cost: impl Fn(RunMode, u32) -> u64) -> f64 {
        let mut lent = 0;
        for i in 0..runs {
            let (mode, measure) = g.choose();
            if mode == RunMode::Lend {
                lent += 1;
            }
            if measure {
                g.record(mode, 1 << 20, cost(mode, i));
            }
        }
        lent as f64 / runs as f64
    }

    #[test]
    fn the_cheaper_way_is_chosen_and_the_other_looked_at_now_and_then() {
        let g = LendGovernor::default();
        // Both ways are tried (and timed) at once: lending first, then
        // copying.
        assert_eq!(g.choose(), (RunMode::Lend, true));
        g.record(RunMode::Lend, 1 << 20, 200_000);
        assert_eq!(g.choose(), (RunMode::Copy, true));
        g.record(RunMode::Copy, 1 << 20, 260_000);
        // Lending costs less: it gets all runs but the one in 32 that
        // keeps copying's figure fresh.
        let share = lent_share(&g, 3200, |m, _| if m == RunMode::Lend { 200_000 } else { 260_000 });
        assert!((share - 31.0 / 32.0).abs() < 0.005, "{share}");
        // Sockets fill and lending gets dearer: copying takes over within
        // a few of lending's own runs...
        let share = lent_share(&g, 3200, |m, _| if m == RunMode::Lend { 400_000 } else { 260_000 });
        assert!(share < 1.0 / 32.0 + 0.005 && share > 1.0 / 64.0, "{share}");
        // ...and gives the runs back when lending is cheap again (it is
        // looked at once in 32 runs, so that takes a few hundred).
        let share = lent_share(&g, 3200, |m, _| if m == RunMode::Lend { 150_000 } else { 260_000 });
        assert!(share > 0.85, "{share}");
        let share = lent_share(&g, 3200, |m, _| if m == RunMode::Lend { 150_000 } else { 260_000 });
        assert!((share - 31.0 / 32.0).abs() < 0.005, "{share}");
    }

    #[test]
    fn the_clock_is_read_for_one_cheaper_run_in_four_and_every_other_one() {
        let g = LendGovernor::default();
        lent_share(&g, 2, |_, _| 200_000);
        let (mut timed, mut timed_other) = (0, 0);
        for _ in 0..3200 {
            let (mode, measure) = g.choose();
            if measure {
                timed += 1;
                if mode == RunMode::Copy {
                    timed_other += 1;
                }
                g.record(mode, 1 << 20, if mode == RunMode::Lend { 200_000 } else { 260_000 });
            }
        }
        assert_eq!(timed_other, 100, "every one of the 100 copied runs");
        // Runs 2..3202 of the connection: the multiples of 4 among them.
        assert_eq!(timed, 100 + 800, "{timed}");
    }

    #[test]
    fn a_first_run_that_paid_for_warming_up_is_forgotten() {
        let g = LendGovernor::default();
        g.record(RunMode::Lend, 1 << 20, 200_000);
        // Copying's first run grew the reply buffer: ten times the cost.
        g.record(RunMode::Copy, 1 << 20, 1_500_000);
        g.record(RunMode::Lend, 1 << 20, 200_000);
        g.record(RunMode::Copy, 1 << 20, 150_000);
        let c = |m: RunMode| g.cost[m as usize].load(Ordering::Relaxed);
        assert_eq!(c(RunMode::Copy), 150_000 * 16 / 1024);
        assert!(c(RunMode::Copy) < c(RunMode::Lend));
        assert_eq!(g.choose().0, RunMode::Copy);
    }

    #[test]
    fn one_outlier_does_not_flip_the_choice() {
        let g = LendGovernor::default();
        lent_share(&g, 128, |m, _| if m == RunMode::Lend { 200_000 } else { 240_000 });
        // A preempted run costs three times as much once (one of the first
        // four runs is timed).
        let share = lent_share(&g, 320, |m, i| match (m, i) {
            (RunMode::Lend, 0..4) => 600_000,
            (RunMode::Lend, _) => 200_000,
            (RunMode::Copy, _) => 240_000,
        });
        assert!(share >= 31.0 / 32.0 - 0.005, "{share}");
    }

    /// A lent page that faults (a mapped file truncated under the mapping)
    /// stops the copy where it is; a plain load would have been SIGBUS.
    #[test]
    fn lent_memory_that_faults_stops_the_copy_instead_of_the_server() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(3 * 4096).unwrap();
        // SAFETY: a read-only mapping of a file only this test uses; its
        // last two pages are made to fault on purpose and only the kernel
        // (process_vm_readv) reads them.
        let map = unsafe { memmap2::MmapOptions::new().len(3 * 4096).map(&file) }.unwrap();
        file.set_len(4096).unwrap();
        let head = [9u8; 10];
        let mut rest = Vec::new();
        assert!(!copy_unsent(&[&head, &map[..]], 4, &mut rest));
        assert_eq!(rest.len(), 6 + 4096, "our bytes and the page still backed by the file");
        assert!(rest[..6].iter().all(|&x| x == 9) && rest[6..].iter().all(|&x| x == 0));
        assert!(can_copy_lent());
    }

    fn extents() -> impl Strategy<Value = Vec<Extent>> {
        prop::collection::vec(
            (
                1u64..20_000,
                prop_oneof![Just(0u32), Just(EXTENT_HOLE | EXTENT_ZERO), Just(EXTENT_ZERO), Just(EXTENT_HOLE)],
            ),
            0..12,
        )
        .prop_map(|v| v.into_iter().map(|(length, flags)| Extent { length, flags }).collect())
    }

    proptest! {
        #[test]
        fn segments_cover_the_read_exactly_with_aligned_holes_only_over_zeros(
            offset in 0u64..100_000, length in 1u64..60_000, ext in extents()
        ) {
            let segs = read_segments(offset, length, &ext, HOLE_ALIGN);
            let end = offset + length;
            // Contiguous, non-empty, exact cover, merged.
            let mut pos = offset;
            for (i, &(o, l, hole)) in segs.iter().enumerate() {
                prop_assert_eq!(o, pos);
                prop_assert!(l > 0);
                if i > 0 {
                    prop_assert_ne!(segs[i - 1].2, hole, "neighbours not merged");
                }
                pos += l;
            }
            prop_assert_eq!(pos, end);
            // Every hole byte is inside an extent that reads as zeros, and
            // holes start 512-aligned and end aligned or at the request end.
            let zero_at = |b: u64| {
                let mut p = offset;
                for e in &ext {
                    if b < p + e.length {
                        return e.flags & EXTENT_ZERO != 0;
                    }
                    p += e.length;
                }
                false
            };
            for &(o, l, hole) in &segs {
                if hole {
                    prop_assert_eq!(o % HOLE_ALIGN, 0);
                    prop_assert!((o + l) % HOLE_ALIGN == 0 || o + l == end);
                    for b in [o, o + l / 2, o + l - 1] {
                        prop_assert!(zero_at(b), "hole byte {} is not in a zero extent", b);
                    }
                }
            }
        }
    }

    /// A 1 MiB disk whose byte at `o` is `o % 251`, failing reads that
    /// touch 512 KiB.
    struct Patterned;

    impl crate::pipeline::Layer for Patterned {
        fn name(&self) -> &str {
            "patterned"
        }
        fn provided(&self) -> crate::loader::Provided {
            crate::loader::Provided { get_size: true, pread: true, ..Default::default() }
        }
        fn get_size(&self) -> Result<u64, crate::loader::PluginError> {
            Ok(1 << 20)
        }
        fn block_size(&self) -> Result<Option<nbdhost_plugin_api::abi::BlockSize>, crate::loader::PluginError> {
            Ok(None)
        }
        fn can(&self, _: u32) -> Result<Option<u32>, crate::loader::PluginError> {
            Ok(None)
        }
        fn pread(&self, buf: &mut [u8], offset: u64, _: u32) -> Result<(), crate::loader::PluginError> {
            if (offset..offset + buf.len() as u64).contains(&(512 << 10)) {
                return Err(crate::loader::PluginError { errno: 5, message: "bad sector".into() });
            }
            for (i, b) in buf.iter_mut().enumerate() {
                *b = ((offset + i as u64) % 251) as u8;
            }
            Ok(())
        }
        fn pwrite(&self, _: &[u8], _: u64, _: u32) -> Result<(), crate::loader::PluginError> {
            unreachable!()
        }
        fn flush(&self, _: u32) -> Result<(), crate::loader::PluginError> {
            unreachable!()
        }
        fn trim(&self, _: u64, _: u64, _: u32) -> Result<(), crate::loader::PluginError> {
            unreachable!()
        }
        fn zero(&self, _: u64, _: u64, _: u32) -> Result<(), crate::loader::PluginError> {
            unreachable!()
        }
        fn cache(&self, _: u64, _: u64, _: u32) -> Result<(), crate::loader::PluginError> {
            unreachable!()
        }
        fn extents(
            &self,
            _: u64,
            _: u64,
            _: u32,
            _: &mut dyn FnMut(u64, u64, u32) -> Result<(), i32>,
        ) -> Result<(), crate::loader::PluginError> {
            unreachable!()
        }
    }

    fn patterned() -> CheckedLayer {
        CheckedLayer::new(Box::new(Patterned), true, crate::pipeline::RequestLock::none(), "t").unwrap()
    }

    fn read_req(cookie: u64, offset: u64, length: u64) -> Request {
        Request { flags: 0, command: CMD_READ, cookie, offset, length }
    }

    fn expected(offset: u64, len: usize) -> Vec<u8> {
        (0..len as u64).map(|i| ((offset + i) % 251) as u8).collect()
    }

    #[test]
    fn replies_are_built_back_to_back_with_data_behind_its_header() {
        let layer = patterned();
        let mut out = OutBuf::new(ReplyMode::Structured);
        let r1 = read_req(7, 4096, 100);
        out.data(&layer, &r1, 4096, 100, true).unwrap();
        let r2 = read_req(8, 0, 0);
        out.ok(&r2);
        out.hole(&r1, 9000, 512, false);
        let mut want = Vec::new();
        codec::encode_chunk_header(
            &mut want,
            ReplyMode::Structured,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            7,
            0,
            108,
        );
        want.extend_from_slice(&4096u64.to_be_bytes());
        want.extend_from_slice(&expected(4096, 100));
        want.extend_from_slice(codec::simple_reply(0, 8).as_bytes());
        codec::encode_chunk_header(&mut want, ReplyMode::Structured, 0, REPLY_TYPE_OFFSET_HOLE, 7, 0, 12);
        want.extend_from_slice(&9000u64.to_be_bytes());
        want.extend_from_slice(&512u32.to_be_bytes());
        assert_eq!(out.bytes(), &want[..]);
        assert_eq!(out.replies, 2, "the DONE data chunk and the simple reply end requests; the hole does not");
    }

    #[test]
    fn a_failed_read_leaves_nothing_behind_and_reused_space_holds_no_stale_bytes() {
        let layer = patterned();
        for mode in [ReplyMode::Simple, ReplyMode::Structured, ReplyMode::Extended] {
            let mut out = OutBuf::new(mode);
            let good = read_req(1, 0, 4096);
            out.data(&layer, &good, 0, 4096, true).unwrap();
            let before = out.bytes().to_vec();
            let bad = read_req(2, 500 << 10, 64 << 10);
            let e = out.data(&layer, &bad, 500 << 10, 64 << 10, true).unwrap_err();
            assert_eq!(e.errno, NbdErrno::Io);
            assert_eq!(out.bytes(), &before[..], "{mode:?}: the failed read's header was rolled back");
            assert_eq!(out.replies, 1);
            // Sent and cleared: the next, shorter reply is exactly itself.
            out.clear();
            let small = read_req(3, 100, 10);
            out.data(&layer, &small, 100, 10, true).unwrap();
            let tail = &out.bytes()[out.bytes().len() - 10..];
            assert_eq!(tail, &expected(100, 10)[..]);
            let header = if mode == ReplyMode::Simple {
                16
            } else if mode == ReplyMode::Extended {
                40
            } else {
                28
            };
            assert_eq!(out.bytes().len(), header + 10, "{mode:?}");
        }
    }

    #[test]
    fn an_unusually_large_reply_buffer_is_released_after_sending() {
        let layer = patterned();
        let mut out = OutBuf::new(ReplyMode::Structured);
        // Some 4 MiB of chunks for one request.
        let req = read_req(1, 0, 0);
        for i in 0..200_000u64 {
            out.hole(&req, i * 512, 512, false);
        }
        assert!(out.buf.len() > RETAIN_BYTES);
        out.clear();
        assert_eq!(out.buf.capacity(), 0, "released");
        out.data(&layer, &read_req(2, 0, 512), 0, 512, true).unwrap();
        assert_eq!(&out.bytes()[28..], &expected(0, 512)[..]);
    }

    #[test]
    fn sleeping_counts_as_a_voluntary_switch_and_computing_does_not() {
        let before = voluntary_switches();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(voluntary_switches() > before, "a sleep is a voluntary context switch");
        let before = voluntary_switches();
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        std::hint::black_box(x);
        assert_eq!(voluntary_switches(), before, "computing never gives the CPU up voluntarily");
    }

    /// A read that waits for its client to take the data it sends has not
    /// slept in the layer; waiting elsewhere still counts.
    #[test]
    fn waiting_for_the_client_is_not_the_layer_sleeping() {
        let nap = || std::thread::sleep(std::time::Duration::from_millis(2));
        let before = layer_sleeps();
        waiting_for_client(true, nap);
        assert_eq!(layer_sleeps(), before, "a wait for the client is left out");
        nap();
        assert!(layer_sleeps() > before, "a wait in the layer counts");
        // Where nothing is measured the wait is not even looked at.
        let before = layer_sleeps();
        waiting_for_client(false, nap);
        assert!(layer_sleeps() > before);
    }

    #[test]
    fn segments_without_extents_are_all_data() {
        assert_eq!(read_segments(100, 50, &[], HOLE_ALIGN), vec![(100, 50, false)]);
        let ext = [Extent { length: 4096, flags: EXTENT_ZERO | EXTENT_HOLE }, Extent { length: 4096, flags: 0 }];
        assert_eq!(read_segments(0, 8192, &ext, HOLE_ALIGN), vec![(0, 4096, true), (4096, 4096, false)]);
        assert_eq!(read_segments(0, 8192, &ext, 8192), vec![(0, 8192, false)], "holes shrink to the alignment");
        // A hole too small to align becomes data.
        let ext = [
            Extent { length: 100, flags: 0 },
            Extent { length: 300, flags: EXTENT_ZERO },
            Extent { length: 100, flags: 0 },
        ];
        assert_eq!(read_segments(0, 500, &ext, HOLE_ALIGN), vec![(0, 500, false)]);
    }
}
