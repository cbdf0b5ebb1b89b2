//! Chat templates: a conversation becomes text plus the byte spans of that
//! text which are trained (the assistant turns).
//!
//! Two kinds:
//! - [`JinjaTemplate`]: a Hugging Face Jinja `chat_template`, rendered with
//!   minijinja configured like transformers (`trim_blocks`, `lstrip_blocks`,
//!   Python string methods, `raise_exception`, `strftime_now`, Python-style
//!   `tojson`).
//!   - A template that marks assistant text with `{% generation %}` …
//!     `{% endgeneration %}` (the markers transformers reads for
//!     `return_assistant_tokens_mask=True`) is trained on exactly what those
//!     blocks enclose. The markers stay block tags, so `trim_blocks`,
//!     `lstrip_blocks` and `{%-`/`-%}`/`{%+`/`+%}` treat them as Jinja does:
//!     each is rewritten to a `{% call %}` block (a macro body, scoped as
//!     transformers' `CallBlock` is) whose function wraps the body's output in
//!     two Unicode noncharacters; those are removed from the rendered text
//!     and their positions become the spans. The text is checked against a
//!     rendering without the marks (where a block renders its body as is,
//!     as in transformers), so a template that edits a block's output after
//!     rendering it is refused rather than rendered differently. A token is
//!     trained when it overlaps a span ([`MaskRule::Overlap`], transformers'
//!     rule).
//!   - Other templates do not mark assistant text, so spans come from
//!     rendering prefixes: for assistant message `i`, `before` is the
//!     conversation up to `i` with `add_generation_prompt=true` and `through`
//!     is up to and including `i` without it; the trained span is
//!     `through[len(before)..]` — the message's content and the end-of-turn
//!     text the template writes after it. When the template is not
//!     prefix-stable (it renders a message differently once later messages
//!     follow, as Qwen3's does with empty think blocks), that span text is
//!     searched in the full rendering after the previous span and the user
//!     message before it — whole, or from the message content on. A token is
//!     trained when its first byte lies in a span ([`MaskRule::FirstByte`]).
//! - [`SegmentTemplate`]: built from format strings (the built-ins and
//!   `custom`); spans are exactly the assistant format's text.
//!
//! A Jinja template is untrusted code, so each render is bounded in steps,
//! recursion, output size and value size (see [`crate::bounds`] for the
//! limits); one that hits a limit fails with a sentence naming where the
//! template came from ([`JinjaTemplate::with_origin`]) and the limit.

use std::ops::Range;

use minijinja::value::Value as JValue;
use minijinja::{Environment, ErrorKind};

use crate::bounds::{self, CappedWriter};
use crate::config::{CustomTemplate, TemplateConfig};
use crate::error::{Error, Result};
use crate::format::{Conversation, Role};
use crate::tokenizer::ModelTokenizer;

/// A conversation rendered to text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedChat {
    /// The full text.
    pub text: String,
    /// Byte ranges of `text` that are trained, sorted and disjoint: one per
    /// assistant message, or one per `{% generation %}` block.
    pub spans: Vec<Range<usize>>,
    /// Which tokens the spans train.
    pub rule: MaskRule,
}

/// Which tokens of a rendered chat its spans train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MaskRule {
    /// A token whose first byte lies in a span (spans found by prefix
    /// rendering, format-string templates, plain text).
    #[default]
    FirstByte,
    /// A token that overlaps a span, as transformers masks
    /// `{% generation %}` blocks: while a token starts at or after the end
    /// of the current span, move to the next span; the token is trained
    /// when it ends after that span's start (so a token straddling even an
    /// empty span's position is trained).
    Overlap,
}

/// A chat template of either kind.
#[derive(Debug)]
pub enum ChatTemplate {
    /// The model's (or an inline) Jinja template.
    Jinja(JinjaTemplate),
    /// A built-in or custom format-string template.
    Segments(SegmentTemplate),
}

