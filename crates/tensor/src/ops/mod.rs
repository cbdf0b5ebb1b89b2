//! Ops: free functions writing into caller-provided outputs, each with a CPU
//! path (the reference) and a CUDA path. The device is chosen by the `Ctx`;
//! every tensor argument must live on that device.
mod adamw;
mod attention;
mod basic;
mod elementwise;
mod embedding;
mod gemm;
mod loss;
mod multi;
mod norm;
mod permute;
mod reduce;
mod rng;
mod rope;
mod softmax;
mod swiglu;

pub use adamw::{adamw_step, adamw_step_multi, AdamWParams};
pub use attention::{
    deterministic_attention, flash_attn_bwd, flash_attn_bwd_tiles, flash_attn_bwd_tokens,
    flash_attn_fwd, flash_attn_fwd_tokens, flash_attn_supported, set_deterministic_attention,
};
pub use basic::{cast, fill, fill_multi};
pub use elementwise::{add, axpby, mul};
pub use embedding::{embedding_bwd, embedding_fwd};
pub use gemm::{gemm, Gemm};
pub use loss::{lm_head_cross_entropy, CrossEntropyOpts, LmHeadGrads, LossStats};
pub use multi::TableCache;
pub use norm::{rmsnorm_bwd, rmsnorm_fwd};
pub use permute::permute_0213;
pub use reduce::{global_grad_norm, global_grad_norm_cached, sum_squares, sum_squares_multi};
pub use rng::{dropout, fill_normal, fill_uniform, uniform01};
pub use rope::{rope_bwd, rope_fwd, rope_inv_freq, RopeScaling};
pub use softmax::{softmax_causal_bwd, softmax_causal_fwd};
pub use swiglu::{swiglu_bwd, swiglu_fwd};

use std::borrow::Cow;

use half::{bf16, f16};

use crate::{Ctx, DType, Error, Result, Tensor};

/// Threads per block of the element-wise kernels.
pub(crate) const THREADS: usize = 256;

/// Checks that every tensor lives on `ctx`'s device.
pub(crate) fn on_ctx(ctx: &Ctx, op: &'static str, ts: &[(&'static str, &Tensor)]) -> Result<()> {
    for (what, t) in ts {
        if t.device() != ctx.device() {
            return Err(Error::Device {
                op,
                what,
                got: t.device(),
                expected: ctx.device(),
            });
        }
    }
    Ok(())
}

/// Checks a tensor's shape.
pub(crate) fn shape_is(
    op: &'static str,
    what: &'static str,
    t: &Tensor,
    s: &[usize],
) -> Result<()> {
    if t.shape() != s {
        return Err(Error::Shape {
            op,
            what,
            got: t.shape().to_vec(),
            expected: s.to_vec(),
        });
    }
    Ok(())
}

/// Checks a tensor's dtype against a list.
pub(crate) fn dtype_in(
    op: &'static str,
    what: &'static str,
    t: &Tensor,
    allowed: &[DType],
) -> Result<()> {
    if !allowed.contains(&t.dtype()) {
        let names: Vec<&str> = allowed.iter().map(|d| d.name()).collect();
        return Err(Error::DType {
            op,
            what,
            got: t.dtype(),
            expected: names.join(" or "),
        });
    }
    Ok(())
}

pub(crate) const FLOATS: &[DType] = &[DType::F32, DType::BF16, DType::F16];

/// Checks a tensor's dtype equals `d`.
pub(crate) fn dtype_is(op: &'static str, what: &'static str, t: &Tensor, d: DType) -> Result<()> {
    dtype_in(op, what, t, &[d])
}

/// A host float tensor's elements as f32 (borrowed when already f32).
pub(crate) fn read_f32(t: &Tensor) -> Result<Cow<'_, [f32]>> {
    Ok(match t.dtype() {
        DType::F32 => Cow::Borrowed(t.as_slice::<f32>()?),
        DType::BF16 => Cow::Owned(t.as_slice::<bf16>()?.iter().map(|v| v.to_f32()).collect()),
        DType::F16 => Cow::Owned(t.as_slice::<f16>()?.iter().map(|v| v.to_f32()).collect()),
        d => {
            return Err(Error::DType {
                op: "read",
                what: "tensor",
                got: d,
                expected: "a float type".into(),
            })
        }
    })
}

/// Runs `f` on a host float tensor's elements as f32, writing back with
/// round-to-nearest when the tensor is bf16/f16. `f` sees the current values.
pub(crate) fn write_f32<R>(t: &mut Tensor, f: impl FnOnce(&mut [f32]) -> R) -> Result<R> {
    match t.dtype() {
        DType::F32 => Ok(f(t.as_mut_slice::<f32>()?)),
        DType::BF16 => {
            let mut buf: Vec<f32> = t.as_slice::<bf16>()?.iter().map(|v| v.to_f32()).collect();
            let r = f(&mut buf);
            for (o, v) in t.as_mut_slice::<bf16>()?.iter_mut().zip(&buf) {
                *o = bf16::from_f32(*v);
            }
            Ok(r)
        }
        DType::F16 => {
            let mut buf: Vec<f32> = t.as_slice::<f16>()?.iter().map(|v| v.to_f32()).collect();
            let r = f(&mut buf);
            for (o, v) in t.as_mut_slice::<f16>()?.iter_mut().zip(&buf) {
                *o = f16::from_f32(*v);
            }
            Ok(r)
        }
        d => Err(Error::DType {
            op: "write",
            what: "tensor",
            got: d,
            expected: "a float type".into(),
        }),
    }
}

/// The kernel name `base_<dtype>` for a float dtype, as a static string.
macro_rules! kname {
    ($base:literal, $d:expr) => {
        match $d {
            $crate::DType::F32 => concat!($base, "_f32"),
            $crate::DType::BF16 => concat!($base, "_bf16"),
            $crate::DType::F16 => concat!($base, "_f16"),
            other => {
                return Err($crate::Error::DType {
                    op: $base,
                    what: "tensor",
                    got: other,
                    expected: "f32, bf16 or f16".into(),
                })
            }
        }
    };
}
pub(crate) use kname;

/// Blocks for `n` work items of `per_thread` elements each.
pub(crate) fn blocks_for(n: usize, per_thread: usize) -> usize {
    n.div_ceil(per_thread * THREADS).clamp(1, 1 << 20)
}
