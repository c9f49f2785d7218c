//! The option phase (fixed newstyle). Reads options, answers them, and ends
//! either in transmission (EXPORT_NAME or a successful GO) or with the
//! connection closed.

use super::codec::{self, ClientOption, InfoRequest, OptionHeader, ReplyMode};
use super::consts::*;
use crate::export::{Export, ExportSet, OpenExport};
use crate::pipeline::Capabilities;
use crate::tls::{self, TlsMode, TlsServer};
use crate::transport::Channel;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Largest option payload we parse. INFO/GO with every info type and
/// meta-context queries fit easily; the cap keeps per-connection memory
/// bounded whatever the client sends.
pub const MAX_OPTION_DATA: u32 = 64 * 1024;
/// Larger payloads up to this size are read and discarded (answered with
/// ERR_TOO_BIG); beyond it the client is treated as hostile and dropped.
pub const MAX_OPTION_DISCARD: u32 = 16 * 1024 * 1024;

/// What the handshake settled.
pub struct Session {
    /// The export chosen.
    pub export: Arc<Export>,
    /// Its pipeline, opened for this connection.
    pub open: OpenExport,
    /// Reply framing negotiated.
    pub mode: ReplyMode,
    /// Transmission flags sent to the client.
    pub tflags: u16,
    /// Context ID of `base:allocation` if it was selected for this export.
    pub allocation_context: Option<u32>,
}

/// The only metadata context we serve.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// The outcome of the last NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, Clone, Default)]
struct MetaSelection {
    /// Canonical name of the export it was made for.
    export: Option<String>,
    /// ID given to `base:allocation`, if selected.
    allocation: Option<u32>,
}

/// Which contexts a list of queries picks out. `list` is LIST semantics
/// (`base:` is a wildcard, no queries means everything); SET semantics
/// otherwise. Queries in other namespaces are ignored, as the spec demands.
fn match_queries(queries: &[String], list: bool) -> Result<bool, String> {
    if queries.is_empty() {
        return Ok(list);
    }
    let mut allocation = false;
    for q in queries {
        let Some((ns, leaf)) = q.split_once(':') else {
            return Err(format!("meta context query `{q}` has no namespace"));
        };
        if ns.is_empty() {
            return Err(format!("meta context query `{q}` has an empty namespace"));
        }
        if ns == "base" && (leaf == "allocation" || (list && leaf.is_empty())) {
            allocation = true;
        }
    }
    Ok(allocation)
}

/// Everything the option phase needs from the server.
pub struct HandshakeContext<'a> {
    /// Exports on offer (a snapshot; a reload does not disturb us).
    pub exports: &'a ExportSet,
    /// Peer address, for logs and plugins.
    pub peer: &'a str,
    /// Set once the server is shutting down.
    pub shutting_down: &'a AtomicBool,
    /// The server's TLS side (None: TLS is off).
    pub tls: Option<&'a TlsServer>,
}

/// Why the option phase ended without transmission.
#[derive(Debug)]
pub enum HandshakeEnd {
    /// The client aborted or went away; nothing wrong.
    Closed,
    /// We hung up (protocol violation, EXPORT_NAME that cannot be served).
    Refused(String),
}

/// Transmission flags for an export's capabilities and the negotiated state.
pub fn transmission_flags(caps: &Capabilities, readonly: bool, mode: ReplyMode) -> u16 {
    use crate::pipeline::Support;
    let mut f = TFLAG_HAS_FLAGS;
    if readonly {
        f |= TFLAG_READ_ONLY;
    } else {
        if caps.fua != Support::None {
            f |= TFLAG_SEND_FUA;
        }
        if caps.trim {
            f |= TFLAG_SEND_TRIM;
        }
        // Zeroing is always available on a writable export (emulated with
        // writes if need be), and a fast-zero request that cannot be fast
        // fails quickly with ENOTSUP, which the spec allows.
        f |= TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
    }
    if caps.flush {
        f |= TFLAG_SEND_FLUSH;
    }
    if caps.rotational {
        f |= TFLAG_ROTATIONAL;
    }
    if mode != ReplyMode::Simple {
        // READ replies are one content chunk, so DF always holds.
        f |= TFLAG_SEND_DF;
    }
    if caps.multi_conn {
        f |= TFLAG_CAN_MULTI_CONN;
    }
    if caps.cache != Support::None {
        f |= TFLAG_SEND_CACHE;
    }
    f
}

struct Negotiation<'a> {
    s: &'a mut Channel,
    ctx: &'a HandshakeContext<'a>,
    no_zeroes: bool,
    mode: ReplyMode,
    meta: MetaSelection,
    next_context_id: u32,
    out: Vec<u8>,
}

