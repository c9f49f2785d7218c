//! Raw-bytes conformance suite for the NBD protocol.
//!
//! One test per rule of section 3 ("Easy-to-miss MUST/SHOULD rules") of the
//! protocol checklist (`/work/shared/reference/nbd-protocol-checklist.md`),
//! plus hostile input. Every test speaks raw bytes to the real `nbdhost`
//! binary; the test names say which rule they check, and the doc comment
//! cites the checklist item (`#N`). After every hostile case the server must
//! still be alive and serve a fresh client ([`assert_still_serving`]).
//!
//! The wire helpers (structured and extended reply chunks, extended
//! requests, pipelined reply collection) live in the private `wire` module
//! below; every chunk read through it is checked against the chunk-level
//! rules of the spec (lengths, DONE, error message limits).

use nbdhost_tests::*;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use wire::*;

// ------------------------------------------------------------------ helpers

/// A 64 MiB sparse RAM disk every server in this suite serves as `mem`.
const MEM: &str = "description = \"RAM disk\"\n[[layer]]\nplugin = \"memory\"\nsize = \"64M\"\n";
const MIB: u64 = 1 << 20;

/// Start a server with `mem` plus `extra` snippets (name, body).
fn start(extra: &[(&str, &str)]) -> (Exports, Server) {
    let ex = Exports::new();
    ex.snippet("mem", MEM);
    for (name, body) in extra {
        ex.snippet(name, body);
    }
    let srv = Server::start(&ex, &[]);
    (ex, srv)
}

/// The server process is alive and a fresh client can GO to `mem`, write
/// and read back its data.
fn assert_still_serving(srv: &mut Server) {
    static N: AtomicU64 = AtomicU64::new(0);
    assert!(srv.alive(), "server died:\n{}", srv.log());
    let n = N.fetch_add(1, Ordering::SeqCst);
    let off = 63 * MIB + (n % 256) * 4096;
    let data = random_bytes(4096, 0x5eed_0000 + n);
    let mut c = Conn::open(&srv.addr, "mem", Mode::Simple, false);
    assert_eq!(c.write(off, &data), 0, "fresh client: write failed\n{}", srv.log());
    assert_eq!(c.read(off, 4096), Ok(data), "fresh client: data differs\n{}", srv.log());
    c.disc();
    assert!(srv.alive(), "server died:\n{}", srv.log());
    assert!(!srv.log().contains("panicked"), "server log shows a panic:\n{}", srv.log());
}

/// GO/INFO replies for `name` with info requests `reqs`.
fn info_replies(r: &mut Raw, opt: u32, name: &str, reqs: &[u16]) -> Vec<OptReply> {
    r.option(opt, &Raw::info_data(name, reqs));
    r.opt_replies()
}

/// The final reply type of an option.
fn final_kind(v: &[OptReply]) -> u32 {
    v.last().expect("at least one reply").1
}

/// SET_META_CONTEXT (or LIST with `opt` 9) and return the replies.
fn meta(r: &mut Raw, opt: u32, export: &str, queries: &[&str]) -> Vec<OptReply> {
    r.option(opt, &meta_data(export, queries));
    let v = r.opt_replies();
    for (o, _, _) in &v {
        assert_eq!(*o, opt, "option reply echoes the option");
    }
    v
}

/// The META_CONTEXT replies (id, name) among `v`.
fn contexts(v: &[OptReply]) -> Vec<(u32, String)> {
    v.iter()
        .filter(|r| r.1 == REP_META_CONTEXT)
        .map(|r| (be32(&r.2), String::from_utf8(r.2[4..].to_vec()).expect("context name is UTF-8")))
        .collect()
}

/// Negotiate structured replies, select `base:allocation` on `export`.
fn select_allocation(r: &mut Raw, export: &str) -> u32 {
    let v = meta(r, OPT_SET_META_CONTEXT, export, &["base:allocation"]);
    assert_eq!(final_kind(&v), REP_ACK, "SET base:allocation: {v:?}");
    let c = contexts(&v);
    assert_eq!(c.len(), 1, "one context selected: {v:?}");
    assert_eq!(c[0].1, "base:allocation");
    c[0].0
}

/// A connection that negotiated structured replies and GOes to `export`
/// after running `setup` on the raw option phase.
fn structured_then(addr: &str, export: &str, setup: impl FnOnce(&mut Raw)) -> Conn {
    let mut raw = Raw::fixed(addr);
    negotiate_mode(&mut raw, Mode::Structured);
    setup(&mut raw);
    Conn::go(raw, export, Mode::Structured)
}

/// BLOCK_STATUS on `c` must fail with EINVAL (no usable context).
fn assert_block_status_einval(c: &mut Conn, why: &str) {
    match c.block_status(0, 0, 4096) {
        Err(e) => assert_eq!(e, NBD_EINVAL, "{why}: BLOCK_STATUS error"),
        Ok(v) => panic!("{why}: BLOCK_STATUS succeeded with {v:?}; expected EINVAL (no context selected)"),
    }
}

/// The server hung up without sending a single byte.
fn assert_closed_silently(r: &mut Raw, what: &str) {
    match read_to_eof(r) {
        Ok(b) if b.is_empty() => {}
        Ok(b) => panic!("{what}: server sent {} bytes before closing: {:02x?}", b.len(), &b[..b.len().min(40)]),
        Err(e) => panic!("{what}: server did not close: {e}"),
    }
}

/// Nothing arrives within `ms` milliseconds (and the connection stays open).
fn assert_quiet_for(r: &mut Raw, ms: u64) {
    r.s.set_read_timeout(Some(Duration::from_millis(ms))).unwrap();
    let mut b = [0u8; 1];
    match r.s.read(&mut b) {
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
        Ok(0) => panic!("server closed the connection"),
        Ok(_) => panic!("server answered early: {b:02x?}"),
        Err(e) => panic!("read: {e}"),
    }
    r.s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
}

/// Abort the connection with a RST instead of a FIN.
fn reset(r: Raw) {
    use std::os::fd::AsRawFd;
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt on a socket we own, with a correctly sized struct.
    unsafe {
        libc::setsockopt(
            r.s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(r);
}

// ================================================================ handshake

/// #40, §1.3: newstyle greeting (never oldstyle), only FIXED_NEWSTYLE and
/// NO_ZEROES may be set.
#[test]
fn greeting_is_fixed_newstyle_with_only_defined_handshake_flags() {
    let (_ex, mut srv) = start(&[]);
    let mut r = Raw::connect(&srv.addr);
    let g = r.greet(3);
    assert_eq!(&g[..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT", "newstyle, not the oldstyle cliserv magic");
    let flags = u16::from_be_bytes([g[16], g[17]]);
    assert_eq!(flags & 1, 1, "FIXED_NEWSTYLE");
    assert_eq!(flags & !3, 0, "undefined handshake flags {flags:#x}");
    r.option(OPT_ABORT, &[]);
    assert_eq!(r.opt_reply(), (OPT_ABORT, REP_ACK, vec![]));
    assert_still_serving(&mut srv);
}

/// #1: every unknown option gets ERR_UNSUP, its data is skipped by length
/// (even data that looks like an option), and negotiation goes on.
#[test]
fn unknown_options_get_err_unsup_and_the_stream_stays_in_sync() {
    let (_ex, mut srv) = start(&[]);
    let mut r = Raw::fixed(&srv.addr);
    // Data made of fake option headers: a server that resyncs on the magic
    // instead of skipping by length would answer them.
    let mut fake = Vec::new();
    while fake.len() < 65536 {
        fake.extend_from_slice(b"IHAVEOPT\0\0\0\x03\0\0\0\0");
    }
    let cases: &[(u32, usize)] = &[
        (0, 0),
        (OPT_PEEK_EXPORT, 0),
        (OPT_PEEK_EXPORT, 16),
        (12, 5),
        (0x7fff_ffff, 100),
        (0xffff_ffff, 4096),
        (4242, 65536),
    ];
    for &(opt, len) in cases {
        r.option(opt, &fake[..len]);
        let v = r.opt_replies();
        assert_eq!(v.len(), 1, "option {opt}: one reply, got {v:?}");
        assert_eq!(v[0].0, opt, "option {opt} echoed");
        assert_eq!(v[0].1, REP_ERR_UNSUP, "option {opt} with {len} bytes");
    }
    let (size, _) = r.go("mem");
    assert_eq!(size, 64 * MIB);
    assert_still_serving(&mut srv);
}

/// #2: each option's replies echo its number and end with exactly one final
/// reply; nothing stray follows (the next reply belongs to the next option).
#[test]
fn every_option_reply_echoes_the_option_and_ends_with_one_final_reply() {
    let (_ex, mut srv) = start(&[]);
    let mut r = Raw::fixed(&srv.addr);
    let steps: Vec<(u32, Vec<u8>)> = vec![
        (OPT_LIST, vec![]),
        (OPT_INFO, Raw::info_data("mem", &[1, 2, 3])),
        (OPT_LIST_META_CONTEXT, meta_data("mem", &[])),
        (OPT_STRUCTURED_REPLY, vec![]),
        (OPT_LIST_META_CONTEXT, meta_data("mem", &[])),
        (OPT_SET_META_CONTEXT, meta_data("mem", &["base:allocation"])),
        (OPT_INFO, Raw::info_data("nosuch", &[])),
        (OPT_GO, Raw::info_data("nosuch", &[])),
        (OPT_STARTTLS, vec![]),
        (OPT_LIST, b"junk".to_vec()),
        (77, vec![1, 2, 3]),
    ];
    for (opt, data) in &steps {
        r.option(*opt, data);
        let v = r.opt_replies();
        for (o, kind, _) in &v {
            assert_eq!(o, opt, "reply {kind:#x} echoes option {opt}");
        }
        let finals = v.iter().filter(|x| x.1 == REP_ACK || x.1 & 0x8000_0000 != 0).count();
        assert_eq!(finals, 1, "option {opt}: exactly one final reply in {v:?}");
    }
    // If any option had sent a reply after its final one, this would not be
    // the first thing we read now.
    r.option(OPT_ABORT, &[]);
    assert_eq!(r.opt_reply(), (OPT_ABORT, REP_ACK, vec![]));
    assert_closed_silently(&mut r, "after ABORT");
    assert_still_serving(&mut srv);
}

/// #4: EXPORT_NAME without C_NO_ZEROES (here also without C_FIXED_NEWSTYLE,
/// which the server may tolerate): size, flags and 124 zero bytes.
#[test]
fn export_name_reply_is_134_bytes_without_no_zeroes() {
    let (_ex, mut srv) = start(&[]);
    for client_flags in [0u32, 1] {
        let mut r = Raw::connect(&srv.addr);
        r.greet(client_flags);
        r.option(OPT_EXPORT_NAME, b"mem");
        let rep = r.try_read(134).expect("134-byte EXPORT_NAME reply");
        assert_eq!(u64::from_be_bytes(rep[..8].try_into().unwrap()), 64 * MIB);
        assert_eq!(rep[9] & 1, 1, "HAS_FLAGS");
        assert!(rep[10..].iter().all(|&b| b == 0), "124 zero bytes");
        // Transmission starts right after: nothing more was sent.
        r.request(0, CMD_READ, 5, 0, 512, &[]);
        assert_eq!(r.simple_reply(), (0, 5));
        assert_eq!(r.try_read(512).unwrap(), vec![0u8; 512]);
    }
    assert_still_serving(&mut srv);
}

/// #4: with both NO_ZEROES bits, the EXPORT_NAME reply is exactly 10 bytes.
#[test]
fn export_name_reply_is_10_bytes_with_no_zeroes() {
    let (_ex, mut srv) = start(&[]);
    let mut r = Raw::fixed(&srv.addr);
    r.option(OPT_EXPORT_NAME, b"mem");
    let rep = r.try_read(10).expect("10-byte EXPORT_NAME reply");
    assert_eq!(u64::from_be_bytes(rep[..8].try_into().unwrap()), 64 * MIB);
    r.request(0, CMD_READ, 6, 0, 512, &[]);
    // Had the server padded, these 16 bytes would be zeros.
    assert_eq!(r.simple_reply(), (0, 6));
    assert_eq!(r.try_read(512).unwrap(), vec![0u8; 512]);
    assert_still_serving(&mut srv);
}

/// #4: never pad after NBD_INFO_EXPORT or after GO's ACK, even when the
/// client did not ask for NO_ZEROES.
#[test]
fn go_ack_and_info_export_are_never_padded() {
    let (_ex, mut srv) = start(&[]);
    let mut r = Raw::connect(&srv.addr);
    r.greet(1); // fixed newstyle, no NO_ZEROES
    let v = info_replies(&mut r, OPT_GO, "mem", &[]);
    assert_eq!(final_kind(&v), REP_ACK);
    let exp: Vec<_> = v.iter().filter(|x| x.1 == REP_INFO && be16(&x.2) == INFO_EXPORT).collect();
    assert_eq!(exp.len(), 1);
    assert_eq!(exp[0].2.len(), 12, "NBD_INFO_EXPORT is exactly 12 bytes");
    assert_eq!(v.last().unwrap().2.len(), 0, "ACK has no payload");
    r.request(0, CMD_READ, 0xabc, 0, 16, &[]);
    assert_eq!(r.simple_reply(), (0, 0xabc), "the reply follows the ACK directly");
    assert_eq!(r.try_read(16).unwrap(), vec![0u8; 16]);
    assert_still_serving(&mut srv);
}

/// #5: INFO always includes NBD_INFO_EXPORT (with the real size, unlike the
/// reference server) and silently ignores unknown info requests.
#[test]
fn info_always_includes_info_export_and_ignores_unknown_info_requests() {
    let (_ex, mut srv) = start(&[]);
    let mut r = Raw::fixed(&srv.addr);
    for reqs in [&[][..], &[0x7777, 0xffff, 1][..], &[3][..]] {
        for opt in [OPT_INFO, OPT_GO] {
            let v = info_replies(&mut r, opt, "mem", reqs);
            assert_eq!(final_kind(&v), REP_ACK, "{reqs:?}: {v:?}");
            let infos: Vec<u16> = v.iter().filter(|x| x.1 == REP_INFO).map(|x| be16(&x.2)).collect();
            assert_eq!(infos.iter().filter(|&&t| t == INFO_EXPORT).count(), 1, "one INFO_EXPORT in {infos:?}");
            assert!(infos.iter().all(|t| *t <= 3), "only defined info types: {infos:?}");
            let e = v.iter().find(|x| x.1 == REP_INFO && be16(&x.2) == INFO_EXPORT).unwrap();
            assert_eq!(be64(&e.2[2..]), 64 * MIB, "INFO reports the real size");
            if reqs.contains(&1) {
                let n = v.iter().find(|x| x.1 == REP_INFO && be16(&x.2) == INFO_NAME).expect("NAME sent");
                assert_eq!(&n.2[2..], b"mem");
            }
            if opt == OPT_GO {
                // GO succeeded: prove it and start over on a new connection.
                r.request(0, CMD_READ, 1, 0, 8, &[]);
                assert_eq!(r.simple_reply(), (0, 1));
                r.try_read(8).unwrap();
                r = Raw::fixed(&srv.addr);
            }
        }
    }
    assert_still_serving(&mut srv);
}

/// #6: an INFO followed directly by the same GO gives the same information
/// (transmission flags included), whatever the order.
#[test]
fn info_then_go_give_identical_replies() {
    let (_ex, mut srv) = start(&[]);
    for structured in [false, true] {
        let mut r = Raw::fixed(&srv.addr);
        if structured {
            negotiate_mode(&mut r, Mode::Structured);
        }
        let reqs = [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 0x4242];
        let mut info = info_replies(&mut r, OPT_INFO, "mem", &reqs);
        let mut go = info_replies(&mut r, OPT_GO, "mem", &reqs);
        assert_eq!(final_kind(&info), REP_ACK);
        assert_eq!(final_kind(&go), REP_ACK);
        let strip = |v: &mut Vec<OptReply>| {
            let mut w: Vec<(u32, Vec<u8>)> = v.drain(..).map(|(_, k, d)| (k, d)).collect();
            w.sort();
            w
        };
        assert_eq!(strip(&mut info), strip(&mut go), "structured={structured}");
    }
    assert_still_serving(&mut srv);
}

/// #7: INFO whose name length runs past the option data gets ERR_INVALID,
/// and negotiation continues in sync.
#[test]
fn info_with_name_length_overrunning_the_data_is_err_invalid() {
    let (_ex, mut srv) = start(&[]);
    let mut r = Raw::fixed(&srv.addr);
    for claimed in [4u32, 5, 100] {
        let mut d = claimed.to_be_bytes().to_vec();
        d.extend_from_slice(b"mem");
        d.extend_from_slice(&0u16.to_be_bytes());
        for opt in [OPT_INFO, OPT_GO] {
            r.option(opt, &d);
            let v = r.opt_replies();
            assert_eq!(v, vec![(opt, REP_ERR_INVALID, v[0].2.clone())], "name length {claimed}");
        }
    }
    r.go("mem");
    assert_still_serving(&mut srv);
}

/// #7: a huge name length (u32::MAX, 2^31) is ERR_INVALID, not an
/// allocation or a hang.
#[test]
fn info_with_huge_name_length_is_err_invalid() {
    let (_ex, mut srv) = start(&[]);
    let mut r = Raw::fixed(&srv.addr);
    for claimed in [u32::MAX, 0x8000_0000, 0x0100_0000] {
        let mut d = claimed.to_be_bytes().to_vec();
        d.extend_from_slice(b"mem\0\0");
        r.option(OPT_GO, &d);
        let v = r.opt_replies();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].1, REP_ERR_INVALID, "name length {claimed:#x}");
    }
    r.go("mem");
    assert_still_serving(&mut srv);
}

/// #7: the INFO/GO data must be exactly 4 + name + 2 + 2n: trailing bytes
/// or a request count larger than the data are ERR_INVALID.
#[test]
fn go_with_trailing_or_missing_info_requests_is_err_invalid() {
    let (_ex, mut srv) = start(&[]);
    let mut r = Raw::fixed(&srv.addr);
    let mut trailing = Raw::info_data("mem", &[1]);
    trailing.push(0);
    let mut missing = Raw::info_data("mem", &[1]);
    let n = missing.len();
    missing[n - 4..n - 2].copy_from_slice(&5u16.to_be_bytes()); // claims 5 requests, has 1
    let mut odd = Raw::info_data("mem", &[]);
    odd.push(0x01); // half an info request
    for d in [trailing, missing, odd] {
        r.option(OPT_GO, &d);
        let v = r.opt_replies();
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].1, REP_ERR_INVALID, "data {d:02x?}");
    }
    r.go("mem");
    assert_still_serving(&mut srv);
}

