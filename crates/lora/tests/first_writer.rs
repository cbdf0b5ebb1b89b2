//! The first-writer variants (`forward_first`, `backward_first`: the adapter
//! writes its share, the base GEMM accumulates onto it) give what the
//! base-first order gives, and the cached compute-dtype copies of A and B
//! follow writes through `params_mut`.
use llmft_lora::{InitLoraWeights, LayerSpec, LinearShape, LoraGrads, LoraLinear, LoraSaved, Mode};
use llmft_tensor::ops::{self, Gemm};
use llmft_tensor::{Ctx, DType, Tensor};

fn spec(dropout: f32, use_dora: bool) -> LayerSpec {
    LayerSpec {
        r: 4,
        alpha: 8.0,
        scale: 2.0,
        dropout,
        use_dora,
        init: InitLoraWeights::Random,
    }
}

fn randn(ctx: &Ctx, dt: DType, shape: &[usize], seed: u64) -> Tensor {
    let mut t = Tensor::empty(ctx, DType::F32, shape).unwrap();
    ops::fill_normal(ctx, &mut t, seed, 0.0, 1.0).unwrap();
    let mut c = Tensor::empty(ctx, dt, shape).unwrap();
    ops::cast(ctx, &t, &mut c).unwrap();
    c
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale))
}

#[test]
fn first_writer_order_matches_base_first() {
    let ctx = Ctx::cpu();
    let (n, i, o) = (6, 16, 12);
    for dt in [DType::F32, DType::BF16] {
        let tol = if dt == DType::F32 { 1e-5 } else { 2e-2 };
        let (x, w, dy) = (
            randn(&ctx, dt, &[n, i], 1),
            randn(&ctx, dt, &[o, i], 2),
            randn(&ctx, dt, &[n, o], 3),
        );
        for (dropout, dora) in [(0.0, false), (0.25, false), (0.0, true), (0.25, true)] {
            let mut lora =
                LoraLinear::new(&ctx, LinearShape::new(i, o), &spec(dropout, dora), 7).unwrap();
            if dora {
                lora.init_magnitude(&ctx, &w).unwrap();
                let m = lora.magnitude.as_mut().unwrap();
                let bump = randn(&ctx, DType::F32, &[o], 9);
                ops::axpby(&ctx, 0.1, &bump, 1.0, m).unwrap();
            }
            let mode = Mode::Train { seed: 5 };
            let what = format!("{dt} dropout {dropout} dora {dora}");

            // Forward: base first, then the adapter ...
            let mut saved_a = LoraSaved::new();
            let mut y_a = Tensor::empty(&ctx, dt, &[n, o]).unwrap();
            ops::gemm(&ctx, &x, &w, &mut y_a, Gemm::nt()).unwrap();
            lora.forward(&ctx, &x, &w, &mut y_a, &mut saved_a, mode)
                .unwrap();
            // ... against the adapter first (LoRA only), base accumulated.
            let mut saved_b = LoraSaved::new();
            if dora {
                let mut y = Tensor::empty(&ctx, dt, &[n, o]).unwrap();
                let err = lora
                    .forward_first(&ctx, &x, &mut y, &mut saved_b, mode)
                    .unwrap_err();
                assert!(err.to_string().contains("run forward"), "{err}");
                saved_b = saved_a;
                saved_a = LoraSaved::new();
                let mut y = Tensor::empty(&ctx, dt, &[n, o]).unwrap();
                ops::gemm(&ctx, &x, &w, &mut y, Gemm::nt()).unwrap();
                lora.forward(&ctx, &x, &w, &mut y, &mut saved_a, mode)
                    .unwrap();
            } else {
                let mut y_b = Tensor::empty(&ctx, dt, &[n, o]).unwrap();
                ops::fill(&ctx, &mut y_b, f32::NAN).unwrap();
                lora.forward_first(&ctx, &x, &mut y_b, &mut saved_b, mode)
                    .unwrap();
                ops::gemm(&ctx, &x, &w, &mut y_b, Gemm::nt().accumulate()).unwrap();
                assert!(max_rel(&y_b, &y_a) <= tol, "{what}: forward");
                assert_eq!(saved_a.bytes(), saved_b.bytes(), "{what}");
            }

            // Backward: base dy·W then the adapter added, against the adapter
            // written (over garbage) and the base accumulated.
            let mut dx_a = Tensor::empty(&ctx, dt, &[n, i]).unwrap();
            ops::gemm(&ctx, &dy, &w, &mut dx_a, Gemm::default()).unwrap();
            let mut g_a = LoraGrads::zeros(&ctx, &lora).unwrap();
            lora.backward(&ctx, &x, &w, &dy, &saved_a, &mut dx_a, &mut g_a)
                .unwrap();
            let mut dx_b = Tensor::empty(&ctx, dt, &[n, i]).unwrap();
            ops::fill(&ctx, &mut dx_b, f32::NAN).unwrap();
            let mut g_b = LoraGrads::zeros(&ctx, &lora).unwrap();
            lora.backward_first(&ctx, &x, &w, &dy, &saved_b, &mut dx_b, &mut g_b)
                .unwrap();
            ops::gemm(&ctx, &dy, &w, &mut dx_b, Gemm::default().accumulate()).unwrap();
            assert!(max_rel(&dx_b, &dx_a) <= tol, "{what}: dx");
            for (ga, gb) in g_a.tensors().into_iter().zip(g_b.tensors()) {
                assert_eq!(ga.to_f32_vec().unwrap(), gb.to_f32_vec().unwrap(), "{what}");
            }
        }
    }
}

#[test]
fn compute_copies_follow_params_mut() {
    let ctx = Ctx::cpu();
    let (n, i, o) = (5, 8, 6);
    let x = randn(&ctx, DType::BF16, &[n, i], 1);
    let mut lora = LoraLinear::new(&ctx, LinearShape::new(i, o), &spec(0.0, false), 3).unwrap();
    let out = |lora: &LoraLinear| {
        let mut y = Tensor::empty(&ctx, DType::BF16, &[n, o]).unwrap();
        lora.forward_first(&ctx, &x, &mut y, &mut LoraSaved::new(), Mode::Eval)
            .unwrap();
        y.to_f32_vec().unwrap()
    };
    let before = out(&lora);
    assert_eq!(out(&lora), before);
    for p in lora.params_mut() {
        ops::axpby(&ctx, 0.0, &p.clone(), 2.0, p).unwrap();
    }
    let doubled = out(&lora);
    // s·x·(2A)ᵀ·(2B)ᵀ = 4× the first output (exact in bf16: powers of two).
    let want: Vec<f32> = before.iter().map(|v| 4.0 * v).collect();
    assert_eq!(doubled, want);
    // A fresh adapter with the same masters agrees (no stale copy).
    let fresh = LoraLinear::from_parts(
        LinearShape::new(i, o),
        &spec(0.0, false),
        3,
        lora.a.clone(),
        lora.b.clone(),
        None,
    )
    .unwrap();
    assert_eq!(out(&fresh), doubled);
}
