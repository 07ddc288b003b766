//! The `local` connector: the cluster's processes as children of `tandem up`.
//!
//! It starts the router and the workers (`tandem router|prefill|decode`, the
//! same binary) with a certificate from the cluster CA each, and implements
//! [`Connector`]: scaling a worker role up starts new workers (ids such as
//! `decode-3`, never reused), scaling down drains the least-loaded ones (the
//! `Drain` gRPC: no new requests, in-flight ones finish, the worker
//! deregisters and exits) and waits for them to exit. `tandem up` supervises
//! through it: [`LocalConnector::reap`] reports the children that exited, and
//! the cluster file's process list follows every change.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::Context;
use tandem_control_plane::{Connector, ConnectorError, LoadProbe, Store};
use tandem_kv_transfer::tls::ClusterCa;
use tandem_prefill_worker::runtime::ClusterTls;
use tandem_protocol::grpc::worker::{DrainRequest, LoadResponse};
use tandem_protocol::{InstanceInfo, Role, keys};
use tokio::process::{Child, Command};

use crate::up::{ClusterFile, ProcessInfo, issue_identity, write_private};

/// How long a drained worker may take to exit before it is killed: its own
/// drain timeout (30 s by default) and then some.
const DRAIN_WAIT: Duration = Duration::from_secs(90);
/// How long children get to stop on shutdown before they are killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(40);
/// The longest wait for one worker's `Load` or `Drain` answer.
const RPC_TIMEOUT: Duration = Duration::from_secs(3);
/// The certificate name the connector (and the planner) calls workers with.
pub const CLIENT_IDENTITY: &str = "tandem-up";

/// How the connector starts processes.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// The `tandem` binary.
    pub exe: PathBuf,
    /// The GGUF every worker serves.
    pub model: PathBuf,
    /// Compute threads per worker.
    pub threads: usize,
    /// Extra arguments for every worker.
    pub worker_args: Vec<String>,
    /// The control-plane store's gRPC URL.
    pub store_url: String,
    pub cluster: String,
    /// Where each process's certificate directory goes.
    pub tls_dir: PathBuf,
    /// The router's admin token (passed in its environment).
    pub admin_token: String,
}

/// One child process of the cluster.
struct Process {
    name: String,
    role: Role,
    child: Child,
    /// Asked to drain: it no longer counts towards its role's replicas.
    draining: bool,
}

#[derive(Default)]
struct Procs {
    list: Vec<Process>,
    /// The next id number of each role.
    next: BTreeMap<Role, u32>,
    /// Shutting down: nothing new starts.
    stopping: bool,
}

/// A child that exited.
#[derive(Debug)]
pub struct Exited {
    pub name: String,
    pub role: Role,
    pub status: std::process::ExitStatus,
    /// The connector had asked it to drain.
    pub drained: bool,
}

/// Starts, drains and supervises the processes of a local cluster.
pub struct LocalConnector<S> {
    cfg: LocalConfig,
    ca: ClusterCa,
    store: S,
    /// The identity the connector presents to workers.
    tls: ClusterTls,
    procs: Mutex<Procs>,
    /// Where the cluster file goes and what it says besides the processes.
    cluster_file: Mutex<Option<(PathBuf, ClusterFile)>>,
}

impl<S: Store + Clone> LocalConnector<S> {
    /// A connector with no process yet; issues its own client identity.
    pub fn new(cfg: LocalConfig, ca: ClusterCa, store: S) -> anyhow::Result<Self> {
        let dir = issue_identity(&ca, &cfg.tls_dir, CLIENT_IDENTITY)?;
        let tls = ClusterTls::load(&dir)?;
        Ok(Self {
            cfg,
            ca,
            store,
            tls,
            procs: Mutex::new(Procs::default()),
            cluster_file: Mutex::new(None),
        })
    }

    /// The identity the connector calls workers with (the planner's too).
    pub fn client_tls(&self) -> &ClusterTls {
        &self.tls
    }

    fn procs(&self) -> MutexGuard<'_, Procs> {
        self.procs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts the router with `args` (its listen address, policy, keys).
    pub fn spawn_router(&self, args: Vec<String>) -> anyhow::Result<String> {
        self.spawn(Role::Router, args)
    }

