//! `smoothce` on an emulated Cortex-M4F: QEMU's `mps2-an386` board, run by `.ci/run` as
//!
//! ```text
//! qemu-system-arm -machine mps2-an386 -cpu cortex-m4 -nographic \
//!     -semihosting-config enable=on,target=native -kernel <this binary>
//! ```
//!
//! For a few fixed batches it computes losses and gradients with every `CrossEntropy` entry point
//! (and with the rows split into vocabulary pieces, in both forms of the piece API) and with
//! `smoothce::reference`, compares them with `reference::agrees` at the crate's documented
//! tolerances, prints one line per case and a final `N passed, N failed` line over semihosting,
//! and exits through semihosting with success only when every comparison agreed.

#![no_std]
#![no_main]

use core::panic::PanicInfo;

use cortex_m_rt::entry;
use cortex_m_semihosting::{debug, hprintln};
use smoothce::reference::{self, GRAD_TOLERANCE, LOSS_TOLERANCE};
use smoothce::{Backend, CrossEntropy, Error, Extras, Piece, Reduction, RowState, Smoothing};

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    hprintln!("PANIC: {}", info);
    debug::exit(debug::EXIT_FAILURE);
    loop {}
}

/// Largest batch of the cases below.
const MAX: usize = 3 * 40;

/// One fixed case: `rows = targets.len()` rows of `k` logits.
struct Case {
    name: &'static str,
    k: usize,
    logits: &'static [f32],
    targets: &'static [u32],
    ce: fn(usize) -> CrossEntropy<'static>,
}

/// Logits with tails (K not a multiple of 8), a masked class, a large offset, an ignored row.
static WIDE: [f32; 3 * 40] = {
    let mut z = [0.0_f32; 3 * 40];
    let mut i = 0;
    while i < z.len() {
        // A fixed pseudo-random spread in [-8, 8).
        z[i] = ((i * 37 + 11) % 64) as f32 * 0.25 - 8.0;
        i += 1;
    }
    z
};

static MASKED: [f32; 2 * 9] = [
    1.0,
    f32::NEG_INFINITY,
    0.5,
    -2.0,
    3.0,
    0.0,
    f32::NEG_INFINITY,
    1.5,
    -0.5, // row 0: two masked classes
    1.0e4,
    1.0e4 + 1.0,
    1.0e4 - 3.0,
    1.0e4 + 0.5,
    1.0e4,
    1.0e4 - 1.0,
    1.0e4 + 2.0,
    1.0e4,
    1.0e4 - 0.25, // row 1: large offset
];

static TINY: [f32; 3 * 2] = [2.0, -1.0, 0.0, 0.0, -3.0, 4.0];

fn cases() -> [Case; 5] {
    [
        Case {
            name: "K=40 uniform(0.1) mean",
            k: 40,
            logits: &WIDE,
            targets: &[3, 39, 17],
            ce: |k| CrossEntropy::new(k).smoothing(Smoothing::Uniform(0.1)),
        },
        Case {
            name: "K=40 off-target(0.2) sum, ignored row",
            k: 40,
            logits: &WIDE,
            targets: &[0, u32::MAX, 21],
            ce: |k| {
                CrossEntropy::new(k)
                    .smoothing(Smoothing::OffTarget(0.2))
                    .reduction(Reduction::Sum)
                    .ignore_index(u32::MAX)
            },
        },
        Case {
            name: "K=9 masked classes and 1e4 offset, none",
            k: 9,
            logits: &MASKED,
            targets: &[2, 6],
            ce: |k| {
                CrossEntropy::new(k)
                    .smoothing(Smoothing::Uniform(0.05))
                    .reduction(Reduction::None)
            },
        },
        Case {
            name: "K=2 plain cross-entropy",
            k: 2,
            logits: &TINY,
            targets: &[0, 1, 1],
            ce: CrossEntropy::new,
        },
        Case {
            name: "K=40 uniform(1.0) mean",
            k: 40,
            logits: &WIDE,
            targets: &[5, 6, 7],
            ce: |k| CrossEntropy::new(k).smoothing(Smoothing::Uniform(1.0)),
        },
    ]
}

