//! Every `Error` the API can return, from two tables: the exact error value from each entry point
//! that can return it (and from the reference, which documents the same checks), a non-empty
//! `Display`, and nothing written: `losses`, `grad`, the in-place `logits`, the extras, the piece
//! states and exps keep their sentinel contents bit for bit. The first table runs the three plain
//! calls; the second the `*_with` calls, `finish_states` and the six piece calls (soft targets,
//! extras, per-row scales, pieces and their states). Also the edge arguments that must be
//! accepted, and `BackendUnavailable` for whichever backends this machine lacks.

mod common;

use common::{backends, bits, Entry};
use smoothce::{
    reference, Backend, CrossEntropy, Error, Extras, Piece, Reduction, RowState, Smoothing, Targets,
};

/// One rejected call: a configuration and buffer shapes with exactly one fault.
struct Case {
    name: &'static str,
    ce: CrossEntropy<'static>,
    logits: usize,
    targets: Vec<u32>,
    losses: usize,
    /// The length of `grad` for `forward_backward`.
    grad: usize,
    /// Whether `forward` and the in-place call see the fault too (not for a bad `grad`).
    all_entries: bool,
    want: Error,
}

impl Case {
    fn new(name: &'static str, ce: CrossEntropy<'static>, rows: usize, want: Error) -> Self {
        let k = ce.classes();
        Case {
            name,
            ce,
            logits: rows * k,
            targets: vec![0; rows],
            losses: rows,
            grad: rows * k,
            all_entries: true,
            want,
        }
    }
}

/// Error equality that treats the NaN of `InvalidSmoothing` by its bits.
fn same(a: &Error, b: &Error) -> bool {
    match (a, b) {
        (Error::InvalidSmoothing { eps: x }, Error::InvalidSmoothing { eps: y }) => {
            x.to_bits() == y.to_bits()
        }
        (
            Error::InvalidOption {
                option: o,
                value: x,
            },
            Error::InvalidOption {
                option: p,
                value: y,
            },
        ) => o == p && x.to_bits() == y.to_bits(),
        (
            Error::InvalidWeight { class: c, value: x },
            Error::InvalidWeight { class: d, value: y },
        ) => c == d && x.to_bits() == y.to_bits(),
        (
            Error::InvalidRowScale { row: r, value: x },
            Error::InvalidRowScale { row: q, value: y },
        ) => r == q && x.to_bits() == y.to_bits(),
        _ => a == b,
    }
}

/// Sentinel buffer contents: distinct values, NaN payloads included, so that any write shows.
fn sentinels(n: usize, salt: u32) -> Vec<f32> {
    (0..n)
        .map(|i| match i % 3 {
            0 => f32::from_bits(0x7fc0_0000 | (salt << 12) | (i as u32 & 0xfff)),
            1 => -1234.5 - i as f32,
            _ => f32::from_bits(0x0000_0001 + i as u32),
        })
        .collect()
}

