//! TLS: STARTTLS with real clients (nbdinfo, nbdcopy, nbdsh, python libnbd,
//! qemu-img), the three modes' option rules with a raw client, client
//! certificates and per-export identities, handshake failures, and SIGHUP
//! reload of certificates. Every certificate is made here with rcgen.

use nbdhost_tests::*;
use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason, RevokedCertParams,
    SanType, SerialNumber,
};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_LIST_META_CONTEXT: u32 = 9;
const OPT_SET_META_CONTEXT: u32 = 10;
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_META_CONTEXT: u32 = 4;
const ERR_UNKNOWN: u32 = 0x8000_0006;
const ERR_POLICY: u32 = 0x8000_0002;
const ERR_INVALID: u32 = 0x8000_0003;
const ERR_TLS_REQD: u32 = 0x8000_0005;
const TFLAG_SEND_DF: u16 = 1 << 7;

// ------------------------------------------------------------ certificates

/// A certificate authority.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
struct Leaf {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let pem = p.self_signed(&key).unwrap().pem();
        Ca { pem, issuer: Issuer::new(p, key) }
    }

    /// A certificate for a client named `cn`, valid until `until` (year),
    /// with serial number `serial`.
    fn client(&self, cn: &str, until: i32, serial: u64) -> Leaf {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.subject_alt_names.push(SanType::Rfc822Name(format!("{cn}@example.org").try_into().unwrap()));
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        p.not_before = date_time_ymd(2019, 1, 1);
        p.not_after = date_time_ymd(until, 1, 1);
        p.serial_number = Some(SerialNumber::from(serial));
        self.sign(p)
    }

    /// The server's certificate: localhost and 127.0.0.1.
    fn server(&self) -> Leaf {
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        p.distinguished_name.push(DnType::CommonName, "localhost");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        self.sign(p)
    }

    fn sign(&self, p: CertificateParams) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        Leaf { cert: cert.pem(), key: key.serialize_pem() }
    }

    /// A CRL revoking `serials`.
    fn crl(&self, serials: &[u64]) -> String {
        self.crl_until(serials, 2999)
    }

    /// A CRL revoking `serials`, next updated in `year`.
    fn crl_until(&self, serials: &[u64], year: i32) -> String {
        let p = CertificateRevocationListParams {
            this_update: date_time_ymd(2019, 1, 1),
            next_update: date_time_ymd(year, 1, 1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from(*s),
                    revocation_time: date_time_ymd(2024, 1, 1),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        p.signed_by(&self.issuer).unwrap().pem().unwrap()
    }
}

/// A directory of PEM files in the nbdkit/libnbd layout, inside the test's
/// temporary directory.
fn cert_dir(base: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
    let d = base.join(name);
    std::fs::create_dir_all(&d).unwrap();
    for (f, text) in files {
        std::fs::write(d.join(f), text).unwrap();
    }
    d
}

/// The server's directory: CA, server certificate and key.
fn server_dir(base: &Path, ca: &Ca) -> PathBuf {
    let s = ca.server();
    cert_dir(base, "server", &[("ca-cert.pem", &ca.pem), ("server-cert.pem", &s.cert), ("server-key.pem", &s.key)])
}

/// A client's directory: the CA it trusts and optionally its certificate.
fn client_dir(base: &Path, name: &str, trusts: &Ca, cert: Option<&Leaf>) -> PathBuf {
    let mut files = vec![("ca-cert.pem", trusts.pem.as_str())];
    if let Some(c) = cert {
        files.push(("client-cert.pem", &c.cert));
        files.push(("client-key.pem", &c.key));
    }
    cert_dir(base, name, &files)
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// `nbds://ADDR/EXPORT?tls-certificates=DIR`.
fn nbds(srv: &Server, export: &str, dir: &Path) -> String {
    format!("nbds://{}/{}?tls-certificates={}", srv.addr, export, dir.display())
}

fn mem(ex: &Exports, name: &str, extra: &str) {
    ex.snippet(name, &format!("{extra}[[layer]]\nplugin = \"memory\"\nsize = \"16M\"\n"));
}

fn nbdinfo(args: &[&str]) -> std::process::Output {
    run("nbdinfo", args)
}

fn text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

// ------------------------------------------------------------ raw TLS client

type Tls = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

/// Finish a STARTTLS that `r` just got ACKed: a rustls client trusting
/// `ca`, presenting `cert` if given.
fn upgrade(r: Raw, ca: &Ca, cert: Option<&Leaf>) -> Tls {
    try_upgrade(r, ca, cert).expect("TLS handshake")
}

fn try_upgrade(r: Raw, ca: &Ca, cert: Option<&Leaf>) -> Result<Tls, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap()).unwrap();
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let cfg = match cert {
        None => b.with_no_client_auth(),
        Some(l) => b
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(l.cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(l.key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    let conn = rustls::ClientConnection::new(Arc::new(cfg), "127.0.0.1".try_into().unwrap()).unwrap();
    let mut t = rustls::StreamOwned::new(conn, r.s);
    while t.conn.is_handshaking() {
        t.conn.complete_io(&mut t.sock).map_err(|e| e.to_string())?;
    }
    Ok(t)
}

/// STARTTLS on a fresh fixed-newstyle connection, then TLS.
fn starttls(addr: &str, ca: &Ca, cert: Option<&Leaf>) -> Tls {
    let mut r = Raw::fixed(addr);
    r.option(OPT_STARTTLS, &[]);
    assert_eq!(r.opt_reply(), (OPT_STARTTLS, REP_ACK, vec![]), "STARTTLS ACK");
    upgrade(r, ca, cert)
}

fn send_opt(s: &mut impl Write, opt: u32, data: &[u8]) {
    let mut b = b"IHAVEOPT".to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
    s.flush().unwrap();
}

fn read_reply(s: &mut impl Read) -> OptReply {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(&h[..8], &0x0003_e889_0455_65a9u64.to_be_bytes(), "option reply magic");
    let mut d = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
    s.read_exact(&mut d).unwrap();
    (u32::from_be_bytes(h[8..12].try_into().unwrap()), u32::from_be_bytes(h[12..16].try_into().unwrap()), d)
}

/// Replies up to the final one.
fn read_replies(s: &mut impl Read) -> Vec<OptReply> {
    let mut v = Vec::new();
    loop {
        let r = read_reply(s);
        let fin = r.1 == REP_ACK || r.1 & 0x8000_0000 != 0;
        v.push(r);
        if fin {
            return v;
        }
    }
}

/// Send an option and return the final reply's type.
fn ask(s: &mut (impl Read + Write), opt: u32, data: &[u8]) -> u32 {
    send_opt(s, opt, data);
    read_replies(s).last().unwrap().1
}

/// Export names in a LIST reply.
fn list(s: &mut (impl Read + Write)) -> Vec<String> {
    send_opt(s, OPT_LIST, &[]);
    let replies = read_replies(s);
    assert_eq!(replies.last().unwrap().1, REP_ACK, "LIST: {replies:?}");
    replies
        .iter()
        .filter(|r| r.1 == REP_SERVER)
        .map(|r| {
            let n = u32::from_be_bytes(r.2[..4].try_into().unwrap()) as usize;
            String::from_utf8(r.2[4..4 + n].to_vec()).unwrap()
        })
        .collect()
}

/// GO to `name`; the transmission flags on success, the error otherwise.
fn go(s: &mut (impl Read + Write), name: &str) -> Result<u16, u32> {
    send_opt(s, OPT_GO, &Raw::info_data(name, &[]));
    let mut flags = None;
    for (_, kind, d) in read_replies(s) {
        if kind & 0x8000_0000 != 0 {
            return Err(kind);
        }
        if kind == 3 && d[..2] == [0, 0] {
            flags = Some(u16::from_be_bytes([d[10], d[11]]));
        }
    }
    Ok(flags.expect("NBD_INFO_EXPORT"))
}

fn meta_data(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

fn request(s: &mut impl Write, cmd: u16, cookie: u64, off: u64, len: u32, payload: &[u8]) {
    let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&cmd.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&off.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(payload);
    s.write_all(&b).unwrap();
    s.flush().unwrap();
}

/// True if the peer closed (EOF, reset, or a TLS close/alert).
fn closed(s: &mut impl Read) -> bool {
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut,
        }
    }
}

// ------------------------------------------------------------ real clients

#[test]
fn nbdcopy_nbdinfo_nbdsh_move_data_through_tls() {
    if !require_tool("nbdinfo") || !require_tool("nbdcopy") || !require_tool("nbdsh") {
        return;
    }
    let ex = Exports::new();
    mem(&ex, "mem", "");
    let ca = Ca::new("test CA");
    let sdir = server_dir(ex.dir.path(), &ca);
    let cdir = client_dir(ex.dir.path(), "client", &ca, None);
    // Traced, to see the writes received into lent memory.
    let srv = Server::start(&ex, &["--tls", "require", "--tls-certificates", &s(&sdir), "--log-level", "trace"]);
    let uri = nbds(&srv, "mem", &cdir);

    let info = nbdinfo(&[&uri]);
    let out = assert_ok("nbdinfo over TLS", &info);
    assert!(out.contains("with TLS"), "{out}");
    assert!(out.contains("16777216"), "{out}");

    // 8 MiB up and back down: many requests in flight at once, so replies
    // are written while requests are still being read.
    let data = random_bytes(8 << 20, 77);
    let src = ex.path("src.img");
    let back = ex.path("back.img");
    std::fs::write(&src, &data).unwrap();
    assert_ok("nbdcopy upload", &run("nbdcopy", &["--requests=16", &s(&src), &uri]));
    assert_ok("nbdcopy download", &run("nbdcopy", &[&uri, &s(&back)]));
    let got = std::fs::read(&back).unwrap();
    assert_eq!(got.len(), 16 << 20);
    assert!(got[..8 << 20] == data[..], "data changed on the way through TLS");
    assert!(got[8 << 20..].iter().all(|&b| b == 0));
    // The payloads went from the TLS session straight into the memory
    // backend's pages (ABI 1.2), record by record.
    assert!(srv.wait_for_log("mem: pwrite_lend"), "no write was received into lent memory\n{}", srv.log());

    let head: String = data[..16].iter().map(|b| format!("{b:02x}")).collect();
    let script = format!(
        "assert h.get_tls_negotiated()\n\
         assert h.pread(16, 0) == bytes.fromhex('{head}')\n\
         h.pwrite(b'tls!' * 128, 1 << 20)\n\
         assert h.pread(512, 1 << 20) == b'tls!' * 128\n"
    );
    // nbdsh -u refuses URIs naming local files (tls-certificates) unless
    // the handle allows it first.
    let o = std::process::Command::new("nbdsh")
        .env("PATH", format!("/usr/bin:/bin:{}", std::env::var("PATH").unwrap_or_default()))
        .args(["-c", "h.set_uri_allow_local_file(True)", "-c", &format!("h.connect_uri({uri:?})"), "-c", &script])
        .output()
        .expect("run nbdsh");
    assert_ok("nbdsh over TLS", &o);
    assert!(srv.log().contains("TLS established (TLS 1.3"), "{}", srv.log());
}

#[test]
fn python_libnbd_with_tls_require_and_many_requests_in_flight() {
    if !require_python_nbd() {
        return;
    }
    let ex = Exports::new();
    mem(&ex, "mem", "");
    let ca = Ca::new("test CA");
    let sdir = server_dir(ex.dir.path(), &ca);
    let cdir = client_dir(ex.dir.path(), "client", &ca, None);
    let srv = Server::start(&ex, &["--tls", "on", "--tls-certificates", &s(&sdir)]);
    let o = python(
        r#"
import nbd, sys
h = nbd.NBD()
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_certificates(sys.argv[3])
h.set_export_name("mem")
h.connect_tcp(sys.argv[1], sys.argv[2])
assert h.get_tls_negotiated()
def wait(cookies):
    pending = set(cookies)
    while True:
        pending = {c for c in pending if not h.aio_command_completed(c)}
        if not pending:
            return
        h.poll(-1)
N = 64
blobs = [bytes([(i * 13 + j) % 251 for j in range(251)]) * 261 for i in range(N)]  # 65511 bytes
wait([h.aio_pwrite(blobs[i], i * 65536) for i in range(N)])
bufs = [nbd.Buffer(len(blobs[i])) for i in range(N)]
wait([h.aio_pread(bufs[i], i * 65536) for i in range(N)])
bad = [i for i in range(N) if bufs[i].to_bytearray() != blobs[i]]
assert not bad, "blocks differ: %r" % bad[:5]
h.shutdown()
print("ok")
"#,
        &[srv.host(), srv.port(), &s(&cdir)],
    );
    let out = assert_ok("python libnbd over TLS", &o);
    assert!(out.contains("ok"));
    // The session ended with close_notify after DISC, not a broken stream.
    assert!(srv.wait_for_log("TLS established (TLS 1.3"), "{}", srv.log());
}

#[test]
fn qemu_img_round_trip_through_a_tls_only_export() {
    if !require_tool("qemu-img") {
        return;
    }
    let ex = Exports::new();
    mem(&ex, "locked", "tls = \"required\"\n");
    let ca = Ca::new("test CA");
    let sdir = server_dir(ex.dir.path(), &ca);
    let cdir = client_dir(ex.dir.path(), "client", &ca, None);
    let srv = Server::start(&ex, &["--tls", "on", "--tls-certificates", &s(&sdir)]);
    let creds = format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", cdir.display());
    let opts = format!("driver=nbd,host={},port={},export=locked,tls-creds=tls0", srv.host(), srv.port());
    let data = random_bytes(4 << 20, 5);
    let src = ex.path("src.img");
    let back = ex.path("back.img");
    std::fs::write(&src, &data).unwrap();
    assert_ok(
        "qemu-img convert to nbd+tls",
        &run("qemu-img", &["convert", "-n", "--object", &creds, "-f", "raw", &s(&src), "--target-image-opts", &opts]),
    );
    assert_ok(
        "qemu-img convert from nbd+tls",
        &run("qemu-img", &["convert", "--object", &creds, "--image-opts", &opts, "-O", "raw", &s(&back)]),
    );
    let got = std::fs::read(&back).unwrap();
    assert!(got[..4 << 20] == data[..], "data changed through qemu-img and TLS");
    // Without TLS the export cannot be opened.
    let plain = run("qemu-img", &["info", &format!("nbd://{}/locked", srv.addr)]);
    assert!(!plain.status.success(), "plain qemu-img opened a TLS-only export: {}", text(&plain));
}

// ------------------------------------------------------------ client certificates

#[test]
fn client_certificates_and_per_export_identities() {
    if !require_tool("nbdinfo") {
        return;
    }
    let ex = Exports::new();
    mem(&ex, "shared", "");
    // Names match whatever their case.
    mem(&ex, "alices", "tls-identities = [\"Alice\", \"carol@EXAMPLE.org\"]\n");
    let ca = Ca::new("test CA");
    let sdir = server_dir(ex.dir.path(), &ca);
    let alice = ca.client("alice", 2999, 10);
    let bob = ca.client("bob", 2999, 11);
    let carol = ca.client("carol", 2999, 12);
    let adir = client_dir(ex.dir.path(), "alice", &ca, Some(&alice));
    let bdir = client_dir(ex.dir.path(), "bob", &ca, Some(&bob));
    let cdir = client_dir(ex.dir.path(), "carol", &ca, Some(&carol));
    let srv = Server::start(&ex, &["--tls", "require", "--tls-verify-peer", "--tls-certificates", &s(&sdir)]);

    // Alice (by CN) and carol (by e-mail SAN) may use it; bob may not.
    assert_ok("alice", &nbdinfo(&[&nbds(&srv, "alices", &adir)]));
    assert_ok("carol", &nbdinfo(&[&nbds(&srv, "alices", &cdir)]));
    let o = nbdinfo(&[&nbds(&srv, "alices", &bdir)]);
    assert!(!o.status.success(), "bob got in: {}", text(&o));
    assert!(
        srv.wait_for_log("client identity [bob, bob@example.org] is not in the tls-identities of export `alices`"),
        "{}",
        srv.log()
    );
    // Bob still reaches the unrestricted export.
    assert_ok("bob on shared", &nbdinfo(&[&nbds(&srv, "shared", &bdir)]));
    // LIST shows each client what it may use.
    let l = assert_ok("alice list", &nbdinfo(&["--list", &nbds(&srv, "", &adir)]));
    assert!(l.contains("alices") && l.contains("shared"), "{l}");
    let l = assert_ok("bob list", &nbdinfo(&["--list", &nbds(&srv, "", &bdir)]));
    assert!(!l.contains("alices") && l.contains("shared"), "{l}");

    // Raw: GO is refused with ERR_POLICY, EXPORT_NAME hangs up.
    let mut t = starttls(&srv.addr, &ca, Some(&bob));
    assert_eq!(go(&mut t, "alices"), Err(ERR_POLICY));
    assert!(go(&mut t, "shared").is_ok());
    let mut t = starttls(&srv.addr, &ca, Some(&bob));
    send_opt(&mut t, OPT_EXPORT_NAME, b"alices");
    assert!(closed(&mut t), "EXPORT_NAME to a forbidden export was not refused");
    let mut t = starttls(&srv.addr, &ca, Some(&alice));
    send_opt(&mut t, OPT_EXPORT_NAME, b"alices");
    let mut reply = [0u8; 10];
    t.read_exact(&mut reply).unwrap();
    assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), 16 << 20);
}

