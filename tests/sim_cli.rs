//! End-to-end: `tandem sim` replays a trace file and prints the documented JSON,
//! and `tandem bench router` runs.

use serde_json::Value;

mod common;
use common::{fresh_temp_dir, tandem};

#[test]
fn sim_replays_a_written_trace_as_json() {
    let dir = fresh_temp_dir("sim");
    let trace = dir.join("docs.jsonl");
    let trace = trace.to_str().expect("UTF-8 path");
    tandem(&[
        "sim",
        "--generate",
        "documents",
        "--requests",
        "120",
        "--rate",
        "2",
        "--write-trace",
        trace,
        "--workers",
        "2",
        "--router",
        "round-robin",
        "--json",
    ]);
    let out = tandem(&[
        "sim",
        "--trace",
        trace,
        "--workers",
        "4",
        "--router",
        "round-robin,kv-load",
        "--blocks-per-worker",
        "2048",
        "--json",
    ]);
    let runs: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(runs.len(), 2);
    for r in &runs {
        for key in [
            "prefix_reuse",
            "ttft_p50_ms",
            "ttft_p99_ms",
            "itl_p99_ms",
            "e2e_p99_ms",
            "throughput_tokens_per_s",
        ] {
            assert!(r[key].as_f64().is_some_and(f64::is_finite), "{key} in {r}");
        }
        assert_eq!(r["requests"], 120);
        assert_eq!(r["per_worker"].as_array().map(Vec::len), Some(4));
    }
    assert!(runs[1]["prefix_reuse"].as_f64() > runs[0]["prefix_reuse"].as_f64());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bench_router_reports_its_figures() {
    let out = tandem(&[
        "bench",
        "router",
        "--blocks",
        "20000",
        "--decisions",
        "50",
        "--json",
    ]);
    let v: Value = serde_json::from_str(&out).expect("JSON");
    let fleets = v["fleets"].as_array().expect("fleets");
    assert_eq!(fleets.len(), 2);
    for f in fleets {
        assert!(
            f["bytes_per_block"]
                .as_f64()
                .is_some_and(|b| b > 8.0 && b < 64.0),
            "{f}"
        );
        assert!(f["decision_mean_us"].as_f64().is_some_and(|t| t > 0.0));
    }
}
