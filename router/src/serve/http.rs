//! The router's own endpoints beside the OpenAI API: `/health` and `/metrics`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::cluster::Cluster;

/// `/health` and `/metrics`, with every other path handed to `api`.
pub(crate) fn app(cluster: Arc<Cluster>, api: Router) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(cluster)
        .fallback_service(api)
}

/// 200 while at least one decode worker serves, else 503; the body counts workers.
async fn health(State(cluster): State<Arc<Cluster>>) -> Response {
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

async fn metrics(State(cluster): State<Arc<Cluster>>) -> Response {
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
