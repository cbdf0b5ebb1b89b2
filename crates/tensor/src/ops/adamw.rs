//! AdamW on f32 master parameters.
use super::multi::{self, same_len, TableCache};
use super::{blocks_for, dtype_in, dtype_is, kname, on_ctx, read_f32, shape_is, FLOATS, THREADS};
use crate::cuda::{cfg, launch};
use crate::{Ctx, DType, Error, Result, Tensor};

/// Hyper-parameters of one AdamW step (PyTorch's `torch.optim.AdamW`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    /// Learning rate.
    pub lr: f32,
    /// β₁.
    pub beta1: f32,
    /// β₂.
    pub beta2: f32,
    /// ε.
    pub eps: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    /// Step number, starting at 1 (bias correction).
    pub step: u64,
    /// Factor applied to the gradient first (clipping / loss-scale undo).
    pub grad_scale: f32,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            step: 1,
            grad_scale: 1.0,
        }
    }
}

/// One AdamW step on `param` (f32) with `grad` (f32/bf16/f16) and f32
/// moments `m`, `v`, in PyTorch's order of operations. When `param_bf16` is
/// given, the updated parameters are also written there in bf16.
pub fn adamw_step(
    ctx: &Ctx,
    param: &mut Tensor,
    grad: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    hp: &AdamWParams,
    param_bf16: Option<&mut Tensor>,
) -> Result<()> {
    const OP: &str = "adamw_step";
    check(ctx, OP, param, grad, m, v)?;
    if let Some(p16) = &param_bf16 {
        on_ctx(ctx, OP, &[("param_bf16", p16)])?;
        dtype_is(OP, "param_bf16", p16, DType::BF16)?;
        shape_is(OP, "param_bf16", p16, grad.shape())?;
    }
    let (bc1, bc2_sqrt) = bias_corrections(hp);
    let n = grad.numel();
    if let Some(cu) = ctx.cuda_ctx() {
        let p16 = match &param_bf16 {
            Some(t) => t.device_ptr()?,
            None => 0u64,
        };
        let (pp, gp, mp, vp) = (
            param.device_ptr()?,
            grad.device_ptr()?,
            m.device_ptr()?,
            v.device_ptr()?,
        );
        let c = cfg(blocks_for(n, 4), THREADS, 0);
        let name = kname!("adamw", grad.dtype());
        return launch!(
            cu,
            "adamw",
            name,
            c,
            pp,
            gp,
            mp,
            vp,
            p16,
            n as i64,
            hp.lr,
            hp.beta1,
            hp.beta2,
            hp.eps,
            hp.weight_decay,
            bc1,
            bc2_sqrt,
            hp.grad_scale
        );
    }
    cpu_step(param, grad, m, v, hp, param_bf16)
}

