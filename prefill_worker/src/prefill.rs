//! The Prefill call: compute the tokens' KV and stream it into the caller's
//! reserved blocks.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tandem_engine::engine::{Engine, KvChunk, KvStream, Request, TokenEvent, Usage};
use tandem_kv_transfer::quic::{QuicPeer, QuicSession, QuicTransport};
use tandem_kv_transfer::shm::{self, ShmTransport, ShmWriter};
use tandem_kv_transfer::{
    Session, TransferDescriptor, TransferError, TransferReport, Transport, send_kv_stream,
};
use tandem_protocol::grpc::worker::{KvEndpoint, PrefillRequest, PrefillResponse};
use tokio::sync::mpsc;
use tonic::Status;

use crate::runtime::{EngineRequestGuard, RoleService, Worker, engine_status};

/// The transfer deadline when the caller gives none.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(60);

/// The prefill role: one QUIC client endpoint, one connection per decode
/// worker; shared-memory lanes to decode workers on this host.
pub(crate) struct PrefillService {
    worker: Arc<Worker>,
    transport: QuicTransport,
    shm: ShmTransport,
    host: String,
}

impl PrefillService {
    pub(crate) fn new(worker: Arc<Worker>) -> anyhow::Result<Self> {
        let transport = QuicTransport::new(
            SocketAddr::from(([0, 0, 0, 0], 0)),
            worker.tls.node_identity(),
            worker.transfer_metrics.clone(),
        )
        .context("starting the KV transfer client")?;
        Ok(Self {
            shm: ShmTransport::new(worker.transfer_metrics.clone()),
            host: shm::host_id(),
            worker,
            transport,
        })
    }

    /// A writer into `desc`'s blocks: through shared memory when the decode
    /// worker is on this host and offers it, else over QUIC. A same-host path
    /// that cannot be reached (another mount namespace, say) falls back.
    async fn open(
        &self,
        endpoint: &KvEndpoint,
        desc: &TransferDescriptor,
    ) -> Result<Writer, TransferError> {
        if !endpoint.local_socket.is_empty() && endpoint.host == self.host {
            let socket = Path::new(&endpoint.local_socket);
            let opened = async { self.shm.connect(socket).await?.open(desc).await }.await;
            match opened {
                Ok(w) => return Ok(Writer::Shm(w)),
                Err(e @ TransferError::Connect { .. }) => {
                    tracing::warn!(error = %e, "same-host KV path unavailable, using QUIC");
                }
                Err(e) => return Err(e),
            }
        }
        let peer = QuicPeer {
            addr: resolve(&endpoint.addr).await?,
            server_name: endpoint.server_name.clone(),
        };
        let session = self.transport.connect(&peer).await?;
        Ok(Writer::Quic(session.open(desc).await?))
    }
}

/// The writer of one transfer, on whichever path it took.
enum Writer {
    Quic(<QuicSession as Session>::Writer),
    Shm(ShmWriter),
}

impl Writer {
    async fn send(
        self,
        chunks: mpsc::UnboundedReceiver<KvChunk>,
    ) -> Result<TransferReport, TransferError> {
        match self {
            Writer::Quic(w) => send_kv_stream(w, chunks).await,
            Writer::Shm(w) => send_kv_stream(w, chunks).await,
        }
    }
}

fn transfer_status(e: TransferError) -> Status {
    match e {
        TransferError::Connect { .. } => Status::unavailable(e.to_string()),
        TransferError::DeadlineExceeded { .. } => Status::deadline_exceeded(e.to_string()),
        _ => Status::aborted(e.to_string()),
    }
}

async fn resolve(addr: &str) -> Result<SocketAddr, TransferError> {
    let bad = |reason: String| TransferError::Connect {
        peer: addr.to_string(),
        reason,
    };
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| bad(e.to_string()))?
        .next()
        .ok_or_else(|| bad("resolves to no address".into()))
}

/// Waits for the end of the (one-token) request and returns its usage.
async fn usage(
    engine: &Engine,
    mut events: mpsc::UnboundedReceiver<TokenEvent>,
) -> Result<Usage, Status> {
    while let Some(ev) = events.recv().await {
        if let TokenEvent::Finished { usage, .. } = ev {
            return Ok(usage);
        }
    }
    Err(engine_status(&engine.stop_reason()))
}

impl RoleService for PrefillService {
    async fn prefill(&self, req: PrefillRequest) -> Result<PrefillResponse, Status> {
        let engine = &self.worker.engine;
        let desc: TransferDescriptor = serde_json::from_str(&req.descriptor_json)
            .map_err(|e| Status::invalid_argument(format!("descriptor_json: {e}")))?;
        if desc.layout != engine.kv_layout() {
            return Err(Status::failed_precondition(format!(
                "the receiver's KV layout {:?} differs from this worker's {:?} (another model?)",
                desc.layout,
                engine.kv_layout()
            )));
        }
        if desc.tokens != req.tokens.len() {
            return Err(Status::invalid_argument(format!(
                "the descriptor covers {} tokens, the request has {}",
                desc.tokens,
                req.tokens.len()
            )));
        }
        let endpoint = req
            .endpoint
            .ok_or_else(|| Status::invalid_argument("the KV endpoint is missing"))?;
        let deadline = match req.deadline_ms {
            0 => DEFAULT_DEADLINE,
            ms => Duration::from_millis(ms.into()),
        };
        let prompt_tokens = req.tokens.len();
        let work = async {
            let writer = self.open(&endpoint, &desc).await.map_err(transfer_status)?;
            let (tx, rx) = mpsc::unbounded_channel();
            let mut request = Request::new(req.tokens, 1);
            request.kv_stream = Some(KvStream {
                skip_blocks: desc.first_block,
                tx,
            });
            let handle = engine.submit(request).map_err(|e| engine_status(&e))?;
            // The caller going away (the Prefill call dropped) cancels the prefill.
            let mut guard = EngineRequestGuard::new(engine.clone(), handle.id);
            let report = writer.send(rx).await.map_err(transfer_status)?;
            let usage = usage(engine, handle.events).await?;
            guard.disarm();
            Ok::<_, Status>(PrefillResponse {
                bytes: report.bytes,
                pieces: report.pieces as u64,
                checksum: report.checksum,
                cached_tokens: usage.cached_tokens as u32,
            })
        };
        let response = tokio::time::timeout(deadline, work)
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "prefill and transfer of request {} took over {deadline:?}",
                    req.request_id
                ))
            })?
            .inspect_err(|e| {
                tracing::warn!(request = %req.request_id, error = %e, "prefill failed");
            })?;
        self.worker.metrics.served(prompt_tokens, 0);
        tracing::debug!(
            request = %req.request_id, bytes = response.bytes, cached = response.cached_tokens,
            "prefill sent"
        );
        Ok(response)
    }
}
