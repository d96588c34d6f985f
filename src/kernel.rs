//! The fused algorithm, written once over [`Vector`] and instantiated by every backend.
//!
//! Per row of `K` logits `z`, the kernel works on the transformed logits `t = f(z)` (`f` is the
//! logit scale `s z`, or the soft-cap `c tanh(s z / c)`, both increasing) and two strategies:
//!
//! * **Reload** (rows up to [`Vector::RELOAD_MAX`] elements and no soft-cap; the XNNPACK
//!   structure):
//!   pass 1 finds the max and min of `z`; pass 2 stores `e = exp(t - m)` into the output while
//!   summing `e`, `t - m` (and, with an auxiliary row `v` of class weights or target
//!   probabilities, `v (t - m)` and `v`); pass 3 turns the stored `e` into the gradient. One exp
//!   per element. Pass 2 is compute-bound, so it prefetches the next row's logits (see
//!   [`Ahead`]), which the next row's pass 1 would otherwise wait on memory for.
//! * **Recompute** (longer rows, soft-capped rows, and every forward-only call): statistics are
//!   gathered block by block (max of the block, then its sums while it is in L1) and merged
//!   exactly; the gradient pass recomputes `exp(t - m)`, and stores it non-temporally on rows of
//!   more than 2^22 elements. Two exps per element, but the row is read from memory
//!   twice and written once instead of read three times and written twice.
//!
//! * **Narrow** (rows of at most 32 classes with class targets, no class mask, no per-class
//!   weights and no soft-cap): whole groups of `LANES` rows in [`crate::narrow`], one row per
//!   lane; the rows it flags (non-finite values, over-wide ranges) come back here.
//!
//! Every loss option reduces to four per-row coefficients (see [`Coefficients`]):
//! `loss = A ln s + B (m - t_y) - C sum v (t - m) - D sum (t - m)` and
//! `dloss/dt_k = A' p_k - B [k = y] - C v_k - D`, with `A' = A + 2 lambda lse` for the z-loss.
//! Sums run in four independent vector accumulators and are flushed to f64 every
//! [`FLUSH_VECTORS`] vectors. The target's gradient is formed in f64 from `z_y`, never by cancellation.
//!
//! Rows with a `-inf` logit or a range so wide that `t - m` could overflow take the *careful*
//! variant: masked lanes are excluded by selects, the shifted sums are accumulated pre-scaled by
//! `2^-41` so they cannot overflow, and pass 2 stores `-1` (impossible for an exp) for masked
//! lanes so pass 3 can zero them. Rows with a class mask and neither take the *masked* variant:
//! the fast one, with the disallowed lanes left out of each sum by a select on the mask (an
//! opmask on AVX-512) and stored as `-1` too. On AVX-512, for rows of up to [`MASK_CLASSES`]
//! classes, the backend turns the mask into bits once per call ([`Job::class_bits`]): each pass
//! then reads a vector's opmask as one 16-bit word instead of converting 16 flags, the count of
//! allowed classes is taken once per call, and pass 2 stores the disallowed lanes' exps as they
//! come, for pass 3 to zero by the same bits.
//!
//! Each pass over a row is a loop driver ([`fold`], [`Io::map`]) running one [`Op`], and each
//! instantiation of a driver is a function of its own, compiled with the backend's target
//! features ([`Vector::outline`]). What a loop does not need is left out of it at compile time,
//! by type: the variant (`MODE`), the row beside ([`Side`]), the transform ([`Form`]) and
//! non-temporal stores (`STREAM`). Only an op's [`Seed`] crosses the call.

use core::marker::PhantomData;
use core::num::NonZeroUsize;

use crate::exp::exp_nonpositive;
use crate::narrow;
use crate::shard::{Piece, RowState};
use crate::tanh::tanh;
use crate::targets::Targets;
#[cfg(doc)]
use crate::vector::MASK_CLASSES;
use crate::vector::{MaskWords, Task, Vector};
use crate::Smoothing;

/// The elements the loop drivers take at a time (see [`Op::BLOCK`]), and the block of the
/// recompute strategy's two passes: a multiple of `4 * LANES` for every backend, and small enough
/// (16 KiB) to stay in L1 between the two passes.
pub(crate) const BLOCK: usize = 4096;

/// Vectors added into one set of four f32 accumulators before they are flushed into f64: about 16
/// additions per lane and accumulator (at most 18, in a last partial block), so that even a row of identical values (each addition rounding the same
/// way) keeps the sums within about 1e-6 relative.
const FLUSH_VECTORS: usize = 64;

/// Rows (or pieces) of more than 2^22 elements (16 MiB) store their out-of-place gradient with
/// non-temporal stores where the backend has them (AVX2, AVX-512), skipping the read for
/// ownership of every gradient line. Measured (BENCHMARKS.md, "Strategy switch"): a 2^24-element
/// row takes 15 ms with them and 20 ms without on AVX-512 (26 and 28 ms on AVX2); up to 2^22
/// elements they gain at most a few percent, and would evict a gradient that the caller's next
/// step could still find in the cache.
const STREAM_MIN: usize = (1 << 22) + 1;

/// Row ranges `max t - min t` above this take the careful variant (the fast variant's f32
/// accumulators could overflow past it: at most 128 elements land in one accumulator lane per
/// block).
pub(crate) const FAST_RANGE_MAX: f32 = 1e36;

/// [`SumExp`] variants. `FAST`: every lane allowed, the range within [`FAST_RANGE_MAX`].
const FAST: u8 = 0;
/// A class mask, the range of the whole row (disallowed lanes included) within
/// [`FAST_RANGE_MAX`] and no `-inf`: disallowed lanes are left out by selects on the mask.
const MASKED: u8 = 1;
/// Anything else (`-inf` logits, wide ranges): pre-scaled sums, every masked lane selected away.
const CAREFUL: u8 = 2;
/// `MASKED`, reading the mask from its bits (see [`Job::class_bits`]): the disallowed lanes'
/// exps are stored as they come, and the pass over the stored exps zeroes them by the bits.
const MASKED_BITS: u8 = 3;

/// The [`SumExp`] variant for a row (or block) with this transformed max and min (over its
/// allowed lanes).
fn sums_mode(max: f32, min: f32, mask: Option<&[bool]>) -> u8 {
    if needs_care(max, min) {
        CAREFUL
    } else if mask.is_some() {
        MASKED
    } else {
        FAST
    }
}

/// The shifted sums are accumulated times `2^-41` in the careful variant.
const CAREFUL_SCALE: f32 = 1.0 / (1_u64 << 41) as f32;
/// The inverse of [`CAREFUL_SCALE`].
const CAREFUL_UNSCALE: f64 = (1_u64 << 41) as f64;

/// How class weights apply.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Weights<'a> {
    /// No weights.
    None,
    /// PyTorch's `weight`: the smoothing term is weighted too.
    PerClass(&'a [f32]),
    /// Keras-style: each row's loss and gradient times its target's weight.
    PerTarget(&'a [f32]),
}

/// The logit transform `t = f(z)`: a scale, then optionally a soft-cap. Both are increasing, and
/// `-inf` (a masked class) stays `-inf`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Transform {
    /// `s > 0`, finite.
    pub scale: f32,
    /// `c > 0`, finite, if soft-capping.
    pub cap: Option<f32>,
}

impl Transform {
    /// `f(z)` in f64 (exact for the scale alone).
    pub(crate) fn scalar(self, z: f32) -> f64 {
        if z == f32::NEG_INFINITY {
            return f64::NEG_INFINITY;
        }
        let scaled = f64::from(self.scale) * f64::from(z);
        match self.cap {
            Some(c) => f64::from(c) * libm::tanh(scaled / f64::from(c)),
            // The scaled logit in f32, as the kernels form it (and as a framework scaling an f32
            // tensor would): `s z` rounded once, `+-inf` beyond the f32 range.
            None => f64::from(scaled as f32),
        }
    }

    /// `f'(z)` in f64.
    pub(crate) fn derivative(self, z: f32) -> f64 {
        let s = f64::from(self.scale);
        match self.cap {
            Some(c) => {
                let th = libm::tanh(s * f64::from(z) / f64::from(c));
                s * (1.0 - th * th)
            }
            None => s,
        }
    }
}

/// A class mask as bits, built by a backend for one call (see [`Job::class_bits`]).
#[derive(Clone, Copy)]
pub(crate) struct MaskBits<'a> {
    /// The bits (see [`Vector::allowed_bits`]).
    pub words: &'a MaskWords,
    /// The allowed classes among the whole vectors of a row, for the backend that built the bits
    /// (its first `K - K % LANES` classes): the masked variant's count, taken once per call.
    pub whole_allowed: u64,
}

/// One batch call, with every argument already checked.
#[derive(Clone, Copy)]
pub(crate) struct Job<'a> {
    /// `K`.
    pub classes: NonZeroUsize,
    /// The smoothing, with `eps` in `[0, 1]`.
    pub smoothing: Smoothing,
    /// Rows with this target are ignored.
    pub ignore_index: Option<i64>,
    /// Factor applied to every gradient element: the upstream scalar, over `D` for the mean.
    pub grad_scale: f64,
    /// What the summed loss is divided by (`D` for the mean, else 1).
    pub denominator: f64,
    /// Logit scale and soft-cap.
    pub transform: Transform,
    /// z-loss coefficient `lambda >= 0`.
    pub z_loss: f64,
    /// Class weights.
    pub weights: Weights<'a>,
    /// `true` for every allowed class, if a class mask is set.
    pub class_mask: Option<&'a [bool]>,
    /// The same class mask as bits (see [`Vector::allowed_bits`]), when the backend built them
    /// for this call (AVX-512, which reads an opmask straight from them): the row kernel's
    /// masked variant then spends no instruction turning flags into a mask.
    pub class_bits: Option<MaskBits<'a>>,
    /// Per-row upstream gradient scales (reduction `None`).
    pub row_scales: Option<&'a [f32]>,
    /// Whether per-row correctness is wanted (it costs a scan for soft targets).
    pub want_correct: bool,
    /// What the caller reads after this call ([`crate::CrossEntropy::read_ahead`]): the last
    /// row prefetches it where the other rows prefetch the next row.
    pub after: Ahead,
}

impl Job<'_> {
    /// The reduced loss from the sum of row losses.
    pub(crate) fn finish(&self, total: f64) -> f32 {
        if self.denominator == 0.0 {
            0.0
        } else {
            (total / self.denominator) as f32
        }
    }

    /// Row `row`'s target, or `None` for an ignored row.
    pub(crate) fn row_target<'t>(
        &self,
        targets: &Targets<'t>,
        row: usize,
    ) -> Option<RowTarget<'t>> {
        if let Some(probabilities) = targets.soft_row(row, self.classes.get()) {
            return Some(RowTarget::Soft(probabilities));
        }
        let class = targets.class(row)?;
        if Some(class) == self.ignore_index {
            return None;
        }
        usize::try_from(class).ok().map(RowTarget::Class)
    }
}

/// The target of one non-ignored row.
#[derive(Clone, Copy)]
pub(crate) enum RowTarget<'t> {
    Class(usize),
    Soft(&'t [f32]),
}

/// Where a batch reads logits and writes gradients.
pub(crate) enum Buffers<'a> {
    /// Loss only.
    Forward {
        /// `[N, K]` logits.
        logits: &'a [f32],
    },
    /// Gradient into a separate buffer.
    Separate {
        /// `[N, K]` logits.
        logits: &'a [f32],
        /// `[N, K]` gradient.
        grad: &'a mut [f32],
    },
    /// Gradient over the logits.
    InPlace {
        /// `[N, K]` logits, overwritten by the gradient.
        logits: &'a mut [f32],
    },
    /// The states of one piece `[N, width]` of the rows.
    PieceStates {
        /// `[N, width]` logits of the piece.
        logits: &'a [f32],
        /// Where the piece sits.
        piece: Piece,
        /// One state per row.
        states: &'a mut [RowState],
    },
    /// Losses from merged states.
    Finish {
        /// One merged state per row.
        states: &'a [RowState],
    },
    /// The states of one piece, storing each row's exps relative to the piece's own max into a
    /// separate buffer or over the logits.
    PieceExps {
        /// `[N, width]` logits of the piece, and where the exps go.
        logits: Io<'a>,
        /// Where the piece sits.
        piece: Piece,
        /// One state per row.
        states: &'a mut [RowState],
    },
    /// The gradient of one piece from merged states: recomputed from its logits, or, given the
    /// piece's `own` states, rescaled from the exps `PieceExps` stored (`logits` then holds them).
    PieceGradient {
        /// `[N, width]` logits (or stored exps) of the piece, and where the gradient goes.
        logits: Io<'a>,
        /// Where the piece sits.
        piece: Piece,
        /// One merged state per row.
        merged: &'a [RowState],
        /// The piece's own states, one per row, for stored exps.
        own: Option<&'a [RowState]>,
    },
}

/// Per-row outputs of a batch; lengths already checked.
pub(crate) struct Outputs<'o> {
    pub losses: &'o mut [f32],
    pub lse: Option<&'o mut [f32]>,
    pub z_loss: Option<&'o mut [f32]>,
    pub correct: Option<&'o mut [bool]>,
}

/// Sums over a batch.
#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct Totals {
    /// Sum of row losses (z-loss included).
    pub loss: f64,
    /// Sum of the z-loss parts.
    pub z_loss: f64,
    /// Non-ignored rows whose target attains the max.
    pub correct: u64,
}

/// What one row contributes.
#[derive(Clone, Copy, Default)]
pub(crate) struct RowResult {
    pub loss: f64,
    pub z_loss: f64,
    pub lse: f64,
    pub correct: bool,
}

impl RowResult {
    const NAN: RowResult = RowResult {
        loss: f64::NAN,
        z_loss: f64::NAN,
        lse: f64::NAN,
        correct: false,
    };
}

