//! Fuzz target: see [`llmft_tests::fuzz::dataset_records`].
#![no_main]

use std::sync::Once;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // libfuzzer-sys aborts on every panic, even one that is caught. The
    // Parquet crate panics on some malformed files; llmft's reader catches
    // those (crates/data/src/reader.rs, `parquet_guard`) and reports the
    // file, so a panic raised in that crate (its frames on the stack) is let
    // through to its catcher. Any other panic still aborts the run.
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let abort_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_parquet = info
                .location()
                .is_some_and(|l| l.file().contains("/parquet-"))
                || std::backtrace::Backtrace::force_capture()
                    .to_string()
                    .contains("/parquet-");
            if !in_parquet {
                abort_hook(info);
            }
        }));
    });
    llmft_tests::fuzz::dataset_records(data);
});
