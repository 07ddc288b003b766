use half::f16;

use super::dot::{dot_q_tokens, scalar};
use super::*;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn f32(&mut self) -> f32 {
        (self.next() % 2_000_001) as f32 / 1_000_000.0 - 1.0
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

/// A random row of `blocks` blocks of `ty` with sane scales.
fn random_row(rng: &mut Rng, ty: GgmlType, blocks: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..blocks {
        let scale = f16::from_f32(0.01 + rng.f32().abs() * 0.05).to_le_bytes();
        match ty {
            GgmlType::Q4_0 => {
                out.extend(scale);
                out.extend((0..16).map(|_| rng.byte()));
            }
            GgmlType::Q4_1 => {
                out.extend(scale);
                out.extend(f16::from_f32(rng.f32() * 0.2).to_le_bytes());
                out.extend((0..16).map(|_| rng.byte()));
            }
            GgmlType::Q8_0 => {
                out.extend(scale);
                out.extend((0..32).map(|_| rng.byte()));
            }
            GgmlType::F32 => (0..32).for_each(|_| out.extend(rng.f32().to_le_bytes())),
            GgmlType::F16 => {
                (0..32).for_each(|_| out.extend(f16::from_f32(rng.f32()).to_le_bytes()))
            }
            GgmlType::BF16 => {
                (0..32).for_each(|_| out.extend(half::bf16::from_f32(rng.f32()).to_le_bytes()))
            }
        }
    }
    out
}

/// The levels this CPU can run: scalar and its own architecture's detected ones.
fn levels() -> Vec<Simd> {
    let own = if cfg!(target_arch = "aarch64") {
        [Simd::Scalar, Simd::Neon, Simd::NeonDot]
    } else {
        [Simd::Scalar, Simd::Avx2, Simd::Avx512Vnni]
    };
    own.into_iter().filter(|&l| l <= detect()).collect()
}

/// f64 reference of a weight row against f32 activations.
fn reference_dot(ty: GgmlType, row: &[u8], x: &[f32]) -> f64 {
    let mut w = vec![0.0; x.len()];
    dequantize_row(ty, row, &mut w);
    w.iter().zip(x).map(|(&a, &b)| a as f64 * b as f64).sum()
}

#[test]
fn dequantize_matches_block_formulas() {
    // Q4_1 block: d = 0.5, m = -1, nibble byte 0x21 → element 0 = 1, element 16 = 2.
    let mut b = Vec::new();
    b.extend(f16::from_f32(0.5).to_le_bytes());
    b.extend(f16::from_f32(-1.0).to_le_bytes());
    b.push(0x21);
    b.extend([0u8; 15]);
    let mut out = [0.0; 32];
    dequantize_row(GgmlType::Q4_1, &b, &mut out);
    assert_eq!(out[0], 1.0 * 0.5 - 1.0);
    assert_eq!(out[16], 2.0 * 0.5 - 1.0);
    assert_eq!(out[1], -1.0);
    // Q4_0: (q - 8) · d.
    let mut b = Vec::new();
    b.extend(f16::from_f32(2.0).to_le_bytes());
    b.push(0xf0);
    b.extend([0x88u8; 15]);
    dequantize_row(GgmlType::Q4_0, &b, &mut out);
    assert_eq!(out[0], -16.0);
    assert_eq!(out[16], 14.0);
    assert_eq!(out[1], 0.0);
}

#[test]
fn quantized_dots_match_scalar_and_reference_at_every_level() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
        for blocks in [1, 3, 18, 48] {
            let row = random_row(&mut rng, ty, blocks);
            let x: Vec<f32> = (0..blocks * 32).map(|_| rng.f32()).collect();
            let acts = quantize_acts(&x, 1, blocks * 32);
            let want = scalar(ty, &row, &acts);
            let exact = reference_dot(ty, &row, &x);
            // Activation quantization error: at most half a step (max|x|/254) per element.
            let wmax: f64 = {
                let mut w = vec![0.0; x.len()];
                dequantize_row(ty, &row, &mut w);
                w.iter().map(|v| v.abs() as f64).sum()
            };
            assert!(
                (want as f64 - exact).abs() <= wmax / 254.0 + 1e-4,
                "{ty:?} {blocks}: {want} vs {exact}"
            );
            for level in levels() {
                let mut y = [0.0f32];
                dot_q_tokens(level, ty, &row, &acts, blocks, &mut y);
                let tol = 1e-5 * (1.0 + want.abs());
                assert!(
                    (y[0] - want).abs() <= tol,
                    "{ty:?} {blocks} {level:?}: {} vs {want}",
                    y[0]
                );
            }
            // Several tokens at once (the 4-token kernels and the remainder).
            let n = 7;
            let xs: Vec<f32> = (0..n * blocks * 32).map(|_| rng.f32()).collect();
            let acts = quantize_acts(&xs, n, blocks * 32);
            let want: Vec<f32> = (0..n)
                .map(|t| scalar(ty, &row, &acts[t * blocks..(t + 1) * blocks]))
                .collect();
            for level in levels() {
                let mut ys = vec![0.0f32; n];
                dot_q_tokens(level, ty, &row, &acts, blocks, &mut ys);
                for t in 0..n {
                    let tol = 1e-5 * (1.0 + want[t].abs());
                    assert!(
                        (ys[t] - want[t]).abs() <= tol,
                        "{ty:?} {level:?} token {t}: {} vs {}",
                        ys[t],
                        want[t]
                    );
                }
            }
        }
    }
}

