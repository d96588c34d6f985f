//! The crate-private vector abstraction that the generic kernel is written against.
//!
//! Each backend (portable `wide`, AVX2+FMA, AVX-512F) implements [`Vector`] for one register type;
//! the algorithm in [`crate::kernel`] and the exp in [`crate::exp`] are written once over it. Loads
//! and stores go through fixed-size arrays produced by [`Vector::split`], so the generic code does
//! no indexing and no pointer arithmetic.

/// Work for [`Vector::outline`]: a loop with everything it needs, run by value.
pub(crate) trait Task<V> {
    /// What the work gives back.
    type Output;
    /// Does the work (inlined into the function that [`Vector::outline`] makes).
    fn run(self) -> Self::Output;
}

/// A register of `LANES` f32 values.
///
/// The x86 implementations are only valid to call inside functions compiled with their target
/// features enabled; their types are private to their backend module, which guarantees that.
pub(crate) trait Vector: Copy {
    /// Runs `task` in a function of its own, never inlined, compiled with this backend's target
    /// features. The kernel's loops go through it ([`crate::kernel`]'s loop drivers), so that each
    /// instantiated loop is one function: inlined together into a row kernel, they made functions
    /// of hundreds of kilobytes of machine code that kept the optimiser busy for minutes per
    /// build. A call per pass over a row costs nanoseconds.
    fn outline<T: Task<Self>>(task: T) -> T::Output;

    /// Number of f32 lanes.
    const LANES: usize;
    /// A per-lane predicate: an opmask on AVX-512, a vector of all-ones or all-zeros lanes
    /// elsewhere.
    type Mask: Copy;
    /// `[f32; LANES]`.
    type Array: Copy + AsRef<[f32]> + AsMut<[f32]>;

    /// Splits a slice into whole vectors and a tail shorter than `LANES`.
    fn split(s: &[f32]) -> (&[Self::Array], &[f32]);
    /// Splits a mutable slice into whole vectors and a tail shorter than `LANES`.
    fn split_mut(s: &mut [f32]) -> (&mut [Self::Array], &mut [f32]);
    /// Loads a whole vector.
    fn load(a: &Self::Array) -> Self;
    /// Stores a whole vector.
    fn store(self, a: &mut Self::Array);
    /// Loads `tail` (shorter than `LANES`) into the low lanes; the other lanes are `fill`.
    fn load_tail(tail: &[f32], fill: f32) -> Self;
    /// Stores the low `tail.len()` lanes (fewer than `LANES`) into `tail`.
    fn store_tail(self, tail: &mut [f32]);
    /// All lanes `x`.
    fn splat(x: f32) -> Self;

    /// Rows of up to this many elements take the reload strategy for forward+backward (three
    /// passes, one exp per element), longer ones the recompute strategy (statistics block by
    /// block, then one gradient pass; two exps per element). Measured on the reference machine
    /// (BENCHMARKS.md, "Strategy switch"): where exps are dear (AVX2, and the portable backend's
    /// 128-bit vectors) reloading wins up to 2^22 elements; at 2^23 and beyond recomputing (with
    /// non-temporal stores) wins everywhere.
    const RELOAD_MAX: usize = 1 << 22;

    /// The alignment, in bytes, that [`Vector::stream`] needs to bypass the caches (4, an f32's:
    /// the backend has no such store).
    const STREAM_ALIGN: usize = 4;
    /// Stores a whole vector with a non-temporal store (no read for ownership, no cache
    /// pollution) if the backend has one and `a` is aligned for it; a plain store otherwise.
    #[inline(always)]
    fn stream(self, a: &mut Self::Array) {
        self.store(a);
    }
    /// Orders the non-temporal stores made so far before any later store (`sfence`).
    #[inline(always)]
    fn stream_fence() {}
    /// Asks for the cache line at address `x` to be fetched ahead of its use (a hint: it never
    /// faults and reads nothing into the program, whatever the address; nothing by default).
    #[inline(always)]
    fn prefetch(x: *const f32) {
        let _ = x;
    }

