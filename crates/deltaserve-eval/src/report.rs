//! A [`CompareReport`] as a terminal table, JSON, and a Markdown report with PNG plots.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::compare::{CompareReport, DeltaWeights, ModelEntry, ModelKind};
use crate::error::{EvalError, Result};
use crate::plot;

/// Lays out rows under headers; `right[i]` right-aligns column `i` (numbers).
pub fn text_table(headers: &[&str], rows: &[Vec<String>], right: &[bool]) -> String {
    let width = |s: &str| s.chars().count();
    let mut w: Vec<usize> = headers.iter().map(|h| width(h)).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < w.len() {
                w[i] = w[i].max(width(c));
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = w[i].saturating_sub(width(c));
            if i > 0 {
                s.push_str("  ");
            }
            if right.get(i).copied().unwrap_or(false) {
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            } else {
                s.push_str(c);
                if i + 1 < cells.len() {
                    s.push_str(&" ".repeat(pad));
                }
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(headers.to_vec());
    out.push('\n');
    let rule: Vec<String> = w.iter().map(|&n| "-".repeat(n)).collect();
    out.push_str(&line(rule.iter().map(String::as_str).collect()));
    out.push('\n');
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

/// `12.3 MiB`.
pub fn fmt_bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

fn kind_label(m: &ModelEntry) -> String {
    match m.kind {
        ModelKind::Base => "base".into(),
        ModelKind::Finetuned => "fine-tune".into(),
        ModelKind::Delta => {
            let method = m.method.as_deref().unwrap_or("delta");
            if m.calibrated == Some(true) {
                format!("{method}, calibrated")
            } else {
                method.to_string()
            }
        }
    }
}

fn fmt_ppl(x: f64) -> String {
    if x.is_finite() && x < 1e6 {
        format!("{x:.3}")
    } else {
        format!("{x:.3e}")
    }
}

fn fmt_opt(x: Option<f64>) -> String {
    x.map_or_else(|| "—".into(), |v| format!("{v:.4e}"))
}

/// Files [`CompareReport::write_markdown`] wrote.
#[derive(Debug, Clone)]
pub struct ReportFiles {
    /// `report.md`.
    pub markdown: PathBuf,
    /// The PNG plots.
    pub plots: Vec<PathBuf>,
}

/// The definitions every output states, so numbers are not misread.
pub const DEFINITIONS: &[(&str, &str)] = &[
    ("ppl", "exp(mean negative log-likelihood per scored target token), every target weighted 1"),
    ("KL(ft‖model)", "mean over scored positions of KL(p_finetuned ‖ p_model) of the next-token distributions, in nats"),
    ("top-1", "share of scored positions where the model's most likely next token is the fine-tune's"),
    ("bits/param", "bits per parameter of the compressed weights (a full model: of all its weights)"),
    ("bits/param (all)", "bits per parameter over every tensor the file stores, full ones included"),
    ("rel. error", "‖W_rec − W_ft‖_F / ‖W_ft − W_base‖_F: the share of the fine-tuning change the delta loses (1 = keeps nothing)"),
    ("rel. error vs ‖W_ft‖", "‖W_rec − W_ft‖_F / ‖W_ft‖_F"),
    ("scale init", "BitDelta's initial scale mean|W_ft − W_base| (arXiv 2402.10193, eq. 2)"),
];

impl CompareReport {
    /// The fine-tune's row is the reference; its KL and agreement are 0 and 1 by construction.
    pub fn table(&self) -> String {
        let mut out = String::new();
        for ds in &self.datasets {
            let _ = writeln!(
                out,
                "{}: {}, {} sequences, {} tokens, {} scored",
                ds.name,
                ds.scored.describe(),
                ds.sequences,
                ds.tokens,
                ds.scored_targets
            );
            for n in &ds.notes {
                let _ = writeln!(out, "  note: {n}");
            }
            let rows: Vec<Vec<String>> = ds
                .metrics
                .iter()
                .zip(&self.models)
                .map(|(m, e)| {
                    vec![
                        m.model.clone(),
                        kind_label(e),
                        fmt_ppl(m.ppl),
                        format!("{:.4}", m.kl),
                        format!("{:.1}%", 100.0 * m.top1_agreement),
                        fmt_bytes(e.size_bytes),
                        format!("{:.2}", e.bits_per_param),
                        format!("{:.2}", e.bits_per_param_all),
                    ]
                })
                .collect();
            out.push_str(&text_table(
                &[
                    "model",
                    "kind",
                    "ppl",
                    "KL(ft‖model)",
                    "top-1",
                    "size",
                    "bits/param",
                    "(all)",
                ],
                &rows,
                &[false, false, true, true, true, true, true, true],
            ));
            out.push('\n');
        }
        for dw in &self.weights {
            out.push_str(&layer_table(dw));
            out.push('\n');
        }
        out.push_str("bits/param: compressed weights; (all): every stored tensor. ");
        out.push_str("rel. error: ‖W_rec − W_ft‖/‖W_ft − W_base‖.\n");
        out
    }

    /// Pretty-printed JSON of the whole report.
    pub fn to_json(&self) -> String {
        let mut v = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        if let Some(o) = v.as_object_mut() {
            let defs: serde_json::Map<String, serde_json::Value> = DEFINITIONS
                .iter()
                .map(|(k, d)| (k.to_string(), serde_json::Value::from(*d)))
                .collect();
            o.insert("definitions".into(), defs.into());
        }
        // Non-finite numbers become null (JSON has no infinity).
        serde_json::to_string_pretty(&v).unwrap_or_else(|_| "{}".into())
    }

    /// Writes `report.md` and its PNG plots into `dir` (created if missing), each atomically.
    pub fn write_markdown(&self, dir: &Path) -> Result<ReportFiles> {
        std::fs::create_dir_all(dir).map_err(|e| EvalError::Report {
            path: dir.to_owned(),
            msg: e.to_string(),
        })?;
        let mut plots = Vec::new();
        let metrics_png = dir.join("metrics.png");
        write_file(&metrics_png, &plot::metrics_png(self)?)?;
        plots.push(metrics_png);
        let has_layers = self.weights.iter().any(|w| !w.tensors.is_empty());
        if has_layers {
            let p = dir.join("layer_error.png");
            write_file(&p, &plot::layer_error_png(self)?)?;
            plots.push(p);
        }
        let has_scales = self
            .weights
            .iter()
            .any(|w| w.tensors.iter().any(|t| t.scale.is_some()));
        if has_scales {
            let p = dir.join("scales.png");
            write_file(&p, &plot::scales_png(self)?)?;
            plots.push(p);
        }
        let md = self.markdown(has_layers, has_scales);
        let markdown = dir.join("report.md");
        write_file(&markdown, md.as_bytes())?;
        Ok(ReportFiles { markdown, plots })
    }

    fn markdown(&self, has_layers: bool, has_scales: bool) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# deltaserve evaluation report\n");
        let _ = writeln!(
            s,
            "Each model is compared with the full fine-tune on the same token sequences: perplexity, \
             KL divergence of the next-token distribution from the fine-tune's, and top-1 agreement with it. \
             Deltas are applied to the base model.\n"
        );
        if !self.sources.is_empty() {
            let _ = writeln!(s, "## Inputs\n");
            for (name, what) in &self.sources {
                let _ = writeln!(s, "- **{name}**: `{what}`");
            }
            s.push('\n');
        }
        let _ = writeln!(s, "## Models\n");
        let _ = writeln!(s, "| model | kind | size | bits/param | bits/param (all) |");
        let _ = writeln!(s, "| --- | --- | ---: | ---: | ---: |");
        for m in &self.models {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.2} | {:.2} |",
                m.name,
                kind_label(m),
                fmt_bytes(m.size_bytes),
                m.bits_per_param,
                m.bits_per_param_all
            );
        }
        s.push('\n');
        for ds in &self.datasets {
            let _ = writeln!(s, "## Data: `{}`\n", ds.name);
            let _ = writeln!(
                s,
                "{} sequences, {} tokens; scored: {} ({} positions).\n",
                ds.sequences,
                ds.tokens,
                ds.scored.describe(),
                ds.scored_targets
            );
            for n in &ds.notes {
                let _ = writeln!(s, "- {n}");
            }
            if !ds.notes.is_empty() {
                s.push('\n');
            }
            let _ = writeln!(s, "| model | ppl | KL(ft‖model) | top-1 agreement |");
            let _ = writeln!(s, "| --- | ---: | ---: | ---: |");
            for m in &ds.metrics {
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.4} | {:.1}% |",
                    m.model,
                    fmt_ppl(m.ppl),
                    m.kl,
                    100.0 * m.top1_agreement
                );
            }
            s.push('\n');
        }
        let _ = writeln!(
            s,
            "![Perplexity and KL(fine-tune ‖ model) per model](metrics.png)\n"
        );
        if has_layers {
            let _ = writeln!(s, "## Reconstruction error per layer\n");
            let _ = writeln!(
                s,
                "Relative Frobenius error of each reconstructed projection weight, ‖W_rec − W_ft‖ / ‖W_ft − W_base‖: \
                 the share of the fine-tuning change that the delta loses (0 = exact, 1 = as the base).\n"
            );
            let _ = writeln!(s, "![Relative error per layer](layer_error.png)\n");
            if has_scales {
                let _ = writeln!(
                    s,
                    "![Scale after / before calibration](scales.png)\n\n\
                     \"before\" is the scale the calibration record states, else BitDelta's initial mean|W_ft − W_base| \
                     computed here; \"after\" is the scale the delta stores.\n"
                );
            }
            for dw in &self.weights {
                let _ = writeln!(s, "### `{}`\n", dw.delta);
                let _ = writeln!(
                    s,
                    "| tensor | kind | rel. error | rel. error vs ‖W_ft‖ | rel. error at init scale | scale init | scale before | scale after |"
                );
                let _ = writeln!(s, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
                for t in &dw.tensors {
                    let _ = writeln!(
                        s,
                        "| `{}` | {} | {:.4} | {:.4} | {} | {} | {} | {} |",
                        t.name,
                        t.kind,
                        t.rel_err,
                        t.rel_err_vs_weight,
                        t.rel_err_init
                            .map_or_else(|| "—".into(), |v| format!("{v:.4}")),
                        fmt_opt(t.scale_init),
                        fmt_opt(t.scale_before),
                        fmt_opt(t.scale)
                    );
                }
                s.push('\n');
            }
        }
        let _ = writeln!(s, "## Definitions\n");
        for (k, d) in DEFINITIONS {
            let _ = writeln!(s, "- **{k}**: {d}");
        }
        s
    }
}

