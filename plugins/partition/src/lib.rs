//! `partition` filter: serve partition `N` of a partitioned disk below as a
//! whole disk.
//!
//! The partition table is read when a connection opens the export, with
//! 512-byte sectors:
//!
//! * **GPT** (recognised first, by the `EFI PART` signature of the primary
//!   header at LBA 1): the header and the partition entry array must have
//!   valid CRC32s. If the primary GPT is damaged, the backup GPT in the last
//!   sector is used instead (with a warning in the log), as the kernel and
//!   fdisk do. `N` counts entries of the array from 1; an entry with an
//!   all-zero type GUID is unused.
//! * **MBR** (boot signature `55 AA` in sector 0): primary partitions 1 to 4,
//!   and logical partitions from 5 on, numbered along the chain of extended
//!   boot records the way Linux numbers them. The extended partition itself
//!   is refused, as is a protective MBR whose GPT is missing.
//!
//! A missing, unused or out-of-disk partition, or a disk without a
//! partition table, fails `open`: the client is told the export is not
//! available, and the log says why. Requests are shifted into the
//! partition the way the `offset` filter does.

use nbdhost_plugin_api::{
    export_filter, host, param, Error, ExtentList, Filter, FilterConnection, FilterLendRead, Flags, Next, OpenContext,
    ParamKind, Params, Result,
};

/// Sector size the tables are read with.
const SECTOR: u64 = 512;

/// Largest GPT partition entry array accepted (the usual one is 16 KiB).
const MAX_GPT_ENTRIES_BYTES: u64 = 4 << 20;

/// Per-export settings.
pub struct Partition {
    number: u32,
}

/// Per-connection handle.
pub struct PartitionHandle {
    next: Next,
    start: u64,
    size: u64,
}

impl Filter for Partition {
    type Handle = PartitionHandle;
    const NAME: &'static std::ffi::CStr = c"partition";
    const VERSION: &'static std::ffi::CStr = c"0.1.0";
    const DESCRIPTION: &'static std::ffi::CStr = c"serve one partition of an MBR or GPT disk";
    const PARAMS: &'static [nbdhost_plugin_api::abi::ParamSpec] = &[param(
        c"partition",
        ParamKind::Int,
        true,
        None,
        c"partition number, from 1 (MBR: primary partitions 1-4; GPT: entry number)",
    )];

    fn create(p: &Params) -> Result<Self> {
        let n = p.int("partition")?.ok_or_else(|| Error::invalid("parameter `partition` is required"))?;
        let number = u32::try_from(n).ok().filter(|&n| n >= 1).ok_or_else(|| {
            Error::invalid(format!("parameter `partition`: {n} is not a partition number (they count from 1)"))
        })?;
        Ok(Partition { number })
    }

    fn open(&self, _ctx: &OpenContext, mut children: Vec<Next>) -> Result<PartitionHandle> {
        let next = children.remove(0);
        let disk = next.get_size()?;
        let found = locate(&next, disk, self.number)?;
        host::debug(&format!(
            "{} partition {}: bytes {}..{} of {disk}",
            found.scheme,
            self.number,
            found.start,
            found.start + found.size
        ));
        Ok(PartitionHandle { next, start: found.start, size: found.size })
    }
}

/// Where a partition lies in the disk below.
#[derive(Debug)]
struct Found {
    scheme: &'static str,
    start: u64,
    size: u64,
}

