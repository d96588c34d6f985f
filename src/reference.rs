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

use crate::kernel::{Transform, Weights};
use crate::{CrossEntropy, Error, Extras, Smoothing, Summary, Targets};

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
    let config = RowConfig {
        smoothing,
        transform: Transform {
            scale: 1.0,
            cap: None,
        },
        weights: Weights::None,
        mask: None,
        z_loss: 0.0,
    };
    let target = RefTarget::Class(target);
    match grad {
        Some(g) => Ok(row_core(&config, logits, target, |k, x| {
            if let Some(slot) = g.get_mut(k) {
                *slot = x;
            }
        })
        .loss),
        None => Ok(row_core(&config, logits, target, |_, _| {}).loss),
    }
}

/// What the reference needs of a configuration, per row.
struct RowConfig<'a> {
    smoothing: Smoothing,
    transform: Transform,
    weights: Weights<'a>,
    mask: Option<&'a [bool]>,
    z_loss: f64,
}

#[derive(Clone, Copy)]
enum RefTarget<'a> {
    Class(usize),
    Soft(&'a [f32]),
}

/// One row's results in f64.
#[derive(Clone, Copy, Default)]
struct RowOut {
    loss: f64,
    z_loss: f64,
    lse: f64,
    correct: bool,
}

/// The loss of a checked row; `emit(k, g_k)` is called for every class with the unscaled
/// gradient of the row's loss with respect to `z_k`.
#[allow(clippy::too_many_lines)]
fn row_core(
    config: &RowConfig<'_>,
    logits: &[f32],
    target: RefTarget<'_>,
    mut emit: impl FnMut(usize, f64),
) -> RowOut {
    let each = |emit: &mut dyn FnMut(usize, f64), value: f64| {
        for k in 0..logits.len() {
            emit(k, value);
        }
    };
    let mask_allows = |k: usize| {
        config
            .mask
            .is_none_or(|m| m.get(k).copied().unwrap_or(false))
    };
    // A -inf logit is a masked class, and so is a finite logit that the logit scale takes below
    // -f32::MAX (it counts as -inf, as one taken past f32::MAX counts as +inf).
    let allowed = |k: usize, z: f32| {
        mask_allows(k)
            && z != f32::NEG_INFINITY
            && config.transform.scalar(z) as f32 != f32::NEG_INFINITY
    };
    // NaN or +inf in a class that is read: NaN loss and NaN gradient.
    if logits.iter().enumerate().any(|(k, z)| {
        // A finite logit scaled past f32::MAX counts as +inf, as in the kernels.
        let overflows = || config.transform.scalar(*z) as f32 == f32::INFINITY;
        mask_allows(k) && (z.is_nan() || *z == f32::INFINITY || overflows())
    }) {
        each(&mut emit, f64::NAN);
        return RowOut {
            loss: f64::NAN,
            z_loss: f64::NAN,
            lse: f64::NAN,
            correct: false,
        };
    }
    let count = logits
        .iter()
        .enumerate()
        .filter(|&(k, &z)| allowed(k, z))
        .count() as u64;
    // Every class masked: nothing can be predicted, nothing can be learned.
    if count == 0 {
        each(&mut emit, 0.0);
        return RowOut {
            loss: f64::INFINITY,
            z_loss: 0.0,
            lse: f64::NEG_INFINITY,
            correct: false,
        };
    }
    let t = |k: usize, z: f32| {
        if allowed(k, z) {
            config.transform.scalar(z)
        } else {
            f64::NEG_INFINITY
        }
    };
    let max = logits
        .iter()
        .enumerate()
        .map(|(k, &z)| t(k, z))
        .fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for (k, &z) in logits.iter().enumerate() {
        if allowed(k, z) {
            sum += libm::exp(t(k, z) - max);
        }
    }
    // lse - t_k is formed as (max - t_k) + ln(sum): max + ln(sum) - t_k would lose ln(sum)
    // entirely at offsets near 1e38.
    let log_sum = libm::log(sum);
    let lse = max + log_sum;
    let eps = f64::from(config.smoothing.eps());
    // q_k of the (weighted) target distribution, and the row's weight.
    let (target_class, target_allowed) = match target {
        RefTarget::Class(y) => (Some(y), logits.get(y).is_some_and(|&z| allowed(y, z))),
        RefTarget::Soft(_) => (None, true),
    };
    let (on, per) = match target {
        RefTarget::Class(_) => config.smoothing.coefficients(count, target_allowed),
        RefTarget::Soft(_) => (1.0 - eps, eps / count as f64),
    };
    let weight = |k: usize| match config.weights {
        Weights::PerClass(w) | Weights::PerTarget(w) => {
            w.get(k).map_or(f64::NAN, |&v| f64::from(v))
        }
        Weights::None => 1.0,
    };
    let (w_y, row_weight) = match (config.weights, target_class) {
        (Weights::PerClass(_), Some(y)) => (weight(y), 1.0),
        (Weights::PerTarget(_), Some(y)) => (1.0, weight(y)),
        _ => (1.0, 1.0),
    };
    let q = |k: usize, z: f32| {
        let smooth = if allowed(k, z) {
            match (config.weights, target) {
                (Weights::PerClass(_), RefTarget::Class(_)) => per * weight(k),
                _ => per,
            }
        } else {
            0.0
        };
        let hard = match target {
            RefTarget::Class(y) if k == y => on * w_y,
            RefTarget::Class(_) => 0.0,
            RefTarget::Soft(u) => on * u.get(k).map_or(0.0, |&v| f64::from(v)),
        };
        smooth + hard
    };
    let mut loss = 0.0;
    let mut total_q = 0.0;
    for (k, &z) in logits.iter().enumerate() {
        let q = q(k, z);
        total_q += q;
        if q != 0.0 {
            let shifted = t(k, z) - max;
            loss += q * (log_sum - shifted);
        }
    }
    let z_loss = config.z_loss * lse * lse;
    for (k, &z) in logits.iter().enumerate() {
        let g = if allowed(k, z) {
            let p = libm::exp(t(k, z) - max - log_sum);
            let g_t = total_q * p - q(k, z) + 2.0 * config.z_loss * lse * p;
            g_t * config.transform.derivative(z)
        } else if matches!(target, RefTarget::Class(y) if y == k) {
            // A masked target: its probability is 0 and its target mass stays; the chain
            // factor is the logit scale alone (a soft-cap's would vanish at -inf).
            -q(k, z) * f64::from(config.transform.scale)
        } else {
            0.0
        };
        emit(k, row_weight * g);
    }
    let zmax = logits
        .iter()
        .enumerate()
        .filter(|&(k, &z)| allowed(k, z))
        .fold(f32::NEG_INFINITY, |m, (_, &z)| m.max(z));
    let correct = match target {
        // Ties after the transform count (a soft-cap saturates): compare the f32 transformed
        // logits, as the kernels do.
        RefTarget::Class(y) => {
            target_allowed && logits.get(y).is_some_and(|&z| t(y, z) as f32 == max as f32)
        }
        RefTarget::Soft(u) => {
            let mut best: Option<(usize, f32)> = None;
            for (k, &p) in u.iter().enumerate() {
                if best.is_none_or(|(_, b)| p > b) {
                    best = Some((k, p));
                }
            }
            best.is_some_and(|(k, _)| logits.get(k).is_some_and(|&z| allowed(k, z) && z == zmax))
        }
    };
    RowOut {
        loss: row_weight * loss + z_loss,
        z_loss,
        lse,
        correct,
    }
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
    ce: &CrossEntropy<'_>,
    logits: &[f32],
    targets: &[u32],
    losses: &mut [f32],
) -> Result<f32, Error> {
    batch(
        ce,
        logits,
        Targets::U32(targets),
        losses,
        None,
        Extras::default(),
    )
    .map(|s| s.loss)
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
    ce: &CrossEntropy<'_>,
    logits: &[f32],
    targets: &[u32],
    losses: &mut [f32],
    grad: &mut [f32],
) -> Result<f32, Error> {
    batch(
        ce,
        logits,
        Targets::U32(targets),
        losses,
        Some(grad),
        Extras::default(),
    )
    .map(|s| s.loss)
}

