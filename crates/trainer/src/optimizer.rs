//! AdamW with f32 moments over named f32 master parameters (an adapter's,
//! or f32 copies of the model's own weights for full / freeze training),
//! with global-norm clipping, the non-finite check of a step and f16
//! dynamic loss scaling.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use llmft_lora::Adapter;
use llmft_models::{Grads, Model, Unit};
use llmft_offload::{AdamWTensor, CpuAdamW, Grad};
use llmft_tensor::ops::{self, AdamWParams, TableCache};
use llmft_tensor::{Ctx, DType, Tensor};
use safetensors::tensor::{Dtype as StDtype, TensorView};

use crate::config::{NanPolicy, TrainConfig};
use crate::{DataParallel, Error, Result};

/// Names of an adapter's parameters in the order of `LoraLinear::params`.
const LORA_PARTS: [&str; 3] = ["lora_A", "lora_B", "lora_magnitude_vector"];

/// First and second moments of one parameter (on the device, or in host
/// memory under optimizer offload).
#[derive(Debug)]
struct Moments {
    m: Tensor,
    v: Tensor,
    /// Under optimizer offload: the pinned host copies the host step works
    /// on (see [`HostCopies`]); made on first use.
    host: Option<HostCopies>,
}

/// Pinned host buffers of one parameter under optimizer offload.
#[derive(Debug)]
struct HostCopies {
    /// The f32 master, when the parameter itself lives on the device (an
    /// adapter's A/B): the host step updates it and it is copied back up.
    master: Option<Tensor>,
    /// The gradient, copied down before the host step.
    grad: Tensor,
    /// For a host master of a bf16 weight (full training): the updated
    /// values in bf16, written in the same pass and copied up from here.
    bf16: Option<Tensor>,
}

/// The f32 master of one of the model's own weights.
#[derive(Debug)]
struct Master {
    /// The model unit whose blob holds the weight.
    unit: Unit,
    /// The f32 values the optimizer updates.
    value: Tensor,
    /// `value` is the model's f32 blob view itself (updated in place); else
    /// it is a copy, cast into the blob after each update.
    in_place: bool,
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Update {
    /// Global L2 norm of the gradients before clipping (unscaled).
    pub grad_norm: f32,
    /// The step was skipped for a non-finite loss or gradient norm.
    pub skipped: bool,
    /// The gradients overflowed under loss scaling (skipped; the scale
    /// should back off). Not a non-finite step in the sense of the NaN policy.
    pub overflow: bool,
}

/// Whether a weight of the model is decayed: norm weights and biases are
/// not (as transformers' Trainer and LLaMA-Factory group them).
pub fn decays(name: &str) -> bool {
    !(name.ends_with("norm.weight") || name.ends_with(".bias"))
}

/// Dynamic loss scaling of f16 training, as PyTorch's `GradScaler`: the loss
/// is multiplied by `scale` before backward; a step whose gradients
/// overflow is skipped and the scale halved; after `window` clean steps in a
/// row it doubles.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScale {
    /// Current scale.
    pub scale: f32,
    /// Clean steps since the last change of the scale.
    pub clean_steps: u64,
    /// Clean steps before the scale doubles.
    pub window: u64,
}

impl LossScale {
    /// A scaler starting at `init` that doubles after `window` clean steps.
    pub fn new(init: f32, window: u64) -> Self {
        Self {
            scale: init,
            clean_steps: 0,
            window,
        }
    }

    /// Accounts for one step: back off (×0.5) on overflow, else count it and
    /// grow (×2) once `window` clean steps are reached.
    pub fn update(&mut self, overflow: bool) {
        if overflow {
            self.scale *= 0.5;
            self.clean_steps = 0;
        } else {
            self.clean_steps += 1;
            if self.clean_steps >= self.window {
                let grown = self.scale * 2.0;
                if grown.is_finite() {
                    self.scale = grown;
                }
                self.clean_steps = 0;
            }
        }
    }
}

/// The outcome of the checks before an update.
struct Verdict {
    grad_norm: f32,
    finite: bool,
    overflow: bool,
    /// Clip coefficient times the loss-scale undo, applied to every gradient.
    grad_scale: f32,
}

/// Device tables of the multi-tensor launches of a step, kept between steps
/// (uploaded again only when the tensors change).
#[derive(Debug, Default)]
struct Tables {
    /// Gradients of the global norm.
    norm: TableCache,
    /// AdamW, decayed and undecayed group.
    adamw: [TableCache; 2],
    /// Gradients zeroed outside the update.
    zero: TableCache,
}

