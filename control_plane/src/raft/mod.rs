//! The embedded store replicated with Raft (raft-rs): [`EmbeddedStore`].
//!
//! A group of 1 node (what `tandem up` runs) or 3 (`tandem control --peers`).
//! Every write is a command in the Raft log (`codec`); each node applies the
//! committed log in order to its own copy of the state machine (the same
//! [`State`](crate::state::State) that `MemStore` uses), so revisions are the
//! same everywhere. The log and snapshots live in a data directory (`wal`);
//! reopening the directory recovers the node. A follower forwards writes and
//! lease keepalives to the leader over the peer service (`peer`); reads and
//! watches are served from the local state after a read-index barrier, so they
//! are linearizable. Lease deadlines are kept by the leader only (`node`).

mod codec;
mod node;
mod peer;
mod wal;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message as _;
use raft::prelude::{ConfState, Snapshot};
use raft::storage::MemStorage;
use raft::{Config, RawNode};
use tandem_protocol::grpc::raft as pb;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::{Instant, sleep, timeout};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Endpoint;

use self::codec::Applied;
use self::node::{DiskStorage, Msg, Node, ProposeError, Shared};
use self::peer::{NOT_LEADER, RaftClient, RaftService};
use crate::mem::lock;
use crate::remote::from_status;
use crate::state::State;
use crate::store::{Compare, KeyValue, LeaseId, Revision, Store, StoreError, TxnOp, WatchStream};

/// Applied log entries between two snapshots (and log compactions).
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 10_000;
/// How long a call waits for a leader and for its command to be applied.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one read-index request is waited for before it is asked again.
const READ_RETRY: Duration = Duration::from_millis(500);
/// Said by a leader whose write may or may not have been applied: the caller
/// must not blindly send it again.
const OUTCOME_UNKNOWN: &str = "its outcome is unknown";

/// How to start one node of an [`EmbeddedStore`] group.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    /// This node's id in the group (1 for a group of one).
    pub id: u64,
    /// Where the write-ahead log and snapshots live.
    pub data_dir: PathBuf,
    /// Every member's peer (Raft) URL, this node's included; empty for a group
    /// of one. Membership is fixed: every node must be given the same list.
    pub peers: BTreeMap<u64, String>,
    /// Applied entries between snapshots.
    pub snapshot_every: u64,
}

impl EmbeddedConfig {
    /// A group of one node with its files in `data_dir`.
    pub fn single(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            id: 1,
            data_dir: data_dir.into(),
            peers: BTreeMap::new(),
            snapshot_every: DEFAULT_SNAPSHOT_EVERY,
        }
    }
}

/// Parses a peer list, `1=http://10.0.0.1:2380,2=http://10.0.0.2:2380,...`.
pub fn parse_peers(list: &str) -> Result<BTreeMap<u64, String>, StoreError> {
    let mut peers = BTreeMap::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (id, url) = item
            .split_once('=')
            .ok_or_else(|| StoreError::Invalid(format!("peer {item:?}: expected ID=URL")))?;
        let id: u64 =
            id.trim().parse().ok().filter(|&id| id > 0).ok_or_else(|| {
                StoreError::Invalid(format!("peer {item:?}: the id must be above 0"))
            })?;
        if peers.insert(id, url.trim().to_owned()).is_some() {
            return Err(StoreError::Invalid(format!("peer {id} is listed twice")));
        }
    }
    Ok(peers)
}

/// What callers, the peer service and the node thread's owner share.
pub(crate) struct Core {
    id: u64,
    tx: std::sync::mpsc::Sender<Msg>,
    shared: Arc<Shared>,
    peers: HashMap<u64, RaftClient>,
}

/// Where a call that needs the leader goes.
enum Route {
    Local,
    Remote(RaftClient),
    Unknown,
}

impl Core {
    fn stopped() -> StoreError {
        StoreError::Unavailable("the embedded store has stopped".into())
    }

    pub(crate) fn send(&self, msg: Msg) -> Result<(), StoreError> {
        if self.shared.stopped.load(Ordering::SeqCst) {
            return Err(Self::stopped());
        }
        self.tx.send(msg).map_err(|_| Self::stopped())
    }

    fn route(&self) -> Result<Route, StoreError> {
        if self.shared.stopped.load(Ordering::SeqCst) {
            return Err(Self::stopped());
        }
        let leader = self.shared.leader.load(Ordering::SeqCst);
        Ok(if leader == self.id {
            Route::Local
        } else if let Some(c) = self.peers.get(&leader) {
            Route::Remote(c.clone())
        } else {
            Route::Unknown
        })
    }

