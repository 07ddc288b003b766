//! The routing cost: how the router turns prefix overlaps and load into a choice.
//!
//! The design's cost for worker `w` is
//!
//! ```text
//! cost_w = prefill_weight * (prompt_blocks - overlap_w) + decode_blocks_w
//! ```
//!
//! (lowest wins, ties at random, optionally sampled by a softmax with a temperature).
//! [`Policy::KvLoad`] is what the simulator showed pays off: a term for the prefill
//! work already queued on the worker (what a new request waits behind before its
//! first token), and a much smaller weight on decode blocks, so a request leaves the
//! worker holding its prefix only when that worker's queue would cost more than
//! recomputing the prefix elsewhere.

use std::str::FromStr;

use serde::Serialize;

use crate::index::WorkerId;
use crate::rng::Rng;

/// How a worker is picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Each worker in turn, ignoring caches and load.
    RoundRobin,
    /// Uniformly at random.
    Random,
    /// The design's cost: uncached prompt blocks plus active decode blocks.
    Kv,
    /// The design's cost plus queued prefill blocks on the worker.
    KvLoad,
}

impl Policy {
    /// Every policy, for help texts and sweeps.
    pub const ALL: [Policy; 4] = [
        Policy::RoundRobin,
        Policy::Random,
        Policy::Kv,
        Policy::KvLoad,
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round-robin",
            Policy::Random => "random",
            Policy::Kv => "kv",
            Policy::KvLoad => "kv-load",
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Policy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Policy::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Policy::ALL.iter().map(|p| p.name()).collect();
                format!("unknown router {s:?}; expected one of {}", names.join(", "))
            })
    }
}

/// The cost's weights.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CostConfig {
    pub policy: Policy,
    /// Weight of each uncached prompt block (the design's `prefill_weight`).
    pub prefill_weight: f64,
    /// Weight of each block of the worker's active sequences.
    pub decode_weight: f64,
    /// Weight of each prefill block queued on the worker ([`Policy::KvLoad`] only).
    pub queue_weight: f64,
    /// 0 picks the lowest cost; above 0, samples `exp(-normalized_cost / temperature)`.
    pub temperature: f64,
    /// Count the prompt blocks of requests routed but not finished as already on
    /// their worker, so a burst of requests sharing a new prefix stays together.
    pub track_pending: bool,
}

impl CostConfig {
    /// The default weights for a policy: the design's for [`Policy::Kv`]; for
    /// [`Policy::KvLoad`] the weights the simulator found best across the Mooncake
    /// trace and the generated shapes (docs/benchmarks.md): a cached block is worth
    /// far more than a block of decode load, and queued prefill is what delays a
    /// new request's first token.
    pub fn new(policy: Policy) -> Self {
        let (decode_weight, queue_weight) = match policy {
            Policy::KvLoad => (0.05, 0.1),
            _ => (1.0, 0.0),
        };
        Self {
            policy,
            prefill_weight: 1.0,
            decode_weight,
            queue_weight,
            temperature: 0.0,
            track_pending: false,
        }
    }

    /// The cost of sending a prompt of `prompt_blocks` blocks to `c`; lower is better.
    pub fn cost(&self, prompt_blocks: u32, c: &Candidate) -> f64 {
        let uncached = f64::from(prompt_blocks.saturating_sub(c.overlap_blocks));
        let base = self.prefill_weight * uncached + self.decode_weight * c.decode_blocks as f64;
        match self.policy {
            Policy::KvLoad => base + self.queue_weight * c.queued_prefill_blocks as f64,
            _ => base,
        }
    }
}

/// One worker as the cost sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Candidate {
    pub worker: WorkerId,
    /// Leading prompt blocks the worker holds.
    pub overlap_blocks: u32,
    /// Blocks of the sequences routed to the worker and not finished.
    pub decode_blocks: u64,
    /// Uncached prompt blocks routed to the worker whose prefill has not finished.
    pub queued_prefill_blocks: u64,
}

/// Picks among candidates by the configured policy; keeps the round-robin position
/// and the random state.
#[derive(Debug, Clone)]
pub(crate) struct Selector {
    config: CostConfig,
    rng: Rng,
    next: usize,
    costs: Vec<f64>,
    ties: Vec<usize>,
}

impl Selector {
    pub(crate) fn new(config: CostConfig, seed: u64) -> Self {
        Self {
            config,
            rng: Rng::new(seed),
            next: 0,
            costs: Vec::new(),
            ties: Vec::new(),
        }
    }

