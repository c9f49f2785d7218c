//! TLS with rustls (ring provider, TLS 1.2 and 1.3 only): the server's
//! certificates, the STARTTLS handshake, and a TLS stream whose reading and
//! writing halves work from different threads.
//!
//! Transmission reads requests on one thread while workers write replies on
//! others, but a TLS session is one state machine. [`TlsStream::split`]
//! gives a reader and a writer sharing the `rustls::ServerConnection` behind
//! a mutex that is only ever held for in-memory work (decrypting bytes
//! already read, encrypting a buffer): the reader reads the socket with the
//! lock released and feeds what it got under the lock; the writer encrypts
//! under the lock and sends outside it. A second mutex owns the socket's
//! sending side; it is taken *before* the connection lock whenever records
//! are taken out of the connection, so records reach the wire in the order
//! they were sealed whoever sends them.

use crate::export::{Export, ExportSet};
use crate::transport::{PendingInput, SocketReader, Stream};
use rustls::crypto::ring as provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

/// The server's TLS policy for every connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// STARTTLS offered; exports with `tls = "required"` need it.
    On,
    /// Every option but STARTTLS and ABORT needs TLS first (FORCEDTLS).
    Require,
}

/// TLS settings as given by flags and the main config file (flags win;
/// `main.rs` merges them).
#[derive(Debug, Default, Clone)]
pub struct TlsOptions {
    /// `off`, `on` or `require` (None: off).
    pub mode: Option<String>,
    /// Directory in the nbdkit/libnbd layout.
    pub certificates: Option<PathBuf>,
    /// Server certificate chain (PEM); overrides the directory's.
    pub cert: Option<PathBuf>,
    /// Server private key (PEM); overrides the directory's.
    pub key: Option<PathBuf>,
    /// CA certificates for client certificates (PEM); overrides the directory's.
    pub ca: Option<PathBuf>,
    /// CRL(s) (PEM); overrides the directory's optional `ca-crl.pem`.
    pub crl: Option<PathBuf>,
    /// Require client certificates signed by the CA.
    pub verify_peer: bool,
    /// A TLS-PSK key file: refused.
    pub psk: Option<PathBuf>,
}

/// Where the certificate material is read from (again on every reload).
#[derive(Debug, Clone)]
struct Files {
    cert: PathBuf,
    key: PathBuf,
    ca: Option<PathBuf>,
    crl: Option<PathBuf>,
}

/// The server's TLS side: mode, and the configuration new sessions use.
pub struct TlsServer {
    /// The mode.
    pub mode: TlsMode,
    /// Client certificates are required and verified.
    pub verify_peer: bool,
    files: Files,
    config: RwLock<Arc<ServerConfig>>,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsServer").field("mode", &self.mode).field("files", &self.files).finish()
    }
}

impl TlsOptions {
    /// Check the settings and load the certificates. `None`: TLS is off.
    pub fn build(&self) -> Result<Option<Arc<TlsServer>>, String> {
        if let Some(p) = &self.psk {
            return Err(format!(
                "TLS-PSK ({}) is not supported: rustls has no support for external pre-shared keys \
                 (rustls issue #174); use X.509 certificates (--tls-certificates DIR)",
                p.display()
            ));
        }
        let mode = match self.mode.as_deref().unwrap_or("off") {
            "off" => {
                if self.verify_peer {
                    return Err("--tls-verify-peer needs TLS: add --tls on or --tls require".into());
                }
                return Ok(None);
            }
            "on" => TlsMode::On,
            "require" => TlsMode::Require,
            other => return Err(format!("--tls: `{other}` is not one of off, on, require")),
        };
        let in_dir = |name: &str| self.certificates.as_ref().map(|d| d.join(name));
        let (Some(cert), Some(key)) =
            (self.cert.clone().or(in_dir("server-cert.pem")), self.key.clone().or(in_dir("server-key.pem")))
        else {
            return Err("TLS needs a server certificate and key: --tls-certificates DIR (with server-cert.pem and \
                 server-key.pem) or --tls-cert FILE and --tls-key FILE"
                .into());
        };
        let ca = self.ca.clone().or(in_dir("ca-cert.pem"));
        // The directory's CRL is optional; an explicit one must exist.
        let crl = self.crl.clone().or(in_dir("ca-crl.pem").filter(|p| p.exists()));
        if self.verify_peer && ca.is_none() {
            return Err("--tls-verify-peer needs the CA that signs client certificates: --tls-certificates DIR \
                 (with ca-cert.pem) or --tls-ca FILE"
                .into());
        }
        let files = Files { cert, key, ca: if self.verify_peer { ca } else { None }, crl };
        let config = load_config(&files, self.verify_peer)?;
        let what = match mode {
            TlsMode::On => "on (STARTTLS offered)",
            TlsMode::Require => "require (every client must use TLS)",
        };
        log::info!(
            "TLS {what}: certificate {}{}",
            files.cert.display(),
            if self.verify_peer { ", client certificates required" } else { "" }
        );
        Ok(Some(Arc::new(TlsServer { mode, verify_peer: self.verify_peer, files, config: RwLock::new(config) })))
    }
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{what} {}: {}", path.display(), pem_error(e)))?;
    if certs.is_empty() {
        return Err(format!("{what} {}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it", path.display()));
    }
    Ok(certs)
}