/// #7: INFO/GO data shorter than the 6-byte minimum is ERR_INVALID.
#[test]
fn go_with_less_than_six_bytes_of_data_is_err_invalid() {
    let (_ex, mut srv) = start(&[]);
    let mut r = Raw::fixed(&srv.addr);
    for d in [&[][..], &[0, 0, 0][..], &[0, 0, 0, 0, 0][..]] {
        for opt in [OPT_INFO, OPT_GO] {
            r.option(opt, d);
            let v = r.opt_replies();
            assert_eq!(v.len(), 1);
            assert_eq!((v[0].0, v[0].1), (opt, REP_ERR_INVALID), "{} bytes", d.len());
        }
    }
    r.go("mem");
    assert_still_serving(&mut srv);
}

/// #38: export names must not contain NUL; a name with one is refused
/// (not truncated at the NUL and matched) and negotiation continues.
#[test]
fn nul_in_export_name_is_refused() {
    let (_ex, mut srv) = start(&[]);
    let mut r = Raw::fixed(&srv.addr);
    for name in ["mem\0", "m\0em", "\0mem", "mem\0junk"] {
        for opt in [OPT_INFO, OPT_GO] {
            let v = info_replies(&mut r, opt, name, &[]);
            assert_eq!(v.len(), 1, "{name:?}: no INFO replies before the error: {v:?}");
            assert!(v[0].1 & 0x8000_0000 != 0, "{name:?} accepted: {v:?}");
            assert_ne!(v[0].1, REP_ERR_UNSUP, "GO must not be ERR_UNSUP");
        }
    }
    r.go("mem");
    assert_still_serving(&mut srv);
}

/// §1.6 EXPORT_NAME: an export that cannot be served (unknown, NUL in the
/// name, too long) MUST end the session; no reply can be sent.
#[test]
fn export_name_that_cannot_be_served_hard_disconnects() {
    let (_ex, mut srv) = start(&[]);
    let long = "a".repeat(5000);
    for name in ["nosuch", "mem\0", "", long.as_str()] {
        let mut r = Raw::fixed(&srv.addr);
        r.option(OPT_EXPORT_NAME, name.as_bytes());
        assert_closed_silently(&mut r, &format!("EXPORT_NAME {:?}", &name[..name.len().min(10)]));
    }
    assert_still_serving(&mut srv);
}

/// §1.6 EXPORT_NAME "never gets this reply format": even an EXPORT_NAME
/// whose data is too large to read must not be answered with an option
/// reply (ERR_TOO_BIG); the only correct reaction is to end the session.
#[test]
fn oversized_export_name_never_gets_an_option_reply() {
    let (_ex, mut srv) = start(&[]);
    // 70,000 bytes: over the 64 KiB option limit, under the 16 MiB discard
    // limit; and a length over 16 MiB whose data never comes.
    let mut bad = Vec::new();
    for (what, claimed, sent) in [("70000 bytes", 70_000u32, 70_000usize), ("a 1 GiB length", 1 << 30, 0)] {
        let mut r = Raw::fixed(&srv.addr);
        let mut b = b"IHAVEOPT".to_vec();
        b.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        b.extend_from_slice(&claimed.to_be_bytes());
        b.extend(std::iter::repeat_n(b'a', sent));
        r.send(&b);
        match read_to_eof(&mut r) {
            Ok(got) if got.is_empty() => {}
            Ok(got) => bad.push(format!(
                "EXPORT_NAME with {what}: {} bytes ({:02x?}...) then close",
                got.len(),
                &got[..got.len().min(20)]
            )),
            Err(e) => bad.push(format!("EXPORT_NAME with {what}: not closed: {e}")),
        }
    }
    assert!(bad.is_empty(), "EXPORT_NAME must never get an option reply:\n{}", bad.join("\n"));
    assert_still_serving(&mut srv);
}

/// #8: LIST with data gets ERR_INVALID and nothing else (the reference
/// server lists the exports anyway after the error).
#[test]
fn list_with_data_is_err_invalid_and_lists_nothing() {
    let (_ex, mut srv) = start(&[]);
    let mut r = Raw::fixed(&srv.addr);
    r.option(OPT_LIST, b"mem");
    let v = r.opt_replies();
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!((v[0].0, v[0].1), (OPT_LIST, REP_ERR_INVALID));
    r.option(OPT_ABORT, &[]);
    assert_eq!(r.opt_reply(), (OPT_ABORT, REP_ACK, vec![]), "no SERVER replies after the error");
    assert_still_serving(&mut srv);
}

/// #8: STRUCTURED_REPLY with data gets ERR_INVALID and does not turn
/// structured replies on (no DF flag, simple READ replies).
#[test]
fn structured_reply_with_data_is_err_invalid_and_not_enabled() {
    let (_ex, mut srv) = start(&[]);
    let mut r = Raw::fixed(&srv.addr);
    r.option(OPT_STRUCTURED_REPLY, &[0]);
    let v = r.opt_replies();
    assert_eq!(v.len(), 1);
    assert_eq!((v[0].0, v[0].1), (OPT_STRUCTURED_REPLY, REP_ERR_INVALID));
    let mut c = Conn::go(r, "mem", Mode::Simple);
    assert_eq!(c.tflags & TFLAG_SEND_DF, 0, "DF without structured replies");
    assert_eq!(c.read(0, 512), Ok(vec![0u8; 512]), "simple READ reply");
    assert_still_serving(&mut srv);
}

/// #8: EXTENDED_HEADERS with data gets ERR_INVALID and compact headers stay.
#[test]
fn extended_headers_with_data_is_err_invalid_and_not_enabled() {
    let (_ex, mut srv) = start(&[]);
    let mut r = Raw::fixed(&srv.addr);
    r.option(OPT_EXTENDED_HEADERS, b"please");
    let v = r.opt_replies();
    assert_eq!(v.len(), 1);
    assert_eq!((v[0].0, v[0].1), (OPT_EXTENDED_HEADERS, REP_ERR_INVALID));
    let mut c = Conn::go(r, "mem", Mode::Simple);
    assert_eq!(c.write(4096, &[9u8; 512]), 0, "compact request understood");
    assert_eq!(c.read(4096, 512), Ok(vec![9u8; 512]));
    assert_still_serving(&mut srv);
}

/// #8: STARTTLS with data gets ERR_INVALID.
#[test]
fn starttls_with_data_is_err_invalid() {
    let (_ex, mut srv) = start(&[]);
    let mut r = Raw::fixed(&srv.addr);
    r.option(OPT_STARTTLS, b"\x16\x03\x01");
    let v = r.opt_replies();
    assert_eq!(v.len(), 1);
    assert_eq!((v[0].0, v[0].1), (OPT_STARTTLS, REP_ERR_INVALID));
    r.go("mem");
    assert_still_serving(&mut srv);
}

/// #8, #9: ABORT with data is accepted like a plain ABORT.
#[test]
fn abort_with_data_is_acked() {
    let (_ex, mut srv) = start(&[]);
    let mut r = Raw::fixed(&srv.addr);
    r.option(OPT_ABORT, b"bye now");
    assert_eq!(r.opt_reply(), (OPT_ABORT, REP_ACK, vec![]));
    assert_closed_silently(&mut r, "after ABORT with data");
    assert_still_serving(&mut srv);
}

/// #9: ABORT gets an ACK (not just a closed socket), then the server closes.
#[test]
fn abort_gets_ack_and_then_the_server_closes() {
    let (_ex, mut srv) = start(&[]);
    let mut r = Raw::fixed(&srv.addr);
    r.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(r.opt_reply().1, REP_ACK);
    r.option(OPT_ABORT, &[]);
    assert_eq!(r.opt_reply(), (OPT_ABORT, REP_ACK, vec![]));
    assert_closed_silently(&mut r, "after the ABORT ACK");
    assert_still_serving(&mut srv);
}

/// #9: a client that sends ABORT and closes (or resets) without reading the
/// ACK does not hurt the server.
#[test]
fn client_closing_without_reading_the_abort_ack_does_not_hurt_the_server() {
    let (_ex, mut srv) = start(&[]);
    for i in 0..20 {
        let mut r = Raw::fixed(&srv.addr);
        r.option(OPT_ABORT, &[]);
        if i % 2 == 0 {
            drop(r);
        } else {
            reset(r);
        }
    }
    // And one that vanishes right after the greeting with an ABORT queued.
    let mut r = Raw::connect(&srv.addr);
    let mut b = 3u32.to_be_bytes().to_vec();
    b.extend_from_slice(b"IHAVEOPT\0\0\0\x02\0\0\0\0");
    r.send(&b);
    reset(r);
    std::thread::sleep(Duration::from_millis(200));
    assert_still_serving(&mut srv);
}

/// #11 (NOTLS): STARTTLS without TLS configured gets ERR_POLICY or
/// ERR_UNSUP, and no option ever gets ERR_TLS_REQD.
#[test]
fn starttls_without_tls_is_refused_and_never_err_tls_reqd() {
    let (_ex, mut srv) = start(&[]);
    let mut r = Raw::fixed(&srv.addr);
    r.option(OPT_STARTTLS, &[]);
    let v = r.opt_replies();
    assert_eq!(v.len(), 1);
    assert!(matches!(v[0].1, REP_ERR_POLICY | REP_ERR_UNSUP), "STARTTLS: {:#x}", v[0].1);
    let mut all = Vec::new();
    r.option(OPT_LIST, &[]);
    all.extend(r.opt_replies());
    all.extend(info_replies(&mut r, OPT_INFO, "nosuch", &[]));
    all.extend(info_replies(&mut r, OPT_INFO, "mem", &[]));
    r.option(OPT_STARTTLS, &[]);
    all.extend(r.opt_replies());
    all.extend(info_replies(&mut r, OPT_GO, "nosuch", &[]));
    assert!(all.iter().all(|x| x.1 != REP_ERR_TLS_REQD), "ERR_TLS_REQD in NOTLS mode: {all:?}");
    r.go("mem");
    assert_still_serving(&mut srv);
}

/// #42: LIST returns one well-formed NBD_REP_SERVER per export, then ACK.
#[test]
fn list_returns_every_export_with_well_formed_server_replies() {
    let (_ex, mut srv) = start(&[
        ("other", "[[layer]]\nplugin = \"memory\"\nsize = \"1M\"\n"),
        ("ro", "description = \"read only\"\nreadonly = true\n[[layer]]\nplugin = \"memory\"\nsize = \"1M\"\n"),
    ]);
    let mut r = Raw::fixed(&srv.addr);
    r.option(OPT_LIST, &[]);
    let v = r.opt_replies();
    assert_eq!(final_kind(&v), REP_ACK);
    let mut seen = HashMap::new();
    for (opt, kind, d) in &v[..v.len() - 1] {
        assert_eq!((*opt, *kind), (OPT_LIST, REP_SERVER));
        let n = be32(d) as usize;
        assert!(n <= d.len() - 4, "name length {n} overruns the reply ({} bytes)", d.len());
        let name = String::from_utf8(d[4..4 + n].to_vec()).unwrap();
        let desc = String::from_utf8(d[4 + n..].to_vec()).unwrap();
        assert!(seen.insert(name, desc).is_none(), "export listed twice");
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(seen["mem"], "RAM disk");
    assert_eq!(seen["ro"], "read only");
    assert!(seen.contains_key("other"));
    assert_still_serving(&mut srv);
}

/// §1.8: INFO_NAME and INFO_DESCRIPTION are what LIST shows.
#[test]
fn info_name_and_description_match_list() {
    let (_ex, mut srv) = start(&[]);
    let mut r = Raw::fixed(&srv.addr);
    let v = info_replies(&mut r, OPT_INFO, "mem", &[INFO_NAME, INFO_DESCRIPTION]);
    assert_eq!(final_kind(&v), REP_ACK);
    let get = |t: u16| v.iter().find(|x| x.1 == REP_INFO && be16(&x.2) == t).map(|x| x.2[2..].to_vec());
    assert_eq!(get(INFO_NAME).as_deref(), Some(&b"mem"[..]));
    assert_eq!(get(INFO_DESCRIPTION).as_deref(), Some(&b"RAM disk"[..]));
    assert_still_serving(&mut srv);
}

/// #36, §2.13: NBD_INFO_BLOCK_SIZE is 14 bytes with sane values (default
/// maximum payload 32 MiB); GO without requesting it is not refused.
#[test]
fn block_size_info_is_well_formed_and_max_payload_is_32_mib() {
    let (_ex, mut srv) = start(&[]);
    let mut r = Raw::fixed(&srv.addr);
    let v = info_replies(&mut r, OPT_INFO, "mem", &[INFO_BLOCK_SIZE]);
    assert_eq!(final_kind(&v), REP_ACK, "never ERR_BLOCK_SIZE_REQD when it was requested");
    let b = v.iter().find(|x| x.1 == REP_INFO && be16(&x.2) == INFO_BLOCK_SIZE).expect("BLOCK_SIZE sent").2.clone();
    assert_eq!(b.len(), 14);
    let (min, pref, max) = (be32(&b[2..]), be32(&b[6..]), be32(&b[10..]));
    assert!(min.is_power_of_two() && min <= 65536, "minimum {min}");
    assert!(pref.is_power_of_two() && pref >= min.max(512), "preferred {pref}");
    assert!(max >= pref, "maximum {max} < preferred {pref}");
    assert_eq!(max, 32 << 20, "default maximum payload");
    assert_eq!((64 * MIB) % min as u64, 0, "size is a multiple of the minimum block");
    let v = info_replies(&mut r, OPT_GO, "mem", &[]);
    assert_eq!(final_kind(&v), REP_ACK, "GO without BLOCK_SIZE request: {v:?}");
    assert_still_serving(&mut srv);
}

/// #34: an unwelcome client (unknown exports, no default export) keeps
/// getting option errors instead of being dropped.
#[test]
fn unknown_exports_keep_getting_option_errors_without_disconnect() {
    let (_ex, mut srv) = start(&[]);
    let mut r = Raw::fixed(&srv.addr);
    for i in 0..50 {
        let name = if i % 5 == 0 { String::new() } else { format!("nosuch{i}") };
        let opt = if i % 2 == 0 { OPT_GO } else { OPT_INFO };
        let v = info_replies(&mut r, opt, &name, &[INFO_NAME]);
        assert_eq!(v.len(), 1, "no INFO before ERR_UNKNOWN: {v:?}");
        assert_eq!((v[0].0, v[0].1), (opt, REP_ERR_UNKNOWN), "{name:?}");
        let v = meta(&mut r, OPT_LIST_META_CONTEXT, &name, &[]);
        assert!(v.last().unwrap().1 & 0x8000_0000 != 0, "LIST_META for {name:?}: {v:?}");
    }
    r.go("mem");
    assert_still_serving(&mut srv);
}

/// #34: per-export `max_connections` refuses GO with ERR_POLICY; the client
/// is not dropped and can GO once a slot frees up.
#[test]
fn max_connections_gives_err_policy_and_negotiation_continues() {
    let (_ex, mut srv) = start(&[("lim", "max_connections = 1\n[[layer]]\nplugin = \"memory\"\nsize = \"1M\"\n")]);
    let first = Conn::open(&srv.addr, "lim", Mode::Simple, false);
    let mut r = Raw::fixed(&srv.addr);
    let v = info_replies(&mut r, OPT_GO, "lim", &[]);
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!((v[0].0, v[0].1), (OPT_GO, REP_ERR_POLICY));
    let v = info_replies(&mut r, OPT_INFO, "lim", &[]);
    assert_eq!(final_kind(&v), REP_ACK, "INFO still works: {v:?}");
    first.disc();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = info_replies(&mut r, OPT_GO, "lim", &[]);
        match final_kind(&v) {
            REP_ACK => break,
            REP_ERR_POLICY if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            k => panic!("GO after the slot freed: {k:#x}"),
        }
    }
    r.request(0, CMD_READ, 3, 0, 512, &[]);
    assert_eq!(r.simple_reply(), (0, 3));
    assert_still_serving(&mut srv);
}

