//! Panic-freedom check for `smoothce` on the host (x86_64 with the AVX2 and AVX-512 backends).
//!
//! Each public compute function is called from a `#[no_panic]` wrapper that passes the caller's
//! arguments straight through. `no_panic` makes the build fail at link time (an undefined symbol
//! naming the wrapper) unless the optimiser proved that the wrapped call cannot panic or unwind.
//! `main` calls every wrapper with configurations, target types and extras that are only known at
//! run time, and checks the kernels against the reference (and rows split into vocabulary pieces,
//! with the logits kept and with the exps kept, against the unsplit kernel), so the binary is a
//! smoke test too.

use core::hint::black_box;

use no_panic::no_panic;
use smoothce::{
    reference, Backend, CrossEntropy, Error, Extras, Piece, Reduction, RowState, Smoothing,
    Summary, Targets,
};

#[no_panic]
fn forward(ce: &CrossEntropy<'_>, z: &[f32], t: &[u32], losses: &mut [f32]) -> Result<f32, Error> {
    ce.forward(z, t, losses)
}

#[no_panic]
fn forward_backward(
    ce: &CrossEntropy<'_>,
    z: &[f32],
    t: &[u32],
    losses: &mut [f32],
    grad: &mut [f32],
) -> Result<f32, Error> {
    ce.forward_backward(z, t, losses, grad)
}

#[no_panic]
fn forward_backward_in_place(
    ce: &CrossEntropy<'_>,
    z: &mut [f32],
    t: &[u32],
    losses: &mut [f32],
) -> Result<f32, Error> {
    ce.forward_backward_in_place(z, t, losses)
}

#[no_panic]
fn forward_with(
    ce: &CrossEntropy<'_>,
    z: &[f32],
    t: Targets<'_>,
    losses: &mut [f32],
    extras: Extras<'_>,
) -> Result<Summary, Error> {
    ce.forward_with(z, t, losses, extras)
}

#[no_panic]
fn forward_backward_with(
    ce: &CrossEntropy<'_>,
    z: &[f32],
    t: Targets<'_>,
    losses: &mut [f32],
    grad: &mut [f32],
    extras: Extras<'_>,
) -> Result<Summary, Error> {
    ce.forward_backward_with(z, t, losses, grad, extras)
}

#[no_panic]
fn forward_backward_in_place_with(
    ce: &CrossEntropy<'_>,
    z: &mut [f32],
    t: Targets<'_>,
    losses: &mut [f32],
    extras: Extras<'_>,
) -> Result<Summary, Error> {
    ce.forward_backward_in_place_with(z, t, losses, extras)
}

#[no_panic]
fn piece_states(
    ce: &CrossEntropy<'_>,
    z: &[f32],
    piece: Piece,
    t: Targets<'_>,
    states: &mut [RowState],
) -> Result<(), Error> {
    ce.piece_states(z, piece, t, states)
}

#[no_panic]
fn finish_states(
    ce: &CrossEntropy<'_>,
    states: &[RowState],
    t: Targets<'_>,
    losses: &mut [f32],
    extras: Extras<'_>,
) -> Result<Summary, Error> {
    ce.finish_states(states, t, losses, extras)
}

#[no_panic]
fn piece_backward(
    ce: &CrossEntropy<'_>,
    z: &[f32],
    piece: Piece,
    t: Targets<'_>,
    states: &[RowState],
    grad: &mut [f32],
) -> Result<(), Error> {
    ce.piece_backward(z, piece, t, states, grad)
}

#[no_panic]
fn piece_backward_in_place(
    ce: &CrossEntropy<'_>,
    z: &mut [f32],
    piece: Piece,
    t: Targets<'_>,
    states: &[RowState],
) -> Result<(), Error> {
    ce.piece_backward_in_place(z, piece, t, states)
}

#[no_panic]
fn piece_states_and_exps(
    ce: &CrossEntropy<'_>,
    z: &[f32],
    piece: Piece,
    t: Targets<'_>,
    states: &mut [RowState],
    exps: &mut [f32],
) -> Result<(), Error> {
    ce.piece_states_and_exps(z, piece, t, states, exps)
}

#[no_panic]
fn piece_states_and_exps_in_place(
    ce: &CrossEntropy<'_>,
    z: &mut [f32],
    piece: Piece,
    t: Targets<'_>,
    states: &mut [RowState],
) -> Result<(), Error> {
    ce.piece_states_and_exps_in_place(z, piece, t, states)
}

