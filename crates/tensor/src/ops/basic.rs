//! cast and fill.
use super::{blocks_for, dtype_in, on_ctx, read_f32, shape_is, write_f32, FLOATS, THREADS};
use crate::cuda::{cfg, launch};
use crate::{Ctx, DType, Error, Result, Tensor};

/// `y = x` converted between f32, bf16 and f16 (round to nearest even).
/// `y` must have `x`'s shape.
pub fn cast(ctx: &Ctx, x: &Tensor, y: &mut Tensor) -> Result<()> {
    on_ctx(ctx, "cast", &[("x", x), ("y", y)])?;
    dtype_in("cast", "x", x, FLOATS)?;
    dtype_in("cast", "y", y, FLOATS)?;
    shape_is("cast", "y", y, x.shape())?;
    let n = x.numel() as i64;
    let Some(cu) = ctx.cuda_ctx() else {
        let src = read_f32(x)?;
        return write_f32(y, |out| out.copy_from_slice(&src));
    };
    let name = match (x.dtype(), y.dtype()) {
        (DType::F32, DType::F32) => "cast_f32_f32",
        (DType::F32, DType::BF16) => "cast_f32_bf16",
        (DType::F32, DType::F16) => "cast_f32_f16",
        (DType::BF16, DType::F32) => "cast_bf16_f32",
        (DType::BF16, DType::BF16) => "cast_bf16_bf16",
        (DType::BF16, DType::F16) => "cast_bf16_f16",
        (DType::F16, DType::F32) => "cast_f16_f32",
        (DType::F16, DType::BF16) => "cast_f16_bf16",
        _ => "cast_f16_f16",
    };
    let (xp, yp) = (x.device_ptr()?, y.device_ptr()?);
    launch!(
        cu,
        "elementwise",
        name,
        cfg(blocks_for(n as usize, 8), THREADS, 0),
        xp,
        yp,
        n
    )
}

/// Sets every element of `y` to `value` (float types and i32).
pub fn fill(ctx: &Ctx, y: &mut Tensor, value: f32) -> Result<()> {
    on_ctx(ctx, "fill", &[("y", y)])?;
    dtype_in(
        "fill",
        "y",
        y,
        &[DType::F32, DType::BF16, DType::F16, DType::I32],
    )?;
    if y.dtype() == DType::I32 && value.fract() != 0.0 {
        return Err(Error::Invalid {
            op: "fill",
            msg: format!("{value} is not an integer"),
        });
    }
    let n = y.numel() as i64;
    let Some(cu) = ctx.cuda_ctx() else {
        if y.dtype() == DType::I32 {
            y.as_mut_slice::<i32>()?.fill(value as i32);
            return Ok(());
        }
        return write_f32(y, |out| out.fill(value));
    };
    let yp = y.device_ptr()?;
    let c = cfg(blocks_for(n as usize, 8), THREADS, 0);
    if y.dtype() == DType::I32 {
        return launch!(cu, "elementwise", "fill_i32", c, yp, n, value as i32);
    }
    launch!(
        cu,
        "elementwise",
        super::kname!("fill", y.dtype()),
        c,
        yp,
        n,
        value
    )
}
