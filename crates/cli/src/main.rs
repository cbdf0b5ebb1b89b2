//! `llmft`: fine-tune large language models on GPUs too small for them.
use std::process::ExitCode;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use llmft_tensor::{cuda, cuda_device_count, Ctx};

mod config;

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
    Train(ConfigArgs),
    /// Print the GPU, driver, NVRTC and kernel-cache facts for a bug report.
    Env,
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Print the resolved configuration and where each value came from.
    Show(ConfigArgs),
}

fn env_report() -> Result<(), String> {
    println!("llmft {}", env!("CARGO_PKG_VERSION"));
    match cuda::driver_version() {
        Some((maj, min)) => println!("CUDA driver: {maj}.{min}"),
        None => println!("CUDA driver: not found (libcuda.so); the CPU path is used"),
    }
    let n = cuda_device_count();
    println!("GPUs: {n}");
    for i in 0..n {
        let ctx = Ctx::cuda(i).map_err(|e| e.to_string())?;
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
    }
    match llmft_kernels::nvrtc_version() {
        Ok((maj, min)) => println!("NVRTC: {maj}.{min}"),
        Err(e) => println!("NVRTC: {e}"),
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
    println!("NCCL: not used yet (multi-GPU arrives with the FSDP issue)");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result =
        match cli.command.unwrap_or(Command::Train(ConfigArgs::default())) {
            Command::Env => env_report(),
            Command::Config {
                action: ConfigAction::Show(args),
            } => config::Loaded::load(args.config.as_deref(), &args.set)
                .map(|l| print!("{}", l.show()))
                .map_err(|e| e.to_string()),
            Command::Train(args) => {
                let loaded = match config::Loaded::load(args.config.as_deref(), &args.set) {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                let s = &loaded.settings;
                let ctx = Ctx::best();
                println!("llmft train: device {}", ctx.device());
                println!(
                "plan: model {}, base {}, compute {}, LoRA r={} alpha={} on {}; training itself \
                 lands with the trainer issue",
                if s.model.path.is_empty() { "built-in demo" } else { &s.model.path },
                s.model.quant,
                s.model.dtype,
                s.lora.r,
                s.lora.lora_alpha,
                s.lora
                    .target_modules
                    .as_ref()
                    .map(|t| t.to_string())
                    .unwrap_or_else(|| "the default targets".into()),
            );
                Ok(())
            }
        };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
