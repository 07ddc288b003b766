//! A simulated worker: the engine's scheduler, step for step, over the engine's own
//! KV cache bookkeeping, with a timing model in place of the forward pass.
//!
//! Taking a prompt's cached prefix at admission, batch planning (decodes
//! first, then prefill chunks under the token budget) and block allocation
//! with preemption of the last admitted sequence are the engine's own code
//! (`tandem_engine::schedule`); the rest of admission, block registration
//! after each step and release at the end follow `tandem_engine::engine`
//! exactly, so a simulated worker's prefix hits are the
//! engine's for the same requests (a test holds them to it). The cache is a
//! `KvCache` whose layout has no layers: it keeps the bookkeeping (block pool,
//! prefix map, LRU, events) and stores no values.

use std::collections::VecDeque;

use tandem_engine::kv_cache::{BlockId, KvCache, KvLayout};
use tandem_engine::schedule::{self, Scheduled};
use tandem_protocol::{BlockHash, BlockHasher, KvEvent};

use super::timing::{StepShape, TimingModel};

/// A prompt as a worker sees it.
#[derive(Debug, Clone)]
pub struct SimRequest {
    pub prompt_len: usize,
    /// Tokens to generate (at least 1).
    pub output_len: usize,
    /// Hashes of the prompt's full blocks.
    pub hashes: Vec<BlockHash>,
    /// The prompt's tokens after its last full block.
    pub tail: Vec<u32>,
    /// Makes the synthetic generated tokens unique to this request.
    pub salt: u64,
}

impl SimRequest {
    /// Hashes a prompt's tokens into a request.
    pub fn new(tokens: &[u32], output_len: usize, hasher: &BlockHasher, salt: u64) -> Self {
        let hashes = hasher.hash_prefix(tokens);
        let full = hashes.len() * hasher.block_size();
        Self {
            prompt_len: tokens.len(),
            output_len: output_len.max(1),
            hashes,
            tail: tokens[full..].to_vec(),
            salt,
        }
    }

    /// The token at position `p` of the sequence (prompt, then generated).
    fn token(&self, p: usize, block_size: usize) -> u32 {
        let full = self.hashes.len() * block_size;
        if p >= full && p < self.prompt_len {
            return self.tail[p - full];
        }
        let mut z = self.salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ p as u64;
        z = (z ^ (z >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        (z >> 40) as u32
    }
}

/// How a worker is sized, as the engine's `EngineConfig`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct WorkerConfig {
    pub block_size: usize,
    pub num_blocks: usize,
    pub max_batch_tokens: usize,
    pub max_running: usize,
}

#[derive(Debug)]
struct Seq {
    /// The caller's request index.
    id: usize,
    /// Tokens so far: prompt, then sampled.
    len: usize,
    computed: usize,
    blocks: Vec<BlockId>,
    /// Hashes of the leading blocks registered or acquired, in order.
    hashes: Vec<BlockHash>,
    generated: usize,
    /// Prompt tokens taken from the cache at the latest admission (the engine's `cached_tokens`).
    cached_tokens: usize,
    /// Prompt tokens taken from the cache at the first admission.
    first_cached_tokens: Option<usize>,
}

/// A request that finished on a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    pub id: usize,
    /// Cached prompt tokens at the latest admission, as the engine's usage reports them.
    pub cached_tokens: usize,
    /// Cached prompt tokens at the first admission (the reuse the router earned).
    pub first_cached_tokens: usize,
}

/// What a step produced.
#[derive(Debug, Default)]
pub struct StepOutput {
    /// Requests whose first token came out.
    pub first_tokens: Vec<usize>,
    /// Requests that produced a token (first included).
    pub tokens: Vec<usize>,
    pub finished: Vec<Finished>,
}

/// One simulated engine.
#[derive(Debug)]
pub struct SimWorker {
    config: WorkerConfig,
    cache: KvCache,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    /// The step in flight: (running index, tokens) as planned.
    plan: Vec<(usize, usize)>,
    next_seq: u64,
    pub prefill_tokens_computed: u64,
    pub busy_us: u64,
}

impl SimWorker {
    /// An idle worker with an empty cache.
    pub fn new(config: WorkerConfig) -> Self {
        let layout = KvLayout {
            n_layers: 0,
            n_kv_heads: 0,
            head_dim: 0,
            block_size: config.block_size,
        };
        // The cache's hasher is unused here: the simulator hashes prompts itself.
        let hasher = BlockHasher::new("tandem-sim", config.block_size);
        Self {
            config,
            cache: KvCache::new(layout, config.num_blocks, hasher),
            waiting: VecDeque::new(),
            running: Vec::new(),
            plan: Vec::new(),
            next_seq: 0,
            prefill_tokens_computed: 0,
            busy_us: 0,
        }
    }

    /// Queues a request.
    pub fn submit(&mut self, id: usize, req: &SimRequest) {
        self.waiting.push_back(Seq {
            id,
            len: req.prompt_len,
            computed: 0,
            blocks: Vec::new(),
            hashes: Vec::new(),
            generated: 0,
            cached_tokens: 0,
            first_cached_tokens: None,
        });
    }

    /// Sequences running or waiting.
    pub fn active(&self) -> usize {
        self.running.len() + self.waiting.len()
    }

    /// KV events since the last call.
    pub fn take_events(&mut self) -> Vec<KvEvent> {
        let events = self.cache.take_events();
        if let Some(last) = events.last() {
            self.next_seq = last.seq + 1;
        }
        events
    }

    /// Every cached hash and the seq of the next event: a snapshot for a router.
    /// Call after [`SimWorker::take_events`] so the two agree.
    pub fn snapshot(&self) -> (u64, Vec<BlockHash>) {
        (self.next_seq, self.cache.cached_hashes())
    }

