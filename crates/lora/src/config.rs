//! `LoraConfig`: PEFT's `adapter_config.json`, and which modules it targets.
use std::collections::BTreeMap;

use regex::Regex;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{Error, Result};

/// How A and B start (PEFT's `init_lora_weights`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum InitLoraWeights {
    /// `true` in PEFT (the default): A Kaiming-uniform with `a = √5`, i.e.
    /// uniform in `±1/√in_features`; B zero, so the adapter starts as a no-op.
    #[default]
    Kaiming,
    /// `"gaussian"`: A normal with std `1/r`; B zero.
    Gaussian,
    /// `false`: A and B both as `nn.Linear`'s default (uniform in `±1/√fan_in`),
    /// so the adapter is not a no-op; for tests.
    Random,
    /// Another PEFT method (`"pissa"`, `"olora"`, `"loftq"`, ...): kept so a
    /// config round-trips, but llmft cannot initialize with it.
    Other(String),
}

impl Serialize for InitLoraWeights {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            InitLoraWeights::Kaiming => s.serialize_bool(true),
            InitLoraWeights::Random => s.serialize_bool(false),
            InitLoraWeights::Gaussian => s.serialize_str("gaussian"),
            InitLoraWeights::Other(v) => s.serialize_str(v),
        }
    }
}

impl<'de> Deserialize<'de> for InitLoraWeights {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Str(String),
        }
        Ok(match Raw::deserialize(d)? {
            Raw::Bool(true) => InitLoraWeights::Kaiming,
            Raw::Bool(false) => InitLoraWeights::Random,
            Raw::Str(s) if s.eq_ignore_ascii_case("gaussian") => InitLoraWeights::Gaussian,
            Raw::Str(s) if s.eq_ignore_ascii_case("kaiming") => InitLoraWeights::Kaiming,
            Raw::Str(s) => InitLoraWeights::Other(s),
        })
    }
}

/// A list of names, or one regular expression (PEFT's `Union[list[str], str]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum NamesOrPattern {
    /// Module names: a module matches when its full name equals one, or ends
    /// with `.` + one.
    Names(Vec<String>),
    /// A regular expression the full module name must match entirely;
    /// `"all-linear"` (any case) for every linear layer but the LM head.
    Pattern(String),
}

impl std::fmt::Display for NamesOrPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NamesOrPattern::Names(v) => write!(f, "{v:?}"),
            NamesOrPattern::Pattern(p) => write!(f, "{p:?}"),
        }
    }
}

/// One layer index or a list (PEFT's `layers_to_transform`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayerIndices {
    /// Only this layer.
    One(usize),
    /// These layers.
    List(Vec<usize>),
}

/// One pattern or a list (PEFT's `layers_pattern`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// The LoRA settings, field for field PEFT's `LoraConfig` as it appears in
/// `adapter_config.json` (unknown fields are kept and written back).
///
/// ```
/// use llmft_lora::LoraConfig;
/// let c: LoraConfig = serde_json::from_str(
///     r#"{"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"],
///         "rank_pattern": {"v_proj": 4}}"#,
/// )?;
/// let q = c.target("model.layers.0.self_attn.q_proj")?.unwrap();
/// assert_eq!((q.r, q.scale), (16, 2.0));
/// assert_eq!(c.target("model.layers.0.self_attn.v_proj")?.unwrap().r, 4);
/// assert!(c.target("model.layers.0.mlp.up_proj")?.is_none());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoraConfig {
    /// Always `"LORA"`.
    pub peft_type: String,
    /// PEFT's task type, `"CAUSAL_LM"` for language models.
    #[serde(deserialize_with = "nullable")]
    pub task_type: Option<String>,
    /// The base model's name or path (informational).
    #[serde(deserialize_with = "nullable")]
    pub base_model_name_or_path: Option<String>,
    /// Rank of every targeted module unless `rank_pattern` says otherwise.
    pub r: usize,
    /// Alpha of every targeted module unless `alpha_pattern` says otherwise.
    pub lora_alpha: f64,
    /// Dropout probability on the adapter path's input (training only).
    pub lora_dropout: f32,
    /// Scale `alpha/√r` instead of `alpha/r`.
    pub use_rslora: bool,
    /// DoRA: a trained magnitude per output row, the direction normalized.
    pub use_dora: bool,
    /// How new adapters start.
    pub init_lora_weights: InitLoraWeights,
    /// Which modules get an adapter (see [`NamesOrPattern`]).
    #[serde(deserialize_with = "nullable")]
    pub target_modules: Option<NamesOrPattern>,
    /// Modules never adapted, matched as `target_modules` is.
    #[serde(deserialize_with = "nullable")]
    pub exclude_modules: Option<NamesOrPattern>,
    /// Only these decoder layers (applies to a list of `target_modules`, as in PEFT).
    #[serde(deserialize_with = "nullable")]
    pub layers_to_transform: Option<LayerIndices>,
    /// The name before the layer index (`layers` in `model.layers.3.mlp`);
    /// unset: the first numbered segment.
    #[serde(deserialize_with = "nullable")]
    pub layers_pattern: Option<OneOrMany>,
    /// Rank per module: a key matches a module name ending in it (after a `.`
    /// or whole), as a regular expression; the first key in order that
    /// matches wins.
    #[serde(deserialize_with = "nullable")]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Alpha per module, keys as in `rank_pattern`.
    #[serde(deserialize_with = "nullable")]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Only `"none"` is supported: biases are not trained.
    pub bias: String,
    /// Only `false` (weights stored `[out, in]`, as in nn.Linear).
    pub fan_in_fan_out: bool,
    /// Whole modules trained besides the adapters: not supported (must be empty).
    #[serde(deserialize_with = "nullable")]
    pub modules_to_save: Option<Vec<String>>,
    /// Written `true` by PEFT when saving.
    pub inference_mode: bool,
    /// Every other field of `adapter_config.json`, kept as found.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

