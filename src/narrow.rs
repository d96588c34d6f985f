//! The narrow-row kernel: rows of at most [`NARROW_MAX`] classes, [`Vector::LANES`] rows at a
//! time, one row per lane.
//!
//! A row of ten logits fills less than one vector, so the row kernel spends its time on what
//! every row costs once (horizontal reductions, a log, the coefficients), not on the logits. Here
//! a group of `LANES` rows is read as columns (column `j` holds class `j` of every row of the
//! group), and every per-row step is one vector operation for the whole group: the max, the exps
//! and their sums, the log, the loss and the gradient.
//!
//! It takes the plain configurations (see [`applies`]): class targets, no class mask, no
//! per-class weights, no soft-cap. Both smoothings (the shifted sum of the classes other than the
//! target is summed directly, so off-target smoothing above `2/3` needs no f64 rescue), the ignore index, every reduction,
//! the upstream scales, per-target weights, the logit scale, the z-loss and the per-row extras
//! are all computed here. A row holding a non-finite logit (or one the logit scale takes out of
//! the f32 range), or a range of logits too wide for the f32 sums, is left to the row kernel, so
//! the NaN and infinity rule is the row kernel's. Each row is computed in its own lane, with
//! nothing shared across lanes, so a row's results do not depend on its position in the batch,
//! on its neighbours, or on whether its group is whole (the last, partial group is padded with
//! ignored rows).
//!
//! Numerics, against the row kernel: the same `t - m` and the same exps, bit for bit; the sums in
//! f32, in two accumulators (at most 16 additions each, as in the row kernel's lanes); `ln s` by
//! an f32 log of at most 1 ulp; the loss as a sum of non-negative terms,
//! `A ln s + q_y (m - t_y) - D sum_{k != y} (t_k - m)` (the target's share kept out of the shifted
//! sum, so nothing cancels); the gradient as `e a + b` per element (one multiply-add, fused where
//! the backend has FMA). Every result is within the crate's tolerance of the reference. The row
//! kernel keeps these per-row constants in f64; here they are f32, so a row whose loss, lse or
//! gradient constants overflow f32 (logits near `f32::MAX` with a z-loss, huge weights or
//! upstream scales) is handed to the row kernel as well.

use crate::exp::exp_nonpositive;
use crate::kernel::{Io, Job, RowResult, RowTarget, Weights, FAST_RANGE_MAX};
use crate::targets::Targets;
use crate::vector::Vector;

/// Rows of at most this many classes take the narrow kernel. Measured (BENCHMARKS.md, "Narrow
/// rows"): at 32 classes it is still 1.7x (portable) to 3.5x (AVX-512) faster per element than
/// the row kernel at 33; the limit keeps its stack arrays small (32 column vectors, and the
/// buffer of the last, partial group).
pub(crate) const NARROW_MAX: usize = 32;

/// The most lanes of any backend: the size of a group's result array.
pub(crate) const MAX_LANES: usize = 16;

/// Whether a batch call with this job and these targets takes the narrow kernel.
pub(crate) fn applies(job: &Job<'_>, targets: &Targets<'_>) -> bool {
    job.classes.get() <= NARROW_MAX
        && !matches!(targets, Targets::Soft(_))
        && job.transform.cap.is_none()
        && job.class_mask.is_none()
        && !matches!(job.weights, Weights::PerClass(_))
}

/// The rows of one group: read only, or read and written (separately or in place).
pub(crate) enum Group<'a> {
    /// Loss only.
    Forward(&'a [f32]),
    /// Loss and gradient.
    Gradient(Io<'a>),
}

impl Group<'_> {
    fn src(&self) -> &[f32] {
        match self {
            Group::Forward(z) => z,
            Group::Gradient(io) => io.src(),
        }
    }
}

/// The results of the rows of a group (lanes past `LANES` unused).
#[derive(Clone, Copy, Default)]
pub(crate) struct GroupResults {
    /// Each row's results, if computed here.
    pub rows: [RowResult; MAX_LANES],
    /// Rows to hand to the row kernel (a non-finite logit, or a range too wide): their results
    /// above are meaningless and their destination rows were not written.
    pub fallback: [bool; MAX_LANES],
}

