//! Synthetic models: a GGUF with the real shapes of a larger Llama and seeded
//! random weights, so speed can be measured at a realistic size with no
//! download (`tandem model synth`).
//!
//! The tokenizer is copied from another GGUF (every `tokenizer.*` key, the chat
//! template included) and its vocabulary padded with unused tokens up to the
//! shape's vocabulary size; padding tokens are typed UNUSED, so tokenization
//! never produces them. Weights are normal-ish (Irwin–Hall of four uniforms)
//! with std 1/sqrt(fan_in), drawn from a per-row SplitMix64 stream keyed by the
//! seed, the tensor name and the row: the file is a function of (shape, quant,
//! seed, tokenizer source) alone, and rows are generated in parallel. Matrices
//! are quantized to the chosen type (the embedding too; norms stay F32, as in
//! real files) and streamed to `<out>.partial-<pid>`, which is synced and
//! renamed into place only once whole.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use half::{bf16, f16};
use rayon::prelude::*;

use crate::gguf::{GgmlType, GgufError, GgufFile, GgufWriter, MetaValue, TensorSpec};

/// Errors from writing a synthetic model.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("unknown shape {0:?} (expected one of: llama-1b, llama-8b, tiny)")]
    UnknownShape(String),
    #[error("unknown quantization {0:?} (expected one of: q4_1, q8_0, f16)")]
    UnknownQuant(String),
    #[error("reading the tokenizer from {path}: {source}")]
    TokenizerSource { path: PathBuf, source: GgufError },
    #[error(
        "the tokenizer in {path} has {found} tokens, more than the shape's vocabulary of {vocab}"
    )]
    VocabTooSmall {
        path: PathBuf,
        found: usize,
        vocab: usize,
    },
    #[error("{0} already exists (pass --force to replace it)")]
    Exists(PathBuf),
    #[error("cannot write {path}: {reason}")]
    BadPath { path: PathBuf, reason: String },
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A model shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Llama 3.2 1B.
    Llama1b,
    /// Llama 3.1 8B.
    Llama8b,
    /// A small shape for tests: 2 layers, d_model 128.
    Tiny,
}

impl FromStr for Shape {
    type Err = SynthError;
    fn from_str(s: &str) -> Result<Self, SynthError> {
        match s {
            "llama-1b" => Ok(Self::Llama1b),
            "llama-8b" => Ok(Self::Llama8b),
            "tiny" => Ok(Self::Tiny),
            other => Err(SynthError::UnknownShape(other.into())),
        }
    }
}

/// The hyperparameters of a shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShapeParams {
    pub name: &'static str,
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub ffn_dim: usize,
    pub vocab_size: usize,
    pub rope_base: f32,
    /// Whether the output head reuses the token embedding.
    pub tied: bool,
    /// The context length written to the file.
    pub context_length: usize,
}

impl ShapeParams {
    /// The head dimension.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }
}

impl Shape {
    /// The shape's hyperparameters. The Llama shapes' written context length
    /// is capped at 8,192 (the real models take 131,072) so that KV cache
    /// defaults sized from it stay sane.
    pub fn params(self) -> ShapeParams {
        match self {
            Self::Llama1b => ShapeParams {
                name: "llama-1b",
                n_layers: 16,
                d_model: 2048,
                n_heads: 32,
                n_kv_heads: 8,
                ffn_dim: 8192,
                vocab_size: 128_256,
                rope_base: 500_000.0,
                tied: true,
                context_length: 8192,
            },
            Self::Llama8b => ShapeParams {
                name: "llama-8b",
                n_layers: 32,
                d_model: 4096,
                n_heads: 32,
                n_kv_heads: 8,
                ffn_dim: 14_336,
                vocab_size: 128_256,
                rope_base: 500_000.0,
                tied: false,
                context_length: 8192,
            },
            // 49,152 tokens (the default model's tokenizer) plus 64 padding
            // tokens, so the padding path is exercised too.
            Self::Tiny => ShapeParams {
                name: "tiny",
                n_layers: 2,
                d_model: 128,
                n_heads: 4,
                n_kv_heads: 2,
                ffn_dim: 256,
                vocab_size: 49_216,
                rope_base: 10_000.0,
                tied: false,
                context_length: 2048,
            },
        }
    }
}

/// The weights' quantization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quant {
    Q4_1,
    Q8_0,
    F16,
}

impl FromStr for Quant {
    type Err = SynthError;
    fn from_str(s: &str) -> Result<Self, SynthError> {
        match s.to_ascii_lowercase().as_str() {
            "q4_1" => Ok(Self::Q4_1),
            "q8_0" => Ok(Self::Q8_0),
            "f16" => Ok(Self::F16),
            _ => Err(SynthError::UnknownQuant(s.into())),
        }
    }
}

