//! The KV index: which worker holds which prefix block, fed by the workers' KV events.
//!
//! Block hashes are chained (each names its whole prefix), so the index is a flat
//! map from hash to the set of workers holding that block; no radix tree is needed.
//! A prompt's overlap with a worker is the number of its leading block hashes the
//! worker holds, found by walking the prompt's hashes while intersecting holder sets.
//!
//! Memory: one 16-byte table slot per distinct hash (8-byte key, 8-byte holder set),
//! with up to three holders stored inline and larger sets spilled to a shared arena.
//!
//! Consistency: each worker numbers its events; the index applies them in order,
//! ignores duplicates, and on a gap marks the worker as needing a snapshot. Until a
//! [`KvSnapshot`] arrives the worker's (slightly stale) blocks still count for
//! routing, and its further events are dropped.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use tandem_protocol::{BlockHash, KvEvent, KvEventKind};

use crate::table::BlockTable;

/// A worker's identity as the router knows it.
pub type WorkerId = u64;

/// Internal dense worker number, the unit stored in holder sets.
type Slot = u16;

/// Most workers one index tracks at once.
pub const MAX_WORKERS: usize = Slot::MAX as usize;

/// What went wrong applying an update, in the router's terms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    #[error("worker {0} is not registered with the index")]
    UnknownWorker(WorkerId),
    #[error("worker {0} is already registered with the index")]
    DuplicateWorker(WorkerId),
    #[error("the index already tracks {MAX_WORKERS} workers")]
    TooManyWorkers,
    #[error(
        "worker {worker}: event {got} arrived while {expected} was expected; a snapshot is needed"
    )]
    Gap {
        worker: WorkerId,
        expected: u64,
        got: u64,
    },
}

/// A worker's whole set of cached blocks at a point in its event stream: what the
/// index rebuilds that worker from after a gap.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KvSnapshot {
    /// The sequence number of the first event *not* reflected in `hashes`.
    pub next_seq: u64,
    pub hashes: Vec<BlockHash>,
}

/// What [`KvIndex::apply`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The event was the next one expected and is now reflected.
    Applied,
    /// An event already applied (its `seq` is behind); ignored.
    Duplicate,
    /// The worker awaits a snapshot; events are dropped until then.
    AwaitingSnapshot,
}

/// Whether a worker's blocks in the index follow its event stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncState {
    /// Every event up to `next_seq` applied.
    Live,
    /// A gap was seen; the index waits for a snapshot.
    NeedsSnapshot,
}

#[derive(Debug, Clone)]
struct WorkerEntry {
    id: WorkerId,
    next_seq: u64,
    state: SyncState,
    blocks: usize,
}

/// Up to three holders inline (sorted), else an index into the spill arena (sorted there).
#[derive(Debug, Clone, Copy)]
enum Holders {
    Few { len: u8, slots: [Slot; 3] },
    Many(u32),
}

impl Default for Holders {
    fn default() -> Self {
        Holders::Few {
            len: 0,
            slots: [0; 3],
        }
    }
}

/// A fast hasher for keys that are already uniform 64-bit hashes (xxh3 block hashes):
/// one multiply and a fold, so both the low bits (bucket) and high bits (tag) mix.
#[derive(Default, Clone, Copy)]
pub(crate) struct PrehashedHasher(u64);

impl Hasher for PrehashedHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 29)
    }
}

pub(crate) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<PrehashedHasher>>;

/// Per-worker prefix overlaps of one prompt, with the scratch space to compute them
/// without allocating on every decision.
#[derive(Debug, Default, Clone)]
pub struct Overlaps {
    /// `(worker, leading blocks held)` for every worker holding at least the first block.
    pub scores: Vec<(WorkerId, u32)>,
    active: Vec<Slot>,
    next: Vec<Slot>,
}

/// The router's view of every worker's cached blocks.
#[derive(Debug, Default)]
pub struct KvIndex {
    blocks: BlockTable<Holders>,
    spill: Vec<Vec<Slot>>,
    free_spill: Vec<u32>,
    workers: Vec<Option<WorkerEntry>>,
    slot_of: FastMap<WorkerId, Slot>,
    free_slots: Vec<Slot>,
    /// (worker, block) pairs indexed.
    entries: usize,
}

