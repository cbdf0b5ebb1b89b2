//! Layered configuration: built-in defaults < config file (TOML, YAML or
//! JSON) < `LLMFT_<SECTION>__<KEY>` environment variables < `--set key=value`.
//! Unknown keys are errors that name their source and suggest the closest
//! valid key.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Json, Serialized, Toml, Yaml};
use figment::value::{Dict, Value};
use figment::{Figment, Provider};
use llmft_data::DataConfig;
use llmft_lora::LoraConfig;
use llmft_trainer::TrainConfig;
use serde::{Deserialize, Serialize};

/// The base model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSettings {
    /// A Hugging Face folder or model id; empty means the built-in demo model.
    pub path: String,
    /// Compute dtype: `auto` (bf16 on Ampere or newer GPUs, f16 on older
    /// ones, f32 on the CPU), `bf16`, `f16` or `f32`.
    pub dtype: String,
    /// Base weights: `auto`, `none` (dense), `nf4`, `nf4-dq`, `fp4`, `int8`,
    /// `hqq4`, `hqq3`, `hqq2`. `auto` follows `train.train_type` when
    /// training, is dense for `generate` and NF4 for `quantize`.
    pub quant: String,
    /// Gradient checkpointing (recompute each layer in backward).
    pub checkpointing: bool,
    /// Under checkpointing, keep each layer's fused-attention output
    /// (B·T·q_heads·head_dim values per layer) and LoRA input products, so
    /// the recompute skips the attention forward and the adapters' input GEMMs.
    pub checkpoint_keep_attention: bool,
    /// Under checkpointing, the last this-many layers keep all activations
    /// (faster, more memory).
    pub checkpoint_skip_layers: usize,
    /// Under checkpointing, a layer's recompute and backward share its
    /// dequantized weights (faster; a layer's dense weights in memory, 1.7 GB
    /// at 70B width).
    pub checkpoint_cache_dequantized: bool,
    /// `auto` (first GPU, else CPU), `cpu`, `cuda` or `cuda:N`.
    pub device: String,
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self {
            path: String::new(),
            dtype: "auto".into(),
            quant: "auto".into(),
            checkpointing: true,
            checkpoint_keep_attention: true,
            checkpoint_skip_layers: 0,
            checkpoint_cache_dequantized: true,
            device: "auto".into(),
        }
    }
}

/// What lives in host memory instead of the GPU (`[offload]`).
pub use llmft_trainer::OffloadSettings;

/// How the ranks of a multi-process job split the work (`[dist]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistSettings {
    /// Collectives: `auto` (NCCL on GPUs, the CPU backend otherwise),
    /// `nccl` or `cpu`. A world of one process uses none unless this names
    /// one.
    pub backend: String,
    /// How the frozen weights are split (torch FSDP's names).
    pub strategy: Strategy,
    /// Seconds the rendezvous, and any collective, may wait for a peer
    /// before the rank ends with an error naming it.
    pub timeout_s: u64,
}

impl Default for DistSettings {
    fn default() -> Self {
        Self {
            backend: "auto".into(),
            strategy: Strategy::FullShard,
            timeout_s: 300,
        }
    }
}

/// FSDP sharding strategies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Each rank holds 1/world of every unit; a unit is gathered for its
    /// forward, freed, and gathered again for its backward.
    FullShard,
    /// As `full_shard`, but a unit gathered for its forward stays until its
    /// backward (one gather per step, more memory).
    ShardGradOp,
    /// Every rank holds every weight (DDP); only gradients are reduced.
    NoShard,
    /// `full_shard` among the ranks of a node, replicated across nodes.
    HybridShard,
}

impl Strategy {
    /// The config spelling.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::FullShard => "full_shard",
            Strategy::ShardGradOp => "shard_grad_op",
            Strategy::NoShard => "no_shard",
            Strategy::HybridShard => "hybrid_shard",
        }
    }
}

