//! Benchmarks of llmft live in `benches/benches/`.
