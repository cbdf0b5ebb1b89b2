//! Every backward op checked by central finite differences of its forward,
//! on the CPU in f32. For a scalar `L(x) = ⟨dy, f(x)⟩` (random upstream `dy`)
//! and a random direction `v`, the change `L(x + εv) − L(x − εv)` must equal
//! `⟨dx, (x + εv) − (x − εv)⟩` within 1e-3 relative. The step is taken as the
//! f32-rounded difference actually applied, so input rounding cancels.
mod common;

use common::*;
use llmft_tensor::ops::{self, CrossEntropyOpts, Gemm, LmHeadGrads};
use llmft_tensor::{Ctx, DType, Tensor};
use proptest::prelude::*;
use proptest::sample::select;

const TOL: f64 = 1e-3;

fn cpu() -> Ctx {
    Ctx::cpu()
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// Checks `grad` (the claimed gradient at `x` of `L = Σ terms(x)`) along a
/// random direction. The error is relative to `|⟨grad, step⟩|`, or to its
/// typical size for a random direction (`‖grad‖·‖step‖/√n`) when the draw
/// makes it small, plus the f32 rounding noise of the terms (`2ε‖terms‖₂`,
/// which matters only where the gradient is tiny next to the outputs).
fn check_grad(
    what: &str,
    x: &[f32],
    grad: &[f64],
    eps: f64,
    rng: &mut SeedRng,
    terms: impl Fn(&[f32]) -> Vec<f64>,
) {
    check_grad_summed(what, x, grad, eps, rng, (0.0, 1), terms)
}

/// [`check_grad`] for terms computed in f32 from intermediates of size up
/// to `scale` (a cross-entropy is a log-sum-exp minus a logit: its rounding
/// is relative to the logits, not to the loss, which can be far smaller),
/// summed over `summed` values inside the op (noise growing like `√summed`).
fn check_grad_summed(
    what: &str,
    x: &[f32],
    grad: &[f64],
    eps: f64,
    rng: &mut SeedRng,
    (scale, summed): (f64, usize),
    terms: impl Fn(&[f32]) -> Vec<f64>,
) {
    assert_eq!(x.len(), grad.len(), "{what}: gradient length");
    let v = rng.normals64(x.len(), 1.0);
    let xp: Vec<f32> = x
        .iter()
        .zip(&v)
        .map(|(a, d)| (*a as f64 + eps * d) as f32)
        .collect();
    let xm: Vec<f32> = x
        .iter()
        .zip(&v)
        .map(|(a, d)| (*a as f64 - eps * d) as f32)
        .collect();
    let step: Vec<f64> = xp
        .iter()
        .zip(&xm)
        .map(|(p, m)| *p as f64 - *m as f64)
        .collect();
    let (tp, tm) = (terms(&xp), terms(&xm));
    let fd = tp.iter().sum::<f64>() - tm.iter().sum::<f64>();
    let noise =
        2.0 * f32::EPSILON as f64 * (norm(&tp) + norm(&tm) + 2.0 * scale) * (summed as f64).sqrt();
    let an = dot(grad, &step);
    let typical = norm(grad) * norm(&step) / (x.len().max(1) as f64).sqrt();
    let err = (fd - an).abs();
    assert!(
        err <= TOL * an.abs().max(typical) + noise,
        "{what}: finite difference {fd:e} vs analytic {an:e} (relative error {:.2e})",
        err / an.abs().max(typical)
    );
}

/// The terms `dy_i·y_i` of `⟨dy, y⟩`.
fn prod(dy: &[f64], y: &[f64]) -> Vec<f64> {
    assert_eq!(dy.len(), y.len());
    dy.iter().zip(y).map(|(a, b)| a * b).collect()
}

fn t32(v: &[f32], shape: &[usize]) -> Tensor {
    host(v, DType::F32, shape)
}

// ---------------------------------------------------------------- rmsnorm

fn rmsnorm(x: &[f32], w: &[f32], rows: usize, d: usize, eps: f32) -> (Tensor, Tensor) {
    let mut y = host_zeros(DType::F32, &[rows, d]);
    let mut rstd = host_zeros(DType::F32, &[rows]);
    ops::rmsnorm_fwd(
        &cpu(),
        &t32(x, &[rows, d]),
        &t32(w, &[d]),
        eps,
        &mut y,
        &mut rstd,
    )
    .unwrap();
    (y, rstd)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn rmsnorm_bwd_dx_and_dw(rows in 1usize..=5, d in 1usize..=70,
                             eps in select(vec![1e-6f32, 1e-2]), seed in any::<u64>()) {
        let mut rng = SeedRng::new(seed);
        // |x| in [0.5, 2]: a row near 0 with D = 1 bends on a scale below the step.
        let x: Vec<f32> = rng
            .uniforms(rows * d, 0.5, 2.0)
            .into_iter()
            .map(|v| if rng.uniform() < 0.5 { -v } else { v })
            .collect();
        let w = rng.normals(d, 1.0);
        let dy = rng.normals64(rows * d, 1.0);
        let (_, rstd) = rmsnorm(&x, &w, rows, d, eps);
        let dw0 = rng.normals(d, 0.1);
        let mut dx = host_zeros(DType::F32, &[rows, d]);
        let mut dw = t32(&dw0, &[d]);
        let tdy = t32(&f32s(&dy), &[rows, d]);
        let (tx, tw) = (t32(&x, &[rows, d]), t32(&w, &[d]));
        ops::rmsnorm_bwd(&cpu(), &tdy, &tx, &tw, &rstd, &mut dx, Some(&mut dw)).unwrap();
        // The gradient is taken against the f32 dy the op saw.
        let dy = f64s(&tdy);
        check_grad("rmsnorm dx", &x, &f64s(&dx), 1e-3, &mut rng, |x| {
            prod(&dy, &f64s(&rmsnorm(x, &w, rows, d, eps).0))
        });
        let dw_added: Vec<f64> = f64s(&dw).iter().zip(&dw0).map(|(a, b)| a - *b as f64).collect();
        check_grad("rmsnorm dw", &w, &dw_added, 1e-3, &mut rng, |w| {
            prod(&dy, &f64s(&rmsnorm(&x, w, rows, d, eps).0))
        });
        // Without a weight gradient, dx is the same.
        let mut dx2 = host_zeros(DType::F32, &[rows, d]);
        ops::rmsnorm_bwd(&cpu(), &tdy, &tx, &tw, &rstd, &mut dx2, None).unwrap();
        assert_eq!(dx.to_vec::<f32>().unwrap(), dx2.to_vec::<f32>().unwrap());
    }
}

// ------------------------------------------------------------------- rope

fn rope(x: &[f32], pos: &Tensor, inv: &Tensor, shape: &[usize]) -> Vec<f64> {
    let mut y = host_zeros(DType::F32, shape);
    ops::rope_fwd(&cpu(), &t32(x, shape), pos, inv, &mut y).unwrap();
    f64s(&y)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn rope_bwd_is_the_transpose(t in 1usize..=5, h in 1usize..=3, half in 1usize..=20,
                                 seed in any::<u64>()) {
        let mut rng = SeedRng::new(seed);
        let dh = 2 * half;
        let shape = [t, h, dh];
        let x = rng.normals(t * h * dh, 1.0);
        let dy = f32s(&rng.normals64(t * h * dh, 1.0));
        let posv: Vec<i32> = (0..t).map(|_| rng.below(5000) as i32).collect();
        let pos = host_i32(&posv, &[t]);
        let inv = t32(&ops::rope_inv_freq(dh, 10_000.0, Default::default()), &[half]);
        let mut dx = host_zeros(DType::F32, &shape);
        ops::rope_bwd(&cpu(), &t32(&dy, &shape), &pos, &inv, &mut dx).unwrap();
        let dy = wide(&dy);
        check_grad("rope dx", &x, &f64s(&dx), 1e-2, &mut rng, |x| {
            prod(&dy, &rope(x, &pos, &inv, &shape))
        });
    }
}

// ----------------------------------------------------------------- swiglu

fn swiglu(g: &[f32], u: &[f32]) -> Vec<f64> {
    let n = g.len();
    let mut y = host_zeros(DType::F32, &[n]);
    ops::swiglu_fwd(&cpu(), &t32(g, &[n]), &t32(u, &[n]), &mut y).unwrap();
    f64s(&y)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn swiglu_bwd_dgate_and_dup(n in 1usize..=300, seed in any::<u64>()) {
        let mut rng = SeedRng::new(seed);
        let g = rng.normals(n, 2.0);
        let u = rng.normals(n, 1.0);
        let dy = f32s(&rng.normals64(n, 1.0));
        let (mut dg, mut du) = (host_zeros(DType::F32, &[n]), host_zeros(DType::F32, &[n]));
        ops::swiglu_bwd(&cpu(), &t32(&dy, &[n]), &t32(&g, &[n]), &t32(&u, &[n]), &mut dg, &mut du)
            .unwrap();
        let dy = wide(&dy);
        check_grad("swiglu dgate", &g, &f64s(&dg), 1e-3, &mut rng, |g| prod(&dy, &swiglu(g, &u)));
        check_grad("swiglu dup", &u, &f64s(&du), 1e-3, &mut rng, |u| prod(&dy, &swiglu(&g, u)));
    }
}

// ---------------------------------------------------------------- softmax

fn softmax(s: &[f32], seg: Option<&Tensor>, shape: &[usize], scale: f32) -> Tensor {
    let mut p = host_zeros(DType::F32, shape);
    ops::softmax_causal_fwd(&cpu(), &t32(s, shape), seg, scale, &mut p).unwrap();
    p
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn softmax_causal_bwd_dscores(b in 1usize..=2, h in 1usize..=2, tq in 1usize..=9,
                                  extra in 0usize..=5, with_seg in any::<bool>(),
                                  scale in select(vec![1.0f32, 0.25]), seed in any::<u64>()) {
        let tk = tq + extra;
        let shape = [b, h, tq, tk];
        let mut rng = SeedRng::new(seed);
        let s = rng.normals(b * h * tq * tk, 2.0);
        let segv: Vec<i32> = (0..b * tk).map(|i| ((i % tk) / 3) as i32).collect();
        let seg = with_seg.then(|| host_i32(&segv, &[b, tk]));
        let dp = f32s(&rng.normals64(s.len(), 1.0));
        let p = softmax(&s, seg.as_ref(), &shape, scale);
        let mut ds = host_zeros(DType::F32, &shape);
        ops::softmax_causal_bwd(&cpu(), &p, &t32(&dp, &shape), scale, &mut ds).unwrap();
        let dp = wide(&dp);
        check_grad("softmax dscores", &s, &f64s(&ds), 1e-3, &mut rng, |s| {
            prod(&dp, &f64s(&softmax(s, seg.as_ref(), &shape, scale)))
        });
    }
}

// -------------------------------------------------------------- embedding

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn embedding_bwd_scatter_adds(n in 1usize..=20, v in 1usize..=8, d in 1usize..=33,
                                  seed in any::<u64>()) {
        let mut rng = SeedRng::new(seed);
        let table = rng.normals(v * d, 1.0);
        // Few rows, many tokens: ids repeat.
        let idv: Vec<i32> = (0..n).map(|_| rng.below(v) as i32).collect();
        let ids = host_i32(&idv, &[n]);
        let dy = f32s(&rng.normals64(n * d, 1.0));
        let dt0 = rng.normals(v * d, 0.5);
        let mut dtable = t32(&dt0, &[v, d]);
        ops::embedding_bwd(&cpu(), &ids, &t32(&dy, &[n, d]), &mut dtable).unwrap();
        let added: Vec<f64> = f64s(&dtable).iter().zip(&dt0).map(|(a, b)| a - *b as f64).collect();
        let dy = wide(&dy);
        check_grad("embedding dtable", &table, &added, 1e-2, &mut rng, |t| {
            let mut y = host_zeros(DType::F32, &[n, d]);
            ops::embedding_fwd(&cpu(), &ids, &t32(t, &[v, d]), &mut y).unwrap();
            prod(&dy, &f64s(&y))
        });
    }
}

