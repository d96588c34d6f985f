//! Backends and their selection: the portable `wide` path everywhere, AVX2+FMA and AVX-512F on
//! x86_64, chosen once at run time (or at compile time when the target features are on).

use crate::kernel::{Buffers, Job, Outputs, Totals};
use crate::Error;
use crate::Targets;

/// Implements [`RowKernels`](crate::kernel::RowKernels) for a backend's vector type: each row
/// kernel becomes one out-of-line function compiled with the backend's target features (none for
/// the portable backend).
macro_rules! row_kernels {
    // The portable backend: an out-of-line call.
    (@fn () $name:ident = $body:path, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        #[inline(never)]
        fn $name($($arg: $ty),*) -> $ret {
            $body($($arg),*)
        }
    };
    // An x86 backend: an out-of-line function with the backend's target features.
    (@fn ($features:literal) $name:ident = $body:path, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        #[inline]
        fn $name($($arg: $ty),*) -> $ret {
            #[target_feature(enable = $features)]
            fn inner($($arg: $ty),*) -> $ret {
                $body($($arg),*)
            }
            // SAFETY: see the impl comment.
            unsafe { inner($($arg),*) }
        }
    };
    ($v:ty $(, $features:literal)?) => {
        // SAFETY (every `unsafe` call the arms below generate): the vector type is private to its
        // backend module and its values only exist inside that backend's `run`, a function with
        // the same target features that `arch::select` hands out only after detecting them;
        // these functions are only reached from there.
        impl $crate::kernel::RowKernels for $v {
            row_kernels!(@fn ($($features)?) stats = $crate::kernel::stats_inline::<$v>,
                (z: &[f32], next: $crate::kernel::Ahead, transform: $crate::kernel::Transform,
                 aux: Option<&[f32]>, mask: Option<&[bool]>) -> $crate::kernel::Stats);
            row_kernels!(@fn ($($features)?) narrow_group = $crate::narrow::narrow_group::<$v>,
                (job: &$crate::kernel::Job<'_>, targets: &$crate::Targets<'_>,
                 group: &mut $crate::narrow::Group<'_>, first_row: usize,
                 results: &mut $crate::narrow::GroupResults) -> ());
            row_kernels!(@fn ($($features)?) gradient_row = $crate::kernel::gradient_row::<$v>,
                (job: &$crate::kernel::Job<'_>, io: $crate::kernel::Io<'_>,
                 target: Option<$crate::kernel::RowTarget<'_>>, row: usize,
                 next: $crate::kernel::Ahead) -> $crate::kernel::RowResult);
            row_kernels!(@fn ($($features)?) piece_gradient = $crate::kernel::piece_gradient::<$v>,
                (job: &$crate::kernel::Job<'_>, io: $crate::kernel::Io<'_>,
                 piece: $crate::shard::Piece, target: Option<$crate::kernel::RowTarget<'_>>,
                 state: &$crate::shard::RowState, own: Option<&$crate::shard::RowState>,
                 row: usize) -> ());
            row_kernels!(@fn ($($features)?) piece_exps = $crate::kernel::piece_exps::<$v>,
                (job: &$crate::kernel::Job<'_>, io: $crate::kernel::Io<'_>,
                 piece: $crate::shard::Piece, target: Option<$crate::kernel::RowTarget<'_>>,
                 next: $crate::kernel::Ahead) -> $crate::shard::RowState);
        }
    };
}

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

/// A backend that this CPU supports. Only [`select`] makes one, after checking. (A backend tag,
/// not a function pointer: calls stay direct, so the optimiser, and the host `no_panic` check,
/// can see through them.)
#[derive(Clone, Copy)]
pub(crate) struct Kernel {
    backend: Backend,
}

impl Kernel {
    /// Runs the batch; returns the sums of the row results.
    pub(crate) fn run(
        self,
        job: &Job<'_>,
        targets: Targets<'_>,
        buffers: Buffers<'_>,
        outputs: Outputs<'_>,
    ) -> Totals {
        match self.backend {
            #[cfg(target_arch = "x86_64")]
            Backend::Avx2 | Backend::Avx512 => x86_64::run(self, job, targets, buffers, outputs),
            _ => portable::run(job, targets, buffers, outputs),
        }
    }
}

/// The kernel for `backend`, or an error when this CPU or target cannot run it.
pub(crate) fn select(backend: Backend) -> Result<Kernel, Error> {
    let portable = Kernel {
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
    /// Only for backends this CPU was found to support (see `x86_64::get`).
    fn checked(backend: Backend) -> Self {
        Kernel { backend }
    }
}
