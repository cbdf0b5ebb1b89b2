//! Full and freeze training of the tiny Llama fixture on CPU: which weights
//! move, no decay on norms, clipping and the NaN policy over dense
//! gradients, bit-exact resume, corrupt weight files, the errors for
//! unsupported bases, and f16 dynamic loss scaling.
use llmft_lora::LoraConfig;
use llmft_models::{Model, QuantConfig};
use llmft_tensor::{Ctx, DType, Tensor};
use llmft_trainer::{
    latest_checkpoint, LossScale, NanPolicy, ScheduleKind, StepStats, TrainConfig, TrainType,
    Trainer,
};

mod common;
use common::{batch, fixture, scratch, step_batches};

fn model(ctx: &Ctx, dtype: DType) -> Model {
    Model::from_dir(&fixture(), ctx, dtype).unwrap()
}

/// Every tensor of every unit, as bits, by name.
fn weights(model: &Model) -> Vec<(String, Vec<u32>)> {
    let mut out = Vec::new();
    for u in 0..model.config.num_units() {
        let w = model
            .unit(llmft_models::Unit::from_index(u, model.config.num_units()))
            .unwrap();
        for (name, _) in model.config.unit_tensors(u) {
            let bits = w
                .get(&name)
                .unwrap()
                .to_f32_vec()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect();
            out.push((name, bits));
        }
    }
    out
}

fn config(train_type: TrainType, max_steps: u64) -> TrainConfig {
    TrainConfig {
        train_type,
        freeze_trainable_layers: 1,
        lr: 1e-3,
        weight_decay: 0.01,
        schedule: ScheduleKind::Cosine,
        warmup_steps: 3,
        max_steps,
        max_grad_norm: 0.5,
        keep_last: 2,
        ..TrainConfig::default()
    }
}

#[test]
fn full_trains_every_weight_and_freeze_only_the_last_layers() {
    let ctx = Ctx::cpu();
    for tt in [TrainType::Full, TrainType::Freeze] {
        let mut m = model(&ctx, DType::F32);
        let before = weights(&m);
        let mut trainer = Trainer::new(config(tt, 10), &m).unwrap();
        let mut losses = Vec::new();
        for _ in 0..6 {
            let mut micro = step_batches(&ctx, 0);
            let s = trainer.step(&mut m, &mut micro).unwrap();
            assert!(!s.skipped && s.grad_norm.is_finite() && s.loss_scale.is_none());
            losses.push(s.loss);
        }
        assert!(
            losses[5] < losses[0],
            "{tt:?}: the loss did not fall: {losses:?}"
        );
        let names: Vec<&str> = trainer.optimizer().weight_names().collect();
        for ((name, a), (_, b)) in before.iter().zip(&weights(&m)) {
            let trained = match tt {
                TrainType::Full => true,
                _ => name.starts_with("model.layers.1."),
            };
            assert_eq!(names.contains(&name.as_str()), trained, "{tt:?} {name}");
            assert_eq!(a != b, trained, "{tt:?}: {name} changed = {}", a != b);
        }
        let expect = match tt {
            TrainType::Full => 2 + 2 * 9 + 1,
            _ => 9,
        };
        assert_eq!(names.len(), expect, "{names:?}");
    }
}

#[test]
fn norm_weights_are_not_decayed() {
    let ctx = Ctx::cpu();
    let mut m = model(&ctx, DType::F32);
    let cfg = TrainConfig {
        train_type: TrainType::Full,
        lr: 0.1,
        weight_decay: 0.5,
        schedule: ScheduleKind::Constant,
        max_steps: 2,
        ..TrainConfig::default()
    };
    let before = weights(&m);
    let mut trainer = Trainer::new(cfg, &m).unwrap();
    let acc = trainer.accumulate(&m, &mut [batch(&ctx, &[0])]).unwrap();
    // With zero gradients AdamW's step is exactly 0: only the decay moves a weight.
    let names: Vec<String> = trainer.grads().names().cloned().collect();
    for n in &names {
        let g = trainer.grads_mut().get_mut(n).unwrap();
        *g = Tensor::zeros(&ctx, DType::F32, g.shape()).unwrap();
    }
    let s = trainer.apply(&mut m, acc).unwrap();
    assert!(!s.skipped && s.grad_norm == 0.0);
    let decay = 1.0f32 - 0.1f32 * 0.5f32;
    let mut decayed = 0;
    for ((name, a), (_, b)) in before.iter().zip(&weights(&m)) {
        if name.ends_with("norm.weight") {
            assert_eq!(a, b, "{name} was decayed");
        } else {
            let want: Vec<u32> = a
                .iter()
                .map(|&x| (f32::from_bits(x) * decay).to_bits())
                .collect();
            assert_eq!(&want, b, "{name} not decayed by lr·wd");
            decayed += 1;
        }
    }
    assert_eq!(decayed, 2 + 2 * 7);
}

