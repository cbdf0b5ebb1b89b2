//! Criterion benchmarks of every tensor op, on the CPU and (where one exists)
//! on CUDA device 0. CUDA sizes are at least 256 MB per tensor for the
//! memory-bound ops, so throughput is compared with a device-to-device copy
//! of the same size (`copy_d2d`). Throughput is bytes read + written, or
//! FLOPs for GEMM (reported by criterion as elements/s = FLOP/s).
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use llmft_tensor::ops::{self, AdamWParams, CrossEntropyOpts, Gemm};
use llmft_tensor::{Ctx, DType, Tensor};

struct Sizes {
    /// Elements of the large 16-bit tensors.
    n16: usize,
    /// Rows × hidden of the norm benches.
    rows: usize,
    hidden: usize,
    /// Tokens × heads × head_dim of RoPE.
    rope: (usize, usize, usize),
    /// GEMM m = n = k.
    gemm: usize,
    /// Attention batch·heads × T.
    attn: (usize, usize),
    /// Tokens × hidden × vocab of the fused loss.
    ce: (usize, usize, usize),
}

fn sizes(ctx: &Ctx) -> Sizes {
    if ctx.cuda_ctx().is_some() {
        Sizes {
            n16: 128 << 20,
            rows: 32768,
            hidden: 4096,
            rope: (32768, 32, 128),
            gemm: 8192,
            attn: (16, 2048),
            ce: (4096, 4096, 128256),
        }
    } else {
        Sizes {
            n16: 1 << 20,
            rows: 256,
            hidden: 4096,
            rope: (256, 32, 128),
            gemm: 256,
            attn: (4, 256),
            ce: (64, 256, 8192),
        }
    }
}

fn rand(ctx: &Ctx, dtype: DType, shape: &[usize], seed: u64) -> Tensor {
    let mut t = Tensor::zeros(ctx, dtype, shape).unwrap();
    ops::fill_uniform(ctx, &mut t, seed, -1.0, 1.0).unwrap();
    t
}

/// Times `iters` back-to-back launches with one synchronization at the end.
fn timed(ctx: &Ctx, iters: u64, mut f: impl FnMut()) -> Duration {
    ctx.synchronize().unwrap();
    let t0 = Instant::now();
    for _ in 0..iters {
        f();
    }
    ctx.synchronize().unwrap();
    t0.elapsed()
}

