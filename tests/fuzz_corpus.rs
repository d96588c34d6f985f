//! Replays the committed fuzz corpus (`fuzz/corpus/differential`, `fuzz/corpus/arguments`,
//! `fuzz/corpus/options`) and the saved crash inputs (`fuzz/regressions/<target>`) through the same
//! decoding and checks as the fuzz targets (`tests/fuzz_support`), so that they run under plain
//! `cargo test`, on every target the test suite runs on, without libFuzzer or a nightly toolchain.
//!
//! The saved crash inputs of fixed library bugs are replayed by one test per bug, next to a
//! hand-written case of the same bug.

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use smoothce::{reference, Backend, CrossEntropy, Reduction, Smoothing};

mod fuzz_support;

/// The files of `dir` (relative to the crate root) whose names start with `prefix`, sorted; empty
/// when the directory is absent. `cargo test` runs tests in the crate root, and under WASI only
/// that directory is visible, so the relative path is tried first.
fn inputs(dir: &str, prefix: &str) -> Vec<PathBuf> {
    let entries = fs::read_dir(dir)
        .or_else(|_| fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(dir)));
    let Ok(entries) = entries else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("readable directory entry").path())
        .filter(|p| p.is_file())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        })
        .collect();
    files.sort();
    files
}

/// Runs `check` on every file of `dir` named `prefix*`, reporting every failing file; returns the
/// number of files.
fn replay(dir: &str, prefix: &str, check: fn(&[u8])) -> usize {
    let files = inputs(dir, prefix);
    let mut failed = Vec::new();
    for file in &files {
        let data = fs::read(file).expect("readable corpus file");
        if panic::catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            failed.push(file.file_name().map(|n| n.to_string_lossy().into_owned()));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} inputs of {dir} failed (messages above): {failed:?}",
        failed.len(),
        files.len()
    );
    files.len()
}

#[test]
fn corpus_differential() {
    let count = replay("fuzz/corpus/differential", "", fuzz_support::differential);
    assert!(count > 0, "fuzz/corpus/differential is empty or missing");
}

#[test]
fn corpus_arguments() {
    let count = replay("fuzz/corpus/arguments", "", fuzz_support::arguments);
    assert!(count > 0, "fuzz/corpus/arguments is empty or missing");
}

#[test]
fn corpus_options() {
    let count = replay("fuzz/corpus/options", "", fuzz_support::options);
    assert!(count > 0, "fuzz/corpus/options is empty or missing");
}

#[test]
fn regressions_differential() {
    replay(
        "fuzz/regressions/differential",
        "",
        fuzz_support::differential,
    );
}

#[test]
fn regressions_arguments() {
    replay("fuzz/regressions/arguments", "", fuzz_support::arguments);
}

#[test]
fn regressions_options() {
    replay("fuzz/regressions/options", "", fuzz_support::options);
}

/// Kernel/reference disagreements the options fuzzer found and that are fixed since (the
/// rounded, fused shift by a scaled max; rows with a logit scaled past `f32::MAX` not wholly NaN;
/// soft-target mass in an all-masked block dropped; unfused shifts on the portable backend and in
/// the careful sums; a logit scaled below `-f32::MAX`, now a masked class everywhere; weighted
/// off-target cancellation): their saved inputs, `fuzz/regressions/options/fixed-*`.
#[test]
fn fixed_issues_strict() {
    let count = replay("fuzz/regressions/options", "fixed-", fuzz_support::options);
    assert!(count > 0);
}

/// The decoders never fail: short, empty and all-ones inputs are cases too.
#[test]
fn degenerate_inputs() {
    for data in [&[][..], &[0], &[0xFF; 3], &[0xFF; 64], &[0x55; 200]] {
        fuzz_support::differential(data);
        fuzz_support::arguments(data);
        fuzz_support::options(data);
    }
}

fn backends() -> impl Iterator<Item = Backend> {
    [Backend::Portable, Backend::Avx2, Backend::Avx512]
        .into_iter()
        .filter(|b| b.is_available())
}

