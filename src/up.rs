//! `tandem up`: a whole local cluster from one command.
//!
//! This process hosts the embedded control-plane store (served over gRPC on
//! loopback), creates the cluster CA and one certificate per process, and
//! starts the router and the workers as child processes (`tandem router`,
//! `tandem prefill`, `tandem decode`: the same binary). It waits until the router
//! and every decode worker have registered, prints the API URL, writes the
//! cluster file that `tandem ctl` and tests read, and then supervises: a child
//! that exits is reported at once; Ctrl-C or SIGTERM stops every child
//! gracefully (SIGTERM, then SIGKILL after the drain timeout) and then the store.
//!
//! The children are the `local` connector's ([`LocalConnector`]): a reconcile
//! loop keeps the workers at `planner/desired/<role>` (written from
//! `--prefill`/`--decode` at start, then by operators or, with `--autoscale`,
//! by the planner that runs here too), starting new ones and draining extra
//! ones; the cluster file's process list follows.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tandem_control_plane::{Compare, EmbeddedConfig, EmbeddedStore, Store, TxnOp};
use tandem_kv_transfer::tls::ClusterCa;
use tandem_protocol::{Desired, unix_ms};
use tandem_protocol::{InstanceInfo, Role, keys};
use tokio::signal::unix::{SignalKind, signal};

use crate::connector_local::{LocalConfig, LocalConnector};

/// How long the store waits for its clients to disconnect when it stops.
const STORE_STOP_GRACE: Duration = Duration::from_secs(5);
/// How long the cluster may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(180);

/// What `tandem up` starts.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// The GGUF every worker serves.
    pub model: PathBuf,
    /// The OpenAI API address.
    pub listen: SocketAddr,
    pub prefill: usize,
    pub decode: usize,
    pub cluster: String,
    /// `never`, `auto` or `always`.
    pub disagg: String,
    /// Compute threads per worker (default: the cores shared out among workers).
    pub threads: Option<usize>,
    /// API keys the router requires (none: open on loopback).
    pub api_keys: Vec<String>,
    /// Where the cluster's files go (default: the cache's `clusters/<name>`).
    pub run_dir: Option<PathBuf>,
    /// Extra arguments for every worker (e.g. `--kv-blocks 512`).
    pub worker_args: Vec<String>,
    /// Run the planner: it sets the desired worker counts from load and the
    /// SLA targets (without it only operators change them).
    pub autoscale: bool,
}

/// What a running cluster publishes about itself, at `<run dir>/cluster.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterFile {
    pub cluster: String,
    /// The OpenAI API base URL (`http://127.0.0.1:8080/v1`).
    pub api_url: String,
    /// The control-plane store's gRPC URL.
    pub store_url: String,
    /// The directory holding the cluster CA and each process's certificate.
    pub tls_dir: PathBuf,
    /// The router's admin API (`/admin/...`) base URL.
    pub admin_url: String,
    /// The bearer token of the admin API (the file is readable by its owner only).
    pub admin_token: String,
    /// The `tandem up` process.
    pub pid: u32,
    /// The processes it started.
    pub processes: Vec<ProcessInfo>,
}

/// One process of a local cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// Its id in the store (`decode-0`).
    pub name: String,
    pub role: Role,
    pub pid: u32,
}

impl ClusterFile {
    /// The cluster file of a cluster called `cluster` in the default run directory.
    pub fn default_path(cluster: &str) -> PathBuf {
        default_run_dir(cluster).join("cluster.json")
    }

    /// Reads a cluster file.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read(path)
            .with_context(|| format!("no running cluster: cannot read {}", path.display()))?;
        serde_json::from_slice(&text)
            .with_context(|| format!("bad cluster file {}", path.display()))
    }
}

fn default_run_dir(cluster: &str) -> PathBuf {
    tandem_engine::paths::cache_dir()
        .join("clusters")
        .join(cluster)
}

/// Runs the cluster until Ctrl-C or SIGTERM.
pub fn run(opts: UpOptions) -> anyhow::Result<()> {
    anyhow::ensure!(opts.decode >= 1, "--decode must be at least 1");
    anyhow::ensure!(
        matches!(opts.disagg.as_str(), "never" | "auto" | "always"),
        "--disagg must be never, auto or always, not {:?}",
        opts.disagg
    );
    crate::runtime()?.block_on(up(opts))
}