// ------------------------------------------------ LM head + cross-entropy

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn lm_head_cross_entropy_dh_and_dw(n in 1usize..=9, d in 1usize..=20, v in 2usize..=30,
                                       chunk in select(vec![0usize, 1, 2, 4, 7]),
                                       normalizer in select(vec![None, Some(3.0f32)]),
                                       seed in any::<u64>()) {
        let mut rng = SeedRng::new(seed);
        let h = rng.normals(n * d, 1.0);
        let w = rng.normals(v * d, 0.5);
        let labels: Vec<i32> = (0..n)
            .map(|i| if i % 4 == 3 { -100 } else { rng.below(v) as i32 })
            .collect();
        let tl = host_i32(&labels, &[n]);
        let opts = CrossEntropyOpts { chunk_rows: chunk, normalizer, ..Default::default() };
        let loss = |h: &[f32], w: &[f32]| {
            ops::lm_head_cross_entropy(&cpu(), &t32(h, &[n, d]), &t32(w, &[v, d]), &tl, &opts,
                                       None).unwrap().loss
        };
        let mut dh = host_zeros(DType::F32, &[n, d]);
        let mut dw = host_zeros(DType::F32, &[v, d]);
        ops::lm_head_cross_entropy(&cpu(), &t32(&h, &[n, d]), &t32(&w, &[v, d]), &tl, &opts,
                                   Some(LmHeadGrads { dh: &mut dh, dw: Some(&mut dw) })).unwrap();
        // The loss sums, over n rows, a log-sum-exp over v logits minus a
        // logit, in f32: its rounding is relative to the logits' size.
        let trained = labels.iter().filter(|&&l| l >= 0).count().max(1);
        let denom = normalizer.map_or(trained as f64, f64::from);
        let logit_size: f64 = (0..n)
            .filter(|&i| labels[i] >= 0)
            .map(|i| {
                (0..v)
                    .map(|j| {
                        (0..d).map(|k| h[i * d + k] as f64 * w[j * d + k] as f64).sum::<f64>().abs()
                    })
                    .fold(0.0, f64::max)
                    + (v as f64).ln()
            })
            .sum::<f64>()
            / denom;
        let noise = (logit_size, n * v);
        check_grad_summed("cross-entropy dh", &h, &f64s(&dh), 2e-3, &mut rng, noise,
                          |h| vec![loss(h, &w)]);
        check_grad_summed("cross-entropy dw", &w, &f64s(&dw), 2e-3, &mut rng, noise,
                          |w| vec![loss(&h, w)]);
    }
}

