//! What the chat-template fixture tests share.
use std::path::Path;

use serde_json::Value;

/// The JSON objects of a `.jsonl` fixture, one per line.
pub fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
