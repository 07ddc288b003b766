//! Connectors make the actual number of workers of a role equal the desired
//! number at `planner/desired/<role>`: `local` spawns and stops processes on
//! this host, `kubernetes` scales Deployments through the API server.

use std::future::Future;

use tandem_protocol::Role;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{connector} connector: {message}")]
pub struct ConnectorError {
    pub connector: &'static str,
    pub message: String,
}

/// What the control plane needs from a way of running workers.
pub trait Connector: Send + Sync + 'static {
    /// Its name, for logs and errors (`local`, `kubernetes`).
    fn name(&self) -> &'static str;

    /// Makes `role` run `replicas` workers. Scaling down drains the workers it
    /// stops: they take no new requests, finish those they hold, then exit.
    fn scale(
        &self,
        role: Role,
        replicas: u32,
    ) -> impl Future<Output = Result<(), ConnectorError>> + Send;

    /// How many workers of `role` run now (started and not yet exited).
    fn running(&self, role: Role) -> impl Future<Output = Result<u32, ConnectorError>> + Send;
}
