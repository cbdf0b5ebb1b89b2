//! [`QuantizedTensor`]: packed data, statistics, original shape and dtype,
//! with quantize / dequantize on the CPU (the reference) and on CUDA.
use llmft_tensor::{numel, Ctx, DType, Device, Tensor};

use crate::bnb::{self, Code4, BNB4_BLOCKSIZES, NESTED_BLOCKSIZE};
use crate::error::len_check;
use crate::hqq::{self, HqqConfig};
use crate::{int8, Error, Result};

/// What to quantize to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum QuantConfig {
    /// bitsandbytes 4-bit (NF4 or FP4), fp32 absmax per block, optionally
    /// double-quantized (8-bit absmax, blocks of 256, mean offset).
    Bnb4 {
        /// NF4 or FP4.
        code: Code4,
        /// Values per absmax: 32, 64 (default), 128, ..., 4096.
        blocksize: usize,
        /// bnb's `compress_statistics` (transformers' `bnb_4bit_use_double_quant`).
        double_quant: bool,
    },
    /// bitsandbytes vector-wise int8: one absmax per row (last dimension).
    Int8 {
        /// LLM.int8 outlier threshold; 0 keeps every value (see [`crate::int8`]).
        threshold: f32,
    },
    /// HQQ.
    Hqq(HqqConfig),
}

impl QuantConfig {
    /// NF4, blocks of 64, no double quant (bnb's defaults).
    pub fn nf4() -> Self {
        Self::Bnb4 {
            code: Code4::Nf4,
            blocksize: 64,
            double_quant: false,
        }
    }
    /// NF4, blocks of 64, double quant (QLoRA's setting).
    pub fn nf4_double_quant() -> Self {
        Self::Bnb4 {
            code: Code4::Nf4,
            blocksize: 64,
            double_quant: true,
        }
    }
    /// FP4, blocks of 64.
    pub fn fp4() -> Self {
        Self::Bnb4 {
            code: Code4::Fp4,
            blocksize: 64,
            double_quant: false,
        }
    }
    /// Row-wise int8 without outlier threshold.
    pub fn int8() -> Self {
        Self::Int8 { threshold: 0.0 }
    }
    /// HQQ with hqq's base config for `nbits` (group 64, axis 1, solver on).
    pub fn hqq(nbits: u32) -> Self {
        Self::Hqq(HqqConfig::new(nbits))
    }

    /// Bytes a tensor of `shape` takes quantized with this config (packed
    /// data and statistics; an upper bound within a few hundred bytes), for
    /// planning memory before anything is loaded.
    pub fn stored_bytes(&self, shape: &[usize]) -> usize {
        let n = numel(shape);
        match *self {
            Self::Bnb4 {
                blocksize,
                double_quant,
                ..
            } => {
                let blocks = n.div_ceil(blocksize);
                let stats = match double_quant {
                    true => blocks + blocks.div_ceil(NESTED_BLOCKSIZE) * 4 + 256 * 4,
                    false => blocks * 4,
                };
                n.div_ceil(2) + stats + 16 * 4
            }
            Self::Int8 { .. } => {
                let cols = shape.last().copied().unwrap_or(1).max(1);
                n + (n / cols) * 4
            }
            Self::Hqq(c) => {
                let groups = n.div_ceil(c.group_size.max(1));
                let (rows, cols) = hqq::layout(n, c.group_size, c.axis);
                // 3-bit values pack into i32 words; scale and zero f16 per group.
                let word = if c.nbits == 3 { 4 } else { 1 };
                hqq::packed_rows(rows, c.nbits) * cols * word + groups * 2 * 2
            }
        }
    }

    fn check(&self, shape: &[usize]) -> Result<()> {
        let n = numel(shape);
        if shape.is_empty() || n == 0 {
            return Err(Error::Shape {
                shape: shape.to_vec(),
                msg: "cannot quantize an empty tensor".into(),
            });
        }
        match self {
            Self::Bnb4 { blocksize, .. } if !BNB4_BLOCKSIZES.contains(blocksize) => {
                Err(Error::Param(format!(
                    "4-bit blocksize must be one of {BNB4_BLOCKSIZES:?}, got {blocksize}"
                )))
            }
            Self::Int8 { threshold } if threshold.is_nan() || *threshold < 0.0 => Err(
                Error::Param(format!("int8 threshold must be >= 0, got {threshold}")),
            ),
            Self::Hqq(c) => c.check(n),
            _ => Ok(()),
        }
    }
}

