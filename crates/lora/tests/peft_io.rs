//! PEFT format: round trips, key names, and clear errors for bad files.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use llmft_lora::{Adapter, Error, LinearShape, LoraConfig, NamesOrPattern};
use llmft_tensor::{Ctx, DType, Tensor};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("llmft-lora-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn shapes() -> BTreeMap<String, LinearShape> {
    let mut m = BTreeMap::new();
    for l in 0..2 {
        for (n, i, o) in [
            ("self_attn.q_proj", 16, 16),
            ("self_attn.v_proj", 16, 8),
            ("mlp.down_proj", 24, 16),
        ] {
            m.insert(format!("model.layers.{l}.{n}"), LinearShape::new(i, o));
        }
    }
    m.insert("lm_head".into(), LinearShape::new(16, 32));
    m
}

fn config(dora: bool) -> LoraConfig {
    LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        use_dora: dora,
        target_modules: Some(NamesOrPattern::Names(vec![
            "q_proj".into(),
            "v_proj".into(),
            "down_proj".into(),
        ])),
        rank_pattern: BTreeMap::from([("v_proj".to_string(), 2)]),
        init_lora_weights: llmft_lora::InitLoraWeights::Random,
        ..LoraConfig::default()
    }
}

fn adapter(dora: bool) -> Adapter {
    let ctx = Ctx::cpu();
    let mut a = Adapter::new(&ctx, &shapes(), config(dora), 5).unwrap();
    let names: Vec<String> = a
        .pending_magnitudes()
        .iter()
        .map(|s| s.to_string())
        .collect();
    for n in names {
        let s = shapes()[&n];
        let w: Vec<f32> = (0..s.in_features * s.out_features)
            .map(|j| (j as f32 * 0.37).sin())
            .collect();
        let w = Tensor::from_slice(&ctx, &w, &[s.out_features, s.in_features]).unwrap();
        a.init_magnitude(&ctx, &n, &w).unwrap();
    }
    a
}

fn values(a: &Adapter) -> Vec<(String, Vec<f32>)> {
    let mut v = vec![];
    for (n, l) in &a.layers {
        for (j, t) in l.params().iter().enumerate() {
            v.push((format!("{n}/{j}"), t.to_f32_vec().unwrap()));
        }
    }
    v
}

