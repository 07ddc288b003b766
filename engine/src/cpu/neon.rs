//! AArch64 NEON kernels: quantized weight rows against Q8 activation blocks, and
//! the f16 vector kernels attention uses.
//!
//! Each block is dotted in integers, then fused-multiply-added with the
//! combined scale into eight f32 lanes (two registers), laid out and finally
//! summed exactly as in the x86 kernels, so a result has the same bits on ARM as
//! on x86: that keeps greedy output on the path the llama.cpp reference took.
//! The integer dot is `sdot` where the CPU has the dotprod extension, and
//! widening multiplies with pairwise adds in `sdot`'s lanes otherwise. Both are
//! exact, so the two levels give the same bits. Every kernel is generic over the
//! number of tokens it dots a weight block against; a token's arithmetic does not
//! depend on it, so a result is the same alone or in a batch.
//!
//! `sdot` and the f16 widening are written as inline assembly: their intrinsics
//! (`vdotq_s32`, `vcvt_f32_f16`) are not stable Rust. Both instructions are
//! AArch64's own (dotprod, and base Advanced SIMD), so nothing here emulates them.

use std::arch::aarch64::*;
use std::arch::asm;

use half::f16;

use super::dot::scalar;
use super::quant::ActBlock;
use crate::gguf::GgmlType;

/// Tokens per pass over a weight row: each block is unpacked once and dotted four times.
const TOKENS: usize = 4;

/// One weight row against `ys.len()` tokens' activation rows of `bpr` blocks each.
///
/// # Safety
/// The CPU must support NEON, and the dotprod extension when `dotprod` is set.
pub(super) unsafe fn dot_q_tokens(
    dotprod: bool,
    ty: GgmlType,
    row: &[u8],
    acts: &[ActBlock],
    bpr: usize,
    ys: &mut [f32],
) {
    let token = |t: usize| &acts[t * bpr..(t + 1) * bpr];
    let mut start = 0;
    while start + TOKENS <= ys.len() {
        let four = [
            token(start),
            token(start + 1),
            token(start + 2),
            token(start + 3),
        ];
        // SAFETY: the caller vouches for the CPU features.
        let out = unsafe { dot_row(dotprod, ty, row, four) };
        ys[start..start + TOKENS].copy_from_slice(&out);
        start += TOKENS;
    }
    for (t, y) in ys.iter_mut().enumerate().skip(start) {
        // SAFETY: as above.
        *y = unsafe { dot_row(dotprod, ty, row, [token(t)]) }[0];
    }
}

/// # Safety
/// As for `dot_q_tokens`.
unsafe fn dot_row<const N: usize>(
    dotprod: bool,
    ty: GgmlType,
    row: &[u8],
    acts: [&[ActBlock]; N],
) -> [f32; N] {
    // SAFETY: the caller vouches for NEON, and for dotprod where `dotprod` is set.
    unsafe {
        match (ty, dotprod) {
            (GgmlType::Q4_0, true) => q4_0_dotprod(row, acts),
            (GgmlType::Q4_0, false) => q4_0_neon(row, acts),
            (GgmlType::Q4_1, true) => q4_1_dotprod(row, acts),
            (GgmlType::Q4_1, false) => q4_1_neon(row, acts),
            (GgmlType::Q8_0, true) => q8_0_dotprod(row, acts),
            (GgmlType::Q8_0, false) => q8_0_neon(row, acts),
            _ => acts.map(|a| scalar(ty, row, a)),
        }
    }
}

/// Σ w·y over 16 signed byte pairs, as 4 i32 lanes (lane k: bytes 4k..4k + 4), with
/// `sdot`.
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn dot16_dotprod(w: int8x16_t, y: int8x16_t) -> int32x4_t {
    let mut acc = vdupq_n_s32(0);
    // SAFETY: dotprod is enabled for this function; the instruction touches registers only.
    unsafe {
        asm!(
            "sdot {acc:v}.4s, {w:v}.16b, {y:v}.16b",
            acc = inout(vreg) acc,
            w = in(vreg) w,
            y = in(vreg) y,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    acc
}

/// Σ w·y over 16 signed byte pairs, in `sdot`'s lanes, with widening multiplies: each
/// product (|w| ≤ 128, |y| ≤ 127) fits an i16, pairs are summed into i32, and pairs
/// of those into lane k = bytes 4k..4k + 4.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn dot16_neon(w: int8x16_t, y: int8x16_t) -> int32x4_t {
    let lo = vpaddlq_s16(vmull_s8(vget_low_s8(w), vget_low_s8(y)));
    let hi = vpaddlq_s16(vmull_high_s8(w, y));
    vpaddq_s32(lo, hi)
}

/// Eight f32 lanes, as one AVX register of the x86 kernels: lanes 0..4 and 4..8.
type Lanes8 = [float32x4_t; 2];

/// `acc += s · p`, fused, lane by lane.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn fma8(acc: Lanes8, p: [int32x4_t; 2], s: f32) -> Lanes8 {
    [
        vfmaq_n_f32(acc[0], vcvtq_f32_s32(p[0]), s),
        vfmaq_n_f32(acc[1], vcvtq_f32_s32(p[1]), s),
    ]
}

