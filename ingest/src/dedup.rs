//! Duplicate detection of client event ids: a record whose `(customer, event_id)` was
//! accepted within the window is answered as a duplicate and counted once. The table is
//! exact (no false positives) and bounded in bytes.
//!
//! # Exact
//!
//! An id is answered `Duplicate` or `InFlight` only when the table holds an entry whose
//! customer and event id are *byte for byte* those of the record. Hashes only choose where
//! to look (the shard, the first index slot, an 8-bit tag that skips most non-matching
//! slots); every candidate is then compared in full against the stored bytes. So a hash
//! collision costs one more comparison, never a record: the false-positive rate is zero, by
//! construction, whatever the hash (the unit test `a_degenerate_hash_never_merges_ids` maps
//! every id to the same hash and checks thousands of ids). Customers are stored as a `u32`
//! index into an exact string map, so equal indexes mean equal customer ids. A canonical
//! lowercase hyphenated UUID id (36 characters, as SDKs generate them) is stored packed in
//! 16 bytes under its own tag byte; the packing is a bijection on those strings, and every
//! other id, including an uppercase or mixed-case UUID, is stored as its raw bytes under
//! its length, so two stored forms are equal exactly when the ids are. A batch spots an id
//! repeated within itself by the exact [`Ticket`] the table gives back, not by a hash.
//!
//! # Bounded in bytes
//!
//! `APEX_DEDUP_MAX_BYTES` (default 128 MiB) is the budget; all memory is allocated when the
//! table is made and never grows, never rehashes, and never frees an entry one by one. Every
//! page is written once when the table is made (pre-faulted), so the memory is resident from
//! the start and the process's RSS does not climb as the table fills; a memory limit too
//! small for the budget fails at start, not hours into traffic. At the default 128 MiB that
//! takes about 40 to 65 ms (measured on a 2-core machine, in a debug build and in an
//! optimised one alike: the cost is the kernel's page faults, not the loop). The
//! table has 64 shards, each behind its own lock, and each shard 4 *generations* of equal
//! size. A generation is one buffer: an index of 4-byte slots (an 8-bit tag and the entry's
//! offset plus one; 0 is free), then an arena of entries, each
//! `[stamp u32][customer u32][length or tag u8][event id]`:
//!
//! - an entry is 9 bytes plus the id (16 for a packed UUID; validated ids are 1 to
//!   [`MAX_EVENT_ID_BYTES`] bytes, so the length fits a byte and 255 is free for the tag);
//! - the index is at most 80 % full (linear probing), so it costs 4 / 0.8 = 5 bytes an id;
//! - an id of `L` stored bytes thus takes `L + 14` bytes, and the split between index and
//!   arena is fitted, each time a generation is reused, to the mean entry size of the
//!   generation that just filled, so either runs out at about the same time.
//!
//! 63/64 of the budget goes to the generations, less the shard headers (about 21 KB); the
//! last 1/64 holds the customer index, about 60 bytes a customer (2 MiB, some 30,000
//! customers, at the default). The customer index grows with the customers the edge serves
//! (not with traffic): past its share, which is the only way to exceed the budget,
//! [`Dedup::allocated_bytes`] and `apex_ingest_dedup_bytes` show it.
//!
//! Ids held when full ≈ budget × 63/64 ÷ (L + 14). New ids go to the newest generation;
//! when it is full, the oldest generation is emptied (its allocation kept) and becomes the
//! newest, so between 3/4 and all of the ids that fit are retained:
//!
//! | at 128 MiB | bytes an id | ids held when full | retained at least |
//! |---|---|---|---|
//! | harness id `lt-0123456789abcdef-12-345` (26 bytes) | 40 | 3.30 M | 2.48 M |
//! | UUID, raw (36 bytes: uppercase or mixed case) | 50 | 2.64 M | 1.98 M |
//! | UUID, lowercase canonical (packed in 16 bytes) | 30 | 4.40 M | 3.30 M |
//!
//! `APEX_DEDUP_CAPACITY` (default 8,000,000 ids) stays an upper bound on ids as well:
//! whichever bound is reached first applies, and a small capacity also shrinks the buffers
//! (each generation is then sized for its share of ids at the longest id).
//!
//! # Window
//!
//! `APEX_DEDUP_WINDOW_SECS` (default 24 hours, Stripe's idempotency anchor): an id accepted
//! longer ago reads as absent (its entry stays until its generation is reused). When new ids
//! arrive faster than the table holds them for a whole window, the oldest go first and the
//! *effective window* shrinks to about ids retained ÷ new ids a second: with harness ids at
//! the default budget, 2.48 M to 3.30 M ÷ 10,000/s = 4 to 5.5 minutes (at 1,000/s, 41 to 55
//! minutes), within which a retry is still a duplicate. The ring's granularity is a
//! generation: a reuse drops a quarter of the ids at once, so the window drops by a quarter
//! and grows back as the newest generation fills. Ids dropped while inside the window are
//! counted in `apex_ingest_dedup_evictions_total`, and `apex_ingest_dedup_window_seconds`
//! shows the effective window: how far back every accepted id is still remembered (the
//! configured window until the first drop). Raise `APEX_DEDUP_MAX_BYTES` for a longer one:
//! it scales linearly. "New ids a second" counts every id claimed for the first time,
//! including ids whose records are then refused (503): each takes an entry. Its retries do
//! not: they re-arm that entry (see below) as long as it is in one of the two newest
//! generations.
//!
//! # Pending ids
//!
//! An id is *pending* from the moment a request claims it ([`Claim::New`]) until the sink
//! acknowledges the record ([`Dedup::commit`], which stamps the entry in place) or refuses
//! it ([`Dedup::release`], which marks the entry dead, so a retry is new). A concurrent
//! request with the same id gets [`Claim::InFlight`] (409 `duplicate_in_flight`, retry).
//! A request holds its tickets in a [`PendingIds`] guard from the moment it claims them: if
//! the request ends without committing or releasing them (an early return, a panic), the
//! guard releases them when dropped, so no leaked ticket pins a generation for good.
//!
//! A retry of a refused record re-arms the dead entry in place when it is in the newest or
//! second-newest generation, so refusals under overload do not use up the table. An older
//! generation is left alone (a pending id there would hold back its reuse); the retry is
//! then appended to the newest. Tickets stay exact: the pending stamp carries the entry's
//! re-arm count (mod 256) and so does the ticket, so the refused attempt's ticket cannot
//! commit or release its retry (it could only match again 256 re-arms later, and every
//! ticket is resolved once, long before).
//!
//! A generation holding a pending id is never emptied: the next oldest is reused instead.
//! In the pathological case where every older generation of a shard holds one, a new id of
//! that shard gets [`Claim::Full`] rather than forgetting an id whose record is not yet
//! durable. The edge answers it 503 `dedup_full` (a per-record `dedup_full` in a batch, and
//! 503 for a batch of which nothing else was taken) and counts it in
//! `apex_ingest_dedup_full_total`: retry after `Retry-After`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::names;
use crate::records::MAX_EVENT_ID_BYTES;

