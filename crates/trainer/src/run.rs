//! The training run as one readable recipe: data loader → micro-batches →
//! [`Trainer::step`] → metrics, evaluation and checkpoints every N steps →
//! the final adapter (or full weights), a loss-curve PNG and, on request,
//! the merged model.
use std::path::{Path, PathBuf};
use std::time::Instant;

use llmft_data::{DataConfig, Loader, Shard, TokenizedDataset};
use llmft_models::{Model, ModelBatch};
use llmft_tensor::DType;
use serde::Serialize;

use crate::progress::Progress;
use crate::{
    model_batch, DataParallel, Error, EvalStats, MetricsWriter, Result, StepStats, TrainConfig,
    Trainer,
};

/// Metrics file inside `output_dir`.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// Loss-curve picture inside `output_dir`.
pub const PLOT_FILE: &str = "loss.png";
/// Final adapter (LoRA/DoRA runs) inside `output_dir`.
pub const ADAPTER_DIR: &str = "adapter";
/// Final weights (full/freeze runs) or merged model inside `output_dir`.
pub const MODEL_DIR: &str = "model";
/// Merged model (LoRA runs with `export_merged`) inside `output_dir`.
pub const MERGED_DIR: &str = "merged";

/// The data of a run.
pub struct RunData<'a> {
    /// Training examples.
    pub train: &'a TokenizedDataset,
    /// Held-out examples for `eval_every`, if any.
    pub validation: Option<&'a TokenizedDataset>,
    /// Batching (and the shuffle seed) of both.
    pub config: &'a DataConfig,
}

/// How a run starts and reports.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue from this checkpoint folder (see [`crate::latest_checkpoint`]).
    pub resume: Option<PathBuf>,
    /// Draw a progress bar on stderr (only when it is a terminal); otherwise
    /// a plain line is printed every few steps.
    pub progress: bool,
    /// Print nothing while training.
    pub quiet: bool,
    /// What `loss.png`'s title names, e.g. the model (`meta-llama/Llama-3.1-8B`);
    /// the train type is added. Default: the architecture and layer count.
    pub title: Option<String>,
    /// Train data-parallel over this group: each rank reads its part of
    /// every global batch (global batch = micro-batch × grad_accum ×
    /// ranks); metrics, progress, the plot and the final outputs come from
    /// rank 0 only.
    pub dist: Option<DataParallel>,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    /// Steps completed (including those of a resumed checkpoint).
    pub steps: u64,
    /// The step the run started from (0, or the resumed checkpoint's step).
    pub start_step: u64,
    /// Loss of the first step this process ran.
    pub first_loss: Option<f64>,
    /// Loss of the last step.
    pub last_loss: Option<f64>,
    /// Steps skipped for non-finite values.
    pub skipped_steps: u64,
    /// The last evaluation.
    pub eval: Option<EvalStats>,
    /// Final adapter or weights.
    pub output: PathBuf,
    /// Merged model, when exported.
    pub merged: Option<PathBuf>,
    /// The metrics file.
    pub metrics: PathBuf,
    /// The loss curve, when it could be drawn.
    pub plot: Option<PathBuf>,
    /// Wall time of this process's training, seconds.
    pub seconds: f64,
}

/// One metrics line of an evaluation.
#[derive(Serialize)]
struct EvalLine {
    step: u64,
    eval_loss: f64,
    eval_perplexity: f64,
    eval_tokens: usize,
}

/// Loss and perplexity of `model` over every batch of `data` (one pass, in
/// order, no dropout).
pub fn evaluate(
    trainer: &Trainer,
    model: &Model,
    data: &TokenizedDataset,
    config: &DataConfig,
) -> Result<EvalStats> {
    let mut cfg = config.clone();
    cfg.batch.shuffle = false;
    cfg.batch.drop_last = false;
    let mut loader = Loader::new(data, &cfg, Shard::single())?;
    let mut batches: Vec<ModelBatch> = Vec::new();
    let mut total = EvalStats {
        loss: 0.0,
        perplexity: 1.0,
        tokens: 0,
    };
    let mut sum = 0.0;
    for i in 0..loader.batches_in_epoch(0) {
        let b = loader.batch_at(0, i).expect("index within the epoch");
        batches.push(model_batch(model.ctx(), &b)?);
        // A few batches at a time keeps device memory bounded.
        if batches.len() == 8 {
            let s = trainer.evaluate(model, &batches)?;
            sum += s.loss * s.tokens as f64;
            total.tokens += s.tokens;
            batches.clear();
        }
    }
    if !batches.is_empty() {
        let s = trainer.evaluate(model, &batches)?;
        sum += s.loss * s.tokens as f64;
        total.tokens += s.tokens;
    }
    total.loss = sum / total.tokens.max(1) as f64;
    total.perplexity = total.loss.exp();
    Ok(total)
}

