//! Replays every committed fuzz corpus and regression input
//! (`tests/fuzz/corpus/<target>/`, `tests/fuzz/regressions/<target>/`)
//! through its harness on the stable toolchain: none may panic. This is how
//! CI re-runs what the fuzzers found; `scripts/fuzz.sh` runs the fuzzers.
//!
//! `cargo test --release -p llmft-tests --test fuzz_replay -- --ignored`
//! rewrites the seed inputs (`seed-*` files of each corpus) from the repo's
//! fixtures.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use llmft_quant::{QuantConfig, QuantizedTensor};
use llmft_tensor::{Ctx, Tensor};
use llmft_tests::fuzz::{tiny_model, TARGETS};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.expect("corpus entry").path())
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    out.sort();
    out
}

#[test]
fn every_corpus_and_regression_input_replays_without_a_panic() {
    let mut total = 0;
    for (name, harness) in TARGETS {
        let corpus = files_in(&fuzz_dir().join("corpus").join(name));
        assert!(
            corpus.len() >= 3,
            "the corpus of fuzz target {name} has {} inputs; it is committed with its seeds",
            corpus.len()
        );
        let regressions = files_in(&fuzz_dir().join("regressions").join(name));
        for path in corpus.iter().chain(&regressions) {
            let data = std::fs::read(path).expect("read a corpus input");
            let caught = std::panic::catch_unwind(|| harness(&data));
            let Ok(accepted) = caught else {
                panic!("fuzz target {name} panics on {}", path.display());
            };
            // Seeds are valid inputs made from the fixtures: they must get
            // through the whole harness (or the harness tests nothing).
            let seed = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("seed-"));
            assert!(
                accepted || !seed,
                "fuzz target {name} rejects its seed {}",
                path.display()
            );
            total += 1;
        }
    }
    println!("replayed {total} fuzz inputs");
}

#[test]
fn every_target_has_a_cargo_fuzz_binary_and_the_script_runs_it() {
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).expect("fuzz manifest");
    let script = std::fs::read_to_string(repo().join("scripts/fuzz.sh")).expect("scripts/fuzz.sh");
    for (name, _) in TARGETS {
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "tests/fuzz/Cargo.toml has no [[bin]] {name}"
        );
        let src = std::fs::read_to_string(fuzz_dir().join(format!("fuzz_targets/{name}.rs")))
            .unwrap_or_default();
        assert!(
            src.contains(&format!("llmft_tests::fuzz::{name}(")),
            "fuzz_targets/{name}.rs does not call its harness"
        );
        assert!(script.contains(name), "scripts/fuzz.sh does not run {name}");
    }
}

// ---------------------------------------------------------------- seeds ---

type Raw = (String, Dtype, Vec<usize>, Vec<u8>);

fn st_bytes(tensors: &[Raw], metadata: Option<BTreeMap<String, String>>) -> Vec<u8> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                TensorView::new(*d, s.clone(), b).expect("a consistent seed tensor"),
            )
        })
        .collect();
    safetensors::serialize(views, metadata.map(|m| m.into_iter().collect()))
        .expect("serialize a seed")
}

fn read_st(path: &Path) -> Vec<Raw> {
    let bytes = std::fs::read(path).expect("fixture");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("fixture safetensors");
    let mut out: Vec<Raw> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn with_nul(text: &[u8], binary: &[u8]) -> Vec<u8> {
    let mut v = text.to_vec();
    v.push(0);
    v.extend_from_slice(binary);
    v
}

fn ramp(n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 37 % 101) as f32 / 101.0 - 0.5) * scale)
        .collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
        .collect()
}

fn quant_raw(key: &str, shape: &[usize], cfg: &QuantConfig) -> Vec<Raw> {
    let ctx = Ctx::cpu();
    let n: usize = shape.iter().product();
    let w = Tensor::from_slice(&ctx, &ramp(n, 0.2), shape).expect("weight");
    let q = QuantizedTensor::quantize(&ctx, &w, cfg).expect("quantize a seed weight");
    let parts = match cfg {
        QuantConfig::Hqq(_) => llmft_quant::io::hqq_state_dict(key, &q),
        _ => llmft_quant::io::bnb_state_dict(key, &q),
    }
    .expect("state dict");
    parts
        .into_iter()
        .map(|(k, t)| (k, t.dtype, t.shape, t.data))
        .collect()
}

