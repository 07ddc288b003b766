//! KV transfer over QUIC (quinn): TLS 1.3 with mutual authentication from the
//! cluster CA, one connection per peer pair, one bidirectional stream per
//! transfer (descriptor, pieces and end frame one way; the verdict back).
//!
//! Flow control is QUIC's own: a sender's writes wait while the receiver's
//! stream window is full, and the receiver reads one batch at a time into the
//! reserved blocks, so neither side buffers more than the windows below.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{
    Connection, Endpoint, EndpointConfig, MtuDiscoveryConfig, RecvStream, SendStream,
    TransportConfig, VarInt,
};
use tokio::sync::Mutex;

use crate::tls::NodeIdentity;
use crate::{
    KvReceiver, Session, StreamWriter, TransferDescriptor, TransferError, TransferMetrics,
    Transport,
};

/// Bytes a transfer may have in flight on one stream (per-stream receive window).
pub const STREAM_WINDOW: u32 = 4 << 20;
/// Bytes in flight over all streams of one connection. Kept within what the
/// receiving socket buffer holds ([`SOCKET_BUFFER`]): a larger window lets
/// bursts overflow it, and every drop halves the congestion window.
pub const CONNECTION_WINDOW: u32 = 8 << 20;
/// Concurrent transfers one peer may have open towards a receiver.
pub const MAX_TRANSFERS_PER_PEER: u32 = 256;
/// Keep-alive period of an idle connection.
pub const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// A peer silent this long is gone: its transfers fail as disconnected.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest UDP payload either end sends or accepts (the IPv4 maximum). Path
/// MTU discovery climbs towards it from a safe 1,200 bytes, so on loopback or
/// jumbo-frame links each packet carries far more data per header,
/// encryption call and acknowledgement, while an ordinary 1,500-byte link
/// settles at its own MTU.
pub const MAX_UDP_PAYLOAD: u16 = 65_507;
/// Requested socket buffer size (the kernel caps it at `net.core.rmem_max`
/// and `wmem_max`): the default ~200 KiB holds only a few large datagrams.
pub const SOCKET_BUFFER: usize = 4 << 20;

fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> Result<Endpoint, TransferError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let io = |e: std::io::Error| TransferError::Io(format!("binding {addr}: {e}"));
    let sock =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(io)?;
    // Best effort: a smaller buffer only costs throughput.
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    sock.bind(&addr.into()).map_err(io)?;
    let mut config = EndpointConfig::default();
    config
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .map_err(|e| TransferError::Io(e.to_string()))?;
    Endpoint::new(config, server, sock.into(), Arc::new(quinn::TokioRuntime)).map_err(io)
}

/// Transport settings for both ends, tuned for bulk transfer: bounded
/// windows, large datagrams, keep-alives so the connection to a peer survives
/// between transfers and a dead peer is noticed within [`IDLE_TIMEOUT`].
///
/// Segmentation offload (GSO) is off: it batches up to ten datagrams per
/// system call, which pays with 1,500-byte packets, but the kernel refuses
/// batches over 64 KiB, so with the large datagrams above every batch would
/// fail and look like loss. Measured on loopback (docs/benchmarks.md), one
/// large datagram per call beats GSO with small ones.
fn transport_config() -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(u64::from(CONNECTION_WINDOW))
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_TRANSFERS_PER_PEER))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .keep_alive_interval(Some(KEEP_ALIVE))
        .enable_segmentation_offload(false);
    let mut mtu = MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    if let Ok(idle) = IDLE_TIMEOUT.try_into() {
        t.max_idle_timeout(Some(idle));
    }
    Arc::new(t)
}

