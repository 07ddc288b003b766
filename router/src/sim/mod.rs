//! Trace replay on a virtual clock: the router's own index and cost, driving
//! simulated workers that keep the engine's KV cache bookkeeping.
//!
//! Requests arrive at their trace times and are routed by one or more
//! [`KvRouter`] replicas (request `i` goes through replica `i % routers`). Each
//! worker runs the engine's scheduler one step at a time; a step's duration comes
//! from the [`TimingModel`]. After each step the worker's KV events go to every
//! replica, after an optional delay and with optional loss; a replica that sees a
//! gap resyncs from the worker's snapshot. Everything is driven by one event queue
//! in virtual time, so a run is deterministic for its seed and replays a whole
//! Mooncake trace in seconds.

pub mod timing;
pub mod trace;
pub mod worker;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use serde::Serialize;
use tandem_protocol::{BlockHasher, KvEvent};

use crate::cost::CostConfig;
use crate::index::{IndexError, KvSnapshot, WorkerId};
use crate::kv_router::KvRouter;
use crate::rng::Rng;
pub use timing::TimingModel;
pub use trace::{Shape, TraceRequest};
pub use worker::{SimRequest, SimWorker, StepOutput, WorkerConfig};

/// What went wrong setting up or running a simulation.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("trace {path}, line {line}: {message}")]
    Trace {
        path: String,
        line: usize,
        message: String,
    },
    #[error("simulation config: {0}")]
    Config(String),
    #[error("router index: {0}")]
    Index(#[from] IndexError),
}

/// A simulation's setup.
#[derive(Debug, Clone, Serialize)]
pub struct SimConfig {
    pub workers: usize,
    pub cost: CostConfig,
    /// Router replicas sharing the workers' event streams.
    pub routers: usize,
    pub worker: WorkerConfig,
    pub timing: TimingModel,
    pub seed: u64,
    /// Virtual time between a worker's step and its events reaching the routers.
    pub event_delay_ms: f64,
    /// Probability that a replica misses an event batch (fault injection).
    pub event_loss: f64,
}

impl SimConfig {
    /// Dynamo's replay setup: block 64, 16,384 blocks per worker, 8,192-token steps.
    pub fn new(workers: usize, cost: CostConfig) -> Self {
        Self {
            workers,
            cost,
            routers: 1,
            worker: WorkerConfig {
                block_size: 64,
                num_blocks: 16_384,
                max_batch_tokens: 8192,
                max_running: 256,
            },
            timing: TimingModel::gpu(),
            seed: 0,
            event_delay_ms: 0.0,
            event_loss: 0.0,
        }
    }

    /// Checks every field, naming the one that is wrong.
    pub fn validate(&self) -> Result<(), SimError> {
        let bad = |m: &str| Err(SimError::Config(m.to_string()));
        if self.workers == 0 || self.workers > crate::index::MAX_WORKERS {
            return bad("workers must be in 1..=65535");
        }
        if self.routers == 0 {
            return bad("routers must be at least 1");
        }
        let w = &self.worker;
        if !(1..=4096).contains(&w.block_size) {
            return bad("block_size must be in 1..=4096");
        }
        if w.num_blocks < 2 || w.max_batch_tokens == 0 || w.max_running == 0 {
            return bad(
                "blocks_per_worker must be at least 2, max_batch_tokens and max_running positive",
            );
        }
        if !self.timing.is_valid() {
            return bad("timing coefficients must be finite and non-negative");
        }
        if !(self.event_delay_ms.is_finite() && self.event_delay_ms >= 0.0) {
            return bad("event_delay_ms must be finite and non-negative");
        }
        if !(0.0..1.0).contains(&self.event_loss) {
            return bad("event_loss must be in [0, 1)");
        }
        Ok(())
    }
}

