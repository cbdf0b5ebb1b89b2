//! bitsandbytes' blockwise formats on the CPU: 4-bit NF4 / FP4 with an fp32
//! absmax per block, and the signed 8-bit dynamic map used for double
//! quantization of that absmax. Every rule follows bnb's CUDA kernels, so
//! the bytes and statistics are equal bit for bit:
//! - the block's absmax is `max |x|`; values are scaled by the f32
//!   reciprocal `1/absmax` (a multiply, not a division);
//! - two values per byte, the first in the high nibble; a trailing odd
//!   value is paired with a padding 0;
//! - an all-zero block scales by `0 * inf = NaN`, which bnb's decision
//!   trees send to code 0 — kept, so such blocks match too.

/// bitsandbytes' 16 NF4 code values (normal-distribution quantiles).
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// bitsandbytes' FP4 (e2m1, bias 3) code values, normalized by 12, in
/// bit-pattern order: bit 3 is the sign (code 8 is +0, as in bnb's `quant_map`).
pub const FP4_CODE: [f32; 16] = [
    0.0,
    0.005_208_333_3,
    0.666_666_7,
    1.0,
    0.333_333_34,
    0.5,
    0.166_666_67,
    0.25,
    0.0,
    -0.005_208_333_3,
    -0.666_666_7,
    -1.0,
    -0.333_333_34,
    -0.5,
    -0.166_666_67,
    -0.25,
];

/// The block sizes bnb accepts for 4-bit quantization.
pub const BNB4_BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// Block size of the 8-bit quantization of absmax (double quant).
pub const NESTED_BLOCKSIZE: usize = 256;

/// Which 4-bit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code4 {
    /// NormalFloat4.
    Nf4,
    /// bnb's FP4.
    Fp4,
}

impl Code4 {
    /// bnb's name (`nf4`, `fp4`).
    pub fn name(self) -> &'static str {
        match self {
            Code4::Nf4 => "nf4",
            Code4::Fp4 => "fp4",
        }
    }
    /// The 16 code values.
    pub fn table(self) -> &'static [f32; 16] {
        match self {
            Code4::Nf4 => &NF4_CODE,
            Code4::Fp4 => &FP4_CODE,
        }
    }
    pub(crate) fn encode(self, x: f32) -> u8 {
        match self {
            Code4::Nf4 => nf4_encode(x),
            Code4::Fp4 => fp4_encode(x),
        }
    }
}

impl std::str::FromStr for Code4 {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "nf4" => Ok(Code4::Nf4),
            "fp4" => Ok(Code4::Fp4),
            _ => Err(crate::Error::UnknownFormat(s.to_string())),
        }
    }
}

/// bnb's NF4 decision tree: the thresholds are the midpoints of the code.
fn nf4_encode(x: f32) -> u8 {
    if x > 0.039_790_15 {
        if x > 0.389_312_54 {
            if x > 0.642_786_9 {
                if x > 0.861_478_4 {
                    15
                } else {
                    14
                }
            } else if x > 0.501_663_4 {
                13
            } else {
                12
            }
        } else if x > 0.203_521_25 {
            if x > 0.292_013_77 {
                11
            } else {
                10
            }
        } else if x > 0.120_255_25 {
            9
        } else {
            8
        }
    } else if x > -0.339_679_43 {
        if x > -0.137_911_73 {
            if x > -0.045_525_018 {
                7
            } else {
                6
            }
        } else if x > -0.234_607_4 {
            5
        } else {
            4
        }
    } else if x > -0.610_632_9 {
        if x > -0.459_995_27 {
            3
        } else {
            2
        }
    } else if x > -0.848_096_4 {
        1
    } else {
        0
    }
}

/// bnb's FP4 decision tree on |x| with the sign in bit 3.
fn fp4_encode(x: f32) -> u8 {
    let sign = if x < 0.0 { 8 } else { 0 };
    let a = x.abs();
    let c = if a > 0.291_666_67 {
        if a > 0.583_333 {
            if a > 0.833_333_3 {
                3
            } else {
                2
            }
        } else if a > 0.416_666_7 {
            5
        } else {
            4
        }
    } else if a > 0.085_937_5 {
        if a > 0.208_333_33 {
            7
        } else {
            6
        }
    } else if a > 0.002_604_17 {
        1
    } else {
        0
    };
    c + sign
}

/// Max |x| of a block as bnb reduces it (fmaxf from -FLT_MAX).
fn block_absmax(x: &[f32]) -> f32 {
    x.iter().fold(-f32::MAX, |m, v| m.max(v.abs()))
}

/// 4-bit blockwise quantization: `(packed, absmax)`; `packed` holds
/// `ceil(n/2)` bytes, `absmax` one f32 per block of `blocksize`.
pub fn quantize_4bit(x: &[f32], blocksize: usize, code: Code4) -> (Vec<u8>, Vec<f32>) {
    let n = x.len();
    let mut packed = vec![0u8; n.div_ceil(2)];
    let mut absmax = vec![0f32; n.div_ceil(blocksize)];
    for (b, am) in absmax.iter_mut().enumerate() {
        let lo = b * blocksize;
        let hi = (lo + blocksize).min(n);
        *am = block_absmax(&x[lo..hi]);
        let inv = rcp_approx(*am);
        for i in (lo..hi).step_by(2) {
            let a = code.encode(x[i] * inv);
            let v1 = if i + 1 < hi { x[i + 1] } else { 0.0 };
            packed[i / 2] = (a << 4) | code.encode(v1 * inv);
        }
    }
    (packed, absmax)
}

