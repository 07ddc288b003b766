//! Host-side tests of the CUDA backend (they run on any machine), and the GPU
//! tests in `gpu` (ignored; `scripts/gpu-check` runs them on a GPU machine).

use std::collections::BTreeSet;

use super::*;

/// The `extern "C" __global__ void NAME(` entry points of kernels.cu.
fn declared_kernels() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = KERNELS_CU;
    while let Some(at) = rest.find("extern \"C\" __global__ void ") {
        rest = &rest[at + "extern \"C\" __global__ void ".len()..];
        if let Some(after) = rest.strip_prefix("__launch_bounds__(") {
            let close = after
                .find(") ")
                .expect("__launch_bounds__(N) then the name");
            rest = &after[close + 2..];
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        assert!(
            rest[name.len()..].starts_with('('),
            "malformed declaration of {name}"
        );
        out.insert(name);
    }
    out
}

fn define(name: &str) -> usize {
    let key = format!("#define {name} ");
    let line = KERNELS_CU
        .lines()
        .find(|l| l.starts_with(&key))
        .unwrap_or_else(|| panic!("kernels.cu does not define {name}"));
    line[key.len()..].trim().parse().expect("a number")
}

#[test]
fn kernels_cu_declares_exactly_the_kernels_launched() {
    let declared = declared_kernels();
    let launched: BTreeSet<String> = KERNEL_NAMES.iter().map(|s| s.to_string()).collect();
    assert_eq!(declared, launched);
    assert_eq!(KERNEL_NAMES.len(), Kernel::AttnPrefill as usize + 1);
    assert_eq!(KERNEL_NAMES[Kernel::QuantizeQ8 as usize], "quantize_q8");
    assert_eq!(KERNEL_NAMES[Kernel::MmBf16 as usize], "mm_bf16");
    assert_eq!(KERNEL_NAMES[Kernel::AttnDecode as usize], "attn_decode");
}

#[test]
fn kernels_cu_needs_no_headers() {
    // NVRTC is given no include paths.
    assert!(!KERNELS_CU.contains("#include"));
}

#[test]
fn geometry_constants_agree_with_kernels_cu() {
    assert_eq!(define("MM_TOKENS"), MM_TOKENS);
    assert_eq!(define("MAX_GROUP"), MAX_GROUP);
    assert_eq!(define("MAX_LANE_ELEMS"), MAX_LANE_ELEMS);
    assert_eq!(define("ATTN_DECODE_WARPS"), ATTN_DECODE_WARPS);
    assert_eq!(define("ATTN_KEY_CHUNK"), ATTN_KEY_CHUNK);
    assert_eq!(define("ATTN_PREFILL_TOKENS"), ATTN_PREFILL_TOKENS);
    assert_eq!(define("WARP"), 32);
    // The ggml type ids the embedding kernel switches on.
    for (name, ty) in [
        ("TY_F32", GgmlType::F32),
        ("TY_F16", GgmlType::F16),
        ("TY_Q4_0", GgmlType::Q4_0),
        ("TY_Q4_1", GgmlType::Q4_1),
        ("TY_Q8_0", GgmlType::Q8_0),
        ("TY_BF16", GgmlType::BF16),
    ] {
        assert_eq!(define(name), ty.id() as usize, "{name}");
    }
    // Q8Act: d, s, sum, then 32 quants.
    assert_eq!(Q8_ACT_BYTES, 4 + 4 + 4 + 32);
}

#[test]
fn launch_geometry() {
    assert_eq!(mm_grid(49_152, 1), (12_288, 1, 1));
    assert_eq!(mm_grid(5, 17), (2, 3, 1));
    assert_eq!(mm_grid(4, 8), (1, 1, 1));
    assert_eq!(linear_grid(0, 256), (1, 1, 1));
    assert_eq!(linear_grid(257, 256), (2, 1, 1));
    assert_eq!(prefill_smem_bytes(64), 8192);
    // Both attention kernels fit the 48 KiB every device gives without opting in.
    assert!(prefill_smem_bytes(MAX_LANE_ELEMS * 32) <= 48 * 1024);
    let decode_static = ATTN_DECODE_WARPS * MAX_GROUP * (2 + MAX_LANE_ELEMS * 32) * 4;
    assert!(decode_static <= 48 * 1024, "{decode_static}");
}

#[test]
fn args_sit_in_the_low_bytes_of_their_slots() {
    assert_eq!(Arg::I(-1).slot(), 0xffff_ffff);
    assert_eq!(Arg::I(7).slot(), 7);
    assert_eq!(Arg::F(1.5).slot(), 1.5f32.to_bits() as u64);
    assert_eq!(Arg::L(-2).slot(), (-2i64) as u64);
    assert_eq!(Arg::P(0xdead_beef_0000).slot(), 0xdead_beef_0000);
    let s = Arg::I(-3).slot().to_le_bytes();
    assert_eq!(i32::from_le_bytes([s[0], s[1], s[2], s[3]]), -3);
}

#[test]
fn index_arrays_are_aligned_and_round_trip() {
    let p = PackedBatch {
        tokens: vec![1, 2, 3],
        pos: vec![0, 1, 2],
        kv_dst: vec![10, 20, 30],
        table_off: vec![0, 0, 0],
        tables: vec![4],
        decode: vec![],
        tiles: vec![0, 3],
        logit_rows: vec![2],
    };
    let (bytes, offs) = index_bytes(&p);
    assert!(offs.iter().all(|o| o % 8 == 0), "{offs:?}");
    let i32_at = |o: usize, i: usize| {
        i32::from_le_bytes(
            bytes[o + 4 * i..o + 4 * i + 4]
                .try_into()
                .expect("a slice of the value's size"),
        )
    };
    assert_eq!(i32_at(offs[0], 2), 3);
    assert_eq!(i32_at(offs[1], 1), 1);
    let kv = i64::from_le_bytes(
        bytes[offs[2] + 16..offs[2] + 24]
            .try_into()
            .expect("a slice of the value's size"),
    );
    assert_eq!(kv, 30);
    assert_eq!(i32_at(offs[4], 0), 4);
    assert_eq!(offs[5], offs[6], "an empty array takes no room");
    assert_eq!((i32_at(offs[6], 0), i32_at(offs[6], 1)), (0, 3));
    assert_eq!(i32_at(offs[7], 0), 2);
    assert_eq!(bytes.len(), offs[4] + 4, "the block tables go last");
    // Longer block tables move nothing else: a captured step replays.
    let longer = PackedBatch {
        tables: vec![4, 5, 6, 7],
        ..p.clone()
    };
    let (_, offs_longer) = index_bytes(&longer);
    assert_eq!(offs_longer, offs);
}

fn tiny_config() -> ModelConfig {
    ModelConfig {
        arch: Arch::Llama,
        name: "tiny".into(),
        n_layers: 2,
        d_model: 64,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 16,
        ffn_dim: 128,
        vocab_size: 100,
        context_length: 256,
        rope_base: 10_000.0,
        rope_dim: 16,
        rms_eps: 1e-5,
    }
}

#[test]
fn unsupported_shapes_are_refused_at_load() {
    let mut c = tiny_config();
    assert!(check_supported(&c).is_ok());
    c.head_dim = 512;
    assert!(
        check_supported(&c)
            .unwrap_err()
            .to_string()
            .contains("head_dim 512")
    );
    let mut c = tiny_config();
    c.n_heads = 32;
    c.n_kv_heads = 2;
    assert!(
        check_supported(&c)
            .unwrap_err()
            .to_string()
            .contains("16 query heads")
    );
}