#[test]
fn failed_handshakes_end_only_that_session_and_say_why() {
    if !require_tool("nbdinfo") {
        return;
    }
    let ex = Exports::new();
    mem(&ex, "mem", "");
    let ca = Ca::new("test CA");
    let other = Ca::new("someone else's CA");
    let sdir = server_dir(ex.dir.path(), &ca);
    std::fs::write(sdir.join("ca-crl.pem"), ca.crl(&[66])).unwrap();
    let good = ca.client("good", 2999, 1);
    let expired = ca.client("old", 2020, 2);
    let revoked = ca.client("revoked", 2999, 66);
    let stranger = other.client("stranger", 2999, 3);
    let srv = Server::start(&ex, &["--tls", "require", "--tls-verify-peer", "--tls-certificates", &s(&sdir)]);
    let base = ex.dir.path();
    // A GnuTLS client whose certificate comes from another CA sends none:
    // the log says that this may be why.
    let o = nbdinfo(&[&nbds(&srv, "mem", &client_dir(base, "otherca", &ca, Some(&stranger)))]);
    assert!(!o.status.success(), "a certificate from another CA got in: {}", text(&o));
    assert!(srv.wait_for_log("send none when theirs is not signed by our CA"), "{}", srv.log());

    let cases: [(&str, PathBuf, &str); 4] = [
        ("no certificate", client_dir(base, "none", &ca, None), "no client certificate"),
        ("expired certificate", client_dir(base, "expired", &ca, Some(&expired)), "has expired"),
        ("revoked certificate", client_dir(base, "revoked", &ca, Some(&revoked)), "revoked by the CRL"),
        // GnuTLS hangs up without an alert when it does not trust the server.
        (
            "client trusts another CA",
            client_dir(base, "wrongca", &other, Some(&good)),
            "does it trust our certificate's CA",
        ),
    ];
    for (what, dir, why) in &cases {
        let o = nbdinfo(&[&nbds(&srv, "mem", dir)]);
        assert!(!o.status.success(), "{what}: nbdinfo succeeded: {}", text(&o));
        assert!(srv.wait_for_log(why), "{what}: no log line with `{why}`:\n{}", srv.log());
    }
    // GnuTLS does not offer a certificate the server's CA list does not
    // name; a client that does is refused for it.
    let mut r = Raw::fixed(&srv.addr);
    r.option(OPT_STARTTLS, &[]);
    assert_eq!(r.opt_reply().1, REP_ACK);
    if let Ok(mut t) = try_upgrade(r, &ca, Some(&stranger)) {
        // (TLS 1.3: the client finishes before the server checks it.)
        send_opt(&mut t, OPT_LIST, &[]);
        assert!(closed(&mut t), "a certificate from another CA was accepted");
    }
    assert!(srv.wait_for_log("(unknown CA)"), "{}", srv.log());
    // rustls says why it does not trust the server with an alert.
    let mut r = Raw::fixed(&srv.addr);
    r.option(OPT_STARTTLS, &[]);
    assert_eq!(r.opt_reply().1, REP_ACK);
    assert!(try_upgrade(r, &other, Some(&good)).is_err());
    assert!(srv.wait_for_log("the client refused our certificate (alert"), "{}", srv.log());
    assert!(srv.log().contains("TLS handshake failed"), "{}", srv.log());
    // The server is fine and serves a good client.
    let gdir = client_dir(base, "good", &ca, Some(&good));
    assert_ok("good client", &nbdinfo(&[&nbds(&srv, "mem", &gdir)]));
}

