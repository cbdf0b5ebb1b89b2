//! `llmft bench`: the end-to-end training benchmark. A random-weight model of
//! a named real shape is trained for a few steps with the real trainer
//! (forward + backward of every micro-batch, the AdamW update) on random
//! tokens; one JSON object reports throughput, model FLOPs utilisation
//! against a GEMM measured on the same device, and peak memory.
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use llmft_models::{Model, ModelBatch, ModelConfig};
use llmft_tensor::ops::{self, Gemm};
use llmft_tensor::{Ctx, DType, Tensor};
use llmft_trainer::{ScheduleKind, TrainConfig, TrainType, Trainer};
use serde_json::json;

const GIB: f64 = (1u64 << 30) as f64;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// The job.
    #[command(flatten)]
    pub job: crate::shape::JobFlags,
    /// Bit-reproducible attention backward (train.deterministic).
    #[arg(long)]
    deterministic: bool,
    /// Optimizer steps run, warm-up included.
    #[arg(long, default_value_t = 12)]
    steps: usize,
    /// Steps left out of the medians (kernel compilation, GEMM heuristics, cache growth).
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// `auto`, `cpu` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Edge of the square GEMM timed as the ceiling (default 8192 on a GPU,
    /// 256 on the CPU; 0 skips it).
    #[arg(long)]
    gemm_size: Option<usize>,
    /// Collectives of a multi-process run (dist.backend: auto, nccl, cpu).
    /// Started by `llmft launch` (or torchrun / srun) every rank runs the
    /// benchmark on its own micro-batches and rank 0 reports the job; a
    /// single process joins a group of one only when this names a backend.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Seed of the weights, adapters and tokens.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the JSON object to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The store of rank 0 of a simulated `world`-rank job (see
/// `--simulate-world`).
fn simulated_builder(
    ctx: &Ctx,
    offload: &crate::config::OffloadSettings,
    num_units: usize,
    world: usize,
    strategy: &str,
) -> Result<Box<dyn llmft_models::StoreBuilder>, String> {
    let reshard_after_forward = match strategy {
        "full_shard" => true,
        "shard_grad_op" => false,
        s => {
            return Err(format!(
                "--strategy `{s}`: a simulated job shards its weights (full_shard or shard_grad_op)"
            ))
        }
    };
    let single = llmft_shard::init_process_group(
        &llmft_shard::WorldInfo::single(),
        ctx,
        llmft_shard::GroupConfig::default(),
    )
    .map_err(|e| e.to_string())?;
    let cfg = llmft_shard::ShardedConfig {
        reshard_after_forward,
        offload: offload.params,
        lookahead: offload.lookahead.max(1),
        simulate_world: Some(world),
    };
    let b = llmft_shard::ShardedBuilder::new(ctx, num_units, std::sync::Arc::from(single), cfg)
        .map_err(|e| e.to_string())?;
    Ok(Box::new(b))
}

