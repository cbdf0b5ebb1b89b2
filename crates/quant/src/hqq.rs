//! HQQ (half-quadratic quantization) as the hqq library (0.2.8.post1) does
//! it, on the CPU: `W ≈ (W_q − z)·s` per group, the grouping and bit packing
//! of hqq's `Quantizer`, and its proximal solver for the zero point.
//!
//! Grouping: `axis = 1` reshapes the flat weight to `[numel/g, g]` (a group
//! is `g` consecutive values); `axis = 0` reshapes it to `[g, numel/g]` (a
//! group is a column). Packing slices the reshaped matrix along its rows:
//! `k` slices (`8/nbits`, or 10 for 3-bit in int32) of `ceil(R/k)` rows each,
//! slice `s` at bit offset `(k−1−s)·nbits`.

/// Solver parameters (`hqq.core.optimize.optimize_weights_proximal_legacy`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SolverParams {
    /// The lp-norm of the sparsity-promoting error (`lp_norm`, 0.7).
    pub lp_norm: f32,
    /// Initial penalty (`beta`, 10).
    pub beta: f64,
    /// Penalty growth per iteration (`kappa`, 1.01).
    pub kappa: f64,
    /// Maximum number of iterations (`iters`, 20).
    pub iters: usize,
    /// Stop as soon as the mean absolute error stops decreasing (hqq's
    /// default solver always does).
    pub early_stop: bool,
}

impl Default for SolverParams {
    fn default() -> Self {
        Self {
            lp_norm: 0.7,
            beta: 10.0,
            kappa: 1.01,
            iters: 20,
            early_stop: true,
        }
    }
}

/// HQQ quantization parameters (`hqq_base_quant_config` / `Quantizer.quantize`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HqqConfig {
    /// Bits per weight: 8, 4, 3, 2 or 1.
    pub nbits: u32,
    /// Values per group (64 by default); must divide the element count.
    pub group_size: usize,
    /// 1: groups of consecutive values; 0: groups strided down the columns.
    pub axis: u32,
    /// Run the proximal solver (`optimize`); without it, round to nearest.
    pub optimize: bool,
    /// Round the initial zero point (hqq's config does for 4 bits).
    pub round_zero: bool,
    /// Solver parameters.
    pub solver: SolverParams,
    /// Quantize scale and zero themselves to 8 bits, groups of 128, axis 0,
    /// no solver (hqq's `quant_scale` / `quant_zero`).
    pub quant_scale: bool,
    /// See `quant_scale`.
    pub quant_zero: bool,
}

impl Default for HqqConfig {
    fn default() -> Self {
        Self::new(4)
    }
}

impl HqqConfig {
    /// hqq's `hqq_base_quant_config(nbits)`: group 64, axis 1, solver on,
    /// `round_zero` for 4 bits.
    pub fn new(nbits: u32) -> Self {
        Self {
            nbits,
            group_size: 64,
            axis: 1,
            optimize: true,
            round_zero: nbits == 4,
            solver: SolverParams::default(),
            quant_scale: false,
            quant_zero: false,
        }
    }

    /// The parameters hqq uses for quantized scale / zero.
    pub fn meta() -> Self {
        Self {
            nbits: 8,
            group_size: 128,
            axis: 0,
            optimize: false,
            round_zero: false,
            solver: SolverParams::default(),
            quant_scale: false,
            quant_zero: false,
        }
    }

    pub(crate) fn check(&self, numel: usize) -> crate::Result<()> {
        if ![8, 4, 3, 2, 1].contains(&self.nbits) {
            return Err(crate::Error::Param(format!(
                "hqq nbits must be 8, 4, 3, 2 or 1, got {}",
                self.nbits
            )));
        }
        if self.axis > 1 {
            return Err(crate::Error::Param(format!(
                "hqq axis must be 0 or 1, got {}",
                self.axis
            )));
        }
        if self.group_size == 0 || numel % self.group_size != 0 {
            return Err(crate::Error::Param(format!(
                "hqq group_size {} must divide the element count {numel}",
                self.group_size
            )));
        }
        let s = &self.solver;
        if self.optimize && !(s.lp_norm > 0.0 && s.beta > 0.0 && s.kappa > 1.0 && s.iters > 0) {
            return Err(crate::Error::Param(format!(
                "hqq solver parameters out of range: {s:?}"
            )));
        }
        Ok(())
    }
}

