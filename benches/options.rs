//! Criterion benchmarks of what the loss options and the vocabulary-piece API cost, on top of the
//! plain fused forward + backward, all with `Backend::Auto`.
//!
//! Every function has `Throughput::Elements(N * K)`, and every group a `memcpy` (`copy_from_slice`
//! of the `N * K` f32, the bytes a fused forward + backward moves) as its yardstick.
//!
//! # `options_128x1000`, `options_16x32000`
//!
//! - `fb/plain`: `forward_backward` with `Smoothing::Uniform(0.1)`, `Reduction::Mean`, nothing
//!   else; `fb/plain_with`: the same through `forward_backward_with` with no extras (the generic
//!   entry point should cost nothing).
//! - One option alone on top of `fb/plain`: `fb/class_weights` (PyTorch's per-class `weight=`,
//!   random in `[0.5, 2]`), `fb/target_weights` (Keras' `sample_weight` from the target's class,
//!   same weights), `fb/z_loss` (`1e-4`), `fb/softcap` (`30`), `fb/logit_scale` (`0.7`),
//!   `fb/class_mask` (every 7th class disallowed), `fb/soft_targets` (a random probability row
//!   per sample, `Targets::Soft`), `fb/extras` (the per-row lse and correctness outputs),
//!   `fb/ignore_index` (`ignore_index_signed(-100)` with `i64` targets, every 10th row ignored),
//!   `fb/upstream` (an upstream gradient of `0.5`).
//! - `fb/all`: every option that combines with the others at once: class weights, z-loss, logit
//!   scale, class mask, ignore index `-100` with `i64` targets, upstream gradient, and the lse,
//!   z-loss and correctness extras. Not in it: per-target weights (they replace the per-class
//!   ones: one weight mode per loss), soft targets (they reject class weights and an ignore
//!   index), and the soft-cap, which `fb/all_softcap` adds to `fb/all`.
//!
//! # `pieces_16x32000`, `pieces_4x128256`
//!
//! The rows split into vocabulary pieces, as a tensor-parallel or chunked user holds them: the
//! logits are stored piece-major (each piece's `[N, width]` block contiguous, laid out before any
//! timing), and so is the gradient.
//!
//! - `fb/unsplit`: plain `forward_backward` of the row-major logits.
//! - `fb/pieces8`: 8 equal pieces (the last takes the remainder): `piece_states` of every piece
//!   into its own state array, `RowState::merge` of the 8 arrays (what an all-reduce would do),
//!   `finish_states` for the losses, then `piece_backward` of every piece into its gradient block.
//! - `fb/pieces8_in_place`: the same with `piece_backward_in_place`; the overwritten logits are
//!   refilled outside the clock (`iter_custom`), as `kernels.rs` does for its in-place benchmark.
//! - `fb/pieces1`: the same steps with a single piece covering the whole row: the per-piece API's
//!   own overhead, apart from the splitting.
//! - `fb/pieces8_exps`, `fb/pieces1_exps`: the one-exp path: `piece_states_and_exps` of every
//!   piece, storing its exps in its gradient block, the same merge and `finish_states`, then
//!   `piece_backward_from_exps` of every block.
//! - `fb/pieces8_exps_in_place`: the same with `piece_states_and_exps_in_place`, refilled like
//!   `fb/pieces8_in_place`.
//! - `fb/pieces8_exps_tiled`: `fb/pieces8_exps` done tile by tile, each tile of rows going
//!   through all three steps before the next (with `mean_denominator(N)`, so that the tiles'
//!   losses add up), a tile being as many rows as keep its logits and exps within 1 MiB (4 rows of
//!   32000, 1 of 128256): the order a caller streaming chunks on one device can choose, which
//!   keeps the exps in L2 until the backward step reads them.
//!   Each piece's first step but the last names the next piece's logits with
//!   `CrossEntropy::read_ahead`, so that its last row prefetches them; `_no_hint` is the same
//!   without it.
//! - `fb/pieces8_exps_tiled_in_place`: `fb/pieces8_exps_tiled` with
//!   `piece_states_and_exps_in_place`, refilled like `fb/pieces8_in_place`; a tile holds only the
//!   logits (their exps overwrite them), so it is twice as many rows (8 of 32000, 2 of 128256).
//! - `fb/unsplit_in_place`: `forward_backward_in_place`, refilled the same way: the yardstick of
//!   the three in-place split calls.
//!
//! Inputs follow `kernels.rs`: logits normal with standard deviation 3 from a seeded SplitMix64
//! (the same values as its groups of the same shape), `Smoothing::Uniform(0.1)`,
//! `Reduction::Mean`, every buffer allocated and written once before any timing, and each
//! configuration called once before timing so that a rejected argument fails loudly. Targets are
//! uniform over the classes, except that a target on a class the 7th-class mask disallows is moved
//! to a neighbouring class (a disallowed target makes the row's loss `+inf`), in every benchmark
//! alike.
//!
//! Run everything with `cargo bench --bench options` (about 3 minutes), or filter with
//! criterion's regex, e.g. `cargo bench --bench options -- pieces_`. Summarise with
//! `python3 scripts/bench_ratios.py --group '^(options|pieces)_'`.

mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, Throughput,
};
use smoothce::{
    Backend, CrossEntropy, Error, Extras, Piece, Reduction, RowState, Smoothing, Targets,
};

use common::SplitMix64;

/// The shapes `(N, K)` of the options groups.
const OPTION_SHAPES: [(usize, usize); 2] = [(128, 1000), (16, 32_000)];

/// The shapes `(N, K)` of the pieces groups.
const PIECE_SHAPES: [(usize, usize); 2] = [(16, 32_000), (4, 128_256)];

/// The number of pieces of `fb/pieces8`.
const PIECES: usize = 8;

/// Standard deviation of the generated logits.
const LOGIT_STD: f64 = 3.0;

/// The label smoothing of every benchmark.
const SMOOTHING: Smoothing = Smoothing::Uniform(0.1);

/// Class weights are uniform in `[WEIGHT_MIN, WEIGHT_MAX]`.
const WEIGHT_MIN: f64 = 0.5;

/// See [`WEIGHT_MIN`].
const WEIGHT_MAX: f64 = 2.0;

/// The z-loss coefficient.
const Z_LOSS: f32 = 1e-4;

/// The soft-cap.
const SOFTCAP: f32 = 30.0;

/// The logit scale (inverse temperature).
const LOGIT_SCALE: f32 = 0.7;

/// The upstream gradient.
const UPSTREAM: f32 = 0.5;

/// Every class `c` with `c % MASK_EVERY == 0` is disallowed by the class mask.
const MASK_EVERY: usize = 7;

/// PyTorch's default ignore index.
const IGNORE_INDEX: i64 = -100;

/// Every row `i` with `i % IGNORE_EVERY == IGNORE_PHASE` is ignored (about 10%: 13 of 128 rows,
/// 2 of 16).
const IGNORE_EVERY: usize = 10;

/// See [`IGNORE_EVERY`].
const IGNORE_PHASE: usize = 5;

/// Whether the class mask of the benchmarks allows `class`.
fn allowed(class: usize) -> bool {
    !class.is_multiple_of(MASK_EVERY)
}

/// The logits of `kernels.rs` for this shape (same seed, same values), and the generator
/// positioned after them.
fn normal_logits(rows: usize, classes: usize) -> (Vec<f32>, SplitMix64) {
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
    (logits, rng)
}

/// Targets uniform over the classes, a disallowed class moved to its neighbour (`c + 1`, or
/// `c - 1` at the end of the row), so that every target is allowed by the class mask.
fn allowed_targets(rng: &mut SplitMix64, rows: usize, classes: usize) -> Vec<u32> {
    (0..rows)
        .map(|_| {
            let c = rng.below(classes) as usize;
            let c = if allowed(c) {
                c
            } else if c + 1 < classes {
                c + 1
            } else {
                c - 1
            };
            c as u32
        })
        .collect()
}

/// The inputs of one options shape, allocated and written once.
struct Inputs {
    logits: Vec<f32>,
    targets: Vec<u32>,
    /// `targets` as `i64`, with every [`IGNORE_EVERY`]th row set to [`IGNORE_INDEX`].
    targets_ignored: Vec<i64>,
    /// Per-class weights in `[WEIGHT_MIN, WEIGHT_MAX]`.
    weights: Vec<f32>,
    /// The class mask: every [`MASK_EVERY`]th class disallowed.
    allowed: Vec<bool>,
    /// A random probability row per sample, row-major `[N, K]`.
    soft: Vec<f32>,
}