/// Shards, each behind its own lock; a power of two (the hash's top bits pick one).
const SHARDS: usize = 64;
/// Generations of a shard: with 4, at least 3/4 of the ids that fit are retained.
const GENERATIONS: usize = 4;
/// Bytes of an entry before its event id: stamp, customer, length or tag.
const ENTRY_HEADER: usize = 9;
/// The longest entry.
const MAX_ENTRY: usize = ENTRY_HEADER + MAX_EVENT_ID_BYTES;
/// Bytes of an index slot.
const SLOT: usize = 4;
/// Low bits of a slot: the entry's offset in the arena, plus one (0 marks a free slot).
const OFFSET_BITS: u32 = 24;
/// A generation's buffer at most, so that its offsets fit [`OFFSET_BITS`].
const MAX_GENERATION_BYTES: usize = 1 << OFFSET_BITS;
/// A generation's buffer at least: two slots and the longest entry, rounded up.
const MIN_GENERATION_BYTES: usize = 256;
/// The mean entry a fresh generation is laid out for (a 27-byte id), until one has filled.
const FIRST_MEAN_ENTRY: usize = 36;
/// Tag of a packed UUID in an entry's length byte; raw ids are never this long.
const PACKED_UUID: u8 = u8::MAX;
const _: () = assert!(MAX_EVENT_ID_BYTES < PACKED_UUID as usize);
/// Stamps from here up are states, not times. `PENDING + k` (k below 256) is a claimed id
/// whose record is not yet durable, and `RELEASED + k` one whose record was refused (a dead
/// entry, skipped by every lookup). `k` counts how often the entry was re-armed (mod 256),
/// so a ticket names one claim exactly, not only one entry. Times cap below `PENDING`:
/// 2^32 - 512 seconds is 136 years.
const PENDING: u32 = u32::MAX - 511;
/// The first released stamp: see [`PENDING`].
const RELEASED: u32 = u32::MAX - 255;
/// Share of the budget kept for the customer index: 1/64.
const CUSTOMER_SHARE: usize = 64;

/// The smallest budget, in bytes: 1 MiB (about 100 ids a generation).
pub const MIN_MAX_BYTES: usize = 1 << 20;
/// The largest budget, in bytes: 4 GiB, every generation at its largest (just under 16 MiB,
/// as 1/64 goes to the customer index; the default id capacity binds long before).
pub const MAX_MAX_BYTES: usize = SHARDS * GENERATIONS * MAX_GENERATION_BYTES;

/// The outcome of claiming an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// First time seen (or expired): the record goes on, and the caller must later commit or
    /// release the ticket.
    New(Ticket),
    /// Accepted before, within the window.
    Duplicate,
    /// Held by a request not yet acknowledged: the ticket that request holds (a batch
    /// recognises its own earlier record with the same id by it).
    InFlight(Ticket),
    /// No room to hold the id pending: every generation that could be reused still holds
    /// an id in flight. Nothing is wrong with the id: the edge answers 503 `dedup_full`
    /// (retry after `Retry-After`), not a conflict.
    Full,
}

/// A claimed id's place in the table, to commit or release it. Tickets are exact: a stale
/// one (committed, released, or of a reused generation) changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ticket {
    epoch: u64,
    offset: u32,
    shard: u16,
    generation: u8,
    /// Which claim of the entry: its pending stamp is `PENDING + arm`.
    arm: u8,
}

impl Ticket {
    /// The ticket of an id the table cannot store (longer than [`MAX_EVENT_ID_BYTES`], which
    /// validation refuses first): committing or releasing it does nothing.
    const UNTRACKED: Ticket = Ticket {
        epoch: u64::MAX,
        offset: 0,
        shard: 0,
        generation: 0,
        arm: 0,
    };
}

/// Tickets claimed by one request and not yet resolved. Dropping the guard releases every
/// ticket it still holds, so a request that ends early (an error path, a panic between the
/// claim and the sink's answer) never leaves an id pending: a pending id pins its whole
/// generation, and three pinned generations make a shard answer [`Claim::Full`].
pub struct PendingIds {
    dedup: Arc<Dedup>,
    tickets: Vec<Ticket>,
}

impl PendingIds {
    /// An empty guard over `dedup`.
    pub fn new(dedup: Arc<Dedup>) -> Self {
        Self {
            dedup,
            tickets: Vec::new(),
        }
    }

    /// Holds the ticket of a [`Claim::New`].
    pub fn push(&mut self, ticket: Ticket) {
        self.tickets.push(ticket);
    }

    /// Tickets held.
    pub fn len(&self) -> usize {
        self.tickets.len()
    }

    /// True when no ticket is held.
    pub fn is_empty(&self) -> bool {
        self.tickets.is_empty()
    }

    /// Commits every ticket held ([`Dedup::commit`]): the records are durable.
    pub fn commit(mut self) {
        self.dedup.commit(&std::mem::take(&mut self.tickets));
    }

    /// Releases every ticket held ([`Dedup::release`]): the records were refused.
    pub fn release(mut self) {
        self.dedup.release(&std::mem::take(&mut self.tickets));
    }
}

impl Drop for PendingIds {
    fn drop(&mut self) {
        if !self.tickets.is_empty() {
            self.dedup.release(&self.tickets);
        }
    }
}

/// A customer as the table stores it: an index into its exact customer map. Get it once a
/// request with [`Dedup::customer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Customer(u32);

/// The hash of an encoded id: `(seed, customer, tag, bytes)`. Only placement depends on it.
type HashFn = fn(u64, u32, u8, &[u8]) -> u64;

/// Seeded xxh3: a client cannot aim ids at one slot without the process's random seed.
fn xxh3_hash(seed: u64, customer: u32, tag: u8, bytes: &[u8]) -> u64 {
    let who = ((u64::from(customer) << 8) | u64::from(tag)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    xxh3_64_with_seed(bytes, seed ^ who)
}

/// An event id as stored: its tag (the length, or [`PACKED_UUID`]) and its bytes.
struct StoredId<'a> {
    tag: u8,
    packed: [u8; 16],
    raw: &'a [u8],
}

impl<'a> StoredId<'a> {
    /// `None` for an id longer than [`MAX_EVENT_ID_BYTES`].
    fn new(event_id: &'a str) -> Option<Self> {
        let raw = event_id.as_bytes();
        if let Some(packed) = pack_uuid(raw) {
            return Some(Self {
                tag: PACKED_UUID,
                packed,
                raw: &[],
            });
        }
        let tag = u8::try_from(raw.len())
            .ok()
            .filter(|&n| usize::from(n) <= MAX_EVENT_ID_BYTES)?;
        Some(Self {
            tag,
            packed: [0; 16],
            raw,
        })
    }

    fn bytes(&self) -> &[u8] {
        if self.tag == PACKED_UUID {
            &self.packed
        } else {
            self.raw
        }
    }

    fn entry_len(&self) -> usize {
        ENTRY_HEADER + self.bytes().len()
    }
}

/// Bytes of the id behind a tag.
fn id_len(tag: u8) -> usize {
    if tag == PACKED_UUID {
        16
    } else {
        usize::from(tag)
    }
}

/// Hyphen positions of a canonical UUID.
fn is_hyphen_position(i: usize) -> bool {
    matches!(i, 8 | 13 | 18 | 23)
}

/// The 16 bytes of a canonical lowercase hyphenated UUID (`8-4-4-4-12` hex digits), or
/// `None` for any other string (uppercase hex included), so packing is one to one.
fn pack_uuid(id: &[u8]) -> Option<[u8; 16]> {
    if id.len() != 36 {
        return None;
    }
    let mut out = [0u8; 16];
    let mut nibble = 0;
    for (i, &c) in id.iter().enumerate() {
        if is_hyphen_position(i) {
            if c != b'-' {
                return None;
            }
            continue;
        }
        let value = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => return None,
        };
        out[nibble / 2] |= if nibble % 2 == 0 { value << 4 } else { value };
        nibble += 1;
    }
    Some(out)
}

/// The UUID text of packed bytes: the inverse of [`pack_uuid`].
#[cfg(test)]
fn unpack_uuid(packed: &[u8; 16]) -> String {
    let hex = b"0123456789abcdef";
    let mut out = String::with_capacity(36);
    let mut nibbles = packed.iter().flat_map(|b| [b >> 4, b & 15]);
    for i in 0..36 {
        if is_hyphen_position(i) {
            out.push('-');
        } else if let Some(n) = nibbles.next() {
            out.push(char::from(hex[usize::from(n)]));
        }
    }
    out
}

/// The little-endian `u32` at `at` (one load, one bounds check).
fn read_u32(buf: &[u8], at: usize) -> u32 {
    let mut word = [0; 4];
    word.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(word)
}