/// Hostile: option data over the 64 KiB limit but under 16 MiB is read,
/// discarded and answered with ERR_TOO_BIG; negotiation stays in sync.
#[test]
fn oversized_option_under_16_mib_gets_err_too_big_and_negotiation_continues() {
    let (_ex, mut srv) = start(&[]);
    let mut r = Raw::fixed(&srv.addr);
    for (opt, len) in [(9999u32, MIB as usize), (OPT_INFO, 65537), (OPT_LIST, 200_000)] {
        r.option(opt, &vec![0x49u8; len]);
        let v = r.opt_replies();
        assert_eq!(v.len(), 1);
        assert_eq!((v[0].0, v[0].1), (opt, REP_ERR_TOO_BIG), "option {opt} with {len} bytes");
    }
    r.go("mem");
    assert_still_serving(&mut srv);
}

/// Hostile: options cut short (header or data) and then a close do not
/// hurt the server.
#[test]
fn truncated_option_then_close_does_not_hurt_the_server() {
    let (_ex, mut srv) = start(&[]);
    let cases: Vec<Vec<u8>> = vec![
        b"IHAVE".to_vec(),
        b"IHAVEOPT\0\0\0\x07".to_vec(),
        [&b"IHAVEOPT\0\0\0\x07\0\0\0\x64"[..], &[0u8; 10]].concat(),
        [&b"IHAVEOPT\0\0\x27\x0f\0\xa0\0\0"[..], &[0u8; 1024]].concat(), // 10 MiB claimed
    ];
    for (i, c) in cases.iter().enumerate() {
        let mut r = Raw::fixed(&srv.addr);
        r.send(c);
        if i % 2 == 0 {
            drop(r);
        } else {
            reset(r);
        }
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_still_serving(&mut srv);
}

/// Hostile: an option length shorter than its data. The server parses what
/// the length covers (ERR_INVALID), then treats the rest as the next header,
/// which breaks the option magic: only that client is dropped.
#[test]
fn option_length_shorter_than_its_data_affects_only_that_client() {
    let (_ex, mut srv) = start(&[]);
    let mut r = Raw::fixed(&srv.addr);
    let d = Raw::info_data("mem", &[]); // 9 bytes
    let mut b = b"IHAVEOPT".to_vec();
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&6u32.to_be_bytes()); // lies: 6
    b.extend_from_slice(&d);
    r.send(&b);
    let v = r.opt_replies();
    assert_eq!(v.len(), 1);
    assert_eq!((v[0].0, v[0].1), (OPT_GO, REP_ERR_INVALID));
    r.option(OPT_LIST, &[]); // now misaligned by 3 bytes: bad magic
    assert_closed_silently(&mut r, "misframed option magic");
    assert_still_serving(&mut srv);
}

/// Hostile: an option length longer than the data sent so far makes the
/// server wait for the rest (no premature reply); once the extra bytes
/// arrive the data is judged as a whole.
#[test]
fn option_length_longer_than_its_data_makes_the_server_wait() {
    let (_ex, mut srv) = start(&[]);
    let mut r = Raw::fixed(&srv.addr);
    let d = Raw::info_data("mem", &[]);
    let mut b = b"IHAVEOPT".to_vec();
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&(d.len() as u32 + 4).to_be_bytes()); // lies: 4 more
    b.extend_from_slice(&d);
    r.send(&b);
    assert_quiet_for(&mut r, 300);
    r.send(&[0, 0, 0, 0]);
    let v = r.opt_replies();
    assert_eq!(v.len(), 1);
    assert_eq!((v[0].0, v[0].1), (OPT_GO, REP_ERR_INVALID), "trailing bytes");
    r.go("mem");
    assert_still_serving(&mut srv);
}

/// #38: error messages (option replies and error chunks) are at most 4096
/// bytes of valid UTF-8 without NUL, even when they quote a 4096-byte
/// multibyte name.
#[test]
fn error_messages_are_at_most_4096_bytes_of_valid_utf8() {
    let (_ex, mut srv) = start(&[]);
    let mut r = Raw::fixed(&srv.addr);
    let mut msgs = Vec::new();
    for name in ["é".repeat(2048), "€".repeat(1365), "x".repeat(4096), "é".repeat(2049)] {
        for opt in [OPT_INFO, OPT_GO] {
            let v = info_replies(&mut r, opt, &name, &[]);
            assert_eq!(v.len(), 1);
            assert!(v[0].1 & 0x8000_0000 != 0);
            msgs.push(v[0].2.clone());
        }
        let v = meta(&mut r, OPT_SET_META_CONTEXT, &name, &["base:allocation"]);
        msgs.push(v.last().unwrap().2.clone());
    }
    for m in &msgs {
        assert!(m.len() <= 4096, "message of {} bytes", m.len());
        let s = std::str::from_utf8(m).expect("message is UTF-8");
        assert!(!s.contains('\0'));
    }
    // Error chunks are checked by the chunk reader (length <= 4096, UTF-8).
    let mut c = Conn::go(r, "mem", Mode::Simple);
    assert_eq!(c.read(64 * MIB, 512), Err(NBD_EINVAL));
    let mut c2 = Conn::open(&srv.addr, "mem", Mode::Structured, false);
    assert_eq!(c2.read(64 * MIB, 512), Err(NBD_EINVAL));
    drop(c);
    assert_still_serving(&mut srv);
}

// ============================================================ meta contexts

/// #14: LIST_META_CONTEXT with no queries lists every selectable context:
/// `base:allocation`, with ID 0.
#[test]
fn list_meta_context_with_zero_queries_lists_base_allocation_with_id_zero() {
    let (_ex, mut srv) = start(&[]);
    let mut r = Raw::fixed(&srv.addr);
    negotiate_mode(&mut r, Mode::Structured);
    let v = meta(&mut r, OPT_LIST_META_CONTEXT, "mem", &[]);
    assert_eq!(final_kind(&v), REP_ACK, "{v:?}");
    assert_eq!(contexts(&v), vec![(0, "base:allocation".to_string())]);
    assert_still_serving(&mut srv);
}

/// #14: `base:` is a wildcard in LIST.
#[test]
fn base_colon_is_a_wildcard_in_list_meta_context() {
    let (_ex, mut srv) = start(&[]);
    let mut r = Raw::fixed(&srv.addr);
    negotiate_mode(&mut r, Mode::Structured);
    let v = meta(&mut r, OPT_LIST_META_CONTEXT, "mem", &["base:"]);
    assert_eq!(final_kind(&v), REP_ACK);
    let c = contexts(&v);
    assert_eq!(c.len(), 1, "{v:?}");
    assert_eq!(c[0].1, "base:allocation");
    assert_still_serving(&mut srv);
}

/// #14: `base:` alone in SET selects nothing (it is no error either), so
/// BLOCK_STATUS then gets EINVAL.
#[test]
fn base_colon_alone_in_set_meta_context_selects_nothing() {
    let (_ex, mut srv) = start(&[]);
    let mut c = structured_then(&srv.addr, "mem", |r| {
        let v = meta(r, OPT_SET_META_CONTEXT, "mem", &["base:"]);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].1, REP_ACK, "base: alone is ignored, not an error");
    });
    assert_block_status_einval(&mut c, "after SET base:");
    assert_still_serving(&mut srv);
}

/// #14: SET with zero queries selects nothing and replaces an earlier
/// selection.
#[test]
fn set_meta_context_with_zero_queries_selects_nothing() {
    let (_ex, mut srv) = start(&[]);
    let mut c = structured_then(&srv.addr, "mem", |r| {
        select_allocation(r, "mem");
        let v = meta(r, OPT_SET_META_CONTEXT, "mem", &[]);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].1, REP_ACK);
    });
    assert_block_status_einval(&mut c, "after an empty SET");
    assert_still_serving(&mut srv);
}

/// #14: unknown namespaces and unknown `base:` leaves are ignored, not
/// errors; a duplicate query does not select twice; IDs are unique.
#[test]
fn unknown_namespaces_and_base_leaves_are_ignored_in_set() {
    let (_ex, mut srv) = start(&[]);
    let mut id = 0;
    let mut c = structured_then(&srv.addr, "mem", |r| {
        let v = meta(r, OPT_SET_META_CONTEXT, "mem", &["x-foo:bar", "base:nonsense", "qemu:dirty-bitmap:a"]);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].1, REP_ACK, "ignored, not an error");
        let v = meta(
            r,
            OPT_SET_META_CONTEXT,
            "mem",
            &["x-foo:bar", "base:nonsense", "base:allocation", "qemu:dirty-bitmap:a", "base:allocation"],
        );
        assert_eq!(final_kind(&v), REP_ACK, "{v:?}");
        let ctx = contexts(&v);
        assert_eq!(ctx.len(), 1, "exactly one context, with a unique ID: {v:?}");
        assert_eq!(ctx[0].1, "base:allocation");
        id = ctx[0].0;
    });
    let st = c.block_status(0, 0, MIB).expect("BLOCK_STATUS");
    assert_eq!(st.len(), 1);
    assert_eq!(st[0].0, id, "the status chunk carries the ID from SET");
    assert_still_serving(&mut srv);
}

/// #14: a SET that fails (unknown export) still replaces the selection.
#[test]
fn set_meta_context_failure_clears_the_selection() {
    let (_ex, mut srv) = start(&[]);
    let mut c = structured_then(&srv.addr, "mem", |r| {
        select_allocation(r, "mem");
        let v = meta(r, OPT_SET_META_CONTEXT, "nosuch", &["base:allocation"]);
        assert_eq!(v.len(), 1);
        assert!(v[0].1 & 0x8000_0000 != 0, "SET for an unknown export: {v:?}");
    });
    assert_block_status_einval(&mut c, "after a failed SET");
    assert_still_serving(&mut srv);
}

/// #14: a SET whose data is malformed (query length past the end) fails
/// with ERR_INVALID, and like any failed SET it still replaces (clears)
/// the previous selection.
#[test]
fn malformed_set_meta_context_still_clears_the_selection() {
    let (_ex, mut srv) = start(&[]);
    let mut c = structured_then(&srv.addr, "mem", |r| {
        select_allocation(r, "mem");
        let mut d = meta_data("mem", &["base:allocation"]);
        let n = d.len();
        d[n - 19..n - 15].copy_from_slice(&200u32.to_be_bytes()); // query length 15 -> 200
        r.option(OPT_SET_META_CONTEXT, &d);
        let v = r.opt_replies();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].1, REP_ERR_INVALID, "{v:?}");
    });
    assert_block_status_einval(&mut c, "after a malformed (failed) SET");
    assert_still_serving(&mut srv);
}

/// #14: a SET too large to process fails with ERR_TOO_BIG, and still
/// replaces (clears) the previous selection.
#[test]
fn oversized_set_meta_context_still_clears_the_selection() {
    let (_ex, mut srv) = start(&[]);
    let long = format!("x-pad:{}", "p".repeat(70_000));
    let mut c = structured_then(&srv.addr, "mem", |r| {
        select_allocation(r, "mem");
        let v = meta(r, OPT_SET_META_CONTEXT, "mem", &["base:allocation", &long]);
        assert_eq!(v.len(), 1);
        assert!(v[0].1 & 0x8000_0000 != 0, "{v:?}");
    });
    assert_block_status_einval(&mut c, "after an oversized (failed) SET");
    assert_still_serving(&mut srv);
}

/// §1.11 SET: before structured replies SET gets ERR_INVALID and selects
/// nothing.
#[test]
fn set_meta_context_before_structured_replies_is_err_invalid() {
    let (_ex, mut srv) = start(&[]);
    let mut r = Raw::fixed(&srv.addr);
    let v = meta(&mut r, OPT_SET_META_CONTEXT, "mem", &["base:allocation"]);
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].1, REP_ERR_INVALID);
    negotiate_mode(&mut r, Mode::Structured);
    let mut c = Conn::go(r, "mem", Mode::Structured);
    assert_block_status_einval(&mut c, "after a SET refused before structured replies");
    assert_still_serving(&mut srv);
}

/// §1.11 LIST: a syntactically broken request (a length running past the
/// option data) MUST get ERR_INVALID.
#[test]
fn meta_context_lengths_overrunning_the_data_are_err_invalid() {
    let (_ex, mut srv) = start(&[]);
    let mut r = Raw::fixed(&srv.addr);
    negotiate_mode(&mut r, Mode::Structured);
    let good = meta_data("mem", &["base:allocation"]);
    let mut bad_query = good.clone();
    let n = bad_query.len();
    bad_query[n - 19..n - 15].copy_from_slice(&16u32.to_be_bytes());
    let mut bad_name = good.clone();
    bad_name[..4].copy_from_slice(&1000u32.to_be_bytes());
    let mut bad_count = good.clone();
    bad_count[7..11].copy_from_slice(&3u32.to_be_bytes());
    let mut huge_name = good.clone();
    huge_name[..4].copy_from_slice(&u32::MAX.to_be_bytes());
    for (what, d) in [("query", bad_query), ("name", bad_name), ("count", bad_count), ("huge", huge_name)] {
        for opt in [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT] {
            r.option(opt, &d);
            let v = r.opt_replies();
            assert_eq!(v.len(), 1, "{what}: {v:?}");
            assert_eq!((v[0].0, v[0].1), (opt, REP_ERR_INVALID), "{what} length overrun");
        }
    }
    let v = meta(&mut r, OPT_LIST_META_CONTEXT, "mem", &["base:allocation"]);
    assert_eq!(final_kind(&v), REP_ACK, "still in sync");
    r.go("mem");
    assert_still_serving(&mut srv);
}

/// #15: a selection made for export A does not carry over to a GO to export
/// B (BLOCK_STATUS then gets EINVAL); GO to A does get it.
#[test]
fn set_for_export_a_then_go_to_export_b_means_block_status_is_einval() {
    let (_ex, mut srv) = start(&[("b", "[[layer]]\nplugin = \"memory\"\nsize = \"8M\"\n")]);
    let mut c = structured_then(&srv.addr, "b", |r| {
        select_allocation(r, "mem");
    });
    assert_block_status_einval(&mut c, "SET for mem, GO to b");
    let mut ok = structured_then(&srv.addr, "mem", |r| {
        select_allocation(r, "mem");
    });
    assert!(ok.block_status(0, 0, 4096).is_ok(), "SET for mem, GO to mem");
    assert_still_serving(&mut srv);
}

/// #15: only the last SET counts: SET for A, then SET for B, then GO to A
/// has no context.
#[test]
fn only_the_last_set_meta_context_counts() {
    let (_ex, mut srv) = start(&[("b", "[[layer]]\nplugin = \"memory\"\nsize = \"8M\"\n")]);
    let mut c = structured_then(&srv.addr, "mem", |r| {
        select_allocation(r, "mem");
        select_allocation(r, "b");
    });
    assert_block_status_einval(&mut c, "SET mem, SET b, GO mem");
    assert_still_serving(&mut srv);
}

/// #15: BLOCK_STATUS without any context negotiated is EINVAL (as a
/// structured error chunk with a message).
#[test]
fn block_status_without_a_context_is_einval() {
    let (_ex, mut srv) = start(&[]);
    let mut c = Conn::open(&srv.addr, "mem", Mode::Structured, false);
    let cookie = c.cookie();
    c.send(0, CMD_BLOCK_STATUS, cookie, 0, 4096, &[]);
    let rep = c.reply(cookie, 0);
    assert_eq!(rep.error(), NBD_EINVAL);
    let ch = rep.chunks();
    assert!(ch.iter().any(|x| x.is_error() && !x.message().is_empty()), "error chunk with a message: {ch:?}");
    // Also in simple mode (no structured replies at all).
    let mut s = Conn::open(&srv.addr, "mem", Mode::Simple, false);
    assert_eq!(s.command(0, CMD_BLOCK_STATUS, 0, 4096), NBD_EINVAL);
    assert_still_serving(&mut srv);
}

// ======================================================= transmission flags

/// #16: HAS_FLAGS always; DF only with structured replies or extended
/// headers, computed when INFO/GO is answered; FAST_ZERO only with
/// WRITE_ZEROES; no undefined or unsupported bits.
#[test]
fn transmission_flags_are_computed_from_the_negotiated_state() {
    let (_ex, mut srv) = start(&[("ro", "readonly = true\n[[layer]]\nplugin = \"memory\"\nsize = \"1M\"\n")]);
    let check = |f: u16, what: &str| {
        assert_eq!(f & TFLAG_HAS_FLAGS, TFLAG_HAS_FLAGS, "{what}: HAS_FLAGS");
        if f & TFLAG_SEND_FAST_ZERO != 0 {
            assert!(f & TFLAG_SEND_WRITE_ZEROES != 0, "{what}: FAST_ZERO without WRITE_ZEROES ({f:#x})");
        }
        assert_eq!(f & 0xf200, 0, "{what}: undefined/unsupported bits (RESIZE, BLOCK_STATUS_PAYLOAD...) {f:#x}");
    };
    let export_flags = |v: &[OptReply]| -> u16 {
        let e = v.iter().find(|x| x.1 == REP_INFO && be16(&x.2) == INFO_EXPORT).expect("INFO_EXPORT");
        be16(&e.2[10..])
    };
    for export in ["mem", "ro"] {
        let mut r = Raw::fixed(&srv.addr);
        let before = export_flags(&info_replies(&mut r, OPT_INFO, export, &[]));
        check(before, &format!("{export} simple"));
        assert_eq!(before & TFLAG_SEND_DF, 0, "{export}: DF before structured replies");
        negotiate_mode(&mut r, Mode::Structured);
        let after = export_flags(&info_replies(&mut r, OPT_INFO, export, &[]));
        check(after, &format!("{export} structured"));
        assert_eq!(after & TFLAG_SEND_DF, TFLAG_SEND_DF, "{export}: DF once structured replies are on");
        assert_eq!(after & !TFLAG_SEND_DF, before, "{export}: only DF changed");
        let mut r = Raw::fixed(&srv.addr);
        negotiate_mode(&mut r, Mode::Extended);
        let ext = export_flags(&info_replies(&mut r, OPT_INFO, export, &[]));
        check(ext, &format!("{export} extended"));
        assert_eq!(ext & TFLAG_SEND_DF, TFLAG_SEND_DF, "{export}: DF with extended headers");
        if export == "ro" {
            assert_eq!(before & TFLAG_READ_ONLY, TFLAG_READ_ONLY);
        } else {
            assert_eq!(before & TFLAG_READ_ONLY, 0);
        }
    }
    assert_still_serving(&mut srv);
}

