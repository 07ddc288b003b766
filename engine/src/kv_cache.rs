//! The paged KV cache: a pool of fixed-size blocks with prefix reuse.
//!
//! # Block layout (stable: the KV transfer ships blocks as they are)
//!
//! All values are f16, little-endian. Block `b` is
//! `data[b * block_elems .. (b + 1) * block_elems]`; inside a block, layer `l`'s
//! piece starts at `l * piece_elems`; inside a piece, K comes first and then V,
//! each shaped `[slot in 0..block_size][kv_head][head_dim]`.
//!
//! # Prefix reuse
//!
//! A full, computed block is registered under its chained hash. Blocks are
//! reference counted; a registered block whose count drops to zero stays cached
//! on an LRU list until a fresh block is needed. Registering and evicting emit
//! [`KvEvent`]s, numbered consecutively, for routers.

use std::collections::{BTreeMap, HashMap};

use half::f16;
use serde::{Deserialize, Serialize};
use tandem_protocol::{BlockHash, BlockHasher, KvEvent, KvEventKind};

/// Index of a block in the pool.
pub type BlockId = u32;

/// Shape of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvLayout {
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
}

impl KvLayout {
    /// f16 elements of K (or V) of one layer of one block.
    pub fn half_elems(&self) -> usize {
        self.block_size * self.n_kv_heads * self.head_dim
    }

    /// f16 elements of one block-layer piece (K then V).
    pub fn piece_elems(&self) -> usize {
        2 * self.half_elems()
    }

    /// f16 elements of one block (every layer's piece).
    pub fn block_elems(&self) -> usize {
        self.n_layers * self.piece_elems()
    }

    /// Bytes of one block-layer piece.
    pub fn piece_bytes(&self) -> usize {
        2 * self.piece_elems()
    }

    /// Bytes of one block.
    pub fn block_bytes(&self) -> usize {
        2 * self.block_elems()
    }
}

#[derive(Debug, Clone, Default)]
struct BlockMeta {
    refs: u32,
    hash: Option<BlockHash>,
    /// Position on the eviction list while cached and unreferenced.
    lru_tick: Option<EvictKey>,
    /// Found in the cache by a later sequence since it was registered.
    reused: bool,
}

/// Eviction order: lowest first. `(priority, release tick)`; the tick keeps keys unique.
type EvictKey = (u64, u64);

/// The block pool, its prefix index and its event log.
pub struct KvCache {
    layout: KvLayout,
    hasher: BlockHasher,
    meta: Vec<BlockMeta>,
    /// Blocks holding nothing reusable.
    free: Vec<BlockId>,
    /// Registered hashes and the block holding each.
    cached: HashMap<BlockHash, BlockId>,
    /// Unreferenced registered blocks, next to evict first (see [`KvCache::release`]).
    lru: BTreeMap<EvictKey, BlockId>,
    tick: u64,
    events: Vec<KvEvent>,
    next_seq: u64,
    lookups: u64,
    hits: u64,
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("layout", &self.layout)
            .field("blocks", &self.meta.len())
            .field("free", &self.free.len())
            .field("cached", &self.cached.len())
            .finish()
    }
}

impl KvCache {
    /// Bookkeeping for a pool of `num_blocks` blocks (the storage itself is a
    /// [`KvPool`], held by the backend).
    pub fn new(layout: KvLayout, num_blocks: usize, hasher: BlockHasher) -> Self {
        Self {
            layout,
            hasher,
            meta: vec![BlockMeta::default(); num_blocks],
            // Popped from the back: low ids are handed out first.
            free: (0..num_blocks as BlockId).rev().collect(),
            cached: HashMap::new(),
            lru: BTreeMap::new(),
            tick: 0,
            events: Vec::new(),
            next_seq: 0,
            lookups: 0,
            hits: 0,
        }
    }

    /// The cache's shape.
    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    /// The block hasher (model salt and block size).
    pub fn hasher(&self) -> &BlockHasher {
        &self.hasher
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.meta.len()
    }