/// Per-layer × projection relative errors of one delta.
fn layer_table(dw: &DeltaWeights) -> String {
    let layers = dw.tensors.iter().map(|t| t.layer + 1).max().unwrap_or(0);
    let projs = ["q", "k", "v", "o", "gate", "up", "down"];
    let rows: Vec<Vec<String>> = (0..layers)
        .map(|l| {
            let mut r = vec![l.to_string()];
            for p in projs {
                let cell = dw
                    .tensors
                    .iter()
                    .find(|t| t.layer == l && t.proj == p)
                    .map_or_else(|| "—".into(), |t| format!("{:.3}", t.rel_err));
                r.push(cell);
            }
            r
        })
        .collect();
    let mut out = format!(
        "{}: relative error ‖W_rec − W_ft‖/‖W_ft − W_base‖ per layer\n",
        dw.delta
    );
    let mut headers = vec!["layer"];
    headers.extend(projs);
    out.push_str(&text_table(&headers, &rows, &[true; 8]));
    let ratios: Vec<f64> = dw
        .tensors
        .iter()
        .filter_map(|t| Some(t.scale? / t.scale_before.or(t.scale_init)?))
        .filter(|r| r.is_finite())
        .collect();
    if dw.calibrated && !ratios.is_empty() {
        let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
        let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let max = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let _ = writeln!(
            out,
            "scale after / before: mean ×{mean:.3} (min ×{min:.3}, max ×{max:.3})"
        );
    }
    out
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    deltaserve_format::write_atomic(path, true, |w| w.write_all(bytes)).map_err(|e| {
        EvalError::Report {
            path: path.to_owned(),
            msg: e.to_string(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = text_table(
            &["a", "num"],
            &[
                vec!["long name".into(), "1.5".into()],
                vec!["x".into(), "10.25".into()],
            ],
            &[false, true],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "a            num");
        assert_eq!(lines[2], "long name    1.5");
        assert_eq!(lines[3], "x          10.25");
    }

    #[test]
    fn bytes_are_human() {
        assert_eq!(fmt_bytes(512), "512 B");
        assert_eq!(fmt_bytes(3 << 20), "3.0 MiB");
    }
}
