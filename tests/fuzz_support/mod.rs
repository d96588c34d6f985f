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
//!
//! Decoding never fails: [`arbitrary::Unstructured`] yields zeros once the bytes run out.

// The generator and the checker read best as one long function each.
#![allow(clippy::too_many_lines)]

use std::fmt::Write as _;
use std::ops::RangeInclusive;

use arbitrary::{Arbitrary, Unstructured};
use smoothce::reference::{self, GRAD_TOLERANCE, LOSS_TOLERANCE};
use smoothce::{Backend, CrossEntropy, Error, Reduction, Smoothing};

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
    let expected_err = match want {
        Err(e) => Some(e),
        Ok(_) if !backend_available(case.backend) => Some(Error::BackendUnavailable {
            backend: case.backend,
        }),
        Ok(_) => None,
    };
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
