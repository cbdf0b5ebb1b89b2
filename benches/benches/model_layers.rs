//! Per-layer forward/backward time and peak GPU memory of a random model of a
//! real shape at a given sequence length, with gradient checkpointing (the
//! backward recomputes the layer's forward). Prints one JSON line per run.
//!
//! ```sh
//! cargo bench -p llmft-benches --bench model_layers -- [preset] [layers] [seq] [batch] [base]
//! ```
//! Defaults: llama3-8b, 4 layers, seq 2048, batch 1, base nf4 (also: bf16,
//! nf4-dq, int8, hqq4). Needs a GPU (skips otherwise).
use std::time::Instant;

use llmft_models::{Model, ModelBatch, ModelConfig, QuantConfig};
use llmft_tensor::{Ctx, DType, Tensor};

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let preset = args.first().map(String::as_str).unwrap_or("llama3-8b");
    let layers: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(4);
    let seq: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2048);
    let bsz: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1);
    let base = args.get(4).map(String::as_str).unwrap_or("nf4");
    let quant = match base {
        "bf16" => None,
        "nf4" => Some(QuantConfig::nf4()),
        "nf4-dq" => Some(QuantConfig::nf4_double_quant()),
        "int8" => Some(QuantConfig::int8()),
        "hqq4" => Some(QuantConfig::hqq(4)),
        other => panic!("unknown base `{other}` (bf16, nf4, nf4-dq, int8, hqq4)"),
    };
    let ctx = match Ctx::cuda(0) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("skipping model_layers: {e}");
            return;
        }
    };
    let mut cfg = ModelConfig::preset(preset).expect("preset");
    cfg.num_layers = layers;
    let t_init = Instant::now();
    let mut model =
        Model::random_quantized(cfg.clone(), &ctx, DType::BF16, 0, quant.as_ref()).expect("model");
    ctx.synchronize().unwrap();
    let init_s = t_init.elapsed().as_secs_f64();
    model.checkpointing = true;
    let n = seq * bsz;
    let ids: Vec<i32> = (0..n)
        .map(|i| ((i * 7919) % cfg.vocab_size) as i32)
        .collect();
    let batch = ModelBatch::from_host(&ctx, bsz, seq, &ids, None, None, None).expect("batch");
    let alloc = ctx.cuda_ctx().unwrap().allocator().clone();

    let mut x = Tensor::zeros(&ctx, DType::BF16, &[n, cfg.hidden_size]).unwrap();
    llmft_tensor::ops::fill_normal(&ctx, &mut x, 1, 0.0, 1.0).unwrap();
    let dy = x.clone();
    let time = |f: &mut dyn FnMut()| {
        f(); // warm-up (kernel compilation, cuBLASLt heuristics)
        ctx.synchronize().unwrap();
        let reps = 10;
        let t0 = Instant::now();
        for _ in 0..reps {
            f();
        }
        ctx.synchronize().unwrap();
        t0.elapsed().as_secs_f64() * 1e3 / reps as f64
    };
    let fwd_ms = time(&mut || {
        model.forward_layer(0, &x, &batch).unwrap();
    });
    let bwd_ms = time(&mut || {
        model.backward_layer(0, &x, &dy, &batch, None).unwrap();
    });
    ctx.synchronize().unwrap();
    alloc.reset_peak();
    let weights_bytes = alloc.stats().in_use;
    let t0 = Instant::now();
    let loss = model.forward_backward(&batch, None, None).unwrap();
    ctx.synchronize().unwrap();
    let step_ms = t0.elapsed().as_secs_f64() * 1e3;
    let st = alloc.stats();
    let json = serde_json::json!({
        "preset": preset, "layers": layers, "seq": seq, "batch": bsz, "dtype": "bf16",
        "base": base, "checkpointing": true, "init_and_quantize_s": init_s,
        "layer_forward_ms": fwd_ms, "layer_backward_ms_with_recompute": bwd_ms,
        "step_ms": step_ms, "loss": loss.loss,
        "peak_gib": st.peak_in_use as f64 / (1u64 << 30) as f64,
        "weights_gib": weights_bytes as f64 / (1u64 << 30) as f64,
        "device": ctx.cuda_ctx().unwrap().name(),
    });
    println!("{json}");
}
