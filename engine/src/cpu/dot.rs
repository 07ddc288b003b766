//! Dot products of quantized weight rows with quantized activation blocks,
//! scalar and x86 SIMD (AArch64's are in `neon`), plus the x86 f16 vector
//! kernels attention uses.
//!
//! Per 32-element block, with activation scale `a.d` and quant sum `a.sum`:
//! - Q4_1: d·a.d·Σ q·y + m·a.s
//! - Q4_0: d·a.d·(Σ q·y − 8·a.sum)
//! - Q8_0: d·a.d·Σ w·y

#[cfg(target_arch = "x86_64")]
use half::f16;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::Simd;
use super::quant::{ActBlock, f16_at};
use crate::gguf::GgmlType;

/// One weight row against one row of activation blocks.
pub(super) fn dot_q(level: Simd, ty: GgmlType, row: &[u8], acts: &[ActBlock]) -> f32 {
    let mut y = [0.0f32];
    dot_q_tokens(level, ty, row, acts, acts.len(), &mut y);
    y[0]
}

/// One weight row against `ys.len()` tokens' activation rows of `bpr` blocks each.
pub(super) fn dot_q_tokens(
    level: Simd,
    ty: GgmlType,
    row: &[u8],
    acts: &[ActBlock],
    bpr: usize,
    ys: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if level >= Simd::Avx2 {
        let vnni = level == Simd::Avx512Vnni;
        // Four tokens at a time: each weight block is unpacked once and dotted four times.
        let mut start = 0;
        if matches!(ty, GgmlType::Q4_1 | GgmlType::Q8_0) {
            while start + 4 <= ys.len() {
                let a = |k: usize| &acts[(start + k) * bpr..(start + k + 1) * bpr];
                let four = [a(0), a(1), a(2), a(3)];
                // SAFETY: as below; each of the four slices holds `bpr` blocks.
                let out = unsafe {
                    match (ty, vnni) {
                        (GgmlType::Q4_1, true) => q4_1_x4_vnni(row, four),
                        (GgmlType::Q4_1, false) => q4_1_x4_avx2(row, four),
                        (_, true) => q8_0_x4_vnni(row, four),
                        (_, false) => q8_0_x4_avx2(row, four),
                    }
                };
                ys[start..start + 4].copy_from_slice(&out);
                start += 4;
            }
        }
        for (t, y) in ys.iter_mut().enumerate().skip(start) {
            let a = &acts[t * bpr..(t + 1) * bpr];
            // SAFETY: the level was detected at run time (AVX2, FMA, F16C; and
            // AVX-512 VL/BW/VNNI for `vnni`); rows hold `bpr` whole blocks.
            *y = unsafe {
                match (ty, vnni) {
                    (GgmlType::Q4_1, true) => q4_1_vnni(row, a),
                    (GgmlType::Q4_1, false) => q4_1_avx2(row, a),
                    (GgmlType::Q4_0, true) => q4_0_vnni(row, a),
                    (GgmlType::Q4_0, false) => q4_0_avx2(row, a),
                    (GgmlType::Q8_0, true) => q8_0_vnni(row, a),
                    (GgmlType::Q8_0, false) => q8_0_avx2(row, a),
                    _ => scalar(ty, row, a),
                }
            };
        }
        return;
    }
    #[cfg(target_arch = "aarch64")]
    if level >= Simd::Neon {
        // SAFETY: the level was detected at run time (NEON; and dotprod for NeonDot).
        unsafe { super::neon::dot_q_tokens(level == Simd::NeonDot, ty, row, acts, bpr, ys) };
        return;
    }
    let _ = level;
    for (t, y) in ys.iter_mut().enumerate() {
        *y = scalar(ty, row, &acts[t * bpr..(t + 1) * bpr]);
    }
}

