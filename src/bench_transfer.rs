//! `tandem bench transfer`: how fast KV moves between workers. For the default
//! model's KV of a 2,048-token prompt and for a 256 MiB synthetic transfer
//! (an 8B-class layout), it times whole transfers, open to verified verdict,
//! over QUIC (mutual TLS, loopback), the same-host shared-memory path (a Unix
//! socket and a ring in `/dev/shm`, as between two worker processes), the
//! local in-process path, the same framing over a plain TCP stream on
//! loopback, and a bare memcpy into the pool: every path ends with the same
//! copy into a block pool, so the ratios show what each transport costs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tandem_engine::engine::{Engine, EngineConfig};
use tandem_engine::kv_cache::{BlockId, KvLayout};
use tandem_kv_transfer::local::LocalTransport;
use tandem_kv_transfer::quic::{QuicListener, QuicPeer, QuicSession, QuicTransport};
use tandem_kv_transfer::shm::{ShmListener, ShmSession, ShmTransport};
use tandem_kv_transfer::tls::ClusterCa;
use tandem_kv_transfer::{
    BlockSink, DType, KvReceiver, MemoryPool, PieceBatch, Session, StreamWriter,
    TransferDescriptor, TransferMetrics, TransferWriter, Transport,
};

/// Options of `tandem bench transfer`.
#[derive(Debug, Clone)]
pub struct TransferBenchOptions {
    pub model: PathBuf,
    pub json: bool,
    /// Timed transfers per case and path (after one warm-up).
    pub repetitions: usize,
}

/// One path's figures for one case.
#[derive(Debug, Clone, Serialize)]
pub struct PathResult {
    pub path: &'static str,
    /// Bytes over the median transfer time, in 10^9 bytes per second.
    pub gbps: f64,
    pub median_ms: f64,
    pub best_ms: f64,
}

/// One transfer size.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    pub case: String,
    pub bytes: u64,
    pub blocks: usize,
    pub piece_bytes: usize,
    pub paths: Vec<PathResult>,
    /// The QUIC connection's path MTU at the end, and its packets lost.
    pub quic_mtu: u16,
    pub quic_lost_packets: u64,
}

/// What `tandem bench transfer` measures. The top-level figures are the
/// default model's 2,048-token KV.
#[derive(Debug, Clone, Serialize)]
pub struct TransferBenchReport {
    pub quic_gbps: f64,
    pub tcp_gbps: f64,
    pub local_gbps: f64,
    pub shm_gbps: f64,
    pub memcpy_gbps: f64,
    pub quic_over_tcp: f64,
    pub cases: Vec<CaseResult>,
}

/// Runs the benchmark and prints a table or one JSON object.
pub fn transfer(opts: &TransferBenchOptions) -> anyhow::Result<TransferBenchReport> {
    let layout = {
        let config = EngineConfig {
            kv_cache_tokens: 16,
            threads: Some(1),
            ..EngineConfig::default()
        };
        Engine::load(&opts.model, config)
            .with_context(|| format!("loading {}", opts.model.display()))?
            .kv_layout()
    };
    let synthetic = KvLayout {
        n_layers: 32,
        n_kv_heads: 8,
        head_dim: 128,
        block_size: 16,
    };
    let cases = [
        (
            "default model KV, 2048-token prompt".to_string(),
            layout,
            2048usize.div_ceil(layout.block_size),
        ),
        (
            "synthetic 256 MiB (32 layers, 8 KV heads × 128)".to_string(),
            synthetic,
            (256usize << 20) / synthetic.block_bytes(),
        ),
    ];
    let reps = opts.repetitions.max(1);
    let rt = crate::runtime()?;
    let mut results = Vec::new();
    for (name, layout, blocks) in cases {
        let case = rt.block_on(run_case(name, layout, blocks, reps))?;
        if !opts.json {
            print_case(&case);
        }
        results.push(case);
    }
    let first = &results[0];
    let gbps = |p: &str| {
        first
            .paths
            .iter()
            .find(|r| r.path == p)
            .map_or(0.0, |r| r.gbps)
    };
    let report = TransferBenchReport {
        quic_gbps: gbps("quic"),
        tcp_gbps: gbps("tcp"),
        local_gbps: gbps("local"),
        shm_gbps: gbps("shm"),
        memcpy_gbps: gbps("memcpy"),
        quic_over_tcp: gbps("quic") / gbps("tcp").max(f64::MIN_POSITIVE),
        cases: results,
    };
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(report)
}

