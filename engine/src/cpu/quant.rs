//! Block formats: dequantizing GGUF rows, and quantizing activations to Q8 blocks.
//!
//! ggml's formats, 32 elements per block unless noted:
//! - Q4_0: f16 scale `d`, 16 bytes of nibbles; value = (q - 8) · d.
//! - Q4_1: f16 `d`, f16 min `m`, 16 bytes of nibbles; value = q · d + m.
//! - Q8_0: f16 `d`, 32 × i8; value = q · d.
//!
//! In a nibble block, byte j holds element j in its low nibble and element
//! j + 16 in its high nibble.

use half::{bf16, f16};

use crate::gguf::GgmlType;

/// One quantized block of 32 activations: value ≈ qs[i] · d; `sum` = Σ qs;
/// `s` ≈ d · Σ qs. As in ggml's Q8_0/Q8_1, `d` and `s` carry f16 precision.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(8))]
pub(crate) struct ActBlock {
    pub d: f32,
    pub s: f32,
    pub sum: i32,
    pub qs: [i8; 32],
}

pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Dequantizes one row of `out.len()` elements.
///
/// # Panics
/// If `row` is shorter than the row of `out.len()` elements of type `ty`.
pub fn dequantize_row(ty: GgmlType, row: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::F32 => {
            for (o, b) in out.iter_mut().zip(row.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, b) in out.iter_mut().zip(row.chunks_exact(2)) {
                *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, b) in out.iter_mut().zip(row.chunks_exact(2)) {
                *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        GgmlType::Q4_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(row.chunks_exact(18)) {
                let d = f16_at(b, 0);
                for j in 0..16 {
                    o[j] = ((b[2 + j] & 0x0f) as i32 - 8) as f32 * d;
                    o[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (o, b) in out.chunks_exact_mut(32).zip(row.chunks_exact(20)) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                for j in 0..16 {
                    o[j] = (b[4 + j] & 0x0f) as f32 * d + m;
                    o[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
                }
            }
        }
        GgmlType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(row.chunks_exact(34)) {
                let d = f16_at(b, 0);
                for j in 0..32 {
                    o[j] = b[2 + j] as i8 as f32 * d;
                }
            }
        }
    }
}

fn f16_round(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// Quantizes `n` rows of `cols` activations (cols a multiple of 32) into Q8 blocks,
/// row after row, as ggml's SIMD path does (scale = max|x| / 127, round half to
/// even, scale and sum stored at f16 precision): matching its rounding keeps
/// greedy output on llama.cpp's path.
pub(crate) fn quantize_acts(x: &[f32], n: usize, cols: usize) -> Vec<ActBlock> {
    debug_assert_eq!(cols % 32, 0);
    let empty = ActBlock {
        d: 0.0,
        s: 0.0,
        sum: 0,
        qs: [0; 32],
    };
    let mut out = vec![empty; n * cols / 32];
    let quantize = |(o, block): (&mut ActBlock, &[f32])| *o = quantize_block(block);
    if n >= 16 {
        use rayon::prelude::*;
        out.par_iter_mut()
            .zip(x[..n * cols].par_chunks_exact(32))
            .for_each(quantize);
    } else {
        out.iter_mut()
            .zip(x[..n * cols].chunks_exact(32))
            .for_each(quantize);
    }
    out
}

pub(super) fn quantize_block(block: &[f32]) -> ActBlock {
    // Adding and subtracting 1.5 · 2^23 rounds to the nearest integer, ties to even
    // (the FPU's default mode), for |v| < 2^22; quantized values are within ±127.
    const ROUND: f32 = 12_582_912.0;
    let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; 32];
    let mut sum = 0i32;
    for (q, &v) in qs.iter_mut().zip(block) {
        *q = ((v * id + ROUND) - ROUND) as i8;
        sum += *q as i32;
    }
    ActBlock {
        d: f16_round(d),
        s: f16_round(sum as f32 * d),
        sum,
        qs,
    }
}