    /// Starts one more worker of `role`; returns its id.
    pub fn spawn_worker(&self, role: Role) -> anyhow::Result<String> {
        let mut args = vec![
            role.as_str().to_owned(),
            "--model".to_owned(),
            self.cfg.model.display().to_string(),
            "--threads".to_owned(),
            self.cfg.threads.to_string(),
        ];
        args.extend(self.cfg.worker_args.iter().cloned());
        self.spawn(role, args)
    }

    fn spawn(&self, role: Role, mut args: Vec<String>) -> anyhow::Result<String> {
        let name = {
            let mut procs = self.procs();
            anyhow::ensure!(!procs.stopping, "the cluster is stopping");
            let n = procs.next.entry(role).or_insert(0);
            let name = format!("{role}-{n}");
            *n += 1;
            name
        };
        let node_dir = issue_identity(&self.ca, &self.cfg.tls_dir, &name)?;
        args.extend([
            "--store".to_owned(),
            self.cfg.store_url.clone(),
            "--cluster".to_owned(),
            self.cfg.cluster.clone(),
            "--id".to_owned(),
            name.clone(),
            "--tls-dir".to_owned(),
            node_dir.display().to_string(),
        ]);
        if role == Role::Decode {
            // Prefill workers of this cluster share the host: KV comes
            // through shared memory. (A Unix socket path has at most 107
            // bytes; a longer run directory keeps to QUIC.)
            let socket = node_dir.join("kv.sock");
            if socket.as_os_str().len() < 100 {
                args.extend(["--kv-socket".to_owned(), socket.display().to_string()]);
            }
        }
        let mut command = Command::new(&self.cfg.exe);
        if role == Role::Router {
            // In the environment, not on the command line where `ps` shows it.
            command.env("TANDEM_ADMIN_TOKEN", &self.cfg.admin_token);
        }
        let child = command
            .args(&args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        {
            let mut procs = self.procs();
            procs.list.push(Process {
                name: name.clone(),
                role,
                child,
                draining: false,
            });
        }
        self.publish();
        Ok(name)
    }

    /// Removes the children that exited, reporting each; the cluster file follows.
    pub fn reap(&self) -> Vec<Exited> {
        let mut exited = Vec::new();
        {
            let mut procs = self.procs();
            let mut i = 0;
            while i < procs.list.len() {
                match procs.list[i].child.try_wait() {
                    Ok(Some(status)) => {
                        let p = procs.list.remove(i);
                        exited.push(Exited {
                            name: p.name,
                            role: p.role,
                            status,
                            drained: p.draining,
                        });
                    }
                    Ok(None) => i += 1,
                    Err(e) => {
                        eprintln!("tandem up: cannot check {}: {e}", procs.list[i].name);
                        i += 1;
                    }
                }
            }
        }
        for p in &exited {
            if p.status.success() {
                eprintln!(
                    "tandem up: {} ({}) drained and left the cluster",
                    p.name, p.role
                );
            } else if p.drained {
                // Stopped before it could drain (still starting, or killed
                // after the drain wait).
                eprintln!("tandem up: {} ({}) stopped ({})", p.name, p.role, p.status);
            } else {
                eprintln!(
                    "tandem up: {} ({}) exited unexpectedly ({}); a replacement starts at the next check",
                    p.name, p.role, p.status
                );
            }
        }
        if !exited.is_empty() {
            self.publish();
        }
        exited
    }

    /// The first exited child, if any, without reporting it (for startup).
    pub fn first_exited(&self) -> Option<Exited> {
        self.reap_quietly().into_iter().next()
    }

    fn reap_quietly(&self) -> Vec<Exited> {
        let mut procs = self.procs();
        let mut exited = Vec::new();
        procs.list.retain_mut(|p| match p.child.try_wait() {
            Ok(Some(status)) => {
                exited.push(Exited {
                    name: p.name.clone(),
                    role: p.role,
                    status,
                    drained: p.draining,
                });
                false
            }
            _ => true,
        });
        exited
    }

    /// Whether a process of `role` still runs.
    pub fn any_running(&self, role: Role) -> bool {
        self.procs().list.iter().any(|p| p.role == role)
    }

    /// Live processes of `role`, draining ones included.
    pub fn count(&self, role: Role) -> u32 {
        let n = self.procs().list.iter().filter(|p| p.role == role).count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Live processes of `role` that are not draining: the role's replicas.
    pub fn active(&self, role: Role) -> u32 {
        let n = self
            .procs()
            .list
            .iter()
            .filter(|p| p.role == role && !p.draining)
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// From now on the cluster file at `path` says `file` with the current
    /// process list; writes it now.
    pub fn set_cluster_file(&self, path: PathBuf, file: ClusterFile) {
        *self
            .cluster_file
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((path, file));
        self.publish();
    }

    /// Removes the cluster file (on shutdown); nothing rewrites it after.
    pub fn remove_cluster_file(&self) {
        let taken = self
            .cluster_file
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((path, _)) = taken {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Rewrites the cluster file with the current processes.
    fn publish(&self) {
        let processes: Vec<ProcessInfo> = self
            .procs()
            .list
            .iter()
            .filter_map(|p| {
                Some(ProcessInfo {
                    name: p.name.clone(),
                    role: p.role,
                    pid: p.child.id()?,
                })
            })
            .collect();
        let guard = self
            .cluster_file
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some((path, file)) = guard.as_ref() else {
            return;
        };
        let file = ClusterFile {
            processes,
            ..file.clone()
        };
        let written = serde_json::to_vec_pretty(&file)
            .map_err(std::io::Error::other)
            .and_then(|bytes| write_private(path, &bytes));
        if let Err(e) = written {
            eprintln!("tandem up: cannot write {}: {e}", path.display());
        }
    }

    /// The registrations of `role` in the store, by id.
    async fn registered(&self, role: Role) -> Result<BTreeMap<String, InstanceInfo>, String> {
        let (kvs, _) = self
            .store
            .list(&keys::role_instances(&self.cfg.cluster, role))
            .await
            .map_err(|e| e.to_string())?;
        Ok(kvs
            .iter()
            .filter_map(|kv| InstanceInfo::from_json(&kv.key, &kv.value).ok())
            .map(|i| (i.id.clone(), i))
            .collect())
    }

    /// A worker's load report.
    pub async fn worker_load(&self, info: &InstanceInfo) -> Result<LoadResponse, String> {
        crate::control::worker_load(&self.tls, info).await
    }

    /// Picks `n` workers of `role` to stop: those still starting first (they
    /// hold nothing), then the least loaded, newest first on ties.
    async fn pick_victims(&self, role: Role, n: usize) -> Vec<(String, Option<InstanceInfo>)> {
        let candidates: Vec<String> = self
            .procs()
            .list
            .iter()
            .filter(|p| p.role == role && !p.draining)
            .map(|p| p.name.clone())
            .collect();
        let registered = self.registered(role).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot list the workers; picking by age");
            BTreeMap::new()
        });
        let mut ranked = Vec::new();
        for (age, name) in candidates.into_iter().enumerate() {
            let info = registered.get(&name).cloned();
            let load = match &info {
                Some(info) => match self.worker_load(info).await {
                    Ok(l) => u64::from(l.running) + u64::from(l.waiting),
                    Err(_) => u64::MAX,
                },
                None => 0,
            };
            ranked.push((info.is_some(), load, std::cmp::Reverse(age), name, info));
        }
        ranked.sort_by_key(|r| (r.0, r.1, r.2));
        ranked
            .into_iter()
            .take(n)
            .map(|(_, _, _, name, info)| (name, info))
            .collect()
    }

    /// Asks a worker to drain: the `Drain` gRPC when it is registered, else
    /// (or when the call fails) SIGTERM, which drains too.
    async fn drain(&self, name: &str, info: Option<&InstanceInfo>) {
        let pid = {
            let mut procs = self.procs();
            let Some(p) = procs.list.iter_mut().find(|p| p.name == name) else {
                return;
            };
            p.draining = true;
            p.child.id()
        };
        if let Some(info) = info {
            match self.tls.client_of(info) {
                Ok(mut client) => {
                    match tokio::time::timeout(RPC_TIMEOUT, client.drain(DrainRequest {})).await {
                        Ok(Ok(r)) => {
                            eprintln!(
                                "tandem up: draining {name} ({} request(s) in flight)",
                                r.into_inner().in_flight
                            );
                            return;
                        }
                        Ok(Err(status)) => {
                            tracing::warn!(%name, %status, "the Drain call failed; sending SIGTERM");
                        }
                        Err(_) => {
                            tracing::warn!(%name, "the Drain call timed out; sending SIGTERM");
                        }
                    }
                }
                Err(e) => tracing::warn!(%name, error = %e, "no client; sending SIGTERM"),
            }
        }
        eprintln!("tandem up: stopping {name}");
        if let Some(pid) = pid {
            terminate(pid);
        }
    }

    /// Waits until none of `names` runs; kills those left after `timeout`.
    async fn wait_gone(&self, names: &[String], timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut killed = false;
        loop {
            self.reap();
            let left: Vec<String> = {
                let procs = self.procs();
                procs
                    .list
                    .iter()
                    .filter(|p| names.contains(&p.name))
                    .map(|p| p.name.clone())
                    .collect()
            };
            if left.is_empty() {
                return;
            }
            if !killed && tokio::time::Instant::now() > deadline {
                let mut procs = self.procs();
                for p in procs.list.iter_mut().filter(|p| left.contains(&p.name)) {
                    eprintln!(
                        "tandem up: {} did not drain in {}s; killing it",
                        p.name,
                        timeout.as_secs()
                    );
                    let _ = p.child.start_kill();
                }
                killed = true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Scales `role` to `replicas` workers.
    async fn scale_to(&self, role: Role, replicas: u32) -> anyhow::Result<()> {
        anyhow::ensure!(
            matches!(role, Role::Prefill | Role::Decode),
            "{role} is not a worker role"
        );
        self.reap();
        let active = self.active(role);
        if active < replicas {
            for _ in active..replicas {
                let name = self.spawn_worker(role)?;
                eprintln!("tandem up: started {name} ({role} {replicas} wanted)");
            }
        } else if active > replicas {
            let n = (active - replicas) as usize;
            let victims = self.pick_victims(role, n).await;
            for (name, info) in &victims {
                self.drain(name, info.as_ref()).await;
            }
            let names: Vec<String> = victims.into_iter().map(|(n, _)| n).collect();
            self.wait_gone(&names, DRAIN_WAIT).await;
        }
        Ok(())
    }

    /// SIGTERM to every child (router first, so it stops taking requests),
    /// then waits; whatever still runs after the timeout is killed.
    pub async fn stop_all(&self) {
        let mut list = {
            let mut procs = self.procs();
            procs.stopping = true;
            std::mem::take(&mut procs.list)
        };
        list.sort_by_key(|p| p.role != Role::Router);
        for p in &list {
            if let Some(pid) = p.child.id() {
                terminate(pid);
            }
        }
        let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
        for p in &mut list {
            match tokio::time::timeout_at(deadline, p.child.wait()).await {
                Ok(Ok(status)) if status.success() => {}
                Ok(Ok(status)) => eprintln!("tandem up: {} stopped with {status}", p.name),
                Ok(Err(e)) => eprintln!("tandem up: waiting for {}: {e}", p.name),
                Err(_) => {
                    eprintln!("tandem up: {} did not stop in time; killing it", p.name);
                    let _ = p.child.kill().await;
                }
            }
        }
    }
}

impl<S: Store + Clone> Connector for LocalConnector<S> {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn scale(&self, role: Role, replicas: u32) -> Result<(), ConnectorError> {
        self.scale_to(role, replicas)
            .await
            .map_err(|e| ConnectorError {
                connector: "local",
                message: format!("{e:#}"),
            })
    }

    async fn running(&self, role: Role) -> Result<u32, ConnectorError> {
        self.reap();
        Ok(self.count(role))
    }
}

impl<S: Store + Clone> LoadProbe for LocalConnector<S> {
    async fn load(&self, info: &InstanceInfo) -> Result<LoadResponse, String> {
        self.worker_load(info).await
    }
}

/// Sends SIGTERM to `pid`.
fn terminate(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions; a stale pid only
    // yields ESRCH, which there is nothing to do about.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
}
