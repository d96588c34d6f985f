//! Firmware-style on-device training: how an embedded user wires `smoothce` into a training loop.
//!
//! Everything has a fixed size known at compile time. The model and all the buffers of a training
//! step live in `static`s (behind a `std::sync::Mutex` here; on a microcontroller, a
//! critical-section mutex such as `critical_section::Mutex<RefCell<_>>`); the training step
//! allocates nothing (a test counts the allocations it makes: zero) and uses only `core`. A linear
//! classifier (4 sensor features, 3 classes) learns from a simulated sensor stream;
//! `forward_backward_in_place` turns the logits buffer into the gradient, so one
//! `[f32; BATCH * CLASSES]` buffer serves both. Batches that arrive short are padded with rows
//! whose target is the ignore index: they cost nothing and do not dilute the mean.
//!
//! Run with `cargo run --release --example firmware`; `cargo test --example firmware` runs its
//! tests (plain `cargo test` does too).

use std::sync::{Mutex, MutexGuard, PoisonError};

use smoothce::{CrossEntropy, Reduction, Smoothing};

/// Inputs per sample (say: accelerometer x, y, z and a temperature).
const FEATURES: usize = 4;
/// Classes (say: idle, walking, running).
const CLASSES: usize = 3;
/// Rows per training step.
const BATCH: usize = 8;
/// Target of a padding row.
const PAD: u32 = u32::MAX;
/// SGD step size.
const LEARNING_RATE: f32 = 0.5;
/// Training steps.
const STEPS: usize = 60;

/// The model: `logits = W x + b`.
struct Linear {
    w: [[f32; FEATURES]; CLASSES],
    b: [f32; CLASSES],
}

impl Linear {
    /// The all-zero model.
    const fn new() -> Self {
        Linear {
            w: [[0.0; FEATURES]; CLASSES],
            b: [0.0; CLASSES],
        }
    }
}

/// All the memory one training step uses, in a `static`: nothing is allocated at run time.
struct Workspace {
    x: [[f32; FEATURES]; BATCH],
    targets: [u32; BATCH],
    /// Logits on the way in, d(loss)/d(logits) on the way out.
    logits: [f32; BATCH * CLASSES],
    losses: [f32; BATCH],
}

impl Workspace {
    /// Empty buffers, every row padding.
    const fn new() -> Self {
        Workspace {
            x: [[0.0; FEATURES]; BATCH],
            targets: [PAD; BATCH],
            logits: [0.0; BATCH * CLASSES],
            losses: [0.0; BATCH],
        }
    }
}

/// The model's weights, in static memory (on a device: RAM reserved at link time).
static MODEL: Mutex<Linear> = Mutex::new(Linear::new());
/// The training step's buffers, in static memory.
static WORKSPACE: Mutex<Workspace> = Mutex::new(Workspace::new());

/// Locks a static; a panic elsewhere while it was held leaves plain numbers behind, still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One SGD step on the batch in `ws`. Returns the mean loss over the non-padding rows.
/// `core` only: no allocation, no `std`, no panics beyond the slice bounds fixed at compile time.
fn train_step(
    model: &mut Linear,
    ws: &mut Workspace,
    ce: &CrossEntropy,
) -> Result<f32, smoothce::Error> {
    // Forward.
    for (row, x) in ws.logits.chunks_exact_mut(CLASSES).zip(&ws.x) {
        for (logit, (w, b)) in row.iter_mut().zip(model.w.iter().zip(&model.b)) {
            *logit = b + w.iter().zip(x).map(|(w, x)| w * x).sum::<f32>();
        }
    }
    // Loss and gradient in one fused pass; the gradient (already divided by the number of
    // non-padding rows) overwrites the logits. Padding rows get an all-zero gradient row.
    let loss = ce.forward_backward_in_place(&mut ws.logits, &ws.targets, &mut ws.losses)?;
    // Backward and update: dW = G^T X, db = column sums of G.
    for (grad, x) in ws.logits.chunks_exact(CLASSES).zip(&ws.x) {
        for ((w, b), &g) in model.w.iter_mut().zip(&mut model.b).zip(grad) {
            for (w, &x) in w.iter_mut().zip(x) {
                *w -= LEARNING_RATE * g * x;
            }
            *b -= LEARNING_RATE * g;
        }
    }
    Ok(loss)
}

/// A 32-bit xorshift, the kind of generator firmware carries for jitter and test patterns.
struct XorShift32(u32);

impl XorShift32 {
    fn next(&mut self) -> u32 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.0 = x;
        x
    }

    /// Uniform in `[-1, 1)`.
    fn signed_unit(&mut self) -> f32 {
        (self.next() >> 8) as f32 / (1 << 23) as f32 - 1.0
    }
}

/// Typical readings of each class; the simulated sensor adds noise to them.
const PROTOTYPES: [[f32; FEATURES]; CLASSES] = [
    [0.0, 0.1, 1.0, 0.2], // idle
    [0.6, 0.4, 0.8, 0.5], // walking
    [1.0, 0.9, 0.3, 0.9], // running
];

/// Fills the workspace with the next batch from the "sensor": `valid` real samples, the rest
/// padding.
fn read_sensor(ws: &mut Workspace, rng: &mut XorShift32, valid: usize) {
    for (i, (x, t)) in ws.x.iter_mut().zip(&mut ws.targets).enumerate() {
        if i < valid {
            let class = rng.next() % CLASSES as u32;
            for (v, p) in x.iter_mut().zip(&PROTOTYPES[class as usize]) {
                *v = p + 0.35 * rng.signed_unit();
            }
            *t = class;
        } else {
            *x = [0.0; FEATURES];
            *t = PAD;
        }
    }
}

