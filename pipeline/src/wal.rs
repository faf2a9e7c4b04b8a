//! The write-ahead log: append-only segment files of framed, checksummed blocks (one block
//! per request's records). The edge acknowledges a request only after the block is fsynced;
//! the stores are fed from the log, so a crash between the two loses nothing.
//!
//! Layout: `DIR/<start position, 20 digits>.wal`. A position is a byte offset in the logical
//! log, growing across segments, so it names a block for good (batch ids are positions).
//! Frame: `MAGIC (4) | payload length (4, LE) | CRC-32 of length and payload (4, LE) | payload`.
//!
//! Recovery: a torn or corrupt tail of the last segment (a crash mid-append) is cut back to
//! the end of the last valid frame before new blocks are appended. A corrupt frame in the
//! middle of the log (a flipped byte) is skipped by scanning to the next valid frame; every
//! skipped byte is counted and logged, and every intact block is still read.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use apex_core::model::{Metric, UsageRecord};

/// Marks the start of every frame, for resynchronisation after corruption.
pub const MAGIC: [u8; 4] = *b"APXW";
/// Bytes before a frame's payload.
pub const FRAME_HEADER: usize = 12;
/// Largest payload a frame may carry (a batch body is at most 8 MiB by default).
pub const MAX_PAYLOAD: usize = 64 * 1024 * 1024;
/// The writer's group buffer is kept between groups up to this capacity (a group of `track`
/// requests is a few hundred KiB at most; a larger one came from big batches and is freed).
const KEPT_BUFFER_BYTES: usize = 8 * 1024 * 1024;

/// A block read back from the log: where it is, and where its payload lies in the bytes the
/// [`Scan`] read (no copy: [`Scan::payload`] borrows it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// Position of the frame.
    pub position: u64,
    /// Position just after it.
    pub next: u64,
    /// Its payload's offsets in the scanned bytes.
    pub payload: std::ops::Range<usize>,
}

fn segment_name(start: u64) -> String {
    format!("{start:020}.wal")
}

/// Start positions of the segments in `dir`, ascending.
pub fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut starts: Vec<u64> = fs::read_dir(dir)?
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".wal")?.parse().ok()
        })
        .collect();
    starts.sort_unstable();
    Ok(starts)
}

/// The records of one request as one whole frame (header and payload), ready for
/// [`WalWriter::append_frames`]. The edge's workers call it (through the durable sink's
/// `submit`), so the log writer, which every request waits for, only copies bytes; and the
/// records are freed on the thread that made them, which for the allocator is the cheap case.
pub fn frame_records(records: &[UsageRecord]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER + 16 + records.len() * 64);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[0; FRAME_HEADER - 4]);
    encode_records_into(&mut out, records);
    let len = u32::try_from(out.len() - FRAME_HEADER).expect("payload under 4 GiB");
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len.to_le_bytes());
    crc.update(&out[FRAME_HEADER..]);
    out[4..8].copy_from_slice(&len.to_le_bytes());
    out[8..12].copy_from_slice(&crc.finalize().to_le_bytes());
    out
}

fn frame_into(out: &mut Vec<u8>, payload: &[u8]) {
    let len = u32::try_from(payload.len()).expect("payload under 4 GiB");
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len.to_le_bytes());
    crc.update(payload);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(payload);
}

/// What parsing found at the start of `bytes`.
enum Parsed {
    /// A valid frame of this total size, payload at `FRAME_HEADER..size`.
    Frame(usize),
    /// Not a valid frame here.
    Corrupt,
    /// Looks like a frame but `bytes` ends before it does.
    Incomplete,
}

fn parse_frame(bytes: &[u8]) -> Parsed {
    if bytes.len() < FRAME_HEADER {
        return if MAGIC.starts_with(&bytes[..bytes.len().min(4)]) {
            Parsed::Incomplete
        } else {
            Parsed::Corrupt
        };
    }
    if bytes[..4] != MAGIC {
        return Parsed::Corrupt;
    }
    let len = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes")) as usize;
    if len > MAX_PAYLOAD {
        return Parsed::Corrupt;
    }
    let size = FRAME_HEADER + len;
    if bytes.len() < size {
        return Parsed::Incomplete;
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&bytes[4..8]);
    crc.update(&bytes[FRAME_HEADER..size]);
    if crc.finalize().to_le_bytes() != bytes[8..12] {
        return Parsed::Corrupt;
    }
    Parsed::Frame(size)
}

