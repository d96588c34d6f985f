//! The numerical and behavioural contract documented on `CrossEntropy`, on every available backend
//! and through every entry point: huge finite logits never give NaN, `-inf` masks a class, NaN and
//! `+inf` poison their own row only, one class, `eps` of 0 and 1, all rows ignored, the three
//! reductions, determinism, independence of a row's results from its position and the batch
//! size, and concurrent calls from several threads.

mod common;

use std::sync::Barrier;

use common::{backends, bits, check_all, run, Entry, Output, Rng};
use smoothce::reference::{self, agrees, GRAD_TOLERANCE, LOSS_TOLERANCE};
use smoothce::{Backend, CrossEntropy, Extras, Piece, Reduction, RowState, Smoothing, Targets};

/// Class counts: below, at and above every vector width, a block boundary, beyond 2^18.
/// (`more_than_2_24_classes_in_one_row` covers rows beyond the 2^22 strategy switch.)
const CLASSES: [usize; 10] = [1, 2, 3, 7, 16, 17, 64, 100, 4097, 262_145];

/// Smoothings exercised by the contract tests for `k` classes.
fn smoothings(k: usize) -> Vec<Smoothing> {
    let mut all = vec![
        Smoothing::Uniform(0.0),
        Smoothing::Uniform(0.1),
        Smoothing::Uniform(1.0),
    ];
    if k >= 2 {
        all.extend([
            Smoothing::OffTarget(0.0),
            Smoothing::OffTarget(0.3),
            Smoothing::OffTarget(1.0),
        ]);
    }
    all
}

/// Fewer rows for long rows.
fn rows_for(k: usize) -> usize {
    if k > 10_000 {
        2
    } else {
        6
    }
}

/// The smoothings and reductions to try for `k` classes: all of them, or a few for long rows
/// (which cost the most and exercise the same rules).
fn configs(k: usize, reductions: &[Reduction]) -> Vec<(Smoothing, Reduction)> {
    let all = smoothings(k);
    let mut out = Vec::new();
    for (s, &smoothing) in all.iter().enumerate() {
        for (r, &reduction) in reductions.iter().enumerate() {
            if k <= 10_000 || (s + r) % 3 == 0 {
                out.push((smoothing, reduction));
            }
        }
    }
    out
}

/// Every call of `ce` (all backends, all entries) on a batch.
fn each_call(
    ce: &CrossEntropy<'_>,
    logits: &[f32],
    targets: &[u32],
    mut f: impl FnMut(&str, Entry, &Output),
) {
    for backend in backends() {
        let ce = ce.backend(backend);
        for entry in Entry::ALL {
            let out = run(&ce, entry, logits, targets);
            f(&format!("{ce:?} {entry:?}"), entry, &out);
        }
    }
}

/// Finite logits, however large (mixes of `±3e38`, `f32::MAX` and `f32::MIN`), never give NaN:
/// the gradient is finite (and a difference of probabilities, so within `[-1, 1]`), the loss is
/// a number (`+inf` only when its true value exceeds `f32::MAX`), and everything agrees with
/// the reference.
#[test]
fn huge_finite_logits_never_give_nan() {
    let mut rng = Rng::new(0xb16);
    let pick = [
        3e38_f32,
        -3e38,
        f32::MAX,
        f32::MIN,
        0.0,
        1e-40,
        -2.5e38,
        1.0,
    ];
    for &k in &CLASSES {
        let rows = rows_for(k);
        for pattern in 0..5 {
            let mut logits: Vec<f32> = match pattern {
                // Random picks among the huge values.
                0 => (0..rows * k).map(|_| pick[rng.below(pick.len())]).collect(),
                // Only ±3e38.
                1 => (0..rows * k)
                    .map(|_| if rng.unit() < 0.5 { 3e38 } else { -3e38 })
                    .collect(),
                // f32::MAX everywhere.
                2 => vec![f32::MAX; rows * k],
                // Ordinary rows with one f32::MAX and one f32::MIN.
                _ => common::random_batch(&mut rng, rows, k, 0.0, 10.0),
            };
            if pattern >= 3 {
                for row in logits.chunks_exact_mut(k) {
                    row[rng.below(k)] = f32::MAX;
                    row[rng.below(k)] = if pattern == 3 { f32::MIN } else { -3e38 };
                }
            }
            let targets = common::random_targets(&mut rng, rows, k);
            if k > 10_000 && pattern % 2 == 0 {
                continue;
            }
            for (smoothing, reduction) in configs(k, &[Reduction::Mean, Reduction::None]) {
                let ce = CrossEntropy::new(k)
                    .smoothing(smoothing)
                    .reduction(reduction);
                each_call(&ce, &logits, &targets, |ctx, _, out| {
                    assert!(
                        !out.total.is_nan(),
                        "{ctx} K = {k} pattern {pattern}: NaN total"
                    );
                    for (i, l) in out.losses.iter().enumerate() {
                        assert!(
                            !l.is_nan(),
                            "{ctx} K = {k} pattern {pattern} row {i}: NaN loss"
                        );
                    }
                    for g in &out.grad {
                        assert!(
                            g.is_finite() && g.abs() <= 1.0,
                            "{ctx} K = {k}: gradient {g}"
                        );
                    }
                });
                if let Err(e) = check_all(&ce, &logits, &targets) {
                    panic!("K = {k} pattern {pattern}: {e}");
                }
            }
        }
    }
}

/// The row without its masked classes, and its target there.
fn compact(row: &[f32], y: usize) -> (Vec<f32>, usize) {
    let kept: Vec<f32> = row
        .iter()
        .copied()
        .filter(|z| *z != f32::NEG_INFINITY)
        .collect();
    let new_y = row[..y].iter().filter(|z| **z != f32::NEG_INFINITY).count();
    (kept, new_y)
}

