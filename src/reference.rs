//! The scalar reference: plain loops in f64, the one oracle for the crate's tests, its fuzzers and
//! its users.
//!
//! It follows the textbook definition rather than the kernels' fused form:
//! `lse = m + ln sum_k exp(z_k - m)`, `p_k = exp(z_k - lse)`, `loss = sum_k q_k (lse - z_k)` and
//! `grad_k = p_k - q_k`, with `q` from [`Smoothing::coefficients`], and the same rules for NaN,
//! infinities, ignored rows and reductions as the kernels (see [`CrossEntropy`]). It is slow on
//! purpose: no SIMD, no tricks, every element in f64.
//!
//! ```
//! use smoothce::{reference, CrossEntropy, Smoothing};
//!
//! let ce = CrossEntropy::new(4).smoothing(Smoothing::Uniform(0.1));
//! let logits = [1.0_f32, -2.0, 0.5, 3.0];
//! let mut fast = [0.0_f32; 1];
//! let mut slow = [0.0_f32; 1];
//! let a = ce.forward(&logits, &[3], &mut fast)?;
//! let b = reference::forward(&ce, &logits, &[3], &mut slow)?;
//! assert!((a - b).abs() <= 2e-6 * b.abs().max(1.0));
//! # Ok::<(), smoothce::Error>(())
//! ```

use crate::{CrossEntropy, Error, Smoothing};

/// The documented accuracy of the kernels against this reference, on the same f32 inputs: a row
/// loss within `LOSS_TOLERANCE` relative (absolute when `|loss| < 1`), every element of an
/// unscaled gradient row within `GRAD_TOLERANCE` absolute (scaled gradients: times the scale).
///
/// ```
/// assert_eq!(smoothce::reference::LOSS_TOLERANCE, 2e-6);
/// ```
pub const LOSS_TOLERANCE: f64 = 2e-6;

/// See [`LOSS_TOLERANCE`].
///
/// ```
/// assert_eq!(smoothce::reference::GRAD_TOLERANCE, 2e-6);
/// ```
pub const GRAD_TOLERANCE: f64 = 2e-6;

/// Whether a kernel result `got` agrees with the reference value `want` within `tolerance`,
/// relative when `|want| > 1` and absolute below. NaN agrees only with NaN and an infinity only
/// with the same infinity (the crate's NaN rule is exact, not approximate).
///
/// ```
/// use smoothce::reference::{agrees, LOSS_TOLERANCE};
/// assert!(agrees(1000.001, 1000.0, LOSS_TOLERANCE));
/// assert!(!agrees(0.5001, 0.5, LOSS_TOLERANCE));
/// assert!(agrees(f32::NAN, f64::NAN, LOSS_TOLERANCE));
/// assert!(!agrees(f32::INFINITY, 3.0e38, LOSS_TOLERANCE));
/// ```
#[must_use]
pub fn agrees(got: f32, want: f64, tolerance: f64) -> bool {
    let got = f64::from(got);
    if got.is_nan() || want.is_nan() {
        return got.is_nan() && want.is_nan();
    }
    if got.is_infinite() || want.is_infinite() {
        // A true value beyond f32::MAX rounds to infinity in f32.
        let rounded = want as f32;
        return got == f64::from(rounded);
    }
    (got - want).abs() <= tolerance * want.abs().max(1.0)
}

/// The loss of one row of logits with target `target`, in f64, and optionally its unscaled
/// gradient `p - q` into `grad` (same length as `logits`).
///
/// # Errors
///
/// [`Error::ZeroClasses`] for an empty row, [`Error::TargetOutOfRange`] when
/// `target >= logits.len()`, [`Error::GradLength`] when `grad` has the wrong length,
/// [`Error::InvalidSmoothing`] for an `eps` outside `[0, 1]`, and
/// [`Error::OffTargetNeedsTwoClasses`] for off-target smoothing of a one-class row.
///
/// ```
/// use smoothce::{reference, Smoothing};
/// let mut grad = [0.0_f64; 2];
/// let loss = reference::row(&[0.0, 0.0], 1, Smoothing::Uniform(0.0), Some(&mut grad))?;
/// assert!((loss - 2.0_f64.ln()).abs() < 1e-12);
/// assert_eq!(grad, [0.5, -0.5]);
/// # Ok::<(), smoothce::Error>(())
/// ```
pub fn row(
    logits: &[f32],
    target: usize,
    smoothing: Smoothing,
    grad: Option<&mut [f64]>,
) -> Result<f64, Error> {
    let classes = logits.len();
    if classes == 0 {
        return Err(Error::ZeroClasses);
    }
    let eps = smoothing.eps();
    if !(0.0..=1.0).contains(&eps) {
        return Err(Error::InvalidSmoothing { eps });
    }
    if matches!(smoothing, Smoothing::OffTarget(_)) && classes < 2 {
        return Err(Error::OffTargetNeedsTwoClasses { classes });
    }
    if target >= classes {
        return Err(Error::TargetOutOfRange {
            row: 0,
            target: target as i64,
            classes,
        });
    }
    if let Some(g) = &grad {
        if g.len() != classes {
            return Err(Error::GradLength {
                expected: classes,
                actual: g.len(),
            });
        }
    }
    match grad {
        Some(g) => Ok(row_core(logits, target, smoothing, |k, x| {
            if let Some(slot) = g.get_mut(k) {
                *slot = x;
            }
        })),
        None => Ok(row_core(logits, target, smoothing, |_, _| {})),
    }
}