/// One AdamW launch's tensors: parameters with one set of hyper-parameters.
#[derive(Default)]
struct Group<'a> {
    names: Vec<String>,
    params: Vec<&'a mut Tensor>,
    /// Under optimizer offload: which host masters stand for bf16 weights
    /// (the host step then also writes their bf16 copies).
    bf16: Vec<bool>,
    /// Handles of the gradient buffers (views of the same storage).
    grads: Vec<Tensor>,
}

/// AdamW (PyTorch's order: decay, moments, bias-corrected update) with
/// clipping by the global gradient norm (`clip_grad_norm_`'s coefficient
/// `max_norm / (norm + 1e-6)`, at most 1).
#[derive(Debug)]
pub struct Optimizer {
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    max_grad_norm: f32,
    nan_policy: NanPolicy,
    /// Updates applied (skipped steps excluded); drives bias correction.
    step: u64,
    state: BTreeMap<String, Moments>,
    /// f32 masters of the model's own trainable weights, by HF name.
    masters: BTreeMap<String, Master>,
    tables: Tables,
    /// `offload.optimizer`: moments and f32 masters in host memory, the
    /// AdamW step on the host's cores.
    host: Option<CpuAdamW>,
    /// Data-parallel ranks sharing the state (see [`Optimizer::shard_state`]).
    shard: Option<Shard>,
}

/// The optimizer state split over data-parallel ranks (ZeRO stage 1): each
/// parameter has one owner rank, which alone keeps its moments and updates
/// it; the owners then broadcast the new values, so every rank ends the
/// step with the same parameters.
#[derive(Debug)]
struct Shard {
    dp: DataParallel,
    /// Owner of each parameter, fixed at the first step.
    owners: BTreeMap<String, usize>,
}

impl Shard {
    /// Deals `params` (name, elements; in an order every rank shares) to
    /// the ranks, each to the one holding the fewest elements so far.
    fn assign(&mut self, params: &[(String, usize)]) {
        if !self.owners.is_empty() {
            return;
        }
        let mut load = vec![0usize; self.dp.world_size()];
        for (name, n) in params {
            let r = (0..load.len()).min_by_key(|&r| (load[r], r)).unwrap_or(0);
            load[r] += n;
            self.owners.insert(name.clone(), r);
        }
    }

    fn owns(&self, name: &str) -> bool {
        self.owners.get(name) == Some(&self.dp.rank())
    }

    /// Every rank receives each owner's updated `params` (f32, packed per
    /// owner into one broadcast).
    fn broadcast(&self, ctx: &Ctx, params: &mut [(&str, &mut Tensor)]) -> Result<()> {
        let group = self.dp.group();
        for owner in 0..self.dp.world_size() {
            let mine: Vec<usize> = (0..params.len())
                .filter(|&i| self.owners.get(params[i].0) == Some(&owner))
                .collect();
            let elems: usize = mine.iter().map(|&i| params[i].1.numel()).sum();
            if elems == 0 {
                continue;
            }
            let mut flat = Tensor::empty(ctx, DType::F32, &[elems])?;
            let rank = self.dp.rank();
            let mut at = 0;
            if rank == owner {
                for &i in &mine {
                    let t = &params[i].1;
                    flat.view(at, &[t.numel()])?.copy_from(ctx, t)?;
                    at += t.numel();
                }
            }
            group.broadcast(ctx, &mut flat, owner)?;
            if rank != owner {
                at = 0;
                for &i in &mine {
                    let t = &mut params[i].1;
                    let src = flat.view(at, t.shape())?;
                    t.copy_from(ctx, &src)?;
                    at += t.numel();
                }
            }
        }
        Ok(())
    }
}

impl Optimizer {
    /// An optimizer with no state yet; moments are created on first use.
    pub fn new(c: &TrainConfig) -> Self {
        Self {
            beta1: c.betas[0],
            beta2: c.betas[1],
            eps: c.eps,
            weight_decay: c.weight_decay,
            max_grad_norm: c.max_grad_norm,
            nan_policy: c.nan_policy,
            step: 0,
            state: BTreeMap::new(),
            masters: BTreeMap::new(),
            tables: Tables::default(),
            host: None,
            shard: None,
        }
    }

    /// Splits the state over the ranks of `dp` (ZeRO stage 1): each rank
    /// keeps the moments of the parameters it owns (about 1/world of them,
    /// by size) and updates only those; the owners broadcast the new
    /// values after each step. [`Optimizer::save`] / [`Optimizer::load`]
    /// then write and read this rank's part. Call before the first step.
    pub fn shard_state(&mut self, dp: DataParallel) -> Result<()> {
        if self.step > 0 || !self.state.is_empty() {
            return Err(Error::Config(
                "the optimizer state must be sharded before it exists".into(),
            ));
        }
        self.shard = (dp.world_size() > 1).then_some(Shard {
            dp,
            owners: BTreeMap::new(),
        });
        Ok(())
    }

