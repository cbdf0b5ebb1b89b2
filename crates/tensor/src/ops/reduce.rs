//! Sums of squares and the global gradient norm.
use super::{blocks_for, dtype_in, dtype_is, kname, on_ctx, read_f32, shape_is, FLOATS, THREADS};
use crate::cuda::{cfg, launch};
use crate::{Ctx, DType, Result, Tensor};

/// `out[0] += Σ x²` (`out` is f32 `[1]`), accumulated in f32 per block
/// (CUDA) or f64 (CPU).
pub fn sum_squares(ctx: &Ctx, x: &Tensor, out: &mut Tensor) -> Result<()> {
    on_ctx(ctx, "sum_squares", &[("x", x), ("out", out)])?;
    dtype_in("sum_squares", "x", x, FLOATS)?;
    dtype_is("sum_squares", "out", out, DType::F32)?;
    shape_is("sum_squares", "out", out, &[1])?;
    let n = x.numel();
    if n == 0 {
        return Ok(());
    }
    if let Some(cu) = ctx.cuda_ctx() {
        let (xp, op) = (x.device_ptr()?, out.device_ptr()?);
        let c = cfg(blocks_for(n, 8).min(cu.sm_count() * 8), THREADS, 0);
        return launch!(
            cu,
            "reduce",
            kname!("sumsq", x.dtype()),
            c,
            xp,
            n as i64,
            op
        );
    }
    let s: f64 = read_f32(x)?.iter().map(|&v| (v as f64) * (v as f64)).sum();
    out.as_mut_slice::<f32>()?[0] += s as f32;
    Ok(())
}

/// `√(Σ over all tensors of Σ g²)`, the global norm used for clipping.
pub fn global_grad_norm(ctx: &Ctx, grads: &[&Tensor]) -> Result<f32> {
    let mut acc = Tensor::zeros(ctx, DType::F32, &[1])?;
    for g in grads {
        sum_squares(ctx, g, &mut acc)?;
    }
    Ok(acc.to_vec::<f32>()?[0].sqrt())
}
