//! End to end over real processes: `tandem up` starts the store, a router, a
//! prefill worker and two decode workers; requests go through the OpenAI API.
//!
//! - The first invariant: greedy output disaggregated (prefill worker → shared
//!   memory, the same-host KV path → decode worker) equals aggregated (decode
//!   worker prefills) equals `tandem generate`. (The QUIC path between worker
//!   processes is tested in decode_worker/tests/workers.rs.)
//! - A prompt sharing a cached prefix goes to the worker holding it and reports
//!   `cached_tokens`.
//! - Failures: a prefill worker killed mid-request (the decode worker prefills
//!   locally), a decode worker killed before the first token (the router retries
//!   elsewhere), the dead worker leaving the router's view within the lease TTL,
//!   and a replacement for every worker killed or drained (the desired counts
//!   stand), serving.
//! - SIGTERM stops the whole cluster cleanly.

use std::ops::Deref;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use tandem_protocol::{InstanceInfo, Role, WorkerState};

mod common;
use common::up::{Up, process_pid};
use common::{BIN, KillOnDrop, free_port, healthy, http_client, model_path, signal, tandem};
use common::{alive, wait_until};

const MODEL: &str = "SmolLM2-135M-Instruct";

/// A `tandem up` cluster (see [`Up`]) with an HTTP client for its APIs.
struct Cluster {
    up: Up,
    http: reqwest::blocking::Client,
}

impl Deref for Cluster {
    type Target = Up;

    fn deref(&self) -> &Up {
        &self.up
    }
}

impl Cluster {
    fn start(name: &str, args: &[&str]) -> Self {
        Self {
            http: http_client(Duration::from_secs(120)),
            up: Up::start(name, args, Duration::from_secs(180), false),
        }
    }

    /// The pid of process `name`, from the cluster file as it was at the start.
    fn pid(&self, name: &str) -> u32 {
        process_pid(&self.file, name)
    }

    fn post(&self, base: &str, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{base}{path}"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .expect("request sent");
        let status = r.status().as_u16();
        let text = r.text().expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    fn get(&self, url: &str) -> (u16, String) {
        let r = self.http.get(url).send().expect("request sent");
        (r.status().as_u16(), r.text().expect("body"))
    }

    fn instance(&self, name: &str) -> InstanceInfo {
        self.instances()
            .into_iter()
            .find(|i| i.id == name)
            .unwrap_or_else(|| panic!("{name} is not registered"))
    }

    /// A counter or gauge from a process's `/metrics`, summed over labels.
    fn metric(&self, http_addr: &str, name: &str) -> f64 {
        let (status, text) = self.get(&format!("http://{http_addr}/metrics"));
        assert_eq!(status, 200, "{text}");
        metric_sum(&text, name)
    }

    /// Sends SIGTERM to `tandem up` and checks everything stopped cleanly.
    fn stop(mut self) {
        self.up.stop(Duration::from_secs(60));
        self.up.assert_processes_stopped();
        assert!(
            !self.cluster_file_path().exists(),
            "the cluster file is removed"
        );
    }
}

/// Every `tandem_*` metric name in `text` (histograms by their `_bucket`
/// series), sorted and deduplicated.
fn metric_names(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .match_indices("tandem_")
        .map(|(at, _)| {
            text[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect::<String>()
        })
        .filter(|n| n.len() > "tandem_".len())
        .collect();
    names.sort();
    names.dedup();
    names
}

fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `tandem generate`'s greedy text for a chat message.
fn generate_text(chat: &str, max_tokens: usize) -> String {
    let out = tandem(&[
        "generate",
        "--model",
        &model_path(),
        "--chat",
        chat,
        "--json",
        "--max-tokens",
        &max_tokens.to_string(),
        "--threads",
        "1",
    ]);
    let v: Value = serde_json::from_str(&out).expect("JSON");
    v["text"].as_str().expect("text").to_owned()
}

/// A greedy chat completion request that generates all `max_tokens`.
fn chat_request(user: &str, max_tokens: usize) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": user}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": true,
    })
}

/// Greedy completion through an API: (text, cached prompt tokens).
fn chat(c: &Cluster, base: &str, user: &str, max_tokens: usize) -> (String, u64) {
    let (status, v) = c.post(base, "/chat/completions", &chat_request(user, max_tokens));
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_owned();
    let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0);
    (text, cached)
}

const LONG_SYSTEM: &str = "You are a meticulous assistant for a fleet of inference servers. \
    Answer briefly, cite the component involved, and never invent figures. The fleet has \
    routers, prefill workers and decode workers; KV blocks move between them over QUIC.";

