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

/// What lives in host memory instead of the GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OffloadSettings {
    /// Frozen base weights in pinned host memory, each unit copied to the
    /// GPU just ahead of use (overlapping compute) into reused buffers.
    pub params: bool,
    /// Under checkpointing, each layer's kept input and attention record in
    /// pinned host memory between its forward and its backward.
    pub activations: bool,
    /// AdamW's f32 moments (and full training's f32 masters) in pinned host
    /// memory, the update on the host's cores (ZeRO-Offload style).
    pub optimizer: bool,
    /// With `params`: units copied ahead of the one computing.
    pub lookahead: usize,
    /// With `params`: the embedding stays on the GPU (every pass starts with
    /// it, where nothing hides its copy; 1 GiB at 8B, 0.5 GiB at 70B).
    pub keep_embedding: bool,
}

impl Default for OffloadSettings {
    fn default() -> Self {
        Self {
            params: false,
            activations: false,
            optimizer: false,
            lookahead: 1,
            keep_embedding: true,
        }
    }
}

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
    #[error("unknown configuration key `{key}` (from {origin}){}", hint(.suggestion))]
    UnknownKey {
        /// The dotted key.
        key: String,
        /// Where it was set.
        origin: String,
        /// The closest valid key, if any is close.
        suggestion: Option<String>,
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
    /// A value of the wrong type (figment's message names key and source).
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

fn hint(s: &Option<String>) -> String {
    s.as_ref()
        .map(|k| format!("; did you mean `{k}`?"))
        .unwrap_or_default()
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
        for s in sets {
            let (k, v) = s
                .split_once('=')
                .ok_or_else(|| ConfigError::BadSet(s.clone()))?;
            fig = fig.merge(Serialized::default(k.trim(), parse_value(v.trim())));
        }
        let known = known_keys();
        let data = fig.data().map_err(|e| ConfigError::Value(e.to_string()))?;
        let mut keys = Vec::new();
        for dict in data.values() {
            dict_paths("", dict, &mut keys);
        }
        for key in keys {
            let open = OPEN_MAPS.iter().any(|m| key.starts_with(&format!("{m}.")));
            if !known.contains(&key) && !open {
                let origin = fig
                    .find_metadata(&key)
                    .map(describe)
                    .unwrap_or_else(|| "--set".into());
                let suggestion = known
                    .iter()
                    .map(|k| (strsim::levenshtein(k, &key), k))
                    .filter(|(d, _)| *d <= 3)
                    .min()
                    .map(|(_, k)| k.clone());
                return Err(ConfigError::UnknownKey {
                    key,
                    origin,
                    suggestion,
                });
            }
        }
        let settings: Settings = fig
            .extract()
            .map_err(|e| ConfigError::Value(e.to_string()))?;
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
}