impl Quant {
    /// The ggml type of the matrices.
    pub fn ggml_type(self) -> GgmlType {
        match self {
            Self::Q4_1 => GgmlType::Q4_1,
            Self::Q8_0 => GgmlType::Q8_0,
            Self::F16 => GgmlType::F16,
        }
    }

    /// llama.cpp's `general.file_type` (LLAMA_FTYPE_MOSTLY_*).
    fn file_type(self) -> u32 {
        match self {
            Self::F16 => 1,
            Self::Q4_1 => 3,
            Self::Q8_0 => 7,
        }
    }
}

/// What to write.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub shape: Shape,
    pub quant: Quant,
    pub seed: u64,
    /// The GGUF whose `tokenizer.*` metadata is copied.
    pub tokenizer_from: PathBuf,
    pub out: PathBuf,
    /// Replace `out` if it exists.
    pub force: bool,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct SynthReport {
    pub path: PathBuf,
    pub file_bytes: u64,
    pub n_params: u64,
    pub n_tensors: usize,
}

/// Removes the temporary file on drop unless it was renamed into place.
struct Partial(Option<PathBuf>);

impl Drop for Partial {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// One tensor to generate: its spec and how to fill it.
struct Planned {
    spec: TensorSpec,
    fill: Fill,
}

#[derive(Clone, Copy)]
enum Fill {
    Ones,
    /// Normal-ish with this std.
    Random(f32),
}

fn plan(p: &ShapeParams, ty: GgmlType) -> Vec<Planned> {
    let (d, hd) = (p.d_model as u64, p.head_dim() as u64);
    let q_dim = p.n_heads as u64 * hd;
    let kv_dim = p.n_kv_heads as u64 * hd;
    let ffn = p.ffn_dim as u64;
    let vocab = p.vocab_size as u64;
    let std = |fan_in: u64| Fill::Random(1.0 / (fan_in as f32).sqrt());
    let t = |name: String, dims: Vec<u64>, ty: GgmlType, fill: Fill| Planned {
        spec: TensorSpec { name, dims, ty },
        fill,
    };
    let mut out = vec![t("token_embd.weight".into(), vec![d, vocab], ty, std(d))];
    for l in 0..p.n_layers {
        let n = |s: &str| format!("blk.{l}.{s}");
        out.extend([
            t(n("attn_norm.weight"), vec![d], GgmlType::F32, Fill::Ones),
            t(n("attn_q.weight"), vec![d, q_dim], ty, std(d)),
            t(n("attn_k.weight"), vec![d, kv_dim], ty, std(d)),
            t(n("attn_v.weight"), vec![d, kv_dim], ty, std(d)),
            t(n("attn_output.weight"), vec![q_dim, d], ty, std(q_dim)),
            t(n("ffn_norm.weight"), vec![d], GgmlType::F32, Fill::Ones),
            t(n("ffn_gate.weight"), vec![d, ffn], ty, std(d)),
            t(n("ffn_up.weight"), vec![d, ffn], ty, std(d)),
            t(n("ffn_down.weight"), vec![ffn, d], ty, std(ffn)),
        ]);
    }
    out.push(t(
        "output_norm.weight".into(),
        vec![d],
        GgmlType::F32,
        Fill::Ones,
    ));
    if !p.tied {
        out.push(t("output.weight".into(), vec![d, vocab], ty, std(d)));
    }
    out
}

/// The metadata: the shape's hyperparameters, then the source's tokenizer
/// padded to the shape's vocabulary.
fn metadata(opts: &SynthOptions, p: &ShapeParams) -> Result<Vec<(String, MetaValue)>, SynthError> {
    let src_err = |source| SynthError::TokenizerSource {
        path: opts.tokenizer_from.clone(),
        source,
    };
    let src = GgufFile::open(&opts.tokenizer_from).map_err(src_err)?;
    let n_tokens = src
        .get_array("tokenizer.ggml.tokens")
        .map_err(src_err)?
        .len();
    if n_tokens > p.vocab_size {
        return Err(SynthError::VocabTooSmall {
            path: opts.tokenizer_from.clone(),
            found: n_tokens,
            vocab: p.vocab_size,
        });
    }
    let quant = opts.quant.ggml_type().name();
    let s = |v: &str| MetaValue::String(v.into());
    let u = |v: usize| MetaValue::U32(v as u32);
    let mut meta: Vec<(String, MetaValue)> = vec![
        ("general.architecture".into(), s("llama")),
        ("general.type".into(), s("model")),
        (
            "general.name".into(),
            s(&format!(
                "tandem synthetic {} {quant} seed {}",
                p.name, opts.seed
            )),
        ),
        (
            "general.description".into(),
            s(
                "synthetic: seeded random weights in a real model's shape, for speed measurements only",
            ),
        ),
        (
            "general.file_type".into(),
            u(opts.quant.file_type() as usize),
        ),
        ("general.quantization_version".into(), u(2)),
        ("tandem.synthetic.shape".into(), s(p.name)),
        ("tandem.synthetic.seed".into(), MetaValue::U64(opts.seed)),
        ("llama.block_count".into(), u(p.n_layers)),
        ("llama.context_length".into(), u(p.context_length)),
        ("llama.embedding_length".into(), u(p.d_model)),
        ("llama.feed_forward_length".into(), u(p.ffn_dim)),
        ("llama.attention.head_count".into(), u(p.n_heads)),
        ("llama.attention.head_count_kv".into(), u(p.n_kv_heads)),
        ("llama.rope.freq_base".into(), MetaValue::F32(p.rope_base)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            MetaValue::F32(1e-5),
        ),
        ("llama.rope.dimension_count".into(), u(p.head_dim())),
        ("llama.vocab_size".into(), u(p.vocab_size)),
    ];
    let pad = p.vocab_size - n_tokens;
    for (key, value) in src.metadata() {
        if !key.starts_with("tokenizer.") {
            continue;
        }
        let value = match (key.as_str(), value) {
            ("tokenizer.ggml.tokens", MetaValue::Array(a)) => {
                let mut a = a.clone();
                a.extend((0..pad).map(|i| s(&format!("<|synthetic_unused_{i}|>"))));
                MetaValue::Array(a)
            }
            // 5 = UNUSED: never produced by tokenization.
            ("tokenizer.ggml.token_type", MetaValue::Array(a)) => {
                let mut a = a.clone();
                a.extend((0..pad).map(|_| MetaValue::I32(5)));
                MetaValue::Array(a)
            }
            ("tokenizer.ggml.scores", MetaValue::Array(a)) => {
                let mut a = a.clone();
                a.extend((0..pad).map(|_| MetaValue::F32(-1e9)));
                MetaValue::Array(a)
            }
            _ => value.clone(),
        };
        meta.push((key.clone(), value));
    }
    Ok(meta)
}

/// SplitMix64: a tiny, fast, well-mixed generator.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn name_hash(name: &str) -> u64 {
    // FNV-1a.
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Fills `out` with mean-0, std-`std` values: the sum of four 16-bit uniforms,
/// centred and scaled (bounded at ±3.46 std, so no outliers).
pub(crate) fn fill_random(seed: u64, tensor: u64, row: u64, std: f32, out: &mut [f32]) {
    let mut state = seed ^ tensor;
    let _ = splitmix(&mut state);
    state ^= row.wrapping_mul(0xD1B5_4A32_D192_ED03);
    let _ = splitmix(&mut state);
    let scale = std * 3f32.sqrt() / 65536.0;
    for x in out {
        let r = splitmix(&mut state);
        let sum = (r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) + (r >> 48);
        *x = (sum as f32 - 2.0 * 65535.0) * scale;
    }
}

/// Quantizes one row into `out` in ggml's block layout for `ty` (see
/// [`crate::cpu::dequantize_row`] for the formats).
///
/// # Panics
/// If `x.len()` is not a whole number of `ty`'s blocks or `out` is not the row's size.
pub fn quantize_row(ty: GgmlType, x: &[f32], out: &mut [u8]) {
    assert_eq!(
        ty.row_bytes(x.len()),
        Some(out.len()),
        "row of {} {} elements",
        x.len(),
        ty.name()
    );
    match ty {
        GgmlType::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&bf16::from_f32(*v).to_le_bytes());
            }
        }
        GgmlType::Q4_0 => {
            // As ggml: the signed value of largest magnitude maps to -8.
            for (o, b) in out.chunks_exact_mut(18).zip(x.chunks_exact(32)) {
                let max = b
                    .iter()
                    .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = f16::from_f32(max / -8.0);
                let df = d.to_f32();
                let id = if df != 0.0 { 1.0 / df } else { 0.0 };
                o[..2].copy_from_slice(&d.to_le_bytes());
                let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
                for j in 0..16 {
                    o[2 + j] = q(b[j]) | (q(b[j + 16]) << 4);
                }
            }
        }
        GgmlType::Q4_1 => {
            for (o, b) in out.chunks_exact_mut(20).zip(x.chunks_exact(32)) {
                let min = b.iter().fold(f32::INFINITY, |m, &v| m.min(v));
                let max = b.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                // Quantize against the stored (f16) scale and minimum.
                let d = f16::from_f32((max - min) / 15.0);
                let m = f16::from_f32(min);
                let (df, mf) = (d.to_f32(), m.to_f32());
                let id = if df != 0.0 { 1.0 / df } else { 0.0 };
                o[..2].copy_from_slice(&d.to_le_bytes());
                o[2..4].copy_from_slice(&m.to_le_bytes());
                let q = |v: f32| (((v - mf) * id).round() as i32).clamp(0, 15) as u8;
                for j in 0..16 {
                    o[4 + j] = q(b[j]) | (q(b[j + 16]) << 4);
                }
            }
        }
        GgmlType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(34).zip(x.chunks_exact(32)) {
                let amax = b.iter().fold(0f32, |m, &v| m.max(v.abs()));
                let d = f16::from_f32(amax / 127.0);
                let df = d.to_f32();
                let id = if df != 0.0 { 1.0 / df } else { 0.0 };
                o[..2].copy_from_slice(&d.to_le_bytes());
                for (q, &v) in o[2..].iter_mut().zip(b) {
                    *q = ((v * id).round() as i32).clamp(-127, 127) as i8 as u8;
                }
            }
        }
    }
}

