//! The router's view of the cluster: the workers it knows (from the store), a
//! gRPC client and a KV-index feed per worker, the models it can tokenize for,
//! and the two [`KvRouter`]s (decode and prefill) that pick where each request
//! goes.
//!
//! State lives behind one mutex held only for synchronous bookkeeping (routing
//! is a hash-table walk); every network call happens outside it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tandem_openai::ServedModel;
use tandem_protocol::grpc::typed;
use tandem_protocol::grpc::worker::worker_client::WorkerClient;
use tandem_protocol::grpc::worker::{
    KvEventsRequest, KvSnapshotRequest, LoadRequest, LoadResponse, PrefillTarget,
};
use tandem_protocol::{
    BlockHash, BlockHasher, InstanceInfo, KvEvent, ModelCard, Role, WorkerState,
};
use tokio::task::JoinHandle;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::args::DisaggMode;
use super::metrics::{Gauges, Metrics};
use crate::cost::CostConfig;
use crate::index::{IndexError, KvSnapshot, WorkerId};
use crate::kv_router::{KvRouter, RequestId};

/// How often each worker's load is polled.
const LOAD_EVERY: Duration = Duration::from_millis(250);
/// Longest wait between reconnection attempts of a worker's KV event stream.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// What the routing decisions need from the command line.
#[derive(Debug, Clone)]
pub(crate) struct RoutingConfig {
    pub(crate) cost: CostConfig,
    pub(crate) disagg: DisaggMode,
    pub(crate) disagg_threshold: usize,
    pub(crate) prefill_max_pending: u64,
    pub(crate) tls: Option<ClientTlsConfig>,
}

/// A model the router can template, tokenize and hash prompts for.
#[derive(Debug)]
pub(crate) struct Model {
    pub(crate) served: Arc<ServedModel>,
    pub(crate) hasher: BlockHasher,
}

impl Model {
    /// The model a card describes, with its tokenizer read from the card's GGUF.
    pub(crate) fn load(card: &ModelCard) -> Result<Self, String> {
        if card.block_size == 0 {
            return Err(format!("model card {}: block_size is 0", card.name));
        }
        let mut served =
            ServedModel::from_gguf(card.name.clone(), std::path::Path::new(&card.source))
                .map_err(|e| format!("model {} from {}: {e}", card.name, card.source))?;
        if card.context_length > 0 {
            served.context_length = card.context_length as usize;
        }
        Ok(Self {
            served: Arc::new(served),
            hasher: BlockHasher::new(&card.hash_salt, card.block_size as usize),
        })
    }
}

/// A registered worker.
struct Worker {
    info: InstanceInfo,
    client: WorkerClient<Channel>,
    /// The last load report, if any arrived.
    load: Option<LoadResponse>,
    /// Unreachable at the last attempt: no new requests until it answers again.
    suspect: bool,
    task: JoinHandle<()>,
}

impl Worker {
    fn draining(&self) -> bool {
        self.info.state == WorkerState::Draining
            || self.load.as_ref().is_some_and(|l| l.state == "draining")
    }

    fn takes_requests_for(&self, model: &str) -> bool {
        self.info.model == model && !self.draining() && !self.suspect
    }
}

enum ModelSlot {
    Loading,
    Ready(Arc<Model>),
}

struct State {
    decode: KvRouter,
    prefill: KvRouter,
    workers: HashMap<WorkerId, Worker>,
    /// Store key → worker.
    by_key: HashMap<String, WorkerId>,
    models: BTreeMap<String, ModelSlot>,
    next_worker: WorkerId,
}

impl State {
    fn router(&mut self, role: Role) -> &mut KvRouter {
        match role {
            Role::Prefill => &mut self.prefill,
            _ => &mut self.decode,
        }
    }
}

/// Where one attempt of a request goes.
pub(crate) struct Placement {
    pub(crate) request: RequestId,
    pub(crate) decode: WorkerId,
    pub(crate) decode_name: String,
    pub(crate) client: WorkerClient<Channel>,
    /// Leading prompt tokens the index says the decode worker holds.
    pub(crate) cached_tokens: usize,
    pub(crate) prefill: Option<PrefillTarget>,
}

/// Why a request could not be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PlaceError {
    #[error("no tokenizer is loaded for model {0}")]
    UnknownModel(String),
    #[error("no decode worker is serving model {0}")]
    NoDecodeWorker(String),
}

