//! The AVX2+FMA backend: 256-bit registers, fused multiply-add.

use core::arch::x86_64::{
    __m256, _mm256_add_ps, _mm256_blendv_ps, _mm256_castps_si256, _mm256_castsi256_ps,
    _mm256_cmp_ps, _mm256_div_ps, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_max_ps, _mm256_min_ps,
    _mm256_mul_ps, _mm256_set1_ps, _mm256_slli_epi32, _mm256_storeu_ps, _mm256_sub_ps, _CMP_EQ_OQ,
    _CMP_LT_OQ,
};

use crate::kernel::{self, Buffers, Job, Outputs, Totals};
use crate::vector::Vector;
use crate::Targets;

/// Eight f32 lanes in a `ymm` register.
///
/// Every method runs AVX2/FMA instructions: the type is private to this module and only used
/// inside [`run`], which is compiled with those features and only called once they are detected.
#[derive(Clone, Copy)]
pub(super) struct Avx2(__m256);

// Each `unsafe` block below calls an AVX/AVX2/FMA intrinsic.
// SAFETY (for all of them): this code only runs inlined into `run`, a
// `#[target_feature(enable = "avx2,fma")]` function that `arch::select` hands out only after
// detecting AVX2, FMA and OS support of the ymm state; pointers come from arrays of exactly 8
// f32, so every 32-byte unaligned load and store is in bounds.
impl Vector for Avx2 {
    const LANES: usize = 8;
    type Array = [f32; 8];

    #[inline(always)]
    fn split(s: &[f32]) -> (&[[f32; 8]], &[f32]) {
        s.as_chunks()
    }
    #[inline(always)]
    fn split_mut(s: &mut [f32]) -> (&mut [[f32; 8]], &mut [f32]) {
        s.as_chunks_mut()
    }
    #[inline(always)]
    fn load(a: &[f32; 8]) -> Self {
        // SAFETY: see the impl comment: AVX detected; `a` is 8 readable f32.
        Avx2(unsafe { _mm256_loadu_ps(a.as_ptr()) })
    }
    #[inline(always)]
    fn store(self, a: &mut [f32; 8]) {
        // SAFETY: see the impl comment: AVX detected; `a` is 8 writable f32.
        unsafe { _mm256_storeu_ps(a.as_mut_ptr(), self.0) }
    }
    #[inline(always)]
    fn load_tail(tail: &[f32], fill: f32) -> Self {
        let mut lanes = [fill; 8];
        for (lane, &x) in lanes.iter_mut().zip(tail) {
            *lane = x;
        }
        Self::load(&lanes)
    }
    #[inline(always)]
    fn store_tail(self, tail: &mut [f32]) {
        for (x, lane) in tail.iter_mut().zip(self.to_array()) {
            *x = lane;
        }
    }
    #[inline(always)]
    fn splat(x: f32) -> Self {
        // SAFETY: see the impl comment.
        Avx2(unsafe { _mm256_set1_ps(x) })
    }
    #[inline(always)]
    fn to_array(self) -> [f32; 8] {
        let mut a = [0.0; 8];
        self.store(&mut a);
        a
    }
    #[inline(always)]
    fn add(self, b: Self) -> Self {
        // SAFETY: see the impl comment.
        Avx2(unsafe { _mm256_add_ps(self.0, b.0) })
    }
    #[inline(always)]
    fn sub(self, b: Self) -> Self {
        // SAFETY: see the impl comment.
        Avx2(unsafe { _mm256_sub_ps(self.0, b.0) })
    }
    #[inline(always)]
    fn mul(self, b: Self) -> Self {
        // SAFETY: see the impl comment.
        Avx2(unsafe { _mm256_mul_ps(self.0, b.0) })
    }
    #[inline(always)]
    fn div(self, b: Self) -> Self {
        // SAFETY: see the impl comment.
        Avx2(unsafe { _mm256_div_ps(self.0, b.0) })
    }
    #[inline(always)]
    fn mul_add(self, b: Self, c: Self) -> Self {
        // SAFETY: see the impl comment (FMA detected).
        Avx2(unsafe { _mm256_fmadd_ps(self.0, b.0, c.0) })
    }
    #[inline(always)]
    fn max(self, b: Self) -> Self {
        // SAFETY: see the impl comment.
        Avx2(unsafe { _mm256_max_ps(self.0, b.0) })
    }
    #[inline(always)]
    fn min(self, b: Self) -> Self {
        // SAFETY: see the impl comment.
        Avx2(unsafe { _mm256_min_ps(self.0, b.0) })
    }
    #[inline(always)]
    fn select_lt(self, b: Self, t: Self, f: Self) -> Self {
        // SAFETY: see the impl comment.
        Avx2(unsafe { _mm256_blendv_ps(f.0, t.0, _mm256_cmp_ps::<_CMP_LT_OQ>(self.0, b.0)) })
    }
    #[inline(always)]
    fn select_eq(self, b: Self, t: Self, f: Self) -> Self {
        // SAFETY: see the impl comment.
        Avx2(unsafe { _mm256_blendv_ps(f.0, t.0, _mm256_cmp_ps::<_CMP_EQ_OQ>(self.0, b.0)) })
    }
    #[inline(always)]
    fn shift_into_exponent(self) -> Self {
        // SAFETY: see the impl comment (AVX2 detected).
        Avx2(unsafe { _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_castps_si256(self.0))) })
    }
}

row_kernels!(Avx2, "avx2,fma");

/// The batch kernel compiled for AVX2+FMA.
///
/// # Safety
/// The CPU must support AVX2 and FMA, and the OS must save ymm registers.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn run(
    job: &Job<'_>,
    targets: Targets<'_>,
    buffers: Buffers<'_>,
    outputs: Outputs<'_>,
) -> Totals {
    kernel::run::<Avx2>(job, targets, buffers, outputs)
}
