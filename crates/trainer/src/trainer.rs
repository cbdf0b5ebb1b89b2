//! The training step as a readable recipe: accumulate gradients over the
//! micro-batches of a step with the loss normalized by the step's trained
//! tokens, then clip, check for non-finite values and update — an attached
//! adapter (LoRA / DoRA types) or the model's own weights (`full`, `freeze`).
use std::path::{Path, PathBuf};
use std::time::Instant;

use llmft_data::Cursor;
use llmft_lora::Adapter;
use llmft_models::{Grads, Model, ModelBatch, Unit};
use llmft_tensor::DType;
use serde::Serialize;

use crate::checkpoint::{self, TrainerState};
use crate::dist::DataParallel;
use crate::optimizer::LossScale;
use crate::{Error, LrSchedule, Optimizer, Result, TrainConfig, TrainType};

/// What one optimizer step did (one metrics line).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepStats {
    /// The step, from 1.
    pub step: u64,
    /// Mean loss per trained token over all micro-batches of the step.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    /// Trained (labelled) tokens of the step.
    pub tokens: usize,
    /// Trained tokens per second of wall time of the step.
    pub tokens_per_s: f64,
    /// The update was skipped (non-finite loss or gradient norm, or an f16
    /// gradient overflow).
    pub skipped: bool,
    /// The f16 gradients overflowed: the step was skipped and the loss scale
    /// halved (expected now and then; not a NaN-policy event).
    pub overflow: bool,
    /// The f16 loss scale this step's backward used; `None` unless f16.
    pub loss_scale: Option<f32>,
}

/// Loss over an evaluation set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EvalStats {
    /// Mean loss per labelled token.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Labelled tokens.
    pub tokens: usize,
}

/// The gradients of one step, accumulated but not yet applied.
#[derive(Debug, Clone, Copy)]
pub struct Accumulated {
    /// Sum of the per-token losses.
    pub loss_sum: f64,
    /// Trained tokens (the loss normalizer).
    pub tokens: usize,
    started: Instant,
}

/// Training of a model's attached adapter (LoRA / DoRA train types) or of
/// its own weights (`full`, `freeze`).
pub struct Trainer {
    config: TrainConfig,
    schedule: LrSchedule,
    optimizer: Optimizer,
    grads: Grads,
    /// Completed steps (skipped ones included: their data was consumed).
    step: u64,
    cursor: Option<Cursor>,
    /// Dynamic loss scaling, for f16 models only.
    scaler: Option<LossScale>,
    /// The data-parallel group (a world of one too, when one was set).
    dist: Option<DataParallel>,
    /// Ranks of the run a resumed checkpoint came from.
    resumed_world: Option<usize>,
}

/// The model weights `train_type` trains, with the unit holding each:
/// every tensor of every unit for `full`; those of the last `n` decoder
/// layers (`model.layers.{i}.*`, i ≥ L − n) for `freeze`. The base must be
/// dense and carry no adapter; the errors name `train_type`.
fn trainable_weights(config: &TrainConfig, model: &Model) -> Result<Vec<(Unit, String)>> {
    let tt = type_name(config.train_type);
    if model.adapter().is_some() {
        return Err(Error::Config(format!(
            "train_type = \"{tt}\" trains the model's own weights, but an adapter is \
             attached (adapters are trained by train_type = \"lora\", \"qlora\", ...)"
        )));
    }
    let c = &model.config;
    let units: Vec<usize> = match config.train_type {
        TrainType::Freeze => {
            let n = config.freeze_trainable_layers;
            if n > c.num_layers {
                return Err(Error::Config(format!(
                    "freeze_trainable_layers = {n} exceeds the model's {} decoder layers \
                     (train_type = \"freeze\"; use train_type = \"full\" to train everything)",
                    c.num_layers
                )));
            }
            (c.num_layers - n + 1..=c.num_layers).collect()
        }
        _ => (0..c.num_units()).collect(),
    };
    let mut out = Vec::new();
    for u in units {
        let w = model.unit(Unit::from_index(u, c.num_units()))?;
        for (name, _) in c.unit_tensors(u) {
            if w.quantized(&name).is_some() {
                return Err(Error::Config(format!(
                    "train_type = \"{tt}\" needs a dense base, but {name} is quantized \
                     (load the model with quant = \"none\")"
                )));
            }
            out.push((Unit::from_index(u, c.num_units()), name));
        }
    }
    Ok(out)
}