#[allow(clippy::too_many_lines)]
fn cases() -> Vec<Case> {
    let huge = usize::MAX / 2 + 1;
    let mut cases = vec![
        Case::new("zero classes", CrossEntropy::new(0), 1, Error::ZeroClasses),
        Case::new(
            "zero classes, zero rows",
            CrossEntropy::new(0),
            0,
            Error::ZeroClasses,
        ),
        Case::new(
            "off-target with one class",
            CrossEntropy::new(1).smoothing(Smoothing::OffTarget(0.1)),
            2,
            Error::OffTargetNeedsTwoClasses { classes: 1 },
        ),
        Case::new(
            "off-target(0) with one class",
            CrossEntropy::new(1).smoothing(Smoothing::OffTarget(0.0)),
            1,
            Error::OffTargetNeedsTwoClasses { classes: 1 },
        ),
    ];
    let bad_eps = [
        f32::NAN,
        -0.1,
        1.1,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1.0 + f32::EPSILON,
        -f32::MIN_POSITIVE,
    ];
    for eps in bad_eps {
        for smoothing in [Smoothing::Uniform(eps), Smoothing::OffTarget(eps)] {
            cases.push(Case::new(
                "invalid smoothing",
                CrossEntropy::new(3).smoothing(smoothing),
                2,
                Error::InvalidSmoothing { eps },
            ));
        }
    }
    for actual in [0, 5, 7, 12] {
        cases.push(Case {
            logits: actual,
            ..Case::new(
                "logits length",
                CrossEntropy::new(3),
                2,
                Error::LogitsLength {
                    expected: 6,
                    actual,
                },
            )
        });
    }
    for actual in [0, 1, 3] {
        cases.push(Case {
            losses: actual,
            ..Case::new(
                "losses length",
                CrossEntropy::new(3),
                2,
                Error::LossesLength {
                    expected: 2,
                    actual,
                },
            )
        });
    }
    for actual in [0, 5, 7] {
        cases.push(Case {
            grad: actual,
            all_entries: false,
            ..Case::new(
                "grad length",
                CrossEntropy::new(3),
                2,
                Error::GradLength {
                    expected: 6,
                    actual,
                },
            )
        });
    }
    let out_of_range = [
        // (ignore index, targets, bad row, bad target)
        (None, vec![0, 3], 1, 3_u32),
        (None, vec![2, 1, u32::MAX], 2, u32::MAX),
        (Some(7), vec![u32::MAX, 0], 0, u32::MAX),
        (Some(u32::MAX), vec![u32::MAX, 5, 1], 1, 5),
        // PyTorch's -100 without an ignore index is just a huge target.
        (None, vec![(-100_i32) as u32], 0, (-100_i32) as u32),
    ];
    for (ignore, targets, row, target) in out_of_range {
        let mut ce = CrossEntropy::new(3).reduction(Reduction::Sum);
        if let Some(index) = ignore {
            ce = ce.ignore_index(index);
        }
        let rows = targets.len();
        cases.push(Case {
            targets,
            ..Case::new(
                "target out of range",
                ce,
                rows,
                Error::TargetOutOfRange {
                    row,
                    target: i64::from(target),
                    classes: 3,
                },
            )
        });
    }
    for rows in [2, 3] {
        cases.push(Case {
            logits: 0,
            grad: 0,
            targets: vec![0, 1, 2][..rows].to_vec(),
            losses: rows,
            ..Case::new(
                "size overflow",
                CrossEntropy::new(huge),
                0,
                Error::SizeOverflow {
                    rows,
                    classes: huge,
                },
            )
        });
    }
    cases.extend(option_cases());
    cases
}

/// Weight rows with a negative, NaN or infinite weight (the first bad one is reported).
const BAD_WEIGHTS: [[f32; 3]; 4] = [
    [1.0, -1.0, 1.0],
    [1.0, 1.0, f32::NAN],
    [f32::INFINITY, 1.0, 1.0],
    [1.0, -0.5, f32::NAN],
];

/// A long weight row, bad far from its start (the valid check is one pass over every weight).
const LONG_BAD_WEIGHTS: [f32; 64] = {
    let mut w = [1.0_f32; 64];
    w[50] = -2.0;
    w[60] = f32::NAN;
    w
};

/// The option values and combinations that are rejected.
#[allow(clippy::too_many_lines)]
fn option_cases() -> Vec<Case> {
    let base = CrossEntropy::new(3);
    let mut cases = vec![
        Case::new(
            "class weights length",
            base.class_weights(&[1.0, 2.0]),
            2,
            Error::WeightsLength {
                expected: 3,
                actual: 2,
            },
        ),
        Case::new(
            "target weights length",
            base.target_weights(&[1.0, 2.0, 3.0, 4.0]),
            2,
            Error::WeightsLength {
                expected: 3,
                actual: 4,
            },
        ),
        Case::new(
            "class and target weights",
            base.class_weights(&[1.0, 2.0, 3.0])
                .target_weights(&[1.0, 2.0, 3.0]),
            2,
            Error::Unsupported {
                what: "class_weights together with target_weights (one weight mode per loss)",
            },
        ),
        Case::new(
            "target and class weights",
            base.target_weights(&[1.0, 2.0, 3.0])
                .class_weights(&[1.0, 2.0, 3.0]),
            2,
            Error::Unsupported {
                what: "class_weights together with target_weights (one weight mode per loss)",
            },
        ),
        Case::new(
            "class mask length",
            base.class_mask(&[true, true]),
            2,
            Error::MaskLength {
                expected: 3,
                actual: 2,
            },
        ),
        Case::new(
            "class mask allows nothing",
            base.class_mask(&[false, false, false]),
            2,
            Error::MaskAllowsNoClass,
        ),
    ];
    for weights in &BAD_WEIGHTS {
        let (class, &value) = weights
            .iter()
            .enumerate()
            .find(|(_, w)| !(w.is_finite() && **w >= 0.0))
            .expect("a bad weight");
        for ce in [base.class_weights(weights), base.target_weights(weights)] {
            cases.push(Case::new(
                "invalid weight",
                ce,
                2,
                Error::InvalidWeight { class, value },
            ));
        }
    }
    for ce in [
        CrossEntropy::new(64).class_weights(&LONG_BAD_WEIGHTS),
        CrossEntropy::new(64).target_weights(&LONG_BAD_WEIGHTS),
    ] {
        cases.push(Case::new(
            "invalid weight in a long row",
            ce,
            2,
            Error::InvalidWeight {
                class: 50,
                value: -2.0,
            },
        ));
    }
    let bad_options = [
        ("z_loss", base.z_loss(-1e-4), -1e-4),
        ("z_loss", base.z_loss(f32::NAN), f32::NAN),
        ("z_loss", base.z_loss(f32::INFINITY), f32::INFINITY),
        ("softcap", base.softcap(0.0), 0.0),
        ("softcap", base.softcap(-30.0), -30.0),
        ("softcap", base.softcap(f32::INFINITY), f32::INFINITY),
        ("logit_scale", base.logit_scale(0.0), 0.0),
        ("logit_scale", base.logit_scale(-1.0), -1.0),
        ("logit_scale", base.logit_scale(f32::NAN), f32::NAN),
        ("mean_denominator", base.mean_denominator(0.0), 0.0),
        (
            "mean_denominator",
            base.mean_denominator(f32::INFINITY),
            f32::INFINITY,
        ),
        ("upstream", base.upstream(f32::NAN), f32::NAN),
        (
            "upstream",
            base.upstream(f32::NEG_INFINITY),
            f32::NEG_INFINITY,
        ),
    ];
    for (option, ce, value) in bad_options {
        cases.push(Case::new(
            "invalid option",
            ce,
            2,
            Error::InvalidOption { option, value },
        ));
    }
    cases
}

