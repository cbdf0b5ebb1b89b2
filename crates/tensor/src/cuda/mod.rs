//! The CUDA side of a [`crate::Ctx`]: streams, events, cuBLASLt, kernels, allocator.
mod alloc;
mod blas;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    result as dr, sys as dsys, CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig,
};
use cudarc::nvrtc::Ptx;

pub use alloc::{size_class, AllocStats, CachingAllocator, DeviceBlock};
pub(crate) use blas::{Blas, LtProblem};

use crate::{Device, Error, Result};

pub(crate) fn device_count() -> usize {
    // SAFETY: only tries to dlopen libcuda by its known names.
    if !unsafe { dsys::is_culib_present() } {
        return 0;
    }
    if dr::init().is_err() {
        return 0;
    }
    dr::device::get_count()
        .map(|n| n.max(0) as usize)
        .unwrap_or(0)
}

/// The CUDA driver's version as `(major, minor)`, or `None` without a driver.
pub fn driver_version() -> Option<(i32, i32)> {
    if device_count() == 0 {
        return None;
    }
    let mut v = 0;
    // SAFETY: the driver library is loaded and initialized (device_count).
    unsafe { dsys::cuDriverGetVersion(&mut v) }.result().ok()?;
    Some((v / 1000, (v % 1000) / 10))
}

/// `cuDriverGetVersion` (`major*1000 + minor*10`) where libcuda loads,
/// without initializing the driver or needing a device, so it answers on a
/// machine whose driver is too old for this build.
pub fn driver_version_code() -> Option<i32> {
    // SAFETY: only tries to dlopen the library by its known names.
    if !unsafe { dsys::is_culib_present() } {
        return None;
    }
    let mut v = 0;
    // SAFETY: the library loads; cuDriverGetVersion needs no cuInit and
    // exists in every driver.
    unsafe { dsys::cuDriverGetVersion(&mut v) }.result().ok()?;
    Some(v)
}

/// Whether cuBLASLt (`libcublasLt.so`) can be loaded (GEMMs need it).
pub fn cublaslt_present() -> bool {
    // SAFETY: only probes whether the library can be opened.
    unsafe { cudarc::cublaslt::sys::is_culib_present() }
}

/// The NCCL library's version as `(major, minor, patch)`, or `None` where
/// `libnccl.so` cannot be loaded.
pub fn nccl_version() -> Option<(i32, i32, i32)> {
    // SAFETY: only probes whether the library can be opened.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        return None;
    }
    let v = cudarc::nccl::result::get_nccl_version().ok()?;
    // NCCL_VERSION_CODE: major·10000 + minor·100 + patch since 2.9.
    Some((v / 10000, (v % 10000) / 100, v % 100))
}

/// Per-GPU context: the compute, copy and communication streams, the
/// cuBLASLt handle with its workspace, the kernel cache and the caching
/// allocator. Work is ordered on the compute stream; other streams are ordered
/// against it with events ([`CudaCtx::wait_for`]).
pub struct CudaCtx {
    ordinal: usize,
    arch: (u32, u32),
    path: llmft_kernels::arch::KernelPath,
    smem_optin: usize,
    sms: usize,
    context: Arc<CudaContext>,
    compute: Arc<CudaStream>,
    copy: Arc<CudaStream>,
    stash: Arc<CudaStream>,
    comm: Arc<CudaStream>,
    alloc: Arc<CachingAllocator>,
    blas: Mutex<Option<Blas>>,
    compiler: Mutex<Option<llmft_kernels::Compiler>>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(&'static str, &'static str), CudaFunction>>,
}

/// Which of a context's streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// Kernels and GEMMs.
    Compute,
    /// Host<->device copies of weights that overlap compute.
    Copy,
    /// Copies of activations to host memory and back (activation offload),
    /// concurrent with the weight copies.
    Stash,
    /// Collectives.
    Comm,
}