    pub(crate) fn config(&self) -> &CostConfig {
        &self.config
    }

    /// The index of the chosen candidate; `None` if there are none.
    pub(crate) fn choose(&mut self, prompt_blocks: u32, candidates: &[Candidate]) -> Option<usize> {
        if candidates.is_empty() {
            return None;
        }
        match self.config.policy {
            Policy::RoundRobin => {
                let i = self.next % candidates.len();
                self.next = i + 1;
                return Some(i);
            }
            Policy::Random => return Some(self.rng.below(candidates.len())),
            Policy::Kv | Policy::KvLoad => {}
        }
        self.costs.clear();
        self.costs.extend(
            candidates
                .iter()
                .map(|c| self.config.cost(prompt_blocks, c)),
        );
        let (lo, hi) = self
            .costs
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &c| {
                (lo.min(c), hi.max(c))
            });
        if self.config.temperature > 0.0 && hi > lo {
            // Softmax over costs normalized to [0, 1], so the temperature means the
            // same thing whatever the prompt length.
            let t = self.config.temperature;
            let total: f64 = self
                .costs
                .iter()
                .map(|c| (-(c - lo) / (hi - lo) / t).exp())
                .sum();
            let mut x = self.rng.next_f64() * total;
            for (i, c) in self.costs.iter().enumerate() {
                x -= (-(c - lo) / (hi - lo) / t).exp();
                if x <= 0.0 {
                    return Some(i);
                }
            }
            return Some(candidates.len() - 1);
        }
        self.ties.clear();
        self.ties.extend(
            self.costs
                .iter()
                .enumerate()
                .filter(|(_, c)| **c <= lo)
                .map(|(i, _)| i),
        );
        let pick = self.rng.below(self.ties.len());
        self.ties.get(pick).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(worker: WorkerId, overlap: u32, decode: u64, queued: u64) -> Candidate {
        Candidate {
            worker,
            overlap_blocks: overlap,
            decode_blocks: decode,
            queued_prefill_blocks: queued,
        }
    }

    #[test]
    fn lowest_cost_wins_and_ties_spread() {
        let mut s = Selector::new(CostConfig::new(Policy::Kv), 1);
        // Worker 1 holds 8 of 10 blocks but carries 5 decode blocks: 2 + 5 < 10 + 0.
        let cs = [cand(0, 0, 0, 0), cand(1, 8, 5, 0)];
        assert_eq!(s.choose(10, &cs), Some(1));
        // Queued prefill only counts for kv-load.
        let cs = [cand(0, 0, 0, 0), cand(1, 8, 5, 100)];
        assert_eq!(s.choose(10, &cs), Some(1));
        let mut l = Selector::new(CostConfig::new(Policy::KvLoad), 1);
        assert_eq!(l.choose(10, &cs), Some(0));
        // Equal costs: both get picked over many draws.
        let cs = [cand(0, 0, 0, 0), cand(1, 0, 0, 0), cand(2, 0, 9, 0)];
        let mut seen = [0; 3];
        for _ in 0..100 {
            seen[s.choose(4, &cs).expect("candidates")] += 1;
        }
        assert!(seen[0] > 20 && seen[1] > 20 && seen[2] == 0, "{seen:?}");
    }

    #[test]
    fn temperature_samples_and_round_robin_cycles() {
        let mut config = CostConfig::new(Policy::Kv);
        config.temperature = 0.5;
        let mut s = Selector::new(config, 3);
        let cs = [cand(0, 10, 0, 0), cand(1, 0, 0, 0)];
        let picks: Vec<usize> = (0..200).filter_map(|_| s.choose(10, &cs)).collect();
        let ones = picks.iter().filter(|&&i| i == 1).count();
        // exp(-1/0.5) / (1 + exp(-2)) = 0.12 of the draws go to the worse worker.
        assert!((5..60).contains(&ones), "{ones}");
        let mut rr = Selector::new(CostConfig::new(Policy::RoundRobin), 0);
        let picks: Vec<usize> = (0..4).filter_map(|_| rr.choose(1, &cs)).collect();
        assert_eq!(picks, vec![0, 1, 0, 1]);
        assert_eq!("kv-load".parse::<Policy>(), Ok(Policy::KvLoad));
        assert!("nope".parse::<Policy>().is_err());
    }
}