#[test]
fn nvrtc_is_looked_for_under_the_cuda_13_name_first() {
    let names: Vec<String> = nvrtc::nvrtc_candidates()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let first_plain = names
        .iter()
        .position(|n| n == "libnvrtc.so.13")
        .expect("libnvrtc.so.13 is tried");
    assert!(
        names
            .iter()
            .position(|n| n == "libnvrtc.so.12")
            .expect("libnvrtc.so.12 among the candidates")
            > first_plain,
        "{names:?}"
    );
    assert!(
        names
            .iter()
            .any(|n| n == "/usr/local/cuda/lib64/libnvrtc.so.13")
    );
    assert_eq!(
        nvrtc::compile_options(90)[0],
        "--gpu-architecture=sm_90",
        "a real architecture, for a CUBIN"
    );
    assert!(
        !nvrtc::compile_options(90)
            .iter()
            .any(|o| o.contains("fast-math"))
    );
}

/// CUDA's builtins as plain C++ declarations, so a host compiler can check
/// kernels.cu's syntax and types (not its semantics) where there is no nvcc.
const HOST_PRELUDE: &str = r#"#define __global__
#define __launch_bounds__(...)
#define __device__
#define __forceinline__ inline
#define __shared__
#define __restrict__ __restrict
struct dim3_ { unsigned x, y, z; };
extern dim3_ threadIdx, blockIdx, blockDim;
float __int_as_float(int);
int __float2int_rn(float);
float __fmul_rn(float, float);
float __fdiv_rn(float, float);
float __fadd_rn(float, float);
float __fsub_rn(float, float);
float __shfl_xor_sync(unsigned, float, int);
int __shfl_xor_sync(unsigned, int, int);
double __shfl_xor_sync(unsigned, double, int);
void __syncthreads();
float expf(float);
float fabsf(float);
float fmaxf(float, float);
double sqrt(double);
double log(double);
void sincos(double, double*, double*);
"#;

/// kernels.cu parses and type-checks as C++ with the builtins stubbed, when
/// g++ is installed: NVRTC errors caught before a GPU machine is needed.
#[test]
fn kernels_cu_type_checks_as_host_cpp() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let Ok(mut child) = Command::new("g++")
        .args([
            "-std=c++17",
            "-fsyntax-only",
            "-Wall",
            "-Wno-unknown-pragmas",
            "-x",
            "c++",
            "-",
        ])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        eprintln!("skipped: no g++");
        return;
    };
    let source = format!(
        "{HOST_PRELUDE}\n{}",
        KERNELS_CU.replace("asm(", "__asm__ volatile(")
    );
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(source.as_bytes())
        .expect("write to g++");
    let out = child.wait_with_output().expect("g++ runs");
    let errors = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && errors.is_empty(), "{errors}");
}

/// On a machine without the driver (or without GPU `ordinal`), opening the
/// device is an error that names what is missing, not a panic.
#[test]
fn a_missing_driver_or_device_is_a_clear_error() {
    // SAFETY: only tries to open the library.
    let driver = unsafe { sys::is_culib_present() };
    let result = std::panic::catch_unwind(|| probe(0));
    let result = result.expect("probing the device must not panic");
    if !driver {
        let e = result.expect_err("no driver here");
        let msg = e.to_string();
        assert!(matches!(e, CudaError::LibraryNotFound { .. }), "{msg}");
        assert!(msg.contains("libcuda.so.1"), "{msg}");
        assert!(msg.contains("--device cpu"), "{msg}");
    }
    // An ordinal no machine has is refused by name wherever the driver is.
    let e = std::panic::catch_unwind(|| probe(999))
        .expect("no panic")
        .expect_err("no machine has 1000 GPUs");
    let msg = e.to_string();
    assert!(
        msg.contains("libcuda.so.1") || msg.contains("no CUDA device 999"),
        "{msg}"
    );
}

/// Every kernel against its CPU reference on random inputs, twice: on the
/// host emulation of kernels.cu (`emulated::`, runs wherever g++ is), and on
/// the GPU (`on_gpu::`, ignored by default; `scripts/gpu-check` runs them with
/// `--ignored` and `TANDEM_REQUIRE_GPU=1`, which turns "no usable GPU" into a
/// failure).
mod kernels {
    use half::{bf16, f16};

    use super::super::emulate::EmuDevice;
    use super::super::*;
    use crate::cpu;
    use crate::kv_cache::KvPool;
    use crate::model::{paged_attention, rope_in_place};

    /// Memory and launches on the GPU or in the emulation.
    pub(super) trait TestDev {
        fn launcher(&self) -> &dyn Launch;
        /// A copy of `bytes` in the device's memory (8-byte aligned).
        fn put_bytes(&mut self, bytes: &[u8]) -> u64;
        /// `n` bytes from `ptr`, after every launch so far has finished.
        fn get_bytes(&mut self, ptr: u64, n: usize) -> Vec<u8>;
        /// Whether this is the (slow) host emulation: tests then try fewer sizes.
        fn emulated(&self) -> bool;
    }

    /// A device under test and the buffers a test put there.
    struct DevUnderTest {
        // Freed before the device goes.
        bufs: Vec<DeviceBuf>,
        dev: Rc<dyn Device>,
        emulated: bool,
    }

    impl TestDev for DevUnderTest {
        fn launcher(&self) -> &dyn Launch {
            &*self.dev
        }

        fn put_bytes(&mut self, bytes: &[u8]) -> u64 {
            let b = DeviceBuf::upload(&self.dev, bytes, "test data").expect("upload");
            let ptr = b.ptr;
            self.bufs.push(b);
            ptr
        }

        fn get_bytes(&mut self, ptr: u64, n: usize) -> Vec<u8> {
            let mut out = vec![0u8; n];
            self.dev.dtoh(&mut out, ptr).expect("download");
            out
        }

        fn emulated(&self) -> bool {
            self.emulated
        }
    }

    pub(super) fn emu_dev() -> Option<Box<dyn TestDev>> {
        match EmuDevice::new() {
            Ok(emu) => Some(Box::new(DevUnderTest {
                bufs: Vec::new(),
                dev: Rc::new(emu),
                emulated: true,
            })),
            Err(e) => {
                eprintln!("skipped: no host emulation of the kernels ({e})");
                None
            }
        }
    }

    /// The GPU, or `None` (a skip, said on stderr) unless TANDEM_REQUIRE_GPU is set.
    pub(super) fn gpu() -> Option<Gpu> {
        match Gpu::open(0) {
            Ok(g) => Some(g),
            Err(e) if std::env::var_os("TANDEM_REQUIRE_GPU").is_some() => {
                panic!("TANDEM_REQUIRE_GPU is set but the GPU did not open: {e}")
            }
            Err(e) => {
                eprintln!("skipped: no usable GPU ({e})");
                None
            }
        }
    }

    pub(super) fn gpu_dev() -> Option<Box<dyn TestDev>> {
        let gpu = gpu()?;
        gpu.bind().expect("bind the context");
        Some(Box::new(DevUnderTest {
            bufs: Vec::new(),
            dev: Rc::new(gpu),
            emulated: false,
        }))
    }

    fn put<T: bytemuck::Pod>(d: &mut dyn TestDev, x: &[T]) -> u64 {
        d.put_bytes(bytemuck::cast_slice(x))
    }

    fn zeros(d: &mut dyn TestDev, bytes: usize) -> u64 {
        d.put_bytes(&vec![0u8; bytes])
    }

    fn get_f32(d: &mut dyn TestDev, ptr: u64, n: usize) -> Vec<f32> {
        d.get_bytes(ptr, 4 * n)
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    /// The packed batch's index arrays on the device.
    fn put_index(d: &mut dyn TestDev, p: &PackedBatch) -> IndexPtrs {
        let (bytes, offs) = index_bytes(p);
        IndexPtrs::at(d.put_bytes(&bytes), offs)
    }

    /// xorshift64*: reproducible inputs without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        /// Uniform in [lo, hi).
        fn f(&mut self, lo: f32, hi: f32) -> f32 {
            lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32)
        }

        fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
            (0..n).map(|_| self.f(lo, hi)).collect()
        }

        fn byte(&mut self) -> u8 {
            (self.next() >> 56) as u8
        }
    }

    const ALL_TYPES: [GgmlType; 6] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::F32,
    ];

    /// `rows` random rows of `cols` elements of `ty`, with realistic scales.
    fn random_matrix(rng: &mut Rng, ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let f16b = |v: f32| f16::from_f32(v).to_le_bytes();
        for _ in 0..rows * cols / ty.block_elems() {
            match ty {
                GgmlType::F32 => out.extend(rng.f(-1.0, 1.0).to_le_bytes()),
                GgmlType::F16 => out.extend(f16b(rng.f(-1.0, 1.0))),
                GgmlType::BF16 => out.extend(bf16::from_f32(rng.f(-1.0, 1.0)).to_le_bytes()),
                GgmlType::Q4_0 => {
                    out.extend(f16b(rng.f(0.005, 0.05)));
                    out.extend((0..16).map(|_| rng.byte()));
                }
                GgmlType::Q4_1 => {
                    out.extend(f16b(rng.f(0.005, 0.05)));
                    out.extend(f16b(rng.f(-0.3, 0.0)));
                    out.extend((0..16).map(|_| rng.byte()));
                }
                GgmlType::Q8_0 => {
                    out.extend(f16b(rng.f(0.001, 0.01)));
                    out.extend((0..32).map(|_| rng.byte()));
                }
            }
        }
        out
    }

    /// Asserts |a - b| ≤ rel · max|b| + abs everywhere, naming the worst element.
    pub(super) fn assert_close(what: &str, got: &[f32], want: &[f32], rel: f32, abs: f32) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let (mut worst, mut at) = (0f32, 0);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let d = (g - w).abs();
            if d.is_nan() || d > worst {
                worst = if d.is_nan() { f32::INFINITY } else { d };
                at = i;
            }
        }
        assert!(
            worst <= rel * scale + abs,
            "{what}: element {at} is {} on the device, {} on the CPU (scale {scale})",
            got[at],
            want[at]
        );
    }

    fn quantize_q8_matches_the_cpu_bit_for_bit(d: &mut dyn TestDev) {
        let mut rng = Rng(1);
        let n_blocks = 300;
        let mut x = rng.vec(n_blocks * 32, -3.0, 3.0);
        x[..32].fill(0.0); // an all-zero block: scale 0
        x[32..64].copy_from_slice(&[0.5; 32]); // every value on a rounding tie
        let xb = put(d, &x);
        let q8 = zeros(d, n_blocks * Q8_ACT_BYTES);
        d.launcher()
            .launch(
                Kernel::QuantizeQ8,
                linear_grid(n_blocks * 32, ROW_THREADS),
                ROW_THREADS,
                0,
                &[Arg::P(xb), Arg::P(q8), Arg::I(n_blocks as i32)],
            )
            .expect("quantize_q8 launches");
        let raw = d.get_bytes(q8, n_blocks * Q8_ACT_BYTES);
        let want = cpu::quantize_acts(&x, 1, x.len());
        for (i, (b, w)) in raw.chunks_exact(Q8_ACT_BYTES).zip(&want).enumerate() {
            let f = |o: usize| {
                f32::from_le_bytes(b[o..o + 4].try_into().expect("a slice of the value's size"))
            };
            let sum = i32::from_le_bytes(b[8..12].try_into().expect("a slice of the value's size"));
            let qs: Vec<i8> = b[12..44].iter().map(|&v| v as i8).collect();
            assert_eq!((f(0), f(4), sum), (w.d, w.s, w.sum), "block {i}");
            assert_eq!(qs, w.qs.to_vec(), "block {i}");
        }
    }

    fn matrix_products_match_the_cpu_for_every_type(d: &mut dyn TestDev) {
        let mut rng = Rng(2);
        let (rows, cols) = (37, 320);
        for ty in ALL_TYPES {
            let data = random_matrix(&mut rng, ty, rows, cols);
            let host = QMatrix::new(ty, rows, cols, &data).expect("a valid matrix");
            let w = WeightRef {
                ptr: d.put_bytes(&data),
                ty,
                rows,
                cols,
            };
            let sizes: &[usize] = if d.emulated() {
                &[1, 9, 20]
            } else {
                &[1, 3, 8, 9, 20, 64]
            };
            for &n in sizes {
                let x = rng.vec(n * cols, -2.0, 2.0);
                let mut want = vec![0f32; n * rows];
                cpu::matmul(&host, &x, n, &mut want);
                let xb = put(d, &x);
                let q8 = zeros(d, n * cols / 32 * Q8_ACT_BYTES);
                let out = zeros(d, n * rows * 4);
                matmul(d.launcher(), q8, w, xb, n, out, &mut None).expect("matmul launches");
                let got = get_f32(d, out, n * rows);
                assert_close(&format!("{ty:?} n={n}"), &got, &want, 1e-4, 1e-5);
            }
        }
    }

    fn embedding_rows_dequantize_like_the_cpu(d: &mut dyn TestDev) {
        let mut rng = Rng(3);
        let (vocab, dim) = (50, 96);
        for ty in ALL_TYPES {
            let data = random_matrix(&mut rng, ty, vocab, dim);
            let table = d.put_bytes(&data);
            let tokens: Vec<u32> = vec![0, 7, 49, 1000, 3]; // 1000 clamps to 49
            let tb = put(d, &tokens);
            let out = zeros(d, tokens.len() * dim * 4);
            let rb = ty.row_bytes(dim).expect("row size");
            d.launcher()
                .launch(
                    Kernel::Embed,
                    (tokens.len() as u32, 1, 1),
                    ROW_THREADS,
                    0,
                    &[
                        Arg::P(table),
                        Arg::I(ty.id() as i32),
                        Arg::L(rb as i64),
                        Arg::P(tb),
                        Arg::P(out),
                        Arg::I(dim as i32),
                        Arg::I(vocab as i32),
                    ],
                )
                .expect("embed launches");
            let got = get_f32(d, out, tokens.len() * dim);
            let mut want = vec![0f32; tokens.len() * dim];
            for (row, &t) in want.chunks_mut(dim).zip(&tokens) {
                let t = (t as usize).min(vocab - 1);
                cpu::dequantize_row(ty, &data[t * rb..(t + 1) * rb], row);
            }
            assert_eq!(got, want, "{ty:?}");
        }
    }

    fn row_and_elementwise_kernels_match_the_cpu(d: &mut dyn TestDev) {
        let mut rng = Rng(4);
        let (rows, dim) = (5, 576);
        let total = rows * dim;
        let x = rng.vec(total, -4.0, 4.0);
        let w = rng.vec(dim, 0.5, 1.5);
        let (xb, wb) = (put(d, &x), put(d, &w));
        let out = zeros(d, total * 4);
        d.launcher()
            .launch(
                Kernel::RmsNorm,
                (rows as u32, 1, 1),
                ROW_THREADS,
                0,
                &[
                    Arg::P(xb),
                    Arg::P(wb),
                    Arg::P(out),
                    Arg::I(dim as i32),
                    Arg::F(1e-5),
                ],
            )
            .expect("rms_norm launches");
        let mut want = vec![0f32; total];
        for (o, xr) in want.chunks_mut(dim).zip(x.chunks(dim)) {
            cpu::rms_norm(xr, &w, 1e-5, o);
        }
        assert_close("rms_norm", &get_f32(d, out, total), &want, 1e-6, 0.0);

        let gate = rng.vec(total, -8.0, 8.0);
        let up = rng.vec(total, -2.0, 2.0);
        let (gb, ub) = (put(d, &gate), put(d, &up));
        d.launcher()
            .launch(
                Kernel::SiluMul,
                linear_grid(total, ROW_THREADS),
                ROW_THREADS,
                0,
                &[Arg::P(gb), Arg::P(ub), Arg::P(out), Arg::L(total as i64)],
            )
            .expect("silu_mul launches");
        let mut want = vec![0f32; total];
        cpu::silu_mul(&gate, &up, &mut want);
        assert_close("silu_mul", &get_f32(d, out, total), &want, 1e-6, 1e-7);

        let bias = rng.vec(dim, -1.0, 1.0);
        let bb = put(d, &bias);
        let xb2 = put(d, &x);
        let l = d.launcher();
        l.launch(
            Kernel::AddBias,
            linear_grid(total, ROW_THREADS),
            ROW_THREADS,
            0,
            &[
                Arg::P(xb2),
                Arg::P(bb),
                Arg::L(total as i64),
                Arg::I(dim as i32),
            ],
        )
        .expect("add_bias launches");
        l.launch(
            Kernel::AddInplace,
            linear_grid(total, ROW_THREADS),
            ROW_THREADS,
            0,
            &[Arg::P(xb2), Arg::P(gb), Arg::L(total as i64)],
        )
        .expect("add_inplace launches");
        let want: Vec<f32> = x
            .iter()
            .enumerate()
            .map(|(i, v)| v + bias[i % dim] + gate[i])
            .collect();
        assert_eq!(get_f32(d, xb2, total), want, "add_bias then add_inplace");

        let rows_wanted = [4i32, 0, 2];
        let rw = put(d, &rows_wanted);
        d.launcher()
            .launch(
                Kernel::GatherRows,
                (3, 1, 1),
                ROW_THREADS,
                0,
                &[Arg::P(xb), Arg::P(rw), Arg::P(out), Arg::I(dim as i32)],
            )
            .expect("gather_rows launches");
        let want: Vec<f32> = rows_wanted
            .iter()
            .flat_map(|&r| x[r as usize * dim..(r as usize + 1) * dim].to_vec())
            .collect();
        assert_eq!(get_f32(d, out, 3 * dim), want, "gather_rows");
    }

    /// Greedy picks on the device: the host's `greedy_pick` over rows of a
    /// real vocabulary's width, with ties (the lowest index wins), a NaN that
    /// must not win, and a row of nothing but -inf.
    fn greedy_picks_match_the_host(d: &mut dyn TestDev) {
        let vocab = 49_152;
        let mut rng = Rng(7);
        let mut rows: Vec<Vec<f32>> = (0..4).map(|_| rng.vec(vocab, -20.0, 20.0)).collect();
        rows[1][40_000] = 25.0;
        rows[1][123] = 25.0;
        rows[2][7] = f32::NAN;
        rows[2][9_999] = 30.0;
        rows[3].fill(f32::NEG_INFINITY);
        let flat: Vec<f32> = rows.concat();
        let logits = put(d, &flat);
        let ids = zeros(d, 4 * rows.len());
        let lps = zeros(d, 4 * rows.len());
        d.launcher()
            .launch(
                Kernel::ArgmaxLogprob,
                (rows.len() as u32, 1, 1),
                ROW_THREADS,
                0,
                &[
                    Arg::P(logits),
                    Arg::I(vocab as i32),
                    Arg::P(ids),
                    Arg::P(lps),
                ],
            )
            .expect("argmax_logprob launches");
        let got_ids: Vec<u32> = bytemuck::cast_slice(&d.get_bytes(ids, 4 * rows.len())).to_vec();
        let got_lps = get_f32(d, lps, rows.len());
        for (r, row) in rows.iter().enumerate() {
            let (id, lp) = crate::sampling::greedy_pick(row);
            assert_eq!(got_ids[r], id, "row {r}: argmax");
            if lp.is_finite() {
                assert!(
                    (got_lps[r] - lp).abs() <= 1e-4 * lp.abs().max(1.0),
                    "row {r}: log-probability {} against the host's {lp}",
                    got_lps[r]
                );
            } else {
                assert!(
                    got_lps[r].is_nan() && lp.is_nan(),
                    "row {r}: {}",
                    got_lps[r]
                );
            }
        }
        assert_eq!(got_ids[1], 123, "ties go to the lowest index");
        assert_eq!(got_ids[3], 0, "a row of -inf picks 0");
    }

    /// A small config for the attention and RoPE tests (SmolLM2-135M's heads).
    fn attn_config(arch: Arch) -> ModelConfig {
        ModelConfig {
            arch,
            name: "attn".into(),
            n_layers: 2,
            d_model: 576,
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
            ffn_dim: 1536,
            vocab_size: 100,
            context_length: 2048,
            rope_base: 100_000.0,
            rope_dim: 64,
            rms_eps: 1e-5,
        }
    }

    fn inv_freq(c: &ModelConfig) -> Vec<f64> {
        (0..c.rope_dim / 2)
            .map(|i| (c.rope_base as f64).powf(-2.0 * i as f64 / c.rope_dim as f64))
            .collect()
    }

    fn rope_matches_the_cpu_in_both_styles(d: &mut dyn TestDev) {
        let mut rng = Rng(5);
        for arch in [Arch::Llama, Arch::Qwen2] {
            let c = attn_config(arch);
            let freqs = inv_freq(&c);
            let positions: Vec<i32> = vec![0, 1, 17, 255, 1000, 2047];
            let n = positions.len();
            let width = c.n_heads * c.head_dim;
            let x = rng.vec(n * width, -2.0, 2.0);
            let xb = put(d, &x);
            let fb = put(d, &freqs);
            let p = PackedBatch {
                pos: positions.clone(),
                ..PackedBatch::default()
            };
            let ix = put_index(d, &p);
            rope(d.launcher(), &c, fb, xb, c.n_heads, &ix, n).expect("rope launches");
            let mut want = x.clone();
            for (row, &pos) in want.chunks_mut(width).zip(&positions) {
                rope_in_place(row, pos as usize, c.head_dim, &freqs, arch);
            }
            let got = get_f32(d, xb, n * width);
            assert_close(&format!("rope {arch:?}"), &got, &want, 1e-6, 1e-6);
        }
    }

    /// The whole pool's bytes, block after block, as the device holds them.
    fn pool_bytes(pool: &KvPool, num_blocks: usize) -> Vec<u8> {
        let layers = pool.layout().n_layers;
        (0..num_blocks as u32)
            .flat_map(|b| (0..layers).map(move |l| (b, l)))
            .flat_map(|(b, l)| pool.piece_bytes(b, l).to_vec())
            .collect()
    }

    fn kv_write_and_both_attention_variants_match_the_cpu(d: &mut dyn TestDev) {
        let mut rng = Rng(6);
        for (group, arch) in [(3, Arch::Llama), (1, Arch::Qwen2), (8, Arch::Llama)] {
            let mut c = attn_config(arch);
            c.n_kv_heads = 2;
            c.n_heads = 2 * group;
            let layout = c.kv_layout(16);
            let num_blocks = 16;
            let (kv_dim, q_dim) = (c.n_kv_heads * c.head_dim, c.n_heads * c.head_dim);
            // Earlier K/V already in the pool (a cached prefix), random f16.
            let mut pool = KvPool::new(layout, num_blocks);
            for b in 0..num_blocks as u32 {
                for l in 0..layout.n_layers {
                    for v in pool.piece_bytes_mut(b, l).chunks_exact_mut(2) {
                        v.copy_from_slice(&f16::from_f32(rng.f(-1.0, 1.0)).to_le_bytes());
                    }
                }
            }
            // A prefill chunk after a cached prefix, a decode step deep in a
            // sequence, a fresh short prompt and a first decode step.
            let long: Vec<u32> = (0..21).collect();
            let short: Vec<u32> = (0..3).collect();
            let batch = [
                BatchSeq {
                    tokens: &long,
                    start_pos: 5,
                    blocks: &[3, 1],
                    want_logits: true,
                },
                BatchSeq {
                    tokens: &[9],
                    start_pos: 40,
                    blocks: &[0, 7, 2],
                    want_logits: true,
                },
                BatchSeq {
                    tokens: &short,
                    start_pos: 0,
                    blocks: &[12],
                    want_logits: false,
                },
                BatchSeq {
                    tokens: &[4],
                    start_pos: 0,
                    blocks: &[13],
                    want_logits: true,
                },
            ];
            let p = pack(&batch, layout, num_blocks).expect("the batch packs");
            let n = p.n_tokens();
            let q = rng.vec(n * q_dim, -2.0, 2.0);
            let k = rng.vec(n * kv_dim, -2.0, 2.0);
            let v = rng.vec(n * kv_dim, -2.0, 2.0);
            let layer = 1;

            let all = pool_bytes(&pool, num_blocks);
            let pool_dev = d.put_bytes(&all);
            let (qb, kb, vb) = (put(d, &q), put(d, &k), put(d, &v));
            let out = zeros(d, n * q_dim * 4);
            let ix = put_index(d, &p);
            kv_write(d.launcher(), &layout, kb, vb, pool_dev, &ix, n, layer)
                .expect("kv_write launches");
            attention(d.launcher(), &c, &layout, qb, pool_dev, out, &ix, &p, layer)
                .expect("attention launches");
            let got = get_f32(d, out, n * q_dim);
            let pool_after = d.get_bytes(pool_dev, all.len());

            let mut token_pos = Vec::new();
            for (i, s) in batch.iter().enumerate() {
                token_pos.extend((0..s.tokens.len()).map(|j| (i, s.start_pos + j)));
            }
            for (t, &(seq, pos)) in token_pos.iter().enumerate() {
                let block = batch[seq].blocks[pos / layout.block_size];
                pool.write_slot(
                    block,
                    layer,
                    pos % layout.block_size,
                    &k[t * kv_dim..(t + 1) * kv_dim],
                    &v[t * kv_dim..(t + 1) * kv_dim],
                );
            }
            assert!(
                pool_after == pool_bytes(&pool, num_blocks),
                "group {group}: the pool after kv_write differs from the CPU's"
            );
            let mut want = vec![0f32; n * q_dim];
            paged_attention(&c, &pool, layer, &batch, &token_pos, &q, &mut want);
            assert_close(
                &format!("attention, group {group}"),
                &got,
                &want,
                1e-5,
                1e-6,
            );
        }
    }

    macro_rules! on_both {
        ($($check:ident),* $(,)?) => {
            mod emulated {
                $(
                    #[test]
                    fn $check() {
                        if let Some(mut d) = super::emu_dev() {
                            super::$check(d.as_mut());
                        }
                    }
                )*
            }
            mod on_gpu {
                $(
                    #[test]
                    #[ignore = "needs a GPU"]
                    fn $check() {
                        if let Some(mut d) = super::gpu_dev() {
                            super::$check(d.as_mut());
                        }
                    }
                )*
            }
        };
    }

    on_both!(
        quantize_q8_matches_the_cpu_bit_for_bit,
        matrix_products_match_the_cpu_for_every_type,
        embedding_rows_dequantize_like_the_cpu,
        row_and_elementwise_kernels_match_the_cpu,
        greedy_picks_match_the_host,
        rope_matches_the_cpu_in_both_styles,
        kv_write_and_both_attention_variants_match_the_cpu,
    );
}

