//! Fused causal attention: `o = softmax(scale · q·kᵀ) · v` over the visible
//! keys without materializing the `T × T` scores (FlashAttention-2 on CUDA).
use std::sync::atomic::{AtomicBool, Ordering};

use cudarc::driver::LaunchConfig;

use super::{dtype_in, dtype_is, on_ctx, read_f32, shape_is, write_f32, FLOATS};
use crate::cuda::launch;
use crate::{Ctx, DType, Error, Result, Tensor};

static DETERMINISTIC: AtomicBool = AtomicBool::new(false);

/// Makes the CUDA backward of the fused attention for head dims 64 and 128
/// bit-reproducible from run to run (process-wide; off by default). Its key
/// blocks otherwise add their dq contributions with float atomics in the
/// order the GPU schedules them, as FlashAttention-2 does; with this on they
/// add into each query tile one after another in key-tile order (a counter
/// per tile), which costs some backward speed. The CPU path and the kernels
/// for head dims 16 and 32 (head-major only) are not affected by it.
pub fn set_deterministic_attention(on: bool) {
    DETERMINISTIC.store(on, Ordering::Relaxed);
}

/// Whether [`set_deterministic_attention`] is on.
pub fn deterministic_attention() -> bool {
    DETERMINISTIC.load(Ordering::Relaxed)
}

/// Head dims the CUDA kernels are instantiated for.
const CUDA_HEAD_DIMS: &[usize] = &[16, 32, 64, 128];
/// Query rows (forward) and key rows (backward) per CUDA block.
const TILE: usize = 64;
/// Threads per CUDA block (4 warps).
const THREADS: u32 = 128;

/// Kernel names per (dtype, head dim), in the order of [`CUDA_HEAD_DIMS`]
/// (bf16 first, then f16), with an optional tiling suffix.
macro_rules! names {
    ($base:literal) => {
        names!($base, "")
    };
    ($base:literal, $tiles:literal) => {
        [
            concat!($base, "_bf16_d16", $tiles),
            concat!($base, "_bf16_d32", $tiles),
            concat!($base, "_bf16_d64", $tiles),
            concat!($base, "_bf16_d128", $tiles),
            concat!($base, "_f16_d16", $tiles),
            concat!($base, "_f16_d32", $tiles),
            concat!($base, "_f16_d64", $tiles),
            concat!($base, "_f16_d128", $tiles),
        ]
    };
}
/// Whether [`flash_attn_fwd`]/[`flash_attn_bwd`] run on `ctx` for `dtype`
/// and `head_dim`: always on the CPU; on CUDA for bf16/f16 with head dims
/// 16, 32, 64 or 128 where the kernel path allows the shared memory a block
/// needs (callers fall back to materialized attention otherwise; see
/// [`flash_attn_bwd_tiles`]).
pub fn flash_attn_supported(ctx: &Ctx, dtype: DType, head_dim: usize) -> bool {
    match ctx.cuda_ctx() {
        None => FLOATS.contains(&dtype),
        Some(cu) => {
            matches!(dtype, DType::BF16 | DType::F16)
                && CUDA_HEAD_DIMS.contains(&head_dim)
                && (!tiled2(head_dim)
                    || (fwd_smem(head_dim) <= cu.max_shared_per_block()
                        && bwd_tiles(head_dim, cu.max_shared_per_block()).is_some()))
        }
    }
}

/// The keys and queries per block of the CUDA backward for `head_dim` on
/// `ctx`: the largest tiles whose shared memory the kernel path allows
/// (128 × 64 needs 155.5 KiB at head dim 128, so sm_80/90; 64 × 32 takes
/// 73.8 KiB, sm_86/89 and sm_70; 64 × 16 54.4 KiB, sm_75). `None` on the
/// CPU, for head dims 16 and 32 (their first kernels take 64 × 64 in static
/// memory) and where nothing fits.
pub fn flash_attn_bwd_tiles(ctx: &Ctx, head_dim: usize) -> Option<(usize, usize)> {
    let cu = ctx.cuda_ctx()?;
    if !tiled2(head_dim) {
        return None;
    }
    bwd_tiles(head_dim, cu.max_shared_per_block()).map(|t| (t.keys, t.queries))
}

/// The dynamic shared memory of the FA2 forward kernel for head dim `d`.
fn fwd_smem(d: usize) -> usize {
    // Key tiles of 64 for head dim 64, 32 for 128 (flash_attn.cu).
    let bn = if d > 64 { 32 } else { 64 };
    (128 + 2 * bn) * (d + 8) * 2 + bn * 4
}