/// Runs a whole batch.
#[inline(always)]
pub(crate) fn run<V: RowKernels>(
    job: &Job<'_>,
    targets: Targets<'_>,
    buffers: Buffers<'_>,
    mut out: Outputs<'_>,
) -> Totals {
    let mut totals = Totals::default();
    let mut record = |row: usize, r: RowResult| {
        if let Some(slot) = out.losses.get_mut(row) {
            *slot = r.loss as f32;
        }
        if let Some(slot) = out.lse.as_deref_mut().and_then(|s| s.get_mut(row)) {
            *slot = r.lse as f32;
        }
        if let Some(slot) = out.z_loss.as_deref_mut().and_then(|s| s.get_mut(row)) {
            *slot = r.z_loss as f32;
        }
        if let Some(slot) = out.correct.as_deref_mut().and_then(|s| s.get_mut(row)) {
            *slot = r.correct;
        }
        totals.loss += r.loss;
        totals.z_loss += r.z_loss;
        totals.correct += u64::from(r.correct);
    };
    match buffers {
        Buffers::Forward { logits } => forward_batch::<V>(job, &targets, logits, &mut record),
        Buffers::Separate { logits, grad } => {
            let rows = Rows::Separate {
                logits,
                grad,
                width: job.classes,
            };
            gradient_batch::<V>(job, &targets, rows, &mut record);
        }
        Buffers::InPlace { logits } => {
            let rows = Rows::InPlace {
                logits,
                width: job.classes,
            };
            gradient_batch::<V>(job, &targets, rows, &mut record);
        }
        Buffers::Finish { states } => {
            for (row, state) in states.iter().enumerate() {
                let result = match job.row_target(&targets, row) {
                    Some(target) => {
                        row_result(job, &state.stats, target, state.target_logit, false, None)
                    }
                    None => RowResult::default(),
                };
                record(row, result);
            }
        }
        pieces => run_pieces::<V>(job, &targets, pieces),
    }
    totals
}

/// The piece calls of [`run`] (no per-row outputs).
#[inline(always)]
fn run_pieces<V: RowKernels>(job: &Job<'_>, targets: &Targets<'_>, buffers: Buffers<'_>) {
    let targets = *targets;
    match buffers {
        Buffers::PieceStates {
            logits,
            piece,
            states,
        } => match NonZeroUsize::new(piece.width) {
            None => states.fill(RowState::EMPTY),
            Some(width) => {
                for (row, ((z, next), state)) in split_rows(logits, width).zip(states).enumerate() {
                    *state = match job.row_target(&targets, row) {
                        Some(target) => piece_state::<V>(job, z, next, piece, target),
                        None => RowState::EMPTY,
                    };
                }
            }
        },
        Buffers::PieceExps {
            logits,
            piece,
            states,
        } => match NonZeroUsize::new(piece.width) {
            None => states.fill(RowState::EMPTY),
            Some(width) => {
                let mut rows = logits.rows(width);
                for (row, state) in states.iter_mut().enumerate() {
                    let Some(io) = rows.next() else {
                        break;
                    };
                    let next = rows.ahead().or(job.after, width);
                    *state = V::piece_exps(job, io, piece, job.row_target(&targets, row), next);
                }
            }
        },
        Buffers::PieceGradient {
            logits,
            piece,
            merged,
            own,
        } => {
            if let Some(width) = NonZeroUsize::new(piece.width) {
                piece_gradients::<V>(job, &targets, logits.rows(width), piece, merged, own);
            }
        }
        Buffers::Forward { .. }
        | Buffers::Separate { .. }
        | Buffers::InPlace { .. }
        | Buffers::Finish { .. } => {}
    }
}

/// A backend's row kernels, each compiled once, out of line, with the backend's target features
/// (see `arch::row_kernels!`): inlining them into every call site of the batch loop multiplied the
/// compile time without making anything faster (a call per row costs nanoseconds).
pub(crate) trait RowKernels: Vector {
    /// [`stats_inline`] for this backend.
    fn stats(
        z: &[f32],
        next: Ahead,
        transform: Transform,
        aux: Option<&[f32]>,
        mask: Option<&[bool]>,
    ) -> Stats;
    /// [`narrow::narrow_group`] for this backend.
    fn narrow_group(
        job: &Job<'_>,
        targets: &Targets<'_>,
        group: &mut narrow::Group<'_>,
        first_row: usize,
        results: &mut narrow::GroupResults,
    );
    /// [`gradient_row`] for this backend.
    fn gradient_row(
        job: &Job<'_>,
        io: Io<'_>,
        target: Option<RowTarget<'_>>,
        row: usize,
        next: Ahead,
    ) -> RowResult;
    /// [`piece_gradient`] for this backend.
    fn piece_gradient(
        job: &Job<'_>,
        io: Io<'_>,
        piece: Piece,
        target: Option<RowTarget<'_>>,
        state: &RowState,
        own: Option<&RowState>,
        row: usize,
    );
    /// [`piece_exps`] for this backend.
    fn piece_exps(
        job: &Job<'_>,
        io: Io<'_>,
        piece: Piece,
        target: Option<RowTarget<'_>>,
        next: Ahead,
    ) -> RowState;
}

/// The rows of a gradient call as [`Io`]s, whichever the buffer layout: one loop over the rows for
/// both layouts.
///
/// Split off row by row with `split_at_checked` rather than zipped `chunks_exact`: `Zip::new`
/// divides by the chunk size out of line, where the optimiser no longer sees that it is not zero,
/// and the Cortex-M link probe finds the division's panic.
enum Rows<'a> {
    Separate {
        logits: &'a [f32],
        grad: &'a mut [f32],
        width: NonZeroUsize,
    },
    InPlace {
        logits: &'a mut [f32],
        width: NonZeroUsize,
    },
}

impl<'a> Rows<'a> {
    /// The first `count` rows (all of them if there are fewer) as one span of
    /// `count * width` elements, and the rows after it.
    fn split_span(self, count: usize) -> (Option<Io<'a>>, Rows<'a>) {
        match self {
            Rows::Separate {
                logits,
                grad,
                width,
            } => {
                let at = count.saturating_mul(width.get()).min(logits.len());
                match (logits.split_at_checked(at), grad.split_at_mut_checked(at)) {
                    (Some((z, z_rest)), Some((g, g_rest))) => (
                        Some(Io::Separate(z, g)),
                        Rows::Separate {
                            logits: z_rest,
                            grad: g_rest,
                            width,
                        },
                    ),
                    _ => (
                        None,
                        Rows::InPlace {
                            logits: &mut [],
                            width,
                        },
                    ),
                }
            }
            Rows::InPlace { logits, width } => {
                let at = count.saturating_mul(width.get()).min(logits.len());
                match logits.split_at_mut_checked(at) {
                    Some((z, rest)) => (
                        Some(Io::InPlace(z)),
                        Rows::InPlace {
                            logits: rest,
                            width,
                        },
                    ),
                    None => (
                        None,
                        Rows::InPlace {
                            logits: &mut [],
                            width,
                        },
                    ),
                }
            }
        }
    }

    /// The source of the next row, to prefetch: an address range, so that it can name a row
    /// that is still to be borrowed mutably (in place).
    fn ahead(&self) -> Ahead {
        let (start, len, width) = match self {
            Rows::Separate { logits, width, .. } => (logits.as_ptr(), logits.len(), width),
            Rows::InPlace { logits, width } => (logits.as_ptr(), logits.len(), width),
        };
        Ahead {
            start,
            len: len.min(width.get()),
        }
    }

    /// The number of whole rows.
    fn len_rows(&self) -> usize {
        match self {
            Rows::Separate { logits, width, .. } => logits.len() / width.get(),
            Rows::InPlace { logits, width } => logits.len() / width.get(),
        }
    }
}

impl<'a> Iterator for Rows<'a> {
    type Item = Io<'a>;

    fn next(&mut self) -> Option<Io<'a>> {
        match self {
            Rows::Separate {
                logits,
                grad,
                width,
            } => {
                let (z, z_rest) = logits.split_at_checked(width.get())?;
                let (g, g_rest) = core::mem::take(grad).split_at_mut_checked(width.get())?;
                *logits = z_rest;
                *grad = g_rest;
                Some(Io::Separate(z, g))
            }
            Rows::InPlace { logits, width } => {
                let (z, rest) = core::mem::take(logits).split_at_mut_checked(width.get())?;
                *logits = rest;
                Some(Io::InPlace(z))
            }
        }
    }
}

/// The rows of `logits`, `width` elements each (a last partial row is left out).
fn split_rows(logits: &[f32], width: NonZeroUsize) -> impl Iterator<Item = (&[f32], &[f32])> {
    let mut rest = logits;
    core::iter::from_fn(move || {
        let (row, tail) = rest.split_at_checked(width.get())?;
        rest = tail;
        Some((row, tail))
    })
}

/// Loss and gradient of every row; the first is row `first` of the batch.
#[inline(always)]
fn gradient_rows<V: RowKernels>(
    job: &Job<'_>,
    targets: &Targets<'_>,
    rows: Rows<'_>,
    first: usize,
    record: &mut impl FnMut(usize, RowResult),
) {
    let mut rows = rows;
    let mut row = first;
    while let Some(io) = rows.next() {
        let target = job.row_target(targets, row);
        // The next row is fetched while this one's exps are computed.
        let next = rows.ahead().or(job.after, job.classes);
        record(row, V::gradient_row(job, io, target, row, next));
        row += 1;
    }
}

/// Loss of every row of `logits`; the first is row `first` of the batch.
#[inline(always)]
fn forward_rows<V: RowKernels>(
    job: &Job<'_>,
    targets: &Targets<'_>,
    logits: &[f32],
    first: usize,
    record: &mut impl FnMut(usize, RowResult),
) {
    for (row, (z, next)) in (first..).zip(split_rows(logits, job.classes)) {
        let result = match job.row_target(targets, row) {
            Some(target) => forward_row::<V>(job, z, Ahead::of(next), target),
            None => RowResult::default(),
        };
        record(row, result);
    }
}

/// The number of elements in a group of `V::LANES` rows, if the narrow kernel takes this batch.
fn narrow_span<V: Vector>(job: &Job<'_>, targets: &Targets<'_>) -> Option<NonZeroUsize> {
    if narrow::applies(job, targets) {
        job.classes.checked_mul(NonZeroUsize::new(V::LANES)?)
    } else {
        None
    }
}

/// Records the first `rows` results of a narrow group whose first row is `first`, if the group
/// flagged none of its rows for the row kernel; `false`, recording nothing, if it did.
fn record_unflagged(
    results: &narrow::GroupResults,
    rows: usize,
    first: usize,
    record: &mut impl FnMut(usize, RowResult),
) -> bool {
    if results.any_fallback() {
        return false;
    }
    for (row, &result) in (first..).zip(results.rows.iter().take(rows)) {
        record(row, result);
    }
    true
}

/// Lane `lane`'s result in a narrow group, unless it is flagged for the row kernel.
fn lane_result(results: &narrow::GroupResults, lane: usize) -> Option<RowResult> {
    match (results.rows.get(lane), results.fallback.get(lane)) {
        (Some(&result), Some(false)) => Some(result),
        _ => None,
    }
}

/// Loss of every row: groups of `V::LANES` rows through the narrow kernel where it applies (the
/// last, partial group copied into a buffer padded with ignored rows); the rest, and the rows it
/// flags, through the row kernel.
#[inline(always)]
fn forward_batch<V: RowKernels>(
    job: &Job<'_>,
    targets: &Targets<'_>,
    logits: &[f32],
    record: &mut impl FnMut(usize, RowResult),
) {
    let Some(span) = narrow_span::<V>(job, targets) else {
        forward_rows::<V>(job, targets, logits, 0, record);
        return;
    };
    let mut results = narrow::GroupResults::default();
    let mut groups = logits.chunks_exact(span.get());
    let mut first = 0;
    for rows in groups.by_ref() {
        forward_group::<V>(job, targets, rows, rows, first, &mut results, record);
        first += V::LANES;
    }
    // The last, partial group, through a buffer padded with ignored rows.
    let rest = groups.remainder();
    if rest.is_empty() {
        return;
    }
    let mut pad = [0.0_f32; narrow::NARROW_MAX * narrow::MAX_LANES];
    if let Some(pad) = pad.get_mut(..span.get()) {
        for (p, &z) in pad.iter_mut().zip(rest) {
            *p = z;
        }
        forward_group::<V>(job, targets, pad, rest, first, &mut results, record);
    }
}

/// The losses of one narrow group, read from `group` (the rows `rows`, padded with ignored rows
/// if they are fewer than `V::LANES`), the first being row `first`; the rows it flags through
/// the row kernel.
#[inline(always)]
fn forward_group<V: RowKernels>(
    job: &Job<'_>,
    targets: &Targets<'_>,
    group: &[f32],
    rows: &[f32],
    first: usize,
    results: &mut narrow::GroupResults,
    record: &mut impl FnMut(usize, RowResult),
) {
    let k = job.classes;
    V::narrow_group(
        job,
        targets,
        &mut narrow::Group::Forward(group),
        first,
        results,
    );
    if record_unflagged(results, rows.len() / k.get(), first, record) {
        return;
    }
    for (lane, (z, next)) in split_rows(rows, k).enumerate() {
        let row = first + lane;
        let result = match (lane_result(results, lane), job.row_target(targets, row)) {
            (Some(result), _) => result,
            (None, Some(target)) => forward_row::<V>(job, z, Ahead::of(next), target),
            (None, None) => RowResult::default(),
        };
        record(row, result);
    }
}

/// Loss and gradient of every row, grouped as in [`forward_batch`].
#[inline(always)]
fn gradient_batch<V: RowKernels>(
    job: &Job<'_>,
    targets: &Targets<'_>,
    rows: Rows<'_>,
    record: &mut impl FnMut(usize, RowResult),
) {
    let Some(span) = narrow_span::<V>(job, targets) else {
        gradient_rows::<V>(job, targets, rows, 0, record);
        return;
    };
    let count = rows.len_rows();
    let whole = count - count % V::LANES;
    let (groups, rest) = rows.split_span(whole);
    let mut results = narrow::GroupResults::default();
    let mut first = 0;
    for io in groups.into_iter().flat_map(|io| io.rows(span)) {
        let mut group = narrow::Group::Gradient(io);
        V::narrow_group(job, targets, &mut group, first, &mut results);
        if let narrow::Group::Gradient(io) = group {
            narrow_fallback::<V>(job, targets, io, &results, first, record);
        }
        first += V::LANES;
    }
    // The last, partial group, through a buffer padded with ignored rows.
    let (Some(mut io), _) = rest.split_span(V::LANES) else {
        return;
    };
    let len = io.src().len();
    if len == 0 {
        return;
    }
    let mut pad = [0.0_f32; narrow::NARROW_MAX * narrow::MAX_LANES];
    let Some(pad) = pad.get_mut(..span.get()) else {
        return;
    };
    for (p, &z) in pad.iter_mut().zip(io.src()) {
        *p = z;
    }
    V::narrow_group(
        job,
        targets,
        &mut narrow::Group::Gradient(Io::InPlace(pad)),
        first,
        &mut results,
    );
    for (g, &p) in io.out().iter_mut().zip(pad.iter().take(len)) {
        *g = p;
    }
    narrow_fallback::<V>(job, targets, io, &results, first, record);
}

