//! The CUDA backend: the forward pass on an NVIDIA GPU through cudarc's driver API.
//!
//! Weights are uploaded once in their GGUF form (quantized blocks unchanged)
//! and dequantized in registers by the matrix kernels; the KV pool is one
//! device allocation in exactly the [`KvLayout`] byte layout, so a block read
//! out for a transfer is byte-for-byte what the CPU backend would ship. The
//! kernels (`kernels.cu`) are compiled by NVRTC at load time for the device's
//! own `sm_XY`; the driver and NVRTC are opened at run time, so this module
//! builds on machines with no CUDA toolkit and fails with a [`CudaError`]
//! naming what is missing, never a panic, where there is no driver or GPU.
//!
//! A forward step packs the ragged batch into flat index arrays (`pack`),
//! uploads them in one copy, and runs every sequence of the step through one
//! set of launches per layer on one stream; the logits of the rows that want
//! them come back to the host as f32, where the engine samples.
//!
//! A decode step (one token per sequence) that feeds no KV stream is captured
//! as a CUDA graph the first time its shape (rows, logit rows) is seen and
//! replayed after that ([`Graphs`]): every per-step quantity is read from the
//! index buffer, so only the upload changes. A step that feeds a KV stream
//! marks each layer with an event once its K/V are written, and the engine's
//! reads for that layer run on a second stream after the event, gathered into
//! pinned memory in one batch, while the compute stream goes on with later
//! layers (the hook for layer `l` runs once layer `l + 1` is queued).
//!
//! Not done yet, and where it would go: GPUDirect RDMA. A transport that
//! registers the pool's device memory could write received pieces straight
//! into it, replacing the staging copies of `write_kv_pieces`, behind the same
//! `Transport` trait.

#[cfg(test)]
mod emulate;
mod nvrtc;
mod pack;
#[cfg(test)]
mod tests;

use std::cell::RefCell;
use std::ffi::{CString, c_void};
use std::rc::Rc;
use std::sync::Arc;

use cudarc::driver::result as cu;
use cudarc::driver::sys;
use cudarc::driver::{CudaContext, DriverError};

use crate::backend::{Backend, BackendError, KvRead, LayerHook};
use crate::cpu::QMatrix;
use crate::gguf::GgmlType;
use crate::kv_cache::{BlockId, KvLayout};
use crate::model::{Arch, BatchSeq, Model, ModelConfig};
pub use nvrtc::NVRTC_ENV;
use pack::{PackedBatch, pack};

/// The kernels' source, compiled by NVRTC when a backend loads.
pub(crate) const KERNELS_CU: &str = include_str!("kernels.cu");

// Launch geometry, mirrored by the #defines of kernels.cu (a test checks).
/// Tokens per matrix-product tile.
pub(crate) const MM_TOKENS: usize = 8;
/// Warps (weight rows) per matrix-product block.
pub(crate) const MM_WARPS: usize = 4;
/// Query heads per KV head the attention kernels support.
pub(crate) const MAX_GROUP: usize = 8;
/// head_dim / 32 the attention kernels support.
pub(crate) const MAX_LANE_ELEMS: usize = 8;
/// Warps of the decode attention block.
pub(crate) const ATTN_DECODE_WARPS: usize = 4;
/// Keys staged in shared memory at a time by the prefill attention.
pub(crate) const ATTN_KEY_CHUNK: usize = 32;
/// Query tokens (one warp each) per prefill attention block.
pub(crate) const ATTN_PREFILL_TOKENS: usize = 8;
/// Bytes of one quantized activation block on the device (`Q8Act`).
pub(crate) const Q8_ACT_BYTES: usize = 44;
/// Threads per block of the row and element-wise kernels.
const ROW_THREADS: u32 = 256;

/// Errors from opening the GPU or running the backend.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("{library} could not be loaded (tried {}); {hint}", tried.join(", "))]
    LibraryNotFound {
        library: &'static str,
        tried: Vec<String>,
        hint: String,
    },
    #[error("no CUDA device {ordinal}: the driver reports {count} device(s)")]
    NoDevice { ordinal: usize, count: usize },
    #[error("CUDA driver call failed while {what}: {source}")]
    Driver {
        what: String,
        #[source]
        source: DriverError,
    },
    #[error("NVRTC: {0}")]
    Nvrtc(String),
    #[error("the CUDA backend does not support this model: {0}")]
    Unsupported(String),
    #[error("invalid forward batch: {0}")]
    Batch(String),
}

/// Adds what the driver was doing to a driver error.
trait Context<T> {
    fn ctx(self, what: impl Into<String>) -> Result<T, CudaError>;
}

impl<T> Context<T> for Result<T, DriverError> {
    fn ctx(self, what: impl Into<String>) -> Result<T, CudaError> {
        self.map_err(|source| CudaError::Driver {
            what: what.into(),
            source,
        })
    }
}

/// Checks that the driver library loads and device `ordinal` exists, without
/// touching any cudarc path that panics when the library is missing.
pub fn probe(ordinal: usize) -> Result<(), CudaError> {
    // SAFETY: only tries to open the library; no symbol is called.
    if !unsafe { sys::is_culib_present() } {
        return Err(CudaError::LibraryNotFound {
            library: "the CUDA driver (libcuda.so.1)",
            tried: driver_candidates(),
            hint: "install the NVIDIA driver, or run with --device cpu".into(),
        });
    }
    match cu::init() {
        Ok(()) => {}
        Err(e) if e.0 == sys::cudaError_enum::CUDA_ERROR_NO_DEVICE => {
            return Err(CudaError::NoDevice { ordinal, count: 0 });
        }
        Err(e) => return Err(e).ctx("initializing the driver (cuInit)"),
    }
    let count = cu::device::get_count().ctx("counting devices")?.max(0) as usize;
    if ordinal >= count {
        return Err(CudaError::NoDevice { ordinal, count });
    }
    Ok(())
}

/// Device-memory bandwidth of GPU `ordinal` in GB/s, for benchmarks' decode
/// bound: the best of five device-to-device copies of 512 MiB, counting the
/// bytes read and the bytes written.
pub fn device_bandwidth(ordinal: usize) -> Result<f64, CudaError> {
    const BYTES: usize = 512 << 20;
    probe(ordinal)?;
    let ctx = CudaContext::new(ordinal).ctx(format!("creating a context on device {ordinal}"))?;
    ctx.bind_to_thread().ctx("making the context current")?;
    // SAFETY: plain allocations in the current context, freed below.
    let src = unsafe { cu::malloc_sync(BYTES) }.ctx("allocating 512 MiB")?;
    let dst = match unsafe { cu::malloc_sync(BYTES) } {
        Ok(p) => p,
        Err(e) => {
            // SAFETY: allocated above, freed once.
            let _ = unsafe { cu::free_sync(src) };
            return Err(e).ctx("allocating 512 MiB");
        }
    };
    let measure = || -> Result<f64, CudaError> {
        // SAFETY: both allocations hold BYTES bytes.
        unsafe { cu::memset_d8_sync(src, 1, BYTES) }.ctx("filling the source")?;
        let mut best = 0.0f64;
        for _ in 0..6 {
            let t = std::time::Instant::now();
            // SAFETY: as above; the copy is complete after the synchronize.
            unsafe { cu::memcpy_dtod_sync(dst, src, BYTES) }.ctx("copying device memory")?;
            cu::ctx::synchronize().ctx("waiting for the copy")?;
            best = best.max((2 * BYTES) as f64 / t.elapsed().as_secs_f64() / 1e9);
        }
        Ok(best)
    };
    let result = measure();
    // SAFETY: allocated above, freed once.
    let _ = unsafe { cu::free_sync(dst) };
    let _ = unsafe { cu::free_sync(src) };
    result
}

/// The driver library names cudarc tries.
fn driver_candidates() -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for n in ["cuda", "nvcuda"]
        .iter()
        .flat_map(|l| cudarc::get_lib_name_candidates(l))
    {
        if !names.contains(&n) {
            names.push(n);
        }
    }
    names
}

