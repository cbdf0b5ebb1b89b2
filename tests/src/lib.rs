//! Cross-crate integration tests of llmft live in `tests/tests/`; the fuzz
//! harness functions (called by the cargo-fuzz targets in `tests/fuzz/` and
//! replayed over the committed corpora by `tests/tests/fuzz_replay.rs`) live
//! in [`fuzz`].
pub mod fuzz;