fn slot_tag(hash: u64) -> u32 {
    // Bits 50 to 57: apart from the shard (58 to 63) and the first slot (0 to 31).
    ((hash >> 50) & 0xff) as u32
}

/// The index slots and the entries taken by a generation of `bytes` for entries of
/// `mean_entry` bytes: slots × 4 + slots × 0.8 × mean = bytes (at most 80 % of the slots are
/// used), with at most `cap` entries, always leaving room for the longest entry.
fn layout(bytes: usize, mean_entry: usize, cap: usize) -> (usize, usize) {
    let for_bytes = bytes * 5 / (SLOT * 5 + mean_entry * 4);
    let for_cap = cap.saturating_mul(5) / 4 + 2;
    let most = (bytes - MAX_ENTRY) / SLOT;
    let slots = for_bytes.min(for_cap).min(most).max(2);
    (slots, (slots * 4 / 5).clamp(1, cap.max(1)))
}

/// Bytes of a memory page, as far as pre-faulting cares: a smaller stride than the real page
/// only writes some pages more than once.
const PAGE: usize = 4096;

/// Writes every page of a freshly allocated buffer once, so the kernel backs all of it now:
/// zeroed memory from the allocator is only address space until it is first written, and the
/// table's resident size would otherwise climb for hours as generations fill (a memory limit
/// too small for the budget would kill the process then, not at start).
fn prefault(buf: &mut [u8]) {
    // Opaque to the optimiser: it knows the allocation is zeroed and would drop stores of 0.
    let buf = std::hint::black_box(buf);
    for page in buf.chunks_mut(PAGE) {
        page[0] = 0;
    }
}

/// One generation: a fixed buffer holding the index slots, then the arena of entries.
struct Generation {
    /// Allocated once; never grows.
    buf: Box<[u8]>,
    /// Index slots at the front of `buf`.
    slots: usize,
    /// Arena bytes written.
    used: usize,
    /// Entries written (dead ones included).
    entries: usize,
    /// Entries this layout takes: 80 % of the slots, or the capacity's share.
    max_entries: usize,
    /// Entries still pending: while any is, the generation is not reused.
    pending: usize,
    /// When it became the newest: the oldest reusable generation has the lowest.
    epoch: u64,
}

impl Generation {
    fn new(bytes: usize, cap: usize, epoch: u64) -> Self {
        let (slots, max_entries) = layout(bytes, FIRST_MEAN_ENTRY, cap);
        let mut buf = vec![0; bytes].into_boxed_slice();
        prefault(&mut buf);
        Self {
            buf,
            slots,
            used: 0,
            entries: 0,
            max_entries,
            pending: 0,
            epoch,
        }
    }

    /// Empties the generation (its buffer kept) and lays it out anew for `mean_entry`.
    fn reset(&mut self, mean_entry: usize, cap: usize, epoch: u64) {
        let (slots, max_entries) = layout(self.buf.len(), mean_entry, cap);
        // Only the index needs zeroing (the old one and the new one): the arena is read
        // only where a slot points.
        self.buf[..self.slots.max(slots) * SLOT].fill(0);
        self.slots = slots;
        self.max_entries = max_entries;
        self.used = 0;
        self.entries = 0;
        self.pending = 0;
        self.epoch = epoch;
    }

    fn slot(&self, i: usize) -> u32 {
        read_u32(&self.buf, i * SLOT)
    }

    fn first_slot(&self, hash: u64) -> usize {
        // The low 32 bits scaled to the slot count (any count, not only powers of two).
        (((hash & 0xffff_ffff) * self.slots as u64) >> 32) as usize
    }

    fn arena(&self) -> &[u8] {
        &self.buf[self.slots * SLOT..]
    }

    fn stamp(&self, offset: usize) -> u32 {
        read_u32(&self.buf, self.slots * SLOT + offset)
    }

    fn set_stamp(&mut self, offset: usize, stamp: u32) {
        let at = self.slots * SLOT + offset;
        self.buf[at..at + 4].copy_from_slice(&stamp.to_le_bytes());
    }

    /// Whether the entry at `offset` is `(customer, id)`, compared in full.
    fn is(&self, offset: usize, customer: u32, id: &StoredId<'_>) -> bool {
        let entry = &self.arena()[offset..];
        let bytes = id.bytes();
        entry[4..8] == customer.to_le_bytes()
            && entry[8] == id.tag
            && &entry[ENTRY_HEADER..ENTRY_HEADER + bytes.len()] == bytes
    }

    /// Where the probe for `hash` starts: the slot's index and content (0 when the
    /// generation is empty, which ends the probe at once).
    fn probe_start(&self, hash: u64) -> (usize, u32) {
        if self.entries == 0 {
            return (0, 0);
        }
        let i = self.first_slot(hash);
        (i, self.slot(i))
    }

    /// The live entry of `(customer, id)`, probing from `start` ([`Generation::probe_start`]):
    /// its offset and stamp. Released entries and entries accepted `window` or more seconds
    /// before `now` are absent; the first released entry of the id met on the way is put in
    /// `dead` (offset and stamp), so a claim can re-arm it instead of appending a copy.
    #[allow(clippy::too_many_arguments)]
    fn find(
        &self,
        start: (usize, u32),
        hash: u64,
        customer: u32,
        id: &StoredId<'_>,
        now: u32,
        window: u32,
        dead: &mut Option<(usize, u32)>,
    ) -> Option<(usize, u32)> {
        let tag = slot_tag(hash);
        let (mut i, mut slot) = start;
        loop {
            if slot == 0 {
                return None;
            }
            if slot >> OFFSET_BITS == tag {
                let offset = (slot & ((1 << OFFSET_BITS) - 1)) as usize - 1;
                if self.is(offset, customer, id) {
                    let stamp = self.stamp(offset);
                    if in_window(stamp, now, window) {
                        return Some((offset, stamp));
                    }
                    if stamp >= RELEASED && dead.is_none() {
                        *dead = Some((offset, stamp));
                    }
                }
            }
            // At most 80 % of the slots are used, so a free one ends every probe.
            i += 1;
            if i == self.slots {
                i = 0;
            }
            slot = self.slot(i);
        }
    }

    fn has_room(&self, entry_len: usize) -> bool {
        self.entries < self.max_entries && self.used + entry_len <= self.arena().len()
    }

    /// Appends an entry and indexes it; the caller checked [`Generation::has_room`].
    fn push(&mut self, hash: u64, customer: u32, id: &StoredId<'_>, stamp: u32) -> usize {
        let offset = self.used;
        let bytes = id.bytes();
        let at = self.slots * SLOT + offset;
        let entry = &mut self.buf[at..at + ENTRY_HEADER + bytes.len()];
        entry[..4].copy_from_slice(&stamp.to_le_bytes());
        entry[4..8].copy_from_slice(&customer.to_le_bytes());
        entry[8] = id.tag;
        entry[ENTRY_HEADER..].copy_from_slice(bytes);
        self.used += ENTRY_HEADER + bytes.len();
        self.entries += 1;
        if is_pending(stamp) {
            self.pending += 1;
        }
        let mut i = self.first_slot(hash);
        while self.slot(i) != 0 {
            i += 1;
            if i == self.slots {
                i = 0;
            }
        }
        // Below 2^24 as the buffer is at most MAX_GENERATION_BYTES.
        let slot = (slot_tag(hash) << OFFSET_BITS) | (offset as u32 + 1);
        self.buf[i * SLOT..i * SLOT + SLOT].copy_from_slice(&slot.to_le_bytes());
        offset
    }

    /// Stamps a released entry again (pending or accepted): the id's retry takes the dead
    /// entry's place instead of a new one.
    fn rearm(&mut self, offset: usize, stamp: u32) {
        self.set_stamp(offset, stamp);
        if is_pending(stamp) {
            self.pending += 1;
        }
    }

