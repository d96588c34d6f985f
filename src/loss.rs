//! The public API: configuration, argument checks, and the hand-off to the chosen backend.

use core::num::NonZeroUsize;

use crate::arch::{self, Backend};
use crate::kernel::{Buffers, Job};
use crate::Error;

/// How the target distribution is smoothed. Both conventions are offered, and the choice is
/// spelled out at every call site because they differ.
///
/// With `K` classes, target `y` and smoothing `eps`:
///
/// | variant | `q_y` | `q_k`, `k != y` | used by |
/// | --- | --- | --- | --- |
/// | `Uniform(eps)` | `1 - eps + eps/K` | `eps/K` | PyTorch `label_smoothing`, Keras, Optax, Liger, flash-attn (Szegedy et al. 2016) |
/// | `OffTarget(eps)` | `1 - eps` | `eps/(K-1)` | Megatron-LM, fairseq |
///
/// `OffTarget(eps)` equals `Uniform(eps * K / (K - 1))`. With two classes and `eps = 0.1`, the
/// loss is minimised at `p = [0.95, 0.05]` under `Uniform` and at `p = [0.9, 0.1]` under
/// `OffTarget`. `Uniform(0.0)` (the default) is plain cross-entropy.
///
/// ```
/// use smoothce::{CrossEntropy, Reduction, Smoothing};
///
/// // Two classes, target 0, logits that give p = [0.9, 0.1]: the OffTarget optimum.
/// let logits = [9.0_f32.ln(), 0.0];
/// let mut grad = [0.0_f32; 2];
/// let mut losses = [0.0_f32; 1];
/// CrossEntropy::new(2)
///     .smoothing(Smoothing::OffTarget(0.1))
///     .forward_backward(&logits, &[0], &mut losses, &mut grad)?;
/// assert!(grad[0].abs() < 1e-6 && grad[1].abs() < 1e-6);
/// # Ok::<(), smoothce::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Smoothing {
    /// PyTorch's `label_smoothing`: `q = (1 - eps) * onehot(y) + eps / K`.
    Uniform(f32),
    /// The target keeps `1 - eps`; the other `K - 1` classes share `eps` evenly. Needs `K >= 2`.
    OffTarget(f32),
}

impl Smoothing {
    /// The smoothing value `eps` of either variant.
    ///
    /// ```
    /// assert_eq!(smoothce::Smoothing::OffTarget(0.2).eps(), 0.2);
    /// ```
    #[must_use]
    pub fn eps(self) -> f32 {
        match self {
            Smoothing::Uniform(eps) | Smoothing::OffTarget(eps) => eps,
        }
    }

    /// The target distribution of one row as `q_k = on_target * [k == y] + per_class * [k allowed]`,
    /// for a row with `allowed` classes (`K`, less the classes whose logit is `-inf`) and a target
    /// that is itself allowed or not. Returns `(on_target, per_class)` in f64.
    ///
    /// This is the single definition of the smoothing used by the kernels and the reference.
    ///
    /// ```
    /// use smoothce::Smoothing;
    /// let (on, per) = Smoothing::Uniform(0.1).coefficients(10, true);
    /// assert!((on - 0.9).abs() < 1e-7 && (per - 0.01).abs() < 1e-9);
    /// let (on, per) = Smoothing::OffTarget(0.1).coefficients(10, true);
    /// // q_y = on + per = 0.9, q_k = per = 0.1 / 9
    /// assert!((on + per - 0.9).abs() < 1e-7 && (per - 0.1 / 9.0).abs() < 1e-9);
    /// ```
    #[must_use]
    pub fn coefficients(self, allowed: u64, target_allowed: bool) -> (f64, f64) {
        let eps = f64::from(self.eps());
        if allowed == 0 {
            return (1.0 - eps, 0.0);
        }
        let n = allowed as f64;
        match self {
            Smoothing::Uniform(_) => (1.0 - eps, eps / n),
            Smoothing::OffTarget(_) if !target_allowed => (1.0 - eps, eps / n),
            // Only the target is allowed: the smoothing mass has nowhere else to go.
            Smoothing::OffTarget(_) if allowed == 1 => (1.0, 0.0),
            Smoothing::OffTarget(_) => {
                let per = eps / (n - 1.0);
                (1.0 - eps - per, per)
            }
        }
    }
}

