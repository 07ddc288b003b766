//! The Llama-family forward pass (RMSNorm, RoPE, grouped-query attention,
//! SwiGLU, tied or separate output head) over a paged KV cache.
//!
//! Weights stay quantized in the memory-mapped GGUF file; every matrix product
//! goes through [`crate::cpu::matmul`], which dots quantized rows against
//! quantized activations. A forward call computes a ragged batch: any number of
//! sequences, each contributing a chunk of consecutive positions (a prefill
//! chunk or a single decode token), all through one set of matrix products.

use half::f16;
use rayon::prelude::*;

use crate::cpu::{self, QMatrix};
use crate::gguf::{GgufError, GgufFile, TensorInfo};
use crate::kv_cache::{BlockId, KvLayout, KvPool};

/// Errors from loading a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("unsupported architecture {0:?} (supported: llama, qwen2)")]
    UnsupportedArchitecture(String),
    #[error("tensor {tensor} has shape {found:?}, expected {expected:?}")]
    Shape {
        tensor: String,
        expected: Vec<u64>,
        found: Vec<u64>,
    },
    #[error("invalid hyperparameter {key}: {reason}")]
    Hyperparameter { key: String, reason: String },
}

/// Model families the forward pass implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama 2/3, Mistral, SmolLM, TinyLlama: adjacent-pair RoPE, no attention bias.
    Llama,
    /// Qwen2: q/k/v biases and half-split (NeoX) RoPE.
    Qwen2,
}

/// Hyperparameters read from the GGUF metadata.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub arch: Arch,
    /// `general.name`, or the file stem; salts block hashes.
    pub name: String,
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn_dim: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub rope_base: f32,
    pub rope_dim: usize,
    pub rms_eps: f32,
}

impl ModelConfig {
    fn from_gguf(file: &GgufFile) -> Result<Self, ModelError> {
        let arch_name = file.get_str("general.architecture")?;
        let arch = match arch_name {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => return Err(ModelError::UnsupportedArchitecture(other.into())),
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let usize_key = |k: &str| -> Result<usize, ModelError> {
            let v = file.get_u64(&key(k))?;
            usize::try_from(v)
                .ok()
                .filter(|&v| v > 0 && v < 1 << 24)
                .ok_or_else(|| ModelError::Hyperparameter {
                    key: key(k),
                    reason: format!("{v} is out of range"),
                })
        };
        let n_layers = usize_key("block_count")?;
        let d_model = usize_key("embedding_length")?;
        let n_heads = usize_key("attention.head_count")?;
        let n_kv_heads = match file.get(&key("attention.head_count_kv")) {
            Some(_) => usize_key("attention.head_count_kv")?,
            None => n_heads,
        };
        if d_model % n_heads != 0 || n_heads % n_kv_heads != 0 {
            return Err(ModelError::Hyperparameter {
                key: key("attention.head_count"),
                reason: format!(
                    "{n_heads} heads and {n_kv_heads} KV heads do not divide d_model {d_model}"
                ),
            });
        }
        let head_dim = match file.get(&key("attention.key_length")) {
            Some(_) => usize_key("attention.key_length")?,
            None => d_model / n_heads,
        };
        let rope_dim = match file.get(&key("rope.dimension_count")) {
            Some(_) => usize_key("rope.dimension_count")?,
            None => head_dim,
        };
        if rope_dim > head_dim || rope_dim % 2 != 0 {
            return Err(ModelError::Hyperparameter {
                key: key("rope.dimension_count"),
                reason: format!("{rope_dim} must be even and at most the head dim {head_dim}"),
            });
        }
        let ffn_dim = usize_key("feed_forward_length")?;
        let context_length = usize_key("context_length")?;
        let rope_base = match file.get(&key("rope.freq_base")) {
            Some(_) => file.get_f64(&key("rope.freq_base"))? as f32,
            None => 10_000.0,
        };
        let rms_eps = file.get_f64(&key("attention.layer_norm_rms_epsilon"))? as f32;
        let (embd, _) = file.tensor_data("token_embd.weight")?;
        let vocab_size = embd.dims.get(1).copied().unwrap_or(0) as usize;
        let name = match file.get_str("general.name") {
            Ok(n) => n.to_string(),
            Err(_) => file
                .path()
                .file_stem()
                .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned()),
        };
        Ok(Self {
            arch,
            name,
            n_layers,
            d_model,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn_dim,
            vocab_size,
            context_length,
            rope_base,
            rope_dim,
            rms_eps,
        })
    }

