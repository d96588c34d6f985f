//! Backends and their selection: the portable `wide` path everywhere, AVX2+FMA and AVX-512F on
//! x86_64, chosen once at run time (or at compile time when the target features are on).

use crate::kernel::{Buffers, Job, Outputs, Totals};
use crate::Error;
use crate::Targets;

pub(crate) mod portable;
#[cfg(target_arch = "x86_64")]
mod x86_64;

/// Which SIMD implementation runs the kernels.
///
/// [`Backend::Auto`] (the default) picks the fastest one the CPU supports, detected once per
/// process without `std` (`cpuid` and `xgetbv` on x86_64), or fixed at compile time when the
/// build's target features already include it. The others force one implementation, for tests
/// and benchmarks; all of them agree with the [`reference`](crate::reference) within the crate's
/// tolerance.
///
/// ```
/// use smoothce::Backend;
/// assert!(Backend::Portable.is_available());
/// assert!(Backend::Auto.is_available());
/// println!("this CPU runs {:?}", Backend::Auto.resolve());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Backend {
    /// The fastest available backend.
    #[default]
    Auto,
    /// `wide::f32x8`: SSE2 on x86_64 by default, NEON, wasm simd128, or scalar arrays.
    Portable,
    /// 256-bit AVX2 with FMA (x86_64 only).
    Avx2,
    /// 512-bit AVX-512F (x86_64 only).
    Avx512,
}

impl Backend {
    /// Every backend, `Auto` first.
    ///
    /// ```
    /// let usable: Vec<_> = smoothce::Backend::ALL.iter().filter(|b| b.is_available()).collect();
    /// assert!(usable.len() >= 2);
    /// ```
    pub const ALL: [Backend; 4] = [
        Backend::Auto,
        Backend::Portable,
        Backend::Avx2,
        Backend::Avx512,
    ];

    /// Whether this backend can run on this CPU and target.
    ///
    /// ```
    /// assert!(smoothce::Backend::Portable.is_available());
    /// ```
    #[must_use]
    pub fn is_available(self) -> bool {
        select(self).is_ok()
    }

    /// The concrete backend `self` stands for here (`Auto` becomes the detected one); `None` when
    /// it is unavailable.
    ///
    /// ```
    /// use smoothce::Backend;
    /// assert_eq!(Backend::Portable.resolve(), Some(Backend::Portable));
    /// assert_ne!(Backend::Auto.resolve(), Some(Backend::Auto));
    /// ```
    #[must_use]
    pub fn resolve(self) -> Option<Backend> {
        select(self).ok().map(|kernel| kernel.backend)
    }
}

type KernelFn = unsafe fn(&Job<'_>, Targets<'_>, Buffers<'_>, Outputs<'_>) -> Totals;

/// A batch kernel of a backend that this CPU supports. Only [`select`] makes one, after checking.
#[derive(Clone, Copy)]
pub(crate) struct Kernel {
    function: KernelFn,
    backend: Backend,
}

impl Kernel {
    /// Runs the batch; returns the sum of the row losses.
    pub(crate) fn run(
        self,
        job: &Job<'_>,
        targets: Targets<'_>,
        buffers: Buffers<'_>,
        outputs: Outputs<'_>,
    ) -> Totals {
        // SAFETY: `Kernel` values are only built by `select`, which hands out a
        // `#[target_feature]` function only after checking (at compile time or with cpuid and
        // xgetbv) that this CPU and OS support those features. The portable function has no
        // requirement at all.
        #[allow(unsafe_code)]
        unsafe {
            (self.function)(job, targets, buffers, outputs)
        }
    }
}

/// The kernel for `backend`, or an error when this CPU or target cannot run it.
pub(crate) fn select(backend: Backend) -> Result<Kernel, Error> {
    let portable = Kernel {
        function: portable::run,
        backend: Backend::Portable,
    };
    match backend {
        Backend::Portable => Ok(portable),
        #[cfg(target_arch = "x86_64")]
        Backend::Auto => Ok(x86_64::best().unwrap_or(portable)),
        #[cfg(not(target_arch = "x86_64"))]
        Backend::Auto => Ok(portable),
        #[cfg(target_arch = "x86_64")]
        Backend::Avx2 | Backend::Avx512 => {
            x86_64::get(backend).ok_or(Error::BackendUnavailable { backend })
        }
        #[cfg(not(target_arch = "x86_64"))]
        Backend::Avx2 | Backend::Avx512 => Err(Error::BackendUnavailable { backend }),
    }
}

#[cfg(target_arch = "x86_64")]
impl Kernel {
    fn new(function: KernelFn, backend: Backend) -> Self {
        Kernel { function, backend }
    }
}