#[no_panic]
fn piece_backward_from_exps(
    ce: &CrossEntropy<'_>,
    exps: &mut [f32],
    piece: Piece,
    t: Targets<'_>,
    own: &[RowState],
    merged: &[RowState],
) -> Result<(), Error> {
    ce.piece_backward_from_exps(exps, piece, t, own, merged)
}

#[no_panic]
fn merge(a: RowState, b: RowState) -> RowState {
    a.merge(b)
}

#[no_panic]
fn to_words(state: &RowState) -> [f64; 8] {
    state.to_words()
}

#[no_panic]
fn from_words(words: [f64; 8]) -> RowState {
    RowState::from_words(words)
}

#[no_panic]
fn lse(state: &RowState) -> f64 {
    state.lse()
}

#[no_panic]
fn reference_forward(
    ce: &CrossEntropy<'_>,
    z: &[f32],
    t: &[u32],
    losses: &mut [f32],
) -> Result<f32, Error> {
    reference::forward(ce, z, t, losses)
}

#[no_panic]
fn reference_forward_backward(
    ce: &CrossEntropy<'_>,
    z: &[f32],
    t: &[u32],
    losses: &mut [f32],
    grad: &mut [f32],
) -> Result<f32, Error> {
    reference::forward_backward(ce, z, t, losses, grad)
}

#[no_panic]
fn reference_forward_with(
    ce: &CrossEntropy<'_>,
    z: &[f32],
    t: Targets<'_>,
    losses: &mut [f32],
    extras: Extras<'_>,
) -> Result<Summary, Error> {
    reference::forward_with(ce, z, t, losses, extras)
}

#[no_panic]
fn reference_forward_backward_with(
    ce: &CrossEntropy<'_>,
    z: &[f32],
    t: Targets<'_>,
    losses: &mut [f32],
    grad: &mut [f32],
    extras: Extras<'_>,
) -> Result<Summary, Error> {
    reference::forward_backward_with(ce, z, t, losses, grad, extras)
}

#[no_panic]
fn reference_row(
    z: &[f32],
    target: usize,
    smoothing: Smoothing,
    grad: Option<&mut [f64]>,
) -> Result<f64, Error> {
    reference::row(z, target, smoothing, grad)
}

#[no_panic]
fn agrees(got: f32, want: f64, tolerance: f64) -> bool {
    reference::agrees(got, want, tolerance)
}

#[no_panic]
fn coefficients(smoothing: Smoothing, allowed: u64, target_allowed: bool) -> (f64, f64) {
    smoothing.coefficients(allowed, target_allowed)
}

#[no_panic]
fn target_rows(t: Targets<'_>, classes: usize) -> Option<usize> {
    t.rows(classes)
}

#[no_panic]
fn resolve(backend: Backend) -> Option<Backend> {
    backend.resolve()
}

const K: usize = 37;
const ROWS: usize = 3;

fn agree_all(got: &[f32], want: &[f32]) -> bool {
    got.len() == want.len()
        && got
            .iter()
            .zip(want)
            .all(|(&g, &w)| agrees(g, f64::from(w), 1e-5))
}

