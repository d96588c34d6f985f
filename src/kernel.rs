//! The fused algorithm, written once over [`Vector`] and instantiated by every backend.
//!
//! Per row of `K` logits `z` with target `y`:
//!
//! * **Reload** (rows up to [`RELOAD_MAX`] elements, the XNNPACK structure): pass 1 finds the max
//!   `m` (and the min, to choose the careful variant below); pass 2 stores `e = exp(z - m)` into
//!   the output while summing `e` and `z - m`; pass 3 turns the stored `e` into the gradient
//!   `scale * (e / s - per_class)`. One exp per element.
//! * **Recompute** (longer rows, and every forward-only call): statistics are gathered block by
//!   block (max of the block, then its sums while it is in L1) and merged exactly; the gradient pass
//!   recomputes `exp(z - m)`. Two exps per element, but the row is read from memory twice and
//!   written once instead of read three times and written twice.
//!
//! Sums run in four independent vector accumulators (no serial FMA chain) and are flushed to f64
//! every [`BLOCK`] elements, so `K = 262144` keeps full accuracy. The loss uses the offset-free form
//! `on*(m - z_y) + (on + per*K') ln s - per*S` with `S = sum (z - m)` (see `math.md`), and the
//! target's gradient `p_y - q_y` is formed in f64 from `z_y`, never by cancellation of rounded
//! values.
//!
//! Rows with a `-inf` logit (masked classes) or a range `max - min` so wide that `z - m` could
//! overflow take the *careful* variant: masked lanes are excluded from the sums and counts by
//! selects, the shifted sum is accumulated pre-scaled by `2^-41` so it cannot overflow, and pass 2
//! stores `-1` (impossible for an exp) for masked lanes so pass 3 can zero them.

use core::num::NonZeroUsize;

use crate::exp::exp_nonpositive;
use crate::vector::Vector;
use crate::Smoothing;

/// Elements whose partial sums stay in f32 vector accumulators before they are flushed into f64.
/// A multiple of `4 * LANES` for every backend, and small enough (16 KiB) to stay in L1 between the
/// two block passes of the recompute strategy.
pub(crate) const BLOCK: usize = 4096;

/// Rows longer than this use the recompute strategy for forward+backward.
pub(crate) const RELOAD_MAX: usize = 1 << 18;

/// Row ranges `max - min` above this take the careful variant (the fast variant's f32 accumulators
/// could overflow past it: at most 128 elements land in one accumulator lane per block).
const FAST_RANGE_MAX: f32 = 1e36;

/// The shifted sum is accumulated times `2^-41` in the careful variant.
const CAREFUL_SCALE: f32 = 1.0 / (1_u64 << 41) as f32;
/// The inverse of [`CAREFUL_SCALE`].
const CAREFUL_UNSCALE: f64 = (1_u64 << 41) as f64;

/// One batch call, with every argument already checked.
pub(crate) struct Job {
    /// `K`.
    pub classes: NonZeroUsize,
    /// The smoothing, with `eps` in `[0, 1]`.
    pub smoothing: Smoothing,
    /// Rows with this target are ignored.
    pub ignore_index: Option<u32>,
    /// Factor applied to every gradient element (`1 / D` for the mean).
    pub grad_scale: f32,
    /// What the summed loss is divided by (the non-ignored count for the mean, else 1).
    pub denominator: f64,
}

impl Job {
    /// The reduced loss from the sum of row losses.
    pub(crate) fn finish(&self, total: f64) -> f32 {
        if self.denominator == 0.0 {
            0.0
        } else {
            (total / self.denominator) as f32
        }
    }

    fn target(&self, target: u32) -> Option<usize> {
        if Some(target) == self.ignore_index {
            None
        } else {
            Some(target as usize)
        }
    }
}

/// Where a batch reads logits and writes gradients.
pub(crate) enum Buffers<'a> {
    /// Loss only.
    Forward {
        /// `[N, K]` logits.
        logits: &'a [f32],
    },
    /// Gradient into a separate buffer.
    Separate {
        /// `[N, K]` logits.
        logits: &'a [f32],
        /// `[N, K]` gradient.
        grad: &'a mut [f32],
    },
    /// Gradient over the logits.
    InPlace {
        /// `[N, K]` logits, overwritten by the gradient.
        logits: &'a mut [f32],
    },
}