fn bench_device(c: &mut Criterion, ctx: &Ctx, tag: &str) {
    let s = sizes(ctx);
    let mut g = c.benchmark_group(tag);
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let bf = DType::BF16;
    let n = s.n16;

    let x = rand(ctx, bf, &[n], 1);
    let mut y = Tensor::zeros(ctx, bf, &[n]).unwrap();
    g.throughput(Throughput::Bytes((4 * n) as u64));
    g.bench_function("copy_d2d_bf16", |b| {
        b.iter_custom(|it| timed(ctx, it, || y.copy_from(ctx, &x).unwrap()))
    });

    let mut y32 = Tensor::zeros(ctx, DType::F32, &[n]).unwrap();
    g.throughput(Throughput::Bytes((6 * n) as u64));
    g.bench_function("cast_bf16_f32", |b| {
        b.iter_custom(|it| timed(ctx, it, || ops::cast(ctx, &x, &mut y32).unwrap()))
    });
    g.bench_function("cast_f32_bf16", |b| {
        b.iter_custom(|it| timed(ctx, it, || ops::cast(ctx, &y32, &mut y).unwrap()))
    });
    drop(y32);

    g.throughput(Throughput::Bytes((2 * n) as u64));
    g.bench_function("fill_bf16", |b| {
        b.iter_custom(|it| timed(ctx, it, || ops::fill(ctx, &mut y, 0.5).unwrap()))
    });

    let x2 = rand(ctx, bf, &[n], 2);
    g.throughput(Throughput::Bytes((6 * n) as u64));
    g.bench_function("add_bf16", |b| {
        b.iter_custom(|it| timed(ctx, it, || ops::add(ctx, &x, &x2, &mut y).unwrap()))
    });
    g.bench_function("axpby_bf16", |b| {
        b.iter_custom(|it| timed(ctx, it, || ops::axpby(ctx, 0.5, &x, 1.0, &mut y).unwrap()))
    });
    g.bench_function("mul_bf16", |b| {
        b.iter_custom(|it| timed(ctx, it, || ops::mul(ctx, &x, &x2, &mut y).unwrap()))
    });
    g.bench_function("swiglu_fwd_bf16", |b| {
        b.iter_custom(|it| timed(ctx, it, || ops::swiglu_fwd(ctx, &x, &x2, &mut y).unwrap()))
    });
    let mut dg = Tensor::zeros(ctx, bf, &[n]).unwrap();
    g.throughput(Throughput::Bytes((10 * n) as u64));
    g.bench_function("swiglu_bwd_bf16", |b| {
        b.iter_custom(|it| {
            timed(ctx, it, || {
                ops::swiglu_bwd(ctx, &x, &x2, &x, &mut dg, &mut y).unwrap()
            })
        })
    });
    drop(dg);

    let (rows, d) = (s.rows, s.hidden);
    let xr = x.view(0, &[rows, d]).unwrap();
    let mut yr = y.view(0, &[rows, d]).unwrap();
    let w = rand(ctx, bf, &[d], 3);
    let mut rstd = Tensor::zeros(ctx, DType::F32, &[rows]).unwrap();
    g.throughput(Throughput::Bytes((4 * rows * d) as u64));
    g.bench_function("rmsnorm_fwd_bf16", |b| {
        b.iter_custom(|it| {
            timed(ctx, it, || {
                ops::rmsnorm_fwd(ctx, &xr, &w, 1e-5, &mut yr, &mut rstd).unwrap()
            })
        })
    });
    let dyr = x2.view(0, &[rows, d]).unwrap();
    let mut dxr = Tensor::zeros(ctx, bf, &[rows, d]).unwrap();
    let mut dw = Tensor::zeros(ctx, DType::F32, &[d]).unwrap();
    g.throughput(Throughput::Bytes((6 * rows * d) as u64));
    g.bench_function("rmsnorm_bwd_bf16", |b| {
        b.iter_custom(|it| {
            timed(ctx, it, || {
                ops::rmsnorm_bwd(ctx, &dyr, &xr, &w, &rstd, &mut dxr, Some(&mut dw)).unwrap()
            })
        })
    });
    drop(dxr);

    let (t, h, dh) = s.rope;
    let xq = x.view(0, &[t, h, dh]).unwrap();
    let mut yq = y.view(0, &[t, h, dh]).unwrap();
    let pos: Vec<i32> = (0..t as i32).map(|i| i % 4096).collect();
    let pos = Tensor::from_slice(ctx, &pos, &[t]).unwrap();
    let inv = ops::rope_inv_freq(dh, 500000.0, ops::RopeScaling::Default);
    let inv = Tensor::from_slice(ctx, &inv, &[dh / 2]).unwrap();
    g.throughput(Throughput::Bytes((4 * t * h * dh) as u64));
    g.bench_function("rope_fwd_bf16", |b| {
        b.iter_custom(|it| {
            timed(ctx, it, || {
                ops::rope_fwd(ctx, &xq, &pos, &inv, &mut yq).unwrap()
            })
        })
    });
    g.bench_function("rope_bwd_bf16", |b| {
        b.iter_custom(|it| {
            timed(ctx, it, || {
                ops::rope_bwd(ctx, &xq, &pos, &inv, &mut yq).unwrap()
            })
        })
    });

    // AdamW over n/2 f32 parameters with bf16 grads: reads p,m,v (f32) + g
    // (bf16), writes p,m,v.
    let np = n / 2;
    let mut p = rand(ctx, DType::F32, &[np], 4);
    let mut m = Tensor::zeros(ctx, DType::F32, &[np]).unwrap();
    let mut v = Tensor::zeros(ctx, DType::F32, &[np]).unwrap();
    let grad = x.view(0, &[np]).unwrap();
    let hp = AdamWParams::default();
    g.throughput(Throughput::Bytes((26 * np) as u64));
    g.bench_function("adamw_f32_bf16grad", |b| {
        b.iter_custom(|it| {
            timed(ctx, it, || {
                ops::adamw_step(ctx, &mut p, &grad, &mut m, &mut v, &hp, None).unwrap()
            })
        })
    });
    drop((p, m, v));

    let mut acc = Tensor::zeros(ctx, DType::F32, &[1]).unwrap();
    g.throughput(Throughput::Bytes((2 * n) as u64));
    g.bench_function("sum_squares_bf16", |b| {
        b.iter_custom(|it| timed(ctx, it, || ops::sum_squares(ctx, &x, &mut acc).unwrap()))
    });
    g.bench_function("dropout_bf16", |b| {
        b.iter_custom(|it| timed(ctx, it, || ops::dropout(ctx, &x, 0.1, 7, &mut y).unwrap()))
    });

    // Embedding gather of `rows` tokens of width `hidden` from a 128k vocab.
    let vocab = if ctx.cuda_ctx().is_some() {
        128256
    } else {
        4096
    };
    let table = rand(ctx, bf, &[vocab, d], 5);
    let ids: Vec<i32> = (0..rows as i32)
        .map(|i| (i * 7919) % vocab as i32)
        .collect();
    let ids = Tensor::from_slice(ctx, &ids, &[rows]).unwrap();
    g.throughput(Throughput::Bytes((4 * rows * d) as u64));
    g.bench_function("embedding_fwd_bf16", |b| {
        b.iter_custom(|it| {
            timed(ctx, it, || {
                ops::embedding_fwd(ctx, &ids, &table, &mut yr).unwrap()
            })
        })
    });
    drop(table);

    let (bh, tt) = s.attn;
    let sc = x.view(0, &[1, bh, tt, tt]).unwrap();
    let mut pr = y.view(0, &[1, bh, tt, tt]).unwrap();
    g.throughput(Throughput::Bytes((4 * bh * tt * tt) as u64));
    g.bench_function("softmax_causal_fwd_bf16", |b| {
        b.iter_custom(|it| {
            timed(ctx, it, || {
                ops::softmax_causal_fwd(ctx, &sc, None, 0.088, &mut pr).unwrap()
            })
        })
    });
    let mut ds = x2.view(0, &[1, bh, tt, tt]).unwrap();
    g.throughput(Throughput::Bytes((6 * bh * tt * tt) as u64));
    g.bench_function("softmax_causal_bwd_bf16", |b| {
        b.iter_custom(|it| {
            timed(ctx, it, || {
                ops::softmax_causal_bwd(ctx, &pr, &sc, 0.088, &mut ds).unwrap()
            })
        })
    });
    drop((x, x2, y));

    // Fused causal attention, Llama-3-8B heads (32 query, 8 kv, dim 128),
    // CUDA only (the CPU path is the f64 reference): throughput in causal
    // FLOPs (2·B·Hq·T²·D forward, 2.5× that backward).
    if ctx.cuda_ctx().is_some() {
        let (hq, hkv, hd) = (32, 8, 128);
        let (ab, at) = (bh / 8, tt);
        let q = rand(ctx, bf, &[ab, hq, at, hd], 10);
        let kk = rand(ctx, bf, &[ab, hkv, at, hd], 11);
        let vv = rand(ctx, bf, &[ab, hkv, at, hd], 12);
        let d_o = rand(ctx, bf, &[ab, hq, at, hd], 13);
        let mut o = Tensor::zeros(ctx, bf, &[ab, hq, at, hd]).unwrap();
        let mut lse = Tensor::zeros(ctx, DType::F32, &[ab, hq, at]).unwrap();
        let (mut dq, mut dk, mut dv) = (
            Tensor::zeros(ctx, bf, &[ab, hq, at, hd]).unwrap(),
            Tensor::zeros(ctx, bf, &[ab, hkv, at, hd]).unwrap(),
            Tensor::zeros(ctx, bf, &[ab, hkv, at, hd]).unwrap(),
        );
        let sc = 1.0 / (hd as f32).sqrt();
        let fwd_flops = (2 * ab * hq * at * at * hd) as u64;
        g.throughput(Throughput::Elements(fwd_flops));
        g.bench_function("flash_attn_fwd_bf16_d128", |b| {
            b.iter_custom(|it| {
                timed(ctx, it, || {
                    ops::flash_attn_fwd(ctx, &q, &kk, &vv, None, sc, &mut o, &mut lse).unwrap()
                })
            })
        });
        g.throughput(Throughput::Elements(fwd_flops * 5 / 2));
        g.bench_function("flash_attn_bwd_bf16_d128", |b| {
            b.iter_custom(|it| {
                timed(ctx, it, || {
                    ops::flash_attn_bwd(
                        ctx, &q, &kk, &vv, &o, &d_o, &lse, None, sc, &mut dq, &mut dk, &mut dv,
                    )
                    .unwrap()
                })
            })
        });
        // Packed rows of 512-token examples: FLOPs of the visible pairs only.
        let run = 512.min(at);
        let seg: Vec<i32> = (0..ab * at).map(|i| ((i % at) / run) as i32).collect();
        let seg = Tensor::from_slice(ctx, &seg, &[ab, at]).unwrap();
        let packed_flops = (2 * ab * hq * at * run * hd) as u64;
        g.throughput(Throughput::Elements(packed_flops));
        g.bench_function("flash_attn_fwd_bf16_d128_packed512", |b| {
            b.iter_custom(|it| {
                timed(ctx, it, || {
                    ops::flash_attn_fwd(ctx, &q, &kk, &vv, Some(&seg), sc, &mut o, &mut lse)
                        .unwrap()
                })
            })
        });
        g.throughput(Throughput::Elements(packed_flops * 5 / 2));
        g.bench_function("flash_attn_bwd_bf16_d128_packed512", |b| {
            b.iter_custom(|it| {
                timed(ctx, it, || {
                    ops::flash_attn_bwd(
                        ctx,
                        &q,
                        &kk,
                        &vv,
                        &o,
                        &d_o,
                        &lse,
                        Some(&seg),
                        sc,
                        &mut dq,
                        &mut dk,
                        &mut dv,
                    )
                    .unwrap()
                })
            })
        });
        drop((q, kk, vv, d_o, o, lse, dq, dk, dv, seg));
    }

    let k = s.gemm;
    let a = rand(ctx, bf, &[k, k], 6);
    let bm = rand(ctx, bf, &[k, k], 7);
    let mut cm = Tensor::zeros(ctx, bf, &[k, k]).unwrap();
    g.throughput(Throughput::Elements((2 * k * k * k) as u64));
    for (name, spec) in [
        ("gemm_nn_bf16", Gemm::default()),
        ("gemm_nt_bf16", Gemm::nt()),
        ("gemm_tn_bf16", Gemm::tn()),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|it| timed(ctx, it, || ops::gemm(ctx, &a, &bm, &mut cm, spec).unwrap()))
        });
    }
    drop((a, bm, cm));

    let (nt, hd, vocab) = s.ce;
    let hs = rand(ctx, bf, &[nt, hd], 8);
    let head = rand(ctx, bf, &[vocab, hd], 9);
    let labels: Vec<i32> = (0..nt as i32).map(|i| (i * 31) % vocab as i32).collect();
    let labels = Tensor::from_slice(ctx, &labels, &[nt]).unwrap();
    let mut dhs = Tensor::zeros(ctx, bf, &[nt, hd]).unwrap();
    let opts = CrossEntropyOpts::default();
    g.throughput(Throughput::Elements((2 * 2 * nt * hd * vocab) as u64));
    g.bench_function("lm_head_ce_fwd_bwd_bf16", |b| {
        b.iter_custom(|it| {
            timed(ctx, it, || {
                let grads = ops::LmHeadGrads {
                    dh: &mut dhs,
                    dw: None,
                };
                ops::lm_head_cross_entropy(ctx, &hs, &head, &labels, &opts, Some(grads)).unwrap();
            })
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    if std::env::var_os("LLMFT_BENCH_SKIP_CPU").is_none() {
        bench_device(c, &Ctx::cpu(), "cpu");
    }
    match Ctx::cuda(0) {
        Ok(ctx) => bench_device(c, &ctx, "cuda"),
        Err(e) => eprintln!("skipping CUDA benches: {e}"),
    }
}

criterion_group!(ops_benches, benches);
criterion_main!(ops_benches);