/// The whole model and the whole engine on the GPU against the CPU backend
/// (ignored by default; `scripts/gpu-check model` runs them).
mod model {
    use half::f16;

    use super::super::*;
    use super::kernels::{assert_close, gpu};
    use crate::backend::CpuBackend;

    /// The chat prompts of the llama.cpp reference, as token ids.
    fn reference_prompts() -> Vec<Vec<u32>> {
        let v: serde_json::Value =
            serde_json::from_str(crate::paths::reference_json()).expect("reference JSON");
        v["chat"]
            .as_array()
            .expect("chat cases")
            .iter()
            .map(|c| {
                c["prompt_ids"]
                    .as_array()
                    .expect("ids")
                    .iter()
                    .map(|x| x.as_u64().expect("id") as u32)
                    .collect()
            })
            .collect()
    }

    fn argmax(x: &[f32]) -> (usize, f32) {
        let mut best = (0, f32::NEG_INFINITY);
        let mut second = f32::NEG_INFINITY;
        for (i, &v) in x.iter().enumerate() {
            if v > best.1 {
                second = best.1;
                best = (i, v);
            } else if v > second {
                second = v;
            }
        }
        (best.0, best.1 - second)
    }

    /// The whole forward pass on the default model: logits of a batched
    /// prefill and of decode steps, and the KV pieces, against the CPU backend.
    #[test]
    #[ignore = "needs a GPU"]
    fn whole_model_matches_the_cpu_backend() {
        if gpu().is_none() {
            return;
        }
        let path = crate::paths::test_model_path();
        let load = || {
            Model::load(crate::gguf::GgufFile::open(&path).expect("the model opens"))
                .expect("the model loads")
        };
        let (bs, nb) = (16, 64);
        let mut cpu_b = CpuBackend::new(load(), bs, nb);
        let mut gpu_b = CudaBackend::new(load(), bs, nb, 0).expect("the CUDA backend loads");
        let vocab = cpu_b.config().vocab_size;
        assert_eq!(gpu_b.kv_layout(), cpu_b.kv_layout());
        let prompts = reference_prompts();
        let (a, b) = (&prompts[0], &prompts[1 % prompts.len()]);
        let steps = 24;
        let blocks_a: Vec<u32> = (0..(a.len() + steps).div_ceil(bs) as u32).collect();
        let first_b = blocks_a.len() as u32;
        let blocks_b: Vec<u32> =
            (first_b..first_b + (b.len() + steps).div_ceil(bs) as u32).collect();
        assert!(blocks_b.last().is_some_and(|&x| (x as usize) < nb));

        let compare = |what: &str, c: &[f32], g: &[f32]| {
            assert_close(what, g, c, 2e-3, 1e-3);
            for (row, (cr, gr)) in c.chunks(vocab).zip(g.chunks(vocab)).enumerate() {
                let (ci, gap) = argmax(cr);
                let (gi, _) = argmax(gr);
                assert!(
                    ci == gi || gap < 1e-2,
                    "{what}: row {row} argmax {gi} on the GPU, {ci} on the CPU (gap {gap})"
                );
            }
        };
        let piece_bytes = cpu_b.kv_layout().piece_bytes();
        let mut layers_seen = Vec::new();
        let batch = [
            BatchSeq {
                tokens: a,
                start_pos: 0,
                blocks: &blocks_a,
                want_logits: true,
            },
            BatchSeq {
                tokens: b,
                start_pos: 0,
                blocks: &blocks_b,
                want_logits: true,
            },
        ];
        let c = cpu_b.forward(&batch, None).expect("forward");
        let mut mid_step = Vec::new();
        let gl = gpu_b
            .forward(
                &batch,
                Some(&mut |l, kv| {
                    layers_seen.push(l);
                    // Read on the copy stream while later layers compute.
                    let mut pieces = Vec::new();
                    kv.read_kv_pieces(&blocks_a[..2], l, &mut pieces)
                        .expect("read pieces mid-step");
                    assert_eq!(pieces.len(), 2 * piece_bytes);
                    mid_step.push(pieces);
                }),
            )
            .expect("forward");
        assert_eq!(
            layers_seen,
            (0..cpu_b.config().n_layers).collect::<Vec<_>>()
        );
        compare("prefill", &c, &gl);
        // What the copy stream read mid-step is this step's K/V, complete:
        // the same bytes as a read after the step.
        for (l, pieces) in mid_step.iter().enumerate() {
            let mut after = Vec::new();
            for &b in &blocks_a[..2] {
                gpu_b
                    .read_kv_pieces(&[b], l, &mut after)
                    .expect("KV piece copy");
            }
            assert!(*pieces == after, "layer {l}: pieces read mid-step differ");
        }

        let (mut ta, mut tb) = (argmax(&c[..vocab]).0 as u32, argmax(&c[vocab..]).0 as u32);
        for step in 0..steps {
            let (ia, ib) = ([ta], [tb]);
            let batch = [
                BatchSeq {
                    tokens: &ia,
                    start_pos: a.len() + step,
                    blocks: &blocks_a,
                    want_logits: true,
                },
                BatchSeq {
                    tokens: &ib,
                    start_pos: b.len() + step,
                    blocks: &blocks_b,
                    want_logits: true,
                },
            ];
            let c = cpu_b.forward(&batch, None).expect("forward");
            if step % 4 == 3 {
                // Greedy picks on the device: the CPU's argmax and log-probability.
                let picks = gpu_b.forward_greedy(&batch, None).expect("forward");
                assert_eq!(picks.len(), 2, "decode step {step}: picks");
                for (row, (cr, &(id, lp))) in c.chunks(vocab).zip(&picks).enumerate() {
                    let (want, want_lp) = crate::sampling::greedy_pick(cr);
                    let (_, gap) = argmax(cr);
                    assert!(
                        id == want || gap < 1e-2,
                        "decode step {step} row {row}: picked {id} on the GPU, {want} on the CPU"
                    );
                    assert!(
                        (lp - want_lp).abs() < 1e-2,
                        "decode step {step} row {row}: log-probability {lp}, the CPU's {want_lp}"
                    );
                }
            } else {
                let gl = gpu_b.forward(&batch, None).expect("forward");
                compare(&format!("decode step {step}"), &c, &gl);
            }
            ta = argmax(&c[..vocab]).0 as u32;
            tb = argmax(&c[vocab..]).0 as u32;
        }
        // Every decode step of two sequences after the first replayed its graph.
        if gpu_b.graphs.enabled {
            assert!(gpu_b.graphs.captured >= 1, "no decode step was captured");
            assert_eq!(gpu_b.graphs.replayed, steps as u64);
        }

        // KV pieces: the same layout and nearly the same values (f16 of
        // nearly equal f32s), for the first and last layers.
        let last = cpu_b.config().n_layers - 1;
        for (blk, layer) in [(blocks_a[0], 0), (blocks_b[0], last), (blocks_a[1], last)] {
            let (mut cp, mut gp) = (Vec::new(), Vec::new());
            cpu_b
                .read_kv_pieces(&[blk], layer, &mut cp)
                .expect("KV piece copy");
            gpu_b
                .read_kv_pieces(&[blk], layer, &mut gp)
                .expect("KV piece copy");
            let f = |v: &[u8]| -> Vec<f32> {
                v.chunks_exact(2)
                    .map(|h| f16::from_le_bytes([h[0], h[1]]).to_f32())
                    .collect()
            };
            assert_close(
                &format!("KV block {blk} layer {layer}"),
                &f(&gp),
                &f(&cp),
                1e-2,
                1e-2,
            );
        }
        // Pieces written in, scattered in one copy, come back out unchanged.
        let mut cp = Vec::new();
        for &b in &blocks_a[..2] {
            cpu_b
                .read_kv_pieces(&[b], 3, &mut cp)
                .expect("KV piece copy");
        }
        let spare = [(nb - 1) as u32, (nb - 3) as u32];
        gpu_b
            .write_kv_pieces(&spare, 3, &cp)
            .expect("KV piece copy");
        let mut back = Vec::new();
        for b in spare {
            gpu_b
                .read_kv_pieces(&[b], 3, &mut back)
                .expect("KV piece copy");
        }
        assert!(
            back == cp,
            "write_kv_pieces then read_kv_pieces changed the bytes"
        );
    }

