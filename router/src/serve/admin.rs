//! The admin API's scaling and planner endpoints (behind the admin token, with
//! OpenAI-style JSON errors like the rest of `/admin`):
//!
//! - `GET /admin/scale`: each worker role's desired count (and who set it) and
//!   the serving workers registered.
//! - `POST /admin/scale/{role}` `{"replicas": N}`: an operator's desired count.
//! - `GET /admin/targets`, `PUT /admin/targets` (partial JSON merged over the
//!   current targets): the planner's SLA targets and bounds.
//! - `GET /admin/planner/decisions?limit=N`: the decision log, newest first,
//!   and the planner leader.
//!
//! They read and write the control-plane store directly; the planner and the
//! connector follow the store.

use std::str::FromStr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tandem_control_plane::Store;
use tandem_control_plane::planner::{
    read_decisions, read_desired, read_leader, read_targets, set_desired,
};
use tandem_openai::ApiError;
use tandem_protocol::{InstanceInfo, MAX_REPLICAS, PlannerTargets, Role, WorkerState, keys};

/// Decisions returned when `limit` is not given.
const DEFAULT_LIMIT: usize = 50;

struct Inner<S> {
    store: S,
    cluster: String,
    admin_token: Option<String>,
}

/// What the handlers share.
pub(crate) struct AdminState<S>(Arc<Inner<S>>);

impl<S> Clone for AdminState<S> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

/// The scaling and planner routes over `store`, for `cluster`; merge them into
/// the router's app.
pub(crate) fn routes<S: Store + Clone>(
    store: S,
    cluster: String,
    admin_token: Option<String>,
) -> Router {
    let state = AdminState(Arc::new(Inner {
        store,
        cluster,
        admin_token,
    }));
    Router::new()
        .route("/admin/scale", get(get_scale::<S>))
        .route("/admin/scale/{role}", post(post_scale::<S>))
        .route(
            "/admin/targets",
            get(get_targets::<S>).put(put_targets::<S>),
        )
        .route("/admin/planner/decisions", get(get_decisions::<S>))
        .with_state(state)
}

/// The admin token check every admin route shares.
fn refusal<S>(state: &AdminState<S>, headers: &HeaderMap) -> Option<Response> {
    super::http::admin_refusal(state.0.admin_token.as_deref(), headers)
}

fn store_error(e: impl std::fmt::Display) -> Response {
    ApiError::unavailable(format!("the control-plane store: {e}")).into_response()
}

/// A worker role from the path; 400 for anything else.
fn worker_role(s: &str) -> Result<Role, ApiError> {
    match Role::from_str(s) {
        Ok(r @ (Role::Prefill | Role::Decode)) => Ok(r),
        _ => Err(ApiError::invalid_param(
            "role",
            format!("unknown worker role {s:?} (expected prefill or decode)"),
        )),
    }
}

/// `GET /admin/scale`.
async fn get_scale<S: Store + Clone>(
    State(state): State<AdminState<S>>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = refusal(&state, &headers) {
        return r;
    }
    let s = &state.0;
    let (kvs, _) = match s.store.list(&keys::instances(&s.cluster)).await {
        Ok(r) => r,
        Err(e) => return store_error(e),
    };
    let infos: Vec<InstanceInfo> = kvs
        .iter()
        .filter_map(|kv| InstanceInfo::from_json(&kv.key, &kv.value).ok())
        .collect();
    let mut out = serde_json::Map::new();
    for role in [Role::Prefill, Role::Decode] {
        let (desired, _) = match read_desired(&s.store, &s.cluster, role).await {
            Ok(d) => d,
            Err(e) => return store_error(e),
        };
        let running = infos
            .iter()
            .filter(|i| i.role == role && i.state == WorkerState::Serving)
            .count();
        let draining = infos
            .iter()
            .filter(|i| i.role == role && i.state == WorkerState::Draining)
            .count();
        out.insert(
            role.as_str().to_owned(),
            json!({
                "desired": desired.as_ref().map(|d| d.replicas),
                "running": running,
                "draining": draining,
                "by": desired.as_ref().map(|d| d.by.clone()),
                "at_ms": desired.as_ref().map(|d| d.at_ms),
            }),
        );
    }
    axum::Json(Value::Object(out)).into_response()
}

