//! Sans-I/O NBD codec: bytes in, typed messages out, and typed messages to
//! bytes. Nothing here touches a socket, so every rule can be unit-tested and
//! fuzzed on its own. The handshake and transmission drivers own the I/O.

use super::consts::*;
use std::fmt;

/// Framing-level failure: the peer broke a MUST and the stream cannot be
/// trusted any more (hard disconnect).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FramingError {
    /// A magic number was wrong.
    BadMagic { what: &'static str, got: u64 },
    /// Client flags contained bits we do not know or did not offer.
    BadClientFlags(u32),
}

impl fmt::Display for FramingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FramingError::BadMagic { what, got } => write!(f, "bad {what} magic {got:#x}"),
            FramingError::BadClientFlags(fl) => {
                write!(f, "unknown or unoffered client flags {fl:#x}")
            }
        }
    }
}
impl std::error::Error for FramingError {}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

// ---------------------------------------------------------------- handshake

/// The 18 bytes the server sends first (fixed newstyle, NO_ZEROES offered).
pub fn server_greeting() -> [u8; 18] {
    let mut g = [0u8; 18];
    g[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    g
}

/// What the client's 4-byte flags word negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    /// Client speaks fixed newstyle.
    pub fixed_newstyle: bool,
    /// Omit the 124 zero bytes after EXPORT_NAME.
    pub no_zeroes: bool,
}

/// Parse client flags; unknown bits are a hard disconnect (spec MUST).
pub fn parse_client_flags(b: [u8; 4]) -> Result<ClientFlags, FramingError> {
    let v = u32::from_be_bytes(b);
    if v & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(FramingError::BadClientFlags(v));
    }
    Ok(ClientFlags { fixed_newstyle: v & FLAG_C_FIXED_NEWSTYLE != 0, no_zeroes: v & FLAG_C_NO_ZEROES != 0 })
}

/// Header of a client option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option code.
    pub option: u32,
    /// Length of the data that follows.
    pub length: u32,
}

impl OptionHeader {
    /// Size on the wire.
    pub const LEN: usize = 16;
    /// Parse; a bad magic is a protocol violation.
    pub fn parse(b: &[u8; 16]) -> Result<Self, FramingError> {
        let magic = be64(b);
        if magic != IHAVEOPT {
            return Err(FramingError::BadMagic { what: "option", got: magic });
        }
        Ok(OptionHeader { option: be32(&b[8..]), length: be32(&b[12..]) })
    }
}

/// The body of NBD_OPT_INFO / NBD_OPT_GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name (empty: the default export).
    pub name: String,
    /// Requested NBD_INFO_* codes, in order.
    pub requests: Vec<u16>,
}

/// The body of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export the query is about.
    pub name: String,
    /// Queries (`namespace:leaf`).
    pub queries: Vec<String>,
}

/// A parsed client option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    /// NBD_OPT_EXPORT_NAME.
    ExportName(String),
    /// NBD_OPT_ABORT (any data is ignored).
    Abort,
    /// NBD_OPT_LIST.
    List,
    /// NBD_OPT_STARTTLS.
    StartTls,
    /// NBD_OPT_INFO.
    Info(InfoRequest),
    /// NBD_OPT_GO.
    Go(InfoRequest),
    /// NBD_OPT_STRUCTURED_REPLY.
    StructuredReply,
    /// NBD_OPT_LIST_META_CONTEXT.
    ListMetaContext(MetaContextRequest),
    /// NBD_OPT_SET_META_CONTEXT.
    SetMetaContext(MetaContextRequest),
    /// NBD_OPT_EXTENDED_HEADERS.
    ExtendedHeaders,
    /// Anything else (answered with ERR_UNSUP).
    Unknown(u32),
}

/// Why an option's data was refused (answered with `ERR_INVALID`, then the
/// negotiation continues).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidOption(pub String);

