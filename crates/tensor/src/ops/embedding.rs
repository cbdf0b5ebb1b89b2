//! Embedding gather and its scatter-add backward.
use super::{
    blocks_for, dtype_in, dtype_is, kname, on_ctx, read_f32, shape_is, write_f32, FLOATS, THREADS,
};
use crate::cuda::{cfg, launch};
use crate::{Ctx, DType, Error, Result, Tensor};

fn dims(op: &'static str, ids: &Tensor, table: &Tensor) -> Result<(usize, usize, usize)> {
    dtype_is(op, "ids", ids, DType::I32)?;
    if ids.shape().len() != 1 || table.shape().len() != 2 {
        return Err(Error::Invalid {
            op,
            msg: format!(
                "ids must be [N] and the table [V, D], got {:?} and {:?}",
                ids.shape(),
                table.shape()
            ),
        });
    }
    Ok((ids.numel(), table.shape()[0], table.shape()[1]))
}

fn check_ids(op: &'static str, ids: &[i32], v: usize) -> Result<()> {
    if let Some((i, id)) = ids
        .iter()
        .enumerate()
        .find(|(_, &id)| id < 0 || id as usize >= v)
    {
        return Err(Error::Invalid {
            op,
            msg: format!("token id {id} at position {i} is outside the vocabulary of {v}"),
        });
    }
    Ok(())
}

/// `y[n] = table[ids[n]]` for `ids [N]` (i32), `table [V, D]`, `y [N, D]`.
/// The CPU path rejects ids outside `[0, V)`; the CUDA path writes zero rows for them.
pub fn embedding_fwd(ctx: &Ctx, ids: &Tensor, table: &Tensor, y: &mut Tensor) -> Result<()> {
    const OP: &str = "embedding_fwd";
    on_ctx(ctx, OP, &[("ids", ids), ("table", table), ("y", y)])?;
    dtype_in(OP, "table", table, FLOATS)?;
    dtype_is(OP, "y", y, table.dtype())?;
    let (n, v, d) = dims(OP, ids, table)?;
    shape_is(OP, "y", y, &[n, d])?;
    if let Some(cu) = ctx.cuda_ctx() {
        let (ip, tp, yp) = (ids.device_ptr()?, table.device_ptr()?, y.device_ptr()?);
        let c = cfg(blocks_for(n * d, 1), THREADS, 0);
        let name = kname!("embedding_fwd", table.dtype());
        return launch!(
            cu,
            "embedding",
            name,
            c,
            ip,
            tp,
            yp,
            n as i64,
            d as i32,
            v as i32
        );
    }
    let ix = ids.as_slice::<i32>()?;
    check_ids(OP, ix, v)?;
    if d == 0 {
        return Ok(());
    }
    let t = read_f32(table)?;
    write_f32(y, |o| {
        for (row, &id) in o.chunks_mut(d).zip(ix) {
            row.copy_from_slice(&t[id as usize * d..(id as usize + 1) * d]);
        }
    })
}

/// Adds `dy [N, D]` into the rows `ids` of the f32 gradient table `dtable [V, D]`.
pub fn embedding_bwd(ctx: &Ctx, ids: &Tensor, dy: &Tensor, dtable: &mut Tensor) -> Result<()> {
    const OP: &str = "embedding_bwd";
    on_ctx(ctx, OP, &[("ids", ids), ("dy", dy), ("dtable", dtable)])?;
    dtype_in(OP, "dy", dy, FLOATS)?;
    dtype_is(OP, "dtable", dtable, DType::F32)?;
    let (n, v, d) = dims(OP, ids, dtable)?;
    shape_is(OP, "dy", dy, &[n, d])?;
    if let Some(cu) = ctx.cuda_ctx() {
        let (ip, dp, tp) = (ids.device_ptr()?, dy.device_ptr()?, dtable.device_ptr()?);
        let c = cfg(blocks_for(n * d, 1), THREADS, 0);
        let name = kname!("embedding_bwd", dy.dtype());
        return launch!(
            cu,
            "embedding",
            name,
            c,
            ip,
            dp,
            tp,
            n as i64,
            d as i32,
            v as i32
        );
    }
    let ix = ids.as_slice::<i32>()?;
    check_ids(OP, ix, v)?;
    if d == 0 {
        return Ok(());
    }
    let g = read_f32(dy)?;
    let t = dtable.as_mut_slice::<f32>()?;
    for (row, &id) in g.chunks(d).zip(ix) {
        for (o, x) in t[id as usize * d..(id as usize + 1) * d]
            .iter_mut()
            .zip(row)
        {
            *o += x;
        }
    }
    Ok(())
}
