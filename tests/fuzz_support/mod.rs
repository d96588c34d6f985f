//! The checking logic shared by the fuzz targets (`fuzz/fuzz_targets/*.rs`) and the corpus replay
//! test (`tests/fuzz_corpus.rs`), so that a committed corpus file means the same case everywhere.
//!
//! * [`differential`]: decodes bytes into a batch (shape, smoothing, ignore index, reduction,
//!   backend, entry point, logits with special values, unaligned slice starts) and compares the
//!   kernel with [`smoothce::reference`]: every row loss, every gradient element, the reduced value,
//!   in-place against out-of-place bit for bit, and guard elements around every output slice.
//! * [`arguments`]: decodes bytes into arbitrary lengths, targets, `K`, `eps` and ignore index;
//!   the call must return `Err` exactly when [`violations`] (an independent reading of the rules
//!   documented in `error.rs` and `loss.rs`) finds one, the error must be one of those found, and an
//!   `Err` must leave every output buffer bit-identical.
//! * [`options`]: decodes bytes into a small batch with any combination of the loss options
//!   (class or target weights, z-loss, soft-cap, logit scale, class mask, upstream gradient, mean
//!   denominator, per-row scales), every target type (signed ignore indices, soft targets), the
//!   per-row extras and a `*_with` entry point, and compares the kernel with
//!   [`smoothce::reference`] within the tolerances of `tests/options.rs`: the verdict, the losses,
//!   the extras, the summary and the gradient, in-place against out-of-place bit for bit, and
//!   guard elements around every slice. Every disagreement it found is fixed: nothing is left
//!   out of the comparison.
//!
//! Decoding never fails: [`arbitrary::Unstructured`] yields zeros once the bytes run out.

// The generator and the checker read best as one long function each.
#![allow(clippy::too_many_lines)]

use std::fmt::Write as _;
use std::ops::RangeInclusive;

use arbitrary::{Arbitrary, Unstructured};
use smoothce::reference::{self, GRAD_TOLERANCE, LOSS_TOLERANCE};
use smoothce::{Backend, CrossEntropy, Error, Extras, Reduction, Smoothing, Summary, Targets};

// ------------------------------------------------------------------------------------------------
// Decoding helpers
// ------------------------------------------------------------------------------------------------

/// [`Unstructured`] with defaults instead of errors.
struct Input<'a>(Unstructured<'a>);

impl<'a> Input<'a> {
    fn new(data: &'a [u8]) -> Self {
        Input(Unstructured::new(data))
    }

    fn int<T>(&mut self, range: RangeInclusive<T>) -> T
    where
        T: arbitrary::unstructured::Int + Copy,
    {
        let start = *range.start();
        self.0.int_in_range(range).unwrap_or(start)
    }

    fn pick<T: Copy>(&mut self, options: &[T]) -> T {
        let last = options.len() - 1;
        options[self.int(0..=last)]
    }

    fn arb<T: Arbitrary<'a>>(&mut self, default: T) -> T {
        self.0.arbitrary().unwrap_or(default)
    }

    fn u32(&mut self) -> u32 {
        self.arb(0)
    }

    fn u64(&mut self) -> u64 {
        self.arb(0)
    }

    fn chance(&mut self, numerator: u8, denominator: u8) -> bool {
        self.0.ratio(numerator, denominator).unwrap_or(false)
    }
}

/// splitmix64: the bulk of a long row comes from a seed, the fuzzer steers the rest.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1_u64 << 53) as f64
    }

    /// Uniform in `[-1, 1)`.
    fn signed(&mut self) -> f64 {
        2.0 * self.unit() - 1.0
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
enum SmoothingKind {
    Uniform,
    OffTarget,
}

/// Which compute function a case calls.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// [`CrossEntropy::forward`].
    Forward,
    /// [`CrossEntropy::forward_backward`].
    ForwardBackward,
    /// [`CrossEntropy::forward_backward_in_place`].
    InPlace,
}

const REDUCTIONS: [Reduction; 3] = [Reduction::Mean, Reduction::Sum, Reduction::None];

fn smoothing(kind: SmoothingKind, eps: f32) -> Smoothing {
    match kind {
        SmoothingKind::Uniform => Smoothing::Uniform(eps),
        SmoothingKind::OffTarget => Smoothing::OffTarget(eps),
    }
}

fn config(
    classes: usize,
    smoothing: Smoothing,
    ignore: Option<u32>,
    reduction: Reduction,
    backend: Backend,
) -> CrossEntropy<'static> {
    let ce = CrossEntropy::new(classes)
        .smoothing(smoothing)
        .reduction(reduction)
        .backend(backend);
    match ignore {
        Some(index) => ce.ignore_index(index),
        None => ce,
    }
}

/// The error a kernel call must return: the reference's (which ignores the backend), or else
/// `BackendUnavailable` when this CPU lacks the forced backend.
fn expected_error<T>(reference: &Result<T, Error>, backend: Backend) -> Option<Error> {
    match reference {
        Err(e) => Some(*e),
        Ok(_) if !backend_available(backend) => Some(Error::BackendUnavailable { backend }),
        Ok(_) => None,
    }
}

