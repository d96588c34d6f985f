//! Rows in pieces: vocabulary shards and streamed chunks that combine to the exact loss and
//! gradient.
//!
//! A row of `K` logits split into pieces (tensor-parallel slices of the vocabulary, or chunks a
//! matrix multiply produces one at a time) is handled in three steps:
//!
//! 1. [`CrossEntropy::piece_states`] computes, for each row, the [`RowState`] of one piece: the
//!    piece's max, its sum of exps relative to that max, the shifted sum of its logits, its count
//!    of allowed classes, the weighted sums class weights need, and the target's logit if the
//!    piece holds it. Same SIMD kernels as the unsplit calls.
//! 2. [`RowState::merge`] combines the states of the pieces of a row, exactly (up to f64
//!    rounding), in any order or tree shape: `m = max m_r`, `s = sum s_r exp(m_r - m)`, shifted
//!    sums rebased by `n_r (m_r - m)`. [`RowState::to_words`] packs a state into eight f64 for an
//!    all-reduce (the host framework does the communication).
//! 3. [`CrossEntropy::finish_states`] gives the row losses (and lse, z-loss, correctness) from the
//!    merged states; [`CrossEntropy::piece_backward`] (or `_in_place`) writes the gradient of one
//!    piece from the merged states, with no further communication.
//!
//! Steps 1 and 3 come in two forms:
//!
//! - **Keeping the logits** ([`piece_states`](CrossEntropy::piece_states), then
//!   [`piece_backward`](CrossEntropy::piece_backward) or `_in_place`): step 3 recomputes every exp
//!   from the logits. For streamed chunks that are not kept (recompute the chunk in the second
//!   sweep, as `examples/streaming.rs` does), for pieces of more than about 2^17 classes, where
//!   re-reading the logits moves fewer bytes than storing exps, and with a soft-cap.
//! - **Keeping the exps** ([`piece_states_and_exps`](CrossEntropy::piece_states_and_exps), or
//!   `_in_place`, then [`piece_backward_from_exps`](CrossEntropy::piece_backward_from_exps)):
//!   step 1 also stores each piece's `exp(t - m_piece)` in the piece's gradient buffer (or over its
//!   logits), and step 3 rescales them by `exp(m_piece - m) / s`, given the piece's own states
//!   besides the merged ones: one exp per logit, as in the unsplit calls. The faster form when the
//!   pieces are held anyway (tensor-parallel shards). On one device, going through all three steps
//!   a tile of rows at a time (tiles whose buffers fit in L2: logits and exps, or the logits alone
//!   in place; use [`mean_denominator`](CrossEntropy::mean_denominator) so that the tiles' losses
//!   add up) keeps the exps cached until step 3 reads them. Name the next piece's logits in each
//!   piece's step-1 call with [`read_ahead`](CrossEntropy::read_ahead): the call's last row then
//!   prefetches them, as the unsplit call's rows prefetch the next row (a tile of one or two rows
//!   has no next row of its own). 8 pieces then take 1.04x the unsplit call at [16×32000] and
//!   0.96x at [4×128256] (in place 1.08x and 0.91x; without the hint 1.09x and 1.02x, in place
//!   1.17x and 1.07x). `BENCHMARKS.md` has the figures.
//!
//! The smoothing always uses the global number of classes `K` (and the global count of allowed
//! classes when some are masked), never the piece's: Megatron-LM's local-`K` bug cannot happen.
//! Every option of [`CrossEntropy`] works in pieces, soft targets included (each piece reads its
//! columns of the full `[N, K]` probability rows, passed to every step). Three limits: the
//! per-row correctness of soft-target rows is not in the states
//! ([`finish_states`](CrossEntropy::finish_states) refuses `Extras::correct` for soft targets
//! with an [`Error::Unsupported`](crate::Error::Unsupported)); the piece gradients take no
//! per-row upstream scales (`Extras::row_scales`; with [`Reduction::None`](crate::Reduction::None)
//! scale the gradient rows yourself); and off-target smoothing with `eps > 2/3` on a row whose
//! target logit lies so far below the others that it swamps them in f32 (`[-1e30, 1, 0, 0.5]`)
//! keeps the cancellation that the unsplit calls avoid with an exact sum of the other classes.
//!
//! ```
//! use smoothce::{CrossEntropy, Extras, Piece, RowState, Smoothing};
//!
//! let ce = CrossEntropy::new(6).smoothing(Smoothing::Uniform(0.1));
//! let row = [0.5_f32, -1.0, 2.0, 0.0, 1.5, -0.5];
//! let targets = [4_u32];
//! // Two pieces of three classes each.
//! let (left, right) = (Piece { offset: 0, width: 3 }, Piece { offset: 3, width: 3 });
//! let mut a = [RowState::EMPTY];
//! let mut b = [RowState::EMPTY];
//! ce.piece_states(&row[..3], left, &targets, &mut a)?;
//! ce.piece_states(&row[3..], right, &targets, &mut b)?;
//! let merged = [a[0].merge(b[0])];
//! let mut losses = [0.0_f32];
//! let split = ce.finish_states(&merged, &targets, &mut losses, Extras::default())?;
//! let whole = ce.forward(&row, &targets, &mut [0.0])?;
//! assert!((split.loss - whole).abs() < 1e-6);
//! // Each piece's gradient from the merged state alone.
//! let mut grad = [0.0_f32; 6];
//! ce.piece_backward(&row[..3], left, &targets, &merged, &mut grad[..3])?;
//! ce.piece_backward(&row[3..], right, &targets, &merged, &mut grad[3..])?;
//! let mut full = [0.0_f32; 6];
//! ce.forward_backward(&row, &targets, &mut [0.0], &mut full)?;
//! assert!(grad.iter().zip(&full).all(|(a, b)| (a - b).abs() < 1e-6));
//! # Ok::<(), smoothce::Error>(())
//! ```

