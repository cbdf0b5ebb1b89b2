//! The model: embedding, decoder layers, final norm + LM head + loss, run
//! unit by unit over a [`WeightStore`].
use std::collections::BTreeMap;
use std::path::Path;

use llmft_lora::{Adapter, LinearShape, LoraConfig, LoraGrads, Mode};
use llmft_quant::QuantConfig;
use llmft_tensor::ops::{self, CrossEntropyOpts, Gemm, LmHeadGrads, LossStats};
use llmft_tensor::{Ctx, DType, Tensor};

use llmft_tensor::store::{Resident, StoreBuilder, Unit, WeightStore};
use llmft_tensor::{Event, PinnedPool};

use crate::layer::{KeptAttention, KvCache, Layer, LayerActs};
use crate::loader::{load_into, random_into};
use crate::stash::Stash;
use crate::store::{QuantIndex, UnitWeights};
use crate::{Error, ModelConfig, Result};

/// One batch of `batch` rows of `seq` tokens, flattened row-major.
pub struct ModelBatch {
    /// Rows.
    pub batch: usize,
    /// Tokens per row.
    pub seq: usize,
    /// Token ids `[B·T]` (i32).
    pub ids: Tensor,
    /// Next-token targets `[B·T]` (i32, −100 = not trained).
    pub targets: Tensor,
    /// Position ids `[B·T]` (i32; restart at 0 for each packed example).
    pub positions: Tensor,
    /// Example ids `[B, T]` (i32) of packed rows; `None` = one sequence per row.
    pub segments: Option<Tensor>,
    /// Seed of the adapters' dropout masks for this batch; `None` = no dropout.
    pub dropout_seed: Option<u64>,
}

impl ModelBatch {
    /// A batch from host vectors. Positions default to 0..T per row; targets
    /// to the next token in the row (−100 at the last position).
    pub fn from_host(
        ctx: &Ctx,
        batch: usize,
        seq: usize,
        ids: &[i32],
        targets: Option<&[i32]>,
        positions: Option<&[i32]>,
        segments: Option<&[i32]>,
    ) -> Result<Self> {
        let n = batch * seq;
        for (what, len) in [
            ("ids", Some(ids.len())),
            ("targets", targets.map(|t| t.len())),
            ("positions", positions.map(|t| t.len())),
            ("segments", segments.map(|t| t.len())),
        ] {
            if let Some(l) = len {
                if l != n {
                    return Err(Error::Invalid(format!(
                        "batch {what} has {l} entries, expected {batch}×{seq} = {n}"
                    )));
                }
            }
        }
        let default_targets: Vec<i32> = (0..n)
            .map(|i| if (i + 1) % seq == 0 { -100 } else { ids[i + 1] })
            .collect();
        let default_pos: Vec<i32> = (0..n).map(|i| (i % seq) as i32).collect();
        Ok(Self {
            batch,
            seq,
            ids: Tensor::from_slice(ctx, ids, &[n])?,
            targets: Tensor::from_slice(ctx, targets.unwrap_or(&default_targets), &[n])?,
            positions: Tensor::from_slice(ctx, positions.unwrap_or(&default_pos), &[n])?,
            segments: segments
                .map(|s| Tensor::from_slice(ctx, s, &[batch, seq]))
                .transpose()?,
            dropout_seed: None,
        })
    }

    fn tokens(&self) -> usize {
        self.batch * self.seq
    }
}

/// f32 gradient buffers by Hugging Face tensor name (plus `embed_output`,
/// the gradient of the embedding output, when asked for).
#[derive(Default)]
pub struct Grads {
    map: BTreeMap<String, Tensor>,
    lora: BTreeMap<String, LoraGrads>,
}

impl Grads {
    /// Zeroed gradients for every frozen tensor of the model (full training /
    /// reference checks).
    pub fn for_all_weights(model: &Model) -> Result<Self> {
        let mut map = BTreeMap::new();
        for u in 0..model.config.num_units() {
            for (name, shape) in model.config.unit_tensors(u) {
                map.insert(name, Tensor::zeros(&model.ctx, DType::F32, &shape)?);
            }
        }
        Ok(Self {
            map,
            lora: BTreeMap::new(),
        })
    }

