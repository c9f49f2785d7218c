//! Filters that change the shape of a disk (partition, truncate, protect,
//! blocksize) and the delay filter, through real clients: exact bytes on
//! disk, exact error codes, refused parameters and unavailable exports.

use nbdhost_tests::*;
use std::os::unix::fs::FileExt;

const M: u64 = 1 << 20;
const SECTOR: u64 = 512;

/// Python prelude: `h` connected to argv[1] with base:allocation, and
/// helpers. Scripts end by printing OK.
const PRELUDE: &str = r#"
import nbd, sys, random, time
M = 1 << 20
def connect(uri):
    c = nbd.NBD()
    c.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    c.connect_uri(uri)
    return c
def fails(code, f, *args):
    try:
        f(*args)
    except nbd.Error as e:
        assert e.errno == code, ("expected", code, "got", e.errno, e.string)
        return
    raise AssertionError("no error; expected " + code)
def extents(c, count, offset, flags=0):
    got = []
    def cb(ctx, off, entries, err):
        got.extend(entries)
        return 0
    c.block_status(count, offset, cb, flags)
    return [(got[i], got[i + 1]) for i in range(0, len(got), 2)]
def disk(path):
    with open(path, "rb") as f:
        return f.read()
h = connect(sys.argv[1])
"#;

/// Run `script` (after [`PRELUDE`]) with `args`; it must print OK.
fn py(what: &str, script: &str, args: &[&str]) {
    let o = python(&format!("{PRELUDE}{script}\nprint(\"OK\")\n"), args);
    let out = assert_ok(what, &o);
    assert!(out.contains("OK"), "{what}: {out}");
}

/// A snippet of one filter layer (`filter` holds its lines) over a 1 MiB
/// memory disk.
fn over_memory(filter: &str) -> String {
    format!("[[layer]]\n{filter}\n[[layer]]\nplugin = \"memory\"\nsize = \"1M\"\n")
}

// ------------------------------------------------------------ partitions

/// CRC-32 as GPT uses it.
fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

/// Set MBR entry `i` (0-based) of sector 0.
fn mbr_entry(sector0: &mut [u8], i: usize, kind: u8, first: u32, count: u32) {
    let e = &mut sector0[446 + 16 * i..446 + 16 * (i + 1)];
    e[4] = kind;
    e[8..12].copy_from_slice(&first.to_le_bytes());
    e[12..16].copy_from_slice(&count.to_le_bytes());
    sector0[510..512].copy_from_slice(&[0x55, 0xAA]);
}

/// An MBR disk of 8 MiB of random bytes: partition 1 is 2 MiB at 1 MiB,
/// 2 is 1 MiB + 1 sector at 3 MiB, 3 is empty, 4 is an extended partition
/// of 1 MiB at 6 MiB holding logical partitions 5 (256 KiB at LBA 12352)
/// and 6 (480 KiB at LBA 13376).
fn mbr_image() -> Vec<u8> {
    let mut img = random_bytes(8 * M as usize, 11);
    let table = |img: &mut Vec<u8>, lba: usize, entries: &[(u8, u32, u32)]| {
        let sector = &mut img[lba * 512..(lba + 1) * 512];
        sector[446..].fill(0);
        for (i, &(kind, first, count)) in entries.iter().enumerate() {
            mbr_entry(sector, i, kind, first, count);
        }
    };
    table(&mut img, 0, &[(0x83, 2048, 4096), (0x07, 6144, 2049), (0, 0, 0), (0x05, 12288, 2048)]);
    // Extended boot records: the logical partition relative to the record,
    // then the link to the next record relative to the extended partition.
    table(&mut img, 12288, &[(0x83, 64, 512), (0x05, 1024, 1024)]);
    table(&mut img, 13312, &[(0x83, 64, 960)]);
    img
}

/// A 1 MiB MBR disk with one primary partition and no extended partition.
fn plain_mbr_image() -> Vec<u8> {
    let mut img = vec![0u8; M as usize];
    mbr_entry(&mut img[..512], 0, 0x83, 64, 1024);
    img
}

/// Linux filesystem data partition type GUID, as stored on disk.
const LINUX_FS: [u8; 16] =
    [0xAF, 0x3D, 0xC6, 0x0F, 0x83, 0x84, 0x72, 0x47, 0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47, 0x7D, 0xE4];

