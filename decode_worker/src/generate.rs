//! The Generate call: get the prompt's KV (from a prefill worker, or by
//! prefilling locally), then stream the tokens the engine samples.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use tandem_engine::engine::{
    GeneratedToken, KvReservation, Request, RequestHandle, TokenEvent, Usage,
};
use tandem_engine::sampling::SamplingParams;
use tandem_kv_transfer::quic::QuicListener;
use tandem_kv_transfer::shm::{self, ShmListener};
use tandem_kv_transfer::{BlockSink, KvReceiver, TransferDescriptor, TransferError};
use tandem_prefill_worker::runtime::{
    EngineRequestGuard, GenerateStream, RoleEndpoints, RoleService, Worker, engine_status,
};
use tandem_protocol::grpc::worker::generate_response::Event;
use tandem_protocol::grpc::worker::worker_client::WorkerClient;
use tandem_protocol::grpc::worker::{
    Finished, GenerateRequest, GenerateResponse, KvEndpoint, PrefillRequest, PrefillTarget,
    Prefilled, Sampling, Token, TopLogprob,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::transport::Channel;
use tonic::{Code, Status};
use tracing::Instrument;

use crate::DecodeArgs;

/// Responses queued per Generate stream before the engine's output waits.
const STREAM_QUEUE: usize = 64;
/// Extra time the Prefill call gets past the transfer deadline (its answer
/// follows the transfer's end).
const CALL_GRACE: Duration = Duration::from_secs(1);

/// Why a requested remote prefill was done locally instead.
#[derive(Debug, thiserror::Error)]
enum Fallback {
    #[error("no room to receive the prompt's KV: {0}")]
    Reserve(String),
    #[error("prefill worker {worker} is unreachable: {reason}")]
    Unreachable { worker: String, reason: String },
    #[error("prefill worker {worker} failed: {reason}")]
    PrefillFailed { worker: String, reason: String },
    #[error("the KV transfer failed: {0}")]
    Transfer(String),
    #[error("the remote prefill missed its deadline of {0:?}")]
    Deadline(Duration),
    #[error("cannot start decoding from the received KV: {0}")]
    Submit(String),
}

impl Fallback {
    /// The metrics label.
    fn kind(&self) -> &'static str {
        match self {
            Self::Reserve(_) => "reserve",
            Self::Unreachable { .. } => "unreachable",
            Self::PrefillFailed { .. } => "prefill_failed",
            Self::Transfer(_) => "transfer",
            Self::Deadline(_) => "deadline",
            Self::Submit(_) => "submit",
        }
    }

    fn from_status(target: &PrefillTarget, s: Status) -> Self {
        let worker = target.worker_id.clone();
        let reason = format!("{:?}: {}", s.code(), s.message());
        // UNAVAILABLE: no connection, or the worker is draining.
        match s.code() {
            Code::Unavailable => Self::Unreachable { worker, reason },
            _ => Self::PrefillFailed { worker, reason },
        }
    }

    fn from_transfer(e: TransferError, deadline: Duration) -> Self {
        match e {
            TransferError::DeadlineExceeded { .. } => Self::Deadline(deadline),
            e => Self::Transfer(e.to_string()),
        }
    }
}

/// Reserved blocks as a transfer's sink, which the request can take back
/// (freeing them) while the transfer is still pending: a failed Prefill call
/// frees the blocks at once instead of at the transfer's deadline.
struct ReservationSink(Arc<tokio::sync::Mutex<Option<KvReservation>>>);

impl BlockSink for ReservationSink {
    fn write(
        &mut self,
        layer: usize,
        first_block: usize,
        data: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            let slot = self.0.lock().await;
            match slot.as_ref() {
                Some(r) => r
                    .write(layer, first_block, data)
                    .await
                    .map_err(|e| e.to_string()),
                None => Err("the request gave up on this transfer".into()),
            }
        })
    }
}

/// The decode role: a QUIC endpoint (and optionally a same-host socket)
/// receiving KV, clients of prefill workers.
#[derive(Clone)]
pub(crate) struct DecodeService {
    inner: Arc<Inner>,
}

