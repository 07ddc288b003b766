//! CPU kernels: quantized matrix products and the small vector operations of a
//! Llama forward pass.
//!
//! Weights are never dequantized wholesale. A matrix product quantizes its
//! activations once into 32-element Q8 blocks (`ActBlock`: scale, sum of the
//! quants, 32 × i8), and then dots each quantized weight row against them
//! with integer SIMD, as ggml does, which also keeps the numerics close to
//! llama.cpp's. The SIMD level is detected at run time (AVX-512 VNNI or AVX2 on
//! x86, NEON with or without dotprod on AArch64); `TANDEM_SIMD=scalar` (or
//! `avx2`, or `neon`) forces a lower one. Several tokens at once take the AVX-512
//! token-pair kernels of `avx512`, which give every token the same bits as the
//! one-token kernels.

#[cfg(target_arch = "x86_64")]
mod avx512;
mod dot;
#[cfg(target_arch = "aarch64")]
mod neon;
mod quant;

use std::sync::OnceLock;

use half::f16;
use rayon::prelude::*;

use crate::gguf::GgmlType;
pub use quant::dequantize_row;
pub(crate) use quant::quantize_acts;

/// Errors from building kernel inputs.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("matrix of {rows}×{cols} {ty:?} needs {expected} bytes, got {got}")]
    Size {
        ty: GgmlType,
        rows: usize,
        cols: usize,
        expected: usize,
        got: usize,
    },
}

/// A weight matrix as stored in GGUF: `rows` rows of `cols` elements, row r at
/// bytes `[r * row_bytes, (r + 1) * row_bytes)`.
#[derive(Clone, Copy, Debug)]
pub struct QMatrix<'a> {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

impl<'a> QMatrix<'a> {
    /// Checks that `data` holds exactly `rows` rows of `cols` elements.
    pub fn new(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        data: &'a [u8],
    ) -> Result<Self, KernelError> {
        let expected = ty.row_bytes(cols).map(|rb| rb * rows);
        if expected != Some(data.len()) {
            return Err(KernelError::Size {
                ty,
                rows,
                cols,
                expected: expected.unwrap_or(0),
                got: data.len(),
            });
        }
        Ok(Self {
            ty,
            rows,
            cols,
            data,
        })
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_elems() * self.ty.block_bytes()
    }

    fn row(&self, r: usize) -> &'a [u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }
}

/// The instruction set the kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Simd {
    Scalar,
    Avx2,
    Avx512Vnni,
    /// AArch64 Advanced SIMD without the dotprod extension.
    Neon,
    /// AArch64 Advanced SIMD with `sdot`.
    NeonDot,
}

pub(crate) fn simd() -> Simd {
    static LEVEL: OnceLock<Simd> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let detected = detect();
        match std::env::var("TANDEM_SIMD").as_deref() {
            Ok("scalar") => Simd::Scalar,
            // A lower level is granted only on its own architecture.
            Ok("avx2") if detected == Simd::Avx512Vnni => Simd::Avx2,
            Ok("neon") if detected == Simd::NeonDot => Simd::Neon,
            _ => detected,
        }
    })
}

fn detect() -> Simd {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            return Simd::Avx512Vnni;
        }
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            return Simd::Avx2;
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            if std::arch::is_aarch64_feature_detected!("dotprod") {
                return Simd::NeonDot;
            }
            return Simd::Neon;
        }
    }
    Simd::Scalar
}

/// Which SIMD path was chosen at run time.
pub fn simd_level() -> &'static str {
    match simd() {
        Simd::Scalar => "scalar",
        Simd::Avx2 => "avx2",
        Simd::Avx512Vnni => "avx512-vnni",
        Simd::Neon => "neon",
        Simd::NeonDot => "neon-dotprod",
    }
}

