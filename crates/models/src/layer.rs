//! The decoder layer: forward and hand-written backward.
//!
//! ```text
//! h1 = rmsnorm(x)            q,k,v = h1·Wqᵀ(+b), h1·Wkᵀ(+b), h1·Wvᵀ(+b)
//! (Qwen3: q,k = rmsnorm per head)   q,k = rope(q,k)
//! o  = softmax_causal(q·kᵀ/√d)·v     x2 = x + o·Woᵀ
//! h2 = rmsnorm(x2)           a  = silu(h2·Wgᵀ) ⊙ (h2·Wuᵀ)     y = x2 + a·Wdᵀ
//! ```
use std::cell::RefCell;
use std::collections::HashMap;

use llmft_lora::{Adapter, LoraSaved, Mode};
use llmft_tensor::ops::{self, Gemm};
use llmft_tensor::{Ctx, DType, Tensor};

use crate::model::{Grads, ModelBatch};
use crate::store::UnitWeights;
use crate::{ModelConfig, Result};

/// Activations a layer's backward needs (kept, or recomputed under
/// gradient checkpointing).
pub(crate) struct LayerActs {
    inp: AttnIn,
    /// q, k, v after RoPE: token-major `[B, T, H, D]` where the fused
    /// attention runs, head-major `[B, H, T, D]` on the materialized path.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scores: AttnRecord,
    attn: Tensor,
    mlp: Mlp,
    /// What each adapted linear's forward kept, by linear name.
    lora: HashMap<String, LoraSaved>,
}

/// What a layer's forward leaves for its recompute under gradient
/// checkpointing: the attention record, so that [`Layer::recompute`] skips
/// the attention, and the LoRA records (`x̃·Aᵀ`, `N·r` values per adapted
/// linear), so that it skips the adapters' input products.
pub(crate) struct KeptAttention(Option<AttnRecord>, HashMap<String, LoraSaved>);

impl KeptAttention {
    /// Replaces every tensor of the record with `f(tensor)` (activation
    /// offload moves them to host memory after the forward and back before
    /// the backward).
    pub(crate) fn map_tensors(
        &mut self,
        f: &mut dyn FnMut(Tensor) -> Result<Tensor>,
    ) -> Result<()> {
        if let Some(AttnRecord::Fused { out, lse }) = self.0.take() {
            self.0 = Some(AttnRecord::Fused {
                out: f(out)?,
                lse: f(lse)?,
            });
        }
        for saved in self.1.values_mut() {
            saved.map_tensors(f)?;
        }
        Ok(())
    }
}

impl LayerActs {
    /// Frees the SwiGLU output (`B·T·intermediate` values); the backward
    /// recomputes it from the kept gate and up projections.
    pub(crate) fn drop_act(&mut self) {
        self.mlp.act = None;
    }

    /// The fused attention's output and log-sum-exp (`B·T·H·D` values and
    /// `B·H·T` f32 per layer; not where the materialized path ran, whose
    /// `T × T` probabilities are not worth keeping) and the LoRA records
    /// (DoRA's hold a copy of the output: those are dropped), dropping
    /// everything else.
    pub(crate) fn take_attention(self, adapter: Option<&Adapter>, prefix: &str) -> KeptAttention {
        let scores = match self.scores {
            AttnRecord::Fused { .. } => Some(self.scores),
            AttnRecord::Probs(_) => None,
        };
        let lora = self
            .lora
            .into_iter()
            .filter(|(name, _)| {
                adapter
                    .and_then(|a| a.layers.get(&format!("{prefix}{name}")))
                    .is_some_and(|l| !l.use_dora())
            })
            .collect();
        KeptAttention(scores, lora)
    }
}

/// What the attention's backward needs besides q, k, v.
enum AttnRecord {
    /// The fused kernel's output `[B, T, H, D]` (token-major; the o_proj
    /// input is the same memory) and the log-sum-exp of each query's scaled
    /// scores `[B, H, T]`.
    Fused { out: Tensor, lse: Tensor },
    /// The materialized probabilities `[B, H, T, T]`, where the fused kernel
    /// does not run (see `Layer::fused_attention`).
    Probs(Tensor),
}

/// The attention's normalized input and Qwen3's per-head norm records.
struct AttnIn {
    h1: Tensor,
    rstd1: Tensor,
    q_pre: Option<Tensor>,
    k_pre: Option<Tensor>,
    rstd_q: Option<Tensor>,
    rstd_k: Option<Tensor>,
}

/// q, k (after RoPE) and v, token-major `[N, H, D]`.
struct Qkv {
    inp: AttnIn,
    q: Tensor,
    k: Tensor,
    v: Tensor,
}