#[test]
fn dense_gradients_are_clipped_and_checked_for_nan() {
    let ctx = Ctx::cpu();
    // The reported norm is the global norm over every dense gradient.
    let mut m = model(&ctx, DType::F32);
    let mut trainer = Trainer::new(config(TrainType::Full, 5), &m).unwrap();
    let acc = trainer.accumulate(&m, &mut step_batches(&ctx, 0)).unwrap();
    let mut sq = 0.0f64;
    for n in trainer.grads().names() {
        for x in trainer.grads().get(n).unwrap().to_f32_vec().unwrap() {
            sq += (x as f64) * (x as f64);
        }
    }
    let s = trainer.apply(&mut m, acc).unwrap();
    let want = sq.sqrt();
    assert!(want > 0.5, "norm {want}: pick data whose norm is clipped");
    assert!(
        (s.grad_norm as f64 - want).abs() < 1e-4 * want,
        "{} vs {want}",
        s.grad_norm
    );
    // The gradients are zeroed after the step.
    for n in trainer.grads().names() {
        let g = trainer.grads().get(n).unwrap().to_f32_vec().unwrap();
        assert!(g.iter().all(|&x| x == 0.0), "{n} not zeroed");
    }

    for policy in [NanPolicy::Skip, NanPolicy::Stop] {
        let mut m = model(&ctx, DType::F32);
        let cfg = TrainConfig {
            nan_policy: policy,
            ..config(TrainType::Freeze, 5)
        };
        let mut trainer = Trainer::new(cfg, &m).unwrap();
        let before = weights(&m);
        let acc = trainer.accumulate(&m, &mut [batch(&ctx, &[0])]).unwrap();
        let g = trainer
            .grads_mut()
            .get_mut("model.layers.1.mlp.up_proj.weight")
            .unwrap();
        let mut v = g.to_f32_vec().unwrap();
        v[3] = f32::INFINITY;
        *g = Tensor::from_slice(&ctx, &v, g.shape()).unwrap();
        let res = trainer.apply(&mut m, acc);
        assert_eq!(before, weights(&m), "weights moved on a non-finite step");
        match policy {
            NanPolicy::Skip => {
                let s = res.unwrap();
                assert!(s.skipped && !s.overflow && !s.grad_norm.is_finite());
                assert_eq!(trainer.optimizer().steps_applied(), 0);
                let s = trainer.step(&mut m, &mut [batch(&ctx, &[0])]).unwrap();
                assert!(!s.skipped && s.grad_norm.is_finite());
            }
            NanPolicy::Stop => {
                let e = res.unwrap_err().to_string();
                assert!(e.contains("step 1") && e.contains("nan_policy"), "{e}");
            }
        }
    }
}

