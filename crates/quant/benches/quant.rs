//! Dequantize an 8192×28672 weight (NF4, NF4 double quant, HQQ-4 g64, int8)
//! to bf16 on CUDA, and smaller ones on the CPU. Throughput counts bytes
//! read (packed data + statistics) and written (bf16 output).
//!   cargo bench -p llmft-quant --bench quant            # CPU parts skip with LLMFT_BENCH_SKIP_CPU=1
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use llmft_quant::{QuantConfig, QuantizedTensor};
use llmft_tensor::{ops, Ctx, DType, Tensor};

fn weight(ctx: &Ctx, rows: usize, cols: usize) -> Tensor {
    let mut w = Tensor::zeros(ctx, DType::BF16, &[rows, cols]).unwrap();
    ops::fill_normal(ctx, &mut w, 7, 0.0, 0.02).unwrap();
    w
}

fn formats() -> Vec<(&'static str, QuantConfig)> {
    vec![
        ("nf4", QuantConfig::nf4()),
        ("nf4_dq", QuantConfig::nf4_double_quant()),
        ("hqq4_g64", QuantConfig::hqq(4)),
        ("int8", QuantConfig::int8()),
    ]
}

fn dequant_group(c: &mut Criterion, ctx: &Ctx, name: &str, rows: usize, cols: usize) {
    let w = weight(ctx, rows, cols);
    let mut g = c.benchmark_group(name);
    g.sample_size(20).measurement_time(Duration::from_secs(3));
    for (fmt, cfg) in formats() {
        let q = QuantizedTensor::quantize(ctx, &w, &cfg).unwrap();
        let mut out = Tensor::zeros(ctx, DType::BF16, &[rows, cols]).unwrap();
        g.throughput(Throughput::Bytes((q.bytes() + out.bytes()) as u64));
        g.bench_function(format!("dequant_{fmt}_{rows}x{cols}"), |b| {
            b.iter_custom(|iters| {
                ctx.synchronize().unwrap();
                let t = Instant::now();
                for _ in 0..iters {
                    q.dequantize(ctx, &mut out).unwrap();
                }
                ctx.synchronize().unwrap();
                t.elapsed()
            })
        });
    }
    // Reference: a device copy of the bf16 output (bytes read + written).
    if ctx.cuda_ctx().is_some() {
        let src = Tensor::zeros(ctx, DType::BF16, &[rows, cols]).unwrap();
        let mut dst = Tensor::zeros(ctx, DType::BF16, &[rows, cols]).unwrap();
        g.throughput(Throughput::Bytes(2 * src.bytes() as u64));
        g.bench_function(format!("copy_bf16_{rows}x{cols}"), |b| {
            b.iter_custom(|iters| {
                ctx.synchronize().unwrap();
                let t = Instant::now();
                for _ in 0..iters {
                    dst.copy_from(ctx, &src).unwrap();
                }
                ctx.synchronize().unwrap();
                t.elapsed()
            })
        });
    }
    g.finish();
}

fn benches(c: &mut Criterion) {
    if std::env::var_os("LLMFT_BENCH_SKIP_CPU").is_none() {
        dequant_group(c, &Ctx::cpu(), "cpu", 1024, 4096);
    }
    if llmft_tensor::cuda_device_count() == 0 {
        eprintln!("cuda benches skipped: no CUDA GPU");
        return;
    }
    let ctx = Ctx::cuda(0).unwrap();
    dequant_group(c, &ctx, "cuda", 8192, 28672);
    // Quantize one 4096×14336 weight (the end-to-end model timing is the
    // quantize_llama8b example).
    let w = weight(&ctx, 14336, 4096);
    let mut g = c.benchmark_group("cuda_quantize");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    for (fmt, cfg) in formats() {
        g.bench_function(format!("quantize_{fmt}_14336x4096"), |b| {
            b.iter(|| {
                let q = QuantizedTensor::quantize(&ctx, &w, &cfg).unwrap();
                ctx.synchronize().unwrap();
                q
            })
        });
    }
    g.finish();
}

criterion_group!(quant, benches);
criterion_main!(quant);
