//! The `kubernetes` connector: makes the desired worker counts real by setting
//! the replicas of the prefill and decode Deployments through the API server's
//! `scale` subresource. Kubernetes stops a removed pod with SIGTERM, on which a
//! tandem worker drains (no new requests, in-flight ones finish, deregister);
//! the Deployments in `deploy/` give it a grace period long enough for that.

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, Config};
use tandem_control_plane::{Connector, ConnectorError};
use tandem_protocol::Role;

/// Which Deployment runs each worker role, and where.
#[derive(Debug, Clone, clap::Args)]
pub struct KubernetesArgs {
    /// Namespace of the worker Deployments (default: the service account's
    /// namespace in a pod, else the kubeconfig's).
    #[arg(long)]
    pub namespace: Option<String>,
    /// The Deployment of prefill workers.
    #[arg(long, default_value = "tandem-prefill")]
    pub prefill_deployment: String,
    /// The Deployment of decode workers.
    #[arg(long, default_value = "tandem-decode")]
    pub decode_deployment: String,
}

/// Scales worker Deployments.
pub struct KubernetesConnector {
    deployments: Api<Deployment>,
    prefill: String,
    decode: String,
}

impl KubernetesConnector {
    /// A connector using the in-cluster service account, or the kubeconfig
    /// outside a cluster.
    pub async fn connect(args: &KubernetesArgs) -> anyhow::Result<Self> {
        let mut config = Config::infer().await.map_err(|e| {
            anyhow::anyhow!(
                "no Kubernetes API server found (neither in-cluster service account nor kubeconfig): {e}"
            )
        })?;
        if let Some(ns) = &args.namespace {
            config.default_namespace = ns.clone();
        }
        let client =
            Client::try_from(config).map_err(|e| anyhow::anyhow!("Kubernetes client: {e}"))?;
        Ok(Self::with_client(client, args))
    }

    /// A connector over `client`, in its default namespace unless `args` names one.
    pub fn with_client(client: Client, args: &KubernetesArgs) -> Self {
        let deployments = match &args.namespace {
            Some(ns) => Api::namespaced(client, ns),
            None => Api::default_namespaced(client),
        };
        Self {
            deployments,
            prefill: args.prefill_deployment.clone(),
            decode: args.decode_deployment.clone(),
        }
    }

    fn deployment(&self, role: Role) -> Result<&str, ConnectorError> {
        match role {
            Role::Prefill => Ok(&self.prefill),
            Role::Decode => Ok(&self.decode),
            other => Err(error(format!("{other} is not a worker role"))),
        }
    }
}

fn error(message: String) -> ConnectorError {
    ConnectorError {
        connector: "kubernetes",
        message,
    }
}

impl Connector for KubernetesConnector {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    async fn scale(&self, role: Role, replicas: u32) -> Result<(), ConnectorError> {
        let name = self.deployment(role)?;
        let patch = serde_json::json!({ "spec": { "replicas": replicas } });
        self.deployments
            .patch_scale(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| error(format!("scaling Deployment {name} to {replicas}: {e}")))?;
        tracing::info!(deployment = name, replicas, "scaled");
        Ok(())
    }

    async fn running(&self, role: Role) -> Result<u32, ConnectorError> {
        let name = self.deployment(role)?;
        let scale = self
            .deployments
            .get_scale(name)
            .await
            .map_err(|e| error(format!("reading Deployment {name}'s scale: {e}")))?;
        let replicas = scale.status.map_or(0, |s| s.replicas);
        u32::try_from(replicas)
            .map_err(|_| error(format!("Deployment {name} reports {replicas} replicas")))
    }
}

#[cfg(test)]
mod tests {
    //! Against a stand-in for the API server's `scale` subresource on loopback:
    //! what the connector sends and how it reads the answers.

    use std::sync::{Arc, Mutex};

    use axum::extract::{Path, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::get;
    use axum::{Json, Router};
    use serde_json::{Value, json};

    use super::*;

    type Seen = Arc<Mutex<Vec<(String, String, Value)>>>;

    fn scale(name: &str, replicas: i64) -> Value {
        json!({
            "apiVersion": "autoscaling/v1", "kind": "Scale",
            "metadata": {"name": name, "namespace": "fleet"},
            "spec": {"replicas": replicas},
            "status": {"replicas": replicas}
        })
    }

    async fn api_server(seen: Seen) -> String {
        async fn get_scale(Path((ns, name)): Path<(String, String)>) -> (StatusCode, Json<Value>) {
            match (ns.as_str(), name.as_str()) {
                ("fleet", "tandem-decode") => (StatusCode::OK, Json(scale(&name, 3))),
                _ => (
                    StatusCode::NOT_FOUND,
                    Json(
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                        "message": format!("deployments.apps \"{name}\" not found"),
                        "reason": "NotFound", "code": 404}),
                    ),
                ),
            }
        }
        async fn patch_scale(
            State(seen): State<Seen>,
            Path((ns, name)): Path<(String, String)>,
            headers: HeaderMap,
            body: String,
        ) -> Json<Value> {
            let kind = headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let patch: Value = serde_json::from_str(&body).expect("a JSON patch");
            let replicas = patch["spec"]["replicas"].as_i64().unwrap_or(-1);
            seen.lock()
                .expect("lock")
                .push((format!("{ns}/{name}"), kind, patch));
            Json(scale(&name, replicas))
        }
        let app = Router::new()
            .route(
                "/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale",
                get(get_scale).patch(patch_scale),
            )
            .with_state(seen);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    #[tokio::test]
    async fn scales_the_role_deployment_through_the_scale_subresource() {
        let seen = Seen::default();
        let url = api_server(seen.clone()).await;
        let config = Config::new(url.parse().expect("uri"));
        let client = Client::try_from(config).expect("client");
        let args = KubernetesArgs {
            namespace: Some("fleet".into()),
            prefill_deployment: "tandem-prefill".into(),
            decode_deployment: "tandem-decode".into(),
        };
        let connector = KubernetesConnector::with_client(client, &args);

        connector
            .scale(Role::Prefill, 2)
            .await
            .expect("scale prefill");
        connector
            .scale(Role::Decode, 0)
            .await
            .expect("scale decode");
        let seen = seen.lock().expect("lock").clone();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].0, "fleet/tandem-prefill");
        assert_eq!(seen[0].1, "application/merge-patch+json");
        assert_eq!(seen[0].2, json!({"spec": {"replicas": 2}}));
        assert_eq!(seen[1].0, "fleet/tandem-decode");
        assert_eq!(seen[1].2, json!({"spec": {"replicas": 0}}));

        assert_eq!(connector.running(Role::Decode).await.expect("running"), 3);
        let missing = connector.running(Role::Prefill).await.unwrap_err();
        assert!(
            missing.message.contains("tandem-prefill"),
            "the error names the Deployment: {missing}"
        );
        assert!(connector.scale(Role::Router, 1).await.is_err());
    }
}
