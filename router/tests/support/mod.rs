//! One place that starts a router test cluster: a control-plane store served
//! over gRPC, fake workers (real tonic servers of the `Worker` service that
//! answer `Generate` with a script and record what they were asked), and the
//! router process itself, driven over HTTP.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_control_plane::{MemStore, Store};
use tandem_protocol::grpc::raw;
use tandem_protocol::grpc::worker::worker_server::{Worker, WorkerServer};
use tandem_protocol::grpc::worker::{
    self as pb, Finished, GenerateResponse, KvEventMessage, generate_response::Event,
};
use tandem_protocol::{
    BlockHash, BlockHasher, InstanceInfo, KvEvent, KvEventKind, ModelCard, Role, WorkerState, keys,
};
use tandem_router::serve::{RouterArgs, RouterProcess};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Response, Status};

/// The served model's name.
pub const MODEL: &str = "smol";
/// The cluster name.
pub const CLUSTER: &str = "test";
/// Tokens per block.
pub const BLOCK: usize = 16;
/// What every fake decode worker reports as cached.
pub const CACHED_TOKENS: u32 = 16;

/// The hasher the model card announces (and fake workers hash with).
pub fn hasher() -> BlockHasher {
    BlockHasher::new("fake-salt", BLOCK)
}

/// How a fake worker answers `Generate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Script {
    /// Tokens "t0 ", "t1 ", ... then `Finished`.
    Tokens(u32),
    /// An error before any token.
    FailBeforeFirst,
    /// One token, then an error.
    FailAfterFirst,
    /// This many tokens, one every 10 ms (`u32::MAX`: until the caller goes away).
    Slow(u32),
}

/// A fake worker's recorded state.
pub struct FakeWorker {
    pub id: String,
    pub addr: SocketAddr,
    script: Mutex<Script>,
    requests: Mutex<Vec<pb::GenerateRequest>>,
    /// Generate streams whose caller went away before the end.
    pub cancelled: AtomicUsize,
    kv: Mutex<KvState>,
    stop: Mutex<Option<oneshot::Sender<()>>>,
}

#[derive(Default)]
struct KvState {
    next_seq: u64,
    blocks: BTreeSet<u64>,
    subscribers: Vec<mpsc::Sender<Result<KvEventMessage, Status>>>,
}

#[derive(Clone)]
struct Service(Arc<FakeWorker>);

fn token(i: u32) -> Result<GenerateResponse, Status> {
    Ok(GenerateResponse {
        event: Some(Event::Token(pb::Token {
            id: 100 + i,
            text: format!("t{i} "),
            logprob: -0.25,
            top: Vec::new(),
        })),
    })
}

