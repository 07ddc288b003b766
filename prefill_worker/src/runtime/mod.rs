//! What every tandem worker process does, whatever its role: load the engine,
//! serve the one `Worker` gRPC service (KV events, snapshots and load here;
//! Generate or Prefill from the role), serve `/metrics` and `/health`,
//! register in the control plane under a lease, and on shutdown drain: refuse
//! new work, finish what it holds, deregister, stop.
//!
//! A role plugs in through [`RoleService`]; [`serve`] runs the rest.

mod http;
mod metrics;
mod service;
mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use tandem_control_plane::{AnyStore, Registration, Store};
use tandem_engine::device::Device;
use tandem_engine::engine::{Engine, EngineConfig, EngineError};
use tandem_kv_transfer::TransferMetrics;
use tandem_protocol::grpc::worker::{
    GenerateRequest, GenerateResponse, PrefillRequest, PrefillResponse,
};
use tandem_protocol::{InstanceInfo, ModelCard, Role, WorkerState, keys};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::Status;

pub use metrics::{Histogram, WorkerMetrics};
pub use tls::ClusterTls;

/// The stream a Generate call answers with.
pub type GenerateStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<GenerateResponse, Status>> + Send>>;

/// How long the servers get to close their connections after the drain.
const SERVER_STOP_GRACE: Duration = Duration::from_secs(5);
/// How long a shutdown waits on the store for each of its writes: an
/// unreachable store must not hold the process up (the lease expires anyway).
const STORE_GRACE: Duration = Duration::from_secs(3);
/// How long a failing worker lets the calls in flight take their errors out.
const FAILURE_GRACE: Duration = Duration::from_secs(2);

/// Flags every worker takes.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// The control-plane store: `http://host:port` (a tandem store;
    /// comma-separate the nodes of a replicated one), `etcd://host:port[,...]`
    /// or `etcds://host:port[,...]` (etcd over mutual TLS).
    #[arg(long, env = "TANDEM_STORE", value_name = "URL")]
    pub store: String,
    /// For `etcds://`: a directory with `ca.pem` (the etcd members' CA),
    /// `node.pem` and `node.key` (this client's certificate and key).
    #[arg(long, env = "TANDEM_STORE_TLS_DIR", value_name = "DIR")]
    pub store_tls_dir: Option<std::path::PathBuf>,
    /// The cluster to join (the store key prefix `/tandem/<cluster>/`).
    #[arg(long, default_value = "local")]
    pub cluster: String,
    /// This worker's id in the cluster (default `<role>-<pid>`).
    #[arg(long)]
    pub id: Option<String>,
    /// The GGUF model file (default: the model `tandem model pull` fetches).
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// The served model's name (default: the file name without extension and quantization suffix).
    #[arg(long, value_name = "NAME")]
    pub model_name: Option<String>,
    /// Where to serve gRPC (port 0 picks one).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub grpc_addr: SocketAddr,
    /// Where to serve `/metrics` and `/health` (port 0 picks one).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub http_addr: SocketAddr,
    /// The host (name or IP) other processes reach this worker at; the
    /// registered addresses use it with the bound ports (default: the bound
    /// address; set it when binding 0.0.0.0, e.g. to the pod IP).
    #[arg(long, env = "TANDEM_ADVERTISE_HOST", value_name = "HOST")]
    pub advertise_host: Option<String>,
    /// The name on this node's certificate that peers check on its gRPC and
    /// KV endpoints (default: the worker's id). Workers that share one
    /// certificate (a Kubernetes Secret) all give its name.
    #[arg(long, value_name = "NAME")]
    pub tls_name: Option<String>,
    /// The node's TLS directory: ca.pem, node.pem, node.key (mTLS for gRPC and KV transfers).
    #[arg(long, value_name = "DIR")]
    pub tls_dir: PathBuf,
    /// Compute threads (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// The device the engine runs on: cpu, cuda or cuda:N (cuda needs a build
    /// with `--features cuda`).
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: Device,
    /// KV cache capacity in blocks (default: the engine's).
    #[arg(long)]
    pub kv_blocks: Option<usize>,
    /// Tokens computed per engine step, across sequences.
    #[arg(long)]
    pub max_batch_tokens: Option<usize>,
    /// The registration lease's TTL, seconds.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub lease_ttl: u64,
    /// How long a shutdown waits for in-flight requests, seconds.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    pub drain_timeout: u64,
    /// An engine step still in the device after this long is taken for a hung
    /// device: the worker leaves the cluster and exits non-zero (0: never).
    #[arg(long, default_value_t = 120, value_name = "SECS")]
    pub step_timeout: u64,
}