impl CudaCtx {
    pub(crate) fn new(ordinal: usize) -> Result<Self> {
        let n = device_count();
        if n == 0 {
            return Err(Error::NoCuda(
                "the CUDA driver library (libcuda.so) was not found or reports no device".into(),
            ));
        }
        if let Some(v) = driver_version_code() {
            if let Some(advice) =
                llmft_kernels::cuda_build::driver_advice(llmft_kernels::cuda_build::BUILD, v)
            {
                return Err(Error::NoCuda(advice));
            }
        }
        if ordinal >= n {
            return Err(Error::NoCuda(format!(
                "device cuda:{ordinal} asked for, but only {n} device(s) exist"
            )));
        }
        let context = CudaContext::new(ordinal).map_err(|e| Error::cuda("cuCtxCreate", e))?;
        let (maj, min) = context
            .compute_capability()
            .map_err(|e| Error::cuda("cuDeviceGetAttribute", e))?;
        let mk =
            |c: &Arc<CudaContext>| c.new_stream().map_err(|e| Error::cuda("cuStreamCreate", e));
        let compute = mk(&context)?;
        let copy = mk(&context)?;
        let stash = mk(&context)?;
        let comm = mk(&context)?;
        let sms = context
            .attribute(dsys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| Error::cuda("cuDeviceGetAttribute", e))? as usize;
        let smem_optin = context
            .attribute(
                dsys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(|e| Error::cuda("cuDeviceGetAttribute", e))? as usize;
        let path = llmft_kernels::arch::KernelPath::from_env((maj as u32, min as u32))?;
        announce_path(&path);
        let alloc = Arc::new(CachingAllocator::new(
            context.clone(),
            ordinal,
            compute.clone(),
        ));
        Ok(Self {
            ordinal,
            sms,
            arch: (maj as u32, min as u32),
            path,
            smem_optin,
            context,
            compute,
            copy,
            stash,
            comm,
            alloc,
            blas: Mutex::new(None),
            compiler: Mutex::new(None),
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
        })
    }

    /// Device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// Compute capability `(major, minor)`.
    pub fn arch(&self) -> (u32, u32) {
        self.arch
    }

    /// The code path the kernels take here: the device's compute capability,
    /// or an older one forced with `LLMFT_KERNEL_ARCH` (see
    /// [`llmft_kernels::arch`]).
    pub fn kernel_path(&self) -> llmft_kernels::arch::KernelPath {
        self.path
    }

    /// The architecture of [`CudaCtx::kernel_path`] as `(major, minor)`:
    /// what dtype and kernel choices go by (bf16 needs `(8, 0)`).
    pub fn path_arch(&self) -> (u32, u32) {
        (self.path.path / 10, self.path.path % 10)
    }

    /// Whether bf16 compute is available on this context's kernel path.
    pub fn has_bf16(&self) -> bool {
        self.path.has_bf16()
    }

    /// The most dynamic shared memory one block may use on this context's
    /// kernel path (the device's opt-in limit, or the forced path's if less).
    pub fn max_shared_per_block(&self) -> usize {
        self.path.max_shared_per_block(self.smem_optin)
    }

    /// Number of streaming multiprocessors.
    pub fn sm_count(&self) -> usize {
        self.sms
    }

    /// The cudarc context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.context
    }

    /// One of the context's streams.
    pub fn stream(&self, kind: StreamKind) -> &Arc<CudaStream> {
        match kind {
            StreamKind::Compute => &self.compute,
            StreamKind::Copy => &self.copy,
            StreamKind::Stash => &self.stash,
            StreamKind::Comm => &self.comm,
        }
    }

    /// The compute stream.
    pub fn compute(&self) -> &Arc<CudaStream> {
        &self.compute
    }

    /// The caching allocator.
    pub fn allocator(&self) -> &Arc<CachingAllocator> {
        &self.alloc
    }

    /// Makes stream `waiter` wait for all work queued so far on `on`.
    pub fn wait_for(&self, waiter: StreamKind, on: StreamKind) -> Result<()> {
        self.stream(waiter)
            .join(self.stream(on))
            .map_err(|e| Error::cuda("cuStreamWaitEvent", e))
    }

    /// Records the work queued so far on stream `on` into a new event.
    pub fn record(&self, on: StreamKind) -> Result<cudarc::driver::CudaEvent> {
        self.stream(on)
            .record_event(None)
            .map_err(|e| Error::cuda("cuEventRecord", e))
    }

    /// Makes stream `waiter` wait for `event` (no host synchronization).
    pub fn wait_event(&self, waiter: StreamKind, event: &cudarc::driver::CudaEvent) -> Result<()> {
        self.stream(waiter)
            .wait(event)
            .map_err(|e| Error::cuda("cuStreamWaitEvent", e))
    }

    /// Waits for every stream of the context.
    pub fn synchronize(&self) -> Result<()> {
        for s in [&self.compute, &self.copy, &self.stash, &self.comm] {
            s.synchronize()
                .map_err(|e| Error::cuda("cuStreamSynchronize", e))?;
        }
        Ok(())
    }

    pub(crate) fn bind(&self) -> Result<()> {
        self.context
            .bind_to_thread()
            .map_err(|e| Error::cuda("cuCtxSetCurrent", e))
    }

