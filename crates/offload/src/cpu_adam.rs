//! AdamW on the host, for optimizer offload (ZeRO-Offload style).
//!
//! When the f32 master weights and the two moments do not fit on the GPU
//! (or would crowd out activations), they live in host memory: the GPU sends
//! gradients down, the host runs the optimizer step, and the updated weights
//! go back up (here as an optional bf16 copy written in the same pass). The
//! host step is then on the critical path, so it has to run near the
//! machine's memory bandwidth: [`CpuAdamW`] makes one fused pass over
//! `p`, `m`, `v` and the gradient (torch's `foreach` AdamW makes several),
//! splits large tensors into tiles spread over its own rayon thread pool, and
//! allocates nothing per step.
//!
//! The arithmetic is the scalar formula of llmft's CPU reference
//! (`llmft_tensor::ops::adamw_step` on `Ctx::cpu()`) in the same order of
//! operations; the compiler vectorizes it (AVX2 when the CPU has it, chosen
//! at run time) without fused multiply-adds, and vector `sqrt` and division
//! are correctly rounded, so the results are bit-identical to the reference.
//!
//! ```
//! use half::bf16;
//! use llmft_offload::{AdamWTensor, CpuAdamW, Grad};
//! use llmft_tensor::ops::AdamWParams;
//!
//! let opt = CpuAdamW::with_threads(2)?;
//! let n = 1000;
//! let (mut p, mut m, mut v) = (vec![1.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
//! let mut g = vec![bf16::from_f32(0.5); n];
//! let mut p16 = vec![bf16::ZERO; n];
//! let hp = AdamWParams { lr: 1e-2, ..AdamWParams::default() };
//! opt.step(
//!     &hp,
//!     AdamWTensor::new(&mut p, Grad::Zero(&mut g), &mut m, &mut v).with_bf16_copy(&mut p16),
//! )?;
//! assert!(p[0] < 1.0);
//! assert_eq!(p16[0], bf16::from_f32(p[0]));
//! assert_eq!(g[0], bf16::ZERO);
//! # Ok::<(), llmft_offload::Error>(())
//! ```
use half::{bf16, f16};
use llmft_tensor::ops::AdamWParams;

use crate::Error;

type Result<T> = std::result::Result<T, Error>;

/// Elements per tile, the unit of work one thread takes: about 1.7 MiB of
/// `p`, `m`, `v` and gradient, large enough that splitting and stealing cost
/// nothing next to it, small enough that one large tensor spreads over all
/// threads.
pub const DEFAULT_TILE: usize = 1 << 16;

/// Elements per chunk of a tile: a zeroed gradient is cleared chunk by
/// chunk, right after it is read, while it is still in L1.
const CHUNK: usize = 4096;

/// A gradient element type the host optimizer reads: f32, bf16 or f16.
pub trait GradElement: Copy + Send + Sync + sealed::Sealed + 'static {
    /// The value a zeroed gradient holds.
    const ZERO: Self;
    /// Size in bytes.
    const BYTES: usize;
    /// The name used in reports (`"f32"`, `"bf16"`, `"f16"`).
    const NAME: &'static str;
    /// The value as f32, exactly as the type's own `to_f32` converts it, in
    /// a form the compiler vectorizes.
    fn to_f32(self) -> f32;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

impl GradElement for f32 {
    const ZERO: Self = 0.0;
    const BYTES: usize = 4;
    const NAME: &'static str = "f32";
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl GradElement for bf16 {
    const ZERO: Self = bf16::ZERO;
    const BYTES: usize = 2;
    const NAME: &'static str = "bf16";
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // A shift and a NaN select: it vectorizes once inlined.
        bf16::to_f32(self)
    }
}

impl GradElement for f16 {
    const ZERO: Self = f16::ZERO;
    const BYTES: usize = 2;
    const NAME: &'static str = "f16";
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16_bits_to_f32(self.to_bits())
    }
}

/// f16 to f32 without branches on the value (so it vectorizes, where
/// `half::f16::to_f32` is a call per element); the same bits as half's
/// conversion, NaNs quieted as F16C does (checked on all 2¹⁶ inputs).
#[inline(always)]
fn f16_bits_to_f32(h: u16) -> f32 {
    const EXP: u32 = 0x7c00 << 13;
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    // Exponent and mantissa moved to their f32 places.
    let em = (h & 0x7fff) << 13;
    let bits = if em & EXP == EXP {
        // Infinity or NaN: the top exponent, NaNs with the quiet bit set.
        let quiet = if em & !EXP != 0 { 0x0040_0000 } else { 0 };
        (em + ((255 - 31) << 23)) | quiet
    } else if em & EXP == 0 {
        // Zero or subnormal: man·2⁻²⁴, computed exactly as
        // (2⁻¹⁴ + man·2⁻²⁴) − 2⁻¹⁴ on normal f32 values.
        let base = f32::from_bits(113 << 23);
        (f32::from_bits(em + (113 << 23)) - base).to_bits()
    } else {
        // Normal: rebias the exponent.
        em + ((127 - 15) << 23)
    };
    f32::from_bits(bits | sign)
}

