//! A small, fixed-input smoke test of every entry point (the vocabulary-piece API included, in
//! both its forms), sized to run under Miri.
//!
//! `.ci/run` runs this file alone with `cargo +nightly miri test --test miri_smoke`, once plainly
//! (the portable backend on SSE2) and once with `-C target-cpu=x86-64-v4` (the AVX2 backend, and
//! the portable backend on AVX). Miri checks the unsafe intrinsics code, the
//! `as_chunks` splitting and every slice access for undefined behaviour; the comparisons with
//! `smoothce::reference` make sure the interpreted code still computes the right thing.
//!
//! Under Miri only the backends that need no run-time CPU detection are exercised: detection uses
//! `cpuid`, inline assembly that Miri cannot interpret, and Miri does not implement AVX-512. When
//! AVX2, FMA and AVX-512F are all compiled in (x86-64-v4) the crate skips detection altogether, so
//! `Backend::Avx2` runs.
//! Outside Miri (a plain `cargo test`) every backend this CPU has is checked.

use smoothce::reference::{self, GRAD_TOLERANCE, LOSS_TOLERANCE};
use smoothce::{
    Backend, CrossEntropy, Error, Extras, Piece, Reduction, RowState, Smoothing, Targets,
};

/// The backends to check in this build.
fn backends() -> Vec<Backend> {
    if cfg!(miri) {
        let mut backends = vec![Backend::Portable];
        if cfg!(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma",
            target_feature = "avx512f"
        )) {
            backends.push(Backend::Avx2);
        }
        backends
    } else {
        Backend::ALL
            .into_iter()
            .filter(|b| b.is_available())
            .collect()
    }
}

/// A fixed pseudo-random row-major batch in `[-6, 6)`.
fn logits(rows: usize, k: usize) -> Vec<f32> {
    (0..rows * k)
        .map(|i| ((i * 7919 + 13) % 97) as f32 / 8.0 - 6.0)
        .collect()
}

/// Bit-identical, or both NaN (Miri, like real hardware, may produce NaNs of either sign).
fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

/// Kernel and reference agree on a batch's losses and gradient.
#[track_caller]
fn assert_agree(what: &str, got: (f32, &[f32], &[f32]), want: (f32, &[f32], &[f32]), scale: f64) {
    let tolerance = |t: f64| 2.0 * t;
    assert!(
        reference::agrees(got.0, f64::from(want.0), tolerance(LOSS_TOLERANCE)),
        "{what}: loss {} vs reference {}",
        got.0,
        want.0
    );
    for (row, (&g, &w)) in got.1.iter().zip(want.1).enumerate() {
        assert!(
            reference::agrees(g, f64::from(w), tolerance(LOSS_TOLERANCE)),
            "{what}: row {row} loss {g} vs reference {w}"
        );
    }
    assert_eq!(got.2.len(), want.2.len(), "{what}: gradient length");
    for (i, (&g, &w)) in got.2.iter().zip(want.2).enumerate() {
        assert!(
            reference::agrees(g, f64::from(w), tolerance(GRAD_TOLERANCE) * scale),
            "{what}: grad[{i}] {g} vs reference {w}"
        );
    }
}

/// The plain entry points on one configuration against the reference.
fn check_plain(what: &str, ce: &CrossEntropy<'_>, z: &[f32], targets: &[u32], scale: f64) {
    let rows = targets.len();
    let mut want_losses = vec![0.0; rows];
    let mut want_grad = vec![0.0; z.len()];
    let want = reference::forward_backward(ce, z, targets, &mut want_losses, &mut want_grad)
        .expect("reference::forward_backward");
    let mut forward_losses = vec![0.0; rows];
    let want_forward =
        reference::forward(ce, z, targets, &mut forward_losses).expect("reference::forward");
    assert!(same(want, want_forward), "{what}: reference");

    let mut losses = vec![0.0; rows];
    let got = ce.forward(z, targets, &mut losses).expect("forward");
    assert_agree(
        &format!("{what} forward"),
        (got, &losses, &[]),
        (want, &want_losses, &[]),
        scale,
    );

    let mut grad = vec![0.0; z.len()];
    let got = ce
        .forward_backward(z, targets, &mut losses, &mut grad)
        .expect("forward_backward");
    assert_agree(
        &format!("{what} forward_backward"),
        (got, &losses, &grad),
        (want, &want_losses, &want_grad),
        scale,
    );

    let mut in_place = z.to_vec();
    let got_in_place = ce
        .forward_backward_in_place(&mut in_place, targets, &mut losses)
        .expect("forward_backward_in_place");
    assert!(same(got, got_in_place), "{what}: in place");
    for (i, (&a, &b)) in in_place.iter().zip(&grad).enumerate() {
        assert!(same(a, b), "{what}: in-place grad[{i}] {a} vs {b}");
    }
}

