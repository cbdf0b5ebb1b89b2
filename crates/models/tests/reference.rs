//! llmft-models against transformers: logits, loss and every gradient of tiny
//! Llama-3 / Qwen2 / Qwen3 / Mistral models (fixtures from
//! scripts/fixtures/models_make_fixtures.py), on the CPU in f32 and, where a
//! GPU exists, on CUDA in f32 and bf16.
use std::path::{Path, PathBuf};

use llmft_models::{Grads, Model, ModelBatch};
use llmft_tensor::testing::gpu;
use llmft_tensor::{Ctx, DType};
use safetensors::SafeTensors;

fn fixture_dir(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(kind)
}

struct Reference {
    bytes: Vec<u8>,
    meta: serde_json::Value,
}

impl Reference {
    fn load(kind: &str) -> Self {
        let d = fixture_dir(kind);
        let bytes = std::fs::read(d.join("reference.safetensors")).expect("fixture present");
        let meta =
            serde_json::from_str(&std::fs::read_to_string(d.join("reference.json")).unwrap())
                .unwrap();
        Self { bytes, meta }
    }
    fn f32(&self, name: &str) -> Vec<f32> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("fixture has no {name}"));
        t.data()
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
    fn i32(&self, name: &str) -> Vec<i32> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(name).unwrap();
        t.data()
            .chunks(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
    fn names(&self) -> Vec<String> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        st.names().into_iter().map(|s| s.to_string()).collect()
    }
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Runs one fixture case (`prefix` "" or "packed.") and returns the worst
/// (logits, gradient) relative errors.
fn check(kind: &str, ctx: &Ctx, dtype: DType, packed: bool) -> (f64, f64, f64) {
    let r = Reference::load(kind);
    let model = Model::from_dir(&fixture_dir(kind), ctx, dtype).unwrap();
    let p = if packed { "packed." } else { "" };
    let ids = r.i32(&format!("{p}ids"));
    let targets = r.i32(&format!("{p}targets"));
    let (b, t) = if packed {
        (1, ids.len())
    } else {
        (2, ids.len() / 2)
    };
    let pos = packed.then(|| r.i32("packed.positions"));
    let seg = packed.then(|| r.i32("packed.segments"));
    let batch = ModelBatch::from_host(
        ctx,
        b,
        t,
        &ids,
        Some(&targets),
        pos.as_deref(),
        seg.as_deref(),
    )
    .unwrap();
    let logits = model.logits(&batch).unwrap().to_f32_vec().unwrap();
    let e_logits = rel_l2(&logits, &r.f32(&format!("{p}logits")));

    let mut grads = Grads::for_all_weights(&model).unwrap();
    grads
        .track(ctx, "embed_output", &[b * t, model.config.hidden_size])
        .unwrap();
    let stats = model
        .forward_backward(&batch, None, Some(&mut grads))
        .unwrap();
    let want_loss = r.meta[if packed { "packed_loss" } else { "loss" }]
        .as_f64()
        .unwrap();
    let e_loss = ((stats.loss - want_loss) / want_loss).abs();
    let mut e_grad: f64 = 0.0;
    let prefix = format!("{p}grad.");
    for name in r.names().into_iter().filter(|n| n.starts_with(&prefix)) {
        let key = &name[prefix.len()..];
        if !packed && key.starts_with("grad.") {
            continue;
        }
        let ours = grads
            .get(key)
            .unwrap_or_else(|| panic!("no gradient for {key}"));
        let e = rel_l2(&ours.to_f32_vec().unwrap(), &r.f32(&name));
        assert!(e.is_finite(), "{kind} {key}: {e}");
        if dtype == DType::F32 {
            assert!(
                e <= 1e-3,
                "{kind} {p}{key}: gradient rel. L2 {e:.2e} > 1e-3"
            );
        }
        e_grad = e_grad.max(e);
    }
    eprintln!("RESULT model={kind}{} dtype={dtype} device={} logits_rel_l2={e_logits:.2e} loss_rel={e_loss:.2e} worst_grad_rel_l2={e_grad:.2e}",
        if packed { "-packed" } else { "" }, ctx.device());
    (e_logits, e_loss, e_grad)
}

#[test]
fn cpu_f32_matches_transformers() {
    let ctx = Ctx::cpu();
    for kind in ["llama3", "qwen2", "qwen3", "mistral"] {
        for packed in [false, true] {
            let (el, eloss, _) = check(kind, &ctx, DType::F32, packed);
            assert!(
                el <= 1e-4,
                "{kind} packed={packed}: logits rel. L2 {el:.2e} > 1e-4"
            );
            assert!(
                eloss <= 1e-5,
                "{kind} packed={packed}: loss rel. err {eloss:.2e}"
            );
        }
    }
}

#[test]
fn cuda_f32_and_bf16_match_transformers() {
    let Some(ctx) = gpu() else { return };
    for kind in ["llama3", "qwen2", "qwen3", "mistral"] {
        for packed in [false, true] {
            let (el, _, _) = check(kind, &ctx, DType::F32, packed);
            assert!(el <= 1e-4, "{kind}: CUDA f32 logits rel. L2 {el:.2e}");
            let (el16, _, eg16) = check(kind, &ctx, DType::BF16, packed);
            let hf = Reference::load(kind).meta["hf_bf16_logits_rel_l2"]
                .as_f64()
                .unwrap();
            assert!(
                el16 <= 2.0 * hf,
                "{kind}: bf16 logits rel. L2 {el16:.2e} > 2 × transformers' {hf:.2e}"
            );
            assert!(eg16 < 0.1, "{kind}: bf16 gradient rel. L2 {eg16:.2e}");
        }
    }
}