    /// Unreferenced blocks: never used, freed, or cached and evictable.
    pub fn num_free(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    /// Referenced blocks.
    pub fn num_in_use(&self) -> usize {
        self.num_blocks() - self.num_free()
    }

    /// Registered (reusable) blocks, referenced or not.
    pub fn num_cached(&self) -> usize {
        self.cached.len()
    }

    /// Prefix-cache hit rate in blocks since start.
    pub fn hit_rate(&self) -> f64 {
        if self.lookups == 0 {
            0.0
        } else {
            self.hits as f64 / self.lookups as f64
        }
    }

    /// Number of leading `hashes` cached right now, without side effects.
    pub fn cached_prefix_len(&self, hashes: &[BlockHash]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.cached.contains_key(h))
            .count()
    }

    /// Takes a reference on the longest cached prefix of `hashes` and returns its blocks.
    pub fn acquire_prefix(&mut self, hashes: &[BlockHash]) -> Vec<BlockId> {
        let mut blocks = Vec::new();
        for h in hashes {
            let Some(&b) = self.cached.get(h) else { break };
            let m = &mut self.meta[b as usize];
            if let Some(t) = m.lru_tick.take() {
                self.lru.remove(&t);
            }
            m.refs += 1;
            m.reused = true;
            blocks.push(b);
        }
        self.lookups += hashes.len() as u64;
        self.hits += blocks.len() as u64;
        blocks
    }

    /// A fresh block with one reference: a free block if any, else the least
    /// recently released cached block, evicted. `None` if every block is referenced.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.lru.pop_first()?;
                let m = &mut self.meta[b as usize];
                m.lru_tick = None;
                m.reused = false;
                if let Some(h) = m.hash.take() {
                    self.cached.remove(&h);
                    self.emit(KvEventKind::Removed { hashes: vec![h] });
                }
                b
            }
        };
        self.meta[b as usize].refs = 1;
        Some(b)
    }

    /// `n` fresh blocks, or none at all if fewer than `n` are available.
    pub fn allocate_many(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if self.num_free() < n {
            return None;
        }
        (0..n).map(|_| self.allocate()).collect()
    }

    /// Marks a full, computed block as holding `hash` (chained from `parent`) and
    /// announces it, unless another block already holds that hash: then this
    /// block stays private and `false` is returned.
    pub fn register(&mut self, block: BlockId, parent: Option<BlockHash>, hash: BlockHash) -> bool {
        let Some(m) = self.meta.get_mut(block as usize) else {
            tracing::warn!(block, "register of a block outside the pool");
            return false;
        };
        if m.hash.is_some() || self.cached.contains_key(&hash) {
            return false;
        }
        m.hash = Some(hash);
        self.cached.insert(hash, block);
        self.emit(KvEventKind::Stored {
            parent,
            hashes: vec![hash],
        });
        true
    }

    /// Drops one reference. At zero, a registered block becomes evictable and
    /// an unregistered one is freed.
    ///
    /// Eviction is least recently released first, segmented: a block that a
    /// later sequence has found in the cache (a prefix shared at least once)
    /// is ranked as if released a whole pool's worth of releases later, so
    /// one-off prefixes leave before shared ones. On the Mooncake trace this
    /// raises prefix reuse from 0.541 to 0.557 (8 workers, block 64,
    /// 16,384 blocks each; docs/benchmarks.md).
    pub fn release(&mut self, block: BlockId) {
        let pool = self.meta.len() as u64;
        let Some(m) = self.meta.get_mut(block as usize) else {
            tracing::warn!(block, "release of a block outside the pool");
            return;
        };
        if m.refs == 0 {
            tracing::warn!(block, "release of an unreferenced block");
            return;
        }
        m.refs -= 1;
        if m.refs > 0 {
            return;
        }
        if m.hash.is_some() {
            self.tick += 1;
            let protect = if m.reused { pool } else { 0 };
            let key = (self.tick + protect, self.tick);
            m.lru_tick = Some(key);
            self.lru.insert(key, block);
        } else {
            self.free.push(block);
        }
    }

    /// Releases a sequence's blocks, last first: of its cached blocks the tail
    /// becomes the least recently used, so eviction trims a prefix chain from its
    /// end and never strands a suffix whose parent is gone (a block is only found
    /// through the blocks before it).
    pub fn release_all(&mut self, blocks: &[BlockId]) {
        for &b in blocks.iter().rev() {
            self.release(b);
        }
    }

    /// The hash a block is registered under, if any.
    pub fn hash_of(&self, block: BlockId) -> Option<BlockHash> {
        self.meta.get(block as usize).and_then(|m| m.hash)
    }

    /// Every registered hash (for a router's snapshot resync).
    pub fn cached_hashes(&self) -> Vec<BlockHash> {
        self.cached.keys().copied().collect()
    }

    /// Evicts every unreferenced cached block: `Cleared` if that empties the
    /// cache, else one `Removed` event.
    pub fn clear_unreferenced(&mut self) {
        let mut removed = Vec::new();
        while let Some((_, b)) = self.lru.pop_first() {
            let m = &mut self.meta[b as usize];
            m.lru_tick = None;
            m.reused = false;
            if let Some(h) = m.hash.take() {
                self.cached.remove(&h);
                removed.push(h);
            }
            self.free.push(b);
        }
        if self.cached.is_empty() {
            self.emit(KvEventKind::Cleared);
        } else if !removed.is_empty() {
            self.emit(KvEventKind::Removed { hashes: removed });
        }
    }

    /// The sequence number the next event will carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Drains pending events.
    pub fn take_events(&mut self) -> Vec<KvEvent> {
        std::mem::take(&mut self.events)
    }

    fn emit(&mut self, kind: KvEventKind) {
        self.events.push(KvEvent {
            seq: self.next_seq,
            kind,
        });
        self.next_seq += 1;
    }
}

