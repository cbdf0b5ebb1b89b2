//! The training configuration: plain data with a documented default for
//! every field (transformers' `TrainingArguments` names where they exist).
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The shape of the learning-rate curve after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// The peak learning rate throughout.
    Constant,
    /// Linear decay from the peak to 0 at `max_steps`.
    Linear,
    /// Half a cosine from the peak to 0 at `max_steps`.
    Cosine,
}

/// What a step with a non-finite loss or gradient norm does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NanPolicy {
    /// Report it, leave the parameters and optimizer state untouched, go on.
    Skip,
    /// Return [`Error::NonFinite`].
    Stop,
}

/// What is trained, over which base: the named recipes of QLoRA-style
/// fine-tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainType {
    /// NF4 base (bitsandbytes layout) + LoRA.
    Qlora,
    /// HQQ 4-bit base + LoRA.
    HqqLora,
    /// HQQ 4-bit base + DoRA.
    HqqDora,
    /// NF4 base + DoRA.
    BnbDora,
    /// int8 (row-wise absmax) base + LoRA.
    Int8Lora,
    /// Dense base in the compute dtype + LoRA.
    Lora,
    /// Every weight trained (dense base, no adapter).
    Full,
    /// The last `freeze_trainable_layers` decoder layers trained, the rest
    /// (embedding and head included) frozen; dense base, no adapter.
    Freeze,
}

impl TrainType {
    /// Whether the trainable parameters are adapters (else the base's own weights).
    pub fn uses_adapter(self) -> bool {
        !matches!(self, TrainType::Full | TrainType::Freeze)
    }

    /// Whether the adapters are DoRA.
    pub fn dora(self) -> bool {
        matches!(self, TrainType::HqqDora | TrainType::BnbDora)
    }

    /// The base-weight quantization this recipe implies: `nf4`, `hqq4`,
    /// `int8` or `none`, as `model.quant` spells it.
    pub fn quant_name(self) -> &'static str {
        match self {
            TrainType::Qlora | TrainType::BnbDora => "nf4",
            TrainType::HqqLora | TrainType::HqqDora => "hqq4",
            TrainType::Int8Lora => "int8",
            TrainType::Lora | TrainType::Full | TrainType::Freeze => "none",
        }
    }
}

/// Hyperparameters and bookkeeping of a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// The recipe: `qlora`, `hqq_lora`, `hqq_dora`, `bnb_dora`, `int8_lora`,
    /// `lora`, `full` or `freeze`. Default "qlora".
    pub train_type: TrainType,
    /// With `train_type = "freeze"`: how many of the last decoder layers are
    /// trained (LLaMA-Factory's `freeze_trainable_layers`). Default 2.
    pub freeze_trainable_layers: usize,
    /// Peak learning rate. Default 2e-4.
    pub lr: f32,
    /// Decoupled AdamW weight decay (not applied to DoRA magnitudes). Default 0.0.
    pub weight_decay: f32,
    /// AdamW (β₁, β₂). Default [0.9, 0.999].
    pub betas: [f32; 2],
    /// AdamW ε. Default 1e-8.
    pub eps: f32,
    /// Learning-rate curve after warmup. Default "cosine".
    pub schedule: ScheduleKind,
    /// Linear warmup steps from 0; when 0, `warmup_ratio` decides. Default 0.
    pub warmup_steps: u64,
    /// Warmup as a fraction of `max_steps` (rounded up), used when
    /// `warmup_steps` is 0. Default 0.0.
    pub warmup_ratio: f64,
    /// Optimizer steps of the run. Default 1000.
    pub max_steps: u64,
    /// Micro-batches accumulated per optimizer step. Default 1.
    pub grad_accum: usize,
    /// Global gradient-norm clip; 0 disables clipping. Default 1.0.
    pub max_grad_norm: f32,
    /// Seed of the adapter init, dropout masks and data order. Default 42.
    pub seed: u64,
    /// What a non-finite loss or gradient norm does. Default "skip".
    pub nan_policy: NanPolicy,
    /// Bit-reproducible GPU runs: the fused attention's backward adds its
    /// dq terms in a fixed order instead of with float atomics (see
    /// `llmft_tensor::ops::set_deterministic_attention`; a slower backward).
    /// Default false.
    pub deterministic: bool,
    /// Host threads of an optimizer offloaded to host memory (the CLI's
    /// `offload.optimizer`, ZeRO-Offload style: f32 masters and moments in
    /// pinned host memory, AdamW on the host); `None` keeps it on the
    /// device, `Some(0)` uses every core. Not a `train.*` key.
    #[serde(skip)]
    pub optimizer_on_host: Option<usize>,
    /// Save a checkpoint every N steps (and at the end); 0 = only at the end. Default 500.
    pub checkpoint_every: u64,
    /// Checkpoints kept (the oldest are deleted); 0 keeps all. Default 2.
    pub keep_last: usize,
    /// Folder of checkpoints, metrics and the final adapter. Default "output".
    pub output_dir: PathBuf,
    /// Evaluate on the validation split every N steps; 0 = never. Default 0.
    pub eval_every: u64,
    /// Write a metrics line every N steps. Default 1.
    pub log_every: u64,
    /// Initial loss scale of f16 compute (dynamic: halved on overflow,
    /// doubled after `loss_scale_window` clean steps). Unused for bf16/f32.
    /// Default 65536.
    pub init_loss_scale: f32,
    /// Clean f16 steps before the loss scale doubles. Default 2000.
    pub loss_scale_window: u64,
    /// Also write the merged model (HF safetensors) at the end of a LoRA
    /// run, to `output_dir/merged`. Default false.
    pub export_merged: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            lr: 2e-4,
            weight_decay: 0.0,
            betas: [0.9, 0.999],
            eps: 1e-8,
            schedule: ScheduleKind::Cosine,
            warmup_steps: 0,
            warmup_ratio: 0.0,
            max_steps: 1000,
            grad_accum: 1,
            max_grad_norm: 1.0,
            seed: 42,
            nan_policy: NanPolicy::Skip,
            deterministic: false,
            optimizer_on_host: None,
            checkpoint_every: 500,
            keep_last: 2,
            output_dir: PathBuf::from("output"),
            eval_every: 0,
            log_every: 1,
            train_type: TrainType::Qlora,
            freeze_trainable_layers: 2,
            init_loss_scale: 65536.0,
            loss_scale_window: 2000,
            export_merged: false,
        }
    }
}