/// Write a GPT (protective MBR, primary and backup headers and 128-entry
/// arrays) into `f`, a disk of `sectors` sectors; `parts` are (entry number,
/// first LBA, last LBA).
fn write_gpt(f: &std::fs::File, sectors: u64, parts: &[(usize, u64, u64)]) {
    let last = sectors - 1;
    let mut entries = vec![0u8; 128 * 128];
    for &(n, first, end) in parts {
        let e = &mut entries[(n - 1) * 128..n * 128];
        e[..16].copy_from_slice(&LINUX_FS);
        e[16..32].copy_from_slice(&[n as u8; 16]);
        e[32..40].copy_from_slice(&first.to_le_bytes());
        e[40..48].copy_from_slice(&end.to_le_bytes());
        for (i, c) in format!("part{n}").encode_utf16().enumerate() {
            e[56 + 2 * i..58 + 2 * i].copy_from_slice(&c.to_le_bytes());
        }
    }
    let header = |mine: u64, other: u64, entries_lba: u64| {
        let mut h = vec![0u8; 512];
        h[..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&mine.to_le_bytes());
        h[32..40].copy_from_slice(&other.to_le_bytes());
        h[40..48].copy_from_slice(&34u64.to_le_bytes());
        h[48..56].copy_from_slice(&(last - 33).to_le_bytes());
        h[56..72].copy_from_slice(&[0x42; 16]);
        h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        h[80..84].copy_from_slice(&128u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        h[88..92].copy_from_slice(&crc32(&entries).to_le_bytes());
        let crc = crc32(&h[..92]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    };
    let mut mbr = vec![0u8; 512];
    mbr_entry(&mut mbr, 0, 0xEE, 1, (sectors - 1).min(u32::MAX.into()) as u32);
    f.write_all_at(&mbr, 0).unwrap();
    f.write_all_at(&header(1, last, 2), SECTOR).unwrap();
    f.write_all_at(&entries, 2 * SECTOR).unwrap();
    f.write_all_at(&entries, (last - 32) * SECTOR).unwrap();
    f.write_all_at(&header(last, 1, last - 32), last * SECTOR).unwrap();
}

/// A sparse 8 MiB GPT disk: partition 1 is 1 MiB at 1 MiB, full of random
/// data; 2 is unused; 3 is 3 MiB at 2 MiB with 64 KiB of data 1 MiB in.
fn gpt_image(path: &std::path::Path) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(8 * M).unwrap();
    write_gpt(&f, 8 * M / SECTOR, &[(1, 2048, 4095), (3, 4096, 10239)]);
    f.write_all_at(&random_bytes(M as usize, 12), M).unwrap();
    f.write_all_at(&random_bytes(65536, 13), 3 * M).unwrap();
}

/// A copy of the disk at `from` with the bytes at `at` flipped.
fn damaged_copy(from: &std::path::Path, to: &std::path::Path, at: &[u64]) {
    std::fs::copy(from, to).unwrap();
    let f = std::fs::OpenOptions::new().read(true).write(true).open(to).unwrap();
    for &at in at {
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0xFF], at).unwrap();
    }
}

// Bytes of [`gpt_image`] to damage: in the primary header (its disk GUID),
// in partition 1's name in the primary entry array, and the same two in the
// backup GPT at the end of the disk.
const PRIMARY_HEADER: u64 = SECTOR + 60;
const PRIMARY_ENTRIES: u64 = 2 * SECTOR + 60;
const BACKUP_HEADER: u64 = 8 * M - SECTOR + 60;
const BACKUP_ENTRIES: u64 = 8 * M - 33 * SECTOR + 60;

fn partition_snippet(image: &str, n: i64) -> String {
    format!("[[layer]]\nfilter = \"partition\"\npartition = {n}\n[[layer]]\nplugin = \"file\"\npath = \"{image}\"\n")
}

#[test]
fn crc32_matches_the_standard_check_value() {
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
}