    /// Zeroed gradients of every adapter of `model` (LoRA/DoRA training).
    pub fn for_adapter(model: &Model) -> Result<Self> {
        let adapter = model
            .adapter()
            .ok_or_else(|| Error::Invalid("the model has no adapter attached".into()))?;
        let mut lora = BTreeMap::new();
        for (name, l) in &adapter.layers {
            lora.insert(name.clone(), LoraGrads::zeros(&model.ctx, l)?);
        }
        Ok(Self {
            map: BTreeMap::new(),
            lora,
        })
    }

    /// The adapter gradients of module `name`, if tracked.
    pub fn lora(&self, name: &str) -> Option<&LoraGrads> {
        self.lora.get(name)
    }

    /// The adapter gradients of module `name`, mutably.
    pub fn lora_mut(&mut self, name: &str) -> Option<&mut LoraGrads> {
        self.lora.get_mut(name)
    }

    /// Adapter gradients by module name.
    pub fn lora_all(&self) -> &BTreeMap<String, LoraGrads> {
        &self.lora
    }

    /// The gradient of `name`, if tracked.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.map.get(name)
    }

    /// The gradient of `name`, mutably.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Tensor> {
        self.map.get_mut(name)
    }

    /// Tracks `name` with a zeroed buffer.
    pub fn track(&mut self, ctx: &Ctx, name: &str, shape: &[usize]) -> Result<()> {
        self.map
            .insert(name.to_string(), Tensor::zeros(ctx, DType::F32, shape)?);
        Ok(())
    }

    /// Names tracked.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.map.keys()
    }

    /// Every gradient buffer, in a fixed order (tracked weights by name,
    /// then adapter modules by name: A, B, magnitude): the order in which
    /// data-parallel ranks reduce them.
    pub fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        let mut out: Vec<&mut Tensor> = self.map.values_mut().collect();
        for g in self.lora.values_mut() {
            out.push(&mut g.a);
            out.push(&mut g.b);
            if let Some(m) = &mut g.magnitude {
                out.push(m);
            }
        }
        out
    }
}

/// Options of [`Model::generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOpts {
    /// Tokens to produce at most.
    pub max_new_tokens: usize,
    /// 0 = greedy; otherwise logits are divided by it before sampling.
    pub temperature: f32,
    /// Nucleus: sample among the most likely tokens whose probabilities sum to this.
    pub top_p: f32,
    /// Seed of the sampler.
    pub seed: u64,
    /// Tokens that end generation (included in the output).
    pub stop: Vec<i32>,
}

impl Default for GenerateOpts {
    fn default() -> Self {
        Self {
            max_new_tokens: 32,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: Vec::new(),
        }
    }
}

/// Picks the next token from f32 logits: argmax when `temperature` is 0,
/// else top-p sampling with the `step`-th uniform of stream `seed`.
pub fn sample_token(logits: &[f32], opts: &GenerateOpts, step: u64) -> i32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |b, (i, &v)| {
                if v > b.1 {
                    (i, v)
                } else {
                    b
                }
            })
            .0 as i32
    };
    if opts.temperature <= 0.0 {
        return argmax();
    }
    let mx = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i, (((l - mx) / opts.temperature) as f64).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = Vec::new();
    let mut cum = 0.0;
    for (i, p) in probs {
        kept.push((i, p / total));
        cum += p / total;
        if cum >= opts.top_p as f64 {
            break;
        }
    }
    let mass: f64 = kept.iter().map(|p| p.1).sum();
    let mut u = ops::uniform01(opts.seed, step) as f64 * mass;
    for (i, p) in &kept {
        if u < *p {
            return *i as i32;
        }
        u -= p;
    }
    kept.last().map(|p| p.0 as i32).unwrap_or_else(argmax)
}

/// What the forward keeps of a layer for the backward.
enum Kept {
    /// Every activation (no checkpointing, or a layer it skips).
    All(Box<LayerActs>),
    /// Under checkpointing: the attention record, if kept; the rest is
    /// recomputed from the layer input.
    Attention(Option<KeptAttention>),
}

/// A layer's input and records between its forward and its backward, on
/// the device or (activation offload) in host memory.
struct Saved {
    x: Option<Tensor>,
    kept: Kept,
    place: Place,
}

/// Where a [`Saved`] is.
enum Place {
    Device,
    Host,
    /// On its way back: usable once the compute stream waits for the event.
    Returning(Event),
}