/// One tiling of the FA2 backward kernel (`flash_attn2_bwd_*` in
/// flash_attn.cu): keys per block (a warp per 16), queries per tile.
struct BwdTiles {
    keys: usize,
    queries: usize,
    /// Its kernels, in the order of [`names!`].
    names: [&'static str; 8],
    /// Head dims it is instantiated for.
    dims: &'static [usize],
}

/// The backward tilings, largest first.
const BWD_TILES: [BwdTiles; 3] = [
    BwdTiles {
        keys: 128,
        queries: 64,
        names: names!("flash_attn2_bwd", ""),
        dims: &[64, 128],
    },
    BwdTiles {
        keys: 64,
        queries: 32,
        names: names!("flash_attn2_bwd", "_n64m32"),
        dims: &[64, 128],
    },
    BwdTiles {
        keys: 64,
        queries: 16,
        names: names!("flash_attn2_bwd", "_n64m16"),
        dims: &[128],
    },
];

impl BwdTiles {
    /// Its dynamic shared memory for head dim `d`: K and V, two buffers of
    /// Q and dO tiles, dSᵀ and the per-query terms.
    fn smem(&self, d: usize) -> usize {
        let (n, m) = (self.keys, self.queries);
        (2 * n + 4 * m) * (d + 8) * 2 + n * (m + 8) * 2 + 6 * m * 4
    }

    /// Threads per block.
    fn threads(&self) -> u32 {
        (self.keys / 16 * 32) as u32
    }
}

/// The largest backward tiling for head dim `d` within `max_smem` bytes.
fn bwd_tiles(d: usize, max_smem: usize) -> Option<&'static BwdTiles> {
    BWD_TILES
        .iter()
        .find(|t| t.dims.contains(&d) && t.smem(d) <= max_smem)
}

/// The checked dimensions of one call.
struct Dims {
    b: usize,
    hq: usize,
    hkv: usize,
    t: usize,
    d: usize,
}

/// The dimensions of a call with head-major (`[B, H, T, D]`) or, with
/// `tok`, token-major (`[B, T, H, D]`) q, k, v.
#[allow(clippy::too_many_arguments)]
fn check(
    op: &'static str,
    ctx: &Ctx,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: Option<&Tensor>,
    lse: &Tensor,
    tok: bool,
) -> Result<Dims> {
    on_ctx(ctx, op, &[("q", q), ("k", k), ("v", v), ("lse", lse)])?;
    dtype_in(op, "q", q, FLOATS)?;
    dtype_is(op, "k", k, q.dtype())?;
    dtype_is(op, "v", v, q.dtype())?;
    dtype_is(op, "lse", lse, DType::F32)?;
    let (qs, ks) = (q.shape(), k.shape());
    let (hi, ti) = if tok { (2, 1) } else { (1, 2) };
    if qs.len() != 4 || ks.len() != 4 || ks[hi] == 0 || qs[hi] % ks[hi] != 0 {
        let form = if tok {
            "[batch, seq, heads, head_dim]"
        } else {
            "[batch, heads, seq, head_dim]"
        };
        return Err(Error::Invalid {
            op,
            msg: format!(
                "q and k must be {form} with q's heads a multiple of k's, got {qs:?} and {ks:?}"
            ),
        });
    }
    let dims = Dims {
        b: qs[0],
        hq: qs[hi],
        hkv: ks[hi],
        t: qs[ti],
        d: qs[3],
    };
    let kshape = if tok {
        [dims.b, dims.t, dims.hkv, dims.d]
    } else {
        [dims.b, dims.hkv, dims.t, dims.d]
    };
    shape_is(op, "k", k, &kshape)?;
    shape_is(op, "v", v, k.shape())?;
    shape_is(op, "lse", lse, &[dims.b, dims.hq, dims.t])?;
    if let Some(seg) = segments {
        on_ctx(ctx, op, &[("segments", seg)])?;
        dtype_is(op, "segments", seg, DType::I32)?;
        shape_is(op, "segments", seg, &[dims.b, dims.t])?;
    }
    Ok(dims)
}