/// The gradient of one tensor, and whether to zero it once it is read.
#[derive(Debug)]
pub enum Grad<'a, G> {
    /// Read only.
    Keep(&'a [G]),
    /// Read, then set to zero (as `fill(0)` after the step would), in the
    /// same pass.
    Zero(&'a mut [G]),
}

impl<G> Grad<'_, G> {
    fn len(&self) -> usize {
        match self {
            Grad::Keep(g) => g.len(),
            Grad::Zero(g) => g.len(),
        }
    }

    fn as_slice(&self) -> &[G] {
        match self {
            Grad::Keep(g) => g,
            Grad::Zero(g) => g,
        }
    }

    fn reborrow(&mut self) -> Grad<'_, G> {
        match self {
            Grad::Keep(g) => Grad::Keep(g),
            Grad::Zero(g) => Grad::Zero(g),
        }
    }
}

impl<'a, G> Grad<'a, G> {
    fn split_at(self, mid: usize) -> (Self, Self) {
        match self {
            Grad::Keep(g) => {
                let (a, b) = g.split_at(mid);
                (Grad::Keep(a), Grad::Keep(b))
            }
            Grad::Zero(g) => {
                let (a, b) = g.split_at_mut(mid);
                (Grad::Zero(a), Grad::Zero(b))
            }
        }
    }
}

/// One tensor's slices for a step: f32 master parameters, the gradient, the
/// f32 moments and, optionally, where to write the updated parameters in
/// bf16. All have the gradient's length.
#[derive(Debug)]
pub struct AdamWTensor<'a, G> {
    param: &'a mut [f32],
    grad: Grad<'a, G>,
    m: &'a mut [f32],
    v: &'a mut [f32],
    bf16_copy: Option<&'a mut [bf16]>,
}

impl<'a, G: GradElement> AdamWTensor<'a, G> {
    /// The slices of one tensor, without a bf16 copy.
    pub fn new(
        param: &'a mut [f32],
        grad: Grad<'a, G>,
        m: &'a mut [f32],
        v: &'a mut [f32],
    ) -> Self {
        Self {
            param,
            grad,
            m,
            v,
            bf16_copy: None,
        }
    }

    /// Also writes the updated parameters to `out` in bf16
    /// (`bf16::from_f32`, round to nearest even).
    pub fn with_bf16_copy(mut self, out: &'a mut [bf16]) -> Self {
        self.bf16_copy = Some(out);
        self
    }