/// Blocks found in a region of the log, and what was skipped.
#[derive(Debug, Default)]
pub struct Scan {
    /// The bytes [`read`] read; the blocks' payloads are ranges of them.
    pub bytes: Vec<u8>,
    /// Intact blocks, in order.
    pub blocks: Vec<Block>,
    /// Bytes skipped because they were corrupt.
    pub corrupt_bytes: u64,
    /// Position after the last complete frame (or skipped corruption).
    pub end: u64,
    /// True if the region ends inside a frame.
    pub incomplete_tail: bool,
}

impl Scan {
    /// The payload of `block`, which must be one of this scan's blocks (another scan's block
    /// reads the wrong bytes, or panics if its range is past these bytes' end).
    pub fn payload(&self, block: &Block) -> &[u8] {
        &self.bytes[block.payload.clone()]
    }

    /// Empties the scan, keeping its allocations (bytes and blocks) for the next [`read`].
    fn reset(&mut self, position: u64) {
        self.bytes.clear();
        self.blocks.clear();
        self.corrupt_bytes = 0;
        self.end = position;
        self.incomplete_tail = false;
    }
}

/// Parses `bytes`, which start at `position`; the blocks' payloads are offsets into `bytes`
/// (the returned scan's own `bytes` are empty). With `is_tail`, a final partial or corrupt
/// stretch is a torn tail (not counted as corruption); otherwise it is skipped and counted.
fn scan(bytes: &[u8], position: u64, is_tail: bool) -> Scan {
    let mut out = Scan::default();
    scan_into(bytes, position, is_tail, &mut out);
    out
}

/// [`scan`] into `out`, which must be empty (its `bytes` are left alone).
fn scan_into(bytes: &[u8], position: u64, is_tail: bool, out: &mut Scan) {
    out.end = position;
    let mut at = 0usize;
    while at < bytes.len() {
        match parse_frame(&bytes[at..]) {
            Parsed::Frame(size) => {
                out.blocks.push(Block {
                    position: position + at as u64,
                    next: position + (at + size) as u64,
                    payload: at + FRAME_HEADER..at + size,
                });
                at += size;
                out.end = position + at as u64;
            }
            Parsed::Incomplete => {
                out.incomplete_tail = true;
                break;
            }
            Parsed::Corrupt => {
                // Resynchronise on the next valid frame, if any.
                let next = (at + 1..bytes.len()).find(|&i| {
                    bytes[i..].starts_with(&MAGIC)
                        && matches!(parse_frame(&bytes[i..]), Parsed::Frame(_))
                });
                match next {
                    Some(i) => {
                        out.corrupt_bytes += (i - at) as u64;
                        at = i;
                        out.end = position + at as u64;
                    }
                    None => {
                        if is_tail {
                            out.incomplete_tail = true;
                        } else {
                            out.corrupt_bytes += (bytes.len() - at) as u64;
                            out.end = position + bytes.len() as u64;
                        }
                        break;
                    }
                }
            }
        }
    }
}

/// What opening the log found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Bytes cut from the end of the last segment (a torn append).
    pub truncated_bytes: u64,
}

/// Appends blocks to the log. One writer per log directory.
pub struct WalWriter {
    dir: PathBuf,
    file: File,
    segment_start: u64,
    position: u64,
    segment_bytes: u64,
    /// The frames of the group being written, reused from group to group.
    buffer: Vec<u8>,
}

impl WalWriter {
    /// Opens (or creates) the log in `dir`, cutting a torn tail off the last segment.
    pub fn open(dir: &Path, segment_bytes: u64) -> io::Result<(Self, Recovery)> {
        fs::create_dir_all(dir)?;
        let starts = segments(dir)?;
        let mut recovery = Recovery::default();
        let (segment_start, file, position) = match starts.last() {
            None => {
                let file = create_segment(dir, 0)?;
                (0, file, 0)
            }
            Some(&start) => {
                let path = dir.join(segment_name(start));
                let mut file = OpenOptions::new().read(true).write(true).open(&path)?;
                let mut bytes = Vec::new();
                file.read_to_end(&mut bytes)?;
                let scanned = scan(&bytes, start, true);
                let valid_end = scanned.end;
                let length = start + bytes.len() as u64;
                if valid_end < length {
                    recovery.truncated_bytes = length - valid_end;
                    file.set_len(valid_end - start)?;
                    file.sync_all()?;
                }
                file.seek(SeekFrom::Start(valid_end - start))?;
                (start, file, valid_end)
            }
        };
        Ok((
            Self {
                dir: dir.to_owned(),
                file,
                segment_start,
                position,
                segment_bytes: segment_bytes.max(FRAME_HEADER as u64 + 1),
                buffer: Vec::new(),
            },
            recovery,
        ))
    }