/// A `-inf` logit masks its class: probability and gradient exactly 0, no smoothing mass, so the
/// row gives what the row without that class gives. A masked target gives loss `+inf` (when it
/// has target mass) and the gradient `p - q`; a row of only `-inf` gives `+inf` and a zero
/// gradient. Other rows are unaffected.
#[test]
fn negative_infinity_masks_classes() {
    let mut rng = Rng::new(0x3a5c);
    for &k in &CLASSES[1..] {
        let rows = rows_for(k);
        let mut logits = common::random_batch(&mut rng, rows, k, 0.0, 8.0);
        let targets = common::random_targets(&mut rng, rows, k);
        // Row 0: a few masked classes, never the target; row 1: everything masked but the
        // target and one other class (or, for long rows, the target masked).
        for (i, row) in logits.chunks_exact_mut(k).enumerate() {
            let y = targets[i] as usize;
            match i {
                0 => {
                    for _ in 0..=k / 3 {
                        let c = rng.below(k);
                        if c != y {
                            row[c] = f32::NEG_INFINITY;
                        }
                    }
                }
                1 if rows > 2 => {
                    let other = (y + 1) % k;
                    for (c, z) in row.iter_mut().enumerate() {
                        if c != y && c != other {
                            *z = f32::NEG_INFINITY;
                        }
                    }
                }
                1 | 2 => row[y] = f32::NEG_INFINITY,
                3 => row.fill(f32::NEG_INFINITY),
                _ => {}
            }
        }
        for smoothing in smoothings(k) {
            let ce = CrossEntropy::new(k)
                .smoothing(smoothing)
                .reduction(Reduction::None);
            if let Err(e) = check_all(&ce, &logits, &targets) {
                panic!("K = {k}: {e}");
            }
            each_call(&ce, &logits, &targets, |ctx, entry, out| {
                for (i, (row, &t)) in logits.chunks_exact(k).zip(&targets).enumerate() {
                    let y = t as usize;
                    let loss = out.losses[i];
                    let all_masked = row.iter().all(|z| *z == f32::NEG_INFINITY);
                    if all_masked {
                        assert_eq!(loss, f32::INFINITY, "{ctx} row {i}: all masked");
                    } else if row[y] == f32::NEG_INFINITY {
                        let (on, _) = smoothing.coefficients(1, false);
                        if on > 0.0 {
                            assert_eq!(loss, f32::INFINITY, "{ctx} row {i}: masked target");
                        } else {
                            assert!(
                                loss.is_finite(),
                                "{ctx} row {i}: no target mass, loss {loss}"
                            );
                        }
                    } else {
                        assert!(loss.is_finite(), "{ctx} row {i}: loss {loss}");
                    }
                    if entry.has_grad() {
                        let g = &out.grad[i * k..(i + 1) * k];
                        for (c, (&z, &g)) in row.iter().zip(g).enumerate() {
                            if z == f32::NEG_INFINITY && (c != y || all_masked) {
                                assert_eq!(g, 0.0, "{ctx} row {i} class {c}: masked gradient");
                            }
                            assert!(g.is_finite(), "{ctx} row {i} class {c}: gradient {g}");
                        }
                    }
                    // With the target allowed, masking equals removing the masked classes.
                    let (kept, new_y) = compact(row, y);
                    let removable = !all_masked
                        && row[y] != f32::NEG_INFINITY
                        && kept.len() < k
                        && (kept.len() >= 2 || matches!(smoothing, Smoothing::Uniform(_)));
                    if removable {
                        let small = CrossEntropy::new(kept.len())
                            .smoothing(smoothing)
                            .reduction(Reduction::None)
                            .backend(Backend::Portable);
                        let alone = run(&small, Entry::ForwardBackward, &kept, &[new_y as u32]);
                        assert!(
                            agrees(loss, f64::from(alone.losses[0]), 2.0 * LOSS_TOLERANCE),
                            "{ctx} row {i}: masked loss {loss}, without the classes {}",
                            alone.losses[0]
                        );
                        if entry.has_grad() {
                            let g = &out.grad[i * k..(i + 1) * k];
                            let allowed =
                                g.iter().zip(row).filter(|(_, z)| **z != f32::NEG_INFINITY);
                            for ((&a, _), &b) in allowed.zip(&alone.grad) {
                                assert!(
                                    agrees(a, f64::from(b), 2.0 * GRAD_TOLERANCE),
                                    "{ctx} row {i}: masked gradient {a}, without the classes {b}"
                                );
                            }
                        }
                    }
                }
            });
        }
    }
}