struct Mlp {
    x2: Tensor,
    h2: Tensor,
    rstd2: Tensor,
    gate: Tensor,
    up: Tensor,
    /// `silu(gate) ⊙ up`, or `None` once dropped ([`LayerActs::drop_act`]):
    /// the backward then recomputes it.
    act: Option<Tensor>,
}

/// Keys and values of one layer for one sequence: `[kv_heads, capacity, head_dim]`.
pub struct KvCache {
    k: Tensor,
    v: Tensor,
    capacity: usize,
}

impl KvCache {
    /// An empty cache for `capacity` positions.
    pub fn new(ctx: &Ctx, dtype: DType, cfg: &ModelConfig, capacity: usize) -> Result<Self> {
        let shape = [cfg.num_kv_heads * capacity, cfg.head_dim];
        Ok(Self {
            k: Tensor::zeros(ctx, dtype, &shape)?,
            v: Tensor::zeros(ctx, dtype, &shape)?,
            capacity,
        })
    }
}

pub(crate) struct Layer<'a> {
    pub cfg: &'a ModelConfig,
    pub ctx: &'a Ctx,
    pub dt: DType,
    pub w: &'a UnitWeights,
    pub prefix: String,
    pub inv_freq: &'a Tensor,
    /// LoRA/DoRA adapters of the model, if any.
    pub adapter: Option<&'a Adapter>,
    /// Dropout mode of the adapters.
    pub mode: Mode,
    /// Adapter records of the forward in progress (moved into LayerActs).
    pub saved: RefCell<HashMap<String, LoraSaved>>,
    /// Dequantized base weights kept for this layer's lifetime (a recompute
    /// followed by its backward dequantizes each weight once), or `None`.
    pub dense: Option<RefCell<HashMap<String, Tensor>>>,
    /// LoRA records of this layer's forward, given to its recompute: an
    /// adapted linear found here reuses its `x̃·Aᵀ` instead of computing it.
    pub kept_lora: RefCell<HashMap<String, LoraSaved>>,
}