    /// Whether the state is split over ranks.
    pub fn is_sharded(&self) -> bool {
        self.shard.is_some()
    }

    /// Moves the optimizer to the host (`offload.optimizer`, ZeRO-Offload
    /// style): moments and f32 masters live in pinned host memory, each
    /// step copies the gradients down, runs AdamW on `threads` host threads
    /// (0: all cores) and copies the updated parameters back. Call before
    /// the first step and before [`Optimizer::track_weights`].
    pub fn offload_to_host(&mut self, threads: usize) -> Result<()> {
        if self.step > 0 || !self.state.is_empty() || !self.masters.is_empty() {
            return Err(Error::Config(
                "offload.optimizer must be chosen before the optimizer has state".into(),
            ));
        }
        let adam = match threads {
            0 => CpuAdamW::new(),
            n => CpuAdamW::with_threads(n),
        }
        .map_err(|e| Error::Config(format!("offload.optimizer: {e}")))?;
        self.host = Some(adam);
        Ok(())
    }

    /// Whether the optimizer runs on the host.
    pub fn is_offloaded(&self) -> bool {
        self.host.is_some()
    }

    /// Updates applied so far.
    pub fn steps_applied(&self) -> u64 {
        self.step
    }

    /// Trains the model's own weights `names` (each with the unit whose blob
    /// holds it): keeps an f32 master of each — the blob view itself for f32
    /// blobs, else an f32 copy written back after every update.
    pub fn track_weights(&mut self, model: &Model, names: &[(Unit, String)]) -> Result<()> {
        let ctx = model.ctx();
        for (unit, name) in names {
            let device_f32 = model
                .store()
                .device_view(*unit, name)
                .filter(|v| v.dtype() == DType::F32);
            let (value, in_place) = match device_f32 {
                Some(view) if self.host.is_none() => (view, true),
                _ if self.host.is_some() => {
                    let u = model.unit(*unit)?;
                    let view = u.get(name)?;
                    let mut f = Tensor::zeros(ctx, DType::F32, view.shape())?;
                    ops::cast(ctx, &view, &mut f)?;
                    let mut m = Tensor::zeros_pinned(ctx, DType::F32, view.shape())?;
                    m.copy_from(ctx, &f)?;
                    ctx.synchronize()?;
                    (m, false)
                }
                _ => {
                    let u = model.unit(*unit)?;
                    let view = u.get(name)?;
                    let mut m = Tensor::zeros(ctx, DType::F32, view.shape())?;
                    ops::cast(ctx, &view, &mut m)?;
                    (m, false)
                }
            };
            self.masters.insert(
                name.clone(),
                Master {
                    unit: *unit,
                    value,
                    in_place,
                },
            );
        }
        Ok(())
    }

    /// Names of the model weights trained (empty for adapter training).
    pub fn weight_names(&self) -> impl Iterator<Item = &str> {
        self.masters.keys().map(String::as_str)
    }

    /// The f32 master of model weight `name`, if trained.
    pub fn master(&self, name: &str) -> Option<&Tensor> {
        self.masters.get(name).map(|m| &m.value)
    }

    /// Norm, finiteness and the gradient factor of a step. With `loss_scale`
    /// the gradients are of the scaled loss: the norm is reported unscaled
    /// and the factor undoes the scale.
    fn verdict(
        &mut self,
        ctx: &Ctx,
        grads: &[&Tensor],
        loss: f64,
        loss_scale: Option<f32>,
    ) -> Result<Verdict> {
        let raw = ops::global_grad_norm_cached(ctx, grads, Some(&mut self.tables.norm))?;
        let (grad_norm, unscale) = match loss_scale {
            None => (raw, None),
            Some(s) => {
                let inv = 1.0 / s;
                (raw * inv, Some(inv))
            }
        };
        let finite = loss.is_finite() && grad_norm.is_finite();
        let clip = if self.max_grad_norm > 0.0 {
            (self.max_grad_norm / (grad_norm + 1e-6)).min(1.0)
        } else {
            1.0
        };
        Ok(Verdict {
            grad_norm,
            finite,
            overflow: loss_scale.is_some() && !grad_norm.is_finite(),
            grad_scale: unscale.map_or(clip, |inv| clip * inv),
        })
    }

