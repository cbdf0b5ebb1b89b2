//! Untrusted chat templates are bounded: each hostile template below fails
//! with an error naming its file and the limit it hit, within 2 s and under
//! 300 MB of peak memory (measured in a child process, which runs the
//! `hostile_worker` test with `HOSTILE_CASE` set and prints its VmHWM); a
//! real template renders exactly as plain minijinja renders it.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use llmft_data::{Conversation, JinjaTemplate, Message, ModelTokenizer, Role};

const ORIGIN: &str = "/models/evil/tokenizer_config.json";
const CASE_ENV: &str = "HOSTILE_CASE";

fn hostile_source(case: &str) -> &'static str {
    match case {
        "nested_loops" => "{% for a in range(9999) %}{% for b in range(9999) %}{% for c in range(9999) %}x{% endfor %}{% endfor %}{% endfor %}",
        "macro_recursion" => "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        "string_times_a_billion" => "{{ 'x' * 1000000000 }}",
        "string_of_100mb_concatenated" => "{% set a = 'x' * 99999999 %}{{ a ~ a ~ a ~ a }}",
        "doubling_string" => "{% set ns = namespace(s='x' * 1000000) %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
        "doubling_in_macro_args" => "{% macro d(s, n) %}{% if n %}{{ d(s + s, n - 1) }}{% else %}{{ s|length }}{% endif %}{% endmacro %}{{ d('x' * 1000, 30) }}",
        "gigabyte_of_output" => "{% for i in range(1000) %}{{ 'x' * 1000000 }}{% endfor %}",
        _ => panic!("unknown case {case}"),
    }
}

fn conv(n: usize) -> Conversation {
    let messages = (0..n)
        .map(|i| {
            let role = if i % 2 == 0 {
                Role::User
            } else {
                Role::Assistant
            };
            Message::new(
                role,
                format!("message {i}: the quick brown fox jumps over the lazy dog"),
            )
        })
        .collect();
    Conversation {
        messages,
        field: "messages".into(),
    }
}

/// Runs in the child: render the case, print the error and peak RSS.
#[test]
fn hostile_worker() {
    let Ok(case) = std::env::var(CASE_ENV) else {
        return;
    };
    let t = JinjaTemplate::new("model", hostile_source(&case), None, None)
        .unwrap()
        .with_origin(ORIGIN);
    let result = t.render_chat(&conv(2));
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .to_string();
    println!("HOSTILE_ERROR={}", result.err().unwrap_or_default());
    println!("HOSTILE_VMHWM_KB={hwm}");
}

/// The error and peak RSS (bytes) of `case` rendered in a child process,
/// after checking it ended within 2 s.
fn run_case(case: &str) -> (String, u64) {
    let start = Instant::now();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "hostile_worker",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CASE_ENV, case)
        .output()
        .unwrap();
    let elapsed = start.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{case}: worker failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.split_once(key).map(|(_, v)| v))
            .unwrap_or_else(|| panic!("{case}: no {key} in {stdout}"))
            .to_string()
    };
    let error = field("HOSTILE_ERROR=");
    let hwm = field("HOSTILE_VMHWM_KB=").parse::<u64>().unwrap() * 1024;
    eprintln!("{case}: {elapsed:?}, peak {} MB: {error}", hwm / 1_000_000);
    assert!(elapsed < Duration::from_secs(2), "{case} took {elapsed:?}");
    assert!(hwm < 300_000_000, "{case}: peak RSS {hwm} bytes");
    assert!(
        error.starts_with(&format!("the template from {ORIGIN} stopped")),
        "{case}: {error}"
    );
    assert!(
        error.ends_with("llmft bounds untrusted templates)"),
        "{case}: {error}"
    );
    (error, hwm)
}

#[test]
fn nested_loops_run_out_of_fuel() {
    let (e, _) = run_case("nested_loops");
    assert!(e.contains("steps (it loops too long"), "{e}");
}

#[test]
fn deep_macro_recursion_stops_at_the_limit() {
    let (e, _) = run_case("macro_recursion");
    assert!(e.contains("recursion depth"), "{e}");
}

#[test]
fn string_multiplied_to_a_gigabyte_is_refused() {
    let (e, _) = run_case("string_times_a_billion");
    assert!(e.contains("repeating a string"), "{e}");
}

#[test]
fn large_strings_concatenated_are_refused() {
    let (e, _) = run_case("string_of_100mb_concatenated");
    assert!(e.contains("value over"), "{e}");
}

#[test]
fn a_string_doubling_in_a_loop_is_refused() {
    let (e, _) = run_case("doubling_string");
    assert!(e.contains("value over"), "{e}");
}

#[test]
fn a_string_doubling_through_macro_arguments_is_refused() {
    let (e, _) = run_case("doubling_in_macro_args");
    assert!(e.contains("value over"), "{e}");
}

#[test]
fn a_gigabyte_of_output_is_refused() {
    let (e, _) = run_case("gigabyte_of_output");
    assert!(e.contains("MiB of output"), "{e}");
}

/// The same template without llmft's bounds: plain minijinja configured
/// like transformers.
fn plain_render(source: &str, messages: &[minijinja::Value], agp: bool) -> String {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template("t", source).unwrap();
    env.get_template("t")
        .unwrap()
        .render(minijinja::context! {
            messages => messages,
            add_generation_prompt => agp,
            bos_token => "<s>",
            eos_token => "</s>",
        })
        .unwrap()
}

/// Every fixture model's template renders a long conversation (400
/// messages) exactly as without the bounds, and errors name the file.
#[test]
fn real_templates_render_unchanged_under_the_bounds() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/chat");
    let long = conv(400);
    let messages: Vec<minijinja::Value> = long
        .messages
        .iter()
        .map(minijinja::Value::from_serialize)
        .collect();
    let mut checked = 0;
    for entry in std::fs::read_dir(&fixtures).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.join("tokenizer_config.json").exists() {
            continue;
        }
        let tok = ModelTokenizer::from_dir(&dir).unwrap();
        assert_eq!(
            tok.chat_template_origin(),
            Some(dir.join("tokenizer_config.json").as_path())
        );
        let source = tok.chat_template().unwrap();
        let t = JinjaTemplate::new("model", source, Some("<s>"), Some("</s>")).unwrap();
        for agp in [false, true] {
            let start = Instant::now();
            let got = t.render(&messages, agp).unwrap();
            assert!(start.elapsed() < Duration::from_secs(1));
            assert_eq!(
                got,
                plain_render(source, &messages, agp),
                "{}",
                dir.display()
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 5);
}
