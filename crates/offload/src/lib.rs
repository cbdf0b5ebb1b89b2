//! llmft-offload: what lets a model train on a GPU smaller than it, by
//! keeping in host memory what is not being computed on.
//!
//! - [`Offloaded`]: a [`llmft_tensor::store::WeightStore`] whose units live in
//!   pinned host memory and are copied to reused GPU buffers ahead of use,
//!   along the pass order the model declares (`offload.params`).
//! - [`CpuAdamW`]: a threaded, vectorized host AdamW, bit-identical to the
//!   tensor layer's CPU reference, for optimizer state kept in host memory
//!   (`offload.optimizer`, used by `llmft-trainer`).
//! - [`check_host_memory`]: the up-front check that a setting's pinned bytes
//!   fit the machine.
//!
//! Activation offload needs the model's records and lives in `llmft-models`
//! (`Model::offload_activations`) on the tensor layer's pinned pool and stash
//! stream. The [`store`] module documents the offloaded store, with an example.

pub mod cpu_adam;
pub mod store;

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