fn print_case(c: &CaseResult) {
    println!(
        "{}: {} blocks, {:.1} MB ({} B pieces)",
        c.case,
        c.blocks,
        c.bytes as f64 / 1e6,
        c.piece_bytes
    );
    println!(
        "  {:<8} {:>9} {:>12} {:>10}",
        "path", "GB/s", "median ms", "best ms"
    );
    for p in &c.paths {
        println!(
            "  {:<8} {:>9.2} {:>12.2} {:>10.2}",
            p.path, p.gbps, p.median_ms, p.best_ms
        );
    }
    println!(
        "  QUIC path MTU {} B, {} packets lost",
        c.quic_mtu, c.quic_lost_packets
    );
}

/// The source KV: one batch per layer, all blocks, pseudo-random bytes.
fn source(desc: &TransferDescriptor) -> Vec<PieceBatch> {
    let len = desc.bytes() as usize / desc.layout.n_layers;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..desc.layout.n_layers)
        .map(|layer| {
            let mut data = vec![0u8; len];
            for w in data.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
            PieceBatch {
                layer: layer as u32,
                first_block: 0,
                data,
            }
        })
        .collect()
}

async fn run_case(
    name: String,
    layout: KvLayout,
    blocks: usize,
    reps: usize,
) -> anyhow::Result<CaseResult> {
    // Target blocks scattered over a pool twice the transfer's size, as a
    // decode worker's would be.
    let ids: Vec<BlockId> = (0..blocks as BlockId).map(|i| i * 2 + 1).collect();
    let mut desc = TransferDescriptor {
        transfer_id: 0,
        request_id: 0,
        layout,
        dtype: DType::F16,
        tokens: blocks * layout.block_size,
        blocks: ids.clone(),
        first_block: 0,
    };
    let src = source(&desc);
    let mut pool = MemoryPool::new(layout, 2 * blocks + 1, ids);
    let mut paths = Vec::new();

    let mut times = Vec::new();
    for _ in 0..=reps {
        let batches = src.clone();
        let t = Instant::now();
        for b in batches {
            pool.write(b.layer as usize, 0, b.data)
                .await
                .map_err(anyhow::Error::msg)?;
        }
        times.push(t.elapsed());
    }
    paths.push(summarize("memcpy", desc.bytes(), &times));

    let metrics = Arc::new(TransferMetrics::default());
    let receiver = KvReceiver::new(metrics.clone());
    let deadline = Duration::from_secs(120);

    let local = LocalTransport::new(metrics.clone())
        .connect(&receiver)
        .await
        .context("local session")?;
    let (times, p) = timed(reps, pool, &src, &receiver, &mut desc, deadline, |d| {
        let s = local.clone();
        async move { s.open(&d).await }
    })
    .await?;
    pool = p;
    paths.push(summarize("local", desc.bytes(), &times));

    let on_host = HostPaths::open(&receiver, &metrics).await?;
    let (times, p) = timed(reps, pool, &src, &receiver, &mut desc, deadline, |d| {
        let s = on_host.shm.clone();
        async move { s.open(&d).await }
    })
    .await?;
    pool = p;
    paths.push(summarize("shm", desc.bytes(), &times));
    let (times, p) = timed(reps, pool, &src, &receiver, &mut desc, deadline, |d| {
        let s = on_host.quic.clone();
        async move { s.open(&d).await }
    })
    .await?;
    pool = p;
    paths.push(summarize("quic", desc.bytes(), &times));
    let stats = on_host.quic.stats();
    drop(on_host);

    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let tcp = tokio::net::TcpListener::bind(loopback).await?;
    let tcp_addr = tcp.local_addr()?;
    let serving = receiver.clone();
    let server = tokio::spawn(async move {
        while let Ok((conn, _)) = tcp.accept().await {
            let _ = conn.set_nodelay(true);
            let r = serving.clone();
            tokio::spawn(async move {
                let (rd, wr) = conn.into_split();
                let _ = r.serve_stream(rd, wr).await;
            });
        }
    });
    let m = metrics.clone();
    let (times, _) = timed(reps, pool, &src, &receiver, &mut desc, deadline, |d| {
        let m = m.clone();
        async move {
            let conn = tokio::net::TcpStream::connect(tcp_addr)
                .await
                .map_err(|e| tandem_kv_transfer::TransferError::Io(e.to_string()))?;
            let _ = conn.set_nodelay(true);
            let (rd, wr) = conn.into_split();
            StreamWriter::open(wr, rd, &d, m).await
        }
    })
    .await?;
    server.abort();
    paths.push(summarize("tcp", desc.bytes(), &times));

    Ok(CaseResult {
        case: name,
        bytes: desc.bytes(),
        blocks,
        piece_bytes: layout.piece_bytes(),
        paths,
        quic_mtu: stats.path.current_mtu,
        quic_lost_packets: stats.path.lost_packets,
    })
}

