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
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tandem::up::ClusterFile;
use tandem_control_plane::{RemoteStore, Store};
use tandem_protocol::{InstanceInfo, Role, keys};

mod common;
use common::{free_port, model_path, signal};

const BIN: &str = env!("CARGO_BIN_EXE_tandem");

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

/// A `tandem up` cluster in a temporary run directory, stopped on drop.
struct Cluster {
    up: Child,
    dir: PathBuf,
    file: ClusterFile,
}

impl Cluster {
    fn start(name: &str, args: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("tandem-scale-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("run dir");
        let port = free_port().to_string();
        let up = Command::new(BIN)
            .args(["up", "--model", &model_path(), "--port", &port])
            .args(["--cluster", name])
            .arg("--run-dir")
            .arg(&dir)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .expect("tandem up starts");
        let path = dir.join("cluster.json");
        let start = Instant::now();
        let mut up = up;
        let file = loop {
            if let Ok(file) = ClusterFile::read(&path) {
                break file;
            }
            if let Some(status) = up.try_wait().expect("try_wait") {
                panic!("tandem up exited before the cluster came up: {status}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "the cluster did not come up"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        Self { up, dir, file }
    }

    /// The cluster file as it is now (its process list follows scaling).
    fn file(&self) -> ClusterFile {
        ClusterFile::read(&self.dir.join("cluster.json")).expect("cluster file")
    }

    fn decode_workers(&self) -> Vec<InstanceInfo> {
        // A runtime per call: dropping it closes the store connection, which
        // would otherwise hold up the store's shutdown.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let store = RemoteStore::connect(&self.file.store_url).expect("store client");
            let (kvs, _) = store
                .list(&keys::role_instances(&self.file.cluster, Role::Decode))
                .await
                .expect("list");
            kvs.iter()
                .map(|kv| InstanceInfo::from_json(&kv.key, &kv.value).expect("registration"))
                .collect()
        })
    }

    fn ctl(&self, args: &[&str]) -> String {
        let out = Command::new(BIN)
            .arg("ctl")
            .arg("--cluster-file")
            .arg(self.dir.join("cluster.json"))
            .args(args)
            .output()
            .expect("tandem ctl runs");
        assert!(
            out.status.success(),
            "tandem ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits (up to `secs`) until `done` holds, describing the wait on failure.
    fn wait(&self, secs: u64, what: &str, mut done: impl FnMut(&Self) -> bool) {
        let start = Instant::now();
        while !done(self) {
            assert!(
                start.elapsed() < Duration::from_secs(secs),
                "{what}: not within {secs} s; decode workers {:?}",
                self.decode_workers()
                    .iter()
                    .map(|i| i.id.clone())
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The decode worker ids registered now.
    fn decode_ids(&self) -> BTreeSet<String> {
        self.decode_workers().into_iter().map(|i| i.id).collect()
    }

    /// Waits until `id` has left the store and its process has exited.
    fn wait_gone(&self, id: &str, pid: u32, secs: u64) {
        self.wait(secs, &format!("{id} drains and exits"), |c| {
            !alive(pid) && !c.decode_ids().contains(id)
        });
        assert!(
            self.file().processes.iter().all(|p| p.name != id),
            "{id} left the cluster file's process list"
        );
    }

    fn pid(&self, name: &str) -> u32 {
        self.file()
            .processes
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no process {name} in the cluster file"))
            .pid
    }

    fn stop(mut self) {
        signal(self.up.id(), libc::SIGTERM);
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.up.try_wait().expect("try_wait") {
                break s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "tandem up did not stop"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(status.success(), "tandem up exited with {status}");
        for p in &self.file.processes {
            assert!(
                !alive(p.pid),
                "{} still runs after tandem up stopped",
                p.name
            );
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.up.try_wait().ok().flatten().is_none() {
            signal(self.up.id(), libc::SIGTERM);
            let start = Instant::now();
            while self.up.try_wait().ok().flatten().is_none() {
                if start.elapsed() > Duration::from_secs(60) {
                    let _ = self.up.kill();
                    let _ = self.up.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Planner decisions, newest first.
fn decisions(c: &Cluster) -> Vec<Value> {
    let v: Value =
        serde_json::from_str(&c.ctl(&["decisions", "--json", "--limit", "50"])).expect("JSON");
    assert!(v["leader"].is_string(), "a planner leads: {v}");
    v["decisions"].as_array().expect("decisions").clone()
}

#[test]
fn operators_and_the_planner_scale_decode_workers() {
    let c = Cluster::start(
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
    );
    assert_eq!(c.decode_ids(), BTreeSet::from(["decode-0".to_owned()]));

    eprintln!("autoscale test: an operator scales decode to 2 and back to 1");
    let out = c.ctl(&["scale", "decode", "2"]);
    assert!(out.contains("desired 2"), "{out}");
    c.wait(60, "decode-1 registers", |c| {
        c.decode_ids().contains("decode-1")
    });
    let pid = c.pid("decode-1");
    let scale: Value = serde_json::from_str(&c.ctl(&["scale", "--json"])).expect("JSON");
    assert_eq!(scale["decode"]["desired"], 2, "{scale}");
    assert_eq!(scale["decode"]["by"], "operator", "{scale}");
    c.ctl(&["scale", "decode", "1"]);
    // Both idle: the newer one goes.
    c.wait_gone("decode-1", pid, 60);
    assert!(c.decode_ids().contains("decode-0"));

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
    let before = c.decode_ids();
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
    let status = loop {
        if let Some(status) = bench.try_wait().expect("try_wait") {
            break status;
        }
        if added.is_none() {
            added = c.decode_ids().difference(&before).next().cloned();
            if let Some(id) = &added {
                eprintln!(
                    "autoscale test: {id} registered {:.1} s into the burst",
                    start.elapsed().as_secs_f64()
                );
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the burst did not finish"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "tandem bench serve exited with {status}");
    let report: Value =
        serde_json::from_slice(&std::fs::read(&bench_out).expect("bench output")).expect("JSON");
    assert_eq!(
        report["failed"], 0,
        "no request of the burst fails: {report}"
    );
    assert_eq!(report["requests"], 48, "{report}");
    // On a busy machine the new worker may still be loading when the burst ends.
    if added.is_none() {
        c.wait(30, "the decode worker the planner added registers", |c| {
            !c.decode_ids()
                .difference(&before)
                .collect::<Vec<_>>()
                .is_empty()
        });
        added = c.decode_ids().difference(&before).next().cloned();
    }
    let added = added.expect("the planner added a decode worker");
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
        .file()
        .processes
        .iter()
        .filter(|p| p.role == Role::Decode)
        .map(|p| (p.name.clone(), p.pid))
        .collect();
    assert_eq!(pids.len(), 2, "{pids:?} ({added} was added)");
    c.wait(40, "the planner scales decode back to 1", |c| {
        c.decode_ids().len() == 1 && pids.iter().filter(|(_, pid)| alive(*pid)).count() == 1
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
        c.file()
            .processes
            .iter()
            .filter(|p| p.role == Role::Decode)
            .count(),
        1
    );

    eprintln!("autoscale test: stopping");
    c.stop();
}