async fn up(opts: UpOptions) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let dir = opts
        .run_dir
        .clone()
        .unwrap_or_else(|| default_run_dir(&opts.cluster));
    let tls_dir = dir.join("tls");
    if tls_dir.exists() {
        std::fs::remove_dir_all(&tls_dir)
            .with_context(|| format!("clearing {}", tls_dir.display()))?;
    }
    std::fs::create_dir_all(&tls_dir).with_context(|| format!("creating {}", tls_dir.display()))?;

    // The API port is checked before anything starts, so a busy port is one clear error.
    drop(
        std::net::TcpListener::bind(opts.listen)
            .with_context(|| format!("the API address {} is not free", opts.listen))?,
    );

    let local_store = LoopbackStore::start(&dir.join("store")).await?;
    let (store, store_url) = (local_store.store.clone(), local_store.url.clone());

    let ca = ClusterCa::generate(&format!("tandem {} cluster", opts.cluster))?;
    let admin_token = random_token().context("making the admin token")?;
    let exe = std::env::current_exe().context("finding the tandem binary")?;
    let workers = opts.prefill + opts.decode;
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let threads = opts.threads.unwrap_or((cores / workers).max(1));

    let connector = Arc::new(LocalConnector::new(
        LocalConfig {
            exe,
            model: opts.model.clone(),
            threads,
            worker_args: opts.worker_args.clone(),
            store_url: store_url.clone(),
            cluster: opts.cluster.clone(),
            tls_dir: tls_dir.clone(),
            admin_token: admin_token.clone(),
        },
        ca,
        store.clone(),
    )?);
    let mut router_args = vec![
        "router".to_owned(),
        "--listen".to_owned(),
        opts.listen.to_string(),
        "--disagg".to_owned(),
        opts.disagg.clone(),
    ];
    for key in &opts.api_keys {
        router_args.extend(["--api-key".to_owned(), key.clone()]);
    }
    let cluster_file = dir.join("cluster.json");
    let (stop_tasks, tasks_stopped) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    let outcome = async {
        connector.spawn_router(router_args)?;
        for (role, n) in [(Role::Prefill, opts.prefill), (Role::Decode, opts.decode)] {
            for _ in 0..n {
                connector.spawn_worker(role)?;
            }
        }
        // The operator's counts, unless the store already has some.
        for (role, n) in [(Role::Prefill, opts.prefill), (Role::Decode, opts.decode)] {
            init_desired(&store, &opts.cluster, role, n).await?;
        }

        let api_url = format!("http://{}/v1", opts.listen);
        tokio::select! {
            r = wait_ready(&store, &opts.cluster, opts.decode, opts.prefill, &connector) => r?,
            _ = sigterm.recv() => anyhow::bail!("stopped while starting"),
            _ = sigint.recv() => anyhow::bail!("stopped while starting"),
        }
        connector.set_cluster_file(
            cluster_file.clone(),
            ClusterFile {
                cluster: opts.cluster.clone(),
                api_url: api_url.clone(),
                store_url: store_url.clone(),
                tls_dir: tls_dir.clone(),
                admin_url: format!("http://{}/admin", opts.listen),
                admin_token: admin_token.clone(),
                pid: std::process::id(),
                processes: Vec::new(),
            },
        );
        tasks.push(tokio::spawn(tandem_control_plane::reconcile(
            store.clone(),
            opts.cluster.clone(),
            connector.clone(),
            tasks_stopped.clone(),
        )));
        if opts.autoscale {
            tasks.push(tokio::spawn(tandem_control_plane::run_planner(
                store.clone(),
                opts.cluster.clone(),
                format!("tandem-up-{}", std::process::id()),
                connector.clone(),
                tasks_stopped.clone(),
            )));
        }
        println!(
            "tandem is up: {} prefill, {} decode worker(s), model {}",
            opts.prefill,
            opts.decode,
            opts.model.display()
        );
        println!("  API        {api_url}");
        println!("  dashboard  http://{}/dashboard", opts.listen);
        println!("  metrics    http://{}/metrics", opts.listen);
        println!(
            "  admin      http://{}/admin (token in the cluster file; `tandem ctl`)",
            opts.listen
        );
        println!("  store      {store_url}");
        println!("  cluster    {}", cluster_file.display());
        if opts.autoscale {
            println!("  planner    on: scales workers to the targets (`tandem ctl targets`)");
        }
        println!("Ctrl-C stops the cluster.");
        supervise(&connector, &mut sigterm, &mut sigint).await;
        Ok(())
    }
    .await;
    eprintln!("tandem up: stopping");
    let _ = stop_tasks.send(true);
    for task in tasks {
        if let Err(e) = task.await {
            eprintln!("tandem up: a control task ended abnormally: {e}");
        }
    }
    connector.stop_all().await;
    connector.remove_cluster_file();
    if let Err(e) = local_store.stop().await {
        eprintln!("tandem up: {e:#}");
    }
    outcome
}

/// Writes `planner/desired/<role>` = `n` (by the operator) unless it is set.
async fn init_desired<S: Store>(
    store: &S,
    cluster: &str,
    role: Role,
    n: usize,
) -> anyhow::Result<()> {
    let key = keys::planner_desired(cluster, role);
    let desired = Desired {
        replicas: u32::try_from(n).context("too many workers")?,
        by: "operator".to_owned(),
        at_ms: unix_ms(),
    };
    store
        .txn(
            vec![Compare {
                key: key.clone(),
                mod_revision: 0,
            }],
            vec![TxnOp::Put {
                key,
                value: serde_json::to_vec(&desired)?,
                lease: None,
            }],
            vec![],
        )
        .await
        .with_context(|| format!("writing the desired {role} count"))?;
    Ok(())
}

