//! The test oracles of `math.md`, on every available backend: gradient rows sum to 0, adding a
//! constant to a row changes neither loss nor gradient, the loss is minimised at `p = q` where it
//! equals the entropy `H(q)`, central finite differences (in f64, on the reference) match the
//! kernel gradient, the two-class example (`Uniform(0.1)` optimum at `p = [0.95, 0.05]`,
//! `OffTarget(0.1)` at `[0.9, 0.1]`), and `OffTarget(eps) == Uniform(eps K / (K - 1))`.

mod common;

use common::{backends, run, Entry, Rng};
use smoothce::reference::{self, agrees, GRAD_TOLERANCE, LOSS_TOLERANCE};
use smoothce::{CrossEntropy, Reduction, Smoothing};

/// Class counts for the oracles: tails of every vector width, a block boundary, a long row.
const CLASSES: [usize; 12] = [1, 2, 3, 5, 8, 15, 16, 17, 64, 100, 1000, 4097];

/// The entry points that produce a gradient.
const GRAD_ENTRIES: [Entry; 2] = [Entry::ForwardBackward, Entry::InPlace];

/// `ln q` of the target distribution `q` of `smoothing` for `k` classes and target `y`, as f32
/// logits (`-inf` where `q_k = 0`), and `q` itself in f64.
fn log_q(smoothing: Smoothing, k: usize, y: usize) -> (Vec<f32>, Vec<f64>) {
    let (on, per) = smoothing.coefficients(k as u64, true);
    let q: Vec<f64> = (0..k)
        .map(|c| if c == y { on + per } else { per })
        .collect();
    let z = q.iter().map(|&q| q.ln() as f32).collect();
    (z, q)
}

/// `H(q) = -sum q ln q`.
fn entropy(q: &[f64]) -> f64 {
    -q.iter()
        .filter(|&&q| q > 0.0)
        .map(|&q| q * q.ln())
        .sum::<f64>()
}

