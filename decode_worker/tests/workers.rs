//! A real cluster in one process: the control-plane store served over gRPC on
//! loopback, a prefill worker and a decode worker started through their
//! `run()`, mTLS everywhere from a fresh cluster CA, and the real model.
//! Calls go through the generated gRPC client, as a router's would.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use tandem_control_plane::{MemStore, Store, serve};
use tandem_decode_worker::DecodeArgs;
use tandem_engine::chat_template::ChatMessage;
use tandem_engine::engine::{Engine, EngineConfig, Request, TokenEvent};
use tandem_engine::paths::test_model_path;
use tandem_kv_transfer::tls::ClusterCa;
use tandem_prefill_worker::PrefillArgs;
use tandem_prefill_worker::runtime::{ClusterTls, CommonArgs};
use tandem_protocol::grpc::worker::generate_response::Event;
use tandem_protocol::grpc::worker::kv_event_message::Kind;
use tandem_protocol::grpc::worker::worker_client::WorkerClient;
use tandem_protocol::grpc::worker::{
    GenerateRequest, GenerateResponse, KvEventsRequest, KvSnapshotRequest, LoadRequest,
    LoadResponse, PrefillRequest, PrefillTarget, Prefilled,
};
use tandem_protocol::{InstanceInfo, ModelCard, Role, WorkerState, keys};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Streaming;
use tonic::transport::Channel;

const CLUSTER: &str = "wtest";
const KV_BLOCKS: usize = 256;
const OUT_TOKENS: u32 = 16;

/// A worker started through its `run()`, with the signal that stops it.
struct Node {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Node {
    /// Spawns `run`, handing it the shutdown signal that `stop` sends.
    fn start<F>(run: impl FnOnce(Shutdown) -> F) -> Self
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (stop, down) = shutdown();
        Self {
            stop: Some(stop),
            task: tokio::spawn(run(down)),
        }
    }

    fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    async fn stopped(self) {
        let r = tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("the worker stops in time")
            .expect("the worker task");
        r.expect("the worker stops cleanly");
    }
}

/// A shutdown signal, as the store and the workers take it.
type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

fn shutdown() -> (oneshot::Sender<()>, Shutdown) {
    let (tx, rx) = oneshot::channel::<()>();
    (
        tx,
        Box::pin(async move {
            let _ = rx.await;
        }),
    )
}

fn identity_dir(ca: &ClusterCa, root: &Path, id: &str) -> PathBuf {
    let dir = root.join(id);
    std::fs::create_dir_all(&dir).expect("identity dir");
    ca.issue(&[id, "localhost", "127.0.0.1"])
        .expect("issue")
        .write_files(&dir)
        .expect("write identity");
    dir
}

