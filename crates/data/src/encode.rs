//! Examples to token ids and labels.

use crate::config::DataConfig;
use crate::error::{Error, Location, Result};
use crate::format::Example;
use crate::template::{ChatTemplate, MaskRule, RenderedChat};
use crate::tokenizer::ModelTokenizer;

/// Label of a token that is not trained (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i32 = -100;

/// One tokenized example. `labels` are aligned with `input_ids` (the
/// Hugging Face convention): `labels[t]` is `input_ids[t]` when token `t` is
/// trained and [`IGNORE_INDEX`] otherwise; the loss predicts `labels[t + 1]`
/// from position `t` (see [`crate::Batch::targets`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedExample {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Labels, aligned with `input_ids`.
    pub labels: Vec<i32>,
    /// Whether `cutoff_len` cut this example.
    pub truncated: bool,
}

impl EncodedExample {
    /// Number of trained tokens.
    pub fn trained_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// Rendered chat text, tokenized and masked, before truncation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedChat {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Whether each token lies in an assistant span.
    pub trained: Vec<bool>,
    /// Per assistant span, the index of the first token after it.
    pub turn_ends: Vec<usize>,
}

fn tokenizer_bytes(t: &ModelTokenizer) -> usize {
    t.longest_token_bytes()
}

/// Turns [`Example`]s into [`EncodedExample`]s: template, tokenize, mask,
/// truncate.
///
/// Chat examples are rendered by the template and tokenized as one string
/// without the tokenizer's post-processor (the template writes bos/eos
/// itself, as transformers' `apply_chat_template` does); a doubled leading
/// bos is collapsed to one. A token is trained when its first byte lies in
/// an assistant span (all assistant turns of a multi-turn conversation) —
/// when it overlaps one for templates with `{% generation %}` blocks, as in
/// transformers ([`crate::MaskRule`]) — or always with `train_on_prompt`.
///
/// Truncation to `cutoff_len` tokens:
/// 1. keep the longest prefix that ends at the end of an assistant turn and
///    fits — whole turns are dropped from the end;
/// 2. if not even the first turn fits, cut hard at `cutoff_len` tokens
///    (the prompt and the start of the first answer);
/// 3. if that leaves no trained token (the prompt alone is too long), the
///    example is dropped (counted in [`crate::LoadReport::dropped`]).
///
/// Text examples are tokenized with the post-processor (bos as the
/// tokenizer adds it), followed by eos; every token is trained; a text
/// longer than `cutoff_len` is split into consecutive chunks of
/// `cutoff_len` tokens rather than truncated.
#[derive(Debug)]
pub struct Encoder {
    tokenizer: ModelTokenizer,
    template: ChatTemplate,
    cutoff_len: usize,
    train_on_prompt: bool,
    /// [`ModelTokenizer::longest_token_bytes`].
    token_bytes: usize,
}

/// Tokens tokenized past `cutoff_len` when a long chat is cut before
/// tokenizing, so that the tokens kept do not depend on where the text was
/// cut (a pre-tokenizer or BPE merge only looks a few characters ahead).
pub const CUT_SLACK_TOKENS: usize = 64;

/// Text examples longer than this many bytes are tokenized in pieces of
/// about this size (split at a line break or space), which bounds the
/// tokenizer's working memory.
pub const TEXT_PIECE_BYTES: usize = 64 << 10;

/// The largest char boundary of `s` at or below `at`, moved back to just
/// after a whitespace character when one lies in the last quarter.
fn cut_point(s: &str, at: usize) -> usize {
    if at >= s.len() {
        return s.len();
    }
    let mut end = at;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let floor = end - end / 4;
    let b = s.as_bytes();
    if let Some(p) = b[floor..end].iter().rposition(|&c| c == b'\n') {
        return floor + p + 1;
    }
    if let Some(p) = b[floor..end].iter().rposition(|c| c.is_ascii_whitespace()) {
        return floor + p + 1;
    }
    end
}

