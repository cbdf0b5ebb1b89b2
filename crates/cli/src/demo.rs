//! The built-in demo job: a tiny Llama-architecture model with random
//! (seeded) weights, a character-level tokenizer and an instruction dataset
//! of checkable tasks, all shipped inside the binary (`crates/cli/demo/`,
//! made by `scripts/demo/make_demo.py`), and the held-out answer accuracy
//! that shows what training did.
use std::path::{Path, PathBuf};

use llmft_data::ModelTokenizer;
use llmft_models::{GenerateOpts, Model, ModelConfig};
use llmft_tensor::{Ctx, DType};

/// The demo's own settings layer (between the defaults and a config file).
pub const SETTINGS: &str = include_str!("../demo/demo.toml");

const FILES: [(&str, &str); 4] = [
    ("config.json", include_str!("../demo/config.json")),
    ("tokenizer.json", include_str!("../demo/tokenizer.json")),
    (
        "tokenizer_config.json",
        include_str!("../demo/tokenizer_config.json"),
    ),
    ("train.jsonl", include_str!("../demo/train.jsonl")),
];
const HELDOUT: &str = include_str!("../demo/heldout.jsonl");
/// Seed of the demo base model's random weights.
const WEIGHT_SEED: u64 = 7;

/// The demo's model folder and training file, written under `root`.
pub struct DemoFiles {
    /// A Hugging Face folder: config.json, tokenizer files, model.safetensors.
    pub model_dir: PathBuf,
    /// The training data (JSONL, `messages` format).
    pub train_file: PathBuf,
}

/// Writes the demo model (f32 random weights as HF safetensors) and data
/// into `root/demo/`, unless they are there already from an earlier run.
pub fn materialize(root: &Path) -> Result<DemoFiles, String> {
    let model_dir = root.join("demo").join("model");
    let train_file = root.join("demo").join("train.jsonl");
    let io = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    std::fs::create_dir_all(&model_dir).map_err(|e| io(&model_dir, e))?;
    for (name, text) in FILES {
        let path = if name.ends_with(".jsonl") {
            train_file.clone()
        } else {
            model_dir.join(name)
        };
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text) {
            std::fs::write(&path, text).map_err(|e| io(&path, e))?;
        }
    }
    if !model_dir.join("model.safetensors").is_file() {
        let cfg =
            ModelConfig::from_file(&model_dir.join("config.json")).map_err(|e| e.to_string())?;
        let cpu = Ctx::cpu();
        let model = Model::random(cfg, &cpu, DType::F32, WEIGHT_SEED).map_err(|e| e.to_string())?;
        // export_merged writes shards under a temporary name and renames;
        // the folder itself must not exist yet, so go through a sibling.
        let tmp = root.join("demo").join("weights");
        let _ = std::fs::remove_dir_all(&tmp);
        model
            .export_merged(&tmp, DType::F32, 1 << 30)
            .map_err(|e| e.to_string())?;
        for entry in std::fs::read_dir(&tmp).map_err(|e| io(&tmp, e))? {
            // The weights (and a shard index, if any); the shipped config.json stays.
            let p = entry.map_err(|e| io(&tmp, e))?.path();
            if p.file_name().is_some_and(|n| n != "config.json") {
                let dst = model_dir.join(p.file_name().expect("a file name"));
                std::fs::rename(&p, &dst).map_err(|e| io(&dst, e))?;
            }
        }
        let _ = std::fs::remove_dir_all(&tmp);
    }
    Ok(DemoFiles {
        model_dir,
        train_file,
    })
}

/// Held-out questions with their answers.
pub fn heldout() -> Vec<(String, String)> {
    HELDOUT
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            Some((
                v.get("question")?.as_str()?.to_string(),
                v.get("answer")?.as_str()?.to_string(),
            ))
        })
        .collect()
}

/// Held-out answers right, in all and per task (the question's first word).
pub struct Accuracy {
    /// Fraction right.
    pub all: f64,
    /// (task, right, asked), by task name.
    pub tasks: Vec<(String, usize, usize)>,
}

impl std::fmt::Display for Accuracy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.1}% (", 100.0 * self.all)?;
        for (i, (t, r, n)) in self.tasks.iter().enumerate() {
            write!(f, "{}{t} {r}/{n}", if i > 0 { ", " } else { "" })?;
        }
        write!(f, ")")
    }
}

/// How many held-out questions the model answers exactly (greedy decoding
/// of the chat template's prompt until the end-of-sequence token).
pub fn accuracy(
    model: &Model,
    tok: &ModelTokenizer,
    questions: &[(String, String)],
) -> Result<Accuracy, String> {
    let eos = tok.eos_id().map(|i| i as i32);
    let mut right = 0usize;
    let mut tasks: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    for (q, a) in questions {
        let prompt = format!("<s>Q: {q}\nA: ");
        let (ids, _) = tok.encode(&prompt, false).map_err(|e| e.to_string())?;
        let ids: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        let opts = GenerateOpts {
            max_new_tokens: a.chars().count() + 2,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: eos.into_iter().collect(),
        };
        let out = model.generate(&ids, &opts).map_err(|e| e.to_string())?;
        let ended = out.last().copied() == eos && eos.is_some();
        let body: Vec<u32> = out
            .iter()
            .take(out.len() - usize::from(ended))
            .map(|&i| i as u32)
            .collect();
        let text = tok.decode(&body).map_err(|e| e.to_string())?;
        let ok = usize::from(ended && text == *a);
        right += ok;
        let t = tasks
            .entry(q.split(' ').next().unwrap_or_default().to_string())
            .or_default();
        t.0 += ok;
        t.1 += 1;
    }
    Ok(Accuracy {
        all: right as f64 / questions.len().max(1) as f64,
        tasks: tasks.into_iter().map(|(k, (r, n))| (k, r, n)).collect(),
    })
}
