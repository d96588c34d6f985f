//! The AVX-512F backend: 512-bit registers, mask registers for tails and selects.

use core::arch::x86_64::{
    __m512, __m512i, __mmask16, _mm256_castpd_ps, _mm512_add_epi32, _mm512_add_pd, _mm512_add_ps,
    _mm512_castps512_ps256, _mm512_castps_pd, _mm512_castps_si512, _mm512_castsi512_ps,
    _mm512_cmp_ps_mask, _mm512_cvtepu8_epi32, _mm512_cvtps_pd, _mm512_div_ps,
    _mm512_extractf64x4_pd, _mm512_fmadd_ps, _mm512_i32gather_ps, _mm512_loadu_ps,
    _mm512_mask_blend_ps, _mm512_mask_i32scatter_ps, _mm512_mask_loadu_ps, _mm512_mask_max_ps,
    _mm512_mask_min_ps, _mm512_mask_storeu_ps, _mm512_max_ps, _mm512_min_ps, _mm512_mul_ps,
    _mm512_mullo_epi32, _mm512_reduce_add_pd, _mm512_reduce_max_ps, _mm512_reduce_min_ps,
    _mm512_set1_epi32, _mm512_set1_ps, _mm512_setr_epi32, _mm512_slli_epi32, _mm512_storeu_ps,
    _mm512_stream_ps, _mm512_sub_ps, _mm512_test_epi32_mask, _mm_loadu_si128, _mm_prefetch,
    _mm_sfence, _CMP_EQ_OQ, _CMP_NEQ_OQ, _CMP_NLT_UQ, _MM_HINT_T0,
};

use crate::kernel::{self, Buffers, Job, MaskBits, Outputs, Totals};
use crate::vector::{mask_word, MaskWords, Vector, MASK_CLASSES};
use crate::Targets;

/// Sixteen f32 lanes in a `zmm` register.
///
/// Every method runs AVX-512F instructions: the type is private to this module and only used
/// inside [`run`], which is compiled with that feature and only called once it is detected.
#[derive(Clone, Copy)]
pub(super) struct Avx512(__m512);

/// The mask of the low `len` lanes (`len < 16`).
#[inline(always)]
fn low_lanes(len: usize) -> __mmask16 {
    ((1_u32 << (len & 15)) - 1) as __mmask16
}

// Each `unsafe` block below calls an AVX-512F intrinsic.
// SAFETY (for all of them): this code only runs inlined into `run`, a
// `#[target_feature(enable = "avx512f")]` function that `arch::select` hands out only after
// detecting AVX-512F and OS support of the zmm and opmask state. Whole loads and stores use arrays
// of exactly 16 f32; masked loads and stores touch only the lanes of `tail` (masked-off lanes are
// neither read nor written and cannot fault).
impl Vector for Avx512 {
    const LANES: usize = 16;
    type Array = [f32; 16];
    type Mask = __mmask16;

