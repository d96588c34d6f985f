//! A reliability diagram written as SVG by hand: one panel per noise level, one line per method,
//! confidence on x, accuracy on y, the diagonal as perfect calibration.

use std::fmt::Write;

use crate::metrics::Bin;

/// One method's line in a panel.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text, e.g. `Uniform(0.1)`.
    pub label: String,
    /// Per-bin statistics (empty bins are skipped).
    pub bins: Vec<Bin>,
    /// The method's expected calibration error, printed in the panel.
    pub ece: f64,
}

/// One panel: a title and up to [`STYLES`]`.len()` series.
#[derive(Debug, Clone)]
pub struct Panel {
    /// Panel title, e.g. `20% of training labels flipped`.
    pub title: String,
    /// The lines.
    pub series: Vec<Series>,
}

/// Colour (Okabe-Ito, colour-blind safe) and dash pattern of the n-th series.
pub const STYLES: [(&str, &str); 4] = [
    ("#0072B2", ""),
    ("#D55E00", "7 4"),
    ("#009E73", "2 3"),
    ("#CC79A7", "10 3 2 3"),
];

const PLOT: f64 = 280.0; // side of a panel's plot area
const LEFT: f64 = 62.0; // room for the y axis labels
const GAP: f64 = 44.0; // between panels
const TOP: f64 = 78.0; // title and panel titles
const BOTTOM: f64 = 158.0; // x axis labels, the ECE lists and the legend

/// Escapes text for SVG content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// The whole SVG document. Marker area is proportional to the share of predictions in the bin.
pub fn reliability_diagram(title: &str, subtitle: &str, panels: &[Panel]) -> String {
    let n = panels.len().max(1) as f64;
    let width = LEFT + n * PLOT + (n - 1.0) * GAP + 24.0;
    let height = TOP + PLOT + BOTTOM;
    let mut s = String::new();
    // `write!` into a String cannot fail; the results are ignored on purpose.
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="Helvetica, Arial, sans-serif" font-size="13">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="26" text-anchor="middle" font-size="17" font-weight="bold">{}</text>"#,
        width / 2.0,
        escape(title)
    );
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="46" text-anchor="middle" fill="#444">{}</text>"##,
        width / 2.0,
        escape(subtitle)
    );
    for (p, panel) in panels.iter().enumerate() {
        let x0 = LEFT + p as f64 * (PLOT + GAP);
        draw_panel(&mut s, panel, x0, p == 0);
    }
    draw_legend(&mut s, panels, width);
    s.push_str("</svg>\n");
    s
}

fn draw_panel(s: &mut String, panel: &Panel, x0: f64, y_labels: bool) {
    let y0 = TOP;
    let px = |v: f64| x0 + v * PLOT;
    let py = |v: f64| y0 + (1.0 - v) * PLOT;
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-weight="bold">{}</text>"#,
        x0 + PLOT / 2.0,
        y0 - 10.0,
        escape(&panel.title)
    );
    // Frame, grid and ticks.
    let _ = writeln!(
        s,
        r##"<rect x="{x0:.1}" y="{y0:.1}" width="{PLOT}" height="{PLOT}" fill="#fafafa" stroke="#333"/>"##
    );
    for i in 0..=5 {
        let v = f64::from(i) / 5.0;
        let _ = writeln!(
            s,
            r##"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#ddd"/><line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#ddd"/>"##,
            px(v),
            py(0.0),
            px(v),
            py(1.0),
            px(0.0),
            py(v),
            px(1.0),
            py(v)
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="11">{v:.1}</text>"#,
            px(v),
            py(0.0) + 16.0
        );
        if y_labels {
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end" font-size="11">{v:.1}</text>"#,
                px(0.0) - 6.0,
                py(v) + 4.0
            );
        }
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">confidence (top-class probability)</text>"#,
        x0 + PLOT / 2.0,
        py(0.0) + 36.0
    );
    if y_labels {
        let (cx, cy) = (x0 - 42.0, y0 + PLOT / 2.0);
        let _ = writeln!(
            s,
            r#"<text x="{cx:.1}" y="{cy:.1}" text-anchor="middle" transform="rotate(-90 {cx:.1} {cy:.1})">accuracy</text>"#
        );
    }
    // Perfect calibration.
    let _ = writeln!(
        s,
        r##"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#888" stroke-dasharray="4 4"/>"##,
        px(0.0),
        py(0.0),
        px(1.0),
        py(1.0)
    );
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" fill="#777" font-size="11" transform="rotate(-45 {:.1} {:.1})">perfect calibration</text>"##,
        px(0.30),
        py(0.30) - 5.0,
        px(0.30),
        py(0.30) - 5.0
    );
    // The lines, and each one's ECE listed under the panel.
    for (k, series) in panel.series.iter().enumerate() {
        let (color, dash) = STYLES[k % STYLES.len()];
        let total: usize = series.bins.iter().map(|b| b.count).sum();
        let points: Vec<(f64, f64, usize)> = series
            .bins
            .iter()
            .filter(|b| b.count > 0 && b.confidence.is_finite() && b.accuracy.is_finite())
            .map(|b| (px(b.confidence), py(b.accuracy), b.count))
            .collect();
        let path: Vec<String> = points
            .iter()
            .map(|(x, y, _)| format!("{x:.1},{y:.1}"))
            .collect();
        let dash_attr = if dash.is_empty() {
            String::new()
        } else {
            format!(r#" stroke-dasharray="{dash}""#)
        };
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash_attr}/>"#,
            path.join(" ")
        );
        for (x, y, count) in &points {
            let share = *count as f64 / total.max(1) as f64;
            let r = 2.0 + 9.0 * share.sqrt();
            let _ = writeln!(
                s,
                r#"<circle cx="{x:.1}" cy="{y:.1}" r="{r:.1}" fill="{color}" fill-opacity="0.35" stroke="{color}"/>"#
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" fill="{color}" font-size="12">ECE {:.1}%  {}</text>"#,
            px(0.0) + 4.0,
            py(0.0) + 58.0 + 16.0 * k as f64,
            100.0 * series.ece,
            escape(&series.label)
        );
    }
}

