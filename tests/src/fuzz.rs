//! Fuzz harnesses: one function per parser of outside input, each taking
//! arbitrary bytes and driving the same entry points `llmft` uses on real
//! files. None may panic, hang or allocate without bound on any input;
//! errors are the expected outcome for almost every input.
//!
//! The cargo-fuzz targets in `tests/fuzz/` call these (nightly), and
//! `tests/tests/fuzz_replay.rs` replays every committed corpus and
//! regression file through them (stable, in CI). [`TARGETS`] lists them.
//!
//! Inputs that hold several files put the text one (a JSON document) first,
//! then a NUL byte, then the binary one (a safetensors file); text files
//! never contain NUL, and a safetensors header always does, so the split is
//! cheap for the fuzzer to keep.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use llmft_data::{
    builtin, ChatTemplate, CustomTemplate, DatasetSpec, Example, Format, JinjaTemplate,
    RecordFormat, SegmentTemplate,
};
use llmft_lora::{Adapter, LinearShape};
use llmft_models::{load_into, ModelConfig, QuantConfig, Resident};
use llmft_quant::Code4;
use llmft_tensor::{Ctx, DType};
use safetensors::SafeTensors;

/// A harness: bytes in, never a panic; `true` when the input was accepted
/// whole (what every seed input must be).
pub type Harness = fn(&[u8]) -> bool;

/// Every fuzz target, by the name of its cargo-fuzz binary and corpus folder.
pub const TARGETS: &[(&str, Harness)] = &[
    ("safetensors_index", safetensors_index),
    ("model_config", model_config),
    ("layered_config", layered_config),
    ("dataset_records", dataset_records),
    ("peft_adapter", peft_adapter),
    ("quant_metadata", quant_metadata),
    ("checkpoint_manifest", checkpoint_manifest),
];

/// Records read from one dataset input (bounds the work per input).
const MAX_RECORDS: usize = 32;
/// `--set` values taken from one layered-config input.
const MAX_SETS: usize = 16;
/// Weights tried per quantized-metadata input.
const MAX_WEIGHTS: usize = 16;

/// `data` before its first NUL byte and, if there is one, after it.
pub fn split_nul(data: &[u8]) -> (&[u8], Option<&[u8]>) {
    match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    }
}

/// This thread's scratch folder (under /dev/shm where it exists), emptied
/// and filled with `files`. Each thread has its own, so replay tests may
/// run in parallel; the folders are removed when the thread ends.
fn folder_with(files: &[(&str, &[u8])]) -> PathBuf {
    struct Scratch(PathBuf);
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    thread_local! {
        static SCRATCH: Scratch = {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let shm = Path::new("/dev/shm");
            let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
            let dir = base.join(format!(
                "llmft-fuzz-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            Scratch(dir)
        };
    }
    SCRATCH.with(|s| {
        let dir = &s.0;
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        std::fs::create_dir_all(dir).expect("scratch folder");
        for (name, bytes) in files {
            std::fs::write(dir.join(name), bytes).expect("scratch file");
        }
        dir.clone()
    })
}

/// The tiny model the loader target loads into: Qwen3 with attention biases
/// (every kind of tensor the loader checks), 16 wide, one layer.
pub const TINY_MODEL_CONFIG: &str = r#"{
  "architectures": ["Qwen3ForCausalLM"],
  "vocab_size": 16,
  "hidden_size": 16,
  "intermediate_size": 16,
  "num_hidden_layers": 1,
  "num_attention_heads": 2,
  "num_key_value_heads": 1,
  "head_dim": 8,
  "attention_bias": true,
  "rms_norm_eps": 1e-6
}"#;

/// The parsed [`TINY_MODEL_CONFIG`].
pub fn tiny_model() -> &'static ModelConfig {
    static CONFIG: OnceLock<ModelConfig> = OnceLock::new();
    CONFIG.get_or_init(|| {
        ModelConfig::from_json(TINY_MODEL_CONFIG, Path::new("tiny/config.json"))
            .expect("the tiny config parses")
    })
}

