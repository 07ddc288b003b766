//! What a transfer moves: block descriptors and block-layer pieces.

use serde::{Deserialize, Serialize};
use tandem_engine::engine::KvReservation;
use tandem_engine::kv_cache::{BlockId, KvLayout};

/// Element type of the KV values. The engine's cache is f16 throughout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DType {
    F16,
}

/// The blocks a transfer fills, as the receiver reserved them.
///
/// Block `i` of the sequence holds tokens `i * block_size ..`; `blocks[i]` is its
/// id in the receiver's pool. The receiver already holds blocks
/// `..first_block` (prefix reuse), so the sender writes every layer of blocks
/// `first_block..blocks.len()`: `(blocks.len() - first_block) * n_layers`
/// pieces of `piece_bytes` each, in the cache's block layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferDescriptor {
    /// Names the transfer on the receiver (unique there while it is pending).
    pub transfer_id: u64,
    /// The request whose prompt the KV belongs to.
    pub request_id: u64,
    pub layout: KvLayout,
    pub dtype: DType,
    /// Tokens whose KV the blocks hold.
    pub tokens: usize,
    /// Target block ids in the receiver's pool, in sequence order.
    pub blocks: Vec<BlockId>,
    /// Leading blocks the receiver already holds; the sender skips them.
    pub first_block: usize,
}

impl TransferDescriptor {
    /// Describes an engine reservation as a transfer for `request_id`.
    pub fn for_reservation(transfer_id: u64, request_id: u64, r: &KvReservation) -> Self {
        Self {
            transfer_id,
            request_id,
            layout: r.layout,
            dtype: DType::F16,
            tokens: r.tokens.len(),
            blocks: r.blocks.clone(),
            first_block: r.cached_blocks,
        }
    }

    /// Bytes of one block-layer piece.
    pub fn piece_bytes(&self) -> usize {
        self.layout.piece_bytes()
    }

    /// Pieces the sender must write.
    pub fn pieces(&self) -> usize {
        (self.blocks.len() - self.first_block.min(self.blocks.len())) * self.layout.n_layers
    }

    /// Bytes the sender must write.
    pub fn bytes(&self) -> u64 {
        self.pieces() as u64 * self.piece_bytes() as u64
    }

    /// Checks a batch against the descriptor; returns its piece count.
    pub fn check(&self, batch: &PieceBatch) -> Result<usize, String> {
        let pb = self.piece_bytes();
        if batch.layer as usize >= self.layout.n_layers {
            return Err(format!(
                "layer {} of a model with {} layers",
                batch.layer, self.layout.n_layers
            ));
        }
        if batch.data.is_empty() || !batch.data.len().is_multiple_of(pb) {
            return Err(format!(
                "{} bytes is not whole pieces of {pb} bytes",
                batch.data.len()
            ));
        }
        let count = batch.data.len() / pb;
        let first = batch.first_block as usize;
        if first < self.first_block || first + count > self.blocks.len() {
            return Err(format!(
                "blocks {first}..{} outside the transfer's {}..{}",
                first + count,
                self.first_block,
                self.blocks.len()
            ));
        }
        Ok(count)
    }

    /// The receiver's checks on a descriptor a sender presents.
    pub(crate) fn matches(&self, other: &Self) -> Result<(), String> {
        if self.layout != other.layout || self.dtype != other.dtype {
            return Err(format!(
                "layout {:?}/{:?}, expected {:?}/{:?}",
                other.layout, other.dtype, self.layout, self.dtype
            ));
        }
        if self.blocks != other.blocks || self.first_block != other.first_block {
            return Err("target blocks differ from the reservation".into());
        }
        if self.request_id != other.request_id || self.tokens != other.tokens {
            return Err(format!(
                "request {} with {} tokens, expected request {} with {}",
                other.request_id, other.tokens, self.request_id, self.tokens
            ));
        }
        Ok(())
    }
}

/// One layer's pieces of consecutive blocks, in block order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PieceBatch {
    pub layer: u32,
    /// Index in the sequence of the first block (not a pool block id).
    pub first_block: u32,
    /// `count * piece_bytes` bytes.
    pub data: Vec<u8>,
}

/// The checksum of one piece. A transfer's checksum is the wrapping sum over
/// its pieces, so it does not depend on the order pieces land in (one-sided
/// writes may land in any order) and a sender can compute it from its source.
pub fn piece_checksum(block_index: usize, layer: usize, bytes: &[u8]) -> u64 {
    let seed = ((block_index as u64) << 16) ^ layer as u64;
    xxhash_rust::xxh3::xxh3_64_with_seed(bytes, seed)
}

/// Adds the checksums of every piece in `batch` to `sum`.
pub(crate) fn add_batch_checksum(sum: &mut u64, batch: &PieceBatch, piece_bytes: usize) {
    for (i, piece) in batch.data.chunks_exact(piece_bytes).enumerate() {
        let c = piece_checksum(batch.first_block as usize + i, batch.layer as usize, piece);
        *sum = sum.wrapping_add(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc() -> TransferDescriptor {
        TransferDescriptor {
            transfer_id: 1,
            request_id: 2,
            layout: KvLayout {
                n_layers: 2,
                n_kv_heads: 1,
                head_dim: 4,
                block_size: 4,
            },
            dtype: DType::F16,
            tokens: 14,
            blocks: vec![7, 3, 9, 5],
            first_block: 1,
        }
    }

    #[test]
    fn batches_are_checked_against_the_reserved_range() {
        let d = desc();
        let pb = d.piece_bytes();
        assert_eq!((d.pieces(), d.bytes()), (6, 6 * pb as u64));
        let batch = |layer, first_block, pieces: usize| PieceBatch {
            layer,
            first_block,
            data: vec![0; pieces * pb],
        };
        assert_eq!(d.check(&batch(1, 1, 3)), Ok(3));
        assert!(
            d.check(&batch(0, 0, 1)).is_err(),
            "a block the receiver holds"
        );
        assert!(d.check(&batch(0, 2, 3)).is_err(), "past the last block");
        assert!(d.check(&batch(2, 1, 1)).is_err(), "no such layer");
        let mut ragged = batch(0, 1, 1);
        ragged.data.pop();
        assert!(d.check(&ragged).is_err(), "not whole pieces");
    }

    #[test]
    fn checksum_does_not_depend_on_batch_order_but_on_placement() {
        let d = desc();
        let pb = d.piece_bytes();
        let a = PieceBatch {
            layer: 0,
            first_block: 1,
            data: (0..3 * pb).map(|i| i as u8).collect(),
        };
        let b = PieceBatch {
            layer: 1,
            first_block: 1,
            data: (0..3 * pb).map(|i| (i * 7) as u8).collect(),
        };
        let (mut x, mut y) = (0, 0);
        add_batch_checksum(&mut x, &a, pb);
        add_batch_checksum(&mut x, &b, pb);
        add_batch_checksum(&mut y, &b, pb);
        add_batch_checksum(&mut y, &a, pb);
        assert_eq!(x, y);
        let moved = PieceBatch {
            layer: 1,
            ..a.clone()
        };
        let mut z = 0;
        add_batch_checksum(&mut z, &moved, pb);
        add_batch_checksum(&mut z, &b, pb);
        assert_ne!(x, z, "the same bytes in another layer sum differently");
    }
}
