//! LoRA / rsLoRA / DoRA on all linears of the tiny Llama-3, Qwen2 and Qwen3
//! models against PEFT (fixtures from
//! scripts/fixtures/lora_models_make_fixtures.py): llmft loads PEFT's adapter
//! unchanged and reproduces its logits and every adapter gradient. With
//! `LLMFT_LORA_EXPORT_DIR` set, llmft also saves each adapter there so the
//! same script can check that PEFT loads llmft's files.
use std::path::{Path, PathBuf};

use llmft_lora::Adapter;
use llmft_models::{Grads, Model, ModelBatch};
use llmft_tensor::testing::gpu;
use llmft_tensor::{Ctx, DType};
use safetensors::SafeTensors;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn floats(bytes: &[u8], name: &str) -> Vec<f32> {
    let st = SafeTensors::deserialize(bytes).unwrap();
    let t = st
        .tensor(name)
        .unwrap_or_else(|_| panic!("fixture has no {name}"));
    t.data()
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn ints(bytes: &[u8], name: &str) -> Vec<i32> {
    let st = SafeTensors::deserialize(bytes).unwrap();
    st.tensor(name)
        .unwrap()
        .data()
        .chunks(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

fn check(ctx: &Ctx, kind: &str, variant: &str) -> (f64, f64) {
    let model_dir = root().join("fixtures").join(kind);
    let lora_dir = root()
        .join("../lora/fixtures/models")
        .join(format!("{kind}-{variant}"));
    assert!(
        lora_dir.join("reference.safetensors").is_file(),
        "missing fixture {}: run scripts/fixtures/lora_models_make_fixtures.py",
        lora_dir.display()
    );
    let mut model = Model::from_dir(&model_dir, ctx, DType::F32).unwrap();
    let adapter = Adapter::load(ctx, &lora_dir, &model.linear_shapes()).unwrap();
    assert_eq!(
        adapter.layers.len(),
        7 * model.config.num_layers,
        "{kind}-{variant}: all linears adapted"
    );
    if let Ok(out) = std::env::var("LLMFT_LORA_EXPORT_DIR") {
        adapter
            .save(
                &Path::new(&out).join(format!("{kind}-{variant}")),
                DType::F32,
            )
            .unwrap();
    }
    model.attach_adapter(adapter);
    let mref = std::fs::read(model_dir.join("reference.safetensors")).unwrap();
    let lref = std::fs::read(lora_dir.join("reference.safetensors")).unwrap();
    let (ids, targets) = (ints(&mref, "ids"), ints(&mref, "targets"));
    let batch =
        ModelBatch::from_host(ctx, 2, ids.len() / 2, &ids, Some(&targets), None, None).unwrap();
    let logits = model.logits(&batch).unwrap().to_f32_vec().unwrap();
    let e_logits = rel_l2(&logits, &floats(&lref, "logits"));

    let mut grads = Grads::for_adapter(&model).unwrap();
    model
        .forward_backward(&batch, None, Some(&mut grads))
        .unwrap();
    let mut worst: f64 = 0.0;
    for (module, g) in grads.lora_all() {
        let mut parts = vec![("lora_A", &g.a), ("lora_B", &g.b)];
        if let Some(m) = &g.magnitude {
            parts.push(("lora_magnitude_vector", m));
        }
        for (part, t) in parts {
            let want = floats(&lref, &format!("grad.{module}.{part}"));
            let e = rel_l2(&t.to_f32_vec().unwrap(), &want);
            assert!(
                e <= 1e-3,
                "{kind}-{variant} {module}.{part}: gradient rel. L2 {e:.2e} > 1e-3"
            );
            worst = worst.max(e);
        }
    }
    eprintln!("RESULT lora model={kind} variant={variant} device={} logits_rel_l2={e_logits:.2e} worst_grad_rel_l2={worst:.2e}", ctx.device());
    (e_logits, worst)
}

#[test]
fn cpu_f32_matches_peft() {
    let ctx = Ctx::cpu();
    for kind in ["llama3", "qwen2", "qwen3"] {
        for variant in ["lora", "rslora", "dora"] {
            let (el, _) = check(&ctx, kind, variant);
            assert!(
                el <= 1e-4,
                "{kind}-{variant}: logits rel. L2 {el:.2e} > 1e-4"
            );
        }
    }
}

#[test]
fn cuda_f32_matches_peft() {
    let Some(ctx) = gpu() else { return };
    for kind in ["llama3", "qwen2", "qwen3"] {
        for variant in ["lora", "rslora", "dora"] {
            let (el, _) = check(&ctx, kind, variant);
            assert!(
                el <= 1e-4,
                "{kind}-{variant}: CUDA logits rel. L2 {el:.2e} > 1e-4"
            );
        }
    }
}

/// A merged export (sharded HF safetensors) reloads as a plain model with the
/// adapted model's logits. With `LLMFT_MERGED_EXPORT_DIR` set, exports are
/// also written there for transformers to check (same fixture script).
#[test]
fn merged_export_reloads_with_the_same_logits() {
    let ctx = Ctx::cpu();
    for kind in ["llama3", "qwen2", "qwen3"] {
        for variant in ["lora", "rslora", "dora"] {
            let model_dir = root().join("fixtures").join(kind);
            let lora_dir = root()
                .join("../lora/fixtures/models")
                .join(format!("{kind}-{variant}"));
            let mut model = Model::from_dir(&model_dir, &ctx, DType::F32).unwrap();
            let adapter = Adapter::load(&ctx, &lora_dir, &model.linear_shapes()).unwrap();
            model.attach_adapter(adapter);
            let out = std::env::temp_dir().join(format!(
                "llmft-merged-{kind}-{variant}-{}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&out);
            model.export_merged(&out, DType::F32, 64 << 10).unwrap();
            assert!(
                out.join("model.safetensors.index.json").is_file(),
                "sharded export"
            );
            let e = model
                .export_merged(&out, DType::F32, 64 << 10)
                .unwrap_err()
                .to_string();
            assert!(e.contains("already exists"), "{e}");
            let merged = Model::from_dir(&out, &ctx, DType::F32).unwrap();
            let mref = std::fs::read(model_dir.join("reference.safetensors")).unwrap();
            let ids = ints(&mref, "ids");
            let batch =
                ModelBatch::from_host(&ctx, 2, ids.len() / 2, &ids, None, None, None).unwrap();
            let a = model.logits(&batch).unwrap().to_f32_vec().unwrap();
            let m = merged.logits(&batch).unwrap().to_f32_vec().unwrap();
            let e = rel_l2(&m, &a);
            assert!(e <= 1e-5, "{kind}-{variant}: merged logits rel. L2 {e:.2e}");
            if let Ok(dir) = std::env::var("LLMFT_MERGED_EXPORT_DIR") {
                let dst = Path::new(&dir).join(format!("{kind}-{variant}"));
                let _ = std::fs::remove_dir_all(&dst);
                model.export_merged(&dst, DType::F32, 64 << 10).unwrap();
            }
            std::fs::remove_dir_all(&out).unwrap();
        }
    }
}
