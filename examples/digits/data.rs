//! Loading the bundled digits data (gzip-compressed CSV), the stratified train/test split, and the
//! random label flips. Every malformed input is a [`DataError`] that names the file and the line.

use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::rng::SplitMix64;

/// Pixels per image (8×8).
pub const FEATURES: usize = 64;
/// Digit classes 0..=9.
pub const CLASSES: usize = 10;
/// Pixels are block counts in `0..=16`.
pub const MAX_PIXEL: u32 = 16;
/// A decompressed file larger than this is refused (the real one is 300 KB).
const MAX_DECOMPRESSED: u64 = 64 << 20;

/// Images and labels, row-major: image `i` is `pixels[i * features..(i + 1) * features]`, scaled
/// to `[0, 1]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Values per image ([`FEATURES`] for the digits).
    pub features: usize,
    /// Pixel values divided by 16.
    pub pixels: Vec<f32>,
    /// Classes in `0..CLASSES`.
    pub labels: Vec<u32>,
}

impl Dataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// The pixels of image `i`.
    pub fn image(&self, i: usize) -> &[f32] {
        &self.pixels[i * self.features..(i + 1) * self.features]
    }

    /// A new data set made of the images at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Dataset {
        let mut pixels = Vec::with_capacity(indices.len() * self.features);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            pixels.extend_from_slice(self.image(i));
            labels.push(self.labels[i]);
        }
        Dataset {
            features: self.features,
            pixels,
            labels,
        }
    }
}

/// Why the data could not be loaded.
#[derive(Debug)]
pub enum DataError {
    /// The file could not be opened or read.
    Open {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        source: io::Error,
    },
    /// The file is not valid gzip (wrong header, corrupt stream, bad checksum, truncated).
    Decompress {
        /// The file.
        path: PathBuf,
        /// The decoder's reason.
        source: io::Error,
    },
    /// The decompressed file is larger than any plausible copy of the data.
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// A line is not 64 pixels in `0..=16` and a class in `0..=9`.
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// The file holds no image.
    Empty {
        /// The file.
        path: PathBuf,
    },
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataError::Open { path, source } => {
                write!(f, "cannot read data file {}: {source}", path.display())
            }
            DataError::Decompress { path, source } => write!(
                f,
                "data file {} is not a valid gzip file ({source}); is it corrupted or truncated? \
                 See data/README.md for its checksum",
                path.display()
            ),
            DataError::TooLarge { path } => write!(
                f,
                "data file {} decompresses to more than {} MiB: not the digits data",
                path.display(),
                MAX_DECOMPRESSED >> 20
            ),
            DataError::Parse {
                path,
                line,
                message,
            } => write!(f, "{}:{line}: {message}", path.display()),
            DataError::Empty { path } => write!(f, "data file {} holds no image", path.display()),
        }
    }
}