impl Trainer {
    /// A trainer at step 0 for `model`. Adapter train types need an adapter
    /// attached; for a bit-exact [`Trainer::resume`] with dropout, create it
    /// with `model.new_adapter(lora, config.seed)`: the dropout masks are
    /// salted by that seed. `full` and `freeze` need a dense base without an
    /// adapter; the optimizer then keeps f32 masters of the trained weights
    /// and writes every update back into the model. An f16 model trains
    /// with dynamic loss scaling (`init_loss_scale`, `loss_scale_window`).
    pub fn new(config: TrainConfig, model: &Model) -> Result<Self> {
        config.validate()?;
        if let Some(cu) = model.ctx().cuda_ctx() {
            if model.dtype() == DType::BF16 && !cu.has_bf16() {
                let (maj, min) = cu.path_arch();
                return Err(Error::Config(format!(
                    "bf16 training needs an sm_80 (Ampere) or newer kernel path, but cuda:{} \
                     takes the sm_{maj}{min} path: load the model in f16 (trained with dynamic \
                     loss scaling)",
                    cu.ordinal()
                )));
            }
        }
        llmft_tensor::ops::set_deterministic_attention(config.deterministic);
        let mut optimizer = Optimizer::new(&config);
        if let Some(threads) = config.optimizer_on_host {
            optimizer.offload_to_host(threads)?;
        }
        let grads = if config.train_type.uses_adapter() {
            if model.adapter().is_none() {
                return Err(Error::NoAdapter);
            }
            Grads::for_adapter(model)?
        } else {
            let names = trainable_weights(&config, model)?;
            let mut grads = Grads::default();
            for (u, name) in &names {
                let shape = model.unit(*u)?.get(name)?.shape().to_vec();
                grads.track(model.ctx(), name, &shape)?;
            }
            optimizer.track_weights(model, &names)?;
            grads
        };
        let scaler = (model.dtype() == DType::F16)
            .then(|| LossScale::new(config.init_loss_scale, config.loss_scale_window));
        Ok(Self {
            schedule: LrSchedule::from_config(&config),
            optimizer,
            grads,
            config,
            step: 0,
            cursor: None,
            scaler,
            dist: None,
            resumed_world: None,
        })
    }

    /// Trains data-parallel over `dp`: each rank passes its own part of
    /// every global batch to [`Trainer::step`] (the loader's shard); the
    /// loss normalizer and the gradients are summed over the ranks, so
    /// every rank applies the same update. With
    /// [`DataParallel::with_sharded_optimizer`] the optimizer state is split
    /// over the ranks. A trainer resumed from a checkpoint of another world
    /// size is refused: its data cursor counts that many ranks' batches.
    pub fn set_data_parallel(&mut self, dp: DataParallel) -> Result<()> {
        self.check_world(dp.world_size())?;
        if dp.shards_optimizer() {
            self.optimizer.shard_state(dp.clone())?;
        }
        // A world of one still goes through the group (an explicit
        // backend at world 1 checks that path).
        self.dist = Some(dp);
        Ok(())
    }

