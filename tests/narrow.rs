//! The narrow-row kernel (rows of at most 32 classes, one row per SIMD lane): whole groups,
//! partial groups, rows it hands back to the row kernel (non-finite values, ranges too wide for
//! its f32 sums) in the middle of a group, and the options it computes itself, on every backend.

mod common;

use common::{backends, check_all, Rng};
use smoothce::{reference, CrossEntropy, Extras, Reduction, Smoothing, Targets};

/// Values that send a row back to the row kernel, or that it must survive.
const SPECIAL: [f32; 7] = [
    f32::NAN,
    f32::INFINITY,
    f32::NEG_INFINITY,
    f32::MAX,
    -f32::MAX,
    1e37,
    -3e38,
];

/// Batches of 1 to 50 rows of 1 to 33 classes (33: the row kernel), with special values in some rows, against the
/// reference on every backend and entry point (in place bit-identical to out of place).
#[test]
fn batches_with_special_rows_match_the_reference() {
    let mut rng = Rng::new(0x4a77_0001);
    for k in (1..=18).chain([24, 31, 32, 33]) {
        for &n in &[1_usize, 3, 8, 15, 16, 17, 33, 50] {
            let offset = 50.0 * rng.symmetric();
            let mut logits = common::random_batch(&mut rng, n, k, offset, 30.0);
            let mut targets = common::random_targets(&mut rng, n, k);
            for row in 0..n {
                match rng.below(8) {
                    0 => {
                        let v = SPECIAL[rng.below(SPECIAL.len())];
                        logits[row * k + rng.below(k)] = v;
                    }
                    1 => targets[row] = u32::MAX,
                    _ => {}
                }
            }
            for smoothing in common::smoothings(0.05 + 0.9 * rng.unit() as f32, k) {
                for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                    let ce = CrossEntropy::new(k)
                        .smoothing(smoothing)
                        .ignore_index(u32::MAX)
                        .reduction(reduction);
                    if let Err(e) = check_all(&ce, &logits, &targets) {
                        panic!("K = {k}, N = {n}: {e}");
                    }
                }
            }
        }
    }
}

/// One configuration of the options the narrow kernel computes itself.
struct Options {
    z_loss: f32,
    scale: f32,
    target_weights: Option<Vec<f32>>,
    row_scales: Option<Vec<f32>>,
}

/// The results of one call (the kernel's, or the reference's if `oracle`): loss, losses,
/// gradient, lse, z-loss, correctness.
type Results = (f32, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<bool>);

/// `forward_backward_with` with every per-row extra (and `rows` as per-row upstream scales unless
/// empty), on the kernel or, if `oracle`, on the reference; outputs start as NaN.
fn run_with(
    ce: &CrossEntropy<'_>,
    logits: &[f32],
    targets: Targets<'_>,
    rows: &[f32],
    oracle: bool,
) -> Results {
    let n = targets.rows(ce.classes()).unwrap_or(0);
    let mut losses = vec![f32::NAN; n];
    let mut grad = vec![f32::NAN; logits.len()];
    let (mut lse, mut z, mut correct) = (vec![f32::NAN; n], vec![f32::NAN; n], vec![false; n]);
    let extras = Extras {
        lse: Some(&mut lse),
        z_loss: Some(&mut z),
        correct: Some(&mut correct),
        row_scales: (!rows.is_empty()).then_some(rows),
    };
    let summary = if oracle {
        reference::forward_backward_with(ce, logits, targets, &mut losses, &mut grad, extras)
    } else {
        ce.forward_backward_with(logits, targets, &mut losses, &mut grad, extras)
    }
    .unwrap_or_else(|e| panic!("{ce:?} (reference: {oracle}): {e}"));
    (summary.loss, losses, grad, lse, z, correct)
}