    /// Lane `i` is `s[i * stride + j]` (0 past the end of `s`): column `j` of `LANES` rows of
    /// `stride` elements.
    #[inline(always)]
    fn gather_column(s: &[f32], stride: usize, j: usize) -> Self {
        gather_column_lanes(s, stride, j)
    }
    /// Stores lane `i` into `s[i * stride + j]` where lane `i` of `keep` is 1 (other lanes, and
    /// lanes past the end of `s`, are dropped).
    #[inline(always)]
    fn scatter_column_where(self, keep: Self, s: &mut [f32], stride: usize, j: usize) {
        scatter_column_lanes(self, keep, s, stride, j);
    }
    /// True in the lanes whose flag in `allowed` (the next `LANES` class-mask flags; lanes past
    /// its end count as disallowed) is set.
    fn allowed(allowed: &[bool]) -> Self::Mask;
    /// [`Vector::allowed`] from the class mask as bits (see [`MaskWords`]) for the `LANES`
    /// classes from `offset`, a multiple of `LANES` (which divides 16) below [`MASK_CLASSES`].
    #[inline(always)]
    fn allowed_bits(words: &MaskWords, offset: usize) -> Self::Mask {
        let word = mask_word(words, offset) >> (offset % 16);
        let mut flags = [false; 16];
        for (bit, flag) in flags.iter_mut().enumerate() {
            *flag = (word >> bit) & 1 == 1;
        }
        Self::allowed(flags.get(..Self::LANES).unwrap_or(&flags))
    }
    /// Per lane: `if m { t } else { f }`.
    fn select_where(m: Self::Mask, t: Self, f: Self) -> Self;
    /// Per lane: `if m { self.max(b) } else { self }` (one merge-masked max on AVX-512).
    #[inline(always)]
    fn max_where(self, m: Self::Mask, b: Self) -> Self {
        Self::select_where(m, self.max(b), self)
    }
    /// Per lane: `if m { self.min(b) } else { self }` (one merge-masked min on AVX-512).
    #[inline(always)]
    fn min_where(self, m: Self::Mask, b: Self) -> Self {
        Self::select_where(m, self.min(b), self)
    }
    /// The lanes as an array.
    fn to_array(self) -> Self::Array;

    /// `self + b`.
    fn add(self, b: Self) -> Self;
    /// `self - b`.
    fn sub(self, b: Self) -> Self;
    /// `self * b`.
    fn mul(self, b: Self) -> Self;
    /// `self / b`.
    fn div(self, b: Self) -> Self;
    /// `self * b + c`, fused where the instruction set has FMA.
    fn mul_add(self, b: Self, c: Self) -> Self;
    /// Lane-wise maximum; which operand a NaN lane yields is backend-defined (the kernel detects
    /// NaN separately).
    fn max(self, b: Self) -> Self;
    /// Lane-wise minimum; NaN handling as for [`Vector::max`].
    fn min(self, b: Self) -> Self;
    /// Per lane: `if self < b { t } else { f }` (false for NaN).
    fn select_lt(self, b: Self, t: Self, f: Self) -> Self;
    /// Per lane: `if self == b { t } else { f }` (false for NaN).
    fn select_eq(self, b: Self, t: Self, f: Self) -> Self;
    /// Reinterprets the lanes as i32, shifts them left by 23 bits, and reinterprets back: turns the
    /// low bits of a magic-biased integer into the float `2^n`.
    fn shift_into_exponent(self) -> Self;

    /// The largest lane (a NaN lane may or may not win).
    #[inline(always)]
    fn reduce_max(self) -> f32 {
        self.to_array()
            .as_ref()
            .iter()
            .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
    }

    /// The smallest lane (a NaN lane may or may not win).
    #[inline(always)]
    fn reduce_min(self) -> f32 {
        self.to_array()
            .as_ref()
            .iter()
            .fold(f32::INFINITY, |m, &x| if x < m { x } else { m })
    }

    /// The sum of the lanes, in f64, as a tree (independent additions, not a serial chain).
    #[inline(always)]
    fn reduce_sum(self) -> f64 {
        const { assert!(Self::LANES <= 16, "the tree below adds at most 16 lanes") };
        let array = self.to_array();
        let lanes = array.as_ref();
        let (low, high) = lanes.split_at(lanes.len() / 2);
        let mut pairs = [0.0_f64; 8];
        for ((pair, &a), &b) in pairs.iter_mut().zip(low).zip(high) {
            *pair = f64::from(a) + f64::from(b);
        }
        let [a, b, c, d, e, f, g, h] = pairs;
        ((a + e) + (c + g)) + ((b + f) + (d + h))
    }
}

