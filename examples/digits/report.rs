//! The results table and the plain-language findings, both computed from the numbers.

use std::fmt::Write;

use crate::metrics::{self, Prediction};

/// Test-set metrics of one trained model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunMetrics {
    /// Share correct, in `[0, 1]`.
    pub accuracy: f64,
    /// Mean negative log-likelihood.
    pub nll: f64,
    /// Expected calibration error, 15 bins, in `[0, 1]`.
    pub ece: f64,
    /// Mean top-class probability, in `[0, 1]`.
    pub confidence: f64,
}

impl RunMetrics {
    /// Computes every metric from the test predictions.
    pub fn from_predictions(preds: &[Prediction], bins: usize) -> RunMetrics {
        RunMetrics {
            accuracy: metrics::accuracy(preds),
            nll: metrics::nll(preds),
            ece: metrics::ece(preds, bins),
            confidence: metrics::mean_confidence(preds),
        }
    }
}

/// All runs of one (noise level, method) pair.
#[derive(Debug, Clone, Default)]
pub struct Cell {
    /// One entry per seed, in seed order.
    pub runs: Vec<RunMetrics>,
    /// Every seed's test predictions, for the reliability diagram.
    pub pooled: Vec<Prediction>,
}

/// The whole experiment.
#[derive(Debug, Clone)]
pub struct Results {
    /// Fractions of training labels flipped.
    pub noise: Vec<f64>,
    /// Method names; the first is the baseline (hard labels).
    pub methods: Vec<String>,
    /// `cells[noise][method]`.
    pub cells: Vec<Vec<Cell>>,
}

/// The metrics the table shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Metric {
    Accuracy,
    Nll,
    Ece,
    Confidence,
}

impl Metric {
    fn of(self, m: &RunMetrics) -> f64 {
        match self {
            Metric::Accuracy => m.accuracy,
            Metric::Nll => m.nll,
            Metric::Ece => m.ece,
            Metric::Confidence => m.confidence,
        }
    }

    /// Factor for display: percentages for shares, raw for the NLL.
    fn scale(self) -> f64 {
        if self == Metric::Nll {
            1.0
        } else {
            100.0
        }
    }

    fn format(self, v: f64) -> String {
        if self == Metric::Nll {
            format!("{v:.3}")
        } else {
            format!("{:.1}", v * 100.0)
        }
    }

    fn unit(self) -> &'static str {
        if self == Metric::Nll {
            ""
        } else {
            " points"
        }
    }

    fn name(self) -> &'static str {
        match self {
            Metric::Accuracy => "accuracy",
            Metric::Nll => "NLL",
            Metric::Ece => "ECE",
            Metric::Confidence => "mean confidence",
        }
    }

    fn higher_is_better(self) -> bool {
        self == Metric::Accuracy
    }
}

fn values(cell: &Cell, metric: Metric) -> Vec<f64> {
    cell.runs.iter().map(|r| metric.of(r)).collect()
}

fn mean(cell: &Cell, metric: Metric) -> f64 {
    metrics::mean_std(&values(cell, metric)).0
}

/// A percentage for a noise level, e.g. `20%`.
pub fn percent(fraction: f64) -> String {
    format!("{:.0}%", fraction * 100.0)
}

/// The results table, mean ± std over seeds.
pub fn table(results: &Results) -> String {
    let name_width = results
        .methods
        .iter()
        .map(String::len)
        .max()
        .unwrap_or(0)
        .max(6);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<7} {:<name_width$}  {:>15}  {:>15}  {:>13}  {:>15}",
        "flipped", "method", "accuracy (%)", "NLL", "ECE (%)", "mean conf. (%)"
    );
    let rule = 7 + 1 + name_width + 2 + 15 + 2 + 15 + 2 + 13 + 2 + 15;
    let _ = writeln!(s, "{}", "-".repeat(rule));
    for (n, row) in results.cells.iter().enumerate() {
        for (m, cell) in row.iter().enumerate() {
            let cols: Vec<String> = [
                Metric::Accuracy,
                Metric::Nll,
                Metric::Ece,
                Metric::Confidence,
            ]
            .iter()
            .map(|&metric| {
                let (mu, sd) = metrics::mean_std(&values(cell, metric));
                if metric == Metric::Nll {
                    format!("{mu:.3} ± {sd:.3}")
                } else {
                    format!("{:.1} ± {:.1}", mu * 100.0, sd * 100.0)
                }
            })
            .collect();
            let noise = if m == 0 {
                percent(results.noise[n])
            } else {
                String::new()
            };
            let _ = writeln!(
                s,
                "{noise:<7} {:<name_width$}  {:>15}  {:>15}  {:>13}  {:>15}",
                results.methods[m], cols[0], cols[1], cols[2], cols[3]
            );
        }
    }
    s
}