/// The reshaped matrix `[rows, cols]` of a weight of `numel` values and
/// the number of groups.
pub fn layout(numel: usize, group_size: usize, axis: u32) -> (usize, usize) {
    if axis == 1 {
        (numel / group_size, group_size)
    } else {
        (group_size, numel / group_size)
    }
}

/// How hqq packs `nbits`: `(slices per word, word bytes)`.
pub fn packing(nbits: u32) -> (usize, usize) {
    match nbits {
        8 => (1, 1),
        4 => (2, 1),
        3 => (10, 4),
        2 => (4, 1),
        _ => (8, 1),
    }
}

/// Rows of the packed matrix for `rows` reshaped rows.
pub fn packed_rows(rows: usize, nbits: u32) -> usize {
    rows.div_ceil(packing(nbits).0)
}

/// Packs quantized values (`[rows, cols]`, each `< 2^nbits`) as hqq does;
/// 3-bit words are little-endian i32 bytes.
pub fn pack(q: &[u8], rows: usize, cols: usize, nbits: u32) -> Vec<u8> {
    let (k, wb) = packing(nbits);
    let step = rows.div_ceil(k);
    let mut out = vec![0u8; step * cols * wb];
    for r in 0..step {
        for c in 0..cols {
            let mut w: u32 = 0;
            for s in 0..k {
                let i = s * step + r;
                if i < rows {
                    w |= (q[i * cols + c] as u32) << ((k - 1 - s) as u32 * nbits);
                }
            }
            let o = (r * cols + c) * wb;
            out[o..o + wb].copy_from_slice(&w.to_le_bytes()[..wb]);
        }
    }
    out
}

/// Inverse of [`pack`].
pub fn unpack(p: &[u8], rows: usize, cols: usize, nbits: u32) -> Vec<u8> {
    let (k, wb) = packing(nbits);
    let step = rows.div_ceil(k);
    let mask = (1u32 << nbits) - 1;
    let mut q = vec![0u8; rows * cols];
    for r in 0..step {
        for c in 0..cols {
            let o = (r * cols + c) * wb;
            let mut b = [0u8; 4];
            b[..wb].copy_from_slice(&p[o..o + wb]);
            let w = u32::from_le_bytes(b);
            for s in 0..k {
                let i = s * step + r;
                if i < rows {
                    q[i * cols + c] = ((w >> ((k - 1 - s) as u32 * nbits)) & mask) as u8;
                }
            }
        }
    }
    q
}

/// Element `j` of group `g` as a flat index into the weight.
#[inline]
fn at(g: usize, j: usize, rows: usize, cols: usize, axis: u32) -> usize {
    if axis == 1 {
        g * cols + j
    } else {
        let _ = rows;
        j * cols + g
    }
}

/// Result of [`quantize`]: quantized values in the reshaped layout (not
/// packed), and the per-group dequantization scale and zero.
#[derive(Debug, Clone)]
pub struct HqqQuant {
    /// `[rows, cols]` values in `0..2^nbits`.
    pub q: Vec<u8>,
    /// Dequantization scale per group (`1/inv_scale`).
    pub scale: Vec<f32>,
    /// Zero point per group.
    pub zero: Vec<f32>,
}