fn pem_error(e: rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(e) => e.to_string(),
        rustls::pki_types::pem::Error::NoItemsFound => "no PEM item of the expected kind in it".into(),
        other => format!("not valid PEM: {other:?}"),
    }
}

/// Say at load time if a CRL is past its next update: clients with
/// certificates are refused until a fresh one is installed.
fn warn_if_stale(path: &Path, crls: &[CertificateRevocationListDer<'_>]) {
    for der in crls {
        let Ok((_, crl)) = x509_parser::parse_x509_crl(der) else { continue };
        if let Some(next) = crl.next_update() {
            if next < x509_parser::time::ASN1Time::now() {
                log::warn!(
                    "CRL {} is out of date (next update was {next}): clients with certificates are refused \
                     until a fresh CRL is installed (SIGHUP reloads it)",
                    path.display()
                );
            }
        }
    }
}

/// Read the certificate material and build a rustls configuration.
fn load_config(files: &Files, verify_peer: bool) -> Result<Arc<ServerConfig>, String> {
    let chain = read_certs(&files.cert, "server certificate")?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("server key {}: {}", files.key.display(), pem_error(e)))?;
    if let Ok((_, c)) = x509_parser::parse_x509_certificate(&chain[0]) {
        if !c.validity().is_valid() {
            log::warn!(
                "server certificate {} is not valid now (valid {} to {}): clients will refuse it",
                files.cert.display(),
                c.validity().not_before,
                c.validity().not_after
            );
        }
    }
    let provider = Arc::new(provider::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS setup: {e}"))?;
    let builder = if verify_peer {
        let ca = files.ca.as_ref().expect("checked: verify_peer has a CA");
        let mut roots = RootCertStore::empty();
        for c in read_certs(ca, "CA certificate")? {
            roots.add(c).map_err(|e| format!("CA certificate {}: {e}", ca.display()))?;
        }
        let crls = match &files.crl {
            None => Vec::new(),
            Some(p) => CertificateRevocationListDer::pem_file_iter(p)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("CRL {}: {}", p.display(), pem_error(e)))?,
        };
        if let Some(p) = &files.crl {
            warn_if_stale(p, &crls);
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .with_crls(crls)
            // A CRL is the CA's: certificates below other issuers (which the
            // CRL cannot speak for) are not refused for that.
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status()
            // A CRL past its next update no longer vouches for anyone (as
            // GnuTLS, hence nbdkit and qemu, also holds).
            .enforce_revocation_expiration()
            .build()
            .map_err(|e| format!("client certificate verification ({}): {e}", ca.display()))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("server certificate {} / key {}: {e}", files.cert.display(), files.key.display()))?;
    Ok(Arc::new(config))
}

impl TlsServer {
    /// SIGHUP: re-read certificates, key, CA and CRL. New sessions use the
    /// new ones; on any error the running ones stay.
    pub fn reload(&self) {
        match load_config(&self.files, self.verify_peer) {
            Ok(c) => {
                *self.config.write().unwrap_or_else(|e| e.into_inner()) = c;
                log::info!("TLS certificates reloaded from {}", self.files.cert.display());
            }
            Err(e) => log::error!("TLS reload refused, keeping the running certificates: {e}"),
        }
    }

    /// Run the server side of a TLS handshake on `sock` (right after the
    /// STARTTLS ACK). `Ok(Err(why))`: the handshake failed (the session must
    /// end); `Err`: an I/O error such as the handshake timeout.
    pub fn accept(&self, mut sock: Stream) -> io::Result<Result<TlsStream, String>> {
        let config = self.config.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut conn = match ServerConnection::new(config) {
            Ok(c) => c,
            Err(e) => return Ok(Err(format!("cannot start a TLS session: {e}"))),
        };
        while conn.is_handshaking() {
            if let Err(e) = conn.complete_io(&mut sock) {
                if let Some(te) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                    return Ok(Err(describe_failure(te)));
                }
                return match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Err(e),
                    io::ErrorKind::UnexpectedEof => {
                        Ok(Err("the client closed the connection during the TLS handshake (does it trust our \
                                certificate's CA, and does the name it connected to match the certificate?)"
                            .into()))
                    }
                    _ => Ok(Err(format!("I/O error during the TLS handshake: {e}"))),
                };
            }
        }
        let identities =
            conn.peer_certificates().and_then(|c| c.first()).map(|c| certificate_identities(c)).unwrap_or_default();
        let version = match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLS 1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLS 1.2",
            _ => "TLS",
        };
        let suite = conn.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())).unwrap_or_default();
        let description = format!("{version}, {suite}");
        // Encrypt whatever a writer hands over at once; the writer drains
        // it right away, so memory stays bounded by the caller's buffer.
        conn.set_buffer_limit(None);
        // The client's first request may have come with its last handshake
        // message, and be decrypted already.
        let plaintext = conn.process_new_packets().map_or(0, |s| s.plaintext_bytes_to_read());
        let reader_sock = sock.try_clone()?;
        let shared = Arc::new(Shared { conn: Mutex::new(conn), out: Mutex::new(Out { sock, buf: Vec::new() }) });
        Ok(Ok(TlsStream {
            reader: TlsReader {
                shared: shared.clone(),
                sock: SocketReader::new(reader_sock, true),
                buf: vec![0; 32 * 1024],
                start: 0,
                end: 0,
                eof: false,
                plaintext,
                closed: false,
                failed: None,
            },
            writer: TlsWriter { shared },
            identities,
            description,
        }))
    }
}