    /// Position the next block will take.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Writes `payloads` as consecutive frames (not yet durable: call [`WalWriter::sync`]).
    /// Starts a new segment first when the current one is full.
    pub fn append(&mut self, payloads: &[Vec<u8>]) -> io::Result<()> {
        self.roll_if_full()?;
        let mut buffer = std::mem::take(&mut self.buffer);
        buffer.clear();
        for payload in payloads {
            frame_into(&mut buffer, payload);
        }
        let written = self.write_buffer(&buffer);
        self.keep_buffer(buffer);
        written
    }

    /// Writes whole frames made by [`frame_records`] (not yet durable: call
    /// [`WalWriter::sync`]), in one write. Starts a new segment first when the current one
    /// is full.
    pub fn append_frames(&mut self, frames: &[Vec<u8>]) -> io::Result<()> {
        self.roll_if_full()?;
        let mut buffer = std::mem::take(&mut self.buffer);
        buffer.clear();
        for frame in frames {
            buffer.extend_from_slice(frame);
        }
        let written = self.write_buffer(&buffer);
        self.keep_buffer(buffer);
        written
    }

    /// Starts a new segment when the current one is full.
    fn roll_if_full(&mut self) -> io::Result<()> {
        if self.position > self.segment_start
            && self.position - self.segment_start >= self.segment_bytes
        {
            self.file.sync_data()?;
            self.file = create_segment(&self.dir, self.position)?;
            self.segment_start = self.position;
        }
        Ok(())
    }

    /// Keeps the group buffer for the next group (no allocation per group), unless one huge
    /// batch grew it past what a group usually needs.
    fn keep_buffer(&mut self, buffer: Vec<u8>) {
        if buffer.capacity() <= KEPT_BUFFER_BYTES {
            self.buffer = buffer;
        }
    }

    /// Writes `buffer` at the end of the log and advances the position; on failure, cuts
    /// whatever part of it reached the file.
    fn write_buffer(&mut self, buffer: &[u8]) -> io::Result<()> {
        let size = buffer.len();
        if let Err(e) = self.file.write_all(buffer) {
            // Leave no half-written frame behind the position we report.
            let _ = self.file.set_len(self.position - self.segment_start);
            let _ = self
                .file
                .seek(SeekFrom::Start(self.position - self.segment_start));
            return Err(e);
        }
        self.position += size as u64;
        Ok(())
    }

    /// Makes everything appended durable.
    pub fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Forgets blocks appended after `position` in the current segment: after a failed sync
    /// their durability is unknown, their requests are refused, so they must not be read.
    pub fn rollback_to(&mut self, position: u64) -> io::Result<()> {
        let keep = position.max(self.segment_start) - self.segment_start;
        self.file.set_len(keep)?;
        self.file.seek(SeekFrom::Start(keep))?;
        self.position = self.segment_start + keep;
        Ok(())
    }
}

fn create_segment(dir: &Path, start: u64) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(dir.join(segment_name(start)))?;
    // The new name must survive a crash too.
    File::open(dir)?.sync_all()?;
    Ok(file)
}

