//! The size/quality trade-off of many deltas of one fine-tune: held-out perplexity and
//! KL(fine-tune ‖ model) against bits per parameter, as one table ([`pareto_table`]) and one
//! plot ([`pareto_png`]), with each data set's Pareto front marked.
//!
//! A delta is on the front when no other delta is at most as large (bits per parameter of the
//! compressed weights) and at most as far from the fine-tune (KL), with one of the two strictly
//! smaller. KL, not perplexity, decides the front: it measures closeness to the fine-tune,
//! which is what a delta codec is for (perplexity can drop below the fine-tune's by chance).

use plotters::prelude::*;

use crate::compare::{CompareReport, ModelKind};
use crate::error::Result;
use crate::plot::{draw_err, render, FAMILY, TAB10};

/// One delta on one data set.
#[derive(Debug, Clone, PartialEq)]
pub struct ParetoPoint {
    /// The delta's name in the report.
    pub name: String,
    /// Its method spec (header `method`), e.g. `lowrank:rank=16,dtype=f16`.
    pub method: String,
    /// The method family: the spec up to `:`.
    pub family: String,
    /// Bits per parameter of the compressed weights.
    pub bits: f64,
    /// Perplexity.
    pub ppl: f64,
    /// KL(fine-tune ‖ model), nats per position.
    pub kl: f64,
    /// Top-1 agreement with the fine-tune.
    pub top1: f64,
    /// On the (bits, KL) Pareto front of its data set.
    pub front: bool,
}

/// The deltas of data set `dataset` of `report` as points, sorted by bits, front marked.
pub fn pareto_points(report: &CompareReport, dataset: usize) -> Vec<ParetoPoint> {
    let Some(ds) = report.datasets.get(dataset) else {
        return Vec::new();
    };
    let mut points: Vec<ParetoPoint> = report
        .models
        .iter()
        .zip(&ds.metrics)
        .filter(|(m, _)| m.kind == ModelKind::Delta)
        .map(|(m, x)| {
            let method = m.method.clone().unwrap_or_else(|| m.name.clone());
            ParetoPoint {
                name: m.name.clone(),
                family: method.split(':').next().unwrap_or("").to_owned(),
                method,
                bits: m.bits_per_param,
                ppl: x.ppl,
                kl: x.kl,
                top1: x.top1_agreement,
                front: false,
            }
        })
        .collect();
    let n = points.len();
    for i in 0..n {
        let (b, k) = (points[i].bits, points[i].kl);
        points[i].front = !(0..n).any(|j| {
            let (bj, kj) = (points[j].bits, points[j].kl);
            j != i && bj <= b && kj <= k && (bj < b || kj < k)
        });
    }
    points.sort_by(|a, b| a.bits.total_cmp(&b.bits).then(a.kl.total_cmp(&b.kl)));
    points
}

/// A Markdown table per data set: method, bits per parameter, perplexity, KL, top-1, front
/// (`*`), with the base and the fine-tune as reference rows; deltas sorted by bits.
pub fn pareto_table(report: &CompareReport) -> String {
    let mut out = String::new();
    for (d, ds) in report.datasets.iter().enumerate() {
        out.push_str(&format!(
            "{} ({} scored positions)\n\n",
            ds.name, ds.scored_targets
        ));
        out.push_str("| method | bits/param | ppl | KL | top-1 | front |\n");
        out.push_str("|---|--:|--:|--:|--:|:-:|\n");
        for (m, x) in report.models.iter().zip(&ds.metrics) {
            if m.kind != ModelKind::Delta {
                out.push_str(&format!(
                    "| {} | - | {:.3} | {:.4} | {:.3} | |\n",
                    m.name, x.ppl, x.kl, x.top1_agreement
                ));
            }
        }
        for p in pareto_points(report, d) {
            out.push_str(&format!(
                "| {} | {:.3} | {:.3} | {:.4} | {:.3} | {} |\n",
                p.method,
                p.bits,
                p.ppl,
                p.kl,
                p.top1,
                if p.front { "*" } else { "" }
            ));
        }
        out.push('\n');
    }
    out
}