#[test]
fn plain_entry_points_agree_with_the_reference() {
    // K = 3: tail only; 37: one block of four vectors, a remainder vector and a tail (AVX-512
    // would be two whole vectors and a tail); 64: whole vectors only.
    for k in [3_usize, 37, 64] {
        let rows = 3;
        let z = logits(rows, k);
        let targets: Vec<u32> = (0..rows as u32).map(|r| (r * 5 + 1) % k as u32).collect();
        for backend in backends() {
            for (smoothing, reduction, scale) in [
                (Smoothing::Uniform(0.0), Reduction::Mean, 1.0 / rows as f64),
                (Smoothing::Uniform(0.1), Reduction::Sum, 1.0),
                (Smoothing::OffTarget(0.2), Reduction::None, 1.0),
            ] {
                let ce = CrossEntropy::new(k)
                    .smoothing(smoothing)
                    .reduction(reduction)
                    .backend(backend);
                let what = format!("K={k} {backend:?} {smoothing:?} {reduction:?}");
                check_plain(&what, &ce, &z, &targets, scale);
            }
        }
    }
}

#[test]
fn special_rows_agree_with_the_reference() {
    let k = 11;
    let mut z = logits(4, k);
    z[2] = f32::NEG_INFINITY; // row 0: a masked class (the careful variant)
    z[k + 4] = f32::NAN; // row 1: NaN
    z[2 * k] = 1.0e30; // row 2: a range too wide for the fast variant
    let targets = [0_u32, 3, 5, u32::MAX]; // row 3: ignored
    for backend in backends() {
        let ce = CrossEntropy::new(k)
            .smoothing(Smoothing::Uniform(0.1))
            .reduction(Reduction::None)
            .ignore_index(u32::MAX)
            .backend(backend);
        check_plain(&format!("special rows {backend:?}"), &ce, &z, &targets, 1.0);
    }
}

/// The `_with` entry points, with every extra, on one configuration against the reference.
fn check_with(what: &str, ce: &CrossEntropy<'_>, z: &[f32], targets: Targets<'_>, rows: usize) {
    let k = ce.classes();
    let row_scales = [1.0_f32, 0.5, 2.0];
    let scales = (ce.reduction_config() == Reduction::None).then_some(&row_scales[..rows]);
    let run = |kernel: bool, in_place: bool| {
        let mut losses = vec![0.0_f32; rows];
        let mut lse = vec![0.0_f32; rows];
        let mut z_loss = vec![0.0_f32; rows];
        let mut correct = vec![false; rows];
        let mut grad = vec![0.0_f32; rows * k];
        let extras = Extras {
            lse: Some(&mut lse),
            z_loss: Some(&mut z_loss),
            correct: Some(&mut correct),
            row_scales: scales,
        };
        let summary = match (kernel, in_place) {
            (true, false) => ce.forward_backward_with(z, targets, &mut losses, &mut grad, extras),
            (true, true) => {
                grad.copy_from_slice(z);
                ce.forward_backward_in_place_with(&mut grad, targets, &mut losses, extras)
            }
            (false, _) => {
                reference::forward_backward_with(ce, z, targets, &mut losses, &mut grad, extras)
            }
        }
        .expect("forward_backward_with");
        (summary, losses, grad, lse, z_loss, correct)
    };
    let want = run(false, false);
    for in_place in [false, true] {
        let got = run(true, in_place);
        let what = format!("{what} in_place={in_place}");
        // The options widen the documented tolerance by a few ulp; this is a smoke test.
        assert_agree(
            &what,
            (got.0.loss, &got.1, &got.2),
            (want.0.loss, &want.1, &want.2),
            4.0,
        );
        assert_agree(
            &format!("{what} lse and z-loss"),
            (got.0.z_loss, &got.3, &got.4),
            (want.0.z_loss, &want.3, &want.4),
            1.0,
        );
        assert_eq!(got.5, want.5, "{what}: correct");
        assert_eq!(got.0.correct, want.0.correct, "{what}: summary.correct");
        assert_eq!(got.0.rows, want.0.rows, "{what}: summary.rows");
    }
    let mut losses = vec![0.0_f32; rows];
    let mut want_losses = vec![0.0_f32; rows];
    let got = ce
        .forward_with(z, targets, &mut losses, Extras::default())
        .expect("forward_with");
    let want = reference::forward_with(ce, z, targets, &mut want_losses, Extras::default())
        .expect("reference::forward_with");
    assert_agree(
        &format!("{what} forward_with"),
        (got.loss, &losses, &[]),
        (want.loss, &want_losses, &[]),
        1.0,
    );
}

