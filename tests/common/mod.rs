//! Helpers shared by the integration tests: a small deterministic random generator, random rows,
//! the three entry points behind one function, and the comparison of kernel results against the
//! f64 [`reference`] with [`reference::agrees`] and the crate's tolerance constants.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use smoothce::reference::{self, GRAD_TOLERANCE, LOSS_TOLERANCE};
use smoothce::{Backend, CrossEntropy, Error, Reduction, Smoothing};

/// Every backend this CPU and target can run (`Auto` first).
pub fn backends() -> Vec<Backend> {
    Backend::ALL
        .iter()
        .copied()
        .filter(|b| b.is_available())
        .collect()
}

/// SplitMix64: tiny, deterministic, good enough to draw test data from a seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1_u64 << 53) as f64
    }

    /// Uniform in `[-1, 1)`.
    pub fn symmetric(&mut self) -> f64 {
        2.0 * self.unit() - 1.0
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// `k` logits `offset + spread * u`, `u` uniform in `[-1, 1)`, rounded to f32.
pub fn random_row(rng: &mut Rng, k: usize, offset: f64, spread: f64) -> Vec<f32> {
    (0..k)
        .map(|_| (offset + spread * rng.symmetric()) as f32)
        .collect()
}

/// `rows * k` logits drawn as [`random_row`].
pub fn random_batch(rng: &mut Rng, rows: usize, k: usize, offset: f64, spread: f64) -> Vec<f32> {
    random_row(rng, rows * k, offset, spread)
}

/// `rows` random targets in `0..k`.
pub fn random_targets(rng: &mut Rng, rows: usize, k: usize) -> Vec<u32> {
    (0..rows).map(|_| rng.below(k) as u32).collect()
}

/// The three ways to run the kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// `forward`: losses only.
    Forward,
    /// `forward_backward`: gradient into a separate buffer.
    ForwardBackward,
    /// `forward_backward_in_place`: gradient over the logits.
    InPlace,
}

impl Entry {
    /// All three entry points.
    pub const ALL: [Entry; 3] = [Entry::Forward, Entry::ForwardBackward, Entry::InPlace];

    /// Whether this entry point produces a gradient.
    pub fn has_grad(self) -> bool {
        !matches!(self, Entry::Forward)
    }
}

/// What one call produced.
#[derive(Debug, Clone)]
pub struct Output {
    /// The returned (reduced) loss.
    pub total: f32,
    /// The per-row losses.
    pub losses: Vec<f32>,
    /// The gradient (empty for [`Entry::Forward`]).
    pub grad: Vec<f32>,
}

impl Output {
    /// Whether two outputs are identical bit for bit (NaN payloads included).
    pub fn bits_eq(&self, other: &Output) -> bool {
        self.total.to_bits() == other.total.to_bits()
            && bits(&self.losses) == bits(&other.losses)
            && bits(&self.grad) == bits(&other.grad)
    }
}

/// Where two outputs first differ in their bits, for failure messages.
pub fn first_difference(a: &Output, b: &Output) -> String {
    if a.total.to_bits() != b.total.to_bits() {
        return format!("reduced loss {:e} vs {:e}", a.total, b.total);
    }
    let pairs = [
        ("loss", &a.losses, &b.losses),
        ("gradient", &a.grad, &b.grad),
    ];
    for (what, x, y) in pairs {
        if x.len() != y.len() {
            return format!("{what} lengths {} vs {}", x.len(), y.len());
        }
        if let Some(j) = (0..x.len()).find(|&j| x[j].to_bits() != y[j].to_bits()) {
            return format!("{what}[{j}] {:e} vs {:e}", x[j], y[j]);
        }
    }
    "nothing".to_string()
}

