//! The transmission phase: read requests, check them against what was
//! negotiated, run them against the export's checked pipeline, and reply.
//!
//! One reader (the connection's thread) keeps reading requests while earlier
//! ones run on worker threads, started as needed up to a limit that depends
//! on the pipeline's thread model. Replies go out as soon as they are ready,
//! out of order, each written whole by the [`ReplyWriter`]. Memory per
//! connection is bounded: the reader stops reading while the requests in
//! flight hold more than [`MAX_IN_FLIGHT_BYTES`]. On a parallel pipeline a
//! large READ is split into pieces read concurrently and sent as separate
//! OFFSET_DATA chunks as each completes; holes reported by the layer's
//! extents go out as OFFSET_HOLE chunks without being read at all.

use super::codec::{self, ReplyMode, Request};
use super::consts::*;
use super::handshake::Session;
use crate::error::{NbdErrno, OpError};
use crate::pipeline::{CheckedLayer, Extent};
use nbdhost_plugin_api::abi::{EXTENT_HOLE, EXTENT_ZERO};
use nbdhost_plugin_api::ThreadModel;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::Scope;

/// Most bytes (payloads plus read data) the requests in flight on one
/// connection may hold before the reader waits.
pub const MAX_IN_FLIGHT_BYTES: usize = 64 << 20;
/// Most requests in flight on one connection.
pub const MAX_IN_FLIGHT_REQUESTS: usize = 1024;
/// Worker threads per connection on a parallel pipeline.
pub const MAX_WORKERS: usize = 16;
/// Reads at least this long consult the layer's extents for holes.
pub const SPARSE_READ_MIN: u64 = 64 * 1024;
/// Reads at least this long are split into pieces on a parallel pipeline.
pub const SPLIT_READ_MIN: u64 = 1024 * 1024;
/// Size of one piece of a split read.
pub const SPLIT_PIECE: u64 = 256 * 1024;
/// Most descriptors in one block-status chunk (the spec's SHOULD).
pub const MAX_EXTENTS: usize = 1 << 20;
/// Holes in sparse reads are aligned to this (the spec's SHOULD).
const HOLE_ALIGN: u64 = 512;

/// Serialises replies: every reply or chunk (header plus data) is written
/// to the socket as one unbroken unit, whichever thread produced it.
pub struct ReplyWriter<W: Write> {
    inner: Mutex<W>,
    mode: ReplyMode,
}

impl<W: Write> ReplyWriter<W> {
    /// Wrap a writer for the negotiated reply mode.
    pub fn new(w: W, mode: ReplyMode) -> Self {
        ReplyWriter { inner: Mutex::new(w), mode }
    }

    fn send(&self, parts: &[&[u8]]) -> io::Result<()> {
        let mut w = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for p in parts {
            w.write_all(p)?;
        }
        w.flush()
    }

    fn chunk(&self, req: &Request, flags: u16, kind: u16, payload_len: u64) -> Vec<u8> {
        let mut h = Vec::with_capacity(48);
        codec::encode_chunk_header(&mut h, self.mode, flags, kind, req.cookie, req.offset, payload_len);
        h
    }

    /// Success without data.
    pub fn ok(&self, req: &Request) -> io::Result<()> {
        let mut h = Vec::with_capacity(32);
        match self.mode {
            ReplyMode::Extended => codec::encode_chunk_header(
                &mut h,
                self.mode,
                REPLY_FLAG_DONE,
                REPLY_TYPE_NONE,
                req.cookie,
                req.offset,
                0,
            ),
            _ => codec::encode_simple_reply(&mut h, 0, req.cookie),
        }
        self.send(&[&h])
    }

    /// The final NONE chunk of a structured reply.
    pub fn done(&self, req: &Request) -> io::Result<()> {
        let h = self.chunk(req, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0);
        self.send(&[&h])
    }

    /// A whole READ reply in simple mode.
    pub fn simple_data(&self, req: &Request, data: &[u8]) -> io::Result<()> {
        let mut h = Vec::with_capacity(16);
        codec::encode_simple_reply(&mut h, 0, req.cookie);
        self.send(&[&h, data])
    }