#[test]
fn partition_serves_mbr_and_gpt_partitions_in_place() {
    if !require_python_nbd() {
        return;
    }
    let ex = Exports::new();
    std::fs::write(ex.path("mbr.img"), mbr_image()).unwrap();
    gpt_image(&ex.path("gpt.img"));
    damaged_copy(&ex.path("gpt.img"), &ex.path("backup.img"), &[PRIMARY_HEADER]);
    // (export, image, partition, where it starts, its size)
    let served = [
        ("mbr1", "mbr.img", 1, M, 2 * M),
        ("mbr2", "mbr.img", 2, 3 * M, M + 512),
        ("mbr5", "mbr.img", 5, 12352 * SECTOR, 256 << 10),
        ("mbr6", "mbr.img", 6, 13376 * SECTOR, 480 << 10),
        ("gpt1", "gpt.img", 1, M, M),
        ("backup1", "backup.img", 1, M, M),
    ];
    for (name, image, n, _, _) in served {
        ex.snippet(name, &partition_snippet(image, n));
    }
    ex.snippet("gpt3", &partition_snippet("gpt.img", 3));
    let srv = Server::start(&ex, &[]);
    // Reads see the partition's bytes; writes, zeroes land inside it and
    // nowhere else; the partition's end is the export's end.
    let script = r#"
img, start, size = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
orig = disk(img)
assert h.get_size() == size, h.get_size()
assert h.pread(size, 0) == orig[start:start + size]
h.pwrite(b"\xa5" * 512, size - 512)
h.pwrite(b"\x5a" * 100, 7)
h.zero(4096, 8192)
h.flush()
want = bytearray(orig)
want[start + size - 512:start + size] = b"\xa5" * 512
want[start + 7:start + 107] = b"\x5a" * 100
want[start + 8192:start + 12288] = bytes(4096)
assert disk(img) == want, "the disk changed outside the partition or in the wrong place"
h.set_strict_mode(0)
fails("EINVAL", h.pread, 512, size)
fails("ENOSPC", h.pwrite, b"x" * 1024, size - 512)
"#;
    for (name, image, _, start, size) in served {
        let img = ex.path(image);
        py(name, script, &[&srv.uri(name), img.to_str().unwrap(), &start.to_string(), &size.to_string()]);
    }
    // The primary GPT of backup.img is damaged: the backup one was used.
    let log = srv.log();
    assert!(
        log.contains("the primary GPT of the disk below is damaged (header CRC32 is")
            && log.contains("using the backup GPT at LBA 16383"),
        "{log}"
    );
    // Block status is shifted too: partition 3 holds data 1 MiB in.
    py(
        "gpt3",
        r#"
assert h.get_size() == 3 * M
assert extents(h, 3 * M, 0) == [(M, 3), (65536, 0), (2 * M - 65536, 3)], extents(h, 3 * M, 0)
assert extents(h, 4096, M + 4096, nbd.CMD_FLAG_REQ_ONE) == [(4096, 0)]
assert h.pread(65536, M) == disk(sys.argv[2])[3 * M:3 * M + 65536]
"#,
        &[&srv.uri("gpt3"), ex.path("gpt.img").to_str().unwrap()],
    );
}

#[test]
fn partition_refuses_missing_empty_and_damaged_partitions() {
    if !require_tool("nbdinfo") {
        return;
    }
    let ex = Exports::new();
    std::fs::write(ex.path("mbr.img"), mbr_image()).unwrap();
    std::fs::write(ex.path("plain.img"), plain_mbr_image()).unwrap();
    std::fs::write(ex.path("blank.img"), vec![0u8; M as usize]).unwrap();
    gpt_image(&ex.path("gpt.img"));
    damaged_copy(&ex.path("gpt.img"), &ex.path("bad-headers.img"), &[PRIMARY_HEADER, BACKUP_HEADER]);
    damaged_copy(&ex.path("gpt.img"), &ex.path("bad-entries.img"), &[PRIMARY_ENTRIES, BACKUP_ENTRIES]);
    let cases = [
        ("mbr3", "mbr.img", 3, "MBR partition 3 is empty"),
        ("mbr4", "mbr.img", 4, "MBR partition 4 is an extended partition (type 0x05): it holds the logical"),
        ("mbr7", "mbr.img", 7, "there is no MBR partition 7: the last logical partition is 6"),
        ("plain5", "plain.img", 5, "there is no MBR partition 5: the disk has no extended partition"),
        ("gpt2", "gpt.img", 2, "GPT partition 2 is unused"),
        ("gpt129", "gpt.img", 129, "the GPT has 128 partition entries: there is no partition 129"),
        ("badheaders", "bad-headers.img", 1, "the GPT of the disk below is damaged: header CRC32 is"),
        ("badentries", "bad-entries.img", 1, "the GPT of the disk below is damaged: partition entry array CRC32"),
        ("blank", "blank.img", 1, "the disk below has no partition table"),
    ];
    for (name, image, n, _) in cases {
        ex.snippet(name, &partition_snippet(image, n));
    }
    let srv = Server::start(&ex, &[]);
    for (name, _, _, why) in cases {
        let o = run("nbdinfo", &[&srv.uri(name)]);
        assert!(!o.status.success(), "{name}: nbdinfo succeeded:\n{}", String::from_utf8_lossy(&o.stdout));
        let line = format!("cannot open export `{name}`: {why}");
        assert!(srv.wait_for_log(&line), "{name}: no `{line}` in the log:\n{}", srv.log());
    }
    for what in ["header CRC32", "partition entry array CRC32"] {
        let line = format!("the backup GPT at LBA 16383 is unusable too: {what} is");
        assert!(srv.log().contains(&line), "no `{line}` in the log:\n{}", srv.log());
    }
}