/// Runs one case through every entry point; returns whether all of them agreed.
fn check(case: &Case) -> Result<bool, smoothce::Error> {
    let rows = case.targets.len();
    let n = rows * case.k;
    let ce = (case.ce)(case.k).backend(Backend::Auto);
    let logits = &case.logits[..n];
    let scale = match ce.reduction_config() {
        Reduction::Mean => {
            let counted = case
                .targets
                .iter()
                .filter(|&&t| Some(t) != ce.ignore_index_config())
                .count();
            1.0 / counted.max(1) as f64
        }
        Reduction::Sum | Reduction::None => 1.0,
    };

    let mut want_losses = [0.0_f32; 3];
    let mut want_grad = [0.0_f32; MAX];
    let want = reference::forward_backward(
        &ce,
        logits,
        case.targets,
        &mut want_losses[..rows],
        &mut want_grad[..n],
    )?;
    let mut want_forward_losses = [0.0_f32; 3];
    let want_forward =
        reference::forward(&ce, logits, case.targets, &mut want_forward_losses[..rows])?;
    let mut ok = want.to_bits() == want_forward.to_bits() && want_losses == want_forward_losses;

    // Row 0 of the batch in full f64, as a check of the f32 batch reference itself.
    let mut row_grad = [0.0_f64; 40];
    if Some(case.targets[0]) != ce.ignore_index_config() {
        let row_loss = reference::row(
            &logits[..case.k],
            case.targets[0] as usize,
            ce.smoothing_config(),
            Some(&mut row_grad[..case.k]),
        )?;
        ok &= reference::agrees(want_losses[0], row_loss, LOSS_TOLERANCE);
    }

    let mut losses = [0.0_f32; 3];
    let got = ce.forward(logits, case.targets, &mut losses[..rows])?;
    ok &= agree_losses(got, &losses[..rows], want, &want_losses[..rows]);

    let mut grad = [0.0_f32; MAX];
    let got = ce.forward_backward(logits, case.targets, &mut losses[..rows], &mut grad[..n])?;
    ok &= agree_losses(got, &losses[..rows], want, &want_losses[..rows]);
    ok &= agree_grad(&grad[..n], &want_grad[..n], scale);

    let mut in_place = [0.0_f32; MAX];
    in_place[..n].copy_from_slice(logits);
    let got =
        ce.forward_backward_in_place(&mut in_place[..n], case.targets, &mut losses[..rows])?;
    ok &= agree_losses(got, &losses[..rows], want, &want_losses[..rows]);
    ok &= in_place[..n]
        .iter()
        .zip(&grad[..n])
        .all(|(a, b)| a.to_bits() == b.to_bits());
    Ok(ok)
}

/// Name of the piece case.
const PIECES_CASE: &str = "K=40 uniform(0.1) mean in 3 pieces";
/// Name of the piece case with the exps kept.
const PIECES_EXPS_CASE: &str = "K=40 uniform(0.1) mean in 3 pieces, one exp";

/// Classes and rows of the piece cases (the rows of `WIDE`).
const PK: usize = 40;
const PROWS: usize = 3;
/// Three uneven pieces of the `PK` classes, holding one target each.
const PIECES: [Piece; 3] = [
    Piece {
        offset: 0,
        width: 7,
    },
    Piece {
        offset: 7,
        width: 16,
    },
    Piece {
        offset: 23,
        width: 17,
    },
];
const PIECE_TARGETS: &[u32] = &[3, 39, 17];

fn piece_ce() -> CrossEntropy<'static> {
    CrossEntropy::new(PK)
        .smoothing(Smoothing::Uniform(0.1))
        .backend(Backend::Auto)
}