/// Target `safetensors_index`: a model folder's weights loaded by the
/// loader (`load_into`, with its tensor-table checks: names, shapes,
/// dtypes, bnb/hqq weights) for [`tiny_model`]. Byte 0 picks the layout —
/// bit 0: a sharded checkpoint (`model.safetensors.index.json`, NUL, one
/// shard file written as both `model-0000{1,2}-of-00002.safetensors`) or a
/// single `model.safetensors`; bit 1: quantize to NF4 while loading; bit 2:
/// load in bf16 rather than f32.
pub fn safetensors_index(data: &[u8]) -> bool {
    let Some((&mode, rest)) = data.split_first() else {
        return false;
    };
    let dir = if mode & 1 == 1 {
        let (index, shard) = split_nul(rest);
        let shard = shard.unwrap_or_default();
        folder_with(&[
            ("model.safetensors.index.json", index),
            ("model-00001-of-00002.safetensors", shard),
            ("model-00002-of-00002.safetensors", shard),
        ])
    } else {
        folder_with(&[("model.safetensors", rest)])
    };
    let quant = QuantConfig::Bnb4 {
        code: Code4::Nf4,
        blocksize: 64,
        double_quant: false,
    };
    let quant = (mode & 2 == 2).then_some(&quant);
    let dtype = if mode & 4 == 4 {
        DType::BF16
    } else {
        DType::F32
    };
    let config = tiny_model();
    let ctx = Ctx::cpu();
    let mut builder = Resident::builder(&ctx, config.num_units());
    let Ok(index) = load_into(&dir, config, &ctx, dtype, quant, builder.as_mut()) else {
        return false;
    };
    let Ok(store) = builder.finish() else {
        return false;
    };
    llmft_models::Model::new(config.clone(), &ctx, dtype, store, index).is_ok()
}

/// Target `model_config`: a Hugging Face `config.json` parsed into a model
/// config, then the shapes the loader derives from it.
pub fn model_config(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let Ok(c) = ModelConfig::from_json(text, Path::new("config.json")) else {
        return false;
    };
    let _ = (c.q_dim(), c.kv_dim());
    let units = c.num_units();
    for u in [0, 1, units - 1] {
        let _ = c.unit_tensors(u);
    }
    // What `llmft` writes back must parse again.
    let again = ModelConfig::from_json(&c.to_hf_json().to_string(), Path::new("again.json"));
    assert!(again.is_ok(), "a written config does not parse: {again:?}");
    true
}

