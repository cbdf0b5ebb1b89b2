//! The error type of the tensor layer.
use crate::{DType, Device};

/// Errors of the tensor layer. None of them is raised by a panic.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Two shapes that must agree do not.
    #[error("{op}: shape mismatch: {what} has shape {got:?}, expected {expected:?}")]
    Shape {
        /// The operation.
        op: &'static str,
        /// Which argument.
        what: &'static str,
        /// Its shape.
        got: Vec<usize>,
        /// The shape the operation needs.
        expected: Vec<usize>,
    },
    /// A dtype the operation does not accept.
    #[error("{op}: {what} has dtype {got}, expected {expected}")]
    DType {
        /// The operation.
        op: &'static str,
        /// Which argument.
        what: &'static str,
        /// Its dtype.
        got: DType,
        /// What the operation needs.
        expected: String,
    },
    /// Tensors on different devices, or on another device than the context.
    #[error("{op}: {what} lives on {got}, but the context is {expected}")]
    Device {
        /// The operation.
        op: &'static str,
        /// Which argument.
        what: &'static str,
        /// Its device.
        got: Device,
        /// The context's device.
        expected: Device,
    },
    /// A bad argument value (index out of range, bad view, ...).
    #[error("{op}: {msg}")]
    Invalid {
        /// The operation.
        op: &'static str,
        /// What is wrong.
        msg: String,
    },
    /// Host memory could not be allocated.
    #[error("out of host memory: could not allocate {requested} bytes")]
    HostOutOfMemory {
        /// Bytes requested.
        requested: usize,
    },
    /// The device allocator could not satisfy a request.
    #[error(
        "out of GPU memory on {device}: asked for {requested} bytes; {free} of {total} bytes free, \
         {cached} bytes cached by llmft, {in_use} bytes in use by llmft"
    )]
    OutOfMemory {
        /// The device.
        device: Device,
        /// Bytes requested.
        requested: usize,
        /// Free bytes reported by the driver after emptying the cache.
        free: usize,
        /// Total bytes of the device.
        total: usize,
        /// Bytes held in the allocator cache at the time.
        cached: usize,
        /// Bytes handed out by the allocator at the time.
        in_use: usize,
    },
    /// No usable CUDA driver or device, where one was asked for.
    #[error("no CUDA GPU is available: {0}")]
    NoCuda(String),
    /// A CUDA driver / cuBLASLt call failed.
    #[error("CUDA error in {call}: {msg}")]
    Cuda {
        /// What was being done.
        call: &'static str,
        /// The driver's message.
        msg: String,
    },
    /// Kernel compilation failed.
    #[error(transparent)]
    Kernel(#[from] llmft_kernels::Error),
}

/// Result alias of the tensor layer.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn cuda(call: &'static str, e: impl std::fmt::Debug) -> Self {
        Error::Cuda {
            call,
            msg: format!("{e:?}"),
        }
    }
}