// ------------------------------------------------------------ truncate

#[test]
fn truncate_grows_with_a_zero_tail_shrinks_and_rounds() {
    if !require_python_nbd() {
        return;
    }
    let ex = Exports::new();
    let layer = |rule: &str, below: &str| {
        format!("[[layer]]\nfilter = \"truncate\"\n{rule}\n[[layer]]\nplugin = \"memory\"\nsize = \"{below}\"\n")
    };
    ex.snippet("grow", &layer("size = \"2M\"", "1000000"));
    ex.snippet("shrink", &layer("size = \"1M\"", "4M"));
    ex.snippet("up", &layer("round-up = \"4K\"", "10000"));
    ex.snippet("down", &layer("round-down = \"4K\"", "10000"));
    let srv = Server::start(&ex, &[]);
    py(
        "grow",
        r#"
B, S = 1000000, 2 * M
assert h.get_size() == S
pat = bytes(range(256)) * 16
# Data that would spill past the layer below: refused whole, nothing written.
fails("ENOSPC", h.pwrite, pat, B - 2048)
assert h.pread(4096, B - 2048) == bytes(4096)
fails("ENOSPC", h.pwrite, b"\x01" + bytes(511), S - 512)
# Data below, zeros past it: fine.
h.pwrite(pat[:2048] + bytes(2048), B - 2048)
h.pwrite(bytes(4096), S - 4096)
h.zero(S - B + 1000, B - 1000)
h.trim(S - B, B)
h.flush()
assert h.pread(4096, B - 2048) == pat[:1048] + bytes(3048)
assert h.pread(S - B, B) == bytes(S - B)
h.pwrite(pat[:48], B - 48)
# Block status: the tail past the layer below is a hole that reads as zeros.
e = extents(h, S, 0)
assert e[-1] == (S - B, 3) and e[-2][1] == 0 and sum(l for (l, _) in e) == S, e
assert extents(h, 4096, B, nbd.CMD_FLAG_REQ_ONE) == [(4096, 3)]
assert extents(h, 1000, B - 1000, nbd.CMD_FLAG_REQ_ONE)[0][1] == 0
"#,
        &[&srv.uri("grow")],
    );
    py(
        "shrink",
        r#"
assert h.get_size() == M
h.pwrite(b"\x77" * 512, M - 512)
assert h.pread(512, M - 512) == b"\x77" * 512
h.set_strict_mode(0)
fails("EINVAL", h.pread, 512, M)
fails("ENOSPC", h.pwrite, b"\x77" * 512, M - 256)
fails("ENOSPC", h.zero, 4096, M)
"#,
        &[&srv.uri("shrink")],
    );
    py(
        "up",
        r#"
assert h.get_size() == 12288
h.pwrite(b"\x01" * 10000, 0)
assert h.pread(12288, 0) == b"\x01" * 10000 + bytes(2288)
fails("ENOSPC", h.pwrite, b"\x01" * 2, 9999)
"#,
        &[&srv.uri("up")],
    );
    py("down", "assert h.get_size() == 8192\n", &[&srv.uri("down")]);
}

