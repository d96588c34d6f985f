//! The targets of a batch: class indices of the integer types people have, or probability rows.

/// The targets of a batch, borrowed from the caller.
///
/// Class indices come in the integer type the caller already has (`u8`, `u16`, `u32`, `i32`,
/// `i64`, `usize`); signed types allow PyTorch's `ignore_index = -100` (set with
/// [`CrossEntropy::ignore_index_signed`](crate::CrossEntropy::ignore_index_signed)).
/// [`Targets::Soft`] holds one probability row of `K` values per logit row (PyTorch's
/// probability targets); smoothing is applied to them as PyTorch does,
/// `q = (1 - eps) t + eps / K`.
///
/// Every `&[T]` and `&[T; N]` of the integer types converts with `into()`.
///
/// ```
/// use smoothce::Targets;
/// let t: Targets = (&[3_i64, -100, 0][..]).into();
/// assert_eq!(t.rows(10), Some(3));
/// let soft = Targets::Soft(&[0.5, 0.5, 0.0, 1.0]);
/// assert_eq!(soft.rows(2), Some(2));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Targets<'t> {
    /// Class indices as `u8`.
    U8(&'t [u8]),
    /// Class indices as `u16`.
    U16(&'t [u16]),
    /// Class indices as `u32`.
    U32(&'t [u32]),
    /// Class indices as `i32`.
    I32(&'t [i32]),
    /// Class indices as `i64` (PyTorch's `long`).
    I64(&'t [i64]),
    /// Class indices as `usize`.
    Usize(&'t [usize]),
    /// Target probabilities, row-major `[N, K]`, each row a distribution over the classes.
    Soft(&'t [f32]),
}

impl<'t> Targets<'t> {
    /// The number of rows these targets describe for `classes` classes; `None` for soft targets
    /// whose length is not a multiple of `classes` (or `classes == 0`).
    ///
    /// ```
    /// use smoothce::Targets;
    /// assert_eq!(Targets::U8(&[1, 2]).rows(5), Some(2));
    /// assert_eq!(Targets::Soft(&[0.5; 5]).rows(2), None);
    /// ```
    #[must_use]
    pub fn rows(&self, classes: usize) -> Option<usize> {
        match self {
            Targets::U8(t) => Some(t.len()),
            Targets::U16(t) => Some(t.len()),
            Targets::U32(t) => Some(t.len()),
            Targets::I32(t) => Some(t.len()),
            Targets::I64(t) => Some(t.len()),
            Targets::Usize(t) => Some(t.len()),
            Targets::Soft(t) => {
                if classes == 0 || t.len() % classes != 0 {
                    None
                } else {
                    Some(t.len() / classes)
                }
            }
        }
    }

    /// The class of row `row` as i64 (`usize` values beyond `i64::MAX` saturate); `None` for soft
    /// targets or a row out of range.
    #[inline]
    pub(crate) fn class(&self, row: usize) -> Option<i64> {
        match self {
            Targets::U8(t) => t.get(row).map(|&v| i64::from(v)),
            Targets::U16(t) => t.get(row).map(|&v| i64::from(v)),
            Targets::U32(t) => t.get(row).map(|&v| i64::from(v)),
            Targets::I32(t) => t.get(row).map(|&v| i64::from(v)),
            Targets::I64(t) => t.get(row).copied(),
            Targets::Usize(t) => t.get(row).map(|&v| i64::try_from(v).unwrap_or(i64::MAX)),
            Targets::Soft(_) => None,
        }
    }

    /// The classes of rows `first..first + out.len()` as f32 (exact: at most 2^24), `-1.0` for a
    /// row whose target is `ignore`, a row past the end, and every row of soft targets. The
    /// integer type is matched once, not once per row.
    pub(crate) fn class_lanes(&self, first: usize, ignore: Option<i64>, out: &mut [f32]) {
        match self {
            Targets::U8(t) => fill_lanes(t, first, ignore, out, i64::from),
            Targets::U16(t) => fill_lanes(t, first, ignore, out, i64::from),
            Targets::U32(t) => fill_lanes(t, first, ignore, out, i64::from),
            Targets::I32(t) => fill_lanes(t, first, ignore, out, i64::from),
            Targets::I64(t) => fill_lanes(t, first, ignore, out, |v| v),
            Targets::Usize(t) => fill_lanes(t, first, ignore, out, |v| {
                i64::try_from(v).unwrap_or(i64::MAX)
            }),
            Targets::Soft(_) => out.fill(-1.0),
        }
    }

    /// Checks every class target against `classes` in order, skipping rows whose target is
    /// `ignore`, and calls `each` with the class of every other row; returns how many rows it
    /// called `each` for, or the first `(row, target)` out of range. Soft targets: `Ok(0)`. The
    /// integer type is matched once, not once per row.
    pub(crate) fn scan_classes(
        &self,
        ignore: Option<i64>,
        classes: usize,
        each: impl FnMut(usize),
    ) -> Result<usize, (usize, i64)> {
        match self {
            Targets::U8(t) => scan(t, ignore, classes, each, i64::from),
            Targets::U16(t) => scan(t, ignore, classes, each, i64::from),
            Targets::U32(t) => scan(t, ignore, classes, each, i64::from),
            Targets::I32(t) => scan(t, ignore, classes, each, i64::from),
            Targets::I64(t) => scan(t, ignore, classes, each, |v| v),
            Targets::Usize(t) => scan(t, ignore, classes, each, |v| {
                i64::try_from(v).unwrap_or(i64::MAX)
            }),
            Targets::Soft(_) => Ok(0),
        }
    }

    /// Row `row` of soft targets.
    pub(crate) fn soft_row(self, row: usize, classes: usize) -> Option<&'t [f32]> {
        match self {
            Targets::Soft(t) => t.get(row * classes..(row + 1) * classes),
            _ => None,
        }
    }
}

macro_rules! from_slices {
    ($($t:ty => $variant:ident),*) => {$(
        impl<'t> From<&'t [$t]> for Targets<'t> {
            fn from(targets: &'t [$t]) -> Self {
                Targets::$variant(targets)
            }
        }
        impl<'t, const N: usize> From<&'t [$t; N]> for Targets<'t> {
            fn from(targets: &'t [$t; N]) -> Self {
                Targets::$variant(targets)
            }
        }
    )*};
}

from_slices!(u8 => U8, u16 => U16, u32 => U32, i32 => I32, i64 => I64, usize => Usize);

/// [`Targets::class_lanes`] for one integer type.
fn fill_lanes<T: Copy>(
    targets: &[T],
    first: usize,
    ignore: Option<i64>,
    out: &mut [f32],
    class: impl Fn(T) -> i64,
) {
    let rows = targets.get(first..).unwrap_or(&[]);
    for (i, lane) in out.iter_mut().enumerate() {
        *lane = match rows.get(i).map(|&t| class(t)) {
            Some(c) if Some(c) != ignore && c >= 0 => c as f32,
            _ => -1.0,
        };
    }
}

/// [`Targets::scan_classes`] for one integer type.
fn scan<T: Copy>(
    targets: &[T],
    ignore: Option<i64>,
    classes: usize,
    mut each: impl FnMut(usize),
    class: impl Fn(T) -> i64,
) -> Result<usize, (usize, i64)> {
    let mut counted = 0;
    for (row, &target) in targets.iter().enumerate() {
        let c = class(target);
        if Some(c) == ignore {
            continue;
        }
        match usize::try_from(c).ok().filter(|&x| x < classes) {
            Some(x) => {
                counted += 1;
                each(x);
            }
            None => return Err((row, c)),
        }
    }
    Ok(counted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_lanes_mark_ignored_and_missing_rows() {
        let mut out = [7.0_f32; 8];
        Targets::U8(&[0, 1, 2]).class_lanes(0, None, &mut out);
        assert_eq!(out, [0.0, 1.0, 2.0, -1.0, -1.0, -1.0, -1.0, -1.0]);
        let mut out = [7.0_f32; 4];
        Targets::I64(&[3, -100, 5, 9, 4]).class_lanes(1, Some(-100), &mut out);
        assert_eq!(out, [-1.0, 5.0, 9.0, 4.0]);
        Targets::Usize(&[2, usize::MAX]).class_lanes(0, Some(2), &mut out);
        // usize::MAX saturates to i64::MAX where usize has 64 bits (it fits on 32-bit targets).
        let big = i64::try_from(usize::MAX).unwrap_or(i64::MAX) as f32;
        assert_eq!(out[..2], [-1.0, big]);
        assert_eq!(out[2..], [-1.0, -1.0]);
        Targets::Soft(&[0.5, 0.5]).class_lanes(0, None, &mut out);
        assert_eq!(out, [-1.0; 4]);
    }

    #[test]
    fn scan_classes_counts_and_reports_the_first_bad_row() {
        let mut seen = std::vec::Vec::new();
        let counted = Targets::I32(&[1, -100, 2, 0]).scan_classes(Some(-100), 3, |c| seen.push(c));
        assert_eq!((counted, seen), (Ok(3), std::vec![1, 2, 0]));
        let bad = Targets::U16(&[0, 3, 7]).scan_classes(None, 3, |_| {});
        assert_eq!(bad, Err((1, 3)));
    }
}