/// With the z-loss, a logit scale, per-target weights and per-row upstream scales (with the
/// PyTorch ignore index -100): every row matches the reference, and its bits do not depend on
/// its position in the batch (each row alone gives the same bits).
#[test]
fn options_match_the_reference_and_rows_are_independent() {
    let mut rng = Rng::new(0x4a77_0002);
    for k in [1_usize, 2, 5, 10, 16, 17, 32] {
        let n = 37;
        let offset = 10.0 * rng.symmetric();
        let mut logits = common::random_batch(&mut rng, n, k, offset, 20.0);
        let targets: Vec<i64> = (0..n)
            .map(|_| {
                if rng.below(6) == 0 {
                    -100
                } else {
                    rng.below(k) as i64
                }
            })
            .collect();
        logits[7 * k] = f32::NAN;
        logits[20 * k + k - 1] = f32::INFINITY;
        let options = [
            Options {
                z_loss: 1e-3,
                scale: 1.7,
                target_weights: None,
                row_scales: None,
            },
            Options {
                z_loss: 0.0,
                scale: 1.0,
                target_weights: Some((0..k).map(|_| 2.0 * rng.unit() as f32).collect()),
                row_scales: None,
            },
            Options {
                z_loss: 0.05,
                scale: 0.5,
                target_weights: None,
                row_scales: Some((0..n).map(|_| 3.0 * rng.symmetric() as f32).collect()),
            },
        ];
        for opt in &options {
            for smoothing in common::smoothings(0.3, k) {
                check_options(k, smoothing, opt, &logits, &targets);
            }
        }
    }
}

/// One configuration of [`options_match_the_reference_and_rows_are_independent`].
fn check_options(k: usize, smoothing: Smoothing, opt: &Options, logits: &[f32], targets: &[i64]) {
    let n = targets.len();
    let reduction = if opt.row_scales.is_some() {
        Reduction::None
    } else {
        Reduction::Sum
    };
    let mut base = CrossEntropy::new(k)
        .smoothing(smoothing)
        .ignore_index_signed(-100)
        .reduction(reduction)
        .z_loss(opt.z_loss)
        .logit_scale(opt.scale);
    if let Some(w) = &opt.target_weights {
        base = base.target_weights(w);
    }
    let rows = opt.row_scales.as_deref().unwrap_or(&[]);
    let want = run_with(&base, logits, Targets::from(targets), rows, true);
    for backend in backends() {
        let ce = base.backend(backend);
        let ctx = format!("K = {k} {ce:?}");
        let got = run_with(&ce, logits, Targets::from(targets), rows, false);
        let tol = reference::LOSS_TOLERANCE * 4.0;
        assert!(
            reference::agrees(got.0, f64::from(want.0), tol) || (got.0.is_nan() && want.0.is_nan()),
            "{ctx}: total {} want {}",
            got.0,
            want.0
        );
        assert_eq!(got.5, want.5, "{ctx}: correct");
        for row in 0..n {
            for (what, g, w) in [
                ("loss", got.1[row], want.1[row]),
                ("lse", got.3[row], want.3[row]),
                ("z", got.4[row], want.4[row]),
            ] {
                assert!(
                    reference::agrees(g, f64::from(w), tol) || (g.is_nan() && w.is_nan()),
                    "{ctx}: row {row} {what} {g} want {w}"
                );
            }
            let factor = rows.get(row).map_or(1.0, |r| f64::from(r.abs()).max(1.0))
                * f64::from(opt.scale)
                * opt
                    .target_weights
                    .as_ref()
                    .map_or(1.0, |w| w.iter().fold(1.0_f64, |m, &v| m.max(v.into())));
            for j in row * k..(row + 1) * k {
                let (g, w) = (got.2[j], want.2[j]);
                assert!(
                    (g.is_nan() && w.is_nan())
                        || f64::from(g - w).abs() <= 2.0 * reference::GRAD_TOLERANCE * factor,
                    "{ctx}: row {row} grad[{}] {g} want {w}",
                    j - row * k
                );
            }
            // The same row alone (its own upstream scale) gives the same bits.
            let alone_scales: Vec<f32> = rows.get(row).copied().into_iter().collect();
            let alone = run_with(
                &ce,
                &logits[row * k..(row + 1) * k],
                Targets::from(&targets[row..=row]),
                &alone_scales,
                false,
            );
            assert_eq!(
                alone.1[0].to_bits(),
                got.1[row].to_bits(),
                "{ctx}: row {row}"
            );
            assert_eq!(
                common::bits(&alone.2),
                common::bits(&got.2[row * k..(row + 1) * k]),
                "{ctx}: row {row} gradient"
            );
        }
    }
}