/// Every entry point on one configuration; returns whether all agreed with the reference.
/// `softcap` says whether `ce` has a soft-cap (which the one-exp piece calls must refuse).
fn check(ce: &CrossEntropy<'_>, logits: &[f32], targets: &[u32], softcap: bool) -> bool {
    let n = logits.len();
    let (mut losses, mut ref_losses) = (vec![0.0_f32; ROWS], vec![0.0_f32; ROWS]);
    let (mut grad, mut ref_grad) = (vec![0.0_f32; n], vec![0.0_f32; n]);
    let mut in_place = logits.to_vec();
    let a = forward(ce, logits, targets, &mut losses).expect("forward");
    let b =
        forward_backward(ce, logits, targets, &mut losses, &mut grad).expect("forward_backward");
    let c = forward_backward_in_place(ce, &mut in_place, targets, &mut losses)
        .expect("forward_backward_in_place");
    let want = reference_forward(ce, logits, targets, &mut ref_losses).expect("reference::forward");
    reference_forward_backward(ce, logits, targets, &mut ref_losses, &mut ref_grad)
        .expect("reference::forward_backward");
    let mut ok = [a, b, c]
        .into_iter()
        .all(|got| agrees(got, f64::from(want), 1e-5))
        && agree_all(&losses, &ref_losses)
        && agree_all(&grad, &ref_grad)
        && grad == in_place;

    // The `_with` calls with every extra, on i64 targets.
    let wide: Vec<i64> = targets.iter().map(|&t| i64::from(t)).collect();
    let (mut lse, mut ref_lse) = (vec![0.0_f32; ROWS], vec![0.0_f32; ROWS]);
    let (mut zl, mut ref_zl) = (vec![0.0_f32; ROWS], vec![0.0_f32; ROWS]);
    let (mut correct, mut ref_correct) = (vec![false; ROWS], vec![false; ROWS]);
    let scales = [1.0_f32, 0.5, 2.0];
    let row_scales = (ce.reduction_config() == Reduction::None).then_some(&scales[..]);
    let s = forward_backward_with(
        ce,
        logits,
        Targets::I64(&wide),
        &mut losses,
        &mut grad,
        Extras {
            lse: Some(&mut lse),
            z_loss: Some(&mut zl),
            correct: Some(&mut correct),
            row_scales,
        },
    )
    .expect("forward_backward_with");
    let r = reference_forward_backward_with(
        ce,
        logits,
        Targets::I64(&wide),
        &mut ref_losses,
        &mut ref_grad,
        Extras {
            lse: Some(&mut ref_lse),
            z_loss: Some(&mut ref_zl),
            correct: Some(&mut ref_correct),
            row_scales,
        },
    )
    .expect("reference::forward_backward_with");
    ok &= agrees(s.loss, f64::from(r.loss), 1e-5)
        && agree_all(&losses, &ref_losses)
        && agree_all(&grad, &ref_grad)
        && agree_all(&lse, &ref_lse)
        && agree_all(&zl, &ref_zl)
        && correct == ref_correct;
    let f = forward_with(
        ce,
        logits,
        Targets::I64(&wide),
        &mut losses,
        Extras::default(),
    )
    .expect("forward_with");
    let rf = reference_forward_with(
        ce,
        logits,
        Targets::I64(&wide),
        &mut ref_losses,
        Extras::default(),
    )
    .expect("reference::forward_with");
    in_place.copy_from_slice(logits);
    let ip = forward_backward_in_place_with(
        ce,
        &mut in_place,
        Targets::I64(&wide),
        &mut losses,
        Extras {
            row_scales,
            ..Extras::default()
        },
    )
    .expect("forward_backward_in_place_with");
    ok &= agrees(f.loss, f64::from(rf.loss), 1e-5) && agrees(ip.loss, f64::from(r.loss), 1e-5);
    ok &= check_pieces(ce, logits, Targets::I64(&wide), row_scales, softcap);
    ok && target_rows(Targets::I64(&wide), K) == Some(ROWS)
}

/// Three uneven pieces of the `K` classes: a tail-only one, one of whole vectors and the rest.
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
        width: K - 21,
    },
];

/// Piece `p` of a row-major `[ROWS, K]` batch.
fn cut(batch: &[f32], p: Piece) -> Vec<f32> {
    batch
        .chunks(K)
        .flat_map(|row| row[p.offset..p.offset + p.width].iter().copied())
        .collect()
}

