//! `tandem bench frontend`: what the router costs per request.
//!
//! It starts an embedded store, one decode worker in echo mode (it answers at
//! once, without running the model) and a router, as real processes. The same
//! load runs twice at the same concurrency: straight to the worker over gRPC,
//! then through the router's OpenAI API (HTTP, SSE). The router's CPU time per
//! request comes from `/proc` (user + system, across the routed phase), and its
//! added latency is the difference of the two phases' percentiles.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tandem_control_plane::Store;
use tandem_kv_transfer::tls::ClusterCa;
use tandem_prefill_worker::runtime::ClusterTls;
use tandem_protocol::grpc::worker::{GenerateRequest, Sampling, generate_response::Event};
use tandem_protocol::{InstanceInfo, Role, keys};
use tokio::process::{Child, Command};

use crate::bench_serve::{Percentiles, ServeBenchArgs};
use crate::up::{LoopbackStore, issue_identity};

/// What to run.
#[derive(Debug, Clone, clap::Args)]
pub struct FrontendBenchArgs {
    /// The GGUF the echo worker takes its tokenizer from (default: the default model).
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: Option<std::path::PathBuf>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 50)]
    pub concurrency: usize,
    /// Requests per phase.
    #[arg(long, default_value_t = 5_000)]
    pub requests: usize,
    /// Start requests at this rate per second (open loop, capped by
    /// `--concurrency`); without it the load is closed-loop at full concurrency.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens per response.
    #[arg(long, default_value_t = 2)]
    pub output_tokens: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct FrontendBenchReport {
    pub concurrency: usize,
    pub rate: Option<f64>,
    pub requests: usize,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    /// End-to-end latency straight to the worker over gRPC, ms.
    pub direct_ms: Percentiles,
    /// End-to-end latency through the router's HTTP API, ms.
    pub routed_ms: Percentiles,
    pub added_p50_ms: f64,
    pub added_p99_ms: f64,
    /// Router CPU time (user + system) per routed request, ms.
    pub router_cpu_ms_per_request: f64,
    pub direct_requests_per_s: f64,
    pub routed_requests_per_s: f64,
    pub routed_failed: usize,
}

/// Runs the benchmark and prints its report.
pub fn run(args: &FrontendBenchArgs, model: &Path) -> anyhow::Result<()> {
    let report = crate::runtime()?.block_on(measure(args, model))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let rate = report
            .rate
            .map_or_else(|| "closed loop".to_owned(), |r| format!("{r} requests/s"));
        println!(
            "{} requests per phase at concurrency {} ({rate}), prompt {} tokens, {} output tokens",
            report.requests, report.concurrency, report.prompt_tokens, report.output_tokens
        );
        println!(
            "{:<28} {:>9} {:>9} {:>9}",
            "end-to-end ms", "p50", "p99", "req/s"
        );
        println!(
            "{:<28} {:>9.3} {:>9.3} {:>9.0}",
            "direct to worker (gRPC)",
            report.direct_ms.p50,
            report.direct_ms.p99,
            report.direct_requests_per_s
        );
        println!(
            "{:<28} {:>9.3} {:>9.3} {:>9.0}",
            "through the router (HTTP)",
            report.routed_ms.p50,
            report.routed_ms.p99,
            report.routed_requests_per_s
        );
        println!(
            "router adds {:.3} ms at p50, {:.3} ms at p99; router CPU {:.3} ms per request ({} failed)",
            report.added_p50_ms,
            report.added_p99_ms,
            report.router_cpu_ms_per_request,
            report.routed_failed
        );
    }
    Ok(())
}

/// Kills a child process when dropped, so an error leaves nothing running.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