/// The bit patterns of a slice, for exact comparisons that also cover NaN and signed zeros.
pub fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// Runs one entry point on fresh output buffers.
///
/// # Errors
///
/// The error of the call, if any.
pub fn try_run(
    ce: &CrossEntropy<'_>,
    entry: Entry,
    logits: &[f32],
    targets: &[u32],
) -> Result<Output, Error> {
    // Sentinels, so that an element the kernel forgets to write is visible.
    let mut losses = vec![f32::from_bits(0x7fc0_dead); targets.len()];
    match entry {
        Entry::Forward => {
            let total = ce.forward(logits, targets, &mut losses)?;
            Ok(Output {
                total,
                losses,
                grad: Vec::new(),
            })
        }
        Entry::ForwardBackward => {
            let mut grad = vec![f32::from_bits(0x7fc0_beef); logits.len()];
            let total = ce.forward_backward(logits, targets, &mut losses, &mut grad)?;
            Ok(Output {
                total,
                losses,
                grad,
            })
        }
        Entry::InPlace => {
            let mut grad = logits.to_vec();
            let total = ce.forward_backward_in_place(&mut grad, targets, &mut losses)?;
            Ok(Output {
                total,
                losses,
                grad,
            })
        }
    }
}

/// Runs one entry point; panics (with the configuration) if it returns an error.
pub fn run(ce: &CrossEntropy<'_>, entry: Entry, logits: &[f32], targets: &[u32]) -> Output {
    match try_run(ce, entry, logits, targets) {
        Ok(out) => out,
        Err(e) => panic!("{ce:?} {entry:?} failed: {e}"),
    }
}

/// The f64 reference results for a batch.
#[derive(Debug, Clone)]
pub struct Expected {
    /// Row losses (0 for ignored rows).
    pub losses: Vec<f64>,
    /// Unscaled row gradients `p - q` (0 for ignored rows).
    pub grad: Vec<f64>,
    /// Which rows are ignored.
    pub ignored: Vec<bool>,
    /// The factor the kernels apply to the gradient: `f32(1 / D)` for the mean, else 1.
    pub scale: f64,
    /// The reduced loss in f64.
    pub total: f64,
    /// How far the kernel's reduced loss may be from `total`: the row tolerances, reduced the same
    /// way, plus one f32 rounding.
    pub total_tolerance: f64,
}

/// The reference results of `ce` on a batch, row by row with [`reference::row`].
pub fn expected(ce: &CrossEntropy<'_>, logits: &[f32], targets: &[u32]) -> Expected {
    let k = ce.classes();
    let smoothing = ce.smoothing_config();
    let mut losses = Vec::with_capacity(targets.len());
    let mut grad = vec![0.0_f64; logits.len()];
    let mut ignored = Vec::with_capacity(targets.len());
    for (i, (z, &t)) in logits.chunks_exact(k).zip(targets).enumerate() {
        if Some(t) == ce.ignore_index_config() {
            losses.push(0.0);
            ignored.push(true);
            continue;
        }
        let g = &mut grad[i * k..(i + 1) * k];
        let loss = reference::row(z, t as usize, smoothing, Some(g))
            .unwrap_or_else(|e| panic!("reference rejected row {i}: {e}"));
        losses.push(loss);
        ignored.push(false);
    }
    let counted = ignored.iter().filter(|&&i| !i).count();
    let sum: f64 = losses.iter().sum();
    let slack: f64 = losses
        .iter()
        .zip(&ignored)
        .filter(|(_, &i)| !i)
        .map(|(l, _)| LOSS_TOLERANCE * l.abs().max(1.0))
        .sum();
    let (total, total_tolerance, scale) = match ce.reduction_config() {
        Reduction::Mean if counted == 0 => (0.0, 0.0, 1.0),
        Reduction::Mean => {
            let d = counted as f64;
            (sum / d, slack / d, f64::from((1.0 / d) as f32))
        }
        Reduction::Sum | Reduction::None => (sum, slack, 1.0),
    };
    Expected {
        losses,
        grad,
        ignored,
        scale,
        total,
        total_tolerance: total_tolerance + f64::from(f32::EPSILON) * total.abs(),
    }
}

/// Whether the reduced loss `got` agrees with the reference `want`.
pub fn total_agrees(got: f32, want: &Expected) -> bool {
    if !want.total.is_finite() || !got.is_finite() {
        // NaN only with NaN; infinity only where the true value rounds to it in f32.
        return reference::agrees(got, want.total, LOSS_TOLERANCE);
    }
    (f64::from(got) - want.total).abs() <= want.total_tolerance
}