fn server_config(identity: &NodeIdentity) -> Result<quinn::ServerConfig, TransferError> {
    let tls = QuicServerConfig::try_from(identity.server_config()?)
        .map_err(|e| TransferError::Tls(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(tls));
    cfg.transport_config(transport_config());
    Ok(cfg)
}

fn client_config(identity: &NodeIdentity) -> Result<quinn::ClientConfig, TransferError> {
    let tls = QuicClientConfig::try_from(identity.client_config()?)
        .map_err(|e| TransferError::Tls(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(tls));
    cfg.transport_config(transport_config());
    Ok(cfg)
}

/// A receiver's QUIC endpoint: accepts peers with a cluster certificate and
/// serves every stream they open as one transfer.
pub struct QuicListener {
    endpoint: Endpoint,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for QuicListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicListener")
            .field("addr", &self.endpoint.local_addr().ok())
            .finish()
    }
}

impl QuicListener {
    /// Listens on `addr` (port 0 picks one) for transfers into `receiver`.
    pub fn bind(
        addr: SocketAddr,
        identity: &NodeIdentity,
        receiver: Arc<KvReceiver>,
    ) -> Result<Self, TransferError> {
        let endpoint = endpoint(addr, Some(server_config(identity)?))?;
        let accepting = endpoint.clone();
        let task = tokio::spawn(async move {
            while let Some(incoming) = accepting.accept().await {
                let receiver = receiver.clone();
                tokio::spawn(async move {
                    let peer = incoming.remote_address();
                    match incoming.await {
                        Ok(conn) => serve_connection(conn, receiver).await,
                        Err(e) => {
                            receiver.metrics().handshake_failed();
                            tracing::warn!(%peer, error = %e, "KV transfer peer refused");
                        }
                    }
                });
            }
        });
        Ok(Self { endpoint, task })
    }

    /// The address peers connect to.
    pub fn local_addr(&self) -> Result<SocketAddr, TransferError> {
        self.endpoint
            .local_addr()
            .map_err(|e| TransferError::Io(e.to_string()))
    }
}

impl Drop for QuicListener {
    fn drop(&mut self) {
        self.endpoint
            .close(VarInt::from_u32(0), b"receiver stopping");
        self.task.abort();
    }
}

async fn serve_connection(conn: Connection, receiver: Arc<KvReceiver>) {
    let peer = conn.remote_address();
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let receiver = receiver.clone();
                tokio::spawn(async move {
                    // The outcome is reported to the waiter and the sender inside.
                    let _ = receiver.serve_stream(recv, send).await;
                });
            }
            Err(e) => {
                tracing::debug!(%peer, reason = %e, "KV transfer connection closed");
                return;
            }
        }
    }
}

/// A QUIC peer: its address and the name its certificate carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QuicPeer {
    pub addr: SocketAddr,
    pub server_name: String,
}

/// The sending side: one client endpoint, one connection per peer, reused.
pub struct QuicTransport {
    endpoint: Endpoint,
    connections: Mutex<HashMap<QuicPeer, Connection>>,
    metrics: Arc<TransferMetrics>,
}

impl std::fmt::Debug for QuicTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicTransport")
            .field("addr", &self.endpoint.local_addr().ok())
            .finish()
    }
}

impl QuicTransport {
    /// A client endpoint on `bind` (e.g. `0.0.0.0:0`) presenting `identity`.
    pub fn new(
        bind: SocketAddr,
        identity: &NodeIdentity,
        metrics: Arc<TransferMetrics>,
    ) -> Result<Self, TransferError> {
        let mut endpoint = endpoint(bind, None)?;
        endpoint.set_default_client_config(client_config(identity)?);
        Ok(Self {
            endpoint,
            connections: Mutex::new(HashMap::new()),
            metrics,
        })
    }
}

impl Drop for QuicTransport {
    fn drop(&mut self) {
        self.endpoint.close(VarInt::from_u32(0), b"sender stopping");
    }
}

impl Transport for QuicTransport {
    type Peer = QuicPeer;
    type Session = QuicSession;

    async fn connect(&self, peer: &QuicPeer) -> Result<QuicSession, TransferError> {
        let mut conns = self.connections.lock().await;
        if let Some(c) = conns.get(peer)
            && c.close_reason().is_none()
        {
            return Ok(QuicSession {
                conn: c.clone(),
                metrics: self.metrics.clone(),
            });
        }
        let fail = |reason: String| TransferError::Connect {
            peer: format!("{} ({})", peer.addr, peer.server_name),
            reason,
        };
        let conn = self
            .endpoint
            .connect(peer.addr, &peer.server_name)
            .map_err(|e| fail(e.to_string()))?
            .await
            .map_err(|e| fail(e.to_string()))?;
        conns.insert(peer.clone(), conn.clone());
        Ok(QuicSession {
            conn,
            metrics: self.metrics.clone(),
        })
    }
}

/// A connection to one peer; each transfer is a stream on it.
#[derive(Debug, Clone)]
pub struct QuicSession {
    conn: Connection,
    metrics: Arc<TransferMetrics>,
}

impl QuicSession {
    /// Path and congestion statistics of the connection (MTU, RTT, losses).
    pub fn stats(&self) -> quinn::ConnectionStats {
        self.conn.stats()
    }

    /// Closes the connection at once (transfers on it fail on both ends).
    pub fn close(&self) {
        self.conn.close(VarInt::from_u32(1), b"closed by sender");
    }
}

impl Session for QuicSession {
    type Writer = StreamWriter<SendStream, RecvStream>;

    async fn open(&self, desc: &TransferDescriptor) -> Result<Self::Writer, TransferError> {
        let (send, recv) =
            self.conn
                .open_bi()
                .await
                .map_err(|e| TransferError::PeerDisconnected {
                    transfer: desc.transfer_id,
                    received: 0,
                    expected: desc.pieces(),
                    reason: e.to_string(),
                })?;
        StreamWriter::open(send, recv, desc, self.metrics.clone()).await
    }
}
