//! Two router replicas fed by the same workers keep the same index, even when one
//! of them misses an event: it sees the gap in the worker's sequence numbers, asks
//! for a snapshot, and comes back in line with the worker and the other replica.

use tandem_protocol::BlockHasher;
use tandem_router::sim::TimingModel;
use tandem_router::sim::trace::{Shape, generate};
use tandem_router::sim::worker::{SimRequest, SimWorker, StepOutput, WorkerConfig};
use tandem_router::{CostConfig, IndexError, KvRouter, KvSnapshot, Overlaps, Policy};

#[test]
fn replica_that_drops_an_event_resyncs_from_a_snapshot() {
    let trace = generate(Shape::Conversations, 120, 50.0, 7);
    let hasher = BlockHasher::new("replicas", 16);
    let reqs: Vec<SimRequest> = trace
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut tokens = r.prompt_tokens(i as u64);
            tokens.truncate(600);
            SimRequest::new(&tokens, 4, &hasher, i as u64)
        })
        .collect();
    let config = WorkerConfig {
        block_size: 16,
        num_blocks: 256,
        max_batch_tokens: 512,
        max_running: 16,
    };
    let mut workers: Vec<SimWorker> = (0..3).map(|_| SimWorker::new(config)).collect();
    let mut a = KvRouter::new(CostConfig::new(Policy::Kv), 1);
    let mut b = KvRouter::new(CostConfig::new(Policy::Kv), 2);
    for w in 0..3 {
        a.add_worker(w).expect("new worker");
        b.add_worker(w).expect("new worker");
    }
    let timing = TimingModel::cpu();
    let (mut dropped_one, mut gaps, mut resynced) = (false, 0, 0);
    for (i, req) in reqs.iter().enumerate() {
        // Replica A routes; both replicas see every event but the one B drops.
        let w = a.route(i as u64, &req.hashes).expect("workers").worker as usize;
        workers[w].submit(i, req);
        for (wi, worker) in workers.iter_mut().enumerate() {
            let mut out = StepOutput::default();
            let mut dropped = Vec::new();
            if worker.begin_step(&reqs, &timing, &mut dropped).is_some() {
                worker.end_step(&reqs, &mut out);
            }
            for f in &out.finished {
                a.finished(f.id as u64);
            }
            let events = worker.take_events();
            for (k, e) in events.iter().enumerate() {
                a.apply_event(wi as u64, e)
                    .expect("replica A sees every event in order");
                if !dropped_one && i > 40 && k == 0 && events.len() > 1 {
                    dropped_one = true;
                    continue;
                }
                match b.apply_event(wi as u64, e) {
                    Ok(_) => {}
                    Err(IndexError::Gap { .. }) => gaps += 1,
                    Err(e) => panic!("unexpected {e}"),
                }
            }
        }
        for stale in b.index().needs_snapshot() {
            let (next_seq, hashes) = workers[stale as usize].snapshot();
            b.apply_snapshot(stale, &KvSnapshot { next_seq, hashes })
                .expect("known worker");
            resynced += 1;
        }
    }
    assert!(
        dropped_one && gaps == 1 && resynced == 1,
        "{dropped_one} {gaps} {resynced}"
    );
    let mut overlaps_a = Overlaps::default();
    let mut overlaps_b = Overlaps::default();
    for (w, worker) in workers.iter().enumerate() {
        let (_, mut truth) = worker.snapshot();
        truth.sort_unstable();
        assert!(!truth.is_empty());
        assert_eq!(
            a.index().worker_hashes(w as u64),
            truth,
            "replica A, worker {w}"
        );
        assert_eq!(
            b.index().worker_hashes(w as u64),
            truth,
            "replica B, worker {w}"
        );
    }
    for req in &reqs {
        a.index().overlaps(&req.hashes, &mut overlaps_a);
        b.index().overlaps(&req.hashes, &mut overlaps_b);
        overlaps_a.scores.sort_unstable();
        overlaps_b.scores.sort_unstable();
        assert_eq!(overlaps_a.scores, overlaps_b.scores);
    }
}