/// The sum of eight lanes in the x86 kernels' order: ((0+4) + (2+6)) + ((1+5) + (3+7)).
#[inline]
#[target_feature(enable = "neon")]
unsafe fn hsum8(acc: Lanes8) -> f32 {
    let s = vaddq_f32(acc[0], acc[1]);
    let s = vadd_f32(vget_low_f32(s), vget_high_f32(s));
    vget_lane_f32::<0>(s) + vget_lane_f32::<1>(s)
}

/// The f16 at `p` as f32.
///
/// # Safety
/// Two bytes must be readable at `p`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees two readable bytes.
    let bits = unsafe { (p as *const u16).read_unaligned() };
    let out: f32;
    // SAFETY: FCVT (half to single) is base AArch64 floating point; registers only.
    unsafe {
        asm!(
            "fcvt {out:s}, {bits:h}",
            out = lateout(vreg) out,
            bits = in(vreg) bits,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    out
}

/// Eight f16 values widened to f32: lanes 0..4 and 4..8.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn widen_f16(h: uint16x8_t) -> (float32x4_t, float32x4_t) {
    let (lo, hi): (float32x4_t, float32x4_t);
    // SAFETY: FCVTL/FCVTL2 are base Advanced SIMD; registers only. `out` keeps both
    // outputs off `h`, which the second instruction still reads.
    unsafe {
        asm!(
            "fcvtl {lo:v}.4s, {h:v}.4h",
            "fcvtl2 {hi:v}.4s, {h:v}.8h",
            lo = out(vreg) lo,
            hi = out(vreg) hi,
            h = in(vreg) h,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    (lo, hi)
}

/// A token's 32 activation quants as two halves.
///
/// # Safety
/// NEON must be available.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn act_quants(a: &ActBlock) -> (int8x16_t, int8x16_t) {
    // SAFETY: `qs` holds 32 i8.
    unsafe { (vld1q_s8(a.qs.as_ptr()), vld1q_s8(a.qs.as_ptr().add(16))) }
}

/// The 32 nibbles at `p` as signed bytes: elements 0..15 (low nibbles), 16..31 (high).
///
/// # Safety
/// 16 bytes must be readable at `p`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn nibbles(p: *const u8) -> (int8x16_t, int8x16_t) {
    // SAFETY: the caller guarantees 16 readable bytes.
    let raw = unsafe { vld1q_u8(p) };
    let lo = vandq_u8(raw, vdupq_n_u8(0x0f));
    let hi = vshrq_n_u8::<4>(raw);
    (vreinterpretq_s8_u8(lo), vreinterpretq_s8_u8(hi))
}

/// Defines a Q4_1 kernel (d·a.d·Σ q·y + m·a.s per block) over an integer dot.
macro_rules! q4_1_kernel {
    ($name:ident, $dot:ident, $features:literal) => {
        #[target_feature(enable = $features)]
        unsafe fn $name<const N: usize>(row: &[u8], acts: [&[ActBlock]; N]) -> [f32; N] {
            let zero = vdupq_n_f32(0.0);
            let mut acc = [[zero; 2]; N];
            let mut mins = [0.0f32; N];
            for (i, b) in row.chunks_exact(20).enumerate() {
                // SAFETY: each chunk is a whole 20-byte block: d, m, 16 bytes of nibbles.
                let (d, m, (q0, q1)) = unsafe {
                    let p = b.as_ptr();
                    (f16_at(p), f16_at(p.add(2)), nibbles(p.add(4)))
                };
                for t in 0..N {
                    let a = &acts[t][i];
                    // SAFETY: same features as this function.
                    unsafe {
                        let (y0, y1) = act_quants(a);
                        acc[t] = fma8(acc[t], [$dot(q0, y0), $dot(q1, y1)], d * a.d);
                    }
                    mins[t] = m.mul_add(a.s, mins[t]);
                }
            }
            let mut out = [0.0f32; N];
            for t in 0..N {
                // SAFETY: same features as this function.
                out[t] = unsafe { hsum8(acc[t]) } + mins[t];
            }
            out
        }
    };
}

