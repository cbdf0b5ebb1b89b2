//! The error type of llmft-quant.

/// Errors of llmft-quant. Malformed input is reported here, never by a panic.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error of the tensor layer (device, allocation, kernel launch).
    #[error(transparent)]
    Tensor(#[from] llmft_tensor::Error),
    /// A buffer whose length does not fit the shape or format.
    #[error("{what}: {got} elements/bytes, expected {expected}")]
    Length {
        /// Which buffer.
        what: String,
        /// Its length.
        got: usize,
        /// The length the shape and format require.
        expected: usize,
    },
    /// A shape the format cannot hold.
    #[error("bad shape {shape:?}: {msg}")]
    Shape {
        /// The shape.
        shape: Vec<usize>,
        /// Why.
        msg: String,
    },
    /// A dtype the operation does not accept.
    #[error("{what} has dtype {got}, expected {expected}")]
    DType {
        /// Which tensor.
        what: String,
        /// Its dtype.
        got: String,
        /// What is accepted.
        expected: String,
    },
    /// A quantization parameter out of its range (block size, bits, ...).
    #[error("invalid quantization parameter: {0}")]
    Param(String),
    /// A format tag that is not known (`quant_type`, packing, ...).
    #[error("unknown quantization format `{0}`")]
    UnknownFormat(String),
    /// A key a checkpoint must hold is missing.
    #[error("missing tensor or key `{0}`")]
    Missing(String),
    /// A checkpoint's metadata could not be read.
    #[error("bad quantization metadata in `{key}`: {msg}")]
    Metadata {
        /// The key at fault.
        key: String,
        /// What is wrong.
        msg: String,
    },
    /// A safetensors file could not be read or written.
    #[error("safetensors: {0}")]
    SafeTensors(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Result alias of llmft-quant.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn len_check(what: &str, got: usize, expected: usize) -> Result<()> {
    if got != expected {
        return Err(Error::Length {
            what: what.to_string(),
            got,
            expected,
        });
    }
    Ok(())
}
