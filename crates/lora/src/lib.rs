//! llmft-lora: LoRA, rsLoRA and DoRA adapters over any base linear, with
//! PEFT-compatible IO and merging.
//!
//! - [`LoraConfig`]: PEFT's `adapter_config.json` (targets, ranks, alphas,
//!   rsLoRA, DoRA, dropout, init) and which modules it adapts.
//! - [`LoraLinear`]: one adapter. The model computes the base output
//!   `y = x·Wᵀ` (dequantizing a quantized W into a dense buffer first), then
//!   calls [`LoraLinear::forward`] to add the adapter in place, and in the
//!   backward writes `dx = dy·W` and calls [`LoraLinear::backward`], which
//!   adds the adapter's share to `dx` and accumulates f32 gradients.
//! - [`Adapter`]: all adapters of a model; saves and loads PEFT's format
//!   (`adapter_config.json` + `adapter_model.safetensors`).
//! - [`merge_into`]: `W + scale·B·A` (DoRA: rescaled rows) for export.
//!
//! Everything runs on the CPU or on CUDA through llmft-tensor's ops.
//!
//! ```
//! use std::collections::BTreeMap;
//! use llmft_lora::{Adapter, LinearShape, LoraConfig, LoraGrads, LoraSaved, Mode, NamesOrPattern};
//! use llmft_tensor::{ops, Ctx, DType, Tensor};
//!
//! let ctx = Ctx::cpu();
//! let config = LoraConfig {
//!     r: 4,
//!     lora_alpha: 8.0,
//!     target_modules: Some(NamesOrPattern::Names(vec!["q_proj".into()])),
//!     ..LoraConfig::default()
//! };
//! let shapes = BTreeMap::from([(
//!     "model.layers.0.self_attn.q_proj".to_string(),
//!     LinearShape::new(16, 8),
//! )]);
//! let adapter = Adapter::new(&ctx, &shapes, config, 42)?;
//! let lora = &adapter.layers["model.layers.0.self_attn.q_proj"];
//!
//! let w = Tensor::zeros(&ctx, DType::F32, &[8, 16])?;
//! let x = Tensor::zeros(&ctx, DType::F32, &[3, 16])?;
//! let mut y = Tensor::zeros(&ctx, DType::F32, &[3, 8])?;
//! ops::gemm(&ctx, &x, &w, &mut y, ops::Gemm::nt())?; // the base path
//! let mut saved = LoraSaved::new();
//! lora.forward(&ctx, &x, &w, &mut y, &mut saved, Mode::Train { seed: 1 })?;
//!
//! let dy = Tensor::zeros(&ctx, DType::F32, &[3, 8])?;
//! let mut dx = Tensor::zeros(&ctx, DType::F32, &[3, 16])?;
//! ops::gemm(&ctx, &dy, &w, &mut dx, ops::Gemm::default())?; // dx = dy·W
//! let mut grads = LoraGrads::zeros(&ctx, lora)?;
//! lora.backward(&ctx, &x, &w, &dy, &saved, &mut dx, &mut grads)?;
//! # Ok::<(), llmft_lora::Error>(())
//! ```
mod adapter;
mod config;
mod error;
mod linear;

pub use adapter::{layer_seed, peft_key, Adapter, CONFIG_FILE, KEY_PREFIX, WEIGHTS_FILE};
pub use config::{
    lora_scale, InitLoraWeights, LayerIndices, LayerSpec, LoraConfig, NamesOrPattern, OneOrMany,
};
pub use error::{Error, Result};
pub use linear::{merge_into, LinearShape, LoraGrads, LoraLinear, LoraSaved, Mode};
