//! AVX-512 VNNI matrix-product kernels that dot one weight block against two
//! tokens per instruction.
//!
//! A weight block's 32 values are unpacked once into both 256-bit halves of a
//! register and dotted against a token pair whose activations sit side by side
//! ([`TokenPairActs`]: per pair of tokens and block, token 2j's 32 quants then
//! token 2j+1's). Each half then does exactly what the one-token kernels (and
//! ggml's) do for its token, in the same order: per block, the integer dot in
//! eight lanes of four products, converted to f32 and fused-multiply-added with
//! the combined scale `d · a.d`; at the end the eight lanes summed pairwise, plus
//! the Q4_1 min term summed block by block. So a token's result is bit for bit the
//! same whether it runs alone or in a batch.
//!
//! The offsets of Q4_0 (value = (q − 8)·d) and Q8_0 (stored as w + 128 so the dot
//! is unsigned × signed) are cancelled inside the integer dot, which starts from
//! `−k · Σy` over each lane's four activations: the integer results equal the
//! signed dots exactly.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::quant::quantize_block;
use crate::gguf::GgmlType;

/// Quantized activations of `n` tokens, paired, in the layout the kernels read.
pub(super) struct TokenPairActs {
    /// Blocks per token row.
    blocks: usize,
    /// `pairs × blocks × 64` quants: per token pair and block, both tokens' 32.
    qs: Vec<i8>,
    /// `pairs × blocks × 16` scales: `[a.d ×8, a'.d ×8]`.
    scale: Vec<f32>,
    /// Q4_0, Q8_0: `pairs × blocks × 16` starting values of the integer dot.
    bias: Vec<i32>,
    /// Q4_1: block sums `a.s` of each group of eight tokens (four pairs), as
    /// `groups × blocks × 8`, zero padded.
    mins: Vec<f32>,
}

impl TokenPairActs {
    /// Quantizes `n` rows of `cols` activations (`cols` a multiple of 32) for
    /// weights of type `ty`, with the same per-block rounding as `quantize_acts`.
    /// An odd token count is padded with a zero token.
    pub(super) fn quantize(ty: GgmlType, x: &[f32], n: usize, cols: usize) -> Self {
        debug_assert_eq!(cols % 32, 0);
        let blocks = cols / 32;
        let pairs = n.div_ceil(2);
        let groups = pairs.div_ceil(4);
        let q4_1 = ty == GgmlType::Q4_1;
        let mut acts = Self {
            blocks,
            qs: vec![0; pairs * blocks * 64],
            scale: vec![0.0; pairs * blocks * 16],
            bias: if q4_1 {
                Vec::new()
            } else {
                vec![0; pairs * blocks * 16]
            },
            mins: if q4_1 {
                vec![0.0; groups * blocks * 8]
            } else {
                Vec::new()
            },
        };
        let offset = if ty == GgmlType::Q4_0 { -8 } else { -128 };
        // One group of eight tokens (four pairs) at a time: every buffer's share of
        // a group is contiguous.
        let one = |(g, ((qs, scale), mut extra)): GroupSlices<'_>| {
            for k in 0..8 {
                let t = 8 * g + k;
                if t >= n {
                    break;
                }
                let (pair, half) = (k / 2, k % 2);
                let row = &x[t * cols..(t + 1) * cols];
                for (b, block) in row.chunks_exact(32).enumerate() {
                    let a = quantize_block(block);
                    let at = (pair * blocks + b) * 64 + half * 32;
                    qs[at..at + 32].copy_from_slice(&a.qs);
                    let lanes = (pair * blocks + b) * 16 + half * 8;
                    scale[lanes..lanes + 8].fill(a.d);
                    match &mut extra {
                        GroupExtra::Mins(mins) => mins[b * 8 + k] = a.s,
                        GroupExtra::Bias(bias) => {
                            for (lane, four) in a.qs.chunks_exact(4).enumerate() {
                                let sum: i32 = four.iter().map(|&q| q as i32).sum();
                                bias[lanes + lane] = offset * sum;
                            }
                        }
                    }
                }
            }
        };
        let extras: Vec<GroupExtra<'_>> = if q4_1 {
            acts.mins
                .chunks_mut(blocks * 8)
                .map(GroupExtra::Mins)
                .collect()
        } else {
            acts.bias
                .chunks_mut(4 * blocks * 16)
                .map(GroupExtra::Bias)
                .collect()
        };
        let work = acts
            .qs
            .chunks_mut(4 * blocks * 64)
            .zip(acts.scale.chunks_mut(4 * blocks * 16))
            .zip(extras)
            .enumerate();
        if n >= 16 {
            use rayon::prelude::*;
            work.collect::<Vec<_>>().into_par_iter().for_each(one);
        } else {
            work.for_each(one);
        }
        acts
    }
}