/// Everything `llmft` reads from configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// The base model.
    pub model: ModelSettings,
    /// Adapters (PEFT's `adapter_config.json` keys).
    pub lora: LoraConfig,
    /// Datasets, template, tokenization and batching.
    pub data: DataConfig,
    /// The training run: recipe, optimizer, schedule, checkpoints.
    pub train: TrainConfig,
    /// Host-memory offload of weights and activations.
    pub offload: OffloadSettings,
    /// Multi-process jobs: backend, sharding strategy, timeouts.
    pub dist: DistSettings,
}

/// Sections a `LLMFT_<SECTION>__...` variable may address.
const SECTIONS: &[&str] = &["model", "lora", "data", "train", "offload", "dist"];

/// Keys whose values are free-form maps (any sub-key is valid).
const OPEN_MAPS: &[&str] = &["lora.rank_pattern", "lora.alpha_pattern"];

/// Configuration errors: one sentence naming the key and where it came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A key no section has.
    #[error("unknown configuration key `{key}` (from {origin}){}", hint(.suggestion, .note))]
    UnknownKey {
        /// The dotted key.
        key: String,
        /// Where it was set.
        origin: String,
        /// The closest valid key, if any is close.
        suggestion: Option<String>,
        /// How the name maps onto llmft (for names other tools use), or why
        /// llmft has none.
        note: Option<String>,
    },
    /// A config file that cannot be used.
    #[error("config file {path}: {msg}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A `--set` argument that is not `key=value`.
    #[error("--set {0}: expected key=value")]
    BadSet(String),
    /// A value of the wrong type or out of range: one sentence naming the
    /// key, what it expects, the value given and where it came from.
    #[error("{0}")]
    Value(String),
}

/// A readable name for where a value came from.
fn describe(m: &figment::Metadata) -> String {
    let name = m.name.to_string();
    if name.ends_with("Settings") {
        return "the built-in defaults".into();
    }
    if name.contains("demo") {
        return name;
    }
    if name.contains("Value") {
        return "--set".into();
    }
    match &m.source {
        Some(figment::Source::File(p)) => format!("{} {}", name, p.display()),
        _ => name,
    }
}

/// A provider under a name of our choosing (for `config show`).
struct Named<P>(P, &'static str);

impl<P: Provider> Provider for Named<P> {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named(self.1)
    }

    fn data(&self) -> Result<figment::value::Map<figment::Profile, Dict>, figment::Error> {
        self.0.data()
    }
}

fn hint(s: &Option<String>, note: &Option<String>) -> String {
    match (s, note) {
        (Some(k), Some(n)) => format!("; did you mean `{k}`? ({n})"),
        (Some(k), None) => format!("; did you mean `{k}`?"),
        (None, Some(n)) => format!("; {n}"),
        (None, None) => String::new(),
    }
}

