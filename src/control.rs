//! `tandem control`: the control plane of a cluster that `tandem up` does not
//! run. It does any of three jobs, by its flags:
//!
//! - host one node of the embedded Raft store (alone, or in the group that
//!   `--peers` lists) and serve its client API — unless `--store` points at a
//!   store elsewhere (etcd, or another `tandem control`);
//! - `--planner`: campaign for the planner's leadership and, while leading,
//!   set the desired worker counts from the workers' load (several replicas
//!   may run it; one leads);
//! - `--connector kubernetes`: make the worker Deployments' replicas follow
//!   the desired counts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tandem_control_plane::{
    AnyStore, EmbeddedConfig, EmbeddedStore, LoadProbe, Store, parse_peers, reconcile, run_planner,
};
use tandem_prefill_worker::runtime::ClusterTls;
use tandem_protocol::InstanceInfo;
use tandem_protocol::grpc::worker::{LoadRequest, LoadResponse};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::kubernetes::{KubernetesArgs, KubernetesConnector};

/// How long the store waits for its clients to disconnect when it stops.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long a worker has to answer `Load`.
const LOAD_TIMEOUT: Duration = Duration::from_secs(3);

/// Which connector makes the desired worker counts real.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConnectorKind {
    /// None here (`tandem up` runs the `local` one itself).
    None,
    /// Scale the worker Deployments through the Kubernetes API server.
    Kubernetes,
}

/// `tandem control`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ControlArgs {
    /// Address to serve the embedded store's client API on.
    #[arg(long, default_value = "127.0.0.1:2379")]
    pub listen: SocketAddr,
    /// This node's id in its group (the key of its entry in --peers).
    #[arg(long, default_value_t = 1)]
    pub id: u64,
    /// Every member's Raft address, this node's included:
    /// `1=http://10.0.0.1:2380,2=http://10.0.0.2:2380,3=http://10.0.0.3:2380`.
    /// Without it the node is a group of one.
    #[arg(long, conflicts_with = "store")]
    pub peers: Option<String>,
    /// Where the node keeps its write-ahead log and snapshots
    /// [default: the cache directory's control/node<ID>].
    #[arg(long, conflicts_with = "store")]
    pub data_dir: Option<PathBuf>,
    /// Host no store: use this one (`etcd://h:p[,...]`, `etcds://...`, or
    /// `http://...` for another `tandem control`), for the planner and connector.
    #[arg(long, env = "TANDEM_STORE", value_name = "ADDRESS")]
    pub store: Option<String>,
    /// For `etcds://`: `ca.pem`, `node.pem`, `node.key` of this client.
    #[arg(long, env = "TANDEM_STORE_TLS_DIR", value_name = "DIR")]
    pub store_tls_dir: Option<PathBuf>,
    /// The cluster the planner and connector look after.
    #[arg(long, default_value = "local")]
    pub cluster: String,
    /// Run the planner (one leader among the replicas that run it).
    #[arg(long)]
    pub planner: bool,
    /// The planner's identity in the election (default: `control-<host>-<pid>`).
    #[arg(long, env = "POD_NAME")]
    pub name: Option<String>,
    /// The cluster identity the planner reads workers' load with (mTLS):
    /// `ca.pem`, `node.pem`, `node.key`. Required with --planner.
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// What makes the desired counts real.
    #[arg(long, value_enum, default_value_t = ConnectorKind::None)]
    pub connector: ConnectorKind,
    #[command(flatten)]
    pub kubernetes: KubernetesArgs,
}

/// Reads a worker's load over the cluster's mTLS: the planner's view of it.
pub struct TlsProbe {
    tls: ClusterTls,
}

impl TlsProbe {
    pub fn new(tls: ClusterTls) -> Self {
        Self { tls }
    }
}

/// Asks the worker `info` registered for its load report.
pub async fn worker_load(tls: &ClusterTls, info: &InstanceInfo) -> Result<LoadResponse, String> {
    let mut client = tls.client_of(info).map_err(|e| format!("{e:#}"))?;
    match tokio::time::timeout(LOAD_TIMEOUT, client.load(LoadRequest {})).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(status)) => Err(status.to_string()),
        Err(_) => Err(format!("no answer in {LOAD_TIMEOUT:?}")),
    }
}

impl LoadProbe for TlsProbe {
    async fn load(&self, info: &InstanceInfo) -> Result<LoadResponse, String> {
        worker_load(&self.tls, info).await
    }
}

