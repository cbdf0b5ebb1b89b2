//! Cross-entropy fused with the LM head, computed in chunks of tokens so the
//! f32 logits of the whole batch never exist at once.
use super::{dtype_in, dtype_is, gemm, kname, on_ctx, shape_is, write_f32, Gemm, FLOATS};
use crate::cuda::{cfg, launch};
use crate::{Ctx, DType, Error, Result, Tensor};

/// Options of [`lm_head_cross_entropy`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CrossEntropyOpts {
    /// Label value excluded from the loss (PyTorch's −100).
    pub ignore_index: i32,
    /// Tokens per chunk; 0 picks a chunk whose f32 logits take at most
    /// `max_chunk_bytes`.
    pub chunk_rows: usize,
    /// Bound on one chunk's f32 logits when `chunk_rows` is 0.
    pub max_chunk_bytes: usize,
    /// Divide the summed loss (and gradients) by this; `None` uses the number
    /// of non-ignored labels (a mean). Gradient accumulation passes the token
    /// count of all micro-batches of the step.
    pub normalizer: Option<f32>,
}

impl Default for CrossEntropyOpts {
    fn default() -> Self {
        Self {
            ignore_index: -100,
            chunk_rows: 0,
            max_chunk_bytes: 256 << 20,
            normalizer: None,
        }
    }
}

/// Gradient outputs of [`lm_head_cross_entropy`].
pub struct LmHeadGrads<'a> {
    /// Gradient of the hidden states `[N, D]`, overwritten (dtype of `h`).
    pub dh: &'a mut Tensor,
    /// Gradient of the LM-head weight `[V, D]` (f32 or `w`'s dtype), added
    /// into; `None` for a frozen head.
    pub dw: Option<&'a mut Tensor>,
}

/// What [`lm_head_cross_entropy`] measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossStats {
    /// Sum of the per-token losses over non-ignored labels.
    pub loss_sum: f64,
    /// Number of non-ignored labels.
    pub tokens: usize,
    /// `loss_sum / normalizer`.
    pub loss: f64,
}

/// Loss of the logits `h · wᵀ` against `labels` (`h [N, D]`, `w [V, D]`,
/// `labels [N]` i32), with optional gradients. Logits are f32, made and used
/// one chunk of tokens at a time (see [`CrossEntropyOpts`]).
pub fn lm_head_cross_entropy(
    ctx: &Ctx,
    h: &Tensor,
    w: &Tensor,
    labels: &Tensor,
    opts: &CrossEntropyOpts,
    grads: Option<LmHeadGrads<'_>>,
) -> Result<LossStats> {
    const OP: &str = "lm_head_cross_entropy";
    on_ctx(ctx, OP, &[("h", h), ("w", w), ("labels", labels)])?;
    dtype_in(OP, "h", h, FLOATS)?;
    dtype_is(OP, "w", w, h.dtype())?;
    dtype_is(OP, "labels", labels, DType::I32)?;
    if h.shape().len() != 2 || w.shape().len() != 2 || w.shape()[1] != h.shape()[1] {
        return Err(Error::Shape {
            op: OP,
            what: "w",
            got: w.shape().to_vec(),
            expected: vec![0, *h.shape().last().unwrap_or(&0)],
        });
    }
    let (n, d, v) = (h.shape()[0], h.shape()[1], w.shape()[0]);
    shape_is(OP, "labels", labels, &[n])?;
    let mut grads = grads;
    if let Some(g) = &grads {
        on_ctx(ctx, OP, &[("dh", g.dh)])?;
        dtype_is(OP, "dh", g.dh, h.dtype())?;
        shape_is(OP, "dh", g.dh, &[n, d])?;
        if let Some(dw) = &g.dw {
            on_ctx(ctx, OP, &[("dw", dw)])?;
            dtype_in(OP, "dw", dw, &[DType::F32, w.dtype()])?;
            shape_is(OP, "dw", dw, &[v, d])?;
        }
    }
    let host_labels = labels.to_vec::<i32>()?;
    let tokens = host_labels
        .iter()
        .filter(|&&l| l != opts.ignore_index)
        .count();
    if let Some(bad) = host_labels
        .iter()
        .find(|&&l| l != opts.ignore_index && (l < 0 || l as usize >= v))
    {
        return Err(Error::Invalid {
            op: OP,
            msg: format!("label {bad} is outside the vocabulary of {v}"),
        });
    }
    let norm = opts.normalizer.unwrap_or(tokens.max(1) as f32);
    let chunk = if opts.chunk_rows > 0 {
        opts.chunk_rows
    } else {
        (opts.max_chunk_bytes / (4 * v.max(1))).max(1)
    }
    .min(n.max(1));
    let logits = Tensor::empty(ctx, DType::F32, &[chunk, v])?;
    let mut dlog_sep = match (&grads, w.dtype()) {
        (Some(_), dt) if dt != DType::F32 => Some(Tensor::empty(ctx, dt, &[chunk, v])?),
        _ => None,
    };
    let loss_rows = Tensor::empty(ctx, DType::F32, &[n])?;
    let mut r0 = 0;
    while r0 < n {
        let rows = chunk.min(n - r0);
        let hc = h.view(r0 * d, &[rows, d])?;
        let mut lc = logits.view(0, &[rows, v])?;
        gemm(ctx, &hc, w, &mut lc, Gemm::nt())?;
        let lab = labels.view(r0, &[rows])?;
        let mut lr = loss_rows.view(r0, &[rows])?;
        let mut dl = match (&grads, &mut dlog_sep) {
            (None, _) => None,
            (Some(_), Some(sep)) => Some(sep.view(0, &[rows, v])?),
            (Some(_), None) => Some(lc.clone()),
        };
        rows_ce(
            ctx,
            &lc,
            &lab,
            &mut lr,
            dl.as_mut(),
            opts.ignore_index,
            1.0 / norm,
        )?;
        if let (Some(g), Some(dl)) = (grads.as_mut(), dl) {
            let mut dhc = g.dh.view(r0 * d, &[rows, d])?;
            gemm(ctx, &dl, w, &mut dhc, Gemm::default())?;
            if let Some(dw) = g.dw.as_deref_mut() {
                gemm(ctx, &dl, &hc, dw, Gemm::tn().accumulate())?;
            }
        }
        r0 += rows;
    }
    let loss_sum: f64 = loss_rows.to_vec::<f32>()?.iter().map(|&x| x as f64).sum();
    Ok(LossStats {
        loss_sum,
        tokens,
        loss: loss_sum / norm as f64,
    })
}

