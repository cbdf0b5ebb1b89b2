//! Fuzz target: see [`llmft_tests::fuzz::layered_config`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    llmft_tests::fuzz::layered_config(data);
});
