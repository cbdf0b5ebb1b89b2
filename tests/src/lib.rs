//! Cross-crate integration tests of llmft live in `tests/tests/`.