async fn measure(args: &FrontendBenchArgs, model: &Path) -> anyhow::Result<FrontendBenchReport> {
    anyhow::ensure!(
        args.concurrency >= 1 && args.requests >= 1,
        "nothing to run"
    );
    let dir = std::env::temp_dir().join(format!("tandem-bench-frontend-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = measure_in(args, model, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn measure_in(
    args: &FrontendBenchArgs,
    model: &Path,
    dir: &Path,
) -> anyhow::Result<FrontendBenchReport> {
    let local_store = LoopbackStore::start(&dir.join("store")).await?;
    let (store, store_url) = (local_store.store.clone(), local_store.url.clone());

    let ca = ClusterCa::generate("tandem bench frontend")?;
    let worker_tls = issue_identity(&ca, dir, "echo-0")?;
    let router_tls = issue_identity(&ca, dir, "router-bench")?;
    let client_tls = ClusterTls::load(&issue_identity(&ca, dir, "client")?)?;
    let router_port = std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port();
    let exe = std::env::current_exe().context("finding the tandem binary")?;
    let _worker = Proc(
        Command::new(&exe)
            .args(["decode", "--echo", "--id", "echo-0", "--threads", "1"])
            .arg("--model")
            .arg(model)
            .args(["--store", &store_url])
            .arg("--tls-dir")
            .arg(&worker_tls)
            .kill_on_drop(true)
            .spawn()
            .context("starting the echo worker")?,
    );
    let router = Proc(
        Command::new(&exe)
            .args(["router", "--id", "router-bench", "--disagg", "never"])
            .args(["--listen", &format!("127.0.0.1:{router_port}")])
            .args(["--store", &store_url])
            .args(["--max-concurrent-requests", "100000"])
            .arg("--tls-dir")
            .arg(&router_tls)
            .kill_on_drop(true)
            .spawn()
            .context("starting the router")?,
    );
    let router_pid = router.0.id().context("the router exited at once")?;

    // Both registered, and the router sees the worker.
    let deadline = Instant::now() + Duration::from_secs(60);
    let worker = loop {
        let (kvs, _) = store.list(&keys::instances("local")).await?;
        let infos: Vec<InstanceInfo> = kvs
            .iter()
            .filter_map(|kv| InstanceInfo::from_json(&kv.key, &kv.value).ok())
            .collect();
        let worker = infos.iter().find(|i| i.role == Role::Decode).cloned();
        let router_up = infos.iter().any(|i| i.role == Role::Router);
        if let (Some(w), true) = (worker, router_up) {
            let health = reqwest::get(format!("http://127.0.0.1:{router_port}/health")).await;
            if health.is_ok_and(|r| r.status().is_success()) {
                break w;
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the cluster did not come up in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let prompt: Vec<u32> = (0..args.prompt_tokens as u32).map(|i| 1_000 + i).collect();
    let client = client_tls.worker_client(&worker.grpc_addr)?;
    // Warm both paths (connections, first-request costs).
    direct_phase(
        &client,
        &prompt,
        args,
        args.concurrency.min(args.requests),
        None,
    )
    .await?;
    let serve_args = ServeBenchArgs {
        url: format!("http://127.0.0.1:{router_port}/v1"),
        concurrency: args.concurrency,
        requests: args.concurrency.min(args.requests),
        rate: None,
        prompt_tokens: args.prompt_tokens,
        output_tokens: args.output_tokens,
        shared_prefix_tokens: 0,
        long_prompt_tokens: 0,
        long_fraction: 0.0,
        model: None,
        api_key: None,
        seed: 1,
        json: false,
    };
    crate::bench_serve::measure(&serve_args).await?;

    let start = Instant::now();
    let direct = direct_phase(&client, &prompt, args, args.requests, args.rate).await?;
    let direct_rps = args.requests as f64 / start.elapsed().as_secs_f64();

    let cpu_before = cpu_seconds(router_pid)?;
    let routed = crate::bench_serve::measure(&ServeBenchArgs {
        requests: args.requests,
        rate: args.rate,
        ..serve_args
    })
    .await?;
    let cpu = cpu_seconds(router_pid)? - cpu_before;

    let direct_ms = Percentiles::of(direct);
    drop(router);
    local_store.stop().await?;
    Ok(FrontendBenchReport {
        concurrency: args.concurrency,
        rate: args.rate,
        requests: args.requests,
        prompt_tokens: args.prompt_tokens,
        output_tokens: args.output_tokens,
        added_p50_ms: routed.e2e_ms.p50 - direct_ms.p50,
        added_p99_ms: routed.e2e_ms.p99 - direct_ms.p99,
        direct_ms,
        routed_ms: routed.e2e_ms,
        router_cpu_ms_per_request: cpu * 1e3 / args.requests as f64,
        direct_requests_per_s: direct_rps,
        routed_requests_per_s: routed.requests_per_s,
        routed_failed: routed.failed,
    })
}

/// `requests` Generate calls straight to the worker, `concurrency` at a time;
/// each one's end-to-end latency in ms.
async fn direct_phase(
    client: &tandem_protocol::grpc::worker::worker_client::WorkerClient<tonic::transport::Channel>,
    prompt: &[u32],
    args: &FrontendBenchArgs,
    requests: usize,
    rate: Option<f64>,
) -> anyhow::Result<Vec<f64>> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let phase_start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency.min(requests) {
        let (mut client, next, prompt) = (client.clone(), next.clone(), prompt.to_vec());
        let max_tokens = args.output_tokens as u32;
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= requests {
                    break;
                }
                crate::bench_serve::pace(phase_start, rate, i).await;
                let start = Instant::now();
                let request = GenerateRequest {
                    request_id: String::new(),
                    prompt: prompt.clone(),
                    sampling: Some(Sampling {
                        top_p: 1.0,
                        repetition_penalty: 1.0,
                        ..Sampling::default()
                    }),
                    max_tokens,
                    ignore_eos: true,
                    ..GenerateRequest::default()
                };
                let mut stream = client.generate(request).await?.into_inner();
                let mut finished = false;
                while let Some(msg) = stream.message().await? {
                    if let Some(Event::Finished(_)) = msg.event {
                        finished = true;
                    }
                }
                anyhow::ensure!(finished, "a direct request ended without Finished");
                out.push(start.elapsed().as_secs_f64() * 1e3);
            }
            Ok::<_, anyhow::Error>(out)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.context("a load task panicked")??);
    }
    Ok(all)
}

/// User + system CPU seconds a process has used.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at state.
    let rest = stat
        .rsplit_once(") ")
        .map(|(_, r)| r)
        .context("malformed /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        fields
            .get(i)
            .context("short /proc stat")?
            .parse::<f64>()
            .context("bad /proc stat field")
    };
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after state.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((ticks(11)? + ticks(12)?) / hz)
}