/// Read the partition table of the layer below and find partition `n`.
fn locate(next: &Next, disk: u64, n: u32) -> Result<Found> {
    if disk < SECTOR {
        return Err(Error::invalid(format!("the disk below ({disk} bytes) is too small to hold a partition table")));
    }
    let mut head = vec![0u8; disk.min(2 * SECTOR) as usize];
    next.pread(&mut head, 0, Flags::default())?;
    if head.len() == 2 * SECTOR as usize && &head[512..520] == b"EFI PART" {
        return gpt(next, disk, &head[512..], n);
    }
    if head[510..512] == [0x55, 0xAA] {
        return mbr(next, disk, &head[..512], n);
    }
    Err(Error::invalid(
        "the disk below has no partition table (no GPT header at sector 1, no MBR boot signature in sector 0)",
    ))
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Read sector `lba` of the layer below.
fn read_sector(next: &Next, disk: u64, lba: u64) -> Result<Vec<u8>> {
    match lba.checked_mul(SECTOR).filter(|o| o.checked_add(SECTOR).is_some_and(|end| end <= disk)) {
        Some(offset) => {
            let mut s = vec![0u8; SECTOR as usize];
            next.pread(&mut s, offset, Flags::default())?;
            Ok(s)
        }
        None => Err(Error::invalid(format!("the partition table points at sector {lba}, past the end of the disk"))),
    }
}

/// Check that sectors `[first, first + count)` hold a partition inside the disk.
fn within(scheme: &'static str, n: u32, first: u64, count: u64, disk: u64) -> Result<Found> {
    let place = first.checked_mul(SECTOR).zip(count.checked_mul(SECTOR));
    match place {
        Some((start, size)) if start.checked_add(size).is_some_and(|end| end <= disk) => {
            Ok(Found { scheme, start, size })
        }
        _ => Err(Error::invalid(format!(
            "{scheme} partition {n} (sectors {first}+{count}) does not fit in the disk below ({disk} bytes)"
        ))),
    }
}

// ------------------------------------------------------------------ MBR

/// Most logical partitions followed in a chain of extended boot records.
const MAX_LOGICAL: u32 = 1024;

/// One entry of an MBR or EBR partition table.
struct MbrEntry {
    kind: u8,
    first: u64,
    count: u64,
}

impl MbrEntry {
    fn read(sector: &[u8], i: usize) -> MbrEntry {
        let e = &sector[446 + 16 * i..446 + 16 * (i + 1)];
        MbrEntry { kind: e[4], first: le32(e, 8).into(), count: le32(e, 12).into() }
    }
    fn is_empty(&self) -> bool {
        self.kind == 0 || self.count == 0
    }
    fn is_extended(&self) -> bool {
        matches!(self.kind, 0x05 | 0x0F | 0x85) && self.count > 0
    }
}

fn mbr(next: &Next, disk: u64, sector0: &[u8], n: u32) -> Result<Found> {
    let primary: Vec<MbrEntry> = (0..4).map(|i| MbrEntry::read(sector0, i)).collect();
    if primary.iter().any(|e| e.kind == 0xEE) {
        return Err(Error::invalid(
            "the disk below has a protective MBR but no GPT header at sector 1 (the GPT is missing or damaged)",
        ));
    }
    if n <= 4 {
        let e = &primary[n as usize - 1];
        if e.is_empty() {
            return Err(Error::invalid(format!("MBR partition {n} is empty")));
        }
        if e.is_extended() {
            return Err(Error::invalid(format!(
                "MBR partition {n} is an extended partition (type {:#04x}): it holds the logical partitions, \
                 numbered from 5",
                e.kind
            )));
        }
        return within("MBR", n, e.first, e.count, disk);
    }
    if n > 4 + MAX_LOGICAL {
        return Err(Error::invalid(format!(
            "MBR partition {n}: at most {MAX_LOGICAL} logical partitions (5 to {}) are supported",
            4 + MAX_LOGICAL
        )));
    }
    let Some(ext) = primary.iter().find(|e| e.is_extended()) else {
        return Err(Error::invalid(format!(
            "there is no MBR partition {n}: the disk has no extended partition, so no logical partitions"
        )));
    };
    // Logical partitions form a chain of extended boot records, each with
    // the partition (relative to the record) and a link to the next record
    // (relative to the extended partition).
    let damaged = |why: String| Error::invalid(format!("the chain of logical partitions is damaged: {why}"));
    let (mut ebr, mut number) = (ext.first, 5);
    loop {
        if ebr >= ext.first + ext.count {
            return Err(damaged(format!("an EBR at LBA {ebr} lies outside the extended partition")));
        }
        let s = read_sector(next, disk, ebr)?;
        if s[510..512] != [0x55, 0xAA] {
            return Err(damaged(format!("the EBR at LBA {ebr} has no boot signature")));
        }
        let (logical, link) = (MbrEntry::read(&s, 0), MbrEntry::read(&s, 1));
        if number == n {
            if logical.is_empty() {
                return Err(Error::invalid(format!("MBR partition {n} is empty")));
            }
            return within("MBR", n, ebr + logical.first, logical.count, disk);
        }
        if !link.is_extended() {
            return Err(Error::invalid(format!(
                "there is no MBR partition {n}: the last logical partition is {number}"
            )));
        }
        let following = ext.first + link.first;
        if following <= ebr {
            return Err(damaged(format!("the EBR at LBA {ebr} links back to LBA {following}")));
        }
        (ebr, number) = (following, number + 1);
    }
}

// ------------------------------------------------------------------ GPT

/// A GPT partition entry array.
struct GptTable {
    entries: Vec<u8>,
    entry_size: usize,
    count: u32,
}

fn gpt(next: &Next, disk: u64, primary: &[u8], n: u32) -> Result<Found> {
    let table = match gpt_table(next, disk, primary)? {
        Ok(t) => t,
        Err(why) => {
            // Like the kernel and fdisk, fall back to the backup GPT in the
            // last sector.
            let last = disk / SECTOR - 1;
            let backup = read_sector(next, disk, last)?;
            let backup = if &backup[..8] == b"EFI PART" {
                gpt_table(next, disk, &backup)?
            } else {
                Err("no GPT signature".to_string())
            };
            match backup {
                Ok(t) => {
                    host::warn(&format!(
                        "the primary GPT of the disk below is damaged ({why}): using the backup GPT at LBA {last}"
                    ));
                    t
                }
                Err(also) => {
                    return Err(Error::invalid(format!(
                        "the GPT of the disk below is damaged: {why}; the backup GPT at LBA {last} is unusable \
                         too: {also}"
                    )))
                }
            }
        }
    };
    if n > table.count {
        return Err(Error::invalid(format!(
            "the GPT has {} partition entries: there is no partition {n}",
            table.count
        )));
    }
    let e = &table.entries[(n as usize - 1) * table.entry_size..][..128];
    if e[..16].iter().all(|&b| b == 0) {
        return Err(Error::invalid(format!("GPT partition {n} is unused")));
    }
    let (first, last) = (le64(e, 32), le64(e, 40));
    if last < first {
        return Err(Error::invalid(format!("GPT partition {n} ends (LBA {last}) before it starts (LBA {first})")));
    }
    within("GPT", n, first, last - first + 1, disk)
}

/// Check a GPT header and read the entry array it describes. The inner
/// error says what is damaged; the outer one is a failure of the layer below.
fn gpt_table(next: &Next, disk: u64, header: &[u8]) -> Result<std::result::Result<GptTable, String>> {
    let header_size = le32(header, 12) as usize;
    if !(92..=SECTOR as usize).contains(&header_size) {
        return Ok(Err(format!("header size {header_size} is not between 92 and 512")));
    }
    let mut h = header[..header_size].to_vec();
    h[16..20].fill(0);
    let (stored, computed) = (le32(header, 16), crc32(&h));
    if stored != computed {
        return Ok(Err(format!("header CRC32 is {stored:#010x}, the header's is {computed:#010x}")));
    }
    let (entries_lba, count, entry_size, entries_crc) =
        (le64(header, 72), le32(header, 80), le32(header, 84), le32(header, 88));
    if entry_size < 128 || !entry_size.is_power_of_two() {
        return Ok(Err(format!("partition entry size {entry_size} is not a power of two of at least 128")));
    }
    let bytes = u64::from(count) * u64::from(entry_size);
    let offset = entries_lba.checked_mul(SECTOR).filter(|o| o.checked_add(bytes).is_some_and(|end| end <= disk));
    let Some(offset) = offset.filter(|_| bytes <= MAX_GPT_ENTRIES_BYTES) else {
        return Ok(Err(format!(
            "the partition entry array ({count} x {entry_size} bytes at LBA {entries_lba}) does not fit in the disk"
        )));
    };
    let mut entries = vec![0u8; bytes as usize];
    next.pread(&mut entries, offset, Flags::default())?;
    let computed = crc32(&entries);
    if entries_crc != computed {
        return Ok(Err(format!("partition entry array CRC32 is {entries_crc:#010x}, the array's is {computed:#010x}")));
    }
    Ok(Ok(GptTable { entries, entry_size: entry_size as usize, count }))
}

/// CRC-32 (IEEE 802.3, reflected), as GPT uses.
fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    !data.iter().fold(!0u32, |c, &b| TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8))
}

impl FilterConnection for PartitionHandle {
    fn next(&self) -> &Next {
        &self.next
    }
    fn get_size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        self.next.pread(buf, offset + self.start, flags)
    }
    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.next.pwrite(buf, offset + self.start, flags)
    }
    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.next.trim(count, offset + self.start, flags)
    }
    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.next.zero(count, offset + self.start, flags)
    }
    fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.next.cache(count, offset + self.start, flags)
    }
    fn extents(&self, count: u64, offset: u64, flags: Flags, out: &mut ExtentList<'_>) -> Result<()> {
        for (o, l, f) in self.next.extents_vec(count, offset + self.start, flags)? {
            out.add(o - self.start, l, f)?;
        }
        Ok(())
    }
}

/// Reads of the partition are the disk's, shifted: lend them through.
impl FilterLendRead for PartitionHandle {
    fn pread_lend(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        sink: &mut dyn FnMut(&[&[u8]]) -> Result<()>,
    ) -> Result<()> {
        self.next.pread_lend(count, offset + self.start, flags, sink)
    }
}

export_filter!(Partition);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }
}