fn draw_legend(s: &mut String, panels: &[Panel], width: f64) {
    let Some(first) = panels.first() else {
        return;
    };
    let y = TOP + PLOT + 118.0;
    let slot = 190.0;
    let start = (width - slot * first.series.len() as f64) / 2.0;
    for (k, series) in first.series.iter().enumerate() {
        let (color, dash) = STYLES[k % STYLES.len()];
        let x = start + slot * k as f64;
        let dash_attr = if dash.is_empty() {
            String::new()
        } else {
            format!(r#" stroke-dasharray="{dash}""#)
        };
        let _ = writeln!(
            s,
            r#"<line x1="{x:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{color}" stroke-width="2"{dash_attr}/><circle cx="{:.1}" cy="{y:.1}" r="4" fill="{color}" fill-opacity="0.35" stroke="{color}"/>"#,
            x + 36.0,
            x + 18.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            x + 44.0,
            y + 4.0,
            escape(&series.label)
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="11" fill="#555">15 equal-width confidence bins; predictions pooled over seeds; marker area proportional to the bin's share of predictions</text>"##,
        width / 2.0,
        y + 24.0
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bin(confidence: f64, accuracy: f64, count: usize) -> Bin {
        Bin {
            lower: 0.0,
            upper: 1.0,
            count,
            confidence,
            accuracy,
        }
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape(r#"a<b & "c">'"#),
            "a&lt;b &amp; &quot;c&quot;&gt;&#39;"
        );
    }

    #[test]
    fn a_diagram_has_one_polyline_per_series_and_skips_empty_bins() {
        let series = |label: &str| Series {
            label: label.to_string(),
            bins: vec![
                bin(0.5, 0.4, 10),
                bin(f64::NAN, f64::NAN, 0),
                bin(0.95, 0.9, 90),
            ],
            ece: 0.0123,
        };
        let panels = vec![
            Panel {
                title: "0% flipped".to_string(),
                series: vec![series("hard"), series("Uniform(0.1)")],
            },
            Panel {
                title: "40% flipped".to_string(),
                series: vec![series("hard"), series("Uniform(0.1)")],
            },
        ];
        let svg = reliability_diagram("Title <x>", "sub", &panels);
        assert!(svg.starts_with("<svg "));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 4);
        // Two non-empty bins per series, plus one legend marker per series.
        assert_eq!(svg.matches("<circle").count(), 4 * 2 + 2);
        assert!(svg.contains("Title &lt;x&gt;"));
        assert!(svg.contains("ECE 1.2%  Uniform(0.1)"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        // Balanced tags: every opened element is closed or self-closing.
        let opened = svg.matches("<text").count();
        assert_eq!(opened, svg.matches("</text>").count());
    }
}
