//! A worker's counters and latency histograms, rendered by hand in the
//! Prometheus text format (with the engine's load gauges and the KV transfer
//! counters alongside).

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tandem_engine::engine::LoadReport;
use tandem_protocol::{LatencyHistogram, write_family, write_metric};

/// Latency samples kept for the recent p50 that `Load` reports.
const RECENT: usize = 512;

/// A latency histogram with a window of recent samples.
#[derive(Debug, Default)]
pub struct Histogram {
    all: LatencyHistogram,
    recent: Mutex<VecDeque<f64>>,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        self.all.observe(d);
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(d.as_secs_f64() * 1e3);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.all.count()
    }

    /// The median of the recent observations, in milliseconds (0: none yet).
    pub fn recent_p50_ms(&self) -> f64 {
        let mut v: Vec<f64> = self
            .recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .copied()
            .collect();
        if v.is_empty() {
            return 0.0;
        }
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        self.all.write(out, name, help);
    }
}

/// What a worker counts about the requests it serves.
#[derive(Debug, Default)]
pub struct WorkerMetrics {
    /// Requests finished (Generate on decode workers, Prefill on prefill workers).
    pub requests: AtomicU64,
    /// Requests that failed or were refused.
    pub request_errors: AtomicU64,
    /// Prompt tokens of served requests.
    pub prompt_tokens: AtomicU64,
    /// Tokens generated.
    pub generated_tokens: AtomicU64,
    /// Prompts whose KV a prefill worker computed.
    pub remote_prefills: AtomicU64,
    fallbacks: Mutex<BTreeMap<&'static str, u64>>,
    /// Time from a Generate call to its first token.
    pub ttft: Histogram,
    /// Time between consecutive tokens of a request.
    pub itl: Histogram,
}

impl WorkerMetrics {
    /// Counts a request served to its end, with its prompt and generated tokens.
    pub fn served(&self, prompt_tokens: usize, generated_tokens: usize) {
        self.requests.fetch_add(1, Relaxed);
        self.prompt_tokens.fetch_add(prompt_tokens as u64, Relaxed);
        self.generated_tokens
            .fetch_add(generated_tokens as u64, Relaxed);
    }

    /// Counts a requested remote prefill that fell back to local, by reason.
    pub fn local_fallback(&self, reason: &'static str) {
        *self
            .fallbacks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(reason)
            .or_default() += 1;
    }

    /// Local fallbacks of one reason so far.
    pub fn local_fallbacks(&self, reason: &str) -> u64 {
        self.fallbacks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(reason)
            .copied()
            .unwrap_or(0)
    }

    /// Everything in Prometheus text format: these counters, the engine's
    /// load and whether the worker drains.
    pub fn render(&self, load: &LoadReport, draining: bool) -> String {
        let mut out = String::new();
        let mut metric = |kind: &str, name: &str, help: &str, value: String| {
            write_metric(&mut out, kind, name, help, value)
        };
        let gauges = [
            (
                "tandem_worker_running_sequences",
                "Sequences in the running batch.",
                load.running.to_string(),
            ),
            (
                "tandem_worker_waiting_sequences",
                "Sequences queued for admission.",
                load.waiting.to_string(),
            ),
            (
                "tandem_worker_pending_prefill_tokens",
                "Prompt tokens not yet computed.",
                load.pending_prefill_tokens.to_string(),
            ),
            (
                "tandem_worker_kv_blocks_used",
                "KV cache blocks in use.",
                load.kv_blocks_used.to_string(),
            ),
            (
                "tandem_worker_kv_blocks_total",
                "KV cache capacity in blocks.",
                load.kv_blocks_total.to_string(),
            ),
            (
                "tandem_worker_kv_hit_rate",
                "Prefix-cache hit rate in blocks since start.",
                load.kv_hit_rate.to_string(),
            ),
            (
                "tandem_worker_draining",
                "1 while the worker drains.",
                u8::from(draining).to_string(),
            ),
        ];
        for (name, help, value) in gauges {
            metric("gauge", name, help, value);
        }
        let counters = [
            (
                "tandem_worker_requests_total",
                "Requests served to the end.",
                &self.requests,
            ),
            (
                "tandem_worker_request_errors_total",
                "Requests that failed or were refused.",
                &self.request_errors,
            ),
            (
                "tandem_worker_prompt_tokens_total",
                "Prompt tokens of served requests.",
                &self.prompt_tokens,
            ),
            (
                "tandem_worker_generated_tokens_total",
                "Tokens generated.",
                &self.generated_tokens,
            ),
            (
                "tandem_worker_remote_prefills_total",
                "Prompts whose KV a prefill worker computed.",
                &self.remote_prefills,
            ),
        ];
        for (name, help, value) in counters {
            metric("counter", name, help, value.load(Relaxed).to_string());
        }
        metric(
            "counter",
            "tandem_worker_engine_steps_total",
            "Engine steps run.",
            load.steps.to_string(),
        );
        metric(
            "counter",
            "tandem_worker_computed_tokens_total",
            "Tokens the engine computed (prompt and generated).",
            load.tokens_computed.to_string(),
        );
        let name = "tandem_worker_local_fallbacks_total";
        write_family(
            &mut out,
            "counter",
            name,
            "Requested remote prefills done locally instead, by reason.",
        );
        for (reason, n) in self
            .fallbacks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            let _ = writeln!(out, "{name}{{reason=\"{reason}\"}} {n}");
        }
        self.ttft.render(
            &mut out,
            "tandem_worker_ttft_seconds",
            "Time from a Generate call to its first token.",
        );
        self.itl.render(
            &mut out,
            "tandem_worker_itl_seconds",
            "Time between consecutive tokens of a request.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_p50_is_the_median() {
        let h = Histogram::default();
        assert_eq!(h.recent_p50_ms(), 0.0);
        for ms in [2, 40, 700] {
            h.observe(Duration::from_millis(ms));
        }
        assert_eq!(h.recent_p50_ms(), 40.0);
        let mut out = String::new();
        h.render(&mut out, "t", "help");
        assert!(out.contains("t_bucket{le=\"0.0025\"} 1\n"), "{out}");
        assert!(out.contains("t_bucket{le=\"0.05\"} 2\n"), "{out}");
        assert!(out.contains("t_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("t_count 3\n"), "{out}");
    }

    #[test]
    fn fallbacks_render_by_reason() {
        let m = WorkerMetrics::default();
        m.local_fallback("unreachable");
        m.local_fallback("unreachable");
        m.local_fallback("deadline");
        assert_eq!(m.local_fallbacks("unreachable"), 2);
        let text = m.render(&LoadReport::default(), true);
        assert!(text.contains("tandem_worker_local_fallbacks_total{reason=\"unreachable\"} 2"));
        assert!(text.contains("tandem_worker_draining 1"));
        assert!(text.contains("# TYPE tandem_worker_ttft_seconds histogram"));
    }
}
