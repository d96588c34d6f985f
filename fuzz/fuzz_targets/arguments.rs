//! Argument-check fuzzing: arbitrary lengths, targets, `K`, `eps` and ignore index. The call must
//! not panic, must fail exactly when a documented rule is broken, and must write nothing when it
//! fails. The decoding and the checks live in `tests/fuzz_support`, shared with
//! `tests/fuzz_corpus.rs`.

#![no_main]

#[allow(dead_code)]
#[path = "../../tests/fuzz_support/mod.rs"]
mod support;

libfuzzer_sys::fuzz_target!(|data: &[u8]| support::arguments(data));
