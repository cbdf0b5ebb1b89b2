//! `llmft train`: settings → model (base per `train.train_type`) → data →
//! [`llmft_trainer::train`] → adapter or weights; the built-in demo job when
//! no model is configured.
use std::path::{Path, PathBuf};

use llmft_data::{DatasetSpec, ModelTokenizer, Pipeline};
use llmft_models::Model;
use llmft_tensor::{DType, Device};
use llmft_trainer::{RunData, RunOptions, TrainType};

use crate::config::{Loaded, Settings};
use crate::{demo, dtype_for, quant_of, ConfigArgs};

/// Arguments of `llmft train`.
#[derive(clap::Args, Clone, Default)]
pub struct TrainArgs {
    #[command(flatten)]
    pub cfg: ConfigArgs,
    /// Continue from a checkpoint: its folder, or with no value (or
    /// `latest`) the newest `checkpoint-<step>` in `train.output_dir`.
    #[arg(long, num_args = 0..=1, default_missing_value = "latest", value_name = "CHECKPOINT")]
    pub resume: Option<PathBuf>,
    /// Shorthand for `--set model.path=...`.
    #[arg(long)]
    pub model: Option<String>,
    /// Shorthand for `--set train.train_type=...`.
    #[arg(long)]
    pub train_type: Option<String>,
    /// Shorthand for `--set train.output_dir=...`.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Shorthand for `--set train.max_steps=...`.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// No progress bar or progress lines.
    #[arg(long)]
    pub quiet: bool,
}

impl TrainArgs {
    /// `--set` flags with the typed flags last (they win).
    fn sets(&self) -> Vec<String> {
        let mut sets = self.cfg.set.clone();
        let quote = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
        if let Some(m) = &self.model {
            sets.push(format!("model.path={}", quote(m)));
        }
        if let Some(t) = &self.train_type {
            sets.push(format!("train.train_type={}", quote(t)));
        }
        if let Some(d) = &self.output_dir {
            sets.push(format!("train.output_dir={}", quote(&d.to_string_lossy())));
        }
        if let Some(n) = self.max_steps {
            sets.push(format!("train.max_steps={n}"));
        }
        sets
    }
}

/// The settings of a train run: with the demo's layer when no model is set.
pub fn settings(file: Option<&Path>, sets: &[String]) -> Result<Loaded, String> {
    let plain = Loaded::load(file, sets).map_err(|e| e.to_string())?;
    if !plain.settings.model.path.is_empty() {
        return Ok(plain);
    }
    Loaded::load_over(Some(demo::SETTINGS), file, sets).map_err(|e| e.to_string())
}

/// The base quantization of a run: `train.train_type`'s, refined by an
/// explicit `model.quant` of the same family.
fn base_quant(s: &Settings) -> Result<&str, String> {
    let t = s.train.train_type;
    let implied = t.quant_name();
    let q = s.model.quant.as_str();
    let family: &[&str] = match t {
        TrainType::Qlora | TrainType::BnbDora => &["nf4", "nf4-dq", "fp4"],
        TrainType::HqqLora | TrainType::HqqDora => &["hqq4", "hqq3", "hqq2"],
        TrainType::Int8Lora => &["int8"],
        TrainType::Lora | TrainType::Full | TrainType::Freeze => &["none"],
    };
    match q {
        "auto" => Ok(implied),
        q if family.contains(&q) => Ok(q),
        q => Err(format!(
            "model.quant = \"{q}\" does not fit train.train_type = \"{}\" (a {} base: {}); \
             leave model.quant at \"auto\" or pick another train type",
            serde_json::to_value(t)
                .expect("train type serializes")
                .as_str()
                .unwrap_or("?"),
            implied,
            family.join(", ")
        )),
    }
}

/// Copies the tokenizer files of `src` into `dst` (so an exported model or
/// adapter folder is usable on its own).
fn copy_tokenizer(src: &Path, dst: &Path) -> Result<(), String> {
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
    ] {
        if src.join(f).is_file() && dst.is_dir() {
            std::fs::copy(src.join(f), dst.join(f))
                .map_err(|e| format!("{}: {e}", dst.join(f).display()))?;
        }
    }
    Ok(())
}