/// The reference: integer dot per block, then scaled.
pub(super) fn scalar(ty: GgmlType, row: &[u8], acts: &[ActBlock]) -> f32 {
    let mut sum = 0.0f32;
    match ty {
        GgmlType::Q4_1 => {
            for (b, a) in row.chunks_exact(20).zip(acts) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let mut isum = 0i32;
                for j in 0..16 {
                    isum += (b[4 + j] & 0x0f) as i32 * a.qs[j] as i32;
                    isum += (b[4 + j] >> 4) as i32 * a.qs[j + 16] as i32;
                }
                sum += d * a.d * isum as f32 + m * a.s;
            }
        }
        GgmlType::Q4_0 => {
            for (b, a) in row.chunks_exact(18).zip(acts) {
                let d = f16_at(b, 0);
                let mut isum = 0i32;
                for j in 0..16 {
                    isum += (b[2 + j] & 0x0f) as i32 * a.qs[j] as i32;
                    isum += (b[2 + j] >> 4) as i32 * a.qs[j + 16] as i32;
                }
                sum += d * a.d * (isum - 8 * a.sum) as f32;
            }
        }
        GgmlType::Q8_0 => {
            for (b, a) in row.chunks_exact(34).zip(acts) {
                let d = f16_at(b, 0);
                let isum: i32 = (0..32)
                    .map(|j| b[2 + j] as i8 as i32 * a.qs[j] as i32)
                    .sum();
                sum += d * a.d * isum as f32;
            }
        }
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            unreachable!("float weights take the f32 path")
        }
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum(v: __m256) -> f32 {
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(_mm256_castps256_ps128(v), hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// Loads the two f16 values at `p` (a block's d and m) as f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn two_f16(p: *const u8) -> (f32, f32) {
    // SAFETY: the caller guarantees 4 readable bytes at p.
    let raw = unsafe { (p as *const i32).read_unaligned() };
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(raw));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_shuffle_ps(v, v, 1)))
}

/// The 32 nibbles of a block as bytes 0..15 (elements 0..15 low, 16..31 high).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 16 readable bytes at p.
    let raw = unsafe { _mm_loadu_si128(p as *const __m128i) };
    let mask = _mm_set1_epi8(0x0f);
    let lo = _mm_and_si128(raw, mask);
    let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    _mm256_set_m128i(hi, lo)
}

/// Σ u·s over 32 unsigned (u < 128) × signed byte pairs, as 8 i32 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_us_avx2(u: __m256i, s: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
unsafe fn dot_us_vnni(u: __m256i, s: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
}

/// Defines a Q4_1 kernel over one of the integer-dot primitives.
macro_rules! q4_1_kernel {
    ($name:ident, $dot:ident, $features:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name(row: &[u8], acts: &[ActBlock]) -> f32 {
            let mut acc = _mm256_setzero_ps();
            let mut acc_min = 0.0f32;
            for (b, a) in row.chunks_exact(20).zip(acts) {
                // SAFETY: each chunk is a whole 20-byte block; ActBlock holds 32 i8.
                unsafe {
                    let (d, m) = two_f16(b.as_ptr());
                    let q = nibbles(b.as_ptr().add(4));
                    let y = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
                    let p = _mm256_cvtepi32_ps($dot(q, y));
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), p, acc);
                    acc_min = m.mul_add(a.s, acc_min);
                }
            }
            // SAFETY: same features as this function.
            unsafe { hsum(acc) + acc_min }
        }
    };
}

macro_rules! q4_0_kernel {
    ($name:ident, $dot:ident, $features:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name(row: &[u8], acts: &[ActBlock]) -> f32 {
            let mut acc = _mm256_setzero_ps();
            let mut acc_off = 0.0f32;
            for (b, a) in row.chunks_exact(18).zip(acts) {
                // SAFETY: each chunk is a whole 18-byte block; ActBlock holds 32 i8.
                unsafe {
                    let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                        (b.as_ptr() as *const u16).read_unaligned() as i32,
                    )));
                    let q = nibbles(b.as_ptr().add(2));
                    let y = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
                    let p = _mm256_cvtepi32_ps($dot(q, y));
                    let s = d * a.d;
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(s), p, acc);
                    acc_off -= 8.0 * s * a.sum as f32;
                }
            }
            // SAFETY: same features as this function.
            unsafe { hsum(acc) + acc_off }
        }
    };
}

macro_rules! q8_0_kernel {
    ($name:ident, $dot:ident, $features:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name(row: &[u8], acts: &[ActBlock]) -> f32 {
            let mut acc = _mm256_setzero_ps();
            for (b, a) in row.chunks_exact(34).zip(acts) {
                // SAFETY: each chunk is a whole 34-byte block; ActBlock holds 32 i8.
                unsafe {
                    let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                        (b.as_ptr() as *const u16).read_unaligned() as i32,
                    )));
                    let w = _mm256_loadu_si256(b.as_ptr().add(2) as *const __m256i);
                    let y = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
                    // |w| · (y with w's sign): an unsigned × signed product equal to w · y.
                    let p = $dot(_mm256_sign_epi8(w, w), _mm256_sign_epi8(y, w));
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), _mm256_cvtepi32_ps(p), acc);
                }
            }
            // SAFETY: same features as this function.
            unsafe { hsum(acc) }
        }
    };
}