impl GroupResults {
    /// Whether any row of the group was handed back.
    pub(crate) fn any_fallback(&self) -> bool {
        self.fallback.iter().any(|&f| f)
    }
}

/// Loss (and gradient) of the `V::LANES` rows of `group`, the first of which is row `first_row`
/// of the batch (rows past the batch's end count as ignored). Each row is computed in its own
/// lane, independently of the others: a row's results do not depend on its group. A row with a
/// non-finite logit (or transformed logit), or with a range of transformed logits of
/// [`FAST_RANGE_MAX`] or more, is flagged for the row kernel, and its destination row is not
/// written. The results go to `results`.
#[inline(always)]
pub(crate) fn narrow_group<V: Vector>(
    job: &Job<'_>,
    targets: &Targets<'_>,
    group: &mut Group<'_>,
    first_row: usize,
    results: &mut GroupResults,
) {
    // The columns live in an array of `N` vectors, zeroed for every group: rows of up to 16
    // classes get one half the size.
    if job.classes.get() <= NARROW_MAX / 2 {
        group_with::<V, { NARROW_MAX / 2 }>(job, targets, group, first_row, results);
    } else {
        group_with::<V, NARROW_MAX>(job, targets, group, first_row, results);
    }
}

/// [`narrow_group`] with room for `N >= K` columns.
#[inline(always)]
fn group_with<V: Vector, const N: usize>(
    job: &Job<'_>,
    targets: &Targets<'_>,
    group: &mut Group<'_>,
    first_row: usize,
    results: &mut GroupResults,
) {
    let k = job.classes.get();
    let (zero, one) = (V::splat(0.0), V::splat(1.0));

    let (target, factor, weight, live) = row_lanes::<V>(job, targets, first_row);

    // The transformed logits, column by column, with their max and min; `bad` turns NaN in a
    // lane with a NaN or infinite transformed logit.
    let scale = V::splat(job.transform.scale);
    let mut cols = [zero; N];
    let mut max = V::splat(f32::NEG_INFINITY);
    let mut min = V::splat(f32::INFINITY);
    let mut bad = zero;
    let src = group.src();
    for (j, col) in cols.iter_mut().take(k).enumerate() {
        let t = V::gather_column(src, k, j).mul(scale);
        bad = bad.add(t.sub(t));
        max = max.max(t);
        min = min.min(t);
        *col = t;
    }
    // 1 in the lanes computed here (false for NaN).
    let ok = max
        .sub(min)
        .add(bad)
        .select_lt(V::splat(FAST_RANGE_MAX), one, zero);

    // Exps (kept in `cols`), their sum, the target's transformed logit and the shifted sum of the
    // other classes, each in two accumulators (at most 16 additions per lane, as in the row
    // kernel's f32 accumulators).
    let (mut s0, mut s1, mut r0, mut r1) = (zero, zero, zero, zero);
    let mut t_y = zero;
    for (j, col) in cols.iter_mut().take(k).enumerate() {
        let class = V::splat(j as f32);
        let r = col.sub(max);
        t_y = target.select_eq(class, *col, t_y);
        let rest = target.select_eq(class, zero, r);
        let e = exp_nonpositive(r);
        if j % 2 == 0 {
            s0 = s0.add(e);
            r0 = r0.add(rest);
        } else {
            s1 = s1.add(e);
            r1 = r1.add(rest);
        }
        *col = e;
    }
    let sum = s0.add(s1);
    let rest = r0.add(r1);
    let ln_sum = log_small(sum);

    // The coefficients of `loss = A ln s + B (m - t_y) - D sum (t - m)`, the same for every row:
    // every class is allowed.
    let (on, per) = job.smoothing.coefficients(k as u64, true);
    let a = on + per * k as f64;
    let q_y = on + per;
    let lse = max.add(ln_sum);
    let (z_loss, a_grad) = if job.z_loss > 0.0 {
        (
            lse.mul(lse).mul(V::splat(job.z_loss as f32)),
            lse.mul_add(V::splat((2.0 * job.z_loss) as f32), V::splat(a as f32)),
        )
    } else {
        (zero, V::splat(a as f32))
    };
    let base = ln_sum.mul(V::splat(a as f32));
    let base = max.sub(t_y).mul_add(V::splat(q_y as f32), base);
    let base = rest.mul_add(V::splat(-per as f32), base);
    let loss = base.mul_add(weight, z_loss);

    // The gradient's constants: g_k = f (A' p_k - D) off the target, f (A' p_y - q_y) on it;
    // +0 for an ignored row (whatever the sign of A').
    // (No closures here: they would not inherit the backend's target features.)
    let scaled = target.select_lt(zero, zero, factor.mul(a_grad).div(sum));
    let off = target.select_lt(zero, zero, factor.mul(V::splat(-per as f32)));
    let on_target = factor.mul(V::splat(-q_y as f32));
    // A row whose loss, lse or gradient constants overflowed f32 here (extreme logits, weights,
    // scales or z-loss, which the row kernel carries in f64) goes to the row kernel too: `spill`
    // is NaN in its lane.
    let spill = loss.sub(loss).add(lse.sub(lse)).add(scaled.sub(scaled));
    let spill = spill.add(off.sub(off)).add(on_target.sub(on_target));
    let ok = spill.select_eq(zero, ok, zero);

    if let Group::Gradient(io) = group {
        let out = io.out();
        for (j, e) in cols.iter().take(k).enumerate() {
            let add = target.select_eq(V::splat(j as f32), on_target, off);
            e.mul_add(scaled, add).scatter_column_where(ok, out, k, j);
        }
    }

    write_results(results, &live, [loss, z_loss, lse, t_y, max, ok]);
}

