//! Options fuzzing: every loss option of `CrossEntropy` (class and target weights, z-loss,
//! soft-cap, logit scale, class mask, upstream gradient, mean denominator, per-row scales), every
//! target type (soft targets included) and the per-row extras, through the `*_with` entry points,
//! against `smoothce::reference`. The decoding and the checks live in `tests/fuzz_support`, shared
//! with `tests/fuzz_corpus.rs`.

#![no_main]

#[allow(dead_code)]
#[path = "../../tests/fuzz_support/mod.rs"]
mod support;

libfuzzer_sys::fuzz_target!(|data: &[u8]| support::options(data));
