//! Metrics as JSON Lines: one object per logged step.
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::io;
use crate::Result;

/// Appends one JSON object per line to a file, flushed after each line so a
/// crash loses at most the line being written.
pub struct MetricsWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl MetricsWriter {
    /// Opens `path` for appending (a resumed run continues the same file).
    pub fn append(path: &Path) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        let file = File::options()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io(path))?;
        Ok(Self {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        })
    }

    /// Writes `record` (e.g. a [`crate::StepStats`]) as one line.
    pub fn write<T: Serialize>(&mut self, record: &T) -> Result<()> {
        let line = serde_json::to_string(record).expect("metrics records serialize");
        writeln!(self.out, "{line}")
            .and_then(|_| self.out.flush())
            .map_err(io(&self.path))
    }
}