#[test]
fn disaggregated_equals_aggregated_equals_generate_and_failures_are_survived() {
    let c = Cluster::start(
        "e2e",
        &[
            "--prefill",
            "1",
            "--decode",
            "2",
            "--disagg",
            "always",
            "--threads",
            "1",
        ],
    );
    let api = c.file.api_url.clone();

    // A second router on the same store, never disaggregating: aggregated mode.
    let agg_port = free_port();
    let agg_router = KillOnDrop(
        Command::new(BIN)
            .args([
                "router",
                "--store",
                &c.file.store_url,
                "--cluster",
                &c.file.cluster,
            ])
            .args(["--id", "router-agg", "--disagg", "never"])
            .args(["--listen", &format!("127.0.0.1:{agg_port}")])
            .arg("--tls-dir")
            .arg(c.file.tls_dir.join("router-0"))
            .spawn()
            .expect("second router starts"),
    );
    let agg = format!("http://127.0.0.1:{agg_port}/v1");
    let agg_health = format!("http://127.0.0.1:{agg_port}/health");
    wait_until(
        "router-agg is healthy",
        Duration::from_secs(30),
        || healthy(&c.http, &agg_health),
        String::new,
    );

    eprintln!("cluster test: the first invariant");
    // The first invariant.
    let prefill = c.instance("prefill-0");
    let remote_before = c.metric(&prefill.http_addr, "tandem_worker_requests_total");
    let n = 24;
    for user in [
        format!("{LONG_SYSTEM} What does a prefill worker do?"),
        format!("{LONG_SYSTEM} Why stream KV blocks layer by layer?"),
    ] {
        let expected = generate_text(&user, n);
        let (disagg_text, _) = chat(&c, &api, &user, n);
        let (agg_text, _) = chat(&c, &agg, &user, n);
        assert_eq!(disagg_text, expected, "disaggregated == tandem generate");
        assert_eq!(agg_text, expected, "aggregated == tandem generate");
    }
    let remote_after = c.metric(&prefill.http_addr, "tandem_worker_requests_total");
    assert!(
        remote_after >= remote_before + 2.0,
        "the prefill worker computed the disaggregated prompts ({remote_before} -> {remote_after})"
    );
    let shm_sent = c.metric(
        &prefill.http_addr,
        "tandem_kv_transfer_shm_sent_transfers_total",
    );
    assert!(
        shm_sent >= 2.0,
        "co-located workers hand KV over shared memory ({shm_sent} transfers)"
    );

    eprintln!("cluster test: prefix routing");
    // Prefix routing: a new question after a cached prefix lands where the
    // prefix is (the other decode worker holds nothing of it).
    let decode_requests = |c: &Cluster| -> Vec<(String, f64)> {
        c.instances_of(Role::Decode)
            .into_iter()
            .map(|i| {
                (
                    i.id.clone(),
                    c.metric(&i.http_addr, "tandem_worker_requests_total"),
                )
            })
            .collect()
    };
    let prefix = format!("Context: {LONG_SYSTEM} {LONG_SYSTEM} Question: ");
    let (_, first) = chat(&c, &agg, &format!("{prefix}the first question?"), 4);
    let before = decode_requests(&c);
    let (_, second) = chat(&c, &agg, &format!("{prefix}the second question?"), 4);
    let after = decode_requests(&c);
    assert!(
        second >= first + 64,
        "the shared prefix is reused: cached_tokens {first} then {second}"
    );
    let holder = before
        .iter()
        .zip(&after)
        .find(|(b, a)| a.1 > b.1)
        .map(|(_, a)| a.0.clone())
        .expect("a decode worker served the second request");

    eprintln!("cluster test: prefill worker killed mid-request");
    // A prefill worker killed mid-request: the decode worker prefills locally.
    let long_user = format!("{} Summarize.", LONG_SYSTEM.repeat(20));
    let expected_long = generate_text(&long_user, 8);
    let body = chat_request(&long_user, 8);
    let (status, v) = std::thread::scope(|s| {
        let pending = s.spawn(|| c.post(&api, "/chat/completions", &body));
        std::thread::sleep(Duration::from_millis(400));
        signal(c.pid("prefill-0"), libc::SIGKILL);
        pending.join().expect("request thread")
    });
    assert_eq!(status, 200, "{v}");
    let fallbacks: f64 = c
        .instances_of(Role::Decode)
        .iter()
        .map(|i| c.metric(&i.http_addr, "tandem_worker_local_fallbacks_total"))
        .sum();
    assert!(
        fallbacks >= 1.0,
        "the decode worker fell back to a local prefill"
    );
    assert_eq!(
        v["choices"][0]["message"]["content"].as_str(),
        Some(expected_long.as_str()),
        "the request completed with the same tokens after its prefill worker died"
    );

    eprintln!("cluster test: decode worker killed before its first token");
    // A decode worker killed before the first token: the router still routes
    // the prefix to it (its lease has not expired), fails, and retries on the other.
    signal(c.pid(&holder), libc::SIGKILL);
    let agg_metrics = format!("127.0.0.1:{agg_port}");
    let retries = c.metric(&agg_metrics, "tandem_router_retries_total");
    let (text, _) = chat(&c, &agg, &format!("{prefix}the third question?"), 4);
    assert!(!text.is_empty());
    assert!(
        c.metric(&agg_metrics, "tandem_router_retries_total") > retries,
        "the router retried the request on the other decode worker"
    );
    eprintln!("cluster test: the dead worker leaves the view");
    // Within the lease TTL the dead worker leaves the router's view.
    wait_until(
        &format!("{holder} leaves the view"),
        Duration::from_secs(15),
        || {
            let (_, health) = c.get(&agg_health);
            let v: Value = serde_json::from_str(&health).unwrap_or(Value::Null);
            // Its replacement may have registered meanwhile.
            let decode = c.ids_of(Role::Decode);
            let gone = !decode.contains(&holder);
            gone && v["decode_workers"].as_u64() == Some(decode.len() as u64)
        },
        || format!("router-agg's health: {}", c.get(&agg_health).1),
    );

    eprintln!("cluster test: the admin API and tandem ctl");
    let listed: Value = serde_json::from_str(&c.ctl(&["workers", "--json"])).expect("JSON");
    let survivor = listed
        .as_array()
        .expect("workers")
        .iter()
        .find(|w| w["role"] == "decode" && w["state"] == "serving")
        .and_then(|w| w["id"].as_str())
        .expect("a serving decode worker is listed")
        .to_owned();
    assert_ne!(survivor, holder);
    let (status, _) = c.get(&format!("{}/workers", c.file.admin_url));
    assert_eq!(status, 401, "the admin API wants its token");
    let api_root = c.root();
    let (status, page) = c.get(&format!("{api_root}/dashboard"));
    assert_eq!(status, 200);
    assert!(
        page.contains("/admin/workers") && page.contains("/metrics"),
        "the dashboard reads the admin API and the metrics"
    );

    eprintln!("cluster test: every metric the Grafana dashboard charts is exported");
    let (status, mut exported) = c.get(&format!("{api_root}/metrics"));
    assert_eq!(status, 200);
    for worker in c.instances().iter().filter(|i| i.role != Role::Router) {
        let (status, text) = c.get(&format!("http://{}/metrics", worker.http_addr));
        assert_eq!(status, 200, "{}'s metrics", worker.id);
        exported.push_str(&text);
    }
    let grafana = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/tandem.json"
    ))
    .expect("the Grafana dashboard");
    let charted = metric_names(&grafana);
    assert!(charted.len() > 20, "the dashboard charts {charted:?}");
    for name in &charted {
        assert!(
            exported.lines().any(|l| {
                // A sample, or the family's declaration (a labelled counter
                // has no sample until its first event).
                let l = l.strip_prefix("# TYPE ").unwrap_or(l);
                l.strip_prefix(name.as_str())
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
            }),
            "the Grafana dashboard charts {name}, which no process exports"
        );
    }

    c.ctl(&["drain", &survivor]);
    let pid = c.pid(&survivor);
    wait_until(
        &format!("{survivor} drains and leaves"),
        Duration::from_secs(30),
        || !alive(pid) && !c.instances().iter().any(|i| i.id == survivor),
        String::new,
    );

    eprintln!("cluster test: workers that left are replaced");
    // The desired counts (1 prefill, 2 decode) still stand: the reconcile
    // loop starts a worker for each one killed or drained above.
    let gone = ["prefill-0", holder.as_str(), survivor.as_str()];
    let serving = |role| {
        c.instances()
            .iter()
            .filter(|i| i.role == role && i.state == WorkerState::Serving)
            .filter(|i| !gone.contains(&i.id.as_str()))
            .count()
    };
    wait_until(
        "replacements serve (1 prefill, 2 decode)",
        Duration::from_secs(60),
        || serving(Role::Prefill) == 1 && serving(Role::Decode) == 2,
        || format!("registered: {:?}", c.instances()),
    );
    let (text, _) = chat(&c, &api, "Say hi to the new workers.", 4);
    assert!(!text.is_empty(), "the replaced cluster serves");
    let log: Value = serde_json::from_str(&c.ctl(&["decisions", "--json"])).expect("JSON");
    let replaced = |role: &str| {
        log["decisions"].as_array().is_some_and(|ds| {
            ds.iter()
                .any(|d| d["by"] == "reconcile" && d["role"] == role)
        })
    };
    assert!(
        replaced("prefill") && replaced("decode"),
        "the decision log records the replacements: {log}"
    );

    eprintln!("cluster test: stopping");
    let status = agg_router.terminate(Duration::from_secs(60), "router-agg");
    assert!(status.success(), "router-agg stopped with {status}");
    c.stop();
}

#[test]
#[ignore = "needs python3 with the openai package (pip install openai)"]
fn the_openai_python_sdk_works_against_tandem_up() {
    let c = Cluster::start("sdk", &["--api-key", "sk-sdk", "--threads", "1"]);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/openai/tests/sdk/check_openai_sdk.py"
    );
    let out = Command::new("python3")
        .args([script, &c.file.api_url, "sk-sdk", MODEL])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    c.stop();
}
