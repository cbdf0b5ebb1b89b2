//! `llmft estimate`: will this job fit? Per-rank GPU and host memory of a
//! job, with a breakdown, from the model's config alone
//! ([`llmft_trainer::estimate`]); with `--gpu-memory`, the settings that fit,
//! fastest first.
use clap::Args;
use llmft_trainer::estimate::{estimate, Estimate, JobSpec, Sharding};
use serde_json::json;

use crate::shape::JobFlags;

const GIB: f64 = (1u64 << 30) as f64;

#[derive(Args, Debug, Clone)]
pub struct EstimateArgs {
    /// The job (the flags `llmft bench` takes).
    #[command(flatten)]
    pub job: JobFlags,
    /// Estimate the job of this config file (as `llmft train -c` reads it);
    /// the job flags above are then not used.
    #[arg(long, short = 'c')]
    config: Option<std::path::PathBuf>,
    /// With or without -c: override one config key (`--set lora.r=64`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Ranks of the job (GPUs in all).
    #[arg(long, default_value_t = 1)]
    world_size: usize,
    /// Ranks per node (hybrid_shard shards within a node).
    #[arg(long, default_value_t = 8)]
    gpus_per_node: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// List the settings that fit GPUs of this many GiB, fastest first.
    #[arg(long, value_name = "GiB")]
    gpu_memory: Option<f64>,
    /// With --gpu-memory: GPUs available (default --world-size).
    #[arg(long)]
    gpus: Option<usize>,
    /// With --gpu-memory: host memory per rank, GiB (settings needing more are left out).
    #[arg(long, value_name = "GiB")]
    host_memory: Option<f64>,
    /// Speed model of --gpu-memory's ranking: sustained bf16 TFLOP/s of one GPU.
    #[arg(long, default_value_t = 150.0)]
    tflops: f64,
    /// Speed model: host↔GPU link, GB/s per GPU.
    #[arg(long, default_value_t = 25.0)]
    link_gbps: f64,
    /// Speed model: GPU↔GPU collectives, GB/s per GPU.
    #[arg(long, default_value_t = 20.0)]
    comm_gbps: f64,
}

fn gib(b: usize) -> f64 {
    b as f64 / GIB
}

/// One line naming the job's settings.
fn describe(s: &JobSpec) -> String {
    let c = &s.config;
    let mut parts = vec![format!("{} layers", c.num_layers)];
    let tt = serde_json::to_value(s.train_type).ok();
    let tt = tt.as_ref().and_then(|v| v.as_str()).unwrap_or("?");
    parts.push(if s.train_type.uses_adapter() {
        format!("{tt} r{}", s.lora_r)
    } else {
        tt.to_string()
    });
    parts.push(format!("seq {} × micro-batch {}", s.seq, s.micro_batch));
    parts.push(if !s.checkpointing {
        "no checkpointing".into()
    } else {
        let mut ck = format!(
            "checkpointing (attention {}",
            if s.keep_attention {
                "kept"
            } else {
                "recomputed"
            }
        );
        if s.skip_layers > 0 {
            ck.push_str(&format!(", last {} layers not", s.skip_layers));
        }
        ck.push_str(if s.cache_dequantized {
            ", dequantized weights cached)"
        } else {
            ", lean)"
        });
        ck
    });
    if s.world_size > 1 {
        let strat = serde_json::to_value(s.sharding).ok();
        let strat = strat
            .as_ref()
            .and_then(|v| {
                v.as_str()
                    .map(String::from)
                    .or_else(|| v.as_object().map(|_| "hybrid_shard".into()))
            })
            .unwrap_or_default();
        parts.push(format!(
            "{} ranks {strat}{}",
            s.world_size,
            if s.simulated { " (simulated)" } else { "" }
        ));
    }
    let o = &s.offload;
    let off: Vec<&str> = [
        (o.params, "params"),
        (o.activations, "activations"),
        (o.optimizer, "optimizer"),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, n)| *n)
    .collect();
    if !off.is_empty() {
        parts.push(format!("offload {}", off.join(", ")));
    }
    parts.join(" · ")
}

