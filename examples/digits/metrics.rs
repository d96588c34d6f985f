//! Test-set metrics: accuracy, negative log-likelihood, expected calibration error with
//! equal-width bins, mean confidence, the per-bin statistics of a reliability diagram, and
//! mean ± standard deviation over seeds. All computed in f64 from the model's logits.

/// What the model said about one test image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    /// The largest softmax probability, in `[1/K, 1]`.
    pub confidence: f64,
    /// Whether the most probable class (the first one on ties) is the true class.
    pub correct: bool,
    /// `-ln p(true class)`, from the log-sum-exp form (finite for finite logits).
    pub nll: f64,
}

/// Turns row-major logits `[N, classes]` and the true labels into [`Prediction`]s.
pub fn predictions(logits: &[f32], labels: &[u32], classes: usize) -> Vec<Prediction> {
    logits
        .chunks_exact(classes)
        .zip(labels)
        .map(|(row, &label)| {
            let mut best = 0;
            for (k, &z) in row.iter().enumerate() {
                if z > row[best] {
                    best = k;
                }
            }
            let max = f64::from(row[best]);
            let sum: f64 = row.iter().map(|&z| (f64::from(z) - max).exp()).sum();
            let lse = max + sum.ln();
            Prediction {
                confidence: 1.0 / sum,
                correct: best == label as usize,
                nll: lse - f64::from(row[label as usize]),
            }
        })
        .collect()
}

/// Share of correct predictions (NaN for none).
pub fn accuracy(preds: &[Prediction]) -> f64 {
    mean(preds.iter().map(|p| f64::from(u8::from(p.correct))))
}

/// Mean negative log-likelihood of the true labels (NaN for none).
pub fn nll(preds: &[Prediction]) -> f64 {
    mean(preds.iter().map(|p| p.nll))
}

/// Mean of the top-class probability (NaN for none).
pub fn mean_confidence(preds: &[Prediction]) -> f64 {
    mean(preds.iter().map(|p| p.confidence))
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, count) = values.fold((0.0, 0_usize), |(s, n), v| (s + v, n + 1));
    if count == 0 {
        f64::NAN
    } else {
        sum / count as f64
    }
}

/// One bin of a reliability diagram.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bin {
    /// Lower edge of the bin (exclusive, except 0 for the first bin).
    pub lower: f64,
    /// Upper edge (inclusive).
    pub upper: f64,
    /// Predictions whose confidence falls in the bin.
    pub count: usize,
    /// Their mean confidence (NaN when empty).
    pub confidence: f64,
    /// Their accuracy (NaN when empty).
    pub accuracy: f64,
}

/// Sorts predictions into `bins` equal-width confidence bins `(b/B, (b+1)/B]` (Guo et al. 2017;
/// a confidence of exactly 0 goes into the first bin).
pub fn reliability_bins(preds: &[Prediction], bins: usize) -> Vec<Bin> {
    let bins = bins.max(1);
    let mut count = vec![0_usize; bins];
    let mut conf = vec![0.0; bins];
    let mut correct = vec![0.0; bins];
    for p in preds {
        let b = bin_index(p.confidence, bins);
        count[b] += 1;
        conf[b] += p.confidence;
        correct[b] += f64::from(u8::from(p.correct));
    }
    (0..bins)
        .map(|b| {
            let n = count[b] as f64;
            Bin {
                lower: b as f64 / bins as f64,
                upper: (b + 1) as f64 / bins as f64,
                count: count[b],
                confidence: if count[b] == 0 { f64::NAN } else { conf[b] / n },
                accuracy: if count[b] == 0 {
                    f64::NAN
                } else {
                    correct[b] / n
                },
            }
        })
        .collect()
}

/// The bin of `(b/B, (b+1)/B]` holding `confidence`, clamped to the valid range.
fn bin_index(confidence: f64, bins: usize) -> usize {
    let scaled = (confidence * bins as f64).ceil();
    if scaled.is_nan() || scaled < 1.0 {
        0
    } else {
        (scaled as usize - 1).min(bins - 1)
    }
}

/// Expected calibration error: `sum_b (n_b / N) |accuracy_b - confidence_b|` over `bins`
/// equal-width bins (NaN for no prediction).
pub fn ece(preds: &[Prediction], bins: usize) -> f64 {
    if preds.is_empty() {
        return f64::NAN;
    }
    let total = preds.len() as f64;
    reliability_bins(preds, bins)
        .iter()
        .filter(|b| b.count > 0)
        .map(|b| b.count as f64 / total * (b.accuracy - b.confidence).abs())
        .sum()
}

