//! The scheduler's block decisions: what a sequence takes from the prefix
//! cache at admission, which running sequences compute how many tokens in the
//! next step, and which give their blocks back when the cache runs out. The
//! engine's scheduler and the router's simulated workers both run this code,
//! so a simulated worker admits, batches and preempts as the engine does.

use std::collections::VecDeque;

use tandem_protocol::BlockHash;

use crate::kv_cache::{BlockId, KvCache};

/// What the planner sees of a sequence.
pub trait Scheduled {
    /// Tokens in the sequence: prompt, then generated.
    fn context_len(&self) -> usize;
    /// Leading tokens whose K/V is in the cache.
    fn computed(&self) -> usize;
    /// The sequence's blocks, in order.
    fn blocks_mut(&mut self) -> &mut Vec<BlockId>;
    /// Forgets the sequence's K/V after its blocks went back to the cache: it
    /// is computed again from its next admission.
    fn reset_kv(&mut self);
}

/// The cached leading blocks for a sequence of `len` tokens whose full
/// blocks hash to `hashes`, when the cache can also hold the rest of it and
/// its first generated token; `None`, holding nothing, when it cannot. The
/// last token is never taken from the cache: it is computed for its logits.
pub fn admit_prefix(cache: &mut KvCache, hashes: &[BlockHash], len: usize) -> Option<Vec<BlockId>> {
    let bs = cache.layout().block_size;
    let reusable = (len - 1) / bs;
    let blocks = cache.acquire_prefix(&hashes[..reusable.min(hashes.len())]);
    let needed = (len + 1).div_ceil(bs) - blocks.len();
    if cache.num_free() < needed {
        cache.release_all(&blocks);
        return None;
    }
    Some(blocks)
}

/// Returns the running sequence admitted last to the front of the queue,
/// freeing its blocks; its full blocks stay cached, so re-admission is cheap.
/// False when nothing runs.
pub fn preempt_last<S: Scheduled>(
    running: &mut Vec<S>,
    waiting: &mut VecDeque<S>,
    cache: &mut KvCache,
) -> bool {
    let Some(mut seq) = running.pop() else {
        return false;
    };
    tracing::debug!(
        running = running.len(),
        "preempting the sequence admitted last for lack of KV blocks"
    );
    cache.release_all(&std::mem::take(seq.blocks_mut()));
    seq.reset_kv();
    waiting.push_front(seq);
    true
}

/// Plans one step under a budget of `max_tokens`: decodes first, then prefill
/// chunks, in admission order. Allocates the blocks each planned chunk needs,
/// preempting the sequences admitted last when the cache has none left.
/// Returns (running index, tokens to compute) pairs, indexes into `running`
/// as it is after the call.
pub fn plan_step<S: Scheduled>(
    running: &mut Vec<S>,
    waiting: &mut VecDeque<S>,
    cache: &mut KvCache,
    max_tokens: usize,
) -> Vec<(usize, usize)> {
    let bs = cache.layout().block_size;
    let mut order: Vec<usize> = (0..running.len()).collect();
    order.sort_by_key(|&i| (running[i].context_len() - running[i].computed() > 1, i));
    let mut budget = max_tokens;
    let mut plan = Vec::new();
    for i in order {
        if budget == 0 {
            break;
        }
        let Some(seq) = running.get(i) else {
            continue; // preempted below
        };
        let take = (seq.context_len() - seq.computed()).min(budget);
        let need = (seq.computed() + take).div_ceil(bs);
        while running
            .get_mut(i)
            .is_some_and(|s| s.blocks_mut().len() < need)
        {
            match cache.allocate() {
                Some(b) => running[i].blocks_mut().push(b),
                None => {
                    if !preempt_last(running, waiting, cache) {
                        break;
                    }
                }
            }
        }
        if running
            .get_mut(i)
            .is_some_and(|s| s.blocks_mut().len() >= need)
        {
            plan.push((i, take));
            budget -= take;
        }
    }
    plan.retain(|&(i, _)| i < running.len());
    plan
}