impl Inputs {
    fn new(rows: usize, classes: usize) -> Self {
        let (logits, mut rng) = normal_logits(rows, classes);
        let targets = allowed_targets(&mut rng, rows, classes);
        let targets_ignored = targets
            .iter()
            .enumerate()
            .map(|(row, &t)| {
                if row % IGNORE_EVERY == IGNORE_PHASE {
                    IGNORE_INDEX
                } else {
                    i64::from(t)
                }
            })
            .collect();
        let weights = (0..classes)
            .map(|_| (WEIGHT_MIN + (WEIGHT_MAX - WEIGHT_MIN) * rng.unit()) as f32)
            .collect();
        let allowed = (0..classes).map(allowed).collect();
        let mut soft: Vec<f32> = Vec::with_capacity(rows * classes);
        for _ in 0..rows {
            let row: Vec<f64> = (0..classes).map(|_| rng.unit()).collect();
            let total: f64 = row.iter().sum();
            soft.extend(row.iter().map(|&v| (v / total) as f32));
        }
        Inputs {
            logits,
            targets,
            targets_ignored,
            weights,
            allowed,
            soft,
        }
    }
}

/// The outputs of one options shape, allocated and written once.
struct Outputs {
    losses: Vec<f32>,
    /// The gradient, and the destination of `memcpy`.
    grad: Vec<f32>,
    lse: Vec<f32>,
    z_loss: Vec<f32>,
    correct: Vec<bool>,
}

impl Outputs {
    fn new(inputs: &Inputs) -> Self {
        let rows = inputs.targets.len();
        // Written with non-zero values (a copy of the logits), so every page is touched and no
        // buffer holds zeros before the first timed call.
        Outputs {
            losses: vec![1.0; rows],
            grad: inputs.logits.clone(),
            lse: vec![1.0; rows],
            z_loss: vec![1.0; rows],
            correct: vec![true; rows],
        }
    }
}

fn configure_group(group: &mut BenchmarkGroup<'_, WallTime>, len: usize) {
    group.throughput(Throughput::Elements(len as u64));
    group.sample_size(50);
}

fn memcpy(group: &mut BenchmarkGroup<'_, WallTime>, src: &[f32], dst: &mut [f32]) {
    group.bench_function("memcpy", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(src));
            black_box(&mut *dst);
        });
    });
}