/// Runs a whole batch; returns the sum of the row losses (f64).
#[inline(always)]
pub(crate) fn run<V: Vector>(
    job: &Job,
    targets: &[u32],
    buffers: Buffers<'_>,
    losses: &mut [f32],
) -> f64 {
    let k = job.classes.get();
    let mut total = 0.0;
    let rows = targets.iter().zip(losses.iter_mut());
    match buffers {
        Buffers::Forward { logits } => {
            for (z, (&t, loss)) in logits.chunks_exact(k).zip(rows) {
                let row_loss = match job.target(t) {
                    Some(y) => forward_row::<V>(job.smoothing, z, y),
                    None => 0.0,
                };
                *loss = row_loss as f32;
                total += row_loss;
            }
        }
        Buffers::Separate { logits, grad } => {
            for ((z, g), (&t, loss)) in logits
                .chunks_exact(k)
                .zip(grad.chunks_exact_mut(k))
                .zip(rows)
            {
                let row_loss = gradient_row::<V>(job, Io::Separate(z, g), t);
                *loss = row_loss as f32;
                total += row_loss;
            }
        }
        Buffers::InPlace { logits } => {
            for (z, (&t, loss)) in logits.chunks_exact_mut(k).zip(rows) {
                let row_loss = gradient_row::<V>(job, Io::InPlace(z), t);
                *loss = row_loss as f32;
                total += row_loss;
            }
        }
    }
    total
}

/// One row's source and destination.
enum Io<'r> {
    Separate(&'r [f32], &'r mut [f32]),
    InPlace(&'r mut [f32]),
}

impl Io<'_> {
    fn src(&self) -> &[f32] {
        match self {
            Io::Separate(z, _) => z,
            Io::InPlace(z) => z,
        }
    }

    fn fill(&mut self, value: f32) {
        match self {
            Io::Separate(_, g) => g.fill(value),
            Io::InPlace(z) => z.fill(value),
        }
    }

    /// Applies `op` to the source, storing into the destination.
    #[inline(always)]
    fn map<V: Vector, O: Op<V>>(&mut self, tail_fill: f32, op: &mut O) {
        match self {
            Io::Separate(z, g) => map_into(z, g, tail_fill, op),
            Io::InPlace(z) => map_in_place(z, tail_fill, op),
        }
    }

    /// Applies `op` to the destination in place.
    #[inline(always)]
    fn map_out<V: Vector, O: Op<V>>(&mut self, tail_fill: f32, op: &mut O) {
        match self {
            Io::Separate(_, g) => map_in_place(g, tail_fill, op),
            Io::InPlace(z) => map_in_place(z, tail_fill, op),
        }
    }

    fn set_out(&mut self, index: usize, value: f32) {
        let slot = match self {
            Io::Separate(_, g) => g.get_mut(index),
            Io::InPlace(z) => z.get_mut(index),
        };
        if let Some(slot) = slot {
            *slot = value;
        }
    }
}

/// A lane-wise operation over a row, with state (accumulators) of its own.
pub(crate) trait Op<V: Vector> {
    /// Processes one whole vector using accumulator `slot` (0..4); returns what to store.
    fn apply(&mut self, slot: usize, z: V) -> V;
    /// Processes the last, partial vector (padding lanes hold the tail fill value).
    #[inline(always)]
    fn apply_tail(&mut self, z: V) -> V {
        self.apply(3, z)
    }
    /// Called after every [`BLOCK`] elements and at the end.
    #[inline(always)]
    fn end_block(&mut self) {}
}

/// `op` over `src`, block by block, four vectors at a time, results ignored.
#[inline(always)]
fn fold<V: Vector, O: Op<V>>(src: &[f32], tail_fill: f32, op: &mut O) {
    for block in src.chunks(BLOCK) {
        let (arrays, tail) = V::split(block);
        let (quads, rest) = arrays.as_chunks::<4>();
        for [a, b, c, d] in quads {
            op.apply(0, V::load(a));
            op.apply(1, V::load(b));
            op.apply(2, V::load(c));
            op.apply(3, V::load(d));
        }
        // A constant slot: a run-time index would force the accumulators out of registers.
        for a in rest {
            op.apply(0, V::load(a));
        }
        if !tail.is_empty() {
            op.apply_tail(V::load_tail(tail, tail_fill));
        }
        op.end_block();
    }
}