impl ChatTemplate {
    /// The template `config` asks for, with special tokens from `tokenizer`.
    pub fn from_config(config: &TemplateConfig, tokenizer: &ModelTokenizer) -> Result<Self> {
        let bos = tokenizer.bos_token();
        let eos = tokenizer.eos_token();
        let builtin = |name: &str| -> Result<Self> {
            let t = builtin(name).expect("known built-in");
            Ok(ChatTemplate::Segments(SegmentTemplate::new(
                name, &t, bos, eos,
            )?))
        };
        match config {
            TemplateConfig::Model => {
                let source = tokenizer.chat_template().ok_or_else(|| Error::Template {
                    name: "model".into(),
                    message: format!(
                        "the tokenizer at {} has no chat_template; choose a built-in template (e.g. `template = \"chatml\"`)",
                        tokenizer.path().display()
                    ),
                })?;
                let origin = match tokenizer.chat_template_origin() {
                    Some(p) => p.display().to_string(),
                    None => format!("the tokenizer at {}", tokenizer.path().display()),
                };
                Ok(ChatTemplate::Jinja(
                    JinjaTemplate::new("model", source, bos, eos)?.with_origin(origin),
                ))
            }
            TemplateConfig::Jinja(source) => Ok(ChatTemplate::Jinja(
                JinjaTemplate::new("jinja", source, bos, eos)?
                    .with_origin("the config's inline `jinja` template"),
            )),
            TemplateConfig::Alpaca => builtin("alpaca"),
            TemplateConfig::Llama2 => builtin("llama2"),
            TemplateConfig::Llama3 => builtin("llama3"),
            TemplateConfig::Chatml => builtin("chatml"),
            TemplateConfig::Qwen => builtin("qwen"),
            TemplateConfig::Mistral => builtin("mistral"),
            TemplateConfig::Vicuna => builtin("vicuna"),
            TemplateConfig::Tigerbot => builtin("tigerbot"),
            TemplateConfig::Custom(c) => Ok(ChatTemplate::Segments(SegmentTemplate::new(
                "custom", c, bos, eos,
            )?)),
        }
    }

    /// Render `conv`; on failure, the template's message.
    pub fn render(&self, conv: &Conversation) -> std::result::Result<RenderedChat, String> {
        match self {
            ChatTemplate::Jinja(t) => t.render_chat(conv),
            ChatTemplate::Segments(t) => Ok(t.render_chat(conv)),
        }
    }
}

/// The format strings of a built-in template, by name: `alpaca`, `llama2`,
/// `llama3`, `chatml`, `qwen`, `mistral`, `vicuna`, `tigerbot`.
pub fn builtin(name: &str) -> Option<CustomTemplate> {
    let t = |prefix: &str,
             system: &str,
             default_system: &str,
             in_user: bool,
             user: &str,
             assistant: &str,
             sep: &str| CustomTemplate {
        prefix: prefix.into(),
        system: system.into(),
        default_system: default_system.into(),
        system_in_first_user: in_user,
        user: user.into(),
        assistant: assistant.into(),
        separator: sep.into(),
        eos: None,
    };
    let chatml = |default_system: &str| {
        t(
            "",
            "<|im_start|>system\n{content}<|im_end|>\n",
            default_system,
            false,
            "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
            "{content}<|im_end|>\n",
            "",
        )
    };
    Some(match name {
        "alpaca" => t(
            "{bos}",
            "{content}\n\n",
            "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
            false,
            "### Instruction:\n{content}\n\n### Response:\n",
            "{content}{eos}",
            "\n\n",
        ),
        "llama2" => t(
            "",
            "<<SYS>>\n{content}\n<</SYS>>\n\n",
            "",
            true,
            "{bos}[INST] {content} [/INST]",
            " {content} {eos}",
            "",
        ),
        "llama3" => t(
            "{bos}",
            "<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
            "",
            false,
            "<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
            "{content}<|eot_id|>",
            "",
        ),
        "chatml" => chatml(""),
        "qwen" => chatml("You are a helpful assistant."),
        "mistral" => t("{bos}", "{content}\n\n", "", true, "[INST] {content} [/INST]", "{content}{eos}", ""),
        "vicuna" => t(
            "{bos}",
            "{content} ",
            "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.",
            false,
            "USER: {content} ASSISTANT:",
            " {content}{eos}",
            "",
        ),
        // TigerBot's own prompt (its infer.py): "\n\n### Instruction:\n" + query + "\n\n### Response:\n".
        "tigerbot" => t(
            "{bos}",
            "{content}\n",
            "",
            true,
            "\n\n### Instruction:\n{content}\n\n### Response:\n",
            "{content}{eos}",
            "",
        ),
        _ => return None,
    })
}

/// A format string split around `{content}`, with `{bos}`/`{eos}` filled in.
#[derive(Debug, Clone)]
struct Piece {
    before: String,
    after: String,
}

impl Piece {
    fn new(format: &str, bos: &str, eos: &str) -> Self {
        let filled = format.replace("{bos}", bos).replace("{eos}", eos);
        match filled.split_once("{content}") {
            Some((b, a)) => Piece {
                before: b.to_string(),
                after: a.to_string(),
            },
            None => Piece {
                before: filled,
                after: String::new(),
            },
        }
    }

    fn push(&self, out: &mut String, content: &str) {
        out.push_str(&self.before);
        out.push_str(content);
        out.push_str(&self.after);
    }
}