/// One worker's share of the run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WorkerReport {
    pub requests: usize,
    pub prompt_tokens: u64,
    /// Prompt tokens actually computed (not taken from the cache).
    pub prefill_tokens_computed: u64,
    /// Fraction of the run the worker spent in steps.
    pub busy: f64,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SimReport {
    pub router: String,
    pub workers: usize,
    pub routers: usize,
    pub block_size: usize,
    pub blocks_per_worker: usize,
    pub seed: u64,
    pub requests: usize,
    pub completed: usize,
    /// Requests that could not fit a worker's cache even alone.
    pub dropped: usize,
    /// Cached prompt tokens / prompt tokens, over completed requests.
    pub prefix_reuse: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p90_ms: f64,
    pub ttft_p99_ms: f64,
    pub itl_p50_ms: f64,
    pub itl_p90_ms: f64,
    pub itl_p99_ms: f64,
    pub e2e_p50_ms: f64,
    pub e2e_p90_ms: f64,
    pub e2e_p99_ms: f64,
    /// Output tokens per second over the run.
    pub throughput_tokens_per_s: f64,
    pub requests_per_s: f64,
    /// From the first arrival to the last completion, in virtual time.
    pub makespan_s: f64,
    /// Busiest worker's busy time over the mean (1.0 is perfect balance).
    pub busy_imbalance: f64,
    /// Snapshot resyncs the router replicas needed.
    pub snapshots: u64,
    pub per_worker: Vec<WorkerReport>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    StepEnd(usize),
    Arrival(usize),
}

#[derive(Debug, Clone, Copy, Default)]
struct RequestTimes {
    arrival: u64,
    first: Option<u64>,
    last_token: u64,
    done: Option<u64>,
    worker: usize,
    cached: usize,
}

struct Run<'a> {
    config: &'a SimConfig,
    reqs: Vec<SimRequest>,
    workers: Vec<SimWorker>,
    busy: Vec<bool>,
    routers: Vec<KvRouter>,
    loss: Rng,
    queue: BinaryHeap<Reverse<(u64, u64, Event)>>,
    order: u64,
    pending_events: VecDeque<(u64, usize, Vec<KvEvent>)>,
    times: Vec<RequestTimes>,
    itl: Vec<u64>,
    dropped: usize,
    snapshots: u64,
}

/// Replays `trace` under `config`.
pub fn run(config: &SimConfig, trace: &[TraceRequest]) -> Result<SimReport, SimError> {
    config.validate()?;
    if let Some(i) = trace.iter().position(|r| r.input_length == 0) {
        return Err(SimError::Config(format!("request {i} has an empty prompt")));
    }
    let hasher = BlockHasher::new("tandem-sim", config.worker.block_size);
    let reqs: Vec<SimRequest> = trace
        .iter()
        .enumerate()
        .map(|(i, r)| {
            SimRequest::new(
                &r.prompt_tokens(i as u64),
                r.output_length,
                &hasher,
                i as u64,
            )
        })
        .collect();
    let mut routers = Vec::with_capacity(config.routers);
    for r in 0..config.routers {
        let mut router = KvRouter::new(config.cost, config.seed.wrapping_add(r as u64));
        router.reserve(config.workers * config.worker.num_blocks);
        for w in 0..config.workers {
            router.add_worker(w as WorkerId)?;
        }
        routers.push(router);
    }
    let mut run = Run {
        config,
        workers: (0..config.workers)
            .map(|_| SimWorker::new(config.worker))
            .collect(),
        busy: vec![false; config.workers],
        routers,
        loss: Rng::new(config.seed ^ 0xFA17),
        queue: BinaryHeap::new(),
        order: 0,
        pending_events: VecDeque::new(),
        times: vec![RequestTimes::default(); reqs.len()],
        itl: Vec::new(),
        dropped: 0,
        snapshots: 0,
        reqs,
    };
    for (i, r) in trace.iter().enumerate() {
        let at = (r.timestamp * 1000.0).round() as u64;
        run.times[i].arrival = at;
        run.push(at, Event::Arrival(i));
    }
    while let Some(Reverse((now, _, event))) = run.queue.pop() {
        match event {
            Event::Arrival(i) => run.arrive(now, i),
            Event::StepEnd(w) => run.step_end(now, w),
        }
    }
    Ok(run.report(trace))
}

