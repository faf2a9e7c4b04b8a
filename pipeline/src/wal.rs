//! The write-ahead log: append-only segment files of framed, checksummed blocks (one block
//! per request's records). The edge acknowledges a request only after the block is fsynced;
//! the stores are fed from the log, so a crash between the two loses nothing.
//!
//! Layout: `DIR/<start position, 20 digits>.wal`. A position is a byte offset in the logical
//! log, growing across segments, so it names a block for good (batch ids are positions).
//! Frame: `MAGIC (4) | payload length (4, LE) | CRC-32 of length and payload (4, LE) | payload`.
//!
//! Segments are made ahead ([`WalWriter::prepare_segments_ahead`]): while the group commits are
//! small, a thread writes the next one as `segment_bytes` of zeros, fsynced, and the writer
//! renames it into place when it rolls.
//! Appending inside a file whose blocks already exist and whose size does not change lets a
//! group commit's `fdatasync` write only the data: appending to a growing file also wrote the
//! inode every time, synchronously (ext4 without a journal; a journal commit with one), which
//! made the median fdatasync twice as long on this project's machines (BENCHMARKS.md).
//! PostgreSQL zero-fills its WAL segments ahead for the same reason.
//!
//! Recovery: a torn or corrupt tail of the last segment (a crash mid-append) is cut back to
//! the end of the last valid frame before new blocks are appended; zeros after it are the
//! segment's unused, prepared space, kept as they are. A corrupt frame in the
//! middle of the log (a flipped byte) is skipped by scanning to the next valid frame; every
//! skipped byte is counted and logged, and every intact block is still read.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use apex_core::model::{Metric, UsageRecord};

/// Marks the start of every frame, for resynchronisation after corruption.
pub const MAGIC: [u8; 4] = *b"APXW";
/// Bytes before a frame's payload.
pub const FRAME_HEADER: usize = 12;
/// Largest payload a frame may carry (a batch body is at most 8 MiB by default).
pub const MAX_PAYLOAD: usize = 64 * 1024 * 1024;
/// The next segment, written ahead as zeros by [`WalWriter::prepare_segments_ahead`] and renamed
/// to its start position when the writer rolls. Not a `.wal` name: [`segments`] never lists it.
pub const PREPARED_SEGMENT: &str = "next-segment.zeroed";
/// The segment being prepared; renamed to [`PREPARED_SEGMENT`] once all its zeros are durable.
const PREPARING_SEGMENT: &str = "next-segment.zeroing";
/// Zeros are written and fsynced this much at a time: a group commit's fsync never waits
/// behind more than this of the preparer's writes in the disk's queue.
const ZERO_CHUNK_BYTES: usize = 256 * 1024;
/// The next segment is written ahead only while the current one's groups average at most
/// this many bytes. Small appends are where a growing file's inode write is most of a
/// group commit's fsync (about 2.6x at 4 KiB, 1.5x at 1 MiB here); a log written in big groups
/// (1,000-record batches) is bound by throughput instead, and writing its zeros as well took
/// 7 % off the batch path (BENCHMARKS.md).
pub const PREPARE_BELOW_GROUP_BYTES: u64 = 64 * 1024;
/// The next segment is written ahead only while the disk keeps room for this many more
/// segments after it (256 MiB with the default 64 MiB segments).
pub const PREPARE_MIN_FREE_SEGMENTS: u64 = 4;
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
/// Frames start only before `starts_before` (at most `bytes.len()`), but may end after it: the
/// log's recovery stops at the zeros a prepared segment ends with, and a last frame whose
/// payload ends in zero bytes reaches into them.
fn scan(bytes: &[u8], starts_before: usize, position: u64, is_tail: bool) -> Scan {
    let mut out = Scan::default();
    scan_into(bytes, starts_before, position, is_tail, &mut out);
    out
}