    /// An OFFSET_DATA chunk.
    pub fn data(&self, req: &Request, offset: u64, data: &[u8], done: bool) -> io::Result<()> {
        let flags = if done { REPLY_FLAG_DONE } else { 0 };
        let mut h = self.chunk(req, flags, REPLY_TYPE_OFFSET_DATA, 8 + data.len() as u64);
        h.extend_from_slice(&offset.to_be_bytes());
        self.send(&[&h, data])
    }

    /// An OFFSET_HOLE chunk (`len` must fit the 32-bit size field).
    pub fn hole(&self, req: &Request, offset: u64, len: u32, done: bool) -> io::Result<()> {
        let flags = if done { REPLY_FLAG_DONE } else { 0 };
        let mut h = self.chunk(req, flags, REPLY_TYPE_OFFSET_HOLE, 12);
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        self.send(&[&h])
    }

    /// A failed request. Structured modes carry the message (and the
    /// failing offset for ERROR_OFFSET); simple mode only the code.
    pub fn error(&self, req: &Request, e: &OpError, at: Option<u64>, done: bool) -> io::Result<()> {
        let mut h = Vec::with_capacity(64 + e.message.len());
        match self.mode {
            ReplyMode::Simple => codec::encode_simple_reply(&mut h, e.errno.code(), req.cookie),
            _ => {
                let flags = if done { REPLY_FLAG_DONE } else { 0 };
                codec::encode_error_chunk(
                    &mut h,
                    self.mode,
                    flags,
                    req.cookie,
                    req.offset,
                    e.errno.code(),
                    &e.message,
                    at,
                )
            }
        }
        self.send(&[&h])
    }

    /// The block-status reply for one context.
    pub fn block_status(&self, req: &Request, context: u32, extents: &[(u64, u32)]) -> io::Result<()> {
        let mut h = Vec::with_capacity(48 + 16 * extents.len());
        codec::encode_block_status(&mut h, self.mode, req.cookie, req.offset, context, extents);
        self.send(&[&h])
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

/// Work for a worker thread.
enum Job {
    /// A whole request (with its payload, if any).
    Request { req: Request, payload: Vec<u8>, cost: usize },
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
    max_workers: usize,
    split_reads: bool,
    queue: Mutex<Queue>,
    work_ready: Condvar,
    flight: Mutex<Flight>,
    flight_changed: Condvar,
    /// Requests in flight, visible to the server for shutdown decisions.
    busy: &'a AtomicUsize,
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
    /// is answered before this returns.
    pub fn serve<R: Read, W: Write + Send>(&mut self, reader: R, writer: W) -> io::Result<()> {
        let s = self.session;
        let parallel = s.export.thread_model == ThreadModel::Parallel;
        let conn = Conn {
            layer: &s.open.layer,
            writer: ReplyWriter::new(writer, s.mode),
            tflags: s.tflags,
            mode: s.mode,
            export: &s.export.name,
            peer: self.peer,
            shutting_down: self.shutting_down,
            allocation_context: s.allocation_context,
            max_workers: if parallel { MAX_WORKERS } else { 1 },
            split_reads: parallel && s.mode != ReplyMode::Simple,
            queue: Mutex::new(Queue::default()),
            work_ready: Condvar::new(),
            flight: Mutex::new(Flight::default()),
            flight_changed: Condvar::new(),
            busy: self.busy,
        };
        std::thread::scope(|scope| {
            let r = conn.read_requests(reader, scope);
            // Drain: every request read gets its reply before we close.
            conn.close_queue();
            conn.wait_idle();
            r
        })
    }
}

impl<'a, W: Write + Send> Conn<'a, W> {
    // ------------------------------------------------------------ reader

    fn read_requests<'s, R: Read>(&'s self, mut reader: R, scope: &'s Scope<'s, '_>) -> io::Result<()> {
        let extended = self.mode == ReplyMode::Extended;
        let hlen = codec::request_header_len(extended);
        let mut hdr = [0u8; 32];
        loop {
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
            let read_len = if req.command == CMD_READ { req.length.min(MAX_PAYLOAD_DEFAULT as u64) } else { 0 };
            let cost = plen as usize + read_len as usize;
            self.admit(cost);
            // The payload is on the wire whatever we decide about the
            // request: read it to keep framing.
            // (read_to_end fills spare capacity without zeroing it first.)
            let mut payload = Vec::with_capacity(plen as usize);
            let got = (&mut reader).take(plen).read_to_end(&mut payload);
            if got.is_err() || payload.len() as u64 != plen {
                self.finish(cost);
                return Err(got.err().unwrap_or_else(|| io::ErrorKind::UnexpectedEof.into()));
            }
            if req.command == CMD_DISC {
                self.finish(cost);
                log::debug!("{}: NBD_CMD_DISC", self.peer);
                return Ok(());
            }
            self.push(Job::Request { req, payload, cost }, scope);
        }
    }

    /// Wait until a request of `cost` bytes may be in flight, then count it.
    fn admit(&self, cost: usize) {
        let mut f = self.flight.lock().unwrap_or_else(|e| e.into_inner());
        while f.requests > 0 && (f.requests >= MAX_IN_FLIGHT_REQUESTS || f.bytes + cost > MAX_IN_FLIGHT_BYTES) {
            f.waiters += 1;
            f = self.flight_changed.wait(f).unwrap_or_else(|e| e.into_inner());
            f.waiters -= 1;
        }
        f.requests += 1;
        f.bytes += cost;
        self.busy.store(f.requests, Ordering::SeqCst);
    }

    /// A request's last reply has been written.
    fn finish(&self, cost: usize) {
        let mut f = self.flight.lock().unwrap_or_else(|e| e.into_inner());
        f.requests -= 1;
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
            let spawn = q.idle == 0 && q.workers < self.max_workers;
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
                        self.run_job(job, &mut Vec::new(), scope);
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
        let mut buf: Vec<u8> = Vec::new();
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
            self.run_job(job, &mut buf, scope);
            // Do not pin a huge buffer for the life of the connection.
            if buf.capacity() > 4 << 20 {
                buf = Vec::new();
            }
        }
    }