// The first kernels exist for head dims 16 and 32, the FA2 ones for 64 and
// 128 (see `tiled2`); the pre-pass for all four.
const FWD: [&str; 8] = names!("flash_attn_fwd");
const BWD_PRE: [&str; 8] = names!("flash_attn_bwd_pre");
const BWD: [&str; 8] = names!("flash_attn_bwd");
const FWD2: [&str; 8] = names!("flash_attn2_fwd");

/// The launch shape of this call's forward or backward kernel.
struct Launch {
    name: &'static str,
    cfg: LaunchConfig,
}

/// Whether head dim `d` takes the FlashAttention-2 kernels with the larger
/// tiles (`flash_attn2_*`; 16 and 32 keep the first ones).
fn tiled2(d: usize) -> bool {
    matches!(d, 64 | 128)
}

/// Forward: 128 query rows per block of 128 threads (64 with the first
/// kernels); the FA2 kernels keep the Q tile, K and V tiles and their
/// segment ids in dynamic shared memory.
fn fwd_launch(ki: usize, dm: &Dims) -> Launch {
    if tiled2(dm.d) {
        let smem = fwd_smem(dm.d);
        return Launch {
            name: FWD2[ki],
            cfg: LaunchConfig {
                grid_dim: ((dm.b * dm.hq) as u32, dm.t.div_ceil(128) as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: smem as u32,
            },
        };
    }
    Launch {
        name: FWD[ki],
        cfg: grid(dm.t.div_ceil(TILE), dm.b * dm.hq),
    }
}

/// Backward: with the FA2 kernels, [`bwd_tiles`]' keys per block (a warp
/// per 16) with K, V, two buffers of Q and dO tiles, dSᵀ and the per-query
/// terms in dynamic shared memory; 64 keys per block of 128 threads, static
/// memory, with the first kernels. Also the queries per tile (the
/// deterministic mode keeps a counter per tile).
fn bwd_launch(cu: &crate::cuda::CudaCtx, ki: usize, dm: &Dims) -> Result<(Launch, usize)> {
    if tiled2(dm.d) {
        let Some(tiles) = bwd_tiles(dm.d, cu.max_shared_per_block()) else {
            let least = BWD_TILES.iter().filter(|t| t.dims.contains(&dm.d));
            return Err(Error::Invalid {
                op: "flash_attn",
                msg: format!(
                    "the backward for head dim {} needs at least {} KiB of shared memory per \
                     block but the sm_{}{} kernel path allows {} KiB (see flash_attn_supported: \
                     the materialized attention runs instead)",
                    dm.d,
                    least.map(|t| t.smem(dm.d)).min().unwrap_or(0) / 1024,
                    cu.path_arch().0,
                    cu.path_arch().1,
                    cu.max_shared_per_block() / 1024
                ),
            });
        };
        let l = Launch {
            name: tiles.names[ki],
            cfg: LaunchConfig {
                grid_dim: ((dm.b * dm.hkv) as u32, dm.t.div_ceil(tiles.keys) as u32, 1),
                block_dim: (tiles.threads(), 1, 1),
                shared_mem_bytes: tiles.smem(dm.d) as u32,
            },
        };
        return Ok((l, tiles.queries));
    }
    let l = Launch {
        name: BWD[ki],
        cfg: grid(dm.t.div_ceil(TILE), dm.b * dm.hkv),
    };
    Ok((l, TILE))
}

/// Lets `l`'s kernel take its dynamic shared memory (above the default 48 KB).
fn allow_smem(cu: &crate::cuda::CudaCtx, l: &Launch) -> Result<()> {
    if l.cfg.shared_mem_bytes == 0 {
        return Ok(());
    }
    let max = cu.max_shared_per_block();
    if l.cfg.shared_mem_bytes as usize > max {
        return Err(Error::Invalid {
            op: "flash_attn",
            msg: format!(
                "{} needs {} KiB of shared memory per block but the sm_{}{} kernel path allows \
                 {} KiB (see flash_attn_supported: the materialized attention runs instead)",
                l.name,
                l.cfg.shared_mem_bytes / 1024,
                cu.path_arch().0,
                cu.path_arch().1,
                max / 1024
            ),
        });
    }
    cu.function("flash_attn", l.name)?
        .set_attribute(
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            l.cfg.shared_mem_bytes as i32,
        )
        .map_err(|e| Error::cuda("cuFuncSetAttribute", format!("{}: {e:?}", l.name)))
}

/// The index of this call's CUDA kernels in [`FWD`] etc., or why this call
/// is not supported.
fn cuda_kernel(op: &'static str, dt: DType, dims: &Dims, ptrs: &[u64]) -> Result<usize> {
    let di = CUDA_HEAD_DIMS.iter().position(|&x| x == dims.d);
    let idx = match (dt, di) {
        (DType::BF16, Some(i)) => i,
        (DType::F16, Some(i)) => CUDA_HEAD_DIMS.len() + i,
        _ => {
            return Err(Error::Invalid {
                op,
                msg: format!(
                    "the CUDA kernel takes bf16 or f16 with head_dim 16, 32, 64 or 128, got {dt} \
                     with head_dim {} (see flash_attn_supported)",
                    dims.d
                ),
            })
        }
    };
    // The kernels move 16-byte vectors.
    if ptrs.iter().any(|p| p % 16 != 0) {
        return Err(Error::Invalid {
            op,
            msg: "the CUDA kernel needs 16-byte aligned tensors".into(),
        });
    }
    if dims.b * dims.hq > 65535 {
        return Err(Error::Invalid {
            op,
            msg: format!(
                "batch × heads = {} exceeds the kernel's grid",
                dims.b * dims.hq
            ),
        });
    }
    Ok(idx)
}

fn grid(x: usize, y: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (x as u32, y as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Whether key `j` is visible to the query at position `i` of row `bi`.
fn visible(seg: Option<&[i32]>, t: usize, bi: usize, i: usize, j: usize) -> bool {
    j <= i && seg.is_none_or(|s| s[bi * t + j] == s[bi * t + i])
}

/// Causal attention forward: `out = softmax(scale · q·kᵀ)·v` over the
/// visible keys, and `lse` = the log-sum-exp of the scaled visible scores.
///
/// `q [B, Hq, T, D]`, `k`/`v [B, Hkv, T, D]` head-major; query head `h`
/// reads kv head `h / (Hq / Hkv)`. Key `j` is visible to query `i` when
/// `j ≤ i` and, given `segments [B, T]` (i32 example ids of packed rows),
/// `segments[j] == segments[i]`. `out` is like `q`; `lse [B, Hq, T]` f32.
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_fwd(
    ctx: &Ctx,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: Option<&Tensor>,
    scale: f32,
    out: &mut Tensor,
    lse: &mut Tensor,
) -> Result<()> {
    fwd_impl(
        "flash_attn_fwd",
        ctx,
        q,
        k,
        v,
        segments,
        scale,
        out,
        lse,
        false,
    )
}

/// [`flash_attn_fwd`] on token-major `q [B, T, Hq, D]`, `k`/`v [B, T, Hkv, D]`
/// and `out [B, T, Hq, D]` (the layout of a linear's output, so a decoder
/// layer needs no transposes); `lse` stays `[B, Hq, T]`. The CUDA kernels
/// for head dims 64 and 128 read and write this layout directly; elsewhere
/// the call goes through head-major copies.
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_fwd_tokens(
    ctx: &Ctx,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: Option<&Tensor>,
    scale: f32,
    out: &mut Tensor,
    lse: &mut Tensor,
) -> Result<()> {
    const OP: &str = "flash_attn_fwd_tokens";
    let dm = check(OP, ctx, q, k, v, segments, lse, true)?;
    on_ctx(ctx, OP, &[("out", out)])?;
    dtype_is(OP, "out", out, q.dtype())?;
    shape_is(OP, "out", out, q.shape())?;
    if native_tokens(ctx, q.dtype(), dm.d) {
        return fwd_impl(OP, ctx, q, k, v, segments, scale, out, lse, true);
    }
    let (qh, kh, vh) = (heads(ctx, q)?, heads(ctx, k)?, heads(ctx, v)?);
    let mut oh = Tensor::empty(ctx, q.dtype(), qh.shape())?;
    flash_attn_fwd(ctx, &qh, &kh, &vh, segments, scale, &mut oh, lse)?;
    super::permute_0213(ctx, &oh, out)
}

/// Whether the token-major layout runs without copies: the CUDA kernels of
/// head dims 64 and 128.
fn native_tokens(ctx: &Ctx, dtype: DType, d: usize) -> bool {
    ctx.cuda_ctx().is_some() && matches!(dtype, DType::BF16 | DType::F16) && tiled2(d)
}

/// `[B, T, H, D]` -> a head-major `[B, H, T, D]` copy.
fn heads(ctx: &Ctx, x: &Tensor) -> Result<Tensor> {
    let s = x.shape();
    let mut y = Tensor::empty(ctx, x.dtype(), &[s[0], s[2], s[1], s[3]])?;
    super::permute_0213(ctx, x, &mut y)?;
    Ok(y)
}

#[allow(clippy::too_many_arguments)]
fn fwd_impl(
    op_name: &'static str,
    ctx: &Ctx,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: Option<&Tensor>,
    scale: f32,
    out: &mut Tensor,
    lse: &mut Tensor,
    tok: bool,
) -> Result<()> {
    let dm = check(op_name, ctx, q, k, v, segments, lse, tok)?;
    on_ctx(ctx, op_name, &[("out", out)])?;
    dtype_is(op_name, "out", out, q.dtype())?;
    shape_is(op_name, "out", out, q.shape())?;
    if q.numel() == 0 {
        return Ok(());
    }
    if let Some(cu) = ctx.cuda_ctx() {
        let (qp, kp, vp, op, lp) = (
            q.device_ptr()?,
            k.device_ptr()?,
            v.device_ptr()?,
            out.device_ptr()?,
            lse.device_ptr()?,
        );
        let ki = cuda_kernel(op_name, q.dtype(), &dm, &[qp, kp, vp, op])?;
        let segp = segments.map(|t| t.device_ptr()).transpose()?.unwrap_or(0);
        let l = fwd_launch(ki, &dm);
        allow_smem(cu, &l)?;
        debug_assert!(!tok || tiled2(dm.d), "the first kernels are head-major");
        return launch!(
            cu,
            "flash_attn",
            l.name,
            l.cfg,
            qp,
            kp,
            vp,
            segp,
            op,
            lp,
            dm.hq as i32,
            dm.hkv as i32,
            dm.t as i32,
            scale,
            tok as i32
        );
    }
    debug_assert!(!tok, "the CPU reference is head-major");
    let (qv, kv, vv) = (read_f32(q)?, read_f32(k)?, read_f32(v)?);
    let seg = segments.map(|t| t.as_slice::<i32>()).transpose()?;
    let Dims { b, hq, hkv, t, d } = dm;
    let rep = hq / hkv;
    let mut lse_v = vec![0f32; b * hq * t];
    write_f32(out, |o| {
        let mut s = vec![0f64; t];
        let mut acc = vec![0f64; d];
        for bi in 0..b {
            for h in 0..hq {
                let qh = (bi * hq + h) * t * d;
                let kh = (bi * hkv + h / rep) * t * d;
                for i in 0..t {
                    let qi = &qv[qh + i * d..qh + (i + 1) * d];
                    let mut mx = f64::NEG_INFINITY;
                    for j in (0..=i).filter(|&j| visible(seg, t, bi, i, j)) {
                        let kj = &kv[kh + j * d..kh + (j + 1) * d];
                        let dot: f64 = qi.iter().zip(kj).map(|(a, b)| *a as f64 * *b as f64).sum();
                        s[j] = scale as f64 * dot;
                        mx = mx.max(s[j]);
                    }
                    acc.fill(0.0);
                    let mut sum = 0f64;
                    for j in (0..=i).filter(|&j| visible(seg, t, bi, i, j)) {
                        let p = (s[j] - mx).exp();
                        sum += p;
                        let vj = &vv[kh + j * d..kh + (j + 1) * d];
                        for (a, x) in acc.iter_mut().zip(vj) {
                            *a += p * *x as f64;
                        }
                    }
                    let row = qh + i * d;
                    for (o, a) in o[row..row + d].iter_mut().zip(&acc) {
                        *o = (a / sum) as f32;
                    }
                    lse_v[(bi * hq + h) * t + i] = (mx + sum.ln()) as f32;
                }
            }
        }
    })?;
    lse.as_mut_slice::<f32>()?.copy_from_slice(&lse_v);
    Ok(())
}

/// Backward of [`flash_attn_fwd`] given its `out` and `lse` and the output
/// gradient `d_out`: writes `dq` (like `q`) and `dk`, `dv` (like `k`, each
/// summed over the query heads sharing a kv head). With `P` recomputed from
/// `lse`: `dv = Pᵀ·dO`, `dS = P ∘ (dO·vᵀ − rowsum(dO ∘ out))`,
/// `dq = scale · dS·k`, `dk = scale · dSᵀ·q`. On CUDA two f32 scratch
/// buffers (`[B, Hq, T]` and the dq accumulator `[B, Hq, T, D]`) come from
/// the caching allocator.
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_bwd(
    ctx: &Ctx,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    d_out: &Tensor,
    lse: &Tensor,
    segments: Option<&Tensor>,
    scale: f32,
    dq: &mut Tensor,
    dk: &mut Tensor,
    dv: &mut Tensor,
) -> Result<()> {
    let g = BwdGrads { dq, dk, dv };
    bwd_impl(
        "flash_attn_bwd",
        ctx,
        q,
        k,
        v,
        out,
        d_out,
        lse,
        segments,
        scale,
        g,
        false,
    )
}

/// The gradient outputs of a backward call.
struct BwdGrads<'a> {
    dq: &'a mut Tensor,
    dk: &'a mut Tensor,
    dv: &'a mut Tensor,
}

/// [`flash_attn_bwd`] on the token-major layout of
/// [`flash_attn_fwd_tokens`]: `q`, `out`, `d_out`, `dq [B, T, Hq, D]`,
/// `k`, `v`, `dk`, `dv [B, T, Hkv, D]`, `lse [B, Hq, T]`.
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_bwd_tokens(
    ctx: &Ctx,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    d_out: &Tensor,
    lse: &Tensor,
    segments: Option<&Tensor>,
    scale: f32,
    dq: &mut Tensor,
    dk: &mut Tensor,
    dv: &mut Tensor,
) -> Result<()> {
    const OP: &str = "flash_attn_bwd_tokens";
    let dm = check(OP, ctx, q, k, v, segments, lse, true)?;
    if native_tokens(ctx, q.dtype(), dm.d) {
        let g = BwdGrads { dq, dk, dv };
        return bwd_impl(OP, ctx, q, k, v, out, d_out, lse, segments, scale, g, true);
    }
    for (what, t, like) in [("out", out, q), ("d_out", d_out, q)] {
        on_ctx(ctx, OP, &[(what, t)])?;
        dtype_is(OP, what, t, q.dtype())?;
        shape_is(OP, what, t, like.shape())?;
    }
    let (qh, kh, vh) = (heads(ctx, q)?, heads(ctx, k)?, heads(ctx, v)?);
    let (oh, doh) = (heads(ctx, out)?, heads(ctx, d_out)?);
    let mut dqh = Tensor::empty(ctx, q.dtype(), qh.shape())?;
    let mut dkh = Tensor::empty(ctx, q.dtype(), kh.shape())?;
    let mut dvh = Tensor::empty(ctx, q.dtype(), kh.shape())?;
    flash_attn_bwd(
        ctx, &qh, &kh, &vh, &oh, &doh, lse, segments, scale, &mut dqh, &mut dkh, &mut dvh,
    )?;
    for (what, src, dst) in [("dq", &dqh, dq), ("dk", &dkh, dk), ("dv", &dvh, dv)] {
        on_ctx(ctx, OP, &[(what, &*dst)])?;
        super::permute_0213(ctx, src, dst)?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn bwd_impl(
    op_name: &'static str,
    ctx: &Ctx,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    d_out: &Tensor,
    lse: &Tensor,
    segments: Option<&Tensor>,
    scale: f32,
    grads: BwdGrads<'_>,
    tok: bool,
) -> Result<()> {
    let BwdGrads { dq, dk, dv } = grads;
    let dm = check(op_name, ctx, q, k, v, segments, lse, tok)?;
    on_ctx(
        ctx,
        op_name,
        &[
            ("out", out),
            ("d_out", d_out),
            ("dq", dq),
            ("dk", dk),
            ("dv", dv),
        ],
    )?;
    for (what, t, like) in [
        ("out", out, q),
        ("d_out", d_out, q),
        ("dq", &*dq, q),
        ("dk", &*dk, k),
        ("dv", &*dv, k),
    ] {
        dtype_is(op_name, what, t, q.dtype())?;
        shape_is(op_name, what, t, like.shape())?;
    }
    if q.numel() == 0 {
        return Ok(());
    }
    let Dims { b, hq, hkv, t, d } = dm;
    if let Some(cu) = ctx.cuda_ctx() {
        let (qp, kp, vp, op, dop, lp) = (
            q.device_ptr()?,
            k.device_ptr()?,
            v.device_ptr()?,
            out.device_ptr()?,
            d_out.device_ptr()?,
            lse.device_ptr()?,
        );
        let (dqp, dkp, dvp) = (dq.device_ptr()?, dk.device_ptr()?, dv.device_ptr()?);
        let ki = cuda_kernel(
            op_name,
            q.dtype(),
            &dm,
            &[qp, kp, vp, op, dop, dqp, dkp, dvp],
        )?;
        let segp = segments.map(|t| t.device_ptr()).transpose()?.unwrap_or(0);
        let dsum = Tensor::empty(ctx, DType::F32, &[b, hq, t])?;
        let acc = Tensor::empty(ctx, DType::F32, &[b, hq, t, d])?;
        let (dsp, accp) = (dsum.device_ptr()?, acc.device_ptr()?);
        let (l, tile_queries) = bwd_launch(cu, ki, &dm)?;
        // Deterministic mode: one counter per (query head, query tile).
        let locks = (tiled2(d) && deterministic_attention())
            .then(|| Tensor::zeros(ctx, DType::I32, &[b * hq * t.div_ceil(tile_queries)]))
            .transpose()?;
        let lkp = locks
            .as_ref()
            .map(|l| l.device_ptr())
            .transpose()?
            .unwrap_or(0);
        let cast = if q.dtype() == DType::BF16 {
            "flash_attn_bwd_dq_bf16"
        } else {
            "flash_attn_bwd_dq_f16"
        };
        let rows = b * hq * t;
        // One warp per row: 4 rows per block.
        let c = grid(rows.div_ceil(4), 1);
        launch!(
            cu,
            "flash_attn",
            BWD_PRE[ki],
            c,
            op,
            dop,
            dsp,
            accp,
            rows as i64,
            t as i32,
            hq as i32,
            tok as i32
        )?;
        allow_smem(cu, &l)?;
        launch!(
            cu,
            "flash_attn",
            l.name,
            l.cfg,
            qp,
            kp,
            vp,
            dop,
            lp,
            dsp,
            segp,
            accp,
            dkp,
            dvp,
            hq as i32,
            hkv as i32,
            t as i32,
            scale,
            tok as i32,
            lkp
        )?;
        let n = rows * d;
        let c = crate::cuda::cfg(super::blocks_for(n, 1), super::THREADS, 0);
        return launch!(cu, "flash_attn", cast, c, accp, dqp, n as i64, scale);
    }
    debug_assert!(!tok, "the CPU reference is head-major");
    let (qv, kv, vv) = (read_f32(q)?, read_f32(k)?, read_f32(v)?);
    let (ov, dov, lv) = (read_f32(out)?, read_f32(d_out)?, lse.as_slice::<f32>()?);
    let seg = segments.map(|t| t.as_slice::<i32>()).transpose()?;
    let rep = hq / hkv;
    let mut gq = vec![0f64; b * hq * t * d];
    let mut gk = vec![0f64; b * hkv * t * d];
    let mut gv = vec![0f64; b * hkv * t * d];
    let sc = scale as f64;
    for bi in 0..b {
        for h in 0..hq {
            let qh = (bi * hq + h) * t * d;
            let kh = (bi * hkv + h / rep) * t * d;
            for i in 0..t {
                let row = qh + i * d;
                let (qi, doi) = (&qv[row..row + d], &dov[row..row + d]);
                let dsum: f64 = doi
                    .iter()
                    .zip(&ov[row..row + d])
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum();
                let l = lv[(bi * hq + h) * t + i] as f64;
                for j in (0..=i).filter(|&j| visible(seg, t, bi, i, j)) {
                    let kr = kh + j * d;
                    let (kj, vj) = (&kv[kr..kr + d], &vv[kr..kr + d]);
                    let s: f64 = qi.iter().zip(kj).map(|(a, b)| *a as f64 * *b as f64).sum();
                    let p = (sc * s - l).exp();
                    let dp: f64 = doi.iter().zip(vj).map(|(a, b)| *a as f64 * *b as f64).sum();
                    let ds = p * (dp - dsum);
                    for x in 0..d {
                        gq[row + x] += sc * ds * kj[x] as f64;
                        gk[kr + x] += sc * ds * qi[x] as f64;
                        gv[kr + x] += p * doi[x] as f64;
                    }
                }
            }
        }
    }
    for (dst, src) in [(dq, &gq), (dk, &gk), (dv, &gv)] {
        write_f32(dst, |o| {
            for (o, s) in o.iter_mut().zip(src.iter()) {
                *o = *s as f32;
            }
        })?;
    }
    Ok(())
}
