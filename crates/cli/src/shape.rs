//! The flags that describe a training job's shape — model, recipe, sizes,
//! checkpointing, offload, sharding — shared by `llmft bench` (which runs
//! the job on random weights) and `llmft estimate` (which predicts its
//! memory), so the two always accept the same job.
use clap::Args;
use llmft_models::ModelConfig;
use llmft_tensor::DType;
use llmft_trainer::estimate::{JobSpec, Sharding};
use llmft_trainer::TrainType;
use serde_json::json;

/// The recipes `--train-type` accepts, as `train.train_type` spells them.
pub const TRAIN_TYPES: &str = "qlora, lora, hqq_lora, hqq_dora, bnb_dora, int8_lora, full, freeze";

/// A job's shape.
#[derive(Args, Debug, Clone)]
pub struct JobFlags {
    /// Model shape: a preset (llama3-8b, llama3-70b, llama2-7b, llama2-70b,
    /// mistral-7b, qwen2.5-7b, qwen3-8b), `tiny` (a 2-layer Llama small enough for CPU
    /// runs), a model folder or a hub id (only its config.json is read).
    #[arg(long, default_value = "llama3-8b")]
    pub model: String,
    /// Override the number of decoder layers.
    #[arg(long)]
    pub layers: Option<usize>,
    /// Recipe: qlora, lora, hqq_lora, hqq_dora, bnb_dora, int8_lora, full, freeze.
    #[arg(long, default_value = "qlora")]
    pub train_type: String,
    /// Tokens per row.
    #[arg(long, default_value_t = 2048)]
    pub seq: usize,
    /// Rows per micro-batch.
    #[arg(long, default_value_t = 1)]
    pub micro_batch: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Gradient checkpointing (true|false).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub checkpointing: bool,
    /// Under checkpointing, keep each layer's attention output (true|false).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub keep_attention: bool,
    /// Under checkpointing, share a layer's dequantized weights between its
    /// recompute and backward (model.checkpoint_cache_dequantized).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub cache_dequantized: bool,
    /// Under checkpointing, the last N layers are not checkpointed.
    #[arg(long, default_value_t = 0)]
    pub skip_layers: usize,
    /// Frozen weights in pinned host memory, streamed in ahead of use (offload.params).
    #[arg(long)]
    pub offload_params: bool,
    /// Checkpointed layer records in pinned host memory (offload.activations).
    #[arg(long)]
    pub offload_activations: bool,
    /// AdamW state in host memory, the update on the host (offload.optimizer).
    #[arg(long)]
    pub offload_optimizer: bool,
    /// Units prefetched ahead under --offload-params (offload.lookahead).
    #[arg(long, default_value_t = 1)]
    pub lookahead: usize,
    /// Under --offload-params, the embedding stays on the GPU (offload.keep_embedding).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub keep_embedding: bool,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    pub lora_r: usize,
    /// LoRA alpha.
    #[arg(long, default_value_t = 32.0)]
    pub lora_alpha: f64,
    /// Compute dtype: bf16, f16, f32.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Runs rank 0 of a job of this many ranks with its weights sharded
    /// (dist.strategy): the other ranks' shards are kept in host memory and
    /// copied in where an all-gather would bring them, so GPU memory and
    /// compute are those of one rank; communication is not (results say
    /// `"simulated": true`).
    #[arg(long, default_value_t = 1)]
    pub simulate_world: usize,
    /// How the weights are split (dist.strategy): full_shard,
    /// shard_grad_op, no_shard, hybrid_shard; with --simulate-world only
    /// the first two.
    #[arg(long, default_value = "full_shard")]
    pub strategy: String,
}

impl JobFlags {
    /// The recipe.
    pub fn train_type(&self) -> Result<TrainType, String> {
        serde_json::from_value(json!(self.train_type)).map_err(|_| {
            format!(
                "--train-type `{}` is not one of {TRAIN_TYPES}",
                self.train_type
            )
        })
    }

    /// The compute dtype.
    pub fn dtype(&self) -> Result<DType, String> {
        Ok(match self.dtype.as_str() {
            "bf16" => DType::BF16,
            "f16" => DType::F16,
            "f32" => DType::F32,
            other => return Err(format!("--dtype `{other}` is not one of bf16, f16, f32")),
        })
    }

