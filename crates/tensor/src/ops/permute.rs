//! Swapping the two middle axes (`[A, B, C, D] -> [A, C, B, D]`), as
//! attention needs between token-major and head-major layouts.
use super::{blocks_for, dtype_in, dtype_is, kname, on_ctx, FLOATS, THREADS};
use crate::cuda::{cfg, launch};
use crate::{Ctx, Error, Result, Tensor};

/// `y[a, c, b, d] = x[a, b, c, d]` for `x [A, B, C, D]`, `y [A, C, B, D]`.
pub fn permute_0213(ctx: &Ctx, x: &Tensor, y: &mut Tensor) -> Result<()> {
    const OP: &str = "permute_0213";
    on_ctx(ctx, OP, &[("x", x), ("y", y)])?;
    dtype_in(OP, "x", x, FLOATS)?;
    dtype_is(OP, "y", y, x.dtype())?;
    let s = x.shape();
    if s.len() != 4 {
        return Err(Error::Invalid {
            op: OP,
            msg: format!("x must have 4 dimensions, got {s:?}"),
        });
    }
    let (a, b, c, d) = (s[0], s[1], s[2], s[3]);
    super::shape_is(OP, "y", y, &[a, c, b, d])?;
    if let Some(cu) = ctx.cuda_ctx() {
        let (xp, yp) = (x.device_ptr()?, y.device_ptr()?);
        let k = cfg(blocks_for(x.numel() / 8 + 1, 1), THREADS, 0);
        let name = kname!("permute_0213", x.dtype());
        return launch!(cu, "permute", name, k, xp, yp, a as i64, b as i32, c as i32, d as i32);
    }
    let es = x.dtype().size();
    let (src, dst) = (x.as_bytes()?.to_vec(), y.as_bytes_mut()?);
    for ai in 0..a {
        for bi in 0..b {
            for ci in 0..c {
                let from = (((ai * b + bi) * c + ci) * d) * es;
                let to = (((ai * c + ci) * b + bi) * d) * es;
                dst[to..to + d * es].copy_from_slice(&src[from..from + d * es]);
            }
        }
    }
    Ok(())
}
