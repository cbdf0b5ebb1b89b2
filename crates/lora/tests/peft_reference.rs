//! Against PEFT itself: `scripts/fixtures/lora_make_fixtures.py` (peft +
//! torch, run on the GPU machine) saves, for one `nn.Linear(24 → 20)` with a
//! bias and LoRA r = 4 (plain, rsLoRA, DoRA), the base weight, the adapter in
//! PEFT's format, an input, an upstream gradient, PEFT's output and its
//! gradients (dx, dA, dB, dm). This test loads the adapter with
//! `Adapter::load`, runs the crate's forward/backward as a model would (bias
//! added after the adapter) and compares. It is skipped only while the
//! fixture file has not been generated yet.
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::rel_err;
use llmft_lora::{Adapter, LinearShape, LoraGrads, LoraSaved, Mode};
use llmft_tensor::ops::{self, Gemm};
use llmft_tensor::{Ctx, DType, Tensor};
use safetensors::SafeTensors;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn get(st: &SafeTensors<'_>, key: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st
        .tensor(key)
        .unwrap_or_else(|_| panic!("fixture key {key} missing"));
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{key}");
    let v = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (t.shape().to_vec(), v)
}

#[test]
fn matches_peft() {
    let file = fixtures().join("lora_peft_linear.safetensors");
    if !file.exists() {
        eprintln!(
            "peft_reference: {} does not exist yet; run scripts/fixtures/lora_make_fixtures.py \
             (peft + torch) to generate it. Skipped.",
            file.display()
        );
        return;
    }
    let bytes = std::fs::read(&file).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ctx = Ctx::cpu();
    for case in ["lora", "rslora", "dora"] {
        let t = |k: &str| {
            let (s, v) = get(&st, &format!("{case}.{k}"));
            (Tensor::from_slice(&ctx, &v, &s).unwrap(), v)
        };
        let (w, _) = t("weight");
        let (_, bias_v) = t("bias");
        let (x, _) = t("x");
        let (dy, _) = t("dy");
        let (o, i) = (w.shape()[0], w.shape()[1]);
        let n = x.numel() / i;
        let x = x.reshape(&[n, i]).unwrap();
        let dy = dy.reshape(&[n, o]).unwrap();

        let shapes = BTreeMap::from([("proj".to_string(), LinearShape::new(i, o))]);
        let adapter = Adapter::load(&ctx, &fixtures().join(format!("lora_peft_{case}")), &shapes)
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        let lora = &adapter.layers["proj"];

        let mut y = Tensor::zeros(&ctx, DType::F32, &[n, o]).unwrap();
        ops::gemm(&ctx, &x, &w, &mut y, Gemm::nt()).unwrap();
        let mut saved = LoraSaved::new();
        lora.forward(&ctx, &x, &w, &mut y, &mut saved, Mode::Train { seed: 0 })
            .unwrap();
        let mut yv = y.to_f32_vec().unwrap();
        for (k, v) in yv.iter_mut().enumerate() {
            *v += bias_v[k % o];
        }
        let mut dx = Tensor::zeros(&ctx, DType::F32, &[n, i]).unwrap();
        ops::gemm(&ctx, &dy, &w, &mut dx, Gemm::default()).unwrap();
        let mut grads = LoraGrads::zeros(&ctx, lora).unwrap();
        lora.backward(&ctx, &x, &w, &dy, &saved, &mut dx, &mut grads)
            .unwrap();

        let check = |what: &str, got: &[f32], key: &str, tol: f64| {
            let (_, want) = get(&st, &format!("{case}.{key}"));
            let e = rel_err(got, &want, 1e-6);
            assert!(e <= tol, "{case} {what}: differs from PEFT by {e:e}");
        };
        check("y", &yv, "y", 1e-5);
        check("dx", &dx.to_f32_vec().unwrap(), "dx", 1e-5);
        check("dA", &grads.a.to_f32_vec().unwrap(), "lora_A.grad", 1e-4);
        check("dB", &grads.b.to_f32_vec().unwrap(), "lora_B.grad", 1e-4);
        if let Some(dm) = &grads.magnitude {
            check(
                "dm",
                &dm.to_f32_vec().unwrap(),
                "lora_magnitude_vector.grad",
                1e-4,
            );
        }
    }
}