/// Names other fine-tuning tools use (HF `TrainingArguments`, PEFT,
/// LLaMA-Factory, fsdp_qlora, axolotl) and the llmft key that does the same
/// job, or `None` where llmft has no equivalent; the note says how the value
/// carries over.
const FOREIGN_KEYS: &[(&str, Option<&str>, Option<&str>)] = &[
    ("learning_rate", Some("train.lr"), None),
    ("lr", Some("train.lr"), None),
    ("per_device_train_batch_size", Some("data.batch.batch_size"), None),
    ("train_batch_size", Some("data.batch.batch_size"), None),
    ("micro_batch_size", Some("data.batch.batch_size"), None),
    ("batch_size", Some("data.batch.batch_size"), None),
    ("gradient_accumulation_steps", Some("train.grad_accum"), None),
    ("num_train_epochs", Some("train.max_steps"), Some("llmft counts optimizer steps, not epochs")),
    ("num_epochs", Some("train.max_steps"), Some("llmft counts optimizer steps, not epochs")),
    ("max_steps", Some("train.max_steps"), None),
    ("warmup_steps", Some("train.warmup_steps"), None),
    ("warmup_ratio", Some("train.warmup_ratio"), None),
    ("lr_scheduler_type", Some("train.schedule"), Some("`constant`, `linear` or `cosine`")),
    ("lr_scheduler", Some("train.schedule"), Some("`constant`, `linear` or `cosine`")),
    ("weight_decay", Some("train.weight_decay"), None),
    ("max_grad_norm", Some("train.max_grad_norm"), None),
    ("grad_norm", Some("train.max_grad_norm"), None),
    ("apply_gradient_clipping", Some("train.max_grad_norm"), Some("0 disables clipping")),
    ("adam_beta1", Some("train.betas"), Some("a list of two: [beta1, beta2]")),
    ("adam_beta2", Some("train.betas"), Some("a list of two: [beta1, beta2]")),
    ("adam_epsilon", Some("train.eps"), None),
    ("logging_steps", Some("train.log_every"), None),
    ("save_steps", Some("train.checkpoint_every"), None),
    ("save_strategy", Some("train.checkpoint_every"), Some("llmft checkpoints every N steps")),
    ("save_total_limit", Some("train.keep_last"), None),
    ("eval_steps", Some("train.eval_every"), None),
    ("eval_strategy", Some("train.eval_every"), Some("llmft evaluates every N steps")),
    ("evaluation_strategy", Some("train.eval_every"), Some("llmft evaluates every N steps")),
    ("seed", Some("train.seed"), None),
    ("bf16", Some("model.dtype"), Some("set it to \"bf16\"")),
    ("fp16", Some("model.dtype"), Some("set it to \"f16\"")),
    ("precision", Some("model.dtype"), Some("`bf16`, `f16` or `f32`")),
    ("torch_dtype", Some("model.dtype"), Some("`bf16`, `f16` or `f32`")),
    ("output_dir", Some("train.output_dir"), None),
    ("lora_rank", Some("lora.r"), None),
    ("lora_r", Some("lora.r"), None),
    ("rank", Some("lora.r"), None),
    ("lora_alpha", Some("lora.lora_alpha"), None),
    ("lora_dropout", Some("lora.lora_dropout"), None),
    ("lora_target", Some("lora.target_modules"), Some("a list, a regex or \"all-linear\"")),
    ("lora_target_modules", Some("lora.target_modules"), Some("a list, a regex or \"all-linear\"")),
    ("target_modules", Some("lora.target_modules"), None),
    ("use_dora", Some("lora.use_dora"), None),
    ("use_rslora", Some("lora.use_rslora"), None),
    ("cutoff_len", Some("data.cutoff_len"), None),
    ("max_seq_length", Some("data.cutoff_len"), None),
    ("max_seq_len", Some("data.cutoff_len"), None),
    ("model_max_length", Some("data.cutoff_len"), None),
    ("sequence_len", Some("data.cutoff_len"), None),
    ("context_length", Some("data.cutoff_len"), None),
    ("use_gradient_checkpointing", Some("model.checkpointing"), None),
    ("gradient_checkpointing", Some("model.checkpointing"), None),
    ("use_cpu_offload", Some("offload.params"), Some("see also `offload.optimizer` and `offload.activations`")),
    ("model_name_or_path", Some("model.path"), None),
    ("model_name", Some("model.path"), None),
    ("base_model", Some("model.path"), None),
    ("dataset", Some("data.train"), Some("a list of dataset files or hub ids")),
    ("datasets", Some("data.train"), Some("a list of dataset files or hub ids")),
    ("dataset_dir", Some("data.train"), Some("a list of dataset files or hub ids")),
    ("max_samples", Some("data.train"), Some("each entry of `data.train` takes `max_samples`")),
    ("dataset_samples", Some("data.train"), Some("each entry of `data.train` takes `max_samples`")),
    ("val_size", Some("data.validation"), None),
    ("template", Some("data.template"), None),
    ("chat_template", Some("data.template"), None),
    ("packing", Some("data.batch.packing"), None),
    ("sample_packing", Some("data.batch.packing"), None),
    ("group_by_length", Some("data.batch.group_by_length"), None),
    ("train_on_inputs", Some("data.train_on_prompt"), None),
    ("quantization_bit", Some("model.quant"), Some("4 bits: \"nf4\" or \"hqq4\"; 8 bits: \"int8\"")),
    ("load_in_4bit", Some("model.quant"), Some("set it to \"nf4\"")),
    ("load_in_8bit", Some("model.quant"), Some("set it to \"int8\"")),
    ("bnb_4bit_use_double_quant", Some("model.quant"), Some("set it to \"nf4-dq\"")),
    ("train_type", Some("train.train_type"), None),
    ("finetuning_type", Some("train.train_type"), Some("`lora`, `qlora`, `full`, `freeze`, ...")),
    ("freeze_trainable_layers", Some("train.freeze_trainable_layers"), None),
    ("sharding_strategy", Some("dist.strategy"), None),
    ("fsdp", Some("dist.strategy"), Some("`full_shard`, `shard_grad_op`, `no_shard` or `hybrid_shard`")),
    ("deepspeed", Some("dist.strategy"), Some("llmft shards with its own FSDP-style strategies")),
    ("resume_from_checkpoint", None, Some("llmft resumes with `llmft train --resume [DIR]`")),
    ("world_size", None, Some("`llmft launch --nproc-per-node N` (or torchrun/srun) sets the world size")),
    ("optim", None, Some("llmft always uses AdamW (`train.betas`, `train.eps`, `train.weight_decay`)")),
    ("report_to", None, Some("llmft has no equivalent: metrics go to `metrics.jsonl` and `loss.png` in `train.output_dir`")),
    ("log_to", None, Some("llmft has no equivalent: metrics go to `metrics.jsonl` and `loss.png` in `train.output_dir`")),
    ("dataloader_num_workers", None, Some("llmft has no equivalent: data loading runs in the training process")),
    ("reentrant_checkpointing", None, Some("llmft has no equivalent: `model.checkpointing` has one form")),
];