// ================================================================= commands

/// #17: with SEND_FUA advertised, FUA is accepted on every command, READ,
/// FLUSH, CACHE and BLOCK_STATUS included.
#[test]
fn fua_is_accepted_on_every_command() {
    let (_ex, mut srv) = start(&[]);
    for mode in [Mode::Simple, Mode::Structured, Mode::Extended] {
        let mut c = Conn::open(&srv.addr, "mem", mode, mode != Mode::Simple);
        assert!(c.tflags & TFLAG_SEND_FUA != 0, "SEND_FUA advertised");
        assert_eq!(c.write_flags(FLAG_FUA, 8192, &[3u8; 4096]), 0, "{mode:?} WRITE|FUA");
        assert_eq!(c.read_flags(FLAG_FUA, 8192, 4096), Ok(vec![3u8; 4096]), "{mode:?} READ|FUA");
        assert_eq!(c.command(FLAG_FUA, CMD_FLUSH, 0, 0), 0, "{mode:?} FLUSH|FUA");
        assert_eq!(c.command(FLAG_FUA, CMD_TRIM, 4 * MIB, 65536), 0, "{mode:?} TRIM|FUA");
        assert_eq!(c.command(FLAG_FUA, CMD_WRITE_ZEROES, 4 * MIB, 4096), 0, "{mode:?} WRITE_ZEROES|FUA");
        assert_eq!(c.command(FLAG_FUA, CMD_CACHE, 0, 65536), 0, "{mode:?} CACHE|FUA");
        if mode != Mode::Simple {
            assert!(c.block_status(FLAG_FUA, 0, 65536).is_ok(), "{mode:?} BLOCK_STATUS|FUA");
        }
    }
    assert_still_serving(&mut srv);
}

/// #18: advertising WRITE_ZEROES obliges NO_HOLE: the range reads back as
/// zeros and ends up allocated in the backing file.
#[test]
fn write_zeroes_with_no_hole_reads_back_zero_and_stays_allocated() {
    use std::os::unix::fs::MetadataExt;
    let (ex, mut srv) = start(&[("disk", "[[layer]]\nplugin = \"file\"\npath = \"disk.img\"\nsize = \"16M\"\n")]);
    let mut c = Conn::open(&srv.addr, "disk", Mode::Structured, false);
    assert!(c.tflags & TFLAG_SEND_WRITE_ZEROES != 0);
    // Over data: zeros.
    assert_eq!(c.write(0, &[0xaau8; 65536]), 0);
    assert_eq!(c.command(FLAG_NO_HOLE, CMD_WRITE_ZEROES, 0, 65536), 0);
    assert_eq!(c.read(0, 65536), Ok(vec![0u8; 65536]));
    // Over a hole of the sparse file: zeros, and allocated afterwards.
    let blocks = || std::fs::metadata(ex.path("disk.img")).unwrap().blocks() * 512;
    let before = blocks();
    assert_eq!(c.command(FLAG_NO_HOLE, CMD_WRITE_ZEROES, 4 * MIB, 4 * MIB), 0);
    let after = blocks();
    assert!(after >= before + 4 * MIB, "NO_HOLE left the range unallocated ({before} -> {after} bytes allocated)");
    assert_eq!(c.read(4 * MIB, 4 * MIB), Ok(vec![0u8; 4 * MIB as usize]));
    assert_still_serving(&mut srv);
}

/// #19: with structured replies a READ reply is never simple, even for
/// errors found before any I/O (bad flags, range, size).
#[test]
fn structured_read_errors_are_error_chunks_never_simple_replies() {
    let (_ex, mut srv) = start(&[]);
    let mut c = Conn::open(&srv.addr, "mem", Mode::Structured, false);
    let cases: &[(u16, u64, u64, u32)] = &[
        (0, 64 * MIB - 256, 512, NBD_EINVAL), // past the end
        (0, u64::MAX - 100, 512, NBD_EINVAL), // offset overflow
        (0x8000, 0, 512, NBD_EINVAL),         // undefined flag
        (FLAG_NO_HOLE, 0, 512, NBD_EINVAL),   // flag of another command
        (0, 0, (32 << 20) + 512, NBD_EINVAL), // over the maximum payload
        (FLAG_DF, 0, (32 << 20) + 512, NBD_EOVERFLOW),
    ];
    for &(flags, off, len, err) in cases {
        let cookie = c.cookie();
        c.send(flags, CMD_READ, cookie, off, len, &[]);
        let rep = c.reply(cookie, off);
        let ch = match &rep {
            Reply::Simple { .. } => panic!("simple reply to a structured READ ({flags:#x} {off}+{len})"),
            Reply::Chunks(ch) => ch,
        };
        assert_eq!(rep.error(), err, "{flags:#x} {off}+{len}");
        assert!(ch.iter().all(|x| !matches!(x.kind, REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE)));
        assert!(ch.iter().any(|x| x.is_error() && !x.message().is_empty()), "error chunk with a message");
    }
    assert_eq!(c.read(0, 512), Ok(vec![0u8; 512]), "still in sync");
    assert_still_serving(&mut srv);
}

/// #19: with structured replies, errors of other commands go in error
/// chunks with a human-readable message.
#[test]
fn structured_errors_for_other_commands_carry_a_message() {
    let (_ex, mut srv) = start(&[]);
    let mut c = Conn::open(&srv.addr, "mem", Mode::Structured, true);
    let size = 64 * MIB;
    let cases: &[(u16, u16, u64, u64, u32)] = &[
        (0, CMD_WRITE, size - 256, 512, NBD_ENOSPC),
        (0, CMD_TRIM, size - 256, 512, NBD_EINVAL),
        (0, CMD_WRITE_ZEROES, size, 512, NBD_ENOSPC),
        (0, CMD_BLOCK_STATUS, size, 512, NBD_EINVAL),
        (0, CMD_FLUSH, 512, 0, NBD_EINVAL),
        (0, 200, 0, 0, NBD_EINVAL),
    ];
    for &(flags, cmd, off, len, err) in cases {
        let cookie = c.cookie();
        let payload = if cmd == CMD_WRITE { vec![1u8; len as usize] } else { vec![] };
        c.send(flags, cmd, cookie, off, len, &payload);
        match c.reply(cookie, off) {
            Reply::Simple { error, .. } => panic!("command {cmd}: simple error reply {error} without a message"),
            rep => {
                assert_eq!(rep.error(), err, "command {cmd}");
                let ch = rep.chunks();
                assert!(ch.iter().any(|x| x.is_error() && !x.message().is_empty()), "command {cmd}: {ch:?}");
            }
        }
    }
    assert_still_serving(&mut srv);
}

/// Data written at scattered, partly unaligned places in `[base, base+len)`;
/// returns the expected contents.
fn scatter(c: &mut Conn, base: u64, len: u64, seed: u64) -> Vec<u8> {
    let mut model = vec![0u8; len as usize];
    let spots: &[(u64, usize)] =
        &[(0, 4096), (100_000, 70_000), (MIB + 1, 3), (MIB + 300_000, 600_000), (len - 512, 512), (len / 2, 1)];
    for (i, &(o, n)) in spots.iter().enumerate() {
        if o + n as u64 > len {
            continue;
        }
        let d = random_bytes(n, seed + i as u64);
        assert_eq!(c.write(base + o, &d), 0);
        model[o as usize..o as usize + n].copy_from_slice(&d);
    }
    model
}

/// #21, #22: structured READ content chunks lie inside the request, never
/// overlap, cover it exactly; DONE only on the last chunk; for small,
/// sparse-aware and split reads, aligned or not.
#[test]
fn structured_read_chunks_cover_the_request_exactly_once() {
    let (_ex, mut srv) = start(&[]);
    let mut c = Conn::open(&srv.addr, "mem", Mode::Structured, false);
    let base = 16 * MIB;
    let model = scatter(&mut c, base, 4 * MIB, 77);
    // (offset within the region, length): checks run inside Conn::read.
    let reads: &[(u64, u64)] = &[
        (0, 4 * MIB),
        (1, 3 * MIB - 3),
        (0, 65536),
        (99_999, 200_001),
        (MIB - 7, MIB + 14),
        (512, 512),
        (3 * MIB, MIB),
    ];
    for &(o, n) in reads {
        let got = c.read(base + o, n).unwrap_or_else(|e| panic!("read {o}+{n}: error {e}"));
        assert!(got == model[o as usize..(o + n) as usize], "read {o}+{n}: data differs");
    }
    assert_still_serving(&mut srv);
}

/// #22: a structured READ of a sparse region is answered with OFFSET_HOLE
/// (12-byte payload, nonzero size) rather than zeros sent as data.
#[test]
fn structured_read_of_a_sparse_region_gives_offset_hole() {
    let (_ex, mut srv) = start(&[]);
    let mut c = Conn::open(&srv.addr, "mem", Mode::Structured, false);
    for (off, len) in [(30 * MIB, MIB), (8 * MIB, 4 * MIB), (20 * MIB + 512, 65536)] {
        let cookie = c.cookie();
        c.send(0, CMD_READ, cookie, off, len, &[]);
        let rep = c.reply(cookie, off);
        let ch = rep.chunks();
        let holes: u64 = ch.iter().filter(|x| x.kind == REPLY_TYPE_OFFSET_HOLE).map(|x| x.content_len()).sum();
        assert!(holes > 0, "{off}+{len}: no OFFSET_HOLE in {:?}", ch.iter().map(|x| x.kind).collect::<Vec<_>>());
        assert_eq!(read_result(ch, off, len, false), Ok(vec![0u8; len as usize]));
    }
    assert_still_serving(&mut srv);
}

/// #23: a DF read gives at most one content chunk: a sparse or mixed region
/// comes as a single OFFSET_DATA with the zeros written out. DF reads up to
/// 64 KiB (and here up to 4 MiB) work.
#[test]
fn df_read_of_a_sparse_region_is_one_offset_data_chunk() {
    let (_ex, mut srv) = start(&[]);
    let mut c = Conn::open(&srv.addr, "mem", Mode::Structured, false);
    assert!(c.tflags & TFLAG_SEND_DF != 0);
    let base = 40 * MIB;
    let d = random_bytes(4096, 3);
    assert_eq!(c.write(base + 65536, &d), 0);
    let mut model = vec![0u8; 4 * MIB as usize];
    model[65536..65536 + 4096].copy_from_slice(&d);
    for (o, n) in [(0u64, 65536u64), (0, 256 * 1024), (1, 131_071), (0, 4 * MIB), (2 * MIB, 65536)] {
        let cookie = c.cookie();
        c.send(FLAG_DF, CMD_READ, cookie, base + o, n, &[]);
        let rep = c.reply(cookie, base + o);
        let content: Vec<&Chunk> =
            rep.chunks().iter().filter(|x| matches!(x.kind, REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE)).collect();
        assert_eq!(content.len(), 1, "DF {o}+{n}: one content chunk");
        assert_eq!(content[0].kind, REPLY_TYPE_OFFSET_DATA, "DF {o}+{n}: holes written out as data");
        let got = read_result(rep.chunks(), base + o, n, true).expect("DF read");
        assert!(got == model[o as usize..(o + n) as usize], "DF {o}+{n}: data differs");
    }
    assert_still_serving(&mut srv);
}

/// #23, #25: a DF read larger than the maximum payload fails with EOVERFLOW
/// and sends no content chunk.
#[test]
fn df_read_over_the_max_payload_is_eoverflow_without_content() {
    let (_ex, mut srv) = start(&[]);
    let mut c = Conn::open(&srv.addr, "mem", Mode::Structured, false);
    for len in [(32u64 << 20) + 1, 48 * MIB] {
        let cookie = c.cookie();
        c.send(FLAG_DF, CMD_READ, cookie, 0, len, &[]);
        let rep = c.reply(cookie, 0);
        assert_eq!(rep.error(), NBD_EOVERFLOW, "DF read of {len}");
        assert!(rep.chunks().iter().all(|x| x.is_error() || x.kind == REPLY_TYPE_NONE), "no content chunk");
    }
    assert_still_serving(&mut srv);
}

/// #24: BLOCK_STATUS with REQ_ONE gives exactly one chunk with exactly one
/// descriptor, no longer than the request.
#[test]
fn block_status_req_one_gives_one_descriptor_no_longer_than_the_request() {
    let (_ex, mut srv) = start(&[]);
    let mut c = Conn::open(&srv.addr, "mem", Mode::Structured, true);
    assert_eq!(c.write(MIB + 4096, &[1u8; 4096]), 0);
    let cases = [(0, 4 * MIB), (MIB, 4096), (MIB - 512, MIB), (MIB + 4096, 512), (0, 1), (64 * MIB - 100, 100)];
    for (off, len) in cases {
        let st = c.block_status(FLAG_REQ_ONE, off, len).unwrap_or_else(|e| panic!("{off}+{len}: {e}"));
        assert_eq!(st.len(), 1, "one chunk per context");
        assert_eq!(st[0].1.len(), 1, "REQ_ONE {off}+{len}: one descriptor, got {:?}", st[0].1);
        let (l, _) = st[0].1[0];
        assert!(l > 0 && l <= len, "REQ_ONE {off}+{len}: descriptor length {l}");
    }
    assert_still_serving(&mut srv);
}

/// #24: without REQ_ONE, one chunk per context, at least one descriptor,
/// none of zero length, contiguous from the offset, not past the export,
/// 512-aligned, and truthful (written data is never reported as ZERO).
#[test]
fn block_status_descriptors_are_contiguous_nonzero_and_truthful() {
    let (_ex, mut srv) = start(&[]);
    let mut c = Conn::open(&srv.addr, "mem", Mode::Structured, true);
    let written = [(MIB + 4096, 4096u64), (3 * MIB, 65536), (64 * MIB - 512, 512)];
    for (o, n) in written {
        assert_eq!(c.write(o, &vec![0x77u8; n as usize]), 0);
    }
    for (off, len) in [(0, 4 * MIB), (MIB, 8192), (0, 64 * MIB), (60 * MIB, 4 * MIB), (64 * MIB - 4096, 4096)] {
        let st = c.block_status(0, off, len).unwrap_or_else(|e| panic!("{off}+{len}: {e}"));
        assert_eq!(st.len(), 1, "exactly one chunk for the one context");
        let d = &st[0].1;
        assert!(!d.is_empty());
        let mut pos = off;
        for (i, &(l, f)) in d.iter().enumerate() {
            assert!(l > 0, "zero-length descriptor");
            assert_eq!(f & !3, 0, "reserved status bits {f:#x}");
            if i + 1 < d.len() {
                assert_eq!(l % 512, 0, "{off}+{len}: descriptor {i} length {l} not 512-aligned");
            }
            for (wo, wn) in written {
                if wo < pos + l && pos < wo + wn {
                    assert_eq!(f & 2, 0, "written data at {wo} reported as ZERO ({pos}+{l} flags {f})");
                }
            }
            pos += l;
            if i + 1 < d.len() {
                assert!(pos - off < len, "first n-1 descriptors reach the requested length");
            }
        }
        assert!(pos <= 64 * MIB, "{off}+{len}: described past the end of the export ({pos})");
    }
    assert_still_serving(&mut srv);
}

/// #25: BLOCK_STATUS past the end of the export is EINVAL.
#[test]
fn block_status_past_the_end_is_einval() {
    let (_ex, mut srv) = start(&[]);
    let mut c = Conn::open(&srv.addr, "mem", Mode::Structured, true);
    for (off, len) in [(64 * MIB - 4096, 8192), (64 * MIB, 1), (u64::MAX - 10, 4096), (128 * MIB, 512)] {
        assert_eq!(c.block_status(0, off, len).map(|_| ()), Err(NBD_EINVAL), "{off}+{len}");
    }
    assert!(c.block_status(0, 0, 4096).is_ok());
    assert_still_serving(&mut srv);
}

/// #25: TRIM and WRITE_ZEROES on a read-only export are EPERM.
#[test]
fn trim_and_write_zeroes_on_a_read_only_export_are_eperm() {
    let (_ex, mut srv) = start(&[("ro", "readonly = true\n[[layer]]\nplugin = \"memory\"\nsize = \"1M\"\n")]);
    for mode in [Mode::Simple, Mode::Structured] {
        let mut c = Conn::open(&srv.addr, "ro", mode, false);
        assert_eq!(c.command(0, CMD_TRIM, 0, 4096), NBD_EPERM, "{mode:?} TRIM");
        assert_eq!(c.command(0, CMD_WRITE_ZEROES, 0, 4096), NBD_EPERM, "{mode:?} WRITE_ZEROES");
        assert_eq!(c.command(FLAG_NO_HOLE, CMD_WRITE_ZEROES, 0, 4096), NBD_EPERM, "{mode:?} WRITE_ZEROES|NO_HOLE");
        assert_eq!(c.write(0, &[1u8; 512]), NBD_EPERM, "{mode:?} WRITE");
        assert_eq!(c.read(0, 512), Ok(vec![0u8; 512]));
    }
    assert_still_serving(&mut srv);
}

