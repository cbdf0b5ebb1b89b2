//! Dataset ids resolve through a local Hugging Face hub cache (no network).
//! Its own test binary because it sets HF_HUB_CACHE.

use std::path::Path;

use llmft_data::{resolve, DataConfig, DatasetSpec, ModelTokenizer, Pipeline};

#[test]
fn dataset_id_resolves_to_the_cached_snapshot_split() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let hub = std::env::temp_dir().join(format!("llmft-data-hub-{}", std::process::id()));
    let repo = hub.join("datasets--someone--tiny-chat");
    let snap = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(snap.join("data")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    std::fs::copy(
        fixtures.join("formats/sharegpt.parquet"),
        snap.join("data/train-00000-of-00001.parquet"),
    )
    .unwrap();
    std::fs::copy(
        fixtures.join("formats/messages.jsonl"),
        snap.join("data/test.jsonl"),
    )
    .unwrap();
    std::fs::write(snap.join("README.md"), "card").unwrap();
    // SAFETY-free in edition 2021; this binary has only this test.
    std::env::set_var("HF_HUB_CACHE", &hub);

    let train = resolve("someone/tiny-chat", None).unwrap();
    assert_eq!(train, vec![snap.join("data/train-00000-of-00001.parquet")]);
    let test = resolve("someone/tiny-chat", Some("test")).unwrap();
    assert_eq!(test, vec![snap.join("data/test.jsonl")]);
    assert!(resolve("someone/absent", None).is_err());

    let tok = ModelTokenizer::from_dir(fixtures.join("chat/qwen2")).unwrap();
    let config = DataConfig {
        train: vec![DatasetSpec::new("someone/tiny-chat")],
        ..DataConfig::default()
    };
    let data = Pipeline::new(config, tok).unwrap().load().unwrap();
    assert_eq!(data.train.len(), 2);
}