impl Saved {
    fn map(&mut self, f: &mut dyn FnMut(Tensor) -> Result<Tensor>) -> Result<()> {
        if let Some(x) = self.x.take() {
            self.x = Some(f(x)?);
        }
        if let Kept::Attention(Some(k)) = &mut self.kept {
            k.map_tensors(f)?;
        }
        Ok(())
    }

    fn send_to_host(&mut self, stash: &mut Stash) -> Result<()> {
        self.map(&mut |t| stash.out(t))?;
        self.place = Place::Host;
        Ok(())
    }

    /// Starts the copy back of a host record.
    fn start_back(&mut self, stash: &Stash) -> Result<()> {
        if let Place::Host = self.place {
            self.map(&mut |t| stash.back(t))?;
            self.place = Place::Returning(stash.mark()?);
        }
        Ok(())
    }

    /// The record on the device, ordered before the compute stream's next work.
    fn on_device(&mut self, stash: &Stash) -> Result<()> {
        self.start_back(stash)?;
        if let Place::Returning(ev) = std::mem::replace(&mut self.place, Place::Device) {
            stash.ready(&ev)?;
        }
        Ok(())
    }
}

/// A decoder-only transformer over a weight store.
pub struct Model {
    /// Its configuration.
    pub config: ModelConfig,
    ctx: Ctx,
    dtype: DType,
    store: Box<dyn WeightStore>,
    quant: QuantIndex,
    pinned: PinnedPool,
    inv_freq: Tensor,
    /// Keep only each layer's input and recompute inside backward.
    pub checkpointing: bool,
    /// Under checkpointing, also keep each layer's fused-attention output
    /// and log-sum-exp (`B·T·q_heads·head_dim` values + `B·q_heads·T` f32
    /// per layer) and its LoRA input products `x̃·Aᵀ` (`B·T·r` values per
    /// adapted linear), so the recompute runs neither the attention forward
    /// nor the adapters' input GEMMs again. Default true.
    pub checkpoint_keep_attention: bool,
    /// Under checkpointing, the last this-many layers keep their activations
    /// instead (no recompute: faster, more memory; the SwiGLU output is
    /// recomputed from the kept gate and up projections). Default 0.
    pub checkpoint_skip_layers: usize,
    /// Under checkpointing, move what each recomputed layer keeps (its input,
    /// its attention record) to pinned host memory after its forward and
    /// bring it back one layer ahead of its backward, overlapping compute.
    /// Default false.
    pub offload_activations: bool,
    /// Under checkpointing, a layer's recompute and backward share its
    /// dequantized weights (each weight dequantized once; costs a layer's
    /// dense weights in memory: 1.7 GB at 70B width). With false each use
    /// dequantizes again into a short-lived buffer. Default true.
    pub checkpoint_cache_dequantized: bool,
    adapter: Option<Adapter>,
    source_config: Option<serde_json::Value>,
    mem_trace: bool,
}

