//! PNG plots of a [`CompareReport`], drawn with plotters into memory.
//!
//! Text is drawn with DejaVu Sans, embedded in the binary (`assets/fonts/`, Bitstream Vera
//! license), so plots render the same on machines without any system font.

use std::sync::Once;

use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontStyle;

use crate::compare::{CompareReport, ModelKind, TensorError};
use crate::error::{EvalError, Result};

const FONT: &[u8] = include_bytes!("../../../assets/fonts/DejaVuSans.ttf");
pub(crate) const FAMILY: &str = "sans-serif";
const PROJS: [&str; 7] = ["q", "k", "v", "o", "gate", "up", "down"];

/// Tableau 10, the matplotlib default cycle: distinct and readable on white.
pub(crate) const TAB10: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn register_font() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut ok = true;
    ONCE.call_once(|| {
        ok = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok();
    });
    if ok {
        Ok(())
    } else {
        Err(EvalError::Report {
            path: "assets/fonts/DejaVuSans.ttf".into(),
            msg: "the embedded font does not parse".into(),
        })
    }
}

pub(crate) fn draw_err<E: std::fmt::Debug>(what: &str) -> impl Fn(E) -> EvalError + '_ {
    move |e| EvalError::Report {
        path: what.into(),
        msg: format!("drawing: {e:?}"),
    }
}

/// Renders with `draw` into an RGB buffer and encodes it as PNG.
pub(crate) fn render(
    name: &str,
    size: (u32, u32),
    draw: impl FnOnce(DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>) -> Result<()>,
) -> Result<Vec<u8>> {
    register_font()?;
    let mut buf = vec![255u8; size.0 as usize * size.1 as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, size).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err(name))?;
        draw(root.clone())?;
        root.present().map_err(draw_err(name))?;
    }
    let mut png = Vec::new();
    let enc = image::codecs::png::PngEncoder::new(&mut png);
    image::ImageEncoder::write_image(enc, &buf, size.0, size.1, image::ColorType::Rgb8).map_err(
        |e| EvalError::Report {
            path: name.into(),
            msg: format!("encoding PNG: {e}"),
        },
    )?;
    Ok(png)
}

fn model_color(kind: ModelKind, delta_index: usize) -> RGBColor {
    match kind {
        ModelKind::Base => RGBColor(150, 150, 150),
        ModelKind::Finetuned => TAB10[0],
        ModelKind::Delta => TAB10[1 + delta_index % 9],
    }
}

/// Bar charts: one row per data set, perplexity on the left, KL(fine-tune ‖ model) on the right.
pub fn metrics_png(report: &CompareReport) -> Result<Vec<u8>> {
    let rows = report.datasets.len().max(1);
    let size = (1200u32, 60 + 380 * rows as u32);
    render("metrics.png", size, |root| {
        let root = root
            .titled(
                "Perplexity and KL(fine-tune ‖ model) per model",
                (FAMILY, 26),
            )
            .map_err(draw_err("metrics.png"))?;
        let panels = root.split_evenly((rows, 2));
        let names: Vec<String> = report.models.iter().map(|m| m.name.clone()).collect();
        let colors: Vec<RGBColor> = {
            let mut d = 0;
            report
                .models
                .iter()
                .map(|m| {
                    let c = model_color(m.kind, d);
                    if m.kind == ModelKind::Delta {
                        d += 1;
                    }
                    c
                })
                .collect()
        };
        for (r, ds) in report.datasets.iter().enumerate() {
            let ppl: Vec<f64> = ds.metrics.iter().map(|m| m.ppl).collect();
            let kl: Vec<f64> = ds.metrics.iter().map(|m| m.kl).collect();
            bar_panel(
                &panels[2 * r],
                &format!("perplexity — {}", ds.name),
                &names,
                &colors,
                &ppl,
                "{:.3}",
            )?;
            bar_panel(
                &panels[2 * r + 1],
                &format!("KL(ft ‖ model), nats — {}", ds.name),
                &names,
                &colors,
                &kl,
                "{:.4}",
            )?;
        }
        Ok(())
    })
}

fn fmt_value(v: f64, pattern: &str) -> String {
    match pattern {
        "{:.4}" => format!("{v:.4}"),
        _ => {
            if v.abs() >= 1000.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.3}")
            }
        }
    }
}