/// The per-lane row inputs of a group: the target class (-1 for an ignored row), the gradient's
/// factor (0 for an ignored row), the row weight, and which rows are live (not ignored).
#[inline(always)]
fn row_lanes<V: Vector>(
    job: &Job<'_>,
    targets: &Targets<'_>,
    first_row: usize,
) -> (V, V, V, [bool; MAX_LANES]) {
    let zero = V::splat(0.0);
    let mut target = zero.to_array();
    let mut factor = zero.to_array();
    let mut weight = zero.to_array();
    let mut live = [false; MAX_LANES];
    let per_row = job.row_scales.is_some() || matches!(job.weights, Weights::PerTarget(_));
    let call_factor = job.grad_scale * f64::from(job.transform.scale);
    if !per_row {
        // Without per-row factors and weights: the lanes the loop below would give with a row
        // scale and weight of 1, the target type matched once.
        targets.class_lanes(first_row, job.ignore_index, target.as_mut());
        for (l, &t) in live.iter_mut().zip(target.as_ref()) {
            *l = t >= 0.0;
        }
        let target = V::load(&target);
        let factor = target.select_lt(zero, zero, V::splat(call_factor as f32));
        return (target, factor, V::splat(1.0), live);
    }
    let lanes = target
        .as_mut()
        .iter_mut()
        .zip(factor.as_mut())
        .zip(weight.as_mut())
        .zip(live.iter_mut());
    for (row, (((t, f), w), l)) in (first_row..).zip(lanes) {
        let Some(RowTarget::Class(y)) = job.row_target(targets, row) else {
            *t = -1.0;
            continue;
        };
        let row_weight = match job.weights {
            Weights::PerTarget(w) => w.get(y).map_or(f64::NAN, |&v| f64::from(v)),
            _ => 1.0,
        };
        let row_scale = job
            .row_scales
            .and_then(|r| r.get(row))
            .map_or(1.0, |&r| f64::from(r));
        *t = y as f32;
        *l = true;
        *w = row_weight as f32;
        *f = (call_factor * row_scale * row_weight) as f32;
    }
    let (target, factor, weight) = (V::load(&target), V::load(&factor), V::load(&weight));
    (target, factor, weight, live)
}

