//! cast and fill.
use super::multi::{self, TableCache};
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

/// Sets every element of every tensor of `ys` to `value`, as [`fill`] on
/// each in order (bit-identical). On CUDA, the float tensors go in one
/// launch per dtype present (i32 ones are filled one by one). `cache` keeps
/// the device table of pointers between calls (see [`TableCache`]).
pub fn fill_multi(
    ctx: &Ctx,
    ys: &mut [&mut Tensor],
    value: f32,
    mut cache: Option<&mut TableCache>,
) -> Result<()> {
    const OP: &str = "fill_multi";
    for y in ys.iter() {
        on_ctx(ctx, OP, &[("y", y)])?;
        dtype_in(
            OP,
            "y",
            y,
            &[DType::F32, DType::BF16, DType::F16, DType::I32],
        )?;
        if y.dtype() == DType::I32 && value.fract() != 0.0 {
            return Err(Error::Invalid {
                op: OP,
                msg: format!("{value} is not an integer"),
            });
        }
    }
    let Some(cu) = ctx.cuda_ctx() else {
        for y in ys.iter_mut() {
            fill(ctx, y, value)?;
        }
        return Ok(());
    };
    for y in ys.iter_mut().filter(|y| y.dtype() == DType::I32) {
        fill(ctx, y, value)?;
    }
    for dt in FLOATS {
        let group: Vec<&Tensor> = ys
            .iter()
            .map(|y| &**y)
            .filter(|y| y.dtype() == *dt && y.numel() > 0)
            .collect();
        if group.is_empty() {
            continue;
        }
        let ptrs = group
            .iter()
            .map(|y| y.device_ptr())
            .collect::<Result<Vec<u64>>>()?;
        let lens: Vec<usize> = group.iter().map(|y| y.numel()).collect();
        let (host, chunks) = multi::build(&[ptrs], &lens);
        // Held until the launch is queued.
        let table = multi::upload(ctx, host, cache.as_deref_mut())?;
        let tab = table.device_ptr()?;
        let c = cfg(multi::grid(chunks, cu.sm_count() * 32), THREADS, 0);
        launch!(
            cu,
            "elementwise",
            super::kname!("fill_multi", *dt),
            c,
            tab,
            group.len() as i32,
            chunks as i64,
            multi::CHUNK as i64,
            value
        )?;
    }
    Ok(())
}