impl TrainConfig {
    /// Checks value ranges; the error names the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, why: &str| Err(Error::Config(format!("{key}: {why}")));
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad("lr", "must be a finite number ≥ 0");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay", "must be a finite number ≥ 0");
        }
        if self.betas.iter().any(|b| !(0.0..1.0).contains(b)) {
            return bad("betas", "each must be in [0, 1)");
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad("eps", "must be > 0");
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return bad("warmup_ratio", "must be in [0, 1]");
        }
        if self.max_steps == 0 {
            return bad("max_steps", "must be ≥ 1");
        }
        if self.grad_accum == 0 {
            return bad("grad_accum", "must be ≥ 1");
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return bad(
                "max_grad_norm",
                "must be a finite number ≥ 0 (0 disables clipping)",
            );
        }
        if self.log_every == 0 {
            return bad("log_every", "must be ≥ 1");
        }
        if self.train_type == TrainType::Freeze && self.freeze_trainable_layers == 0 {
            return bad(
                "freeze_trainable_layers",
                "must be ≥ 1 with train_type = \"freeze\"",
            );
        }
        if !(self.init_loss_scale.is_finite() && self.init_loss_scale >= 1.0) {
            return bad("init_loss_scale", "must be a finite number ≥ 1");
        }
        if self.loss_scale_window == 0 {
            return bad("loss_scale_window", "must be ≥ 1");
        }
        Ok(())
    }

    /// Warmup steps: `warmup_steps`, or `ceil(warmup_ratio · max_steps)` when
    /// that is 0 (as transformers does).
    pub fn warmup(&self) -> u64 {
        if self.warmup_steps > 0 {
            self.warmup_steps
        } else {
            (self.warmup_ratio * self.max_steps as f64).ceil() as u64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_and_unknown_keys_fail() {
        let c: TrainConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, TrainConfig::default());
        c.validate().unwrap();
        let c: TrainConfig =
            serde_json::from_str(r#"{"schedule": "linear", "warmup_ratio": 0.1, "max_steps": 25}"#)
                .unwrap();
        assert_eq!(c.warmup(), 3);
        assert!(serde_json::from_str::<TrainConfig>(r#"{"learning_rate": 1}"#).is_err());
        let bad = TrainConfig {
            grad_accum: 0,
            ..TrainConfig::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("grad_accum"));
    }
}

/// What lives in host memory instead of the GPU (`[offload]` of a job's
/// config; also what [`crate::estimate::JobSpec`] takes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