    /// Free and total device memory as the driver reports them.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.context
            .mem_get_info()
            .map_err(|e| Error::cuda("cuMemGetInfo", e))
    }

    /// The kernel `func` of source `module` (a `kernels/cuda/*.cu` stem),
    /// compiled for this device on first use.
    pub fn function(&self, module: &'static str, func: &'static str) -> Result<CudaFunction> {
        if let Some(f) = self.functions.lock().unwrap().get(&(module, func)) {
            return Ok(f.clone());
        }
        let m = self.module(module)?;
        let f = m
            .load_function(func)
            .map_err(|e| Error::cuda("cuModuleGetFunction", format!("{module}::{func}: {e:?}")))?;
        self.functions
            .lock()
            .unwrap()
            .insert((module, func), f.clone());
        Ok(f)
    }

    fn module(&self, name: &'static str) -> Result<Arc<CudaModule>> {
        if let Some(m) = self.modules.lock().unwrap().get(name) {
            return Ok(m.clone());
        }
        let src = llmft_kernels::source(name)
            .ok_or_else(|| llmft_kernels::Error::UnknownSource(name.to_string()))?;
        let cubin = {
            let mut guard = self.compiler.lock().unwrap();
            if guard.is_none() {
                *guard = Some(llmft_kernels::Compiler::new(Default::default())?);
            }
            guard
                .as_ref()
                .unwrap()
                .compile_path(src, self.arch, self.path.path)?
        };
        let m = self
            .context
            .load_module(Ptx::from_binary(cubin))
            .map_err(|e| Error::cuda("cuModuleLoadData", format!("{name}: {e:?}")))?;
        self.modules.lock().unwrap().insert(name, m.clone());
        Ok(m)
    }

    pub(crate) fn with_blas<T>(&self, f: impl FnOnce(&mut Blas) -> Result<T>) -> Result<T> {
        let mut guard = self.blas.lock().unwrap();
        if guard.is_none() {
            *guard = Some(Blas::new(self)?);
        }
        f(guard.as_mut().unwrap())
    }

    /// The device's name as the driver reports it.
    pub fn name(&self) -> String {
        self.context.name().unwrap_or_else(|_| "unknown".into())
    }

    /// Device of this context.
    pub fn device(&self) -> Device {
        Device::Cuda(self.ordinal)
    }
}

/// Prints the kernel path once per process (to stderr) where it is not the
/// full fast one — a pre-Ampere GPU, or a path forced by `LLMFT_KERNEL_ARCH`:
/// which fallbacks the kernels take, and whether bf16 compute is available.
/// (`llmft env` always names the path.)
fn announce_path(path: &llmft_kernels::arch::KernelPath) {
    static SEEN: Mutex<Vec<llmft_kernels::arch::KernelPath>> = Mutex::new(Vec::new());
    if !path.forced && path.path >= 80 {
        return;
    }
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if !seen.contains(path) {
        seen.push(*path);
        eprintln!("{}", path.describe());
    }
}

/// A 1-D launch configuration of `blocks` blocks of `threads` threads.
pub(crate) fn cfg(blocks: usize, threads: usize, shared: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.clamp(1, i32::MAX as usize) as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: shared,
    }
}

/// Launches `$module::$func` on the compute stream with the given args
/// (each evaluated once into a local, so temporaries like `n as i64` live
/// until the launch).
macro_rules! launch {
    ($cu:expr, $module:expr, $func:expr, $cfg:expr, $($arg:expr),* $(,)?) => {
        $crate::cuda::launch!(@bind $cu, $module, $func, $cfg, [] $($arg,)*)
    };
    (@bind $cu:expr, $module:expr, $func:expr, $cfg:expr, [$($b:ident)*] $head:expr, $($rest:expr,)*) => {{
        let a = $head;
        $crate::cuda::launch!(@bind $cu, $module, $func, $cfg, [$($b)* a] $($rest,)*)
    }};
    (@bind $cu:expr, $module:expr, $func:expr, $cfg:expr, [$($b:ident)*]) => {{
        use cudarc::driver::PushKernelArg as _;
        let cu: &$crate::cuda::CudaCtx = $cu;
        let fname: &'static str = $func;
        let f = cu.function($module, fname)?;
        let mut builder = cu.compute().launch_builder(&f);
        $( builder.arg(&$b); )*
        // SAFETY: argument order and types follow the kernel's signature in
        // kernels/cuda/$module.cu; every pointer is a live device allocation
        // whose extent the calling op checked against the tensor shapes.
        unsafe { builder.launch($cfg) }
            .map(|_| ())
            .map_err(|e| $crate::Error::Cuda {
                call: "cuLaunchKernel",
                msg: format!("{}::{}: {e:?}", $module, fname),
            })
    }};
}
pub(crate) use launch;