/// A template built from format strings ([`CustomTemplate`]).
#[derive(Debug, Clone)]
pub struct SegmentTemplate {
    prefix: String,
    system: Piece,
    default_system: String,
    system_in_first_user: bool,
    user: Piece,
    assistant: Piece,
    separator: String,
}

impl SegmentTemplate {
    /// Build from format strings; `{bos}` is empty when the tokenizer has no
    /// bos token, `{eos}` is required when used.
    pub fn new(
        name: &str,
        t: &CustomTemplate,
        bos: Option<&str>,
        eos: Option<&str>,
    ) -> Result<Self> {
        let eos = t.eos.as_deref().or(eos);
        let uses_eos = [&t.prefix, &t.system, &t.user, &t.assistant, &t.separator]
            .iter()
            .any(|s| s.contains("{eos}"));
        if uses_eos && eos.is_none() {
            return Err(Error::Template {
                name: name.into(),
                message: "uses {eos} but the tokenizer has no eos_token; set `eos` in the custom template".into(),
            });
        }
        if !t.assistant.contains("{content}") {
            return Err(Error::Template {
                name: name.into(),
                message: "the assistant format must contain {content}".into(),
            });
        }
        let (bos, eos) = (bos.unwrap_or(""), eos.unwrap_or(""));
        let fill = |s: &str| s.replace("{bos}", bos).replace("{eos}", eos);
        Ok(SegmentTemplate {
            prefix: fill(&t.prefix),
            system: Piece::new(&t.system, bos, eos),
            default_system: t.default_system.clone(),
            system_in_first_user: t.system_in_first_user,
            user: Piece::new(&t.user, bos, eos),
            assistant: Piece::new(&t.assistant, bos, eos),
            separator: fill(&t.separator),
        })
    }

    /// Render a conversation; assistant formats are the trained spans.
    pub fn render_chat(&self, conv: &Conversation) -> RenderedChat {
        let mut text =
            String::with_capacity(conv.messages.iter().map(|m| m.content.len() + 64).sum());
        let mut spans = Vec::new();
        text.push_str(&self.prefix);
        let mut system = self.default_system.as_str();
        let mut pending_system = String::new();
        let mut first_user = true;
        for m in &conv.messages {
            match m.role {
                Role::System => system = &m.content,
                Role::User => {
                    if first_user {
                        if !system.is_empty() {
                            self.system.push(&mut pending_system, system);
                        }
                        if self.system_in_first_user {
                            pending_system.push_str(&m.content);
                            self.user.push(&mut text, &pending_system);
                        } else {
                            text.push_str(&pending_system);
                            self.user.push(&mut text, &m.content);
                        }
                        first_user = false;
                    } else {
                        text.push_str(&self.separator);
                        self.user.push(&mut text, &m.content);
                    }
                }
                Role::Assistant => {
                    let start = text.len();
                    self.assistant.push(&mut text, &m.content);
                    spans.push(start..text.len());
                }
            }
        }
        RenderedChat {
            text,
            spans,
            rule: MaskRule::FirstByte,
        }
    }
}

/// A Hugging Face Jinja chat template.
pub struct JinjaTemplate {
    env: Environment<'static>,
    /// Where the template came from, for errors about its limits.
    origin: String,
    bos: String,
    eos: String,
    /// Whether the template has `{% generation %}` blocks (spans come from
    /// them rather than from prefix rendering).
    marked: bool,
}

impl std::fmt::Debug for JinjaTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JinjaTemplate")
            .field("origin", &self.origin)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("marked", &self.marked)
            .finish()
    }
}

const NAME: &str = "chat_template";

/// The function a `{% generation %}` block becomes a `{% call %}` of.
const GENERATION_FN: &str = "__llmft_generation";

/// Opens the output of a `{% generation %}` block while rendering (a Unicode
/// noncharacter, reserved for a program's internal use; a message or
/// template that contains it is refused).
const GEN_OPEN: char = '\u{FDD0}';
/// Closes the output of a `{% generation %}` block while rendering.
const GEN_CLOSE: char = '\u{FDD1}';

