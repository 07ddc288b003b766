//! NVRTC, opened by path: compiles `kernels.cu` for the device at load time.
//!
//! cudarc's own NVRTC loader searches only the library names of the CUDA
//! version its bindings were generated for (`libnvrtc.so.12`, …) and panics when
//! none opens; the GPU machines carry CUDA 13 (`libnvrtc.so.13`). So tandem
//! opens NVRTC itself through `libloading`, trying `TANDEM_NVRTC_LIB` (a path)
//! first and then the names below, and reports every name it tried when none
//! opens. Only the seven stable entry points the compile needs are resolved.

use std::ffi::{CStr, CString, c_char, c_int};
use std::path::PathBuf;

use super::CudaError;

/// `nvrtcResult`: 0 is success.
type NvrtcResult = c_int;
/// `nvrtcProgram`: an opaque handle.
type Program = *mut std::ffi::c_void;

/// The environment variable naming the NVRTC library file to open first.
pub const NVRTC_ENV: &str = "TANDEM_NVRTC_LIB";

/// Library names tried, newest CUDA first, after `TANDEM_NVRTC_LIB`.
pub(crate) fn nvrtc_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os(NVRTC_ENV).filter(|p| !p.is_empty()) {
        out.push(PathBuf::from(p));
    }
    let names = [
        "libnvrtc.so.13",
        "libnvrtc.so.12",
        "libnvrtc.so",
        "libnvrtc.so.11.2",
    ];
    out.extend(names.iter().map(PathBuf::from));
    // Where the toolkit installs it when the loader path does not name it.
    for dir in [
        "/usr/local/cuda/lib64",
        "/usr/local/cuda/targets/x86_64-linux/lib",
    ] {
        out.extend(names[..3].iter().map(|n| PathBuf::from(dir).join(n)));
    }
    out
}

/// An opened NVRTC library.
pub(crate) struct Nvrtc {
    lib: libloading::Library,
    /// The file that opened.
    pub(crate) path: PathBuf,
}

type CreateProgram = unsafe extern "C" fn(
    *mut Program,
    *const c_char,
    *const c_char,
    c_int,
    *const *const c_char,
    *const *const c_char,
) -> NvrtcResult;
type CompileProgram = unsafe extern "C" fn(Program, c_int, *const *const c_char) -> NvrtcResult;
type GetSize = unsafe extern "C" fn(Program, *mut usize) -> NvrtcResult;
type GetBytes = unsafe extern "C" fn(Program, *mut c_char) -> NvrtcResult;
type DestroyProgram = unsafe extern "C" fn(*mut Program) -> NvrtcResult;
type GetErrorString = unsafe extern "C" fn(NvrtcResult) -> *const c_char;
type Version = unsafe extern "C" fn(*mut c_int, *mut c_int) -> NvrtcResult;

impl Nvrtc {
    /// Opens the first candidate that loads.
    pub(crate) fn open() -> Result<Self, CudaError> {
        let candidates = nvrtc_candidates();
        for path in &candidates {
            // SAFETY: loading NVRTC runs its initializers, which have no
            // preconditions; the symbols are checked one by one below.
            if let Ok(lib) = unsafe { libloading::Library::new(path) } {
                return Ok(Self {
                    lib,
                    path: path.clone(),
                });
            }
        }
        Err(CudaError::LibraryNotFound {
            library: "NVRTC (libnvrtc)",
            tried: candidates.iter().map(|p| p.display().to_string()).collect(),
            hint: format!(
                "install the CUDA toolkit's NVRTC or set {NVRTC_ENV}=/path/to/libnvrtc.so.N"
            ),
        })
    }

    fn sym<T: Copy>(&self, name: &'static str) -> Result<T, CudaError> {
        // SAFETY: every `T` used here is the documented C signature of `name`.
        unsafe { self.lib.get::<T>(name.as_bytes()) }
            .map(|s| *s)
            .map_err(|e| CudaError::Nvrtc(format!("{} has no {name}: {e}", self.path.display())))
    }

