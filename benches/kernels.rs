//! Criterion benchmarks of the fused label-smoothed cross-entropy kernels.
//!
//! One group per shape `[N×K]` (named `256x10`, `128x1000`, `16x32000`, `4x128256`,
//! `1x16777216`), every function with `Throughput::Elements(N * K)`, and two narrow groups
//! (`256x32`, the widest rows the narrow kernel takes, and `256x33`, the row kernel) with
//! `memcpy`, `forward_backward` and the reference only:
//!
//! - `memcpy`: `copy_from_slice` of the `N * K` f32, the bytes a fused forward + backward moves
//!   (read the logits, write the gradient): the yardstick every kernel is read against.
//! - `forward/<backend>`, `forward_backward/<backend>`, `forward_backward_in_place/<backend>`
//!   for `auto` and for each backend this CPU runs (`portable`, `avx2`, `avx512`).
//! - `forward/reference`, `forward_backward/reference`: the scalar f64 reference, on every shape
//!   (10 flat samples on the big ones, where one call takes a tenth of a second or more).
//!
//! Inputs are realistic and fixed: logits are normal with standard deviation 3 from a seeded
//! PRNG, targets uniform over the classes, label smoothing `Uniform(0.1)`, `Reduction::Mean`.
//! Every buffer is allocated and written once before any timing.
//!
//! Run everything with `cargo bench --bench kernels` (about 6 minutes on a 2-core machine), or
//! filter with criterion's usual regex, e.g. `cargo bench --bench kernels -- 16x32000` or
//! `cargo bench --bench kernels -- 'forward_backward/(avx512|reference)'`. Summarise the results
//! with `python3 scripts/bench_ratios.py`.

mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, SamplingMode,
    Throughput,
};
use smoothce::{reference, Backend, CrossEntropy, Reduction, Smoothing};

use common::SplitMix64;

/// The benchmarked shapes `(N, K)`.
const SHAPES: [(usize, usize); 5] = [
    (256, 10),
    (128, 1000),
    (16, 32_000),
    (4, 128_256),
    (1, 16_777_216),
];

/// Narrow rows on either side of the narrow kernel's limit (32 classes: one row per SIMD lane;
/// 33: the row kernel), `forward_backward` only, to show where the narrow kernel stops paying.
const NARROW_SHAPES: [(usize, usize); 2] = [(256, 32), (256, 33)];

/// Shapes of more elements than this are measured with flat sampling and 10 samples (one
/// iteration takes tens of milliseconds there).
const BIG: usize = 4 * 1024 * 1024;

/// The in-place benchmark cycles through as many pre-filled copies of the logits as fit in this
/// many bytes (at most [`IN_PLACE_MAX_COPIES`]), so that the clock is read once per few calls on
/// the smallest shape while the copies stay in L1.
const IN_PLACE_RING_BYTES: usize = 32 * 1024;

/// See [`IN_PLACE_RING_BYTES`].
const IN_PLACE_MAX_COPIES: usize = 4;

/// Standard deviation of the generated logits.
const LOGIT_STD: f64 = 3.0;

/// The inputs and outputs of one shape, allocated and written once.
struct Data {
    logits: Vec<f32>,
    targets: Vec<u32>,
    losses: Vec<f32>,
    /// The gradient of `forward_backward`, and the destination of `memcpy`.
    grad: Vec<f32>,
    /// Working copies for `forward_backward_in_place`, refilled from `logits` outside the timing.
    work: Vec<Vec<f32>>,
}

impl Data {
    fn new(rows: usize, classes: usize) -> Self {
        let len = rows * classes;
        let mut rng = SplitMix64(0x5EED_0000 ^ len as u64);
        let mut logits = Vec::with_capacity(len);
        while logits.len() < len {
            let (a, b) = rng.normal_pair();
            logits.push((a * LOGIT_STD) as f32);
            if logits.len() < len {
                logits.push((b * LOGIT_STD) as f32);
            }
        }
        let targets = (0..rows).map(|_| rng.below(classes)).collect();
        // Written with non-zero values (a copy of the logits), so every page is touched and no
        // buffer holds zeros before the first timed call.
        let copies = (IN_PLACE_RING_BYTES / (len * 4)).clamp(1, IN_PLACE_MAX_COPIES);
        Data {
            grad: logits.clone(),
            work: vec![logits.clone(); copies],
            losses: vec![1.0; rows],
            logits,
            targets,
        }
    }
}

/// `"auto"`, `"portable"`, `"avx2"`, `"avx512"`.
fn backend_name(backend: Backend) -> String {
    format!("{backend:?}").to_lowercase()
}

fn kernels(c: &mut Criterion) {
    let smoothing = Smoothing::Uniform(0.1);
    let backends: Vec<Backend> = Backend::ALL
        .into_iter()
        .filter(|b| b.is_available())
        .collect();
    for (rows, classes) in SHAPES {
        let len = rows * classes;
        let mut group = c.benchmark_group(format!("{rows}x{classes}"));
        group.throughput(Throughput::Elements(len as u64));
        if len > BIG {
            group.sampling_mode(SamplingMode::Flat).sample_size(10);
        } else {
            group.sample_size(50);
        }
        let mut data = Data::new(rows, classes);

        memcpy(&mut group, &mut data);
        for &backend in &backends {
            let ce = CrossEntropy::new(classes)
                .smoothing(smoothing)
                .reduction(Reduction::Mean)
                .backend(backend);
            let name = backend_name(backend);
            // Fail loudly before timing if the arguments were rejected: an `Err` returns early
            // and would time nothing.
            ce.forward_backward(
                &data.logits,
                &data.targets,
                &mut data.losses,
                &mut data.grad,
            )
            .expect("valid arguments");
            forward(&mut group, &mut data, &ce, &name);
            forward_backward(&mut group, &mut data, &ce, &name);
            forward_backward_in_place(&mut group, &mut data, &ce, &name);
        }
        let ce = CrossEntropy::new(classes)
            .smoothing(smoothing)
            .reduction(Reduction::Mean);
        if len > 100_000 {
            // Milliseconds or more per call: 10 samples are plenty for a ratio.
            group.sampling_mode(SamplingMode::Flat).sample_size(10);
        }
        reference_benches(&mut group, &mut data, &ce);
        group.finish();
    }
}

