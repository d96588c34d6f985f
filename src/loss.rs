//! The public API: configuration, argument checks, and the hand-off to the chosen backend.

use core::num::NonZeroUsize;

use crate::arch::{self, Backend};
use crate::kernel::{Ahead, Buffers, Io, Job, Outputs, Totals, Transform, Weights};
use crate::shard::{Piece, RowState};
use crate::{Error, Targets};

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
///   gradient is `p - q` (times the logit scale). A row whose logits are all `-inf` has loss `+inf`
///   and a zero gradient. Soft targets that put mass on a masked class make the loss `+inf`.
/// - A row holding a NaN or a `+inf` logit gets loss NaN and a gradient row of NaN; other rows are
///   unaffected (the reduced value becomes NaN, as in PyTorch). The kernels work in f32 on the
///   scaled logits `s z`: a finite logit that [`logit_scale`](Self::logit_scale) takes past
///   `f32::MAX` counts as `+inf` (its row is NaN), and one it takes below `-f32::MAX` counts as
///   `-inf` (a masked class, as above; without a soft-cap, which keeps every logit finite).
///   Likewise the gradient's per-row factor
///   `upstream * row_scale * s * (A + 2 lambda lse) / sum exp(t - m)` (`A` the row's target mass,
///   about 1 without class weights) is formed in f32: a row where it exceeds `f32::MAX` (z-loss
///   or upstream factors on logits near `f32::MAX`) gets NaN in the gradient of its classes of
///   negligible probability.
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
pub struct CrossEntropy<'a> {
    classes: usize,
    smoothing: Smoothing,
    ignore_index: Option<i64>,
    reduction: Reduction,
    backend: Backend,
    weights: Option<(&'a [f32], WeightMode)>,
    /// Both `class_weights` and `target_weights` were called (an error when used).
    both_weight_modes: bool,
    z_loss: f32,
    softcap: Option<f32>,
    logit_scale: f32,
    class_mask: Option<&'a [bool]>,
    upstream: f32,
    mean_denominator: Option<f32>,
    /// What the caller reads after the call (see [`CrossEntropy::read_ahead`]).
    read_ahead: &'a [f32],
}

/// Which semantics class weights follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WeightMode {
    /// PyTorch's `weight=`.
    PerClass,
    /// Keras' `sample_weight` taken from the target's class.
    PerTarget,
}

/// Per-row outputs beyond the losses, and per-row upstream gradients, for the `*_with` calls.
/// Every field is optional; set the ones you need. Each slice has one element per row.
///
/// ```
/// use smoothce::{CrossEntropy, Extras};
/// let logits = [1.0_f32, 3.0, 0.0, 2.0, 0.5, 0.1];
/// let mut losses = [0.0_f32; 2];
/// let mut lse = [0.0_f32; 2];
/// let mut correct = [false; 2];
/// let summary = CrossEntropy::new(3).forward_with(
///     &logits,
///     &[1_u32, 2],
///     &mut losses,
///     Extras { lse: Some(&mut lse), correct: Some(&mut correct), ..Extras::default() },
/// )?;
/// assert_eq!(correct, [true, false]);
/// assert_eq!(summary.correct, 1);
/// assert!((lse[0] - (1.0_f32.exp() + 3.0_f32.exp() + 1.0).ln()).abs() < 1e-5);
/// # Ok::<(), smoothce::Error>(())
/// ```
#[derive(Debug, Default)]
pub struct Extras<'o> {
    /// The log-sum-exp of each row's (scaled, soft-capped) logits: reuse it for perplexity or
    /// your own z-loss. Ignored rows get 0.
    pub lse: Option<&'o mut [f32]>,
    /// The z-loss part `lambda * lse^2` of each row's loss (Liger's `return_z_loss`); 0 when
    /// z-loss is off or the row is ignored.
    pub z_loss: Option<&'o mut [f32]>,
    /// Whether each row's target attains the row's max logit (token accuracy; ties count as
    /// correct, compared after the logit scale and soft-cap, in f32). For soft targets: the most probable target class (the first on ties). Ignored
    /// rows get `false`.
    pub correct: Option<&'o mut [bool]>,
    /// Upstream gradient per row, for [`Reduction::None`]: row `i`'s gradient is multiplied by
    /// `row_scales[i]`.
    pub row_scales: Option<&'o [f32]>,
}

/// What a `*_with` call returns besides the per-row outputs.
///
/// ```
/// use smoothce::{CrossEntropy, Extras};
/// let ce = CrossEntropy::new(2).ignore_index(9).z_loss(1e-2);
/// let logits = [2.0_f32, 0.0, 2.0, 0.0, 0.0, 0.0];
/// let mut losses = [0.0_f32; 3];
/// let mut z = [0.0_f32; 3];
/// // Row 0 is predicted right, row 1 wrong, row 2 is ignored.
/// let s = ce.forward_with(&logits, &[0_u32, 1, 9], &mut losses,
///     Extras { z_loss: Some(&mut z), ..Extras::default() })?;
/// assert_eq!((s.rows, s.correct, s.denominator), (2, 1, 2.0));
/// // The mean over the two counted rows, z-loss included and also reported on its own.
/// assert!((s.loss - (losses[0] + losses[1]) / 2.0).abs() < 1e-6);
/// assert!((s.z_loss - (z[0] + z[1]) / 2.0).abs() < 1e-7 && s.z_loss > 0.0);
/// # Ok::<(), smoothce::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// The reduced loss (z-loss included), as the plain calls return it.
    pub loss: f32,
    /// The z-loss part of `loss`, reduced the same way.
    pub z_loss: f32,
    /// Number of non-ignored rows whose target attains the max logit (see [`Extras::correct`]).
    /// For soft targets it is counted only when `Extras::correct` is given: finding each row's
    /// most probable target class costs a scan of the row, which the kernels skip otherwise
    /// (the count is then 0).
    pub correct: usize,
    /// Number of non-ignored rows.
    pub rows: usize,
    /// What the mean divided by (the non-ignored count, the sum of the targets' class weights,
    /// or the caller's denominator); 1 for `Sum` and `None`.
    pub denominator: f64,
}