fn string(b: &[u8], what: &str) -> Result<String, InvalidOption> {
    if b.len() > MAX_STRING {
        return Err(InvalidOption(format!("{what} is {} bytes, over the {MAX_STRING}-byte limit", b.len())));
    }
    if b.contains(&0) {
        return Err(InvalidOption(format!("{what} contains a NUL byte")));
    }
    String::from_utf8(b.to_vec()).map_err(|_| InvalidOption(format!("{what} is not valid UTF-8")))
}

/// A little reader over option data that turns overruns into ERR_INVALID.
struct Cursor<'a> {
    b: &'a [u8],
    what: &'static str,
}
impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], InvalidOption> {
        if self.b.len() < n {
            return Err(InvalidOption(format!("{} data is truncated", self.what)));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u16(&mut self) -> Result<u16, InvalidOption> {
        self.take(2).map(be16)
    }
    fn u32(&mut self) -> Result<u32, InvalidOption> {
        self.take(4).map(be32)
    }
    fn end(&self) -> Result<(), InvalidOption> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(InvalidOption(format!("{} data has {} trailing bytes", self.what, self.b.len())))
        }
    }
}

fn no_data(opt: &'static str, data: &[u8], v: ClientOption) -> Result<ClientOption, InvalidOption> {
    if data.is_empty() {
        Ok(v)
    } else {
        Err(InvalidOption(format!("{opt} takes no data, got {} bytes", data.len())))
    }
}

/// Parse an option's data. Errors are answered with ERR_INVALID.
pub fn parse_option(option: u32, data: &[u8]) -> Result<ClientOption, InvalidOption> {
    match option {
        OPT_EXPORT_NAME => Ok(ClientOption::ExportName(string(data, "export name")?)),
        OPT_ABORT => Ok(ClientOption::Abort),
        OPT_LIST => no_data("NBD_OPT_LIST", data, ClientOption::List),
        OPT_STARTTLS => no_data("NBD_OPT_STARTTLS", data, ClientOption::StartTls),
        OPT_STRUCTURED_REPLY => no_data("NBD_OPT_STRUCTURED_REPLY", data, ClientOption::StructuredReply),
        OPT_EXTENDED_HEADERS => no_data("NBD_OPT_EXTENDED_HEADERS", data, ClientOption::ExtendedHeaders),
        OPT_INFO | OPT_GO => {
            let mut c = Cursor { b: data, what: if option == OPT_GO { "NBD_OPT_GO" } else { "NBD_OPT_INFO" } };
            let len = c.u32()? as usize;
            // Spec: name length MUST be <= option length - 6.
            if len > data.len().saturating_sub(6) {
                return Err(InvalidOption(format!("export name length {len} overruns the option data")));
            }
            let name = string(c.take(len)?, "export name")?;
            let n = c.u16()? as usize;
            let mut requests = Vec::with_capacity(n.min(64));
            for _ in 0..n {
                requests.push(c.u16()?);
            }
            c.end()?;
            let req = InfoRequest { name, requests };
            Ok(if option == OPT_GO { ClientOption::Go(req) } else { ClientOption::Info(req) })
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            let what =
                if option == OPT_SET_META_CONTEXT { "NBD_OPT_SET_META_CONTEXT" } else { "NBD_OPT_LIST_META_CONTEXT" };
            let mut c = Cursor { b: data, what };
            let len = c.u32()? as usize;
            let name = string(c.take(len)?, "export name")?;
            let n = c.u32()? as usize;
            let mut queries = Vec::with_capacity(n.min(64));
            for _ in 0..n {
                let ql = c.u32()? as usize;
                queries.push(string(c.take(ql)?, "meta context query")?);
            }
            c.end()?;
            let req = MetaContextRequest { name, queries };
            Ok(if option == OPT_SET_META_CONTEXT {
                ClientOption::SetMetaContext(req)
            } else {
                ClientOption::ListMetaContext(req)
            })
        }
        other => Ok(ClientOption::Unknown(other)),
    }
}

