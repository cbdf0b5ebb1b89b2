//! `LoraLinear::record` leaves exactly the record `forward` leaves: a
//! backward from either gives the same gradients (with dropout too), and a
//! DoRA layer refuses it.
use llmft_lora::{InitLoraWeights, LayerSpec, LinearShape, LoraGrads, LoraLinear, LoraSaved, Mode};
use llmft_tensor::ops;
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

fn randn(ctx: &Ctx, shape: &[usize], seed: u64) -> Tensor {
    let mut t = Tensor::empty(ctx, DType::F32, shape).unwrap();
    ops::fill_normal(ctx, &mut t, seed, 0.0, 1.0).unwrap();
    t
}

#[test]
fn record_matches_forward_for_backward() {
    let ctx = Ctx::cpu();
    let (n, i, o) = (6, 16, 12);
    let (x, w, dy) = (
        randn(&ctx, &[n, i], 1),
        randn(&ctx, &[o, i], 2),
        randn(&ctx, &[n, o], 3),
    );
    for dropout in [0.0, 0.25] {
        let lora = LoraLinear::new(&ctx, LinearShape::new(i, o), &spec(dropout, false), 7).unwrap();
        let mode = Mode::Train { seed: 5 };
        let backward = |saved: &LoraSaved| {
            let mut dx = Tensor::zeros(&ctx, DType::F32, &[n, i]).unwrap();
            let mut g = LoraGrads::zeros(&ctx, &lora).unwrap();
            lora.backward(&ctx, &x, &w, &dy, saved, &mut dx, &mut g)
                .unwrap();
            (
                dx.to_vec::<f32>().unwrap(),
                g.a.to_vec::<f32>().unwrap(),
                g.b.to_vec::<f32>().unwrap(),
            )
        };
        let mut from_forward = LoraSaved::new();
        let mut y = Tensor::zeros(&ctx, DType::F32, &[n, o]).unwrap();
        lora.forward(&ctx, &x, &w, &mut y, &mut from_forward, mode)
            .unwrap();
        let mut recorded = LoraSaved::new();
        lora.record(&ctx, &x, &mut recorded, mode).unwrap();
        assert_eq!(recorded.bytes(), from_forward.bytes());
        let (a, b) = (backward(&from_forward), backward(&recorded));
        assert_eq!(a, b, "dropout {dropout}");
        assert!(a.1.iter().any(|&v| v != 0.0));
    }
}

#[test]
fn dora_refuses_record() {
    let ctx = Ctx::cpu();
    let lora = LoraLinear::new(&ctx, LinearShape::new(8, 8), &spec(0.0, true), 1).unwrap();
    let x = randn(&ctx, &[2, 8], 1);
    let err = lora
        .record(&ctx, &x, &mut LoraSaved::new(), Mode::Eval)
        .unwrap_err();
    assert!(err.to_string().contains("run forward"), "{err}");
}