/// With no weights and no z-loss, every gradient row sums to 0 (mean-scaled rows too), in the
/// reference to rounding and in the kernels well within the per-element tolerance.
#[test]
fn gradient_rows_sum_to_zero() {
    let mut rng = Rng::new(0x0_5a11);
    for &k in CLASSES.iter().chain(&[262_145]) {
        let rows = if k > 10_000 { 1 } else { 4 };
        for smoothing in common::smoothings(rng.unit() as f32, k) {
            for reduction in [Reduction::Sum, Reduction::Mean] {
                let offset = 100.0 * rng.symmetric();
                let mut logits = common::random_batch(&mut rng, rows, k, offset, 30.0);
                let targets = common::random_targets(&mut rng, rows, k);
                // A masked class in the last row (not its target).
                if k > 2 {
                    let last = (rows - 1) * k;
                    let c = (targets[rows - 1] as usize + 1) % k;
                    logits[last + c] = f32::NEG_INFINITY;
                }
                let ce = CrossEntropy::new(k)
                    .smoothing(smoothing)
                    .reduction(reduction);
                let want = common::expected(&ce, &logits, &targets);
                for row in want.grad.chunks_exact(k) {
                    let sum: f64 = row.iter().sum();
                    assert!(sum.abs() < 1e-10, "reference row sums to {sum}");
                }
                for backend in backends() {
                    let ce = ce.backend(backend);
                    for entry in GRAD_ENTRIES {
                        let out = run(&ce, entry, &logits, &targets);
                        for (i, row) in out.grad.chunks_exact(k).enumerate() {
                            let sum: f64 = row.iter().map(|&g| f64::from(g)).sum();
                            assert!(
                                sum.abs() <= GRAD_TOLERANCE * want.scale,
                                "{ce:?} {entry:?} K = {k} row {i}: gradient sums to {sum}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Adding a constant to every logit of a row changes neither the loss nor the gradient. The
/// logits lie on a grid of `2^-8` and the shifts keep them below `2^15`, so that the shifted f32
/// rows are exact shifts; the reference is then exactly invariant and the kernels within their
/// tolerance of the unshifted result (and of the reference).
#[test]
fn shift_invariance() {
    let mut rng = Rng::new(0x5_1f7);
    let shifts = [1024.0_f32, -4096.0, 30_000.0, -30_000.0, 0.5, -100.25];
    for &k in &CLASSES {
        for smoothing in common::smoothings(0.3, k) {
            let ce = CrossEntropy::new(k)
                .smoothing(smoothing)
                .reduction(Reduction::None);
            let base: Vec<f32> = (0..2 * k)
                .map(|_| (rng.symmetric() * 100.0 * 256.0).round() as f32 / 256.0)
                .collect();
            let targets = common::random_targets(&mut rng, 2, k);
            let want = common::expected(&ce, &base, &targets);
            for shift in shifts {
                let shifted: Vec<f32> = base.iter().map(|&z| z + shift).collect();
                for (a, b) in base.iter().zip(&shifted) {
                    assert_eq!(f64::from(*b) - f64::from(*a), f64::from(shift), "inexact");
                }
                let moved = common::expected(&ce, &shifted, &targets);
                assert_eq!(moved.losses, want.losses, "reference loss moved by {shift}");
                assert_eq!(moved.grad, want.grad, "reference gradient moved by {shift}");
                for backend in backends() {
                    let ce = ce.backend(backend);
                    for entry in Entry::ALL {
                        let before = run(&ce, entry, &base, &targets);
                        let after = run(&ce, entry, &shifted, &targets);
                        let ctx = format!("{ce:?} {entry:?} shift {shift}");
                        for (i, (&a, &b)) in before.losses.iter().zip(&after.losses).enumerate() {
                            assert!(
                                agrees(b, f64::from(a), 2.0 * LOSS_TOLERANCE),
                                "{ctx} row {i}: loss {a} became {b}"
                            );
                            assert!(agrees(b, want.losses[i], LOSS_TOLERANCE), "{ctx} row {i}");
                        }
                        for (j, (&a, &b)) in before.grad.iter().zip(&after.grad).enumerate() {
                            assert!(
                                agrees(b, f64::from(a), 2.0 * GRAD_TOLERANCE),
                                "{ctx} element {j}: gradient {a} became {b}"
                            );
                            assert!(agrees(b, want.grad[j], GRAD_TOLERANCE), "{ctx} element {j}");
                        }
                    }
                }
            }
        }
    }
}

/// Logits `ln q` give `p = q`: the loss is the entropy `H(q)` and the gradient vanishes, for
/// both conventions and `eps` from 0 (one-hot `q`: the other classes are `-inf`, masked) to 1
/// (for `OffTarget(1)` the target itself has `q_y = 0` and is masked). Moving the logits away
/// from `ln q` only increases the loss.
#[test]
fn minimum_is_the_entropy_at_p_equals_q() {
    let mut rng = Rng::new(0xe_0001);
    for &k in &CLASSES {
        for eps in [0.0_f32, 0.1, 0.5, 0.9, 1.0] {
            for smoothing in common::smoothings(eps, k) {
                let y = rng.below(k);
                let (z, q) = log_q(smoothing, k, y);
                let h = entropy(&q);
                // Long rows of ln q repeat one value, which the f32 lane sums once lost accuracy
                // on (`repeated_logits_keep_their_accuracy` in `properties.rs`): full tolerance.
                let (tolerance, grad_tolerance) = (LOSS_TOLERANCE, GRAD_TOLERANCE);
                let reference_loss = reference::row(&z, y, smoothing, None).unwrap();
                assert!(
                    (reference_loss - h).abs() <= 1e-6 * h.max(1.0),
                    "{smoothing:?} K = {k}: reference loss {reference_loss}, H(q) = {h}"
                );
                // Random moves away from ln q (masked classes stay masked).
                let moves: Vec<Vec<f32>> = (0..4)
                    .map(|_| {
                        z.iter()
                            .map(|&v| v + (2.0 * rng.symmetric()) as f32)
                            .collect()
                    })
                    .collect();
                for backend in backends() {
                    let ce = CrossEntropy::new(k)
                        .smoothing(smoothing)
                        .reduction(Reduction::Sum)
                        .backend(backend);
                    for entry in Entry::ALL {
                        let out = run(&ce, entry, &z, &[y as u32]);
                        let ctx = format!("{ce:?} {entry:?} y = {y}");
                        assert!(
                            agrees(out.losses[0], h, tolerance),
                            "{ctx}: loss {} at p = q, H(q) = {h}",
                            out.losses[0]
                        );
                        for (c, &g) in out.grad.iter().enumerate() {
                            assert!(
                                f64::from(g).abs() <= grad_tolerance,
                                "{ctx}: gradient {g} at p = q, class {c}"
                            );
                        }
                        for moved in &moves {
                            let loss = run(&ce, entry, moved, &[y as u32]).losses[0];
                            assert!(
                                f64::from(loss) >= h - LOSS_TOLERANCE * h.max(1.0),
                                "{ctx}: loss {loss} below the minimum H(q) = {h}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Central finite differences of the f64 reference loss match the reference gradient (to the
/// truncation error) and the kernel gradient (to the kernels' tolerance). Logits lie on a grid of
/// `2^-12` in `[-6, 6]` and the step is `2^-10`, so the perturbed f32 logits are exact.
#[test]
fn central_finite_differences() {
    let mut rng = Rng::new(0xfd);
    let h = 1.0 / 1024.0;
    for &k in &[1_usize, 2, 3, 5, 8, 17, 40] {
        for eps in [0.0_f32, 0.3, 1.0] {
            for smoothing in common::smoothings(eps, k) {
                let z: Vec<f32> = (0..k)
                    .map(|_| (rng.symmetric() * 6.0 * 4096.0).round() as f32 / 4096.0)
                    .collect();
                let y = rng.below(k);
                let mut analytic = vec![0.0_f64; k];
                reference::row(&z, y, smoothing, Some(&mut analytic)).unwrap();
                let numeric: Vec<f64> = (0..k)
                    .map(|c| {
                        let mut plus = z.clone();
                        let mut minus = z.clone();
                        plus[c] += h;
                        minus[c] -= h;
                        assert_eq!(f64::from(plus[c]) - f64::from(minus[c]), 2.0 * f64::from(h));
                        let up = reference::row(&plus, y, smoothing, None).unwrap();
                        let down = reference::row(&minus, y, smoothing, None).unwrap();
                        (up - down) / (2.0 * f64::from(h))
                    })
                    .collect();
                for (c, (&a, &n)) in analytic.iter().zip(&numeric).enumerate() {
                    assert!(
                        (a - n).abs() <= 1e-7,
                        "{smoothing:?} K = {k} class {c}: reference gradient {a}, finite difference {n}"
                    );
                }
                for backend in backends() {
                    let ce = CrossEntropy::new(k)
                        .smoothing(smoothing)
                        .reduction(Reduction::Sum)
                        .backend(backend);
                    for entry in GRAD_ENTRIES {
                        let out = run(&ce, entry, &z, &[y as u32]);
                        for (c, (&g, &n)) in out.grad.iter().zip(&numeric).enumerate() {
                            assert!(
                                (f64::from(g) - n).abs() <= GRAD_TOLERANCE + 1e-7,
                                "{ce:?} {entry:?} class {c}: gradient {g}, finite difference {n}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Two classes, `eps = 0.1`: `Uniform` is minimised at `p = [0.95, 0.05]`, `OffTarget` at
/// `p = [0.9, 0.1]`, and each convention's optimum is not the other's (the gradient there is
/// `±0.05`).
#[test]
fn two_class_example() {
    let at = |p0: f64| [(p0 / (1.0 - p0)).ln() as f32, 0.0];
    let uniform = Smoothing::Uniform(0.1);
    let off_target = Smoothing::OffTarget(0.1);
    // (smoothing, p_0 of the logits, expected gradient at target 0, loss H(q) at the optimum)
    let h = |a: f64| -(a * a.ln() + (1.0 - a) * (1.0 - a).ln());
    let cases = [
        (uniform, 0.95, [0.0, 0.0], Some(h(0.95))),
        (off_target, 0.9, [0.0, 0.0], Some(h(0.9))),
        (uniform, 0.9, [-0.05, 0.05], None),
        (off_target, 0.95, [0.05, -0.05], None),
    ];
    for backend in backends() {
        for (smoothing, p0, want, entropy) in cases {
            let ce = CrossEntropy::new(2)
                .smoothing(smoothing)
                .reduction(Reduction::Sum)
                .backend(backend);
            let logits = at(p0);
            for entry in GRAD_ENTRIES {
                let out = run(&ce, entry, &logits, &[0]);
                let ctx = format!("{ce:?} {entry:?} at p_0 = {p0}");
                for c in 0..2 {
                    assert!(
                        agrees(out.grad[c], want[c], GRAD_TOLERANCE),
                        "{ctx}: gradient {:?}, expected {want:?}",
                        out.grad
                    );
                }
                if let Some(h) = entropy {
                    assert!(agrees(out.losses[0], h, LOSS_TOLERANCE), "{ctx}: loss");
                }
                // Target 1 mirrors target 0.
                let mirrored = [logits[1], logits[0]];
                let out = run(&ce, entry, &mirrored, &[1]);
                assert!(
                    agrees(out.grad[1], want[0], GRAD_TOLERANCE)
                        && agrees(out.grad[0], want[1], GRAD_TOLERANCE),
                    "{ctx}, mirrored: gradient {:?}",
                    out.grad
                );
            }
        }
    }
}

/// `OffTarget(eps)` is `Uniform(eps K / (K - 1))`. When `K - 1` is a power of two and `eps` a
/// short binary fraction both `eps` values are exact, the smoothing coefficients are the same
/// numbers, and the kernels' results are identical bit for bit; for other `K` they agree within
/// the tolerance plus the effect of rounding `eps K / (K - 1)` to f32.
#[test]
fn off_target_is_rescaled_uniform() {
    let mut rng = Rng::new(0x0ff);
    let exact_k = [2_usize, 3, 5, 9, 17, 33, 65, 129, 1025, 4097];
    let other_k = [4_usize, 7, 10, 16, 100, 1000, 4096];
    for &k in exact_k.iter().chain(&other_k) {
        let exact = (k - 1).is_power_of_two();
        for j in 0..=4 {
            // eps = j/4 of the largest value for which eps K / (K - 1) stays <= 1.
            let eps = if exact {
                (j * (k - 1)) as f32 / (4 * k) as f32
            } else {
                (f64::from(j as u8) / 4.0 * (k - 1) as f64 / k as f64) as f32
            };
            let eps = if exact {
                // A short binary fraction: round to 2^-10.
                (eps * 1024.0).floor() / 1024.0
            } else {
                eps
            };
            let scaled = (f64::from(eps) * k as f64 / (k - 1) as f64) as f32;
            assert!(scaled <= 1.0);
            if exact {
                assert_eq!(
                    f64::from(scaled),
                    f64::from(eps) * k as f64 / (k - 1) as f64,
                    "K = {k}: eps' not exact"
                );
            }
            let off = Smoothing::OffTarget(eps);
            let uni = Smoothing::Uniform(scaled);
            let logits = common::random_batch(&mut rng, 3, k, 5.0, 4.0);
            let targets = common::random_targets(&mut rng, 3, k);
            // The rounding of eps' moves the loss by at most |d eps'| * max_k (lse - z_k).
            let d_eps = (f64::from(scaled) - f64::from(eps) * k as f64 / (k - 1) as f64).abs();
            let loss_slack = d_eps * (8.0 + (k as f64).ln());
            for backend in backends() {
                for entry in Entry::ALL {
                    let ce = CrossEntropy::new(k)
                        .reduction(Reduction::Sum)
                        .backend(backend);
                    let a = run(&ce.smoothing(off), entry, &logits, &targets);
                    let b = run(&ce.smoothing(uni), entry, &logits, &targets);
                    let ctx = format!("{backend:?} {entry:?} K = {k} {off:?} vs {uni:?}");
                    if exact {
                        assert!(a.bits_eq(&b), "{ctx}: not bit-identical");
                    }
                    for (&x, &y) in a.losses.iter().zip(&b.losses) {
                        assert!(
                            (f64::from(x) - f64::from(y)).abs()
                                <= 2.0 * LOSS_TOLERANCE * f64::from(y).max(1.0) + loss_slack,
                            "{ctx}: losses {x} and {y}"
                        );
                    }
                    for (&x, &y) in a.grad.iter().zip(&b.grad) {
                        assert!(
                            (f64::from(x) - f64::from(y)).abs() <= 2.0 * GRAD_TOLERANCE + d_eps,
                            "{ctx}: gradients {x} and {y}"
                        );
                    }
                }
            }
            // The two are the same distribution in the reference, too.
            let mut ga = vec![0.0; k];
            let mut gb = vec![0.0; k];
            let la = reference::row(&logits[..k], targets[0] as usize, off, Some(&mut ga)).unwrap();
            let lb = reference::row(&logits[..k], targets[0] as usize, uni, Some(&mut gb)).unwrap();
            assert!(
                (la - lb).abs() <= 1e-12 * la.max(1.0) + loss_slack,
                "K = {k}"
            );
            for (x, y) in ga.iter().zip(&gb) {
                assert!((x - y).abs() <= 1e-12 + d_eps, "K = {k}");
            }
        }
    }
}