/// The suggestion for an unknown dotted `key`: a name other tools use, the
/// same name in another section, else the closest valid key.
fn suggest(key: &str, known: &BTreeSet<String>) -> (Option<String>, Option<String>) {
    let last = key.rsplit('.').next().unwrap_or(key);
    let lower = last.to_ascii_lowercase();
    if let Some((_, to, note)) = FOREIGN_KEYS.iter().find(|(n, _, _)| *n == lower) {
        return (to.map(String::from), note.map(String::from));
    }
    let same_name: Vec<&String> = known
        .iter()
        .filter(|k| k.rsplit('.').next() == Some(last))
        .collect();
    if same_name.len() == 1 {
        return (Some(same_name[0].clone()), None);
    }
    let close = known
        .iter()
        .map(|k| (strsim::levenshtein(k, key), k))
        .filter(|(d, _)| *d <= 3)
        .min()
        .map(|(_, k)| k.clone());
    (close, None)
}

/// What a serde "expected" string means, in the user's words.
fn expected_words(exp: &str) -> String {
    let e = exp.trim();
    match e {
        "f32" | "f64" | "a float" => "a number".into(),
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a whole number (0 or more)".into(),
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "a whole number".into(),
        "a boolean" | "bool" => "`true` or `false`".into(),
        "a string" | "a borrowed string" | "string" | "char" => "a string".into(),
        "a sequence" | "sequence" => "a list".into(),
        "a map" | "map" => "a table of settings".into(),
        _ if e.starts_with("struct ") => "a table of settings".into(),
        _ if e.starts_with("an array of length ") => {
            format!("a list of {} values", &e["an array of length ".len()..])
        }
        _ if e.starts_with("a tuple of size ") => {
            format!("a list of {} values", &e["a tuple of size ".len()..])
        }
        _ => e.into(),
    }
}

/// The value a user gave, as they would write it.
fn given_words(a: &figment::error::Actual) -> String {
    use figment::error::Actual as A;
    match a {
        A::Bool(b) => format!("the boolean `{b}`"),
        A::Unsigned(v) => format!("the number `{v}`"),
        A::Signed(v) => format!("the number `{v}`"),
        A::Float(v) => format!("the number `{v}`"),
        A::Char(c) => format!("the string {:?}", c.to_string()),
        A::Str(v) => format!("the string {v:?}"),
        A::Seq => "a list".into(),
        A::Map => "a table".into(),
        A::Unit | A::Option => "nothing".into(),
        other => other.to_string(),
    }
}