/// Runs `tandem control` until Ctrl-C or SIGTERM.
pub fn run(args: ControlArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.planner || args.tls_dir.is_some(),
        "--planner needs --tls-dir: the planner reads every worker's load over the cluster's mTLS"
    );
    anyhow::ensure!(
        args.store.is_some() || args.store_tls_dir.is_none(),
        "--store-tls-dir goes with --store etcds://..."
    );
    crate::runtime()?.block_on(async move {
        let mut sigterm =
            signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let (stop_tx, stop) = watch::channel(false);
        let signalled = async move {
            tokio::select! {
                _ = sigterm.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        match &args.store {
            Some(address) => {
                let store = AnyStore::connect(address, args.store_tls_dir.as_deref())
                    .with_context(|| format!("store address {address:?}"))?;
                println!("control plane on the store at {address}");
                let tasks = start_services(&args, store, stop).await?;
                signalled.await;
                let _ = stop_tx.send(true);
                join(tasks).await;
                Ok(())
            }
            None => host_store(&args, stop_tx, stop, signalled).await,
        }
    })
}

/// Hosts a node of the embedded store, with the services `args` asks for,
/// until `signalled`.
async fn host_store(
    args: &ControlArgs,
    stop_tx: watch::Sender<bool>,
    stop: watch::Receiver<bool>,
    signalled: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let peers = match &args.peers {
        Some(list) => parse_peers(list)?,
        None => BTreeMap::new(),
    };
    anyhow::ensure!(
        peers.is_empty() || peers.contains_key(&args.id),
        "--id {} is not in --peers",
        args.id
    );
    let data_dir = args.data_dir.clone().unwrap_or_else(|| {
        tandem_engine::paths::cache_dir()
            .join("control")
            .join(format!("node{}", args.id))
    });
    let config = EmbeddedConfig {
        id: args.id,
        data_dir: data_dir.clone(),
        peers,
        ..EmbeddedConfig::single(&data_dir)
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let store = EmbeddedStore::open(config, None)
        .await
        .with_context(|| format!("opening the store in {}", data_dir.display()))?;
    println!(
        "control-plane store node {} on http://{} (data in {})",
        args.id,
        listener.local_addr()?,
        data_dir.display()
    );
    let tasks = start_services(args, store.clone(), stop).await?;
    let (stopped_tx, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(tandem_control_plane::serve(
        store.clone(),
        listener,
        async move {
            let _ = stopped.await;
        },
    ));
    tokio::select! {
        () = signalled => {}
        served = &mut server => {
            return served
                .context("the store server")?
                .context("serving the store");
        }
    }
    // The planner hands its leadership on while the store still serves.
    let _ = stop_tx.send(true);
    join(tasks).await;
    // Ends the node's watches, so the server can finish; a client holding an
    // idle connection open must not hold up the exit.
    store.shutdown().await;
    let _ = stopped_tx.send(());
    match tokio::time::timeout(STOP_GRACE, &mut server).await {
        Ok(served) => served
            .context("the store server")?
            .context("serving the store"),
        Err(_) => {
            server.abort();
            Ok(())
        }
    }
}

/// Starts the planner and the connector's reconcile loop, as `args` asks.
async fn start_services<S: Store + Clone>(
    args: &ControlArgs,
    store: S,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let mut tasks = Vec::new();
    if args.planner {
        let dir = args
            .tls_dir
            .as_deref()
            .context("--planner needs --tls-dir")?;
        let probe = Arc::new(TlsProbe::new(ClusterTls::load(dir)?));
        let name = args.name.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
            format!("control-{}-{}", host.trim(), std::process::id())
        });
        println!("planner {name} campaigning for cluster {}", args.cluster);
        tasks.push(tokio::spawn(run_planner(
            store.clone(),
            args.cluster.clone(),
            name,
            probe,
            stop.clone(),
        )));
    }
    match args.connector {
        ConnectorKind::None => {}
        ConnectorKind::Kubernetes => {
            let connector = Arc::new(KubernetesConnector::connect(&args.kubernetes).await?);
            println!(
                "kubernetes connector: Deployments {} and {}",
                args.kubernetes.prefill_deployment, args.kubernetes.decode_deployment
            );
            tasks.push(tokio::spawn(reconcile(
                store,
                args.cluster.clone(),
                connector,
                stop,
            )));
        }
    }
    Ok(tasks)
}

async fn join(tasks: Vec<JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}
