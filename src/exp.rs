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
    use crate::{Backend, CrossEntropy, Piece, RowState};
    use std::vec::Vec;

    fn ulp_distance(a: f32, b: f32) -> u32 {
        (i64::from(a.to_bits()) - i64::from(b.to_bits())).unsigned_abs() as u32
    }

    /// The arguments of the sweep: every 97th f32 bit pattern from `-0.0` down to
    /// [`DENORMAL_CUTOFF`]. All 1.1e9 values in `[-87.33, 0]` would be too many; this stride
    /// covers every exponent and a spread of mantissa patterns.
    fn sweep() -> impl Iterator<Item = f32> {
        (0x8000_0000_u32..=DENORMAL_CUTOFF.to_bits())
            .step_by(97)
            .map(f32::from_bits)
    }

    /// The worst ulp distance of `got[i]` from f64 `exp(xs[i])` rounded to f32.
    fn worst_ulp(xs: &[f32], got: &[f32]) -> u32 {
        assert_eq!(xs.len(), got.len());
        xs.iter()
            .zip(got)
            .map(|(&x, &e)| ulp_distance(e, libm::exp(f64::from(x)) as f32))
            .max()
            .unwrap_or(0)
    }

    /// Classes per row of the kernel sweep: a multiple of every backend's lane count, so every
    /// argument goes through whole vectors.
    const ROW: usize = 4096;

    /// `exp_nonpositive` as compiled into `backend`'s kernels, on every argument of `xs`.
    ///
    /// The x86 vector types are private to their backend modules and only valid inside the
    /// backend's `run` (compiled with its target features, entered after detection), so they are
    /// reached as the crate reaches them: through `arch::select`, from a public call.
    /// `piece_states_and_exps` stores `exp(t - m)` for each logit of a piece; every row here is
    /// `[0, x_1, x_2, ...]` with every `x_i <= 0`, so `m = 0`, `t - m = x_i` exactly (a logit scale of 1, no
    /// soft-cap, a range far below the careful variant's) and the stored value is
    /// `exp_nonpositive(x_i)`. The portable backend's results are checked bit for bit against a
    /// direct call, so this test fails, rather than measuring something else, if that path ever
    /// stores anything but the exp.
    fn kernel_exps(backend: Backend, xs: &[f32]) -> Vec<f32> {
        let ce = CrossEntropy::new(ROW).backend(backend);
        let whole = Piece {
            offset: 0,
            width: ROW,
        };
        let per_row = ROW - 1;
        let mut got = Vec::with_capacity(xs.len());
        let rows_per_call = 256;
        for chunk in xs.chunks(per_row * rows_per_call) {
            let rows = chunk.len().div_ceil(per_row);
            let mut logits = std::vec![0.0_f32; rows * ROW];
            for (row, args) in logits.chunks_exact_mut(ROW).zip(chunk.chunks(per_row)) {
                // Slot 0 holds the max, 0; a short last row is padded with -1.
                row[1..=args.len()].copy_from_slice(args);
                row[args.len() + 1..].fill(-1.0);
            }
            let targets = std::vec![0_u32; rows];
            let mut states = std::vec![RowState::EMPTY; rows];
            let mut exps = std::vec![f32::NAN; rows * ROW];
            ce.piece_states_and_exps(&logits, whole, &targets[..], &mut states, &mut exps)
                .expect("valid piece call");
            for (row, args) in exps.chunks_exact(ROW).zip(chunk.chunks(per_row)) {
                assert_eq!(row[0], 1.0, "{backend:?}: exp(0)");
                got.extend_from_slice(&row[1..=args.len()]);
            }
        }
        got
    }

    #[test]
    fn within_two_ulp_on_the_whole_range() {
        let xs: Vec<f32> = sweep().collect();
        assert!(xs.len() > 10_000_000);
        let direct: Vec<f32> = xs
            .iter()
            .map(|&x| exp_nonpositive(Portable::splat(x)).to_array()[0])
            .collect();
        let worst = worst_ulp(&xs, &direct);
        assert!(worst <= 2, "Portable: worst error {worst} ulp");
        // The kernel path really is the exp: bit for bit the direct portable results.
        let through_kernel = kernel_exps(Backend::Portable, &xs);
        let differs = direct
            .iter()
            .zip(&through_kernel)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        assert_eq!(differs, None, "the portable kernel stored something else");
    }

    /// The same sweep on the AVX2 and AVX-512 backends (their own `Vector` arithmetic: fused
    /// multiply-adds, their exponent shift and select), where this CPU has them.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn within_two_ulp_on_the_whole_range_on_x86_backends() {
        let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
        let avx512 = avx2 && std::is_x86_feature_detected!("avx512f");
        // The crate's own detection must agree, or the sweep below would be skipped silently.
        assert_eq!(Backend::Avx2.is_available(), avx2);
        assert_eq!(Backend::Avx512.is_available(), avx512);
        let xs: Vec<f32> = sweep().collect();
        for (backend, present) in [(Backend::Avx2, avx2), (Backend::Avx512, avx512)] {
            if !present {
                std::eprintln!("{backend:?} not on this CPU: skipped");
                continue;
            }
            let got = kernel_exps(backend, &xs);
            let worst = worst_ulp(&xs, &got);
            assert!(worst <= 2, "{backend:?}: worst error {worst} ulp");
        }
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
