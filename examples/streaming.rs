//! A language-model head over a large vocabulary, trained without ever holding a row's full
//! logits: the logits are produced chunk by chunk by a small matrix multiply, each chunk's
//! statistics are merged into a [`RowState`], and a second sweep recomputes each chunk and writes
//! its gradient from the merged state. A counting allocator shows the peak heap stays at one
//! chunk of logits, not the whole vocabulary.
//!
//! Run with `cargo run --release --example streaming`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use smoothce::{CrossEntropy, Extras, Piece, RowState, Smoothing};

/// The system allocator, counting live and peak bytes.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const VOCAB: usize = 200_000;
const HIDDEN: usize = 32;
const CHUNK: usize = 8192;

/// A deterministic pseudo-random weight in [-0.5, 0.5).
fn weight(class: usize, j: usize) -> f32 {
    let mut x = (class as u64) << 20 ^ j as u64 ^ 0x9E37_79B9_7F4A_7C15;
    x ^= x >> 33;
    x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x ^= x >> 33;
    (x >> 40) as f32 / (1_u64 << 24) as f32 - 0.5
}

/// The logits of classes `offset .. offset + out.len()` for hidden state `h`: `out = W h`.
fn head_chunk(h: &[f32], offset: usize, out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = h
            .iter()
            .enumerate()
            .map(|(j, &hj)| weight(offset + i, j) * hj)
            .sum();
    }
}

fn main() -> Result<(), smoothce::Error> {
    let h: Vec<f32> = (0..HIDDEN)
        .map(|j| ((j as f32) * 0.37).sin() * 3.0)
        .collect();
    let target = [123_456_u32];
    let ce = CrossEntropy::new(VOCAB).smoothing(Smoothing::Uniform(0.1));

    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let mut chunk = vec![0.0_f32; CHUNK];
    let mut grad_h = [0.0_f32; HIDDEN];

    // Sweep 1: statistics of every chunk, merged.
    let mut state = RowState::EMPTY;
    for offset in (0..VOCAB).step_by(CHUNK) {
        let width = CHUNK.min(VOCAB - offset);
        let piece = Piece { offset, width };
        head_chunk(&h, offset, &mut chunk[..width]);
        let mut s = [RowState::EMPTY];
        ce.piece_states(&chunk[..width], piece, &target, &mut s)?;
        state = state.merge(s[0]);
    }
    let mut loss = [0.0_f32];
    let summary = ce.finish_states(&[state], &target, &mut loss, Extras::default())?;

    // Sweep 2: recompute each chunk, its gradient in place, and backpropagate into h.
    for offset in (0..VOCAB).step_by(CHUNK) {
        let width = CHUNK.min(VOCAB - offset);
        let piece = Piece { offset, width };
        head_chunk(&h, offset, &mut chunk[..width]);
        ce.piece_backward_in_place(&mut chunk[..width], piece, &target, &[state])?;
        for (i, &g) in chunk[..width].iter().enumerate() {
            for (j, gh) in grad_h.iter_mut().enumerate() {
                *gh += g * weight(offset + i, j);
            }
        }
    }
    let peak = PEAK.load(Ordering::Relaxed) - before;

    // The same loss from the full logits row, for comparison (this is what streaming avoids).
    let mut full = vec![0.0_f32; VOCAB];
    head_chunk(&h, 0, &mut full);
    let unsplit = ce.forward(&full, &target, &mut [0.0])?;

    println!("vocabulary {VOCAB}, hidden {HIDDEN}, chunk {CHUNK}");
    println!(
        "streamed loss {:.6}   unsplit loss {unsplit:.6}",
        summary.loss
    );
    println!(
        "lse {:.4}   |dL/dh| = {:.6}",
        state.lse(),
        grad_h.iter().map(|g| g * g).sum::<f32>().sqrt()
    );
    println!(
        "peak heap while streaming: {peak} bytes ({:.1} KiB); one full row of logits would be {} bytes ({:.1} KiB)",
        peak as f64 / 1024.0,
        VOCAB * 4,
        (VOCAB * 4) as f64 / 1024.0
    );
    assert!(
        peak < VOCAB * 4 / 4,
        "streaming should not hold the full row"
    );
    Ok(())
}
