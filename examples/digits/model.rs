//! A one-hidden-layer MLP (`inputs -> hidden (ReLU) -> classes`) with its forward and backward
//! passes written out plainly, and minibatch SGD with momentum. The loss and its gradient with
//! respect to the logits come from `smoothce` in one fused call per batch.

use smoothce::CrossEntropy;

use crate::data::Dataset;
use crate::rng::SplitMix64;

/// Training hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainConfig {
    /// Hidden units.
    pub hidden: usize,
    /// Passes over the training set.
    pub epochs: usize,
    /// Rows per minibatch.
    pub batch: usize,
    /// SGD step size.
    pub learning_rate: f32,
    /// Heavy-ball momentum.
    pub momentum: f32,
}

/// The network's parameters, all in one flat vector: `w1` (`inputs × hidden`, row `i` holds the
/// weights out of input `i`), `b1` (`hidden`), `w2` (`hidden × outputs`), `b2` (`outputs`).
#[derive(Debug, Clone, PartialEq)]
pub struct Mlp {
    inputs: usize,
    hidden: usize,
    outputs: usize,
    params: Vec<f32>,
}

/// Buffers for one minibatch, allocated once per training run.
struct Scratch {
    x: Vec<f32>,
    targets: Vec<u32>,
    hidden: Vec<f32>,
    logits: Vec<f32>,
    dlogits: Vec<f32>,
    dhidden: Vec<f32>,
    losses: Vec<f32>,
}

impl Mlp {
    /// He-initialised weights (normal, variance `2 / fan_in`), zero biases.
    pub fn new(inputs: usize, hidden: usize, outputs: usize, rng: &mut SplitMix64) -> Mlp {
        let mut mlp = Mlp {
            inputs,
            hidden,
            outputs,
            params: vec![0.0; inputs * hidden + hidden + hidden * outputs + outputs],
        };
        let (w1, _, w2, _) = mlp.split_mut();
        let s1 = (2.0 / inputs as f64).sqrt();
        for w in w1 {
            *w = (rng.normal() * s1) as f32;
        }
        let s2 = (2.0 / hidden as f64).sqrt();
        for w in w2 {
            *w = (rng.normal() * s2) as f32;
        }
        mlp
    }

    fn split(&self) -> (&[f32], &[f32], &[f32], &[f32]) {
        let (w1, rest) = self.params.split_at(self.inputs * self.hidden);
        let (b1, rest) = rest.split_at(self.hidden);
        let (w2, b2) = rest.split_at(self.hidden * self.outputs);
        (w1, b1, w2, b2)
    }

    fn split_mut(&mut self) -> (&mut [f32], &mut [f32], &mut [f32], &mut [f32]) {
        split_params(&mut self.params, self.inputs, self.hidden, self.outputs)
    }

    /// Forward pass over `rows` rows of `x`: post-ReLU activations into `hidden` and logits into
    /// `logits`.
    pub fn forward(&self, x: &[f32], hidden: &mut [f32], logits: &mut [f32]) {
        let (w1, b1, w2, b2) = self.split();
        for ((xr, hr), lr) in x
            .chunks_exact(self.inputs)
            .zip(hidden.chunks_exact_mut(self.hidden))
            .zip(logits.chunks_exact_mut(self.outputs))
        {
            hr.copy_from_slice(b1);
            for (&xi, w_row) in xr.iter().zip(w1.chunks_exact(self.hidden)) {
                if xi != 0.0 {
                    for (h, &w) in hr.iter_mut().zip(w_row) {
                        *h += xi * w;
                    }
                }
            }
            for h in hr.iter_mut() {
                *h = h.max(0.0);
            }
            lr.copy_from_slice(b2);
            for (&hj, w_row) in hr.iter().zip(w2.chunks_exact(self.outputs)) {
                if hj != 0.0 {
                    for (l, &w) in lr.iter_mut().zip(w_row) {
                        *l += hj * w;
                    }
                }
            }
        }
    }

