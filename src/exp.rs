//! `exp(x)` for `x <= 0`, the one transcendental in the hot loops, written once for every backend.
//!
//! Method (as in XNNPACK's `rr2-p5` kernels and Cody & Waite):
//! 1. `n = round(x * log2(e))`, by adding a magic bias that leaves `n + 127` in the low mantissa bits;
//! 2. `t = x - n * ln2`, with `ln2` split into a high part exact in few bits and a low correction,
//!    so that `n * ln2_hi` is exact and the reduction loses nothing;
//! 3. `exp(t)` on `|t| <= ln2 / 2` by a degree-5 minimax polynomial;
//! 4. the result times `2^n`, whose bits are `n + 127` shifted into the exponent field;
//! 5. arguments below `ln(2^-126) ~ -87.3365` give exactly `+0.0`: no denormal result, ever.
//!
//! Error: at most 2 ulp on `[-87.33, 0]` (checked by a test against f64 `exp`). `-inf` gives `0`,
//! NaN gives NaN.

use crate::vector::Vector;

/// `log2(e)` rounded to f32 (`0x1.715476p+0`).
const LOG2E: f32 = f32::from_bits(0x3fb8_aa3b);
/// `1.5 * 2^23 + 127` (`0x1.8000FEp23`): adding it rounds to an integer and leaves `n + 127` in the
/// low mantissa bits.
const MAGIC_BIAS: f32 = f32::from_bits(0x4b40_007f);
/// `-ln(2)`, high part (`-0x1.62E400p-1`, 16 significant bits so `n * LN2_HI` is exact).
const MINUS_LN2_HI: f32 = f32::from_bits(0xbf31_7200);
/// `-ln(2) - MINUS_LN2_HI`, the low correction (`-0x1.7F7D1Cp-20`).
const MINUS_LN2_LO: f32 = f32::from_bits(0xb5bf_be8e);
/// Minimax coefficients of `exp(t) ~ 1 + t*(C1 + t*(C2 + t*(C3 + t*(C4 + t*C5))))` on
/// `[-ln2/2, ln2/2]`.
const C1: f32 = f32::from_bits(0x3f7f_fffb); // 0x1.FFFFF6p-1
const C2: f32 = f32::from_bits(0x3eff_fee3); // 0x1.FFFDC6p-2
const C3: f32 = f32::from_bits(0x3e2a_ad40); // 0x1.555A80p-3
const C4: f32 = f32::from_bits(0x3d2b_9d0d); // 0x1.573A1Ap-5
const C5: f32 = f32::from_bits(0x3c07_cfce); // 0x1.0F9F9Cp-7
/// `ln(2^-126)` rounded up (`-0x1.5D589Ep6`): below it the result would be denormal; we return 0.
pub(crate) const DENORMAL_CUTOFF: f32 = f32::from_bits(0xc2ae_ac4f);

/// `exp(x)` lane-wise for `x <= 0`; exact `0.0` below [`DENORMAL_CUTOFF`] and for `-inf`.
#[inline(always)]
pub(crate) fn exp_nonpositive<V: Vector>(x: V) -> V {
    let biased = x.mul_add(V::splat(LOG2E), V::splat(MAGIC_BIAS));
    let scale = biased.shift_into_exponent();
    let n = biased.sub(V::splat(MAGIC_BIAS));
    let t = n.mul_add(V::splat(MINUS_LN2_HI), x);
    let t = n.mul_add(V::splat(MINUS_LN2_LO), t);
    let p = V::splat(C5).mul_add(t, V::splat(C4));
    let p = p.mul_add(t, V::splat(C3));
    let p = p.mul_add(t, V::splat(C2));
    let p = p.mul_add(t, V::splat(C1));
    // exp(t) = 1 + t * p, so 2^n * exp(t) = s + (t * s) * p.
    let ts = t.mul(scale);
    let result = ts.mul_add(p, scale);
    x.select_lt(V::splat(DENORMAL_CUTOFF), V::splat(0.0), result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::portable::Portable;

    fn ulp_distance(a: f32, b: f32) -> u32 {
        (i64::from(a.to_bits()) - i64::from(b.to_bits())).unsigned_abs() as u32
    }

    #[test]
    fn within_two_ulp_on_the_whole_range() {
        // Every f32 bit pattern in [-87.33, 0] would be 1.1e9 values; a fine stride covers all
        // exponents and mantissa patterns.
        let mut worst = 0;
        let mut bits = 0x8000_0000_u32; // -0.0
        while f32::from_bits(bits) >= DENORMAL_CUTOFF {
            let x = f32::from_bits(bits);
            let got = exp_nonpositive(Portable::splat(x)).to_array()[0];
            let want = libm::exp(f64::from(x)) as f32;
            worst = worst.max(ulp_distance(got, want));
            bits += 97;
        }
        assert!(worst <= 2, "worst error {worst} ulp");
    }

    #[test]
    fn no_denormals_and_exact_zero_below_cutoff() {
        for x in [DENORMAL_CUTOFF, -87.0, -80.0, -50.0] {
            let got = exp_nonpositive(Portable::splat(x)).to_array()[0];
            assert!(got == 0.0 || got.is_normal(), "exp({x}) = {got:e}");
        }
        for x in [-87.34, -88.0, -100.0, -1e30, f32::MIN, f32::NEG_INFINITY] {
            let got = exp_nonpositive(Portable::splat(x)).to_array()[0];
            assert_eq!(got.to_bits(), 0, "exp({x}) = {got:e}");
        }
        assert_eq!(exp_nonpositive(Portable::splat(0.0)).to_array()[0], 1.0);
        assert!(exp_nonpositive(Portable::splat(f32::NAN)).to_array()[0].is_nan());
    }
}
