//! A Hugging Face tokenizer with what the chat template needs from
//! tokenizer_config.json: special tokens and the Jinja `chat_template`.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// Byte ranges of tokens in the encoded text.
pub type Offsets = Vec<(usize, usize)>;

/// `tokenizer.json` plus the parts of `tokenizer_config.json` the pipeline uses.
pub struct ModelTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    bos_token: Option<String>,
    eos_token: Option<String>,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    pad_id: u32,
    chat_template: Option<String>,
    /// The file the chat template was read from.
    chat_template_origin: Option<PathBuf>,
}

impl std::fmt::Debug for ModelTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelTokenizer")
            .field("path", &self.path)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("pad_id", &self.pad_id)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl ModelTokenizer {
    /// Load from a model directory: `tokenizer.json`, and when present
    /// `tokenizer_config.json` and `chat_template.jinja` (which wins over the
    /// config's `chat_template`, as in transformers).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config = dir.join("tokenizer_config.json");
        let mut tok = Self::from_files(
            dir.join("tokenizer.json"),
            config.exists().then_some(config.as_path()),
        )?;
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            tok.chat_template =
                Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?);
            tok.chat_template_origin = Some(jinja);
        }
        Ok(tok)
    }

    /// Load from a `tokenizer.json` and an optional `tokenizer_config.json`.
    pub fn from_files(
        tokenizer_json: impl AsRef<Path>,
        config_json: Option<&Path>,
    ) -> Result<Self> {
        let path = tokenizer_json.as_ref().to_path_buf();
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let config = match config_json {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
                serde_json::from_str::<Value>(&text).map_err(|e| Error::Tokenizer {
                    path: p.to_path_buf(),
                    message: format!("invalid JSON: {e}"),
                })?
            }
            None => Value::Null,
        };
        let token = |key: &str| -> Option<String> {
            match config.get(key)? {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
                _ => None,
            }
        };
        let bos_token = token("bos_token");
        let eos_token = token("eos_token");
        let pad_token = token("pad_token");
        let id = |t: &Option<String>| t.as_deref().and_then(|t| inner.token_to_id(t));
        let bos_id = id(&bos_token);
        let eos_id = id(&eos_token);
        let pad_id = id(&pad_token).or(eos_id).unwrap_or(0);
        let chat_template = match config.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default", else the first.
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        };
        let chat_template_origin = chat_template
            .as_ref()
            .and(config_json)
            .map(Path::to_path_buf);
        Ok(ModelTokenizer {
            inner,
            path,
            bos_token,
            eos_token,
            bos_id,
            eos_id,
            pad_id,
            chat_template,
            chat_template_origin,
        })
    }

    /// Wrap an already built tokenizer (no special tokens, no chat template
    /// unless set with the `with_*` methods).
    pub fn from_tokenizer(inner: tokenizers::Tokenizer) -> Self {
        ModelTokenizer {
            inner,
            path: PathBuf::from("<memory>"),
            bos_token: None,
            eos_token: None,
            bos_id: None,
            eos_id: None,
            pad_id: 0,
            chat_template: None,
            chat_template_origin: None,
        }
    }

    /// Set the bos/eos tokens (by their text; they must be in the vocabulary).
    pub fn with_special_tokens(mut self, bos: Option<&str>, eos: Option<&str>) -> Self {
        self.bos_token = bos.map(str::to_string);
        self.eos_token = eos.map(str::to_string);
        self.bos_id = bos.and_then(|t| self.inner.token_to_id(t));
        self.eos_id = eos.and_then(|t| self.inner.token_to_id(t));
        self.pad_id = self.eos_id.unwrap_or(self.pad_id);
        self
    }

    /// Set the Jinja chat template.
    pub fn with_chat_template(mut self, template: impl Into<String>) -> Self {
        self.chat_template = Some(template.into());
        self.chat_template_origin = None;
        self
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
    /// Where the tokenizer was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The bos token's text, if the model has one.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }
    /// The eos token's text, if the model has one.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }
    /// The bos token id.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }
    /// The eos token id.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }
    /// The padding id: `pad_token`, else `eos_token`, else 0.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }
    /// The model's Jinja chat template, if it has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The file the chat template was read from (`tokenizer_config.json` or
    /// `chat_template.jinja`); `None` when set in code or absent.
    pub fn chat_template_origin(&self) -> Option<&Path> {
        self.chat_template_origin.as_deref()
    }

    /// An upper bound on the bytes of text one token covers: the longest
    /// vocabulary entry in UTF-8 bytes (byte-level and SentencePiece
    /// spellings are never shorter than the text they stand for), at least
    /// 4 (one character).
    pub fn longest_token_bytes(&self) -> usize {
        self.inner
            .get_vocab(true)
            .keys()
            .map(|t| t.len())
            .max()
            .unwrap_or(0)
            .max(4)
    }

    /// Token ids and byte offsets of `text`. `add_special_tokens` runs the
    /// tokenizer's post-processor (which may add a bos); chat text is
    /// encoded without it because templates write their own special tokens.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<(Vec<u32>, Offsets)> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                message: e.to_string(),
            })?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| Error::Tokenizer {
            path: self.path.clone(),
            message: e.to_string(),
        })
    }
}
