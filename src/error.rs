//! The typed error every fallible function of the crate returns.

use core::fmt;

use crate::Backend;

/// Why a call was rejected.
///
/// Every check runs before anything is written: when a function returns an `Error`, the caller's
/// `losses`, `grad` and (for in-place calls) `logits` are exactly as they were.
///
/// ```
/// use smoothce::{CrossEntropy, Error};
///
/// let ce = CrossEntropy::new(3);
/// let mut losses = [0.0_f32; 1];
/// // Target 7 does not exist in a 3-class problem.
/// let err = ce.forward(&[0.0, 1.0, 2.0], &[7], &mut losses).unwrap_err();
/// assert_eq!(err, Error::TargetOutOfRange { row: 0, target: 7, classes: 3 });
/// assert_eq!(losses, [0.0]);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// The number of classes is 0.
    ZeroClasses,
    /// [`Smoothing::OffTarget`](crate::Smoothing::OffTarget) spreads mass over the `K - 1` other
    /// classes, so it needs at least two classes.
    OffTargetNeedsTwoClasses {
        /// The number of classes that was configured.
        classes: usize,
    },
    /// The smoothing value is NaN or outside `[0, 1]`.
    InvalidSmoothing {
        /// The rejected value.
        eps: f32,
    },
    /// `logits.len()` is not `targets.len() * classes`.
    LogitsLength {
        /// `targets.len() * classes`.
        expected: usize,
        /// `logits.len()`.
        actual: usize,
    },
    /// `losses.len()` is not `targets.len()`.
    LossesLength {
        /// `targets.len()`.
        expected: usize,
        /// `losses.len()`.
        actual: usize,
    },
    /// `grad.len()` is not `targets.len() * classes`.
    GradLength {
        /// `targets.len() * classes`.
        expected: usize,
        /// `grad.len()`.
        actual: usize,
    },
    /// A target is not a class index (`>= classes`) and not the ignore index.
    TargetOutOfRange {
        /// The row holding the target.
        row: usize,
        /// The target value.
        target: i64,
        /// The number of classes.
        classes: usize,
    },
    /// `targets.len() * classes` does not fit in `usize`.
    SizeOverflow {
        /// `targets.len()`.
        rows: usize,
        /// The number of classes.
        classes: usize,
    },
    /// Soft targets whose length is not a multiple of the number of classes.
    TargetsLength {
        /// The number of classes.
        expected_multiple_of: usize,
        /// The soft targets' length.
        actual: usize,
    },
    /// Class weights whose length is not the number of classes.
    WeightsLength {
        /// The number of classes.
        expected: usize,
        /// The weights' length.
        actual: usize,
    },
    /// A class weight that is negative, NaN or infinite.
    InvalidWeight {
        /// The class of the weight.
        class: usize,
        /// The weight.
        value: f32,
    },
    /// An option value out of its domain (`z_loss` negative or non-finite; `softcap`,
    /// `logit_scale` or `mean_denominator` not finite and positive; `upstream` not finite).
    InvalidOption {
        /// The option's builder method.
        option: &'static str,
        /// The rejected value.
        value: f32,
    },
    /// A class mask whose length is not the number of classes.
    MaskLength {
        /// The number of classes.
        expected: usize,
        /// The mask's length.
        actual: usize,
    },
    /// A class mask that allows no class.
    MaskAllowsNoClass,
    /// An [`Extras`](crate::Extras) slice whose length is not the number of rows.
    ExtrasLength {
        /// The field of `Extras`.
        extra: &'static str,
        /// The number of rows.
        expected: usize,
        /// The slice's length.
        actual: usize,
    },
    /// A per-row upstream gradient that is NaN or infinite.
    InvalidRowScale {
        /// The row.
        row: usize,
        /// The value.
        value: f32,
    },
    /// A piece that does not fit in the row: `offset + width > classes`.
    PieceOutOfRange {
        /// The piece's first class.
        offset: usize,
        /// The piece's width.
        width: usize,
        /// The number of classes.
        classes: usize,
    },
    /// A piece's own [`RowState`](crate::RowState) given to
    /// [`piece_backward_from_exps`](crate::CrossEntropy::piece_backward_from_exps) that cannot
    /// be part of the row's merged state (more allowed classes, or a greater max).
    StateMismatch {
        /// The row.
        row: usize,
    },
    /// A combination of options the crate does not define.
    Unsupported {
        /// What was combined.
        what: &'static str,
    },
    /// The requested backend is not compiled in or not supported by this CPU.
    BackendUnavailable {
        /// The backend that was asked for.
        backend: Backend,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::ZeroClasses => f.write_str("the number of classes must be at least 1"),
            Error::OffTargetNeedsTwoClasses { classes } => write!(
                f,
                "off-target smoothing needs at least 2 classes, got {classes}"
            ),
            Error::InvalidSmoothing { eps } => {
                write!(f, "smoothing must be a number in [0, 1], got {eps}")
            }
            Error::LogitsLength { expected, actual } => write!(
                f,
                "logits has {actual} elements, expected rows * classes = {expected}"
            ),
            Error::LossesLength { expected, actual } => write!(
                f,
                "losses has {actual} elements, expected one per row = {expected}"
            ),
            Error::GradLength { expected, actual } => write!(
                f,
                "grad has {actual} elements, expected rows * classes = {expected}"
            ),
            Error::TargetOutOfRange {
                row,
                target,
                classes,
            } => write!(
                f,
                "target {target} of row {row} is not a class in 0..{classes} nor the ignore index"
            ),
            Error::SizeOverflow { rows, classes } => {
                write!(f, "{rows} rows of {classes} classes overflow usize")
            }
            Error::TargetsLength {
                expected_multiple_of,
                actual,
            } => write!(
                f,
                "soft targets have {actual} elements, not a multiple of the {expected_multiple_of} classes"
            ),
            Error::WeightsLength { expected, actual } => write!(
                f,
                "class weights have {actual} elements, expected one per class = {expected}"
            ),
            Error::InvalidWeight { class, value } => write!(
                f,
                "the weight of class {class} is {value}; weights must be finite and >= 0"
            ),
            Error::InvalidOption { option, value } => {
                write!(f, "{value} is not a valid value for {option}")
            }
            Error::MaskLength { expected, actual } => write!(
                f,
                "the class mask has {actual} elements, expected one per class = {expected}"
            ),
            Error::MaskAllowsNoClass => f.write_str("the class mask allows no class"),
            Error::ExtrasLength {
                extra,
                expected,
                actual,
            } => write!(
                f,
                "extras.{extra} has {actual} elements, expected one per row = {expected}"
            ),
            Error::InvalidRowScale { row, value } => {
                write!(f, "the upstream gradient of row {row} is {value}, not finite")
            }
            Error::PieceOutOfRange {
                offset,
                width,
                classes,
            } => write!(
                f,
                "a piece of {width} classes at offset {offset} does not fit in {classes} classes"
            ),
            Error::StateMismatch { row } => write!(
                f,
                "the piece state of row {row} is not part of the row's merged state"
            ),
            Error::Unsupported { what } => write!(f, "unsupported: {what}"),
            Error::BackendUnavailable { backend } => {
                write!(
                    f,
                    "the {backend:?} backend is not available on this CPU or target"
                )
            }
        }
    }
}

impl core::error::Error for Error {}