/// `op` over `src`, results stored into `dst` (same length).
#[inline(always)]
fn map_into<V: Vector, O: Op<V>>(src: &[f32], dst: &mut [f32], tail_fill: f32, op: &mut O) {
    for (block, out) in src.chunks(BLOCK).zip(dst.chunks_mut(BLOCK)) {
        let (arrays, tail) = V::split(block);
        let (out_arrays, out_tail) = V::split_mut(out);
        let (quads, rest) = arrays.as_chunks::<4>();
        let (out_quads, out_rest) = out_arrays.as_chunks_mut::<4>();
        for ([a, b, c, d], [oa, ob, oc, od]) in quads.iter().zip(out_quads) {
            op.apply(0, V::load(a)).store(oa);
            op.apply(1, V::load(b)).store(ob);
            op.apply(2, V::load(c)).store(oc);
            op.apply(3, V::load(d)).store(od);
        }
        for (a, o) in rest.iter().zip(out_rest) {
            op.apply(0, V::load(a)).store(o);
        }
        if !tail.is_empty() {
            op.apply_tail(V::load_tail(tail, tail_fill))
                .store_tail(out_tail);
        }
        op.end_block();
    }
}

/// `op` over `buf`, results stored back in place.
#[inline(always)]
fn map_in_place<V: Vector, O: Op<V>>(buf: &mut [f32], tail_fill: f32, op: &mut O) {
    for block in buf.chunks_mut(BLOCK) {
        let (arrays, tail) = V::split_mut(block);
        let (quads, rest) = arrays.as_chunks_mut::<4>();
        for [a, b, c, d] in quads {
            op.apply(0, V::load(a)).store(a);
            op.apply(1, V::load(b)).store(b);
            op.apply(2, V::load(c)).store(c);
            op.apply(3, V::load(d)).store(d);
        }
        for a in rest {
            op.apply(0, V::load(a)).store(a);
        }
        if !tail.is_empty() {
            op.apply_tail(V::load_tail(tail, tail_fill))
                .store_tail(tail);
        }
        op.end_block();
    }
}

/// Max and min of a row.
struct MaxMin<V> {
    max: [V; 4],
    min: [V; 4],
}

impl<V: Vector> MaxMin<V> {
    #[inline(always)]
    fn new() -> Self {
        MaxMin {
            max: [V::splat(f32::NEG_INFINITY); 4],
            min: [V::splat(f32::INFINITY); 4],
        }
    }

    /// `(max, min)` over the lanes (NaN lanes may be skipped: NaN is detected by the sums). The
    /// min covers whole vectors only: the tail always takes the careful path.
    #[inline(always)]
    fn result(&self) -> (f32, f32) {
        let [a, b, c, d] = self.max;
        let max = a.max(b).max(c.max(d)).reduce_max();
        let [a, b, c, d] = self.min;
        let min = a.min(b).min(c.min(d)).reduce_min();
        (max, min)
    }
}

impl<V: Vector> Op<V> for MaxMin<V> {
    #[inline(always)]
    fn apply(&mut self, slot: usize, z: V) -> V {
        let slot = slot & 3;
        self.max[slot] = self.max[slot].max(z);
        self.min[slot] = self.min[slot].min(z);
        z
    }

    #[inline(always)]
    fn apply_tail(&mut self, z: V) -> V {
        // The tail is padded with -inf: harmless for the max, meaningless for the min.
        self.max[3] = self.max[3].max(z);
        z
    }
}

/// The statistics of a row or a piece of a row, relative to its own max: exact to merge.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Stats {
    /// Max over the allowed (non -inf) elements; `-inf` when there is none.
    pub max: f32,
    /// `sum exp(z - max)` over allowed elements.
    pub sum_exp: f64,
    /// `sum (z - max)` over allowed elements.
    pub shifted_sum: f64,
    /// Number of allowed elements.
    pub allowed: u64,
    /// A NaN or `+inf` was seen.
    pub invalid: bool,
}

impl Stats {
    pub(crate) const EMPTY: Stats = Stats {
        max: f32::NEG_INFINITY,
        sum_exp: 0.0,
        shifted_sum: 0.0,
        allowed: 0,
        invalid: false,
    };