/// The tiny model's weights, `bf16` or f32, with `quantized` weights
/// replaced by their bnb/hqq parts.
fn tiny_weights(bf16: bool, quantized: &[(&str, QuantConfig)]) -> Vec<Raw> {
    let c = tiny_model();
    let mut out = Vec::new();
    for u in 0..c.num_units() {
        for (k, (name, shape)) in c.unit_tensors(u).into_iter().enumerate() {
            if let Some((_, cfg)) = quantized.iter().find(|(n, _)| *n == name) {
                out.extend(quant_raw(&name, &shape, cfg));
                continue;
            }
            let v = ramp(shape.iter().product(), 0.1 + k as f32 * 0.01);
            let (dt, bytes) = if bf16 {
                (Dtype::BF16, bf16_bytes(&v))
            } else {
                (Dtype::F32, f32_bytes(&v))
            };
            out.push((name, dt, shape, bytes));
        }
    }
    out
}

fn write_seeds(target: &str, seeds: Vec<(&str, Vec<u8>)>) {
    let dir = fuzz_dir().join("corpus").join(target);
    std::fs::create_dir_all(&dir).expect("corpus folder");
    for old in files_in(&dir) {
        if old
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("seed-"))
        {
            std::fs::remove_file(old).expect("remove an old seed");
        }
    }
    for (name, bytes) in seeds {
        std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write a seed");
    }
}

fn fixture(rel: &str) -> Vec<u8> {
    std::fs::read(repo().join(rel)).unwrap_or_else(|e| panic!("fixture {rel}: {e}"))
}

fn hqq4() -> QuantConfig {
    QuantConfig::Hqq(llmft_quant::hqq::HqqConfig::new(4))
}