/// bnb's absmax: plain f32, or double-quantized.
#[derive(Debug, Clone)]
pub enum Absmax {
    /// One f32 per block.
    F32(Tensor),
    /// `absmax[b] = code[q[b]] * nested_absmax[b / 256] + offset`.
    Nested {
        /// u8 codes, one per block (bnb's `absmax` key of a double-quantized weight).
        q: Tensor,
        /// f32, one per 256 blocks (`nested_absmax`).
        nested_absmax: Tensor,
        /// The 256-entry dynamic map (`nested_quant_map`).
        code: Tensor,
        /// The mean subtracted before quantizing (`nested_offset`).
        offset: f32,
    },
}

/// bitsandbytes 4-bit data.
#[derive(Debug, Clone)]
pub struct Bnb4 {
    /// NF4 or FP4.
    pub code: Code4,
    /// Values per absmax.
    pub blocksize: usize,
    /// `ceil(n/2)` bytes, first value of a pair in the high nibble.
    pub packed: Tensor,
    /// Per-block scale.
    pub absmax: Absmax,
    /// The 16 code values (f32; bnb's `quant_map`).
    pub quant_map: Tensor,
}

/// bitsandbytes vector-wise int8 data.
#[derive(Debug, Clone)]
pub struct Int8 {
    /// i8 `[rows, cols]`.
    pub q: Tensor,
    /// f32 absmax per row (bnb's `SCB`).
    pub scb: Tensor,
    /// The outlier threshold used (0: none).
    pub threshold: f32,
    /// Columns holding outliers (stored as 0 in `q`); empty without threshold.
    pub outlier_cols: Vec<i32>,
}

/// A scale or zero of HQQ: plain, or itself HQQ-quantized.
#[derive(Debug, Clone)]
pub enum HqqStat {
    /// f16 (after the solver) or f32 values, one per group.
    Plain(Tensor),
    /// Quantized with [`HqqConfig::meta`].
    Quantized(Box<Hqq>),
}

/// HQQ data.
#[derive(Debug, Clone)]
pub struct Hqq {
    /// The parameters used.
    pub config: HqqConfig,
    /// Element count of the quantized values.
    pub numel: usize,
    /// Packed values as hqq packs them: u8, or i32 for 3 bits.
    pub w_q: Tensor,
    /// Dequantization scale per group.
    pub scale: HqqStat,
    /// Zero point per group.
    pub zero: HqqStat,
}

/// The packed data and statistics of one format.
#[derive(Debug, Clone)]
pub enum Packed {
    /// NF4 / FP4.
    Bnb4(Bnb4),
    /// Row-wise int8.
    Int8(Int8),
    /// HQQ.
    Hqq(Hqq),
}

/// A quantized tensor: format, packed data, statistics, and the shape and
/// dtype of the tensor it stands for. Every part lives on one device.
#[derive(Debug, Clone)]
pub struct QuantizedTensor {
    /// Shape of the original tensor.
    pub shape: Vec<usize>,
    /// Dtype of the original tensor (what bnb records as `dtype`).
    pub dtype: DType,
    /// Data and statistics.
    pub packed: Packed,
}

fn cpu_tensor<T: llmft_tensor::Element>(v: &[T], shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_slice(&Ctx::cpu(), v, shape)?)
}

fn check_float(what: &str, t: &Tensor) -> Result<()> {
    if !t.dtype().is_float() {
        return Err(Error::DType {
            what: what.into(),
            got: t.dtype().to_string(),
            expected: "f32, bf16 or f16".into(),
        });
    }
    Ok(())
}

fn check_dtype(what: &str, t: &Tensor, d: DType) -> Result<()> {
    if t.dtype() != d {
        return Err(Error::DType {
            what: what.into(),
            got: t.dtype().to_string(),
            expected: d.to_string(),
        });
    }
    Ok(())
}

/// The bytes of a tensor, copied to the host.
pub(crate) fn host_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let h = if t.device() == Device::Cpu {
        t.clone()
    } else {
        t.to_ctx(&Ctx::cpu())?
    };
    Ok(h.as_bytes()?.to_vec())
}

