//! `tandem bench serve`: a load generator for any OpenAI-compatible endpoint.
//!
//! It keeps `concurrency` streaming completions in flight until `requests` have
//! finished, with prompts of exact token counts (token-id prompts, so no
//! tokenizer is needed here and every server sees the same lengths), and
//! reports time to first token, inter-token latency and end-to-end latency
//! (p50/p90/p99), requests per second and output tokens per second.
//!
//! A mixed load (`--long-prompt-tokens` with `--long-fraction`) makes some
//! requests long prompts arriving while others decode: the load under which
//! disaggregated prefill keeps decode latency steady.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tokio::sync::Mutex;

/// What to send.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeBenchArgs {
    /// The API base URL (`http://127.0.0.1:8080/v1`; a URL without `/v1` gets it).
    #[arg(long, default_value = "http://127.0.0.1:8080/v1")]
    pub url: String,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Requests in all.
    #[arg(long, default_value_t = 64)]
    pub requests: usize,
    /// Start requests at this rate (per second, evenly spaced; `--concurrency`
    /// still caps those in flight). Without it, each finished request starts the next.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 256)]
    pub prompt_tokens: usize,
    /// Tokens to generate per request (end-of-text ignored).
    #[arg(long, default_value_t = 64)]
    pub output_tokens: usize,
    /// Leading prompt tokens shared by every request (prefix-cache reuse).
    #[arg(long, default_value_t = 0)]
    pub shared_prefix_tokens: usize,
    /// Prompt length of the long requests in a mixed load.
    #[arg(long, default_value_t = 0)]
    pub long_prompt_tokens: usize,
    /// Fraction of requests that are long (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    pub long_fraction: f64,
    /// Model name (default: the first the server lists).
    #[arg(long)]
    pub model: Option<String>,
    /// Bearer token, if the server wants one.
    #[arg(long, env = "TANDEM_API_KEY")]
    pub api_key: Option<String>,
    /// Seeds the prompts.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub mean: f64,
}

