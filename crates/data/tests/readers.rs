//! Readers, formats, truncation, validation split and inspection on the
//! small files in fixtures/formats.

use std::path::{Path, PathBuf};

use llmft_data::{
    read_file, resolve, DataConfig, DatasetSpec, Example, Format, Location, ModelTokenizer,
    Pipeline, RecordFormat, Role, TemplateConfig, ValidationConfig, IGNORE_INDEX, TRAINED_CLOSE,
    TRAINED_OPEN,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn formats(name: &str) -> String {
    fixtures()
        .join("formats")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn pipeline(config: DataConfig) -> Pipeline {
    let tok = ModelTokenizer::from_dir(fixtures().join("chat/llama3")).unwrap();
    Pipeline::new(config, tok).unwrap()
}

fn examples(path: &str, format: Format) -> Vec<(Location, Example)> {
    let spec = DatasetSpec {
        format,
        ..DatasetSpec::new(path)
    };
    let f = RecordFormat::new(&spec);
    read_file(Path::new(path), f.text_column())
        .unwrap()
        .map(|r| {
            let r = r.unwrap();
            let ex = f.parse(&r.value, &r.at).unwrap();
            (r.at, ex)
        })
        .collect()
}

fn roles(ex: &Example) -> Vec<(Role, String)> {
    match ex {
        Example::Chat(c) => c
            .messages
            .iter()
            .map(|m| (m.role, m.content.clone()))
            .collect(),
        Example::Text(_) => panic!("not a chat"),
    }
}

#[test]
fn alpaca_json_array_with_system_and_history() {
    let ex = examples(&formats("alpaca.json"), Format::Auto);
    assert_eq!(ex.len(), 3);
    assert_eq!(ex[1].0.line, 7, "line where the second element starts");
    assert_eq!(
        roles(&ex[1].1),
        vec![
            (Role::System, "You translate.".into()),
            (Role::User, "Hi".into()),
            (Role::Assistant, "Hello!".into()),
            (Role::User, "Translate into German.\ngood morning".into()),
            (Role::Assistant, "Guten Morgen.".into()),
        ]
    );
    assert_eq!(roles(&ex[2].1)[0], (Role::User, "Add 2 and 40.".into()));
}

#[test]
fn sharegpt_parquet_rows() {
    let ex = examples(&formats("sharegpt.parquet"), Format::Sharegpt);
    assert_eq!(ex.len(), 2);
    assert_eq!(ex[1].0.line, 2, "parquet locations are row numbers");
    let r = roles(&ex[1].1);
    assert_eq!(r.len(), 5);
    assert_eq!(r[0], (Role::System, "Answer briefly.".into()));
    assert_eq!(r[4], (Role::Assistant, "You're welcome.".into()));
}

#[test]
fn custom_columns_and_tags() {
    let dir = std::env::temp_dir().join(format!("llmft-data-cols-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.jsonl");
    std::fs::write(
        &path,
        r#"{"dialog": [{"speaker": "me", "text": "hi"}, {"speaker": "bot", "text": "hello"}], "sys": "Be nice."}"#,
    )
    .unwrap();
    let spec: DatasetSpec = serde_json::from_value(serde_json::json!({
        "path": path,
        "format": "sharegpt",
        "columns": { "messages": "dialog", "system": "sys" },
        "tags": { "role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot" },
    }))
    .unwrap();
    let f = RecordFormat::new(&spec);
    let rec = read_file(&path, f.text_column())
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(
        roles(&f.parse(&rec.value, &rec.at).unwrap()),
        vec![
            (Role::System, "Be nice.".into()),
            (Role::User, "hi".into()),
            (Role::Assistant, "hello".into())
        ]
    );
}

#[test]
fn text_lines_are_trained_whole_and_chunked() {
    let config = DataConfig {
        train: vec![DatasetSpec::new(formats("text.txt"))],
        cutoff_len: 8,
        ..DataConfig::default()
    };
    let p = pipeline(config);
    let data = p.load().unwrap();
    let tok = p.encoder().tokenizer();
    // Two non-empty lines; each starts with bos (the post-processor) and ends with eos.
    assert_eq!(data.report.records, 2);
    let first = data.train.example(0);
    assert_eq!(first.input_ids[0], tok.bos_id().unwrap());
    assert!(first.labels.iter().all(|&l| l != IGNORE_INDEX));
    let last = data.train.example(data.train.len() - 1);
    assert_eq!(*last.input_ids.last().unwrap(), tok.eos_id().unwrap());
    assert!((0..data.train.len()).all(|i| data.train.example_len(i) <= 8));
    assert!(data.train.len() > 2, "long lines are split into chunks");
}

#[test]
fn directories_globs_and_max_samples() {
    let dir = fixtures().join("formats");
    let files = resolve(&dir.to_string_lossy(), None).unwrap();
    assert_eq!(files.len(), 4);
    let glob = format!("{}/*.json*", dir.display());
    let files = resolve(&glob, None).unwrap();
    let names: Vec<_> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["alpaca.json", "messages.jsonl"]);
    let config = DataConfig {
        train: vec![DatasetSpec {
            max_samples: Some(2),
            ..DatasetSpec::new(glob)
        }],
        ..DataConfig::default()
    };
    // max_samples counts per source, across its files.
    assert_eq!(pipeline(config).load().unwrap().report.records, 2);
}

#[test]
fn truncation_keeps_whole_turns_then_cuts_hard_then_drops() {
    let spec = DatasetSpec::new(
        fixtures()
            .join("chat/conversations.jsonl")
            .to_string_lossy(),
    );
    let full = pipeline(DataConfig {
        train: vec![spec.clone()],
        ..DataConfig::default()
    })
    .load()
    .unwrap();
    // Conversation 2 has three turns; allow a little more than two.
    let ex = full.train.example(2);
    let trained_runs = |labels: &[i32]| {
        labels
            .windows(2)
            .filter(|w| w[0] == IGNORE_INDEX && w[1] != IGNORE_INDEX)
            .count()
    };
    assert_eq!(trained_runs(&ex.labels), 3);
    let cut = pipeline(DataConfig {
        train: vec![spec.clone()],
        cutoff_len: ex.input_ids.len() - 3,
        ..DataConfig::default()
    })
    .load()
    .unwrap();
    let short = cut.train.example(2);
    assert!(short.truncated);
    assert_eq!(trained_runs(&short.labels), 2);
    assert_eq!(short.input_ids[..], ex.input_ids[..short.input_ids.len()]);
    assert_eq!(
        *short.labels.last().unwrap(),
        short.input_ids.last().copied().unwrap() as i32,
        "ends on a trained end-of-turn"
    );
    assert!(cut.report.truncated >= 1);
    // A cutoff inside the first answer: hard cut; inside the first prompt: dropped.
    let tiny = pipeline(DataConfig {
        train: vec![spec],
        // Conversation 0 is 30 tokens with a 22-token prompt.
        cutoff_len: 26,
        ..DataConfig::default()
    })
    .load()
    .unwrap();
    assert!(tiny.report.dropped > 0);
    assert!(!tiny.train.is_empty());
    assert_eq!(tiny.train.len() + tiny.report.dropped, 10);
    assert!((0..tiny.train.len()).all(|i| tiny.train.example_len(i) <= 26));
    assert_eq!(tiny.train.stats().truncated, tiny.train.len());
}

#[test]
fn train_on_prompt_trains_everything() {
    let data = pipeline(DataConfig {
        train: vec![DatasetSpec::new(formats("messages.jsonl"))],
        train_on_prompt: true,
        ..DataConfig::default()
    })
    .load()
    .unwrap();
    let s = data.train.stats();
    assert_eq!(s.tokens, s.trained_tokens);
}

#[test]
fn validation_by_ratio_and_by_file() {
    let spec = DatasetSpec::new(
        fixtures()
            .join("chat/conversations.jsonl")
            .to_string_lossy(),
    );
    let data = pipeline(DataConfig {
        train: vec![spec.clone()],
        validation: Some(ValidationConfig::Ratio(0.2)),
        ..DataConfig::default()
    })
    .load()
    .unwrap();
    assert_eq!(data.train.len(), 8);
    assert_eq!(data.validation.as_ref().unwrap().len(), 2);
    let data = pipeline(DataConfig {
        train: vec![spec],
        validation: Some(ValidationConfig::Datasets(vec![DatasetSpec::new(formats(
            "messages.jsonl",
        ))])),
        ..DataConfig::default()
    })
    .load()
    .unwrap();
    assert_eq!((data.train.len(), data.validation.unwrap().len()), (10, 3));
}

#[test]
fn inspect_marks_the_trained_span() {
    let p = pipeline(DataConfig {
        template: TemplateConfig::Model,
        ..DataConfig::default()
    });
    let views = p
        .inspect(&DatasetSpec::new(formats("messages.jsonl")), 1)
        .unwrap();
    let (at, v) = &views[0];
    assert_eq!(at.line, 1);
    assert!(
        v.marked.ends_with(&format!(
            "{TRAINED_OPEN}The capital of France is Paris.<|eot_id|>{TRAINED_CLOSE}"
        )),
        "{}",
        v.marked
    );
    assert!(v.to_string().contains(&format!("{} tokens", v.tokens)));
    assert!(v.trained_tokens > 0 && v.trained_tokens < v.tokens);
}

#[test]
fn config_from_json_with_defaults() {
    let c: DataConfig = serde_json::from_value(serde_json::json!({
        "train": ["a.jsonl", { "path": "owner/name", "format": "sharegpt", "split": "train" }],
        "validation": 0.1,
        "template": { "custom": { "user": "Q: {content}\nA: " } },
        "batch": { "seq_len": 4096 }
    }))
    .unwrap();
    assert_eq!(c.train[0], DatasetSpec::new("a.jsonl"));
    assert_eq!(c.train[1].format, Format::Sharegpt);
    assert_eq!(c.cutoff_len, 2048);
    assert_eq!(c.batch.batch_size, 1);
    match c.template {
        TemplateConfig::Custom(t) => {
            assert_eq!(t.user, "Q: {content}\nA: ");
            assert_eq!(t.assistant, "{content}{eos}");
        }
        other => panic!("{other:?}"),
    }
    let c: DataConfig =
        serde_json::from_value(serde_json::json!({ "template": "llama3" })).unwrap();
    assert_eq!(c.template, TemplateConfig::Llama3);
}
