//! Model configuration from a Hugging Face `config.json`.
use std::path::Path;

use llmft_tensor::ops::RopeScaling;
use serde::Deserialize;

use crate::{Error, Result};

/// The model families llmft implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `LlamaForCausalLM` (Llama 2, 3, 3.1, 3.2).
    Llama,
    /// `Qwen2ForCausalLM` (Qwen 1.5, 2, 2.5): q/k/v biases.
    Qwen2,
    /// `Qwen3ForCausalLM`: per-head RMSNorm on q and k.
    Qwen3,
    /// `MistralForCausalLM` (Mistral 7B v0.1–v0.3, Mistral NeMo): Llama's
    /// layers, with a sliding attention window where the config sets one
    /// (see [`ModelConfig::sliding_window`]).
    Mistral,
}

/// The `architectures` values llmft accepts.
pub const SUPPORTED: &[&str] = &[
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
];

/// A decoder-only transformer's shape and numerics.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Family.
    pub arch: Arch,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// MLP inner size.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA).
    pub num_kv_heads: usize,
    /// Per-head size.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases.
    pub attention_bias: bool,
    /// Per-head RMSNorm on q and k (Qwen3).
    pub qk_norm: bool,
    /// Std of the random initialization.
    pub initializer_range: f32,
    /// The sliding attention window, where the model has one in use
    /// (Mistral 7B v0.1's 4096; Qwen2/3 only with `use_sliding_window`): a
    /// query sees only the keys fewer than this many positions back. llmft's
    /// attention is full causal, which equals it on rows of up to this many
    /// tokens, so the model refuses longer rows (and generations).
    pub sliding_window: Option<usize>,
}

#[derive(Deserialize)]
struct RawScaling {
    #[serde(alias = "type")]
    rope_type: Option<String>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
}

#[derive(Deserialize)]
struct Raw {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f32>,
    rope_theta: Option<f64>,
    rope_scaling: Option<RawScaling>,
    rope_parameters: Option<serde_json::Value>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    initializer_range: Option<f32>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
}

