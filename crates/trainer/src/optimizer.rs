//! AdamW with f32 moments over named f32 master parameters, with global-norm
//! clipping and the non-finite check of a step.
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use llmft_lora::Adapter;
use llmft_models::Grads;
use llmft_tensor::ops::{self, AdamWParams};
use llmft_tensor::{Ctx, DType, Tensor};
use safetensors::tensor::{Dtype as StDtype, TensorView};

use crate::config::{NanPolicy, TrainConfig};
use crate::{Error, Result};

/// Names of an adapter's parameters in the order of `LoraLinear::params`.
const LORA_PARTS: [&str; 3] = ["lora_A", "lora_B", "lora_magnitude_vector"];

/// First and second moments of one parameter.
#[derive(Debug)]
struct Moments {
    m: Tensor,
    v: Tensor,
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Update {
    /// Global L2 norm of the gradients before clipping.
    pub grad_norm: f32,
    /// The step was skipped for a non-finite loss or gradient norm.
    pub skipped: bool,
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
        }
    }

    /// Updates applied so far.
    pub fn steps_applied(&self) -> u64 {
        self.step
    }

    /// One step over every adapter parameter with learning rate `lr`, given
    /// the step's loss (checked for non-finite values with the gradient
    /// norm). `step` (1-based) only names the step in errors. Gradients are
    /// zeroed afterwards, also when the step is skipped.
    pub fn step_adapter(
        &mut self,
        ctx: &Ctx,
        adapter: &mut Adapter,
        grads: &mut Grads,
        loss: f64,
        lr: f32,
        step: u64,
    ) -> Result<Update> {
        let grad_norm = {
            let all: Vec<&Tensor> = grads
                .lora_all()
                .values()
                .flat_map(|g| g.tensors())
                .collect();
            ops::global_grad_norm(ctx, &all)?
        };
        let finite = loss.is_finite() && grad_norm.is_finite();
        if finite {
            let grad_scale = if self.max_grad_norm > 0.0 {
                (self.max_grad_norm / (grad_norm + 1e-6)).min(1.0)
            } else {
                1.0
            };
            self.step += 1;
            for (module, layer) in adapter.layers.iter_mut() {
                let g = grads.lora(module).ok_or_else(|| {
                    Error::Config(format!("no gradients tracked for adapter module {module}"))
                })?;
                for (i, (p, g)) in layer.params_mut().into_iter().zip(g.tensors()).enumerate() {
                    // DoRA magnitudes are norm-like scales: no decay.
                    let decay = i < 2;
                    let name = format!("{module}.{}", LORA_PARTS[i]);
                    self.update(ctx, &name, p, g, lr, grad_scale, decay)?;
                }
            }
        }
        let names: Vec<String> = grads.lora_all().keys().cloned().collect();
        for n in names {
            if let Some(g) = grads.lora_mut(&n) {
                g.zero(ctx)?;
            }
        }
        if !finite && self.nan_policy == NanPolicy::Stop {
            return Err(Error::NonFinite {
                step,
                loss,
                grad_norm,
            });
        }
        Ok(Update {
            grad_norm,
            skipped: !finite,
        })
    }

    /// Applies the current step's update to one parameter (moments are created
    /// zeroed on first use).
    #[allow(clippy::too_many_arguments)]
    fn update(
        &mut self,
        ctx: &Ctx,
        name: &str,
        param: &mut Tensor,
        grad: &Tensor,
        lr: f32,
        grad_scale: f32,
        decay: bool,
    ) -> Result<()> {
        if !self.state.contains_key(name) {
            let m = Tensor::zeros(ctx, DType::F32, param.shape())?;
            let v = Tensor::zeros(ctx, DType::F32, param.shape())?;
            self.state.insert(name.to_string(), Moments { m, v });
        }
        let s = self.state.get_mut(name).expect("inserted above");
        if s.m.shape() != param.shape() {
            return Err(Error::Config(format!(
                "optimizer state of {name} has shape {:?}, but the parameter has {:?}",
                s.m.shape(),
                param.shape()
            )));
        }
        let hp = AdamWParams {
            lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: if decay { self.weight_decay } else { 0.0 },
            step: self.step,
            grad_scale,
        };
        ops::adamw_step(ctx, param, grad, &mut s.m, &mut s.v, &hp, None)?;
        Ok(())
    }

    /// Writes the moments and step counter as safetensors (`<param>.exp_avg`,
    /// `<param>.exp_avg_sq`, metadata `step`).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, s) in &self.state {
            for (suffix, t) in [("exp_avg", &s.m), ("exp_avg_sq", &s.v)] {
                let bytes: Vec<u8> = t
                    .to_f32_vec()?
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect();
                owned.push((format!("{name}.{suffix}"), t.shape().to_vec(), bytes));
            }
        }
        let err = |msg: String| Error::Checkpoint {
            path: path.to_path_buf(),
            msg,
        };
        let mut views = Vec::with_capacity(owned.len());
        for (k, shape, b) in &owned {
            let v =
                TensorView::new(StDtype::F32, shape.clone(), b).map_err(|e| err(e.to_string()))?;
            views.push((k.clone(), v));
        }
        let meta = HashMap::from([("step".to_string(), self.step.to_string())]);
        let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| err(e.to_string()))?;
        std::fs::write(path, bytes).map_err(crate::error::io(path))
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
            tensors.insert(key, Tensor::from_slice(ctx, &data, view.shape())?);
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
