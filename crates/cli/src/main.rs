//! `llmft`: fine-tune large language models on GPUs too small for them.
use std::process::ExitCode;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use llmft_tensor::{cuda, cuda_device_count, Ctx};

use llmft::config;

mod bench;
mod demo;
mod dist;
mod estimate;
mod launch;
mod offload_plan;
mod progress;
mod shape;
mod train;

#[derive(Parser)]
#[command(
    name = "llmft",
    version,
    about = "Fine-tune large language models on small GPUs"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

/// Configuration layers shared by the subcommands.
#[derive(Args, Clone, Default)]
struct ConfigArgs {
    /// Config file (TOML, YAML or JSON).
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Override one key, e.g. `--set lora.r=16` (repeatable; beats the file
    /// and `LLMFT_<SECTION>__<KEY>` variables).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Train (with no arguments: the built-in demo job).
    Train(train::TrainArgs),
    /// Print the GPU, driver, NVRTC and kernel-cache facts for a bug report.
    Env,
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Merge an adapter into `model.path` and export Hugging Face safetensors.
    Merge {
        /// PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
        #[arg(long)]
        adapter: PathBuf,
        /// Output folder (must not exist; written atomically).
        #[arg(long)]
        out: PathBuf,
        /// Shard size in MiB.
        #[arg(long, default_value_t = 5120)]
        shard_mib: usize,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Quantize `model.path` with `model.quant` (nf4, nf4-dq, fp4, int8,
    /// hqq4, hqq3, hqq2) and write it in the bitsandbytes format transformers
    /// writes or the format hqq's `HQQLinear` saves, so llmft, transformers or
    /// hqq load it without quantizing again.
    Quantize {
        /// Output folder (must not exist; written atomically).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Continue a prompt with `model.path` (and optionally an adapter), to
    /// sanity-check a model: greedy, or top-p sampling with a temperature.
    Generate {
        /// The prompt text (tokenized with the model's tokenizer.json).
        #[arg(long)]
        prompt: String,
        /// PEFT adapter folder to apply.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Tokens to generate at most.
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Nucleus mass for sampling.
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// Sampler seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// End-to-end training benchmark on random weights of a named model shape.
    Bench(bench::BenchArgs),
    /// Will this job fit? Per-rank GPU and host memory of a job (the flags
    /// `bench` takes), from the model's config alone; with --gpu-memory,
    /// the settings that fit, fastest first.
    Estimate(estimate::EstimateArgs),
    /// Start the ranks of a multi-process job on this node, as torchrun does.
    ///
    /// Each rank runs an llmft subcommand (or with --exec, any program) with
    /// RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set; the
    /// first rank to fail stops the rest.
    Launch(launch::LaunchArgs),
    /// Dataset tools.
    Data {
        #[command(subcommand)]
        action: DataAction,
    },
}

#[derive(Subcommand)]
enum DataAction {
    /// Render the first examples of each training dataset with the trained
    /// spans marked, then the dataset statistics.
    Inspect {
        /// Examples to show per dataset.
        #[arg(long, short = 'n', default_value_t = 3)]
        n: usize,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Print the resolved configuration and where each value came from (as
    /// `train` resolves it: with the demo job's layer when model.path is unset).
    Show(ConfigArgs),
}

fn env_report() -> Result<(), String> {
    let build = llmft_kernels::cuda_build::BUILD;
    println!("llmft {} ({})", env!("CARGO_PKG_VERSION"), build.describe());
    let mut driver_fits = true;
    match cuda::driver_version_code() {
        Some(v) => {
            println!(
                "CUDA driver: {}",
                llmft_kernels::cuda_build::driver_string(v)
            );
            if let Some(advice) = llmft_kernels::cuda_build::driver_advice(build, v) {
                println!("  {advice}");
                driver_fits = false;
            }
        }
        None => println!("CUDA driver: not found (libcuda.so); the CPU path is used"),
    }
    let n = cuda_device_count();
    println!("GPUs: {n}");
    if driver_fits {
        for i in 0..n {
            let ctx = match Ctx::cuda(i) {
                Ok(c) => c,
                Err(e) => {
                    println!("  cuda:{i}: {e}");
                    continue;
                }
            };
            let cu = ctx.cuda_ctx().expect("CUDA context");
            let (free, total) = cu.mem_info().map_err(|e| e.to_string())?;
            let (maj, min) = cu.arch();
            println!(
                "  cuda:{i}: {} (sm_{maj}{min}, {} SMs), {:.1} GiB free of {:.1} GiB",
                cu.name(),
                cu.sm_count(),
                free as f64 / (1u64 << 30) as f64,
                total as f64 / (1u64 << 30) as f64
            );
            println!("    {}", cu.kernel_path().describe());
            // Where the shared memory is short, the fused attention's
            // backward takes smaller tiles (or the attention is materialized).
            let tiles = |d: usize| {
                llmft_tensor::ops::flash_attn_bwd_tiles(&ctx, d)
                    .map(|(k, q)| format!("{k} keys × {q} queries"))
                    .unwrap_or_else(|| "none, materialized".into())
            };
            println!(
                "    fused attention backward tiles: head dim 64 {}, head dim 128 {}",
                tiles(64),
                tiles(128)
            );
            if !build.archs().contains(&(maj * 10 + min)) && maj * 10 + min < 75 {
                println!(
                    "    sm_{maj}{min} needs the CUDA 12 build (NVRTC 13 no longer compiles for it): {}",
                    llmft_kernels::cuda_build::CudaBuild::Cuda12.build_command()
                );
            }
        }
    }
    match llmft_kernels::nvrtc_version() {
        Ok((maj, min)) => {
            println!("NVRTC: {maj}.{min}");
            if let Some(advice) = llmft_kernels::cuda_build::nvrtc_advice(build, maj) {
                println!("  {advice}");
            }
        }
        Err(e) => println!("NVRTC: {e}"),
    }
    if cuda::cublaslt_present() {
        println!("cuBLASLt: found");
    } else {
        println!(
            "cuBLASLt: not found (libcublasLt.so.{}): GPU GEMMs need it; install the CUDA {} \
             toolkit or pip's nvidia-cublas{} and put its lib folder on LD_LIBRARY_PATH",
            build.major(),
            build.major(),
            if build.major() == 12 { "-cu12" } else { "" }
        );
    }
    let inc = llmft_kernels::find_cuda_include_dirs();
    println!(
        "CUDA headers: {}",
        if inc.is_empty() {
            "none found (not needed: llmft's kernels carry their own bf16 helpers)".to_string()
        } else {
            inc.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    match cuda::nccl_version() {
        Some((a, b, c)) => {
            println!("NCCL: {a}.{b}.{c} (the backend of multi-GPU jobs)")
        }
        None => println!("NCCL: not found (libnccl.so.2); only needed for multi-GPU training"),
    }
    Ok(())
}

/// The compute dtype of `model.dtype` on `ctx` (`auto`: bf16 on Ampere or
/// newer, f16 on older GPUs, f32 on the CPU).
fn dtype_for(name: &str, ctx: &Ctx) -> Result<llmft_tensor::DType, String> {
    let path = ctx.cuda_ctx().map(|c| c.kernel_path());
    match name {
        "auto" => {
            let dt = train::auto_dtype(ctx.device(), path.map(|p| p.path / 10));
            if dt == llmft_tensor::DType::F16 {
                announce_f16(path);
            }
            Ok(dt)
        }
        "bf16" => match path {
            Some(p) if !p.has_bf16() => Err(bf16_refusal(&p)),
            _ => Ok(llmft_tensor::DType::BF16),
        },
        "f16" => Ok(llmft_tensor::DType::F16),
        "f32" => Ok(llmft_tensor::DType::F32),
        other => Err(format!(
            "model.dtype `{other}` is not one of auto, bf16, f16, f32"
        )),
    }
}

/// Why `model.dtype = "bf16"` is refused on a kernel path without bf16.
fn bf16_refusal(p: &llmft_kernels::arch::KernelPath) -> String {
    let how = if p.forced {
        format!(" (forced by LLMFT_KERNEL_ARCH={})", p.path)
    } else {
        String::new()
    };
    format!(
        "model.dtype = \"bf16\" needs an sm_80 (Ampere) or newer kernel path, but this GPU \
         takes the sm_{} path{how}: set model.dtype = \"f16\" (trained with dynamic loss \
         scaling) or \"auto\"",
        p.path
    )
}

/// Says once that `auto` picked fp16 because the kernel path has no bf16.
fn announce_f16(path: Option<llmft_kernels::arch::KernelPath>) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    if let Some(p) = path {
        ONCE.call_once(|| {
            eprintln!(
                "model.dtype auto: fp16 compute with dynamic loss scaling (sm_{} path: no bf16 before sm_80)",
                p.path
            )
        });
    }
}

fn device_ctx(name: &str) -> Result<Ctx, String> {
    if name == "auto" {
        return Ok(Ctx::best());
    }
    let dev: llmft_tensor::Device = name
        .parse()
        .map_err(|e: llmft_tensor::Error| e.to_string())?;
    Ctx::new(dev).map_err(|e| e.to_string())
}

fn model_dir(s: &config::Settings) -> Result<PathBuf, String> {
    if s.model.path.is_empty() {
        return Err("set model.path (a Hugging Face folder or model id), e.g. --set model.path=meta-llama/Llama-3.1-8B".into());
    }
    llmft_models::resolve_model(&s.model.path).map_err(|e| e.to_string())
}

fn merge(
    adapter: &std::path::Path,
    out: &std::path::Path,
    shard_mib: usize,
    s: &config::Settings,
) -> Result<(), String> {
    let ctx = device_ctx(&s.model.device)?;
    let dtype = dtype_for(&s.model.dtype, &ctx)?;
    let dir = model_dir(s)?;
    // Merging works on the dense base: a quantized base would bake its
    // rounding error into the export.
    let mut model = llmft_models::Model::from_dir(&dir, &ctx, dtype).map_err(|e| e.to_string())?;
    let a = llmft_lora::Adapter::load(&ctx, adapter, &model.linear_shapes())
        .map_err(|e| e.to_string())?;
    let n = a.layers.len();
    model.attach_adapter(a);
    model
        .export_merged(out, dtype, shard_mib.max(1) << 20)
        .map_err(|e| e.to_string())?;
    println!(
        "merged {n} adapted linears into {} ({})",
        out.display(),
        s.model.dtype
    );
    Ok(())
}

/// The quantization of `model.quant`.
/// The store a model's units are loaded into: offloaded to pinned host
/// memory when `offload.params` is set, else resident on `ctx`.
fn store_builder(
    ctx: &Ctx,
    offload: &config::OffloadSettings,
    num_units: usize,
) -> Result<Box<dyn llmft_models::StoreBuilder>, String> {
    if !offload.params {
        return Ok(llmft_models::Resident::builder(ctx, num_units));
    }
    let cfg = llmft_offload::OffloadedConfig {
        lookahead: offload.lookahead,
        keep_embedding: offload.keep_embedding,
        ..Default::default()
    };
    llmft_offload::Offloaded::builder(ctx, num_units, cfg).map_err(|e| e.to_string())
}

fn quant_of(name: &str) -> Result<Option<llmft_quant::QuantConfig>, String> {
    use llmft_quant::QuantConfig;
    Ok(match name {
        "none" | "auto" => None,
        "nf4" => Some(QuantConfig::nf4()),
        "nf4-dq" => Some(QuantConfig::nf4_double_quant()),
        "fp4" => Some(QuantConfig::fp4()),
        "int8" => Some(QuantConfig::int8()),
        "hqq4" => Some(QuantConfig::hqq(4)),
        "hqq3" => Some(QuantConfig::hqq(3)),
        "hqq2" => Some(QuantConfig::hqq(2)),
        other => {
            return Err(format!(
                "model.quant `{other}` is not one of auto, none, nf4, nf4-dq, fp4, int8, hqq4, hqq3, hqq2"
            ))
        }
    })
}

fn quantize(out: &std::path::Path, s: &config::Settings) -> Result<(), String> {
    use llmft_quant::io::{bnb_state_dict, hqq_state_dict, write_safetensors, RawTensor};
    // `auto` quantizes to NF4, bitsandbytes' QLoRA default.
    let name = if s.model.quant == "auto" {
        "nf4"
    } else {
        s.model.quant.as_str()
    };
    let quant = quant_of(name)?;
    let qcfg = match (name, &quant) {
        ("nf4" | "nf4-dq" | "fp4" | "int8" | "hqq4" | "hqq3" | "hqq2", Some(q)) => *q,
        _ => {
            return Err(format!(
                "llmft quantize writes bitsandbytes formats (nf4, nf4-dq, fp4, int8) or hqq (hqq4, hqq3, hqq2); model.quant is `{}`",
                s.model.quant
            ))
        }
    };
    if out.exists() {
        return Err(format!(
            "{}: the output folder already exists",
            out.display()
        ));
    }
    let ctx = device_ctx(&s.model.device)?;
    let dtype = dtype_for(&s.model.dtype, &ctx)?;
    let st_dtype = match dtype {
        llmft_tensor::DType::F32 => safetensors::Dtype::F32,
        llmft_tensor::DType::F16 => safetensors::Dtype::F16,
        _ => safetensors::Dtype::BF16,
    };
    let dir = model_dir(s)?;
    let model = llmft_models::Model::from_dir_quantized(&dir, &ctx, dtype, Some(&qcfg))
        .map_err(|e| e.to_string())?;
    let cpu = Ctx::cpu();
    let mut tensors = Vec::new();
    for u in 0..model.config.num_units() {
        let unit = model
            .unit(llmft_models::Unit::from_index(u, model.config.num_units()))
            .map_err(|e| e.to_string())?;
        for (name, shape) in model.config.unit_tensors(u) {
            match unit.quantized(&name) {
                Some(q) => tensors.extend(
                    match qcfg {
                        llmft_quant::QuantConfig::Hqq(_) => hqq_state_dict(&name, q),
                        _ => bnb_state_dict(&name, q),
                    }
                    .map_err(|e| e.to_string())?,
                ),
                None => {
                    let t = unit.get(&name).map_err(|e| e.to_string())?;
                    let host = t.to_ctx(&cpu).map_err(|e| e.to_string())?;
                    let data = host.as_bytes().map_err(|e| e.to_string())?.to_vec();
                    tensors.push((
                        name,
                        RawTensor {
                            dtype: st_dtype,
                            shape,
                            data,
                        },
                    ));
                }
            }
        }
    }
    let tmp = out.with_extension("tmp-quantize");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let write = || -> Result<(), String> {
        write_safetensors(&tmp.join("model.safetensors"), &tensors).map_err(|e| e.to_string())?;
        let mut cfg = model.hf_config_json(dtype);
        let torch = match dtype {
            llmft_tensor::DType::F32 => "float32",
            llmft_tensor::DType::F16 => "float16",
            _ => "bfloat16",
        };
        let qc = match (name, qcfg) {
            // transformers keeps lm_head dense by default, as llmft does.
            (_, llmft_quant::QuantConfig::Hqq(h)) => {
                llmft_quant::io::hqq_quantization_config(&h, &["lm_head"])
            }
            ("int8", _) => {
                serde_json::json!({"quant_method": "bitsandbytes", "load_in_8bit": true})
            }
            (q, _) => serde_json::json!({
                "quant_method": "bitsandbytes", "load_in_4bit": true,
                "bnb_4bit_quant_type": if q == "fp4" { "fp4" } else { "nf4" },
                "bnb_4bit_use_double_quant": q == "nf4-dq",
                "bnb_4bit_compute_dtype": torch,
                "bnb_4bit_quant_storage": "uint8",
            }),
        };
        cfg["quantization_config"] = qc;
        let text = serde_json::to_string_pretty(&cfg).map_err(|e| e.to_string())?;
        std::fs::write(tmp.join("config.json"), text).map_err(|e| e.to_string())?;
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ] {
            if dir.join(f).is_file() {
                std::fs::copy(dir.join(f), tmp.join(f)).map_err(|e| format!("{f}: {e}"))?;
            }
        }
        std::fs::rename(&tmp, out).map_err(|e| format!("{}: {e}", out.display()))
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_dir_all(&tmp);
    })?;
    println!("wrote {name} ({dtype}) to {}", out.display());
    Ok(())
}

struct GenerateArgs<'a> {
    prompt: &'a str,
    adapter: Option<&'a std::path::Path>,
    opts: llmft_models::GenerateOpts,
}

fn generate(g: &GenerateArgs<'_>, s: &config::Settings) -> Result<(), String> {
    let ctx = device_ctx(&s.model.device)?;
    let dtype = dtype_for(&s.model.dtype, &ctx)?;
    let dir = model_dir(s)?;
    let tok = llmft_data::ModelTokenizer::from_dir(&dir).map_err(|e| e.to_string())?;
    let quant = quant_of(&s.model.quant)?;
    let mut model = llmft_models::Model::from_dir_quantized(&dir, &ctx, dtype, quant.as_ref())
        .map_err(|e| e.to_string())?;
    if let Some(a) = g.adapter {
        let adapter = llmft_lora::Adapter::load(&ctx, a, &model.linear_shapes())
            .map_err(|e| e.to_string())?;
        model.attach_adapter(adapter);
    }
    let (ids, _) = tok.encode(g.prompt, true).map_err(|e| e.to_string())?;
    let prompt: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    let mut opts = g.opts.clone();
    opts.stop.extend(tok.eos_id().map(|i| i as i32));
    let out = model.generate(&prompt, &opts).map_err(|e| e.to_string())?;
    let out: Vec<u32> = out.iter().map(|&i| i as u32).collect();
    println!(
        "{}{}",
        g.prompt,
        tok.decode(&out).map_err(|e| e.to_string())?
    );
    Ok(())
}

fn data_inspect(n: usize, s: &config::Settings) -> Result<(), String> {
    let dir = model_dir(s)?;
    let tok = llmft_data::ModelTokenizer::from_dir(&dir).map_err(|e| e.to_string())?;
    let pipeline = llmft_data::Pipeline::new(s.data.clone(), tok)
        .map_err(|e| e.to_string())?
        .with_progress(progress::data_progress(false));
    if s.data.train.is_empty() {
        return Err(
            "set data.train to at least one dataset (a file, folder, glob or dataset id)".into(),
        );
    }
    for spec in &s.data.train {
        for (at, view) in pipeline.inspect(spec, n).map_err(|e| e.to_string())? {
            println!("== {at}\n{view}\n");
        }
    }
    let data = pipeline.load().map_err(|e| e.to_string());
    progress::end_line();
    println!("{}", data?.train.stats());
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    progress::install_load_progress(matches!(&cli.command, Some(Command::Train(a)) if a.quiet));
    let result = match cli
        .command
        .unwrap_or(Command::Train(train::TrainArgs::default()))
    {
        Command::Env => env_report(),
        Command::Bench(args) => bench::run(&args),
        Command::Estimate(args) => estimate::run(&args),
        Command::Config {
            action: ConfigAction::Show(args),
        } => train::settings(args.config.as_deref(), &args.set).map(|l| print!("{}", l.show())),
        Command::Merge {
            adapter,
            out,
            shard_mib,
            cfg,
        } => config::Loaded::load(cfg.config.as_deref(), &cfg.set)
            .map_err(|e| e.to_string())
            .and_then(|l| merge(&adapter, &out, shard_mib, &l.settings)),
        Command::Quantize { out, cfg } => config::Loaded::load(cfg.config.as_deref(), &cfg.set)
            .map_err(|e| e.to_string())
            .and_then(|l| quantize(&out, &l.settings)),
        Command::Generate {
            prompt,
            adapter,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            cfg,
        } => {
            let g = GenerateArgs {
                prompt: &prompt,
                adapter: adapter.as_deref(),
                opts: llmft_models::GenerateOpts {
                    max_new_tokens,
                    temperature,
                    top_p,
                    seed,
                    stop: Vec::new(),
                },
            };
            config::Loaded::load(cfg.config.as_deref(), &cfg.set)
                .map_err(|e| e.to_string())
                .and_then(|l| generate(&g, &l.settings))
        }
        Command::Data {
            action: DataAction::Inspect { n, cfg },
        } => config::Loaded::load(cfg.config.as_deref(), &cfg.set)
            .map_err(|e| e.to_string())
            .and_then(|l| data_inspect(n, &l.settings)),
        Command::Train(args) => train::run(&args),
        Command::Launch(args) => return launch::main(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