/// Benchmarks `call` (one forward + backward into `out`) as `fb/<name>`, after one untimed call
/// that must succeed with a finite loss.
fn bench_fb<F>(group: &mut BenchmarkGroup<'_, WallTime>, out: &mut Outputs, name: &str, mut call: F)
where
    F: FnMut(&mut Outputs) -> Result<f32, Error>,
{
    let loss = call(out).expect("valid arguments");
    assert!(loss.is_finite(), "fb/{name}: loss {loss}");
    group.bench_function(BenchmarkId::new("fb", name), |b| {
        b.iter(|| {
            let loss = call(out).expect("valid arguments");
            black_box(out.grad.as_mut_slice());
            black_box(loss)
        });
    });
}

#[allow(clippy::too_many_lines)]
fn options(c: &mut Criterion) {
    for (rows, classes) in OPTION_SHAPES {
        let mut group = c.benchmark_group(format!("options_{rows}x{classes}"));
        configure_group(&mut group, rows * classes);
        let inputs = Inputs::new(rows, classes);
        let mut out = Outputs::new(&inputs);
        let inp = &inputs;
        let plain = CrossEntropy::new(classes)
            .smoothing(SMOOTHING)
            .reduction(Reduction::Mean)
            .backend(Backend::Auto);

        memcpy(&mut group, &inp.logits, &mut out.grad);

        bench_fb(&mut group, &mut out, "plain", |o| {
            plain.forward_backward(
                black_box(inp.logits.as_slice()),
                &inp.targets,
                &mut o.losses,
                &mut o.grad,
            )
        });

        // The same through the generic entry point, with no extras.
        bench_fb(&mut group, &mut out, "plain_with", |o| {
            plain
                .forward_backward_with(
                    black_box(inp.logits.as_slice()),
                    inp.targets.as_slice(),
                    &mut o.losses,
                    &mut o.grad,
                    Extras::default(),
                )
                .map(|s| s.loss)
        });

        // One option on top of `plain`, through `forward_backward` with the `u32` targets.
        let simple = [
            ("class_weights", plain.class_weights(&inp.weights)),
            ("target_weights", plain.target_weights(&inp.weights)),
            ("z_loss", plain.z_loss(Z_LOSS)),
            ("softcap", plain.softcap(SOFTCAP)),
            ("logit_scale", plain.logit_scale(LOGIT_SCALE)),
            ("class_mask", plain.class_mask(&inp.allowed)),
            ("upstream", plain.upstream(UPSTREAM)),
        ];
        for (name, ce) in simple {
            bench_fb(&mut group, &mut out, name, |o| {
                ce.forward_backward(
                    black_box(inp.logits.as_slice()),
                    &inp.targets,
                    &mut o.losses,
                    &mut o.grad,
                )
            });
        }

        bench_fb(&mut group, &mut out, "soft_targets", |o| {
            plain
                .forward_backward_with(
                    black_box(inp.logits.as_slice()),
                    Targets::Soft(&inp.soft),
                    &mut o.losses,
                    &mut o.grad,
                    Extras::default(),
                )
                .map(|s| s.loss)
        });

        bench_fb(&mut group, &mut out, "extras", |o| {
            plain
                .forward_backward_with(
                    black_box(inp.logits.as_slice()),
                    inp.targets.as_slice(),
                    &mut o.losses,
                    &mut o.grad,
                    Extras {
                        lse: Some(&mut o.lse),
                        correct: Some(&mut o.correct),
                        ..Extras::default()
                    },
                )
                .map(|s| s.loss)
        });

        let ignoring = plain.ignore_index_signed(IGNORE_INDEX);
        bench_fb(&mut group, &mut out, "ignore_index", |o| {
            ignoring
                .forward_backward_with(
                    black_box(inp.logits.as_slice()),
                    inp.targets_ignored.as_slice(),
                    &mut o.losses,
                    &mut o.grad,
                    Extras::default(),
                )
                .map(|s| s.loss)
        });

        let all = plain
            .class_weights(&inp.weights)
            .z_loss(Z_LOSS)
            .logit_scale(LOGIT_SCALE)
            .class_mask(&inp.allowed)
            .ignore_index_signed(IGNORE_INDEX)
            .upstream(UPSTREAM);
        for (name, ce) in [("all", all), ("all_softcap", all.softcap(SOFTCAP))] {
            bench_fb(&mut group, &mut out, name, |o| {
                ce.forward_backward_with(
                    black_box(inp.logits.as_slice()),
                    inp.targets_ignored.as_slice(),
                    &mut o.losses,
                    &mut o.grad,
                    Extras {
                        lse: Some(&mut o.lse),
                        z_loss: Some(&mut o.z_loss),
                        correct: Some(&mut o.correct),
                        row_scales: None,
                    },
                )
                .map(|s| s.loss)
            });
        }
        group.finish();
    }
}

/// `count` pieces of equal width covering `classes` classes, the last taking the remainder.
fn equal_pieces(classes: usize, count: usize) -> Vec<Piece> {
    let width = classes / count;
    (0..count)
        .map(|p| Piece {
            offset: p * width,
            width: if p + 1 == count {
                classes - p * width
            } else {
                width
            },
        })
        .collect()
}

/// The block of `piece` in piece-major storage of `rows` rows: `[rows, piece.width]` at
/// `rows * piece.offset`.
fn block(rows: usize, piece: Piece) -> std::ops::Range<usize> {
    rows * piece.offset..rows * (piece.offset + piece.width)
}

/// Row-major `[rows, classes]` logits laid out piece-major.
fn piece_major(logits: &[f32], rows: usize, classes: usize, pieces: &[Piece]) -> Vec<f32> {
    let mut out = Vec::with_capacity(logits.len());
    for piece in pieces {
        for row in logits.chunks_exact(classes).take(rows) {
            out.extend_from_slice(&row[piece.offset..piece.offset + piece.width]);
        }
    }
    out
}

/// The per-call state of a split batch: the pieces, one state array per piece, the merged states
/// and the losses.
struct Split {
    pieces: Vec<Piece>,
    states: Vec<Vec<RowState>>,
    merged: Vec<RowState>,
    losses: Vec<f32>,
}

impl Split {
    fn new(rows: usize, classes: usize, count: usize) -> Self {
        let pieces = equal_pieces(classes, count);
        Split {
            states: vec![vec![RowState::EMPTY; rows]; pieces.len()],
            merged: vec![RowState::EMPTY; rows],
            losses: vec![1.0; rows],
            pieces,
        }
    }

    /// Steps 1 and 2 and the losses: every piece's states from the piece-major `logits`, merged,
    /// finished. Returns the reduced loss.
    fn forward(
        &mut self,
        ce: &CrossEntropy,
        logits: &[f32],
        targets: &[u32],
    ) -> Result<f32, Error> {
        let rows = targets.len();
        for (&piece, states) in self.pieces.iter().zip(&mut self.states) {
            ce.piece_states(&logits[block(rows, piece)], piece, targets, states)?;
        }
        self.merge_and_finish(ce, targets)
    }

    /// Steps 1 and 2 and the losses, keeping the exps: every piece's states and exps
    /// (`piece_states_and_exps`, into the piece's block of `exps`, or over `logits` when `exps` is
    /// `None`), merged, finished. Returns the reduced loss.
    fn forward_exps(
        &mut self,
        ce: &CrossEntropy,
        logits: &mut [f32],
        targets: &[u32],
        mut exps: Option<&mut [f32]>,
    ) -> Result<f32, Error> {
        let rows = targets.len();
        for (&piece, states) in self.pieces.iter().zip(&mut self.states) {
            let range = block(rows, piece);
            match exps.as_deref_mut() {
                Some(exps) => ce.piece_states_and_exps(
                    &logits[range.clone()],
                    piece,
                    targets,
                    states,
                    &mut exps[range],
                )?,
                None => {
                    ce.piece_states_and_exps_in_place(&mut logits[range], piece, targets, states)?;
                }
            }
        }
        self.merge_and_finish(ce, targets)
    }

    /// Step 3 from stored exps: every piece's block of `exps` becomes its gradient.
    fn backward_exps(
        &self,
        ce: &CrossEntropy,
        exps: &mut [f32],
        targets: &[u32],
    ) -> Result<(), Error> {
        let rows = targets.len();
        for (&piece, own) in self.pieces.iter().zip(&self.states) {
            ce.piece_backward_from_exps(
                &mut exps[block(rows, piece)],
                piece,
                targets,
                own,
                &self.merged,
            )?;
        }
        Ok(())
    }

    /// Step 2 (the merge an all-reduce would do) and the losses.
    fn merge_and_finish(&mut self, ce: &CrossEntropy, targets: &[u32]) -> Result<f32, Error> {
        let (first, rest) = self.states.split_first().expect("at least one piece");
        self.merged.copy_from_slice(first);
        for states in rest {
            for (merged, &state) in self.merged.iter_mut().zip(states) {
                *merged = merged.merge(state);
            }
        }
        ce.finish_states(&self.merged, targets, &mut self.losses, Extras::default())
            .map(|s| s.loss)
    }

    /// Step 3: every piece's gradient into its block of the piece-major `grad`.
    fn backward(
        &self,
        ce: &CrossEntropy,
        logits: &[f32],
        targets: &[u32],
        grad: &mut [f32],
    ) -> Result<(), Error> {
        let rows = targets.len();
        for &piece in &self.pieces {
            let range = block(rows, piece);
            ce.piece_backward(
                &logits[range.clone()],
                piece,
                targets,
                &self.merged,
                &mut grad[range],
            )?;
        }
        Ok(())
    }

    /// Step 3 in place: every piece's gradient over its block of the piece-major `logits`.
    fn backward_in_place(
        &self,
        ce: &CrossEntropy,
        logits: &mut [f32],
        targets: &[u32],
    ) -> Result<(), Error> {
        let rows = targets.len();
        for &piece in &self.pieces {
            ce.piece_backward_in_place(
                &mut logits[block(rows, piece)],
                piece,
                targets,
                &self.merged,
            )?;
        }
        Ok(())
    }
}

/// Checks one split call against the unsplit one (loss and every gradient element), so that a
/// wrong layout cannot be timed.
fn check_split(
    split: &Split,
    classes: usize,
    split_loss: f32,
    split_grad: &[f32],
    (loss, grad): Unsplit<'_>,
) {
    let rows = split.losses.len();
    assert!(
        (split_loss - loss).abs() <= 1e-5 * loss.abs().max(1.0),
        "split loss {split_loss} vs unsplit {loss}"
    );
    for &piece in &split.pieces {
        let blk = &split_grad[block(rows, piece)];
        for (row, (split_row, full_row)) in blk
            .chunks_exact(piece.width.max(1))
            .zip(grad.chunks_exact(classes))
            .enumerate()
        {
            let full_row = &full_row[piece.offset..piece.offset + piece.width];
            for (j, (a, b)) in split_row.iter().zip(full_row).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5,
                    "row {row}, class {}: split gradient {a} vs unsplit {b}",
                    piece.offset + j
                );
            }
        }
    }
}

