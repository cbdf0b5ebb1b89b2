//! Offloaded runs equal resident runs bit for bit: frozen weights in pinned
//! host memory (offload.params, with every lookahead), checkpointed layer
//! records in host memory (offload.activations), AdamW state and f32 masters
//! in host memory (offload.optimizer), and all of them, for QLoRA, HQQ
//! LoRA and full training of the tiny Llama fixture over 20 steps; a run
//! resumed from an offloaded run's checkpoint continues it exactly.
use llmft_lora::LoraConfig;
use llmft_models::{Model, QuantConfig, Resident, StoreBuilder, Unit};
use llmft_offload::{Offloaded, OffloadedConfig};
use llmft_tensor::{Ctx, DType};
use llmft_trainer::{ScheduleKind, TrainConfig, TrainType, Trainer};

mod common;
use common::{fixture, scratch, step_batches};

const STEPS: u64 = 20;

/// Where the frozen weights and the kept activations live.
#[derive(Debug, Clone, Copy)]
struct Placement {
    /// Lookahead of the offloaded store (the embedding kept on the device
    /// at lookahead 2).
    params: Option<usize>,
    activations: bool,
    optimizer: bool,
}

const PLACEMENTS: [Placement; 8] = [
    Placement {
        params: None,
        activations: false,
        optimizer: true,
    },
    Placement {
        params: Some(1),
        activations: true,
        optimizer: true,
    },
    Placement {
        params: Some(0),
        activations: false,
        optimizer: false,
    },
    Placement {
        params: Some(1),
        activations: false,
        optimizer: false,
    },
    Placement {
        params: Some(2),
        activations: false,
        optimizer: false,
    },
    Placement {
        params: Some(3),
        activations: false,
        optimizer: false,
    },
    Placement {
        params: None,
        activations: true,
        optimizer: false,
    },
    Placement {
        params: Some(1),
        activations: true,
        optimizer: false,
    },
];

fn builder(ctx: &Ctx, n: usize, p: Placement) -> Box<dyn StoreBuilder> {
    match p.params {
        None => Resident::builder(ctx, n),
        Some(lookahead) => Offloaded::builder(
            ctx,
            n,
            OffloadedConfig {
                lookahead,
                keep_embedding: lookahead == 2,
                ..Default::default()
            },
        )
        .unwrap(),
    }
}

fn model(ctx: &Ctx, tt: TrainType, p: Placement) -> Model {
    model_in(ctx, tt, p, DType::F32)
}

fn model_in(ctx: &Ctx, tt: TrainType, p: Placement, dtype: DType) -> Model {
    let quant = match tt {
        TrainType::Qlora => Some(QuantConfig::nf4()),
        TrainType::HqqLora => Some(QuantConfig::hqq(4)),
        _ => None,
    };
    let mut m = Model::from_dir_into(&fixture(), ctx, dtype, quant.as_ref(), &mut |n| {
        Ok(builder(ctx, n, p))
    })
    .unwrap();
    m.checkpointing = true;
    m.offload_activations = p.activations;
    if tt.uses_adapter() {
        let cfg = LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            lora_dropout: 0.1,
            target_modules: Some(llmft_lora::NamesOrPattern::Pattern("all-linear".into())),
            ..LoraConfig::default()
        };
        let adapter = m.new_adapter(cfg, 42).unwrap();
        m.attach_adapter(adapter);
    }
    m
}

fn config(tt: TrainType, p: Placement) -> TrainConfig {
    TrainConfig {
        optimizer_on_host: p.optimizer.then_some(2),
        train_type: tt,
        lr: 5e-3,
        weight_decay: 0.01,
        schedule: ScheduleKind::Cosine,
        warmup_steps: 3,
        max_steps: STEPS,
        max_grad_norm: 0.5,
        ..TrainConfig::default()
    }
}