// ------------------------------------------------------------------- gemm

/// Batch `bi` of a 3-D tensor as a 2-D view; a 2-D tensor is shared.
fn batch_view(t: &Tensor, bi: usize) -> Tensor {
    match *t.shape() {
        [_, r, c] => t.view(bi * r * c, &[r, c]).unwrap(),
        _ => t.clone(),
    }
}

/// `out = op(x)·op(y)` with flags `(tx, ty)`: one batched call where gemm
/// takes it (x batched), else one call per batch entry through views,
/// summed over the batch when `out` is 2-D (the gradient of a shared B).
fn gemm_into(x: &Tensor, y: &Tensor, (tx, ty): (bool, bool), out: &mut Tensor, batch: usize) {
    let g = Gemm {
        trans_a: tx,
        trans_b: ty,
        ..Gemm::default()
    };
    if x.shape().len() == 3 && out.shape().len() == 3 {
        return ops::gemm(&cpu(), x, y, out, g).unwrap();
    }
    for bi in 0..batch {
        let mut o = batch_view(out, bi);
        let beta = if out.shape().len() == 2 && bi > 0 {
            1.0
        } else {
            0.0
        };
        ops::gemm(
            &cpu(),
            &batch_view(x, bi),
            &batch_view(y, bi),
            &mut o,
            Gemm { beta, ..g },
        )
        .unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn gemm_gradients_through_gemm_calls(batch in 1usize..=3, m in 1usize..=17, n in 1usize..=17,
                                         k in 1usize..=33, ta in any::<bool>(),
                                         tb in any::<bool>(), b_batched in any::<bool>(),
                                         seed in any::<u64>()) {
        let mut rng = SeedRng::new(seed);
        let with_batch = |s: [usize; 2], batched: bool| -> Vec<usize> {
            if batched { vec![batch, s[0], s[1]] } else { s.to_vec() }
        };
        let a_shape = with_batch(if ta { [k, m] } else { [m, k] }, true);
        let b_shape = with_batch(if tb { [n, k] } else { [k, n] }, b_batched);
        let c_shape = with_batch([m, n], true);
        let a = rng.normals(batch * m * k, 1.0);
        let b = rng.normals(if b_batched { batch } else { 1 } * k * n, 1.0);
        let dc = f32s(&rng.normals64(batch * m * n, 1.0));
        let g = Gemm { trans_a: ta, trans_b: tb, ..Gemm::default() };
        let fwd = |a: &[f32], b: &[f32]| {
            let mut c = host_zeros(DType::F32, &c_shape);
            ops::gemm(&cpu(), &t32(a, &a_shape), &t32(b, &b_shape), &mut c, g).unwrap();
            f64s(&c)
        };
        let (tav, tbv, tdc) = (t32(&a, &a_shape), t32(&b, &b_shape), t32(&dc, &c_shape));
        // dA = dC·Bᵀ for C = A·B, and its transposed-layout variants.
        let mut da = host_zeros(DType::F32, &a_shape);
        match (ta, tb) {
            (false, false) => gemm_into(&tdc, &tbv, (false, true), &mut da, batch),
            (false, true) => gemm_into(&tdc, &tbv, (false, false), &mut da, batch),
            (true, false) => gemm_into(&tbv, &tdc, (false, true), &mut da, batch),
            (true, true) => gemm_into(&tbv, &tdc, (true, true), &mut da, batch),
        }
        // dB = Aᵀ·dC, and its variants; summed over the batch for a shared B.
        let mut db = host_zeros(DType::F32, &b_shape);
        match (ta, tb) {
            (false, false) => gemm_into(&tav, &tdc, (true, false), &mut db, batch),
            (true, false) => gemm_into(&tav, &tdc, (false, false), &mut db, batch),
            (false, true) => gemm_into(&tdc, &tav, (true, false), &mut db, batch),
            (true, true) => gemm_into(&tdc, &tav, (true, true), &mut db, batch),
        }
        let dcw = wide(&dc);
        check_grad("gemm dA", &a, &f64s(&da), 1e-2, &mut rng, |a| prod(&dcw, &fwd(a, &b)));
        check_grad("gemm dB", &b, &f64s(&db), 1e-2, &mut rng, |b| prod(&dcw, &fwd(&a, b)));
        // A shared B's gradient also comes from one folded product.
        if !b_batched && !ta && !tb {
            let mut folded = host_zeros(DType::F32, &b_shape);
            let a2 = tav.reshape(&[batch * m, k]).unwrap();
            let dc2 = tdc.reshape(&[batch * m, n]).unwrap();
            ops::gemm(&cpu(), &a2, &dc2, &mut folded, Gemm::tn()).unwrap();
            assert_close("folded dB", &f64s(&folded), &f64s(&db), 1e-6);
        }
    }
}

// ---------------------------------------------------------------- dropout

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn dropout_bwd_is_dropout_of_dy(n in 1usize..=500, p in select(vec![0.0f32, 0.3, 0.75]),
                                    seed in any::<u64>()) {
        let mut rng = SeedRng::new(seed);
        let x = rng.normals(n, 1.0);
        let dy = f32s(&rng.normals64(n, 1.0));
        let mut dx = host_zeros(DType::F32, &[n]);
        ops::dropout(&cpu(), &t32(&dy, &[n]), p, seed, &mut dx).unwrap();
        let dy = wide(&dy);
        check_grad("dropout dx", &x, &f64s(&dx), 1e-2, &mut rng, |x| {
            let mut y = host_zeros(DType::F32, &[n]);
            ops::dropout(&cpu(), &t32(x, &[n]), p, seed, &mut y).unwrap();
            prod(&dy, &f64s(&y))
        });
    }
}