/// How the per-row losses are combined into the returned value (PyTorch's `reduction`).
///
/// ```
/// use smoothce::{CrossEntropy, Reduction};
/// let logits = [0.0_f32, 0.0, 0.0, 0.0];
/// let mut losses = [0.0_f32; 2];
/// let mean = CrossEntropy::new(2).forward(&logits, &[0, 1], &mut losses)?;
/// let sum = CrossEntropy::new(2).reduction(Reduction::Sum).forward(&logits, &[0, 1], &mut losses)?;
/// assert!((sum - 2.0 * mean).abs() < 1e-6);
/// # Ok::<(), smoothce::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reduction {
    /// Sum of row losses divided by the number of non-ignored rows (0 when every row is ignored).
    /// The gradient is that of the mean.
    #[default]
    Mean,
    /// Sum of row losses; the gradient is that of the sum.
    Sum,
    /// No reduction: read the per-row losses from `losses`. The returned value is their sum, and
    /// every row gets its own unscaled gradient.
    None,
}

/// Label-smoothed softmax cross-entropy over a batch of rows, with its gradient.
///
/// A small `Copy` configuration built with chained calls; the work is done by [`forward`],
/// [`forward_backward`] and [`forward_backward_in_place`] over slices the caller owns. Nothing is
/// allocated, nothing panics, and every argument is checked before anything is written.
///
/// `logits` is row-major `[N, K]` with `K = classes` and `N = targets.len()`.
///
/// # Numerical contract
///
/// - Finite logits give a finite gradient and a finite loss (the loss may round to `+inf` only when
///   its true value exceeds `f32::MAX`). Each row is computed in the offset-free form, so adding a
///   constant to a row changes nothing.
/// - A logit of `-inf` marks a class as impossible for that row: its probability and gradient are
///   exactly 0, and it gets no smoothing mass (`K` in the smoothing counts the row's other classes).
///   If the target's own logit is `-inf`, the loss is `+inf` (unless its target mass is 0) and the
///   gradient is `p - q`. A row whose logits are all `-inf` has loss `+inf` and a zero gradient.
/// - A row holding a NaN or a `+inf` logit gets loss NaN and a gradient row of NaN; other rows are
///   unaffected (the reduced value becomes NaN, as in PyTorch).
/// - Ignored rows (target equal to the ignore index) get loss 0 and a gradient row of exact zeros.
///
/// [`forward`]: CrossEntropy::forward
/// [`forward_backward`]: CrossEntropy::forward_backward
/// [`forward_backward_in_place`]: CrossEntropy::forward_backward_in_place
///
/// ```
/// use smoothce::{CrossEntropy, Reduction, Smoothing};
///
/// let ce = CrossEntropy::new(3)
///     .smoothing(Smoothing::Uniform(0.1))
///     .ignore_index(u32::MAX)
///     .reduction(Reduction::Mean);
/// let logits = [2.0_f32, 0.5, -1.0, 0.1, 0.2, 3.0];
/// let targets = [0, 2];
/// let mut losses = [0.0_f32; 2];
/// let mut grad = [0.0_f32; 6];
/// let loss = ce.forward_backward(&logits, &targets, &mut losses, &mut grad)?;
/// assert!((loss - (losses[0] + losses[1]) / 2.0).abs() < 1e-6);
/// # Ok::<(), smoothce::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CrossEntropy {
    classes: usize,
    smoothing: Smoothing,
    ignore_index: Option<u32>,
    reduction: Reduction,
    backend: Backend,
}

impl CrossEntropy {
    /// A loss over `classes` classes: no smoothing, [`Reduction::Mean`], no ignore index, the
    /// fastest backend of this CPU. `classes = 0` is reported as [`Error::ZeroClasses`] by the
    /// compute functions.
    ///
    /// ```
    /// let ce = smoothce::CrossEntropy::new(1000);
    /// assert_eq!(ce.classes(), 1000);
    /// ```
    #[must_use]
    pub fn new(classes: usize) -> Self {
        CrossEntropy {
            classes,
            smoothing: Smoothing::Uniform(0.0),
            ignore_index: None,
            reduction: Reduction::Mean,
            backend: Backend::Auto,
        }
    }

    /// Sets the label smoothing. An `eps` that is NaN or outside `[0, 1]` is reported as
    /// [`Error::InvalidSmoothing`] by the compute functions.
    ///
    /// ```
    /// use smoothce::{CrossEntropy, Smoothing};
    /// let ce = CrossEntropy::new(10).smoothing(Smoothing::Uniform(0.1));
    /// assert_eq!(ce.smoothing_config(), Smoothing::Uniform(0.1));
    /// ```
    #[must_use]
    pub fn smoothing(mut self, smoothing: Smoothing) -> Self {
        self.smoothing = smoothing;
        self
    }