/// Rows per parallel task: enough work to amortize scheduling, enough tasks to balance.
fn rows_per_task(rows: usize, n: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let target = rows.div_ceil(threads * 4);
    // Keep at least ~32 KiB-ish of weight work per task for single tokens.
    let min = if n == 1 { 32 } else { 8 };
    target.max(min).min(rows.max(1))
}

/// `out[t * rows + r] = dot(W row r, x[t * cols .. (t + 1) * cols])` for `t` in `0..n`,
/// parallel over the current rayon pool.
pub fn matmul(w: &QMatrix<'_>, x: &[f32], n: usize, out: &mut [f32]) {
    assert_eq!(x.len(), n * w.cols, "activation length");
    assert_eq!(out.len(), n * w.rows, "output length");
    if n == 0 || w.rows == 0 {
        return;
    }
    let level = simd();
    let chunk = rows_per_task(w.rows, n);
    #[cfg(target_arch = "x86_64")]
    if n > 1 && level == Simd::Avx512Vnni && avx512::supports(w.ty) {
        matmul_token_pairs(w, x, n, chunk, out);
        return;
    }
    match w.ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => {
            let blocks_per_row = w.cols / 32;
            let acts = quantize_acts(x, n, w.cols);
            if n == 1 {
                out.par_chunks_mut(chunk).enumerate().for_each(|(c, o)| {
                    for (i, y) in o.iter_mut().enumerate() {
                        *y = dot::dot_q(level, w.ty, w.row(c * chunk + i), &acts);
                    }
                });
            } else {
                // Rows outer, tokens inner: each weight row is read once from memory and
                // reused for every token from cache. Tasks own disjoint rows and write
                // their results straight into the token-major output.
                let out_ptr = SharedOut(out.as_mut_ptr());
                let rows = w.rows;
                (0..rows.div_ceil(chunk)).into_par_iter().for_each_init(
                    || vec![0.0f32; n],
                    |ys, c| {
                        for r in c * chunk..((c + 1) * chunk).min(rows) {
                            dot::dot_q_tokens(level, w.ty, w.row(r), &acts, blocks_per_row, ys);
                            for (t, &y) in ys.iter().enumerate() {
                                // SAFETY: t < n and r < rows, so the index is inside `out`
                                // (n * rows long), and no other task writes row r.
                                unsafe { out_ptr.write(t * rows + r, y) };
                            }
                        }
                    },
                );
            }
        }
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            let mut tmp = vec![0.0f32; w.rows * n];
            tmp.par_chunks_mut(chunk * n).enumerate().for_each_init(
                || vec![0.0f32; w.cols],
                |row_f32, (c, o)| {
                    for (i, ys) in o.chunks_mut(n).enumerate() {
                        dequantize_row(w.ty, w.row(c * chunk + i), row_f32);
                        for (t, y) in ys.iter_mut().enumerate() {
                            *y = dot_f32(row_f32, &x[t * w.cols..(t + 1) * w.cols]);
                        }
                    }
                },
            );
            transpose(&tmp, w.rows, n, out);
        }
    }
}

/// Token pairs per tile in the pair kernels: eight tokens' accumulators fit the
/// registers with room to spare.
#[cfg(target_arch = "x86_64")]
const TILE_PAIRS: usize = 4;

