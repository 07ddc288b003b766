//! KV cache events: what a worker tells routers about blocks entering and leaving its cache.

use serde::{Deserialize, Serialize};

use crate::BlockHash;

/// One change to a worker's set of cached blocks, numbered per worker so a
/// subscriber can detect a gap and ask for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEvent {
    /// Per-worker sequence number, starting at 0 and increasing by one per event.
    pub seq: u64,
    pub kind: KvEventKind,
}

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum KvEventKind {
    /// Full blocks became reusable; `hashes` chain on from `parent` (`None`: from the start of a sequence).
    Stored {
        parent: Option<BlockHash>,
        hashes: Vec<BlockHash>,
    },
    /// Blocks were evicted and can no longer be reused.
    Removed { hashes: Vec<BlockHash> },
    /// Every cached block was dropped.
    Cleared,
}