/// Records a narrow group's results, running the row kernel on the rows it flagged (their
/// logits intact: the narrow kernel wrote nothing into them).
#[inline(always)]
fn narrow_fallback<V: RowKernels>(
    job: &Job<'_>,
    targets: &Targets<'_>,
    io: Io<'_>,
    results: &narrow::GroupResults,
    first: usize,
    record: &mut impl FnMut(usize, RowResult),
) {
    if record_unflagged(results, io.src().len() / job.classes.get(), first, record) {
        return;
    }
    for (lane, row_io) in io.rows(job.classes).enumerate() {
        let row = first + lane;
        let result = match lane_result(results, lane) {
            Some(result) => result,
            None => V::gradient_row(job, row_io, job.row_target(targets, row), row, Ahead::NONE),
        };
        record(row, result);
    }
}

/// The gradient of one piece of every row.
#[inline(always)]
fn piece_gradients<V: RowKernels>(
    job: &Job<'_>,
    targets: &Targets<'_>,
    rows: Rows<'_>,
    piece: Piece,
    states: &[RowState],
    own: Option<&[RowState]>,
) {
    for (row, (io, state)) in rows.zip(states).enumerate() {
        let target = job.row_target(targets, row);
        let own = own.and_then(|own| own.get(row));
        V::piece_gradient(job, io, piece, target, state, own, row);
    }
}

/// The per-class inputs of a piece of a row: its slices of the auxiliary row (class weights with
/// PyTorch semantics, or the row's target probabilities) and of the class mask.
fn piece_inputs<'a>(
    job: &Job<'a>,
    piece: Piece,
    target: RowTarget<'a>,
) -> (Option<&'a [f32]>, Option<&'a [bool]>) {
    let range = piece.offset..piece.offset.saturating_add(piece.width);
    let aux = aux_row(job, target).map(|a| a.get(range.clone()).unwrap_or(&[]));
    (aux, job.class_mask.map(|m| m.get(range).unwrap_or(&[])))
}

/// The target's logit, if `piece` holds the target class (class targets only).
fn piece_target_logit(z: &[f32], piece: Piece, target: RowTarget<'_>) -> Option<f32> {
    match target {
        RowTarget::Class(y) => y
            .checked_sub(piece.offset)
            .and_then(|local| z.get(local).copied()),
        RowTarget::Soft(_) => None,
    }
}

/// The state of one piece of a row.
#[inline(always)]
fn piece_state<V: RowKernels>(
    job: &Job<'_>,
    z: &[f32],
    next: &[f32],
    piece: Piece,
    target: RowTarget<'_>,
) -> RowState {
    let (aux, mask) = piece_inputs(job, piece, target);
    RowState {
        stats: V::stats(z, Ahead::of(next), job.transform, aux, mask),
        target_logit: piece_target_logit(z, piece, target),
    }
}

/// The state of one piece of a row, its exps relative to the piece's own max stored into the
/// destination of `io` (masked lanes and all-masked pieces hold the marker `-1`; ignored rows
/// zeros): the first half of the reload strategy of [`gradient_row`].
#[inline(always)]
pub(crate) fn piece_exps<V: RowKernels>(
    job: &Job<'_>,
    mut io: Io<'_>,
    piece: Piece,
    target: Option<RowTarget<'_>>,
    next: Ahead,
) -> RowState {
    let Some(target) = target else {
        io.fill(0.0);
        return RowState::EMPTY;
    };
    // The API refuses a soft-cap here (stored exps could not carry its chain factor), and
    // `sums_map` compiles its loops without one: a row with one never gets there.
    if job.transform.cap.is_some() {
        io.fill(f32::NAN);
        return RowState {
            stats: Stats {
                invalid: true,
                ..Stats::EMPTY
            },
            target_logit: None,
        };
    }
    let transform = job.transform;
    let (aux, mask) = piece_inputs(job, piece, target);
    let z = io.src();
    let target_logit = piece_target_logit(z, piece, target);
    let (zmax, zmin) = max_min::<V, false>(z, mask, None);
    let (m, tmin) = (
        transform_f32(transform, zmax),
        transform_f32(transform, zmin),
    );
    let stats = if let Some(stats) = degenerate(zmax, m, z, mask, aux) {
        io.fill(-1.0);
        stats
    } else {
        let lanes = Lanes::new(m, transform, mask);
        match sums_mode(m, tmin, mask) {
            CAREFUL => sums_map::<V, CAREFUL>(&mut io, m, lanes, aux, next),
            MASKED => sums_map::<V, MASKED>(&mut io, m, lanes, aux, next),
            _ => sums_map::<V, FAST>(&mut io, m, lanes, aux, next),
        }
    };
    RowState {
        stats,
        target_logit,
    }
}

/// The gradient of one piece of a row from the row's merged state: recomputed from the logits,
/// or, given the piece's `own` state, rescaled from the exps [`piece_exps`] stored.
#[inline(always)]
pub(crate) fn piece_gradient<V: RowKernels>(
    job: &Job<'_>,
    mut io: Io<'_>,
    piece: Piece,
    target: Option<RowTarget<'_>>,
    state: &RowState,
    own: Option<&RowState>,
    row: usize,
) {
    let Some(target) = target else {
        io.fill(0.0);
        return;
    };
    let (aux, mask) = piece_inputs(job, piece, target);
    let target_index = match target {
        RowTarget::Class(y) => y.checked_sub(piece.offset).filter(|&i| i < piece.width),
        RowTarget::Soft(_) => None,
    };
    let piece = PieceInputs {
        target_index,
        aux,
        mask,
        bits: None,
    };
    // The stored exps are relative to the piece's max: rebased to the row's by one factor.
    let stored = own.map(|own| {
        if own.stats.allowed == 0 {
            0.0
        } else {
            exp_shift(f64::from(own.stats.max) - f64::from(state.stats.max))
        }
    });
    write_gradient::<V>(
        job,
        &mut io,
        &state.stats,
        target,
        state.target_logit,
        false,
        None,
        row,
        stored,
        piece,
    );
}

/// The source and destination of one row, or of a span of rows (a group, a piece's `[N, width]`
/// block).
pub(crate) enum Io<'r> {
    /// Input kept, output into the second slice.
    Separate(&'r [f32], &'r mut [f32]),
    /// Input overwritten by the output.
    InPlace(&'r mut [f32]),
}

impl<'a> Io<'a> {
    pub(crate) fn src(&self) -> &[f32] {
        match self {
            Io::Separate(z, _) => z,
            Io::InPlace(z) => z,
        }
    }

    fn fill(&mut self, value: f32) {
        match self {
            Io::Separate(_, g) => g.fill(value),
            Io::InPlace(z) => z.fill(value),
        }
    }

    /// Applies the op `seed` starts to the source, storing into the destination (with
    /// non-temporal stores if `STREAM` and the destination is a separate buffer), in a function
    /// of its own (see [`Vector::outline`]).
    #[inline(always)]
    fn map<V: Vector, D: Seed<V>, const STREAM: bool>(
        &mut self,
        side: <D::Op as Op<V>>::Side,
        tail_fill: f32,
        seed: D,
    ) -> D::Output {
        match self {
            Io::Separate(z, g) => V::outline(Loop::<_, _, _, STREAM> {
                io: IntoIo(z, g),
                side,
                tail_fill,
                seed,
            }),
            // In place never streams (see `write_gradient`): no streaming copy of these loops.
            Io::InPlace(z) => V::outline(Loop::<_, _, _, false> {
                io: InPlaceIo(z),
                side,
                tail_fill,
                seed,
            }),
        }
    }

    /// [`Io::map`] with `stream` known only at run time: one branch per row, not per store.
    #[inline(always)]
    fn map_stream<V: Vector, D: Seed<V>>(
        &mut self,
        side: <D::Op as Op<V>>::Side,
        tail_fill: f32,
        seed: D,
        stream: bool,
    ) -> D::Output {
        if stream {
            self.map::<V, D, true>(side, tail_fill, seed)
        } else {
            self.map::<V, D, false>(side, tail_fill, seed)
        }
    }

    /// Applies the op `seed` starts to the destination in place, in a function of its own.
    #[inline(always)]
    fn map_out<V: Vector, D: Seed<V>>(
        &mut self,
        side: <D::Op as Op<V>>::Side,
        tail_fill: f32,
        seed: D,
    ) -> D::Output {
        V::outline(Loop::<_, _, _, false> {
            io: InPlaceIo(self.out()),
            side,
            tail_fill,
            seed,
        })
    }

    /// The destination.
    pub(crate) fn out(&mut self) -> &mut [f32] {
        match self {
            Io::Separate(_, g) => g,
            Io::InPlace(z) => z,
        }
    }

    /// The rows of `width` elements that this span holds.
    fn rows(self, width: NonZeroUsize) -> Rows<'a> {
        match self {
            Io::Separate(logits, grad) => Rows::Separate {
                logits,
                grad,
                width,
            },
            Io::InPlace(logits) => Rows::InPlace { logits, width },
        }
    }

    fn get_out(&self, index: usize) -> Option<f32> {
        match self {
            Io::Separate(_, g) => g.get(index).copied(),
            Io::InPlace(z) => z.get(index).copied(),
        }
    }

    fn set_out(&mut self, index: usize, value: f32) {
        let slot = match self {
            Io::Separate(_, g) => g.get_mut(index),
            Io::InPlace(z) => z.get_mut(index),
        };
        if let Some(slot) = slot {
            *slot = value;
        }
    }
}

/// A lane-wise operation over a row, with state (accumulators) of its own.
pub(crate) trait Op<V: Vector> {
    /// What the op reads beside the row: [`NoSide`], or the auxiliary row ([`AuxSide`]).
    type Side: Side<V>;
    /// Processes the whole vector starting at element `offset` of the row, using accumulator
    /// `slot` (0..4); returns what to store.
    /// `v` is the [`Side`] row's vector at the same offset (zero without one).
    fn apply(&mut self, slot: usize, offset: usize, z: V, v: V) -> V;
    /// Processes the last, partial vector (padding lanes hold the tail fill value; `v`'s are 0).
    #[inline(always)]
    fn apply_tail(&mut self, offset: usize, z: V, v: V) -> V {
        self.apply(3, offset, z, v)
    }
    /// Elements between two calls of [`Op::end_block`]: a multiple of `4 * LANES` that divides
    /// [`BLOCK`].
    const BLOCK: usize = BLOCK;
    /// Called after every [`Op::BLOCK`] elements and at the end.
    #[inline(always)]
    fn end_block(&mut self) {}
}

/// The op `seed` starts over `src`, block by block, four vectors at a time, results ignored; in a
/// function of its own (see [`Vector::outline`]).
#[inline(always)]
fn fold<V: Vector, D: Seed<V>>(src: &[f32], side: <D::Op as Op<V>>::Side, seed: D) -> D::Output {
    V::outline(Loop::<_, _, _, false> {
        io: FoldIo(src),
        side,
        tail_fill: f32::NEG_INFINITY,
        seed,
    })
}

/// An [`Op`]'s inputs, from which the function of its loop builds it, and the result that
/// function gives back. Only these cross the call (see [`Vector::outline`]), never the op's
/// accumulators: copied in and out through the stack, they cost more than the loop over a row
/// of a thousand logits.
pub(crate) trait Seed<V: Vector>: Copy {
    /// The op.
    type Op: Op<V>;
    /// What the loop's function returns.
    type Output;
    /// The op, with its accumulators zero.
    fn start(self) -> Self::Op;
    /// The result, from the op after the loop.
    fn finish(op: &Self::Op) -> Self::Output;
}

/// A loop driver's call as a [`Task`]: `I` its buffers ([`FoldIo`], [`IntoIo`] or
/// [`InPlaceIo`], one function each), `STREAM` whether it stores non-temporally (a constant: a
/// flag would be a test on every store), `D` the seed of its op.
struct Loop<I, D, S, const STREAM: bool> {
    io: I,
    side: S,
    tail_fill: f32,
    seed: D,
}

/// [`fold_inline`] over a row.
struct FoldIo<'s>(&'s [f32]);
/// [`map_into`] from a row into a buffer.
struct IntoIo<'s>(&'s [f32], &'s mut [f32]);
/// [`map_in_place`] over a row.
struct InPlaceIo<'s>(&'s mut [f32]);

/// The buffers of a [`Loop`], which pick its driver.
trait LoopIo<V: Vector> {
    /// Runs the driver of these buffers with `op` (`stream`: non-temporal stores, where the
    /// driver stores).
    fn drive<O: Op<V>>(self, side: O::Side, tail_fill: f32, op: &mut O, stream: bool);
}

impl<V: Vector> LoopIo<V> for FoldIo<'_> {
    #[inline(always)]
    fn drive<O: Op<V>>(self, side: O::Side, tail_fill: f32, op: &mut O, _stream: bool) {
        fold_inline(self.0, side, tail_fill, op);
    }
}

impl<V: Vector> LoopIo<V> for IntoIo<'_> {
    #[inline(always)]
    fn drive<O: Op<V>>(self, side: O::Side, tail_fill: f32, op: &mut O, stream: bool) {
        map_into(self.0, self.1, side, tail_fill, op, stream);
    }
}

impl<V: Vector> LoopIo<V> for InPlaceIo<'_> {
    #[inline(always)]
    fn drive<O: Op<V>>(self, side: O::Side, tail_fill: f32, op: &mut O, stream: bool) {
        map_in_place(self.0, side, tail_fill, op, stream);
    }
}

impl<V: Vector, I: LoopIo<V>, D: Seed<V>, S: Side<V>, const STREAM: bool> Task<V>
    for Loop<I, D, S, STREAM>
where
    D::Op: Op<V, Side = S>,
{
    type Output = D::Output;

    #[inline(always)]
    fn run(self) -> D::Output {
        let mut op = self.seed.start();
        self.io.drive(self.side, self.tail_fill, &mut op, STREAM);
        D::finish(&op)
    }
}