/// A CRL past its next update vouches for no one: clients with
/// certificates are refused, and both the start-up log and each refusal
/// say why and what to do.
#[test]
fn an_out_of_date_crl_refuses_clients_and_says_so() {
    if !require_tool("nbdinfo") {
        return;
    }
    let ex = Exports::new();
    mem(&ex, "mem", "");
    let ca = Ca::new("test CA");
    let sdir = server_dir(ex.dir.path(), &ca);
    std::fs::write(sdir.join("ca-crl.pem"), ca.crl_until(&[66], 2020)).unwrap();
    let good = ca.client("good", 2999, 1);
    let gdir = client_dir(ex.dir.path(), "good", &ca, Some(&good));
    let srv = Server::start(&ex, &["--tls", "require", "--tls-verify-peer", "--tls-certificates", &s(&sdir)]);
    assert!(srv.wait_for_log("is out of date (next update was"), "{}", srv.log());
    let o = nbdinfo(&[&nbds(&srv, "mem", &gdir)]);
    assert!(!o.status.success(), "a client was let in on an expired CRL: {}", text(&o));
    assert!(srv.wait_for_log("our CRL is out of date"), "{}", srv.log());
    // A fresh CRL and SIGHUP let the same client in.
    std::fs::write(sdir.join("ca-crl.pem"), ca.crl(&[66])).unwrap();
    srv.signal(libc::SIGHUP);
    assert!(srv.wait_for_log("TLS certificates reloaded"), "{}", srv.log());
    assert_ok("good client with a fresh CRL", &nbdinfo(&[&nbds(&srv, "mem", &gdir)]));
}

