//! Panic-freedom probe for `smoothce` on a microcontroller target (thumbv7em-none-eabihf).
//!
//! `main` calls every public compute function of the crate (the six `CrossEntropy` entry points,
//! the vocabulary-piece API in both its forms with `RowState`'s methods, the `reference`
//! functions and the small helpers) on inputs hidden from the optimiser by
//! `core::hint::black_box`: the configuration, every option, the target type, the extras and the
//! slices are all opaque, so no code path can be constant-folded away. The `#[panic_handler]`
//! calls an `extern "C"` function that is declared but defined nowhere: if any panic is reachable
//! from these calls after optimisation, the handler stays in the binary and the link fails with an
//! undefined symbol `smoothce_probe_a_panic_is_reachable`. A successful link is the proof.

#![no_std]
#![no_main]

use core::hint::black_box;
use core::panic::PanicInfo;

use cortex_m_rt::entry;
use smoothce::{
    reference, Backend, CrossEntropy, Extras, Piece, Reduction, RowState, Smoothing, Targets,
};

extern "C" {
    /// Deliberately never defined: referencing it makes the link fail.
    fn smoothce_probe_a_panic_is_reachable() -> !;
}

#[panic_handler]
fn panic(_: &PanicInfo<'_>) -> ! {
    // SAFETY: never runs; the symbol does not exist, so a reachable panic cannot link.
    unsafe { smoothce_probe_a_panic_is_reachable() }
}

const K: usize = 8;
const ROWS: usize = 8;
const N: usize = K * ROWS;

static WEIGHTS: [f32; K] = [1.0; K];
static ROW_WEIGHTS: [f32; ROWS] = [1.0; ROWS];
static MASK: [bool; K] = [true; K];

/// An opaque flag.
fn flag() -> bool {
    black_box(true)
}

/// A configuration whose every field and option is opaque to the optimiser.
fn config() -> CrossEntropy<'static> {
    let smoothing = if flag() {
        Smoothing::Uniform(black_box(0.1))
    } else {
        Smoothing::OffTarget(black_box(0.1))
    };
    let reduction = match black_box(0_u8) {
        0 => Reduction::Mean,
        1 => Reduction::Sum,
        _ => Reduction::None,
    };
    let backend = match black_box(0_u8) {
        0 => Backend::Auto,
        1 => Backend::Portable,
        2 => Backend::Avx2,
        _ => Backend::Avx512,
    };
    let mut ce = CrossEntropy::new(black_box(K))
        .smoothing(smoothing)
        .reduction(reduction)
        .backend(backend);
    if flag() {
        ce = ce.ignore_index(black_box(u32::MAX));
    }
    if flag() {
        ce = ce.ignore_index_signed(black_box(-100));
    }
    if flag() {
        ce = ce.class_weights(black_box(&WEIGHTS[..]));
    }
    if flag() {
        ce = ce.target_weights(black_box(&WEIGHTS[..]));
    }
    if flag() {
        ce = ce.z_loss(black_box(1e-4));
    }
    if flag() {
        ce = ce.softcap(black_box(30.0));
    }
    if flag() {
        ce = ce.logit_scale(black_box(0.5));
    }
    if flag() {
        ce = ce.class_mask(black_box(&MASK[..]));
    }
    if flag() {
        ce = ce.upstream(black_box(2.0));
    }
    if flag() {
        ce = ce.mean_denominator(black_box(8.0));
    }
    ce
}

/// Targets of an opaque type.
fn targets<'t>(
    u8s: &'t [u8],
    u16s: &'t [u16],
    u32s: &'t [u32],
    i32s: &'t [i32],
    i64s: &'t [i64],
    usizes: &'t [usize],
    soft: &'t [f32],
) -> Targets<'t> {
    match black_box(0_u8) {
        0 => Targets::U8(black_box(u8s)),
        1 => Targets::U16(black_box(u16s)),
        2 => Targets::U32(black_box(u32s)),
        3 => Targets::I32(black_box(i32s)),
        4 => Targets::I64(black_box(i64s)),
        5 => Targets::Usize(black_box(usizes)),
        _ => Targets::Soft(black_box(soft)),
    }
}

