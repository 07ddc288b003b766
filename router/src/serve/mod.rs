//! The router process: the OpenAI API in front of the cluster's workers.
//!
//! [`RouterProcess::bind`] reads the flags ([`RouterArgs`]), binds the API
//! address and starts following the store: each decode and prefill worker that
//! registers gets a gRPC client, a task that keeps its slice of the KV index
//! current from its event stream, and a load poll. Each request is tokenized by
//! the API layer, hashed into blocks with the model card's hasher, routed by
//! the decode [`KvRouter`](crate::KvRouter) (and, when remote prefill pays, the
//! prefill one), and streamed from the decode worker's `Generate` call.
//! [`RouterProcess::serve`] answers until shutdown, drains open streams, and
//! deregisters.

mod admin;
mod args;
mod cluster;
mod generator;
mod http;
mod membership;
mod metrics;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use tandem_control_plane::{RemoteStore, Store};
use tandem_openai::ApiConfig;
use tandem_protocol::{InstanceInfo, Role, WorkerState};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

pub use args::{DisaggMode, RouterArgs};

use crate::cost::CostConfig;
use cluster::{Cluster, RoutingConfig};
use generator::ClusterGenerator;

/// A bound router, following the cluster, ready to serve.
pub struct RouterProcess {
    listener: TcpListener,
    local_addr: SocketAddr,
    app: axum::Router,
    cluster: std::sync::Arc<Cluster>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// mTLS settings for the gRPC clients, from `dir/{ca.pem,node.pem,node.key}`.
fn client_tls(dir: &Path) -> anyhow::Result<ClientTlsConfig> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
    };
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")?))
        .identity(Identity::from_pem(read("node.pem")?, read("node.key")?)))
}

impl RouterProcess {
    /// Validates `args`, binds the API address, and starts following the store
    /// at `args.store`.
    pub async fn bind(args: RouterArgs) -> anyhow::Result<Self> {
        let store = RemoteStore::connect(&args.store)
            .with_context(|| format!("store address {:?}", args.store))?;
        Self::bind_with_store(args, store).await
    }

    /// [`RouterProcess::bind`] over a given store.
    pub async fn bind_with_store<S: Store + Clone>(
        args: RouterArgs,
        store: S,
    ) -> anyhow::Result<Self> {
        args.validate().map_err(anyhow::Error::msg)?;
        let tls = args
            .tls_dir
            .as_deref()
            .map(client_tls)
            .transpose()
            .context("loading the TLS files of --tls-dir")?;
        let api = ApiConfig {
            api_keys: args.api_keys.iter().map(|k| k.trim().to_owned()).collect(),
            max_concurrent_requests: args.max_concurrent_requests,
            ..ApiConfig::default()
        };
        api.validate().map_err(anyhow::Error::msg)?;
        let cluster = Cluster::new(RoutingConfig {
            cost: CostConfig::new(args.policy),
            disagg: args.disagg,
            disagg_threshold: args.disagg_threshold,
            prefill_max_pending: args.prefill_max_pending,
            tls,
        });
        let listener = TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding the API address {}", args.listen))?;
        let local_addr = listener.local_addr().context("reading the bound address")?;
        let generator = ClusterGenerator::new(cluster.clone(), args.retries);
        let admin_token = args
            .admin_token
            .as_deref()
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned);
        // The scaling and planner routes; `http::app` keeps the fallback.
        let app = admin::routes(store.clone(), args.cluster.clone(), admin_token.clone()).merge(
            http::app(
                cluster.clone(),
                admin_token,
                tandem_openai::router(generator, api),
            ),
        );

        let (stop, stopped) = watch::channel(false);
        let id = args.instance_id();
        let registration = InstanceInfo {
            id: id.clone(),
            role: Role::Router,
            model: String::new(),
            grpc_addr: String::new(),
            http_addr: local_addr.to_string(),
            kv_addr: None,
            kv_server_name: None,
            kv_blocks: 0,
            max_sequences: 0,
            state: WorkerState::Serving,
            version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        let tasks = vec![
            tokio::spawn(membership::follow_membership(
                store.clone(),
                cluster.clone(),
                args.cluster.clone(),
                stopped.clone(),
            )),
            tokio::spawn(membership::keep_registered(
                store,
                args.cluster.clone(),
                registration,
                membership::LEASE_TTL,
                stopped,
            )),
        ];
        tracing::info!(
            addr = %local_addr,
            cluster = %args.cluster,
            id = %id,
            policy = %args.policy,
            disagg = %args.disagg,
            "router listening"
        );
        Ok(Self {
            listener,
            local_addr,
            app,
            cluster,
            stop,
            tasks,
        })
    }

    /// The address the API is served on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` resolves, lets open streams finish, stops
    /// following the cluster and deregisters.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        // axum wants a 'static shutdown future; relay the caller's through a channel.
        let (begin, begun) = tokio::sync::oneshot::channel::<()>();
        let server = tandem_openai::serve(self.listener, self.app, async move {
            // A dropped sender (the server ended on its own) also ends the wait.
            let _ = begun.await;
        });
        tokio::pin!(server);
        tokio::pin!(shutdown);
        let served = tokio::select! {
            r = &mut server => r,
            () = &mut shutdown => {
                tracing::info!("shutting down: no new connections; draining open requests");
                let _ = begin.send(());
                server.await
            }
        };
        tracing::info!("router stopped serving");
        // Receivers may be gone already (a task ended); nothing to tell them then.
        let _ = self.stop.send(true);
        for task in self.tasks {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "a router task ended abnormally");
            }
        }
        self.cluster.shutdown();
        served.context("serving the API")
    }
}

/// Runs the router until `shutdown` resolves.
pub async fn run(
    args: RouterArgs,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    RouterProcess::bind(args).await?.serve(shutdown).await
}