/// The groups of [`NARROW_SHAPES`]: memcpy, `forward_backward` on every backend, the reference.
fn narrow(c: &mut Criterion) {
    let smoothing = Smoothing::Uniform(0.1);
    for (rows, classes) in NARROW_SHAPES {
        let mut group = c.benchmark_group(format!("{rows}x{classes}"));
        group
            .throughput(Throughput::Elements((rows * classes) as u64))
            .sample_size(50);
        let mut data = Data::new(rows, classes);
        memcpy(&mut group, &mut data);
        for backend in Backend::ALL.into_iter().filter(|b| b.is_available()) {
            let ce = CrossEntropy::new(classes)
                .smoothing(smoothing)
                .backend(backend);
            forward_backward(&mut group, &mut data, &ce, &backend_name(backend));
        }
        let ce = CrossEntropy::new(classes).smoothing(smoothing);
        reference_benches(&mut group, &mut data, &ce);
        group.finish();
    }
}

fn memcpy(group: &mut BenchmarkGroup<'_, WallTime>, data: &mut Data) {
    let Data { logits, grad, .. } = data;
    group.bench_function("memcpy", |b| {
        b.iter(|| {
            grad.copy_from_slice(black_box(logits.as_slice()));
            black_box(grad.as_mut_slice());
        });
    });
}

fn forward(
    group: &mut BenchmarkGroup<'_, WallTime>,
    data: &mut Data,
    ce: &CrossEntropy,
    name: &str,
) {
    let Data {
        logits,
        targets,
        losses,
        ..
    } = data;
    group.bench_function(BenchmarkId::new("forward", name), |b| {
        b.iter(|| {
            black_box(
                ce.forward(black_box(logits.as_slice()), targets, losses)
                    .expect("valid arguments"),
            )
        });
    });
}

fn forward_backward(
    group: &mut BenchmarkGroup<'_, WallTime>,
    data: &mut Data,
    ce: &CrossEntropy,
    name: &str,
) {
    let Data {
        logits,
        targets,
        losses,
        grad,
        ..
    } = data;
    group.bench_function(BenchmarkId::new("forward_backward", name), |b| {
        b.iter(|| {
            let loss = ce
                .forward_backward(black_box(logits.as_slice()), targets, losses, grad)
                .expect("valid arguments");
            black_box(grad.as_mut_slice());
            black_box(loss)
        });
    });
}

/// The kernel overwrites its input, so every call needs fresh logits. Restoring them inside the
/// timed region would add a memcpy of the same size to the figure, and `iter_batched_ref` would
/// allocate a fresh clone per call and (for small inputs) batch many of them, so the kernel would
/// read cold buffers the other benchmarks never see. Instead `iter_custom` refills a small ring of
/// pre-allocated copies with `copy_from_slice` outside the clock, then times only the kernel calls
/// on them. The ring holds several copies only on the smallest shape (at most 32 KiB in all, so
/// they stay in L1 like the other benchmarks' buffers), where one clock read per call would be a
/// few percent of the call; elsewhere it is one buffer and one clock read per call.
fn forward_backward_in_place(
    group: &mut BenchmarkGroup<'_, WallTime>,
    data: &mut Data,
    ce: &CrossEntropy,
    name: &str,
) {
    let Data {
        logits,
        targets,
        losses,
        work,
        ..
    } = data;
    group.bench_function(BenchmarkId::new("forward_backward_in_place", name), |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let batch = left.min(work.len() as u64);
                let ring = &mut work[..batch as usize];
                for copy in ring.iter_mut() {
                    copy.copy_from_slice(logits);
                }
                let start = Instant::now();
                for copy in ring.iter_mut() {
                    let loss = ce
                        .forward_backward_in_place(black_box(copy.as_mut_slice()), targets, losses)
                        .expect("valid arguments");
                    black_box(loss);
                }
                timed += start.elapsed();
                left -= batch;
            }
            timed
        });
    });
}

fn reference_benches(group: &mut BenchmarkGroup<'_, WallTime>, data: &mut Data, ce: &CrossEntropy) {
    let Data {
        logits,
        targets,
        losses,
        grad,
        ..
    } = data;
    group.bench_function(BenchmarkId::new("forward", "reference"), |b| {
        b.iter(|| {
            black_box(
                reference::forward(ce, black_box(logits.as_slice()), targets, losses)
                    .expect("valid arguments"),
            )
        });
    });
    group.bench_function(BenchmarkId::new("forward_backward", "reference"), |b| {
        b.iter(|| {
            let loss = reference::forward_backward(
                ce,
                black_box(logits.as_slice()),
                targets,
                losses,
                grad,
            )
            .expect("valid arguments");
            black_box(grad.as_mut_slice());
            black_box(loss)
        });
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = kernels, narrow
}
criterion_main!(benches);
