//! The `llmft` binary: exit codes and one-sentence errors, `merge` and
//! `data inspect` on the repository's fixtures.
use std::path::Path;

mod common;
use common::{llmft, root};

#[test]
fn unknown_key_is_one_sentence_and_nonzero() {
    let (code, _, err) = llmft(&["config", "show", "--set", "lora.rr=4"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("unknown configuration key `lora.rr`") && err.contains("`lora.r`"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// `llmft env` names the binary's CUDA build (and, with a GPU, its kernel path).
#[test]
fn env_names_the_cuda_build() {
    let (code, out, err) = llmft(&["env"]);
    assert_eq!(code, 0, "{out}{err}");
    let want = if cfg!(feature = "cuda-12") {
        "CUDA 12 build"
    } else {
        "CUDA 13 build"
    };
    assert!(
        out.lines().next().is_some_and(|l| l.contains(want)),
        "{out}"
    );
    assert!(out.contains("CUDA driver: "), "{out}");
    if out.contains("GPUs: 0") {
        assert!(!out.contains("kernels: sm_"), "{out}");
    } else if !out.contains("CUDA driver: not found") {
        // Each GPU's line of attention tiles (128 × 64 on sm_80/90).
        assert!(
            out.contains("    fused attention backward tiles: head dim 64 "),
            "{out}"
        );
    }
}

#[test]
fn merge_exports_and_refuses_to_overwrite() {
    let out = std::env::temp_dir().join(format!("llmft-cli-merge-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let args = [
        "merge",
        "--adapter",
        "crates/lora/fixtures/models/qwen3-lora",
        "--out",
        out.to_str().unwrap(),
        "--set",
        "model.path=crates/models/fixtures/qwen3",
        "--set",
        "model.dtype=f32",
        "--set",
        "model.device=cpu",
    ];
    let (code, stdout, err) = llmft(&args);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("merged 14 adapted linears"), "{stdout}");
    assert!(out.join("model.safetensors").is_file() && out.join("config.json").is_file());
    let (code, _, err) = llmft(&args);
    assert_ne!(code, 0);
    assert!(err.contains("already exists"), "{err}");
    let (code, _, err) = llmft(&[
        "merge",
        "--adapter",
        "nope",
        "--out",
        "/tmp/x",
        "--set",
        "model.device=cpu",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("model.path"), "{err}");
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn data_inspect_marks_trained_spans() {
    let (code, stdout, err) = llmft(&[
        "data",
        "inspect",
        "-n",
        "1",
        "--set",
        "model.path=crates/data/fixtures/chat/llama3",
        "--set",
        r#"data.train=["crates/data/fixtures/chat/conversations.jsonl"]"#,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        stdout.contains("conversations.jsonl:1") && stdout.contains('⟦'),
        "{stdout}"
    );
    assert!(stdout.contains("10 examples"), "{stdout}");
}

#[test]
fn quantize_writes_a_bnb_checkpoint_that_loads_as_is() {
    use llmft_models::{Model, ModelBatch, QuantConfig};
    use llmft_tensor::{Ctx, DType};
    let out = std::env::temp_dir().join(format!("llmft-cli-quantize-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let (code, _, err) = llmft(&[
        "quantize",
        "--out",
        out.to_str().unwrap(),
        "--set",
        "model.path=crates/models/fixtures/qwen2",
        "--set",
        "model.quant=nf4",
        "--set",
        "model.dtype=f32",
        "--set",
        "model.device=cpu",
    ]);
    assert_eq!(code, 0, "{err}");
    let ctx = Ctx::cpu();
    let src = root().join("crates/models/fixtures/qwen2");
    let direct =
        Model::from_dir_quantized(&src, &ctx, DType::F32, Some(&QuantConfig::nf4())).unwrap();
    let loaded = Model::from_dir(&out, &ctx, DType::F32).unwrap();
    let ids: Vec<i32> = (0..8).map(|i| (i * 9 + 2) % 96).collect();
    let b = ModelBatch::from_host(&ctx, 1, 8, &ids, None, None, None).unwrap();
    let (x, y) = (
        direct.logits(&b).unwrap().to_f32_vec().unwrap(),
        loaded.logits(&b).unwrap().to_f32_vec().unwrap(),
    );
    assert_eq!(x, y);
    let (code, _, err) = llmft(&[
        "quantize",
        "--out",
        "/tmp/never",
        "--set",
        "model.quant=none",
        "--set",
        "model.path=crates/models/fixtures/qwen2",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("bitsandbytes formats"), "{err}");
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn generate_continues_a_prompt_deterministically() {
    use llmft_models::ModelConfig;
    use llmft_quant::io::{write_safetensors, RawTensor};
    let tok_dir = root().join("crates/data/fixtures/chat/llama3");
    let vocab = llmft_data::ModelTokenizer::from_dir(&tok_dir)
        .unwrap()
        .inner()
        .get_vocab_size(true);
    let dir = std::env::temp_dir().join(format!("llmft-cli-generate-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tok_dir.join(f), dir.join(f)).unwrap();
    }
    let json = format!(
        r#"{{"architectures":["LlamaForCausalLM"],"vocab_size":{vocab},"hidden_size":32,"intermediate_size":48,
            "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1}}"#
    );
    std::fs::write(dir.join("config.json"), &json).unwrap();
    let cfg = ModelConfig::from_json(&json, Path::new("config.json")).unwrap();
    let mut seed = 1u32;
    let mut tensors = Vec::new();
    for u in 0..cfg.num_units() {
        for (name, shape) in cfg.unit_tensors(u) {
            let n: usize = shape.iter().product();
            let mut data = Vec::with_capacity(n * 4);
            for _ in 0..n {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let v = if name.ends_with("norm.weight") {
                    1.0
                } else {
                    (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
                };
                data.extend_from_slice(&v.to_le_bytes());
            }
            tensors.push((
                name,
                RawTensor {
                    dtype: safetensors::Dtype::F32,
                    shape,
                    data,
                },
            ));
        }
    }
    write_safetensors(&dir.join("model.safetensors"), &tensors).unwrap();
    let path = format!("model.path={}", dir.display());
    let args = [
        "generate",
        "--prompt",
        "What is",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--seed",
        "5",
        "--set",
        &path,
        "--set",
        "model.quant=none",
        "--set",
        "model.dtype=f32",
        "--set",
        "model.device=cpu",
    ];
    let (code, out1, err) = llmft(&args);
    assert_eq!(code, 0, "{err}");
    assert!(out1.starts_with("What is"), "{out1}");
    let (_, out2, _) = llmft(&args);
    assert_eq!(out1, out2, "seeded sampling repeats");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn example_configs_load_with_known_keys() {
    let dir = root().join("examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let p = path.display().to_string();
            let (code, out, err) = llmft(&["config", "show", "-c", &p]);
            assert_eq!(code, 0, "{p}: {err}");
            assert!(out.contains("train.train_type"), "{p}: {out}");
            n += 1;
        }
    }
    assert!(n >= 3, "examples/ holds the real-run configs");
}

#[test]
fn config_show_resolves_like_train() {
    // No model: the demo job's layer sits between the defaults and the flags.
    let (code, out, err) = llmft(&["config", "show", "--set", "train.max_steps=7"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("train.lr = 0.002  # the built-in demo job"),
        "{out}"
    );
    assert!(out.contains("train.max_steps = 7  # --set"), "{out}");
    // With a model: the plain defaults.
    let (code, out, err) = llmft(&["config", "show", "--set", "model.path=org/name"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("train.lr = 0.0002  # the built-in defaults"),
        "{out}"
    );
}

#[test]
fn offload_that_cannot_fit_in_host_memory_stops_before_loading() {
    // The 70B shape's NF4 weights (~36 GiB) and 80 layers of activations at
    // 64 × 2048 tokens exceed any CI machine's memory: one sentence naming
    // the setting and the bytes, before a weight is drawn.
    let json = std::env::temp_dir().join(format!("llmft-cli-offload-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&json);
    let t = std::time::Instant::now();
    let (code, out, err) = llmft(&[
        "bench",
        "--model",
        "llama2-70b",
        "--device",
        "cpu",
        "--micro-batch",
        "64",
        "--offload-params",
        "--offload-activations",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--gemm-size",
        "0",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("offload.")
            && err.contains("bytes of host memory")
            && err.contains("available"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!json.exists(), "no partial output");
    assert!(t.elapsed().as_secs() < 20, "the check comes before loading");
}