impl std::error::Error for DataError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DataError::Open { source, .. } | DataError::Decompress { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Reads and parses a gzip-compressed digits CSV.
pub fn load_gz(path: &Path) -> Result<Dataset, DataError> {
    let file = std::fs::File::open(path).map_err(|source| DataError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    decode_gz(file, path)
}

/// Decompresses and parses a gzip stream; `path` is only used in error messages.
pub fn decode_gz<R: Read>(compressed: R, path: &Path) -> Result<Dataset, DataError> {
    let mut text = Vec::new();
    flate2::read::GzDecoder::new(compressed)
        .take(MAX_DECOMPRESSED + 1)
        .read_to_end(&mut text)
        .map_err(|source| DataError::Decompress {
            path: path.to_path_buf(),
            source,
        })?;
    if text.len() as u64 > MAX_DECOMPRESSED {
        return Err(DataError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    parse_csv(&text, path)
}

/// Parses the CSV text: one image per line, 64 pixels then the class. Blank lines are skipped;
/// `\r\n` line ends are accepted.
pub fn parse_csv(text: &[u8], path: &Path) -> Result<Dataset, DataError> {
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for (index, raw) in text.split(|&b| b == b'\n').enumerate() {
        let line = index + 1;
        let parse_error = |message: String| DataError::Parse {
            path: path.to_path_buf(),
            line,
            message,
        };
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let Ok(row) = std::str::from_utf8(raw) else {
            return Err(parse_error("not UTF-8 text".to_string()));
        };
        if row.trim().is_empty() {
            continue;
        }
        let mut fields = 0;
        for (column, field) in row.split(',').enumerate() {
            fields += 1;
            if column > FEATURES {
                continue; // counted, reported below
            }
            let value: u32 = field.trim().parse().map_err(|_| {
                parse_error(format!(
                    "field {} is {field:?}, not a non-negative integer",
                    column + 1
                ))
            })?;
            if column < FEATURES {
                if value > MAX_PIXEL {
                    return Err(parse_error(format!(
                        "pixel {} is {value}, outside 0..={MAX_PIXEL}",
                        column + 1
                    )));
                }
                pixels.push(value as f32 / MAX_PIXEL as f32);
            } else {
                if value as usize >= CLASSES {
                    return Err(parse_error(format!(
                        "class is {value}, outside 0..={}",
                        CLASSES - 1
                    )));
                }
                labels.push(value);
            }
        }
        if fields != FEATURES + 1 {
            return Err(parse_error(format!(
                "{fields} fields, expected {} ({FEATURES} pixels and the class)",
                FEATURES + 1
            )));
        }
    }
    if labels.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(Dataset {
        features: FEATURES,
        pixels,
        labels,
    })
}

/// A stratified split: in every class, `round(test_fraction * count)` images (in a random order
/// fixed by `rng`) go to the test set and the rest to the training set. Returns
/// `(train, test)` indices, each shuffled.
pub fn stratified_split(
    labels: &[u32],
    test_fraction: f64,
    rng: &mut SplitMix64,
) -> (Vec<usize>, Vec<usize>) {
    let classes = labels.iter().map(|&l| l as usize + 1).max().unwrap_or(0);
    let mut train = Vec::new();
    let mut test = Vec::new();
    for class in 0..classes {
        let mut members: Vec<usize> = (0..labels.len())
            .filter(|&i| labels[i] as usize == class)
            .collect();
        rng.shuffle(&mut members);
        let n_test = ((members.len() as f64) * test_fraction).round() as usize;
        test.extend_from_slice(&members[..n_test]);
        train.extend_from_slice(&members[n_test..]);
    }
    rng.shuffle(&mut train);
    rng.shuffle(&mut test);
    (train, test)
}

/// Flips `round(fraction * len)` labels, chosen at random, each to a different class drawn
/// uniformly from the other `classes - 1`. Returns the noisy labels and how many were flipped.
pub fn flip_labels(
    labels: &[u32],
    fraction: f64,
    classes: usize,
    rng: &mut SplitMix64,
) -> (Vec<u32>, usize) {
    let mut noisy = labels.to_vec();
    if classes < 2 {
        return (noisy, 0);
    }
    let count = ((labels.len() as f64) * fraction.clamp(0.0, 1.0)).round() as usize;
    let mut order: Vec<usize> = (0..labels.len()).collect();
    rng.shuffle(&mut order);
    for &i in &order[..count] {
        let shift = 1 + rng.below(classes as u64 - 1) as u32;
        noisy[i] = (labels[i] + shift) % classes as u32;
    }
    (noisy, count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn row(pixel: u32, label: u32) -> String {
        let mut fields: Vec<String> = (0..FEATURES).map(|_| pixel.to_string()).collect();
        fields.push(label.to_string());
        fields.join(",")
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    fn path() -> &'static Path {
        Path::new("digits.csv.gz")
    }

    #[test]
    fn parses_a_small_file_and_scales_pixels() {
        let text = format!("{}\r\n{}\n\n", row(16, 3), row(8, 9));
        let data = decode_gz(gzip(text.as_bytes()).as_slice(), path()).unwrap();
        assert_eq!(data.len(), 2);
        assert_eq!(data.labels, vec![3, 9]);
        assert!(data.image(0).iter().all(|&p| p == 1.0));
        assert!(data.image(1).iter().all(|&p| p == 0.5));
    }

    #[test]
    fn the_bundled_file_loads_with_the_documented_shape() {
        // Relative first: cargo runs tests in the crate root, and under WASI only the current
        // directory is visible.
        let relative = Path::new("data/digits.csv.gz");
        let file = if relative.exists() {
            relative.to_path_buf()
        } else {
            Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
        };
        let data = load_gz(&file).unwrap();
        assert_eq!(data.len(), 1797);
        assert_eq!(data.pixels.len(), 1797 * FEATURES);
        let mut counts = [0_usize; CLASSES];
        for &l in &data.labels {
            counts[l as usize] += 1;
        }
        // As in data/README.md.
        assert_eq!(counts, [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]);
        // First image of the file, first row of pixels: 0,0,5,13,9,1,0,0.
        let first: Vec<f32> = data.image(0)[..8].iter().map(|p| p * 16.0).collect();
        assert_eq!(first, vec![0.0, 0.0, 5.0, 13.0, 9.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn a_missing_file_is_an_open_error() {
        let err = load_gz(Path::new("no/such/digits.csv.gz")).unwrap_err();
        assert!(matches!(err, DataError::Open { .. }));
        assert!(err.to_string().contains("no/such/digits.csv.gz"));
    }

    #[test]
    fn plain_text_is_not_gzip() {
        let err = decode_gz(row(1, 1).as_bytes(), path()).unwrap_err();
        assert!(matches!(err, DataError::Decompress { .. }), "{err}");
        assert!(err.to_string().contains("not a valid gzip file"));
    }

    #[test]
    fn truncated_and_bit_flipped_files_are_decompress_errors() {
        let text: String = (0..50).map(|i| row(i % 17, i % 10) + "\n").collect();
        let good = gzip(text.as_bytes());
        let truncated = &good[..good.len() / 2];
        let err = decode_gz(truncated, path()).unwrap_err();
        assert!(matches!(err, DataError::Decompress { .. }), "{err}");
        // Flip a byte in the middle of the deflate stream: either the stream or the CRC breaks.
        let mut flipped = good.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x55;
        let err = decode_gz(flipped.as_slice(), path()).unwrap_err();
        assert!(
            matches!(err, DataError::Decompress { .. } | DataError::Parse { .. }),
            "{err}"
        );
        // The checksum in the gzip trailer catches a change the deflate stream alone would not.
        let mut bad_crc = good;
        let crc_at = bad_crc.len() - 8;
        bad_crc[crc_at] ^= 1;
        let err = decode_gz(bad_crc.as_slice(), path()).unwrap_err();
        assert!(matches!(err, DataError::Decompress { .. }), "{err}");
    }

    #[test]
    fn malformed_rows_name_the_line_and_the_problem() {
        let cases = [
            (format!("{}\n{}", row(0, 0), row(17, 0)), 2, "pixel 1 is 17"),
            (row(0, 10), 1, "class is 10"),
            (row(0, 0).replacen('0', "x", 1), 1, "field 1 is \"x\""),
            (row(0, 0) + ",5", 1, "66 fields"),
            ("1,2,3".to_string(), 1, "3 fields"),
            (
                row(0, 0).replacen('0', "-1", 1),
                1,
                "not a non-negative integer",
            ),
        ];
        for (text, line, needle) in cases {
            let err = decode_gz(gzip(text.as_bytes()).as_slice(), path()).unwrap_err();
            match &err {
                DataError::Parse { line: l, .. } => assert_eq!(*l, line, "{err}"),
                other => panic!("expected a parse error, got {other}"),
            }
            assert!(err.to_string().contains(needle), "{err} lacks {needle}");
        }
        let err = decode_gz(gzip(&[0xff, 0xfe, b'\n']).as_slice(), path()).unwrap_err();
        assert!(err.to_string().contains("not UTF-8"), "{err}");
    }

    #[test]
    fn an_empty_file_is_reported() {
        let err = decode_gz(gzip(b"\n\n").as_slice(), path()).unwrap_err();
        assert!(matches!(err, DataError::Empty { .. }));
    }

    #[test]
    fn the_split_is_stratified_disjoint_and_complete() {
        let labels: Vec<u32> = (0..100).map(|i| i % 4).collect();
        let (train, test) = stratified_split(&labels, 0.2, &mut SplitMix64::new(3));
        assert_eq!(test.len(), 20);
        assert_eq!(train.len(), 80);
        for class in 0..4 {
            assert_eq!(test.iter().filter(|&&i| labels[i] == class).count(), 5);
        }
        let mut all: Vec<usize> = train.iter().chain(&test).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn flips_change_exactly_the_requested_share_to_other_classes() {
        let labels: Vec<u32> = (0..200).map(|i| i % 10).collect();
        for (fraction, expected) in [(0.0, 0), (0.2, 40), (0.4, 80), (1.0, 200)] {
            let (noisy, flipped) = flip_labels(&labels, fraction, 10, &mut SplitMix64::new(9));
            assert_eq!(flipped, expected);
            let changed = labels.iter().zip(&noisy).filter(|(a, b)| a != b).count();
            assert_eq!(changed, expected);
            assert!(noisy.iter().all(|&l| l < 10));
        }
        // Flipped labels spread over all other classes.
        let (noisy, _) = flip_labels(&labels, 1.0, 10, &mut SplitMix64::new(1));
        let from_zero: std::collections::BTreeSet<u32> = labels
            .iter()
            .zip(&noisy)
            .filter(|(a, _)| **a == 0)
            .map(|(_, b)| *b)
            .collect();
        assert!(from_zero.len() >= 5 && !from_zero.contains(&0));
    }
}
