//! One adapter over one base linear `y = x·Wᵀ`: forward, backward, merge.
//!
//! Notation: `x [N, in]`, `W [out, in]`, `A [r, in]`, `B [out, r]`,
//! `x̃ = dropout(x)` (training with `p > 0`, else `x`), `s = scale`.
//!
//! - LoRA: `y = x·Wᵀ + s·x̃·Aᵀ·Bᵀ`.
//! - DoRA (PEFT's formula): with `n = ‖W + s·B·A‖` per output row (treated
//!   as a constant in the backward, as PEFT detaches it) and `k = m / n`,
//!   `y = x·Wᵀ + (k − 1)⊙(x̃·Wᵀ) + k⊙(s·x̃·Aᵀ·Bᵀ)`. Without dropout this is
//!   `k⊙(x·Wᵀ + s·x·Aᵀ·Bᵀ)`. Computed as `y += s·xa·Bᵀ + (k − 1)⊙pre` with
//!   `pre = x̃·Wᵀ + s·xa·Bᵀ`, so only `k − 1` (accurate in bf16) is broadcast.
//!
//! [`LoraLinear::forward_first`] and [`LoraLinear::backward_first`] are the
//! orders for a caller that runs the base GEMM after the adapter: the
//! adapter's K = r GEMM writes the output and the base GEMM accumulates onto
//! it in its epilogue (one rounding, and no extra pass over the output).
use std::sync::Mutex;

use llmft_tensor::ops::{self, Gemm};
use llmft_tensor::{Ctx, DType, Tensor};

use crate::config::{InitLoraWeights, LayerSpec};
use crate::{Error, Result};

/// Elements per row chunk of the f32 scratch that DoRA norms and merges use
/// (two or three such buffers live at once).
const CHUNK_ELEMS: usize = 1 << 22;

/// Shape of a base linear layer (weight `[out_features, in_features]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LinearShape {
    /// Input features (columns of W).
    pub in_features: usize,
    /// Output features (rows of W).
    pub out_features: usize,
}

impl LinearShape {
    /// A shape from `(in_features, out_features)`.
    pub fn new(in_features: usize, out_features: usize) -> Self {
        Self {
            in_features,
            out_features,
        }
    }
}

/// Whether a forward trains (dropout active) or evaluates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No dropout.
    Eval,
    /// Dropout with a mask from `seed`, mixed with the layer's own salt so one
    /// seed per step serves every layer. A recomputed forward (gradient
    /// checkpointing) must pass the same seed to draw the same mask.
    Train {
        /// Seed of this step (and micro-batch).
        seed: u64,
    },
}

/// splitmix64 finalizer: decorrelates seeds.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What a forward keeps for its backward. Reused across steps: buffers are
/// reallocated only when the row count, dtype or device changes.
#[derive(Debug, Default)]
pub struct LoraSaved {
    /// `x̃·Aᵀ [N, r]` in the compute dtype.
    xa: Option<Tensor>,
    /// The effective dropout seed, when dropout was applied.
    dropout_seed: Option<u64>,
    /// DoRA: `k − 1 [out]` (f32).
    k_minus_1: Option<Tensor>,
    /// DoRA: `1/n [out]` (f32).
    inv_norm: Option<Tensor>,
    /// DoRA: `pre = x̃·Wᵀ + s·xa·Bᵀ [N, out]` in the compute dtype.
    pre: Option<Tensor>,
}

impl LoraSaved {
    /// Replaces every tensor of the record with `f(tensor)` (moving it to
    /// host memory and back, for activation offload).
    pub fn map_tensors<E>(
        &mut self,
        f: &mut dyn FnMut(Tensor) -> std::result::Result<Tensor, E>,
    ) -> std::result::Result<(), E> {
        for t in [
            &mut self.xa,
            &mut self.k_minus_1,
            &mut self.inv_norm,
            &mut self.pre,
        ] {
            if let Some(v) = t.take() {
                *t = Some(f(v)?);
            }
        }
        Ok(())
    }

    /// An empty record, filled by the first forward.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes held on the device.
    pub fn bytes(&self) -> usize {
        [&self.xa, &self.k_minus_1, &self.inv_norm, &self.pre]
            .iter()
            .filter_map(|t| t.as_ref().map(Tensor::bytes))
            .sum()
    }
}

/// A tensor of `dtype` and `shape` on `ctx` from `slot`, allocated only when
/// the slot holds none that fits. The returned tensor shares the slot's storage.
fn slot(ctx: &Ctx, slot: &mut Option<Tensor>, dtype: DType, shape: &[usize]) -> Result<Tensor> {
    let fits = slot
        .as_ref()
        .is_some_and(|t| t.dtype() == dtype && t.shape() == shape && t.device() == ctx.device());
    if !fits {
        *slot = Some(Tensor::empty(ctx, dtype, shape)?);
    }
    Ok(slot.as_ref().expect("filled above").clone())
}