/// Runs the benchmark and prints its JSON object.
pub fn run(a: &BenchArgs) -> Result<(), String> {
    let train_type = a.job.train_type()?;
    let config = a.job.config()?;
    if a.steps <= a.warmup {
        return Err(format!(
            "--steps ({}) must exceed --warmup ({}): the medians need at least one timed step",
            a.steps, a.warmup
        ));
    }
    let world = crate::dist::world()?;
    let dist_settings = crate::config::Settings {
        model: crate::config::ModelSettings {
            device: a.device.clone(),
            ..Default::default()
        },
        dist: crate::config::DistSettings {
            backend: a.backend.clone(),
            strategy: serde_json::from_value(json!(a.job.strategy)).map_err(|_| {
                format!(
                    "--strategy `{}`: use full_shard, shard_grad_op, no_shard or hybrid_shard",
                    a.job.strategy
                )
            })?,
            ..Default::default()
        },
        ..Default::default()
    };
    if a.job.simulate_world > 1 && world.world_size > 1 {
        return Err(
            "--simulate-world runs one process; it cannot be launched as several ranks".into(),
        );
    }
    let ctx = crate::dist::device_for(&dist_settings, &world)?;
    let job = crate::dist::join(&dist_settings, &world, &ctx)?;
    let lead = world.rank == 0;
    let dtype = a.job.dtype()?;
    let cu = ctx.cuda_ctx();
    let device_name = cu.map(|c| c.name()).unwrap_or_else(|| "cpu".into());

    let gemm_n = a.gemm_size.unwrap_or(if cu.is_some() { 8192 } else { 256 });
    let ceiling = if gemm_n > 0 {
        Some(gemm_ceiling(&ctx, dtype, gemm_n).map_err(|e| format!("GEMM ceiling: {e}"))?)
    } else {
        None
    };

    // The weights: quantized while they are drawn, one tensor at a time.
    let quant = crate::quant_of(train_type.quant_name())?;
    let t_load = Instant::now();
    let offload = a.job.offload();
    let plan_settings = crate::config::Settings {
        offload,
        model: crate::config::ModelSettings {
            checkpointing: a.job.checkpointing,
            checkpoint_keep_attention: a.job.keep_attention,
            checkpoint_skip_layers: a.job.skip_layers,
            ..Default::default()
        },
        train: TrainConfig {
            train_type,
            ..TrainConfig::default()
        },
        lora: serde_json::from_value(json!({ "r": a.job.lora_r }))
            .map_err(|e| format!("LoRA config: {e}"))?,
        ..Default::default()
    };
    let tokens = a.job.micro_batch * a.job.seq;
    crate::offload_plan::HostPlan::of(&plan_settings, &config, dtype, quant.as_ref(), tokens)
        .check()?;
    let builder = match (a.job.simulate_world, &job) {
        (0, _) => return Err("--simulate-world must be at least 1".into()),
        (1, Some(j)) => j.store_builder(&ctx, &offload, config.num_units())?,
        (1, None) => crate::store_builder(&ctx, &offload, config.num_units())?,
        (n, _) => simulated_builder(&ctx, &offload, config.num_units(), n, &a.job.strategy)?,
    };
    let mut model = Model::random_in(config.clone(), &ctx, dtype, a.seed, quant.as_ref(), builder)
        .map_err(|e| format!("building the random {} model: {e}", a.job.model))?;
    model.offload_activations = a.job.offload_activations;
    model.checkpointing = a.job.checkpointing;
    model.checkpoint_keep_attention = a.job.keep_attention;
    model.checkpoint_skip_layers = a.job.skip_layers;
    model.checkpoint_cache_dequantized = a.job.cache_dequantized;
    let trainable = if train_type.uses_adapter() {
        let lora = serde_json::from_value(json!({
            "r": a.job.lora_r,
            "lora_alpha": a.job.lora_alpha,
            "lora_dropout": 0.0,
            "target_modules": "all-linear",
            "use_dora": train_type.dora(),
        }))
        .map_err(|e| format!("LoRA config: {e}"))?;
        let adapter = model
            .new_adapter(lora, a.seed)
            .map_err(|e| format!("creating the adapter: {e}"))?;
        let n = adapter.num_parameters();
        model.attach_adapter(adapter);
        n
    } else {
        crate::offload_plan::weights_trained(
            &config,
            train_type,
            TrainConfig::default().freeze_trainable_layers,
        )
    };
    ctx.synchronize().map_err(|e| e.to_string())?;
    let load_s = t_load.elapsed().as_secs_f64();
    let weights_bytes = cu.map(|c| c.allocator().stats().in_use);

    let train = TrainConfig {
        train_type,
        max_steps: a.steps as u64,
        grad_accum: a.job.grad_accum,
        schedule: ScheduleKind::Constant,
        checkpoint_every: 0,
        seed: a.seed,
        optimizer_on_host: a.job.offload_optimizer.then_some(0),
        // Trainer::new sets the attention's mode from it.
        deterministic: a.deterministic,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(train, &model)
        .map_err(|e| format!("--train-type {}: {e}", a.job.train_type))?;
    let ranks = job.as_ref().map_or(1, |j| j.group.world_size());
    if let Some(j) = &job {
        trainer
            .set_data_parallel(
                llmft_trainer::DataParallel::new(j.group.clone())
                    .with_sharded_optimizer(j.strategy != crate::config::Strategy::NoShard),
            )
            .map_err(|e| e.to_string())?;
    }

    let tokens_per_micro = a.job.micro_batch * a.job.seq;
    // The tokens of global micro-batch `g` (step s, rank r, micro-batch j of
    // `grad_accum`: g = (s·ranks + r)·grad_accum + j) depend on g alone, so a
    // job at world N and one at world 1 with N times the accumulation train
    // on the same global batches.
    let micro_tokens = |g: usize| {
        let mut rng = a.seed ^ 0x5EED_70CE_u64 ^ (g as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (0..tokens_per_micro)
            .map(|_| (next_u64(&mut rng) % config.vocab_size as u64) as i32)
            .collect::<Vec<i32>>()
    };
    let mut step_ms = Vec::with_capacity(a.steps);
    let mut fwd_bwd_ms = Vec::with_capacity(a.steps);
    let mut optim_ms = Vec::with_capacity(a.steps);
    let mut losses = Vec::with_capacity(a.steps);
    let mut device_used_max = 0usize;
    for step in 0..a.steps {
        let mut micro = (0..a.job.grad_accum)
            .map(|j| {
                let g = (step * ranks + world.rank) * a.job.grad_accum + j;
                let ids = micro_tokens(g);
                ModelBatch::from_host(&ctx, a.job.micro_batch, a.job.seq, &ids, None, None, None)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        ctx.synchronize().map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        let acc = trainer
            .accumulate(&model, &mut micro)
            .map_err(|e| step_error(&e.to_string(), a))?;
        ctx.synchronize().map_err(|e| e.to_string())?;
        let t1 = Instant::now();
        let stats = trainer
            .apply(&mut model, acc)
            .map_err(|e| step_error(&e.to_string(), a))?;
        ctx.synchronize().map_err(|e| e.to_string())?;
        let t2 = Instant::now();
        fwd_bwd_ms.push((t1 - t0).as_secs_f64() * 1e3);
        optim_ms.push((t2 - t1).as_secs_f64() * 1e3);
        step_ms.push((t2 - t0).as_secs_f64() * 1e3);
        losses.push(stats.loss);
        if let Some(c) = cu {
            let (free, total) = c.mem_info().map_err(|e| e.to_string())?;
            device_used_max = device_used_max.max(total - free);
        }
    }

    let timed = a.warmup..a.steps;
    let step_med = median(&step_ms[timed.clone()]);
    // The job's tokens: every rank's micro-batches.
    let tokens_per_step = tokens_per_micro * a.job.grad_accum * ranks;
    let tokens_per_s = tokens_per_step as f64 / (step_med / 1e3);
    let flops = Flops::of(&config, &model, train_type, trainable, a.job.seq);
    let achieved = |per_token: f64| per_token * tokens_per_s / 1e12;
    let mfu = |per_token: f64| ceiling.map(|c| achieved(per_token) / c);
    let alloc = cu.map(|c| c.allocator().stats());
    let store_bytes = model.store().bytes();
    let trained_sha256 = adapter_digest(&model).map_err(|e| e.to_string())?;
    let out = json!({
        "impl": "llmft",
        "model": a.job.model,
        "layers": config.num_layers,
        "train_type": a.job.train_type,
        "seq": a.job.seq,
        "micro_batch": a.job.micro_batch,
        "grad_accum": a.job.grad_accum,
        "checkpointing": a.job.checkpointing,
        "checkpoint_keep_attention": a.job.keep_attention,
        "checkpoint_skip_layers": a.job.skip_layers,
        "checkpoint_cache_dequantized": a.job.cache_dequantized,
        "deterministic": a.deterministic,
        "lora_r": a.job.lora_r,
        "lora_alpha": a.job.lora_alpha,
        "dtype": a.job.dtype,
        "device": device_name,
        "steps": a.steps,
        "warmup": a.warmup,
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_per_s,
        "step_ms_median": step_med,
        "fwd_bwd_ms_median": median(&fwd_bwd_ms[timed.clone()]),
        "optimizer_ms_median": median(&optim_ms[timed]),
        "step_ms": step_ms,
        "loss_first": losses.first(),
        "loss_last": losses.last(),
        "params_matmul": flops.n_matmul,
        "params_trainable": trainable,
        "flops_formula": "flops_per_token = 6*N + 12*L*q_dim*seq (N = decoder linear + LM head weights; the PaLM-style count used for MFU); flops_per_token_frozen_base = 4*(N - N_trainable) + 6*N_trainable + 12*L*q_dim*seq (no weight gradients of a frozen base); recompute under checkpointing not counted",
        "flops_per_token": flops.standard,
        "flops_per_token_frozen_base": flops.frozen_base,
        "achieved_tflops": achieved(flops.standard),
        "gemm_size": gemm_n,
        "gemm_ceiling_tflops": ceiling,
        "mfu": mfu(flops.standard),
        "mfu_frozen_base": mfu(flops.frozen_base),
        "peak_gib": alloc.map(|s| s.peak_in_use as f64 / GIB),
        "weights_gib": weights_bytes.map(|b| b as f64 / GIB),
        "allocator_cached_gib": alloc.map(|s| s.cached as f64 / GIB),
        "device_used_gib": cu.map(|_| device_used_max as f64 / GIB),
        "load_s": load_s,
    });
    let mut out = out;
    let memory = json!({
        "world_size": a.job.simulate_world.max(ranks),
        "simulated": a.job.simulate_world > 1,
        "strategy": if a.job.simulate_world > 1 || job.is_some() { a.job.strategy.as_str() } else { "none" },
        "backend": job.as_ref().map(|j| j.group.backend().to_string()),
        "tokens_per_s_per_rank": tokens_per_s / ranks as f64,
        "offload": {
            "params": a.job.offload_params,
            "activations": a.job.offload_activations,
            "optimizer": a.job.offload_optimizer,
            "lookahead": a.job.lookahead,
            "keep_embedding": a.job.keep_embedding,
        },
        "store_device_gib": store_bytes.device as f64 / GIB,
        "store_host_gib": store_bytes.host as f64 / GIB,
        "store_buffers_gib": store_bytes.buffers as f64 / GIB,
        "pinned_activations_gib": model.pinned_activation_bytes() as f64 / GIB,
        "host_rss_peak_gib": host_rss_peak().map(|b| b as f64 / GIB),
        "losses": losses,
        "trained_sha256": trained_sha256,
    });
    if let (Some(o), Some(m)) = (out.as_object_mut(), memory.as_object()) {
        o.extend(m.clone());
    }
    let text = out.to_string();
    if !lead {
        return Ok(());
    }
    println!("{text}");
    if let Some(p) = &a.json {
        std::fs::write(p, format!("{text}\n")).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(())
}

/// A training-step error, with what to lower when it is an out-of-memory.
fn step_error(e: &str, a: &BenchArgs) -> String {
    if e.contains("out of memory") {
        format!(
            "{e}; lower --micro-batch ({}) or --seq ({}), or use --checkpointing true",
            a.job.micro_batch, a.job.seq
        )
    } else {
        e.to_string()
    }
}

/// Model FLOPs per trained token.
struct Flops {
    n_matmul: usize,
    standard: f64,
    frozen_base: f64,
}

impl Flops {
    /// `adapter`: the adapter's parameter count (LoRA/DoRA recipes).
    fn of(c: &ModelConfig, model: &Model, tt: TrainType, adapter: usize, seq: usize) -> Self {
        let linears: usize = model
            .linear_shapes()
            .values()
            .map(|s| s.in_features * s.out_features)
            .sum();
        let n = linears + c.vocab_size * c.hidden_size;
        let per_layer = linears / c.num_layers.max(1);
        let n_trainable = match tt {
            TrainType::Full => n,
            TrainType::Freeze => {
                per_layer
                    * c.num_layers
                        .min(TrainConfig::default().freeze_trainable_layers)
            }
            _ => adapter,
        };
        let attn = 12.0 * (c.num_layers * c.q_dim() * seq) as f64;
        let n_frozen = n.saturating_sub(if tt.uses_adapter() { 0 } else { n_trainable });
        Self {
            n_matmul: n,
            standard: 6.0 * n as f64 + attn,
            frozen_base: 4.0 * n_frozen as f64 + 6.0 * n_trainable as f64 + attn,
        }
    }
}

/// TFLOP/s of a square `n³` GEMM in `dtype` (f32 accumulate): the best of
/// three timed rounds of 5 after 3 warm-ups.
fn gemm_ceiling(ctx: &Ctx, dtype: DType, n: usize) -> llmft_tensor::Result<f64> {
    let mut a = Tensor::empty(ctx, dtype, &[n, n])?;
    let mut b = Tensor::empty(ctx, dtype, &[n, n])?;
    ops::fill_normal(ctx, &mut a, 1, 0.0, 1.0)?;
    ops::fill_normal(ctx, &mut b, 2, 0.0, 1.0)?;
    let mut c = Tensor::empty(ctx, dtype, &[n, n])?;
    let reps = if ctx.cuda_ctx().is_some() { 5 } else { 1 };
    for _ in 0..3 {
        ops::gemm(ctx, &a, &b, &mut c, Gemm::default())?;
    }
    ctx.synchronize()?;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..reps {
            ops::gemm(ctx, &a, &b, &mut c, Gemm::default())?;
        }
        ctx.synchronize()?;
        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
    }
    Ok(2.0 * (n as f64).powi(3) / best / 1e12)
}

/// SHA-256 of the adapter's parameters after the run (every module in
/// name order, f32 bytes), so runs that must agree bit for bit can be
/// compared; `None` without an adapter.
fn adapter_digest(model: &Model) -> Result<Option<String>, llmft_tensor::Error> {
    use sha2::Digest;
    let Some(a) = model.adapter() else {
        return Ok(None);
    };
    let mut h = sha2::Sha256::new();
    for (name, l) in &a.layers {
        h.update(name.as_bytes());
        for p in l.params() {
            for v in p.to_f32_vec()? {
                h.update(v.to_le_bytes());
            }
        }
    }
    Ok(Some(format!("{:x}", h.finalize())))
}

/// The process's peak resident set (`VmHWM` of /proc/self/status), in bytes.
fn host_rss_peak() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

/// splitmix64: random token ids.
fn next_u64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