// ------------------------------------------------------------ option rules

#[test]
fn require_mode_serves_only_starttls_and_abort_before_tls() {
    let ex = Exports::new();
    mem(&ex, "mem", "");
    let ca = Ca::new("test CA");
    let sdir = server_dir(ex.dir.path(), &ca);
    let srv = Server::start(&ex, &["--tls", "require", "--tls-certificates", &s(&sdir)]);

    let mut r = Raw::fixed(&srv.addr);
    let info = Raw::info_data("mem", &[]);
    let meta = meta_data("mem", &["base:allocation"]);
    for (opt, data) in [
        (OPT_LIST, &[][..]),
        (OPT_INFO, &info[..]),
        (OPT_GO, &info[..]),
        (OPT_STRUCTURED_REPLY, &[][..]),
        (OPT_LIST_META_CONTEXT, &meta[..]),
        (OPT_SET_META_CONTEXT, &meta[..]),
        (4242, &b"unknown"[..]),
    ] {
        r.option(opt, data);
        let (o, kind, _) = r.opt_reply();
        assert_eq!((o, kind), (opt, ERR_TLS_REQD), "option {opt} before TLS");
    }
    r.option(OPT_ABORT, &[]);
    assert_eq!(r.opt_reply(), (OPT_ABORT, REP_ACK, vec![]));

    // EXPORT_NAME before TLS ends the session.
    let mut r = Raw::fixed(&srv.addr);
    r.option(OPT_EXPORT_NAME, b"mem");
    assert!(r.closed(), "EXPORT_NAME before TLS was not refused");
    assert!(srv.wait_for_log("EXPORT_NAME before STARTTLS"), "{}", srv.log());

    // After STARTTLS everything is served, and never ERR_TLS_REQD.
    let mut t = starttls(&srv.addr, &ca, None);
    assert_eq!(list(&mut t), vec!["mem".to_string()]);
    assert_eq!(ask(&mut t, 4242, b"x"), 0x8000_0001, "unknown options are ERR_UNSUP under TLS");
    assert_eq!(ask(&mut t, OPT_INFO, &info), REP_ACK);
    assert_eq!(ask(&mut t, OPT_STARTTLS, &[]), ERR_INVALID, "STARTTLS twice");
    let flags = go(&mut t, "mem").expect("GO under TLS");
    assert_eq!(flags & 1, 1);
    request(&mut t, 1, 7, 4096, 512, &[0x5a; 512]);
    let mut h = [0u8; 16];
    t.read_exact(&mut h).unwrap();
    assert_eq!(u32::from_be_bytes(h[4..8].try_into().unwrap()), 0, "write error");
    request(&mut t, 0, 8, 4096, 512, &[]);
    t.read_exact(&mut h).unwrap();
    assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), 8);
    let mut d = [0u8; 512];
    t.read_exact(&mut d).unwrap();
    assert!(d.iter().all(|&b| b == 0x5a));
    // DISC: the server ends TLS with close_notify (a clean EOF for rustls).
    request(&mut t, 2, 9, 0, 0, &[]);
    let mut rest = Vec::new();
    t.read_to_end(&mut rest).expect("close_notify, not a truncated TLS stream");
    assert!(rest.is_empty());
}

