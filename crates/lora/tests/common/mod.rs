//! Helpers shared by the tests of llmft-lora: a seeded generator, an f64
//! reference of the adapted linear (PEFT's formulas, DoRA norm optionally
//! frozen), and running the crate's forward/backward on plain vectors.
// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use llmft_lora::{lora_scale, InitLoraWeights, LayerSpec, LinearShape, LoraGrads, LoraLinear};
use llmft_lora::{LoraSaved, Mode};
use llmft_tensor::ops::{self, Gemm};
use llmft_tensor::{Ctx, DType, Tensor};

/// A small seeded generator (splitmix64).
pub struct SeedRng(u64);

impl SeedRng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x243F_6A88_85A3_08D3)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
    pub fn normals(&mut self, n: usize, std: f64) -> Vec<f32> {
        (0..n).map(|_| (self.normal() * std) as f32).collect()
    }
    pub fn normals64(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.normal()).collect()
    }
}

pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

pub fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

pub fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Max |a − b| / (max |b| + floor).
pub fn rel_err(a: &[f32], b: &[f32], floor: f64) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs() as f64)) + floor;
    a.iter()
        .zip(b)
        .fold(0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs()))
        / scale
}

/// One adapted linear on plain vectors: shapes, scale, dropout, DoRA.
#[derive(Debug, Clone)]
pub struct Problem {
    pub n: usize,
    pub i: usize,
    pub o: usize,
    pub r: usize,
    pub alpha: f64,
    pub rslora: bool,
    pub dora: bool,
    pub p: f32,
    pub x: Vec<f32>,
    pub w: Vec<f32>,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub m: Vec<f32>,
    pub dy: Vec<f32>,
}

impl Problem {
    /// Random data; B is non-zero and m is the row norms of W + s·B·A
    /// scaled by random factors around 1, so every path carries gradient.
    #[allow(clippy::too_many_arguments)]
    pub fn random(
        seed: u64,
        n: usize,
        i: usize,
        o: usize,
        r: usize,
        rslora: bool,
        dora: bool,
        p: f32,
    ) -> Self {
        let mut g = SeedRng::new(seed);
        let mut pr = Self {
            n,
            i,
            o,
            r,
            alpha: 2.0 * r as f64 + 1.0,
            rslora,
            dora,
            p,
            x: g.normals(n * i, 1.0),
            w: g.normals(o * i, 0.5),
            a: g.normals(r * i, 0.3),
            b: g.normals(o * r, 0.3),
            m: vec![],
            dy: g.normals(n * o, 1.0),
        };
        let norms = pr.weight_norms(&f64s(&pr.a), &f64s(&pr.b));
        pr.m = norms
            .iter()
            .map(|v| (v * (1.0 + 0.3 * g.normal())) as f32)
            .collect();
        pr
    }

    pub fn scale(&self) -> f32 {
        lora_scale(self.r, self.alpha, self.rslora)
    }

    pub fn spec(&self) -> LayerSpec {
        LayerSpec {
            r: self.r,
            alpha: self.alpha,
            scale: self.scale(),
            dropout: self.p,
            use_dora: self.dora,
            init: InitLoraWeights::Kaiming,
        }
    }

    pub fn shape(&self) -> LinearShape {
        LinearShape::new(self.i, self.o)
    }

    /// The adapter on `ctx` with parameters `a`, `b`, `m`.
    pub fn lora(&self, ctx: &Ctx, a: &[f32], b: &[f32], m: &[f32]) -> LoraLinear {
        let t = |v: &[f32], s: &[usize]| Tensor::from_slice(ctx, v, s).unwrap();
        let mag = self.dora.then(|| t(m, &[self.o]));
        LoraLinear::from_parts(
            self.shape(),
            &self.spec(),
            7,
            t(a, &[self.r, self.i]),
            t(b, &[self.o, self.r]),
            mag,
        )
        .unwrap()
    }

    /// `‖W + s·B·A‖` per row, f64.
    pub fn weight_norms(&self, a: &[f64], b: &[f64]) -> Vec<f64> {
        let s = self.scale() as f64;
        (0..self.o)
            .map(|o| {
                (0..self.i)
                    .map(|j| {
                        let ba: f64 = (0..self.r)
                            .map(|k| b[o * self.r + k] * a[k * self.i + j])
                            .sum();
                        let v = self.w[o * self.i + j] as f64 + s * ba;
                        v * v
                    })
                    .sum::<f64>()
                    .sqrt()
            })
            .collect()
    }

    /// The keep-and-scale factor of each element of x under `seed`.
    pub fn mask(&self, seed: Option<u64>) -> Vec<f64> {
        (0..self.n * self.i)
            .map(|j| match seed {
                None => 1.0,
                Some(s) if ops::uniform01(s, j as u64) >= self.p => 1.0 / (1.0 - self.p as f64),
                Some(_) => 0.0,
            })
            .collect()
    }