impl Hqq {
    /// `(rows, cols)` of the reshaped matrix.
    pub fn layout(&self) -> (usize, usize) {
        hqq::layout(self.numel, self.config.group_size, self.config.axis)
    }
    /// Number of groups.
    pub fn groups(&self) -> usize {
        self.numel / self.config.group_size
    }
    fn validate(&self) -> Result<()> {
        self.config.check(self.numel)?;
        let (rows, cols) = self.layout();
        let words = hqq::packed_rows(rows, self.config.nbits) * cols;
        let wd = if self.config.nbits == 3 {
            DType::I32
        } else {
            DType::U8
        };
        check_dtype("hqq W_q", &self.w_q, wd)?;
        len_check("hqq W_q", self.w_q.numel(), words)?;
        for (what, s) in [("hqq scale", &self.scale), ("hqq zero", &self.zero)] {
            match s {
                HqqStat::Plain(t) => {
                    if !matches!(t.dtype(), DType::F16 | DType::F32) {
                        return Err(Error::DType {
                            what: what.into(),
                            got: t.dtype().to_string(),
                            expected: "f16 or f32".into(),
                        });
                    }
                    len_check(what, t.numel(), self.groups())?
                }
                HqqStat::Quantized(q) => {
                    len_check(what, q.numel, self.groups())?;
                    q.validate()?
                }
            }
        }
        Ok(())
    }

    /// Scale or zero as f32 values on the host.
    fn stat_host(s: &HqqStat) -> Result<Vec<f32>> {
        match s {
            HqqStat::Plain(t) => Ok(t.to_f32_vec()?),
            HqqStat::Quantized(q) => q.dequantize_host(),
        }
    }

    fn dequantize_host(&self) -> Result<Vec<f32>> {
        let (rows, cols) = self.layout();
        let q = hqq::unpack(&host_bytes(&self.w_q)?, rows, cols, self.config.nbits);
        let (s, z) = (Self::stat_host(&self.scale)?, Self::stat_host(&self.zero)?);
        let mut out = vec![0f32; self.numel];
        hqq::dequantize(
            &q,
            &s,
            &z,
            self.config.group_size,
            self.config.axis,
            &mut out,
        );
        Ok(out)
    }

    /// Quantizes f32 values on the CPU.
    pub(crate) fn quantize_host(w: &[f32], cfg: &HqqConfig) -> Result<Self> {
        let r = hqq::quantize(w, cfg)?;
        let (rows, cols) = hqq::layout(w.len(), cfg.group_size, cfg.axis);
        let packed = hqq::pack(&r.q, rows, cols, cfg.nbits);
        let prow = hqq::packed_rows(rows, cfg.nbits);
        let w_q = if cfg.nbits == 3 {
            let v: Vec<i32> = packed
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            cpu_tensor(&v, &[prow, cols])?
        } else {
            cpu_tensor(&packed, &[prow, cols])?
        };
        let stat = |v: &[f32], quant: bool| -> Result<HqqStat> {
            if quant {
                return Ok(HqqStat::Quantized(Box::new(Self::quantize_host(
                    v,
                    &HqqConfig::meta(),
                )?)));
            }
            Ok(HqqStat::Plain(if cfg.optimize {
                let h: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f32(x)).collect();
                cpu_tensor(&h, &[v.len()])?
            } else {
                cpu_tensor(v, &[v.len()])?
            }))
        };
        Ok(Self {
            config: *cfg,
            numel: w.len(),
            w_q,
            scale: stat(&r.scale, cfg.quant_scale)?,
            zero: stat(&r.zero, cfg.quant_zero)?,
        })
    }

    /// A copy with every tensor replaced by `f(part name, tensor)`; part
    /// names start with `prefix`.
    fn map_parts(&self, prefix: &str, f: &mut PartFn<'_>) -> Result<Self> {
        fn stat(s: &HqqStat, name: &str, f: &mut PartFn<'_>) -> Result<HqqStat> {
            Ok(match s {
                HqqStat::Plain(t) => HqqStat::Plain(f(name, t)?),
                HqqStat::Quantized(q) => {
                    HqqStat::Quantized(Box::new(q.map_parts(&format!("{name}."), f)?))
                }
            })
        }
        Ok(Self {
            config: self.config,
            numel: self.numel,
            w_q: f(&format!("{prefix}w_q"), &self.w_q)?,
            scale: stat(&self.scale, &format!("{prefix}scale"), f)?,
            zero: stat(&self.zero, &format!("{prefix}zero"), f)?,
        })
    }
}

/// What [`QuantizedTensor::map_parts`] applies to each part.
pub type PartFn<'a> = dyn FnMut(&str, &Tensor) -> Result<Tensor> + 'a;