const WITH_ROWS: usize = 3;
const WITH_K: usize = 19;

fn class_weights() -> Vec<f32> {
    (0..WITH_K).map(|c| 0.5 + (c % 4) as f32 * 0.25).collect()
}

fn class_mask() -> Vec<bool> {
    (0..WITH_K).map(|c| c != 7).collect()
}

#[test]
fn with_entry_points_agree_with_the_reference() {
    let z = logits(WITH_ROWS, WITH_K);
    let weights = class_weights();
    let mask = class_mask();
    let hard: [i64; WITH_ROWS] = [4, -100, 18];
    let soft: Vec<f32> = (0..WITH_ROWS * WITH_K)
        .map(|i| f32::from(u8::from(i % WITH_K == (i / WITH_K) * 3)))
        .collect();
    for backend in backends() {
        let base = CrossEntropy::new(WITH_K).backend(backend);
        let configs: [(&str, CrossEntropy<'_>, Targets<'_>); 5] = [
            (
                "weights, z-loss, scale, i64 targets",
                base.smoothing(Smoothing::Uniform(0.1))
                    .ignore_index_signed(-100)
                    .class_weights(&weights)
                    .z_loss(1e-3)
                    .logit_scale(0.75)
                    .reduction(Reduction::None),
                Targets::I64(&hard),
            ),
            (
                "class mask, z-loss, scale, i64 targets",
                base.smoothing(Smoothing::Uniform(0.1))
                    .ignore_index_signed(-100)
                    .class_mask(&mask)
                    .z_loss(1e-3)
                    .logit_scale(0.75)
                    .reduction(Reduction::Sum),
                Targets::I64(&hard),
            ),
            (
                "target weights, upstream, mean denominator, u16 targets",
                base.smoothing(Smoothing::OffTarget(0.2))
                    .target_weights(&weights)
                    .upstream(0.5)
                    .mean_denominator(5.0),
                Targets::U16(&[1, 9, 17]),
            ),
            (
                "soft-cap, u8 targets",
                base.softcap(4.0).reduction(Reduction::Sum),
                Targets::U8(&[1, 2, 3]),
            ),
            (
                "soft targets",
                base.smoothing(Smoothing::Uniform(0.05)),
                Targets::Soft(&soft),
            ),
        ];
        for (name, ce, targets) in configs {
            check_with(&format!("{name} {backend:?}"), &ce, &z, targets, WITH_ROWS);
        }
    }
}

/// Found by this test at commit 90d886c (class weights, a class mask and smoothing together gave
/// a loss of `+inf` on every backend where the reference is finite); passes since.
#[test]
fn weights_with_mask_and_smoothing() {
    let z = logits(WITH_ROWS, WITH_K);
    let weights = class_weights();
    let mask = class_mask();
    for backend in backends() {
        let ce = CrossEntropy::new(WITH_K)
            .backend(backend)
            .smoothing(Smoothing::Uniform(0.1))
            .class_weights(&weights)
            .class_mask(&mask)
            .reduction(Reduction::None);
        check_with(
            &format!("weights + mask + smoothing {backend:?}"),
            &ce,
            &z,
            Targets::U32(&[4, 11, 18]),
            WITH_ROWS,
        );
    }
}

/// Piece `p` of a row-major `[rows, k]` batch.
fn cut(batch: &[f32], k: usize, p: Piece) -> Vec<f32> {
    batch
        .chunks(k)
        .flat_map(|row| row[p.offset..p.offset + p.width].iter().copied())
        .collect()
}

/// Rows and classes of the piece cases: K = 37 in three uneven pieces (a tail only, two whole
/// AVX2 vectors, and a vector plus a tail), one target in each piece.
const PIECE_ROWS: usize = 3;
const PIECE_K: usize = 37;
const PIECES: [Piece; 3] = [
    Piece {
        offset: 0,
        width: 5,
    },
    Piece {
        offset: 5,
        width: 16,
    },
    Piece {
        offset: 21,
        width: 16,
    },
];
const PIECE_TARGETS: [u32; PIECE_ROWS] = [2, 20, 36];

