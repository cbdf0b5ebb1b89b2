//! The loss curve of a run as a PNG: training loss per step (blue) and
//! evaluation loss (red dots) over the steps, read back from metrics.jsonl.
//! llmft ships no font, so the picture carries no text; the axes span the
//! steps (x) and the loss range (y) of the run, with a grid line at each
//! tenth.
use std::path::Path;

use plotters::prelude::*;

use crate::error::io;
use crate::{Error, Result};

/// Draws `metrics` (JSON lines with `step` and `loss` / `eval_loss`) into
/// `png`, 800×500.
pub fn loss_curve(metrics: &Path, png: &Path) -> Result<()> {
    let text = std::fs::read_to_string(metrics).map_err(io(metrics))?;
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(step) = v.get("step").and_then(|s| s.as_f64()) else {
            continue;
        };
        if let Some(l) = v
            .get("loss")
            .and_then(|l| l.as_f64())
            .filter(|l| l.is_finite())
        {
            train.push((step, l));
        }
        if let Some(l) = v
            .get("eval_loss")
            .and_then(|l| l.as_f64())
            .filter(|l| l.is_finite())
        {
            eval.push((step, l));
        }
    }
    if train.is_empty() {
        return Err(Error::Config(format!(
            "{}: no losses to plot",
            metrics.display()
        )));
    }
    let all = train.iter().chain(&eval);
    let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &(_, l)| {
        (lo.min(l), hi.max(l))
    });
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let last = train.iter().chain(&eval).map(|p| p.0).fold(1.0, f64::max);
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(png, (800, 500)).into_drawing_area();
        root.fill(&WHITE)?;
        let area = root.margin(20, 20, 20, 20);
        let mut chart =
            ChartBuilder::on(&area).build_cartesian_2d(0.0..last, (lo - pad)..(hi + pad))?;
        chart
            .configure_mesh()
            .x_labels(10)
            .y_labels(10)
            .disable_x_axis()
            .disable_y_axis()
            .light_line_style(WHITE)
            .bold_line_style(RGBColor(225, 225, 225))
            .draw()?;
        chart.draw_series(LineSeries::new(train.iter().copied(), BLUE.stroke_width(2)))?;
        chart.draw_series(eval.iter().map(|&p| Circle::new(p, 4, RED.filled())))?;
        chart.plotting_area().draw(&Rectangle::new(
            [(0.0, lo - pad), (last, hi + pad)],
            BLACK.stroke_width(1),
        ))?;
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
