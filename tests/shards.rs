//! Rows in pieces: random splits (uneven, empty, the target in any piece), states merged in random
//! orders and tree shapes, must give the unsplit kernel's loss and gradient within tolerance, with
//! every option that pieces support, on every backend.

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    clippy::too_many_lines
)]

use proptest::prelude::*;
use smoothce::{
    reference, Backend, CrossEntropy, Error, Extras, Piece, Reduction, RowState, Smoothing, Targets,
};

#[derive(Debug, Clone)]
struct Case {
    classes: usize,
    logits: Vec<f32>,
    targets: Vec<i64>,
    cuts: Vec<usize>,
    order_seed: u64,
    eps: f32,
    off_target: bool,
    reduction: Reduction,
    weights: Option<(Vec<f32>, bool)>,
    z_loss: f32,
    softcap: Option<f32>,
    scale: f32,
    mask: Option<Vec<bool>>,
    /// Soft targets (`[N, K]` probability rows) instead of the class targets.
    soft: Option<Vec<f32>>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        1_usize..4,
        prop_oneof![1_usize..50, 50_usize..3000, Just(9000_usize)],
    )
        .prop_flat_map(|(rows, classes)| {
            (
                Just(classes),
                prop::collection::vec(
                    prop_oneof![8 => -30.0_f32..30.0, 1 => Just(f32::NEG_INFINITY)],
                    rows * classes,
                ),
                prop::collection::vec(prop_oneof![9 => 0..classes as i64, 1 => Just(-1_i64)], rows),
                prop::collection::vec(0..=classes, 0..9),
                any::<u64>(),
                (
                    0.0_f32..=1.0,
                    any::<bool>(),
                    prop_oneof![
                        Just(Reduction::Mean),
                        Just(Reduction::Sum),
                        Just(Reduction::None)
                    ],
                ),
                (
                    prop::option::weighted(
                        0.3,
                        (prop::collection::vec(0.0_f32..2.0, classes), any::<bool>()),
                    ),
                    prop_oneof![Just(0.0_f32), 0.0_f32..0.01],
                    prop::option::weighted(0.2, 2.0_f32..40.0),
                    prop_oneof![Just(1.0_f32), 0.2_f32..3.0],
                    prop::option::weighted(
                        0.2,
                        prop::collection::vec(prop::bool::weighted(0.85), classes),
                    ),
                ),
                prop::option::weighted(
                    0.25,
                    prop::collection::vec(
                        prop_oneof![2 => Just(0.0_f32), 3 => 0.0_f32..1.0],
                        rows * classes,
                    ),
                ),
            )
        })
        .prop_map(
            |(
                classes,
                logits,
                targets,
                mut cuts,
                order_seed,
                (eps, off, reduction),
                (weights, z_loss, softcap, scale, mask),
                soft,
            )| {
                cuts.sort_unstable();
                // Probability rows (a row of zeros stays: no target mass at all).
                let soft = soft.map(|mut t| {
                    for row in t.chunks_mut(classes) {
                        let sum: f32 = row.iter().sum();
                        if sum > 0.0 {
                            for p in row.iter_mut() {
                                *p /= sum;
                            }
                        }
                    }
                    t
                });
                let is_soft = soft.is_some();
                Case {
                    classes,
                    logits,
                    targets,
                    cuts,
                    order_seed,
                    eps,
                    // Soft targets take neither off-target smoothing nor class weights.
                    off_target: off && classes >= 2 && !is_soft,
                    reduction,
                    weights: weights.filter(|_| !is_soft),
                    z_loss,
                    softcap,
                    scale,
                    mask: mask.map(|mut m| {
                        m[0] = true;
                        m
                    }),
                    soft,
                }
            },
        )
}

fn config(c: &Case, backend: Backend) -> CrossEntropy<'_> {
    let mut ce = CrossEntropy::new(c.classes)
        .smoothing(if c.off_target {
            Smoothing::OffTarget(c.eps)
        } else {
            Smoothing::Uniform(c.eps)
        })
        .reduction(c.reduction)
        .z_loss(c.z_loss)
        .logit_scale(c.scale)
        .backend(backend);
    if let Some((w, per_class)) = &c.weights {
        ce = if *per_class {
            ce.class_weights(w)
        } else {
            ce.target_weights(w)
        };
    }
    if let Some(cap) = c.softcap {
        ce = ce.softcap(cap);
    }
    if c.soft.is_none() {
        ce = ce.ignore_index_signed(-1);
    }
    if let Some(m) = &c.mask {
        ce = ce.class_mask(m);
    }
    ce
}

