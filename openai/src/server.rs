//! The axum router: endpoints, API keys, body limit, request slots.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;
use crate::generator::{Generator, TokenStream};
use crate::request::{Plan, find_model, plan_chat, plan_completion};
use crate::response::{Endpoint, collect, stream};
use crate::wire::{ModelList, ModelObject};

/// How the API behaves; the defaults need no configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ApiConfig {
    /// Accepted `Authorization: Bearer` keys; empty means none is required.
    pub api_keys: Vec<String>,
    /// Largest request body, in bytes (413 above).
    pub max_body_bytes: usize,
    /// Completion requests in flight at once (429 with `Retry-After` above).
    pub max_concurrent_requests: usize,
    /// Largest `n`.
    pub max_n: usize,
    /// Most choices of one request, prompts times `n`.
    pub max_choices: usize,
    /// The `Retry-After` of a 429, in seconds.
    pub retry_after_secs: u64,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            api_keys: Vec::new(),
            max_body_bytes: 4 << 20,
            max_concurrent_requests: 256,
            max_n: 16,
            max_choices: 64,
            retry_after_secs: 1,
        }
    }
}

impl ApiConfig {
    /// Checks the fields, naming the first bad one.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("max_body_bytes", self.max_body_bytes),
            ("max_concurrent_requests", self.max_concurrent_requests),
            ("max_n", self.max_n),
            ("max_choices", self.max_choices),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(format!("{field} must be positive"));
            }
        }
        if self.api_keys.iter().any(String::is_empty) {
            return Err("api_keys must not contain an empty key".into());
        }
        Ok(())
    }
}

/// What every handler shares.
pub(crate) struct Api<G> {
    pub generator: G,
    pub config: ApiConfig,
    /// One permit per completion request in flight, held until its answer is
    /// fully sent. A tower concurrency limit would free it when the response
    /// head goes out, which for a stream is long before the work ends.
    slots: Arc<Semaphore>,
    next_id: AtomicU64,
}

impl<G> Api<G> {
    fn response_id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        format!("{prefix}-{nanos:016x}{n:08x}")
    }
}

/// The OpenAI API over `generator`: `/v1/chat/completions`, `/v1/completions`,
/// `/v1/models`, and an unauthenticated `/health`.
pub fn router<G: Generator>(generator: G, config: ApiConfig) -> Router {
    let api = Arc::new(Api {
        generator,
        slots: Arc::new(Semaphore::new(config.max_concurrent_requests)),
        next_id: AtomicU64::new(0),
        config,
    });
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat_completions::<G>))
        .route("/v1/completions", post(completions::<G>))
        .route("/v1/models", get(list_models::<G>))
        .route("/v1/models/{*model}", get(get_model::<G>))
        .route_layer(middleware::from_fn_with_state(api.clone(), authorize::<G>));
    Router::new()
        .merge(v1)
        .route("/health", get(|| async { "ok" }))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async {
            let mut e = ApiError::invalid_request("method not allowed for this endpoint");
            e.status = StatusCode::METHOD_NOT_ALLOWED;
            e
        })
        .layer(DefaultBodyLimit::max(api.config.max_body_bytes))
        .with_state(api)
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains open requests.
/// Responses go out without Nagle delay, so streamed tokens leave at once.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn authorize<G: Generator>(
    State(api): State<Arc<Api<G>>>,
    request: Request,
    next: Next,
) -> Response {
    let keys = &api.config.api_keys;
    if keys.is_empty() {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        // The scheme is case-insensitive (RFC 9110).
        .and_then(|(scheme, key)| scheme.eq_ignore_ascii_case("bearer").then_some(key.trim()));
    match given {
        Some(key) if keys.iter().any(|k| same_key(k, key)) => next.run(request).await,
        Some(_) => ApiError::unauthorized("Incorrect API key provided").into_response(),
        None => ApiError::unauthorized(
            "You didn't provide an API key: send `Authorization: Bearer <key>`",
        )
        .into_response(),
    }
}

/// Compares keys without stopping at the first differing byte.
fn same_key(expected: &str, given: &str) -> bool {
    let (a, b) = (expected.as_bytes(), given.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads a JSON body, answering 413 past the limit and 400 for anything malformed.
fn parse_body<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::body_too_large(limit)
        } else {
            ApiError::invalid_request(format!("cannot read the request body: {}", r.body_text()))
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::invalid_request(format!(
            "We could not parse the JSON body of your request: {e}"
        ))
    })
}

async fn chat_completions<G: Generator>(
    State(api): State<Arc<Api<G>>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = async {
        let req: crate::wire::ChatCompletionRequest = parse_body(body, api.config.max_body_bytes)?;
        let model = find_model(&req.common.model, |m| api.generator.model(m))?;
        let plan = plan_chat(req, model, &api.config)?;
        answer(&api, plan, Endpoint::Chat).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions<G: Generator>(
    State(api): State<Arc<Api<G>>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = async {
        let req: crate::wire::CompletionRequest = parse_body(body, api.config.max_body_bytes)?;
        let model = find_model(&req.common.model, |m| api.generator.model(m))?;
        let plan = plan_completion(req, model, &api.config)?;
        answer(&api, plan, Endpoint::Completion).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// Takes a slot, starts every choice, and answers as a stream or one JSON object.
async fn answer<G: Generator>(
    api: &Api<G>,
    plan: Plan,
    endpoint: Endpoint,
) -> Result<Response, ApiError> {
    let permit = take_slot(api)?;
    let id = api.response_id(endpoint.id_prefix());
    tracing::debug!(
        %id,
        model = %plan.model.name,
        choices = plan.choices.len(),
        prompt_tokens = plan.prompt_tokens(),
        stream = plan.stream,
        "completion request"
    );
    let mut streams: Vec<TokenStream> = Vec::with_capacity(plan.choices.len());
    for choice in &plan.choices {
        // An error drops the streams already started, which cancels them.
        streams.push(api.generator.generate(choice.clone()).await?);
    }
    if plan.stream {
        Ok(stream(plan, endpoint, id, streams, permit))
    } else {
        let body = collect(&plan, endpoint, id, streams).await?;
        drop(permit);
        Ok(body)
    }
}

fn take_slot<G>(api: &Api<G>) -> Result<OwnedSemaphorePermit, ApiError> {
    api.slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::overloaded(api.config.retry_after_secs))
}

fn model_object(m: &crate::model::ServedModel) -> ModelObject {
    ModelObject {
        id: m.name.clone(),
        object: "model",
        created: m.created,
        owned_by: m.owned_by.clone(),
    }
}

async fn list_models<G: Generator>(State(api): State<Arc<Api<G>>>) -> Response {
    let data = api
        .generator
        .models()
        .iter()
        .map(|m| model_object(m))
        .collect();
    axum::Json(ModelList {
        object: "list",
        data,
    })
    .into_response()
}

async fn get_model<G: Generator>(
    State(api): State<Arc<Api<G>>>,
    Path(model): Path<String>,
) -> Response {
    match api.generator.model(&model) {
        Some(m) => axum::Json(model_object(&m)).into_response(),
        None => ApiError::model_not_found(&model).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_whole() {
        assert!(same_key("sk-abc", "sk-abc"));
        assert!(!same_key("sk-abc", "sk-abd"));
        assert!(!same_key("sk-abc", "sk-ab"));
    }

    #[test]
    fn config_validation_names_the_field() {
        assert!(ApiConfig::default().validate().is_ok());
        let bad = ApiConfig {
            max_n: 0,
            ..ApiConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("max_n"));
    }
}