/// Defines a Q4_1 kernel over four tokens' activations.
macro_rules! q4_1_x4_kernel {
    ($name:ident, $dot:ident, $features:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name(row: &[u8], acts: [&[ActBlock]; 4]) -> [f32; 4] {
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut mins = [0.0f32; 4];
            for (i, b) in row.chunks_exact(20).enumerate() {
                // SAFETY: each chunk is a whole 20-byte block; every token has block i.
                unsafe {
                    let (d, m) = two_f16(b.as_ptr());
                    let q = nibbles(b.as_ptr().add(4));
                    for t in 0..4 {
                        let a = &acts[t][i];
                        let y = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
                        let p = _mm256_cvtepi32_ps($dot(q, y));
                        acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), p, acc[t]);
                        mins[t] = m.mul_add(a.s, mins[t]);
                    }
                }
            }
            // SAFETY: same features as this function.
            unsafe {
                [
                    hsum(acc[0]) + mins[0],
                    hsum(acc[1]) + mins[1],
                    hsum(acc[2]) + mins[2],
                    hsum(acc[3]) + mins[3],
                ]
            }
        }
    };
}

/// Defines a Q8_0 kernel over four tokens' activations.
macro_rules! q8_0_x4_kernel {
    ($name:ident, $dot:ident, $features:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name(row: &[u8], acts: [&[ActBlock]; 4]) -> [f32; 4] {
            let mut acc = [_mm256_setzero_ps(); 4];
            for (i, b) in row.chunks_exact(34).enumerate() {
                // SAFETY: each chunk is a whole 34-byte block; every token has block i.
                unsafe {
                    let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                        (b.as_ptr() as *const u16).read_unaligned() as i32,
                    )));
                    let w = _mm256_loadu_si256(b.as_ptr().add(2) as *const __m256i);
                    let aw = _mm256_sign_epi8(w, w);
                    for t in 0..4 {
                        let a = &acts[t][i];
                        let y = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
                        let p = $dot(aw, _mm256_sign_epi8(y, w));
                        acc[t] =
                            _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), _mm256_cvtepi32_ps(p), acc[t]);
                    }
                }
            }
            // SAFETY: same features as this function.
            unsafe { [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])] }
        }
    };
}

q4_1_x4_kernel!(q4_1_x4_avx2, dot_us_avx2, "avx2,fma,f16c");
q4_1_x4_kernel!(
    q4_1_x4_vnni,
    dot_us_vnni,
    "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni"
);
q8_0_x4_kernel!(q8_0_x4_avx2, dot_us_avx2, "avx2,fma,f16c");
q8_0_x4_kernel!(
    q8_0_x4_vnni,
    dot_us_vnni,
    "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni"
);

q4_1_kernel!(q4_1_avx2, dot_us_avx2, "avx2,fma,f16c");
q4_1_kernel!(
    q4_1_vnni,
    dot_us_vnni,
    "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni"
);
q4_0_kernel!(q4_0_avx2, dot_us_avx2, "avx2,fma,f16c");
q4_0_kernel!(
    q4_0_vnni,
    dot_us_vnni,
    "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni"
);
q8_0_kernel!(q8_0_avx2, dot_us_avx2, "avx2,fma,f16c");
q8_0_kernel!(
    q8_0_vnni,
    dot_us_vnni,
    "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni"
);

/// AVX2 dot of f32 with f16.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_f32_f16_avx2(a: &[f32], b: &[f16]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n bounds both reads.
        unsafe {
            let h = _mm_loadu_si128(b.as_ptr().add(i) as *const __m128i);
            let x = _mm256_loadu_ps(a.as_ptr().add(i));
            acc = _mm256_fmadd_ps(x, _mm256_cvtph_ps(h), acc);
        }
        i += 8;
    }
    // SAFETY: same features as this function.
    let mut s = unsafe { hsum(acc) };
    for j in i..n {
        s += a[j] * b[j].to_f32();
    }
    s
}

/// AVX2 `y += a * x` with x in f16.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn axpy_f16_avx2(y: &mut [f32], a: f32, x: &[f16]) {
    let n = y.len().min(x.len());
    let av = _mm256_set1_ps(a);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n bounds both accesses.
        unsafe {
            let h = _mm_loadu_si128(x.as_ptr().add(i) as *const __m128i);
            let p = y.as_mut_ptr().add(i);
            _mm256_storeu_ps(
                p,
                _mm256_fmadd_ps(av, _mm256_cvtph_ps(h), _mm256_loadu_ps(p)),
            );
        }
        i += 8;
    }
    for j in i..n {
        y[j] += a * x[j].to_f32();
    }
}
