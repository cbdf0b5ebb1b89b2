//! Devices and the per-device context.
use std::sync::Arc;

use crate::cuda::{CudaCtx, StreamKind};
use crate::{Error, Result};

/// Where a tensor lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    /// Host memory.
    Cpu,
    /// The CUDA device with this ordinal.
    Cuda(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| Error::Invalid {
                    op: "device",
                    msg: format!("`{s}` is not a device; use cpu, cuda or cuda:N"),
                }),
        }
    }
}

/// Number of CUDA devices usable here; 0 where the driver library is absent
/// or reports no device. Never panics.
pub fn cuda_device_count() -> usize {
    crate::cuda::device_count()
}

/// A device context: for CUDA, the streams, cuBLASLt handle, kernel cache and
/// caching allocator of one GPU; for the CPU, nothing. Cheap to clone.
#[derive(Clone)]
pub struct Ctx(Arc<Inner>);

enum Inner {
    Cpu,
    Cuda(Box<CudaCtx>),
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ctx({})", self.device())
    }
}

impl Ctx {
    /// The CPU context.
    pub fn cpu() -> Self {
        Ctx(Arc::new(Inner::Cpu))
    }

    /// A context for CUDA device `ordinal`, or [`Error::NoCuda`] saying why not.
    pub fn cuda(ordinal: usize) -> Result<Self> {
        Ok(Ctx(Arc::new(Inner::Cuda(Box::new(CudaCtx::new(ordinal)?)))))
    }

    /// A context for `device`.
    pub fn new(device: Device) -> Result<Self> {
        match device {
            Device::Cpu => Ok(Self::cpu()),
            Device::Cuda(i) => Self::cuda(i),
        }
    }

    /// CUDA device 0 when one is usable, else the CPU.
    pub fn best() -> Self {
        if cuda_device_count() > 0 {
            match Self::cuda(0) {
                Ok(c) => return c,
                // E.g. a driver too old for this build: say why, once.
                Err(e) => eprintln!("cuda:0 is not used ({e}); running on the CPU"),
            }
        }
        Self::cpu()
    }

    /// The device of this context.
    pub fn device(&self) -> Device {
        match &*self.0 {
            Inner::Cpu => Device::Cpu,
            Inner::Cuda(c) => Device::Cuda(c.ordinal()),
        }
    }

    /// The CUDA part of the context, if this is a CUDA context.
    pub fn cuda_ctx(&self) -> Option<&CudaCtx> {
        match &*self.0 {
            Inner::Cpu => None,
            Inner::Cuda(c) => Some(c),
        }
    }

    /// An event marking the work queued so far on stream `on` (on the CPU,
    /// where everything is synchronous, an empty event).
    pub fn record(&self, on: StreamKind) -> Result<Event> {
        Ok(Event(match self.cuda_ctx() {
            Some(c) => Some(c.record(on)?),
            None => None,
        }))
    }

    /// Makes stream `waiter` wait for `event` without blocking the host.
    pub fn wait(&self, waiter: StreamKind, event: &Event) -> Result<()> {
        match (self.cuda_ctx(), &event.0) {
            (Some(c), Some(e)) => c.wait_event(waiter, e),
            _ => Ok(()),
        }
    }

    /// Makes stream `waiter` wait for all work queued so far on stream `on`.
    pub fn wait_for(&self, waiter: StreamKind, on: StreamKind) -> Result<()> {
        match self.cuda_ctx() {
            Some(c) if waiter != on => c.wait_for(waiter, on),
            _ => Ok(()),
        }
    }

    /// Waits until all work queued on this context's streams has finished.
    pub fn synchronize(&self) -> Result<()> {
        match &*self.0 {
            Inner::Cpu => Ok(()),
            Inner::Cuda(c) => c.synchronize(),
        }
    }
}

/// A point in a stream's queue ([`Ctx::record`]): other streams wait for it
/// ([`Ctx::wait`]) and the host can block on it ([`Event::synchronize`]).
pub struct Event(Option<cudarc::driver::CudaEvent>);

impl Event {
    /// An event that is already complete.
    pub fn done() -> Self {
        Event(None)
    }

    /// Blocks the host until the recorded work has finished.
    pub fn synchronize(&self) -> Result<()> {
        match &self.0 {
            Some(e) => e
                .synchronize()
                .map_err(|e| Error::cuda("cuEventSynchronize", e)),
            None => Ok(()),
        }
    }
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Event(cuda)"
        } else {
            "Event(done)"
        })
    }
}
