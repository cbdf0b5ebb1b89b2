//! Loading: sources → records → examples → a compact tokenized dataset.

use std::fmt;

use rayon::prelude::*;

use crate::config::{DataConfig, DatasetSpec, ValidationConfig};
use crate::encode::{EncodedExample, Encoder, IGNORE_INDEX};
use crate::error::{Error, Location, Result};
use crate::format::RecordFormat;
use crate::reader::{read_file_bounded, Record};
use crate::rng::SplitMix64;
use crate::source::resolve;
use crate::tokenizer::ModelTokenizer;

/// Records encoded in parallel per chunk (order is kept).
const CHUNK: usize = 512;
/// Skipped-record messages kept in the report.
const KEEP_ERRORS: usize = 20;

/// Tokenized examples stored back to back: 4 bytes per token id and 1 per
/// trained flag, plus one offset per example. Raw files are streamed; only
/// this form is held in memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenizedDataset {
    ids: Vec<u32>,
    trained: Vec<bool>,
    offsets: Vec<usize>,
    truncated: Vec<bool>,
    pad_id: u32,
}

impl TokenizedDataset {
    /// An empty dataset padded with `pad_id`.
    pub fn new(pad_id: u32) -> Self {
        TokenizedDataset {
            offsets: vec![0],
            pad_id,
            ..Default::default()
        }
    }

    /// Append an example.
    pub fn push(&mut self, ex: &EncodedExample) {
        self.ids.extend_from_slice(&ex.input_ids);
        self.trained
            .extend(ex.labels.iter().map(|&l| l != IGNORE_INDEX));
        self.offsets.push(self.ids.len());
        self.truncated.push(ex.truncated);
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The padding id batches use.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Token count of example `i`.
    pub fn example_len(&self, i: usize) -> usize {
        self.offsets[i + 1] - self.offsets[i]
    }

    /// Token ids of example `i`.
    pub fn input_ids(&self, i: usize) -> &[u32] {
        &self.ids[self.offsets[i]..self.offsets[i + 1]]
    }

    /// Which tokens of example `i` are trained.
    pub fn trained(&self, i: usize) -> &[bool] {
        &self.trained[self.offsets[i]..self.offsets[i + 1]]
    }

    /// Example `i` with its labels.
    pub fn example(&self, i: usize) -> EncodedExample {
        let ids = self.input_ids(i);
        EncodedExample {
            input_ids: ids.to_vec(),
            labels: ids
                .iter()
                .zip(self.trained(i))
                .map(|(&id, &t)| if t { id as i32 } else { IGNORE_INDEX })
                .collect(),
            truncated: self.truncated[i],
        }
    }

    /// A dataset of the examples at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Self {
        let mut out = TokenizedDataset::new(self.pad_id);
        for &i in indices {
            out.ids.extend_from_slice(self.input_ids(i));
            out.trained.extend_from_slice(self.trained(i));
            out.offsets.push(out.ids.len());
            out.truncated.push(self.truncated[i]);
        }
        out
    }

    /// Hold out `ratio` of the examples (at least one of each side when
    /// there are two or more), chosen by a shuffle seeded with `seed`; both
    /// parts keep the original order.
    pub fn split(&self, ratio: f64, seed: u64) -> (Self, Self) {
        let n = self.len();
        let mut n_val = (ratio * n as f64).round() as usize;
        if ratio > 0.0 && n >= 2 {
            n_val = n_val.clamp(1, n - 1);
        }
        let mut order: Vec<usize> = (0..n).collect();
        SplitMix64::new(seed, 1, 0).shuffle(&mut order);
        let mut val = order[..n_val].to_vec();
        let mut train = order[n_val..].to_vec();
        val.sort_unstable();
        train.sort_unstable();
        (self.select(&train), self.select(&val))
    }

    /// Counts over the dataset.
    pub fn stats(&self) -> DatasetStats {
        let lens = (0..self.len()).map(|i| self.example_len(i));
        DatasetStats {
            examples: self.len(),
            tokens: self.ids.len(),
            trained_tokens: self.trained.iter().filter(|&&t| t).count(),
            truncated: self.truncated.iter().filter(|&&t| t).count(),
            max_len: lens.max().unwrap_or(0),
        }
    }
}

/// Dataset statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatasetStats {
    /// Examples.
    pub examples: usize,
    /// Tokens over all examples.
    pub tokens: usize,
    /// Tokens with a label (trained).
    pub trained_tokens: usize,
    /// Examples cut by `cutoff_len`.
    pub truncated: usize,
    /// Longest example, in tokens.
    pub max_len: usize,
}

impl fmt::Display for DatasetStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mean = if self.examples == 0 {
            0.0
        } else {
            self.tokens as f64 / self.examples as f64
        };
        write!(
            f,
            "{} examples, {} tokens ({} trained), mean length {:.1}, max length {}, {} truncated",
            self.examples, self.tokens, self.trained_tokens, mean, self.max_len, self.truncated
        )
    }
}

/// What loading saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Records read.
    pub records: usize,
    /// Examples produced (text can give several per record).
    pub examples: usize,
    /// Records skipped as bad (with `skip_bad_records`).
    pub skipped: usize,
    /// The first skipped records' errors.
    pub skipped_errors: Vec<String>,
    /// Examples cut by `cutoff_len`.
    pub truncated: usize,
    /// Examples dropped because their prompt alone exceeds `cutoff_len`.
    pub dropped: usize,
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} records → {} examples; {} truncated, {} dropped as too long, {} bad records skipped",
            self.records, self.examples, self.truncated, self.dropped, self.skipped
        )?;
        for e in &self.skipped_errors {
            write!(f, "\n  skipped: {e}")?;
        }
        if self.skipped > self.skipped_errors.len() {
            write!(
                f,
                "\n  ... and {} more",
                self.skipped - self.skipped_errors.len()
            )?;
        }
        Ok(())
    }
}