impl Encoder {
    /// An encoder with the template and limits of `config`.
    pub fn new(config: &DataConfig, tokenizer: ModelTokenizer) -> Result<Self> {
        if config.cutoff_len < 2 {
            return Err(Error::config("cutoff_len", "must be at least 2"));
        }
        let template = ChatTemplate::from_config(&config.template, &tokenizer)?;
        Ok(Encoder {
            template,
            cutoff_len: config.cutoff_len,
            train_on_prompt: config.train_on_prompt,
            token_bytes: tokenizer_bytes(&tokenizer),
            tokenizer,
        })
    }

    /// Bytes of a string field worth keeping: any text past this many bytes
    /// of a rendered chat lies beyond `cutoff_len` tokens plus the slack, so
    /// readers may cut longer strings (except text examples', whose tokens
    /// are all used) without changing what is trained.
    pub fn max_useful_bytes(&self) -> usize {
        (self.cutoff_len + CUT_SLACK_TOKENS).saturating_mul(self.token_bytes)
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &ModelTokenizer {
        &self.tokenizer
    }

    /// The chat template.
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// Render a chat example's text without tokenizing it.
    pub fn render(&self, example: &Example, at: &Location) -> Result<RenderedChat> {
        match example {
            Example::Chat(conv) => {
                self.template
                    .render(conv)
                    .map_err(|message| Error::TemplateRender {
                        at: at.clone(),
                        field: conv.field.clone(),
                        message,
                    })
            }
            Example::Text(t) => Ok(RenderedChat {
                text: t.clone(),
                spans: std::iter::once(0..t.len()).collect(),
                rule: MaskRule::FirstByte,
            }),
        }
    }

    /// Encode one example; empty when it had to be dropped (see the
    /// truncation rule), several chunks for long text.
    pub fn encode(&self, example: &Example, at: &Location) -> Result<Vec<EncodedExample>> {
        match example {
            Example::Chat(_) => {
                let rendered = self.render(example, at)?;
                Ok(self.encode_chat(&rendered)?.into_iter().collect())
            }
            Example::Text(text) => self.encode_text(text),
        }
    }

    /// Tokenize rendered chat text and mask it by its spans (the untruncated
    /// result is also what the fixture tests compare with transformers).
    pub fn tokenize_chat(&self, rendered: &RenderedChat) -> Result<TokenizedChat> {
        let (mut ids, mut offsets) = self.tokenizer.encode(&rendered.text, false)?;
        if let Some(bos) = self.tokenizer.bos_id() {
            if ids.len() >= 2 && ids[0] == bos && ids[1] == bos {
                ids.remove(0);
                offsets.remove(0);
            }
        }
        // Spans are sorted and disjoint; walk them alongside the tokens (for
        // `Overlap` exactly as transformers builds `assistant_masks`).
        let spans = &rendered.spans;
        let mut trained = Vec::with_capacity(ids.len());
        let mut turn_ends = Vec::with_capacity(spans.len());
        let mut s = 0;
        for (t, &(start, end)) in offsets.iter().enumerate() {
            while s < spans.len() && start >= spans[s].end {
                turn_ends.push(t);
                s += 1;
            }
            trained.push(
                s < spans.len()
                    && match rendered.rule {
                        MaskRule::FirstByte => start >= spans[s].start,
                        MaskRule::Overlap => end > spans[s].start,
                    },
            );
        }
        turn_ends.extend(std::iter::repeat_n(ids.len(), rendered.spans.len() - s));
        Ok(TokenizedChat {
            ids,
            trained,
            turn_ends,
        })
    }

    /// Tokenizes `rendered`, or only as much of its start as `cutoff_len`
    /// can use: a prefix is tried (8 bytes a token, growing fourfold) until
    /// it yields `cutoff_len` + [`CUT_SLACK_TOKENS`] tokens, and at most
    /// [`Encoder::max_useful_bytes`] are tokenized, which always yields that
    /// many. Texts shorter than the first prefix are tokenized whole, so
    /// every example that fits encodes exactly as before.
    fn tokenize_bounded(&self, rendered: &RenderedChat) -> Result<TokenizedChat> {
        let want = self.cutoff_len + CUT_SLACK_TOKENS;
        let bound = self.max_useful_bytes();
        let mut try_bytes = want.saturating_mul(8).min(bound);
        loop {
            if rendered.text.len() <= try_bytes {
                return self.tokenize_chat(rendered);
            }
            let cut = cut_point(&rendered.text, try_bytes);
            let prefix = RenderedChat {
                text: rendered.text[..cut].to_string(),
                spans: rendered
                    .spans
                    .iter()
                    .filter(|r| r.start < cut)
                    .map(|r| r.start..r.end.min(cut))
                    .collect(),
                rule: rendered.rule,
            };
            let t = self.tokenize_chat(&prefix)?;
            if t.ids.len() >= want || try_bytes >= bound {
                return Ok(t);
            }
            try_bytes = try_bytes.saturating_mul(4).min(bound);
        }
    }

    fn encode_chat(&self, rendered: &RenderedChat) -> Result<Option<EncodedExample>> {
        let TokenizedChat {
            mut ids,
            mut trained,
            turn_ends,
        } = self.tokenize_bounded(rendered)?;
        let truncated = ids.len() > self.cutoff_len;
        if truncated {
            let keep = turn_ends
                .iter()
                .rev()
                .copied()
                .find(|&e| e > 0 && e <= self.cutoff_len)
                .unwrap_or(self.cutoff_len);
            ids.truncate(keep);
            trained.truncate(keep);
        }
        if self.train_on_prompt {
            trained.iter_mut().for_each(|t| *t = true);
        }
        if !trained.iter().any(|&t| t) {
            return Ok(None);
        }
        let labels = ids
            .iter()
            .zip(&trained)
            .map(|(&id, &t)| if t { id as i32 } else { IGNORE_INDEX })
            .collect();
        Ok(Some(EncodedExample {
            input_ids: ids,
            labels,
            truncated,
        }))
    }

    /// Token ids of a text example: whole when short, else in pieces of
    /// about [`TEXT_PIECE_BYTES`] cut after a line break or space (the
    /// post-processor's tokens come from the first piece only).
    fn text_ids(&self, text: &str) -> Result<Vec<u32>> {
        if text.len() <= TEXT_PIECE_BYTES {
            return Ok(self.tokenizer.encode(text, true)?.0);
        }
        let mut ids = Vec::new();
        let mut rest = text;
        let mut first = true;
        while !rest.is_empty() {
            let cut = cut_point(rest, TEXT_PIECE_BYTES).max(1);
            let cut = (cut..=rest.len())
                .find(|&c| rest.is_char_boundary(c))
                .unwrap_or(rest.len());
            let (mut piece, _) = self.tokenizer.encode(&rest[..cut], first)?;
            if first && cut < rest.len() && piece.last() == self.tokenizer.eos_id().as_ref() {
                // A post-processor that ends a text with eos: once, at the end.
                piece.pop();
            }
            ids.extend_from_slice(&piece);
            rest = &rest[cut..];
            first = false;
        }
        Ok(ids)
    }

    fn encode_text(&self, text: &str) -> Result<Vec<EncodedExample>> {
        let mut ids = self.text_ids(text)?;
        if let Some(eos) = self.tokenizer.eos_id() {
            if ids.last() != Some(&eos) {
                ids.push(eos);
            }
        }
        Ok(ids
            .chunks(self.cutoff_len)
            .filter(|c| !c.is_empty())
            .map(|c| EncodedExample {
                input_ids: c.to_vec(),
                labels: c.iter().map(|&id| id as i32).collect(),
                truncated: false,
            })
            .collect())
    }
}
