//! llmft-lora: LoRA, rsLoRA and DoRA adapters over any base linear, with PEFT-compatible IO (the LoRA issue fills it).

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tensor layer failed.
    #[error(transparent)]
    Tensor(#[from] llmft_tensor::Error),
}
