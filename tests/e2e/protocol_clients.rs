//! Protocol features exercised through real clients: nbdcopy with several
//! connections, nbdinfo --map, qemu-img map, nbdsh scripts (block status,
//! DF, zeroing flags, errors) and libnbd's view of sparse and split reads.

use nbdhost_tests::*;

const MIB: usize = 1 << 20;

fn exports(ex: &Exports) {
    ex.snippet("mem", "[[layer]]\nplugin = \"memory\"\nsize = \"64M\"\n");
    ex.snippet("disk", "[[layer]]\nplugin = \"file\"\npath = \"disk.img\"\nsize = \"64M\"\n");
}

#[test]
fn nbdcopy_with_four_connections_round_trips() {
    if !require_tool("nbdcopy") {
        return;
    }
    let ex = Exports::new();
    exports(&ex);
    let src = ex.path("src.img");
    let data = random_bytes(64 * MIB, 42);
    std::fs::write(&src, &data).unwrap();
    let srv = Server::start(&ex, &[]);
    for export in ["mem", "disk"] {
        let uri = srv.uri(export);
        run_ok("nbdcopy", &["--connections=4", "--threads=4", "--requests=16", src.to_str().unwrap(), &uri]);
        let back = ex.path(&format!("back-{export}.img"));
        run_ok("nbdcopy", &["--connections=4", "--threads=4", &uri, back.to_str().unwrap()]);
        assert!(std::fs::read(&back).unwrap() == data, "{export}: nbdcopy round trip differs");
    }
    // Four connections really were used at once on the multi-conn export.
    assert!(srv.log().matches("export `mem`").count() >= 8, "{}", srv.log());
}

#[test]
fn nbdinfo_map_and_qemu_img_map_show_the_holes_of_a_sparse_file() {
    if !require_tool("nbdinfo") || !require_tool("qemu-img") || !require_tool("qemu-io") {
        return;
    }
    let ex = Exports::new();
    exports(&ex);
    let srv = Server::start(&ex, &[]);
    let uri = srv.uri("disk");
    run_ok("qemu-io", &["-f", "raw", "-c", "write -P 1 1M 64k", "-c", "write -P 2 10M 1M", &uri]);
    let map = run_ok("nbdinfo", &["--map", "--json", &uri]);
    let v: serde_json::Value = serde_json::from_str(&map).expect("nbdinfo --map --json");
    let got: Vec<(u64, u64, u64)> = v
        .as_array()
        .expect("array")
        .iter()
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap(), e["type"].as_u64().unwrap()))
        .collect();
    let m = MIB as u64;
    assert_eq!(
        got,
        vec![(0, m, 3), (m, 65536, 0), (m + 65536, 9 * m - 65536, 3), (10 * m, m, 0), (11 * m, 53 * m, 3)],
        "{map}"
    );
    let qmap = run_ok("qemu-img", &["map", "--output=json", &uri]);
    assert!(
        qmap.contains(&format!(
            "\"start\": {}, \"length\": 65536, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true",
            m
        )),
        "{qmap}"
    );
    // The memory export: all one hole until written.
    let map = run_ok("nbdinfo", &["--map", &srv.uri("mem")]);
    assert_eq!(map.lines().count(), 1, "{map}");
    assert!(map.contains("hole,zero"), "{map}");
}