/// Times `call` on a fresh copy of `src` each iteration (the in-place calls overwrite their
/// input), refilled outside the clock: one copy, one clock read per call (these shapes are far
/// bigger than the small-shape ring of `kernels.rs`).
fn refilled<R>(
    b: &mut criterion::Bencher<'_>,
    work: &mut [f32],
    src: &[f32],
    mut call: impl FnMut(&mut [f32]) -> R,
) {
    b.iter_custom(|iters| {
        let mut timed = Duration::ZERO;
        for _ in 0..iters {
            work.copy_from_slice(src);
            let start = Instant::now();
            black_box(call(black_box(&mut *work)));
            timed += start.elapsed();
        }
        timed
    });
}

fn pieces(c: &mut Criterion) {
    for (rows, classes) in PIECE_SHAPES {
        let mut group = c.benchmark_group(format!("pieces_{rows}x{classes}"));
        configure_group(&mut group, rows * classes);
        let (logits, mut rng) = normal_logits(rows, classes);
        let targets: Vec<u32> = (0..rows).map(|_| rng.below(classes)).collect();
        let ce = CrossEntropy::new(classes)
            .smoothing(SMOOTHING)
            .reduction(Reduction::Mean)
            .backend(Backend::Auto);
        let mut losses = vec![1.0_f32; rows];
        let mut grad = logits.clone();

        memcpy(&mut group, &logits, &mut grad);

        let unsplit_loss = ce
            .forward_backward(&logits, &targets, &mut losses, &mut grad)
            .expect("valid arguments");
        let unsplit_grad = grad.clone();
        group.bench_function(BenchmarkId::new("fb", "unsplit"), |b| {
            b.iter(|| {
                let loss = ce
                    .forward_backward(
                        black_box(logits.as_slice()),
                        &targets,
                        &mut losses,
                        &mut grad,
                    )
                    .expect("valid arguments");
                black_box(grad.as_mut_slice());
                black_box(loss)
            });
        });

        // The in-place yardstick of the in-place split calls, refilled the same way.
        let mut work = logits.clone();
        group.bench_function(BenchmarkId::new("fb", "unsplit_in_place"), |b| {
            refilled(b, &mut work, &logits, |z| {
                ce.forward_backward_in_place(z, &targets, &mut losses)
                    .expect("valid arguments")
            });
        });

        for count in [1, PIECES] {
            split_benches(
                &mut group,
                &ce,
                &logits,
                &targets,
                count,
                (unsplit_loss, &unsplit_grad),
            );
        }
        group.finish();
    }
}