// ------------------------------------------------------------ protect

#[test]
fn protect_refuses_changes_to_protected_ranges_with_eperm() {
    if !require_python_nbd() {
        return;
    }
    let ex = Exports::new();
    std::fs::write(ex.path("disk.img"), random_bytes(8 * M as usize, 21)).unwrap();
    ex.snippet(
        "prot",
        "[[layer]]\nfilter = \"protect\"\nranges = \"0-1M,4M-5M\"\n[[layer]]\nplugin = \"file\"\npath = \"disk.img\"\n",
    );
    ex.snippet(
        "tail",
        "[[layer]]\nfilter = \"protect\"\nranges = \"1M-\"\n[[layer]]\nplugin = \"memory\"\nsize = \"4M\"\n",
    );
    let srv = Server::start(&ex, &[]);
    py(
        "prot",
        r#"
img = sys.argv[2]
orig = disk(img)
for (what, f, args) in [
    ("write at 0", h.pwrite, (b"\x22" * 512, 0)),
    ("write across 1M", h.pwrite, (b"\x22" * 8192, M - 4096)),
    ("write of the last protected byte", h.pwrite, (b"\x22", 5 * M - 1)),
    ("write of a byte that differs", h.pwrite, (orig[4 * M:4 * M + 4095] + bytes([orig[4 * M + 4095] ^ 1]), 4 * M)),
    ("zero into 4M", h.zero, (2 * M, 3 * M)),
    ("zero inside", h.zero, (4096, 4 * M + 100)),
    ("trim across 1M", h.trim, (8192, M - 4096)),
    ("trim inside", h.trim, (4096, 4 * M)),
]:
    try:
        fails("EPERM", f, *args)
    except AssertionError as e:
        raise AssertionError(what, e)
# Outside the ranges everything passes through; rewriting the bytes that
# are already there is no change, so it is allowed.
h.pwrite(b"\x11" * 4096, 2 * M)
h.pwrite(b"\x33", M)
h.pwrite(b"\x33", 5 * M)
h.zero(4096, 3 * M)
h.pwrite(orig[M - 4096:M] + b"\x44" * 4096, M - 4096)
h.pwrite(orig[4 * M:5 * M], 4 * M)
h.flush()
want = bytearray(orig)
want[2 * M:2 * M + 4096] = b"\x11" * 4096
want[M:M + 4096] = b"\x44" * 4096
want[5 * M] = 0x33
want[3 * M:3 * M + 4096] = bytes(4096)
assert disk(img) == want
assert h.pread(4096, 0) == orig[:4096]
"#,
        &[&srv.uri("prot"), ex.path("disk.img").to_str().unwrap()],
    );
    // An open-ended range; zeroing bytes that are already zero is allowed.
    py(
        "tail",
        r#"
h.pwrite(b"\x01" * 4096, M - 4096)
h.zero(2 * M, M)
h.pwrite(bytes(4096), 3 * M)
fails("EPERM", h.pwrite, b"\x01" * 4096, M - 2048)
fails("EPERM", h.pwrite, b"\x01", 4 * M - 1)
fails("EPERM", h.trim, 4096, 2 * M)
assert h.pread(8192, M - 4096) == b"\x01" * 4096 + bytes(4096)
"#,
        &[&srv.uri("tail")],
    );
}

// ------------------------------------------------------------ blocksize

/// Requests the trace log shows reaching `layer`: (operation, offset, length).
fn requests_to(log: &str, layer: &str) -> Vec<(String, u64, u64)> {
    let tag = format!(" {layer}: ");
    log.lines()
        .filter_map(|l| {
            let rest = &l[l.find(&tag)? + tag.len()..];
            let mut words = rest.split_whitespace();
            let op = words.next()?.to_string();
            let (o, n) = words.next()?.split_once('+')?;
            Some((op, o.parse().ok()?, n.parse().ok()?))
        })
        .collect()
}