    /// Greedy generation through the whole engine (scheduler, batching,
    /// sampling on the host) gives the CPU's tokens on the reference prompts.
    #[test]
    #[ignore = "needs a GPU"]
    fn engine_greedy_output_on_cuda_equals_cpu() {
        use crate::device::Device;
        use crate::engine::{Engine, EngineConfig, Request};
        if gpu().is_none() {
            return;
        }
        let run = |device: Device| -> Vec<Vec<u32>> {
            let engine = Engine::load(
                crate::paths::test_model_path(),
                EngineConfig {
                    kv_cache_tokens: 4096,
                    device,
                    ..EngineConfig::default()
                },
            )
            .unwrap_or_else(|e| panic!("loading on {device}: {e}"));
            // Submitted together, so they decode as one batch.
            let handles: Vec<_> = reference_prompts()
                .into_iter()
                .map(|p| engine.submit(Request::new(p, 48)).expect("submit"))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.wait()
                        .expect("generation")
                        .tokens
                        .iter()
                        .map(|t| t.id)
                        .collect()
                })
                .collect()
        };
        let cpu_out = run(Device::Cpu);
        let gpu_out = run(Device::Cuda(0));
        for (i, (c, g)) in cpu_out.iter().zip(&gpu_out).enumerate() {
            let same = c.iter().zip(g).take_while(|(x, y)| x == y).count();
            assert!(
                c == g,
                "prompt {i}: CUDA diverges from the CPU at token {same}: cpu {c:?} cuda {g:?}"
            );
        }
    }
}