/// The configurations of the piece cases, with the gradient scale of their reduction.
fn piece_configs(backend: Backend) -> [(String, CrossEntropy<'static>, f64); 2] {
    [
        (
            Smoothing::Uniform(0.1),
            Reduction::Mean,
            1.0 / PIECE_ROWS as f64,
        ),
        (Smoothing::OffTarget(0.2), Reduction::None, 1.0),
    ]
    .map(|(smoothing, reduction, scale)| {
        let ce = CrossEntropy::new(PIECE_K)
            .smoothing(smoothing)
            .reduction(reduction)
            .backend(backend);
        let what = format!("pieces {backend:?} {smoothing:?} {reduction:?}");
        (what, ce, scale)
    })
}

/// The unsplit kernel's loss, row losses and gradient.
fn unsplit(ce: &CrossEntropy<'_>, z: &[f32]) -> (f32, Vec<f32>, Vec<f32>) {
    let mut losses = vec![0.0_f32; PIECE_ROWS];
    let mut grad = vec![0.0_f32; z.len()];
    let loss = ce
        .forward_backward(z, &PIECE_TARGETS, &mut losses, &mut grad)
        .expect("forward_backward");
    (loss, losses, grad)
}

/// Each row's merge of its pieces' states (`per_piece[piece][row]`), starting from piece `row`,
/// the first pair through the words.
fn merge_rows(per_piece: &[Vec<RowState>]) -> Vec<RowState> {
    (0..PIECE_ROWS)
        .map(|r| {
            let [a, b, c] = [0, 1, 2].map(|i| per_piece[(i + r) % 3][r]);
            let sent = a.merge(b).to_words();
            assert_eq!(
                RowState::from_words(sent).to_words().map(f64::to_bits),
                sent.map(f64::to_bits)
            );
            c.merge(RowState::from_words(sent))
        })
        .collect()
}

#[test]
fn pieces_agree_with_the_unsplit_call() {
    let (rows, k, targets) = (PIECE_ROWS, PIECE_K, PIECE_TARGETS);
    let z = logits(rows, k);
    for backend in backends() {
        for (what, ce, scale) in piece_configs(backend) {
            let (want, want_losses, want_grad) = unsplit(&ce, &z);

            let per_piece: Vec<Vec<RowState>> = PIECES
                .iter()
                .map(|&p| {
                    let mut states = vec![RowState::EMPTY; rows];
                    ce.piece_states(&cut(&z, k, p), p, &targets, &mut states)
                        .expect("piece_states");
                    states
                })
                .collect();
            let merged = merge_rows(&per_piece);
            let mut losses = vec![0.0_f32; rows];
            let split = ce
                .finish_states(&merged, &targets, &mut losses, Extras::default())
                .expect("finish_states");
            assert_agree(
                &format!("{what} finish_states"),
                (split.loss, &losses, &[]),
                (want, &want_losses, &[]),
                scale,
            );

            for p in PIECES {
                let piece_z = cut(&z, k, p);
                let mut grad = vec![0.0_f32; piece_z.len()];
                ce.piece_backward(&piece_z, p, &targets, &merged, &mut grad)
                    .expect("piece_backward");
                assert_agree(
                    &format!("{what} piece_backward {p:?}"),
                    (split.loss, &losses, &grad),
                    (want, &want_losses, &cut(&want_grad, k, p)),
                    scale,
                );
                let mut in_place = piece_z;
                ce.piece_backward_in_place(&mut in_place, p, &targets, &merged)
                    .expect("piece_backward_in_place");
                for (i, (&a, &b)) in in_place.iter().zip(&grad).enumerate() {
                    assert!(same(a, b), "{what} {p:?}: in-place grad[{i}] {a} vs {b}");
                }
            }
        }
    }
}

/// The one-exp form of the same split: each piece's own states with its exps kept, out of place
/// and over its logits (the same exps and states, bit for bit), the own states merged and
/// finished, then each piece's exps (both copies) rescaled into its gradient, against the unsplit
/// call. A merged state that lacks the piece is refused without writing.
#[test]
fn one_exp_pieces_agree_with_the_unsplit_call() {
    let (rows, k, targets) = (PIECE_ROWS, PIECE_K, PIECE_TARGETS);
    let z = logits(rows, k);
    for backend in backends() {
        for (what, ce, scale) in piece_configs(backend) {
            let (want, want_losses, want_grad) = unsplit(&ce, &z);

            let mut own = Vec::new();
            let mut exps = Vec::new();
            let mut over_logits = Vec::new();
            for p in PIECES {
                let piece_z = cut(&z, k, p);
                let mut states = vec![RowState::EMPTY; rows];
                let mut e = vec![0.0_f32; piece_z.len()];
                ce.piece_states_and_exps(&piece_z, p, &targets, &mut states, &mut e)
                    .expect("piece_states_and_exps");
                let mut o = piece_z;
                let mut states_in_place = vec![RowState::EMPTY; rows];
                ce.piece_states_and_exps_in_place(&mut o, p, &targets, &mut states_in_place)
                    .expect("piece_states_and_exps_in_place");
                for (r, (a, b)) in states.iter().zip(&states_in_place).enumerate() {
                    assert_eq!(
                        a.to_words().map(f64::to_bits),
                        b.to_words().map(f64::to_bits),
                        "{what} {p:?}: row {r} state in place"
                    );
                }
                for (i, (&a, &b)) in e.iter().zip(&o).enumerate() {
                    assert!(same(a, b), "{what} {p:?}: in-place exps[{i}] {a} vs {b}");
                }
                own.push(states);
                exps.push(e);
                over_logits.push(o);
            }
            let merged = merge_rows(&own);
            let mut losses = vec![0.0_f32; rows];
            let split = ce
                .finish_states(&merged, &targets, &mut losses, Extras::default())
                .expect("finish_states");
            assert_agree(
                &format!("{what} one-exp finish_states"),
                (split.loss, &losses, &[]),
                (want, &want_losses, &[]),
                scale,
            );

            let foreign = [RowState::EMPTY; PIECE_ROWS];
            for (i, p) in PIECES.into_iter().enumerate() {
                let (e, o) = (&mut exps[i], &mut over_logits[i]);
                let before = e.clone();
                assert_eq!(
                    ce.piece_backward_from_exps(e, p, &targets, &own[i], &foreign),
                    Err(Error::StateMismatch { row: 0 }),
                    "{what} {p:?}: a merged state without the piece"
                );
                assert!(e.iter().zip(&before).all(|(&a, &b)| same(a, b)));
                ce.piece_backward_from_exps(e, p, &targets, &own[i], &merged)
                    .expect("piece_backward_from_exps");
                assert_agree(
                    &format!("{what} piece_backward_from_exps {p:?}"),
                    (split.loss, &losses, e),
                    (want, &want_losses, &cut(&want_grad, k, p)),
                    scale,
                );
                ce.piece_backward_from_exps(o, p, &targets, &own[i], &merged)
                    .expect("piece_backward_from_exps (exps stored in place)");
                for (j, (&a, &b)) in o.iter().zip(e.iter()).enumerate() {
                    assert!(same(a, b), "{what} {p:?}: in-place grad[{j}] {a} vs {b}");
                }
            }
        }
    }
}

/// With a soft-cap the one-exp calls refuse, before writing anything.
#[test]
fn one_exp_pieces_refuse_a_softcap() {
    let (rows, k, targets) = (PIECE_ROWS, PIECE_K, PIECE_TARGETS);
    let z = logits(rows, k);
    let p = PIECES[0];
    for backend in backends() {
        let ce = CrossEntropy::new(k).softcap(10.0).backend(backend);
        let mut buf = cut(&z, k, p);
        let mut states = vec![RowState::EMPTY; rows];
        let mut e = vec![0.0_f32; buf.len()];
        let refused = |r: Result<(), Error>| matches!(r, Err(Error::Unsupported { .. }));
        assert!(refused(ce.piece_states_and_exps(
            &buf,
            p,
            &targets,
            &mut states,
            &mut e
        )));
        assert!(refused(ce.piece_states_and_exps_in_place(
            &mut buf,
            p,
            &targets,
            &mut states
        )));
        assert!(refused(ce.piece_backward_from_exps(
            &mut e, p, &targets, &states, &states
        )));
        assert!(
            e.iter().all(|&x| x.to_bits() == 0),
            "{backend:?}: exps written"
        );
        assert_eq!(buf, cut(&z, k, p), "{backend:?}: logits written");
        assert_eq!(
            states,
            vec![RowState::EMPTY; rows],
            "{backend:?}: states written"
        );
    }
}

#[test]
fn reference_row_and_helpers() {
    let z = logits(1, 9);
    let mut grad = [0.0_f64; 9];
    let loss = reference::row(&z, 4, Smoothing::OffTarget(0.3), Some(&mut grad)).expect("row");
    assert!(loss.is_finite() && grad.iter().sum::<f64>().abs() < 1e-12);
    let (on, per) = Smoothing::Uniform(0.1).coefficients(9, true);
    assert!((on + 9.0 * per - 1.0).abs() < 1e-12);
    assert_eq!(Targets::U16(&[1, 2]).rows(9), Some(2));
    assert_eq!(Backend::Portable.resolve(), Some(Backend::Portable));
}