    /// The KV cache shape this model needs for a given block size.
    pub fn kv_layout(&self, block_size: usize) -> KvLayout {
        KvLayout {
            n_layers: self.n_layers,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            block_size,
        }
    }
}

/// A matrix in the file: its table entry and logical shape.
#[derive(Debug, Clone)]
pub(crate) struct Weight {
    info: TensorInfo,
    rows: usize,
    cols: usize,
}

/// One transformer block's tensors (read by the GPU backend to upload them).
pub(crate) struct Layer {
    pub(crate) attn_norm: Vec<f32>,
    pub(crate) wq: Weight,
    pub(crate) wk: Weight,
    pub(crate) wv: Weight,
    pub(crate) wo: Weight,
    /// Qwen2's q, k and v biases.
    pub(crate) bias: Option<[Vec<f32>; 3]>,
    pub(crate) ffn_norm: Vec<f32>,
    pub(crate) w_gate: Weight,
    pub(crate) w_up: Weight,
    pub(crate) w_down: Weight,
}

/// A loaded model: the mapped file plus the small tensors copied out as f32.
pub struct Model {
    file: GgufFile,
    config: ModelConfig,
    token_embd: Weight,
    output_norm: Vec<f32>,
    output: Weight,
    layers: Vec<Layer>,
    /// Per rotary pair i: base^(-2i/rope_dim), divided by `rope_freqs` factors when present.
    inv_freq: Vec<f64>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.config)
            .finish()
    }
}

/// One sequence's share of a forward batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchSeq<'a> {
    /// The tokens to compute, at positions `start_pos..start_pos + tokens.len()`.
    pub tokens: &'a [u32],
    pub start_pos: usize,
    /// The sequence's block table; must cover every position up to the chunk's end.
    pub blocks: &'a [BlockId],
    /// Whether to return logits for the chunk's last token.
    pub want_logits: bool,
}

/// Buffers reused across forward calls so the hot loop does not allocate.
#[derive(Default)]
pub struct Scratch {
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
    last: Vec<f32>,
    /// (sequence index, position) of each token in the batch.
    token_pos: Vec<(usize, usize)>,
}

fn resize(buf: &mut Vec<f32>, n: usize) {
    buf.clear();
    buf.resize(n, 0.0);
}