fn ones(ctx: &Ctx, dtype: DType, shape: &[usize]) -> Result<Tensor> {
    let mut t = Tensor::empty(ctx, dtype, shape)?;
    ops::fill(ctx, &mut t, 1.0)?;
    Ok(t)
}

/// `v [out]` (f32) repeated over `n` rows as `[n, out]` in `dtype` (a k = 1 GEMM).
fn broadcast_rows(ctx: &Ctx, v: &Tensor, n: usize, dtype: DType) -> Result<Tensor> {
    let out = v.numel();
    let mut vc = Tensor::empty(ctx, dtype, &[1, out])?;
    ops::cast(ctx, &v.reshape(&[1, out])?, &mut vc)?;
    let mut y = Tensor::empty(ctx, dtype, &[n, out])?;
    ops::gemm(
        ctx,
        &ones(ctx, dtype, &[n, 1])?,
        &vc,
        &mut y,
        Gemm::default(),
    )?;
    Ok(y)
}

/// Gradients of one adapter, accumulated in f32 (shapes of the parameters).
#[derive(Debug)]
pub struct LoraGrads {
    /// dL/dA `[r, in]`.
    pub a: Tensor,
    /// dL/dB `[out, r]`.
    pub b: Tensor,
    /// dL/dm `[out]` (DoRA only).
    pub magnitude: Option<Tensor>,
}

impl LoraGrads {
    /// Zero gradients for `lora` on `ctx`.
    pub fn zeros(ctx: &Ctx, lora: &LoraLinear) -> Result<Self> {
        let (r, i, o) = (lora.r, lora.shape.in_features, lora.shape.out_features);
        Ok(Self {
            a: Tensor::zeros(ctx, DType::F32, &[r, i])?,
            b: Tensor::zeros(ctx, DType::F32, &[o, r])?,
            magnitude: if lora.use_dora {
                Some(Tensor::zeros(ctx, DType::F32, &[o])?)
            } else {
                None
            },
        })
    }

    /// Sets every gradient to zero.
    pub fn zero(&mut self, ctx: &Ctx) -> Result<()> {
        for t in self.tensors_mut() {
            ops::fill(ctx, t, 0.0)?;
        }
        Ok(())
    }

    /// The gradients in the order of [`LoraLinear::params`].
    pub fn tensors(&self) -> Vec<&Tensor> {
        let mut v = vec![&self.a, &self.b];
        v.extend(self.magnitude.as_ref());
        v
    }

    /// The gradients in the order of [`LoraLinear::params_mut`].
    pub fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        let mut v = vec![&mut self.a, &mut self.b];
        v.extend(self.magnitude.as_mut());
        v
    }
}

/// A and B cast to a 16-bit compute dtype, kept between uses.
#[derive(Debug)]
struct ComputeCopies {
    dtype: DType,
    a: Tensor,
    b: Tensor,
}

/// A LoRA / rsLoRA / DoRA adapter over one base linear `y = x·Wᵀ`, with f32
/// master parameters `A [r, in]`, `B [out, r]` and (DoRA) `m [out]`.
///
/// The base weight is always passed in dense, in the compute dtype (f32,
/// bf16 or f16; `x`, `W`, `y` and the gradients share it): for a quantized
/// base the caller dequantizes into a reused buffer first.
///
/// For a 16-bit compute dtype, A and B are cast once and the copies reused
/// until the masters may have changed: [`LoraLinear::params_mut`] drops them.
/// Code that writes `a` or `b` another way (through the public fields, or a
/// tensor sharing their storage) calls [`LoraLinear::invalidate_compute_copies`].
#[derive(Debug)]
pub struct LoraLinear {
    shape: LinearShape,
    r: usize,
    scale: f32,
    dropout: f32,
    use_dora: bool,
    salt: u64,
    /// `A [r, in]`, f32.
    pub a: Tensor,
    /// `B [out, r]`, f32.
    pub b: Tensor,
    /// DoRA magnitude `m [out]`, f32; `None` until set (DoRA) or always (LoRA).
    pub magnitude: Option<Tensor>,
    /// A and B in the last 16-bit compute dtype used (see the type's docs).
    compute: Mutex<Option<ComputeCopies>>,
}

