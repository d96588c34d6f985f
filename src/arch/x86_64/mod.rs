//! x86_64: AVX2+FMA and AVX-512F backends, and their run-time detection in `no_std`.
//!
//! Detection reads `cpuid` (the instruction sets) and `xgetbv` (whether the OS saves the wider
//! registers), once per process; the answer is cached in an atomic, so concurrent first calls
//! at worst detect twice and store the same value. When the build's target features already
//! include a backend (`-C target-cpu=native` on this machine), no detection runs for it.

#![allow(unsafe_code)]

use core::sync::atomic::{AtomicU8, Ordering};

use super::{Backend, Kernel};
use crate::kernel::{Buffers, Job, Outputs, Totals};
use crate::Targets;

/// [`Vector::outline`](crate::vector::Vector::outline) for an x86 backend's vector type `$v`:
/// the task in a never-inlined function with the backend's target features.
macro_rules! outline_with_features {
    ($v:ty, $features:literal) => {
        #[inline(always)]
        fn outline<T: $crate::vector::Task<Self>>(task: T) -> T::Output {
            #[target_feature(enable = $features)]
            #[inline(never)]
            fn outlined<T: $crate::vector::Task<$v>>(task: T) -> T::Output {
                task.run()
            }
            // SAFETY: only the kernel code instantiated for this type calls this, and that code
            // only runs inside the backend's `run` (compiled with these target features, which
            // `arch::select` hands out only after detecting them) and the row kernels it calls.
            unsafe { outlined(task) }
        }
    };
}

mod avx2;
mod avx512;

const UNKNOWN: u8 = 0;
const HAS_AVX2: u8 = 1 << 1;
const HAS_AVX512: u8 = 1 << 2;
const DETECTED: u8 = 1 << 0;

static FEATURES: AtomicU8 = AtomicU8::new(UNKNOWN);

/// The kernel of `backend` (`Avx2` or `Avx512`) if this CPU runs it.
pub(super) fn get(backend: Backend) -> Option<Kernel> {
    let features = features();
    match backend {
        Backend::Avx2 if features & HAS_AVX2 != 0 => Some(Kernel::checked(Backend::Avx2)),
        Backend::Avx512 if features & HAS_AVX512 != 0 => Some(Kernel::checked(Backend::Avx512)),
        _ => None,
    }
}

/// Runs the batch on `kernel`'s x86 backend (the portable one for any other).
pub(super) fn run(
    kernel: Kernel,
    job: &Job<'_>,
    targets: Targets<'_>,
    buffers: Buffers<'_>,
    outputs: Outputs<'_>,
) -> Totals {
    match kernel.backend {
        // SAFETY: a `Kernel` for AVX2 is only made by `get`, after `features` found AVX2, FMA
        // and the OS's ymm support (at compile time or with cpuid and xgetbv).
        Backend::Avx2 => unsafe { avx2::run(job, targets, buffers, outputs) },
        // SAFETY: as above, for AVX-512F and the zmm and opmask state.
        Backend::Avx512 => unsafe { avx512::run(job, targets, buffers, outputs) },
        _ => super::portable::run(job, targets, buffers, outputs),
    }
}

/// The fastest x86 kernel this CPU runs, if any.
pub(super) fn best() -> Option<Kernel> {
    get(Backend::Avx512).or_else(|| get(Backend::Avx2))
}

fn features() -> u8 {
    let compiled = compiled_features();
    if compiled == DETECTED | HAS_AVX2 | HAS_AVX512 {
        return compiled;
    }
    let cached = FEATURES.load(Ordering::Relaxed);
    if cached != UNKNOWN {
        return cached;
    }
    let detected = compiled | detect();
    FEATURES.store(detected, Ordering::Relaxed);
    detected
}

/// What the build's target features guarantee without asking the CPU.
const fn compiled_features() -> u8 {
    let mut f = DETECTED;
    if cfg!(all(target_feature = "avx2", target_feature = "fma")) {
        f |= HAS_AVX2;
    }
    if cfg!(target_feature = "avx512f") {
        f |= HAS_AVX512;
    }
    f
}

// `__cpuid_count` is an `unsafe fn` before Rust 1.94 and safe after: allow both.
#[allow(unused_unsafe)]
fn detect() -> u8 {
    use core::arch::x86_64::__cpuid_count;
    // SAFETY: `cpuid` exists on every x86_64 CPU.
    let max_leaf = unsafe { __cpuid_count(0, 0) }.eax;
    if max_leaf < 7 {
        return DETECTED;
    }
    // SAFETY: as above; leaves 1 and 7 exist since max_leaf >= 7.
    let leaf1 = unsafe { __cpuid_count(1, 0) };
    // SAFETY: as above.
    let leaf7 = unsafe { __cpuid_count(7, 0) };
    let osxsave = leaf1.ecx & (1 << 27) != 0;
    let avx = leaf1.ecx & (1 << 28) != 0;
    let fma = leaf1.ecx & (1 << 12) != 0;
    let avx2 = leaf7.ebx & (1 << 5) != 0;
    let avx512f = leaf7.ebx & (1 << 16) != 0;
    if !osxsave {
        return DETECTED;
    }
    // SAFETY: OSXSAVE is set, so the OS enabled XSAVE and `xgetbv` is available.
    let xcr0 = unsafe { xgetbv0() };
    // XMM and YMM state (bits 1, 2); for AVX-512 also opmask, ZMM_Hi256 and Hi16_ZMM (5, 6, 7).
    let ymm_saved = xcr0 & 0b110 == 0b110;
    let zmm_saved = xcr0 & 0b1110_0110 == 0b1110_0110;
    let mut f = DETECTED;
    if avx && avx2 && fma && ymm_saved {
        f |= HAS_AVX2;
        if avx512f && zmm_saved {
            f |= HAS_AVX512;
        }
    }
    f
}

/// Reads XCR0.
///
/// # Safety
/// The CPU must support XSAVE and the OS must have enabled it (CPUID.1:ECX.OSXSAVE).
#[target_feature(enable = "xsave")]
unsafe fn xgetbv0() -> u64 {
    // SAFETY: the caller guarantees OSXSAVE.
    unsafe { core::arch::x86_64::_xgetbv(0) }
}