/// The whole `CudaBackend` on the host emulation, against the CPU backend, on
/// tiny random models that use every weight type, both architectures (Qwen2's
/// biases and NeoX RoPE), tied and separate heads, and blocks of 4 tokens so
/// sequences cross blocks: checks `forward`'s orchestration (buffers, launch
/// arguments, activation reuse, logits rows, the layer hook) without a GPU.
mod emulated_model {
    use std::rc::Rc;

    use half::f16;

    use super::super::emulate::EmuDevice;
    use super::super::*;
    use super::kernels::assert_close;
    use crate::backend::CpuBackend;
    use crate::gguf::{GgufFile, GgufWriter, MetaValue, TensorSpec};

    /// Writes a tiny model: 2 layers, d_model 64, 4 heads over 2 KV heads of 16,
    /// FFN 96, vocabulary 80, each matrix in its own type.
    fn tiny_model(arch: Arch, tied: bool, path: &std::path::Path) {
        let (d, heads, kv_heads, hd, ffn, vocab, layers) = (64, 4, 2, 16, 96, 80, 2);
        let name = match arch {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        };
        let key = |k: &str| format!("{name}.{k}");
        let meta = vec![
            (
                "general.architecture".to_string(),
                MetaValue::String(name.into()),
            ),
            (
                "general.name".to_string(),
                MetaValue::String("tiny-emulated".into()),
            ),
            (key("block_count"), MetaValue::U32(layers)),
            (key("embedding_length"), MetaValue::U32(d as u32)),
            (key("attention.head_count"), MetaValue::U32(heads as u32)),
            (
                key("attention.head_count_kv"),
                MetaValue::U32(kv_heads as u32),
            ),
            (key("feed_forward_length"), MetaValue::U32(ffn as u32)),
            (key("context_length"), MetaValue::U32(256)),
            (key("rope.freq_base"), MetaValue::F32(10_000.0)),
            (
                key("attention.layer_norm_rms_epsilon"),
                MetaValue::F32(1e-5),
            ),
        ];
        // (name, cols, rows, type, std); rows 1 is a vector.
        let mut tensors: Vec<(String, usize, usize, GgmlType, f32)> = vec![
            ("token_embd.weight".into(), d, vocab, GgmlType::Q8_0, 1.0),
            ("output_norm.weight".into(), d, 1, GgmlType::F32, 0.2),
        ];
        if !tied {
            tensors.push(("output.weight".into(), d, vocab, GgmlType::Q4_0, 0.2));
        }
        let (q_dim, kv_dim) = (heads * hd, kv_heads * hd);
        for l in 0..layers {
            let p = |s: &str| format!("blk.{l}.{s}");
            tensors.extend([
                (p("attn_norm.weight"), d, 1, GgmlType::F32, 0.2),
                (p("attn_q.weight"), d, q_dim, GgmlType::Q4_0, 0.3),
                (p("attn_k.weight"), d, kv_dim, GgmlType::Q4_1, 0.3),
                (p("attn_v.weight"), d, kv_dim, GgmlType::Q8_0, 0.3),
                (p("attn_output.weight"), q_dim, d, GgmlType::F16, 0.2),
                (p("ffn_norm.weight"), d, 1, GgmlType::F32, 0.2),
                (p("ffn_gate.weight"), d, ffn, GgmlType::BF16, 0.3),
                (p("ffn_up.weight"), d, ffn, GgmlType::Q4_1, 0.3),
                (p("ffn_down.weight"), ffn, d, GgmlType::F32, 0.2),
            ]);
            if arch == Arch::Qwen2 {
                tensors.extend([
                    (p("attn_q.bias"), q_dim, 1, GgmlType::F32, 0.5),
                    (p("attn_k.bias"), kv_dim, 1, GgmlType::F32, 0.5),
                    (p("attn_v.bias"), kv_dim, 1, GgmlType::F32, 0.5),
                ]);
            }
        }
        let specs: Vec<TensorSpec> = tensors
            .iter()
            .map(|(n, cols, rows, ty, _)| TensorSpec {
                name: n.clone(),
                dims: if *rows == 1 {
                    vec![*cols as u64]
                } else {
                    vec![*cols as u64, *rows as u64]
                },
                ty: *ty,
            })
            .collect();
        let file = std::fs::File::create(path).expect("create the model file");
        let mut w = GgufWriter::new(std::io::BufWriter::new(file), &meta, &specs).expect("header");
        for (i, (n, cols, rows, ty, std)) in tensors.iter().enumerate() {
            let mut bytes = vec![0u8; ty.row_bytes(*cols).expect("row size") * rows];
            let mut x = vec![0f32; *cols];
            for (r, out) in bytes
                .chunks_mut(ty.row_bytes(*cols).expect("row size"))
                .enumerate()
            {
                crate::synth::fill_random(11, i as u64, r as u64, *std, &mut x);
                if n.ends_with("norm.weight") {
                    x.iter_mut().for_each(|v| *v += 1.0);
                }
                crate::synth::quantize_row(*ty, &x, out);
            }
            w.write_data(&bytes).expect("tensor data");
        }
        w.finish().expect("finish the file");
    }