#[test]
fn selective_tls_guards_only_tls_only_exports() {
    let ex = Exports::new();
    mem(&ex, "open", "");
    mem(&ex, "locked", "tls = \"required\"\n");
    let ca = Ca::new("test CA");
    let sdir = server_dir(ex.dir.path(), &ca);
    let srv = Server::start(&ex, &["--tls", "on", "--tls-certificates", &s(&sdir)]);

    let mut r = Raw::fixed(&srv.addr);
    let mut p = Raw::fixed(&srv.addr);
    // Plain: LIST hides the TLS-only export; INFO/GO for it are ERR_TLS_REQD;
    // other options and other exports work; an unknown export is UNKNOWN.
    assert_eq!(list(&mut r.s), vec!["open".to_string()]);
    assert_eq!(ask(&mut r.s, OPT_INFO, &Raw::info_data("locked", &[])), ERR_TLS_REQD);
    assert_eq!(ask(&mut r.s, OPT_GO, &Raw::info_data("locked", &[])), ERR_TLS_REQD);
    assert_eq!(ask(&mut r.s, OPT_GO, &Raw::info_data("nothere", &[])), ERR_UNKNOWN);
    assert_eq!(ask(&mut r.s, OPT_STRUCTURED_REPLY, &[]), REP_ACK);
    // ERR_TLS_REQD is only for INFO/GO/EXPORT_NAME.
    let meta = ask(&mut r.s, OPT_LIST_META_CONTEXT, &meta_data("locked", &["base:allocation"]));
    assert_eq!(meta, ERR_POLICY);
    assert_eq!(ask(&mut r.s, OPT_LIST_META_CONTEXT, &meta_data("open", &["base:allocation"])), REP_ACK);
    assert!(go(&mut r.s, "open").is_ok());
    // EXPORT_NAME for the TLS-only export hangs up.
    p.option(OPT_EXPORT_NAME, b"locked");
    assert!(p.closed(), "EXPORT_NAME for a TLS-only export without TLS");
    // Under TLS both are listed and usable.
    let mut t = starttls(&srv.addr, &ca, None);
    let mut names = list(&mut t);
    names.sort();
    assert_eq!(names, vec!["locked".to_string(), "open".to_string()]);
    assert!(go(&mut t, "locked").is_ok());

    if require_tool("nbdinfo") {
        let cdir = client_dir(ex.dir.path(), "client", &ca, None);
        assert_ok("plain nbdinfo on open", &nbdinfo(&[&srv.uri("open")]));
        let o = nbdinfo(&[&srv.uri("locked")]);
        assert!(!o.status.success(), "plain client opened a TLS-only export: {}", text(&o));
        let l = assert_ok("plain list", &nbdinfo(&["--list", &srv.uri("")]));
        assert!(!l.contains("locked"), "{l}");
        let l = assert_ok("TLS list", &nbdinfo(&["--list", &nbds(&srv, "", &cdir)]));
        assert!(l.contains("locked") && l.contains("open"), "{l}");
        assert_ok("TLS nbdinfo on locked", &nbdinfo(&[&nbds(&srv, "locked", &cdir)]));
    }
}