/// Append one fixed-newstyle option reply.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, payload: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Payload of NBD_REP_SERVER.
pub fn rep_server_payload(name: &str, description: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(4 + name.len() + description.len());
    p.extend_from_slice(&(name.len() as u32).to_be_bytes());
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(description.as_bytes());
    p
}

/// Payload of NBD_REP_INFO / NBD_INFO_EXPORT.
pub fn info_export(size: u64, tflags: u16) -> Vec<u8> {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    p.extend_from_slice(&size.to_be_bytes());
    p.extend_from_slice(&tflags.to_be_bytes());
    p
}

/// Payload of NBD_REP_INFO carrying a string (NAME, DESCRIPTION).
pub fn info_string(kind: u16, s: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(2 + s.len());
    p.extend_from_slice(&kind.to_be_bytes());
    p.extend_from_slice(s.as_bytes());
    p
}

/// Payload of NBD_REP_INFO / NBD_INFO_BLOCK_SIZE.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(14);
    p.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    p.extend_from_slice(&min.to_be_bytes());
    p.extend_from_slice(&preferred.to_be_bytes());
    p.extend_from_slice(&max.to_be_bytes());
    p
}

/// Payload of NBD_REP_META_CONTEXT.
pub fn rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(4 + name.len());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(name.as_bytes());
    p
}

/// The reply to a successful NBD_OPT_EXPORT_NAME (134 or 10 bytes).
pub fn export_name_reply(size: u64, tflags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut p = Vec::with_capacity(134);
    p.extend_from_slice(&size.to_be_bytes());
    p.extend_from_slice(&tflags.to_be_bytes());
    if !no_zeroes {
        p.extend_from_slice(&[0u8; 124]);
    }
    p
}

// ------------------------------------------------------------- transmission

/// A request header, compact or extended, normalised to 64-bit length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub command: u16,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Offset.
    pub offset: u64,
    /// Length (effect length, or payload length with PAYLOAD_LEN).
    pub length: u64,
}

/// Header size of a request.
pub fn request_header_len(extended: bool) -> usize {
    if extended {
        32
    } else {
        28
    }
}

/// Parse a request header (`b` must be `request_header_len(extended)` long).
pub fn parse_request(b: &[u8], extended: bool) -> Result<Request, FramingError> {
    let magic = be32(b);
    let want = if extended { EXTENDED_REQUEST_MAGIC } else { REQUEST_MAGIC };
    if magic != want {
        return Err(FramingError::BadMagic { what: "request", got: magic as u64 });
    }
    let length = if extended { be64(&b[24..]) } else { be32(&b[24..]) as u64 };
    Ok(Request { flags: be16(&b[4..]), command: be16(&b[6..]), cookie: be64(&b[8..]), offset: be64(&b[16..]), length })
}

impl Request {
    /// How many payload bytes follow this header on the wire. These bytes
    /// must be consumed even if the request is refused, to keep framing.
    ///
    /// A WRITE always carries `length` bytes. With extended headers the spec
    /// says a WRITE MUST also set PAYLOAD_LEN, but qemu 10's client sends the
    /// payload without the flag; a WRITE has no payload-free form, so we read
    /// it either way. Other extended requests carry a payload iff
    /// PAYLOAD_LEN is set.
    pub fn payload_len(&self, extended: bool) -> u64 {
        if self.command == CMD_WRITE || (extended && self.flags & CMD_FLAG_PAYLOAD_LEN != 0) {
            self.length
        } else {
            0
        }
    }
}

/// Which reply framing the connection negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMode {
    /// Simple replies only.
    Simple,
    /// Structured replies (NBD_OPT_STRUCTURED_REPLY).
    Structured,
    /// Extended headers (NBD_OPT_EXTENDED_HEADERS).
    Extended,
}

/// A reply or chunk header built on the stack (at most 32 bytes).
#[derive(Clone, Copy)]
pub struct ReplyHeader {
    bytes: [u8; 32],
    len: usize,
}

