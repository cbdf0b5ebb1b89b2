//! Fuzz target: see [`llmft_tests::fuzz::safetensors_index`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    llmft_tests::fuzz::safetensors_index(data);
});
