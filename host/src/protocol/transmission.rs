//! The transmission phase: read requests, check them against what was
//! negotiated, run them against the export's checked pipeline, and reply.

use super::codec::{self, ReplyMode, Request};
use super::consts::*;
use super::handshake::Session;
use crate::error::{NbdErrno, OpError};
use crate::pipeline::CheckedLayer;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Serialises replies: every reply (header plus data) is written to the
/// socket as one unbroken unit, whichever thread produced it.
pub struct ReplyWriter<W: Write> {
    inner: Mutex<W>,
    mode: ReplyMode,
}

impl<W: Write> ReplyWriter<W> {
    /// Wrap a writer for the negotiated reply mode.
    pub fn new(w: W, mode: ReplyMode) -> Self {
        ReplyWriter {
            inner: Mutex::new(w),
            mode,
        }
    }

    fn send(&self, parts: &[&[u8]]) -> io::Result<()> {
        let mut w = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for p in parts {
            w.write_all(p)?;
        }
        w.flush()
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

    /// Successful READ carrying `data`.
    pub fn read_data(&self, req: &Request, data: &[u8]) -> io::Result<()> {
        let mut h = Vec::with_capacity(40);
        match self.mode {
            ReplyMode::Simple => {
                codec::encode_simple_reply(&mut h, 0, req.cookie);
                self.send(&[&h, data])
            }
            _ if data.is_empty() => {
                codec::encode_chunk_header(
                    &mut h,
                    self.mode,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_NONE,
                    req.cookie,
                    req.offset,
                    0,
                );
                self.send(&[&h])
            }
            _ => {
                codec::encode_chunk_header(
                    &mut h,
                    self.mode,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    req.cookie,
                    req.offset,
                    8 + data.len() as u64,
                );
                h.extend_from_slice(&req.offset.to_be_bytes());
                self.send(&[&h, data])
            }
        }
    }

    /// A failed request. Structured modes carry the message.
    pub fn error(&self, req: &Request, e: &OpError) -> io::Result<()> {
        let mut h = Vec::with_capacity(64 + e.message.len());
        match self.mode {
            ReplyMode::Simple => codec::encode_simple_reply(&mut h, e.errno.code(), req.cookie),
            _ => codec::encode_error_chunk(
                &mut h,
                self.mode,
                req.cookie,
                req.offset,
                e.errno.code(),
                &e.message,
                None,
            ),
        }
        self.send(&[&h])
    }
}

/// What a request produced.
enum Outcome {
    /// Success, no data.
    Done,
    /// Success, READ data in the connection's read buffer.
    Data,
}

/// Per-connection transmission state.
pub struct Transmission<'a> {
    layer: &'a CheckedLayer,
    tflags: u16,
    mode: ReplyMode,
    export: &'a str,
    peer: &'a str,
    shutting_down: &'a AtomicBool,
    read_buf: Vec<u8>,
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

impl<'a> Transmission<'a> {
    /// Set up for a session.
    pub fn new(session: &'a Session, peer: &'a str, shutting_down: &'a AtomicBool) -> Self {
        Transmission {
            layer: &session.open.layer,
            tflags: session.tflags,
            mode: session.mode,
            export: &session.export.name,
            peer,
            shutting_down,
            read_buf: Vec::new(),
        }
    }