#[test]
fn starttls_forgets_what_was_negotiated_before_it() {
    let ex = Exports::new();
    mem(&ex, "mem", "");
    let ca = Ca::new("test CA");
    let sdir = server_dir(ex.dir.path(), &ca);
    let srv = Server::start(&ex, &["--tls", "on", "--tls-certificates", &s(&sdir)]);

    // Structured replies and a meta context in plain text, then STARTTLS:
    // structured replies can be negotiated again (they were forgotten) and
    // BLOCK_STATUS finds no context.
    let mut r = Raw::fixed(&srv.addr);
    assert_eq!(ask(&mut r.s, OPT_STRUCTURED_REPLY, &[]), REP_ACK);
    send_opt(&mut r.s, OPT_SET_META_CONTEXT, &meta_data("mem", &["base:allocation"]));
    let replies = read_replies(&mut r.s);
    assert_eq!(replies.iter().map(|x| x.1).collect::<Vec<_>>(), vec![REP_META_CONTEXT, REP_ACK]);
    r.option(OPT_STARTTLS, &[]);
    assert_eq!(r.opt_reply().1, REP_ACK);
    let mut t = upgrade(r, &ca, None);
    assert_eq!(ask(&mut t, OPT_STRUCTURED_REPLY, &[]), REP_ACK, "structured replies survived STARTTLS");
    go(&mut t, "mem").unwrap();
    request(&mut t, 7, 1, 0, 4096, &[]);
    let mut h = [0u8; 20];
    t.read_exact(&mut h).unwrap();
    assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), 0x668e_33ef, "structured reply");
    let kind = u16::from_be_bytes([h[6], h[7]]);
    assert!(kind & 0x8000 != 0, "BLOCK_STATUS succeeded with a context chosen before STARTTLS");
    let mut payload = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
    t.read_exact(&mut payload).unwrap();
    assert_eq!(u32::from_be_bytes(payload[..4].try_into().unwrap()), 22, "EINVAL");

    // Structured replies before STARTTLS only: GO's flags and the replies
    // are those of simple replies.
    let mut r = Raw::fixed(&srv.addr);
    assert_eq!(ask(&mut r.s, OPT_STRUCTURED_REPLY, &[]), REP_ACK);
    r.option(OPT_STARTTLS, &[]);
    assert_eq!(r.opt_reply().1, REP_ACK);
    let mut t = upgrade(r, &ca, None);
    let flags = go(&mut t, "mem").unwrap();
    assert_eq!(flags & TFLAG_SEND_DF, 0, "SEND_DF without structured replies");
    request(&mut t, 0, 2, 0, 512, &[]);
    let mut h = [0u8; 16];
    t.read_exact(&mut h).unwrap();
    assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), 0x6744_6698, "simple reply expected");
}