fn bar_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    title: &str,
    names: &[String],
    colors: &[RGBColor],
    values: &[f64],
    pattern: &str,
) -> Result<()> {
    let e = draw_err("metrics.png");
    let finite_max = values
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    let top = if finite_max > 0.0 {
        finite_max * 1.18
    } else {
        1.0
    };
    let n = values.len();
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FAMILY, 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d((0..n.saturating_sub(1)).into_segmented(), 0.0..top)
        .map_err(&e)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n.max(1))
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .y_labels(6)
        .label_style((FAMILY, 14))
        .draw()
        .map_err(&e)?;
    chart
        .draw_series(values.iter().enumerate().map(|(i, &v)| {
            let v = if v.is_finite() { v } else { top };
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), v),
                ],
                colors.get(i).copied().unwrap_or(TAB10[0]).filled(),
            );
            bar.set_margin(0, 0, 14, 14);
            bar
        }))
        .map_err(&e)?;
    let label_style =
        TextStyle::from((FAMILY, 14).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    chart
        .draw_series(values.iter().enumerate().map(|(i, &v)| {
            let y = if v.is_finite() { v } else { top };
            Text::new(
                fmt_value(v, pattern),
                (SegmentValue::CenterOf(i), y + top * 0.01),
                label_style.clone(),
            )
        }))
        .map_err(&e)?;
    Ok(())
}

/// Relative error per layer: one panel per delta, one line per projection.
pub fn layer_error_png(report: &CompareReport) -> Result<Vec<u8>> {
    per_delta_lines(
        report,
        false,
        "layer_error.png",
        "Relative error ‖W_rec − W_ft‖ / ‖W_ft − W_base‖ per layer",
        "relative error",
        |t| Some(t.rel_err),
    )
}

/// Scale after / before calibration per layer: one panel per delta, one line per projection.
pub fn scales_png(report: &CompareReport) -> Result<Vec<u8>> {
    per_delta_lines(
        report,
        true,
        "scales.png",
        "BitDelta scale after / before calibration per layer",
        "scale after / before",
        |t| Some(t.scale? / t.scale_before.or(t.scale_init)?),
    )
}

fn per_delta_lines(
    report: &CompareReport,
    calibrated_only: bool,
    name: &'static str,
    title: &str,
    y_desc: &str,
    value: impl Fn(&TensorError) -> Option<f64>,
) -> Result<Vec<u8>> {
    let weights: Vec<_> = report
        .weights
        .iter()
        .filter(|w| w.calibrated || !calibrated_only)
        .collect();
    let panels_n = weights.len().max(1);
    let size = (1200u32, 60 + 420 * panels_n as u32);
    // One y range for every panel, so deltas compare at a glance.
    let (g_lo, g_hi) = weights
        .iter()
        .flat_map(|w| w.tensors.iter().filter_map(&value))
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    render(name, size, |root| {
        let e = draw_err(name);
        let root = root.titled(title, (FAMILY, 24)).map_err(&e)?;
        let panels = root.split_evenly((panels_n, 1));
        for (dw, area) in weights.iter().zip(&panels) {
            let layers = dw.tensors.iter().map(|t| t.layer + 1).max().unwrap_or(1) as i32;
            let series: Vec<(&str, Vec<(i32, f64)>)> = PROJS
                .iter()
                .map(|&p| {
                    let pts = dw
                        .tensors
                        .iter()
                        .filter(|t| t.proj == p)
                        .filter_map(|t| {
                            value(t)
                                .filter(|v| v.is_finite())
                                .map(|v| (t.layer as i32, v))
                        })
                        .collect();
                    (p, pts)
                })
                .collect();
            let all: Vec<f64> = series
                .iter()
                .flat_map(|(_, s)| s.iter().map(|p| p.1))
                .collect();
            if all.is_empty() {
                area.draw(&Text::new(
                    format!("{}: nothing to plot", dw.delta),
                    (20, 40),
                    (FAMILY, 16),
                ))
                .map_err(&e)?;
                continue;
            }
            let (lo, hi) = (g_lo, g_hi);
            let pad = ((hi - lo) * 0.12).max(hi.abs() * 0.02).max(1e-3);
            let y0 = if lo >= 0.0 && lo - pad < 0.0 {
                0.0
            } else {
                lo - pad
            };
            let mut chart = ChartBuilder::on(area)
                .caption(format!("delta: {}", dw.delta), (FAMILY, 18))
                .margin(14)
                .x_label_area_size(44)
                .y_label_area_size(70)
                .build_cartesian_2d(-1..layers + 1, y0..hi + pad)
                .map_err(&e)?;
            chart
                .configure_mesh()
                .x_desc("layer")
                .y_desc(y_desc)
                .x_labels((layers as usize + 2).min(34))
                .x_label_formatter(&|x| {
                    if *x >= 0 && *x < layers {
                        x.to_string()
                    } else {
                        String::new()
                    }
                })
                .y_labels(8)
                .label_style((FAMILY, 14))
                .axis_desc_style((FAMILY, 15))
                .draw()
                .map_err(&e)?;
            for (i, (proj, pts)) in series.iter().enumerate() {
                let color = TAB10[i % TAB10.len()];
                chart
                    .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                    .map_err(&e)?
                    .label(*proj)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3))
                    });
                chart
                    .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                    .map_err(&e)?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.4))
                .label_font((FAMILY, 14))
                .draw()
                .map_err(&e)?;
        }
        Ok(())
    })
}