impl Run<'_> {
    fn push(&mut self, at: u64, event: Event) {
        self.queue.push(Reverse((at, self.order, event)));
        self.order += 1;
    }

    fn arrive(&mut self, now: u64, i: usize) {
        while self
            .pending_events
            .front()
            .is_some_and(|(at, _, _)| *at <= now)
        {
            if let Some((_, w, events)) = self.pending_events.pop_front() {
                self.deliver(w, &events);
            }
        }
        let r = i % self.routers.len();
        let Some(d) = self.routers[r].route(i as u64, &self.reqs[i].hashes) else {
            return;
        };
        let w = d.worker as usize;
        self.times[i].worker = w;
        self.workers[w].submit(i, &self.reqs[i]);
        if !self.busy[w] {
            self.start_step(now, w);
        }
    }

    fn start_step(&mut self, now: u64, w: usize) {
        let mut dropped = Vec::new();
        let step = self.workers[w].begin_step(&self.reqs, &self.config.timing, &mut dropped);
        for i in dropped {
            tracing::warn!(
                request = i,
                worker = w,
                "request does not fit the worker's KV cache"
            );
            self.dropped += 1;
            let r = i % self.routers.len();
            self.routers[r].finished(i as u64);
        }
        if let Some(us) = step {
            self.busy[w] = true;
            self.push(now + us, Event::StepEnd(w));
        }
    }

    fn step_end(&mut self, now: u64, w: usize) {
        self.busy[w] = false;
        let mut out = StepOutput::default();
        self.workers[w].end_step(&self.reqs, &mut out);
        let routers = self.routers.len();
        for &i in &out.first_tokens {
            self.times[i].first = Some(now);
            self.routers[i % routers].prefill_done(i as u64);
        }
        for &i in &out.tokens {
            let t = &mut self.times[i];
            if t.first != Some(now) {
                self.itl.push(now - t.last_token);
            }
            t.last_token = now;
        }
        for f in &out.finished {
            let t = &mut self.times[f.id];
            t.done = Some(now);
            t.cached = f.first_cached_tokens;
            self.routers[f.id % routers].finished(f.id as u64);
        }
        let events = self.workers[w].take_events();
        if !events.is_empty() {
            if self.config.event_delay_ms > 0.0 {
                let at = now + (self.config.event_delay_ms * 1000.0).round() as u64;
                self.pending_events.push_back((at, w, events));
            } else {
                self.deliver(w, &events);
            }
        }
        self.start_step(now, w);
    }

    /// Hands a worker's events to every replica, losing some if asked to; a replica
    /// that sees a gap resyncs from the worker's snapshot.
    fn deliver(&mut self, w: usize, events: &[KvEvent]) {
        for r in 0..self.routers.len() {
            if self.config.event_loss > 0.0 && self.loss.next_f64() < self.config.event_loss {
                continue;
            }
            if self.routers[r].apply_events(w as WorkerId, events).is_err() {
                let (next_seq, hashes) = self.workers[w].snapshot();
                let snapshot = KvSnapshot { next_seq, hashes };
                if self.routers[r]
                    .apply_snapshot(w as WorkerId, &snapshot)
                    .is_ok()
                {
                    self.snapshots += 1;
                }
            }
        }
    }

    fn report(&self, trace: &[TraceRequest]) -> SimReport {
        let ms = |us: u64| us as f64 / 1000.0;
        let done: Vec<(usize, &RequestTimes)> = self
            .times
            .iter()
            .enumerate()
            .filter(|(_, t)| t.done.is_some())
            .collect();
        let mut ttft: Vec<u64> = done
            .iter()
            .filter_map(|(_, t)| t.first.map(|f| f - t.arrival))
            .collect();
        let mut e2e: Vec<u64> = done
            .iter()
            .filter_map(|(_, t)| t.done.map(|d| d - t.arrival))
            .collect();
        let mut itl = self.itl.clone();
        let prompt: u64 = done
            .iter()
            .map(|(i, _)| self.reqs[*i].prompt_len as u64)
            .sum();
        let cached: u64 = done.iter().map(|(_, t)| t.cached as u64).sum();
        let output: u64 = done
            .iter()
            .map(|(i, _)| self.reqs[*i].output_len as u64)
            .sum();
        let start = self.times.iter().map(|t| t.arrival).min().unwrap_or(0);
        let end = done
            .iter()
            .filter_map(|(_, t)| t.done)
            .max()
            .unwrap_or(start);
        let makespan = (end - start).max(1) as f64 / 1e6;
        let mut per_worker: Vec<WorkerReport> = self
            .workers
            .iter()
            .map(|w| WorkerReport {
                requests: 0,
                prompt_tokens: 0,
                prefill_tokens_computed: w.prefill_tokens_computed,
                busy: w.busy_us as f64 / 1e6 / makespan,
            })
            .collect();
        for (i, t) in &done {
            let wr = &mut per_worker[t.worker];
            wr.requests += 1;
            wr.prompt_tokens += self.reqs[*i].prompt_len as u64;
        }
        let mean_busy =
            per_worker.iter().map(|w| w.busy).sum::<f64>() / per_worker.len().max(1) as f64;
        let max_busy = per_worker.iter().map(|w| w.busy).fold(0.0, f64::max);
        let p = |v: &mut Vec<u64>, q: f64| ms(percentile(v, q));
        SimReport {
            router: self.config.cost.policy.name().to_string(),
            workers: self.config.workers,
            routers: self.config.routers,
            block_size: self.config.worker.block_size,
            blocks_per_worker: self.config.worker.num_blocks,
            seed: self.config.seed,
            requests: trace.len(),
            completed: done.len(),
            dropped: self.dropped,
            prefix_reuse: if prompt == 0 {
                0.0
            } else {
                cached as f64 / prompt as f64
            },
            ttft_p50_ms: p(&mut ttft, 0.50),
            ttft_p90_ms: p(&mut ttft, 0.90),
            ttft_p99_ms: p(&mut ttft, 0.99),
            itl_p50_ms: p(&mut itl, 0.50),
            itl_p90_ms: p(&mut itl, 0.90),
            itl_p99_ms: p(&mut itl, 0.99),
            e2e_p50_ms: p(&mut e2e, 0.50),
            e2e_p90_ms: p(&mut e2e, 0.90),
            e2e_p99_ms: p(&mut e2e, 0.99),
            throughput_tokens_per_s: output as f64 / makespan,
            requests_per_s: done.len() as f64 / makespan,
            makespan_s: makespan,
            busy_imbalance: if mean_busy > 0.0 {
                max_busy / mean_busy
            } else {
                1.0
            },
            snapshots: self.snapshots,
            per_worker,
        }
    }
}