    /// The error a non-finite step gives under `nan_policy = "stop"`, if it
    /// does. A gradient overflow under loss scaling with a finite loss is
    /// the scaler's business, not the policy's.
    fn policy(&self, v: &Verdict, loss: f64, step: u64) -> Result<Update> {
        let nan = !loss.is_finite() || (!v.grad_norm.is_finite() && !v.overflow);
        if nan && self.nan_policy == NanPolicy::Stop {
            return Err(Error::NonFinite {
                step,
                loss,
                grad_norm: v.grad_norm,
            });
        }
        Ok(Update {
            grad_norm: v.grad_norm,
            skipped: !v.finite,
            overflow: v.overflow,
        })
    }

    fn hparams(&self, lr: f32, grad_scale: f32, decay: bool) -> AdamWParams {
        AdamWParams {
            lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: if decay { self.weight_decay } else { 0.0 },
            step: self.step,
            grad_scale,
        }
    }

    /// One step over every adapter parameter with learning rate `lr`, given
    /// the step's loss (checked for non-finite values with the gradient
    /// norm). `loss_scale` is the f16 loss scale the gradients carry, if
    /// any. `step` (1-based) only names the step in errors. Gradients are
    /// zeroed afterwards, also when the step is skipped.
    #[allow(clippy::too_many_arguments)]
    pub fn step_adapter(
        &mut self,
        ctx: &Ctx,
        adapter: &mut Adapter,
        grads: &mut Grads,
        loss: f64,
        lr: f32,
        step: u64,
        loss_scale: Option<f32>,
    ) -> Result<Update> {
        let verdict = {
            let all: Vec<&Tensor> = grads
                .lora_all()
                .values()
                .flat_map(|g| g.tensors())
                .collect();
            self.verdict(ctx, &all, loss, loss_scale)?
        };
        let mut updated = BTreeSet::new();
        if let Some(sh) = &mut self.shard {
            let mut all = Vec::new();
            for (module, layer) in adapter.layers.iter_mut() {
                for (i, p) in layer.params_mut().into_iter().enumerate() {
                    all.push((format!("{module}.{}", LORA_PARTS[i]), p.numel()));
                }
            }
            sh.assign(&all);
        }
        if verdict.finite {
            self.step += 1;
            // [decayed (A, B), undecayed (DoRA magnitudes: norm-like scales)]
            let mut groups: [Group; 2] = Default::default();
            for (module, layer) in adapter.layers.iter_mut() {
                let g = grads.lora(module).ok_or_else(|| {
                    Error::Config(format!("no gradients tracked for adapter module {module}"))
                })?;
                for (i, (p, g)) in layer.params_mut().into_iter().zip(g.tensors()).enumerate() {
                    let name = format!("{module}.{}", LORA_PARTS[i]);
                    if self.shard.as_ref().is_some_and(|sh| !sh.owns(&name)) {
                        continue;
                    }
                    ensure_state(ctx, self.host.is_some(), &mut self.state, &name, p)?;
                    let grp = &mut groups[usize::from(i >= 2)];
                    grp.bf16.push(false);
                    grp.names.push(name);
                    grp.params.push(p);
                    grp.grads.push(g.clone());
                    updated.insert((module.as_str(), i));
                }
            }
            for (k, grp) in groups.into_iter().enumerate() {
                let hp = self.hparams(lr, verdict.grad_scale, k == 0);
                match &self.host {
                    None => update(ctx, &mut self.state, grp, &hp, &mut self.tables.adamw[k])?,
                    Some(adam) => update_on_host(ctx, adam, &mut self.state, grp, &hp)?,
                }
            }
            if self.host.is_some() {
                // The host step read copies: the device gradients are zeroed below.
                updated.clear();
            }
        }
        zero_grads(
            ctx,
            grads,
            &updated,
            &BTreeSet::new(),
            &mut self.tables.zero,
        )?;
        drop(updated);
        if let Some(sh) = self.shard.as_ref().filter(|_| verdict.finite) {
            let mut params: Vec<(String, &mut Tensor)> = Vec::new();
            for (module, layer) in adapter.layers.iter_mut() {
                for (i, p) in layer.params_mut().into_iter().enumerate() {
                    params.push((format!("{module}.{}", LORA_PARTS[i]), p));
                }
            }
            let mut named: Vec<(&str, &mut Tensor)> = params
                .iter_mut()
                .map(|(n, t)| (n.as_str(), &mut **t))
                .collect();
            sh.broadcast(ctx, &mut named)?;
        }
        self.policy(&verdict, loss, step)
    }