    /// The statistics of the union of two disjoint pieces.
    pub(crate) fn merge(self, other: Stats) -> Stats {
        let invalid = self.invalid || other.invalid;
        if other.allowed == 0 {
            return Stats { invalid, ..self };
        }
        if self.allowed == 0 {
            return Stats { invalid, ..other };
        }
        let max = if other.max > self.max {
            other.max
        } else {
            self.max
        };
        let m = f64::from(max);
        let shift = |st: &Stats| f64::from(st.max) - m;
        Stats {
            max,
            sum_exp: self.sum_exp * libm::exp(shift(&self))
                + other.sum_exp * libm::exp(shift(&other)),
            shifted_sum: self.shifted_sum
                + self.allowed as f64 * shift(&self)
                + other.shifted_sum
                + other.allowed as f64 * shift(&other),
            allowed: self.allowed + other.allowed,
            invalid,
        }
    }
}

/// Pass 2: `e = exp(z - m)`, summed with `z - m`; returns `e` (or `-1` for masked lanes in the
/// careful variant). Flushes into f64 at every block end.
struct SumExp<V, const CAREFUL: bool> {
    m: V,
    sum: [V; 4],
    shifted: [V; 4],
    /// `(z - m) * 2^-41`, from the careful lanes.
    scaled: [V; 4],
    allowed: [V; 4],
    /// Elements seen through the fast `apply` (all allowed).
    fast_count: u64,
    total_sum: f64,
    total_shifted: f64,
    total_allowed: u64,
}

impl<V: Vector, const CAREFUL: bool> SumExp<V, CAREFUL> {
    #[inline(always)]
    fn new(m: f32) -> Self {
        SumExp {
            m: V::splat(m),
            sum: [V::splat(0.0); 4],
            shifted: [V::splat(0.0); 4],
            scaled: [V::splat(0.0); 4],
            allowed: [V::splat(0.0); 4],
            fast_count: 0,
            total_sum: 0.0,
            total_shifted: 0.0,
            total_allowed: 0,
        }
    }

    /// The careful lane update: masked lanes (`-inf`, also the tail padding) count for nothing,
    /// and the shifted sum is formed as `(z - m) * 2^-41` without overflow.
    #[inline(always)]
    fn careful(&mut self, slot: usize, z: V) -> V {
        let slot = slot & 3;
        let ninf = V::splat(f32::NEG_INFINITY);
        let zero = V::splat(0.0);
        let e = exp_nonpositive(z.sub(self.m));
        self.sum[slot] = self.sum[slot].add(e);
        let c = V::splat(CAREFUL_SCALE);
        let scaled = z.mul(c).sub(self.m.mul(c));
        self.scaled[slot] = self.scaled[slot].add(z.select_eq(ninf, zero, scaled));
        self.allowed[slot] = self.allowed[slot].add(z.select_eq(ninf, zero, V::splat(1.0)));
        z.select_eq(ninf, V::splat(-1.0), e)
    }

    #[inline(always)]
    fn stats(&self, max: f32) -> Stats {
        let shifted_sum = self.total_shifted;
        Stats {
            max,
            sum_exp: self.total_sum,
            shifted_sum,
            allowed: self.total_allowed,
            invalid: shifted_sum.is_nan() || self.total_sum.is_nan(),
        }
    }
}

impl<V: Vector, const CAREFUL: bool> Op<V> for SumExp<V, CAREFUL> {
    #[inline(always)]
    fn apply(&mut self, slot: usize, z: V) -> V {
        if CAREFUL {
            return self.careful(slot, z);
        }
        let slot = slot & 3;
        let t = z.sub(self.m);
        let e = exp_nonpositive(t);
        self.sum[slot] = self.sum[slot].add(e);
        self.shifted[slot] = self.shifted[slot].add(t);
        self.fast_count += V::LANES as u64;
        e
    }

    #[inline(always)]
    fn apply_tail(&mut self, z: V) -> V {
        self.careful(3, z)
    }

    #[inline(always)]
    fn end_block(&mut self) {
        self.total_sum += drain(&mut self.sum);
        self.total_shifted += drain(&mut self.shifted);
        self.total_shifted += drain(&mut self.scaled) * CAREFUL_UNSCALE;
        self.total_allowed += drain(&mut self.allowed) as u64 + self.fast_count;
        self.fast_count = 0;
    }
}