/// Nearest-rank percentile (`q` in 0..=1) of unsorted values; 0 when empty.
fn percentile(values: &mut [u64], q: f64) -> u64 {
    if values.is_empty() {
        return 0;
    }
    values.sort_unstable();
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::Policy;

    #[test]
    fn runs_are_deterministic_and_kv_routing_reuses_more() {
        let trace = trace::generate(Shape::Documents, 150, 2.0, 3);
        let run_with = |policy| {
            let mut config = SimConfig::new(4, CostConfig::new(policy));
            config.worker.num_blocks = 4096;
            config.seed = 9;
            run(&config, &trace).expect("valid config")
        };
        let kv = run_with(Policy::Kv);
        assert_eq!(kv, run_with(Policy::Kv), "same seed, same report");
        let rr = run_with(Policy::RoundRobin);
        assert_eq!(kv.completed, 150);
        assert!(
            kv.prefix_reuse > rr.prefix_reuse + 0.1,
            "{} vs {}",
            kv.prefix_reuse,
            rr.prefix_reuse
        );
        assert!(kv.ttft_p99_ms > 0.0 && kv.itl_p50_ms > 0.0);
        let mut bad = SimConfig::new(0, CostConfig::new(Policy::Kv));
        assert!(matches!(run(&bad, &trace), Err(SimError::Config(m)) if m.contains("workers")));
        bad.workers = 2;
        bad.event_loss = 1.0;
        assert!(matches!(run(&bad, &trace), Err(SimError::Config(m)) if m.contains("event_loss")));
    }
}
