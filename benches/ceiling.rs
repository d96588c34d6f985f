//! The compute ceiling of a fused softmax cross-entropy at [128×1000] on AVX-512: how fast the
//! bare arithmetic can go, against a memcpy and the crate in the same run.
//!
//! Rows of 1000 classes sit in L1 and L2, where a memcpy runs at cache speed; the fused kernel
//! is then bound by its arithmetic, above all the exp. This group measures a stripped kernel that
//! does only the work no correct implementation can skip, written straight in AVX-512
//! intrinsics, with the crate's exp (same method, constants and operation count):
//!
//! - `bare_exp_sum`: per row, pass 1 (max, and the min the crate needs to pick its variant) and
//!   pass 2 (`e = exp(z - m)`, summed, with the sum of `z - m` for the smoothing term): the
//!   exps alone, nothing stored.
//! - `bare_fused`: the same, storing `e`, then pass 3 (`g = e * a + b` in place of `e`): a whole
//!   forward + backward of a plain row (rows of 1000 classes are 62 vectors and an 8-lane tail,
//!   done with masked loads and stores).
//!
//! Neither has NaN rules, f64 sums, the loss's cancellation-free form, tails that cannot pollute
//! the max, or options; their results are not checked beyond being used. They are a floor for
//! the crate's time, not an alternative to it. `memcpy`, `forward_backward/auto` and
//! `forward/auto` are measured alongside, so the ratios come from one run:
//!
//! `cargo bench --bench ceiling`, then
//! `python3 scripts/bench_ratios.py --group ceiling`.
//!
//! On a CPU without AVX-512F the group holds only the memcpy and the crate's kernels.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use smoothce::{CrossEntropy, Smoothing};

mod common;

use common::SplitMix64;

/// The shape `[N×K]`.
const N: usize = 128;
const K: usize = 1000;

#[cfg(target_arch = "x86_64")]
mod bare {
    use core::arch::x86_64::{
        __m512, __mmask16, _mm512_add_ps, _mm512_castps_si512, _mm512_castsi512_ps,
        _mm512_cmp_ps_mask, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_mask_blend_ps,
        _mm512_mask_loadu_ps, _mm512_mask_storeu_ps, _mm512_max_ps, _mm512_min_ps, _mm512_mul_ps,
        _mm512_reduce_add_ps, _mm512_reduce_max_ps, _mm512_reduce_min_ps, _mm512_set1_ps,
        _mm512_setzero_ps, _mm512_slli_epi32, _mm512_storeu_ps, _mm512_sub_ps, _CMP_LT_OQ,
    };

