//! The log's commands and the state machine's snapshots, as protobuf
//! (`tandem.raft.v1` in `protocol/proto/raft.proto`), and applying a command.

use std::time::Duration;

use prost::Message as _;
use tandem_protocol::grpc::raft as pb;
use tokio::time::Instant;

use crate::state::{Lease, State};
use crate::store::{Compare, Event, KeyValue, LeaseId, Revision, StoreError, TxnOp};

/// What applying a command gave.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Applied {
    /// The store's revision after the command.
    pub(crate) revision: Revision,
    /// Txn: whether the comparisons held. Delete: whether the key existed.
    pub(crate) succeeded: bool,
    /// LeaseGrant: the new lease.
    pub(crate) lease: LeaseId,
}

fn op_to_pb(op: TxnOp) -> pb::Op {
    pb::Op {
        op: Some(match op {
            TxnOp::Put { key, value, lease } => pb::op::Op::Put(pb::Put {
                key,
                value,
                lease: lease.unwrap_or(0),
            }),
            TxnOp::Delete { key } => pb::op::Op::Delete(key),
        }),
    }
}

fn op_from_pb(op: pb::Op) -> Option<TxnOp> {
    Some(match op.op? {
        pb::op::Op::Put(p) => TxnOp::Put {
            key: p.key,
            value: p.value,
            lease: (p.lease != 0).then_some(p.lease),
        },
        pb::op::Op::Delete(key) => TxnOp::Delete { key },
    })
}

/// A transaction command (a put is one with no comparisons).
pub(crate) fn txn(compare: Vec<Compare>, success: Vec<TxnOp>, failure: Vec<TxnOp>) -> pb::Command {
    pb::Command {
        kind: Some(pb::command::Kind::Txn(pb::Txn {
            compare: compare
                .into_iter()
                .map(|c| pb::Compare {
                    key: c.key,
                    mod_revision: c.mod_revision,
                })
                .collect(),
            success: success.into_iter().map(op_to_pb).collect(),
            failure: failure.into_iter().map(op_to_pb).collect(),
        })),
    }
}

pub(crate) fn command(kind: pb::command::Kind) -> pb::Command {
    pb::Command { kind: Some(kind) }
}

/// Applies one committed command. Every node applies the same commands in the
/// same order, so every outcome (errors included) depends only on the state.
pub(crate) fn apply(state: &mut State, data: &[u8], now: Instant) -> Result<Applied, StoreError> {
    let cmd = pb::Command::decode(data)
        .map_err(|e| StoreError::Invalid(format!("undecodable command: {e}")))?;
    let mut out = Applied::default();
    match cmd.kind {
        Some(pb::command::Kind::Txn(t)) => {
            let compare: Vec<Compare> = t
                .compare
                .into_iter()
                .map(|c| Compare {
                    key: c.key,
                    mod_revision: c.mod_revision,
                })
                .collect();
            let ops = |ops: Vec<pb::Op>| -> Vec<TxnOp> {
                ops.into_iter().filter_map(op_from_pb).collect()
            };
            out.succeeded = state.txn(&compare, ops(t.success), ops(t.failure))?;
        }
        Some(pb::command::Kind::Delete(key)) => out.succeeded = state.delete(&key),
        Some(pb::command::Kind::LeaseGrantTtlMs(ms)) => {
            let ms = u64::try_from(ms)
                .ok()
                .filter(|&ms| ms > 0)
                .ok_or_else(|| StoreError::Invalid("a lease needs a TTL above zero".into()))?;
            out.lease = state.grant(Duration::from_millis(ms), now);
        }
        Some(pb::command::Kind::LeaseRevoke(id)) => {
            if !state.revoke(id) {
                return Err(StoreError::LeaseNotFound(id));
            }
        }
        None => return Err(StoreError::Invalid("a command without a kind".into())),
    }
    out.revision = state.revision;
    Ok(out)
}

fn kv_to_pb(kv: &KeyValue) -> pb::KeyValue {
    pb::KeyValue {
        key: kv.key.clone(),
        value: kv.value.clone(),
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        lease: kv.lease,
    }
}