/// Runs one rejected call through `entry` and checks the error and the untouched buffers.
fn reject(case: &Case, ce: &CrossEntropy<'_>, entry: Entry) {
    let ctx = format!("{} ({ce:?}, {entry:?})", case.name);
    let logits = sentinels(case.logits, 1);
    let mut losses = sentinels(case.losses, 2);
    let mut grad = sentinels(case.grad, 3);
    let mut in_place = logits.clone();
    let (losses_before, grad_before, logits_before) = (bits(&losses), bits(&grad), bits(&logits));
    let result = match entry {
        Entry::Forward => ce.forward(&logits, &case.targets, &mut losses),
        Entry::ForwardBackward => {
            ce.forward_backward(&logits, &case.targets, &mut losses, &mut grad)
        }
        Entry::InPlace => ce.forward_backward_in_place(&mut in_place, &case.targets, &mut losses),
    };
    expect_error(&ctx, result.map(|v| format!("{v}")), &case.want);
    assert_eq!(bits(&losses), losses_before, "{ctx}: losses written");
    assert_eq!(bits(&grad), grad_before, "{ctx}: grad written");
    assert_eq!(bits(&in_place), logits_before, "{ctx}: logits written");
}

/// Checks that a call was rejected with exactly `want` (`Ok` carries what it returned instead),
/// and the error's `Display`, `Debug` and `source`.
fn expect_error(ctx: &str, result: Result<String, Error>, want: &Error) {
    let err = match result {
        Ok(v) => panic!("{ctx}: accepted, returned {v}"),
        Err(e) => e,
    };
    assert!(same(&err, want), "{ctx}: got {err:?}, expected {want:?}");
    assert!(!err.to_string().is_empty(), "{ctx}: empty Display");
    assert!(!format!("{err:?}").is_empty(), "{ctx}: empty Debug");
    let as_std: &dyn std::error::Error = &err;
    assert!(as_std.source().is_none(), "{ctx}: unexpected source");
}

/// The table: every case, through each entry point it applies to, on every available backend.
#[test]
fn every_error_is_reported_exactly_and_nothing_is_written() {
    let cases = cases();
    assert!(cases.len() > 30);
    for case in &cases {
        for backend in backends() {
            let ce = case.ce.backend(backend);
            for entry in Entry::ALL {
                if case.all_entries || entry == Entry::ForwardBackward {
                    reject(case, &ce, entry);
                }
            }
        }
    }
}

/// The reference checks arguments exactly like the kernels and returns the same errors.
#[test]
fn reference_reports_the_same_errors() {
    for case in cases() {
        let logits = sentinels(case.logits, 4);
        let mut losses = sentinels(case.losses, 5);
        let mut grad = sentinels(case.grad, 6);
        let err =
            reference::forward_backward(&case.ce, &logits, &case.targets, &mut losses, &mut grad)
                .expect_err(case.name);
        assert!(
            same(&err, &case.want),
            "{}: reference gave {err:?}",
            case.name
        );
        if case.all_entries {
            let err = reference::forward(&case.ce, &logits, &case.targets, &mut losses)
                .expect_err(case.name);
            assert!(
                same(&err, &case.want),
                "{}: reference gave {err:?}",
                case.name
            );
        }
    }
}

