//! Command-line flags, parsed by hand from `std::env::args`.

use std::fmt::Write;
use std::path::PathBuf;

/// Everything a run depends on. Same options, same numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// Smoothing `eps` for both `Uniform` and `OffTarget`.
    pub eps: f32,
    /// Fractions of training labels flipped, one experiment each.
    pub noise: Vec<f64>,
    /// Training epochs.
    pub epochs: usize,
    /// Number of seeds per configuration.
    pub seeds: usize,
    /// The first seed; seeds are `seed, seed + 1, ...`.
    pub seed: u64,
    /// Hidden units of the MLP.
    pub hidden: usize,
    /// Share of each class held out for testing.
    pub test_fraction: f64,
    /// Where the SVG reliability diagram goes.
    pub out: PathBuf,
    /// The gzip-compressed digits CSV.
    pub data: PathBuf,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            eps: 0.1,
            noise: vec![0.0, 0.2, 0.4],
            epochs: 40,
            seeds: 5,
            seed: 2024,
            hidden: 64,
            test_fraction: 0.25,
            out: PathBuf::from("target/digits-reliability.svg"),
            data: default_data_path(),
        }
    }
}

/// The bundled data file, found relative to the crate that built the example.
pub fn default_data_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("data")
        .join("digits.csv.gz")
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Run the experiment.
    Run(Options),
    /// Print [`usage`] and exit.
    Help,
}

/// The `--help` text.
pub fn usage() -> String {
    let d = Options::default();
    let mut s = String::new();
    let _ = write!(
        s,
        "\
Train a one-hidden-layer MLP on the UCI handwritten digits with smoothce's fused loss, comparing
hard labels, Uniform(eps) and OffTarget(eps) label smoothing under random label flips.

USAGE:
    cargo run --release --example digits -- [OPTIONS]

OPTIONS:
    --eps <E>            smoothing for Uniform and OffTarget, in [0, 1)     [default: {eps}]
    --noise <LIST>       comma-separated fractions of training labels flipped
                         to another class, each in [0, 1]                    [default: {noise}]
    --epochs <N>         training epochs                                     [default: {epochs}]
    --seeds <N>          seeds per configuration (mean ± std over them)      [default: {seeds}]
    --seed <S>           first seed (seeds S, S+1, ...)                      [default: {seed}]
    --hidden <N>         hidden units                                        [default: {hidden}]
    --test-fraction <F>  share of each class held out for testing, (0, 1)    [default: {test}]
    --out <PATH>         where to write the SVG reliability diagram          [default: {out}]
    --data <PATH>        the gzip-compressed digits CSV            [default: data/digits.csv.gz]
    -h, --help           print this help

Each seed fixes the train/test split, the label flips, the initial weights and the batch order;
the same options give the same numbers on every run. Progress goes to stderr, results to stdout.
",
        eps = d.eps,
        noise = join(&d.noise),
        epochs = d.epochs,
        seeds = d.seeds,
        seed = d.seed,
        hidden = d.hidden,
        test = d.test_fraction,
        out = d.out.display(),
    );
    s
}

fn join(values: &[f64]) -> String {
    values
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses the arguments after the program name. Accepts `--flag value` and `--flag=value`.
///
/// # Errors
///
/// A message naming the flag and what is wrong, for unknown flags, missing or malformed values.
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Command, String> {
    let mut o = Options::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        if flag == "-h" || flag == "--help" {
            return Ok(Command::Help);
        }
        let known = [
            "--eps",
            "--noise",
            "--epochs",
            "--seeds",
            "--seed",
            "--hidden",
            "--test-fraction",
            "--out",
            "--data",
        ];
        if !known.contains(&flag.as_str()) {
            return Err(format!("unknown argument {arg:?} (try --help)"));
        }
        let value = match inline {
            Some(v) => v,
            None => args
                .next()
                .ok_or_else(|| format!("{flag} needs a value (try --help)"))?,
        };
        match flag.as_str() {
            "--eps" => {
                o.eps = number(&flag, &value)?;
                if !(0.0..1.0).contains(&o.eps) {
                    return Err(format!("--eps must be in [0, 1), got {value}"));
                }
            }
            "--noise" => {
                o.noise = value
                    .split(',')
                    .map(|v| {
                        let f: f64 = number(&flag, v.trim())?;
                        if (0.0..=1.0).contains(&f) {
                            Ok(f)
                        } else {
                            Err(format!(
                                "--noise values are fractions in [0, 1], got {v} (20% is 0.2)"
                            ))
                        }
                    })
                    .collect::<Result<_, _>>()?;
                if o.noise.len() > MAX_NOISE_LEVELS {
                    return Err(format!(
                        "--noise takes at most {MAX_NOISE_LEVELS} levels, got {}",
                        o.noise.len()
                    ));
                }
            }
            "--epochs" => o.epochs = bounded(&flag, &value, MAX_EPOCHS)?,
            "--seeds" => o.seeds = bounded(&flag, &value, MAX_SEEDS)?,
            "--seed" => o.seed = number(&flag, &value)?,
            "--hidden" => o.hidden = bounded(&flag, &value, MAX_HIDDEN)?,
            "--test-fraction" => {
                o.test_fraction = number(&flag, &value)?;
                if !(o.test_fraction > 0.0 && o.test_fraction < 1.0) {
                    return Err(format!("--test-fraction must be in (0, 1), got {value}"));
                }
            }
            "--out" => o.out = PathBuf::from(value),
            _ => o.data = PathBuf::from(value),
        }
    }
    Ok(Command::Run(o))
}

