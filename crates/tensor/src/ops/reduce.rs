//! Sums of squares and the global gradient norm.
use super::multi::{self, TableCache};
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

/// `out[0] += Σ over the tensors of Σ x²`, as [`sum_squares`] on each in
/// order: on the CPU bit-identical to that; on CUDA one launch per dtype
/// present (f32 partial sums per block, so the order of the atomic adds
/// differs from the per-tensor launches). `cache` keeps the device table of
/// pointers between calls (see [`TableCache`]; with several dtypes in the
/// list, only the last one's table stays cached).
pub fn sum_squares_multi(
    ctx: &Ctx,
    xs: &[&Tensor],
    out: &mut Tensor,
    mut cache: Option<&mut TableCache>,
) -> Result<()> {
    const OP: &str = "sum_squares_multi";
    on_ctx(ctx, OP, &[("out", out)])?;
    dtype_is(OP, "out", out, DType::F32)?;
    shape_is(OP, "out", out, &[1])?;
    for x in xs {
        on_ctx(ctx, OP, &[("x", x)])?;
        dtype_in(OP, "x", x, FLOATS)?;
    }
    let Some(cu) = ctx.cuda_ctx() else {
        for x in xs {
            sum_squares(ctx, x, out)?;
        }
        return Ok(());
    };
    let op = out.device_ptr()?;
    for dt in FLOATS {
        let group: Vec<&Tensor> = xs
            .iter()
            .copied()
            .filter(|x| x.dtype() == *dt && x.numel() > 0)
            .collect();
        if group.is_empty() {
            continue;
        }
        let ptrs = group
            .iter()
            .map(|x| x.device_ptr())
            .collect::<Result<Vec<u64>>>()?;
        let lens: Vec<usize> = group.iter().map(|x| x.numel()).collect();
        let (host, chunks) = multi::build(&[ptrs], &lens);
        // Held until the launch is queued.
        let table = multi::upload(ctx, host, cache.as_deref_mut())?;
        let tab = table.device_ptr()?;
        let blocks = multi::grid(chunks, cu.sm_count() * 8);
        // Per-block partial sums, added in a fixed order: reproducible.
        let part = Tensor::empty(ctx, DType::F32, &[blocks])?;
        let pp = part.device_ptr()?;
        launch!(
            cu,
            "reduce",
            kname!("sumsq_multi", *dt),
            cfg(blocks, THREADS, 0),
            tab,
            group.len() as i32,
            chunks as i64,
            multi::CHUNK as i64,
            pp
        )?;
        launch!(
            cu,
            "reduce",
            "sum_partials_f32",
            cfg(1, THREADS, 0),
            pp,
            blocks as i32,
            op
        )?;
    }
    Ok(())
}

/// `√(Σ over all tensors of Σ g²)`, the global norm used for clipping (one
/// [`sum_squares_multi`]; reads the result back, which waits for the device).
pub fn global_grad_norm(ctx: &Ctx, grads: &[&Tensor]) -> Result<f32> {
    global_grad_norm_cached(ctx, grads, None)
}

/// [`global_grad_norm`] keeping the device table of pointers in `cache`.
pub fn global_grad_norm_cached(
    ctx: &Ctx,
    grads: &[&Tensor],
    cache: Option<&mut TableCache>,
) -> Result<f32> {
    let mut acc = Tensor::zeros(ctx, DType::F32, &[1])?;
    sum_squares_multi(ctx, grads, &mut acc, cache)?;
    Ok(acc.to_vec::<f32>()?[0].sqrt())
}