/// Elements generated per piece streamed to the file.
const PIECE_ELEMS: usize = 1 << 22;

/// Writes the synthetic model and returns what was written.
pub fn synthesize(opts: &SynthOptions) -> Result<SynthReport, SynthError> {
    let p = opts.shape.params();
    let out = &opts.out;
    let bad = |reason: &str| SynthError::BadPath {
        path: out.clone(),
        reason: reason.into(),
    };
    let file_name = out
        .file_name()
        .ok_or_else(|| bad("it names no file"))?
        .to_string_lossy()
        .into_owned();
    let parent = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(bad(&format!(
            "directory {} does not exist",
            parent.display()
        )));
    }
    if out.is_dir() {
        return Err(bad("it is a directory"));
    }
    if out.exists() && !opts.force {
        return Err(SynthError::Exists(out.clone()));
    }

    let meta = metadata(opts, &p)?;
    let planned = plan(&p, opts.quant.ggml_type());
    let specs: Vec<TensorSpec> = planned.iter().map(|t| t.spec.clone()).collect();

    let tmp_path = parent.join(format!(".{file_name}.partial-{}", std::process::id()));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SynthError::Io { path, source }
    };
    let file = File::create(&tmp_path).map_err(io(&tmp_path))?;
    let mut guard = Partial(Some(tmp_path.clone()));
    let mut w = GgufWriter::new(BufWriter::with_capacity(1 << 20, file), &meta, &specs)
        .map_err(io(&tmp_path))?;

    let mut n_params = 0u64;
    let mut piece = Vec::new();
    for t in &planned {
        let cols = t.spec.dims[0] as usize;
        let rows: usize = t.spec.dims[1..].iter().product::<u64>() as usize;
        n_params += (cols * rows) as u64;
        let ty = t.spec.ty;
        let row_bytes = ty.row_bytes(cols).unwrap_or(0);
        let hash = name_hash(&t.spec.name);
        let per_piece = (PIECE_ELEMS / cols).max(1);
        let mut row0 = 0;
        while row0 < rows {
            let n = per_piece.min(rows - row0);
            piece.clear();
            piece.resize(n * row_bytes, 0u8);
            piece.par_chunks_mut(row_bytes).enumerate().for_each_init(
                || vec![0f32; cols],
                |x, (i, o)| {
                    match t.fill {
                        Fill::Ones => x.fill(1.0),
                        Fill::Random(std) => {
                            fill_random(opts.seed, hash, (row0 + i) as u64, std, x)
                        }
                    }
                    quantize_row(ty, x, o);
                },
            );
            w.write_data(&piece).map_err(io(&tmp_path))?;
            row0 += n;
        }
    }
    let buf = w.finish().map_err(io(&tmp_path))?;
    let file = buf.into_inner().map_err(|e| SynthError::Io {
        path: tmp_path.clone(),
        source: e.into_error(),
    })?;
    file.sync_all().map_err(io(&tmp_path))?;
    let file_bytes = file.metadata().map_err(io(&tmp_path))?.len();
    drop(file);
    std::fs::rename(&tmp_path, out).map_err(io(out))?;
    guard.0 = None;
    Ok(SynthReport {
        path: out.clone(),
        file_bytes,
        n_params,
        n_tensors: planned.len(),
    })
}

#[cfg(test)]
mod tests;