/// The rows split into [`PIECES`]: states per piece, merged (two of them through their words) in
/// a different order per row, finished and differentiated piece by piece, against the unsplit
/// kernel. `row_scales` go to `finish_states` only (they scale gradients, which it does not
/// compute; the piece gradients take none), so the unsplit gradient is computed without them.
/// Then the same with the one-exp calls ([`check_pieces_exps`]).
fn check_pieces(
    ce: &CrossEntropy<'_>,
    logits: &[f32],
    t: Targets<'_>,
    row_scales: Option<&[f32]>,
    softcap: bool,
) -> bool {
    let (mut losses, mut lse_out, mut zl, mut correct) = (
        vec![0.0_f32; ROWS],
        vec![0.0_f32; ROWS],
        vec![0.0_f32; ROWS],
        vec![false; ROWS],
    );
    let mut grad = vec![0.0_f32; ROWS * K];
    let whole = forward_backward_with(
        ce,
        logits,
        t,
        &mut losses,
        &mut grad,
        Extras {
            lse: Some(&mut lse_out),
            z_loss: Some(&mut zl),
            correct: Some(&mut correct),
            row_scales: None,
        },
    )
    .expect("forward_backward_with (unsplit)");

    let mut per_piece = [[RowState::EMPTY; ROWS]; 3];
    for (p, states) in PIECES.iter().zip(&mut per_piece) {
        piece_states(ce, &cut(logits, *p), *p, t, states).expect("piece_states");
    }
    let merged: Vec<RowState> = (0..ROWS)
        .map(|row| {
            let [a, b, c] = [0, 1, 2].map(|i| per_piece[(i + row) % 3][row]);
            let sent = from_words(to_words(&merge(a, b)));
            merge(c, sent)
        })
        .collect();
    let (mut split_losses, mut split_lse, mut split_zl, mut split_correct) = (
        vec![0.0_f32; ROWS],
        vec![0.0_f32; ROWS],
        vec![0.0_f32; ROWS],
        vec![false; ROWS],
    );
    let split = finish_states(
        ce,
        &merged,
        t,
        &mut split_losses,
        Extras {
            lse: Some(&mut split_lse),
            z_loss: Some(&mut split_zl),
            correct: Some(&mut split_correct),
            row_scales,
        },
    )
    .expect("finish_states");
    let mut ok = agrees(split.loss, f64::from(whole.loss), 1e-5)
        && agrees(split.z_loss, f64::from(whole.z_loss), 1e-5)
        && agree_all(&split_losses, &losses)
        && agree_all(&split_lse, &lse_out)
        && agree_all(&split_zl, &zl)
        && split_correct == correct
        && split.correct == whole.correct
        && split.rows == whole.rows
        && merged
            .iter()
            .zip(&lse_out)
            .all(|(s, &l)| agrees(l, lse(s), 1e-5));
    for p in PIECES {
        let z = cut(logits, p);
        let mut piece_grad = vec![0.0_f32; z.len()];
        piece_backward(ce, &z, p, t, &merged, &mut piece_grad).expect("piece_backward");
        let mut in_place = z;
        piece_backward_in_place(ce, &mut in_place, p, t, &merged).expect("piece_backward_in_place");
        ok &= agree_all(&piece_grad, &cut(&grad, p)) && piece_grad == in_place;
    }
    let unsplit = Unsplit {
        loss: whole.loss,
        losses: &losses,
        lse: &lse_out,
        grad: &grad,
    };
    ok && check_pieces_exps(ce, logits, t, softcap, &unsplit)
}

/// The unsplit kernel's results that [`check_pieces_exps`] compares with.
struct Unsplit<'a> {
    loss: f32,
    losses: &'a [f32],
    lse: &'a [f32],
    grad: &'a [f32],
}

/// Whether two f32 slices are bit-identical.
fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// The one-exp form of the split: each piece of [`PIECES`] through `piece_states_and_exps` (its
/// exps in a separate buffer) and `piece_states_and_exps_in_place` (over a copy of its logits),
/// which must give bit-identical exps and states; the own states merged (a pair through its words)
/// and finished against the unsplit kernel; each piece's exps, both copies, rescaled by
/// `piece_backward_from_exps` against the unsplit gradient and bit-identical to each other. A
/// merged state that does not contain a piece's own must be refused with `StateMismatch`. With a
/// soft-cap, all three calls must refuse with `Unsupported` and write nothing.
fn check_pieces_exps(
    ce: &CrossEntropy<'_>,
    logits: &[f32],
    t: Targets<'_>,
    softcap: bool,
    unsplit: &Unsplit<'_>,
) -> bool {
    let mut own = [[RowState::EMPTY; ROWS]; 3];
    let mut exps: [Vec<f32>; 3] = Default::default();
    let mut over_logits: [Vec<f32>; 3] = Default::default();
    let mut ok = true;
    for (i, p) in PIECES.into_iter().enumerate() {
        let z = cut(logits, p);
        exps[i] = vec![0.0_f32; z.len()];
        let out_of_place = piece_states_and_exps(ce, &z, p, t, &mut own[i], &mut exps[i]);
        over_logits[i] = z.clone();
        let mut own_in_place = [RowState::EMPTY; ROWS];
        let in_place =
            piece_states_and_exps_in_place(ce, &mut over_logits[i], p, t, &mut own_in_place);
        if softcap {
            let zeros = vec![0.0_f32; z.len()];
            ok &= matches!(out_of_place, Err(Error::Unsupported { .. }))
                && matches!(in_place, Err(Error::Unsupported { .. }))
                && own[i] == [RowState::EMPTY; ROWS]
                && own_in_place == [RowState::EMPTY; ROWS]
                && same_bits(&exps[i], &zeros)
                && same_bits(&over_logits[i], &z);
            let merged = [RowState::EMPTY; ROWS];
            let refused = piece_backward_from_exps(ce, &mut exps[i], p, t, &own[i], &merged);
            ok &= matches!(refused, Err(Error::Unsupported { .. })) && same_bits(&exps[i], &zeros);
            continue;
        }
        out_of_place.expect("piece_states_and_exps");
        in_place.expect("piece_states_and_exps_in_place");
        ok &= same_bits(&exps[i], &over_logits[i])
            && own[i]
                .iter()
                .zip(&own_in_place)
                .all(|(a, b)| to_words(a).map(f64::to_bits) == to_words(b).map(f64::to_bits));
    }
    if softcap {
        return ok;
    }

    let merged: Vec<RowState> = (0..ROWS)
        .map(|row| {
            let [a, b, c] = [0, 1, 2].map(|i| own[(i + row) % 3][row]);
            merge(from_words(to_words(&merge(a, b))), c)
        })
        .collect();
    let (mut losses, mut lse_out) = (vec![0.0_f32; ROWS], vec![0.0_f32; ROWS]);
    let split = finish_states(
        ce,
        &merged,
        t,
        &mut losses,
        Extras {
            lse: Some(&mut lse_out),
            ..Extras::default()
        },
    )
    .expect("finish_states (one-exp states)");
    ok &= agrees(split.loss, f64::from(unsplit.loss), 1e-5)
        && agree_all(&losses, unsplit.losses)
        && agree_all(&lse_out, unsplit.lse);

    for (i, p) in PIECES.into_iter().enumerate() {
        // A merged state that lacks the piece (here: the empty one) is refused, nothing written.
        let before = exps[i].clone();
        let empty = [RowState::EMPTY; ROWS];
        ok &= piece_backward_from_exps(ce, &mut exps[i], p, t, &own[i], &empty)
            == Err(Error::StateMismatch { row: 0 })
            && same_bits(&exps[i], &before);

        piece_backward_from_exps(ce, &mut exps[i], p, t, &own[i], &merged)
            .expect("piece_backward_from_exps");
        piece_backward_from_exps(ce, &mut over_logits[i], p, t, &own[i], &merged)
            .expect("piece_backward_from_exps (exps stored in place)");
        ok &= agree_all(&exps[i], &cut(unsplit.grad, p)) && same_bits(&exps[i], &over_logits[i]);
    }
    ok
}