    /// The model's shape with `--layers` applied, after checking the sizes.
    pub fn config(&self) -> Result<ModelConfig, String> {
        let mut config = model_shape(&self.model, "--model")?;
        if let Some(l) = self.layers {
            if l == 0 {
                return Err("--layers must be at least 1".into());
            }
            config.num_layers = l;
        }
        for (flag, v) in [
            ("--seq", self.seq),
            ("--micro-batch", self.micro_batch),
            ("--grad-accum", self.grad_accum),
            ("--lora-r", self.lora_r),
        ] {
            if v == 0 {
                return Err(format!("{flag} must be at least 1"));
            }
        }
        Ok(config)
    }

    /// The `[offload]` settings the flags name.
    pub fn offload(&self) -> crate::config::OffloadSettings {
        crate::config::OffloadSettings {
            params: self.offload_params,
            activations: self.offload_activations,
            optimizer: self.offload_optimizer,
            lookahead: self.lookahead,
            keep_embedding: self.keep_embedding,
        }
    }

    /// The sharding `--strategy` names.
    pub fn sharding(&self, gpus_per_node: usize) -> Result<Sharding, String> {
        Ok(match self.strategy.as_str() {
            "full_shard" => Sharding::FullShard,
            "shard_grad_op" => Sharding::ShardGradOp,
            "no_shard" => Sharding::NoShard,
            "hybrid_shard" => Sharding::HybridShard { gpus_per_node },
            s => {
                return Err(format!(
                    "--strategy `{s}`: use full_shard, shard_grad_op, no_shard or hybrid_shard"
                ))
            }
        })
    }

    /// The job as the memory estimate sees it, for `world` ranks
    /// (`--simulate-world` over 1 sets both the ranks and the simulation).
    pub fn spec(&self, world: usize, gpus_per_node: usize) -> Result<JobSpec, String> {
        let o = self.offload();
        let simulated = self.simulate_world > 1;
        let world_size = if simulated {
            self.simulate_world
        } else {
            world.max(1)
        };
        let sharding = self.sharding(gpus_per_node)?;
        Ok(JobSpec {
            config: self.config()?,
            train_type: self.train_type()?,
            dtype: self.dtype()?,
            lora_r: self.lora_r,
            lora_targets: Vec::new(),
            freeze_layers: llmft_trainer::TrainConfig::default().freeze_trainable_layers,
            seq: self.seq,
            micro_batch: self.micro_batch,
            checkpointing: self.checkpointing,
            keep_attention: self.keep_attention,
            skip_layers: self.skip_layers,
            cache_dequantized: self.cache_dequantized,
            offload: o,
            world_size,
            sharded: sharding != Sharding::NoShard && world_size > 1,
            sharding,
            simulated,
        })
    }
}

/// A preset, `tiny` (a 2-layer Llama whose every shape is a multiple of the
/// quantizers' block sizes, for CPU runs and tests), a model folder or a hub
/// id (its config.json alone); `what` names the setting in errors.
pub fn model_shape(name: &str, what: &str) -> Result<ModelConfig, String> {
    if name == "tiny" {
        let mut c = ModelConfig::preset("llama3-8b").map_err(|e| e.to_string())?;
        c.vocab_size = 512;
        c.hidden_size = 128;
        c.intermediate_size = 256;
        c.num_layers = 2;
        c.num_heads = 4;
        c.num_kv_heads = 2;
        c.head_dim = 32;
        return Ok(c);
    }
    if let Ok(c) = ModelConfig::preset(name) {
        return Ok(c);
    }
    let known = "a known model shape (llama3-8b, llama3-70b, llama2-7b, llama2-70b, mistral-7b, \
                 qwen2.5-7b, qwen3-8b, or tiny), a model folder or a hub id";
    let path = llmft_models::resolve_config(name)
        .map_err(|e| format!("{what} `{name}` is not {known}: {e}"))?;
    ModelConfig::from_file(&path).map_err(|e| format!("{what} `{name}`: {e}"))
}