    /// Rows whose target equals `target` get loss 0, a zero gradient row, and are left out of the
    /// mean's denominator (PyTorch's `ignore_index`).
    ///
    /// ```
    /// use smoothce::CrossEntropy;
    /// let ce = CrossEntropy::new(2).ignore_index(9);
    /// let mut losses = [1.0_f32; 2];
    /// let loss = ce.forward(&[0.0, 1.0, 5.0, 5.0], &[1, 9], &mut losses)?;
    /// assert_eq!(losses[1], 0.0);
    /// assert!((loss - losses[0]).abs() < 1e-7);
    /// # Ok::<(), smoothce::Error>(())
    /// ```
    #[must_use]
    pub fn ignore_index(mut self, target: u32) -> Self {
        self.ignore_index = Some(target);
        self
    }

    /// Sets how row losses are reduced (default [`Reduction::Mean`]).
    ///
    /// ```
    /// use smoothce::{CrossEntropy, Reduction};
    /// let ce = CrossEntropy::new(2).reduction(Reduction::Sum);
    /// assert_eq!(ce.reduction_config(), Reduction::Sum);
    /// ```
    #[must_use]
    pub fn reduction(mut self, reduction: Reduction) -> Self {
        self.reduction = reduction;
        self
    }

    /// Forces a SIMD backend (for tests and benchmarks; the default [`Backend::Auto`] picks the
    /// fastest one this CPU supports). A backend this CPU or target lacks is reported as
    /// [`Error::BackendUnavailable`] by the compute functions. Every backend gives results within
    /// the crate's tolerance of the [`reference`](crate::reference).
    ///
    /// ```
    /// use smoothce::{Backend, CrossEntropy};
    /// let ce = CrossEntropy::new(4).backend(Backend::Portable);
    /// let mut losses = [0.0_f32; 1];
    /// let loss = ce.forward(&[1.0, 2.0, 3.0, 4.0], &[3], &mut losses)?;
    /// assert!(loss > 0.0);
    /// # Ok::<(), smoothce::Error>(())
    /// ```
    #[must_use]
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// The number of classes `K`.
    ///
    /// ```
    /// assert_eq!(smoothce::CrossEntropy::new(7).classes(), 7);
    /// ```
    #[must_use]
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// The configured smoothing.
    ///
    /// ```
    /// use smoothce::{CrossEntropy, Smoothing};
    /// assert_eq!(CrossEntropy::new(3).smoothing_config(), Smoothing::Uniform(0.0));
    /// ```
    #[must_use]
    pub fn smoothing_config(&self) -> Smoothing {
        self.smoothing
    }

    /// The configured ignore index, if any.
    ///
    /// ```
    /// assert_eq!(smoothce::CrossEntropy::new(3).ignore_index(5).ignore_index_config(), Some(5));
    /// ```
    #[must_use]
    pub fn ignore_index_config(&self) -> Option<u32> {
        self.ignore_index
    }

    /// The configured reduction.
    ///
    /// ```
    /// use smoothce::{CrossEntropy, Reduction};
    /// assert_eq!(CrossEntropy::new(3).reduction_config(), Reduction::Mean);
    /// ```
    #[must_use]
    pub fn reduction_config(&self) -> Reduction {
        self.reduction
    }

    /// The configured backend request.
    ///
    /// ```
    /// use smoothce::{Backend, CrossEntropy};
    /// assert_eq!(CrossEntropy::new(3).backend_config(), Backend::Auto);
    /// ```
    #[must_use]
    pub fn backend_config(&self) -> Backend {
        self.backend
    }

    /// Computes the per-row losses into `losses` and returns the reduced loss.
    ///
    /// # Errors
    ///
    /// Any [`Error`] about the configuration (classes, smoothing, backend), the lengths of `logits`
    /// and `losses`, or a target that is neither a class nor the ignore index. Nothing is written
    /// then.
    ///
    /// ```
    /// use smoothce::CrossEntropy;
    /// let mut losses = [0.0_f32; 1];
    /// // Uniform logits over 4 classes: the loss is ln 4.
    /// let loss = CrossEntropy::new(4).forward(&[0.5; 4], &[2], &mut losses)?;
    /// assert!((loss - 4.0_f32.ln()).abs() < 1e-6);
    /// # Ok::<(), smoothce::Error>(())
    /// ```
    pub fn forward(
        &self,
        logits: &[f32],
        targets: &[u32],
        losses: &mut [f32],
    ) -> Result<f32, Error> {
        let job = self.plan(logits.len(), targets, losses.len(), None)?;
        let kernel = arch::select(self.backend)?;
        let total = kernel.run(&job, targets, Buffers::Forward { logits }, losses);
        Ok(job.finish(total))
    }