/// TLS 1.3 key updates arrive between requests, right behind them. The
/// server must answer them (with its own key update) and must not mistake
/// the readable socket for a next request and hold replies back waiting
/// for one the client will not send before it has its reply.
#[test]
fn key_updates_between_requests_neither_hold_replies_back_nor_break_the_session() {
    let ex = Exports::new();
    mem(&ex, "mem", "");
    let ca = Ca::new("test CA");
    let sdir = server_dir(ex.dir.path(), &ca);
    let srv = Server::start(&ex, &["--tls", "require", "--tls-certificates", &s(&sdir)]);
    let mut t = starttls(&srv.addr, &ca, None);
    go(&mut t, "mem").unwrap();
    // A reply that does not come fails the test instead of hanging it.
    t.sock.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    // Each write leaves at once (no Nagle delay), so the key update
    // arrives right behind its request.
    t.sock.set_nodelay(true).unwrap();
    let block = |i: u64| -> Vec<u8> { (0..4096u64).map(|j| (i * 7 + j * 13) as u8).collect() };
    for i in 0..300u64 {
        request(&mut t, 1, i, i * 4096, 4096, &block(i));
        // The key update leaves in its own write, just behind the request.
        t.conn.refresh_traffic_keys().unwrap();
        t.flush().unwrap();
        let mut h = [0u8; 16];
        t.read_exact(&mut h).unwrap_or_else(|e| panic!("reply to write {i} after a key update: {e}"));
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), 0x6744_6698, "simple reply");
        assert_eq!(u32::from_be_bytes(h[4..8].try_into().unwrap()), 0, "write {i} succeeded");
        assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), i, "cookie");
    }
    // Everything written is there, read back under the newest keys.
    request(&mut t, 0, 1000, 0, 300 * 4096, &[]);
    let mut h = [0u8; 16];
    t.read_exact(&mut h).unwrap();
    assert_eq!(u32::from_be_bytes(h[4..8].try_into().unwrap()), 0);
    let mut data = vec![0u8; 300 * 4096];
    t.read_exact(&mut data).unwrap();
    for i in 0..300u64 {
        assert!(data[(i * 4096) as usize..((i + 1) * 4096) as usize] == block(i)[..], "block {i} differs");
    }
}

#[test]
fn without_tls_starttls_is_policy_and_tls_reqd_never_appears() {
    let ex = Exports::new();
    mem(&ex, "mem", "");
    let srv = Server::start(&ex, &[]);
    let mut r = Raw::fixed(&srv.addr);
    assert_eq!(ask(&mut r.s, OPT_STARTTLS, &[]), ERR_POLICY);
    assert_eq!(list(&mut r.s), vec!["mem".to_string()]);
    assert_eq!(ask(&mut r.s, OPT_INFO, &Raw::info_data("mem", &[])), REP_ACK);
    assert_eq!(ask(&mut r.s, OPT_GO, &Raw::info_data("nothere", &[])), ERR_UNKNOWN);
    assert!(go(&mut r.s, "mem").is_ok());
}

