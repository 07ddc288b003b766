//! The production store: an etcd v3 cluster, reached over its gRPC API.
//!
//! etcd already has the semantics the [`Store`] trait describes, so this is a
//! translation: revisions, leases and transactions are etcd's own. What it adds
//! is what a client of etcd has to do itself: watches that survive a lost
//! connection (they reopen from the first revision they have not delivered),
//! and errors in the trait's terms (`Unavailable`, `LeaseNotFound`,
//! `Compacted`).
//!
//! The client speaks etcd's wire protocol directly: the few messages it needs
//! are declared in [`wire`] with their field numbers from etcd's `rpc.proto`
//! and `kv.proto`, so building tandem needs no `protoc` and no generated code.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::Streaming;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};
use tonic_prost::ProstCodec;

use crate::resume::{self, WatchSource};
use crate::store::{
    Compare, Event, KeyValue, LeaseId, Revision, Store, StoreError, TxnOp, WatchStream,
};

/// How long opening a TCP connection to an etcd member may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one request (or opening a watch) may wait for its answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings that find a dead connection even when no request is pending.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Batches a watch may have queued for its reader; a full queue holds the
/// stream back (etcd buffers on its side) rather than dropping changes.
const WATCH_QUEUE: usize = 1024;
/// The largest answer accepted: a list of a big prefix, or a watch batch of
/// many revisions (etcd batches up to 1000), can exceed tonic's 4 MiB default.
const MAX_MESSAGE: usize = 256 << 20;

const RANGE: &str = "/etcdserverpb.KV/Range";
const PUT: &str = "/etcdserverpb.KV/Put";
const DELETE_RANGE: &str = "/etcdserverpb.KV/DeleteRange";
const TXN: &str = "/etcdserverpb.KV/Txn";
const COMPACT: &str = "/etcdserverpb.KV/Compact";
const WATCH: &str = "/etcdserverpb.Watch/Watch";
const LEASE_GRANT: &str = "/etcdserverpb.Lease/LeaseGrant";
const LEASE_REVOKE: &str = "/etcdserverpb.Lease/LeaseRevoke";
const LEASE_KEEPALIVE: &str = "/etcdserverpb.Lease/LeaseKeepAlive";

/// A [`Store`] backed by etcd (v3 API, 3.4 or later).
///
/// It connects lazily: [`EtcdStore::connect`] returns without reaching etcd, so a
/// process can start while etcd is down; calls fail with
/// [`StoreError::Unavailable`] until a member answers, and watches reconnect by
/// themselves and resume from the last revision they delivered.
///
/// Requests go to one member at a time, as etcd's own client does. When a
/// member cannot be reached (or has no leader) the store moves on to the next;
/// a request that could not have been delivered is sent again to it at once,
/// any other is failed with `Unavailable` (it may have been applied). Clones
/// share the connections.
#[derive(Clone)]
pub struct EtcdStore {
    members: Arc<Members>,
}

/// The etcd members, one lazy connection each, and the one in use.
struct Members {
    channels: Vec<Channel>,
    current: AtomicUsize,
}

impl EtcdStore {
    /// A client for the etcd members at `endpoints` (`http://host:port` or
    /// `host:port`); with several, requests are balanced over them. Does not
    /// contact etcd. Must be called inside a tokio runtime. For TLS to etcd,
    /// see [`EtcdStore::connect_tls`]; an `https://` endpoint here is refused.
    pub fn connect(endpoints: &[String]) -> Result<Self, StoreError> {
        Self::connect_tls(endpoints, None)
    }

    /// [`EtcdStore::connect`], over TLS when `tls` is given: every member is
    /// reached with `https://`, its certificate checked against `tls.ca_pem`,
    /// and this client presents `tls`'s certificate (etcd's
    /// `--client-cert-auth`).
    pub fn connect_tls(endpoints: &[String], tls: Option<&EtcdTls>) -> Result<Self, StoreError> {
        if endpoints.is_empty() {
            return Err(StoreError::Invalid("no etcd endpoints given".into()));
        }
        let channels = endpoints
            .iter()
            .map(|url| endpoint(url, tls).map(|e| e.connect_lazy()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            members: Arc::new(Members {
                channels,
                current: AtomicUsize::new(0),
            }),
        })
    }

