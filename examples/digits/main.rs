//! Label smoothing under label noise, on real data: a one-hidden-layer MLP trained on the UCI
//! optical handwritten digits (bundled in `data/`) with `smoothce`'s fused loss and gradient.
//!
//! It compares hard labels, `Smoothing::Uniform(eps)` (PyTorch's `label_smoothing`) and
//! `Smoothing::OffTarget(eps)` with a share of the training labels flipped at random, over several
//! seeds, on a held-out test split: accuracy, NLL, expected calibration error (15 bins) and mean
//! confidence as mean ± std, what the numbers show, and an SVG reliability diagram.
//!
//! ```text
//! cargo run --release --example digits
//! cargo run --release --example digits -- --help
//! ```
//!
//! Modules: `data` (loading, split, label flips), `model` (the MLP and SGD), `metrics`,
//! `report` (table and findings), `svg` (the diagram), `cli` (flags), `rng` (SplitMix64).

// Long straight-line functions (the run, the findings, one SVG panel) read better whole here.
#![allow(clippy::too_many_lines)]

mod cli;
mod data;
mod metrics;
mod model;
mod report;
mod rng;
mod svg;

use std::fmt;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use smoothce::{CrossEntropy, Reduction, Smoothing};

use crate::cli::{Command, Options};
use crate::data::{DataError, CLASSES};
use crate::model::TrainConfig;
use crate::report::{Cell, Results, RunMetrics};
use crate::rng::SplitMix64;

/// Calibration bins, for the ECE and the diagram.
const BINS: usize = 15;

/// Everything that can stop a run, each with a message for the user.
#[derive(Debug)]
enum AppError {
    Data(DataError),
    Loss(smoothce::Error),
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    TooFewImages {
        train: usize,
        test: usize,
    },
}

impl fmt::Display for AppError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AppError::Data(e) => write!(f, "{e}"),
            AppError::Loss(e) => write!(f, "the loss rejected its arguments: {e}"),
            AppError::Write { path, source } => {
                write!(f, "cannot write {}: {source}", path.display())
            }
            AppError::TooFewImages { train, test } => write!(
                f,
                "the split left {train} training and {test} test images; \
                 use more data or another --test-fraction"
            ),
        }
    }
}

impl From<DataError> for AppError {
    fn from(e: DataError) -> Self {
        AppError::Data(e)
    }
}

impl From<smoothce::Error> for AppError {
    fn from(e: smoothce::Error) -> Self {
        AppError::Loss(e)
    }
}

