//! The one `Worker` gRPC service: admission and drain for Generate and
//! Prefill (whose work the role does), and the KV events, snapshots and load
//! every worker serves.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use tandem_protocol::grpc::worker::worker_server::{Worker as WorkerRpc, WorkerServer};
use tandem_protocol::grpc::worker::{
    DrainRequest, DrainResponse, GenerateRequest, GenerateResponse, KvEventMessage,
    KvEventsRequest, KvSnapshotRequest, KvSnapshotResponse, LoadRequest, LoadResponse,
    PrefillRequest, PrefillResponse,
};
use tokio::net::TcpListener;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::{GenerateStream, InFlight, RoleService, Worker, engine_status};

/// KV events queued per subscriber before the sender waits.
const KV_EVENT_QUEUE: usize = 256;

struct Service<R> {
    worker: Arc<Worker>,
    role: R,
}

/// Serves the `Worker` service over mTLS on `listener` until `stop`.
pub(super) async fn serve_grpc<R: RoleService>(
    worker: Arc<Worker>,
    role: R,
    listener: TcpListener,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let tls = worker.tls.server_config();
    tonic::transport::Server::builder()
        .tls_config(tls)?
        .tcp_nodelay(true)
        .add_service(WorkerServer::new(Service { worker, role }))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop.cancelled_owned())
        .await?;
    Ok(())
}

/// A Generate stream that counts as in flight until it ends or is dropped.
struct Admitted {
    inner: GenerateStream,
    _in_flight: InFlight,
}

impl Stream for Admitted {
    type Item = Result<GenerateResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

type KvEventStream = ReceiverStream<Result<KvEventMessage, Status>>;

#[tonic::async_trait]
impl<R: RoleService> WorkerRpc for Service<R> {
    type GenerateStream = GenerateStream;
    type KvEventsStream = KvEventStream;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateStream>, Status> {
        let admitted = self.worker.admit()?;
        let stream = self
            .role
            .generate(request.into_inner())
            .await
            .inspect_err(|_| {
                self.worker
                    .metrics
                    .request_errors
                    .fetch_add(1, Ordering::Relaxed);
            })?;
        Ok(Response::new(Box::pin(Admitted {
            inner: stream,
            _in_flight: admitted,
        })))
    }

    async fn prefill(
        &self,
        request: Request<PrefillRequest>,
    ) -> Result<Response<PrefillResponse>, Status> {
        let _admitted = self.worker.admit()?;
        let r = self.role.prefill(request.into_inner()).await;
        if r.is_err() {
            self.worker
                .metrics
                .request_errors
                .fetch_add(1, Ordering::Relaxed);
        }
        r.map(Response::new)
    }

    async fn kv_events(
        &self,
        _request: Request<KvEventsRequest>,
    ) -> Result<Response<KvEventStream>, Status> {
        let mut events = self.worker.engine.subscribe_kv_events();
        let (tx, rx) = mpsc::channel(KV_EVENT_QUEUE);
        let worker = self.worker.clone();
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    () = worker.stopping() => return,
                    () = tx.closed() => return,
                    ev = events.recv() => ev,
                };
                match ev {
                    Ok(ev) => {
                        if tx.send(Ok(KvEventMessage::from(&ev))).await.is_err() {
                            return;
                        }
                    }
                    // Skip ahead: the subscriber sees the gap in `seq` and
                    // resynchronizes from a snapshot.
                    Err(RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "a KV event subscriber lagged; events skipped");
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn kv_snapshot(
        &self,
        _request: Request<KvSnapshotRequest>,
    ) -> Result<Response<KvSnapshotResponse>, Status> {
        let engine = self.worker.engine.clone();
        let (next_seq, hashes) = tokio::task::spawn_blocking(move || engine.kv_snapshot())
            .await
            .map_err(|e| Status::internal(format!("snapshot task: {e}")))?
            .map_err(|e| engine_status(&e))?;
        Ok(Response::new(KvSnapshotResponse {
            next_seq,
            hashes: tandem_protocol::grpc::raw(&hashes),
        }))
    }

    async fn drain(
        &self,
        _request: Request<DrainRequest>,
    ) -> Result<Response<DrainResponse>, Status> {
        let in_flight = u32::try_from(self.worker.in_flight()).unwrap_or(u32::MAX);
        self.worker.request_drain();
        Ok(Response::new(DrainResponse { in_flight }))
    }

    async fn load(&self, _request: Request<LoadRequest>) -> Result<Response<LoadResponse>, Status> {
        let w = &self.worker;
        let l = w.engine.load_report();
        let sat = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Ok(Response::new(LoadResponse {
            running: sat(l.running),
            waiting: sat(l.waiting),
            pending_prefill_tokens: l.pending_prefill_tokens as u64,
            kv_blocks_used: sat(l.kv_blocks_used),
            kv_blocks_total: sat(l.kv_blocks_total),
            kv_hit_rate: l.kv_hit_rate,
            state: w.state().as_str().to_owned(),
            ttft_ms: w.metrics.ttft.recent_p50_ms(),
            itl_ms: w.metrics.itl.recent_p50_ms(),
        }))
    }
}