/// One sentence for a value figment could not turn into a setting: the key
/// as the user wrote it, what it expects, the value given, and its source.
fn value_error(e: &figment::Error, fig: &Figment, sets: &[(String, String)]) -> String {
    use figment::error::Kind;
    let mut path = e.path.clone();
    if path.first().map(|p| p == "default" || p == "global") == Some(true) && path.len() > 1 {
        path.remove(0);
    }
    let key = path.join(".");
    let origin = if let Some((k, v)) = sets.iter().rev().find(|(k, _)| *k == key) {
        format!("--set {k}={v}")
    } else if key.is_empty() {
        e.metadata
            .as_ref()
            .map(describe)
            .unwrap_or_else(|| "the configuration".into())
    } else {
        fig.find_metadata(&key)
            .or(e.metadata.as_ref())
            .map(describe)
            .unwrap_or_else(|| "the configuration".into())
    };
    let what = if key.is_empty() {
        "the configuration".to_string()
    } else {
        format!("`{key}`")
    };
    match &e.kind {
        Kind::InvalidType(actual, exp) | Kind::InvalidValue(actual, exp) => format!(
            "{what} expects {} but was given {} (from {origin})",
            expected_words(exp),
            given_words(actual)
        ),
        Kind::InvalidLength(n, exp) => format!(
            "{what} expects {} but was given a list of {n} value{} (from {origin})",
            expected_words(exp),
            if *n == 1 { "" } else { "s" }
        ),
        Kind::UnknownVariant(v, names) => {
            let list = names
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ");
            let close = names
                .iter()
                .map(|n| (strsim::levenshtein(n, v), *n))
                .filter(|(d, _)| *d <= 3)
                .min()
                .map(|(_, n)| format!("; did you mean `{n}`?"))
                .unwrap_or_default();
            format!("{what} expects one of {list} but was given {v:?} (from {origin}){close}")
        }
        Kind::UnknownField(f, _) => format!(
            "unknown configuration key `{}` (from {origin})",
            if key.is_empty() {
                f.clone()
            } else {
                format!("{key}.{f}")
            }
        ),
        Kind::USizeOutOfRange(v) => {
            format!("{what} was given `{v}`, which is out of range (from {origin})")
        }
        Kind::ISizeOutOfRange(v) => {
            format!("{what} was given `{v}`, which is out of range (from {origin})")
        }
        Kind::Message(m) => format!("{what} has an invalid value: {m} (from {origin})"),
        other => format!("{what}: {other} (from {origin})"),
    }
}

/// The resolved settings and the layers they came from.
#[derive(Debug)]
pub struct Loaded {
    /// The settings.
    pub settings: Settings,
    figment: Figment,
}

fn leaf_paths(prefix: &str, v: &serde_json::Value, out: &mut BTreeSet<String>) {
    match v {
        serde_json::Value::Object(m) if !OPEN_MAPS.contains(&prefix) => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                out.insert(p.clone());
                leaf_paths(&p, v, out);
            }
        }
        _ => {}
    }
}

/// Every valid dotted key: the fields of the serialized defaults.
fn known_keys() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let v = serde_json::to_value(Settings::default()).expect("settings serialize");
    leaf_paths("", &v, &mut out);
    out
}

fn dict_paths(prefix: &str, d: &Dict, out: &mut Vec<String>) {
    for (k, v) in d {
        let p = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            Value::Dict(_, sub) if !OPEN_MAPS.contains(&p.as_str()) => dict_paths(&p, sub, out),
            _ => out.push(p),
        }
    }
}