/// A failure in the middle of serving, for the engine: it stops, since a CUDA
/// context that returned an error may be unusable (errors such as an illegal
/// address are sticky) and wrong logits or KV bytes would be worse.
impl From<CudaError> for BackendError {
    fn from(e: CudaError) -> Self {
        BackendError(format!("CUDA: {e}"))
    }
}

/// A device allocation, freed on drop through the device it came from (which
/// it keeps alive).
struct DeviceBuf {
    ptr: sys::CUdeviceptr,
    bytes: usize,
    dev: Rc<dyn Device>,
}

impl DeviceBuf {
    fn alloc(dev: &Rc<dyn Device>, bytes: usize, what: &str) -> Result<Self, CudaError> {
        let ptr = dev.alloc(bytes).map_err(|e| match e {
            CudaError::Driver { source, .. } => CudaError::Driver {
                what: format!("allocating {bytes} bytes for {what}"),
                source,
            },
            e => e,
        })?;
        Ok(Self {
            ptr,
            bytes,
            dev: dev.clone(),
        })
    }

    fn upload<T: bytemuck::Pod>(
        dev: &Rc<dyn Device>,
        data: &[T],
        what: &str,
    ) -> Result<Self, CudaError> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let b = Self::alloc(dev, bytes.len(), what)?;
        dev.htod(b.ptr, bytes)?;
        Ok(b)
    }
}

impl Drop for DeviceBuf {
    fn drop(&mut self) {
        self.dev.free(self.ptr);
    }
}

/// Device memory, copies and launches: the GPU, or in tests the host
/// emulation. Copies are in stream order with the launches.
pub(crate) trait Device: Launch {
    /// Allocates `bytes` bytes (256-byte aligned on the GPU).
    fn alloc(&self, bytes: usize) -> Result<u64, CudaError>;
    /// Frees an allocation of `alloc`.
    fn free(&self, ptr: u64);
    /// Copies `src` to `dst`; `src` may be reused when this returns.
    fn htod(&self, dst: u64, src: &[u8]) -> Result<(), CudaError>;
    /// Copies `dst.len()` bytes from `src`, once everything queued is done.
    fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<(), CudaError>;
    /// Sets `bytes` bytes at `dst` to zero.
    fn zero(&self, dst: u64, bytes: usize) -> Result<(), CudaError>;
    /// Waits for everything queued.
    fn sync(&self) -> Result<(), CudaError>;
    /// Makes the device current on the calling thread.
    fn bind(&self) -> Result<(), CudaError>;
    /// The device for logs (`NVIDIA H100 80GB HBM3, sm_90`).
    fn describe(&self) -> String;

    /// Marks the point in the launch order where layer `layer`'s K/V of the
    /// step are final (a CUDA event), for [`Device::gather`] to wait for.
    fn mark(&self, layer: usize) -> Result<(), CudaError>;
    /// Copies `srcs.len()` equal pieces of `dst.len() / srcs.len()` bytes,
    /// one from each of `srcs`, into `dst` back to back. With `after`, on the
    /// copy stream once that layer's mark is reached (later launches go on
    /// computing meanwhile); without, in order with everything queued.
    fn gather(&self, dst: &mut [u8], srcs: &[u64], after: Option<usize>) -> Result<(), CudaError>;
    /// Copies `src`, cut into `dsts.len()` equal pieces, one to each of
    /// `dsts`, in order with everything queued; `src` may be reused when this returns.
    fn scatter(&self, dsts: &[u64], src: &[u8]) -> Result<(), CudaError>;

    /// Starts recording launches on the stream instead of running them.
    /// Copies and waits are refused until [`Device::end_capture`].
    fn begin_capture(&self) -> Result<(), CudaError>;
    /// Stops recording; returns the launches since `begin_capture` as a graph
    /// ready to replay (a handle for [`Device::replay`] and [`Device::drop_graph`]).
    fn end_capture(&self) -> Result<u64, CudaError>;
    /// Queues every launch of the graph, in order, with the arguments they
    /// were recorded with.
    fn replay(&self, graph: u64) -> Result<(), CudaError>;
    /// Frees a graph of `end_capture`.
    fn drop_graph(&self, graph: u64);
}

/// Page-locked host memory for staging KV pieces.
struct PinnedBuf {
    ptr: *mut u8,
    bytes: usize,
}