/// Defines a Q4_0 kernel (d·a.d·(Σ q·y − 8·a.sum) per block) over an integer dot.
macro_rules! q4_0_kernel {
    ($name:ident, $dot:ident, $features:literal) => {
        #[target_feature(enable = $features)]
        unsafe fn $name<const N: usize>(row: &[u8], acts: [&[ActBlock]; N]) -> [f32; N] {
            let zero = vdupq_n_f32(0.0);
            let mut acc = [[zero; 2]; N];
            let mut offs = [0.0f32; N];
            for (i, b) in row.chunks_exact(18).enumerate() {
                // SAFETY: each chunk is a whole 18-byte block: d, 16 bytes of nibbles.
                let (d, (q0, q1)) = unsafe { (f16_at(b.as_ptr()), nibbles(b.as_ptr().add(2))) };
                for t in 0..N {
                    let a = &acts[t][i];
                    let s = d * a.d;
                    // SAFETY: same features as this function.
                    unsafe {
                        let (y0, y1) = act_quants(a);
                        acc[t] = fma8(acc[t], [$dot(q0, y0), $dot(q1, y1)], s);
                    }
                    offs[t] -= 8.0 * s * a.sum as f32;
                }
            }
            let mut out = [0.0f32; N];
            for t in 0..N {
                // SAFETY: same features as this function.
                out[t] = unsafe { hsum8(acc[t]) } + offs[t];
            }
            out
        }
    };
}

/// Defines a Q8_0 kernel (d·a.d·Σ w·y per block) over an integer dot.
macro_rules! q8_0_kernel {
    ($name:ident, $dot:ident, $features:literal) => {
        #[target_feature(enable = $features)]
        unsafe fn $name<const N: usize>(row: &[u8], acts: [&[ActBlock]; N]) -> [f32; N] {
            let zero = vdupq_n_f32(0.0);
            let mut acc = [[zero; 2]; N];
            for (i, b) in row.chunks_exact(34).enumerate() {
                // SAFETY: each chunk is a whole 34-byte block: d, 32 × i8.
                let (d, w0, w1) = unsafe {
                    let w = b.as_ptr().add(2) as *const i8;
                    (f16_at(b.as_ptr()), vld1q_s8(w), vld1q_s8(w.add(16)))
                };
                for t in 0..N {
                    let a = &acts[t][i];
                    // SAFETY: same features as this function.
                    unsafe {
                        let (y0, y1) = act_quants(a);
                        acc[t] = fma8(acc[t], [$dot(w0, y0), $dot(w1, y1)], d * a.d);
                    }
                }
            }
            let mut out = [0.0f32; N];
            for t in 0..N {
                // SAFETY: same features as this function.
                out[t] = unsafe { hsum8(acc[t]) };
            }
            out
        }
    };
}

q4_1_kernel!(q4_1_neon, dot16_neon, "neon");
q4_1_kernel!(q4_1_dotprod, dot16_dotprod, "neon,dotprod");
q4_0_kernel!(q4_0_neon, dot16_neon, "neon");
q4_0_kernel!(q4_0_dotprod, dot16_dotprod, "neon,dotprod");
q8_0_kernel!(q8_0_neon, dot16_neon, "neon");
q8_0_kernel!(q8_0_dotprod, dot16_dotprod, "neon,dotprod");

/// NEON dot of f32 with f16.
///
/// # Safety
/// The CPU must support NEON.
#[target_feature(enable = "neon")]
pub(super) unsafe fn dot_f32_f16(a: &[f32], b: &[f16]) -> f32 {
    let n = a.len().min(b.len());
    let (mut acc0, mut acc1) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n bounds both reads; f16 is two bytes, like u16.
        unsafe {
            let (h0, h1) = widen_f16(vld1q_u16(b.as_ptr().add(i) as *const u16));
            let x = a.as_ptr().add(i);
            acc0 = vfmaq_f32(acc0, vld1q_f32(x), h0);
            acc1 = vfmaq_f32(acc1, vld1q_f32(x.add(4)), h1);
        }
        i += 8;
    }
    // SAFETY: same features as this function.
    let mut s = unsafe { hsum8([acc0, acc1]) };
    for j in i..n {
        s += a[j] * b[j].to_f32();
    }
    s
}

/// NEON `y += a * x` with x in f16.
///
/// # Safety
/// The CPU must support NEON.
#[target_feature(enable = "neon")]
pub(super) unsafe fn axpy_f16(y: &mut [f32], a: f32, x: &[f16]) {
    let n = y.len().min(x.len());
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n bounds both accesses; f16 is two bytes, like u16.
        unsafe {
            let (h0, h1) = widen_f16(vld1q_u16(x.as_ptr().add(i) as *const u16));
            let p = y.as_mut_ptr().add(i);
            vst1q_f32(p, vfmaq_n_f32(vld1q_f32(p), h0, a));
            vst1q_f32(p.add(4), vfmaq_n_f32(vld1q_f32(p.add(4)), h1, a));
        }
        i += 8;
    }
    for j in i..n {
        y[j] += a * x[j].to_f32();
    }
}
