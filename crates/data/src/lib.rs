//! llmft-data (skeleton; filled in by its issue).

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operation this crate does not support yet.
    #[error("{0} is not supported yet")]
    Unsupported(&'static str),
}