/// Rounds to f16 and back, as hqq's half-precision stats are.
pub fn to_f16(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

/// hqq's initial (inverse) scale and zero of every group.
pub fn init_stats(w: &[f32], cfg: &HqqConfig) -> (Vec<f32>, Vec<f32>) {
    let (rows, cols) = layout(w.len(), cfg.group_size, cfg.axis);
    let ngroups = if cfg.axis == 1 { rows } else { cols };
    let max_v = ((1u32 << cfg.nbits) - 1) as f32;
    let mut inv = vec![0f32; ngroups];
    let mut zero = vec![0f32; ngroups];
    for g in 0..ngroups {
        let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
        for j in 0..cfg.group_size {
            let v = w[at(g, j, rows, cols, cfg.axis)];
            lo = lo.min(v);
            hi = hi.max(v);
        }
        let denom = hi - lo;
        // torch evaluates `max_v / denom` as `denom.reciprocal() * max_v`.
        let mut s = (1.0 / denom) * max_v;
        if denom.abs() <= 1e-4 {
            s = 1.0;
        }
        s = s.min(2e4);
        let mut z = -lo * s;
        if cfg.round_zero {
            z = z.round_ties_even();
        }
        inv[g] = s;
        zero[g] = z;
    }
    (inv, zero)
}

/// hqq's proximal solver for the zero point (the inverse scale is kept),
/// in f32. Returns the zero after the last iteration run, as hqq does.
pub fn solve(w: &[f32], inv: &[f32], zero: &mut [f32], cfg: &HqqConfig) {
    let (rows, cols) = layout(w.len(), cfg.group_size, cfg.axis);
    let max_v = ((1u32 << cfg.nbits) - 1) as f32;
    let p = cfg.solver;
    // hqq keeps beta as a Python float (f64) and scales by `1/beta` in f32.
    let mut beta = p.beta;
    let mut best = f32::INFINITY;
    let gs = cfg.group_size;
    for _ in 0..p.iters {
        let mut err_sum = 0f64;
        for (g, z) in zero.iter_mut().enumerate() {
            let s = inv[g];
            let wj = |j| w[at(g, j, rows, cols, cfg.axis)];
            let (e, zn) = group_step(gs, wj, s, *z, max_v, (1.0 / beta) as f32, p.lp_norm);
            err_sum += e as f64;
            *z = zn;
        }
        beta *= p.kappa;
        let err = (err_sum / w.len() as f64) as f32;
        if p.early_stop {
            if err < best {
                best = err;
            } else {
                break;
            }
        }
    }
}

/// One solver step on one group: `(sum |W − W_r|, new zero)`.
#[inline]
pub(crate) fn group_step(
    gs: usize,
    w: impl Fn(usize) -> f32,
    s: f32,
    z: f32,
    max_v: f32,
    inv_beta: f32,
    lp: f32,
) -> (f32, f32) {
    let mut err = 0f32;
    let mut acc = 0f32;
    for j in 0..gs {
        let x = w(j);
        let q = (x * s + z).round_ties_even().clamp(0.0, max_v);
        let r = (q - z) / s;
        let d = x - r;
        err += d.abs();
        let a = d.abs();
        let e = (a - inv_beta * a.powf(lp - 1.0)).max(0.0) * sign(d);
        acc += q - (x - e) * s;
    }
    (err, acc / gs as f32)
}

fn sign(v: f32) -> f32 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Quantizes `w` (f32 values of the weight, flat) as hqq's
/// `Quantizer.quantize`. With the solver, scale and zero are rounded to f16
/// as hqq's CUDA path returns them; without it they stay f32.
pub fn quantize(w: &[f32], cfg: &HqqConfig) -> crate::Result<HqqQuant> {
    cfg.check(w.len())?;
    let (inv, mut zero) = init_stats(w, cfg);
    let mut inv = inv;
    if cfg.optimize {
        solve(w, &inv, &mut zero, cfg);
        for v in inv.iter_mut().chain(zero.iter_mut()) {
            *v = to_f16(*v);
        }
    }
    Ok(finish(w, &inv, &zero, cfg))
}

/// Final rounding with the given (inverse) scale and zero, and the
/// dequantization scale `1/inv` (rounded to f16 where the stats are f16).
pub(crate) fn finish(w: &[f32], inv: &[f32], zero: &[f32], cfg: &HqqConfig) -> HqqQuant {
    let (rows, cols) = layout(w.len(), cfg.group_size, cfg.axis);
    let max_v = ((1u32 << cfg.nbits) - 1) as f32;
    let mut q = vec![0u8; w.len()];
    for (g, (&s, &z)) in inv.iter().zip(zero).enumerate() {
        for j in 0..cfg.group_size {
            let i = at(g, j, rows, cols, cfg.axis);
            q[i] = (w[i] * s + z).round_ties_even().clamp(0.0, max_v) as u8;
        }
    }
    let scale = inv
        .iter()
        .map(|&s| {
            if cfg.optimize {
                to_f16(1.0 / s)
            } else {
                1.0 / s
            }
        })
        .collect();
    HqqQuant {
        q,
        scale,
        zero: zero.to_vec(),
    }
}

/// `(q − zero)·scale` of every value into `out` (flat, the weight's order).
pub fn dequantize(
    q: &[u8],
    scale: &[f32],
    zero: &[f32],
    group_size: usize,
    axis: u32,
    out: &mut [f32],
) {
    let (_, cols) = layout(out.len(), group_size, axis);
    for (i, o) in out.iter_mut().enumerate() {
        let g = if axis == 1 { i / cols } else { i % cols };
        *o = (q[i] as f32 - zero[g]) * scale[g];
    }
}