#[entry]
fn main() -> ! {
    let ce = config();
    let mut logits = [0.25_f32; N];
    let mut grad = [0.0_f32; N];
    let mut losses = [0.0_f32; ROWS];
    let mut lse = [0.0_f32; ROWS];
    let mut z_loss = [0.0_f32; ROWS];
    let mut correct = [false; ROWS];
    let mut grad64 = [0.0_f64; K];
    let (u8s, u16s, u32s) = ([3_u8; ROWS], [3_u16; ROWS], [3_u32; ROWS]);
    let (i32s, i64s, usizes) = ([3_i32; ROWS], [3_i64; ROWS], [3_usize; ROWS]);
    let soft = [0.125_f32; N];
    let t = || {
        targets(
            &u8s[..],
            &u16s[..],
            &u32s[..],
            &i32s[..],
            &i64s[..],
            &usizes[..],
            &soft[..],
        )
    };
    // Extras whose every field is present or absent at run time.
    macro_rules! extras {
        () => {
            Extras {
                lse: flag().then_some(black_box(&mut lse[..])),
                z_loss: flag().then_some(black_box(&mut z_loss[..])),
                correct: flag().then_some(black_box(&mut correct[..])),
                row_scales: flag().then_some(black_box(&ROW_WEIGHTS[..])),
            }
        };
    }

    // The plain entry points, on slices whose lengths and contents the optimiser cannot see.
    let z: &[f32] = black_box(&logits[..]);
    let t32: &[u32] = black_box(&u32s[..]);
    black_box(ce.forward(z, t32, black_box(&mut losses[..])).ok());
    black_box(
        ce.forward_backward(z, t32, black_box(&mut losses[..]), black_box(&mut grad[..]))
            .ok(),
    );
    black_box(
        ce.forward_backward_in_place(black_box(&mut logits[..]), t32, black_box(&mut losses[..]))
            .ok(),
    );

    // The `_with` entry points: any target type, every extra.
    let z: &[f32] = black_box(&logits[..]);
    black_box(
        ce.forward_with(z, t(), black_box(&mut losses[..]), extras!())
            .ok(),
    );
    black_box(
        ce.forward_backward_with(
            z,
            t(),
            black_box(&mut losses[..]),
            black_box(&mut grad[..]),
            extras!(),
        )
        .ok(),
    );
    black_box(
        ce.forward_backward_in_place_with(
            black_box(&mut logits[..]),
            t(),
            black_box(&mut losses[..]),
            extras!(),
        )
        .ok(),
    );

    // The vocabulary-piece API: an opaque piece of opaque rows, states merged and sent through
    // their words, then finished and differentiated.
    let piece = Piece {
        offset: black_box(2),
        width: black_box(4),
    };
    let mut states = [RowState::EMPTY; ROWS];
    let mut other = [RowState::EMPTY; ROWS];
    let z: &[f32] = black_box(&logits[..]);
    black_box(
        ce.piece_states(z, piece, t(), black_box(&mut states[..]))
            .ok(),
    );
    black_box(
        ce.piece_states(z, piece, t32, black_box(&mut other[..]))
            .ok(),
    );
    for (s, o) in states.iter_mut().zip(&other) {
        let words = black_box(s.merge(black_box(*o)).to_words());
        *s = RowState::from_words(words);
        black_box(s.lse());
    }
    let merged: &[RowState] = black_box(&states[..]);
    black_box(
        ce.finish_states(merged, t(), black_box(&mut losses[..]), extras!())
            .ok(),
    );
    black_box(
        ce.finish_states(merged, t32, black_box(&mut losses[..]), Extras::default())
            .ok(),
    );
    black_box(
        ce.piece_backward(z, piece, t(), merged, black_box(&mut grad[..]))
            .ok(),
    );
    black_box(
        ce.piece_backward_in_place(black_box(&mut logits[..]), piece, t(), merged)
            .ok(),
    );

    // The one-exp form of steps 1 and 3: the piece's own states with its exps kept (in a separate
    // buffer and over the logits), then the exps rescaled into the gradient from the own and the
    // merged states.
    let mut own = [RowState::EMPTY; ROWS];
    let z: &[f32] = black_box(&logits[..]);
    black_box(
        ce.piece_states_and_exps(
            z,
            piece,
            t(),
            black_box(&mut own[..]),
            black_box(&mut grad[..]),
        )
        .ok(),
    );
    black_box(
        ce.piece_states_and_exps_in_place(
            black_box(&mut logits[..]),
            piece,
            t32,
            black_box(&mut own[..]),
        )
        .ok(),
    );
    let own: &[RowState] = black_box(&own[..]);
    black_box(
        ce.piece_backward_from_exps(black_box(&mut grad[..]), piece, t(), own, merged)
            .ok(),
    );
    black_box(
        ce.piece_backward_from_exps(black_box(&mut logits[..]), piece, t32, own, merged)
            .ok(),
    );

    // The reference.
    let z: &[f32] = black_box(&logits[..]);
    black_box(reference::forward(&ce, z, t32, black_box(&mut losses[..])).ok());
    black_box(
        reference::forward_backward(
            &ce,
            z,
            t32,
            black_box(&mut losses[..]),
            black_box(&mut grad[..]),
        )
        .ok(),
    );
    black_box(reference::forward_with(&ce, z, t(), black_box(&mut losses[..]), extras!()).ok());
    black_box(
        reference::forward_backward_with(
            &ce,
            z,
            t(),
            black_box(&mut losses[..]),
            black_box(&mut grad[..]),
            extras!(),
        )
        .ok(),
    );
    let smoothing = ce.smoothing_config();
    let row = black_box(&logits[..K]);
    black_box(
        reference::row(
            row,
            black_box(3),
            smoothing,
            Some(black_box(&mut grad64[..])),
        )
        .ok(),
    );
    black_box(reference::row(row, black_box(3), smoothing, None).ok());
    black_box(reference::agrees(
        black_box(1.0),
        black_box(1.0),
        reference::LOSS_TOLERANCE,
    ));

    // The small helpers.
    black_box(smoothing.coefficients(black_box(8), black_box(true)));
    black_box(t().rows(black_box(K)));
    black_box(ce.backend_config().resolve());
    black_box(ce.backend_config().is_available());

    loop {
        black_box(());
    }
}