    /// Backward pass: given the inputs, the forward pass's activations and the gradient of the
    /// loss with respect to the logits, writes the gradient with respect to every parameter into
    /// `grads` (same layout as the parameters). `dhidden` is scratch of the activations' size.
    pub fn backward(
        &self,
        x: &[f32],
        hidden: &[f32],
        dlogits: &[f32],
        dhidden: &mut [f32],
        grads: &mut [f32],
    ) {
        let (_, _, w2, _) = self.split();
        grads.fill(0.0);
        let (g_w1, g_b1, g_w2, g_b2) = split_params(grads, self.inputs, self.hidden, self.outputs);
        for (((xr, hr), dl), dh) in x
            .chunks_exact(self.inputs)
            .zip(hidden.chunks_exact(self.hidden))
            .zip(dlogits.chunks_exact(self.outputs))
            .zip(dhidden.chunks_exact_mut(self.hidden))
        {
            // Output layer: dW2 += h^T dl, db2 += dl, dh = W2 dl (masked by the ReLU).
            for (b, &d) in g_b2.iter_mut().zip(dl) {
                *b += d;
            }
            for (((&hj, g_row), w_row), dhj) in hr
                .iter()
                .zip(g_w2.chunks_exact_mut(self.outputs))
                .zip(w2.chunks_exact(self.outputs))
                .zip(dh.iter_mut())
            {
                if hj > 0.0 {
                    let mut acc = 0.0;
                    for ((g, &w), &d) in g_row.iter_mut().zip(w_row).zip(dl) {
                        *g += hj * d;
                        acc += w * d;
                    }
                    *dhj = acc;
                } else {
                    *dhj = 0.0;
                }
            }
            // Hidden layer: dW1 += x^T dh, db1 += dh.
            for (b, &d) in g_b1.iter_mut().zip(dh.iter()) {
                *b += d;
            }
            for (&xi, g_row) in xr.iter().zip(g_w1.chunks_exact_mut(self.hidden)) {
                if xi != 0.0 {
                    for (g, &d) in g_row.iter_mut().zip(dh.iter()) {
                        *g += xi * d;
                    }
                }
            }
        }
    }

    /// The logits of every image of `data`, row-major `[len, outputs]`.
    pub fn predict(&self, data: &Dataset) -> Vec<f32> {
        let rows = data.len();
        let mut hidden = vec![0.0; rows * self.hidden];
        let mut logits = vec![0.0; rows * self.outputs];
        self.forward(&data.pixels, &mut hidden, &mut logits);
        logits
    }
}

fn split_params(
    params: &mut [f32],
    inputs: usize,
    hidden: usize,
    outputs: usize,
) -> (&mut [f32], &mut [f32], &mut [f32], &mut [f32]) {
    let (w1, rest) = params.split_at_mut(inputs * hidden);
    let (b1, rest) = rest.split_at_mut(hidden);
    let (w2, b2) = rest.split_at_mut(hidden * outputs);
    (w1, b1, w2, b2)
}