/// The control-plane store served over gRPC on loopback, and a scratch
/// directory for node identities issued by a fresh cluster CA.
struct Cluster {
    store: MemStore,
    store_url: String,
    ca: ClusterCa,
    root: PathBuf,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Cluster {
    async fn start(name: &str) -> Self {
        let store = MemStore::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let store_url = format!("http://{}", listener.local_addr().expect("addr"));
        let (stop, down) = shutdown();
        let task = tokio::spawn(serve(store.clone(), listener, down));
        let root =
            std::env::temp_dir().join(format!("tandem-workers-{name}-{}", std::process::id()));
        let ca = ClusterCa::generate(&format!("tandem workers {name}")).expect("CA");
        Self {
            store,
            store_url,
            ca,
            root,
            stop,
            task,
        }
    }

    /// A directory holding a new identity for `id`.
    fn identity(&self, id: &str) -> PathBuf {
        identity_dir(&self.ca, &self.root, id)
    }

    /// A worker's arguments for this cluster, with an identity of its own.
    fn common(&self, id: &str) -> CommonArgs {
        let mut c = CommonArgs::new(&self.store_url, self.identity(id));
        c.cluster = CLUSTER.into();
        c.id = Some(id.into());
        c.model = Some(test_model_path());
        c.threads = Some(1);
        c.kv_blocks = Some(KV_BLOCKS);
        c
    }

    /// Every registration in the cluster.
    async fn registrations(&self) -> Vec<InstanceInfo> {
        let (kvs, _) = self
            .store
            .list(&keys::instances(CLUSTER))
            .await
            .expect("list");
        kvs.iter()
            .map(|kv| InstanceInfo::from_json(&kv.key, &kv.value).expect("registration"))
            .collect()
    }

    /// Waits up to a minute for the registration under `key`, and returns it.
    async fn registered(&self, key: &str, what: &str) -> InstanceInfo {
        eventually(what, Duration::from_secs(60), || async {
            self.store.get(key).await.expect("get").is_some()
        })
        .await;
        let kv = self.store.get(key).await.expect("get").expect("registered");
        InstanceInfo::from_json(&kv.key, &kv.value).expect("registration")
    }

    /// Stops the store and removes the scratch directory.
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.expect("store task").expect("store stops");
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn engine_config() -> EngineConfig {
    EngineConfig {
        kv_cache_tokens: KV_BLOCKS * 16,
        threads: Some(1),
        ..EngineConfig::default()
    }
}

/// A chat of about a hundred tokens, templated as the model expects.
fn chat_prompt(e: &Engine, question: &str) -> Vec<u32> {
    let messages = [
        ChatMessage::new(
            "system",
            "You are a patient science teacher at a small village school. Answer in plain \
             words that a curious twelve-year-old would follow, give exactly one concrete \
             example from everyday life, avoid formulas unless they are asked for, and keep \
             every answer short enough to read aloud in under a minute.",
        ),
        ChatMessage::new("user", question),
    ];
    let text = e
        .chat_template()
        .expect("the model has a chat template")
        .render(&messages, true)
        .expect("render");
    let mut ids: Vec<u32> = e.tokenizer().bos().into_iter().collect();
    ids.extend(e.tokenizer().encode(&text, true));
    ids
}

/// Greedy tokens from an engine of our own, as an independent reference.
async fn reference(e: &Engine, prompt: &[u32]) -> Vec<u32> {
    let mut r = Request::new(prompt.to_vec(), OUT_TOKENS as usize);
    r.ignore_eos = true;
    let mut h = e.submit(r).expect("submit");
    let mut ids = Vec::new();
    while let Some(ev) = h.events.recv().await {
        match ev {
            TokenEvent::Token(t) => ids.push(t.id),
            TokenEvent::Finished { .. } => break,
        }
    }
    ids
}

struct Generated {
    prefilled: Prefilled,
    tokens: Vec<u32>,
    reason: String,
}

fn request(id: &str, prompt: &[u32], prefill: Option<PrefillTarget>) -> GenerateRequest {
    GenerateRequest {
        request_id: id.into(),
        prompt: prompt.to_vec(),
        max_tokens: OUT_TOKENS,
        ignore_eos: true,
        prefill,
        ..GenerateRequest::default()
    }
}

/// Starts a generation; returns its stream of events.
async fn start_generate(
    client: &mut WorkerClient<Channel>,
    req: GenerateRequest,
) -> Streaming<GenerateResponse> {
    client.generate(req).await.expect("generate").into_inner()
}

/// Reads a generation's stream up to its first token.
async fn first_token(stream: &mut Streaming<GenerateResponse>) {
    loop {
        let msg = stream
            .message()
            .await
            .expect("stream")
            .expect("a token before the stream ends");
        if matches!(msg.event, Some(Event::Token(_))) {
            return;
        }
    }
}

async fn generate(client: &mut WorkerClient<Channel>, req: GenerateRequest) -> Generated {
    let mut stream = start_generate(client, req).await;
    let mut prefilled = None;
    let mut tokens = Vec::new();
    while let Some(msg) = stream.message().await.expect("stream") {
        match msg.event.expect("an event") {
            Event::Prefilled(p) => {
                assert!(tokens.is_empty(), "Prefilled comes before the tokens");
                prefilled = Some(p);
            }
            Event::Token(t) => tokens.push(t.id),
            Event::Finished(f) => {
                assert_eq!(f.completion_tokens as usize, tokens.len());
                return Generated {
                    prefilled: prefilled.expect("a Prefilled event"),
                    tokens,
                    reason: f.reason,
                };
            }
        }
    }
    panic!("the stream ended without Finished");
}

async fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_owned())
}

/// One unlabelled counter from a worker's `/metrics`.
async fn counter(http_addr: &str, name: &str) -> u64 {
    let (_, body) = http_get(http_addr, "/metrics").await;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} in {http_addr}/metrics"))
}

