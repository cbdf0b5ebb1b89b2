//! LoRA training of the tiny Llama fixture on CPU f32: the loss falls,
//! accumulation matches one large batch, resume is bit-exact, non-finite
//! steps are skipped, and checkpoints fail loudly when corrupt.
use llmft_lora::LoraConfig;
use llmft_models::Model;
use llmft_tensor::{Ctx, DType};
use llmft_trainer::{
    latest_checkpoint, list_checkpoints, MetricsWriter, NanPolicy, ScheduleKind, TrainConfig,
    Trainer,
};

mod common;
use common::{batch, fixture, scratch, step_batches, SEQ};

fn lora_model(ctx: &Ctx, dropout: f32) -> Model {
    let mut model = Model::from_dir(&fixture(), ctx, DType::F32).unwrap();
    let cfg = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: dropout,
        target_modules: Some(llmft_lora::NamesOrPattern::Pattern("all-linear".into())),
        ..LoraConfig::default()
    };
    // The run seed (TrainConfig::default().seed), so resume rebuilds the same dropout salts.
    let adapter = model.new_adapter(cfg, 42).unwrap();
    model.attach_adapter(adapter);
    model
}

fn adapter_values(model: &Model) -> Vec<(String, Vec<u32>)> {
    let mut out = Vec::new();
    for (name, l) in &model.adapter().unwrap().layers {
        for (i, p) in l.params().into_iter().enumerate() {
            let bits = p
                .to_f32_vec()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect();
            out.push((format!("{name}.{i}"), bits));
        }
    }
    out
}