impl Model {
    /// Loads a model from a GGUF file, checking every tensor's shape.
    pub fn load(file: GgufFile) -> Result<Self, ModelError> {
        let config = ModelConfig::from_gguf(&file)?;
        let c = &config;
        let matrix = |name: &str, rows: usize, cols: usize| -> Result<Weight, ModelError> {
            let (info, _) = file.tensor_data(name)?;
            let expected = vec![cols as u64, rows as u64];
            if info.dims != expected {
                return Err(ModelError::Shape {
                    tensor: name.into(),
                    expected,
                    found: info.dims.clone(),
                });
            }
            Ok(Weight {
                info: info.clone(),
                rows,
                cols,
            })
        };
        let vector = |name: &str, n: usize| -> Result<Vec<f32>, ModelError> {
            let (info, data) = file.tensor_data(name)?;
            if info.dims != [n as u64] {
                return Err(ModelError::Shape {
                    tensor: name.into(),
                    expected: vec![n as u64],
                    found: info.dims.clone(),
                });
            }
            let mut out = vec![0.0; n];
            cpu::dequantize_row(info.ty, data, &mut out);
            Ok(out)
        };

        let q_dim = c.n_heads * c.head_dim;
        let kv_dim = c.n_kv_heads * c.head_dim;
        let token_embd = matrix("token_embd.weight", c.vocab_size, c.d_model)?;
        let output = if file.tensor("output.weight").is_some() {
            matrix("output.weight", c.vocab_size, c.d_model)?
        } else {
            token_embd.clone()
        };
        let output_norm = vector("output_norm.weight", c.d_model)?;
        let mut layers = Vec::with_capacity(c.n_layers);
        for l in 0..c.n_layers {
            let p = |s: &str| format!("blk.{l}.{s}");
            let bias = match c.arch {
                Arch::Llama => None,
                Arch::Qwen2 => Some([
                    vector(&p("attn_q.bias"), q_dim)?,
                    vector(&p("attn_k.bias"), kv_dim)?,
                    vector(&p("attn_v.bias"), kv_dim)?,
                ]),
            };
            layers.push(Layer {
                attn_norm: vector(&p("attn_norm.weight"), c.d_model)?,
                wq: matrix(&p("attn_q.weight"), q_dim, c.d_model)?,
                wk: matrix(&p("attn_k.weight"), kv_dim, c.d_model)?,
                wv: matrix(&p("attn_v.weight"), kv_dim, c.d_model)?,
                wo: matrix(&p("attn_output.weight"), c.d_model, q_dim)?,
                bias,
                ffn_norm: vector(&p("ffn_norm.weight"), c.d_model)?,
                w_gate: matrix(&p("ffn_gate.weight"), c.ffn_dim, c.d_model)?,
                w_up: matrix(&p("ffn_up.weight"), c.ffn_dim, c.d_model)?,
                w_down: matrix(&p("ffn_down.weight"), c.d_model, c.ffn_dim)?,
            });
        }

        let half = c.rope_dim / 2;
        let mut inv_freq: Vec<f64> = (0..half)
            .map(|i| (c.rope_base as f64).powf(-2.0 * i as f64 / c.rope_dim as f64))
            .collect();
        if file.tensor("rope_freqs.weight").is_some() {
            let factors = vector("rope_freqs.weight", half)?;
            for (f, s) in inv_freq.iter_mut().zip(factors) {
                *f /= s as f64;
            }
        }
        Ok(Self {
            file,
            config,
            token_embd,
            output_norm,
            output,
            layers,
            inv_freq,
        })
    }

