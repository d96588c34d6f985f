//! Differential fuzzing: the kernels (every backend, every entry point) against
//! `smoothce::reference` on batches with special values, masks and unaligned slices. The decoding
//! and the checks live in `tests/fuzz_support`, shared with `tests/fuzz_corpus.rs`.

#![no_main]

#[allow(dead_code)]
#[path = "../../tests/fuzz_support/mod.rs"]
mod support;

libfuzzer_sys::fuzz_target!(|data: &[u8]| support::differential(data));