#[test]
fn blocksize_serves_any_alignment_and_sends_only_aligned_pieces_below() {
    if !require_python_nbd() || !require_tool("nbdinfo") {
        return;
    }
    const SIZE: u64 = M + 100;
    let ex = Exports::new();
    ex.snippet(
        "bs",
        &format!(
            "[[layer]]\nfilter = \"blocksize\"\nminblock = \"4K\"\nmaxdata = \"64K\"\nmaxlen = \"128K\"\n\
             [[layer]]\nplugin = \"memory\"\nsize = \"{SIZE}\"\n"
        ),
    );
    let mut srv = Server::start(&ex, &["--log-level", "trace"]);
    let info = run_ok("nbdinfo", &["--json", &srv.uri("bs")]);
    let v: serde_json::Value = serde_json::from_str(&info).expect("nbdinfo --json");
    assert_eq!(v["exports"][0]["block_size_minimum"], 1, "{info}");
    assert_eq!(v["exports"][0]["block_size_preferred"], 4096, "{info}");
    py(
        "bs",
        r#"
random.seed(7)
S = h.get_size()
assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
model = bytearray(S)
for i in range(300):
    off = random.randrange(S)
    n = random.randrange(1, min(S - off, 200000) + 1)
    if random.random() < 0.7:
        data = random.randbytes(n)
        h.pwrite(data, off)
        model[off:off + n] = data
    else:
        h.zero(n, off)
        model[off:off + n] = bytes(n)
    if i % 50 == 0:
        assert h.pread(S, 0) == model, i
for i in range(200):
    off = random.randrange(S)
    n = random.randrange(1, min(S - off, 100000) + 1)
    assert h.pread(n, off) == model[off:off + n], (off, n)
# The short last block, and its last byte.
h.pwrite(b"tail!", S - 5)
model[S - 5:] = b"tail!"
h.zero(1, S - 3)
model[S - 3] = 0
assert h.pread(7, S - 7) == model[S - 7:]
# A trim drops its unaligned ends: the bytes around it are kept.
h.trim(3 * 4096, 4096 + 100)
assert h.pread(4096 - 100, 4096 + 100) == model[4096 + 100:2 * 4096]
assert h.pread(100, 4 * 4096) == model[4 * 4096:4 * 4096 + 100]
h.flush()
# Block status of an unaligned range (asked below from the block boundary).
e = extents(h, 5000, 4096 + 100)
assert sum(l for (l, _) in e) >= 5000 and all(l > 0 for (l, _) in e), e
h.cache(10000, 123)
"#,
        &[&srv.uri("bs")],
    );
    srv.terminate();
    assert!(srv.wait_for_log("bye"), "{}", srv.log());
    let below = requests_to(&srv.log(), "bs/memory");
    for op in ["pread", "pwrite", "zero", "trim"] {
        assert!(below.iter().any(|(o, _, _)| o == op), "no {op} reached the memory layer");
    }
    for (op, off, len) in &below {
        let max = if op == "pread" || op == "pwrite" { 65536 } else { 131072 };
        assert!(
            off % 4096 == 0 && (len % 4096 == 0 || off + len == SIZE) && *len <= max,
            "{op} {off}+{len} reached the memory layer"
        );
    }
    // Split pieces of the full size, and partial blocks read for RMW.
    assert!(below.iter().any(|(op, _, len)| op == "pwrite" && *len == 65536));
    assert!(below.iter().any(|(op, _, len)| op == "zero" && *len == 131072));
    assert!(below.iter().any(|(op, off, len)| op == "pread" && *len == 100 && *off == SIZE - 100));
}

#[test]
fn blocksize_concurrent_writes_within_one_block_lose_nothing() {
    if !require_python_nbd() {
        return;
    }
    let ex = Exports::new();
    ex.snippet(
        "bs",
        "[[layer]]\nfilter = \"blocksize\"\nminblock = \"4K\"\n[[layer]]\nplugin = \"memory\"\nsize = \"1M\"\n",
    );
    let srv = Server::start(&ex, &[]);
    // 2048 writes of 8 bytes over 16 KiB from an unaligned base, shuffled
    // over two connections, all in flight together: nearly every one is a
    // read-modify-write of a block another write is modifying too.
    py(
        "bs",
        r#"
random.seed(3)
h2 = connect(sys.argv[1])
base = 5 * 4096 + 1000
data = random.randbytes(4 * 4096)
offs = list(range(0, len(data), 8))
random.shuffle(offs)
cmds = []
for i, o in enumerate(offs):
    c = (h, h2)[i % 2]
    cmds.append((c, c.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data[o:o + 8])), base + o)))