impl KvIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts tracking a worker whose event stream begins at `seq` 0.
    pub fn add_worker(&mut self, id: WorkerId) -> Result<(), IndexError> {
        if self.slot_of.contains_key(&id) {
            return Err(IndexError::DuplicateWorker(id));
        }
        let entry = WorkerEntry {
            id,
            next_seq: 0,
            state: SyncState::Live,
            blocks: 0,
        };
        let slot = match self.free_slots.pop() {
            Some(s) => s,
            None => {
                if self.workers.len() >= MAX_WORKERS {
                    return Err(IndexError::TooManyWorkers);
                }
                self.workers.push(None);
                (self.workers.len() - 1) as Slot
            }
        };
        self.workers[slot as usize] = Some(entry);
        self.slot_of.insert(id, slot);
        Ok(())
    }

    /// Sizes the table for `blocks` more distinct hashes, so ingestion does not pay
    /// for rehashing as the fleet's caches fill (a router knows their capacities).
    pub fn reserve(&mut self, blocks: usize) {
        self.blocks.reserve(blocks);
    }

    /// Forgets a worker and every block it held; false if it was not tracked.
    pub fn remove_worker(&mut self, id: WorkerId) -> bool {
        let Some(slot) = self.slot_of.remove(&id) else {
            return false;
        };
        self.drop_all_blocks(slot);
        self.workers[slot as usize] = None;
        self.free_slots.push(slot);
        true
    }

    /// Workers tracked, in no particular order.
    pub fn workers(&self) -> impl Iterator<Item = WorkerId> + '_ {
        self.workers.iter().flatten().map(|w| w.id)
    }

    /// A worker's sync state and block count.
    pub fn worker_state(&self, id: WorkerId) -> Option<(SyncState, usize)> {
        let slot = *self.slot_of.get(&id)?;
        self.workers[slot as usize]
            .as_ref()
            .map(|w| (w.state, w.blocks))
    }

    /// Workers whose event streams had a gap and that need a snapshot.
    pub fn needs_snapshot(&self) -> Vec<WorkerId> {
        self.workers
            .iter()
            .flatten()
            .filter(|w| w.state == SyncState::NeedsSnapshot)
            .map(|w| w.id)
            .collect()
    }

    /// (worker, block) pairs indexed.
    pub fn num_entries(&self) -> usize {
        self.entries
    }

    /// Distinct block hashes indexed.
    pub fn num_hashes(&self) -> usize {
        self.blocks.len()
    }

    /// Approximate heap bytes held: the map's table and the spill arena.
    pub fn memory_bytes(&self) -> usize {
        let table = self.blocks.memory_bytes();
        let spill: usize = self
            .spill
            .iter()
            .map(|v| std::mem::size_of::<Vec<Slot>>() + v.capacity() * 2)
            .sum();
        let workers = self.workers.capacity() * std::mem::size_of::<Option<WorkerEntry>>();
        table + spill + workers
    }

    /// Applies one of `worker`'s events in sequence order.
    pub fn apply(&mut self, worker: WorkerId, event: &KvEvent) -> Result<Applied, IndexError> {
        let slot = *self
            .slot_of
            .get(&worker)
            .ok_or(IndexError::UnknownWorker(worker))?;
        let w = self.workers[slot as usize]
            .as_mut()
            .ok_or(IndexError::UnknownWorker(worker))?;
        if w.state == SyncState::NeedsSnapshot {
            return Ok(Applied::AwaitingSnapshot);
        }
        if event.seq < w.next_seq {
            return Ok(Applied::Duplicate);
        }
        if event.seq > w.next_seq {
            let expected = w.next_seq;
            w.state = SyncState::NeedsSnapshot;
            return Err(IndexError::Gap {
                worker,
                expected,
                got: event.seq,
            });
        }
        w.next_seq += 1;
        match &event.kind {
            KvEventKind::Stored { hashes, .. } => {
                for h in hashes {
                    self.insert(slot, h.0);
                }
            }
            KvEventKind::Removed { hashes } => {
                for h in hashes {
                    self.remove(slot, h.0);
                }
            }
            KvEventKind::Cleared => self.drop_all_blocks(slot),
        }
        Ok(Applied::Applied)
    }

    /// Applies a batch of one worker's events in order, as a worker publishes them
    /// after a step. While applying one event it prefetches the table slots of the
    /// events a few places ahead, so their cache misses overlap. Stops at the first
    /// error (a gap), leaving the events before it applied.
    pub fn apply_all(&mut self, worker: WorkerId, events: &[KvEvent]) -> Result<(), IndexError> {
        const AHEAD: usize = 8;
        for (i, event) in events.iter().enumerate() {
            if let Some(next) = events.get(i + AHEAD) {
                match &next.kind {
                    KvEventKind::Stored { hashes, .. } | KvEventKind::Removed { hashes } => {
                        for h in hashes {
                            self.blocks.prefetch(h.0);
                        }
                    }
                    KvEventKind::Cleared => {}
                }
            }
            self.apply(worker, event)?;
        }
        Ok(())
    }

    /// Replaces a worker's blocks with a snapshot and resumes its event stream at
    /// `snapshot.next_seq`.
    pub fn apply_snapshot(
        &mut self,
        worker: WorkerId,
        snapshot: &KvSnapshot,
    ) -> Result<(), IndexError> {
        let slot = *self
            .slot_of
            .get(&worker)
            .ok_or(IndexError::UnknownWorker(worker))?;
        self.drop_all_blocks(slot);
        for h in &snapshot.hashes {
            self.insert(slot, h.0);
        }
        if let Some(w) = self.workers[slot as usize].as_mut() {
            w.next_seq = snapshot.next_seq;
            w.state = SyncState::Live;
        }
        Ok(())
    }

    /// Adds blocks to a worker outside its event stream: for the router's own
    /// predictions of what a worker is about to hold.
    pub(crate) fn insert_predicted(&mut self, worker: WorkerId, hashes: &[BlockHash]) {
        if let Some(&slot) = self.slot_of.get(&worker) {
            for h in hashes {
                self.insert(slot, h.0);
            }
        }
    }

    /// Removes blocks added by [`KvIndex::insert_predicted`].
    pub(crate) fn remove_predicted(&mut self, worker: WorkerId, hashes: &[BlockHash]) {
        if let Some(&slot) = self.slot_of.get(&worker) {
            for h in hashes {
                self.remove(slot, h.0);
            }
        }
    }

    /// The hashes indexed for one worker, sorted (for comparing replicas and tests).
    pub fn worker_hashes(&self, worker: WorkerId) -> Vec<BlockHash> {
        let Some(&slot) = self.slot_of.get(&worker) else {
            return Vec::new();
        };
        let mut out: Vec<BlockHash> = self
            .blocks
            .iter()
            .filter(|(_, h)| self.holders(h).binary_search(&slot).is_ok())
            .map(|(k, _)| BlockHash(k))
            .collect();
        out.sort_unstable();
        out
    }

    /// For each worker holding a prefix of `hashes`, how many leading blocks it holds.
    pub fn overlaps(&self, hashes: &[BlockHash], out: &mut Overlaps) {
        out.scores.clear();
        out.active.clear();
        let Some(first) = hashes.first() else { return };
        match self.blocks.get(first.0) {
            Some(h) => out.active.extend_from_slice(self.holders(h)),
            None => return,
        }
        // Look blocks up a chunk at a time before walking them: the lookups are
        // independent, so the CPU overlaps their cache misses instead of taking one
        // at a time behind the walk's branches.
        const CHUNK: usize = 32;
        let mut found: [Option<&Holders>; CHUNK] = [None; CHUNK];
        for (c, chunk) in hashes.chunks(CHUNK).enumerate() {
            for h in chunk {
                self.blocks.prefetch(h.0);
            }
            for (slot, h) in found.iter_mut().zip(chunk) {
                *slot = self.blocks.get(h.0);
            }
            for (j, entry) in found.iter().enumerate().take(chunk.len()) {
                let i = c * CHUNK + j;
                if i == 0 {
                    continue;
                }
                let holders: &[Slot] = entry.map_or(&[], |h| self.holders(h));
                out.next.clear();
                // Merge of two sorted lists: survivors go on, the rest stop at i blocks.
                let (mut a, mut b) = (0, 0);
                while a < out.active.len() {
                    let s = out.active[a];
                    while b < holders.len() && holders[b] < s {
                        b += 1;
                    }
                    if b < holders.len() && holders[b] == s {
                        out.next.push(s);
                    } else if let Some(w) = &self.workers[s as usize] {
                        out.scores.push((w.id, i as u32));
                    }
                    a += 1;
                }
                std::mem::swap(&mut out.active, &mut out.next);
                if out.active.is_empty() {
                    return;
                }
            }
        }
        for &s in &out.active {
            if let Some(w) = &self.workers[s as usize] {
                out.scores.push((w.id, hashes.len() as u32));
            }
        }
    }

    fn holders<'a>(&'a self, h: &'a Holders) -> &'a [Slot] {
        match h {
            Holders::Few { len, slots } => &slots[..*len as usize],
            Holders::Many(i) => &self.spill[*i as usize],
        }
    }

    fn insert(&mut self, slot: Slot, hash: u64) {
        // One probe: a new hash gets an empty holder set in place.
        let h = self.blocks.entry(hash);
        let added = match *h {
            Holders::Few {
                ref mut len,
                ref mut slots,
            } => {
                let n = *len as usize;
                match slots[..n].binary_search(&slot) {
                    Ok(_) => false,
                    Err(pos) if n < 3 => {
                        slots.copy_within(pos..n, pos + 1);
                        slots[pos] = slot;
                        *len += 1;
                        true
                    }
                    Err(pos) => {
                        let mut v = Vec::with_capacity(4);
                        v.extend_from_slice(&slots[..n]);
                        v.insert(pos, slot);
                        let i = match self.free_spill.pop() {
                            Some(i) => {
                                self.spill[i as usize] = v;
                                i
                            }
                            None => {
                                self.spill.push(v);
                                (self.spill.len() - 1) as u32
                            }
                        };
                        *h = Holders::Many(i);
                        true
                    }
                }
            }
            Holders::Many(i) => {
                let v = &mut self.spill[i as usize];
                match v.binary_search(&slot) {
                    Ok(_) => false,
                    Err(pos) => {
                        v.insert(pos, slot);
                        true
                    }
                }
            }
        };
        if added {
            self.entries += 1;
            if let Some(w) = self.workers[slot as usize].as_mut() {
                w.blocks += 1;
            }
        }
    }

    fn remove(&mut self, slot: Slot, hash: u64) {
        let Some(h) = self.blocks.get_mut(hash) else {
            return;
        };
        let (removed, now_empty) = match h {
            Holders::Few { len, slots } => {
                let n = *len as usize;
                match slots[..n].binary_search(&slot) {
                    Ok(pos) => {
                        slots.copy_within(pos + 1..n, pos);
                        *len -= 1;
                        (true, *len == 0)
                    }
                    Err(_) => (false, false),
                }
            }
            Holders::Many(i) => {
                let i = *i;
                let v = &mut self.spill[i as usize];
                match v.binary_search(&slot) {
                    Ok(pos) => {
                        v.remove(pos);
                        if v.len() <= 3 {
                            let mut slots = [0; 3];
                            slots[..v.len()].copy_from_slice(v);
                            *h = Holders::Few {
                                len: v.len() as u8,
                                slots,
                            };
                            self.spill[i as usize] = Vec::new();
                            self.free_spill.push(i);
                        }
                        (true, false)
                    }
                    Err(_) => (false, false),
                }
            }
        };
        if now_empty {
            self.blocks.remove(hash);
        }
        if removed {
            self.entries -= 1;
            if let Some(w) = self.workers[slot as usize].as_mut() {
                w.blocks -= 1;
            }
        }
    }

    /// Removes `slot` from every holder set: a scan of the whole map, which only
    /// `Cleared`, snapshots and worker removal need.
    fn drop_all_blocks(&mut self, slot: Slot) {
        let held = match self.workers[slot as usize].as_ref() {
            Some(w) => w.blocks,
            None => return,
        };
        if held == 0 {
            return;
        }
        let hashes: Vec<u64> = self
            .blocks
            .iter()
            .filter(|(_, h)| self.holders(h).binary_search(&slot).is_ok())
            .map(|(k, _)| k)
            .collect();
        for h in hashes {
            self.remove(slot, h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    fn stored(seq: u64, hashes: &[u64]) -> KvEvent {
        KvEvent {
            seq,
            kind: KvEventKind::Stored {
                parent: None,
                hashes: hashes.iter().map(|&h| BlockHash(h)).collect(),
            },
        }
    }

    fn removed(seq: u64, hashes: &[u64]) -> KvEvent {
        KvEvent {
            seq,
            kind: KvEventKind::Removed {
                hashes: hashes.iter().map(|&h| BlockHash(h)).collect(),
            },
        }
    }

    fn scores(index: &KvIndex, hashes: &[u64]) -> BTreeMap<WorkerId, u32> {
        let hashes: Vec<BlockHash> = hashes.iter().map(|&h| BlockHash(h)).collect();
        let mut out = Overlaps::default();
        index.overlaps(&hashes, &mut out);
        out.scores.into_iter().collect()
    }

    #[test]
    fn holder_set_is_eight_bytes() {
        assert_eq!(std::mem::size_of::<Holders>(), 8);
    }

    #[test]
    fn overlap_counts_leading_blocks_per_worker() {
        let mut index = KvIndex::new();
        for w in 0..6 {
            index.add_worker(w).expect("new worker");
        }
        // Worker w holds the first w blocks of [1..=5]; more than three holders spill.
        for w in 1..6u64 {
            let hashes: Vec<u64> = (1..=w).collect();
            index.apply(w, &stored(0, &hashes)).expect("in order");
        }
        let got = scores(&index, &[1, 2, 3, 4, 5, 6]);
        let want: BTreeMap<_, _> = (1..6u64).map(|w| (w, w as u32)).collect();
        assert_eq!(got, want);
        // A hole in the middle stops the prefix even if later blocks are held.
        index.apply(5, &removed(1, &[2])).expect("in order");
        assert_eq!(scores(&index, &[1, 2, 3])[&5], 1);
        assert_eq!(index.num_entries(), 1 + 2 + 3 + 4 + 4);
        assert!(index.remove_worker(4));
        assert_eq!(index.num_entries(), 1 + 2 + 3 + 4);
        assert!(!scores(&index, &[1]).contains_key(&4));
    }

    #[test]
    fn gap_needs_snapshot_and_snapshot_resyncs() {
        let mut index = KvIndex::new();
        index.add_worker(7).expect("new worker");
        assert_eq!(index.apply(7, &stored(0, &[1, 2])), Ok(Applied::Applied));
        assert_eq!(index.apply(7, &stored(0, &[1, 2])), Ok(Applied::Duplicate));
        assert!(matches!(
            index.apply(7, &stored(2, &[3])),
            Err(IndexError::Gap {
                expected: 1,
                got: 2,
                ..
            })
        ));
        assert_eq!(index.needs_snapshot(), vec![7]);
        assert_eq!(
            index.apply(7, &stored(3, &[4])),
            Ok(Applied::AwaitingSnapshot)
        );
        let snap = KvSnapshot {
            next_seq: 4,
            hashes: vec![BlockHash(1), BlockHash(9)],
        };
        index.apply_snapshot(7, &snap).expect("known worker");
        assert_eq!(index.worker_hashes(7), vec![BlockHash(1), BlockHash(9)]);
        assert_eq!(index.apply(7, &stored(4, &[10])), Ok(Applied::Applied));
        assert!(index.needs_snapshot().is_empty());
        assert_eq!(
            index.apply(8, &stored(0, &[1])),
            Err(IndexError::UnknownWorker(8))
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Store(u64, Vec<u64>),
        Remove(u64, Vec<u64>),
        Clear(u64),
    }

    proptest::proptest! {
        /// The index agrees with a naive model (a set of hashes per worker) on every
        /// overlap query, whatever the order of stores, removals and clears.
        #[test]
        fn agrees_with_naive_model(ops in proptest::collection::vec(
            proptest::prop_oneof![
                (0u64..6, proptest::collection::vec(0u64..12, 1..6)).prop_map(|(w, h)| Op::Store(w, h)),
                (0u64..6, proptest::collection::vec(0u64..12, 1..4)).prop_map(|(w, h)| Op::Remove(w, h)),
                (0u64..6).prop_map(Op::Clear),
            ], 1..60),
            query in proptest::collection::vec(0u64..12, 1..8)) {
            let mut index = KvIndex::new();
            let mut model: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
            let mut seq = [0u64; 6];
            for w in 0..6 {
                index.add_worker(w).expect("new worker");
            }
            for op in ops {
                let (w, kind) = match op {
                    Op::Store(w, h) => {
                        model.entry(w).or_default().extend(&h);
                        (w, KvEventKind::Stored { parent: None, hashes: h.into_iter().map(BlockHash).collect() })
                    }
                    Op::Remove(w, h) => {
                        for x in &h { model.entry(w).or_default().remove(x); }
                        (w, KvEventKind::Removed { hashes: h.into_iter().map(BlockHash).collect() })
                    }
                    Op::Clear(w) => {
                        model.remove(&w);
                        (w, KvEventKind::Cleared)
                    }
                };
                prop_assert_eq!(index.apply(w, &KvEvent { seq: seq[w as usize], kind }), Ok(Applied::Applied));
                seq[w as usize] += 1;
            }
            let mut want = BTreeMap::new();
            for (w, held) in &model {
                let n = query.iter().take_while(|h| held.contains(h)).count();
                if n > 0 { want.insert(*w, n as u32); }
            }
            prop_assert_eq!(scores(&index, &query), want);
            let total: usize = model.values().map(BTreeSet::len).sum();
            prop_assert_eq!(index.num_entries(), total);
        }
    }
}