/// [`scan`] into `out`, which must be empty (its `bytes` are left alone).
fn scan_into(bytes: &[u8], starts_before: usize, position: u64, is_tail: bool, out: &mut Scan) {
    let limit = starts_before.min(bytes.len());
    out.end = position;
    let mut at = 0usize;
    while at < limit {
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
                let next = (at + 1..limit).find(|&i| {
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
                            out.corrupt_bytes += (limit - at) as u64;
                            out.end = position + limit as u64;
                        }
                        break;
                    }
                }
            }
        }
    }
}

/// The length of `bytes` without the zeros they end with.
fn without_zero_tail(bytes: &[u8]) -> usize {
    // A page at a time (one `memcmp` each): a prepared segment is up to 64 MiB of zeros, and
    // the tests' debug builds recover it at every restart.
    static ZERO_PAGE: [u8; 4096] = [0; 4096];
    let mut end = bytes.len();
    while end >= ZERO_PAGE.len() && bytes[end - ZERO_PAGE.len()..end] == ZERO_PAGE[..] {
        end -= ZERO_PAGE.len();
    }
    while end > 0 && bytes[end - 1] == 0 {
        end -= 1;
    }
    end
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
    /// The thread writing the next segment ahead, if [`WalWriter::prepare_segments_ahead`]
    /// started it.
    preparer: Option<Preparer>,
    /// Whether the next segment was asked for since the last roll.
    next_wanted: bool,
    /// Groups (appends) and their bytes since the last roll or the open: their mean decides
    /// whether the next segment is worth writing ahead ([`PREPARE_BELOW_GROUP_BYTES`]).
    groups_since_roll: u64,
    bytes_since_roll: u64,
}

