//! `/health` and `/metrics` over plain HTTP.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::Worker;

/// Serves the worker's health and metrics on `listener` until `stop`.
pub(super) async fn serve_http(
    worker: Arc<Worker>,
    listener: TcpListener,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(worker);
    axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await?;
    Ok(())
}

/// 200 while serving, 503 while draining (load balancers stop sending).
async fn health(State(worker): State<Arc<Worker>>) -> Response {
    let state = worker.state();
    let code = if worker.draining() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (
        code,
        axum::Json(serde_json::json!({ "status": state.as_str() })),
    )
        .into_response()
}

async fn metrics(State(worker): State<Arc<Worker>>) -> Response {
    let mut body = worker
        .metrics
        .render(&worker.engine.load_report(), worker.draining());
    body.push_str(&worker.transfer_metrics.render_prometheus());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}
