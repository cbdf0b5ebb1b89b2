//! Fuzz target: see [`llmft_tests::fuzz::checkpoint_manifest`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    llmft_tests::fuzz::checkpoint_manifest(data);
});