type Step = Result<Option<Result<Session, HandshakeEnd>>, io::Error>;

/// What reading the next option produced.
enum Incoming {
    /// An option and its data.
    Option(OptionHeader, Vec<u8>),
    /// An option that was already answered (too large to parse).
    Answered,
    /// The option phase is over.
    End(HandshakeEnd),
}

impl Negotiation<'_> {
    fn reply(&mut self, option: u32, kind: u32, payload: &[u8]) -> io::Result<()> {
        self.out.clear();
        codec::encode_option_reply(&mut self.out, option, kind, payload);
        self.s.write_all(&self.out)?;
        self.s.flush()
    }

    fn error(&mut self, option: u32, kind: u32, msg: &str) -> io::Result<()> {
        log::debug!("{}: option {option} refused ({kind:#x}): {msg}", self.ctx.peer);
        self.reply(option, kind, codec::clamp_message(msg).as_bytes())
    }

    /// Read the next option. Oversized options are dealt with here (their
    /// data is never buffered): EXPORT_NAME cannot be answered, so it ends
    /// the session; ABORT is still acknowledged; anything else is answered
    /// ERR_TOO_BIG after its data is skipped, or the client is dropped when
    /// the length is absurd.
    fn read_option(&mut self) -> io::Result<Incoming> {
        let mut h = [0u8; OptionHeader::LEN];
        match self.s.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Incoming::End(HandshakeEnd::Closed)),
            Err(e) => return Err(e),
        }
        let hdr = match OptionHeader::parse(&h) {
            Ok(h) => h,
            Err(e) => return Ok(Incoming::End(HandshakeEnd::Refused(e.to_string()))),
        };
        if hdr.option == OPT_SET_META_CONTEXT {
            // A SET replaces the previous selection even when it fails,
            // however it fails.
            self.meta = MetaSelection::default();
        }
        if hdr.length <= MAX_OPTION_DATA {
            let mut data = vec![0u8; hdr.length as usize];
            self.s.read_exact(&mut data)?;
            return Ok(Incoming::Option(hdr, data));
        }
        let what = format!("option {} with {} bytes of data", hdr.option, hdr.length);
        if hdr.option == OPT_EXPORT_NAME {
            return Ok(Incoming::End(HandshakeEnd::Refused(format!("{what} (export names are at most 4096 bytes)"))));
        }
        // FORCEDTLS: anything but ABORT and STARTTLS before TLS is answered
        // ERR_TLS_REQD, however large.
        let (too_big, why) = if self.tls_forced() && hdr.option != OPT_STARTTLS {
            (REP_ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first")
        } else {
            (REP_ERR_TOO_BIG, "option data too large")
        };
        if hdr.length > MAX_OPTION_DISCARD {
            if hdr.option != OPT_ABORT {
                let _ = self.error(hdr.option, too_big, why);
            }
            return Ok(Incoming::End(HandshakeEnd::Refused(format!("{what} (limit {MAX_OPTION_DISCARD})"))));
        }
        io::copy(&mut (&mut *self.s).take(hdr.length as u64), &mut io::sink())?;
        if hdr.option == OPT_ABORT {
            let _ = self.reply(hdr.option, REP_ACK, &[]);
            return Ok(Incoming::End(HandshakeEnd::Closed));
        }
        if too_big == REP_ERR_TLS_REQD {
            self.error(hdr.option, too_big, why)?;
        } else {
            self.error(
                hdr.option,
                REP_ERR_TOO_BIG,
                &format!("option data of {} bytes is over the {MAX_OPTION_DATA}-byte limit", hdr.length),
            )?;
        }
        Ok(Incoming::Answered)
    }

    /// FORCEDTLS and TLS not up yet: only STARTTLS and ABORT are served.
    fn tls_forced(&self) -> bool {
        !self.s.is_tls() && self.ctx.tls.is_some_and(|t| t.mode == TlsMode::Require)
    }

    /// Must the client do STARTTLS before using `export`?
    fn needs_tls(&self, export: &Export) -> bool {
        !self.s.is_tls() && tls::export_requires_tls(self.ctx.tls, export)
    }

    /// Whether this client may use `export` once TLS is settled: `Err`
    /// explains why not (logged by the caller).
    fn identity_check(&self, export: &Export) -> Result<(), String> {
        tls::identity_allowed(export, self.s.peer_identities())
    }

    /// NBD_OPT_STARTTLS. `Some` ends the option phase (failed handshake).
    fn start_tls(&mut self, option: u32) -> io::Result<Option<HandshakeEnd>> {
        let Some(tls) = self.ctx.tls else {
            self.error(option, REP_ERR_POLICY, "TLS is not configured on this server")?;
            return Ok(None);
        };
        if self.s.is_tls() {
            self.error(option, REP_ERR_INVALID, "TLS is already active")?;
            return Ok(None);
        }
        self.reply(option, REP_ACK, &[])?;
        if let Err(why) = self.s.start_tls(tls)? {
            return Ok(Some(HandshakeEnd::Refused(format!("TLS handshake failed: {why}"))));
        }
        // Nothing negotiated in plain text survives the upgrade.
        self.mode = ReplyMode::Simple;
        self.meta = MetaSelection::default();
        if let Channel::Tls(t) = &*self.s {
            let who = if t.identities().is_empty() {
                "no client certificate".to_string()
            } else {
                format!("client certificate [{}]", t.identities().join(", "))
            };
            log::info!("{}: TLS established ({}), {who}", self.ctx.peer, t.description());
        }
        Ok(None)
    }

    fn lookup(&self, name: &str) -> Option<Arc<Export>> {
        self.ctx.exports.lookup(name)
    }

    /// Answer INFO or GO. Returns the session for a successful GO.
    fn info_or_go(&mut self, option: u32, req: &InfoRequest, go: bool) -> Step {
        let Some(export) = self.lookup(&req.name) else {
            let msg = if req.name.is_empty() {
                "there is no default export; ask for one by name (nbdinfo --list shows them)".to_string()
            } else {
                format!("export `{}` does not exist", req.name)
            };
            self.error(option, REP_ERR_UNKNOWN, &msg)?;
            return Ok(None);
        };
        if self.needs_tls(&export) {
            self.error(option, REP_ERR_TLS_REQD, &format!("export `{}` requires TLS (NBD_OPT_STARTTLS)", export.name))?;
            return Ok(None);
        }
        if let Err(why) = self.identity_check(&export) {
            log::warn!("{}: refused: {why}", self.ctx.peer);
            self.error(option, REP_ERR_POLICY, &format!("export `{}`: client identity not allowed", export.name))?;
            return Ok(None);
        }
        if go && export.at_connection_limit() {
            self.error(option, REP_ERR_POLICY, &format!("export `{}` has reached its connection limit", export.name))?;
            return Ok(None);
        }
        let open = match export.open(self.ctx.peer) {
            Ok(o) => o,
            Err(e) => {
                log::warn!("{}: cannot open export `{}`: {}", self.ctx.peer, export.name, e.message);
                self.error(
                    option,
                    REP_ERR_UNKNOWN,
                    &format!("export `{}` is not available: {}", export.name, e.message),
                )?;
                return Ok(None);
            }
        };
        let caps = open.layer.caps().clone();
        let tflags = transmission_flags(&caps, open.layer.readonly(), self.mode);
        // Answer in a fixed order so an INFO followed by the same GO gets
        // byte-identical replies.
        let mut replies: Vec<Vec<u8>> = vec![codec::info_export(caps.size, tflags)];
        if req.requests.contains(&INFO_NAME) {
            replies.push(codec::info_string(INFO_NAME, &export.name));
        }
        if req.requests.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
            replies.push(codec::info_string(INFO_DESCRIPTION, codec::clamp_message(&export.description)));
        }
        // Block sizes are always sent: clients ignore info they did not ask
        // for, and those that understand it get our real limits.
        let b = caps.block_size;
        replies.push(codec::info_block_size(b.minimum, b.preferred, b.maximum));
        for r in &replies {
            self.reply(option, REP_INFO, r)?;
        }
        self.reply(option, REP_ACK, &[])?;
        if go {
            log::info!(
                "{}: export `{}` ({} bytes, flags {:#06x}, {:?} replies)",
                self.ctx.peer,
                export.name,
                caps.size,
                tflags,
                self.mode
            );
            let allocation_context = self.contexts_for(&export.name);
            return Ok(Some(Ok(Session { export, open, mode: self.mode, tflags, allocation_context })));
        }
        Ok(None)
    }

    fn export_name(&mut self, name: &str) -> Step {
        let Some(export) = self.lookup(name) else {
            return Ok(Some(Err(HandshakeEnd::Refused(format!("EXPORT_NAME for unknown export `{name}`")))));
        };
        if self.needs_tls(&export) {
            return Ok(Some(Err(HandshakeEnd::Refused(format!(
                "EXPORT_NAME for export `{}` without TLS; it requires TLS",
                export.name
            )))));
        }
        if let Err(why) = self.identity_check(&export) {
            return Ok(Some(Err(HandshakeEnd::Refused(format!("EXPORT_NAME: {why}")))));
        }
        if export.at_connection_limit() {
            return Ok(Some(Err(HandshakeEnd::Refused(format!(
                "export `{}` has reached its connection limit",
                export.name
            )))));
        }
        let open = match export.open(self.ctx.peer) {
            Ok(o) => o,
            Err(e) => {
                return Ok(Some(Err(HandshakeEnd::Refused(format!(
                    "export `{}` cannot be opened: {}",
                    export.name, e.message
                )))))
            }
        };
        let caps = open.layer.caps().clone();
        let tflags = transmission_flags(&caps, open.layer.readonly(), self.mode);
        self.s.write_all(&codec::export_name_reply(caps.size, tflags, self.no_zeroes))?;
        self.s.flush()?;
        log::info!(
            "{}: export `{}` ({} bytes, flags {:#06x}, via EXPORT_NAME)",
            self.ctx.peer,
            export.name,
            caps.size,
            tflags
        );
        let allocation_context = self.contexts_for(&export.name);
        Ok(Some(Ok(Session { export, open, mode: self.mode, tflags, allocation_context })))
    }

    fn list(&mut self, option: u32) -> io::Result<()> {
        let entries: Vec<Vec<u8>> = self
            .ctx
            .exports
            .iter()
            // Plain clients do not see TLS-only exports, nor TLS clients
            // those their certificate may not use.
            .filter(|e| !self.needs_tls(e) && self.identity_check(e).is_ok())
            .map(|e| codec::rep_server_payload(&e.name, codec::clamp_message(&e.description)))
            .collect();
        for p in entries {
            self.reply(option, REP_SERVER, &p)?;
        }
        self.reply(option, REP_ACK, &[])
    }

    /// The context ID of `base:allocation` for a session on `export`: only
    /// if the last SET named the same export and selected it.
    fn contexts_for(&self, export: &str) -> Option<u32> {
        match &self.meta.export {
            Some(e) if e == export => self.meta.allocation,
            _ => None,
        }
    }

    /// NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
    fn meta_context(&mut self, option: u32, req: &codec::MetaContextRequest, list: bool) -> io::Result<()> {
        // (A SET's old selection was already dropped when it was read.)
        if self.mode == ReplyMode::Simple {
            return self.error(option, REP_ERR_INVALID, "negotiate structured replies or extended headers first");
        }
        let Some(export) = self.lookup(&req.name) else {
            return self.error(option, REP_ERR_UNKNOWN, &format!("export `{}` does not exist", req.name));
        };
        if self.needs_tls(&export) {
            // (ERR_TLS_REQD is only for INFO, GO and EXPORT_NAME.)
            return self.error(
                option,
                REP_ERR_POLICY,
                &format!("export `{}` requires TLS (NBD_OPT_STARTTLS)", export.name),
            );
        }
        let allocation = match match_queries(&req.queries, list) {
            Ok(a) => a,
            Err(msg) => return self.error(option, REP_ERR_INVALID, &msg),
        };
        if allocation {
            let id = if list {
                0
            } else {
                // IDs are transient; a fresh one per SET keeps clients honest.
                self.next_context_id = self.next_context_id.wrapping_add(1).max(1);
                self.next_context_id
            };
            self.reply(option, REP_META_CONTEXT, &codec::rep_meta_context(id, BASE_ALLOCATION))?;
            if !list {
                self.meta = MetaSelection { export: Some(export.name.clone()), allocation: Some(id) };
            }
        }
        self.reply(option, REP_ACK, &[])
    }

    fn step(&mut self) -> Step {
        let (hdr, data) = match self.read_option()? {
            Incoming::Option(h, d) => (h, d),
            Incoming::Answered => return Ok(None),
            Incoming::End(end) => return Ok(Some(Err(end))),
        };
        let option = hdr.option;
        if self.ctx.shutting_down.load(Ordering::Relaxed) && option != OPT_ABORT {
            if option == OPT_EXPORT_NAME {
                return Ok(Some(Err(HandshakeEnd::Refused("server is shutting down".into()))));
            }
            self.error(option, REP_ERR_SHUTDOWN, "server is shutting down")?;
            return Ok(None);
        }
        if self.tls_forced() && option != OPT_STARTTLS && option != OPT_ABORT {
            if option == OPT_EXPORT_NAME {
                return Ok(Some(Err(HandshakeEnd::Refused("EXPORT_NAME before STARTTLS; TLS is required".into()))));
            }
            self.error(option, REP_ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first")?;
            return Ok(None);
        }
        let parsed = match codec::parse_option(option, &data) {
            Ok(p) => p,
            Err(codec::InvalidOption(msg)) => {
                if option == OPT_EXPORT_NAME {
                    return Ok(Some(Err(HandshakeEnd::Refused(format!("bad EXPORT_NAME: {msg}")))));
                }
                self.error(option, REP_ERR_INVALID, &msg)?;
                return Ok(None);
            }
        };
        match parsed {
            ClientOption::ExportName(name) => {
                if self.mode == ReplyMode::Extended {
                    return Ok(Some(Err(HandshakeEnd::Refused(
                        "NBD_OPT_EXPORT_NAME after extended headers were negotiated".into(),
                    ))));
                }
                return self.export_name(&name);
            }
            ClientOption::Abort => {
                // The client may already be gone; that is fine.
                let _ = self.reply(option, REP_ACK, &[]);
                return Ok(Some(Err(HandshakeEnd::Closed)));
            }
            ClientOption::List => self.list(option)?,
            ClientOption::StartTls => {
                if let Some(end) = self.start_tls(option)? {
                    return Ok(Some(Err(end)));
                }
            }
            ClientOption::Info(req) => return self.info_or_go(option, &req, false),
            ClientOption::Go(req) => return self.info_or_go(option, &req, true),
            ClientOption::StructuredReply => match self.mode {
                ReplyMode::Simple => {
                    self.mode = ReplyMode::Structured;
                    self.reply(option, REP_ACK, &[])?;
                }
                ReplyMode::Structured => {
                    self.error(option, REP_ERR_INVALID, "structured replies are already negotiated")?
                }
                ReplyMode::Extended => self.error(
                    option,
                    REP_ERR_EXT_HEADER_REQD,
                    "extended headers are negotiated; structured replies would be a downgrade",
                )?,
            },
            ClientOption::ExtendedHeaders => {
                if self.mode == ReplyMode::Extended {
                    self.error(option, REP_ERR_INVALID, "extended headers are already negotiated")?;
                } else {
                    self.mode = ReplyMode::Extended;
                    self.reply(option, REP_ACK, &[])?;
                }
            }
            ClientOption::ListMetaContext(req) => self.meta_context(option, &req, true)?,
            ClientOption::SetMetaContext(req) => self.meta_context(option, &req, false)?,
            ClientOption::Unknown(o) => self.error(o, REP_ERR_UNSUP, &format!("option {o} is not supported"))?,
        }
        Ok(None)
    }
}