/// Target `layered_config`: `llmft`'s layered configuration. Byte 0 picks
/// the file type (TOML, YAML, JSON); the rest is the file, then
/// optionally NUL and `--set key=value` lines.
pub fn layered_config(data: &[u8]) -> bool {
    let Some((&kind, rest)) = data.split_first() else {
        return false;
    };
    let (file, sets) = split_nul(rest);
    let name = ["config.toml", "config.yaml", "config.json"][kind as usize % 3];
    let sets: Vec<String> = sets
        .map(|s| {
            String::from_utf8_lossy(s)
                .lines()
                .take(MAX_SETS)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    let dir = folder_with(&[(name, file)]);
    match llmft::config::Loaded::load(Some(&dir.join(name)), &sets) {
        Ok(loaded) => !loaded.show().is_empty(),
        Err(_) => false,
    }
}

const FIXTURE_TOKENIZER_CONFIGS: &[&str] = &[
    include_str!("../../crates/data/fixtures/chat/llama3/tokenizer_config.json"),
    include_str!("../../crates/data/fixtures/chat/mistral/tokenizer_config.json"),
    include_str!("../../crates/data/fixtures/chat/qwen2/tokenizer_config.json"),
    include_str!("../../crates/data/fixtures/chat/qwen2.5/tokenizer_config.json"),
    include_str!("../../crates/data/fixtures/chat/qwen3/tokenizer_config.json"),
    include_str!("../../crates/data/fixtures/chat_gen/chatml/tokenizer_config.json"),
    include_str!("../../crates/data/fixtures/chat_gen/llama3/tokenizer_config.json"),
    include_str!("../../crates/data/fixtures/chat_gen/qwen2.5/tokenizer_config.json"),
    include_str!("../../crates/data/fixtures/chat_gen/zephyr/tokenizer_config.json"),
];

/// The built-in templates, by name.
pub const BUILTIN_TEMPLATES: &[&str] = &[
    "alpaca", "llama2", "llama3", "chatml", "qwen", "mistral", "vicuna", "tigerbot",
];

const BOS: Option<&str> = Some("<s>");
const EOS: Option<&str> = Some("</s>");

/// The Jinja chat templates of the repo's tokenizer fixtures, compiled once.
fn fixture_templates() -> &'static [JinjaTemplate] {
    static TEMPLATES: OnceLock<Vec<JinjaTemplate>> = OnceLock::new();
    TEMPLATES.get_or_init(|| {
        FIXTURE_TOKENIZER_CONFIGS
            .iter()
            .map(|text| {
                let v: serde_json::Value = serde_json::from_str(text).expect("fixture json");
                let source = v["chat_template"].as_str().expect("fixture template");
                JinjaTemplate::new("fixture", source, BOS, EOS).expect("fixture template compiles")
            })
            .collect()
    })
}

/// Target `dataset_records`: a dataset file read record by record, each
/// record parsed in a LLaMA-Factory format and rendered by a chat template.
/// Byte 0: bits 0–1 the file type (`.jsonl`, `.json`, `.txt`,
/// `.parquet`), bits 2–4 the format (auto, alpaca, sharegpt, openai, text).
/// Byte 1 picks the template: a built-in one, a Jinja template or a custom
/// template (JSON) from the input, or one of the fixtures' Jinja templates.
/// The rest is the template text (when the input supplies it), NUL, then
/// the records file.
pub fn dataset_records(data: &[u8]) -> bool {
    let [mode, pick, rest @ ..] = data else {
        return false;
    };
    let (template_text, records) = match split_nul(rest) {
        (t, Some(r)) => (t, r),
        (r, None) => (&[][..], r),
    };
    let ext = ["jsonl", "json", "txt", "parquet"][(mode & 3) as usize];
    let format = [
        Format::Auto,
        Format::Alpaca,
        Format::Sharegpt,
        Format::Openai,
        Format::Text,
    ][((mode >> 2) % 5) as usize];
    let pick = *pick as usize % (BUILTIN_TEMPLATES.len() + 2 + FIXTURE_TOKENIZER_CONFIGS.len());
    let owned;
    let template: &dyn Fn(&llmft_data::Conversation) -> Result<(), String> =
        if pick < BUILTIN_TEMPLATES.len() {
            let t = builtin(BUILTIN_TEMPLATES[pick]).expect("a built-in template");
            let Ok(t) = SegmentTemplate::new(BUILTIN_TEMPLATES[pick], &t, BOS, EOS) else {
                return false;
            };
            owned = ChatTemplate::Segments(t);
            &|c| owned.render(c).map(drop)
        } else if pick == BUILTIN_TEMPLATES.len() {
            let Ok(source) = std::str::from_utf8(template_text) else {
                return false;
            };
            let Ok(t) = JinjaTemplate::new("fuzz", source, BOS, EOS) else {
                return false;
            };
            owned = ChatTemplate::Jinja(t);
            &|c| {
                if let ChatTemplate::Jinja(t) = &owned {
                    t.render_conversation(c, true)?;
                }
                owned.render(c).map(drop)
            }
        } else if pick == BUILTIN_TEMPLATES.len() + 1 {
            let Ok(custom) = serde_json::from_slice::<CustomTemplate>(template_text) else {
                return false;
            };
            let Ok(t) = SegmentTemplate::new("custom", &custom, BOS, None) else {
                return false;
            };
            owned = ChatTemplate::Segments(t);
            &|c| owned.render(c).map(drop)
        } else {
            let t = &fixture_templates()[pick - BUILTIN_TEMPLATES.len() - 2];
            &|c| {
                t.render_conversation(c, true)?;
                t.render_chat(c).map(drop)
            }
        };
    let name = format!("records.{ext}");
    let dir = folder_with(&[(&name, records)]);
    let spec = DatasetSpec {
        format,
        ..DatasetSpec::new(name.as_str())
    };
    let parser = RecordFormat::new(&spec);
    let Ok(iter) = llmft_data::read_file(&dir.join(&name), parser.text_column()) else {
        return false;
    };
    let mut all_fine = true;
    let mut records = 0;
    for record in iter.take(MAX_RECORDS) {
        records += 1;
        let parsed = record.and_then(|r| parser.parse(&r.value, &r.at));
        all_fine &= match parsed {
            Ok(Example::Chat(conv)) => template(&conv).is_ok(),
            Ok(Example::Text(_)) => true,
            Err(_) => false,
        };
    }
    all_fine && records > 0
}

/// The linear layers a loaded adapter may target: the PEFT fixtures' `proj`
/// (24 → 20) and those of the models fixtures' Llama (64 wide, 2 layers).
pub fn adapter_shapes() -> &'static BTreeMap<String, LinearShape> {
    static SHAPES: OnceLock<BTreeMap<String, LinearShape>> = OnceLock::new();
    SHAPES.get_or_init(|| {
        let config = ModelConfig::from_json(
            include_str!("../../crates/models/fixtures/llama3/config.json"),
            Path::new("llama3/config.json"),
        )
        .expect("the llama3 fixture config parses");
        let mut shapes = BTreeMap::new();
        shapes.insert("proj".to_string(), LinearShape::new(24, 20));
        for i in 0..config.num_layers {
            for (name, shape) in config.layer_tensors(i) {
                if let Some(module) = name.strip_suffix(".weight") {
                    if llmft_models::is_quantizable(&name) {
                        shapes.insert(module.to_string(), LinearShape::new(shape[1], shape[0]));
                    }
                }
            }
        }
        shapes
    })
}