    /// Proposes an encoded command on this node, which must be the leader.
    pub(crate) async fn propose_local(&self, command: Vec<u8>) -> Result<Applied, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Msg::Propose { command, reply })
            .map_err(ProposeError::Store)?;
        match timeout(REQUEST_TIMEOUT, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ProposeError::Store(StoreError::Unavailable(format!(
                "the leader changed before the write was applied; {OUTCOME_UNKNOWN}"
            )))),
            Err(_) => Err(ProposeError::Store(StoreError::Unavailable(format!(
                "the write was not applied in time; {OUTCOME_UNKNOWN}"
            )))),
        }
    }

    /// A forwarded call's error: "try the leader again" where the leader
    /// surely did nothing, else the store error it stands for.
    fn forwarded(s: tonic::Status) -> ProposeError {
        let refused = s.code() == NOT_LEADER
            || (s.code() == tonic::Code::Unavailable && !s.message().contains(OUTCOME_UNKNOWN));
        if refused {
            ProposeError::NotLeader
        } else {
            ProposeError::Store(from_status(s))
        }
    }

    /// Retries `attempt` while no leader takes it, up to [`REQUEST_TIMEOUT`].
    async fn with_leader<T, F, Fut>(&self, mut attempt: F) -> Result<T, StoreError>
    where
        F: FnMut(Route) -> Fut,
        Fut: std::future::Future<Output = Result<T, ProposeError>>,
    {
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        loop {
            let result = match self.route()? {
                Route::Unknown => Err(ProposeError::NotLeader),
                route => attempt(route).await,
            };
            match result {
                Ok(v) => return Ok(v),
                Err(ProposeError::Store(e)) => return Err(e),
                Err(ProposeError::NotLeader) if Instant::now() < deadline => {
                    sleep(node::TICK).await
                }
                Err(ProposeError::NotLeader) => {
                    return Err(StoreError::Unavailable(
                        "no leader took the request in time".into(),
                    ));
                }
            }
        }
    }

    /// Appends `cmd` to the log through the leader and waits until it is
    /// applied; also waits until this node has applied it, so a read here
    /// afterwards sees the write.
    async fn propose(&self, cmd: pb::Command) -> Result<Applied, StoreError> {
        let bytes = cmd.encode_to_vec();
        let applied = self
            .with_leader(|route| {
                let bytes = bytes.clone();
                async move {
                    match route {
                        Route::Remote(mut c) => c
                            .propose(pb::ProposeRequest { command: bytes })
                            .await
                            .map(|r| {
                                let r = r.into_inner();
                                Applied {
                                    revision: r.revision,
                                    succeeded: r.succeeded,
                                    lease: r.lease,
                                }
                            })
                            .map_err(Self::forwarded),
                        _ => self.propose_local(bytes).await,
                    }
                }
            })
            .await?;
        if lock(&self.shared.state).revision < applied.revision {
            self.barrier().await?;
        }
        Ok(applied)
    }

    /// Waits until this node has applied everything committed now (a
    /// read-index round through the leader).
    async fn barrier(&self) -> Result<(), StoreError> {
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        loop {
            let (reply, rx) = oneshot::channel();
            self.send(Msg::ReadIndex { reply })?;
            if let Ok(Ok(())) = timeout(READ_RETRY, rx).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(StoreError::Unavailable(
                    "no leader confirmed a read in time".into(),
                ));
            }
            sleep(node::TICK).await;
        }
    }

    /// Restarts a lease's TTL here, where it must be the leader.
    pub(crate) async fn keepalive_local(&self, id: LeaseId) -> Result<(), ProposeError> {
        let leader = || self.shared.leader.load(Ordering::SeqCst) == self.id;
        if !leader() {
            return Err(ProposeError::NotLeader);
        }
        // A new leader may not have applied the grant yet.
        self.barrier().await.map_err(ProposeError::Store)?;
        if !leader() {
            return Err(ProposeError::NotLeader);
        }
        lock(&self.shared.state)
            .keepalive(id, Instant::now())
            .map_err(ProposeError::Store)
    }
}

/// raft-rs logs through slog; this forwards its records to tracing (target
/// `raft`), one level quieter (its info is per election and per snapshot).
struct TracingDrain;

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record<'_>, _: &slog::OwnedKVList) -> Result<(), slog::Never> {
        let msg = record.msg();
        match record.level() {
            slog::Level::Critical | slog::Level::Error => tracing::error!(target: "raft", "{msg}"),
            slog::Level::Warning => tracing::warn!(target: "raft", "{msg}"),
            slog::Level::Info => tracing::debug!(target: "raft", "{msg}"),
            slog::Level::Debug | slog::Level::Trace => tracing::trace!(target: "raft", "{msg}"),
        }
        Ok(())
    }
}