    /// The stamps of the entries, in the order they were written.
    fn stamps(&self) -> impl Iterator<Item = u32> + '_ {
        let arena = &self.arena()[..self.used];
        let mut at = 0;
        std::iter::from_fn(move || {
            let entry = arena.get(at..at + ENTRY_HEADER)?;
            at += ENTRY_HEADER + id_len(entry[8]);
            Some(u32::from_le_bytes([entry[0], entry[1], entry[2], entry[3]]))
        })
    }

    /// Mean bytes of the entries written, if any.
    fn mean_entry(&self) -> Option<usize> {
        (self.entries > 0).then(|| self.used.div_ceil(self.entries))
    }
}

/// Whether an id stamped `stamp` still counts at `now`: pending, or accepted within the window.
fn in_window(stamp: u32, now: u32, window: u32) -> bool {
    if stamp >= RELEASED {
        false
    } else if stamp >= PENDING {
        true
    } else {
        now.saturating_sub(stamp) < window
    }
}

/// Whether `stamp` is one of the pending stamps.
fn is_pending(stamp: u32) -> bool {
    (PENDING..RELEASED).contains(&stamp)
}

/// The re-arm count carried by a pending or released stamp.
fn arm_of(stamp: u32) -> u8 {
    // Both ranges are 256 long, so the low byte is the count.
    (stamp.wrapping_sub(PENDING) & 0xff) as u8
}

/// What a shard holds of an id.
enum Found {
    /// A live entry: generation, offset, stamp.
    Live(usize, usize, u32),
    /// No live entry; a released one in the newest or second-newest generation can be
    /// re-armed: generation, offset, stamp.
    Dead(usize, usize, u32),
    /// Nothing usable: a claim appends.
    Absent,
}

struct Shard {
    generations: [Generation; GENERATIONS],
    /// The generation new ids go to.
    newest: usize,
    next_epoch: u64,
    /// The latest stamp of an in-window id a reuse dropped: every id accepted after it is
    /// still here.
    lost_until: Option<u32>,
    /// In-window ids dropped by reuses.
    evicted: u64,
}

impl Shard {
    fn new(generation_bytes: usize, max_entries: usize) -> Self {
        // The last generation starts as the newest; the others, empty, are the oldest.
        Self {
            generations: std::array::from_fn(|g| {
                Generation::new(generation_bytes, max_entries, g as u64)
            }),
            newest: GENERATIONS - 1,
            next_epoch: GENERATIONS as u64,
            lost_until: None,
            evicted: 0,
        }
    }

    /// The live entry of `(customer, id)` in any generation, or else a released one that a
    /// claim may re-arm.
    fn find(&self, hash: u64, customer: u32, id: &StoredId<'_>, now: u32, window: u32) -> Found {
        // The first slot of every generation is read before any is looked at: these loads
        // are independent, so their cache misses overlap instead of adding up (a new id
        // probes all four generations; on a full table this took 15 % off a claim).
        let starts: [(usize, u32); GENERATIONS] =
            std::array::from_fn(|g| self.generations[g].probe_start(hash));
        let mut dead = None;
        // Newest first: retries and concurrent duplicates are usually recent.
        for k in 0..GENERATIONS {
            let g = (self.newest + GENERATIONS - k) % GENERATIONS;
            let generation = &self.generations[g];
            let mut dead_here = None;
            if let Some((offset, stamp)) =
                generation.find(starts[g], hash, customer, id, now, window, &mut dead_here)
            {
                return Found::Live(g, offset, stamp);
            }
            // Only the two newest generations take a re-armed entry: re-arming one in an
            // older generation would pin it (pending) just before it is due for reuse, and
            // stamp it recent where it is dropped first.
            if dead.is_none() && generation.epoch + 2 >= self.next_epoch {
                dead = dead_here.map(|(offset, stamp)| (g, offset, stamp));
            }
        }
        match dead {
            Some((g, offset, stamp)) => Found::Dead(g, offset, stamp),
            None => Found::Absent,
        }
    }

    /// Stores an entry in the newest generation, reusing the oldest one first if it is full.
    /// `None` when no generation can be reused (each holds a pending id).
    fn insert(
        &mut self,
        hash: u64,
        customer: u32,
        id: &StoredId<'_>,
        stamp: u32,
        now: u32,
        table: &Dedup,
    ) -> Option<(usize, usize)> {
        if !self.generations[self.newest].has_room(id.entry_len()) && !self.reuse_oldest(now, table)
        {
            return None;
        }
        let g = self.newest;
        Some((g, self.generations[g].push(hash, customer, id, stamp)))
    }

    /// Empties the oldest generation without pending ids and makes it the newest, laid out
    /// for the mean entry of the generation that just filled. False when there is none.
    fn reuse_oldest(&mut self, now: u32, table: &Dedup) -> bool {
        let Some(oldest) = (0..GENERATIONS)
            .filter(|&g| g != self.newest && self.generations[g].pending == 0)
            .min_by_key(|&g| self.generations[g].epoch)
        else {
            return false;
        };
        let mut dropped = 0u64;
        for stamp in self.generations[oldest].stamps() {
            // Pending ids are not here (the generation has none); released ones are dead.
            if in_window(stamp, now, table.window_secs) {
                dropped += 1;
                self.lost_until = self.lost_until.max(Some(stamp));
            }
        }
        if dropped > 0 {
            self.evicted += dropped;
            metrics::counter!(names::DEDUP_EVICTIONS_TOTAL).increment(dropped);
        }
        let mean = self.generations[self.newest]
            .mean_entry()
            .unwrap_or(FIRST_MEAN_ENTRY)
            .clamp(ENTRY_HEADER + 1, MAX_ENTRY);
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        self.generations[oldest].reset(mean, table.max_entries, epoch);
        self.newest = oldest;
        true
    }

    /// The ticket's pending entry, if the ticket is current: the same generation epoch and
    /// the same claim of the entry (its exact pending stamp).
    fn pending_entry(&mut self, ticket: &Ticket) -> Option<(&mut Generation, usize)> {
        let generation = self.generations.get_mut(usize::from(ticket.generation))?;
        let offset = ticket.offset as usize;
        (generation.epoch == ticket.epoch
            && offset < generation.used
            && generation.stamp(offset) == PENDING + u32::from(ticket.arm))
        .then_some((generation, offset))
    }
}

/// A shard on its own cache lines, so neighbouring locks do not share one.
#[repr(align(64))]
struct PaddedShard(Mutex<Shard>);

/// The dedup table. Share it behind an `Arc`.
pub struct Dedup {
    shards: Box<[PaddedShard]>,
    /// Customer id → its index. Grows with the customers served, never with traffic.
    customers: RwLock<HashMap<Box<str>, u32>>,
    window_secs: u32,
    max_bytes: usize,
    /// Entries a generation takes at most, from the id capacity.
    max_entries: usize,
    seed: u64,
    hash: HashFn,
    started: Instant,
    /// Seconds added to the clock, so tests can move time.
    #[cfg(test)]
    skew: std::sync::atomic::AtomicU32,
}

impl Dedup {
    /// A table remembering ids for `window`, in at most `max_bytes` bytes (clamped to
    /// [`MIN_MAX_BYTES`]..=[`MAX_MAX_BYTES`]) and at most about `max_ids` ids.
    pub fn new(window: Duration, max_bytes: usize, max_ids: usize) -> Self {
        let mut seed = [0u8; 8];
        getrandom::fill(&mut seed).expect("the OS random source is unavailable");
        Self::with_hash(
            window,
            max_bytes,
            max_ids,
            u64::from_le_bytes(seed),
            xxh3_hash,
        )
    }