/// #25: WRITE_ZEROES past the end is ENOSPC, TRIM past the end EINVAL.
#[test]
fn write_zeroes_past_the_end_is_enospc_and_trim_past_the_end_is_einval() {
    let (_ex, mut srv) = start(&[]);
    let mut c = Conn::open(&srv.addr, "mem", Mode::Simple, false);
    let end = 64 * MIB;
    assert_eq!(c.command(0, CMD_WRITE_ZEROES, end - 512, 1024), NBD_ENOSPC);
    assert_eq!(c.command(FLAG_NO_HOLE, CMD_WRITE_ZEROES, end, 1), NBD_ENOSPC);
    assert_eq!(c.command(0, CMD_TRIM, end - 512, 1024), NBD_EINVAL);
    assert_eq!(c.command(0, CMD_TRIM, u64::MAX - 511, 1024), NBD_EINVAL);
    assert_eq!(c.command(0, CMD_WRITE_ZEROES, end - 512, 512), 0, "up to the end is fine");
    assert_eq!(c.command(0, CMD_TRIM, end - 512, 512), 0);
    assert_still_serving(&mut srv);
}

/// §2.2: FLUSH with a nonzero offset or length is EINVAL.
#[test]
fn flush_with_nonzero_offset_or_length_is_einval() {
    let (_ex, mut srv) = start(&[]);
    let mut c = Conn::open(&srv.addr, "mem", Mode::Simple, false);
    assert!(c.tflags & TFLAG_SEND_FLUSH != 0);
    assert_eq!(c.command(0, CMD_FLUSH, 4096, 0), NBD_EINVAL);
    assert_eq!(c.command(0, CMD_FLUSH, 0, 512), NBD_EINVAL);
    assert_eq!(c.command(0, CMD_FLUSH, 0, 0), 0);
    assert_still_serving(&mut srv);
}

/// #26: FAST_ZERO that cannot be fast fails with ENOTSUP and changes
/// nothing; without FAST_ZERO, WRITE_ZEROES never fails with ENOTSUP. The
/// file lives on tmpfs, which cannot zero a range without deallocating it.
#[test]
fn fast_zero_fails_with_enotsup_without_changing_data_and_plain_zero_never_does() {
    let shm = tempfile::Builder::new().prefix("nbdhost-proto-").tempdir_in("/dev/shm").ok();
    let ex = Exports::new();
    ex.snippet("mem", MEM);
    let dir = shm.as_ref().map(|d| d.path().to_path_buf()).unwrap_or_else(|| ex.path(""));
    let img = dir.join("fz.img");
    ex.snippet("fz", &format!("[[layer]]\nplugin = \"file\"\npath = \"{}\"\nsize = \"8M\"\n", img.display()));
    let mut srv = Server::start(&ex, &[]);
    let mut c = Conn::open(&srv.addr, "fz", Mode::Structured, false);
    assert!(c.tflags & TFLAG_SEND_FAST_ZERO != 0 && c.tflags & TFLAG_SEND_WRITE_ZEROES != 0);
    let data = random_bytes(MIB as usize, 9);
    let mut saw_enotsup = false;
    for flags in [FLAG_FAST_ZERO | FLAG_NO_HOLE, FLAG_FAST_ZERO] {
        assert_eq!(c.write(0, &data), 0);
        let t = Instant::now();
        match c.command(flags, CMD_WRITE_ZEROES, 0, MIB) {
            0 => assert_eq!(c.read(0, MIB), Ok(vec![0u8; MIB as usize]), "flags {flags:#x}"),
            NBD_ENOTSUP => {
                saw_enotsup = true;
                assert!(t.elapsed() < Duration::from_secs(2), "ENOTSUP must come quickly");
                assert!(c.read(0, MIB).unwrap() == data, "flags {flags:#x}: ENOTSUP but data changed");
            }
            e => panic!("FAST_ZERO ({flags:#x}) failed with {e}"),
        }
    }
    for flags in [FLAG_NO_HOLE, 0] {
        assert_eq!(c.write(0, &data), 0);
        assert_eq!(c.command(flags, CMD_WRITE_ZEROES, 0, MIB), 0, "WRITE_ZEROES {flags:#x} without FAST_ZERO");
        assert_eq!(c.read(0, MIB), Ok(vec![0u8; MIB as usize]));
    }
    eprintln!("fast-zero on {}: ENOTSUP seen = {saw_enotsup}", dir.display());
    assert_still_serving(&mut srv);
}

/// #27: CACHE (advertised) rejects undefined flags and never changes what
/// later reads return.
#[test]
fn cache_rejects_undefined_flags_and_never_changes_data() {
    let (_ex, mut srv) = start(&[]);
    let mut c = Conn::open(&srv.addr, "mem", Mode::Structured, false);
    assert!(c.tflags & TFLAG_SEND_CACHE != 0);
    let d = random_bytes(65536, 27);
    assert_eq!(c.write(MIB, &d), 0);
    assert_eq!(c.command(0, CMD_CACHE, MIB, 65536), 0);
    assert_eq!(c.command(0, CMD_CACHE, 0, 8 * MIB), 0);
    for f in [FLAG_NO_HOLE, FLAG_DF, FLAG_REQ_ONE, FLAG_FAST_ZERO, FLAG_PAYLOAD_LEN, 0x40, 0x100, 0x8000] {
        assert_eq!(c.command(f, CMD_CACHE, MIB, 65536), NBD_EINVAL, "CACHE flag {f:#x}");
    }
    assert_eq!(c.read(MIB, 65536), Ok(d));
    assert_eq!(c.read(0, 4096), Ok(vec![0u8; 4096]));
    assert_still_serving(&mut srv);
}

/// #28, #29: with CAN_MULTI_CONN, a write replied to (with FUA, or followed
/// by a FLUSH) on one connection is visible on another.
#[test]
fn writes_replied_to_on_one_connection_are_seen_on_another() {
    let (_ex, mut srv) = start(&[]);
    let mut a = Conn::open(&srv.addr, "mem", Mode::Simple, false);
    let mut b = Conn::open(&srv.addr, "mem", Mode::Structured, false);
    assert!(a.tflags & TFLAG_CAN_MULTI_CONN != 0);
    for i in 0..20u64 {
        let d = random_bytes(8192, 100 + i);
        let off = 5 * MIB + i * 12288;
        if i % 2 == 0 {
            assert_eq!(a.write_flags(FLAG_FUA, off, &d), 0);
        } else {
            assert_eq!(a.write(off, &d), 0);
            assert_eq!(a.command(0, CMD_FLUSH, 0, 0), 0);
        }
        assert_eq!(b.read(off, 8192), Ok(d), "write {i} not visible on the other connection");
    }
    assert_still_serving(&mut srv);
}

/// #30: DISC after pipelined requests: every request in flight is answered,
/// then the connection closes; nothing sent after DISC is answered.
#[test]
fn disc_answers_every_request_in_flight_then_closes() {
    let (_ex, mut srv) = start(&[]);
    for mode in [Mode::Simple, Mode::Structured, Mode::Extended] {
        let mut c = Conn::open(&srv.addr, "mem", mode, false);
        let pre = random_bytes(64 * 4096, 30);
        assert_eq!(c.write(0, &pre), 0);
        let mut buf = Vec::new();
        let mut expect = Vec::new();
        for i in 0..64u64 {
            let d = random_bytes(4096, 3000 + i);
            let wflags = if mode == Mode::Extended { FLAG_PAYLOAD_LEN } else { 0 };
            buf.extend(encode_request(mode, wflags, CMD_WRITE, 1000 + i, MIB + i * 4096, 4096, &d));
            expect.push((1000 + i, None));
            buf.extend(encode_request(mode, 0, CMD_READ, 2000 + i, i * 4096, 4096, &[]));
            expect.push((2000 + i, Some((i * 4096, 4096))));
        }
        buf.extend(encode_request(mode, 0, CMD_DISC, 9, 0, 0, &[]));
        buf.extend(encode_request(mode, 0, CMD_READ, 10, 0, 512, &[])); // after DISC: ignored
        let got = send_and_collect(&mut c, buf, &expect);
        for i in 0..64u64 {
            assert_eq!(got[&(1000 + i)].0, 0, "{mode:?} write {i}");
            let (e, d) = &got[&(2000 + i)];
            assert_eq!(*e, 0);
            assert!(*d == pre[i as usize * 4096..(i as usize + 1) * 4096], "{mode:?} read {i}");
        }
        assert_closed_silently(&mut c.raw, &format!("{mode:?}: after the replies to DISC's predecessors"));
        let mut v = Conn::open(&srv.addr, "mem", Mode::Simple, false);
        for i in 0..64u64 {
            assert_eq!(v.read(MIB + i * 4096, 4096), Ok(random_bytes(4096, 3000 + i)), "write {i} done");
        }
    }
    assert_still_serving(&mut srv);
}

/// #31: zero-length READ, WRITE, TRIM, WRITE_ZEROES, CACHE (simple replies)
/// get a reply, READ sends no data, and the connection stays up.
#[test]
fn zero_length_requests_do_not_disconnect_with_simple_replies() {
    let (_ex, mut srv) = start(&[]);
    let mut c = Conn::open(&srv.addr, "mem", Mode::Simple, false);
    for off in [0, 4096, 64 * MIB] {
        match c.read(off, 0) {
            Ok(d) => assert!(d.is_empty()),
            Err(e) => assert_eq!(e, NBD_EINVAL, "zero-length READ at {off}"),
        }
        let e = c.write(off, &[]);
        assert!(e == 0 || e == NBD_EINVAL, "zero-length WRITE at {off}: {e}");
        for cmd in [CMD_TRIM, CMD_WRITE_ZEROES, CMD_CACHE] {
            let e = c.command(0, cmd, off, 0);
            assert!(e == 0 || e == NBD_EINVAL, "zero-length command {cmd} at {off}: {e}");
        }
    }
    assert_eq!(c.write(4096, &[5u8; 512]), 0);
    assert_eq!(c.read(4096, 512), Ok(vec![5u8; 512]), "still in sync");
    assert_still_serving(&mut srv);
}

/// #31: the same with structured replies, BLOCK_STATUS included: a
/// zero-length READ success is a bare NONE/DONE (no content chunk), a
/// BLOCK_STATUS success still has a nonzero descriptor.
#[test]
fn zero_length_requests_do_not_disconnect_with_structured_replies() {
    let (_ex, mut srv) = start(&[]);
    for mode in [Mode::Structured, Mode::Extended] {
        let mut c = Conn::open(&srv.addr, "mem", mode, true);
        for off in [0, 4096, 64 * MIB] {
            match c.read(off, 0) {
                Ok(d) => assert!(d.is_empty()),
                Err(e) => assert_eq!(e, NBD_EINVAL, "{mode:?} zero-length READ at {off}"),
            }
            let e = c.write(off, &[]);
            assert!(e == 0 || e == NBD_EINVAL, "{mode:?} zero-length WRITE at {off}: {e}");
            for cmd in [CMD_TRIM, CMD_WRITE_ZEROES, CMD_CACHE] {
                let e = c.command(0, cmd, off, 0);
                assert!(e == 0 || e == NBD_EINVAL, "{mode:?} zero-length command {cmd} at {off}: {e}");
            }
            match c.block_status(0, off, 0) {
                Ok(st) => assert!(st.iter().all(|(_, d)| !d.is_empty() && d.iter().all(|x| x.0 > 0))),
                Err(e) => assert_eq!(e, NBD_EINVAL, "{mode:?} zero-length BLOCK_STATUS at {off}"),
            }
        }
        assert_eq!(c.write(4096, &[5u8; 512]), 0);
        assert_eq!(c.read(4096, 512), Ok(vec![5u8; 512]), "{mode:?}: still in sync");
    }
    assert_still_serving(&mut srv);
}

/// #32: a rejected WRITE (bad flags, PAYLOAD_LEN in compact mode, past the
/// end) still has its payload read: the payload here is made of fake
/// request headers, which must never be answered.
#[test]
fn rejected_writes_still_have_their_payload_consumed() {
    let (_ex, mut srv) = start(&[]);
    for mode in [Mode::Simple, Mode::Structured] {
        let mut c = Conn::open(&srv.addr, "mem", mode, false);
        let fake = encode_request(Mode::Simple, 0, CMD_READ, 0xbad0_bad0, 0, 4, &[]);
        let payload: Vec<u8> = fake.iter().copied().cycle().take(28 * 40).collect();
        let cases: &[(u16, u64, u32)] = &[
            (FLAG_DF, 0, NBD_EINVAL),
            (FLAG_NO_HOLE, 0, NBD_EINVAL),
            (FLAG_REQ_ONE, 0, NBD_EINVAL),
            (FLAG_FAST_ZERO, 0, NBD_EINVAL),
            (FLAG_PAYLOAD_LEN, 0, NBD_EINVAL),
            (0x8000, 0, NBD_EINVAL),
            (0, 64 * MIB - 28, NBD_ENOSPC),
            (0, u64::MAX - 28, NBD_ENOSPC),
        ];
        for &(flags, off, err) in cases {
            let cookie = c.cookie();
            c.send(flags, CMD_WRITE, cookie, off, payload.len() as u64, &payload);
            let rep = c.reply(cookie, off);
            assert_eq!(rep.error(), err, "{mode:?} WRITE flags {flags:#x} at {off}");
        }
        assert_eq!(c.read(0, 1120), Ok(vec![0u8; 1120]), "{mode:?}: nothing was written, framing intact");
    }
    assert_still_serving(&mut srv);
}

/// #33: the cookie is echoed unchanged, whatever its value, in every reply
/// form (simple, structured data, error chunks).
#[test]
fn cookie_is_echoed_unchanged() {
    let (_ex, mut srv) = start(&[]);
    let cookies = [u64::MAX, 0, 1 << 63, 0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210, 0x6744_6698_668e_33ef];
    for mode in [Mode::Simple, Mode::Structured, Mode::Extended] {
        let mut c = Conn::open(&srv.addr, "mem", mode, mode != Mode::Simple);
        for &k in &cookies {
            let wflags = if mode == Mode::Extended { FLAG_PAYLOAD_LEN } else { 0 };
            let reqs: Vec<(u16, u16, u64, u64, Vec<u8>)> = vec![
                (wflags, CMD_WRITE, 0, 512, vec![1u8; 512]),
                (0, CMD_READ, 0, 512, vec![]),
                (0, CMD_READ, 64 * MIB, 512, vec![]),
                (0, CMD_FLUSH, 0, 0, vec![]),
                (0, 77, 0, 0, vec![]),
                (0, CMD_BLOCK_STATUS, 0, 4096, vec![]),
            ];
            for (flags, cmd, off, len, payload) in reqs {
                c.send(flags, cmd, k, off, len, &payload);
                let rep = read_reply(&mut c.raw);
                assert_eq!(rep.cookie(), k, "{mode:?} command {cmd}");
                if let Reply::Simple { error: 0, .. } = rep {
                    if cmd == CMD_READ {
                        c.raw.try_read(len as usize).unwrap();
                    }
                }
            }
        }
    }
    assert_still_serving(&mut srv);
}

/// #33: cookies need not be unique: requests in flight with the same
/// cookie each get their own reply.
#[test]
fn duplicate_cookies_in_flight_each_get_a_reply() {
    let (_ex, mut srv) = start(&[]);
    let mut c = Conn::open(&srv.addr, "mem", Mode::Structured, false);
    let mut buf = Vec::new();
    for i in 0..16u64 {
        buf.extend(encode_request(Mode::Structured, 0, CMD_WRITE, 42, i * 4096, 4096, &random_bytes(4096, i)));
    }
    let mut w = c.raw.s.try_clone().unwrap();
    let h = std::thread::spawn(move || w.write_all(&buf));
    for i in 0..16 {
        let rep = read_reply(&mut c.raw);
        assert_eq!((rep.cookie(), rep.error()), (42, 0), "reply {i}");
    }
    h.join().unwrap().unwrap();
    for i in 0..16u64 {
        assert_eq!(c.read(i * 4096, 4096), Ok(random_bytes(4096, i)));
    }
    assert_still_serving(&mut srv);
}

