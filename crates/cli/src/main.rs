//! `llmft`: fine-tune large language models on GPUs too small for them.
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use llmft_tensor::{cuda, cuda_device_count, Ctx};

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

#[derive(Subcommand)]
enum Command {
    /// Train (with no arguments: the built-in demo job).
    Train,
    /// Print the GPU, driver, NVRTC and kernel-cache facts for a bug report.
    Env,
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
    let result = match cli.command.unwrap_or(Command::Train) {
        Command::Env => env_report(),
        Command::Train => {
            let ctx = Ctx::best();
            println!("llmft train: device {}", ctx.device());
            println!(
                "plan: built-in Llama-architecture model, QLoRA (NF4 base + LoRA), embedded \
                 arithmetic dataset; training itself lands with the trainer issue"
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
