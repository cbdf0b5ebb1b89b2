//! Seeded, counter-based random numbers: the same seed gives the same values
//! on the CPU and on any GPU, whatever the launch shape.
use super::{
    blocks_for, dtype_in, dtype_is, kname, on_ctx, read_f32, shape_is, write_f32, FLOATS, THREADS,
};
use crate::cuda::{cfg, launch};
use crate::{Ctx, Error, Result, Tensor};

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The `idx`-th uniform number in `[0, 1)` of stream `seed` (24 bits; exactly
/// the value the CUDA kernels draw).
pub fn uniform01(seed: u64, idx: u64) -> f32 {
    let r = splitmix64(seed ^ splitmix64(idx));
    (r >> 40) as f32 * (1.0 / 16_777_216.0)
}

/// Fills `y` with uniform numbers in `[lo, hi)` from stream `seed`.
pub fn fill_uniform(ctx: &Ctx, y: &mut Tensor, seed: u64, lo: f32, hi: f32) -> Result<()> {
    on_ctx(ctx, "fill_uniform", &[("y", y)])?;
    dtype_in("fill_uniform", "y", y, FLOATS)?;
    let n = y.numel();
    if let Some(cu) = ctx.cuda_ctx() {
        let yp = y.device_ptr()?;
        let c = cfg(blocks_for(n, 1), THREADS, 0);
        return launch!(
            cu,
            "rng",
            kname!("uniform", y.dtype()),
            c,
            yp,
            n as i64,
            seed,
            lo,
            hi
        );
    }
    write_f32(y, |o| {
        for (i, o) in o.iter_mut().enumerate() {
            *o = lo + (hi - lo) * uniform01(seed, i as u64);
        }
    })
}

/// Fills `y` with normal numbers `N(mean, std²)` (Box–Muller on the uniforms
/// `i` and `n + i` of stream `seed`).
pub fn fill_normal(ctx: &Ctx, y: &mut Tensor, seed: u64, mean: f32, std: f32) -> Result<()> {
    on_ctx(ctx, "fill_normal", &[("y", y)])?;
    dtype_in("fill_normal", "y", y, FLOATS)?;
    let n = y.numel();
    if let Some(cu) = ctx.cuda_ctx() {
        let yp = y.device_ptr()?;
        let c = cfg(blocks_for(n, 1), THREADS, 0);
        return launch!(
            cu,
            "rng",
            kname!("normal", y.dtype()),
            c,
            yp,
            n as i64,
            seed,
            mean,
            std
        );
    }
    write_f32(y, |o| {
        for (i, o) in o.iter_mut().enumerate() {
            let u1 = uniform01(seed, i as u64).max(5.960_464_5e-8);
            let u2 = uniform01(seed, (n + i) as u64);
            let z = (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos();
            *o = mean + std * z;
        }
    })
}

/// Inverted dropout: `y = x / (1 − p)` where `uniform01(seed, i) ≥ p`, else 0.
/// The backward is the same call on `dy` with the same seed.
pub fn dropout(ctx: &Ctx, x: &Tensor, p: f32, seed: u64, y: &mut Tensor) -> Result<()> {
    on_ctx(ctx, "dropout", &[("x", x), ("y", y)])?;
    dtype_in("dropout", "x", x, FLOATS)?;
    dtype_is("dropout", "y", y, x.dtype())?;
    shape_is("dropout", "y", y, x.shape())?;
    if !(0.0..1.0).contains(&p) {
        return Err(Error::Invalid {
            op: "dropout",
            msg: format!("probability {p} is outside [0, 1)"),
        });
    }
    let n = x.numel();
    if let Some(cu) = ctx.cuda_ctx() {
        let (xp, yp) = (x.device_ptr()?, y.device_ptr()?);
        let c = cfg(blocks_for(n, 1), THREADS, 0);
        return launch!(
            cu,
            "rng",
            kname!("dropout", x.dtype()),
            c,
            xp,
            yp,
            n as i64,
            seed,
            p
        );
    }
    let vx = read_f32(x)?;
    let scale = 1.0 / (1.0 - p);
    write_f32(y, |o| {
        for (i, o) in o.iter_mut().enumerate() {
            *o = if uniform01(seed, i as u64) >= p {
                vx[i] * scale
            } else {
                0.0
            };
        }
    })
}
