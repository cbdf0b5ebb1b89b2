//! Acceptance 1: token ids and assistant masks equal those recorded from
//! transformers' `apply_chat_template` on real chat templates (fixtures made
//! by scripts/fixtures/data_make_fixtures.py).

use std::path::{Path, PathBuf};

use llmft_data::{
    DataConfig, DatasetSpec, Encoder, Error, Example, Format, Location, ModelTokenizer,
    RecordFormat, TemplateConfig, TokenizedChat, IGNORE_INDEX,
};
use serde_json::Value;

mod common;
use common::read_jsonl;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/chat")
}

fn conversations() -> Vec<(Location, Example)> {
    let path = fixtures().join("conversations.jsonl");
    let format = RecordFormat::new(&DatasetSpec {
        format: Format::Openai,
        ..DatasetSpec::new(path.to_string_lossy())
    });
    read_jsonl(&path)
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let at = Location {
                path: path.as_path().into(),
                line: i as u64 + 1,
            };
            let ex = format.parse(v, &at).unwrap();
            (at, ex)
        })
        .collect()
}

fn encoder(model: &str, template: TemplateConfig) -> Encoder {
    let tok = ModelTokenizer::from_dir(fixtures().join(model)).unwrap();
    let config = DataConfig {
        template,
        cutoff_len: 1 << 20,
        ..DataConfig::default()
    };
    Encoder::new(&config, tok).unwrap()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Compares every conversation; `only` filters which ones apply.
fn check(model: &str, template: TemplateConfig, only: impl Fn(&Example) -> bool) -> usize {
    let enc = encoder(model, template);
    let expected = read_jsonl(&fixtures().join(model).join("expected.jsonl"));
    let mut compared = 0;
    for ((at, ex), want) in conversations().iter().zip(&expected) {
        if !only(ex) {
            continue;
        }
        compared += 1;
        if let Some(message) = want.get("error") {
            match enc.render(ex, at) {
                Err(Error::TemplateRender {
                    message: got,
                    field,
                    ..
                }) => {
                    assert_eq!(got, message.as_str().unwrap(), "{model} {at}");
                    assert_eq!(field, "messages");
                }
                other => panic!("{model} {at}: expected a template error, got {other:?}"),
            }
            continue;
        }
        let rendered = enc.render(ex, at).unwrap();
        assert_eq!(
            rendered.text,
            want["text"].as_str().unwrap(),
            "{model} {at}: text"
        );
        let TokenizedChat { ids, trained, .. } = enc.tokenize_chat(&rendered).unwrap();
        assert_eq!(ids, u32s(&want["input_ids"]), "{model} {at}: ids");
        let mask: Vec<u32> = trained.iter().map(|&t| u32::from(t)).collect();
        assert_eq!(mask, u32s(&want["assistant_mask"]), "{model} {at}: mask");
        // The full encode path gives the same ids and labels on exactly the mask.
        let out = enc.encode(ex, at).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].input_ids, ids);
        for (l, (&id, &t)) in out[0].labels.iter().zip(ids.iter().zip(&trained)) {
            assert_eq!(*l, if t { id as i32 } else { IGNORE_INDEX });
        }
    }
    compared
}

fn all(_: &Example) -> bool {
    true
}

#[test]
fn llama3_jinja_matches_transformers() {
    assert_eq!(check("llama3", TemplateConfig::Model, all), 10);
}

#[test]
fn qwen2_chatml_jinja_matches_transformers() {
    assert_eq!(check("qwen2", TemplateConfig::Model, all), 10);
}

#[test]
fn qwen25_jinja_matches_transformers() {
    assert_eq!(check("qwen2.5", TemplateConfig::Model, all), 10);
}

#[test]
fn mistral_jinja_matches_transformers_including_its_errors() {
    assert_eq!(check("mistral", TemplateConfig::Model, all), 10);
}

fn has_system(ex: &Example) -> bool {
    matches!(ex, Example::Chat(c) if c.messages[0].role == llmft_data::Role::System)
}

#[test]
fn builtin_templates_match_the_model_templates() {
    // Built-in qwen is Qwen2's template exactly.
    assert_eq!(check("qwen2", TemplateConfig::Qwen, all), 10);
    // Built-in llama3 does not trim message text as the Jinja one does.
    let trimmed = |ex: &Example| match ex {
        Example::Chat(c) => c.messages.iter().all(|m| m.content.trim() == m.content),
        Example::Text(_) => false,
    };
    assert_eq!(check("llama3", TemplateConfig::Llama3, trimmed), 9);
    // Built-in mistral accepts a system prompt (the Jinja one raises).
    assert_eq!(
        check("mistral", TemplateConfig::Mistral, |ex| !has_system(ex)),
        7
    );
}

#[test]
fn no_doubled_bos_when_the_post_processor_adds_one() {
    // The llama3/mistral fixture tokenizers add a bos in their
    // post-processor; chat text already starts with one.
    for model in ["llama3", "mistral"] {
        let enc = encoder(model, TemplateConfig::Model);
        let bos = enc.tokenizer().bos_id().unwrap();
        for (at, ex) in conversations().iter().filter(|(_, ex)| !has_system(ex)) {
            let ids = &enc.encode(ex, at).unwrap()[0].input_ids;
            assert_eq!(ids[0], bos);
            assert_ne!(ids[1], bos, "{model} {at}");
        }
    }
}

#[test]
fn qwen3_jinja_matches_transformers_despite_its_think_blocks() {
    // Qwen3 renders an empty think block only on the last assistant turn,
    // so its spans come from the search fallback.
    assert_eq!(check("qwen3", TemplateConfig::Model, all), 10);
}