fn main() -> ExitCode {
    let args: Result<Vec<String>, String> = std::env::args_os()
        .skip(1)
        .map(|a| {
            a.into_string()
                .map_err(|a| format!("argument \"{}\" is not valid UTF-8", a.display()))
        })
        .collect();
    match args.and_then(cli::parse) {
        Ok(Command::Help) => {
            print!("{}", cli::usage());
            ExitCode::SUCCESS
        }
        Ok(Command::Run(options)) => match run(&options) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}

/// The three losses compared, hard labels first (the baseline of the findings).
fn methods(eps: f32) -> Vec<(String, Smoothing)> {
    vec![
        ("hard labels".to_string(), Smoothing::Uniform(0.0)),
        (format!("Uniform({eps})"), Smoothing::Uniform(eps)),
        (format!("OffTarget({eps})"), Smoothing::OffTarget(eps)),
    ]
}

/// Shows progress on stderr: one updating line on a terminal, one line per model otherwise.
struct Progress {
    total: usize,
    done: usize,
    terminal: bool,
    started: Instant,
}

impl Progress {
    fn epoch(&self, what: &str, epoch: usize, epochs: usize, loss: f64) {
        if self.terminal {
            eprint!(
                "\r\x1b[2K[{:>3}/{}] {what}  epoch {epoch:>3}/{epochs}  train loss {loss:.3}",
                self.done + 1,
                self.total
            );
            let _ = std::io::stderr().flush();
        }
    }

    fn finished(&mut self, what: &str, train_loss: f64, accuracy: f64) {
        self.done += 1;
        if !self.terminal {
            eprintln!(
                "[{:>3}/{}] {what}: final train loss {train_loss:.3}, test accuracy {:.1}% ({:.1} s)",
                self.done,
                self.total,
                100.0 * accuracy,
                self.started.elapsed().as_secs_f64()
            );
        } else if self.done == self.total {
            eprintln!(
                "\r\x1b[2Ktrained {} models in {:.1} s",
                self.total,
                self.started.elapsed().as_secs_f64()
            );
        }
    }
}

fn run(o: &Options) -> Result<(), AppError> {
    let started = Instant::now();
    let data = data::load_gz(&o.data)?;
    // Fail before training, not after, if the diagram cannot be written: its folder is made and
    // the file created now, and written when the results are in.
    let write_error = |source| AppError::Write {
        path: o.out.clone(),
        source,
    };
    if let Some(parent) = o.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(write_error)?;
    }
    let diagram = std::fs::File::create(&o.out).map_err(write_error)?;
    let methods = methods(o.eps);
    let config = TrainConfig {
        hidden: o.hidden,
        epochs: o.epochs,
        batch: 32,
        learning_rate: 0.05,
        momentum: 0.9,
    };
    println!(
        "smoothce digits: {} images of 8x8 pixels, {CLASSES} classes, from {}",
        data.len(),
        relative(&o.data).display()
    );
    println!(
        "MLP 64-{}-10 (ReLU), SGD lr {} momentum {} batch {}, {} epochs; {} seeds from {}; \
         {:.0}% of each class held out for testing",
        config.hidden,
        config.learning_rate,
        config.momentum,
        config.batch,
        config.epochs,
        o.seeds,
        o.seed,
        100.0 * o.test_fraction
    );
    println!("kernel backend: {:?}", smoothce::Backend::Auto.resolve());

    let mut cells: Vec<Vec<Cell>> = vec![vec![Cell::default(); methods.len()]; o.noise.len()];
    let mut progress = Progress {
        total: o.seeds * o.noise.len() * methods.len(),
        done: 0,
        terminal: std::io::stderr().is_terminal(),
        started,
    };
    let mut sizes = (0, 0);
    for s in 0..o.seeds as u64 {
        let seed = o.seed.wrapping_add(s);
        // Per seed: one split, one set of flips per noise level, one initialisation and batch
        // order shared by all methods, so that the methods are compared on equal terms.
        let (train_idx, test_idx) = data::stratified_split(
            &data.labels,
            o.test_fraction,
            &mut SplitMix64::derive(seed, 1),
        );
        if train_idx.is_empty() || test_idx.is_empty() {
            return Err(AppError::TooFewImages {
                train: train_idx.len(),
                test: test_idx.len(),
            });
        }
        let clean = data.select(&train_idx);
        let test = data.select(&test_idx);
        sizes = (clean.len(), test.len());
        for (n, &noise) in o.noise.iter().enumerate() {
            let noise_stream = 2 + 16 * (noise * 1000.0).round() as u64;
            let (labels, _) = data::flip_labels(
                &clean.labels,
                noise,
                CLASSES,
                &mut SplitMix64::derive(seed, noise_stream),
            );
            let train = data::Dataset {
                labels,
                ..clean.clone()
            };
            for (m, (name, smoothing)) in methods.iter().enumerate() {
                let ce = CrossEntropy::new(CLASSES)
                    .smoothing(*smoothing)
                    .reduction(Reduction::Mean);
                let what = format!("{} flipped, {name}, seed {seed}", report::percent(noise));
                let mut train_loss = f64::NAN;
                let model = model::train(
                    &train,
                    &ce,
                    &config,
                    &mut SplitMix64::derive(seed, 3),
                    |epoch, loss| {
                        train_loss = loss;
                        progress.epoch(&what, epoch, config.epochs, loss);
                    },
                )?;
                let preds = metrics::predictions(&model.predict(&test), &test.labels, CLASSES);
                let run = RunMetrics::from_predictions(&preds, BINS);
                progress.finished(&what, train_loss, run.accuracy);
                cells[n][m].runs.push(run);
                cells[n][m].pooled.extend(preds);
            }
        }
    }

    let results = Results {
        noise: o.noise.clone(),
        methods: methods.iter().map(|(name, _)| name.clone()).collect(),
        cells,
    };
    println!(
        "\nTest-set results: mean ± std over {}; {} training and {} test images per seed; \
         ECE with {BINS} equal-width bins.\n",
        plural(o.seeds, "seed"),
        sizes.0,
        sizes.1
    );
    print!("{}", report::table(&results));
    println!("\nWhat the numbers show:");
    for line in report::findings(&results) {
        println!("- {line}");
    }

    write_diagram(o, &results, sizes.1, diagram)?;
    println!("\nReliability diagram: {}", relative(&o.out).display());
    eprintln!("done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// `3 seeds`, `1 seed`.
fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// `path` relative to the working directory when it lies inside it, for shorter messages.
fn relative(path: &Path) -> &Path {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok())
        .unwrap_or(path)
}

fn write_diagram(
    o: &Options,
    results: &Results,
    test_size: usize,
    mut file: std::fs::File,
) -> Result<(), AppError> {
    let panels: Vec<svg::Panel> = results
        .cells
        .iter()
        .zip(&results.noise)
        .map(|(row, &noise)| svg::Panel {
            title: format!("{} of training labels flipped", report::percent(noise)),
            series: row
                .iter()
                .zip(&results.methods)
                .map(|(cell, name)| svg::Series {
                    label: name.clone(),
                    bins: metrics::reliability_bins(&cell.pooled, BINS),
                    ece: metrics::mean_std(&cell.runs.iter().map(|r| r.ece).collect::<Vec<_>>()).0,
                })
                .collect(),
        })
        .collect();
    let document = svg::reliability_diagram(
        &format!(
            "Reliability on UCI digits: hard labels vs label smoothing (eps = {})",
            o.eps
        ),
        &format!(
            "MLP 64-{}-10, {} epochs; {} test images × {} per line; ECE = mean over seeds",
            o.hidden,
            o.epochs,
            test_size,
            plural(o.seeds, "seed")
        ),
        &panels,
    );
    file.write_all(document.as_bytes())
        .map_err(|source| AppError::Write {
            path: o.out.clone(),
            source,
        })
}
