//! The error type of llmft-trainer.
use std::path::PathBuf;

/// Errors of llmft-trainer. Bad input (config, checkpoint files) is reported
/// here with the file or key at fault, never by a panic.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tensor layer failed.
    #[error(transparent)]
    Tensor(#[from] llmft_tensor::Error),
    /// The model failed (forward, backward, loading).
    #[error(transparent)]
    Model(#[from] llmft_models::Error),
    /// The adapter failed (saving, loading).
    #[error(transparent)]
    Lora(#[from] llmft_lora::Error),
    /// The data pipeline failed (loader configuration).
    #[error(transparent)]
    Data(#[from] llmft_data::Error),
    /// A collective of the data-parallel group failed (a peer died, timed
    /// out or disagreed).
    #[error(transparent)]
    Dist(#[from] llmft_shard::Error),
    /// An invalid training configuration value.
    #[error("training config: {0}")]
    Config(String),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint file that is missing, truncated or inconsistent.
    #[error("corrupt checkpoint file {path}: {msg}")]
    Checkpoint {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// Writing checkpoint `step` failed (disk full, a file-size limit, a
    /// rank's file missing); its unfinished folder is removed and earlier
    /// checkpoints are untouched.
    #[error(
        "checkpoint {step} was not saved: {path}: {source}; earlier checkpoints are untouched"
    )]
    CheckpointWrite {
        /// The step of the checkpoint.
        step: u64,
        /// The file being written (or read back).
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A non-finite loss or gradient norm under `nan_policy = "stop"`.
    #[error(
        "step {step}: non-finite loss {loss} or gradient norm {grad_norm}; training stopped \
         (nan_policy = \"stop\"; lower the learning rate or set nan_policy = \"skip\")"
    )]
    NonFinite {
        /// The step (1-based) that produced it.
        step: u64,
        /// The step's loss.
        loss: f64,
        /// The step's global gradient norm.
        grad_norm: f32,
    },
    /// Memory ran out during training step `step` (the cause names the
    /// device and the request); the caller suggests smaller settings.
    #[error("out of memory at training step {step}: {source}")]
    OutOfMemory {
        /// The step (1-based).
        step: u64,
        /// The allocation failure.
        #[source]
        source: Box<Error>,
    },
    /// The model has no adapter attached (LoRA training needs one).
    #[error("the model has no adapter attached: attach one with Model::attach_adapter first")]
    NoAdapter,
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Maps an IO error to [`Error::Io`] naming `path`.
pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { path, source }
}
