//! Memory of a training job before it runs: per-rank GPU and host bytes,
//! with a breakdown, from the model's config and the job's settings alone.
//!
//! The device allocator hands out blocks of exact size classes
//! ([`llmft_tensor::cuda::size_class`]) and never splits them, so its peak
//! is the largest sum of live tensors over a step. The estimate follows the
//! tensors the training step allocates — each layer's record kept for
//! backward, the recompute's activations, the backward's gradients of
//! activations, the fused LM head's chunk, the weight store's staging and
//! gather buffers, the trainable state — through the moments where the live
//! set is largest (a layer's forward, the head, the first layer backward,
//! inside it at the SwiGLU, attention and projection gradients, and the
//! optimizer step), and reports the largest. It mirrors
//! `llmft_models::Model::forward_backward` and `Layer::backward`; the test
//! `estimate_vs_benches` (crates/cli/tests) holds it to the peaks measured
//! under `benches/results/`, so a change to either that moves memory fails
//! CI until both agree again.
use llmft_models::{is_quantizable, ModelConfig, QuantConfig};
use llmft_tensor::cuda::size_class;
use llmft_tensor::DType;
use serde::Serialize;

use crate::{OffloadSettings, TrainType};

const GIB: f64 = (1u64 << 30) as f64;

/// The fused LM head's logits chunk (`CrossEntropyOpts::max_chunk_bytes`).
const CE_CHUNK_BYTES: usize = 256 << 20;

/// Host memory of an llmft process before any weight is loaded: the binary,
/// the tokenizer, the CUDA driver's host side (measured: 0.45 GiB).
const HOST_BASE_BYTES: usize = 460 << 20;
/// What NCCL's communicators add to each process's host memory (measured:
/// 0.5 GiB with one communicator).
const HOST_NCCL_BYTES: usize = 500 << 20;
/// Device memory outside the allocator: the CUDA context, cuBLAS(Lt)
/// handles and kernel images (measured on an H200: about 0.55 GiB).
pub const CUDA_CONTEXT_BYTES: usize = 600 << 20;

/// How a multi-rank job splits its weights (mirrors `[dist] strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Sharding {
    /// Every rank holds every weight (plain data parallelism).
    NoShard,
    /// Weights sharded over the ranks, gathered per unit and freed after
    /// the forward (FSDP FULL_SHARD).
    FullShard,
    /// Sharded, but a unit gathered in the forward stays until its backward.
    ShardGradOp,
    /// Sharded within a node of `gpus_per_node` ranks, replicated across nodes.
    HybridShard {
        /// Ranks of one node.
        gpus_per_node: usize,
    },
}

/// Everything about a job that decides its memory.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// The model's shape, with the layer count the job trains.
    pub config: ModelConfig,
    /// The recipe.
    pub train_type: TrainType,
    /// The compute dtype.
    pub dtype: DType,
    /// LoRA rank (adapter recipes).
    pub lora_r: usize,
    /// Adapted linears of each layer, as suffixes (`self_attn.q_proj`, ...);
    /// empty = all seven.
    pub lora_targets: Vec<String>,
    /// Trained layers of `freeze`.
    pub freeze_layers: usize,
    /// Tokens per row.
    pub seq: usize,
    /// Rows per micro-batch.
    pub micro_batch: usize,
    /// Gradient checkpointing.
    pub checkpointing: bool,
    /// Under checkpointing, keep each layer's attention output.
    pub keep_attention: bool,
    /// Under checkpointing, the last this-many layers keep their activations.
    pub skip_layers: usize,
    /// Under checkpointing, a layer's dequantized weights are shared by its
    /// recompute and backward.
    pub cache_dequantized: bool,
    /// The `[offload]` settings.
    pub offload: OffloadSettings,
    /// Ranks of the job.
    pub world_size: usize,
    /// How the weights are split over the ranks.
    pub sharding: Sharding,
    /// The weights live in the sharded store (a multi-rank job whose
    /// strategy shards, or one naming a backend at world 1, or a simulated
    /// one); else in the plain or offloaded store.
    pub sharded: bool,
    /// One process plays rank 0 and keeps the other ranks' shards in its own
    /// host memory (`llmft bench --simulate-world`).
    pub simulated: bool,
}