struct Inner {
    worker: Arc<Worker>,
    receiver: Arc<KvReceiver>,
    /// Held for its lifetime: dropping it closes the KV endpoint.
    _listener: QuicListener,
    _shm_listener: Option<ShmListener>,
    endpoint: KvEndpoint,
    /// One channel per prefill worker address, reused.
    clients: Mutex<HashMap<String, WorkerClient<Channel>>>,
    deadline: Duration,
    echo: bool,
    next_transfer: AtomicU64,
}

impl DecodeService {
    /// Binds the KV endpoint and makes the role's service.
    pub(crate) async fn start(
        worker: Arc<Worker>,
        args: DecodeArgs,
    ) -> anyhow::Result<(Self, RoleEndpoints)> {
        anyhow::ensure!(
            args.transfer_deadline_ms > 0,
            "--transfer-deadline-ms must be positive"
        );
        let receiver = KvReceiver::new(worker.transfer_metrics.clone());
        let listener =
            QuicListener::bind(args.kv_addr, worker.tls.node_identity(), receiver.clone())
                .with_context(|| format!("binding the KV endpoint to {}", args.kv_addr))?;
        let kv_addr = listener.local_addr()?;
        let shm_listener = match &args.kv_socket {
            Some(path) => Some(
                ShmListener::bind(path, receiver.clone())
                    .with_context(|| format!("binding the KV socket {}", path.display()))?,
            ),
            None => None,
        };
        let endpoints = RoleEndpoints {
            kv_addr: Some(kv_addr),
        };
        let inner = Inner {
            endpoint: KvEndpoint {
                addr: worker.advertised(kv_addr),
                server_name: worker.tls_name.clone(),
                local_socket: args
                    .kv_socket
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                host: shm::host_id(),
            },
            worker,
            receiver,
            _listener: listener,
            _shm_listener: shm_listener,
            clients: Mutex::new(HashMap::new()),
            deadline: Duration::from_millis(args.transfer_deadline_ms.into()),
            echo: args.echo,
            next_transfer: AtomicU64::new(1),
        };
        Ok((
            Self {
                inner: Arc::new(inner),
            },
            endpoints,
        ))
    }
}

/// A Generate stream whose end, or drop (the client went away), cancels the
/// request's work: the engine sequence and any Prefill call in flight.
struct Cancelling {
    inner: ReceiverStream<Result<GenerateResponse, Status>>,
    _cancel: DropGuard,
}

impl Stream for Cancelling {
    type Item = Result<GenerateResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

impl RoleService for DecodeService {
    async fn generate(&self, req: GenerateRequest) -> Result<GenerateStream, Status> {
        let request = engine_request(&req)?;
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let cancel = CancellationToken::new();
        let guard = cancel.clone().drop_guard();
        let inner = self.inner.clone();
        let span = tracing::info_span!("generate", request = %req.request_id);
        if inner.echo {
            tokio::spawn(async move { inner.echo(req, tx).await }.instrument(span));
        } else {
            tokio::spawn(async move { inner.run(req, request, tx, cancel).await }.instrument(span));
        }
        Ok(Box::pin(Cancelling {
            inner: ReceiverStream::new(rx),
            _cancel: guard,
        }))
    }
}

/// Proto3 leaves unset fields at zero: 0 means "default" where zero is not a
/// valid value (top_p, repetition_penalty).
fn sampling_params(s: Option<&Sampling>) -> SamplingParams {
    let d = SamplingParams::default();
    let Some(s) = s else { return d };
    let or = |v: f32, default: f32| if v == 0.0 { default } else { v };
    SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k as usize,
        top_p: or(s.top_p, d.top_p),
        min_p: s.min_p,
        repetition_penalty: or(s.repetition_penalty, d.repetition_penalty),
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        penalty_window: d.penalty_window,
        seed: s.seed,
        logprobs: s.logprobs as usize,
    }
}

