//! A store served by another process, reached over gRPC.

use std::time::Duration;

use tandem_protocol::grpc::store as pb;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::service::{event_from_pb, kv_from_pb};
use crate::store::{
    Compare, Event, KeyValue, LeaseId, Revision, Store, StoreError, TxnOp, WatchStream,
};

/// Batches a remote watch may have queued for its reader.
const WATCH_QUEUE: usize = 1024;
/// Longest wait between reconnection attempts of a watch.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// A client of [`crate::serve`]. Connects lazily: it can be made while the store
/// is down, calls fail with `Unavailable` until it is back, and watches reconnect
/// by themselves and resume from the last revision they delivered.
#[derive(Clone)]
pub struct RemoteStore {
    client: pb::store_client::StoreClient<Channel>,
}

impl RemoteStore {
    /// A client for the store at `url` (`http://host:port`).
    pub fn connect(url: &str) -> Result<Self, StoreError> {
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| StoreError::Invalid(format!("store address {url:?}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10));
        Ok(Self {
            client: pb::store_client::StoreClient::new(endpoint.connect_lazy()),
        })
    }

    fn client(&self) -> pb::store_client::StoreClient<Channel> {
        self.client.clone()
    }
}

/// The inverse of `service::to_status`.
fn from_status(s: Status) -> StoreError {
    let msg = s.message();
    let num = |m: &str| m.trim().parse::<i64>().ok();
    match s.code() {
        Code::OutOfRange => {
            let mut it = msg.split_whitespace().filter_map(num);
            match (it.next(), it.next()) {
                (Some(requested), Some(oldest)) => StoreError::Compacted { requested, oldest },
                _ => StoreError::Unavailable(msg.to_owned()),
            }
        }
        Code::NotFound => num(msg).map_or_else(
            || StoreError::Unavailable(msg.to_owned()),
            StoreError::LeaseNotFound,
        ),
        Code::Aborted => num(msg).map_or_else(
            || StoreError::Unavailable(msg.to_owned()),
            StoreError::WatchLagged,
        ),
        Code::InvalidArgument => StoreError::Invalid(msg.to_owned()),
        _ => StoreError::Unavailable(format!("{:?}: {msg}", s.code())),
    }
}

fn op_to_pb(op: TxnOp) -> pb::TxnOp {
    pb::TxnOp {
        op: Some(match op {
            TxnOp::Put { key, value, lease } => pb::txn_op::Op::Put(pb::PutRequest {
                key,
                value,
                lease: lease.unwrap_or(0),
            }),
            TxnOp::Delete { key } => pb::txn_op::Op::Delete(pb::DeleteRequest { key }),
        }),
    }
}

/// Opens a watch stream from revision `start` (0: from now on).
async fn open_watch(
    mut client: pb::store_client::StoreClient<Channel>,
    prefix: &str,
    start: Revision,
) -> Result<tonic::Streaming<pb::WatchResponse>, StoreError> {
    client
        .watch(pb::WatchRequest {
            prefix: prefix.to_owned(),
            start_revision: start,
        })
        .await
        .map(tonic::Response::into_inner)
        .map_err(from_status)
}

impl Store for RemoteStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let r = self
            .client()
            .get(pb::GetRequest {
                key: key.to_owned(),
            })
            .await
            .map_err(from_status)?;
        Ok(r.into_inner().kv.map(kv_from_pb))
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        let r = self
            .client()
            .put(pb::PutRequest {
                key: key.to_owned(),
                value,
                lease: lease.unwrap_or(0),
            })
            .await
            .map_err(from_status)?;
        Ok(r.into_inner().revision)
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let r = self
            .client()
            .delete(pb::DeleteRequest {
                key: key.to_owned(),
            })
            .await
            .map_err(from_status)?;
        Ok(r.into_inner().deleted)
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let r = self
            .client()
            .list(pb::ListRequest {
                prefix: prefix.to_owned(),
            })
            .await
            .map_err(from_status)?
            .into_inner();
        Ok((r.kvs.into_iter().map(kv_from_pb).collect(), r.revision))
    }