fn nullable<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: None,
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            use_rslora: false,
            use_dora: false,
            init_lora_weights: InitLoraWeights::Kaiming,
            target_modules: None,
            exclude_modules: None,
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            bias: "none".into(),
            fan_in_fan_out: false,
            modules_to_save: None,
            inference_mode: false,
            extra: BTreeMap::new(),
        }
    }
}

/// What the config gives one targeted module.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSpec {
    /// Rank.
    pub r: usize,
    /// Alpha.
    pub alpha: f64,
    /// `alpha/r`, or `alpha/√r` with rsLoRA.
    pub scale: f32,
    /// Dropout probability on the adapter input.
    pub dropout: f32,
    /// DoRA.
    pub use_dora: bool,
    /// Initialization of new adapters.
    pub init: InitLoraWeights,
}

/// The LM head is never adapted by `all-linear`, as in PEFT.
const OUTPUT_LAYER: &str = "lm_head";

fn full_match(pattern: &str, what: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
        Error::Config(format!(
            "{what} pattern {pattern:?} is not a valid regex: {e}"
        ))
    })
}

fn names_match(sel: &NamesOrPattern, key: &str, what: &str) -> Result<bool> {
    Ok(match sel {
        NamesOrPattern::Pattern(p) => full_match(p, what)?.is_match(key),
        NamesOrPattern::Names(v) => v
            .iter()
            .any(|t| key == t || key.ends_with(&format!(".{t}"))),
    })
}

/// `scale` for rank `r` and `alpha`: `alpha/r`, or `alpha/√r` with rsLoRA.
pub fn lora_scale(r: usize, alpha: f64, use_rslora: bool) -> f32 {
    let r = r as f64;
    (if use_rslora {
        alpha / r.sqrt()
    } else {
        alpha / r
    }) as f32
}