    /// Discards the history before `revision`: watches can no longer start
    /// before it (they get [`StoreError::Compacted`]). etcd keeps every
    /// revision until it is compacted, by this call or by its own
    /// `--auto-compaction-*` settings.
    pub async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let request = wire::CompactionRequest {
            revision,
            physical: true,
        };
        let _: wire::CompactionResponse = self.unary(COMPACT, request, None).await?;
        Ok(())
    }

    /// The member in use: its index and a client for it.
    fn member(&self) -> (usize, tonic::client::Grpc<Channel>) {
        let members = &self.members;
        let i = members.current.load(Ordering::Relaxed) % members.channels.len();
        let grpc = tonic::client::Grpc::new(members.channels[i].clone())
            .max_decoding_message_size(MAX_MESSAGE);
        (i, grpc)
    }

    /// Moves on from member `i` (unless another request already has).
    fn leave(&self, i: usize) {
        let next = (i + 1) % self.members.channels.len();
        let _ =
            self.members
                .current
                .compare_exchange(i, next, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Runs `call` on the member in use, moving on to the next member when
    /// that one fails as if it were down, and trying again (once per member)
    /// while the request cannot have been delivered.
    async fn on_member<T, F, Fut>(&self, call: F) -> Result<Result<T, Status>, StoreError>
    where
        F: Fn(tonic::client::Grpc<Channel>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut tries = self.members.channels.len();
        loop {
            let (i, grpc) = self.member();
            let result = with_deadline(call(grpc)).await;
            let (down, undelivered) = match &result {
                Ok(Err(status)) => (status.code() == Code::Unavailable, undelivered(status)),
                Ok(Ok(_)) => (false, false),
                Err(_) => (true, false),
            };
            if down {
                self.leave(i);
            }
            tries -= 1;
            if !(undelivered && tries > 0) {
                return result;
            }
        }
    }

    /// Sends one request and waits (at most [`REQUEST_TIMEOUT`]) for its
    /// answer. `lease` is the lease the request names, if any: etcd's
    /// `NotFound` is about that lease.
    async fn unary<Req, Resp>(
        &self,
        method: &'static str,
        request: Req,
        lease: Option<LeaseId>,
    ) -> Result<Resp, StoreError>
    where
        Req: prost::Message + Clone + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        self.unary_status(method, request)
            .await?
            .map_err(|status| from_status(&status, lease))
    }

    /// [`Self::unary`] with etcd's own error: the outer error is the answer
    /// that never came.
    async fn unary_status<Req, Resp>(
        &self,
        method: &'static str,
        request: Req,
    ) -> Result<Result<Resp, Status>, StoreError>
    where
        Req: prost::Message + Clone + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        self.on_member(|mut grpc| {
            let request = request.clone();
            async move {
                grpc.ready()
                    .await
                    .map_err(|e| Status::unavailable(e.to_string()))?;
                let resp = grpc
                    .unary(
                        request_with_leader(request),
                        PathAndQuery::from_static(method),
                        ProstCodec::<Req, Resp>::default(),
                    )
                    .await?;
                Ok(resp.into_inner())
            }
        })
        .await
    }

    /// Opens a bidirectional stream whose first request is `first`; the
    /// sender sends more, and dropping it closes the request side.
    async fn streaming<Req, Resp>(
        &self,
        method: &'static str,
        first: Req,
    ) -> Result<(mpsc::Sender<Req>, Streaming<Resp>), StoreError>
    where
        Req: prost::Message + Clone + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        self.on_member(|mut grpc| {
            let first = first.clone();
            async move {
                let (requests, rx) = mpsc::channel(1);
                // The channel is new and empty, so this cannot fail.
                let _ = requests.try_send(first);
                grpc.ready()
                    .await
                    .map_err(|e| Status::unavailable(e.to_string()))?;
                let resp = grpc
                    .streaming(
                        request_with_leader(ReceiverStream::new(rx)),
                        PathAndQuery::from_static(method),
                        ProstCodec::<Req, Resp>::default(),
                    )
                    .await?;
                Ok((requests, resp.into_inner()))
            }
        })
        .await?
        .map_err(|status| from_status(&status, None))
    }

    /// A cheap read of one key under `prefix`, at revision `at` (0: now).
    fn probe(prefix: &str, at: Revision) -> wire::RangeRequest {
        let (key, range_end) = prefix_range(prefix);
        wire::RangeRequest {
            key,
            range_end,
            limit: 1,
            revision: at,
            keys_only: true,
        }
    }

    /// The store's revision (any read's header carries it).
    async fn revision(&self, prefix: &str) -> Result<Revision, StoreError> {
        let resp: wire::RangeResponse = self.unary(RANGE, Self::probe(prefix, 0), None).await?;
        Ok(header_revision(resp.header.as_ref()))
    }

    /// Whether the history from `start` on has been compacted away, so that a
    /// watch from `start` would be refused: etcd refuses a read at such a
    /// revision by the same rule.
    async fn compacted_before(&self, prefix: &str, start: Revision) -> Result<bool, StoreError> {
        let read: Result<wire::RangeResponse, Status> =
            self.unary_status(RANGE, Self::probe(prefix, start)).await?;
        match read {
            Ok(_) => Ok(false),
            // "mvcc: required revision has been compacted"
            Err(s) if s.code() == Code::OutOfRange && s.message().contains("compacted") => Ok(true),
            Err(s) => Err(from_status(&s, None)),
        }
    }

    /// Opens a watch of `prefix` from revision `start` and waits until etcd
    /// has created it.
    async fn open_watch(&self, prefix: &str, start: Revision) -> Result<EtcdWatch, StoreError> {
        let (key, range_end) = prefix_range(prefix);
        let create = wire::WatchRequest {
            request_union: Some(wire::watch_request::RequestUnion::CreateRequest(
                wire::WatchCreateRequest {
                    key,
                    range_end,
                    start_revision: start,
                },
            )),
        };
        let (requests, mut responses) = self
            .streaming::<_, wire::WatchResponse>(WATCH, create)
            .await?;
        loop {
            let resp = with_deadline(responses.message())
                .await?
                .map_err(|s| from_status(&s, None))?
                .ok_or_else(|| {
                    StoreError::Unavailable("etcd ended the watch before creating it".into())
                })?;
            if resp.canceled {
                return Err(cancelled(&resp, start));
            }
            if resp.created {
                return Ok(EtcdWatch {
                    _requests: requests,
                    responses,
                });
            }
        }
    }
}

