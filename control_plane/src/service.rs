//! An embedded store served over gRPC to the cluster's other processes.

use std::future::Future;
use std::time::Duration;

use tandem_protocol::grpc::store as pb;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status};

use crate::mem::MemStore;
use crate::raft::EmbeddedStore;
use crate::store::{Compare, Event, KeyValue, Revision, Store, StoreError, TxnOp};

/// A store that [`serve`] can offer: one held in this process, which knows the
/// revision it has reached (the responses carry it).
pub trait Served: Store {
    /// The store's current revision, as this process has it.
    fn revision(&self) -> Revision;
}

impl Served for MemStore {
    fn revision(&self) -> Revision {
        MemStore::revision(self)
    }
}

impl Served for EmbeddedStore {
    fn revision(&self) -> Revision {
        EmbeddedStore::revision(self)
    }
}

/// Serves `store` on `listener` until `shutdown` completes.
pub async fn serve<S: Served>(
    store: S,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(pb::store_server::StoreServer::new(Service { store }))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
}

struct Service<S> {
    store: S,
}

pub(crate) fn kv_to_pb(kv: KeyValue) -> pb::KeyValue {
    pb::KeyValue {
        key: kv.key,
        value: kv.value,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        lease: kv.lease,
    }
}

pub(crate) fn kv_from_pb(kv: pb::KeyValue) -> KeyValue {
    KeyValue {
        key: kv.key,
        value: kv.value,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        lease: kv.lease,
    }
}

fn event_to_pb(ev: Event) -> pb::Event {
    match ev {
        Event::Put(kv) => pb::Event {
            kind: pb::event::Kind::Put as i32,
            kv: Some(kv_to_pb(kv)),
        },
        Event::Delete { key, revision } => pb::Event {
            kind: pb::event::Kind::Delete as i32,
            kv: Some(pb::KeyValue {
                key,
                mod_revision: revision,
                ..Default::default()
            }),
        },
    }
}

pub(crate) fn event_from_pb(ev: pb::Event) -> Result<Event, StoreError> {
    let kv = ev
        .kv
        .ok_or_else(|| StoreError::Unavailable("watch event without a key".into()))?;
    Ok(match pb::event::Kind::try_from(ev.kind) {
        Ok(pb::event::Kind::Put) => Event::Put(kv_from_pb(kv)),
        Ok(pb::event::Kind::Delete) => Event::Delete {
            key: kv.key,
            revision: kv.mod_revision,
        },
        Err(_) => {
            return Err(StoreError::Unavailable(format!(
                "unknown event kind {}",
                ev.kind
            )));
        }
    })
}

pub(crate) fn op_from_pb(op: pb::TxnOp) -> Result<TxnOp, Status> {
    match op.op {
        Some(pb::txn_op::Op::Put(p)) => Ok(TxnOp::Put {
            key: p.key,
            value: p.value,
            lease: (p.lease != 0).then_some(p.lease),
        }),
        Some(pb::txn_op::Op::Delete(d)) => Ok(TxnOp::Delete { key: d.key }),
        None => Err(Status::invalid_argument(
            "transaction operation without a kind",
        )),
    }
}

/// Errors cross the wire as status codes; `remote` maps them back.
pub(crate) fn to_status(e: StoreError) -> Status {
    match e {
        StoreError::Compacted { requested, oldest } => {
            Status::out_of_range(format!("{requested} {oldest}"))
        }
        StoreError::LeaseNotFound(id) => Status::not_found(id.to_string()),
        StoreError::WatchLagged(rev) => Status::aborted(rev.to_string()),
        StoreError::Invalid(m) => Status::invalid_argument(m),
        StoreError::Unavailable(m) => Status::unavailable(m),
        StoreError::WatchClosed => Status::cancelled("watch closed"),
    }
}

#[tonic::async_trait]
impl<S: Served> pb::store_server::Store for Service<S> {
    async fn get(&self, r: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let kv = self
            .store
            .get(&r.into_inner().key)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::GetResponse {
            kv: kv.map(kv_to_pb),
            revision: self.store.revision(),
        }))
    }

    async fn put(&self, r: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let r = r.into_inner();
        let lease = (r.lease != 0).then_some(r.lease);
        let revision = self
            .store
            .put(&r.key, r.value, lease)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::PutResponse { revision }))
    }

    async fn delete(
        &self,
        r: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let deleted = self
            .store
            .delete(&r.into_inner().key)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::DeleteResponse {
            revision: self.store.revision(),
            deleted,
        }))
    }

    async fn list(
        &self,
        r: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let (kvs, revision) = self
            .store
            .list(&r.into_inner().prefix)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ListResponse {
            kvs: kvs.into_iter().map(kv_to_pb).collect(),
            revision,
        }))
    }

    type WatchStream = ReceiverStream<Result<pb::WatchResponse, Status>>;

    async fn watch(
        &self,
        r: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let r = r.into_inner();
        let start = (r.start_revision > 0).then_some(r.start_revision);
        let mut watch = self
            .store
            .watch(&r.prefix, start)
            .await
            .map_err(to_status)?;
        let (tx, rx) = mpsc::channel(16);
        // The first message says where the stream starts, so a client that
        // reconnects knows where to resume even before any change arrives.
        let header = pb::WatchResponse {
            events: Vec::new(),
            revision: watch.starts_after(),
        };
        tokio::spawn(async move {
            if tx.send(Ok(header)).await.is_err() {
                return;
            }
            loop {
                let msg = match watch.next_batch().await {
                    Ok(events) => {
                        let revision = events.last().map_or(0, Event::revision);
                        Ok(pb::WatchResponse {
                            events: events.into_iter().map(event_to_pb).collect(),
                            revision,
                        })
                    }
                    Err(e) => Err(to_status(e)),
                };
                let end = msg.is_err();
                if tx.send(msg).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn lease_grant(
        &self,
        r: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        let ttl_ms = r.into_inner().ttl_ms;
        let ttl = u64::try_from(ttl_ms)
            .map(Duration::from_millis)
            .map_err(|_| Status::invalid_argument("negative lease TTL"))?;
        let id = self.store.lease_grant(ttl).await.map_err(to_status)?;
        Ok(Response::new(pb::LeaseGrantResponse { id, ttl_ms }))
    }

    async fn lease_keep_alive(
        &self,
        r: Request<pb::LeaseKeepAliveRequest>,
    ) -> Result<Response<pb::LeaseKeepAliveResponse>, Status> {
        self.store
            .lease_keepalive(r.into_inner().id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::LeaseKeepAliveResponse { alive: true }))
    }

    async fn lease_revoke(
        &self,
        r: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        self.store
            .lease_revoke(r.into_inner().id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::LeaseRevokeResponse {
            revision: self.store.revision(),
        }))
    }

    async fn txn(&self, r: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        let r = r.into_inner();
        let compare = r
            .compare
            .into_iter()
            .map(|c| Compare {
                key: c.key,
                mod_revision: c.mod_revision,
            })
            .collect();
        let success = r
            .success
            .into_iter()
            .map(op_from_pb)
            .collect::<Result<_, _>>()?;
        let failure = r
            .failure
            .into_iter()
            .map(op_from_pb)
            .collect::<Result<_, _>>()?;
        let succeeded = self
            .store
            .txn(compare, success, failure)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::TxnResponse {
            succeeded,
            revision: self.store.revision(),
        }))
    }
}