/// The token-pair kernels give each token bit for bit what the one-token kernel
/// gives it, so batching never changes a result.
#[cfg(target_arch = "x86_64")]
#[test]
fn token_pair_kernels_equal_one_token_kernels() {
    if detect() < Simd::Avx512Vnni {
        return;
    }
    let mut rng = Rng(0x0dd_ba11);
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
        for blocks in [1, 3, 18, 48] {
            let cols = blocks * 32;
            let row = random_row(&mut rng, ty, blocks);
            let n = 13;
            let xs: Vec<f32> = (0..n * cols).map(|_| rng.f32() * 3.0).collect();
            let single = quantize_acts(&xs, n, cols);
            let pairs = avx512::TokenPairActs::quantize(ty, &xs, n, cols);
            let want: Vec<f32> = (0..n)
                .map(|t| {
                    dot::dot_q(
                        Simd::Avx512Vnni,
                        ty,
                        &row,
                        &single[t * blocks..(t + 1) * blocks],
                    )
                })
                .collect();
            let check = |first_pair: usize, got: &[[f32; 2]]| {
                for (k, &y) in got.iter().flatten().enumerate() {
                    let t = 2 * first_pair + k;
                    let w = if t < n { want[t] } else { 0.0 };
                    if ty == GgmlType::Q4_0 {
                        // The one-token Q4_0 kernel subtracts the offset in f32.
                        assert!(
                            (y - w).abs() <= 1e-5 * (1.0 + w.abs()),
                            "{ty:?} {blocks} token {t}: {y} vs {w}"
                        );
                    } else {
                        assert_eq!(
                            y.to_bits(),
                            w.to_bits(),
                            "{ty:?} {blocks} token {t}: {y} vs {w}"
                        );
                    }
                }
            };
            // SAFETY: AVX-512 VNNI was detected; every call stays inside the 7 pairs.
            unsafe {
                check(0, &avx512::dot_row::<4>(ty, &row, &pairs, 0));
                for first in 4..7 {
                    check(first, &avx512::dot_row::<1>(ty, &row, &pairs, first));
                }
            }
        }
    }
}

/// NEON is part of every AArch64 CPU; its plain and dotprod kernels give the same
/// bits (both integer dots are exact), and a token gets the same bits alone or among
/// four.
#[cfg(target_arch = "aarch64")]
#[test]
fn neon_levels_agree_bit_for_bit() {
    assert!(detect() >= Simd::Neon, "detected {:?}", detect());
    let mut rng = Rng(0xa64_d07);
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
        for blocks in [1, 5, 48] {
            let row = random_row(&mut rng, ty, blocks);
            let n = 6;
            let xs: Vec<f32> = (0..n * blocks * 32).map(|_| rng.f32() * 3.0).collect();
            let acts = quantize_acts(&xs, n, blocks * 32);
            let alone: Vec<f32> = (0..n)
                .map(|t| dot::dot_q(Simd::Neon, ty, &row, &acts[t * blocks..(t + 1) * blocks]))
                .collect();
            for level in levels().into_iter().filter(|&l| l >= Simd::Neon) {
                let mut ys = vec![0.0f32; n];
                dot_q_tokens(level, ty, &row, &acts, blocks, &mut ys);
                for t in 0..n {
                    assert_eq!(
                        ys[t].to_bits(),
                        alone[t].to_bits(),
                        "{ty:?} {blocks} {level:?} token {t}: {} vs {}",
                        ys[t],
                        alone[t]
                    );
                }
            }
        }
    }
}

fn check_matmul(ty: GgmlType, rows: usize, cols: usize, n: usize, rng: &mut Rng) {
    let data: Vec<u8> = (0..rows)
        .flat_map(|_| random_row(rng, ty, cols / 32))
        .collect();
    let w = QMatrix::new(ty, rows, cols, &data).expect("sizes");
    let x: Vec<f32> = (0..n * cols).map(|_| rng.f32()).collect();
    let mut out = vec![0.0; n * rows];
    matmul(&w, &x, n, &mut out);
    for t in 0..n {
        for r in 0..rows {
            let exact = reference_dot(ty, w.row(r), &x[t * cols..(t + 1) * cols]);
            let got = out[t * rows + r] as f64;
            // Activations in [-1, 1] are quantized to steps of at most 1/127: each
            // product is off by at most |w|/254.
            let tol = if matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
                1e-3
            } else {
                abs_row_sum(ty, w.row(r), cols) / 254.0 + 1e-4
            };
            assert!(
                (got - exact).abs() <= tol,
                "{ty:?} t{t} r{r}: {got} vs {exact}"
            );
        }
    }
}