/// #33: 256 writes then 256 reads sent before reading any reply: every
/// reply arrives once, matched by cookie (in any order), with the right
/// data.
#[test]
fn pipelined_256_writes_then_256_reads_match_by_cookie() {
    let (_ex, mut srv) = start(&[]);
    let mut c = Conn::open(&srv.addr, "mem", Mode::Simple, false);
    // Reads target a region written beforehand: requests in flight may run
    // in any order, so reads of the pipelined writes would prove nothing.
    let pre = random_bytes(256 * 4096, 256);
    assert_eq!(c.write(8 * MIB, &pre), 0);
    let mut buf = Vec::new();
    let mut expect = Vec::new();
    for i in 0..256u64 {
        let k = 0xa5a5_0000_0000_0000 | i;
        buf.extend(encode_request(Mode::Simple, 0, CMD_WRITE, k, 16 * MIB + i * 4096, 4096, &random_bytes(4096, i)));
        expect.push((k, None));
    }
    for i in 0..256u64 {
        let k = 0x5a5a_0000_0000_0000 | (255 - i);
        buf.extend(encode_request(Mode::Simple, 0, CMD_READ, k, 8 * MIB + (255 - i) * 4096, 4096, &[]));
        expect.push((k, Some((8 * MIB + (255 - i) * 4096, 4096))));
    }
    let got = send_and_collect(&mut c, buf, &expect);
    assert_eq!(got.len(), 512);
    for i in 0..256u64 {
        assert_eq!(got[&(0xa5a5_0000_0000_0000 | i)].0, 0, "write {i}");
        let (e, d) = &got[&(0x5a5a_0000_0000_0000 | i)];
        assert_eq!(*e, 0, "read {i}");
        assert!(d[..] == pre[i as usize * 4096..(i as usize + 1) * 4096], "read {i}: data differs");
    }
    for i in 0..256u64 {
        assert_eq!(c.read(16 * MIB + i * 4096, 4096), Ok(random_bytes(4096, i)), "write {i} landed");
    }
    assert_still_serving(&mut srv);
}

/// #33: many large structured reads in flight: chunks of different replies
/// may interleave, but each chunk arrives whole and every reply is complete.
#[test]
fn pipelined_large_structured_reads_arrive_as_whole_chunks() {
    let (_ex, mut srv) = start(&[]);
    let mut c = Conn::open(&srv.addr, "mem", Mode::Structured, false);
    let model = scatter(&mut c, 0, 8 * MIB, 5);
    let d = random_bytes(2 * MIB as usize, 6);
    assert_eq!(c.write(3 * MIB, &d), 0);
    let mut model = model;
    model[3 * MIB as usize..5 * MIB as usize].copy_from_slice(&d);
    let mut buf = Vec::new();
    let mut expect = Vec::new();
    for i in 0..24u64 {
        let (off, len) = match i % 3 {
            0 => ((i * 131_072) % (4 * MIB), 2 * MIB + 512),
            1 => ((i * 4096) % (8 * MIB - 4096), 4096),
            _ => ((i * 65536 + 7) % (4 * MIB), MIB + 3),
        };
        buf.extend(encode_request(Mode::Structured, 0, CMD_READ, 500 + i, off, len, &[]));
        expect.push((500 + i, Some((off, len))));
    }
    let got = send_and_collect(&mut c, buf, &expect);
    for (k, r) in &expect {
        let (off, len) = r.unwrap();
        let (e, data) = &got[k];
        assert_eq!(*e, 0);
        assert!(data[..] == model[off as usize..(off + len) as usize], "read {off}+{len}: data differs");
    }
    assert_still_serving(&mut srv);
}

/// #25, hostile: every flag bit not defined for a command is EINVAL (READ
/// errors as structured chunks), and DF is refused without structured
/// replies.
#[test]
fn undefined_command_flags_are_einval_for_every_command() {
    let (_ex, mut srv) = start(&[]);
    let mut c = Conn::open(&srv.addr, "mem", Mode::Structured, true);
    let valid = |cmd: u16| -> u16 {
        FLAG_FUA
            | match cmd {
                CMD_READ => FLAG_DF,
                CMD_WRITE_ZEROES => FLAG_NO_HOLE | FLAG_FAST_ZERO,
                CMD_BLOCK_STATUS => FLAG_REQ_ONE,
                _ => 0,
            }
    };
    let cmds = [CMD_READ, CMD_WRITE, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS];
    for cmd in cmds {
        for bit in 0..16 {
            let f = 1u16 << bit;
            if valid(cmd) & f != 0 {
                continue;
            }
            let (off, len) = if cmd == CMD_FLUSH { (0, 0) } else { (8192, 512) };
            let payload = if cmd == CMD_WRITE { vec![0xeeu8; 512] } else { vec![] };
            let cookie = c.cookie();
            c.send(f, cmd, cookie, off, len, &payload);
            let rep = c.reply(cookie, off);
            if cmd == CMD_READ {
                assert!(!rep.is_simple(), "READ error as a simple reply");
            }
            assert_eq!(rep.error(), NBD_EINVAL, "command {cmd} flag {f:#x}");
        }
    }
    assert_eq!(c.read(8192, 512), Ok(vec![0u8; 512]), "no rejected write landed");
    let mut s = Conn::open(&srv.addr, "mem", Mode::Simple, false);
    assert_eq!(s.tflags & TFLAG_SEND_DF, 0);
    assert_eq!(s.read_flags(FLAG_DF, 0, 512), Err(NBD_EINVAL), "DF without structured replies");
    assert_still_serving(&mut srv);
}

/// Hostile: undefined command types (RESIZE included, which is not
/// advertised) are EINVAL; their length is an effect length, so no payload
/// is read and framing holds.
#[test]
fn undefined_commands_are_einval_and_keep_framing() {
    let (_ex, mut srv) = start(&[]);
    for mode in [Mode::Simple, Mode::Structured] {
        let mut c = Conn::open(&srv.addr, "mem", mode, false);
        for cmd in [8u16, 9, 42, 0x00ff, 0x7fff, 0x8000, 0xffff] {
            for len in [0u64, 4096, 0xffff_ffff] {
                assert_eq!(c.command(0, cmd, 0, len), NBD_EINVAL, "{mode:?} command {cmd:#x} length {len}");
            }
        }
        assert_eq!(c.read(0, 512), Ok(vec![0u8; 512]), "{mode:?}: still in sync");
    }
    assert_still_serving(&mut srv);
}

/// #37: payloads up to 32 MiB are not a DoS: a 31 MiB write and a write of
/// exactly the advertised maximum are served (or, were the maximum lower,
/// at least answered without a disconnect).
#[test]
fn writes_of_31_mib_and_of_the_max_payload_are_served() {
    let (_ex, mut srv) = start(&[]);
    let mut r = Raw::fixed(&srv.addr);
    let v = info_replies(&mut r, OPT_INFO, "mem", &[INFO_BLOCK_SIZE]);
    let b = v.iter().find(|x| x.1 == REP_INFO && be16(&x.2) == INFO_BLOCK_SIZE).unwrap().2.clone();
    let max = be32(&b[10..]) as u64;
    negotiate_mode(&mut r, Mode::Structured);
    let mut c = Conn::go(r, "mem", Mode::Structured);
    for len in [31 * MIB, max.min(32 * MIB)] {
        let d = random_bytes(len as usize, len);
        let e = c.write(0, &d);
        if len <= max {
            assert_eq!(e, 0, "write of {len} (max {max})");
            let got = c.read(0, len).expect("read back");
            assert!(got == d, "{len}-byte write: data differs");
        } else {
            assert_eq!(e, NBD_EINVAL, "write of {len} above the max {max}");
        }
    }
    assert_still_serving(&mut srv);
}

/// Hostile: a payload over 32 MiB is treated as a DoS (hard disconnect of
/// that client, allowed by the spec) without reading it.
#[test]
fn payload_over_32_mib_disconnects_only_that_client() {
    let (_ex, mut srv) = start(&[]);
    let mut c = Conn::open(&srv.addr, "mem", Mode::Simple, false);
    c.send(0, CMD_WRITE, 1, 0, (32 << 20) + 1, &[0u8; 4096]);
    assert_closed_silently(&mut c.raw, "write of 32 MiB + 1");
    let mut c = Conn::open(&srv.addr, "mem", Mode::Structured, false);
    c.send(0, CMD_WRITE, 2, 0, u32::MAX as u64, &[]);
    assert_closed_silently(&mut c.raw, "write of 4 GiB");
    assert_still_serving(&mut srv);
}

/// Hostile: requests cut short (header or payload) and then a close or a
/// reset do not hurt the server.
#[test]
fn truncated_request_then_close_does_not_hurt_the_server() {
    let (_ex, mut srv) = start(&[]);
    let hdr = encode_request(Mode::Simple, 0, CMD_WRITE, 1, 0, 65536, &[]);
    let cases: Vec<Vec<u8>> = vec![
        hdr[..10].to_vec(),
        hdr[..27].to_vec(),
        [&hdr[..], &[7u8; 1000][..]].concat(),
        encode_request(Mode::Simple, 0, CMD_READ, 2, 0, 32 << 20, &[]), // big reply nobody reads
    ];
    for (i, b) in cases.iter().enumerate() {
        let mut c = Conn::open(&srv.addr, "mem", if i % 2 == 0 { Mode::Simple } else { Mode::Structured }, false);
        c.raw.send(b);
        if i % 2 == 0 {
            drop(c);
        } else {
            reset(c.raw);
        }
    }
    let mut c = Conn::open(&srv.addr, "mem", Mode::Extended, false);
    c.raw.send(&encode_request(Mode::Extended, FLAG_PAYLOAD_LEN, CMD_WRITE, 3, 0, 4096, &[1u8; 100])[..]);
    drop(c);
    std::thread::sleep(Duration::from_millis(200));
    assert_still_serving(&mut srv);
    assert_eq!(Conn::open(&srv.addr, "mem", Mode::Simple, false).read(0, 4096), Ok(vec![0u8; 4096]));
}

/// TCP_NODELAY of the server's end of `r`'s connection, read by borrowing
/// the socket from the server process with pidfd_getfd(2). Err if the
/// kernel does not let us (then only the timing check below applies).
fn server_side_nodelay(r: &Raw) -> Result<bool, String> {
    let client_port = r.s.local_addr().unwrap().port();
    let server_port = r.s.peer_addr().unwrap().port();
    let port = |a: &str| u16::from_str_radix(a.rsplit(':').next().unwrap_or(""), 16).ok();
    let mut inode = None;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table).unwrap_or_default().lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && port(f[1]) == Some(server_port) && port(f[2]) == Some(client_port) {
                inode = Some(f[9].to_string());
            }
        }
    }
    let want = format!("socket:[{}]", inode.ok_or("server-side socket not found in /proc/net/tcp")?);
    let me = std::process::id().to_string();
    for e in std::fs::read_dir("/proc").map_err(|e| e.to_string())?.flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // Fields after the parenthesised command: state, ppid, ...
        let ppid = stat.rsplit(')').next().unwrap_or("").split_whitespace().nth(1).unwrap_or("");
        if ppid != me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).map(|l| l.to_string_lossy() == want).unwrap_or(false) {
                let target: i32 = fd.file_name().to_string_lossy().parse().unwrap();
                let pid: i32 = pid.parse().unwrap();
                // SAFETY: plain syscalls on descriptors we own and close.
                unsafe {
                    let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0) as i32;
                    if pidfd < 0 {
                        return Err(format!("pidfd_open: {}", std::io::Error::last_os_error()));
                    }
                    let sock = libc::syscall(libc::SYS_pidfd_getfd, pidfd, target, 0) as i32;
                    let err = std::io::Error::last_os_error();
                    libc::close(pidfd);
                    if sock < 0 {
                        return Err(format!("pidfd_getfd: {err}"));
                    }
                    let mut v: libc::c_int = 0;
                    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
                    let rc = libc::getsockopt(
                        sock,
                        libc::IPPROTO_TCP,
                        libc::TCP_NODELAY,
                        &mut v as *mut libc::c_int as *mut libc::c_void,
                        &mut len,
                    );
                    libc::close(sock);
                    if rc != 0 {
                        return Err(format!("getsockopt: {}", std::io::Error::last_os_error()));
                    }
                    return Ok(v != 0);
                }
            }
        }
    }
    Err("no child process holds the server-side socket".into())
}

/// #39: Nagle is disabled (TCP_NODELAY) on the server's sockets, checked on
/// the socket itself; and small sequential round trips stay fast.
#[test]
fn small_requests_are_not_delayed_by_nagle() {
    let (_ex, mut srv) = start(&[]);
    for mode in [Mode::Simple, Mode::Structured] {
        let mut c = Conn::open(&srv.addr, "mem", mode, false);
        match server_side_nodelay(&c.raw) {
            Ok(on) => assert!(on, "TCP_NODELAY is off on the server's socket"),
            Err(e) => eprintln!("cannot inspect the server's socket ({e}); relying on timing only"),
        }
        assert_eq!(c.write(0, &[1u8; 512]), 0);
        let t = Instant::now();
        for i in 0..200u64 {
            assert_eq!(c.read((i % 8) * 64, 64).map(|d| d.len()), Ok(64));
            assert_eq!(c.write((i % 8) * 64, &[2u8; 64]), 0);
        }
        let el = t.elapsed();
        assert!(el < Duration::from_secs(4), "{mode:?}: 400 round trips took {el:?} (Nagle/delayed-ACK stalls?)");
    }
    assert_still_serving(&mut srv);
}

// ========================================================= extended headers

/// #41: extended headers: WRITE (PAYLOAD_LEN), READ and BLOCK_STATUS_EXT
/// round trip with 32-byte replies.
#[test]
fn extended_headers_round_trip_write_read_and_block_status_ext() {
    let (_ex, mut srv) = start(&[]);
    let mut c = Conn::open(&srv.addr, "mem", Mode::Extended, true);
    assert!(c.tflags & TFLAG_SEND_DF != 0);
    let d = random_bytes(8192, 41);
    let off = MIB + 512;
    let cookie = c.cookie();
    c.send(FLAG_PAYLOAD_LEN, CMD_WRITE, cookie, off, 8192, &d);
    let rep = c.reply(cookie, off);
    let ch = rep.chunks();
    assert_eq!(ch.len(), 1);
    assert_eq!((ch[0].kind, ch[0].flags, ch[0].payload.len()), (REPLY_TYPE_NONE, REPLY_FLAG_DONE, 0));
    assert_eq!(c.read(off, 8192), Ok(d.clone()));
    assert_eq!(c.read(off - 512, 4 * MIB).map(|v| v[512..8704] == d[..]), Ok(true));
    let cookie = c.cookie();
    c.send(0, CMD_BLOCK_STATUS, cookie, 0, 4 * MIB, &[]);
    let rep = c.reply(cookie, 0);
    let ch = rep.chunks();
    assert_eq!(ch.len(), 1);
    assert_eq!(ch[0].kind, REPLY_TYPE_BLOCK_STATUS_EXT, "BLOCK_STATUS_EXT, not BLOCK_STATUS");
    assert_eq!(be32(&ch[0].payload), c.ctx.unwrap());
    let st = c.block_status(0, 0, 4 * MIB).unwrap();
    let mut pos = 0;
    for &(l, f) in &st[0].1 {
        assert_eq!(f >> 32, 0, "upper status bits of a 32-bit context");
        if pos <= off && off < pos + l {
            assert_eq!(f & 2, 0, "written data reported as ZERO");
        }
        pos += l;
    }
    assert!(pos > off + 8192 && pos <= 4 * MIB);
    assert_still_serving(&mut srv);
}

/// #41: once extended headers are on, no reply is simple: successes,
/// errors and zero-length requests all come as extended chunks.
#[test]
fn extended_headers_never_send_simple_replies() {
    let (_ex, mut srv) = start(&[]);
    let mut c = Conn::open(&srv.addr, "mem", Mode::Extended, false);
    let cases: &[(u16, u16, u64, u64)] = &[
        (0, CMD_FLUSH, 0, 0),
        (0, CMD_TRIM, 0, 65536),
        (0, CMD_WRITE_ZEROES, 0, 65536),
        (FLAG_NO_HOLE, CMD_WRITE_ZEROES, 65536, 4096),
        (0, CMD_CACHE, 0, 65536),
        (0, CMD_READ, 0, 0),
        (0, CMD_READ, 64 * MIB, 512),
        (0, CMD_TRIM, 64 * MIB, 512),
        (0, CMD_BLOCK_STATUS, 0, 512),
        (0, CMD_FLUSH, 1, 0),
        (0x8000, CMD_READ, 0, 512),
        (0, 99, 0, 0),
    ];
    for &(flags, cmd, off, len) in cases {
        let cookie = c.cookie();
        c.send(flags, cmd, cookie, off, len, &[]);
        let rep = read_reply(&mut c.raw); // Conn::reply also checks; be explicit here
        match &rep {
            Reply::Simple { .. } => panic!("simple reply to command {cmd} under extended headers"),
            Reply::Chunks(ch) => {
                for x in ch {
                    assert!(x.extended, "compact chunk under extended headers");
                    assert_eq!((x.cookie, x.offset), (cookie, off), "command {cmd}");
                }
            }
        }
    }
    assert_eq!(c.write(64 * MIB - 256, &[1u8; 512]), NBD_ENOSPC);
    assert_eq!(c.write(0, &[1u8; 512]), 0);
    assert_still_serving(&mut srv);
}

/// A client that sends many large READs and reads none of the replies
/// fills its socket, so the server's thread for that connection blocks in
/// its send. Other clients are served meanwhile, and once the first one
/// reads, every reply is there, whole and correct.
#[test]
fn a_client_that_does_not_read_its_replies_stalls_only_itself() {
    let (_ex, mut srv) = start(&[]);
    let mut c = Conn::open(&srv.addr, "mem", Mode::Structured, false);
    let data = random_bytes(8 * MIB as usize, 77);
    for i in 0..8 {
        assert_eq!(c.write(i * MIB, &data[(i * MIB) as usize..((i + 1) * MIB) as usize]), 0);
    }
    // 48 MiB of replies, far more than the socket buffers hold.
    let mut requests = Vec::new();
    let mut expect = Vec::new();
    for i in 0..48u64 {
        let cookie = c.cookie();
        let off = (i % 8) * MIB;
        requests.extend(encode_request(c.mode, 0, CMD_READ, cookie, off, MIB, &[]));
        expect.push((cookie, Some((off, MIB))));
    }
    c.raw.send(&requests);
    // Let the server fill the socket and block on it.
    std::thread::sleep(Duration::from_millis(300));
    assert_still_serving(&mut srv);
    let got = send_and_collect(&mut c, Vec::new(), &expect);
    for (cookie, want) in &expect {
        let (off, len) = want.unwrap();
        let (error, bytes) = &got[cookie];
        assert_eq!(*error, 0, "read at {off}");
        assert!(bytes[..] == data[off as usize..(off + len) as usize], "read at {off}: data differs");
    }
    assert_still_serving(&mut srv);
}

