//! `tandem bench engine`: prefill, single-stream decode and 8- and 64-stream
//! decode throughput of the in-process engine, beside the memory-bandwidth
//! bound of the device it ran on and, when given their paths, llama.cpp's
//! `llama-bench` and `llama-server` on the same file.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use rayon::prelude::*;
use serde::Serialize;
use tandem_engine::device::Device;
use tandem_engine::engine::{Engine, EngineConfig, Request, TokenEvent};

/// Options of `tandem bench engine`.
#[derive(Debug, Clone)]
pub struct EngineBenchOptions {
    pub model: PathBuf,
    pub threads: Option<usize>,
    pub device: Device,
    pub json: bool,
    pub llama_bench: Option<PathBuf>,
    pub llama_server: Option<PathBuf>,
    pub repetitions: usize,
}

/// What `tandem bench engine` measures.
#[derive(Debug, Clone, Serialize)]
pub struct EngineBenchReport {
    pub model: String,
    /// The device the engine ran on (`cpu`, `cuda:0`).
    pub device: String,
    pub threads: usize,
    pub simd: &'static str,
    /// Prompt tokens per second for a 512-token prompt.
    pub prefill_tok_s: f64,
    /// Tokens per second generating 128 tokens in one sequence.
    pub decode_tok_s: f64,
    /// Total tokens per second with 8 sequences generating 128 tokens each.
    pub batch8_decode_tok_s: f64,
    /// Total decode tokens per second over 64 concurrent sequences.
    pub batch64_decode_tok_s: f64,
    /// What the bandwidth figure measured (host reads, or a device copy).
    pub bandwidth_measured: String,
    /// Measured memory read bandwidth with the same threads.
    pub read_bandwidth_gb_s: f64,
    /// Weight bytes read per decoded token.
    pub weight_bytes_per_token: usize,
    /// Single-stream decode bound: bandwidth over weight bytes per token.
    pub decode_bound_tok_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub llamacpp_prefill_tok_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub llamacpp_decode_tok_s: Option<f64>,
    /// llama-server's total decode rates with 8 and 64 concurrent streams.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub llamacpp_server_batch8_tok_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub llamacpp_server_batch64_tok_s: Option<f64>,
}

const PREFILL_TOKENS: usize = 512;
const DECODE_TOKENS: usize = 128;
/// Concurrent sequences of the aggregate decode runs.
const BATCHES: [usize; 2] = [8, 64];

/// Deterministic, distinct prompt tokens (so no run hits another's prefix cache).
fn synthetic_prompt(len: usize, salt: u64, vocab: usize) -> Vec<u32> {
    let mut x = salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (100 + x % (vocab as u64 - 100)) as u32
        })
        .collect()
}

/// Runs requests to completion; returns (first token time, last token time, tokens) per request.
fn run_all(
    engine: &Engine,
    requests: Vec<Request>,
) -> anyhow::Result<Vec<(Instant, Instant, usize)>> {
    let handles = requests
        .into_iter()
        .map(|r| engine.submit(r))
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = Vec::new();
    for mut h in handles {
        let (mut first, mut last, mut n) = (None, Instant::now(), 0);
        while let Some(ev) = h.events.blocking_recv() {
            match ev {
                TokenEvent::Token(_) => {
                    last = Instant::now();
                    first.get_or_insert(last);
                    n += 1;
                }
                TokenEvent::Finished { .. } => break,
            }
        }
        out.push((first.unwrap_or(last), last, n));
    }
    Ok(out)
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

/// The memory bandwidth that bounds decode on `device`, in GB/s, and how it
/// was measured.
fn bandwidth(device: Device, threads: usize) -> anyhow::Result<(f64, String)> {
    match device {
        Device::Cpu => {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .context("building a thread pool")?;
            Ok((
                read_bandwidth(&pool),
                format!("host reads, {threads} threads"),
            ))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(ordinal) => Ok((
            tandem_engine::cuda::device_bandwidth(ordinal)?,
            format!("cuda:{ordinal} device-to-device copy, read + written"),
        )),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(tandem_engine::device::DeviceError::CudaNotBuilt.into()),
    }
}

/// Best-of-3 read bandwidth over a 512 MiB buffer, in GB/s.
fn read_bandwidth(pool: &rayon::ThreadPool) -> f64 {
    let words = 64 << 20;
    let buf: Vec<u64> = (0..words as u64).collect();
    let mut best = 0.0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let sum = pool.install(|| {
            buf.par_chunks(1 << 16)
                .map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b)))
                .reduce(|| 0, u64::wrapping_add)
        });
        std::hint::black_box(sum);
        best = best.max((words * 8) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

#[derive(serde::Deserialize)]
struct LlamaBenchRow {
    n_prompt: u64,
    n_gen: u64,
    avg_ts: f64,
}

/// Runs llama.cpp's llama-bench (pp512, tg128) and returns (prefill, decode) tok/s.
fn llama_bench(
    bin: &Path,
    model: &Path,
    threads: usize,
    reps: usize,
    device: Device,
) -> anyhow::Result<(f64, f64)> {
    let out = std::process::Command::new(bin)
        .args(["-m"])
        .arg(model)
        .args(["-ngl", gpu_layers(device)])
        .args([
            "-t",
            &threads.to_string(),
            "-p",
            "512",
            "-n",
            "128",
            "-r",
            &reps.to_string(),
            "-o",
            "json",
        ])
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "llama-bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<LlamaBenchRow> =
        serde_json::from_slice(&out.stdout).context("parsing llama-bench JSON")?;
    let pp = rows.iter().find(|r| r.n_prompt > 0 && r.n_gen == 0);
    let tg = rows.iter().find(|r| r.n_gen > 0 && r.n_prompt == 0);
    match (pp, tg) {
        (Some(pp), Some(tg)) => Ok((pp.avg_ts, tg.avg_ts)),
        _ => anyhow::bail!("llama-bench output lacks pp512 or tg128 rows"),
    }
}

/// A free loopback port.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port())
}

