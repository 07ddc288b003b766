//! The simulator's cache accounting is the engine's: the same requests, run one
//! after another through the real engine (on the default model) and through a
//! simulated worker of the same size, take the same prefix hits, evictions included.

use tandem_engine::engine::{Engine, EngineConfig, Request};
use tandem_engine::paths;
use tandem_protocol::BlockHasher;
use tandem_router::sim::TimingModel;
use tandem_router::sim::worker::{SimRequest, SimWorker, StepOutput, WorkerConfig};

/// Prompts over four shared prefixes with distinct suffixes, long enough that a
/// 40-block cache must evict; the last repeats an earlier prompt whole.
fn prompts() -> Vec<Vec<u32>> {
    let tok = |k: u32, i: u32| {
        100 + (k.wrapping_mul(7919).wrapping_add(i.wrapping_mul(104_729))) % 20_000
    };
    let prefix = |k: u32, n: u32| (0..n).map(|i| tok(k, i)).collect::<Vec<u32>>();
    let plan: [(u32, u32, u32); 13] = [
        (1, 96, 10),
        (1, 96, 37),
        (2, 160, 5),
        (1, 96, 20),
        (3, 200, 12),
        (2, 160, 40),
        (1, 96, 3),
        (3, 200, 30),
        (2, 120, 9),
        (4, 230, 1),
        (1, 64, 50),
        (3, 200, 17),
        // Request 4 again, suffix and all.
        (3, 200, 12),
    ];
    plan.iter()
        .enumerate()
        .map(|(n, &(k, len, suffix))| {
            let n = if n == 12 { 4 } else { n };
            let mut p = prefix(k, len);
            p.extend((0..suffix).map(|i| tok(1000 + n as u32, i)));
            p
        })
        .collect()
}

#[test]
fn simulated_worker_hits_match_the_engine() {
    let config = EngineConfig {
        block_size: 16,
        kv_cache_tokens: 640,
        // Small steps: every prompt is prefilled in chunks, registering blocks between them.
        max_batch_tokens: 48,
        max_running: 64,
        threads: Some(1),
        ..EngineConfig::default()
    };
    let engine =
        Engine::load(paths::test_model_path(), config.clone()).expect("load the default model");
    let max_tokens = 3;
    let prompts = prompts();
    let engine_hits: Vec<usize> = prompts
        .iter()
        .map(|p| {
            let mut r = Request::new(p.clone(), max_tokens);
            r.ignore_eos = true;
            let g = engine
                .submit(r)
                .expect("submit")
                .wait()
                .expect("generation");
            assert_eq!(g.tokens.len(), max_tokens);
            g.usage.cached_tokens
        })
        .collect();

    let mut worker = SimWorker::new(WorkerConfig {
        block_size: config.block_size,
        num_blocks: config.num_blocks(),
        max_batch_tokens: config.max_batch_tokens,
        max_running: config.max_running,
    });
    let hasher = BlockHasher::new("agreement", config.block_size);
    let reqs: Vec<SimRequest> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| SimRequest::new(p, max_tokens, &hasher, i as u64))
        .collect();
    let timing = TimingModel::cpu();
    let mut sim_hits = Vec::new();
    for i in 0..reqs.len() {
        worker.submit(i, &reqs[i]);
        let mut dropped = Vec::new();
        let mut out = StepOutput::default();
        while worker.begin_step(&reqs, &timing, &mut dropped).is_some() {
            worker.end_step(&reqs, &mut out);
        }
        assert!(dropped.is_empty());
        assert_eq!(out.finished.len(), 1);
        sim_hits.push(out.finished[0].cached_tokens);
    }
    assert_eq!(sim_hits, engine_hits);
    // The trace exercises both reuse and eviction: some prompts hit, and the
    // repeated prompt finds its shared prefix still cached but its one-off
    // suffix block evicted (shared blocks outlive one-off ones).
    assert!(
        engine_hits.iter().filter(|&&h| h > 0).count() >= 4,
        "{engine_hits:?}"
    );
    assert_eq!(
        engine_hits[12], 192,
        "prefix 3 kept whole, the suffix block evicted: {engine_hits:?}"
    );
}