/// [`fold`]'s loop, inlined.
#[inline(always)]
fn fold_inline<V: Vector, O: Op<V>>(src: &[f32], mut side: O::Side, tail_fill: f32, op: &mut O) {
    let mut offset = 0;
    for block in src.chunks(O::BLOCK) {
        let s = side.take(block.len());
        let (arrays, tail) = V::split(block);
        let (quads, rest) = arrays.as_chunks::<4>();
        for (i, [a, b, c, d]) in quads.iter().enumerate() {
            let [va, vb, vc, vd] = s.quad(i);
            op.apply(0, offset, V::load(a), va);
            op.apply(1, offset + V::LANES, V::load(b), vb);
            op.apply(2, offset + 2 * V::LANES, V::load(c), vc);
            op.apply(3, offset + 3 * V::LANES, V::load(d), vd);
            offset += 4 * V::LANES;
        }
        // A constant slot: a run-time index would force the accumulators out of registers.
        for (j, a) in rest.iter().enumerate() {
            op.apply(0, offset, V::load(a), s.single(j));
            offset += V::LANES;
        }
        if !tail.is_empty() {
            op.apply_tail(offset, V::load_tail(tail, tail_fill), s.tail());
            offset += tail.len();
        }
        op.end_block();
    }
}

/// With `stream`, the number of leading elements of `dst` to store before the first address
/// aligned for [`Vector::stream`] (fewer than a vector); else 0.
#[inline(always)]
fn stream_head<V: Vector>(dst: &[f32], stream: bool) -> usize {
    if !stream {
        return 0;
    }
    let head = dst.as_ptr().align_offset(V::STREAM_ALIGN);
    if head < V::LANES && head <= dst.len() {
        head
    } else {
        0
    }
}

/// Stores a whole vector, non-temporally if `stream`.
#[inline(always)]
fn put<V: Vector>(v: V, a: &mut V::Array, stream: bool) {
    if stream {
        v.stream(a);
    } else {
        v.store(a);
    }
}

/// `op` over `src`, results stored into `dst` (same length); with `stream`, the first few
/// elements go through the tail path so that the whole vectors are aligned for non-temporal
/// stores.
#[inline(always)]
fn map_into<V: Vector, O: Op<V>>(
    src: &[f32],
    dst: &mut [f32],
    mut side: O::Side,
    tail_fill: f32,
    op: &mut O,
    stream: bool,
) {
    let head = stream_head::<V>(dst, stream);
    let (Some((src_head, mut src)), Some((dst_head, mut dst))) =
        (src.split_at_checked(head), dst.split_at_mut_checked(head))
    else {
        return;
    };
    if !src_head.is_empty() {
        let v = side.take(head).tail();
        op.apply_tail(0, V::load_tail(src_head, tail_fill), v)
            .store_tail(dst_head);
    }
    let mut offset = head;
    // Blocks split off by hand: zipped `chunks` would call `Zip::new`, which divides by the chunk
    // size out of line, a panic path the host `no_panic` check finds.
    loop {
        let n = src.len().min(O::BLOCK);
        let (Some((block, src_rest)), Some((out, dst_rest))) = (
            src.split_at_checked(n),
            core::mem::take(&mut dst).split_at_mut_checked(n),
        ) else {
            break;
        };
        if block.is_empty() {
            break;
        }
        (src, dst) = (src_rest, dst_rest);
        let s = side.take(n);
        let (arrays, tail) = V::split(block);
        let (out_arrays, out_tail) = V::split_mut(out);
        let (quads, rest) = arrays.as_chunks::<4>();
        let (out_quads, out_rest) = out_arrays.as_chunks_mut::<4>();
        for (i, ([a, b, c, d], [oa, ob, oc, od])) in quads.iter().zip(out_quads).enumerate() {
            let [va, vb, vc, vd] = s.quad(i);
            put(op.apply(0, offset, V::load(a), va), oa, stream);
            put(op.apply(1, offset + V::LANES, V::load(b), vb), ob, stream);
            put(
                op.apply(2, offset + 2 * V::LANES, V::load(c), vc),
                oc,
                stream,
            );
            put(
                op.apply(3, offset + 3 * V::LANES, V::load(d), vd),
                od,
                stream,
            );
            offset += 4 * V::LANES;
        }
        for (j, (a, o)) in rest.iter().zip(out_rest).enumerate() {
            put(op.apply(0, offset, V::load(a), s.single(j)), o, stream);
            offset += V::LANES;
        }
        if !tail.is_empty() {
            op.apply_tail(offset, V::load_tail(tail, tail_fill), s.tail())
                .store_tail(out_tail);
            offset += tail.len();
        }
        op.end_block();
    }
}

/// `op` over `buf`, results stored back in place.
#[inline(always)]
fn map_in_place<V: Vector, O: Op<V>>(
    buf: &mut [f32],
    mut side: O::Side,
    tail_fill: f32,
    op: &mut O,
    stream: bool,
) {
    let head = stream_head::<V>(buf, stream);
    let Some((first, buf)) = buf.split_at_mut_checked(head) else {
        return;
    };
    if !first.is_empty() {
        let v = side.take(head).tail();
        op.apply_tail(0, V::load_tail(first, tail_fill), v)
            .store_tail(first);
    }
    let mut offset = head;
    for block in buf.chunks_mut(O::BLOCK) {
        let s = side.take(block.len());
        let (arrays, tail) = V::split_mut(block);
        let (quads, rest) = arrays.as_chunks_mut::<4>();
        for (i, [a, b, c, d]) in quads.iter_mut().enumerate() {
            let [va, vb, vc, vd] = s.quad(i);
            put(op.apply(0, offset, V::load(a), va), a, stream);
            put(op.apply(1, offset + V::LANES, V::load(b), vb), b, stream);
            put(
                op.apply(2, offset + 2 * V::LANES, V::load(c), vc),
                c,
                stream,
            );
            put(
                op.apply(3, offset + 3 * V::LANES, V::load(d), vd),
                d,
                stream,
            );
            offset += 4 * V::LANES;
        }
        for (j, a) in rest.iter_mut().enumerate() {
            put(op.apply(0, offset, V::load(a), s.single(j)), a, stream);
            offset += V::LANES;
        }
        if !tail.is_empty() {
            let len = tail.len();
            op.apply_tail(offset, V::load_tail(tail, tail_fill), s.tail())
                .store_tail(tail);
            offset += len;
        }
        op.end_block();
    }
}

/// What the loop drivers ([`fold`], [`map_into`], [`map_in_place`]) read beside a row, vector for
/// vector: nothing ([`NoSide`]), or a per-class row such as class weights or target
/// probabilities ([`AuxSide`]), split block by block exactly as the row is, so that each of its
/// vectors costs one load and no index arithmetic.
pub(crate) trait Side<V: Vector>: Copy {
    /// Whether there is a row beside (ops skip its arithmetic at compile time when not).
    const PRESENT: bool;
    /// The next `n` elements, split as a block of the row of `n` elements is; `self` keeps the
    /// rest.
    fn take(&mut self, n: usize) -> Self;
    /// Whole vectors `4 i .. 4 i + 4` of a block taken by [`Side::take`].
    fn quad(&self, i: usize) -> [V; 4];
    /// Whole vector `j` after the quads of a block.
    fn single(&self, j: usize) -> V;
    /// The block's tail, padded with 0.
    fn tail(&self) -> V;
}

/// No row beside: every vector is 0, and no op reads it.
#[derive(Clone, Copy)]
pub(crate) struct NoSide;

impl<V: Vector> Side<V> for NoSide {
    const PRESENT: bool = false;

    #[inline(always)]
    fn take(&mut self, _n: usize) -> Self {
        NoSide
    }

    #[inline(always)]
    fn quad(&self, _i: usize) -> [V; 4] {
        [V::splat(0.0); 4]
    }

    #[inline(always)]
    fn single(&self, _j: usize) -> V {
        V::splat(0.0)
    }

    #[inline(always)]
    fn tail(&self) -> V {
        V::splat(0.0)
    }
}

/// A per-class row beside the logits, at least as long as the span it is read with (see
/// [`AuxSide::new`]).
#[derive(Clone, Copy)]
pub(crate) struct AuxSide<'a, V: Vector> {
    quads: &'a [[V::Array; 4]],
    singles: &'a [V::Array],
    tail: &'a [f32],
    /// What [`Side::take`] has not taken yet.
    rest: &'a [f32],
}

impl<'a, V: Vector> AuxSide<'a, V> {
    /// `row` beside a span of `len` elements; `None` if it is shorter (the public API's checks
    /// exclude that: callers make the row NaN rather than read past it).
    #[inline(always)]
    fn new(row: &'a [f32], len: usize) -> Option<Self> {
        Some(AuxSide {
            quads: &[],
            singles: &[],
            tail: &[],
            rest: row.get(..len)?,
        })
    }
}

impl<V: Vector> Side<V> for AuxSide<'_, V> {
    const PRESENT: bool = true;

    #[inline(always)]
    fn take(&mut self, n: usize) -> Self {
        // Shorter than the block (excluded by `AuxSide::new` and the drivers): all zero rather
        // than split out of step with the block.
        let Some((head, rest)) = self.rest.split_at_checked(n) else {
            self.rest = &[];
            return AuxSide {
                quads: &[],
                singles: &[],
                tail: &[],
                rest: &[],
            };
        };
        self.rest = rest;
        let (arrays, tail) = V::split(head);
        let (quads, singles) = arrays.as_chunks::<4>();
        AuxSide {
            quads,
            singles,
            tail,
            rest: &[],
        }
    }

    #[inline(always)]
    fn quad(&self, i: usize) -> [V; 4] {
        match self.quads.get(i) {
            Some([a, b, c, d]) => [V::load(a), V::load(b), V::load(c), V::load(d)],
            None => [V::splat(0.0); 4],
        }
    }

    #[inline(always)]
    fn single(&self, j: usize) -> V {
        self.singles.get(j).map_or(V::splat(0.0), V::load)
    }

    #[inline(always)]
    fn tail(&self) -> V {
        V::load_tail(self.tail, 0.0)
    }
}

/// `z` with the lanes that the class mask disallows replaced by `-inf` (past the end of the
/// mask: `-inf` too, which only tail padding can reach).
#[inline(always)]
fn apply_mask<V: Vector>(mask: &[bool], offset: usize, z: V) -> V {
    let allowed = V::allowed(mask.get(offset..).unwrap_or(&[]));
    V::select_where(allowed, z, V::splat(f32::NEG_INFINITY))
}

/// Max and min of a row of raw logits over the lanes the class mask allows.
/// With `BITS`, whole vectors read the mask from its bits (see [`Job::class_bits`]), not its
/// flags.
struct MaxMin<'m, V, const BITS: bool> {
    max: [V; 4],
    min: [V; 4],
    mask: Option<&'m [bool]>,
    /// The mask as bits (`BITS` only).
    bits: Option<&'m MaskWords>,
}

/// The seed of [`MaxMin`]: the class mask, as flags and (`BITS`) as bits.
#[derive(Clone, Copy)]
struct MaxMinSeed<'m, V, const BITS: bool> {
    mask: Option<&'m [bool]>,
    bits: Option<&'m MaskWords>,
    lanes: PhantomData<V>,
}

impl<'m, V: Vector, const BITS: bool> Seed<V> for MaxMinSeed<'m, V, BITS> {
    type Op = MaxMin<'m, V, BITS>;
    type Output = (f32, f32);

    #[inline(always)]
    fn start(self) -> Self::Op {
        MaxMin {
            max: [V::splat(f32::NEG_INFINITY); 4],
            min: [V::splat(f32::INFINITY); 4],
            mask: self.mask,
            bits: self.bits,
        }
    }

    #[inline(always)]
    fn finish(op: &Self::Op) -> (f32, f32) {
        op.result()
    }
}

impl<V: Vector, const BITS: bool> MaxMin<'_, V, BITS> {
    /// `(max, min)` over the lanes (NaN lanes may be skipped: NaN is detected by the sums). The
    /// min covers whole vectors only: the tail always takes the careful path.
    #[inline(always)]
    fn result(&self) -> (f32, f32) {
        let [a, b, c, d] = self.max;
        let max = a.max(b).max(c.max(d)).reduce_max();
        let [a, b, c, d] = self.min;
        let min = a.min(b).min(c.min(d)).reduce_min();
        (max, min)
    }
}

impl<V: Vector, const BITS: bool> Op<V> for MaxMin<'_, V, BITS> {
    type Side = NoSide;

    #[inline(always)]
    fn apply(&mut self, slot: usize, offset: usize, z: V, _v: V) -> V {
        let slot = slot & 3;
        let (max, min) = (self.max[slot], self.min[slot]);
        // Over the allowed lanes only: a disallowed lane's NaN could otherwise hide an allowed
        // `-inf` from the min (which must send the row to the careful variant).
        let ok = match (self.mask, self.bits) {
            (Some(_), Some(words)) if BITS => Some(V::allowed_bits(words, offset)),
            (Some(mask), _) => Some(V::allowed(mask.get(offset..).unwrap_or(&[]))),
            (None, _) => None,
        };
        (self.max[slot], self.min[slot]) = match ok {
            Some(ok) => (max.max_where(ok, z), min.min_where(ok, z)),
            None => (max.max(z), min.min(z)),
        };
        z
    }

    #[inline(always)]
    fn apply_tail(&mut self, offset: usize, z: V, _v: V) -> V {
        // The tail is padded with -inf: harmless for the max, meaningless for the min.
        let z = match self.mask {
            Some(mask) => apply_mask(mask, offset, z),
            None => z,
        };
        self.max[3] = self.max[3].max(z);
        z
    }
}

/// Pass 1 over a row: its max and min over the lanes the class `mask` allows; with `BITS`, whole
/// vectors read the mask from its `bits`.
#[inline(always)]
fn max_min<V: Vector, const BITS: bool>(
    z: &[f32],
    mask: Option<&[bool]>,
    bits: Option<&MaskWords>,
) -> (f32, f32) {
    let seed = MaxMinSeed::<V, BITS> {
        mask,
        bits,
        lanes: PhantomData,
    };
    fold(z, NoSide, seed)
}

/// The statistics of a row or a piece of a row in the transformed space, relative to its own
/// max: exact to merge.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Stats {
    /// Max of `t` over the allowed elements; `-inf` when there is none.
    pub max: f32,
    /// `sum exp(t - max)` over allowed elements.
    pub sum_exp: f64,
    /// `sum (t - max)` over allowed elements.
    pub shifted_sum: f64,
    /// Number of allowed elements.
    pub allowed: u64,
    /// `sum v (t - max)` over allowed elements (auxiliary row `v`).
    pub aux_shifted: f64,
    /// `sum v` over allowed elements.
    pub aux_sum: f64,
    /// `sum v` over masked elements.
    pub aux_masked: f64,
    /// A NaN or `+inf` was seen.
    pub invalid: bool,
}