/// Rows per tile of `fb/pieces8_exps_tiled`: as many as keep a tile's buffers (`bytes` per class:
/// 8 for logits and exps, 4 in place) within 1 MiB, half this machine's L2, so that the exps are
/// still cached when the tile's backward step reads them.
fn tile_rows(classes: usize, bytes: usize) -> usize {
    ((1 << 20) / (bytes * classes)).max(1)
}

/// The one-exp path over tiles of `tile` rows, as a caller that streams chunks on one device can
/// order it: for each tile, every piece's states and exps (into its block of `grad`, from
/// `logits`, or in place from `grad` itself when `logits` is `None`), the merge, the losses and
/// every piece's gradient. With `hint`, each piece's states-and-exps call but the last names the
/// next piece's logits with `read_ahead`. `ce` has `mean_denominator(N)`, so the tiles' `Mean`
/// losses add up to the batch's. Returns the batch's loss.
fn tiled_exps(
    split: &mut Split,
    ce: &CrossEntropy,
    logits: Option<&[f32]>,
    targets: &[u32],
    grad: &mut [f32],
    tile: usize,
    hint: bool,
) -> Result<f32, Error> {
    let rows = targets.len();
    let mut loss = 0.0;
    for r0 in (0..rows).step_by(tile) {
        let r1 = (r0 + tile).min(rows);
        let t = &targets[r0..r1];
        let sub = |piece: Piece| {
            let start = block(rows, piece).start;
            start + r0 * piece.width..start + r1 * piece.width
        };
        let pieces = split.pieces.len();
        for (i, states) in split.states.iter_mut().enumerate() {
            let piece = split.pieces[i];
            let (range, states) = (sub(piece), &mut states[r0..r1]);
            // The next piece's block comes after this one's: split there, so that the hint can
            // borrow it while this piece's part is written.
            let next = split.pieces.get(i + 1).filter(|_| hint).map(|&p| sub(p));
            let at = next.as_ref().map_or(grad.len(), |n| n.start);
            let (head, tail) = grad.split_at_mut(at);
            let ahead: &[f32] = match (&next, logits) {
                (Some(n), Some(logits)) => &logits[n.clone()],
                (Some(n), None) => &tail[..n.len()],
                (None, _) => &[],
            };
            let ce = if i + 1 < pieces {
                ce.read_ahead(ahead)
            } else {
                *ce
            };
            match logits {
                Some(logits) => ce.piece_states_and_exps(
                    &logits[range.clone()],
                    piece,
                    t,
                    states,
                    &mut head[range],
                )?,
                None => ce.piece_states_and_exps_in_place(&mut head[range], piece, t, states)?,
            }
        }
        for row in r0..r1 {
            split.merged[row] = split
                .states
                .iter()
                .fold(RowState::EMPTY, |m, s| m.merge(s[row]));
        }
        let merged = &split.merged[r0..r1];
        loss += ce
            .finish_states(merged, t, &mut split.losses[r0..r1], Extras::default())?
            .loss;
        for (&piece, own) in split.pieces.iter().zip(&split.states) {
            ce.piece_backward_from_exps(&mut grad[sub(piece)], piece, t, &own[r0..r1], merged)?;
        }
    }
    Ok(loss)
}