/// Found by the fuzzer: with off-target smoothing and `eps > 2/3` the target's weight in the loss
/// (`1 - eps`) is below its share of the shifted sum, and a target logit far below the others made
/// `S - r_y` cancel (0.680 for 1.180 on the first row). Fixed by summing the non-target part exactly
/// for such rows (`kernel::exact_rest`).
#[test]
fn off_target_cancellation() {
    let smoothing = Smoothing::OffTarget(1.0);
    for logits in [[-1e30_f32, 1.0, 0.0, 0.5], [-1e6, 0.3, 0.0, 0.7]] {
        let want = reference::row(&logits, 0, smoothing, None).expect("valid row");
        for backend in backends() {
            let mut losses = [0.0_f32];
            CrossEntropy::new(4)
                .smoothing(smoothing)
                .reduction(Reduction::Sum)
                .backend(backend)
                .forward(&logits, &[0], &mut losses)
                .expect("valid call");
            assert!(
                reference::agrees(losses[0], want, reference::LOSS_TOLERANCE),
                "{backend:?} {logits:?}: loss {:e}, reference {want:e}",
                losses[0]
            );
        }
    }
    let count = replay(
        "fuzz/regressions/differential",
        "off-target-cancellation-",
        fuzz_support::differential,
    );
    assert!(count > 0);
}

/// Found by the options fuzzer: the same cancellation with per-class weights, where the target's
/// share of the f32 weighted shifted sum cancelled against its term (8.3125 for 8.3113 on a
/// 4079-class row). `kernel::exact_rest` now sums the weighted non-target part exactly too.
#[test]
fn weighted_off_target_cancellation() {
    let weights = [0.7_f32, 1.3, 0.2, 2.0];
    for smoothing in [Smoothing::OffTarget(1.0), Smoothing::OffTarget(0.9)] {
        for logits in [[-1e30_f32, 1.0, 0.0, 0.5], [-1e6, 0.3, 0.0, 0.7]] {
            let ce = CrossEntropy::new(4)
                .smoothing(smoothing)
                .class_weights(&weights)
                .reduction(Reduction::Sum);
            let mut want = [0.0_f32];
            reference::forward(&ce, &logits, &[0_u32], &mut want).expect("valid call");
            for backend in backends() {
                for entry in ["forward", "forward_backward", "in place"] {
                    let ce = ce.backend(backend);
                    let mut losses = [0.0_f32];
                    let mut grad = logits;
                    match entry {
                        "forward" => ce.forward(&logits, &[0], &mut losses),
                        "forward_backward" => {
                            ce.forward_backward(&logits, &[0], &mut losses, &mut [0.0; 4])
                        }
                        _ => ce.forward_backward_in_place(&mut grad, &[0], &mut losses),
                    }
                    .expect("valid call");
                    assert!(
                        reference::agrees(losses[0], f64::from(want[0]), reference::LOSS_TOLERANCE),
                        "{backend:?} {entry} {smoothing:?} {logits:?}: loss {:e}, reference {:e}",
                        losses[0],
                        want[0]
                    );
                }
            }
        }
    }
}

/// Found by the fuzzer (fixed in 03f6702): f32 lane sums of alike terms drifted by up to 7.6e-6
/// (128 additions per lane between flushes), beyond the 2e-6 contract.
#[test]
fn f32_accumulation() {
    let k = 4101;
    let mut logits = vec![0.0_f32; k];
    logits[32] = 13.5;
    let mut want = vec![0.0_f64; k];
    reference::row(&logits, 32, Smoothing::Uniform(0.0), Some(&mut want)).expect("valid row");
    for backend in backends() {
        let mut losses = [0.0_f32];
        let mut grad = vec![0.0_f32; k];
        CrossEntropy::new(k)
            .reduction(Reduction::Sum)
            .backend(backend)
            .forward_backward(&logits, &[32], &mut losses, &mut grad)
            .expect("valid call");
        let worst = grad
            .iter()
            .zip(&want)
            .map(|(&g, &w)| (f64::from(g) - w).abs())
            .fold(0.0, f64::max);
        assert!(
            worst <= reference::GRAD_TOLERANCE,
            "{backend:?}: gradient off by {worst:e}"
        );
    }
    let count = replay(
        "fuzz/regressions/differential",
        "f32-accumulation-",
        fuzz_support::differential,
    );
    assert!(count > 0);
}