/// A receiver's same-host endpoints, each with a sender's session to it: the
/// shared-memory socket (in a private scratch directory) and QUIC with mutual
/// TLS on loopback. Both transfer benchmarks send through these.
pub(crate) struct HostPaths {
    pub shm: ShmSession,
    pub quic: QuicSession,
    dir: PathBuf,
    _shm: ShmListener,
    _quic: (QuicListener, QuicTransport),
}

impl HostPaths {
    pub(crate) async fn open(
        receiver: &Arc<KvReceiver>,
        metrics: &Arc<TransferMetrics>,
    ) -> anyhow::Result<Self> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tandem-bench-transfer-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let shm_listener = ShmListener::bind(dir.join("kv.sock"), receiver.clone())?;
        let shm = ShmTransport::new(metrics.clone())
            .connect(shm_listener.path())
            .await
            .context("shared-memory session")?;

        let ca = ClusterCa::generate("tandem bench CA")?;
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let listener = QuicListener::bind(loopback, &ca.issue(&["decode-0"])?, receiver.clone())?;
        // Held with the session: dropping the transport closes its endpoint.
        let transport = QuicTransport::new(loopback, &ca.issue(&["prefill-0"])?, metrics.clone())?;
        let quic = transport
            .connect(&QuicPeer {
                addr: listener.local_addr()?,
                server_name: "decode-0".into(),
            })
            .await
            .context("QUIC connect")?;
        Ok(Self {
            shm,
            quic,
            dir,
            _shm: shm_listener,
            _quic: (listener, transport),
        })
    }
}

impl Drop for HostPaths {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `reps + 1` transfers of `src` into `pool` (the first a warm-up) and
/// times each from open to the receiver's verified verdict.
async fn timed<W, F, Fut>(
    reps: usize,
    mut pool: MemoryPool,
    src: &[PieceBatch],
    receiver: &KvReceiver,
    desc: &mut TransferDescriptor,
    deadline: Duration,
    open: F,
) -> anyhow::Result<(Vec<Duration>, MemoryPool)>
where
    W: TransferWriter,
    F: Fn(TransferDescriptor) -> Fut,
    Fut: std::future::Future<Output = Result<W, tandem_kv_transfer::TransferError>>,
{
    let mut times = Vec::new();
    for _ in 0..=reps {
        desc.transfer_id += 1;
        let batches = src.to_vec();
        let pending = receiver.expect(desc.clone(), pool, deadline)?;
        let t = Instant::now();
        let mut w = open(desc.clone()).await?;
        for b in batches {
            w.send(b).await?;
        }
        w.finish(None).await?;
        let (p, _) = pending.wait().await?;
        times.push(t.elapsed());
        pool = p;
    }
    Ok((times, pool))
}

/// Drops the warm-up, then the median and best of the rest.
fn summarize(path: &'static str, bytes: u64, times: &[Duration]) -> PathResult {
    let mut t: Vec<f64> = times.iter().skip(1).map(Duration::as_secs_f64).collect();
    t.sort_by(f64::total_cmp);
    let median = t.get(t.len() / 2).copied().unwrap_or(f64::NAN);
    let best = t.first().copied().unwrap_or(f64::NAN);
    PathResult {
        path,
        gbps: bytes as f64 / median / 1e9,
        median_ms: median * 1e3,
        best_ms: best * 1e3,
    }
}