/// Every trained value as bits: the adapter's parameters, or every frozen
/// tensor of every unit for full training.
fn trained_bits(m: &Model) -> Vec<(String, Vec<u32>)> {
    let bits = |t: &llmft_tensor::Tensor| -> Vec<u32> {
        t.to_f32_vec()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    };
    let mut out = Vec::new();
    if let Some(a) = m.adapter() {
        for (name, l) in &a.layers {
            for (i, p) in l.params().into_iter().enumerate() {
                out.push((format!("{name}.{i}"), bits(p)));
            }
        }
        return out;
    }
    for u in Unit::all(m.config.num_layers) {
        let w = m.unit(u).unwrap();
        for e in &w.layout().entries {
            out.push((e.name.clone(), bits(&w.get(&e.name).unwrap())));
        }
    }
    out
}

/// Runs `steps` steps; returns the losses' bits.
fn run(ctx: &Ctx, m: &mut Model, t: &mut Trainer, steps: u64) -> Vec<u64> {
    let mut losses = Vec::new();
    for _ in 0..steps {
        let mut micro = step_batches(ctx, t.steps_done());
        losses.push(t.step(m, &mut micro).unwrap().loss.to_bits());
    }
    losses
}

fn check_train_type(tt: TrainType) {
    check_train_type_in(tt, DType::F32);
}

fn check_train_type_in(tt: TrainType, dtype: DType) {
    let ctx = Ctx::cpu();
    let resident = Placement {
        params: None,
        activations: false,
        optimizer: false,
    };
    let p = resident;
    let mut m = model_in(&ctx, tt, resident, dtype);
    let mut t = Trainer::new(config(tt, p), &m).unwrap();
    let want_losses = run(&ctx, &mut m, &mut t, STEPS);
    let want = trained_bits(&m);
    for p in PLACEMENTS {
        let mut m = model_in(&ctx, tt, p, dtype);
        let mut t = Trainer::new(config(tt, p), &m).unwrap();
        let losses = run(&ctx, &mut m, &mut t, STEPS);
        // The placement really moved things: home copies off the compute
        // device's store, activation buffers pinned.
        let bytes = m.store().bytes();
        assert_eq!(p.params.is_some(), bytes.buffers > 0, "{p:?}: {bytes:?}");
        assert_eq!(p.activations, m.pinned_activation_bytes() > 0, "{p:?}");
        assert_eq!(p.optimizer, t.optimizer().is_offloaded(), "{p:?}");
        assert_eq!(losses, want_losses, "{tt:?} {p:?}: per-step losses differ");
        let got = trained_bits(&m);
        assert_eq!(got.len(), want.len());
        for ((n, a), (_, b)) in got.iter().zip(&want) {
            assert!(a == b, "{tt:?} {p:?}: {n} differs from the resident run");
        }
    }
}

#[test]
fn qlora_offloaded_equals_resident() {
    check_train_type(TrainType::Qlora);
}

#[test]
fn hqq_lora_offloaded_equals_resident() {
    check_train_type(TrainType::HqqLora);
}

#[test]
fn full_offloaded_equals_resident() {
    check_train_type(TrainType::Full);
}

/// bf16 weights: the host step writes their bf16 copies in the same pass.
#[test]
fn full_bf16_offloaded_equals_resident() {
    check_train_type_in(TrainType::Full, DType::BF16);
}

#[test]
fn resume_of_an_offloaded_run_is_bit_exact() {
    let ctx = Ctx::cpu();
    let p = Placement {
        params: Some(1),
        activations: true,
        optimizer: true,
    };
    for tt in [TrainType::Qlora, TrainType::Full] {
        let dir = scratch(&format!("offload-resume-{tt:?}"));
        let mut m = model(&ctx, tt, p);
        let mut t = Trainer::new(config(tt, p), &m).unwrap();
        let mut straight = run(&ctx, &mut m, &mut t, 10);
        let ckpt = t.save_checkpoint(&m, &dir).unwrap();
        straight.extend(run(&ctx, &mut m, &mut t, STEPS - 10));
        let want = trained_bits(&m);

        let mut m2 = model(&ctx, tt, p);
        let mut t2 = Trainer::resume(config(tt, p), &mut m2, &ckpt).unwrap();
        let rest = run(&ctx, &mut m2, &mut t2, STEPS - 10);
        assert_eq!(rest, straight[10..], "{tt:?}: resumed losses differ");
        assert!(trained_bits(&m2) == want, "{tt:?}: resumed weights differ");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