fn abs_row_sum(ty: GgmlType, row: &[u8], cols: usize) -> f64 {
    let mut w = vec![0.0; cols];
    dequantize_row(ty, row, &mut w);
    w.iter().map(|v| v.abs() as f64).sum()
}

#[test]
fn matmul_matches_reference_for_one_and_many_tokens() {
    let mut rng = Rng(42);
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
    ] {
        check_matmul(ty, 67, 96, 1, &mut rng);
        check_matmul(ty, 67, 96, 5, &mut rng);
        check_matmul(ty, 130, 64, 17, &mut rng);
        check_matmul(ty, 70, 128, 30, &mut rng);
    }
}

#[test]
fn matmul_on_real_model_tensors() {
    let file = crate::gguf::GgufFile::open(crate::paths::test_model_path()).expect("model");
    let mut rng = Rng(7);
    for name in ["blk.0.attn_q.weight", "token_embd.weight"] {
        let (info, data) = file.tensor_data(name).expect("tensor");
        let (cols, rows) = (info.dims[0] as usize, info.dims[1] as usize);
        let w = QMatrix::new(info.ty, rows, cols, data).expect("sizes");
        let n = 3;
        let x: Vec<f32> = (0..n * cols).map(|_| rng.f32()).collect();
        let mut out = vec![0.0; n * rows];
        matmul(&w, &x, n, &mut out);
        for t in 0..n {
            for r in (0..rows).step_by(97) {
                let exact = reference_dot(info.ty, w.row(r), &x[t * cols..(t + 1) * cols]);
                let got = out[t * rows + r] as f64;
                let tol = abs_row_sum(info.ty, w.row(r), cols) / 254.0 + 1e-4;
                assert!(
                    (got - exact).abs() <= tol,
                    "{name} t{t} r{r}: {got} vs {exact}"
                );
            }
        }
    }
}

#[test]
fn vector_kernels_match_scalar_reference() {
    let mut rng = Rng(99);
    for n in [1, 7, 8, 64, 67] {
        let a: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
        let b: Vec<f16> = (0..n).map(|_| f16::from_f32(rng.f32())).collect();
        let exact: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y.to_f64()).sum();
        assert!((dot_f32_f16(&a, &b) as f64 - exact).abs() < 1e-4);

        let mut y: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
        let y0 = y.clone();
        axpy_f16(&mut y, 0.75, &b);
        for i in 0..n {
            assert!((y[i] - (y0[i] + 0.75 * b[i].to_f32())).abs() < 1e-5);
        }

        let c: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
        let exact: f64 = a.iter().zip(&c).map(|(&x, &y)| x as f64 * y as f64).sum();
        assert!((dot_f32(&a, &c) as f64 - exact).abs() < 1e-4);
    }

    let x: Vec<f32> = (0..64).map(|_| rng.f32() * 3.0).collect();
    let w: Vec<f32> = (0..64).map(|_| rng.f32()).collect();
    let mut out = vec![0.0; 64];
    rms_norm(&x, &w, 1e-5, &mut out);
    let rms = (x.iter().map(|v| (v * v) as f64).sum::<f64>() / 64.0 + 1e-5).sqrt();
    for i in 0..64 {
        assert!((out[i] as f64 - x[i] as f64 / rms * w[i] as f64).abs() < 1e-5);
    }

    let mut s: Vec<f32> = (0..50).map(|_| rng.f32() * 10.0).collect();
    let orig = s.clone();
    softmax_inplace(&mut s);
    let z: f64 = orig.iter().map(|&v| (v as f64).exp()).sum();
    for i in 0..50 {
        assert!((s[i] as f64 - (orig[i] as f64).exp() / z).abs() < 1e-6);
    }

    let g: Vec<f32> = (0..33).map(|_| rng.f32() * 4.0).collect();
    let u: Vec<f32> = (0..33).map(|_| rng.f32()).collect();
    let mut o = vec![0.0; 33];
    silu_mul(&g, &u, &mut o);
    for i in 0..33 {
        let want = g[i] as f64 / (1.0 + (-g[i] as f64).exp()) * u[i] as f64;
        assert!((o[i] as f64 - want).abs() < 1e-5);
    }
}

#[test]
fn activation_rounding_is_ties_to_even() {
    // 127 · (v / max) lands exactly on .5 for these values.
    let mut x = [0.0f32; 32];
    x[0] = 127.0;
    x[1] = 2.5;
    x[2] = 3.5;
    x[3] = -2.5;
    x[4] = 0.4;
    let b = quantize_acts(&x, 1, 32)[0];
    assert_eq!(&b.qs[..5], &[127, 2, 4, -2, 0]);
    assert_eq!(b.sum, 127 + 2 + 4 - 2);
}

#[test]
fn qmatrix_checks_sizes() {
    assert!(QMatrix::new(GgmlType::Q4_1, 2, 64, &[0u8; 80]).is_ok());
    assert!(QMatrix::new(GgmlType::Q4_1, 2, 64, &[0u8; 79]).is_err());
    assert!(QMatrix::new(GgmlType::Q4_1, 2, 48, &[0u8; 60]).is_err());
}
