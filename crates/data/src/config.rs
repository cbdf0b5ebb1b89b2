//! Serde-deserializable configuration. Every field has a documented default,
//! so an empty table is a valid `DataConfig` (with no data yet); the CLI
//! embeds [`DataConfig`] in its layered config.

use serde::{Deserialize, Serialize};

/// The data pipeline's configuration.
///
/// ```toml
/// train = ["data/chat.jsonl", { path = "owner/dataset", format = "sharegpt" }]
/// validation = 0.05            # or a list of dataset specs
/// template = "model"           # "llama3", { custom = { ... } }, { jinja = "..." }
/// cutoff_len = 2048
/// [batch]
/// seq_len = 4096
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Training data sources. Default: none.
    pub train: Vec<DatasetSpec>,
    /// Validation data: a ratio of the training examples held out (`0.05`),
    /// or separate sources. Default: none.
    pub validation: Option<ValidationConfig>,
    /// How conversations become text. Default: `model` (the tokenizer's own
    /// Jinja `chat_template`).
    pub template: TemplateConfig,
    /// Maximum tokens per example; longer ones are truncated (see
    /// [`crate::Encoder`] for the rule). Default: 2048.
    pub cutoff_len: usize,
    /// Train on prompt tokens too (labels are not masked). Default: false.
    pub train_on_prompt: bool,
    /// Skip records that fail to parse, format or render, counting them in
    /// the [`crate::LoadReport`], instead of stopping at the first. Default: false.
    pub skip_bad_records: bool,
    /// Batching, packing, shuffling. Default: see [`BatchConfig`].
    pub batch: BatchConfig,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            train: Vec::new(),
            validation: None,
            template: TemplateConfig::Model,
            cutoff_len: 2048,
            train_on_prompt: false,
            skip_bad_records: false,
            batch: BatchConfig::default(),
        }
    }
}

/// Validation data: a held-out ratio or separate sources.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ValidationConfig {
    /// Hold out this fraction (0..1) of the training examples, chosen by a
    /// seeded shuffle (`batch.seed`).
    Ratio(f64),
    /// Read validation examples from these sources.
    Datasets(Vec<DatasetSpec>),
}

/// One data source: a file, directory, glob, or Hugging Face dataset id
/// (`owner/name`, resolved in the local HF cache only), with its format.
/// A bare string is accepted as `{ path = "..." }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "SpecRepr")]
pub struct DatasetSpec {
    /// File, directory, glob pattern or dataset id.
    pub path: String,
    /// Record format. Default: `auto` (detected per record from its keys).
    pub format: Format,
    /// Column names (LLaMA-Factory's `columns`). Default: the format's names.
    pub columns: Columns,
    /// Role/content tags of conversation messages (LLaMA-Factory's `tags`).
    /// Default: the format's tags.
    pub tags: Tags,
    /// Split to read from a directory or dataset id (`train`, `validation`,
    /// `test`), matched against file names. Default: every file of a
    /// directory; `train` for a dataset id.
    pub split: Option<String>,
    /// Read at most this many records. Default: all.
    pub max_samples: Option<usize>,
}

