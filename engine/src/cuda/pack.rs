//! Flattening a ragged batch into the index arrays the kernels read.
//!
//! A forward batch is a list of sequences, each a chunk of consecutive
//! positions with its own block table. The kernels see it as token rows: per
//! token its id, position, the pool offset its K/V go to and where its
//! sequence's block table starts in one concatenated table array; plus the
//! work lists of the two attention variants (decode: one-token chunks;
//! prefill: tiles of consecutive tokens of one sequence) and the rows whose
//! logits are wanted. Everything here is host code, checked without a GPU.

use super::{ATTN_PREFILL_TOKENS, CudaError};
use crate::kv_cache::KvLayout;
use crate::model::BatchSeq;

/// A batch as flat arrays, each uploaded to the device as is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PackedBatch {
    /// Token ids, one per row.
    pub tokens: Vec<u32>,
    /// Each token's position in its sequence.
    pub pos: Vec<i32>,
    /// Element offset (f16 units) of each token's slot in layer 0's K of the pool.
    pub kv_dst: Vec<i64>,
    /// Where each token's sequence's block table starts in `tables`.
    pub table_off: Vec<i32>,
    /// The block tables of every sequence with tokens, concatenated, each cut
    /// to the blocks its chunk reaches.
    pub tables: Vec<i32>,
    /// Rows of one-token chunks: the decode attention's list.
    pub decode: Vec<i32>,
    /// (first row, count) pairs, flattened: the prefill attention's tiles, at
    /// most `ATTN_PREFILL_TOKENS` consecutive rows of one sequence each.
    pub tiles: Vec<i32>,
    /// The row of each sequence that wants logits (its chunk's last), in batch order.
    pub logit_rows: Vec<i32>,
}

impl PackedBatch {
    /// Token rows in the batch.
    pub fn n_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// Prefill attention tiles.
    pub fn n_tiles(&self) -> usize {
        self.tiles.len() / 2
    }
}

