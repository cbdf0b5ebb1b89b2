//! Quantize while loading: one checkpoint tensor at a time, so a model never
//! exists whole in 16 bits, on the GPU or in RAM.
use llmft_tensor::{numel, Ctx, DType, Tensor};

use crate::error::len_check;
use crate::{QuantConfig, QuantizedTensor, Result};

/// Quantizes one tensor given as its raw little-endian bytes (as a
/// safetensors file holds them): the bytes go to `ctx`'s device, are
/// quantized there, and only the quantized tensor stays.
///
/// ```
/// use llmft_quant::{quantize_bytes, QuantConfig};
/// use llmft_tensor::{Ctx, DType};
/// let w: Vec<u8> = (0..128u32).flat_map(|i| (i as f32 / 128.0).to_le_bytes()).collect();
/// let q = quantize_bytes(&Ctx::cpu(), &w, DType::F32, &[2, 64], &QuantConfig::hqq(4))?;
/// assert_eq!(q.shape, vec![2, 64]);
/// # Ok::<(), llmft_quant::Error>(())
/// ```
pub fn quantize_bytes(
    ctx: &Ctx,
    bytes: &[u8],
    dtype: DType,
    shape: &[usize],
    cfg: &QuantConfig,
) -> Result<QuantizedTensor> {
    len_check("tensor bytes", bytes.len(), numel(shape) * dtype.size())?;
    let mut host = Tensor::zeros(&Ctx::cpu(), dtype, shape)?;
    host.as_bytes_mut()?.copy_from_slice(bytes);
    let w = host.to_ctx(ctx)?;
    drop(host);
    QuantizedTensor::quantize(ctx, &w, cfg)
}
