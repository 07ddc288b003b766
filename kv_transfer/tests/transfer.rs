//! KV transfers between two real engines on the default model, through each
//! transport, and the faults a transfer must survive: each fails cleanly on
//! both ends, frees the reserved blocks, and leaves the receiver serving.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tandem_engine::engine::{
    Engine, EngineConfig, KvReservation, KvStream, Request, RequestHandle, TokenEvent,
};
use tandem_engine::paths;
use tandem_kv_transfer::local::LocalTransport;
use tandem_kv_transfer::quic::{QuicListener, QuicPeer, QuicTransport};
use tandem_kv_transfer::shm::{ShmListener, ShmTransport};
use tandem_kv_transfer::tls::{ClusterCa, NodeIdentity};
use tandem_kv_transfer::{
    KvReceiver, PendingTransfer, PieceBatch, Session, TransferDescriptor, TransferError,
    TransferMetrics, TransferWriter, Transport, piece_checksum, send_kv_stream,
};

const DEADLINE: Duration = Duration::from_secs(60);
static NEXT_TRANSFER: AtomicU64 = AtomicU64::new(1);

fn engine(max_batch_tokens: usize) -> Engine {
    let config = EngineConfig {
        kv_cache_tokens: 4096,
        max_batch_tokens,
        threads: Some(1),
        ..EngineConfig::default()
    };
    Engine::load(paths::test_model_path(), config).expect("load the default model")
}

fn prompt(e: &Engine) -> Vec<u32> {
    let text = "The history of the printing press begins in the fifteenth century, when \
        Johannes Gutenberg combined movable metal type, oil-based ink and a wooden press \
        adapted from those used for wine. Within fifty years presses were at work in more \
        than two hundred cities across Europe, and the cost of books fell so far that \
        ordinary merchants could own them. Explain, step by step, why this invention \
        changed how knowledge spread, and what it meant for universities.";
    let mut ids = e.tokenizer().bos().into_iter().collect::<Vec<_>>();
    ids.extend(e.tokenizer().encode(text, false));
    ids
}

async fn collect(mut h: RequestHandle) -> Vec<u32> {
    let mut ids = Vec::new();
    while let Some(ev) = h.events.recv().await {
        match ev {
            TokenEvent::Token(t) => ids.push(t.id),
            TokenEvent::Finished { .. } => break,
        }
    }
    ids
}

