//! Helpers shared by the integration tests of llmft-tensor: a seeded
//! generator, tensors from plain vectors, f64 views of tensors and the
//! relative-error measures the tests assert on.
// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use llmft_tensor::{bf16, f16, Ctx, DType, Tensor};

/// A small seeded generator (splitmix64), independent of the crate's rng.
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

    /// Uniform in `[0, 1)` with 53 bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Uniform integer in `[0, n)`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }

    /// `n` values drawn from `N(0, std²)`, as f32.
    pub fn normals(&mut self, n: usize, std: f64) -> Vec<f32> {
        (0..n).map(|_| (self.normal() * std) as f32).collect()
    }

    /// `n` values uniform in `[lo, hi)`, as f32.
    pub fn uniforms(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f32> {
        (0..n)
            .map(|_| (lo + (hi - lo) * self.uniform()) as f32)
            .collect()
    }

    /// `n` values from `N(0, std²)` in f64.
    pub fn normals64(&mut self, n: usize, std: f64) -> Vec<f64> {
        (0..n).map(|_| self.normal() * std).collect()
    }
}

/// `v` rounded to `dtype` (round to nearest even) and back to f32.
pub fn round_to(dtype: DType, v: &[f32]) -> Vec<f32> {
    match dtype {
        DType::F32 => v.to_vec(),
        DType::BF16 => v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect(),
        DType::F16 => v.iter().map(|&x| f16::from_f32(x).to_f32()).collect(),
        d => panic!("round_to: {d} is not a float type"),
    }
}

/// A tensor of `dtype` holding `v` (rounded) on `ctx`.
pub fn tensor(ctx: &Ctx, v: &[f32], dtype: DType, shape: &[usize]) -> Tensor {
    Tensor::from_f32(ctx, v, dtype, shape).expect("from_f32")
}

/// A CPU tensor of `dtype` holding `v`.
pub fn host(v: &[f32], dtype: DType, shape: &[usize]) -> Tensor {
    tensor(&Ctx::cpu(), v, dtype, shape)
}

/// A CPU i32 tensor.
pub fn host_i32(v: &[i32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(&Ctx::cpu(), v, shape).expect("from_slice")
}

/// A zero CPU tensor.
pub fn host_zeros(dtype: DType, shape: &[usize]) -> Tensor {
    Tensor::zeros(&Ctx::cpu(), dtype, shape).expect("zeros")
}

/// The elements of a float tensor (any device) as f64.
pub fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_f32_vec()
        .expect("to_f32_vec")
        .into_iter()
        .map(f64::from)
        .collect()
}

/// f32 values widened to f64.
pub fn wide(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "dot of different lengths");
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

pub fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

/// `‖got − want‖₂ / ‖want‖₂` (the absolute error when `want` is zero).
pub fn rel_l2(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "rel_l2 of different lengths");
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w) * (g - w))
        .sum::<f64>()
        .sqrt();
    let base = norm(want);
    if base == 0.0 {
        diff
    } else {
        diff / base
    }
}

/// Asserts `rel_l2(got, want) <= tol` (NaN fails), naming `what`.
pub fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    let e = rel_l2(got, want);
    assert!(
        e <= tol,
        "{what}: relative L2 error {e:.3e} > {tol:.0e} (first values got {:?}, want {:?})",
        &got[..got.len().min(6)],
        &want[..want.len().min(6)]
    );
}

/// Relative L2 tolerance of a comparison whose result has dtype `d`.
pub fn tol_for(d: DType) -> f64 {
    match d {
        DType::F32 => 1e-5,
        _ => 1e-2,
    }
}

// Not every test binary has a CUDA case.
#[allow(unused_imports)]
pub use llmft_tensor::testing::gpu;
