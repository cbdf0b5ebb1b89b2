//! llmft-offload: pinned host pools, offloaded weight stores, a CPU optimizer and activation offload (the offload issue fills it).

pub mod cpu_adam;
mod store;

pub use cpu_adam::{AdamWTensor, CpuAdamW, Grad, GradElement};
pub use store::{
    check_host_memory, host_memory_available, OffloadCounters, OffloadStats, Offloaded,
    OffloadedBuilder, OffloadedConfig, PARAMS_SETTING,
};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tensor layer failed.
    #[error(transparent)]
    Tensor(#[from] llmft_tensor::Error),
    /// An argument or setting was invalid (such as slices of different lengths).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A setting needs more host memory than is available.
    #[error(
        "{setting} needs {needed} bytes of host memory{}, but only {available} are available",
        store::host_memory_purpose(.setting)
    )]
    HostMemory {
        /// The configuration key asking for the memory (`offload.params`, ...).
        setting: String,
        /// Bytes it needs.
        needed: usize,
        /// Bytes available ([`host_memory_available`]).
        available: usize,
    },
}