/// The pieces `[cut_i, cut_{i+1})`, empty ones included.
fn pieces(c: &Case) -> Vec<Piece> {
    let mut bounds = vec![0];
    bounds.extend(&c.cuts);
    bounds.push(c.classes);
    bounds
        .windows(2)
        .map(|w| Piece {
            offset: w[0],
            width: w[1] - w[0],
        })
        .collect()
}

/// The piece `[rows, width]` cut out of the full `[rows, K]` logits.
fn slice(c: &Case, p: Piece) -> Vec<f32> {
    c.logits
        .chunks(c.classes)
        .flat_map(|row| row[p.offset..p.offset + p.width].iter().copied())
        .collect()
}

/// Merges the per-piece states of one row in an order and tree shape drawn from `seed`.
fn merge_shuffled(mut parts: Vec<RowState>, mut seed: u64) -> RowState {
    while parts.len() > 1 {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let i = (seed >> 33) as usize % parts.len();
        let a = parts.swap_remove(i);
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let j = (seed >> 33) as usize % parts.len();
        let b = parts.swap_remove(j);
        parts.push(if seed & 1 == 0 {
            a.merge(b)
        } else {
            b.merge(a)
        });
    }
    parts.pop().unwrap_or(RowState::EMPTY)
}

fn check(c: &Case) -> Result<(), TestCaseError> {
    let n = c.targets.len();
    let k = c.classes;
    let targets = match &c.soft {
        Some(t) => Targets::Soft(t),
        None => Targets::I64(&c.targets),
    };
    let extra = c
        .softcap
        .map_or(0.0, |cap| 8.0 * f64::from(cap) * f64::from(f32::EPSILON));
    let weight_max = c.weights.as_ref().map_or(1.0, |(w, _)| {
        w.iter().fold(1.0_f64, |m, v| m.max(f64::from(*v)))
    });
    let loss_tol = 2.0 * (reference::LOSS_TOLERANCE + extra);
    let grad_tol = 4.0
        * (reference::GRAD_TOLERANCE + extra)
        * weight_max
        * f64::from(c.scale.max(1.0))
        * (1.0 + 2.0 * f64::from(c.z_loss) * 100.0);
    for backend in Backend::ALL.into_iter().filter(|b| b.is_available()) {
        let ce = config(c, backend);
        let mut whole_losses = vec![0.0_f32; n];
        let mut whole_grad = vec![0.0_f32; n * k];
        let mut whole_lse = vec![0.0_f32; n];
        let whole = ce
            .forward_backward_with(
                &c.logits,
                targets,
                &mut whole_losses,
                &mut whole_grad,
                Extras {
                    lse: Some(&mut whole_lse),
                    ..Extras::default()
                },
            )
            .map_err(|e| TestCaseError::fail(format!("{e}")))?;
        let pieces = pieces(c);
        let mut per_piece: Vec<Vec<RowState>> = Vec::new();
        for &p in &pieces {
            let mut states = vec![RowState::EMPTY; n];
            ce.piece_states(&slice(c, p), p, targets, &mut states)
                .map_err(|e| TestCaseError::fail(format!("{e}")))?;
            // The words round trip is exact.
            for s in &states {
                prop_assert_eq!(
                    RowState::from_words(s.to_words())
                        .to_words()
                        .map(f64::to_bits),
                    s.to_words().map(f64::to_bits)
                );
            }
            per_piece.push(states);
        }
        let merged: Vec<RowState> = (0..n)
            .map(|row| {
                merge_shuffled(
                    per_piece.iter().map(|s| s[row]).collect(),
                    c.order_seed ^ row as u64,
                )
            })
            .collect();
        let mut losses = vec![0.0_f32; n];
        let mut lse = vec![0.0_f32; n];
        let split = ce
            .finish_states(
                &merged,
                targets,
                &mut losses,
                Extras {
                    lse: Some(&mut lse),
                    ..Extras::default()
                },
            )
            .map_err(|e| TestCaseError::fail(format!("{e}")))?;
        prop_assert!(
            reference::agrees(split.loss, f64::from(whole.loss), loss_tol),
            "{:?} loss {} unsplit {}",
            backend,
            split.loss,
            whole.loss
        );
        for row in 0..n {
            prop_assert!(
                reference::agrees(losses[row], f64::from(whole_losses[row]), loss_tol),
                "{:?} row {} loss {} unsplit {}",
                backend,
                row,
                losses[row],
                whole_losses[row]
            );
            prop_assert!(reference::agrees(
                lse[row],
                f64::from(whole_lse[row]),
                loss_tol
            ));
        }
        for (i, &p) in pieces.iter().enumerate() {
            let logits = slice(c, p);
            let mut grad = vec![0.0_f32; logits.len()];
            ce.piece_backward(&logits, p, targets, &merged, &mut grad)
                .map_err(|e| TestCaseError::fail(format!("{e}")))?;
            let mut in_place = logits.clone();
            ce.piece_backward_in_place(&mut in_place, p, targets, &merged)
                .map_err(|e| TestCaseError::fail(format!("{e}")))?;
            prop_assert!(
                grad.iter()
                    .zip(&in_place)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "piece {} in place differs",
                i
            );
            for row in 0..n {
                for j in 0..p.width {
                    let got = grad[row * p.width + j];
                    let want = whole_grad[row * k + p.offset + j];
                    prop_assert!(
                        (got.is_nan() && want.is_nan())
                            || (f64::from(got) - f64::from(want)).abs() <= grad_tol,
                        "{:?} piece {:?} row {} class {}: {} unsplit {}",
                        backend,
                        p,
                        row,
                        p.offset + j,
                        got,
                        want
                    );
                }
            }
        }
        if c.softcap.is_none() {
            check_stored_exps(
                c,
                &ce,
                &pieces,
                whole_losses.as_slice(),
                &whole_grad,
                grad_tol,
            )
            .map_err(|e| TestCaseError::fail(format!("{backend:?}: {e}")))?;
        }
    }
    Ok(())
}