    /// Number of elements (the gradient's length).
    pub fn len(&self) -> usize {
        self.grad.len()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn check(&self, index: usize) -> Result<()> {
        let n = self.grad.len();
        let lens = [
            ("param", Some(self.param.len())),
            ("m", Some(self.m.len())),
            ("v", Some(self.v.len())),
            ("bf16_copy", self.bf16_copy.as_ref().map(|o| o.len())),
        ];
        for (what, len) in lens {
            match len {
                Some(len) if len != n => {
                    return Err(Error::Invalid(format!(
                        "cpu_adamw: tensor {index}: {what} has {len} elements, grad has {n}"
                    )))
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn reborrow(&mut self) -> AdamWTensor<'_, G> {
        AdamWTensor {
            param: self.param,
            grad: self.grad.reborrow(),
            m: self.m,
            v: self.v,
            bf16_copy: self.bf16_copy.as_deref_mut(),
        }
    }

    fn split_at(self, mid: usize) -> (Self, Self) {
        let (p0, p1) = self.param.split_at_mut(mid);
        let (g0, g1) = self.grad.split_at(mid);
        let (m0, m1) = self.m.split_at_mut(mid);
        let (v0, v1) = self.v.split_at_mut(mid);
        let (o0, o1) = match self.bf16_copy {
            Some(o) => {
                let (a, b) = o.split_at_mut(mid);
                (Some(a), Some(b))
            }
            None => (None, None),
        };
        (
            AdamWTensor {
                param: p0,
                grad: g0,
                m: m0,
                v: v0,
                bf16_copy: o0,
            },
            AdamWTensor {
                param: p1,
                grad: g1,
                m: m1,
                v: v1,
                bf16_copy: o1,
            },
        )
    }
}

/// The vector instruction set the update loop was compiled for, picked once
/// from what the CPU reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    /// The target's baseline (SSE2 on x86-64, NEON on aarch64).
    Baseline,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Isa {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            return Isa::Avx2;
        }
        Isa::Baseline
    }
}

/// The per-step constants, as the reference derives them.
#[derive(Debug, Clone, Copy)]
struct Consts {
    beta1: f32,
    beta2: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    eps: f32,
    grad_scale: f32,
    step: f32,
    decay: f32,
    bc2_sqrt: f32,
}

impl Consts {
    fn new(hp: &AdamWParams) -> Self {
        let (bc1, bc2_sqrt) = bias_corrections(hp);
        Self {
            beta1: hp.beta1,
            beta2: hp.beta2,
            one_minus_beta1: 1.0 - hp.beta1,
            one_minus_beta2: 1.0 - hp.beta2,
            eps: hp.eps,
            grad_scale: hp.grad_scale,
            step: hp.lr / bc1,
            decay: 1.0 - hp.lr * hp.weight_decay,
            bc2_sqrt,
        }
    }

    /// One element: `(p, m, v)` after the step, in the reference's order of
    /// operations (Rust never contracts `a * b + c` into an FMA).
    #[inline(always)]
    fn apply(&self, p: f32, g: f32, m: f32, v: f32) -> (f32, f32, f32) {
        let gi = g * self.grad_scale;
        let m = self.beta1 * m + self.one_minus_beta1 * gi;
        let v = self.beta2 * v + self.one_minus_beta2 * gi * gi;
        let p = p * self.decay - self.step * m / (v.sqrt() / self.bc2_sqrt + self.eps);
        (p, m, v)
    }
}

/// `(1 - β₁ᵗ, √(1 - β₂ᵗ))`, computed in f64 and rounded to f32, as
/// `llmft_tensor::ops::adamw_step` does.
fn bias_corrections(hp: &AdamWParams) -> (f32, f32) {
    let bc1 = 1.0 - (hp.beta1 as f64).powi(hp.step as i32);
    let bc2_sqrt = (1.0 - (hp.beta2 as f64).powi(hp.step as i32)).sqrt();
    (bc1 as f32, bc2_sqrt as f32)
}

/// A host AdamW with its own thread pool.
///
/// Each step is bit-identical to `llmft_tensor::ops::adamw_step` on the CPU
/// (and [`CpuAdamW::step_multi`] to `adamw_step_multi`), whatever the thread
/// count or tile size.
#[derive(Debug)]
pub struct CpuAdamW {
    pool: rayon::ThreadPool,
    tile: usize,
    isa: Isa,
}

impl CpuAdamW {
    /// An optimizer with one thread per available core.
    pub fn new() -> Result<Self> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::with_threads(threads)
    }

    /// An optimizer with a pool of `threads` threads (at least 1).
    pub fn with_threads(threads: usize) -> Result<Self> {
        if threads == 0 {
            return Err(Error::Invalid(
                "cpu_adamw: threads must be at least 1".into(),
            ));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("cpu-adamw-{i}"))
            .build()
            .map_err(|e| Error::Invalid(format!("cpu_adamw: thread pool: {e}")))?;
        Ok(Self {
            pool,
            tile: DEFAULT_TILE,
            isa: Isa::detect(),
        })
    }

    /// Sets the tile size in elements (at least 1; [`DEFAULT_TILE`] unless
    /// set). Results do not depend on it.
    pub fn with_tile(mut self, tile: usize) -> Result<Self> {
        if tile == 0 {
            return Err(Error::Invalid("cpu_adamw: tile must be at least 1".into()));
        }
        self.tile = tile;
        Ok(self)
    }

    /// Number of threads in the pool.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Tile size in elements.
    pub fn tile(&self) -> usize {
        self.tile
    }

    /// The vector instruction set in use: `"avx2"` or `"baseline"`.
    pub fn simd(&self) -> &'static str {
        match self.isa {
            Isa::Baseline => "baseline",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => "avx2",
        }
    }

    /// The pool, to run other host work (such as first-touch initialization
    /// of the buffers) on the same threads.
    pub fn pool(&self) -> &rayon::ThreadPool {
        &self.pool
    }

    /// One AdamW step on one tensor. [`Error::Invalid`] when the lengths
    /// differ (nothing is written then).
    pub fn step<G: GradElement>(&self, hp: &AdamWParams, mut t: AdamWTensor<'_, G>) -> Result<()> {
        self.step_multi(hp, std::slice::from_mut(&mut t))
    }

