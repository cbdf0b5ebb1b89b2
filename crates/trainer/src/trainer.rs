//! The training step as a readable recipe: accumulate gradients over the
//! micro-batches of a step with the loss normalized by the step's trained
//! tokens, then clip, check for non-finite values and update.
use std::path::{Path, PathBuf};
use std::time::Instant;

use llmft_data::Cursor;
use llmft_lora::Adapter;
use llmft_models::{Grads, Model, ModelBatch};
use serde::Serialize;

use crate::checkpoint::{self, TrainerState};
use crate::{Error, LrSchedule, Optimizer, Result, TrainConfig};

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
    /// The update was skipped (non-finite loss or gradient norm).
    pub skipped: bool,
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

/// LoRA / DoRA training of a model's attached adapter.
pub struct Trainer {
    config: TrainConfig,
    schedule: LrSchedule,
    optimizer: Optimizer,
    grads: Grads,
    /// Completed steps (skipped ones included: their data was consumed).
    step: u64,
    cursor: Option<Cursor>,
}

impl Trainer {
    /// A trainer at step 0 for `model`, which must have an adapter attached.
    /// For a bit-exact [`Trainer::resume`] with dropout, create the adapter
    /// with `model.new_adapter(lora, config.seed)`: the dropout masks are
    /// salted by that seed.
    pub fn new(config: TrainConfig, model: &Model) -> Result<Self> {
        config.validate()?;
        if model.adapter().is_none() {
            return Err(Error::NoAdapter);
        }
        Ok(Self {
            schedule: LrSchedule::from_config(&config),
            optimizer: Optimizer::new(&config),
            grads: Grads::for_adapter(model)?,
            config,
            step: 0,
            cursor: None,
        })
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
    /// same masks.
    pub fn dropout_seed(&self, micro: usize) -> u64 {
        mix64(mix64(self.config.seed ^ mix64(self.step)) ^ micro as u64)
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
        let normalizer = tokens.max(1) as f32;
        let mut loss_sum = 0.0;
        for (i, b) in micro_batches.iter_mut().enumerate() {
            b.dropout_seed = Some(self.dropout_seed(i));
            let s = model.forward_backward(b, Some(normalizer), Some(&mut self.grads))?;
            loss_sum += s.loss_sum;
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
        let ctx = model.ctx().clone();
        let adapter = model.adapter_mut().ok_or(Error::NoAdapter)?;
        let update =
            self.optimizer
                .step_adapter(&ctx, adapter, &mut self.grads, loss, lr, self.step + 1)?;
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
        })
    }

    /// Loss and perplexity over `batches` (no dropout, no gradients).
    pub fn evaluate(&self, model: &Model, batches: &[ModelBatch]) -> Result<EvalStats> {
        let (mut sum, mut tokens) = (0.0, 0usize);
        for b in batches {
            let s = model.forward_backward(b, None, None)?;
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

    /// Saves adapter, optimizer and trainer state to
    /// `output_dir/checkpoint-<step>` (written under a temporary name and
    /// renamed), then deletes all but the newest `keep_last` checkpoints.
    pub fn save_checkpoint(&self, model: &Model, output_dir: &Path) -> Result<PathBuf> {
        let adapter = model.adapter().ok_or(Error::NoAdapter)?;
        let state = TrainerState {
            format: checkpoint::FORMAT.into(),
            step: self.step,
            optimizer_step: self.optimizer.steps_applied(),
            seed: self.config.seed,
            cursor: self.cursor,
            next_lr: self.schedule.lr(self.step),
        };
        checkpoint::write(output_dir, &state, self.config.keep_last, |dir| {
            adapter.save(dir, llmft_tensor::DType::F32)?;
            self.optimizer.save(&dir.join(checkpoint::OPTIMIZER_FILE))
        })
    }

    /// A trainer that continues exactly where the checkpoint at `dir` left
    /// off: its adapter is loaded and attached to `model`, the optimizer
    /// state, step, seed and data cursor restored. `config` supplies the
    /// rest (its seed is replaced by the checkpoint's).
    pub fn resume(mut config: TrainConfig, model: &mut Model, dir: &Path) -> Result<Self> {
        let state = checkpoint::read_state(dir)?;
        let loaded = Adapter::load(model.ctx(), dir, &model.linear_shapes())?;
        // Dropout masks are salted by the adapter's init seed, which the PEFT
        // files do not carry: rebuild the adapter from the run seed, then
        // copy the saved parameters in.
        let mut lora = loaded.config.clone();
        lora.inference_mode = false;
        let mut adapter = model.new_adapter(lora, state.seed)?;
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
        config.seed = state.seed;
        let mut t = Self::new(config, model)?;
        t.optimizer
            .load(model.ctx(), &dir.join(checkpoint::OPTIMIZER_FILE))?;
        if t.optimizer.steps_applied() != state.optimizer_step {
            return Err(Error::Checkpoint {
                path: dir.join(checkpoint::OPTIMIZER_FILE),
                msg: format!(
                    "optimizer step {} disagrees with trainer_state.json ({})",
                    t.optimizer.steps_applied(),
                    state.optimizer_step
                ),
            });
        }
        t.step = state.step;
        t.cursor = state.cursor;
        Ok(t)
    }
}

/// splitmix64 finalizer: decorrelates seeds.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