/// Whether a mean difference `d` on `metric` is an improvement (rounding noise is not).
fn is_better(metric: Metric, d: f64) -> bool {
    const TIE: f64 = 1e-9;
    if metric.higher_is_better() {
        d > TIE
    } else {
        d < -TIE
    }
}

/// Mean seed-by-seed difference of `method` minus the baseline (method 0) on `metric`.
fn mean_difference(row: &[Cell], method: usize, metric: Metric) -> (f64, Vec<f64>) {
    let base = values(&row[0], metric);
    let other = values(&row[method], metric);
    let diffs: Vec<f64> = other.iter().zip(&base).map(|(o, b)| o - b).collect();
    (metrics::mean_std(&diffs).0, diffs)
}

/// How `method` compares with the baseline on `metric`, e.g.
/// `ECE +11.0 points (worse; higher in 5 of 5 seeds)`.
fn versus_baseline(row: &[Cell], method: usize, metric: Metric) -> String {
    let (d, diffs) = mean_difference(row, method, metric);
    let prec = if metric == Metric::Nll { 3 } else { 1 };
    let shown = format!("{:+.prec$}", d * metric.scale());
    if d == 0.0
        || shown
            .trim_start_matches(['+', '-'])
            .chars()
            .all(|c| c == '0' || c == '.')
    {
        return format!("{} unchanged ({shown}{})", metric.name(), metric.unit());
    }
    let agreeing = diffs.iter().filter(|&&x| x * d > 0.0).count();
    format!(
        "{} {shown}{} ({}; {} in {agreeing} of {} seeds)",
        metric.name(),
        metric.unit(),
        if is_better(metric, d) {
            "better"
        } else {
            "worse"
        },
        if d > 0.0 { "higher" } else { "lower" },
        diffs.len(),
    )
}

/// The method with the best mean on `metric` in a row, and that mean.
fn best(results: &Results, row: &[Cell], metric: Metric) -> (String, f64) {
    let mut best = 0;
    for m in 1..row.len() {
        let (a, b) = (mean(&row[m], metric), mean(&row[best], metric));
        let better = if metric.higher_is_better() {
            a > b
        } else {
            a < b
        };
        if better {
            best = m;
        }
    }
    (results.methods[best].clone(), mean(&row[best], metric))
}