fn main() -> Result<(), smoothce::Error> {
    // The loss configuration is a small `Copy` value: build it once, at start-up.
    let ce = CrossEntropy::new(CLASSES)
        .smoothing(Smoothing::Uniform(0.05))
        .ignore_index(PAD)
        .reduction(Reduction::Mean);
    let (mut model_guard, mut ws_guard) = (lock(&MODEL), lock(&WORKSPACE));
    let (model, ws) = (&mut *model_guard, &mut *ws_guard);
    let mut rng = XorShift32(0x2545_F491);

    println!(
        "linear model {FEATURES} -> {CLASSES}, batch {BATCH}, Uniform(0.05), backend {:?}",
        smoothce::Backend::Auto.resolve()
    );
    println!("  steps  samples  mean loss");
    let mut window = 0.0_f32;
    let mut samples = 0;
    let mut first = None;
    let mut last = 0.0;
    for step in 1..=STEPS {
        // Every fifth batch arrives short: 5 real samples, 3 padding rows.
        let valid = if step % 5 == 0 { 5 } else { BATCH };
        read_sensor(ws, &mut rng, valid);
        window += train_step(model, ws, &ce)?;
        samples += valid;
        if step % 10 == 0 {
            let mean = window / 10.0;
            println!("{:>3}-{step:<3}  {samples:>7}  {mean:.4}", step - 9);
            first.get_or_insert(mean);
            last = mean;
            window = 0.0;
            samples = 0;
        }
    }
    // The initial loss of an all-zero model is ln 3 = 1.0986 whatever the smoothing.
    if let Some(first) = first {
        let verb = if last < first { "fell" } else { "did not fall" };
        println!(
            "mean loss {verb}: {first:.4} (steps 1-10), {last:.4} (steps {}-{STEPS})",
            STEPS - 9
        );
    }

    // Held-out check with the plain (unsmoothed) loss, through `forward`: same fixed buffers.
    let eval = CrossEntropy::new(CLASSES);
    let mut correct = 0;
    let mut nll = 0.0;
    let rounds = 16;
    for _ in 0..rounds {
        read_sensor(ws, &mut rng, BATCH);
        for (row, x) in ws.logits.chunks_exact_mut(CLASSES).zip(&ws.x) {
            for (logit, (w, b)) in row.iter_mut().zip(model.w.iter().zip(&model.b)) {
                *logit = b + w.iter().zip(x).map(|(w, x)| w * x).sum::<f32>();
            }
        }
        nll += eval.forward(&ws.logits, &ws.targets, &mut ws.losses)?;
        for (row, &t) in ws.logits.chunks_exact(CLASSES).zip(&ws.targets) {
            let best = (0..CLASSES).fold(0, |b, k| if row[k] > row[b] { k } else { b });
            correct += usize::from(best as u32 == t);
        }
    }
    println!(
        "held-out: accuracy {correct}/{} ({:.1}%), cross-entropy {:.4}",
        rounds * BATCH,
        100.0 * correct as f32 / (rounds * BATCH) as f32,
        nll / rounds as f32
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    /// The system allocator, counting the allocations of the current thread.
    struct Counting;

    thread_local! {
        static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
    }

    // SAFETY: every call is forwarded unchanged to `System`, which upholds `GlobalAlloc`'s
    // contract; the counter is a `const`-initialised thread local, which allocates nothing.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            ALLOCATIONS.with(|n| n.set(n.get() + 1));
            // SAFETY: forwarded with the caller's layout.
            unsafe { System.alloc(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: `ptr` came from `System.alloc` with this layout.
            unsafe { System.dealloc(ptr, layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            ALLOCATIONS.with(|n| n.set(n.get() + 1));
            // SAFETY: forwarded unchanged.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static COUNTING: Counting = Counting;

    fn allocations() -> usize {
        ALLOCATIONS.with(Cell::get)
    }

    #[test]
    fn the_counter_sees_an_allocation() {
        let before = allocations();
        let v = std::hint::black_box(vec![1u8; 16]);
        assert!(allocations() > before);
        drop(v);
    }

    #[test]
    fn training_allocates_nothing_and_learns() {
        let ce = CrossEntropy::new(CLASSES)
            .smoothing(Smoothing::Uniform(0.05))
            .ignore_index(PAD);
        // The statics `main` trains in (this test is the only one that takes them).
        let (mut model_guard, mut ws_guard) = (lock(&MODEL), lock(&WORKSPACE));
        let (model, ws) = (&mut *model_guard, &mut *ws_guard);
        let mut rng = XorShift32(0x2545_F491);
        let (mut first, mut last) = (0.0, 0.0);
        let before = allocations();
        for step in 1..=STEPS {
            let valid = if step % 5 == 0 { 5 } else { BATCH };
            read_sensor(ws, &mut rng, valid);
            let loss = train_step(model, ws, &ce).unwrap();
            if step <= 10 {
                first += loss;
            } else if step > STEPS - 10 {
                last += loss;
            }
        }
        assert_eq!(allocations() - before, 0, "the training loop allocated");
        assert!(last < 0.7 * first, "mean loss {first} -> {last}");
        // Padding rows: loss 0 and an all-zero gradient row.
        read_sensor(ws, &mut rng, 5);
        train_step(model, ws, &ce).unwrap();
        assert_eq!(ws.losses[5..], [0.0; BATCH - 5]);
        assert!(ws.logits[5 * CLASSES..].iter().all(|&g| g == 0.0));
    }
}