/// The first few mismatches of a comparison, and how many there were.
#[derive(Debug, Default)]
struct Report {
    text: String,
    count: usize,
}

impl Report {
    fn fail(&mut self, msg: impl FnOnce() -> String) {
        self.count += 1;
        if self.count <= 8 {
            self.text.push_str(&msg());
            self.text.push('\n');
        }
    }

    fn finish(self) -> Result<(), String> {
        if self.count == 0 {
            Ok(())
        } else {
            Err(format!("{} mismatches:\n{}", self.count, self.text))
        }
    }
}

/// Checks a kernel output against the reference: every row loss, every gradient element (scaled
/// by the reduction's factor, with the tolerance scaled alike), the reduced loss, and exact zeros
/// on ignored rows. Returns a description of the first few mismatches.
///
/// # Errors
///
/// The description of the mismatches, if any.
pub fn check(out: &Output, want: &Expected, k: usize) -> Result<(), String> {
    let mut report = Report::default();
    if out.losses.len() != want.losses.len() {
        return Err(format!(
            "{} losses, expected {}",
            out.losses.len(),
            want.losses.len()
        ));
    }
    for (i, (&got, &w)) in out.losses.iter().zip(&want.losses).enumerate() {
        if want.ignored[i] {
            if got != 0.0 {
                report.fail(|| format!("ignored row {i}: loss {got}, not 0"));
            }
        } else if !reference::agrees(got, w, LOSS_TOLERANCE) {
            report.fail(|| format!("row {i}: loss {got}, reference {w}"));
        }
    }
    if !total_agrees(out.total, want) {
        report.fail(|| {
            format!(
                "reduced loss {}, reference {} (tolerance {})",
                out.total, want.total, want.total_tolerance
            )
        });
    }
    if !out.grad.is_empty() {
        if out.grad.len() != want.grad.len() {
            return Err(format!(
                "{} gradient elements, expected {}",
                out.grad.len(),
                want.grad.len()
            ));
        }
        let tolerance = GRAD_TOLERANCE * want.scale;
        for (j, (&got, &w)) in out.grad.iter().zip(&want.grad).enumerate() {
            let (i, c) = (j / k, j % k);
            if want.ignored[i] {
                if got != 0.0 {
                    report.fail(|| format!("ignored row {i} class {c}: gradient {got}, not 0"));
                }
            } else if !reference::agrees(got, want.scale * w, tolerance) {
                report.fail(|| {
                    format!(
                        "row {i} class {c}: gradient {got}, reference {} (scale {})",
                        want.scale * w,
                        want.scale
                    )
                });
            }
        }
    }
    report.finish()
}

/// Runs every entry point on every backend and checks each against the reference; also checks
/// that the in-place gradient is bit-identical to the out-of-place one. Returns the first
/// failure, described with its configuration.
///
/// # Errors
///
/// The description of the failure.
pub fn check_all(ce: &CrossEntropy<'_>, logits: &[f32], targets: &[u32]) -> Result<(), String> {
    let want = expected(ce, logits, targets);
    let k = ce.classes();
    for backend in backends() {
        let ce = ce.backend(backend);
        let mut separate = None;
        for entry in Entry::ALL {
            let out = try_run(&ce, entry, logits, targets)
                .map_err(|e| format!("{ce:?} {entry:?}: error {e}"))?;
            check(&out, &want, k).map_err(|e| format!("{ce:?} {entry:?}: {e}"))?;
            match entry {
                Entry::Forward => {}
                Entry::ForwardBackward => separate = Some(out),
                Entry::InPlace => {
                    let separate = separate.as_ref().ok_or("no out-of-place result")?;
                    if !out.bits_eq(separate) {
                        return Err(format!(
                            "{ce:?}: in-place and out-of-place results differ in their bits: {}",
                            first_difference(&out, separate)
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Both smoothing conventions with `eps`, where `k` allows them.
pub fn smoothings(eps: f32, k: usize) -> Vec<Smoothing> {
    let mut all = vec![Smoothing::Uniform(eps)];
    if k >= 2 {
        all.push(Smoothing::OffTarget(eps));
    }
    all
}
