//! Errors of the model crate: each names the file, tensor or key at fault.
use std::path::PathBuf;

/// Errors of llmft-models.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tensor layer failed.
    #[error(transparent)]
    Tensor(#[from] llmft_tensor::Error),
    /// An adapter operation failed.
    #[error(transparent)]
    Lora(#[from] llmft_lora::Error),
    /// Quantization failed.
    #[error(transparent)]
    Quant(#[from] llmft_quant::Error),
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// config.json is malformed or describes something unsupported.
    #[error("{path}: {msg}")]
    Config {
        /// The config file (or `<preset>`).
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A safetensors file is corrupt or truncated.
    #[error("{path}: not a valid safetensors file: {msg}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        msg: String,
    },
    /// A tensor the model needs is absent from the checkpoint.
    #[error("{dir}: tensor `{name}` is missing from the checkpoint")]
    MissingTensor {
        /// The model folder.
        dir: PathBuf,
        /// The tensor.
        name: String,
    },
    /// A tensor's shape disagrees with config.json.
    #[error("{path}: tensor `{name}` has shape {got:?}, but config.json implies {expected:?}")]
    TensorShape {
        /// The file holding it.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// Its shape in the file.
        got: Vec<usize>,
        /// The shape config.json implies.
        expected: Vec<usize>,
    },
    /// A tensor has a dtype llmft cannot load.
    #[error("{path}: tensor `{name}` has dtype {dtype}, which llmft cannot load")]
    TensorDType {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// Its dtype.
        dtype: String,
    },
    /// A batch or argument is inconsistent.
    #[error("{0}")]
    Invalid(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
