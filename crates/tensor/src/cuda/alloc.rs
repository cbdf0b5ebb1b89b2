//! A caching device allocator: freed blocks go to per-size-class free lists and
//! are handed out again, so steady-state training never calls cudaMalloc.
//!
//! Blocks are ordered on the compute stream: a block freed there may be reused
//! by later work on the same stream without synchronization. A block that
//! other streams touched (a copy on the copy stream, a collective on the comm
//! stream) is marked with [`DeviceBlock::used_on`]; when it is dropped, the
//! compute stream is made to wait for those streams' work queued so far, so
//! whatever reuses the block next runs after them.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{result as dr, sys as dsys, CudaContext, CudaStream, DriverError};

use crate::{Device, Error, Result};

const SMALL: usize = 1 << 20;
const SMALL_ROUND: usize = 512;
const LARGE_ROUND: usize = 2 << 20;

/// Counters of the allocator, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AllocStats {
    /// Bytes in blocks currently handed out.
    pub in_use: usize,
    /// Bytes in cached (free) blocks.
    pub cached: usize,
    /// Highest `in_use` seen since the last [`CachingAllocator::reset_peak`].
    pub peak_in_use: usize,
    /// Number of cudaMalloc calls made.
    pub device_mallocs: usize,
}

/// The caching allocator of one device.
pub struct CachingAllocator {
    context: Arc<CudaContext>,
    ordinal: usize,
    compute: Arc<CudaStream>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    free: BTreeMap<usize, Vec<u64>>,
    stats: AllocStats,
}

/// A device allocation handed out by [`CachingAllocator`]; returns to the
/// cache on drop.
pub struct DeviceBlock {
    ptr: u64,
    size: usize,
    alloc: Arc<CachingAllocator>,
    /// Streams other than the compute stream that used the block.
    used_on: Mutex<Vec<Arc<CudaStream>>>,
}

impl DeviceBlock {
    /// Device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    /// Size in bytes (rounded up to the size class).
    pub fn size(&self) -> usize {
        self.size
    }

    /// Marks the block as used by work queued on `stream` (besides the
    /// compute stream), so that freeing it orders its reuse after that work.
    pub fn used_on(&self, stream: &Arc<CudaStream>) {
        if Arc::ptr_eq(stream, &self.alloc.compute) {
            return;
        }
        let mut u = self.used_on.lock().unwrap();
        if !u.iter().any(|s| Arc::ptr_eq(s, stream)) {
            u.push(stream.clone());
        }
    }
}

impl Drop for DeviceBlock {
    fn drop(&mut self) {
        for s in self.used_on.get_mut().unwrap().drain(..) {
            // A failure here means the context is broken; the next launch reports it.
            let _ = self.alloc.compute.join(&s);
        }
        let mut st = self.alloc.state.lock().unwrap();
        st.stats.in_use -= self.size;
        st.stats.cached += self.size;
        st.free.entry(self.size).or_default().push(self.ptr);
    }
}

/// The size class a request of `bytes` is served from.
pub fn size_class(bytes: usize) -> usize {
    let bytes = bytes.max(1);
    if bytes < SMALL {
        bytes.div_ceil(SMALL_ROUND) * SMALL_ROUND
    } else {
        bytes.div_ceil(LARGE_ROUND) * LARGE_ROUND
    }
}

impl CachingAllocator {
    pub(crate) fn new(context: Arc<CudaContext>, ordinal: usize, compute: Arc<CudaStream>) -> Self {
        Self {
            context,
            ordinal,
            compute,
            state: Mutex::new(State::default()),
        }
    }

    /// Current counters.
    pub fn stats(&self) -> AllocStats {
        self.state.lock().unwrap().stats
    }

    /// Sets the peak to the current use.
    pub fn reset_peak(&self) {
        let mut st = self.state.lock().unwrap();
        st.stats.peak_in_use = st.stats.in_use;
    }

    /// Allocates at least `bytes` bytes (256-byte aligned).
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<DeviceBlock> {
        let size = size_class(bytes);
        {
            let mut st = self.state.lock().unwrap();
            let reuse = st.free.get_mut(&size).and_then(|v| v.pop());
            if let Some(ptr) = reuse {
                st.stats.cached -= size;
                Self::count_use(&mut st.stats, size);
                return Ok(DeviceBlock {
                    ptr,
                    size,
                    alloc: self.clone(),
                    used_on: Mutex::new(Vec::new()),
                });
            }
        }
        self.context
            .bind_to_thread()
            .map_err(|e| Error::cuda("cuCtxSetCurrent", e))?;
        // SAFETY: the context is current; the pointer is owned by the block.
        let ptr = match unsafe { dr::malloc_sync(size) } {
            Ok(p) => p,
            Err(DriverError(dsys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY)) => {
                self.empty_cache()?;
                // SAFETY: as above.
                unsafe { dr::malloc_sync(size) }.map_err(|_| self.oom(bytes))?
            }
            Err(e) => return Err(Error::cuda("cuMemAlloc", e)),
        };
        let mut st = self.state.lock().unwrap();
        st.stats.device_mallocs += 1;
        Self::count_use(&mut st.stats, size);
        Ok(DeviceBlock {
            ptr,
            size,
            alloc: self.clone(),
            used_on: Mutex::new(Vec::new()),
        })
    }

    fn count_use(stats: &mut AllocStats, size: usize) {
        stats.in_use += size;
        stats.peak_in_use = stats.peak_in_use.max(stats.in_use);
    }

    fn oom(&self, requested: usize) -> Error {
        let (free, total) = self.context.mem_get_info().unwrap_or((0, 0));
        let st = self.stats();
        Error::OutOfMemory {
            device: Device::Cuda(self.ordinal),
            requested,
            free,
            total,
            cached: st.cached,
            in_use: st.in_use,
        }
    }

    /// Returns every cached block to the driver (after the device is idle).
    pub fn empty_cache(&self) -> Result<()> {
        self.context
            .synchronize()
            .map_err(|e| Error::cuda("cuCtxSynchronize", e))?;
        let mut st = self.state.lock().unwrap();
        let free = std::mem::take(&mut st.free);
        for (_, ptrs) in free {
            for p in ptrs {
                // SAFETY: p came from malloc_sync and is in no live block.
                unsafe { dr::free_sync(p) }.map_err(|e| Error::cuda("cuMemFree", e))?;
            }
        }
        st.stats.cached = 0;
        Ok(())
    }
}

impl Drop for CachingAllocator {
    fn drop(&mut self) {
        // Every block is back (blocks hold the allocator alive); free the cache.
        let _ = self.empty_cache();
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_round_up() {
        assert_eq!(size_class(0), 512);
        assert_eq!(size_class(1), 512);
        assert_eq!(size_class(513), 1024);
        assert_eq!(size_class((1 << 20) + 1), 2 << 20);
        assert_eq!(size_class(3 << 20), 4 << 20);
    }
}
