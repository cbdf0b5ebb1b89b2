//! Record formats: a JSON record (one JSONL line, array element, Parquet
//! row or text line) becomes an [`Example`] — a conversation or raw text.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::config::{Columns, DatasetSpec, Format, Tags};
use crate::error::{Error, Location, Result};

/// Who speaks a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The system prompt (only as the first message).
    System,
    /// The user.
    User,
    /// The assistant; its messages are what gets trained.
    Assistant,
}

impl Role {
    /// The role's name as chat templates see it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    /// Who speaks.
    pub role: Role,
    /// What is said.
    pub content: String,
}

impl Message {
    /// A message.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message {
            role,
            content: content.into(),
        }
    }
}

/// A conversation: an optional system message, then user/assistant turns
/// alternating, ending with an assistant message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    /// The messages, in order.
    pub messages: Vec<Message>,
    /// The record field the conversation came from (named in template errors).
    pub field: String,
}

/// What one record is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Example {
    /// A conversation to render with the chat template.
    Chat(Conversation),
    /// Raw text for continued pre-training.
    Text(String),
}

/// The column and tag names of one source, resolved from its
/// [`DatasetSpec`] and the format's defaults.
#[derive(Debug, Clone)]
pub struct RecordFormat {
    format: Format,
    columns: Columns,
    tags: Tags,
}

struct ChatTags<'a> {
    role: &'a str,
    content: &'a str,
    user: &'a str,
    assistant: &'a str,
    system: &'a str,
}

impl RecordFormat {
    /// The format of `spec`.
    pub fn new(spec: &DatasetSpec) -> Self {
        RecordFormat {
            format: spec.format,
            columns: spec.columns.clone(),
            tags: spec.tags.clone(),
        }
    }

    /// The format as configured (`Auto` until a record is seen).
    pub fn format(&self) -> Format {
        self.format
    }

    /// The column raw text lines are stored under.
    pub fn text_column(&self) -> &str {
        self.columns.text.as_deref().unwrap_or("text")
    }