    async fn watch(
        &self,
        prefix: &str,
        start: Option<Revision>,
    ) -> Result<WatchStream, StoreError> {
        let mut stream = open_watch(self.client(), prefix, start.unwrap_or(0)).await?;
        // The header says where the stream starts.
        let header = stream
            .message()
            .await
            .map_err(from_status)?
            .ok_or_else(|| StoreError::Unavailable("watch ended before it began".into()))?;
        let from = header.revision;
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        let client = self.client();
        let prefix = prefix.to_owned();
        tokio::spawn(async move {
            // The next revision the reader has not seen.
            let mut next = from + 1;
            let mut backoff = Duration::from_millis(50);
            loop {
                let error = match stream.message().await {
                    Ok(Some(resp)) => {
                        let events: Result<Vec<Event>, StoreError> =
                            resp.events.into_iter().map(event_from_pb).collect();
                        match events {
                            Ok(events) => {
                                // After a reconnect the header repeats; skip what was seen.
                                let events: Vec<Event> = events
                                    .into_iter()
                                    .filter(|e| e.revision() >= next)
                                    .collect();
                                if let Some(last) = events.last() {
                                    next = last.revision() + 1;
                                    if tx.send(Ok(events)).await.is_err() {
                                        return;
                                    }
                                }
                                backoff = Duration::from_millis(50);
                                continue;
                            }
                            Err(e) => e,
                        }
                    }
                    Ok(None) => StoreError::Unavailable("watch stream ended".into()),
                    Err(status) => from_status(status),
                };
                match error {
                    // The history no longer reaches back far enough: the reader must
                    // re-list, so the error ends the stream.
                    StoreError::Compacted { .. } | StoreError::Invalid(_) => {
                        let _ = tx.send(Err(error)).await;
                        return;
                    }
                    _ => tracing::debug!(%error, next, "store watch interrupted; resuming"),
                }
                // Reconnect, resuming from `next`.
                loop {
                    if tx.is_closed() {
                        return;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    match open_watch(client.clone(), &prefix, next).await {
                        Ok(s) => {
                            stream = s;
                            break;
                        }
                        Err(e @ StoreError::Compacted { .. }) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                        Err(_) => continue,
                    }
                }
            }
        });
        Ok(WatchStream::new(rx, from))
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let ttl_ms = i64::try_from(ttl.as_millis())
            .map_err(|_| StoreError::Invalid("lease TTL too long".into()))?;
        let r = self
            .client()
            .lease_grant(pb::LeaseGrantRequest { ttl_ms })
            .await
            .map_err(from_status)?;
        Ok(r.into_inner().id)
    }

    async fn lease_keepalive(&self, id: LeaseId) -> Result<(), StoreError> {
        self.client()
            .lease_keep_alive(pb::LeaseKeepAliveRequest { id })
            .await
            .map_err(from_status)?;
        Ok(())
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<(), StoreError> {
        self.client()
            .lease_revoke(pb::LeaseRevokeRequest { id })
            .await
            .map_err(from_status)?;
        Ok(())
    }

    async fn txn(
        &self,
        compare: Vec<Compare>,
        success: Vec<TxnOp>,
        failure: Vec<TxnOp>,
    ) -> Result<bool, StoreError> {
        let r = self
            .client()
            .txn(pb::TxnRequest {
                compare: compare
                    .into_iter()
                    .map(|c| pb::Compare {
                        key: c.key,
                        mod_revision: c.mod_revision,
                    })
                    .collect(),
                success: success.into_iter().map(op_to_pb).collect(),
                failure: failure.into_iter().map(op_to_pb).collect(),
            })
            .await
            .map_err(from_status)?;
        Ok(r.into_inner().succeeded)
    }
}
