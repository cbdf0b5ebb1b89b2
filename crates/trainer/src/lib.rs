//! llmft-trainer: the training step, AdamW, learning-rate schedules,
//! gradient accumulation, clipping, checkpoints and metrics.
//!
//! - [`TrainConfig`]: hyperparameters as data, each with a documented default.
//! - [`LrSchedule`]: constant / linear / cosine with warmup, as transformers.
//! - [`Optimizer`]: AdamW over an adapter's f32 masters or f32 masters of
//!   the model's own weights (full / freeze), with global-norm clipping, the
//!   non-finite check ([`NanPolicy`]) and f16 loss scaling ([`LossScale`]).
//! - [`Trainer`]: one step = forward + backward of each micro-batch with the
//!   loss normalized by the step's trained tokens, then the update;
//!   [`Trainer::save_checkpoint`] / [`Trainer::resume`] continue bit-exactly.
//! - [`train`]: the whole run as one recipe — loader, micro-batches, steps,
//!   evaluation, checkpoints, progress, `metrics.jsonl`, `loss.png` and the
//!   final adapter / weights ([`RunData`], [`RunOptions`], [`RunSummary`]).
//! - [`MetricsWriter`]: one JSON line per step.
//! - [`model_batch`]: a data-pipeline batch as the model's batch.
//!
//! ```
//! use llmft_lora::LoraConfig;
//! use llmft_models::{Model, ModelBatch, ModelConfig};
//! use llmft_tensor::{Ctx, DType};
//! use llmft_trainer::{TrainConfig, Trainer};
//!
//! let json = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":64,"hidden_size":32,
//!   "intermediate_size":48,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2}"#;
//! let ctx = Ctx::cpu();
//! let mut model = Model::random(ModelConfig::from_json(json, "config.json".as_ref())?, &ctx, DType::F32, 0)?;
//! let lora: LoraConfig = serde_json::from_str(r#"{"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}"#)?;
//! let adapter = model.new_adapter(lora, 0)?;
//! model.attach_adapter(adapter);
//! let config = TrainConfig { lr: 1e-2, max_steps: 3, ..TrainConfig::default() };
//! let mut trainer = Trainer::new(config, &model)?;
//! let ids = [1, 5, 9, 2, 7, 3, 3, 8];
//! while !trainer.is_done() {
//!     let mut micro = [ModelBatch::from_host(&ctx, 1, 8, &ids, None, None, None)?];
//!     let stats = trainer.step(&mut model, &mut micro)?;
//!     assert!(stats.loss.is_finite() && !stats.skipped);
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
mod batch;
mod checkpoint;
mod config;
mod dist;
mod error;
pub mod estimate;
mod metrics;
mod optimizer;
mod plot;
mod progress;
mod run;
mod schedule;
mod trainer;

pub use batch::model_batch;
pub use checkpoint::{
    clean as clean_checkpoints, latest_checkpoint, list as list_checkpoints, optimizer_rank_file,
    read_manifest, read_state, verify as verify_checkpoint, Manifest, ManifestEntry, TrainerState,
    FAULT_KILL_AT_ENV, MANIFEST_FILE, MANIFEST_FORMAT, MODEL_FILE, OPTIMIZER_FILE, STATE_FILE,
};
pub use config::{NanPolicy, OffloadSettings, ScheduleKind, TrainConfig, TrainType};
pub use dist::{DataParallel, BUCKET_ELEMS};
pub use error::{Error, Result};
pub use metrics::MetricsWriter;
pub use optimizer::{decays, LossScale, Optimizer, Update};
pub use plot::{loss_curve, PLOT_SIZE};
pub use run::{
    evaluate, is_out_of_memory, train, RunData, RunOptions, RunSummary, ADAPTER_DIR, MERGED_DIR,
    METRICS_FILE, MODEL_DIR, PLOT_FILE,
};
pub use schedule::LrSchedule;
pub use trainer::{Accumulated, EvalStats, StepStats, Trainer};
