//! The smallest use of the crate: a loss and its gradient for a tiny batch, printed.
//!
//! Run with `cargo run --example basic`.

use smoothce::{reference, CrossEntropy, Reduction, Smoothing};

fn main() -> Result<(), smoothce::Error> {
    let classes = 5;
    // Three rows of five logits, as a model's last layer would produce them.
    let logits = [
        2.0_f32, 0.5, -1.0, 0.0, 1.0, //
        -0.5, 3.0, 0.2, 0.1, -2.0, //
        0.0, 0.0, 0.0, 0.0, 0.0,
    ];
    let targets = [0_u32, 1, u32::MAX]; // the last row is padding: ignored
    let ce = CrossEntropy::new(classes)
        .smoothing(Smoothing::Uniform(0.1)) // PyTorch's label_smoothing=0.1
        .ignore_index(u32::MAX)
        .reduction(Reduction::Mean);

    let mut losses = [0.0_f32; 3];
    let mut grad = [0.0_f32; 15];
    let loss = ce.forward_backward(&logits, &targets, &mut losses, &mut grad)?;

    println!("backend: {:?}", smoothce::Backend::Auto.resolve());
    println!("mean loss over non-ignored rows: {loss:.6}");
    for (row, (l, g)) in losses.iter().zip(grad.chunks(classes)).enumerate() {
        println!("row {row}: loss {l:.6}  grad {g:+.5?}");
    }

    // The same numbers from the scalar f64 reference, which anyone can use to check the kernels.
    let mut ref_losses = [0.0_f32; 3];
    let mut ref_grad = [0.0_f32; 15];
    let ref_loss =
        reference::forward_backward(&ce, &logits, &targets, &mut ref_losses, &mut ref_grad)?;
    let worst = grad
        .iter()
        .zip(&ref_grad)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0_f32, f32::max);
    println!("reference loss {ref_loss:.6}; largest gradient difference {worst:.1e}");

    // Off-target smoothing (Megatron-LM, fairseq) keeps exactly 1 - eps on the target.
    let off = ce.smoothing(Smoothing::OffTarget(0.1));
    let off_loss = off.forward(&logits, &targets, &mut losses)?;
    println!("same batch with OffTarget(0.1): {off_loss:.6}");
    Ok(())
}