/// Trains a fresh MLP on `data` (whose labels may be noisy) with the loss `ce`. After each epoch
/// `progress(epoch, mean training loss)` is called (epochs counted from 1).
///
/// # Errors
///
/// Whatever `smoothce` reports for the loss configuration (e.g. a smoothing outside `[0, 1]`).
pub fn train(
    data: &Dataset,
    ce: &CrossEntropy,
    config: &TrainConfig,
    rng: &mut SplitMix64,
    mut progress: impl FnMut(usize, f64),
) -> Result<Mlp, smoothce::Error> {
    let inputs = data.features;
    let classes = ce.classes();
    let mut model = Mlp::new(inputs, config.hidden, classes, rng);
    let batch = config.batch.max(1);
    let mut s = Scratch {
        x: vec![0.0; batch * inputs],
        targets: vec![0; batch],
        hidden: vec![0.0; batch * config.hidden],
        logits: vec![0.0; batch * classes],
        dlogits: vec![0.0; batch * classes],
        dhidden: vec![0.0; batch * config.hidden],
        losses: vec![0.0; batch],
    };
    let mut grads = vec![0.0; model.params.len()];
    let mut velocity = vec![0.0; model.params.len()];
    let mut order: Vec<usize> = (0..data.len()).collect();
    for epoch in 1..=config.epochs {
        rng.shuffle(&mut order);
        let mut loss_sum = 0.0;
        for chunk in order.chunks(batch) {
            let rows = chunk.len();
            for (r, &i) in chunk.iter().enumerate() {
                s.x[r * inputs..(r + 1) * inputs].copy_from_slice(data.image(i));
                s.targets[r] = data.labels[i];
            }
            let (x, h, dh) = (
                &s.x[..rows * inputs],
                &mut s.hidden[..rows * config.hidden],
                &mut s.dhidden[..rows * config.hidden],
            );
            let (logits, dlogits) = (
                &mut s.logits[..rows * classes],
                &mut s.dlogits[..rows * classes],
            );
            model.forward(x, h, logits);
            // The fused kernel: mean label-smoothed loss over the batch and d(loss)/d(logits).
            let loss =
                ce.forward_backward(logits, &s.targets[..rows], &mut s.losses[..rows], dlogits)?;
            loss_sum += f64::from(loss) * rows as f64;
            model.backward(x, h, dlogits, dh, &mut grads);
            for ((p, v), &g) in model.params.iter_mut().zip(&mut velocity).zip(&grads) {
                *v = config.momentum * *v + g;
                *p -= config.learning_rate * *v;
            }
        }
        progress(epoch, loss_sum / data.len().max(1) as f64);
    }
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoothce::{Reduction, Smoothing};

    fn loss_of(model: &Mlp, x: &[f32], targets: &[u32], ce: &CrossEntropy) -> f64 {
        let rows = targets.len();
        let mut hidden = vec![0.0; rows * model.hidden];
        let mut logits = vec![0.0; rows * model.outputs];
        model.forward(x, &mut hidden, &mut logits);
        let mut losses = vec![0.0; rows];
        f64::from(ce.forward(&logits, targets, &mut losses).unwrap())
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = SplitMix64::new(11);
        let (inputs, hidden, outputs, rows) = (5, 6, 4, 3);
        let mut model = Mlp::new(inputs, hidden, outputs, &mut rng);
        for b in &mut model.params[inputs * hidden..inputs * hidden + hidden] {
            *b = 0.1; // keep units away from the ReLU kink
        }
        let x: Vec<f32> = (0..rows * inputs).map(|_| rng.next_f64() as f32).collect();
        let targets = [0_u32, 3, 1];
        let ce = CrossEntropy::new(outputs)
            .smoothing(Smoothing::Uniform(0.1))
            .reduction(Reduction::Mean);

        let mut h = vec![0.0; rows * hidden];
        let mut logits = vec![0.0; rows * outputs];
        model.forward(&x, &mut h, &mut logits);
        let mut losses = vec![0.0; rows];
        let mut dlogits = vec![0.0; rows * outputs];
        ce.forward_backward(&logits, &targets, &mut losses, &mut dlogits)
            .unwrap();
        let mut dh = vec![0.0; rows * hidden];
        let mut grads = vec![0.0; model.params.len()];
        model.backward(&x, &h, &dlogits, &mut dh, &mut grads);

        let step = 1e-2_f32;
        for (k, &g) in grads.iter().enumerate() {
            let mut plus = model.clone();
            plus.params[k] += step;
            let mut minus = model.clone();
            minus.params[k] -= step;
            let numeric = (loss_of(&plus, &x, &targets, &ce) - loss_of(&minus, &x, &targets, &ce))
                / (2.0 * f64::from(step));
            let analytic = f64::from(g);
            assert!(
                (numeric - analytic).abs() < 2e-3 + 2e-2 * analytic.abs(),
                "parameter {k}: numeric {numeric}, analytic {analytic}"
            );
        }
    }

    #[test]
    fn training_fits_a_separable_toy_problem() {
        // Two classes: the first pixel on or the second.
        let mut pixels = Vec::new();
        let mut labels = Vec::new();
        for i in 0..40 {
            let class = i % 2;
            pixels.extend_from_slice(&[
                if class == 0 { 1.0 } else { 0.0 },
                if class == 1 { 1.0 } else { 0.0 },
            ]);
            labels.push(class);
        }
        let data = Dataset {
            features: 2,
            pixels,
            labels,
        };
        let config = TrainConfig {
            hidden: 8,
            epochs: 30,
            batch: 8,
            learning_rate: 0.1,
            momentum: 0.9,
        };
        let mut losses = Vec::new();
        let model = train(
            &data,
            &CrossEntropy::new(2),
            &config,
            &mut SplitMix64::new(1),
            |_, l| losses.push(l),
        )
        .unwrap();
        assert_eq!(losses.len(), 30);
        assert!(losses[29] < 0.1 * losses[0], "{losses:?}");
        let logits = model.predict(&data);
        for (row, &label) in logits.chunks(2).zip(&data.labels) {
            let predicted = u32::from(row[1] > row[0]);
            assert_eq!(predicted, label);
        }
    }

    #[test]
    fn a_bad_smoothing_is_an_error_not_a_panic() {
        let data = Dataset {
            features: 2,
            pixels: vec![0.5; 4],
            labels: vec![0, 1],
        };
        let config = TrainConfig {
            hidden: 2,
            epochs: 1,
            batch: 2,
            learning_rate: 0.1,
            momentum: 0.0,
        };
        let ce = CrossEntropy::new(2).smoothing(Smoothing::Uniform(1.5));
        let result = train(&data, &ce, &config, &mut SplitMix64::new(0), |_, _| {});
        assert!(matches!(
            result,
            Err(smoothce::Error::InvalidSmoothing { .. })
        ));
    }
}