// ------------------------------------------------------------ configuration

fn check(ex: &Exports, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["--exports-dir".to_string(), ex.dir_str(), "--check".into()];
    args.extend(extra.iter().map(|a| a.to_string()));
    let a: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
    run(nbdhost_bin().to_str().unwrap(), &a)
}

#[test]
fn tls_configuration_errors_are_refused_with_a_reason() {
    let ex = Exports::new();
    mem(&ex, "mem", "");
    let ca = Ca::new("test CA");
    let sdir = server_dir(ex.dir.path(), &ca);
    let sd = s(&sdir);
    let refused = |extra: &[&str], want: &str| {
        let o = check(&ex, extra);
        assert!(!o.status.success(), "{extra:?} accepted");
        let t = text(&o);
        assert!(t.contains(want), "{extra:?}: expected `{want}` in:\n{t}");
    };
    refused(&["--tls", "on", "--tls-psk", "/etc/keys.psk"], "rustls issue #174");
    refused(&["--tls", "on"], "--tls-certificates DIR");
    refused(&["--tls", "maybe", "--tls-certificates", &sd], "not one of off, on, require");
    refused(&["--tls", "on", "--tls-certificates", "/nonexistent"], "/nonexistent/server-cert.pem");
    refused(
        &["--tls", "on", "--tls-cert", &s(&sdir.join("ca-cert.pem")), "--tls-key", &s(&sdir.join("ca-cert.pem"))],
        "server key",
    );
    assert_ok("good TLS setup", &check(&ex, &["--tls", "require", "--tls-verify-peer", "--tls-certificates", &sd]));

    // Per-export keys that cannot work with the server's TLS setting.
    mem(&ex, "locked", "tls = \"required\"\n");
    refused(&[], "tls = \"required\" but TLS is off");
    mem(&ex, "locked", "tls-identities = [\"alice\"]\n");
    refused(&["--tls", "on", "--tls-certificates", &sd], "client certificates are not verified");
    assert_ok(
        "identities with verify-peer",
        &check(&ex, &["--tls", "on", "--tls-verify-peer", "--tls-certificates", &sd]),
    );
    mem(&ex, "locked", "tls = \"always\"\n");
    refused(&["--tls", "on", "--tls-certificates", &sd], "locked.toml:1: key `tls`");

    // The main config file takes the same settings.
    std::fs::remove_file(ex.path("locked.toml")).unwrap();
    let conf = ex.path("main.conf");
    std::fs::write(&conf, format!("tls = \"require\"\ntls_certificates = \"{sd}\"\ntls_verify_peer = true\n")).unwrap();
    let o = check(&ex, &["--config", &s(&conf)]);
    assert!(text(&o).contains("TLS require"), "{}", text(&o));
    assert_ok("TLS from the main config", &o);
}

#[test]
fn sighup_reloads_certificates_for_new_connections() {
    let ex = Exports::new();
    mem(&ex, "mem", "");
    let ca1 = Ca::new("first CA");
    let ca2 = Ca::new("second CA");
    let sdir = server_dir(ex.dir.path(), &ca1);
    let srv = Server::start(&ex, &["--tls", "require", "--tls-certificates", &s(&sdir)]);
    let mut before = starttls(&srv.addr, &ca1, None);
    assert!(go(&mut before, "mem").is_ok());

    // New files signed by another CA; SIGHUP.
    let leaf = ca2.server();
    std::fs::write(sdir.join("server-cert.pem"), &leaf.cert).unwrap();
    std::fs::write(sdir.join("server-key.pem"), &leaf.key).unwrap();
    srv.signal(libc::SIGHUP);
    assert!(srv.wait_for_log("TLS certificates reloaded"), "{}", srv.log());
    let mut t = starttls(&srv.addr, &ca2, None);
    assert!(go(&mut t, "mem").is_ok());
    // A client trusting only the old CA now refuses the server.
    let mut r = Raw::fixed(&srv.addr);
    r.option(OPT_STARTTLS, &[]);
    assert_eq!(r.opt_reply().1, REP_ACK);
    let e = try_upgrade(r, &ca1, None).expect_err("the old certificate is still served");
    assert!(e.contains("UnknownIssuer"), "{e}");
    // The connection made before the reload still works.
    request(&mut before, 0, 1, 0, 512, &[]);
    let mut h = [0u8; 16];
    before.read_exact(&mut h).unwrap();
    assert_eq!(u32::from_be_bytes(h[4..8].try_into().unwrap()), 0);

    // A broken file keeps the running certificates.
    std::fs::write(sdir.join("server-cert.pem"), "garbage").unwrap();
    srv.signal(libc::SIGHUP);
    assert!(srv.wait_for_log("TLS reload refused"), "{}", srv.log());
    let mut t = starttls(&srv.addr, &ca2, None);
    assert!(go(&mut t, "mem").is_ok());
}