    /// One step over the model's trained weights (see
    /// [`Optimizer::track_weights`]): AdamW on the f32 masters (no decay on
    /// norm weights and biases), then the new values written into the
    /// model's blobs. Arguments and checks as in [`Optimizer::step_adapter`].
    #[allow(clippy::too_many_arguments)]
    pub fn step_weights(
        &mut self,
        model: &Model,
        grads: &mut Grads,
        loss: f64,
        lr: f32,
        step: u64,
        loss_scale: Option<f32>,
    ) -> Result<Update> {
        let ctx = model.ctx();
        let verdict = {
            let mut all = Vec::with_capacity(self.masters.len());
            for name in self.masters.keys() {
                all.push(grads.get(name).ok_or_else(|| {
                    Error::Config(format!("no gradients tracked for weight {name}"))
                })?);
            }
            self.verdict(ctx, &all, loss, loss_scale)?
        };
        if let Some(sh) = &mut self.shard {
            let all: Vec<(String, usize)> = self
                .masters
                .iter()
                .map(|(n, m)| (n.clone(), m.value.numel()))
                .collect();
            sh.assign(&all);
        }
        let mut owned: BTreeSet<String> = BTreeSet::new();
        if verdict.finite {
            self.step += 1;
            let hps = [
                self.hparams(lr, verdict.grad_scale, true),
                self.hparams(lr, verdict.grad_scale, false),
            ];
            // [decayed, undecayed (norm weights and biases)]
            let mut groups: [Group; 2] = Default::default();
            for (name, m) in self.masters.iter_mut() {
                if self.shard.as_ref().is_some_and(|sh| !sh.owns(name)) {
                    continue;
                }
                owned.insert(name.clone());
                let g = grads.get(name).expect("checked above");
                ensure_state(ctx, self.host.is_some(), &mut self.state, name, &m.value)?;
                let grp = &mut groups[usize::from(!decays(name))];
                let dtype = model.store().layout(m.unit)?.entry(name).map(|e| e.dtype);
                grp.bf16.push(
                    dtype == Some(DType::BF16) && m.value.device() == llmft_tensor::Device::Cpu,
                );
                grp.names.push(name.clone());
                grp.params.push(&mut m.value);
                grp.grads.push(g.clone());
            }
            for (k, grp) in groups.into_iter().enumerate() {
                match &self.host {
                    None => update(
                        ctx,
                        &mut self.state,
                        grp,
                        &hps[k],
                        &mut self.tables.adamw[k],
                    )?,
                    Some(adam) => update_on_host(ctx, adam, &mut self.state, grp, &hps[k])?,
                }
            }
            if let Some(sh) = &self.shard {
                let mut named: Vec<(&str, &mut Tensor)> = self
                    .masters
                    .iter_mut()
                    .map(|(n, m)| (n.as_str(), &mut m.value))
                    .collect();
                sh.broadcast(ctx, &mut named)?;
            }
            for (name, m) in &self.masters {
                // A master another rank updated arrived as f32 values.
                let bf16 = self
                    .state
                    .get(name)
                    .filter(|_| owned.contains(name))
                    .and_then(|s| s.host.as_ref())
                    .and_then(|h| h.bf16.as_ref());
                match bf16 {
                    Some(t) => model.write_weight(m.unit, name, t)?,
                    None => write_back(model, name, m)?,
                }
            }
        }
        // The update zeroed the gradients of every master (not the host step).
        let updated: BTreeSet<&str> = match verdict.finite && self.host.is_none() {
            true => owned.iter().map(String::as_str).collect(),
            false => BTreeSet::new(),
        };
        zero_grads(
            ctx,
            grads,
            &BTreeSet::new(),
            &updated,
            &mut self.tables.zero,
        )?;
        self.policy(&verdict, loss, step)
    }

