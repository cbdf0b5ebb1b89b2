//! Fuzz target: see [`llmft_tests::fuzz::dataset_records`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    llmft_tests::fuzz::dataset_records(data);
});