/// A NaN or a `+inf` anywhere in a row makes that row's loss NaN and its whole gradient row NaN,
/// and the reduced loss NaN; the other rows are bit-identical to a batch where the bad rows are
/// replaced by ordinary ones. An ignored row is ignored even when it holds NaN.
#[test]
fn nan_and_positive_infinity_poison_only_their_row() {
    let mut rng = Rng::new(0x7a7);
    for &k in &CLASSES {
        let rows = 5;
        let clean = common::random_batch(&mut rng, rows, k, 3.0, 5.0);
        let mut targets = common::random_targets(&mut rng, rows, k);
        targets[4] = u32::MAX;
        let mut bad = clean.clone();
        // Row 1: a NaN (at the target for one class count in two); row 2: +inf, maybe with -inf
        // and NaN; row 3: all NaN; row 4: ignored, with a NaN.
        let y1 = targets[1] as usize;
        let at = if k % 2 == 0 { y1 } else { rng.below(k) };
        bad[k + at] = f32::NAN;
        bad[2 * k + rng.below(k)] = f32::INFINITY;
        if k >= 3 {
            bad[2 * k + rng.below(k)] = f32::NEG_INFINITY;
        }
        bad[3 * k..4 * k].fill(-f32::NAN);
        bad[4 * k + rng.below(k)] = f32::NAN;
        let poisoned = [false, true, true, true, false];
        let reductions = [Reduction::Mean, Reduction::Sum, Reduction::None];
        for (smoothing, reduction) in configs(k, &reductions) {
            let ce = CrossEntropy::new(k)
                .smoothing(smoothing)
                .reduction(reduction)
                .ignore_index(u32::MAX);
            if let Err(e) = check_all(&ce, &bad, &targets) {
                panic!("K = {k}: {e}");
            }
            for backend in backends() {
                let ce = ce.backend(backend);
                for entry in Entry::ALL {
                    let ctx = format!("{ce:?} {entry:?}");
                    let out = run(&ce, entry, &bad, &targets);
                    let reference = run(&ce, entry, &clean, &targets);
                    assert!(out.total.is_nan(), "{ctx}: total {}", out.total);
                    for (i, &poisoned) in poisoned.iter().enumerate() {
                        let (l, r) = (out.losses[i], reference.losses[i]);
                        if poisoned {
                            assert!(l.is_nan(), "{ctx} row {i}: loss {l}");
                        } else {
                            assert_eq!(l.to_bits(), r.to_bits(), "{ctx} row {i}: loss changed");
                        }
                        if entry.has_grad() {
                            let g = &out.grad[i * k..(i + 1) * k];
                            let r = &reference.grad[i * k..(i + 1) * k];
                            if poisoned {
                                assert!(g.iter().all(|v| v.is_nan()), "{ctx} row {i}: {g:?}");
                            } else {
                                assert_eq!(bits(g), bits(r), "{ctx} row {i}: gradient changed");
                            }
                        }
                    }
                    assert_eq!(out.losses[4], 0.0, "{ctx}: ignored row");
                    if entry.has_grad() {
                        assert!(out.grad[4 * k..].iter().all(|g| *g == 0.0), "{ctx}");
                    }
                }
            }
        }
    }
}

/// One class: `p = q = [1]` whatever the logit and the smoothing, so the loss and the gradient
/// are 0; a `-inf` logit is an all-masked row (`+inf`, zero gradient), NaN and `+inf` give NaN.
#[test]
fn one_class() {
    let logits = [0.0_f32, -5.5, 3e38, f32::MIN, 1e-40, f32::MAX, 12345.0];
    let targets = vec![0_u32; logits.len()];
    for eps in [0.0_f32, 0.5, 1.0] {
        let ce = CrossEntropy::new(1)
            .smoothing(Smoothing::Uniform(eps))
            .reduction(Reduction::Sum);
        if let Err(e) = check_all(&ce, &logits, &targets) {
            panic!("{e}");
        }
        each_call(&ce, &logits, &targets, |ctx, _, out| {
            assert!(
                out.total.abs() <= LOSS_TOLERANCE as f32,
                "{ctx}: total {}",
                out.total
            );
            for l in &out.losses {
                assert!(l.abs() <= LOSS_TOLERANCE as f32, "{ctx}: loss {l}");
            }
            for g in &out.grad {
                assert!(g.abs() <= GRAD_TOLERANCE as f32, "{ctx}: gradient {g}");
            }
        });
        let special = [f32::NEG_INFINITY, f32::NAN, f32::INFINITY];
        each_call(&ce, &special, &[0, 0, 0], |ctx, entry, out| {
            assert_eq!(out.losses[0], f32::INFINITY, "{ctx}");
            assert!(out.losses[1].is_nan() && out.losses[2].is_nan(), "{ctx}");
            if entry.has_grad() {
                assert_eq!(out.grad[0], 0.0, "{ctx}");
                assert!(out.grad[1].is_nan() && out.grad[2].is_nan(), "{ctx}");
            }
        });
    }
}

