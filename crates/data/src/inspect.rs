//! Human-readable views for `llmft data inspect`: one example with its
//! trained span marked, and counts.

use std::fmt;

use crate::config::DatasetSpec;
use crate::dataset::Pipeline;
use crate::encode::{EncodedExample, IGNORE_INDEX};
use crate::error::{Location, Result};
use crate::format::RecordFormat;
use crate::reader::read_file_bounded;
use crate::source::resolve;
use crate::tokenizer::ModelTokenizer;

/// Opens a trained span in [`ExampleView::marked`].
pub const TRAINED_OPEN: &str = "⟦";
/// Closes a trained span in [`ExampleView::marked`].
pub const TRAINED_CLOSE: &str = "⟧";

/// One example as text, trained spans between [`TRAINED_OPEN`] and
/// [`TRAINED_CLOSE`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExampleView {
    /// The decoded text with trained spans marked.
    pub marked: String,
    /// Tokens.
    pub tokens: usize,
    /// Trained tokens.
    pub trained_tokens: usize,
    /// Whether `cutoff_len` cut the example.
    pub truncated: bool,
}

impl ExampleView {
    /// Decode `example` run by run (maximal stretches with the same mask).
    pub fn new(tokenizer: &ModelTokenizer, example: &EncodedExample) -> Result<Self> {
        let ids = &example.input_ids;
        let mut marked = String::new();
        let mut start = 0;
        while start < ids.len() {
            let trained = example.labels[start] != IGNORE_INDEX;
            let end = (start..ids.len())
                .find(|&t| (example.labels[t] != IGNORE_INDEX) != trained)
                .unwrap_or(ids.len());
            let text = tokenizer.decode(&ids[start..end])?;
            if trained {
                marked.push_str(TRAINED_OPEN);
                marked.push_str(&text);
                marked.push_str(TRAINED_CLOSE);
            } else {
                marked.push_str(&text);
            }
            start = end;
        }
        Ok(ExampleView {
            marked,
            tokens: ids.len(),
            trained_tokens: example.trained_tokens(),
            truncated: example.truncated,
        })
    }
}

impl fmt::Display for ExampleView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.marked)?;
        write!(
            f,
            "-- {} tokens: {} prompt (masked), {} trained{}",
            self.tokens,
            self.tokens - self.trained_tokens,
            self.trained_tokens,
            if self.truncated { ", truncated" } else { "" }
        )
    }
}

impl Pipeline {
    /// The first `n` examples of `spec`, rendered for inspection; bad
    /// records are reported as errors (never skipped here).
    pub fn inspect(&self, spec: &DatasetSpec, n: usize) -> Result<Vec<(Location, ExampleView)>> {
        let format = RecordFormat::new(spec);
        let mut out = Vec::new();
        for file in resolve(&spec.path, spec.split.as_deref())? {
            for rec in read_file_bounded(
                &file,
                format.text_column(),
                self.encoder().max_useful_bytes(),
            )? {
                if out.len() >= n {
                    return Ok(out);
                }
                let rec = rec?;
                for ex in self.encode_record(&format, &rec.value, &rec.at)? {
                    out.push((
                        rec.at.clone(),
                        ExampleView::new(self.encoder().tokenizer(), &ex)?,
                    ));
                }
            }
        }
        Ok(out)
    }
}
