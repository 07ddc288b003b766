//! The boundary between the engine and the device that runs the model.
//!
//! The engine thread owns the scheduling state: sequences, the KV cache's
//! bookkeeping (which block holds what, prefix reuse, eviction, events) and
//! sampling. A [`Backend`] owns what lives on the device: the weights, the KV
//! block storage in the documented [`KvLayout`], and the forward pass. The engine
//! hands it a ragged batch naming each sequence's blocks; the backend returns
//! logits on the host. KV blocks cross the boundary only as byte pieces (one block
//! of one layer), copied out for export or transfer and in for import, so a GPU
//! backend stages them through host memory (or, later, writes them straight into
//! registered device memory).

use rayon::prelude::*;

use crate::kv_cache::{BlockId, KvLayout, KvPool};
use crate::model::{BatchSeq, Model, ModelConfig, Scratch};
use crate::sampling::greedy_pick;

/// A device that failed while serving (a driver call, a kernel launch, a copy).
///
/// What the device holds is unknown afterwards (a CUDA context that faulted
/// stays faulted), so the engine stops: it ends every stream it holds, answers
/// every later call with [`EngineError::Failed`](crate::EngineError::Failed),
/// and the worker leaves the cluster for its supervisor to restart it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(pub String);

/// Reads KV pieces in the middle of a step.
pub trait KvRead {
    /// Appends `layer`'s piece of each of `blocks`, in order, to `out` (a GPU
    /// backend gathers them in one copy).
    fn read_kv_pieces(
        &self,
        blocks: &[BlockId],
        layer: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), BackendError>;
}

impl KvRead for KvPool {
    fn read_kv_pieces(
        &self,
        blocks: &[BlockId],
        layer: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), BackendError> {
        for &b in blocks {
            out.extend_from_slice(self.piece_bytes(b, layer));
        }
        Ok(())
    }
}

/// Called by [`Backend::forward`] with each layer whose K/V are final.
pub type LayerHook<'a> = &'a mut dyn FnMut(usize, &dyn KvRead);

/// A device that runs the model over paged KV blocks.
pub trait Backend: Send {
    /// A short name for logs and benchmarks (`cpu`, `cuda:0`).
    fn name(&self) -> String;

    /// The model's hyperparameters.
    fn config(&self) -> &ModelConfig;

    /// The shape of the KV blocks this backend stores.
    fn kv_layout(&self) -> KvLayout;