/// `eps = 0` is plain cross-entropy in both conventions (`lse - z_y`, gradient `p - onehot`,
/// the two conventions bit-identical); `Uniform(1)` ignores the target (`lse - mean z`);
/// `OffTarget(1)` puts no mass on the target (its gradient is `p_y >= 0`).
#[test]
fn eps_zero_and_one() {
    let mut rng = Rng::new(0xe95);
    for &k in &CLASSES[1..] {
        let rows = rows_for(k);
        let logits = common::random_batch(&mut rng, rows, k, -20.0, 10.0);
        let targets = common::random_targets(&mut rng, rows, k);
        // Plain cross-entropy, by hand in f64.
        let plain: Vec<(f64, Vec<f64>)> = logits
            .chunks_exact(k)
            .zip(&targets)
            .map(|(z, &y)| {
                let m = z
                    .iter()
                    .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
                let s: f64 = z.iter().map(|&v| (f64::from(v) - m).exp()).sum();
                let lse = m + s.ln();
                let g = z
                    .iter()
                    .enumerate()
                    .map(|(c, &v)| {
                        (f64::from(v) - lse).exp() - f64::from(u8::from(c == y as usize))
                    })
                    .collect();
                (lse - f64::from(z[y as usize]), g)
            })
            .collect();
        for backend in backends() {
            let base = CrossEntropy::new(k)
                .reduction(Reduction::None)
                .backend(backend);
            for entry in Entry::ALL {
                let ctx = format!("{backend:?} {entry:?} K = {k}");
                let uniform = run(
                    &base.smoothing(Smoothing::Uniform(0.0)),
                    entry,
                    &logits,
                    &targets,
                );
                let off = run(
                    &base.smoothing(Smoothing::OffTarget(0.0)),
                    entry,
                    &logits,
                    &targets,
                );
                let default = run(&base, entry, &logits, &targets);
                assert!(uniform.bits_eq(&off), "{ctx}: Uniform(0) != OffTarget(0)");
                assert!(
                    uniform.bits_eq(&default),
                    "{ctx}: Uniform(0) is not the default"
                );
                for (i, (loss, grad)) in plain.iter().enumerate() {
                    assert!(
                        agrees(uniform.losses[i], *loss, LOSS_TOLERANCE),
                        "{ctx} row {i}"
                    );
                    if entry.has_grad() {
                        for (c, &g) in grad.iter().enumerate() {
                            assert!(
                                agrees(uniform.grad[i * k + c], g, GRAD_TOLERANCE),
                                "{ctx} row {i}"
                            );
                        }
                    }
                }
                // Uniform(1): every target gives the same loss and gradient.
                let ce = base.smoothing(Smoothing::Uniform(1.0));
                let a = run(&ce, entry, &logits, &targets);
                let shifted: Vec<u32> = targets.iter().map(|&t| (t + 1) % k as u32).collect();
                let b = run(&ce, entry, &logits, &shifted);
                for i in 0..rows {
                    assert!(
                        agrees(b.losses[i], f64::from(a.losses[i]), 2.0 * LOSS_TOLERANCE),
                        "{ctx}"
                    );
                    let z = &logits[i * k..(i + 1) * k];
                    let mean = z.iter().map(|&v| f64::from(v)).sum::<f64>() / k as f64;
                    let lse = plain[i].0 + f64::from(z[targets[i] as usize]);
                    assert!(
                        agrees(a.losses[i], lse - mean, LOSS_TOLERANCE),
                        "{ctx} row {i}"
                    );
                }
                for (x, y) in a.grad.iter().zip(&b.grad) {
                    assert!(agrees(*y, f64::from(*x), 2.0 * GRAD_TOLERANCE), "{ctx}");
                }
                // OffTarget(1): the target's gradient is its probability.
                let out = run(
                    &base.smoothing(Smoothing::OffTarget(1.0)),
                    entry,
                    &logits,
                    &targets,
                );
                if entry.has_grad() {
                    for (i, &y) in targets.iter().enumerate() {
                        let p = plain[i].1[y as usize] + 1.0;
                        assert!(
                            agrees(out.grad[i * k + y as usize], p, GRAD_TOLERANCE),
                            "{ctx}"
                        );
                    }
                }
            }
        }
    }
}

/// A batch whose rows are all ignored has a defined result: 0 (not NaN, also for the mean),
/// zero losses and a zero gradient, even when the ignored rows hold NaN.
#[test]
fn all_rows_ignored() {
    let mut rng = Rng::new(0x1960);
    for &k in &[1_usize, 5, 16, 4097] {
        let mut logits = common::random_batch(&mut rng, 3, k, 0.0, 50.0);
        logits[0] = f32::NAN;
        for ignore in [u32::MAX, 0] {
            let targets = [ignore; 3];
            for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                for smoothing in common::smoothings(0.2, k) {
                    let ce = CrossEntropy::new(k)
                        .smoothing(smoothing)
                        .reduction(reduction)
                        .ignore_index(ignore);
                    each_call(&ce, &logits, &targets, |ctx, entry, out| {
                        assert_eq!(out.total, 0.0, "{ctx}: total {}", out.total);
                        assert!(
                            out.losses.iter().all(|l| *l == 0.0),
                            "{ctx}: {:?}",
                            out.losses
                        );
                        if entry.has_grad() {
                            assert!(
                                out.grad.iter().all(|g| *g == 0.0),
                                "{ctx}: nonzero gradient"
                            );
                        }
                    });
                    assert_eq!(
                        reference::forward(&ce, &logits, &targets, &mut [1.0; 3]),
                        Ok(0.0),
                        "reference"
                    );
                }
            }
        }
    }
}

/// `Mean` returns the sum over the non-ignored rows divided by their number and scales the
/// gradient by the same `1/D`; `Sum` returns the sum; `None` returns the sum too, with the
/// unscaled per-row gradients of `Sum` (bit-identical). The per-row losses do not depend on the
/// reduction.
#[test]
fn reductions() {
    let mut rng = Rng::new(0x5e3);
    for &k in &[1_usize, 3, 17, 1000, 4097] {
        let rows = 7;
        let logits = common::random_batch(&mut rng, rows, k, 1.0, 6.0);
        let mut targets = common::random_targets(&mut rng, rows, k);
        targets[2] = 999_999;
        targets[5] = 999_999;
        let d = 5.0_f64;
        for smoothing in common::smoothings(0.15, k) {
            for backend in backends() {
                for entry in Entry::ALL {
                    let ce = CrossEntropy::new(k)
                        .smoothing(smoothing)
                        .ignore_index(999_999)
                        .backend(backend);
                    let ctx = format!("{ce:?} {entry:?}");
                    let mean = run(&ce.reduction(Reduction::Mean), entry, &logits, &targets);
                    let sum = run(&ce.reduction(Reduction::Sum), entry, &logits, &targets);
                    let none = run(&ce.reduction(Reduction::None), entry, &logits, &targets);
                    assert!(none.bits_eq(&sum), "{ctx}: None differs from Sum");
                    assert_eq!(bits(&mean.losses), bits(&sum.losses), "{ctx}: losses");
                    let total: f64 = sum.losses.iter().map(|&l| f64::from(l)).sum();
                    let rounding = 4.0 * f64::from(f32::EPSILON) * total;
                    assert!(
                        (f64::from(sum.total) - total).abs() <= rounding,
                        "{ctx}: Sum {}",
                        sum.total
                    );
                    assert!(
                        (f64::from(mean.total) - total / d).abs() <= rounding / d,
                        "{ctx}: Mean {} is not the sum {total} over {d} rows",
                        mean.total
                    );
                    let scale = f64::from((1.0 / d) as f32);
                    for (j, (&m, &s)) in mean.grad.iter().zip(&sum.grad).enumerate() {
                        assert!(
                            agrees(m, scale * f64::from(s), 2.0 * GRAD_TOLERANCE * scale),
                            "{ctx} element {j}: mean gradient {m}, sum gradient {s}"
                        );
                    }
                }
            }
        }
    }
}