impl WatchSource for EtcdStore {
    type Stream = EtcdWatch;

    async fn open(&self, prefix: &str, start: Revision) -> Result<EtcdWatch, StoreError> {
        self.open_watch(prefix, start).await
    }

    async fn recv(watch: &mut EtcdWatch, next: Revision) -> Result<Vec<Event>, StoreError> {
        match watch.responses.message().await {
            Ok(Some(resp)) if resp.canceled => Err(cancelled(&resp, next)),
            Ok(Some(resp)) => events_from_wire(resp.events),
            Ok(None) => Err(StoreError::Unavailable(
                "etcd ended the watch stream".into(),
            )),
            Err(status) => Err(from_status(&status, None)),
        }
    }
}

/// An open etcd watch: the request side is kept open for as long as the
/// responses are read.
pub(crate) struct EtcdWatch {
    _requests: mpsc::Sender<wire::WatchRequest>,
    responses: Streaming<wire::WatchResponse>,
}

fn endpoint(url: &str, tls: Option<&EtcdTls>) -> Result<Endpoint, StoreError> {
    let bare = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .unwrap_or(url);
    if bare.contains("://") {
        return Err(StoreError::Invalid(format!(
            "etcd endpoint {url:?}: use http://, https:// or host:port"
        )));
    }
    let url = match (tls, url.starts_with("https://")) {
        (None, true) => {
            return Err(StoreError::Invalid(format!(
                "etcd endpoint {url:?}: https needs the client's TLS files (etcds:// with --store-tls-dir)"
            )));
        }
        (None, false) => format!("http://{bare}"),
        (Some(_), _) => format!("https://{bare}"),
    };
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| StoreError::Invalid(format!("etcd endpoint {url:?}: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    if let Some(tls) = tls {
        let config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&tls.ca_pem))
            .identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem));
        endpoint = endpoint
            .tls_config(config)
            .map_err(|e| StoreError::Invalid(format!("etcd endpoint {url:?}: TLS: {e}")))?;
    }
    Ok(endpoint)
}