impl Stats {
    pub(crate) const EMPTY: Stats = Stats {
        max: f32::NEG_INFINITY,
        sum_exp: 0.0,
        shifted_sum: 0.0,
        allowed: 0,
        aux_shifted: 0.0,
        aux_sum: 0.0,
        aux_masked: 0.0,
        invalid: false,
    };

    /// The statistics of a span whose auxiliary row is shorter than it (which the public API's
    /// checks exclude): the row becomes NaN.
    const SHORT_AUX: Stats = Stats {
        invalid: true,
        ..Stats::EMPTY
    };

    /// The statistics of the union of two disjoint pieces (associative and commutative up to
    /// f64 rounding).
    pub(crate) fn merge(self, other: Stats) -> Stats {
        let invalid = self.invalid || other.invalid;
        let aux_masked = self.aux_masked + other.aux_masked;
        if other.allowed == 0 {
            return Stats {
                aux_masked,
                invalid,
                ..self
            };
        }
        if self.allowed == 0 {
            return Stats {
                aux_masked,
                invalid,
                ..other
            };
        }
        let max = if other.max > self.max {
            other.max
        } else {
            self.max
        };
        let m = f64::from(max);
        let rebase = |st: &Stats| {
            let shift = f64::from(st.max) - m;
            (
                st.sum_exp * exp_shift(shift),
                st.shifted_sum + st.allowed as f64 * shift,
                st.aux_shifted + st.aux_sum * shift,
            )
        };
        let (s1, sh1, a1) = rebase(&self);
        let (s2, sh2, a2) = rebase(&other);
        Stats {
            max,
            sum_exp: s1 + s2,
            shifted_sum: sh1 + sh2,
            allowed: self.allowed + other.allowed,
            aux_shifted: a1 + a2,
            aux_sum: self.aux_sum + other.aux_sum,
            aux_masked,
            invalid,
        }
    }
}

/// What a pass prefetches while it runs: the start of what the caller reads next (the next block
/// of a long row, or the next row), as an address range only. It is never read through, so it can
/// name a row that is still to be borrowed mutably (the next row of an in-place call).
#[derive(Clone, Copy)]
pub(crate) struct Ahead {
    start: *const f32,
    len: usize,
}

impl Ahead {
    /// Nothing to prefetch.
    pub(crate) const NONE: Ahead = Ahead {
        start: core::ptr::null(),
        len: 0,
    };

    /// The elements of `s`.
    pub(crate) fn of(s: &[f32]) -> Ahead {
        Ahead {
            start: s.as_ptr(),
            len: s.len(),
        }
    }

    /// This range, or if it is empty the first `width` elements (at most) of `other`.
    #[inline(always)]
    pub(crate) fn or(self, other: Ahead, width: NonZeroUsize) -> Ahead {
        if self.len > 0 {
            self
        } else {
            Ahead {
                start: other.start,
                len: other.len.min(width.get()),
            }
        }
    }

    /// The address of element `offset`, if within the range.
    #[inline(always)]
    fn at(self, offset: usize) -> Option<*const f32> {
        (offset < self.len).then(|| self.start.wrapping_add(offset))
    }
}

/// `exp(shift)` for the shift `<= 0` of a state's max to the merged max: `1` without a call when
/// the state holds the max (one of every two states merged, and every piece that holds its row's
/// max), as `libm::exp(0)` gives.
#[inline(always)]
fn exp_shift(shift: f64) -> f64 {
    if shift == 0.0 {
        1.0
    } else {
        libm::exp(shift)
    }
}

/// Which transform of the logits a loop is compiled for, as a type, so that each loop is
/// instantiated without the code it does not need: every loop is a function of its own (see
/// [`Vector::outline`]), where a run-time flag would stay a test on every vector.
trait Form: Copy {
    /// The row has a soft-cap: `t = c tanh(s z / c)`.
    const CAPPED: bool;
    /// Without a soft-cap, the row may have a logit scale: `t = s z` (else `t = z`).
    const SCALED: bool;
}

/// A row with a soft-cap (and a logit scale, which may be 1).
#[derive(Clone, Copy)]
struct Capped;
/// No soft-cap; the logit scale as the row has it (a multiply by 1 when it has none).
#[derive(Clone, Copy)]
struct Uncapped;
/// Neither: `t = z`.
#[derive(Clone, Copy)]
struct Unscaled;
/// Lanes not yet given a [`Form`]: only [`Lanes::capped`], [`Lanes::uncapped`] and
/// [`Lanes::unscaled`] take them, each where the row is of that form.
#[derive(Clone, Copy)]
struct Unknown;

impl Form for Capped {
    const CAPPED: bool = true;
    const SCALED: bool = true;
}

impl Form for Uncapped {
    const CAPPED: bool = false;
    const SCALED: bool = true;
}

impl Form for Unscaled {
    const CAPPED: bool = false;
    const SCALED: bool = false;
}

/// The per-row constants every vector op needs, for loops compiled for the [`Form`] `F`.
#[derive(Clone, Copy)]
struct Lanes<'a, V: Vector, F = Unknown> {
    /// `m`, the max of `t`.
    m: V,
    /// The logit scale `s` (1 when not set).
    scale: V,
    /// Whether the logit scale is set.
    scaled: bool,
    /// Whether the row has a soft-cap, ...
    capped: bool,
    /// ... and then its `c` and `s / c` (0 without one).
    cap: (V, V),
    /// The class mask, if any.
    mask: Option<&'a [bool]>,
    /// The class mask as bits (see [`Job::class_bits`]), for the `MASKED_BITS` variant; empty
    /// otherwise.
    bits: Option<MaskBits<'a>>,
    /// The [`Form`] the loops are compiled for.
    form: PhantomData<F>,
}

impl<'a, V: Vector> Lanes<'a, V> {
    #[inline(always)]
    fn new(m: f32, transform: Transform, mask: Option<&'a [bool]>) -> Self {
        let zero = V::splat(0.0);
        Lanes {
            m: V::splat(m),
            scale: V::splat(transform.scale),
            scaled: transform.scale != 1.0,
            capped: transform.cap.is_some(),
            cap: transform.cap.map_or((zero, zero), |c| {
                (V::splat(c), V::splat(transform.scale / c))
            }),
            mask,
            bits: None,
            form: PhantomData,
        }
    }

    /// These lanes with their [`Form`] `F`.
    #[inline(always)]
    fn to<F: Form>(self) -> Lanes<'a, V, F> {
        Lanes {
            m: self.m,
            scale: self.scale,
            scaled: self.scaled,
            capped: self.capped,
            cap: self.cap,
            mask: self.mask,
            bits: self.bits,
            form: PhantomData,
        }
    }

    /// These lanes for a row with a soft-cap (the caller knows it has one).
    #[inline(always)]
    fn capped(self) -> Lanes<'a, V, Capped> {
        self.to()
    }

    /// These lanes for a row without a soft-cap (the caller knows it has none), for loops with
    /// no soft-cap code (whose tanh's registers would push the row constants and accumulators
    /// onto the stack).
    #[inline(always)]
    fn uncapped(self) -> Lanes<'a, V, Uncapped> {
        self.to()
    }

    /// These lanes for a row with neither a logit scale nor a soft-cap (the caller knows), for
    /// loops without the multiply by the scale, one operation of the 17 that each vector of the
    /// sums costs.
    #[inline(always)]
    fn unscaled(self) -> Lanes<'a, V, Unscaled> {
        self.to()
    }
}

impl<V: Vector, F: Form> Lanes<'_, V, F> {
    /// `t` for a vector of raw logits (masked lanes may come out finite with a soft-cap: callers
    /// that can see masked lanes select them away).
    #[inline(always)]
    fn transformed(&self, z: V) -> V {
        if F::CAPPED {
            let (c, s_over_c) = self.cap;
            tanh(z.mul(s_over_c)).mul(c)
        } else if F::SCALED {
            z.mul(self.scale)
        } else {
            z
        }
    }

    /// `t - m`, with `t` rounded to f32 first (not fused: `m` is a rounded `t` too, so the max's
    /// own term is exactly 0, and every backend gets the same bits).
    #[inline(always)]
    fn shifted(&self, z: V) -> V {
        self.transformed(z).sub(self.m)
    }

    /// `(t - m) * 2^-41`, never overflowing: the same rounding as [`Lanes::shifted`], scaled by
    /// a power of two.
    #[inline(always)]
    fn shifted_scaled(&self, z: V) -> V {
        let c = V::splat(CAREFUL_SCALE);
        if F::CAPPED {
            self.shifted(z).mul(c)
        } else {
            self.transformed(z).mul(c).sub(self.m.mul(c))
        }
    }

    /// `z` with the lanes of masked classes set to `-inf`: those the class mask disallows, and
    /// (without a soft-cap) finite logits that the logit scale takes below `-f32::MAX`, which
    /// count as `-inf` logits.
    #[inline(always)]
    fn masked(&self, offset: usize, z: V) -> V {
        let z = match self.mask {
            Some(mask) => apply_mask(mask, offset, z),
            None => z,
        };
        if F::SCALED && !F::CAPPED && self.scaled {
            let ninf = V::splat(f32::NEG_INFINITY);
            z.mul(self.scale).select_eq(ninf, ninf, z)
        } else {
            z
        }
    }
}

/// Pass 2: `e = exp(t - m)`, summed with `t - m` (and the auxiliary sums); returns `e` (or `-1`
/// for masked lanes in the careful variant). Flushes into f64 at every block end.
struct SumExp<'a, V: Vector, const MODE: u8, S, F> {
    lanes: Lanes<'a, V, F>,
    /// The auxiliary row's [`Side`] (its vectors come through `apply`).
    side: PhantomData<S>,
    sum: [V; 4],
    shifted: [V; 4],
    /// Two accumulators each, not four (slot `& 1`): four would not fit the registers of an
    /// AVX-512 loop beside the exp's constants. The flush block is halved with a side (see
    /// [`Op::BLOCK`]), so each lane still adds at most 16 vectors' worth before a flush.
    aux_shifted: [V; 2],
    aux_sum: [V; 2],
    /// Careful lanes: `(t - m) * 2^-41`, allowed count, `v (t - m) 2^-41`, masked `v`.
    scaled: V,
    allowed: V,
    aux_scaled: V,
    aux_masked: V,
    /// Elements seen through the fast `apply` (all allowed).
    fast_count: u64,
    total: Stats,
    /// Prefetched while this pass runs, a cache line per vector: the next block of the row while
    /// this one is summed from L1 (see [`stats_inline`]), or, in the reload strategy, the next
    /// row, whose logits come from memory while this row's exps keep the cores busy (after the
    /// last row, what the caller named by [`crate::CrossEntropy::read_ahead`]).
    ahead: Ahead,
}

/// The seed of [`SumExp`]: the row's max `t`, its lanes, and what to prefetch meanwhile.
#[derive(Clone, Copy)]
struct SumExpSeed<'a, V: Vector, const MODE: u8, S, F> {
    max: f32,
    lanes: Lanes<'a, V, F>,
    ahead: Ahead,
    side: PhantomData<S>,
}

impl<'a, V: Vector, const MODE: u8, S: Side<V>, F: Form> Seed<V> for SumExpSeed<'a, V, MODE, S, F> {
    type Op = SumExp<'a, V, MODE, S, F>;
    type Output = Stats;

    #[inline(always)]
    fn start(self) -> Self::Op {
        let mut op = SumExp::new(self.max, self.lanes);
        op.ahead = self.ahead;
        op
    }

    #[inline(always)]
    fn finish(op: &Self::Op) -> Stats {
        op.stats()
    }
}

impl<'a, V: Vector, const MODE: u8, S: Side<V>, F: Form> SumExp<'a, V, MODE, S, F> {
    #[inline(always)]
    fn new(max: f32, lanes: Lanes<'a, V, F>) -> Self {
        let zero = V::splat(0.0);
        SumExp {
            lanes,
            side: PhantomData,
            sum: [zero; 4],
            shifted: [zero; 4],
            aux_shifted: [zero; 2],
            aux_sum: [zero; 2],
            scaled: zero,
            allowed: zero,
            aux_scaled: zero,
            aux_masked: zero,
            fast_count: 0,
            total: Stats {
                max,
                // The whole vectors' count, known from the bits; the tail counts its own.
                allowed: match lanes.bits {
                    Some(bits) if MODE == MASKED_BITS => bits.whole_allowed,
                    _ => 0,
                },
                ..Stats::EMPTY
            },
            ahead: Ahead::NONE,
        }
    }

    /// The careful lane update: masked lanes (`-inf`, disallowed classes, the tail padding) count
    /// for nothing, and the shifted sums are formed pre-scaled so they cannot overflow.
    #[inline(always)]
    fn careful(&mut self, slot: usize, offset: usize, z: V, v: V) -> V {
        let (slot, pair) = (slot & 3, slot & 1);
        let ninf = V::splat(f32::NEG_INFINITY);
        let zero = V::splat(0.0);
        let z = self.lanes.masked(offset, z);
        let e = z.select_eq(ninf, zero, exp_nonpositive(self.lanes.shifted(z)));
        self.sum[slot] = self.sum[slot].add(e);
        let scaled = z.select_eq(ninf, zero, self.lanes.shifted_scaled(z));
        self.scaled = self.scaled.add(scaled);
        self.allowed = self.allowed.add(z.select_eq(ninf, zero, V::splat(1.0)));
        if S::PRESENT {
            self.aux_scaled = v.mul_add(scaled, self.aux_scaled);
            self.aux_sum[pair] = self.aux_sum[pair].add(z.select_eq(ninf, zero, v));
            self.aux_masked = self.aux_masked.add(z.select_eq(ninf, v, zero));
        }
        z.select_eq(ninf, V::splat(-1.0), e)
    }

