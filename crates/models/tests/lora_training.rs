//! New adapters on a quantized base: a fresh LoRA/DoRA adapter is a no-op
//! (B = 0), its first backward gives gradients to B only, and dropout masks
//! are reproducible under gradient checkpointing.
use std::path::Path;

use llmft_lora::LoraConfig;
use llmft_models::{Grads, Model, ModelBatch, QuantConfig};
use llmft_tensor::{Ctx, DType};

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

#[test]
fn fresh_adapters_on_nf4_base() {
    let ctx = Ctx::cpu();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join("qwen3");
    for json in [
        r#"{"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}"#,
        r#"{"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "use_dora": true, "target_modules": ["q_proj", "v_proj", "down_proj"]}"#,
    ] {
        let cfg: LoraConfig = serde_json::from_str(json).unwrap();
        let mut model =
            Model::from_dir_quantized(&dir, &ctx, DType::F32, Some(&QuantConfig::nf4())).unwrap();
        let ids: Vec<i32> = (0..16).map(|i| (i * 11 + 3) % 96).collect();
        let mut batch = ModelBatch::from_host(&ctx, 2, 8, &ids, None, None, None).unwrap();
        let before = model.logits(&batch).unwrap().to_f32_vec().unwrap();
        let adapter = model.new_adapter(cfg, 42).unwrap();
        let n_layers = adapter.layers.len();
        model.attach_adapter(adapter);
        let after = model.logits(&batch).unwrap().to_f32_vec().unwrap();
        assert!(
            rel_l2(&after, &before) < 1e-6,
            "{json}: a fresh adapter changed the output"
        );

        batch.dropout_seed = Some(9);
        let mut g1 = Grads::for_adapter(&model).unwrap();
        let l1 = model.forward_backward(&batch, None, Some(&mut g1)).unwrap();
        model.checkpointing = true;
        let mut g2 = Grads::for_adapter(&model).unwrap();
        let l2 = model.forward_backward(&batch, None, Some(&mut g2)).unwrap();
        assert_eq!(l1.loss, l2.loss);
        assert_eq!(g1.lora_all().len(), n_layers);
        for (name, g) in g1.lora_all() {
            let a = g.a.to_f32_vec().unwrap();
            let b = g.b.to_f32_vec().unwrap();
            assert!(
                a.iter().all(|v| *v == 0.0),
                "{name}: dA must be 0 while B = 0"
            );
            assert!(b.iter().any(|v| *v != 0.0), "{name}: dB is all zero");
            let b2 = g2.lora(name).unwrap().b.to_f32_vec().unwrap();
            assert_eq!(
                b, b2,
                "{name}: checkpointing must redraw the same dropout mask"
            );
        }
    }
}
