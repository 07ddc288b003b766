//! `tandem bench router`: the router's speed at fleet scale, as plain timings.
//!
//! For 64 and 512 workers it fills a KV index through the event path (one `Stored`
//! event per block, as the engine emits them) with prompt chains that share
//! system-prompt prefixes, times that ingestion, then times routing decisions for
//! 8,192-token prompts that are cached on one or two workers, and reports the
//! index's bytes per indexed (worker, block) pair.

use std::hint::black_box;
use std::time::Instant;

use clap::Args;
use serde::Serialize;
use tandem_protocol::{BlockHash, BlockHasher, KvEvent, KvEventKind};
use tandem_router::{CostConfig, KvRouter, Policy, WorkerId};

/// Options of `tandem bench router`.
#[derive(Debug, Args)]
pub struct RouterBenchArgs {
    /// (worker, block) pairs to index at each fleet size.
    #[arg(long, default_value_t = 5_000_000)]
    pub blocks: usize,
    /// Tokens per block (prompt blocks = 8192 / block size).
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Timed routing decisions at each fleet size.
    #[arg(long, default_value_t = 5000)]
    pub decisions: usize,
    /// Repetitions of each measurement; the best is reported.
    #[arg(long, default_value_t = 3)]
    pub repetitions: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Figures for one fleet size.
#[derive(Debug, Serialize)]
struct FleetResult {
    workers: usize,
    indexed_blocks: usize,
    distinct_hashes: usize,
    ingest_blocks_per_s: f64,
    /// The same events applied in per-worker batches of up to 64, as a worker publishes them.
    ingest_batched_blocks_per_s: f64,
    remove_blocks_per_s: f64,
    remove_batched_blocks_per_s: f64,
    bytes_per_block: f64,
    rss_bytes_per_block: Option<f64>,
    decision_mean_us: f64,
    decision_p99_us: f64,
    decision_miss_mean_us: f64,
}

#[derive(Debug, Serialize)]
struct RouterBench {
    prompt_tokens: usize,
    block_size: usize,
    hash_prompt_us: f64,
    fleets: Vec<FleetResult>,
}

const PROMPT_TOKENS: usize = 8192;

fn mix(a: u64, b: u64) -> u64 {
    let mut z = a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z ^ (z >> 31)
}

/// Chain `c`'s block hashes: a 64-block prefix shared by its group of 16, then its own.
fn chain(c: u64, blocks: usize) -> Vec<BlockHash> {
    (0..blocks as u64)
        .map(|i| {
            if i < 64 {
                BlockHash(mix(1 << 40 | (c % 16), i))
            } else {
                BlockHash(mix(c, i))
            }
        })
        .collect()
}

fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn fleet(workers: usize, args: &RouterBenchArgs) -> anyhow::Result<FleetResult> {
    let prompt_blocks = PROMPT_TOKENS / args.block_size;
    // Chain c lives on worker c % W; every fourth chain also on the next worker.
    let chains = (args.blocks as f64 / (prompt_blocks as f64 * 1.25)).ceil() as u64;
    let mut seq = vec![0u64; workers];
    let mut events: Vec<(WorkerId, KvEvent)> = Vec::with_capacity(args.blocks + prompt_blocks);
    for c in 0..chains {
        let hashes = chain(c, prompt_blocks);
        let holders: &[u64] = if c % 4 == 0 { &[0, 1] } else { &[0] };
        for &k in holders {
            let w = ((c + k) % workers as u64) as usize;
            let mut parent = None;
            for &h in &hashes {
                events.push((
                    w as WorkerId,
                    KvEvent {
                        seq: seq[w],
                        kind: KvEventKind::Stored {
                            parent,
                            hashes: vec![h],
                        },
                    },
                ));
                seq[w] += 1;
                parent = Some(h);
            }
        }
    }
    let removals: Vec<(WorkerId, KvEvent)> = events
        .iter()
        .map(|(w, e)| {
            let hashes = match &e.kind {
                KvEventKind::Stored { hashes, .. } => hashes.clone(),
                _ => Vec::new(),
            };
            let s = seq[*w as usize];
            seq[*w as usize] += 1;
            (
                *w,
                KvEvent {
                    seq: s,
                    kind: KvEventKind::Removed { hashes },
                },
            )
        })
        .collect();
    let queries: Vec<Vec<BlockHash>> = (0..256)
        .map(|i| chain(mix(i, 7) % chains, prompt_blocks))
        .collect();
    let miss = chain(u64::MAX, prompt_blocks);
    let distinct = index_hashes(&events);

    // Each repetition starts from an empty index; the best repetition of each phase
    // is reported, the figure least disturbed by other work on a shared machine.
    let mut best: Option<FleetResult> = None;
    for rep in 0..args.repetitions.max(1) {
        let mut router = KvRouter::new(CostConfig::new(Policy::Kv), 1);
        for w in 0..workers {
            router.add_worker(w as WorkerId)?;
        }
        let rss_before = rss_bytes();
        // Sized up front for the distinct blocks it will hold, as a router sized for
        // its workers' cache capacities would be; the reservation counts in the
        // memory figures.
        router.reserve(distinct);
        let started = Instant::now();
        for (w, e) in &events {
            router.apply_event(*w, e)?;
        }
        let ingest_s = started.elapsed().as_secs_f64();
        let rss_after = rss_bytes();
        let entries = router.index().num_entries();
        let bytes_per_block = router.index().memory_bytes() as f64 / entries as f64;
        // Only the first repetition grows the heap; later ones reuse freed memory.
        let rss_per_block = match (rep, rss_before, rss_after) {
            (0, Some(a), Some(b)) if b > a => Some((b - a) as f64 / entries as f64),
            _ => None,
        };

        // Decisions: prompts cached on one or two workers, sharing a prefix with many.
        let mut times = Vec::with_capacity(args.decisions);
        for i in 0..args.decisions {
            let q = &queries[i % queries.len()];
            let t = Instant::now();
            let d = router.route(i as u64, black_box(q));
            times.push(t.elapsed().as_secs_f64() * 1e6);
            black_box(d);
            router.finished(i as u64);
        }
        times.sort_by(f64::total_cmp);
        let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
        let p99 = times
            .get(((times.len() as f64 * 0.99).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(0.0);
        let t = Instant::now();
        for i in 0..args.decisions {
            black_box(router.route(i as u64, black_box(&miss)));
            router.finished(i as u64);
        }
        let miss_mean = t.elapsed().as_secs_f64() * 1e6 / args.decisions.max(1) as f64;

        // Removal: evict the blocks again, one Removed event per block.
        let started = Instant::now();
        for (w, e) in &removals {
            router.apply_event(*w, e)?;
        }
        let remove_s = started.elapsed().as_secs_f64();
        anyhow::ensure!(
            router.index().num_entries() == 0,
            "removal left {} blocks indexed",
            router.index().num_entries()
        );
        // The same stream in per-worker batches, through a fresh index.
        let mut batched = KvRouter::new(CostConfig::new(Policy::Kv), 1);
        for w in 0..workers {
            batched.add_worker(w as WorkerId)?;
        }
        batched.reserve(distinct);
        let ingest_batched_s = apply_batched(&mut batched, &events)?;
        let remove_batched_s = apply_batched(&mut batched, &removals)?;
        anyhow::ensure!(
            batched.index().num_entries() == 0,
            "batched removal left blocks indexed"
        );
        drop(batched);
        let this = FleetResult {
            workers,
            indexed_blocks: entries,
            distinct_hashes: 0,
            ingest_blocks_per_s: events.len() as f64 / ingest_s,
            ingest_batched_blocks_per_s: events.len() as f64 / ingest_batched_s,
            remove_blocks_per_s: removals.len() as f64 / remove_s,
            remove_batched_blocks_per_s: removals.len() as f64 / remove_batched_s,
            bytes_per_block,
            rss_bytes_per_block: rss_per_block,
            decision_mean_us: mean,
            decision_p99_us: p99,
            decision_miss_mean_us: miss_mean,
        };
        best = Some(match best {
            None => this,
            Some(b) => FleetResult {
                ingest_blocks_per_s: b.ingest_blocks_per_s.max(this.ingest_blocks_per_s),
                ingest_batched_blocks_per_s: b
                    .ingest_batched_blocks_per_s
                    .max(this.ingest_batched_blocks_per_s),
                remove_blocks_per_s: b.remove_blocks_per_s.max(this.remove_blocks_per_s),
                remove_batched_blocks_per_s: b
                    .remove_batched_blocks_per_s
                    .max(this.remove_batched_blocks_per_s),
                decision_miss_mean_us: b.decision_miss_mean_us.min(this.decision_miss_mean_us),
                ..if this.decision_mean_us < b.decision_mean_us {
                    FleetResult {
                        rss_bytes_per_block: b.rss_bytes_per_block,
                        ..this
                    }
                } else {
                    b
                }
            },
        });
    }
    let mut result = best.ok_or_else(|| anyhow::anyhow!("no repetitions ran"))?;
    result.distinct_hashes = distinct;
    Ok(result)
}

/// Applies events grouped into runs of up to 64 consecutive events of one worker;
/// returns the seconds taken.
fn apply_batched(router: &mut KvRouter, events: &[(WorkerId, KvEvent)]) -> anyhow::Result<f64> {
    let mut batches: Vec<(WorkerId, Vec<KvEvent>)> = Vec::new();
    for (w, e) in events {
        match batches.last_mut() {
            Some((bw, b)) if bw == w && b.len() < 64 => b.push(e.clone()),
            _ => batches.push((*w, vec![e.clone()])),
        }
    }
    let started = Instant::now();
    for (w, b) in &batches {
        router.apply_events(*w, b)?;
    }
    Ok(started.elapsed().as_secs_f64())
}

fn index_hashes(events: &[(WorkerId, KvEvent)]) -> usize {
    let mut all: Vec<u64> = events
        .iter()
        .flat_map(|(_, e)| match &e.kind {
            KvEventKind::Stored { hashes, .. } => hashes.iter().map(|h| h.0).collect(),
            _ => Vec::new(),
        })
        .collect();
    all.sort_unstable();
    all.dedup();
    all.len()
}

/// Runs `tandem bench router`.
pub fn run(args: &RouterBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=PROMPT_TOKENS).contains(&args.block_size),
        "--block-size must be in 1..=8192"
    );
    anyhow::ensure!(
        args.blocks > 0 && args.decisions > 0,
        "--blocks and --decisions must be positive"
    );
    let hasher = BlockHasher::new("bench", args.block_size);
    let tokens: Vec<u32> = (0..PROMPT_TOKENS as u32)
        .map(|t| t.wrapping_mul(2_654_435_761) % 50_000)
        .collect();
    let reps = 200;
    let t = Instant::now();
    for _ in 0..reps {
        black_box(hasher.hash_prefix(black_box(&tokens)));
    }
    let hash_us = t.elapsed().as_secs_f64() * 1e6 / reps as f64;
    let mut fleets = Vec::new();
    for workers in [64, 512] {
        let mut f = fleet(workers, args)?;
        if !fleets.is_empty() {
            // The heap already holds the first fleet's freed memory: RSS says nothing.
            f.rss_bytes_per_block = None;
        }
        fleets.push(f);
    }
    let bench = RouterBench {
        prompt_tokens: PROMPT_TOKENS,
        block_size: args.block_size,
        hash_prompt_us: hash_us,
        fleets,
    };
    if args.json {
        println!("{}", serde_json::to_string(&bench)?);
        return Ok(());
    }
    println!(
        "prompt {} tokens = {} blocks of {}; hashing it: {:.1} µs",
        bench.prompt_tokens,
        bench.prompt_tokens / bench.block_size,
        bench.block_size,
        bench.hash_prompt_us
    );
    for f in &bench.fleets {
        println!(
            "{} workers: {} blocks indexed ({} distinct hashes)\n  ingest {:.2} M blocks/s ({:.2} in batches) · remove {:.2} M blocks/s ({:.2} in batches) · {:.1} bytes/block (RSS {})\n  decision mean {:.2} µs p99 {:.2} µs · uncached prompt {:.2} µs",
            f.workers,
            f.indexed_blocks,
            f.distinct_hashes,
            f.ingest_blocks_per_s / 1e6,
            f.ingest_batched_blocks_per_s / 1e6,
            f.remove_blocks_per_s / 1e6,
            f.remove_batched_blocks_per_s / 1e6,
            f.bytes_per_block,
            f.rss_bytes_per_block
                .map_or_else(|| "n/a".to_string(), |b| format!("{b:.1}")),
            f.decision_mean_us,
            f.decision_p99_us,
            f.decision_miss_mean_us
        );
    }
    Ok(())
}