fn engine_request(req: &GenerateRequest) -> Result<Request, Status> {
    if req.prompt.is_empty() {
        return Err(Status::invalid_argument("the prompt is empty"));
    }
    if req.max_tokens == 0 {
        return Err(Status::invalid_argument("max_tokens must be at least 1"));
    }
    let sampling = sampling_params(req.sampling.as_ref());
    sampling
        .validate()
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let mut r = Request::new(req.prompt.clone(), req.max_tokens as usize);
    r.sampling = sampling;
    r.stop = req.stop.clone();
    r.stop_token_ids = req.stop_token_ids.clone();
    r.ignore_eos = req.ignore_eos;
    Ok(r)
}

fn event(e: Event) -> Result<GenerateResponse, Status> {
    Ok(GenerateResponse { event: Some(e) })
}

fn token_message(t: GeneratedToken) -> Token {
    Token {
        id: t.id,
        text: t.text,
        logprob: t.logprob,
        top: t
            .top
            .into_iter()
            .map(|(id, logprob)| TopLogprob { id, logprob })
            .collect(),
    }
}

fn finished_message(reason: &str, usage: Usage) -> Finished {
    let sat = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    Finished {
        reason: reason.to_owned(),
        prompt_tokens: sat(usage.prompt_tokens),
        completion_tokens: sat(usage.completion_tokens),
        cached_tokens: sat(usage.cached_tokens),
    }
}

impl Inner {
    /// Serves one Generate call into `tx` until it finishes or `cancel` fires.
    async fn run(
        self: Arc<Self>,
        req: GenerateRequest,
        request: Request,
        tx: mpsc::Sender<Result<GenerateResponse, Status>>,
        cancel: CancellationToken,
    ) {
        let arrived = Instant::now();
        let metrics = &self.worker.metrics;
        // Dropping `start` on cancel drops an in-flight Prefill call with it
        // (the prefill worker cancels its side) and frees the reserved blocks.
        let started = tokio::select! {
            () = cancel.cancelled() => return,
            s = self.start(&req, request) => s,
        };
        let (handle, prefilled) = match started {
            Ok(s) => s,
            Err(status) => {
                metrics.request_errors.fetch_add(1, Ordering::Relaxed);
                let _ = tx.send(Err(status)).await;
                return;
            }
        };
        let RequestHandle { id, mut events } = handle;
        let mut guard = EngineRequestGuard::new(self.worker.engine.clone(), id);
        if tx.send(event(Event::Prefilled(prefilled))).await.is_err() {
            return;
        }
        let mut last: Option<Instant> = None;
        loop {
            let ev = tokio::select! {
                () = cancel.cancelled() => return,
                ev = events.recv() => ev,
            };
            let msg = match ev {
                Some(TokenEvent::Token(t)) => {
                    let now = Instant::now();
                    match last {
                        None => metrics.ttft.observe(now - arrived),
                        Some(prev) => metrics.itl.observe(now - prev),
                    }
                    last = Some(now);
                    event(Event::Token(token_message(t)))
                }
                Some(TokenEvent::Finished { reason, usage }) => {
                    guard.disarm();
                    metrics.served(usage.prompt_tokens, usage.completion_tokens);
                    let _ = tx
                        .send(event(Event::Finished(finished_message(
                            reason.as_str(),
                            usage,
                        ))))
                        .await;
                    return;
                }
                None => {
                    metrics.request_errors.fetch_add(1, Ordering::Relaxed);
                    Err(engine_status(&self.worker.engine.stop_reason()))
                }
            };
            let end = msg.is_err();
            // A client that went away cancels the sequence (the guard).
            if tx.send(msg).await.is_err() || end {
                return;
            }
        }
    }