/// Perplexity (left) and KL (right, log scale) against bits per parameter, one row of panels
/// per data set; one colour per method family, the Pareto front as a dashed line, the
/// fine-tune's perplexity as a horizontal line.
pub fn pareto_png(report: &CompareReport) -> Result<Vec<u8>> {
    let rows = report.datasets.len().max(1);
    let size = (1400u32, 80 + 460 * rows as u32);
    let families: Vec<String> = {
        let mut f: Vec<String> = Vec::new();
        for p in pareto_points(report, 0) {
            if !f.contains(&p.family) {
                f.push(p.family);
            }
        }
        f
    };
    let color = |family: &str| {
        let i = families.iter().position(|f| f == family).unwrap_or(0);
        TAB10[(i + 1) % TAB10.len()]
    };
    render("pareto.png", size, |root| {
        let e = draw_err("pareto.png");
        let root = root
            .titled(
                "Held-out perplexity and KL(fine-tune ‖ model) against bits per parameter",
                (FAMILY, 24),
            )
            .map_err(&e)?;
        let panels = root.split_evenly((rows, 2));
        for (d, ds) in report.datasets.iter().enumerate() {
            let points = pareto_points(report, d);
            if points.is_empty() {
                continue;
            }
            let ft_ppl = report
                .models
                .iter()
                .zip(&ds.metrics)
                .find(|(m, _)| m.kind == ModelKind::Finetuned)
                .map(|(_, x)| x.ppl);
            let bmax = points.iter().map(|p| p.bits).fold(0.0f64, f64::max) * 1.1 + 0.1;
            for (panel, metric) in [(0usize, "ppl"), (1, "kl")] {
                let value = |p: &ParetoPoint| if metric == "ppl" { p.ppl } else { p.kl };
                let finite: Vec<f64> = points
                    .iter()
                    .map(value)
                    .chain(if metric == "ppl" { ft_ppl } else { None })
                    .filter(|v| v.is_finite() && *v > 0.0)
                    .collect();
                let lo = finite.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = finite.iter().copied().fold(0.0f64, f64::max);
                let area = &panels[2 * d + panel];
                let caption = if metric == "ppl" {
                    format!("perplexity — {}", ds.name)
                } else {
                    format!("KL(ft ‖ model), nats, log scale — {}", ds.name)
                };
                let mut builder = ChartBuilder::on(area);
                builder
                    .caption(caption, (FAMILY, 18))
                    .margin(14)
                    .x_label_area_size(40)
                    .y_label_area_size(70);
                let pts: Vec<(f64, f64, &ParetoPoint)> = points
                    .iter()
                    .map(|p| (p.bits, value(p), p))
                    .filter(|(_, v, _)| v.is_finite() && *v > 0.0)
                    .collect();
                let front: Vec<(f64, f64)> = pts
                    .iter()
                    .filter(|(_, _, p)| p.front)
                    .map(|(b, v, _)| (*b, *v))
                    .collect();
                let label_style = (FAMILY, 12).into_font();
                macro_rules! draw {
                    ($chart:expr) => {{
                        let mut chart = $chart;
                        chart
                            .configure_mesh()
                            .x_desc("bits per parameter (compressed weights)")
                            .label_style((FAMILY, 14))
                            .draw()
                            .map_err(&e)?;
                        chart
                            .draw_series(LineSeries::new(
                                front.iter().copied(),
                                ShapeStyle::from(&BLACK.mix(0.5)).stroke_width(1),
                            ))
                            .map_err(&e)?;
                        if metric == "ppl" {
                            if let Some(f) = ft_ppl {
                                chart
                                    .draw_series(LineSeries::new(
                                        [(0.0, f), (bmax, f)],
                                        ShapeStyle::from(&TAB10[0]).stroke_width(1),
                                    ))
                                    .map_err(&e)?
                                    .label("fine-tune")
                                    .legend(|(x, y)| {
                                        PathElement::new([(x, y), (x + 16, y)], TAB10[0])
                                    });
                            }
                        }
                        for fam in &families {
                            let c = color(fam);
                            chart
                                .draw_series(pts.iter().filter(|(_, _, p)| &p.family == fam).map(
                                    |(b, v, p)| {
                                        let style = if p.front {
                                            c.filled()
                                        } else {
                                            c.stroke_width(2)
                                        };
                                        Circle::new((*b, *v), 5, style)
                                    },
                                ))
                                .map_err(&e)?
                                .label(fam.as_str())
                                .legend(move |(x, y)| Circle::new((x + 8, y), 5, c.filled()));
                        }
                        chart
                            .draw_series(pts.iter().map(|(b, v, p)| {
                                let short = p
                                    .method
                                    .split_once(':')
                                    .map_or(p.method.as_str(), |(_, s)| s)
                                    .split(',')
                                    .next()
                                    .unwrap_or("")
                                    .to_owned();
                                Text::new(short, (*b, *v), label_style.clone())
                            }))
                            .map_err(&e)?;
                        chart
                            .configure_series_labels()
                            .background_style(WHITE.mix(0.8))
                            .border_style(BLACK)
                            .label_font((FAMILY, 13))
                            .draw()
                            .map_err(&e)?;
                    }};
                }
                if metric == "ppl" {
                    let pad = (hi - lo).max(1e-3) * 0.1;
                    draw!(builder
                        .build_cartesian_2d(0.0..bmax, (lo - pad)..(hi + pad))
                        .map_err(&e)?);
                } else {
                    draw!(builder
                        .build_cartesian_2d(0.0..bmax, (lo * 0.7..hi * 1.4).log_scale())
                        .map_err(&e)?);
                }
            }
        }
        Ok(())
    })
}
