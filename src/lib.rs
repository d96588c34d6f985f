//! Fused, SIMD-vectorized label-smoothed softmax cross-entropy and its gradient.
//!
//! `smoothce` computes, for a batch of logit rows `[N, K]` and integer targets, the
//! label-smoothed cross-entropy loss (Szegedy et al. 2016) and its gradient with respect to the
//! logits in one fused pass per row, over slices the caller owns. It is `#![no_std]`, never
//! allocates, and never panics: bad arguments are a typed [`Error`] returned before anything is
//! written.
//!
//! ```
//! use smoothce::{CrossEntropy, Reduction, Smoothing};
//!
//! // Two rows of four classes, PyTorch's `label_smoothing=0.1`, mean over rows.
//! let ce = CrossEntropy::new(4)
//!     .smoothing(Smoothing::Uniform(0.1))
//!     .reduction(Reduction::Mean);
//! let logits = [2.0_f32, 1.0, 0.1, -1.0, 0.0, 3.0, 0.5, 0.2];
//! let targets = [0_u32, 1];
//! let mut losses = [0.0_f32; 2];
//! let mut grad = [0.0_f32; 8];
//! let loss = ce.forward_backward(&logits, &targets, &mut losses, &mut grad)?;
//! assert!(loss > 0.0);
//! // Each gradient row sums to zero.
//! assert!(grad[..4].iter().sum::<f32>().abs() < 1e-6);
//! # Ok::<(), smoothce::Error>(())
//! ```
//!
//! # Architecture
//!
//! - [`CrossEntropy`] (the public API) checks the arguments and hands the batch to a backend.
//! - [`reference`](mod@reference) is the scalar f64 oracle the kernels are tested against; it is public so that
//!   users can check the kernels too.
//! - The algorithm is written once, generic over a crate-private vector trait, and instantiated by
//!   each [`Backend`]: portable `wide` (SSE2, NEON, wasm simd128, scalar on microcontrollers),
//!   and on x86_64 AVX2+FMA and AVX-512F chosen at run time by `cpuid`, without `std`.
//! - `exp` is the crate's own (at most 2 ulp, no denormals), not a library call.
//!
//! # Smoothing conventions
//!
//! [`Smoothing::Uniform`] is PyTorch's `label_smoothing` (the mass `eps` spread over all `K`
//! classes, target included); [`Smoothing::OffTarget`] keeps `1 - eps` on the target and spreads
//! `eps` over the `K - 1` others (Megatron-LM, fairseq). See [`Smoothing`].
//!
//! # Numerical contract
//!
//! See [`CrossEntropy`]: finite logits never give NaN, `-inf` logits are masked classes, NaN and
//! `+inf` make their own row NaN and nothing else, and results match the [`reference`](mod@reference) within
//! `2e-6` (relative for losses of magnitude above 1, absolute otherwise and for gradients).

#![no_std]
#![deny(unsafe_code)]

#[cfg(test)]
extern crate std;

mod arch;
mod error;
mod exp;
mod kernel;
mod ln;
mod loss;
mod narrow;
pub mod reference;
pub mod shard;
mod tanh;
mod targets;
mod vector;

pub use arch::Backend;
pub use error::Error;
pub use loss::{CrossEntropy, Extras, Reduction, Smoothing, Summary};
pub use shard::{Piece, RowState};
pub use targets::Targets;

/// The README's code blocks, compiled and run as doctests so it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