    /// The masked lane update: the fast one, with the lanes the class mask disallows selected
    /// away (their `t - m` may be anything, even NaN: it is never summed) and stored as `-1`;
    /// with `MASKED_BITS`, counted from the bits and stored as they come (the pass over the
    /// stored exps zeroes them by the bits: [`Scale`]).
    #[inline(always)]
    fn masked(&mut self, slot: usize, offset: usize, z: V, v: V) -> V {
        let (slot, pair) = (slot & 3, slot & 1);
        let ok = match self.lanes.bits {
            Some(bits) if MODE == MASKED_BITS => V::allowed_bits(bits.words, offset),
            _ => V::allowed(self.lanes.mask.and_then(|m| m.get(offset..)).unwrap_or(&[])),
        };
        let t = self.lanes.shifted(z);
        let e = exp_nonpositive(t);
        // `select(ok, acc + x, acc)`: one merge-masked addition on AVX-512.
        let (sum, shifted) = (self.sum[slot], self.shifted[slot]);
        self.sum[slot] = V::select_where(ok, sum.add(e), sum);
        self.shifted[slot] = V::select_where(ok, shifted.add(t), shifted);
        // `MASKED_BITS` took the count of the whole vectors from the bits (see [`SumExp::new`]).
        if MODE != MASKED_BITS {
            self.allowed = V::select_where(ok, self.allowed.add(V::splat(1.0)), self.allowed);
        }
        if S::PRESENT {
            let (acc, sum) = (self.aux_shifted[pair], self.aux_sum[pair]);
            self.aux_shifted[pair] = V::select_where(ok, v.mul_add(t, acc), acc);
            self.aux_sum[pair] = V::select_where(ok, sum.add(v), sum);
            self.aux_masked = V::select_where(ok, self.aux_masked, self.aux_masked.add(v));
        }
        if MODE == MASKED_BITS {
            e
        } else {
            V::select_where(ok, e, V::splat(-1.0))
        }
    }

    #[inline(always)]
    fn stats(&self) -> Stats {
        Stats {
            invalid: self.total.shifted_sum.is_nan()
                || self.total.sum_exp.is_nan()
                || self.total.aux_shifted.is_nan(),
            ..self.total
        }
    }
}

impl<V: Vector, const MODE: u8, S: Side<V>, F: Form> Op<V> for SumExp<'_, V, MODE, S, F> {
    type Side = S;
    /// The f32 accumulators are flushed into f64 every [`FLUSH_VECTORS`] vectors (half as many
    /// with a side, whose sums have two accumulators, not four): the loop drivers call
    /// [`Op::end_block`] there, so no vector pays for a count.
    const BLOCK: usize = if S::PRESENT {
        FLUSH_VECTORS / 2
    } else {
        FLUSH_VECTORS
    } * V::LANES;

    #[inline(always)]
    fn apply(&mut self, slot: usize, offset: usize, z: V, v: V) -> V {
        if let Some(x) = self.ahead.at(offset) {
            V::prefetch(x);
        }
        match MODE {
            CAREFUL => return self.careful(slot, offset, z, v),
            MASKED | MASKED_BITS => return self.masked(slot, offset, z, v),
            _ => {}
        }
        let (slot, pair) = (slot & 3, slot & 1);
        let t = self.lanes.shifted(z);
        let e = exp_nonpositive(t);
        self.sum[slot] = self.sum[slot].add(e);
        self.shifted[slot] = self.shifted[slot].add(t);
        if S::PRESENT {
            self.aux_shifted[pair] = v.mul_add(t, self.aux_shifted[pair]);
            self.aux_sum[pair] = self.aux_sum[pair].add(v);
        }
        self.fast_count += V::LANES as u64;
        e
    }

    #[inline(always)]
    fn apply_tail(&mut self, offset: usize, z: V, v: V) -> V {
        let e = self.careful(3, offset, z, v);
        // The fast variant touches the careful accumulators here only: flushed at once, so its
        // block ends need not.
        if MODE == FAST {
            self.flush_careful();
        }
        e
    }

    #[inline(always)]
    fn end_block(&mut self) {
        let t = &mut self.total;
        t.sum_exp += drain(&mut self.sum);
        t.shifted_sum += drain(&mut self.shifted);
        t.allowed += self.fast_count;
        self.fast_count = 0;
        if S::PRESENT {
            t.aux_shifted += drain(&mut self.aux_shifted);
            t.aux_sum += drain(&mut self.aux_sum);
        }
        if MODE != FAST {
            self.flush_careful();
        }
    }
}

impl<V: Vector, const MODE: u8, S: Side<V>, F: Form> SumExp<'_, V, MODE, S, F> {
    /// Moves the careful variant's single accumulators into the f64 totals.
    #[inline(always)]
    fn flush_careful(&mut self) {
        let zero = V::splat(0.0);
        let t = &mut self.total;
        t.shifted_sum += self.scaled.reduce_sum() * CAREFUL_UNSCALE;
        t.allowed += self.allowed.reduce_sum() as u64;
        self.scaled = zero;
        self.allowed = zero;
        if S::PRESENT {
            t.aux_shifted += self.aux_scaled.reduce_sum() * CAREFUL_UNSCALE;
            t.aux_masked += self.aux_masked.reduce_sum();
            self.aux_scaled = zero;
            self.aux_masked = zero;
        }
    }
}

/// The f64 sum of `N` accumulators, pairwise (`(a + b) + (c + d)` for four; an odd last one
/// added at the end), which are reset to zero. (A function and a loop, not closures: closures do not inherit the target
/// features of the backend function they are inlined into.)
#[inline(always)]
fn drain<V: Vector, const N: usize>(acc: &mut [V; N]) -> f64 {
    let all = *acc;
    *acc = [V::splat(0.0); N];
    let (pairs, odd) = all.as_chunks::<2>();
    let mut total: Option<V> = None;
    for [a, b] in pairs {
        let pair = a.add(*b);
        total = Some(match total {
            Some(t) => t.add(pair),
            None => pair,
        });
    }
    for &a in odd {
        total = Some(match total {
            Some(t) => t.add(a),
            None => a,
        });
    }
    match total {
        Some(t) => t.reduce_sum(),
        None => 0.0,
    }
}

/// The gradient constants of a row, per element: `g = e * a + b + c * v`, all chain factors of the
/// logit scale folded in (`a = s A' scale / sum`, `b = -s D scale`, `c = -s C scale`).
#[derive(Clone, Copy)]
struct GradLanes<V> {
    a: V,
    b: V,
    c: V,
}

/// Pass 3 of the reload strategy, over the stored exps, in the mode of the [`SumExp`] variant
/// that stored them: `FAST`, every lane an exp; `CAREFUL`, lanes holding the masked marker `-1`
/// zeroed; `MASKED_BITS`, whole vectors' disallowed lanes zeroed by the mask's `bits` (the variant
/// stored them as they came), the tail's marker as in `CAREFUL`.
#[derive(Clone, Copy)]
struct Scale<'a, V: Vector, const MODE: u8, S> {
    grad: GradLanes<V>,
    /// The auxiliary row's [`Side`] (its vectors come through `apply`).
    side: PhantomData<S>,
    /// The class mask as bits (`MASKED_BITS` only).
    bits: Option<&'a MaskWords>,
}

impl<V: Vector, const MODE: u8, S: Side<V>> Scale<'_, V, MODE, S> {
    #[inline(always)]
    fn careful(&self, e: V, v: V) -> V {
        let zero = V::splat(0.0);
        e.select_lt(zero, zero, self.plain(e, v))
    }

    #[inline(always)]
    fn plain(&self, e: V, v: V) -> V {
        let g = e.mul_add(self.grad.a, self.grad.b);
        if S::PRESENT {
            v.mul_add(self.grad.c, g)
        } else {
            g
        }
    }
}

/// Small enough to be its own seed.
impl<V: Vector, const MODE: u8, S: Side<V>> Seed<V> for Scale<'_, V, MODE, S> {
    type Op = Self;
    type Output = ();

    #[inline(always)]
    fn start(self) -> Self {
        self
    }

    #[inline(always)]
    fn finish(_: &Self) {}
}

impl<V: Vector, const MODE: u8, S: Side<V>> Op<V> for Scale<'_, V, MODE, S> {
    type Side = S;

    #[inline(always)]
    fn apply(&mut self, _slot: usize, offset: usize, e: V, v: V) -> V {
        match MODE {
            CAREFUL => self.careful(e, v),
            MASKED_BITS => match self.bits {
                Some(words) => {
                    let ok = V::allowed_bits(words, offset);
                    V::select_where(ok, self.plain(e, v), V::splat(0.0))
                }
                None => self.careful(e, v),
            },
            _ => self.plain(e, v),
        }
    }

    #[inline(always)]
    fn apply_tail(&mut self, _offset: usize, e: V, v: V) -> V {
        self.careful(e, v)
    }
}

/// Pass 2 of the recompute strategy: `g = (exp(t - m) a + b + c v) f'(z)`, masked lanes zero
/// when careful.
#[derive(Clone, Copy)]
struct Recompute<'a, V: Vector, const CAREFUL: bool, S, F> {
    lanes: Lanes<'a, V, F>,
    grad: GradLanes<V>,
    /// The auxiliary row's [`Side`] (its vectors come through `apply`).
    side: PhantomData<S>,
}

impl<V: Vector, const CAREFUL: bool, S: Side<V>, F: Form> Recompute<'_, V, CAREFUL, S, F> {
    #[inline(always)]
    fn plain(&self, z: V, v: V) -> V {
        let e = exp_nonpositive(self.lanes.shifted(z));
        let g = e.mul_add(self.grad.a, self.grad.b);
        let g = if S::PRESENT {
            v.mul_add(self.grad.c, g)
        } else {
            g
        };
        if F::CAPPED {
            // The soft-cap's chain factor 1 - (t/c)^2 (its scale s is folded into a, b, c).
            let (c, _) = self.lanes.cap;
            let r = self.lanes.transformed(z).div(c);
            let one = V::splat(1.0);
            g.mul(r.mul(V::splat(0.0).sub(r)).add(one))
        } else {
            g
        }
    }

    #[inline(always)]
    fn careful(&self, offset: usize, z: V, v: V) -> V {
        let z = self.lanes.masked(offset, z);
        z.select_eq(V::splat(f32::NEG_INFINITY), V::splat(0.0), self.plain(z, v))
    }
}

/// Small enough to be its own seed.
impl<V: Vector, const CAREFUL: bool, S: Side<V>, F: Form> Seed<V>
    for Recompute<'_, V, CAREFUL, S, F>
{
    type Op = Self;
    type Output = ();

    #[inline(always)]
    fn start(self) -> Self {
        self
    }

    #[inline(always)]
    fn finish(_: &Self) {}
}

impl<V: Vector, const CAREFUL: bool, S: Side<V>, F: Form> Op<V>
    for Recompute<'_, V, CAREFUL, S, F>
{
    type Side = S;

    #[inline(always)]
    fn apply(&mut self, _slot: usize, offset: usize, z: V, v: V) -> V {
        if CAREFUL {
            self.careful(offset, z, v)
        } else {
            self.plain(z, v)
        }
    }

    #[inline(always)]
    fn apply_tail(&mut self, offset: usize, z: V, v: V) -> V {
        self.careful(offset, z, v)
    }
}

/// Whether a row (or block) with this transformed max and min needs the careful variant. True
/// for a `-inf` min (masked classes), NaN, and ranges so wide that the fast f32 sums could
/// overflow.
fn needs_care(max: f32, min: f32) -> bool {
    let range = max - min;
    range.is_nan() || range > FAST_RANGE_MAX
}

/// The statistics of a row (or block) whose max is not a finite number: NaN/`+inf` rows are
/// invalid, and so is a finite max that the logit scale takes past `f32::MAX` (`m`, the scaled
/// max, is `+inf`); a row with no allowed class has none, but its auxiliary row (soft targets)
/// is all masked mass. `None` for a finite max.
fn degenerate(
    max: f32,
    m: f32,
    z: &[f32],
    mask: Option<&[bool]>,
    aux: Option<&[f32]>,
) -> Option<Stats> {
    // A finite max scaled below -f32::MAX: every class counts as a -inf logit (masked).
    if max.is_finite() && m.is_finite() {
        return None;
    }
    // A NaN-dropping max can report -inf for a row of NaN and -inf: look again.
    let allowed = |k: usize| mask.is_none_or(|m| m.get(k).copied().unwrap_or(false));
    let nan = z.iter().enumerate().any(|(k, x)| x.is_nan() && allowed(k));
    let aux_masked = aux.map_or(0.0, |a| {
        a.iter().take(z.len()).map(|&v| f64::from(v)).sum::<f64>()
    });
    Some(Stats {
        invalid: max.is_nan() || max == f32::INFINITY || m == f32::INFINITY || nan,
        aux_masked,
        ..Stats::EMPTY
    })
}

/// `f(x)` rounded to f32, `-inf` kept.
fn transform_f32(transform: Transform, x: f32) -> f32 {
    transform.scalar(x) as f32
}

/// The sums of `z` (one block at most) relative to the transformed max, storing nothing.
#[inline(always)]
fn block_stats<V: Vector>(
    z: &[f32],
    transform: Transform,
    aux: Option<&[f32]>,
    mask: Option<&[bool]>,
    ahead: Ahead,
) -> Stats {
    let (zmax, zmin) = max_min::<V, false>(z, mask, None);
    let (m, tmin) = (
        transform_f32(transform, zmax),
        transform_f32(transform, zmin),
    );
    if let Some(stats) = degenerate(zmax, m, z, mask, aux) {
        return stats;
    }
    let lanes = Lanes::new(m, transform, mask);
    // Each loop compiled for the row's form (see [`Form`]): the fast variant unscaled too.
    match (lanes.capped, sums_mode(m, tmin, mask)) {
        (false, CAREFUL) => sums_fold::<V, CAREFUL, _>(z, m, lanes.uncapped(), aux, ahead),
        (false, MASKED) => sums_fold::<V, MASKED, _>(z, m, lanes.uncapped(), aux, ahead),
        (false, _) if !lanes.scaled => sums_fold::<V, FAST, _>(z, m, lanes.unscaled(), aux, ahead),
        (false, _) => sums_fold::<V, FAST, _>(z, m, lanes.uncapped(), aux, ahead),
        (true, CAREFUL) => sums_fold::<V, CAREFUL, _>(z, m, lanes.capped(), aux, ahead),
        (true, MASKED) => sums_fold::<V, MASKED, _>(z, m, lanes.capped(), aux, ahead),
        (true, _) => sums_fold::<V, FAST, _>(z, m, lanes.capped(), aux, ahead),
    }
}

#[inline(always)]
fn sums_fold<V: Vector, const MODE: u8, F: Form>(
    z: &[f32],
    m: f32,
    lanes: Lanes<'_, V, F>,
    aux: Option<&[f32]>,
    ahead: Ahead,
) -> Stats {
    match aux {
        None => sums_fold_beside::<V, MODE, _, F>(z, m, lanes, NoSide, ahead),
        Some(row) => match AuxSide::new(row, z.len()) {
            Some(side) => sums_fold_beside::<V, MODE, _, F>(z, m, lanes, side, ahead),
            None => Stats::SHORT_AUX,
        },
    }
}