/// Why a handshake failed, in words an operator can act on.
pub fn describe_failure(e: &rustls::Error) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    match e {
        E::NoCertificatesPresented => {
            "the client sent no certificate, and --tls-verify-peer requires one (no client certificate; \
             GnuTLS clients such as qemu and libnbd also send none when theirs is not signed by our CA)"
                .into()
        }
        E::InvalidCertificate(c) => match c {
            C::UnknownIssuer => "the client certificate is not signed by our CA (unknown CA)".into(),
            C::Expired | C::ExpiredContext { .. } => format!("the client certificate has expired ({e})"),
            C::NotValidYet | C::NotValidYetContext { .. } => format!("the client certificate is not valid yet ({e})"),
            C::Revoked => "the client certificate is revoked by the CRL".into(),
            C::ExpiredRevocationList | C::ExpiredRevocationListContext { .. } => format!(
                "our CRL is out of date, so no client certificate can be checked against it: install a \
                 fresh CRL and send SIGHUP ({e})"
            ),
            C::BadSignature => "the client certificate's signature is bad (unknown CA?)".into(),
            _ => format!("the client certificate was refused: {e}"),
        },
        E::AlertReceived(a @ (A::UnknownCA | A::BadCertificate | A::CertificateUnknown | A::CertificateExpired)) => {
            format!("the client refused our certificate (alert {a:?}): it does not trust our CA, or the name does not match")
        }
        E::AlertReceived(a) => format!("the client aborted the handshake (alert {a:?})"),
        E::PeerIncompatible(p) => format!("no common TLS version or cipher with the client ({p:?})"),
        E::InvalidMessage(_) | E::InappropriateMessage { .. } | E::InappropriateHandshakeMessage { .. } => {
            format!("the client does not speak TLS after STARTTLS ({e})")
        }
        other => format!("TLS handshake failed: {other}"),
    }
}

/// The names a client certificate vouches for: subject CNs, then DNS,
/// e-mail, URI and IP subject alternative names.
pub fn certificate_identities(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else { return Vec::new() };
    let mut out: Vec<String> =
        cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok().map(|s| s.to_string())).collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(s) | GeneralName::RFC822Name(s) | GeneralName::URI(s) => out.push(s.to_string()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => out.push(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).unwrap()).to_string()),
                    16 => out.push(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*b).unwrap()).to_string()),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    out
}

