//! Chat templates with `{% generation %}` blocks.
//!
//! Acceptance 1: rendered text, token ids and assistant masks equal
//! transformers' `apply_chat_template(..., return_dict=True,
//! return_assistant_tokens_mask=True)` on four templates with generation
//! markers (fixtures made by scripts/fixtures/data_make_fixtures.py).
//! Acceptance 2: a template with markers renders exactly as the same
//! template with the markers replaced by a no-op block.

use std::path::{Path, PathBuf};

use llmft_data::{
    ChatTemplate, Conversation, DataConfig, Encoder, Example, JinjaTemplate, Location, MaskRule,
    Message, ModelTokenizer, Role, TemplateConfig, IGNORE_INDEX,
};
use proptest::prelude::*;
use serde_json::Value;

mod common;
use common::read_jsonl;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/chat_gen")
}

const MODELS: [&str; 4] = ["chatml", "llama3", "qwen2.5", "zephyr"];

fn role(name: &str) -> Role {
    match name {
        "system" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        other => panic!("role {other}"),
    }
}

/// The fixture conversations with their `add_generation_prompt`.
fn conversations() -> Vec<(Conversation, bool)> {
    read_jsonl(&fixtures().join("conversations.jsonl"))
        .iter()
        .map(|v| {
            let messages = v["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    Message::new(
                        role(m["role"].as_str().unwrap()),
                        m["content"].as_str().unwrap(),
                    )
                })
                .collect();
            let conv = Conversation {
                messages,
                field: "messages".into(),
            };
            (conv, v["add_generation_prompt"].as_bool().unwrap())
        })
        .collect()
}

fn tokenizer(model: &str) -> ModelTokenizer {
    let config = fixtures().join(model).join("tokenizer_config.json");
    ModelTokenizer::from_files(fixtures().join("tokenizer.json"), Some(&config)).unwrap()
}

fn encoder(model: &str) -> Encoder {
    let config = DataConfig {
        template: TemplateConfig::Model,
        cutoff_len: 1 << 20,
        ..DataConfig::default()
    };
    Encoder::new(&config, tokenizer(model)).unwrap()
}

fn jinja(enc: &Encoder) -> &JinjaTemplate {
    match enc.template() {
        ChatTemplate::Jinja(t) => t,
        other => panic!("expected a Jinja template, got {other:?}"),
    }
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Compares every fixture conversation; the number compared.
fn check(model: &str) -> usize {
    let enc = encoder(model);
    let t = jinja(&enc);
    assert!(t.has_generation_blocks());
    let expected = read_jsonl(&fixtures().join(model).join("expected.jsonl"));
    let convs = conversations();
    assert_eq!(convs.len(), expected.len());
    let mut trained_somewhere = 0;
    for (i, ((conv, agp), want)) in convs.iter().zip(&expected).enumerate() {
        let rendered = t.render_conversation(conv, *agp).unwrap();
        assert_eq!(rendered.rule, MaskRule::Overlap);
        assert_eq!(
            rendered.text,
            want["text"].as_str().unwrap(),
            "{model} #{i}: text"
        );
        let chat = enc.tokenize_chat(&rendered).unwrap();
        assert_eq!(chat.ids, u32s(&want["input_ids"]), "{model} #{i}: ids");
        let mask: String = chat
            .trained
            .iter()
            .map(|&t| if t { '1' } else { '0' })
            .collect();
        assert_eq!(
            mask,
            want["assistant_masks"].as_str().unwrap(),
            "{model} #{i}: mask"
        );
        trained_somewhere += usize::from(mask.contains('1'));
        if *agp {
            continue;
        }
        // The training path (no generation prompt): the same ids, labels on
        // exactly the mask.
        let at = Location {
            path: fixtures().join("conversations.jsonl").into(),
            line: i as u64 + 1,
        };
        let out = enc.encode(&Example::Chat(conv.clone()), &at).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].input_ids, chat.ids);
        for (l, (&id, &t)) in out[0].labels.iter().zip(chat.ids.iter().zip(&chat.trained)) {
            assert_eq!(*l, if t { id as i32 } else { IGNORE_INDEX });
        }
    }
    assert!(trained_somewhere >= convs.len() - 2, "{model}");
    convs.len()
}

#[test]
fn chatml_generation_blocks_match_transformers() {
    // Markers on lines of their own: trim_blocks eats the newline after each.
    assert_eq!(check("chatml"), 52);
}

#[test]
fn llama3_generation_blocks_match_transformers() {
    assert_eq!(check("llama3"), 52);
}

#[test]
fn qwen25_generation_blocks_match_transformers() {
    assert_eq!(check("qwen2.5"), 52);
}

#[test]
fn zephyr_generation_blocks_match_transformers() {
    assert_eq!(check("zephyr"), 52);
}