impl JinjaTemplate {
    /// Compile `source`. `{% generation %}` … `{% endgeneration %}` blocks
    /// (transformers' assistant-mask markers), if any, become the trained
    /// spans; they render as Jinja renders them, whitespace control included.
    pub fn new(name: &str, source: &str, bos: Option<&str>, eos: Option<&str>) -> Result<Self> {
        let template_error = |message: String| Error::Template {
            name: name.into(),
            message,
        };
        if source.contains([GEN_OPEN, GEN_CLOSE]) {
            return Err(template_error(reserved_message("the template")));
        }
        let (source, marked) = rewrite_generation_tags(source);
        let source = bounds::wrap_value_builders(&source);
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(bounds::FUEL));
        env.set_recursion_limit(bounds::RECURSION);
        env.add_function(bounds::BOUNDED_FN, bounds::bounded);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<JValue, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |fmt: String| strftime_now(&fmt));
        env.add_function(GENERATION_FN, generation_block);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source)
            .map_err(|e| template_error(describe(&e)))?;
        Ok(JinjaTemplate {
            env,
            origin: format!("template `{name}`"),
            bos: bos.unwrap_or("").to_string(),
            eos: eos.unwrap_or("").to_string(),
            marked,
        })
    }

    /// Name where the template came from (a file, or what configured it)
    /// in errors about its limits; by default its name.
    pub fn with_origin(mut self, origin: impl Into<String>) -> Self {
        self.origin = origin.into();
        self
    }

    /// Whether the template marks assistant text with `{% generation %}`
    /// blocks (then they alone give the trained spans).
    pub fn has_generation_blocks(&self) -> bool {
        self.marked
    }

    /// Render messages as transformers' `apply_chat_template(tokenize=False)`.
    pub fn render(
        &self,
        messages: &[JValue],
        add_generation_prompt: bool,
    ) -> std::result::Result<String, String> {
        self.render_with(messages, add_generation_prompt, false)
    }

    /// The rendering; with `track`, each generation block's output is
    /// between [`GEN_OPEN`] and [`GEN_CLOSE`], without it the block renders
    /// its body as is (as transformers' extension does).
    fn render_with(
        &self,
        messages: &[JValue],
        add_generation_prompt: bool,
        track: bool,
    ) -> std::result::Result<String, String> {
        let tmpl = self.env.get_template(NAME).map_err(|e| describe(&e))?;
        let mut out = CappedWriter::default();
        let rendered = tmpl.render_captured_to(
            minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos,
                eos_token => &self.eos,
                __llmft_track_generation => track,
            },
            &mut out,
        );
        if let Err(e) = rendered {
            return Err(match bounds::limit_hit(&e, out.overflowed) {
                Some(limit) => format!("the template from {} {limit}", self.origin),
                None => describe(&e),
            });
        }
        // The template's pieces are strings, so its output is UTF-8.
        String::from_utf8(out.buf).map_err(|e| e.to_string())
    }

    /// Render a conversation (without a generation prompt) and find its
    /// trained spans.
    pub fn render_chat(&self, conv: &Conversation) -> std::result::Result<RenderedChat, String> {
        self.render_conversation(conv, false)
    }

    /// Render a conversation as `apply_chat_template(conv,
    /// add_generation_prompt=…)` does and find its trained spans: the
    /// `{% generation %}` blocks when the template has them (the spans and
    /// [`MaskRule::Overlap`] of `return_assistant_tokens_mask=True`), else by
    /// prefix rendering (see the module docs).
    pub fn render_conversation(
        &self,
        conv: &Conversation,
        add_generation_prompt: bool,
    ) -> std::result::Result<RenderedChat, String> {
        let messages: Vec<JValue> = conv.messages.iter().map(JValue::from_serialize).collect();
        if self.marked {
            if let Some(i) = conv
                .messages
                .iter()
                .position(|m| m.content.contains([GEN_OPEN, GEN_CLOSE]))
            {
                return Err(reserved_message(&format!("message {i}")));
            }
            let raw = self.render_with(&messages, add_generation_prompt, true)?;
            let (text, spans) = split_generation_marks(&raw)?;
            // The marks are invisible to the template unless it edits a
            // block's output after rendering it (a filter or a string method
            // on a captured block); then the text would differ from
            // transformers', and this is refused.
            if text != self.render(&messages, add_generation_prompt)? {
                return Err(UNTRACKABLE.into());
            }
            return Ok(RenderedChat {
                text,
                spans,
                rule: MaskRule::Overlap,
            });
        }
        let text = self.render(&messages, add_generation_prompt)?;
        let mut spans: Vec<Range<usize>> = Vec::new();
        let mut cursor = 0;
        for (i, m) in conv.messages.iter().enumerate() {
            match m.role {
                Role::Assistant => {}
                // Fallback searches start after the latest user message.
                Role::User => {
                    let core = m.content.trim();
                    if let Some(p) = text[cursor..].find(core) {
                        cursor += p + core.len();
                    }
                    continue;
                }
                Role::System => continue,
            }
            let before = self.render(&messages[..i], true)?;
            let through = if i + 1 == messages.len() && !add_generation_prompt {
                text.clone()
            } else {
                self.render(&messages[..=i], false)?
            };
            let Some(span_text) = through.strip_prefix(before.as_str()) else {
                return Err(format!(
                    "cannot locate assistant message {i}: rendering up to it without a generation prompt does not extend the rendering with one"
                ));
            };
            let span = if text.starts_with(&through) && before.len() >= cursor {
                before.len()..through.len()
            } else {
                locate(&text, cursor, span_text, m.content.trim()).ok_or_else(|| {
                    format!("cannot locate assistant message {i} in the rendered conversation (the template renders it differently when later messages follow)")
                })?
            };
            cursor = span.end;
            spans.push(span);
        }
        Ok(RenderedChat {
            text,
            spans,
            rule: MaskRule::FirstByte,
        })
    }
}

