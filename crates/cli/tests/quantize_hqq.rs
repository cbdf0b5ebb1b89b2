//! `llmft quantize` to hqq4 / hqq3 / hqq2 writes hqq's `HQQLinear` keys and
//! transformers' `quantization_config`; llmft loads the folder as it is, with
//! the logits of quantizing while loading. With `LLMFT_HQQ_EXPORT_DIR` set,
//! each folder is copied there with `reference.safetensors` (ids, llmft's
//! logits and dequantized weights) for scripts/fixtures/hqq_load_check.py.
mod common;

use common::{llmft, root, scratch};
use llmft_models::{Model, ModelBatch, QuantConfig};
use llmft_quant::io::{write_safetensors, RawTensor};
use llmft_tensor::{Ctx, DType};

/// The tiny Llama 3 fixture with the Llama 3 tokenizer beside it.
fn model_dir(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    let m = root().join("crates/models/fixtures/llama3");
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(m.join(f), dir.join(f)).unwrap();
    }
    let t = root().join("crates/data/fixtures/chat/llama3");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(t.join(f), dir.join(f)).unwrap();
    }
}

fn f32_raw(shape: &[usize], v: &[f32]) -> RawTensor {
    RawTensor {
        dtype: safetensors::Dtype::F32,
        shape: shape.to_vec(),
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

#[test]
fn quantize_writes_an_hqq_checkpoint_that_loads_as_is() {
    let base = scratch("quantize-hqq");
    let src = base.join("src");
    model_dir(&src);
    let ctx = Ctx::cpu();
    let ids: Vec<i32> = (0..12).map(|i| (i * 7 + 3) % 96).collect();
    let batch = ModelBatch::from_host(&ctx, 1, ids.len(), &ids, None, None, None).unwrap();
    for nbits in [4u32, 3, 2] {
        let name = format!("hqq{nbits}");
        let out = base.join(&name);
        let (code, _, err) = llmft(&[
            "quantize",
            "--out",
            out.to_str().unwrap(),
            "--set",
            &format!("model.path={}", src.display()),
            "--set",
            &format!("model.quant={name}"),
            "--set",
            "model.dtype=f32",
            "--set",
            "model.device=cpu",
        ]);
        assert_eq!(code, 0, "{name}: {err}");
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ] {
            assert!(out.join(f).is_file(), "{name}: {f} copied");
        }

        // config.json: transformers' HqqConfig block.
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        let qc = &cfg["quantization_config"];
        assert_eq!(qc["quant_method"], "hqq");
        assert_eq!(qc["skip_modules"], serde_json::json!(["lm_head"]));
        let wqp = &qc["quant_config"]["weight_quant_params"];
        assert_eq!(wqp["nbits"], nbits);
        assert_eq!(wqp["group_size"], 64);
        assert_eq!(wqp["axis"], 1);
        assert_eq!(wqp["round_zero"], nbits == 4);
        assert!(qc["quant_config"]["scale_quant_params"].is_null());

        // The file: hqq modules instead of the decoder's dense weights.
        let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let q = "model.layers.0.self_attn.q_proj.";
        assert!(st.tensor(&format!("{q}W_q")).is_ok());
        assert!(st.tensor(&format!("{q}weight")).is_err());
        assert!(st.tensor("lm_head.weight").is_ok());

        // Loaded as it is == quantized while loading.
        let direct =
            Model::from_dir_quantized(&src, &ctx, DType::F32, Some(&QuantConfig::hqq(nbits)))
                .unwrap();
        let loaded = Model::from_dir(&out, &ctx, DType::F32).unwrap();
        let (x, y) = (
            direct.logits(&batch).unwrap().to_f32_vec().unwrap(),
            loaded.logits(&batch).unwrap().to_f32_vec().unwrap(),
        );
        assert_eq!(x, y, "{name}: logits");
        let mut reference = vec![
            (
                "ids".to_string(),
                RawTensor {
                    dtype: safetensors::Dtype::I32,
                    shape: vec![1, ids.len()],
                    data: ids.iter().flat_map(|v| v.to_le_bytes()).collect(),
                },
            ),
            ("logits".to_string(), f32_raw(&[1, ids.len(), 96], &y)),
        ];
        let mut quantized = 0;
        for u in 0..loaded.config.num_units() {
            let (a, b) = {
                let u = llmft_models::Unit::from_index(u, loaded.config.num_units());
                (direct.unit(u).unwrap(), loaded.unit(u).unwrap())
            };
            for (w, shape) in loaded.config.unit_tensors(u) {
                let Some(qb) = b.quantized(&w) else { continue };
                let qa = a.quantized(&w).expect("quantized in both");
                assert_eq!(qa.config(), qb.config(), "{name}: {w}");
                let (da, db) = (
                    qa.dequantize_f32_host().unwrap(),
                    qb.dequantize_f32_host().unwrap(),
                );
                assert_eq!(da, db, "{name}: {w}");
                reference.push((w.clone(), f32_raw(&shape, &db)));
                quantized += 1;
            }
        }
        assert_eq!(quantized, 7 * loaded.config.num_layers, "{name}");

        if let Ok(dir) = std::env::var("LLMFT_HQQ_EXPORT_DIR") {
            let dst = std::path::Path::new(&dir).join(&name);
            let _ = std::fs::remove_dir_all(&dst);
            std::fs::create_dir_all(&dst).unwrap();
            for e in std::fs::read_dir(&out).unwrap() {
                let p = e.unwrap().path();
                std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
            }
            write_safetensors(&dst.join("reference.safetensors"), &reference).unwrap();
        }
    }

    let (code, _, err) = llmft(&[
        "quantize",
        "--out",
        base.join("never").to_str().unwrap(),
        "--set",
        "model.quant=none",
        "--set",
        &format!("model.path={}", src.display()),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("hqq (hqq4, hqq3, hqq2)"), "{err}");
    assert!(!base.join("never").exists());
    std::fs::remove_dir_all(&base).unwrap();
}