/// Does `export` need TLS before a client may use it (SELECTIVETLS or
/// FORCEDTLS), given the server's TLS side?
pub fn export_requires_tls(tls: Option<&TlsServer>, export: &Export) -> bool {
    tls.is_some_and(|t| {
        t.mode == TlsMode::Require || export.spec.tls_required || !export.spec.tls_identities.is_empty()
    })
}

/// May a client with these certificate identities use `export`? `Err`
/// says why not.
pub fn identity_allowed(export: &Export, identities: &[String]) -> Result<(), String> {
    let allowed = &export.spec.tls_identities;
    if allowed.is_empty() {
        return Ok(());
    }
    if identities.is_empty() {
        return Err(format!(
            "export `{}` is only for certain client identities and the client has no certificate",
            export.name
        ));
    }
    // Names in certificates (DNS names, e-mail domains, CNs as used in
    // practice) do not depend on case: "Alice" in a snippet is alice.
    if identities.iter().any(|i| allowed.iter().any(|a| a.eq_ignore_ascii_case(i))) {
        return Ok(());
    }
    Err(format!("client identity [{}] is not in the tls-identities of export `{}`", identities.join(", "), export.name))
}

/// Exports whose settings cannot work with the server's TLS side.
pub fn check_exports(tls: Option<&TlsServer>, exports: &ExportSet) -> Result<(), String> {
    let mut errors = Vec::new();
    for e in exports.iter() {
        let src = e.spec.source.display();
        match tls {
            None if e.spec.tls_required => {
                errors.push(format!("{src}: export `{}` has tls = \"required\" but TLS is off (--tls on)", e.name))
            }
            None if !e.spec.tls_identities.is_empty() => errors.push(format!(
                "{src}: export `{}` has tls-identities but TLS is off (--tls on --tls-verify-peer)",
                e.name
            )),
            Some(t) if !t.verify_peer && !e.spec.tls_identities.is_empty() => errors.push(format!(
                "{src}: export `{}` has tls-identities but client certificates are not verified (--tls-verify-peer)",
                e.name
            )),
            _ => {}
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("\n"))
    }
}