    /// The model's hyperparameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The GGUF file the weights live in.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// Bytes of weights read per decoded token (every matrix once, plus one embedding row).
    pub fn weight_bytes_per_token(&self) -> usize {
        let per_layer: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]
                    .iter()
                    .map(|w| w.info.n_bytes)
                    .sum::<usize>()
            })
            .sum();
        per_layer + self.output.info.n_bytes
    }

    pub(crate) fn mat(&self, w: &Weight) -> QMatrix<'_> {
        QMatrix {
            ty: w.info.ty,
            rows: w.rows,
            cols: w.cols,
            data: self.file.bytes(&w.info),
        }
    }

    /// Computes a ragged batch, writing its K/V into `cache`, and returns the
    /// logits (`vocab_size` each) of every sequence with `want_logits`, in order.
    ///
    /// The caller guarantees each block table covers the chunk's positions and
    /// that no two sequences write the same block. `on_layer(l, cache)` runs once
    /// layer `l`'s K/V of this step are written.
    pub fn forward(
        &self,
        cache: &mut KvPool,
        batch: &[BatchSeq<'_>],
        s: &mut Scratch,
        on_layer: &mut dyn FnMut(usize, &KvPool),
    ) -> Vec<f32> {
        let c = &self.config;
        let (d, hd) = (c.d_model, c.head_dim);
        let (q_dim, kv_dim) = (c.n_heads * hd, c.n_kv_heads * hd);
        let n: usize = batch.iter().map(|b| b.tokens.len()).sum();
        if n == 0 {
            return Vec::new();
        }
        s.token_pos.clear();
        for (i, b) in batch.iter().enumerate() {
            s.token_pos
                .extend((0..b.tokens.len()).map(|j| (i, b.start_pos + j)));
        }

        // Embedding lookup: one dequantized row per token.
        resize(&mut s.x, n * d);
        let embd = self.mat(&self.token_embd);
        let row_bytes = embd.row_bytes();
        for (x, &tok) in s.x.chunks_mut(d).zip(batch.iter().flat_map(|b| b.tokens)) {
            let tok = (tok as usize).min(c.vocab_size - 1);
            cpu::dequantize_row(
                embd.ty,
                &embd.data[tok * row_bytes..(tok + 1) * row_bytes],
                x,
            );
        }

        resize(&mut s.xn, n * d);
        resize(&mut s.q, n * q_dim);
        resize(&mut s.k, n * kv_dim);
        resize(&mut s.v, n * kv_dim);
        resize(&mut s.attn, n * q_dim);
        resize(&mut s.proj, n * d);
        resize(&mut s.gate, n * c.ffn_dim);
        resize(&mut s.up, n * c.ffn_dim);
        resize(&mut s.act, n * c.ffn_dim);

        for (l, layer) in self.layers.iter().enumerate() {
            // Attention block.
            for (x, xn) in s.x.chunks(d).zip(s.xn.chunks_mut(d)) {
                cpu::rms_norm(x, &layer.attn_norm, c.rms_eps, xn);
            }
            cpu::matmul(&self.mat(&layer.wq), &s.xn, n, &mut s.q);
            cpu::matmul(&self.mat(&layer.wk), &s.xn, n, &mut s.k);
            cpu::matmul(&self.mat(&layer.wv), &s.xn, n, &mut s.v);
            if let Some([bq, bk, bv]) = &layer.bias {
                add_bias(&mut s.q, bq);
                add_bias(&mut s.k, bk);
                add_bias(&mut s.v, bv);
            }
            for (t, &(_, pos)) in s.token_pos.iter().enumerate() {
                self.rope(&mut s.q[t * q_dim..(t + 1) * q_dim], pos);
                self.rope(&mut s.k[t * kv_dim..(t + 1) * kv_dim], pos);
            }
            for (t, &(seq, pos)) in s.token_pos.iter().enumerate() {
                let bs = cache.layout().block_size;
                let block = batch[seq].blocks[pos / bs];
                cache.write_slot(
                    block,
                    l,
                    pos % bs,
                    &s.k[t * kv_dim..(t + 1) * kv_dim],
                    &s.v[t * kv_dim..(t + 1) * kv_dim],
                );
            }
            self.attention(cache, l, batch, &s.token_pos, &s.q, &mut s.attn);
            // Layer l's K/V are final: whoever streams them can take them now,
            // while the rest of the step computes.
            on_layer(l, cache);
            cpu::matmul(&self.mat(&layer.wo), &s.attn, n, &mut s.proj);
            add_assign(&mut s.x, &s.proj);

            // Feed-forward block.
            for (x, xn) in s.x.chunks(d).zip(s.xn.chunks_mut(d)) {
                cpu::rms_norm(x, &layer.ffn_norm, c.rms_eps, xn);
            }
            cpu::matmul(&self.mat(&layer.w_gate), &s.xn, n, &mut s.gate);
            cpu::matmul(&self.mat(&layer.w_up), &s.xn, n, &mut s.up);
            cpu::silu_mul(&s.gate, &s.up, &mut s.act);
            cpu::matmul(&self.mat(&layer.w_down), &s.act, n, &mut s.proj);
            add_assign(&mut s.x, &s.proj);
        }

        // Logits for the last token of each chunk that asked for them.
        let mut ends = Vec::new();
        let mut end = 0;
        for b in batch {
            end += b.tokens.len();
            if b.want_logits && !b.tokens.is_empty() {
                ends.push(end - 1);
            }
        }
        resize(&mut s.last, ends.len() * d);
        for (row, &t) in s.last.chunks_mut(d).zip(&ends) {
            cpu::rms_norm(&s.x[t * d..(t + 1) * d], &self.output_norm, c.rms_eps, row);
        }
        let mut logits = vec![0.0; ends.len() * c.vocab_size];
        if !ends.is_empty() {
            cpu::matmul(&self.mat(&self.output), &s.last, ends.len(), &mut logits);
        }
        logits
    }

    /// Rotates each head of `x` (a token's q or k) by its position.
    fn rope(&self, x: &mut [f32], pos: usize) {
        rope_in_place(
            x,
            pos,
            self.config.head_dim,
            &self.inv_freq,
            self.config.arch,
        );
    }

    fn attention(
        &self,
        cache: &KvPool,
        layer: usize,
        batch: &[BatchSeq<'_>],
        token_pos: &[(usize, usize)],
        q: &[f32],
        out: &mut [f32],
    ) {
        paged_attention(&self.config, cache, layer, batch, token_pos, q, out);
    }
}

/// What the GPU backend reads to upload the weights.
#[cfg(feature = "cuda")]
impl Model {
    /// The transformer blocks.
    pub(crate) fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// The token embedding table (`vocab_size` rows of `d_model`).
    pub(crate) fn token_embd(&self) -> QMatrix<'_> {
        self.mat(&self.token_embd)
    }

    /// The output head (the embedding table when tied).
    pub(crate) fn output(&self) -> QMatrix<'_> {
        self.mat(&self.output)
    }

    /// The final RMSNorm weight.
    pub(crate) fn output_norm(&self) -> &[f32] {
        &self.output_norm
    }

    /// Per rotary pair i of a head, the angle per position (radians).
    pub(crate) fn inv_freq(&self) -> &[f64] {
        &self.inv_freq
    }
}