/// One AdamW step over many `(param, grad, m, v)` tuples (as
/// [`adamw_step`] on each, in order, without the bf16 copy) sharing the
/// hyper-parameters `hp`: a single launch on CUDA. All gradients share one
/// dtype. With `zero_grads` every gradient is set to 0 after it is read
/// (as [`super::fill`] with 0 would). `cache` keeps the device table of
/// pointers between calls (see [`TableCache`]).
///
/// On the CPU the result is bit-identical to calling [`adamw_step`] (and
/// [`super::fill`]) tensor by tensor. Every tensor is checked before
/// anything is written.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step_multi(
    ctx: &Ctx,
    params: &mut [&mut Tensor],
    grads: &mut [&mut Tensor],
    m: &mut [&mut Tensor],
    v: &mut [&mut Tensor],
    hp: &AdamWParams,
    zero_grads: bool,
    cache: Option<&mut TableCache>,
) -> Result<()> {
    const OP: &str = "adamw_step_multi";
    let t = same_len(
        OP,
        &[
            ("params", params.len()),
            ("grads", grads.len()),
            ("m", m.len()),
            ("v", v.len()),
        ],
    )?;
    for i in 0..t {
        check(ctx, OP, params[i], grads[i], m[i], v[i])?;
        if grads[i].dtype() != grads[0].dtype() {
            return Err(Error::DType {
                op: OP,
                what: "grad",
                got: grads[i].dtype(),
                expected: format!("{} (one dtype for all gradients)", grads[0].dtype()),
            });
        }
    }
    let Some(cu) = ctx.cuda_ctx() else {
        for i in 0..t {
            cpu_step(params[i], grads[i], m[i], v[i], hp, None)?;
            if zero_grads {
                super::fill(ctx, grads[i], 0.0)?;
            }
        }
        return Ok(());
    };
    if t == 0 {
        return Ok(());
    }
    let ptrs =
        |ts: &[&mut Tensor]| -> Result<Vec<u64>> { ts.iter().map(|x| x.device_ptr()).collect() };
    let cols = [ptrs(params)?, ptrs(grads)?, ptrs(m)?, ptrs(v)?];
    let lens: Vec<usize> = grads.iter().map(|g| g.numel()).collect();
    let (host, chunks) = multi::build(&cols, &lens);
    if chunks == 0 {
        return Ok(());
    }
    // Held until the launch is queued.
    let table = multi::upload(ctx, host, cache)?;
    let tab = table.device_ptr()?;
    let (bc1, bc2_sqrt) = bias_corrections(hp);
    let c = cfg(multi::grid(chunks, cu.sm_count() * 32), THREADS, 0);
    launch!(
        cu,
        "adamw",
        kname!("adamw_multi", grads[0].dtype()),
        c,
        tab,
        t as i32,
        chunks as i64,
        multi::CHUNK as i64,
        zero_grads as i32,
        hp.lr,
        hp.beta1,
        hp.beta2,
        hp.eps,
        hp.weight_decay,
        bc1,
        bc2_sqrt,
        hp.grad_scale
    )
}

/// The argument checks of one `(param, grad, m, v)` tuple.
fn check(
    ctx: &Ctx,
    op: &'static str,
    param: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
) -> Result<()> {
    on_ctx(
        ctx,
        op,
        &[("param", param), ("grad", grad), ("m", m), ("v", v)],
    )?;
    dtype_in(op, "grad", grad, FLOATS)?;
    for (what, t) in [("param", param), ("m", m), ("v", v)] {
        dtype_is(op, what, t, DType::F32)?;
        shape_is(op, what, t, grad.shape())?;
    }
    Ok(())
}

/// `(1 - β₁ᵗ, √(1 - β₂ᵗ))`, computed in f64 and rounded to f32.
fn bias_corrections(hp: &AdamWParams) -> (f32, f32) {
    let bc1 = 1.0 - (hp.beta1 as f64).powi(hp.step as i32);
    let bc2_sqrt = (1.0 - (hp.beta2 as f64).powi(hp.step as i32)).sqrt();
    (bc1 as f32, bc2_sqrt as f32)
}

/// The CPU update of one checked tuple.
fn cpu_step(
    param: &mut Tensor,
    grad: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    hp: &AdamWParams,
    param_bf16: Option<&mut Tensor>,
) -> Result<()> {
    let (bc1, bc2_sqrt) = bias_corrections(hp);
    let n = grad.numel();
    let g = read_f32(grad)?;
    let step = hp.lr / bc1;
    let decay = 1.0 - hp.lr * hp.weight_decay;
    let (ms, vs) = (m.as_mut_slice::<f32>()?, v.as_mut_slice::<f32>()?);
    let ps = param.as_mut_slice::<f32>()?;
    for i in 0..n {
        let gi = g[i] * hp.grad_scale;
        ms[i] = hp.beta1 * ms[i] + (1.0 - hp.beta1) * gi;
        vs[i] = hp.beta2 * vs[i] + (1.0 - hp.beta2) * gi * gi;
        ps[i] = ps[i] * decay - step * ms[i] / (vs[i].sqrt() / bc2_sqrt + hp.eps);
    }
    if let Some(p16) = param_bf16 {
        for (o, p) in p16.as_mut_slice::<half::bf16>()?.iter_mut().zip(ps.iter()) {
            *o = half::bf16::from_f32(*p);
        }
    }
    Ok(())
}
