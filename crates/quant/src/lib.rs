//! llmft-quant: NF4 / FP4, int8 and HQQ quantization, bit-compatible with
//! bitsandbytes 0.50 and hqq 0.2.8, on the CPU (the reference) and CUDA.
//!
//! A [`QuantizedTensor`] holds a format's packed data and statistics with
//! the original shape and dtype. [`QuantizedTensor::quantize`] makes one
//! from a float tensor on any device; [`QuantizedTensor::dequantize`] writes
//! bf16 / f16 / f32 into a tensor the caller provides — the training path
//! dequantizes a layer's weights just before its GEMMs.
//! [`quantize_bytes`] quantizes one checkpoint tensor at a time while a
//! model is loaded; [`io`] reads and writes the safetensors keys transformers
//! uses for bitsandbytes checkpoints and the keys hqq's `HQQLinear` writes
//! for HQQ checkpoints.
//!
//! ```
//! use llmft_quant::{QuantConfig, QuantizedTensor};
//! use llmft_tensor::{Ctx, DType, Tensor};
//! let ctx = Ctx::cpu();
//! let w: Vec<f32> = (0..256).map(|i| ((i * 37 % 101) as f32 - 50.0) / 100.0).collect();
//! let w = Tensor::from_f32(&ctx, &w, DType::BF16, &[4, 64])?;
//! let q = QuantizedTensor::quantize(&ctx, &w, &QuantConfig::nf4())?;
//! let mut out = Tensor::zeros(&ctx, DType::BF16, &[4, 64])?;
//! q.dequantize(&ctx, &mut out)?;
//! assert_eq!(q.bytes(), 128 + 4 * 4); // 4 bits a value, one f32 absmax per 64
//! # Ok::<(), llmft_quant::Error>(())
//! ```
// The reference loops index several arrays by one position, as the kernels do.
#![allow(clippy::needless_range_loop)]

pub mod bnb;
mod cuda;
mod error;
pub mod hqq;
mod hqq_io;
pub mod int8;
pub mod io;
mod load;
mod quantized;

pub use bnb::Code4;
pub use error::{Error, Result};
pub use hqq::{HqqConfig, SolverParams};
pub use load::quantize_bytes;
pub use quantized::{
    Absmax, Bnb4, Hqq, HqqStat, Int8, Packed, PartFn, QuantConfig, QuantizedTensor,
};
