//! Quantized bases (NF4, int8, HQQ) computed through the model equal a dense
//! model holding the dequantized weights; quantization error stays small.
use std::path::Path;

use llmft_models::{is_quantizable, Grads, Model, ModelBatch, QuantConfig, Unit};
use llmft_tensor::{Ctx, DType};

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn quantized_model_equals_dense_model_of_dequantized_weights() {
    let ctx = Ctx::cpu();
    for kind in ["llama3", "qwen2", "qwen3"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures")
            .join(kind);
        for (label, cfg) in [
            ("nf4", QuantConfig::nf4()),
            ("nf4-dq", QuantConfig::nf4_double_quant()),
            ("int8", QuantConfig::int8()),
            ("hqq4", QuantConfig::hqq(4)),
        ] {
            let q = Model::from_dir_quantized(&dir, &ctx, DType::F32, Some(&cfg)).unwrap();
            let dense = Model::from_dir(&dir, &ctx, DType::F32).unwrap();
            let original = Model::from_dir(&dir, &ctx, DType::F32).unwrap();
            let mut n_quant = 0;
            for u in 1..=q.config.num_layers {
                let (qu, du) = {
                    let u = Unit::from_index(u, q.config.num_units());
                    (q.unit(u).unwrap(), dense.unit(u).unwrap())
                };
                for (name, _) in q.config.unit_tensors(u) {
                    if is_quantizable(&name) {
                        let qt = qu.quantized(&name).expect("quantized");
                        let mut dst = du.get(&name).unwrap();
                        qt.dequantize(&ctx, &mut dst).unwrap();
                        n_quant += 1;
                    }
                }
            }
            assert_eq!(n_quant, 7 * q.config.num_layers, "{kind}");
            let ids: Vec<i32> = (0..16).map(|i| (i * 13 + 5) % 96).collect();
            let batch = ModelBatch::from_host(&ctx, 2, 8, &ids, None, None, None).unwrap();
            let lq = q.logits(&batch).unwrap().to_f32_vec().unwrap();
            let ld = dense.logits(&batch).unwrap().to_f32_vec().unwrap();
            let lo = original.logits(&batch).unwrap().to_f32_vec().unwrap();
            let same = rel_l2(&lq, &ld);
            let err = rel_l2(&lq, &lo);
            eprintln!("RESULT model={kind} base={label} vs_dequantized_dense={same:.2e} vs_original={err:.2e}");
            assert!(same < 1e-6, "{kind} {label}: {same:.2e}");
            // 4-bit weights carry ~10% relative error each; int8 ~0.5%.
            let bound = if label == "int8" { 0.03 } else { 0.5 };
            assert!(
                err < bound,
                "{kind} {label}: quantization moved logits by {err:.2e}"
            );
            // Backward runs through the quantized base too.
            let mut g = Grads::default();
            g.track(&ctx, "embed_output", &[16, q.config.hidden_size])
                .unwrap();
            let s = q.forward_backward(&batch, None, Some(&mut g)).unwrap();
            assert!(s.loss.is_finite());
            assert!(g
                .get("embed_output")
                .unwrap()
                .to_f32_vec()
                .unwrap()
                .iter()
                .any(|v| *v != 0.0));
        }
    }
}

/// A checkpoint holding bitsandbytes-format weights (as transformers writes a
/// `load_in_4bit` model) loads as it is and computes like quantize-at-load.
#[test]
fn prequantized_bnb_checkpoint_loads_as_is() {
    use llmft_quant::io::{bnb_state_dict, write_safetensors, RawTensor};
    use safetensors::Dtype as St;
    let ctx = Ctx::cpu();
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join("llama3");
    for (label, cfg) in [
        ("nf4-dq", QuantConfig::nf4_double_quant()),
        ("int8", QuantConfig::int8()),
    ] {
        let q = Model::from_dir_quantized(&src, &ctx, DType::F32, Some(&cfg)).unwrap();
        let mut tensors: Vec<(String, RawTensor)> = Vec::new();
        for u in 0..q.config.num_units() {
            let unit = q.unit(Unit::from_index(u, q.config.num_units())).unwrap();
            for (name, shape) in q.config.unit_tensors(u) {
                match unit.quantized(&name) {
                    Some(qt) => tensors.extend(bnb_state_dict(&name, qt).unwrap()),
                    None => {
                        let t = unit.get(&name).unwrap();
                        tensors.push((
                            name,
                            RawTensor {
                                dtype: St::F32,
                                shape,
                                data: t.as_bytes().unwrap().to_vec(),
                            },
                        ));
                    }
                }
            }
        }
        let dir =
            std::env::temp_dir().join(format!("llmft-bnb-ckpt-{label}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
        write_safetensors(&dir.join("model.safetensors"), &tensors).unwrap();
        let loaded = Model::from_dir(&dir, &ctx, DType::F32).unwrap();
        let u1 = loaded.unit(Unit::Layer(0)).unwrap();
        assert!(
            u1.quantized("model.layers.0.self_attn.q_proj.weight")
                .is_some(),
            "{label}: loaded quantized"
        );
        let ids: Vec<i32> = (0..16).map(|i| (i * 5 + 1) % 96).collect();
        let batch = ModelBatch::from_host(&ctx, 2, 8, &ids, None, None, None).unwrap();
        let a = q.logits(&batch).unwrap().to_f32_vec().unwrap();
        let b = loaded.logits(&batch).unwrap().to_f32_vec().unwrap();
        assert!(rel_l2(&b, &a) < 1e-6, "{label}: {}", rel_l2(&b, &a));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