    fn col<'a>(&'a self, c: &'a Option<String>, default: &'a str) -> &'a str {
        c.as_deref().unwrap_or(default)
    }

    fn chat_tags(&self, openai: bool) -> ChatTags<'_> {
        let t = &self.tags;
        let (r, c, u, a, s) = if openai {
            ("role", "content", "user", "assistant", "system")
        } else {
            ("from", "value", "human", "gpt", "system")
        };
        ChatTags {
            role: self.col(&t.role_tag, r),
            content: self.col(&t.content_tag, c),
            user: self.col(&t.user_tag, u),
            assistant: self.col(&t.assistant_tag, a),
            system: self.col(&t.system_tag, s),
        }
    }

    /// Parse one record.
    pub fn parse(&self, value: &Value, at: &Location) -> Result<Example> {
        let obj = value.as_object().ok_or_else(|| {
            Error::field(
                at,
                "<record>",
                format!("expected an object, found {}", type_name(value)),
            )
        })?;
        match self.detect(obj, at)? {
            (Format::Alpaca, _) => self.alpaca(obj, at),
            (Format::Sharegpt, col) => self.chat(obj, at, col, false),
            (Format::Openai, col) => self.chat(obj, at, col, true),
            (Format::Text, _) => {
                let col = self.text_column();
                Ok(Example::Text(req_str(obj, col, col, at)?.to_string()))
            }
            (Format::Auto, _) => unreachable!("detect resolves auto"),
        }
    }

    /// The record's format and, for chat formats, its message column.
    fn detect<'a>(&'a self, obj: &Map<String, Value>, at: &Location) -> Result<(Format, &'a str)> {
        let c = &self.columns;
        let chat_default = |f: Format| {
            if f == Format::Openai {
                "messages"
            } else {
                "conversations"
            }
        };
        if self.format != Format::Auto {
            return Ok((
                self.format,
                self.col(&c.messages, chat_default(self.format)),
            ));
        }
        // A list whose first message has `role` is OpenAI-style, else sharegpt.
        let chat = |col: &'a str| {
            let f = if first_message_has(obj.get(col), "role") {
                Format::Openai
            } else {
                Format::Sharegpt
            };
            (f, col)
        };
        for col in [
            c.messages.as_deref(),
            Some("messages"),
            Some("conversations"),
        ]
        .into_iter()
        .flatten()
        {
            if obj.contains_key(col) {
                return Ok(chat(col));
            }
        }
        if obj.contains_key(self.col(&c.prompt, "instruction")) {
            return Ok((Format::Alpaca, ""));
        }
        if obj.contains_key(self.text_column()) {
            return Ok((Format::Text, ""));
        }
        Err(Error::field(
            at,
            "<record>",
            "cannot detect the format: expected a `messages`, `conversations`, `instruction` or `text` field (or set `format`)",
        ))
    }

    fn alpaca(&self, obj: &Map<String, Value>, at: &Location) -> Result<Example> {
        let c = &self.columns;
        let prompt_col = self.col(&c.prompt, "instruction");
        let prompt = req_str(obj, prompt_col, prompt_col, at)?;
        let query_col = self.col(&c.query, "input");
        let query = opt_str(obj, query_col, at)?.unwrap_or("");
        let response_col = self.col(&c.response, "output");
        let response = req_str(obj, response_col, response_col, at)?;
        let mut messages = Vec::new();
        if let Some(system) = opt_str(obj, self.col(&c.system, "system"), at)? {
            if !system.is_empty() {
                messages.push(Message::new(Role::System, system));
            }
        }
        let history_col = self.col(&c.history, "history");
        match obj.get(history_col) {
            None | Some(Value::Null) => {}
            Some(Value::Array(turns)) => {
                for (i, turn) in turns.iter().enumerate() {
                    let pair = turn.as_array().filter(|p| p.len() == 2).ok_or_else(|| {
                        Error::field(
                            at,
                            format!("{history_col}[{i}]"),
                            format!(
                                "expected an [instruction, response] pair, found {}",
                                type_name(turn)
                            ),
                        )
                    })?;
                    for (j, (v, role)) in pair.iter().zip([Role::User, Role::Assistant]).enumerate()
                    {
                        let s = v.as_str().ok_or_else(|| {
                            Error::field(
                                at,
                                format!("{history_col}[{i}][{j}]"),
                                format!("expected a string, found {}", type_name(v)),
                            )
                        })?;
                        messages.push(Message::new(role, s));
                    }
                }
            }
            Some(v) => {
                return Err(Error::field(
                    at,
                    history_col,
                    format!("expected a list of pairs, found {}", type_name(v)),
                ))
            }
        }
        let user = if query.is_empty() {
            prompt.to_string()
        } else {
            format!("{prompt}\n{query}")
        };
        messages.push(Message::new(Role::User, user));
        messages.push(Message::new(Role::Assistant, response));
        Ok(Example::Chat(Conversation {
            messages,
            field: prompt_col.to_string(),
        }))
    }

    fn chat(
        &self,
        obj: &Map<String, Value>,
        at: &Location,
        col: &str,
        openai: bool,
    ) -> Result<Example> {
        let c = &self.columns;
        let tags = self.chat_tags(openai);
        let list = match obj.get(col) {
            None => return Err(Error::field(at, col, "missing")),
            Some(Value::Array(a)) => a,
            Some(v) => {
                return Err(Error::field(
                    at,
                    col,
                    format!("expected a list of messages, found {}", type_name(v)),
                ))
            }
        };
        let mut messages = Vec::with_capacity(list.len() + 1);
        let system_col = self.col(&c.system, "system");
        for (i, m) in list.iter().enumerate() {
            let here = format!("{col}[{i}]");
            let m = m.as_object().ok_or_else(|| {
                Error::field(
                    at,
                    &here,
                    format!("expected a message object, found {}", type_name(m)),
                )
            })?;
            let role_field = format!("{here}.{}", tags.role);
            let role = req_str(m, tags.role, &role_field, at)?;
            let content_field = format!("{here}.{}", tags.content);
            let content = content_text(m, tags.content, &content_field, at)?;
            let role = if role == tags.user {
                Role::User
            } else if role == tags.assistant {
                Role::Assistant
            } else if role == tags.system {
                Role::System
            } else {
                return Err(Error::field(
                    at,
                    role_field,
                    format!(
                        "unknown role `{role}` (expected `{}`, `{}` or `{}`)",
                        tags.user, tags.assistant, tags.system
                    ),
                ));
            };
            // Expected order: [system] user assistant user assistant ...
            if role == Role::System {
                if i != 0 {
                    return Err(Error::field(
                        at,
                        role_field,
                        "a system message may only come first",
                    ));
                }
                messages.push(Message::new(role, content));
                continue;
            }
            let turn = i - usize::from(is_role(&list[0], &tags, tags.system));
            let expected = if turn % 2 == 0 {
                Role::User
            } else {
                Role::Assistant
            };
            if role != expected {
                let (want, found) = (role_tag(expected, &tags), role_tag(role, &tags));
                return Err(Error::field(
                    at,
                    role_field,
                    format!("expected role `{want}` here (turns alternate user/assistant), found `{found}`"),
                ));
            }
            messages.push(Message::new(role, content));
        }
        if !messages.first().is_some_and(|m| m.role == Role::System) {
            if let Some(system) = opt_str(obj, system_col, at)? {
                if !system.is_empty() {
                    messages.insert(0, Message::new(Role::System, system));
                }
            }
        }
        let turns = messages.iter().filter(|m| m.role != Role::System).count();
        if turns == 0 {
            return Err(Error::field(at, col, "empty conversation"));
        }
        if messages.last().map(|m| m.role) != Some(Role::Assistant) {
            return Err(Error::field(
                at,
                format!("{col}[{}]", list.len() - 1),
                "a conversation must end with an assistant message",
            ));
        }
        Ok(Example::Chat(Conversation {
            messages,
            field: col.to_string(),
        }))
    }
}

