//! Fuzz target: see [`llmft_tests::fuzz::quant_metadata`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    llmft_tests::fuzz::quant_metadata(data);
});
