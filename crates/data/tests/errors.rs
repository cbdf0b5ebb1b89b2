//! Acceptance 3: malformed inputs give errors naming file:line and the
//! field; `skip_bad_records` skips them and reports how many.

use std::path::{Path, PathBuf};

use llmft_data::{
    DataConfig, DatasetSpec, Error, Format, ModelTokenizer, Pipeline, TemplateConfig,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// A fresh directory for one test's files.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("llmft-data-errors-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

fn pipeline(model: &str, train: Vec<DatasetSpec>, skip: bool) -> Pipeline {
    let tok = ModelTokenizer::from_dir(fixtures().join("chat").join(model)).unwrap();
    let config = DataConfig {
        train,
        skip_bad_records: skip,
        template: TemplateConfig::Model,
        ..DataConfig::default()
    };
    Pipeline::new(config, tok).unwrap()
}

fn load_err(model: &str, spec: DatasetSpec) -> Error {
    pipeline(model, vec![spec], false)
        .load()
        .expect_err("should fail")
}

const GOOD: &str = r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}"#;

#[test]
fn invalid_json_line_names_file_and_line() {
    let dir = scratch("json");
    let path = write(
        &dir,
        "train.jsonl",
        &format!("{GOOD}\n\n{{\"messages\": [\n{GOOD}\n"),
    );
    let err = load_err("qwen2", DatasetSpec::new(&path));
    assert!(
        matches!(err, Error::Json { ref at, .. } if at.line == 3),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("{path}:3: invalid JSON: ")),
        "{msg}"
    );
}

#[test]
fn missing_column_names_the_field() {
    let dir = scratch("missing");
    let path = write(
        &dir,
        "alpaca.jsonl",
        "{\"instruction\": \"Say hi\", \"output\": \"hi\"}\n{\"instruction\": \"Say hi\"}\n",
    );
    let spec = DatasetSpec {
        format: Format::Alpaca,
        ..DatasetSpec::new(&path)
    };
    assert_eq!(
        load_err("qwen2", spec).to_string(),
        format!("{path}:2: field `output`: missing")
    );
}

#[test]
fn wrong_types_name_the_nested_field() {
    let dir = scratch("types");
    let record = r#"{"conversations": [{"from": "human", "value": "1+1?"}, {"from": "gpt", "value": "2"}, {"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]}"#;
    let path = write(&dir, "train.jsonl", &format!("{record}\n"));
    assert_eq!(
        load_err("qwen2", DatasetSpec::new(&path)).to_string(),
        format!("{path}:1: field `conversations[2].value`: expected a string, found number")
    );
    let path = write(
        &dir,
        "history.json",
        "[\n  {\"instruction\": \"a\", \"output\": \"b\",\n   \"history\": [[\"q\", 5]]}\n]\n",
    );
    assert_eq!(
        load_err("qwen2", DatasetSpec::new(&path)).to_string(),
        format!("{path}:2: field `history[0][1]`: expected a string, found number")
    );
    let path = write(
        &dir,
        "roles.jsonl",
        r#"{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}"#,
    );
    assert_eq!(
        load_err("qwen2", DatasetSpec::new(&path)).to_string(),
        format!("{path}:1: field `messages[1].role`: expected role `assistant` here (turns alternate user/assistant), found `user`")
    );
}

#[test]
fn empty_conversation_is_an_error() {
    let dir = scratch("empty");
    let path = write(
        &dir,
        "train.jsonl",
        &format!("{GOOD}\n{{\"messages\": []}}\n"),
    );
    assert_eq!(
        load_err("qwen2", DatasetSpec::new(&path)).to_string(),
        format!("{path}:2: field `messages`: empty conversation")
    );
}

#[test]
fn template_error_names_the_record() {
    // Mistral's template raises on a system message.
    let dir = scratch("template");
    let rec = r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}"#;
    let path = write(&dir, "train.jsonl", &format!("{GOOD}\n{rec}\n"));
    assert_eq!(
        load_err("mistral", DatasetSpec::new(&path)).to_string(),
        format!("{path}:2: field `messages`: chat template error: Conversation roles must alternate user/assistant/user/assistant/...")
    );
    // A template that does not compile is reported once, up front.
    let tok = ModelTokenizer::from_dir(fixtures().join("chat/qwen2")).unwrap();
    let config = DataConfig {
        template: TemplateConfig::Jinja("{% for m in messages %}{{ m.content }".into()),
        ..DataConfig::default()
    };
    let err = Pipeline::new(config, tok).unwrap_err();
    assert!(
        err.to_string().starts_with("chat template `jinja`: "),
        "{err}"
    );
}