/// A file's parse error as one line (figment's own message names the file).
fn first_line(e: &figment::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

/// Parses a `--set` value as TOML (numbers, booleans, arrays, inline tables),
/// else keeps it as a string.
fn parse_value(raw: &str) -> Value {
    let doc = format!("v = {raw}");
    match Figment::from(Toml::string(&doc)).find_value("v") {
        Ok(v) => v,
        Err(_) => Value::from(raw.to_string()),
    }
}

impl Loaded {
    /// Resolves the layers: defaults, `file`, the environment, then `sets`.
    pub fn load(file: Option<&Path>, sets: &[String]) -> Result<Self, ConfigError> {
        Self::load_over(None, file, sets)
    }

    /// As [`Loaded::load`], with the layer `base` (TOML: a job's own
    /// defaults, such as the built-in demo's) between the defaults and `file`.
    pub fn load_over(
        base: Option<&str>,
        file: Option<&Path>,
        sets: &[String],
    ) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(toml) = base {
            fig = fig.merge(Named(Toml::string(toml), "the built-in demo job"));
        }
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::File {
                    path: path.to_path_buf(),
                    msg: "no such file".into(),
                });
            }
            fig = match path.extension().and_then(|e| e.to_str()) {
                Some("toml") => fig.merge(Toml::file(path)),
                Some("yaml") | Some("yml") => fig.merge(Yaml::file(path)),
                Some("json") => fig.merge(Json::file(path)),
                _ => {
                    return Err(ConfigError::File {
                        path: path.to_path_buf(),
                        msg: "use a .toml, .yaml/.yml or .json file".into(),
                    })
                }
            };
        }
        fig = fig.merge(
            Env::prefixed("LLMFT_")
                .filter(|k| {
                    let k = k.as_str().to_ascii_lowercase();
                    SECTIONS.iter().any(|s| k.starts_with(&format!("{s}__")))
                })
                .split("__"),
        );
        let mut set_pairs = Vec::new();
        for s in sets {
            let (k, v) = s
                .split_once('=')
                .ok_or_else(|| ConfigError::BadSet(s.clone()))?;
            fig = fig.merge(Serialized::default(k.trim(), parse_value(v.trim())));
            set_pairs.push((k.trim().to_string(), v.trim().to_string()));
        }
        let known = known_keys();
        let data = fig.data().map_err(|e| match file {
            Some(path) => ConfigError::File {
                path: path.to_path_buf(),
                msg: first_line(&e),
            },
            None => ConfigError::Value(first_line(&e)),
        })?;
        let mut keys = Vec::new();
        for dict in data.values() {
            dict_paths("", dict, &mut keys);
        }
        for key in keys {
            let open = OPEN_MAPS.iter().any(|m| key.starts_with(&format!("{m}.")));
            if !known.contains(&key) && !open {
                let origin = match set_pairs.iter().rev().find(|(k, _)| *k == key) {
                    Some((k, v)) => format!("--set {k}={v}"),
                    None => fig
                        .find_metadata(&key)
                        .map(describe)
                        .unwrap_or_else(|| "--set".into()),
                };
                let (suggestion, note) = suggest(&key, &known);
                return Err(ConfigError::UnknownKey {
                    key,
                    origin,
                    suggestion,
                    note,
                });
            }
        }
        let settings: Settings = fig
            .extract()
            .map_err(|e| ConfigError::Value(value_error(&e, &fig, &set_pairs)))?;
        Ok(Self {
            settings,
            figment: fig,
        })
    }

    /// One line per set value: `key = value  # source`.
    pub fn show(&self) -> String {
        let mut keys = Vec::new();
        if let Ok(data) = self.figment.data() {
            for dict in data.values() {
                dict_paths("", dict, &mut keys);
            }
        }
        keys.sort();
        keys.dedup();
        let mut out = String::new();
        for key in keys {
            let Ok(v) = self.figment.find_value(&key) else {
                continue;
            };
            let json = serde_json::to_string(&v).unwrap_or_else(|_| "?".into());
            let src = self
                .figment
                .find_metadata(&key)
                .map(describe)
                .unwrap_or_default();
            out.push_str(&format!("{key} = {json}  # {src}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Loading reads the process environment, which one test changes.
    static ENV: Mutex<()> = Mutex::new(());

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn layers_apply_in_order_and_show_their_sources() {
        let _env = ENV.lock().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            dir.path(),
            "c.toml",
            "[model]\nquant = \"hqq4\"\ndtype = \"f16\"\n[lora]\nr = 32\n",
        );
        let l = Loaded::load(
            Some(&f),
            &["model.dtype=f32".into(), "lora.lora_alpha=64".into()],
        )
        .unwrap();
        assert_eq!(l.settings.model.quant, "hqq4");
        assert_eq!(l.settings.model.dtype, "f32");
        assert_eq!(l.settings.lora.r, 32);
        assert_eq!(l.settings.lora.lora_alpha, 64.0);
        let shown = l.show();
        assert!(
            shown.contains("model.quant = \"hqq4\"  # TOML file"),
            "{shown}"
        );
        assert!(shown.contains("model.dtype = \"f32\"  # --set"), "{shown}");
        assert!(
            shown.contains("model.device = \"auto\"  # the built-in defaults"),
            "{shown}"
        );
    }

    #[test]
    fn unknown_keys_name_source_and_suggest() {
        let _env = ENV.lock().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let f = write(dir.path(), "c.yaml", "model:\n  qaunt: nf4\n");
        let e = Loaded::load(Some(&f), &[]).unwrap_err().to_string();
        assert!(
            e.contains("`model.qaunt`")
                && e.contains("c.yaml")
                && e.contains("did you mean `model.quant`"),
            "{e}"
        );
        let e = Loaded::load(None, &["lora.rr=4".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`lora.rr`") && e.contains("--set") && e.contains("`lora.r`"),
            "{e}"
        );
        let e = Loaded::load(None, &["nonsense".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("key=value"), "{e}");
    }

    #[test]
    fn environment_overrides_file_and_is_checked() {
        let _env = ENV.lock().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let f = write(dir.path(), "c.toml", "[model]\nquant = \"hqq4\"\n");
        std::env::set_var("LLMFT_MODEL__QUANT", "int8");
        let l = Loaded::load(Some(&f), &[]).unwrap();
        assert_eq!(l.settings.model.quant, "int8");
        let l = Loaded::load(Some(&f), &["model.quant=nf4".into()]).unwrap();
        assert_eq!(l.settings.model.quant, "nf4");
        std::env::remove_var("LLMFT_MODEL__QUANT");
        std::env::set_var("LLMFT_MODEL__QAUNT", "int8");
        let e = Loaded::load(None, &[]).unwrap_err().to_string();
        std::env::remove_var("LLMFT_MODEL__QAUNT");
        assert!(
            e.contains("`model.qaunt`") && e.contains("LLMFT_") && e.contains("`model.quant`"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_and_files_are_errors() {
        let _env = ENV.lock().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let f = write(dir.path(), "c.json", r#"{"lora": {"r": "many"}}"#);
        let e = Loaded::load(Some(&f), &[]).unwrap_err().to_string();
        assert!(e.contains("lora.r") || e.contains("r"), "{e}");
        let e = Loaded::load(Some(&dir.path().join("missing.toml")), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("missing.toml") && e.contains("no such file"),
            "{e}"
        );
        let g = write(dir.path(), "c.ini", "x");
        assert!(Loaded::load(Some(&g), &[])
            .unwrap_err()
            .to_string()
            .contains(".toml"));
    }

    #[test]
    fn wrong_types_are_one_sentence_in_the_users_words() {
        let _env = ENV.lock().unwrap();
        let cases: &[(&str, &str, &str)] = &[
            ("train.lr=abc", "a number", "the string \"abc\""),
            (
                "train.max_steps=-5",
                "a whole number (0 or more)",
                "the number `-5`",
            ),
            (
                "model.checkpointing=maybe",
                "`true` or `false`",
                "the string \"maybe\"",
            ),
            (
                "lora.r=1.5",
                "a whole number (0 or more)",
                "the number `1.5`",
            ),
            ("model.quant=4", "a string", "the number `4`"),
            ("train.betas=[0.9]", "a list of 2 values", "1"),
            ("train.train_type=qlroa", "one of `qlora`", "\"qlroa\""),
        ];
        for (set, expected, given) in cases {
            let e = Loaded::load(None, &[set.to_string()])
                .unwrap_err()
                .to_string();
            let key = set.split('=').next().unwrap();
            assert!(e.contains(&format!("`{key}`")), "{set}: {e}");
            assert!(e.contains(&format!("expects {expected}")), "{set}: {e}");
            assert!(e.contains(given), "{set}: {e}");
            assert!(e.contains(&format!("--set {set}")), "{set}: {e}");
            for internal in ["figment", "config.rs", "default.", "Value"] {
                assert!(!e.contains(internal), "{set}: {e}");
            }
            assert_eq!(e.lines().count(), 1, "{e}");
        }
        let e = Loaded::load(None, &["train.train_type=qlroa".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean `qlora`"), "{e}");
        // The same in a file names the file.
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [
            ("w.toml", "[train]\nlr = \"fast\"\n"),
            ("w.yaml", "train:\n  lr: fast\n"),
            ("w.json", r#"{"train": {"lr": "fast"}}"#),
        ] {
            let f = write(dir.path(), name, text);
            let e = Loaded::load(Some(&f), &[]).unwrap_err().to_string();
            assert!(
                e.contains("`train.lr` expects a number but was given the string \"fast\"")
                    && e.contains(name),
                "{e}"
            );
            assert!(!e.contains("figment") && !e.contains("default."), "{e}");
        }
    }

    #[test]
    fn names_from_other_tools_point_at_the_llmft_key() {
        let _env = ENV.lock().unwrap();
        let table: &[(&str, &str)] = &[
            ("learning_rate", "train.lr"),
            ("per_device_train_batch_size", "data.batch.batch_size"),
            ("gradient_accumulation_steps", "train.grad_accum"),
            ("num_train_epochs", "train.max_steps"),
            ("max_steps", "train.max_steps"),
            ("warmup_steps", "train.warmup_steps"),
            ("warmup_ratio", "train.warmup_ratio"),
            ("lr_scheduler_type", "train.schedule"),
            ("weight_decay", "train.weight_decay"),
            ("max_grad_norm", "train.max_grad_norm"),
            ("logging_steps", "train.log_every"),
            ("save_steps", "train.checkpoint_every"),
            ("save_total_limit", "train.keep_last"),
            ("eval_steps", "train.eval_every"),
            ("seed", "train.seed"),
            ("bf16", "model.dtype"),
            ("fp16", "model.dtype"),
            ("output_dir", "train.output_dir"),
            ("lora_rank", "lora.r"),
            ("lora_alpha", "lora.lora_alpha"),
            ("lora_dropout", "lora.lora_dropout"),
            ("lora_target", "lora.target_modules"),
            ("cutoff_len", "data.cutoff_len"),
            ("use_gradient_checkpointing", "model.checkpointing"),
            ("gradient_checkpointing", "model.checkpointing"),
            ("use_cpu_offload", "offload.params"),
            ("model_name_or_path", "model.path"),
            ("dataset", "data.train"),
            ("template", "data.template"),
            ("quantization_bit", "model.quant"),
            ("train_type", "train.train_type"),
            ("finetuning_type", "train.train_type"),
            ("adam_epsilon", "train.eps"),
            ("max_seq_length", "data.cutoff_len"),
            ("sharding_strategy", "dist.strategy"),
        ];
        assert!(table.len() >= 25);
        let dir = tempfile::tempdir().unwrap();
        for (name, llmft) in table {
            // Top level of a LLaMA-Factory-style YAML file.
            let f = write(dir.path(), "lf.yaml", &format!("{name}: 1\n"));
            let e = Loaded::load(Some(&f), &[]).unwrap_err().to_string();
            assert!(
                e.contains(&format!("`{name}`"))
                    && e.contains("lf.yaml")
                    && e.contains(&format!("did you mean `{llmft}`?")),
                "{name}: {e}"
            );
            // Inside a section where it does not belong, via --set.
            let section = if llmft.starts_with("model.") {
                "train"
            } else {
                "model"
            };
            let e = Loaded::load(None, &[format!("{section}.{name}=1")])
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("`{section}.{name}`"))
                    && e.contains(&format!("did you mean `{llmft}`?")),
                "{name}: {e}"
            );
        }
        // Epochs: the note says why it is not the same thing.
        let e = Loaded::load(None, &["num_train_epochs=3".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not epochs"), "{e}");
        // Names llmft has no equivalent for say so, and suggest no key.
        for name in ["report_to", "dataloader_num_workers"] {
            let e = Loaded::load(None, &[format!("{name}=x")])
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("no equivalent") && !e.contains("did you mean"),
                "{e}"
            );
        }
        // A key of another section by its exact name.
        let e = Loaded::load(None, &["model.keep_last=3".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean `train.keep_last`?"), "{e}");
    }
}