/// `POST /admin/scale/{role}` with `{"replicas": N}`.
async fn post_scale<S: Store + Clone>(
    State(state): State<AdminState<S>>,
    headers: HeaderMap,
    Path(role): Path<String>,
    body: Bytes,
) -> Response {
    if let Some(r) = refusal(&state, &headers) {
        return r;
    }
    let role = match worker_role(&role) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return ApiError::invalid_request(format!("the body is not JSON: {e}")).into_response();
        }
    };
    let Some(replicas) = value.get("replicas").and_then(Value::as_u64) else {
        return ApiError::invalid_param(
            "replicas",
            "the body needs `replicas`, a whole number of workers",
        )
        .into_response();
    };
    let least = u64::from(role == Role::Decode);
    if replicas < least || replicas > u64::from(MAX_REPLICAS) {
        return ApiError::invalid_param(
            "replicas",
            format!("{role} replicas must be {least}..={MAX_REPLICAS}, not {replicas}"),
        )
        .into_response();
    }
    let replicas = replicas as u32;
    let s = &state.0;
    if let Err(e) = set_desired(
        &s.store,
        &s.cluster,
        role,
        replicas,
        "operator",
        &format!("an operator set {role} to {replicas}"),
    )
    .await
    {
        return store_error(e);
    }
    tracing::info!(%role, replicas, "desired count set by an operator");
    (
        axum::http::StatusCode::ACCEPTED,
        axum::Json(json!({ "role": role, "desired": replicas, "by": "operator" })),
    )
        .into_response()
}

/// `GET /admin/targets`.
async fn get_targets<S: Store + Clone>(
    State(state): State<AdminState<S>>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = refusal(&state, &headers) {
        return r;
    }
    match read_targets(&state.0.store, &state.0.cluster).await {
        Ok(t) => axum::Json(t).into_response(),
        Err(e) => store_error(e),
    }
}