/// The reference [`CrossEntropy::forward_with`]: every option, every target type, the extras.
///
/// # Errors
///
/// Exactly those of [`CrossEntropy::forward_with`] (the backend setting is ignored).
///
/// ```
/// use smoothce::{reference, CrossEntropy, Extras};
/// let ce = CrossEntropy::new(3).z_loss(1e-3).logit_scale(0.5);
/// let mut fast = [0.0_f32; 1];
/// let mut slow = [0.0_f32; 1];
/// let a = ce.forward_with(&[1.0, 2.0, 3.0], &[1_i32], &mut fast, Extras::default())?;
/// let b = reference::forward_with(&ce, &[1.0, 2.0, 3.0], &[1_i32], &mut slow, Extras::default())?;
/// assert!((a.loss - b.loss).abs() < 1e-6 && (a.z_loss - b.z_loss).abs() < 1e-7);
/// # Ok::<(), smoothce::Error>(())
/// ```
pub fn forward_with<'t>(
    ce: &CrossEntropy<'_>,
    logits: &[f32],
    targets: impl Into<Targets<'t>>,
    losses: &mut [f32],
    extras: Extras<'_>,
) -> Result<Summary, Error> {
    batch(ce, logits, targets.into(), losses, None, extras)
}

/// The reference [`CrossEntropy::forward_backward_with`].
///
/// # Errors
///
/// Exactly those of [`CrossEntropy::forward_backward_with`] (the backend setting is ignored).
///
/// ```
/// use smoothce::{reference, CrossEntropy, Extras, Targets};
/// let ce = CrossEntropy::new(2);
/// let mut losses = [0.0_f32; 1];
/// let mut grad = [0.0_f32; 2];
/// reference::forward_backward_with(&ce, &[0.0, 0.0], Targets::Soft(&[0.25, 0.75]), &mut losses, &mut grad, Extras::default())?;
/// assert_eq!(grad, [0.25, -0.25]);
/// # Ok::<(), smoothce::Error>(())
/// ```
pub fn forward_backward_with<'t>(
    ce: &CrossEntropy<'_>,
    logits: &[f32],
    targets: impl Into<Targets<'t>>,
    losses: &mut [f32],
    grad: &mut [f32],
    extras: Extras<'_>,
) -> Result<Summary, Error> {
    batch(ce, logits, targets.into(), losses, Some(grad), extras)
}