#[inline(always)]
fn sums_fold_beside<V: Vector, const MODE: u8, S: Side<V>, F: Form>(
    z: &[f32],
    m: f32,
    lanes: Lanes<'_, V, F>,
    side: S,
    ahead: Ahead,
) -> Stats {
    let seed = SumExpSeed::<V, MODE, S, F> {
        max: m,
        lanes,
        ahead,
        side: PhantomData,
    };
    fold(z, side, seed)
}

/// The statistics of a row or piece, block by block: each block is read from memory once (its
/// second pass hits L1, and prefetches the next block meanwhile, so that the memory is not idle
/// while the exps are computed), and the blocks merge exactly. The last block prefetches the
/// start of `next`, what the caller reads after this row (the next row or piece-row; empty if
/// none), so that short rows, a single block each, stream as well as long ones.
#[inline(always)]
pub(crate) fn stats_inline<V: Vector>(
    z: &[f32],
    next: Ahead,
    transform: Transform,
    aux: Option<&[f32]>,
    mask: Option<&[bool]>,
) -> Stats {
    let mut total = Stats::EMPTY;
    for (i, block) in z.chunks(BLOCK).enumerate() {
        let start = i * BLOCK;
        let sub_aux = aux.map(|a| a.get(start..).unwrap_or(&[]));
        let sub_mask = mask.map(|m| m.get(start..).unwrap_or(&[]));
        let ahead = match z.get(start + BLOCK..) {
            Some(rest) if !rest.is_empty() => Ahead::of(rest),
            _ => next,
        };
        total = total.merge(block_stats::<V>(block, transform, sub_aux, sub_mask, ahead));
    }
    total
}

/// Per-row coefficients: `loss = A ln s + B (m - t_y) - C sum v (t - m) - D sum (t - m)` (times
/// `row_weight`), `dloss/dt_k = A p_k - B [k = y] - C v_k - D [k allowed]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Coefficients {
    pub a: f64,
    pub b: f64,
    pub c: f64,
    pub d: f64,
    /// Keras-style per-target weight of the whole row.
    pub row_weight: f64,
    /// Soft targets: mass on a masked class makes the loss infinite (with class weights the
    /// auxiliary row only weights the smoothing of allowed classes).
    pub soft: bool,
    /// The target's class weight `w_y` (per-class weights), its share `C w_y` of the weighted
    /// shifted sum; 0 otherwise.
    pub target_aux: f64,
}

impl Coefficients {
    /// The coefficients of a row with statistics `stats`, target `target` (a class whose logit
    /// is allowed or not, or soft targets), smoothing and weights.
    fn new(job: &Job<'_>, stats: &Stats, target: RowTarget<'_>, target_allowed: bool) -> Self {
        match target {
            RowTarget::Soft(_) => {
                let per = f64::from(job.smoothing.eps()) / stats.allowed.max(1) as f64;
                let keep = 1.0 - f64::from(job.smoothing.eps());
                Coefficients {
                    // All target mass, masked classes' included: d lse / dt = p.
                    a: keep * (stats.aux_sum + stats.aux_masked) + per * stats.allowed as f64,
                    b: 0.0,
                    c: keep,
                    d: per,
                    row_weight: 1.0,
                    soft: true,
                    target_aux: 0.0,
                }
            }
            RowTarget::Class(y) => {
                let (on, per) = job.smoothing.coefficients(stats.allowed, target_allowed);
                let weight_of = |w: &[f32]| f64::from(w.get(y).copied().unwrap_or(f32::NAN));
                match job.weights {
                    Weights::PerClass(w) => {
                        let w_y = weight_of(w);
                        Coefficients {
                            a: on * w_y + per * stats.aux_sum,
                            b: on * w_y,
                            c: per,
                            d: 0.0,
                            row_weight: 1.0,
                            soft: false,
                            target_aux: w_y,
                        }
                    }
                    Weights::None | Weights::PerTarget(_) => Coefficients {
                        a: on + per * stats.allowed as f64,
                        b: on,
                        c: 0.0,
                        d: per,
                        row_weight: match job.weights {
                            Weights::PerTarget(w) => weight_of(w),
                            _ => 1.0,
                        },
                        soft: false,
                        target_aux: 0.0,
                    },
                }
            }
        }
    }

    /// The loss (before the row weight and the z-loss), each term skipped when its coefficient is
    /// 0 so that `0 * inf` never makes a NaN.
    ///
    /// `rest`, when given, is the exact sum of `t - m` over the allowed classes other than the
    /// target (see [`exact_rest`]); it replaces `S - r_y` where that could cancel: when the
    /// target's weight `B + D = q_y` is below half of `D`.
    fn loss(
        &self,
        stats: &Stats,
        log_sum: f64,
        target_t: f64,
        target_shift: Option<f64>,
        rest: Option<f64>,
    ) -> f64 {
        let mut loss = 0.0;
        if self.a != 0.0 {
            loss += self.a * log_sum;
        }
        // With an allowed class target and no auxiliary row, the target's own share of the
        // shifted sum is moved to its term: `B (m - t_y) - D S` becomes
        // `(B + D)(m - t_y) - D (S - r_y)` with `r_y` the very f32 value of `t_y - m` that went
        // into `S`. Every term is then >= 0 (B + D = q_y), so nothing cancels even when B < 0
        // (off-target smoothing with eps > (K-1)/K).
        // Per-class weights, with the exact weighted sum of the other classes (see
        // `exact_rest`): the target's whole weight `B + C w_y = q_y w_y >= 0` goes on its term
        // and nothing cancels.
        let weighted_rest = !self.soft && self.c != 0.0 && rest.is_some() && target_shift.is_some();
        let (b, shifted_sum) = match target_shift {
            Some(_) if weighted_rest => (self.b + self.c * self.target_aux, stats.shifted_sum),
            Some(r_y) if self.c == 0.0 && !self.soft => {
                let q_y = self.b + self.d;
                match rest {
                    Some(rest) if self.d > 2.0 * q_y => (q_y, rest),
                    _ => (q_y, stats.shifted_sum - r_y),
                }
            }
            _ => (self.b, stats.shifted_sum),
        };
        if b != 0.0 {
            loss += b * (f64::from(stats.max) - target_t);
        }
        if self.c != 0.0 {
            match rest {
                Some(rest) if weighted_rest => loss -= self.c * rest,
                _ => loss -= self.c * stats.aux_shifted,
            }
            if self.soft && stats.aux_masked != 0.0 {
                // Target mass on a masked class: its log-probability is -inf.
                loss = f64::INFINITY;
            }
        }
        if self.d != 0.0 {
            loss -= self.d * shifted_sum;
        }
        loss
    }
}

/// Loss, z-loss, lse and correctness of a row from its statistics; `target_z` is the target's
/// raw logit (class targets), `soft_correct` the correctness of a soft-target row, `rest` the
/// exact non-target shifted sum when [`exact_rest`] computed one.
fn finish_row(
    job: &Job<'_>,
    stats: &Stats,
    target: RowTarget<'_>,
    target_z: Option<f32>,
    soft_correct: bool,
    rest: Option<f64>,
) -> (RowResult, Coefficients, f64) {
    let (target_t, target_allowed) = match target {
        RowTarget::Class(y) => {
            let masked = job
                .class_mask
                .is_some_and(|m| !m.get(y).copied().unwrap_or(false));
            let t_y = if masked {
                f64::NEG_INFINITY
            } else {
                job.transform.scalar(target_z.unwrap_or(f32::NAN))
            };
            (t_y, t_y != f64::NEG_INFINITY)
        }
        RowTarget::Soft(_) => (f64::NAN, true),
    };
    let coefficients = Coefficients::new(job, stats, target, target_allowed);
    // One log per row, shared by the loss and the log-sum-exp.
    let log_sum = crate::ln::ln(stats.sum_exp);
    let lse = f64::from(stats.max) + log_sum;
    let z_loss = if job.z_loss > 0.0 {
        job.z_loss * lse * lse
    } else {
        0.0
    };
    // The f32 value of t_y - m that the kernels summed (`t_y` rounded to f32, then the
    // difference rounded, as in `Lanes::shifted`).
    let target_shift = match (target, target_z) {
        (RowTarget::Class(_), Some(_)) if target_allowed => {
            let r_y = target_t as f32 - stats.max;
            // Beyond f32 the row took the careful path, which summed pre-scaled values.
            if r_y.is_finite() {
                Some(f64::from(r_y))
            } else {
                let c = CAREFUL_SCALE;
                let scaled = (target_t as f32) * c - stats.max * c;
                Some(f64::from(scaled) * CAREFUL_UNSCALE)
            }
        }
        _ => None,
    };
    let loss = coefficients.row_weight
        * coefficients.loss(stats, log_sum, target_t, target_shift, rest)
        + z_loss;
    let correct = match target {
        RowTarget::Class(_) => target_allowed && target_t as f32 == stats.max,
        RowTarget::Soft(_) => soft_correct,
    };
    (
        RowResult {
            loss,
            z_loss,
            lse,
            correct,
        },
        coefficients,
        lse,
    )
}

/// Whether the class with the largest target probability (the first, on ties) attains the max
/// allowed logit.
fn soft_correct(t: &[f32], z: &[f32], mask: Option<&[bool]>, transform: Transform) -> bool {
    // Masked classes, and logits the scale takes below -f32::MAX (they count as -inf).
    let allowed = |k: usize| {
        mask.is_none_or(|m| m.get(k).copied().unwrap_or(false))
            && z.get(k)
                .is_some_and(|&x| transform.scalar(x) != f64::NEG_INFINITY)
    };
    let mut best: Option<(usize, f32)> = None;
    for (k, &p) in t.iter().enumerate() {
        if best.is_none_or(|(_, b)| p > b) {
            best = Some((k, p));
        }
    }
    let zmax = z
        .iter()
        .enumerate()
        .filter(|&(k, _)| allowed(k))
        .fold(f32::NEG_INFINITY, |m, (_, &x)| if x > m { x } else { m });
    best.is_some_and(|(k, _)| allowed(k) && z.get(k).copied() == Some(zmax))
}

/// The auxiliary row of a row: per-class weights (PyTorch semantics) or target probabilities.
fn aux_row<'a>(job: &Job<'a>, target: RowTarget<'a>) -> Option<&'a [f32]> {
    match (target, job.weights) {
        (RowTarget::Soft(t), _) => Some(t),
        (RowTarget::Class(_), Weights::PerClass(w)) => Some(w),
        _ => None,
    }
}

/// Loss of one row, no gradient.
#[inline(always)]
fn forward_row<V: RowKernels>(
    job: &Job<'_>,
    z: &[f32],
    next: Ahead,
    target: RowTarget<'_>,
) -> RowResult {
    let stats = V::stats(z, next, job.transform, aux_row(job, target), job.class_mask);
    let (target_z, soft) = target_inputs(job, target, z);
    let rest = exact_rest(job, z, target, stats.max);
    row_result(job, &stats, target, target_z, soft, rest)
}

/// The results of a row from its statistics, degenerate rows included.
fn row_result(
    job: &Job<'_>,
    stats: &Stats,
    target: RowTarget<'_>,
    target_z: Option<f32>,
    soft_correct: bool,
    rest: Option<f64>,
) -> RowResult {
    if stats.invalid {
        return RowResult::NAN;
    }
    if stats.allowed == 0 {
        return RowResult {
            loss: f64::INFINITY,
            z_loss: 0.0,
            lse: f64::NEG_INFINITY,
            correct: false,
        };
    }
    finish_row(job, stats, target, target_z, soft_correct, rest).0
}

/// The exact sum of `w_k (t_k - m)` (in f64, from the logits; `w_k` the per-class weight, or 1)
/// over the allowed classes `k != y`, for the rows that may need it: off-target smoothing with
/// `eps > 2/3` and a class target below the row max. There the target's weight in the loss,
/// `q_y = 1 - eps` (times `w_y`), can be below half the weight `D = eps / (K' - 1)` (times `w_y`)
/// of its share of the shifted sum (`K'` allowed classes, known only after the pass that may
/// overwrite the logits), and `S - r_y` cancels when the target's logit lies far below the others
/// (`[-1e30, 1, 0, 0.5]` with target 0): the f32 lane sums lose the other classes' terms next to
/// `r_y`. Without weights, where `D <= 2 q_y` the cancellation costs at most a factor 2 of the
/// ordinary f32 accumulation error and the loss ignores this sum; since `D <= eps`, that holds for
/// every row below `eps = 2/3`, which never pays for this scalar pass. With per-class weights the
/// loss uses it whenever it is computed. `m` is the row's `t` max.
fn exact_rest(job: &Job<'_>, z: &[f32], target: RowTarget<'_>, m: f32) -> Option<f64> {
    let RowTarget::Class(y) = target else {
        return None;
    };
    match job.smoothing {
        Smoothing::OffTarget(eps) if eps > 2.0 / 3.0 => {}
        _ => return None,
    }
    let weight = |k: usize| match job.weights {
        Weights::PerClass(w) => w.get(k).map_or(f64::NAN, |&v| f64::from(v)),
        _ => 1.0,
    };
    let target_below_max = z
        .get(y)
        .is_some_and(|&z_y| (job.transform.scalar(z_y) as f32) < m);
    if !target_below_max {
        return None;
    }
    let m = f64::from(m);
    let allowed = |k: usize| {
        job.class_mask
            .is_none_or(|mask| mask.get(k).copied().unwrap_or(false))
    };
    let mut rest = 0.0;
    for (k, &x) in z.iter().enumerate() {
        let t = job.transform.scalar(x);
        if k != y && t != f64::NEG_INFINITY && allowed(k) {
            rest += weight(k) * (t - m);
        }
    }
    Some(rest)
}

/// The target's raw logit (class targets) and, when asked for, the correctness of a soft-target
/// row: both read from the logits before a pass can overwrite them.
fn target_inputs(job: &Job<'_>, target: RowTarget<'_>, z: &[f32]) -> (Option<f32>, bool) {
    match target {
        RowTarget::Class(y) => (z.get(y).copied(), false),
        RowTarget::Soft(t) => (
            None,
            job.want_correct && soft_correct(t, z, job.class_mask, job.transform),
        ),
    }
}

