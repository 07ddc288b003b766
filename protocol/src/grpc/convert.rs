//! Conversions between the shared types and their gRPC messages.

use super::worker::{KvCleared, KvEventMessage, KvRemoved, KvStored, kv_event_message::Kind};
use crate::{BlockHash, KvEvent, KvEventKind};

/// Block hashes as their wire integers.
pub fn raw(hashes: &[BlockHash]) -> Vec<u64> {
    hashes.iter().map(|h| h.0).collect()
}

/// Wire integers as block hashes.
pub fn typed(hashes: Vec<u64>) -> Vec<BlockHash> {
    hashes.into_iter().map(BlockHash).collect()
}

impl From<&KvEvent> for KvEventMessage {
    fn from(ev: &KvEvent) -> Self {
        let kind = match &ev.kind {
            KvEventKind::Stored { parent, hashes } => Kind::Stored(KvStored {
                parent: parent.map(|h| h.0),
                hashes: raw(hashes),
            }),
            KvEventKind::Removed { hashes } => Kind::Removed(KvRemoved {
                hashes: raw(hashes),
            }),
            KvEventKind::Cleared => Kind::Cleared(KvCleared {}),
        };
        Self {
            seq: ev.seq,
            kind: Some(kind),
        }
    }
}

impl TryFrom<KvEventMessage> for KvEvent {
    type Error = String;

    fn try_from(m: KvEventMessage) -> Result<Self, String> {
        let kind = match m.kind {
            Some(Kind::Stored(s)) => KvEventKind::Stored {
                parent: s.parent.map(BlockHash),
                hashes: typed(s.hashes),
            },
            Some(Kind::Removed(r)) => KvEventKind::Removed {
                hashes: typed(r.hashes),
            },
            Some(Kind::Cleared(_)) => KvEventKind::Cleared,
            None => return Err(format!("KV event {} carries no kind", m.seq)),
        };
        Ok(Self { seq: m.seq, kind })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip() {
        let events = [
            KvEventKind::Stored {
                parent: Some(BlockHash(7)),
                hashes: vec![BlockHash(1), BlockHash(2)],
            },
            KvEventKind::Stored {
                parent: None,
                hashes: vec![BlockHash(3)],
            },
            KvEventKind::Removed {
                hashes: vec![BlockHash(9)],
            },
            KvEventKind::Cleared,
        ];
        for (seq, kind) in events.into_iter().enumerate() {
            let ev = KvEvent {
                seq: seq as u64,
                kind,
            };
            let back = KvEvent::try_from(KvEventMessage::from(&ev)).expect("converts");
            assert_eq!(back, ev);
        }
        let empty = KvEventMessage { seq: 4, kind: None };
        assert!(KvEvent::try_from(empty).is_err());
    }
}