impl Bnb4 {
    /// The f32 absmax per block (rebuilt from double quant where needed).
    pub fn absmax_f32(&self) -> Result<Vec<f32>> {
        match &self.absmax {
            Absmax::F32(t) => Ok(t.to_f32_vec()?),
            Absmax::Nested {
                q,
                nested_absmax,
                code,
                offset,
            } => {
                let code = dyn_code(code)?;
                Ok(bnb::dequantize_nested(
                    &host_bytes(q)?,
                    &nested_absmax.to_f32_vec()?,
                    &code,
                    *offset,
                ))
            }
        }
    }
}

pub(crate) fn dyn_code(t: &Tensor) -> Result<[f32; 256]> {
    let v = t.to_f32_vec()?;
    len_check("nested_quant_map", v.len(), 256)?;
    let mut c = [0f32; 256];
    c.copy_from_slice(&v);
    Ok(c)
}

pub(crate) fn code16(t: &Tensor) -> Result<[f32; 16]> {
    let v = t.to_f32_vec()?;
    len_check("quant_map", v.len(), 16)?;
    let mut c = [0f32; 16];
    c.copy_from_slice(&v);
    Ok(c)
}

impl QuantizedTensor {
    /// Number of elements of the original tensor.
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    /// The configuration this tensor was quantized with.
    pub fn config(&self) -> QuantConfig {
        match &self.packed {
            Packed::Bnb4(b) => QuantConfig::Bnb4 {
                code: b.code,
                blocksize: b.blocksize,
                double_quant: matches!(b.absmax, Absmax::Nested { .. }),
            },
            Packed::Int8(i) => QuantConfig::Int8 {
                threshold: i.threshold,
            },
            Packed::Hqq(h) => QuantConfig::Hqq(h.config),
        }
    }

    /// The device the data lives on.
    pub fn device(&self) -> Device {
        match &self.packed {
            Packed::Bnb4(b) => b.packed.device(),
            Packed::Int8(i) => i.q.device(),
            Packed::Hqq(h) => h.w_q.device(),
        }
    }

    /// Bytes of packed data and statistics.
    pub fn bytes(&self) -> usize {
        fn stat(s: &HqqStat) -> usize {
            match s {
                HqqStat::Plain(t) => t.bytes(),
                HqqStat::Quantized(q) => q.w_q.bytes() + stat(&q.scale) + stat(&q.zero),
            }
        }
        match &self.packed {
            Packed::Bnb4(b) => {
                b.packed.bytes()
                    + match &b.absmax {
                        Absmax::F32(t) => t.bytes(),
                        Absmax::Nested {
                            q, nested_absmax, ..
                        } => q.bytes() + nested_absmax.bytes() + 4,
                    }
            }
            Packed::Int8(i) => i.q.bytes() + i.scb.bytes(),
            Packed::Hqq(h) => h.w_q.bytes() + stat(&h.scale) + stat(&h.zero),
        }
    }

    /// Checks that every part has the length and dtype the shape and format
    /// require (used on data read from checkpoints).
    pub fn validate(&self) -> Result<()> {
        let n = self.numel();
        if !self.dtype.is_float() {
            return Err(Error::DType {
                what: "original dtype".into(),
                got: self.dtype.to_string(),
                expected: "f32, bf16 or f16".into(),
            });
        }
        self.config().check(&self.shape)?;
        match &self.packed {
            Packed::Bnb4(b) => {
                check_dtype("packed weight", &b.packed, DType::U8)?;
                len_check("packed weight", b.packed.numel(), n.div_ceil(2))?;
                check_dtype("quant_map", &b.quant_map, DType::F32)?;
                len_check("quant_map", b.quant_map.numel(), 16)?;
                let blocks = n.div_ceil(b.blocksize);
                match &b.absmax {
                    Absmax::F32(t) => {
                        check_dtype("absmax", t, DType::F32)?;
                        len_check("absmax", t.numel(), blocks)?
                    }
                    Absmax::Nested {
                        q,
                        nested_absmax,
                        code,
                        ..
                    } => {
                        check_dtype("absmax", q, DType::U8)?;
                        len_check("absmax", q.numel(), blocks)?;
                        check_dtype("nested_absmax", nested_absmax, DType::F32)?;
                        len_check(
                            "nested_absmax",
                            nested_absmax.numel(),
                            blocks.div_ceil(NESTED_BLOCKSIZE),
                        )?;
                        check_dtype("nested_quant_map", code, DType::F32)?;
                        len_check("nested_quant_map", code.numel(), 256)?
                    }
                }
            }
            Packed::Int8(i) => {
                let cols = *self.shape.last().unwrap_or(&0);
                check_dtype("int8 weight", &i.q, DType::I8)?;
                len_check("int8 weight", i.q.numel(), n)?;
                check_dtype("SCB", &i.scb, DType::F32)?;
                len_check("SCB", i.scb.numel(), n / cols.max(1))?;
            }
            Packed::Hqq(h) => {
                len_check("hqq element count", h.numel, n)?;
                h.validate()?
            }
        }
        Ok(())
    }

