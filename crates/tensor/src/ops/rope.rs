//! Rotary position embeddings (Llama's rotate-half convention).
use super::{
    blocks_for, dtype_in, dtype_is, kname, on_ctx, read_f32, shape_is, write_f32, FLOATS, THREADS,
};
use crate::cuda::{cfg, launch};
use crate::{Ctx, DType, Error, Result, Tensor};

/// RoPE frequency scaling, as `rope_scaling` in a Hugging Face config.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum RopeScaling {
    /// Plain RoPE (`rope_type: "default"` or no `rope_scaling`).
    #[default]
    Default,
    /// Llama 3.1's `rope_type: "llama3"`.
    Llama3 {
        /// `factor`.
        factor: f64,
        /// `low_freq_factor`.
        low_freq_factor: f64,
        /// `high_freq_factor`.
        high_freq_factor: f64,
        /// `original_max_position_embeddings`.
        original_max_position_embeddings: f64,
    },
}

/// Inverse frequencies `[head_dim / 2]` for `theta` (`rope_theta`) and scaling,
/// computed as transformers does.
pub fn rope_inv_freq(head_dim: usize, theta: f64, scaling: RopeScaling) -> Vec<f32> {
    let half = head_dim / 2;
    (0..half)
        .map(|i| {
            // transformers computes the exponent in f32.
            let e = ((2 * i) as f32 / head_dim as f32) as f64;
            let f = (1.0 / theta.powf(e)) as f32 as f64;
            let f = match scaling {
                RopeScaling::Default => f,
                RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings: old,
                } => {
                    let low_wavelen = old / low_freq_factor;
                    let high_wavelen = old / high_freq_factor;
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                }
            };
            f as f32
        })
        .collect()
}

fn rope(
    op: &'static str,
    ctx: &Ctx,
    x: &Tensor,
    pos: &Tensor,
    inv_freq: &Tensor,
    y: &mut Tensor,
    sign: f32,
) -> Result<()> {
    on_ctx(
        ctx,
        op,
        &[("x", x), ("pos", pos), ("inv_freq", inv_freq), ("y", y)],
    )?;
    dtype_in(op, "x", x, FLOATS)?;
    dtype_is(op, "y", y, x.dtype())?;
    dtype_is(op, "pos", pos, DType::I32)?;
    dtype_is(op, "inv_freq", inv_freq, DType::F32)?;
    shape_is(op, "y", y, x.shape())?;
    let s = x.shape();
    if s.len() != 3 || s[2] % 2 != 0 {
        return Err(Error::Invalid {
            op,
            msg: format!("x must be [tokens, heads, head_dim] with an even head_dim, got {s:?}"),
        });
    }
    let (t, h, dh) = (s[0], s[1], s[2]);
    shape_is(op, "pos", pos, &[t])?;
    shape_is(op, "inv_freq", inv_freq, &[dh / 2])?;
    if let Some(cu) = ctx.cuda_ctx() {
        let (xp, pp, fp, yp) = (
            x.device_ptr()?,
            pos.device_ptr()?,
            inv_freq.device_ptr()?,
            y.device_ptr()?,
        );
        let c = cfg(blocks_for(t * dh / 2, 1), THREADS, 0);
        let name = kname!("rope", x.dtype());
        return launch!(cu, "rope", name, c, xp, pp, fp, yp, t as i64, h as i32, dh as i32, sign);
    }
    let vx = read_f32(x)?;
    let (p, f) = (pos.as_slice::<i32>()?, inv_freq.as_slice::<f32>()?);
    let half = dh / 2;
    write_f32(y, |out| {
        for ti in 0..t {
            for i in 0..half {
                let a = p[ti] as f32 * f[i];
                let (sn, cs) = ((a as f64).sin() as f32 * sign, (a as f64).cos() as f32);
                for hi in 0..h {
                    let o = (ti * h + hi) * dh + i;
                    let (u, v) = (vx[o], vx[o + half]);
                    out[o] = u * cs - v * sn;
                    out[o + half] = v * cs + u * sn;
                }
            }
        }
    })
}

/// Rotates `x [tokens, heads, head_dim]` by the angles `pos[t] · inv_freq[i]`
/// (`pos [tokens]` i32, one position per token so packed sequences restart at
/// 0; `inv_freq [head_dim/2]` f32 from [`rope_inv_freq`]).
pub fn rope_fwd(
    ctx: &Ctx,
    x: &Tensor,
    pos: &Tensor,
    inv_freq: &Tensor,
    y: &mut Tensor,
) -> Result<()> {
    rope("rope_fwd", ctx, x, pos, inv_freq, y, 1.0)
}

/// Backward of [`rope_fwd`]: the rotation by the opposite angles.
pub fn rope_bwd(
    ctx: &Ctx,
    dy: &Tensor,
    pos: &Tensor,
    inv_freq: &Tensor,
    dx: &mut Tensor,
) -> Result<()> {
    rope("rope_bwd", ctx, dy, pos, inv_freq, dx, -1.0)
}