/// The f64 sum of four accumulators, which are reset to zero. (A function, not a closure: closures
/// do not inherit the target features of the backend function they are inlined into.)
#[inline(always)]
fn drain<V: Vector>(acc: &mut [V; 4]) -> f64 {
    let [a, b, c, d] = *acc;
    *acc = [V::splat(0.0); 4];
    a.add(b).add(c.add(d)).reduce_sum()
}

/// Pass 3 of the reload strategy: `g = e * a - b` over the stored exps (`a = scale / s`,
/// `b = scale * per_class`). The careful variant zeroes lanes holding the masked marker `-1`.
struct Scale<V, const CAREFUL: bool> {
    a: V,
    minus_b: V,
}

impl<V: Vector, const CAREFUL: bool> Op<V> for Scale<V, CAREFUL> {
    #[inline(always)]
    fn apply(&mut self, _slot: usize, e: V) -> V {
        let g = e.mul_add(self.a, self.minus_b);
        if CAREFUL {
            let zero = V::splat(0.0);
            e.select_lt(zero, zero, g)
        } else {
            g
        }
    }

    #[inline(always)]
    fn apply_tail(&mut self, e: V) -> V {
        let zero = V::splat(0.0);
        e.select_lt(zero, zero, e.mul_add(self.a, self.minus_b))
    }
}

/// Pass 2 of the recompute strategy: `g = exp(z - m) * a - b`, masked lanes zero when careful.
struct Recompute<V, const CAREFUL: bool> {
    m: V,
    a: V,
    minus_b: V,
}

impl<V: Vector, const CAREFUL: bool> Recompute<V, CAREFUL> {
    #[inline(always)]
    fn careful(&self, z: V) -> V {
        let g = exp_nonpositive(z.sub(self.m)).mul_add(self.a, self.minus_b);
        z.select_eq(V::splat(f32::NEG_INFINITY), V::splat(0.0), g)
    }
}

impl<V: Vector, const CAREFUL: bool> Op<V> for Recompute<V, CAREFUL> {
    #[inline(always)]
    fn apply(&mut self, _slot: usize, z: V) -> V {
        if CAREFUL {
            self.careful(z)
        } else {
            exp_nonpositive(z.sub(self.m)).mul_add(self.a, self.minus_b)
        }
    }

    #[inline(always)]
    fn apply_tail(&mut self, z: V) -> V {
        self.careful(z)
    }
}

/// Whether a row (or block) with this max and min needs the careful variant. True for a `-inf`
/// min (masked classes), NaN, and ranges so wide that the fast f32 sums could overflow.
fn needs_care(max: f32, min: f32) -> bool {
    let range = max - min;
    range.is_nan() || range > FAST_RANGE_MAX
}

/// The statistics of a row whose max is not a finite number: NaN/`+inf` rows are invalid, a row of
/// only `-inf` (and maybe NaN) has no allowed class. `None` for a finite max.
fn degenerate(max: f32, z: &[f32]) -> Option<Stats> {
    if max.is_finite() {
        return None;
    }
    // A NaN-dropping max can report -inf for a row of NaN and -inf: look again.
    let invalid = max.is_nan() || max == f32::INFINITY || z.iter().any(|x| x.is_nan());
    Some(Stats {
        invalid,
        ..Stats::EMPTY
    })
}

/// The sums of `z` relative to its max, without storing anything.
#[inline(always)]
fn sums_of<V: Vector>(z: &[f32], max: f32, min: f32) -> Stats {
    if let Some(stats) = degenerate(max, z) {
        return stats;
    }
    if needs_care(max, min) {
        let mut op = SumExp::<V, true>::new(max);
        fold(z, f32::NEG_INFINITY, &mut op);
        op.stats(max)
    } else {
        let mut op = SumExp::<V, false>::new(max);
        fold(z, f32::NEG_INFINITY, &mut op);
        op.stats(max)
    }
}

/// Max and min of `z`.
#[inline(always)]
fn max_min<V: Vector>(z: &[f32]) -> (f32, f32) {
    let mut op = MaxMin::<V>::new();
    fold(z, f32::NEG_INFINITY, &mut op);
    op.result()
}