impl LoraLinear {
    /// A new adapter on `ctx`, initialized as `spec.init` says from `seed`.
    /// For DoRA, call [`LoraLinear::init_magnitude`] with the base weight
    /// before the first forward.
    pub fn new(ctx: &Ctx, shape: LinearShape, spec: &LayerSpec, seed: u64) -> Result<Self> {
        let (i, o, r) = (shape.in_features, shape.out_features, spec.r);
        if r == 0 || i == 0 || o == 0 {
            return Err(Error::Config(format!(
                "rank {r} over a linear of shape [{o}, {i}]: all must be at least 1"
            )));
        }
        let mut a = Tensor::empty(ctx, DType::F32, &[r, i])?;
        let mut b = Tensor::zeros(ctx, DType::F32, &[o, r])?;
        let (sa, sb) = (mix64(seed ^ 0xA), mix64(seed ^ 0xB));
        // kaiming_uniform(a = √5) bounds at gain·√3/√fan_in = 1/√fan_in.
        let bound_a = 1.0 / (i as f32).sqrt();
        match &spec.init {
            InitLoraWeights::Kaiming => ops::fill_uniform(ctx, &mut a, sa, -bound_a, bound_a)?,
            InitLoraWeights::Gaussian => ops::fill_normal(ctx, &mut a, sa, 0.0, 1.0 / r as f32)?,
            InitLoraWeights::Random => {
                ops::fill_uniform(ctx, &mut a, sa, -bound_a, bound_a)?;
                let bound_b = 1.0 / (r as f32).sqrt();
                ops::fill_uniform(ctx, &mut b, sb, -bound_b, bound_b)?;
            }
            InitLoraWeights::Other(s) => {
                return Err(Error::Config(format!(
                    "init_lora_weights {s:?} is not supported (true, false or \"gaussian\")"
                )))
            }
        }
        Ok(Self {
            shape,
            r,
            scale: spec.scale,
            dropout: spec.dropout,
            use_dora: spec.use_dora,
            salt: seed,
            a,
            b,
            magnitude: None,
            compute: Mutex::new(None),
        })
    }

    /// An adapter from existing f32 parameters (as loaded from a file).
    pub fn from_parts(
        shape: LinearShape,
        spec: &LayerSpec,
        seed: u64,
        a: Tensor,
        b: Tensor,
        magnitude: Option<Tensor>,
    ) -> Result<Self> {
        let (i, o, r) = (shape.in_features, shape.out_features, spec.r);
        let want: [(&str, Option<&Tensor>, Vec<usize>); 3] = [
            ("lora_A", Some(&a), vec![r, i]),
            ("lora_B", Some(&b), vec![o, r]),
            ("lora_magnitude_vector", magnitude.as_ref(), vec![o]),
        ];
        for (what, t, s) in want {
            let Some(t) = t else { continue };
            if t.shape() != s.as_slice() {
                return Err(Error::Shape {
                    what: what.into(),
                    got: t.shape().to_vec(),
                    expected: s,
                });
            }
            if t.dtype() != DType::F32 {
                return Err(Error::DType {
                    what: what.into(),
                    got: t.dtype(),
                    expected: "f32".into(),
                });
            }
        }
        if magnitude.is_some() && !spec.use_dora {
            return Err(Error::Config(
                "a magnitude vector was given but use_dora is false".into(),
            ));
        }
        Ok(Self {
            shape,
            r,
            scale: spec.scale,
            dropout: spec.dropout,
            use_dora: spec.use_dora,
            salt: seed,
            a,
            b,
            magnitude,
            compute: Mutex::new(None),
        })
    }

    /// Shape of the base linear.
    pub fn shape(&self) -> LinearShape {
        self.shape
    }
    /// Rank.
    pub fn rank(&self) -> usize {
        self.r
    }
    /// `alpha/r` or `alpha/√r`.
    pub fn scale(&self) -> f32 {
        self.scale
    }
    /// Dropout probability on the adapter input.
    pub fn dropout(&self) -> f32 {
        self.dropout
    }
    /// Whether this is a DoRA adapter.
    pub fn use_dora(&self) -> bool {
        self.use_dora
    }

    /// The trainable parameters: A, B and (DoRA) m.
    pub fn params(&self) -> Vec<&Tensor> {
        let mut v = vec![&self.a, &self.b];
        v.extend(self.magnitude.as_ref());
        v
    }

    /// The trainable parameters, mutably, in the order of [`LoraLinear::params`].
    /// Drops the compute-dtype copies of A and B (the caller may write them).
    pub fn params_mut(&mut self) -> Vec<&mut Tensor> {
        self.invalidate_compute_copies();
        let mut v = vec![&mut self.a, &mut self.b];
        v.extend(self.magnitude.as_mut());
        v
    }

    /// The seed of the dropout mask a forward in `mode` draws (`None`: no
    /// dropout). Element `j` of `x` is kept where
    /// `llmft_tensor::ops::uniform01(seed, j) >= p`.
    pub fn dropout_seed(&self, mode: Mode) -> Option<u64> {
        match mode {
            Mode::Train { seed } if self.dropout > 0.0 => Some(mix64(seed ^ self.salt)),
            _ => None,
        }
    }

