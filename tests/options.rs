//! Every loss option (class weights in both semantics, z-loss, soft-cap, logit scale, soft
//! targets, class masks, upstream gradients, mean denominators, every target type, the per-row
//! extras), alone and combined, on every backend, against the scalar reference.

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    clippy::too_many_lines
)]

mod common;

use common::Rng;
use proptest::prelude::*;
use smoothce::{reference, Backend, CrossEntropy, Extras, Reduction, Smoothing, Targets};

/// One randomly configured case.
#[derive(Debug, Clone)]
struct Case {
    classes: usize,
    logits: Vec<f32>,
    targets: Vec<i64>,
    soft: Option<Vec<f32>>,
    eps: f32,
    off_target: bool,
    reduction: Reduction,
    weights: Option<(Vec<f32>, bool)>,
    z_loss: f32,
    softcap: Option<f32>,
    scale: f32,
    mask: Option<Vec<bool>>,
    upstream: f32,
    denominator: Option<f32>,
    row_scales: Option<Vec<f32>>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        1_usize..5,
        prop_oneof![1_usize..40, 40_usize..700, Just(4097_usize)],
    )
        .prop_flat_map(|(rows, classes)| {
            let logits = prop::collection::vec(-20.0_f32..20.0, rows * classes);
            let targets = prop::collection::vec(
                prop_oneof![9 => 0..classes as i64, 1 => Just(-100_i64)],
                rows,
            );
            let soft =
                prop::option::weighted(0.25, prop::collection::vec(0.0_f32..1.0, rows * classes));
            let weights = prop::option::weighted(
                0.3,
                (prop::collection::vec(0.0_f32..3.0, classes), any::<bool>()),
            );
            let mask = prop::option::weighted(
                0.25,
                prop::collection::vec(prop::bool::weighted(0.8), classes),
            );
            let row_scales =
                prop::option::weighted(0.3, prop::collection::vec(-2.0_f32..2.0, rows));
            (
                (
                    Just(classes),
                    logits,
                    targets,
                    soft,
                    0.0_f32..=1.0,
                    any::<bool>(),
                ),
                (
                    prop_oneof![
                        Just(Reduction::Mean),
                        Just(Reduction::Sum),
                        Just(Reduction::None)
                    ],
                    weights,
                    prop_oneof![Just(0.0_f32), 0.0_f32..0.1],
                    prop::option::weighted(0.3, 1.0_f32..50.0),
                    prop_oneof![Just(1.0_f32), 0.1_f32..4.0],
                    mask,
                ),
                (
                    prop_oneof![Just(1.0_f32), -3.0_f32..3.0],
                    prop::option::weighted(0.2, 0.5_f32..100.0),
                    row_scales,
                ),
            )
        })
        .prop_map(
            |(
                (classes, logits, targets, soft, eps, off),
                (reduction, weights, z_loss, softcap, scale, mask),
                (upstream, denominator, row_scales),
            )| {
                let soft = soft.map(|mut s| {
                    for row in s.chunks_mut(classes) {
                        let total: f32 = row.iter().sum();
                        if total > 0.0 {
                            for v in row.iter_mut() {
                                *v /= total;
                            }
                        }
                    }
                    s
                });
                let mask = mask.map(|mut m| {
                    m[0] = true;
                    m
                });
                Case {
                    classes,
                    logits,
                    targets,
                    soft,
                    eps,
                    off_target: off && classes >= 2,
                    reduction,
                    weights,
                    z_loss,
                    softcap,
                    scale,
                    mask,
                    upstream,
                    denominator,
                    row_scales: if reduction == Reduction::None {
                        row_scales
                    } else {
                        None
                    },
                }
            },
        )
}

fn config(c: &Case, backend: Backend) -> CrossEntropy<'_> {
    let mut ce = CrossEntropy::new(c.classes)
        .smoothing(if c.off_target && c.soft.is_none() {
            Smoothing::OffTarget(c.eps)
        } else {
            Smoothing::Uniform(c.eps)
        })
        .reduction(c.reduction)
        .z_loss(c.z_loss)
        .logit_scale(c.scale)
        .upstream(c.upstream)
        .backend(backend);
    if c.soft.is_none() {
        ce = ce.ignore_index_signed(-100);
        if let Some((w, per_class)) = &c.weights {
            ce = if *per_class {
                ce.class_weights(w)
            } else {
                ce.target_weights(w)
            };
        }
    }
    if let Some(cap) = c.softcap {
        ce = ce.softcap(cap);
    }
    if let Some(m) = &c.mask {
        ce = ce.class_mask(m);
    }
    if let Some(d) = c.denominator {
        ce = ce.mean_denominator(d);
    }
    ce
}