/// The same call twice gives the same bits, specials included.
#[test]
fn deterministic() {
    let mut rng = Rng::new(0xde7);
    for &k in &CLASSES {
        let mut logits = common::random_batch(&mut rng, 3, k, 0.0, 40.0);
        logits[0] = f32::NEG_INFINITY;
        logits[k + k / 2] = 3e38;
        logits[2 * k + k - 1] = f32::NAN;
        let targets = common::random_targets(&mut rng, 3, k);
        for smoothing in common::smoothings(0.4, k) {
            let ce = CrossEntropy::new(k).smoothing(smoothing);
            for backend in backends() {
                for entry in Entry::ALL {
                    let ce = ce.backend(backend);
                    let a = run(&ce, entry, &logits, &targets);
                    let b = run(&ce, entry, &logits, &targets);
                    assert!(a.bits_eq(&b), "{ce:?} {entry:?}: two runs differ");
                }
            }
        }
    }
}

/// A row's loss and gradient do not depend on where it sits in the batch nor on the batch size
/// (bit for bit). For `Mean`, where the scale depends on the number of counted rows, the rows
/// are compared between batches of equal count (the padding rows are ignored ones).
#[test]
fn rows_are_independent_of_position_and_batch_size() {
    let mut rng = Rng::new(0x9051);
    for &k in &[1_usize, 7, 33, 1000, 4099] {
        let pool = 5;
        let logits = common::random_batch(&mut rng, pool, k, 10.0, 20.0);
        let targets = common::random_targets(&mut rng, pool, k);
        for smoothing in common::smoothings(0.3, k) {
            for backend in backends() {
                let ce = CrossEntropy::new(k)
                    .smoothing(smoothing)
                    .ignore_index(u32::MAX)
                    .backend(backend);
                for entry in Entry::ALL {
                    // Each row alone, with Sum; and alone among ignored rows, with Mean.
                    let alone: Vec<Output> = (0..pool)
                        .map(|i| {
                            run(
                                &ce.reduction(Reduction::Sum),
                                entry,
                                &logits[i * k..(i + 1) * k],
                                &targets[i..=i],
                            )
                        })
                        .collect();
                    for size in 1..=8 {
                        // A batch of `size` rows drawn from the pool (repeats allowed).
                        let picks: Vec<usize> = (0..size).map(|_| rng.below(pool)).collect();
                        let batch: Vec<f32> = picks
                            .iter()
                            .flat_map(|&i| logits[i * k..(i + 1) * k].iter().copied())
                            .collect();
                        let batch_targets: Vec<u32> = picks.iter().map(|&i| targets[i]).collect();
                        let out = run(&ce.reduction(Reduction::Sum), entry, &batch, &batch_targets);
                        for (slot, &i) in picks.iter().enumerate() {
                            let ctx = format!("{ce:?} {entry:?}: row {i} at {slot} of {size}");
                            assert_eq!(
                                out.losses[slot].to_bits(),
                                alone[i].losses[0].to_bits(),
                                "{ctx}"
                            );
                            if entry.has_grad() {
                                assert_eq!(
                                    bits(&out.grad[slot * k..(slot + 1) * k]),
                                    bits(&alone[i].grad),
                                    "{ctx}"
                                );
                            }
                        }
                        // Mean: one counted row among `size - 1` ignored ones is the row alone.
                        let slot = rng.below(size);
                        let i = picks[slot];
                        let mut masked_targets = vec![u32::MAX; size];
                        masked_targets[slot] = targets[i];
                        let mean = ce.reduction(Reduction::Mean);
                        let out = run(&mean, entry, &batch, &masked_targets);
                        let single =
                            run(&mean, entry, &logits[i * k..(i + 1) * k], &targets[i..=i]);
                        let ctx = format!("{ce:?} {entry:?} Mean: row {i} at {slot} of {size}");
                        assert_eq!(out.total.to_bits(), single.total.to_bits(), "{ctx}");
                        assert_eq!(
                            out.losses[slot].to_bits(),
                            single.losses[0].to_bits(),
                            "{ctx}"
                        );
                        if entry.has_grad() {
                            assert_eq!(
                                bits(&out.grad[slot * k..(slot + 1) * k]),
                                bits(&single.grad),
                                "{ctx}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Four threads call the kernels at once (`Backend::Auto`, every entry point, several shapes)
/// and get exactly the single-threaded results. (wasm32-wasip1 has no threads: skipped there.)
#[test]
#[cfg_attr(target_os = "wasi", ignore = "wasm32-wasip1 cannot spawn threads")]
fn concurrent_calls_match_a_single_thread() {
    let mut rng = Rng::new(0x7777);
    let shapes = [
        (1_usize, 3_usize),
        (17, 5),
        (1000, 4),
        (4097, 2),
        (262_145, 1),
    ];
    let work: Vec<(CrossEntropy<'static>, Entry, Vec<f32>, Vec<u32>)> = shapes
        .iter()
        .enumerate()
        .flat_map(|(s, &(k, rows))| {
            let logits = common::random_batch(&mut rng, rows, k, 5.0, 30.0);
            let targets = common::random_targets(&mut rng, rows, k);
            let smoothing = if k >= 2 && s % 2 == 0 {
                Smoothing::OffTarget(0.2)
            } else {
                Smoothing::Uniform(0.1)
            };
            let ce = CrossEntropy::new(k)
                .smoothing(smoothing)
                .backend(Backend::Auto);
            Entry::ALL.map(|entry| (ce, entry, logits.clone(), targets.clone()))
        })
        .collect();
    let single: Vec<Output> = work
        .iter()
        .map(|(ce, entry, logits, targets)| run(ce, *entry, logits, targets))
        .collect();
    let threads = 4;
    let barrier = Barrier::new(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (work, single, barrier) = (&work, &single, &barrier);
                scope.spawn(move || {
                    barrier.wait();
                    let mut checked = 0;
                    for round in 0..6 {
                        // Each thread walks the work in its own order.
                        for n in 0..work.len() {
                            let j = (n * (2 * t + 1) + round + t) % work.len();
                            let (ce, entry, logits, targets) = &work[j];
                            let out = run(ce, *entry, logits, targets);
                            assert!(
                                out.bits_eq(&single[j]),
                                "thread {t} round {round}: work {j} differs"
                            );
                            checked += 1;
                        }
                    }
                    checked
                })
            })
            .collect();
        for handle in handles {
            let checked = handle.join().expect("a thread panicked");
            assert_eq!(checked, 6 * work.len());
        }
    });
}

/// One row of `2^24 + 37` classes: more classes than an f32 counts exactly, and far beyond the
/// caches, so the gradient takes the recomputing pass with non-temporal stores (AVX2, AVX-512),
/// here into slices starting one element past an aligned address (the stores must peel a head).
/// Loss and every gradient element agree with the reference, in place and out of place, on
/// every backend; a masked class and off-target smoothing keep the careful path and the global
/// class count in play. 64-bit targets only (about 600 MB of buffers).
#[test]
#[cfg(target_pointer_width = "64")]
fn more_than_2_24_classes_in_one_row() {
    let k = (1 << 24) + 37;
    let mut rng = Rng::new(0x2_24);
    let mut storage = vec![0.0_f32; k + 1];
    for z in &mut storage[1..] {
        *z = (rng.symmetric() * 4.0) as f32;
    }
    storage[1 + 12_345] = f32::NEG_INFINITY;
    let logits = &storage[1..];
    let target = 7_654_321_usize;
    for smoothing in [Smoothing::Uniform(0.1), Smoothing::OffTarget(0.25)] {
        let mut want = vec![0.0_f64; k];
        let want_loss =
            reference::row(logits, target, smoothing, Some(&mut want)).expect("valid row");
        assert!(want_loss.is_finite());
        // The gradient elements are about 1/K: compare them relative to that scale.
        let close = |g: f32, w: f64| (f64::from(g) - w).abs() <= 1e-5 / k as f64 + 1e-4 * w.abs();
        for backend in backends() {
            let ce = CrossEntropy::new(k)
                .smoothing(smoothing)
                .reduction(Reduction::Sum)
                .backend(backend);
            let mut losses = [0.0_f32];
            let mut grad = vec![0.0_f32; k + 1];
            ce.forward_backward(logits, &[target as u32], &mut losses, &mut grad[1..])
                .expect("valid call");
            let ctx = format!("{backend:?} {smoothing:?}");
            assert!(
                agrees(losses[0], want_loss, LOSS_TOLERANCE),
                "{ctx}: loss {} vs {want_loss}",
                losses[0]
            );
            let bad = grad[1..]
                .iter()
                .zip(&want)
                .position(|(&g, &w)| !close(g, w));
            assert_eq!(bad, None, "{ctx}: first gradient element off");
            assert_eq!(grad[0], 0.0, "{ctx}: wrote before the slice");
            let mut work = storage.clone();
            let mut in_place_losses = [0.0_f32];
            ce.forward_backward_in_place(&mut work[1..], &[target as u32], &mut in_place_losses)
                .expect("valid call");
            assert_eq!(in_place_losses[0].to_bits(), losses[0].to_bits(), "{ctx}");
            assert!(
                work[1..] == grad[1..],
                "{ctx}: in-place gradient differs from the out-of-place one"
            );
        }
    }
}

/// The NaN rule on rows of more than 2^22 classes, which take other paths than shorter ones: the
/// recomputing gradient pass on the portable and AVX2 backends (their reload limit is 2^22;
/// AVX-512 recomputes from 2^17 on) and, out of place, the non-temporal stores of AVX2 and
/// AVX-512. One batch of three such rows: a NaN in row 0, a `+inf` in row 1 (neither at its
/// target), and logits around `+1e4` in row 2. Through every entry point, on each of the three
/// backends this CPU has: rows 0 and 1 get loss NaN and a gradient row of NaN; row 2 agrees with
/// the reference within the documented tolerance and is bit for bit what it is when computed
/// alone (the poisoned rows leak nothing); the reduced loss is NaN. As in
/// `more_than_2_24_classes_in_one_row`, the reference is run on the one finite row only, and the
/// rows stop just past 2^22, so the test takes seconds. 64-bit targets only.
#[test]
#[cfg(target_pointer_width = "64")]
fn nan_and_inf_rows_beside_a_shifted_row_over_2_22_classes() {
    let k = (1 << 22) + 19;
    let mut rng = Rng::new(0x4_22);
    let mut logits = common::random_batch(&mut rng, 3, k, 0.0, 4.0);
    logits[1_234_567] = f32::NAN;
    logits[k + 3_000_001] = f32::INFINITY;
    for z in &mut logits[2 * k..] {
        *z += 1e4;
    }
    let finite = &logits[2 * k..];
    assert!(finite.iter().all(|z| z.is_finite() && *z > 9990.0));
    let targets = [5_u32, 17, 4_000_000];
    let available = backends();
    for smoothing in [Smoothing::Uniform(0.1), Smoothing::OffTarget(0.25)] {
        let mut want = vec![0.0_f64; k];
        let want_loss = reference::row(finite, targets[2] as usize, smoothing, Some(&mut want))
            .expect("valid row");
        assert!(want_loss.is_finite());
        // The gradient elements are about 1/K: besides the documented absolute tolerance,
        // compare them relative to that scale.
        let close = |g: f32, w: f64| (f64::from(g) - w).abs() <= 1e-5 / k as f64 + 1e-4 * w.abs();
        for &backend in &available {
            let ce = CrossEntropy::new(k)
                .smoothing(smoothing)
                .reduction(Reduction::Sum)
                .backend(backend);
            for entry in Entry::ALL {
                let ctx = format!("{backend:?} {smoothing:?} {entry:?}");
                let out = run(&ce, entry, &logits, &targets);
                assert!(out.total.is_nan(), "{ctx}: reduced loss {}", out.total);
                assert!(
                    out.losses[0].is_nan(),
                    "{ctx}: NaN row loss {}",
                    out.losses[0]
                );
                assert!(
                    out.losses[1].is_nan(),
                    "{ctx}: +inf row loss {}",
                    out.losses[1]
                );
                assert!(
                    agrees(out.losses[2], want_loss, LOSS_TOLERANCE),
                    "{ctx}: loss {} vs {want_loss}",
                    out.losses[2]
                );
                let alone = run(&ce, entry, finite, &targets[2..]);
                assert_eq!(
                    out.losses[2].to_bits(),
                    alone.losses[0].to_bits(),
                    "{ctx}: the finite row's loss depends on its neighbours"
                );
                if !entry.has_grad() {
                    continue;
                }
                let (poisoned, grad) = out.grad.split_at(2 * k);
                assert_eq!(
                    poisoned.iter().position(|g| !g.is_nan()),
                    None,
                    "{ctx}: a gradient element of a NaN or +inf row is not NaN"
                );
                let bad = grad
                    .iter()
                    .zip(&want)
                    .position(|(&g, &w)| !(agrees(g, w, GRAD_TOLERANCE) && close(g, w)));
                assert_eq!(bad, None, "{ctx}: first gradient element off");
                assert!(
                    bits(grad) == bits(&alone.grad),
                    "{ctx}: the finite row's gradient depends on its neighbours"
                );
            }
        }
    }
}

/// Class weights and soft targets on one row of more than 2^22 classes, out of place into a
/// gradient slice starting one element past an aligned address: the recomputing gradient pass
/// reads the auxiliary row (weights, target probabilities) beside the logits, and its
/// non-temporal stores (AVX2, AVX-512) peel a head of fewer than a vector first, through the tail
/// path, so the auxiliary row must be split at the same place. On every backend the loss and
/// every gradient element agree with the reference, and the in-place call gives the same bits.
/// 64-bit targets only.
#[test]
#[cfg(target_pointer_width = "64")]
fn weights_and_soft_targets_beside_a_row_over_2_22_classes() {
    let k = (1 << 22) + 19;
    let mut rng = Rng::new(0x5_22);
    let logits = common::random_batch(&mut rng, 1, k, 3.0, 4.0);
    let weights: Vec<f32> = (0..k)
        .map(|_| (0.5 + rng.symmetric().abs()) as f32)
        .collect();
    let mut soft: Vec<f32> = (0..k).map(|_| rng.symmetric().abs() as f32).collect();
    let total: f32 = soft.iter().sum();
    for q in &mut soft {
        *q /= total;
    }
    let class = [4_000_321_u32];
    let available = backends();
    let close = |g: f32, w: f32| (g - w).abs() <= 1e-5 / k as f32 + 1e-4 * w.abs();
    for (name, soft_targets) in [("class weights", false), ("soft targets", true)] {
        let base = CrossEntropy::new(k)
            .smoothing(Smoothing::Uniform(0.1))
            .reduction(Reduction::Sum);
        let base = if soft_targets {
            base
        } else {
            base.class_weights(&weights)
        };
        let targets = if soft_targets {
            Targets::Soft(&soft)
        } else {
            Targets::U32(&class)
        };
        let mut want = vec![0.0_f32; k];
        let mut want_losses = [0.0_f32];
        reference::forward_backward_with(
            &base,
            &logits,
            targets,
            &mut want_losses,
            &mut want,
            Extras::default(),
        )
        .expect("valid call");
        assert!(want_losses[0].is_finite(), "{name}");
        for &backend in &available {
            let ce = base.backend(backend);
            let ctx = format!("{backend:?} {name}");
            let mut losses = [0.0_f32];
            let mut storage = vec![0.0_f32; k + 1];
            ce.forward_backward_with(
                &logits,
                targets,
                &mut losses,
                &mut storage[1..],
                Extras::default(),
            )
            .expect("valid call");
            assert!(
                agrees(losses[0], f64::from(want_losses[0]), LOSS_TOLERANCE),
                "{ctx}: loss {} vs {}",
                losses[0],
                want_losses[0]
            );
            let grad = &storage[1..];
            let bad = grad
                .iter()
                .zip(&want)
                .position(|(&g, &w)| !(agrees(g, f64::from(w), GRAD_TOLERANCE) && close(g, w)));
            assert_eq!(bad, None, "{ctx}: first gradient element off");
            assert_eq!(storage[0], 0.0, "{ctx}: wrote before the slice");
            let mut work = logits.clone();
            let mut in_place = [0.0_f32];
            ce.forward_backward_in_place_with(&mut work, targets, &mut in_place, Extras::default())
                .expect("valid call");
            assert_eq!(in_place[0].to_bits(), losses[0].to_bits(), "{ctx}");
            assert!(work == grad, "{ctx}: in place differs from out of place");
        }
    }
}

/// A finite logit that `logit_scale` takes below `-f32::MAX` counts as a `-inf` logit, a masked
/// class (as one taken past `f32::MAX` counts as `+inf`): on every backend and through every
/// entry point the results are bit for bit those of the same batch with `-inf` in its place, and
/// agree with the reference. Rows: one class scaled away; the target scaled away (`+inf`); every
/// class scaled away (`+inf`, zero gradient). A finding of the options fuzzer.
#[test]
fn a_logit_scaled_below_f32_min_is_a_masked_class() {
    let mut rng = Rng::new(0x5ca1e);
    for k in [3, 17, 100, 4097] {
        for smoothing in [Smoothing::Uniform(0.1), Smoothing::OffTarget(0.3)] {
            let ce = CrossEntropy::new(k)
                .smoothing(smoothing)
                .logit_scale(4.0)
                .reduction(Reduction::Sum);
            let mut scaled = common::random_batch(&mut rng, 3, k, -5.0, 5.0);
            let targets = [0_u32, 1, (k - 1) as u32];
            scaled[1] = -3e38;
            scaled[k - 1] = -1e38;
            scaled[k + 1] = -1e38;
            for z in &mut scaled[2 * k..] {
                *z = -2e38;
            }
            let masked: Vec<f32> = scaled
                .iter()
                .map(|&z| if z < -1e37 { f32::NEG_INFINITY } else { z })
                .collect();
            let mut want_losses = vec![0.0_f32; 3];
            let mut want_grad = vec![0.0_f32; 3 * k];
            reference::forward_backward(&ce, &scaled, &targets, &mut want_losses, &mut want_grad)
                .expect("valid arguments");
            for backend in backends() {
                let ce = ce.backend(backend);
                for entry in Entry::ALL {
                    let a = run(&ce, entry, &scaled, &targets);
                    let b = run(&ce, entry, &masked, &targets);
                    assert!(a.bits_eq(&b), "{ce:?} {entry:?}: {a:?} vs {b:?}");
                    assert!(a.losses[0].is_finite(), "{ce:?} {entry:?}: {a:?}");
                    assert_eq!(a.losses[1..], [f32::INFINITY; 2], "{ce:?} {entry:?}");
                    for (row, (&got, &want)) in a.losses.iter().zip(&want_losses).enumerate() {
                        assert!(
                            agrees(got, f64::from(want), LOSS_TOLERANCE),
                            "{ce:?} {entry:?} row {row}: loss {got}, reference {want}"
                        );
                    }
                    if entry.has_grad() {
                        assert_eq!(a.grad[1], 0.0, "{ce:?} {entry:?}");
                        assert!(a.grad[2 * k..].iter().all(|&g| g == 0.0));
                        for (j, (&got, &want)) in a.grad.iter().zip(&want_grad).enumerate() {
                            assert!(
                                (f64::from(got) - f64::from(want)).abs() <= 4.0 * GRAD_TOLERANCE,
                                "{ce:?} {entry:?} gradient [{j}]: {got}, reference {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// `read_ahead` is a prefetch hint: whatever it names (nothing, part of a row, more than a row,
/// the call's own logits), every result of the gradient calls and of the stored-exp piece calls
/// is the same, bit for bit, as without it, on every backend.
#[test]
fn read_ahead_changes_no_result() {
    let mut rng = Rng::new(0x5eed_a4ead);
    for &k in &[40_usize, 1000, 5000] {
        let n = 3;
        let logits = common::random_batch(&mut rng, n, k, 0.0, 8.0);
        let targets = common::random_targets(&mut rng, n, k);
        let elsewhere = common::random_batch(&mut rng, 2, k + 7, 0.0, 1.0);
        let hints: [&[f32]; 4] = [&[], &elsewhere[..5], &elsewhere, &logits];
        for backend in backends() {
            let ce = CrossEntropy::new(k)
                .smoothing(Smoothing::Uniform(0.1))
                .backend(backend);
            for entry in Entry::ALL {
                let plain = run(&ce, entry, &logits, &targets);
                for hint in hints {
                    let hinted = run(&ce.read_ahead(hint), entry, &logits, &targets);
                    assert!(
                        plain.bits_eq(&hinted),
                        "{backend:?} K={k} {entry:?}, hint of {}: {}",
                        hint.len(),
                        common::first_difference(&plain, &hinted)
                    );
                }
            }
            let piece = Piece {
                offset: 0,
                width: k,
            };
            let states_and_exps = |ce: &CrossEntropy<'_>| {
                let mut states = vec![RowState::EMPTY; n];
                let mut exps = vec![0.0_f32; n * k];
                ce.piece_states_and_exps(&logits, piece, &targets[..], &mut states, &mut exps)
                    .expect("valid arguments");
                let mut in_place = logits.clone();
                let mut states_in_place = vec![RowState::EMPTY; n];
                ce.piece_states_and_exps_in_place(
                    &mut in_place,
                    piece,
                    &targets[..],
                    &mut states_in_place,
                )
                .expect("valid arguments");
                let words: Vec<u64> = states
                    .iter()
                    .chain(&states_in_place)
                    .flat_map(|s| s.to_words().map(f64::to_bits))
                    .collect();
                (words, bits(&exps), bits(&in_place))
            };
            let plain = states_and_exps(&ce);
            for hint in hints {
                assert!(
                    plain == states_and_exps(&ce.read_ahead(hint)),
                    "{backend:?} K={k} piece exps, hint of {}",
                    hint.len()
                );
            }
        }
    }
}