    /// Drops the cached compute-dtype copies of A and B, so the next use
    /// casts the f32 masters again. [`LoraLinear::params_mut`] does this;
    /// call it after writing `a` or `b` any other way.
    pub fn invalidate_compute_copies(&mut self) {
        *self.compute.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Number of trainable scalars.
    pub fn num_parameters(&self) -> usize {
        self.params().iter().map(|t| t.numel()).sum()
    }

    fn check_weight(&self, w: &Tensor) -> Result<()> {
        let want = [self.shape.out_features, self.shape.in_features];
        if w.shape() != want {
            return Err(Error::Shape {
                what: "base weight".into(),
                got: w.shape().to_vec(),
                expected: want.to_vec(),
            });
        }
        if !w.dtype().is_float() {
            return Err(Error::DType {
                what: "base weight".into(),
                got: w.dtype(),
                expected: "f32, bf16 or f16 (dequantize first)".into(),
            });
        }
        Ok(())
    }

    /// The compute dtype of input `x` (a float type).
    fn compute_dtype(x: &Tensor) -> Result<DType> {
        let cd = x.dtype();
        if !cd.is_float() {
            return Err(Error::DType {
                what: "x".into(),
                got: cd,
                expected: "f32, bf16 or f16".into(),
            });
        }
        Ok(cd)
    }

    /// Checks `t` is `[.., last]` with `rows` leading elements (when given) and
    /// `dtype`; returns the row count.
    fn rows_of(
        what: &str,
        t: &Tensor,
        last: usize,
        rows: Option<usize>,
        dtype: DType,
    ) -> Result<usize> {
        let s = t.shape();
        let ok_last = s.last() == Some(&last);
        let n = if ok_last { t.numel() / last } else { 0 };
        if !ok_last || rows.is_some_and(|r| r != n) {
            let mut expected: Vec<usize> =
                s.iter().take(s.len().saturating_sub(1)).copied().collect();
            if expected.is_empty() {
                expected.push(rows.unwrap_or(1));
            }
            expected.push(last);
            return Err(Error::Shape {
                what: what.into(),
                got: s.to_vec(),
                expected,
            });
        }
        if t.dtype() != dtype {
            return Err(Error::DType {
                what: what.into(),
                got: t.dtype(),
                expected: format!("{dtype} (the compute dtype of x and the base weight)"),
            });
        }
        Ok(n)
    }

    /// A and B in the compute dtype: views of the masters when it is f32,
    /// else copies cast on first use and kept until the masters may change
    /// (see [`LoraLinear::invalidate_compute_copies`]).
    fn ab_in(&self, ctx: &Ctx, dtype: DType) -> Result<(Tensor, Tensor)> {
        if dtype == DType::F32 {
            return Ok((self.a.clone(), self.b.clone()));
        }
        let mut guard = self.compute.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = guard.as_ref() {
            if c.dtype == dtype && c.a.device() == ctx.device() {
                return Ok((c.a.clone(), c.b.clone()));
            }
        }
        let mut a = Tensor::empty(ctx, dtype, self.a.shape())?;
        let mut b = Tensor::empty(ctx, dtype, self.b.shape())?;
        ops::cast(ctx, &self.a, &mut a)?;
        ops::cast(ctx, &self.b, &mut b)?;
        *guard = Some(ComputeCopies {
            dtype,
            a: a.clone(),
            b: b.clone(),
        });
        Ok((a, b))
    }

    fn magnitude(&self, what: &str) -> Result<&Tensor> {
        self.magnitude
            .as_ref()
            .ok_or_else(|| Error::MagnitudeNotInitialized {
                module: what.into(),
            })
    }

    /// Walks `W' = W + s·B·A` (f32) in row chunks: `f(first_row, W', U, rstd)`
    /// with `U` the rows of W' scaled to RMS 1 and `rstd = √in/‖W'row‖`.
    fn adapted_rows(
        &self,
        ctx: &Ctx,
        base_w: &Tensor,
        mut f: impl FnMut(usize, &Tensor, &Tensor, &Tensor) -> Result<()>,
    ) -> Result<()> {
        self.check_weight(base_w)?;
        let (i, o, r) = (self.shape.in_features, self.shape.out_features, self.r);
        let chunk = (CHUNK_ELEMS / i).clamp(1, o);
        let wf = Tensor::empty(ctx, DType::F32, &[chunk, i])?;
        let u = Tensor::empty(ctx, DType::F32, &[chunk, i])?;
        let rstd = Tensor::empty(ctx, DType::F32, &[chunk])?;
        let ones_i = ones(ctx, DType::F32, &[i])?;
        for r0 in (0..o).step_by(chunk) {
            let rows = chunk.min(o - r0);
            let mut wv = wf.view(0, &[rows, i])?;
            let mut uv = u.view(0, &[rows, i])?;
            let mut rv = rstd.view(0, &[rows])?;
            ops::cast(ctx, &base_w.view(r0 * i, &[rows, i])?, &mut wv)?;
            let g = Gemm {
                alpha: self.scale,
                beta: 1.0,
                ..Gemm::default()
            };
            ops::gemm(ctx, &self.b.view(r0 * r, &[rows, r])?, &self.a, &mut wv, g)?;
            ops::rmsnorm_fwd(ctx, &wv, &ones_i, 0.0, &mut uv, &mut rv)?;
            f(r0, &wv, &uv, &rv)?;
        }
        Ok(())
    }

    /// `1/‖W + s·B·A‖` per output row into `inv [out]` (f32).
    fn inv_weight_norm(&self, ctx: &Ctx, base_w: &Tensor, inv: &mut Tensor) -> Result<()> {
        let c = 1.0 / (self.shape.in_features as f32).sqrt();
        self.adapted_rows(ctx, base_w, |r0, _, _, rstd| {
            let mut dst = inv.view(r0, rstd.shape())?;
            Ok(ops::axpby(ctx, c, rstd, 0.0, &mut dst)?)
        })
    }

    /// Sets the DoRA magnitude to `‖W + s·B·A‖` per output row, as PEFT does
    /// when it creates a DoRA layer (with B = 0 this is `‖W‖`, so the adapter
    /// starts as a no-op). `base_w` is the dense base weight `[out, in]`.
    pub fn init_magnitude(&mut self, ctx: &Ctx, base_w: &Tensor) -> Result<()> {
        if !self.use_dora {
            return Err(Error::Config(
                "init_magnitude on an adapter without DoRA".into(),
            ));
        }
        let (i, o) = (self.shape.in_features, self.shape.out_features);
        let m = Tensor::empty(ctx, DType::F32, &[o])?;
        let ones_i = ones(ctx, DType::F32, &[i, 1])?;
        // Σ W'·U = ‖W'‖·√in per row.
        let g = Gemm {
            alpha: 1.0 / (i as f32).sqrt(),
            ..Gemm::default()
        };
        self.adapted_rows(ctx, base_w, |r0, wf, u, _| {
            let mut t = Tensor::empty(ctx, DType::F32, wf.shape())?;
            ops::mul(ctx, wf, u, &mut t)?;
            let mut dst = m.view(r0, &[wf.shape()[0], 1])?;
            Ok(ops::gemm(ctx, &t, &ones_i, &mut dst, g)?)
        })?;
        self.magnitude = Some(m);
        Ok(())
    }

    /// Adds the adapter to a base linear's output.
    ///
    /// - `x [.., in]`: the layer input, compute dtype.
    /// - `base_w [out, in]`: the dense base weight, compute dtype (used by
    ///   DoRA only: its norms, and `x̃·Wᵀ` under dropout).
    /// - `y [.., out]`: holds `x·Wᵀ` **without the bias** on entry; on return
    ///   the adapted output. Add the base bias after this call (PEFT's DoRA
    ///   does not rescale the bias).
    /// - `saved`: filled for [`LoraLinear::backward`] (`x̃·Aᵀ`, dropout seed,
    ///   DoRA norms and `pre [N, out]`).
    /// - `mode`: [`Mode::Train`] applies dropout to the adapter input.
    pub fn forward(
        &self,
        ctx: &Ctx,
        x: &Tensor,
        base_w: &Tensor,
        y: &mut Tensor,
        saved: &mut LoraSaved,
        mode: Mode,
    ) -> Result<()> {
        let (i, o) = (self.shape.in_features, self.shape.out_features);
        let cd = Self::compute_dtype(x)?;
        let n = Self::rows_of("x", x, i, None, cd)?;
        Self::rows_of("y", y, o, Some(n), cd)?;
        self.check_weight(base_w)?;
        Self::rows_of("base weight", base_w, i, Some(o), cd)?;
        let mut y2 = y.reshape(&[n, o])?;
        let (a_c, b_c) = self.ab_in(ctx, cd)?;
        let (xd, xa) = self.input_product(ctx, &x.reshape(&[n, i])?, &a_c, saved, mode)?;
        let lora_into = Gemm {
            trans_b: true,
            alpha: self.scale,
            beta: 1.0,
            ..Gemm::default()
        };
        if !self.use_dora {
            saved.pre = None;
            saved.k_minus_1 = None;
            saved.inv_norm = None;
            return Ok(ops::gemm(ctx, &xa, &b_c, &mut y2, lora_into)?);
        }

        let m = self.magnitude("this DoRA layer")?;
        let mut inv = slot(ctx, &mut saved.inv_norm, DType::F32, &[o])?;
        self.inv_weight_norm(ctx, base_w, &mut inv)?;
        let mut km1 = slot(ctx, &mut saved.k_minus_1, DType::F32, &[o])?;
        ops::mul(ctx, m, &inv, &mut km1)?;
        ops::axpby(ctx, -1.0, &ones(ctx, DType::F32, &[o])?, 1.0, &mut km1)?;

        let mut pre = slot(ctx, &mut saved.pre, cd, &[n, o])?;
        if saved.dropout_seed.is_some() {
            ops::gemm(ctx, &xd, base_w, &mut pre, Gemm::nt())?;
        } else {
            pre.copy_from(ctx, &y2)?;
        }
        ops::gemm(ctx, &xa, &b_c, &mut pre, lora_into)?;
        ops::gemm(ctx, &xa, &b_c, &mut y2, lora_into)?;
        let mut t = Tensor::empty(ctx, cd, &[n, o])?;
        ops::mul(ctx, &broadcast_rows(ctx, &km1, n, cd)?, &pre, &mut t)?;
        Ok(ops::axpby(ctx, 1.0, &t, 1.0, &mut y2)?)
    }

    /// The LoRA forward for a caller that has not yet run the base GEMM:
    /// `y` is **overwritten** with the adapter's share `s·x̃·Aᵀ·Bᵀ` (a K = r
    /// GEMM), and the caller then accumulates the base `x·Wᵀ` into it
    /// (`beta = 1`, which cuBLASLt applies in the big GEMM's epilogue), so
    /// the small GEMM never reads `y` and the sum is rounded once. Then add
    /// the bias. `saved` is filled as by [`LoraLinear::forward`].
    ///
    /// LoRA only: DoRA needs `x·Wᵀ` itself, so DoRA layers run the base GEMM
    /// first and then [`LoraLinear::forward`].
    pub fn forward_first(
        &self,
        ctx: &Ctx,
        x: &Tensor,
        y: &mut Tensor,
        saved: &mut LoraSaved,
        mode: Mode,
    ) -> Result<()> {
        if self.use_dora {
            return Err(Error::Config(
                "a DoRA layer's output needs the base output x·Wᵀ first: run forward".into(),
            ));
        }
        let (i, o) = (self.shape.in_features, self.shape.out_features);
        let cd = Self::compute_dtype(x)?;
        let n = Self::rows_of("x", x, i, None, cd)?;
        Self::rows_of("y", y, o, Some(n), cd)?;
        let (a_c, _) = self.ab_in(ctx, cd)?;
        self.input_product(ctx, &x.reshape(&[n, i])?, &a_c, saved, mode)?;
        saved.pre = None;
        saved.k_minus_1 = None;
        saved.inv_norm = None;
        self.forward_first_from(ctx, saved, y)
    }

    /// [`LoraLinear::forward_first`] from a record that `forward_first` or
    /// [`LoraLinear::record`] already made for the same input and mode:
    /// overwrites `y [N, out]` with `s·(x̃·Aᵀ)·Bᵀ` without computing `x̃·Aᵀ`
    /// again (the recomputed forward under gradient checkpointing, given the
    /// forward's records). LoRA only.
    pub fn forward_first_from(&self, ctx: &Ctx, saved: &LoraSaved, y: &mut Tensor) -> Result<()> {
        if self.use_dora {
            return Err(Error::Config(
                "a DoRA layer's output needs the base output x·Wᵀ first: run forward".into(),
            ));
        }
        let xa = saved.xa.as_ref().ok_or_else(|| {
            Error::Config("forward_first_from needs a record holding x̃·Aᵀ".into())
        })?;
        let o = self.shape.out_features;
        let cd = Self::compute_dtype(xa)?;
        let n = Self::rows_of("x̃·Aᵀ", xa, self.r, None, cd)?;
        Self::rows_of("y", y, o, Some(n), cd)?;
        let mut y2 = y.reshape(&[n, o])?;
        let (_, b_c) = self.ab_in(ctx, cd)?;
        let lora_out = Gemm {
            trans_b: true,
            alpha: self.scale,
            ..Gemm::default()
        };
        Ok(ops::gemm(
            ctx,
            &xa.reshape(&[n, self.r])?,
            &b_c,
            &mut y2,
            lora_out,
        )?)
    }

    /// `x̃ = dropout(x)` and `x̃·Aᵀ`, recorded in `saved` (with the dropout seed).
    fn input_product(
        &self,
        ctx: &Ctx,
        x2: &Tensor,
        a_c: &Tensor,
        saved: &mut LoraSaved,
        mode: Mode,
    ) -> Result<(Tensor, Tensor)> {
        let (n, i) = (x2.shape()[0], self.shape.in_features);
        let cd = x2.dtype();
        saved.dropout_seed = self.dropout_seed(mode);
        let xd = match saved.dropout_seed {
            Some(seed) => {
                let mut t = Tensor::empty(ctx, cd, &[n, i])?;
                ops::dropout(ctx, x2, self.dropout, seed, &mut t)?;
                t
            }
            None => x2.clone(),
        };
        let mut xa = slot(ctx, &mut saved.xa, cd, &[n, self.r])?;
        ops::gemm(ctx, &xd, a_c, &mut xa, Gemm::nt())?;
        Ok((xd, xa))
    }

    /// Fills `saved` exactly as [`LoraLinear::forward`] in `mode` would,
    /// without computing the output: under gradient checkpointing the
    /// recomputed forward needs a linear's record but not its output when
    /// nothing downstream in the unit reads it. LoRA only: a DoRA record
    /// holds the base output, so DoRA layers must run [`LoraLinear::forward`].
    pub fn record(&self, ctx: &Ctx, x: &Tensor, saved: &mut LoraSaved, mode: Mode) -> Result<()> {
        if self.use_dora {
            return Err(Error::Config(
                "a DoRA layer's backward record needs its output: run forward".into(),
            ));
        }
        let (i, cd) = (self.shape.in_features, Self::compute_dtype(x)?);
        let n = Self::rows_of("x", x, i, None, cd)?;
        let (a_c, _) = self.ab_in(ctx, cd)?;
        self.input_product(ctx, &x.reshape(&[n, i])?, &a_c, saved, mode)?;
        saved.pre = None;
        saved.k_minus_1 = None;
        saved.inv_norm = None;
        Ok(())
    }

    /// The backward of [`LoraLinear::forward`], given the same `x` and
    /// `base_w` and the `saved` that forward filled.
    ///
    /// - `dy [.., out]`: gradient of the adapted output (compute dtype).
    /// - `dx [.., in]`: on entry holds the base path's `dy·W` (the caller
    ///   computes it as for a plain linear); the adapter's share is **added**.
    ///   For DoRA this includes the correction `((k − 1)⊙dy)·W` of the
    ///   rescaled base path, so the caller does nothing special.
    /// - `grads`: dA, dB (and dm for DoRA) are **accumulated** in f32.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        ctx: &Ctx,
        x: &Tensor,
        base_w: &Tensor,
        dy: &Tensor,
        saved: &LoraSaved,
        dx: &mut Tensor,
        grads: &mut LoraGrads,
    ) -> Result<()> {
        self.backward_impl(ctx, x, base_w, dy, saved, dx, false, grads)
    }