fn number<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("{flag}: cannot read {value:?} as a number"))
}

/// Upper bounds of the counting flags: far beyond any useful run, low enough that the model, the
/// predictions kept for the diagram and the run count fit in memory and in a `usize`.
const MAX_EPOCHS: usize = 100_000;
const MAX_SEEDS: usize = 1_000;
const MAX_HIDDEN: usize = 4_096;
const MAX_NOISE_LEVELS: usize = 20;

/// A count in `1..=max`.
fn bounded(flag: &str, value: &str, max: usize) -> Result<usize, String> {
    match number::<usize>(flag, value)? {
        0 => Err(format!("{flag} must be at least 1")),
        n if n > max => Err(format!("{flag} must be at most {max}, got {n}")),
        n => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Options, String> {
        match parse(args.iter().map(|s| (*s).to_string()))? {
            Command::Run(o) => Ok(o),
            Command::Help => Err("help".to_string()),
        }
    }

    #[test]
    fn no_arguments_give_the_defaults() {
        assert_eq!(run(&[]).unwrap(), Options::default());
    }

    #[test]
    fn every_flag_in_both_spellings() {
        let o = run(&[
            "--eps=0.2",
            "--noise",
            "0, 0.5",
            "--epochs",
            "3",
            "--seeds=2",
            "--seed",
            "7",
            "--hidden",
            "16",
            "--test-fraction=0.3",
            "--out",
            "x.svg",
            "--data=d.csv.gz",
        ])
        .unwrap();
        assert_eq!(o.eps, 0.2);
        assert_eq!(o.noise, vec![0.0, 0.5]);
        assert_eq!((o.epochs, o.seeds, o.seed, o.hidden), (3, 2, 7, 16));
        assert_eq!(o.test_fraction, 0.3);
        assert_eq!(o.out, PathBuf::from("x.svg"));
        assert_eq!(o.data, PathBuf::from("d.csv.gz"));
    }

    #[test]
    fn help_wins() {
        assert_eq!(
            parse(["--epochs", "3", "--help"].map(String::from)),
            Ok(Command::Help)
        );
        assert!(usage().contains("--noise <LIST>"));
    }

    #[test]
    fn bad_input_is_a_message() {
        for (args, needle) in [
            (&["--bogus"][..], "unknown argument"),
            (&["--epochs"][..], "needs a value"),
            (&["--epochs", "ten"][..], "cannot read"),
            (&["--epochs", "0"][..], "at least 1"),
            (&["--epochs", "100001"][..], "at most 100000"),
            // Within a 32-bit usize (wasm32), beyond the bounds.
            (&["--seeds", "4294967295"][..], "at most 1000"),
            (&["--hidden", "4294967295"][..], "at most 4096"),
            (&["--noise", &["0"; 21].join(",")][..], "at most 20 levels"),
            (&["--eps", "1.5"][..], "[0, 1)"),
            (&["--noise", "0,20"][..], "20% is 0.2"),
            (&["--test-fraction", "1"][..], "(0, 1)"),
        ] {
            let err = run(args).unwrap_err();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }
}