/// The entry points beyond the three plain calls, and the reference's `*_with` calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    ForwardWith,
    ForwardBackwardWith,
    InPlaceWith,
    ReferenceForwardWith,
    ReferenceForwardBackwardWith,
    FinishStates,
    PieceStates,
    PieceBackward,
    PieceBackwardInPlace,
    PieceStatesAndExps,
    PieceStatesAndExpsInPlace,
    PieceBackwardFromExps,
}

/// The `*_with` calls (the reference's included) and `finish_states`: every call that takes
/// [`Extras`].
const WITH_AND_FINISH: &[Call] = &[
    Call::ForwardWith,
    Call::ForwardBackwardWith,
    Call::InPlaceWith,
    Call::ReferenceForwardWith,
    Call::ReferenceForwardBackwardWith,
    Call::FinishStates,
];
/// The six calls that take a [`Piece`].
const PIECES: &[Call] = &[
    Call::PieceStates,
    Call::PieceBackward,
    Call::PieceBackwardInPlace,
    Call::PieceStatesAndExps,
    Call::PieceStatesAndExpsInPlace,
    Call::PieceBackwardFromExps,
];
/// Every call that takes [`Targets`]: [`WITH_AND_FINISH`], then [`PIECES`] (checked by
/// `all_with_is_the_with_calls_then_the_piece_calls`).
const ALL_WITH: &[Call] = &[
    Call::ForwardWith,
    Call::ForwardBackwardWith,
    Call::InPlaceWith,
    Call::ReferenceForwardWith,
    Call::ReferenceForwardBackwardWith,
    Call::FinishStates,
    Call::PieceStates,
    Call::PieceBackward,
    Call::PieceBackwardInPlace,
    Call::PieceStatesAndExps,
    Call::PieceStatesAndExpsInPlace,
    Call::PieceBackwardFromExps,
];
/// The calls that store piece exps (and refuse a soft-cap).
const STORED_EXPS: &[Call] = &[
    Call::PieceStatesAndExps,
    Call::PieceStatesAndExpsInPlace,
    Call::PieceBackwardFromExps,
];

/// The three lists of calls cannot drift apart: a call added to one list and not the others
/// fails here.
#[test]
fn all_with_is_the_with_calls_then_the_piece_calls() {
    let union: Vec<Call> = WITH_AND_FINISH.iter().chain(PIECES).copied().collect();
    assert_eq!(ALL_WITH, union.as_slice());
}

impl Call {
    fn is_piece(self) -> bool {
        PIECES.contains(&self)
    }

    fn is_reference(self) -> bool {
        matches!(
            self,
            Call::ReferenceForwardWith | Call::ReferenceForwardBackwardWith
        )
    }
}

/// Targets owned by a case.
enum OwnedTargets {
    Class(Vec<u32>),
    Soft(Vec<f32>),
}

impl OwnedTargets {
    fn get(&self) -> Targets<'_> {
        match self {
            OwnedTargets::Class(t) => Targets::U32(t),
            OwnedTargets::Soft(t) => Targets::Soft(t),
        }
    }
}

/// One rejected call of the second table: a configuration, targets, extras and a piece with
/// exactly one fault, and the calls that must report it.
struct WithCase {
    name: &'static str,
    ce: CrossEntropy<'static>,
    targets: OwnedTargets,
    /// The rows of `losses` and of the piece states.
    rows: usize,
    /// The piece of the piece calls (the whole row unless the case says otherwise).
    piece: Piece,
    /// The lengths of the `lse`, `z_loss` and `correct` extras, when given.
    lse: Option<usize>,
    z_loss: Option<usize>,
    correct: Option<usize>,
    row_scales: Option<Vec<f32>>,
    /// The piece's own and the merged states for `piece_backward_from_exps` (sentinel states,
    /// equal to each other, unless given).
    own_merged: Option<(Vec<RowState>, Vec<RowState>)>,
    entries: &'static [Call],
    want: Error,
}

impl WithCase {
    /// `rows` class targets of 0 over `ce`'s classes, the whole row as the piece, no extras.
    fn new(
        name: &'static str,
        ce: CrossEntropy<'static>,
        rows: usize,
        entries: &'static [Call],
        want: Error,
    ) -> Self {
        WithCase {
            name,
            ce,
            targets: OwnedTargets::Class(vec![0; rows]),
            rows,
            piece: Piece {
                offset: 0,
                width: ce.classes(),
            },
            lse: None,
            z_loss: None,
            correct: None,
            row_scales: None,
            own_merged: None,
            entries,
            want,
        }
    }
}

/// A state no call of these tests produces, different for each `i`: output buffers start as
/// these, so that any write shows.
fn sentinel_state(i: usize) -> RowState {
    RowState::from_words([
        i as f64 + 0.5,
        3.25,
        -7.5,
        11.0,
        0.125,
        0.375,
        0.0625,
        2.0 + 4.0 * 777.0,
    ])
}