/// `matmul` on the AVX-512 token-pair kernels. Each task owns `chunk` rows; it
/// walks the tokens in tiles of eight and, within a tile, its rows, so a tile's
/// activations and the task's rows both stay in cache.
#[cfg(target_arch = "x86_64")]
fn matmul_token_pairs(w: &QMatrix<'_>, x: &[f32], n: usize, chunk: usize, out: &mut [f32]) {
    let acts = avx512::TokenPairActs::quantize(w.ty, x, n, w.cols);
    let rows = w.rows;
    let pairs = n.div_ceil(2);
    let out_ptr = SharedOut(out.as_mut_ptr());
    (0..rows.div_ceil(chunk)).into_par_iter().for_each(|c| {
        let task_rows = c * chunk..((c + 1) * chunk).min(rows);
        let mut first = 0;
        while first < pairs {
            let tile = if pairs - first >= TILE_PAIRS {
                TILE_PAIRS
            } else {
                1
            };
            for r in task_rows.clone() {
                let row = w.row(r);
                // SAFETY: `simd()` found AVX-512 VNNI and `supports` the type, so rows
                // hold whole blocks; every pair index is below `pairs`.
                let ys: &[[f32; 2]] = unsafe {
                    if tile == TILE_PAIRS {
                        &avx512::dot_row::<TILE_PAIRS>(w.ty, row, &acts, first)
                    } else {
                        &avx512::dot_row::<1>(w.ty, row, &acts, first)
                    }
                };
                for (t, &y) in ys.iter().flatten().enumerate() {
                    let token = 2 * first + t;
                    if token < n {
                        // SAFETY: token < n and r < rows, so the index is inside `out`,
                        // and no other task writes row r.
                        unsafe { out_ptr.write(token * rows + r, y) };
                    }
                }
            }
            first += tile;
        }
    });
}

/// The output of a matrix product, written by parallel tasks that each own distinct rows.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

// SAFETY: tasks write disjoint indices, and the borrow of the output outlives them all.
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// # Safety
    /// `i` must be in bounds and written by no other task.
    unsafe fn write(self, i: usize, v: f32) {
        // SAFETY: guaranteed by the caller.
        unsafe { self.0.add(i).write(v) }
    }
}

/// `out[t * rows + r] = src[r * n + t]`.
fn transpose(src: &[f32], rows: usize, n: usize, out: &mut [f32]) {
    if n == 1 {
        out.copy_from_slice(src);
        return;
    }
    for (r, row) in src.chunks_exact(n).enumerate().take(rows) {
        for (t, &v) in row.iter().enumerate() {
            out[t * rows + r] = v;
        }
    }
}

/// Dot product of two f32 vectors, in eight independent lanes so it vectorizes.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `out = x / rms(x) * weight`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let ss: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let scale = (1.0 / (ss / x.len() as f64 + eps as f64).sqrt()) as f32;
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * scale * w;
    }
}

/// `out[i] = silu(gate[i]) * up[i]`.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// Softmax in place (max-subtracted).
pub fn softmax_inplace(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Dot of an f32 vector with an f16 vector (attention q·k over the f16 KV cache).
pub fn dot_f32_f16(a: &[f32], b: &[f16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd() >= Simd::Avx2 {
        // SAFETY: AVX2, FMA and F16C were detected at run time.
        return unsafe { dot::dot_f32_f16_avx2(a, b) };
    }
    #[cfg(target_arch = "aarch64")]
    if simd() >= Simd::Neon {
        // SAFETY: NEON was detected at run time.
        return unsafe { neon::dot_f32_f16(a, b) };
    }
    a.iter().zip(b).map(|(&x, &y)| x * y.to_f32()).sum()
}

/// `y += a * x` with `x` in f16 (attention's weighted sum of V).
pub fn axpy_f16(y: &mut [f32], a: f32, x: &[f16]) {
    #[cfg(target_arch = "x86_64")]
    if simd() >= Simd::Avx2 {
        // SAFETY: AVX2, FMA and F16C were detected at run time.
        unsafe { dot::axpy_f16_avx2(y, a, x) };
        return;
    }
    #[cfg(target_arch = "aarch64")]
    if simd() >= Simd::Neon {
        // SAFETY: NEON was detected at run time.
        unsafe { neon::axpy_f16(y, a, x) };
        return;
    }
    for (o, &v) in y.iter_mut().zip(x) {
        *o += a * v.to_f32();
    }
}

/// Converts f32 to f16 (writing K and V into the cache).
pub fn f32_to_f16(src: &[f32], dst: &mut [f16]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f16::from_f32(s);
    }
}

#[cfg(test)]
mod tests;
