//! The CUDA paths: kernels in `kernels/cuda/quant_*.cu`, launched on the
//! context's compute stream.
use cudarc::driver::LaunchConfig;
use llmft_tensor::cuda::CudaCtx;
use llmft_tensor::{Ctx, DType, Tensor};

use crate::bnb::{self, NESTED_BLOCKSIZE};
use crate::hqq::{self, HqqConfig};
use crate::quantized::{Absmax, Bnb4, Hqq, HqqStat, Int8, Packed, QuantizedTensor};
use crate::{QuantConfig, Result};

const THREADS: u32 = 256;

fn cfg_for(items: usize, threads: u32) -> LaunchConfig {
    let blocks = items.div_ceil(threads as usize).clamp(1, i32::MAX as usize);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Launches `module::func` with the arguments (each bound to a local first).
macro_rules! launch {
    ($cu:expr, $module:expr, $func:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        use cudarc::driver::PushKernelArg as _;
        let cu: &CudaCtx = $cu;
        let fname: &'static str = $func;
        let f = cu.function($module, fname)?;
        let args = ($($arg,)*);
        let mut b = cu.compute().launch_builder(&f);
        launch!(@push b, args, $($arg),*);
        // SAFETY: the arguments follow the kernel's signature in
        // kernels/cuda/$module.cu; every pointer is a live device allocation
        // whose extent was checked against the shapes by the caller.
        unsafe { b.launch($cfg) }.map(|_| ()).map_err(|e| {
            crate::Error::Tensor(llmft_tensor::Error::Cuda {
                call: "cuLaunchKernel",
                msg: format!("{}::{}: {e:?}", $module, fname),
            })
        })
    }};
    (@push $b:ident, $args:ident, $($arg:expr),*) => {
        launch!(@each $b, $args, [0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15], $($arg),*)
    };
    (@each $b:ident, $args:ident, [$i:tt $($is:tt)*], $head:expr $(, $rest:expr)*) => {
        $b.arg(&$args.$i);
        launch!(@each $b, $args, [$($is)*] $(, $rest)*)
    };
    (@each $b:ident, $args:ident, [$($is:tt)*] $(,)?) => {};
}

/// A kernel name with the dtype suffix (`kname!(dtype, "part", ...)`).
macro_rules! kname {
    ($dt:expr, $($part:tt),+) => {
        match $dt {
            DType::F32 => concat!($($part),+, "_f32"),
            DType::BF16 => concat!($($part),+, "_bf16"),
            _ => concat!($($part),+, "_f16"),
        }
    };
}

macro_rules! kname_bits {
    ($base:tt, $bits:expr, $dt:expr) => {
        match $bits {
            8 => kname!($dt, $base, "8"),
            4 => kname!($dt, $base, "4"),
            3 => kname!($dt, $base, "3"),
            2 => kname!($dt, $base, "2"),
            _ => kname!($dt, $base, "1"),
        }
    };
}

fn ptr(t: &Tensor) -> Result<u64> {
    Ok(t.device_ptr()?)
}

pub(crate) fn quantize(ctx: &Ctx, cu: &CudaCtx, w: &Tensor, cfg: &QuantConfig) -> Result<Packed> {
    let n = w.numel();
    let wp = ptr(w)?;
    Ok(match *cfg {
        QuantConfig::Bnb4 {
            code,
            blocksize,
            double_quant,
        } => {
            let packed = Tensor::zeros(ctx, DType::U8, &[n.div_ceil(2)])?;
            let nb = n.div_ceil(blocksize);
            let absmax = Tensor::zeros(ctx, DType::F32, &[nb])?;
            let fp4 = (code == bnb::Code4::Fp4) as i32;
            launch!(
                cu,
                "quant_bnb",
                kname!(w.dtype(), "quant_bnb4"),
                cfg_for(nb * 32, THREADS),
                wp,
                ptr(&packed)?,
                ptr(&absmax)?,
                n as i64,
                blocksize as i32,
                fp4
            )?;
            let absmax = if double_quant {
                nested_quant(ctx, cu, &absmax)?
            } else {
                Absmax::F32(absmax)
            };
            let quant_map = Tensor::from_slice(ctx, code.table(), &[16])?;
            Packed::Bnb4(Bnb4 {
                code,
                blocksize,
                packed,
                absmax,
                quant_map,
            })
        }
        QuantConfig::Int8 { threshold } => {
            let cols = *w.shape().last().unwrap_or(&1);
            let rows = n / cols;
            let q = Tensor::zeros(ctx, DType::I8, &[rows, cols])?;
            let scb = Tensor::zeros(ctx, DType::F32, &[rows])?;
            let oc = Tensor::zeros(ctx, DType::U8, &[cols])?;
            let c = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let (qp, sp, op) = (ptr(&q)?, ptr(&scb)?, ptr(&oc)?);
            launch!(
                cu,
                "quant_int8",
                kname!(w.dtype(), "quant_int8"),
                c,
                wp,
                qp,
                sp,
                op,
                cols as i64,
                threshold
            )?;
            let mut outlier_cols = Vec::new();
            if threshold > 0.0 {
                outlier_cols = oc
                    .to_vec::<u8>()?
                    .iter()
                    .enumerate()
                    .filter(|(_, &f)| f != 0)
                    .map(|(c, _)| c as i32)
                    .collect();
                if rows > 1 && !outlier_cols.is_empty() {
                    let c = cfg_for(n.min(1 << 24), THREADS);
                    launch!(
                        cu,
                        "quant_int8",
                        "int8_zero_cols",
                        c,
                        qp,
                        op,
                        rows as i64,
                        cols as i64
                    )?;
                }
            }
            Packed::Int8(Int8 {
                q,
                scb,
                threshold,
                outlier_cols,
            })
        }
        QuantConfig::Hqq(c) => Packed::Hqq(quantize_hqq(ctx, cu, w, &c)?),
    })
}

