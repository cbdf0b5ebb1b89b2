//! llmft-offload: pinned host pools, offloaded weight stores, a CPU optimizer and activation offload (the offload issue fills it).

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tensor layer failed.
    #[error(transparent)]
    Tensor(#[from] llmft_tensor::Error),
}