fn kv_from_pb(kv: pb::KeyValue) -> KeyValue {
    KeyValue {
        key: kv.key,
        value: kv.value,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        lease: kv.lease,
    }
}

/// The state machine's data (not its watchers or lease deadlines).
pub(crate) fn snapshot(state: &State) -> Vec<u8> {
    let mut leases: Vec<pb::Lease> = state
        .leases
        .iter()
        .map(|(&id, l)| pb::Lease {
            id,
            ttl_ms: i64::try_from(l.ttl.as_millis()).unwrap_or(i64::MAX),
        })
        .collect();
    leases.sort_by_key(|l| l.id);
    pb::StateSnapshot {
        revision: state.revision,
        next_lease: state.next_lease,
        kvs: state.kvs.values().map(kv_to_pb).collect(),
        leases,
        history: state
            .history
            .iter()
            .map(|ev| match ev {
                Event::Put(kv) => pb::HistoryEvent {
                    kv: Some(kv_to_pb(kv)),
                    deleted: false,
                },
                Event::Delete { key, revision } => pb::HistoryEvent {
                    kv: Some(pb::KeyValue {
                        key: key.clone(),
                        mod_revision: *revision,
                        ..Default::default()
                    }),
                    deleted: true,
                },
            })
            .collect(),
    }
    .encode_to_vec()
}

/// The state a snapshot holds, every lease's deadline its TTL after `now`.
pub(crate) fn restore(data: &[u8], now: Instant) -> Result<State, StoreError> {
    let snap = pb::StateSnapshot::decode(data)
        .map_err(|e| StoreError::Unavailable(format!("undecodable snapshot: {e}")))?;
    let mut state = State::default();
    state.revision = snap.revision;
    state.next_lease = snap.next_lease;
    for l in snap.leases {
        let ttl = Duration::from_millis(u64::try_from(l.ttl_ms).unwrap_or(0));
        state.leases.insert(
            l.id,
            Lease {
                ttl,
                deadline: now + ttl,
                keys: Default::default(),
            },
        );
    }
    for kv in snap.kvs {
        if let Some(l) = state.leases.get_mut(&kv.lease) {
            l.keys.insert(kv.key.clone());
        }
        state.kvs.insert(kv.key.clone(), kv_from_pb(kv));
    }
    state.history = snap
        .history
        .into_iter()
        .filter_map(|ev| {
            let kv = ev.kv?;
            Some(if ev.deleted {
                Event::Delete {
                    key: kv.key,
                    revision: kv.mod_revision,
                }
            } else {
                Event::Put(kv_from_pb(kv))
            })
        })
        .collect();
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_restores_the_same_state() {
        let now = Instant::now();
        let mut s = State::default();
        let grant = command(pb::command::Kind::LeaseGrantTtlMs(5000)).encode_to_vec();
        let lease = apply(&mut s, &grant, now).expect("grant").lease;
        let put = |key: &str, lease| {
            txn(
                vec![],
                vec![TxnOp::Put {
                    key: key.into(),
                    value: b"v".to_vec(),
                    lease,
                }],
                vec![],
            )
            .encode_to_vec()
        };
        apply(&mut s, &put("/a", Some(lease)), now).expect("put");
        apply(&mut s, &put("/b", None), now).expect("put");
        let del = command(pb::command::Kind::Delete("/b".into())).encode_to_vec();
        assert!(apply(&mut s, &del, now).expect("delete").succeeded);
        let r = restore(&snapshot(&s), now).expect("restore");
        assert_eq!(r.revision, s.revision);
        assert_eq!(r.kvs, s.kvs);
        assert_eq!(r.history, s.history);
        assert_eq!(r.next_lease, s.next_lease);
        assert!(r.leases[&lease].keys.contains("/a"));
        // Revoking the restored lease deletes its key.
        let mut r = r;
        let revoke = command(pb::command::Kind::LeaseRevoke(lease)).encode_to_vec();
        apply(&mut r, &revoke, now).expect("revoke");
        assert!(r.kvs.is_empty());
        assert_eq!(
            apply(&mut r, &revoke, now),
            Err(StoreError::LeaseNotFound(lease))
        );
    }
}
