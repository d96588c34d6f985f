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