impl CommonArgs {
    /// Defaults for everything but the store and the TLS directory.
    pub fn new(store: impl Into<String>, tls_dir: impl Into<PathBuf>) -> Self {
        Self {
            store: store.into(),
            store_tls_dir: None,
            cluster: "local".into(),
            id: None,
            model: None,
            model_name: None,
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise_host: None,
            tls_name: None,
            tls_dir: tls_dir.into(),
            threads: None,
            device: Device::Cpu,
            kv_blocks: None,
            max_batch_tokens: None,
            lease_ttl: 10,
            drain_timeout: 30,
            step_timeout: 120,
        }
    }

    fn model_path(&self) -> PathBuf {
        self.model
            .clone()
            .unwrap_or_else(tandem_engine::paths::default_model_path)
    }

    fn engine_config(&self) -> anyhow::Result<EngineConfig> {
        let mut c = EngineConfig {
            threads: self.threads,
            device: self.device,
            ..EngineConfig::default()
        };
        if let Some(blocks) = self.kv_blocks {
            anyhow::ensure!(blocks > 0, "--kv-blocks must be positive");
            c.kv_cache_tokens = blocks * c.block_size;
        }
        if let Some(t) = self.max_batch_tokens {
            c.max_batch_tokens = t;
        }
        Ok(c)
    }
}

/// The served model's name from its file: the stem, less a trailing
/// quantization suffix (`SmolLM2-135M-Instruct.Q4_1.gguf` → `SmolLM2-135M-Instruct`).
pub fn model_name_from_path(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    match stem.rsplit_once('.') {
        Some((base, quant)) if !base.is_empty() && is_quant_suffix(quant) => base.to_owned(),
        _ => stem,
    }
}

