//! Every `Error` the API can return, from a table: the exact error value from each entry point
//! (and from the reference, which documents the same checks), a non-empty `Display`, and nothing
//! written: `losses`, `grad` and the in-place `logits` keep their sentinel contents bit for bit.
//! Also the edge arguments that must be accepted, and `BackendUnavailable` for whichever backends
//! this machine lacks.

mod common;

use common::{backends, bits, Entry};
use smoothce::{reference, Backend, CrossEntropy, Error, Reduction, Smoothing};

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
    let err = match result {
        Ok(v) => panic!("{ctx}: accepted, returned {v}"),
        Err(e) => e,
    };
    assert!(
        same(&err, &case.want),
        "{ctx}: got {err:?}, expected {:?}",
        case.want
    );
    assert!(!err.to_string().is_empty(), "{ctx}: empty Display");
    assert!(!format!("{err:?}").is_empty(), "{ctx}: empty Debug");
    let as_std: &dyn std::error::Error = &err;
    assert!(as_std.source().is_none(), "{ctx}: unexpected source");
    assert_eq!(bits(&losses), losses_before, "{ctx}: losses written");
    assert_eq!(bits(&grad), grad_before, "{ctx}: grad written");
    assert_eq!(bits(&in_place), logits_before, "{ctx}: logits written");
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
        }
    }
}