/// The fp16 bound of one fixture: f16 keeps 3 more mantissa bits than
/// bf16 (8× finer rounding), so its logits must be well inside
/// transformers' own bf16 error (the CPU run: 0.09–0.15 of it).
fn check_f16(kind: &str, ctx: &Ctx, packed: bool) {
    let (el, eloss, eg) = check(kind, ctx, DType::F16, packed);
    let hf = Reference::load(kind).meta["hf_bf16_logits_rel_l2"]
        .as_f64()
        .unwrap();
    assert!(
        el <= 0.3 * hf,
        "{kind} packed={packed}: f16 logits rel. L2 {el:.2e} > 0.3 × transformers' bf16 {hf:.2e}"
    );
    assert!(eloss < 1e-3, "{kind}: f16 loss rel. err {eloss:.2e}");
    assert!(eg < 0.01, "{kind}: f16 gradient rel. L2 {eg:.2e}");
}

/// fp16 compute (the P40/V100 path) on the CPU against transformers' f32.
#[test]
fn cpu_f16_matches_transformers() {
    let ctx = Ctx::cpu();
    for kind in ["llama3", "qwen2", "qwen3", "mistral"] {
        for packed in [false, true] {
            check_f16(kind, &ctx, packed);
        }
    }
}

/// fp16 compute on CUDA (on any kernel path, e.g. LLMFT_KERNEL_ARCH=70)
/// against transformers' f32, with the bounds of the CPU run.
#[test]
fn cuda_f16_matches_transformers() {
    let Some(ctx) = gpu() else { return };
    for kind in ["llama3", "qwen2", "qwen3", "mistral"] {
        for packed in [false, true] {
            check_f16(kind, &ctx, packed);
        }
    }
}

/// Gradient checkpointing recomputes the same gradients.
#[test]
fn checkpointing_gives_identical_gradients() {
    let ctx = Ctx::cpu();
    let dir = fixture_dir("qwen3");
    let mut model = Model::from_dir(&dir, &ctx, DType::F32).unwrap();
    let ids: Vec<i32> = (0..16).map(|i| (i * 7) % 96).collect();
    let batch = ModelBatch::from_host(&ctx, 2, 8, &ids, None, None, None).unwrap();
    let mut g1 = Grads::for_all_weights(&model).unwrap();
    let l1 = model.forward_backward(&batch, None, Some(&mut g1)).unwrap();
    model.checkpointing = true;
    let mut g2 = Grads::for_all_weights(&model).unwrap();
    let l2 = model.forward_backward(&batch, None, Some(&mut g2)).unwrap();
    assert_eq!(l1.loss, l2.loss);
    for name in g1.names() {
        let (a, b) = (
            g1.get(name).unwrap().to_f32_vec().unwrap(),
            g2.get(name).unwrap().to_f32_vec().unwrap(),
        );
        assert_eq!(a, b, "{name}");
    }
}

/// Greedy generation with the KV cache picks the same tokens as argmax over
/// full recomputation of the growing sequence.
#[test]
fn kv_cache_generation_matches_full_recompute() {
    let ctx = Ctx::cpu();
    for kind in ["llama3", "qwen2", "qwen3", "mistral"] {
        let model = Model::from_dir(&fixture_dir(kind), &ctx, DType::F32).unwrap();
        let prompt = vec![5, 17, 42, 8];
        let opts = llmft_models::GenerateOpts {
            max_new_tokens: 6,
            ..Default::default()
        };
        let fast = model.generate(&prompt, &opts).unwrap();
        let mut seq = prompt.clone();
        for _ in 0..6 {
            let b = ModelBatch::from_host(&ctx, 1, seq.len(), &seq, None, None, None).unwrap();
            let logits = model.logits(&b).unwrap().to_f32_vec().unwrap();
            let last = &logits[(seq.len() - 1) * 96..];
            seq.push(llmft_models::sample_token(last, &opts, 0));
        }
        assert_eq!(fast, seq[prompt.len()..], "{kind}");
        let sampled = llmft_models::GenerateOpts {
            temperature: 0.8,
            top_p: 0.9,
            seed: 3,
            ..opts.clone()
        };
        let a = model.generate(&prompt, &sampled).unwrap();
        assert_eq!(
            a,
            model.generate(&prompt, &sampled).unwrap(),
            "{kind}: sampling is seeded"
        );
    }
}

/// The tiny Mistral's sliding window is 64 tokens: rows and generations up to
/// it run (full causal attention equals the window there), longer ones are
/// refused with the setting to change.
#[test]
fn rows_longer_than_the_sliding_window_are_refused() {
    let ctx = Ctx::cpu();
    let model = Model::from_dir(&fixture_dir("mistral"), &ctx, DType::F32).unwrap();
    assert_eq!(model.config.sliding_window, Some(64));
    let ids: Vec<i32> = (0..65).map(|i| i % 96).collect();
    let fits = ModelBatch::from_host(&ctx, 1, 64, &ids[..64], None, None, None).unwrap();
    assert!(model.forward_loss(&fits, None).is_ok());
    let long = ModelBatch::from_host(&ctx, 1, 65, &ids, None, None, None).unwrap();
    let e = model.forward_loss(&long, None).unwrap_err().to_string();
    assert!(
        e.contains("a row of 65 tokens are more than the model's sliding attention window (64")
            && e.contains("data.batch.seq_len and data.cutoff_len to at most 64"),
        "{e}"
    );
    let opts = llmft_models::GenerateOpts {
        max_new_tokens: 60,
        ..Default::default()
    };
    let e = model.generate(&ids[..5], &opts).unwrap_err().to_string();
    assert!(
        e.contains("generate: the prompt and max_new_tokens make 65 tokens"),
        "{e}"
    );
}