/// The unsplit call's loss and gradient, which every split call must reproduce.
type Unsplit<'a> = (f32, &'a [f32]);

/// The split benchmarks of `count` pieces (see the module docs).
fn split_benches(
    group: &mut BenchmarkGroup<'_, WallTime>,
    ce: &CrossEntropy,
    logits: &[f32],
    targets: &[u32],
    count: usize,
    unsplit: Unsplit<'_>,
) {
    let rows = targets.len();
    let classes = ce.classes();
    let mut split = Split::new(rows, classes, count);
    let split_logits = piece_major(logits, rows, classes, &split.pieces);
    let mut split_grad = split_logits.clone();
    let loss = split
        .forward(ce, &split_logits, targets)
        .expect("valid arguments");
    split
        .backward(ce, &split_logits, targets, &mut split_grad)
        .expect("valid arguments");
    check_split(&split, classes, loss, &split_grad, unsplit);
    group.bench_function(BenchmarkId::new("fb", format!("pieces{count}")), |b| {
        b.iter(|| {
            let logits = black_box(split_logits.as_slice());
            let loss = split.forward(ce, logits, targets).expect("valid arguments");
            split
                .backward(ce, logits, targets, &mut split_grad)
                .expect("valid arguments");
            black_box(split_grad.as_mut_slice());
            black_box(loss)
        });
    });

    split_exp_benches(
        group,
        ce,
        &mut split,
        &split_logits,
        targets,
        count,
        unsplit,
    );

    if count == PIECES {
        // In place: the kernel overwrites the logits, so each call gets a fresh copy,
        // refilled outside the clock (one copy, one clock read per call: these shapes are
        // far bigger than the small-shape ring of `kernels.rs`).
        let mut work = split_logits.clone();
        let loss = split.forward(ce, &work, targets).expect("valid arguments");
        split
            .backward_in_place(ce, &mut work, targets)
            .expect("valid arguments");
        check_split(&split, classes, loss, &work, unsplit);
        group.bench_function(
            BenchmarkId::new("fb", format!("pieces{count}_in_place")),
            |b| {
                refilled(b, &mut work, &split_logits, |z| {
                    let loss = split.forward(ce, z, targets).expect("valid arguments");
                    split
                        .backward_in_place(ce, z, targets)
                        .expect("valid arguments");
                    loss
                });
            },
        );
    }
}

