//! Bad checkpoints give one clear error naming the file and tensor.
use std::path::{Path, PathBuf};

use llmft_models::{Error, Model};
use llmft_tensor::{Ctx, DType};

fn copy_fixture(kind: &str, name: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(kind);
    let dst = std::env::temp_dir().join(format!("llmft-models-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    dst
}

fn load_err(dir: &Path) -> String {
    match Model::from_dir(dir, &Ctx::cpu(), DType::F32) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn truncated_safetensors_names_the_file() {
    let d = copy_fixture("llama3", "trunc");
    let f = d.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("model.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );
    std::fs::write(&f, b"garbage").unwrap();
    let e = load_err(&d);
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn missing_shard_and_missing_tensor_are_named() {
    let d = copy_fixture("llama3", "shard");
    std::fs::rename(
        d.join("model.safetensors"),
        d.join("model-00001-of-00002.safetensors"),
    )
    .unwrap();
    let st = std::fs::read(d.join("model-00001-of-00002.safetensors")).unwrap();
    let names: Vec<String> = safetensors::SafeTensors::deserialize(&st)
        .unwrap()
        .names()
        .into_iter()
        .map(|s| s.to_string())
        .collect();
    let mut map = serde_json::Map::new();
    for n in &names {
        let file = if n.contains("layers.1.") {
            "model-00002-of-00002.safetensors"
        } else {
            "model-00001-of-00002.safetensors"
        };
        map.insert(n.clone(), file.into());
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let e = load_err(&d);
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");

    // A tensor absent from the index.
    map.remove("model.layers.0.mlp.up_proj.weight");
    for v in map.values_mut() {
        *v = "model-00001-of-00002.safetensors".into();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("model.layers.0.mlp.up_proj.weight") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn config_mismatch_names_the_tensor() {
    let d = copy_fixture("llama3", "shape");
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    let cfg = cfg.replace("\"intermediate_size\": 96", "\"intermediate_size\": 80");
    std::fs::write(d.join("config.json"), cfg).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("mlp.gate_proj.weight") && e.contains("[96, 64]") && e.contains("[80, 64]"),
        "{e}"
    );
    match Model::from_dir(&d.join("nope"), &Ctx::cpu(), DType::F32) {
        Err(Error::Io { path, .. }) => assert!(path.ends_with("config.json")),
        Err(e) => panic!("unexpected {e}"),
        Ok(_) => panic!("should fail"),
    }
}