impl Percentiles {
    /// The percentiles of `xs` (all zero when empty).
    pub fn of(mut xs: Vec<f64>) -> Self {
        if xs.is_empty() {
            return Self::default();
        }
        xs.sort_by(f64::total_cmp);
        let at = |q: f64| xs[((xs.len() - 1) as f64 * q).round() as usize];
        Self {
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            mean: xs.iter().sum::<f64>() / xs.len() as f64,
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct ServeBenchReport {
    pub url: String,
    pub model: String,
    pub concurrency: usize,
    pub requests: usize,
    pub failed: usize,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    pub long_prompt_tokens: usize,
    pub long_fraction: f64,
    pub duration_s: f64,
    pub requests_per_s: f64,
    pub output_tokens_per_s: f64,
    /// Prompt tokens the server reported as served from its prefix cache.
    pub cached_tokens: u64,
    pub ttft_ms: Percentiles,
    pub itl_ms: Percentiles,
    pub e2e_ms: Percentiles,
    /// TTFT of the short requests only (mixed loads).
    pub ttft_short_ms: Percentiles,
    /// The first few errors, verbatim.
    pub errors: Vec<String>,
}

#[derive(Default)]
struct Samples {
    ttft: Vec<f64>,
    ttft_short: Vec<f64>,
    itl: Vec<f64>,
    e2e: Vec<f64>,
    tokens: u64,
    cached: u64,
    failed: usize,
    errors: Vec<String>,
}

/// Runs the benchmark and prints its report.
pub fn run(args: &ServeBenchArgs) -> anyhow::Result<()> {
    let report = crate::runtime()?.block_on(measure(args))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn base_url(url: &str) -> String {
    let url = url.trim_end_matches('/');
    if url.ends_with("/v1") {
        url.to_owned()
    } else {
        format!("{url}/v1")
    }
}

/// Runs the load and collects the figures.
pub async fn measure(args: &ServeBenchArgs) -> anyhow::Result<ServeBenchReport> {
    anyhow::ensure!(args.concurrency >= 1, "--concurrency must be at least 1");
    anyhow::ensure!(args.requests >= 1, "--requests must be at least 1");
    anyhow::ensure!(
        args.rate.is_none_or(|r| r > 0.0 && r.is_finite()),
        "--rate must be a positive number of requests per second"
    );
    anyhow::ensure!(
        args.prompt_tokens >= 1,
        "--prompt-tokens must be at least 1"
    );
    anyhow::ensure!(
        args.output_tokens >= 1,
        "--output-tokens must be at least 1"
    );
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.long_fraction),
        "--long-fraction must be between 0 and 1"
    );
    anyhow::ensure!(
        args.shared_prefix_tokens < args.prompt_tokens,
        "--shared-prefix-tokens must be below --prompt-tokens"
    );
    let base = base_url(&args.url);
    // reqwest uses whichever rustls provider is installed (https URLs).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(600))
        .build()
        .context("building the HTTP client")?;
    let model = match &args.model {
        Some(m) => m.clone(),
        None => first_model(&client, &base, args.api_key.as_deref()).await?,
    };

    let samples = Arc::new(Mutex::new(Samples::default()));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency.min(args.requests) {
        let (client, base, model, samples, next, args) = (
            client.clone(),
            base.clone(),
            model.clone(),
            samples.clone(),
            next.clone(),
            args.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= args.requests {
                    return;
                }
                pace(start, args.rate, i).await;
                let long = is_long(&args, i);
                let len = if long {
                    args.long_prompt_tokens
                } else {
                    args.prompt_tokens
                };
                let prompt = prompt_tokens(&args, i, len);
                let outcome = one_request(&client, &base, &model, &args, &prompt).await;
                let mut s = samples.lock().await;
                match outcome {
                    Ok(r) => {
                        if let Some(t) = r.ttft {
                            s.ttft.push(t);
                            if !long {
                                s.ttft_short.push(t);
                            }
                        }
                        s.itl.extend(r.itl);
                        s.e2e.push(r.e2e);
                        s.tokens += r.tokens;
                        s.cached += r.cached;
                    }
                    Err(e) => {
                        s.failed += 1;
                        if s.errors.len() < 5 {
                            s.errors.push(format!("{e:#}"));
                        }
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.context("a load task panicked")?;
    }
    let duration = start.elapsed().as_secs_f64();
    let s = std::mem::take(&mut *samples.lock().await);
    let done = args.requests - s.failed;
    Ok(ServeBenchReport {
        url: base,
        model,
        concurrency: args.concurrency,
        requests: args.requests,
        failed: s.failed,
        prompt_tokens: args.prompt_tokens,
        output_tokens: args.output_tokens,
        long_prompt_tokens: args.long_prompt_tokens,
        long_fraction: args.long_fraction,
        duration_s: duration,
        requests_per_s: done as f64 / duration,
        output_tokens_per_s: s.tokens as f64 / duration,
        cached_tokens: s.cached,
        ttft_ms: Percentiles::of(s.ttft),
        itl_ms: Percentiles::of(s.itl),
        e2e_ms: Percentiles::of(s.e2e),
        ttft_short_ms: Percentiles::of(s.ttft_short),
        errors: s.errors,
    })
}

/// Waits until request `i` is due at `rate` requests per second (no wait without a rate).
pub async fn pace(start: Instant, rate: Option<f64>, i: usize) {
    if let Some(rate) = rate.filter(|r| *r > 0.0) {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
    }
}

/// Whether request `i` is one of the long ones: spread evenly through the run.
fn is_long(args: &ServeBenchArgs, i: usize) -> bool {
    if args.long_prompt_tokens == 0 || args.long_fraction <= 0.0 {
        return false;
    }
    let before = (i as f64 * args.long_fraction).floor();
    let after = ((i + 1) as f64 * args.long_fraction).floor();
    after > before
}

/// Token ids of request `i`'s prompt: the shared prefix, then tokens unique to it.
fn prompt_tokens(args: &ServeBenchArgs, i: usize, len: usize) -> Vec<u32> {
    // Ordinary vocabulary ids, clear of the special tokens at the start.
    const LOW: u64 = 1_000;
    const SPAN: u64 = 20_000;
    let mut state = args.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut next = |salt: u64| {
        state = state
            .wrapping_add(salt)
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (LOW + (state >> 33) % SPAN) as u32
    };
    let shared = args.shared_prefix_tokens.min(len);
    let mut out: Vec<u32> = (0..shared).map(|_| next(0)).collect();
    let salt = (i as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
    out.extend((shared..len).map(|_| next(salt)));
    out
}

async fn first_model(
    client: &reqwest::Client,
    base: &str,
    key: Option<&str>,
) -> anyhow::Result<String> {
    let mut req = client.get(format!("{base}/models"));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("GET {base}/models"))?;
    let status = resp.status();
    let body = resp.text().await.context("reading /models")?;
    anyhow::ensure!(status.is_success(), "GET {base}/models: {status}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).context("parsing /models")?;
    v["data"][0]["id"]
        .as_str()
        .map(str::to_owned)
        .context("the server lists no model")
}

struct RequestTimes {
    ttft: Option<f64>,
    itl: Vec<f64>,
    e2e: f64,
    tokens: u64,
    cached: u64,
}

async fn one_request(
    client: &reqwest::Client,
    base: &str,
    model: &str,
    args: &ServeBenchArgs,
    prompt: &[u32],
) -> anyhow::Result<RequestTimes> {
    let body = serde_json::json!({
        "model": model,
        "prompt": prompt,
        "max_tokens": args.output_tokens,
        "temperature": 0.0,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let start = Instant::now();
    let mut req = client
        .post(format!("{base}/completions"))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(k) = &args.api_key {
        req = req.bearer_auth(k);
    }
    let mut resp = req.send().await.context("sending")?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        anyhow::bail!("{status}: {text}");
    }
    let mut times = RequestTimes {
        ttft: None,
        itl: Vec::new(),
        e2e: 0.0,
        tokens: 0,
        cached: 0,
    };
    let mut last = start;
    let mut pending = Vec::new();
    let mut done = false;
    while let Some(chunk) = resp.chunk().await.context("reading the stream")? {
        let now = Instant::now();
        pending.extend_from_slice(&chunk);
        while let Some(end) = find_event_end(&pending) {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            for line in text.lines() {
                let Some(data) = line.strip_prefix("data: ") else {
                    continue;
                };
                if data == "[DONE]" {
                    done = true;
                    continue;
                }
                let v: serde_json::Value =
                    serde_json::from_str(data).with_context(|| format!("bad event {data}"))?;
                if let Some(err) = v.get("error") {
                    anyhow::bail!("error event: {err}");
                }
                if let Some(n) = v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64() {
                    times.cached = n;
                }
                let has_token = v["choices"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|c| c.get("text").is_some()));
                if has_token {
                    times.tokens += 1;
                    let since = (now - last).as_secs_f64() * 1e3;
                    match times.ttft {
                        None => times.ttft = Some((now - start).as_secs_f64() * 1e3),
                        Some(_) => times.itl.push(since),
                    }
                    last = now;
                }
            }
        }
    }
    anyhow::ensure!(done, "the stream ended without [DONE]");
    times.e2e = start.elapsed().as_secs_f64() * 1e3;
    Ok(times)
}

/// The end of the first complete SSE event (a blank line) in `buf`.
fn find_event_end(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\n\n")
}

fn print_report(r: &ServeBenchReport) {
    println!(
        "{} requests ({} failed) at concurrency {} against {} ({}), {:.1} s",
        r.requests, r.failed, r.concurrency, r.url, r.model, r.duration_s
    );
    println!(
        "prompt {} tokens{}, output {} tokens",
        r.prompt_tokens,
        if r.long_fraction > 0.0 {
            format!(
                " ({:.0}% long: {} tokens)",
                r.long_fraction * 100.0,
                r.long_prompt_tokens
            )
        } else {
            String::new()
        },
        r.output_tokens
    );
    println!(
        "throughput: {:.2} requests/s, {:.1} output tokens/s; cached prompt tokens {}",
        r.requests_per_s, r.output_tokens_per_s, r.cached_tokens
    );
    println!(
        "{:<12} {:>9} {:>9} {:>9} {:>9}",
        "ms", "p50", "p90", "p99", "mean"
    );
    for (name, p) in [
        ("TTFT", r.ttft_ms),
        ("TTFT short", r.ttft_short_ms),
        ("ITL", r.itl_ms),
        ("end-to-end", r.e2e_ms),
    ] {
        println!(
            "{name:<12} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
            p.p50, p.p90, p.p99, p.mean
        );
    }
    for e in &r.errors {
        println!("error: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ServeBenchArgs {
        ServeBenchArgs {
            url: "http://127.0.0.1:1".into(),
            concurrency: 1,
            requests: 10,
            rate: None,
            prompt_tokens: 40,
            output_tokens: 4,
            shared_prefix_tokens: 16,
            long_prompt_tokens: 100,
            long_fraction: 0.3,
            model: None,
            api_key: None,
            seed: 7,
            json: false,
        }
    }

    #[test]
    fn prompts_share_the_prefix_and_differ_after_it() {
        let a = args();
        let p0 = prompt_tokens(&a, 0, 40);
        let p1 = prompt_tokens(&a, 1, 40);
        assert_eq!(p0.len(), 40);
        assert_eq!(p0[..16], p1[..16]);
        assert_ne!(p0[16..], p1[16..]);
        assert_eq!(p0, prompt_tokens(&a, 0, 40), "deterministic");
    }

    #[test]
    fn long_requests_follow_the_fraction() {
        let a = args();
        let long = (0..100).filter(|&i| is_long(&a, i)).count();
        assert_eq!(long, 30);
    }

    #[test]
    fn percentiles_and_urls() {
        let p = Percentiles::of((1..=100).map(f64::from).collect());
        assert_eq!((p.p50, p.p99), (51.0, 99.0));
        assert_eq!(base_url("http://h:1/"), "http://h:1/v1");
        assert_eq!(base_url("http://h:1/v1"), "http://h:1/v1");
        assert_eq!(find_event_end(b"data: x\n\ndata"), Some(7));
    }
}