fn is_quant_suffix(s: &str) -> bool {
    let u = s.to_ascii_uppercase();
    let known = ["F16", "F32", "BF16"];
    known.contains(&u.as_str())
        || ((u.starts_with('Q') || u.starts_with("IQ"))
            && u.chars().any(|c| c.is_ascii_digit())
            && u.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            }
        }
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot listen for signals; only Ctrl-C stops this worker");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// The status an engine error answers a call with.
pub fn engine_status(e: &EngineError) -> Status {
    match e {
        EngineError::EmptyPrompt
        | EngineError::PromptTooLong { .. }
        | EngineError::Sampling(_)
        | EngineError::Config(_) => Status::invalid_argument(e.to_string()),
        EngineError::KvCacheFull { .. } => Status::resource_exhausted(e.to_string()),
        EngineError::Stopped | EngineError::Failed(_) => Status::unavailable(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

/// The state a worker's parts share: its engine, identity and counters, and
/// whether it still takes work.
pub struct Worker {
    /// This worker's id in the cluster.
    pub id: String,
    /// Prefill or decode.
    pub role: Role,
    /// The model runtime.
    pub engine: Arc<Engine>,
    /// The node's cluster identity (gRPC and QUIC mTLS).
    pub tls: ClusterTls,
    /// Request counters and latency histograms.
    pub metrics: WorkerMetrics,
    /// KV transfer counters (sent on prefill workers, received on decode workers).
    pub transfer_metrics: Arc<TransferMetrics>,
    draining: AtomicBool,
    in_flight: AtomicUsize,
    idle: Notify,
    stopping: CancellationToken,
    /// Set by the `Drain` call: the same as a shutdown signal.
    drain_requested: CancellationToken,
    /// The host other processes reach this worker at, when not the bound one.
    advertise_host: Option<String>,
    /// The name on this node's certificate that peers check.
    pub tls_name: String,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.id)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// How other processes reach the endpoint bound at `addr`.
    pub fn advertised(&self, addr: SocketAddr) -> String {
        match &self.advertise_host {
            Some(host) if host.contains(':') => format!("[{host}]:{}", addr.port()),
            Some(host) => format!("{host}:{}", addr.port()),
            None => addr.to_string(),
        }
    }

    /// Whether the worker has stopped taking new requests.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Serving or draining.
    pub fn state(&self) -> WorkerState {
        if self.draining() {
            WorkerState::Draining
        } else {
            WorkerState::Serving
        }
    }

    /// Counts a request in flight until the guard drops; refused with
    /// UNAVAILABLE while draining.
    pub fn admit(self: &Arc<Self>) -> Result<InFlight, Status> {
        // Count first, then check: a drain that starts in between waits for us.
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = InFlight {
            worker: self.clone(),
        };
        if self.draining() {
            self.metrics.request_errors.fetch_add(1, Ordering::Relaxed);
            return Err(Status::unavailable(format!(
                "worker {} is draining",
                self.id
            )));
        }
        Ok(guard)
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Asks the worker to drain and exit, as a shutdown signal does.
    pub fn request_drain(&self) {
        self.drain_requested.cancel();
    }

    /// Resolves when the worker stops its servers (long-lived streams end then).
    pub fn stopping(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.stopping.cancelled()
    }

    /// Waits until nothing is in flight, up to `timeout`; says whether it got there.
    async fn drained(&self, timeout: Duration) -> bool {
        let wait = async {
            loop {
                let idle = self.idle.notified();
                if self.in_flight() == 0 {
                    return;
                }
                idle.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }
}

/// A request in flight; dropping it lets a drain finish.
#[derive(Debug)]
pub struct InFlight {
    worker: Arc<Worker>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.worker.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.worker.idle.notify_waiters();
        }
    }
}

/// Cancels an engine request when dropped, unless it finished (the caller
/// went away: the work stops with it).
#[derive(Debug)]
pub struct EngineRequestGuard {
    engine: Arc<Engine>,
    id: u64,
    armed: bool,
}

impl EngineRequestGuard {
    /// Guards request `id` of `engine`.
    pub fn new(engine: Arc<Engine>, id: u64) -> Self {
        Self {
            engine,
            id,
            armed: true,
        }
    }

    /// The request finished: nothing to cancel.
    pub fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for EngineRequestGuard {
    fn drop(&mut self) {
        if self.armed {
            tracing::debug!(request = self.id, "caller went away; cancelling");
            self.engine.cancel(self.id);
        }
    }
}

/// A role's part of the `Worker` service. A role answers the calls of the
/// other role with UNIMPLEMENTED (the defaults).
pub trait RoleService: Send + Sync + 'static {
    /// Generate (decode workers). Admission and drain are handled by the caller.
    fn generate(
        &self,
        request: GenerateRequest,
    ) -> impl Future<Output = Result<GenerateStream, Status>> + Send {
        let _ = request;
        async {
            Err(Status::unimplemented(
                "Generate is served by decode workers",
            ))
        }
    }

    /// Prefill (prefill workers). Admission and drain are handled by the caller.
    fn prefill(
        &self,
        request: PrefillRequest,
    ) -> impl Future<Output = Result<PrefillResponse, Status>> + Send {
        let _ = request;
        async {
            Err(Status::unimplemented(
                "Prefill is served by prefill workers",
            ))
        }
    }
}

/// What a role adds to its registration.
#[derive(Debug, Clone, Default)]
pub struct RoleEndpoints {
    /// The QUIC endpoint receiving KV transfers (decode workers).
    pub kv_addr: Option<SocketAddr>,
}

/// The addresses a running worker is reachable at.
struct BoundAddrs {
    grpc: SocketAddr,
    http: SocketAddr,
}

/// Runs a worker of `role` until `shutdown` resolves, then drains and stops.
///
/// `build` makes the role's service once the engine is loaded (and binds
/// whatever the role listens on besides gRPC and HTTP).
pub async fn serve<R, B, Fut>(
    args: &CommonArgs,
    role: Role,
    build: B,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()>
where
    R: RoleService,
    B: FnOnce(Arc<Worker>) -> Fut,
    Fut: Future<Output = anyhow::Result<(R, RoleEndpoints)>>,
{
    let model_path = args.model_path();
    anyhow::ensure!(
        model_path.exists(),
        "model file {} not found: run `tandem model pull` to fetch the default model, or pass --model",
        model_path.display()
    );
    anyhow::ensure!(args.lease_ttl >= 1, "--lease-ttl must be at least 1 second");
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| format!("{role}-{}", std::process::id()));
    let model_name = args
        .model_name
        .clone()
        .unwrap_or_else(|| model_name_from_path(&model_path));
    let tls = ClusterTls::load(&args.tls_dir)?;
    let store = AnyStore::connect(&args.store, args.store_tls_dir.as_deref())
        .with_context(|| format!("store address {}", args.store))?;

    let config = args.engine_config()?;
    let max_sequences = config.max_running as u32;
    let engine = {
        let path = model_path.clone();
        tokio::task::spawn_blocking(move || Engine::load(path, config))
            .await
            .context("loading the model")?
            .with_context(|| format!("loading the model {}", model_path.display()))?
    };
    let worker = Arc::new(Worker {
        id: id.clone(),
        role,
        engine: Arc::new(engine),
        tls,
        metrics: WorkerMetrics::default(),
        transfer_metrics: Arc::default(),
        draining: AtomicBool::new(false),
        in_flight: AtomicUsize::new(0),
        idle: Notify::new(),
        stopping: CancellationToken::new(),
        drain_requested: CancellationToken::new(),
        advertise_host: args.advertise_host.clone(),
        tls_name: args.tls_name.clone().unwrap_or_else(|| id.clone()),
    });
    let (role_service, endpoints) = build(worker.clone()).await?;

    let grpc_listener = tokio::net::TcpListener::bind(args.grpc_addr)
        .await
        .with_context(|| format!("binding gRPC to {}", args.grpc_addr))?;
    let http_listener = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .with_context(|| format!("binding HTTP to {}", args.http_addr))?;
    let addrs = BoundAddrs {
        grpc: grpc_listener.local_addr()?,
        http: http_listener.local_addr()?,
    };
    let stop = CancellationToken::new();
    let mut grpc = tokio::spawn(service::serve_grpc(
        worker.clone(),
        role_service,
        grpc_listener,
        stop.clone(),
    ));
    let mut http = tokio::spawn(http::serve_http(
        worker.clone(),
        http_listener,
        stop.clone(),
    ));

    // Publish the model card and register, now that every endpoint is bound.
    let layout = worker.engine.kv_layout();
    let mc = worker.engine.model_config();
    let card = ModelCard {
        name: model_name.clone(),
        source: model_path.display().to_string(),
        block_size: layout.block_size as u32,
        hash_salt: mc.name.clone(),
        context_length: mc.context_length as u32,
        kv_block_bytes: layout.block_bytes() as u64,
    };
    let card_task = tokio::spawn(publish_card(
        store.clone(),
        keys::model(&args.cluster, &model_name),
        serde_json::to_vec(&card)?,
    ));
    let info = InstanceInfo {
        id: id.clone(),
        role,
        model: model_name,
        grpc_addr: format!("https://{}", worker.advertised(addrs.grpc)),
        http_addr: worker.advertised(addrs.http),
        kv_addr: endpoints.kv_addr.map(|a| worker.advertised(a)),
        kv_server_name: Some(worker.tls_name.clone()),
        kv_blocks: worker.engine.load_report().kv_blocks_total as u64,
        max_sequences,
        state: WorkerState::Serving,
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let ttl = Duration::from_secs(args.lease_ttl);
    let registration = Registration::start(store, &args.cluster, info, ttl)
        .await
        .context("registering with the store")?;
    tracing::info!(
        %id, %role, grpc = %addrs.grpc, http = %addrs.http,
        key = registration.key(), "worker serving"
    );

    let failed = tokio::select! {
        () = shutdown => None,
        () = worker.drain_requested.cancelled() => {
            tracing::info!(%id, "drain requested over gRPC");
            None
        }
        r = &mut grpc => Some(format!("the gRPC server stopped: {}", describe(r))),
        r = &mut http => Some(format!("the HTTP server stopped: {}", describe(r))),
        e = worker.engine.failed() => Some(format!("the engine stopped after its device failed: {e}")),
        busy = hung(&worker.engine, Duration::from_secs(args.step_timeout)) => Some(format!(
            "an engine step has been in the device for {busy:.0?} (--step-timeout {}s): the device looks hung",
            args.step_timeout
        )),
    };
    card_task.abort();
    if let Some(reason) = failed {
        // Out of the cluster first (routers stop sending here), then let the
        // calls in flight answer: after an engine failure they end at once
        // with its error. The exit status tells the supervisor to restart.
        tracing::error!(%id, %reason, "the worker stops");
        worker.draining.store(true, Ordering::SeqCst);
        let _ = tokio::time::timeout(STORE_GRACE, registration.deregister()).await;
        if !worker.drained(FAILURE_GRACE).await {
            tracing::warn!(
                in_flight = worker.in_flight(),
                "calls still in flight; stopping anyway"
            );
        }
        stop.cancel();
        worker.stopping.cancel();
        anyhow::bail!(reason);
    }

    // Drain: no new work, finish what is in flight, leave the cluster, stop.
    tracing::info!(%id, in_flight = worker.in_flight(), "draining");
    worker.draining.store(true, Ordering::SeqCst);
    match tokio::time::timeout(STORE_GRACE, registration.set_state(WorkerState::Draining)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot mark the registration draining"),
        Err(_) => tracing::warn!("the store did not take the draining state in {STORE_GRACE:?}"),
    }
    let drain_timeout = Duration::from_secs(args.drain_timeout);
    if !worker.drained(drain_timeout).await {
        tracing::warn!(
            in_flight = worker.in_flight(),
            "drain timeout of {drain_timeout:?} passed; stopping anyway"
        );
    }
    match tokio::time::timeout(STORE_GRACE, registration.deregister()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot deregister (the lease expires by itself)"),
        Err(_) => tracing::warn!(
            "the store did not answer the deregistration in {STORE_GRACE:?}; the lease expires by itself"
        ),
    }
    worker.stopping.cancel();
    stop.cancel();
    for (name, task) in [("gRPC", &mut grpc), ("HTTP", &mut http)] {
        match tokio::time::timeout(SERVER_STOP_GRACE, &mut *task).await {
            Ok(r) => {
                if let Some(e) = error_of(r) {
                    tracing::warn!(error = %e, "the {name} server stopped with an error");
                }
            }
            Err(_) => {
                tracing::warn!("the {name} server did not stop in {SERVER_STOP_GRACE:?}");
                task.abort();
            }
        }
    }
    tracing::info!(%id, "worker stopped");
    Ok(())
}

/// Resolves when an engine step has been in the device longer than `limit`
/// (a hung device reports no error); never when `limit` is zero.
async fn hung(engine: &Engine, limit: Duration) -> Duration {
    if limit.is_zero() {
        return std::future::pending().await;
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1).min(limit));
    loop {
        tick.tick().await;
        if let Some(busy) = engine.busy_for().filter(|b| *b > limit) {
            return busy;
        }
    }
}

type ServerResult = Result<anyhow::Result<()>, tokio::task::JoinError>;

fn error_of(r: ServerResult) -> Option<String> {
    match r {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("{e:#}")),
        Err(e) => Some(e.to_string()),
    }
}

fn describe(r: ServerResult) -> String {
    error_of(r).unwrap_or_else(|| "no error".into())
}

/// Writes the model card, retrying while the store is unreachable.
async fn publish_card(store: AnyStore, key: String, value: Vec<u8>) {
    let mut warned = false;
    loop {
        match store.put(&key, value.clone(), None).await {
            Ok(_) => return,
            Err(e) => {
                if !warned {
                    tracing::warn!(%key, error = %e, "cannot write the model card; retrying");
                    warned = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hung-device watchdog trips on a step that outlasts its limit (here
    /// a real 500-token prefill against 20 ms), and never with the limit 0.
    #[tokio::test]
    async fn the_watchdog_trips_on_a_step_longer_than_its_limit() {
        let config = EngineConfig {
            kv_cache_tokens: 1024,
            threads: Some(1),
            ..EngineConfig::default()
        };
        let engine = Engine::load(tandem_engine::paths::test_model_path(), config).expect("engine");
        let off = hung(&engine, Duration::ZERO);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), off)
                .await
                .is_err()
        );
        let request = tandem_engine::engine::Request::new((1..500).collect(), 1);
        let _handle = engine.submit(request).expect("submit");
        let limit = Duration::from_millis(20);
        let busy = tokio::time::timeout(Duration::from_secs(60), hung(&engine, limit))
            .await
            .expect("the prefill step outlasts 20 ms");
        assert!(busy > limit, "{busy:?}");
    }

    #[test]
    fn model_names_drop_the_quantization_suffix() {
        let name = |p: &str| model_name_from_path(Path::new(p));
        assert_eq!(
            name("/m/SmolLM2-135M-Instruct.Q4_1.gguf"),
            "SmolLM2-135M-Instruct"
        );
        assert_eq!(name("qwen2.5-0.5b.Q8_0.gguf"), "qwen2.5-0.5b");
        assert_eq!(name("llama.F16.gguf"), "llama");
        assert_eq!(name("m.IQ4_XS.gguf"), "m");
        assert_eq!(name("plain.gguf"), "plain");
        assert_eq!(name("qwen2.5-0.5b.gguf"), "qwen2.5-0.5b");
    }

    #[test]
    fn engine_errors_map_to_statuses_a_router_can_act_on() {
        assert_eq!(
            engine_status(&EngineError::EmptyPrompt).code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            engine_status(&EngineError::KvCacheFull { needed: 2, free: 1 }).code(),
            tonic::Code::ResourceExhausted
        );
        assert_eq!(
            engine_status(&EngineError::Stopped).code(),
            tonic::Code::Unavailable
        );
        let failed = EngineError::Failed(tandem_engine::backend::BackendError("CUDA: boom".into()));
        assert_eq!(engine_status(&failed).code(), tonic::Code::Unavailable);
    }
}