/// Keeps the metrics lines of steps up to `step` (a resumed run rewrites
/// the steps after its checkpoint).
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(path, kept).map_err(crate::error::io(path))
}

/// Trains `model` per `config` on `data` until `config.max_steps`, writing
/// into `config.output_dir`: `metrics.jsonl`, `checkpoint-<step>/` every
/// `checkpoint_every` steps and at the end, the final `adapter/` (LoRA/DoRA)
/// or `model/` (full/freeze, HF safetensors), `merged/` with
/// `export_merged`, and `loss.png`. The model must carry its adapter
/// already for adapter train types (unless resuming, which loads it).
pub fn train(
    model: &mut Model,
    config: TrainConfig,
    data: RunData<'_>,
    opts: &RunOptions,
) -> Result<RunSummary> {
    let out = config.output_dir.clone();
    std::fs::create_dir_all(&out).map_err(crate::error::io(&out))?;
    let trainer = match &opts.resume {
        Some(dir) => Trainer::resume_with(config, model, dir, opts.dist.clone()),
        None => Trainer::new(config, model).and_then(|mut t| {
            if let Some(dp) = &opts.dist {
                t.set_data_parallel(dp.clone())?;
            }
            Ok(t)
        }),
    };
    let mut trainer = trainer?;
    let shard = match &opts.dist {
        Some(dp) => Shard::new(dp.rank(), dp.world_size())?,
        None => Shard::single(),
    };
    let lead = shard.rank == 0;
    if lead {
        // What killed checkpoint writes left (the resumed checkpoint, if
        // any, is loaded already; other ranks write nothing before the
        // first checkpoint's barrier).
        crate::checkpoint::clean(&out)?;
    }
    let cfg = trainer.config().clone();
    let start_step = trainer.steps_done();
    let metrics_path = out.join(METRICS_FILE);
    if lead {
        if opts.resume.is_some() {
            truncate_metrics(&metrics_path, start_step)?;
        } else if metrics_path.exists() {
            std::fs::remove_file(&metrics_path).map_err(crate::error::io(&metrics_path))?;
        }
    }
    let mut metrics = lead
        .then(|| MetricsWriter::append(&metrics_path))
        .transpose()?;
    let mut loader = Loader::new(data.train, data.config, shard)?;
    if let Some(c) = trainer.cursor() {
        loader.seek(c);
    }
    let quiet_opts = RunOptions {
        quiet: opts.quiet || !lead,
        ..opts.clone()
    };
    let mut progress = Progress::new(&cfg, start_step, &quiet_opts, model.ctx());
    let started = Instant::now();
    let mut summary = RunSummary {
        steps: start_step,
        start_step,
        first_loss: None,
        last_loss: None,
        skipped_steps: 0,
        eval: None,
        output: PathBuf::new(),
        merged: None,
        metrics: metrics_path.clone(),
        plot: None,
        seconds: 0.0,
    };
    while !trainer.is_done() {
        let step = trainer.steps_done() + 1;
        let mut micro = Vec::with_capacity(cfg.grad_accum);
        for _ in 0..cfg.grad_accum {
            let b = loader.next_batch().ok_or_else(|| {
                Error::Config(
                    "the training data gives no batch (fewer micro-batches than ranks?)".into(),
                )
            })?;
            micro.push(model_batch(model.ctx(), &b)?);
        }
        let stats = trainer.step(model, &mut micro).map_err(|e| match e {
            e if is_out_of_memory(&e) => Error::OutOfMemory {
                step,
                source: Box::new(e),
            },
            e => e,
        })?;
        trainer.set_cursor(loader.cursor());
        record(&mut summary, &stats);
        if let Some(m) = metrics
            .as_mut()
            .filter(|_| stats.step % cfg.log_every == 0 || trainer.is_done())
        {
            m.write(&stats)?;
        }
        progress.step(&stats);
        if cfg.eval_every > 0 && (stats.step % cfg.eval_every == 0 || trainer.is_done()) {
            if let Some(v) = data.validation {
                // Every rank evaluates every batch (a sharded store's fetches
                // are collectives); rank 0 writes.
                let e = evaluate(&trainer, model, v, data.config)?;
                if let Some(m) = metrics.as_mut() {
                    m.write(&EvalLine {
                        step: stats.step,
                        eval_loss: e.loss,
                        eval_perplexity: e.perplexity,
                        eval_tokens: e.tokens,
                    })?;
                }
                progress.eval(stats.step, &e);
                summary.eval = Some(e);
            }
        }
        let every = cfg.checkpoint_every;
        if (every > 0 && stats.step % every == 0) || trainer.is_done() {
            let dir = trainer.save_checkpoint(model, &out)?;
            progress.note(&format!("saved {}", dir.display()));
        }
    }
    progress.finish();
    summary.seconds = started.elapsed().as_secs_f64();
    summary.output = save_final(model, &trainer, &out, lead)?;
    if cfg.export_merged && cfg.train_type.uses_adapter() {
        let dir = out.join(MERGED_DIR);
        export(model, &dir, lead)?;
        summary.merged = Some(dir);
    }
    if let Some(dp) = &opts.dist {
        // Outputs are complete when any rank returns.
        dp.group().barrier(model.ctx())?;
    }
    if lead {
        let name = opts.title.clone().unwrap_or_else(|| {
            let c = &model.config;
            format!("{:?}, {} layers", c.arch, c.num_layers)
        });
        let kind = serde_json::to_value(cfg.train_type)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        let title = format!("{name} · {kind}");
        summary.plot = crate::plot::loss_curve(&metrics_path, &out.join(PLOT_FILE), &title)
            .ok()
            .map(|()| out.join(PLOT_FILE));
    }
    Ok(summary)
}