/// `source` with its generation markers replaced by `{% if true %}` /
/// `{% endif %}`, whitespace modifiers kept.
fn noop_markers(source: &str) -> String {
    let mut out = String::new();
    let mut rest = source;
    while let Some(open) = rest.find("{%") {
        let close = open + rest[open..].find("%}").unwrap() + 2;
        let tag = &rest[open..close];
        let inner = &tag[2..tag.len() - 2];
        let modifier = |c: Option<char>| match c {
            Some(c @ ('-' | '+')) => c.to_string(),
            _ => String::new(),
        };
        let (lmod, rmod) = (
            modifier(inner.chars().next()),
            modifier(inner.chars().last()),
        );
        let word = inner.trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..open]);
        match word {
            "generation" => out.push_str(&format!("{{%{lmod} if true {rmod}%}}")),
            "endgeneration" => out.push_str(&format!("{{%{lmod} endif {rmod}%}}")),
            _ => out.push_str(tag),
        }
        rest = &rest[close..];
    }
    out.push_str(rest);
    out
}

/// Templates for the property: the four fixture templates and small ones
/// with every whitespace modifier on the markers, in the positions where
/// `trim_blocks` and `lstrip_blocks` act.
fn templates() -> Vec<String> {
    let mut ts: Vec<String> = MODELS
        .iter()
        .map(|m| tokenizer(m).chat_template().unwrap().to_string())
        .collect();
    let body = |open: &str, close: &str| {
        format!(
            "{{% for m in messages %}}\n<{{{{ m.role }}}}>\n{{% if m.role == 'assistant' %}}\n  {open}\n  {{{{ m.content }}}}|end\n  {close}\n  after\n{{% else %}}\n{{{{ m.content }}}}\n{{% endif %}}\n{{% endfor %}}\n{{% if add_generation_prompt %}}\n<assistant>\n{{% endif %}}"
        )
    };
    for open in [
        "{% generation %}",
        "{%- generation %}",
        "{% generation -%}",
        "{%+ generation %}",
        "{% generation +%}",
        "{%-generation-%}",
    ] {
        for close in [
            "{% endgeneration %}",
            "{%- endgeneration %}",
            "{% endgeneration -%}",
            "{%+ endgeneration +%}",
        ] {
            ts.push(body(open, close));
        }
    }
    ts.push("{%- for m in messages -%}\n\t{%- if m.role == 'assistant' %}\t{% generation %} {{ m.content }} {% endgeneration %}\t{% else %}{{ m.content | trim }}\n{% endif %}\n{% endfor %}".into());
    ts
}

fn arb_text() -> impl Strategy<Value = String> {
    let edge = prop::collection::vec(
        prop::sample::select(vec![" ", "\t", "\n", "\n\n", "\r\n"]),
        0..3,
    )
    .prop_map(|v| v.concat());
    let core = prop::collection::vec(
        prop::sample::select(vec![
            "a",
            "word",
            " ",
            "\t",
            "\n",
            "é",
            "e\u{301}",
            "東京",
            "👨\u{200d}👩\u{200d}👧",
            "```",
            "{",
            "%}",
            "<|im_end|>",
        ]),
        0..8,
    )
    .prop_map(|v| v.concat());
    (edge.clone(), core, edge).prop_map(|(a, b, c)| format!("{a}{b}{c}"))
}

fn arb_conversation() -> impl Strategy<Value = Vec<(Role, String)>> {
    let role = prop::sample::select(vec![Role::System, Role::User, Role::Assistant]);
    prop::collection::vec((role, arb_text()), 1..9)
}

fn compiled() -> &'static [(JinjaTemplate, JinjaTemplate)] {
    static T: std::sync::OnceLock<Vec<(JinjaTemplate, JinjaTemplate)>> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        templates()
            .iter()
            .map(|src| {
                let marked = JinjaTemplate::new("marked", src, Some("<s>"), Some("</s>")).unwrap();
                assert!(marked.has_generation_blocks(), "{src}");
                let plain = noop_markers(src);
                assert!(!plain.contains("generation %}"), "{plain}");
                let plain = JinjaTemplate::new("plain", &plain, Some("<s>"), Some("</s>")).unwrap();
                assert!(!plain.has_generation_blocks());
                (marked, plain)
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn markers_render_as_a_no_op_block(
        msgs in arb_conversation(),
        add_generation_prompt in any::<bool>(),
    ) {
        let conv = Conversation {
            messages: msgs.iter().map(|(r, c)| Message::new(*r, c.as_str())).collect(),
            field: "messages".into(),
        };
        let values: Vec<minijinja::Value> =
            conv.messages.iter().map(minijinja::Value::from_serialize).collect();
        for (i, (marked, plain)) in compiled().iter().enumerate() {
            let want = plain.render(&values, add_generation_prompt).unwrap();
            let got = marked.render_conversation(&conv, add_generation_prompt).unwrap();
            prop_assert_eq!(&got.text, &want, "template {}", i);
            prop_assert_eq!(&marked.render(&values, add_generation_prompt).unwrap(), &want);
            // Spans are sorted, disjoint and on char boundaries.
            let mut end = 0;
            for s in &got.spans {
                prop_assert!(end <= s.start && s.start <= s.end && s.end <= got.text.len());
                prop_assert!(got.text.is_char_boundary(s.start) && got.text.is_char_boundary(s.end));
                end = s.end;
            }
        }
    }
}