/// The loss of a checked row; `emit(k, p_k - q_k)` is called for every class.
fn row_core(
    logits: &[f32],
    target: usize,
    smoothing: Smoothing,
    mut emit: impl FnMut(usize, f64),
) -> f64 {
    let each = |emit: &mut dyn FnMut(usize, f64), value: f64| {
        for k in 0..logits.len() {
            emit(k, value);
        }
    };
    // NaN or +inf anywhere: NaN loss and NaN gradient.
    if logits.iter().any(|z| z.is_nan() || *z == f32::INFINITY) {
        each(&mut emit, f64::NAN);
        return f64::NAN;
    }
    let allowed = |z: f32| z != f32::NEG_INFINITY;
    let count = logits.iter().filter(|&&z| allowed(z)).count() as u64;
    // Every class masked: nothing can be predicted, nothing can be learned.
    if count == 0 {
        each(&mut emit, 0.0);
        return f64::INFINITY;
    }
    let max = logits
        .iter()
        .map(|&z| f64::from(z))
        .fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for &z in logits {
        if allowed(z) {
            sum += libm::exp(f64::from(z) - max);
        }
    }
    // lse - z_k is formed as (max - z_k) + ln(sum): the difference of two f32 values is exact in
    // f64, where max + ln(sum) - z_k would lose ln(sum) entirely at offsets near 1e38.
    let log_sum = libm::log(sum);
    let target_allowed = logits.get(target).is_some_and(|&z| allowed(z));
    let (on, per) = smoothing.coefficients(count, target_allowed);
    let mut loss = 0.0;
    for (k, &z) in logits.iter().enumerate() {
        let shifted = f64::from(z) - max;
        let (p, mut q) = if allowed(z) {
            (libm::exp(shifted - log_sum), per)
        } else {
            (0.0, 0.0)
        };
        if k == target {
            q += on;
        }
        if q != 0.0 {
            loss += q * (log_sum - shifted);
        }
        emit(k, p - q);
    }
    loss
}

/// The reference [`CrossEntropy::forward`]: same arguments, same checks, same results up to the
/// crate's tolerance.
///
/// # Errors
///
/// Exactly those of [`CrossEntropy::forward`] (the backend setting is ignored).
///
/// ```
/// use smoothce::{reference, CrossEntropy};
/// let mut losses = [0.0_f32; 2];
/// let loss = reference::forward(&CrossEntropy::new(2), &[0.0, 0.0, 1.0, 1.0], &[0, 1], &mut losses)?;
/// assert!((loss - 2.0_f32.ln()).abs() < 1e-7);
/// # Ok::<(), smoothce::Error>(())
/// ```
pub fn forward(
    ce: &CrossEntropy,
    logits: &[f32],
    targets: &[u32],
    losses: &mut [f32],
) -> Result<f32, Error> {
    batch(ce, logits, targets, losses, None)
}

/// The reference [`CrossEntropy::forward_backward`].
///
/// # Errors
///
/// Exactly those of [`CrossEntropy::forward_backward`] (the backend setting is ignored).
///
/// ```
/// use smoothce::{reference, CrossEntropy, Reduction};
/// let ce = CrossEntropy::new(2).reduction(Reduction::Sum);
/// let mut losses = [0.0_f32; 1];
/// let mut grad = [0.0_f32; 2];
/// reference::forward_backward(&ce, &[0.0, 0.0], &[0], &mut losses, &mut grad)?;
/// assert_eq!(grad, [-0.5, 0.5]);
/// # Ok::<(), smoothce::Error>(())
/// ```
pub fn forward_backward(
    ce: &CrossEntropy,
    logits: &[f32],
    targets: &[u32],
    losses: &mut [f32],
    grad: &mut [f32],
) -> Result<f32, Error> {
    batch(ce, logits, targets, losses, Some(grad))
}

fn batch(
    ce: &CrossEntropy,
    logits: &[f32],
    targets: &[u32],
    losses: &mut [f32],
    mut grad: Option<&mut [f32]>,
) -> Result<f32, Error> {
    let job = ce.plan(
        logits.len(),
        targets,
        losses.len(),
        grad.as_ref().map(|g| g.len()),
    )?;
    let k = job.classes.get();
    let scale = f64::from(job.grad_scale);
    let mut total = 0.0;
    for (i, (z, (&t, loss))) in logits
        .chunks_exact(k)
        .zip(targets.iter().zip(losses.iter_mut()))
        .enumerate()
    {
        let mut out = grad
            .as_deref_mut()
            .and_then(|g| g.get_mut(i * k..(i + 1) * k));
        if Some(t) == job.ignore_index {
            *loss = 0.0;
            if let Some(out) = out {
                out.fill(0.0);
            }
            continue;
        }
        let row_loss = row_core(z, t as usize, job.smoothing, |c, g| {
            if let Some(slot) = out.as_deref_mut().and_then(|o| o.get_mut(c)) {
                *slot = (scale * g) as f32;
            }
        });
        *loss = row_loss as f32;
        total += row_loss;
    }
    Ok(job.finish(total))
}