impl DatasetSpec {
    /// A source with default format settings.
    pub fn new(path: impl Into<String>) -> Self {
        DatasetSpec {
            path: path.into(),
            format: Format::Auto,
            columns: Columns::default(),
            tags: Tags::default(),
            split: None,
            max_samples: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SpecRepr {
    Path(String),
    Full(Box<FullSpec>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FullSpec {
    path: String,
    #[serde(default)]
    format: Format,
    #[serde(default)]
    columns: Columns,
    #[serde(default)]
    tags: Tags,
    #[serde(default)]
    split: Option<String>,
    #[serde(default)]
    max_samples: Option<usize>,
}

impl From<SpecRepr> for DatasetSpec {
    fn from(r: SpecRepr) -> Self {
        match r {
            SpecRepr::Path(p) => DatasetSpec::new(p),
            SpecRepr::Full(f) => DatasetSpec {
                path: f.path,
                format: f.format,
                columns: f.columns,
                tags: f.tags,
                split: f.split,
                max_samples: f.max_samples,
            },
        }
    }
}

/// Record formats, with LLaMA-Factory's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Per record: `messages` → openai, `conversations` → sharegpt (or
    /// openai when its messages have `role`), `instruction` → alpaca,
    /// `text` → text.
    #[default]
    Auto,
    /// `instruction`, optional `input`, `output`, optional `system` and
    /// `history` (a list of `[instruction, output]` pairs).
    Alpaca,
    /// `conversations`: a list of `{from, value}` with `human`/`gpt`/`system`.
    Sharegpt,
    /// `messages`: a list of `{role, content}` with `user`/`assistant`/`system`.
    #[serde(alias = "messages")]
    Openai,
    /// `text`: raw text for continued pre-training; every token is trained.
    Text,
}

/// Column names; `None` means the format's default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Columns {
    /// Alpaca instruction (default `instruction`).
    pub prompt: Option<String>,
    /// Alpaca input, appended to the instruction after a newline (default `input`).
    pub query: Option<String>,
    /// Alpaca output (default `output`).
    pub response: Option<String>,
    /// Alpaca history (default `history`).
    pub history: Option<String>,
    /// System prompt column, any chat format (default `system`).
    pub system: Option<String>,
    /// Message list (default `conversations` for sharegpt, `messages` for openai).
    pub messages: Option<String>,
    /// Raw text (default `text`).
    pub text: Option<String>,
}

/// Message tags; `None` means the format's default (sharegpt / openai).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tags {
    /// Key holding the role (default `from` / `role`).
    pub role_tag: Option<String>,
    /// Key holding the text (default `value` / `content`).
    pub content_tag: Option<String>,
    /// Role value of user messages (default `human` / `user`).
    pub user_tag: Option<String>,
    /// Role value of assistant messages (default `gpt` / `assistant`).
    pub assistant_tag: Option<String>,
    /// Role value of a leading system message (default `system` / `system`).
    pub system_tag: Option<String>,
}

/// Which chat template turns conversations into text.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TemplateConfig {
    /// The tokenizer's own Jinja `chat_template` (tokenizer_config.json or
    /// chat_template.jinja), rendered with minijinja.
    #[default]
    Model,
    /// A Jinja chat template given inline.
    Jinja(String),
    /// Alpaca (`### Instruction:` / `### Response:`).
    Alpaca,
    /// Llama 2 chat (`[INST]`, `<<SYS>>`).
    Llama2,
    /// Llama 3 instruct (header ids, `<|eot_id|>`).
    Llama3,
    /// ChatML (`<|im_start|>`, `<|im_end|>`), no default system prompt.
    Chatml,
    /// ChatML with Qwen2's default system prompt.
    Qwen,
    /// Mistral instruct v0.1 (`[INST] ... [/INST]`).
    Mistral,
    /// Vicuna v1.1 (`USER:` / `ASSISTANT:`).
    Vicuna,
    /// TigerBot (`\n\n### Instruction:\n` / `\n\n### Response:\n`).
    Tigerbot,
    /// A template defined in the config.
    Custom(CustomTemplate),
}

/// A template built from format strings. In every string `{bos}` and `{eos}`
/// stand for the tokenizer's bos/eos tokens (or `eos` below) and, where it
/// makes sense, `{content}` for the message text. The assistant format's
/// text is what gets trained on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CustomTemplate {
    /// Text at the very start. Default: `{bos}`.
    pub prefix: String,
    /// Format of the system prompt. Default: `{content}\n\n`.
    pub system: String,
    /// System prompt used when a conversation has none. Default: empty (none).
    pub default_system: String,
    /// Put the formatted system prompt inside the first user message's
    /// content (Llama 2, Mistral) instead of before it. Default: false.
    pub system_in_first_user: bool,
    /// Format of a user turn, including the assistant header that follows
    /// it. Default: `User: {content}\nAssistant: `.
    pub user: String,
    /// Format of an assistant turn (trained). Default: `{content}{eos}`.
    pub assistant: String,
    /// Text between an assistant turn and the next user turn (not
    /// trained). Default: `\n`.
    pub separator: String,
    /// Override of the text `{eos}` stands for. Default: the tokenizer's eos.
    pub eos: Option<String>,
}

impl Default for CustomTemplate {
    fn default() -> Self {
        CustomTemplate {
            prefix: "{bos}".into(),
            system: "{content}\n\n".into(),
            default_system: String::new(),
            system_in_first_user: false,
            user: "User: {content}\nAssistant: ".into(),
            assistant: "{content}{eos}".into(),
            separator: "\n".into(),
            eos: None,
        }
    }
}

/// Batching: packing or padding, shuffling, sharding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    /// Rows per micro-batch. Default: 1.
    pub batch_size: usize,
    /// Pack several examples into each row of `seq_len` tokens (attention
    /// kept within each example by per-row sequence boundaries). When false,
    /// one example per row, padded. Default: true.
    pub packing: bool,
    /// Row length when packing; 0 means `cutoff_len`. Must be at least
    /// `cutoff_len`. Default: 0.
    pub seq_len: usize,
    /// Open rows the packer may still fill (first-fit over a window of this
    /// many rows; 1 is next-fit). Default: 16.
    pub pack_window: usize,
    /// Shuffle examples each epoch. Default: true.
    pub shuffle: bool,
    /// Seed of the shuffle and of the validation split. Default: 42.
    pub seed: u64,
    /// Without packing: batch examples of similar length together (sorted
    /// within windows of 64 batches, then the batches shuffled). Default: true.
    pub group_by_length: bool,
    /// Without packing: pad row length up to a multiple of this. Default: 8.
    pub pad_to_multiple_of: usize,
    /// Drop the last micro-batch of an epoch when it has fewer rows than
    /// `batch_size`. Default: false.
    pub drop_last: bool,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            batch_size: 1,
            packing: true,
            seq_len: 0,
            pack_window: 16,
            shuffle: true,
            seed: 42,
            group_by_length: true,
            pad_to_multiple_of: 8,
            drop_last: false,
        }
    }
}