    /// Writes the moments and step counter as safetensors (`<param>.exp_avg`,
    /// `<param>.exp_avg_sq`, metadata `step`).
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.encode(path)?;
        std::fs::write(path, bytes).map_err(crate::error::io(path))
    }

    /// The bytes [`Optimizer::save`] writes; `path` is the file they are
    /// meant for, named in errors.
    pub fn encode(&self, path: &Path) -> Result<Vec<u8>> {
        let mut tensors = Vec::new();
        for (name, s) in &self.state {
            for (suffix, t) in [("exp_avg", &s.m), ("exp_avg_sq", &s.v)] {
                tensors.push((format!("{name}.{suffix}"), t));
            }
        }
        let meta = HashMap::from([("step".to_string(), self.step.to_string())]);
        encode_f32_safetensors(path, &tensors, meta)
    }

    /// Writes the f32 masters of the trained model weights under their
    /// Hugging Face names (`model.safetensors` of a full / freeze checkpoint).
    pub fn save_weights(&self, path: &Path) -> Result<()> {
        let bytes = self.encode_weights(path)?;
        std::fs::write(path, bytes).map_err(crate::error::io(path))
    }

    /// The bytes [`Optimizer::save_weights`] writes; `path` is the file
    /// they are meant for, named in errors.
    pub fn encode_weights(&self, path: &Path) -> Result<Vec<u8>> {
        let tensors: Vec<(String, &Tensor)> = self
            .masters
            .iter()
            .map(|(n, m)| (n.clone(), &m.value))
            .collect();
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        encode_f32_safetensors(path, &tensors, meta)
    }

    /// Restores the masters [`Optimizer::save_weights`] wrote, and the
    /// model's blobs with them. The file must hold exactly the trained
    /// weights, f32, in their shapes; else the error names `path`.
    pub fn load_weights(&mut self, model: &Model, path: &Path) -> Result<()> {
        let err = |msg: String| Error::Checkpoint {
            path: path.to_path_buf(),
            msg,
        };
        let bytes = std::fs::read(path).map_err(|e| err(format!("cannot be read: {e}")))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| err(e.to_string()))?;
        if let Some(extra) = st
            .names()
            .into_iter()
            .find(|n| !self.masters.contains_key(*n))
        {
            return Err(err(format!(
                "holds {extra}, which this run does not train (another train_type?)"
            )));
        }
        let ctx = model.ctx();
        for (name, m) in self.masters.iter_mut() {
            let view = st
                .tensor(name)
                .map_err(|_| err(format!("{name} is missing")))?;
            if view.dtype() != StDtype::F32 || view.shape() != m.value.shape() {
                return Err(err(format!(
                    "{name} is {:?} {:?}, expected F32 {:?}",
                    view.dtype(),
                    view.shape(),
                    m.value.shape()
                )));
            }
            m.value.copy_from_host_bytes(ctx, view.data())?;
            write_back(model, name, m)?;
        }
        Ok(())
    }

    /// Restores the moments and step counter [`Optimizer::save`] wrote onto
    /// `ctx`; the error names `path` when the file is not a valid state.
    pub fn load(&mut self, ctx: &Ctx, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path).map_err(crate::error::io(path))?;
        let err = |msg: String| Error::Checkpoint {
            path: path.to_path_buf(),
            msg,
        };
        let (_, header) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| err(e.to_string()))?;
        let step = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("step"))
            .ok_or_else(|| err("metadata has no `step`".into()))?
            .parse::<u64>()
            .map_err(|e| err(format!("metadata `step`: {e}")))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| err(e.to_string()))?;
        let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
        for (key, view) in st.tensors() {
            if view.dtype() != StDtype::F32 {
                return Err(err(format!(
                    "tensor {key} has dtype {:?}, expected F32",
                    view.dtype()
                )));
            }
            let data: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let t = Tensor::from_slice(ctx, &data, view.shape())?;
            let t = match self.host {
                Some(_) => t.to_ctx(&Ctx::cpu())?,
                None => t,
            };
            tensors.insert(key, t);
        }
        let mut state = BTreeMap::new();
        for key in tensors.keys().filter(|k| k.ends_with(".exp_avg")) {
            let name = key.trim_end_matches(".exp_avg").to_string();
            let (Some(m), Some(v)) = (tensors.get(key), tensors.get(&format!("{name}.exp_avg_sq")))
            else {
                return Err(err(format!("{name}.exp_avg_sq is missing")));
            };
            if m.shape() != v.shape() {
                return Err(err(format!(
                    "{name}: exp_avg and exp_avg_sq differ in shape"
                )));
            }
            state.insert(
                name,
                Moments {
                    m: m.clone(),
                    v: v.clone(),
                    host: None,
                },
            );
        }
        if state.len() * 2 != tensors.len() {
            return Err(err("tensors other than exp_avg / exp_avg_sq pairs".into()));
        }
        self.step = step;
        self.state = state;
        Ok(())
    }
}

