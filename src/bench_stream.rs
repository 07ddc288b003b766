//! `tandem bench transfer --engines`: a prompt's KV moving between two real
//! engines the way a disaggregated request moves it. Engine A prefills the
//! prompt and streams each layer's blocks out as its steps complete them
//! (`KvStream`); they cross a transport into blocks engine B reserved. On a GPU
//! backend that is the staging path: device-to-host copies on A, host-to-device
//! on B. Per path it reports the time from submitting the prefill to B's
//! verified verdict, and the part of it that the prefill's compute did not hide
//! (verdict minus the end of A's prefill), beside the prefill alone.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tandem_engine::device::Device;
use tandem_engine::engine::{Engine, EngineConfig, KvStream, Request, RequestHandle, TokenEvent};
use tandem_kv_transfer::{
    KvReceiver, Session, TransferDescriptor, TransferMetrics, send_kv_stream,
};

use crate::bench_transfer::HostPaths;

/// Options of `tandem bench transfer --engines`.
#[derive(Debug, Clone)]
pub struct StreamBenchOptions {
    pub model: PathBuf,
    pub device: Device,
    /// Prompt tokens per prefill.
    pub tokens: usize,
    /// Timed prefills per path (after one warm-up).
    pub repetitions: usize,
    pub json: bool,
}

/// One path's medians.
#[derive(Debug, Clone, Serialize)]
pub struct StreamPath {
    pub path: &'static str,
    /// Submit to the receiver's verified verdict.
    pub total_ms: f64,
    /// The end of A's prefill to the verdict: transfer time compute did not hide.
    pub exposed_ms: f64,
    /// KV bytes moved per prefill.
    pub bytes: u64,
}

/// What `tandem bench transfer --engines` measures.
#[derive(Debug, Clone, Serialize)]
pub struct StreamBenchReport {
    pub model: String,
    pub device: String,
    pub tokens: usize,
    /// The prefill alone (submit to its end on A), median.
    pub prefill_ms: f64,
    pub paths: Vec<StreamPath>,
}

/// Runs the benchmark and prints a table or one JSON object.
pub fn run(opts: &StreamBenchOptions) -> anyhow::Result<StreamBenchReport> {
    anyhow::ensure!(opts.tokens >= 2, "--tokens must be at least 2");
    let config = EngineConfig {
        device: opts.device,
        kv_cache_tokens: 2 * opts.tokens + 64,
        ..EngineConfig::default()
    };
    let load = || {
        Engine::load(&opts.model, config.clone())
            .with_context(|| format!("loading {}", opts.model.display()))
    };
    let (a, b) = (load()?, load()?);
    let rt = crate::runtime()?;
    let report = rt.block_on(measure(&a, &b, opts))?;
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} on {}: a {}-token prompt's KV from engine A's prefill into engine B",
            report.model, report.device, report.tokens
        );
        println!("  prefill alone          {:>9.1} ms", report.prefill_ms);
        println!(
            "  {:<8} {:>12} {:>12} {:>10}",
            "path", "total ms", "exposed ms", "MB"
        );
        for p in &report.paths {
            println!(
                "  {:<8} {:>12.1} {:>12.2} {:>10.1}",
                p.path,
                p.total_ms,
                p.exposed_ms,
                p.bytes as f64 / 1e6
            );
        }
    }
    Ok(report)
}

/// A prompt of ordinary tokens, different for each `salt` (so no run reuses
/// a cached prefix on either engine).
fn prompt(vocab: usize, n: usize, salt: usize) -> Vec<u32> {
    let span = vocab.saturating_sub(1000).max(1);
    (0..n)
        .map(|i| (500 + (i * 7919 + salt * 104_729) % span) as u32)
        .collect()
}

/// When the request's stream says it finished.
async fn finished(mut h: RequestHandle) -> anyhow::Result<Instant> {
    while let Some(ev) = h.events.recv().await {
        if let TokenEvent::Finished { .. } = ev {
            return Ok(Instant::now());
        }
    }
    anyhow::bail!("the engine stopped")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

async fn measure(
    a: &Engine,
    b: &Engine,
    opts: &StreamBenchOptions,
) -> anyhow::Result<StreamBenchReport> {
    let vocab = a.model_config().vocab_size;
    let reps = opts.repetitions.max(1);
    let mut salt = 0;
    let mut next_prompt = || {
        salt += 1;
        prompt(vocab, opts.tokens, salt)
    };

    let mut alone = Vec::new();
    for i in 0..=reps {
        let t = Instant::now();
        let end = finished(a.submit(Request::new(next_prompt(), 1))?).await?;
        if i > 0 {
            alone.push((end - t).as_secs_f64() * 1e3);
        }
    }

    let metrics = Arc::new(TransferMetrics::default());
    let receiver = KvReceiver::new(metrics.clone());
    let on_host = HostPaths::open(&receiver, &metrics).await?;
    let (shm, quic) = (&on_host.shm, &on_host.quic);

    let mut paths = Vec::new();
    for path in ["shm", "quic"] {
        let (mut totals, mut exposed, mut bytes) = (Vec::new(), Vec::new(), 0);
        for i in 0..=reps {
            let tokens = next_prompt();
            let reservation = b.reserve_kv(tokens.clone())?;
            let desc = TransferDescriptor::for_reservation(i as u64 + 1, 0, &reservation);
            let pending = receiver.expect(desc.clone(), reservation, Duration::from_secs(300))?;
            let t = Instant::now();
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let mut request = Request::new(tokens, 1);
            request.kv_stream = Some(KvStream {
                skip_blocks: desc.first_block,
                tx,
            });
            let sending = match path {
                "shm" => tokio::spawn(send_kv_stream(shm.open(&desc).await?, rx)),
                _ => tokio::spawn(send_kv_stream(quic.open(&desc).await?, rx)),
            };
            let prefill_end = finished(a.submit(request)?).await?;
            let sent = sending.await.context("the sending task")??;
            let (reservation, _) = pending.wait().await?;
            let verdict = Instant::now();
            drop(reservation);
            if i > 0 {
                totals.push((verdict - t).as_secs_f64() * 1e3);
                exposed.push(verdict.saturating_duration_since(prefill_end).as_secs_f64() * 1e3);
                bytes = sent.bytes;
            }
        }
        paths.push(StreamPath {
            path,
            total_ms: median(totals),
            exposed_ms: median(exposed),
            bytes,
        });
    }
    Ok(StreamBenchReport {
        model: a.model_config().name.clone(),
        device: opts.device.to_string(),
        tokens: opts.tokens,
        prefill_ms: median(alone),
        paths,
    })
}
