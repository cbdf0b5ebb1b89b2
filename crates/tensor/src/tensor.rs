//! Contiguous row-major tensors over host or device storage.
use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::Arc;

use cudarc::driver::result as dr;

use crate::cuda::{DeviceBlock, StreamKind};
use crate::{Ctx, DType, Device, Element, Error, Result};

const HOST_ALIGN: usize = 64;

/// Host memory: 64-byte aligned, or page-locked (pinned) through the driver.
pub(crate) struct HostBuf {
    ptr: NonNull<u8>,
    bytes: usize,
    pinned: Option<Arc<cudarc::driver::CudaContext>>,
}

// SAFETY: HostBuf owns its allocation; access is governed by Tensor's borrows.
unsafe impl Send for HostBuf {}
// SAFETY: as above.
unsafe impl Sync for HostBuf {}

impl HostBuf {
    fn zeroed(bytes: usize) -> Result<Self> {
        let too_big = || Error::HostOutOfMemory { requested: bytes };
        let layout = Layout::from_size_align(bytes.max(1), HOST_ALIGN).map_err(|_| too_big())?;
        // SAFETY: layout has non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(p).ok_or_else(too_big)?;
        Ok(Self {
            ptr,
            bytes,
            pinned: None,
        })
    }
}

impl Drop for HostBuf {
    fn drop(&mut self) {
        match &self.pinned {
            None => {
                let layout = Layout::from_size_align(self.bytes.max(1), HOST_ALIGN).unwrap();
                // SAFETY: allocated in `zeroed` with this layout.
                unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) }
            }
            Some(ctx) => {
                let _ = ctx.bind_to_thread();
                // SAFETY: allocated by cuMemHostAlloc in `Tensor::zeros_pinned`.
                let _ = unsafe { dr::free_host(self.ptr.as_ptr() as *mut _) };
            }
        }
    }
}

pub(crate) enum Storage {
    Host(HostBuf),
    Cuda { block: DeviceBlock, ctx: Ctx },
}

/// A contiguous row-major tensor. Cloning makes a view of the same storage.
///
/// Views (`view`, `reshape`) share storage by offset, as the slices of a
/// packed weight blob do. An op writes only through a `&mut Tensor`; callers
/// must not pass an output that overlaps one of the op's inputs.
#[derive(Clone)]
pub struct Tensor {
    storage: Arc<Storage>,
    offset: usize,
    dtype: DType,
    shape: Vec<usize>,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor({}, {:?}, {})",
            self.dtype,
            self.shape,
            self.device()
        )
    }
}

/// Number of elements of a shape (saturating: an overflowing shape counts
/// as `usize::MAX` elements, which no allocation or view accepts).
pub fn numel(shape: &[usize]) -> usize {
    shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .unwrap_or(usize::MAX)
}

/// Bytes of `shape` elements of `dtype`, or an error when that overflows.
fn byte_size(op: &'static str, shape: &[usize], dtype: DType) -> Result<usize> {
    shape
        .iter()
        .try_fold(dtype.size(), |a, &d| a.checked_mul(d))
        .ok_or_else(|| Error::Invalid {
            op,
            msg: format!("{shape:?} elements of {dtype} overflow the address space"),
        })
}

impl Tensor {
    /// A zero-filled tensor on `ctx`'s device.
    pub fn zeros(ctx: &Ctx, dtype: DType, shape: &[usize]) -> Result<Self> {
        let bytes = byte_size("zeros", shape, dtype)?;
        let storage = match ctx.cuda_ctx() {
            None => Storage::Host(HostBuf::zeroed(bytes)?),
            Some(cu) => {
                let block = cu.allocator().alloc(bytes)?;
                cu.bind()?;
                // SAFETY: the block holds at least `bytes` bytes; ordered on the compute stream.
                unsafe { dr::memset_d8_async(block.ptr(), 0, bytes, cu.compute().cu_stream()) }
                    .map_err(|e| Error::cuda("cuMemsetD8Async", e))?;
                Storage::Cuda {
                    block,
                    ctx: ctx.clone(),
                }
            }
        };
        Ok(Self {
            storage: Arc::new(storage),
            offset: 0,
            dtype,
            shape: shape.to_vec(),
        })
    }

