//! Fuzz target: see [`llmft_tests::fuzz::peft_adapter`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    llmft_tests::fuzz::peft_adapter(data);
});