    /// Computes the per-row losses into `losses`, the gradient of the returned loss with respect
    /// to the logits into `grad` (same shape as `logits`), and returns the reduced loss.
    ///
    /// For [`Reduction::None`] every row of `grad` is the unscaled gradient of its own row loss.
    ///
    /// # Errors
    ///
    /// As [`forward`](Self::forward), and [`Error::GradLength`] when `grad.len() != logits.len()`.
    /// Nothing is written then.
    ///
    /// ```
    /// use smoothce::{CrossEntropy, Reduction};
    /// let logits = [1.0_f32, 2.0, 3.0];
    /// let mut losses = [0.0_f32; 1];
    /// let mut grad = [0.0_f32; 3];
    /// CrossEntropy::new(3).reduction(Reduction::Sum)
    ///     .forward_backward(&logits, &[1], &mut losses, &mut grad)?;
    /// // softmax minus one-hot: sums to zero, negative only at the target.
    /// assert!(grad.iter().sum::<f32>().abs() < 1e-6);
    /// assert!(grad[1] < 0.0 && grad[0] > 0.0 && grad[2] > 0.0);
    /// # Ok::<(), smoothce::Error>(())
    /// ```
    pub fn forward_backward(
        &self,
        logits: &[f32],
        targets: &[u32],
        losses: &mut [f32],
        grad: &mut [f32],
    ) -> Result<f32, Error> {
        let job = self.plan(logits.len(), targets, losses.len(), Some(grad.len()))?;
        let kernel = arch::select(self.backend)?;
        let total = kernel.run(&job, targets, Buffers::Separate { logits, grad }, losses);
        Ok(job.finish(total))
    }

    /// As [`forward_backward`](Self::forward_backward), but the gradient overwrites the logits:
    /// no second buffer, a third fewer bytes moved. Results are identical to the out-of-place call.
    ///
    /// # Errors
    ///
    /// As [`forward`](Self::forward). Nothing is written then: the logits are intact.
    ///
    /// ```
    /// use smoothce::CrossEntropy;
    /// let mut buf = [1.0_f32, 2.0, 3.0];
    /// let mut losses = [0.0_f32; 1];
    /// CrossEntropy::new(3).forward_backward_in_place(&mut buf, &[2], &mut losses)?;
    /// assert!(buf[2] < 0.0 && buf.iter().sum::<f32>().abs() < 1e-6);
    /// # Ok::<(), smoothce::Error>(())
    /// ```
    pub fn forward_backward_in_place(
        &self,
        logits: &mut [f32],
        targets: &[u32],
        losses: &mut [f32],
    ) -> Result<f32, Error> {
        let job = self.plan(logits.len(), targets, losses.len(), None)?;
        let kernel = arch::select(self.backend)?;
        let total = kernel.run(&job, targets, Buffers::InPlace { logits }, losses);
        Ok(job.finish(total))
    }

    /// Checks every argument but the backend, and counts the non-ignored rows.
    pub(crate) fn plan(
        &self,
        logits_len: usize,
        targets: &[u32],
        losses_len: usize,
        grad_len: Option<usize>,
    ) -> Result<Job, Error> {
        let classes = self.validate_config()?;
        let rows = targets.len();
        let expected = rows.checked_mul(classes.get()).ok_or(Error::SizeOverflow {
            rows,
            classes: classes.get(),
        })?;
        if logits_len != expected {
            return Err(Error::LogitsLength {
                expected,
                actual: logits_len,
            });
        }
        if losses_len != rows {
            return Err(Error::LossesLength {
                expected: rows,
                actual: losses_len,
            });
        }
        if let Some(actual) = grad_len {
            if actual != expected {
                return Err(Error::GradLength { expected, actual });
            }
        }
        let mut counted = 0_usize;
        for (row, &target) in targets.iter().enumerate() {
            if Some(target) == self.ignore_index {
                continue;
            }
            if target as usize >= classes.get() {
                return Err(Error::TargetOutOfRange {
                    row,
                    target: i64::from(target),
                    classes: classes.get(),
                });
            }
            counted += 1;
        }
        let denominator = match self.reduction {
            Reduction::Mean => counted as f64,
            Reduction::Sum | Reduction::None => 1.0,
        };
        let grad_scale = match self.reduction {
            Reduction::Mean if counted > 0 => (1.0 / denominator) as f32,
            _ => 1.0,
        };
        Ok(Job {
            classes,
            smoothing: self.smoothing,
            ignore_index: self.ignore_index,
            grad_scale,
            denominator,
        })
    }

    fn validate_config(&self) -> Result<NonZeroUsize, Error> {
        let classes = NonZeroUsize::new(self.classes).ok_or(Error::ZeroClasses)?;
        let eps = self.smoothing.eps();
        if !(0.0..=1.0).contains(&eps) {
            return Err(Error::InvalidSmoothing { eps });
        }
        if matches!(self.smoothing, Smoothing::OffTarget(_)) && classes.get() < 2 {
            return Err(Error::OffTargetNeedsTwoClasses {
                classes: classes.get(),
            });
        }
        Ok(classes)
    }
}