    /// Fails when the trainer was resumed from a checkpoint written by a
    /// run of another number of ranks than `world`.
    pub fn check_world(&self, world: usize) -> Result<()> {
        match self.resumed_world {
            Some(w) if w != world => Err(Error::Config(format!(
                "the checkpoint was written by a run of {w} rank(s), this run has {world}: \
                 its data position counts {w} rank(s)' batches (resume with the same world size)"
            ))),
            _ => Ok(()),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Completed steps.
    pub fn steps_done(&self) -> u64 {
        self.step
    }

    /// Whether `max_steps` steps are done.
    pub fn is_done(&self) -> bool {
        self.step >= self.config.max_steps
    }

    /// The learning-rate schedule.
    pub fn schedule(&self) -> &LrSchedule {
        &self.schedule
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &Optimizer {
        &self.optimizer
    }

    /// The f16 loss scaler (`None` unless the model computes in f16).
    pub fn loss_scale(&self) -> Option<LossScale> {
        self.scaler
    }

    /// The data cursor saved with checkpoints (set by the caller's loop).
    pub fn cursor(&self) -> Option<Cursor> {
        self.cursor
    }

    /// Records where the data loader stands, for the next checkpoint.
    pub fn set_cursor(&mut self, cursor: Cursor) {
        self.cursor = Some(cursor);
    }

    /// The accumulated gradients of the current step.
    pub fn grads(&self) -> &Grads {
        &self.grads
    }

    /// The accumulated gradients, mutably (tests, custom clipping).
    pub fn grads_mut(&mut self) -> &mut Grads {
        &mut self.grads
    }

    /// The dropout seed of micro-batch `micro` of the current step: a
    /// function of the run seed and the step, so a resumed run draws the
    /// same masks. Under data parallelism `micro` is this rank's index; the
    /// seed is that of the global micro-batch it is (rank r's j-th of a
    /// world w is global micro-batch j·w + r, as the loader deals them), so
    /// world N draws the masks of world 1.
    pub fn dropout_seed(&self, micro: usize) -> u64 {
        let global = match &self.dist {
            Some(d) => micro * d.world_size() + d.rank(),
            None => micro,
        };
        mix64(mix64(self.config.seed ^ mix64(self.step)) ^ global as u64)
    }

    /// One optimizer step over `micro_batches` (each one forward + backward;
    /// their dropout seeds are set here).
    pub fn step(
        &mut self,
        model: &mut Model,
        micro_batches: &mut [ModelBatch],
    ) -> Result<StepStats> {
        let acc = self.accumulate(model, micro_batches)?;
        self.apply(model, acc)
    }

    /// Forward + backward of every micro-batch, adding to the gradients with
    /// the loss normalized by the trained tokens of all of them together.
    pub fn accumulate(
        &mut self,
        model: &Model,
        micro_batches: &mut [ModelBatch],
    ) -> Result<Accumulated> {
        let started = Instant::now();
        let mut tokens = 0usize;
        for b in micro_batches.iter() {
            tokens += b
                .targets
                .to_vec::<i32>()?
                .iter()
                .filter(|&&t| t != -100)
                .count();
        }
        if let Some(d) = &self.dist {
            tokens = d.sum(model.ctx(), &[tokens as f64])?[0] as usize;
        }
        // Under f16 loss scaling the loss (and so every gradient) is
        // multiplied by the scale: divide the normalizer by it.
        let normalizer = match self.scaler {
            None => tokens.max(1) as f32,
            Some(s) => tokens.max(1) as f32 / s.scale,
        };
        let mut loss_sum = 0.0;
        for (i, b) in micro_batches.iter_mut().enumerate() {
            b.dropout_seed = Some(self.dropout_seed(i));
            let s = model.forward_backward(b, Some(normalizer), Some(&mut self.grads))?;
            loss_sum += s.loss_sum;
        }
        if let Some(d) = &self.dist {
            d.all_reduce_grads(model.ctx(), &mut self.grads)?;
            loss_sum = d.sum(model.ctx(), &[loss_sum])?[0];
        }
        Ok(Accumulated {
            loss_sum,
            tokens,
            started,
        })
    }

    /// Clips, checks and applies the accumulated gradients with the
    /// scheduled learning rate, then zeroes them and advances the step.
    pub fn apply(&mut self, model: &mut Model, acc: Accumulated) -> Result<StepStats> {
        let lr = self.schedule.lr(self.step);
        let loss = acc.loss_sum / acc.tokens.max(1) as f64;
        let loss_scale = self.scaler.map(|s| s.scale);
        let update = if self.config.train_type.uses_adapter() {
            let ctx = model.ctx().clone();
            let adapter = model.adapter_mut().ok_or(Error::NoAdapter)?;
            self.optimizer.step_adapter(
                &ctx,
                adapter,
                &mut self.grads,
                loss,
                lr,
                self.step + 1,
                loss_scale,
            )?
        } else {
            self.optimizer.step_weights(
                model,
                &mut self.grads,
                loss,
                lr,
                self.step + 1,
                loss_scale,
            )?
        };
        if let Some(s) = &mut self.scaler {
            s.update(update.overflow);
        }
        self.step += 1;
        let secs = acc.started.elapsed().as_secs_f64();
        Ok(StepStats {
            step: self.step,
            loss,
            lr,
            grad_norm: update.grad_norm,
            tokens: acc.tokens,
            tokens_per_s: acc.tokens as f64 / secs.max(1e-9),
            skipped: update.skipped,
            overflow: update.overflow,
            loss_scale,
        })
    }

    /// Loss and perplexity over `batches` (no dropout, no gradients).
    pub fn evaluate(&self, model: &Model, batches: &[ModelBatch]) -> Result<EvalStats> {
        let (mut sum, mut tokens) = (0.0, 0usize);
        for b in batches {
            let s = model.forward_loss(b, None)?;
            sum += s.loss_sum;
            tokens += s.tokens;
        }
        let loss = sum / tokens.max(1) as f64;
        Ok(EvalStats {
            loss,
            perplexity: loss.exp(),
            tokens,
        })
    }

    /// Saves the trained parameters — the adapter (PEFT format, f32) or the
    /// f32 masters of the trained weights (`model.safetensors`, HF names) —
    /// with the optimizer and trainer state and a manifest of them all to
    /// `output_dir/checkpoint-<step>` (written under a temporary name,
    /// every file synced, and renamed), then deletes all but the newest
    /// `keep_last` checkpoints; see the protocol in `checkpoint.rs`.
    ///
    /// Data-parallel: rank 0 writes the replicated state; with the
    /// optimizer state split over the ranks, each rank first writes its
    /// part (`optimizer-rank<r>-of-<w>.safetensors`) into the temporary
    /// folder, then rank 0 hashes the parts, completes and renames it. Every
    /// rank returns once the checkpoint is in place; a rank that dies before
    /// leaves the temporary folder, never a partial `checkpoint-<step>`.
    pub fn save_checkpoint(&self, model: &Model, output_dir: &Path) -> Result<PathBuf> {
        let Some(d) = &self.dist else {
            let tmp = checkpoint::prepare(output_dir, self.step)?;
            return self.commit_checkpoint(
                model,
                output_dir,
                checkpoint::Writer::new(&tmp, self.step),
            );
        };
        let ctx = model.ctx();
        let lead = d.rank() == 0;
        let tmp = checkpoint::tmp_for(output_dir, self.step);
        let mut writer = checkpoint::Writer::new(&tmp, self.step);
        if self.optimizer.is_sharded() {
            if lead {
                checkpoint::prepare(output_dir, self.step)?;
            }
            d.group().barrier(ctx)?;
            let name = checkpoint::optimizer_rank_file(d.rank(), d.world_size());
            let bytes = self.optimizer.encode(&tmp.join(&name))?;
            writer.file(&name, &bytes)?;
            d.group().barrier(ctx)?;
            if lead {
                for r in 1..d.world_size() {
                    writer.file_of_peer(&checkpoint::optimizer_rank_file(r, d.world_size()))?;
                }
            }
        } else if lead {
            checkpoint::prepare(output_dir, self.step)?;
        }
        let written = match lead {
            true => self.commit_checkpoint(model, output_dir, writer),
            false => Ok(checkpoint::dir_for(output_dir, self.step)),
        };
        d.group().barrier(ctx)?;
        written
    }

    fn commit_checkpoint(
        &self,
        model: &Model,
        output_dir: &Path,
        mut writer: checkpoint::Writer,
    ) -> Result<PathBuf> {
        let adapter = if self.config.train_type.uses_adapter() {
            Some(model.adapter().ok_or(Error::NoAdapter)?)
        } else {
            None
        };
        let state = TrainerState {
            format: checkpoint::FORMAT.into(),
            step: self.step,
            optimizer_step: self.optimizer.steps_applied(),
            seed: self.config.seed,
            cursor: self.cursor,
            next_lr: self.schedule.lr(self.step),
            train_type: Some(self.config.train_type),
            loss_scale: self.scaler.map(|s| s.scale),
            loss_scale_clean_steps: self.scaler.map_or(0, |s| s.clean_steps),
            world_size: self.dist.as_ref().map(|d| d.world_size()),
            optimizer_sharded: self.optimizer.is_sharded(),
        };
        let tmp = checkpoint::tmp_for(output_dir, self.step);
        let files = (|| {
            match adapter {
                Some(a) => {
                    for (name, bytes) in a.encode_files(&tmp, llmft_tensor::DType::F32)? {
                        writer.file(name, &bytes)?;
                    }
                }
                None => {
                    let path = tmp.join(checkpoint::MODEL_FILE);
                    writer.file(
                        checkpoint::MODEL_FILE,
                        &self.optimizer.encode_weights(&path)?,
                    )?;
                }
            }
            // With the state split, each rank wrote its part already.
            if !self.optimizer.is_sharded() {
                let path = tmp.join(checkpoint::OPTIMIZER_FILE);
                writer.file(checkpoint::OPTIMIZER_FILE, &self.optimizer.encode(&path)?)?;
            }
            Ok::<_, Error>(())
        })();
        if let Err(e) = files {
            // A failed write leaves nothing behind (earlier checkpoints are untouched).
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        writer.commit(output_dir, &state, self.config.keep_last)
    }

    /// A trainer that continues exactly where the checkpoint at `dir` left
    /// off. Adapter types: the adapter is loaded and attached to `model`.
    /// `full` / `freeze`: `model` is the freshly loaded base, whose trained
    /// weights are overwritten from the checkpoint's `model.safetensors`.
    /// The optimizer state, step, seed, data cursor and f16 loss scale are
    /// restored; `config` supplies the rest (its seed is replaced by the
    /// checkpoint's).
    pub fn resume(config: TrainConfig, model: &mut Model, dir: &Path) -> Result<Self> {
        Self::resume_with(config, model, dir, None)
    }

    /// [`Trainer::resume`] into a data-parallel run over `dp` (see
    /// [`Trainer::set_data_parallel`]): the checkpoint must come from a run
    /// of as many ranks; with the optimizer state split, each rank reads its
    /// own part.
    pub fn resume_with(
        mut config: TrainConfig,
        model: &mut Model,
        dir: &Path,
        dp: Option<DataParallel>,
    ) -> Result<Self> {
        // Every file must match the manifest before any is read.
        let manifest = checkpoint::verify(dir)?;
        let state = checkpoint::read_state(dir)?;
        if manifest.step != state.step {
            return Err(Error::Checkpoint {
                path: dir.join(checkpoint::MANIFEST_FILE),
                msg: format!(
                    "step {} disagrees with {} (step {})",
                    manifest.step,
                    checkpoint::STATE_FILE,
                    state.step
                ),
            });
        }
        if let Some(saved) = state.train_type.filter(|&t| t != config.train_type) {
            return Err(Error::Config(format!(
                "train_type: the checkpoint {} was written by a \"{}\" run, but the \
                 config says \"{}\"",
                dir.display(),
                type_name(saved),
                type_name(config.train_type)
            )));
        }
        config.seed = state.seed;
        let mut t = if config.train_type.uses_adapter() {
            Self::attach_saved_adapter(model, dir, state.seed)?;
            Self::new(config, model)?
        } else {
            let mut t = Self::new(config, model)?;
            t.optimizer
                .load_weights(model, &dir.join(checkpoint::MODEL_FILE))?;
            t
        };
        t.resumed_world = Some(state.world_size.unwrap_or(1));
        let world = dp.as_ref().map_or(1, |d| d.world_size());
        if let Some(dp) = dp {
            t.set_data_parallel(dp)?;
        } else {
            t.check_world(1)?;
        }
        let optimizer_file = match (state.optimizer_sharded, &t.dist) {
            (true, Some(d)) if t.optimizer.is_sharded() => {
                checkpoint::optimizer_rank_file(d.rank(), world)
            }
            (false, _) if !t.optimizer.is_sharded() => checkpoint::OPTIMIZER_FILE.to_string(),
            (saved, _) => {
                return Err(Error::Config(format!(
                    "the checkpoint {} holds the optimizer state {}, this run {} it \
                     (resume with the same dist.strategy)",
                    dir.display(),
                    if saved { "split over ranks" } else { "whole" },
                    if t.optimizer.is_sharded() {
                        "splits"
                    } else {
                        "keeps whole"
                    }
                )))
            }
        };
        t.optimizer.load(model.ctx(), &dir.join(&optimizer_file))?;
        if t.optimizer.steps_applied() != state.optimizer_step {
            return Err(Error::Checkpoint {
                path: dir.join(&optimizer_file),
                msg: format!(
                    "optimizer step {} disagrees with trainer_state.json ({})",
                    t.optimizer.steps_applied(),
                    state.optimizer_step
                ),
            });
        }
        if let (Some(s), Some(scale)) = (&mut t.scaler, state.loss_scale) {
            s.scale = scale;
            s.clean_steps = state.loss_scale_clean_steps;
        }
        t.step = state.step;
        t.cursor = state.cursor;
        Ok(t)
    }

    /// Loads the adapter saved in `dir` and attaches it to `model`.
    fn attach_saved_adapter(model: &mut Model, dir: &Path, seed: u64) -> Result<()> {
        let loaded = Adapter::load(model.ctx(), dir, &model.linear_shapes())?;
        // Dropout masks are salted by the adapter's init seed, which the PEFT
        // files do not carry: rebuild the adapter from the run seed, then
        // copy the saved parameters in.
        let mut lora = loaded.config.clone();
        lora.inference_mode = false;
        let mut adapter = model.new_adapter(lora, seed)?;
        for (name, layer) in adapter.layers.iter_mut() {
            let src = loaded.layers.get(name).ok_or_else(|| Error::Checkpoint {
                path: dir.join(llmft_lora::WEIGHTS_FILE),
                msg: format!("no tensors for adapter module {name}"),
            })?;
            for (p, s) in layer.params_mut().into_iter().zip(src.params()) {
                p.copy_from(model.ctx(), s)?;
            }
        }
        model.attach_adapter(adapter);
        Ok(())
    }
}

/// The config spelling of a train type (`qlora`, `full`, ...).
fn type_name(t: TrainType) -> String {
    serde_json::to_value(t)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_else(|| format!("{t:?}"))
}

/// splitmix64 finalizer: decorrelates seeds.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
