//! A host emulation of kernels.cu, for tests on machines without a GPU.
//!
//! kernels.cu is compiled by g++ as C++20 with CUDA's builtins defined on the
//! host: each thread block runs as `blockDim.x` OS threads, `__syncthreads` is
//! a barrier, a warp shuffle an exchange through a per-warp barrier, and the
//! three inline-PTX helpers (f16 conversions, dp4a) are replaced by host
//! equivalents. Device pointers are host pointers. Blocks run one after
//! another, so `__shared__` variables are function statics. This checks the
//! kernels' logic (indexing, layouts, the online softmax, the quantization)
//! against the CPU reference; it does not check NVRTC, timing or memory
//! ordering on a real GPU, which is what `scripts/gpu-check` is for.

use std::collections::HashMap;
use std::ffi::{CString, c_char, c_void};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use super::{Arg, CudaError, Device, KERNEL_NAMES, KERNELS_CU, Kernel, Launch, check_grid};

/// CUDA's builtins on the host.
const PRELUDE: &str = r#"
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>
#define __global__
#define __launch_bounds__(...)
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__ __restrict
struct EmuDim { unsigned x = 0, y = 0, z = 0; };
thread_local EmuDim threadIdx, blockIdx;
static EmuDim blockDim;
static std::barrier<>* emu_block_barrier;
struct EmuWarp {
    std::barrier<> bar{32};
    uint64_t slot[32];
};
static std::vector<EmuWarp*> emu_warps;
static unsigned char* emu_dyn_smem;
inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
template <class T> T emu_shfl(T v, int o) {
    EmuWarp& w = *emu_warps[threadIdx.x / 32];
    unsigned lane = threadIdx.x % 32;
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    w.slot[lane] = bits;
    w.bar.arrive_and_wait();
    uint64_t r = w.slot[lane ^ (unsigned)o];
    w.bar.arrive_and_wait();
    T out;
    std::memcpy(&out, &r, sizeof(T));
    return out;
}
inline float __shfl_xor_sync(unsigned, float v, int o) { return emu_shfl(v, o); }
inline int __shfl_xor_sync(unsigned, int v, int o) { return emu_shfl(v, o); }
inline double __shfl_xor_sync(unsigned, double v, int o) { return emu_shfl(v, o); }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float2int_rn(float f) { return (int)std::nearbyint(f); }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __fdiv_rn(float a, float b) { volatile float r = a / b; return r; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
inline float emu_h2f(unsigned short h) { _Float16 v; std::memcpy(&v, &h, 2); return (float)v; }
inline unsigned short emu_f2h(float f) { _Float16 v = (_Float16)f; unsigned short h; std::memcpy(&h, &v, 2); return h; }
inline int emu_dp4a(int a, int b, int c) {
    for (int i = 0; i < 4; ++i) c += (int)(signed char)(a >> (8 * i)) * (int)(signed char)(b >> (8 * i));
    return c;
}
"#;

/// Runs kernel launches on the host; built once per test process.
pub(crate) struct Emu {
    // Keeps the library mapped while `run` is used.
    _lib: libloading::Library,
    run: unsafe extern "C" fn(*const c_char, u32, u32, u32, u32, *mut *mut c_void) -> i32,
    /// One launch at a time: the emulation keeps its state in globals.
    lock: Mutex<()>,
}

/// The C++ translation unit: the prelude, kernels.cu with its inline PTX
/// replaced, and a dispatcher from kernel names to typed calls.
pub(crate) fn translation_unit() -> Result<String, String> {
    let mut src = KERNELS_CU.to_string();
    for (from, to) in [
        (
            r#"asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));"#,
            "f = emu_h2f(h);",
        ),
        (
            r#"asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));"#,
            "h = emu_f2h(f);",
        ),
        (
            r#"asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));"#,
            "r = emu_dp4a(a, b, c);",
        ),
        (
            "extern __shared__ u16 chunk[];",
            "u16* chunk = (u16*)emu_dyn_smem;",
        ),
    ] {
        if src.matches(from).count() != 1 {
            return Err(format!("kernels.cu no longer holds exactly one `{from}`"));
        }
        src = src.replace(from, to);
    }
    if src.contains("asm(") {
        return Err("kernels.cu has inline PTX the emulation does not replace".into());
    }
    Ok(format!("{PRELUDE}\n{src}\n{DISPATCH}"))
}

/// Typed calls for every kernel: `P(i, T)` reads argument i as a T.
const DISPATCH: &str = r#"
static void emu_grid(unsigned gx, unsigned gy, unsigned bx, unsigned smem, const std::function<void()>& body) {
    std::vector<unsigned char> dyn(smem + 16);
    emu_dyn_smem = dyn.data();
    blockDim = EmuDim{bx, 1, 1};
    for (unsigned y = 0; y < gy; ++y) {
        for (unsigned x = 0; x < gx; ++x) {
            std::barrier<> bar(bx);
            emu_block_barrier = &bar;
            std::vector<EmuWarp*> warps;
            for (unsigned w = 0; w < bx / 32; ++w) warps.push_back(new EmuWarp);
            emu_warps = warps;
            std::vector<std::thread> threads;
            for (unsigned t = 0; t < bx; ++t) {
                threads.emplace_back([&, t, x, y] {
                    threadIdx = EmuDim{t, 0, 0};
                    blockIdx = EmuDim{x, y, 0};
                    body();
                });
            }
            for (auto& th : threads) th.join();
            for (auto* w : warps) delete w;
        }
    }
}

#define P(i, T) (*(T*)params[i])
#define KERNEL(name, call) if (std::strcmp(kernel, #name) == 0) { emu_grid(gx, gy, bx, smem, [&] { call; }); return 0; }

extern "C" int emu_launch(const char* kernel, unsigned gx, unsigned gy, unsigned bx, unsigned smem, void** params) {
    KERNEL(quantize_q8, quantize_q8(P(0, const float*), P(1, Q8Act*), P(2, int)))
    KERNEL(mm_q4_0, mm_q4_0(P(0, const u8*), P(1, const Q8Act*), P(2, float*), P(3, int), P(4, int), P(5, int)))
    KERNEL(mm_q4_1, mm_q4_1(P(0, const u8*), P(1, const Q8Act*), P(2, float*), P(3, int), P(4, int), P(5, int)))
    KERNEL(mm_q8_0, mm_q8_0(P(0, const u8*), P(1, const Q8Act*), P(2, float*), P(3, int), P(4, int), P(5, int)))
    KERNEL(mm_f32, mm_f32(P(0, const u8*), P(1, const float*), P(2, float*), P(3, int), P(4, int), P(5, int)))
    KERNEL(mm_f16, mm_f16(P(0, const u8*), P(1, const float*), P(2, float*), P(3, int), P(4, int), P(5, int)))
    KERNEL(mm_bf16, mm_bf16(P(0, const u8*), P(1, const float*), P(2, float*), P(3, int), P(4, int), P(5, int)))
    KERNEL(embed, embed(P(0, const u8*), P(1, int), P(2, i64), P(3, const u32*), P(4, float*), P(5, int), P(6, int)))
    KERNEL(rms_norm, rms_norm(P(0, const float*), P(1, const float*), P(2, float*), P(3, int), P(4, float)))
    KERNEL(add_bias, add_bias(P(0, float*), P(1, const float*), P(2, i64), P(3, int)))
    KERNEL(add_inplace, add_inplace(P(0, float*), P(1, const float*), P(2, i64)))
    KERNEL(silu_mul, silu_mul(P(0, const float*), P(1, const float*), P(2, float*), P(3, i64)))
    KERNEL(rope, rope(P(0, float*), P(1, const int*), P(2, const double*), P(3, int), P(4, int), P(5, int), P(6, int)))
    KERNEL(kv_write, kv_write(P(0, const float*), P(1, const float*), P(2, u16*), P(3, const i64*), P(4, i64), P(5, i64), P(6, int)))
    KERNEL(gather_rows, gather_rows(P(0, const float*), P(1, const int*), P(2, float*), P(3, int)))
    KERNEL(argmax_logprob, argmax_logprob(P(0, const float*), P(1, int), P(2, unsigned*), P(3, float*)))
    KERNEL(attn_decode, attn_decode(P(0, const float*), P(1, const u16*), P(2, float*), P(3, const int*), P(4, const int*), P(5, const int*), P(6, const int*), P(7, i64), P(8, i64), P(9, i64), P(10, int), P(11, int), P(12, int), P(13, int), P(14, float)))
    KERNEL(attn_prefill, attn_prefill(P(0, const float*), P(1, const u16*), P(2, float*), P(3, const int*), P(4, const int*), P(5, const int*), P(6, const int*), P(7, i64), P(8, i64), P(9, i64), P(10, int), P(11, int), P(12, int), P(13, int), P(14, float)))
    return -1;
}
"#;

impl Emu {
    /// The emulation, compiled on first use; `None` (with the reason) where
    /// g++ is missing or fails.
    pub(crate) fn get() -> Result<&'static Emu, String> {
        static EMU: OnceLock<Result<Emu, String>> = OnceLock::new();
        EMU.get_or_init(Emu::build).as_ref().map_err(Clone::clone)
    }

    fn build() -> Result<Emu, String> {
        let dir = std::env::temp_dir().join(format!("tandem-cuda-emu-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let cpp: PathBuf = dir.join("kernels_emu.cpp");
        let lib = dir.join("libkernels_emu.so");
        std::fs::write(&cpp, translation_unit()?).map_err(|e| e.to_string())?;
        let out = Command::new("g++")
            .args([
                "-std=c++20",
                "-O1",
                "-shared",
                "-fPIC",
                "-pthread",
                "-w",
                "-o",
            ])
            .arg(&lib)
            .arg(&cpp)
            .output()
            .map_err(|e| format!("g++ did not run: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "g++ failed on the emulation:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        // SAFETY: the library was just built from the source above; loading it
        // runs only static initializers.
        let lib = unsafe { libloading::Library::new(&lib) }.map_err(|e| e.to_string())?;
        // SAFETY: `emu_launch` has exactly this signature in DISPATCH.
        let run = unsafe {
            *lib.get::<unsafe extern "C" fn(*const c_char, u32, u32, u32, u32, *mut *mut c_void) -> i32>(
                b"emu_launch",
            )
            .map_err(|e| e.to_string())?
        };
        Ok(Emu {
            _lib: lib,
            run,
            lock: Mutex::new(()),
        })
    }
}

impl Launch for Emu {
    fn launch(
        &self,
        k: Kernel,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &[Arg],
    ) -> Result<(), CudaError> {
        check_grid(k, grid)?;
        let name = CString::new(KERNEL_NAMES[k as usize]).expect("no NUL in kernel names");
        let mut slots: Vec<u64> = args.iter().map(|a| a.slot()).collect();
        let mut params: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| (s as *mut u64).cast::<c_void>())
            .collect();
        let _one = lock(&self.lock);
        // SAFETY: the arguments follow kernels.cu's parameter list and every
        // pointer among them is a live host allocation of the caller's.
        let rc = unsafe {
            (self.run)(
                name.as_ptr(),
                grid.0,
                grid.1,
                block,
                smem,
                params.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(CudaError::Batch(format!(
                "the emulation has no kernel {}",
                KERNEL_NAMES[k as usize]
            )));
        }
        Ok(())
    }
}

/// A launch as recorded during a capture.
#[derive(Debug, Clone)]
struct Recorded {
    k: Kernel,
    grid: (u32, u32, u32),
    block: u32,
    smem: u32,
    args: Vec<Arg>,
}

/// Host memory and the emulated kernels behind the [`Device`] interface, so
/// the whole `CudaBackend` runs here (slowly): device pointers are the
/// addresses of host allocations this keeps. Graphs behave as CUDA's do:
/// launches during a capture are recorded, not run, with their arguments as
/// they were then; copies and waits during a capture are errors; a replay
/// runs the recorded launches.
pub(crate) struct EmuDevice {
    emu: &'static Emu,
    mem: Mutex<HashMap<u64, Box<[u64]>>>,
    capture: Mutex<Option<Vec<Recorded>>>,
    graphs: Mutex<HashMap<u64, Vec<Recorded>>>,
    next_graph: std::sync::atomic::AtomicU64,
    /// Layers marked since the last plain `sync`, for `gather` to check.
    marked: Mutex<Vec<usize>>,
}

impl EmuDevice {
    pub(crate) fn new() -> Result<Self, String> {
        Ok(Self {
            emu: Emu::get()?,
            mem: Mutex::new(HashMap::new()),
            capture: Mutex::new(None),
            graphs: Mutex::new(HashMap::new()),
            next_graph: std::sync::atomic::AtomicU64::new(1),
            marked: Mutex::new(Vec::new()),
        })
    }

    /// Graphs alive (captured and not dropped).
    pub(crate) fn live_graphs(&self) -> usize {
        lock(&self.graphs).len()
    }

    /// Refuses what a stream in capture refuses.
    fn not_capturing(&self, what: &str) -> Result<(), CudaError> {
        if lock(&self.capture).is_some() {
            return Err(CudaError::Batch(format!(
                "{what} on a stream that is capturing a graph"
            )));
        }
        Ok(())
    }

    /// Checks that `[ptr, ptr + n)` lies inside one allocation.
    fn check(&self, ptr: u64, n: usize) -> Result<(), CudaError> {
        let mem = lock(&self.mem);
        let inside = mem
            .iter()
            .any(|(&start, b)| ptr >= start && ptr + n as u64 <= start + 8 * b.len() as u64);
        if inside {
            Ok(())
        } else {
            Err(CudaError::Batch(format!(
                "emulated copy of {n} bytes at {ptr:#x} is outside every allocation"
            )))
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Launch for EmuDevice {
    fn launch(
        &self,
        k: Kernel,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &[Arg],
    ) -> Result<(), CudaError> {
        if let Some(rec) = lock(&self.capture).as_mut() {
            check_grid(k, grid)?;
            rec.push(Recorded {
                k,
                grid,
                block,
                smem,
                args: args.to_vec(),
            });
            return Ok(());
        }
        self.emu.launch(k, grid, block, smem, args)
    }
}

impl Device for EmuDevice {
    fn alloc(&self, bytes: usize) -> Result<u64, CudaError> {
        let b = vec![0u64; bytes.div_ceil(8).max(32)].into_boxed_slice();
        let ptr = b.as_ptr() as u64;
        lock(&self.mem).insert(ptr, b);
        Ok(ptr)
    }

    fn free(&self, ptr: u64) {
        lock(&self.mem).remove(&ptr);
    }

    fn htod(&self, dst: u64, src: &[u8]) -> Result<(), CudaError> {
        self.not_capturing("a copy in")?;
        self.check(dst, src.len())?;
        // SAFETY: checked to lie inside a live allocation of ours.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<(), CudaError> {
        self.not_capturing("a copy out")?;
        self.check(src, dst.len())?;
        // SAFETY: as above.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn zero(&self, dst: u64, bytes: usize) -> Result<(), CudaError> {
        self.not_capturing("a memset")?;
        self.check(dst, bytes)?;
        // SAFETY: as above.
        unsafe { std::ptr::write_bytes(dst as *mut u8, 0, bytes) };
        Ok(())
    }

    fn sync(&self) -> Result<(), CudaError> {
        self.not_capturing("a wait")?;
        lock(&self.marked).clear();
        Ok(())
    }

    fn bind(&self) -> Result<(), CudaError> {
        Ok(())
    }

    fn describe(&self) -> String {
        "host emulation".into()
    }

    fn mark(&self, layer: usize) -> Result<(), CudaError> {
        self.not_capturing("an event")?;
        lock(&self.marked).push(layer);
        Ok(())
    }

    fn gather(&self, dst: &mut [u8], srcs: &[u64], after: Option<usize>) -> Result<(), CudaError> {
        self.not_capturing("a copy out")?;
        if let Some(layer) = after
            && !lock(&self.marked).contains(&layer)
        {
            return Err(CudaError::Batch(format!(
                "a copy waits for layer {layer}'s mark, never recorded"
            )));
        }
        if srcs.is_empty() || dst.is_empty() {
            return Ok(());
        }
        for (out, &src) in dst.chunks_mut((dst.len() / srcs.len()).max(1)).zip(srcs) {
            self.dtoh(out, src)?;
        }
        Ok(())
    }

    fn scatter(&self, dsts: &[u64], src: &[u8]) -> Result<(), CudaError> {
        if dsts.is_empty() || src.is_empty() {
            return Ok(());
        }
        for (&dst, p) in dsts.iter().zip(src.chunks((src.len() / dsts.len()).max(1))) {
            self.htod(dst, p)?;
        }
        Ok(())
    }

    fn begin_capture(&self) -> Result<(), CudaError> {
        let mut c = lock(&self.capture);
        if c.is_some() {
            return Err(CudaError::Batch("a capture inside a capture".into()));
        }
        *c = Some(Vec::new());
        Ok(())
    }

    fn end_capture(&self) -> Result<u64, CudaError> {
        let rec = lock(&self.capture)
            .take()
            .ok_or_else(|| CudaError::Batch("no capture to end".into()))?;
        let id = self
            .next_graph
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        lock(&self.graphs).insert(id, rec);
        Ok(id)
    }

    fn replay(&self, graph: u64) -> Result<(), CudaError> {
        self.not_capturing("a graph launch")?;
        let rec = lock(&self.graphs)
            .get(&graph)
            .cloned()
            .ok_or_else(|| CudaError::Batch(format!("no graph {graph}")))?;
        for r in rec {
            self.emu.launch(r.k, r.grid, r.block, r.smem, &r.args)?;
        }
        Ok(())
    }

    fn drop_graph(&self, graph: u64) {
        lock(&self.graphs).remove(&graph);
    }
}