    /// NVRTC's (major, minor) version.
    pub(crate) fn version(&self) -> Result<(i32, i32), CudaError> {
        let f: Version = self.sym("nvrtcVersion")?;
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two valid out-pointers.
        let r = unsafe { f(&mut major, &mut minor) };
        self.check(r, "nvrtcVersion")?;
        Ok((major, minor))
    }

    fn check(&self, r: NvrtcResult, what: &str) -> Result<(), CudaError> {
        if r == 0 {
            return Ok(());
        }
        let msg = self
            .sym::<GetErrorString>("nvrtcGetErrorString")
            .ok()
            // SAFETY: nvrtcGetErrorString returns a static NUL-terminated string.
            .map(|f| {
                unsafe { CStr::from_ptr(f(r)) }
                    .to_string_lossy()
                    .into_owned()
            })
            .unwrap_or_default();
        Err(CudaError::Nvrtc(format!("{what} failed ({r}): {msg}")))
    }

    /// Compiles `source` for `sm_{arch}` and returns the CUBIN image.
    pub(crate) fn compile_cubin(&self, source: &str, arch: u32) -> Result<Vec<u8>, CudaError> {
        let create: CreateProgram = self.sym("nvrtcCreateProgram")?;
        let compile: CompileProgram = self.sym("nvrtcCompileProgram")?;
        let log_size: GetSize = self.sym("nvrtcGetProgramLogSize")?;
        let log: GetBytes = self.sym("nvrtcGetProgramLog")?;
        let cubin_size: GetSize = self.sym("nvrtcGetCUBINSize")?;
        let cubin: GetBytes = self.sym("nvrtcGetCUBIN")?;
        let destroy: DestroyProgram = self.sym("nvrtcDestroyProgram")?;

        let src = CString::new(source)
            .map_err(|_| CudaError::Nvrtc("kernels.cu contains a NUL byte".into()))?;
        let name = c"kernels.cu";
        let options: Vec<CString> = compile_options(arch)
            .into_iter()
            .map(|o| CString::new(o).expect("compile options contain no NUL"))
            .collect();
        let option_ptrs: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();

        let mut prog: Program = std::ptr::null_mut();
        // SAFETY: `src` and `name` are NUL-terminated and outlive the call; no headers.
        let r = unsafe {
            create(
                &mut prog,
                src.as_ptr(),
                name.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        self.check(r, "nvrtcCreateProgram")?;
        let result = (|| {
            // SAFETY: `prog` was created above; the option pointers outlive the call.
            let r = unsafe { compile(prog, option_ptrs.len() as c_int, option_ptrs.as_ptr()) };
            if r != 0 {
                let mut n = 0usize;
                let mut text = String::new();
                // SAFETY: `prog` is valid; the buffer holds `n` bytes as NVRTC asked.
                unsafe {
                    if log_size(prog, &mut n) == 0 && n > 0 {
                        let mut buf = vec![0u8; n];
                        if log(prog, buf.as_mut_ptr().cast()) == 0 {
                            text = String::from_utf8_lossy(&buf)
                                .trim_end_matches('\0')
                                .to_string();
                        }
                    }
                }
                self.check(r, "compiling kernels.cu")
                    .map_err(|e| CudaError::Nvrtc(format!("{e}\n{text}")))?;
            }
            let mut n = 0usize;
            // SAFETY: `prog` compiled; the buffer holds `n` bytes as NVRTC asked.
            self.check(unsafe { cubin_size(prog, &mut n) }, "nvrtcGetCUBINSize")?;
            let mut buf = vec![0u8; n];
            // SAFETY: as above.
            self.check(
                unsafe { cubin(prog, buf.as_mut_ptr().cast()) },
                "nvrtcGetCUBIN",
            )?;
            Ok(buf)
        })();
        // SAFETY: `prog` is valid and destroyed once.
        unsafe { destroy(&mut prog) };
        result
    }
}

/// NVRTC options for the device's architecture: a real `sm_XY` target gives a
/// CUBIN that loads without a JIT step. No fast math: the kernels mirror the
/// CPU's rounding.
pub(crate) fn compile_options(arch: u32) -> Vec<String> {
    vec![
        format!("--gpu-architecture=sm_{arch}"),
        "--std=c++17".into(),
        "-lineinfo".into(),
    ]
}
