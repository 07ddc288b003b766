//! The router's own endpoints beside the OpenAI API: `/health`, `/metrics`, and
//! the admin API (`/admin/...`, behind the admin token).

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tandem_openai::ApiError;

use super::cluster::Cluster;

#[derive(Clone)]
struct AppState {
    cluster: Arc<Cluster>,
    admin_token: Option<Arc<str>>,
}

/// `/health`, `/metrics` and the admin API, with every other path handed to `api`.
pub(crate) fn app(cluster: Arc<Cluster>, admin_token: Option<String>, api: Router) -> Router {
    let state = AppState {
        cluster,
        admin_token: admin_token.map(Arc::from),
    };
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/dashboard", get(dashboard))
        .route("/admin/workers", get(admin_workers))
        .route("/admin/workers/{id}/drain", post(admin_drain))
        .with_state(state)
        .fallback_service(api)
}

/// The operator's page, one self-contained file (no external scripts or
/// styles): cluster status, request rate, TTFT/ITL percentiles and hit rate over
/// time (from `/metrics`), workers by role with load, desired vs running
/// replicas with scale controls, SLA targets and the planner's decisions (from
/// the admin API, with the token the operator gives the page).
async fn dashboard() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // A new build's page, not a cached one.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("dashboard.html"),
    )
        .into_response()
}

/// Checks a request against the admin token (`None`: the admin API is off):
/// `Some` is the refusal to send. Every admin route goes through it.
pub(crate) fn admin_refusal(token: Option<&str>, headers: &HeaderMap) -> Option<Response> {
    let Some(token) = token else {
        let mut r = ApiError::not_found(
            "the admin API is off: start the router with --admin-token (or TANDEM_ADMIN_TOKEN)",
        )
        .into_response();
        *r.status_mut() = StatusCode::FORBIDDEN;
        return Some(r);
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), token.as_bytes()) => None,
        Some(_) => Some(ApiError::unauthorized("wrong admin token").into_response()),
        None => Some(
            ApiError::unauthorized("the admin API needs `Authorization: Bearer <admin token>`")
                .into_response(),
        ),
    }
}

/// Compares without stopping at the first difference.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `GET /admin/workers`: every worker the router knows, with state and load.
async fn admin_workers(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(r) = admin_refusal(state.admin_token.as_deref(), &headers) {
        return r;
    }
    axum::Json(serde_json::json!({ "workers": state.cluster.workers_json() })).into_response()
}

/// `POST /admin/workers/{id}/drain`: the worker stops taking requests, finishes
/// what it holds, leaves the cluster and exits.
async fn admin_drain(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(r) = admin_refusal(state.admin_token.as_deref(), &headers) {
        return r;
    }
    let Some(mut client) = state.cluster.client_of(&id) else {
        return ApiError::not_found(format!("no worker {id:?}")).into_response();
    };
    match client
        .drain(tandem_protocol::grpc::worker::DrainRequest {})
        .await
    {
        Ok(r) => {
            tracing::info!(worker = %id, "drain requested by an operator");
            (
                StatusCode::ACCEPTED,
                axum::Json(serde_json::json!({
                    "id": id,
                    "state": "draining",
                    "in_flight": r.into_inner().in_flight,
                })),
            )
                .into_response()
        }
        Err(e) => ApiError::unavailable(format!(
            "worker {id} did not take the drain: {}",
            e.message()
        ))
        .into_response(),
    }
}

/// 200 while at least one decode worker serves, else 503; the body counts workers.
async fn health(State(state): State<AppState>) -> Response {
    let cluster = &state.cluster;
    let (decode, prefill) = cluster.serving_counts();
    let models: Vec<String> = cluster
        .served_models()
        .iter()
        .map(|m| m.name.clone())
        .collect();
    let (status, word) = if decode > 0 {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no decode worker")
    };
    let body = serde_json::json!({
        "status": word,
        "decode_workers": decode,
        "prefill_workers": prefill,
        "models": models,
    });
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    let cluster = &state.cluster;
    let text = cluster.metrics.render(&cluster.gauges());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
