//! The AVX2+FMA backend: 256-bit registers, fused multiply-add.

use core::arch::x86_64::{
    __m128, __m256, __m256i, _mm256_add_epi32, _mm256_add_pd, _mm256_add_ps, _mm256_blendv_ps,
    _mm256_castpd256_pd128, _mm256_castps256_ps128, _mm256_castps_si256, _mm256_castsi256_ps,
    _mm256_cmp_ps, _mm256_cmpgt_epi32, _mm256_cvtepu8_epi32, _mm256_cvtps_pd, _mm256_div_ps,
    _mm256_extractf128_pd, _mm256_extractf128_ps, _mm256_fmadd_ps, _mm256_i32gather_ps,
    _mm256_loadu_ps, _mm256_max_ps, _mm256_min_ps, _mm256_mul_ps, _mm256_mullo_epi32,
    _mm256_set1_epi32, _mm256_set1_ps, _mm256_setr_epi32, _mm256_setzero_ps, _mm256_setzero_si256,
    _mm256_slli_epi32, _mm256_storeu_ps, _mm256_stream_ps, _mm256_sub_ps, _mm_add_pd, _mm_add_sd,
    _mm_cvtsd_f64, _mm_cvtss_f32, _mm_loadl_epi64, _mm_max_ps, _mm_min_ps, _mm_movehl_ps,
    _mm_prefetch, _mm_sfence, _mm_shuffle_ps, _mm_unpackhi_pd, _CMP_EQ_OQ, _CMP_LT_OQ, _CMP_NEQ_OQ,
    _MM_HINT_T0,
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
    type Mask = __m256;

    outline_with_features!(Avx2, "avx2,fma");
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
    const STREAM_ALIGN: usize = 32;
    #[inline(always)]
    fn stream(self, a: &mut [f32; 8]) {
        let p = a.as_mut_ptr();
        if p.addr().is_multiple_of(Self::STREAM_ALIGN) {
            // SAFETY: see the impl comment; `p` is 32-byte aligned (checked just above), as the
            // non-temporal store requires.
            unsafe { _mm256_stream_ps(p, self.0) }
        } else {
            self.store(a);
        }
    }
    #[inline(always)]
    fn stream_fence() {
        // SAFETY: `sfence` is part of SSE, which every x86_64 CPU has.
        unsafe { _mm_sfence() }
    }
    #[inline(always)]
    fn prefetch(x: *const f32) {
        // SAFETY: a prefetch is a hint: it never faults and changes nothing the program can
        // observe, whatever the address (the callers name addresses inside slices they hold).
        unsafe { _mm_prefetch::<_MM_HINT_T0>(x.cast()) }
    }
    #[inline(always)]
    fn gather_column(s: &[f32], stride: usize, j: usize) -> Self {
        match column_offsets(s.len(), stride, j) {
            // SAFETY: see the impl comment; every offset `i * stride + j` (i < 8) is below
            // `s.len()` (checked by `column_offsets`), so all 8 lanes read inside `s`.
            Some(offsets) => Avx2(unsafe { _mm256_i32gather_ps::<4>(s.as_ptr(), offsets) }),
            None => crate::vector::gather_column_lanes(s, stride, j),
        }
    }
    #[inline(always)]
    fn allowed(allowed: &[bool]) -> __m256 {
        let Some(flags) = allowed.first_chunk::<8>() else {
            let flags = crate::vector::allowed_lanes::<Self>(allowed);
            // SAFETY: see the impl comment.
            return unsafe { _mm256_cmp_ps::<_CMP_NEQ_OQ>(flags.0, _mm256_setzero_ps()) };
        };
        // SAFETY: see the impl comment; `flags` is 8 readable bytes (a `bool` is one byte, 0 or
        // 1), exactly what the 64-bit load reads.
        unsafe {
            let bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(flags.as_ptr().cast()));
            _mm256_castsi256_ps(_mm256_cmpgt_epi32(bytes, _mm256_setzero_si256()))
        }
    }
    #[inline(always)]
    fn select_where(m: __m256, t: Self, f: Self) -> Self {
        // SAFETY: see the impl comment.
        Avx2(unsafe { _mm256_blendv_ps(f.0, t.0, m) })
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
    // Horizontal reductions in registers, as trees: once or twice per row each, and a scalar
    // loop over the lanes was a large part of the cost of a short row.
    #[inline(always)]
    fn reduce_max(self) -> f32 {
        // SAFETY: see the impl comment.
        unsafe { fold_lanes(self.0, |a, b| _mm_max_ps(a, b)) }
    }
    #[inline(always)]
    fn reduce_min(self) -> f32 {
        // SAFETY: see the impl comment.
        unsafe { fold_lanes(self.0, |a, b| _mm_min_ps(a, b)) }
    }
    #[inline(always)]
    fn reduce_sum(self) -> f64 {
        // SAFETY: see the impl comment; the halves are widened to f64 exactly.
        unsafe {
            let low = _mm256_cvtps_pd(_mm256_castps256_ps128(self.0));
            let high = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(self.0));
            let four = _mm256_add_pd(low, high);
            let two = _mm_add_pd(
                _mm256_castpd256_pd128(four),
                _mm256_extractf128_pd::<1>(four),
            );
            _mm_cvtsd_f64(_mm_add_sd(two, _mm_unpackhi_pd(two, two)))
        }
    }
}

/// The element offsets `i * stride + j` of lanes `i = 0..8`, if all of them lie below `len` and
/// fit in an i32 (checked by [`crate::vector::column_fits`]).
#[inline(always)]
fn column_offsets(len: usize, stride: usize, j: usize) -> Option<__m256i> {
    let (stride, j) = crate::vector::column_fits(len, stride, j, 8)?;
    // SAFETY: see the impl comment; integer arithmetic on registers only.
    Some(unsafe {
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let rows = _mm256_mullo_epi32(lanes, _mm256_set1_epi32(stride));
        _mm256_add_epi32(rows, _mm256_set1_epi32(j))
    })
}

row_kernels!(Avx2, "avx2,fma");

/// The eight lanes of `v` combined with `op` as a tree (4 + 4, 2 + 2, 1 + 1).
///
/// # Safety
/// Needs AVX (see the `Vector` impl comment); `op` must be a lane-wise SSE operation.
#[inline(always)]
unsafe fn fold_lanes(v: __m256, op: impl Fn(__m128, __m128) -> __m128) -> f32 {
    // SAFETY: the caller guarantees AVX; the rest is SSE, part of x86_64.
    unsafe {
        let four = op(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let two = op(four, _mm_movehl_ps(four, four));
        let one = op(two, _mm_shuffle_ps::<0b01>(two, two));
        _mm_cvtss_f32(one)
    }
}

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