impl Model {
    /// A model over `store` computing in `dtype` on `ctx`; `quant` says
    /// which entries of each unit are parts of quantized weights.
    pub fn new(
        config: ModelConfig,
        ctx: &Ctx,
        dtype: DType,
        store: Box<dyn WeightStore>,
        quant: QuantIndex,
    ) -> Result<Self> {
        let inv = ops::rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling);
        let inv_freq = Tensor::from_slice(ctx, &inv, &[config.head_dim / 2])?;
        if store.num_units() != config.num_units() {
            return Err(Error::Invalid(format!(
                "the weight store has {} units, the config {}",
                store.num_units(),
                config.num_units()
            )));
        }
        Ok(Self {
            config,
            ctx: ctx.clone(),
            dtype,
            store,
            quant,
            pinned: PinnedPool::new(ctx),
            inv_freq,
            checkpointing: false,
            checkpoint_keep_attention: true,
            checkpoint_skip_layers: 0,
            offload_activations: false,
            checkpoint_cache_dequantized: true,
            adapter: None,
            source_config: None,
            mem_trace: std::env::var_os("LLMFT_MEM_TRACE").is_some_and(|v| v != "0"),
        })
    }

    /// With `LLMFT_MEM_TRACE` set, prints the device allocator's bytes in
    /// use and its peak at `what` to stderr (a pass's memory, layer by layer).
    fn trace_mem(&self, what: &dyn Fn() -> String) {
        if let (true, Some(cu)) = (self.mem_trace, self.ctx.cuda_ctx()) {
            let s = cu.allocator().stats();
            let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
            eprintln!(
                "mem {}: in use {:.2} GiB, peak {:.2} GiB",
                what(),
                gib(s.in_use),
                gib(s.peak_in_use)
            );
        }
    }

    /// Loads a model folder or a Hugging Face model id (see
    /// [`crate::resolve_model`]) resident on `ctx`.
    pub fn from_pretrained(reference: &str, ctx: &Ctx, dtype: DType) -> Result<Self> {
        Self::from_dir(&crate::resolve_model(reference)?, ctx, dtype)
    }

    /// Loads a Hugging Face folder (config.json + safetensors) resident on `ctx`.
    pub fn from_dir(dir: &Path, ctx: &Ctx, dtype: DType) -> Result<Self> {
        Self::from_dir_quantized(dir, ctx, dtype, None)
    }

    /// Loads a Hugging Face folder, quantizing the decoder's linear weights
    /// with `quant` while loading (QLoRA / HQQ / int8 bases).
    pub fn from_dir_quantized(
        dir: &Path,
        ctx: &Ctx,
        dtype: DType,
        quant: Option<&QuantConfig>,
    ) -> Result<Self> {
        Self::from_dir_into(dir, ctx, dtype, quant, &mut |n| {
            Ok(Resident::builder(ctx, n))
        })
    }

    /// Loads a Hugging Face folder into the store `builder(num_units)` makes
    /// (resident, offloaded, ...), unit by unit.
    pub fn from_dir_into(
        dir: &Path,
        ctx: &Ctx,
        dtype: DType,
        quant: Option<&QuantConfig>,
        builder: &mut dyn FnMut(usize) -> Result<Box<dyn StoreBuilder>>,
    ) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let config = ModelConfig::from_file(&cfg_path)?;
        let mut b = builder(config.num_units())?;
        let index = load_into(dir, &config, ctx, dtype, quant, b.as_mut())?;
        let mut model = Self::new(config, ctx, dtype, b.finish()?, index)?;
        model.source_config = std::fs::read_to_string(&cfg_path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        Ok(model)
    }

    /// A randomly initialized model of `config`.
    pub fn random(config: ModelConfig, ctx: &Ctx, dtype: DType, seed: u64) -> Result<Self> {
        Self::random_quantized(config, ctx, dtype, seed, None)
    }

    /// A randomly initialized model whose decoder linears are quantized with `quant`.
    pub fn random_quantized(
        config: ModelConfig,
        ctx: &Ctx,
        dtype: DType,
        seed: u64,
        quant: Option<&QuantConfig>,
    ) -> Result<Self> {
        let b = Resident::builder(ctx, config.num_units());
        Self::random_in(config, ctx, dtype, seed, quant, b)
    }

    /// [`Model::random_quantized`] into the store `builder` builds.
    pub fn random_in(
        config: ModelConfig,
        ctx: &Ctx,
        dtype: DType,
        seed: u64,
        quant: Option<&QuantConfig>,
        mut builder: Box<dyn StoreBuilder>,
    ) -> Result<Self> {
        let index = random_into(&config, ctx, dtype, seed, quant, builder.as_mut())?;
        Self::new(config, ctx, dtype, builder.finish()?, index)
    }

    /// The weights of `unit`, fetched from the store (held while the
    /// returned value lives).
    pub fn unit(&self, unit: Unit) -> Result<UnitWeights> {
        let g = self.store.fetch(unit)?;
        UnitWeights::new(g, self.quant.unit(unit.index(self.config.num_units())))
    }

    /// The weight store.
    pub fn store(&self) -> &dyn WeightStore {
        self.store.as_ref()
    }

    /// Overwrites the frozen tensor `name` of `unit` with `src` where the
    /// store keeps it (full / freeze training writes its updates here).
    pub fn write_weight(&self, unit: Unit, name: &str, src: &Tensor) -> Result<()> {
        Ok(self.store.write(unit, name, src)?)
    }

    /// Host memory pinned for activation offload (free and in use).
    pub fn pinned_activation_bytes(&self) -> usize {
        self.pinned.held_bytes()
    }

    /// The order of a training pass: embedding, layers, head (and the tied
    /// embedding), layers in reverse.
    fn train_order(&self) -> Vec<Unit> {
        let l = self.config.num_layers;
        let mut o = self.forward_order();
        o.extend((0..l).rev().map(Unit::Layer));
        o
    }

    /// The order of a forward pass.
    fn forward_order(&self) -> Vec<Unit> {
        let mut o: Vec<Unit> = Unit::all(self.config.num_layers).collect();
        if self.config.tie_word_embeddings {
            o.push(Unit::Embed);
        }
        o
    }

    /// The compute context.
    pub fn ctx(&self) -> &Ctx {
        &self.ctx
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    fn layer<'a>(&'a self, w: &'a UnitWeights, i: usize, mode: Mode) -> Layer<'a> {
        Layer {
            cfg: &self.config,
            ctx: &self.ctx,
            dt: self.dtype,
            w,
            prefix: format!("model.layers.{i}."),
            inv_freq: &self.inv_freq,
            adapter: self.adapter.as_ref(),
            mode,
            saved: Default::default(),
            dense: None,
            kept_lora: Default::default(),
        }
    }

    /// [`Model::layer`] keeping its dequantized weights until it is dropped
    /// (for a recompute followed by the backward), unless
    /// `checkpoint_cache_dequantized` is off.
    fn layer_for_backward<'a>(&'a self, w: &'a UnitWeights, i: usize, mode: Mode) -> Layer<'a> {
        Layer {
            dense: self.checkpoint_cache_dequantized.then(Default::default),
            ..self.layer(w, i, mode)
        }
    }

    fn mode(batch: &ModelBatch) -> Mode {
        match batch.dropout_seed {
            Some(seed) => Mode::Train { seed },
            None => Mode::Eval,
        }
    }

    /// The decoder's linear layers by module name
    /// (`model.layers.{i}.self_attn.q_proj`, ...), as adapters target them.
    pub fn linear_shapes(&self) -> BTreeMap<String, LinearShape> {
        let mut out = BTreeMap::new();
        for i in 0..self.config.num_layers {
            for (name, shape) in self.config.layer_tensors(i) {
                if let Some(module) = name
                    .strip_suffix(".weight")
                    .filter(|_| crate::is_quantizable(&name))
                {
                    out.insert(module.to_string(), LinearShape::new(shape[1], shape[0]));
                }
            }
        }
        out
    }

    /// New adapters for this model's linears per `config` (DoRA magnitudes
    /// initialized from the base weights, dequantized where quantized).
    pub fn new_adapter(&self, config: LoraConfig, seed: u64) -> Result<Adapter> {
        let mut adapter = Adapter::new(&self.ctx, &self.linear_shapes(), config, seed)?;
        let pending: Vec<String> = adapter
            .pending_magnitudes()
            .into_iter()
            .map(String::from)
            .collect();
        for module in pending {
            let w = self.dense_weight(&format!("{module}.weight"))?;
            adapter.init_magnitude(&self.ctx, &module, &w)?;
        }
        Ok(adapter)
    }

    /// The dense (dequantized where quantized) weight of a decoder tensor,
    /// in memory of its own.
    pub fn dense_weight(&self, name: &str) -> Result<Tensor> {
        let layer: usize = name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse().ok())
            .ok_or_else(|| Error::Invalid(format!("`{name}` is not a decoder tensor")))?;
        let u = self.unit(Unit::Layer(layer))?;
        match u.quantized(name) {
            Some(q) => {
                let mut t = Tensor::zeros(&self.ctx, self.dtype, &q.shape)?;
                q.dequantize(&self.ctx, &mut t)?;
                Ok(t)
            }
            // A copy: the view would not outlive the fetched unit.
            None => Ok(u.get(name)?.to_ctx(&self.ctx)?),
        }
    }

    /// Attaches adapters (from [`Model::new_adapter`] or `Adapter::load`).
    pub fn attach_adapter(&mut self, adapter: Adapter) {
        self.adapter = Some(adapter);
    }

    /// The config.json the model was loaded from, if any.
    pub fn source_config(&self) -> Option<&serde_json::Value> {
        self.source_config.as_ref()
    }

    /// The attached adapters.
    pub fn adapter(&self) -> Option<&Adapter> {
        self.adapter.as_ref()
    }

    /// The attached adapters, mutably (the optimizer updates them).
    pub fn adapter_mut(&mut self) -> Option<&mut Adapter> {
        self.adapter.as_mut()
    }

    /// Detaches and returns the adapters.
    pub fn take_adapter(&mut self) -> Option<Adapter> {
        self.adapter.take()
    }

    fn check_batch(&self, batch: &ModelBatch) -> Result<()> {
        if let Err(e) = self.config.check_window(batch.seq) {
            return Err(Error::Invalid(format!(
                "a row of {e}; set data.batch.seq_len and data.cutoff_len to at most {}",
                self.config.sliding_window.unwrap_or(0)
            )));
        }
        for (what, t) in [
            ("ids", &batch.ids),
            ("targets", &batch.targets),
            ("positions", &batch.positions),
        ] {
            if t.shape() != [batch.tokens()] || t.dtype() != DType::I32 {
                return Err(Error::Invalid(format!(
                    "batch {what} must be i32 [{}], got {} {:?}",
                    batch.tokens(),
                    t.dtype(),
                    t.shape()
                )));
            }
        }
        Ok(())
    }

    fn embed(&self, batch: &ModelBatch) -> Result<Tensor> {
        let w = self.unit(Unit::Embed)?;
        let table = w.get("model.embed_tokens.weight")?;
        let mut x = Tensor::zeros(
            &self.ctx,
            self.dtype,
            &[batch.tokens(), self.config.hidden_size],
        )?;
        ops::embedding_fwd(&self.ctx, &batch.ids, &table, &mut x)?;
        Ok(x)
    }

    /// The final norm's and LM head's weights: the head unit, and the
    /// embedding unit when the head is tied to it (fetched after the head, as
    /// the pass orders declare).
    fn head_units(&self) -> Result<HeadUnits> {
        let head = self.unit(Unit::Head)?;
        let tied = match self.config.tie_word_embeddings {
            true => Some(self.unit(Unit::Embed)?),
            false => None,
        };
        Ok(HeadUnits { head, tied })
    }

    fn final_norm(&self, hu: &HeadUnits, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = x.shape()[0];
        let mut h = Tensor::zeros(&self.ctx, self.dtype, x.shape())?;
        let mut r = Tensor::zeros(&self.ctx, DType::F32, &[n])?;
        ops::rmsnorm_fwd(
            &self.ctx,
            x,
            &hu.head.get("model.norm.weight")?,
            self.config.rms_norm_eps,
            &mut h,
            &mut r,
        )?;
        Ok((h, r))
    }

    /// The decoder stack's forward from the embedding output: the final
    /// hidden states.
    fn forward_layers(&self, batch: &ModelBatch) -> Result<Tensor> {
        let mut x = self.embed(batch)?;
        for i in 0..self.config.num_layers {
            let w = self.unit(Unit::Layer(i))?;
            x = self.layer(&w, i, Self::mode(batch)).forward(&x, batch)?.0;
        }
        Ok(x)
    }

    /// f32 logits `[B·T, V]` (for checks and generation; training never
    /// materializes them).
    pub fn logits(&self, batch: &ModelBatch) -> Result<Tensor> {
        self.check_batch(batch)?;
        self.store.schedule(&self.forward_order())?;
        let x = self.forward_layers(batch)?;
        let hu = self.head_units()?;
        let (h, _) = self.final_norm(&hu, &x)?;
        let mut logits = Tensor::zeros(
            &self.ctx,
            DType::F32,
            &[batch.tokens(), self.config.vocab_size],
        )?;
        ops::gemm(&self.ctx, &h, &hu.weight()?.0, &mut logits, Gemm::nt())?;
        Ok(logits)
    }

    /// The loss of one batch, forward only (evaluation): as
    /// [`Model::forward_backward`] without gradients and without running
    /// any backward.
    pub fn forward_loss(&self, batch: &ModelBatch, normalizer: Option<f32>) -> Result<LossStats> {
        self.check_batch(batch)?;
        self.store.schedule(&self.forward_order())?;
        let x = self.forward_layers(batch)?;
        let hu = self.head_units()?;
        let (h, _) = self.final_norm(&hu, &x)?;
        let opts = CrossEntropyOpts {
            normalizer,
            ..CrossEntropyOpts::default()
        };
        Ok(ops::lm_head_cross_entropy(
            &self.ctx,
            &h,
            &hu.weight()?.0,
            &batch.targets,
            &opts,
            None,
        )?)
    }

    /// Continues `prompt` (one sequence) with a KV cache; returns the new tokens.
    pub fn generate(&self, prompt: &[i32], opts: &GenerateOpts) -> Result<Vec<i32>> {
        if prompt.is_empty() {
            return Err(Error::Invalid("generate needs a non-empty prompt".into()));
        }
        let cap = prompt.len() + opts.max_new_tokens;
        self.config.check_window(cap).map_err(|e| {
            Error::Invalid(format!("generate: the prompt and max_new_tokens make {e}"))
        })?;
        let mut caches = (0..self.config.num_layers)
            .map(|_| KvCache::new(&self.ctx, self.dtype, &self.config, cap))
            .collect::<Result<Vec<_>>>()?;
        let mut out = Vec::new();
        let (mut tokens, mut start) = (prompt.to_vec(), 0usize);
        for step in 0..opts.max_new_tokens {
            self.store.schedule(&self.forward_order())?;
            let n = tokens.len();
            let ids = Tensor::from_slice(&self.ctx, &tokens, &[n])?;
            let pos: Vec<i32> = (start..start + n).map(|p| p as i32).collect();
            let pos = Tensor::from_slice(&self.ctx, &pos, &[n])?;
            let mut x = Tensor::zeros(&self.ctx, self.dtype, &[n, self.config.hidden_size])?;
            {
                let e = self.unit(Unit::Embed)?;
                ops::embedding_fwd(
                    &self.ctx,
                    &ids,
                    &e.get("model.embed_tokens.weight")?,
                    &mut x,
                )?;
            }
            for (i, cache) in caches.iter_mut().enumerate() {
                let w = self.unit(Unit::Layer(i))?;
                x = self
                    .layer(&w, i, Mode::Eval)
                    .forward_cached(&x, &pos, cache, start)?;
            }
            let last = x.view(
                (n - 1) * self.config.hidden_size,
                &[1, self.config.hidden_size],
            )?;
            let hu = self.head_units()?;
            let (h, _) = self.final_norm(&hu, &last)?;
            let mut logits = Tensor::zeros(&self.ctx, DType::F32, &[1, self.config.vocab_size])?;
            ops::gemm(&self.ctx, &h, &hu.weight()?.0, &mut logits, Gemm::nt())?;
            drop(hu);
            let next = sample_token(&logits.to_vec::<f32>()?, opts, step as u64);
            out.push(next);
            if opts.stop.contains(&next) {
                break;
            }
            start += n;
            tokens = vec![next];
        }
        Ok(out)
    }

    /// Decoder layer `i` forward on hidden states `x [B·T, H]`.
    pub fn forward_layer(&self, i: usize, x: &Tensor, batch: &ModelBatch) -> Result<Tensor> {
        let w = self.unit(Unit::Layer(i))?;
        Ok(self.layer(&w, i, Self::mode(batch)).forward(x, batch)?.0)
    }

    /// Decoder layer `i` backward as gradient checkpointing runs it: the
    /// forward is recomputed from `x`, then `dx` is returned for `dy`.
    pub fn backward_layer(
        &self,
        i: usize,
        x: &Tensor,
        dy: &Tensor,
        batch: &ModelBatch,
        grads: Option<&mut Grads>,
    ) -> Result<Tensor> {
        let w = self.unit(Unit::Layer(i))?;
        let layer = self.layer_for_backward(&w, i, Self::mode(batch));
        let a = layer.recompute(x, batch, None)?;
        let mut grads = grads;
        layer.backward(x, &a, dy, batch, &mut grads)
    }

    /// Forward and backward over one batch. The loss is the sum over
    /// trained targets divided by `normalizer` (default: their count).
    /// Gradients of tracked weights are added into `grads`; with
    /// `embed_output` tracked there, the gradient of the embedding output
    /// is written too.
    pub fn forward_backward(
        &self,
        batch: &ModelBatch,
        normalizer: Option<f32>,
        mut grads: Option<&mut Grads>,
    ) -> Result<LossStats> {
        self.check_batch(batch)?;
        let l = self.config.num_layers;
        self.store.schedule(&self.train_order())?;
        let x0 = self.embed(batch)?;
        // Forward: keep each layer's input; keep activations unless checkpointing.
        let mut saved: Vec<Saved> = Vec::with_capacity(l);
        let mut x = x0;
        let recomputed = if self.checkpointing {
            l.saturating_sub(self.checkpoint_skip_layers)
        } else {
            0
        };
        let mut stash = Stash::new(&self.ctx, &self.pinned);
        for i in 0..l {
            self.trace_mem(&|| format!("forward layer {i}"));
            let (y, a) = {
                let w = self.unit(Unit::Layer(i))?;
                self.layer(&w, i, Self::mode(batch)).forward(&x, batch)?
            };
            let kept = match (i < recomputed, self.checkpoint_keep_attention) {
                // A layer checkpointing skips keeps all but the SwiGLU output.
                (false, _) if self.checkpointing => {
                    let mut a = a;
                    a.drop_act();
                    Kept::All(Box::new(a))
                }
                (false, _) => Kept::All(Box::new(a)),
                (true, true) => Kept::Attention(Some(
                    a.take_attention(self.adapter.as_ref(), &format!("model.layers.{i}.")),
                )),
                (true, false) => Kept::Attention(None),
            };
            let mut s = Saved {
                x: Some(x),
                kept,
                place: Place::Device,
            };
            // The last recomputed layer's backward comes next: it stays.
            stash.settle();
            if self.offload_activations && i < recomputed && i + 1 < l {
                s.send_to_host(&mut stash)?;
            }
            saved.push(s);
            x = y;
        }
        // Head: final norm, fused LM head + cross-entropy.
        let hu = self.head_units()?;
        stash.settle();
        self.trace_mem(&|| "head".into());
        let (h, rstd) = self.final_norm(&hu, &x)?;
        let (w_head, head_name) = hu.weight()?;
        let mut dh = Tensor::zeros(&self.ctx, self.dtype, h.shape())?;
        let opts = CrossEntropyOpts {
            normalizer,
            ..CrossEntropyOpts::default()
        };
        let stats = {
            let dw = grads.as_deref_mut().and_then(|g| g.get_mut(head_name));
            ops::lm_head_cross_entropy(
                &self.ctx,
                &h,
                &w_head,
                &batch.targets,
                &opts,
                Some(LmHeadGrads { dh: &mut dh, dw }),
            )?
        };
        let mut dx = Tensor::zeros(&self.ctx, self.dtype, x.shape())?;
        {
            let dnorm = grads
                .as_deref_mut()
                .and_then(|g| g.get_mut("model.norm.weight"));
            ops::rmsnorm_bwd(
                &self.ctx,
                &dh,
                &x,
                &hu.head.get("model.norm.weight")?,
                &rstd,
                &mut dx,
                dnorm,
            )?;
        }
        drop((h, dh, x, w_head, hu));
        // Layers in reverse; each one's record comes back one layer ahead.
        for i in (0..l).rev() {
            self.trace_mem(&|| format!("backward layer {i}"));
            let mut s = saved.pop().expect("one record per layer");
            s.on_device(&stash)?;
            if let Some(next) = saved.last_mut() {
                next.start_back(&stash)?;
            }
            let xin = s.x.take().expect("a layer input");
            let w = self.unit(Unit::Layer(i))?;
            dx = match s.kept {
                Kept::All(a) => {
                    let layer = self.layer(&w, i, Self::mode(batch));
                    layer.backward(&xin, &a, &dx, batch, &mut grads)?
                }
                Kept::Attention(kept) => {
                    let layer = self.layer_for_backward(&w, i, Self::mode(batch));
                    let a = layer.recompute(&xin, batch, kept)?;
                    layer.backward(&xin, &a, &dx, batch, &mut grads)?
                }
            };
        }
        self.trace_mem(&|| "embedding backward".into());
        if let Some(g) = grads {
            if let Some(e) = g.get_mut("embed_output") {
                ops::cast(&self.ctx, &dx, e)?;
            }
            if let Some(de) = g.get_mut("model.embed_tokens.weight") {
                ops::embedding_bwd(&self.ctx, &batch.ids, &dx, de)?;
            }
        }
        Ok(stats)
    }
}

/// The fetched head unit and, for a tied head, the embedding unit.
struct HeadUnits {
    head: UnitWeights,
    tied: Option<UnitWeights>,
}

impl HeadUnits {
    /// The LM head's weight and its name.
    fn weight(&self) -> Result<(Tensor, &'static str)> {
        match &self.tied {
            Some(e) => Ok((
                e.get("model.embed_tokens.weight")?,
                "model.embed_tokens.weight",
            )),
            None => Ok((self.head.get("lm_head.weight")?, "lm_head.weight")),
        }
    }
}