use crate::kernel::Stats;
#[cfg(doc)]
use crate::CrossEntropy;

/// Where a piece sits in the full rows: classes `offset .. offset + width`.
///
/// ```
/// let p = smoothce::Piece { offset: 1000, width: 500 };
/// assert_eq!(p.offset + p.width, 1500);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Piece {
    /// Index of the piece's first class in the full row.
    pub offset: usize,
    /// Number of classes in the piece (may be 0).
    pub width: usize,
}

/// The mergeable statistics of one piece of one row (see the [module docs](crate::shard)).
///
/// ```
/// use smoothce::RowState;
/// let s = RowState::EMPTY;
/// assert_eq!(s.merge(RowState::EMPTY), RowState::EMPTY);
/// assert_eq!(RowState::from_words(s.to_words()), s);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowState {
    pub(crate) stats: Stats,
    /// The target's raw logit, held by exactly one piece of the row.
    pub(crate) target_logit: Option<f32>,
}

impl RowState {
    /// The state of an empty piece: the identity of [`merge`](Self::merge).
    ///
    /// ```
    /// use smoothce::{CrossEntropy, Piece, RowState};
    /// let ce = CrossEntropy::new(4);
    /// let row = [0.5_f32, -1.0, 2.0, 0.25];
    /// // State buffers start as EMPTY; piece_states overwrites them.
    /// let mut pieces = [[RowState::EMPTY]; 2];
    /// ce.piece_states(&row[..2], Piece { offset: 0, width: 2 }, &[2_u32], &mut pieces[0])?;
    /// ce.piece_states(&row[2..], Piece { offset: 2, width: 2 }, &[2_u32], &mut pieces[1])?;
    /// assert_ne!(pieces[0][0], RowState::EMPTY);
    /// // Merging EMPTY changes nothing, so a reduction over the pieces can start from it.
    /// assert_eq!(pieces[1][0].merge(RowState::EMPTY), pieces[1][0]);
    /// let merged = pieces.iter().fold(RowState::EMPTY, |acc, p| acc.merge(p[0]));
    /// assert_eq!(merged, pieces[0][0].merge(pieces[1][0]));
    /// let lse = row.iter().map(|&z| f64::from(z).exp()).sum::<f64>().ln();
    /// assert!((merged.lse() - lse).abs() < 1e-6);
    /// assert_eq!(RowState::EMPTY.lse(), f64::NEG_INFINITY);
    /// # Ok::<(), smoothce::Error>(())
    /// ```
    pub const EMPTY: RowState = RowState {
        stats: Stats::EMPTY,
        target_logit: None,
    };