fn settings_json(s: &JobSpec) -> serde_json::Value {
    json!({
        "layers": s.config.num_layers,
        "train_type": s.train_type,
        "lora_r": s.lora_r,
        "seq": s.seq,
        "micro_batch": s.micro_batch,
        "checkpointing": s.checkpointing,
        "checkpoint_keep_attention": s.keep_attention,
        "checkpoint_skip_layers": s.skip_layers,
        "checkpoint_cache_dequantized": s.cache_dequantized,
        "offload": s.offload,
        "world_size": s.world_size,
        "strategy": s.sharding,
        "simulated": s.simulated,
    })
}

fn estimate_json(model: &str, s: &JobSpec, e: &Estimate) -> serde_json::Value {
    let side = |b: &llmft_trainer::estimate::Breakdown| {
        json!({
            "weights_gib": gib(b.weights),
            "trainable_gib": gib(b.trainable),
            "activations_gib": gib(b.activations),
            "workspace_gib": gib(b.workspace),
        })
    };
    json!({
        "model": model,
        "settings": settings_json(s),
        "gpu_peak_gib": e.gpu_peak_gib(),
        "gpu_needed_gib": e.gpu_needed_gib(),
        "gpu_peak_at": e.gpu_peak_at,
        "host_peak_gib": e.host_peak_gib(),
        "gpu": side(&e.gpu),
        "host": side(&e.host),
        "trainable_params": e.trainable_params,
    })
}

fn table(model: &str, s: &JobSpec, e: &Estimate) -> String {
    let mut t = format!("{model} · {}\n\n", describe(s));
    t.push_str(&format!(
        "{:<34}{:>10}{:>10}\n",
        "per rank", "GPU GiB", "host GiB"
    ));
    for (what, g, h) in [
        ("weights", e.gpu.weights, e.host.weights),
        (
            "trainable state (+grads, AdamW)",
            e.gpu.trainable,
            e.host.trainable,
        ),
        (
            "activations kept for backward",
            e.gpu.activations,
            e.host.activations,
        ),
        ("workspace", e.gpu.workspace, e.host.workspace),
    ] {
        t.push_str(&format!("  {what:<32}{:>10.2}{:>10.2}\n", gib(g), gib(h)));
    }
    t.push_str(&format!(
        "  {:<32}{:>10.2}{:>10.2}\n\n",
        "total",
        e.gpu_peak_gib(),
        e.host_peak_gib()
    ));
    t.push_str(&format!(
        "The GPU peak falls at the {}. With the CUDA context and libraries outside the \
         allocator (about {:.1} GiB) each GPU needs {:.1} GiB.\n",
        e.gpu_peak_at,
        gib(llmft_trainer::estimate::CUDA_CONTEXT_BYTES),
        e.gpu_needed_gib()
    ));
    t
}

/// Relative step time of `s` per trained token (seconds, by the speed
/// model of the flags): compute with recompute, overlapped with the host
/// link's and the collectives' traffic, plus the host optimizer.
fn step_time(a: &EstimateArgs, s: &JobSpec, e: &Estimate) -> f64 {
    let c = &s.config;
    let l = c.num_layers as f64;
    let per_layer: f64 = (c.q_dim() * c.hidden_size * 2
        + c.kv_dim() * c.hidden_size * 2
        + c.intermediate_size * c.hidden_size * 3) as f64;
    let n_params = per_layer * l + (c.vocab_size * c.hidden_size) as f64;
    let tokens = (s.seq * s.micro_batch) as f64;
    let fwd = 2.0 * n_params + 2.0 * l * (c.q_dim() * s.seq) as f64;
    let bwd = if s.train_type.uses_adapter() {
        1.1
    } else {
        2.0
    } * fwd;
    let recomputed = if s.checkpointing {
        (c.num_layers.saturating_sub(s.skip_layers)) as f64 / l
    } else {
        0.0
    };
    let mut recompute = fwd * recomputed * if s.keep_attention { 0.7 } else { 1.0 };
    if s.checkpointing && !s.cache_dequantized && s.train_type.quant_name() != "none" {
        // Each weight dequantized again for the backward.
        recompute += 0.03 * fwd;
    }
    // Small micro-batches run the GEMMs below their best.
    let efficiency = tokens / (tokens + 256.0);
    let compute = tokens * (fwd + bwd + recompute) / (a.tflops * 1e12 * efficiency);
    let link = a.link_gbps * 1e9;
    let mut transfer = 2.0 * e.host.activations as f64 / link;
    if s.offload.params {
        transfer += 2.0 * e.host.weights as f64 / link;
    }
    let mut comm = 0.0;
    if s.sharded {
        let ways = s.world_size as f64;
        comm += 2.0 * (per_layer * l) * 0.6 * (ways - 1.0) / ways / (a.comm_gbps * 1e9);
    }
    let mut tail = 0.0;
    let trainable = e.trainable_params as f64;
    if s.world_size > 1 {
        tail += trainable * 4.0 * 2.0 / (a.comm_gbps * 1e9);
    }
    if s.offload.optimizer {
        tail += trainable * 8.0 / link + trainable * 16.0 / 10e9;
    }
    (compute.max(transfer).max(comm) + tail) / tokens
}