/// A client's TLS material for etcd: the CA that signed the members'
/// certificates, and this client's certificate and key (PEM).
#[derive(Clone)]
pub struct EtcdTls {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl EtcdTls {
    /// Reads `ca.pem`, `node.pem` and `node.key` from `dir` (the layout of a
    /// tandem process's `--tls-dir`).
    pub fn from_dir(dir: &std::path::Path) -> Result<Self, StoreError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path)
                .map_err(|e| StoreError::Invalid(format!("etcd TLS file {}: {e}", path.display())))
        };
        Ok(Self {
            ca_pem: read("ca.pem")?,
            cert_pem: read("node.pem")?,
            key_pem: read("node.key")?,
        })
    }
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTls").finish_non_exhaustive()
    }
}

/// `message` as a request that only a member in touch with its leader serves:
/// a partitioned member refuses it (and ends its watches) instead of
/// answering from stale data.
fn request_with_leader<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("hasleader", MetadataValue::from_static("true"));
    request
}

/// Waits for `f` at most [`REQUEST_TIMEOUT`].
async fn with_deadline<T>(f: impl Future<Output = T>) -> Result<T, StoreError> {
    tokio::time::timeout(REQUEST_TIMEOUT, f).await.map_err(|_| {
        StoreError::Unavailable(format!("etcd did not answer within {REQUEST_TIMEOUT:?}"))
    })
}

/// Whether `status` says the request never reached etcd's state machine, so
/// that sending it again cannot apply it twice: the connection could not be
/// made, or the member refused it for want of a leader (etcd checks that
/// before it handles the request).
fn undelivered(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.is::<tonic::ConnectError>() {
            return true;
        }
        source = e.source();
    }
    status.code() == Code::Unavailable && status.message() == "etcdserver: no leader"
}

/// An etcd error status in the trait's terms.
fn from_status(status: &Status, lease: Option<LeaseId>) -> StoreError {
    let message = status.message();
    match (status.code(), lease) {
        // "etcdserver: requested lease not found"
        (Code::NotFound, Some(id)) => StoreError::LeaseNotFound(id),
        // An empty key, a key written twice in one transaction.
        (Code::InvalidArgument, _) => StoreError::Invalid(message.to_owned()),
        (code, _) => StoreError::Unavailable(format!("etcd: {code:?}: {message}")),
    }
}

/// Why etcd cancelled a watch that was to start at `requested`.
fn cancelled(resp: &wire::WatchResponse, requested: Revision) -> StoreError {
    if resp.compact_revision > 0 {
        StoreError::Compacted {
            requested,
            oldest: resp.compact_revision,
        }
    } else {
        StoreError::Unavailable(format!("etcd cancelled the watch: {}", resp.cancel_reason))
    }
}

/// The key range of `prefix` in etcd's terms: `[prefix, end)`, where `end` is
/// the prefix with its last byte below 0xff incremented; `"\0"` as `end` means
/// "to the last key" (for an empty prefix, or one of only 0xff bytes).
fn prefix_range(prefix: &str) -> (Vec<u8>, Vec<u8>) {
    let key = prefix.as_bytes().to_vec();
    if key.is_empty() {
        return (vec![0], vec![0]);
    }
    let mut end = key.clone();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return (key, end);
        }
    }
    (key, vec![0])
}

