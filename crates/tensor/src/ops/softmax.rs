//! Causal softmax over materialized attention scores.
use super::{dtype_in, dtype_is, kname, on_ctx, read_f32, shape_is, write_f32, FLOATS};
use crate::cuda::{cfg, launch};
use crate::{Ctx, DType, Error, Result, Tensor};

/// Threads per row: about 8 elements each, at most 256 (the kernels hold up
/// to 16 per thread in registers, so rows up to 4096 keys are read once;
/// larger blocks of those register-heavy threads cut the occupancy: at 4096
/// keys, 512 threads were slower than the old three-pass kernel).
fn threads_for(tk: usize) -> usize {
    tk.div_ceil(8).next_multiple_of(32).clamp(32, 256)
}

/// `probs = softmax(scale · scores)` over the visible keys of each query, for
/// `scores [B, H, Tq, Tk]` whose queries are the last `Tq` of `Tk` positions.
/// Key `j` is visible to the query at position `qp` when `j ≤ qp` and, given
/// `segments [B, Tk]` (i32 example ids of a packed row), when
/// `segments[j] == segments[qp]`. Masked entries of `probs` are 0.
pub fn softmax_causal_fwd(
    ctx: &Ctx,
    scores: &Tensor,
    segments: Option<&Tensor>,
    scale: f32,
    probs: &mut Tensor,
) -> Result<()> {
    const OP: &str = "softmax_causal_fwd";
    on_ctx(ctx, OP, &[("scores", scores), ("probs", probs)])?;
    dtype_in(OP, "scores", scores, FLOATS)?;
    dtype_is(OP, "probs", probs, scores.dtype())?;
    shape_is(OP, "probs", probs, scores.shape())?;
    let s = scores.shape();
    if s.len() != 4 || s[2] > s[3] {
        return Err(Error::Invalid {
            op: OP,
            msg: format!(
                "scores must be [batch, heads, q_len, k_len] with q_len <= k_len, got {s:?}"
            ),
        });
    }
    let (b, h, tq, tk) = (s[0], s[1], s[2], s[3]);
    if let Some(seg) = segments {
        on_ctx(ctx, OP, &[("segments", seg)])?;
        dtype_is(OP, "segments", seg, DType::I32)?;
        shape_is(OP, "segments", seg, &[b, tk])?;
    }
    // No rows (the kernel's grid would still run one block) or no keys.
    if scores.numel() == 0 {
        return Ok(());
    }
    if let Some(cu) = ctx.cuda_ctx() {
        let segp = match segments {
            Some(t) => t.device_ptr()?,
            None => 0u64,
        };
        let (sp, pp) = (scores.device_ptr()?, probs.device_ptr()?);
        let c = cfg(b * h * tq, threads_for(tk), 0);
        let name = kname!("softmax_causal_fwd", scores.dtype());
        return launch!(
            cu, "softmax", name, c, sp, segp, pp, h as i32, tq as i32, tk as i32, scale
        );
    }
    let vs = read_f32(scores)?;
    let seg = segments.map(|t| t.as_slice::<i32>()).transpose()?;
    write_f32(probs, |out| {
        for (row, (orow, srow)) in out.chunks_mut(tk).zip(vs.chunks(tk)).enumerate() {
            let qp = row % tq + tk - tq;
            let bi = row / tq / h;
            let visible =
                |j: usize| j <= qp && seg.is_none_or(|sg| sg[bi * tk + j] == sg[bi * tk + qp]);
            let mx = (0..tk)
                .filter(|&j| visible(j))
                .map(|j| scale * srow[j])
                .fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = (0..tk)
                .filter(|&j| visible(j))
                .map(|j| (scale * srow[j] - mx).exp())
                .sum();
            for j in 0..tk {
                orow[j] = if visible(j) {
                    (scale * srow[j] - mx).exp() / sum
                } else {
                    0.0
                };
            }
        }
    })
}

/// Backward of [`softmax_causal_fwd`]:
/// `dscores = scale · p ⊙ (dp − Σⱼ p·dp)` per row (masked entries get 0).
pub fn softmax_causal_bwd(
    ctx: &Ctx,
    probs: &Tensor,
    dprobs: &Tensor,
    scale: f32,
    dscores: &mut Tensor,
) -> Result<()> {
    const OP: &str = "softmax_causal_bwd";
    on_ctx(
        ctx,
        OP,
        &[("probs", probs), ("dprobs", dprobs), ("dscores", dscores)],
    )?;
    dtype_in(OP, "probs", probs, FLOATS)?;
    for (what, t) in [("dprobs", dprobs), ("dscores", &*dscores)] {
        dtype_is(OP, what, t, probs.dtype())?;
        shape_is(OP, what, t, probs.shape())?;
    }
    let tk = *probs.shape().last().unwrap_or(&1);
    if probs.shape().len() != 4 {
        return Err(Error::Invalid {
            op: OP,
            msg: format!(
                "probs must be [batch, heads, q_len, k_len], got {:?}",
                probs.shape()
            ),
        });
    }
    if probs.numel() == 0 {
        return Ok(());
    }
    let rows = probs.numel() / tk;
    if let Some(cu) = ctx.cuda_ctx() {
        let (pp, dpp, dsp) = (
            probs.device_ptr()?,
            dprobs.device_ptr()?,
            dscores.device_ptr()?,
        );
        let c = cfg(rows, threads_for(tk), 0);
        let name = kname!("softmax_causal_bwd", probs.dtype());
        return launch!(cu, "softmax", name, c, pp, dpp, dsp, tk as i32, scale);
    }
    let (p, dp) = (read_f32(probs)?, read_f32(dprobs)?);
    write_f32(dscores, |out| {
        for ((orow, prow), drow) in out.chunks_mut(tk).zip(p.chunks(tk)).zip(dp.chunks(tk)) {
            let dot: f32 = prow.iter().zip(drow).map(|(a, b)| a * b).sum();
            for j in 0..tk {
                orow[j] = scale * prow[j] * (drow[j] - dot);
            }
        }
    })
}