    fn with_hash(
        window: Duration,
        max_bytes: usize,
        max_ids: usize,
        seed: u64,
        hash: HashFn,
    ) -> Self {
        let max_bytes = max_bytes.clamp(MIN_MAX_BYTES, MAX_MAX_BYTES);
        let headers = std::mem::size_of::<Self>() + SHARDS * std::mem::size_of::<PaddedShard>();
        let for_ids = max_bytes - max_bytes / CUSTOMER_SHARE - headers;
        let max_entries = (max_ids / (SHARDS * GENERATIONS)).max(1);
        // A small id capacity needs less: its share of ids at the longest id, and slots.
        let for_capacity = max_entries.saturating_mul(MAX_ENTRY + SLOT * 5 / 4 + 1) + 2 * SLOT;
        let generation_bytes = (for_ids / (SHARDS * GENERATIONS))
            .min(for_capacity)
            .clamp(MIN_GENERATION_BYTES, MAX_GENERATION_BYTES);
        Self {
            shards: (0..SHARDS)
                .map(|_| PaddedShard(Mutex::new(Shard::new(generation_bytes, max_entries))))
                .collect(),
            customers: RwLock::new(HashMap::new()),
            window_secs: u32::try_from(window.as_secs())
                .unwrap_or(u32::MAX)
                .min(PENDING - 1),
            max_bytes,
            max_entries,
            seed,
            hash,
            started: Instant::now(),
            #[cfg(test)]
            skew: Default::default(),
        }
    }

    /// Seconds since the table was made (monotonic), below [`PENDING`].
    fn now(&self) -> u32 {
        let secs = self.started.elapsed().as_secs();
        #[cfg(test)]
        let secs = secs + u64::from(self.skew.load(std::sync::atomic::Ordering::Relaxed));
        u32::try_from(secs).unwrap_or(u32::MAX).min(PENDING - 1)
    }

    /// The budget, in bytes, after clamping.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// The customer as the table stores it; call once per request.
    pub fn customer(&self, customer_id: &str) -> Customer {
        let read = self.customers.read().unwrap_or_else(|p| p.into_inner());
        if let Some(&index) = read.get(customer_id) {
            return Customer(index);
        }
        drop(read);
        let mut write = self.customers.write().unwrap_or_else(|p| p.into_inner());
        let next = u32::try_from(write.len()).expect("fewer than 2^32 customers");
        Customer(*write.entry(customer_id.into()).or_insert(next))
    }

    fn shard(&self, hash: u64) -> (u16, MutexGuard<'_, Shard>) {
        let index = (hash >> (64 - SHARDS.trailing_zeros())) as usize;
        let shard = self.shards[index]
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        (index as u16, shard)
    }