/// The targets `patch` (a JSON object of some fields) makes of `current`;
/// the message names the bad field.
pub(crate) fn merge_targets(
    current: &PlannerTargets,
    patch: &Value,
) -> Result<PlannerTargets, (Option<String>, String)> {
    let Some(patch) = patch.as_object() else {
        return Err((
            None,
            "the body must be a JSON object of target fields".into(),
        ));
    };
    let mut merged = serde_json::to_value(current).map_err(|e| (None, e.to_string()))?;
    let Some(fields) = merged.as_object_mut() else {
        return Err((None, "the current targets are not an object".into()));
    };
    for (k, v) in patch {
        if !fields.contains_key(k) {
            return Err((
                Some(k.clone()),
                format!(
                    "unknown target {k:?} (known: {})",
                    fields.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        // Each field alone, so a wrong type is reported with its name.
        let mut one = serde_json::Map::new();
        one.insert(k.clone(), v.clone());
        if let Err(e) = serde_json::from_value::<PlannerTargets>(Value::Object(one)) {
            return Err((Some(k.clone()), format!("bad value for {k}: {e}")));
        }
        fields.insert(k.clone(), v.clone());
    }
    let targets: PlannerTargets = serde_json::from_value(merged).map_err(|e| {
        let e = e.to_string();
        let field = patch.keys().find(|k| e.contains(k.as_str())).cloned();
        (field, format!("bad target value: {e}"))
    })?;
    targets.validate().map_err(|e| {
        let field = patch.keys().find(|k| e.contains(k.as_str())).cloned();
        (field, e)
    })?;
    Ok(targets)
}

/// `PUT /admin/targets` with some of the fields.
async fn put_targets<S: Store + Clone>(
    State(state): State<AdminState<S>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(r) = refusal(&state, &headers) {
        return r;
    }
    let patch: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return ApiError::invalid_request(format!("the body is not JSON: {e}")).into_response();
        }
    };
    let s = &state.0;
    let current = match read_targets(&s.store, &s.cluster).await {
        Ok(t) => t,
        // Stored targets that no longer parse: start from the defaults.
        Err(e) if e.starts_with("bad planner targets") => PlannerTargets::default(),
        Err(e) => return store_error(e),
    };
    let targets = match merge_targets(&current, &patch) {
        Ok(t) => t,
        Err((Some(field), message)) => {
            return ApiError::invalid_param(&field, message).into_response();
        }
        Err((None, message)) => return ApiError::invalid_request(message).into_response(),
    };
    let value = match serde_json::to_vec(&targets) {
        Ok(v) => v,
        Err(e) => return ApiError::internal(e.to_string()).into_response(),
    };
    if let Err(e) = s
        .store
        .put(&keys::planner_targets(&s.cluster), value, None)
        .await
    {
        return store_error(e);
    }
    tracing::info!(?targets, "planner targets set by an operator");
    axum::Json(targets).into_response()
}

/// `GET /admin/planner/decisions?limit=N`.
async fn get_decisions<S: Store + Clone>(
    State(state): State<AdminState<S>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    if let Some(r) = refusal(&state, &headers) {
        return r;
    }
    let mut limit = DEFAULT_LIMIT;
    for pair in query.as_deref().unwrap_or("").split('&') {
        if let Some(v) = pair.strip_prefix("limit=") {
            match v.parse::<usize>() {
                Ok(n) if n > 0 => limit = n,
                _ => {
                    return ApiError::invalid_param(
                        "limit",
                        format!("limit must be a positive whole number, not {v:?}"),
                    )
                    .into_response();
                }
            }
        }
    }
    let s = &state.0;
    let leader = match read_leader(&s.store, &s.cluster).await {
        Ok(l) => l,
        Err(e) => return store_error(e),
    };
    match read_decisions(&s.store, &s.cluster, limit).await {
        Ok(decisions) => {
            axum::Json(json!({ "leader": leader, "decisions": decisions })).into_response()
        }
        Err(e) => store_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_merge_over_the_current_and_name_the_bad_field() {
        let cur = PlannerTargets::default();
        let t = merge_targets(&cur, &json!({"ttft_ms": 800})).expect("merged");
        assert_eq!(t.ttft_ms, 800.0);
        assert_eq!(t.itl_ms, cur.itl_ms);
        let (field, msg) = merge_targets(&cur, &json!({"tftt_ms": 800})).unwrap_err();
        assert_eq!(field.as_deref(), Some("tftt_ms"), "{msg}");
        let (field, msg) = merge_targets(&cur, &json!({"itl_ms": -3})).unwrap_err();
        assert_eq!(field.as_deref(), Some("itl_ms"), "{msg}");
        let (field, msg) = merge_targets(&cur, &json!({"max_decode": "many"})).unwrap_err();
        assert_eq!(field.as_deref(), Some("max_decode"), "{msg}");
        let (field, msg) =
            merge_targets(&cur, &json!({"min_decode": 3, "max_decode": 2})).unwrap_err();
        assert!(field.is_some() && msg.contains("min_decode"), "{msg}");
        assert!(merge_targets(&cur, &json!([1])).is_err());
    }

    /// Serves `app` on a loopback port; returns its base URL.
    async fn serve(app: Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    async fn call(base: &str, method: &str, path: &str, body: &str) -> (u16, Value) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let resp = reqwest::Client::new()
            .request(method, format!("{base}{path}"))
            .bearer_auth("t")
            .body(body.to_owned())
            .send()
            .await
            .expect("response");
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.expect("body");
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    #[tokio::test]
    async fn scale_targets_and_decisions_over_a_store() {
        let store = tandem_control_plane::MemStore::new();
        let base = serve(routes(store.clone(), "c".into(), Some("t".into()))).await;
        let app = || base.as_str();
        let (status, v) = call(app(), "GET", "/admin/scale", "").await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["decode"]["desired"], Value::Null);
        let (status, v) = call(app(), "POST", "/admin/scale/decode", r#"{"replicas":3}"#).await;
        assert_eq!(status, 202, "{v}");
        let (_, v) = call(app(), "GET", "/admin/scale", "").await;
        assert_eq!(v["decode"]["desired"], 3);
        assert_eq!(v["decode"]["by"], "operator");
        for (path, body) in [
            ("/admin/scale/router", r#"{"replicas":1}"#),
            ("/admin/scale/decode", r#"{"replicas":0}"#),
            ("/admin/scale/prefill", r#"{"replicas":100000}"#),
            ("/admin/scale/decode", r#"{"n":1}"#),
        ] {
            let (status, v) = call(app(), "POST", path, body).await;
            assert_eq!(status, 400, "{path} {body}: {v}");
            assert!(v["error"]["message"].is_string(), "{v}");
        }
        let (status, _) = call(app(), "POST", "/admin/scale/prefill", r#"{"replicas":0}"#).await;
        assert_eq!(status, 202);

        let (_, v) = call(app(), "GET", "/admin/targets", "").await;
        assert_eq!(v["ttft_ms"], PlannerTargets::default().ttft_ms);
        let (status, v) = call(app(), "PUT", "/admin/targets", r#"{"ttft_ms":800}"#).await;
        assert_eq!(status, 200, "{v}");
        let (status, v) = call(app(), "PUT", "/admin/targets", r#"{"itl_ms":0}"#).await;
        assert_eq!(status, 400);
        assert_eq!(v["error"]["param"], "itl_ms", "{v}");
        let (_, v) = call(app(), "GET", "/admin/targets", "").await;
        assert_eq!(v["ttft_ms"], 800.0);

        let (status, v) = call(app(), "GET", "/admin/planner/decisions?limit=1", "").await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["leader"], Value::Null);
        let d = v["decisions"].as_array().expect("decisions");
        assert_eq!(d.len(), 1);
        assert_eq!(d[0]["role"], "prefill", "newest first: {v}");
        assert_eq!(d[0]["by"], "operator");

        let resp = reqwest::get(format!("{base}/admin/scale"))
            .await
            .expect("response");
        assert_eq!(resp.status().as_u16(), 401);
    }
}
