//! Scaling end to end over real processes, on one `tandem up --autoscale`
//! cluster (no prefill workers, one decode worker to start):
//!
//! - An operator scales: `tandem ctl scale decode 2` starts a second decode
//!   worker that registers; `tandem ctl scale decode 1` drains it and it exits.
//! - The planner scales: with an ITL target no worker meets, a burst from
//!   `tandem bench serve` makes it add a decode worker (which registers and
//!   serves), and once the burst is over it drains one again; no request of
//!   the burst fails.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_protocol::Role;

mod common;
use common::up::{Up, process_pid};
use common::{BIN, alive, wait_for, wait_until};

/// The decode worker ids registered now.
fn decode_ids(c: &Up) -> BTreeSet<String> {
    c.ids_of(Role::Decode).into_iter().collect()
}

/// Waits (up to `secs`) until `done` holds, describing the wait on failure.
fn wait(c: &Up, secs: u64, what: &str, done: impl FnMut() -> bool) {
    wait_until(what, Duration::from_secs(secs), done, || {
        format!("decode workers {:?}", decode_ids(c))
    });
}

/// Waits until `id` has left the store and its process has exited.
fn wait_gone(c: &Up, id: &str, pid: u32, secs: u64) {
    wait(c, secs, &format!("{id} drains and exits"), || {
        !alive(pid) && !decode_ids(c).contains(id)
    });
    assert!(
        c.current_file().processes.iter().all(|p| p.name != id),
        "{id} left the cluster file's process list"
    );
}

/// Planner decisions, newest first.
fn decisions(c: &Up) -> Vec<Value> {
    let v: Value =
        serde_json::from_str(&c.ctl(&["decisions", "--json", "--limit", "50"])).expect("JSON");
    assert!(v["leader"].is_string(), "a planner leads: {v}");
    v["decisions"].as_array().expect("decisions").clone()
}

#[test]
fn operators_and_the_planner_scale_decode_workers() {
    let mut c = Up::start(
        "autoscale",
        &[
            "--autoscale",
            "--prefill",
            "0",
            "--decode",
            "1",
            "--threads",
            "1",
        ],
        Duration::from_secs(120),
        false,
    );
    assert_eq!(decode_ids(&c), BTreeSet::from(["decode-0".to_owned()]));

    eprintln!("autoscale test: an operator scales decode to 2 and back to 1");
    let out = c.ctl(&["scale", "decode", "2"]);
    assert!(out.contains("desired 2"), "{out}");
    wait(&c, 60, "decode-1 registers", || {
        decode_ids(&c).contains("decode-1")
    });
    let pid = process_pid(&c.current_file(), "decode-1");
    let scale: Value = serde_json::from_str(&c.ctl(&["scale", "--json"])).expect("JSON");
    assert_eq!(scale["decode"]["desired"], 2, "{scale}");
    assert_eq!(scale["decode"]["by"], "operator", "{scale}");
    c.ctl(&["scale", "decode", "1"]);
    // Both idle: the newer one goes.
    wait_gone(&c, "decode-1", pid, 60);
    assert!(decode_ids(&c).contains("decode-0"));

    eprintln!("autoscale test: a burst makes the planner scale decode up, then down");
    // An ITL target no worker meets, short intervals, at most 2 decode workers.
    let targets: Value = serde_json::from_str(&c.ctl(&[
        "targets",
        "--itl-ms",
        "2",
        "--set",
        r#"{"interval_ms":500,"cooldown_ms":3000,"max_decode":2,"max_prefill":0}"#,
    ]))
    .expect("JSON");
    assert_eq!(targets["itl_ms"], 2.0, "{targets}");
    assert_eq!(targets["interval_ms"], 500, "{targets}");
    let before = decode_ids(&c);
    let bench_out = c.dir.join("bench.json");
    let mut bench = Command::new(BIN)
        .args(["bench", "serve", "--url", &c.file.api_url, "--json"])
        .args(["--concurrency", "8", "--requests", "48"])
        .args(["--prompt-tokens", "64", "--output-tokens", "48"])
        .stdout(std::fs::File::create(&bench_out).expect("bench output"))
        .spawn()
        .expect("tandem bench serve starts");
    let start = Instant::now();
    let mut added = None;
    let status = wait_for(
        "the burst finishes",
        Duration::from_secs(120),
        || {
            let status = bench.try_wait().expect("try_wait");
            if status.is_none() && added.is_none() {
                added = decode_ids(&c).difference(&before).next().cloned();
                if let Some(id) = &added {
                    eprintln!(
                        "autoscale test: {id} registered {:.1} s into the burst",
                        start.elapsed().as_secs_f64()
                    );
                }
            }
            status
        },
        String::new,
    );
    assert!(status.success(), "tandem bench serve exited with {status}");
    let report: Value =
        serde_json::from_slice(&std::fs::read(&bench_out).expect("bench output")).expect("JSON");
    assert_eq!(
        report["failed"], 0,
        "no request of the burst fails: {report}"
    );
    assert_eq!(report["requests"], 48, "{report}");
    // On a busy machine the new worker may still be loading when the burst ends.
    let added = added.unwrap_or_else(|| {
        wait_for(
            "the decode worker the planner added registers",
            Duration::from_secs(30),
            || decode_ids(&c).difference(&before).next().cloned(),
            || format!("decode workers {:?}", decode_ids(&c)),
        )
    });
    let up = decisions(&c)
        .into_iter()
        .find(|d| d["by"] == "planner" && d["role"] == "decode" && d["to"] == 2)
        .expect("the planner logged its scale-up");
    assert!(
        up["reason"].as_str().unwrap_or("").contains("ITL"),
        "the reason names ITL: {up}"
    );

    // After the burst, the planner drains one of the two.
    let pids: Vec<(String, u32)> = c
        .current_file()
        .processes
        .iter()
        .filter(|p| p.role == Role::Decode)
        .map(|p| (p.name.clone(), p.pid))
        .collect();
    assert_eq!(pids.len(), 2, "{pids:?} ({added} was added)");
    wait(&c, 40, "the planner scales decode back to 1", || {
        decode_ids(&c).len() == 1 && pids.iter().filter(|(_, pid)| alive(*pid)).count() == 1
    });
    let down = decisions(&c)
        .into_iter()
        .find(|d| d["by"] == "planner" && d["role"] == "decode" && d["from"] == 2 && d["to"] == 1)
        .expect("the planner logged its scale-down");
    assert!(
        down["reason"]
            .as_str()
            .unwrap_or("")
            .contains("fits in 1 worker"),
        "{down}"
    );
    assert_eq!(
        c.current_file()
            .processes
            .iter()
            .filter(|p| p.role == Role::Decode)
            .count(),
        1
    );

    eprintln!("autoscale test: stopping");
    c.stop(Duration::from_secs(60));
    c.assert_processes_stopped();
}
