//! Initialization (PEFT's rules) and merging into the base weight.
mod common;

use std::collections::BTreeMap;

use common::*;
use llmft_lora::{
    Adapter, InitLoraWeights, LinearShape, LoraConfig, LoraSaved, Mode, NamesOrPattern,
};
use llmft_tensor::ops::{self, Gemm};
use llmft_tensor::{Ctx, DType, Tensor};

fn adapter(init: InitLoraWeights, dora: bool, r: usize) -> Adapter {
    let shapes = BTreeMap::from([("m.proj".to_string(), LinearShape::new(64, 48))]);
    let c = LoraConfig {
        r,
        lora_alpha: 16.0,
        use_dora: dora,
        init_lora_weights: init,
        target_modules: Some(NamesOrPattern::Names(vec!["proj".into()])),
        ..LoraConfig::default()
    };
    Adapter::new(&Ctx::cpu(), &shapes, c, 3).unwrap()
}

#[test]
fn kaiming_and_gaussian_init() {
    let a = adapter(InitLoraWeights::Kaiming, false, 8);
    let l = &a.layers["m.proj"];
    let va = l.a.to_f32_vec().unwrap();
    let bound = 1.0 / 64f32.sqrt();
    assert!(va.iter().all(|v| v.abs() <= bound));
    assert!(va.iter().fold(0f32, |m, v| m.max(v.abs())) > 0.9 * bound);
    assert!(l.b.to_f32_vec().unwrap().iter().all(|&v| v == 0.0));

    let g = adapter(InitLoraWeights::Gaussian, false, 8);
    let va = g.layers["m.proj"].a.to_f32_vec().unwrap();
    let std = (va.iter().map(|v| (v * v) as f64).sum::<f64>() / va.len() as f64).sqrt();
    assert!((std - 1.0 / 8.0).abs() < 0.01, "std {std}");
    // Same seed, same init; another module name, another draw.
    let again = adapter(InitLoraWeights::Gaussian, false, 8);
    assert_eq!(va, again.layers["m.proj"].a.to_f32_vec().unwrap());
    let shapes = BTreeMap::from([("m.proj".to_string(), LinearShape::new(4, 4))]);
    let c = LoraConfig {
        init_lora_weights: InitLoraWeights::Other("pissa".into()),
        target_modules: Some(NamesOrPattern::Names(vec!["proj".into()])),
        ..LoraConfig::default()
    };
    let e = Adapter::new(&Ctx::cpu(), &shapes, c, 0).unwrap_err();
    assert!(e.to_string().contains("pissa"), "{e}");
}

#[test]
fn dora_starts_as_a_no_op() {
    let ctx = Ctx::cpu();
    let mut a = adapter(InitLoraWeights::Kaiming, true, 4);
    let mut g = SeedRng::new(1);
    let w = Tensor::from_slice(&ctx, &g.normals(48 * 64, 0.2), &[48, 64]).unwrap();
    a.init_magnitude(&ctx, "m.proj", &w).unwrap();
    let l = &a.layers["m.proj"];
    let wv = w.to_f32_vec().unwrap();
    let m = l.magnitude.as_ref().unwrap().to_f32_vec().unwrap();
    for (o, mo) in m.iter().enumerate() {
        let want = wv[o * 64..(o + 1) * 64]
            .iter()
            .map(|v| v * v)
            .sum::<f32>()
            .sqrt();
        assert!((mo - want).abs() < 1e-5 * want, "row {o}: {mo} vs {want}");
    }
    let x = Tensor::from_slice(&ctx, &g.normals(5 * 64, 1.0), &[5, 64]).unwrap();
    let mut y = Tensor::zeros(&ctx, DType::F32, &[5, 48]).unwrap();
    ops::gemm(&ctx, &x, &w, &mut y, Gemm::nt()).unwrap();
    let base = y.to_f32_vec().unwrap();
    l.forward(&ctx, &x, &w, &mut y, &mut LoraSaved::new(), Mode::Eval)
        .unwrap();
    assert!(rel_err(&y.to_f32_vec().unwrap(), &base, 0.0) < 1e-5);
}

/// A merged weight gives the adapted output of an eval forward.
#[test]
fn merge_matches_forward() {
    let ctx = Ctx::cpu();
    for (dora, dtype, tol) in [
        (false, DType::F32, 1e-5),
        (true, DType::F32, 1e-5),
        (true, DType::BF16, 2e-2),
    ] {
        let pr = Problem::random(21, 6, 13, 9, 3, false, dora, 0.0);
        let lora = pr.lora(&ctx, &pr.a, &pr.b, &pr.m);
        let w = Tensor::from_f32(&ctx, &pr.w, dtype, &[pr.o, pr.i]).unwrap();
        let x = Tensor::from_f32(&ctx, &pr.x, dtype, &[pr.n, pr.i]).unwrap();
        let mut y = Tensor::zeros(&ctx, dtype, &[pr.n, pr.o]).unwrap();
        ops::gemm(&ctx, &x, &w, &mut y, Gemm::nt()).unwrap();
        lora.forward(&ctx, &x, &w, &mut y, &mut LoraSaved::new(), Mode::Eval)
            .unwrap();

        let mut merged = Tensor::zeros(&ctx, dtype, &[pr.o, pr.i]).unwrap();
        merged.copy_from(&ctx, &w).unwrap();
        llmft_lora::merge_into(&ctx, &mut merged, &lora).unwrap();
        let mut ym = Tensor::zeros(&ctx, dtype, &[pr.n, pr.o]).unwrap();
        ops::gemm(&ctx, &x, &merged, &mut ym, Gemm::nt()).unwrap();
        let e = rel_err(&ym.to_f32_vec().unwrap(), &y.to_f32_vec().unwrap(), 0.0);
        assert!(
            e < tol,
            "dora {dora} {dtype}: merged output differs by {e:e}"
        );
    }
}

#[test]
fn shape_and_dtype_errors_are_reported() {
    let ctx = Ctx::cpu();
    let pr = Problem::random(2, 3, 5, 4, 2, false, true, 0.0);
    let lora = pr.lora(&ctx, &pr.a, &pr.b, &pr.m);
    let w = Tensor::zeros(&ctx, DType::F32, &[4, 5]).unwrap();
    let x = Tensor::zeros(&ctx, DType::F32, &[3, 6]).unwrap();
    let mut y = Tensor::zeros(&ctx, DType::F32, &[3, 4]).unwrap();
    let e = lora
        .forward(&ctx, &x, &w, &mut y, &mut LoraSaved::new(), Mode::Eval)
        .unwrap_err();
    assert!(e.to_string().contains("x has shape [3, 6]"), "{e}");
    let x = Tensor::zeros(&ctx, DType::BF16, &[3, 5]).unwrap();
    let e = lora
        .forward(&ctx, &x, &w, &mut y, &mut LoraSaved::new(), Mode::Eval)
        .unwrap_err();
    assert!(e.to_string().contains("dtype"), "{e}");
    let mut no_mag = pr.lora(&ctx, &pr.a, &pr.b, &pr.m);
    no_mag.magnitude = None;
    let x = Tensor::zeros(&ctx, DType::F32, &[3, 5]).unwrap();
    let e = no_mag
        .forward(&ctx, &x, &w, &mut y, &mut LoraSaved::new(), Mode::Eval)
        .unwrap_err();
    assert!(e.to_string().contains("init_magnitude"), "{e}");
}