fn sentinel_states(n: usize) -> Vec<RowState> {
    (0..n).map(sentinel_state).collect()
}

/// The bits of states, for exact comparisons.
fn state_bits(states: &[RowState]) -> Vec<[u64; 8]> {
    states
        .iter()
        .map(|s| s.to_words().map(f64::to_bits))
        .collect()
}

/// A valid-looking state of a piece with `allowed` classes and max `max`.
fn state(max: f64, allowed: f64) -> RowState {
    RowState::from_words([max, 1.5, -0.5, allowed, 0.0, 0.0, 0.0, 0.0])
}

/// Valid class weights for three classes.
const WEIGHTS: [f32; 3] = [1.0, 2.0, 3.0];

#[allow(clippy::too_many_lines)]
fn with_cases() -> Vec<WithCase> {
    let base = CrossEntropy::new(3);
    let mut cases = Vec::new();
    // Soft targets whose length is not a multiple of K: every call that takes targets.
    for actual in [1, 5, 7] {
        cases.push(WithCase {
            targets: OwnedTargets::Soft(vec![0.25; actual]),
            ..WithCase::new(
                "soft targets length",
                base,
                2,
                ALL_WITH,
                Error::TargetsLength {
                    expected_multiple_of: 3,
                    actual,
                },
            )
        });
    }
    // Extras of the wrong length: every call that takes extras. The first bad one (in the order
    // lse, z_loss, correct, row_scales) is reported.
    let extras_length = |extra, lse, z_loss, correct, row_scales: Option<usize>, actual| WithCase {
        lse,
        z_loss,
        correct,
        row_scales: row_scales.map(|n| vec![1.0; n]),
        ..WithCase::new(
            "extras length",
            base.reduction(Reduction::None),
            2,
            WITH_AND_FINISH,
            Error::ExtrasLength {
                extra,
                expected: 2,
                actual,
            },
        )
    };
    cases.extend([
        extras_length("lse", Some(3), None, None, None, 3),
        extras_length("lse", Some(0), Some(2), Some(2), Some(2), 0),
        extras_length("z_loss", Some(2), Some(1), Some(5), None, 1),
        extras_length("correct", None, None, Some(3), Some(9), 3),
        extras_length("row_scales", Some(2), Some(2), Some(2), Some(1), 1),
    ]);
    // row_scales of the wrong length are reported before the reduction is checked.
    cases.push(WithCase {
        row_scales: Some(vec![1.0; 3]),
        ..WithCase::new(
            "row scales length with a mean",
            base,
            2,
            WITH_AND_FINISH,
            Error::ExtrasLength {
                extra: "row_scales",
                expected: 2,
                actual: 3,
            },
        )
    });
    // A non-finite per-row upstream gradient (the first one is reported).
    let bad_scales = [
        (vec![1.0, f32::NAN], 1),
        (vec![f32::INFINITY, f32::NAN], 0),
        (vec![0.5, -2.0, f32::NEG_INFINITY], 2),
    ];
    for (scales, row) in bad_scales {
        let rows = scales.len();
        let value = scales[row];
        cases.push(WithCase {
            row_scales: Some(scales),
            ..WithCase::new(
                "invalid row scale",
                base.reduction(Reduction::None),
                rows,
                WITH_AND_FINISH,
                Error::InvalidRowScale { row, value },
            )
        });
    }
    // Pieces that do not fit in the row: the piece calls (finish_states has no piece).
    let bad_pieces = [
        (2, 3),
        (0, 5),
        (4, 1),
        (5, 0),
        (usize::MAX, 2),
        (1, usize::MAX),
    ];
    for (offset, width) in bad_pieces {
        cases.push(WithCase {
            piece: Piece { offset, width },
            ..WithCase::new(
                "piece out of range",
                CrossEntropy::new(4),
                2,
                PIECES,
                Error::PieceOutOfRange {
                    offset,
                    width,
                    classes: 4,
                },
            )
        });
    }
    // A piece's own state that cannot be part of the merged one: more allowed classes, a greater
    // max, or invalid (NaN) against a valid merge.
    let invalid = RowState::from_words([0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]);
    let mismatches = [
        (
            vec![RowState::EMPTY, state(1.0, 3.0)],
            vec![RowState::EMPTY, RowState::EMPTY],
            1,
        ),
        (vec![state(5.0, 2.0)], vec![state(4.0, 3.0)], 0),
        (
            vec![state(1.0, 1.0), invalid],
            vec![state(1.0, 3.0), state(1.0, 3.0)],
            1,
        ),
    ];
    for (own, merged, row) in mismatches {
        let rows = own.len();
        cases.push(WithCase {
            own_merged: Some((own, merged)),
            ..WithCase::new(
                "state mismatch",
                base,
                rows,
                &[Call::PieceBackwardFromExps],
                Error::StateMismatch { row },
            )
        });
    }
    // Own states of another length than the merged ones.
    cases.push(WithCase {
        own_merged: Some((vec![RowState::EMPTY; 3], vec![RowState::EMPTY; 2])),
        ..WithCase::new(
            "own states length",
            base,
            2,
            &[Call::PieceBackwardFromExps],
            Error::LossesLength {
                expected: 2,
                actual: 3,
            },
        )
    });
    // The combinations these calls refuse.
    let soft = [
        (base.ignore_index(1), "an ignore index with soft targets"),
        (
            base.smoothing(Smoothing::OffTarget(0.1)),
            "off-target smoothing with soft targets",
        ),
        (
            base.class_weights(&WEIGHTS),
            "class weights with soft targets",
        ),
        (
            base.target_weights(&WEIGHTS),
            "class weights with soft targets",
        ),
    ];
    for (ce, what) in soft {
        cases.push(WithCase {
            targets: OwnedTargets::Soft(vec![0.0, 1.0, 0.0, 0.5, 0.5, 0.0]),
            ..WithCase::new(
                "unsupported with soft targets",
                ce,
                2,
                ALL_WITH,
                Error::Unsupported { what },
            )
        });
    }
    cases.push(WithCase {
        row_scales: Some(vec![1.0, 2.0]),
        ..WithCase::new(
            "row scales with a mean",
            base,
            2,
            WITH_AND_FINISH,
            Error::Unsupported {
                what: "per-row upstream gradients with a reduction other than None",
            },
        )
    });
    cases.push(WithCase::new(
        "soft-cap with stored exps",
        base.softcap(30.0),
        2,
        STORED_EXPS,
        Error::Unsupported {
            what: "a soft-cap with stored piece exps (use piece_states and piece_backward)",
        },
    ));
    cases.push(WithCase {
        targets: OwnedTargets::Soft(vec![0.0, 1.0, 0.0, 0.5, 0.5, 0.0]),
        correct: Some(2),
        ..WithCase::new(
            "soft-target correctness from states",
            base,
            2,
            &[Call::FinishStates],
            Error::Unsupported {
                what: "per-row correctness of soft targets from piece states",
            },
        )
    });
    cases
}