/// The node's thread and peer server; stopped when the last clone of the
/// store is dropped.
struct Running {
    core: Arc<Core>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    server: Mutex<Option<oneshot::Sender<()>>>,
}

impl Running {
    fn halt(&self) {
        self.core.shared.stopped.store(true, Ordering::SeqCst);
        let _ = self.core.tx.send(Msg::Stop);
        let server = self
            .server
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(stop) = server {
            let _ = stop.send(());
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The Raft-replicated store (see the module docs). Clones share one node.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Running>,
}

/// The host:port of a peer URL, to listen on.
fn listen_address(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.split('/').next().unwrap_or(rest)
}

impl EmbeddedStore {
    /// Opens (or creates) the node's data directory, recovers its state, and
    /// starts the node. In a group of several it serves the peer service on
    /// `listener`, or, if none is given, on the address of its own peer URL.
    /// Must be called inside a tokio runtime.
    pub async fn open(
        config: EmbeddedConfig,
        listener: Option<TcpListener>,
    ) -> Result<Self, StoreError> {
        let id = config.id;
        if id == 0 {
            return Err(StoreError::Invalid("node ids start at 1".into()));
        }
        let group = !config.peers.is_empty();
        if group && !config.peers.contains_key(&id) {
            return Err(StoreError::Invalid(format!(
                "node {id} is not in its own peer list"
            )));
        }
        let voters: Vec<u64> = if group {
            config.peers.keys().copied().collect()
        } else {
            vec![id]
        };
        let unavailable = |what: &str, e: &dyn std::fmt::Display| {
            StoreError::Unavailable(format!("{what} in {}: {e}", config.data_dir.display()))
        };
        let (wal, recovered) = wal::Wal::open(&config.data_dir)
            .map_err(|e| unavailable("opening the write-ahead log", &e))?;

        // Rebuild the log storage and the state machine: the snapshot, then
        // the log after it (raft-rs hands the committed part back to apply).
        let mem = MemStorage::new();
        let mut state = State::default();
        let mut snapshot = Snapshot::default();
        let mut snap_index = 0;
        if let Some(snap) = recovered.snapshot {
            snap_index = snap.get_metadata().index;
            state = codec::restore(&snap.data, Instant::now())?;
            mem.wl()
                .apply_snapshot(snap.clone())
                .map_err(|e| unavailable("loading the snapshot", &e))?;
            snapshot = snap;
        } else {
            mem.wl()
                .set_conf_state(ConfState::from((voters.clone(), Vec::<u64>::new())));
        }
        let last_index = recovered.entries.last().map_or(snap_index, |e| e.index);
        mem.wl()
            .append(&recovered.entries)
            .map_err(|e| unavailable("loading the log", &e))?;
        if let Some(mut hs) = recovered.hard_state {
            // The commit index is only a hint: it is at least the snapshot's,
            // and cannot pass the log's end (a cut-off tail is learnt again).
            hs.commit = hs.commit.max(snap_index).min(last_index);
            mem.wl().set_hardstate(hs);
        }
        tracing::info!(
            node = id,
            dir = %config.data_dir.display(),
            snapshot = snap_index,
            last_index,
            revision = state.revision,
            "embedded store opened"
        );

        let raft_config = Config {
            id,
            election_tick: node::ELECTION_TICKS,
            heartbeat_tick: node::HEARTBEAT_TICKS,
            applied: snap_index,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            pre_vote: true,
            check_quorum: true,
            ..Config::default()
        };
        raft_config
            .validate()
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        let logger = slog::Logger::root(TracingDrain, slog::o!("node" => id));
        let storage = DiskStorage { mem, snapshot };
        let mut raw = RawNode::new(&raft_config, storage, &logger)
            .map_err(|e| unavailable("starting raft", &e))?;
        if voters.len() == 1 {
            // Alone, it need not wait out an election timeout.
            raw.campaign()
                .map_err(|e| unavailable("starting raft", &e))?;
        }

        let (tx, rx) = std::sync::mpsc::channel();
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            leader: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
        });
        let mut clients = HashMap::new();
        let mut senders = HashMap::new();
        for (&peer, url) in config.peers.iter().filter(|(p, _)| **p != id) {
            let endpoint = Endpoint::from_shared(url.clone())
                .map_err(|e| StoreError::Invalid(format!("peer {peer} address {url:?}: {e}")))?
                .connect_timeout(Duration::from_millis(500))
                .timeout(REQUEST_TIMEOUT + Duration::from_secs(1));
            let client = RaftClient::new(endpoint.connect_lazy());
            senders.insert(peer, peer::spawn_sender(peer, client.clone(), tx.clone()));
            clients.insert(peer, client);
        }
        let core = Arc::new(Core {
            id,
            tx,
            shared: shared.clone(),
            peers: clients,
        });

        let mut server = None;
        if group {
            let listener = match listener {
                Some(l) => l,
                None => {
                    let addr = listen_address(&config.peers[&id]);
                    TcpListener::bind(addr)
                        .await
                        .map_err(|e| unavailable(&format!("binding {addr}"), &e))?
                }
            };
            let (stop, stopped) = oneshot::channel::<()>();
            let service = pb::raft_server::RaftServer::new(RaftService { core: core.clone() });
            tokio::spawn(async move {
                let served = tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                        let _ = stopped.await;
                    })
                    .await;
                if let Err(e) = served {
                    tracing::error!(node = id, error = %e, "the raft peer service failed");
                }
            });
            server = Some(stop);
        }

        let node = Node::new(
            id,
            raw,
            wal,
            shared,
            senders,
            snap_index,
            config.snapshot_every,
        );
        let thread = std::thread::Builder::new()
            .name(format!("raft-{id}"))
            .spawn(move || node.run(rx))
            .map_err(|e| StoreError::Unavailable(format!("starting the raft thread: {e}")))?;
        Ok(Self {
            inner: Arc::new(Running {
                core,
                thread: Mutex::new(Some(thread)),
                server: Mutex::new(server),
            }),
        })
    }

    fn core(&self) -> &Core {
        &self.inner.core
    }

    /// The revision this node has applied.
    pub fn revision(&self) -> Revision {
        lock(&self.core().shared.state).revision
    }

    /// This node's id.
    pub fn id(&self) -> u64 {
        self.core().id
    }

    /// The leader this node knows of, if any.
    pub fn leader(&self) -> Option<u64> {
        Some(self.core().shared.leader.load(Ordering::SeqCst)).filter(|&l| l != 0)
    }

    /// Stops the node (every clone's calls fail with `Unavailable` from now on)
    /// and waits until its files are closed.
    pub async fn shutdown(&self) {
        self.inner.halt();
        let thread = self
            .inner
            .thread
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.core().barrier().await?;
        Ok(lock(&self.core().shared.state).get(key))
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        if key.is_empty() {
            return Err(StoreError::Invalid("empty key".into()));
        }
        let op = TxnOp::Put {
            key: key.to_owned(),
            value,
            lease,
        };
        let applied = self
            .core()
            .propose(codec::txn(vec![], vec![op], vec![]))
            .await?;
        Ok(applied.revision)
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let cmd = codec::command(pb::command::Kind::Delete(key.to_owned()));
        Ok(self.core().propose(cmd).await?.succeeded)
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        self.core().barrier().await?;
        Ok(lock(&self.core().shared.state).list(prefix))
    }

    async fn watch(
        &self,
        prefix: &str,
        start: Option<Revision>,
    ) -> Result<WatchStream, StoreError> {
        self.core().barrier().await?;
        lock(&self.core().shared.state).watch(prefix, start)
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let ms = i64::try_from(ttl.as_millis())
            .ok()
            .filter(|&ms| ms > 0)
            .ok_or_else(|| StoreError::Invalid("a lease needs a TTL above zero".into()))?;
        let cmd = codec::command(pb::command::Kind::LeaseGrantTtlMs(ms));
        Ok(self.core().propose(cmd).await?.lease)
    }

    async fn lease_keepalive(&self, id: LeaseId) -> Result<(), StoreError> {
        let core = self.core();
        core.with_leader(|route| async move {
            match route {
                Route::Remote(mut c) => c
                    .lease_keep_alive(pb::KeepAliveRequest { id })
                    .await
                    .map(|_| ())
                    .map_err(Core::forwarded),
                _ => core.keepalive_local(id).await,
            }
        })
        .await
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<(), StoreError> {
        let cmd = codec::command(pb::command::Kind::LeaseRevoke(id));
        self.core().propose(cmd).await.map(|_| ())
    }

    async fn txn(
        &self,
        compare: Vec<Compare>,
        success: Vec<TxnOp>,
        failure: Vec<TxnOp>,
    ) -> Result<bool, StoreError> {
        let cmd = codec::txn(compare, success, failure);
        Ok(self.core().propose(cmd).await?.succeeded)
    }
}
