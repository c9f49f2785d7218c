//! Serving many clients, shutting down cleanly, and surviving hostile input.

use nbdhost_tests::*;
use std::time::{Duration, Instant};

fn mem(ex: &Exports) {
    ex.snippet("mem", "[[layer]]\nplugin = \"memory\"\nsize = \"64M\"\n");
}

#[test]
fn sigterm_exits_zero_promptly_with_an_idle_client_connected() {
    let ex = Exports::new();
    mem(&ex);
    let mut srv = Server::start(&ex, &[]);
    let mut idle = Raw::fixed(&srv.addr);
    idle.go("mem");
    let mut hs = Raw::connect(&srv.addr); // stuck mid-handshake
    let _ = hs.try_read(18);
    let t = Instant::now();
    let st = srv.terminate();
    assert!(st.success(), "exit status {st}:\n{}", srv.log());
    assert!(t.elapsed() < Duration::from_secs(5), "shutdown took {:?}", t.elapsed());
    assert!(idle.closed(), "idle client not disconnected");
}

#[test]
fn sixty_four_clients_at_once_keep_their_data_apart() {
    if !require_python_nbd() {
        return;
    }
    let ex = Exports::new();
    mem(&ex);
    let srv = Server::start(&ex, &[]);
    let o = python(
        r#"
import nbd, sys, threading, os
uri = sys.argv[1]
N = 64
errors = []
def client(i):
    try:
        h = nbd.NBD()
        h.connect_uri(uri)
        base = i * (1 << 20)
        blob = bytes([(i * 7 + j) % 256 for j in range(256)]) * 256  # 64 KiB
        for k in range(8):
            h.pwrite(blob, base + k * 65536)
        h.flush()
        for k in range(8):
            if h.pread(65536, base + k * 65536) != blob:
                errors.append("client %d block %d differs" % (i, k))
        h.shutdown()
    except Exception as e:
        errors.append("client %d: %r" % (i, e))
ts = [threading.Thread(target=client, args=(i,)) for i in range(N)]
[t.start() for t in ts]
[t.join() for t in ts]
# Everyone's data is still where they put it, seen from a fresh connection.
h = nbd.NBD()
h.connect_uri(uri)
for i in range(N):
    blob = bytes([(i * 7 + j) % 256 for j in range(256)]) * 256
    if h.pread(65536, i * (1 << 20) + 7 * 65536) != blob:
        errors.append("final check %d" % i)
print("errors:", errors[:5])
sys.exit(1 if errors else 0)
"#,
        &[&srv.uri("mem")],
    );
    assert!(
        o.status.success(),
        "{}{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        srv.log()
    );
}

#[test]
fn hostile_handshakes_are_dropped_and_others_keep_being_served() {
    let ex = Exports::new();
    mem(&ex);
    let mut srv = Server::start(&ex, &[]);
    // Unknown client flag bits: the server must close.
    let mut r = Raw::connect(&srv.addr);
    r.greet(0x8000_0003);
    assert!(r.closed(), "unknown client flags accepted");
    // Bad option magic.
    let mut r = Raw::fixed(&srv.addr);
    r.send(b"IHAVEOPX\0\0\0\x03\0\0\0\0");
    assert!(r.closed(), "bad option magic accepted");
    // A 2 GiB option length is refused at once, without reading it.
    let mut r = Raw::fixed(&srv.addr);
    r.send(b"IHAVEOPT\0\0\0\x06\x80\0\0\0");
    let (opt, kind, _) = r.opt_reply();
    assert_eq!((opt, kind), (6, 0x8000_0009), "ERR_TOO_BIG expected");
    assert!(r.closed());
    // An unknown option gets ERR_UNSUP and negotiation continues.
    let mut r = Raw::fixed(&srv.addr);
    r.option(4242, b"some data to skip");
    assert_eq!(r.opt_reply().1, 0x8000_0001);
    let (size, flags) = r.go("mem");
    assert_eq!(size, 64 << 20);
    assert_eq!(flags & 1, 1, "HAS_FLAGS");
    // Garbage in transmission: bad request magic closes this connection only.
    r.send(&[0xffu8; 28]);
    assert!(r.closed());
    // A client vanishing mid-payload.
    let mut r = Raw::fixed(&srv.addr);
    r.go("mem");
    r.request(0, 1, 1, 0, 1 << 20, &[1u8; 1000]);
    drop(r);
    // The server is still fine.
    let mut ok = Raw::fixed(&srv.addr);
    ok.go("mem");
    ok.request(0, 1, 9, 4096, 512, &[7u8; 512]);
    assert_eq!(ok.simple_reply(), (0, 9));
    ok.request(0, 0, 10, 4096, 512, &[]);
    assert_eq!(ok.simple_reply(), (0, 10));
    let data = ok.try_read(512).expect("read data");
    assert!(data.iter().all(|&b| b == 7));
    assert!(srv.alive());
}