#[test]
fn round_trip_f32_is_exact_and_keys_are_peft() {
    for dora in [false, true] {
        let dir = tmpdir(&format!("rt{dora}"));
        let a = adapter(dora);
        a.save(&dir, DType::F32).unwrap();
        let files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(files.len(), 2, "no temporary files left: {files:?}");

        let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let q = "base_model.model.model.layers.1.self_attn.q_proj";
        assert_eq!(
            st.tensor(&format!("{q}.lora_A.weight")).unwrap().shape(),
            [4, 16]
        );
        assert_eq!(
            st.tensor(&format!("{q}.lora_B.weight")).unwrap().shape(),
            [16, 4]
        );
        let v = "base_model.model.model.layers.0.self_attn.v_proj";
        assert_eq!(
            st.tensor(&format!("{v}.lora_A.weight")).unwrap().shape(),
            [2, 16]
        );
        assert_eq!(st.names().len(), if dora { 18 } else { 12 });
        if dora {
            assert_eq!(
                st.tensor(&format!("{q}.lora_magnitude_vector"))
                    .unwrap()
                    .shape(),
                [16]
            );
        }
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("adapter_config.json")).unwrap())
                .unwrap();
        assert_eq!(json["peft_type"], "LORA");
        assert_eq!(json["r"], 4);
        assert_eq!(json["use_dora"], dora);
        assert_eq!(json["init_lora_weights"], false);

        let b = Adapter::load(&Ctx::cpu(), &dir, &shapes()).unwrap();
        assert_eq!(b.config.rank_pattern, a.config.rank_pattern);
        assert_eq!(values(&a), values(&b));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn round_trip_bf16() {
    let dir = tmpdir("bf16");
    let a = adapter(true);
    a.save(&dir, DType::BF16).unwrap();
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert!(st.tensors().iter().all(|(_, t)| t.dtype() == Dtype::BF16));
    let b = Adapter::load(&Ctx::cpu(), &dir, &shapes()).unwrap();
    for ((n, x), (_, y)) in values(&a).iter().zip(values(&b)) {
        for (p, q) in x.iter().zip(&y) {
            assert!((p - q).abs() <= p.abs() / 256.0, "{n}: {p} vs {q}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Rewrites the weights file of `dir` after `edit` on (key → (shape, f32 values)).
fn rewrite(dir: &Path, edit: impl FnOnce(&mut BTreeMap<String, (Vec<usize>, Vec<u8>)>)) {
    let path = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut m: BTreeMap<String, (Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(k, t)| (k, (t.shape().to_vec(), t.data().to_vec())))
        .collect();
    edit(&mut m);
    let views: Vec<(String, TensorView)> = m
        .iter()
        .map(|(k, (s, d))| {
            (
                k.clone(),
                TensorView::new(Dtype::F32, s.clone(), d).unwrap(),
            )
        })
        .collect();
    let out = safetensors::serialize(views, None::<HashMap<String, String>>).unwrap();
    std::fs::write(&path, out).unwrap();
}

fn load_err(
    name: &str,
    dora: bool,
    edit: impl FnOnce(&mut BTreeMap<String, (Vec<usize>, Vec<u8>)>),
) -> Error {
    let dir = tmpdir(name);
    adapter(dora).save(&dir, DType::F32).unwrap();
    rewrite(&dir, edit);
    let e = Adapter::load(&Ctx::cpu(), &dir, &shapes()).unwrap_err();
    std::fs::remove_dir_all(&dir).unwrap();
    e
}

const Q_A: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
const Q_B: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";

#[test]
fn missing_key_is_named() {
    let e = load_err("missing", false, |m| {
        m.remove(Q_B);
    });
    let s = e.to_string();
    assert!(matches!(e, Error::MissingKey { .. }), "{s}");
    assert!(
        s.contains(Q_B) && s.contains("adapter_model.safetensors"),
        "{s}"
    );
}

#[test]
fn missing_magnitude_is_named() {
    let e = load_err("nomag", true, |m| {
        m.remove("base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector");
    });
    assert!(
        e.to_string()
            .contains("layers.1.mlp.down_proj.lora_magnitude_vector"),
        "{e}"
    );
}

#[test]
fn wrong_shape_is_named() {
    let e = load_err("shape", false, |m| {
        m.insert(Q_A.into(), (vec![4, 15], vec![0; 4 * 15 * 4]));
    });
    let s = e.to_string();
    assert!(matches!(e, Error::KeyShape { .. }), "{s}");
    assert!(
        s.contains(Q_A) && s.contains("[4, 15]") && s.contains("[4, 16]"),
        "{s}"
    );
}

#[test]
fn rank_mismatch_is_named() {
    let e = load_err("rank", false, |m| {
        m.insert(Q_A.into(), (vec![8, 16], vec![0; 8 * 16 * 4]));
    });
    let s = e.to_string();
    assert!(
        matches!(
            e,
            Error::RankMismatch {
                got: 8,
                expected: 4,
                ..
            }
        ),
        "{s}"
    );
    assert!(s.contains(Q_A) && s.contains("r = 4"), "{s}");
}

#[test]
fn unexpected_key_is_named() {
    let e = load_err("extra", false, |m| {
        m.insert(
            "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight".into(),
            (vec![4, 16], vec![0; 256]),
        );
    });
    assert!(matches!(e, Error::UnexpectedKey { .. }), "{e}");
    assert!(e.to_string().contains("mlp.up_proj.lora_A.weight"), "{e}");
}

#[test]
fn bad_config_and_missing_files_name_the_file() {
    let dir = tmpdir("badcfg");
    adapter(false).save(&dir, DType::F32).unwrap();
    std::fs::write(dir.join("adapter_config.json"), b"{\"r\": \"four\"}").unwrap();
    let e = Adapter::load(&Ctx::cpu(), &dir, &shapes()).unwrap_err();
    assert!(
        matches!(e, Error::Json { .. }) && e.to_string().contains("adapter_config.json"),
        "{e}"
    );

    std::fs::write(
        dir.join("adapter_config.json"),
        b"{\"r\": 4, \"target_modules\": [\"q_proj\"], \"bias\": \"all\"}",
    )
    .unwrap();
    let e = Adapter::load(&Ctx::cpu(), &dir, &shapes()).unwrap_err();
    assert!(e.to_string().contains("bias"), "{e}");

    std::fs::write(dir.join("adapter_model.safetensors"), b"not safetensors").unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        b"{\"r\": 4, \"target_modules\": [\"q_proj\"]}",
    )
    .unwrap();
    let e = Adapter::load(&Ctx::cpu(), &dir, &shapes()).unwrap_err();
    assert!(
        matches!(e, Error::Safetensors { .. })
            && e.to_string().contains("adapter_model.safetensors"),
        "{e}"
    );

    std::fs::remove_file(dir.join("adapter_model.safetensors")).unwrap();
    let e = Adapter::load(&Ctx::cpu(), &dir, &shapes()).unwrap_err();
    assert!(
        matches!(e, Error::Io { .. }) && e.to_string().contains("adapter_model.safetensors"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn loads_a_peft_written_config() {
    // The fields PEFT 0.1x writes, nulls included.
    let dir = tmpdir("peftcfg");
    adapter(false).save(&dir, DType::F32).unwrap();
    let cfg = r#"{
      "alpha_pattern": {}, "auto_mapping": null, "base_model_name_or_path": "tiny",
      "bias": "none", "eva_config": null, "exclude_modules": null, "fan_in_fan_out": false,
      "inference_mode": true, "init_lora_weights": true, "layer_replication": null,
      "layers_pattern": null, "layers_to_transform": null, "loftq_config": {},
      "lora_alpha": 8, "lora_bias": false, "lora_dropout": 0.05, "megatron_config": null,
      "megatron_core": "megatron.core", "modules_to_save": null, "peft_type": "LORA",
      "r": 4, "rank_pattern": {"v_proj": 2}, "revision": null,
      "target_modules": ["down_proj", "v_proj", "q_proj"], "task_type": "CAUSAL_LM",
      "use_dora": false, "use_rslora": false
    }"#;
    std::fs::write(dir.join("adapter_config.json"), cfg).unwrap();
    let b = Adapter::load(&Ctx::cpu(), &dir, &shapes()).unwrap();
    assert_eq!(b.layers.len(), 6);
    assert_eq!(b.config.extra["megatron_core"], "megatron.core");
    assert_eq!(b.config.lora_dropout, 0.05);
    // Written back with the unknown fields kept.
    b.save(&dir, DType::F32).unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(json["lora_bias"], false);
    assert_eq!(json["init_lora_weights"], true);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn save_refuses_uninitialized_dora() {
    let a = Adapter::new(&Ctx::cpu(), &shapes(), config(true), 1).unwrap();
    assert_eq!(a.pending_magnitudes().len(), 6);
    let dir = tmpdir("pending");
    let e = a.save(&dir, DType::F32).unwrap_err();
    assert!(matches!(e, Error::MagnitudeNotInitialized { .. }), "{e}");
    assert!(!dir.join("adapter_model.safetensors").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