/// The one-exp path: `piece_states_and_exps` (out of place and in place, which must agree
/// bit for bit), merged in a random order, then `piece_backward_from_exps`, against the unsplit
/// losses and gradient.
fn check_stored_exps(
    c: &Case,
    ce: &CrossEntropy<'_>,
    pieces: &[Piece],
    whole_losses: &[f32],
    whole_grad: &[f32],
    grad_tol: f64,
) -> Result<(), String> {
    let n = c.targets.len();
    let k = c.classes;
    let targets = match &c.soft {
        Some(t) => Targets::Soft(t),
        None => Targets::I64(&c.targets),
    };
    let loss_tol = 2.0 * reference::LOSS_TOLERANCE;
    let mut own: Vec<Vec<RowState>> = Vec::new();
    let mut kept: Vec<Vec<f32>> = Vec::new();
    for &p in pieces {
        let logits = slice(c, p);
        let mut states = vec![RowState::EMPTY; n];
        // Whatever the buffer held before must not matter.
        let mut exps = vec![f32::NAN; logits.len()];
        ce.piece_states_and_exps(&logits, p, targets, &mut states, &mut exps)
            .map_err(|e| e.to_string())?;
        let mut in_place = logits.clone();
        let mut states_in_place = vec![RowState::EMPTY; n];
        ce.piece_states_and_exps_in_place(&mut in_place, p, targets, &mut states_in_place)
            .map_err(|e| e.to_string())?;
        let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        if !same(&exps, &in_place) {
            return Err(format!("piece {p:?}: exps in place differ"));
        }
        let words = |s: &[RowState]| -> Vec<u64> {
            s.iter()
                .flat_map(|s| s.to_words().map(f64::to_bits))
                .collect()
        };
        if words(&states) != words(&states_in_place) {
            return Err(format!("piece {p:?}: states in place differ"));
        }
        own.push(states);
        kept.push(exps);
    }
    let merged: Vec<RowState> = (0..n)
        .map(|row| {
            merge_shuffled(
                own.iter().map(|s| s[row]).collect(),
                c.order_seed.rotate_left(17) ^ row as u64,
            )
        })
        .collect();
    let mut losses = vec![0.0_f32; n];
    ce.finish_states(&merged, targets, &mut losses, Extras::default())
        .map_err(|e| e.to_string())?;
    for row in 0..n {
        if !reference::agrees(losses[row], f64::from(whole_losses[row]), loss_tol) {
            return Err(format!(
                "row {row}: loss from stored-exp states {} unsplit {}",
                losses[row], whole_losses[row]
            ));
        }
    }
    for ((&p, exps), own) in pieces.iter().zip(&mut kept).zip(&own) {
        ce.piece_backward_from_exps(exps, p, targets, own, &merged)
            .map_err(|e| e.to_string())?;
        for row in 0..n {
            for j in 0..p.width {
                let got = exps[row * p.width + j];
                let want = whole_grad[row * k + p.offset + j];
                let ok = (got.is_nan() && want.is_nan())
                    || (f64::from(got) - f64::from(want)).abs() <= grad_tol;
                if !ok {
                    return Err(format!(
                        "piece {p:?} row {row} class {}: {got} from exps, unsplit {want}",
                        p.offset + j
                    ));
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 120, ..ProptestConfig::default() })]

    #[test]
    fn split_rows_match_the_unsplit_kernel(c in case()) {
        check(&c)?;
    }
}

#[test]
fn pieces_must_fit_and_soft_target_correctness_is_refused() {
    let ce = CrossEntropy::new(4);
    let mut states = [RowState::EMPTY];
    let err = ce
        .piece_states(
            &[0.0; 3],
            Piece {
                offset: 2,
                width: 3,
            },
            &[0_u32],
            &mut states,
        )
        .unwrap_err();
    assert_eq!(
        err,
        Error::PieceOutOfRange {
            offset: 2,
            width: 3,
            classes: 4
        }
    );
    let err = ce
        .piece_states(
            &[0.0; 2],
            Piece {
                offset: usize::MAX,
                width: 2,
            },
            &[0_u32],
            &mut states,
        )
        .unwrap_err();
    assert!(matches!(err, Error::PieceOutOfRange { .. }));
    assert_eq!(states, [RowState::EMPTY]);
    // Soft targets work in pieces, but their per-row correctness is not in the states.
    let soft = [0.5_f32, 0.0, 0.25, 0.25];
    ce.piece_states(
        &[0.0, 1.0, 2.0, 3.0],
        Piece {
            offset: 0,
            width: 4,
        },
        Targets::Soft(&soft),
        &mut states,
    )
    .unwrap();
    let mut losses = [7.0_f32];
    let mut correct = [true];
    let err = ce
        .finish_states(
            &states,
            Targets::Soft(&soft),
            &mut losses,
            Extras {
                correct: Some(&mut correct),
                ..Extras::default()
            },
        )
        .unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err:?}");
    assert_eq!((losses, correct), ([7.0], [true]));
    ce.finish_states(
        &states,
        Targets::Soft(&soft),
        &mut losses,
        Extras::default(),
    )
    .unwrap();
    let mut whole = [0.0_f32];
    ce.forward_with(
        &[0.0, 1.0, 2.0, 3.0],
        Targets::Soft(&soft),
        &mut whole,
        Extras::default(),
    )
    .unwrap();
    assert!(
        (losses[0] - whole[0]).abs() < 1e-6,
        "{losses:?} vs {whole:?}"
    );
    let mut grad = [7.0_f32; 2];
    let err = ce
        .piece_backward(
            &[0.0; 2],
            Piece {
                offset: 0,
                width: 2,
            },
            &[0_u32],
            &states,
            &mut grad[..1],
        )
        .unwrap_err();
    assert_eq!(
        err,
        Error::GradLength {
            expected: 2,
            actual: 1
        }
    );
    assert_eq!(grad, [7.0, 7.0]);
}