/// Runs one rejected call of the second table through `entry` and checks the error and that no
/// buffer the call could write was written.
#[allow(clippy::too_many_lines)]
fn reject_with(case: &WithCase, ce: &CrossEntropy<'_>, entry: Call) {
    let ctx = format!("{} ({ce:?}, {entry:?})", case.name);
    let width = if entry.is_piece() {
        case.piece.width
    } else {
        ce.classes()
    };
    // Out-of-range pieces may be wider than anything allocatable: their calls fail before any
    // length is looked at, so any buffer does.
    let n = case
        .rows
        .checked_mul(width)
        .filter(|&n| n <= 1 << 16)
        .unwrap_or(4);
    let logits = sentinels(n, 1);
    let mut in_place = logits.clone();
    let mut grad = sentinels(n, 3);
    let mut losses = sentinels(case.rows, 2);
    let mut lse = case.lse.map(|len| sentinels(len, 4));
    let mut z_loss = case.z_loss.map(|len| sentinels(len, 5));
    let mut correct: Option<Vec<bool>> = case
        .correct
        .map(|len| (0..len).map(|i| i % 3 == 1).collect());
    let mut states = sentinel_states(case.rows);
    let (own, merged) = case
        .own_merged
        .clone()
        .unwrap_or_else(|| (sentinel_states(case.rows), sentinel_states(case.rows)));
    let before = (
        bits(&logits),
        bits(&grad),
        bits(&losses),
        lse.as_deref().map(bits),
        z_loss.as_deref().map(bits),
        correct.clone(),
        state_bits(&states),
    );
    let targets = case.targets.get();
    let piece = case.piece;
    let extras = Extras {
        lse: lse.as_deref_mut(),
        z_loss: z_loss.as_deref_mut(),
        correct: correct.as_deref_mut(),
        row_scales: case.row_scales.as_deref(),
    };
    let summary = |s: smoothce::Summary| format!("{s:?}");
    let unit = |()| "()".to_string();
    let result = match entry {
        Call::ForwardWith => ce
            .forward_with(&logits, targets, &mut losses, extras)
            .map(summary),
        Call::ForwardBackwardWith => ce
            .forward_backward_with(&logits, targets, &mut losses, &mut grad, extras)
            .map(summary),
        Call::InPlaceWith => ce
            .forward_backward_in_place_with(&mut in_place, targets, &mut losses, extras)
            .map(summary),
        Call::ReferenceForwardWith => {
            reference::forward_with(ce, &logits, targets, &mut losses, extras).map(summary)
        }
        Call::ReferenceForwardBackwardWith => {
            reference::forward_backward_with(ce, &logits, targets, &mut losses, &mut grad, extras)
                .map(summary)
        }
        Call::FinishStates => ce
            .finish_states(&merged, targets, &mut losses, extras)
            .map(summary),
        Call::PieceStates => ce
            .piece_states(&logits, piece, targets, &mut states)
            .map(unit),
        Call::PieceBackward => ce
            .piece_backward(&logits, piece, targets, &merged, &mut grad)
            .map(unit),
        Call::PieceBackwardInPlace => ce
            .piece_backward_in_place(&mut in_place, piece, targets, &merged)
            .map(unit),
        Call::PieceStatesAndExps => ce
            .piece_states_and_exps(&logits, piece, targets, &mut states, &mut grad)
            .map(unit),
        Call::PieceStatesAndExpsInPlace => ce
            .piece_states_and_exps_in_place(&mut in_place, piece, targets, &mut states)
            .map(unit),
        Call::PieceBackwardFromExps => ce
            .piece_backward_from_exps(&mut in_place, piece, targets, &own, &merged)
            .map(unit),
    };
    expect_error(&ctx, result, &case.want);
    let after = (
        bits(&in_place),
        bits(&grad),
        bits(&losses),
        lse.as_deref().map(bits),
        z_loss.as_deref().map(bits),
        correct,
        state_bits(&states),
    );
    assert_eq!(after.0, before.0, "{ctx}: logits written");
    assert_eq!(after.1, before.1, "{ctx}: grad (or exps) written");
    assert_eq!(after.2, before.2, "{ctx}: losses written");
    assert_eq!(after.3, before.3, "{ctx}: extras.lse written");
    assert_eq!(after.4, before.4, "{ctx}: extras.z_loss written");
    assert_eq!(after.5, before.5, "{ctx}: extras.correct written");
    assert_eq!(after.6, before.6, "{ctx}: states written");
}

