//! Where data files are: a file, a directory (recursively), a glob, or a
//! Hugging Face dataset id looked up in the local hub cache (no network).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// File kinds the readers understand, by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// `.jsonl`, `.ndjson`: one JSON record per line.
    JsonLines,
    /// `.json`: a JSON array of records (or JSON lines when the file does
    /// not start with `[`).
    Json,
    /// `.parquet`: one record per row (snappy or uncompressed).
    Parquet,
    /// `.txt`, `.text`, `.md`: one text record per non-empty line.
    Text,
}

impl FileKind {
    /// The kind of `path`, from its extension.
    pub fn of(path: &Path) -> Option<Self> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        Some(match ext.as_str() {
            "jsonl" | "ndjson" => FileKind::JsonLines,
            "json" => FileKind::Json,
            "parquet" => FileKind::Parquet,
            "txt" | "text" | "md" => FileKind::Text,
            _ => return None,
        })
    }
}

/// The data files `source` names, sorted. `split` keeps files whose path
/// has the split's name as a word (`train-00000-of-00002.parquet`,
/// `data/validation.jsonl`, `test/0.parquet`; `validation` also matches
/// `valid`, `val`, `dev`). A dataset id defaults to split `train` and, when
/// no file names a split, takes every file.
pub fn resolve(source: &str, split: Option<&str>) -> Result<Vec<PathBuf>> {
    let path = Path::new(source);
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if path.is_dir() {
        return pick_split(source, walk(path)?, path, split, false);
    }
    if source.contains(['*', '?', '[']) {
        let mut files = Vec::new();
        let entries = glob::glob(source)
            .map_err(|e| Error::config("path", format!("bad glob `{source}`: {e}")))?;
        for entry in entries.flatten() {
            if entry.is_file() && FileKind::of(&entry).is_some() {
                files.push(entry);
            } else if entry.is_dir() {
                files.extend(walk(&entry)?);
            }
        }
        files.sort();
        if files.is_empty() {
            return Err(Error::NotFound(source.to_string()));
        }
        return Ok(files);
    }
    if let Some(snapshot) = hub_snapshot(source) {
        return pick_split(
            source,
            walk(&snapshot)?,
            &snapshot,
            Some(split.unwrap_or("train")),
            true,
        );
    }
    Err(Error::NotFound(source.to_string()))
}

/// The hub cache directory: `$HF_HUB_CACHE`, `$HF_HOME/hub`, or
/// `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(p).join("hub"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
}

/// The snapshot directory of dataset `id` (`owner/name`) in the hub cache:
/// the one `refs/main` points to, else the most recently modified.
pub fn hub_snapshot(id: &str) -> Option<PathBuf> {
    if id.starts_with(['/', '.']) || id.split('/').count() > 2 || id.is_empty() {
        return None;
    }
    let repo = hub_cache_dir()?.join(format!("datasets--{}", id.replace('/', "--")));
    let snapshots = repo.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs/main")) {
        let dir = snapshots.join(rev.trim());
        if dir.is_dir() {
            return Some(dir);
        }
    }
    std::fs::read_dir(&snapshots)
        .ok()?
        .flatten()
        .filter(|e| e.path().is_dir())
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

/// Data files under `dir`, recursively, sorted; hidden entries skipped.
/// Symlinks are followed (hub snapshots link into `blobs/`).
fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(|e| Error::io(&d, e))? {
            let entry = entry.map_err(|e| Error::io(&d, e))?;
            let p = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else if p.is_file() && FileKind::of(&p).is_some() {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

const SPLIT_WORDS: [(&str, &[&str]); 3] = [
    ("train", &["train", "training"]),
    ("validation", &["validation", "valid", "val", "dev"]),
    ("test", &["test", "testing"]),
];

fn split_of(rel: &Path) -> Option<&'static str> {
    let s = rel.to_string_lossy().to_ascii_lowercase();
    let words: Vec<&str> = s.split(|c: char| !c.is_ascii_alphanumeric()).collect();
    SPLIT_WORDS
        .iter()
        .find(|(_, aliases)| words.iter().any(|w| aliases.contains(w)))
        .map(|(name, _)| *name)
}

fn pick_split(
    source: &str,
    files: Vec<PathBuf>,
    root: &Path,
    split: Option<&str>,
    all_if_unnamed: bool,
) -> Result<Vec<PathBuf>> {
    let Some(split) = split else {
        return non_empty(source, files);
    };
    let want = SPLIT_WORDS
        .iter()
        .find(|(name, aliases)| *name == split || aliases.contains(&split))
        .map_or(split, |(name, _)| *name);
    let rel = |p: &PathBuf| p.strip_prefix(root).unwrap_or(p).to_path_buf();
    let named = files.iter().any(|p| split_of(&rel(p)).is_some());
    if !named && all_if_unnamed && want == "train" {
        return non_empty(source, files);
    }
    let picked = files
        .into_iter()
        .filter(|p| split_of(&rel(p)) == Some(want))
        .collect();
    non_empty(&format!("{source} (split `{split}`)"), picked)
}

fn non_empty(source: &str, files: Vec<PathBuf>) -> Result<Vec<PathBuf>> {
    if files.is_empty() {
        Err(Error::NotFound(source.to_string()))
    } else {
        Ok(files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_words_match_hub_layouts() {
        assert_eq!(
            split_of(Path::new("data/train-00000-of-00002.parquet")),
            Some("train")
        );
        assert_eq!(
            split_of(Path::new("default/validation/0000.parquet")),
            Some("validation")
        );
        assert_eq!(split_of(Path::new("dev.jsonl")), Some("validation"));
        assert_eq!(split_of(Path::new("data/alpaca_en.json")), None);
        assert_eq!(split_of(Path::new("trainer_notes.json")), None);
    }
}