/// bnb's double quant of an f32 absmax already on the device.
fn nested_quant(ctx: &Ctx, cu: &CudaCtx, absmax: &Tensor) -> Result<Absmax> {
    let nb = absmax.numel();
    let sum = Tensor::zeros(ctx, DType::F32, &[2])?; // one f64
    let code = Tensor::from_slice(ctx, &bnb::dynamic_map(), &[256])?;
    let q = Tensor::zeros(ctx, DType::U8, &[nb])?;
    let nn = nb.div_ceil(NESTED_BLOCKSIZE);
    let nested_absmax = Tensor::zeros(ctx, DType::F32, &[nn])?;
    let off = Tensor::zeros(ctx, DType::F32, &[1])?;
    let one = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    let (ap, sp) = (ptr(absmax)?, ptr(&sum)?);
    launch!(cu, "quant_bnb", "absmax_sum", one, ap, nb as i64, sp)?;
    launch!(
        cu,
        "quant_bnb",
        "quant_dyn8",
        cfg_for(nn * 32, THREADS),
        ap,
        sp,
        nb as i64,
        NESTED_BLOCKSIZE as i32,
        ptr(&code)?,
        ptr(&q)?,
        ptr(&nested_absmax)?,
        ptr(&off)?
    )?;
    let offset = off.to_vec::<f32>()?[0];
    Ok(Absmax::Nested {
        q,
        nested_absmax,
        code,
        offset,
    })
}

fn quantize_hqq(ctx: &Ctx, cu: &CudaCtx, w: &Tensor, c: &HqqConfig) -> Result<Hqq> {
    let n = w.numel();
    let (rows, cols) = hqq::layout(n, c.group_size, c.axis);
    let ng = n / c.group_size;
    let dt = w.dtype();
    let max_v = ((1u32 << c.nbits) - 1) as f32;
    let inv = Tensor::zeros(ctx, DType::F32, &[ng])?;
    let zero = Tensor::zeros(ctx, DType::F32, &[ng])?;
    let (wp, ip, zp) = (ptr(w)?, ptr(&inv)?, ptr(&zero)?);
    let g = cfg_for(ng, THREADS);
    let (ng64, cols64, gs, axis) = (ng as i64, cols as i64, c.group_size as i32, c.axis as i32);
    launch!(
        cu,
        "quant_hqq",
        kname!(dt, "hqq_init"),
        g,
        wp,
        ip,
        zp,
        ng64,
        cols64,
        gs,
        axis,
        max_v,
        c.round_zero as i32
    )?;
    if c.optimize {
        let err = Tensor::zeros(ctx, DType::F32, &[ng])?;
        let best = Tensor::from_slice(ctx, &[f32::INFINITY], &[1])?;
        let stop = Tensor::zeros(ctx, DType::I32, &[1])?;
        let (ep, bp, sp) = (ptr(&err)?, ptr(&best)?, ptr(&stop)?);
        let one = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut beta = c.solver.beta;
        for _ in 0..c.solver.iters {
            let inv_beta = (1.0 / beta) as f32;
            launch!(
                cu,
                "quant_hqq",
                kname!(dt, "hqq_step"),
                g,
                wp,
                ip,
                zp,
                ep,
                sp,
                ng64,
                cols64,
                gs,
                axis,
                max_v,
                inv_beta,
                c.solver.lp_norm
            )?;
            launch!(
                cu,
                "quant_hqq",
                "hqq_decide",
                one,
                ep,
                ng64,
                n as i64,
                bp,
                sp,
                c.solver.early_stop as i32
            )?;
            beta *= c.solver.kappa;
        }
    }
    let sdt = if c.optimize { DType::F16 } else { DType::F32 };
    let scale = Tensor::zeros(ctx, sdt, &[ng])?;
    let zero_out = Tensor::zeros(ctx, sdt, &[ng])?;
    launch!(
        cu,
        "quant_hqq",
        "hqq_stats_out",
        g,
        ip,
        zp,
        ptr(&scale)?,
        ptr(&zero_out)?,
        ng64,
        c.optimize as i32
    )?;
    let prow = hqq::packed_rows(rows, c.nbits);
    let wdt = if c.nbits == 3 { DType::I32 } else { DType::U8 };
    let w_q = Tensor::zeros(ctx, wdt, &[prow, cols])?;
    launch!(
        cu,
        "quant_hqq",
        kname_bits!("hqq_pack", c.nbits, dt),
        cfg_for(prow * cols, THREADS),
        wp,
        ip,
        zp,
        ptr(&w_q)?,
        rows as i64,
        cols64,
        axis
    )?;
    let stat = |t: Tensor, quant: bool| -> Result<HqqStat> {
        if !quant {
            return Ok(HqqStat::Plain(t));
        }
        Ok(HqqStat::Quantized(Box::new(quantize_hqq(
            ctx,
            cu,
            &t,
            &HqqConfig::meta(),
        )?)))
    };
    Ok(Hqq {
        config: *c,
        numel: n,
        w_q,
        scale: stat(scale, c.quant_scale)?,
        zero: stat(zero_out, c.quant_zero)?,
    })
}