    /// Agreement asked of the emulation, relative to the largest value. The
    /// kernels' arithmetic matches the CPU's up to float summation order, which
    /// flips an f16 rounding of K/V now and then; in a tiny random model such a
    /// flip can flip Q8 activation roundings downstream, and Qwen2's biases
    /// make values large, so a llama model agrees to ~1e-3 and a qwen2 one to
    /// ~1e-2. Real mistakes (a wrong offset, argument or layout) are off by O(1).
    const KV_TOL: f32 = 2e-2;
    const LOGIT_TOL: f32 = 3e-2;

    fn argmax(x: &[f32]) -> usize {
        x.iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |b, (i, &v)| if v > b.1 { (i, v) } else { b },
            )
            .0
    }

    fn f16s(v: &[u8]) -> Vec<f32> {
        v.chunks_exact(2)
            .map(|h| f16::from_le_bytes([h[0], h[1]]).to_f32())
            .collect()
    }

    fn check(arch: Arch, tied: bool) {
        let emu = match EmuDevice::new() {
            Ok(e) => e,
            Err(e) => {
                eprintln!("skipped: no host emulation of the kernels ({e})");
                return;
            }
        };
        let dir =
            std::env::temp_dir().join(format!("tandem-cuda-emu-model-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let path = dir.join(format!("tiny-{arch:?}-{tied}.gguf"));
        tiny_model(arch, tied, &path);
        let load = || {
            Model::load(GgufFile::open(&path).expect("the model opens")).expect("the model loads")
        };
        let (bs, nb) = (4, 24);
        let mut cpu_b = CpuBackend::new(load(), bs, nb);
        let emu = Rc::new(emu);
        let mut emu_b =
            CudaBackend::with_device(load(), bs, nb, 0, emu.clone()).expect("backend loads");
        let vocab = cpu_b.config().vocab_size;
        let n_layers = cpu_b.config().n_layers;
        let what = format!("{arch:?} tied={tied}");

        // Two prefills in one batch (the first crosses three blocks), then
        // decode steps mixed with a third sequence's chunked prefill.
        let a: Vec<u32> = (0..11).map(|i| (i * 7 + 3) % 80).collect();
        let b: Vec<u32> = vec![5, 9, 1, 77, 40];
        let c: Vec<u32> = (0..9).map(|i| (i * 13 + 1) % 80).collect();
        let (ba, bb, bc): (Vec<u32>, Vec<u32>, Vec<u32>) =
            ((0..5).collect(), (5..8).collect(), (8..12).collect());
        let (mut ta, mut tb, mut tc) = (0, 0, 0);
        for step in 0..4 {
            let (ia, ib) = ([ta], [tb]);
            let batch: Vec<BatchSeq<'_>> = if step == 0 {
                vec![
                    BatchSeq {
                        tokens: &a,
                        start_pos: 0,
                        blocks: &ba,
                        want_logits: true,
                    },
                    BatchSeq {
                        tokens: &b,
                        start_pos: 0,
                        blocks: &bb,
                        want_logits: true,
                    },
                ]
            } else {
                let mut v = vec![
                    BatchSeq {
                        tokens: &ia,
                        start_pos: a.len() + step - 1,
                        blocks: &ba,
                        want_logits: true,
                    },
                    BatchSeq {
                        tokens: &ib,
                        start_pos: b.len() + step - 1,
                        blocks: &bb,
                        want_logits: step != 2,
                    },
                ];
                // Sequence c arrives in chunks of 3, 4 and 2 tokens.
                let chunks = [(0, 3), (3, 7), (7, 9)];
                let (s, e) = chunks[step - 1];
                v.push(BatchSeq {
                    tokens: &c[s..e],
                    start_pos: s,
                    blocks: &bc,
                    want_logits: e == c.len(),
                });
                v
            };
            let mut cpu_pieces = Vec::new();
            let mut emu_pieces = Vec::new();
            let cl = cpu_b
                .forward(
                    &batch,
                    Some(&mut |l, kv| {
                        let mut p = Vec::new();
                        kv.read_kv_pieces(&ba[1..3], l, &mut p)
                            .expect("read pieces mid-step");
                        cpu_pieces.push(p);
                    }),
                )
                .expect("forward");
            let el = emu_b
                .forward(
                    &batch,
                    Some(&mut |l, kv| {
                        let mut p = Vec::new();
                        kv.read_kv_pieces(&ba[1..3], l, &mut p)
                            .expect("read pieces mid-step");
                        emu_pieces.push(p);
                    }),
                )
                .expect("forward");
            assert_eq!(cpu_pieces.len(), n_layers, "{what}: layer hook calls");
            assert_eq!(emu_pieces.len(), n_layers, "{what}: layer hook calls");
            for (l, (cp, ep)) in cpu_pieces.iter().zip(&emu_pieces).enumerate() {
                assert_close(
                    &format!("{what} step {step} KV in the hook, layer {l}"),
                    &f16s(ep),
                    &f16s(cp),
                    KV_TOL,
                    KV_TOL,
                );
            }
            // Every piece of every block both hold.
            for blk in 0..12u32 {
                for l in 0..n_layers {
                    let (mut cp, mut ep) = (Vec::new(), Vec::new());
                    cpu_b
                        .read_kv_pieces(&[blk], l, &mut cp)
                        .expect("KV piece copy");
                    emu_b
                        .read_kv_pieces(&[blk], l, &mut ep)
                        .expect("KV piece copy");
                    let where_ = format!("{what} step {step} block {blk} layer {l}");
                    assert_close(&where_, &f16s(&ep), &f16s(&cp), KV_TOL, KV_TOL);
                }
            }
            assert_eq!(cl.len(), el.len(), "{what} step {step}: logits rows");
            for (r, (crow, erow)) in cl.chunks(vocab).zip(el.chunks(vocab)).enumerate() {
                let where_ = format!("{what} step {step} logits row {r}");
                assert_close(&where_, erow, crow, LOGIT_TOL, 0.0);
                let (ci, ei) = (argmax(crow), argmax(erow));
                let gap = crow[ci] - crow[ei];
                assert!(
                    ci == ei || gap < 0.5,
                    "{where_}: argmax {ei}, the CPU's {ci} (gap {gap})"
                );
            }
            ta = argmax(&cl[..vocab]) as u32;
            if step != 2 {
                tb = argmax(&cl[vocab..2 * vocab]) as u32;
            }
            if step == 3 {
                tc = argmax(&cl[2 * vocab..]) as u32;
            }
        }
        assert_eq!(
            emu_b.graphs.captured, 0,
            "{what}: a step with a hook was captured"
        );

        // Decode steps with no hook are captured once per shape and replayed:
        // three sequences twice, then two (b is done), with c's logits
        // skipped once, and steps 5 and 7 ending in greedy picks (a shape of
        // their own). Positions cross blocks on the way, so a replay that kept
        // anything of the step it was captured in would show.
        for step in 4..10 {
            let (ia, ib, ic) = ([ta], [tb], [tc]);
            let one = |tokens, start_pos, blocks, want_logits| BatchSeq {
                tokens,
                start_pos,
                blocks,
                want_logits,
            };
            let mut batch = vec![one(&ia, a.len() + step - 1, &ba, true)];
            if step < 6 {
                batch.push(one(&ib, b.len() + step - 1, &bb, true));
            }
            batch.push(one(&ic, c.len() + step - 4, &bc, step != 8));
            let cl = cpu_b.forward(&batch, None).expect("forward");
            if step == 5 || step == 7 {
                // Greedy picks on the device against the host's on the CPU's logits.
                let picks = emu_b.forward_greedy(&batch, None).expect("forward");
                assert_eq!(picks.len(), cl.len() / vocab, "{what} step {step}: picks");
                for (r, (crow, &(id, lp))) in cl.chunks(vocab).zip(&picks).enumerate() {
                    let (want_id, want_lp) = crate::sampling::greedy_pick(crow);
                    let gap = crow[want_id as usize] - crow[id as usize];
                    assert!(
                        id == want_id || gap < 0.5,
                        "{what} step {step} row {r}: picked {id}, the CPU's argmax {want_id}"
                    );
                    assert!(
                        (lp - want_lp).abs() < 0.1,
                        "{what} step {step} row {r}: log-probability {lp}, the CPU's {want_lp}"
                    );
                }
            } else {
                let el = emu_b.forward(&batch, None).expect("forward");
                assert_eq!(cl.len(), el.len(), "{what} step {step}: logits rows");
                for (r, (crow, erow)) in cl.chunks(vocab).zip(el.chunks(vocab)).enumerate() {
                    let where_ = format!("{what} graph step {step} logits row {r}");
                    assert_close(&where_, erow, crow, LOGIT_TOL, 0.0);
                }
            }
            let rows: Vec<&[f32]> = cl.chunks(vocab).collect();
            ta = argmax(rows[0]) as u32;
            if step < 6 {
                tb = argmax(rows[1]) as u32;
            }
            if step != 8 {
                tc = argmax(rows[rows.len() - 1]) as u32;
            }
            for blk in ba.iter().chain(&bc) {
                for l in 0..n_layers {
                    let (mut cp, mut ep) = (Vec::new(), Vec::new());
                    cpu_b
                        .read_kv_pieces(&[*blk], l, &mut cp)
                        .expect("KV piece copy");
                    emu_b
                        .read_kv_pieces(&[*blk], l, &mut ep)
                        .expect("KV piece copy");
                    let where_ = format!("{what} graph step {step} block {blk} layer {l}");
                    assert_close(&where_, &f16s(&ep), &f16s(&cp), KV_TOL, KV_TOL);
                }
            }
        }
        assert_eq!(
            emu_b.graphs.captured, 5,
            "{what}: one capture per step shape"
        );
        assert_eq!(
            emu_b.graphs.replayed, 6,
            "{what}: every decode step replayed"
        );
        assert_eq!(emu.live_graphs(), 5, "{what}: graphs alive");
        // Pieces written in, scattered to blocks apart, read back unchanged.
        let mut cp = Vec::new();
        for b in [2, 3] {
            cpu_b
                .read_kv_pieces(&[b], 1, &mut cp)
                .expect("KV piece copy");
        }
        emu_b
            .write_kv_pieces(&[20, 22], 1, &cp)
            .expect("KV piece copy");
        let mut back = Vec::new();
        for b in [20, 22] {
            emu_b
                .read_kv_pieces(&[b], 1, &mut back)
                .expect("KV piece copy");
        }
        assert!(back == cp, "{what}: written pieces read back unchanged");
        assert!(
            emu_b.write_kv_pieces(&[20, 22], 1, &cp[1..]).is_err(),
            "{what}: a short write is refused"
        );
        drop(emu_b);
        assert_eq!(
            emu.live_graphs(),
            0,
            "{what}: graphs freed with the backend"
        );
        let _ = std::fs::remove_file(&path);
    }

    /// The graph cache keeps the most recently used shapes and frees the rest.
    #[test]
    fn graph_cache_evicts_the_least_recently_used() {
        let emu = match EmuDevice::new() {
            Ok(e) => Rc::new(e),
            Err(e) => {
                eprintln!("skipped: no host emulation of the kernels ({e})");
                return;
            }
        };
        let dev: Rc<dyn Device> = emu.clone();
        let key = |rows| GraphKey {
            rows,
            logit_rows: rows,
            offs: [0; 8],
            greedy: false,
        };
        let mut graphs = Graphs::new(true);
        for rows in 0..MAX_GRAPHS {
            dev.begin_capture().expect("a capture starts");
            let handle = dev.end_capture().expect("the capture ends");
            graphs.insert(
                key(rows),
                Graph {
                    dev: dev.clone(),
                    handle,
                },
            );
            graphs.replayed += 1;
        }
        // Shape 0 is used again, so shape 1 is now the oldest.
        assert!(graphs.get(&key(0)).is_some());
        graphs.replayed += 1;
        dev.begin_capture().expect("a capture starts");
        let handle = dev.end_capture().expect("the capture ends");
        graphs.insert(
            key(MAX_GRAPHS),
            Graph {
                dev: dev.clone(),
                handle,
            },
        );
        assert_eq!(graphs.entries.len(), MAX_GRAPHS);
        assert_eq!(emu.live_graphs(), MAX_GRAPHS, "the evicted graph is freed");
        assert!(graphs.get(&key(0)).is_some());
        assert!(graphs.get(&key(1)).is_none());
        assert!(graphs.get(&key(MAX_GRAPHS)).is_some());
        drop(graphs);
        assert_eq!(emu.live_graphs(), 0);
    }

    /// Copies and waits inside a capture are refused, as CUDA refuses them,
    /// and the stream takes work again once the capture ends.
    #[test]
    fn a_capture_refuses_copies_and_ends_cleanly() {
        let emu = match EmuDevice::new() {
            Ok(e) => e,
            Err(e) => {
                eprintln!("skipped: no host emulation of the kernels ({e})");
                return;
            }
        };
        let buf = emu.alloc(64).expect("an allocation");
        emu.begin_capture().expect("a capture starts");
        assert!(emu.begin_capture().is_err(), "a capture inside a capture");
        assert!(emu.htod(buf, &[1; 8]).is_err());
        assert!(emu.sync().is_err());
        assert!(emu.mark(0).is_err());
        emu.end_capture().expect("the capture ends");
        emu.htod(buf, &[1; 8]).expect("a copy in after the capture");
        emu.sync().expect("a wait after the capture");
        // A read that waits for a layer nobody marked is refused.
        let mut out = [0u8; 8];
        assert!(emu.gather(&mut out, &[buf], Some(3)).is_err());
        emu.mark(3).expect("a mark");
        emu.gather(&mut out, &[buf], Some(3))
            .expect("a read after its mark");
        assert_eq!(out, [1; 8]);
    }

    #[test]
    #[ignore = "slow (a minute on two cores); scripts/gpu-pack and scripts/test run it"]
    fn llama_with_its_own_head_matches_the_cpu_backend() {
        check(Arch::Llama, false);
    }

    #[test]
    #[ignore = "slow (a minute on two cores); scripts/gpu-pack and scripts/test run it"]
    fn qwen2_with_a_tied_head_matches_the_cpu_backend() {
        check(Arch::Qwen2, true);
    }
}