/// Piece `p` of a `[PROWS, PK]` batch into `out[..PROWS * p.width]`.
fn cut(batch: &[f32], p: Piece, out: &mut [f32]) {
    for (row, dst) in batch.chunks(PK).zip(out.chunks_mut(p.width)) {
        dst.copy_from_slice(&row[p.offset..p.offset + p.width]);
    }
}

/// Row `row`'s merge of three pieces' states, starting from piece `row` (one pair through its
/// words).
fn merge_row(per_piece: &[[RowState; PROWS]; 3], row: usize) -> RowState {
    let [a, b, c] = [0, 1, 2].map(|i| per_piece[(i + row) % 3][row]);
    c.merge(RowState::from_words(a.merge(b).to_words()))
}

/// The rows of `WIDE` in three uneven pieces (the targets in different pieces): states per piece,
/// merged in a different order per row (one pair through its words), finished, and each piece's
/// gradient, in place too, against the reference on the unsplit rows.
fn check_pieces() -> Result<bool, smoothce::Error> {
    const K: usize = PK;
    const ROWS: usize = PROWS;
    let targets = PIECE_TARGETS;
    let ce = piece_ce();
    let logits = &WIDE[..ROWS * K];
    let mut want_losses = [0.0_f32; ROWS];
    let mut want_grad = [0.0_f32; ROWS * K];
    let want = reference::forward_backward(&ce, logits, targets, &mut want_losses, &mut want_grad)?;

    let mut per_piece = [[RowState::EMPTY; ROWS]; 3];
    let mut buf = [0.0_f32; MAX];
    for (p, states) in PIECES.iter().zip(&mut per_piece) {
        cut(logits, *p, &mut buf);
        ce.piece_states(&buf[..ROWS * p.width], *p, targets, states)?;
    }
    let mut merged = [RowState::EMPTY; ROWS];
    for (row, m) in merged.iter_mut().enumerate() {
        *m = merge_row(&per_piece, row);
    }
    let mut losses = [0.0_f32; ROWS];
    let split = ce.finish_states(&merged, targets, &mut losses, Extras::default())?;
    let mut ok = agree_losses(split.loss, &losses, want, &want_losses);

    let scale = 1.0 / ROWS as f64;
    let mut grad = [0.0_f32; MAX];
    let mut want_piece = [0.0_f32; MAX];
    for p in PIECES {
        let n = ROWS * p.width;
        cut(logits, p, &mut buf);
        cut(&want_grad, p, &mut want_piece);
        ce.piece_backward(&buf[..n], p, targets, &merged, &mut grad[..n])?;
        ok &= agree_grad(&grad[..n], &want_piece[..n], scale);
        ce.piece_backward_in_place(&mut buf[..n], p, targets, &merged)?;
        ok &= buf[..n]
            .iter()
            .zip(&grad[..n])
            .all(|(a, b)| a.to_bits() == b.to_bits());
    }
    Ok(ok)
}

