//! The error type of llmft-lora.
use std::path::PathBuf;

/// Errors of llmft-lora. Bad input (config, adapter files, shapes) is
/// reported here, never by a panic.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error of the tensor layer (device, allocation, kernel launch).
    #[error(transparent)]
    Tensor(#[from] llmft_tensor::Error),
    /// A LoRA configuration value that is invalid or not supported.
    #[error("LoRA config: {0}")]
    Config(String),
    /// A tensor argument of the wrong shape.
    #[error("{what} has shape {got:?}, expected {expected:?}")]
    Shape {
        /// Which argument.
        what: String,
        /// Its shape.
        got: Vec<usize>,
        /// The shape needed.
        expected: Vec<usize>,
    },
    /// A tensor argument of the wrong dtype.
    #[error("{what} has dtype {got}, expected {expected}")]
    DType {
        /// Which argument.
        what: String,
        /// Its dtype.
        got: llmft_tensor::DType,
        /// What is accepted.
        expected: String,
    },
    /// A DoRA layer whose magnitude vector was never set.
    #[error(
        "DoRA magnitude of {module} is not initialized: call init_magnitude with its base weight"
    )]
    MagnitudeNotInitialized {
        /// The module name.
        module: String,
    },
    /// The configuration targets none of the model's linear layers.
    #[error("LoRA config targets none of the {count} linear layers of the model (target_modules {targets})")]
    NoTargets {
        /// How many linear layers the model offered.
        count: usize,
        /// The target_modules setting.
        targets: String,
    },
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A JSON file that does not parse as expected.
    #[error("{}: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// A safetensors file that does not parse or cannot be written.
    #[error("{}: {msg}", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A tensor the adapter needs is not in the adapter file.
    #[error("{}: missing key {key}", path.display())]
    MissingKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// A tensor in the adapter file that no targeted module uses.
    #[error("{}: unexpected key {key} ({why})", path.display())]
    UnexpectedKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// Why it does not fit.
        why: String,
    },
    /// A tensor of the adapter file with the wrong shape.
    #[error("{}: key {key} has shape {got:?}, expected {expected:?}", path.display())]
    KeyShape {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// Its shape.
        got: Vec<usize>,
        /// The shape the model and config need.
        expected: Vec<usize>,
    },
    /// A LoRA matrix whose rank differs from the rank adapter_config.json gives.
    #[error(
        "{}: key {key} has rank {got}, but adapter_config.json gives r = {expected} for this module",
        path.display()
    )]
    RankMismatch {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// The rank in the file.
        got: usize,
        /// The rank of the config.
        expected: usize,
    },
    /// A tensor of the adapter file with a dtype that is not a float type.
    #[error("{}: key {key} has dtype {got}, expected F32, BF16 or F16", path.display())]
    KeyDType {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// Its dtype as safetensors names it.
        got: String,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