while h.aio_in_flight() or h2.aio_in_flight():
    for c in (h, h2):
        if c.aio_in_flight():
            c.poll(1)
for (c, cookie) in cmds:
    assert c.aio_command_completed(cookie)
assert h.pread(len(data), base) == data
assert h.pread(1000, base - 1000) == bytes(1000) and h.pread(100, base + len(data)) == bytes(100)
"#,
        &[&srv.uri("bs")],
    );
}

// ------------------------------------------------------------ delay

#[test]
fn delay_holds_each_kind_of_request_at_least_its_delay() {
    if !require_python_nbd() {
        return;
    }
    let ex = Exports::new();
    ex.snippet(
        "slow",
        &over_memory(
            "filter = \"delay\"\nrdelay = \"300ms\"\nwdelay = \"0.3s\"\nzdelay = \"300\"\ntrimdelay = 300\n\
             flushdelay = \"0.3s\"",
        ),
    );
    let srv = Server::start(&ex, &[]);
    // Only lower bounds: a sleep guarantees them, an upper bound would be a
    // timing test.
    py(
        "slow",
        r#"
for (what, f, args) in [
    ("write", h.pwrite, (b"\x42" * 8192, 0)),
    ("read", h.pread, (4096, 0)),
    ("zero", h.zero, (4096, 4096)),
    ("trim", h.trim, (4096, 65536)),
    ("flush", h.flush, ()),
]:
    t = time.monotonic()
    f(*args)
    took = time.monotonic() - t
    assert took >= 0.3, (what, took)
assert h.pread(8192, 0) == b"\x42" * 4096 + bytes(4096)
"#,
        &[&srv.uri("slow")],
    );
}

// ------------------------------------------------------------ parameters

#[test]
fn bad_filter_parameters_are_refused_at_start_naming_the_key() {
    let cases = [
        ("filter = \"partition\"\npartition = 0", "parameter `partition`: 0 is not a partition number"),
        ("filter = \"partition\"\npartition = \"first\"", "parameter `partition`: `first` is not an integer"),
        ("filter = \"partition\"", "missing required parameter `partition`"),
        ("filter = \"truncate\"", "set one of the parameters `size`, `round-up` or `round-down`"),
        (
            "filter = \"truncate\"\nsize = \"1M\"\nround-up = \"4K\"",
            "`size`, `round-up` and `round-down` exclude each other",
        ),
        ("filter = \"truncate\"\nround-down = 0", "parameter `round-down` must be at least 1 byte"),
        ("filter = \"truncate\"\nsize = \"lots\"", "parameter `size`: `lots` is not a size"),
        ("filter = \"protect\"\nranges = \"5M-4M\"", "parameter `ranges`: range `5M-4M` is empty"),
        ("filter = \"protect\"\nranges = \"all of it\"", "parameter `ranges`: `all of it` is not a range START-END"),
        ("filter = \"protect\"", "missing required parameter `ranges`"),
        ("filter = \"blocksize\"\nminblock = 3000", "parameter `minblock`: 3000 is not a power of two"),
        (
            "filter = \"blocksize\"\nminblock = \"128K\"",
            "parameter `minblock`: 131072 is not a power of two between 1 and 65536",
        ),
        (
            "filter = \"blocksize\"\nmaxdata = 1000",
            "parameter `maxdata`: 1000 is not a non-zero multiple of minblock (512)",
        ),
        ("filter = \"blocksize\"\nmaxlen = 0", "parameter `maxlen`: 0 is not a non-zero multiple of minblock"),
        ("filter = \"delay\"\nrdelay = \"soon\"", "parameter `rdelay`: `soon` is not a delay"),
        ("filter = \"delay\"\nwdelay = \"-5ms\"", "parameter `wdelay`: `-5ms` is not a delay"),
    ];
    for (layer, want) in cases {
        let ex = Exports::new();
        ex.snippet("x", &over_memory(layer));
        let o = run(nbdhost_bin().to_str().unwrap(), &["--check", "--exports-dir", &ex.dir_str()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{layer:?} was accepted");
        assert!(err.contains("x.toml") && err.contains(want), "{layer:?}: expected `{want}` in:\n{err}");
    }
}