fn targets(c: &Case) -> Targets<'_> {
    match &c.soft {
        Some(s) => Targets::Soft(s),
        None => Targets::I64(&c.targets),
    }
}

/// The loss tolerance: the crate's, widened by a few ulp of the cap for soft-capped logits (they
/// are rounded to f32 after capping).
fn tolerances(c: &Case) -> (f64, f64) {
    let extra = c
        .softcap
        .map_or(0.0, |cap| 8.0 * f64::from(cap) * f64::from(f32::EPSILON));
    let scale = f64::from(c.upstream.abs().max(1.0))
        * c.row_scales.as_ref().map_or(1.0, |r| {
            r.iter().fold(1.0_f64, |m, v| m.max(f64::from(v.abs())))
        })
        * c.weights.as_ref().map_or(1.0, |(w, _)| {
            w.iter().fold(1.0_f64, |m, v| m.max(f64::from(*v)))
        })
        * (1.0 + 2.0 * f64::from(c.z_loss) * 60.0);
    (
        reference::LOSS_TOLERANCE + extra,
        (reference::GRAD_TOLERANCE + extra) * scale * 4.0,
    )
}

fn check(c: &Case) -> Result<(), TestCaseError> {
    let n = c.logits.len() / c.classes;
    let (loss_tol, grad_tol) = tolerances(c);
    let mut want_losses = vec![0.0_f32; n];
    let mut want_grad = vec![0.0_f32; c.logits.len()];
    let mut want_lse = vec![0.0_f32; n];
    let mut want_z = vec![0.0_f32; n];
    let mut want_correct = vec![false; n];
    let reference = reference::forward_backward_with(
        &config(c, Backend::Auto),
        &c.logits,
        targets(c),
        &mut want_losses,
        &mut want_grad,
        Extras {
            lse: Some(&mut want_lse),
            z_loss: Some(&mut want_z),
            correct: Some(&mut want_correct),
            row_scales: c.row_scales.as_deref(),
        },
    );
    let want = match reference {
        Ok(s) => s,
        Err(e) => {
            // The kernels must reject exactly what the reference rejects.
            let mut losses = vec![0.0_f32; n];
            let got = config(c, Backend::Auto).forward_with(
                &c.logits,
                targets(c),
                &mut losses,
                Extras {
                    row_scales: c.row_scales.as_deref(),
                    ..Extras::default()
                },
            );
            prop_assert_eq!(got.err(), Some(e));
            return Ok(());
        }
    };
    for backend in Backend::ALL.into_iter().filter(|b| b.is_available()) {
        let ce = config(c, backend);
        let mut losses = vec![0.0_f32; n];
        let mut grad = vec![0.0_f32; c.logits.len()];
        let mut lse = vec![0.0_f32; n];
        let mut z = vec![0.0_f32; n];
        let mut correct = vec![false; n];
        let got = ce
            .forward_backward_with(
                &c.logits,
                targets(c),
                &mut losses,
                &mut grad,
                Extras {
                    lse: Some(&mut lse),
                    z_loss: Some(&mut z),
                    correct: Some(&mut correct),
                    row_scales: c.row_scales.as_deref(),
                },
            )
            .map_err(|e| TestCaseError::fail(format!("{backend:?}: {e}")))?;
        let ctx = format!("{backend:?}");
        prop_assert!(
            reference::agrees(got.loss, f64::from(want.loss), loss_tol * 2.0),
            "{} loss {} want {}",
            ctx,
            got.loss,
            want.loss
        );
        prop_assert!(
            reference::agrees(got.z_loss, f64::from(want.z_loss), loss_tol),
            "{} z {} want {}",
            ctx,
            got.z_loss,
            want.z_loss
        );
        prop_assert_eq!(got.correct, want.correct, "{}", ctx);
        prop_assert_eq!(got.rows, want.rows);
        prop_assert_eq!(&correct, &want_correct, "{}", ctx);
        for row in 0..n {
            prop_assert!(
                reference::agrees(losses[row], f64::from(want_losses[row]), loss_tol * 2.0),
                "{} row {} loss {} want {}",
                ctx,
                row,
                losses[row],
                want_losses[row]
            );
            prop_assert!(
                reference::agrees(lse[row], f64::from(want_lse[row]), loss_tol * 2.0),
                "{} row {} lse {} want {}",
                ctx,
                row,
                lse[row],
                want_lse[row]
            );
            prop_assert!(
                reference::agrees(z[row], f64::from(want_z[row]), loss_tol * 2.0),
                "{} row {} z {} want {}",
                ctx,
                row,
                z[row],
                want_z[row]
            );
        }
        for (i, (&g, &w)) in grad.iter().zip(&want_grad).enumerate() {
            prop_assert!(
                (g.is_nan() && w.is_nan()) || (f64::from(g) - f64::from(w)).abs() <= grad_tol,
                "{} element {} (row {}) grad {} want {}",
                ctx,
                i,
                i / c.classes,
                g,
                w
            );
        }
        // In place gives the same bits; forward alone the same losses.
        let mut buf = c.logits.clone();
        let mut losses_in_place = vec![0.0_f32; n];
        ce.forward_backward_in_place_with(
            &mut buf,
            targets(c),
            &mut losses_in_place,
            Extras {
                row_scales: c.row_scales.as_deref(),
                ..Extras::default()
            },
        )
        .map_err(|e| TestCaseError::fail(format!("{e}")))?;
        prop_assert!(
            buf.iter()
                .zip(&grad)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{} in-place differs",
            ctx
        );
        prop_assert!(losses_in_place
            .iter()
            .zip(&losses)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        let mut losses_fwd = vec![0.0_f32; n];
        let fwd = ce
            .forward_with(&c.logits, targets(c), &mut losses_fwd, Extras::default())
            .map_err(|e| TestCaseError::fail(format!("{e}")))?;
        prop_assert!(
            reference::agrees(fwd.loss, f64::from(want.loss), loss_tol * 2.0),
            "{} fwd {} want {}",
            ctx,
            fwd.loss,
            want.loss
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn every_option_matches_the_reference(c in case()) {
        check(&c)?;
    }
}

/// Rows with a class mask whose disallowed classes hold what the masked variant must never sum
/// or let through (logits above every allowed one, NaN, `+inf`, `-inf`), in whole vectors and in
/// the tail, for row widths inside and beyond the widest mask the AVX-512 backend turns into bits
/// (32768 classes): every entry point of every backend against the reference.
#[test]
fn masked_classes_never_leak_into_the_rows() {
    let mut rng = Rng::new(0x3a5c_0001);
    let poison = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e30, 80.0];
    for k in [3_usize, 16, 40, 1000, 32768, 32769] {
        let n = if k > 1000 { 2 } else { 5 };
        let mask: Vec<bool> = (0..k).map(|_| rng.below(5) != 0).collect();
        let mut logits = common::random_batch(&mut rng, n, k, 0.0, 10.0);
        for (j, z) in logits.iter_mut().enumerate() {
            if !mask[j % k] {
                *z = poison[rng.below(poison.len())];
            }
        }
        let targets: Vec<u32> = (0..n)
            .map(|_| loop {
                let t = rng.below(k);
                if mask[t] {
                    break t as u32;
                }
            })
            .collect();
        for smoothing in common::smoothings(0.2, k) {
            let ce = CrossEntropy::new(k)
                .smoothing(smoothing)
                .class_mask(&mask)
                .reduction(Reduction::Sum);
            check_masked(&ce, &mask, &logits, &targets);
        }
    }
}

/// Every entry point of every backend against the reference: losses, total and gradient within
/// the crate's tolerances, masked classes' gradient exactly zero, in place bit-identical to out
/// of place.
fn check_masked(ce: &CrossEntropy<'_>, mask: &[bool], logits: &[f32], targets: &[u32]) {
    let (n, k) = (targets.len(), ce.classes());
    let mut want_losses = vec![0.0_f32; n];
    let mut want = vec![0.0_f32; n * k];
    let want_total = reference::forward_backward(ce, logits, targets, &mut want_losses, &mut want)
        .expect("valid arguments");
    for backend in common::backends() {
        let ce = ce.backend(backend);
        let ctx = format!("K = {k}, {backend:?}");
        let (mut losses, mut grad) = (vec![f32::NAN; n], vec![f32::NAN; n * k]);
        let total = ce
            .forward_backward(logits, targets, &mut losses, &mut grad)
            .expect("valid arguments");
        let tol = reference::LOSS_TOLERANCE;
        assert!(
            reference::agrees(total, f64::from(want_total), tol),
            "{ctx}: total {total} want {want_total}"
        );
        for (row, (&l, &w)) in losses.iter().zip(&want_losses).enumerate() {
            assert!(
                reference::agrees(l, f64::from(w), tol),
                "{ctx}: row {row} loss {l} want {w}"
            );
        }
        for (j, (&g, &w)) in grad.iter().zip(&want).enumerate() {
            let (row, c) = (j / k, j % k);
            if mask[c] {
                assert!(
                    reference::agrees(g, f64::from(w), reference::GRAD_TOLERANCE),
                    "{ctx}: row {row} class {c} gradient {g} want {w}"
                );
            } else {
                assert_eq!(
                    g.to_bits(),
                    0,
                    "{ctx}: row {row} masked class {c} gradient {g}"
                );
            }
        }
        let mut forward = vec![f32::NAN; n];
        let forward_total = ce
            .forward(logits, targets, &mut forward)
            .expect("valid arguments");
        assert!(
            reference::agrees(forward_total, f64::from(want_total), tol),
            "{ctx}: forward total {forward_total} want {want_total}"
        );
        let mut in_place = logits.to_vec();
        let mut in_place_losses = vec![f32::NAN; n];
        ce.forward_backward_in_place(&mut in_place, targets, &mut in_place_losses)
            .expect("valid arguments");
        assert!(
            common::bits(&in_place) == common::bits(&grad)
                && common::bits(&in_place_losses) == common::bits(&losses),
            "{ctx}: in place differs from out of place"
        );
    }
}

/// A masked row whose gradient constants overflow f32 (a logit scale of 1e9 and an upstream
/// gradient of 1e30; the target dominates, so every gradient element stays finite): the stored
/// exps are scaled in f64, and the disallowed classes, whose logits lie above the target's, still
/// get a gradient of exactly zero.
#[test]
fn masked_rows_with_overflowing_constants_match_the_reference() {
    let mut rng = Rng::new(0x3a5c_0002);
    for k in [40_usize, 1000] {
        let mask: Vec<bool> = (0..k).map(|c| c % 3 != 1).collect();
        let target = 3_u32;
        let logits: Vec<f32> = (0..k)
            .map(|c| match c {
                3 => 0.0,
                _ if !mask[c] => 0.5 + rng.unit() as f32,
                _ => -0.5 - rng.unit() as f32,
            })
            .collect();
        let ce = CrossEntropy::new(k)
            .smoothing(Smoothing::Uniform(0.1))
            .class_mask(&mask)
            .logit_scale(1e9)
            .upstream(1e30)
            .reduction(Reduction::Sum);
        let mut want_losses = [0.0_f32];
        let mut want = vec![0.0_f32; k];
        reference::forward_backward(&ce, &logits, &[target], &mut want_losses, &mut want)
            .expect("valid arguments");
        assert!(
            want.iter().all(|g| g.is_finite()),
            "the case must stay finite"
        );
        for backend in common::backends() {
            let ce = ce.backend(backend);
            let mut losses = [f32::NAN];
            let mut grad = vec![f32::NAN; k];
            ce.forward_backward(&logits, &[target], &mut losses, &mut grad)
                .expect("valid arguments");
            assert!(
                reference::agrees(losses[0], f64::from(want_losses[0]), 1e-5),
                "{ce:?}: loss {} want {}",
                losses[0],
                want_losses[0]
            );
            for (c, (&g, &w)) in grad.iter().zip(&want).enumerate() {
                if mask[c] {
                    let tol = 1e-5 * f64::from(w.abs()).max(1.0);
                    assert!(
                        (f64::from(g) - f64::from(w)).abs() <= tol,
                        "{ce:?}: class {c} gradient {g} want {w}"
                    );
                } else {
                    assert_eq!(g.to_bits(), 0, "{ce:?}: masked class {c} gradient {g}");
                }
            }
        }
    }
}