/// Writes the merged model to `dir` (replacing an earlier one) when `lead`;
/// other ranks read the same weights without writing (a sharded store's
/// fetches are collectives every rank joins).
fn export(model: &Model, dir: &Path, lead: bool) -> Result<()> {
    if lead && dir.exists() {
        std::fs::remove_dir_all(dir).map_err(crate::error::io(dir))?;
    }
    model.export_merged_to(lead.then_some(dir), model.dtype(), 5 << 30)?;
    Ok(())
}

fn record(summary: &mut RunSummary, stats: &StepStats) {
    summary.steps = stats.step;
    summary.first_loss.get_or_insert(stats.loss);
    summary.last_loss = Some(stats.loss);
    summary.skipped_steps += u64::from(stats.skipped);
}

/// Whether `e` is an allocation failure (device or host memory), which a
/// caller answers with smaller batches rather than a bug report.
pub fn is_out_of_memory(e: &Error) -> bool {
    use llmft_tensor::Error as T;
    let oom = |t: &T| matches!(t, T::OutOfMemory { .. } | T::HostOutOfMemory { .. });
    match e {
        Error::OutOfMemory { .. } => true,
        Error::Tensor(t) => oom(t),
        Error::Model(llmft_models::Error::Tensor(t)) => oom(t),
        Error::Model(llmft_models::Error::Lora(llmft_lora::Error::Tensor(t))) => oom(t),
        Error::Lora(llmft_lora::Error::Tensor(t)) => oom(t),
        _ => false,
    }
}

/// Writes the final adapter (PEFT format, the f32 masters) or, for full/freeze runs, the whole
/// model as HF safetensors; replaces an earlier output of the same name.
fn save_final(model: &Model, trainer: &Trainer, out: &Path, lead: bool) -> Result<PathBuf> {
    let uses_adapter = trainer.config().train_type.uses_adapter();
    let dir = out.join(if uses_adapter { ADAPTER_DIR } else { MODEL_DIR });
    if !uses_adapter {
        export(model, &dir, lead)?;
    } else if lead {
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(crate::error::io(&dir))?;
        }
        model
            .adapter()
            .ok_or(Error::NoAdapter)?
            .save(&dir, DType::F32)?;
    }
    Ok(dir)
}