/// Each live row's results from its lane of `loss, z_loss, lse, t_y, max, ok`; `ok` not 1 flags
/// the row for the row kernel.
#[inline(always)]
fn write_results<V: Vector>(results: &mut GroupResults, live: &[bool; MAX_LANES], lanes: [V; 6]) {
    let [loss, z_loss, lse, t_y, max, ok] = lanes;
    let (loss, z_loss, lse, t_y, max, ok) = (
        loss.to_array(),
        z_loss.to_array(),
        lse.to_array(),
        t_y.to_array(),
        max.to_array(),
        ok.to_array(),
    );
    let values = (loss.as_ref().iter().zip(z_loss.as_ref()))
        .zip(lse.as_ref().iter().zip(ok.as_ref()))
        .zip(t_y.as_ref().iter().zip(max.as_ref()));
    let slots = results.rows.iter_mut().zip(&mut results.fallback).zip(live);
    for (((result, fallback), &live), (((&loss, &z_loss), (&lse, &ok)), (&t_y, &max))) in
        slots.zip(values)
    {
        *fallback = ok != 1.0;
        *result = if live {
            RowResult {
                loss: f64::from(loss),
                z_loss: f64::from(z_loss),
                lse: f64::from(lse),
                correct: t_y == max,
            }
        } else {
            RowResult::default()
        };
    }
}

/// `ln 2`, high part (`0x1.62E300p-1`, exact times a small integer).
const LN2_HI: f32 = f32::from_bits(0x3f31_7180);
/// `ln 2 - LN2_HI`.
const LN2_LO: f32 = f32::from_bits(0x3717_f7d1);
/// Minimax coefficients of `(ln(1 + s) - ln(1 - s)) / s ~ 2 + Lg1 s^2 + Lg2 s^4 + ...` (FreeBSD's
/// and musl's `logf`).
const LG1: f32 = f32::from_bits(0x3f2a_aaaa);
const LG2: f32 = f32::from_bits(0x3ecc_ce13);
const LG3: f32 = f32::from_bits(0x3e91_e9ee);
const LG4: f32 = f32::from_bits(0x3e78_9e26);

/// `ln x` lane-wise for `1 <= x <= 64` (the sum of at most [`NARROW_MAX`] exps, the largest of
/// which is 1), within 1 ulp: `x = 2^n f` with `f` in `[sqrt(2)/2, sqrt(2))` by halvings (exact),
/// then `ln f = 2 atanh(s)`, `s = (f - 1) / (f + 1)`, as FreeBSD's `logf` computes it.
#[inline(always)]
pub(crate) fn log_small<V: Vector>(x: V) -> V {
    let sqrt2 = V::splat(core::f32::consts::SQRT_2);
    let (half, one) = (V::splat(0.5), V::splat(1.0));
    let mut f = x;
    let mut n = V::splat(0.0);
    for _ in 0..5 {
        n = f.select_lt(sqrt2, n, n.add(one));
        f = f.select_lt(sqrt2, f, f.mul(half));
    }
    let f = f.sub(one);
    let s = f.div(f.add(V::splat(2.0)));
    let z = s.mul(s);
    let w = z.mul(z);
    let t1 = w.mul(w.mul_add(V::splat(LG4), V::splat(LG2)));
    let t2 = z.mul(w.mul_add(V::splat(LG3), V::splat(LG1)));
    let r = t2.add(t1);
    let hfsq = half.mul(f).mul(f);
    let low = s.mul(hfsq.add(r)).add(n.mul(V::splat(LN2_LO)));
    low.sub(hfsq).add(f).add(n.mul(V::splat(LN2_HI)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::portable::Portable;

    fn ulp_distance(a: f32, b: f32) -> u32 {
        (i64::from(a.to_bits()) - i64::from(b.to_bits())).unsigned_abs() as u32
    }

    #[test]
    fn log_within_one_ulp_on_its_range() {
        let mut worst = 0;
        let mut bits = 1.0_f32.to_bits();
        while f32::from_bits(bits) <= 64.0 {
            let x = f32::from_bits(bits);
            let got = log_small(Portable::splat(x)).to_array()[0];
            let want = libm::log(f64::from(x)) as f32;
            worst = worst.max(ulp_distance(got, want));
            bits += 13;
        }
        assert!(worst <= 1, "worst error {worst} ulp");
        assert_eq!(log_small(Portable::splat(1.0)).to_array()[0], 0.0);
    }
}