    /// Quantizes `w` (f32, bf16 or f16, on `ctx`'s device) with `cfg`. On a
    /// CUDA context everything runs on the GPU, the HQQ solver included.
    pub fn quantize(ctx: &Ctx, w: &Tensor, cfg: &QuantConfig) -> Result<Self> {
        check_float("weight", w)?;
        cfg.check(w.shape())?;
        if w.device() != ctx.device() {
            return Err(llmft_tensor::Error::Device {
                op: "quantize",
                what: "weight",
                got: w.device(),
                expected: ctx.device(),
            }
            .into());
        }
        let packed = if let Some(cu) = ctx.cuda_ctx() {
            crate::cuda::quantize(ctx, cu, w, cfg)?
        } else {
            Self::quantize_host(&w.to_f32_vec()?, w.shape(), cfg)?
        };
        Ok(Self {
            shape: w.shape().to_vec(),
            dtype: w.dtype(),
            packed,
        })
    }

    fn quantize_host(x: &[f32], shape: &[usize], cfg: &QuantConfig) -> Result<Packed> {
        Ok(match *cfg {
            QuantConfig::Bnb4 {
                code,
                blocksize,
                double_quant,
            } => {
                let (packed, absmax) = bnb::quantize_4bit(x, blocksize, code);
                let absmax = if double_quant {
                    let offset = bnb::absmax_mean(&absmax);
                    let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
                    let map = bnb::dynamic_map();
                    let (q, nested) = bnb::quantize_8bit(&centered, NESTED_BLOCKSIZE, &map);
                    Absmax::Nested {
                        q: cpu_tensor(&q, &[q.len()])?,
                        nested_absmax: cpu_tensor(&nested, &[nested.len()])?,
                        code: cpu_tensor(&map, &[256])?,
                        offset,
                    }
                } else {
                    Absmax::F32(cpu_tensor(&absmax, &[absmax.len()])?)
                };
                Packed::Bnb4(Bnb4 {
                    code,
                    blocksize,
                    packed: cpu_tensor(&packed, &[packed.len()])?,
                    absmax,
                    quant_map: cpu_tensor(code.table(), &[16])?,
                })
            }
            QuantConfig::Int8 { threshold } => {
                let cols = *shape.last().unwrap_or(&1);
                let rows = x.len() / cols.max(1);
                let (q, scb, outlier_cols) = int8::quantize(x, rows, cols, threshold);
                Packed::Int8(Int8 {
                    q: cpu_tensor(&q, &[rows, cols])?,
                    scb: cpu_tensor(&scb, &[rows])?,
                    threshold,
                    outlier_cols,
                })
            }
            QuantConfig::Hqq(c) => Packed::Hqq(Hqq::quantize_host(x, &c)?),
        })
    }

    /// Dequantizes into `out` (f32, bf16 or f16, as many elements as the
    /// original, on `ctx`'s device, as the data is).
    pub fn dequantize(&self, ctx: &Ctx, out: &mut Tensor) -> Result<()> {
        check_float("output", out)?;
        len_check("output", out.numel(), self.numel())?;
        for (what, d) in [("output", out.device()), ("quantized data", self.device())] {
            if d != ctx.device() {
                return Err(llmft_tensor::Error::Device {
                    op: "dequantize",
                    what,
                    got: d,
                    expected: ctx.device(),
                }
                .into());
            }
        }
        self.validate()?;
        if let Some(cu) = ctx.cuda_ctx() {
            return crate::cuda::dequantize(ctx, cu, self, out);
        }
        let v = self.dequantize_f32_host()?;
        write_host(out, &v)
    }