    /// A tensor whose contents are unspecified until written, for outputs an
    /// op overwrites completely (skips the memset on CUDA; host memory is
    /// zeroed anyway).
    pub fn empty(ctx: &Ctx, dtype: DType, shape: &[usize]) -> Result<Self> {
        let Some(cu) = ctx.cuda_ctx() else {
            return Self::zeros(ctx, dtype, shape);
        };
        let block = cu.allocator().alloc(byte_size("empty", shape, dtype)?)?;
        Ok(Self {
            storage: Arc::new(Storage::Cuda {
                block,
                ctx: ctx.clone(),
            }),
            offset: 0,
            dtype,
            shape: shape.to_vec(),
        })
    }

    /// A zero-filled tensor in page-locked host memory of `ctx`'s GPU (fast,
    /// asynchronous copies). On a CPU context this is ordinary host memory.
    pub fn zeros_pinned(ctx: &Ctx, dtype: DType, shape: &[usize]) -> Result<Self> {
        let Some(cu) = ctx.cuda_ctx() else {
            return Self::zeros(ctx, dtype, shape);
        };
        let bytes = byte_size("zeros_pinned", shape, dtype)?;
        cu.bind()?;
        // SAFETY: context is current; memory freed in HostBuf::drop.
        let p = unsafe { dr::malloc_host(bytes.max(1), 0) }.map_err(|e| match e.0 {
            cudarc::driver::sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY => Error::Invalid {
                op: "zeros_pinned",
                msg: format!("could not pin {bytes} bytes of host memory"),
            },
            _ => Error::cuda("cuMemHostAlloc", e),
        })?;
        // SAFETY: p points to `bytes` writable bytes.
        unsafe { std::ptr::write_bytes(p as *mut u8, 0, bytes) };
        let buf = HostBuf {
            ptr: NonNull::new(p as *mut u8).expect("cuMemHostAlloc returned null"),
            bytes,
            pinned: Some(cu.context().clone()),
        };
        Ok(Self {
            storage: Arc::new(Storage::Host(buf)),
            offset: 0,
            dtype,
            shape: shape.to_vec(),
        })
    }

    /// A tensor holding `data` on `ctx`'s device.
    pub fn from_slice<T: Element>(ctx: &Ctx, data: &[T], shape: &[usize]) -> Result<Self> {
        if numel(shape) != data.len() {
            return Err(Error::Shape {
                op: "from_slice",
                what: "data",
                got: vec![data.len()],
                expected: vec![numel(shape)],
            });
        }
        let host = {
            let mut t = Self::zeros(&Ctx::cpu(), T::DTYPE, shape)?;
            t.as_mut_slice::<T>()?.copy_from_slice(data);
            t
        };
        host.to_ctx(ctx)
    }

    /// A tensor of dtype `dtype` holding `data` converted from f32.
    pub fn from_f32(ctx: &Ctx, data: &[f32], dtype: DType, shape: &[usize]) -> Result<Self> {
        let src = Self::from_slice(&Ctx::cpu(), data, shape)?;
        let mut host = Self::zeros(&Ctx::cpu(), dtype, shape)?;
        crate::ops::cast(&Ctx::cpu(), &src, &mut host)?;
        host.to_ctx(ctx)
    }

