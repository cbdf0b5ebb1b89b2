//! The loss curve of a run as a PNG, read back from metrics.jsonl: training
//! loss per step (blue line) and evaluation loss (red line with dots) on the
//! left axis, the learning rate (grey dashes) on the right axis, with tick
//! values, axis labels, a title and a legend.
//!
//! The text is drawn with DejaVu Sans, which is compiled into the binary
//! (`fonts/DejaVuSans.ttf`, Bitstream Vera license in
//! `fonts/LICENSE-DejaVu.txt`), so the picture is the same on every machine
//! and needs no system font (no fontconfig lookup happens).
use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::error::io;
use crate::{Error, Result};

/// The font every label is drawn with.
const FONT_BYTES: &[u8] = include_bytes!("../fonts/DejaVuSans.ttf");
/// The family name the font is registered under.
const FONT: &str = "sans-serif";

/// Width and height of the picture, pixels.
pub const PLOT_SIZE: (u32, u32) = (900, 540);

/// Makes the embedded font the one plotters draws `FONT` with (once per
/// process).
fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bytes are a valid TrueType file checked in beside this source;
        // `fonts_parse` in the tests guards that.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES);
    });
}

/// The series of a metrics file.
#[derive(Debug, Default)]
struct Series {
    train: Vec<(f64, f64)>,
    eval: Vec<(f64, f64)>,
    lr: Vec<(f64, f64)>,
}

fn read_series(metrics: &Path) -> Result<Series> {
    let text = std::fs::read_to_string(metrics).map_err(io(metrics))?;
    let mut s = Series::default();
    let num = |v: &serde_json::Value, k: &str| {
        v.get(k).and_then(|l| l.as_f64()).filter(|l| l.is_finite())
    };
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(step) = v.get("step").and_then(|s| s.as_f64()) else {
            continue;
        };
        if let Some(l) = num(&v, "loss") {
            s.train.push((step, l));
        }
        if let Some(l) = num(&v, "eval_loss") {
            s.eval.push((step, l));
        }
        if let Some(l) = num(&v, "lr") {
            s.lr.push((step, l));
        }
    }
    Ok(s)
}

/// A learning rate as a short label: `2e-4`, `1.5e-5`, `0`.
fn lr_label(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let s = format!("{v:.1e}");
    // 2.0e-4 -> 2e-4
    s.replace(".0e", "e")
}

/// A step count as a label: `0`, `250`, `1.5k`.
fn step_label(v: f64) -> String {
    if v.abs() >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v.fract().abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// Draws `metrics` (JSON lines with `step` and `loss` / `eval_loss` / `lr`)
/// into `png` ([`PLOT_SIZE`]), titled `title` (e.g. the model and train
/// type). Fails, writing nothing, when the file holds no training loss.
pub fn loss_curve(metrics: &Path, png: &Path, title: &str) -> Result<()> {
    let s = read_series(metrics)?;
    if s.train.is_empty() {
        return Err(Error::Config(format!(
            "{}: no losses to plot",
            metrics.display()
        )));
    }
    let (lo, hi) = s
        .train
        .iter()
        .chain(&s.eval)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &(_, l)| {
            (lo.min(l), hi.max(l))
        });
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let first = s
        .train
        .iter()
        .chain(&s.eval)
        .map(|p| p.0)
        .fold(f64::INFINITY, f64::min);
    let first = if first <= 1.0 { 0.0 } else { first };
    let last = s
        .train
        .iter()
        .chain(&s.eval)
        .map(|p| p.0)
        .fold(first + 1.0, f64::max);
    let lr_hi = s.lr.iter().map(|p| p.1).fold(0.0, f64::max);
    let lr_hi = if lr_hi > 0.0 { lr_hi * 1.08 } else { 1.0 };
    register_font();
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(png, PLOT_SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT, 22))
            .margin(14)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .right_y_label_area_size(if s.lr.is_empty() { 0 } else { 74 })
            .build_cartesian_2d(first..last, (lo - pad)..(hi + pad))?
            .set_secondary_coord(first..last, 0.0..lr_hi);
        chart
            .configure_mesh()
            .x_labels(10)
            .y_labels(8)
            .x_desc("step")
            .y_desc("loss")
            .x_label_formatter(&|v| step_label(*v))
            .y_label_formatter(&|v| format!("{v:.3}"))
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 16))
            .light_line_style(RGBColor(242, 242, 242))
            .bold_line_style(RGBColor(220, 220, 220))
            .draw()?;
        let lr_color = RGBColor(120, 120, 120);
        if !s.lr.is_empty() {
            chart
                .configure_secondary_axes()
                .y_labels(8)
                .y_desc("learning rate")
                .y_label_formatter(&|v| lr_label(*v))
                .label_style((FONT, 14))
                .axis_desc_style((FONT, 16))
                .draw()?;
            chart
                .draw_secondary_series(DashedLineSeries::new(
                    s.lr.iter().copied(),
                    6,
                    4,
                    lr_color.stroke_width(1),
                ))?
                .label("learning rate (right axis)")
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], lr_color.stroke_width(1))
                });
        }
        chart
            .draw_series(LineSeries::new(
                s.train.iter().copied(),
                BLUE.stroke_width(2),
            ))?
            .label("training loss")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        if !s.eval.is_empty() {
            chart.draw_series(LineSeries::new(s.eval.iter().copied(), RED.stroke_width(1)))?;
            chart
                .draw_series(s.eval.iter().map(|&p| Circle::new(p, 4, RED.filled())))?
                .label("eval loss")
                .legend(|(x, y)| Circle::new((x + 10, y), 4, RED.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(160, 160, 160))
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| {
        Error::Config(format!(
            "{}: cannot draw the loss curve: {e}",
            png.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fonts_parse() {
        assert!(
            plotters::style::register_font("llmft-test", FontStyle::Normal, FONT_BYTES).is_ok()
        );
    }

    #[test]
    fn labels_read_well() {
        assert_eq!(lr_label(2e-4), "2e-4");
        assert_eq!(lr_label(1.5e-5), "1.5e-5");
        assert_eq!(lr_label(0.0), "0");
        assert_eq!(step_label(250.0), "250");
        assert_eq!(step_label(25_000.0), "25k");
    }
}