/// The stored-exp calls refuse a soft-cap, own states of the wrong length or that cannot be part
/// of the merged ones, and a wrong exps length, writing nothing.
#[test]
fn stored_exps_refuse_what_they_cannot_do() {
    let whole = Piece {
        offset: 0,
        width: 3,
    };
    let logits = [1.0_f32, 2.0, 3.0];
    let capped = CrossEntropy::new(3).softcap(5.0);
    let mut states = [RowState::EMPTY];
    let mut exps = [7.0_f32; 3];
    let err = capped
        .piece_states_and_exps(&logits, whole, &[0_u32], &mut states, &mut exps)
        .unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err:?}");
    let mut buf = logits;
    let err = capped
        .piece_states_and_exps_in_place(&mut buf, whole, &[0_u32], &mut states)
        .unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err:?}");
    assert_eq!((exps, buf, states), ([7.0; 3], logits, [RowState::EMPTY]));

    let ce = CrossEntropy::new(3);
    let err = ce
        .piece_states_and_exps(&logits, whole, &[0_u32], &mut states, &mut exps[..2])
        .unwrap_err();
    assert_eq!(
        err,
        Error::GradLength {
            expected: 3,
            actual: 2
        }
    );
    let left = Piece {
        offset: 0,
        width: 2,
    };
    let right = Piece {
        offset: 2,
        width: 1,
    };
    let mut own_left = [RowState::EMPTY];
    let mut own_right = [RowState::EMPTY];
    let mut exps_left = [0.0_f32; 2];
    let mut exps_right = [0.0_f32; 1];
    ce.piece_states_and_exps(&logits[..2], left, &[0_u32], &mut own_left, &mut exps_left)
        .unwrap();
    ce.piece_states_and_exps(
        &logits[2..],
        right,
        &[0_u32],
        &mut own_right,
        &mut exps_right,
    )
    .unwrap();
    let merged = [own_left[0].merge(own_right[0])];
    let before = exps_left;
    // The right piece's state (max 3) is not part of the left piece's alone (max 2).
    let err = ce
        .piece_backward_from_exps(&mut exps_left, left, &[0_u32], &merged, &own_left)
        .unwrap_err();
    assert_eq!(err, Error::StateMismatch { row: 0 });
    let err = ce
        .piece_backward_from_exps(&mut exps_left, left, &[0_u32], &[], &merged)
        .unwrap_err();
    assert_eq!(
        err,
        Error::LossesLength {
            expected: 1,
            actual: 0
        }
    );
    assert_eq!(exps_left, before);
    // And with the right states, the gradient.
    ce.piece_backward_from_exps(&mut exps_left, left, &[0_u32], &own_left, &merged)
        .unwrap();
    ce.piece_backward_from_exps(&mut exps_right, right, &[0_u32], &own_right, &merged)
        .unwrap();
    let mut full = [0.0_f32; 3];
    ce.forward_backward(&logits, &[0_u32], &mut [0.0], &mut full)
        .unwrap();
    let split = [exps_left[0], exps_left[1], exps_right[0]];
    assert!(
        split.iter().zip(&full).all(|(a, b)| (a - b).abs() < 1e-6),
        "{split:?} vs {full:?}"
    );
}

#[test]
fn smoothing_uses_the_global_class_count() {
    // Megatron-LM's bug: the smoothing term with the piece's K. Here a row of 1000 classes in
    // 10 pieces must give the unsplit loss, which differs from a 100-class loss.
    let k = 1000;
    let logits: Vec<f32> = (0..k).map(|i| ((i * 37 % 101) as f32) / 10.0).collect();
    let ce = CrossEntropy::new(k).smoothing(Smoothing::Uniform(0.3));
    let mut merged = RowState::EMPTY;
    for p in 0..10 {
        let piece = Piece {
            offset: p * 100,
            width: 100,
        };
        let mut s = [RowState::EMPTY];
        ce.piece_states(&logits[p * 100..(p + 1) * 100], piece, &[500_u32], &mut s)
            .unwrap();
        merged = merged.merge(s[0]);
    }
    let mut losses = [0.0_f32];
    let split = ce
        .finish_states(&[merged], &[500_u32], &mut losses, Extras::default())
        .unwrap()
        .loss;
    let whole = reference::forward(&ce, &logits, &[500], &mut [0.0]).unwrap();
    assert!(
        reference::agrees(split, f64::from(whole), reference::LOSS_TOLERANCE),
        "{split} vs {whole}"
    );
}
