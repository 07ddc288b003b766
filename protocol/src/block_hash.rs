//! Chained token-block hashes.
//!
//! A block's hash is xxh3-64, seeded with the model salt, over the parent
//! block's hash (little-endian u64; 0 for the first block) followed by the
//! block's token ids as little-endian u32. Because each hash covers its parent,
//! one hash names a whole prefix. Only full blocks are hashed.

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Tokens per KV block unless a model card says otherwise.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// The hash of a full token block and, through its parent chain, of its whole prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BlockHash(pub u64);

/// Hashes token blocks for one model and block size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHasher {
    seed: u64,
    block_size: usize,
}

impl BlockHasher {
    /// A hasher salted with the model's name, so two models never share hashes.
    ///
    /// # Panics
    /// If `block_size` is zero.
    pub fn new(model_salt: &str, block_size: usize) -> Self {
        assert!(block_size > 0, "block size must be positive");
        Self {
            seed: xxh3_64(model_salt.as_bytes()),
            block_size,
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The hash of one full block given its parent's hash (`None` for the first block).
    pub fn hash_block(&self, parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
        let mut buf = Vec::with_capacity(8 + 4 * tokens.len());
        self.hash_with(parent, tokens, &mut buf)
    }

    /// `hash_block` with the caller's scratch buffer (one allocation per prompt).
    fn hash_with(&self, parent: Option<BlockHash>, tokens: &[u32], buf: &mut Vec<u8>) -> BlockHash {
        debug_assert_eq!(tokens.len(), self.block_size, "only full blocks are hashed");
        buf.clear();
        buf.extend_from_slice(&parent.map_or(0, |p| p.0).to_le_bytes());
        for t in tokens {
            buf.extend_from_slice(&t.to_le_bytes());
        }
        BlockHash(xxh3_64_with_seed(buf, self.seed))
    }

    /// The hashes of every full block of `tokens`, in order; a trailing partial block is skipped.
    pub fn hash_prefix(&self, tokens: &[u32]) -> Vec<BlockHash> {
        let mut parent = None;
        let mut buf = Vec::with_capacity(8 + 4 * self.block_size);
        tokens
            .chunks_exact(self.block_size)
            .map(|block| {
                let h = self.hash_with(parent, block, &mut buf);
                parent = Some(h);
                h
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn salt_and_block_size_matter() {
        let tokens: Vec<u32> = (0..32).collect();
        let a = BlockHasher::new("model-a", 16).hash_prefix(&tokens);
        let b = BlockHasher::new("model-b", 16).hash_prefix(&tokens);
        assert_eq!(a.len(), 2);
        assert_ne!(a, b);
        assert_eq!(BlockHasher::new("model-a", 8).hash_prefix(&tokens).len(), 4);
    }

    #[test]
    fn prefix_hashes_chain_block_hashes() {
        let h = BlockHasher::new("m", 4);
        let tokens: Vec<u32> = (0..12).collect();
        let first = h.hash_block(None, &tokens[..4]);
        let second = h.hash_block(Some(first), &tokens[4..8]);
        let third = h.hash_block(Some(second), &tokens[8..]);
        assert_eq!(h.hash_prefix(&tokens), [first, second, third]);
    }

    #[test]
    fn partial_block_is_not_hashed() {
        let h = BlockHasher::new("m", 16);
        assert!(h.hash_prefix(&[1; 15]).is_empty());
        assert_eq!(h.hash_prefix(&[1; 31]).len(), 1);
    }

    proptest! {
        /// Hashing is a prefix function: extending the tokens never changes earlier hashes.
        #[test]
        fn prefix_property(tokens in proptest::collection::vec(0u32..50_000, 0..100), extra in proptest::collection::vec(0u32..50_000, 0..40)) {
            let h = BlockHasher::new("m", 8);
            let short = h.hash_prefix(&tokens);
            let mut longer = tokens.clone();
            longer.extend(&extra);
            let long = h.hash_prefix(&longer);
            prop_assert_eq!(&long[..short.len()], &short[..]);
        }

        /// Two sequences share a block hash exactly when they share the whole prefix up to it.
        #[test]
        fn hash_names_the_prefix(a in proptest::collection::vec(0u32..4, 16..48), b in proptest::collection::vec(0u32..4, 16..48)) {
            let h = BlockHasher::new("m", 8);
            let (ha, hb) = (h.hash_prefix(&a), h.hash_prefix(&b));
            for i in 0..ha.len().min(hb.len()) {
                let same_prefix = a[..(i + 1) * 8] == b[..(i + 1) * 8];
                prop_assert_eq!(ha[i] == hb[i], same_prefix);
            }
        }
    }
}
