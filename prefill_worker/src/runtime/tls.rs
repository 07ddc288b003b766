//! A node's cluster identity, read once from its TLS directory and used for
//! every link it has: QUIC KV transfers and gRPC, both mutually authenticated.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tandem_kv_transfer::tls::{IdentityFiles, NodeIdentity};
use tandem_protocol::InstanceInfo;
use tandem_protocol::grpc::worker::worker_client::WorkerClient;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig,
};

/// A node's TLS directory: `ca.pem` (the cluster CA), `node.pem` (this
/// node's certificate chain) and `node.key` (its private key).
#[derive(Debug, Clone)]
pub struct ClusterTls {
    identity: NodeIdentity,
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl ClusterTls {
    /// The files of a TLS directory.
    pub fn files(dir: &Path) -> IdentityFiles {
        IdentityFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("node.pem"),
            key: dir.join("node.key"),
        }
    }

    /// Reads `dir`'s identity.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let files = Self::files(dir);
        let read = |p: &PathBuf| {
            std::fs::read(p).with_context(|| format!("reading TLS file {}", p.display()))
        };
        let (ca_pem, cert_pem, key_pem) = (read(&files.ca)?, read(&files.cert)?, read(&files.key)?);
        let identity = NodeIdentity::from_files(&files)
            .with_context(|| format!("loading the node identity in {}", dir.display()))?;
        Ok(Self {
            identity,
            ca_pem,
            cert_pem,
            key_pem,
        })
    }

    /// The identity KV transfers present.
    pub fn node_identity(&self) -> &NodeIdentity {
        &self.identity
    }

    /// gRPC server TLS: this node's certificate, and clients must present one
    /// from the cluster CA.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
    }

    /// gRPC client TLS: trusts only the cluster CA, presents this node's certificate.
    pub fn client_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
    }

    /// A lazily connecting channel to a worker's gRPC address (`https://host:port`).
    pub fn channel(&self, url: &str) -> anyhow::Result<Channel> {
        self.channel_named(url, None)
    }

    /// [`ClusterTls::channel`], checking the worker's certificate for `name`
    /// instead of the address's host.
    fn channel_named(&self, url: &str, name: Option<&str>) -> anyhow::Result<Channel> {
        let mut tls = self.client_config();
        if let Some(name) = name {
            tls = tls.domain_name(name);
        }
        let endpoint = Endpoint::from_shared(url.to_owned())
            .with_context(|| format!("worker address {url:?}"))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .tls_config(tls)
            .with_context(|| format!("TLS for {url}"))?;
        Ok(endpoint.connect_lazy())
    }

    /// A client of the worker at `url`.
    pub fn worker_client(&self, url: &str) -> anyhow::Result<WorkerClient<Channel>> {
        Ok(WorkerClient::new(self.channel(url)?))
    }

    /// A client of a registered worker, checking its certificate for the
    /// name it registered (`kv_server_name`; absent: the address's host).
    pub fn client_of(&self, info: &InstanceInfo) -> anyhow::Result<WorkerClient<Channel>> {
        let channel = self.channel_named(&info.grpc_addr, info.kv_server_name.as_deref())?;
        Ok(WorkerClient::new(channel))
    }
}
