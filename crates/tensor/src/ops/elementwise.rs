//! Element-wise add, scaled add and multiply (same shape, same float dtype).
use super::{blocks_for, dtype_in, kname, on_ctx, read_f32, shape_is, write_f32, FLOATS, THREADS};
use crate::cuda::{cfg, launch};
use crate::{Ctx, Result, Tensor};

fn check(op: &'static str, ctx: &Ctx, a: &Tensor, b: &Tensor, y: &Tensor) -> Result<()> {
    on_ctx(ctx, op, &[("a", a), ("b", b), ("y", y)])?;
    dtype_in(op, "a", a, FLOATS)?;
    dtype_in(op, "b", b, &[a.dtype()])?;
    dtype_in(op, "y", y, &[a.dtype()])?;
    shape_is(op, "b", b, a.shape())?;
    shape_is(op, "y", y, a.shape())
}

fn binary(
    ctx: &Ctx,
    a: &Tensor,
    b_ptr: u64,
    y: &mut Tensor,
    op: i32,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    let cu = ctx.cuda_ctx().expect("called on a CUDA context");
    let n = a.numel() as i64;
    let (ap, yp) = (a.device_ptr()?, y.device_ptr()?);
    let c = cfg(blocks_for(n as usize, 8), THREADS, 0);
    launch!(
        cu,
        "elementwise",
        kname!("binary", a.dtype()),
        c,
        ap,
        b_ptr,
        yp,
        n,
        op,
        alpha,
        beta
    )
}

/// `y = a + b`.
pub fn add(ctx: &Ctx, a: &Tensor, b: &Tensor, y: &mut Tensor) -> Result<()> {
    check("add", ctx, a, b, y)?;
    if ctx.cuda_ctx().is_some() {
        return binary(ctx, a, b.device_ptr()?, y, 0, 1.0, 1.0);
    }
    let (va, vb) = (read_f32(a)?, read_f32(b)?);
    write_f32(y, |o| {
        for ((o, x), z) in o.iter_mut().zip(va.iter()).zip(vb.iter()) {
            *o = x + z;
        }
    })
}

/// `y = alpha·x + beta·y` in place (the residual update; `beta = 0` overwrites).
pub fn axpby(ctx: &Ctx, alpha: f32, x: &Tensor, beta: f32, y: &mut Tensor) -> Result<()> {
    check("axpby", ctx, x, y, y)?;
    if ctx.cuda_ctx().is_some() {
        let yp = y.device_ptr()?;
        return binary(ctx, x, yp, y, 0, alpha, beta);
    }
    let vx = read_f32(x)?;
    write_f32(y, |o| {
        for (o, x) in o.iter_mut().zip(vx.iter()) {
            *o = alpha * x + if beta != 0.0 { beta * *o } else { 0.0 };
        }
    })
}

/// `y = a ⊙ b`.
pub fn mul(ctx: &Ctx, a: &Tensor, b: &Tensor, y: &mut Tensor) -> Result<()> {
    check("mul", ctx, a, b, y)?;
    if ctx.cuda_ctx().is_some() {
        return binary(ctx, a, b.device_ptr()?, y, 1, 1.0, 1.0);
    }
    let (va, vb) = (read_f32(a)?, read_f32(b)?);
    write_f32(y, |o| {
        for ((o, x), z) in o.iter_mut().zip(va.iter()).zip(vb.iter()) {
            *o = x * z;
        }
    })
}