#[test]
#[ignore = "rewrites the seed corpora; run by hand after changing a harness"]
fn write_seed_corpora() {
    // safetensors_index: byte 0 = mode; single file, sharded, quantized.
    let q = "model.layers.0.self_attn.q_proj.weight";
    let gate = "model.layers.0.mlp.gate_proj.weight";
    let single = st_bytes(&tiny_weights(false, &[]), None);
    let mut seeds = vec![
        ("single-f32", [&[0u8][..], &single].concat()),
        ("single-nf4", [&[2u8][..], &single].concat()),
        (
            "single-bf16",
            [&[4u8][..], &st_bytes(&tiny_weights(true, &[]), None)].concat(),
        ),
        (
            "prequantized",
            [
                &[0u8][..],
                &st_bytes(
                    &tiny_weights(
                        true,
                        &[
                            (q, QuantConfig::nf4_double_quant()),
                            ("model.layers.0.self_attn.k_proj.weight", QuantConfig::fp4()),
                            (
                                "model.layers.0.self_attn.v_proj.weight",
                                QuantConfig::int8(),
                            ),
                            (gate, hqq4()),
                        ],
                    ),
                    None,
                ),
            ]
            .concat(),
        ),
    ];
    let names: Vec<String> = tiny_weights(false, &[]).into_iter().map(|t| t.0).collect();
    let map: serde_json::Map<String, serde_json::Value> = names
        .iter()
        .map(|n| {
            let f = if n.contains("layers.0.mlp") {
                "model-00002-of-00002.safetensors"
            } else {
                "model-00001-of-00002.safetensors"
            };
            (n.clone(), serde_json::Value::from(f))
        })
        .collect();
    let index = serde_json::json!({"metadata": {"total_size": single.len()}, "weight_map": map});
    seeds.push((
        "sharded",
        [&[1u8][..], &with_nul(index.to_string().as_bytes(), &single)].concat(),
    ));
    write_seeds("safetensors_index", seeds);

    // model_config: the fixtures' config.json files.
    write_seeds(
        "model_config",
        vec![
            (
                "llama3",
                fixture("crates/models/fixtures/llama3/config.json"),
            ),
            ("qwen2", fixture("crates/models/fixtures/qwen2/config.json")),
            ("qwen3", fixture("crates/models/fixtures/qwen3/config.json")),
            ("demo", fixture("crates/cli/demo/config.json")),
            (
                "tiny",
                llmft_tests::fuzz::TINY_MODEL_CONFIG.as_bytes().to_vec(),
            ),
        ],
    );

    // layered_config: byte 0 = 0 TOML, 1 YAML, 2 JSON; then NUL and --set lines.
    let demo = fixture("crates/cli/demo/demo.toml");
    let sets = b"train.lr=2e-4\nlora.r=8\nlora.target_modules=[\"q_proj\", \"v_proj\"]\nmodel.quant=\"nf4\"\ndata.cutoff_len=512";
    let yaml = b"model:\n  path: ./model\n  dtype: bf16\nlora:\n  r: 16\n  lora_alpha: 32\n  target_modules: [q_proj, k_proj]\ntrain:\n  lr: 0.0001\n  max_steps: 10\ndata:\n  train: [data.jsonl]\n  cutoff_len: 256\n";
    let json = br#"{"model": {"path": "m", "quant": "hqq4"}, "train": {"train_type": "qlora", "max_steps": 3}, "offload": {"params": true}, "dist": {"strategy": "full_shard"}}"#;
    let mut seeds = vec![
        ("demo", [&[0u8][..], &demo].concat()),
        ("demo-sets", [&[0u8][..], &with_nul(&demo, sets)].concat()),
        ("yaml", [&[1u8][..], yaml].concat()),
        ("json", [&[2u8][..], json].concat()),
    ];
    let examples: Vec<(String, Vec<u8>)> = files_in(&repo().join("examples"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .map(|p| {
            let n = p.file_stem().unwrap().to_string_lossy().into_owned();
            (n, [&[0u8][..], &std::fs::read(&p).unwrap()].concat())
        })
        .collect();
    seeds.extend(examples.iter().map(|(n, b)| (n.as_str(), b.clone())));
    write_seeds("layered_config", seeds);

    // dataset_records: byte 0 = ext | format << 2, byte 1 = template, then
    // template text, NUL, records.
    let builtins = llmft_tests::fuzz::BUILTIN_TEMPLATES.len() as u8;
    let (jinja, custom, fixtures0) = (builtins, builtins + 1, builtins + 2);
    let conv = fixture("crates/data/fixtures/chat/conversations.jsonl");
    let alpaca = fixture("crates/data/fixtures/formats/alpaca.json");
    let messages = fixture("crates/data/fixtures/formats/messages.jsonl");
    let parquet = fixture("crates/data/fixtures/formats/sharegpt.parquet");
    let text = fixture("crates/data/fixtures/formats/text.txt");
    let cfg: serde_json::Value = serde_json::from_slice(&fixture(
        "crates/data/fixtures/chat/qwen2.5/tokenizer_config.json",
    ))
    .unwrap();
    let qwen_template = cfg["chat_template"].as_str().unwrap().as_bytes().to_vec();
    let custom_json = br#"{"prefix": "{bos}", "system": "<<SYS>>{content}<</SYS>>", "user": "[INST] {content} [/INST]", "assistant": " {content} {eos}", "separator": "\n", "eos": "</s>", "system_in_first_user": true}"#;
    let rec = |ext: u8, format: u8, t: u8, body: &[u8]| {
        [&[ext | (format << 2), t][..], &with_nul(&[], body)].concat()
    };
    let mut seeds = vec![
        ("alpaca-json", rec(1, 1, 0, &alpaca)),
        ("messages-llama3", rec(0, 3, 2, &messages)),
        ("sharegpt-parquet", rec(3, 2, 3, &parquet)),
        ("text-txt", rec(2, 4, 0, &text)),
        ("auto-chatml", rec(0, 0, 3, &conv)),
        (
            "jinja-input",
            [&[0u8, jinja][..], &with_nul(&qwen_template, &conv)].concat(),
        ),
        (
            "custom-input",
            [&[0u8, custom][..], &with_nul(custom_json, &messages)].concat(),
        ),
    ];
    let fixture_names = [
        "fx-llama3",
        "fx-mistral",
        "fx-qwen2",
        "fx-qwen25",
        "fx-qwen3",
        "fx-chatml",
        "fx-gen-llama3",
        "fx-gen-qwen25",
        "fx-zephyr",
    ];
    for (i, n) in fixture_names.iter().enumerate() {
        // Mistral's template refuses these records' roles; no seed for it.
        if *n == "fx-mistral" {
            continue;
        }
        let seed = rec(0, 0, fixtures0 + i as u8, &conv);
        seeds.push((n, seed));
    }
    write_seeds("dataset_records", seeds);

    // peft_adapter: adapter_config.json, NUL, adapter_model.safetensors.
    let adapter = |dir: &str| {
        with_nul(
            &fixture(&format!("{dir}/adapter_config.json")),
            &fixture(&format!("{dir}/adapter_model.safetensors")),
        )
    };
    write_seeds(
        "peft_adapter",
        vec![
            ("lora", adapter("crates/lora/fixtures/lora_peft_lora")),
            ("rslora", adapter("crates/lora/fixtures/lora_peft_rslora")),
            ("dora", adapter("crates/lora/fixtures/lora_peft_dora")),
            (
                "llama3-lora",
                adapter("crates/lora/fixtures/models/llama3-lora"),
            ),
            (
                "llama3-dora",
                adapter("crates/lora/fixtures/models/llama3-dora"),
            ),
        ],
    );

    // quant_metadata: one module per file, from the fixtures transformers /
    // hqq wrote, and bnb/hqq parts llmft writes.
    let mut seeds: Vec<(String, Vec<u8>)> = Vec::new();
    let split_modules = |path: &str, module_of: &dyn Fn(&str) -> Option<String>| {
        let mut by: BTreeMap<String, Vec<Raw>> = BTreeMap::new();
        for t in read_st(&repo().join(path)) {
            if let Some(m) = module_of(&t.0) {
                by.entry(m).or_default().push(t);
            }
        }
        by
    };
    let bnb = split_modules("crates/quant/fixtures/bnb_linear4bit.safetensors", &|n| {
        (!n.contains("_dequant") && !n.contains("_orig"))
            .then(|| n.split(".weight").next().unwrap().to_string())
    });
    for (m, ts) in bnb {
        seeds.push((format!("bnb-{}", m.replace('.', "-")), st_bytes(&ts, None)));
    }
    let hqq = split_modules("crates/quant/fixtures/hqq_saved.safetensors", &|n| {
        (!n.ends_with(".W_r")).then(|| n.split('.').next().unwrap().to_string())
    });
    for (m, ts) in hqq {
        seeds.push((format!("hqq-{m}"), st_bytes(&ts, None)));
    }
    for (n, cfg) in [
        ("nf4", QuantConfig::nf4()),
        ("nf4-dq", QuantConfig::nf4_double_quant()),
        ("fp4", QuantConfig::fp4()),
        ("int8", QuantConfig::int8()),
        ("hqq4", hqq4()),
        (
            "hqq3",
            QuantConfig::Hqq(llmft_quant::hqq::HqqConfig::new(3)),
        ),
        (
            "hqq2",
            QuantConfig::Hqq(llmft_quant::hqq::HqqConfig::new(2)),
        ),
    ] {
        seeds.push((
            format!("llmft-{n}"),
            st_bytes(&quant_raw("layer.weight", &[8, 64], &cfg), None),
        ));
    }
    write_seeds(
        "quant_metadata",
        seeds.iter().map(|(n, b)| (n.as_str(), b.clone())).collect(),
    );

    // checkpoint_manifest: trainer_state.json, NUL, optimizer.safetensors.
    let state = llmft_trainer::TrainerState {
        format: "llmft-checkpoint-v1".into(),
        step: 4,
        optimizer_step: 4,
        seed: 42,
        cursor: Some(llmft_data::Cursor { epoch: 1, index: 2 }),
        next_lr: 1e-4,
        train_type: Some(llmft_trainer::TrainType::Lora),
        loss_scale: Some(1024.0),
        loss_scale_clean_steps: 3,
        world_size: Some(2),
        optimizer_sharded: true,
    };
    let state_json = serde_json::to_vec_pretty(&state).unwrap();
    let moments: Vec<Raw> = ["a.lora_A.weight", "a.lora_B.weight"]
        .iter()
        .flat_map(|p| {
            [".exp_avg", ".exp_avg_sq"].map(|s| {
                (
                    format!("{p}{s}"),
                    Dtype::F32,
                    vec![2, 3],
                    f32_bytes(&ramp(6, 1e-3)),
                )
            })
        })
        .collect();
    let optimizer = st_bytes(
        &moments,
        Some(BTreeMap::from([("step".to_string(), "4".to_string())])),
    );
    let old_state = br#"{"format": "llmft-checkpoint-v1", "step": 4, "optimizer_step": 3, "seed": 42, "cursor": null, "next_lr": 0.001}"#;
    write_seeds(
        "checkpoint_manifest",
        vec![
            ("lora", with_nul(&state_json, &optimizer)),
            ("v1-state", with_nul(old_state, &optimizer)),
            ("no-optimizer", state_json.clone()),
        ],
    );
}
