//! `tandem sim`: replays a request trace through the router against simulated workers.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use tandem_router::sim::{self, SimConfig, SimReport, TimingModel, trace};
use tandem_router::{CostConfig, Policy};

/// Options of `tandem sim`.
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("source").required(true))]
pub struct SimArgs {
    /// A Mooncake-format trace (JSON lines: timestamp ms, input_length, output_length, hash_ids).
    #[arg(long, group = "source")]
    pub trace: Option<PathBuf>,
    /// Generate a trace instead: `conversations` or `documents`.
    #[arg(long, group = "source")]
    pub generate: Option<trace::Shape>,
    /// Requests to generate.
    #[arg(long, default_value_t = 4000)]
    pub requests: usize,
    /// Mean arrival rate of generated requests, per second.
    #[arg(long, default_value_t = 4.0)]
    pub rate: f64,
    /// Also write the generated trace here.
    #[arg(long)]
    pub write_trace: Option<PathBuf>,
    /// Simulated workers.
    #[arg(long, default_value_t = 8)]
    pub workers: usize,
    /// Routing policy: round-robin, random, kv, kv-load (comma-separated to compare several).
    #[arg(long, default_value = "kv-load", value_delimiter = ',')]
    pub router: Vec<Policy>,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 64)]
    pub block_size: usize,
    /// KV blocks per worker.
    #[arg(long, default_value_t = 16_384)]
    pub blocks_per_worker: usize,
    /// Tokens per engine step (prefill chunk budget).
    #[arg(long, default_value_t = 8192)]
    pub max_batch_tokens: usize,
    /// Sequences running at once per worker.
    #[arg(long, default_value_t = 256)]
    pub max_running: usize,
    /// Timing profile: `gpu` (8B-class model on one GPU, Dynamo's mocker's shape), `h200`
    /// (8B kernels measured on an H200) or `cpu` (tandem's CPU engine on SmolLM2-135M).
    #[arg(long, default_value = "gpu")]
    pub timing: String,
    /// Scale every step time by this factor (above 1 models a slower worker).
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Weight of uncached prompt blocks in the cost (default: the policy's).
    #[arg(long)]
    pub prefill_weight: Option<f64>,
    /// Weight of active decode blocks in the cost (default: the policy's).
    #[arg(long)]
    pub decode_weight: Option<f64>,
    /// Weight of queued prefill blocks in the kv-load cost (default: the policy's).
    #[arg(long)]
    pub queue_weight: Option<f64>,
    /// Softmax temperature over normalized costs (0 picks the lowest).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Count blocks of routed, unfinished requests as already on their worker.
    #[arg(long)]
    pub track_pending: bool,
    /// Router replicas sharing the workers' event streams.
    #[arg(long, default_value_t = 1)]
    pub routers: usize,
    /// Delay before KV events reach the routers, in ms of virtual time.
    #[arg(long, default_value_t = 0.0)]
    pub event_delay_ms: f64,
    /// Probability that a replica misses a batch of events (it then resyncs from a snapshot).
    #[arg(long, default_value_t = 0.0)]
    pub event_loss: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object per router (one line each).
    #[arg(long)]
    pub json: bool,
}

/// Runs `tandem sim`.
pub fn run(args: &SimArgs) -> anyhow::Result<()> {
    let requests = match (&args.trace, args.generate) {
        (Some(path), _) => {
            trace::load(path).with_context(|| format!("loading trace {}", path.display()))?
        }
        (None, Some(shape)) => {
            anyhow::ensure!(
                args.rate > 0.0 && args.rate.is_finite(),
                "--rate must be positive"
            );
            let t = trace::generate(shape, args.requests, args.rate, args.seed);
            if let Some(path) = &args.write_trace {
                trace::write(path, &t)
                    .with_context(|| format!("writing trace {}", path.display()))?;
            }
            t
        }
        (None, None) => anyhow::bail!("give --trace or --generate"),
    };
    anyhow::ensure!(
        args.time_scale > 0.0 && args.time_scale.is_finite(),
        "--time-scale must be positive"
    );
    let timing = TimingModel::profile(&args.timing)
        .with_context(|| {
            format!(
                "unknown --timing {:?}; expected gpu, h200 or cpu",
                args.timing
            )
        })?
        .scaled(args.time_scale);
    for &policy in &args.router {
        let mut cost = CostConfig::new(policy);
        cost.prefill_weight = args.prefill_weight.unwrap_or(cost.prefill_weight);
        cost.decode_weight = args.decode_weight.unwrap_or(cost.decode_weight);
        cost.queue_weight = args.queue_weight.unwrap_or(cost.queue_weight);
        cost.temperature = args.temperature;
        cost.track_pending |= args.track_pending;
        let mut config = SimConfig::new(args.workers, cost);
        config.routers = args.routers;
        config.worker.block_size = args.block_size;
        config.worker.num_blocks = args.blocks_per_worker;
        config.worker.max_batch_tokens = args.max_batch_tokens;
        config.worker.max_running = args.max_running;
        config.timing = timing;
        config.seed = args.seed;
        config.event_delay_ms = args.event_delay_ms;
        config.event_loss = args.event_loss;
        let started = Instant::now();
        let report = sim::run(&config, &requests).context("running the simulation")?;
        let wall_ms = started.elapsed().as_secs_f64() * 1000.0;
        if args.json {
            let mut v = serde_json::to_value(&report)?;
            v["wall_ms"] = serde_json::json!(wall_ms.round());
            println!("{v}");
        } else {
            print_report(&report, wall_ms);
        }
    }
    Ok(())
}

fn print_report(r: &SimReport, wall_ms: f64) {
    println!(
        "router {} · {} workers · block {} · {} blocks/worker · seed {}",
        r.router, r.workers, r.block_size, r.blocks_per_worker, r.seed
    );
    println!(
        "  requests {} completed {} dropped {} · prefix reuse {:.3} · snapshots {}",
        r.requests, r.completed, r.dropped, r.prefix_reuse, r.snapshots
    );
    println!(
        "  TTFT ms p50 {:.0} p90 {:.0} p99 {:.0} · ITL ms p50 {:.1} p90 {:.1} p99 {:.1} · e2e ms p50 {:.0} p90 {:.0} p99 {:.0}",
        r.ttft_p50_ms,
        r.ttft_p90_ms,
        r.ttft_p99_ms,
        r.itl_p50_ms,
        r.itl_p90_ms,
        r.itl_p99_ms,
        r.e2e_p50_ms,
        r.e2e_p90_ms,
        r.e2e_p99_ms
    );
    let busy: Vec<String> = r
        .per_worker
        .iter()
        .map(|w| format!("{:.2}", w.busy))
        .collect();
    println!(
        "  {:.0} output tok/s · {:.2} req/s · makespan {:.0} s · busy [{}] imbalance {:.2} · simulated in {:.0} ms",
        r.throughput_tokens_per_s,
        r.requests_per_s,
        r.makespan_s,
        busy.join(" "),
        r.busy_imbalance,
        wall_ms
    );
}