    outline_with_features!(Avx512, "avx512f");
    #[inline(always)]
    fn split(s: &[f32]) -> (&[[f32; 16]], &[f32]) {
        s.as_chunks()
    }
    #[inline(always)]
    fn split_mut(s: &mut [f32]) -> (&mut [[f32; 16]], &mut [f32]) {
        s.as_chunks_mut()
    }
    #[inline(always)]
    fn load(a: &[f32; 16]) -> Self {
        // SAFETY: see the impl comment; `a` is 16 readable f32.
        Avx512(unsafe { _mm512_loadu_ps(a.as_ptr()) })
    }
    #[inline(always)]
    fn store(self, a: &mut [f32; 16]) {
        // SAFETY: see the impl comment; `a` is 16 writable f32.
        unsafe { _mm512_storeu_ps(a.as_mut_ptr(), self.0) }
    }
    #[inline(always)]
    fn load_tail(tail: &[f32], fill: f32) -> Self {
        // SAFETY: see the impl comment; only the low `tail.len()` lanes are read.
        Avx512(unsafe {
            _mm512_mask_loadu_ps(_mm512_set1_ps(fill), low_lanes(tail.len()), tail.as_ptr())
        })
    }
    #[inline(always)]
    fn store_tail(self, tail: &mut [f32]) {
        // SAFETY: see the impl comment; only the low `tail.len()` lanes are written.
        unsafe { _mm512_mask_storeu_ps(tail.as_mut_ptr(), low_lanes(tail.len()), self.0) }
    }
    const STREAM_ALIGN: usize = 64;
    #[inline(always)]
    fn stream(self, a: &mut [f32; 16]) {
        let p = a.as_mut_ptr();
        if p.addr().is_multiple_of(Self::STREAM_ALIGN) {
            // SAFETY: see the impl comment; `p` is 64-byte aligned (checked just above), as the
            // non-temporal store requires.
            unsafe { _mm512_stream_ps(p, self.0) }
        } else {
            self.store(a);
        }
    }
    #[inline(always)]
    fn stream_fence() {
        // SAFETY: `sfence` is part of SSE, which every x86_64 CPU has.
        unsafe { _mm_sfence() }
    }
    // Measured (BENCHMARKS.md, "Strategy switch"): with 16 lanes the second exp of the
    // recompute strategy is cheap, and it is as fast as reloading up to 2^16 elements and faster
    // from 2^18 (by 10% at 2^18, 20% at 2^20).
    const RELOAD_MAX: usize = 1 << 17;
    #[inline(always)]
    fn prefetch(x: *const f32) {
        // SAFETY: a prefetch is a hint: it never faults and changes nothing the program can
        // observe, whatever the address (the callers name addresses inside slices they hold).
        unsafe { _mm_prefetch::<_MM_HINT_T0>(x.cast()) }
    }
    #[inline(always)]
    fn allowed(allowed: &[bool]) -> __mmask16 {
        let Some(flags) = allowed.first_chunk::<16>() else {
            let flags = crate::vector::allowed_lanes::<Self>(allowed);
            // SAFETY: see the impl comment.
            return unsafe { _mm512_cmp_ps_mask::<_CMP_NEQ_OQ>(flags.0, _mm512_set1_ps(0.0)) };
        };
        // SAFETY: see the impl comment; `flags` is 16 readable bytes (a `bool` is one byte, 0 or
        // 1), exactly what the unaligned 128-bit load reads.
        unsafe {
            let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(flags.as_ptr().cast()));
            _mm512_test_epi32_mask(bytes, bytes)
        }
    }
    #[inline(always)]
    fn max_where(self, m: __mmask16, b: Self) -> Self {
        // SAFETY: see the impl comment.
        Avx512(unsafe { _mm512_mask_max_ps(self.0, m, self.0, b.0) })
    }
    #[inline(always)]
    fn min_where(self, m: __mmask16, b: Self) -> Self {
        // SAFETY: see the impl comment.
        Avx512(unsafe { _mm512_mask_min_ps(self.0, m, self.0, b.0) })
    }
    #[inline(always)]
    fn allowed_bits(words: &MaskWords, offset: usize) -> __mmask16 {
        // `offset` is a multiple of 16: one word is the whole opmask.
        mask_word(words, offset)
    }
    #[inline(always)]
    fn select_where(m: __mmask16, t: Self, f: Self) -> Self {
        // SAFETY: see the impl comment.
        Avx512(unsafe { _mm512_mask_blend_ps(m, f.0, t.0) })
    }
    #[inline(always)]
    fn gather_column(s: &[f32], stride: usize, j: usize) -> Self {
        match column_offsets(s.len(), stride, j) {
            // SAFETY: see the impl comment; every offset `i * stride + j` (i < 16) is below
            // `s.len()` (checked by `column_offsets`), so all 16 lanes read inside `s`.
            Some(offsets) => Avx512(unsafe { _mm512_i32gather_ps::<4>(offsets, s.as_ptr()) }),
            None => crate::vector::gather_column_lanes(s, stride, j),
        }
    }
    #[inline(always)]
    fn scatter_column_where(self, keep: Self, s: &mut [f32], stride: usize, j: usize) {
        match column_offsets(s.len(), stride, j) {
            // SAFETY: see the impl comment; every offset `i * stride + j` (i < 16) is below
            // `s.len()` (checked by `column_offsets`), so every lane the mask keeps writes inside
            // `s`, and the offsets are distinct (`stride > j >= 0`).
            Some(offsets) => unsafe {
                let mask = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(keep.0, _mm512_set1_ps(1.0));
                _mm512_mask_i32scatter_ps::<4>(s.as_mut_ptr(), mask, offsets, self.0);
            },
            None => crate::vector::scatter_column_lanes(self, keep, s, stride, j),
        }
    }
    #[inline(always)]
    fn splat(x: f32) -> Self {
        // SAFETY: see the impl comment.
        Avx512(unsafe { _mm512_set1_ps(x) })
    }
    #[inline(always)]
    fn to_array(self) -> [f32; 16] {
        let mut a = [0.0; 16];
        self.store(&mut a);
        a
    }
    #[inline(always)]
    fn add(self, b: Self) -> Self {
        // SAFETY: see the impl comment.
        Avx512(unsafe { _mm512_add_ps(self.0, b.0) })
    }
    #[inline(always)]
    fn sub(self, b: Self) -> Self {
        // SAFETY: see the impl comment.
        Avx512(unsafe { _mm512_sub_ps(self.0, b.0) })
    }
    #[inline(always)]
    fn mul(self, b: Self) -> Self {
        // SAFETY: see the impl comment.
        Avx512(unsafe { _mm512_mul_ps(self.0, b.0) })
    }
    #[inline(always)]
    fn div(self, b: Self) -> Self {
        // SAFETY: see the impl comment.
        Avx512(unsafe { _mm512_div_ps(self.0, b.0) })
    }
    #[inline(always)]
    fn mul_add(self, b: Self, c: Self) -> Self {
        // SAFETY: see the impl comment.
        Avx512(unsafe { _mm512_fmadd_ps(self.0, b.0, c.0) })
    }
    #[inline(always)]
    fn max(self, b: Self) -> Self {
        // SAFETY: see the impl comment.
        Avx512(unsafe { _mm512_max_ps(self.0, b.0) })
    }
    #[inline(always)]
    fn min(self, b: Self) -> Self {
        // SAFETY: see the impl comment.
        Avx512(unsafe { _mm512_min_ps(self.0, b.0) })
    }
    #[inline(always)]
    fn select_lt(self, b: Self, t: Self, f: Self) -> Self {
        // The negated compare (`!(self < b)`, true for NaN) picks `f`: the same lanes, and the
        // mask can zero or merge the operation producing `f` directly, with no `knotw` (which
        // takes a vector port) when `t` is zero, as in the exp's cutoff and pass 3.
        // SAFETY: see the impl comment.
        Avx512(unsafe {
            _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_NLT_UQ>(self.0, b.0), t.0, f.0)
        })
    }
    #[inline(always)]
    fn select_eq(self, b: Self, t: Self, f: Self) -> Self {
        // SAFETY: see the impl comment.
        Avx512(unsafe {
            _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_EQ_OQ>(self.0, b.0), f.0, t.0)
        })
    }
    #[inline(always)]
    fn shift_into_exponent(self) -> Self {
        // SAFETY: see the impl comment.
        Avx512(unsafe { _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_castps_si512(self.0))) })
    }
    // Horizontal reductions in registers, as trees: once or twice per row each, and a scalar
    // loop over 16 lanes was a large part of the cost of a short row.
    #[inline(always)]
    fn reduce_max(self) -> f32 {
        // SAFETY: see the impl comment.
        unsafe { _mm512_reduce_max_ps(self.0) }
    }
    #[inline(always)]
    fn reduce_min(self) -> f32 {
        // SAFETY: see the impl comment.
        unsafe { _mm512_reduce_min_ps(self.0) }
    }
    #[inline(always)]
    fn reduce_sum(self) -> f64 {
        // SAFETY: see the impl comment; the two halves are widened to f64 exactly.
        unsafe {
            let low = _mm512_cvtps_pd(_mm512_castps512_ps256(self.0));
            let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(self.0)));
            _mm512_reduce_add_pd(_mm512_add_pd(low, _mm512_cvtps_pd(high)))
        }
    }
}

