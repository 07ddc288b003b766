//! [`Generator`] over the cluster: each generation is routed to a decode worker
//! (and maybe a prefill worker), its `Generate` stream becomes the API's token
//! stream, and failures before the first token are retried elsewhere.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::http::StatusCode;
use futures_util::stream;
use tandem_openai::{
    ApiError, FinishReason, GenerateRequest, GeneratedToken, Generator, ServedModel, TokenEvent,
    TokenStream, Usage,
};
use tandem_protocol::grpc::worker::generate_response::Event;
use tandem_protocol::grpc::worker::{self as pb, GenerateResponse};
use tonic::{Code, Status, Streaming};
use tracing::Instrument;

use super::cluster::{Cluster, PlaceError, Placement};
use super::metrics::Outcome;
use crate::index::WorkerId;
use crate::kv_router::RequestId;

/// Routes generations to the cluster's workers.
#[derive(Clone)]
pub(crate) struct ClusterGenerator {
    cluster: Arc<Cluster>,
    retries: usize,
}

impl ClusterGenerator {
    pub(crate) fn new(cluster: Arc<Cluster>, retries: usize) -> Self {
        Self { cluster, retries }
    }
}

/// Keeps an attempt counted against its workers until it is dropped.
struct Routed {
    cluster: Arc<Cluster>,
    request: RequestId,
}

impl Drop for Routed {
    fn drop(&mut self) {
        self.cluster.finished(self.request);
    }
}

/// One request's life after routing, for the metrics.
struct Timing {
    cluster: Arc<Cluster>,
    start: Instant,
    outcome: Option<Outcome>,
}

impl Drop for Timing {
    fn drop(&mut self) {
        let outcome = self.outcome.unwrap_or(Outcome::Cancelled);
        let m = &self.cluster.metrics;
        m.outcome(outcome);
        if outcome == Outcome::Ok {
            m.e2e.observe(self.start.elapsed());
        }
    }
}

/// How an attempt failed.
enum Failure {
    /// Another decode worker may do better.
    Retry(ApiError),
    /// The request itself is at fault: answer it as is.
    Fatal(ApiError),
}

fn bad_gateway(message: impl Into<String>) -> ApiError {
    let mut e = ApiError::unavailable(message);
    e.status = StatusCode::BAD_GATEWAY;
    e
}

/// What a worker's gRPC error means for the request.
fn classify(worker: &str, status: &Status) -> Failure {
    let msg = format!("decode worker {worker}: {}", status.message());
    match status.code() {
        Code::InvalidArgument | Code::OutOfRange => {
            if status.message().contains("context") || status.code() == Code::OutOfRange {
                Failure::Fatal(ApiError::context_length_exceeded("messages", msg))
            } else {
                Failure::Fatal(ApiError::invalid_request(msg))
            }
        }
        Code::ResourceExhausted => {
            let mut e = ApiError::overloaded(1);
            e.message = msg;
            Failure::Retry(e)
        }
        _ => Failure::Retry(ApiError::unavailable(msg)),
    }
}

fn finish_reason(reason: &str) -> FinishReason {
    match reason {
        "length" => FinishReason::Length,
        "cancelled" => FinishReason::Cancelled,
        "stop" => FinishReason::Stop,
        other => {
            tracing::warn!(
                reason = other,
                "unknown finish reason from a worker; reading it as stop"
            );
            FinishReason::Stop
        }
    }
}

fn to_event(event: Event) -> Option<TokenEvent> {
    match event {
        Event::Token(t) => Some(TokenEvent::Token(GeneratedToken {
            id: t.id,
            text: t.text,
            logprob: t.logprob,
            top: t.top.into_iter().map(|a| (a.id, a.logprob)).collect(),
        })),
        Event::Finished(f) => Some(TokenEvent::Finished {
            reason: finish_reason(&f.reason),
            usage: Usage {
                prompt_tokens: f.prompt_tokens as usize,
                completion_tokens: f.completion_tokens as usize,
                cached_tokens: f.cached_tokens as usize,
            },
        }),
        Event::Prefilled(_) => None,
    }
}

fn wire_request(
    request: &GenerateRequest,
    id: RequestId,
    placement: &Placement,
) -> pb::GenerateRequest {
    let s = &request.sampling;
    pb::GenerateRequest {
        request_id: format!("req-{id}"),
        prompt: request.prompt.clone(),
        sampling: Some(pb::Sampling {
            temperature: s.temperature,
            top_k: u32::try_from(s.top_k).unwrap_or(u32::MAX),
            top_p: s.top_p,
            min_p: s.min_p,
            repetition_penalty: s.repetition_penalty,
            presence_penalty: s.presence_penalty,
            frequency_penalty: s.frequency_penalty,
            seed: s.seed,
            logprobs: u32::try_from(s.logprobs).unwrap_or(u32::MAX),
        }),
        max_tokens: u32::try_from(request.max_tokens).unwrap_or(u32::MAX),
        stop: request.stop.clone(),
        stop_token_ids: request.stop_token_ids.clone(),
        ignore_eos: request.ignore_eos,
        prefill: placement.prefill.clone(),
    }
}