    /// Runs one step: every sequence's chunk of tokens at its positions, K/V of
    /// the new tokens written into its blocks, attention over its earlier ones.
    /// Returns `vocab_size` logits for each sequence that wants them, in batch order.
    ///
    /// `on_layer(l, kv)`, when given, is called once for each layer `l` in
    /// order, after that layer's K/V of this step are final and while later
    /// layers still compute: a KV stream copies pieces out through `kv` there,
    /// so a transfer overlaps the prefill. (The CPU backend calls it as each
    /// layer ends; the CUDA backend a layer later, so the copy never stalls the
    /// launches.) Without a hook a backend may run the step as one unit (the
    /// CUDA backend replays a captured graph).
    fn forward(
        &mut self,
        batch: &[BatchSeq<'_>],
        on_layer: Option<LayerHook<'_>>,
    ) -> Result<Vec<f32>, BackendError>;

    /// Runs one step as [`Backend::forward`] does, for a batch whose rows
    /// that want logits are all decided greedily: returns, for each such row,
    /// [`greedy_pick`]'s token and log-probability instead of its logits. By
    /// default picked on the host from `forward`'s logits; the CUDA backend
    /// picks on the device and copies back 8 bytes per row instead of a
    /// vocabulary of floats.
    fn forward_greedy(
        &mut self,
        batch: &[BatchSeq<'_>],
        on_layer: Option<LayerHook<'_>>,
    ) -> Result<Vec<(u32, f32)>, BackendError> {
        let logits = self.forward(batch, on_layer)?;
        let vocab = self.config().vocab_size.max(1);
        Ok(logits.par_chunks(vocab).map(greedy_pick).collect())
    }

    /// Appends `layer`'s piece of each of `blocks`, in order, to `out` (a GPU
    /// backend gathers them in one copy).
    fn read_kv_pieces(
        &self,
        blocks: &[BlockId],
        layer: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), BackendError>;

    /// Overwrites `layer`'s piece of each of `blocks` with the consecutive
    /// `kv_layout().piece_bytes()` slices of `data` (a GPU backend scatters
    /// them in one copy).
    fn write_kv_pieces(
        &mut self,
        blocks: &[BlockId],
        layer: usize,
        data: &[u8],
    ) -> Result<(), BackendError>;
}

/// Every layer's piece of `blocks`, in the exported layout (block after
/// block, each block's pieces in layer order), read a layer at a time.
pub(crate) fn read_blocks(
    backend: &dyn Backend,
    blocks: &[BlockId],
) -> Result<Vec<u8>, BackendError> {
    let layout = backend.kv_layout();
    let (pb, bb) = (layout.piece_bytes(), layout.block_bytes());
    let mut data = vec![0; blocks.len() * bb];
    let mut pieces = Vec::with_capacity(blocks.len() * pb);
    for layer in 0..layout.n_layers {
        pieces.clear();
        backend.read_kv_pieces(blocks, layer, &mut pieces)?;
        check_pieces(blocks, &pieces, pb)?;
        for (block, piece) in data.chunks_exact_mut(bb).zip(pieces.chunks_exact(pb)) {
            block[layer * pb..][..pb].copy_from_slice(piece);
        }
    }
    Ok(data)
}

/// Writes `data`, whole blocks in the exported layout, into `blocks`, a
/// layer at a time.
pub(crate) fn write_blocks(
    backend: &mut dyn Backend,
    blocks: &[BlockId],
    data: &[u8],
) -> Result<(), BackendError> {
    let layout = backend.kv_layout();
    let (pb, bb) = (layout.piece_bytes(), layout.block_bytes());
    check_pieces(blocks, data, bb)?;
    let mut pieces = Vec::with_capacity(blocks.len() * pb);
    for layer in 0..layout.n_layers {
        pieces.clear();
        for block in data.chunks_exact(bb) {
            pieces.extend_from_slice(&block[layer * pb..][..pb]);
        }
        backend.write_kv_pieces(blocks, layer, &pieces)?;
    }
    Ok(())
}

/// Checks that `data` holds one piece of `piece_bytes` for each of `blocks`.
pub(crate) fn check_pieces(
    blocks: &[BlockId],
    data: &[u8],
    piece_bytes: usize,
) -> Result<(), BackendError> {
    if data.len() != blocks.len() * piece_bytes {
        return Err(BackendError(format!(
            "{} bytes for {} KV pieces of {piece_bytes}",
            data.len(),
            blocks.len()
        )));
    }
    Ok(())
}

/// The CPU backend: weights memory-mapped from the GGUF file, KV blocks in host
/// memory, the kernels of `cpu` on the engine's thread pool.
pub struct CpuBackend {
    model: Model,
    pool: KvPool,
    layout: KvLayout,
    scratch: Scratch,
}

impl CpuBackend {
    /// The backend for `model`, with storage for `num_blocks` blocks of `block_size` tokens.
    pub fn new(model: Model, block_size: usize, num_blocks: usize) -> Self {
        let layout = model.config().kv_layout(block_size);
        Self {
            pool: KvPool::new(layout, num_blocks),
            layout,
            model,
            scratch: Scratch::default(),
        }
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> String {
        format!("cpu ({})", crate::cpu::simd_level())
    }

    fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    fn kv_layout(&self) -> KvLayout {
        self.layout
    }

    fn forward(
        &mut self,
        batch: &[BatchSeq<'_>],
        mut on_layer: Option<LayerHook<'_>>,
    ) -> Result<Vec<f32>, BackendError> {
        Ok(self
            .model
            .forward(&mut self.pool, batch, &mut self.scratch, &mut |l, pool| {
                if let Some(hook) = on_layer.as_mut() {
                    hook(l, pool)
                }
            }))
    }

    fn read_kv_pieces(
        &self,
        blocks: &[BlockId],
        layer: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), BackendError> {
        KvRead::read_kv_pieces(&self.pool, blocks, layer, out)
    }

    fn write_kv_pieces(
        &mut self,
        blocks: &[BlockId],
        layer: usize,
        data: &[u8],
    ) -> Result<(), BackendError> {
        let pb = self.layout.piece_bytes();
        check_pieces(blocks, data, pb)?;
        for (&b, piece) in blocks.iter().zip(data.chunks_exact(pb)) {
            self.pool.piece_bytes_mut(b, layer).copy_from_slice(piece);
        }
        Ok(())
    }
}
