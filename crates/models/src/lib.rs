//! llmft-models: Llama and Qwen models from Hugging Face directories with hand-written forward and backward (the models issue fills it).

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tensor layer failed.
    #[error(transparent)]
    Tensor(#[from] llmft_tensor::Error),
}
