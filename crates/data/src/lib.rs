//! llmft-data: from dataset files to training batches.
//!
//! Records are read as a stream (JSONL, JSON arrays, Parquet, plain text;
//! files, directories, globs, or a dataset in the local Hugging Face cache),
//! parsed in a LLaMA-Factory format (alpaca, sharegpt, OpenAI messages, raw
//! text), rendered by a chat template (the model's own Jinja
//! `chat_template` by default, or a built-in or custom one), tokenized with
//! `tokenizers`, masked so that only assistant turns are trained, and
//! batched — packed into fixed-length rows with per-example boundaries, or
//! padded — with a seeded shuffle, per-rank shards and a resumable cursor.
//! Labels follow the Hugging Face convention (aligned with the inputs,
//! [`IGNORE_INDEX`] where not trained); [`Batch::targets`] gives the
//! next-token targets shifted within each packed example.
//!
//! ```
//! use llmft_data::{DataConfig, Loader, ModelTokenizer, Pipeline, Shard};
//!
//! let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/chat");
//! let tokenizer = ModelTokenizer::from_dir(format!("{fixtures}/llama3"))?;
//! let config: DataConfig = serde_json::from_value(serde_json::json!({
//!     "train": [format!("{fixtures}/conversations.jsonl")],
//!     "cutoff_len": 128,
//!     "batch": { "batch_size": 2, "seed": 7 },
//! }))?;
//! let pipeline = Pipeline::new(config, tokenizer)?;
//! let data = pipeline.load()?;
//! println!("{}", data.train.stats());
//!
//! let mut loader = Loader::new(&data.train, pipeline.config(), Shard::single())?;
//! let batch = loader.next_batch().expect("one batch");
//! assert_eq!(batch.input_ids.len(), batch.rows * batch.seq_len);
//! assert!(batch.num_trained() > 0);
//!
//! // Resume: a cursor saved with a checkpoint continues exactly there.
//! let saved = loader.cursor();
//! let mut resumed = Loader::new(&data.train, pipeline.config(), Shard::single())?;
//! resumed.seek(saved);
//! assert_eq!(resumed.next_batch(), loader.next_batch());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod batch;
mod bounds;
mod config;
mod dataset;
mod encode;
mod error;
mod format;
mod inspect;
mod reader;
mod rng;
mod source;
mod template;
mod tokenizer;

pub use batch::{Batch, Cursor, Loader, Shard, MAX_EMPTY_EPOCHS};
pub use config::{
    BatchConfig, Columns, CustomTemplate, DataConfig, DatasetSpec, Format, Tags, TemplateConfig,
    ValidationConfig,
};
pub use dataset::{DatasetStats, LoadReport, Pipeline, Prepared, ProgressFn, TokenizedDataset};
pub use encode::{
    EncodedExample, Encoder, TokenizedChat, CUT_SLACK_TOKENS, IGNORE_INDEX, TEXT_PIECE_BYTES,
};
pub use error::{Error, Location, Result};
pub use format::{Conversation, Example, Message, RecordFormat, Role};
pub use inspect::{ExampleView, TRAINED_CLOSE, TRAINED_OPEN};
pub use reader::{read_file, read_file_bounded, Record, RecordIter};
pub use rng::SplitMix64;
pub use source::{hub_cache_dir, hub_snapshot, resolve, FileKind};
pub use template::{builtin, ChatTemplate, JinjaTemplate, MaskRule, RenderedChat, SegmentTemplate};
pub use tokenizer::{ModelTokenizer, Offsets};