/// The statistics of a row or piece, block by block: each block is read from memory once (its
/// second pass hits L1), and the blocks merge exactly.
#[inline(always)]
pub(crate) fn stats<V: Vector>(z: &[f32]) -> Stats {
    let mut total = Stats::EMPTY;
    for block in z.chunks(BLOCK) {
        let (max, min) = max_min::<V>(block);
        total = total.merge(sums_of::<V>(block, max, min));
    }
    total
}

/// The loss of a row from its statistics and its target's logit, in f64:
/// `on*(m - z_y) + (on + per*K') ln s - per*S`, each term skipped when its coefficient is 0 so
/// that `0 * inf` never makes a NaN.
pub(crate) fn row_loss(smoothing: Smoothing, stats: &Stats, target_logit: f32) -> f64 {
    if stats.invalid {
        return f64::NAN;
    }
    if stats.allowed == 0 {
        return f64::INFINITY;
    }
    let (on, per) = smoothing.coefficients(stats.allowed, target_logit != f32::NEG_INFINITY);
    let mut loss = (on + per * stats.allowed as f64) * libm::log(stats.sum_exp);
    if on != 0.0 {
        loss += on * (f64::from(stats.max) - f64::from(target_logit));
    }
    if per != 0.0 {
        loss -= per * stats.shifted_sum;
    }
    loss
}

/// Loss of one row, no gradient.
#[inline(always)]
fn forward_row<V: Vector>(smoothing: Smoothing, z: &[f32], y: usize) -> f64 {
    let target_logit = z.get(y).copied().unwrap_or(f32::NAN);
    row_loss(smoothing, &stats::<V>(z), target_logit)
}

/// Loss and gradient of one row; returns the loss.
#[inline(always)]
fn gradient_row<V: Vector>(job: &Job, mut io: Io<'_>, target: u32) -> f64 {
    let Some(y) = job.target(target) else {
        io.fill(0.0);
        return 0.0;
    };
    let z = io.src();
    let Some(&target_logit) = z.get(y) else {
        // Unreachable: targets are checked against K before any row runs.
        io.fill(f32::NAN);
        return f64::NAN;
    };
    let k = z.len();
    let reload = k <= RELOAD_MAX;
    let stats = if reload {
        let (max, min) = max_min::<V>(z);
        match degenerate(max, z) {
            Some(stats) => stats,
            None if needs_care(max, min) => {
                let mut op = SumExp::<V, true>::new(max);
                io.map(f32::NEG_INFINITY, &mut op);
                op.stats(max)
            }
            None => {
                let mut op = SumExp::<V, false>::new(max);
                io.map(f32::NEG_INFINITY, &mut op);
                op.stats(max)
            }
        }
    } else {
        stats::<V>(z)
    };
    if stats.invalid {
        io.fill(f32::NAN);
        return f64::NAN;
    }
    if stats.allowed == 0 {
        io.fill(0.0);
        return f64::INFINITY;
    }
    let loss = row_loss(job.smoothing, &stats, target_logit);
    let target_allowed = target_logit != f32::NEG_INFINITY;
    let (on, per) = job.smoothing.coefficients(stats.allowed, target_allowed);
    let scale = f64::from(job.grad_scale);
    let a = V::splat((scale / stats.sum_exp) as f32);
    let minus_b = V::splat((-scale * per) as f32);
    let masked = stats.allowed < k as u64;
    if reload {
        // The stored values are exps, and masked lanes hold -1 (careful variant only).
        if masked {
            io.map_out(0.0, &mut Scale::<V, true> { a, minus_b });
        } else {
            io.map_out(0.0, &mut Scale::<V, false> { a, minus_b });
        }
    } else {
        let m = V::splat(stats.max);
        if masked {
            io.map(
                f32::NEG_INFINITY,
                &mut Recompute::<V, true> { m, a, minus_b },
            );
        } else {
            io.map(
                f32::NEG_INFINITY,
                &mut Recompute::<V, false> { m, a, minus_b },
            );
        }
    }
    // The target's gradient p_y - q_y, in f64 from the logit itself.
    let p_y = libm::exp(f64::from(target_logit) - f64::from(stats.max)) / stats.sum_exp;
    let q_y = on + if target_allowed { per } else { 0.0 };
    io.set_out(y, (scale * (p_y - q_y)) as f32);
    loss
}