/// The second table: every case, through each call it applies to, on every available backend
/// (the reference once).
#[test]
fn every_error_of_the_with_and_piece_calls_is_reported_exactly_and_nothing_is_written() {
    let cases = with_cases();
    assert!(cases.len() > 25);
    for case in &cases {
        assert!(!case.entries.is_empty(), "{}", case.name);
        for (b, backend) in backends().into_iter().enumerate() {
            let ce = case.ce.backend(backend);
            for &entry in case.entries {
                if b == 0 || !entry.is_reference() {
                    reject_with(case, &ce, entry);
                }
            }
        }
    }
}

/// Every variant of `Error` has rows in the tables above (`BackendUnavailable` only where this
/// machine lacks a backend: see `unavailable_backends_are_reported`).
#[test]
fn every_variant_is_in_a_table() {
    let name = |e: &Error| {
        let debug = format!("{e:?}");
        debug
            .split([' ', '{', '('])
            .next()
            .unwrap_or_default()
            .to_string()
    };
    let covered: std::collections::BTreeSet<String> = cases()
        .iter()
        .map(|c| name(&c.want))
        .chain(with_cases().iter().map(|c| name(&c.want)))
        .collect();
    let all = [
        "ZeroClasses",
        "OffTargetNeedsTwoClasses",
        "InvalidSmoothing",
        "LogitsLength",
        "LossesLength",
        "GradLength",
        "TargetOutOfRange",
        "SizeOverflow",
        "TargetsLength",
        "WeightsLength",
        "InvalidWeight",
        "InvalidOption",
        "MaskLength",
        "MaskAllowsNoClass",
        "ExtrasLength",
        "InvalidRowScale",
        "PieceOutOfRange",
        "StateMismatch",
        "Unsupported",
    ];
    for variant in all {
        assert!(covered.contains(variant), "no table row for {variant}");
    }
    assert_eq!(covered.len(), all.len(), "{covered:?}");
}