#[tonic::async_trait]
impl Worker for Service {
    type GenerateStream = ReceiverStream<Result<GenerateResponse, Status>>;
    type KvEventsStream = ReceiverStream<Result<KvEventMessage, Status>>;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let req = request.into_inner();
        let prompt_tokens = req.prompt.len() as u32;
        let max_tokens = req.max_tokens;
        self.0.requests.lock().expect("lock").push(req);
        let script = *self.0.script.lock().expect("lock");
        let (tx, rx) = mpsc::channel(4);
        let worker = self.0.clone();
        tokio::spawn(async move {
            let prefilled = GenerateResponse {
                event: Some(Event::Prefilled(pb::Prefilled {
                    mode: "local".into(),
                    fallback_reason: String::new(),
                    transferred_bytes: 0,
                })),
            };
            if tx.send(Ok(prefilled)).await.is_err() {
                worker.cancelled.fetch_add(1, Ordering::SeqCst);
                return;
            }
            let n = match script {
                Script::FailBeforeFirst => {
                    let _ = tx.send(Err(Status::internal("scripted failure"))).await;
                    return;
                }
                Script::FailAfterFirst => {
                    let _ = tx.send(token(0)).await;
                    let _ = tx.send(Err(Status::internal("scripted failure"))).await;
                    return;
                }
                Script::Tokens(n) => n.min(max_tokens.max(1)),
                Script::Slow(n) => n,
            };
            for i in 0..n {
                if matches!(script, Script::Slow(_)) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                if tx.send(token(i)).await.is_err() {
                    worker.cancelled.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            }
            let done = GenerateResponse {
                event: Some(Event::Finished(Finished {
                    reason: "length".into(),
                    prompt_tokens,
                    completion_tokens: n,
                    cached_tokens: CACHED_TOKENS.min(prompt_tokens),
                })),
            };
            let _ = tx.send(Ok(done)).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn prefill(
        &self,
        _request: Request<pb::PrefillRequest>,
    ) -> Result<Response<pb::PrefillResponse>, Status> {
        Err(Status::unimplemented("the fake worker does not prefill"))
    }

    async fn kv_events(
        &self,
        _request: Request<pb::KvEventsRequest>,
    ) -> Result<Response<Self::KvEventsStream>, Status> {
        let (tx, rx) = mpsc::channel(64);
        self.0.kv.lock().expect("lock").subscribers.push(tx);
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn kv_snapshot(
        &self,
        _request: Request<pb::KvSnapshotRequest>,
    ) -> Result<Response<pb::KvSnapshotResponse>, Status> {
        let kv = self.0.kv.lock().expect("lock");
        Ok(Response::new(pb::KvSnapshotResponse {
            next_seq: kv.next_seq,
            hashes: kv.blocks.iter().copied().collect(),
        }))
    }

    async fn load(
        &self,
        _request: Request<pb::LoadRequest>,
    ) -> Result<Response<pb::LoadResponse>, Status> {
        Ok(Response::new(pb::LoadResponse {
            state: "serving".into(),
            kv_blocks_total: 1000,
            ..pb::LoadResponse::default()
        }))
    }

    async fn drain(
        &self,
        _request: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        Err(Status::unimplemented("the fake worker does not drain"))
    }
}

impl FakeWorker {
    /// Starts a fake worker on an ephemeral port.
    pub async fn start(id: &str, script: Script) -> Arc<Self> {
        Self::start_with(id, script, None).await
    }

    /// Starts a fake worker serving mTLS with the identity in `tls_dir`
    /// (`ca.pem`, `node.pem`, `node.key`), requiring a client certificate.
    pub async fn start_tls(id: &str, script: Script, tls_dir: &Path) -> Arc<Self> {
        let read = |f: &str| std::fs::read(tls_dir.join(f)).expect("identity file");
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(read("node.pem"), read("node.key")))
            .client_ca_root(Certificate::from_pem(read("ca.pem")));
        Self::start_with(id, script, Some(tls)).await
    }

    async fn start_with(id: &str, script: Script, tls: Option<ServerTlsConfig>) -> Arc<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let (stop, stopped) = oneshot::channel::<()>();
        let worker = Arc::new(Self {
            id: id.into(),
            addr,
            script: Mutex::new(script),
            requests: Mutex::new(Vec::new()),
            cancelled: AtomicUsize::new(0),
            kv: Mutex::new(KvState::default()),
            stop: Mutex::new(Some(stop)),
        });
        let service = Service(worker.clone());
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            server = server.tls_config(tls).expect("TLS config");
        }
        tokio::spawn(async move {
            server
                .add_service(WorkerServer::new(service))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await
                .expect("fake worker serves");
        });
        worker
    }

    /// The gRPC address, as registered.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The gRPC address of a TLS worker.
    pub fn tls_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The Generate requests received so far.
    pub fn requests(&self) -> Vec<pb::GenerateRequest> {
        self.requests.lock().expect("lock").clone()
    }

    pub fn set_script(&self, script: Script) {
        *self.script.lock().expect("lock") = script;
    }

    /// Publishes "these blocks are cached" to every subscriber.
    pub fn store_blocks(&self, hashes: &[BlockHash]) {
        self.publish(hashes, true);
    }

    /// Caches blocks but loses the event (its seq is used up): subscribers see a gap.
    pub fn store_blocks_silently(&self, hashes: &[BlockHash]) {
        self.publish(hashes, false);
    }

    fn publish(&self, hashes: &[BlockHash], send: bool) {
        let mut kv = self.kv.lock().expect("lock");
        let event = KvEvent {
            seq: kv.next_seq,
            kind: KvEventKind::Stored {
                parent: None,
                hashes: hashes.to_vec(),
            },
        };
        kv.next_seq += 1;
        kv.blocks.extend(raw(hashes));
        if send {
            let msg = KvEventMessage::from(&event);
            kv.subscribers
                .retain(|s| s.try_send(Ok(msg.clone())).is_ok());
        }
    }

    /// How many routers follow this worker's KV events.
    pub fn subscribers(&self) -> usize {
        self.kv.lock().expect("lock").subscribers.len()
    }

    /// Stops serving.
    pub fn stop(&self) {
        if let Some(s) = self.stop.lock().expect("lock").take() {
            let _ = s.send(());
        }
    }
}

/// A store served over gRPC, with the model card in place.
pub struct TestStore {
    pub store: MemStore,
    pub url: String,
}

impl TestStore {
    pub async fn start() -> Self {
        let store = MemStore::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let served = store.clone();
        tokio::spawn(async move {
            tandem_control_plane::serve(served, listener, std::future::pending())
                .await
                .expect("store serves");
        });
        let card = ModelCard {
            name: MODEL.into(),
            source: tandem_engine::paths::test_model_path()
                .to_string_lossy()
                .into_owned(),
            block_size: BLOCK as u32,
            hash_salt: "fake-salt".into(),
            context_length: 2048,
            kv_block_bytes: 1024,
        };
        store
            .put(
                &keys::model(CLUSTER, MODEL),
                serde_json::to_vec(&card).expect("card"),
                None,
            )
            .await
            .expect("card stored");
        Self { store, url }
    }

    /// Registers a worker; returns its key.
    pub async fn register(&self, worker: &FakeWorker, role: Role) -> String {
        self.register_at(&worker.id, &worker.url(), role, WorkerState::Serving)
            .await
    }