/// Plain statements of what the numbers show, computed from them.
pub fn findings(results: &Results) -> Vec<String> {
    let mut out = Vec::new();
    let methods = results.methods.len();
    let levels = results.noise.len();
    if methods == 0 || levels == 0 {
        return out;
    }

    // 1. What the label noise does to each method.
    if levels > 1 {
        let (lo, hi) = (0, levels - 1);
        let parts: Vec<String> = (0..methods)
            .map(|m| {
                format!(
                    "{} {:.1}% → {:.1}%",
                    results.methods[m],
                    100.0 * mean(&results.cells[lo][m], Metric::Accuracy),
                    100.0 * mean(&results.cells[hi][m], Metric::Accuracy)
                )
            })
            .collect();
        out.push(format!(
            "Test accuracy from {} to {} of training labels flipped: {}.",
            percent(results.noise[lo]),
            percent(results.noise[hi]),
            parts.join("; ")
        ));
    }

    // 2. Each smoothing method against hard labels: the summary, then per noise level.
    for m in 1..methods {
        let parts: Vec<String> = [Metric::Accuracy, Metric::Nll, Metric::Ece]
            .iter()
            .map(|&metric| {
                let better = results
                    .cells
                    .iter()
                    .filter(|row| is_better(metric, mean_difference(row, m, metric).0))
                    .count();
                format!("better {} at {better} of {levels}", metric.name())
            })
            .collect();
        out.push(format!(
            "In short, {} against {}: {} noise levels (comparing means over seeds).",
            results.methods[m],
            results.methods[0],
            parts.join(", ")
        ));
    }
    for (n, row) in results.cells.iter().enumerate() {
        for m in 1..methods {
            out.push(format!(
                "{} flipped, {} vs {}: {}; {}; {}.",
                percent(results.noise[n]),
                results.methods[m],
                results.methods[0],
                versus_baseline(row, m, Metric::Accuracy),
                versus_baseline(row, m, Metric::Nll),
                versus_baseline(row, m, Metric::Ece),
            ));
        }
    }

    // 3. Over- or under-confidence: mean confidence minus accuracy.
    for m in 0..methods {
        let gaps: Vec<f64> = (0..levels)
            .map(|n| {
                let cell = &results.cells[n][m];
                mean(cell, Metric::Confidence) - mean(cell, Metric::Accuracy)
            })
            .collect();
        let listed: Vec<String> = gaps
            .iter()
            .zip(&results.noise)
            .map(|(g, &noise)| format!("{:+.1} at {}", 100.0 * g, percent(noise)))
            .collect();
        let verdict = if gaps.iter().all(|&g| g > 0.0) {
            "over-confident at every noise level"
        } else if gaps.iter().all(|&g| g < 0.0) {
            "under-confident at every noise level"
        } else {
            "over-confident at some noise levels and under-confident at others"
        };
        out.push(format!(
            "{}: {verdict} (mean confidence minus accuracy, in points: {}).",
            results.methods[m],
            listed.join(", ")
        ));
    }
    let noisy: Vec<String> = results
        .noise
        .iter()
        .zip(&results.cells)
        .filter(|(&r, _)| r > 0.0)
        .map(|(&r, row)| {
            format!(
                "{:.0}% at {} flipped (hard-label mean confidence {:.1}%)",
                100.0 * (1.0 - r),
                percent(r),
                100.0 * mean(&row[0], Metric::Confidence)
            )
        })
        .collect();
    if !noisy.is_empty() {
        out.push(format!(
            "For reference, a model that reproduced the noisy training labels' own distribution \
             would give the true class a probability of {}.",
            noisy.join(", ")
        ));
    }

    // 4. The best method per metric and noise level.
    for metric in [Metric::Accuracy, Metric::Nll, Metric::Ece] {
        let parts: Vec<String> = results
            .cells
            .iter()
            .enumerate()
            .map(|(n, row)| {
                let (name, v) = best(results, row, metric);
                format!(
                    "{} {name} ({})",
                    percent(results.noise[n]),
                    metric.format(v)
                )
            })
            .collect();
        let label = if metric.higher_is_better() {
            "Best mean"
        } else {
            "Lowest mean"
        };
        out.push(format!("{label} {}: {}.", metric.name(), parts.join("; ")));
    }

    // 5. The two smoothing conventions against each other (methods 1 and 2), if both are there.
    if methods >= 3 {
        let mut widest = [0.0_f64; 2];
        let mut spread = [0.0_f64; 2];
        for row in &results.cells {
            for (i, metric) in [Metric::Accuracy, Metric::Ece].into_iter().enumerate() {
                let d = (mean(&row[2], metric) - mean(&row[1], metric)).abs();
                widest[i] = widest[i].max(d);
                let sd = metrics::mean_std(&values(&row[1], metric))
                    .1
                    .max(metrics::mean_std(&values(&row[2], metric)).1);
                spread[i] = spread[i].max(sd);
            }
        }
        let seeds = results.cells[0][1].runs.len();
        let (pair, a, e) = (
            format!("{} and {}", results.methods[1], results.methods[2]),
            100.0 * widest[0],
            100.0 * widest[1],
        );
        if seeds < 2 {
            out.push(format!(
                "{pair} differ by at most {a:.1} accuracy points and {e:.1} ECE points across \
                 noise levels (one seed: no seed-to-seed spread to compare with)."
            ));
        } else {
            let relation = |d: f64, sd: f64| if d <= sd { "within" } else { "larger than" };
            out.push(format!(
                "{pair} differ by at most {a:.1} accuracy points ({} the largest seed-to-seed \
                 standard deviation of either, {:.1}) and {e:.1} ECE points ({} it, {:.1}) across \
                 noise levels.",
                relation(widest[0], spread[0]),
                100.0 * spread[0],
                relation(widest[1], spread[1]),
                100.0 * spread[1],
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(accuracy: f64, ece: f64, confidence: f64) -> RunMetrics {
        RunMetrics {
            accuracy,
            nll: 1.0 - accuracy,
            ece,
            confidence,
        }
    }

    fn results() -> Results {
        let cell = |runs: Vec<RunMetrics>| Cell {
            runs,
            pooled: Vec::new(),
        };
        Results {
            noise: vec![0.0, 0.4],
            methods: vec!["hard".into(), "U".into(), "O".into()],
            cells: vec![
                vec![
                    cell(vec![run(0.95, 0.02, 0.97), run(0.97, 0.02, 0.98)]),
                    cell(vec![run(0.96, 0.03, 0.93), run(0.96, 0.05, 0.92)]),
                    cell(vec![run(0.96, 0.03, 0.93), run(0.96, 0.05, 0.92)]),
                ],
                vec![
                    cell(vec![run(0.80, 0.15, 0.95), run(0.82, 0.13, 0.95)]),
                    cell(vec![run(0.85, 0.05, 0.80), run(0.81, 0.06, 0.80)]),
                    cell(vec![run(0.86, 0.05, 0.80), run(0.82, 0.06, 0.80)]),
                ],
            ],
        }
    }

    #[test]
    fn the_table_has_a_row_per_cell_with_mean_and_std() {
        let t = table(&results());
        assert_eq!(t.lines().count(), 2 + 6);
        // hard at 0%: accuracy 96.0 ± 1.4 (sample std of 95 and 97).
        assert!(t.contains("96.0 ± 1.4"), "{t}");
        assert!(t.lines().nth(2).unwrap().starts_with("0%"));
        assert!(t.lines().nth(5).unwrap().starts_with("40%"));
    }

    #[test]
    fn findings_follow_the_numbers() {
        let f = findings(&results());
        let all = f.join("\n");
        assert!(all.contains("hard 96.0% → 81.0%"), "{all}");
        // At 40%, U vs hard: accuracy +2.0 points, higher in 1 of 2 seeds (0.85>0.80, 0.81<0.82).
        assert!(
            all.contains(
                "40% flipped, U vs hard: accuracy +2.0 points (better; higher in 1 of 2 seeds)"
            ),
            "{all}"
        );
        assert!(
            all.contains("ECE -8.5 points (better; lower in 2 of 2 seeds)"),
            "{all}"
        );
        // At 0%, U vs hard: accuracy unchanged; ECE +2.0 (worse; higher in 2 of 2).
        assert!(
            all.contains("0% flipped, U vs hard: accuracy unchanged"),
            "{all}"
        );
        assert!(
            all.contains("ECE +2.0 points (worse; higher in 2 of 2 seeds)"),
            "{all}"
        );
        assert!(
            all.contains("U against hard: better accuracy at 1 of 2, better NLL at 1 of 2, better ECE at 1 of 2"),
            "{all}"
        );
        // hard is over-confident at both levels; U is under-confident at 0% and 40%.
        assert!(
            all.contains("hard: over-confident at every noise level"),
            "{all}"
        );
        assert!(
            all.contains("U: under-confident at every noise level"),
            "{all}"
        );
        assert!(
            all.contains("probability of 60% at 40% flipped (hard-label mean confidence 95.0%)"),
            "{all}"
        );
        assert!(
            all.contains("Lowest mean ECE: 0% hard (2.0); 40% U (5.5)"),
            "{all}"
        );
        assert!(
            all.contains("Best mean accuracy: 0% hard (96.0); 40% O (84.0)"),
            "{all}"
        );
        assert!(
            all.contains("differ by at most 1.0 accuracy points (within the largest"),
            "{all}"
        );
    }
}
