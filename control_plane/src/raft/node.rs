//! The Raft node: one thread per store that drives raft-rs's `RawNode`. It
//! takes messages from peers, proposals and read requests over a channel, ticks
//! the clock, and handles every `Ready` as raft-rs's contract requires: log
//! entries and the hard state are appended to the write-ahead log and synced
//! before the messages that depend on them are sent and before `advance`;
//! committed commands are applied to the shared [`State`] in log order.
//!
//! As leader it also expires leases: lease deadlines live in this process only
//! (they restart when a node becomes leader), and an expired lease is revoked by
//! proposing a `LeaseRevoke`, so every node deletes its keys at the same revision.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use raft::prelude::{Entry, EntryType, Message, MessageType, Snapshot};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, RawNode, SnapshotStatus, StateRole, Storage};
use tandem_protocol::grpc::raft as pb;
use tokio::sync::oneshot;

use super::codec::{self, Applied};
use super::wal::Wal;
use crate::mem::lock;
use crate::state::State;
use crate::store::{LeaseId, StoreError};

/// One tick of the Raft clock.
pub(crate) const TICK: Duration = Duration::from_millis(50);
/// Ticks without a leader before a follower campaigns (raft-rs randomizes
/// between this and twice this).
pub(crate) const ELECTION_TICKS: usize = 10;
/// Ticks between the leader's heartbeats.
pub(crate) const HEARTBEAT_TICKS: usize = 2;
/// How long a proposed lease revocation is waited for before it is proposed again.
const REVOKE_RETRY: Duration = Duration::from_secs(1);

/// What the node thread and the store's callers share.
pub(crate) struct Shared {
    pub(crate) state: Mutex<State>,
    /// The leader as this node last heard (0: none known).
    pub(crate) leader: AtomicU64,
    /// Set once the node has stopped (asked to, or on a disk error).
    pub(crate) stopped: AtomicBool,
}

/// Why a proposal did not produce a result.
#[derive(Debug)]
pub(crate) enum ProposeError {
    /// This node is not the leader; nothing was proposed (safe to retry elsewhere).
    NotLeader,
    Store(StoreError),
}

pub(crate) type ProposeReply = oneshot::Sender<Result<Applied, ProposeError>>;

/// What the node thread is asked to do.
pub(crate) enum Msg {
    /// A message from a peer.
    Step(Box<Message>),
    /// A command to append to the log; answered once applied.
    Propose {
        command: Vec<u8>,
        reply: ProposeReply,
    },
    /// A linearizable-read barrier: answered once this node has applied
    /// everything committed when the request reached the leader.
    ReadIndex {
        reply: oneshot::Sender<()>,
    },
    /// How sending a snapshot to a peer went.
    SnapshotStatus {
        to: u64,
        ok: bool,
    },
    /// A peer could not be reached.
    Unreachable(u64),
    Stop,
}

/// raft-rs's log storage: the entries in memory (the write-ahead log is their
/// durable copy) and the latest snapshot, with its data, for followers that
/// fall behind the compacted log.
pub(crate) struct DiskStorage {
    pub(crate) mem: MemStorage,
    pub(crate) snapshot: Snapshot,
}

impl Storage for DiskStorage {
    fn initial_state(&self) -> raft::Result<raft::RaftState> {
        self.mem.initial_state()
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.mem.entries(low, high, max_size, context)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.mem.term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.mem.first_index()
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.mem.last_index()
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.snapshot.get_metadata().index >= request_index.max(1) {
            Ok(self.snapshot.clone())
        } else {
            Err(raft::Error::Store(
                raft::StorageError::SnapshotTemporarilyUnavailable,
            ))
        }
    }
}

