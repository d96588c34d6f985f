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
            )| {
                cuts.sort_unstable();
                Case {
                    classes,
                    logits,
                    targets,
                    cuts,
                    order_seed,
                    eps,
                    off_target: off && classes >= 2,
                    reduction,
                    weights,
                    z_loss,
                    softcap,
                    scale,
                    mask: mask.map(|mut m| {
                        m[0] = true;
                        m
                    }),
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
        .ignore_index_signed(-1)
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
    let targets = Targets::I64(&c.targets);
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
fn pieces_must_fit_and_soft_targets_are_refused() {
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
    let soft = [0.5_f32; 4];
    let err = ce
        .piece_states(
            &[0.0; 4],
            Piece {
                offset: 0,
                width: 4,
            },
            Targets::Soft(&soft),
            &mut states,
        )
        .unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }));
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
