//! Every gradient-checkpointing mode gives the gradients of the plain
//! backward, bit for bit: full recompute, recompute with the attention
//! output kept from the forward (`checkpoint_keep_attention`), and some
//! layers not checkpointed (`checkpoint_skip_layers`), no dequantized-weight
//! cache (`checkpoint_cache_dequantized` off), and the checkpointed records
//! offloaded to host memory (`offload_activations`). On CUDA the model has
//! head dim 64, so the fused attention runs (its kept output and
//! log-sum-exp are what the recompute reuses) and the NF4 base weights are
//! dequantized once for a layer's recompute and backward.
use llmft_lora::LoraConfig;
use llmft_models::{Grads, Model, ModelBatch, ModelConfig, QuantConfig};
use llmft_tensor::testing::gpu;
use llmft_tensor::{ops, Ctx, DType};

/// A 3-layer Llama with 4 query heads of 64, 2 kv heads, NF4 decoder
/// linears and a LoRA adapter on every linear whose B is random (so every
/// A and B gets a non-zero gradient).
fn model(ctx: &Ctx, dtype: DType) -> Model {
    let mut cfg = ModelConfig::preset("llama3-8b").unwrap();
    cfg.vocab_size = 512;
    cfg.hidden_size = 256;
    cfg.intermediate_size = 512;
    cfg.num_layers = 3;
    cfg.num_heads = 4;
    cfg.num_kv_heads = 2;
    cfg.head_dim = 64;
    let mut model = Model::random_quantized(cfg, ctx, dtype, 5, Some(&QuantConfig::nf4())).unwrap();
    let lora: LoraConfig = serde_json::from_str(
        r#"{"r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": "all-linear"}"#,
    )
    .unwrap();
    let mut adapter = model.new_adapter(lora, 7).unwrap();
    for (i, l) in adapter.layers.values_mut().enumerate() {
        ops::fill_uniform(ctx, &mut l.b, 100 + i as u64, -0.05, 0.05).unwrap();
    }
    model.attach_adapter(adapter);
    model
}

/// Each adapted linear's name, dA and dB.
type AdapterGrads = Vec<(String, Vec<f32>, Vec<f32>)>;

fn grads(model: &Model, batch: &ModelBatch) -> (f64, AdapterGrads) {
    let mut g = Grads::for_adapter(model).unwrap();
    let stats = model.forward_backward(batch, None, Some(&mut g)).unwrap();
    let all = g
        .lora_all()
        .iter()
        .map(|(n, l)| {
            (
                n.clone(),
                l.a.to_f32_vec().unwrap(),
                l.b.to_f32_vec().unwrap(),
            )
        })
        .collect();
    (stats.loss, all)
}

fn check(ctx: &Ctx, dtype: DType, seq: usize) {
    let mut model = model(ctx, dtype);
    let b = 2;
    let ids: Vec<i32> = (0..b * seq).map(|i| ((i * 37 + 11) % 512) as i32).collect();
    let mut batch = ModelBatch::from_host(ctx, b, seq, &ids, None, None, None).unwrap();
    batch.dropout_seed = Some(3);
    let (l0, g0) = grads(&model, &batch);
    assert!(
        g0.iter()
            .all(|(_, a, b)| a.iter().any(|v| *v != 0.0) && b.iter().any(|v| *v != 0.0)),
        "every adapter weight should get a non-zero gradient"
    );
    model.checkpointing = true;
    for (keep, skip, cache, stash) in [
        (false, 0, true, false),
        (true, 0, true, false),
        (true, 2, true, false),
        (false, 1, true, false),
        (true, 3, true, false),
        (true, 0, false, false),
        (true, 1, true, true),
        (false, 0, false, true),
    ] {
        model.checkpoint_keep_attention = keep;
        model.checkpoint_skip_layers = skip;
        model.checkpoint_cache_dequantized = cache;
        model.offload_activations = stash;
        let (l, g) = grads(&model, &batch);
        let mode = format!(
            "{dtype} seq {seq}: keep_attention={keep} skip_layers={skip} \
             cache_dequantized={cache} offload_activations={stash}"
        );
        assert_eq!(l, l0, "{mode}: loss");
        for ((name, a0, b0), (_, a, b)) in g0.iter().zip(&g) {
            assert_eq!(a, a0, "{mode}: {name} dA");
            assert_eq!(b, b0, "{mode}: {name} dB");
        }
    }
}

#[test]
fn checkpointing_modes_give_the_plain_gradients_on_the_cpu() {
    check(&Ctx::cpu(), DType::F32, 24);
}

#[test]
fn checkpointing_modes_give_the_plain_gradients_on_cuda() {
    let Some(ctx) = gpu() else { return };
    for seq in [200, 1030] {
        check(&ctx, DType::BF16, seq);
    }
}