fn reserved_message(what: &str) -> String {
    format!(
        "{what} contains U+FDD0 or U+FDD1, which llmft reserves to track {{% generation %}} blocks"
    )
}

/// A `{% generation %}` block: its body (its `caller`), between the marks
/// when tracking.
fn generation_block(
    state: &minijinja::State,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<JValue, minijinja::Error> {
    let caller: JValue = kwargs.get("caller")?;
    kwargs.assert_all_used()?;
    let body = caller.call(state, &[])?;
    let track = state
        .lookup("__llmft_track_generation")
        .is_some_and(|v| v.is_true());
    if !track {
        return Ok(body);
    }
    let mut out = String::new();
    out.push(GEN_OPEN);
    match body.as_str() {
        Some(s) => out.push_str(s),
        None => out.push_str(&body.to_string()),
    }
    out.push(GEN_CLOSE);
    Ok(JValue::from_safe_string(out))
}

/// Remove the generation marks from `raw`; the byte ranges (in the result)
/// of the outermost marked blocks, in order. Marks that do not pair up (the
/// template cut a block's output apart) are an error.
fn split_generation_marks(raw: &str) -> std::result::Result<(String, Vec<Range<usize>>), String> {
    let mut text = String::with_capacity(raw.len());
    let mut spans = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    let mut rest = raw;
    while let Some(p) = rest.find([GEN_OPEN, GEN_CLOSE]) {
        text.push_str(&rest[..p]);
        let mark = rest[p..].chars().next().expect("a mark");
        if mark == GEN_OPEN {
            if depth == 0 {
                start = text.len();
            }
            depth += 1;
        } else {
            if depth == 0 {
                return Err(UNTRACKABLE.into());
            }
            depth -= 1;
            if depth == 0 {
                spans.push(start..text.len());
            }
        }
        rest = &rest[p + mark.len_utf8()..];
    }
    if depth != 0 {
        return Err(UNTRACKABLE.into());
    }
    text.push_str(rest);
    Ok((text, spans))
}

const UNTRACKABLE: &str = "the template edits the output of a {% generation %} block after rendering it (a filter or string method on a captured block), so the trained text cannot be located";

/// Find an assistant span in `text` at or after `from`: the whole
/// `span_text`, else `span_text` from the last occurrence of the message
/// content on (templates such as Qwen3's drop an empty think block from
/// assistant turns that are followed by another user turn; an empty message
/// located this way gets an empty span).
fn locate(text: &str, from: usize, span_text: &str, core: &str) -> Option<Range<usize>> {
    let rest = &text[from..];
    if let Some(p) = rest.find(span_text) {
        return Some(from + p..from + p + span_text.len());
    }
    let k = span_text.rfind(core)?;
    let tail = &span_text[k..];
    rest.find(tail).map(|p| from + p..from + p + tail.len())
}

/// The message of a minijinja error without its location noise for
/// `raise_exception`, with it for syntax errors.
fn describe(e: &minijinja::Error) -> String {
    match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(d)) => d.to_string(),
        _ => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(inner) = src {
                s.push_str(": ");
                s.push_str(&inner.to_string());
                src = inner.source();
            }
            s
        }
    }
}