    pub async fn register_at(&self, id: &str, url: &str, role: Role, state: WorkerState) -> String {
        let info = InstanceInfo {
            id: id.into(),
            role,
            model: MODEL.into(),
            grpc_addr: url.into(),
            http_addr: String::new(),
            kv_addr: None,
            kv_server_name: None,
            kv_blocks: 1000,
            max_sequences: 16,
            state,
            version: "test".into(),
        };
        let key = keys::instance(CLUSTER, role, id);
        self.store
            .put(&key, serde_json::to_vec(&info).expect("info"), None)
            .await
            .expect("registered");
        key
    }

    pub async fn deregister(&self, key: &str) {
        assert!(
            self.store.delete(key).await.expect("deleted"),
            "{key} was registered"
        );
    }
}

/// A TCP proxy in front of the store that can cut every connection and refuse
/// new ones, then come back on the same address: a store outage as its clients see it.
pub struct StoreLink {
    pub url: String,
    addr: SocketAddr,
    upstream: SocketAddr,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The forwarded connections, cut by `cut`.
    conns: Arc<tokio::sync::Mutex<tokio::task::JoinSet<()>>>,
}

impl StoreLink {
    pub async fn start(store: &TestStore) -> Self {
        let upstream: SocketAddr = store
            .url
            .trim_start_matches("http://")
            .parse()
            .expect("store address");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let link = Self {
            url: format!("http://{addr}"),
            addr,
            upstream,
            task: Mutex::new(None),
            conns: Arc::default(),
        };
        link.serve(listener);
        link
    }

    fn serve(&self, listener: TcpListener) {
        let upstream = self.upstream;
        let conns = self.conns.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                conns.lock().await.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        *self.task.lock().expect("lock") = Some(task);
    }

    /// Stops listening and cuts every connection; when it returns, nothing
    /// more passes (aborting a task only asks it to stop, so this waits).
    pub async fn cut(&self) {
        let accepting = self.task.lock().expect("lock").take();
        if let Some(t) = accepting {
            t.abort();
            let _ = t.await;
        }
        self.conns.lock().await.shutdown().await;
    }

    /// Listens again on the same address.
    pub async fn restore(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(Instant::now() < deadline, "cannot listen again: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        self.serve(listener);
    }
}

/// A running router process.
pub struct TestRouter {
    pub url: String,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// Router arguments for the test cluster.
pub fn args(store: &TestStore) -> RouterArgs {
    let mut a = RouterArgs::new(store.url.clone());
    a.cluster = CLUSTER.into();
    a.listen = "127.0.0.1:0".parse().expect("address");
    a
}

impl TestRouter {
    pub async fn start(args: RouterArgs) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let process = RouterProcess::bind(args).await.expect("router binds");
        let url = format!("http://{}", process.local_addr());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(process.serve(async {
            let _ = stopped.await;
        }));
        Self {
            url,
            client: reqwest::Client::new(),
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Waits until /health reports `decode` serving decode workers and the model is listed
    /// (or not, for 0).
    pub async fn wait_for_decode_workers(&self, decode: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let r = self
                .client
                .get(format!("{}/health", self.url))
                .send()
                .await
                .expect("health answers");
            let body: Value = r.json().await.expect("json");
            let listed = body["models"].as_array().map_or(0, Vec::len);
            if body["decode_workers"] == decode && (listed > 0) == (decode > 0) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "waiting for {decode} decode workers: {body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The value of one metric line (exact name with labels).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self
            .client
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .expect("metrics answer")
            .text()
            .await
            .expect("text");
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
    }

    /// Posts a chat completion; returns the status and JSON body.
    pub async fn chat(&self, content: &str, max_tokens: u32) -> (reqwest::StatusCode, Value) {
        let body = serde_json::json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
        });
        let r = self
            .client
            .post(format!("{}/v1/chat/completions", self.url))
            .json(&body)
            .send()
            .await
            .expect("sent");
        let status = r.status();
        (status, r.json().await.expect("json body"))
    }

    /// Stops the router (graceful) and waits for it.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("router task").expect("router stops cleanly");
        }
    }
}

/// A fresh cluster CA and, per name, a directory with that node's identity
/// (valid for the name and 127.0.0.1), as `tandem up` lays them out.
pub fn identities(names: &[&str]) -> Vec<PathBuf> {
    let ca = tandem_kv_transfer::tls::ClusterCa::generate("test cluster").expect("CA");
    let root = std::env::temp_dir().join(format!(
        "tandem-router-tls-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos()
    ));
    names
        .iter()
        .map(|name| {
            let dir = root.join(name);
            std::fs::create_dir_all(&dir).expect("identity dir");
            ca.issue(&[name, "localhost", "127.0.0.1"])
                .expect("node identity")
                .write_files(&dir)
                .expect("identity files");
            dir
        })
        .collect()
}

/// Polls `check` until it holds (or fails the test after 30 s: a loaded
/// 2-core machine can take seconds where an idle one takes milliseconds).
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