impl PinnedBuf {
    fn alloc(bytes: usize) -> Result<Self, CudaError> {
        // SAFETY: a plain page-locked allocation in the current context.
        let ptr = unsafe { cu::malloc_host(bytes.max(1), 0) }
            .ctx(format!("allocating {bytes} pinned bytes"))?;
        Ok(Self {
            ptr: ptr.cast(),
            bytes,
        })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` holds `bytes` bytes, owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.bytes) }
    }
}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated by `malloc_host` and freed once.
        let _ = unsafe { cu::free_host(self.ptr.cast()) };
    }
}

/// Every kernel the backend launches, in `KERNEL_NAMES` order.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kernel {
    QuantizeQ8,
    MmQ4_0,
    MmQ4_1,
    MmQ8_0,
    MmF32,
    MmF16,
    MmBf16,
    Embed,
    RmsNorm,
    AddBias,
    AddInplace,
    SiluMul,
    Rope,
    KvWrite,
    GatherRows,
    ArgmaxLogprob,
    AttnDecode,
    AttnPrefill,
}

/// The `extern "C" __global__` names in kernels.cu, indexed by [`Kernel`].
pub(crate) const KERNEL_NAMES: [&str; 18] = [
    "quantize_q8",
    "mm_q4_0",
    "mm_q4_1",
    "mm_q8_0",
    "mm_f32",
    "mm_f16",
    "mm_bf16",
    "embed",
    "rms_norm",
    "add_bias",
    "add_inplace",
    "silu_mul",
    "rope",
    "kv_write",
    "gather_rows",
    "argmax_logprob",
    "attn_decode",
    "attn_prefill",
];

/// A kernel argument, passed by value.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg {
    /// A device pointer.
    P(sys::CUdeviceptr),
    I(i32),
    L(i64),
    F(f32),
}

impl Arg {
    /// The argument in an 8-byte slot: the kernel reads its own size from the
    /// start, which on a little-endian host is the low bytes.
    pub(crate) fn slot(self) -> u64 {
        match self {
            Arg::P(p) => p,
            Arg::I(i) => i as u32 as u64,
            Arg::L(l) => l as u64,
            Arg::F(f) => f.to_bits() as u64,
        }
    }
}

/// Grid of a matrix product: `MM_WARPS` rows per block, `MM_TOKENS` tokens per y.
pub(crate) fn mm_grid(rows: usize, n: usize) -> (u32, u32, u32) {
    (
        rows.div_ceil(MM_WARPS) as u32,
        n.div_ceil(MM_TOKENS) as u32,
        1,
    )
}

/// Blocks of `threads` covering `total` elements.
pub(crate) fn linear_grid(total: usize, threads: u32) -> (u32, u32, u32) {
    (total.div_ceil(threads as usize).max(1) as u32, 1, 1)
}

/// Dynamic shared memory of the prefill attention: K and V chunks in f16.
pub(crate) fn prefill_smem_bytes(head_dim: usize) -> u32 {
    (2 * ATTN_KEY_CHUNK * head_dim * 2) as u32
}

/// Checks what the kernels assume of a model.
pub(crate) fn check_supported(c: &ModelConfig) -> Result<(), CudaError> {
    let group = c.n_heads / c.n_kv_heads;
    if group > MAX_GROUP {
        return Err(CudaError::Unsupported(format!(
            "{group} query heads per KV head (at most {MAX_GROUP})"
        )));
    }
    if c.head_dim > MAX_LANE_ELEMS * 32 {
        return Err(CudaError::Unsupported(format!(
            "head_dim {} (at most {})",
            c.head_dim,
            MAX_LANE_ELEMS * 32
        )));
    }
    Ok(())
}

/// Where kernels run: the GPU's stream, or in tests the host emulation of
/// kernels.cu (`emulate`), which takes the same arguments.
pub(crate) trait Launch {
    /// Queues kernel `k` with `args` (each passed by value, in kernels.cu's order).
    fn launch(
        &self,
        k: Kernel,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &[Arg],
    ) -> Result<(), CudaError>;
}

impl Launch for Gpu {
    fn launch(
        &self,
        k: Kernel,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &[Arg],
    ) -> Result<(), CudaError> {
        self.launch_kernel(k, grid, block, smem, args)
    }
}

/// Checks a grid against the limits every device has.
fn check_grid(k: Kernel, grid: (u32, u32, u32)) -> Result<(), CudaError> {
    if grid.1 > 65_535 || grid.2 > 65_535 {
        return Err(CudaError::Batch(format!(
            "{} grid {grid:?} is beyond the device's limits",
            KERNEL_NAMES[k as usize]
        )));
    }
    Ok(())
}

/// An open GPU: context, streams and the compiled kernels.
pub(crate) struct Gpu {
    /// Page-locked bounce buffer for copies up to `STAGING_BYTES` (KV pieces,
    /// batch indices), allocated on first use.
    staging: RefCell<Option<PinnedBuf>>,
    /// Where every launch and ordered copy goes.
    stream: sys::CUstream,
    /// KV pieces copied out during a step, each after its layer's event.
    copy_stream: sys::CUstream,
    /// One event per layer, recorded by `mark`, created on first use.
    events: RefCell<Vec<sys::CUevent>>,
    module: sys::CUmodule,
    funcs: Vec<sys::CUfunction>,
    name: String,
    arch: u32,
    // Dropped last: everything above lives in this context.
    ctx: Arc<CudaContext>,
}

impl Gpu {
    /// Opens device `ordinal` and compiles the kernels for it.
    pub(crate) fn open(ordinal: usize) -> Result<Self, CudaError> {
        probe(ordinal)?;
        let ctx =
            CudaContext::new(ordinal).ctx(format!("creating a context on device {ordinal}"))?;
        let (major, minor) = ctx
            .compute_capability()
            .ctx("reading the compute capability")?;
        if (major, minor) < (6, 1) {
            return Err(CudaError::Unsupported(format!(
                "compute capability {major}.{minor} (dp4a needs 6.1 or newer)"
            )));
        }
        let arch = (major * 10 + minor) as u32;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let nvrtc = nvrtc::Nvrtc::open()?;
        let (vmaj, vmin) = nvrtc.version()?;
        let started = std::time::Instant::now();
        let cubin = nvrtc.compile_cubin(KERNELS_CU, arch)?;
        tracing::info!(
            device = %name,
            arch = format!("sm_{arch}"),
            nvrtc = format!("{vmaj}.{vmin} ({})", nvrtc.path.display()),
            compile_ms = started.elapsed().as_millis() as u64,
            "compiled the CUDA kernels"
        );
        // SAFETY: `cubin` is a complete CUBIN image from NVRTC; the context is current.
        let module = unsafe { cu::module::load_data(cubin.as_ptr().cast()) }
            .ctx("loading the compiled kernels")?;
        let mut funcs = Vec::with_capacity(KERNEL_NAMES.len());
        for n in KERNEL_NAMES {
            let c = CString::new(n).expect("kernel names contain no NUL");
            // SAFETY: `module` was loaded above.
            let f = unsafe { cu::module::get_function(module, c) }
                .ctx(format!("finding kernel {n}"))?;
            funcs.push(f);
        }
        let stream =
            cu::stream::create(cu::stream::StreamKind::NonBlocking).ctx("creating a stream")?;
        let copy_stream = cu::stream::create(cu::stream::StreamKind::NonBlocking)
            .ctx("creating the copy stream")?;
        Ok(Self {
            staging: RefCell::new(None),
            stream,
            copy_stream,
            events: RefCell::new(Vec::new()),
            module,
            funcs,
            name,
            arch,
            ctx,
        })
    }

    /// Queues kernel `k` on the stream.
    fn launch_kernel(
        &self,
        k: Kernel,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &[Arg],
    ) -> Result<(), CudaError> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        check_grid(k, grid)?;
        let mut slots: Vec<u64> = args.iter().map(|a| a.slot()).collect();
        let mut params: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| (s as *mut u64).cast::<c_void>())
            .collect();
        // SAFETY: the function comes from our module, and `args` match the
        // kernel's parameter list in kernels.cu (the callers below are the only
        // launch sites, one per kernel).
        unsafe {
            cu::launch_kernel(
                self.funcs[k as usize],
                grid,
                (block, 1, 1),
                smem,
                self.stream,
                &mut params,
            )
        }
        .ctx(format!("launching {}", KERNEL_NAMES[k as usize]))
    }

    fn stream_sync(&self) -> Result<(), CudaError> {
        // SAFETY: the stream belongs to this context.
        unsafe { cu::stream::synchronize(self.stream) }.ctx("waiting for the stream")
    }

    /// Layer `layer`'s event, creating the events up to it.
    fn event(&self, layer: usize) -> Result<sys::CUevent, CudaError> {
        let mut events = self.events.borrow_mut();
        while events.len() <= layer {
            let e = cu::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
                .ctx("creating an event")?;
            events.push(e);
        }
        Ok(events[layer])
    }

    /// Runs `f` on the first `bytes` of the pinned staging buffer.
    fn with_staging<R>(
        &self,
        bytes: usize,
        f: impl FnOnce(&mut [u8]) -> Result<R, CudaError>,
    ) -> Result<R, CudaError> {
        let mut slot = self.staging.borrow_mut();
        if slot.is_none() {
            *slot = Some(PinnedBuf::alloc(STAGING_BYTES)?);
        }
        let Some(buf) = slot.as_mut() else {
            return Err(CudaError::Batch("no staging buffer".into()));
        };
        f(&mut buf.as_mut_slice()[..bytes])
    }
}

/// Copies up to this size go through the pinned staging buffer.
const STAGING_BYTES: usize = 4 << 20;

impl Device for Gpu {
    fn alloc(&self, bytes: usize) -> Result<u64, CudaError> {
        // SAFETY: a plain allocation in the current context.
        unsafe { cu::malloc_sync(bytes.max(256)) }.ctx(format!("allocating {bytes} bytes"))
    }

    fn free(&self, ptr: u64) {
        // A failure here (a dead context) leaves nothing to recover.
        let _ = self.bind();
        // SAFETY: allocated by `alloc` and freed once.
        let _ = unsafe { cu::free_sync(ptr) };
    }

    fn htod(&self, dst: u64, src: &[u8]) -> Result<(), CudaError> {
        self.scatter(&[dst], src)
    }

    fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<(), CudaError> {
        self.gather(dst, &[src], None)
    }

    fn zero(&self, dst: u64, bytes: usize) -> Result<(), CudaError> {
        self.stream_sync()?;
        // SAFETY: the caller's `dst` holds `bytes` bytes.
        unsafe { cu::memset_d8_sync(dst, 0, bytes) }.ctx(format!("clearing {bytes} bytes"))
    }

    fn sync(&self) -> Result<(), CudaError> {
        self.stream_sync()
    }

    fn bind(&self) -> Result<(), CudaError> {
        self.ctx.bind_to_thread().ctx("making the context current")
    }

    fn describe(&self) -> String {
        format!("{}, sm_{}", self.name, self.arch)
    }

    fn mark(&self, layer: usize) -> Result<(), CudaError> {
        let e = self.event(layer)?;
        // SAFETY: the event and the stream belong to this context.
        unsafe { cu::event::record(e, self.stream) }.ctx("recording a layer's event")
    }

    fn gather(&self, dst: &mut [u8], srcs: &[u64], after: Option<usize>) -> Result<(), CudaError> {
        if srcs.is_empty() || dst.is_empty() {
            return Ok(());
        }
        let piece = (dst.len() / srcs.len()).max(1);
        let stream = match after {
            Some(layer) => {
                let e = self.event(layer)?;
                // SAFETY: both belong to this context; the event was recorded
                // by `mark` earlier in this step.
                unsafe {
                    cu::stream::wait_event(
                        self.copy_stream,
                        e,
                        sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                    )
                }
                .ctx("ordering a copy after its layer")?;
                self.copy_stream
            }
            None => self.stream,
        };
        let copy = |buf: &mut [u8], srcs: &[u64]| {
            for (slot, &src) in buf.chunks_mut(piece).zip(srcs) {
                // SAFETY: each source holds `piece` bytes (the caller's pool
                // offsets); the buffer is waited for below.
                unsafe { cu::memcpy_dtoh_async(slot, src, stream) }
                    .ctx(format!("copying {piece} bytes out"))?;
            }
            // SAFETY: the stream belongs to this context.
            unsafe { cu::stream::synchronize(stream) }.ctx("waiting for KV copies")
        };
        let per_batch = (STAGING_BYTES / piece).max(1);
        for (out, srcs) in dst
            .chunks_mut(per_batch * piece)
            .zip(srcs.chunks(per_batch))
        {
            if out.len() <= STAGING_BYTES {
                self.with_staging(out.len(), |buf| {
                    copy(buf, srcs)?;
                    out.copy_from_slice(buf);
                    Ok(())
                })?;
            } else {
                // One piece larger than the staging buffer: straight into pageable memory.
                copy(out, srcs)?;
            }
        }
        Ok(())
    }

    fn scatter(&self, dsts: &[u64], src: &[u8]) -> Result<(), CudaError> {
        if dsts.is_empty() || src.is_empty() {
            return Ok(());
        }
        let piece = (src.len() / dsts.len()).max(1);
        if piece > STAGING_BYTES {
            // Pieces larger than the staging buffer go from pageable memory.
            self.stream_sync()?;
            for (&dst, p) in dsts.iter().zip(src.chunks(piece)) {
                // SAFETY: each destination holds `piece` bytes.
                unsafe { cu::memcpy_htod_sync(dst, p) }.ctx(format!("copying {piece} bytes in"))?;
            }
            return Ok(());
        }
        let per_batch = STAGING_BYTES / piece;
        for (dsts, src) in dsts.chunks(per_batch).zip(src.chunks(per_batch * piece)) {
            self.with_staging(src.len(), |buf| {
                buf.copy_from_slice(src);
                for (&dst, slot) in dsts.iter().zip(buf.chunks(piece)) {
                    // SAFETY: each destination holds `piece` bytes (the
                    // caller's pool offsets); the staging buffer is
                    // page-locked and waited for below.
                    unsafe { cu::memcpy_htod_async(dst, slot, self.stream) }
                        .ctx(format!("copying {piece} bytes in"))?;
                }
                self.stream_sync()
            })?;
        }
        Ok(())
    }

    fn begin_capture(&self) -> Result<(), CudaError> {
        // SAFETY: the stream belongs to this context; thread-local mode lets
        // other threads' driver calls go on while this one records.
        unsafe {
            cu::stream::begin_capture(
                self.stream,
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
        }
        .ctx("starting a graph capture")
    }

    fn end_capture(&self) -> Result<u64, CudaError> {
        // SAFETY: ends the capture `begin_capture` started on this stream.
        let graph =
            unsafe { cu::stream::end_capture(self.stream) }.ctx("ending a graph capture")?;
        // SAFETY: `graph` is the complete graph just captured; it is destroyed
        // once instantiated (the executable graph does not depend on it).
        let exec = unsafe {
            let exec = cu::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0));
            let _ = cu::graph::destroy(graph);
            exec
        }
        .ctx("instantiating a captured graph")?;
        Ok(exec as usize as u64)
    }

    fn replay(&self, graph: u64) -> Result<(), CudaError> {
        // SAFETY: `graph` is an executable graph of `end_capture`, not yet dropped.
        unsafe { cu::graph::launch(graph as usize as sys::CUgraphExec, self.stream) }
            .ctx("launching a graph")
    }

    fn drop_graph(&self, graph: u64) {
        let _ = self.bind();
        // SAFETY: as in `replay`; dropped once.
        let _ = unsafe { cu::graph::exec_destroy(graph as usize as sys::CUgraphExec) };
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        if self.bind().is_ok() {
            self.staging.borrow_mut().take();
            // SAFETY: created in this context and destroyed once.
            unsafe {
                for e in self.events.borrow_mut().drain(..) {
                    let _ = cu::event::destroy(e);
                }
                let _ = cu::stream::destroy(self.copy_stream);
                let _ = cu::stream::destroy(self.stream);
                let _ = cu::module::unload(self.module);
            }
        }
    }
}

/// `out = W x` for `n` rows of `x` (f32, `w.cols` wide). Quantized weights
/// first quantize `x` into `q8` (room for `n * cols / 32` blocks); `q8_of`
/// remembers which input `q8` holds, so q, k and v (and gate and up) quantize
/// their shared input once. Callers reset it when that input is rewritten.
fn matmul(
    gpu: &dyn Launch,
    q8: u64,
    w: WeightRef,
    x: u64,
    n: usize,
    out: u64,
    q8_of: &mut Option<u64>,
) -> Result<(), CudaError> {
    let grid = mm_grid(w.rows, n);
    let block = (MM_WARPS * 32) as u32;
    let (k, input) = match w.ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => {
            if *q8_of != Some(x) {
                let blocks = n * w.cols / 32;
                gpu.launch(
                    Kernel::QuantizeQ8,
                    linear_grid(blocks * 32, ROW_THREADS),
                    ROW_THREADS,
                    0,
                    &[Arg::P(x), Arg::P(q8), Arg::I(blocks as i32)],
                )?;
                *q8_of = Some(x);
            }
            let k = match w.ty {
                GgmlType::Q4_0 => Kernel::MmQ4_0,
                GgmlType::Q4_1 => Kernel::MmQ4_1,
                _ => Kernel::MmQ8_0,
            };
            (k, q8)
        }
        GgmlType::F32 => (Kernel::MmF32, x),
        GgmlType::F16 => (Kernel::MmF16, x),
        GgmlType::BF16 => (Kernel::MmBf16, x),
    };
    gpu.launch(
        k,
        grid,
        block,
        0,
        &[
            Arg::P(w.ptr),
            Arg::P(input),
            Arg::P(out),
            Arg::I(w.rows as i32),
            Arg::I(w.cols as i32),
            Arg::I(n as i32),
        ],
    )
}

/// A weight matrix's place on the device and its shape.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WeightRef {
    pub ptr: u64,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
}

/// Bytes per row of a device matrix.
fn row_bytes(m: &DevMatrix) -> Result<usize, CudaError> {
    m.ty.row_bytes(m.cols)
        .ok_or_else(|| CudaError::Unsupported(format!("{} columns of {}", m.cols, m.ty.name())))
}

/// A weight matrix in device memory, in its GGUF encoding.
struct DevMatrix {
    buf: DeviceBuf,
    ty: GgmlType,
    rows: usize,
    cols: usize,
}

impl DevMatrix {
    fn weight(&self) -> WeightRef {
        WeightRef {
            ptr: self.buf.ptr,
            ty: self.ty,
            rows: self.rows,
            cols: self.cols,
        }
    }

    fn upload(dev: &Rc<dyn Device>, m: &QMatrix<'_>, what: &str) -> Result<Self, CudaError> {
        Ok(Self {
            buf: DeviceBuf::upload(dev, m.data, what)?,
            ty: m.ty,
            rows: m.rows,
            cols: m.cols,
        })
    }
}

struct DevLayer {
    attn_norm: DeviceBuf,
    wq: DevMatrix,
    wk: DevMatrix,
    wv: DevMatrix,
    wo: DevMatrix,
    bias: Option<[DeviceBuf; 3]>,
    ffn_norm: DeviceBuf,
    w_gate: DevMatrix,
    w_up: DevMatrix,
    w_down: DevMatrix,
}

/// Activation buffers for up to `tokens` rows and `logit_rows` logits rows.
struct Activations {
    tokens: usize,
    logit_rows: usize,
    x: DeviceBuf,
    xn: DeviceBuf,
    q: DeviceBuf,
    k: DeviceBuf,
    v: DeviceBuf,
    attn: DeviceBuf,
    proj: DeviceBuf,
    gate: DeviceBuf,
    up: DeviceBuf,
    act: DeviceBuf,
    /// Quantized activations of the widest input.
    acts_q8: DeviceBuf,
    last: DeviceBuf,
    last_norm: DeviceBuf,
    logits: DeviceBuf,
    /// Greedy picks: `logit_rows` token ids, then as many log-probabilities.
    picked: DeviceBuf,
}

impl Activations {
    fn alloc(
        dev: &Rc<dyn Device>,
        c: &ModelConfig,
        tokens: usize,
        logit_rows: usize,
    ) -> Result<Self, CudaError> {
        let f = |elems: usize, what: &str| DeviceBuf::alloc(dev, elems * 4, what);
        let (d, q_dim, kv_dim) = (c.d_model, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        let widest = d.max(q_dim).max(c.ffn_dim);
        Ok(Self {
            tokens,
            logit_rows,
            x: f(tokens * d, "activations")?,
            xn: f(tokens * d, "activations")?,
            q: f(tokens * q_dim, "queries")?,
            k: f(tokens * kv_dim, "keys")?,
            v: f(tokens * kv_dim, "values")?,
            attn: f(tokens * q_dim, "attention output")?,
            proj: f(tokens * d, "projections")?,
            gate: f(tokens * c.ffn_dim, "ffn gate")?,
            up: f(tokens * c.ffn_dim, "ffn up")?,
            act: f(tokens * c.ffn_dim, "ffn activations")?,
            acts_q8: DeviceBuf::alloc(
                dev,
                tokens * widest.div_ceil(32) * Q8_ACT_BYTES,
                "quantized activations",
            )?,
            last: f(logit_rows * d, "last rows")?,
            last_norm: f(logit_rows * d, "last rows")?,
            logits: f(logit_rows * c.vocab_size, "logits")?,
            picked: f(2 * logit_rows, "greedy picks")?,
        })
    }
}

/// The batch's index arrays in one device buffer.
struct IndexBuf {
    buf: DeviceBuf,
    ptrs: IndexPtrs,
}

/// Where each of the batch's index arrays starts on the device.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct IndexPtrs {
    tokens: u64,
    pos: u64,
    kv_dst: u64,
    table_off: u64,
    tables: u64,
    decode: u64,
    tiles: u64,
    logit_rows: u64,
}

impl IndexPtrs {
    /// The arrays of `index_bytes`'s layout, uploaded at `base`.
    pub(crate) fn at(base: u64, offs: [usize; 8]) -> Self {
        let [
            tokens,
            pos,
            kv_dst,
            table_off,
            tables,
            decode,
            tiles,
            logit_rows,
        ] = offs.map(|o| base + o as u64);
        Self {
            tokens,
            pos,
            kv_dst,
            table_off,
            tables,
            decode,
            tiles,
            logit_rows,
        }
    }
}

/// Lays the packed arrays out back to back, each 8-byte aligned; returns the
/// bytes and each array's offset, in `IndexBuf` field order. The block
/// tables go last: every other array's length, and so every offset, follows
/// from the numbers of rows and logit rows alone, which is what lets a
/// captured decode step replay with new indices (see [`Graphs`]).
pub(crate) fn index_bytes(p: &PackedBatch) -> (Vec<u8>, [usize; 8]) {
    let mut bytes = Vec::new();
    let mut offs = [0usize; 8];
    let mut put = |i: usize, data: &[u8]| {
        bytes.resize(bytes.len().next_multiple_of(8), 0);
        offs[i] = bytes.len();
        bytes.extend_from_slice(data);
    };
    put(0, bytemuck::cast_slice(&p.tokens));
    put(1, bytemuck::cast_slice(&p.pos));
    put(2, bytemuck::cast_slice(&p.kv_dst));
    put(3, bytemuck::cast_slice(&p.table_off));
    put(5, bytemuck::cast_slice(&p.decode));
    put(6, bytemuck::cast_slice(&p.tiles));
    put(7, bytemuck::cast_slice(&p.logit_rows));
    put(4, bytemuck::cast_slice(&p.tables));
    (bytes, offs)
}

/// Uploads the packed batch's index arrays in one copy into `slot`, growing it
/// (which `grew` records); returns where they are and their offsets.
fn upload_index(
    dev: &Rc<dyn Device>,
    slot: &mut Option<IndexBuf>,
    p: &PackedBatch,
    grew: &mut bool,
) -> Result<(IndexPtrs, [usize; 8]), CudaError> {
    let (bytes, offs) = index_bytes(p);
    if slot.as_ref().is_none_or(|i| i.buf.bytes < bytes.len()) {
        *grew = true;
        *slot = None;
        *slot = Some(IndexBuf {
            buf: DeviceBuf::alloc(
                dev,
                bytes.len().next_power_of_two().max(4096),
                "batch indices",
            )?,
            ptrs: IndexPtrs::default(),
        });
    }
    let Some(ix) = slot.as_mut() else {
        return Err(CudaError::Batch("index buffer missing".into()));
    };
    ix.ptrs = IndexPtrs::at(ix.buf.ptr, offs);
    dev.htod(ix.buf.ptr, &bytes)?;
    Ok((ix.ptrs, offs))
}

/// Set to `0` to run every step launch by launch, without CUDA graphs.
pub const GRAPHS_ENV: &str = "TANDEM_CUDA_GRAPHS";
/// Captured step shapes kept at once (each a few hundred graph nodes).
const MAX_GRAPHS: usize = 64;

/// A captured step, replayable on its device.
struct Graph {
    dev: Rc<dyn Device>,
    handle: u64,
}

impl Drop for Graph {
    fn drop(&mut self) {
        self.dev.drop_graph(self.handle);
    }
}

/// What a captured step's launches depend on, besides the buffers'
/// addresses: the rows, the logit rows, where each index array starts, and
/// whether the step ends in greedy picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct GraphKey {
    rows: usize,
    logit_rows: usize,
    offs: [usize; 8],
    greedy: bool,
}

/// Decode steps captured as CUDA graphs.
///
/// A step in which every sequence computes one token and no KV stream reads
/// layers out launches the same kernels with the same arguments whenever it
/// has the same numbers of rows and logit rows: everything that differs per
/// sequence and per step (token ids, positions, block tables, where K/V go,
/// how far attention reads) is read by the kernels from the index buffer,
/// whose arrays sit at offsets those two numbers fix. So the first such step
/// of each shape is captured, and later ones upload their indices and replay
/// it: one launch in place of a dozen per layer, which is most of a decode
/// step's time for a small model. Growing the activation or index buffers
/// moves what the graphs point at, so it empties the cache.
struct Graphs {
    enabled: bool,
    entries: Vec<(GraphKey, Graph, u64)>,
    /// Steps replayed so far, which also orders the entries by last use.
    replayed: u64,
    captured: u64,
}

impl Graphs {
    fn new(enabled: bool) -> Self {
        Self {
            enabled,
            entries: Vec::new(),
            replayed: 0,
            captured: 0,
        }
    }

    fn get(&mut self, key: &GraphKey) -> Option<u64> {
        let now = self.replayed;
        let (_, g, used) = self.entries.iter_mut().find(|(k, _, _)| k == key)?;
        *used = now;
        Some(g.handle)
    }

    /// Keeps `graph` for `key`, dropping the least recently used beyond `MAX_GRAPHS`.
    fn insert(&mut self, key: GraphKey, graph: Graph) -> u64 {
        if self.entries.len() >= MAX_GRAPHS
            && let Some(oldest) = (0..self.entries.len()).min_by_key(|&i| self.entries[i].2)
        {
            self.entries.swap_remove(oldest);
        }
        let handle = graph.handle;
        self.entries.push((key, graph, self.replayed));
        self.captured += 1;
        handle
    }
}

/// Rotates the `n_heads` heads of each of the `n` rows of `x` by its position.
fn rope(
    gpu: &dyn Launch,
    c: &ModelConfig,
    inv_freq: u64,
    x: u64,
    n_heads: usize,
    ix: &IndexPtrs,
    n: usize,
) -> Result<(), CudaError> {
    gpu.launch(
        Kernel::Rope,
        (n as u32, 1, 1),
        ROW_THREADS,
        0,
        &[
            Arg::P(x),
            Arg::P(ix.pos),
            Arg::P(inv_freq),
            Arg::I(n_heads as i32),
            Arg::I(c.head_dim as i32),
            Arg::I((c.rope_dim / 2) as i32),
            Arg::I(i32::from(c.arch == Arch::Qwen2)),
        ],
    )
}

/// Writes the `n` rows of `k` and `v` into their slots of `layer` in the pool.
#[allow(clippy::too_many_arguments)]
fn kv_write(
    gpu: &dyn Launch,
    layout: &KvLayout,
    k: u64,
    v: u64,
    pool: u64,
    ix: &IndexPtrs,
    n: usize,
    layer: usize,
) -> Result<(), CudaError> {
    gpu.launch(
        Kernel::KvWrite,
        (n as u32, 1, 1),
        ROW_THREADS,
        0,
        &[
            Arg::P(k),
            Arg::P(v),
            Arg::P(pool),
            Arg::P(ix.kv_dst),
            Arg::L((layer * layout.piece_elems()) as i64),
            Arg::L(layout.half_elems() as i64),
            Arg::I((layout.n_kv_heads * layout.head_dim) as i32),
        ],
    )
}

/// Causal paged attention of every row of `q` over its sequence's K/V in
/// `layer` of the pool, into `out`: the decode kernel for one-token chunks,
/// the prefill kernel for the tiles of longer ones.
#[allow(clippy::too_many_arguments)]
fn attention(
    gpu: &dyn Launch,
    c: &ModelConfig,
    layout: &KvLayout,
    q: u64,
    pool: u64,
    out: u64,
    ix: &IndexPtrs,
    p: &PackedBatch,
    layer: usize,
) -> Result<(), CudaError> {
    let common = |list: u64| {
        [
            Arg::P(q),
            Arg::P(pool),
            Arg::P(out),
            Arg::P(list),
            Arg::P(ix.pos),
            Arg::P(ix.table_off),
            Arg::P(ix.tables),
            Arg::L((layer * layout.piece_elems()) as i64),
            Arg::L(layout.block_elems() as i64),
            Arg::L(layout.half_elems() as i64),
            Arg::I(layout.block_size as i32),
            Arg::I(c.n_heads as i32),
            Arg::I(c.n_kv_heads as i32),
            Arg::I(c.head_dim as i32),
            Arg::F(1.0 / (c.head_dim as f32).sqrt()),
        ]
    };
    if !p.decode.is_empty() {
        gpu.launch(
            Kernel::AttnDecode,
            (c.n_kv_heads as u32, p.decode.len() as u32, 1),
            (ATTN_DECODE_WARPS * 32) as u32,
            0,
            &common(ix.decode),
        )?;
    }
    if p.n_tiles() > 0 {
        gpu.launch(
            Kernel::AttnPrefill,
            (c.n_kv_heads as u32, p.n_tiles() as u32, 1),
            (ATTN_PREFILL_TOKENS * 32) as u32,
            prefill_smem_bytes(c.head_dim),
            &common(ix.tiles),
        )?;
    }
    Ok(())
}

/// The GPU backend: weights and the KV pool in device memory.
pub struct CudaBackend {
    config: ModelConfig,
    layout: KvLayout,
    num_blocks: usize,
    ordinal: usize,
    token_embd: DevMatrix,
    /// `None` when tied to the embeddings.
    output: Option<DevMatrix>,
    output_norm: DeviceBuf,
    inv_freq: DeviceBuf,
    layers: Vec<DevLayer>,
    pool: DeviceBuf,
    acts: Option<Activations>,
    index: Option<IndexBuf>,
    graphs: Graphs,
    /// The GPU (every buffer above holds it too, so it goes last).
    dev: Rc<dyn Device>,
}

// SAFETY: the raw driver handles inside (stream, module, functions, pointers)
// are valid from any thread once their context is current, and every method
// binds the context first; the backend is used by one thread at a time
// (`Backend` takes `&mut self` to step, and is not `Sync`). Every `Rc` of the
// device is inside the backend (its buffers' and its own), so they all move
// to another thread together and none is touched from two threads.
unsafe impl Send for CudaBackend {}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("device", &self.dev.describe())
            .field("layout", &self.layout)
            .field("num_blocks", &self.num_blocks)
            .finish()
    }
}

impl CudaBackend {
    /// Opens GPU `ordinal`, uploads `model`'s weights and allocates `num_blocks`
    /// KV blocks of `block_size` tokens in device memory.
    pub fn new(
        model: Model,
        block_size: usize,
        num_blocks: usize,
        ordinal: usize,
    ) -> Result<Self, CudaError> {
        check_supported(model.config())?;
        let dev: Rc<dyn Device> = Rc::new(Gpu::open(ordinal)?);
        let mut backend = Self::with_device(model, block_size, num_blocks, ordinal, dev)?;
        backend.graphs.enabled = std::env::var(GRAPHS_ENV).map_or(true, |v| v != "0");
        if !backend.graphs.enabled {
            tracing::info!("CUDA graphs off ({GRAPHS_ENV}=0)");
        }
        Ok(backend)
    }

    /// The backend on `dev` (the GPU, or in tests the emulation).
    pub(crate) fn with_device(
        model: Model,
        block_size: usize,
        num_blocks: usize,
        ordinal: usize,
        dev: Rc<dyn Device>,
    ) -> Result<Self, CudaError> {
        let config = model.config().clone();
        check_supported(&config)?;
        dev.bind()?;
        let layout = config.kv_layout(block_size);
        let started = std::time::Instant::now();
        let token_embd = DevMatrix::upload(&dev, &model.token_embd(), "token_embd.weight")?;
        let output = {
            let (e, o) = (model.token_embd(), model.output());
            if std::ptr::eq(e.data.as_ptr(), o.data.as_ptr()) {
                None
            } else {
                Some(DevMatrix::upload(&dev, &o, "output.weight")?)
            }
        };
        let mut layers = Vec::with_capacity(config.n_layers);
        for (l, layer) in model.layers().iter().enumerate() {
            let m =
                |w, name: &str| DevMatrix::upload(&dev, &model.mat(w), &format!("blk.{l}.{name}"));
            let v = |x: &[f32], name: &str| DeviceBuf::upload(&dev, x, &format!("blk.{l}.{name}"));
            layers.push(DevLayer {
                attn_norm: v(&layer.attn_norm, "attn_norm")?,
                wq: m(&layer.wq, "attn_q")?,
                wk: m(&layer.wk, "attn_k")?,
                wv: m(&layer.wv, "attn_v")?,
                wo: m(&layer.wo, "attn_output")?,
                bias: match &layer.bias {
                    None => None,
                    Some([bq, bk, bv]) => Some([
                        v(bq, "attn_q.bias")?,
                        v(bk, "attn_k.bias")?,
                        v(bv, "attn_v.bias")?,
                    ]),
                },
                ffn_norm: v(&layer.ffn_norm, "ffn_norm")?,
                w_gate: m(&layer.w_gate, "ffn_gate")?,
                w_up: m(&layer.w_up, "ffn_up")?,
                w_down: m(&layer.w_down, "ffn_down")?,
            });
        }
        let output_norm = DeviceBuf::upload(&dev, model.output_norm(), "output_norm")?;
        let inv_freq = DeviceBuf::upload(&dev, model.inv_freq(), "rope frequencies")?;
        let pool_bytes = num_blocks
            .checked_mul(layout.block_bytes())
            .ok_or_else(|| CudaError::Unsupported("KV pool size overflows".into()))?;
        let pool = DeviceBuf::alloc(&dev, pool_bytes, "the KV pool")?;
        dev.zero(pool.ptr, pool_bytes)?;
        tracing::info!(
            device = %dev.describe(),
            weights_mb = (model.weight_bytes_per_token() >> 20) as u64,
            kv_pool_mb = (pool_bytes >> 20) as u64,
            upload_ms = started.elapsed().as_millis() as u64,
            "CUDA backend ready"
        );
        Ok(Self {
            config,
            layout,
            num_blocks,
            ordinal,
            token_embd,
            output,
            output_norm,
            inv_freq,
            layers,
            pool,
            acts: None,
            index: None,
            graphs: Graphs::new(true),
            dev,
        })
    }

    /// Grows the activation buffers to hold `tokens` rows and `logit_rows`
    /// logits (which `grew` records).
    fn reserve(
        &mut self,
        tokens: usize,
        logit_rows: usize,
        grew: &mut bool,
    ) -> Result<(), CudaError> {
        let fits = self
            .acts
            .as_ref()
            .is_some_and(|a| a.tokens >= tokens && a.logit_rows >= logit_rows);
        if !fits {
            *grew = true;
            let (t, r) = match &self.acts {
                Some(a) => (a.tokens.max(tokens), a.logit_rows.max(logit_rows)),
                None => (tokens, logit_rows),
            };
            self.acts = None;
            self.acts = Some(Activations::alloc(
                &self.dev,
                &self.config,
                t.next_power_of_two().max(16),
                r.next_power_of_two().max(8),
            )?);
        }
        Ok(())
    }

    fn rms_norm(&self, x: u64, w: u64, out: u64, rows: usize) -> Result<(), CudaError> {
        self.dev.launch(
            Kernel::RmsNorm,
            (rows as u32, 1, 1),
            ROW_THREADS,
            0,
            &[
                Arg::P(x),
                Arg::P(w),
                Arg::P(out),
                Arg::I(self.config.d_model as i32),
                Arg::F(self.config.rms_eps),
            ],
        )
    }

    fn elementwise(&self, k: Kernel, args: &[Arg], total: usize) -> Result<(), CudaError> {
        self.dev
            .launch(k, linear_grid(total, ROW_THREADS), ROW_THREADS, 0, args)
    }

    /// Runs a step, its output (logits, or greedy picks) left on the device;
    /// returns how many rows of output it has.
    fn forward_inner(
        &mut self,
        batch: &[BatchSeq<'_>],
        on_layer: Option<LayerHook<'_>>,
        greedy: bool,
    ) -> Result<usize, CudaError> {
        self.dev.bind()?;
        let p = pack(batch, self.layout, self.num_blocks)?;
        let n = p.n_tokens();
        if n == 0 {
            return Ok(0);
        }
        let n_logits = p.logit_rows.len();
        let mut grew = false;
        self.reserve(n, n_logits, &mut grew)?;
        let (ix, offs) = upload_index(&self.dev, &mut self.index, &p, &mut grew)?;
        if grew {
            self.graphs.entries.clear();
        }
        if on_layer.is_none() && p.n_tiles() == 0 && self.graphs.enabled {
            let key = GraphKey {
                rows: n,
                logit_rows: n_logits,
                offs,
                greedy,
            };
            let handle = match self.graphs.get(&key) {
                Some(h) => h,
                None => {
                    self.dev.begin_capture()?;
                    let queued = self.queue_step(&p, &ix, None, greedy);
                    // Ended whatever happened, so the stream takes work
                    // again; a graph cut short is freed on the way out.
                    let graph = self.dev.end_capture().map(|handle| Graph {
                        dev: self.dev.clone(),
                        handle,
                    });
                    queued?;
                    let graph = graph?;
                    tracing::debug!(rows = n, logit_rows = n_logits, "captured a decode step");
                    self.graphs.insert(key, graph)
                }
            };
            self.dev.replay(handle)?;
            self.graphs.replayed += 1;
        } else {
            self.queue_step(&p, &ix, on_layer, greedy)?;
        }
        if n_logits == 0 {
            // Nothing to read back, but the step's K/V must be in place before
            // the engine hands its blocks to anyone.
            self.dev.sync()?;
        }
        Ok(n_logits)
    }

    /// The step's `rows` rows of logits (a copy waits for the step).
    fn read_logits(&self, rows: usize) -> Result<Vec<f32>, CudaError> {
        let (Some(a), true) = (self.acts.as_ref(), rows > 0) else {
            return Ok(Vec::new());
        };
        let mut logits = vec![0f32; rows * self.config.vocab_size];
        self.dev
            .dtoh(bytemuck::cast_slice_mut(&mut logits), a.logits.ptr)?;
        Ok(logits)
    }

    /// The step's `rows` greedy picks, in one copy of 8 bytes a row.
    fn read_picked(&self, rows: usize) -> Result<Vec<(u32, f32)>, CudaError> {
        let (Some(a), true) = (self.acts.as_ref(), rows > 0) else {
            return Ok(Vec::new());
        };
        let cap = a.logit_rows;
        let mut both = vec![0u32; 2 * cap];
        self.dev
            .dtoh(bytemuck::cast_slice_mut(&mut both), a.picked.ptr)?;
        let (ids, logprobs) = both.split_at(cap);
        Ok(ids[..rows]
            .iter()
            .zip(&logprobs[..rows])
            .map(|(&id, &lp)| (id, f32::from_bits(lp)))
            .collect())
    }

    /// Queues the launches of one step, through the logits of the rows that
    /// want them (and with `greedy`, their picks); `on_layer` runs for layer
    /// `l` once layer `l + 1`'s launches are queued (the last layer's after
    /// the logits'), its reads waiting on the copy stream for layer `l`'s
    /// mark while the GPU goes on.
    fn queue_step(
        &self,
        p: &PackedBatch,
        ix: &IndexPtrs,
        mut on_layer: Option<LayerHook<'_>>,
        greedy: bool,
    ) -> Result<(), CudaError> {
        let n = p.n_tokens();
        let n_logits = p.logit_rows.len();
        let Some(a) = self.acts.as_ref() else {
            return Err(CudaError::Batch("buffers missing after reserve".into()));
        };
        let c = &self.config;
        let (d, hd) = (c.d_model, c.head_dim);
        let (q_dim, kv_dim) = (c.n_heads * hd, c.n_kv_heads * hd);

        let embd = &self.token_embd;
        self.dev.launch(
            Kernel::Embed,
            (n as u32, 1, 1),
            ROW_THREADS,
            0,
            &[
                Arg::P(embd.buf.ptr),
                Arg::I(embd.ty.id() as i32),
                Arg::L(row_bytes(embd)? as i64),
                Arg::P(ix.tokens),
                Arg::P(a.x.ptr),
                Arg::I(d as i32),
                Arg::I(c.vocab_size as i32),
            ],
        )?;

        for (l, layer) in self.layers.iter().enumerate() {
            self.rms_norm(a.x.ptr, layer.attn_norm.ptr, a.xn.ptr, n)?;
            let mut q8_of = None;
            matmul(
                &*self.dev,
                a.acts_q8.ptr,
                layer.wq.weight(),
                a.xn.ptr,
                n,
                a.q.ptr,
                &mut q8_of,
            )?;
            matmul(
                &*self.dev,
                a.acts_q8.ptr,
                layer.wk.weight(),
                a.xn.ptr,
                n,
                a.k.ptr,
                &mut q8_of,
            )?;
            matmul(
                &*self.dev,
                a.acts_q8.ptr,
                layer.wv.weight(),
                a.xn.ptr,
                n,
                a.v.ptr,
                &mut q8_of,
            )?;
            if let Some([bq, bk, bv]) = &layer.bias {
                for (x, b, dim) in [(&a.q, bq, q_dim), (&a.k, bk, kv_dim), (&a.v, bv, kv_dim)] {
                    self.elementwise(
                        Kernel::AddBias,
                        &[
                            Arg::P(x.ptr),
                            Arg::P(b.ptr),
                            Arg::L((n * dim) as i64),
                            Arg::I(dim as i32),
                        ],
                        n * dim,
                    )?;
                }
            }
            rope(&*self.dev, c, self.inv_freq.ptr, a.q.ptr, c.n_heads, ix, n)?;
            rope(
                &*self.dev,
                c,
                self.inv_freq.ptr,
                a.k.ptr,
                c.n_kv_heads,
                ix,
                n,
            )?;
            kv_write(
                &*self.dev,
                &self.layout,
                a.k.ptr,
                a.v.ptr,
                self.pool.ptr,
                ix,
                n,
                l,
            )?;
            attention(
                &*self.dev,
                c,
                &self.layout,
                a.q.ptr,
                self.pool.ptr,
                a.attn.ptr,
                ix,
                p,
                l,
            )?;
            if on_layer.is_some() {
                self.dev.mark(l)?;
            }
            if let (Some(hook), Some(done)) = (on_layer.as_mut(), l.checked_sub(1)) {
                hook(
                    done,
                    &StepKv {
                        backend: self,
                        marked: l,
                    },
                );
            }
            matmul(
                &*self.dev,
                a.acts_q8.ptr,
                layer.wo.weight(),
                a.attn.ptr,
                n,
                a.proj.ptr,
                &mut q8_of,
            )?;
            self.elementwise(
                Kernel::AddInplace,
                &[Arg::P(a.x.ptr), Arg::P(a.proj.ptr), Arg::L((n * d) as i64)],
                n * d,
            )?;

            self.rms_norm(a.x.ptr, layer.ffn_norm.ptr, a.xn.ptr, n)?;
            q8_of = None;
            matmul(
                &*self.dev,
                a.acts_q8.ptr,
                layer.w_gate.weight(),
                a.xn.ptr,
                n,
                a.gate.ptr,
                &mut q8_of,
            )?;
            matmul(
                &*self.dev,
                a.acts_q8.ptr,
                layer.w_up.weight(),
                a.xn.ptr,
                n,
                a.up.ptr,
                &mut q8_of,
            )?;
            let f = n * c.ffn_dim;
            self.elementwise(
                Kernel::SiluMul,
                &[
                    Arg::P(a.gate.ptr),
                    Arg::P(a.up.ptr),
                    Arg::P(a.act.ptr),
                    Arg::L(f as i64),
                ],
                f,
            )?;
            matmul(
                &*self.dev,
                a.acts_q8.ptr,
                layer.w_down.weight(),
                a.act.ptr,
                n,
                a.proj.ptr,
                &mut q8_of,
            )?;
            self.elementwise(
                Kernel::AddInplace,
                &[Arg::P(a.x.ptr), Arg::P(a.proj.ptr), Arg::L((n * d) as i64)],
                n * d,
            )?;
        }

        if n_logits > 0 {
            self.queue_logits(a, ix, n_logits)?;
            if greedy {
                self.dev.launch(
                    Kernel::ArgmaxLogprob,
                    (n_logits as u32, 1, 1),
                    ROW_THREADS,
                    0,
                    &[
                        Arg::P(a.logits.ptr),
                        Arg::I(c.vocab_size as i32),
                        Arg::P(a.picked.ptr),
                        Arg::P(a.picked.ptr + 4 * a.logit_rows as u64),
                    ],
                )?;
            }
        }
        if let Some(hook) = on_layer.as_mut() {
            let last = c.n_layers - 1;
            hook(
                last,
                &StepKv {
                    backend: self,
                    marked: last,
                },
            );
        }
        Ok(())
    }

    /// Queues the final norm and the output head for the `n_logits` rows of `ix.logit_rows`.
    fn queue_logits(
        &self,
        a: &Activations,
        ix: &IndexPtrs,
        n_logits: usize,
    ) -> Result<(), CudaError> {
        let d = self.config.d_model;
        self.dev.launch(
            Kernel::GatherRows,
            (n_logits as u32, 1, 1),
            ROW_THREADS,
            0,
            &[
                Arg::P(a.x.ptr),
                Arg::P(ix.logit_rows),
                Arg::P(a.last.ptr),
                Arg::I(d as i32),
            ],
        )?;
        self.rms_norm(a.last.ptr, self.output_norm.ptr, a.last_norm.ptr, n_logits)?;
        let head = self.output.as_ref().unwrap_or(&self.token_embd);
        let mut none = None;
        matmul(
            &*self.dev,
            a.acts_q8.ptr,
            head.weight(),
            a.last_norm.ptr,
            n_logits,
            a.logits.ptr,
            &mut none,
        )
    }

    /// Byte offset of a block-layer piece in the pool, checked.
    fn piece_offset(&self, block: BlockId, layer: usize) -> Result<u64, CudaError> {
        if block as usize >= self.num_blocks || layer >= self.layout.n_layers {
            return Err(CudaError::Batch(format!(
                "KV piece (block {block}, layer {layer}) is outside a pool of {} blocks × {} layers",
                self.num_blocks, self.layout.n_layers
            )));
        }
        Ok(
            ((block as usize * self.layout.block_elems() + layer * self.layout.piece_elems()) * 2)
                as u64,
        )
    }

    /// Appends `layer`'s piece of each of `blocks` to `out` in one gather;
    /// `after` as in [`Device::gather`].
    fn read_pieces(
        &self,
        blocks: &[BlockId],
        layer: usize,
        after: Option<usize>,
        out: &mut Vec<u8>,
    ) -> Result<(), CudaError> {
        self.dev.bind()?;
        let srcs = self.piece_ptrs(blocks, layer)?;
        let start = out.len();
        out.resize(start + blocks.len() * self.layout.piece_bytes(), 0);
        self.dev.gather(&mut out[start..], &srcs, after)
    }

    /// The pool addresses of `layer`'s piece of each of `blocks`, checked.
    fn piece_ptrs(&self, blocks: &[BlockId], layer: usize) -> Result<Vec<u64>, CudaError> {
        blocks
            .iter()
            .map(|&b| Ok(self.pool.ptr + self.piece_offset(b, layer)?))
            .collect()
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // The buffers free themselves in this context.
        let _ = self.dev.bind();
    }
}

/// The pool seen from inside a step, for `on_layer`: layers up to `marked`
/// have their marks queued, and a read waits for its own layer's.
struct StepKv<'a> {
    backend: &'a CudaBackend,
    marked: usize,
}

impl KvRead for StepKv<'_> {
    fn read_kv_pieces(
        &self,
        blocks: &[BlockId],
        layer: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), BackendError> {
        if layer > self.marked {
            return Err(BackendError(format!(
                "layer {layer}'s K/V read before the step reached it (layer {})",
                self.marked
            )));
        }
        Ok(self.backend.read_pieces(blocks, layer, Some(layer), out)?)
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> String {
        format!("cuda:{} ({})", self.ordinal, self.dev.describe())
    }

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn kv_layout(&self) -> KvLayout {
        self.layout
    }

    fn forward(
        &mut self,
        batch: &[BatchSeq<'_>],
        on_layer: Option<LayerHook<'_>>,
    ) -> Result<Vec<f32>, BackendError> {
        let rows = self.forward_inner(batch, on_layer, false)?;
        Ok(self.read_logits(rows)?)
    }

    fn forward_greedy(
        &mut self,
        batch: &[BatchSeq<'_>],
        on_layer: Option<LayerHook<'_>>,
    ) -> Result<Vec<(u32, f32)>, BackendError> {
        let rows = self.forward_inner(batch, on_layer, true)?;
        Ok(self.read_picked(rows)?)
    }

    fn read_kv_pieces(
        &self,
        blocks: &[BlockId],
        layer: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), BackendError> {
        Ok(self.read_pieces(blocks, layer, None, out)?)
    }

    fn write_kv_pieces(
        &mut self,
        blocks: &[BlockId],
        layer: usize,
        data: &[u8],
    ) -> Result<(), BackendError> {
        crate::backend::check_pieces(blocks, data, self.layout.piece_bytes())?;
        self.dev.bind()?;
        let dsts = self.piece_ptrs(blocks, layer)?;
        Ok(self.dev.scatter(&dsts, data)?)
    }
}