#[test]
fn nbdsh_block_status_df_zero_flags_and_errors() {
    if !require_tool("nbdsh") || !require_python_nbd() {
        return;
    }
    let ex = Exports::new();
    exports(&ex);
    let srv = Server::start(&ex, &[]);
    let script = r#"
import nbd
M = 1 << 20
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
assert h.can_df() and h.can_zero() and h.can_fast_zero() and h.can_trim() and h.can_flush() and h.can_fua()
h.pwrite(b"\x5a" * M, 2 * M)

# Block status: hole, data, hole; REQ_ONE gives one extent within the request.
seen = []
def cb(ctx, off, entries, err):
    assert ctx == nbd.CONTEXT_BASE_ALLOCATION
    seen.append(list(entries))
    return 0
h.block_status(8 * M, 0, cb)
e = seen[-1]
assert e[0:2] == [2 * M, 3] and e[2:4] == [M, 0], e
h.block_status(8 * M, 0, cb, nbd.CMD_FLAG_REQ_ONE)
assert seen[-1] == [2 * M, 3], seen[-1]
h.block_status(4096, 2 * M + 4096, cb, nbd.CMD_FLAG_REQ_ONE)
assert seen[-1] == [4096, 0], seen[-1]

# DF: one chunk even across hole and data.
chunks = []
def chunk(buf, off, status, err):
    chunks.append((off, len(buf), status))
    return 0
buf = h.pread_structured(2 * M, M + M // 2, chunk, nbd.CMD_FLAG_DF)
assert len(chunks) == 1 and chunks[0] == (M + M // 2, 2 * M, nbd.READ_DATA), chunks
assert buf[: M // 2] == bytes(M // 2) and buf[M // 2 : M // 2 + M] == b"\x5a" * M and buf[M // 2 + M :] == bytes(M // 2)

# Zeroing: plain, NO_HOLE, FAST_ZERO; all read back as zeros.
h.zero(65536, 2 * M)
h.zero(65536, 2 * M + 65536, nbd.CMD_FLAG_NO_HOLE)
h.zero(65536, 2 * M + 131072, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_FUA)
assert h.pread(196608, 2 * M) == bytes(196608)
assert h.pread(4096, 2 * M + 196608) == b"\x5a" * 4096
h.trim(M, 6 * M)
h.flush()

# Errors from the server, with client-side checks off.
h.set_strict_mode(0)
for (what, f, code) in [
    ("read past end", lambda: h.pread(512, h.get_size()), "EINVAL"),
    ("write past end", lambda: h.pwrite(b"x" * 512, h.get_size() - 256), "ENOSPC"),
    ("zero past end", lambda: h.zero(4096, h.get_size()), "ENOSPC"),
    ("trim past end", lambda: h.trim(4096, h.get_size()), "EINVAL"),
]:
    try:
        f()
        raise SystemExit(what + ": no error")
    except nbd.Error as err:
        assert err.errno == code, (what, err.errno, err.string)
print("OK")
"#;
    for export in ["mem", "disk"] {
        let o = nbdsh(&["--base-allocation"], &srv.uri(export), script);
        let out = assert_ok(&format!("nbdsh on {export}"), &o);
        assert!(out.contains("OK"), "{export}: {out}");
    }
}

/// Sparse reads come back as holes around the data. On a fast layer a data
/// run is one chunk (the cheapest for client and server); where reads are
/// slow enough to run on workers, a large read is split into pieces read
/// concurrently, which together cover it exactly once.
#[test]
fn libnbd_sees_sparse_reads_as_holes_and_slow_large_reads_as_several_chunks() {
    if !require_python_nbd() {
        return;
    }
    let ex = Exports::new();
    exports(&ex);
    ex.snippet(
        "slow",
        "[[layer]]\nfilter = \"delay\"\nrdelay = \"5ms\"\n\n[[layer]]\nplugin = \"memory\"\nsize = \"64M\"\n",
    );
    let srv = Server::start(&ex, &[]);
    let o = python(
        r#"
import nbd, sys
M = 1 << 20
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(bytes(range(256)) * 4096, 4 * M)    # 1 MiB of data at 4 MiB
chunks = []
def chunk(buf, off, status, err):
    chunks.append((off, len(buf), status))
    return 0
# 8 MiB read: holes before and after the data, the data in one chunk.
buf = h.pread_structured(8 * M, 0, chunk)
assert buf[4 * M : 5 * M] == bytes(range(256)) * 4096
assert buf[: 4 * M] == bytes(4 * M) and buf[5 * M :] == bytes(3 * M)
holes = sorted((o, l) for (o, l, s) in chunks if s == nbd.READ_HOLE)
data = sorted((o, l) for (o, l, s) in chunks if s == nbd.READ_DATA)
assert holes == [(0, 4 * M), (5 * M, 3 * M)], holes
assert data == [(4 * M, M)], ("a fast layer sends a data run as one chunk", data)

# Slow reads: the same layout through a delay filter is read in pieces.
s = nbd.NBD()
s.connect_uri(sys.argv[2])
s.pwrite(bytes(range(256)) * 4096, 4 * M)
s.pwrite(b"\x11" * (8 * M), 16 * M)
for _ in range(3):
    s.pread(4096, 0)                          # the server learns reads are slow
chunks.clear()
buf = s.pread_structured(8 * M, 0, chunk)
assert buf[4 * M : 5 * M] == bytes(range(256)) * 4096
assert buf[: 4 * M] == bytes(4 * M) and buf[5 * M :] == bytes(3 * M)
holes = sorted((o, l) for (o, l, st) in chunks if st == nbd.READ_HOLE)
data = sorted((o, l) for (o, l, st) in chunks if st == nbd.READ_DATA)
assert holes == [(0, 4 * M), (5 * M, 3 * M)], holes
assert data == [(4 * M + i * 256 * 1024, 256 * 1024) for i in range(4)], ("4 pieces of 256 KiB", data)
# A big all-data read comes back in pieces that cover it exactly once.
chunks.clear()
buf = s.pread_structured(8 * M, 16 * M, chunk)
assert buf == b"\x11" * (8 * M)
cover = sorted((o, l) for (o, l, st) in chunks)
pos = 16 * M
for (o, l) in cover:
    assert o == pos, cover
    pos += l
assert pos == 24 * M and len(cover) == 32, len(cover)
print("OK")
"#,
        &[&srv.uri("mem"), &srv.uri("slow")],
    );
    let out = assert_ok("python", &o);
    assert!(out.contains("OK"), "{out}");
}

#[test]
fn two_hundred_fifty_six_requests_in_flight_on_one_connection() {
    if !require_python_nbd() {
        return;
    }
    let ex = Exports::new();
    exports(&ex);
    let srv = Server::start(&ex, &[]);
    let o = python(
        r#"
import nbd, sys
N = 256
h = nbd.NBD()
h.connect_uri(sys.argv[1])
def blob(i):
    return bytes([(i * 31 + j) % 251 for j in range(64)]) * 1024   # 64 KiB
bufs = [nbd.Buffer.from_bytearray(bytearray(blob(i))) for i in range(N)]
cookies = [h.aio_pwrite(bufs[i], i * 65536) for i in range(N)]
peak = h.aio_in_flight()
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cookies:
    assert h.aio_command_completed(c)
reads = [nbd.Buffer(65536) for _ in range(N)]
cookies = [h.aio_pread(reads[i], i * 65536) for i in range(N)]
peak = max(peak, h.aio_in_flight())
while h.aio_in_flight() > 0:
    h.poll(-1)
for i in range(N):
    assert h.aio_command_completed(cookies[i])
    assert reads[i].to_bytearray() == blob(i), i
print("peak", peak)
print("OK")
"#,
        &[&srv.uri("mem")],
    );
    let out = assert_ok("python", &o);
    assert!(out.contains("OK"), "{out}");
    let peak: usize = out.lines().find_map(|l| l.strip_prefix("peak ")).and_then(|p| p.trim().parse().ok()).unwrap();
    assert!(peak >= 200, "only {peak} requests were in flight at once");
}