/// Rewrite `{% generation %}` / `{% endgeneration %}` into
/// `{% call __llmft_generation() %}` / `{% endcall %}`, keeping each tag's
/// whitespace modifiers (`-`, `+`): they stay block tags, so `trim_blocks`,
/// `lstrip_blocks` and explicit trimming apply to them exactly as to the
/// originals, and the body is a macro body as in transformers' extension.
/// Comments, `{% raw %}` blocks and string literals inside tags are left
/// alone. Also whether any tag was rewritten.
fn rewrite_generation_tags(source: &str) -> (String, bool) {
    let bytes = source.as_bytes();
    let mut out = String::with_capacity(source.len() + 64);
    let mut copied = 0;
    let mut marked = false;
    let mut i = 0;
    while let Some(p) = source[i..].find('{') {
        let open = i + p;
        i = match bytes.get(open + 1) {
            Some(b'#') => source[open + 2..]
                .find("#}")
                .map_or(source.len(), |q| open + 2 + q + 2),
            Some(b'{') => tag_end(source, open + 2, b'}').unwrap_or(source.len()),
            Some(b'%') => {
                let Some(end) = tag_end(source, open + 2, b'%') else {
                    break;
                };
                let (lmod, word, rmod) = split_tag(&source[open + 2..end - 2]);
                let replacement = match word {
                    "generation" => Some(format!("call {GENERATION_FN}()")),
                    "endgeneration" => Some("endcall".to_string()),
                    _ => None,
                };
                if let Some(r) = replacement {
                    out.push_str(&source[copied..open]);
                    out.push_str(&format!("{{%{lmod} {r} {rmod}%}}"));
                    copied = end;
                    marked = true;
                    end
                } else if word.split_whitespace().next() == Some("raw") {
                    raw_end(source, end)
                } else {
                    end
                }
            }
            _ => open + 1,
        };
    }
    out.push_str(&source[copied..]);
    (out, marked)
}

/// A block tag's inside split into its leading modifier, its trimmed
/// statement and its trailing modifier.
fn split_tag(inner: &str) -> (&str, &str, &str) {
    let (lmod, body) = match inner.as_bytes().first() {
        Some(b'-' | b'+') => inner.split_at(1),
        _ => ("", inner),
    };
    let (body, rmod) = match body.as_bytes().last() {
        Some(b'-' | b'+') => body.split_at(body.len() - 1),
        _ => (body, ""),
    };
    (lmod, body.trim(), rmod)
}

/// The byte index just past the `<close>}` that ends the tag whose inside
/// starts at `from`, skipping string literals and bracketed expressions.
fn tag_end(source: &str, from: usize, close: u8) -> Option<usize> {
    let bytes = source.as_bytes();
    let mut depth = 0usize;
    let mut quote = None;
    let mut k = from;
    while k < bytes.len() {
        let b = bytes[k];
        match quote {
            Some(q) => {
                if b == b'\\' {
                    k += 1;
                } else if b == q {
                    quote = None;
                }
            }
            None => match b {
                b'\'' | b'"' => quote = Some(b),
                b'(' | b'[' | b'{' => depth += 1,
                _ if b == close && depth == 0 && bytes.get(k + 1) == Some(&b'}') => {
                    return Some(k + 2);
                }
                b')' | b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            },
        }
        k += 1;
    }
    None
}

/// The byte index just past the `{% endraw %}` after `from`.
fn raw_end(source: &str, from: usize) -> usize {
    let mut i = from;
    while let Some(p) = source[i..].find("{%") {
        let open = i + p;
        let Some(q) = source[open + 2..].find("%}") else {
            break;
        };
        let end = open + 2 + q + 2;
        if split_tag(&source[open + 2..end - 2]).1 == "endraw" {
            return end;
        }
        i = open + 2;
    }
    source.len()
}

const MAX_JSON_INDENT: usize = 64;

/// `tojson` as transformers defines it: Python `json.dumps` spacing
/// (`", "` and `": "`), non-ASCII kept, optional `indent`.
fn tojson(
    value: JValue,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<JValue, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    // An untrusted template could ask for a gigabyte of spaces per line.
    if indent.is_some_and(|n| n > MAX_JSON_INDENT) {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson indent over {MAX_JSON_INDENT}"),
        ));
    }
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    python_json(&json, indent, 0, &mut out);
    Ok(JValue::from_safe_string(out))
}

fn python_json(v: &serde_json::Value, indent: Option<usize>, depth: usize, out: &mut String) {
    use serde_json::Value as V;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        V::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        V::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push_str(": ");
                python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&serde_json::to_string(other).unwrap_or_default()),
    }
}

/// `strftime_now(format)` for templates that print today's date; supports
/// `%d %m %Y %y %b %B %H %M %S %%` in UTC.
fn strftime_now(fmt: &str) -> std::result::Result<String, minijinja::Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(format_time(secs, fmt))
}