/// Whether this CPU and target can run `backend`, read from `std`'s feature detection rather than
/// from the crate's own `cpuid` code. AVX-512 is offered together with AVX2 and FMA.
#[must_use]
pub fn backend_available(backend: Backend) -> bool {
    match backend {
        Backend::Auto | Backend::Portable => true,
        Backend::Avx2 => avx2_fma(),
        Backend::Avx512 => avx2_fma() && avx512f(),
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2_fma() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

#[cfg(target_arch = "x86_64")]
fn avx512f() -> bool {
    std::is_x86_feature_detected!("avx512f")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx2_fma() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
fn avx512f() -> bool {
    false
}

/// `Error` equality that also holds for `InvalidSmoothing { eps: NaN }` (compared by bits).
fn same_error(a: &Error, b: &Error) -> bool {
    match (a, b) {
        (Error::InvalidSmoothing { eps: x }, Error::InvalidSmoothing { eps: y }) => {
            x.to_bits() == y.to_bits()
        }
        _ => a == b,
    }
}

/// The distance from `|x|` rounded to f32 to the next f32: a bound on the error of rounding `x`.
fn ulp(x: f64) -> f64 {
    let a = (x.abs() as f32).abs();
    if a.is_infinite() {
        return f64::INFINITY;
    }
    if a == f32::MAX {
        return f64::from(f32::MAX - f32::from_bits(f32::MAX.to_bits() - 1));
    }
    f64::from(f32::from_bits(a.to_bits() + 1) - a)
}

// ------------------------------------------------------------------------------------------------
// The differential target
// ------------------------------------------------------------------------------------------------

/// Most elements in one differential case (bounds the time of a single run); a single row may be
/// longer.
const MAX_ELEMENTS: usize = 1 << 16;

/// One decoded differential case.
#[derive(Debug, Clone)]
pub struct DiffCase {
    /// `K`.
    pub classes: usize,
    /// The smoothing convention and `eps`.
    pub smoothing: Smoothing,
    /// The ignore index, if any.
    pub ignore: Option<u32>,
    /// The reduction.
    pub reduction: Reduction,
    /// The backend asked for.
    pub backend: Backend,
    /// The function called first (the two gradient forms are both run and compared).
    pub entry: Entry,
    /// One target per row.
    pub targets: Vec<u32>,
    /// `N * K` logits.
    pub logits: Vec<f32>,
    /// Start of the slice inside its buffer for logits, losses, grad and in-place logits.
    pub offsets: [usize; 4],
    /// How each row was generated (for messages).
    pub row_kinds: Vec<String>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum RowKind {
    /// `offset + spread * u`, offsets up to `1e4`, spreads up to `100`.
    Realistic,
    /// Up to `±3e38`, symmetric or in a one-signed band.
    Scaled,
    /// Subnormals and zeros.
    Subnormal,
    /// One value repeated.
    Constant,
    /// One class far above the others (which may all be equal).
    Peaked,
    /// Random bits with non-finite values folded to finite ones.
    RawFinite,
    /// Random bits as they are (NaN and infinities included).
    RawBits,
}

fn pick_classes(inp: &mut Input) -> usize {
    match inp.int(0_u8..=31) {
        // Every tail length of every vector width, and a few whole vectors.
        0..=13 | 31 => inp.int(1..=70),
        14 | 15 => inp.pick(&[
            1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 128, 129,
        ]),
        16..=19 => inp.int(1..=600),
        20..=23 => inp.int(1..=5000),
        24..=26 => inp.int(1..=20_000),
        // Around the accumulator block boundaries.
        27 | 28 => {
            let blocks = inp.int(1_usize..=3);
            let delta = inp.int(0_usize..=34);
            blocks * 4096 + delta - 17
        }
        // Long rows, around 2^18 elements: rare, these are slow.
        29 => (1 << 18) + inp.int(0_usize..=66) - 33,
        _ => inp.int(5000..=300_000),
    }
}

fn pick_eps(inp: &mut Input) -> f32 {
    match inp.int(0_u8..=9) {
        0 => 0.0,
        1 => 1.0,
        2 => 0.1,
        3 => -0.0,
        4 => f32::from_bits(1.0_f32.to_bits() - 1),
        5 => f32::from_bits(inp.int(1_u32..=0x007F_FFFF)),
        6 => inp.pick(&[0.5, 0.2, 0.3, 0.9, 0.01, 1e-3, 1e-6]),
        _ => (inp.u32() >> 8) as f32 / (1_u32 << 24) as f32,
    }
}

fn pick_ignore(inp: &mut Input, classes: usize) -> Option<u32> {
    let k = u32::try_from(classes).unwrap_or(u32::MAX);
    match inp.int(0_u8..=7) {
        0..=2 => None,
        3 => Some(u32::MAX),
        4 => Some(inp.int(0..=k - 1)),
        5 => Some(k),
        6 => Some(-100_i32 as u32),
        _ => Some(inp.u32()),
    }
}

fn pick_target(inp: &mut Input, classes: usize, ignore: Option<u32>) -> u32 {
    let last = u32::try_from(classes - 1).unwrap_or(u32::MAX);
    if let Some(index) = ignore {
        if inp.chance(1, 4) {
            return index;
        }
    }
    match inp.int(0_u8..=3) {
        0 => 0,
        1 => last,
        _ => inp.int(0..=last),
    }
}

const SPECIALS: [f32; 20] = [
    f32::NAN,
    f32::INFINITY,
    f32::NEG_INFINITY,
    f32::NEG_INFINITY,
    f32::NEG_INFINITY,
    f32::MAX,
    f32::MIN,
    3e38,
    -3e38,
    1e-45,
    -1e-45,
    1e-40,
    -1e-40,
    f32::MIN_POSITIVE,
    0.0,
    -0.0,
    1e30,
    -1e30,
    88.0,
    -104.0,
];

fn special(inp: &mut Input) -> f32 {
    match inp.int(0_u8..=9) {
        // NaN with other payloads and signs (signalling ones included).
        0 => f32::from_bits(0x7F80_0000 | inp.int(1_u32..=0x007F_FFFF) | (inp.u32() & 0x8000_0000)),
        1 => f32::from_bits(inp.u32()),
        _ => inp.pick(&SPECIALS),
    }
}

/// A position in a row of `k` elements that the kernels treat specially, or the target.
fn position(inp: &mut Input, rng: &mut Rng, k: usize, target: Option<usize>) -> usize {
    let pos = match inp.int(0_u8..=6) {
        0 => target.unwrap_or(0),
        1 => 0,
        2 => k - 1,
        3 => k.saturating_sub(1 + inp.int(0_usize..=16)),
        4 => inp.pick(&[7, 8, 15, 16, 31, 32, 63, 64, 127, 128, 4095, 4096, 4097]),
        _ => rng.below(k),
    };
    pos.min(k - 1)
}

fn realistic(inp: &mut Input, rng: &mut Rng, row: &mut [f32]) {
    let offset = match inp.int(0_u8..=4) {
        0 => 0.0,
        1 => 1e4,
        2 => -1e4,
        3 => 3e3,
        _ => 1e4 * rng.signed(),
    };
    let spread = inp.pick(&[100.0, 100.0, 30.0, 10.0, 1.0, 1e-3]);
    for z in row {
        *z = (offset + spread * rng.signed()) as f32;
    }
}

fn generate_row(inp: &mut Input, rng: &mut Rng, row: &mut [f32], target: Option<usize>) -> String {
    let k = row.len();
    let kind = inp.arb(RowKind::Realistic);
    let mut label = format!("{kind:?}");
    match kind {
        RowKind::Realistic => realistic(inp, rng, row),
        RowKind::Scaled => {
            let exponent = inp.int(0_i32..=127);
            let scale = (2.0_f64.powi(exponent) * (1.0 + rng.unit())).min(3e38);
            let band = inp.int(0_u8..=3);
            let _ = write!(label, "(scale {scale:e}, band {band})");
            for z in row.iter_mut() {
                let v = match band {
                    0 | 1 => rng.signed(),
                    2 => 0.5 + 0.5 * rng.unit(),
                    _ => -(0.5 + 0.5 * rng.unit()),
                };
                *z = (scale * v) as f32;
            }
        }
        RowKind::Subnormal => {
            for z in row.iter_mut() {
                let bits = (rng.next() as u32) & 0x807F_FFFF;
                *z = if rng.below(8) == 0 {
                    0.0
                } else {
                    f32::from_bits(bits)
                };
            }
        }
        RowKind::Constant => {
            let value = match inp.int(0_u8..=3) {
                0 => 0.0,
                1 => (1e4 * rng.signed()) as f32,
                2 => special(inp),
                _ => inp.pick(&[3e38, -3e38, 1e-45, -87.5]),
            };
            let _ = write!(label, "({value:e})");
            row.fill(value);
        }
        RowKind::Peaked => {
            if inp.chance(1, 2) {
                let value = (1e4 * rng.signed()) as f32;
                row.fill(value);
                label.push_str("(flat)");
            } else {
                realistic(inp, rng, row);
            }
            let gap = inp.pick(&[
                1.0, 10.3, 20.0, 87.0, 87.5, 88.8, 103.0, 104.0, 200.0, 1e4, 1e30,
            ]);
            let at = position(inp, rng, k, target);
            let _ = write!(label, "(+{gap:e} at {at})");
            row[at] += gap;
        }
        RowKind::RawFinite => {
            for z in row.iter_mut() {
                let bits = rng.next() as u32;
                let value = f32::from_bits(bits);
                *z = if value.is_finite() {
                    value
                } else {
                    f32::from_bits(bits & 0xBFFF_FFFF)
                };
            }
        }
        RowKind::RawBits => {
            for z in row.iter_mut() {
                *z = f32::from_bits(rng.next() as u32);
            }
        }
    }
    // -inf masks.
    match inp.int(0_u8..=9) {
        0 => {
            let stride = inp.int(1_usize..=17);
            let phase = inp.int(0..=stride - 1);
            let _ = write!(label, " mask(stride {stride}, phase {phase})");
            for z in row.iter_mut().skip(phase).step_by(stride) {
                *z = f32::NEG_INFINITY;
            }
        }
        1 => {
            let a = position(inp, rng, k, target);
            let b = position(inp, rng, k, target);
            let (a, b) = (a.min(b), a.max(b));
            let _ = write!(label, " mask({a}..={b})");
            row[a..=b].fill(f32::NEG_INFINITY);
        }
        2 => {
            let keep = position(inp, rng, k, target);
            let _ = write!(label, " mask(all but {keep})");
            for (i, z) in row.iter_mut().enumerate() {
                if i != keep {
                    *z = f32::NEG_INFINITY;
                }
            }
        }
        3 => {
            label.push_str(" mask(all)");
            row.fill(f32::NEG_INFINITY);
        }
        _ => {}
    }
    // Patches of special values.
    let patches = inp.int(0_u8..=6);
    for _ in 0..patches {
        let at = position(inp, rng, k, target);
        let value = special(inp);
        let _ = write!(label, " [{at}]={value:e}");
        row[at] = value;
    }
    label
}

/// Decodes a differential case from fuzzer bytes.
#[must_use]
pub fn decode_differential(data: &[u8]) -> DiffCase {
    let mut inp = Input::new(data);
    let classes = pick_classes(&mut inp);
    let max_rows = (MAX_ELEMENTS / classes).clamp(1, 8);
    let rows = inp.int(0..=max_rows);
    let kind = inp.arb(SmoothingKind::Uniform);
    let eps = pick_eps(&mut inp);
    let ignore = pick_ignore(&mut inp, classes);
    let reduction = inp.pick(&REDUCTIONS);
    let backend = inp.pick(&Backend::ALL);
    let entry = inp.arb(Entry::Forward);
    let offsets = [
        inp.int(0..=15),
        inp.int(0..=15),
        inp.int(0..=15),
        inp.int(0..=15),
    ];
    let mut rng = Rng(inp.u64());
    let mut targets = Vec::with_capacity(rows);
    let mut logits = vec![0.0_f32; rows * classes];
    let mut row_kinds = Vec::with_capacity(rows);
    for row in logits.chunks_exact_mut(classes) {
        let target = pick_target(&mut inp, classes, ignore);
        let class = Some(target as usize).filter(|&t| Some(target) != ignore && t < classes);
        row_kinds.push(generate_row(&mut inp, &mut rng, row, class));
        targets.push(target);
    }
    DiffCase {
        classes,
        smoothing: smoothing(kind, eps),
        ignore,
        reduction,
        backend,
        entry,
        targets,
        logits,
        offsets,
        row_kinds,
    }
}

/// A slice at an offset inside a larger buffer whose other elements are guards.
struct Guarded {
    buf: Vec<f32>,
    start: usize,
    len: usize,
}

/// A signalling NaN with a payload no kernel produces.
const GUARD: u32 = 0x7FA5_A5A5;
const PAD: usize = 16;

impl Guarded {
    fn new(start: usize, contents: &[f32]) -> Self {
        let len = contents.len();
        let mut buf = vec![f32::from_bits(GUARD); start + len + PAD];
        buf[start..start + len].copy_from_slice(contents);
        Guarded { buf, start, len }
    }

    fn filled(start: usize, len: usize, value: f32) -> Self {
        Guarded::new(start, &vec![value; len])
    }

    fn get(&self) -> &[f32] {
        &self.buf[self.start..self.start + self.len]
    }

    fn get_mut(&mut self) -> &mut [f32] {
        &mut self.buf[self.start..self.start + self.len]
    }

    fn guards_intact(&self) -> bool {
        self.buf[..self.start]
            .iter()
            .chain(&self.buf[self.start + self.len..])
            .all(|x| x.to_bits() == GUARD)
    }
}

/// What the kernel wrote. Loss slots are pre-filled with [`LOSS_SENTINEL`] and gradient slots with
/// [`GRAD_SENTINEL`], values no loss or gradient can take, so unwritten slots are caught.
struct Outcome {
    result: Result<f32, Error>,
    losses: Guarded,
    /// The gradient (the overwritten logits for the in-place call); `None` for `forward`.
    grad: Option<Guarded>,
    /// The logits buffer read by `forward` and `forward_backward`.
    logits: Option<Guarded>,
}

const LOSS_SENTINEL: f32 = -7.0;
const GRAD_SENTINEL: f32 = 7.0;

fn run(case: &DiffCase, ce: &CrossEntropy<'_>, entry: Entry) -> Outcome {
    let [logits_at, losses_at, grad_at, in_place_at] = case.offsets;
    let targets = &case.targets;
    let mut losses = Guarded::filled(losses_at, targets.len(), LOSS_SENTINEL);
    match entry {
        Entry::Forward => {
            let logits = Guarded::new(logits_at, &case.logits);
            let result = ce.forward(logits.get(), targets, losses.get_mut());
            Outcome {
                result,
                losses,
                grad: None,
                logits: Some(logits),
            }
        }
        Entry::ForwardBackward => {
            let logits = Guarded::new(logits_at, &case.logits);
            let mut grad = Guarded::filled(grad_at, case.logits.len(), GRAD_SENTINEL);
            let result =
                ce.forward_backward(logits.get(), targets, losses.get_mut(), grad.get_mut());
            Outcome {
                result,
                losses,
                grad: Some(grad),
                logits: Some(logits),
            }
        }
        Entry::InPlace => {
            let mut buf = Guarded::new(in_place_at, &case.logits);
            let result = ce.forward_backward_in_place(buf.get_mut(), targets, losses.get_mut());
            Outcome {
                result,
                losses,
                grad: Some(buf),
                logits: None,
            }
        }
    }
}

impl DiffCase {
    fn config(&self) -> CrossEntropy<'static> {
        config(
            self.classes,
            self.smoothing,
            self.ignore,
            self.reduction,
            self.backend,
        )
    }

    fn row(&self, i: usize) -> &[f32] {
        &self.logits[i * self.classes..(i + 1) * self.classes]
    }

    fn is_ignored(&self, i: usize) -> bool {
        Some(self.targets[i]) == self.ignore
    }

    /// A bounded description of the case and of row `row` (if any), for failure messages.
    fn describe(&self, row: Option<usize>, class: Option<usize>) -> String {
        let mut s = format!(
            "K = {}, N = {}, {:?}, ignore_index {:?}, {:?}, {:?}, entry {:?}, offsets {:?}, \
             targets {:?}",
            self.classes,
            self.targets.len(),
            self.smoothing,
            self.ignore,
            self.reduction,
            self.backend,
            self.entry,
            self.offsets,
            self.targets,
        );
        if let Some(i) = row {
            let z = self.row(i);
            let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let min = z.iter().copied().fold(f32::INFINITY, f32::min);
            let masked = z.iter().filter(|&&x| x == f32::NEG_INFINITY).count();
            let nan = z.iter().filter(|x| x.is_nan()).count();
            let pinf = z.iter().filter(|&&x| x == f32::INFINITY).count();
            let _ = write!(
                s,
                "\n row {i}: {}, target {}, max {max:e}, min {min:e}, {masked} masked, {nan} NaN, \
                 {pinf} +inf",
                self.row_kinds[i], self.targets[i],
            );
            if let Some(&t) = z.get(self.targets[i] as usize) {
                let _ = write!(s, ", target logit {t:e}");
            }
            let around = class.unwrap_or(0);
            let lo = around.saturating_sub(4);
            let hi = (around + 5).min(z.len());
            let _ = write!(s, "\n logits[{lo}..{hi}] = {:?}", &z[lo..hi]);
        }
        s
    }
}

/// Decodes `data` as a differential case and checks it; panics with a description on mismatch.
pub fn differential(data: &[u8]) {
    check_differential(&decode_differential(data));
}

/// Runs `case` on the kernel and compares with the reference; panics on any mismatch.
///
/// # Panics
///
/// When the kernel disagrees with the reference beyond the documented tolerances, breaks the NaN,
/// masking or ignore rules, writes outside its slices, or differs between the in-place and
/// out-of-place gradient calls.
pub fn check_differential(case: &DiffCase) {
    let ce = case.config();
    let n = case.targets.len();
    let k = case.classes;
    let mut ref_losses = vec![0.0_f32; n];
    let mut ref_grad = vec![0.0_f32; case.logits.len()];
    let want = reference::forward_backward(
        &ce,
        &case.logits,
        &case.targets,
        &mut ref_losses,
        &mut ref_grad,
    );
    let got = run(case, &ce, case.entry);
    check_untouched_guards(case, &got);
    let expected_err = expected_error(&want, case.backend);
    if let Some(e) = expected_err {
        check_rejected(case, &got, &e);
        return;
    }
    let returned = match got.result {
        Ok(value) => value,
        Err(e) => panic!(
            "kernel returned {e:?} where the reference succeeded\n{}",
            case.describe(None, None)
        ),
    };

    // The mean's denominator and gradient scale, computed here from the documented rule.
    let counted = (0..n).filter(|&i| !case.is_ignored(i)).count();
    let scale = match case.reduction {
        Reduction::Mean if counted > 0 => 1.0 / counted as f64,
        _ => 1.0,
    };

    let losses = got.losses.get();
    let grad = got.grad.as_ref().map(Guarded::get);
    let mut want_sum = 0.0_f64;
    let mut bound_sum = 0.0_f64;
    let mut row_grad = vec![0.0_f64; k];
    let (loss_tolerance, grad_tolerance) = (LOSS_TOLERANCE, GRAD_TOLERANCE);
    for i in 0..n {
        let loss = losses[i];
        if case.is_ignored(i) {
            assert!(
                loss == 0.0,
                "ignored row {i} has loss {loss:e}, not 0\n{}",
                case.describe(Some(i), None)
            );
            if let Some(g) = grad {
                if let Some(c) = g[i * k..(i + 1) * k].iter().position(|&x| x != 0.0) {
                    panic!(
                        "ignored row {i} has gradient {:e} at class {c}, not 0\n{}",
                        g[i * k + c],
                        case.describe(Some(i), Some(c))
                    );
                }
            }
            continue;
        }
        let z = case.row(i);
        let row_want = reference::row(
            z,
            case.targets[i] as usize,
            case.smoothing,
            Some(&mut row_grad),
        )
        .unwrap_or_else(|e| {
            panic!(
                "reference::row rejected a row the batch accepted: {e:?}\n{}",
                case.describe(Some(i), None)
            )
        });
        assert!(
            reference::agrees(loss, row_want, loss_tolerance),
            "row {i}: loss {loss:e} (bits {:#010x}), reference {row_want:e}, difference {:e}\n{}",
            loss.to_bits(),
            f64::from(loss) - row_want,
            case.describe(Some(i), Some(case.targets[i] as usize))
        );
        want_sum += row_want;
        bound_sum += loss_tolerance * row_want.abs().max(1.0);
        if let Some(g) = grad {
            let target = case.targets[i] as usize;
            let valid_row = !z.iter().any(|x| x.is_nan() || *x == f32::INFINITY);
            for c in 0..k {
                let got_c = g[i * k + c];
                let want_c = ref_grad[i * k + c];
                // A masked class gets exactly 0, unless it is the target (then `-q_y`).
                let masked = valid_row && z[c] == f32::NEG_INFINITY && c != target;
                let ok = if masked {
                    got_c == 0.0
                } else {
                    grad_agrees(got_c, want_c, grad_tolerance * scale)
                };
                assert!(
                    ok,
                    "row {i} class {c}: gradient {got_c:e}, reference {want_c:e} (f64 unscaled \
                     {:e}, scale {scale:e}){}, difference {:e}, tolerance {:e}\n{}",
                    row_grad[c],
                    if masked {
                        ", masked class: must be exactly 0"
                    } else {
                        ""
                    },
                    f64::from(got_c) - f64::from(want_c),
                    grad_tolerance * scale + ulp(f64::from(want_c)),
                    case.describe(Some(i), Some(c))
                );
            }
        }
    }
    check_reduced(case, returned, want_sum, bound_sum, counted);

    // The other form of the gradient call must give the same bits.
    let other = match case.entry {
        Entry::Forward => return,
        Entry::ForwardBackward => Entry::InPlace,
        Entry::InPlace => Entry::ForwardBackward,
    };
    let again = run(case, &ce, other);
    check_untouched_guards(case, &again);
    let Ok(returned_again) = again.result else {
        panic!(
            "{other:?} returned {:?} where {:?} succeeded\n{}",
            again.result,
            case.entry,
            case.describe(None, None)
        );
    };
    assert!(
        returned.to_bits() == returned_again.to_bits(),
        "{:?} returned {returned:e}, {other:?} returned {returned_again:e}\n{}",
        case.entry,
        case.describe(None, None)
    );
    let pairs = [
        ("loss", got.losses.get(), again.losses.get()),
        (
            "gradient",
            grad.unwrap_or(&[]),
            again.grad.as_ref().map_or(&[][..], Guarded::get),
        ),
    ];
    for (what, a, b) in pairs {
        if let Some(j) = (0..a.len()).find(|&j| a[j].to_bits() != b[j].to_bits()) {
            let (row, class) = if what == "loss" {
                (j, None)
            } else {
                (j / k, Some(j % k))
            };
            panic!(
                "in-place and out-of-place differ: {what} [{j}] is {:e} from {:?} and {:e} from \
                 {other:?}\n{}",
                a[j],
                case.entry,
                b[j],
                case.describe(Some(row), class)
            );
        }
    }
}

/// A gradient element against the reference batch's f32 output: within `tolerance` (the gradient
/// tolerance times the scale), plus the rounding of the reference value to f32.
fn grad_agrees(got: f32, want: f32, tolerance: f64) -> bool {
    if want.is_nan() {
        return got.is_nan();
    }
    if !got.is_finite() {
        return false;
    }
    let tolerance = tolerance + ulp(f64::from(want));
    (f64::from(got) - f64::from(want)).abs() <= tolerance
}

/// The reduced value: the mean or sum of the row losses, each within its own tolerance, plus the
/// final rounding to f32.
fn check_reduced(case: &DiffCase, returned: f32, want_sum: f64, bound_sum: f64, counted: usize) {
    let denominator = match case.reduction {
        Reduction::Mean => counted as f64,
        Reduction::Sum | Reduction::None => 1.0,
    };
    if denominator == 0.0 {
        assert!(
            returned == 0.0,
            "every row is ignored but the mean is {returned:e}, not 0\n{}",
            case.describe(None, None)
        );
        return;
    }
    let want = want_sum / denominator;
    let bound = bound_sum / denominator;
    let got = f64::from(returned);
    let ok = if want.is_nan() {
        got.is_nan()
    } else if want.is_infinite() {
        got == want
    } else if got.is_nan() {
        false
    } else if got.is_infinite() {
        // Allowed only where a value within the tolerance rounds to infinity in f32.
        got.signum() == want.signum() && ((want.abs() + bound) as f32).is_infinite()
    } else {
        (got - want).abs() <= bound + ulp(want)
    };
    assert!(
        ok,
        "reduced loss {returned:e}, reference {want:e}, difference {:e}, tolerance {:e}\n{}",
        got - want,
        bound + ulp(want),
        case.describe(None, None)
    );
}

fn check_untouched_guards(case: &DiffCase, out: &Outcome) {
    let buffers = [
        ("losses", Some(&out.losses)),
        ("gradient", out.grad.as_ref()),
        ("logits", out.logits.as_ref()),
    ];
    for (what, buffer) in buffers {
        if let Some(buffer) = buffer {
            assert!(
                buffer.guards_intact(),
                "a write outside the {what} slice\n{}",
                case.describe(None, None)
            );
        }
    }
}

/// The call must have failed with `want` and written nothing.
fn check_rejected(case: &DiffCase, out: &Outcome, want: &Error) {
    match &out.result {
        Err(e) if same_error(e, want) => {}
        other => panic!(
            "expected Err({want:?}), got {other:?}\n{}",
            case.describe(None, None)
        ),
    }
    let untouched = out
        .losses
        .get()
        .iter()
        .all(|x| x.to_bits() == LOSS_SENTINEL.to_bits());
    assert!(
        untouched,
        "losses written by a rejected call\n{}",
        case.describe(None, None)
    );
    if let Some(g) = &out.grad {
        let untouched = match case.entry {
            Entry::InPlace => g
                .get()
                .iter()
                .zip(&case.logits)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            _ => g
                .get()
                .iter()
                .all(|x| x.to_bits() == GRAD_SENTINEL.to_bits()),
        };
        assert!(
            untouched,
            "gradient written by a rejected call\n{}",
            case.describe(None, None)
        );
    }
}

// ------------------------------------------------------------------------------------------------
// The arguments target
// ------------------------------------------------------------------------------------------------

/// Longest buffer the arguments target allocates.
const MAX_LEN: usize = 1 << 14;

/// One decoded arguments case: anything goes.
#[derive(Debug, Clone)]
pub struct ArgCase {
    /// `K`, possibly 0 or huge.
    pub classes: usize,
    /// Any `eps` bits.
    pub smoothing: Smoothing,
    /// The ignore index, if any.
    pub ignore: Option<u32>,
    /// The reduction.
    pub reduction: Reduction,
    /// The backend asked for.
    pub backend: Backend,
    /// The function called.
    pub entry: Entry,
    /// Any targets.
    pub targets: Vec<u32>,
    /// `logits.len()`.
    pub logits_len: usize,
    /// `losses.len()`.
    pub losses_len: usize,
    /// `grad.len()` (used by `forward_backward` only).
    pub grad_len: usize,
    /// Seed of the buffer contents.
    pub seed: u64,
}

fn pick_arg_classes(inp: &mut Input, rows: usize) -> usize {
    let huge = |x: u64| usize::try_from(x).unwrap_or(usize::MAX);
    match inp.int(0_u8..=9) {
        0 => 0,
        1 => inp.int(1..=3),
        2..=4 => inp.int(1..=40),
        5 => inp.int(1..=4096),
        // Just below and just above the overflow of rows * K.
        6 => (usize::MAX / rows.max(1)).saturating_add(inp.int(0..=1)),
        7 => inp.pick(&[
            usize::MAX,
            usize::MAX / 2,
            usize::MAX / 2 + 1,
            huge(1 << 32),
            huge((1 << 32) + 1),
            huge(1 << 62),
            u32::MAX as usize,
        ]),
        _ => huge(inp.u64()),
    }
}

fn pick_any_eps(inp: &mut Input) -> f32 {
    match inp.int(0_u8..=7) {
        0 => f32::from_bits(inp.u32()),
        1 => pick_eps(inp),
        _ => inp.pick(&[
            0.0,
            -0.0,
            1.0,
            0.1,
            f32::from_bits(1.0_f32.to_bits() + 1),
            -f32::from_bits(1),
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            2.0,
            -0.5,
        ]),
    }
}

fn pick_len(inp: &mut Input, exact: Option<usize>, small: usize) -> usize {
    let exact = exact.filter(|&e| e <= MAX_LEN);
    match (inp.int(0_u8..=5), exact) {
        (0..=2, Some(e)) => e,
        (3, Some(e)) => e.saturating_add(1).min(MAX_LEN),
        (4, Some(e)) => e.saturating_sub(1),
        (0 | 1, None) => 0,
        _ => inp.int(0..=small),
    }
}

/// Decodes an arguments case from fuzzer bytes.
#[must_use]
pub fn decode_arguments(data: &[u8]) -> ArgCase {
    let mut inp = Input::new(data);
    let rows = inp.int(0_usize..=12);
    let classes = pick_arg_classes(&mut inp, rows);
    let kind = inp.arb(SmoothingKind::Uniform);
    let eps = pick_any_eps(&mut inp);
    let ignore = if inp.chance(1, 2) {
        None
    } else {
        Some(match inp.int(0_u8..=3) {
            0 => u32::MAX,
            1 => u32::try_from(classes).unwrap_or(u32::MAX),
            2 => inp.int(0..=40),
            _ => inp.u32(),
        })
    };
    let reduction = inp.pick(&REDUCTIONS);
    let backend = inp.pick(&Backend::ALL);
    let entry = inp.arb(Entry::Forward);
    let k32 = u32::try_from(classes).unwrap_or(u32::MAX);
    let targets = (0..rows)
        .map(|_| match inp.int(0_u8..=7) {
            0..=2 if classes > 0 => inp.u32() % k32,
            3 if classes > 0 => k32 - 1,
            4 => k32,
            5 => ignore.unwrap_or(u32::MAX),
            6 => u32::MAX,
            _ => inp.u32(),
        })
        .collect();
    let exact = rows.checked_mul(classes);
    let logits_len = pick_len(&mut inp, exact, 64);
    let losses_len = pick_len(&mut inp, Some(rows), 16);
    let grad_len = if inp.chance(1, 4) {
        logits_len
    } else {
        pick_len(&mut inp, exact, 64)
    };
    ArgCase {
        classes,
        smoothing: smoothing(kind, eps),
        ignore,
        reduction,
        backend,
        entry,
        targets,
        logits_len,
        losses_len,
        grad_len,
        seed: inp.u64(),
    }
}

/// Every documented rule that `case` breaks, each as the error that reports it. Written from the
/// documentation of [`Error`] and [`CrossEntropy`], not from the crate's checks: the order in which
/// the crate tests them is not part of the contract, so any of these may be the one returned.
#[must_use]
pub fn violations(case: &ArgCase) -> Vec<Error> {
    let k = case.classes;
    let n = case.targets.len();
    let mut found = Vec::new();
    if k == 0 {
        found.push(Error::ZeroClasses);
    }
    let eps = case.smoothing.eps();
    if eps.is_nan() || !(0.0..=1.0).contains(&eps) {
        found.push(Error::InvalidSmoothing { eps });
    }
    if matches!(case.smoothing, Smoothing::OffTarget(_)) && k < 2 {
        found.push(Error::OffTargetNeedsTwoClasses { classes: k });
    }
    match n.checked_mul(k) {
        None => found.push(Error::SizeOverflow {
            rows: n,
            classes: k,
        }),
        Some(expected) => {
            if case.logits_len != expected {
                found.push(Error::LogitsLength {
                    expected,
                    actual: case.logits_len,
                });
            }
            if case.entry == Entry::ForwardBackward && case.grad_len != expected {
                found.push(Error::GradLength {
                    expected,
                    actual: case.grad_len,
                });
            }
        }
    }
    if case.losses_len != n {
        found.push(Error::LossesLength {
            expected: n,
            actual: case.losses_len,
        });
    }
    for (row, &target) in case.targets.iter().enumerate() {
        if Some(target) != case.ignore && u64::from(target) >= k as u64 {
            found.push(Error::TargetOutOfRange {
                row,
                target: i64::from(target),
                classes: k,
            });
        }
    }
    if !backend_available(case.backend) {
        found.push(Error::BackendUnavailable {
            backend: case.backend,
        });
    }
    found
}

/// Decodes `data` as an arguments case and checks it; panics on a wrong verdict.
pub fn arguments(data: &[u8]) {
    check_arguments(&decode_arguments(data));
}

fn random_buffer(rng: &mut Rng, len: usize) -> Vec<f32> {
    (0..len)
        .map(|_| match rng.below(4) {
            0 => f32::from_bits(rng.next() as u32),
            _ => (rng.signed() * 50.0) as f32,
        })
        .collect()
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Calls the entry point of `case` and checks the verdict against [`violations`].
///
/// # Panics
///
/// When a valid call fails, an invalid call succeeds, the error is not one of the violated rules,
/// or a rejected call changed an output buffer.
pub fn check_arguments(case: &ArgCase) {
    let ce = config(
        case.classes,
        case.smoothing,
        case.ignore,
        case.reduction,
        case.backend,
    );
    let mut rng = Rng(case.seed);
    let logits = random_buffer(&mut rng, case.logits_len);
    let losses_before = random_buffer(&mut rng, case.losses_len);
    let grad_before = random_buffer(&mut rng, case.grad_len);
    let mut losses = losses_before.clone();
    let mut grad = grad_before.clone();
    let mut in_place = logits.clone();
    let result = match case.entry {
        Entry::Forward => ce.forward(&logits, &case.targets, &mut losses),
        Entry::ForwardBackward => {
            ce.forward_backward(&logits, &case.targets, &mut losses, &mut grad)
        }
        Entry::InPlace => ce.forward_backward_in_place(&mut in_place, &case.targets, &mut losses),
    };
    let broken = violations(case);
    match (&result, broken.is_empty()) {
        (Ok(_), true) => {
            for (row, &target) in case.targets.iter().enumerate() {
                assert!(
                    Some(target) != case.ignore || losses[row] == 0.0,
                    "ignored row {row} got loss {:e}\n{case:?}",
                    losses[row]
                );
            }
        }
        (Ok(value), false) => {
            panic!("accepted invalid arguments (returned {value:e}); broken rules: {broken:?}\n{case:?}")
        }
        (Err(e), true) => panic!("rejected valid arguments with {e:?}\n{case:?}"),
        (Err(e), false) => {
            assert!(
                broken.iter().any(|b| same_error(b, e)),
                "returned {e:?}, which is none of the broken rules {broken:?}\n{case:?}"
            );
            assert!(
                same_bits(&losses, &losses_before),
                "a rejected call ({e:?}) changed losses\n{case:?}"
            );
            assert!(
                same_bits(&grad, &grad_before),
                "a rejected call ({e:?}) changed grad\n{case:?}"
            );
            assert!(
                same_bits(&in_place, &logits),
                "a rejected call ({e:?}) changed the in-place logits\n{case:?}"
            );
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The options target
// ------------------------------------------------------------------------------------------------

/// The type the targets of an options case are passed as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// `Targets::U8`.
    U8,
    /// `Targets::U16`.
    U16,
    /// `Targets::U32`.
    U32,
    /// `Targets::I32`.
    I32,
    /// `Targets::I64`.
    I64,
    /// `Targets::Usize`.
    Usize,
    /// `Targets::Soft`: one probability row per logit row.
    Soft,
}

const TARGET_KINDS: [TargetKind; 7] = [
    TargetKind::U8,
    TargetKind::U16,
    TargetKind::U32,
    TargetKind::I32,
    TargetKind::I64,
    TargetKind::Usize,
    TargetKind::Soft,
];

impl TargetKind {
    /// The values this integer type holds (soft targets hold no class).
    fn range(self) -> (i128, i128) {
        match self {
            TargetKind::U8 => (0, i128::from(u8::MAX)),
            TargetKind::U16 => (0, i128::from(u16::MAX)),
            TargetKind::U32 => (0, i128::from(u32::MAX)),
            TargetKind::I32 => (i128::from(i32::MIN), i128::from(i32::MAX)),
            TargetKind::I64 => (i128::from(i64::MIN), i128::from(i64::MAX)),
            TargetKind::Usize => (0, usize::MAX as i128),
            TargetKind::Soft => (0, -1),
        }
    }

    fn holds(self, value: i128) -> bool {
        let (lo, hi) = self.range();
        (lo..=hi).contains(&value)
    }
}

/// How an options case sets its ignore index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignore {
    /// `ignore_index(u32)`.
    Unsigned(u32),
    /// `ignore_index_signed(i64)`.
    Signed(i64),
}

impl Ignore {
    fn value(self) -> i64 {
        match self {
            Ignore::Unsigned(v) => i64::from(v),
            Ignore::Signed(v) => v,
        }
    }
}

/// Which class-weight semantics an options case uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightMode {
    /// `class_weights` (PyTorch's `weight=`).
    PerClass,
    /// `target_weights` (Keras' `sample_weight` from the target's class).
    PerTarget,
}

/// The per-row slices of [`Extras`](smoothce::Extras).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extra {
    /// `Extras::lse`.
    Lse,
    /// `Extras::z_loss`.
    ZLoss,
    /// `Extras::correct`.
    Correct,
    /// `Extras::row_scales`.
    RowScales,
}

/// One decoded options case.
#[derive(Debug, Clone)]
pub struct OptCase {
    /// `K`.
    pub classes: usize,
    /// `N`.
    pub rows: usize,
    /// The smoothing convention and `eps`.
    pub smoothing: Smoothing,
    /// The reduction.
    pub reduction: Reduction,
    /// The backend asked for (one this CPU has).
    pub backend: Backend,
    /// The `*_with` function called first (the two gradient forms are both run and compared).
    pub entry: Entry,
    /// How the targets are passed.
    pub kind: TargetKind,
    /// Class targets, one per row (empty for soft targets); each fits `kind`.
    pub targets: Vec<i128>,
    /// Soft targets, `N * K`.
    pub soft: Option<Vec<f32>>,
    /// The ignore index, if set.
    pub ignore: Option<Ignore>,
    /// Class weights and their semantics.
    pub weights: Option<(Vec<f32>, WeightMode)>,
    /// `z_loss(lambda)`, if called.
    pub z_loss: Option<f32>,
    /// `softcap(c)`, if called.
    pub softcap: Option<f32>,
    /// `logit_scale(s)`, if called.
    pub logit_scale: Option<f32>,
    /// `class_mask(allowed)`, if called.
    pub mask: Option<Vec<bool>>,
    /// `upstream(g)`, if called.
    pub upstream: Option<f32>,
    /// `mean_denominator(d)`, if called.
    pub mean_denominator: Option<f32>,
    /// `Extras::row_scales`, if set.
    pub row_scales: Option<Vec<f32>>,
    /// Which of `Extras::lse`, `z_loss`, `correct` are asked for.
    pub wanted: [bool; 3],
    /// An extra slice given one element too many (a rejected call).
    pub long_extra: Option<Extra>,
    /// `N * K` logits.
    pub logits: Vec<f32>,
    /// Slice starts inside their buffers: logits, losses, grad, in-place logits, lse, z-loss,
    /// correct, soft targets, weights, mask, row scales.
    pub offsets: [usize; 11],
    /// How each row was generated (for messages).
    pub row_kinds: Vec<String>,
}

fn pick_option_classes(inp: &mut Input) -> usize {
    match inp.int(0_u8..=31) {
        0..=24 => inp.int(1..=70),
        25..=27 => inp.pick(&[
            1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 128, 129,
        ]),
        28 | 29 => inp.int(71..=600),
        30 => inp.int(601..=5000),
        // Around the accumulator block boundary.
        _ => 4096 + inp.int(0_usize..=34) - 17,
    }
}

/// A value no option accepts (or, for `-0.0`, a corner of the accepted range).
fn bad_value(inp: &mut Input) -> f32 {
    inp.pick(&[
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        -1.0,
        0.0,
        -0.0,
        -f32::MIN_POSITIVE,
    ])
}

/// `Some` with probability `1 / every`: a value from `common`, a seeded one in `[lo, hi)`, or
/// rarely a bad one.
fn pick_option(inp: &mut Input, every: u8, common: &[f32], lo: f32, hi: f32) -> Option<f32> {
    if !inp.chance(1, every) {
        return None;
    }
    Some(match inp.int(0_u8..=15) {
        0 => bad_value(inp),
        1..=10 => inp.pick(common),
        _ => lo + (hi - lo) * ((inp.u32() >> 8) as f32 / (1_u32 << 24) as f32),
    })
}

fn pick_option_target(inp: &mut Input, kind: TargetKind, classes: usize) -> i128 {
    let k = classes as i128;
    let (lo, hi) = kind.range();
    let value = match inp.int(0_u8..=127) {
        0..=31 => 0,
        32..=55 => k - 1,
        56..=125 => inp.int(0..=classes - 1) as i128,
        // Not a class (rejected unless it is the ignore index).
        126 => inp.pick(&[k, -1, -100, hi, lo, k + 1]),
        _ => inp.pick(&[i128::from(i64::MAX), i128::from(i32::MIN), 255, 256]),
    };
    value.clamp(lo, hi)
}

fn pick_mask(inp: &mut Input, rng: &mut Rng, classes: usize, targets: &[i128]) -> Vec<bool> {
    let k = classes;
    let mut mask = match inp.int(0_u8..=6) {
        0 => (0..k).map(|_| rng.below(5) != 0).collect(),
        1 => (0..k).map(|_| rng.below(5) == 0).collect(),
        2 => {
            let at = position(inp, rng, k, None);
            (0..k).map(|c| c == at).collect()
        }
        3 => vec![true; k],
        // Padded vocabulary: a prefix allowed.
        4 => {
            let keep = inp.int(1..=k);
            (0..k).map(|c| c < keep).collect()
        }
        // Stripes across the vector widths.
        5 => {
            let stride = inp.int(1_usize..=17);
            (0..k).map(|c| c % stride != 0).collect()
        }
        _ => (0..k).map(|_| rng.below(2) == 0).collect(),
    };
    // A disallowed target: its row's loss is +inf.
    if inp.chance(1, 4) {
        if let Some(&t) = targets.get(inp.int(0..=targets.len().saturating_sub(1))) {
            if let Some(slot) = usize::try_from(t).ok().and_then(|t| mask.get_mut(t)) {
                *slot = false;
            }
        }
    }
    if !mask.iter().any(|&a| a) && !inp.chance(1, 16) {
        let at = position(inp, rng, k, None);
        mask[at] = true;
    }
    if inp.chance(1, 32) {
        // Rejected: not one flag per class.
        if inp.chance(1, 2) {
            mask.push(true);
        } else {
            mask.pop();
        }
    }
    mask
}

fn pick_weights(inp: &mut Input, rng: &mut Rng, classes: usize, targets: &[i128]) -> Vec<f32> {
    let k = classes;
    let mut w: Vec<f32> = match inp.int(0_u8..=6) {
        0 => vec![1.0; k],
        1 | 2 => (0..k).map(|_| (4.0 * rng.unit()) as f32).collect(),
        3 => (0..k)
            .map(|_| {
                if rng.below(3) == 0 {
                    0.0
                } else {
                    (4.0 * rng.unit()) as f32
                }
            })
            .collect(),
        4 => vec![0.0; k],
        5 => (0..k).map(|_| rng.below(4) as f32).collect(),
        _ => {
            let top = inp.pick(&[1e-3, 10.0, 100.0]);
            (0..k).map(|_| (top * rng.unit()) as f32).collect()
        }
    };
    let patches = inp.int(0_u8..=4);
    for _ in 0..patches {
        let at = match inp.int(0_u8..=2) {
            0 => targets
                .get(inp.int(0..=targets.len().saturating_sub(1)))
                .and_then(|&t| usize::try_from(t).ok())
                .unwrap_or(0),
            _ => inp.int(0..=k - 1),
        }
        .min(k - 1);
        w[at] = match inp.int(0_u8..=15) {
            0 => bad_value(inp),
            _ => inp.pick(&[0.0, 0.0, 1.0, 1e-6, 1e-3, 0.5, 3.0, 100.0, 1000.0]),
        };
    }
    if inp.chance(1, 32) {
        // Rejected: not one weight per class.
        if inp.chance(1, 2) {
            w.push(1.0);
        } else {
            w.pop();
        }
    }
    w
}

/// Soft targets for one row: a distribution (one-hot, uniform, dense, sparse, a pair, peaked),
/// sometimes kept off the row's masked classes, sometimes not normalised.
fn soft_row(
    inp: &mut Input,
    rng: &mut Rng,
    z: &[f32],
    mask: Option<&[bool]>,
    out: &mut [f32],
) -> String {
    let k = out.len();
    out.fill(0.0);
    let mut normalise = true;
    let mut label = match inp.int(0_u8..=7) {
        0 => {
            let at = position(inp, rng, k, None);
            out[at] = 1.0;
            format!("one-hot at {at}")
        }
        1 => {
            out.fill(1.0);
            "uniform".to_owned()
        }
        2 | 3 => {
            for v in out.iter_mut() {
                *v = rng.unit() as f32;
            }
            "dense".to_owned()
        }
        4 => {
            let m = inp.int(1_u8..=4);
            for _ in 0..m {
                let at = position(inp, rng, k, None);
                out[at] += (rng.unit() + 1e-3) as f32;
            }
            format!("sparse({m})")
        }
        5 => {
            let a = position(inp, rng, k, None);
            let b = position(inp, rng, k, None);
            let p = inp.pick(&[0.5, 0.9, 0.99, 1e-3, 0.3, 1e-7]);
            out[a] += p;
            out[b] += 1.0 - p;
            format!("pair({a}: {p:e}, {b})")
        }
        6 => {
            for v in out.iter_mut() {
                *v = rng.unit() as f32;
            }
            normalise = false;
            let total = inp.pick(&[0.0, 0.5, 1.5, 2.0]);
            let sum: f64 = out.iter().map(|&v| f64::from(v)).sum();
            for v in out.iter_mut() {
                *v = (f64::from(*v) * total / sum.max(f64::MIN_POSITIVE)) as f32;
            }
            format!("unnormalised(sum {total})")
        }
        _ => {
            let at = position(inp, rng, k, None);
            for v in out.iter_mut() {
                *v = (1e-3 * rng.unit()) as f32;
            }
            out[at] = 1.0;
            format!("peaked at {at}")
        }
    };
    if inp.chance(1, 2) {
        // Keep the mass off the masked classes (else the loss is +inf).
        label.push_str(", off masked classes");
        for (c, v) in out.iter_mut().enumerate() {
            let masked = mask.is_some_and(|m| !m.get(c).copied().unwrap_or(false))
                || z[c] == f32::NEG_INFINITY;
            if masked {
                *v = 0.0;
            }
        }
    }
    if normalise {
        let sum: f64 = out.iter().map(|&v| f64::from(v)).sum();
        if sum > 0.0 {
            for v in out.iter_mut() {
                *v = (f64::from(*v) / sum) as f32;
            }
        }
    }
    label
}

/// Decodes an options case from fuzzer bytes.
#[must_use]
pub fn decode_options(data: &[u8]) -> OptCase {
    let mut inp = Input::new(data);
    let classes = pick_option_classes(&mut inp);
    let rows = inp.int(1_usize..=6);
    let kind = inp.pick(&TARGET_KINDS);
    let soft = kind == TargetKind::Soft;
    // Soft targets take no ignore index: setting one is (rarely) tried, and rejected.
    let ignore = if soft && !inp.chance(1, 16) {
        None
    } else {
        match inp.int(0_u8..=7) {
            0..=3 => None,
            4 => Some(Ignore::Signed(-100)),
            5 => Some(Ignore::Unsigned(inp.pick(&[
                0,
                u32::try_from(classes - 1).unwrap_or(u32::MAX),
                u32::MAX,
                255,
            ]))),
            6 => Some(Ignore::Signed(inp.int(0..=classes as i64 - 1))),
            _ => Some(Ignore::Signed(inp.pick(&[
                -1,
                classes as i64,
                i64::MAX,
                i64::MIN,
                i64::from(i32::MIN),
            ]))),
        }
    };
    let mut targets = Vec::new();
    if !soft {
        for _ in 0..rows {
            let ignored = ignore
                .map(|i| i128::from(i.value()))
                .filter(|&v| kind.holds(v) && inp.chance(1, 4));
            targets.push(match ignored {
                Some(v) => v,
                None => pick_option_target(&mut inp, kind, classes),
            });
        }
    }
    let mut smoothing_kind = inp.arb(SmoothingKind::Uniform);
    let eps = if inp.chance(1, 32) {
        inp.pick(&[f32::NAN, -0.5, 1.5, f32::INFINITY])
    } else {
        pick_eps(&mut inp)
    };
    // Off-target smoothing needs two classes and hard targets: rarely tried anyway.
    if smoothing_kind == SmoothingKind::OffTarget && (soft || classes < 2) && !inp.chance(1, 16) {
        smoothing_kind = SmoothingKind::Uniform;
    }
    let reduction = inp.pick(&REDUCTIONS);
    let backends: Vec<Backend> = Backend::ALL
        .into_iter()
        .filter(|&b| backend_available(b))
        .collect();
    let backend = inp.pick(&backends);
    let entry = inp.arb(Entry::Forward);
    let mut rng = Rng(inp.u64());
    let weights = if inp.chance(1, if soft { 16 } else { 3 }) {
        let mode = if inp.chance(1, 2) {
            WeightMode::PerClass
        } else {
            WeightMode::PerTarget
        };
        Some((pick_weights(&mut inp, &mut rng, classes, &targets), mode))
    } else {
        None
    };
    let z_loss = pick_option(&mut inp, 3, &[1e-4, 1e-3, 1e-2, 0.1, 1.0, 0.0], 0.0, 0.1);
    let softcap = pick_option(
        &mut inp,
        4,
        &[1.0, 5.0, 15.0, 30.0, 50.0, 0.01, 1000.0],
        0.5,
        100.0,
    );
    let logit_scale = pick_option(
        &mut inp,
        4,
        &[0.5, 2.0, 0.1, 4.0, 1e-3, 30.0, 1.0],
        0.05,
        8.0,
    );
    let mask = if inp.chance(1, 4) {
        Some(pick_mask(&mut inp, &mut rng, classes, &targets))
    } else {
        None
    };
    let upstream = pick_option(
        &mut inp,
        4,
        &[0.0, -1.0, 0.5, 2.0, -0.0, 1e3, 1e-3],
        -4.0,
        4.0,
    );
    let mean_denominator = pick_option(
        &mut inp,
        4,
        &[1.0, 0.5, 3.0, 100.0, 1e-3, 1e4],
        0.01,
        1000.0,
    );
    let every = if reduction == Reduction::None { 3 } else { 32 };
    let row_scales = inp.chance(1, every).then(|| {
        (0..rows)
            .map(|_| match inp.int(0_u8..=31) {
                0 => bad_value(&mut inp),
                1..=15 => inp.pick(&[1.0, 0.0, -1.0, 2.0, -0.0, 1e3, 0.5]),
                _ => (3.0 * rng.signed()) as f32,
            })
            .collect::<Vec<f32>>()
    });
    let wanted = [inp.chance(1, 2), inp.chance(1, 2), inp.chance(1, 2)];
    let long_extra = inp
        .chance(1, 32)
        .then(|| inp.pick(&[Extra::Lse, Extra::ZLoss, Extra::Correct, Extra::RowScales]));
    let mut offsets = [0; 11];
    for o in &mut offsets {
        *o = inp.int(0..=15);
    }
    let mut logits = vec![0.0_f32; rows * classes];
    let mut soft_targets = soft.then(|| vec![0.0_f32; rows * classes]);
    let mut row_kinds = Vec::with_capacity(rows);
    for (i, row) in logits.chunks_exact_mut(classes).enumerate() {
        let class = targets
            .get(i)
            .and_then(|&t| usize::try_from(t).ok())
            .filter(|&t| t < classes);
        let mut label = generate_row(&mut inp, &mut rng, row, class);
        if let Some(s) = soft_targets.as_mut() {
            let out = &mut s[i * classes..(i + 1) * classes];
            let soft_label = soft_row(&mut inp, &mut rng, row, mask.as_deref(), out);
            let _ = write!(label, "; soft targets {soft_label}");
        }
        row_kinds.push(label);
    }
    OptCase {
        classes,
        rows,
        smoothing: smoothing(smoothing_kind, eps),
        reduction,
        backend,
        entry,
        kind,
        targets,
        soft: soft_targets,
        ignore,
        weights,
        z_loss,
        softcap,
        logit_scale,
        mask,
        upstream,
        mean_denominator,
        row_scales,
        wanted,
        long_extra,
        logits,
        offsets,
        row_kinds,
    }
}

/// A slice at an offset inside a larger buffer whose other elements are guards.
struct Fenced<T> {
    buf: Vec<T>,
    start: usize,
    len: usize,
    guard: T,
}

/// Bitwise equality (NaN payloads included).
trait Same: Copy {
    fn same(self, other: Self) -> bool;
}

impl Same for f32 {
    fn same(self, other: Self) -> bool {
        self.to_bits() == other.to_bits()
    }
}

impl Same for bool {
    fn same(self, other: Self) -> bool {
        self == other
    }
}

impl<T: Same> Fenced<T> {
    fn new(start: usize, contents: &[T], guard: T) -> Self {
        let len = contents.len();
        let mut buf = vec![guard; start + len + PAD];
        buf[start..start + len].copy_from_slice(contents);
        Fenced {
            buf,
            start,
            len,
            guard,
        }
    }

    fn filled(start: usize, len: usize, value: T, guard: T) -> Self {
        Fenced::new(start, &vec![value; len], guard)
    }

    fn get(&self) -> &[T] {
        &self.buf[self.start..self.start + self.len]
    }

    fn get_mut(&mut self) -> &mut [T] {
        &mut self.buf[self.start..self.start + self.len]
    }

    fn guards_intact(&self) -> bool {
        self.buf[..self.start]
            .iter()
            .chain(&self.buf[self.start + self.len..])
            .all(|x| x.same(self.guard))
    }

    fn all(&self, value: T) -> bool {
        self.get().iter().all(|x| x.same(value))
    }
}

fn fenced_f32(start: usize, contents: &[f32]) -> Fenced<f32> {
    Fenced::new(start, contents, f32::from_bits(GUARD))
}

/// The class targets in the case's integer type.
enum Typed {
    U8(Vec<u8>),
    U16(Vec<u16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    Usize(Vec<usize>),
    Soft,
}

/// The inputs of an options case besides the logits, in fenced buffers at the case's offsets.
struct OptInputs {
    typed: Typed,
    soft: Option<Fenced<f32>>,
    weights: Option<Fenced<f32>>,
    mask: Option<Fenced<bool>>,
    row_scales: Option<Fenced<f32>>,
}

impl OptInputs {
    fn new(case: &OptCase) -> Self {
        fn cast<T: TryFrom<i128>>(t: &[i128]) -> Vec<T> {
            t.iter()
                .map(|&v| {
                    let Ok(x) = T::try_from(v) else {
                        panic!("target {v} does not fit its type");
                    };
                    x
                })
                .collect()
        }
        let t = &case.targets;
        let typed = match case.kind {
            TargetKind::U8 => Typed::U8(cast(t)),
            TargetKind::U16 => Typed::U16(cast(t)),
            TargetKind::U32 => Typed::U32(cast(t)),
            TargetKind::I32 => Typed::I32(cast(t)),
            TargetKind::I64 => Typed::I64(cast(t)),
            TargetKind::Usize => Typed::Usize(cast(t)),
            TargetKind::Soft => Typed::Soft,
        };
        let o = case.offsets;
        let mut row_scales = case.row_scales.clone();
        if case.long_extra == Some(Extra::RowScales) {
            row_scales
                .get_or_insert_with(|| vec![1.0; case.rows])
                .push(1.0);
        }
        OptInputs {
            typed,
            soft: case.soft.as_deref().map(|s| fenced_f32(o[7], s)),
            weights: case.weights.as_ref().map(|(w, _)| fenced_f32(o[8], w)),
            mask: case.mask.as_deref().map(|m| Fenced::new(o[9], m, true)),
            row_scales: row_scales.as_deref().map(|r| fenced_f32(o[10], r)),
        }
    }

    fn targets(&self) -> Targets<'_> {
        match &self.typed {
            Typed::U8(t) => Targets::U8(t),
            Typed::U16(t) => Targets::U16(t),
            Typed::U32(t) => Targets::U32(t),
            Typed::I32(t) => Targets::I32(t),
            Typed::I64(t) => Targets::I64(t),
            Typed::Usize(t) => Targets::Usize(t),
            Typed::Soft => Targets::Soft(self.soft.as_ref().map_or(&[][..], Fenced::get)),
        }
    }

    fn row_scales(&self) -> Option<&[f32]> {
        self.row_scales.as_ref().map(Fenced::get)
    }

    fn guards_intact(&self) -> bool {
        self.soft.as_ref().is_none_or(Fenced::guards_intact)
            && self.weights.as_ref().is_none_or(Fenced::guards_intact)
            && self.mask.as_ref().is_none_or(Fenced::guards_intact)
            && self.row_scales.as_ref().is_none_or(Fenced::guards_intact)
    }
}

/// What a `*_with` call wrote. Loss, lse and z-loss slots are pre-filled with
/// [`LOSS_SENTINEL`], gradient slots with [`GRAD_SENTINEL`], `correct` with `true`.
struct OptOutcome {
    result: Result<Summary, Error>,
    losses: Fenced<f32>,
    /// The gradient (the overwritten logits for the in-place call); `None` for `forward_with`.
    grad: Option<Fenced<f32>>,
    /// The logits read by `forward_with` and `forward_backward_with`.
    logits: Option<Fenced<f32>>,
    lse: Option<Fenced<f32>>,
    z_loss: Option<Fenced<f32>>,
    correct: Option<Fenced<bool>>,
}

impl OptOutcome {
    fn fences(&self) -> [(&'static str, bool); 6] {
        let ok = |f: Option<&Fenced<f32>>| f.is_none_or(Fenced::guards_intact);
        [
            ("losses", self.losses.guards_intact()),
            ("gradient", ok(self.grad.as_ref())),
            ("logits", ok(self.logits.as_ref())),
            ("lse", ok(self.lse.as_ref())),
            ("z_loss", ok(self.z_loss.as_ref())),
            (
                "correct",
                self.correct.as_ref().is_none_or(Fenced::guards_intact),
            ),
        ]
    }
}

fn run_options(
    case: &OptCase,
    inputs: &OptInputs,
    ce: &CrossEntropy<'_>,
    entry: Entry,
) -> OptOutcome {
    let o = case.offsets;
    let n = case.rows;
    let len = |extra: Extra| n + usize::from(case.long_extra == Some(extra));
    let guard = f32::from_bits(GUARD);
    let mut losses = Fenced::filled(o[1], n, LOSS_SENTINEL, guard);
    let [want_lse, want_z, want_correct] = case.wanted;
    let mut lse = (want_lse || case.long_extra == Some(Extra::Lse))
        .then(|| Fenced::filled(o[4], len(Extra::Lse), LOSS_SENTINEL, guard));
    let mut z_loss = (want_z || case.long_extra == Some(Extra::ZLoss))
        .then(|| Fenced::filled(o[5], len(Extra::ZLoss), LOSS_SENTINEL, guard));
    let mut correct = (want_correct || case.long_extra == Some(Extra::Correct))
        .then(|| Fenced::filled(o[6], len(Extra::Correct), true, true));
    let targets = inputs.targets();
    let extras = Extras {
        lse: lse.as_mut().map(Fenced::get_mut),
        z_loss: z_loss.as_mut().map(Fenced::get_mut),
        correct: correct.as_mut().map(Fenced::get_mut),
        row_scales: inputs.row_scales(),
    };
    let (result, grad, logits) = match entry {
        Entry::Forward => {
            let logits = fenced_f32(o[0], &case.logits);
            let r = ce.forward_with(logits.get(), targets, losses.get_mut(), extras);
            (r, None, Some(logits))
        }
        Entry::ForwardBackward => {
            let logits = fenced_f32(o[0], &case.logits);
            let mut grad = Fenced::filled(o[2], case.logits.len(), GRAD_SENTINEL, guard);
            let r = ce.forward_backward_with(
                logits.get(),
                targets,
                losses.get_mut(),
                grad.get_mut(),
                extras,
            );
            (r, Some(grad), Some(logits))
        }
        Entry::InPlace => {
            let mut buf = fenced_f32(o[3], &case.logits);
            let r =
                ce.forward_backward_in_place_with(buf.get_mut(), targets, losses.get_mut(), extras);
            (r, Some(buf), None)
        }
    };
    OptOutcome {
        result,
        losses,
        grad,
        logits,
        lse,
        z_loss,
        correct,
    }
}

/// `Error` equality, f32 payloads compared by bits (NaN included).
fn same_error_bits(a: &Error, b: &Error) -> bool {
    match (a, b) {
        (
            Error::InvalidOption {
                option: p,
                value: x,
            },
            Error::InvalidOption {
                option: q,
                value: y,
            },
        ) => p == q && x.to_bits() == y.to_bits(),
        (
            Error::InvalidWeight { class: p, value: x },
            Error::InvalidWeight { class: q, value: y },
        )
        | (
            Error::InvalidRowScale { row: p, value: x },
            Error::InvalidRowScale { row: q, value: y },
        ) => p == q && x.to_bits() == y.to_bits(),
        _ => same_error(a, b),
    }
}

/// Every documented rule an options case breaks, each as the error that reports it (an
/// `Unsupported` with `what: "*"` stands for any combination the crate does not define). Read
/// from the documentation of [`CrossEntropy`]'s builders and `*_with` calls and of [`Error`].
#[must_use]
pub fn option_violations(case: &OptCase) -> Vec<Error> {
    let k = case.classes;
    let n = case.rows;
    let soft = case.kind == TargetKind::Soft;
    let unsupported = Error::Unsupported { what: "*" };
    let mut found = Vec::new();
    let eps = case.smoothing.eps();
    if eps.is_nan() || !(0.0..=1.0).contains(&eps) {
        found.push(Error::InvalidSmoothing { eps });
    }
    if matches!(case.smoothing, Smoothing::OffTarget(_)) {
        if k < 2 {
            found.push(Error::OffTargetNeedsTwoClasses { classes: k });
        }
        if soft {
            found.push(unsupported);
        }
    }
    if let Some((w, _)) = &case.weights {
        if soft {
            found.push(unsupported);
        }
        if w.len() != k {
            found.push(Error::WeightsLength {
                expected: k,
                actual: w.len(),
            });
        }
        for (class, &value) in w.iter().enumerate() {
            if !(value.is_finite() && value >= 0.0) {
                found.push(Error::InvalidWeight { class, value });
            }
        }
    }
    if soft && case.ignore.is_some() {
        found.push(unsupported);
    }
    let positive = |v: f32| v.is_finite() && v > 0.0;
    let options = [
        (
            "z_loss",
            case.z_loss,
            case.z_loss.is_none_or(|v| v.is_finite() && v >= 0.0),
        ),
        ("softcap", case.softcap, case.softcap.is_none_or(positive)),
        (
            "logit_scale",
            case.logit_scale,
            case.logit_scale.is_none_or(positive),
        ),
        (
            "upstream",
            case.upstream,
            case.upstream.is_none_or(f32::is_finite),
        ),
        (
            "mean_denominator",
            case.mean_denominator,
            case.mean_denominator.is_none_or(positive),
        ),
    ];
    for (option, value, ok) in options {
        if let (false, Some(value)) = (ok, value) {
            found.push(Error::InvalidOption { option, value });
        }
    }
    if let Some(mask) = &case.mask {
        if mask.len() != k {
            found.push(Error::MaskLength {
                expected: k,
                actual: mask.len(),
            });
        }
        if !mask.iter().any(|&a| a) {
            found.push(Error::MaskAllowsNoClass);
        }
    }
    if let Some(extra) = case.long_extra {
        let name = match extra {
            Extra::Lse => "lse",
            Extra::ZLoss => "z_loss",
            Extra::Correct => "correct",
            Extra::RowScales => "row_scales",
        };
        found.push(Error::ExtrasLength {
            extra: name,
            expected: n,
            actual: n + 1,
        });
    }
    if case.row_scales.is_some() || case.long_extra == Some(Extra::RowScales) {
        if case.reduction != Reduction::None {
            found.push(unsupported);
        }
        for (row, &value) in case.row_scales.iter().flatten().enumerate() {
            if !value.is_finite() {
                found.push(Error::InvalidRowScale { row, value });
            }
        }
    }
    for (row, &t) in case.targets.iter().enumerate() {
        // The crate reads targets as i64 (usize beyond i64::MAX saturates).
        let target = i64::try_from(t).unwrap_or(i64::MAX);
        let ignored = case.ignore.is_some_and(|i| i.value() == target);
        if !ignored && !(0..k as i128).contains(&t) {
            found.push(Error::TargetOutOfRange {
                row,
                target,
                classes: k,
            });
        }
    }
    if !backend_available(case.backend) {
        found.push(Error::BackendUnavailable {
            backend: case.backend,
        });
    }
    found
}

fn violation_matches(rule: &Error, got: &Error) -> bool {
    match (rule, got) {
        (Error::Unsupported { what: "*" }, Error::Unsupported { .. }) => true,
        _ => same_error_bits(rule, got),
    }
}

/// `got` (a kernel output) against `want` (the reference's output rounded to f32), within the
/// absolute `bound` plus one f32 rounding. NaN agrees only with NaN; an infinity with the same
/// infinity, or with a finite value that lies within `bound` of rounding to it.
fn close(got: f32, want: f32, bound: f64) -> bool {
    if got.is_nan() || want.is_nan() {
        return got.is_nan() && want.is_nan();
    }
    let (g, w) = (f64::from(got), f64::from(want));
    if got.is_infinite() || want.is_infinite() {
        if got == want {
            return true;
        }
        let (finite, infinite) = if got.is_infinite() { (w, g) } else { (g, w) };
        return !finite.is_infinite()
            && finite.signum() == infinite.signum()
            && ((finite.abs() + bound) as f32).is_infinite();
    }
    (g - w).abs() <= bound + ulp(w)
}

/// [`close`] with a relative tolerance: `rel` times `max(|want|, 1)` (times `|got|` where `want`
/// rounded to infinity).
fn close_rel(got: f32, want: f32, rel: f64) -> bool {
    let size = if want.is_finite() { want } else { got };
    let size = if size.is_finite() {
        f64::from(size).abs().max(1.0)
    } else {
        1.0
    };
    close(got, want, rel * size)
}

impl OptCase {
    fn config<'a>(&self, inputs: &'a OptInputs) -> CrossEntropy<'a> {
        let mut ce = CrossEntropy::new(self.classes)
            .smoothing(self.smoothing)
            .reduction(self.reduction)
            .backend(self.backend);
        ce = match self.ignore {
            Some(Ignore::Unsigned(i)) => ce.ignore_index(i),
            Some(Ignore::Signed(i)) => ce.ignore_index_signed(i),
            None => ce,
        };
        if let (Some((_, mode)), Some(w)) = (&self.weights, &inputs.weights) {
            ce = match mode {
                WeightMode::PerClass => ce.class_weights(w.get()),
                WeightMode::PerTarget => ce.target_weights(w.get()),
            };
        }
        if let Some(v) = self.z_loss {
            ce = ce.z_loss(v);
        }
        if let Some(v) = self.softcap {
            ce = ce.softcap(v);
        }
        if let Some(v) = self.logit_scale {
            ce = ce.logit_scale(v);
        }
        if let Some(m) = &inputs.mask {
            ce = ce.class_mask(m.get());
        }
        if let Some(v) = self.upstream {
            ce = ce.upstream(v);
        }
        if let Some(v) = self.mean_denominator {
            ce = ce.mean_denominator(v);
        }
        ce
    }

    fn row(&self, i: usize) -> &[f32] {
        &self.logits[i * self.classes..(i + 1) * self.classes]
    }

    /// Row `i`'s class target as the crate reads it (`None` for soft targets).
    fn class(&self, i: usize) -> Option<i64> {
        self.targets
            .get(i)
            .map(|&t| i64::try_from(t).unwrap_or(i64::MAX))
    }

    fn is_ignored(&self, i: usize) -> bool {
        match (self.class(i), self.ignore) {
            (Some(t), Some(ignore)) => t == ignore.value(),
            _ => false,
        }
    }

    fn allows(&self, c: usize) -> bool {
        self.mask
            .as_ref()
            .is_none_or(|m| m.get(c).copied().unwrap_or(false))
    }

    /// A bound on the size of row `i`'s target weights relative to an unweighted row: the
    /// largest class weight, the target's weight, or the soft targets' total (at least 1).
    fn weight_factor(&self, i: usize) -> f64 {
        let target_weight = match &self.weights {
            Some((w, WeightMode::PerClass)) => w.iter().fold(0.0_f64, |m, &v| m.max(f64::from(v))),
            Some((w, WeightMode::PerTarget)) => self
                .class(i)
                .and_then(|t| usize::try_from(t).ok())
                .and_then(|t| w.get(t))
                .map_or(0.0, |&v| f64::from(v)),
            None => 0.0,
        };
        let soft_total = self.soft.as_ref().map_or(0.0, |s| {
            s[i * self.classes..(i + 1) * self.classes]
                .iter()
                .map(|&v| f64::from(v))
                .sum()
        });
        target_weight.max(soft_total).max(1.0)
    }

    /// A bounded description of the case and of row `row` (if any), for failure messages.
    #[must_use]
    pub fn describe(&self, row: Option<usize>, class: Option<usize>) -> String {
        let mut s = format!(
            "K = {}, N = {}, {:?}, {:?}, {:?}, entry {:?}, targets {:?} {:?}, ignore {:?}",
            self.classes,
            self.rows,
            self.smoothing,
            self.reduction,
            self.backend,
            self.entry,
            self.kind,
            self.targets,
            self.ignore,
        );
        if let Some((w, mode)) = &self.weights {
            let zeros = w.iter().filter(|&&v| v == 0.0).count();
            let max = w.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let _ = write!(
                s,
                "\n {mode:?} weights: {} values, {zeros} zero, max {max:e}, first {:?}",
                w.len(),
                &w[..w.len().min(8)]
            );
            let at_targets: Vec<Option<f32>> = (0..self.rows)
                .map(|i| {
                    self.class(i)
                        .and_then(|t| usize::try_from(t).ok())
                        .and_then(|t| w.get(t).copied())
                })
                .collect();
            let _ = write!(s, ", at the targets {at_targets:?}");
        }
        let _ = write!(
            s,
            "\n z_loss {:?}, softcap {:?}, logit_scale {:?}, upstream {:?}, mean_denominator {:?}, \
             row_scales {:?}",
            self.z_loss,
            self.softcap,
            self.logit_scale,
            self.upstream,
            self.mean_denominator,
            self.row_scales
        );
        if let Some(m) = &self.mask {
            let allowed: Vec<usize> = (0..m.len()).filter(|&c| m[c]).take(16).collect();
            let _ = write!(
                s,
                "\n class mask: {} flags, {} allowed, first allowed {allowed:?}",
                m.len(),
                m.iter().filter(|&&a| a).count()
            );
        }
        let _ = write!(
            s,
            "\n extras lse/z_loss/correct {:?}, long extra {:?}, offsets {:?}",
            self.wanted, self.long_extra, self.offsets
        );
        if let Some(i) = row {
            let z = self.row(i);
            let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let min = z.iter().copied().fold(f32::INFINITY, f32::min);
            let masked = z.iter().filter(|&&x| x == f32::NEG_INFINITY).count();
            let nan = z.iter().filter(|x| x.is_nan()).count();
            let pinf = z.iter().filter(|&&x| x == f32::INFINITY).count();
            let _ = write!(
                s,
                "\n row {i}: {}, max {max:e}, min {min:e}, {masked} -inf, {nan} NaN, {pinf} +inf",
                self.row_kinds[i],
            );
            if let Some(t) = self.class(i) {
                let _ = write!(s, ", target {t}");
                if let Some(&zt) = usize::try_from(t).ok().and_then(|t| z.get(t)) {
                    let _ = write!(s, ", target logit {zt:e}");
                }
            }
            let around = class.unwrap_or(0);
            let lo = around.saturating_sub(4);
            let hi = (around + 5).min(z.len());
            let _ = write!(s, "\n logits[{lo}..{hi}] = {:?}", &z[lo..hi]);
            if let Some(soft) = &self.soft {
                let t = &soft[i * self.classes..(i + 1) * self.classes];
                let _ = write!(s, "\n soft[{lo}..{hi}] = {:?}", &t[lo..hi]);
            }
        }
        s
    }
}

/// Decodes `data` as an options case and checks it; panics with a description on mismatch.
pub fn options(data: &[u8]) {
    check_options(&decode_options(data));
}

/// The call must have failed with `want` and written nothing.
fn check_options_rejected(case: &OptCase, out: &OptOutcome, want: &Error) {
    let ctx = || case.describe(None, None);
    match &out.result {
        Err(e) if same_error_bits(e, want) => {}
        other => panic!("expected Err({want:?}), got {other:?}\n{}", ctx()),
    }
    let untouched = [
        ("losses", out.losses.all(LOSS_SENTINEL)),
        ("lse", out.lse.as_ref().is_none_or(|f| f.all(LOSS_SENTINEL))),
        (
            "z_loss",
            out.z_loss.as_ref().is_none_or(|f| f.all(LOSS_SENTINEL)),
        ),
        ("correct", out.correct.as_ref().is_none_or(|f| f.all(true))),
        (
            "gradient",
            out.grad.as_ref().is_none_or(|g| match case.entry {
                Entry::InPlace => same_bits(g.get(), &case.logits),
                _ => g.all(GRAD_SENTINEL),
            }),
        ),
    ];
    for (what, ok) in untouched {
        assert!(
            ok,
            "{what} written by a call rejected with {want:?}\n{}",
            ctx()
        );
    }
}

/// Runs `case` on the kernel and compares with the reference; panics on any mismatch.
///
/// # Panics
///
/// When the verdict (`Ok` or which `Err`) differs from the reference's or from the documented
/// rules, a rejected call wrote something, an output disagrees with the reference beyond the
/// tolerances of `tests/options.rs`, the NaN, masking or ignore rules are broken, a write lands
/// outside its slice, or the in-place and out-of-place calls differ in a single bit.
pub fn check_options(case: &OptCase) {
    let inputs = OptInputs::new(case);
    let ce = case.config(&inputs);
    let n = case.rows;
    let k = case.classes;
    let ctx = |row: Option<usize>, class: Option<usize>| case.describe(row, class);

    // The reference's verdict on the very same shapes.
    let len = |extra: Extra| n + usize::from(case.long_extra == Some(extra));
    let [wants_lse, wants_z, wants_correct] = case.wanted;
    let mut v_losses = vec![0.0_f32; n];
    let mut v_lse = vec![0.0_f32; len(Extra::Lse)];
    let mut v_z = vec![0.0_f32; len(Extra::ZLoss)];
    let mut v_correct = vec![false; len(Extra::Correct)];
    let verdict = reference::forward_with(
        &ce,
        &case.logits,
        inputs.targets(),
        &mut v_losses,
        Extras {
            lse: (wants_lse || case.long_extra == Some(Extra::Lse)).then_some(&mut v_lse[..]),
            z_loss: (wants_z || case.long_extra == Some(Extra::ZLoss)).then_some(&mut v_z[..]),
            correct: (wants_correct || case.long_extra == Some(Extra::Correct))
                .then_some(&mut v_correct[..]),
            row_scales: inputs.row_scales(),
        },
    );
    let got = run_options(case, &inputs, &ce, case.entry);
    for (what, intact) in got.fences() {
        assert!(
            intact,
            "a write outside the {what} slice\n{}",
            ctx(None, None)
        );
    }
    assert!(
        inputs.guards_intact(),
        "an input buffer's guards changed\n{}",
        ctx(None, None)
    );

    // The verdict against the documented rules, then against the reference.
    let broken = option_violations(case);
    match (&got.result, broken.is_empty()) {
        (Ok(_), false) => panic!(
            "accepted a call that breaks {broken:?}\n{}",
            ctx(None, None)
        ),
        (Err(e), true) => panic!("rejected a valid call with {e:?}\n{}", ctx(None, None)),
        (Err(e), false) => assert!(
            broken.iter().any(|b| violation_matches(b, e)),
            "returned {e:?}, which is none of the broken rules {broken:?}\n{}",
            ctx(None, None)
        ),
        (Ok(_), true) => {}
    }
    // `Summary::correct` depends on which extras are given: compared with this call's.
    let verdict_correct = verdict.as_ref().map_or(0, |v| v.correct);
    let expected_err = expected_error(&verdict, case.backend);
    if let Some(e) = expected_err {
        check_options_rejected(case, &got, &e);
        return;
    }
    let summary = match got.result {
        Ok(s) => s,
        Err(e) => panic!(
            "kernel returned {e:?} where the reference succeeded\n{}",
            ctx(None, None)
        ),
    };

    // Every output of the reference.
    let mut want_losses = vec![0.0_f32; n];
    let mut want_grad = vec![0.0_f32; n * k];
    let mut want_lse = vec![0.0_f32; n];
    let mut want_z = vec![0.0_f32; n];
    let mut want_correct = vec![false; n];
    let want = reference::forward_backward_with(
        &ce,
        &case.logits,
        inputs.targets(),
        &mut want_losses,
        &mut want_grad,
        Extras {
            lse: Some(&mut want_lse),
            z_loss: Some(&mut want_z),
            correct: Some(&mut want_correct),
            row_scales: inputs.row_scales(),
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "the reference rejected with {e:?} what it accepted\n{}",
            ctx(None, None)
        )
    });

    // The count, the denominator and the gradient scale, from the documented rules.
    let counted = (0..n).filter(|&i| !case.is_ignored(i)).count();
    let natural = match &case.weights {
        Some((w, WeightMode::PerClass)) => (0..n)
            .filter(|&i| !case.is_ignored(i))
            .filter_map(|i| case.class(i).and_then(|t| usize::try_from(t).ok()))
            .map(|t| f64::from(w[t]))
            .sum(),
        _ => counted as f64,
    };
    let denominator = match case.reduction {
        Reduction::Mean => case.mean_denominator.map_or(natural, f64::from),
        Reduction::Sum | Reduction::None => 1.0,
    };
    assert!(
        summary.rows == counted && want.rows == counted,
        "rows {} (reference {}), {counted} not ignored\n{}",
        summary.rows,
        want.rows,
        ctx(None, None)
    );
    assert!(
        summary.denominator == denominator && want.denominator == denominator,
        "denominator {:e} (reference {:e}), documented {denominator:e}\n{}",
        summary.denominator,
        want.denominator,
        ctx(None, None)
    );
    let upstream = f64::from(case.upstream.unwrap_or(1.0));
    let grad_scale = if denominator > 0.0 {
        (upstream / denominator).abs()
    } else {
        0.0
    };

    // Tolerances of tests/options.rs: the crate's, widened by a few ulp of the cap for
    // soft-capped logits (rounded to f32 after capping); the gradient's times its scale, the
    // weights, the z-loss's `2 lambda lse` and the logit scale's chain factor.
    let cap_extra = case
        .softcap
        .map_or(0.0, |c| 8.0 * f64::from(c) * f64::from(f32::EPSILON));
    let loss_tol = LOSS_TOLERANCE + cap_extra;
    let grad_tol = GRAD_TOLERANCE + cap_extra;
    let lambda = f64::from(case.z_loss.unwrap_or(0.0));
    let logit_scale = f64::from(case.logit_scale.unwrap_or(1.0));
    // Non-finite row values are compared exactly: they add nothing to the summary's bound.
    let magnitude = |x: f32| {
        if x.is_finite() {
            f64::from(x).abs().max(1.0)
        } else {
            0.0
        }
    };

    let losses = got.losses.get();
    let grad = got.grad.as_ref().map(Fenced::get);
    let lse = got.lse.as_ref().map(Fenced::get);
    let z = got.z_loss.as_ref().map(Fenced::get);
    let correct = got.correct.as_ref().map(Fenced::get);
    let (mut loss_bound, mut z_bound) = (0.0_f64, 0.0_f64);
    let mut beyond_f32_rel = 0.0_f64;

    for i in 0..n {
        let row_grad = grad.map(|g| &g[i * k..(i + 1) * k]);
        if case.is_ignored(i) {
            let zero_extras = lse.is_none_or(|l| l[i] == 0.0)
                && z.is_none_or(|l| l[i] == 0.0)
                && correct.is_none_or(|c| !c[i]);
            assert!(
                losses[i] == 0.0 && zero_extras,
                "ignored row {i}: loss {:e}, lse {:?}, z-loss {:?}, correct {:?}: not 0, 0, 0, \
                 false\n{}",
                losses[i],
                lse.map(|l| l[i]),
                z.map(|l| l[i]),
                correct.map(|c| c[i]),
                ctx(Some(i), None)
            );
            if let Some(c) = row_grad.and_then(|g| g.iter().position(|&x| x != 0.0)) {
                panic!(
                    "ignored row {i} has gradient {:e} at class {c}, not 0\n{}",
                    row_grad.map_or(0.0, |g| g[c]),
                    ctx(Some(i), Some(c))
                );
            }
            continue;
        }
        let w = case.weight_factor(i);
        let target = case.class(i).and_then(|t| usize::try_from(t).ok());
        let rel = 2.0 * loss_tol * w;
        loss_bound += rel * magnitude(want_losses[i]);
        // A row loss beyond f32 (infinite as f32, finite in f64) still enters a finite mean.
        if want_losses[i].is_infinite() {
            beyond_f32_rel = beyond_f32_rel.max(rel);
        }
        z_bound += 4.0 * loss_tol * magnitude(want_z[i]);
        let size = f64::from(if want_losses[i].is_finite() {
            want_losses[i]
        } else {
            losses[i]
        });
        let bound = rel
            * if size.is_finite() {
                size.abs().max(1.0)
            } else {
                1.0
            };
        assert!(
            close(losses[i], want_losses[i], bound),
            "row {i}: loss {:e}, reference {:e}, difference {:e}, tolerance {bound:e} \
             (relative {rel:e})\n{}",
            losses[i],
            want_losses[i],
            f64::from(losses[i]) - f64::from(want_losses[i]),
            ctx(Some(i), target)
        );
        if let Some(l) = lse {
            let rel = 2.0 * loss_tol;
            let size = f64::from(want_lse[i]).abs().max(1.0);
            assert!(
                close_rel(l[i], want_lse[i], rel) || close(l[i], want_lse[i], rel * size),
                "row {i}: lse {:e}, reference {:e}, relative tolerance {rel:e}\n{}",
                l[i],
                want_lse[i],
                ctx(Some(i), target)
            );
        }
        if let Some(l) = z {
            let rel = 4.0 * loss_tol;
            let size = f64::from(want_z[i]).abs().max(1.0);
            assert!(
                close_rel(l[i], want_z[i], rel) || close(l[i], want_z[i], rel * size),
                "row {i}: z-loss {:e}, reference {:e}, relative tolerance {rel:e}\n{}",
                l[i],
                want_z[i],
                ctx(Some(i), target)
            );
        }
        if let Some(c) = correct {
            assert!(
                c[i] == want_correct[i],
                "row {i}: correct {}, reference {}\n{}",
                c[i],
                want_correct[i],
                ctx(Some(i), target)
            );
        }
        let Some(g) = row_grad else {
            continue;
        };
        let zr = case.row(i);
        // NaN, +inf, and (documented) a finite logit scaled past f32::MAX make the row NaN.
        let scaled_past_max =
            |z: f32| case.softcap.is_none() && (logit_scale * f64::from(z)) as f32 == f32::INFINITY;
        let valid = !(0..k).any(|c| {
            case.allows(c) && (zr[c].is_nan() || zr[c] == f32::INFINITY || scaled_past_max(zr[c]))
        });
        let masked = |c: usize| !case.allows(c) || zr[c] == f32::NEG_INFINITY;
        let none_allowed = (0..k).all(masked);
        let row_scale = case
            .row_scales
            .as_ref()
            .map_or(1.0, |r| f64::from(r[i]).abs());
        let lse_i = f64::from(want_lse[i]);
        let z_factor = if lambda > 0.0 && !lse_i.is_nan() {
            1.0 + 2.0 * lambda * lse_i.abs()
        } else {
            1.0
        };
        let tolerance =
            4.0 * grad_tol * grad_scale * row_scale * logit_scale.max(1.0) * w * z_factor;
        // Documented (`CrossEntropy`'s numerical contract): the gradient's per-row factor
        // `upstream * row_scale * s * (A + 2 lambda lse) / sum exp(t - m)` is formed in f32, and
        // a row where it exceeds f32::MAX gets NaN in the gradient of its classes of negligible
        // probability. Bounded here with `A <= w` and the reference's lse and max.
        let t_max = (0..k)
            .filter(|&c| zr[c].is_finite() && case.allows(c))
            .map(|c| {
                let z = f64::from(zr[c]);
                match case.softcap {
                    Some(cap) => f64::from(cap) * (logit_scale * z / f64::from(cap)).tanh(),
                    None => logit_scale * z,
                }
            })
            .fold(f64::NEG_INFINITY, f64::max);
        // (`w` bounds both the target mass and a per-target row weight.)
        let factor = grad_scale * row_scale * logit_scale * w * (w + 2.0 * lambda * lse_i.abs())
            / (lse_i - t_max).exp();
        let factor_overflows = factor >= f64::from(f32::MAX);
        for c in 0..k {
            // A masked class gets exactly 0 (the target too when no class is allowed).
            let exact_zero = valid && masked(c) && (target != Some(c) || none_allowed);
            let ok = if exact_zero {
                g[c] == 0.0
            } else {
                close(g[c], want_grad[i * k + c], tolerance) || (factor_overflows && g[c].is_nan())
            };
            assert!(
                ok,
                "row {i} class {c}: gradient {:e}, reference {:e}{}, difference {:e}, tolerance \
                 {tolerance:e} (scale {:e})\n{}",
                g[c],
                want_grad[i * k + c],
                if exact_zero {
                    ", masked class: must be exactly 0"
                } else {
                    ""
                },
                f64::from(g[c]) - f64::from(want_grad[i * k + c]),
                grad_scale * row_scale,
                ctx(Some(i), Some(c))
            );
        }
    }

    // The summary.
    let d = if denominator > 0.0 { denominator } else { 1.0 };
    if case.reduction == Reduction::Mean && denominator == 0.0 {
        assert!(
            summary.loss == 0.0 && summary.z_loss == 0.0,
            "a mean over a zero denominator is {:e} (z-loss {:e}), not 0\n{}",
            summary.loss,
            summary.z_loss,
            ctx(None, None)
        );
    }
    let pairs = [
        (
            "loss",
            summary.loss,
            want.loss,
            loss_bound / d + beyond_f32_rel * f64::from(want.loss).abs(),
        ),
        ("z-loss", summary.z_loss, want.z_loss, z_bound / d),
    ];
    for (what, g, w, bound) in pairs {
        assert!(
            close(g, w, bound + ulp(f64::from(w))),
            "summary {what} {g:e}, reference {w:e}, difference {:e}, tolerance {:e}\n{}",
            f64::from(g) - f64::from(w),
            bound + 2.0 * ulp(f64::from(w)),
            ctx(None, None)
        );
    }
    assert!(
        summary.correct == verdict_correct,
        "summary correct {}, reference {verdict_correct}\n{}",
        summary.correct,
        ctx(None, None)
    );
    if let Some(c) = correct {
        let count = c.iter().filter(|&&x| x).count();
        assert!(
            summary.correct == count,
            "summary correct {} but {count} rows flagged correct\n{}",
            summary.correct,
            ctx(None, None)
        );
    }

    // The other form of the gradient call must give the same bits.
    let other = match case.entry {
        Entry::Forward => return,
        Entry::ForwardBackward => Entry::InPlace,
        Entry::InPlace => Entry::ForwardBackward,
    };
    let again = run_options(case, &inputs, &ce, other);
    for (what, intact) in again.fences() {
        assert!(
            intact,
            "a write outside the {what} slice ({other:?})\n{}",
            ctx(None, None)
        );
    }
    let Ok(s2) = again.result else {
        panic!(
            "{other:?} returned {:?} where {:?} succeeded\n{}",
            again.result,
            case.entry,
            ctx(None, None)
        );
    };
    let same_summary = summary.loss.same(s2.loss)
        && summary.z_loss.same(s2.z_loss)
        && summary.correct == s2.correct
        && summary.rows == s2.rows
        && summary.denominator.to_bits() == s2.denominator.to_bits();
    assert!(
        same_summary,
        "{:?} returned {summary:?}, {other:?} returned {s2:?}\n{}",
        case.entry,
        ctx(None, None)
    );
    let pairs = [
        ("loss", Some(&got.losses), Some(&again.losses), 1),
        ("gradient", got.grad.as_ref(), again.grad.as_ref(), k),
        ("lse", got.lse.as_ref(), again.lse.as_ref(), 1),
        ("z-loss", got.z_loss.as_ref(), again.z_loss.as_ref(), 1),
    ];
    for (what, a, b, width) in pairs {
        let (a, b) = (
            a.map_or(&[][..], Fenced::get),
            b.map_or(&[][..], Fenced::get),
        );
        if let Some(j) = (0..a.len()).find(|&j| !a[j].same(b[j])) {
            panic!(
                "in-place and out-of-place differ: {what} [{j}] is {:e} from {:?} and {:e} from \
                 {other:?}\n{}",
                a[j],
                case.entry,
                b[j],
                ctx(Some(j / width), (width > 1).then_some(j % width))
            );
        }
    }
    let (a, b) = (
        got.correct.as_ref().map_or(&[][..], Fenced::get),
        again.correct.as_ref().map_or(&[][..], Fenced::get),
    );
    assert!(
        a == b,
        "in-place and out-of-place differ in correct: {a:?} and {b:?}\n{}",
        ctx(None, None)
    );
}
