//! A store served by another process, reached over gRPC.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tandem_protocol::grpc::store as pb;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::resume::{self, WatchSource};
use crate::service::{event_from_pb, kv_from_pb};
use crate::store::{
    Compare, Event, KeyValue, LeaseId, Revision, Store, StoreError, TxnOp, WatchStream,
};

/// Batches a remote watch may have queued for its reader.
const WATCH_QUEUE: usize = 1024;

/// A client of [`crate::serve`]. Connects lazily: it can be made while the store
/// is down, calls fail with `Unavailable` until it is back, and watches reconnect
/// by themselves and resume from the last revision they delivered. Given the
/// addresses of several nodes of one store (an [`crate::EmbeddedStore`] group),
/// it talks to one and moves to the next when that one cannot be reached.
#[derive(Clone)]
pub struct RemoteStore {
    clients: Arc<[pb::store_client::StoreClient<Channel>]>,
    /// The node calls go to first.
    current: Arc<AtomicUsize>,
}

impl RemoteStore {
    /// A client for the store at `urls`: one `http://host:port`, or several
    /// separated by commas (the nodes of one group).
    pub fn connect(urls: &str) -> Result<Self, StoreError> {
        let clients = urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|url| {
                let endpoint = Endpoint::from_shared(url.to_owned())
                    .map_err(|e| StoreError::Invalid(format!("store address {url:?}: {e}")))?
                    .connect_timeout(Duration::from_secs(2))
                    .timeout(Duration::from_secs(10));
                Ok(pb::store_client::StoreClient::new(endpoint.connect_lazy()))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        if clients.is_empty() {
            return Err(StoreError::Invalid(format!("no store address in {urls:?}")));
        }
        Ok(Self {
            clients: clients.into(),
            current: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Runs `call` against the current node; where that node cannot serve it
    /// (`Unavailable`, and not a write of unknown outcome), against the next,
    /// once around the list.
    async fn call<T, F, Fut>(&self, mut call: F) -> Result<T, StoreError>
    where
        F: FnMut(pb::store_client::StoreClient<Channel>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let n = self.clients.len();
        let mut status = None;
        for _ in 0..n {
            let i = self.current.load(Ordering::Relaxed) % n;
            match call(self.clients[i].clone()).await {
                Ok(v) => return Ok(v),
                Err(s)
                    if n > 1
                        && s.code() == Code::Unavailable
                        && !s.message().contains("outcome is unknown") =>
                {
                    tracing::debug!(node = i, error = %s.message(), "store node unavailable; trying the next");
                    let _ = self.current.compare_exchange(
                        i,
                        (i + 1) % n,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    status = Some(s);
                }
                Err(s) => return Err(from_status(s)),
            }
        }
        Err(status.map_or_else(
            || StoreError::Unavailable("no store node answered".into()),
            from_status,
        ))
    }

    /// Opens a watch stream from revision `start` (0: from now on).
    async fn open_watch(
        &self,
        prefix: &str,
        start: Revision,
    ) -> Result<tonic::Streaming<pb::WatchResponse>, StoreError> {
        self.call(|mut c| async move {
            c.watch(pb::WatchRequest {
                prefix: prefix.to_owned(),
                start_revision: start,
            })
            .await
            .map(tonic::Response::into_inner)
        })
        .await
    }
}

/// The inverse of `service::to_status`.
pub(crate) fn from_status(s: Status) -> StoreError {
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

impl WatchSource for RemoteStore {
    type Stream = tonic::Streaming<pb::WatchResponse>;

    async fn open(&self, prefix: &str, start: Revision) -> Result<Self::Stream, StoreError> {
        self.open_watch(prefix, start).await
    }

    /// A reopened stream starts with a header that repeats the current
    /// revision and carries no changes.
    async fn recv(stream: &mut Self::Stream, _next: Revision) -> Result<Vec<Event>, StoreError> {
        match stream.message().await {
            Ok(Some(resp)) => resp.events.into_iter().map(event_from_pb).collect(),
            Ok(None) => Err(StoreError::Unavailable("watch stream ended".into())),
            Err(status) => Err(from_status(status)),
        }
    }
}

impl Store for RemoteStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let r = self
            .call(|mut c| async move {
                c.get(pb::GetRequest {
                    key: key.to_owned(),
                })
                .await
            })
            .await?;
        Ok(r.into_inner().kv.map(kv_from_pb))
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        let r = self
            .call(|mut c| {
                let value = value.clone();
                async move {
                    c.put(pb::PutRequest {
                        key: key.to_owned(),
                        value,
                        lease: lease.unwrap_or(0),
                    })
                    .await
                }
            })
            .await?;
        Ok(r.into_inner().revision)
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let r = self
            .call(|mut c| async move {
                c.delete(pb::DeleteRequest {
                    key: key.to_owned(),
                })
                .await
            })
            .await?;
        Ok(r.into_inner().deleted)
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let r = self
            .call(|mut c| async move {
                c.list(pb::ListRequest {
                    prefix: prefix.to_owned(),
                })
                .await
            })
            .await?
            .into_inner();
        Ok((r.kvs.into_iter().map(kv_from_pb).collect(), r.revision))
    }

    async fn watch(
        &self,
        prefix: &str,
        start: Option<Revision>,
    ) -> Result<WatchStream, StoreError> {
        let mut stream = self.open_watch(prefix, start.unwrap_or(0)).await?;
        // The header says where the stream starts.
        let header = stream
            .message()
            .await
            .map_err(from_status)?
            .ok_or_else(|| StoreError::Unavailable("watch ended before it began".into()))?;
        let from = header.revision;
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        tokio::spawn(resume::follow(
            self.clone(),
            prefix.to_owned(),
            stream,
            from + 1,
            tx,
        ));
        Ok(WatchStream::new(rx, from))
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let ttl_ms = i64::try_from(ttl.as_millis())
            .map_err(|_| StoreError::Invalid("lease TTL too long".into()))?;
        let r = self
            .call(|mut c| async move { c.lease_grant(pb::LeaseGrantRequest { ttl_ms }).await })
            .await?;
        Ok(r.into_inner().id)
    }

    async fn lease_keepalive(&self, id: LeaseId) -> Result<(), StoreError> {
        self.call(
            |mut c| async move { c.lease_keep_alive(pb::LeaseKeepAliveRequest { id }).await },
        )
        .await?;
        Ok(())
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<(), StoreError> {
        self.call(|mut c| async move { c.lease_revoke(pb::LeaseRevokeRequest { id }).await })
            .await?;
        Ok(())
    }

    async fn txn(
        &self,
        compare: Vec<Compare>,
        success: Vec<TxnOp>,
        failure: Vec<TxnOp>,
    ) -> Result<bool, StoreError> {
        let request = pb::TxnRequest {
            compare: compare
                .into_iter()
                .map(|c| pb::Compare {
                    key: c.key,
                    mod_revision: c.mod_revision,
                })
                .collect(),
            success: success.into_iter().map(op_to_pb).collect(),
            failure: failure.into_iter().map(op_to_pb).collect(),
        };
        let r = self
            .call(|mut c| {
                let request = request.clone();
                async move { c.txn(request).await }
            })
            .await?;
        Ok(r.into_inner().succeeded)
    }
}