/// Bytes of one side (GPU or host) at its peak, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Breakdown {
    /// Base weights resident or staged/gathered (GPU), their pinned home
    /// copies (host).
    pub weights: usize,
    /// Trainable parameters, their gradients and optimizer state.
    pub trainable: usize,
    /// Records kept for backward (layer inputs, attention outputs, LoRA
    /// products; host: the offloaded ones).
    pub activations: usize,
    /// Short-lived buffers at the peak: the layer backward's activations and
    /// gradients, dequantized weights, the LM head's chunk; the process
    /// itself (host).
    pub workspace: usize,
}

impl Breakdown {
    /// The sum.
    pub fn total(&self) -> usize {
        self.weights + self.trainable + self.activations + self.workspace
    }
}

/// The estimate of one rank.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Estimate {
    /// Device allocator bytes at the peak (what `llmft bench` reports as
    /// `peak_gib`), by kind.
    pub gpu: Breakdown,
    /// Where in the step the GPU peak falls.
    pub gpu_peak_at: String,
    /// Host bytes (resident set) at its peak, by kind.
    pub host: Breakdown,
    /// Trainable parameters.
    pub trainable_params: usize,
}

impl Estimate {
    /// GPU allocator peak in GiB.
    pub fn gpu_peak_gib(&self) -> f64 {
        self.gpu.total() as f64 / GIB
    }
    /// Host peak in GiB.
    pub fn host_peak_gib(&self) -> f64 {
        self.host.total() as f64 / GIB
    }
    /// What the device must have free: the allocator's peak plus the CUDA
    /// context and libraries outside it.
    pub fn gpu_needed_gib(&self) -> f64 {
        (self.gpu.total() + CUDA_CONTEXT_BYTES) as f64 / GIB
    }
}

/// Tensors (bytes, already in size classes) live at one moment.
#[derive(Default, Clone)]
struct Live(usize);

impl Live {
    fn add(&mut self, bytes: usize) -> &mut Self {
        if bytes > 0 {
            self.0 += size_class(bytes);
        }
        self
    }
    fn n(&mut self, count: usize, bytes: usize) -> &mut Self {
        for _ in 0..count {
            self.add(bytes);
        }
        self
    }
}