/// Writes a master's value into the model's weight `name` (cast to the
/// blob's dtype): in place where the store keeps the weight on the device,
/// else through the store.
fn write_back(model: &Model, name: &str, m: &Master) -> Result<()> {
    if m.in_place {
        return Ok(());
    }
    // A host master (optimizer offload) is cast on the host.
    let ctx = match m.value.device() {
        llmft_tensor::Device::Cpu => Ctx::cpu(),
        _ => model.ctx().clone(),
    };
    if ctx.device() == model.ctx().device() {
        if let Some(mut dst) = model.store().device_view(m.unit, name) {
            return Ok(ops::cast(&ctx, &m.value, &mut dst)?);
        }
    }
    let dtype = model.store().layout(m.unit)?.entry(name).map(|e| e.dtype);
    let mut cast = Tensor::empty(&ctx, dtype.unwrap_or(DType::F32), m.value.shape())?;
    ops::cast(&ctx, &m.value, &mut cast)?;
    Ok(model.write_weight(m.unit, name, &cast)?)
}

/// Creates zeroed moments for parameter `name` on first use (in host memory
/// under optimizer offload); checks their shape against `param`'s.
fn ensure_state(
    ctx: &Ctx,
    on_host: bool,
    state: &mut BTreeMap<String, Moments>,
    name: &str,
    param: &Tensor,
) -> Result<()> {
    if !state.contains_key(name) {
        let at = if on_host { Ctx::cpu() } else { ctx.clone() };
        let m = Tensor::zeros(&at, DType::F32, param.shape())?;
        let v = Tensor::zeros(&at, DType::F32, param.shape())?;
        state.insert(name.to_string(), Moments { m, v, host: None });
    }
    let s = &state[name];
    if s.m.shape() != param.shape() {
        return Err(Error::Config(format!(
            "optimizer state of {name} has shape {:?}, but the parameter has {:?}",
            s.m.shape(),
            param.shape()
        )));
    }
    Ok(())
}

/// One AdamW update of a group (moments made by [`ensure_state`]), in one
/// multi-tensor launch that also zeroes the group's gradients.
fn update(
    ctx: &Ctx,
    state: &mut BTreeMap<String, Moments>,
    mut grp: Group,
    hp: &AdamWParams,
    table: &mut TableCache,
) -> Result<()> {
    if grp.names.is_empty() {
        return Ok(());
    }
    let mut by_name: HashMap<&str, &mut Moments> =
        state.iter_mut().map(|(k, s)| (k.as_str(), s)).collect();
    let (mut ms, mut vs) = (Vec::new(), Vec::new());
    for name in &grp.names {
        let s = by_name.remove(name.as_str()).ok_or_else(|| {
            Error::Config(format!("parameter {name} is listed twice in one update"))
        })?;
        ms.push(&mut s.m);
        vs.push(&mut s.v);
    }
    let mut grads: Vec<&mut Tensor> = grp.grads.iter_mut().collect();
    ops::adamw_step_multi(
        ctx,
        &mut grp.params,
        &mut grads,
        &mut ms,
        &mut vs,
        hp,
        true,
        Some(table),
    )?;
    Ok(())
}

/// One AdamW update of a group on the host (optimizer offload): gradients
/// (and, once, device parameters) copied to pinned host buffers, the step on
/// the host's cores, device parameters copied back. Bit-identical to
/// [`update`] on the CPU. The device gradients are left for the caller to zero.
fn update_on_host(
    ctx: &Ctx,
    adam: &CpuAdamW,
    state: &mut BTreeMap<String, Moments>,
    mut grp: Group,
    hp: &AdamWParams,
) -> Result<()> {
    if grp.names.is_empty() {
        return Ok(());
    }
    let mut by_name: HashMap<&str, &mut Moments> =
        state.iter_mut().map(|(k, s)| (k.as_str(), s)).collect();
    let mut ms: Vec<&mut Moments> = Vec::with_capacity(grp.names.len());
    for name in &grp.names {
        ms.push(by_name.remove(name.as_str()).ok_or_else(|| {
            Error::Config(format!("parameter {name} is listed twice in one update"))
        })?);
    }
    // Down: every gradient, and device parameters the first time.
    for (((s, p), g), &want_bf16) in ms
        .iter_mut()
        .zip(grp.params.iter())
        .zip(&grp.grads)
        .zip(&grp.bf16)
    {
        if s.host.is_none() {
            let master = match p.device() {
                llmft_tensor::Device::Cpu => None,
                _ => {
                    let mut h = Tensor::zeros_pinned(ctx, DType::F32, p.shape())?;
                    h.copy_from(ctx, p)?;
                    Some(h)
                }
            };
            let grad = Tensor::zeros_pinned(ctx, g.dtype(), g.shape())?;
            let bf16 = match want_bf16 {
                true => Some(Tensor::zeros_pinned(ctx, DType::BF16, p.shape())?),
                false => None,
            };
            s.host = Some(HostCopies { master, grad, bf16 });
        }
        let h = s.host.as_mut().expect("made above");
        h.grad.copy_from(ctx, g)?;
    }
    ctx.synchronize()?;
    // The step.
    let mut host_params: Vec<Tensor> = Vec::with_capacity(ms.len());
    for (s, p) in ms.iter().zip(grp.params.iter()) {
        let h = s.host.as_ref().expect("made above");
        host_params.push(h.master.clone().unwrap_or_else(|| (*p).clone()));
    }
    {
        let mut ts = Vec::with_capacity(ms.len());
        for (s, hp_t) in ms.iter_mut().zip(host_params.iter_mut()) {
            let Moments { m, v, host } = &mut **s;
            let h = host.as_mut().expect("made above");
            let g = h.grad.as_slice::<f32>()?;
            let t = AdamWTensor::new(
                hp_t.as_mut_slice::<f32>()?,
                Grad::Keep(g),
                m.as_mut_slice::<f32>()?,
                v.as_mut_slice::<f32>()?,
            );
            ts.push(match h.bf16.as_mut() {
                Some(b) => t.with_bf16_copy(b.as_mut_slice::<llmft_tensor::bf16>()?),
                None => t,
            });
        }
        adam.step_multi(hp, &mut ts)
            .map_err(|e| Error::Config(format!("offload.optimizer: {e}")))?;
    }
    // Up: the device parameters (queued; the host masters stay unchanged
    // until the next step, which synchronizes before writing them).
    for (p, h) in grp.params.iter_mut().zip(&host_params) {
        if p.device() != llmft_tensor::Device::Cpu {
            p.copy_from(ctx, h)?;
        }
    }
    Ok(())
}