    fn run_job<'s>(&'s self, job: Job, buf: &mut Vec<u8>, scope: &'s Scope<'s, '_>) {
        let r = match job {
            Job::Request { req, payload, cost } => self.request(req, payload, cost, buf, scope),
            Job::Piece { read, offset, len } => self.piece(&read, offset, len, buf),
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

    fn request<'s>(
        &'s self,
        req: Request,
        payload: Vec<u8>,
        cost: usize,
        buf: &mut Vec<u8>,
        scope: &'s Scope<'s, '_>,
    ) -> io::Result<()> {
        if let Err(e) = self.check(&req) {
            self.log_failure(&req, &e);
            let r = self.writer.error(&req, &e, None, true);
            self.finish(cost);
            return r;
        }
        if req.command == CMD_READ {
            return self.read(req, cost, buf, scope);
        }
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let result = match req.command {
            CMD_WRITE => self.layer.write(&payload, req.offset, fua),
            CMD_FLUSH => self.layer.flush(),
            CMD_TRIM => self.layer.trim(req.length, req.offset, fua),
            CMD_WRITE_ZEROES => {
                let may_trim = req.flags & CMD_FLAG_NO_HOLE == 0;
                let fast = req.flags & CMD_FLAG_FAST_ZERO != 0;
                self.layer.zero(req.length, req.offset, may_trim, fast, fua)
            }
            CMD_CACHE => self.layer.cache(req.length, req.offset),
            CMD_BLOCK_STATUS => {
                let r = self.block_status(&req);
                self.finish(cost);
                return r;
            }
            _ => Err(OpError::inval(format!("unknown command {}", req.command))),
        };
        drop(payload);
        let r = match result {
            Ok(()) => self.writer.ok(&req),
            Err(e) => {
                self.log_failure(&req, &e);
                self.writer.error(&req, &e, None, true)
            }
        };
        self.finish(cost);
        r
    }

