//! llmft-trainer: the training loop, AdamW, schedules, accumulation, clipping, checkpoints and metrics (the trainer issue fills it).

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tensor layer failed.
    #[error(transparent)]
    Tensor(#[from] llmft_tensor::Error),
}
