//! `llmft_trainer::estimate` against every GPU peak measured under
//! `benches/results/`: each llmft row of a real model shape must agree
//! within 10% (GPU allocator peak; host peak where the host holds more than
//! 2 GiB). A new measurement that disagrees fails here.
use std::path::{Path, PathBuf};

use llmft_models::ModelConfig;
use llmft_tensor::DType;
use llmft_trainer::estimate::{estimate, JobSpec, Sharding};
use llmft_trainer::{OffloadSettings, TrainType};
use serde_json::Value;

/// Result files measured before the code whose memory the estimate
/// follows (the allocator and attention changed since; later runs of the
/// same jobs superseded them, see benches/results/e2e/README.md).
const SUPERSEDED: &[&str] = &[
    "e2e/h200-run1-before.jsonl",
    "e2e/h200-run2-profile.jsonl",
    "e2e/h200-run3-final.jsonl",
    "e2e/h200-run4-fused-attention.jsonl",
];

const TOLERANCE: f64 = 0.10;

fn results_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../benches/results")
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            files(&p, out);
        } else if matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("jsonl" | "json")
        ) {
            out.push(p);
        }
    }
}

fn b(v: &Value, key: &str, default: bool) -> bool {
    v.get(key).and_then(Value::as_bool).unwrap_or(default)
}
fn u(v: &Value, key: &str, default: usize) -> usize {
    v.get(key)
        .and_then(Value::as_u64)
        .map_or(default, |x| x as usize)
}

/// The job a result row measured.
fn job_of(v: &Value) -> JobSpec {
    let model = v["model"].as_str().unwrap();
    let mut config = ModelConfig::preset(model).unwrap();
    config.num_layers = u(v, "layers", config.num_layers);
    let train_type: TrainType = serde_json::from_value(v["train_type"].clone()).unwrap();
    let dtype = match v.get("dtype").and_then(Value::as_str).unwrap_or("bf16") {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ => DType::F32,
    };
    let o = v.get("offload").cloned().unwrap_or(Value::Null);
    let offload = OffloadSettings {
        params: b(&o, "params", false),
        activations: b(&o, "activations", false),
        optimizer: b(&o, "optimizer", false),
        lookahead: u(&o, "lookahead", 1),
        // Rows from before the setting existed kept nothing resident.
        keep_embedding: b(&o, "keep_embedding", false),
    };
    let world_size = u(v, "world_size", 1);
    let simulated = b(v, "simulated", false);
    let strategy = v.get("strategy").and_then(Value::as_str).unwrap_or("none");
    let sharding = match strategy {
        "full_shard" => Sharding::FullShard,
        "shard_grad_op" => Sharding::ShardGradOp,
        _ => Sharding::NoShard,
    };
    let backend = v.get("backend").and_then(Value::as_str);
    JobSpec {
        config,
        train_type,
        dtype,
        lora_r: u(v, "lora_r", 16),
        lora_targets: Vec::new(),
        freeze_layers: 2,
        seq: u(v, "seq", 2048),
        micro_batch: u(v, "micro_batch", 1),
        checkpointing: b(v, "checkpointing", true),
        keep_attention: b(v, "checkpoint_keep_attention", true),
        skip_layers: u(v, "checkpoint_skip_layers", 0),
        cache_dequantized: b(v, "checkpoint_cache_dequantized", true),
        offload,
        world_size,
        sharded: sharding != Sharding::NoShard
            && (world_size > 1 || simulated || backend.is_some()),
        sharding,
        simulated,
    }
}

#[test]
fn estimates_agree_with_the_measured_peaks() {
    let root = results_dir();
    let mut all = Vec::new();
    files(&root, &mut all);
    let (mut checked, mut failures) = (0, Vec::new());
    for path in &all {
        let rel = path
            .strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        if SUPERSEDED.contains(&rel.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(path).unwrap();
        for (i, line) in text.lines().enumerate() {
            let Ok(v) = serde_json::from_str::<Value>(line.trim()) else {
                continue;
            };
            let real_shape = v
                .get("model")
                .and_then(Value::as_str)
                .is_some_and(|m| ModelConfig::preset(m).is_ok());
            if v.get("impl").and_then(Value::as_str) != Some("llmft")
                || !real_shape
                || v.get("peak_gib").and_then(Value::as_f64).is_none()
            {
                continue;
            }
            // Rows that took the materialized attention where the estimate
            // (which follows the attention a current build on sm_70+ takes)
            // expects the fused kernel: an earlier build on a forced kernel
            // path, kept for its speed.
            let job = job_of(&v);
            if v.get("attention").and_then(Value::as_str) == Some("materialized")
                && job.fused_attention()
            {
                continue;
            }
            let est = estimate(&job);
            let tag = v.get("tag").and_then(Value::as_str).unwrap_or("");
            let mut check = |what: &str, measured: f64, estimated: f64| {
                let err = estimated / measured - 1.0;
                println!(
                    "{rel}:{} {tag:<48} {what:<4} measured {measured:7.3} estimated {estimated:7.3} ({:+.1}%) at {}",
                    i + 1,
                    100.0 * err,
                    est.gpu_peak_at
                );
                checked += 1;
                if err.abs() > TOLERANCE {
                    failures.push(format!(
                        "{rel}:{} {tag}: {what} peak measured {measured:.3} GiB, estimated {estimated:.3} GiB ({:+.1}%)",
                        i + 1,
                        100.0 * err
                    ));
                }
            };
            check("gpu", v["peak_gib"].as_f64().unwrap(), est.gpu_peak_gib());
            if let Some(host) = v.get("host_rss_peak_gib").and_then(Value::as_f64) {
                if host > 2.0 {
                    check("host", host, est.host_peak_gib());
                }
            }
        }
    }
    assert!(
        checked >= 30,
        "only {checked} measured peaks found under {}",
        root.display()
    );
    assert!(
        failures.is_empty(),
        "{} of {checked} disagree:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
