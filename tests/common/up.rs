//! `tandem up` clusters for the end-to-end tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tandem::up::ClusterFile;
use tandem_control_plane::{RemoteStore, Store};
use tandem_protocol::{InstanceInfo, Role, keys};

use super::{BIN, alive, free_port, fresh_temp_dir, model_path, signal, stdout_of};
use super::{wait_exit, wait_for};

/// A `tandem up` cluster in a temporary run directory, stopped on drop.
pub struct Up {
    pub child: Child,
    /// Its run directory.
    pub dir: PathBuf,
    /// The cluster file as it was when the cluster came up.
    pub file: ClusterFile,
    /// Whether its output goes to `up.log` in the run directory.
    logged: bool,
}

impl Up {
    /// Starts `tandem up` on the default model and a free port as cluster
    /// `name`, with `args`, and waits up to `limit` for its cluster file. Its
    /// output goes to the test's, or with `logged` to `up.log` in its run
    /// directory, whose last lines failures then quote.
    pub fn start(name: &str, args: &[&str], limit: Duration, logged: bool) -> Self {
        let dir = fresh_temp_dir(&format!("up-{name}"));
        let mut cmd = Command::new(BIN);
        cmd.args(["up", "--model", &model_path()])
            .args(["--port", &free_port().to_string(), "--cluster", name])
            .arg("--run-dir")
            .arg(&dir)
            .args(args)
            .stdin(Stdio::null());
        if logged {
            let log = std::fs::File::create(dir.join("up.log")).expect("log file");
            cmd.stdout(log.try_clone().expect("log file")).stderr(log);
        }
        let mut up = Self {
            child: cmd.spawn().expect("tandem up starts"),
            dir,
            file: no_cluster_file(),
            logged,
        };
        let path = up.cluster_file_path();
        let (child, log) = (&mut up.child, || log_tail(&up.dir, logged));
        up.file = wait_for(
            "the cluster comes up (tandem up writes cluster.json)",
            limit,
            || {
                if let Some(status) = child.try_wait().expect("try_wait") {
                    panic!(
                        "tandem up exited before the cluster came up: {status}; {}",
                        log()
                    );
                }
                ClusterFile::read(&path).ok()
            },
            log,
        );
        up
    }

    /// `<run dir>/cluster.json`.
    pub fn cluster_file_path(&self) -> PathBuf {
        self.dir.join("cluster.json")
    }

    /// The cluster file as it is now (its process list follows scaling).
    pub fn current_file(&self) -> ClusterFile {
        ClusterFile::read(&self.cluster_file_path()).expect("cluster file")
    }

    /// `http://127.0.0.1:PORT`, where the router serves the API, `/health`,
    /// `/metrics` and `/dashboard`.
    pub fn root(&self) -> String {
        self.file.api_url.trim_end_matches("/v1").to_owned()
    }

    /// The last lines of `up.log`, for failure messages.
    pub fn log(&self) -> String {
        log_tail(&self.dir, self.logged)
    }

    /// The registered instances, from the cluster's store.
    pub fn instances(&self) -> Vec<InstanceInfo> {
        self.list_instances(&keys::instances(&self.file.cluster))
    }

    /// The registered instances of `role`, from the cluster's store.
    pub fn instances_of(&self, role: Role) -> Vec<InstanceInfo> {
        self.list_instances(&keys::role_instances(&self.file.cluster, role))
    }

    /// The ids of the registered instances of `role`, in the store's order.
    pub fn ids_of(&self, role: Role) -> Vec<String> {
        self.instances_of(role).into_iter().map(|i| i.id).collect()
    }

    fn list_instances(&self, prefix: &str) -> Vec<InstanceInfo> {
        // A runtime per call: dropping it closes the store connection, which
        // would otherwise hold up the store's shutdown.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let store = RemoteStore::connect(&self.file.store_url).expect("store client");
            let (kvs, _) = store.list(prefix).await.expect("list");
            kvs.iter()
                .map(|kv| InstanceInfo::from_json(&kv.key, &kv.value).expect("registration"))
                .collect()
        })
    }

    /// Runs `tandem ctl args...` on this cluster and returns what it prints.
    pub fn ctl(&self, args: &[&str]) -> String {
        stdout_of(
            Command::new(BIN)
                .arg("ctl")
                .arg("--cluster-file")
                .arg(self.cluster_file_path())
                .args(args),
            &format!("tandem ctl {args:?}"),
        )
    }

    /// Sends SIGTERM to `tandem up` (the pid its cluster file gives) and checks
    /// that it exits successfully within `limit`.
    pub fn stop(&mut self, limit: Duration) {
        signal(self.file.pid, libc::SIGTERM);
        let status = wait_exit(&mut self.child, limit, "tandem up stops on SIGTERM");
        assert!(
            status.success(),
            "tandem up exited with {status}; {}",
            self.log()
        );
    }

    /// Checks that every process the cluster file listed when the cluster came
    /// up has exited.
    pub fn assert_processes_stopped(&self) {
        for p in &self.file.processes {
            assert!(
                !alive(p.pid),
                "{} (pid {}) outlived tandem up",
                p.name,
                p.pid
            );
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            signal(self.child.id(), libc::SIGTERM);
            let start = Instant::now();
            while self.child.try_wait().ok().flatten().is_none() {
                if start.elapsed() > Duration::from_secs(60) {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The pid of process `name` in `file`.
pub fn process_pid(file: &ClusterFile, name: &str) -> u32 {
    file.processes
        .iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no process {name} in the cluster file"))
        .pid
}

/// The last lines of `up.log` in run directory `dir`, when `logged`.
fn log_tail(dir: &Path, logged: bool) -> String {
    if !logged {
        return "tandem up's output is above".to_owned();
    }
    let text = std::fs::read_to_string(dir.join("up.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(30)..];
    format!("tandem up's log ends:\n{}", tail.join("\n"))
}

/// A placeholder until `tandem up` writes its cluster file.
fn no_cluster_file() -> ClusterFile {
    ClusterFile {
        cluster: String::new(),
        api_url: String::new(),
        store_url: String::new(),
        tls_dir: PathBuf::new(),
        admin_url: String::new(),
        admin_token: String::new(),
        pid: 0,
        processes: Vec::new(),
    }
}