fn main() {
    let logits: Vec<f32> = (0..ROWS * K)
        .map(|i| ((i * 7919) % 101) as f32 * 0.1 - 5.0)
        .collect();
    let targets: Vec<u32> = (0..ROWS as u32).map(|r| (r * 11) % K as u32).collect();
    let weights: Vec<f32> = (0..K).map(|k| 0.5 + (k % 3) as f32 * 0.25).collect();
    // Class 7 masked: in the second piece (of whole vectors), and no row's target.
    let mask: Vec<bool> = (0..K).map(|k| k != 7).collect();
    assert!(targets.iter().all(|&t| t != 7));

    // The scalar helpers.
    let mut row_grad = vec![0.0_f64; K];
    let row_loss = reference_row(
        &logits[..K],
        targets[0] as usize,
        Smoothing::Uniform(0.1),
        Some(&mut row_grad),
    )
    .expect("reference::row");
    assert!(row_loss.is_finite() && row_grad.iter().sum::<f64>().abs() < 1e-9);
    let (on, per) = coefficients(Smoothing::OffTarget(0.2), K as u64, true);
    assert!((on + per * K as f64 - 1.0).abs() < 1e-9);

    let mut checked = 0_u32;
    for backend in Backend::ALL {
        if resolve(black_box(backend)).is_none() {
            println!("backend {backend:?}: not available on this CPU, skipped");
            continue;
        }
        for smoothing in [Smoothing::Uniform(0.1), Smoothing::OffTarget(0.2)] {
            for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                for options in 0..3 {
                    let mut ce = CrossEntropy::new(K)
                        .smoothing(smoothing)
                        .reduction(reduction)
                        .ignore_index(u32::MAX)
                        .backend(backend);
                    // 1: every option with a soft-cap; 2: the same without (which the one-exp
                    // piece calls support) and with a masked class.
                    if options >= 1 {
                        ce = ce.class_weights(&weights).z_loss(1e-3).logit_scale(0.75);
                    }
                    let softcap = options == 1;
                    if softcap {
                        ce = ce.softcap(20.0);
                    }
                    if options == 2 {
                        ce = ce.class_mask(&mask);
                    }
                    let ce = black_box(ce);
                    assert!(
                        check(&ce, &logits, &targets, softcap),
                        "{backend:?} {smoothing:?} {reduction:?} options {options}: disagrees with the reference (or, in pieces, with the unsplit kernel)"
                    );
                    checked += 1;
                }
            }
        }
    }
    println!("no-panic host check: every wrapper linked; {checked} configurations agreed with the reference, and in 3 pieces (both forms) with the unsplit kernel");
}