/// Every variant of `base` the search tries.
fn variants(base: &JobSpec, gpus: usize) -> Vec<JobSpec> {
    let strategies: Vec<Sharding> = if gpus > 1 {
        vec![
            Sharding::FullShard,
            Sharding::ShardGradOp,
            Sharding::NoShard,
        ]
    } else {
        vec![Sharding::NoShard]
    };
    let quantized = base.train_type.quant_name() != "none";
    let mut mbs = vec![base.micro_batch];
    while *mbs.last().unwrap() > 1 {
        let next = mbs.last().unwrap() / 2;
        mbs.push(next);
    }
    let mut out = Vec::new();
    for &sharding in &strategies {
        for (ck, keep) in [(false, true), (true, true), (true, false)] {
            for cache in [true, false] {
                if cache != base.cache_dequantized && !(ck && quantized) {
                    continue;
                }
                for bits in 0..8u8 {
                    let (p, act, opt) = (bits & 1 != 0, bits & 2 != 0, bits & 4 != 0);
                    if act && !ck {
                        continue;
                    }
                    for &mb in &mbs {
                        let mut s = base.clone();
                        s.world_size = gpus;
                        s.sharding = sharding;
                        s.sharded = sharding != Sharding::NoShard && gpus > 1;
                        s.simulated = false;
                        s.checkpointing = ck;
                        s.keep_attention = keep;
                        s.cache_dequantized = cache;
                        s.offload.params = p;
                        s.offload.activations = act;
                        s.offload.optimizer = opt;
                        s.micro_batch = mb;
                        out.push(s);
                    }
                }
            }
        }
    }
    out
}

fn fits(a: &EstimateArgs, model: &str, base: &JobSpec, gpu_gib: f64) -> Result<String, String> {
    if gpu_gib.is_nan() || gpu_gib <= 0.0 {
        return Err(format!(
            "--gpu-memory {gpu_gib}: give the GiB of one GPU, e.g. 24"
        ));
    }
    let gpus = a.gpus.unwrap_or(a.world_size).max(1);
    let mut found: Vec<(f64, JobSpec, Estimate)> = variants(base, gpus)
        .into_iter()
        .map(|s| {
            let e = estimate(&s);
            (step_time(a, &s, &e), s, e)
        })
        .filter(|(_, _, e)| e.gpu_needed_gib() <= gpu_gib)
        .filter(|(_, _, e)| a.host_memory.is_none_or(|h| e.host_peak_gib() <= h))
        .collect();
    // Fastest first; among equals (within 1%), the least GPU memory.
    let best = found.iter().map(|f| f.0).fold(f64::INFINITY, f64::min);
    let pct = |t: f64| (t / best * 100.0).round();
    found.sort_by(|x, y| {
        pct(x.0)
            .total_cmp(&pct(y.0))
            .then(x.2.gpu_needed_gib().total_cmp(&y.2.gpu_needed_gib()))
    });
    if a.json {
        let list: Vec<_> = found
            .iter()
            .take(20)
            .map(|(t, s, e)| {
                let mut v = estimate_json(model, s, e);
                v["relative_step_time"] = json!(t / best);
                v
            })
            .collect();
        return Ok(serde_json::to_string_pretty(
            &json!({ "gpu_memory_gib": gpu_gib, "gpus": gpus, "fits": list }),
        )
        .expect("JSON"));
    }
    if found.is_empty() {
        return Err(format!(
            "no setting of {model} ({} layers, {} tokens per micro-batch at micro-batch 1) fits \
             {gpus} GPU(s) of {gpu_gib} GiB{}: use more GPUs, a shorter --seq or fewer --layers",
            base.config.num_layers,
            base.seq,
            a.host_memory
                .map(|h| format!(" with {h} GiB of host memory"))
                .unwrap_or_default()
        ));
    }
    let mut t = format!(
        "{model} on {gpus} GPU(s) of {gpu_gib} GiB: {} settings fit; the fastest first \
         (speed model: {} TFLOP/s, host link {} GB/s, collectives {} GB/s)\n\n",
        found.len(),
        a.tflops,
        a.link_gbps,
        a.comm_gbps
    );
    t.push_str(&format!(
        "{:>9} {:>8} {:>9}  settings\n",
        "rel.time", "GPU GiB", "host GiB"
    ));
    for (time, s, e) in found.iter().take(10) {
        t.push_str(&format!(
            "{:>9.2} {:>8.1} {:>9.1}  {}\n",
            time / best,
            e.gpu_needed_gib(),
            e.host_peak_gib(),
            describe(s)
        ));
    }
    Ok(t)
}