/// One group of eight tokens' share of the buffers being filled:
/// (group, ((quants, scales), Q4_1's block sums or the integer dots' start)).
type GroupSlices<'a> = (usize, ((&'a mut [i8], &'a mut [f32]), GroupExtra<'a>));

/// A group's share of the per-type buffer.
enum GroupExtra<'a> {
    Mins(&'a mut [f32]),
    Bias(&'a mut [i32]),
}

/// Whether the pair kernels take a matrix of this type.
pub(super) fn supports(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0)
}

/// Sum of eight lanes in ggml's order (high half onto low, then pairwise).
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum8(x: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// One weight row against the `P` token pairs from pair `first`: returns the
/// results of tokens `2·first .. 2·(first + P)`. A tile of more than one pair
/// starts at a multiple of four pairs.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL/VNNI; `row` must be one row of `ty` with
/// `acts.blocks` blocks, and pairs `first..first + P` must exist in `acts`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
#[allow(clippy::needless_range_loop)] // j indexes the accumulators and the activations
pub(super) unsafe fn dot_row<const P: usize>(
    ty: GgmlType,
    row: &[u8],
    acts: &TokenPairActs,
    first: usize,
) -> [[f32; 2]; P] {
    let blocks = acts.blocks;
    let block_bytes = ty.block_bytes();
    debug_assert_eq!(row.len(), blocks * block_bytes);
    debug_assert!((first + P) * blocks * 64 <= acts.qs.len());
    debug_assert!(P == 1 || (P <= 4 && first.is_multiple_of(4)));
    let mut acc = [_mm512_setzero_ps(); P];
    // Q4_1's min terms of the eight tokens of this tile's group, one lane each.
    let mut mins = _mm256_setzero_ps();
    let group = first / 4;
    let low = _mm512_set1_epi8(0x0f);
    let high_bit = _mm512_set1_epi8(-128);
    // 128-bit lanes 0 and 2 keep the low nibbles, 1 and 3 shift the high ones down.
    let shifts = _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0);
    let zero = _mm512_setzero_si512();
    for b in 0..blocks {
        // SAFETY: block b lies inside the row; the activations hold `blocks` blocks
        // for every pair up to first + P.
        unsafe {
            let w = row.as_ptr().add(b * block_bytes);
            // Header f16s [d, m] (m is junk for Q4_0 and Q8_0).
            let head = _mm_cvtph_ps(_mm_cvtsi32_si128((w as *const i32).read_unaligned()));
            let d = _mm512_broadcastss_ps(head);
            let at = |j: usize| ((first + j) * blocks + b) * 16;
            let u = match ty {
                GgmlType::Q8_0 => {
                    let q = _mm256_loadu_si256(w.add(2) as *const __m256i);
                    _mm512_xor_si512(_mm512_broadcast_i64x4(q), high_bit)
                }
                _ => {
                    let off = if ty == GgmlType::Q4_1 { 4 } else { 2 };
                    let q = _mm512_broadcast_i32x4(_mm_loadu_si128(w.add(off) as *const __m128i));
                    _mm512_and_si512(_mm512_srlv_epi64(q, shifts), low)
                }
            };
            if ty == GgmlType::Q4_1 {
                let m = _mm256_set1_ps(_mm_cvtss_f32(_mm_movehdup_ps(head)));
                let sums = acts.mins.as_ptr().add((group * blocks + b) * 8);
                mins = _mm256_fmadd_ps(m, _mm256_loadu_ps(sums), mins);
                for j in 0..P {
                    let y = _mm512_loadu_si512(acts.qs.as_ptr().add(at(j) * 4).cast());
                    let dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, u, y));
                    let s = _mm512_mul_ps(d, _mm512_loadu_ps(acts.scale.as_ptr().add(at(j))));
                    acc[j] = _mm512_fmadd_ps(s, dot, acc[j]);
                }
            } else {
                for j in 0..P {
                    let y = _mm512_loadu_si512(acts.qs.as_ptr().add(at(j) * 4).cast());
                    let bias = _mm512_loadu_si512(acts.bias.as_ptr().add(at(j)).cast());
                    let dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(bias, u, y));
                    let s = _mm512_mul_ps(d, _mm512_loadu_ps(acts.scale.as_ptr().add(at(j))));
                    acc[j] = _mm512_fmadd_ps(s, dot, acc[j]);
                }
            }
        }
    }
    let mut min_lanes = [0.0f32; 8];
    // SAFETY: eight f32s fit the array.
    unsafe { _mm256_storeu_ps(min_lanes.as_mut_ptr(), mins) };
    let mut out = [[0.0f32; 2]; P];
    for j in 0..P {
        let lane = 2 * (first % 4 + j);
        let lo = _mm512_castps512_ps256(acc[j]);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[j]), 1));
        out[j] = [hsum8(lo) + min_lanes[lane], hsum8(hi) + min_lanes[lane + 1]];
    }
    out
}