    /// One AdamW step on each tensor, all sharing `hp`. Every tensor is
    /// checked before anything is written; [`Error::Invalid`] names the first
    /// bad one.
    pub fn step_multi<G: GradElement>(
        &self,
        hp: &AdamWParams,
        tensors: &mut [AdamWTensor<'_, G>],
    ) -> Result<()> {
        for (i, t) in tensors.iter().enumerate() {
            t.check(i)?;
        }
        let k = Consts::new(hp);
        let (isa, tile) = (self.isa, self.tile);
        self.pool.install(|| run_many(isa, tile, &k, tensors));
        Ok(())
    }
}

/// Splits the tensor list in halves across the pool down to single tensors.
fn run_many<G: GradElement>(isa: Isa, tile: usize, k: &Consts, ts: &mut [AdamWTensor<'_, G>]) {
    match ts {
        [] => {}
        [t] => run_one(isa, tile, k, t.reborrow()),
        _ => {
            let (a, b) = ts.split_at_mut(ts.len() / 2);
            rayon::join(|| run_many(isa, tile, k, a), || run_many(isa, tile, k, b));
        }
    }
}

/// Splits one tensor in halves on tile boundaries down to single tiles.
fn run_one<G: GradElement>(isa: Isa, tile: usize, k: &Consts, t: AdamWTensor<'_, G>) {
    let n = t.len();
    if n <= tile {
        return update_tile(isa, k, t);
    }
    let mid = n.div_ceil(tile) / 2 * tile;
    let (a, b) = t.split_at(mid);
    rayon::join(|| run_one(isa, tile, k, a), || run_one(isa, tile, k, b));
}

fn update_tile<G: GradElement>(isa: Isa, k: &Consts, t: AdamWTensor<'_, G>) {
    match isa {
        Isa::Baseline => update_tile_body(k, t),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only chosen when the CPU reports AVX2.
        Isa::Avx2 => unsafe { update_tile_avx2(k, t) },
    }
}

/// [`update_tile_body`] compiled for AVX2 (no FMA: it is not enabled, and
/// Rust would not contract the multiply-adds anyway).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn update_tile_avx2<G: GradElement>(k: &Consts, t: AdamWTensor<'_, G>) {
    update_tile_body(k, t)
}

/// The fused pass over one tile, chunk by chunk: read the gradient, update
/// `p`, `m`, `v`, write the bf16 copy, zero the gradient.
#[inline(always)]
fn update_tile_body<G: GradElement>(k: &Consts, t: AdamWTensor<'_, G>) {
    let AdamWTensor {
        param,
        mut grad,
        m,
        v,
        mut bf16_copy,
    } = t;
    let n = grad.len();
    let mut start = 0;
    while start < n {
        let end = n.min(start + CHUNK);
        let g = &grad.as_slice()[start..end];
        let (p, m, v) = (
            &mut param[start..end],
            &mut m[start..end],
            &mut v[start..end],
        );
        match bf16_copy.as_deref_mut() {
            Some(out) => update_copy(k, p, g, m, v, &mut out[start..end]),
            None => update(k, p, g, m, v),
        }
        if let Grad::Zero(g) = &mut grad {
            g[start..end].fill(G::ZERO);
        }
        start = end;
    }
}

#[inline(always)]
fn update<G: GradElement>(k: &Consts, p: &mut [f32], g: &[G], m: &mut [f32], v: &mut [f32]) {
    let n = g.len();
    let (p, m, v) = (&mut p[..n], &mut m[..n], &mut v[..n]);
    for i in 0..n {
        (p[i], m[i], v[i]) = k.apply(p[i], g[i].to_f32(), m[i], v[i]);
    }
}

#[inline(always)]
fn update_copy<G: GradElement>(
    k: &Consts,
    p: &mut [f32],
    g: &[G],
    m: &mut [f32],
    v: &mut [f32],
    out: &mut [bf16],
) {
    let n = g.len();
    let (p, m, v, out) = (&mut p[..n], &mut m[..n], &mut v[..n], &mut out[..n]);
    for i in 0..n {
        (p[i], m[i], v[i]) = k.apply(p[i], g[i].to_f32(), m[i], v[i]);
        out[i] = bf16::from_f32(p[i]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_matches_half_on_every_input() {
        for h in 0..=u16::MAX {
            let want = f16::from_bits(h).to_f32().to_bits();
            assert_eq!(f16_bits_to_f32(h).to_bits(), want, "{h:#06x}");
        }
    }
}