    /// A copy of this tensor on `ctx`'s device (synchronous for device->host).
    pub fn to_ctx(&self, ctx: &Ctx) -> Result<Self> {
        let mut out = Self::zeros(ctx, self.dtype, &self.shape)?;
        // Device->host copies run on the source's context.
        let via = match (ctx.device(), self.cuda_ctx()) {
            (Device::Cpu, Some(src_ctx)) => src_ctx.clone(),
            _ => ctx.clone(),
        };
        out.copy_from(&via, self)?;
        if out.device() == Device::Cpu {
            via.synchronize()?;
        }
        Ok(out)
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }
    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }
    /// Where the data lives.
    pub fn device(&self) -> Device {
        match &*self.storage {
            Storage::Host(_) => Device::Cpu,
            Storage::Cuda { ctx, .. } => ctx.device(),
        }
    }
    /// Whether the storage is page-locked host memory.
    pub fn is_pinned(&self) -> bool {
        matches!(&*self.storage, Storage::Host(h) if h.pinned.is_some())
    }
    fn cuda_ctx(&self) -> Option<&Ctx> {
        match &*self.storage {
            Storage::Cuda { ctx, .. } => Some(ctx),
            Storage::Host(_) => None,
        }
    }
    fn storage_bytes(&self) -> usize {
        match &*self.storage {
            Storage::Host(h) => h.bytes,
            Storage::Cuda { block, .. } => block.size(),
        }
    }

    /// A view of `numel(shape)` elements starting `offset` elements in.
    pub fn view(&self, offset: usize, shape: &[usize]) -> Result<Self> {
        let es = self.dtype.size();
        let n = numel(shape);
        let bad = || Error::Invalid {
            op: "view",
            msg: format!(
                "elements {offset}..{} of a tensor of shape {:?}",
                offset.saturating_add(n),
                self.shape
            ),
        };
        let last = offset.checked_add(n).ok_or_else(bad)?;
        let start = offset
            .checked_mul(es)
            .and_then(|o| o.checked_add(self.offset))
            .ok_or_else(bad)?;
        let end = n
            .checked_mul(es)
            .and_then(|b| b.checked_add(start))
            .ok_or_else(bad)?;
        if last > self.numel() || end > self.storage_bytes() {
            return Err(bad());
        }
        Ok(Self {
            storage: self.storage.clone(),
            offset: start,
            dtype: self.dtype,
            shape: shape.to_vec(),
        })
    }

    /// The same data under another shape with as many elements.
    pub fn reshape(&self, shape: &[usize]) -> Result<Self> {
        if numel(shape) != self.numel() {
            return Err(Error::Shape {
                op: "reshape",
                what: "new shape",
                got: shape.to_vec(),
                expected: self.shape.clone(),
            });
        }
        self.view(0, shape)
    }

    /// The same bytes read as another dtype of the same size (e.g. bf16 <-> f16 bits).
    pub fn reinterpret(&self, dtype: DType, shape: &[usize]) -> Result<Self> {
        if numel(shape) * dtype.size() != self.bytes() {
            return Err(Error::Invalid {
                op: "reinterpret",
                msg: format!(
                    "{:?} {} is {} bytes, {:?} {} is {}",
                    self.shape,
                    self.dtype,
                    self.bytes(),
                    shape,
                    dtype,
                    numel(shape) * dtype.size()
                ),
            });
        }
        Ok(Self {
            storage: self.storage.clone(),
            offset: self.offset,
            dtype,
            shape: shape.to_vec(),
        })
    }

    fn check_dtype<T: Element>(&self, op: &'static str) -> Result<()> {
        if T::DTYPE != self.dtype {
            return Err(Error::DType {
                op,
                what: "tensor",
                got: self.dtype,
                expected: T::DTYPE.to_string(),
            });
        }
        Ok(())
    }

    fn host_ptr(&self, op: &'static str) -> Result<*mut u8> {
        match &*self.storage {
            // SAFETY: offset is within the allocation (checked by `view`).
            Storage::Host(h) => Ok(unsafe { h.ptr.as_ptr().add(self.offset) }),
            Storage::Cuda { ctx, .. } => Err(Error::Device {
                op,
                what: "tensor",
                got: ctx.device(),
                expected: Device::Cpu,
            }),
        }
    }

    /// The elements of a host tensor.
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        self.check_dtype::<T>("as_slice")?;
        let p = self.host_ptr("as_slice")?;
        // SAFETY: host memory of numel elements, aligned (64-byte base, offsets
        // are whole elements); lives as long as the borrow of self.
        Ok(unsafe { std::slice::from_raw_parts(p as *const T, self.numel()) })
    }

    /// The elements of a host tensor, mutably. Other views of the same storage
    /// must not be read at the same time.
    pub fn as_mut_slice<T: Element>(&mut self) -> Result<&mut [T]> {
        self.check_dtype::<T>("as_mut_slice")?;
        let p = self.host_ptr("as_mut_slice")?;
        // SAFETY: as in as_slice; exclusive through &mut self (views are the
        // caller's responsibility, as documented).
        Ok(unsafe { std::slice::from_raw_parts_mut(p as *mut T, self.numel()) })
    }

    /// The raw bytes of a host tensor.
    pub fn as_bytes(&self) -> Result<&[u8]> {
        let p = self.host_ptr("as_bytes")?;
        // SAFETY: as in as_slice.
        Ok(unsafe { std::slice::from_raw_parts(p, self.bytes()) })
    }

    /// The raw bytes of a host tensor, mutably.
    pub fn as_bytes_mut(&mut self) -> Result<&mut [u8]> {
        let p = self.host_ptr("as_bytes_mut")?;
        // SAFETY: as in as_mut_slice.
        Ok(unsafe { std::slice::from_raw_parts_mut(p, self.bytes()) })
    }

    /// Device address of the first element of a CUDA tensor (for kernel launches).
    pub fn device_ptr(&self) -> Result<u64> {
        match &*self.storage {
            Storage::Cuda { block, .. } => Ok(block.ptr() + self.offset as u64),
            Storage::Host(_) => Err(Error::Invalid {
                op: "device_ptr",
                msg: "tensor is in host memory".into(),
            }),
        }
    }

    /// Copies the elements to a Vec (waits for the device).
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        self.check_dtype::<T>("to_vec")?;
        match self.cuda_ctx() {
            None => Ok(self.as_slice::<T>()?.to_vec()),
            Some(ctx) => {
                let host = self.to_ctx(&Ctx::cpu())?;
                ctx.synchronize()?;
                Ok(host.as_slice::<T>()?.to_vec())
            }
        }
    }

    /// The elements converted to f32 (waits for the device).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        let host = if self.device() == Device::Cpu {
            self.clone()
        } else {
            self.to_ctx(&Ctx::cpu())?
        };
        Ok(match self.dtype {
            DType::F32 => host.as_slice::<f32>()?.to_vec(),
            DType::BF16 => host
                .as_slice::<half::bf16>()?
                .iter()
                .map(|v| v.to_f32())
                .collect(),
            DType::F16 => host
                .as_slice::<half::f16>()?
                .iter()
                .map(|v| v.to_f32())
                .collect(),
            DType::U8 => host.as_slice::<u8>()?.iter().map(|&v| v as f32).collect(),
            DType::I8 => host.as_slice::<i8>()?.iter().map(|&v| v as f32).collect(),
            DType::I32 => host.as_slice::<i32>()?.iter().map(|&v| v as f32).collect(),
        })
    }

    /// Copies raw little-endian element bytes from host memory into `self`
    /// (exactly `self.bytes()` of them), waiting until the source may be
    /// reused. Used to stream checkpoint data without an extra host tensor.
    pub fn copy_from_host_bytes(&mut self, ctx: &Ctx, bytes: &[u8]) -> Result<()> {
        if bytes.len() != self.bytes() {
            return Err(Error::Shape {
                op: "copy_from_host_bytes",
                what: "bytes",
                got: vec![bytes.len()],
                expected: vec![self.bytes()],
            });
        }
        match self.device() {
            Device::Cpu => {
                self.as_bytes_mut()?.copy_from_slice(bytes);
                Ok(())
            }
            dev => {
                let cu = ctx
                    .cuda_ctx()
                    .filter(|c| c.device() == dev)
                    .ok_or(Error::Device {
                        op: "copy_from_host_bytes",
                        what: "context",
                        got: ctx.device(),
                        expected: dev,
                    })?;
                cu.bind()?;
                // SAFETY: the destination holds bytes.len() bytes; the stream
                // is synchronized before `bytes` can be released.
                unsafe {
                    dr::memcpy_htod_async(self.device_ptr()?, bytes, cu.compute().cu_stream())
                }
                .map_err(|e| Error::cuda("cuMemcpyHtoDAsync", e))?;
                cu.compute()
                    .synchronize()
                    .map_err(|e| Error::cuda("cuStreamSynchronize", e))
            }
        }
    }

    /// Copies `src` (same dtype and element count, any device) into `self`.
    /// Host<->device copies go on `ctx`'s compute stream; pinned host memory
    /// makes them asynchronous.
    pub fn copy_from(&mut self, ctx: &Ctx, src: &Tensor) -> Result<()> {
        self.copy_from_on(ctx, src, StreamKind::Compute)
    }

    /// [`Tensor::copy_from`] queued on stream `on` of `ctx` (the copy stream
    /// overlaps compute). The caller orders it against other streams with
    /// events ([`Ctx::record`], [`Ctx::wait`]); device storage touched here
    /// is marked as used on `on`, so freeing it stays safe. A copy into
    /// pageable host memory waits for the stream before returning.
    pub fn copy_from_on(&mut self, ctx: &Ctx, src: &Tensor, on: StreamKind) -> Result<()> {
        if src.dtype != self.dtype {
            return Err(Error::DType {
                op: "copy",
                what: "source",
                got: src.dtype,
                expected: self.dtype.to_string(),
            });
        }
        if src.numel() != self.numel() {
            return Err(Error::Shape {
                op: "copy",
                what: "source",
                got: src.shape.clone(),
                expected: self.shape.clone(),
            });
        }
        let n = self.bytes();
        match (self.device(), src.device()) {
            (Device::Cpu, Device::Cpu) => {
                let s = src.as_bytes()?.as_ptr();
                let d = self.as_bytes_mut()?.as_mut_ptr();
                // SAFETY: both regions are n bytes; copy handles overlap.
                unsafe { std::ptr::copy(s, d, n) };
                Ok(())
            }
            (dd, sd) => {
                let cu = ctx.cuda_ctx().ok_or_else(|| Error::Device {
                    op: "copy",
                    what: "context",
                    got: Device::Cpu,
                    expected: if dd == Device::Cpu { sd } else { dd },
                })?;
                for (what, d) in [("destination", dd), ("source", sd)] {
                    if d != Device::Cpu && d != cu.device() {
                        return Err(Error::Device {
                            op: "copy",
                            what,
                            got: d,
                            expected: cu.device(),
                        });
                    }
                }
                cu.bind()?;
                let stream = cu.stream(on);
                self.mark_used_on(stream);
                src.mark_used_on(stream);
                let raw = stream.cu_stream();
                // SAFETY: pointers are live for n bytes; ordering on `stream`.
                // Pageable host memory makes the driver stage the copy.
                unsafe {
                    match (dd, sd) {
                        (Device::Cpu, _) => {
                            let dst = std::slice::from_raw_parts_mut(self.host_ptr("copy")?, n);
                            dr::memcpy_dtoh_async(dst, src.device_ptr()?, raw)
                        }
                        (_, Device::Cpu) => {
                            let s = std::slice::from_raw_parts(src.host_ptr("copy")?, n);
                            dr::memcpy_htod_async(self.device_ptr()?, s, raw)
                        }
                        _ => dr::memcpy_dtod_async(self.device_ptr()?, src.device_ptr()?, n, raw),
                    }
                }
                .map_err(|e| Error::cuda("cuMemcpyAsync", e))?;
                if dd == Device::Cpu && !self.is_pinned() {
                    stream
                        .synchronize()
                        .map_err(|e| Error::cuda("cuStreamSynchronize", e))?;
                }
                Ok(())
            }
        }
    }

    /// Marks device storage as used by work on `stream` (see
    /// [`crate::cuda::DeviceBlock::used_on`]).
    fn mark_used_on(&self, stream: &std::sync::Arc<cudarc::driver::CudaStream>) {
        if let Storage::Cuda { block, .. } = &*self.storage {
            block.used_on(stream);
        }
    }

    /// Marks this tensor's device storage as used by the work queued so far
    /// on stream `on` of `ctx` (a collective or kernel launched there by
    /// another crate through [`Tensor::device_ptr`]), so that freeing it
    /// orders its reuse after that work. Does nothing for host tensors, a
    /// CPU context, or a context of another device.
    pub fn record_use(&self, ctx: &Ctx, on: StreamKind) {
        if let Some(cu) = ctx.cuda_ctx().filter(|c| c.device() == self.device()) {
            self.mark_used_on(cu.stream(on));
        }
    }

    /// Whether `self` and `other` are views of the same storage.
    pub fn same_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.storage, &other.storage)
    }
}