/// Threads per block of the cross-entropy kernels (`CE_T` in cross_entropy.cu).
const CE_THREADS: usize = 512;
/// Blocks per row (one cluster) of the sm_90 kernel (`CE_CL`).
const CE_CLUSTER: usize = 8;
/// The float4-per-thread counts the sm_90 kernel is instantiated for.
const CE_CLUSTER_K: [usize; 5] = [1, 2, 4, 8, 16];

/// Per-row loss and (optionally) `dlogits = (softmax − onehot) · inv_norm`.
fn rows_ce(
    ctx: &Ctx,
    logits: &Tensor,
    labels: &Tensor,
    loss: &mut Tensor,
    dlogits: Option<&mut Tensor>,
    ignore: i32,
    inv_norm: f32,
) -> Result<()> {
    let (rows, v) = (logits.shape()[0], logits.shape()[1]);
    if let Some(cu) = ctx.cuda_ctx() {
        let (dp, dt) = match &dlogits {
            Some(t) => (t.device_ptr()?, t.dtype()),
            None => (0u64, DType::F32),
        };
        let (lp, lab, lo) = (
            logits.device_ptr()?,
            labels.device_ptr()?,
            loss.device_ptr()?,
        );
        // sm_90: a cluster of CE_CLUSTER blocks per row holding the row in
        // registers (logits read once); `k` float4 per thread.
        let elem = dt.size() as u64;
        let aligned = v % 4 == 0 && lp % 16 == 0 && dp % (4 * elem) == 0;
        let k = CE_CLUSTER_K
            .iter()
            .copied()
            .find(|&k| v <= CE_CLUSTER * CE_THREADS * 4 * k);
        let clustered =
            cu.path_arch() >= (9, 0) && aligned && rows <= (i32::MAX as usize) / CE_CLUSTER;
        let (name, blocks) = match (clustered, k) {
            (true, Some(k)) => (
                match k {
                    1 => kname!("cross_entropy_cl1", dt),
                    2 => kname!("cross_entropy_cl2", dt),
                    4 => kname!("cross_entropy_cl4", dt),
                    8 => kname!("cross_entropy_cl8", dt),
                    _ => kname!("cross_entropy_cl16", dt),
                },
                rows * CE_CLUSTER,
            ),
            // One block per row, two passes over it.
            _ => (kname!("cross_entropy", dt), rows),
        };
        let c = cfg(blocks, CE_THREADS, 0);
        return launch!(
            cu,
            "cross_entropy",
            name,
            c,
            lp,
            lab,
            lo,
            dp,
            v as i32,
            ignore,
            inv_norm
        );
    }
    let lab = labels.as_slice::<i32>()?.to_vec();
    let l = logits.as_slice::<f32>()?.to_vec();
    let out = loss.as_mut_slice::<f32>()?;
    let mut grad = dlogits.as_ref().map(|_| vec![0f32; rows * v]);
    for r in 0..rows {
        let row = &l[r * v..(r + 1) * v];
        let skip = lab[r] == ignore;
        let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = row.iter().map(|x| (x - mx).exp()).sum();
        out[r] = if skip {
            0.0
        } else {
            sum.ln() + mx - row[lab[r] as usize]
        };
        if let Some(g) = grad.as_mut() {
            for j in 0..v {
                let onehot = if j as i32 == lab[r] { 1.0 } else { 0.0 };
                g[r * v + j] = if skip {
                    0.0
                } else {
                    ((row[j] - mx).exp() / sum - onehot) * inv_norm
                };
            }
        }
    }
    if let (Some(t), Some(g)) = (dlogits, grad) {
        write_f32(t, |o| o.copy_from_slice(&g))?;
    }
    Ok(())
}