/// A started generation: the worker's stream, positioned after its first event.
struct Started {
    events: Streaming<GenerateResponse>,
    first: TokenEvent,
    routed: Routed,
}

impl ClusterGenerator {
    /// One attempt on one decode worker, up to its first token (or its finish).
    async fn attempt(
        &self,
        request: &GenerateRequest,
        placement: Placement,
    ) -> Result<Started, (WorkerId, Failure)> {
        let routed = Routed {
            cluster: self.cluster.clone(),
            request: placement.request,
        };
        let metrics = &self.cluster.metrics;
        if placement.prefill.is_some() {
            metrics.routed_remote.fetch_add(1, Ordering::Relaxed);
        } else {
            metrics.routed_local.fetch_add(1, Ordering::Relaxed);
        }
        metrics
            .predicted_cached_tokens
            .fetch_add(placement.cached_tokens as u64, Ordering::Relaxed);
        tracing::debug!(
            request = placement.request,
            decode = %placement.decode_name,
            prefill = placement.prefill.as_ref().map_or("", |p| p.worker_id.as_str()),
            cached_tokens = placement.cached_tokens,
            "routed"
        );
        let worker = placement.decode;
        let name = placement.decode_name.clone();
        let wire = wire_request(request, placement.request, &placement);
        let mut client = placement.client;
        let mut events = match client.generate(wire).await {
            Ok(r) => r.into_inner(),
            Err(status) => {
                if status.code() == Code::Unavailable {
                    self.cluster.suspect(worker);
                }
                return Err((worker, classify(&name, &status)));
            }
        };
        loop {
            match events.message().await {
                Ok(Some(GenerateResponse { event: Some(event) })) => {
                    if let Event::Prefilled(p) = &event {
                        if !p.fallback_reason.is_empty() {
                            metrics.prefill_fallbacks.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(worker = %name, reason = %p.fallback_reason, "remote prefill fell back to local");
                        }
                        continue;
                    }
                    if let Some(first) = to_event(event) {
                        return Ok(Started {
                            events,
                            first,
                            routed,
                        });
                    }
                }
                Ok(Some(GenerateResponse { event: None })) => {}
                Ok(None) => {
                    let e = ApiError::unavailable(format!(
                        "decode worker {name} ended the generation before its first token"
                    ));
                    return Err((worker, Failure::Retry(e)));
                }
                Err(status) => {
                    if status.code() == Code::Unavailable {
                        self.cluster.suspect(worker);
                    }
                    return Err((worker, classify(&name, &status)));
                }
            }
        }
    }
}

impl Generator for ClusterGenerator {
    fn models(&self) -> Vec<Arc<ServedModel>> {
        self.cluster.served_models()
    }

    /// Every model the router can tokenize for, served now or not: a request for
    /// a model whose workers are all gone is answered 503, not 404.
    fn model(&self, name: &str) -> Option<Arc<ServedModel>> {
        self.cluster.model(name).map(|m| m.served.clone())
    }

    async fn generate(&self, request: GenerateRequest) -> Result<TokenStream, ApiError> {
        let span = tracing::debug_span!(
            "generate",
            model = %request.model,
            prompt_tokens = request.prompt.len(),
            max_tokens = request.max_tokens,
        );
        self.start(request).instrument(span).await
    }
}

impl ClusterGenerator {
    /// Routes a generation and waits for its first token, retrying elsewhere
    /// while none has come.
    async fn start(&self, request: GenerateRequest) -> Result<TokenStream, ApiError> {
        let start = Instant::now();
        let mut timing = Timing {
            cluster: self.cluster.clone(),
            start,
            outcome: None,
        };
        let Some(model) = self.cluster.model(&request.model) else {
            timing.outcome = Some(Outcome::Rejected);
            return Err(ApiError::model_not_found(&request.model));
        };
        let block_size = model.hasher.block_size();
        let hashes = model.hasher.hash_prefix(&request.prompt);
        let mut tried: Vec<WorkerId> = Vec::new();
        let mut last_error = None;
        let started = loop {
            let placement = match self.cluster.place(
                &request.model,
                request.prompt.len(),
                &hashes,
                block_size,
                &tried,
            ) {
                Ok(p) => p,
                Err(e) => {
                    timing.outcome = Some(Outcome::Unavailable);
                    return Err(match (e, last_error) {
                        (_, Some(last)) => last,
                        (PlaceError::UnknownModel(m), None) => ApiError::model_not_found(&m),
                        (e @ PlaceError::NoDecodeWorker(_), None) => {
                            let mut err = ApiError::unavailable(format!("{e}; try again later"));
                            err.retry_after = Some(1);
                            err
                        }
                    });
                }
            };
            match self.attempt(&request, placement).await {
                Ok(s) => break s,
                Err((worker, Failure::Fatal(e))) => {
                    tracing::debug!(worker, error = %e, "worker rejected the request");
                    timing.outcome = Some(Outcome::Rejected);
                    return Err(e);
                }
                Err((worker, Failure::Retry(e))) => {
                    tried.push(worker);
                    if tried.len() > self.retries {
                        tracing::warn!(error = %e, attempts = tried.len(), "generation failed on every attempt");
                        timing.outcome = Some(Outcome::Unavailable);
                        return Err(e);
                    }
                    tracing::info!(error = %e, "retrying on another decode worker");
                    self.cluster.metrics.retries.fetch_add(1, Ordering::Relaxed);
                    last_error = Some(e);
                }
            }
        };
        let Started {
            events,
            first,
            routed,
        } = started;
        self.cluster.first_token(routed.request);
        self.cluster.metrics.ttft.observe(start.elapsed());
        Ok(Box::pin(live_stream(
            self.cluster.clone(),
            events,
            first,
            routed,
            timing,
        )))
    }
}