/// `(stride, j)` as i32 if column `j` of `lanes` rows of `stride` elements lies inside a slice of
/// `len` elements with every offset `i * stride + j` (`i < lanes`) in i32: what the x86 gathers
/// and scatters check before they touch memory. Only x86_64 has those: elsewhere the default
/// [`Vector::gather_column`] and [`Vector::scatter_column_where`] walk the lanes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn column_fits(len: usize, stride: usize, j: usize, lanes: usize) -> Option<(i32, i32)> {
    let span = stride.checked_mul(lanes)?;
    if j >= stride || span > len {
        return None;
    }
    i32::try_from(span).ok()?;
    Some((i32::try_from(stride).ok()?, i32::try_from(j).ok()?))
}

/// `s[i * stride + j]` for lane `i`, 0 past the end of `s`.
#[inline(always)]
pub(crate) fn gather_column_lanes<V: Vector>(s: &[f32], stride: usize, j: usize) -> V {
    let mut lanes = V::splat(0.0).to_array();
    let mut at = Some(j);
    for lane in lanes.as_mut() {
        *lane = at.and_then(|i| s.get(i)).copied().unwrap_or(0.0);
        at = at.and_then(|i| i.checked_add(stride));
    }
    V::load(&lanes)
}

/// Stores lane `i` of `v` into `s[i * stride + j]` where lane `i` of `keep` is 1, dropping lanes
/// past the end of `s`.
#[inline(always)]
pub(crate) fn scatter_column_lanes<V: Vector>(
    v: V,
    keep: V,
    s: &mut [f32],
    stride: usize,
    j: usize,
) {
    let mut at = Some(j);
    for (&lane, &keep) in v.to_array().as_ref().iter().zip(keep.to_array().as_ref()) {
        if let Some(x) = at.and_then(|i| s.get_mut(i)).filter(|_| keep == 1.0) {
            *x = lane;
        }
        at = at.and_then(|i| i.checked_add(stride));
    }
}

/// The widest class mask a backend may turn into bits ([`MaskWords`]).
pub(crate) const MASK_CLASSES: usize = 1 << 15;

/// A class mask as bits: class `c` is bit `c % 16` of word `c / 16`, the bits past the mask
/// clear. A fixed size, so that reading a word needs no bounds check in the loops (see
/// [`mask_word`]).
pub(crate) type MaskWords = [u16; MASK_CLASSES / 16];

/// The word of `words` that holds class `offset` (below [`MASK_CLASSES`]: the wrap-around that
/// proves the read in bounds never happens).
#[inline(always)]
pub(crate) fn mask_word(words: &MaskWords, offset: usize) -> u16 {
    words.get((offset / 16) % words.len()).copied().unwrap_or(0)
}

/// The class-mask flags of the next `V::LANES` classes as 1.0 (allowed) or 0.0 lanes (0.0 past
/// the end of `allowed`).
#[inline(always)]
pub(crate) fn allowed_lanes<V: Vector>(allowed: &[bool]) -> V {
    let mut flags = V::splat(0.0).to_array();
    for (lane, &ok) in flags.as_mut().iter_mut().zip(allowed) {
        *lane = if ok { 1.0 } else { 0.0 };
    }
    V::load(&flags)
}

#[cfg(test)]
mod tests {
    use super::{MaskWords, Vector, MASK_CLASSES};
    use crate::arch::portable::Portable;

    /// `allowed_bits` (the default, which the portable and AVX2 backends keep) selects the same
    /// lanes as `allowed` over the same mask, including past its end.
    #[test]
    fn mask_bits_select_the_lanes_the_flags_select() {
        let flags: [bool; 40] = core::array::from_fn(|c| c % 3 != 1 && c % 7 != 2);
        let mut words: MaskWords = [0; MASK_CLASSES / 16];
        for (c, _) in flags.iter().enumerate().filter(|(_, &ok)| ok) {
            words[c / 16] |= 1 << (c % 16);
        }
        let (t, f) = (Portable::splat(1.0), Portable::splat(0.0));
        for offset in (0..48).step_by(Portable::LANES) {
            let rest = flags.get(offset..).unwrap_or(&[]);
            let from_bits = Portable::allowed_bits(&words, offset);
            let from_flags = Portable::allowed(rest);
            assert_eq!(
                Portable::select_where(from_bits, t, f).to_array(),
                Portable::select_where(from_flags, t, f).to_array(),
                "classes from {offset}"
            );
        }
    }
}