/// The OOM advice: which settings lower the peak, with their values now.
fn oom_advice(s: &Settings) -> String {
    let b = &s.data.batch;
    let seq = if b.seq_len == 0 {
        s.data.cutoff_len
    } else {
        b.seq_len
    };
    let mut tips = vec![
        format!("data.batch.batch_size (now {})", b.batch_size),
        format!("data.batch.seq_len / data.cutoff_len (now {seq} tokens per row)"),
    ];
    if !s.model.checkpointing {
        tips.push("set model.checkpointing = true".into());
    } else if s.model.checkpoint_skip_layers > 0 {
        tips.push(format!(
            "model.checkpoint_skip_layers (now {})",
            s.model.checkpoint_skip_layers
        ));
    }
    if !s.train.train_type.uses_adapter() || s.train.train_type == TrainType::Lora {
        tips.push("use a 4-bit base (train.train_type = \"qlora\")".into());
    }
    format!(
        "; lower {}, and raise train.grad_accum (now {}) to keep the tokens per step",
        tips.join(", "),
        s.train.grad_accum
    )
}

/// `llmft train`.
pub fn run(args: &TrainArgs) -> Result<(), String> {
    let mut s = settings(args.cfg.config.as_deref(), &args.sets())?.settings;
    let world = crate::dist::world()?;
    let ctx = crate::dist::device_for(&s, &world)?;
    let job = crate::dist::join(&s, &world, &ctx)?;
    let lead = world.rank == 0;
    // Ranks other than 0 train silently; their errors still print.
    let say = |line: String| {
        if lead {
            println!("{line}");
        }
    };
    let dtype = dtype_for(&s.model.dtype, &ctx)?;
    let is_demo = s.model.path.is_empty();
    let dir = if is_demo {
        // One rank writes the demo files; the others read them after it.
        if lead {
            demo::materialize(&s.train.output_dir)?;
        }
        if let Some(j) = &job {
            j.group
                .barrier(&ctx)
                .map_err(|e| format!("rank {}: {e}", world.rank))?;
        }
        let files = demo::materialize(&s.train.output_dir)?;
        if s.data.train.is_empty() {
            s.data.train = vec![DatasetSpec::new(files.train_file.to_string_lossy())];
        }
        say(format!(
            "llmft train: the built-in demo job (model and data in {})",
            s.train.output_dir.join("demo").display()
        ));
        files.model_dir
    } else {
        crate::model_dir(&s)?
    };
    if s.data.train.is_empty() {
        return Err(
            "set data.train to at least one dataset (a file, folder, glob or dataset id)".into(),
        );
    }
    let quant_name = base_quant(&s)?;
    let quant = quant_of(quant_name)?;
    let tt = s.train.train_type;
    say(format!(
        "device {}, compute {dtype}, base {quant_name}, train type {}{}",
        ctx.device(),
        serde_json::to_value(tt)
            .expect("serializes")
            .as_str()
            .unwrap_or("?"),
        match &job {
            Some(j) => format!(
                ", {} ranks ({} backend, {})",
                world.world_size,
                j.group.backend(),
                j.strategy.name()
            ),
            None => String::new(),
        }
    ));

    let tok = ModelTokenizer::from_dir(&dir).map_err(|e| e.to_string())?;
    let pipeline = Pipeline::new(s.data.clone(), tok)
        .map_err(|e| e.to_string())?
        .with_progress(crate::progress::data_progress(args.quiet));
    let data = pipeline.load().map_err(|e| e.to_string());
    crate::progress::end_line();
    let data = data?;
    say(format!("data: {}", data.report));
    say(format!("train: {}", data.train.stats()));
    if let Some(v) = &data.validation {
        say(format!("validation: {}", v.stats()));
    }

    // Host memory for the [offload] settings, before anything is pinned.
    let config = llmft_models::ModelConfig::from_file(&dir.join("config.json"))
        .map_err(|e| e.to_string())?;
    let row = match s.data.batch.seq_len {
        0 => data.train.stats().max_len,
        n => n,
    };
    let mut plan = crate::offload_plan::HostPlan::of(
        &s,
        &config,
        dtype,
        quant.as_ref(),
        row * s.data.batch.batch_size,
    );
    if let Some(j) = &job {
        plan.params = plan.params.div_ceil(j.shard_world());
    }
    plan.check()?;
    let mut model = Model::from_dir_into(&dir, &ctx, dtype, quant.as_ref(), &mut |n| {
        match &job {
            Some(j) => j.store_builder(&ctx, &s.offload, n),
            None => crate::store_builder(&ctx, &s.offload, n),
        }
        .map_err(llmft_models::Error::Invalid)
    })
    .map_err(|e| e.to_string())?;
    model.offload_activations = s.offload.activations;
    model.checkpointing = s.model.checkpointing;
    model.checkpoint_keep_attention = s.model.checkpoint_keep_attention;
    model.checkpoint_skip_layers = s.model.checkpoint_skip_layers;
    model.checkpoint_cache_dequantized = s.model.checkpoint_cache_dequantized;
    let resume = args.resume.as_ref().map(|p| {
        if p.as_os_str() == "latest" {
            llmft_trainer::latest_checkpoint(&s.train.output_dir)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| {
                    format!(
                        "--resume: no checkpoint-<step> folder in {}",
                        s.train.output_dir.display()
                    )
                })
        } else {
            Ok(p.clone())
        }
    });
    let resume = resume.transpose()?;
    if tt.uses_adapter() && resume.is_none() {
        let mut lora = s.lora.clone();
        lora.use_dora = lora.use_dora || tt.dora();
        let adapter = model
            .new_adapter(lora, s.train.seed)
            .map_err(|e| format!("lora: {e}"))?;
        model.attach_adapter(adapter);
    }
    let questions = if is_demo { demo::heldout() } else { Vec::new() };
    let tok = pipeline.encoder().tokenizer();
    let before = if is_demo && resume.is_none() {
        let a = demo::accuracy(&model, tok, &questions)?;
        say(format!("held-out answer accuracy before training: {a}"));
        Some(a.all)
    } else {
        None
    };
    if let Some(r) = &resume {
        say(format!("resuming from {}", r.display()));
    }
    let opts = RunOptions {
        resume,
        progress: true,
        quiet: args.quiet,
        title: Some(if is_demo {
            "llmft demo model".to_string()
        } else {
            s.model.path.clone()
        }),
        dist: job.as_ref().map(|j| {
            llmft_trainer::DataParallel::new(j.group.clone())
                .with_sharded_optimizer(j.strategy != crate::config::Strategy::NoShard)
        }),
    };
    let run_data = RunData {
        train: &data.train,
        validation: data.validation.as_ref(),
        config: &s.data,
    };
    let summary =
        llmft_trainer::train(&mut model, train_config(&s), run_data, &opts).map_err(|e| {
            let msg = if llmft_trainer::is_out_of_memory(&e) {
                format!("{e}{}", oom_advice(&s))
            } else {
                e.to_string()
            };
            match &job {
                Some(_) => format!("rank {}: {msg}", world.rank),
                None => msg,
            }
        })?;
    if lead && !tt.uses_adapter() {
        copy_tokenizer(&dir, &summary.output)?;
    }
    if let Some(m) = summary.merged.as_ref().filter(|_| lead) {
        copy_tokenizer(&dir, m)?;
    }
    let losses = match (summary.first_loss, summary.last_loss) {
        (Some(a), Some(b)) => format!(", loss {a:.4} → {b:.4}"),
        _ => String::new(),
    };
    // Every rank generates (a sharded store's fetches are collectives).
    let after = match is_demo {
        true => Some(demo::accuracy(&model, tok, &questions)?),
        false => None,
    };
    if !lead {
        return Ok(());
    }
    println!(
        "trained steps {}..{} in {:.1} s{losses}{}",
        summary.start_step + 1,
        summary.steps,
        summary.seconds,
        if summary.skipped_steps > 0 {
            format!(" ({} skipped as non-finite)", summary.skipped_steps)
        } else {
            String::new()
        }
    );
    if let Some(e) = &summary.eval {
        println!(
            "validation loss {:.4}, perplexity {:.3}",
            e.loss, e.perplexity
        );
    }
    if let Some(after) = after {
        println!("held-out answer accuracy after training: {after}");
        if let Some(b) = before {
            println!(
                "held-out answer accuracy: {:.1}% before, {:.1}% after training",
                100.0 * b,
                100.0 * after.all
            );
        }
    }
    println!(
        "wrote {} ({}), metrics {}{}",
        summary.output.display(),
        if tt.uses_adapter() {
            "PEFT adapter"
        } else {
            "HF safetensors"
        },
        summary.metrics.display(),
        summary
            .plot
            .as_ref()
            .map(|p| format!(", loss curve {}", p.display()))
            .unwrap_or_default()
    );
    if let Some(m) = &summary.merged {
        println!("merged model: {}", m.display());
    }
    Ok(())
}

/// The compute dtype `auto` picks on `device`.
pub fn auto_dtype(device: Device, sm_major: Option<u32>) -> DType {
    match (device, sm_major) {
        (Device::Cpu, _) => DType::F32,
        (_, Some(m)) if m < 8 => DType::F16,
        _ => DType::BF16,
    }
}

/// The trainer's configuration: `train.*`, with `offload.optimizer` moving
/// the optimizer to the host (every core).
fn train_config(s: &crate::config::Settings) -> llmft_trainer::TrainConfig {
    llmft_trainer::TrainConfig {
        optimizer_on_host: s.offload.optimizer.then_some(0),
        ..s.train.clone()
    }
}