/// The seven decoder linears (module suffixes within a layer).
pub const LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// The seven decoder linears of `c`, `(suffix, out, in)`.
fn linears(c: &ModelConfig) -> [(&'static str, usize, usize); 7] {
    let (h, q, kv, f) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
    let shapes = [(q, h), (kv, h), (kv, h), (h, q), (f, h), (f, h), (h, f)];
    std::array::from_fn(|i| (LINEARS[i], shapes[i].0, shapes[i].1))
}

impl JobSpec {
    /// Whether the layers' attention runs through the fused kernel, as
    /// `Layer::fused_attention` decides on a GPU: bf16/f16 with head dim 64
    /// or 128 (every kernel path from sm_70 on has shared memory for one of
    /// its backward tilings; sm_61 materializes head dim 128, which this
    /// does not model). Otherwise the `[B, H, T, T]` probabilities are
    /// materialized.
    pub fn fused_attention(&self) -> bool {
        matches!(self.dtype, DType::BF16 | DType::F16) && matches!(self.config.head_dim, 64 | 128)
    }

    fn quant(&self) -> Option<QuantConfig> {
        match self.train_type {
            TrainType::Qlora | TrainType::BnbDora => Some(QuantConfig::nf4()),
            TrainType::HqqLora | TrainType::HqqDora => Some(QuantConfig::hqq(4)),
            TrainType::Int8Lora => Some(QuantConfig::int8()),
            TrainType::Lora | TrainType::Full | TrainType::Freeze => None,
        }
    }

    fn adapted(&self) -> Vec<(&'static str, usize, usize)> {
        if !self.train_type.uses_adapter() {
            return Vec::new();
        }
        linears(&self.config)
            .into_iter()
            .filter(|(name, _, _)| {
                self.lora_targets.is_empty()
                    || self
                        .lora_targets
                        .iter()
                        .any(|t| name.ends_with(t.as_str()) || t == "all-linear")
            })
            .collect()
    }

    /// Bytes of unit `u`'s blob (its stored weights).
    fn unit_bytes(&self, u: usize) -> usize {
        let q = self.quant();
        self.config
            .unit_tensors(u)
            .into_iter()
            .map(|(name, shape)| {
                let b = match q.as_ref().filter(|_| is_quantizable(&name)) {
                    Some(q) => q.stored_bytes(&shape),
                    None => shape.iter().product::<usize>() * self.dtype.size(),
                };
                b.next_multiple_of(llmft_tensor::store::ALIGN)
            })
            .sum()
    }

    /// Ranks one unit is sharded over (1: not sharded).
    fn shard_ways(&self) -> usize {
        match self.sharding {
            _ if !self.sharded => 1,
            Sharding::NoShard => 1,
            Sharding::FullShard | Sharding::ShardGradOp => self.world_size.max(1),
            Sharding::HybridShard { gpus_per_node } => gpus_per_node.clamp(1, self.world_size),
        }
    }

    /// Trainable parameter count and, per parameter tensor, its element
    /// count (the optimizer's largest transient is one tensor).
    fn trainable(&self) -> (usize, usize) {
        let c = &self.config;
        if self.train_type.uses_adapter() {
            let r = self.lora_r;
            let dora = self.train_type.dora();
            let per_layer: Vec<usize> = self
                .adapted()
                .iter()
                .flat_map(|&(_, o, i)| {
                    let mut v = vec![r * i, o * r];
                    if dora {
                        v.push(o);
                    }
                    v
                })
                .collect();
            let total = per_layer.iter().sum::<usize>() * c.num_layers;
            (total, per_layer.into_iter().max().unwrap_or(0))
        } else {
            let units: Vec<usize> = match self.train_type {
                TrainType::Freeze => {
                    let l = c.num_layers;
                    let k = self.freeze_layers.min(l);
                    (l - k + 1..=l).collect()
                }
                _ => (0..c.num_units()).collect(),
            };
            let sizes: Vec<usize> = units
                .iter()
                .flat_map(|&u| c.unit_tensors(u))
                .map(|(_, sh)| sh.iter().product::<usize>())
                .collect();
            (sizes.iter().sum(), sizes.into_iter().max().unwrap_or(0))
        }
    }
}

/// Estimates `job`'s per-rank memory.
pub fn estimate(job: &JobSpec) -> Estimate {
    let c = &job.config;
    let l = c.num_layers;
    let dt = job.dtype.size();
    let n = job.seq * job.micro_batch;
    let (h, q, kv, f, nh) = (
        c.hidden_size,
        c.q_dim(),
        c.kv_dim(),
        c.intermediate_size,
        c.num_heads,
    );
    let quantized = job.quant().is_some();
    let adapted = job.adapted();
    let r = job.lora_r;
    let dora = job.train_type.dora();

    // ---- Weights: resident units, and the store's staging/gather buffers.
    let ways = job.shard_ways();
    let sharded = job.sharded;
    // Each unit's blob, once: embedding, layers, head.
    let units: Vec<usize> = (0..c.num_units()).map(|u| job.unit_bytes(u)).collect();
    let layer_blob = units[1..=l].iter().copied().max().unwrap_or(0);
    let outer = [units[0], units[l + 1]];
    let total_blob: usize = units.iter().sum();
    let shard = |b: usize| {
        b.div_ceil(ways)
            .next_multiple_of(llmft_tensor::store::ALIGN)
    };
    // One rank's shards of every unit.
    let shards: usize = units.iter().map(|&b| shard(b)).sum();
    let (resident, buffers) = if sharded {
        let resident = if job.offload.params { 0 } else { shards };
        let gathered = |b: usize| shard(b) * ways;
        let buffers = if job.sharding == Sharding::ShardGradOp {
            // Gathered in the forward, kept to the backward: every unit.
            units.iter().map(|&b| gathered(b)).sum()
        } else {
            outer.iter().map(|&b| gathered(b)).max().unwrap_or(0)
                + (job.offload.lookahead + 1) * gathered(layer_blob)
        };
        (resident, buffers)
    } else if job.offload.params {
        let keep = if job.offload.keep_embedding {
            outer[0]
        } else {
            0
        };
        let staged_outer = if job.offload.keep_embedding {
            outer[1]
        } else {
            outer[0].max(outer[1])
        };
        (
            keep,
            staged_outer + (job.offload.lookahead + 1) * layer_blob,
        )
    } else {
        (total_blob, 0)
    };

    // ---- Trainable state.
    let (trainable, largest_param) = job.trainable();
    let zero1 = job.world_size > 1 && job.sharding != Sharding::NoShard;
    let owners = if zero1 { job.world_size } else { 1 };
    let mut t_live = Live::default();
    if job.train_type.uses_adapter() {
        // Per adapter tensor (f32 A, B and DoRA magnitudes): the value, its
        // gradient, AdamW's m and v unless they live on the host or with
        // another rank, and the copy in the compute dtype the forward casts
        // once per step.
        let on_device_moments = if job.offload.optimizer { 0 } else { 2 };
        for &(_, o, i) in &adapted {
            let mut shapes = vec![r * i, o * r];
            if dora {
                shapes.push(o);
            }
            for e in shapes {
                let copies = 2 + on_device_moments;
                for _ in 0..l {
                    t_live.n(copies, e * 4);
                    if job.dtype != DType::F32 {
                        t_live.add(e * dt);
                    }
                }
            }
        }
        if zero1 && !job.offload.optimizer {
            // m and v of the parameters this rank does not own.
            t_live.0 -= (trainable * 8) * (owners - 1) / owners;
        }
    } else {
        // f32 gradients of the trained weights; m, v and, for weights stored
        // in the compute dtype, an f32 master.
        t_live.0 += trainable * 4;
        if !job.offload.optimizer {
            let master = if job.dtype == DType::F32 { 0 } else { 4 };
            t_live.0 += trainable * (8 + master) / owners;
        }
    }
    let trainable_bytes = t_live.0;

    // ---- One layer's tensors, per micro-batch.
    let row = |w: usize| n * w * dt;
    let f32_row = |w: usize| n * w * 4;
    let lora_xa = |live: &mut Live| {
        for _ in &adapted {
            live.add(row(r));
        }
    };
    // The materialized attention's `[B, H, T, T]` probabilities (scores,
    // their gradients) in the compute dtype, where the fused kernel does not run.
    let fused = job.fused_attention();
    let square = size_class(job.micro_batch * nh * job.seq * job.seq * dt);
    // What a recomputed layer keeps (the materialized probabilities are not
    // kept: the recompute makes them again).
    let record = {
        let mut k = Live::default();
        k.add(row(h));
        if job.checkpointing && job.keep_attention && fused {
            k.add(row(q)).add(f32_row(nh));
            lora_xa(&mut k);
        }
        k.0
    };
    // A layer's full activations (LayerActs), `act` included.
    let acts = {
        let mut a = Live::default();
        a.add(row(h)) // its input
            .add(row(h))
            .add(f32_row(1)) // h1, rstd1
            .add(row(q))
            .add(row(kv))
            .add(row(kv)) // q, k, v
            .add(row(q)); // attention output
        if fused {
            a.add(f32_row(nh)); // lse
        } else {
            a.add(square); // probabilities
        }
        a.add(row(h))
            .add(row(h))
            .add(f32_row(1)) // x2, h2, rstd2
            .n(3, row(f)); // gate, up, act
        if c.qk_norm {
            a.add(row(q))
                .add(row(kv))
                .add(f32_row(nh))
                .add(f32_row(c.num_kv_heads));
        }
        lora_xa(&mut a);
        if dora {
            for &(_, o, _) in &adapted {
                a.add(row(o));
            }
        }
        a.0
    };
    // What a layer checkpointing skips keeps (all but the SwiGLU output;
    // without checkpointing, everything).
    let full_record = if job.checkpointing {
        acts - size_class(row(f))
    } else {
        acts
    };
    let dense = |o: usize, i: usize| if quantized { size_class(o * i * dt) } else { 0 };
    let dense_layer: usize = linears(c).iter().map(|&(_, o, i)| dense(o, i)).sum();
    let dense_max = linears(c)
        .iter()
        .map(|&(_, o, i)| dense(o, i))
        .max()
        .unwrap_or(0);

    // The backward of a layer whose activations are `acts` and whose
    // weights, when `cached`, stay dequantized: the largest of its moments.
    let layer_backward = |cached: bool| -> usize {
        let mut base = Live(acts);
        base.add(row(h)); // dy
        let w = if cached { dense_layer } else { 0 };
        let transient_w = if cached { 0 } else { dense_max };
        let mut swiglu = base.clone();
        swiglu.n(3, row(f)); // dact, dgate, dup
        let mut down = base.clone();
        down.add(row(f)); // dact
        down.0 += transient_w;
        let mut gate_up = base.clone();
        gate_up.n(2, row(f)).add(row(h)); // dgate, dup, dh2
        if dora {
            // DoRA's backward of gate/up_proj: three [N, out] temporaries.
            gate_up.n(3, row(f));
        }
        gate_up.0 += transient_w;
        let mut attn = base.clone();
        attn.n(2, row(h)) // dh2, dx2
            .add(row(q)) // dattn
            .add(row(q))
            .n(2, row(kv)); // dq, dk, dv
        if fused {
            attn.add(f32_row(q)).add(f32_row(nh)); // the kernel's f32 dq accumulator, dsum
        } else {
            // dP and dS beside the probabilities (dv and dq come after dP).
            attn.0 -= size_class(row(q)) + size_class(row(kv));
            attn.n(2, square);
        }
        let mut proj = base.clone();
        proj.n(2, row(h))
            .n(2, row(q))
            .n(3, row(kv)) // dq, dk, dv and their RoPE gradients
            .n(2, row(h)); // dh1, dx
        proj.0 += transient_w;
        w + [swiglu.0, down.0, gate_up.0, attn.0, proj.0]
            .into_iter()
            .max()
            .unwrap_or(0)
    };

    // ---- The moments of a step.
    let recomputed = if job.checkpointing {
        l.saturating_sub(job.skip_layers)
    } else {
        0
    };
    let skipped = l - recomputed;
    // Records of recomputed layers that stay on the device through the
    // forward: all without activation offload, else the last layer's (when
    // it is a recomputed one).
    let offloaded_records = if job.offload.activations && job.checkpointing {
        if recomputed == l {
            recomputed.saturating_sub(1)
        } else {
            recomputed
        }
    } else {
        0
    };
    let device_records = recomputed - offloaded_records;

    // (where, records kept, short-lived buffers) of each moment.
    let mut moments: Vec<(String, usize, usize)> = Vec::new();
    let mut moment = |at: String, kept: usize, work: usize| moments.push((at, kept, work));

    // The last layer's forward: every earlier record, this layer's
    // activations and output, one transient dequantized weight.
    {
        let before = if skipped > 0 {
            device_records * record + (skipped - 1) * full_record
        } else {
            device_records.saturating_sub(1) * record
        };
        // The materialized attention: the scores beside their softmax.
        let scores = if fused { 0 } else { square };
        moment(
            format!("forward of layer {}", l - 1),
            before,
            acts + size_class(row(h)) + dense_max.max(scores),
        );
    }
    // The head: every record, the final norm's output and gradient, the
    // logits chunk (f32 and a copy in the compute dtype).
    {
        let chunk = (CE_CHUNK_BYTES / (4 * c.vocab_size.max(1)))
            .max(1)
            .min(n.max(1));
        let mut w = Live::default();
        w.n(3, row(h)).add(f32_row(1)).add(chunk * c.vocab_size * 4);
        if job.dtype != DType::F32 {
            w.add(chunk * c.vocab_size * dt);
        }
        w.add(n * 4);
        moment(
            "LM head and loss".into(),
            device_records * record + skipped * full_record,
            w.0,
        );
    }
    // The first backward: a skipped layer's (its record is in the
    // activations), or the last recomputed layer's after the skipped ones.
    if skipped > 0 {
        let kept = device_records * record + (skipped - 1) * full_record;
        moment(
            format!("backward of layer {}", l - 1),
            kept,
            layer_backward(false) - (acts - size_class(row(f))) + full_record,
        );
    }
    if recomputed > 0 {
        // The layer's own record becomes part of its activations; one more
        // comes back from the host ahead of use.
        let kept = if offloaded_records > 0 {
            record
        } else {
            (recomputed - 1) * record
        };
        moment(
            format!("backward of layer {} (recomputed)", recomputed - 1),
            kept,
            layer_backward(job.cache_dequantized && quantized),
        );
    }
    // The optimizer step: the gradient bucket of a multi-rank job, a host
    // update's device copy of its largest tensor, ZeRO-1's packed broadcast.
    {
        let mut w = Live::default();
        if job.world_size > 1 {
            w.add(crate::BUCKET_ELEMS.min(trainable) * 4);
        }
        if job.offload.optimizer {
            w.add(largest_param * 4);
        }
        if zero1 {
            w.add(trainable.div_ceil(owners) * 4);
        }
        moment("optimizer step".into(), 0, w.0);
    }
    let (at, kept, work) = moments
        .into_iter()
        .max_by_key(|(_, k, w)| k + w)
        .expect("every step has moments");

    // ---- Host.
    let simulated_peers = if job.simulated { ways } else { 1 };
    let host_params = if job.offload.params {
        if sharded {
            shards * simulated_peers
        } else {
            total_blob - resident
        }
    } else if sharded && job.simulated {
        // The simulated peers' shards.
        shards * (simulated_peers - 1)
    } else {
        0
    };
    let host_acts = offloaded_records * record;
    let host_opt = if job.offload.optimizer {
        // m, v, the f32 master and the gradient copy; weights stored in the
        // compute dtype also get a pinned copy in it to send back.
        let back = if job.train_type.uses_adapter() || job.dtype == DType::F32 {
            0
        } else {
            dt
        };
        (16 + back) * trainable / owners
    } else {
        0
    };
    // Real multi-rank jobs and sharded stores talk through NCCL.
    let nccl = !job.simulated && (job.world_size > 1 || sharded);
    let host = Breakdown {
        weights: host_params,
        trainable: host_opt,
        activations: host_acts,
        workspace: HOST_BASE_BYTES + if nccl { HOST_NCCL_BYTES } else { 0 },
    };
    Estimate {
        gpu: Breakdown {
            weights: resident + buffers,
            trainable: trainable_bytes,
            activations: kept,
            workspace: work,
        },
        gpu_peak_at: at,
        host,
        trainable_params: trainable,
    }
}