/// Each variant's `Display` names the offending numbers.
#[test]
fn display_names_the_values() {
    let shown = [
        (Error::OffTargetNeedsTwoClasses { classes: 1 }, "1"),
        (Error::InvalidSmoothing { eps: 1.5 }, "1.5"),
        (
            Error::LogitsLength {
                expected: 6,
                actual: 5,
            },
            "5",
        ),
        (
            Error::LossesLength {
                expected: 42,
                actual: 3,
            },
            "42",
        ),
        (
            Error::GradLength {
                expected: 6,
                actual: 77,
            },
            "77",
        ),
        (
            Error::TargetOutOfRange {
                row: 12,
                target: 99,
                classes: 3,
            },
            "99",
        ),
        (
            Error::SizeOverflow {
                rows: 3,
                classes: 1234,
            },
            "1234",
        ),
        (
            Error::BackendUnavailable {
                backend: Backend::Avx512,
            },
            "Avx512",
        ),
        (Error::StateMismatch { row: 31 }, "31"),
        (
            Error::TargetsLength {
                expected_multiple_of: 3,
                actual: 17,
            },
            "17",
        ),
        (
            Error::ExtrasLength {
                extra: "row_scales",
                expected: 4,
                actual: 9,
            },
            "row_scales",
        ),
        (
            Error::InvalidRowScale {
                row: 5,
                value: f32::INFINITY,
            },
            "inf",
        ),
        (
            Error::PieceOutOfRange {
                offset: 123,
                width: 45,
                classes: 100,
            },
            "123",
        ),
    ];
    for (err, needle) in shown {
        let text = err.to_string();
        assert!(text.contains(needle), "{err:?} displays as {text:?}");
    }
    assert!(!Error::ZeroClasses.to_string().is_empty());
}

/// Arguments at the edge of the valid range are accepted: `eps` of exactly 0, -0 and 1,
/// off-target smoothing with two classes, an ignore index that is not a class, an empty batch.
#[test]
fn edge_arguments_are_accepted() {
    let logits = [0.5_f32, -1.0, 2.0, 0.0, 0.0, 0.0];
    let accepted = [
        CrossEntropy::new(3).smoothing(Smoothing::Uniform(0.0)),
        CrossEntropy::new(3).smoothing(Smoothing::Uniform(-0.0)),
        CrossEntropy::new(3).smoothing(Smoothing::Uniform(1.0)),
        CrossEntropy::new(3).smoothing(Smoothing::OffTarget(1.0)),
        CrossEntropy::new(3).ignore_index(u32::MAX),
    ];
    for ce in accepted {
        for backend in backends() {
            for entry in Entry::ALL {
                let out = common::try_run(&ce.backend(backend), entry, &logits, &[2, 0]);
                assert!(out.is_ok(), "{ce:?} {entry:?}: {out:?}");
            }
        }
    }
    // Two classes are enough for off-target smoothing.
    let ce = CrossEntropy::new(2).smoothing(Smoothing::OffTarget(0.5));
    assert!(common::try_run(&ce, Entry::ForwardBackward, &logits[..4], &[1, 0]).is_ok());
    // The ignore index is accepted as a target even when it is not a class.
    let ce = CrossEntropy::new(3).ignore_index(3);
    let out = common::try_run(&ce, Entry::ForwardBackward, &logits, &[3, 1]).unwrap();
    assert_eq!(out.losses[0], 0.0);
    // An empty batch: nothing to do, every reduction returns 0.
    for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
        for entry in Entry::ALL {
            let out = common::try_run(&CrossEntropy::new(5).reduction(reduction), entry, &[], &[]);
            assert_eq!(
                out.map(|o| o.total.to_bits()),
                Ok(0),
                "{reduction:?} {entry:?}"
            );
        }
    }
}

/// `BackendUnavailable` for every backend this machine lacks (with nothing written); the others
/// run. `Portable` and `Auto` are always available.
#[test]
fn unavailable_backends_are_reported() {
    assert!(Backend::Portable.is_available() && Backend::Auto.is_available());
    let auto = Backend::Auto.resolve().expect("Auto resolves");
    assert_ne!(auto, Backend::Auto);
    assert!(auto.is_available());
    let logits = [1.0_f32, 2.0, 3.0, 4.0];
    for backend in Backend::ALL {
        let ce = CrossEntropy::new(2).backend(backend);
        assert_eq!(ce.backend_config(), backend);
        if backend.is_available() {
            assert!(backend.resolve().is_some(), "{backend:?}");
            if backend != Backend::Auto {
                assert_eq!(backend.resolve(), Some(backend));
            }
            for entry in Entry::ALL {
                assert!(
                    common::try_run(&ce, entry, &logits, &[0, 1]).is_ok(),
                    "{backend:?}"
                );
            }
        } else {
            assert_eq!(backend.resolve(), None);
            let case = Case::new(
                "backend unavailable",
                ce,
                2,
                Error::BackendUnavailable { backend },
            );
            for entry in Entry::ALL {
                reject(&case, &ce, entry);
            }
            let case = WithCase::new(
                "backend unavailable",
                ce,
                2,
                ALL_WITH,
                Error::BackendUnavailable { backend },
            );
            for &entry in ALL_WITH.iter().filter(|e| !e.is_reference()) {
                reject_with(&case, &ce, entry);
            }
        }
    }
}