/// Packs `batch` for a pool of `num_blocks` blocks of `layout`, checking that
/// every block table covers its chunk and names blocks inside the pool (the
/// kernels do not bounds-check).
pub(crate) fn pack(
    batch: &[BatchSeq<'_>],
    layout: KvLayout,
    num_blocks: usize,
) -> Result<PackedBatch, CudaError> {
    let bs = layout.block_size;
    let kv_dim = (layout.n_kv_heads * layout.head_dim) as i64;
    let block_elems = layout.block_elems() as i64;
    let mut p = PackedBatch::default();
    for (i, s) in batch.iter().enumerate() {
        if s.tokens.is_empty() {
            continue;
        }
        let end = s.start_pos + s.tokens.len();
        let needed = end.div_ceil(bs);
        if s.blocks.len() < needed {
            return Err(CudaError::Batch(format!(
                "sequence {i} reaches position {} but its table has {} blocks of {bs}",
                end - 1,
                s.blocks.len()
            )));
        }
        let table = &s.blocks[..needed];
        if let Some(&b) = table.iter().find(|&&b| b as usize >= num_blocks) {
            return Err(CudaError::Batch(format!(
                "sequence {i} names block {b}, the pool has {num_blocks}"
            )));
        }
        let off = i32::try_from(p.tables.len())
            .ok()
            .filter(|_| i32::try_from(end).is_ok())
            .ok_or_else(|| CudaError::Batch("batch too large for 32-bit indices".into()))?;
        p.tables.extend(table.iter().map(|&b| b as i32));
        let first_row = p.tokens.len();
        for (j, &tok) in s.tokens.iter().enumerate() {
            let pos = s.start_pos + j;
            p.tokens.push(tok);
            p.pos.push(pos as i32);
            p.kv_dst
                .push(table[pos / bs] as i64 * block_elems + (pos % bs) as i64 * kv_dim);
            p.table_off.push(off);
        }
        let rows = first_row as i32..p.tokens.len() as i32;
        if s.tokens.len() == 1 {
            p.decode.push(rows.start);
        } else {
            let mut first = rows.start;
            while first < rows.end {
                let count = (rows.end - first).min(ATTN_PREFILL_TOKENS as i32);
                p.tiles.extend([first, count]);
                first += count;
            }
        }
        if s.want_logits {
            p.logit_rows.push(rows.end - 1);
        }
    }
    if i32::try_from(p.tokens.len()).is_err() {
        return Err(CudaError::Batch(
            "batch too large for 32-bit indices".into(),
        ));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> KvLayout {
        KvLayout {
            n_layers: 2,
            n_kv_heads: 2,
            head_dim: 4,
            block_size: 4,
        }
    }

    #[test]
    fn packs_a_mixed_batch_like_the_hand_built_expectation() {
        // kv_dim 8, block_elems = 2 layers * 2 (K, V) * 4 slots * 8 = 128.
        let prefill_tokens: Vec<u32> = (100..111).collect(); // 11 tokens at 2..13
        let batch = [
            BatchSeq {
                tokens: &[7],
                start_pos: 5,
                blocks: &[3, 9],
                want_logits: true,
            },
            BatchSeq {
                tokens: &[],
                start_pos: 0,
                blocks: &[],
                want_logits: true,
            },
            BatchSeq {
                tokens: &prefill_tokens,
                start_pos: 2,
                blocks: &[1, 4, 6, 8, 2],
                want_logits: false,
            },
            BatchSeq {
                tokens: &[42],
                start_pos: 0,
                blocks: &[5],
                want_logits: true,
            },
        ];
        let p = pack(&batch, layout(), 10).expect("the batch packs");
        let mut tokens = vec![7];
        tokens.extend(100..111);
        tokens.push(42);
        assert_eq!(p.tokens, tokens);
        let mut pos = vec![5];
        pos.extend(2..13);
        pos.push(0);
        assert_eq!(p.pos, pos);
        // Sequence 0 needs 2 blocks (position 5), sequence 2 needs 4 (position 12).
        assert_eq!(p.tables, vec![3, 9, 1, 4, 6, 8, 5]);
        let mut off = vec![0];
        off.extend([2; 11]);
        off.push(6);
        assert_eq!(p.table_off, off);
        // Position 5 → block 9 slot 1; position 2 → block 1 slot 2; position 4 →
        // block 4 slot 0; position 12 → block 8 slot 0; position 0 → block 5 slot 0.
        assert_eq!(p.kv_dst[0], 9 * 128 + 8);
        assert_eq!(p.kv_dst[1], 128 + 2 * 8);
        assert_eq!(p.kv_dst[3], 4 * 128);
        assert_eq!(p.kv_dst[11], 8 * 128);
        assert_eq!(p.kv_dst[12], 5 * 128);
        assert_eq!(p.decode, vec![0, 12]);
        assert_eq!(p.tiles, vec![1, 8, 9, 3]);
        assert_eq!(p.n_tiles(), 2);
        assert_eq!(p.logit_rows, vec![0, 12]);
    }

    #[test]
    fn rejects_short_tables_and_blocks_outside_the_pool() {
        let short = [BatchSeq {
            tokens: &[1, 2, 3, 4, 5],
            start_pos: 0,
            blocks: &[0],
            want_logits: true,
        }];
        let e = pack(&short, layout(), 10).unwrap_err().to_string();
        assert!(e.contains("position 4"), "{e}");
        let outside = [BatchSeq {
            tokens: &[1],
            start_pos: 0,
            blocks: &[10],
            want_logits: true,
        }];
        let e = pack(&outside, layout(), 10).unwrap_err().to_string();
        assert!(e.contains("block 10"), "{e}");
    }

    #[test]
    fn every_row_lands_in_exactly_one_attention_list() {
        let long: Vec<u32> = (0..37).collect();
        let batch = [
            BatchSeq {
                tokens: &long,
                start_pos: 0,
                blocks: &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
                want_logits: true,
            },
            BatchSeq {
                tokens: &[5],
                start_pos: 3,
                blocks: &[0],
                want_logits: false,
            },
        ];
        let p = pack(&batch, layout(), 10).expect("the batch packs");
        let mut seen = vec![0; p.n_tokens()];
        for &r in &p.decode {
            seen[r as usize] += 1;
        }
        for t in p.tiles.chunks(2) {
            assert!(t[1] >= 1 && t[1] as usize <= ATTN_PREFILL_TOKENS);
            for r in t[0]..t[0] + t[1] {
                seen[r as usize] += 1;
                // A tile never spans sequences.
                assert_eq!(p.table_off[r as usize], p.table_off[t[0] as usize]);
            }
        }
        assert!(seen.iter().all(|&s| s == 1), "{seen:?}");
        assert_eq!(p.logit_rows, vec![36]);
    }
}