impl WalWriter {
    /// Opens (or creates) the log in `dir`, cutting a torn tail off the last segment. Zeros
    /// after the last valid frame are prepared space ([`WalWriter::prepare_segments_ahead`]),
    /// not a torn tail: they are kept, and appends go over them.
    pub fn open(dir: &Path, segment_bytes: u64) -> io::Result<(Self, Recovery)> {
        fs::create_dir_all(dir)?;
        // A segment whose preparation a stop interrupted: its zeros may not all be durable.
        match fs::remove_file(dir.join(PREPARING_SEGMENT)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
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
                // Frames starting only before the zeros a prepared segment ends with: a search
                // for one through them would go byte by byte through up to 64 MiB. A frame is
                // parsed whole, into the zeros when its payload ends in zero bytes.
                let data_len = without_zero_tail(&bytes);
                let valid_len = usize::try_from(scan(&bytes, data_len, start, true).end - start)
                    .expect("within the bytes read");
                if data_len > valid_len {
                    recovery.truncated_bytes = (data_len - valid_len) as u64;
                    file.set_len(valid_len as u64)?;
                    file.sync_all()?;
                }
                file.seek(SeekFrom::Start(valid_len as u64))?;
                (start, file, start + valid_len as u64)
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
                preparer: None,
                next_wanted: false,
                groups_since_roll: 0,
                bytes_since_roll: 0,
            },
            recovery,
        ))
    }

    /// Starts a thread (`apex-wal-prep`) that makes the next segment ready: `segment_bytes` of
    /// zeros, fsynced in 256 KiB steps, as [`PREPARED_SEGMENT`]. The writer asks for it once
    /// the current segment is half full (so an idle or small log writes no zeros) and only if
    /// its groups averaged at most [`PREPARE_BELOW_GROUP_BYTES`], and when it
    /// rolls, renames it to the new segment's name (and fsyncs the folder, as for a created
    /// one). A roll that finds none ready (the log outran the preparer) creates the segment
    /// empty, as without preparation. The thread stops, and is
    /// joined, when the writer is dropped; a preparation it interrupts is removed at the next
    /// [`WalWriter::open`].
    ///
    /// # Errors
    /// The thread cannot be started.
    pub fn prepare_segments_ahead(&mut self) -> io::Result<()> {
        if self.preparer.is_none() {
            self.preparer = Some(Preparer::start(self.dir.clone(), self.segment_bytes)?);
        }
        Ok(())
    }

    /// Removes a segment an earlier run prepared, for a log that no longer prepares them
    /// (`APEX_WAL_PREALLOCATE=false`): it would otherwise keep its 64 MiB on disk for good.
    ///
    /// # Errors
    /// The file exists and cannot be removed.
    pub fn discard_prepared_segment(&self) -> io::Result<()> {
        match fs::remove_file(self.dir.join(PREPARED_SEGMENT)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
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
            self.file = self.next_segment(self.position)?;
            self.segment_start = self.position;
            (self.groups_since_roll, self.bytes_since_roll) = (0, 0);
        }
        Ok(())
    }

    /// The file of the segment starting at `start`: the prepared one renamed, or a new one.
    fn next_segment(&mut self, start: u64) -> io::Result<File> {
        if self.preparer.is_none() {
            metrics::counter!(crate::names::WAL_ROLLS_TOTAL, "segment" => "created").increment(1);
            return create_segment(&self.dir, start);
        }
        let path = self.dir.join(segment_name(start));
        let file = match fs::rename(self.dir.join(PREPARED_SEGMENT), &path) {
            Ok(()) => {
                let file = OpenOptions::new().read(true).write(true).open(&path)?;
                // The new name must survive a crash too.
                File::open(&self.dir)?.sync_all()?;
                metrics::counter!(crate::names::WAL_ROLLS_TOTAL, "segment" => "prepared")
                    .increment(1);
                file
            }
            Err(_) => {
                // None ready (or it cannot be used): an empty segment, as without preparation.
                metrics::counter!(crate::names::WAL_ROLLS_TOTAL, "segment" => "created")
                    .increment(1);
                create_segment(&self.dir, start)?
            }
        };
        self.next_wanted = false;
        Ok(file)
    }

    /// Asks the preparer for the next segment once the current one is half full, if its
    /// groups were small ([`PREPARE_BELOW_GROUP_BYTES`]).
    fn want_next_when_half_full(&mut self) {
        if let Some(preparer) = &self.preparer
            && !self.next_wanted
            && self.position - self.segment_start >= self.segment_bytes / 2
            && self.bytes_since_roll <= PREPARE_BELOW_GROUP_BYTES * self.groups_since_roll
        {
            preparer.want_next();
            self.next_wanted = true;
        }
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
        self.groups_since_roll += 1;
        self.bytes_since_roll += size as u64;
        self.want_next_when_half_full();
        Ok(())
    }

    /// Makes everything appended durable.
    pub fn sync(&mut self) -> io::Result<()> {
        #[cfg(any(test, feature = "test-support"))]
        {
            if faults::take(&self.dir, faults::Fault::Panic).is_err() {
                panic!("injected panic in the log's fsync");
            }
            faults::take(&self.dir, faults::Fault::Sync)?;
        }
        self.file.sync_data()
    }

    /// Forgets blocks appended after `position` in the current segment: after a failed sync
    /// their durability is unknown, their requests are refused, so they must not be read.
    /// The cut is made durable (the file's new size fsynced) before this returns: in a
    /// prepared segment the size on disk already covers the refused bytes, so a crash could
    /// otherwise bring them back as valid frames.
    ///
    /// # Errors
    /// The cut or its fsync failed: whether the refused blocks are in the log is unknown, and
    /// the caller must not append after them (the log writer stops).
    pub fn rollback_to(&mut self, position: u64) -> io::Result<()> {
        #[cfg(any(test, feature = "test-support"))]
        faults::take(&self.dir, faults::Fault::Rollback)?;
        let keep = position.max(self.segment_start) - self.segment_start;
        self.file.set_len(keep)?;
        self.file.sync_all()?;
        self.file.seek(SeekFrom::Start(keep))?;
        self.position = self.segment_start + keep;
        Ok(())
    }
}