/// Loss and gradient of one row.
#[inline(always)]
pub(crate) fn gradient_row<V: RowKernels>(
    job: &Job<'_>,
    mut io: Io<'_>,
    target: Option<RowTarget<'_>>,
    row: usize,
    next: Ahead,
) -> RowResult {
    let Some(target) = target else {
        io.fill(0.0);
        return RowResult::default();
    };
    let aux = aux_row(job, target);
    let mask = job.class_mask;
    let transform = job.transform;
    let z = io.src();
    let (target_z, soft_correct) = target_inputs(job, target, z);
    let k = z.len();
    let reload = k <= V::RELOAD_MAX && transform.cap.is_none();
    // Built only with a mask, for whole rows.
    let bits = job.class_bits;
    // `stored_bits`: the mask's bits when the sums stored the disallowed lanes' exps unmasked
    // (`MASKED_BITS`), for pass 3 to zero them by.
    let (stats, rest, stored_bits) = if reload {
        let (zmax, zmin) = match bits {
            Some(bits) => max_min::<V, true>(z, mask, Some(bits.words)),
            None => max_min::<V, false>(z, mask, None),
        };
        let (m, tmin) = (
            transform_f32(transform, zmax),
            transform_f32(transform, zmin),
        );
        if let Some(stats) = degenerate(zmax, m, z, mask, aux) {
            (stats, None, None)
        } else {
            // Before the pass that may overwrite the logits with exps.
            let rest = exact_rest(job, z, target, m);
            let lanes = Lanes::new(m, transform, mask);
            let (stats, stored_bits) = match (sums_mode(m, tmin, mask), bits) {
                (CAREFUL, _) => (sums_map::<V, CAREFUL>(&mut io, m, lanes, aux, next), None),
                (MASKED, Some(bits)) => {
                    let lanes = Lanes {
                        bits: Some(bits),
                        ..lanes
                    };
                    let stats = sums_map::<V, MASKED_BITS>(&mut io, m, lanes, aux, next);
                    (stats, Some(bits.words))
                }
                (MASKED, None) => (sums_map::<V, MASKED>(&mut io, m, lanes, aux, next), None),
                _ => (sums_map::<V, FAST>(&mut io, m, lanes, aux, next), None),
            };
            (stats, rest, stored_bits)
        }
    } else {
        let stats = V::stats(z, next, transform, aux, mask);
        (stats, exact_rest(job, z, target, stats.max), None)
    };
    let piece = PieceInputs {
        target_index: match target {
            RowTarget::Class(y) => Some(y),
            RowTarget::Soft(_) => None,
        },
        aux,
        mask,
        bits: stored_bits,
    };
    write_gradient::<V>(
        job,
        &mut io,
        &stats,
        target,
        target_z,
        soft_correct,
        rest,
        row,
        reload.then_some(1.0),
        piece,
    )
}

/// A (piece of a) row's slices of the per-class inputs, and where its target is.
#[derive(Clone, Copy)]
struct PieceInputs<'a> {
    /// The target's index within this piece, if the piece holds it.
    target_index: Option<usize>,
    /// The auxiliary row's slice for this piece.
    aux: Option<&'a [f32]>,
    /// The class mask's slice for this piece.
    mask: Option<&'a [bool]>,
    /// The class mask as bits, when the stored exps came from the masked variant reading them
    /// (whole vectors' disallowed lanes then hold whatever their exp gave, not the marker).
    bits: Option<&'a MaskWords>,
}

/// The gradient of a (piece of a) row from the statistics of the whole row: the last pass over
/// the stored exps (`stored_exps`, the factor that rebases them to the row's max) or a
/// recomputing pass over the logits, then the target's own element in f64.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn write_gradient<V: Vector>(
    job: &Job<'_>,
    io: &mut Io<'_>,
    stats: &Stats,
    target: RowTarget<'_>,
    target_z: Option<f32>,
    soft_correct: bool,
    rest: Option<f64>,
    row: usize,
    stored_exps: Option<f64>,
    piece: PieceInputs<'_>,
) -> RowResult {
    let transform = job.transform;
    // An auxiliary row shorter than the row (which the API's checks exclude) makes it NaN, like
    // an invalid row, before anything else is written.
    if stats.invalid || piece.aux.is_some_and(|a| a.len() < io.src().len()) {
        io.fill(f32::NAN);
        return RowResult::NAN;
    }
    if stats.allowed == 0 {
        io.fill(0.0);
        return RowResult {
            loss: f64::INFINITY,
            z_loss: 0.0,
            lse: f64::NEG_INFINITY,
            correct: false,
        };
    }
    let (result, coef, lse) = finish_row(job, stats, target, target_z, soft_correct, rest);
    let row_scale = job
        .row_scales
        .and_then(|r| r.get(row))
        .map_or(1.0, |&r| f64::from(r));
    let scale = job.grad_scale * row_scale * coef.row_weight * f64::from(transform.scale);
    // Without z-loss the gradient does not wait for the log in `lse`: the loss's log then
    // overlaps the gradient pass.
    let a_grad = if job.z_loss > 0.0 {
        coef.a + 2.0 * job.z_loss * lse
    } else {
        coef.a
    };
    let a = scale * a_grad / stats.sum_exp * stored_exps.unwrap_or(1.0);
    let (b, c) = (-scale * coef.d, -scale * coef.c);
    let wide = beyond_f32([a, b, c]);
    let grad = GradLanes {
        a: V::splat(a as f32),
        b: V::splat(b as f32),
        c: V::splat(c as f32),
    };
    let (aux, mask) = (piece.aux, piece.mask);
    // Some class of the full row is masked: this piece may hold it.
    let masked = stats.allowed < job.classes.get() as u64;
    // The target's own exp as its lane has it, stored or not (read before it is overwritten).
    let stored_e_y = stored_exps
        .zip(piece.target_index)
        .and_then(|(factor, local)| Some(f64::from(io.get_out(local)?) * factor));
    if stored_exps.is_some() {
        let constants = wide.then_some([a, b, c]);
        scale_stored::<V>(io, grad, constants, aux, masked, mask, piece.bits);
    } else {
        let lanes = Lanes::new(stats.max, transform, mask);
        let careful = masked || mask.is_some();
        // Rows far beyond the caches: non-temporal stores skip the read for ownership of the
        // gradient's lines (and do not evict the logits still to be read).
        // Out of place only: in place, the line was just read and is in the cache already.
        let stream = matches!(io, Io::Separate(..)) && io.src().len() >= STREAM_MIN;
        match aux {
            None => recompute::<V, _>(io, lanes, grad, NoSide, careful, stream),
            Some(row) => match AuxSide::new(row, io.src().len()) {
                Some(side) => recompute::<V, _>(io, lanes, grad, side, careful, stream),
                None => io.fill(f32::NAN),
            },
        }
        if stream {
            V::stream_fence();
        }
    }
    // The target's gradient, in f64 from the logit itself: A' p_y - B - [allowed](C v_y + D).
    if let (RowTarget::Class(y), Some(local), Some(z_y)) = (target, piece.target_index, target_z) {
        let target_allowed = job
            .class_mask
            .is_none_or(|m| m.get(y).copied().unwrap_or(false))
            && transform.scalar(z_y) != f64::NEG_INFINITY;
        let t_y = if target_allowed {
            transform.scalar(z_y)
        } else {
            f64::NEG_INFINITY
        };
        // p_y from the target lane's f32 exp (as the other lanes have theirs), exact enough: the
        // cancellation that matters, A' p_y - B, is formed in f64 below.
        let e_y = if !target_allowed {
            0.0
        } else if let Some(e) = stored_e_y {
            e
        } else {
            let shifted = V::splat(t_y as f32).sub(V::splat(stats.max));
            f64::from(
                exp_nonpositive(shifted)
                    .to_array()
                    .as_ref()
                    .first()
                    .copied()
                    .unwrap_or(0.0),
            )
        };
        let p_y = e_y / stats.sum_exp;
        let v_y = aux
            .and_then(|a| a.get(local))
            .map_or(0.0, |&v| f64::from(v));
        let smooth = if target_allowed {
            coef.c * v_y + coef.d
        } else {
            0.0
        };
        let chain = if target_allowed {
            transform.derivative(z_y) / f64::from(transform.scale)
        } else {
            1.0
        };
        let g_y = scale * chain * (a_grad * p_y - coef.b - smooth);
        io.set_out(local, g_y as f32);
    }
    result
}

/// Pass 2 of the recompute strategy, the gradient from the logits (careful: masked lanes 0).
#[inline(always)]
fn recompute<V: Vector, S: Side<V>>(
    io: &mut Io<'_>,
    lanes: Lanes<'_, V>,
    grad: GradLanes<V>,
    side: S,
    careful: bool,
    stream: bool,
) {
    // Each loop compiled for the row's form (see [`Form`]): the fast variant unscaled too.
    if lanes.capped {
        recompute_lanes(io, lanes.capped(), grad, side, careful, stream);
    } else if !lanes.scaled && !careful {
        recompute_lanes(io, lanes.unscaled(), grad, side, false, stream);
    } else {
        recompute_lanes(io, lanes.uncapped(), grad, side, careful, stream);
    }
}

/// [`recompute`] with these lanes.
#[inline(always)]
fn recompute_lanes<V: Vector, S: Side<V>, F: Form>(
    io: &mut Io<'_>,
    lanes: Lanes<'_, V, F>,
    grad: GradLanes<V>,
    side: S,
    careful: bool,
    stream: bool,
) {
    let ninf = f32::NEG_INFINITY;
    let pd = PhantomData;
    if careful {
        let op = Recompute::<V, true, S, F> {
            lanes,
            grad,
            side: pd,
        };
        io.map_stream(side, ninf, op, stream);
    } else {
        let op = Recompute::<V, false, S, F> {
            lanes,
            grad,
            side: pd,
        };
        io.map_stream(side, ninf, op, stream);
    }
}

/// Pass 3 of the reload strategy over the stored exps in `io`'s destination: in f64 when `wide`
/// holds the constants (see [`beyond_f32`]), else vector by vector, zeroing the disallowed
/// lanes by the class mask's `bits` when the masked variant stored them with bits (see
/// [`SumExp::masked`]), else the masked marker when some class is `masked`.
#[inline(always)]
fn scale_stored<V: Vector>(
    io: &mut Io<'_>,
    grad: GradLanes<V>,
    wide: Option<[f64; 3]>,
    aux: Option<&[f32]>,
    masked: bool,
    mask: Option<&[bool]>,
    bits: Option<&MaskWords>,
) {
    if let Some(constants) = wide {
        scale_exps_wide(io.out(), constants, aux, mask);
        return;
    }
    match aux {
        None => scale_beside::<V, _>(io, grad, NoSide, masked, bits),
        Some(row) => match AuxSide::new(row, io.out().len()) {
            Some(side) => scale_beside::<V, _>(io, grad, side, masked, bits),
            None => io.fill(f32::NAN),
        },
    }
}

#[inline(always)]
fn scale_beside<V: Vector, S: Side<V>>(
    io: &mut Io<'_>,
    grad: GradLanes<V>,
    side: S,
    masked: bool,
    bits: Option<&MaskWords>,
) {
    let pd = PhantomData;
    match (bits, masked) {
        (Some(_), _) => {
            let op = Scale::<V, MASKED_BITS, S> {
                grad,
                side: pd,
                bits,
            };
            io.map_out(side, 0.0, op);
        }
        (None, true) => io.map_out(
            side,
            0.0,
            Scale::<V, CAREFUL, S> {
                grad,
                side: pd,
                bits,
            },
        ),
        (None, false) => io.map_out(
            side,
            0.0,
            Scale::<V, FAST, S> {
                grad,
                side: pd,
                bits,
            },
        ),
    }
}

/// Whether a finite gradient constant is beyond f32 (while the products it makes may not be:
/// `e = 0` times a huge `a`); stored exps are then scaled in f64 by [`scale_exps_wide`].
fn beyond_f32(constants: [f64; 3]) -> bool {
    constants
        .iter()
        .any(|&x| x.is_finite() && !(x as f32).is_finite())
}

/// Pass 3 of the reload strategy in f64, element by element: `g = e a + b + c v`, 0 for the
/// masked marker `e < 0` and for the classes `mask` disallows; for rows whose constants `a, b, c`
/// overflow f32 (see [`write_gradient`]).
fn scale_exps_wide(
    out: &mut [f32],
    [a, b, c]: [f64; 3],
    aux: Option<&[f32]>,
    mask: Option<&[bool]>,
) {
    for (k, g) in out.iter_mut().enumerate() {
        let e = f64::from(*g);
        let allowed = mask.is_none_or(|m| m.get(k).copied().unwrap_or(false));
        *g = if e < 0.0 || !allowed {
            0.0
        } else {
            let v = aux.and_then(|v| v.get(k)).map_or(0.0, |&v| f64::from(v));
            let cv = if c == 0.0 { 0.0 } else { c * v };
            (e * a + b + cv) as f32
        };
    }
}

#[inline(always)]
fn sums_map<V: Vector, const MODE: u8>(
    io: &mut Io<'_>,
    m: f32,
    lanes: Lanes<'_, V>,
    aux: Option<&[f32]>,
    ahead: Ahead,
) -> Stats {
    // Never with a soft-cap: rows with one take the recompute strategy, and the piece calls
    // that store exps refuse it. The fast and masked variants, the common ones, are
    // instantiated for unscaled rows too (see [`Lanes::unscaled`]).
    if MODE != CAREFUL && !lanes.scaled {
        sums_map_aux::<V, MODE, _>(io, m, lanes.unscaled(), aux, ahead)
    } else {
        sums_map_aux::<V, MODE, _>(io, m, lanes.uncapped(), aux, ahead)
    }
}

/// [`sums_map`] with these lanes.
#[inline(always)]
fn sums_map_aux<V: Vector, const MODE: u8, F: Form>(
    io: &mut Io<'_>,
    m: f32,
    lanes: Lanes<'_, V, F>,
    aux: Option<&[f32]>,
    ahead: Ahead,
) -> Stats {
    match aux {
        None => sums_map_beside::<V, MODE, _, F>(io, m, lanes, NoSide, ahead),
        Some(row) => {
            if let Some(side) = AuxSide::new(row, io.src().len()) {
                sums_map_beside::<V, MODE, _, F>(io, m, lanes, side, ahead)
            } else {
                io.fill(f32::NAN);
                Stats::SHORT_AUX
            }
        }
    }
}

#[inline(always)]
fn sums_map_beside<V: Vector, const MODE: u8, S: Side<V>, F: Form>(
    io: &mut Io<'_>,
    m: f32,
    lanes: Lanes<'_, V, F>,
    side: S,
    ahead: Ahead,
) -> Stats {
    let seed = SumExpSeed::<V, MODE, S, F> {
        max: m,
        lanes,
        ahead,
        side: PhantomData,
    };
    io.map::<V, _, false>(side, f32::NEG_INFINITY, seed)
}