impl ReplyHeader {
    fn new() -> Self {
        ReplyHeader { bytes: [0; 32], len: 0 }
    }

    fn put(&mut self, b: &[u8]) {
        self.bytes[self.len..self.len + b.len()].copy_from_slice(b);
        self.len += b.len();
    }

    /// The header's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// A simple reply header.
pub fn simple_reply(error: u32, cookie: u64) -> ReplyHeader {
    let mut h = ReplyHeader::new();
    h.put(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h.put(&error.to_be_bytes());
    h.put(&cookie.to_be_bytes());
    h
}

/// A structured (or extended) chunk header for a payload of `payload_len`
/// bytes. `req_offset` is echoed only by extended headers.
pub fn chunk_header(
    mode: ReplyMode,
    flags: u16,
    kind: u16,
    cookie: u64,
    req_offset: u64,
    payload_len: u64,
) -> ReplyHeader {
    let mut h = ReplyHeader::new();
    match mode {
        ReplyMode::Extended => {
            h.put(&EXTENDED_REPLY_MAGIC.to_be_bytes());
            h.put(&flags.to_be_bytes());
            h.put(&kind.to_be_bytes());
            h.put(&cookie.to_be_bytes());
            h.put(&req_offset.to_be_bytes());
            h.put(&payload_len.to_be_bytes());
        }
        _ => {
            h.put(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            h.put(&flags.to_be_bytes());
            h.put(&kind.to_be_bytes());
            h.put(&cookie.to_be_bytes());
            h.put(&(payload_len as u32).to_be_bytes());
        }
    }
    h
}

/// Append a structured (or extended) chunk header; see [`chunk_header`].
pub fn encode_chunk_header(
    out: &mut Vec<u8>,
    mode: ReplyMode,
    flags: u16,
    kind: u16,
    cookie: u64,
    req_offset: u64,
    payload_len: u64,
) {
    out.extend_from_slice(chunk_header(mode, flags, kind, cookie, req_offset, payload_len).as_bytes());
}

/// Truncate a message to the spec's string limit on a char boundary.
pub fn clamp_message(msg: &str) -> &str {
    if msg.len() <= MAX_STRING {
        return msg;
    }
    let mut end = MAX_STRING;
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    &msg[..end]
}

/// Append an ERROR (or ERROR_OFFSET when `offset` is given) chunk. `flags`
/// is `REPLY_FLAG_DONE` when it ends the reply.
#[allow(clippy::too_many_arguments)]
pub fn encode_error_chunk(
    out: &mut Vec<u8>,
    mode: ReplyMode,
    flags: u16,
    cookie: u64,
    req_offset: u64,
    error: u32,
    msg: &str,
    offset: Option<u64>,
) {
    let msg = clamp_message(msg);
    let len = 6 + msg.len() + if offset.is_some() { 8 } else { 0 };
    let kind = if offset.is_some() { REPLY_TYPE_ERROR_OFFSET } else { REPLY_TYPE_ERROR };
    encode_chunk_header(out, mode, flags, kind, cookie, req_offset, len as u64);
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg.as_bytes());
    if let Some(o) = offset {
        out.extend_from_slice(&o.to_be_bytes());
    }
}

/// Append a BLOCK_STATUS (compact) or BLOCK_STATUS_EXT (extended) chunk
/// with DONE for one context. `extents` are (length, flags) pairs.
pub fn encode_block_status(
    out: &mut Vec<u8>,
    mode: ReplyMode,
    cookie: u64,
    req_offset: u64,
    context: u32,
    extents: &[(u64, u32)],
) {
    if mode == ReplyMode::Extended {
        let len = 8 + 16 * extents.len() as u64;
        encode_chunk_header(out, mode, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS_EXT, cookie, req_offset, len);
        out.extend_from_slice(&context.to_be_bytes());
        out.extend_from_slice(&(extents.len() as u32).to_be_bytes());
        for &(l, f) in extents {
            out.extend_from_slice(&l.to_be_bytes());
            out.extend_from_slice(&(f as u64).to_be_bytes());
        }
    } else {
        let len = 4 + 8 * extents.len() as u64;
        encode_chunk_header(out, mode, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, cookie, req_offset, len);
        out.extend_from_slice(&context.to_be_bytes());
        for &(l, f) in extents {
            out.extend_from_slice(&(l as u32).to_be_bytes());
            out.extend_from_slice(&f.to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info_data(name: &str, reqs: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    #[test]
    fn greeting_is_fixed_newstyle_with_no_zeroes() {
        let g = server_greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3);
    }

    #[test]
    fn client_flags() {
        assert_eq!(parse_client_flags([0, 0, 0, 3]).unwrap(), ClientFlags { fixed_newstyle: true, no_zeroes: true });
        assert!(parse_client_flags([0, 0, 0, 4]).is_err());
        assert!(parse_client_flags([0x80, 0, 0, 1]).is_err());
    }

    #[test]
    fn option_header_magic() {
        let mut h = [0u8; 16];
        h[..8].copy_from_slice(b"IHAVEOPT");
        h[11] = 7;
        h[15] = 9;
        assert_eq!(OptionHeader::parse(&h).unwrap(), OptionHeader { option: 7, length: 9 });
        h[0] = b'X';
        assert!(OptionHeader::parse(&h).is_err());
    }

    #[test]
    fn info_and_go_parse() {
        let d = info_data("disk", &[3, 1]);
        assert_eq!(
            parse_option(OPT_GO, &d).unwrap(),
            ClientOption::Go(InfoRequest { name: "disk".into(), requests: vec![3, 1] })
        );
        // Name length running past the data.
        let mut bad = d.clone();
        bad[3] = 200;
        assert!(parse_option(OPT_INFO, &bad).is_err());
        // Trailing garbage and truncated request list.
        let mut trailing = d.clone();
        trailing.push(0);
        assert!(parse_option(OPT_INFO, &trailing).is_err());
        assert!(parse_option(OPT_INFO, &d[..d.len() - 1]).is_err());
        // NUL in name.
        assert!(parse_option(OPT_GO, &info_data("a\0b", &[])).is_err());
    }

    #[test]
    fn data_on_dataless_options_is_invalid() {
        assert!(parse_option(OPT_LIST, b"x").is_err());
        assert!(parse_option(OPT_STARTTLS, b"x").is_err());
        assert!(parse_option(OPT_STRUCTURED_REPLY, b"x").is_err());
        assert!(parse_option(OPT_EXTENDED_HEADERS, b"x").is_err());
        assert_eq!(parse_option(OPT_ABORT, b"ignored").unwrap(), ClientOption::Abort);
        assert_eq!(parse_option(999, b"zz").unwrap(), ClientOption::Unknown(999));
    }

    #[test]
    fn meta_context_parse() {
        let mut d = 4u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"disk");
        d.extend_from_slice(&2u32.to_be_bytes());
        for q in ["base:allocation", "qemu:dirty"] {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        match parse_option(OPT_SET_META_CONTEXT, &d).unwrap() {
            ClientOption::SetMetaContext(r) => {
                assert_eq!(r.queries, vec!["base:allocation", "qemu:dirty"])
            }
            o => panic!("{o:?}"),
        }
        assert!(parse_option(OPT_LIST_META_CONTEXT, &d[..d.len() - 2]).is_err());
    }

    #[test]
    fn request_round_trip() {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&CMD_FLAG_FUA.to_be_bytes());
        b.extend_from_slice(&CMD_WRITE.to_be_bytes());
        b.extend_from_slice(&0xdead_beef_u64.to_be_bytes());
        b.extend_from_slice(&4096u64.to_be_bytes());
        b.extend_from_slice(&512u32.to_be_bytes());
        let r = parse_request(&b, false).unwrap();
        assert_eq!(r, Request { flags: 1, command: 1, cookie: 0xdead_beef, offset: 4096, length: 512 });
        assert_eq!(r.payload_len(false), 512);
        b[0] = 0;
        assert!(parse_request(&b, false).is_err());
    }

    #[test]
    fn export_name_reply_sizes() {
        assert_eq!(export_name_reply(1, 1, false).len(), 134);
        assert_eq!(export_name_reply(1, 1, true).len(), 10);
    }

    #[test]
    fn error_chunk_layout() {
        let mut out = Vec::new();
        encode_error_chunk(&mut out, ReplyMode::Structured, REPLY_FLAG_DONE, 7, 0, NBD_EINVAL, "bad", None);
        assert_eq!(out.len(), 20 + 6 + 3);
        assert_eq!(&out[4..6], &REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&out[6..8], &REPLY_TYPE_ERROR.to_be_bytes());
        assert_eq!(&out[16..20], &9u32.to_be_bytes());
        let mut bs = Vec::new();
        encode_block_status(&mut bs, ReplyMode::Structured, 1, 0, 9, &[(4096, 3), (512, 0)]);
        assert_eq!(bs.len(), 20 + 4 + 16);
        let mut ext = Vec::new();
        encode_block_status(&mut ext, ReplyMode::Extended, 1, 0, 9, &[(1 << 40, 3)]);
        assert_eq!(ext.len(), 32 + 8 + 16);
        assert_eq!(&ext[6..8], &REPLY_TYPE_BLOCK_STATUS_EXT.to_be_bytes());
        let long = "é".repeat(3000);
        assert!(clamp_message(&long).len() <= MAX_STRING);
    }

    mod fuzz {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn parsers_never_panic_on_arbitrary_bytes(opt in any::<u32>(), data in prop::collection::vec(any::<u8>(), 0..300)) {
                let _ = parse_option(opt, &data);
                for code in [OPT_INFO, OPT_GO, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, OPT_EXPORT_NAME] {
                    let _ = parse_option(code, &data);
                }
                if data.len() >= 32 {
                    let _ = parse_request(&data[..28], false);
                    let _ = parse_request(&data[..32], true);
                    let h: [u8; 16] = data[..16].try_into().unwrap();
                    let _ = OptionHeader::parse(&h);
                    let _ = parse_client_flags(data[..4].try_into().unwrap());
                }
            }

            #[test]
            fn info_requests_round_trip(name in "[a-z0-9/._-]{0,40}", reqs in prop::collection::vec(any::<u16>(), 0..20)) {
                let mut d = (name.len() as u32).to_be_bytes().to_vec();
                d.extend_from_slice(name.as_bytes());
                d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
                for r in &reqs {
                    d.extend_from_slice(&r.to_be_bytes());
                }
                prop_assert_eq!(parse_option(OPT_INFO, &d).unwrap(), ClientOption::Info(InfoRequest { name: name.clone(), requests: reqs.clone() }));
                // Any truncation is refused, never misread.
                for cut in 0..d.len() {
                    prop_assert!(parse_option(OPT_INFO, &d[..cut]).is_err());
                }
            }

            #[test]
            fn requests_round_trip(flags in any::<u16>(), cmd in any::<u16>(), cookie in any::<u64>(), offset in any::<u64>(), len in any::<u32>()) {
                let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
                b.extend_from_slice(&flags.to_be_bytes());
                b.extend_from_slice(&cmd.to_be_bytes());
                b.extend_from_slice(&cookie.to_be_bytes());
                b.extend_from_slice(&offset.to_be_bytes());
                b.extend_from_slice(&len.to_be_bytes());
                let r = parse_request(&b, false).unwrap();
                prop_assert_eq!(r, Request { flags, command: cmd, cookie, offset, length: len as u64 });
            }
        }
    }
}