/// Target `peft_adapter`: a PEFT adapter folder — `adapter_config.json`,
/// NUL, `adapter_model.safetensors` — loaded for [`adapter_shapes`].
pub fn peft_adapter(data: &[u8]) -> bool {
    let (config, weights) = split_nul(data);
    let dir = folder_with(&[
        (llmft_lora::CONFIG_FILE, config),
        (llmft_lora::WEIGHTS_FILE, weights.unwrap_or_default()),
    ]);
    Adapter::load(&Ctx::cpu(), &dir, adapter_shapes()).is_ok()
}

/// The weight keys a tensor name may belong to (bnb: the packed weight,
/// its `.absmax`, `.quant_map`, `.quant_state.*`, its module's `SCB`; hqq:
/// the module's `W_q`, `scale`, ...).
fn weight_keys(name: &str) -> Vec<String> {
    let mut keys = vec![name.to_string()];
    if let Some((w, _)) = name.split_once(".quant_state.") {
        keys.push(w.to_string());
    }
    for suffix in [
        ".absmax",
        ".quant_map",
        ".nested_absmax",
        ".nested_quant_map",
    ] {
        if let Some(w) = name.strip_suffix(suffix) {
            keys.push(w.to_string());
        }
    }
    if let Some(m) = name.strip_suffix("SCB") {
        keys.push(format!("{m}weight"));
    }
    if let Some((module, _)) = name.rsplit_once('.') {
        keys.push(format!("{module}.weight"));
    }
    keys
}

/// Target `quant_metadata`: a safetensors file holding bitsandbytes (NF4,
/// FP4, nested absmax, int8) or hqq weights; every weight it names is
/// detected and loaded as the loader does (CPU), and what loads is
/// dequantized.
pub fn quant_metadata(data: &[u8]) -> bool {
    let Ok(st) = SafeTensors::deserialize(data) else {
        return false;
    };
    let mut keys: Vec<String> = st
        .names()
        .iter()
        .flat_map(|n| weight_keys(n))
        .filter(|k| k.ends_with("weight"))
        .collect();
    keys.sort();
    keys.dedup();
    let ctx = Ctx::cpu();
    let mut dequantized = 0;
    for key in keys.iter().take(MAX_WEIGHTS) {
        let loaded = if llmft_quant::io::is_bnb_quantized(&st, key) {
            llmft_quant::io::load_bnb(&ctx, &st, key)
        } else if llmft_quant::io::is_hqq_quantized(&st, key) {
            llmft_quant::io::load_hqq(&ctx, &st, key)
        } else {
            continue;
        };
        if let Ok(q) = loaded {
            if q.dequantize_f32_host().is_ok() {
                dequantized += 1;
            }
        }
    }
    dequantized > 0
}

/// Target `checkpoint_manifest`: what `--resume` reads of a checkpoint
/// folder — `trainer_state.json`, NUL, `optimizer.safetensors`.
pub fn checkpoint_manifest(data: &[u8]) -> bool {
    let (state, optimizer) = split_nul(data);
    let dir = folder_with(&[
        (llmft_trainer::STATE_FILE, state),
        (llmft_trainer::OPTIMIZER_FILE, optimizer.unwrap_or_default()),
    ]);
    let state = llmft_trainer::read_state(&dir);
    if optimizer.is_none() {
        return state.is_ok();
    }
    let mut opt = llmft_trainer::Optimizer::new(&llmft_trainer::TrainConfig::default());
    let loaded = opt.load(&Ctx::cpu(), &dir.join(llmft_trainer::OPTIMIZER_FILE));
    state.is_ok() && loaded.is_ok()
}