/// 4-bit blockwise dequantization into f32: `code[q] * absmax[block]`.
pub fn dequantize_4bit(
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    code: &[f32; 16],
    out: &mut [f32],
) {
    for (i, o) in out.iter_mut().enumerate() {
        let byte = packed[i / 2];
        let q = if i % 2 == 0 { byte >> 4 } else { byte & 15 };
        *o = code[q as usize] * absmax[i / blocksize];
    }
}

/// bnb's `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`:
/// 256 sorted f32 values, computed as torch computes them on the CPU (f32
/// linspace with fused multiply-adds, f32 midpoints, f32 powers of ten).
pub fn dynamic_map() -> [f32; 256] {
    const POW10: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for (i, &p) in POW10.iter().enumerate() {
        let steps = (1usize << i) + 1;
        let b = linspace_f32(0.1, 1.0, steps);
        let scale = p as f32;
        let means: Vec<f32> = b.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        for &m in &means {
            data.push(m * scale);
        }
        for &m in &means {
            data.push(m * -scale);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(|a, b| a.total_cmp(b));
    let mut out = [0f32; 256];
    out.copy_from_slice(&data);
    out
}

/// torch.linspace for f32 on the CPU (first half from the start, second
/// half from the end; its compiler fuses the multiply-add).
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

/// bnb's nearest-code search over the sorted 256-entry map (a 7-step binary
/// search, then the nearer of two neighbours by midpoint).
pub(crate) fn dynamic_encode(code: &[f32; 256], x: f32) -> u8 {
    let mut pivot: i32 = 127;
    let mut upper_pivot: i32 = 255;
    let mut lower_pivot: i32 = 0;
    let mut lower = -1.0f32;
    let mut upper = 1.0f32;
    let mut val = code[pivot as usize];
    let mut i = 64;
    while i > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
        }
        val = code[pivot as usize];
        i >>= 1;
    }
    if upper_pivot == 255 {
        upper = code[255];
    }
    if lower_pivot == 0 {
        lower = code[0];
    }
    let r = if x > val {
        if x > (upper + val) * 0.5 {
            upper_pivot
        } else {
            pivot
        }
    } else if x < (lower + val) * 0.5 {
        lower_pivot
    } else {
        pivot
    };
    r as u8
}

/// 8-bit blockwise quantization with a 256-entry map: `(q, absmax)`.
pub fn quantize_8bit(x: &[f32], blocksize: usize, code: &[f32; 256]) -> (Vec<u8>, Vec<f32>) {
    let mut q = vec![0u8; x.len()];
    let mut absmax = vec![0f32; x.len().div_ceil(blocksize)];
    for (b, am) in absmax.iter_mut().enumerate() {
        let lo = b * blocksize;
        let hi = (lo + blocksize).min(x.len());
        *am = block_absmax(&x[lo..hi]);
        let inv = rcp_approx(*am);
        for i in lo..hi {
            q[i] = dynamic_encode(code, x[i] * inv);
        }
    }
    (q, absmax)
}

/// Double-quantized absmax: `absmax[b] = code[q[b]] * nested[b/256] + offset`,
/// each step rounded to f32 as bnb does (no fused multiply-add).
pub fn dequantize_nested(
    q: &[u8],
    nested_absmax: &[f32],
    code: &[f32; 256],
    offset: f32,
) -> Vec<f32> {
    q.iter()
        .enumerate()
        .map(|(i, &v)| code[v as usize] * nested_absmax[i / NESTED_BLOCKSIZE] + offset)
        .collect()
}

/// The mean bnb subtracts before double quant (`absmax.mean()`), summed in
/// f64 and rounded once; torch's CUDA reduction may differ by an ulp.
pub fn absmax_mean(absmax: &[f32]) -> f32 {
    let s: f64 = absmax.iter().map(|&v| v as f64).sum();
    (s / absmax.len().max(1) as f64) as f32
}

/// The reciprocal of bnb's CUDA kernels, which are built with
/// `--use_fast_math`: `rcp.approx.ftz.f32`. Its results for the 1024
/// mantissas of f16 (which include all of bf16's) were read off an H100
/// (`rcp_table` in kernels/cuda/quant_bnb.cu, written by
/// scripts/fixtures/quant_make_fixtures.py) and the instruction does not
/// depend on the exponent, so f16/bf16 absmax values (every 4-bit absmax of
/// a 16-bit weight) get bnb's exact reciprocal. Other f32 values use the
/// correctly rounded one, which differs from the hardware's by at most an ulp.
pub fn rcp_approx(x: f32) -> f32 {
    static TABLE: &[u8; 4096] = include_bytes!("rcp_approx.bin");
    let bits = x.to_bits();
    let mant = bits & 0x7f_ffff;
    if !x.is_normal() || mant & 0x1fff != 0 {
        return 1.0 / x;
    }
    let k = (mant >> 13) as usize;
    let r = f32::from_le_bytes([
        TABLE[4 * k],
        TABLE[4 * k + 1],
        TABLE[4 * k + 2],
        TABLE[4 * k + 3],
    ]);
    let e = ((bits >> 23) & 0xff) as i32 - 127;
    let v = (r as f64 * 2f64.powi(-e)) as f32;
    let v = if v.abs() < f32::MIN_POSITIVE { 0.0 } else { v };
    if x < 0.0 {
        -v
    } else {
        v
    }
}