#[test]
fn write_to_a_read_only_export_is_eperm_and_its_payload_is_consumed() {
    let ex = Exports::new();
    ex.snippet("ro", "readonly = true\n[[layer]]\nplugin = \"memory\"\nsize = \"1M\"\n");
    let srv = Server::start(&ex, &[]);
    let mut r = Raw::fixed(&srv.addr);
    let (_, flags) = r.go("ro");
    assert_eq!(flags & 2, 2, "READ_ONLY flag");
    r.request(0, 1, 77, 0, 4096, &[0x55u8; 4096]);
    assert_eq!(r.simple_reply(), (1, 77), "EPERM");
    // Framing kept: the next request is understood.
    r.request(0, 0, 78, 0, 16, &[]);
    assert_eq!(r.simple_reply(), (0, 78));
    assert_eq!(r.try_read(16).unwrap(), vec![0u8; 16]);
    // Write past the end of a writable export: ENOSPC; read past it: EINVAL.
    let ex2 = Exports::new();
    ex2.snippet("rw", "[[layer]]\nplugin = \"memory\"\nsize = \"1M\"\n");
    let srv2 = Server::start(&ex2, &[]);
    let mut w = Raw::fixed(&srv2.addr);
    w.go("rw");
    w.request(0, 1, 1, (1 << 20) - 256, 512, &[1u8; 512]);
    assert_eq!(w.simple_reply(), (28, 1), "ENOSPC");
    w.request(0, 0, 2, (1 << 20) - 256, 512, &[]);
    assert_eq!(w.simple_reply(), (22, 2), "EINVAL");
    w.request(0, 99, 3, 0, 0, &[]);
    assert_eq!(w.simple_reply(), (22, 3), "unknown command: EINVAL");
    w.request(0x8000, 0, 4, 0, 512, &[]);
    assert_eq!(w.simple_reply(), (22, 4), "unknown flag: EINVAL");
    // DISC: the server closes after it.
    w.request(0, 2, 5, 0, 0, &[]);
    assert!(w.closed());
}

#[test]
fn a_handshake_that_stalls_is_timed_out() {
    let ex = Exports::new();
    mem(&ex);
    let srv = Server::start(&ex, &["--handshake-timeout", "1"]);
    let mut r = Raw::connect(&srv.addr);
    let _ = r.try_read(18);
    let t = Instant::now();
    assert!(r.closed(), "stalled handshake not dropped");
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(srv.wait_for_log("handshake not finished"), "{}", srv.log());
}

#[test]
fn shutdown_finishes_requests_in_flight_and_refuses_new_work() {
    let dir = build_test_plugin("faulty");
    let ex = Exports::new();
    ex.snippet("slow", "[[layer]]\nplugin = \"faulty\"\ndelay_ms = 1500\n");
    let art = artifacts();
    let mut srv = Server::start(&ex, &["--plugin-dir", dir.to_str().unwrap(), "--plugin-dir", art.to_str().unwrap()]);
    let mut client = Raw::fixed(&srv.addr);
    client.go("slow");
    let mut negotiating = Raw::fixed(&srv.addr);
    // A slow read (3 MiB is the plugin's delay block) is in flight...
    client.request(0, 0, 1, 3 << 20, 4096, &[]);
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    srv.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    // ...a new request is refused with ESHUTDOWN, an option with ERR_SHUTDOWN...
    client.request(0, 0, 2, 0, 4096, &[]);
    negotiating.option(3, &[]);
    let (_, kind, _) = negotiating.opt_reply();
    assert_eq!(kind, 0x8000_0007, "ERR_SHUTDOWN");
    let mut replies = Vec::new();
    for _ in 0..2 {
        let (err, cookie) = client.simple_reply();
        if cookie == 1 && err == 0 {
            assert_eq!(client.try_read(4096).expect("data of the slow read"), vec![0u8; 4096]);
        }
        replies.push((cookie, err));
    }
    replies.sort();
    // ...and the read in flight still completes.
    assert_eq!(replies, vec![(1, 0), (2, 108)], "cookie 1 completes, cookie 2 gets ESHUTDOWN");
    let st = srv.wait_exit();
    assert!(st.success(), "exit status {st}");
    assert!(t.elapsed() < Duration::from_secs(8), "shutdown took {:?}", t.elapsed());
    assert!(client.closed());
}