impl LoraConfig {
    /// Checks the values llmft supports.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if !self.peft_type.eq_ignore_ascii_case("LORA") {
            return bad(format!(
                "peft_type is {:?}, expected \"LORA\"",
                self.peft_type
            ));
        }
        if self.r == 0 {
            return bad("r must be at least 1".into());
        }
        if let Some((k, _)) = self.rank_pattern.iter().find(|(_, &r)| r == 0) {
            return bad(format!("rank_pattern[{k:?}] must be at least 1"));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad(format!(
                "lora_dropout {} is outside [0, 1)",
                self.lora_dropout
            ));
        }
        if self.bias != "none" {
            return bad(format!(
                "bias {:?} is not supported (only \"none\")",
                self.bias
            ));
        }
        if self.fan_in_fan_out {
            return bad("fan_in_fan_out = true is not supported".into());
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return bad(format!(
                "modules_to_save {:?} is not supported",
                self.modules_to_save.as_deref().unwrap_or_default()
            ));
        }
        if self.target_modules.is_none() {
            return bad("target_modules is not set".into());
        }
        Ok(())
    }

    /// Whether `target_modules` is PEFT's `"all-linear"` shorthand.
    pub fn is_all_linear(&self) -> bool {
        matches!(&self.target_modules, Some(NamesOrPattern::Pattern(p)) if p.eq_ignore_ascii_case("all-linear"))
    }

    /// Whether the module with this full name (as in the model's state dict,
    /// without `.weight`: `model.layers.3.self_attn.q_proj`) gets an adapter,
    /// following PEFT's `check_target_module_exists`.
    pub fn is_targeted(&self, module: &str) -> Result<bool> {
        if let Some(ex) = &self.exclude_modules {
            if names_match(ex, module, "exclude_modules")? {
                return Ok(false);
            }
        }
        let Some(targets) = &self.target_modules else {
            return Ok(false);
        };
        if self.is_all_linear() {
            // PEFT expands the shorthand to full names, so the layer filter does not apply.
            return Ok(module.rsplit('.').next() != Some(OUTPUT_LAYER));
        }
        let names = match targets {
            NamesOrPattern::Pattern(p) => {
                return Ok(full_match(p, "target_modules")?.is_match(module))
            }
            NamesOrPattern::Names(v) => v,
        };
        if names.iter().any(|t| t == module) {
            return Ok(true);
        }
        if !names.iter().any(|t| module.ends_with(&format!(".{t}"))) {
            return Ok(false);
        }
        let wanted = match &self.layers_to_transform {
            None => return Ok(true),
            Some(LayerIndices::List(v)) if v.is_empty() => return Ok(true),
            Some(w) => w,
        };
        let patterns: Vec<String> = match &self.layers_pattern {
            None => vec![r"[^.]*".into()],
            Some(OneOrMany::One(p)) if p.is_empty() => vec![r"[^.]*".into()],
            Some(OneOrMany::Many(v)) if v.is_empty() => vec![r"[^.]*".into()],
            Some(OneOrMany::One(p)) => vec![p.clone()],
            Some(OneOrMany::Many(v)) => v.clone(),
        };
        let mut index = None;
        for p in patterns {
            let re = Regex::new(&format!(r"^.*?\.{p}\.(\d+)\."))
                .map_err(|e| Error::Config(format!("layers_pattern {p:?}: {e}")))?;
            if let Some(c) = re.captures(module) {
                index = c[1].parse::<usize>().ok();
                break;
            }
        }
        Ok(match (index, wanted) {
            (None, _) => false,
            (Some(i), LayerIndices::One(w)) => i == *w,
            (Some(i), LayerIndices::List(v)) => v.contains(&i),
        })
    }

    /// The first key of `pattern` that matches `module` as PEFT's
    /// `get_pattern_key` does: `^(.*\.)?(key)$`.
    fn pattern_value<T: Copy>(
        pattern: &BTreeMap<String, T>,
        module: &str,
        what: &str,
    ) -> Result<Option<T>> {
        for (k, v) in pattern {
            let re = Regex::new(&format!(r"^(?:.*\.)?(?:{k})$")).map_err(|e| {
                Error::Config(format!("{what} key {k:?} is not a valid regex: {e}"))
            })?;
            if re.is_match(module) {
                return Ok(Some(*v));
            }
        }
        Ok(None)
    }

    /// The rank, alpha and scale of `module`, or `None` when it is not
    /// targeted. PEFT matches `rank_pattern` keys in insertion order; JSON
    /// objects are read here in key order, which agrees unless two keys
    /// match the same module.
    pub fn target(&self, module: &str) -> Result<Option<LayerSpec>> {
        if !self.is_targeted(module)? {
            return Ok(None);
        }
        let r = Self::pattern_value(&self.rank_pattern, module, "rank_pattern")?.unwrap_or(self.r);
        let alpha = Self::pattern_value(&self.alpha_pattern, module, "alpha_pattern")?
            .unwrap_or(self.lora_alpha);
        Ok(Some(LayerSpec {
            r,
            alpha,
            scale: lora_scale(r, alpha, self.use_rslora),
            dropout: self.lora_dropout,
            use_dora: self.use_dora,
            init: self.init_lora_weights.clone(),
        }))
    }
}