fn config(max_steps: u64) -> TrainConfig {
    TrainConfig {
        lr: 5e-3,
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
fn loss_decreases_on_a_repeated_batch() {
    let ctx = Ctx::cpu();
    let mut model = lora_model(&ctx, 0.0);
    let cfg = TrainConfig {
        lr: 1e-2,
        schedule: ScheduleKind::Constant,
        max_steps: 20,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(cfg, &model).unwrap();
    let mut losses = Vec::new();
    while !trainer.is_done() {
        let mut micro = [batch(&ctx, &[0, 1])];
        let s = trainer.step(&mut model, &mut micro).unwrap();
        assert!(!s.skipped && s.grad_norm.is_finite() && s.tokens == 2 * (SEQ - 1));
        losses.push(s.loss);
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(
        last < 0.7 * first,
        "loss went from {first} to {last}: {losses:?}"
    );
}

#[test]
fn accumulation_matches_one_large_batch() {
    let ctx = Ctx::cpu();
    let cfg = TrainConfig {
        lr: 1e-2,
        schedule: ScheduleKind::Constant,
        max_steps: 5,
        ..TrainConfig::default()
    };
    let mut grads = Vec::new();
    for split in [false, true] {
        let mut model = lora_model(&ctx, 0.0);
        let mut trainer = Trainer::new(cfg.clone(), &model).unwrap();
        // One identical step first so that B ≠ 0 and dA is not trivially 0.
        trainer
            .step(&mut model, &mut [batch(&ctx, &[3, 4])])
            .unwrap();
        let mut micro = if split {
            vec![batch(&ctx, &[0]), batch(&ctx, &[1])]
        } else {
            vec![batch(&ctx, &[0, 1])]
        };
        let acc = trainer.accumulate(&model, &mut micro).unwrap();
        assert_eq!(acc.tokens, 2 * (SEQ - 1));
        let g: Vec<Vec<f32>> = trainer
            .grads()
            .lora_all()
            .values()
            .flat_map(|g| g.tensors())
            .map(|t| t.to_f32_vec().unwrap())
            .collect();
        grads.push((acc.loss_sum, g));
    }
    let (l1, g1) = &grads[0];
    let (l2, g2) = &grads[1];
    assert!((l1 - l2).abs() < 1e-6 * l1.abs());
    let mut nonzero = 0;
    for (a, b) in g1.iter().zip(g2) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-6 + 1e-5 * x.abs(), "{x} vs {y}");
            nonzero += (*x != 0.0) as usize;
        }
    }
    assert!(nonzero > 100);
}

#[test]
fn resume_is_bit_exact() {
    let ctx = Ctx::cpu();
    let out = scratch("resume");

    let mut model = lora_model(&ctx, 0.1);
    let mut trainer = Trainer::new(config(20), &model).unwrap();
    let mut straight = Vec::new();
    while !trainer.is_done() {
        let mut micro = step_batches(&ctx, trainer.steps_done());
        straight.push(trainer.step(&mut model, &mut micro).unwrap().loss);
    }
    let want = adapter_values(&model);

    let mut model = lora_model(&ctx, 0.1);
    let mut trainer = Trainer::new(config(20), &model).unwrap();
    let mut resumed = Vec::new();
    while trainer.steps_done() < 10 {
        let mut micro = step_batches(&ctx, trainer.steps_done());
        resumed.push(trainer.step(&mut model, &mut micro).unwrap().loss);
        if trainer.steps_done() % 4 == 0 {
            trainer.save_checkpoint(&model, &out).unwrap();
        }
    }
    trainer.set_cursor(llmft_data::Cursor {
        epoch: 0,
        index: 10,
    });
    trainer.save_checkpoint(&model, &out).unwrap();
    drop((model, trainer));
    // keep_last = 2: checkpoints 8 and 10 remain.
    let steps: Vec<u64> = list_checkpoints(&out)
        .unwrap()
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(steps, [8, 10]);

    let mut model = Model::from_dir(&fixture(), &ctx, DType::F32).unwrap();
    let dir = latest_checkpoint(&out).unwrap().unwrap();
    let mut trainer = Trainer::resume(config(20), &mut model, &dir).unwrap();
    assert_eq!(trainer.steps_done(), 10);
    assert_eq!(trainer.cursor().unwrap().index, 10);
    while !trainer.is_done() {
        let mut micro = step_batches(&ctx, trainer.steps_done());
        resumed.push(trainer.step(&mut model, &mut micro).unwrap().loss);
    }
    assert_eq!(straight, resumed, "losses differ after resume");
    let got = adapter_values(&model);
    assert_eq!(want.len(), got.len());
    for ((n, a), (_, b)) in want.iter().zip(&got) {
        assert!(a == b, "{n} differs after resume");
    }
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn non_finite_gradients_skip_the_step_or_stop() {
    let ctx = Ctx::cpu();
    for policy in [NanPolicy::Skip, NanPolicy::Stop] {
        let mut model = lora_model(&ctx, 0.0);
        let cfg = TrainConfig {
            nan_policy: policy,
            max_steps: 3,
            ..TrainConfig::default()
        };
        let mut trainer = Trainer::new(cfg, &model).unwrap();
        let before = adapter_values(&model);
        let acc = trainer
            .accumulate(&model, &mut [batch(&ctx, &[0])])
            .unwrap();
        let name = trainer.grads().lora_all().keys().next().unwrap().clone();
        let g = trainer.grads_mut().lora_mut(&name).unwrap();
        let mut v = g.b.to_f32_vec().unwrap();
        v[0] = f32::NAN;
        g.b = llmft_tensor::Tensor::from_slice(&ctx, &v, g.b.shape()).unwrap();
        let res = trainer.apply(&mut model, acc);
        match policy {
            NanPolicy::Skip => {
                let s = res.unwrap();
                assert!(s.skipped && s.grad_norm.is_nan());
                assert_eq!(trainer.optimizer().steps_applied(), 0);
                // The next step trains normally from clean gradients.
                let s = trainer.step(&mut model, &mut [batch(&ctx, &[0])]).unwrap();
                assert!(!s.skipped && s.grad_norm.is_finite());
                assert_eq!(trainer.optimizer().steps_applied(), 1);
            }
            NanPolicy::Stop => {
                let e = res.unwrap_err().to_string();
                assert!(e.contains("step 1") && e.contains("nan_policy"), "{e}");
                assert_eq!(before, adapter_values(&model));
            }
        }
    }
}

#[test]
fn corrupt_and_half_written_checkpoints() {
    let ctx = Ctx::cpu();
    let out = scratch("corrupt");
    let mut model = lora_model(&ctx, 0.0);
    let mut trainer = Trainer::new(config(5), &model).unwrap();
    trainer.step(&mut model, &mut [batch(&ctx, &[0])]).unwrap();
    let dir = trainer.save_checkpoint(&model, &out).unwrap();
    assert!(dir.ends_with("checkpoint-1"));

    // A write killed midway leaves a temporary folder (and at worst a folder
    // without trainer_state.json): both are ignored.
    std::fs::create_dir_all(out.join("tmp-checkpoint-2")).unwrap();
    std::fs::write(
        out.join("tmp-checkpoint-2/optimizer.safetensors"),
        b"\x10\x00",
    )
    .unwrap();
    std::fs::create_dir_all(out.join("checkpoint-3")).unwrap();
    assert_eq!(latest_checkpoint(&out).unwrap().unwrap(), dir);
    let mut fresh = Model::from_dir(&fixture(), &ctx, DType::F32).unwrap();
    Trainer::resume(config(5), &mut fresh, &dir).unwrap();

    let opt = dir.join("optimizer.safetensors");
    let bytes = std::fs::read(&opt).unwrap();
    std::fs::write(&opt, &bytes[..bytes.len() / 2]).unwrap();
    let e = Trainer::resume(config(5), &mut fresh, &dir)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("optimizer.safetensors") && e.contains("corrupt"),
        "{e}"
    );

    // Repaired, the optimizer passes; a damaged state is named next.
    std::fs::write(&opt, &bytes).unwrap();
    Trainer::resume(config(5), &mut fresh, &dir).unwrap();
    std::fs::write(dir.join("trainer_state.json"), b"{\"step\": ").unwrap();
    let e = Trainer::resume(config(5), &mut fresh, &dir)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("trainer_state.json"), "{e}");
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn metrics_are_one_json_line_per_step() {
    let ctx = Ctx::cpu();
    let out = scratch("metrics");
    let mut model = lora_model(&ctx, 0.0);
    let mut trainer = Trainer::new(config(2), &model).unwrap();
    let path = out.join("metrics.jsonl");
    let mut w = MetricsWriter::append(&path).unwrap();
    while !trainer.is_done() {
        let s = trainer.step(&mut model, &mut [batch(&ctx, &[1])]).unwrap();
        w.write(&s).unwrap();
    }
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for key in [
        "step",
        "loss",
        "lr",
        "grad_norm",
        "tokens",
        "tokens_per_s",
        "skipped",
    ] {
        assert!(lines[1].get(key).is_some(), "{key} missing");
    }
    assert_eq!(lines[1]["step"], 2);
    let eval = trainer.evaluate(&model, &[batch(&ctx, &[2])]).unwrap();
    assert!((eval.perplexity - eval.loss.exp()).abs() < 1e-9);
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn dora_trains_and_round_trips_through_a_checkpoint() {
    let ctx = Ctx::cpu();
    let out = scratch("dora");
    let mut model = Model::from_dir(&fixture(), &ctx, DType::F32).unwrap();
    let cfg: LoraConfig = serde_json::from_str(
        r#"{"r": 4, "lora_alpha": 8, "use_dora": true, "target_modules": ["q_proj", "down_proj"]}"#,
    )
    .unwrap();
    let adapter = model.new_adapter(cfg, 42).unwrap();
    model.attach_adapter(adapter);
    let mut trainer = Trainer::new(config(6), &model).unwrap();
    let m0 = adapter_values(&model);
    let mut losses = Vec::new();
    for _ in 0..3 {
        let mut micro = step_batches(&ctx, trainer.steps_done());
        losses.push(trainer.step(&mut model, &mut micro).unwrap());
    }
    assert!(losses.iter().all(|s| !s.skipped && s.loss.is_finite()));
    let m3 = adapter_values(&model);
    // A, B and the magnitude vectors all moved.
    for ((n, a), (_, b)) in m0.iter().zip(&m3) {
        assert!(a != b, "{n} did not change");
    }
    let dir = trainer.save_checkpoint(&model, &out).unwrap();
    let mut fresh = Model::from_dir(&fixture(), &ctx, DType::F32).unwrap();
    let t2 = Trainer::resume(config(6), &mut fresh, &dir).unwrap();
    assert_eq!(t2.optimizer().steps_applied(), 3);
    assert_eq!(adapter_values(&fresh), m3);
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn adapter_gradients_are_zeroed_after_applied_and_skipped_steps() {
    let ctx = Ctx::cpu();
    let mut model = lora_model(&ctx, 0.0);
    let cfg = TrainConfig {
        nan_policy: NanPolicy::Skip,
        ..config(3)
    };
    let mut trainer = Trainer::new(cfg, &model).unwrap();
    let all_zero = |t: &Trainer| {
        t.grads()
            .lora_all()
            .values()
            .flat_map(|g| g.tensors())
            .all(|g| g.to_f32_vec().unwrap().iter().all(|&x| x == 0.0))
    };
    // Applied: the update zeroes the gradients it read.
    let acc = trainer
        .accumulate(&model, &mut [batch(&ctx, &[0])])
        .unwrap();
    assert!(!all_zero(&trainer));
    let s = trainer.apply(&mut model, acc).unwrap();
    assert!(!s.skipped);
    assert!(all_zero(&trainer));
    // Skipped (a NaN gradient): zeroed all the same.
    let acc = trainer
        .accumulate(&model, &mut [batch(&ctx, &[0])])
        .unwrap();
    let name = trainer.grads().lora_all().keys().next().unwrap().clone();
    let g = trainer.grads_mut().lora_mut(&name).unwrap();
    let mut v = g.a.to_f32_vec().unwrap();
    v[0] = f32::NAN;
    g.a = llmft_tensor::Tensor::from_slice(&ctx, &v, g.a.shape()).unwrap();
    let s = trainer.apply(&mut model, acc).unwrap();
    assert!(s.skipped);
    assert!(all_zero(&trainer));
    assert_eq!(trainer.optimizer().steps_applied(), 1);
}