/// The storage of a block pool: `num_blocks` blocks in the layout of
/// [`KvLayout`], as the CPU backend keeps them in host memory.
pub struct KvPool {
    layout: KvLayout,
    data: Vec<f16>,
}

impl std::fmt::Debug for KvPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvPool")
            .field("layout", &self.layout)
            .field(
                "blocks",
                &(self.data.len() / self.layout.block_elems().max(1)),
            )
            .finish()
    }
}

impl KvPool {
    /// `num_blocks` zeroed blocks.
    pub fn new(layout: KvLayout, num_blocks: usize) -> Self {
        Self {
            layout,
            data: vec![f16::ZERO; num_blocks * layout.block_elems()],
        }
    }

    /// The blocks' shape.
    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    fn piece_range(&self, b: BlockId, layer: usize) -> std::ops::Range<usize> {
        let start = b as usize * self.layout.block_elems() + layer * self.layout.piece_elems();
        start..start + self.layout.piece_elems()
    }

    /// One block's values.
    pub fn block(&self, b: BlockId) -> &[f16] {
        let n = self.layout.block_elems();
        &self.data[b as usize * n..(b as usize + 1) * n]
    }

    /// The K half of a block-layer piece.
    pub fn keys(&self, b: BlockId, layer: usize) -> &[f16] {
        let r = self.piece_range(b, layer);
        &self.data[r.start..r.start + self.layout.half_elems()]
    }

    /// The V half of a block-layer piece.
    pub fn values(&self, b: BlockId, layer: usize) -> &[f16] {
        let r = self.piece_range(b, layer);
        &self.data[r.start + self.layout.half_elems()..r.end]
    }

    /// Writes one token's K and V (`n_kv_heads * head_dim` each) at `slot` of block `b`.
    pub fn write_slot(&mut self, b: BlockId, layer: usize, slot: usize, k: &[f32], v: &[f32]) {
        let r = self.piece_range(b, layer);
        let width = self.layout.n_kv_heads * self.layout.head_dim;
        let half = self.layout.half_elems();
        let piece = &mut self.data[r];
        crate::cpu::f32_to_f16(k, &mut piece[slot * width..(slot + 1) * width]);
        crate::cpu::f32_to_f16(
            v,
            &mut piece[half + slot * width..half + (slot + 1) * width],
        );
    }

    /// The bytes of one block-layer piece.
    pub fn piece_bytes(&self, b: BlockId, layer: usize) -> &[u8] {
        let r = self.piece_range(b, layer);
        bytemuck::cast_slice(&self.data[r])
    }