    /// Protocol-level checks: known command, flags valid for it and
    /// advertised, command enabled by the transmission flags, size limits.
    /// Range and permission checks belong to the pipeline.
    pub fn check(&self, req: &Request) -> Result<(), OpError> {
        let cmd = name(req.command);
        let advertised = |f: u16| self.tflags & f != 0;
        let allowed: u16 = CMD_FLAG_FUA
            | match req.command {
                CMD_READ => CMD_FLAG_DF,
                CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
                CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE => 0,
                other => return Err(OpError::inval(format!("unknown command {other}"))),
            };
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
            return Err(OpError::new(
                NbdErrno::Perm,
                format!("{cmd}: export `{}` is read-only", self.export),
            ));
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
                return Err(OpError::inval(format!(
                    "{cmd} is not supported by export `{}`",
                    self.export
                )));
            }
        }
        if req.command == CMD_BLOCK_STATUS {
            return Err(OpError::inval(
                "BLOCK_STATUS: no metadata context was negotiated",
            ));
        }
        if req.command == CMD_FLUSH && (req.offset != 0 || req.length != 0) {
            return Err(OpError::inval("FLUSH: offset and length must be 0"));
        }
        let bs = self.layer.caps().block_size;
        if matches!(req.command, CMD_READ | CMD_WRITE) {
            if req.length > bs.maximum as u64 {
                return Err(OpError::inval(format!(
                    "{cmd}: length {} exceeds the maximum payload {}",
                    req.length, bs.maximum
                )));
            }
            let min = bs.minimum as u64;
            if min > 1 && (req.offset % min != 0 || req.length % min != 0) {
                return Err(OpError::inval(format!(
                    "{cmd}: {}+{} is not aligned to the {min}-byte minimum block",
                    req.offset, req.length
                )));
            }
        }
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(OpError::new(NbdErrno::Shutdown, "server is shutting down"));
        }
        Ok(())
    }

    fn run(&mut self, req: &Request, payload: &[u8]) -> Result<Outcome, OpError> {
        self.check(req)?;
        let fua = req.flags & CMD_FLAG_FUA != 0;
        match req.command {
            CMD_READ => {
                self.read_buf.resize(req.length as usize, 0);
                self.layer.read(&mut self.read_buf, req.offset)?;
                Ok(Outcome::Data)
            }
            CMD_WRITE => self
                .layer
                .write(payload, req.offset, fua)
                .map(|_| Outcome::Done),
            CMD_FLUSH => self.layer.flush().map(|_| Outcome::Done),
            CMD_TRIM => self
                .layer
                .trim(req.length, req.offset, fua)
                .map(|_| Outcome::Done),
            CMD_WRITE_ZEROES => {
                let may_trim = req.flags & CMD_FLAG_NO_HOLE == 0;
                let fast = req.flags & CMD_FLAG_FAST_ZERO != 0;
                self.layer
                    .zero(req.length, req.offset, may_trim, fast, fua)
                    .map(|_| Outcome::Done)
            }
            CMD_CACHE => self
                .layer
                .cache(req.length, req.offset)
                .map(|_| Outcome::Done),
            _ => Err(OpError::inval(format!("unknown command {}", req.command))),
        }
    }

    /// Serve requests until DISC, EOF or a framing error.
    pub fn serve<R: Read, W: Write>(
        &mut self,
        mut reader: R,
        writer: &ReplyWriter<W>,
    ) -> io::Result<()> {
        let extended = self.mode == ReplyMode::Extended;
        let hlen = codec::request_header_len(extended);
        let mut hdr = [0u8; 32];
        let mut payload: Vec<u8> = Vec::new();
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
                log::warn!(
                    "{}: {} payload of {plen} bytes is over 32 MiB; disconnecting",
                    self.peer,
                    name(req.command)
                );
                return Ok(());
            }
            // The payload is on the wire whatever we decide about the
            // request: read it to keep framing.
            payload.resize(plen as usize, 0);
            reader.read_exact(&mut payload)?;
            if req.command == CMD_DISC {
                log::debug!("{}: NBD_CMD_DISC", self.peer);
                return Ok(());
            }
            match self.run(&req, &payload) {
                Ok(Outcome::Done) => writer.ok(&req)?,
                Ok(Outcome::Data) => writer.read_data(&req, &self.read_buf)?,
                Err(e) => {
                    if e.errno == NbdErrno::Io {
                        log::warn!(
                            "{}: {} {}+{}: {}",
                            self.peer,
                            name(req.command),
                            req.offset,
                            req.length,
                            e.message
                        );
                    } else {
                        log::debug!(
                            "{}: {} {}+{}: {}",
                            self.peer,
                            name(req.command),
                            req.offset,
                            req.length,
                            e
                        );
                    }
                    writer.error(&req, &e)?
                }
            }
            // Do not pin a huge buffer for the life of the connection.
            if self.read_buf.capacity() > 4 << 20 && self.read_buf.len() < 1 << 20 {
                self.read_buf = Vec::new();
            }
            if payload.capacity() > 4 << 20 && plen < 1 << 20 {
                payload = Vec::new();
            }
        }
    }
}