/// One HTTP/1.1 request to a loopback server; returns the body.
fn http(port: u16, method: &str, path: &str, body: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!(
            "{method} {path}: {}",
            head.lines().next().unwrap_or("no status line")
        )));
    }
    Ok(body.to_owned())
}

/// Kills the child when dropped, so an error never leaves a server behind.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// llama.cpp's `-ngl`: every layer on the GPU, or none.
fn gpu_layers(device: Device) -> &'static str {
    match device {
        Device::Cpu => "0",
        Device::Cuda(_) => "99",
    }
}

/// Runs llama.cpp's llama-server with one slot per prompt and returns its
/// total decode rate over concurrent requests of 128 tokens each (the
/// prompts of 8 tokens, as ours).
fn llama_server_batch(
    bin: &Path,
    model: &Path,
    threads: usize,
    device: Device,
    prompts: &[Vec<u32>],
) -> anyhow::Result<f64> {
    let port = free_port()?;
    let slots = prompts.len();
    let child = std::process::Command::new(bin)
        .arg("-m")
        .arg(model)
        .args(["-t", &threads.to_string(), "-np", &slots.to_string()])
        .args(["-ngl", gpu_layers(device)])
        .args([
            "-c",
            &(slots * 512).to_string(),
            "--port",
            &port.to_string(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let _child = Child(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while http(port, "GET", "/health", "").is_err() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "llama-server did not become ready"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let run = |prompt: &Vec<u32>| -> anyhow::Result<u64> {
        let body = serde_json::json!({
            "prompt": prompt,
            "n_predict": DECODE_TOKENS,
            "ignore_eos": true,
            "cache_prompt": false,
            "temperature": 0.0,
        });
        let reply: serde_json::Value =
            serde_json::from_str(&http(port, "POST", "/completion", &body.to_string())?)?;
        reply["tokens_predicted"]
            .as_u64()
            .context("llama-server reply without tokens_predicted")
    };
    // Warm up, then all streams at once.
    run(&prompts[0])?;
    let start = Instant::now();
    let tokens = std::thread::scope(|s| {
        let handles: Vec<_> = prompts.iter().map(|p| s.spawn(move || run(p))).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("request thread panicked"))?
            })
            .sum::<anyhow::Result<u64>>()
    })?;
    // Like ours, the first token of each stream comes from its prefill.
    let decoded = tokens.saturating_sub(prompts.len() as u64);
    Ok(decoded as f64 / start.elapsed().as_secs_f64())
}

/// Runs the engine benchmark and prints a table or JSON.
pub fn engine(opts: &EngineBenchOptions) -> anyhow::Result<()> {
    let threads = opts
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let reps = opts.repetitions.max(1);
    let engine = Engine::load(
        &opts.model,
        EngineConfig {
            threads: Some(threads),
            device: opts.device,
            ..EngineConfig::default()
        },
    )
    .with_context(|| format!("loading {}", opts.model.display()))?;
    let vocab = engine.model_config().vocab_size;
    let mut salt = 1u64;
    let mut next_prompt = |len| {
        salt += 1;
        synthetic_prompt(len, salt, vocab)
    };
    let decode_request = |prompt: Vec<u32>| {
        let mut r = Request::new(prompt, DECODE_TOKENS);
        r.ignore_eos = true;
        r
    };

    // Warm up: page the weights in and spin the threads up.
    run_all(&engine, vec![decode_request(next_prompt(64))])?;

    let mut prefill = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        run_all(&engine, vec![Request::new(next_prompt(PREFILL_TOKENS), 1)])?;
        prefill.push(PREFILL_TOKENS as f64 / t.elapsed().as_secs_f64());
    }

    let rate = |runs: &[(Instant, Instant, usize)]| {
        let start = runs.iter().map(|r| r.0).min().unwrap_or_else(Instant::now);
        let end = runs.iter().map(|r| r.1).max().unwrap_or(start);
        // The first token of each sequence comes from its prefill, so it is not counted.
        let tokens: usize = runs.iter().map(|r| r.2.saturating_sub(1)).sum();
        tokens as f64 / (end - start).max(Duration::from_micros(1)).as_secs_f64()
    };
    let mut decode = Vec::new();
    for _ in 0..reps {
        decode.push(rate(&run_all(
            &engine,
            vec![decode_request(next_prompt(1))],
        )?));
    }
    let mut batches = Vec::new();
    for n in BATCHES {
        let mut runs = Vec::new();
        for _ in 0..reps {
            let requests = (0..n).map(|_| decode_request(next_prompt(8))).collect();
            runs.push(rate(&run_all(&engine, requests)?));
        }
        batches.push(mean(&runs));
    }
    drop(engine);

    let (bandwidth, bandwidth_measured) = bandwidth(opts.device, threads)?;
    let file = tandem_engine::gguf::GgufFile::open(&opts.model)?;
    let model = tandem_engine::model::Model::load(file)?;
    let weight_bytes = model.weight_bytes_per_token();
    let llama = match &opts.llama_bench {
        Some(bin) => Some(llama_bench(bin, &opts.model, threads, reps, opts.device)?),
        None => None,
    };
    let mut server = Vec::new();
    if let Some(bin) = &opts.llama_server {
        for n in BATCHES {
            let prompts: Vec<Vec<u32>> = (0..n).map(|_| next_prompt(8)).collect();
            let runs = (0..reps)
                .map(|_| llama_server_batch(bin, &opts.model, threads, opts.device, &prompts))
                .collect::<anyhow::Result<Vec<f64>>>()?;
            server.push(mean(&runs));
        }
    }

    let report = EngineBenchReport {
        model: model.config().name.clone(),
        device: opts.device.to_string(),
        threads,
        simd: tandem_engine::cpu::simd_level(),
        prefill_tok_s: mean(&prefill),
        decode_tok_s: mean(&decode),
        batch8_decode_tok_s: batches[0],
        batch64_decode_tok_s: batches[1],
        bandwidth_measured,
        read_bandwidth_gb_s: bandwidth,
        weight_bytes_per_token: weight_bytes,
        decode_bound_tok_s: bandwidth * 1e9 / weight_bytes as f64,
        llamacpp_prefill_tok_s: llama.map(|l| l.0),
        llamacpp_decode_tok_s: llama.map(|l| l.1),
        llamacpp_server_batch8_tok_s: server.first().copied(),
        llamacpp_server_batch64_tok_s: server.get(1).copied(),
    };
    if opts.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn print_table(r: &EngineBenchReport) {
    println!(
        "model {}  device {}  threads {}  simd {}",
        r.model, r.device, r.threads, r.simd
    );
    let llama = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
    println!("{:<34} {:>12} {:>12}", "", "tandem", "llama.cpp");
    println!(
        "{:<34} {:>12.1} {:>12}",
        "prefill 512 tokens (tok/s)",
        r.prefill_tok_s,
        llama(r.llamacpp_prefill_tok_s)
    );
    println!(
        "{:<34} {:>12.1} {:>12}",
        "decode 128 tokens, 1 stream (tok/s)",
        r.decode_tok_s,
        llama(r.llamacpp_decode_tok_s)
    );
    println!(
        "{:<34} {:>12.1} {:>12}",
        "decode, 8 streams (total tok/s)",
        r.batch8_decode_tok_s,
        llama(r.llamacpp_server_batch8_tok_s)
    );
    println!(
        "{:<34} {:>12.1} {:>12}",
        "decode, 64 streams (total tok/s)",
        r.batch64_decode_tok_s,
        llama(r.llamacpp_server_batch64_tok_s)
    );
    let single = r.decode_tok_s.max(f64::MIN_POSITIVE);
    println!(
        "8 streams / 1 stream: {:.2}x, 64 streams / 1 stream: {:.2}x",
        r.batch8_decode_tok_s / single,
        r.batch64_decode_tok_s / single
    );
    println!(
        "decode bound: {:.1} GB/s ({}) / {:.1} MB per token = {:.0} tok/s; single stream at {:.0}%",
        r.read_bandwidth_gb_s,
        r.bandwidth_measured,
        r.weight_bytes_per_token as f64 / 1e6,
        r.decode_bound_tok_s,
        100.0 * r.decode_tok_s / r.decode_bound_tok_s.max(f64::MIN_POSITIVE)
    );
}