/// As [`check_pieces`] with the exps kept: each piece's own states and exps, out of place and over
/// its logits (bit-identical), the own states merged and finished, and each piece's exps (both
/// copies, bit-identical) rescaled into its gradient, against the reference on the unsplit rows
/// at the same tolerance. A merged state that does not contain a piece's own is refused.
fn check_pieces_exps() -> Result<bool, smoothce::Error> {
    const K: usize = PK;
    const ROWS: usize = PROWS;
    let targets = PIECE_TARGETS;
    let ce = piece_ce();
    let logits = &WIDE[..ROWS * K];
    let mut want_losses = [0.0_f32; ROWS];
    let mut want_grad = [0.0_f32; ROWS * K];
    let want = reference::forward_backward(&ce, logits, targets, &mut want_losses, &mut want_grad)?;

    // Piece `p`'s exps (then gradient) at `ROWS * p.offset ..` of these, the pieces side by side.
    let mut exps = [0.0_f32; MAX];
    let mut over_logits = [0.0_f32; MAX];
    let mut own = [[RowState::EMPTY; ROWS]; 3];
    let mut own_in_place = [[RowState::EMPTY; ROWS]; 3];
    for (i, p) in PIECES.iter().enumerate() {
        let span = ROWS * p.offset..ROWS * (p.offset + p.width);
        cut(logits, *p, &mut over_logits[span.clone()]);
        ce.piece_states_and_exps(
            &over_logits[span.clone()],
            *p,
            targets,
            &mut own[i],
            &mut exps[span.clone()],
        )?;
        ce.piece_states_and_exps_in_place(
            &mut over_logits[span],
            *p,
            targets,
            &mut own_in_place[i],
        )?;
    }
    let mut ok = own == own_in_place && same_bits(&exps[..ROWS * K], &over_logits[..ROWS * K]);

    let mut merged = [RowState::EMPTY; ROWS];
    for (row, m) in merged.iter_mut().enumerate() {
        *m = merge_row(&own, row);
    }
    let mut losses = [0.0_f32; ROWS];
    let split = ce.finish_states(&merged, targets, &mut losses, Extras::default())?;
    ok &= agree_losses(split.loss, &losses, want, &want_losses);

    let scale = 1.0 / ROWS as f64;
    let mut want_piece = [0.0_f32; MAX];
    for (i, p) in PIECES.into_iter().enumerate() {
        let span = ROWS * p.offset..ROWS * (p.offset + p.width);
        let empty = [RowState::EMPTY; ROWS];
        ok &= ce.piece_backward_from_exps(&mut exps[span.clone()], p, targets, &own[i], &empty)
            == Err(Error::StateMismatch { row: 0 });
        ce.piece_backward_from_exps(&mut exps[span.clone()], p, targets, &own[i], &merged)?;
        ce.piece_backward_from_exps(&mut over_logits[span.clone()], p, targets, &own[i], &merged)?;
        let n = ROWS * p.width;
        cut(&want_grad, p, &mut want_piece);
        ok &= agree_grad(&exps[span.clone()], &want_piece[..n], scale)
            && same_bits(&exps[span.clone()], &over_logits[span]);
    }
    Ok(ok)
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn agree_losses(got: f32, losses: &[f32], want: f32, want_losses: &[f32]) -> bool {
    reference::agrees(got, f64::from(want), 2.0 * LOSS_TOLERANCE)
        && losses
            .iter()
            .zip(want_losses)
            .all(|(&l, &w)| reference::agrees(l, f64::from(w), 2.0 * LOSS_TOLERANCE))
}

fn agree_grad(grad: &[f32], want: &[f32], scale: f64) -> bool {
    grad.iter()
        .zip(want)
        .all(|(&g, &w)| reference::agrees(g, f64::from(w), 2.0 * GRAD_TOLERANCE * scale))
}

#[entry]
fn main() -> ! {
    hprintln!(
        "smoothce on Cortex-M (thumbv7em-none-eabihf), backend {:?}",
        Backend::Auto.resolve()
    );
    let (mut passed, mut failed) = (0_u32, 0_u32);
    let results = cases()
        .into_iter()
        .map(|case| (case.name, check(&case)))
        .chain(core::iter::once_with(|| (PIECES_CASE, check_pieces())))
        .chain(core::iter::once_with(|| {
            (PIECES_EXPS_CASE, check_pieces_exps())
        }));
    for (name, result) in results {
        match result {
            Ok(true) => {
                passed += 1;
                hprintln!("ok   {}", name);
            }
            Ok(false) => {
                failed += 1;
                hprintln!("FAIL {}: kernel and reference disagree", name);
            }
            Err(e) => {
                failed += 1;
                hprintln!("FAIL {}: {}", name, e);
            }
        }
    }
    hprintln!("cortex-m: {} passed, {} failed", passed, failed);
    debug::exit(if failed == 0 {
        debug::EXIT_SUCCESS
    } else {
        debug::EXIT_FAILURE
    });
    loop {}
}