impl<'a> CrossEntropy<'a> {
    /// A loss over `classes` classes: no smoothing, [`Reduction::Mean`], no ignore index, no
    /// options, the fastest backend of this CPU. `classes = 0` is reported as
    /// [`Error::ZeroClasses`] by the compute functions.
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
            weights: None,
            both_weight_modes: false,
            z_loss: 0.0,
            softcap: None,
            logit_scale: 1.0,
            class_mask: None,
            upstream: 1.0,
            mean_denominator: None,
            read_ahead: &[],
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
        self.ignore_index = Some(i64::from(target));
        self
    }

    /// As [`ignore_index`](Self::ignore_index), for signed targets: PyTorch's default
    /// `ignore_index = -100` with `i64` targets.
    ///
    /// ```
    /// use smoothce::{CrossEntropy, Extras};
    /// let ce = CrossEntropy::new(2).ignore_index_signed(-100);
    /// let mut losses = [1.0_f32; 2];
    /// let s = ce.forward_with(&[0.0, 1.0, 5.0, 5.0], &[1_i64, -100], &mut losses, Extras::default())?;
    /// assert_eq!((losses[1], s.rows), (0.0, 1));
    /// # Ok::<(), smoothce::Error>(())
    /// ```
    #[must_use]
    pub fn ignore_index_signed(mut self, target: i64) -> Self {
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

    /// Per-class weights with PyTorch's semantics (`F.cross_entropy(weight=w)`), smoothing term
    /// weighted too: with `W = sum_k w_k`,
    /// `loss_i = (1 - eps) w_y (lse - z_y) + (eps/K) sum_k w_k (lse - z_k)`, and
    /// [`Reduction::Mean`] divides by `sum_i w_{y_i}` over the non-ignored rows.
    /// `weights.len()` must be `K` and every weight finite and `>= 0`
    /// ([`Error::WeightsLength`], [`Error::InvalidWeight`]). Cannot be combined with soft targets,
    /// nor with [`target_weights`](Self::target_weights) ([`Error::Unsupported`]).
    ///
    /// ```
    /// use smoothce::{CrossEntropy, Reduction};
    /// let w = [1.0_f32, 3.0];
    /// let mut losses = [0.0_f32; 2];
    /// let ce = CrossEntropy::new(2).class_weights(&w);
    /// let mean = ce.forward(&[0.0, 0.0, 0.0, 0.0], &[0, 1], &mut losses)?;
    /// // Each row: w_y ln 2; the mean divides by w_0 + w_1.
    /// assert!((losses[1] - 3.0 * 2.0_f32.ln()).abs() < 1e-6);
    /// assert!((mean - 2.0_f32.ln()).abs() < 1e-6);
    /// # Ok::<(), smoothce::Error>(())
    /// ```
    #[must_use]
    pub fn class_weights(mut self, weights: &'a [f32]) -> Self {
        self.both_weight_modes |= matches!(self.weights, Some((_, WeightMode::PerTarget)));
        self.weights = Some((weights, WeightMode::PerClass));
        self
    }

    /// Per-target weights with Keras' `sample_weight` semantics, taken from each row's target
    /// class: `loss_i = w_{y_i} * H(q_i, p_i)` and row `i`'s gradient is scaled by `w_{y_i}`;
    /// [`Reduction::Mean`] divides by the number of non-ignored rows (Keras'
    /// `sum_over_batch_size`). Same checks as [`class_weights`](Self::class_weights). One weight
    /// mode per loss: a configuration with both is rejected with [`Error::Unsupported`] when
    /// used (calling the same one twice replaces the weights).
    ///
    /// ```
    /// use smoothce::{CrossEntropy, Smoothing};
    /// let w = [1.0_f32, 3.0];
    /// let mut plain = [0.0_f32; 1];
    /// let mut weighted = [0.0_f32; 1];
    /// let ce = CrossEntropy::new(2).smoothing(Smoothing::Uniform(0.2));
    /// ce.forward(&[0.5, -0.5], &[1], &mut plain)?;
    /// ce.target_weights(&w).forward(&[0.5, -0.5], &[1], &mut weighted)?;
    /// assert!((weighted[0] - 3.0 * plain[0]).abs() < 1e-6);
    /// # Ok::<(), smoothce::Error>(())
    /// ```
    #[must_use]
    pub fn target_weights(mut self, weights: &'a [f32]) -> Self {
        self.both_weight_modes |= matches!(self.weights, Some((_, WeightMode::PerClass)));
        self.weights = Some((weights, WeightMode::PerTarget));
        self
    }

    /// Adds the z-loss of PaLM (and Liger, flash-attn): `lambda * lse^2` per non-ignored row, in
    /// the loss and its gradient (`+ 2 lambda lse p`). The part is reported separately by the
    /// `*_with` calls. `lambda` must be finite and `>= 0` ([`Error::InvalidOption`]).
    ///
    /// ```
    /// use smoothce::CrossEntropy;
    /// let mut a = [0.0_f32; 1];
    /// let mut b = [0.0_f32; 1];
    /// CrossEntropy::new(2).forward(&[1.0, 1.0], &[0], &mut a)?;
    /// CrossEntropy::new(2).z_loss(1e-2).forward(&[1.0, 1.0], &[0], &mut b)?;
    /// let lse = 1.0 + 2.0_f32.ln();
    /// assert!((b[0] - a[0] - 1e-2 * lse * lse).abs() < 1e-6);
    /// # Ok::<(), smoothce::Error>(())
    /// ```
    #[must_use]
    pub fn z_loss(mut self, lambda: f32) -> Self {
        self.z_loss = lambda;
        self
    }

    /// Logit soft-capping (Gemma 2): the softmax sees `c * tanh(z / c)` (after the logit scale),
    /// and the gradient goes through it (chain factor `1 - (t/c)^2`). `c` must be finite and
    /// `> 0` ([`Error::InvalidOption`]). Since capped logits are rounded to f32, the tolerance
    /// against the reference widens by a few ulp of `c`.
    ///
    /// ```
    /// use smoothce::CrossEntropy;
    /// let mut capped = [0.0_f32; 1];
    /// let mut huge = [0.0_f32; 1];
    /// // With a cap of 5, a logit of 1000 behaves like a logit of (almost) 5.
    /// CrossEntropy::new(2).softcap(5.0).forward(&[1000.0, 0.0], &[1], &mut capped)?;
    /// CrossEntropy::new(2).forward(&[5.0, 0.0], &[1], &mut huge)?;
    /// assert!((capped[0] - huge[0]).abs() < 1e-4);
    /// # Ok::<(), smoothce::Error>(())
    /// ```
    #[must_use]
    pub fn softcap(mut self, cap: f32) -> Self {
        self.softcap = Some(cap);
        self
    }

    /// Multiplies the logits by `scale` (an inverse temperature) before the softmax; the gradient
    /// is taken with respect to the unscaled logits (chain factor `scale`). `scale` must be finite
    /// and `> 0` ([`Error::InvalidOption`]). The scaled logit `scale * z` is rounded to f32, as
    /// when a framework scales an f32 tensor (the reference does the same), so a product beyond
    /// `f32::MAX` is `+inf` (see the NaN rule on [`CrossEntropy`]).
    ///
    /// ```
    /// use smoothce::CrossEntropy;
    /// let mut a = [0.0_f32; 1];
    /// let mut b = [0.0_f32; 1];
    /// CrossEntropy::new(3).logit_scale(0.5).forward(&[2.0, 4.0, 6.0], &[0], &mut a)?;
    /// CrossEntropy::new(3).forward(&[1.0, 2.0, 3.0], &[0], &mut b)?;
    /// assert!((a[0] - b[0]).abs() < 1e-6);
    /// # Ok::<(), smoothce::Error>(())
    /// ```
    #[must_use]
    pub fn logit_scale(mut self, scale: f32) -> Self {
        self.logit_scale = scale;
        self
    }

    /// Restricts every row to the classes with `allowed[k] == true` (padding or masked
    /// vocabulary): the others get probability 0, gradient 0 and no smoothing mass, `K` in the
    /// smoothing counts the allowed classes, and their logits are never read (a masked `+inf` or
    /// NaN does not matter). A logit of `-inf` masks its class for its row the same way.
    /// `allowed.len()` must be `K` and allow at least one class ([`Error::MaskLength`],
    /// [`Error::MaskAllowsNoClass`]); a target that is not allowed makes its row's loss `+inf`.
    /// On AVX-512, each call turns the mask into bits once (a 4 KiB stack buffer, for `K` up to
    /// 32768) that the passes over every row read; its cost over an unmasked call is measured in
    /// `BENCHMARKS.md`.
    ///
    /// ```
    /// use smoothce::{CrossEntropy, Smoothing};
    /// let allowed = [true, true, false];
    /// let mut masked = [0.0_f32; 1];
    /// let mut two = [0.0_f32; 1];
    /// let ce = CrossEntropy::new(3).smoothing(Smoothing::Uniform(0.1)).class_mask(&allowed);
    /// ce.forward(&[1.0, 2.0, 50.0], &[0], &mut masked)?;
    /// CrossEntropy::new(2).smoothing(Smoothing::Uniform(0.1)).forward(&[1.0, 2.0], &[0], &mut two)?;
    /// assert!((masked[0] - two[0]).abs() < 1e-6);
    /// # Ok::<(), smoothce::Error>(())
    /// ```
    #[must_use]
    pub fn class_mask(mut self, allowed: &'a [bool]) -> Self {
        self.class_mask = Some(allowed);
        self
    }

    /// The upstream gradient of the reduced loss (default 1): every gradient element is
    /// multiplied by it (for `None`, on top of the per-row scales). Must be finite
    /// ([`Error::InvalidOption`]).
    ///
    /// ```
    /// use smoothce::CrossEntropy;
    /// let mut losses = [0.0_f32; 1];
    /// let mut g1 = [0.0_f32; 2];
    /// let mut g2 = [0.0_f32; 2];
    /// CrossEntropy::new(2).forward_backward(&[0.3, 0.1], &[0], &mut losses, &mut g1)?;
    /// CrossEntropy::new(2).upstream(0.5).forward_backward(&[0.3, 0.1], &[0], &mut losses, &mut g2)?;
    /// assert!((g2[0] - 0.5 * g1[0]).abs() < 1e-7);
    /// # Ok::<(), smoothce::Error>(())
    /// ```
    #[must_use]
    pub fn upstream(mut self, gradient: f32) -> Self {
        self.upstream = gradient;
        self
    }

    /// For [`Reduction::Mean`]: divide by `denominator` instead of this batch's count (gradient
    /// accumulation across micro-batches: every micro-batch divides by the global token count).
    /// Must be finite and `> 0` ([`Error::InvalidOption`]).
    ///
    /// ```
    /// use smoothce::CrossEntropy;
    /// let mut losses = [0.0_f32; 1];
    /// let own = CrossEntropy::new(2).forward(&[0.3, 0.1], &[0], &mut losses)?;
    /// let global = CrossEntropy::new(2).mean_denominator(4.0).forward(&[0.3, 0.1], &[0], &mut losses)?;
    /// assert!((global - own / 4.0).abs() < 1e-7);
    /// # Ok::<(), smoothce::Error>(())
    /// ```
    #[must_use]
    pub fn mean_denominator(mut self, denominator: f32) -> Self {
        self.mean_denominator = Some(denominator);
        self
    }

    /// A hint, with no effect on any result: the call's last row prefetches the start of
    /// `next` (as much of it as a row holds) while its exps are computed, as every other row
    /// prefetches the row after it. For a caller whose next call reads logits that do not
    /// follow this call's in memory, such as the next piece of split rows (see
    /// [`shard`](crate::shard)), which lies in another block. `next` is never read: only the
    /// addresses are named. Used by the calls that prefetch the next row: the gradient calls
    /// and [`piece_states_and_exps`](Self::piece_states_and_exps) (and its in-place form), on
    /// rows that the narrow kernel for short rows does not take; the other calls ignore it.
    /// Empty by default; set it per call, on a copy of the configuration.
    ///
    /// ```
    /// use smoothce::{CrossEntropy, Piece, RowState};
    /// let ce = CrossEntropy::new(4);
    /// let row = [0.5_f32, -1.0, 2.0, 0.0];
    /// let (left, right) = row.split_at(2);
    /// let mut exps = [0.0_f32; 4];
    /// let (first, second) = exps.split_at_mut(2);
    /// let mut own = [[RowState::EMPTY]; 2];
    /// // The first piece's call prefetches the second piece's logits.
    /// ce.read_ahead(right).piece_states_and_exps(left, Piece { offset: 0, width: 2 }, &[2_u32], &mut own[0], first)?;
    /// ce.piece_states_and_exps(right, Piece { offset: 2, width: 2 }, &[2_u32], &mut own[1], second)?;
    /// // The same states as without the hint.
    /// let mut again = [RowState::EMPTY];
    /// ce.piece_states_and_exps(left, Piece { offset: 0, width: 2 }, &[2_u32], &mut again, first)?;
    /// assert_eq!(again, own[0]);
    /// # Ok::<(), smoothce::Error>(())
    /// ```
    #[must_use]
    pub fn read_ahead(mut self, next: &'a [f32]) -> Self {
        self.read_ahead = next;
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

    /// The configured ignore index if it is a `u32` (see
    /// [`ignore_index_signed_config`](Self::ignore_index_signed_config) for any value).
    ///
    /// ```
    /// assert_eq!(smoothce::CrossEntropy::new(3).ignore_index(5).ignore_index_config(), Some(5));
    /// ```
    #[must_use]
    pub fn ignore_index_config(&self) -> Option<u32> {
        self.ignore_index.and_then(|t| u32::try_from(t).ok())
    }

    /// The configured ignore index, signed.
    ///
    /// ```
    /// let ce = smoothce::CrossEntropy::new(3).ignore_index_signed(-100);
    /// assert_eq!(ce.ignore_index_signed_config(), Some(-100));
    /// assert_eq!(ce.ignore_index_config(), None);
    /// ```
    #[must_use]
    pub fn ignore_index_signed_config(&self) -> Option<i64> {
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
    /// Any [`Error`] about the configuration (classes, smoothing, options, backend), the lengths
    /// of `logits` and `losses`, or a target that is neither a class nor the ignore index.
    /// Nothing is written then.
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
        self.forward_with(logits, targets, losses, Extras::default())
            .map(|s| s.loss)
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
        self.forward_backward_with(logits, targets, losses, grad, Extras::default())
            .map(|s| s.loss)
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
        self.forward_backward_in_place_with(logits, targets, losses, Extras::default())
            .map(|s| s.loss)
    }

    /// [`forward`](Self::forward) with targets of any supported type (class indices of any
    /// integer type, or [`Targets::Soft`] probability rows) and the per-row [`Extras`].
    ///
    /// # Errors
    ///
    /// As [`forward`](Self::forward); for soft targets [`Error::TargetsLength`] when their length
    /// is not `N * K`, [`Error::Unsupported`] with `OffTarget` smoothing, class weights or an
    /// ignore index; [`Error::ExtrasLength`] for an extra slice of the wrong length, and
    /// [`Error::Unsupported`] for `row_scales` with a reduction other than `None`.
    ///
    /// ```
    /// use smoothce::{CrossEntropy, Extras, Targets};
    /// let mut losses = [0.0_f32; 1];
    /// // A soft target equal to a one-hot one gives the same loss.
    /// let soft = CrossEntropy::new(3).forward_with(&[1.0, 2.0, 3.0], Targets::Soft(&[0.0, 1.0, 0.0]), &mut losses, Extras::default())?;
    /// let hard = CrossEntropy::new(3).forward(&[1.0, 2.0, 3.0], &[1], &mut losses)?;
    /// assert!((soft.loss - hard).abs() < 1e-6);
    /// # Ok::<(), smoothce::Error>(())
    /// ```
    pub fn forward_with<'t>(
        &self,
        logits: &[f32],
        targets: impl Into<Targets<'t>>,
        losses: &mut [f32],
        extras: Extras<'_>,
    ) -> Result<Summary, Error> {
        let targets = targets.into();
        let plan = self.plan(logits.len(), None, targets, losses.len(), None, &extras)?;
        self.execute(
            &plan,
            targets,
            Buffers::Forward { logits },
            outputs(losses, extras),
        )
    }

    /// [`forward_backward`](Self::forward_backward) with any [`Targets`] and the [`Extras`].
    ///
    /// # Errors
    ///
    /// As [`forward_with`](Self::forward_with), and [`Error::GradLength`].
    ///
    /// ```
    /// use smoothce::{CrossEntropy, Extras, Reduction};
    /// let ce = CrossEntropy::new(2).reduction(Reduction::None);
    /// let mut losses = [0.0_f32; 2];
    /// let mut grad = [0.0_f32; 4];
    /// let scales = [1.0_f32, 0.0];
    /// ce.forward_backward_with(&[0.0, 1.0, 0.0, 1.0], &[0_u8, 0], &mut losses, &mut grad,
    ///     Extras { row_scales: Some(&scales), ..Extras::default() })?;
    /// assert!(grad[0] < 0.0 && grad[2..] == [0.0, 0.0]);
    /// # Ok::<(), smoothce::Error>(())
    /// ```
    pub fn forward_backward_with<'t>(
        &self,
        logits: &[f32],
        targets: impl Into<Targets<'t>>,
        losses: &mut [f32],
        grad: &mut [f32],
        extras: Extras<'_>,
    ) -> Result<Summary, Error> {
        let targets = targets.into();
        let plan = self.plan(
            logits.len(),
            None,
            targets,
            losses.len(),
            Some(grad.len()),
            &extras,
        )?;
        self.execute(
            &plan,
            targets,
            Buffers::Separate { logits, grad },
            outputs(losses, extras),
        )
    }

    /// [`forward_backward_in_place`](Self::forward_backward_in_place) with any [`Targets`] and the
    /// [`Extras`].
    ///
    /// # Errors
    ///
    /// As [`forward_with`](Self::forward_with). Nothing is written then.
    ///
    /// ```
    /// use smoothce::{CrossEntropy, Extras};
    /// let mut buf = [1.0_f32, 2.0, 3.0];
    /// let mut losses = [0.0_f32; 1];
    /// let s = CrossEntropy::new(3).forward_backward_in_place_with(&mut buf, &[2_usize], &mut losses, Extras::default())?;
    /// assert_eq!(s.correct, 1);
    /// # Ok::<(), smoothce::Error>(())
    /// ```
    pub fn forward_backward_in_place_with<'t>(
        &self,
        logits: &mut [f32],
        targets: impl Into<Targets<'t>>,
        losses: &mut [f32],
        extras: Extras<'_>,
    ) -> Result<Summary, Error> {
        let targets = targets.into();
        let plan = self.plan(logits.len(), None, targets, losses.len(), None, &extras)?;
        self.execute(
            &plan,
            targets,
            Buffers::InPlace { logits },
            outputs(losses, extras),
        )
    }

    /// Step 1 of a split row (see [`shard`](crate::shard)): the [`RowState`] of every row's piece
    /// `piece` (classes `piece.offset .. piece.offset + piece.width`), whose logits are `logits`,
    /// row-major `[N, piece.width]`. `targets` are the full rows' targets.
    ///
    /// # Errors
    ///
    /// [`Error::PieceOutOfRange`] when the piece does not fit in `K` classes,
    /// [`Error::LogitsLength`] when `logits.len() != N * piece.width`, [`Error::LossesLength`]
    /// when `states.len() != N`, and the configuration and target errors of
    /// [`forward`](Self::forward) (soft targets are the full `[N, K]` probability rows). Nothing
    /// is written then.
    ///
    /// ```
    /// use smoothce::{CrossEntropy, Piece, RowState};
    /// let mut states = [RowState::EMPTY; 2];
    /// CrossEntropy::new(4).piece_states(&[1.0, 2.0, 3.0, 4.0], Piece { offset: 2, width: 2 }, &[3_u32, 0], &mut states)?;
    /// // Two rows of the piece: [1, 2] and [3, 4].
    /// assert!((states[0].lse() - (1.0_f64.exp() + 2.0_f64.exp()).ln()).abs() < 1e-6);
    /// assert!((states[1].lse() - (3.0_f64.exp() + 4.0_f64.exp()).ln()).abs() < 1e-6);
    /// # Ok::<(), smoothce::Error>(())
    /// ```
    pub fn piece_states<'t>(
        &self,
        logits: &[f32],
        piece: Piece,
        targets: impl Into<Targets<'t>>,
        states: &mut [RowState],
    ) -> Result<(), Error> {
        let targets = targets.into();
        let plan = self.plan_piece(logits.len(), piece, targets, states.len(), None)?;
        self.execute_piece(
            &plan,
            targets,
            Buffers::PieceStates {
                logits,
                piece,
                states,
            },
        )
    }

    /// Step 3 of a split row: the per-row losses (and extras) and the reduced loss from the rows'
    /// merged [`RowState`]s, as [`forward_with`](Self::forward_with) would give them for the
    /// unsplit rows. The correctness of a row needs the target's piece to have been merged in.
    ///
    /// # Errors
    ///
    /// As [`forward_with`](Self::forward_with), with `states.len()` as the row count
    /// ([`Error::LossesLength`] when it differs from the targets'), and
    /// [`Error::Unsupported`] for `extras.correct` with soft targets (the states do not hold the
    /// most probable class's logit).
    ///
    /// ```
    /// use smoothce::{CrossEntropy, Extras, Piece, RowState};
    /// let ce = CrossEntropy::new(2);
    /// let mut states = [RowState::EMPTY];
    /// ce.piece_states(&[0.0, 0.0], Piece { offset: 0, width: 2 }, &[1_u32], &mut states)?;
    /// let mut losses = [0.0_f32];
    /// let s = ce.finish_states(&states, &[1_u32], &mut losses, Extras::default())?;
    /// assert!((s.loss - 2.0_f32.ln()).abs() < 1e-7);
    /// # Ok::<(), smoothce::Error>(())
    /// ```
    pub fn finish_states<'t>(
        &self,
        states: &[RowState],
        targets: impl Into<Targets<'t>>,
        losses: &mut [f32],
        extras: Extras<'_>,
    ) -> Result<Summary, Error> {
        let targets = targets.into();
        if states.len() != losses.len() {
            return Err(Error::LossesLength {
                expected: states.len(),
                actual: losses.len(),
            });
        }
        if matches!(targets, Targets::Soft(_)) && extras.correct.is_some() {
            // The most probable target class's logit is not in the states.
            return Err(Error::Unsupported {
                what: "per-row correctness of soft targets from piece states",
            });
        }
        let no_logits = Piece {
            offset: 0,
            width: 0,
        };
        let plan = self.plan(0, Some(no_logits), targets, losses.len(), None, &extras)?;
        self.execute(
            &plan,
            targets,
            Buffers::Finish { states },
            outputs(losses, extras),
        )
    }

    /// Step 3 of a split row: the gradient of piece `piece` into `grad` (`[N, piece.width]`)
    /// from the rows' merged [`RowState`]s, with no further communication. Equal, within the
    /// crate's tolerance, to that piece of the unsplit [`forward_backward`](Self::forward_backward)
    /// gradient.
    ///
    /// # Errors
    ///
    /// As [`piece_states`](Self::piece_states), and [`Error::GradLength`].
    ///
    /// ```
    /// use smoothce::{CrossEntropy, Piece, RowState};
    /// let ce = CrossEntropy::new(2);
    /// let whole = Piece { offset: 0, width: 2 };
    /// let mut states = [RowState::EMPTY];
    /// ce.piece_states(&[0.0, 0.0], whole, &[1_u32], &mut states)?;
    /// let mut grad = [0.0_f32; 2];
    /// ce.piece_backward(&[0.0, 0.0], whole, &[1_u32], &states, &mut grad)?;
    /// assert_eq!(grad, [0.5, -0.5]);
    /// # Ok::<(), smoothce::Error>(())
    /// ```
    pub fn piece_backward<'t>(
        &self,
        logits: &[f32],
        piece: Piece,
        targets: impl Into<Targets<'t>>,
        states: &[RowState],
        grad: &mut [f32],
    ) -> Result<(), Error> {
        let targets = targets.into();
        let plan = self.plan_piece(logits.len(), piece, targets, states.len(), Some(grad.len()))?;
        self.execute_piece(
            &plan,
            targets,
            Buffers::PieceGradient {
                logits: Io::Separate(logits, grad),
                piece,
                merged: states,
                own: None,
            },
        )
    }

    /// As [`piece_backward`](Self::piece_backward), overwriting the piece's logits with its
    /// gradient.
    ///
    /// # Errors
    ///
    /// As [`piece_states`](Self::piece_states). Nothing is written then.
    ///
    /// ```
    /// use smoothce::{CrossEntropy, Piece, RowState};
    /// let ce = CrossEntropy::new(2);
    /// let whole = Piece { offset: 0, width: 2 };
    /// let mut buf = [0.0_f32, 0.0];
    /// let mut states = [RowState::EMPTY];
    /// ce.piece_states(&buf, whole, &[0_u32], &mut states)?;
    /// ce.piece_backward_in_place(&mut buf, whole, &[0_u32], &states)?;
    /// assert_eq!(buf, [-0.5, 0.5]);
    /// # Ok::<(), smoothce::Error>(())
    /// ```
    pub fn piece_backward_in_place<'t>(
        &self,
        logits: &mut [f32],
        piece: Piece,
        targets: impl Into<Targets<'t>>,
        states: &[RowState],
    ) -> Result<(), Error> {
        let targets = targets.into();
        let plan = self.plan_piece(logits.len(), piece, targets, states.len(), None)?;
        self.execute_piece(
            &plan,
            targets,
            Buffers::PieceGradient {
                logits: Io::InPlace(logits),
                piece,
                merged: states,
                own: None,
            },
        )
    }

    /// Step 1 of a split row, keeping the exps: as [`piece_states`](Self::piece_states), and
    /// each row's `exp(t - m_piece)` (relative to the piece's own max) stored into `exps`
    /// (`[N, piece.width]`, typically the piece's gradient buffer). After the merge,
    /// [`piece_backward_from_exps`](Self::piece_backward_from_exps) turns them into the gradient
    /// with one multiply-add per element: one exp per logit for the whole split row, as in the
    /// unsplit calls, instead of two with [`piece_states`](Self::piece_states) followed by
    /// [`piece_backward`](Self::piece_backward). Keep this call's `states` (the piece's own) for
    /// that step, besides merging them.
    ///
    /// The exps buffer holds implementation-defined values between the two steps (masked classes
    /// hold a marker). For pieces of more than about 2^17 classes, the two-exp calls move fewer
    /// bytes and are faster (see `BENCHMARKS.md`).
    ///
    /// # Errors
    ///
    /// As [`piece_backward`](Self::piece_backward) (with `exps` in the place of `grad`), and
    /// [`Error::Unsupported`] with a soft-cap, whose gradient needs the logits.
    ///
    /// ```
    /// use smoothce::{CrossEntropy, Extras, Piece, RowState, Smoothing};
    ///
    /// let ce = CrossEntropy::new(5).smoothing(Smoothing::OffTarget(0.2));
    /// let row = [0.5_f32, -1.0, 2.0, 0.0, 1.5];
    /// let targets = [3_u32];
    /// let pieces = [Piece { offset: 0, width: 2 }, Piece { offset: 2, width: 3 }];
    /// let mut grad = [0.0_f32; 5];
    /// let (left, right) = grad.split_at_mut(2);
    /// // Step 1: each piece's own state, its exps kept in its part of the gradient.
    /// let mut own = [[RowState::EMPTY]; 2];
    /// ce.piece_states_and_exps(&row[..2], pieces[0], &targets, &mut own[0], left)?;
    /// ce.piece_states_and_exps(&row[2..], pieces[1], &targets, &mut own[1], right)?;
    /// // Step 2: merge (an all-reduce when the pieces live on different devices).
    /// let merged = [own[0][0].merge(own[1][0])];
    /// // Step 3: the loss, and each piece's gradient from its exps.
    /// let mut losses = [0.0_f32];
    /// let split = ce.finish_states(&merged, &targets, &mut losses, Extras::default())?;
    /// ce.piece_backward_from_exps(left, pieces[0], &targets, &own[0], &merged)?;
    /// ce.piece_backward_from_exps(right, pieces[1], &targets, &own[1], &merged)?;
    ///
    /// let mut full = [0.0_f32; 5];
    /// let whole = ce.forward_backward(&row, &targets, &mut [0.0], &mut full)?;
    /// assert!((split.loss - whole).abs() < 1e-6);
    /// assert!(grad.iter().zip(&full).all(|(a, b)| (a - b).abs() < 1e-6));
    /// # Ok::<(), smoothce::Error>(())
    /// ```
    pub fn piece_states_and_exps<'t>(
        &self,
        logits: &[f32],
        piece: Piece,
        targets: impl Into<Targets<'t>>,
        states: &mut [RowState],
        exps: &mut [f32],
    ) -> Result<(), Error> {
        let targets = targets.into();
        let plan = self.plan_piece(logits.len(), piece, targets, states.len(), Some(exps.len()))?;
        self.reject_softcap()?;
        self.execute_piece(
            &plan,
            targets,
            Buffers::PieceExps {
                logits: Io::Separate(logits, exps),
                piece,
                states,
            },
        )
    }

    /// As [`piece_states_and_exps`](Self::piece_states_and_exps), storing the exps over the
    /// piece's logits (which the target's logit, kept in its state, is no longer needed from).
    ///
    /// # Errors
    ///
    /// As [`piece_states_and_exps`](Self::piece_states_and_exps). Nothing is written then.
    ///
    /// ```
    /// use smoothce::{CrossEntropy, Piece, RowState};
    /// let ce = CrossEntropy::new(2);
    /// let whole = Piece { offset: 0, width: 2 };
    /// let mut buf = [0.0_f32, 0.0];
    /// let mut own = [RowState::EMPTY];
    /// ce.piece_states_and_exps_in_place(&mut buf, whole, &[0_u32], &mut own)?;
    /// let merged = own; // a single piece
    /// ce.piece_backward_from_exps(&mut buf, whole, &[0_u32], &own, &merged)?;
    /// assert_eq!(buf, [-0.5, 0.5]);
    /// # Ok::<(), smoothce::Error>(())
    /// ```
    pub fn piece_states_and_exps_in_place<'t>(
        &self,
        logits: &mut [f32],
        piece: Piece,
        targets: impl Into<Targets<'t>>,
        states: &mut [RowState],
    ) -> Result<(), Error> {
        let targets = targets.into();
        let plan = self.plan_piece(logits.len(), piece, targets, states.len(), None)?;
        self.reject_softcap()?;
        self.execute_piece(
            &plan,
            targets,
            Buffers::PieceExps {
                logits: Io::InPlace(logits),
                piece,
                states,
            },
        )
    }

    /// Step 3 of a split row from stored exps: overwrites the exps that
    /// [`piece_states_and_exps`](Self::piece_states_and_exps) (or its in-place form) stored for
    /// piece `piece` with the piece's gradient, given the piece's own states `own` from that call
    /// and the rows' merged states. Equal, within the crate's tolerance, to
    /// [`piece_backward`](Self::piece_backward).
    ///
    /// # Errors
    ///
    /// As [`piece_states`](Self::piece_states) (with `exps` in the place of the logits and
    /// `merged` of the states), [`Error::LossesLength`] when `own` has another length than
    /// `merged`, [`Error::StateMismatch`] when a row's own state cannot be part of its merged
    /// state, and [`Error::Unsupported`] with a soft-cap. Nothing is written then.
    ///
    /// ```
    /// use smoothce::{CrossEntropy, Error, Piece, RowState};
    /// let ce = CrossEntropy::new(3);
    /// let whole = Piece { offset: 0, width: 3 };
    /// let mut buf = [1.0_f32, 2.0, 3.0];
    /// let mut own = [RowState::EMPTY];
    /// ce.piece_states_and_exps_in_place(&mut buf, whole, &[2_u32], &mut own)?;
    /// // The merged state must contain the piece's own.
    /// let err = ce.piece_backward_from_exps(&mut buf, whole, &[2_u32], &own, &[RowState::EMPTY]);
    /// assert_eq!(err, Err(Error::StateMismatch { row: 0 }));
    /// ce.piece_backward_from_exps(&mut buf, whole, &[2_u32], &own, &own)?;
    /// assert!(buf.iter().sum::<f32>().abs() < 1e-6);
    /// # Ok::<(), smoothce::Error>(())
    /// ```
    pub fn piece_backward_from_exps<'t>(
        &self,
        exps: &mut [f32],
        piece: Piece,
        targets: impl Into<Targets<'t>>,
        own: &[RowState],
        merged: &[RowState],
    ) -> Result<(), Error> {
        let targets = targets.into();
        let plan = self.plan_piece(exps.len(), piece, targets, merged.len(), None)?;
        self.reject_softcap()?;
        if own.len() != merged.len() {
            return Err(Error::LossesLength {
                expected: merged.len(),
                actual: own.len(),
            });
        }
        if let Some(row) = own
            .iter()
            .zip(merged)
            .position(|(own, merged)| !own.is_part_of(merged))
        {
            return Err(Error::StateMismatch { row });
        }
        self.execute_piece(
            &plan,
            targets,
            Buffers::PieceGradient {
                logits: Io::InPlace(exps),
                piece,
                merged,
                own: Some(own),
            },
        )
    }

    /// [`execute`](Self::execute) for a piece call, which has no per-row outputs.
    fn execute_piece(
        &self,
        plan: &Plan<'a>,
        targets: Targets<'_>,
        buffers: Buffers<'_>,
    ) -> Result<(), Error> {
        self.execute(plan, targets, buffers, outputs(&mut [], Extras::default()))
            .map(|_| ())
    }

    fn reject_softcap(&self) -> Result<(), Error> {
        if self.softcap.is_some() {
            return Err(Error::Unsupported {
                what: "a soft-cap with stored piece exps (use piece_states and piece_backward)",
            });
        }
        Ok(())
    }

    /// Runs a checked call on the configured backend (selected, or refused, before anything is
    /// written).
    fn execute(
        &self,
        plan: &Plan<'a>,
        targets: Targets<'_>,
        buffers: Buffers<'_>,
        outputs: Outputs<'_>,
    ) -> Result<Summary, Error> {
        let kernel = arch::select(self.backend)?;
        let totals = kernel.run(&plan.job, targets, buffers, outputs);
        Ok(plan.summary(totals))
    }

    /// The checks of a piece call.
    fn plan_piece(
        &self,
        logits_len: usize,
        piece: Piece,
        targets: Targets<'_>,
        states_len: usize,
        grad_len: Option<usize>,
    ) -> Result<Plan<'a>, Error> {
        self.plan(
            logits_len,
            Some(piece),
            targets,
            states_len,
            grad_len,
            &Extras::default(),
        )
    }

    /// Checks every argument but the backend; counts the non-ignored rows and the mean's
    /// denominator. `logits` are whole rows, or the piece `piece` of each row.
    #[allow(clippy::too_many_lines)]
    pub(crate) fn plan<'p>(
        &self,
        logits_len: usize,
        piece: Option<Piece>,
        targets: Targets<'_>,
        losses_len: usize,
        grad_len: Option<usize>,
        extras: &Extras<'p>,
    ) -> Result<Plan<'p>, Error>
    where
        'a: 'p,
    {
        let classes = self.validate_config()?;
        let k = classes.get();
        if let Some(piece) = piece {
            let fits = piece
                .offset
                .checked_add(piece.width)
                .is_some_and(|end| end <= k);
            if !fits {
                return Err(Error::PieceOutOfRange {
                    offset: piece.offset,
                    width: piece.width,
                    classes: k,
                });
            }
        }
        let rows = match targets {
            Targets::Soft(t) => {
                if self.ignore_index.is_some() {
                    return Err(Error::Unsupported {
                        what: "an ignore index with soft targets",
                    });
                }
                if matches!(self.smoothing, Smoothing::OffTarget(_)) {
                    return Err(Error::Unsupported {
                        what: "off-target smoothing with soft targets",
                    });
                }
                if matches!(
                    self.weights,
                    Some((_, WeightMode::PerClass | WeightMode::PerTarget))
                ) {
                    return Err(Error::Unsupported {
                        what: "class weights with soft targets",
                    });
                }
                targets.rows(k).ok_or(Error::TargetsLength {
                    expected_multiple_of: k,
                    actual: t.len(),
                })?
            }
            _ => targets.rows(k).unwrap_or(0),
        };
        let expected = rows
            .checked_mul(piece.map_or(k, |p| p.width))
            .ok_or(Error::SizeOverflow { rows, classes: k })?;
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
        check_extra("lse", extras.lse.as_deref().map(<[f32]>::len), rows)?;
        check_extra("z_loss", extras.z_loss.as_deref().map(<[f32]>::len), rows)?;
        check_extra(
            "correct",
            extras.correct.as_deref().map(<[bool]>::len),
            rows,
        )?;
        check_extra("row_scales", extras.row_scales.map(<[f32]>::len), rows)?;
        if let Some(scales) = extras.row_scales {
            if self.reduction != Reduction::None {
                return Err(Error::Unsupported {
                    what: "per-row upstream gradients with a reduction other than None",
                });
            }
            if let Some((row, &value)) = scales.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(Error::InvalidRowScale { row, value });
            }
        }
        let mut weight_sum = 0.0_f64;
        let counted = if let Targets::Soft(_) = targets {
            // Soft targets: every row counts.
            rows
        } else {
            let per_class = match self.weights {
                Some((w, WeightMode::PerClass)) => Some(w),
                _ => None,
            };
            targets
                .scan_classes(self.ignore_index, k, |class| {
                    if let Some(w) = per_class {
                        weight_sum += w.get(class).map_or(0.0, |&v| f64::from(v));
                    }
                })
                .map_err(|(row, target)| Error::TargetOutOfRange {
                    row,
                    target,
                    classes: k,
                })?
        };
        let natural = match self.weights {
            Some((_, WeightMode::PerClass)) => weight_sum,
            _ => counted as f64,
        };
        let denominator = match (self.reduction, self.mean_denominator) {
            (Reduction::Mean, Some(d)) => f64::from(d),
            (Reduction::Mean, None) => natural,
            (Reduction::Sum | Reduction::None, _) => 1.0,
        };
        let grad_scale = if denominator > 0.0 {
            f64::from(self.upstream) / denominator
        } else {
            0.0
        };
        let weights = match self.weights {
            Some((w, WeightMode::PerClass)) => Weights::PerClass(w),
            Some((w, WeightMode::PerTarget)) => Weights::PerTarget(w),
            None => Weights::None,
        };
        Ok(Plan {
            job: Job {
                classes,
                smoothing: self.smoothing,
                ignore_index: self.ignore_index,
                grad_scale,
                denominator,
                transform: Transform {
                    scale: self.logit_scale,
                    cap: self.softcap,
                },
                z_loss: f64::from(self.z_loss),
                weights,
                class_mask: self.class_mask,
                class_bits: None,
                row_scales: extras.row_scales,
                want_correct: extras.correct.is_some(),
                after: Ahead::of(self.read_ahead),
            },
            rows: counted,
        })
    }

    fn validate_config(&self) -> Result<NonZeroUsize, Error> {
        let classes = NonZeroUsize::new(self.classes).ok_or(Error::ZeroClasses)?;
        let k = classes.get();
        let eps = self.smoothing.eps();
        if !(0.0..=1.0).contains(&eps) {
            return Err(Error::InvalidSmoothing { eps });
        }
        if matches!(self.smoothing, Smoothing::OffTarget(_)) && k < 2 {
            return Err(Error::OffTargetNeedsTwoClasses { classes: k });
        }
        if self.both_weight_modes {
            return Err(Error::Unsupported {
                what: "class_weights together with target_weights (one weight mode per loss)",
            });
        }
        if let Some((w, _)) = self.weights {
            if w.len() != k {
                return Err(Error::WeightsLength {
                    expected: k,
                    actual: w.len(),
                });
            }
            // One branch-free pass (it vectorizes: a short-circuiting search over 32000 weights
            // cost a fifth of a [16, 32000] call), then the search only if something is wrong.
            let valid = |v: f32| (0.0..=f32::MAX).contains(&v);
            if !w.iter().fold(true, |ok, &v| ok & valid(v)) {
                if let Some((class, &value)) = w.iter().enumerate().find(|(_, v)| !valid(**v)) {
                    return Err(Error::InvalidWeight { class, value });
                }
            }
        }
        let positive = |v: f32| v.is_finite() && v > 0.0;
        if !(self.z_loss.is_finite() && self.z_loss >= 0.0) {
            return Err(Error::InvalidOption {
                option: "z_loss",
                value: self.z_loss,
            });
        }
        if let Some(cap) = self.softcap {
            if !positive(cap) {
                return Err(Error::InvalidOption {
                    option: "softcap",
                    value: cap,
                });
            }
        }
        if !positive(self.logit_scale) {
            return Err(Error::InvalidOption {
                option: "logit_scale",
                value: self.logit_scale,
            });
        }
        if !self.upstream.is_finite() {
            return Err(Error::InvalidOption {
                option: "upstream",
                value: self.upstream,
            });
        }
        if let Some(d) = self.mean_denominator {
            if !positive(d) {
                return Err(Error::InvalidOption {
                    option: "mean_denominator",
                    value: d,
                });
            }
        }
        if let Some(mask) = self.class_mask {
            if mask.len() != k {
                return Err(Error::MaskLength {
                    expected: k,
                    actual: mask.len(),
                });
            }
            if !mask.iter().any(|&a| a) {
                return Err(Error::MaskAllowsNoClass);
            }
        }
        Ok(classes)
    }
}

/// A checked call: the kernel's job and what the summary needs.
pub(crate) struct Plan<'a> {
    pub job: Job<'a>,
    /// Non-ignored rows.
    pub rows: usize,
}

impl Plan<'_> {
    fn summary(&self, totals: Totals) -> Summary {
        Summary {
            loss: self.job.finish(totals.loss),
            z_loss: self.job.finish(totals.z_loss),
            correct: totals.correct as usize,
            rows: self.rows,
            denominator: self.job.denominator,
        }
    }
}

fn check_extra(name: &'static str, len: Option<usize>, rows: usize) -> Result<(), Error> {
    match len {
        Some(actual) if actual != rows => Err(Error::ExtrasLength {
            extra: name,
            expected: rows,
            actual,
        }),
        _ => Ok(()),
    }
}

fn outputs<'o>(losses: &'o mut [f32], extras: Extras<'o>) -> Outputs<'o> {
    Outputs {
        losses,
        lse: extras.lse,
        z_loss: extras.z_loss,
        correct: extras.correct,
    }
}