// ------------------------------------------------------------ the stream

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Decrypted bytes rustls holds before it refuses more ciphertext (its
/// received-plaintext limit); the reader stops feeding there.
const PLAINTEXT_HELD: usize = 16 * 1024;

/// The sending side of the socket, with a scratch buffer for records.
struct Out {
    sock: Stream,
    buf: Vec<u8>,
}

/// State shared by the reader and the writer. Lock order: `out`, then
/// `conn`; `conn` is never held across socket I/O.
struct Shared {
    conn: Mutex<ServerConnection>,
    out: Mutex<Out>,
}

impl Shared {
    /// Send every record the connection has queued.
    fn send_queued(&self, out: &mut Out) -> io::Result<()> {
        out.buf.clear();
        {
            let mut c = lock(&self.conn);
            while c.wants_write() {
                c.write_tls(&mut out.buf)?;
            }
        }
        let r = out.sock.write_all(&out.buf);
        if out.buf.capacity() > 1 << 20 {
            out.buf = Vec::new();
        }
        r
    }

    fn flush_out(&self) -> io::Result<()> {
        let mut out = lock(&self.out);
        self.send_queued(&mut out)
    }

    /// From the reader: send what reading produced (a TLS 1.3 key update,
    /// an alert) unless a writer is sending, which then carries it with its
    /// next records. Never blocks on the writer.
    fn flush_out_if_free(&self) {
        if let Ok(mut out) = self.out.try_lock() {
            let _ = self.send_queued(&mut out);
        }
    }
}

/// A TLS session on a socket, used from one thread (the option phase) or
/// split into a reader and a writer (transmission).
pub struct TlsStream {
    reader: TlsReader,
    writer: TlsWriter,
    identities: Vec<String>,
    description: String,
}

impl TlsStream {
    /// Names in the client's certificate (empty without one).
    pub fn identities(&self) -> &[String] {
        &self.identities
    }
    /// Version and cipher suite, for logs.
    pub fn description(&self) -> &str {
        &self.description
    }
    /// A handle that can end the session properly later.
    pub fn closer(&self) -> TlsCloser {
        TlsCloser(self.writer.shared.clone())
    }
    /// Halves for different threads.
    pub fn split(self) -> (TlsReader, TlsWriter) {
        (self.reader, self.writer)
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read(buf)
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.writer.flush()
    }
}

/// Ends a TLS session with close_notify.
pub struct TlsCloser(Arc<Shared>);

impl TlsCloser {
    /// Send close_notify (after anything still queued). Errors are
    /// ignored: the peer may be gone.
    pub fn close(&self) {
        let mut out = lock(&self.0.out);
        lock(&self.0.conn).send_close_notify();
        let _ = self.0.send_queued(&mut out);
    }
}

/// The reading half.
pub struct TlsReader {
    shared: Arc<Shared>,
    sock: SocketReader,
    /// Ciphertext read from the socket, `start..end` not yet fed to rustls.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
    /// Decrypted bytes rustls holds for us (as of our last look).
    plaintext: usize,
    /// The client sent close_notify: reads return the end of the stream.
    closed: bool,
    /// An error found while looking ahead, for the next read to report.
    failed: Option<io::Error>,
}

impl TlsReader {
    /// Hand rustls the ciphertext we hold (at EOF: tell it the stream
    /// ended) and decrypt what forms whole records. Only when no plaintext
    /// is waiting, so rustls's plaintext buffer never overflows. True if
    /// anything was fed.
    fn feed(&mut self) -> io::Result<bool> {
        if self.plaintext > 0 || (self.start == self.end && !self.eof) {
            return Ok(false);
        }
        let mut c = lock(&self.shared.conn);
        // rustls takes at most 4 KiB per read_tls and holds at most one
        // record it has not decrypted: feed and decrypt in turns until all
        // we hold is in, or rustls holds as much plaintext as it will
        // (~16 KiB). Handing over several requests at once lets the
        // transmission phase answer them in one batch.
        let processed = loop {
            let mut pending = &self.buf[self.start..self.end];
            let n = c.read_tls(&mut pending)?;
            self.start += n;
            let processed = c.process_new_packets();
            match &processed {
                Ok(state) if self.start < self.end && n > 0 && state.plaintext_bytes_to_read() < PLAINTEXT_HELD => {}
                _ => break processed,
            }
        };
        let wants_write = c.wants_write();
        drop(c);
        if wants_write {
            // A TLS 1.3 key update or an alert to answer.
            self.shared.flush_out_if_free();
        }
        match processed {
            Ok(state) => {
                self.plaintext = state.plaintext_bytes_to_read();
                if state.peer_has_closed() {
                    // rustls takes nothing after close_notify, and it is
                    // to be ignored anyway (RFC 8446, 6.1).
                    self.closed = true;
                    self.start = self.end;
                }
                Ok(true)
            }
            Err(e) => Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    }

    /// One read of the socket into our ciphertext buffer, which must have
    /// been fed to rustls whole (it is overwritten). May block.
    fn read_socket(&mut self) -> io::Result<()> {
        let n = self.sock.read(&mut self.buf)?;
        (self.start, self.end, self.eof) = (0, n, n == 0);
        Ok(())
    }

    /// Keep `e` for the next read, which then reports it at once.
    fn fail(&mut self, e: io::Error) -> bool {
        self.failed = Some(e);
        true
    }
}

impl PendingInput for TlsReader {
    fn holds_input(&mut self) -> bool {
        if self.failed.is_some() {
            return true;
        }
        // One feed hands rustls all we hold, unless plaintext comes out
        // first (or close_notify, after which the rest is dropped).
        if self.plaintext == 0 && !self.eof && !self.closed && self.start < self.end {
            if let Err(e) = self.feed() {
                // An error is input too: the next read reports it.
                return self.fail(e);
            }
        }
        self.plaintext > 0 || self.eof || self.closed
    }

    fn input_ready(&mut self) -> bool {
        if self.holds_input() {
            return true;
        }
        if self.start < self.end || !self.sock.socket().readable_now() {
            // What we hold is part of a record: the rest is not here yet.
            return false;
        }
        // The socket has bytes (or its end): this read does not block.
        match self.read_socket() {
            Ok(()) => self.holds_input(),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => false,
            Err(e) => self.fail(e),
        }
    }
    fn available(&mut self) -> io::Result<usize> {
        // Decrypts what has arrived (reading the socket only if it has
        // bytes); an error found on the way is kept for the next read.
        self.input_ready();
        Ok(if self.failed.is_some() { 0 } else { self.plaintext })
    }

    fn wait_for_input(&mut self) -> io::Result<()> {
        // Until a record decrypts: a socket that is readable may hold only
        // part of one.
        while !self.holds_input() {
            if self.start < self.end {
                // Fed and yet nothing came out: leave it to a read.
                return Ok(());
            }
            match self.read_socket() {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => r?,
            }
        }
        Ok(())
    }

    fn read_now(&mut self, bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        // Only what is decrypted: the socket is not touched.
        let mut conn = lock(&self.shared.conn);
        let mut n = 0;
        for b in bufs.iter_mut().filter(|b| !b.is_empty()) {
            match conn.reader().read(b) {
                Ok(0) if n == 0 => return Ok(0),
                Ok(k) => {
                    n += k;
                    self.plaintext = self.plaintext.saturating_sub(k);
                    if k < b.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.plaintext = 0;
                    break;
                }
                Err(e) => return if n == 0 { Err(e) } else { Ok(n) },
            }
        }
        if n == 0 && bufs.iter().any(|b| !b.is_empty()) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }
}

impl Read for TlsReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        loop {
            // Asked even when our count says nothing is there: a read is
            // cheap, and a wrong count must never leave a request unread.
            match lock(&self.shared.conn).reader().read(out) {
                // 0: the client sent close_notify.
                Ok(n) => {
                    self.plaintext = self.plaintext.saturating_sub(n);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.plaintext = 0,
                // UnexpectedEof: the socket closed without close_notify.
                Err(e) => return Err(e),
            }
            // What is fed may produce plaintext: look before blocking on
            // the socket.
            if !self.feed()? {
                // The socket read happens without any lock held.
                self.read_socket()?;
            }
        }
    }
}

/// The writing half.
pub struct TlsWriter {
    shared: Arc<Shared>,
}

impl Write for TlsWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        // Seal at most this much at once, so a huge reply does not sit
        // encrypted in memory in full before it is sent.
        let data = &data[..data.len().min(256 * 1024)];
        let mut out = lock(&self.shared.out);
        let n = lock(&self.shared.conn).writer().write(data)?;
        self.shared.send_queued(&mut out)?;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.shared.flush_out()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc;
    use std::time::Duration;

    /// A CA, and a server certificate for `localhost` signed by it.
    fn pki() -> (CertificateDer<'static>, Arc<ServerConfig>) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name.push(rcgen::DnType::CommonName, "test CA");
        ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        let config = ServerConfig::builder_with_provider(Arc::new(provider::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], PrivateKeyDer::try_from(key.serialize_der()).unwrap())
            .unwrap();
        (ca_cert.der().clone(), Arc::new(config))
    }

    /// A server requiring TLS with `pki`'s certificate, and its CA.
    fn test_server() -> (CertificateDer<'static>, TlsServer) {
        let (ca, config) = pki();
        let server = TlsServer {
            mode: TlsMode::Require,
            verify_peer: false,
            files: Files { cert: PathBuf::new(), key: PathBuf::new(), ca: None, crl: None },
            config: RwLock::new(config),
        };
        (ca, server)
    }

    /// A client configuration trusting `ca`, speaking only `version`.
    fn client_config(
        ca: CertificateDer<'static>,
        version: &'static rustls::SupportedProtocolVersion,
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(ca).unwrap();
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider::default_provider()))
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(cfg)
    }

    /// The records `c` has queued, as they would go on the wire.
    fn queued(c: &mut rustls::ClientConnection) -> Vec<u8> {
        let mut wire = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        wire
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8).collect()
    }

    /// The reader and writer halves run on different threads at once; the
    /// client first sends everything, then reads, so the server's writer
    /// blocks on a full socket while its reader must keep going. Holding
    /// the connection lock across socket I/O would deadlock here. Ends with
    /// close_notify, which the client sees as a clean end of stream.
    fn duplex(version: &'static rustls::SupportedProtocolVersion) {
        let (ca, server) = test_server();
        let (a, b) = UnixStream::pair().unwrap();
        const UP: usize = 6 << 20;
        const DOWN: usize = 5 << 20;
        let (done_tx, done_rx) = mpsc::channel();
        let client = std::thread::spawn(move || {
            let conn =
                rustls::ClientConnection::new(client_config(ca, version), "localhost".try_into().unwrap()).unwrap();
            let mut s = rustls::StreamOwned::new(conn, b);
            let up = pattern(UP, 1);
            for chunk in up.chunks(70_001) {
                s.write_all(chunk).unwrap();
            }
            s.flush().unwrap();
            let mut down = vec![0u8; DOWN];
            s.read_exact(&mut down).unwrap();
            assert!(down == pattern(DOWN, 2), "data from the server differs");
            // close_notify: a clean end of stream, not UnexpectedEof.
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).expect("clean TLS close");
            assert!(rest.is_empty());
            done_tx.send(()).unwrap();
        });
        let tls = server.accept(Stream::Unix(a)).unwrap().unwrap();
        assert!(tls.description().starts_with(if version == &rustls::version::TLS13 { "TLS 1.3" } else { "TLS 1.2" }));
        let closer = tls.closer();
        let (mut r, mut w) = tls.split();
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; UP];
            let mut n = 0;
            while n < UP {
                let k = r.read(&mut got[n..(n + 9000).min(UP)]).unwrap();
                assert!(k > 0, "early EOF");
                n += k;
            }
            assert!(got == pattern(UP, 1), "data from the client differs");
        });
        let writer = std::thread::spawn(move || {
            let down = pattern(DOWN, 2);
            for chunk in down.chunks(128 * 1024 + 3) {
                w.write_all(chunk).unwrap();
                w.flush().unwrap();
            }
        });
        writer.join().unwrap();
        reader.join().unwrap();
        closer.close();
        done_rx.recv_timeout(Duration::from_secs(60)).expect("client finished");
        client.join().unwrap();
    }

    /// A client may send its first request in the same write as its last
    /// handshake message; the server then decrypts it during the handshake.
    /// It must be read from there, not waited for on the socket.
    #[test]
    fn data_that_came_with_the_handshake_is_read_at_once() {
        let (mut r, _w, _c, _b) = session(b"first request");
        assert!(r.holds_input(), "the request is waiting, decrypted");
        let mut got = [0u8; 13];
        r.read_exact(&mut got).expect("the data that came with the handshake");
        assert_eq!(&got, b"first request");
        assert!(!r.holds_input(), "everything was read");
    }

    /// A server session and the client's end of it, handshake done, with
    /// the client driven by hand (its records written only when asked).
    /// The client's last handshake message and `first` leave in one write.
    /// A server read that would wait for the client fails after 5 s.
    fn session(first: &[u8]) -> (TlsReader, TlsWriter, rustls::ClientConnection, UnixStream) {
        let (ca, server) = test_server();
        let (a, mut b) = UnixStream::pair().unwrap();
        a.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let first = first.to_vec();
        let client = std::thread::spawn(move || {
            let cfg = client_config(ca, &rustls::version::TLS13);
            let mut c = rustls::ClientConnection::new(cfg, "localhost".try_into().unwrap()).unwrap();
            while c.is_handshaking() {
                if c.wants_write() {
                    c.write_tls(&mut b).unwrap();
                } else {
                    c.read_tls(&mut b).unwrap();
                    c.process_new_packets().unwrap();
                }
            }
            c.writer().write_all(&first).unwrap();
            b.write_all(&queued(&mut c)).unwrap();
            (c, b)
        });
        let (r, w) = server.accept(Stream::Unix(a)).unwrap().unwrap().split();
        let (c, b) = client.join().unwrap();
        (r, w, c, b)
    }

    /// Call `f` on another thread; fail if it takes more than 5 seconds.
    fn within_5s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || tx.send(f()).unwrap());
        rx.recv_timeout(Duration::from_secs(5)).expect("finished in time (no hang, no endless loop)")
    }

    /// Bytes after close_notify are ignored: looking ahead must neither
    /// spin on them (rustls takes nothing after close_notify) nor wait.
    #[test]
    fn bytes_after_close_notify_end_the_stream() {
        let (r, _w, mut c, mut b) = session(b"");
        c.writer().write_all(b"last request").unwrap();
        c.send_close_notify();
        let mut wire = queued(&mut c);
        wire.extend_from_slice(&[0x17; 6000]);
        b.write_all(&wire).unwrap();
        let got = within_5s(move || {
            let mut r = r;
            assert!(r.input_ready());
            let mut got = vec![0u8; 12];
            r.read_exact(&mut got).unwrap();
            assert!(r.input_ready() && r.holds_input(), "the end of the stream is there at once");
            assert_eq!(r.read(&mut [0u8; 16]).unwrap(), 0, "a clean end");
            got
        });
        assert_eq!(got, b"last request");
        drop(b);
    }

    /// A record that fails to decrypt while looking ahead is reported by
    /// the next read, at once: not lost, and not turned into a wait.
    #[test]
    fn a_bad_record_found_while_looking_ahead_is_reported_by_the_next_read() {
        let (r, _w, mut c, mut b) = session(b"");
        c.writer().write_all(b"a request").unwrap();
        let mut wire = queued(&mut c);
        let last = wire.len() - 1;
        wire[last] ^= 0x55; // the tag no longer matches
        b.write_all(&wire).unwrap();
        let kind = within_5s(move || {
            let mut r = r;
            assert!(r.input_ready(), "an error is input: the read must not wait");
            r.read(&mut [0u8; 64]).unwrap_err().kind()
        });
        assert_eq!(kind, io::ErrorKind::InvalidData);
        drop(b);
    }

    /// What a write received into lent memory relies on: `available`
    /// counts only decrypted bytes, which a read then returns without
    /// waiting; `wait_for_input` sleeps through part of a record and wakes
    /// for a whole one, and for the end of the stream.
    #[test]
    fn available_counts_decrypted_bytes_and_waiting_ends_with_a_whole_record() {
        let (r, _w, mut c, mut b) = session(b"");
        c.writer().write_all(&[7u8; 20_000]).unwrap(); // two records
        let wire = queued(&mut c);
        b.write_all(&wire[..wire.len() - 10]).unwrap(); // the second cut short
        let (r, b) = within_5s(move || {
            let mut r = r;
            let here = r.available().unwrap();
            assert!(here > 0 && here < 20_000, "the first record only: {here}");
            let mut got = vec![0u8; here];
            r.read_exact(&mut got).unwrap();
            assert!(got.iter().all(|&x| x == 7));
            assert_eq!(r.available().unwrap(), 0, "part of a record is not input");
            // The rest of the record comes later: the wait lasts until then.
            let late = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                b.write_all(&wire[wire.len() - 10..]).unwrap();
                b
            });
            let t = std::time::Instant::now();
            r.wait_for_input().unwrap();
            assert!(t.elapsed() >= Duration::from_millis(40), "woke for part of a record");
            assert_eq!(r.available().unwrap(), 20_000 - here);
            (r, late.join().unwrap())
        });
        // (Not dropped: unread bytes in its buffer would make that a reset.)
        b.shutdown(std::net::Shutdown::Write).unwrap();
        within_5s(move || {
            let mut r = r;
            r.read_exact(&mut vec![0u8; r.plaintext]).unwrap();
            r.wait_for_input().unwrap(); // the end of the stream wakes it
            assert_eq!(r.read(&mut [0u8; 8]).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        });
    }

    /// Run `duplex` with a deadline: a deadlock fails the test, not hangs it.
    fn duplex_within_deadline(version: &'static rustls::SupportedProtocolVersion) {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            duplex(version);
            tx.send(()).unwrap();
        });
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(()) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("duplex failed (see the panic above)"),
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("reader and writer deadlocked"),
        }
    }

    #[test]
    fn split_stream_reads_and_writes_at_once_tls13() {
        duplex_within_deadline(&rustls::version::TLS13);
    }

    #[test]
    fn split_stream_reads_and_writes_at_once_tls12() {
        duplex_within_deadline(&rustls::version::TLS12);
    }

    #[test]
    fn identities_come_from_cn_and_san() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["host.example".to_string()]).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, "alice");
        p.subject_alt_names.push(rcgen::SanType::IpAddress("10.1.2.3".parse().unwrap()));
        p.subject_alt_names.push(rcgen::SanType::Rfc822Name("a@example.org".try_into().unwrap()));
        let c = p.self_signed(&key).unwrap();
        assert_eq!(certificate_identities(c.der()), ["alice", "host.example", "10.1.2.3", "a@example.org"]);
        assert!(certificate_identities(b"not a certificate").is_empty());
    }

    #[test]
    fn options_are_checked() {
        let o = |mode: &str| TlsOptions { mode: Some(mode.into()), ..Default::default() };
        assert!(o("off").build().unwrap().is_none());
        assert!(o("sometimes").build().unwrap_err().contains("off, on, require"));
        assert!(o("on").build().unwrap_err().contains("--tls-certificates"));
        let psk = TlsOptions { psk: Some("/k.psk".into()), ..o("on") };
        let e = psk.build().unwrap_err();
        assert!(e.contains("TLS-PSK") && e.contains("#174"), "{e}");
        let verify = TlsOptions { verify_peer: true, cert: Some("/c".into()), key: Some("/k".into()), ..o("on") };
        assert!(verify.build().unwrap_err().contains("CA"));
        let missing = TlsOptions { certificates: Some("/nonexistent".into()), ..o("require") };
        assert!(missing.build().unwrap_err().contains("/nonexistent/server-cert.pem"));
    }
}