/// The shared state of the router process.
pub(crate) struct Cluster {
    state: Mutex<State>,
    pub(crate) config: RoutingConfig,
    pub(crate) metrics: Metrics,
    next_request: AtomicU64,
}

impl Cluster {
    pub(crate) fn new(config: RoutingConfig) -> Arc<Self> {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Arc::new(Self {
            state: Mutex::new(State {
                decode: KvRouter::new(config.cost, seed),
                prefill: KvRouter::new(config.cost, seed ^ 0x9e37_79b9_7f4a_7c15),
                workers: HashMap::new(),
                by_key: HashMap::new(),
                models: BTreeMap::new(),
                next_worker: 1,
            }),
            config,
            metrics: Metrics::default(),
            next_request: AtomicU64::new(1),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every mutation completes before anything in it can panic, so a
        // poisoned lock still guards consistent maps.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    // ----- membership -----

    /// A registration appeared or changed. Returns the model to load if this is
    /// the first worker of a model the router has no tokenizer for.
    pub(crate) fn upsert(self: &Arc<Self>, key: &str, info: InstanceInfo) -> Option<String> {
        if info.role == Role::Router {
            return None;
        }
        let mut st = self.lock();
        if let Some(&id) = st.by_key.get(key)
            && let Some(w) = st.workers.get_mut(&id)
        {
            if w.info.grpc_addr == info.grpc_addr && w.info.role == info.role {
                if w.info.state != info.state {
                    tracing::info!(worker = %info.id, state = info.state.as_str(), "worker state changed");
                }
                w.info = info;
                return None;
            }
            // Moved or changed role: a new worker as far as routing goes.
            drop(st);
            self.remove(key);
            st = self.lock();
        }
        let client = match self.client(&info.grpc_addr, info.kv_server_name.as_deref()) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(worker = %info.id, addr = %info.grpc_addr, error = %e, "ignoring worker with a bad gRPC address");
                return None;
            }
        };
        let id = st.next_worker;
        st.next_worker += 1;
        if let Err(e) = st.router(info.role).add_worker(id) {
            tracing::warn!(worker = %info.id, error = %e, "cannot route to worker");
            return None;
        }
        tracing::info!(worker = %info.id, role = %info.role, addr = %info.grpc_addr, model = %info.model, "worker joined");
        let task = tokio::spawn(follow_worker(
            Arc::downgrade(self),
            id,
            info.role,
            client.clone(),
        ));
        let model = info.model.clone();
        st.by_key.insert(key.to_owned(), id);
        st.workers.insert(
            id,
            Worker {
                info,
                client,
                load: None,
                suspect: false,
                task,
            },
        );
        if st.models.contains_key(&model) {
            return None;
        }
        st.models.insert(model.clone(), ModelSlot::Loading);
        Some(model)
    }

    /// A registration went away: the worker gets nothing more at once.
    pub(crate) fn remove(&self, key: &str) {
        let mut st = self.lock();
        let Some(id) = st.by_key.remove(key) else {
            return;
        };
        if let Some(w) = st.workers.remove(&id) {
            w.task.abort();
            st.router(w.info.role).remove_worker(id);
            tracing::info!(worker = %w.info.id, role = %w.info.role, "worker left");
        }
    }

    /// Makes the known workers exactly those listed (after a re-list).
    /// Returns the models to load.
    pub(crate) fn reconcile(self: &Arc<Self>, listed: Vec<(String, InstanceInfo)>) -> Vec<String> {
        let keep: std::collections::HashSet<&str> =
            listed.iter().map(|(k, _)| k.as_str()).collect();
        let gone: Vec<String> = self
            .lock()
            .by_key
            .keys()
            .filter(|k| !keep.contains(k.as_str()))
            .cloned()
            .collect();
        for key in gone {
            self.remove(&key);
        }
        listed
            .into_iter()
            .filter_map(|(key, info)| self.upsert(&key, info))
            .collect()
    }

    /// Whether some registered worker serves `model`.
    pub(crate) fn model_wanted(&self, model: &str) -> bool {
        self.lock().workers.values().any(|w| w.info.model == model)
    }

    /// A model's tokenizer is loaded (or failed to: `None` lets a later worker retry).
    pub(crate) fn model_loaded(&self, name: &str, model: Option<Model>) {
        let mut st = self.lock();
        match model {
            Some(m) => {
                st.models
                    .insert(name.to_owned(), ModelSlot::Ready(Arc::new(m)));
            }
            None => {
                st.models.remove(name);
            }
        }
    }

    /// Stops every worker task.
    pub(crate) fn shutdown(&self) {
        let mut st = self.lock();
        for w in st.workers.values() {
            w.task.abort();
        }
        st.workers.clear();
        st.by_key.clear();
    }

    /// A lazy client for the worker at `addr`, whose certificate carries
    /// `tls_name` (absent: the address's host).
    fn client(
        &self,
        addr: &str,
        tls_name: Option<&str>,
    ) -> Result<WorkerClient<Channel>, tonic::transport::Error> {
        let mut endpoint = Endpoint::from_shared(addr.to_owned())?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        if let Some(tls) = &self.config.tls {
            let tls = match tls_name {
                Some(name) => tls.clone().domain_name(name),
                None => tls.clone(),
            };
            endpoint = endpoint.tls_config(tls)?;
        }
        Ok(WorkerClient::new(endpoint.connect_lazy()))
    }

    // ----- KV and load feeds -----

    /// Applies one of a worker's events. `Err(true)`: a gap, fetch a snapshot;
    /// `Err(false)`: the worker is gone.
    fn apply_event(&self, id: WorkerId, role: Role, event: &KvEvent) -> Result<(), bool> {
        match self.lock().router(role).apply_event(id, event) {
            Ok(_) => Ok(()),
            Err(IndexError::Gap { .. }) => Err(true),
            Err(_) => Err(false),
        }
    }

    fn apply_snapshot(&self, id: WorkerId, role: Role, snapshot: &KvSnapshot) -> bool {
        self.metrics.kv_resyncs.fetch_add(1, Ordering::Relaxed);
        self.lock()
            .router(role)
            .apply_snapshot(id, snapshot)
            .is_ok()
    }

    fn set_load(&self, id: WorkerId, load: Option<LoadResponse>) {
        if let Some(w) = self.lock().workers.get_mut(&id) {
            match load {
                Some(l) => {
                    if w.suspect {
                        tracing::info!(worker = %w.info.id, "worker answers again");
                    }
                    w.suspect = false;
                    w.load = Some(l);
                }
                None => w.suspect = true,
            }
        }
    }

    /// Takes a worker out of routing until its load poll succeeds again.
    pub(crate) fn suspect(&self, id: WorkerId) {
        if let Some(w) = self.lock().workers.get_mut(&id) {
            tracing::warn!(worker = %w.info.id, "worker unreachable; suspect until it answers");
            w.suspect = true;
        }
    }

    // ----- routing -----

    /// A fresh request id for the routers' accounting.
    pub(crate) fn next_request(&self) -> RequestId {
        self.next_request.fetch_add(1, Ordering::Relaxed)
    }

    /// The loaded model called `name`.
    pub(crate) fn model(&self, name: &str) -> Option<Arc<Model>> {
        match self.lock().models.get(name) {
            Some(ModelSlot::Ready(m)) => Some(m.clone()),
            _ => None,
        }
    }

    /// Models with a loaded tokenizer and a serving decode worker.
    pub(crate) fn served_models(&self) -> Vec<Arc<ServedModel>> {
        let st = self.lock();
        st.models
            .iter()
            .filter_map(|(name, slot)| match slot {
                ModelSlot::Ready(m)
                    if st.workers.values().any(|w| {
                        w.info.role == Role::Decode && w.info.model == *name && !w.draining()
                    }) =>
                {
                    Some(m.served.clone())
                }
                _ => None,
            })
            .collect()
    }

    /// Picks the decode worker (not one of `tried`) and, by the disaggregation
    /// mode, a prefill worker for a prompt; counts the request against both until
    /// [`Cluster::first_token`] / [`Cluster::finished`].
    pub(crate) fn place(
        &self,
        model: &str,
        prompt_tokens: usize,
        hashes: &[BlockHash],
        block_size: usize,
        tried: &[WorkerId],
    ) -> Result<Placement, PlaceError> {
        let request = self.next_request();
        let mut guard = self.lock();
        let st = &mut *guard;
        if !matches!(st.models.get(model), Some(ModelSlot::Ready(_))) {
            return Err(PlaceError::UnknownModel(model.to_owned()));
        }
        let workers = &st.workers;
        let decision = st
            .decode
            .route_where(request, hashes, |id| {
                !tried.contains(&id)
                    && workers
                        .get(&id)
                        .is_some_and(|w| w.takes_requests_for(model))
            })
            .ok_or_else(|| PlaceError::NoDecodeWorker(model.to_owned()))?;
        let Some(decode) = workers.get(&decision.worker) else {
            st.decode.finished(request);
            return Err(PlaceError::NoDecodeWorker(model.to_owned()));
        };
        let cached_tokens = (decision.overlap_blocks as usize * block_size).min(prompt_tokens);
        let uncached = prompt_tokens - cached_tokens;
        let cfg = &self.config;
        let remote = match cfg.disagg {
            DisaggMode::Never => false,
            DisaggMode::Always => true,
            DisaggMode::Auto => uncached >= cfg.disagg_threshold,
        };
        let prefill = if remote {
            let room = |w: &Worker| {
                cfg.disagg != DisaggMode::Auto
                    || w.load
                        .as_ref()
                        .is_none_or(|l| l.pending_prefill_tokens < cfg.prefill_max_pending)
            };
            st.prefill
                .route_where(request, hashes, |id| {
                    workers
                        .get(&id)
                        .is_some_and(|w| w.takes_requests_for(model) && room(w))
                })
                .and_then(|d| workers.get(&d.worker))
                .map(|w| PrefillTarget {
                    worker_id: w.info.id.clone(),
                    grpc_addr: w.info.grpc_addr.clone(),
                })
        } else {
            None
        };
        Ok(Placement {
            request,
            decode: decision.worker,
            decode_name: decode.info.id.clone(),
            client: decode.client.clone(),
            cached_tokens,
            prefill,
        })
    }

    /// The request's first token is out: its prefill no longer queues anywhere.
    pub(crate) fn first_token(&self, request: RequestId) {
        let mut st = self.lock();
        st.decode.prefill_done(request);
        st.prefill.finished(request);
    }

    /// The request ended (or its attempt failed): it no longer loads any worker.
    pub(crate) fn finished(&self, request: RequestId) {
        let mut st = self.lock();
        st.decode.finished(request);
        st.prefill.finished(request);
    }

    // ----- reporting -----

    /// Decode and prefill workers that can take requests now: serving, reachable,
    /// and of a model whose tokenizer is loaded.
    pub(crate) fn serving_counts(&self) -> (usize, usize) {
        let st = self.lock();
        let count = |role| {
            st.workers
                .values()
                .filter(|w| {
                    w.info.role == role
                        && !w.draining()
                        && !w.suspect
                        && matches!(st.models.get(&w.info.model), Some(ModelSlot::Ready(_)))
                })
                .count()
        };
        (count(Role::Decode), count(Role::Prefill))
    }

    /// Every known worker with its state and last load report, for the admin API.
    pub(crate) fn workers_json(&self) -> Vec<serde_json::Value> {
        let st = self.lock();
        let mut workers: Vec<&Worker> = st.workers.values().collect();
        workers.sort_by(|a, b| (a.info.role, &a.info.id).cmp(&(b.info.role, &b.info.id)));
        workers
            .into_iter()
            .map(|w| {
                let state = if w.draining() {
                    "draining"
                } else if w.suspect {
                    "suspect"
                } else {
                    "serving"
                };
                let l = w.load.clone().unwrap_or_default();
                serde_json::json!({
                    "id": w.info.id,
                    "role": w.info.role.as_str(),
                    "state": state,
                    "model": w.info.model,
                    "grpc_addr": w.info.grpc_addr,
                    "http_addr": w.info.http_addr,
                    "version": w.info.version,
                    "running": l.running,
                    "waiting": l.waiting,
                    "pending_prefill_tokens": l.pending_prefill_tokens,
                    "kv_blocks_used": l.kv_blocks_used,
                    "kv_blocks_total": l.kv_blocks_total,
                    "kv_hit_rate": l.kv_hit_rate,
                    "ttft_ms": l.ttft_ms,
                    "itl_ms": l.itl_ms,
                })
            })
            .collect()
    }

    /// The gRPC client of the worker whose id is `id`.
    pub(crate) fn client_of(&self, id: &str) -> Option<WorkerClient<Channel>> {
        let st = self.lock();
        st.workers
            .values()
            .find(|w| w.info.id == id)
            .map(|w| w.client.clone())
    }

    pub(crate) fn gauges(&self) -> Gauges {
        let st = self.lock();
        let mut workers = Vec::new();
        for role in [Role::Decode, Role::Prefill] {
            let of_role = || st.workers.values().filter(move |w| w.info.role == role);
            let draining = of_role().filter(|w| w.draining()).count();
            let suspect = of_role().filter(|w| !w.draining() && w.suspect).count();
            let serving = of_role().count() - draining - suspect;
            workers.push((role.as_str(), "serving", serving));
            workers.push((role.as_str(), "draining", draining));
            workers.push((role.as_str(), "suspect", suspect));
        }
        Gauges {
            workers,
            index_blocks: st.decode.index().num_hashes() + st.prefill.index().num_hashes(),
            index_bytes: st.decode.index().memory_bytes() + st.prefill.index().memory_bytes(),
            models: st
                .models
                .values()
                .filter(|m| matches!(m, ModelSlot::Ready(_)))
                .count(),
        }
    }
}

/// Keeps a worker's slice of the index current and its load fresh, until the
/// task is aborted (the worker left) or the cluster is gone.
async fn follow_worker(
    cluster: std::sync::Weak<Cluster>,
    id: WorkerId,
    role: Role,
    client: WorkerClient<Channel>,
) {
    tokio::join!(
        follow_kv_events(cluster.clone(), id, role, client.clone()),
        poll_load(cluster, id, client),
    );
}

/// Subscribes to a worker's KV events, then fetches a snapshot (so nothing falls
/// between the two), applies events in order, and resyncs on a gap; reconnects
/// with backoff when the stream breaks.
async fn follow_kv_events(
    cluster: std::sync::Weak<Cluster>,
    id: WorkerId,
    role: Role,
    mut client: WorkerClient<Channel>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match subscribe(&cluster, id, role, &mut client).await {
            Ok(mut events) => {
                backoff = Duration::from_millis(100);
                loop {
                    let Some(cluster) = cluster.upgrade() else {
                        return;
                    };
                    let msg = match events.message().await {
                        Ok(Some(msg)) => msg,
                        Ok(None) => {
                            tracing::debug!(worker = id, "KV event stream ended");
                            break;
                        }
                        Err(status) => {
                            tracing::debug!(worker = id, %status, "KV event stream broke");
                            break;
                        }
                    };
                    let event = match KvEvent::try_from(msg) {
                        Ok(e) => e,
                        Err(e) => {
                            tracing::warn!(worker = id, error = %e, "bad KV event");
                            continue;
                        }
                    };
                    match cluster.apply_event(id, role, &event) {
                        Ok(()) => {}
                        Err(true) => {
                            tracing::info!(worker = id, seq = event.seq, "KV event gap; resyncing");
                            if let Err(status) = resync(&cluster, id, role, &mut client).await {
                                tracing::debug!(worker = id, %status, "KV snapshot failed");
                                break;
                            }
                        }
                        Err(false) => return,
                    }
                }
            }
            Err(status) => {
                tracing::debug!(worker = id, %status, "cannot follow KV events");
            }
        }
        if cluster.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn subscribe(
    cluster: &std::sync::Weak<Cluster>,
    id: WorkerId,
    role: Role,
    client: &mut WorkerClient<Channel>,
) -> Result<tonic::Streaming<tandem_protocol::grpc::worker::KvEventMessage>, tonic::Status> {
    let events = client.kv_events(KvEventsRequest {}).await?.into_inner();
    if let Some(cluster) = cluster.upgrade() {
        resync(&cluster, id, role, client).await?;
    }
    Ok(events)
}

async fn resync(
    cluster: &Cluster,
    id: WorkerId,
    role: Role,
    client: &mut WorkerClient<Channel>,
) -> Result<(), tonic::Status> {
    let snap = client.kv_snapshot(KvSnapshotRequest {}).await?.into_inner();
    let snapshot = KvSnapshot {
        next_seq: snap.next_seq,
        hashes: typed(snap.hashes),
    };
    if !cluster.apply_snapshot(id, role, &snapshot) {
        return Err(tonic::Status::not_found("worker left"));
    }
    Ok(())
}

async fn poll_load(
    cluster: std::sync::Weak<Cluster>,
    id: WorkerId,
    mut client: WorkerClient<Channel>,
) {
    let mut tick = tokio::time::interval(LOAD_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let load = match client.load(LoadRequest {}).await {
            Ok(r) => Some(r.into_inner()),
            Err(status) => {
                tracing::debug!(worker = id, %status, "load poll failed");
                // Only an unreachable worker is suspect; one that answers with an
                // error (e.g. an older worker without Load) still serves.
                if status.code() != tonic::Code::Unavailable {
                    continue;
                }
                None
            }
        };
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        cluster.set_load(id, load);
    }
}

/// Parses a registration from the store; registrations that are not workers' are `None`.
pub(crate) fn parse_instance(key: &str, value: &[u8]) -> Option<InstanceInfo> {
    match InstanceInfo::from_json(key, value) {
        Ok(info) => Some(info),
        Err(e) => {
            tracing::warn!(error = %e, "ignoring registration");
            None
        }
    }
}

/// Parses a model card.
pub(crate) fn parse_card(key: &str, value: &[u8]) -> Result<ModelCard, String> {
    ModelCard::from_json(key, value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::Policy;

    fn info(id: &str, role: Role, model: &str, state: WorkerState) -> InstanceInfo {
        InstanceInfo {
            id: id.into(),
            role,
            model: model.into(),
            grpc_addr: "http://127.0.0.1:9".into(),
            http_addr: String::new(),
            kv_addr: None,
            kv_server_name: None,
            kv_blocks: 100,
            max_sequences: 8,
            state,
            version: "test".into(),
        }
    }

    fn cluster(disagg: DisaggMode) -> Arc<Cluster> {
        Cluster::new(RoutingConfig {
            cost: CostConfig::new(Policy::Kv),
            disagg,
            disagg_threshold: 32,
            prefill_max_pending: 100,
            tls: None,
        })
    }

    fn ready(c: &Cluster, model: &str) {
        let served = ServedModel::from_gguf(model, &tandem_engine::paths::test_model_path())
            .expect("tokenizer loads");
        c.model_loaded(
            model,
            Some(Model {
                served: Arc::new(served),
                hasher: BlockHasher::new("salt", 16),
            }),
        );
    }

    #[tokio::test]
    async fn placement_follows_membership_model_state_and_disaggregation() {
        let c = cluster(DisaggMode::Auto);
        assert_eq!(
            c.upsert("k/d0", info("d0", Role::Decode, "m", WorkerState::Serving)),
            Some("m".into())
        );
        // A second worker of the same model does not load it again.
        assert_eq!(
            c.upsert("k/p0", info("p0", Role::Prefill, "m", WorkerState::Serving)),
            None
        );
        assert_eq!(
            c.upsert("k/r0", info("r0", Role::Router, "", WorkerState::Serving)),
            None
        );
        let hashes: Vec<BlockHash> = (1..=4).map(BlockHash).collect();
        assert_eq!(
            c.place("m", 64, &hashes, 16, &[]).err(),
            Some(PlaceError::UnknownModel("m".into()))
        );
        assert_eq!(
            c.serving_counts(),
            (0, 0),
            "not ready before the tokenizer is"
        );
        ready(&c, "m");
        assert_eq!(c.served_models().len(), 1);

        // 64 uncached tokens ≥ 32: remote; 16 < 32: local.
        let p = c.place("m", 64, &hashes, 16, &[]).expect("placed");
        assert_eq!(p.decode_name, "d0");
        assert_eq!(p.prefill.as_ref().map(|t| t.worker_id.as_str()), Some("p0"));
        c.finished(p.request);
        let p = c.place("m", 16, &hashes[..1], 16, &[]).expect("placed");
        assert!(p.prefill.is_none());
        // Tried workers and other models are excluded.
        assert_eq!(
            c.place("m", 16, &hashes[..1], 16, &[p.decode]).err(),
            Some(PlaceError::NoDecodeWorker("m".into()))
        );
        c.finished(p.request);

        // Draining: no new requests, and the model is no longer listed.
        c.upsert("k/d0", info("d0", Role::Decode, "m", WorkerState::Draining));
        assert!(c.place("m", 16, &hashes, 16, &[]).is_err());
        assert!(c.served_models().is_empty());
        c.upsert("k/d0", info("d0", Role::Decode, "m", WorkerState::Serving));
        assert!(c.place("m", 16, &hashes, 16, &[]).is_ok());
        assert_eq!(c.serving_counts(), (1, 1));

        // A deleted registration stops routing at once; re-listing restores it.
        c.remove("k/d0");
        assert!(c.place("m", 16, &hashes, 16, &[]).is_err());
        assert_eq!(c.serving_counts(), (0, 1));
        let to_load = c.reconcile(vec![(
            "k/d1".into(),
            info("d1", Role::Decode, "m", WorkerState::Serving),
        )]);
        assert!(to_load.is_empty());
        assert_eq!(c.serving_counts(), (1, 0));
        c.shutdown();
    }
}