pub(crate) fn dequantize(
    ctx: &Ctx,
    cu: &CudaCtx,
    qt: &QuantizedTensor,
    out: &mut Tensor,
) -> Result<()> {
    let n = qt.numel();
    let op = ptr(out)?;
    let dt = out.dtype();
    match &qt.packed {
        Packed::Bnb4(b) => {
            let (absmax, qabs, nested, code8, offset) = match &b.absmax {
                Absmax::F32(t) => (ptr(t)?, 0u64, 0u64, 0u64, 0f32),
                Absmax::Nested {
                    q,
                    nested_absmax,
                    code,
                    offset,
                } => (0u64, ptr(q)?, ptr(nested_absmax)?, ptr(code)?, *offset),
            };
            let c = cfg_for(n.div_ceil(16), THREADS);
            let log2 = b.blocksize.trailing_zeros() as i32;
            launch!(
                cu,
                "quant_bnb",
                kname!(dt, "dequant_bnb4"),
                c,
                ptr(&b.packed)?,
                absmax,
                qabs,
                nested,
                code8,
                offset,
                ptr(&b.quant_map)?,
                op,
                n as i64,
                log2
            )
        }
        Packed::Int8(i) => {
            let cols = *qt.shape.last().unwrap_or(&1) as i64;
            let c = cfg_for(n.div_ceil(16), THREADS);
            launch!(
                cu,
                "quant_int8",
                kname!(dt, "dequant_int8"),
                c,
                ptr(&i.q)?,
                ptr(&i.scb)?,
                op,
                cols,
                n as i64
            )
        }
        Packed::Hqq(h) => dequant_hqq(ctx, cu, h, op, dt),
    }
}

fn dequant_hqq(ctx: &Ctx, cu: &CudaCtx, h: &Hqq, op: u64, dt: DType) -> Result<()> {
    // Quantized scale / zero are dequantized to f32 first (small).
    let mut keep = Vec::new();
    let mut stat = |s: &HqqStat| -> Result<(u64, bool)> {
        match s {
            HqqStat::Plain(t) => Ok((ptr(t)?, t.dtype() == DType::F16)),
            HqqStat::Quantized(q) => {
                let t = Tensor::zeros(ctx, DType::F32, &[q.numel])?;
                dequant_hqq(ctx, cu, q, ptr(&t)?, DType::F32)?;
                let p = ptr(&t)?;
                keep.push(t);
                Ok((p, false))
            }
        }
    };
    let (sp, sf16) = stat(&h.scale)?;
    let (zp, zf16) = stat(&h.zero)?;
    if sf16 != zf16 {
        return Err(crate::Error::DType {
            what: "hqq zero".into(),
            got: if zf16 { "f16" } else { "f32" }.into(),
            expected: "the dtype of scale".into(),
        });
    }
    let (rows, cols) = h.layout();
    let prow = hqq::packed_rows(rows, h.config.nbits);
    let c = cfg_for((prow * cols).div_ceil(8), THREADS);
    launch!(
        cu,
        "quant_hqq",
        kname_bits!("dequant_hqq", h.config.nbits, dt),
        c,
        ptr(&h.w_q)?,
        sp,
        zp,
        sf16 as i32,
        op,
        rows as i64,
        cols as i64,
        h.config.axis as i32
    )?;
    drop(keep);
    Ok(())
}
