//! The KV router: the index, the cost, and the router's own account of the work it
//! has sent to each worker (what the load terms of the cost read).

use tandem_protocol::{BlockHash, KvEvent};

use crate::cost::{Candidate, CostConfig, Selector};
use crate::index::{Applied, FastMap, IndexError, KvIndex, KvSnapshot, Overlaps, WorkerId};

/// A request's identity as the router knows it.
pub type RequestId = u64;

/// Where a request goes, and how much of its prompt is cached there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub worker: WorkerId,
    /// Leading prompt blocks the index says the worker holds.
    pub overlap_blocks: u32,
}

#[derive(Debug, Clone)]
struct InFlight {
    worker: WorkerId,
    blocks: u64,
    /// Uncached prompt blocks still to prefill; 0 once the first token is out.
    prefill_blocks: u64,
    /// Prompt blocks counted as pending on the worker until the request finishes.
    pending: Vec<BlockHash>,
}

/// Routes requests by prefix overlap and load.
#[derive(Debug)]
pub struct KvRouter {
    index: KvIndex,
    selector: Selector,
    /// Candidates in the order workers were added; the load fields are live.
    candidates: Vec<Candidate>,
    position: FastMap<WorkerId, usize>,
    inflight: FastMap<RequestId, InFlight>,
    overlaps: Overlaps,
    /// Blocks of requests in flight, by worker (only with `track_pending`).
    pending: KvIndex,
    pending_overlaps: Overlaps,
    /// Scratch: the eligible candidates of a filtered route, and their positions.
    eligible: Vec<Candidate>,
    eligible_at: Vec<usize>,
}

impl KvRouter {
    /// A router with no workers; `seed` fixes its tie-breaks and samples.
    pub fn new(config: CostConfig, seed: u64) -> Self {
        Self {
            index: KvIndex::new(),
            selector: Selector::new(config, seed),
            candidates: Vec::new(),
            position: FastMap::default(),
            inflight: FastMap::default(),
            overlaps: Overlaps::default(),
            pending: KvIndex::new(),
            pending_overlaps: Overlaps::default(),
            eligible: Vec::new(),
            eligible_at: Vec::new(),
        }
    }

    /// The cost in use.
    pub fn config(&self) -> &CostConfig {
        self.selector.config()
    }

    /// The KV index.
    pub fn index(&self) -> &KvIndex {
        &self.index
    }

    /// Starts routing to a worker.
    pub fn add_worker(&mut self, id: WorkerId) -> Result<(), IndexError> {
        self.index.add_worker(id)?;
        self.pending.add_worker(id)?;
        self.position.insert(id, self.candidates.len());
        self.candidates.push(Candidate {
            worker: id,
            ..Candidate::default()
        });
        Ok(())
    }

    /// Sizes the index for `blocks` more distinct block hashes (see [`KvIndex::reserve`]).
    pub fn reserve(&mut self, blocks: usize) {
        self.index.reserve(blocks);
    }

    /// Stops routing to a worker and forgets its blocks and requests.
    pub fn remove_worker(&mut self, id: WorkerId) -> bool {
        let Some(pos) = self.position.remove(&id) else {
            return false;
        };
        self.index.remove_worker(id);
        self.pending.remove_worker(id);
        self.candidates.remove(pos);
        for (i, c) in self.candidates.iter().enumerate().skip(pos) {
            self.position.insert(c.worker, i);
        }
        self.inflight.retain(|_, r| r.worker != id);
        true
    }

    /// Applies a worker's KV event to the index.
    pub fn apply_event(
        &mut self,
        worker: WorkerId,
        event: &KvEvent,
    ) -> Result<Applied, IndexError> {
        self.index.apply(worker, event)
    }

    /// Applies a batch of a worker's KV events in order (see [`KvIndex::apply_all`]).
    pub fn apply_events(&mut self, worker: WorkerId, events: &[KvEvent]) -> Result<(), IndexError> {
        self.index.apply_all(worker, events)
    }

    /// Rebuilds a worker's blocks from a snapshot.
    pub fn apply_snapshot(
        &mut self,
        worker: WorkerId,
        snapshot: &KvSnapshot,
    ) -> Result<(), IndexError> {
        self.index.apply_snapshot(worker, snapshot)
    }

    /// Picks a worker for a prompt whose full blocks hash to `hashes`, and counts the
    /// request against that worker until [`KvRouter::finished`]. `None` without workers.
    pub fn route(&mut self, request: RequestId, hashes: &[BlockHash]) -> Option<Decision> {
        self.route_where(request, hashes, |_| true)
    }