/// What the token stream owns: dropping it drops the gRPC stream (which cancels
/// the worker's work) and the routing accounting.
struct Live {
    cluster: Arc<Cluster>,
    events: Streaming<GenerateResponse>,
    pending: Option<TokenEvent>,
    done: bool,
    last_token: Option<Instant>,
    /// Held for its `Drop`: the request stops loading its workers with the stream.
    _routed: Routed,
    timing: Timing,
}

impl Live {
    fn account(&mut self, event: &TokenEvent) {
        let m = &self.cluster.metrics;
        match event {
            TokenEvent::Token(_) => {
                let now = Instant::now();
                if let Some(last) = self.last_token {
                    m.itl.observe(now - last);
                }
                self.last_token = Some(now);
                m.generated_tokens.fetch_add(1, Ordering::Relaxed);
            }
            TokenEvent::Finished { reason, usage } => {
                self.done = true;
                m.prompt_tokens
                    .fetch_add(usage.prompt_tokens as u64, Ordering::Relaxed);
                m.cached_tokens
                    .fetch_add(usage.cached_tokens as u64, Ordering::Relaxed);
                self.timing.outcome = Some(match reason {
                    FinishReason::Cancelled => Outcome::Cancelled,
                    _ => Outcome::Ok,
                });
            }
        }
    }
}

fn live_stream(
    cluster: Arc<Cluster>,
    events: Streaming<GenerateResponse>,
    first: TokenEvent,
    routed: Routed,
    timing: Timing,
) -> impl futures_util::Stream<Item = Result<TokenEvent, ApiError>> + Send {
    let live = Live {
        cluster,
        events,
        pending: Some(first),
        done: false,
        last_token: None,
        _routed: routed,
        timing,
    };
    stream::unfold(live, |mut live| async move {
        if live.done {
            return None;
        }
        if let Some(first) = live.pending.take() {
            live.account(&first);
            return Some((Ok(first), live));
        }
        loop {
            match live.events.message().await {
                Ok(Some(GenerateResponse { event: Some(event) })) => {
                    if let Some(event) = to_event(event) {
                        live.account(&event);
                        return Some((Ok(event), live));
                    }
                }
                Ok(Some(GenerateResponse { event: None })) => {}
                Ok(None) => {
                    live.done = true;
                    live.timing.outcome = Some(Outcome::Failed);
                    let e = bad_gateway(
                        "the decode worker ended the stream before the generation finished",
                    );
                    return Some((Err(e), live));
                }
                Err(status) => {
                    live.done = true;
                    live.timing.outcome = Some(Outcome::Failed);
                    let e = bad_gateway(format!(
                        "the decode worker failed mid-generation: {}",
                        status.message()
                    ));
                    return Some((Err(e), live));
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_errors_map_to_api_errors() {
        let bad = classify("d0", &Status::invalid_argument("temperature out of range"));
        assert!(matches!(bad, Failure::Fatal(e) if e.status == StatusCode::BAD_REQUEST));
        let long = classify("d0", &Status::out_of_range("prompt too long"));
        assert!(matches!(long, Failure::Fatal(e) if e.code == Some("context_length_exceeded")));
        let full = classify("d0", &Status::resource_exhausted("queue full"));
        assert!(matches!(full, Failure::Retry(e) if e.status == StatusCode::TOO_MANY_REQUESTS));
        let down = classify("d0", &Status::unavailable("connection refused"));
        assert!(
            matches!(down, Failure::Retry(e) if e.status == StatusCode::SERVICE_UNAVAILABLE && e.message.contains("d0"))
        );
        assert_eq!(finish_reason("length"), FinishReason::Length);
        assert_eq!(finish_reason("cancelled"), FinishReason::Cancelled);
        assert_eq!(finish_reason("eos?"), FinishReason::Stop);
    }
}
