//! SwiGLU: `y = silu(gate) ⊙ up`.
use super::{
    blocks_for, dtype_in, dtype_is, kname, on_ctx, read_f32, shape_is, write_f32, FLOATS, THREADS,
};
use crate::cuda::{cfg, launch};
use crate::{Ctx, Result, Tensor};

fn sigmoid(g: f32) -> f32 {
    1.0 / (1.0 + (-g).exp())
}

/// `y = gate·σ(gate) ⊙ up` (all one shape and float dtype).
pub fn swiglu_fwd(ctx: &Ctx, gate: &Tensor, up: &Tensor, y: &mut Tensor) -> Result<()> {
    on_ctx(ctx, "swiglu_fwd", &[("gate", gate), ("up", up), ("y", y)])?;
    dtype_in("swiglu_fwd", "gate", gate, FLOATS)?;
    dtype_is("swiglu_fwd", "up", up, gate.dtype())?;
    dtype_is("swiglu_fwd", "y", y, gate.dtype())?;
    shape_is("swiglu_fwd", "up", up, gate.shape())?;
    shape_is("swiglu_fwd", "y", y, gate.shape())?;
    let n = gate.numel();
    if let Some(cu) = ctx.cuda_ctx() {
        let (gp, up_, yp) = (gate.device_ptr()?, up.device_ptr()?, y.device_ptr()?);
        let c = cfg(blocks_for(n, 8), THREADS, 0);
        return launch!(
            cu,
            "swiglu",
            kname!("swiglu_fwd", gate.dtype()),
            c,
            gp,
            up_,
            yp,
            n as i64
        );
    }
    let (g, u) = (read_f32(gate)?, read_f32(up)?);
    write_f32(y, |o| {
        for i in 0..n {
            o[i] = g[i] * sigmoid(g[i]) * u[i];
        }
    })
}

/// Backward of [`swiglu_fwd`]: `dgate = dy ⊙ up ⊙ σ(g)(1 + g(1 − σ(g)))`,
/// `dup = dy ⊙ silu(g)`.
pub fn swiglu_bwd(
    ctx: &Ctx,
    dy: &Tensor,
    gate: &Tensor,
    up: &Tensor,
    dgate: &mut Tensor,
    dup: &mut Tensor,
) -> Result<()> {
    on_ctx(
        ctx,
        "swiglu_bwd",
        &[
            ("dy", dy),
            ("gate", gate),
            ("up", up),
            ("dgate", dgate),
            ("dup", dup),
        ],
    )?;
    dtype_in("swiglu_bwd", "gate", gate, FLOATS)?;
    for (what, t) in [("dy", dy), ("up", up), ("dgate", &*dgate), ("dup", &*dup)] {
        dtype_is("swiglu_bwd", what, t, gate.dtype())?;
        shape_is("swiglu_bwd", what, t, gate.shape())?;
    }
    let n = gate.numel();
    if let Some(cu) = ctx.cuda_ctx() {
        let (dyp, gp, up_, dgp, dup_) = (
            dy.device_ptr()?,
            gate.device_ptr()?,
            up.device_ptr()?,
            dgate.device_ptr()?,
            dup.device_ptr()?,
        );
        let c = cfg(blocks_for(n, 8), THREADS, 0);
        let name = kname!("swiglu_bwd", gate.dtype());
        return launch!(cu, "swiglu", name, c, dyp, gp, up_, dgp, dup_, n as i64);
    }
    let (d, g, u) = (read_f32(dy)?, read_f32(gate)?, read_f32(up)?);
    write_f32(dgate, |o| {
        for i in 0..n {
            let s = sigmoid(g[i]);
            o[i] = d[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
        }
    })?;
    write_f32(dup, |o| {
        for i in 0..n {
            o[i] = d[i] * g[i] * sigmoid(g[i]);
        }
    })
}
