//! The crate's error type. Every error about a record names where it came
//! from (`file:line`; for Parquet the line is the row number) and, when one field is at
//! fault, the field's path inside the record (`conversations[2].value`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a record came from: a file and a 1-based line (JSONL and text: the
/// line; JSON array: the line where the element starts, or for a syntax
/// error the line of the bad token; Parquet: the row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file the record was read from.
    pub path: Arc<Path>,
    /// 1-based line (or Parquet row) number.
    pub line: u64,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.path.display(), self.line)
    }
}

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path being read.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A record is not valid JSON.
    #[error("{at}: invalid JSON: {message}")]
    Json {
        /// Where the record starts.
        at: Location,
        /// What the JSON parser said.
        message: String,
    },
    /// A line (or JSON array element) holds a byte sequence that is not
    /// UTF-8.
    #[error("{at}: byte 0x{byte:02x} at byte offset {offset} of the line (byte {file_offset} of the file) is not valid UTF-8; the file must be UTF-8 text")]
    NotUtf8 {
        /// The record (its line is the line of the bad byte).
        at: Location,
        /// The bad byte.
        byte: u8,
        /// 0-based offset of the byte within its line.
        offset: u64,
        /// 0-based offset of the byte within the file.
        file_offset: u64,
    },
    /// A record has a missing or mistyped field, or a value the format rejects.
    #[error("{at}: field `{field}`: {message}")]
    Field {
        /// The record.
        at: Location,
        /// Path of the field inside the record, e.g. `conversations[2].value`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// The chat template failed on a record (for example its `raise_exception`).
    #[error("{at}: field `{field}`: chat template error: {message}")]
    TemplateRender {
        /// The record.
        at: Location,
        /// The conversation column the template was rendering.
        field: String,
        /// The template's message.
        message: String,
    },
    /// A chat template could not be compiled or is unusable for training.
    #[error("chat template `{name}`: {message}")]
    Template {
        /// Which template (`model`, a built-in name, or `custom`).
        name: String,
        /// What is wrong.
        message: String,
    },
    /// The tokenizer files could not be loaded or used.
    #[error("tokenizer {}: {message}", path.display())]
    Tokenizer {
        /// The tokenizer file or model directory.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A Parquet file could not be read.
    #[error("{}: parquet: {message}", path.display())]
    Parquet {
        /// The Parquet file.
        path: PathBuf,
        /// What the Parquet reader said.
        message: String,
    },
    /// A dataset source names nothing that exists.
    #[error("dataset `{0}` not found: not a file, directory, glob match or dataset in the Hugging Face cache")]
    NotFound(String),
    /// A configuration value is invalid.
    #[error("config key `{key}`: {message}")]
    Config {
        /// The key at fault, e.g. `batch.seq_len`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// The pipeline produced no examples to train on.
    #[error("no usable examples in {0}")]
    Empty(String),
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn field(
        at: &Location,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Error::Field {
            at: at.clone(),
            field: field.into(),
            message: message.into(),
        }
    }

    pub(crate) fn config(key: &str, message: impl Into<String>) -> Self {
        Error::Config {
            key: key.to_string(),
            message: message.into(),
        }
    }

    /// The record location this error is about, if it is about one record.
    /// Errors with a location are the ones `skip_bad_records` may skip.
    pub fn location(&self) -> Option<&Location> {
        match self {
            Error::Json { at, .. }
            | Error::Field { at, .. }
            | Error::TemplateRender { at, .. }
            | Error::NotUtf8 { at, .. } => Some(at),
            _ => None,
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