    /// PEFT's output in f64. `norms`: frozen DoRA norms (PEFT's detach), or
    /// computed from `a`, `b`.
    pub fn reference(
        &self,
        x: &[f64],
        a: &[f64],
        b: &[f64],
        m: &[f64],
        mask: &[f64],
        norms: Option<&[f64]>,
    ) -> Vec<f64> {
        let (n, i, o, r) = (self.n, self.i, self.o, self.r);
        let s = self.scale() as f64;
        let xd: Vec<f64> = x.iter().zip(mask).map(|(v, k)| v * k).collect();
        let own;
        let nrm = match norms {
            Some(v) => v,
            None => {
                own = self.weight_norms(a, b);
                &own
            }
        };
        let mut y = vec![0.0; n * o];
        for row in 0..n {
            let xa: Vec<f64> = (0..r)
                .map(|k| (0..i).map(|j| xd[row * i + j] * a[k * i + j]).sum())
                .collect();
            for c in 0..o {
                let base: f64 = (0..i)
                    .map(|j| x[row * i + j] * self.w[c * i + j] as f64)
                    .sum();
                let based: f64 = (0..i)
                    .map(|j| xd[row * i + j] * self.w[c * i + j] as f64)
                    .sum();
                let lora: f64 = s * (0..r).map(|k| xa[k] * b[c * r + k]).sum::<f64>();
                y[row * o + c] = if self.dora {
                    let k = m[c] / nrm[c];
                    base + (k - 1.0) * based + k * lora
                } else {
                    base + lora
                };
            }
        }
        y
    }
}

/// The crate's results on one problem.
pub struct Run {
    pub y: Vec<f32>,
    pub dx: Vec<f32>,
    pub da: Vec<f32>,
    pub db: Vec<f32>,
    pub dm: Vec<f32>,
    pub dropout_seed: Option<u64>,
}

/// Runs base + adapter forward and backward on `ctx` in `dtype` (x, W, dy
/// rounded to it), as a model would: `y = x·Wᵀ`, forward, `dx = dy·W`, backward.
pub fn run(ctx: &Ctx, pr: &Problem, dtype: DType, mode: Mode) -> Run {
    run_with(ctx, pr, dtype, mode, &pr.x, &pr.a, &pr.b, &pr.m)
}

#[allow(clippy::too_many_arguments)]
pub fn run_with(
    ctx: &Ctx,
    pr: &Problem,
    dtype: DType,
    mode: Mode,
    x: &[f32],
    a: &[f32],
    b: &[f32],
    m: &[f32],
) -> Run {
    let lora = pr.lora(ctx, a, b, m);
    let t = |v: &[f32], s: &[usize]| Tensor::from_f32(ctx, v, dtype, s).unwrap();
    let (xt, wt, dyt) = (
        t(x, &[pr.n, pr.i]),
        t(&pr.w, &[pr.o, pr.i]),
        t(&pr.dy, &[pr.n, pr.o]),
    );
    let mut y = Tensor::zeros(ctx, dtype, &[pr.n, pr.o]).unwrap();
    ops::gemm(ctx, &xt, &wt, &mut y, Gemm::nt()).unwrap();
    let mut saved = LoraSaved::new();
    lora.forward(ctx, &xt, &wt, &mut y, &mut saved, mode)
        .unwrap();
    let mut dx = Tensor::zeros(ctx, dtype, &[pr.n, pr.i]).unwrap();
    ops::gemm(ctx, &dyt, &wt, &mut dx, Gemm::default()).unwrap();
    let mut grads = LoraGrads::zeros(ctx, &lora).unwrap();
    lora.backward(ctx, &xt, &wt, &dyt, &saved, &mut dx, &mut grads)
        .unwrap();
    Run {
        y: y.to_f32_vec().unwrap(),
        dx: dx.to_f32_vec().unwrap(),
        da: grads.a.to_f32_vec().unwrap(),
        db: grads.b.to_f32_vec().unwrap(),
        dm: grads
            .magnitude
            .map(|t| t.to_f32_vec().unwrap())
            .unwrap_or_default(),
        dropout_seed: lora.dropout_seed(mode),
    }
}

/// Checks `grad`, the claimed gradient at `p` of `L(p) = Σ terms(p)`, along
/// a random direction by central differences with step `eps`. The error is
/// relative to `|⟨grad, step⟩|`, or to its typical size for a random
/// direction when the draw makes it small, plus the rounding noise of the
/// terms (`noise_eps·‖terms‖₂`).
#[allow(clippy::too_many_arguments)]
pub fn check_grad(
    what: &str,
    p: &[f32],
    grad: &[f32],
    eps: f64,
    tol: f64,
    noise_eps: f64,
    rng: &mut SeedRng,
    terms: impl Fn(&[f32]) -> Vec<f64>,
) {
    assert_eq!(p.len(), grad.len(), "{what}: gradient length");
    let v = rng.normals64(p.len());
    let pp: Vec<f32> = p
        .iter()
        .zip(&v)
        .map(|(a, d)| (*a as f64 + eps * d) as f32)
        .collect();
    let pm: Vec<f32> = p
        .iter()
        .zip(&v)
        .map(|(a, d)| (*a as f64 - eps * d) as f32)
        .collect();
    let step: Vec<f64> = pp
        .iter()
        .zip(&pm)
        .map(|(a, b)| *a as f64 - *b as f64)
        .collect();
    let (tp, tm) = (terms(&pp), terms(&pm));
    let fd = tp.iter().sum::<f64>() - tm.iter().sum::<f64>();
    let g = f64s(grad);
    let an = dot(&g, &step);
    let typical = norm(&g) * norm(&step) / (p.len().max(1) as f64).sqrt();
    let noise = noise_eps * (norm(&tp) + norm(&tm));
    let err = (fd - an).abs();
    assert!(
        err <= tol * an.abs().max(typical) + noise + 1e-12,
        "{what}: finite difference {fd:e} vs analytic {an:e} (err {err:e}, typical {typical:e}, noise {noise:e})"
    );
}
