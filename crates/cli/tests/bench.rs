//! `llmft bench` on the CPU with the tiny shape: one JSON object with sane
//! values, also written to `--json`; bad arguments are one sentence and a
//! non-zero exit.
mod common;
use common::{llmft, scratch};

#[test]
fn tiny_cpu_bench_prints_one_sane_json_object() {
    let dir = scratch("bench");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bench.json");
    let (code, stdout, err) = llmft(&[
        "bench",
        "--model",
        "tiny",
        "--layers",
        "1",
        "--seq",
        "16",
        "--micro-batch",
        "2",
        "--grad-accum",
        "2",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--device",
        "cpu",
        "--dtype",
        "f32",
        "--json",
        file.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    let j: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(j, saved);

    assert_eq!(j["impl"], "llmft");
    assert_eq!(j["model"], "tiny");
    assert_eq!(j["layers"], 1);
    assert_eq!(j["train_type"], "qlora");
    assert_eq!(j["checkpointing"], true);
    assert_eq!(j["device"], "cpu");
    assert_eq!(j["tokens_per_step"], 2 * 16 * 2);
    assert_eq!(j["step_ms"].as_array().unwrap().len(), 3);
    let num = |k: &str| {
        j[k].as_f64()
            .unwrap_or_else(|| panic!("{k} is not a number: {j}"))
    };
    assert!(num("tokens_per_s") > 0.0 && num("step_ms_median") > 0.0);
    let implied = num("tokens_per_step") / (num("step_ms_median") / 1e3);
    assert!((implied / num("tokens_per_s") - 1.0).abs() < 1e-9);
    assert!(num("fwd_bwd_ms_median") <= num("step_ms_median"));
    // Random tokens over a 512-token vocabulary: the loss is about ln 512.
    assert!((num("loss_first") - 512f64.ln()).abs() < 1.0, "{j}");
    // 6·N + 12·L·q_dim·seq with N = one layer's 7 linears + the LM head.
    let linears = 128 * 128 * 2 + 128 * 64 * 2 + 3 * 128 * 256;
    let n = (linears + 512 * 128) as f64;
    assert_eq!(num("params_matmul"), n);
    assert_eq!(num("flops_per_token"), 6.0 * n + 12.0 * 128.0 * 16.0);
    // r = 16 on every linear: r·(in + out) each.
    let lora = 16 * (2 * (128 + 128) + 2 * (128 + 64) + 2 * (128 + 256) + (256 + 128));
    assert_eq!(num("params_trainable"), lora as f64);
    assert!(num("gemm_ceiling_tflops") > 0.0);
    assert!(num("mfu") > 0.0 && num("mfu_frozen_base") < num("mfu"));
    // No device memory to report on the CPU.
    assert!(j["peak_gib"].is_null() && j["device_used_gib"].is_null());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_arguments_are_one_sentence_and_nonzero() {
    for (args, needle) in [
        (vec!["bench", "--model", "gpt-5"], "--model `gpt-5`"),
        (
            vec!["bench", "--model", "tiny", "--train-type", "qlorax"],
            "--train-type `qlorax` is not one of",
        ),
        (
            vec!["bench", "--model", "tiny", "--steps", "2", "--warmup", "2"],
            "must exceed --warmup",
        ),
    ] {
        let (code, stdout, err) = llmft(&args);
        assert_ne!(code, 0, "{args:?}");
        assert!(stdout.is_empty(), "{stdout}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.starts_with("error: ") && err.contains(needle), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