    /// The dequantized values as f32 on the host (the CPU reference).
    pub fn dequantize_f32_host(&self) -> Result<Vec<f32>> {
        let n = self.numel();
        let mut out = vec![0f32; n];
        match &self.packed {
            Packed::Bnb4(b) => {
                let absmax = b.absmax_f32()?;
                let code = code16(&b.quant_map)?;
                bnb::dequantize_4bit(
                    &host_bytes(&b.packed)?,
                    &absmax,
                    b.blocksize,
                    &code,
                    &mut out,
                );
            }
            Packed::Int8(i) => {
                let q: Vec<i8> = host_bytes(&i.q)?.iter().map(|&v| v as i8).collect();
                let cols = *self.shape.last().unwrap_or(&1);
                int8::dequantize(&q, &i.scb.to_f32_vec()?, cols, &mut out);
            }
            Packed::Hqq(h) => out = h.dequantize_host()?,
        }
        Ok(out)
    }

    /// A copy with every part on `ctx`'s device.
    pub fn to_ctx(&self, ctx: &Ctx) -> Result<Self> {
        self.map_parts(&mut |_, t| Ok(t.to_ctx(ctx)?))
    }

    /// The same quantized tensor with every part (packed data, statistics,
    /// code tables) replaced by `f(part name, part)`, which must return a
    /// tensor of the part's dtype and shape: how a store's unit blob becomes
    /// a quantized weight again (the parts are views of the fetched blob).
    /// Part names are stable: `packed`, `quant_map`, `absmax` or
    /// `absmax_q`/`nested_absmax`/`nested_code` (bnb 4-bit), `q`/`scb`
    /// (int8), `w_q`/`scale`/`zero` with `scale.`/`zero.` nesting (hqq).
    pub fn map_parts(&self, f: &mut PartFn<'_>) -> Result<Self> {
        let mut g = |name: &str, t: &Tensor| -> Result<Tensor> {
            let out = f(name, t)?;
            if out.dtype() != t.dtype() || out.shape() != t.shape() {
                return Err(Error::Shape {
                    shape: out.shape().to_vec(),
                    msg: format!(
                        "part `{name}` replaced by {} {:?}, expected {} {:?}",
                        out.dtype(),
                        out.shape(),
                        t.dtype(),
                        t.shape()
                    ),
                });
            }
            Ok(out)
        };
        let packed = match &self.packed {
            Packed::Bnb4(b) => Packed::Bnb4(Bnb4 {
                code: b.code,
                blocksize: b.blocksize,
                packed: g("packed", &b.packed)?,
                quant_map: g("quant_map", &b.quant_map)?,
                absmax: match &b.absmax {
                    Absmax::F32(t) => Absmax::F32(g("absmax", t)?),
                    Absmax::Nested {
                        q,
                        nested_absmax,
                        code,
                        offset,
                    } => Absmax::Nested {
                        q: g("absmax_q", q)?,
                        nested_absmax: g("nested_absmax", nested_absmax)?,
                        code: g("nested_code", code)?,
                        offset: *offset,
                    },
                },
            }),
            Packed::Int8(i) => Packed::Int8(Int8 {
                q: g("q", &i.q)?,
                scb: g("scb", &i.scb)?,
                threshold: i.threshold,
                outlier_cols: i.outlier_cols.clone(),
            }),
            Packed::Hqq(h) => Packed::Hqq(h.map_parts("", &mut g)?),
        };
        Ok(Self {
            shape: self.shape.clone(),
            dtype: self.dtype,
            packed,
        })
    }

    /// Every part with its name, in a fixed order (see [`Self::map_parts`]).
    pub fn parts(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        // The closure never fails, so neither does the walk.
        let _ = self.map_parts(&mut |name, t| {
            out.push((name.to_string(), t.clone()));
            Ok(t.clone())
        });
        out
    }
}

/// Writes f32 values into a host float tensor, rounding to its dtype.
fn write_host(out: &mut Tensor, v: &[f32]) -> Result<()> {
    match out.dtype() {
        DType::F32 => out.as_mut_slice::<f32>()?.copy_from_slice(v),
        DType::BF16 => {
            for (o, &x) in out.as_mut_slice::<half::bf16>()?.iter_mut().zip(v) {
                *o = half::bf16::from_f32(x);
            }
        }
        _ => {
            for (o, &x) in out.as_mut_slice::<half::f16>()?.iter_mut().zip(v) {
                *o = half::f16::from_f32(x);
            }
        }
    }
    Ok(())
}