/// Rotates each `head_dim` head of `x` (a token's q or k) by position `pos`:
/// pair i turns by `pos * inv_freq[i]`, pairs adjacent (Llama) or half a
/// rotary span apart (Qwen2, NeoX style).
pub(crate) fn rope_in_place(
    x: &mut [f32],
    pos: usize,
    head_dim: usize,
    inv_freq: &[f64],
    arch: Arch,
) {
    let half = inv_freq.len();
    // cos/sin per rotary pair, shared by every head.
    let mut cs = [(0f32, 0f32); 256];
    let cs = &mut cs[..half.min(256)];
    for (i, slot) in cs.iter_mut().enumerate() {
        let (sin, cos) = (pos as f64 * inv_freq[i]).sin_cos();
        *slot = (cos as f32, sin as f32);
    }
    for head in x.chunks_mut(head_dim) {
        match arch {
            Arch::Llama => {
                for (i, &(cos, sin)) in cs.iter().enumerate() {
                    let (a, b) = (head[2 * i], head[2 * i + 1]);
                    head[2 * i] = a * cos - b * sin;
                    head[2 * i + 1] = a * sin + b * cos;
                }
            }
            Arch::Qwen2 => {
                for (i, &(cos, sin)) in cs.iter().enumerate() {
                    let (a, b) = (head[i], head[i + half]);
                    head[i] = a * cos - b * sin;
                    head[i + half] = a * sin + b * cos;
                }
            }
        }
    }
}

/// Causal attention of every batch token over its sequence's cached K/V,
/// read through the block table. Parallel over (token, head).
pub(crate) fn paged_attention(
    c: &ModelConfig,
    cache: &KvPool,
    layer: usize,
    batch: &[BatchSeq<'_>],
    token_pos: &[(usize, usize)],
    q: &[f32],
    out: &mut [f32],
) {
    let hd = c.head_dim;
    let group = c.n_heads / c.n_kv_heads;
    let kv_dim = c.n_kv_heads * hd;
    let bs = cache.layout().block_size;
    let scale = 1.0 / (hd as f32).sqrt();
    out.par_chunks_mut(hd)
        .enumerate()
        .for_each_init(Vec::new, |scores: &mut Vec<f32>, (i, o)| {
            let (t, h) = (i / c.n_heads, i % c.n_heads);
            let (seq, pos) = token_pos[t];
            let blocks = batch[seq].blocks;
            let kvh = h / group;
            let qh = &q[i * hd..(i + 1) * hd];
            let ctx = pos + 1;
            scores.clear();
            for (bi, &block) in blocks.iter().enumerate().take(ctx.div_ceil(bs)) {
                let keys = cache.keys(block, layer);
                let slots = (ctx - bi * bs).min(bs);
                for slot in 0..slots {
                    let k: &[f16] = &keys[slot * kv_dim + kvh * hd..][..hd];
                    scores.push(cpu::dot_f32_f16(qh, k) * scale);
                }
            }
            cpu::softmax_inplace(scores);
            o.fill(0.0);
            for (bi, &block) in blocks.iter().enumerate().take(ctx.div_ceil(bs)) {
                let values = cache.values(block, layer);
                let slots = (ctx - bi * bs).min(bs);
                for slot in 0..slots {
                    let v: &[f16] = &values[slot * kv_dim + kvh * hd..][..hd];
                    cpu::axpy_f16(o, scores[bi * bs + slot], v);
                }
            }
        });
}

fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_mut(bias.len()) {
        add_assign(row, bias);
    }
}