fn role_tag<'a>(role: Role, tags: &ChatTags<'a>) -> &'a str {
    match role {
        Role::System => tags.system,
        Role::User => tags.user,
        Role::Assistant => tags.assistant,
    }
}

fn is_role(m: &Value, tags: &ChatTags<'_>, want: &str) -> bool {
    m.get(tags.role).and_then(Value::as_str) == Some(want)
}

fn first_message_has(list: Option<&Value>, key: &str) -> bool {
    list.and_then(Value::as_array)
        .and_then(|l| l.first())
        .and_then(Value::as_object)
        .is_some_and(|m| m.contains_key(key))
}

/// JSON type names as error messages use them.
pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "list",
        Value::Object(_) => "object",
    }
}

fn req_str<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    field: &str,
    at: &Location,
) -> Result<&'a str> {
    match obj.get(key) {
        None => Err(Error::field(at, field, "missing")),
        Some(Value::String(s)) => Ok(s),
        Some(v) => Err(Error::field(
            at,
            field,
            format!("expected a string, found {}", type_name(v)),
        )),
    }
}

fn opt_str<'a>(obj: &'a Map<String, Value>, key: &str, at: &Location) -> Result<Option<&'a str>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(Error::field(
            at,
            key,
            format!("expected a string, found {}", type_name(v)),
        )),
    }
}

/// Message text: a string, or OpenAI-style content parts whose `text`
/// parts are concatenated.
fn content_text(m: &Map<String, Value>, key: &str, field: &str, at: &Location) -> Result<String> {
    match m.get(key) {
        None => Err(Error::field(at, field, "missing")),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for (i, p) in parts.iter().enumerate() {
                match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => out.push_str(t),
                    _ => {
                        return Err(Error::field(
                            at,
                            format!("{field}[{i}]"),
                            "expected a {\"type\": \"text\", \"text\": ...} part",
                        ))
                    }
                }
            }
            Ok(out)
        }
        Some(v) => Err(Error::field(
            at,
            field,
            format!("expected a string, found {}", type_name(v)),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn at() -> Location {
        Location {
            path: Path::new("t.jsonl").into(),
            line: 1,
        }
    }

    fn auto() -> RecordFormat {
        RecordFormat::new(&DatasetSpec::new("t.jsonl"))
    }

    #[test]
    fn auto_detects_sharegpt_tags_under_a_messages_column() {
        let v = serde_json::json!({"messages": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]});
        let Example::Chat(c) = auto().parse(&v, &at()).unwrap() else {
            panic!("not a chat")
        };
        assert_eq!(c.messages[1], Message::new(Role::Assistant, "b"));
        assert_eq!(c.field, "messages");
    }

    #[test]
    fn openai_content_parts_are_joined() {
        let v = serde_json::json!({"messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "c"}]});
        let Example::Chat(c) = auto().parse(&v, &at()).unwrap() else {
            panic!("not a chat")
        };
        assert_eq!(c.messages[0].content, "ab");
    }

    #[test]
    fn conversation_must_end_with_the_assistant() {
        let v = serde_json::json!({"conversations": [{"from": "human", "value": "a"}]});
        let e = auto().parse(&v, &at()).unwrap_err().to_string();
        assert_eq!(
            e,
            "t.jsonl:1: field `conversations[0]`: a conversation must end with an assistant message"
        );
    }
}