/// Reads blocks from `position` up to `end` (exclusive), at most about `max_bytes` of them
/// (always at least one whole block). Skips corruption, counting it.
///
/// `reuse` is emptied and returned as the new scan, so its allocations serve again: pass the
/// last scan, or `Scan::default()` (an error consumes it). An applier reads a batch of several MiB every half
/// second, and a fresh buffer each time cost a page fault per 4 KiB once the allocator had
/// returned the last one to the kernel.
pub fn read(
    dir: &Path,
    position: u64,
    end: u64,
    max_bytes: usize,
    reuse: Scan,
) -> io::Result<Scan> {
    let mut out = reuse;
    out.reset(position);
    let starts = segments(dir)?;
    let Some(index) = starts.iter().rposition(|&s| s <= position) else {
        return Ok(out);
    };
    let mut buffer = std::mem::take(&mut out.bytes);
    let segment_start = starts[index];
    let segment_end = starts.get(index + 1).copied().unwrap_or(u64::MAX).min(end);
    let mut file = File::open(dir.join(segment_name(segment_start)))?;
    let available = segment_end.saturating_sub(position);
    let mut want = (max_bytes as u64).min(available);
    let in_file = file
        .metadata()?
        .len()
        .saturating_sub(position - segment_start);
    loop {
        file.seek(SeekFrom::Start(position - segment_start))?;
        buffer.clear();
        // Room for the whole read up front, so it does not double and copy as it fills; a
        // buffer too small is replaced rather than grown (growing would copy its old bytes).
        let room = usize::try_from(want.min(in_file)).unwrap_or(usize::MAX);
        if buffer.capacity() < room {
            buffer = Vec::with_capacity(room);
        }
        (&mut file).take(want).read_to_end(&mut buffer)?;
        let at_region_end = want >= available || (buffer.len() as u64) < want;
        out.reset(position);
        scan_into(&buffer, position, !at_region_end, &mut out);
        let scanned = &mut out;
        if !scanned.blocks.is_empty() || at_region_end || scanned.corrupt_bytes > 0 {
            if at_region_end && scanned.incomplete_tail && segment_end < end {
                // A segment that ends inside a frame: the rest of it is corrupt.
                scanned.corrupt_bytes += segment_end - scanned.end;
                scanned.end = segment_end;
                scanned.incomplete_tail = false;
            }
            if scanned.blocks.is_empty()
                && scanned.end == position
                && segment_end < end
                && !scanned.incomplete_tail
            {
                scanned.end = segment_end;
            }
            out.bytes = buffer;
            return Ok(out);
        }
        // One block is bigger than max_bytes: read more.
        want = (want * 2).min(available);
    }
}

/// Deletes segments that end at or before `position` (never the last one).
pub fn delete_below(dir: &Path, position: u64) -> io::Result<usize> {
    let starts = segments(dir)?;
    let mut deleted = 0;
    for pair in starts.windows(2) {
        if pair[1] <= position {
            fs::remove_file(dir.join(segment_name(pair[0])))?;
            deleted += 1;
        }
    }
    Ok(deleted)
}

/// Start of the oldest segment still on disk.
pub fn oldest_position(dir: &Path) -> io::Result<u64> {
    Ok(segments(dir)?.first().copied().unwrap_or(0))
}

/// Encodes the records of one request as a block payload.
pub fn encode_records(records: &[UsageRecord]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + records.len() * 64);
    encode_records_into(&mut out, records);
    out
}

/// Appends the payload of [`encode_records`] to `out`.
fn encode_records_into(out: &mut Vec<u8>, records: &[UsageRecord]) {
    out.extend_from_slice(&(records.len() as u32).to_le_bytes());
    for r in records {
        put_str(out, &r.customer_id);
        out.push(match r.metric {
            Metric::Impressions => 1,
            Metric::ApiCalls => 2,
            Metric::DataTransfer => 3,
        });
        out.extend_from_slice(&r.quantity.to_le_bytes());
        out.extend_from_slice(&r.timestamp_ms.to_le_bytes());
        out.extend_from_slice(&r.received_ms.to_le_bytes());
        put_opt_str(out, r.event_id.as_deref());
        put_opt_str(out, r.metadata.as_deref());
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_str(out, s);
        }
    }
}

/// A payload that does not decode (checksummed, so only a bug or a foreign file causes it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("undecodable block: {0}")]
pub struct DecodeError(&'static str);

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().map_err(|_| DecodeError("u32"))?,
        ))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().map_err(|_| DecodeError("u64"))?,
        ))
    }
    fn str(&mut self) -> Result<&'a str, DecodeError> {
        let len = self.u32()? as usize;
        std::str::from_utf8(self.take(len)?).map_err(|_| DecodeError("utf-8"))
    }
    fn opt_str(&mut self) -> Result<Option<&'a str>, DecodeError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.str()?)),
            _ => Err(DecodeError("option tag")),
        }
    }
}

/// Decodes a block payload back into records.
pub fn decode_records(payload: &[u8]) -> Result<Vec<UsageRecord>, DecodeError> {
    let mut records = Vec::new();
    decode_records_into(payload, &mut records)?;
    Ok(records)
}

/// Decodes a block payload and appends its records to `out`; on an error `out` is left as it
/// was. A record whose customer is the one of the record before it in `out` (every record of
/// a block, and consecutive blocks of one customer) shares that record's allocation.
pub fn decode_records_into(payload: &[u8], out: &mut Vec<UsageRecord>) -> Result<(), DecodeError> {
    let before = out.len();
    let decoded = decode_appending(payload, out);
    if decoded.is_err() {
        out.truncate(before);
    }
    decoded
}