/// The embedded store (a Raft group of one), served over gRPC on a free
/// loopback port.
pub struct LoopbackStore {
    pub store: EmbeddedStore,
    /// Its gRPC URL (`http://127.0.0.1:PORT`).
    pub url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl LoopbackStore {
    /// Binds a free loopback port and serves a fresh store on it, its log and
    /// snapshots in `data_dir` (cleared first: every run starts empty, as its
    /// registrations and leases belong to processes that are gone).
    pub async fn start(data_dir: &Path) -> anyhow::Result<Self> {
        if data_dir.exists() {
            std::fs::remove_dir_all(data_dir)
                .with_context(|| format!("clearing {}", data_dir.display()))?;
        }
        let store = EmbeddedStore::open(EmbeddedConfig::single(data_dir), None)
            .await
            .with_context(|| {
                format!("opening the control-plane store in {}", data_dir.display())
            })?;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .context("binding the control-plane store")?;
        let url = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(tandem_control_plane::serve(
            store.clone(),
            listener,
            async {
                let _ = stopped.await;
            },
        ));
        Ok(Self {
            store,
            url,
            stop,
            task,
        })
    }

    /// Stops serving and waits for the server to end.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        // Ending the store ends its watches, which lets the server finish.
        self.store.shutdown().await;
        // A client that holds a connection open (a process started by hand
        // against this store) must not hold up the exit.
        let mut task = self.task;
        match tokio::time::timeout(STORE_STOP_GRACE, &mut task).await {
            Ok(joined) => joined
                .context("the control-plane store task")?
                .context("the control-plane store"),
            Err(_) => {
                task.abort();
                eprintln!(
                    "tandem up: the store's clients did not disconnect in {}s; closed them",
                    STORE_STOP_GRACE.as_secs()
                );
                Ok(())
            }
        }
    }
}

/// Writes a certificate from `ca` for `name` (and `localhost`, `127.0.0.1`) into
/// `dir/name/` as `ca.pem`, `node.pem`, `node.key`; returns that directory.
pub fn issue_identity(ca: &ClusterCa, dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let node_dir = dir.join(name);
    std::fs::create_dir_all(&node_dir)
        .with_context(|| format!("creating {}", node_dir.display()))?;
    ca.issue(&[name, "localhost", "127.0.0.1"])?
        .write_files(&node_dir)?;
    Ok(node_dir)
}

/// Waits until the router and every worker have registered; fails if a child
/// exits first or the cluster takes too long.
async fn wait_ready<S: Store + Clone>(
    store: &S,
    cluster: &str,
    decode: usize,
    prefill: usize,
    connector: &LocalConnector<S>,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        if let Some(p) = connector.first_exited() {
            bail!(
                "{} exited while the cluster was starting ({})",
                p.name,
                p.status
            );
        }
        let counts = registered(store, cluster).await?;
        let n = |r: Role| counts.get(&r).copied().unwrap_or(0);
        if n(Role::Router) >= 1 && n(Role::Decode) >= decode && n(Role::Prefill) >= prefill {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "the cluster did not come up in {}s: registered router {}, decode {}/{decode}, prefill {}/{prefill}",
                START_TIMEOUT.as_secs(),
                n(Role::Router),
                n(Role::Decode),
                n(Role::Prefill),
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Registered instances by role.
async fn registered<S: Store>(store: &S, cluster: &str) -> anyhow::Result<BTreeMap<Role, usize>> {
    let (kvs, _) = store.list(&keys::instances(cluster)).await?;
    let mut counts = BTreeMap::new();
    for kv in kvs {
        match InstanceInfo::from_json(&kv.key, &kv.value) {
            Ok(info) => *counts.entry(info.role).or_insert(0) += 1,
            Err(e) => tracing::warn!("{e}"),
        }
    }
    Ok(counts)
}

/// Reports children that exit (those started later included) until a stop
/// signal arrives or the router is gone.
async fn supervise<S: Store + Clone>(
    connector: &LocalConnector<S>,
    sigterm: &mut tokio::signal::unix::Signal,
    sigint: &mut tokio::signal::unix::Signal,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = sigterm.recv() => return,
            _ = sigint.recv() => return,
            _ = tick.tick() => {}
        }
        connector.reap();
        if !connector.any_running(Role::Router) {
            eprintln!("tandem up: the router is gone; stopping the cluster");
            return;
        }
    }
}

/// 128 random bits, hex.
fn random_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes a file only its owner can read.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("json.partial");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