/// Zeroes every gradient buffer (adapter modules and model weights) except
/// those the update already zeroed (`lora_done`: (module, index in
/// `LoraGrads::tensors`); `dense_done`: weight names), in one multi-tensor
/// fill.
fn zero_grads(
    ctx: &Ctx,
    grads: &Grads,
    lora_done: &BTreeSet<(&str, usize)>,
    dense_done: &BTreeSet<&str>,
    table: &mut TableCache,
) -> Result<()> {
    let mut rest: Vec<Tensor> = Vec::new();
    for (n, g) in grads.lora_all() {
        for (i, t) in g.tensors().into_iter().enumerate() {
            if !lora_done.contains(&(n.as_str(), i)) {
                rest.push(t.clone());
            }
        }
    }
    for n in grads.names() {
        if !dense_done.contains(n.as_str()) {
            rest.extend(grads.get(n).cloned());
        }
    }
    if rest.is_empty() {
        return Ok(());
    }
    let mut refs: Vec<&mut Tensor> = rest.iter_mut().collect();
    ops::fill_multi(ctx, &mut refs, 0.0, Some(table))?;
    Ok(())
}

/// f32 tensors as the bytes of one safetensors file with `meta` (errors
/// name `path`).
fn encode_f32_safetensors<S: AsRef<str>>(
    path: &Path,
    tensors: &[(S, &Tensor)],
    meta: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let err = |msg: String| Error::Checkpoint {
        path: path.to_path_buf(),
        msg,
    };
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let bytes: Vec<u8> = t
            .to_f32_vec()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        owned.push((name.as_ref().to_string(), t.shape().to_vec(), bytes));
    }
    let mut views = Vec::with_capacity(owned.len());
    for (k, shape, b) in &owned {
        let v = TensorView::new(StDtype::F32, shape.clone(), b).map_err(|e| err(e.to_string()))?;
        views.push((k.clone(), v));
    }
    safetensors::serialize(views, Some(meta)).map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norms_and_biases_are_not_decayed() {
        for name in [
            "model.norm.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.1.post_attention_layernorm.weight",
            "model.layers.0.self_attn.q_norm.weight",
            "model.layers.0.self_attn.k_proj.bias",
        ] {
            assert!(!decays(name), "{name}");
        }
        for name in [
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.layers.0.mlp.down_proj.weight",
        ] {
            assert!(decays(name), "{name}");
        }
    }

    #[test]
    fn loss_scale_backs_off_and_grows_like_grad_scaler() {
        let mut s = LossScale::new(1024.0, 3);
        s.update(true);
        assert_eq!((s.scale, s.clean_steps), (512.0, 0));
        s.update(false);
        s.update(false);
        assert_eq!((s.scale, s.clean_steps), (512.0, 2));
        s.update(false);
        assert_eq!((s.scale, s.clean_steps), (1024.0, 0));
        s.update(false);
        s.update(true);
        assert_eq!((s.scale, s.clean_steps), (512.0, 0));
    }
}