#[test]
fn skip_bad_records_counts_and_reports_them() {
    let dir = scratch("skip");
    let lines = [
        GOOD,
        "{not json",
        r#"{"messages": []}"#,
        GOOD,
        r#"{"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "x"}]}"#,
        r#"{"instruction": "a"}"#,
        r#"{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}"#,
    ];
    let path = write(&dir, "train.jsonl", &(lines.join("\n") + "\n"));
    // Mistral: the system-message record is a template error too.
    let data = pipeline("mistral", vec![DatasetSpec::new(&path)], true)
        .load()
        .unwrap();
    assert_eq!(data.train.len(), 2);
    assert_eq!(data.report.records, 7);
    assert_eq!(data.report.skipped, 5);
    let report = data.report.to_string();
    assert!(report.contains("5 bad records skipped"), "{report}");
    for line in [2, 3, 5, 6, 7] {
        assert!(
            report.contains(&format!("{path}:{line}: ")),
            "line {line} in {report}"
        );
    }
    // Without the option the first bad record stops loading.
    let err = pipeline("mistral", vec![DatasetSpec::new(&path)], false)
        .load()
        .unwrap_err();
    assert_eq!(err.location().unwrap().line, 2);
}

#[test]
fn bad_json_array_element_names_its_line() {
    let dir = scratch("array");
    let path = write(
        &dir,
        "train.json",
        "[\n  {\"instruction\": \"a\", \"output\": \"b\"},\n  {\"instruction\": \"c\",\n   \"output\": tru}\n]\n",
    );
    let err = load_err("qwen2", DatasetSpec::new(&path));
    // Syntax errors name the line of the bad token, not the element's first line.
    assert_eq!(
        err.to_string(),
        format!("{path}:4: invalid JSON: expected ident (column 17)")
    );
    let path = write(&dir, "trailing.json", "[{\"text\": \"a\"},]");
    assert!(load_err("qwen2", DatasetSpec::new(&path))
        .to_string()
        .contains("trailing comma"));
}

#[test]
fn missing_source_and_bad_config_are_clear() {
    let err = load_err("qwen2", DatasetSpec::new("/nonexistent/dir/data.jsonl"));
    assert!(
        err.to_string()
            .contains("`/nonexistent/dir/data.jsonl` not found"),
        "{err}"
    );
    let bad: Result<DataConfig, _> = serde_json::from_value(serde_json::json!({ "cutof_len": 10 }));
    assert!(bad.unwrap_err().to_string().contains("cutof_len"));
}

#[test]
fn a_byte_that_is_not_utf8_is_named_with_its_offsets() {
    let dir = scratch("utf8");
    // Line 2 holds a Latin-1 `é` (0xe9) inside a JSON string.
    let mut bytes = format!("{GOOD}\n").into_bytes();
    let line2 = r#"{"messages": [{"role": "user", "content": "caf"#;
    let line2_start = bytes.len();
    bytes.extend_from_slice(line2.as_bytes());
    bytes.push(0xe9);
    bytes.extend_from_slice(br#""}, {"role": "assistant", "content": "x"}]}"#);
    bytes.push(b'\n');
    let path = dir.join("latin1.jsonl");
    std::fs::write(&path, &bytes).unwrap();
    let path_s = path.to_string_lossy().into_owned();
    let err = load_err("qwen2", DatasetSpec::new(&path_s));
    let msg = err.to_string();
    assert_eq!(
        msg,
        format!(
            "{path_s}:2: byte 0xe9 at byte offset {} of the line (byte {} of the file) is not valid UTF-8; the file must be UTF-8 text",
            line2.len(),
            line2_start + line2.len()
        )
    );
    assert!(!msg.contains("unicode code point"), "{msg}");
    assert_eq!(msg.lines().count(), 1);
    // A text file and a JSON array element name the line of the byte too.
    let mut text = b"fine\nalso fine\nbad \xff here\n".to_vec();
    let tpath = dir.join("t.txt");
    std::fs::write(&tpath, &text).unwrap();
    let tpath_s = tpath.to_string_lossy().into_owned();
    let spec = DatasetSpec {
        format: Format::Text,
        ..DatasetSpec::new(&tpath_s)
    };
    let msg = load_err("qwen2", spec).to_string();
    assert!(
        msg.starts_with(&format!(
            "{tpath_s}:3: byte 0xff at byte offset 4 of the line (byte 19 of the file)"
        )),
        "{msg}"
    );
    text.clear();
    text.extend_from_slice(b"[\n  {\"text\": \"ok\"},\n  {\"text\":\n   \"b\xc3(\"}\n]\n");
    let apath = dir.join("a.json");
    std::fs::write(&apath, &text).unwrap();
    let apath_s = apath.to_string_lossy().into_owned();
    let spec = DatasetSpec {
        format: Format::Text,
        ..DatasetSpec::new(&apath_s)
    };
    let msg = load_err("qwen2", spec).to_string();
    assert!(
        msg.starts_with(&format!(
            "{apath_s}:4: byte 0xc3 at byte offset 5 of the line"
        )),
        "{msg}"
    );
    // skip_bad_records skips such a line like any other bad record.
    let data = pipeline("qwen2", vec![DatasetSpec::new(&path_s)], true)
        .load()
        .unwrap();
    assert_eq!((data.train.len(), data.report.skipped), (1, 1));
}
