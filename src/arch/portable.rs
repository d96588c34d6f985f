//! The portable backend: `wide::f32x8`, whatever instructions the build's target features give
//! (SSE2 on a default x86_64 build, NEON on aarch64, simd128 on wasm32 with `+simd128`, plain
//! arrays on microcontrollers). Safe code only.

use wide::f32x8;

use crate::kernel::{self, Buffers, Job, Outputs, Totals};
use crate::vector::{Task, Vector};
use crate::Targets;

/// Eight f32 lanes from `wide`.
#[derive(Clone, Copy)]
pub(crate) struct Portable(f32x8);

impl Vector for Portable {
    const LANES: usize = 8;
    type Array = [f32; 8];
    type Mask = f32x8;

    #[inline(never)]
    fn outline<T: Task<Self>>(task: T) -> T::Output {
        task.run()
    }
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
        Portable(f32x8::new(*a))
    }
    #[inline(always)]
    fn store(self, a: &mut [f32; 8]) {
        *a = self.0.to_array();
    }
    #[inline(always)]
    fn load_tail(tail: &[f32], fill: f32) -> Self {
        let mut lanes = [fill; 8];
        for (lane, &x) in lanes.iter_mut().zip(tail) {
            *lane = x;
        }
        Portable(f32x8::new(lanes))
    }
    #[inline(always)]
    fn store_tail(self, tail: &mut [f32]) {
        for (x, lane) in tail.iter_mut().zip(self.0.to_array()) {
            *x = lane;
        }
    }
    #[inline(always)]
    fn allowed(allowed: &[bool]) -> f32x8 {
        crate::vector::allowed_lanes::<Self>(allowed)
            .0
            .simd_ne(f32x8::ZERO)
    }
    #[inline(always)]
    fn select_where(m: f32x8, t: Self, f: Self) -> Self {
        Portable(m.select(t.0, f.0))
    }
    #[inline(always)]
    fn splat(x: f32) -> Self {
        Portable(f32x8::splat(x))
    }
    #[inline(always)]
    fn to_array(self) -> [f32; 8] {
        self.0.to_array()
    }
    #[inline(always)]
    fn add(self, b: Self) -> Self {
        Portable(self.0 + b.0)
    }
    #[inline(always)]
    fn sub(self, b: Self) -> Self {
        Portable(self.0 - b.0)
    }
    #[inline(always)]
    fn mul(self, b: Self) -> Self {
        Portable(self.0 * b.0)
    }
    #[inline(always)]
    fn div(self, b: Self) -> Self {
        Portable(self.0 / b.0)
    }
    #[inline(always)]
    fn mul_add(self, b: Self, c: Self) -> Self {
        Portable(self.0.mul_add(b.0, c.0))
    }
    #[inline(always)]
    fn max(self, b: Self) -> Self {
        Portable(self.0.fast_max(b.0))
    }
    #[inline(always)]
    fn min(self, b: Self) -> Self {
        Portable(self.0.fast_min(b.0))
    }
    #[inline(always)]
    fn select_lt(self, b: Self, t: Self, f: Self) -> Self {
        Portable(self.0.simd_lt(b.0).select(t.0, f.0))
    }
    #[inline(always)]
    fn select_eq(self, b: Self, t: Self, f: Self) -> Self {
        Portable(self.0.simd_eq(b.0).select(t.0, f.0))
    }
    #[inline(always)]
    fn shift_into_exponent(self) -> Self {
        Portable(f32x8::from_bits(self.0.to_bits() << 23_u32))
    }
}

row_kernels!(Portable);

/// The batch kernel on the portable backend.
pub(crate) fn run(
    job: &Job<'_>,
    targets: Targets<'_>,
    buffers: Buffers<'_>,
    outputs: Outputs<'_>,
) -> Totals {
    kernel::run::<Portable>(job, targets, buffers, outputs)
}