    fn lock(&self, index: u16) -> Option<MutexGuard<'_, Shard>> {
        let shard = self.shards.get(usize::from(index))?;
        Some(shard.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Claims `event_id` of `customer` for a record about to be submitted.
    pub fn claim(&self, customer: Customer, event_id: &str) -> Claim {
        let Some(id) = StoredId::new(event_id) else {
            return Claim::New(Ticket::UNTRACKED);
        };
        let hash = (self.hash)(self.seed, customer.0, id.tag, id.bytes());
        let now = self.now();
        let (index, mut shard) = self.shard(hash);
        let ticket = |epoch, generation: usize, offset: usize, stamp: u32| Ticket {
            epoch,
            // Offsets are below 2^24, generations below 4.
            offset: offset as u32,
            shard: index,
            generation: generation as u8,
            arm: arm_of(stamp),
        };
        match shard.find(hash, customer.0, &id, now, self.window_secs) {
            Found::Live(g, offset, stamp) if is_pending(stamp) => {
                Claim::InFlight(ticket(shard.generations[g].epoch, g, offset, stamp))
            }
            Found::Live(..) => Claim::Duplicate,
            Found::Dead(g, offset, released) => {
                // A retry of a refused record: its dead entry is claimed again, under the
                // next arm count, so the refused attempt's ticket stays stale.
                let stamp = PENDING + u32::from(arm_of(released).wrapping_add(1));
                shard.generations[g].rearm(offset, stamp);
                Claim::New(ticket(shard.generations[g].epoch, g, offset, stamp))
            }
            Found::Absent => match shard.insert(hash, customer.0, &id, PENDING, now, self) {
                Some((g, offset)) => {
                    Claim::New(ticket(shard.generations[g].epoch, g, offset, PENDING))
                }
                None => Claim::Full,
            },
        }
    }

    /// Marks claimed ids as accepted, now: their records are durable.
    pub fn commit(&self, tickets: &[Ticket]) {
        let now = self.now();
        for ticket in tickets {
            let Some(mut shard) = self.lock(ticket.shard) else {
                continue;
            };
            if let Some((generation, offset)) = shard.pending_entry(ticket) {
                generation.set_stamp(offset, now);
                generation.pending -= 1;
            }
        }
    }

    /// Forgets claimed ids whose records were refused, so a retry is accepted. Committed
    /// ids stay.
    pub fn release(&self, tickets: &[Ticket]) {
        for ticket in tickets {
            let Some(mut shard) = self.lock(ticket.shard) else {
                continue;
            };
            if let Some((generation, offset)) = shard.pending_entry(ticket) {
                generation.set_stamp(offset, RELEASED + u32::from(ticket.arm));
                generation.pending -= 1;
            }
        }
    }

    /// Remembers an id accepted by an earlier process (replayed from the write-ahead log), as
    /// if it had just been accepted; a full generation is reused as [`Dedup::claim`] does.
    pub fn remember(&self, customer_id: &str, event_id: &str) {
        let customer = self.customer(customer_id);
        let Some(id) = StoredId::new(event_id) else {
            return;
        };
        let hash = (self.hash)(self.seed, customer.0, id.tag, id.bytes());
        let now = self.now();
        let (_, mut shard) = self.shard(hash);
        match shard.find(hash, customer.0, &id, now, self.window_secs) {
            Found::Live(..) => {}
            Found::Dead(g, offset, _) => shard.generations[g].rearm(offset, now),
            Found::Absent => {
                shard.insert(hash, customer.0, &id, now, now, self);
            }
        }
    }

    /// Ids that count now (pending, or accepted within the window). Reads every entry: for
    /// the minute's sweep and tests.
    pub fn len(&self) -> usize {
        let now = self.now();
        self.shards
            .iter()
            .map(|shard| {
                let shard = shard.0.lock().unwrap_or_else(|p| p.into_inner());
                shard
                    .generations
                    .iter()
                    .flat_map(Generation::stamps)
                    .filter(|&stamp| in_window(stamp, now, self.window_secs))
                    .count()
            })
            .sum()
    }

    /// True when no id counts.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes allocated, from the allocations' real sizes: the generations' buffers, the
    /// shard headers, and the customer index (its table's buckets and its strings).
    pub fn allocated_bytes(&self) -> usize {
        let buffers: usize = self
            .shards
            .iter()
            .map(|shard| {
                let shard = shard.0.lock().unwrap_or_else(|p| p.into_inner());
                shard.generations.iter().map(|g| g.buf.len()).sum::<usize>()
            })
            .sum();
        let headers = std::mem::size_of::<Self>() + std::mem::size_of_val(&*self.shards);
        buffers + headers + self.customer_bytes()
    }

    /// The customer index's bytes: the table's buckets (entries and control bytes, as
    /// hashbrown lays them out for its capacity) and the strings.
    fn customer_bytes(&self) -> usize {
        let customers = self.customers.read().unwrap_or_else(|p| p.into_inner());
        let capacity = customers.capacity();
        let buckets = match capacity {
            0 => 0,
            c if c < 8 => (c + 1).next_power_of_two(),
            c => (c * 8 / 7).next_power_of_two(),
        };
        let table = if buckets == 0 {
            0
        } else {
            buckets * (std::mem::size_of::<(Box<str>, u32)>() + 1) + 16
        };
        table + customers.keys().map(|k| k.len()).sum::<usize>()
    }

    /// How far back every accepted id is still remembered: the window, or less after the
    /// budget made the table drop ids inside it (then the age of the latest one dropped).
    pub fn effective_window(&self) -> Duration {
        let now = self.now();
        let lost = self
            .shards
            .iter()
            .filter_map(|shard| shard.0.lock().unwrap_or_else(|p| p.into_inner()).lost_until)
            .max();
        let secs = match lost {
            Some(stamp) => now.saturating_sub(stamp).min(self.window_secs),
            None => self.window_secs,
        };
        Duration::from_secs(u64::from(secs))
    }

    /// In-window ids dropped to make room, since the table was made.
    pub fn evictions(&self) -> u64 {
        self.shards
            .iter()
            .map(|shard| shard.0.lock().unwrap_or_else(|p| p.into_inner()).evicted)
            .sum()
    }

    /// Sets the table's gauges (ids, bytes, effective window); run every minute. Nothing
    /// needs removing: expired ids read as absent and go when their generation is reused.
    pub fn sweep(&self) {
        metrics::gauge!(names::DEDUP_IDS).set(self.len() as f64);
        metrics::gauge!(names::DEDUP_BYTES).set(self.allocated_bytes() as f64);
        metrics::gauge!(names::DEDUP_WINDOW_SECONDS).set(self.effective_window().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);
    const MIB: usize = 1 << 20;

    /// The load harness's id shape: 26 bytes.
    fn harness_id(n: u64) -> String {
        format!("lt-{n:016x}-12-345")
    }

    fn new_ticket(claim: Claim) -> Ticket {
        match claim {
            Claim::New(ticket) => ticket,
            other => panic!("expected New, got {other:?}"),
        }
    }

    fn accept(dedup: &Dedup, customer: Customer, id: &str) {
        dedup.commit(&[new_ticket(dedup.claim(customer, id))]);
    }

    fn skip(dedup: &Dedup, secs: u32) {
        dedup
            .skew
            .fetch_add(secs, std::sync::atomic::Ordering::Relaxed);
    }

    #[test]
    fn an_id_is_new_then_in_flight_then_duplicate() {
        let dedup = Dedup::new(HOUR, MIN_MAX_BYTES, 1000);
        let a = dedup.customer("cus_a");
        let ticket = new_ticket(dedup.claim(a, "e1"));
        // The holder's own ticket: how a batch knows its own earlier record.
        assert_eq!(dedup.claim(a, "e1"), Claim::InFlight(ticket));
        dedup.commit(&[ticket]);
        assert_eq!(dedup.claim(a, "e1"), Claim::Duplicate);
        // Another customer's identical id is independent.
        assert!(matches!(
            dedup.claim(dedup.customer("cus_b"), "e1"),
            Claim::New(_)
        ));
        assert_eq!(dedup.customer("cus_a"), a);
    }

    #[test]
    fn released_ids_can_be_claimed_again_but_committed_ones_stay() {
        let dedup = Dedup::new(HOUR, MIN_MAX_BYTES, 1000);
        let a = dedup.customer("cus_a");
        let first = new_ticket(dedup.claim(a, "e1"));
        dedup.release(&[first]);
        let second = new_ticket(dedup.claim(a, "e1"));
        // A stale ticket changes nothing: the retry's claim stands.
        dedup.release(&[first]);
        dedup.commit(&[first]);
        assert_eq!(dedup.claim(a, "e1"), Claim::InFlight(second));
        dedup.commit(&[second]);
        dedup.release(&[second]);
        assert_eq!(dedup.claim(a, "e1"), Claim::Duplicate);
    }

    #[test]
    fn refused_retries_reuse_their_entry_and_evict_nothing() {
        // One shard for every id, and the smallest table: about 100 entries a generation,
        // so 10,000 appended copies would turn the shard over a hundred times.
        let dedup = Dedup::with_hash(HOUR, MIN_MAX_BYTES, 8_000_000, 0, |_, _, _, _| 0);
        let a = dedup.customer("cus_a");
        accept(&dedup, a, "committed-earlier");
        let mut previous = None;
        for _ in 0..10_000 {
            let ticket = new_ticket(dedup.claim(a, "refused-and-retried"));
            assert_eq!(
                dedup.claim(a, "refused-and-retried"),
                Claim::InFlight(ticket)
            );
            if let Some(stale) = previous {
                // The refused attempt's ticket names that attempt only, not its retry.
                assert_ne!(stale, ticket);
                dedup.commit(&[stale]);
                dedup.release(&[stale]);
                assert_eq!(
                    dedup.claim(a, "refused-and-retried"),
                    Claim::InFlight(ticket)
                );
            }
            dedup.release(&[ticket]);
            previous = Some(ticket);
        }
        assert_eq!(dedup.evictions(), 0);
        assert_eq!(dedup.claim(a, "committed-earlier"), Claim::Duplicate);
        let shard = dedup.shards[0].0.lock().unwrap();
        let entries: usize = shard.generations.iter().map(|g| g.entries).sum();
        assert_eq!(entries, 2, "one entry an id");
        drop(shard);
        // The last retry is accepted: a duplicate from then on.
        accept(&dedup, a, "refused-and-retried");
        assert_eq!(dedup.claim(a, "refused-and-retried"), Claim::Duplicate);
        assert_eq!(dedup.len(), 2);
    }

    #[test]
    fn a_released_id_in_an_older_generation_is_appended_anew() {
        let dedup = Dedup::with_hash(HOUR, MIN_MAX_BYTES, 8_000_000, 0, |_, _, _, _| 0);
        let a = dedup.customer("cus_a");
        let refused = new_ticket(dedup.claim(a, "old"));
        dedup.release(&[refused]);
        // Two reuses: the dead entry's generation is now third newest.
        let epoch = dedup.shards[0].0.lock().unwrap().next_epoch;
        let mut n = 0;
        while dedup.shards[0].0.lock().unwrap().next_epoch < epoch + 2 {
            accept(&dedup, a, &harness_id(n));
            n += 1;
        }
        let retry = new_ticket(dedup.claim(a, "old"));
        assert_ne!(retry.generation, refused.generation);
        // The stale ticket of the older generation changes nothing.
        dedup.commit(&[refused]);
        assert_eq!(dedup.claim(a, "old"), Claim::InFlight(retry));
        dedup.commit(&[retry]);
        assert_eq!(dedup.claim(a, "old"), Claim::Duplicate);
    }

    #[test]
    fn a_claim_left_unresolved_is_released_when_its_guard_drops() {
        let dedup = Arc::new(Dedup::with_hash(
            HOUR,
            MIN_MAX_BYTES,
            8_000_000,
            0,
            |_, _, _, _| 0,
        ));
        let a = dedup.customer("cus_a");
        let pinned = |dedup: &Dedup| -> usize {
            let shard = dedup.shards[0].0.lock().unwrap();
            shard.generations.iter().map(|g| g.pending).sum()
        };
        // A request panics between its claims and the sink's answer.
        let request = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut ids = PendingIds::new(dedup.clone());
            for id in ["lost-1", "lost-2"] {
                ids.push(new_ticket(dedup.claim(a, id)));
            }
            assert_eq!(ids.len(), 2);
            assert_eq!(pinned(&dedup), 2);
            panic!("a fault between the claim and the sink");
        }));
        assert!(request.is_err());
        // Nothing stays pending: the ids are new to a retry, and no generation is pinned.
        assert_eq!(pinned(&dedup), 0);
        let mut ids = PendingIds::new(dedup.clone());
        ids.push(new_ticket(dedup.claim(a, "lost-1")));
        ids.commit();
        assert_eq!(dedup.claim(a, "lost-1"), Claim::Duplicate);
        // Generations turn over freely: never Full.
        for n in 0..5_000 {
            accept(&dedup, a, &harness_id(n));
        }
        assert!(dedup.evictions() > 0);
        // A committed guard releases nothing when dropped; an explicit release does.
        let mut ids = PendingIds::new(dedup.clone());
        ids.push(new_ticket(dedup.claim(a, "refused")));
        ids.release();
        assert!(matches!(dedup.claim(a, "refused"), Claim::New(_)));
        assert!(PendingIds::new(dedup.clone()).is_empty());
    }

    #[test]
    fn customers_and_ids_do_not_run_together() {
        let dedup = Dedup::new(HOUR, MIN_MAX_BYTES, 1000);
        accept(&dedup, dedup.customer("ab"), "c");
        assert!(matches!(
            dedup.claim(dedup.customer("a"), "bc"),
            Claim::New(_)
        ));
        assert_eq!(dedup.claim(dedup.customer("ab"), "c"), Claim::Duplicate);
    }

    #[test]
    fn a_degenerate_hash_never_merges_ids() {
        // Every id hashes to 0: one shard, one probe sequence, one slot tag. Only the full
        // comparison tells ids apart, so this is the zero false-positive proof.
        let dedup = Dedup::with_hash(HOUR, 64 * MIB, 8_000_000, 0, |_, _, _, _| 0);
        let customers = [
            dedup.customer("cus_a"),
            dedup.customer("cus_b"),
            dedup.customer("cus_ab"),
        ];
        let mut ids: Vec<String> = (0..1_000).map(harness_id).collect();
        // Prefixes of one another, and the empty id.
        ids.extend((0..=40).map(|n| "x".repeat(n)));
        // Canonical UUIDs (stored packed), the same in uppercase (stored raw), and the
        // 16-byte string equal to a packed UUID's bytes.
        ids.extend((0..100).map(|n| format!("3f1c2a9e-7b7d-4d6b-9a51-{n:012x}")));
        ids.extend((0..100).map(|n| format!("3F1C2A9E-7B7D-4D6B-9A51-{n:012X}")));
        ids.push("61626364-6566-6768-696a-6b6c6d6e6f70".to_owned());
        ids.push("abcdefghijklmnop".to_owned());
        let mut tickets = Vec::new();
        for customer in customers {
            for id in &ids {
                tickets.push(new_ticket(dedup.claim(customer, id)));
            }
        }
        assert_eq!(tickets.len(), 3 * ids.len());
        // Pending: each id is held by its own ticket.
        let mut held = tickets.iter();
        for customer in customers {
            for id in &ids {
                assert_eq!(
                    dedup.claim(customer, id),
                    Claim::InFlight(*held.next().unwrap())
                );
            }
        }
        dedup.commit(&tickets);
        for customer in customers {
            for id in &ids {
                assert_eq!(dedup.claim(customer, id), Claim::Duplicate, "{id}");
            }
        }
        assert_eq!(dedup.evictions(), 0);
        assert_eq!(dedup.len(), 3 * ids.len());
    }

    #[test]
    fn a_degenerate_hash_never_merges_ids_across_wrap_around_and_reuse() {
        // Every id hashes to 0xffff_ffff: one shard, one slot tag, and the last slot as every
        // probe's first, so each probe wraps around at once. In the smallest table the
        // shard's generations turn over every few dozen ids, so lookups cross generations,
        // reuse them, re-fit them to mixed id sizes and re-arm refused ids.
        let dedup = Dedup::with_hash(HOUR, MIN_MAX_BYTES, 8_000_000, 0, |_, _, _, _| 0xffff_ffff);
        {
            let shard = dedup.shards[0].0.lock().unwrap();
            let newest = &shard.generations[shard.newest];
            assert_eq!(newest.first_slot(0xffff_ffff), newest.slots - 1);
        }
        let customers = [dedup.customer("cus_a"), dedup.customer("cus_b")];
        let who = |n: u64| customers[(n % 2) as usize];
        let id = |n: u64| match n % 4 {
            0 => harness_id(n),
            1 => format!("3f1c2a9e-7b7d-4d6b-9a51-{n:012x}"),
            2 => format!("3F1C2A9E-7B7D-4D6B-9A51-{n:012X}"),
            _ => format!("{n:0>128}"),
        };
        let total = 3_000u64;
        for n in 0..total {
            // Never seen before: new, whatever the table holds.
            let ticket = new_ticket(dedup.claim(who(n), &id(n)));
            if n % 5 == 0 {
                // The same bytes for the other customer are another id (refused here).
                let other = new_ticket(dedup.claim(who(n + 1), &id(n)));
                dedup.release(&[other]);
            }
            if n % 7 == 0 {
                // Refused, then retried: the retry re-arms the entry; the old ticket is stale.
                dedup.release(&[ticket]);
                let retry = new_ticket(dedup.claim(who(n), &id(n)));
                dedup.commit(&[ticket]);
                assert_eq!(dedup.claim(who(n), &id(n)), Claim::InFlight(retry));
                dedup.commit(&[retry]);
            } else {
                dedup.commit(&[ticket]);
            }
            if n % 10 == 0 {
                // The latest ids are duplicates, whatever generation holds them.
                for m in n.saturating_sub(30)..=n {
                    assert_eq!(dedup.claim(who(m), &id(m)), Claim::Duplicate, "{m} at {n}");
                }
            }
        }
        let reuses = dedup.shards[0].0.lock().unwrap().next_epoch - GENERATIONS as u64;
        assert!(reuses > 20, "{reuses} reuses");
        assert!(dedup.evictions() > 0);
        // The first ids went with their generations: new again, never a false duplicate.
        for m in 0..100 {
            assert!(matches!(dedup.claim(who(m), &id(m)), Claim::New(_)), "{m}");
        }
    }

    #[test]
    fn uuids_pack_exactly_and_reversibly() {
        let id = "3f1c2a9e-7b7d-4d6b-9a51-0c2f6f1e8b11";
        let packed = pack_uuid(id.as_bytes()).unwrap();
        assert_eq!(unpack_uuid(&packed), id);
        for not_canonical in [
            "3F1C2A9E-7B7D-4D6B-9A51-0C2F6F1E8B11",
            "3f1c2a9e-7b7d-4d6b-9a51-0c2f6f1e8B11",
            "3f1c2a9e7b7d-4d6b-9a51-0c2f6f1e8b11-",
            "3f1c2a9e-7b7d-4d6b-9a51-0c2f6f1e8b1",
            "3f1c2a9e-7b7d-4d6b-9a51-0c2f6f1e8b1g",
        ] {
            assert_eq!(pack_uuid(not_canonical.as_bytes()), None, "{not_canonical}");
        }
        assert_eq!(StoredId::new(id).unwrap().entry_len(), ENTRY_HEADER + 16);
        let longest = "x".repeat(MAX_EVENT_ID_BYTES);
        assert_eq!(StoredId::new(&longest).unwrap().entry_len(), MAX_ENTRY);
        assert!(StoredId::new(&format!("{longest}x")).is_none());
    }

    #[test]
    fn memory_stays_within_the_byte_budget() {
        let dedup = Dedup::new(HOUR, MIN_MAX_BYTES, 8_000_000);
        let customers: Vec<Customer> = (0..20)
            .map(|c| dedup.customer(&format!("cus_loadtest_{c:02}")))
            .collect();
        let start = dedup.allocated_bytes();
        assert!(start <= MIN_MAX_BYTES, "{start} bytes");
        // Every buffer as allocated: its address and its real length.
        let buffers = || -> Vec<(usize, usize)> {
            dedup
                .shards
                .iter()
                .flat_map(|shard| {
                    let shard = shard.0.lock().unwrap();
                    shard
                        .generations
                        .iter()
                        .map(|g| (g.buf.as_ptr() as usize, g.buf.len()))
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        let allocated = buffers();
        // The budget worked out independently: 63/64 of it for 256 equal buffers, less the
        // headers; the buffers take nearly all of that and never more.
        let buffer_bytes: usize = allocated.iter().map(|(_, len)| len).sum();
        let share = (MIN_MAX_BYTES - MIN_MAX_BYTES / 64) / (SHARDS * GENERATIONS);
        assert!(
            allocated
                .iter()
                .all(|&(_, len)| len <= share && len + 128 > share)
        );
        assert!(buffer_bytes <= start && start - buffer_bytes < 64 * 1024);
        // Far past what fits (about 25,000 harness ids), in every id shape.
        let total = 300_000u64;
        for n in 0..total {
            let customer = customers[(n % 20) as usize];
            let id = match n % 3 {
                0 => harness_id(n),
                1 => format!("3f1c2a9e-7b7d-4d6b-9a51-{n:012x}"),
                _ => format!("{n:0>128}"),
            };
            accept(&dedup, customer, &id);
            if n % 10_000 == 0 {
                assert_eq!(dedup.allocated_bytes(), start);
            }
        }
        assert_eq!(dedup.allocated_bytes(), start);
        // Not one buffer was replaced or resized: the same addresses, the same lengths.
        assert_eq!(buffers(), allocated);
        assert!(dedup.evictions() > 250_000, "{}", dedup.evictions());
        // It still works: the latest ids are duplicates, new ones are new.
        for n in total - 500..total {
            let customer = customers[(n % 20) as usize];
            let id = match n % 3 {
                0 => harness_id(n),
                1 => format!("3f1c2a9e-7b7d-4d6b-9a51-{n:012x}"),
                _ => format!("{n:0>128}"),
            };
            assert_eq!(dedup.claim(customer, &id), Claim::Duplicate, "{n}");
        }
        assert!(matches!(
            dedup.claim(customers[0], "never-seen"),
            Claim::New(_)
        ));
    }

    #[test]
    fn the_window_shrinks_gracefully_and_keeps_the_newest_ids() {
        let dedup = Dedup::new(HOUR, MIN_MAX_BYTES, 8_000_000);
        let cus = dedup.customer("cus");
        assert_eq!(dedup.effective_window(), HOUR);
        let (slots, per_generation) = layout(
            dedup.shards[0].0.lock().unwrap().generations[0].buf.len(),
            ENTRY_HEADER + 26,
            dedup.max_entries,
        );
        assert!(
            slots > per_generation && per_generation > 90,
            "{per_generation}"
        );
        let total = 100_000u64;
        for n in 0..total {
            accept(&dedup, cus, &harness_id(n));
        }
        let held = dedup.len();
        let fit = SHARDS * GENERATIONS * per_generation;
        // Between 3/4 of what fits (three full generations a shard) and all of it.
        assert!(held * 4 >= fit * 3 && held <= fit, "{held} of {fit}");
        assert_eq!(dedup.evictions(), total - held as u64);
        // The latest ids are all there: about 150 a shard, below the 3 × 90 kept at least.
        for n in total - 64 * 150..total {
            assert_eq!(dedup.claim(cus, &harness_id(n)), Claim::Duplicate, "{n}");
        }
        // The first were dropped: new again.
        for n in 0..1_000 {
            assert!(matches!(dedup.claim(cus, &harness_id(n)), Claim::New(_)));
        }
        // Ids were dropped this second: nothing older is guaranteed. The horizon then ages
        // back to the configured window.
        assert_eq!(dedup.effective_window(), Duration::ZERO);
        skip(&dedup, 30);
        assert_eq!(dedup.effective_window(), Duration::from_secs(30));
        skip(&dedup, 3600);
        assert_eq!(dedup.effective_window(), HOUR);
    }

    #[test]
    fn memory_stays_bounded_and_pending_ids_survive_eviction() {
        let capacity = 64 * 10;
        let dedup = Dedup::new(HOUR, MIN_MAX_BYTES, capacity);
        let cus = dedup.customer("cus");
        let pending = new_ticket(dedup.claim(cus, "pending"));
        for i in 0..10 * capacity {
            accept(&dedup, cus, &i.to_string());
        }
        assert!(dedup.len() <= capacity + SHARDS, "{} ids kept", dedup.len());
        // The capacity in ids also shrinks the buffers.
        assert!(dedup.allocated_bytes() < MIN_MAX_BYTES / 4);
        assert_eq!(dedup.claim(cus, "pending"), Claim::InFlight(pending));
        dedup.commit(&[pending]);
        assert_eq!(dedup.claim(cus, "pending"), Claim::Duplicate);
    }

    #[test]
    fn pending_ids_are_never_dropped_even_when_nothing_can_be_reused() {
        let dedup = Dedup::new(HOUR, MIN_MAX_BYTES, 8_000_000);
        let cus = dedup.customer("cus");
        let mut tickets = Vec::new();
        let mut full = 0;
        for n in 0..60_000u64 {
            match dedup.claim(cus, &harness_id(n)) {
                Claim::New(ticket) => tickets.push((n, ticket)),
                Claim::Full => full += 1,
                other => panic!("{other:?}"),
            }
        }
        // Every generation of every shard holds pending ids: the rest had to wait.
        assert!(full > 0 && tickets.len() > 20_000, "{full} full");
        assert_eq!(dedup.evictions(), 0);
        for (n, ticket) in &tickets {
            assert_eq!(dedup.claim(cus, &harness_id(*n)), Claim::InFlight(*ticket));
        }
        let tickets: Vec<Ticket> = tickets.into_iter().map(|(_, t)| t).collect();
        dedup.commit(&tickets);
        // Acknowledged, they can go: new ids are taken again.
        for n in 60_000..120_000u64 {
            accept(&dedup, cus, &harness_id(n));
        }
        assert!(dedup.evictions() > 0);
    }

    #[test]
    fn remembered_ids_are_duplicates_and_stay_bounded() {
        let capacity = 64 * 4;
        let dedup = Dedup::new(HOUR, MIN_MAX_BYTES, capacity);
        dedup.remember("cus", "logged");
        dedup.remember("cus", "logged");
        let cus = dedup.customer("cus");
        assert_eq!(dedup.claim(cus, "logged"), Claim::Duplicate);
        for i in 0..10 * capacity {
            dedup.remember("cus", &i.to_string());
        }
        assert!(dedup.len() <= capacity + SHARDS, "{} ids kept", dedup.len());
        assert_eq!(
            dedup.claim(cus, &(10 * capacity - 1).to_string()),
            Claim::Duplicate
        );
    }

    #[test]
    fn expired_ids_are_new_again() {
        let dedup = Dedup::new(Duration::ZERO, MIN_MAX_BYTES, 100);
        let cus = dedup.customer("cus");
        accept(&dedup, cus, "e");
        assert!(matches!(dedup.claim(cus, "e"), Claim::New(_)));

        let dedup = Dedup::new(Duration::from_secs(60), MIN_MAX_BYTES, 100);
        let cus = dedup.customer("cus");
        accept(&dedup, cus, "e");
        skip(&dedup, 59);
        assert_eq!(dedup.claim(cus, "e"), Claim::Duplicate);
        // A pending id does not expire; an accepted one does, after the window.
        let pending = new_ticket(dedup.claim(cus, "p"));
        skip(&dedup, 1);
        assert!(matches!(dedup.claim(cus, "e"), Claim::New(_)));
        assert_eq!(dedup.claim(cus, "p"), Claim::InFlight(pending));
        assert_eq!(dedup.len(), 2);
    }

    #[test]
    fn allocated_bytes_count_the_customer_index() {
        let dedup = Dedup::new(HOUR, 128 * MIB, 8_000_000);
        let empty = dedup.allocated_bytes();
        // 63/64 of it for the generations, the rest for customers.
        assert!(empty <= 128 * MIB - 2 * MIB && empty > 125 * MIB, "{empty}");
        for c in 0..1_000 {
            dedup.customer(&format!("cus_{c:06}"));
        }
        let grown = dedup.allocated_bytes() - empty;
        // 10 bytes of id, 24 of entry and 1 control byte a bucket, 1,792 buckets or more.
        assert!((45_000..100_000).contains(&grown), "{grown}");
        // Its share of the budget holds 30,000 such customers and more.
        assert!(empty + 30 * grown <= 128 * MIB);
    }
}