/// Mean and sample standard deviation (divisor `n - 1`; 0 for one value, NaN for none).
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let m = values.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return (m, 0.0);
    }
    let var = values.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / (n - 1) as f64;
    (m, var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pred(confidence: f64, correct: bool) -> Prediction {
        Prediction {
            confidence,
            correct,
            nll: 0.0,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn predictions_from_logits() {
        // Row 0: uniform over 4 classes, ties go to class 0 (label 0: correct).
        // Row 1: p = [1/(1+e+e^2)...]: class 2 wins, label 1: wrong.
        let logits = [0.0_f32, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0, f32::NEG_INFINITY];
        let preds = predictions(&logits, &[0, 1], 4);
        assert_eq!(preds.len(), 2);
        assert!(close(preds[0].confidence, 0.25));
        assert!(preds[0].correct);
        assert!(close(preds[0].nll, 4.0_f64.ln()));
        let e = 1.0_f64.exp();
        let z = 1.0 + e + e * e;
        assert!(close(preds[1].confidence, e * e / z));
        assert!(!preds[1].correct);
        assert!(close(preds[1].nll, z.ln() - 1.0));
        assert!(close(accuracy(&preds), 0.5));
        assert!(close(nll(&preds), (4.0_f64.ln() + z.ln() - 1.0) / 2.0));
        assert!(close(
            mean_confidence(&preds),
            f64::midpoint(0.25, e * e / z)
        ));
    }

    #[test]
    fn nll_stays_finite_for_confident_mistakes() {
        let preds = predictions(&[0.0, 200.0], &[0], 2);
        assert!(close(preds[0].nll, 200.0));
        assert!(close(preds[0].confidence, 1.0));
    }

    #[test]
    fn nll_agrees_with_the_crates_unsmoothed_loss() {
        let logits = [0.3_f32, -1.2, 2.5, 0.0, 1.0, -0.5, 4.0, 2.0, -3.0];
        let labels = [2_u32, 0, 1];
        let mut losses = [0.0_f32; 3];
        let crate_mean = smoothce::CrossEntropy::new(3)
            .forward(&logits, &labels, &mut losses)
            .unwrap();
        let ours = nll(&predictions(&logits, &labels, 3));
        assert!((ours - f64::from(crate_mean)).abs() < 1e-6);
    }

    #[test]
    fn perfectly_calibrated_predictions_have_zero_ece() {
        // Confidence 0.75 in one bin with 3 of 4 right; confidence 1.0 always right.
        let preds = [
            pred(0.75, true),
            pred(0.75, true),
            pred(0.75, true),
            pred(0.75, false),
            pred(1.0, true),
            pred(1.0, true),
        ];
        assert!(close(ece(&preds, 15), 0.0));
    }

    #[test]
    fn ece_of_a_known_case() {
        // Bin (0.8, 0.867]: 0.85 x2, 1 of 2 right -> gap 0.35, weight 2/5.
        // Bin (0.933, 1.0]: 0.95, 1.0, 1.0, all right -> conf 0.98333, gap 0.01667, weight 3/5.
        let preds = [
            pred(0.85, true),
            pred(0.85, false),
            pred(0.95, true),
            pred(1.0, true),
            pred(1.0, true),
        ];
        let expected = 0.4 * 0.35 + 0.6 * (2.95 / 3.0 - 1.0_f64).abs();
        assert!(close(ece(&preds, 15), expected), "{}", ece(&preds, 15));
        // One bin: |mean confidence - accuracy|.
        assert!(close(ece(&preds, 1), (4.65_f64 / 5.0 - 0.8).abs()));
        // An always-wrong, always-certain model has ECE 1.
        assert!(close(ece(&[pred(1.0, false), pred(1.0, false)], 15), 1.0));
    }

    #[test]
    fn bins_are_equal_width_and_right_closed() {
        let bins = reliability_bins(
            &[pred(0.2, true), pred(0.2 + 1e-9, false), pred(0.0, true)],
            5,
        );
        assert_eq!(bins.len(), 5);
        assert!(close(bins[0].lower, 0.0) && close(bins[0].upper, 0.2));
        assert!(close(bins[4].upper, 1.0));
        // 0.2 sits on the upper edge of bin 0; just above it is bin 1; 0 goes to bin 0.
        assert_eq!(bins[0].count, 2);
        assert_eq!(bins[1].count, 1);
        assert!(close(bins[0].accuracy, 1.0));
        assert!(close(bins[1].accuracy, 0.0));
        assert!(bins[2].confidence.is_nan() && bins[2].count == 0);
        assert_eq!(bin_index(1.0, 15), 14);
        assert_eq!(bin_index(1.0 / 15.0, 15), 0);
    }

    #[test]
    fn empty_inputs_give_nan_not_a_panic() {
        assert!(accuracy(&[]).is_nan());
        assert!(nll(&[]).is_nan());
        assert!(ece(&[], 15).is_nan());
        assert!(mean_confidence(&[]).is_nan());
        assert!(predictions(&[], &[], 10).is_empty());
    }

    #[test]
    fn mean_and_sample_std() {
        let (m, s) = mean_std(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
        assert!(close(m, 5.0));
        assert!(close(s, (32.0_f64 / 7.0).sqrt()));
        assert_eq!(mean_std(&[3.0]), (3.0, 0.0));
        assert!(mean_std(&[]).0.is_nan());
    }
}