    fn block_status(&self, req: &Request) -> io::Result<()> {
        let context = self.allocation_context.expect("checked");
        let req_one = req.flags & CMD_FLAG_REQ_ONE != 0;
        match self.layer.extents(req.length, req.offset, req_one) {
            Ok(extents) => {
                // Never describe past the request: compact descriptors are
                // 32-bit, and REQ_ONE demands it.
                let end = req.offset + req.length;
                let mut pos = req.offset;
                let mut out: Vec<(u64, u32)> = Vec::with_capacity(extents.len().min(MAX_EXTENTS));
                for e in extents {
                    if pos >= end || out.len() >= MAX_EXTENTS {
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
                    out.push((len, flags));
                    pos += len;
                }
                self.writer.block_status(req, context, &out)
            }
            Err(e) => {
                self.log_failure(req, &e);
                self.writer.error(req, &e, None, true)
            }
        }
    }

    // ------------------------------------------------------------ reads

    fn read<'s>(&'s self, req: Request, cost: usize, buf: &mut Vec<u8>, scope: &'s Scope<'s, '_>) -> io::Result<()> {
        let len = req.length as usize;
        if self.mode == ReplyMode::Simple {
            buf.resize(len, 0);
            let r = match self.layer.read(buf, req.offset) {
                Ok(()) => self.writer.simple_data(&req, buf),
                Err(e) => {
                    self.log_failure(&req, &e);
                    self.writer.error(&req, &e, None, true)
                }
            };
            self.finish(cost);
            return r;
        }
        if len == 0 {
            let r = self.writer.done(&req);
            self.finish(cost);
            return r;
        }
        let df = req.flags & CMD_FLAG_DF != 0;
        // Most reads are one data run: keep that on the stack.
        let whole = [(req.offset, req.length, false)];
        let sparse;
        let segments: &[(u64, u64, bool)] = if !df && req.length >= SPARSE_READ_MIN && self.layer.caps().extents {
            sparse = self.segments(&req);
            &sparse
        } else {
            &whole
        };
        let data_bytes: u64 = segments.iter().filter(|s| !s.2).map(|s| s.1).sum();
        if self.split_reads && !df && data_bytes >= SPLIT_READ_MIN {
            return self.split_read(req, cost, segments, scope);
        }
        let r = self.send_segments(&req, segments, buf);
        self.finish(cost);
        r
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

    /// Send segments in order, the last chunk carrying DONE.
    fn send_segments(&self, req: &Request, segments: &[(u64, u64, bool)], buf: &mut Vec<u8>) -> io::Result<()> {
        let df = req.flags & CMD_FLAG_DF != 0;
        for (i, &(off, len, hole)) in segments.iter().enumerate() {
            let last = i + 1 == segments.len();
            if hole {
                self.holes(req, off, len, last)?;
                continue;
            }
            buf.resize(len as usize, 0);
            if let Err(e) = self.layer.read(buf, off) {
                self.log_failure(req, &e);
                // Nothing sent covers `off` yet: report it there. With DF
                // (a single chunk) plain ERROR is the only honest form.
                let at = if df || i == 0 { None } else { Some(off) };
                return self.writer.error(req, &e, at, true);
            }
            self.writer.data(req, off, buf, last)?;
        }
        Ok(())
    }

    fn holes(&self, req: &Request, mut off: u64, mut len: u64, done: bool) -> io::Result<()> {
        // The hole size field is 32 bits.
        let max = (u32::MAX as u64) / HOLE_ALIGN * HOLE_ALIGN;
        while len > 0 {
            let n = len.min(max);
            self.writer.hole(req, off, n as u32, done && n == len)?;
            off += n;
            len -= n;
        }
        Ok(())
    }

    fn split_read<'s>(
        &'s self,
        req: Request,
        cost: usize,
        segments: &[(u64, u64, bool)],
        scope: &'s Scope<'s, '_>,
    ) -> io::Result<()> {
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
        let mut r = Ok(());
        for &(off, len, hole) in segments {
            if hole {
                r = r.and(self.holes(&req, off, len, false));
            }
        }
        r.and(self.piece_done(&read))
    }

    fn piece(&self, read: &SplitRead, offset: u64, len: usize, buf: &mut Vec<u8>) -> io::Result<()> {
        buf.resize(len, 0);
        let r = match self.layer.read(buf, offset) {
            Ok(()) => self.writer.data(&read.req, offset, buf, false),
            Err(e) => {
                self.log_failure(&read.req, &e);
                self.writer.error(&read.req, &e, Some(offset), false)
            }
        };
        r.and(self.piece_done(read))
    }

    fn piece_done(&self, read: &SplitRead) -> io::Result<()> {
        if read.pending.fetch_sub(1, Ordering::AcqRel) != 1 {
            return Ok(());
        }
        let r = self.writer.done(&read.req);
        self.finish(read.cost);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