    /// Starts a step: admits, plans and allocates. Returns its duration in
    /// microseconds, or `None` when there is nothing to run. Requests that cannot fit
    /// the cache even alone are given up on and reported in `dropped`.
    pub fn begin_step(
        &mut self,
        reqs: &[SimRequest],
        timing: &TimingModel,
        dropped: &mut Vec<usize>,
    ) -> Option<u64> {
        loop {
            self.admit(reqs);
            self.plan = self.plan_batch();
            if !self.plan.is_empty() {
                break;
            }
            if !self.running.is_empty() {
                return None;
            }
            // Nothing fits even with the whole cache free: give up on the head of the queue.
            let seq = self.waiting.pop_front()?;
            dropped.push(seq.id);
        }
        let mut shape = StepShape::default();
        for &(i, take) in &self.plan {
            let s = &self.running[i];
            if s.len - s.computed > 1 {
                shape.prefill_tokens += take;
                shape.prefill_token_pairs += take as f64 * (s.computed as f64 + take as f64 / 2.0);
            } else {
                shape.decodes += 1;
                shape.decode_context += s.computed;
            }
        }
        self.prefill_tokens_computed += shape.prefill_tokens as u64;
        let us = timing.step_us(&shape);
        self.busy_us += us;
        Some(us)
    }

    /// Finishes the step begun last: registers newly full blocks, samples, retires.
    pub fn end_step(&mut self, reqs: &[SimRequest], out: &mut StepOutput) {
        let bs = self.config.block_size;
        let plan = std::mem::take(&mut self.plan);
        let mut done = Vec::new();
        for &(i, take) in &plan {
            let seq = &mut self.running[i];
            seq.computed += take;
            register_full_blocks(&mut self.cache, seq, &reqs[seq.id], bs);
            if seq.computed == seq.len {
                seq.len += 1;
                seq.generated += 1;
                if seq.generated == 1 {
                    out.first_tokens.push(seq.id);
                }
                out.tokens.push(seq.id);
                let cache_full = seq.len >= self.config.num_blocks * bs;
                if seq.generated >= reqs[seq.id].output_len || cache_full {
                    done.push(i);
                }
            }
        }
        done.sort_unstable_by(|a, b| b.cmp(a));
        for i in done {
            let seq = self.running.remove(i);
            self.cache.release_all(&seq.blocks);
            out.finished.push(Finished {
                id: seq.id,
                cached_tokens: seq.cached_tokens,
                first_cached_tokens: seq.first_cached_tokens.unwrap_or(0),
            });
        }
    }

    /// The hashes of the first `n` full blocks of a sequence of `len` tokens.
    fn full_block_hashes(&self, req: &SimRequest, len: usize) -> Vec<BlockHash> {
        let bs = self.config.block_size;
        let n = len / bs;
        let mut hashes: Vec<BlockHash> = req.hashes.iter().take(n).copied().collect();
        let mut tokens = Vec::with_capacity(bs);
        while hashes.len() < n {
            let i = hashes.len();
            tokens.clear();
            tokens.extend((i * bs..(i + 1) * bs).map(|p| req.token(p, bs)));
            let parent = hashes.last().copied();
            hashes.push(self.cache.hasher().hash_block(parent, &tokens));
        }
        hashes
    }

    /// The engine's `admit`: moves waiting sequences into the running set while blocks allow.
    fn admit(&mut self, reqs: &[SimRequest]) {
        let bs = self.config.block_size;
        while self.running.len() < self.config.max_running {
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            let req = &reqs[seq.id];
            // A fresh prompt's hashes are the request's; a preempted sequence also
            // has generated blocks.
            let owned;
            let hashes: &[BlockHash] = if seq.len == req.prompt_len {
                &req.hashes
            } else {
                owned = self.full_block_hashes(req, seq.len);
                &owned
            };
            let Some(blocks) = schedule::admit_prefix(&mut self.cache, hashes, seq.len) else {
                self.waiting.push_front(seq);
                break;
            };
            let acquired = blocks.len();
            seq.cached_tokens = acquired * bs;
            seq.computed = acquired * bs;
            seq.hashes = hashes[..acquired].to_vec();
            seq.blocks = blocks;
            if seq.first_cached_tokens.is_none() {
                seq.first_cached_tokens = Some(seq.cached_tokens.min(req.prompt_len));
            }
            self.running.push(seq);
        }
    }

    /// The engine's plan: [`schedule::plan_step`].
    fn plan_batch(&mut self) -> Vec<(usize, usize)> {
        schedule::plan_step(
            &mut self.running,
            &mut self.waiting,
            &mut self.cache,
            self.config.max_batch_tokens,
        )
    }
}

impl Scheduled for Seq {
    fn context_len(&self) -> usize {
        self.len
    }
    fn computed(&self) -> usize {
        self.computed
    }
    fn blocks_mut(&mut self) -> &mut Vec<BlockId> {
        &mut self.blocks
    }
    fn reset_kv(&mut self) {
        self.blocks.clear();
        self.hashes.clear();
        self.computed = 0;
    }
}

fn register_full_blocks(cache: &mut KvCache, seq: &mut Seq, req: &SimRequest, bs: usize) {
    let mut tokens = Vec::new();
    while (seq.hashes.len() + 1) * bs <= seq.computed {
        let i = seq.hashes.len();
        let parent = seq.hashes.last().copied();
        let hash = match req.hashes.get(i) {
            Some(&h) => h,
            None => {
                tokens.clear();
                tokens.extend((i * bs..(i + 1) * bs).map(|p| req.token(p, bs)));
                cache.hasher().hash_block(parent, &tokens)
            }
        };
        cache.register(seq.blocks[i], parent, hash);
        seq.hashes.push(hash);
    }
}