/// Training and validation data, ready for a [`crate::Loader`].
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Training examples.
    pub train: TokenizedDataset,
    /// Validation examples, if configured.
    pub validation: Option<TokenizedDataset>,
    /// What loading saw (training and validation sources together).
    pub report: LoadReport,
}

/// The data pipeline: a config and an encoder.
#[derive(Debug)]
pub struct Pipeline {
    config: DataConfig,
    encoder: Encoder,
    progress: Option<Progress>,
}

struct Progress(ProgressFn);

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<progress fn>")
    }
}

/// Told the records read so far (and the examples made of them) after
/// every chunk of records [`Pipeline::load`] encodes.
pub type ProgressFn = Box<dyn Fn(&LoadReport) + Send + Sync>;

impl Pipeline {
    /// Check `config` and build the encoder (template + tokenizer).
    pub fn new(config: DataConfig, tokenizer: ModelTokenizer) -> Result<Self> {
        let b = &config.batch;
        if b.batch_size == 0 {
            return Err(Error::config("batch.batch_size", "must be at least 1"));
        }
        if b.packing && b.seq_len != 0 && b.seq_len < config.cutoff_len {
            return Err(Error::config(
                "batch.seq_len",
                format!(
                    "{} is shorter than cutoff_len {}; packed rows must hold the longest example",
                    b.seq_len, config.cutoff_len
                ),
            ));
        }
        if let Some(ValidationConfig::Ratio(r)) = config.validation {
            if !(0.0..1.0).contains(&r) {
                return Err(Error::config(
                    "validation",
                    format!("ratio {r} is not in [0, 1)"),
                ));
            }
        }
        let encoder = Encoder::new(&config, tokenizer)?;
        Ok(Pipeline {
            config,
            encoder,
            progress: None,
        })
    }

    /// Calls `f` with the load report after every chunk of records
    /// [`Pipeline::load`] encodes (a progress display).
    pub fn with_progress(mut self, f: ProgressFn) -> Self {
        self.progress = Some(Progress(f));
        self
    }

    /// The configuration.
    pub fn config(&self) -> &DataConfig {
        &self.config
    }

    /// The encoder.
    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    /// Load training (and validation) data as configured.
    pub fn load(&self) -> Result<Prepared> {
        let mut report = LoadReport::default();
        let train = self.load_sources(&self.config.train, &mut report)?;
        let (train, validation) = match &self.config.validation {
            None => (train, None),
            Some(ValidationConfig::Ratio(r)) if *r == 0.0 => (train, None),
            Some(ValidationConfig::Ratio(r)) => {
                let (t, v) = train.split(*r, self.config.batch.seed);
                (t, Some(v))
            }
            Some(ValidationConfig::Datasets(specs)) => {
                let v = self.load_sources(specs, &mut report)?;
                (train, Some(v))
            }
        };
        if train.is_empty() {
            let names: Vec<&str> = self.config.train.iter().map(|s| s.path.as_str()).collect();
            return Err(Error::Empty(if names.is_empty() {
                "`train` (no sources configured)".into()
            } else {
                names.join(", ")
            }));
        }
        Ok(Prepared {
            train,
            validation,
            report,
        })
    }

    /// Load and encode `specs`, adding to `report`.
    pub fn load_sources(
        &self,
        specs: &[DatasetSpec],
        report: &mut LoadReport,
    ) -> Result<TokenizedDataset> {
        let mut out = TokenizedDataset::new(self.encoder.tokenizer().pad_id());
        for spec in specs {
            let format = RecordFormat::new(spec);
            let mut remaining = spec.max_samples.unwrap_or(usize::MAX);
            for file in resolve(&spec.path, spec.split.as_deref())? {
                let mut records = read_file_bounded(
                    &file,
                    format.text_column(),
                    self.encoder.max_useful_bytes(),
                )?;
                while remaining > 0 {
                    let chunk: Vec<Result<Record>> =
                        records.by_ref().take(CHUNK.min(remaining)).collect();
                    if chunk.is_empty() {
                        break;
                    }
                    remaining -= chunk.len();
                    report.records += chunk.len();
                    let encoded: Vec<Result<Vec<EncodedExample>>> = chunk
                        .into_par_iter()
                        .map(|r| r.and_then(|rec| self.encode_record(&format, &rec.value, &rec.at)))
                        .collect();
                    for result in encoded {
                        match result {
                            Ok(examples) if examples.is_empty() => report.dropped += 1,
                            Ok(examples) => {
                                for ex in &examples {
                                    report.examples += 1;
                                    report.truncated += usize::from(ex.truncated);
                                    out.push(ex);
                                }
                            }
                            Err(e) if self.config.skip_bad_records && e.location().is_some() => {
                                report.skipped += 1;
                                if report.skipped_errors.len() < KEEP_ERRORS {
                                    report.skipped_errors.push(e.to_string());
                                }
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    if let Some(p) = &self.progress {
                        (p.0)(report);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Parse and encode one record.
    pub fn encode_record(
        &self,
        format: &RecordFormat,
        value: &serde_json::Value,
        at: &Location,
    ) -> Result<Vec<EncodedExample>> {
        let example = format.parse(value, at)?;
        self.encoder.encode(&example, at)
    }
}
