//! Measures peak host memory while loading a sharded checkpoint onto the GPU.
//!
//! ```sh
//! load_rss write DIR [preset] [layers] [shard_mib]   # random bf16 checkpoint, sharded
//! load_rss load DIR                                  # load onto cuda:0, print peak RSS
//! load_rss load-offloaded DIR                        # NF4 on cuda:0 into pinned host memory
//! ```
//! `write` streams tensor by tensor; `load` prints one JSON line with the
//! process's peak resident set (VmHWM), the largest tensor and the total.
use std::io::Write;
use std::path::Path;

use llmft_models::{Model, ModelConfig};
use llmft_tensor::{Ctx, DType};

fn vm_hwm_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn write(dir: &Path, preset: &str, layers: usize, shard_bytes: usize) {
    let mut c = ModelConfig::preset(preset).unwrap();
    c.num_layers = layers;
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), c.to_hf_json().to_string()).unwrap();
    let all: Vec<(String, Vec<usize>)> =
        (0..c.num_units()).flat_map(|u| c.unit_tensors(u)).collect();
    // Group tensors into shards of about shard_bytes.
    let mut shards: Vec<Vec<(String, Vec<usize>)>> = vec![vec![]];
    let mut size = 0;
    for t in all {
        let b = t.1.iter().product::<usize>() * 2;
        if size > 0 && size + b > shard_bytes {
            shards.push(vec![]);
            size = 0;
        }
        size += b;
        shards.last_mut().unwrap().push(t);
    }
    let n = shards.len();
    let mut map = serde_json::Map::new();
    let mut rng = 0x1234_5678_u64;
    for (i, shard) in shards.iter().enumerate() {
        let fname = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
        let mut header = serde_json::Map::new();
        let mut off = 0usize;
        for (name, shape) in shard {
            let b = shape.iter().product::<usize>() * 2;
            header.insert(name.clone(), serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [off, off + b]}));
            map.insert(name.clone(), fname.clone().into());
            off += b;
        }
        let mut h = serde_json::Value::Object(header).to_string().into_bytes();
        while h.len() % 8 != 0 {
            h.push(b' ');
        }
        let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join(&fname)).unwrap());
        f.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
        f.write_all(&h).unwrap();
        for (_, shape) in shard {
            let n = shape.iter().product::<usize>();
            let mut buf = Vec::with_capacity(n * 2);
            for _ in 0..n {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                // bf16 of a small value: sign/exponent fixed, random mantissa.
                let v: u16 = 0x3c00 | (rng as u16 & 0x7f) | ((rng >> 8) as u16 & 0x8000);
                buf.extend_from_slice(&v.to_le_bytes());
            }
            f.write_all(&buf).unwrap();
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    println!("wrote {n} shards to {}", dir.display());
}

fn load(dir: &Path) {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let largest = (0..cfg.num_units())
        .flat_map(|u| cfg.unit_tensors(u))
        .map(|(_, s)| s.iter().product::<usize>() * 2)
        .max()
        .unwrap();
    let total: usize = (0..cfg.num_units())
        .flat_map(|u| cfg.unit_tensors(u))
        .map(|(_, s)| s.iter().product::<usize>() * 2)
        .sum();
    let ctx = Ctx::cuda(0).unwrap_or_else(|e| {
        eprintln!("no GPU ({e}); loading on the CPU, where the model itself lives in RAM");
        Ctx::cpu()
    });
    let before = vm_hwm_bytes();
    let t0 = std::time::Instant::now();
    let model = Model::from_dir(dir, &ctx, DType::BF16).unwrap();
    ctx.synchronize().unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!(
        "{}",
        serde_json::json!({
            "device": ctx.device().to_string(), "layers": model.config.num_layers,
            "checkpoint_gib": gib(total as u64), "largest_tensor_gib": gib(largest as u64),
            "peak_rss_before_load_gib": gib(before), "peak_rss_gib": gib(vm_hwm_bytes()),
            "bound_gib": gib(largest as u64 + (1 << 30)), "load_seconds": secs,
        })
    );
}

/// Loads `dir` quantized to NF4 on the GPU, tensor by tensor, into an
/// offloaded store (pinned host memory): the host should hold the quantized
/// model and little else.
fn load_offloaded(dir: &Path) {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let total: usize = (0..cfg.num_units())
        .flat_map(|u| cfg.unit_tensors(u))
        .map(|(_, s)| s.iter().product::<usize>() * 2)
        .sum();
    let ctx = Ctx::cuda(0).unwrap_or_else(|_| Ctx::cpu());
    let before = vm_hwm_bytes();
    let t0 = std::time::Instant::now();
    let q = llmft_models::QuantConfig::nf4();
    let model = Model::from_dir_into(dir, &ctx, DType::BF16, Some(&q), &mut |n| {
        let cfg = llmft_offload::OffloadedConfig::default();
        llmft_offload::Offloaded::builder(&ctx, n, cfg)
            .map_err(|e| llmft_models::Error::Invalid(e.to_string()))
    })
    .unwrap();
    ctx.synchronize().unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let held = model.store().bytes();
    let gpu_peak = ctx
        .cuda_ctx()
        .map(|c| gib(c.allocator().stats().peak_in_use as u64));
    println!(
        "{}",
        serde_json::json!({
            "mode": "load_offloaded_nf4", "device": ctx.device().to_string(),
            "layers": model.config.num_layers, "hidden": model.config.hidden_size,
            "checkpoint_bf16_gib": gib(total as u64), "quantized_host_gib": gib(held.host as u64),
            "peak_rss_before_load_gib": gib(before), "peak_rss_gib": gib(vm_hwm_bytes()),
            "bound_gib": gib(held.host as u64 + (2 << 30)), "gpu_peak_gib": gpu_peak,
            "load_seconds": secs, "bf16_read_gb_per_s": total as f64 / secs / 1e9,
        })
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("write") => write(
            Path::new(&args[1]),
            args.get(2).map(String::as_str).unwrap_or("llama3-8b"),
            args.get(3).and_then(|s| s.parse().ok()).unwrap_or(8),
            args.get(4)
                .and_then(|s| s.parse::<usize>().ok())
                .unwrap_or(2048)
                << 20,
        ),
        Some("load") => load(Path::new(&args[1])),
        Some("load-offloaded") => load_offloaded(Path::new(&args[1])),
        _ => {
            eprintln!(
                "usage: load_rss write DIR [preset] [layers] [shard_mib] | load_rss load DIR \
                 | load_rss load-offloaded DIR"
            )
        }
    }
}