impl ModelConfig {
    /// Reads `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text, path)
    }

    /// Parses config.json text (`path` names it in errors).
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let err = |msg: String| Error::Config {
            path: path.to_path_buf(),
            msg,
        };
        let raw: Raw = serde_json::from_str(text).map_err(|e| err(e.to_string()))?;
        let arch_name = raw
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .or_else(|| {
                raw.model_type.as_deref().map(|t| match t {
                    "llama" => "LlamaForCausalLM".to_string(),
                    "mistral" => "MistralForCausalLM".to_string(),
                    "qwen2" => "Qwen2ForCausalLM".to_string(),
                    "qwen3" => "Qwen3ForCausalLM".to_string(),
                    other => other.to_string(),
                })
            })
            .ok_or_else(|| err("neither `architectures` nor `model_type` is set".into()))?;
        let arch = match arch_name.as_str() {
            "LlamaForCausalLM" => Arch::Llama,
            "MistralForCausalLM" => Arch::Mistral,
            "Qwen2ForCausalLM" => Arch::Qwen2,
            "Qwen3ForCausalLM" => Arch::Qwen3,
            other => {
                return Err(err(format!(
                    "architecture `{other}` is not supported; supported: {}",
                    SUPPORTED.join(", ")
                )))
            }
        };
        // transformers 5 moves rope settings into `rope_parameters`.
        let mut theta = raw.rope_theta;
        let mut scaling_raw = raw.rope_scaling;
        if let Some(p) = raw.rope_parameters {
            if theta.is_none() {
                theta = p.get("rope_theta").and_then(|v| v.as_f64());
            }
            if scaling_raw.is_none() {
                scaling_raw = serde_json::from_value(p).ok();
            }
        }
        let scaling = match scaling_raw {
            None => RopeScaling::Default,
            Some(s) => match s.rope_type.as_deref() {
                None | Some("default") => RopeScaling::Default,
                Some("llama3") => {
                    let need = |v: Option<f64>, k: &str| {
                        v.ok_or_else(|| err(format!("rope_scaling.{k} is required for llama3")))
                    };
                    RopeScaling::Llama3 {
                        factor: need(s.factor, "factor")?,
                        low_freq_factor: need(s.low_freq_factor, "low_freq_factor")?,
                        high_freq_factor: need(s.high_freq_factor, "high_freq_factor")?,
                        original_max_position_embeddings: need(
                            s.original_max_position_embeddings,
                            "original_max_position_embeddings",
                        )?,
                    }
                }
                Some(other) => {
                    return Err(err(format!(
                        "rope_scaling type `{other}` is not supported (default, llama3)"
                    )))
                }
            },
        };
        let heads = raw.num_attention_heads;
        if heads == 0 || raw.hidden_size == 0 || raw.num_hidden_layers == 0 {
            return Err(err(
                "hidden_size, num_attention_heads and num_hidden_layers must be positive".into(),
            ));
        }
        let kv = raw.num_key_value_heads.unwrap_or(heads);
        if kv == 0 || heads % kv != 0 {
            return Err(err(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"
            )));
        }
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / heads);
        if head_dim % 2 != 0 {
            return Err(err(format!("head_dim {head_dim} must be even for RoPE")));
        }
        // Every tensor size derived from the config must be countable.
        let (h, v, f) = (raw.hidden_size, raw.vocab_size, raw.intermediate_size);
        let width = |n: usize| n.checked_mul(head_dim).and_then(|w| w.checked_mul(h));
        let sizes_fit = raw.num_hidden_layers.checked_add(2).is_some()
            && width(heads).is_some()
            && width(kv).is_some()
            && f.checked_mul(h).is_some()
            && v.checked_mul(h).is_some();
        if !sizes_fit {
            return Err(err(format!(
                "the sizes (hidden_size {h}, vocab_size {v}, intermediate_size {f}, \
                 {heads} heads of {head_dim}, {} layers) are too large to count",
                raw.num_hidden_layers
            )));
        }
        // Mistral applies `sliding_window` whenever it is set; Qwen2/3 carry
        // one that only `use_sliding_window` turns on.
        let sliding_window = match arch {
            Arch::Mistral => raw.sliding_window,
            Arch::Qwen2 | Arch::Qwen3 if raw.use_sliding_window == Some(true) => raw.sliding_window,
            _ => None,
        };
        if sliding_window == Some(0) {
            return Err(err("sliding_window must be positive (or null)".into()));
        }
        Ok(Self {
            arch,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: theta.unwrap_or(10000.0),
            rope_scaling: scaling,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: raw.attention_bias.unwrap_or(arch == Arch::Qwen2),
            qk_norm: arch == Arch::Qwen3,
            initializer_range: raw.initializer_range.unwrap_or(0.02),
            sliding_window,
        })
    }

    /// Named real shapes for benchmarks: `llama3-8b`, `llama2-7b`,
    /// `llama2-70b`, `llama3-70b`, `mistral-7b` (v0.3), `qwen2.5-7b`,
    /// `qwen3-8b`.
    pub fn preset(name: &str) -> Result<Self> {
        let llama3 = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let base = |arch, v, h, i, l, nh, kv, theta, scaling| Self {
            arch,
            vocab_size: v,
            hidden_size: h,
            intermediate_size: i,
            num_layers: l,
            num_heads: nh,
            num_kv_heads: kv,
            head_dim: h / nh,
            rms_norm_eps: 1e-5,
            rope_theta: theta,
            rope_scaling: scaling,
            tie_word_embeddings: false,
            attention_bias: arch == Arch::Qwen2,
            qk_norm: arch == Arch::Qwen3,
            initializer_range: 0.02,
            sliding_window: None,
        };
        Ok(match name {
            "llama3-8b" | "llama3.1-8b" => base(Arch::Llama, 128256, 4096, 14336, 32, 32, 8, 500000.0, llama3),
            "llama3-70b" | "llama3.1-70b" => base(Arch::Llama, 128256, 8192, 28672, 80, 64, 8, 500000.0, llama3),
            "llama2-7b" => base(Arch::Llama, 32000, 4096, 11008, 32, 32, 32, 10000.0, RopeScaling::Default),
            "llama2-70b" => base(Arch::Llama, 32000, 8192, 28672, 80, 64, 8, 10000.0, RopeScaling::Default),
            "mistral-7b" => base(Arch::Mistral, 32768, 4096, 14336, 32, 32, 8, 1000000.0, RopeScaling::Default),
            "qwen2.5-7b" => base(Arch::Qwen2, 152064, 3584, 18944, 28, 28, 4, 1000000.0, RopeScaling::Default),
            "qwen3-8b" => Self {
                head_dim: 128,
                ..base(Arch::Qwen3, 151936, 4096, 12288, 36, 32, 8, 1000000.0, RopeScaling::Default)
            },
            other => {
                return Err(Error::Config {
                    path: "<preset>".into(),
                    msg: format!(
                        "unknown preset `{other}`; presets: llama3-8b, llama3-70b, llama2-7b, llama2-70b, mistral-7b, qwen2.5-7b, qwen3-8b"
                    ),
                })
            }
        })
    }

    /// A Hugging Face `config.json` for this configuration.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let (arch, model_type) = match self.arch {
            Arch::Llama => ("LlamaForCausalLM", "llama"),
            Arch::Mistral => ("MistralForCausalLM", "mistral"),
            Arch::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
            Arch::Qwen3 => ("Qwen3ForCausalLM", "qwen3"),
        };
        let rope_scaling = match self.rope_scaling {
            RopeScaling::Default => serde_json::Value::Null,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => serde_json::json!({
                "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
        };
        let mut json = serde_json::json!({
            "architectures": [arch], "model_type": model_type, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling, "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias, "hidden_act": "silu",
            "initializer_range": self.initializer_range,
        });
        match self.arch {
            Arch::Mistral => json["sliding_window"] = self.sliding_window.into(),
            Arch::Qwen2 | Arch::Qwen3 => {
                json["use_sliding_window"] = self.sliding_window.is_some().into();
                if let Some(w) = self.sliding_window {
                    json["sliding_window"] = w.into();
                }
            }
            Arch::Llama => {}
        }
        json
    }

    /// Why `tokens` tokens of one sequence cannot run, if they cannot:
    /// they are more than the sliding window, where full causal attention
    /// would differ from the model's.
    pub fn check_window(&self, tokens: usize) -> std::result::Result<(), String> {
        match self.sliding_window {
            Some(w) if tokens > w => Err(format!(
                "{tokens} tokens are more than the model's sliding attention window ({w}, \
                 config.json `sliding_window`), which llmft does not implement: full causal \
                 attention equals it only up to {w} tokens"
            )),
            _ => Ok(()),
        }
    }

    /// Query width `num_heads · head_dim`.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Key/value width `num_kv_heads · head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Hugging Face tensor names and shapes of decoder layer `i`.
    pub fn layer_tensors(&self, i: usize) -> Vec<(String, Vec<usize>)> {
        let p = format!("model.layers.{i}.");
        let (h, q, kv, f, d) = (
            self.hidden_size,
            self.q_dim(),
            self.kv_dim(),
            self.intermediate_size,
            self.head_dim,
        );
        let mut v = vec![
            (format!("{p}input_layernorm.weight"), vec![h]),
            (format!("{p}self_attn.q_proj.weight"), vec![q, h]),
            (format!("{p}self_attn.k_proj.weight"), vec![kv, h]),
            (format!("{p}self_attn.v_proj.weight"), vec![kv, h]),
            (format!("{p}self_attn.o_proj.weight"), vec![h, q]),
            (format!("{p}post_attention_layernorm.weight"), vec![h]),
            (format!("{p}mlp.gate_proj.weight"), vec![f, h]),
            (format!("{p}mlp.up_proj.weight"), vec![f, h]),
            (format!("{p}mlp.down_proj.weight"), vec![h, f]),
        ];
        if self.attention_bias {
            v.push((format!("{p}self_attn.q_proj.bias"), vec![q]));
            v.push((format!("{p}self_attn.k_proj.bias"), vec![kv]));
            v.push((format!("{p}self_attn.v_proj.bias"), vec![kv]));
        }
        if self.qk_norm {
            v.push((format!("{p}self_attn.q_norm.weight"), vec![d]));
            v.push((format!("{p}self_attn.k_norm.weight"), vec![d]));
        }
        v
    }

    /// Tensors of every unit: 0 = embedding, 1..=L = layers, L+1 = head.
    pub fn unit_tensors(&self, unit: usize) -> Vec<(String, Vec<usize>)> {
        let (v, h, l) = (self.vocab_size, self.hidden_size, self.num_layers);
        if unit == 0 {
            vec![("model.embed_tokens.weight".into(), vec![v, h])]
        } else if unit <= l {
            self.layer_tensors(unit - 1)
        } else {
            let mut t = vec![("model.norm.weight".to_string(), vec![h])];
            if !self.tie_word_embeddings {
                t.push(("lm_head.weight".into(), vec![v, h]));
            }
            t
        }
    }

    /// Number of units (`num_layers + 2`).
    pub fn num_units(&self) -> usize {
        self.num_layers + 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_llama3_with_scaling_and_rejects_unknown() {
        let text = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":128,"hidden_size":64,
            "intermediate_size":96,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
            "rms_norm_eps":1e-5,"rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":8.0,
            "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#;
        let c = ModelConfig::from_json(text, Path::new("config.json")).unwrap();
        assert_eq!((c.arch, c.head_dim, c.num_kv_heads), (Arch::Llama, 16, 2));
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        let bad = text.replace("LlamaForCausalLM", "GPT2LMHeadModel");
        let e = ModelConfig::from_json(&bad, Path::new("x/config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("x/config.json")
                && e.contains("GPT2LMHeadModel")
                && e.contains("Qwen3ForCausalLM"),
            "{e}"
        );
        let e = ModelConfig::from_json("{", Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("c.json"), "{e}");
    }

    /// Mistral's `sliding_window` is in force whenever set (v0.1: 4096;
    /// v0.2/v0.3: null); Qwen's only with `use_sliding_window`. A row longer
    /// than the window is refused, and the window survives the export.
    #[test]
    fn sliding_windows_are_read_checked_and_written_back() {
        let cfg = |extra: &str, arch: &str| {
            format!(
                r#"{{"architectures":["{arch}"],"vocab_size":128,"hidden_size":64,
                "intermediate_size":96,"num_hidden_layers":2,"num_attention_heads":4,
                "num_key_value_heads":2{extra}}}"#
            )
        };
        let p = Path::new("config.json");
        let v01 =
            ModelConfig::from_json(&cfg(r#","sliding_window":4096"#, "MistralForCausalLM"), p)
                .unwrap();
        assert_eq!((v01.arch, v01.sliding_window), (Arch::Mistral, Some(4096)));
        assert!(v01.check_window(4096).is_ok());
        let e = v01.check_window(4097).unwrap_err();
        assert!(
            e.contains("4097 tokens") && e.contains("(4096, config.json `sliding_window`)"),
            "{e}"
        );
        let v03 =
            ModelConfig::from_json(&cfg(r#","sliding_window":null"#, "MistralForCausalLM"), p)
                .unwrap();
        assert_eq!(v03.sliding_window, None);
        assert!(v03.check_window(1 << 20).is_ok());
        // By model_type alone.
        let t = cfg("", "x").replace(r#""architectures":["x"]"#, r#""model_type":"mistral""#);
        assert_eq!(ModelConfig::from_json(&t, p).unwrap().arch, Arch::Mistral);
        let qwen_off = ModelConfig::from_json(
            &cfg(
                r#","sliding_window":131072,"use_sliding_window":false"#,
                "Qwen2ForCausalLM",
            ),
            p,
        )
        .unwrap();
        assert_eq!(qwen_off.sliding_window, None);
        let qwen_on = ModelConfig::from_json(
            &cfg(
                r#","sliding_window":2048,"use_sliding_window":true"#,
                "Qwen2ForCausalLM",
            ),
            p,
        )
        .unwrap();
        assert_eq!(qwen_on.sliding_window, Some(2048));
        let zero = ModelConfig::from_json(&cfg(r#","sliding_window":0"#, "MistralForCausalLM"), p);
        assert!(zero
            .unwrap_err()
            .to_string()
            .contains("sliding_window must be positive"));
        // The export reads back as the same model.
        for c in [
            &v01,
            &v03,
            &qwen_off,
            &qwen_on,
            &ModelConfig::preset("mistral-7b").unwrap(),
        ] {
            let back = ModelConfig::from_json(&c.to_hf_json().to_string(), p).unwrap();
            assert_eq!(&back, c);
        }
    }

    #[test]
    fn presets_have_real_shapes() {
        let c = ModelConfig::preset("llama3-8b").unwrap();
        assert_eq!(
            (c.q_dim(), c.kv_dim(), c.intermediate_size),
            (4096, 1024, 14336)
        );
        assert!(ModelConfig::preset("gpt-5").is_err());
    }
}
