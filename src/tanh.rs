//! `tanh(x)` for logit soft-capping (`c * tanh(z / c)`, Gemma 2), written once for every backend.
//!
//! For `|x| >= 1/4`: `tanh|x| = (1 - e) / (1 + e)` with `e = exp(-2|x|)` from [`crate::exp`]
//! (the cancellation in `1 - e` costs at most a factor 1.6 there). For `|x| < 1/4`: the odd Taylor
//! series to `x^11`, whose first omitted term is below `1e-10 * |x|`. The sign is put back last.
//! Error: a few ulp (checked by a test against f64 `tanh`).

use crate::exp::exp_nonpositive;
use crate::vector::Vector;

/// Taylor coefficients of `tanh x = x + x^3 (T3 + x^2 (T5 + ...))`.
const T3: f32 = -1.0 / 3.0;
const T5: f32 = 2.0 / 15.0;
const T7: f32 = -17.0 / 315.0;
const T9: f32 = 62.0 / 2835.0;
const T11: f32 = -1382.0 / 155_925.0;
/// Below this magnitude the series is used.
const SERIES_MAX: f32 = 0.25;

/// Lane-wise `tanh(x)`; NaN stays NaN, `±inf` gives `±1`.
#[inline(always)]
pub(crate) fn tanh<V: Vector>(x: V) -> V {
    let zero = V::splat(0.0);
    let one = V::splat(1.0);
    let abs = x.max(zero.sub(x));
    let e = exp_nonpositive(abs.mul(V::splat(-2.0)));
    let large = one.sub(e).div(one.add(e));
    let x2 = abs.mul(abs);
    let p = V::splat(T11).mul_add(x2, V::splat(T9));
    let p = p.mul_add(x2, V::splat(T7));
    let p = p.mul_add(x2, V::splat(T5));
    let p = p.mul_add(x2, V::splat(T3));
    let small = p.mul(x2).mul_add(abs, abs);
    let magnitude = abs.select_lt(V::splat(SERIES_MAX), small, large);
    x.select_lt(zero, zero.sub(magnitude), magnitude)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::portable::Portable;

    #[test]
    fn close_to_f64_tanh() {
        let mut worst = 0.0_f64;
        let mut x = -12.0_f32;
        while x <= 12.0 {
            let got = f64::from(tanh(Portable::splat(x)).to_array()[0]);
            let want = libm::tanh(f64::from(x));
            // Relative error in units of f32 epsilon.
            let err = (got - want).abs()
                / (want.abs().max(f64::from(f32::MIN_POSITIVE)) * f64::from(f32::EPSILON));
            worst = worst.max(err);
            x += 0.000_37;
        }
        assert!(worst <= 4.0, "worst relative error {worst} eps");
        for (x, want) in [
            (f32::INFINITY, 1.0),
            (f32::NEG_INFINITY, -1.0),
            (0.0, 0.0),
            (1e-30, 1e-30),
        ] {
            assert_eq!(tanh(Portable::splat(x)).to_array()[0], want);
        }
        assert!(tanh(Portable::splat(f32::NAN)).to_array()[0].is_nan());
    }
}