    /// The bytes of one block-layer piece, for import.
    pub fn piece_bytes_mut(&mut self, b: BlockId, layer: usize) -> &mut [u8] {
        let r = self.piece_range(b, layer);
        bytemuck::cast_slice_mut(&mut self.data[r])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cache(blocks: usize) -> KvCache {
        let layout = KvLayout {
            n_layers: 2,
            n_kv_heads: 1,
            head_dim: 4,
            block_size: 4,
        };
        KvCache::new(layout, blocks, BlockHasher::new("test", 4))
    }

    /// Allocates and registers a sequence's full blocks; returns its blocks and hashes.
    fn fill(c: &mut KvCache, tokens: &[u32]) -> (Vec<BlockId>, Vec<BlockHash>) {
        let hashes = c.hasher().hash_prefix(tokens);
        let mut blocks = c.acquire_prefix(&hashes);
        for i in blocks.len()..hashes.len() {
            let b = c.allocate().expect("a free block");
            c.register(b, i.checked_sub(1).map(|p| hashes[p]), hashes[i]);
            blocks.push(b);
        }
        (blocks, hashes)
    }

    #[test]
    fn shared_prefix_is_reused() {
        let mut c = cache(8);
        let (a, _) = fill(&mut c, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let (b, _) = fill(&mut c, &[1, 2, 3, 4, 9, 9, 9, 9]);
        assert_eq!(a[0], b[0], "first block shared");
        assert_ne!(a[1], b[1]);
        assert_eq!(c.num_in_use(), 3);
        assert!((c.hit_rate() - 0.25).abs() < 1e-9);
        for x in a.iter().chain(&b) {
            c.release(*x);
        }
        assert_eq!(c.num_in_use(), 0);
        assert_eq!(c.num_cached(), 3, "released blocks stay cached");
        let again = c.acquire_prefix(&c.hasher().hash_prefix(&[1, 2, 3, 4, 5, 6, 7, 8]));
        assert_eq!(again, a);
    }

    #[test]
    fn a_shared_prefix_outlives_one_off_blocks_released_after_it() {
        let mut c = cache(4);
        // `s` is found in the cache again before being released; `o` never is.
        let (s, _) = fill(&mut c, &[1, 1, 1, 1]);
        c.release_all(&s);
        let (s2, _) = fill(&mut c, &[1, 1, 1, 1]);
        assert_eq!(s2, s, "reused");
        c.release_all(&s2);
        let (o, _) = fill(&mut c, &[2, 2, 2, 2]);
        c.release_all(&o);
        let (_busy, _) = fill(&mut c, &[3, 3, 3, 3, 4, 4, 4, 4]);
        // One block left to hand out: the one-off block goes, though released last.
        assert_eq!(c.allocate(), Some(o[0]));
        assert!(c.acquire_prefix(&c.hasher().hash_prefix(&[1, 1, 1, 1])) == s);
    }

    #[test]
    fn eviction_is_least_recently_released_first_with_events() {
        let mut c = cache(3);
        let (x, hx) = fill(&mut c, &[1, 1, 1, 1]);
        let (y, hy) = fill(&mut c, &[2, 2, 2, 2]);
        let (z, _) = fill(&mut c, &[3, 3, 3, 3]);
        c.take_events();
        c.release(y[0]);
        c.release(x[0]);
        // Pool exhausted except the two cached blocks: y goes first, then x.
        let b1 = c.allocate().expect("evicts y");
        assert_eq!(b1, y[0]);
        let b2 = c.allocate().expect("evicts x");
        assert_eq!(b2, x[0]);
        assert!(c.allocate().is_none(), "everything referenced");
        let ev = c.take_events();
        assert_eq!(
            ev.iter().map(|e| &e.kind).collect::<Vec<_>>(),
            vec![
                &KvEventKind::Removed {
                    hashes: vec![hy[0]]
                },
                &KvEventKind::Removed {
                    hashes: vec![hx[0]]
                }
            ]
        );
        assert_eq!(ev[1].seq, ev[0].seq + 1);
        assert_eq!(c.cached_prefix_len(&hx), 0);
        let _ = z;
    }

    #[test]
    fn duplicates_stay_private_and_allocation_is_all_or_nothing() {
        let mut c = cache(4);
        let h = c.hasher().hash_prefix(&[5, 5, 5, 5])[0];
        let a = c.allocate().expect("block");
        let b = c.allocate().expect("block");
        assert!(c.register(a, None, h));
        assert!(
            !c.register(b, None, h),
            "second holder of a hash stays private"
        );
        assert_eq!(c.take_events().len(), 1);
        c.release(b);
        assert_eq!(c.num_cached(), 1);
        assert!(c.allocate_many(4).is_none());
        assert_eq!(c.num_free(), 3, "a failed allocate_many takes nothing");
        assert_eq!(c.allocate_many(3).map(|v| v.len()), Some(3));
    }

    #[test]
    fn slots_land_in_the_documented_layout() {
        let c = cache(2);
        let l = c.layout();
        let mut pool = KvPool::new(l, 2);
        let (b, other) = (0, 1);
        pool.write_slot(b, 1, 2, &[1.0, 2.0, 3.0, 4.0], &[5.0, 6.0, 7.0, 8.0]);
        assert_eq!(pool.block(b)[l.piece_elems() + 2 * 4].to_f32(), 1.0);
        assert_eq!(pool.keys(b, 1)[2 * 4 + 3].to_f32(), 4.0);
        assert_eq!(pool.values(b, 1)[2 * 4].to_f32(), 5.0);
        assert_eq!(pool.piece_bytes(b, 1).len(), l.piece_bytes());
        let bytes = pool.piece_bytes(b, 1).to_vec();
        pool.piece_bytes_mut(other, 1).copy_from_slice(&bytes);
        assert_eq!(pool.values(other, 1), pool.values(b, 1));
    }

    #[test]
    fn eviction_trims_a_released_chain_from_its_tail() {
        let mut c = cache(3);
        let tokens: Vec<u32> = (1..=12).collect();
        let (blocks, hashes) = fill(&mut c, &tokens);
        c.release_all(&blocks);
        assert_eq!(c.num_free(), 3, "released blocks stay cached, evictable");
        // One more block is needed: the chain's last block goes, the rest stays usable.
        let _ = c.allocate().expect("block");
        assert_eq!(c.cached_prefix_len(&hashes), hashes.len() - 1);
    }

    #[test]
    fn clear_unreferenced_drops_cached_blocks() {
        let mut c = cache(4);
        let (a, _) = fill(&mut c, &[1, 2, 3, 4, 5, 6, 7, 8]);
        c.take_events();
        c.release(a[1]);
        c.clear_unreferenced();
        assert!(matches!(
            c.take_events()[0].kind,
            KvEventKind::Removed { .. }
        ));
        c.release(a[0]);
        c.clear_unreferenced();
        assert_eq!(c.take_events()[0].kind, KvEventKind::Cleared);
        assert_eq!(c.num_free(), 4);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Fill(Vec<u32>),
        Release(usize),
    }

    proptest! {
        /// Random workloads keep the pool's invariants and agree with a naive model of what is cached.
        #[test]
        fn invariants_hold(ops in proptest::collection::vec(
            prop_oneof![
                proptest::collection::vec(0u32..3, 4..13).prop_map(Op::Fill),
                (0usize..8).prop_map(Op::Release),
            ], 1..40)) {
            let mut c = cache(6);
            let mut held: Vec<Vec<BlockId>> = Vec::new();
            for op in ops {
                match op {
                    Op::Fill(tokens) => {
                        let hashes = c.hasher().hash_prefix(&tokens);
                        let mut blocks = c.acquire_prefix(&hashes);
                        for i in blocks.len()..hashes.len() {
                            match c.allocate() {
                                Some(b) => {
                                    c.register(b, i.checked_sub(1).map(|p| hashes[p]), hashes[i]);
                                    blocks.push(b);
                                }
                                None => break,
                            }
                        }
                        held.push(blocks);
                    }
                    Op::Release(i) => {
                        if !held.is_empty() {
                            let blocks = held.remove(i % held.len());
                            for b in blocks {
                                c.release(b);
                            }
                        }
                    }
                }
                let referenced: usize = c.meta.iter().filter(|m| m.refs > 0).count();
                prop_assert_eq!(referenced, c.num_in_use());
                prop_assert_eq!(c.num_free() + c.num_in_use(), c.num_blocks());
                for &b in &c.free {
                    prop_assert_eq!(c.meta[b as usize].refs, 0);
                    prop_assert!(c.meta[b as usize].hash.is_none());
                }
                for (&h, &b) in &c.cached {
                    prop_assert_eq!(c.hash_of(b), Some(h));
                }
                for (&t, &b) in &c.lru {
                    prop_assert_eq!(c.meta[b as usize].lru_tick, Some(t));
                    prop_assert_eq!(c.meta[b as usize].refs, 0);
                }
            }
            let mut seqs: Vec<u64> = c.take_events().iter().map(|e| e.seq).collect();
            let sorted = seqs.clone();
            seqs.dedup();
            prop_assert_eq!(seqs, sorted);
        }
    }
}
