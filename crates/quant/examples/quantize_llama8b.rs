//! Times quantizing every linear weight of a Llama-3.1-8B-shaped model
//! (32 layers × q, k, v, o, gate, up, down; hidden 4096, intermediate
//! 14336, 32 heads, 8 KV heads, head dim 128) on the GPU, tensor by tensor,
//! to NF4 (double quant), HQQ-4 (g64, solver) and int8.
//!   cargo run --release -p llmft-quant --example quantize_llama8b
use std::time::Instant;

use llmft_quant::{QuantConfig, QuantizedTensor};
use llmft_tensor::{ops, Ctx, DType, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if llmft_tensor::cuda_device_count() == 0 {
        eprintln!("skipped: no CUDA GPU");
        return Ok(());
    }
    let ctx = Ctx::cuda(0)?;
    let (h, i, kv) = (4096usize, 14336usize, 8 * 128usize);
    let shapes = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)];
    // One random bf16 weight per distinct shape, reused for every layer: the
    // timing covers quantization only (a loader streams each tensor in).
    let weights: Vec<Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(s, &(r, c))| {
            let mut w = Tensor::zeros(&ctx, DType::BF16, &[r, c])?;
            ops::fill_normal(&ctx, &mut w, s as u64, 0.0, 0.02)?;
            Ok(w)
        })
        .collect::<Result<_, llmft_tensor::Error>>()?;
    let params: usize = 32 * shapes.iter().map(|(r, c)| r * c).sum::<usize>();
    for (name, cfg) in [
        ("nf4 (double quant)", QuantConfig::nf4_double_quant()),
        ("hqq 4-bit g64 (solver)", QuantConfig::hqq(4)),
        ("int8", QuantConfig::int8()),
    ] {
        // Warm-up: compiles the kernels.
        QuantizedTensor::quantize(&ctx, &weights[1], &cfg)?;
        ctx.synchronize()?;
        let t = Instant::now();
        let mut bytes = 0usize;
        for _layer in 0..32 {
            for w in &weights {
                let q = QuantizedTensor::quantize(&ctx, w, &cfg)?;
                bytes += q.bytes();
            }
        }
        ctx.synchronize()?;
        let s = t.elapsed().as_secs_f64();
        println!(
            "RESULT quantize_llama8b {name}: {} weights, {:.2} G params -> {:.2} GB, {:.3} s",
            32 * shapes.len(),
            params as f64 / 1e9,
            bytes as f64 / 1e9,
            s
        );
    }
    Ok(())
}
