//! Every backward checked by central finite differences on the CPU:
//! plain LoRA, rsLoRA, DoRA, and each with dropout (a fixed mask: the same
//! seed draws the same mask). `L = ⟨dy, y⟩` for a random upstream `dy`.
//!
//! dx, dm (and dA, dB without DoRA) are checked against the crate's own f32
//! forward. DoRA's dA and dB follow PEFT, which treats the weight norm as a
//! constant (detached): they are checked against an f64 reference of PEFT's
//! formula with the norm frozen at the current point, after checking that the
//! crate's forward equals that reference.
mod common;

use common::*;
use llmft_lora::Mode;
use llmft_tensor::{Ctx, DType};
use proptest::prelude::*;

const MODE: Mode = Mode::Train { seed: 11 };

fn terms(pr: &Problem, y: &[f32]) -> Vec<f64> {
    y.iter()
        .zip(&pr.dy)
        .map(|(a, b)| *a as f64 * *b as f64)
        .collect()
}

fn terms64(pr: &Problem, y: &[f64]) -> Vec<f64> {
    y.iter().zip(&pr.dy).map(|(a, b)| a * *b as f64).collect()
}

/// Checks all gradients of `pr` against the f64 reference (norm frozen).
fn check_against_reference(pr: &Problem, tol: f64, rng: &mut SeedRng) {
    let ctx = Ctx::cpu();
    let got = run(&ctx, pr, DType::F32, MODE);
    let mask = pr.mask(got.dropout_seed);
    let (x, a, b, m) = (f64s(&pr.x), f64s(&pr.a), f64s(&pr.b), f64s(&pr.m));
    let want: Vec<f32> = pr
        .reference(&x, &a, &b, &m, &mask, None)
        .iter()
        .map(|&v| v as f32)
        .collect();
    let e = rel_err(&got.y, &want, 1e-3);
    assert!(
        e < 1e-5,
        "{pr:?}: forward differs from the reference by {e:e}"
    );

    let norms = pr.weight_norms(&a, &b);
    let frozen = Some(norms.as_slice());
    let eps = 1e-3;
    check_grad("dx", &pr.x, &got.dx, eps, tol, 1e-15, rng, |v| {
        terms64(pr, &pr.reference(&f64s(v), &a, &b, &m, &mask, frozen))
    });
    check_grad("dA", &pr.a, &got.da, eps, tol, 1e-15, rng, |v| {
        terms64(pr, &pr.reference(&x, &f64s(v), &b, &m, &mask, frozen))
    });
    check_grad("dB", &pr.b, &got.db, eps, tol, 1e-15, rng, |v| {
        terms64(pr, &pr.reference(&x, &a, &f64s(v), &m, &mask, frozen))
    });
    if pr.dora {
        check_grad("dm", &pr.m, &got.dm, eps, tol, 1e-15, rng, |v| {
            terms64(pr, &pr.reference(&x, &a, &b, &f64s(v), &mask, frozen))
        });
    }
}

/// Checks the gradients that do not involve the detached norm against the
/// crate's own forward in f32.
fn check_against_own_forward(pr: &Problem, rng: &mut SeedRng) {
    let ctx = Ctx::cpu();
    let got = run(&ctx, pr, DType::F32, MODE);
    let f = |x: &[f32], a: &[f32], b: &[f32], m: &[f32]| {
        let r = run_with(&ctx, pr, DType::F32, MODE, x, a, b, m);
        terms(pr, &r.y)
    };
    let (eps, tol, noise) = (1e-2, 1e-3, 4.0 * f32::EPSILON as f64);
    check_grad("dx (own)", &pr.x, &got.dx, eps, tol, noise, rng, |v| {
        f(v, &pr.a, &pr.b, &pr.m)
    });
    if pr.dora {
        check_grad("dm (own)", &pr.m, &got.dm, eps, tol, noise, rng, |v| {
            f(&pr.x, &pr.a, &pr.b, v)
        });
    } else {
        check_grad("dA (own)", &pr.a, &got.da, eps, tol, noise, rng, |v| {
            f(&pr.x, v, &pr.b, &pr.m)
        });
        check_grad("dB (own)", &pr.b, &got.db, eps, tol, noise, rng, |v| {
            f(&pr.x, &pr.a, v, &pr.m)
        });
    }
}

fn case(seed: u64, rslora: bool, dora: bool, p: f32) {
    let mut rng = SeedRng::new(seed);
    for (n, i, o, r) in [(5, 7, 6, 3), (3, 9, 5, 1), (1, 4, 11, 2)] {
        let pr = Problem::random(seed + n as u64, n, i, o, r, rslora, dora, p);
        check_against_own_forward(&pr, &mut rng);
        check_against_reference(&pr, 1e-4, &mut rng);
    }
}

#[test]
fn plain() {
    case(1, false, false, 0.0);
}

#[test]
fn rslora() {
    case(2, true, false, 0.0);
}

#[test]
fn dora() {
    case(3, false, true, 0.0);
}

#[test]
fn dora_rslora() {
    case(4, true, true, 0.0);
}

#[test]
fn plain_dropout() {
    case(5, false, false, 0.3);
}

#[test]
fn dora_dropout() {
    case(6, false, true, 0.3);
}

#[test]
fn dropout_mask_is_fixed_by_seed_and_applied() {
    let pr = Problem::random(9, 4, 8, 5, 2, false, false, 0.5);
    let ctx = Ctx::cpu();
    let a = run(&ctx, &pr, DType::F32, MODE);
    let b = run(&ctx, &pr, DType::F32, MODE);
    assert_eq!(a.y, b.y, "same seed, same output");
    let c = run(&ctx, &pr, DType::F32, Mode::Train { seed: 12 });
    assert_ne!(a.y, c.y, "another seed draws another mask");
    let e = run(&ctx, &pr, DType::F32, Mode::Eval);
    assert!(e.dropout_seed.is_none());
    let mask = pr.mask(a.dropout_seed);
    assert!(mask.contains(&0.0) && mask.contains(&2.0));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]
    #[test]
    fn random_shapes(
        seed in 0u64..1000,
        n in 1usize..6,
        i in 1usize..10,
        o in 1usize..10,
        r in 1usize..5,
        rslora: bool,
        dora: bool,
        drop: bool,
    ) {
        let pr = Problem::random(seed, n, i, o, r, rslora, dora, if drop { 0.25 } else { 0.0 });
        check_against_reference(&pr, 1e-3, &mut SeedRng::new(seed));
    }
}