    /// [`LoraLinear::backward`] for a caller that has not yet run the base
    /// `dy·W` GEMM: `dx` is **overwritten** with the adapter's share (for
    /// DoRA including `((k − 1)⊙dy)·W`), and the caller then accumulates
    /// `dy·W` into it (`beta = 1`), so the adapter's K = r GEMM does not read
    /// `dx`. Gradients as in [`LoraLinear::backward`]; LoRA and DoRA alike.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_first(
        &self,
        ctx: &Ctx,
        x: &Tensor,
        base_w: &Tensor,
        dy: &Tensor,
        saved: &LoraSaved,
        dx: &mut Tensor,
        grads: &mut LoraGrads,
    ) -> Result<()> {
        self.backward_impl(ctx, x, base_w, dy, saved, dx, true, grads)
    }

    /// The backward; `overwrite`: `dx` receives the adapter's share instead
    /// of having it added.
    #[allow(clippy::too_many_arguments)]
    fn backward_impl(
        &self,
        ctx: &Ctx,
        x: &Tensor,
        base_w: &Tensor,
        dy: &Tensor,
        saved: &LoraSaved,
        dx: &mut Tensor,
        overwrite: bool,
        grads: &mut LoraGrads,
    ) -> Result<()> {
        let (i, o, r) = (self.shape.in_features, self.shape.out_features, self.r);
        let cd = x.dtype();
        let n = Self::rows_of("x", x, i, None, cd)?;
        Self::rows_of("dy", dy, o, Some(n), cd)?;
        Self::rows_of("dx", dx, i, Some(n), cd)?;
        self.check_weight(base_w)?;
        Self::rows_of("base weight", base_w, i, Some(o), cd)?;
        let grad_shapes: [(&str, Option<&Tensor>, Vec<usize>); 3] = [
            ("grad of lora_A", Some(&grads.a), vec![r, i]),
            ("grad of lora_B", Some(&grads.b), vec![o, r]),
            (
                "grad of lora_magnitude_vector",
                if self.use_dora {
                    Some(grads.magnitude.as_ref().ok_or_else(|| {
                        Error::Config("DoRA backward needs a magnitude gradient".into())
                    })?)
                } else {
                    None
                },
                vec![o],
            ),
        ];
        for (what, t, s) in grad_shapes {
            let Some(t) = t else { continue };
            if t.shape() != s.as_slice() {
                return Err(Error::Shape {
                    what: what.into(),
                    got: t.shape().to_vec(),
                    expected: s,
                });
            }
            if t.dtype() != DType::F32 {
                return Err(Error::DType {
                    what: what.into(),
                    got: t.dtype(),
                    expected: "f32".into(),
                });
            }
        }
        let xa = match &saved.xa {
            Some(t) if t.shape() == [n, r] && t.dtype() == cd => t,
            _ => return Err(Error::Config(
                "backward without a matching forward: saved x·Aᵀ is missing or of another shape"
                    .into(),
            )),
        };
        let x2 = x.reshape(&[n, i])?;
        let dy2 = dy.reshape(&[n, o])?;
        let mut dx2 = dx.reshape(&[n, i])?;
        let (a_c, b_c) = self.ab_in(ctx, cd)?;
        let xd = match saved.dropout_seed {
            Some(seed) => {
                let mut t = Tensor::empty(ctx, cd, &[n, i])?;
                ops::dropout(ctx, &x2, self.dropout, seed, &mut t)?;
                t
            }
            None => x2,
        };

        // g: the gradient reaching the adapter product s·xa·Bᵀ (before s).
        // h: the extra gradient of x̃·Wᵀ (DoRA: (k − 1)⊙dy), if any.
        let (g, h) = if self.use_dora {
            let (Some(km1), Some(inv), Some(pre)) = (&saved.k_minus_1, &saved.inv_norm, &saved.pre)
            else {
                return Err(Error::Config("DoRA backward without a DoRA forward".into()));
            };
            let mut t = Tensor::empty(ctx, cd, &[n, o])?;
            ops::mul(ctx, &dy2, pre, &mut t)?;
            let mut colsum = Tensor::empty(ctx, DType::F32, &[1, o])?;
            ops::gemm(ctx, &ones(ctx, cd, &[n, 1])?, &t, &mut colsum, Gemm::tn())?;
            let mut dm = Tensor::empty(ctx, DType::F32, &[o])?;
            ops::mul(ctx, &colsum.reshape(&[o])?, inv, &mut dm)?;
            let gm = grads.magnitude.as_mut().expect("checked above");
            ops::axpby(ctx, 1.0, &dm, 1.0, gm)?;

            let mut h = Tensor::empty(ctx, cd, &[n, o])?;
            ops::mul(ctx, &dy2, &broadcast_rows(ctx, km1, n, cd)?, &mut h)?;
            let mut g = Tensor::empty(ctx, cd, &[n, o])?;
            ops::add(ctx, &dy2, &h, &mut g)?;
            (g, Some(h))
        } else {
            (dy2.clone(), None)
        };

        let acc_tn = Gemm {
            trans_a: true,
            alpha: self.scale,
            beta: 1.0,
            ..Gemm::default()
        };
        ops::gemm(ctx, &g, xa, &mut grads.b, acc_tn)?;
        let mut dxa = Tensor::empty(ctx, cd, &[n, r])?;
        let scaled = Gemm {
            alpha: self.scale,
            ..Gemm::default()
        };
        ops::gemm(ctx, &g, &b_c, &mut dxa, scaled)?;
        ops::gemm(ctx, &dxa, &xd, &mut grads.a, Gemm::tn().accumulate())?;

        let acc = Gemm::default().accumulate();
        match saved.dropout_seed {
            Some(seed) => {
                let mut dxd = Tensor::empty(ctx, cd, &[n, i])?;
                ops::gemm(ctx, &dxa, &a_c, &mut dxd, Gemm::default())?;
                if let Some(h) = &h {
                    ops::gemm(ctx, h, base_w, &mut dxd, acc)?;
                }
                if overwrite {
                    ops::dropout(ctx, &dxd, self.dropout, seed, &mut dx2)?;
                } else {
                    let mut t = Tensor::empty(ctx, cd, &[n, i])?;
                    ops::dropout(ctx, &dxd, self.dropout, seed, &mut t)?;
                    ops::axpby(ctx, 1.0, &t, 1.0, &mut dx2)?;
                }
            }
            None => {
                let first = if overwrite { Gemm::default() } else { acc };
                ops::gemm(ctx, &dxa, &a_c, &mut dx2, first)?;
                if let Some(h) = &h {
                    ops::gemm(ctx, h, base_w, &mut dx2, acc)?;
                }
            }
        }
        Ok(())
    }

    /// Merges the adapter into `base_w` in place: `W + s·B·A`, for DoRA
    /// `(m/‖W + s·B·A‖)·(W + s·B·A)` per row (as PEFT merges), computed in
    /// f32 and rounded once to `base_w`'s dtype.
    pub fn merge_into(&self, ctx: &Ctx, base_w: &mut Tensor) -> Result<()> {
        let i = self.shape.in_features;
        let target = base_w.clone();
        let m = if self.use_dora {
            Some(self.magnitude("the merged DoRA layer")?)
        } else {
            None
        };
        let ones_row = ones(ctx, DType::F32, &[1, i])?;
        self.adapted_rows(ctx, &base_w.clone(), |r0, wf, _, rstd| {
            let rows = wf.shape()[0];
            let mut dst = target.view(r0 * i, &[rows, i])?;
            let Some(m) = m else {
                return Ok(ops::cast(ctx, wf, &mut dst)?);
            };
            // m/‖W'‖ = m·rstd/√in per row, broadcast over the row.
            let f = Tensor::empty(ctx, DType::F32, &[rows, 1])?;
            ops::mul(ctx, &m.view(r0, &[rows])?, rstd, &mut f.reshape(&[rows])?)?;
            let mut fb = Tensor::empty(ctx, DType::F32, &[rows, i])?;
            let g = Gemm {
                alpha: 1.0 / (i as f32).sqrt(),
                ..Gemm::default()
            };
            ops::gemm(ctx, &f, &ones_row, &mut fb, g)?;
            let mut t = Tensor::empty(ctx, DType::F32, &[rows, i])?;
            ops::mul(ctx, wf, &fb, &mut t)?;
            Ok(ops::cast(ctx, &t, &mut dst)?)
        })
    }
}

/// Merges `lora` into `base_w` in place (see [`LoraLinear::merge_into`]).
pub fn merge_into(ctx: &Ctx, base_w: &mut Tensor, lora: &LoraLinear) -> Result<()> {
    lora.merge_into(ctx, base_w)
}