/// The thread that writes the next segment ahead (see [`WalWriter::prepare_segments_ahead`]).
struct Preparer {
    /// Asks for a segment; closed when the writer is dropped.
    wanted: Option<std::sync::mpsc::SyncSender<()>>,
    /// Raised when the writer is dropped, so a preparation under way stops between chunks.
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Preparer {
    fn start(dir: PathBuf, segment_bytes: u64) -> io::Result<Self> {
        let (wanted, requests) = std::sync::mpsc::sync_channel::<()>(1);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("apex-wal-prep".into())
                .spawn(move || {
                    while requests.recv().is_ok() {
                        if dir.join(PREPARED_SEGMENT).exists() {
                            continue;
                        }
                        match prepare_segment(&dir, segment_bytes, &stop) {
                            Ok(true) => {}
                            Ok(false) => return,
                            // The next roll creates its segment empty; the one after asks again.
                            Err(e) => tracing::warn!(
                                error = %e,
                                "write-ahead log: cannot prepare the next segment"
                            ),
                        }
                    }
                })?
        };
        Ok(Self {
            wanted: Some(wanted),
            stop,
            thread: Some(thread),
        })
    }

    /// Asks for the next segment (a request already waiting is enough).
    fn want_next(&self) {
        if let Some(wanted) = &self.wanted {
            let _ = wanted.try_send(());
        }
    }
}

impl Drop for Preparer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.wanted = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Writes `bytes` zeros as [`PREPARING_SEGMENT`] in `dir`, fsyncing every
/// [`ZERO_CHUNK_BYTES`], then renames it to [`PREPARED_SEGMENT`] and fsyncs the folder: the
/// prepared name only ever names a whole, durable file of zeros. Nothing is written when the
/// disk is nearly full ([`room_to_prepare`]). Returns `false` when `stop` is raised midway;
/// then, as on an error (a full disk), the partial file is removed, so it does not hold the
/// space the log itself needs.
fn prepare_segment(dir: &Path, bytes: u64, stop: &AtomicBool) -> io::Result<bool> {
    let available = available_bytes(dir)?;
    if !room_to_prepare(available, bytes) {
        // The zeros would take space the log (or a database on the same disk) needs more:
        // the next roll creates its segment empty, which costs only a slower fsync.
        tracing::warn!(
            available,
            segment_bytes = bytes,
            "write-ahead log: not preparing the next segment: the disk is nearly full"
        );
        return Ok(true);
    }
    let partial = dir.join(PREPARING_SEGMENT);
    let prepared = write_zeros(&partial, bytes, stop).and_then(|whole| {
        if whole {
            fs::rename(&partial, dir.join(PREPARED_SEGMENT))?;
            File::open(dir)?.sync_all()?;
        }
        Ok(whole)
    });
    if !matches!(prepared, Ok(true)) {
        let _ = fs::remove_file(&partial);
    }
    prepared
}