    /// [`KvRouter::route`] among the workers `eligible` accepts (e.g. serving the
    /// request's model, not draining, not already tried). `None` if it accepts none.
    pub fn route_where(
        &mut self,
        request: RequestId,
        hashes: &[BlockHash],
        eligible: impl Fn(WorkerId) -> bool,
    ) -> Option<Decision> {
        self.index.overlaps(hashes, &mut self.overlaps);
        for &(w, n) in &self.overlaps.scores {
            if let Some(&p) = self.position.get(&w) {
                self.candidates[p].overlap_blocks = n;
            }
        }
        let track_pending = self.selector.config().track_pending;
        if track_pending {
            self.pending.overlaps(hashes, &mut self.pending_overlaps);
            for &(w, n) in &self.pending_overlaps.scores {
                if let Some(&p) = self.position.get(&w) {
                    let c = &mut self.candidates[p];
                    c.overlap_blocks = c.overlap_blocks.max(n);
                }
            }
        }
        let prompt_blocks = hashes.len() as u32;
        let chosen = if self.candidates.iter().all(|c| eligible(c.worker)) {
            self.selector.choose(prompt_blocks, &self.candidates)
        } else {
            self.eligible.clear();
            self.eligible_at.clear();
            for (i, c) in self.candidates.iter().enumerate() {
                if eligible(c.worker) {
                    self.eligible.push(*c);
                    self.eligible_at.push(i);
                }
            }
            self.selector
                .choose(prompt_blocks, &self.eligible)
                .and_then(|k| self.eligible_at.get(k).copied())
        };
        let decision = chosen.map(|i| {
            let c = &mut self.candidates[i];
            let d = Decision {
                worker: c.worker,
                overlap_blocks: c.overlap_blocks,
            };
            // One more block for the generated tokens' first block.
            let blocks = u64::from(prompt_blocks) + 1;
            let prefill_blocks = u64::from(prompt_blocks - c.overlap_blocks.min(prompt_blocks));
            c.decode_blocks += blocks;
            c.queued_prefill_blocks += prefill_blocks;
            let pending = if track_pending {
                let new = hashes[(d.overlap_blocks as usize).min(hashes.len())..].to_vec();
                self.pending.insert_predicted(d.worker, &new);
                new
            } else {
                Vec::new()
            };
            self.inflight.insert(
                request,
                InFlight {
                    worker: d.worker,
                    blocks,
                    prefill_blocks,
                    pending,
                },
            );
            d
        });
        for &(w, _) in self
            .overlaps
            .scores
            .iter()
            .chain(&self.pending_overlaps.scores)
        {
            if let Some(&p) = self.position.get(&w) {
                self.candidates[p].overlap_blocks = 0;
            }
        }
        decision
    }

    /// The request's prompt is computed (its first token is out).
    pub fn prefill_done(&mut self, request: RequestId) {
        if let Some(r) = self.inflight.get_mut(&request) {
            let blocks = std::mem::take(&mut r.prefill_blocks);
            if let Some(&p) = self.position.get(&r.worker) {
                let c = &mut self.candidates[p];
                c.queued_prefill_blocks = c.queued_prefill_blocks.saturating_sub(blocks);
            }
        }
    }

    /// The request finished (or failed): it no longer loads its worker.
    pub fn finished(&mut self, request: RequestId) {
        self.prefill_done(request);
        if let Some(r) = self.inflight.remove(&request) {
            self.pending.remove_predicted(r.worker, &r.pending);
            if let Some(&p) = self.position.get(&r.worker) {
                let c = &mut self.candidates[p];
                c.decode_blocks = c.decode_blocks.saturating_sub(r.blocks);
            }
        }
    }

    /// Whether `id` is routed to.
    pub fn has_worker(&self, id: WorkerId) -> bool {
        self.position.contains_key(&id)
    }

    /// The router's view of each worker's load, in the order workers were added.
    pub fn loads(&self) -> &[Candidate] {
        &self.candidates
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::Policy;
    use tandem_protocol::KvEventKind;

    #[test]
    fn routes_to_the_cache_then_spreads_load() {
        let mut r = KvRouter::new(CostConfig::new(Policy::Kv), 0);
        for w in 0..3 {
            r.add_worker(w).expect("new worker");
        }
        let prompt: Vec<BlockHash> = (1..=8).map(BlockHash).collect();
        let stored = KvEvent {
            seq: 0,
            kind: KvEventKind::Stored {
                parent: None,
                hashes: prompt[..6].to_vec(),
            },
        };
        r.apply_event(2, &stored).expect("in order");
        let d = r.route(1, &prompt).expect("workers");
        assert_eq!(
            d,
            Decision {
                worker: 2,
                overlap_blocks: 6
            }
        );
        // Worker 2 now carries 9 decode blocks: 2 + 9 > 8 + 0, so an idle worker wins.
        let d2 = r.route(2, &prompt).expect("workers");
        assert_ne!(d2.worker, 2);
        r.finished(1);
        r.finished(2);
        assert!(r.loads().iter().all(|c| c.decode_blocks == 0));
        assert!(r.remove_worker(2));
        assert_eq!(r.route(3, &prompt).map(|d| d.overlap_blocks), Some(0));
    }

    #[test]
    fn filtered_routes_skip_ineligible_workers_even_with_the_cache() {
        let mut r = KvRouter::new(CostConfig::new(Policy::KvLoad), 0);
        for w in 0..3 {
            r.add_worker(w).expect("new worker");
        }
        let prompt: Vec<BlockHash> = (1..=8).map(BlockHash).collect();
        let stored = KvEvent {
            seq: 0,
            kind: KvEventKind::Stored {
                parent: None,
                hashes: prompt.clone(),
            },
        };
        r.apply_event(1, &stored).expect("in order");
        assert_eq!(
            r.route_where(1, &prompt, |_| true).map(|d| d.worker),
            Some(1)
        );
        for req in 2..20 {
            let d = r
                .route_where(req, &prompt, |w| w != 1)
                .expect("eligible workers");
            assert_ne!(d.worker, 1);
            assert_eq!(d.overlap_blocks, 0);
            r.finished(req);
        }
        assert_eq!(r.route_where(30, &prompt, |_| false), None);
        assert!(r.has_worker(2) && !r.has_worker(7));
    }
}