/// A proposal's context: who proposed it and its number there.
fn context(id: u64, rid: u64) -> Vec<u8> {
    let mut c = id.to_le_bytes().to_vec();
    c.extend_from_slice(&rid.to_le_bytes());
    c
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Why the node thread stopped on its own.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Fatal {
    #[error("write-ahead log: {0}")]
    Disk(#[from] std::io::Error),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("{0}")]
    Store(#[from] StoreError),
}

pub(crate) struct Node {
    pub(crate) id: u64,
    pub(crate) raw: RawNode<DiskStorage>,
    pub(crate) wal: Wal,
    pub(crate) shared: Arc<Shared>,
    /// Outgoing messages, one queue per peer.
    pub(crate) peers: HashMap<u64, tokio::sync::mpsc::UnboundedSender<Message>>,
    /// The last applied log index.
    pub(crate) applied: u64,
    /// The index of the last snapshot taken or installed.
    pub(crate) last_snapshot: u64,
    /// Applied entries between snapshots.
    pub(crate) snapshot_every: u64,
    next_rid: u64,
    proposals: HashMap<u64, ProposeReply>,
    reads: HashMap<u64, oneshot::Sender<()>>,
    /// Reads the leader has confirmed, waiting for this node to apply their index.
    ready_reads: Vec<(u64, oneshot::Sender<()>)>,
    revoking: HashMap<LeaseId, Instant>,
    was_leader: bool,
}

impl Node {
    pub(crate) fn new(
        id: u64,
        raw: RawNode<DiskStorage>,
        wal: Wal,
        shared: Arc<Shared>,
        peers: HashMap<u64, tokio::sync::mpsc::UnboundedSender<Message>>,
        applied: u64,
        snapshot_every: u64,
    ) -> Node {
        Node {
            id,
            raw,
            wal,
            shared,
            peers,
            applied,
            last_snapshot: applied,
            snapshot_every: snapshot_every.max(1),
            next_rid: 0,
            proposals: HashMap::new(),
            reads: HashMap::new(),
            ready_reads: Vec::new(),
            revoking: HashMap::new(),
            was_leader: false,
        }
    }

    /// Runs until asked to stop or the channel closes; a disk or Raft error
    /// stops the node (it cannot go on without breaking its promises).
    pub(crate) fn run(mut self, rx: mpsc::Receiver<Msg>) {
        if let Err(e) = self.drive(rx) {
            tracing::error!(node = self.id, error = %e, "embedded store node stopped");
        }
        self.shared.stopped.store(true, Ordering::SeqCst);
        self.shared.leader.store(0, Ordering::SeqCst);
        // Nothing more will be applied here: watchers must resume elsewhere.
        lock(&self.shared.state).close_watchers();
    }

    fn drive(&mut self, rx: mpsc::Receiver<Msg>) -> Result<(), Fatal> {
        let mut last_tick = Instant::now();
        loop {
            let wait = TICK.saturating_sub(last_tick.elapsed());
            let mut msg = match rx.recv_timeout(wait) {
                Ok(m) => Some(m),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            };
            // Take everything queued, so one Ready covers a batch.
            while let Some(m) = msg {
                if !self.handle(m)? {
                    return Ok(());
                }
                msg = rx.try_recv().ok();
            }
            if last_tick.elapsed() >= TICK {
                last_tick = Instant::now();
                self.raw.tick();
                self.expire_leases()?;
            }
            // A Ready can lead to another (a single node commits what it has
            // just persisted).
            for _ in 0..4 {
                if !self.raw.has_ready() {
                    break;
                }
                self.on_ready()?;
            }
        }
    }

    /// Handles one request; false to stop.
    fn handle(&mut self, msg: Msg) -> Result<bool, Fatal> {
        match msg {
            Msg::Step(m) => {
                // A stale or misdirected message is not an error of this node.
                if let Err(e) = self.raw.step(*m) {
                    tracing::debug!(node = self.id, error = %e, "dropped a raft message");
                }
            }
            Msg::Propose { command, reply } => {
                if self.raw.raft.state != StateRole::Leader {
                    let _ = reply.send(Err(ProposeError::NotLeader));
                    return Ok(true);
                }
                self.next_rid += 1;
                let rid = self.next_rid;
                match self.raw.propose(context(self.id, rid), command) {
                    Ok(()) => {
                        self.proposals.insert(rid, reply);
                    }
                    Err(raft::Error::ProposalDropped) => {
                        let _ = reply.send(Err(ProposeError::NotLeader));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(ProposeError::Store(StoreError::Unavailable(
                            e.to_string(),
                        ))));
                    }
                }
            }
            Msg::ReadIndex { reply } => {
                self.next_rid += 1;
                self.reads.insert(self.next_rid, reply);
                self.raw.read_index(self.next_rid.to_le_bytes().to_vec());
            }
            Msg::SnapshotStatus { to, ok } => {
                let status = if ok {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.raw.report_snapshot(to, status);
            }
            Msg::Unreachable(to) => self.raw.report_unreachable(to),
            Msg::Stop => return Ok(false),
        }
        Ok(true)
    }

    /// As leader, proposes the revocation of every expired lease.
    fn expire_leases(&mut self) -> Result<(), Fatal> {
        if self.raw.raft.state != StateRole::Leader {
            return Ok(());
        }
        self.revoking.retain(|_, at| at.elapsed() < REVOKE_RETRY);
        let expired = lock(&self.shared.state).expired(tokio::time::Instant::now());
        for id in expired {
            if self.revoking.contains_key(&id) {
                continue;
            }
            tracing::debug!(node = self.id, lease = id, "lease expired; revoking");
            let cmd = codec::command(pb::command::Kind::LeaseRevoke(id));
            // Proposal number 0: nobody waits for it.
            if let Err(e) = self
                .raw
                .propose(context(self.id, 0), prost::Message::encode_to_vec(&cmd))
            {
                tracing::debug!(node = self.id, error = %e, "could not propose a lease revocation");
            }
            self.revoking.insert(id, Instant::now());
        }
        Ok(())
    }

    fn send(&self, msgs: Vec<Message>) {
        for m in msgs {
            if let Some(peer) = self.peers.get(&m.to) {
                let _ = peer.send(m);
            }
        }
    }

    fn on_leader_change(&mut self, leader: u64, role: StateRole) {
        self.shared.leader.store(leader, Ordering::SeqCst);
        let is_leader = role == StateRole::Leader;
        if is_leader && !self.was_leader {
            tracing::info!(
                node = self.id,
                term = self.raw.raft.term,
                "became the leader"
            );
            // The old leader's deadlines are gone: every lease starts afresh.
            lock(&self.shared.state).restart_leases(tokio::time::Instant::now());
            self.revoking.clear();
        }
        if !is_leader && self.was_leader {
            // Their outcome is unknown now; dropping the replies says so.
            self.proposals.clear();
        }
        // A read request may have been lost with the old leader; callers retry.
        self.reads.clear();
        self.was_leader = is_leader;
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) -> Result<(), Fatal> {
        for e in entries {
            self.applied = e.index;
            if e.data.is_empty() || e.get_entry_type() != EntryType::EntryNormal {
                // A new leader's empty entry (membership is static).
                continue;
            }
            let result = codec::apply(
                &mut lock(&self.shared.state),
                &e.data,
                tokio::time::Instant::now(),
            );
            if let Err(err) = &result {
                tracing::debug!(node = self.id, index = e.index, error = %err, "command refused");
            }
            if u64_at(&e.context, 0) == Some(self.id)
                && let Some(rid) = u64_at(&e.context, 8)
                && let Some(reply) = self.proposals.remove(&rid)
            {
                let _ = reply.send(result.map_err(ProposeError::Store));
            }
        }
        let applied = self.applied;
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.ready_reads)
            .into_iter()
            .partition(|(index, _)| *index <= applied);
        self.ready_reads = waiting;
        for (_, reply) in done {
            let _ = reply.send(());
        }
        Ok(())
    }

    /// Installs a snapshot from the leader: the state machine, the log storage
    /// and the files.
    fn install_snapshot(&mut self, snap: Snapshot) -> Result<(), Fatal> {
        let index = snap.get_metadata().index;
        tracing::info!(
            node = self.id,
            index,
            "installing a snapshot from the leader"
        );
        let restored = codec::restore(&snap.data, tokio::time::Instant::now())?;
        lock(&self.shared.state).restore(restored);
        let store = self.raw.mut_store();
        store.mem.wl().apply_snapshot(snap.clone())?;
        let hs = store.mem.rl().hard_state().clone();
        self.wal.compact(&snap, &hs, &[])?;
        store.snapshot = snap;
        self.applied = index;
        self.last_snapshot = index;
        Ok(())
    }

    /// Takes a snapshot and compacts the log once enough has been applied since
    /// the last one. Keeps half an interval of entries for followers slightly
    /// behind; those further behind get the snapshot.
    fn maybe_snapshot(&mut self) -> Result<(), Fatal> {
        if self.applied < self.last_snapshot + self.snapshot_every {
            return Ok(());
        }
        let applied = self.applied;
        let data = codec::snapshot(&lock(&self.shared.state));
        let store = self.raw.mut_store();
        let rs = store.mem.initial_state()?;
        let mut snap = Snapshot::default();
        {
            let meta = snap.mut_metadata();
            meta.index = applied;
            meta.term = store.mem.term(applied)?;
            meta.set_conf_state(rs.conf_state);
        }
        snap.data = data.into();
        let keep_from = applied
            .saturating_sub(self.snapshot_every / 2)
            .max(store.mem.first_index()?);
        let last = store.mem.last_index()?;
        let tail = store
            .mem
            .entries(keep_from, last + 1, None, GetEntriesContext::empty(false))?;
        let mut hs = rs.hard_state;
        hs.commit = hs.commit.max(applied);
        self.wal.compact(&snap, &hs, &tail)?;
        store.mem.wl().compact(keep_from)?;
        store.snapshot = snap;
        self.last_snapshot = applied;
        tracing::debug!(node = self.id, index = applied, "took a snapshot");
        Ok(())
    }

    fn on_ready(&mut self) -> Result<(), Fatal> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut rd = self.raw.ready();
        if let Some(ss) = rd.ss() {
            let (leader, role) = (ss.leader_id, ss.raft_state);
            self.on_leader_change(leader, role);
        }
        // Messages that need nothing on disk first (the leader's appends go out
        // while it writes its own copy).
        self.send(rd.take_messages());
        if !rd.snapshot().is_empty() {
            self.install_snapshot(rd.snapshot().clone())?;
        }
        self.apply_entries(rd.take_committed_entries())?;
        // Durable before anything that depends on it leaves this node.
        self.wal.append(rd.entries(), rd.hs())?;
        {
            let store = self.raw.mut_store();
            store.mem.wl().append(rd.entries())?;
            if let Some(hs) = rd.hs() {
                store.mem.wl().set_hardstate(hs.clone());
            }
        }
        for rs in rd.take_read_states() {
            if let Some(rid) = u64_at(&rs.request_ctx, 0)
                && let Some(reply) = self.reads.remove(&rid)
            {
                self.ready_reads.push((rs.index, reply));
            }
        }
        self.send(rd.take_persisted_messages());
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.raw
                .mut_store()
                .mem
                .wl()
                .mut_hard_state()
                .set_commit(commit);
        }
        self.send(light.take_messages());
        self.apply_entries(light.take_committed_entries())?;
        self.raw.advance_apply();
        // Reads whose index was already applied.
        self.apply_entries(Vec::new())?;
        self.maybe_snapshot()?;
        Ok(())
    }
}

/// Whether a message carries a snapshot (its sender reports how it went).
pub(crate) fn is_snapshot(m: &Message) -> bool {
    m.get_msg_type() == MessageType::MsgSnapshot
}
