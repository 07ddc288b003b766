//! The router's Prometheus metrics, kept in atomics and written out by hand.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use tandem_protocol::{write_family, write_metric};

/// A latency histogram (the one every tandem process uses).
pub(crate) type Histogram = tandem_protocol::LatencyHistogram;

/// How a request ended, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Finished normally (stop or length).
    Ok,
    /// The client went away (or the worker reported it cancelled).
    Cancelled,
    /// No worker could take it, or every attempt failed before the first token.
    Unavailable,
    /// The worker rejected it (bad request).
    Rejected,
    /// A worker was lost after the first token.
    Failed,
}

impl Outcome {
    const ALL: [Outcome; 5] = [
        Outcome::Ok,
        Outcome::Cancelled,
        Outcome::Unavailable,
        Outcome::Rejected,
        Outcome::Failed,
    ];

    fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Cancelled => "cancelled",
            Outcome::Unavailable => "unavailable",
            Outcome::Rejected => "rejected",
            Outcome::Failed => "failed",
        }
    }
}

/// Every counter the router keeps.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    outcomes: [AtomicU64; Outcome::ALL.len()],
    pub(crate) ttft: Histogram,
    pub(crate) itl: Histogram,
    pub(crate) e2e: Histogram,
    pub(crate) routed_remote: AtomicU64,
    pub(crate) routed_local: AtomicU64,
    /// Requests a decode worker prefilled locally although a prefill worker was named.
    pub(crate) prefill_fallbacks: AtomicU64,
    pub(crate) prompt_tokens: AtomicU64,
    pub(crate) cached_tokens: AtomicU64,
    /// Prompt tokens the index predicted cached on the chosen decode worker.
    pub(crate) predicted_cached_tokens: AtomicU64,
    pub(crate) generated_tokens: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) kv_resyncs: AtomicU64,
}

/// A point-in-time view of membership and the index, for the gauges.
#[derive(Debug, Default, Clone)]
pub(crate) struct Gauges {
    /// (role, state, count).
    pub(crate) workers: Vec<(&'static str, &'static str, usize)>,
    pub(crate) index_blocks: usize,
    pub(crate) index_bytes: usize,
    pub(crate) models: usize,
}

impl Metrics {
    pub(crate) fn outcome(&self, o: Outcome) {
        if let Some(i) = Outcome::ALL.iter().position(|&x| x == o) {
            self.outcomes[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The Prometheus text exposition.
    pub(crate) fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::with_capacity(8 << 10);
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        write_family(
            &mut out,
            "counter",
            "tandem_router_requests_total",
            "Generation requests by outcome.",
        );
        for (o, n) in Outcome::ALL.iter().zip(&self.outcomes) {
            let _ = writeln!(
                out,
                "tandem_router_requests_total{{outcome=\"{}\"}} {}",
                o.name(),
                load(n)
            );
        }
        self.ttft.write(
            &mut out,
            "tandem_router_ttft_seconds",
            "Time from routing to the first token.",
        );
        self.itl.write(
            &mut out,
            "tandem_router_itl_seconds",
            "Time between consecutive tokens.",
        );
        self.e2e.write(
            &mut out,
            "tandem_router_request_duration_seconds",
            "Time from routing to the last event of a generation.",
        );
        write_family(
            &mut out,
            "counter",
            "tandem_router_routing_decisions_total",
            "Routing decisions by where the prompt is prefilled.",
        );
        let _ = writeln!(
            out,
            "tandem_router_routing_decisions_total{{prefill=\"remote\"}} {}",
            load(&self.routed_remote)
        );
        let _ = writeln!(
            out,
            "tandem_router_routing_decisions_total{{prefill=\"local\"}} {}",
            load(&self.routed_local)
        );
        let counters: [(&str, &str, &AtomicU64); 7] = [
            (
                "tandem_router_prefill_fallbacks_total",
                "Remote prefills the decode worker did locally instead.",
                &self.prefill_fallbacks,
            ),
            (
                "tandem_router_prompt_tokens_total",
                "Prompt tokens of finished generations.",
                &self.prompt_tokens,
            ),
            (
                "tandem_router_cached_tokens_total",
                "Prompt tokens served from a decode worker's prefix cache (hit rate: over prompt tokens).",
                &self.cached_tokens,
            ),
            (
                "tandem_router_predicted_cached_tokens_total",
                "Prompt tokens the index predicted cached on the chosen decode worker.",
                &self.predicted_cached_tokens,
            ),
            (
                "tandem_router_generated_tokens_total",
                "Tokens streamed to clients.",
                &self.generated_tokens,
            ),
            (
                "tandem_router_retries_total",
                "Generations retried on another decode worker before their first token.",
                &self.retries,
            ),
            (
                "tandem_router_kv_resyncs_total",
                "KV snapshots fetched after a gap or a reconnect.",
                &self.kv_resyncs,
            ),
        ];
        for (name, help, v) in counters {
            write_metric(&mut out, "counter", name, help, load(v));
        }
        write_family(
            &mut out,
            "gauge",
            "tandem_router_workers",
            "Known workers by role and state.",
        );
        for (role, state, n) in &gauges.workers {
            let _ = writeln!(
                out,
                "tandem_router_workers{{role=\"{role}\",state=\"{state}\"}} {n}"
            );
        }
        let gauges_list: [(&str, &str, usize); 3] = [
            (
                "tandem_router_index_blocks",
                "Block hashes in the decode and prefill KV indexes.",
                gauges.index_blocks,
            ),
            (
                "tandem_router_index_bytes",
                "Memory of the KV indexes.",
                gauges.index_bytes,
            ),
            (
                "tandem_router_models",
                "Models with a loaded tokenizer.",
                gauges.models,
            ),
        ];
        for (name, help, v) in gauges_list {
            write_metric(&mut out, "gauge", name, help, v);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn histograms_are_cumulative_and_text_is_prometheus() {
        let m = Metrics::default();
        m.ttft.observe(Duration::from_millis(3));
        m.ttft.observe(Duration::from_millis(30));
        m.ttft.observe(Duration::from_secs(500));
        m.outcome(Outcome::Ok);
        m.outcome(Outcome::Ok);
        m.outcome(Outcome::Failed);
        let text = m.render(&Gauges {
            workers: vec![("decode", "serving", 2)],
            ..Gauges::default()
        });
        assert!(
            text.contains("tandem_router_ttft_seconds_bucket{le=\"0.005\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("tandem_router_ttft_seconds_bucket{le=\"0.05\"} 2\n"));
        assert!(text.contains("tandem_router_ttft_seconds_bucket{le=\"120\"} 2\n"));
        assert!(text.contains("tandem_router_ttft_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("tandem_router_ttft_seconds_count 3\n"));
        assert!(text.contains("tandem_router_requests_total{outcome=\"ok\"} 2\n"));
        assert!(text.contains("tandem_router_requests_total{outcome=\"failed\"} 1\n"));
        assert!(text.contains("tandem_router_workers{role=\"decode\",state=\"serving\"} 2\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').expect("name value");
            assert!(name.starts_with("tandem_router_"), "{line}");
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
