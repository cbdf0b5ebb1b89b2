//! Finding a model folder: a path, or a Hugging Face model id in the local
//! cache, downloaded when absent and the network is allowed.
use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo};

use crate::{Error, Result};

/// Files fetched for a model besides its weights (optional ones may be absent).
const EXTRA_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
];

/// Resolves `reference` to a model folder: an existing directory as is;
/// otherwise a model id (`org/name`, optionally `org/name@revision`) looked up
/// in the Hugging Face cache (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`),
/// and downloaded into it unless `HF_HUB_OFFLINE=1`.
pub fn resolve_model(reference: &str) -> Result<PathBuf> {
    let offline =
        std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    resolve_model_in(reference, &Cache::from_env(), offline)
}

/// Fails unless `reference` (not an existing folder) reads as `org/name`.
fn not_a_folder_or_id(reference: &str) -> Result<()> {
    let looks_like_id = reference.split('/').count() == 2
        && !reference.starts_with('.')
        && !reference.starts_with('/');
    if looks_like_id {
        return Ok(());
    }
    Err(Error::Io {
        path: PathBuf::from(reference),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such model folder"),
    })
}

fn repo_of(reference: &str) -> Repo {
    match reference.split_once('@') {
        Some((id, rev)) => {
            Repo::with_revision(id.to_string(), hf_hub::RepoType::Model, rev.to_string())
        }
        None => Repo::model(reference.to_string()),
    }
}

/// [`resolve_model`] with an explicit cache and offline switch.
pub fn resolve_model_in(reference: &str, cache: &Cache, offline: bool) -> Result<PathBuf> {
    let p = Path::new(reference);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    not_a_folder_or_id(reference)?;
    let repo = repo_of(reference);
    if let Some(cfg) = cache.repo(repo.clone()).get("config.json") {
        if let Some(dir) = cfg.parent() {
            let has_weights = dir.join("model.safetensors").is_file()
                || dir.join("model.safetensors.index.json").is_file();
            if has_weights {
                return Ok(dir.to_path_buf());
            }
        }
    }
    if offline {
        return Err(Error::Config {
            path: cache.path().clone(),
            msg: format!(
                "model `{reference}` is not in the Hugging Face cache and HF_HUB_OFFLINE is set"
            ),
        });
    }
    download(reference, repo, cache)
}

/// The `config.json` of `reference` (a model folder, or a hub id looked up
/// in the cache and, unless `HF_HUB_OFFLINE=1`, downloaded alone — no
/// weights), for tools that need only the model's shape.
pub fn resolve_config(reference: &str) -> Result<PathBuf> {
    let p = Path::new(reference);
    if p.is_dir() {
        return Ok(p.join("config.json"));
    }
    not_a_folder_or_id(reference)?;
    let cache = Cache::from_env();
    let repo = repo_of(reference);
    if let Some(cfg) = cache.repo(repo.clone()).get("config.json") {
        return Ok(cfg);
    }
    if std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        return Err(Error::Config {
            path: cache.path().clone(),
            msg: format!(
                "the config.json of model `{reference}` is not in the Hugging Face cache and HF_HUB_OFFLINE is set"
            ),
        });
    }
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
        .with_progress(false)
        .build()
        .and_then(|api| api.repo(repo).get("config.json"));
    api.map_err(|e| Error::Config {
        path: cache.path().clone(),
        msg: format!("downloading `config.json` of model `{reference}` failed: {e}"),
    })
}

fn download(reference: &str, repo: Repo, cache: &Cache) -> Result<PathBuf> {
    let fail = |what: &str, e: &dyn std::fmt::Display| Error::Config {
        path: cache.path().clone(),
        msg: format!("downloading `{what}` of model `{reference}` failed: {e}"),
    };
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
        .with_progress(false)
        .build()
        .map_err(|e| fail("(client)", &e))?;
    let r = api.repo(repo);
    let config = r.get("config.json").map_err(|e| fail("config.json", &e))?;
    match r.get("model.safetensors.index.json") {
        Ok(index) => {
            let text = std::fs::read_to_string(&index).map_err(|source| Error::Io {
                path: index.clone(),
                source,
            })?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
                path: index.clone(),
                msg: e.to_string(),
            })?;
            let mut files: Vec<String> = v["weight_map"]
                .as_object()
                .map(|m| {
                    m.values()
                        .filter_map(|f| f.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            files.sort();
            files.dedup();
            for f in files {
                r.get(&f).map_err(|e| fail(&f, &e))?;
            }
        }
        Err(_) => {
            r.get("model.safetensors")
                .map_err(|e| fail("model.safetensors", &e))?;
        }
    }
    for f in EXTRA_FILES {
        let _ = r.get(f);
    }
    Ok(config
        .parent()
        .expect("a cached file has a folder")
        .to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cached_snapshots_and_reports_offline_misses() {
        let root = std::env::temp_dir().join(format!("llmft-hfcache-{}", std::process::id()));
        let repo = root.join("models--org--tiny");
        let snap = repo.join("snapshots").join("abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), "abc123").unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        std::fs::write(snap.join("model.safetensors"), "").unwrap();
        let cache = Cache::new(root.clone());
        assert_eq!(resolve_model_in("org/tiny", &cache, true).unwrap(), snap);
        let e = resolve_model_in("org/other", &cache, true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("org/other") && e.contains("HF_HUB_OFFLINE"),
            "{e}"
        );
        let e = resolve_model_in("./no/such/dir", &cache, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no such model folder"), "{e}");
        assert_eq!(
            resolve_model_in(root.to_str().unwrap(), &cache, true).unwrap(),
            root
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