fn header_revision(header: Option<&wire::ResponseHeader>) -> Revision {
    header.map_or(0, |h| h.revision)
}

fn utf8_key(key: Vec<u8>) -> Result<String, StoreError> {
    String::from_utf8(key)
        .map_err(|e| StoreError::Invalid(format!("etcd holds a key that is not UTF-8: {e}")))
}

fn kv_from_wire(kv: wire::KeyValue) -> Result<KeyValue, StoreError> {
    Ok(KeyValue {
        key: utf8_key(kv.key)?,
        value: kv.value,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        lease: kv.lease,
    })
}

fn events_from_wire(events: Vec<wire::Event>) -> Result<Vec<Event>, StoreError> {
    events.into_iter().map(event_from_wire).collect()
}

fn event_from_wire(ev: wire::Event) -> Result<Event, StoreError> {
    let kv = ev
        .kv
        .ok_or_else(|| StoreError::Unavailable("etcd sent an event without a key".into()))?;
    match ev.r#type {
        wire::event::PUT => Ok(Event::Put(kv_from_wire(kv)?)),
        // A delete event carries the deletion's revision as mod_revision.
        wire::event::DELETE => Ok(Event::Delete {
            revision: kv.mod_revision,
            key: utf8_key(kv.key)?,
        }),
        other => Err(StoreError::Unavailable(format!(
            "etcd sent an event of unknown type {other}"
        ))),
    }
}

fn op_to_wire(op: TxnOp) -> wire::RequestOp {
    use wire::request_op::Request;
    let request = match op {
        TxnOp::Put { key, value, lease } => Request::Put(wire::PutRequest {
            key: key.into_bytes(),
            value,
            lease: lease.unwrap_or(0),
        }),
        TxnOp::Delete { key } => Request::DeleteRange(wire::DeleteRangeRequest {
            key: key.into_bytes(),
            range_end: Vec::new(),
        }),
    };
    wire::RequestOp {
        request: Some(request),
    }
}

impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let request = wire::RangeRequest {
            key: key.into(),
            ..Default::default()
        };
        let resp: wire::RangeResponse = self.unary(RANGE, request, None).await?;
        resp.kvs.into_iter().next().map(kv_from_wire).transpose()
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        let request = wire::PutRequest {
            key: key.into(),
            value,
            lease: lease.unwrap_or(0),
        };
        let resp: wire::PutResponse = self.unary(PUT, request, lease).await?;
        Ok(header_revision(resp.header.as_ref()))
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let request = wire::DeleteRangeRequest {
            key: key.into(),
            range_end: Vec::new(),
        };
        let resp: wire::DeleteRangeResponse = self.unary(DELETE_RANGE, request, None).await?;
        Ok(resp.deleted > 0)
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let (key, range_end) = prefix_range(prefix);
        let request = wire::RangeRequest {
            key,
            range_end,
            ..Default::default()
        };
        // etcd returns a range in key order.
        let resp: wire::RangeResponse = self.unary(RANGE, request, None).await?;
        let revision = header_revision(resp.header.as_ref());
        let kvs = resp
            .kvs
            .into_iter()
            .map(kv_from_wire)
            .collect::<Result<_, _>>()?;
        Ok((kvs, revision))
    }

    async fn watch(
        &self,
        prefix: &str,
        start: Option<Revision>,
    ) -> Result<WatchStream, StoreError> {
        // Pin the start to an explicit revision, so that the stream's contract
        // (every change after `from`, none before) holds exactly.
        let current = self.revision(prefix).await?;
        let start = start.map_or(current + 1, |s| s.clamp(1, current + 1));
        let compacted = start <= current && self.compacted_before(prefix, start).await?;
        let mut watch = self.open_watch(prefix, start).await?;
        if compacted {
            // etcd names the oldest revision it kept when it cancels the watch.
            let resp = with_deadline(watch.responses.message()).await?;
            return Err(match resp {
                Ok(Some(resp)) if resp.canceled => cancelled(&resp, start),
                _ => StoreError::Unavailable(format!(
                    "etcd has compacted revision {start} away but did not cancel the watch"
                )),
            });
        }
        // Compacted between the check and the watch: `follow` reports it.
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        tokio::spawn(resume::follow(
            self.clone(),
            prefix.to_owned(),
            watch,
            start,
            tx,
        ));
        Ok(WatchStream::new(rx, start - 1))
    }

    /// etcd counts TTLs in whole seconds, so `ttl` is rounded up (and etcd
    /// raises it to its minimum, 1.5 election timeouts, if it is below).
    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        if ttl.is_zero() {
            return Err(StoreError::Invalid("a lease needs a TTL above zero".into()));
        }
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let ttl =
            i64::try_from(secs).map_err(|_| StoreError::Invalid("lease TTL too long".into()))?;
        let request = wire::LeaseGrantRequest { ttl, id: 0 };
        let resp: wire::LeaseGrantResponse = self.unary(LEASE_GRANT, request, None).await?;
        if !resp.error.is_empty() {
            return Err(StoreError::Unavailable(format!(
                "etcd refused the lease: {}",
                resp.error
            )));
        }
        Ok(resp.id)
    }

    /// One keepalive round trip on a keepalive stream of its own; etcd answers
    /// for a lease it no longer has with a TTL of zero.
    async fn lease_keepalive(&self, id: LeaseId) -> Result<(), StoreError> {
        let (requests, mut responses) = self
            .streaming::<_, wire::LeaseKeepAliveResponse>(
                LEASE_KEEPALIVE,
                wire::LeaseKeepAliveRequest { id },
            )
            .await?;
        // Closing the request side ends the stream after etcd's answer.
        drop(requests);
        let resp = with_deadline(responses.message())
            .await?
            .map_err(|s| from_status(&s, Some(id)))?
            .ok_or_else(|| StoreError::Unavailable("etcd ended the keepalive unanswered".into()))?;
        if resp.ttl <= 0 {
            return Err(StoreError::LeaseNotFound(id));
        }
        Ok(())
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<(), StoreError> {
        let request = wire::LeaseRevokeRequest { id };
        let _: wire::LeaseRevokeResponse = self.unary(LEASE_REVOKE, request, Some(id)).await?;
        Ok(())
    }

    /// [`Store::campaign`] in one transaction: create-if-absent, else read
    /// the holder's lease.
    async fn campaign(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> Result<bool, StoreError> {
        let request = wire::TxnRequest {
            compare: vec![wire::Compare {
                result: wire::compare::EQUAL,
                target: wire::compare::CREATE,
                key: key.into(),
                target_union: Some(wire::compare::TargetUnion::CreateRevision(0)),
            }],
            success: vec![op_to_wire(TxnOp::Put {
                key: key.to_owned(),
                value,
                lease: Some(lease),
            })],
            failure: vec![wire::RequestOp {
                request: Some(wire::request_op::Request::Range(wire::RangeRequest {
                    key: key.into(),
                    ..Default::default()
                })),
            }],
        };
        let resp: wire::TxnResponse = self.unary(TXN, request, Some(lease)).await?;
        if resp.succeeded {
            return Ok(true);
        }
        let holder = resp.responses.into_iter().find_map(|r| match r.response {
            Some(wire::response_op::Response::Range(range)) => range.kvs.first().map(|kv| kv.lease),
            _ => None,
        });
        Ok(holder == Some(lease))
    }

    /// etcd refuses a transaction that writes one key twice (`Invalid`). An
    /// absent key has mod_revision 0 in etcd's comparisons too.
    async fn txn(
        &self,
        compare: Vec<Compare>,
        success: Vec<TxnOp>,
        failure: Vec<TxnOp>,
    ) -> Result<bool, StoreError> {
        // The lease to name if etcd says an op's lease is gone.
        let lease = success.iter().chain(&failure).find_map(|op| match op {
            TxnOp::Put { lease, .. } => *lease,
            TxnOp::Delete { .. } => None,
        });
        let request = wire::TxnRequest {
            compare: compare
                .into_iter()
                .map(|c| wire::Compare {
                    result: wire::compare::EQUAL,
                    target: wire::compare::MOD,
                    key: c.key.into_bytes(),
                    target_union: Some(wire::compare::TargetUnion::ModRevision(c.mod_revision)),
                })
                .collect(),
            success: success.into_iter().map(op_to_wire).collect(),
            failure: failure.into_iter().map(op_to_wire).collect(),
        };
        let resp: wire::TxnResponse = self.unary(TXN, request, lease).await?;
        Ok(resp.succeeded)
    }
}

/// The messages of etcd's v3 API that this client uses, with etcd's field
/// numbers (`etcdserverpb/rpc.proto`, `mvccpb/kv.proto`). Fields it does not
/// use are left out: protobuf skips them when decoding.
mod wire {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResponseHeader {
        #[prost(int64, tag = "3")]
        pub revision: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyValue {
        #[prost(bytes = "vec", tag = "1")]
        pub key: Vec<u8>,
        #[prost(int64, tag = "2")]
        pub create_revision: i64,
        #[prost(int64, tag = "3")]
        pub mod_revision: i64,
        #[prost(int64, tag = "4")]
        pub version: i64,
        #[prost(bytes = "vec", tag = "5")]
        pub value: Vec<u8>,
        #[prost(int64, tag = "6")]
        pub lease: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Event {
        /// [`event::PUT`] or [`event::DELETE`].
        #[prost(int32, tag = "1")]
        pub r#type: i32,
        #[prost(message, optional, tag = "2")]
        pub kv: Option<KeyValue>,
    }

    pub mod event {
        pub const PUT: i32 = 0;
        pub const DELETE: i32 = 1;
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RangeRequest {
        #[prost(bytes = "vec", tag = "1")]
        pub key: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub range_end: Vec<u8>,
        #[prost(int64, tag = "3")]
        pub limit: i64,
        #[prost(int64, tag = "4")]
        pub revision: i64,
        #[prost(bool, tag = "8")]
        pub keys_only: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RangeResponse {
        #[prost(message, optional, tag = "1")]
        pub header: Option<ResponseHeader>,
        #[prost(message, repeated, tag = "2")]
        pub kvs: Vec<KeyValue>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PutRequest {
        #[prost(bytes = "vec", tag = "1")]
        pub key: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
        #[prost(int64, tag = "3")]
        pub lease: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PutResponse {
        #[prost(message, optional, tag = "1")]
        pub header: Option<ResponseHeader>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DeleteRangeRequest {
        #[prost(bytes = "vec", tag = "1")]
        pub key: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub range_end: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DeleteRangeResponse {
        #[prost(message, optional, tag = "1")]
        pub header: Option<ResponseHeader>,
        #[prost(int64, tag = "2")]
        pub deleted: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RequestOp {
        #[prost(oneof = "request_op::Request", tags = "1, 2, 3")]
        pub request: Option<request_op::Request>,
    }

    pub mod request_op {
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Request {
            #[prost(message, tag = "1")]
            Range(super::RangeRequest),
            #[prost(message, tag = "2")]
            Put(super::PutRequest),
            #[prost(message, tag = "3")]
            DeleteRange(super::DeleteRangeRequest),
        }
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResponseOp {
        #[prost(oneof = "response_op::Response", tags = "1, 2, 3")]
        pub response: Option<response_op::Response>,
    }

    pub mod response_op {
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Response {
            #[prost(message, tag = "1")]
            Range(super::RangeResponse),
            #[prost(message, tag = "2")]
            Put(super::PutResponse),
            #[prost(message, tag = "3")]
            DeleteRange(super::DeleteRangeResponse),
        }
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Compare {
        /// [`compare::EQUAL`].
        #[prost(int32, tag = "1")]
        pub result: i32,
        /// [`compare::CREATE`] or [`compare::MOD`].
        #[prost(int32, tag = "2")]
        pub target: i32,
        #[prost(bytes = "vec", tag = "3")]
        pub key: Vec<u8>,
        #[prost(oneof = "compare::TargetUnion", tags = "5, 6")]
        pub target_union: Option<compare::TargetUnion>,
    }

    pub mod compare {
        pub const EQUAL: i32 = 0;
        pub const CREATE: i32 = 1;
        pub const MOD: i32 = 2;

        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum TargetUnion {
            #[prost(int64, tag = "5")]
            CreateRevision(i64),
            #[prost(int64, tag = "6")]
            ModRevision(i64),
        }
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TxnRequest {
        #[prost(message, repeated, tag = "1")]
        pub compare: Vec<Compare>,
        #[prost(message, repeated, tag = "2")]
        pub success: Vec<RequestOp>,
        #[prost(message, repeated, tag = "3")]
        pub failure: Vec<RequestOp>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TxnResponse {
        #[prost(bool, tag = "2")]
        pub succeeded: bool,
        #[prost(message, repeated, tag = "3")]
        pub responses: Vec<ResponseOp>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CompactionRequest {
        #[prost(int64, tag = "1")]
        pub revision: i64,
        #[prost(bool, tag = "2")]
        pub physical: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CompactionResponse {}

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WatchRequest {
        #[prost(oneof = "watch_request::RequestUnion", tags = "1")]
        pub request_union: Option<watch_request::RequestUnion>,
    }

    pub mod watch_request {
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum RequestUnion {
            #[prost(message, tag = "1")]
            CreateRequest(super::WatchCreateRequest),
        }
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WatchCreateRequest {
        #[prost(bytes = "vec", tag = "1")]
        pub key: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub range_end: Vec<u8>,
        #[prost(int64, tag = "3")]
        pub start_revision: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WatchResponse {
        #[prost(bool, tag = "3")]
        pub created: bool,
        #[prost(bool, tag = "4")]
        pub canceled: bool,
        #[prost(int64, tag = "5")]
        pub compact_revision: i64,
        #[prost(string, tag = "6")]
        pub cancel_reason: String,
        #[prost(message, repeated, tag = "11")]
        pub events: Vec<Event>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LeaseGrantRequest {
        #[prost(int64, tag = "1")]
        pub ttl: i64,
        #[prost(int64, tag = "2")]
        pub id: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LeaseGrantResponse {
        #[prost(int64, tag = "2")]
        pub id: i64,
        #[prost(string, tag = "4")]
        pub error: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LeaseRevokeRequest {
        #[prost(int64, tag = "1")]
        pub id: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LeaseRevokeResponse {}

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LeaseKeepAliveRequest {
        #[prost(int64, tag = "1")]
        pub id: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LeaseKeepAliveResponse {
        #[prost(int64, tag = "3")]
        pub ttl: i64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ranges_cover_exactly_the_prefix() {
        assert_eq!(prefix_range("/a/"), (b"/a/".to_vec(), b"/a0".to_vec()));
        assert_eq!(prefix_range(""), (vec![0], vec![0]));
        assert_eq!(
            prefix_range("a\u{ff}"),
            ("a\u{ff}".as_bytes().to_vec(), b"a\xc3\xc0".to_vec())
        );
    }

    #[test]
    fn endpoints_are_checked_without_contacting_etcd() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            assert!(EtcdStore::connect(&["127.0.0.1:1".into()]).is_ok());
            assert!(
                EtcdStore::connect(&["http://127.0.0.1:1".into(), "127.0.0.1:2".into()]).is_ok()
            );
            for bad in [
                vec![],
                vec!["https://127.0.0.1:1".to_owned()],
                vec!["not a url".to_owned()],
            ] {
                assert!(matches!(
                    EtcdStore::connect(&bad),
                    Err(StoreError::Invalid(_))
                ));
            }
        });
    }
}
