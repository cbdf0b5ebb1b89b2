//! `llmft estimate`: the table, the JSON object, a model folder's
//! config.json, the `--gpu-memory` search and its errors. (Agreement with
//! the measured peaks: crates/trainer/tests/estimate_vs_benches.rs.)
use std::process::Command;

use serde_json::Value;

fn estimate(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_llmft"))
        .arg("estimate")
        .args(args)
        .output()
        .expect("llmft runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let (ok, out, err) = estimate(&a);
    assert!(ok, "{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn the_json_object_adds_up_and_follows_the_settings() {
    let v = json(&["--model", "llama3-8b", "--micro-batch", "2"]);
    let sum = |side: &str| -> f64 {
        [
            "weights_gib",
            "trainable_gib",
            "activations_gib",
            "workspace_gib",
        ]
        .iter()
        .map(|k| v[side][k].as_f64().unwrap())
        .sum()
    };
    let gpu = v["gpu_peak_gib"].as_f64().unwrap();
    assert!((sum("gpu") - gpu).abs() < 1e-9, "{v}");
    assert!((sum("host") - v["host_peak_gib"].as_f64().unwrap()).abs() < 1e-9);
    assert!(
        gpu > 8.0 && gpu < 11.0,
        "8B QLoRA 2048×2 peaks near 9.7 GiB: {gpu}"
    );
    assert!(v["gpu_needed_gib"].as_f64().unwrap() > gpu);

    // Offloading the parameters moves the weights to the host.
    let off = json(&[
        "--model",
        "llama3-8b",
        "--micro-batch",
        "2",
        "--offload-params",
    ]);
    assert!(off["gpu"]["weights_gib"].as_f64() < v["gpu"]["weights_gib"].as_f64());
    assert!(off["host"]["weights_gib"].as_f64().unwrap() > 3.0, "{off}");
    // Two ranks sharding the weights hold half each.
    let two = json(&["--model", "llama2-70b", "--world-size", "2"]);
    let one = json(&["--model", "llama2-70b"]);
    let (w2, w1) = (
        two["gpu"]["weights_gib"].as_f64().unwrap(),
        one["gpu"]["weights_gib"].as_f64().unwrap(),
    );
    assert!(w2 < 0.6 * w1 && w2 > 0.45 * w1, "{w2} vs {w1}");
    assert_eq!(two["settings"]["world_size"], 2);
}

#[test]
fn the_table_names_the_breakdown_and_the_need() {
    let (ok, out, err) = estimate(&[
        "--model",
        "llama2-70b",
        "--layers",
        "8",
        "--micro-batch",
        "2",
    ]);
    assert!(ok, "{err}");
    for want in [
        "weights",
        "trainable state",
        "activations",
        "workspace",
        "total",
        "GPU GiB",
        "host GiB",
        "needs",
    ] {
        assert!(out.contains(want), "no `{want}` in:\n{out}");
    }
    assert!(
        out.contains("8 layers") && out.contains("qlora r16"),
        "{out}"
    );
}

#[test]
fn a_model_folder_needs_only_its_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
        "tie_word_embeddings": false
    });
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let folder = json(&["--model", dir.path().to_str().unwrap()]);
    let preset = json(&["--model", "llama2-7b"]);
    assert_eq!(
        folder["gpu_peak_gib"], preset["gpu_peak_gib"],
        "the folder is Llama-2-7B's shape"
    );

    let (ok, _, err) = estimate(&["--model", "/no/such/model"]);
    assert!(!ok && err.contains("/no/such/model"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn the_search_lists_only_settings_that_fit_fastest_first() {
    let v = json(&[
        "--model",
        "llama2-70b",
        "--gpu-memory",
        "24",
        "--gpus",
        "2",
        "--micro-batch",
        "2",
    ]);
    let fits = v["fits"].as_array().unwrap();
    assert!(!fits.is_empty(), "70B QLoRA fits two 24 GiB GPUs: {v}");
    let mut last = 0.0;
    for f in fits {
        assert!(f["gpu_needed_gib"].as_f64().unwrap() <= 24.0, "{f}");
        let t = f["relative_step_time"].as_f64().unwrap();
        assert!(t >= last - 0.01, "not fastest first: {t} after {last}");
        last = t;
        assert_eq!(f["settings"]["world_size"], 2);
    }
    // On one such GPU the weights alone (37 GiB) do not fit: only offloading does.
    let one = json(&["--model", "llama2-70b", "--gpu-memory", "24", "--gpus", "1"]);
    for f in one["fits"].as_array().unwrap() {
        assert_eq!(f["settings"]["offload"]["params"], true, "{f}");
    }
    // Nothing fits 1 GiB: one sentence saying what to change.
    let (ok, _, err) = estimate(&["--model", "llama2-70b", "--gpu-memory", "1"]);
    assert!(
        !ok && err.contains("no setting") && err.contains("1 GiB"),
        "{err}"
    );
}

#[test]
fn a_config_file_estimates_the_same_job_as_the_flags() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("job.toml");
    std::fs::write(
        &cfg,
        "[model]\npath = \"llama2-70b\"\ncheckpointing = true\n\
         [lora]\nr = 16\ntarget_modules = \"all-linear\"\n\
         [data]\ncutoff_len = 2048\n[data.batch]\nbatch_size = 2\n\
         [train]\ntrain_type = \"qlora\"\n\
         [offload]\nparams = true\nactivations = true\n\
         [dist]\nstrategy = \"full_shard\"\n",
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    let from_file = json(&["-c", c, "--world-size", "2"]);
    let from_flags = json(&[
        "--model",
        "llama2-70b",
        "--micro-batch",
        "2",
        "--offload-params",
        "--offload-activations",
        "--world-size",
        "2",
    ]);
    assert_eq!(from_file["gpu_peak_gib"], from_flags["gpu_peak_gib"]);
    assert_eq!(from_file["host_peak_gib"], from_flags["host_peak_gib"]);
    // Fewer adapted linears: less trainable state.
    let qv = json(&[
        "-c",
        c,
        "--set",
        "lora.target_modules=[\"q_proj\",\"v_proj\"]",
    ]);
    assert!(
        qv["gpu"]["trainable_gib"].as_f64() < from_file["gpu"]["trainable_gib"].as_f64(),
        "{qv}"
    );
    // No model named: one sentence saying which key to set.
    let empty = dir.path().join("empty.toml");
    std::fs::write(&empty, "[lora]\nr = 8\n").unwrap();
    let (ok, _, err) = estimate(&["-c", empty.to_str().unwrap()]);
    assert!(!ok && err.contains("model.path"), "{err}");
}