/// 20 steps straight == 10 steps + checkpoint + fresh model + resume + 10.
fn resume_bit_exact(tt: TrainType, dtype: DType) {
    let ctx = Ctx::cpu();
    let out = scratch(&format!("resume-{tt:?}-{dtype}"));
    let cfg = || TrainConfig {
        // f16: a small window so the scale grows and backs off along the way.
        loss_scale_window: 3,
        ..config(tt, 20)
    };
    let run = |m: &mut Model, t: &mut Trainer, until: u64, stats: &mut Vec<StepStats>| {
        while t.steps_done() < until {
            let mut micro = step_batches(&ctx, t.steps_done());
            stats.push(t.step(m, &mut micro).unwrap());
        }
    };
    let mut m = model(&ctx, dtype);
    let mut t = Trainer::new(cfg(), &m).unwrap();
    let mut straight = Vec::new();
    run(&mut m, &mut t, 20, &mut straight);
    let want = weights(&m);
    let want_scale = t.loss_scale();

    let mut m = model(&ctx, dtype);
    let mut t = Trainer::new(cfg(), &m).unwrap();
    let mut resumed = Vec::new();
    run(&mut m, &mut t, 10, &mut resumed);
    let dir = t.save_checkpoint(&m, &out).unwrap();
    assert!(
        dir.join("model.safetensors").is_file() && !dir.join("adapter_model.safetensors").exists()
    );
    let scale_at_10 = t.loss_scale();
    drop((m, t));

    let mut m = model(&ctx, dtype);
    let dir = latest_checkpoint(&out).unwrap().unwrap();
    let mut t = Trainer::resume(cfg(), &mut m, &dir).unwrap();
    assert_eq!(t.steps_done(), 10);
    assert_eq!(t.loss_scale(), scale_at_10);
    run(&mut m, &mut t, 20, &mut resumed);
    let bits = |s: &[StepStats]| -> Vec<(u64, Option<f32>, bool)> {
        s.iter()
            .map(|s| (s.loss.to_bits(), s.loss_scale, s.skipped))
            .collect()
    };
    assert_eq!(
        bits(&straight),
        bits(&resumed),
        "{tt:?} {dtype}: steps differ after resume"
    );
    assert_eq!(t.loss_scale(), want_scale);
    let got = weights(&m);
    for ((n, a), (_, b)) in want.iter().zip(&got) {
        assert!(a == b, "{tt:?} {dtype}: {n} differs after resume");
    }
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn full_resume_is_bit_exact() {
    resume_bit_exact(TrainType::Full, DType::F32);
}

#[test]
fn freeze_resume_is_bit_exact() {
    resume_bit_exact(TrainType::Freeze, DType::F32);
}

#[test]
fn f16_full_resume_is_bit_exact() {
    resume_bit_exact(TrainType::Full, DType::F16);
}

#[test]
fn corrupt_or_missing_weights_and_mismatched_train_types() {
    let ctx = Ctx::cpu();
    let out = scratch("corrupt");
    let mut m = model(&ctx, DType::F32);
    let mut t = Trainer::new(config(TrainType::Freeze, 5), &m).unwrap();
    t.step(&mut m, &mut [batch(&ctx, &[0])]).unwrap();
    let dir = t.save_checkpoint(&m, &out).unwrap();
    let resume = |cfg: TrainConfig| {
        let mut fresh = model(&ctx, DType::F32);
        Trainer::resume(cfg, &mut fresh, &dir)
            .err()
            .map(|e| e.to_string())
    };
    assert_eq!(resume(config(TrainType::Freeze, 5)), None);

    let e = resume(config(TrainType::Full, 5)).unwrap();
    assert!(
        e.contains("train_type") && e.contains("freeze") && e.contains("full"),
        "{e}"
    );

    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let e = resume(config(TrainType::Freeze, 5)).unwrap();
    assert!(
        e.contains("model.safetensors") && e.contains("corrupt"),
        "{e}"
    );

    std::fs::remove_file(&file).unwrap();
    let e = resume(config(TrainType::Freeze, 5)).unwrap();
    assert!(
        e.contains("model.safetensors") && e.contains("corrupt"),
        "{e}"
    );

    // A file with other tensors than the run trains (freeze 2 vs freeze 1).
    std::fs::write(&file, &bytes).unwrap();
    let two = TrainConfig {
        freeze_trainable_layers: 2,
        ..config(TrainType::Freeze, 5)
    };
    let e = resume(two).unwrap();
    assert!(
        e.contains("model.safetensors") && e.contains("model.layers.0."),
        "{e}"
    );
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn unsupported_bases_are_config_errors() {
    let ctx = Ctx::cpu();
    let err = |cfg: TrainConfig, m: &Model| Trainer::new(cfg, m).err().unwrap().to_string();

    let mut with_adapter = model(&ctx, DType::F32);
    let lora: LoraConfig =
        serde_json::from_str(r#"{"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}"#)
            .unwrap();
    let a = with_adapter.new_adapter(lora, 0).unwrap();
    with_adapter.attach_adapter(a);
    for tt in [TrainType::Full, TrainType::Freeze] {
        let e = err(config(tt, 5), &with_adapter);
        assert!(e.contains("train_type") && e.contains("adapter"), "{e}");
    }

    let quantized =
        Model::from_dir_quantized(&fixture(), &ctx, DType::F32, Some(&QuantConfig::nf4())).unwrap();
    let e = err(config(TrainType::Full, 5), &quantized);
    assert!(
        e.contains("train_type = \"full\"") && e.contains("quantized"),
        "{e}"
    );
    let e = err(config(TrainType::Freeze, 5), &quantized);
    assert!(
        e.contains("train_type = \"freeze\"") && e.contains("quantized"),
        "{e}"
    );

    let plain = model(&ctx, DType::F32);
    let three = TrainConfig {
        freeze_trainable_layers: 3,
        ..config(TrainType::Freeze, 5)
    };
    let e = err(three, &plain);
    assert!(
        e.contains("freeze_trainable_layers") && e.contains("2 decoder layers"),
        "{e}"
    );
    // Adapter types still need an adapter.
    let e = err(config(TrainType::Lora, 5), &plain);
    assert!(e.contains("no adapter"), "{e}");
}

#[test]
fn f16_overflow_backs_off_the_loss_scale_and_training_proceeds() {
    let ctx = Ctx::cpu();
    let init = 2f32.powi(30);
    let cfg = TrainConfig {
        train_type: TrainType::Full,
        lr: 1e-3,
        schedule: ScheduleKind::Constant,
        max_steps: 40,
        init_loss_scale: init,
        loss_scale_window: 4,
        // Overflow skips are the scaler's business even under "stop".
        nan_policy: NanPolicy::Stop,
        ..TrainConfig::default()
    };
    let mut m = model(&ctx, DType::F16);
    let mut t = Trainer::new(cfg, &m).unwrap();
    assert_eq!(t.loss_scale(), Some(LossScale::new(init, 4)));
    let before = weights(&m);
    let mut stats = Vec::new();
    while !t.is_done() {
        stats.push(t.step(&mut m, &mut [batch(&ctx, &[0, 1])]).unwrap());
    }
    let trace: Vec<String> = stats
        .iter()
        .map(|s| {
            format!(
                "{}{}",
                s.loss_scale.unwrap().log2(),
                if s.overflow { "!" } else { "" }
            )
        })
        .collect();
    println!(
        "log2(loss scale) per step (! = overflow): {}",
        trace.join(" ")
    );
    // The first steps overflow: skipped, nothing applied, the scale halves.
    assert!(stats[0].overflow && stats[0].skipped && stats[0].loss_scale == Some(init));
    assert_eq!(stats[1].loss_scale, Some(init / 2.0));
    // The scale follows GradScaler's rule step by step.
    let mut replica = LossScale::new(init, 4);
    for s in &stats {
        assert_eq!(s.loss_scale, Some(replica.scale));
        assert_eq!(s.skipped, s.overflow);
        replica.update(s.overflow);
    }
    assert_eq!(t.loss_scale(), Some(replica));
    let first_clean = stats
        .iter()
        .position(|s| !s.overflow)
        .expect("a clean step");
    let grown = stats
        .windows(2)
        .any(|w| w[1].loss_scale.unwrap() > w[0].loss_scale.unwrap());
    assert!(grown, "the scale never grew after {} clean steps", 4);
    assert_eq!(
        t.optimizer().steps_applied(),
        stats.iter().filter(|s| !s.skipped).count() as u64
    );
    assert_ne!(before, weights(&m));
    let last = stats.last().unwrap();
    assert!(
        last.loss < 0.8 * stats[0].loss,
        "loss {} -> {}",
        stats[0].loss,
        last.loss
    );

    // The first clean step ran on the initial weights: its unscaled norm is
    // the f32 model's norm on the same batch, up to f16 rounding.
    let mut m32 = model(&ctx, DType::F32);
    let mut t32 = Trainer::new(
        TrainConfig {
            train_type: TrainType::Full,
            max_steps: 1,
            ..TrainConfig::default()
        },
        &m32,
    )
    .unwrap();
    let s32 = t32.step(&mut m32, &mut [batch(&ctx, &[0, 1])]).unwrap();
    let g16 = stats[first_clean].grad_norm;
    assert!(
        (g16 - s32.grad_norm).abs() < 0.05 * s32.grad_norm,
        "f16 unscaled norm {g16} vs f32 {}",
        s32.grad_norm
    );
}

#[test]
fn f16_lora_training_is_loss_scaled_too() {
    let ctx = Ctx::cpu();
    let mut m = model(&ctx, DType::F16);
    let lora: LoraConfig =
        serde_json::from_str(r#"{"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}"#)
            .unwrap();
    let a = m.new_adapter(lora, 42).unwrap();
    m.attach_adapter(a);
    let cfg = TrainConfig {
        train_type: TrainType::Lora,
        lr: 1e-2,
        schedule: ScheduleKind::Constant,
        max_steps: 25,
        init_loss_scale: 2f32.powi(28),
        ..TrainConfig::default()
    };
    let mut t = Trainer::new(cfg, &m).unwrap();
    let mut stats = Vec::new();
    while !t.is_done() {
        stats.push(t.step(&mut m, &mut [batch(&ctx, &[0, 1])]).unwrap());
    }
    assert!(stats[0].overflow && stats[1].loss_scale == Some(2f32.powi(27)));
    let clean = stats.iter().filter(|s| !s.skipped).count();
    assert!(clean >= 10, "only {clean} clean steps");
    assert_eq!(t.optimizer().steps_applied(), clean as u64);
    let last = stats.last().unwrap();
    assert!(
        !last.skipped && last.loss < 0.8 * stats[0].loss,
        "{} -> {}",
        stats[0].loss,
        last.loss
    );
}