/// Pipelined WRITEs of 32 MiB each (the payload limit): together far over
/// the per-connection in-flight budget, so the server must send the
/// replies it holds back before it waits for room for the next one.
#[test]
fn pipelined_maximum_size_writes_beyond_the_in_flight_budget_all_complete() {
    let (_ex, mut srv) = start(&[("big", "[[layer]]\nplugin = \"memory\"\nsize = \"256M\"\n")]);
    let mut c = Conn::open(&srv.addr, "big", Mode::Extended, false);
    let chunk = 32 * MIB;
    let data = random_bytes(chunk as usize, 11);
    let mut requests = Vec::new();
    let mut expect = Vec::new();
    for i in 0..6u64 {
        let cookie = c.cookie();
        requests.extend(encode_request(c.mode, FLAG_PAYLOAD_LEN, CMD_WRITE, cookie, i * chunk, chunk, &data));
        expect.push((cookie, None));
    }
    let got = send_and_collect(&mut c, requests, &expect);
    assert!(got.values().all(|(e, _)| *e == 0), "{got:?}");
    for i in [0u64, 5] {
        assert!(c.read(i * chunk + 4096, 8192).unwrap() == data[4096..4096 + 8192], "slice {i}");
    }
    assert_still_serving(&mut srv);
}

/// After a second without requests a connection gives back its large
/// buffers; it then serves large reads and writes as before.
#[test]
fn a_connection_idle_long_enough_to_release_its_buffers_keeps_working() {
    let ex = Exports::new();
    ex.snippet("mem", MEM);
    let mut srv = Server::start(&ex, &["--log-level", "debug"]);
    let mut c = Conn::open(&srv.addr, "mem", Mode::Extended, false);
    let a = random_bytes(MIB as usize + 4096, 5);
    assert_eq!(c.write(MIB, &a), 0);
    assert_eq!(c.read(MIB, a.len() as u64).unwrap(), a);
    std::thread::sleep(Duration::from_millis(1300));
    assert!(srv.log().contains("idle; releasing its request buffers"), "{}", srv.log());
    let b = random_bytes(MIB as usize + 4096, 6);
    assert_eq!(c.write(MIB, &b), 0);
    assert_eq!(c.read(MIB, b.len() as u64).unwrap(), b);
    assert_eq!(c.read(MIB, 512).unwrap(), b[..512]);
    assert_still_serving(&mut srv);
}

/// #41: every extended reply chunk carries the request's offset, even the
/// OFFSET_DATA/OFFSET_HOLE chunks of a split read whose payload offsets
/// differ.
#[test]
fn extended_reply_offset_echoes_the_request_offset_in_every_chunk() {
    let (_ex, mut srv) = start(&[]);
    let mut c = Conn::open(&srv.addr, "mem", Mode::Extended, false);
    let base = 5 * MIB + 512;
    let mut model = scatter(&mut c, base, 4 * MIB, 8);
    // Data and holes, so the reply has several data and hole chunks.
    let d = random_bytes(2 * MIB as usize, 9);
    assert_eq!(c.write(base + MIB, &d), 0);
    model[MIB as usize..3 * MIB as usize].copy_from_slice(&d);
    let cookie = c.cookie();
    c.send(0, CMD_READ, cookie, base, 4 * MIB, &[]);
    let rep = read_reply(&mut c.raw);
    let ch = rep.chunks();
    assert!(ch.len() > 2, "a 4 MiB read over scattered data comes in several chunks");
    let mut distinct = std::collections::BTreeSet::new();
    for x in ch {
        assert_eq!(x.offset, base, "chunk type {} header offset", x.kind);
        if matches!(x.kind, REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE) {
            distinct.insert(x.content_offset());
        }
    }
    assert!(distinct.len() > 1);
    assert!(read_result(ch, base, 4 * MIB, false).unwrap() == model);
    assert_still_serving(&mut srv);
}

/// #41: STRUCTURED_REPLY after EXTENDED_HEADERS gets ERR_EXT_HEADER_REQD
/// (no downgrade); GO then still works and uses extended headers.
#[test]
fn structured_reply_after_extended_headers_is_err_ext_header_reqd() {
    let (_ex, mut srv) = start(&[]);
    let mut r = Raw::fixed(&srv.addr);
    negotiate_mode(&mut r, Mode::Extended);
    r.option(OPT_STRUCTURED_REPLY, &[]);
    let v = r.opt_replies();
    assert_eq!(v.len(), 1);
    assert_eq!((v[0].0, v[0].1), (OPT_STRUCTURED_REPLY, REP_ERR_EXT_HEADER_REQD));
    let v = info_replies(&mut r, OPT_GO, "mem", &[]);
    assert_eq!(final_kind(&v), REP_ACK, "GO after extended headers: {v:?}");
    let mut c = Conn::after_go(r, &v, Mode::Extended);
    assert_eq!(c.command(0, CMD_FLUSH, 0, 0), 0);
    assert_still_serving(&mut srv);
}

/// #41: EXPORT_NAME after extended headers were negotiated is a client
/// violation; the server hangs up without a reply.
#[test]
fn export_name_after_extended_headers_disconnects() {
    let (_ex, mut srv) = start(&[]);
    let mut r = Raw::fixed(&srv.addr);
    negotiate_mode(&mut r, Mode::Extended);
    r.option(OPT_EXPORT_NAME, b"mem");
    assert_closed_silently(&mut r, "EXPORT_NAME after EXTENDED_HEADERS");
    assert_still_serving(&mut srv);
}

/// #41: extended BLOCK_STATUS and TRIM take 64-bit effect lengths; a hole
/// longer than 4 GiB is one descriptor with a 64-bit length.
#[test]
fn extended_block_status_reports_64_bit_lengths() {
    let (_ex, mut srv) = start(&[("big", "[[layer]]\nplugin = \"memory\"\nsize = \"16G\"\n")]);
    let mut c = Conn::open(&srv.addr, "big", Mode::Extended, true);
    assert_eq!(c.size, 16 << 30);
    let st = c.block_status(0, 0, 8 << 30).expect("BLOCK_STATUS of 8 GiB");
    let d = &st[0].1;
    assert!(d[0].0 > u32::MAX as u64, "first descriptor {:?} should span the 8 GiB hole", d[0]);
    assert!(d.iter().map(|x| x.0).sum::<u64>() <= 16 << 30);
    assert_eq!(c.write(6 << 30, &[1u8; 4096]), 0);
    assert_eq!(c.command(0, CMD_TRIM, 0, 12 << 30), 0, "TRIM of 12 GiB");
    assert_eq!(c.read(6 << 30, 4096), Ok(vec![0u8; 4096]), "trimmed (memory reads back zeros)");
    let st = c.block_status(FLAG_REQ_ONE, 1 << 30, 10 << 30).unwrap();
    assert_eq!(st[0].1.len(), 1);
    assert!(st[0].1[0].0 <= 10 << 30);
    assert_still_serving(&mut srv);
}

/// #41: an extended request with PAYLOAD_LEN on a command that takes no
/// payload has the payload consumed, then fails with EINVAL; the payload
/// (fake requests) is never answered.
#[test]
fn extended_payload_on_a_command_without_one_is_consumed_then_einval() {
    let (_ex, mut srv) = start(&[]);
    let mut c = Conn::open(&srv.addr, "mem", Mode::Extended, true);
    assert_eq!(c.tflags & TFLAG_BLOCK_STATUS_PAYLOAD, 0, "BLOCK_STATUS_PAYLOAD not advertised");
    let fake = encode_request(Mode::Extended, 0, CMD_FLUSH, 0xbad, 0, 0, &[]);
    let payload: Vec<u8> = fake.iter().copied().cycle().take(32 * 8).collect();
    for cmd in [CMD_READ, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS, 77] {
        let cookie = c.cookie();
        c.send(FLAG_PAYLOAD_LEN, cmd, cookie, 0, payload.len() as u64, &payload);
        let rep = c.reply(cookie, 0);
        assert_eq!(rep.error(), NBD_EINVAL, "command {cmd} with a payload");
    }
    assert_eq!(c.read(0, 256), Ok(vec![0u8; 256]), "framing intact");
    assert_still_serving(&mut srv);
}

/// #41: PAYLOAD_LEN with a length over the maximum payload is a hard
/// disconnect (the spec's SHOULD).
#[test]
fn extended_payload_over_the_maximum_is_a_hard_disconnect() {
    let (_ex, mut srv) = start(&[]);
    for cmd in [CMD_WRITE, CMD_BLOCK_STATUS] {
        let mut c = Conn::open(&srv.addr, "mem", Mode::Extended, false);
        c.send(FLAG_PAYLOAD_LEN, cmd, 1, 0, 33 * MIB, &[0u8; 4096]);
        assert_closed_silently(&mut c.raw, &format!("command {cmd} with a 33 MiB payload"));
    }
    assert_still_serving(&mut srv);
}

/// Server behaviour (documented in codec.rs, for qemu 10): an extended
/// WRITE without PAYLOAD_LEN still carries its payload, which is read and
/// written.
#[test]
fn extended_write_without_payload_len_is_still_read() {
    let (_ex, mut srv) = start(&[]);
    let mut c = Conn::open(&srv.addr, "mem", Mode::Extended, false);
    let d = random_bytes(4096, 88);
    let cookie = c.cookie();
    c.send(0, CMD_WRITE, cookie, 8192, 4096, &d);
    assert_eq!(c.reply(cookie, 8192).error(), 0);
    assert_eq!(c.read(8192, 4096), Ok(d));
    assert_still_serving(&mut srv);
}

/// Hostile: a compact request after extended headers were negotiated has
/// the wrong magic: that client is dropped, nobody else.
#[test]
fn compact_request_after_extended_headers_is_dropped() {
    let (_ex, mut srv) = start(&[]);
    let mut c = Conn::open(&srv.addr, "mem", Mode::Extended, false);
    c.raw.request(0, CMD_READ, 1, 0, 512, &[0u8; 4]);
    assert_closed_silently(&mut c.raw, "compact request under extended headers");
    assert_still_serving(&mut srv);
}

// ============================================================ wire helpers

/// Wire-level helpers: constants, chunk parsing with the spec's chunk
/// rules checked, extended requests, reply collection.
mod wire {
    use nbdhost_tests::{OptReply, Raw};
    use std::collections::HashMap;
    use std::io::{Read, Write};

    pub const OPT_EXPORT_NAME: u32 = 1;
    pub const OPT_ABORT: u32 = 2;
    pub const OPT_LIST: u32 = 3;
    pub const OPT_PEEK_EXPORT: u32 = 4;
    pub const OPT_STARTTLS: u32 = 5;
    pub const OPT_INFO: u32 = 6;
    pub const OPT_GO: u32 = 7;
    pub const OPT_STRUCTURED_REPLY: u32 = 8;
    pub const OPT_LIST_META_CONTEXT: u32 = 9;
    pub const OPT_SET_META_CONTEXT: u32 = 10;
    pub const OPT_EXTENDED_HEADERS: u32 = 11;

    pub const REP_ACK: u32 = 1;
    pub const REP_SERVER: u32 = 2;
    pub const REP_INFO: u32 = 3;
    pub const REP_META_CONTEXT: u32 = 4;
    pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
    pub const REP_ERR_POLICY: u32 = 0x8000_0002;
    pub const REP_ERR_INVALID: u32 = 0x8000_0003;
    pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
    pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
    pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;
    pub const REP_ERR_EXT_HEADER_REQD: u32 = 0x8000_000a;

    pub const INFO_EXPORT: u16 = 0;
    pub const INFO_NAME: u16 = 1;
    pub const INFO_DESCRIPTION: u16 = 2;
    pub const INFO_BLOCK_SIZE: u16 = 3;

    pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
    pub const TFLAG_READ_ONLY: u16 = 1 << 1;
    pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
    pub const TFLAG_SEND_FUA: u16 = 1 << 3;
    pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const TFLAG_SEND_DF: u16 = 1 << 7;
    pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
    pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
    pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;
    pub const TFLAG_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

    pub const CMD_READ: u16 = 0;
    pub const CMD_WRITE: u16 = 1;
    pub const CMD_DISC: u16 = 2;
    pub const CMD_FLUSH: u16 = 3;
    pub const CMD_TRIM: u16 = 4;
    pub const CMD_CACHE: u16 = 5;
    pub const CMD_WRITE_ZEROES: u16 = 6;
    pub const CMD_BLOCK_STATUS: u16 = 7;

    pub const FLAG_FUA: u16 = 1 << 0;
    pub const FLAG_NO_HOLE: u16 = 1 << 1;
    pub const FLAG_DF: u16 = 1 << 2;
    pub const FLAG_REQ_ONE: u16 = 1 << 3;
    pub const FLAG_FAST_ZERO: u16 = 1 << 4;
    pub const FLAG_PAYLOAD_LEN: u16 = 1 << 5;

    pub const REPLY_FLAG_DONE: u16 = 1;
    pub const REPLY_TYPE_NONE: u16 = 0;
    pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
    pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
    pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
    pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
    pub const REPLY_TYPE_ERROR: u16 = 0x8001;
    pub const REPLY_TYPE_ERROR_OFFSET: u16 = 0x8002;

    pub const NBD_EPERM: u32 = 1;
    pub const NBD_EINVAL: u32 = 22;
    pub const NBD_ENOSPC: u32 = 28;
    pub const NBD_EOVERFLOW: u32 = 75;
    pub const NBD_ENOTSUP: u32 = 95;

    const REQUEST_MAGIC: u32 = 0x2560_9513;
    const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
    const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
    const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
    const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

    pub fn be16(b: &[u8]) -> u16 {
        u16::from_be_bytes([b[0], b[1]])
    }
    pub fn be32(b: &[u8]) -> u32 {
        u32::from_be_bytes(b[..4].try_into().unwrap())
    }
    pub fn be64(b: &[u8]) -> u64 {
        u64::from_be_bytes(b[..8].try_into().unwrap())
    }

    /// LIST/SET_META_CONTEXT data.
    pub fn meta_data(export: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    /// Read until EOF: Ok(bytes received before the close), Err on timeout.
    pub fn read_to_eof(r: &mut Raw) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        let mut b = [0u8; 65536];
        loop {
            match r.s.read(&mut b) {
                Ok(0) => return Ok(out),
                Ok(n) => out.extend_from_slice(&b[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(out),
                Err(e) => return Err(format!("{e} (connection still open after {} bytes)", out.len())),
            }
        }
    }

    /// Reply framing negotiated.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Mode {
        Simple,
        Structured,
        Extended,
    }

    /// Negotiate `mode` (expects an ACK).
    pub fn negotiate_mode(r: &mut Raw, mode: Mode) {
        let opt = match mode {
            Mode::Simple => return,
            Mode::Structured => OPT_STRUCTURED_REPLY,
            Mode::Extended => OPT_EXTENDED_HEADERS,
        };
        r.option(opt, &[]);
        assert_eq!(r.opt_reply(), (opt, REP_ACK, vec![]), "{mode:?} negotiation");
    }

    /// A request in compact or extended form (extended for `Mode::Extended`).
    pub fn encode_request(
        mode: Mode,
        flags: u16,
        cmd: u16,
        cookie: u64,
        off: u64,
        len: u64,
        payload: &[u8],
    ) -> Vec<u8> {
        let ext = mode == Mode::Extended;
        let mut b = if ext { EXTENDED_REQUEST_MAGIC } else { REQUEST_MAGIC }.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&off.to_be_bytes());
        if ext {
            b.extend_from_slice(&len.to_be_bytes());
        } else {
            b.extend_from_slice(&u32::try_from(len).expect("compact length fits 32 bits").to_be_bytes());
        }
        b.extend_from_slice(payload);
        b
    }

