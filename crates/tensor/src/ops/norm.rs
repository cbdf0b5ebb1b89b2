//! RMSNorm over the last dimension.
use super::{dtype_in, dtype_is, kname, on_ctx, read_f32, shape_is, write_f32, FLOATS};
use crate::cuda::{cfg, launch};
use crate::{Ctx, DType, Error, Result, Tensor};

fn rows(op: &'static str, x: &Tensor, w: &Tensor) -> Result<(usize, usize)> {
    let d = *x.shape().last().unwrap_or(&0);
    shape_is(op, "w", w, &[d])?;
    if d == 0 {
        return Err(Error::Invalid {
            op,
            msg: "last dimension is 0".into(),
        });
    }
    Ok((x.numel() / d, d))
}

/// Threads per row: enough for each to hold at most `chunks` chunks of 8
/// elements in registers (the kernels' RMS_MAXC = 4, RMS_BWD_MAXC = 2).
fn threads_for(d: usize, chunks: usize) -> usize {
    (d / 8)
        .div_ceil(chunks)
        .next_multiple_of(32)
        .clamp(32, 1024)
}

/// `y = x · rstd · w` with `rstd = 1/√(mean(x²) + eps)` per row of the last
/// dimension `D`; `rstd [N]` (f32, N = rows) is saved for the backward.
pub fn rmsnorm_fwd(
    ctx: &Ctx,
    x: &Tensor,
    w: &Tensor,
    eps: f32,
    y: &mut Tensor,
    rstd: &mut Tensor,
) -> Result<()> {
    on_ctx(
        ctx,
        "rmsnorm_fwd",
        &[("x", x), ("w", w), ("y", y), ("rstd", rstd)],
    )?;
    dtype_in("rmsnorm_fwd", "x", x, FLOATS)?;
    dtype_is("rmsnorm_fwd", "w", w, x.dtype())?;
    dtype_is("rmsnorm_fwd", "y", y, x.dtype())?;
    dtype_is("rmsnorm_fwd", "rstd", rstd, DType::F32)?;
    shape_is("rmsnorm_fwd", "y", y, x.shape())?;
    let (n, d) = rows("rmsnorm_fwd", x, w)?;
    shape_is("rmsnorm_fwd", "rstd", rstd, &[n])?;
    if n == 0 {
        return Ok(());
    }
    if let Some(cu) = ctx.cuda_ctx() {
        let (xp, wp, yp, rp) = (
            x.device_ptr()?,
            w.device_ptr()?,
            y.device_ptr()?,
            rstd.device_ptr()?,
        );
        let c = cfg(n, threads_for(d, 4), 0);
        return launch!(
            cu,
            "rmsnorm",
            kname!("rmsnorm_fwd", x.dtype()),
            c,
            xp,
            wp,
            yp,
            rp,
            d as i32,
            eps
        );
    }
    let (vx, vw) = (read_f32(x)?, read_f32(w)?);
    let r: Vec<f32> = vx
        .chunks(d)
        .map(|row| 1.0 / (row.iter().map(|v| v * v).sum::<f32>() / d as f32 + eps).sqrt())
        .collect();
    write_f32(y, |out| {
        for ((orow, xrow), r) in out.chunks_mut(d).zip(vx.chunks(d)).zip(&r) {
            for ((o, xv), wv) in orow.iter_mut().zip(xrow).zip(vw.iter()) {
                *o = xv * r * wv;
            }
        }
    })?;
    rstd.as_mut_slice::<f32>()?.copy_from_slice(&r);
    Ok(())
}

/// Backward of [`rmsnorm_fwd`]: writes `dx`; when `dw` (f32 `[D]`) is given,
/// adds the weight gradient into it.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_bwd(
    ctx: &Ctx,
    dy: &Tensor,
    x: &Tensor,
    w: &Tensor,
    rstd: &Tensor,
    dx: &mut Tensor,
    dw: Option<&mut Tensor>,
) -> Result<()> {
    on_ctx(
        ctx,
        "rmsnorm_bwd",
        &[("dy", dy), ("x", x), ("w", w), ("rstd", rstd), ("dx", dx)],
    )?;
    dtype_in("rmsnorm_bwd", "x", x, FLOATS)?;
    for (what, t) in [("dy", dy), ("w", w), ("dx", &*dx)] {
        dtype_is("rmsnorm_bwd", what, t, x.dtype())?;
    }
    dtype_is("rmsnorm_bwd", "rstd", rstd, DType::F32)?;
    shape_is("rmsnorm_bwd", "dy", dy, x.shape())?;
    shape_is("rmsnorm_bwd", "dx", dx, x.shape())?;
    let (n, d) = rows("rmsnorm_bwd", x, w)?;
    shape_is("rmsnorm_bwd", "rstd", rstd, &[n])?;
    if let Some(dw) = &dw {
        on_ctx(ctx, "rmsnorm_bwd", &[("dw", dw)])?;
        dtype_is("rmsnorm_bwd", "dw", dw, DType::F32)?;
        shape_is("rmsnorm_bwd", "dw", dw, &[d])?;
    }
    if n == 0 {
        return Ok(());
    }
    if let Some(cu) = ctx.cuda_ctx() {
        let dwp = match &dw {
            Some(t) => t.device_ptr()?,
            None => 0u64,
        };
        let shared = if dw.is_some() { (d * 4) as u32 } else { 0 };
        if shared > 48 * 1024 {
            return Err(Error::Invalid {
                op: "rmsnorm_bwd",
                msg: format!("hidden size {d} exceeds the 12288 supported with a weight gradient"),
            });
        }
        let blocks = n.min(cu.sm_count() * 16);
        let (dyp, xp, wp, rp, dxp) = (
            dy.device_ptr()?,
            x.device_ptr()?,
            w.device_ptr()?,
            rstd.device_ptr()?,
            dx.device_ptr()?,
        );
        let c = cfg(blocks, threads_for(d, 2), shared);
        let name = kname!("rmsnorm_bwd", x.dtype());
        return launch!(cu, "rmsnorm", name, c, dyp, xp, wp, rp, dxp, dwp, n as i64, d as i32);
    }
    let (vdy, vx, vw) = (read_f32(dy)?, read_f32(x)?, read_f32(w)?);
    let r = rstd.as_slice::<f32>()?;
    write_f32(dx, |out| {
        for (i, orow) in out.chunks_mut(d).enumerate() {
            let (dyr, xr) = (&vdy[i * d..(i + 1) * d], &vx[i * d..(i + 1) * d]);
            let dot: f32 = dyr
                .iter()
                .zip(xr)
                .zip(vw.iter())
                .map(|((a, b), g)| a * g * b)
                .sum();
            let c3 = r[i] * r[i] * r[i] * dot / d as f32;
            for j in 0..d {
                orow[j] = r[i] * dyr[j] * vw[j] - xr[j] * c3;
            }
        }
    })?;
    if let Some(dw) = dw {
        let g = dw.as_mut_slice::<f32>()?;
        for i in 0..n {
            for j in 0..d {
                g[j] += vdy[i * d + j] * vx[i * d + j] * r[i];
            }
        }
    }
    Ok(())
}