fn batch(
    ce: &CrossEntropy<'_>,
    logits: &[f32],
    targets: Targets<'_>,
    losses: &mut [f32],
    mut grad: Option<&mut [f32]>,
    mut extras: Extras<'_>,
) -> Result<Summary, Error> {
    let plan = ce.plan(
        logits.len(),
        None,
        targets,
        losses.len(),
        grad.as_ref().map(|g| g.len()),
        &extras,
    )?;
    let job = &plan.job;
    let k = job.classes.get();
    let config = RowConfig {
        smoothing: job.smoothing,
        transform: job.transform,
        weights: job.weights,
        mask: job.class_mask,
        z_loss: job.z_loss,
    };
    let (mut total, mut total_z, mut correct) = (0.0, 0.0, 0_usize);
    // Row by row with checked slicing, not `chunks_exact(k).zip(..)`: `Zip::new` divides by the
    // chunk size out of line, and the Cortex-M link probe finds the division's panic.
    for (i, loss) in losses.iter_mut().enumerate() {
        let Some(z) = logits.get(i * k..(i + 1) * k) else {
            break;
        };
        let mut out = grad
            .as_deref_mut()
            .and_then(|g| g.get_mut(i * k..(i + 1) * k));
        let target = match (targets.class(i), targets.soft_row(i, k)) {
            (_, Some(u)) => Some(RefTarget::Soft(u)),
            (Some(c), None) if Some(c) != job.ignore_index => {
                usize::try_from(c).ok().map(RefTarget::Class)
            }
            _ => None,
        };
        let Some(target) = target else {
            *loss = 0.0;
            if let Some(out) = out {
                out.fill(0.0);
            }
            write_extras(&mut extras, i, RowOut::default());
            continue;
        };
        let row_scale = job
            .row_scales
            .and_then(|r| r.get(i))
            .map_or(1.0, |&r| f64::from(r));
        let scale = job.grad_scale * row_scale;
        let row = row_core(&config, z, target, |c, g| {
            if let Some(slot) = out.as_deref_mut().and_then(|o| o.get_mut(c)) {
                *slot = (scale * g) as f32;
            }
        });
        *loss = row.loss as f32;
        total += row.loss;
        total_z += row.z_loss;
        // Soft targets: counted only when asked for, as in the kernels (see `Summary::correct`).
        let counted = matches!(target, RefTarget::Class(_)) || extras.correct.is_some();
        correct += usize::from(row.correct && counted);
        write_extras(&mut extras, i, row);
    }
    Ok(Summary {
        loss: job.finish(total),
        z_loss: job.finish(total_z),
        correct,
        rows: plan.rows,
        denominator: job.denominator,
    })
}

fn write_extras(extras: &mut Extras<'_>, row: usize, out: RowOut) {
    if let Some(slot) = extras.lse.as_deref_mut().and_then(|s| s.get_mut(row)) {
        *slot = out.lse as f32;
    }
    if let Some(slot) = extras.z_loss.as_deref_mut().and_then(|s| s.get_mut(row)) {
        *slot = out.z_loss as f32;
    }
    if let Some(slot) = extras.correct.as_deref_mut().and_then(|s| s.get_mut(row)) {
        *slot = out.correct;
    }
}