    /// One structured or extended reply chunk.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Chunk {
        pub extended: bool,
        pub flags: u16,
        pub kind: u16,
        pub cookie: u64,
        /// Header offset (extended chunks only; 0 otherwise).
        pub offset: u64,
        pub payload: Vec<u8>,
    }

    impl Chunk {
        pub fn done(&self) -> bool {
            self.flags & REPLY_FLAG_DONE != 0
        }
        pub fn is_error(&self) -> bool {
            self.kind & 0x8000 != 0
        }
        pub fn error(&self) -> u32 {
            be32(&self.payload)
        }
        pub fn message(&self) -> String {
            let n = be16(&self.payload[4..]) as usize;
            String::from_utf8(self.payload[6..6 + n].to_vec()).unwrap()
        }
        /// Offset carried in an OFFSET_DATA / OFFSET_HOLE payload.
        pub fn content_offset(&self) -> u64 {
            be64(&self.payload)
        }
        /// Bytes covered by an OFFSET_DATA / OFFSET_HOLE chunk.
        pub fn content_len(&self) -> u64 {
            match self.kind {
                REPLY_TYPE_OFFSET_DATA => self.payload.len() as u64 - 8,
                REPLY_TYPE_OFFSET_HOLE => be32(&self.payload[8..]) as u64,
                k => panic!("chunk type {k} has no content"),
            }
        }

        /// The spec's per-chunk rules (§2.5).
        fn validate(&self) {
            assert_eq!(self.flags & !REPLY_FLAG_DONE, 0, "undefined reply flags {:#x}", self.flags);
            let p = &self.payload;
            let n = p.len();
            match self.kind {
                REPLY_TYPE_NONE => {
                    assert_eq!(n, 0, "NONE chunk with a payload");
                    assert!(self.done(), "NONE chunk without DONE");
                }
                REPLY_TYPE_OFFSET_DATA => assert!(n >= 9, "OFFSET_DATA of {n} bytes (needs >= 9)"),
                REPLY_TYPE_OFFSET_HOLE => {
                    assert_eq!(n, 12, "OFFSET_HOLE payload length");
                    assert_ne!(be32(&p[8..]), 0, "OFFSET_HOLE of size 0");
                }
                REPLY_TYPE_BLOCK_STATUS => {
                    assert!(!self.extended, "BLOCK_STATUS chunk under extended headers");
                    assert!(n >= 12 && (n - 4).is_multiple_of(8), "BLOCK_STATUS payload length {n}");
                    for d in p[4..].chunks(8) {
                        assert_ne!(be32(d), 0, "zero-length block status descriptor");
                    }
                }
                REPLY_TYPE_BLOCK_STATUS_EXT => {
                    assert!(self.extended, "BLOCK_STATUS_EXT chunk without extended headers");
                    assert!(n >= 24 && (n - 8).is_multiple_of(16), "BLOCK_STATUS_EXT payload length {n}");
                    assert_eq!(be32(&p[4..]) as usize, (n - 8) / 16, "descriptor count");
                    for d in p[8..].chunks(16) {
                        assert_ne!(be64(d), 0, "zero-length block status descriptor");
                    }
                }
                REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
                    assert!(n >= 6, "error chunk of {n} bytes");
                    assert_ne!(be32(p), 0, "error chunk with error 0");
                    let m = be16(&p[4..]) as usize;
                    let extra = if self.kind == REPLY_TYPE_ERROR_OFFSET { 8 } else { 0 };
                    assert_eq!(n, 6 + m + extra, "error chunk length vs message length");
                    assert!(m <= 4096, "error message of {m} bytes");
                    let s = std::str::from_utf8(&p[6..6 + m]).expect("error message is UTF-8");
                    assert!(!s.contains('\0'), "NUL in error message");
                }
                k => panic!("unknown or unexpected chunk type {k:#x}"),
            }
        }
    }

    /// One reply message header (simple) or a whole chunk.
    #[derive(Debug)]
    pub enum Msg {
        Simple { error: u32, cookie: u64 },
        Chunk(Chunk),
    }

    /// Read one message; simple READ data is left on the socket.
    pub fn read_msg(r: &mut Raw) -> Msg {
        let mut m = [0u8; 4];
        r.read(&mut m);
        match u32::from_be_bytes(m) {
            SIMPLE_REPLY_MAGIC => {
                let mut h = [0u8; 12];
                r.read(&mut h);
                Msg::Simple { error: be32(&h), cookie: be64(&h[4..]) }
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut h = [0u8; 16];
                r.read(&mut h);
                let len = be32(&h[12..]) as usize;
                assert!(len <= (32 << 20) + 64, "chunk payload of {len} bytes");
                let mut payload = vec![0u8; len];
                r.read(&mut payload);
                let c = Chunk {
                    extended: false,
                    flags: be16(&h),
                    kind: be16(&h[2..]),
                    cookie: be64(&h[4..]),
                    offset: 0,
                    payload,
                };
                c.validate();
                Msg::Chunk(c)
            }
            EXTENDED_REPLY_MAGIC => {
                let mut h = [0u8; 28];
                r.read(&mut h);
                let len = be64(&h[20..]);
                assert!(len <= (32 << 20) + 64, "extended chunk payload of {len} bytes");
                let mut payload = vec![0u8; len as usize];
                r.read(&mut payload);
                let c = Chunk {
                    extended: true,
                    flags: be16(&h),
                    kind: be16(&h[2..]),
                    cookie: be64(&h[4..]),
                    offset: be64(&h[12..]),
                    payload,
                };
                c.validate();
                Msg::Chunk(c)
            }
            other => panic!("bad reply magic {other:#010x}"),
        }
    }

    /// A whole reply to one request.
    #[derive(Debug)]
    pub enum Reply {
        Simple { error: u32, cookie: u64 },
        Chunks(Vec<Chunk>),
    }

    impl Reply {
        pub fn cookie(&self) -> u64 {
            match self {
                Reply::Simple { cookie, .. } => *cookie,
                Reply::Chunks(c) => c[0].cookie,
            }
        }
        /// The error (first error chunk), 0 on success.
        pub fn error(&self) -> u32 {
            match self {
                Reply::Simple { error, .. } => *error,
                Reply::Chunks(c) => c.iter().find(|x| x.is_error()).map(|x| x.error()).unwrap_or(0),
            }
        }
        pub fn is_simple(&self) -> bool {
            matches!(self, Reply::Simple { .. })
        }
        pub fn chunks(&self) -> &[Chunk] {
            match self {
                Reply::Chunks(c) => c,
                Reply::Simple { error, .. } => panic!("expected a structured reply, got a simple one (error {error})"),
            }
        }
    }

    /// Read the whole reply to a single request in flight.
    pub fn read_reply(r: &mut Raw) -> Reply {
        match read_msg(r) {
            Msg::Simple { error, cookie } => Reply::Simple { error, cookie },
            Msg::Chunk(c) => {
                let cookie = c.cookie;
                let mut v = vec![c];
                while !v.last().unwrap().done() {
                    match read_msg(r) {
                        Msg::Chunk(c) => {
                            assert_eq!(c.cookie, cookie, "chunk of another reply");
                            v.push(c);
                        }
                        Msg::Simple { .. } => panic!("simple reply inside a structured reply"),
                    }
                }
                Reply::Chunks(v)
            }
        }
    }

    /// Check a READ reply's chunks (§2.6, checklist #21-#23) and return the
    /// data, or the error.
    pub fn read_result(chunks: &[Chunk], offset: u64, len: u64, df: bool) -> Result<Vec<u8>, u32> {
        let mut buf = vec![0u8; len as usize];
        let mut covered: Vec<(u64, u64)> = Vec::new();
        let mut err = None;
        for (i, c) in chunks.iter().enumerate() {
            assert_eq!(c.done(), i + 1 == chunks.len(), "DONE exactly on the last chunk");
            match c.kind {
                REPLY_TYPE_NONE => {}
                REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
                    let (o, n) = (c.content_offset(), c.content_len());
                    assert!(o >= offset && o + n <= offset + len, "content {o}+{n} outside the request {offset}+{len}");
                    for &(a, b) in &covered {
                        assert!(o + n <= a || o >= a + b, "content {o}+{n} overlaps {a}+{b}");
                    }
                    covered.push((o, n));
                    let at = (o - offset) as usize;
                    if c.kind == REPLY_TYPE_OFFSET_DATA {
                        buf[at..at + n as usize].copy_from_slice(&c.payload[8..]);
                    } else {
                        buf[at..at + n as usize].fill(0);
                    }
                }
                REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
                    if c.kind == REPLY_TYPE_ERROR_OFFSET {
                        let eo = be64(&c.payload[c.payload.len() - 8..]);
                        assert!(eo >= offset && eo < offset + len.max(1), "error offset {eo} outside the request");
                    }
                    err.get_or_insert(c.error());
                }
                k => panic!("chunk type {k} in a READ reply"),
            }
        }
        let content = covered.len();
        if df {
            assert!(content <= 1, "DF read answered with {content} content chunks");
        }
        if let Some(e) = err {
            return Err(e);
        }
        let total: u64 = covered.iter().map(|c| c.1).sum();
        assert_eq!(total, len, "content chunks cover {total} of {len} bytes");
        Ok(buf)
    }

    /// Descriptors of one context: (context ID, [(length, status)]).
    pub type Status = Vec<(u32, Vec<(u64, u64)>)>;

    /// A client in transmission.
    pub struct Conn {
        pub raw: Raw,
        pub mode: Mode,
        pub size: u64,
        pub tflags: u16,
        /// ID of `base:allocation` if selected.
        pub ctx: Option<u32>,
        next: u64,
    }

    impl Conn {
        /// Connect, negotiate `mode`, optionally select `base:allocation`,
        /// and GO to `export`.
        pub fn open(addr: &str, export: &str, mode: Mode, meta: bool) -> Conn {
            let mut raw = Raw::fixed(addr);
            negotiate_mode(&mut raw, mode);
            let mut ctx = None;
            if meta {
                raw.option(OPT_SET_META_CONTEXT, &meta_data(export, &["base:allocation"]));
                let v = raw.opt_replies();
                assert_eq!(v.len(), 2, "SET base:allocation: {v:?}");
                assert_eq!(v[0].1, REP_META_CONTEXT);
                assert_eq!(&v[0].2[4..], b"base:allocation");
                assert_eq!(v[1].1, REP_ACK);
                ctx = Some(be32(&v[0].2));
            }
            let mut c = Conn::go(raw, export, mode);
            c.ctx = ctx;
            c
        }

        /// GO on an already negotiated connection.
        pub fn go(mut raw: Raw, export: &str, mode: Mode) -> Conn {
            let (size, tflags) = raw.go(export);
            Conn { raw, mode, size, tflags, ctx: None, next: 0x1000 }
        }

        /// Wrap a connection whose GO replies were `v`.
        pub fn after_go(raw: Raw, v: &[OptReply], mode: Mode) -> Conn {
            let e = v.iter().find(|x| x.1 == REP_INFO && be16(&x.2) == INFO_EXPORT).expect("INFO_EXPORT");
            Conn { raw, mode, size: be64(&e.2[2..]), tflags: be16(&e.2[10..]), ctx: None, next: 0x1000 }
        }

        pub fn cookie(&mut self) -> u64 {
            self.next += 1;
            self.next
        }

        pub fn send(&mut self, flags: u16, cmd: u16, cookie: u64, off: u64, len: u64, payload: &[u8]) {
            let b = encode_request(self.mode, flags, cmd, cookie, off, len, payload);
            self.raw.send(&b);
        }

        /// Read the reply to the single request in flight and check the
        /// framing rules of the negotiated mode.
        pub fn reply(&mut self, cookie: u64, off: u64) -> Reply {
            let r = read_reply(&mut self.raw);
            assert_eq!(r.cookie(), cookie, "cookie echoed");
            match (&r, self.mode) {
                (Reply::Chunks(_), Mode::Simple) => panic!("structured reply without structured replies"),
                (Reply::Simple { .. }, Mode::Extended) => panic!("simple reply under extended headers"),
                (Reply::Chunks(c), m) => {
                    for x in c {
                        assert_eq!(x.extended, m == Mode::Extended, "chunk magic matches the mode");
                        if m == Mode::Extended {
                            assert_eq!(x.offset, off, "extended reply offset echoes the request");
                        }
                    }
                }
                _ => {}
            }
            r
        }

        /// A payload-free command; returns the error (0 on success).
        pub fn command(&mut self, flags: u16, cmd: u16, off: u64, len: u64) -> u32 {
            let cookie = self.cookie();
            self.send(flags, cmd, cookie, off, len, &[]);
            let r = self.reply(cookie, off);
            if cmd == CMD_READ {
                assert!(self.mode == Mode::Simple || !r.is_simple(), "simple reply to READ");
            }
            r.error()
        }

        pub fn write_flags(&mut self, flags: u16, off: u64, data: &[u8]) -> u32 {
            let flags = if self.mode == Mode::Extended { flags | FLAG_PAYLOAD_LEN } else { flags };
            let cookie = self.cookie();
            self.send(flags, CMD_WRITE, cookie, off, data.len() as u64, data);
            self.reply(cookie, off).error()
        }

        pub fn write(&mut self, off: u64, data: &[u8]) -> u32 {
            self.write_flags(0, off, data)
        }

        pub fn read_flags(&mut self, flags: u16, off: u64, len: u64) -> Result<Vec<u8>, u32> {
            let cookie = self.cookie();
            self.send(flags, CMD_READ, cookie, off, len, &[]);
            match self.reply(cookie, off) {
                Reply::Simple { error: 0, .. } => Ok(self.raw.try_read(len as usize).expect("simple READ data")),
                Reply::Simple { error, .. } => Err(error),
                Reply::Chunks(c) => read_result(&c, off, len, flags & FLAG_DF != 0),
            }
        }

        pub fn read(&mut self, off: u64, len: u64) -> Result<Vec<u8>, u32> {
            self.read_flags(0, off, len)
        }

        /// BLOCK_STATUS: one entry per status chunk, or the error.
        pub fn block_status(&mut self, flags: u16, off: u64, len: u64) -> Result<Status, u32> {
            let cookie = self.cookie();
            self.send(flags, CMD_BLOCK_STATUS, cookie, off, len, &[]);
            let r = self.reply(cookie, off);
            if let Reply::Simple { error, .. } = r {
                assert_ne!(error, 0, "successful BLOCK_STATUS as a simple reply");
                return Err(error);
            }
            if r.error() != 0 {
                return Err(r.error());
            }
            let mut out = Vec::new();
            for c in r.chunks() {
                match c.kind {
                    REPLY_TYPE_BLOCK_STATUS => {
                        let d = c.payload[4..].chunks(8).map(|d| (be32(d) as u64, be32(&d[4..]) as u64)).collect();
                        out.push((be32(&c.payload), d));
                    }
                    REPLY_TYPE_BLOCK_STATUS_EXT => {
                        let d = c.payload[8..].chunks(16).map(|d| (be64(d), be64(&d[8..]))).collect();
                        out.push((be32(&c.payload), d));
                    }
                    REPLY_TYPE_NONE => {}
                    k => panic!("chunk type {k} in a BLOCK_STATUS reply"),
                }
            }
            let mut ids: Vec<u32> = out.iter().map(|x| x.0).collect();
            ids.sort();
            ids.dedup();
            assert_eq!(ids.len(), out.len(), "one status chunk per context");
            if let Some(id) = self.ctx {
                assert_eq!(ids, vec![id], "status for the selected context only");
            }
            Ok(out)
        }

        /// NBD_CMD_DISC: no reply, the server closes.
        pub fn disc(mut self) {
            let b = encode_request(self.mode, 0, CMD_DISC, 0, 0, 0, &[]);
            self.raw.send(&b);
            assert_eq!(read_to_eof(&mut self.raw), Ok(vec![]), "server sends nothing and closes after DISC");
        }
    }

    /// Send `buf` (many requests) from another thread while collecting the
    /// replies for `expect` (cookie, Some((offset, length)) for READs);
    /// returns cookie -> (error, data). Every cookie must be answered once.
    pub fn send_and_collect(
        c: &mut Conn,
        buf: Vec<u8>,
        expect: &[(u64, Option<(u64, u64)>)],
    ) -> HashMap<u64, (u32, Vec<u8>)> {
        let mut w = c.raw.s.try_clone().unwrap();
        let writer = std::thread::spawn(move || w.write_all(&buf));
        let reads: HashMap<u64, Option<(u64, u64)>> = expect.iter().copied().collect();
        assert_eq!(reads.len(), expect.len(), "cookies must be unique here");
        let mut partial: HashMap<u64, Vec<Chunk>> = HashMap::new();
        let mut done: HashMap<u64, (u32, Vec<u8>)> = HashMap::new();
        while done.len() < expect.len() {
            let (cookie, result) = match read_msg(&mut c.raw) {
                Msg::Simple { error, cookie } => {
                    assert_ne!(c.mode, Mode::Extended, "simple reply under extended headers");
                    let r = reads.get(&cookie).unwrap_or_else(|| panic!("reply to unknown cookie {cookie:#x}"));
                    let data = match (r, error) {
                        (Some((_, len)), 0) => {
                            assert_eq!(c.mode, Mode::Simple, "simple reply to READ with structured replies");
                            c.raw.try_read(*len as usize).expect("READ data")
                        }
                        _ => Vec::new(),
                    };
                    (cookie, (error, data))
                }
                Msg::Chunk(ch) => {
                    assert_ne!(c.mode, Mode::Simple, "chunk without structured replies");
                    let cookie = ch.cookie;
                    let r = *reads.get(&cookie).unwrap_or_else(|| panic!("chunk for unknown cookie {cookie:#x}"));
                    let fin = ch.done();
                    partial.entry(cookie).or_default().push(ch);
                    if !fin {
                        continue;
                    }
                    let chunks = partial.remove(&cookie).unwrap();
                    let result = match r {
                        Some((off, len)) => match read_result(&chunks, off, len, false) {
                            Ok(d) => (0, d),
                            Err(e) => (e, Vec::new()),
                        },
                        None => (Reply::Chunks(chunks).error(), Vec::new()),
                    };
                    (cookie, result)
                }
            };
            assert!(done.insert(cookie, result).is_none(), "second reply for cookie {cookie:#x}");
        }
        writer.join().unwrap().expect("sending the pipelined requests");
        assert!(partial.is_empty(), "unfinished replies: {:?}", partial.keys());
        done
    }
}