/// The tokens a worker's engine has computed, from its `/metrics`.
async fn computed_tokens(http_addr: &str) -> u64 {
    counter(http_addr, "tandem_worker_computed_tokens_total").await
}

async fn eventually<F: Future<Output = bool>>(
    what: &str,
    within: Duration,
    mut f: impl FnMut() -> F,
) {
    let start = tokio::time::Instant::now();
    while !f().await {
        assert!(start.elapsed() < within, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until a worker's load report satisfies `done`.
async fn load_until(
    client: &WorkerClient<Channel>,
    what: &str,
    within: Duration,
    done: impl Fn(&LoadResponse) -> bool,
) {
    eventually(what, within, || {
        let mut client = client.clone();
        let done = &done;
        async move {
            let load = client.load(LoadRequest {}).await.expect("load");
            done(&load.into_inner())
        }
    })
    .await;
}

/// Waits up to `within_s` seconds until a worker runs `n` sequences.
async fn running_becomes(client: &WorkerClient<Channel>, n: u32, what: &str, within_s: u64) {
    let within = Duration::from_secs(within_s);
    load_until(client, what, within, |l| l.running == n).await;
}

/// Waits up to `within_s` seconds until a worker holds no KV blocks.
async fn blocks_freed(client: &WorkerClient<Channel>, what: &str, within_s: u64) {
    let within = Duration::from_secs(within_s);
    load_until(client, what, within, |l| l.kv_blocks_used == 0).await;
}

fn dead_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr: SocketAddr = l.local_addr().expect("addr");
    drop(l);
    format!("https://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefill_and_decode_workers_serve_a_cluster() {
    let cluster = Cluster::start("test").await;
    let client_tls = ClusterTls::load(&cluster.identity("test-client")).expect("client TLS");

    let prefill_args = PrefillArgs {
        common: cluster.common("prefill-t"),
    };
    let prefill = Node::start(|down| tandem_prefill_worker::run(prefill_args, down));
    // Registered under an explicit host and checked by a certificate name
    // other than its id, as workers sharing one certificate are.
    let mut decode_common = cluster.common("decode-t");
    decode_common.advertise_host = Some("127.0.0.1".into());
    decode_common.tls_name = Some("localhost".into());
    let mut decode_args = DecodeArgs::new(decode_common);
    // A same-host KV socket, which (b) takes away.
    let kv_socket = cluster.root.join("decode-t.kv.sock");
    decode_args.kv_socket = Some(kv_socket.clone());
    let mut decode = Node::start(|down| tandem_decode_worker::run(decode_args, down));
    // A decode worker whose transfers cannot meet their deadline.
    let mut slow_args = DecodeArgs::new(cluster.common("decode-slow"));
    slow_args.transfer_deadline_ms = 1;
    let mut slow = Node::start(|down| tandem_decode_worker::run(slow_args, down));
    let reference_engine = Engine::load(test_model_path(), engine_config()).expect("load");

    // (a) Both register, with their roles and bound addresses, and the model card is there.
    eventually("every registration", Duration::from_secs(120), || async {
        cluster.registrations().await.len() == 3
    })
    .await;
    let regs = cluster.registrations().await;
    let find = |id: &str| {
        regs.iter()
            .find(|r| r.id == id)
            .cloned()
            .expect("registered")
    };
    let (p, d) = (find("prefill-t"), find("decode-t"));
    assert_eq!((p.role, d.role), (Role::Prefill, Role::Decode));
    assert_eq!((p.id.as_str(), d.id.as_str()), ("prefill-t", "decode-t"));
    for r in [&p, &d] {
        assert!(r.grpc_addr.starts_with("https://127.0.0.1:"), "{r:?}");
        assert!(!r.grpc_addr.ends_with(":0") && !r.http_addr.ends_with(":0"));
        assert_eq!(r.model, "SmolLM2-135M-Instruct");
        assert_eq!(r.kv_blocks, KV_BLOCKS as u64);
        assert_eq!(r.state, WorkerState::Serving);
        assert_eq!(r.version, env!("CARGO_PKG_VERSION"));
    }
    assert!(p.kv_addr.is_none());
    assert!(d.kv_addr.as_deref().is_some_and(|a| !a.ends_with(":0")));
    assert_eq!(d.kv_server_name.as_deref(), Some("localhost"));
    assert_eq!(p.kv_server_name.as_deref(), Some("prefill-t"));
    assert!(
        d.kv_addr
            .as_deref()
            .is_some_and(|a| a.starts_with("127.0.0.1:"))
    );
    let card_kv = cluster
        .store
        .get(&keys::model(CLUSTER, "SmolLM2-135M-Instruct"))
        .await
        .expect("get")
        .expect("the model card");
    let card = ModelCard::from_json(&card_kv.key, &card_kv.value).expect("card");
    assert_eq!(card.block_size, 16);
    assert_eq!(card.hash_salt, reference_engine.model_config().name);
    assert_eq!(
        card.kv_block_bytes,
        reference_engine.kv_layout().block_bytes() as u64
    );
    assert_eq!(card_kv.lease, 0, "the model card is persistent");

    let mut dc = client_tls.worker_client(&d.grpc_addr).expect("client");
    let mut pc = client_tls.worker_client(&p.grpc_addr).expect("client");
    // A role answers the other role's call with UNIMPLEMENTED.
    let e = pc
        .generate(request("x", &[1, 2, 3], None))
        .await
        .expect_err("prefill workers do not generate");
    assert_eq!(e.code(), tonic::Code::Unimplemented);
    let e = dc
        .prefill(PrefillRequest::default())
        .await
        .expect_err("decode workers do not prefill");
    assert_eq!(e.code(), tonic::Code::Unimplemented);
    // A client without a cluster certificate is refused.
    let rogue = ClusterCa::generate("rogue").expect("CA");
    let rogue_tls = ClusterTls::load(&identity_dir(&rogue, &cluster.root, "rogue")).expect("TLS");
    let mut outsider = rogue_tls.worker_client(&d.grpc_addr).expect("client");
    assert!(outsider.load(LoadRequest {}).await.is_err());

    let mut events = dc
        .kv_events(KvEventsRequest {})
        .await
        .expect("subscribe")
        .into_inner();

    // (b) A remote prefill gives the same greedy tokens as the model run
    // locally. Over QUIC: the decode worker offers a same-host socket, but it
    // cannot be reached (as from another mount namespace), so the prefill
    // worker falls back. (`tandem up`'s test covers the shared-memory path.)
    std::fs::remove_file(&kv_socket).expect("remove the socket");
    let prompt = chat_prompt(
        &reference_engine,
        "Why does ice float on water, when most solids sink in their own liquid?",
    );
    assert!(
        prompt.len() > 80,
        "a prompt of several blocks: {}",
        prompt.len()
    );
    let expected = reference(&reference_engine, &prompt).await;
    let target = PrefillTarget {
        worker_id: p.id.clone(),
        grpc_addr: p.grpc_addr.clone(),
    };
    let remote = generate(&mut dc, request("r1", &prompt, Some(target.clone()))).await;
    assert_eq!(remote.prefilled.mode, "remote", "{:?}", remote.prefilled);
    assert_eq!(remote.prefilled.fallback_reason, "");
    let blocks = (prompt.len() - 1).div_ceil(16) as u64;
    assert_eq!(
        remote.prefilled.transferred_bytes,
        blocks * card.kv_block_bytes,
        "every block of all but the last prompt token moved"
    );
    assert_eq!(remote.reason, "length");
    assert_eq!(remote.tokens, expected, "remote prefill decodes like local");
    let sent = |name| counter(&p.http_addr, name);
    assert_eq!(
        (
            sent("tandem_kv_transfer_sent_transfers_total").await,
            sent("tandem_kv_transfer_shm_sent_transfers_total").await
        ),
        (1, 0),
        "with the decode worker's socket unreachable the transfer went over QUIC"
    );
    // Without `prefill`, locally, on the same worker: the same tokens again.
    let local = generate(&mut dc, request("l1", &prompt, None)).await;
    assert_eq!(local.prefilled.mode, "local");
    assert_eq!(local.tokens, expected);

    // (c) A dead prefill worker: the decode worker prefills locally, same tokens.
    let prompt2 = chat_prompt(
        &reference_engine,
        "How do vaccines teach the immune system to recognise a virus it has never met?",
    );
    let expected2 = reference(&reference_engine, &prompt2).await;
    let ghost = PrefillTarget {
        worker_id: "prefill-ghost".into(),
        grpc_addr: dead_addr(),
    };
    let fallback = generate(&mut dc, request("f1", &prompt2, Some(ghost))).await;
    assert_eq!(fallback.prefilled.mode, "local");
    assert!(
        fallback.prefilled.fallback_reason.contains("prefill-ghost"),
        "{:?}",
        fallback.prefilled
    );
    assert_eq!(fallback.tokens, expected2);

    // A transfer that stalls past its deadline: local again, the blocks
    // reserved for it freed, and the prefill worker's side of it cancelled.
    let sd = find("decode-slow");
    let mut sc = client_tls.worker_client(&sd.grpc_addr).expect("client");
    let late = generate(&mut sc, request("s1", &prompt2, Some(target.clone()))).await;
    assert_eq!(late.prefilled.mode, "local");
    assert!(!late.prefilled.fallback_reason.is_empty());
    assert_eq!(late.tokens, expected2);
    blocks_freed(&sc, "the slow worker's blocks to be freed", 5).await;
    running_becomes(&pc, 0, "the abandoned prefill to stop", 5).await;
    // The prefill worker still serves the healthy decode worker.
    let prompt3 = chat_prompt(
        &reference_engine,
        "What makes the sky look blue at noon and red at sunset?",
    );
    let expected3 = reference(&reference_engine, &prompt3).await;
    let again = generate(&mut dc, request("r2", &prompt3, Some(target.clone()))).await;
    assert_eq!(again.prefilled.mode, "remote", "{:?}", again.prefilled);
    assert_eq!(again.tokens, expected3);
    slow.stop();
    slow.stopped().await;

    // `--echo` answers without the model: the last prompt token, max_tokens times.
    let mut echo_args = DecodeArgs::new(cluster.common("decode-echo"));
    echo_args.echo = true;
    let mut echo = Node::start(|down| tandem_decode_worker::run(echo_args, down));
    let echo_key = keys::instance(CLUSTER, Role::Decode, "decode-echo");
    let ed = cluster.registered(&echo_key, "the echo worker").await;
    let mut ec = client_tls.worker_client(&ed.grpc_addr).expect("client");
    let echoed = generate(&mut ec, request("e1", &prompt, None)).await;
    assert_eq!(
        echoed.tokens,
        vec![prompt[prompt.len() - 1]; OUT_TOKENS as usize]
    );
    assert_eq!(echoed.reason, "length");
    echo.stop();
    echo.stopped().await;

    // (d) KV events report the stored blocks, and the snapshot lists them.
    let mut stored = Vec::new();
    while stored.len() < blocks as usize - 1 {
        let ev = tokio::time::timeout(Duration::from_secs(5), events.message())
            .await
            .expect("an event in time")
            .expect("stream")
            .expect("open");
        if let Some(Kind::Stored(s)) = ev.kind {
            stored.extend(s.hashes);
        }
    }
    let snap = dc
        .kv_snapshot(KvSnapshotRequest {})
        .await
        .expect("snapshot")
        .into_inner();
    assert!(snap.next_seq > 0);
    for h in &stored {
        assert!(
            snap.hashes.contains(h),
            "stored block {h:#x} is in the snapshot"
        );
    }
    let load = dc.load(LoadRequest {}).await.expect("load").into_inner();
    assert_eq!(load.state, "serving");
    assert_eq!(load.kv_blocks_total, KV_BLOCKS as u32);
    assert!(load.ttft_ms > 0.0 && load.itl_ms > 0.0, "{load:?}");

    // Metrics and health over HTTP.
    let (code, body) = http_get(&d.http_addr, "/health").await;
    assert_eq!((code, body.as_str()), (200, r#"{"status":"serving"}"#));
    let (code, metrics) = http_get(&d.http_addr, "/metrics").await;
    assert_eq!(code, 200);
    for line in [
        "tandem_worker_remote_prefills_total 2",
        "tandem_worker_local_fallbacks_total{reason=\"unreachable\"} 1",
        "tandem_worker_requests_total 4",
        "tandem_worker_kv_blocks_total 256",
        "tandem_worker_ttft_seconds_count 4",
        "tandem_kv_transfer_received_bytes_total",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    let (_, pm) = http_get(&p.http_addr, "/metrics").await;
    assert!(pm.contains("tandem_worker_requests_total 2"), "{pm}");

    // A client that goes away cancels its sequence.
    let mut long = request("c1", &prompt2, None);
    long.max_tokens = 400;
    let mut stream = start_generate(&mut dc, long).await;
    first_token(&mut stream).await;
    drop(stream);
    running_becomes(&dc, 0, "the cancelled sequence to stop", 5).await;

    // A client that goes away during a remote prefill cancels it on the
    // prefill worker too: it stops computing long before the prompt's end.
    let long_prompt: Vec<u32> = (0..3600u32).map(|i| 100 + (i * 7 + 3) % 5000).collect();
    let before = computed_tokens(&p.http_addr).await;
    let stream = start_generate(&mut dc, request("c2", &long_prompt, Some(target.clone()))).await;
    running_becomes(&pc, 1, "the remote prefill to start", 10).await;
    let at_drop = computed_tokens(&p.http_addr).await - before;
    drop(stream);
    running_becomes(&pc, 0, "the prefill worker to stop", 10).await;
    let computed = computed_tokens(&p.http_addr).await - before;
    // The engine sees the cancel between steps of at most 512 tokens.
    assert!(
        computed < long_prompt.len() as u64 - 1 && computed <= at_drop + 1024,
        "the prefill worker computed {computed} of {} tokens ({at_drop} when the client left)",
        long_prompt.len() - 1
    );
    blocks_freed(&dc, "the decode worker's reserved blocks freed", 15).await;

    // (e) Shutdown drains: in-flight work finishes, new work is refused, the
    // registration goes, the worker stops.
    let mut last = request("d1", &prompt, None);
    last.max_tokens = 48;
    let mut stream = start_generate(&mut dc, last).await;
    first_token(&mut stream).await;
    let mut got = 1;
    decode.stop();
    eventually(
        "the decode worker to drain",
        Duration::from_secs(10),
        || async { http_get(&d.http_addr, "/health").await.0 == 503 },
    )
    .await;
    let refused = dc
        .generate(request("late", &prompt, None))
        .await
        .expect_err("refused while draining");
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert!(refused.message().contains("draining"), "{refused:?}");
    eventually(
        "the draining state in the store",
        Duration::from_secs(5),
        || async {
            cluster
                .registrations()
                .await
                .iter()
                .any(|r| r.role == Role::Decode && r.state == WorkerState::Draining)
        },
    )
    .await;
    // The request in flight runs to its end.
    let mut finished = None;
    while let Some(msg) = stream.message().await.expect("stream") {
        match msg.event {
            Some(Event::Token(_)) => got += 1,
            Some(Event::Finished(f)) => finished = Some(f),
            _ => {}
        }
    }
    assert_eq!(finished.map(|f| f.reason).as_deref(), Some("length"));
    assert_eq!(got, 48);
    decode.stopped().await;
    let regs = cluster.registrations().await;
    assert!(
        regs.iter().all(|r| r.role != Role::Decode),
        "deregistered: {regs:?}"
    );

    let mut prefill = prefill;
    prefill.stop();
    prefill.stopped().await;
    assert!(cluster.registrations().await.is_empty());

    cluster.stop().await;
}

/// The real binary: registers, serves `/health`, and on SIGTERM drains,
/// deregisters and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_decode_binary_drains_and_deregisters_on_sigterm() {
    let cluster = Cluster::start("proc").await;
    let dir = cluster.identity("decode-p");
    let model = test_model_path();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tandem-decode"))
        .args([
            "--store",
            &cluster.store_url,
            "--cluster",
            "wproc",
            "--id",
            "decode-p",
        ])
        .args(["--threads", "1", "--kv-blocks", "64", "--tls-dir"])
        .arg(&dir)
        .arg("--model")
        .arg(&model)
        .kill_on_drop(true)
        .spawn()
        .expect("start tandem-decode");
    let key = keys::instance("wproc", Role::Decode, "decode-p");
    let info = cluster.registered(&key, "the process to register").await;
    assert_eq!(http_get(&info.http_addr, "/health").await.0, 200);

    let pid = child.id().expect("pid").to_string();
    let killed = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .expect("kill");
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exits in time")
        .expect("wait");
    assert!(status.success(), "exit status {status}");
    assert!(
        cluster.store.get(&key).await.expect("get").is_none(),
        "deregistered"
    );

    cluster.stop().await;
}