/// The one-exp split benchmarks of `count` pieces.
fn split_exp_benches(
    group: &mut BenchmarkGroup<'_, WallTime>,
    ce: &CrossEntropy,
    split: &mut Split,
    split_logits: &[f32],
    targets: &[u32],
    count: usize,
    unsplit: Unsplit<'_>,
) {
    let classes = ce.classes();
    let mut split_grad = split_logits.to_vec();
    // The one-exp path: exps stored in the gradient blocks, then rescaled.
    let mut scratch = split_logits.to_vec();
    let loss = split
        .forward_exps(ce, &mut scratch, targets, Some(&mut split_grad))
        .expect("valid arguments");
    split
        .backward_exps(ce, &mut split_grad, targets)
        .expect("valid arguments");
    check_split(split, classes, loss, &split_grad, unsplit);
    group.bench_function(BenchmarkId::new("fb", format!("pieces{count}_exps")), |b| {
        b.iter(|| {
            // Only read: `forward_exps` takes `&mut` for its in-place form.
            let logits = black_box(scratch.as_mut_slice());
            let loss = split
                .forward_exps(ce, logits, targets, Some(&mut split_grad))
                .expect("valid arguments");
            split
                .backward_exps(ce, &mut split_grad, targets)
                .expect("valid arguments");
            black_box(split_grad.as_mut_slice());
            black_box(loss)
        });
    });

    if count == PIECES {
        tiled_benches(group, ce, split, split_logits, targets, unsplit);
    }

    if count == PIECES {
        let mut work = split_logits.to_vec();
        let loss = split
            .forward_exps(ce, &mut work, targets, None)
            .expect("valid arguments");
        split
            .backward_exps(ce, &mut work, targets)
            .expect("valid arguments");
        check_split(split, classes, loss, &work, unsplit);
        group.bench_function(
            BenchmarkId::new("fb", format!("pieces{count}_exps_in_place")),
            |b| {
                refilled(b, &mut work, split_logits, |z| {
                    let loss = split
                        .forward_exps(ce, z, targets, None)
                        .expect("valid arguments");
                    split
                        .backward_exps(ce, z, targets)
                        .expect("valid arguments");
                    loss
                });
            },
        );
    }
}

/// The tiled one-exp benchmarks (`fb/pieces8_exps_tiled`, out of place and in place), with the
/// `read_ahead` hint and without it (`_no_hint`).
fn tiled_benches(
    group: &mut BenchmarkGroup<'_, WallTime>,
    ce: &CrossEntropy,
    split: &mut Split,
    split_logits: &[f32],
    targets: &[u32],
    unsplit: Unsplit<'_>,
) {
    let classes = ce.classes();
    let count = split.pieces.len();
    let mut split_grad = split_logits.to_vec();
    let ce = ce.mean_denominator(targets.len() as f32);
    for hint in [true, false] {
        let suffix = if hint { "" } else { "_no_hint" };
        let tile = tile_rows(classes, 8);
        let logits = Some(split_logits);
        let loss = tiled_exps(split, &ce, logits, targets, &mut split_grad, tile, hint)
            .expect("valid arguments");
        check_split(split, classes, loss, &split_grad, unsplit);
        group.bench_function(
            BenchmarkId::new("fb", format!("pieces{count}_exps_tiled{suffix}")),
            |b| {
                b.iter(|| {
                    let logits = Some(black_box(split_logits));
                    let loss = tiled_exps(split, &ce, logits, targets, &mut split_grad, tile, hint)
                        .expect("valid arguments");
                    black_box(split_grad.as_mut_slice());
                    black_box(loss)
                });
            },
        );

        let tile = tile_rows(classes, 4);
        let mut work = split_logits.to_vec();
        let loss =
            tiled_exps(split, &ce, None, targets, &mut work, tile, hint).expect("valid arguments");
        check_split(split, classes, loss, &work, unsplit);
        group.bench_function(
            BenchmarkId::new("fb", format!("pieces{count}_exps_tiled_in_place{suffix}")),
            |b| {
                refilled(b, &mut work, split_logits, |z| {
                    tiled_exps(split, &ce, None, targets, z, tile, hint).expect("valid arguments")
                });
            },
        );
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = options, pieces
}
criterion_main!(benches);