/// Run the option phase on `s`.
pub fn negotiate(s: &mut Channel, ctx: &HandshakeContext<'_>) -> io::Result<Result<Session, HandshakeEnd>> {
    s.write_all(&codec::server_greeting())?;
    s.flush()?;
    let mut flags = [0u8; 4];
    match s.read_exact(&mut flags) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Err(HandshakeEnd::Closed)),
        Err(e) => return Err(e),
    }
    let cf = match codec::parse_client_flags(flags) {
        Ok(f) => f,
        Err(e) => return Ok(Err(HandshakeEnd::Refused(e.to_string()))),
    };
    // A client without C_FIXED_NEWSTYLE is served as fixed anyway (the spec
    // allows it); such clients only ever send EXPORT_NAME.
    let mut n = Negotiation {
        s,
        ctx,
        no_zeroes: cf.no_zeroes,
        mode: ReplyMode::Simple,
        meta: MetaSelection::default(),
        next_context_id: 0,
        out: Vec::with_capacity(256),
    };
    loop {
        if let Some(end) = n.step()? {
            return Ok(end);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn meta_context_queries() {
        // LIST: no queries lists everything; `base:` is a wildcard.
        assert_eq!(match_queries(&[], true), Ok(true));
        assert_eq!(match_queries(&q(&["base:"]), true), Ok(true));
        // SET: no queries selects nothing; `base:` alone is ignored.
        assert_eq!(match_queries(&[], false), Ok(false));
        assert_eq!(match_queries(&q(&["base:"]), false), Ok(false));
        assert_eq!(match_queries(&q(&["base:allocation"]), false), Ok(true));
        // Unknown namespaces and unknown base leaves are ignored.
        assert_eq!(match_queries(&q(&["qemu:dirty-bitmap:x", "base:other"]), false), Ok(false));
        assert_eq!(match_queries(&q(&["x-foo:bar", "base:allocation"]), false), Ok(true));
        // Syntactically broken queries are refused.
        assert!(match_queries(&q(&["allocation"]), false).is_err());
        assert!(match_queries(&q(&[":allocation"]), true).is_err());
    }
}
