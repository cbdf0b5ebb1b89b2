//! Host memory the `[offload]` settings will pin, planned from the model's
//! config before anything is loaded or trained, so a machine that cannot hold
//! it stops with one sentence naming the setting and the bytes.
use llmft_models::{is_quantizable, ModelConfig, QuantConfig};
use llmft_tensor::DType;
use llmft_trainer::TrainType;

use crate::config::Settings;

/// Bytes each enabled offload setting pins in host memory (upper bounds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostPlan {
    /// `offload.params`: the frozen units' home copies.
    pub params: usize,
    /// `offload.activations`: the records of the offloaded layers.
    pub activations: usize,
    /// `offload.optimizer`: moments, host masters and gradient copies.
    pub optimizer: usize,
}

impl HostPlan {
    /// The plan of `s` for `config`, computing in `dtype` with base `quant`,
    /// micro-batches of `tokens` tokens.
    pub fn of(
        s: &Settings,
        config: &ModelConfig,
        dtype: DType,
        quant: Option<&QuantConfig>,
        tokens: usize,
    ) -> Self {
        let mut plan = Self::default();
        let o = &s.offload;
        if o.params {
            plan.params = (0..config.num_units())
                .filter(|&u| !(o.keep_embedding && u == 0))
                .flat_map(|u| config.unit_tensors(u))
                .map(
                    |(name, shape)| match quant.filter(|_| is_quantizable(&name)) {
                        Some(q) => q.stored_bytes(&shape),
                        None => shape.iter().product::<usize>() * dtype.size(),
                    },
                )
                .sum();
        }
        if o.activations && s.model.checkpointing {
            // Every recomputed layer but the last: its input, and with the
            // attention kept its output and log-sum-exp.
            let layers = config
                .num_layers
                .saturating_sub(s.model.checkpoint_skip_layers)
                .saturating_sub(1);
            let mut per_token = config.hidden_size * dtype.size();
            if s.model.checkpoint_keep_attention {
                per_token += config.q_dim() * dtype.size() + config.num_heads * 4;
            }
            plan.activations = layers * tokens * per_token;
        }
        if o.optimizer {
            // m, v, the host master and the gradient copy: 16 bytes each.
            plan.optimizer = 16 * trainable_upper_bound(s, config);
        }
        plan
    }

    /// Checks each part, then the sum, against the host memory available.
    pub fn check(&self) -> Result<(), String> {
        for (setting, bytes) in [
            ("offload.params", self.params),
            ("offload.activations", self.activations),
            ("offload.optimizer", self.optimizer),
        ] {
            if bytes > 0 {
                llmft_offload::check_host_memory(setting, bytes).map_err(|e| e.to_string())?;
            }
        }
        let parts = [self.params, self.activations, self.optimizer];
        if parts.iter().filter(|&&b| b > 0).count() > 1 {
            let total = parts.iter().sum();
            llmft_offload::check_host_memory("the [offload] settings together", total)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// Trainable parameters, at most: LoRA of rank `lora.r` on every decoder
/// linear for adapter recipes (DoRA adds a magnitude per output), else
/// [`weights_trained`].
fn trainable_upper_bound(s: &Settings, config: &ModelConfig) -> usize {
    let tt = s.train.train_type;
    if !tt.uses_adapter() {
        return weights_trained(config, tt, s.train.freeze_trainable_layers);
    }
    let r = s.lora.r;
    (1..=config.num_layers)
        .flat_map(|u| config.unit_tensors(u))
        .filter(|(name, _)| is_quantizable(name))
        .map(|(_, sh)| r * (sh[0] + sh[1]) + sh[0])
        .sum()
}

/// The model weights `full` (every weight) or `freeze` (the last
/// `freeze_layers` decoder layers) trains.
pub fn weights_trained(config: &ModelConfig, tt: TrainType, freeze_layers: usize) -> usize {
    let numel = |u: usize| -> usize {
        config
            .unit_tensors(u)
            .iter()
            .map(|(_, sh)| sh.iter().product::<usize>())
            .sum()
    };
    match tt {
        TrainType::Freeze => {
            let l = config.num_layers;
            let k = freeze_layers.min(l);
            (l - k + 1..=l).map(numel).sum()
        }
        _ => (0..config.num_units()).map(numel).sum(),
    }
}