    /// Gets the prompt computed, remotely if asked and possible, and starts
    /// decoding.
    async fn start(
        &self,
        req: &GenerateRequest,
        request: Request,
    ) -> Result<(RequestHandle, Prefilled), Status> {
        let mut fallback_reason = String::new();
        if let Some(target) = &req.prefill
            && request.prompt.len() >= 2
        {
            match self.remote_prefill(req, target, request.clone()).await {
                Ok(Some((handle, bytes))) => {
                    self.worker
                        .metrics
                        .remote_prefills
                        .fetch_add(1, Ordering::Relaxed);
                    let prefilled = Prefilled {
                        mode: "remote".into(),
                        fallback_reason: String::new(),
                        transferred_bytes: bytes,
                    };
                    return Ok((handle, prefilled));
                }
                // Every block is cached here already: nothing to transfer.
                Ok(None) => {}
                Err(f) => {
                    tracing::warn!(
                        request = %req.request_id, prefill = %target.worker_id, reason = %f,
                        "remote prefill failed; prefilling locally"
                    );
                    self.worker.metrics.local_fallback(f.kind());
                    fallback_reason = f.to_string();
                }
            }
        }
        let handle = self
            .worker
            .engine
            .submit(request)
            .map_err(|e| engine_status(&e))?;
        let prefilled = Prefilled {
            mode: "local".into(),
            fallback_reason,
            transferred_bytes: 0,
        };
        Ok((handle, prefilled))
    }

    fn client(&self, url: &str) -> Result<WorkerClient<Channel>, String> {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = clients.get(url) {
            return Ok(c.clone());
        }
        let c = self
            .worker
            .tls
            .worker_client(url)
            .map_err(|e| format!("{e:#}"))?;
        clients.insert(url.to_owned(), c.clone());
        Ok(c)
    }

    /// Has `target` compute every prompt token but the last into blocks
    /// reserved here, then starts `request` from them. None when every block
    /// of that prefix is cached here already.
    async fn remote_prefill(
        &self,
        req: &GenerateRequest,
        target: &PrefillTarget,
        request: Request,
    ) -> Result<Option<(RequestHandle, u64)>, Fallback> {
        let engine = self.worker.engine.clone();
        let prefix = request.prompt[..request.prompt.len() - 1].to_vec();
        let reservation = tokio::task::spawn_blocking(move || engine.reserve_kv(prefix))
            .await
            .map_err(|e| Fallback::Reserve(e.to_string()))?
            .map_err(|e| Fallback::Reserve(e.to_string()))?;
        if reservation.cached_blocks >= reservation.blocks.len() {
            return Ok(None);
        }
        let id = self.next_transfer.fetch_add(1, Ordering::Relaxed);
        let desc = TransferDescriptor::for_reservation(id, id, &reservation);
        let tokens = reservation.tokens.clone();
        let slot = Arc::new(tokio::sync::Mutex::new(Some(reservation)));
        let descriptor_json =
            serde_json::to_string(&desc).map_err(|e| Fallback::Transfer(e.to_string()))?;
        let pending = self
            .receiver
            .expect(desc, ReservationSink(slot.clone()), self.deadline)
            .map_err(|e| Fallback::Transfer(e.to_string()))?;
        let mut client =
            self.client(&target.grpc_addr)
                .map_err(|reason| Fallback::Unreachable {
                    worker: target.worker_id.clone(),
                    reason,
                })?;
        let call = PrefillRequest {
            request_id: req.request_id.clone(),
            tokens,
            descriptor_json,
            endpoint: Some(self.endpoint.clone()),
            deadline_ms: u32::try_from(self.deadline.as_millis()).unwrap_or(u32::MAX),
        };
        let deadline = self.deadline;
        // Whichever of the call and the transfer fails first decides.
        let both = async {
            let rpc = client.prefill(call);
            let landed = pending.wait();
            tokio::pin!(rpc, landed);
            let (mut sent, mut received) = (None, None);
            while sent.is_none() || received.is_none() {
                tokio::select! {
                    r = &mut rpc, if sent.is_none() => {
                        sent = Some(r.map_err(|s| Fallback::from_status(target, s))?.into_inner());
                    }
                    r = &mut landed, if received.is_none() => {
                        received = Some(r.map_err(|e| Fallback::from_transfer(e, deadline))?);
                    }
                }
            }
            match (sent, received) {
                (Some(s), Some(r)) => Ok((s, r)),
                _ => Err(Fallback::Transfer(
                    "the transfer ended without a verdict".into(),
                )),
            }
        };
        let outcome = match tokio::time::timeout(deadline + CALL_GRACE, both).await {
            Ok(r) => r,
            Err(_) => Err(Fallback::Deadline(deadline)),
        };
        let (response, (sink, report)) = match outcome {
            Ok(x) => x,
            Err(f) => {
                // Free the blocks now rather than at the transfer's deadline.
                drop(slot.lock().await.take());
                return Err(f);
            }
        };
        if response.checksum != report.checksum {
            return Err(Fallback::Transfer(format!(
                "the prefill worker sent checksum {:#x}, {:#x} landed",
                response.checksum, report.checksum
            )));
        }
        let reservation = sink.0.lock().await.take().ok_or_else(|| {
            Fallback::Transfer("the reserved blocks were released before use".into())
        })?;
        let engine = self.worker.engine.clone();
        let handle =
            tokio::task::spawn_blocking(move || engine.submit_reserved(reservation, request))
                .await
                .map_err(|e| Fallback::Submit(e.to_string()))?
                .map_err(|e| Fallback::Submit(e.to_string()))?;
        tracing::debug!(
            request = %req.request_id, bytes = report.bytes, blocks = report.blocks,
            prefill_cached = response.cached_tokens, "prompt KV received"
        );
        Ok(Some((handle, report.bytes)))
    }