async fn wait_blocks_used(e: &Engine, used: usize) {
    let start = std::time::Instant::now();
    while e.load_report().kv_blocks_used != used {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "blocks in use stay at {}, expected {used}",
            e.load_report().kv_blocks_used
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reserves blocks for `tokens` on `b` and expects their transfer.
fn expect(
    b: &Engine,
    receiver: &KvReceiver,
    tokens: Vec<u32>,
    deadline: Duration,
) -> (TransferDescriptor, PendingTransfer<KvReservation>) {
    let res = b.reserve_kv(tokens).expect("reserve");
    let id = NEXT_TRANSFER.fetch_add(1, Ordering::Relaxed);
    let desc = TransferDescriptor::for_reservation(id, id, &res);
    let pending = receiver
        .expect(desc.clone(), res, deadline)
        .expect("expect");
    (desc, pending)
}

/// Prefill on `a` streaming into reserved blocks of `b` over `session`, then
/// decode on `b`: the same greedy tokens as `a` decoding on.
async fn disaggregated<S: Session>(a: &Engine, b: &Engine, receiver: &KvReceiver, session: &S) {
    let prompt = prompt(a);
    let bs = a.kv_layout().block_size;
    assert!(prompt.len() > 4 * bs, "a prompt of several blocks");
    let n = 12;
    let (desc, pending) = expect(b, receiver, prompt.clone(), DEADLINE);

    let writer = session.open(&desc).await.expect("open");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut r = Request::new(prompt.clone(), n);
    r.ignore_eos = true;
    r.kv_stream = Some(KvStream {
        skip_blocks: desc.first_block,
        tx,
    });
    let decoding = a.submit(r).expect("submit");
    let sent = tokio::spawn(send_kv_stream(writer, rx));
    let whole = collect(decoding).await;
    let sent = sent.await.expect("sender task").expect("sent");
    let (res, report) = pending.wait().await.expect("received");
    assert_eq!(report.checksum, sent.checksum);
    assert_eq!(report.pieces, desc.pieces());
    assert_eq!(sent.bytes, desc.bytes());

    let mut r = Request::new([prompt, vec![whole[0]]].concat(), n - 1);
    r.ignore_eos = true;
    let rest = collect(b.submit_reserved(res, r).expect("submit reserved")).await;
    assert_eq!(rest, whole[1..], "decoding after the transfer agrees");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_transfer_decodes_like_the_prefill_engine() {
    let (a, b) = (engine(48), engine(48));
    let metrics = Arc::new(TransferMetrics::default());
    let receiver = KvReceiver::new(metrics.clone());
    let session = LocalTransport::new(metrics.clone())
        .connect(&receiver)
        .await
        .expect("connect");
    disaggregated(&a, &b, &receiver, &session).await;
    let m = metrics.snapshot();
    assert_eq!((m.transfers_sent, m.transfers_received), (1, 1));
    assert_eq!(m.bytes_sent, m.bytes_received);

    // A sender that goes away mid-transfer: a disconnect, and the blocks are freed.
    wait_blocks_used(&b, 0).await;
    let (desc, pending) = expect(&b, &receiver, prompt(&a), DEADLINE);
    let mut w = session.open(&desc).await.expect("open");
    for batch in synthetic(&desc, 11).0.into_iter().take(3) {
        w.send(batch).await.expect("send");
    }
    drop(w);
    let e = pending.wait().await.expect_err("disconnect");
    assert!(matches!(e, TransferError::PeerDisconnected { .. }), "{e}");
    wait_blocks_used(&b, 0).await;
}

struct Cluster {
    ca: ClusterCa,
    receiver_id: NodeIdentity,
    sender_id: NodeIdentity,
}

fn cluster() -> Cluster {
    let ca = ClusterCa::generate("tandem test cluster").expect("CA");
    Cluster {
        receiver_id: ca.issue(&["decode-0", "127.0.0.1"]).expect("cert"),
        sender_id: ca.issue(&["prefill-0"]).expect("cert"),
        ca,
    }
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// The decode node listening at `addr`, as a sender dials it.
fn decode_peer(addr: SocketAddr) -> QuicPeer {
    QuicPeer {
        addr,
        server_name: "decode-0".into(),
    }
}

/// A receiver (counting into its own metrics) behind a QUIC listener on a
/// loopback port with the cluster's decode identity; the listener serves while
/// held, and the peer is what senders dial.
fn quic_receiver(c: &Cluster) -> (Arc<KvReceiver>, QuicListener, QuicPeer) {
    let receiver = KvReceiver::new(Arc::new(TransferMetrics::default()));
    let listener = QuicListener::bind(loopback(), &c.receiver_id, receiver.clone()).expect("bind");
    let peer = decode_peer(listener.local_addr().expect("addr"));
    (receiver, listener, peer)
}

/// Waits until `metrics` counts at least `pieces` received.
async fn wait_pieces_received(metrics: &TransferMetrics, pieces: u64) {
    while metrics.snapshot().pieces_received < pieces {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_transfer_with_cached_prefix_decodes_like_the_prefill_engine() {
    let (a, b) = (engine(48), engine(48));
    let c = cluster();
    let (receiver, _listener, peer) = quic_receiver(&c);
    let tx_metrics = Arc::new(TransferMetrics::default());
    let transport =
        QuicTransport::new(loopback(), &c.sender_id, tx_metrics.clone()).expect("client");
    // The decode engine holds the prompt's first blocks already: only the rest moves.
    let bs = b.kv_layout().block_size;
    let warm = Request::new(prompt(&b)[..2 * bs + 3].to_vec(), 1);
    collect(b.submit(warm).expect("submit")).await;
    wait_blocks_used(&b, 0).await;

    let session = transport.connect(&peer).await.expect("connect");
    disaggregated(&a, &b, &receiver, &session).await;
    let m = receiver.metrics().snapshot();
    assert_eq!(m.transfers_received, 1);
    let blocks = prompt(&a).len().div_ceil(bs) as u64;
    assert_eq!(m.blocks_received, blocks - 2, "cached blocks are not sent");
    assert_eq!(tx_metrics.snapshot().bytes_sent, m.bytes_received);
    assert!(
        receiver
            .metrics()
            .render_prometheus()
            .contains("tandem_kv_transfer_received_bytes_total")
    );
    let _ = c.ca;
}

/// Pseudo-random pieces for every block and layer of `desc`, one batch per layer.
fn synthetic(desc: &TransferDescriptor, seed: u64) -> (Vec<PieceBatch>, u64) {
    let pb = desc.piece_bytes();
    let blocks = desc.blocks.len() - desc.first_block;
    let mut x = seed | 1;
    let mut sum = 0u64;
    let batches = (0..desc.layout.n_layers)
        .map(|layer| {
            let data: Vec<u8> = (0..blocks * pb)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            for (i, piece) in data.chunks_exact(pb).enumerate() {
                sum = sum.wrapping_add(piece_checksum(desc.first_block + i, layer, piece));
            }
            PieceBatch {
                layer: layer as u32,
                first_block: desc.first_block as u32,
                data,
            }
        })
        .collect();
    (batches, sum)
}

/// Opens a transfer of `desc` on a new session of `transport` with `peer`.
async fn open_new<T: Transport>(
    transport: &T,
    peer: &T::Peer,
    desc: &TransferDescriptor,
) -> <T::Session as Session>::Writer {
    transport
        .connect(peer)
        .await
        .expect("connect")
        .open(desc)
        .await
        .expect("open")
}

/// Sends `batches` then finishes; the first error on the way.
async fn send_all<W: TransferWriter>(
    mut w: W,
    batches: Vec<PieceBatch>,
    checksum: Option<u64>,
) -> Result<(), TransferError> {
    for b in batches {
        w.send(b).await?;
    }
    w.finish(checksum).await.map(|_| ())
}

fn tokens(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| 100 + (i * 7 + salt) % 5000).collect()
}

/// The faults every transport must survive, on `session` into engine `b`:
/// a transfer nobody expects (refused; the real one lands after it on the
/// same session), corrupted bytes (a checksum mismatch on both ends), and a
/// stall past the deadline while a concurrent transfer lands. Each frees the
/// reserved blocks.
async fn transport_faults<S: Session>(b: &Engine, receiver: &KvReceiver, session: &S, salt: u32) {
    let salt = salt * 10;
    // A transfer nobody expects is refused.
    let (mut desc, pending) = expect(b, receiver, tokens(64, salt + 1), DEADLINE);
    let real = desc.transfer_id;
    desc.transfer_id = 999_999;
    let (batches, _) = synthetic(&desc, 1);
    let w = session.open(&desc).await.expect("open");
    let e = send_all(w, batches.clone(), None)
        .await
        .expect_err("refused");
    assert_eq!(e, TransferError::UnknownTransfer { transfer: 999_999 });
    // The real one still lands afterwards on the same session.
    desc.transfer_id = real;
    let w = session.open(&desc).await.expect("open");
    send_all(w, batches, None).await.expect("sent");
    let (res, _) = pending.wait().await.expect("received");
    drop(res);
    wait_blocks_used(b, 0).await;

    // Corrupted bytes: the source's checksum does not match what landed.
    let (desc, pending) = expect(b, receiver, tokens(64, salt + 2), DEADLINE);
    let (mut batches, source_sum) = synthetic(&desc, 2);
    batches[3].data[100] ^= 0x40;
    let w = session.open(&desc).await.expect("open");
    let e = send_all(w, batches, Some(source_sum))
        .await
        .expect_err("mismatch");
    assert!(matches!(e, TransferError::ChecksumMismatch { .. }), "{e}");
    let e = pending.wait().await.expect_err("mismatch");
    assert!(matches!(e, TransferError::ChecksumMismatch { .. }), "{e}");
    wait_blocks_used(b, 0).await;

    // A stall past the deadline.
    let (desc, pending) = expect(
        b,
        receiver,
        tokens(64, salt + 3),
        Duration::from_millis(800),
    );
    let (batches, _) = synthetic(&desc, 3);
    let mut w = session.open(&desc).await.expect("open");
    for batch in batches.iter().take(5).cloned() {
        w.send(batch).await.expect("send");
    }
    // Meanwhile another transfer on the same session completes.
    let (other_desc, other_pending) = expect(b, receiver, tokens(64, salt + 33), DEADLINE);
    let other_w = session.open(&other_desc).await.expect("open");
    send_all(other_w, synthetic(&other_desc, 33).0, None)
        .await
        .expect("a concurrent transfer lands");
    drop(other_pending.wait().await.expect("received"));
    let e = pending.wait().await.expect_err("deadline");
    let blocks = desc.blocks.len();
    assert!(
        matches!(e, TransferError::DeadlineExceeded { received, .. } if received == 5 * blocks),
        "{e}"
    );
    wait_blocks_used(b, 0).await;
    let e = send_all(w, batches[5..].to_vec(), None)
        .await
        .expect_err("too late");
    assert!(matches!(e, TransferError::DeadlineExceeded { .. }), "{e}");
}

/// After a test's faults: one more transfer lands whole, nothing is left
/// pending, and the receiver counted `failures` of the kinds unknown
/// transfer, checksum, deadline and disconnect.
async fn still_serving<S: Session>(
    b: &Engine,
    receiver: &KvReceiver,
    session: &S,
    failures: &[u64; 4],
) {
    let (desc, pending) = expect(b, receiver, tokens(64, 6), DEADLINE);
    let (batches, sum) = synthetic(&desc, 6);
    let w = session.open(&desc).await.expect("open");
    send_all(w, batches, None).await.expect("sent");
    let (res, report) = pending.wait().await.expect("received");
    assert_eq!(report.checksum, sum);
    drop(res);
    wait_blocks_used(b, 0).await;
    assert_eq!(receiver.pending(), 0);
    let kinds = ["unknown_transfer", "checksum", "deadline", "disconnected"];
    for (kind, &n) in kinds.iter().zip(failures) {
        assert_eq!(receiver.metrics().failures(kind), n, "{kind} failures");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_fail_cleanly_free_blocks_and_the_receiver_keeps_serving() {
    let b = engine(64);
    let c = cluster();
    let (receiver, _listener, peer) = quic_receiver(&c);
    let sender = Arc::new(TransferMetrics::default());
    let transport = QuicTransport::new(loopback(), &c.sender_id, sender).expect("client");
    let session = transport.connect(&peer).await.expect("connect");

    transport_faults(&b, &receiver, &session, 1).await;

    // The connection drops mid-transfer.
    let (desc, pending) = expect(&b, &receiver, tokens(64, 4), DEADLINE);
    let (batches, _) = synthetic(&desc, 4);
    let other = QuicTransport::new(loopback(), &c.sender_id, Arc::default()).expect("client");
    let doomed = other.connect(&peer).await.expect("connect");
    let mut w = doomed.open(&desc).await.expect("open");
    let before = receiver.metrics().snapshot().pieces_received;
    for batch in batches.into_iter().take(5) {
        w.send(batch).await.expect("send");
    }
    // Drop the connection once the pieces have landed (closing earlier would
    // discard them unsent, and the receiver would only see a missed deadline).
    let landed = (5 * desc.blocks.len()) as u64;
    wait_pieces_received(receiver.metrics(), before + landed).await;
    doomed.close();
    let e = pending.wait().await.expect_err("disconnect");
    assert!(matches!(e, TransferError::PeerDisconnected { .. }), "{e}");
    wait_blocks_used(&b, 0).await;

    // A certificate from another CA is refused, whichever side holds it.
    let rogue_ca = ClusterCa::generate("rogue").expect("CA");
    let mut rogue = rogue_ca.issue(&["prefill-9"]).expect("cert");
    rogue.ca = c.receiver_id.ca.clone(); // trusts the cluster, but is not of it
    let (desc, pending) = expect(&b, &receiver, tokens(64, 5), Duration::from_secs(2));
    let (batches, _) = synthetic(&desc, 5);
    let impostor = QuicTransport::new(loopback(), &rogue, Arc::default()).expect("client");
    let attempt = async {
        let s = impostor.connect(&peer).await?;
        let w = s.open(&desc).await?;
        send_all(w, batches.clone(), None).await
    };
    assert!(
        attempt.await.is_err(),
        "a client outside the cluster is refused"
    );
    let e = pending.wait().await.expect_err("never arrives");
    assert!(
        matches!(e, TransferError::DeadlineExceeded { received: 0, .. }),
        "{e}"
    );
    assert!(receiver.metrics().snapshot().handshake_failures >= 1);
    let outsider = rogue_ca.issue(&["prefill-8"]).expect("cert");
    let wary = QuicTransport::new(loopback(), &outsider, Arc::default()).expect("client");
    let e = wary.connect(&peer).await.expect_err("untrusted server");
    assert!(matches!(e, TransferError::Connect { .. }), "{e}");
    wait_blocks_used(&b, 0).await;

    // Through all of that the receiver kept serving.
    still_serving(&b, &receiver, &session, &[1, 1, 2, 1]).await;
}

const CHILD_ENV: &str = "TANDEM_KVT_CHILD_SENDER";

/// A sender killed mid-transfer (a real process, SIGKILL): the receiver sees
/// the peer go silent, fails the transfer as a disconnect, frees the blocks,
/// and serves the next transfer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_killed_mid_transfer_is_a_disconnect() {
    let b = engine(64);
    let c = cluster();
    let (receiver, _listener, peer) = quic_receiver(&c);
    let dir = std::env::temp_dir().join(format!("tandem-kvt-child-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let files = c.sender_id.write_files(&dir).expect("identity files");

    let (desc, pending) = expect(&b, &receiver, tokens(64, 7), DEADLINE);
    let spec = serde_json::json!({
        "addr": peer.addr.to_string(),
        "ca": files.ca, "cert": files.cert, "key": files.key,
        "desc": desc,
    });
    kill_sender_half_way(&b, &receiver, spec, &desc, pending).await;
    let _ = std::fs::remove_dir_all(&dir);

    let (desc, pending) = expect(&b, &receiver, tokens(64, 8), DEADLINE);
    let transport = QuicTransport::new(loopback(), &c.sender_id, Arc::default()).expect("client");
    let w = open_new(&transport, &peer, &desc).await;
    send_all(w, synthetic(&desc, 8).0, None)
        .await
        .expect("sent");
    pending.wait().await.expect("received");
}

/// The sending process of `sender_killed_mid_transfer_is_a_disconnect`: sends
/// half the pieces, says so, and waits to be killed.
#[test]
#[ignore = "run as a child process by sender_killed_mid_transfer_is_a_disconnect"]
fn child_sender_process() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let spec: serde_json::Value = serde_json::from_str(&spec).expect("spec");
    let desc: TransferDescriptor = serde_json::from_value(spec["desc"].clone()).expect("desc");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    if let Some(socket) = spec["socket"].as_str() {
        rt.block_on(async {
            let t = ShmTransport::new(Arc::default());
            let w = open_new(&t, std::path::Path::new(socket), &desc).await;
            send_half_then_wait(w, &desc).await;
        });
        return;
    }
    let addr: SocketAddr = spec["addr"].as_str().expect("addr").parse().expect("addr");
    rt.block_on(async {
        let path = |k: &str| std::path::PathBuf::from(spec[k].as_str().expect("path"));
        let files = tandem_kv_transfer::tls::IdentityFiles {
            ca: path("ca"),
            cert: path("cert"),
            key: path("key"),
        };
        let identity = NodeIdentity::from_files(&files).expect("identity from files");
        let t = QuicTransport::new(loopback(), &identity, Arc::default()).expect("client");
        let w = open_new(&t, &decode_peer(addr), &desc).await;
        send_half_then_wait(w, &desc).await;
    });
}

/// The child sender's part: half of `desc`'s pieces, a line saying so, then
/// nothing until it is killed.
async fn send_half_then_wait<W: TransferWriter>(mut w: W, desc: &TransferDescriptor) {
    let (batches, _) = synthetic(desc, 9);
    let half = batches.len() / 2;
    for b in batches.into_iter().take(half) {
        w.send(b).await.expect("send");
    }
    println!("HALF SENT");
    tokio::time::sleep(Duration::from_secs(120)).await;
}

/// Ring files this process created and left in the shared-memory directory.
fn leftover_rings() -> Vec<String> {
    let prefix = format!("tandem-kv-{}-", std::process::id());
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Spawns this test binary as a sender process (see `child_sender_process`)
/// and waits until it has sent half of `desc`'s pieces.
async fn half_sending_child(spec: serde_json::Value) -> tokio::process::Child {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "child_sender_process",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_ENV, spec.to_string())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the sender");
    let stdout = child.stdout.take().expect("child stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    loop {
        match lines.next_line().await.expect("child output") {
            Some(l) if l.contains("HALF SENT") => return child,
            Some(_) => {}
            None => panic!("the sender exited before sending half"),
        }
    }
}

/// Runs a sender process on `spec` (see `half_sending_child`), kills it once
/// half of `desc`'s pieces have landed in `receiver`, and expects `pending` to
/// fail as a disconnect part-way, freeing `b`'s blocks.
async fn kill_sender_half_way(
    b: &Engine,
    receiver: &KvReceiver,
    spec: serde_json::Value,
    desc: &TransferDescriptor,
    pending: PendingTransfer<KvReservation>,
) {
    let metrics = receiver.metrics();
    let before = metrics.snapshot().pieces_received;
    let mut child = half_sending_child(spec).await;
    // Its writes are out of the process once they have landed here.
    let half = (desc.layout.n_layers / 2 * desc.blocks.len()) as u64;
    wait_pieces_received(metrics, before + half).await;
    child.kill().await.expect("kill the sender");

    let e = pending.wait().await.expect_err("disconnect");
    assert!(
        matches!(e, TransferError::PeerDisconnected { received, expected, .. } if received > 0 && received < expected),
        "{e}"
    );
    wait_blocks_used(b, 0).await;
}

/// The same-host path between processes: a real prefill's KV through shared
/// memory decodes like the prefill engine; a 2,048-token transfer laps the
/// ring several times; lanes are reused and no ring file is left behind; and
/// the faults (unknown transfer, corrupted bytes, stall, sender killed, a
/// hostile lane) each fail cleanly, free the blocks, and leave it serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shm_transfers_between_processes_and_survive_faults() {
    let (a, b) = (engine(48), engine(64));
    let dir = std::env::temp_dir().join(format!("tandem-kvt-shm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let socket = dir.join("decode.sock");
    let metrics = Arc::new(TransferMetrics::default());
    let receiver = KvReceiver::new(metrics.clone());
    let _listener = ShmListener::bind(&socket, receiver.clone()).expect("bind");
    let sent = Arc::new(TransferMetrics::default());
    let transport = ShmTransport::new(sent.clone());
    let session = transport.connect(&socket).await.expect("connect");

    disaggregated(&a, &b, &receiver, &session).await;
    wait_blocks_used(&b, 0).await;
    let m = sent.snapshot();
    assert_eq!((m.transfers_sent, m.shm_transfers_sent), (1, 1));
    assert_eq!(m.bytes_sent, metrics.snapshot().bytes_received);

    // A whole 2,048-token prompt's KV: more than the ring, so the sender waits
    // for credits and the ring wraps.
    let (desc, pending) = expect(&b, &receiver, tokens(2048, 1), DEADLINE);
    assert!(desc.bytes() > 2 * tandem_kv_transfer::shm::RING_BYTES as u64);
    let (batches, sum) = synthetic(&desc, 1);
    let w = session.open(&desc).await.expect("open");
    send_all(w, batches, Some(sum)).await.expect("sent");
    let (res, report) = pending.wait().await.expect("received");
    assert_eq!(report.checksum, sum);
    drop(res);
    wait_blocks_used(&b, 0).await;
    assert!(leftover_rings().is_empty(), "{:?}", leftover_rings());

    transport_faults(&b, &receiver, &session, 2).await;

    // A sender process killed mid-transfer: a disconnect.
    let (desc, pending) = expect(&b, &receiver, tokens(64, 5), DEADLINE);
    let spec = serde_json::json!({ "socket": socket, "desc": desc });
    kill_sender_half_way(&b, &receiver, spec, &desc, pending).await;

    // A lane that names a file outside the shared-memory directory is refused.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::UnixStream::connect(&socket)
            .await
            .expect("connect");
        let name = b"/etc/passwd";
        let mut hello = b"TSHM".to_vec();
        hello.extend_from_slice(&4096u64.to_le_bytes());
        hello.extend_from_slice(&(name.len() as u16).to_le_bytes());
        hello.extend_from_slice(name);
        s.write_all(&hello).await.expect("hello");
        assert_eq!(s.read_u8().await.expect("reply"), 1, "refused");
    }

    // Through all of that the receiver kept serving, on a reused lane.
    still_serving(&b, &receiver, &session, &[1, 1, 1, 1]).await;
    assert!(leftover_rings().is_empty(), "{:?}", leftover_rings());
    let _ = std::fs::remove_dir_all(&dir);
}