impl Layer<'_> {
    /// A buffer the next op overwrites completely (no memset on CUDA).
    fn z(&self, shape: &[usize]) -> Result<Tensor> {
        Ok(Tensor::empty(self.ctx, self.dt, shape)?)
    }
    fn f32z(&self, shape: &[usize]) -> Result<Tensor> {
        Ok(Tensor::empty(self.ctx, DType::F32, shape)?)
    }
    fn wt(&self, name: &str) -> Result<Tensor> {
        self.w.get(&format!("{}{name}", self.prefix))
    }

    /// The dense weight `[out, in]` of linear `name`: a view of the blob, or
    /// the quantized weight dequantized into a fresh (allocator-cached) buffer.
    fn base_weight(&self, name: &str) -> Result<Tensor> {
        let full = format!("{}{name}.weight", self.prefix);
        match self.w.quantized(&full) {
            Some(q) => {
                if let Some(t) = self
                    .dense
                    .as_ref()
                    .and_then(|d| d.borrow().get(name).cloned())
                {
                    return Ok(t);
                }
                let mut t = self.z(&q.shape)?;
                q.dequantize(self.ctx, &mut t)?;
                if let Some(d) = &self.dense {
                    d.borrow_mut().insert(name.to_string(), t.clone());
                }
                Ok(t)
            }
            None => self.w.get(&full),
        }
    }

    /// y = x·Wᵀ (+ b): x [N, in] -> y [N, out].
    fn linear(&self, name: &str, x: &Tensor, out: usize) -> Result<Tensor> {
        let n = x.shape()[0];
        let mut y = self.z(&[n, out])?;
        let w = self.base_weight(name)?;
        // The LoRA hook: the adapter's path joins x·Wᵀ before the bias. LoRA
        // writes its small product first and the base GEMM accumulates onto
        // it in its epilogue; DoRA needs x·Wᵀ itself, so it runs after.
        let module = format!("{}{name}", self.prefix);
        match self.adapter.and_then(|a| a.layers.get(&module)) {
            Some(lora) => {
                let kept = self.kept_lora.borrow_mut().remove(name);
                let saved = if lora.use_dora() {
                    let mut saved = LoraSaved::new();
                    ops::gemm(self.ctx, x, &w, &mut y, Gemm::nt())?;
                    lora.forward(self.ctx, x, &w, &mut y, &mut saved, self.mode)?;
                    saved
                } else {
                    let saved = match kept {
                        Some(saved) => {
                            lora.forward_first_from(self.ctx, &saved, &mut y)?;
                            saved
                        }
                        None => {
                            let mut saved = LoraSaved::new();
                            lora.forward_first(self.ctx, x, &mut y, &mut saved, self.mode)?;
                            saved
                        }
                    };
                    ops::gemm(self.ctx, x, &w, &mut y, Gemm::nt().accumulate())?;
                    saved
                };
                self.saved.borrow_mut().insert(name.to_string(), saved);
            }
            None => ops::gemm(self.ctx, x, &w, &mut y, Gemm::nt())?,
        }
        let bname = format!("{}{name}.bias", self.prefix);
        if self.w.contains(&bname) {
            let b = self.w.get(&bname)?.reshape(&[1, out])?;
            let ones = ones(self.ctx, self.dt, n)?;
            ops::gemm(self.ctx, &ones, &b, &mut y, Gemm::default().accumulate())?;
        }
        Ok(y)
    }

    /// Backward of `linear`: dx (+)= dy·W; weight/bias grads into `grads`.
    #[allow(clippy::too_many_arguments)]
    fn linear_bwd(
        &self,
        name: &str,
        x: &Tensor,
        dy: &Tensor,
        dx: &mut Tensor,
        accumulate: bool,
        lora_saved: &HashMap<String, LoraSaved>,
        grads: &mut Option<&mut Grads>,
    ) -> Result<()> {
        let w = self.base_weight(name)?;
        // The adapter's share of dx goes in first (written, or added when
        // accumulating) and the base dy·W GEMM accumulates onto it.
        let module = format!("{}{name}", self.prefix);
        let base = match self.adapter.and_then(|a| a.layers.get(&module)) {
            Some(lora) => {
                let saved = lora_saved.get(name).ok_or_else(|| {
                    crate::Error::Invalid(format!("no forward record for adapter {module}"))
                })?;
                let mut scratch = None;
                let lg = match grads.as_deref_mut().and_then(|g| g.lora_mut(&module)) {
                    Some(lg) => lg,
                    // Gradient of the input only: the adapter's grads are discarded.
                    None => scratch.insert(llmft_lora::LoraGrads::zeros(self.ctx, lora)?),
                };
                if accumulate {
                    lora.backward(self.ctx, x, &w, dy, saved, dx, lg)?;
                } else {
                    lora.backward_first(self.ctx, x, &w, dy, saved, dx, lg)?;
                }
                Gemm::default().accumulate()
            }
            None if accumulate => Gemm::default().accumulate(),
            None => Gemm::default(),
        };
        ops::gemm(self.ctx, dy, &w, dx, base)?;
        if let Some(g) = grads.as_deref_mut() {
            let full = format!("{}{name}.weight", self.prefix);
            if let Some(dw) = g.get_mut(&full) {
                ops::gemm(self.ctx, dy, x, dw, Gemm::tn().accumulate())?;
            }
            let bname = format!("{}{name}.bias", self.prefix);
            if let Some(db) = g.get_mut(&bname) {
                let n = dy.shape()[0];
                let ones = ones(self.ctx, self.dt, n)?;
                let out = dy.shape()[1];
                let mut db2 = db.reshape(&[1, out])?;
                ops::gemm(self.ctx, &ones, dy, &mut db2, Gemm::tn().accumulate())?;
            }
        }
        Ok(())
    }

    /// The attention inputs: h1 = rmsnorm(x); q, k, v projections; Qwen3's
    /// per-head norms; RoPE on q and k (token-major `[N, H, D]`).
    fn qkv(&self, x: &Tensor, positions: &Tensor) -> Result<Qkv> {
        let c = self.cfg;
        let (n, h) = (x.shape()[0], c.hidden_size);
        let (nh, nkv, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let mut h1 = self.z(&[n, h])?;
        let mut rstd1 = self.f32z(&[n])?;
        ops::rmsnorm_fwd(
            self.ctx,
            x,
            &self.wt("input_layernorm.weight")?,
            c.rms_norm_eps,
            &mut h1,
            &mut rstd1,
        )?;
        let mut qt = self.linear("self_attn.q_proj", &h1, nh * d)?;
        let mut kt = self.linear("self_attn.k_proj", &h1, nkv * d)?;
        let v = self.linear("self_attn.v_proj", &h1, nkv * d)?;
        let (mut q_pre, mut k_pre, mut rstd_q, mut rstd_k) = (None, None, None, None);
        if c.qk_norm {
            let (qn, rq) = self.head_norm("self_attn.q_norm.weight", &qt, n * nh)?;
            let (kn, rk) = self.head_norm("self_attn.k_norm.weight", &kt, n * nkv)?;
            q_pre = Some(std::mem::replace(&mut qt, qn));
            k_pre = Some(std::mem::replace(&mut kt, kn));
            rstd_q = Some(rq);
            rstd_k = Some(rk);
        }
        let mut q = self.z(&[n, nh, d])?;
        ops::rope_fwd(
            self.ctx,
            &qt.reshape(&[n, nh, d])?,
            positions,
            self.inv_freq,
            &mut q,
        )?;
        let mut k = self.z(&[n, nkv, d])?;
        ops::rope_fwd(
            self.ctx,
            &kt.reshape(&[n, nkv, d])?,
            positions,
            self.inv_freq,
            &mut k,
        )?;
        Ok(Qkv {
            inp: AttnIn {
                h1,
                rstd1,
                q_pre,
                k_pre,
                rstd_q,
                rstd_k,
            },
            q,
            k,
            v: v.reshape(&[n, nkv, d])?,
        })
    }

    /// x2 = x + o_proj(attn); y = x2 + down(silu(gate(h2)) ⊙ up(h2)).
    /// Without `need_y` (a recompute for backward, which never reads y) the
    /// base down_proj GEMM and the residual are skipped; down_proj's adapter
    /// record is still made (a DoRA record needs the output: then it runs).
    fn out_and_mlp(
        &self,
        x: &Tensor,
        attn: &Tensor,
        need_y: bool,
    ) -> Result<(Option<Tensor>, Mlp)> {
        let c = self.cfg;
        let (n, h, f) = (x.shape()[0], c.hidden_size, c.intermediate_size);
        let mut x2 = self.linear("self_attn.o_proj", attn, h)?;
        ops::axpby(self.ctx, 1.0, x, 1.0, &mut x2)?;
        let mut h2 = self.z(&[n, h])?;
        let mut rstd2 = self.f32z(&[n])?;
        let w2 = self.wt("post_attention_layernorm.weight")?;
        ops::rmsnorm_fwd(self.ctx, &x2, &w2, c.rms_norm_eps, &mut h2, &mut rstd2)?;
        let gate = self.linear("mlp.gate_proj", &h2, f)?;
        let up = self.linear("mlp.up_proj", &h2, f)?;
        let mut act = self.z(&[n, f])?;
        ops::swiglu_fwd(self.ctx, &gate, &up, &mut act)?;
        let down = format!("{}mlp.down_proj", self.prefix);
        let lora = self.adapter.and_then(|a| a.layers.get(&down));
        let y = if need_y || lora.is_some_and(|l| l.use_dora()) {
            let mut y = self.linear("mlp.down_proj", &act, h)?;
            ops::axpby(self.ctx, 1.0, &x2, 1.0, &mut y)?;
            Some(y)
        } else {
            if let Some(l) = lora {
                let kept = self.kept_lora.borrow_mut().remove("mlp.down_proj");
                let saved = match kept {
                    Some(saved) => saved,
                    None => {
                        let mut saved = LoraSaved::new();
                        l.record(self.ctx, &act, &mut saved, self.mode)?;
                        saved
                    }
                };
                self.saved
                    .borrow_mut()
                    .insert("mlp.down_proj".to_string(), saved);
            }
            None
        };
        Ok((
            y,
            Mlp {
                x2,
                h2,
                rstd2,
                gate,
                up,
                act: Some(act),
            },
        ))
    }

    /// Forward; returns y and the activations for backward.
    pub fn forward(&self, x: &Tensor, batch: &ModelBatch) -> Result<(Tensor, LayerActs)> {
        let (y, a) = self.run(x, batch, true, None)?;
        Ok((y.expect("the output was asked for"), a))
    }

    /// The activations [`Layer::backward`] needs, recomputed from the input
    /// under gradient checkpointing: the forward without its output (the
    /// base down_proj GEMM, about a quarter of the layer's linear FLOPs, and
    /// the residual add are not run).
    ///
    /// `kept`: the records of this layer's forward
    /// ([`LayerActs::take_attention`]); given, the attention forward (where
    /// its record was kept) and the adapters' input GEMMs are not run again.
    pub fn recompute(
        &self,
        x: &Tensor,
        batch: &ModelBatch,
        kept: Option<KeptAttention>,
    ) -> Result<LayerActs> {
        Ok(self.run(x, batch, false, kept)?.1)
    }

    fn run(
        &self,
        x: &Tensor,
        batch: &ModelBatch,
        need_y: bool,
        kept: Option<KeptAttention>,
    ) -> Result<(Option<Tensor>, LayerActs)> {
        let c = self.cfg;
        let (b, t) = (batch.batch, batch.seq);
        let (nh, nkv, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let n = b * t;
        // The forward's records: adapters found there skip their input GEMM.
        let kept_scores = match kept {
            Some(KeptAttention(scores, lora)) => {
                *self.kept_lora.borrow_mut() = lora;
                scores
            }
            None => None,
        };
        let p = self.qkv(x, &batch.positions)?;
        // The fused kernel reads the projections' token-major layout as is.
        let fused = self.fused_attention();
        let (q, k, v) = if fused {
            (
                p.q.reshape(&[b, t, nh, d])?,
                p.k.reshape(&[b, t, nkv, d])?,
                p.v.reshape(&[b, t, nkv, d])?,
            )
        } else {
            (
                to_heads(self.ctx, &p.q, b, t, nh, d)?,
                to_heads(self.ctx, &p.k, b, t, nkv, d)?,
                to_heads(self.ctx, &p.v, b, t, nkv, d)?,
            )
        };

        let scale = 1.0 / (d as f32).sqrt();
        let (attn, scores) = if let Some(rec) = kept_scores {
            let attn = match &rec {
                AttnRecord::Fused { out, .. } => out.reshape(&[n, nh * d])?,
                AttnRecord::Probs(probs) => {
                    let o3 = self.probs_v(probs, &v, b, t)?;
                    from_heads(self.ctx, &o3, b, t, nh, d)?
                }
            };
            (attn, rec)
        } else if fused {
            let mut out = self.z(&[b, t, nh, d])?;
            let mut lse = self.f32z(&[b, nh, t])?;
            ops::flash_attn_fwd_tokens(
                self.ctx,
                &q,
                &k,
                &v,
                batch.segments.as_ref(),
                scale,
                &mut out,
                &mut lse,
            )?;
            // o_proj's input is the same memory.
            let attn = out.reshape(&[n, nh * d])?;
            (attn, AttnRecord::Fused { out, lse })
        } else {
            let probs = self.materialized_attn(&q, &k, batch, scale)?;
            let o3 = self.probs_v(&probs, &v, b, t)?;
            let attn = from_heads(self.ctx, &o3, b, t, nh, d)?;
            (attn, AttnRecord::Probs(probs))
        };
        let (y, m) = self.out_and_mlp(x, &attn, need_y)?;
        Ok((
            y,
            LayerActs {
                inp: p.inp,
                q,
                k,
                v,
                scores,
                attn,
                mlp: m,
                lora: self.saved.take(),
            },
        ))
    }

    /// Whether attention runs through the fused kernel: on CUDA, bf16/f16,
    /// head dims 64 and 128 (those of the real models, where it was
    /// measured). The CPU and the tiny test models' head dims keep the
    /// materialized path, whose behaviour (including the out-of-memory error
    /// for a row whose `T × T` scores cannot fit) their tests are written for.
    fn fused_attention(&self) -> bool {
        let d = self.cfg.head_dim;
        self.ctx.cuda_ctx().is_some()
            && matches!(d, 64 | 128)
            && ops::flash_attn_supported(self.ctx, self.dt, d)
    }

    /// The materialized fallback: `softmax_causal(q·kᵀ · scale)` as
    /// `[B, H, T, T]` probabilities (grouped: the `rep` query heads of a kv
    /// head are contiguous, so one batched GEMM per kv head).
    fn materialized_attn(
        &self,
        q: &Tensor,
        k: &Tensor,
        batch: &ModelBatch,
        scale: f32,
    ) -> Result<Tensor> {
        let (b, t) = (batch.batch, batch.seq);
        let (nh, nkv, d) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let rep = nh / nkv;
        let q3 = q.reshape(&[b * nkv, rep * t, d])?;
        let k3 = k.reshape(&[b * nkv, t, d])?;
        let mut scores = self.z(&[b * nkv, rep * t, t])?;
        ops::gemm(self.ctx, &q3, &k3, &mut scores, Gemm::nt())?;
        let mut probs = self.z(&[b, nh, t, t])?;
        ops::softmax_causal_fwd(
            self.ctx,
            &scores.reshape(&[b, nh, t, t])?,
            batch.segments.as_ref(),
            scale,
            &mut probs,
        )?;
        Ok(probs)
    }

    /// `probs · v` of the materialized fallback, `[B·kv_heads, rep·T, D]`.
    fn probs_v(&self, probs: &Tensor, v: &Tensor, b: usize, t: usize) -> Result<Tensor> {
        let (nh, nkv, d) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let rep = nh / nkv;
        let mut o3 = self.z(&[b * nkv, rep * t, d])?;
        ops::gemm(
            self.ctx,
            &probs.reshape(&[b * nkv, rep * t, t])?,
            &v.reshape(&[b * nkv, t, d])?,
            &mut o3,
            Gemm::default(),
        )?;
        Ok(o3)
    }

    /// Inference forward of `x [tq, H]` (one sequence) at positions
    /// `start..start+tq`, appending k/v to `cache` and attending over it.
    pub fn forward_cached(
        &self,
        x: &Tensor,
        positions: &Tensor,
        cache: &mut KvCache,
        start: usize,
    ) -> Result<Tensor> {
        let c = self.cfg;
        let tq = x.shape()[0];
        let (nh, nkv, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let tk = start + tq;
        if tk > cache.capacity {
            return Err(crate::Error::Invalid(format!(
                "the KV cache holds {} positions; {tk} needed",
                cache.capacity
            )));
        }
        let p = self.qkv(x, positions)?;
        let q = to_heads(self.ctx, &p.q, 1, tq, nh, d)?;
        let k = to_heads(self.ctx, &p.k, 1, tq, nkv, d)?;
        let v = to_heads(self.ctx, &p.v, 1, tq, nkv, d)?;
        let rep = nh / nkv;
        let scale = 1.0 / (d as f32).sqrt();
        let o = self.z(&[nh, tq, d])?;
        for g in 0..nkv {
            let at = (g * cache.capacity + start) * d;
            cache
                .k
                .view(at, &[tq, d])?
                .copy_from(self.ctx, &k.view(g * tq * d, &[tq, d])?)?;
            cache
                .v
                .view(at, &[tq, d])?
                .copy_from(self.ctx, &v.view(g * tq * d, &[tq, d])?)?;
            let kg = cache.k.view(g * cache.capacity * d, &[tk, d])?;
            let vg = cache.v.view(g * cache.capacity * d, &[tk, d])?;
            let qg = q.view(g * rep * tq * d, &[rep * tq, d])?;
            let mut s = self.z(&[rep * tq, tk])?;
            ops::gemm(self.ctx, &qg, &kg, &mut s, Gemm::nt())?;
            let mut pr = self.z(&[1, rep, tq, tk])?;
            ops::softmax_causal_fwd(
                self.ctx,
                &s.reshape(&[1, rep, tq, tk])?,
                None,
                scale,
                &mut pr,
            )?;
            let mut og = o.view(g * rep * tq * d, &[rep * tq, d])?;
            ops::gemm(
                self.ctx,
                &pr.reshape(&[rep * tq, tk])?,
                &vg,
                &mut og,
                Gemm::default(),
            )?;
        }
        let attn = from_heads(self.ctx, &o, 1, tq, nh, d)?;
        Ok(self
            .out_and_mlp(x, &attn, true)?
            .0
            .expect("the output was asked for"))
    }

    fn head_norm(&self, wname: &str, x: &Tensor, rows: usize) -> Result<(Tensor, Tensor)> {
        let d = self.cfg.head_dim;
        let mut y = self.z(&[rows, d])?;
        let mut r = self.f32z(&[rows])?;
        ops::rmsnorm_fwd(
            self.ctx,
            &x.reshape(&[rows, d])?,
            &self.wt(wname)?,
            self.cfg.rms_norm_eps,
            &mut y,
            &mut r,
        )?;
        Ok((y.reshape(x.shape())?, r))
    }

    fn head_norm_bwd(
        &self,
        wname: &str,
        dy: &Tensor,
        x: &Tensor,
        rstd: &Tensor,
        grads: &mut Option<&mut Grads>,
    ) -> Result<Tensor> {
        let d = self.cfg.head_dim;
        let rows = rstd.shape()[0];
        let mut dx = self.z(&[rows, d])?;
        let full = format!("{}{wname}", self.prefix);
        let dw = grads.as_deref_mut().and_then(|g| g.get_mut(&full));
        ops::rmsnorm_bwd(
            self.ctx,
            &dy.reshape(&[rows, d])?,
            &x.reshape(&[rows, d])?,
            &self.wt(wname)?,
            rstd,
            &mut dx,
            dw,
        )?;
        Ok(dx.reshape(dy.shape())?)
    }

    /// Backward of the materialized fallback: dq `[B·kv_heads, rep·T, D]`,
    /// dk and dv `[B·kv_heads, T, D]`.
    fn materialized_attn_bwd(
        &self,
        a: &LayerActs,
        probs: &Tensor,
        d_o: &Tensor,
        b: usize,
        t: usize,
        scale: f32,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (nh, nkv, d) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let rep = nh / nkv;
        let d_o3 = d_o.reshape(&[b * nkv, rep * t, d])?;
        let p3 = probs.reshape(&[b * nkv, rep * t, t])?;
        let (q3, k3, v3) = (
            a.q.reshape(&[b * nkv, rep * t, d])?,
            a.k.reshape(&[b * nkv, t, d])?,
            a.v.reshape(&[b * nkv, t, d])?,
        );
        let mut dp = self.z(&[b * nkv, rep * t, t])?;
        ops::gemm(self.ctx, &d_o3, &v3, &mut dp, Gemm::nt())?;
        let mut dv = self.z(&[b * nkv, t, d])?;
        ops::gemm(self.ctx, &p3, &d_o3, &mut dv, Gemm::tn())?;
        let mut ds = self.z(&[b, nh, t, t])?;
        ops::softmax_causal_bwd(
            self.ctx,
            probs,
            &dp.reshape(&[b, nh, t, t])?,
            scale,
            &mut ds,
        )?;
        drop(dp);
        let ds3 = ds.reshape(&[b * nkv, rep * t, t])?;
        let mut dq = self.z(&[b * nkv, rep * t, d])?;
        ops::gemm(self.ctx, &ds3, &k3, &mut dq, Gemm::default())?;
        let mut dk = self.z(&[b * nkv, t, d])?;
        ops::gemm(self.ctx, &ds3, &q3, &mut dk, Gemm::tn())?;
        Ok((dq, dk, dv))
    }

    /// Backward: returns dx given dy and the forward's activations.
    pub fn backward(
        &self,
        x: &Tensor,
        a: &LayerActs,
        dy: &Tensor,
        batch: &ModelBatch,
        grads: &mut Option<&mut Grads>,
    ) -> Result<Tensor> {
        let c = self.cfg;
        let (n, h, f) = (x.shape()[0], c.hidden_size, c.intermediate_size);
        let (b, t) = (batch.batch, batch.seq);
        let (nh, nkv, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let scale = 1.0 / (d as f32).sqrt();

        // MLP: y = x2 + down(act)
        let act = match &a.mlp.act {
            Some(act) => act.clone(),
            None => {
                let mut act = self.z(&[n, f])?;
                ops::swiglu_fwd(self.ctx, &a.mlp.gate, &a.mlp.up, &mut act)?;
                act
            }
        };
        let mut dact = self.z(&[n, f])?;
        self.linear_bwd("mlp.down_proj", &act, dy, &mut dact, false, &a.lora, grads)?;
        let mut dgate = self.z(&[n, f])?;
        let mut dup = self.z(&[n, f])?;
        ops::swiglu_bwd(
            self.ctx,
            &dact,
            &a.mlp.gate,
            &a.mlp.up,
            &mut dgate,
            &mut dup,
        )?;
        drop(dact);
        let mut dh2 = self.z(&[n, h])?;
        self.linear_bwd(
            "mlp.gate_proj",
            &a.mlp.h2,
            &dgate,
            &mut dh2,
            false,
            &a.lora,
            grads,
        )?;
        self.linear_bwd(
            "mlp.up_proj",
            &a.mlp.h2,
            &dup,
            &mut dh2,
            true,
            &a.lora,
            grads,
        )?;
        drop((dgate, dup));
        let mut dx2 = self.z(&[n, h])?;
        let ln2 = format!("{}post_attention_layernorm.weight", self.prefix);
        let dw2 = grads.as_deref_mut().and_then(|g| g.get_mut(&ln2));
        ops::rmsnorm_bwd(
            self.ctx,
            &dh2,
            &a.mlp.x2,
            &self.wt("post_attention_layernorm.weight")?,
            &a.mlp.rstd2,
            &mut dx2,
            dw2,
        )?;
        ops::axpby(self.ctx, 1.0, dy, 1.0, &mut dx2)?;

        // Attention: x2 = x + o_proj(attn)
        let mut dattn = self.z(&[n, nh * d])?;
        self.linear_bwd(
            "self_attn.o_proj",
            &a.attn,
            &dx2,
            &mut dattn,
            false,
            &a.lora,
            grads,
        )?;
        // dq, dk, dv token-major [B·T, H·D].
        let (dq_tok, dk_tok, dv_tok) = match &a.scores {
            AttnRecord::Fused { out, lse } => {
                let mut dq = self.z(&[b, t, nh, d])?;
                let mut dk = self.z(&[b, t, nkv, d])?;
                let mut dv = self.z(&[b, t, nkv, d])?;
                ops::flash_attn_bwd_tokens(
                    self.ctx,
                    &a.q,
                    &a.k,
                    &a.v,
                    out,
                    &dattn.reshape(&[b, t, nh, d])?,
                    lse,
                    batch.segments.as_ref(),
                    scale,
                    &mut dq,
                    &mut dk,
                    &mut dv,
                )?;
                (
                    dq.reshape(&[n, nh * d])?,
                    dk.reshape(&[n, nkv * d])?,
                    dv.reshape(&[n, nkv * d])?,
                )
            }
            AttnRecord::Probs(probs) => {
                let d_o = to_heads(self.ctx, &dattn.reshape(&[n, nh, d])?, b, t, nh, d)?;
                let (dq, dk, dv) = self.materialized_attn_bwd(a, probs, &d_o, b, t, scale)?;
                (
                    from_heads(self.ctx, &dq, b, t, nh, d)?,
                    from_heads(self.ctx, &dk, b, t, nkv, d)?,
                    from_heads(self.ctx, &dv, b, t, nkv, d)?,
                )
            }
        };
        drop(dattn);
        let mut dq_r = self.z(&[n, nh, d])?;
        ops::rope_bwd(
            self.ctx,
            &dq_tok.reshape(&[n, nh, d])?,
            &batch.positions,
            self.inv_freq,
            &mut dq_r,
        )?;
        let mut dk_r = self.z(&[n, nkv, d])?;
        ops::rope_bwd(
            self.ctx,
            &dk_tok.reshape(&[n, nkv, d])?,
            &batch.positions,
            self.inv_freq,
            &mut dk_r,
        )?;
        let mut dq_lin = dq_r.reshape(&[n, nh * d])?;
        let mut dk_lin = dk_r.reshape(&[n, nkv * d])?;
        if c.qk_norm {
            let (qp, kp) = (a.inp.q_pre.as_ref().unwrap(), a.inp.k_pre.as_ref().unwrap());
            dq_lin = self.head_norm_bwd(
                "self_attn.q_norm.weight",
                &dq_lin,
                qp,
                a.inp.rstd_q.as_ref().unwrap(),
                grads,
            )?;
            dk_lin = self.head_norm_bwd(
                "self_attn.k_norm.weight",
                &dk_lin,
                kp,
                a.inp.rstd_k.as_ref().unwrap(),
                grads,
            )?;
        }
        let dv_lin = dv_tok.reshape(&[n, nkv * d])?;
        let mut dh1 = self.z(&[n, h])?;
        self.linear_bwd(
            "self_attn.q_proj",
            &a.inp.h1,
            &dq_lin,
            &mut dh1,
            false,
            &a.lora,
            grads,
        )?;
        self.linear_bwd(
            "self_attn.k_proj",
            &a.inp.h1,
            &dk_lin,
            &mut dh1,
            true,
            &a.lora,
            grads,
        )?;
        self.linear_bwd(
            "self_attn.v_proj",
            &a.inp.h1,
            &dv_lin,
            &mut dh1,
            true,
            &a.lora,
            grads,
        )?;
        let mut dx = self.z(&[n, h])?;
        let ln1 = format!("{}input_layernorm.weight", self.prefix);
        let dw1 = grads.as_deref_mut().and_then(|g| g.get_mut(&ln1));
        ops::rmsnorm_bwd(
            self.ctx,
            &dh1,
            x,
            &self.wt("input_layernorm.weight")?,
            &a.inp.rstd1,
            &mut dx,
            dw1,
        )?;
        ops::axpby(self.ctx, 1.0, &dx2, 1.0, &mut dx)?;
        Ok(dx)
    }
}

/// A column of ones `[n, 1]` (bias add and bias gradient as GEMMs).
fn ones(ctx: &Ctx, dt: DType, n: usize) -> Result<Tensor> {
    let mut o = Tensor::zeros(ctx, dt, &[n, 1])?;
    ops::fill(ctx, &mut o, 1.0)?;
    Ok(o)
}

/// `[B·T, H, D]` token-major -> `[B, H, T, D]` head-major.
pub(crate) fn to_heads(
    ctx: &Ctx,
    x: &Tensor,
    b: usize,
    t: usize,
    h: usize,
    d: usize,
) -> Result<Tensor> {
    let mut y = Tensor::empty(ctx, x.dtype(), &[b, h, t, d])?;
    ops::permute_0213(ctx, &x.reshape(&[b, t, h, d])?, &mut y)?;
    Ok(y)
}

/// `[B, H, T, D]` (any reshape of it) -> `[B·T, H·D]` token-major.
pub(crate) fn from_heads(
    ctx: &Ctx,
    x: &Tensor,
    b: usize,
    t: usize,
    h: usize,
    d: usize,
) -> Result<Tensor> {
    let mut y = Tensor::empty(ctx, x.dtype(), &[b, t, h, d])?;
    ops::permute_0213(ctx, &x.reshape(&[b, h, t, d])?, &mut y)?;
    Ok(y.reshape(&[b * t, h * d])?)
}