fn faulty(ex: &Exports, extra: &str) -> Server {
    let dir = build_test_plugin("faulty");
    ex.snippet("f", &format!("[[layer]]\nplugin = \"faulty\"\n{extra}"));
    Server::start(ex, &["--plugin-dir", dir.to_str().unwrap()])
}

#[test]
fn declared_block_sizes_are_advertised_and_enforced_without_disconnecting() {
    let ex = Exports::new();
    let srv = faulty(&ex, "min_block = \"512\"\nmax_block = \"64K\"\n");
    let mut r = Raw::fixed(&srv.addr);
    r.option(7, &Raw::info_data("f", &[3]));
    let replies = r.opt_replies();
    let bs = replies
        .iter()
        .find(|(_, k, d)| *k == 3 && d[..2] == [0, 3])
        .map(|(_, _, d)| {
            let u = |i: usize| u32::from_be_bytes(d[i..i + 4].try_into().unwrap());
            (u(2), u(6), u(10))
        })
        .expect("NBD_INFO_BLOCK_SIZE");
    assert_eq!(bs, (512, 4096, 65536));
    // Unaligned read, unaligned write, oversized write: EINVAL, connection kept.
    r.request(0, 0, 1, 100, 512, &[]);
    assert_eq!(r.simple_reply(), (22, 1));
    r.request(0, 1, 2, 512, 100, &[9u8; 100]);
    assert_eq!(r.simple_reply(), (22, 2));
    r.request(0, 1, 3, 0, 1 << 20, &vec![9u8; 1 << 20]);
    assert_eq!(r.simple_reply(), (22, 3), "write over the 64 KiB maximum");
    r.request(0, 0, 4, 4096, 4096, &[]);
    assert_eq!(r.simple_reply(), (0, 4));
    assert_eq!(r.try_read(4096).unwrap(), vec![0u8; 4096]);
    if require_tool("nbdinfo") {
        let out = run_ok("nbdinfo", &[&srv.uri("f")]);
        assert!(out.contains("block_size_minimum: 512") && out.contains("block_size_maximum: 65536"), "{out}");
        // faulty shares nothing safely across connections: no multi-conn.
        assert!(out.contains("can_multi_conn: false"), "{out}");
    }
}

#[test]
fn disc_answers_every_request_in_flight_before_closing() {
    let ex = Exports::new();
    let srv = faulty(&ex, "delay_ms = 800\n");
    let mut r = Raw::fixed(&srv.addr);
    r.go("f");
    r.request(0, 0, 1, 3 << 20, 4096, &[]); // slow
    r.request(0, 0, 2, 0, 4096, &[]);
    r.request(0, 2, 3, 0, 0, &[]); // DISC right behind them
    let mut cookies = Vec::new();
    for _ in 0..2 {
        let (err, cookie) = r.simple_reply();
        assert_eq!(err, 0);
        r.try_read(4096).expect("read data");
        cookies.push(cookie);
    }
    cookies.sort();
    assert_eq!(cookies, vec![1, 2], "both reads answered");
    assert!(r.closed(), "connection closed after DISC");
}

#[test]
fn random_bytes_from_many_clients_never_hurt_the_server() {
    let ex = Exports::new();
    mem(&ex);
    let mut srv = Server::start(&ex, &[]);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..200u64 {
        let mut r = Raw::connect(&srv.addr);
        let _ = r.try_read(18);
        // Sometimes a valid prefix (flags, GO) before the noise, so the
        // noise reaches every phase.
        if round % 3 != 0 {
            r.send(&3u32.to_be_bytes());
        }
        if round % 3 == 2 {
            r.option(7, &Raw::info_data("mem", &[]));
            let _ = r.opt_replies();
        }
        let noise = random_bytes(64 + (round as usize * 37) % 4000, seed);
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(round);
        use std::io::Write;
        let _ = r.s.write_all(&noise);
        let _ = r.s.shutdown(std::net::Shutdown::Write);
        assert!(r.closed(), "round {round}: server kept a garbage connection open");
    }
    assert!(srv.alive(), "server died:\n{}", srv.log());
    assert!(!srv.log().contains("panicked"), "{}", srv.log());
    let mut ok = Raw::fixed(&srv.addr);
    ok.go("mem");
    ok.request(0, 1, 1, 0, 512, &[3u8; 512]);
    assert_eq!(ok.simple_reply(), (0, 1));
}