/// The job of a config file's settings, on `world` ranks.
fn spec_of_settings(
    s: &crate::config::Settings,
    world: usize,
    gpn: usize,
) -> Result<JobSpec, String> {
    use crate::config::Strategy;
    if s.model.path.is_empty() {
        return Err("model.path is not set: name the model (a preset, folder or hub id) in the config or with --set model.path=...".into());
    }
    let config = crate::shape::model_shape(&s.model.path, "model.path")?;
    let dtype = match s.model.dtype.as_str() {
        "auto" | "bf16" => llmft_tensor::DType::BF16,
        "f16" => llmft_tensor::DType::F16,
        "f32" => llmft_tensor::DType::F32,
        other => {
            return Err(format!(
                "model.dtype `{other}` is not one of auto, bf16, f16, f32"
            ))
        }
    };
    let mut lora_targets = Vec::new();
    for name in llmft_trainer::estimate::LINEARS {
        if s.lora
            .is_targeted(&format!("model.layers.0.{name}"))
            .map_err(|e| e.to_string())?
        {
            lora_targets.push(name.to_string());
        }
    }
    if lora_targets.is_empty() && s.train.train_type.uses_adapter() {
        return Err("lora.target_modules matches none of the decoder's linears".into());
    }
    let b = &s.data.batch;
    let seq = if b.packing && b.seq_len > 0 {
        b.seq_len
    } else {
        s.data.cutoff_len
    };
    let sharding = match s.dist.strategy {
        Strategy::FullShard => Sharding::FullShard,
        Strategy::ShardGradOp => Sharding::ShardGradOp,
        Strategy::NoShard => Sharding::NoShard,
        Strategy::HybridShard => Sharding::HybridShard { gpus_per_node: gpn },
    };
    Ok(JobSpec {
        config,
        train_type: s.train.train_type,
        dtype,
        lora_r: s.lora.r,
        lora_targets,
        freeze_layers: s.train.freeze_trainable_layers,
        seq,
        micro_batch: b.batch_size.max(1),
        checkpointing: s.model.checkpointing,
        keep_attention: s.model.checkpoint_keep_attention,
        skip_layers: s.model.checkpoint_skip_layers,
        cache_dequantized: s.model.checkpoint_cache_dequantized,
        offload: s.offload,
        world_size: world,
        sharded: sharding != Sharding::NoShard && world > 1,
        sharding,
        simulated: false,
    })
}

/// Runs `llmft estimate`.
pub fn run(a: &EstimateArgs) -> Result<(), String> {
    if a.world_size == 0 {
        return Err("--world-size must be at least 1".into());
    }
    let (spec, model) = if a.config.is_some() || !a.set.is_empty() {
        let loaded =
            crate::config::Loaded::load(a.config.as_deref(), &a.set).map_err(|e| e.to_string())?;
        let s = &loaded.settings;
        (
            spec_of_settings(s, a.world_size, a.gpus_per_node)?,
            s.model.path.clone(),
        )
    } else {
        (
            a.job.spec(a.world_size, a.gpus_per_node)?,
            a.job.model.clone(),
        )
    };
    let model = model.as_str();
    let text = match a.gpu_memory {
        Some(g) => format!("{}\n", fits(a, model, &spec, g)?),
        None => {
            let e = estimate(&spec);
            if a.json {
                format!("{}\n", estimate_json(model, &spec, &e))
            } else {
                table(model, &spec, &e)
            }
        }
    };
    // A reader that stops early (`| head`) is not an error.
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(format!("stdout: {e}")),
        _ => Ok(()),
    }
}
