//! llmft-models: Llama and Qwen decoder models from Hugging Face folders,
//! with hand-written forward and backward passes over llmft-tensor ops.
//!
//! A model is a sequence of units — embedding, decoder layers, final norm +
//! LM head + loss — whose frozen weights come from a [`WeightStore`].
//!
//! ```
//! use llmft_models::{Model, ModelBatch, ModelConfig};
//! use llmft_tensor::{Ctx, DType};
//! let json = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":64,"hidden_size":32,
//!   "intermediate_size":48,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2}"#;
//! let cfg = ModelConfig::from_json(json, "config.json".as_ref())?;
//! let ctx = Ctx::cpu();
//! let model = Model::random(cfg, &ctx, DType::F32, 0)?;
//! let batch = ModelBatch::from_host(&ctx, 1, 8, &[1, 5, 9, 2, 7, 3, 3, 8], None, None, None)?;
//! let loss = model.forward_backward(&batch, None, None)?;
//! assert!(loss.loss > 3.0 && loss.loss < 5.0); // ≈ ln(64) for random weights
//! # Ok::<(), llmft_models::Error>(())
//! ```
mod config;
mod error;
mod export;
mod layer;
mod loader;
mod model;
mod resolve;
mod stash;
mod store;

pub use config::{Arch, ModelConfig, SUPPORTED};
pub use error::{Error, Result};
pub use layer::KvCache;
pub use llmft_quant::QuantConfig;
pub use llmft_tensor::store::{
    BlobEntry, BlobLayout, Resident, StoreBuilder, Unit, UnitGuard, WeightStore,
};
pub use loader::{is_quantizable, load_into, random_into, set_load_progress, LoadHook, LoadStatus};
pub use model::{sample_token, GenerateOpts, Grads, Model, ModelBatch};
pub use resolve::{resolve_config, resolve_model, resolve_model_in};
pub use store::{part_key, QuantIndex, UnitWeights};