fn decode_appending(payload: &[u8], out: &mut Vec<UsageRecord>) -> Result<(), DecodeError> {
    let mut c = Cursor(payload);
    let count = c.u32()? as usize;
    out.reserve(count.min(payload.len() / 30 + 1));
    for _ in 0..count {
        let customer = c.str()?;
        let customer_id = match out.last() {
            Some(last) if &*last.customer_id == customer => last.customer_id.clone(),
            _ => Arc::from(customer),
        };
        let metric = match c.u8()? {
            1 => Metric::Impressions,
            2 => Metric::ApiCalls,
            3 => Metric::DataTransfer,
            _ => return Err(DecodeError("metric")),
        };
        out.push(UsageRecord {
            customer_id,
            metric,
            quantity: c.u64()?,
            timestamp_ms: c.u64()? as i64,
            received_ms: c.u64()? as i64,
            event_id: c.opt_str()?.map(Box::from),
            metadata: c.opt_str()?.map(Box::from),
        });
    }
    if !c.0.is_empty() {
        return Err(DecodeError("trailing bytes"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("apex-wal-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn record(i: u64) -> UsageRecord {
        UsageRecord {
            customer_id: "cus_a".into(),
            metric: Metric::ApiCalls,
            quantity: i + 1,
            event_id: i.is_multiple_of(2).then(|| format!("e{i}").into()),
            timestamp_ms: 1_764_000_000_000 + i as i64,
            received_ms: 1_764_000_000_500,
            metadata: Some(r#"{"platform":"iOS"}"#.into()),
        }
    }

    #[test]
    fn frames_made_by_the_edge_are_the_frames_append_writes() {
        let dir = temp_dir("frames");
        let records: Vec<_> = (0..5).map(record).collect();
        let mut expected = Vec::new();
        frame_into(&mut expected, &encode_records(&records[..2]));
        frame_into(&mut expected, &encode_records(&records[2..]));
        let frames = [frame_records(&records[..2]), frame_records(&records[2..])];
        assert_eq!(frames.concat(), expected);

        // Written with append_frames, they read back as the two blocks, twice over (the
        // buffer kept from the first group must not leak into the second).
        let (mut log, _) = WalWriter::open(&dir, 1 << 20).unwrap();
        log.append_frames(&frames).unwrap();
        log.append_frames(&frames[..1]).unwrap();
        log.sync().unwrap();
        let scanned = read(&dir, 0, log.position(), usize::MAX, Scan::default()).unwrap();
        let decoded: Vec<_> = scanned
            .blocks
            .iter()
            .map(|b| decode_records(scanned.payload(b)).unwrap())
            .collect();
        assert_eq!(
            decoded,
            vec![
                records[..2].to_vec(),
                records[2..].to_vec(),
                records[..2].to_vec()
            ]
        );
    }

    #[test]
    fn records_round_trip() {
        let records: Vec<_> = (0..5).map(record).collect();
        assert_eq!(decode_records(&encode_records(&records)).unwrap(), records);
        assert!(decode_records(&encode_records(&records)[..20]).is_err());
    }

    #[test]
    fn decoding_appends_shares_a_customer_across_blocks_and_is_all_or_nothing() {
        let first: Vec<_> = (0..3).map(record).collect();
        let mut other = record(3);
        other.customer_id = "cus_b".into();
        let second = vec![record(4), other.clone(), record(5)];
        let mut out = Vec::new();
        decode_records_into(&encode_records(&first), &mut out).unwrap();
        decode_records_into(&encode_records(&second), &mut out).unwrap();
        let expected: Vec<_> = first.iter().chain(&second).cloned().collect();
        assert_eq!(out, expected);
        // One allocation for the first block and the first record of the second, which
        // follows it; sharing is with the record just before only, so the record after the
        // other customer's has its own.
        assert!(Arc::ptr_eq(&out[0].customer_id, &out[3].customer_id));
        assert!(!Arc::ptr_eq(&out[3].customer_id, &out[5].customer_id));
        // A block that does not decode leaves what was there, even after some of its records
        // decoded.
        let mut bad = encode_records(&second);
        bad.truncate(bad.len() - 3);
        assert!(decode_records_into(&bad, &mut out).is_err());
        assert_eq!(out, expected);
    }

    fn write_blocks(dir: &Path, n: u64, segment_bytes: u64) -> Vec<u64> {
        let (mut wal, _) = WalWriter::open(dir, segment_bytes).unwrap();
        let mut positions = Vec::new();
        for i in 0..n {
            positions.push(wal.position());
            wal.append(&[encode_records(&[record(i)])]).unwrap();
        }
        wal.sync().unwrap();
        positions.push(wal.position());
        positions
    }

    fn read_all(dir: &Path, end: u64) -> (Vec<u64>, u64) {
        let mut quantities = Vec::new();
        let mut corrupt = 0;
        let mut at = oldest_position(dir).unwrap();
        // One scan for every read, as an applier keeps it, alternating a budget above and
        // below a block's size (the smaller one reads more for a whole block): no read may see
        // the last one's bytes or blocks.
        let mut scan = Scan::default();
        let mut reads = 0;
        while at < end {
            reads += 1;
            let budget = if reads % 2 == 0 { 1024 } else { 16 };
            scan = read(dir, at, end, budget, scan).unwrap();
            corrupt += scan.corrupt_bytes;
            for block in &scan.blocks {
                quantities.extend(
                    decode_records(scan.payload(block))
                        .unwrap()
                        .iter()
                        .map(|r| r.quantity),
                );
            }
            assert!(scan.end > at, "reading makes progress");
            at = scan.end;
        }
        (quantities, corrupt)
    }

    #[test]
    fn blocks_are_read_back_across_segments() {
        let dir = temp_dir("segments");
        let positions = write_blocks(&dir, 50, 500);
        assert!(segments(&dir).unwrap().len() > 3);
        let (quantities, corrupt) = read_all(&dir, *positions.last().unwrap());
        assert_eq!(quantities, (1..=50).collect::<Vec<_>>());
        assert_eq!(corrupt, 0);
        // Reopening continues at the end.
        let (wal, recovery) = WalWriter::open(&dir, 500).unwrap();
        assert_eq!(
            (wal.position(), recovery.truncated_bytes),
            (*positions.last().unwrap(), 0)
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_torn_tail_is_cut_and_every_intact_block_kept() {
        let dir = temp_dir("torn");
        let positions = write_blocks(&dir, 10, 1 << 20);
        let end = *positions.last().unwrap();
        // A crash in the middle of the last append: half of the last frame is on disk.
        let path = dir.join(segment_name(0));
        let cut = positions[9] + (end - positions[9]) / 2;
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(cut)
            .unwrap();
        let (mut wal, recovery) = WalWriter::open(&dir, 1 << 20).unwrap();
        assert_eq!(recovery.truncated_bytes, cut - positions[9]);
        assert_eq!(wal.position(), positions[9]);
        let (quantities, _) = read_all(&dir, wal.position());
        assert_eq!(quantities, (1..=9).collect::<Vec<_>>());
        // New appends follow the intact blocks.
        wal.append(&[encode_records(&[record(99)])]).unwrap();
        wal.sync().unwrap();
        let (quantities, corrupt) = read_all(&dir, wal.position());
        assert_eq!(quantities.last(), Some(&100));
        assert_eq!((quantities.len(), corrupt), (10, 0));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_flipped_byte_loses_only_its_block() {
        let dir = temp_dir("flip");
        let positions = write_blocks(&dir, 10, 1 << 20);
        let end = *positions.last().unwrap();
        let path = dir.join(segment_name(0));
        let mut bytes = fs::read(&path).unwrap();
        bytes[positions[4] as usize + FRAME_HEADER + 3] ^= 0x40;
        fs::write(&path, &bytes).unwrap();
        let (quantities, corrupt) = read_all(&dir, end);
        assert_eq!(quantities, [1, 2, 3, 4, 6, 7, 8, 9, 10]);
        assert_eq!(corrupt, positions[5] - positions[4]);
        // The writer does not cut valid blocks after a corrupt one.
        let (wal, recovery) = WalWriter::open(&dir, 1 << 20).unwrap();
        assert_eq!((wal.position(), recovery.truncated_bytes), (end, 0));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn old_segments_are_deleted_below_a_position() {
        let dir = temp_dir("delete");
        let positions = write_blocks(&dir, 50, 500);
        let before = segments(&dir).unwrap();
        let deleted = delete_below(&dir, positions[25]).unwrap();
        let after = segments(&dir).unwrap();
        assert_eq!(before.len() - deleted, after.len());
        assert!(after[0] <= positions[25]);
        let (quantities, _) = read_all(&dir, *positions.last().unwrap());
        assert!(quantities.ends_with(&(26..=50).collect::<Vec<_>>()));
        let _ = fs::remove_dir_all(&dir);
    }
}
