//! Throughput of the data pipeline: read JSONL + format + chat template
//! (the model's Jinja template, prefix-rendered for masks) + tokenize +
//! mask + pack into batches, in tokens per second.
//!
//! Run: cargo bench -p llmft-data --bench pipeline

use std::hint::black_box;
use std::io::Write;
use std::path::{Path, PathBuf};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use llmft_data::{DataConfig, DatasetSpec, Loader, ModelTokenizer, Pipeline, Shard, SplitMix64};

const WORDS: &[&str] = &[
    "the",
    "model",
    "learns",
    "to",
    "answer",
    "questions",
    "about",
    "rivers",
    "mountains",
    "weather",
    "and",
    "code",
    "fine-tuning",
    "adapts",
    "a",
    "pretrained",
    "network",
    "gradient",
    "descent",
    "moves",
    "parameters",
    "against",
    "loss",
    "capital",
    "France",
    "Paris",
    "spider",
    "eight",
    "legs",
    "translate",
    "German",
    "morning",
    "poem",
    "sea",
    "waves",
    "grey",
    "gulls",
    "fly",
    "away",
    "function",
    "returns",
    "sum",
    "numbers",
    "42",
    "2048",
    "3.14",
    "café",
    "naïve",
    "東京",
    "🙂",
    "explain",
    "briefly",
    "sentence",
    "summary",
    "text",
    "please",
    "thanks",
    "welcome",
];

fn sentence(rng: &mut SplitMix64, words: usize) -> String {
    let mut s = String::new();
    for i in 0..words {
        if i > 0 {
            s.push(if rng.below(12) == 0 { '\n' } else { ' ' });
        }
        s.push_str(WORDS[rng.below(WORDS.len())]);
        if rng.below(10) == 0 {
            s.push_str([",", ".", "?", "!"][rng.below(4)]);
        }
    }
    s
}

/// A JSONL file of `n` multi-turn conversations (1-3 turns, some with a
/// system prompt), deterministic.
fn write_data(path: &Path, n: usize) {
    let mut rng = SplitMix64::new(1, 0, 0);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for _ in 0..n {
        let mut messages = Vec::new();
        if rng.below(3) == 0 {
            messages.push(serde_json::json!({"role": "system", "content": sentence(&mut rng, 12)}));
        }
        for _ in 0..1 + rng.below(3) {
            let q = 8 + rng.below(60);
            let a = 20 + rng.below(220);
            messages.push(serde_json::json!({"role": "user", "content": sentence(&mut rng, q)}));
            messages
                .push(serde_json::json!({"role": "assistant", "content": sentence(&mut rng, a)}));
        }
        writeln!(f, "{}", serde_json::json!({ "messages": messages })).unwrap();
    }
}

fn pipeline(model: &str, train: &Path) -> Pipeline {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/chat")
        .join(model);
    let config = DataConfig {
        train: vec![DatasetSpec::new(train.to_string_lossy())],
        cutoff_len: 2048,
        ..DataConfig::default()
    };
    Pipeline::new(config, ModelTokenizer::from_dir(dir).unwrap()).unwrap()
}

/// Load + encode everything, then build every packed batch of one epoch.
fn run(p: &Pipeline) -> usize {
    let data = p.load().unwrap();
    let mut loader = Loader::new(&data.train, p.config(), Shard::single()).unwrap();
    let mut tokens = 0;
    for i in 0..loader.batches_in_epoch(0) {
        tokens += black_box(loader.batch_at(0, i).unwrap()).num_tokens();
    }
    tokens
}

fn bench(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("llmft-data-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let train = dir.join("train.jsonl");
    write_data(&train, 2000);
    let bytes = std::fs::metadata(&train).unwrap().len();

    let mut group = c.benchmark_group("pipeline");
    group.sample_size(10);
    for model in ["llama3", "qwen2.5"] {
        let p = pipeline(model, &train);
        let tokens = run(&p);
        eprintln!("{model}: {tokens} tokens from {bytes} bytes of JSONL per iteration");
        group.throughput(Throughput::Elements(tokens as u64));
        group.bench_function(format!("jsonl_template_tokenize_pack/{model}"), |b| {
            b.iter(|| run(&p))
        });
    }
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