fn format_time(secs: u64, fmt: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Message;

    fn conv(msgs: &[(Role, &str)]) -> Conversation {
        Conversation {
            messages: msgs.iter().map(|(r, c)| Message::new(*r, *c)).collect(),
            field: "messages".into(),
        }
    }

    #[test]
    fn dates_format_like_strftime() {
        // 2024-07-26 13:05:09 UTC
        assert_eq!(
            format_time(
                1_722_000_000 - 1_722_000_000 % 86_400 + 47_109,
                "%d %b %Y %H:%M:%S"
            ),
            "26 Jul 2024 13:05:09"
        );
        assert_eq!(format_time(0, "%Y-%m-%d %B %%"), "1970-01-01 January %");
    }

    #[test]
    fn tojson_uses_python_spacing() {
        let v: serde_json::Value = serde_json::json!({"a": [1, "é"], "b": {}});
        let mut out = String::new();
        python_json(&v, None, 0, &mut out);
        assert_eq!(out, r#"{"a": [1, "é"], "b": {}}"#);
        out.clear();
        python_json(&serde_json::json!([1, 2]), Some(2), 0, &mut out);
        assert_eq!(out, "[\n  1,\n  2\n]");
    }

    #[test]
    fn generation_tags_become_call_blocks_with_their_modifiers() {
        let src = "{% for m in messages %}{%- generation -%}{{ m.content }}{%+ endgeneration +%}{% endfor %}";
        assert_eq!(
            rewrite_generation_tags(src),
            (
                "{% for m in messages %}{%- call __llmft_generation() -%}{{ m.content }}{%+ endcall +%}{% endfor %}".to_string(),
                true
            )
        );
        // Comments, raw blocks and string literals are not tags.
        let src = "x{# {% generation %} #}{% raw %}{% generation %}{%- endraw %}{{ '{% generation %}' }}{% set s = '%}{% generation %}' %}{{ {'a': {'b': '}}'}} }}";
        assert_eq!(rewrite_generation_tags(src), (src.to_string(), false));
    }

    /// Expected text and spans from transformers' `AssistantTracker`
    /// (`_render_with_assistant_indices`, transformers 5.24, jinja2 3.1.6)
    /// for messages `[user "a", assistant "b"]`.
    #[test]
    fn generation_blocks_render_and_track_as_transformers() {
        type Case = (&'static str, &'static str, &'static [(usize, usize)]);
        let cases: [Case; 14] = [
            ("{% generation %}{% set x = 1 %}{{ x }}{% endgeneration %}[{{ x }}]", "1[]", &[(0, 1)]),
            ("{% for m in messages %}{% generation %}{{ loop.index }}{{ m.content }}{% endgeneration %}{% endfor %}", "1a2b", &[(0, 2), (2, 4)]),
            ("{% set ns = namespace(a=0) %}{% for m in messages %}{% generation %}{% set ns.a = ns.a + 1 %}{% endgeneration %}{% endfor %}{{ ns.a }}", "2", &[(0, 0), (0, 0)]),
            ("{% set x = 5 %}{% for m in messages %}{% set x = loop.index %}{% generation %}{{ x }}{% endgeneration %}{% endfor %}", "12", &[(0, 1), (1, 2)]),
            ("A\n   {%+ generation %}\n   X\n   {% endgeneration +%}\n   B", "A\n      X\n\n   B", &[(5, 10)]),
            ("A\n   {%- generation %}\n   X\n   {% endgeneration -%}\n   B", "A   X\nB", &[(1, 6)]),
            ("{% macro f() %}{% generation %}m{% endgeneration %}{% endmacro %}pre{{ f() }}", "prem", &[(3, 4)]),
            ("{%generation%}Z{%endgeneration%}", "Z", &[(0, 1)]),
            ("{% generation -%}  Z  {%- endgeneration %}", "Z", &[(0, 1)]),
            ("{% for m in messages %}<{{ m.role }}>\n{% if m.role == 'assistant' %}\n{% generation %}\n{{ m.content }}</s>\n{% endgeneration %}\n{% else %}\n{{ m.content }}</s>\n{% endif %}\n{% endfor %}", "<user>\na</s>\n<assistant>\nb</s>\n", &[(25, 31)]),
            ("{% for m in messages %}\n  {% generation %}\n  [{{ m.content }}]\n  {% endgeneration %}\n  tail\n{% endfor %}", "  [a]\n  tail\n  [b]\n  tail\n", &[(0, 6), (13, 19)]),
            ("{%- for m in messages -%}\n\t{%- if m.role == 'assistant' %}\t{% generation %} {{ m.content }} {% endgeneration %}\t{% endif %}\n{% endfor %}", "\t b \t", &[(1, 4)]),
            // transformers records (0, 1) here: it measures against the
            // top-level output, which a `{% set %}` block's body is not yet
            // part of; the marks give the body's real place.
            ("{% set y %}{% generation %}Q{% endgeneration %}{% endset %}ab{{ y }}", "abQ", &[(2, 3)]),
            // Nested blocks: the outermost one (transformers' two spans cover
            // the same tokens).
            ("{% generation %}{% generation %}in{% endgeneration %}out{% endgeneration %}", "inout", &[(0, 5)]),
        ];
        let c = conv(&[(Role::User, "a"), (Role::Assistant, "b")]);
        for (src, text, spans) in cases {
            let t = JinjaTemplate::new("t", src, None, None).unwrap();
            assert!(t.has_generation_blocks(), "{src}");
            let r = t.render_chat(&c).unwrap();
            assert_eq!(r.text, text, "{src}");
            let got: Vec<(usize, usize)> = r.spans.iter().map(|s| (s.start, s.end)).collect();
            assert_eq!(got, spans, "{src}");
            assert_eq!(r.rule, MaskRule::Overlap);
            let messages: Vec<JValue> = c.messages.iter().map(JValue::from_serialize).collect();
            assert_eq!(t.render(&messages, false).unwrap(), text, "{src}");
        }
    }

    #[test]
    fn generation_marks_in_input_are_refused() {
        let t = JinjaTemplate::new(
            "t",
            "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}",
            None,
            None,
        )
        .unwrap();
        let err = t
            .render_chat(&conv(&[(Role::User, "a"), (Role::Assistant, "b\u{FDD1}")]))
            .unwrap_err();
        assert!(
            err.starts_with("message 1 contains U+FDD0 or U+FDD1"),
            "{err}"
        );
        let err = JinjaTemplate::new("t", "{{ '\u{FDD0}' }}", None, None).unwrap_err();
        assert!(err.to_string().contains("U+FDD0"), "{err}");
        // Templates that edit a block's output after rendering it.
        for src in [
            "{% set y %}{% generation %}Q{% endgeneration %}{% endset %}{{ y[1:] }}",
            "{% filter trim %}{% generation %} Q {% endgeneration %}{% endfilter %}",
        ] {
            let t = JinjaTemplate::new("t", src, None, None).unwrap();
            let c = conv(&[(Role::Assistant, "b")]);
            assert_eq!(t.render_chat(&c).unwrap_err(), UNTRACKABLE, "{src}");
            let messages: Vec<JValue> = c.messages.iter().map(JValue::from_serialize).collect();
            assert!(t.render(&messages, false).is_ok());
        }
    }

    #[test]
    fn segment_template_spans_are_assistant_text() {
        let t = SegmentTemplate::new(
            "llama2",
            &builtin("llama2").unwrap(),
            Some("<s>"),
            Some("</s>"),
        )
        .unwrap();
        let c = conv(&[
            (Role::System, "Be brief."),
            (Role::User, "Hi"),
            (Role::Assistant, "Hello"),
            (Role::User, "Bye"),
            (Role::Assistant, "Ciao"),
        ]);
        let r = t.render_chat(&c);
        assert_eq!(
            r.text,
            "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello </s><s>[INST] Bye [/INST] Ciao </s>"
        );
        let spans: Vec<&str> = r.spans.iter().map(|s| &r.text[s.clone()]).collect();
        assert_eq!(spans, [" Hello </s>", " Ciao </s>"]);
    }

    #[test]
    fn tigerbot_and_alpaca_prompts() {
        let c = conv(&[(Role::User, "What is 2+2?"), (Role::Assistant, "4")]);
        let t = SegmentTemplate::new(
            "tigerbot",
            &builtin("tigerbot").unwrap(),
            None,
            Some("</s>"),
        )
        .unwrap();
        assert_eq!(
            t.render_chat(&c).text,
            "\n\n### Instruction:\nWhat is 2+2?\n\n### Response:\n4</s>"
        );
        let t = SegmentTemplate::new(
            "alpaca",
            &builtin("alpaca").unwrap(),
            Some("<s>"),
            Some("</s>"),
        )
        .unwrap();
        assert!(t
            .render_chat(&c)
            .text
            .starts_with("<s>Below is an instruction"));
    }

    #[test]
    fn raise_exception_message_is_kept() {
        let t = JinjaTemplate::new(
            "t",
            "{{ raise_exception('roles must alternate') }}",
            None,
            None,
        )
        .unwrap();
        assert_eq!(
            t.render_chat(&conv(&[(Role::Assistant, "x")])).unwrap_err(),
            "roles must alternate"
        );
    }

    #[test]
    fn jinja_pycompat_methods_work() {
        let t = JinjaTemplate::new(
            "t",
            "{% for m in messages %}{{ m.content.strip().upper() }}{% if m.content.startswith(' a') %}!{% endif %}{% endfor %}",
            None,
            None,
        )
        .unwrap();
        assert_eq!(
            t.render_chat(&conv(&[(Role::Assistant, " abc ")]))
                .unwrap()
                .text,
            "ABC!"
        );
    }
}