    /// `--echo`: answers at once with `max_tokens` copies of the last prompt
    /// token, without running the model.
    async fn echo(&self, req: GenerateRequest, tx: mpsc::Sender<Result<GenerateResponse, Status>>) {
        let arrived = Instant::now();
        let metrics = &self.worker.metrics;
        let Some(&id) = req.prompt.last() else {
            return;
        };
        let text = self.worker.engine.tokenizer().decode(&[id]);
        let prefilled = Prefilled {
            mode: "local".into(),
            fallback_reason: String::new(),
            transferred_bytes: 0,
        };
        if tx.send(event(Event::Prefilled(prefilled))).await.is_err() {
            return;
        }
        let mut last = arrived;
        for i in 0..req.max_tokens {
            let now = Instant::now();
            if i == 0 {
                metrics.ttft.observe(now - arrived);
            } else {
                metrics.itl.observe(now - last);
            }
            last = now;
            let token = Token {
                id,
                text: text.clone(),
                logprob: 0.0,
                top: Vec::new(),
            };
            if tx.send(event(Event::Token(token))).await.is_err() {
                return;
            }
        }
        let usage = Usage {
            prompt_tokens: req.prompt.len(),
            completion_tokens: req.max_tokens as usize,
            cached_tokens: 0,
        };
        metrics.served(usage.prompt_tokens, usage.completion_tokens);
        let _ = tx
            .send(event(Event::Finished(finished_message("length", usage))))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_sampling_fields_mean_the_defaults() {
        let p = sampling_params(Some(&Sampling::default()));
        assert_eq!(p, SamplingParams::default());
        assert!(p.validate().is_ok());
        let s = Sampling {
            temperature: 0.7,
            top_p: 0.9,
            seed: Some(3),
            logprobs: 2,
            ..Sampling::default()
        };
        let p = sampling_params(Some(&s));
        assert_eq!(
            (p.temperature, p.top_p, p.seed, p.logprobs),
            (0.7, 0.9, Some(3), 2)
        );
    }

    #[test]
    fn bad_requests_are_refused_before_any_work() {
        let mut req = GenerateRequest {
            prompt: vec![1, 2, 3],
            max_tokens: 4,
            ..GenerateRequest::default()
        };
        assert!(engine_request(&req).is_ok());
        req.max_tokens = 0;
        assert_eq!(
            engine_request(&req).err().map(|s| s.code()),
            Some(Code::InvalidArgument)
        );
        req.max_tokens = 4;
        req.sampling = Some(Sampling {
            temperature: 9.0,
            ..Sampling::default()
        });
        let e = engine_request(&req).err().map(|s| s.message().to_owned());
        assert!(e.is_some_and(|m| m.contains("temperature")));
    }
}