    /// The state of the union of two disjoint pieces of the same row. Associative and
    /// commutative up to f64 rounding; [`RowState::EMPTY`] is its identity.
    ///
    /// ```
    /// use smoothce::RowState;
    /// assert_eq!(RowState::EMPTY.merge(RowState::EMPTY), RowState::EMPTY);
    /// ```
    #[must_use]
    pub fn merge(self, other: RowState) -> RowState {
        RowState {
            stats: self.stats.merge(other.stats),
            target_logit: self.target_logit.or(other.target_logit),
        }
    }

    /// Whether this state can be one piece's part of `merged`: a valid piece state has no more
    /// allowed classes and no greater max than the merge it is part of (an invalid merge
    /// contains anything).
    pub(crate) fn is_part_of(&self, merged: &RowState) -> bool {
        merged.stats.invalid
            || (!self.stats.invalid
                && self.stats.allowed <= merged.stats.allowed
                && (self.stats.allowed == 0 || self.stats.max <= merged.stats.max))
    }

    /// The log-sum-exp of the (scaled, soft-capped) logits seen so far; `-inf` for an empty
    /// state, NaN if a NaN or `+inf` was seen.
    ///
    /// ```
    /// assert_eq!(smoothce::RowState::EMPTY.lse(), f64::NEG_INFINITY);
    /// ```
    #[must_use]
    pub fn lse(&self) -> f64 {
        if self.stats.invalid {
            f64::NAN
        } else if self.stats.allowed == 0 {
            f64::NEG_INFINITY
        } else {
            f64::from(self.stats.max) + crate::ln::ln(self.stats.sum_exp)
        }
    }

    /// The state as eight f64 words, for an all-reduce or any transport. Exact round trip with
    /// [`from_words`](Self::from_words).
    ///
    /// ```
    /// use smoothce::RowState;
    /// assert_eq!(RowState::from_words(RowState::EMPTY.to_words()), RowState::EMPTY);
    /// ```
    #[must_use]
    pub fn to_words(&self) -> [f64; 8] {
        let s = &self.stats;
        let flags =
            f64::from(u8::from(s.invalid)) + 2.0 * f64::from(u8::from(self.target_logit.is_some()));
        [
            f64::from(s.max),
            s.sum_exp,
            s.shifted_sum,
            s.allowed as f64,
            s.aux_shifted,
            s.aux_sum,
            s.aux_masked,
            // The flags in the integer part, the target logit as the f32 bits in the fraction
            // would lose NaN payloads: store flags + bits exactly in an f64 integer instead.
            flags + 4.0 * f64::from(self.target_logit.unwrap_or(0.0).to_bits()),
        ]
    }

    /// The inverse of [`to_words`](Self::to_words). Words that no state produced give a state
    /// that is merely meaningless, never a panic.
    ///
    /// ```
    /// use smoothce::RowState;
    /// let words = RowState::EMPTY.to_words();
    /// assert_eq!(RowState::from_words(words), RowState::EMPTY);
    /// ```
    #[must_use]
    pub fn from_words(words: [f64; 8]) -> RowState {
        let [max, sum_exp, shifted_sum, allowed, aux_shifted, aux_sum, aux_masked, packed] = words;
        let packed = packed as u64;
        let bits = (packed >> 2) as u32;
        RowState {
            stats: Stats {
                max: max as f32,
                sum_exp,
                shifted_sum,
                allowed: allowed as u64,
                aux_shifted,
                aux_sum,
                aux_masked,
                invalid: packed & 1 != 0,
            },
            target_logit: (packed & 2 != 0).then_some(f32::from_bits(bits)),
        }
    }
}