/// The element offsets `i * stride + j` of lanes `i = 0..16`, if all of them lie below `len`
/// and fit in an i32 (checked by [`crate::vector::column_fits`]).
#[inline(always)]
fn column_offsets(len: usize, stride: usize, j: usize) -> Option<__m512i> {
    let (stride, j) = crate::vector::column_fits(len, stride, j, 16)?;
    // SAFETY: see the impl comment; integer arithmetic on registers only.
    Some(unsafe {
        let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let rows = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(stride));
        _mm512_add_epi32(rows, _mm512_set1_epi32(j))
    })
}

row_kernels!(Avx512, "avx512f");

/// The batch kernel compiled for AVX-512F.
///
/// # Safety
/// The CPU must support AVX-512F, and the OS must save zmm and opmask registers.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn run(
    job: &Job<'_>,
    targets: Targets<'_>,
    buffers: Buffers<'_>,
    outputs: Outputs<'_>,
) -> Totals {
    // The class mask as bits, one opmask per 16 classes, built once per call: a 4 KiB stack
    // buffer, reserved only with a mask, and only here (the x86 hosts that run this backend have
    // the stack for it; microcontrollers never reach it).
    let mut words;
    let job = match job.class_mask {
        Some(mask) if mask.len() <= MASK_CLASSES => {
            words = [0_u16; MASK_CLASSES / 16];
            for (word, flags) in words.iter_mut().zip(mask.chunks(16)) {
                *word = Avx512::allowed(flags);
            }
            let whole = mask.len() - mask.len() % 16;
            let class_bits = Some(MaskBits {
                words: &words,
                whole_allowed: mask.iter().take(whole).filter(|&&ok| ok).count() as u64,
            });
            Job { class_bits, ..*job }
        }
        _ => *job,
    };
    kernel::run::<Avx512>(&job, targets, buffers, outputs)
}