    /// The crate's exp (`src/exp.rs`): magic-bias rounding, two-part `ln 2`, degree-5 polynomial,
    /// exponent by shift, exact 0 below the denormal cutoff.
    #[inline(always)]
    fn exp(x: __m512) -> __m512 {
        // SAFETY: only inlined into `rows`, which is compiled with AVX-512F and only called once
        // it is detected; every intrinsic here is register-only.
        unsafe {
            let biased = _mm512_fmadd_ps(
                x,
                _mm512_set1_ps(f32::from_bits(0x3fb8_aa3b)),
                _mm512_set1_ps(f32::from_bits(0x4b40_007f)),
            );
            let scale = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_castps_si512(biased)));
            let n = _mm512_sub_ps(biased, _mm512_set1_ps(f32::from_bits(0x4b40_007f)));
            let t = _mm512_fmadd_ps(n, _mm512_set1_ps(f32::from_bits(0xbf31_7200)), x);
            let t = _mm512_fmadd_ps(n, _mm512_set1_ps(f32::from_bits(0xb5bf_be8e)), t);
            let p = _mm512_fmadd_ps(
                _mm512_set1_ps(f32::from_bits(0x3c07_cfce)),
                t,
                _mm512_set1_ps(f32::from_bits(0x3d2b_9d0d)),
            );
            let p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(f32::from_bits(0x3e2a_ad40)));
            let p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(f32::from_bits(0x3eff_fee3)));
            let p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(f32::from_bits(0x3f7f_fffb)));
            let result = _mm512_fmadd_ps(_mm512_mul_ps(t, scale), p, scale);
            let under: __mmask16 =
                _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(f32::from_bits(0xc2ae_ac4f)));
            _mm512_mask_blend_ps(under, result, _mm512_setzero_ps())
        }
    }

    /// Passes 1 and 2 of every row of `z` (and, with `STORE`, pass 3 into `g`); returns the sum
    /// of the rows' sums, so that nothing is optimised away. Two vectors per step, each with its
    /// own accumulators.
    ///
    /// # Safety
    /// AVX-512F must be available; `z` and `g` hold `N * K` elements.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn rows<const STORE: bool>(z: &[f32], g: &mut [f32]) -> f32 {
        const PAIRS: usize = super::K / 32;
        const TAIL: usize = super::K % 32;
        let mut total = 0.0;
        for (row, out) in z.chunks_exact(super::K).zip(g.chunks_exact_mut(super::K)) {
            let (p, q) = (row.as_ptr(), out.as_mut_ptr());
            // The last 1 to 31 elements: a full vector if there are 16, then a masked one.
            let (full, part) = (TAIL / 16, (1_u32 << (TAIL % 16)) as u16 - 1);
            // SAFETY: every vector access is within the row: `PAIRS` pairs of full vectors, then
            // `full` more, then a masked access to the remaining `TAIL % 16` lanes only.
            unsafe {
                let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
                let at = |i: usize| _mm512_loadu_ps(p.add(16 * i));
                let last = _mm512_mask_loadu_ps(ninf, part, p.add(16 * (2 * PAIRS + full)));
                let inf = _mm512_set1_ps(f32::INFINITY);
                let (mut hi0, mut hi1, mut lo0, mut lo1) = (ninf, last, inf, inf);
                for i in 0..PAIRS {
                    let (a, b) = (at(2 * i), at(2 * i + 1));
                    hi0 = _mm512_max_ps(hi0, a);
                    hi1 = _mm512_max_ps(hi1, b);
                    lo0 = _mm512_min_ps(lo0, a);
                    lo1 = _mm512_min_ps(lo1, b);
                }
                for i in 0..full {
                    hi0 = _mm512_max_ps(hi0, at(2 * PAIRS + i));
                }
                let m = _mm512_set1_ps(_mm512_reduce_max_ps(_mm512_max_ps(hi0, hi1)));
                total += _mm512_reduce_min_ps(_mm512_min_ps(lo0, lo1));
                let zero = _mm512_setzero_ps();
                let (mut s0, mut s1, mut t0, mut t1) = (zero, zero, zero, zero);
                for i in 0..PAIRS {
                    let (a, b) = (_mm512_sub_ps(at(2 * i), m), _mm512_sub_ps(at(2 * i + 1), m));
                    let (ea, eb) = (exp(a), exp(b));
                    s0 = _mm512_add_ps(s0, ea);
                    s1 = _mm512_add_ps(s1, eb);
                    t0 = _mm512_add_ps(t0, a);
                    t1 = _mm512_add_ps(t1, b);
                    if STORE {
                        _mm512_storeu_ps(q.add(32 * i), ea);
                        _mm512_storeu_ps(q.add(32 * i + 16), eb);
                    }
                }
                for i in 2 * PAIRS..2 * PAIRS + full {
                    let e = exp(_mm512_sub_ps(at(i), m));
                    s0 = _mm512_add_ps(s0, e);
                    if STORE {
                        _mm512_storeu_ps(q.add(16 * i), e);
                    }
                }
                let e = exp(_mm512_sub_ps(last, m));
                let s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), e));
                total += s + _mm512_reduce_add_ps(_mm512_add_ps(t0, t1));
                if STORE {
                    let end = q.add(16 * (2 * PAIRS + full));
                    _mm512_mask_storeu_ps(end, part, e);
                    let (a, b) = (_mm512_set1_ps(1.0 / s), _mm512_set1_ps(-1e-4));
                    for i in 0..2 * PAIRS + full {
                        let g = _mm512_fmadd_ps(_mm512_loadu_ps(q.add(16 * i)), a, b);
                        _mm512_storeu_ps(q.add(16 * i), g);
                    }
                    let tail = _mm512_mask_loadu_ps(zero, part, end);
                    _mm512_mask_storeu_ps(end, part, _mm512_fmadd_ps(tail, a, b));
                }
            }
        }
        total
    }
}

fn ceiling(c: &mut Criterion) {
    // The data of `benches/kernels.rs`: normal logits of standard deviation 3.
    let mut rng = SplitMix64(0x5EED_0000 ^ (N * K) as u64);
    let logits: Vec<f32> = (0..N * K)
        .map(|_| (3.0 * rng.normal_pair().0) as f32)
        .collect();
    let targets: Vec<u32> = (0..N).map(|_| rng.below(K)).collect();
    let mut out = vec![0.0_f32; N * K];
    let mut losses = vec![0.0_f32; N];
    let ce = CrossEntropy::new(K).smoothing(Smoothing::Uniform(0.1));

    let mut group = c.benchmark_group("ceiling_128x1000");
    group.throughput(Throughput::Elements((N * K) as u64));
    group.bench_function("memcpy", |b| {
        b.iter(|| out.copy_from_slice(black_box(&logits)));
    });
    group.bench_function("forward/auto", |b| {
        b.iter(|| ce.forward(black_box(&logits), &targets, &mut losses));
    });
    group.bench_function("forward_backward/auto", |b| {
        b.iter(|| ce.forward_backward(black_box(&logits), &targets, &mut losses, &mut out));
    });
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY (both): AVX-512F was detected just above; both buffers hold N * K elements.
        group.bench_function("bare_exp_sum", |b| {
            b.iter(|| unsafe { bare::rows::<false>(black_box(&logits), &mut out) });
        });
        group.bench_function("bare_fused", |b| {
            b.iter(|| unsafe { bare::rows::<true>(black_box(&logits), &mut out) });
        });
    }
    group.finish();
}

criterion_group!(benches, ceiling);
criterion_main!(benches);