/// Free bytes an unprivileged writer can use on the filesystem of `dir` (`statvfs`'s
/// `f_bavail` blocks of `f_frsize` bytes).
fn available_bytes(dir: &Path) -> io::Result<u64> {
    let stat = rustix::fs::statvfs(dir).map_err(io::Error::from)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Whether a segment of `segment_bytes` is worth writing ahead with `available` bytes free:
/// only while the disk keeps room for [`PREPARE_MIN_FREE_SEGMENTS`] more segments after it
/// (the current segment may still be growing, and the log's own cap counts segments, not
/// the disk). Below that the zeros would hasten a full disk to save a fraction of a
/// millisecond per fsync.
fn room_to_prepare(available: u64, segment_bytes: u64) -> bool {
    segment_bytes
        .checked_mul(PREPARE_MIN_FREE_SEGMENTS + 1)
        .is_some_and(|needed| available >= needed)
}

/// Writes `bytes` zeros to a new file at `path`, fsyncing every [`ZERO_CHUNK_BYTES`]; `false`
/// if `stop` was raised first.
fn write_zeros(path: &Path, bytes: u64, stop: &AtomicBool) -> io::Result<bool> {
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)?;
    let zeros = vec![0u8; ZERO_CHUNK_BYTES];
    let mut left = bytes;
    while left > 0 {
        if stop.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let chunk = usize::try_from(left).map_or(ZERO_CHUNK_BYTES, |l| l.min(ZERO_CHUNK_BYTES));
        file.write_all(&zeros[..chunk])?;
        file.sync_data()?;
        left -= chunk as u64;
    }
    Ok(true)
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
        scan_into(&buffer, buffer.len(), position, !at_region_end, &mut out);
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

/// Disk faults the tests inject into the log of one directory: the test double of a disk
/// that fails an fsync or a truncate, which no real disk of a test machine does on demand.
/// Only the failing call is simulated: it returns an error and does nothing, and everything
/// else the log does is real. Built for the crate's tests and the `test-support` feature,
/// never in a release build.
#[cfg(any(test, feature = "test-support"))]
pub mod faults {
    use std::collections::BTreeMap;
    use std::io;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    /// A call of [`super::WalWriter`] that can be made to fail.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    pub enum Fault {
        /// [`super::WalWriter::sync`]: the group's fsync (nothing is synced).
        Sync,
        /// [`super::WalWriter::rollback_to`]: the cut after a failed group (nothing is cut).
        Rollback,
        /// [`super::WalWriter::sync`] panics: a bug in the log writer.
        Panic,
    }

    /// Failures still to come, by log directory and call.
    static PLANNED: Mutex<BTreeMap<(PathBuf, Fault), u32>> = Mutex::new(BTreeMap::new());

    /// Makes the next `times` calls of `fault` on the log in `dir` (the path the log was
    /// opened with) fail with an I/O error. Tests run in parallel: each uses its own `dir`.
    pub fn inject(dir: &Path, fault: Fault, times: u32) {
        let mut planned = PLANNED.lock().unwrap_or_else(|p| p.into_inner());
        *planned.entry((dir.to_path_buf(), fault)).or_insert(0) += times;
    }

    /// The injected error, if a failure of `fault` is planned for `dir` (and counts it).
    pub(super) fn take(dir: &Path, fault: Fault) -> io::Result<()> {
        let mut planned = PLANNED.lock().unwrap_or_else(|p| p.into_inner());
        match planned.get_mut(&(dir.to_path_buf(), fault)) {
            Some(left) if *left > 0 => {
                *left -= 1;
                Err(io::Error::other(format!("injected {fault:?} failure")))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_segment_is_prepared_only_while_the_disk_keeps_room_for_more() {
        let segment = 64 << 20;
        assert!(room_to_prepare(5 * segment, segment));
        assert!(room_to_prepare(u64::MAX, segment));
        assert!(!room_to_prepare(5 * segment - 1, segment));
        assert!(!room_to_prepare(0, segment));
        assert!(!room_to_prepare(u64::MAX, u64::MAX));
        // The filesystem of a test folder reports what it has.
        let dir = std::env::temp_dir();
        assert!(available_bytes(&dir).unwrap() > 0);
        assert!(available_bytes(&dir.join("no-such-folder-apex")).is_err());
    }
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

    /// Waits (up to 10 s) until the preparer has made the next segment.
    fn wait_for_prepared(dir: &Path) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !dir.join(PREPARED_SEGMENT).exists() {
            assert!(std::time::Instant::now() < deadline, "no prepared segment");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn a_roll_takes_the_prepared_segment_and_the_next_is_prepared() {
        let dir = temp_dir("prepared");
        let (mut wal, _) = WalWriter::open(&dir, 4096).unwrap();
        wal.prepare_segments_ahead().unwrap();
        let mut positions = Vec::new();
        let mut fill_to = |wal: &mut WalWriter, to: u64| {
            while wal.position() < to {
                positions.push(wal.position());
                wal.append(&[encode_records(&[record(positions.len() as u64)])])
                    .unwrap();
            }
        };
        // Nothing is prepared before the segment is half full.
        fill_to(&mut wal, 1024);
        assert!(!dir.join(PREPARED_SEGMENT).exists());
        fill_to(&mut wal, 2048);
        wait_for_prepared(&dir);
        assert_eq!(
            fs::metadata(dir.join(PREPARED_SEGMENT)).unwrap().len(),
            4096,
            "a whole segment of zeros"
        );
        // Fill the first segment, then one block: the roll renames the prepared file.
        fill_to(&mut wal, 4096);
        let blocks = positions.len();
        let second = wal.position();
        wal.append(&[encode_records(&[record(0)])]).unwrap();
        wal.sync().unwrap();
        assert_eq!(segments(&dir).unwrap(), [0, second]);
        let segment = dir.join(segment_name(second));
        assert_eq!(
            fs::metadata(&segment).unwrap().len(),
            4096,
            "the prepared file, written over from its start"
        );
        let bytes = fs::read(&segment).unwrap();
        assert_eq!(&bytes[..4], &MAGIC);
        let written = usize::try_from(wal.position() - second).unwrap();
        assert!(bytes[written..].iter().all(|&b| b == 0));
        // The next is asked for at half of this one.
        assert!(!dir.join(PREPARED_SEGMENT).exists());
        // Every block reads back, and the zeros after the last are not corruption.
        let (quantities, corrupt) = read_all(&dir, wal.position());
        assert_eq!(quantities.len(), blocks + 1);
        assert_eq!(corrupt, 0);
        let end = wal.position();
        drop(wal); // stops and joins the preparer
        // Reopening keeps the zeros (no torn tail) and appends over them.
        let (mut wal, recovery) = WalWriter::open(&dir, 4096).unwrap();
        assert_eq!((wal.position(), recovery.truncated_bytes), (end, 0));
        assert_eq!(fs::metadata(&segment).unwrap().len(), 4096);
        wal.append(&[encode_records(&[record(41)])]).unwrap();
        wal.sync().unwrap();
        let (quantities, corrupt) = read_all(&dir, wal.position());
        assert_eq!((quantities.last(), corrupt), (Some(&42), 0));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_torn_append_over_prepared_zeros_is_cut_and_counted_without_the_zeros() {
        let dir = temp_dir("torn-zeros");
        let positions = write_blocks(&dir, 10, 1 << 20);
        let end = *positions.last().unwrap();
        let path = dir.join(segment_name(0));
        // The segment was prepared (zeros to 64 KiB); a crash tore the last append: its
        // first half reached the disk, the rest of the file is still zeros.
        let mut bytes = fs::read(&path).unwrap();
        let torn = (end - positions[9]) / 2;
        bytes.truncate(usize::try_from(positions[9] + torn).unwrap());
        bytes.resize(64 * 1024, 0);
        fs::write(&path, &bytes).unwrap();
        let (wal, recovery) = WalWriter::open(&dir, 1 << 20).unwrap();
        assert_eq!(wal.position(), positions[9]);
        // The torn frame's bytes up to its last non-zero one: at most the half on disk.
        assert!(
            recovery.truncated_bytes > 0 && recovery.truncated_bytes <= torn,
            "{}",
            recovery.truncated_bytes
        );
        assert_eq!(fs::metadata(&path).unwrap().len(), positions[9]);
        let (quantities, corrupt) = read_all(&dir, wal.position());
        assert_eq!((quantities, corrupt), ((1..=9).collect::<Vec<_>>(), 0));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_last_frame_ending_in_zero_bytes_survives_recovery_over_zeros() {
        let dir = temp_dir("zero-ended");
        let (mut wal, _) = WalWriter::open(&dir, 1 << 20).unwrap();
        wal.append(&[vec![7, 7, 7], vec![1, 2, 0, 0, 0, 0]])
            .unwrap();
        wal.sync().unwrap();
        let end = wal.position();
        drop(wal);
        let path = dir.join(segment_name(0));
        let mut bytes = fs::read(&path).unwrap();
        bytes.resize(8192, 0);
        fs::write(&path, &bytes).unwrap();
        let (wal, recovery) = WalWriter::open(&dir, 1 << 20).unwrap();
        assert_eq!((wal.position(), recovery.truncated_bytes), (end, 0));
        let scan = read(&dir, 0, end, 1 << 20, Scan::default()).unwrap();
        assert_eq!(scan.blocks.len(), 2);
        assert_eq!(scan.payload(&scan.blocks[1]), [1, 2, 0, 0, 0, 0]);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_corrupt_frame_before_a_last_frame_ending_in_zeros_loses_only_itself() {
        let dir = temp_dir("corrupt-then-zero-ended");
        let (mut wal, _) = WalWriter::open(&dir, 1 << 20).unwrap();
        let payloads = [vec![7u8; 40], vec![8u8; 40], vec![1, 2, 0, 0, 0, 0]];
        wal.append(&payloads).unwrap();
        wal.sync().unwrap();
        let end = wal.position();
        drop(wal);
        // A flipped byte in the middle frame, and the segment's prepared zeros after the last.
        let path = dir.join(segment_name(0));
        let mut bytes = fs::read(&path).unwrap();
        bytes[FRAME_HEADER + 40 + FRAME_HEADER + 5] ^= 0xff;
        bytes.resize(8192, 0);
        fs::write(&path, &bytes).unwrap();
        let (wal, recovery) = WalWriter::open(&dir, 1 << 20).unwrap();
        assert_eq!((wal.position(), recovery.truncated_bytes), (end, 0));
        let scan = read(&dir, 0, end, 1 << 20, Scan::default()).unwrap();
        let read_back: Vec<&[u8]> = scan.blocks.iter().map(|b| scan.payload(b)).collect();
        assert_eq!(read_back, [&payloads[0][..], &payloads[2][..]]);
        assert_eq!(scan.corrupt_bytes, (FRAME_HEADER + 40) as u64);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_rollback_in_a_prepared_segment_is_durable_and_survives_a_reopen() {
        let dir = temp_dir("rollback-prepared");
        let (mut wal, _) = WalWriter::open(&dir, 1 << 20).unwrap();
        wal.append(&[vec![1u8; 10]]).unwrap();
        wal.sync().unwrap();
        drop(wal);
        // As prepared: the segment's size on disk covers what is appended next.
        let path = dir.join(segment_name(0));
        let mut bytes = fs::read(&path).unwrap();
        bytes.resize(8192, 0);
        fs::write(&path, &bytes).unwrap();
        let (mut wal, _) = WalWriter::open(&dir, 1 << 20).unwrap();
        wal.append(&[vec![2u8; 10]]).unwrap();
        wal.sync().unwrap();
        let kept = wal.position();
        wal.append(&[vec![3u8; 10]]).unwrap();
        // The refused group's fsync "failed": it is cut, and the file's size with it.
        wal.rollback_to(kept).unwrap();
        assert_eq!(wal.position(), kept);
        assert_eq!(fs::metadata(&path).unwrap().len(), kept);
        wal.append(&[vec![4u8; 10]]).unwrap();
        wal.sync().unwrap();
        let end = wal.position();
        drop(wal);
        let (wal, recovery) = WalWriter::open(&dir, 1 << 20).unwrap();
        assert_eq!((wal.position(), recovery.truncated_bytes), (end, 0));
        let scan = read(&dir, 0, end, 1 << 20, Scan::default()).unwrap();
        let firsts: Vec<u8> = scan.blocks.iter().map(|b| scan.payload(b)[0]).collect();
        assert_eq!(firsts, [1, 2, 4]);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_interrupted_preparation_is_removed_and_a_prepared_file_is_not_a_segment() {
        let dir = temp_dir("interrupted");
        write_blocks(&dir, 3, 1 << 20);
        fs::write(dir.join(PREPARING_SEGMENT), [0u8; 100]).unwrap();
        fs::write(dir.join(PREPARED_SEGMENT), [0u8; 100]).unwrap();
        let (_wal, _) = WalWriter::open(&dir, 1 << 20).unwrap();
        assert!(!dir.join(PREPARING_SEGMENT).exists());
        assert!(dir.join(PREPARED_SEGMENT).exists());
        assert_eq!(segments(&dir).unwrap(), [0]);
        assert_eq!(oldest_position(&dir).unwrap(), 0);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn without_a_prepared_segment_a_roll_creates_one() {
        let dir = temp_dir("unprepared");
        let positions = write_blocks(&dir, 50, 500);
        assert!(segments(&dir).unwrap().len() > 3);
        assert!(!dir.join(PREPARED_SEGMENT).exists());
        let (quantities, _) = read_all(&dir, *positions.last().unwrap());
        assert_eq!(quantities.len(), 50);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_segment_written_in_big_groups_does_not_ask_for_the_next() {
        let dir = temp_dir("big-groups");
        let segment = 8 * PREPARE_BELOW_GROUP_BYTES;
        let (mut wal, _) = WalWriter::open(&dir, segment).unwrap();
        wal.prepare_segments_ahead().unwrap();
        let big = vec![7u8; usize::try_from(PREPARE_BELOW_GROUP_BYTES).unwrap() + 1];
        let fill_in_big_groups_past_half = |wal: &mut WalWriter| {
            while wal.position() - wal.segment_start <= segment / 2 {
                wal.append(std::slice::from_ref(&big)).unwrap();
            }
        };
        fill_in_big_groups_past_half(&mut wal);
        assert!(!wal.next_wanted, "big groups: nothing asked for");
        // One small group brings the mean under the bound: the mean decides, not one group.
        wal.append(&[vec![1u8; 1000]]).unwrap();
        assert!(wal.next_wanted);
        wait_for_prepared(&dir);
        while wal.position() < segment {
            wal.append(&[vec![1u8; 1000]]).unwrap();
        }
        // The roll takes the prepared file; this second segment gets big groups only.
        wal.append(std::slice::from_ref(&big)).unwrap();
        let second = wal.segment_start;
        assert!(second > 0);
        assert_eq!(
            fs::metadata(dir.join(segment_name(second))).unwrap().len(),
            segment
        );
        fill_in_big_groups_past_half(&mut wal);
        assert!(!wal.next_wanted, "big groups: nothing asked for");
        while wal.position() - second < segment {
            wal.append(std::slice::from_ref(&big)).unwrap();
        }
        wal.append(&[vec![1u8; 100]]).unwrap();
        let third = wal.segment_start;
        assert_eq!(segments(&dir).unwrap(), [0, second, third]);
        assert_eq!(
            fs::metadata(dir.join(segment_name(third))).unwrap().len(),
            wal.position() - third,
            "created, not prepared: the file holds only what was written"
        );
        drop(wal);
        assert!(!dir.join(PREPARED_SEGMENT).exists());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_zero_tail_is_found_page_by_page_and_byte_by_byte() {
        assert_eq!(without_zero_tail(&[]), 0);
        assert_eq!(without_zero_tail(&[0; 10_000]), 0);
        let mut bytes = vec![0u8; 3 * 4096 + 17];
        bytes[4095] = 1;
        assert_eq!(without_zero_tail(&bytes), 4096);
        bytes[2 * 4096 + 5] = 9;
        assert_eq!(without_zero_tail(&bytes), 2 * 4096 + 6);
        bytes[3 * 4096 + 16] = 3;
        assert_eq!(without_zero_tail(&bytes), bytes.len());
    }
}