/// Runs `ce` on every backend and compares losses, total, lse and the gradient with the
/// reference, relative to each value's magnitude (the inputs are extreme), and checks that the
/// gradient rows of ignored rows are `+0.0` bit for bit.
fn check_extreme(ce: &CrossEntropy<'_>, logits: &[f32], targets: &[u32]) {
    let (n, k) = (targets.len(), ce.classes());
    let want = run_with(ce, logits, Targets::from(targets), &[], true);
    let close = |g: f32, w: f32| {
        g.to_bits() == w.to_bits()
            || (f64::from(g) - f64::from(w)).abs() <= 1e-5 * f64::from(w.abs()).max(1.0)
    };
    for backend in backends() {
        let ce = ce.backend(backend);
        let (total, losses, grad, lse, ..) =
            run_with(&ce, logits, Targets::from(targets), &[], false);
        let ctx = format!("{ce:?}");
        assert!(close(total, want.0), "{ctx}: total {total} want {}", want.0);
        for row in 0..n {
            assert!(
                close(losses[row], want.1[row]),
                "{ctx}: row {row} loss {} want {}",
                losses[row],
                want.1[row]
            );
            assert!(
                close(lse[row], want.3[row]),
                "{ctx}: row {row} lse {} want {}",
                lse[row],
                want.3[row]
            );
            let span = row * k..(row + 1) * k;
            for (&g, &w) in grad[span.clone()].iter().zip(&want.2[span]) {
                assert!(close(g, w), "{ctx}: row {row} grad {g} want {w}");
                if targets[row] == u32::MAX {
                    assert_eq!(g.to_bits(), 0, "{ctx}: ignored row {row} grad {g}");
                }
            }
        }
    }
}

/// Rows whose per-row constants overflow f32 (the narrow kernel keeps them in f32, the row
/// kernel and the reference in f64) and ignored rows next to a negative z-loss slope: the narrow
/// kernel hands the former to the row kernel and writes `+0.0` for the latter.
#[test]
fn extreme_rows_match_the_reference() {
    // z-loss of a row at 1e20: lse^2 overflows f32.
    let row = [1e20_f32; 10];
    let ce = CrossEntropy::new(10).z_loss(1e-4).reduction(Reduction::Sum);
    check_extreme(&ce, &row, &[0]);
    // An ignored row at 3e38 with a z-loss next to a live one: 2 lambda lse overflows f32.
    let ce = CrossEntropy::new(2)
        .z_loss(1.0)
        .ignore_index(u32::MAX)
        .reduction(Reduction::Sum);
    check_extreme(&ce, &[3e38, 3e38, 1.0, 2.0], &[u32::MAX, 1]);
    // A per-target weight of f32::MAX: the weighted loss overflows f32, the f64 mean does not.
    let weights: Vec<f32> = (0..10)
        .map(|c| if c == 0 { f32::MAX } else { 1.0 })
        .collect();
    let ce = CrossEntropy::new(10).target_weights(&weights);
    check_extreme(&ce, &[0.0; 40], &[0, 1, 1, 1]);
    // A logit scale and an upstream gradient whose product overflows f32 before the division by
    // the sum of exps.
    let ce = CrossEntropy::new(32)
        .logit_scale(1e20)
        .upstream(1e19)
        .reduction(Reduction::Sum);
    check_extreme(&ce, &[0.0; 64], &[3, 7]);
    // Logits near -1e4 with a z-loss (A' < 0) and ignored rows: their gradient is +0.0.
    let mut rng = Rng::new(0x4a77_0003);
    let logits = common::random_batch(&mut rng, 20, 7, -1e4, 5.0);
    let targets: Vec<u32> = (0..20)
        .map(|r| if r % 3 == 0 { u32::MAX } else { r % 7 })
        .collect();
    let ce = CrossEntropy::new(7)
        .z_loss(1e-4)
        .ignore_index(u32::MAX)
        .reduction(Reduction::Sum);
    check_extreme(&ce, &logits, &targets);
}
