//! Base, fine-tune and deltas side by side: how close each model's next-token distribution is to
//! the fine-tune's, what it costs on disk, and how well each delta reconstructs each weight.
//!
//! Every model sees the same sequences. Per model and data set:
//! - perplexity: exp(mean nll over the scored targets), each target weighted 1;
//! - mean KL(fine-tune ‖ model) per scored position, in nats (0 for the fine-tune itself);
//! - top-1 agreement: the share of scored positions where the model's most likely token is the
//!   fine-tune's (1 for the fine-tune itself).
//!
//! Per delta and projection: the relative Frobenius error of the weight the delta reconstructs,
//! ‖W_rec − W_ft‖ / ‖W_ft − W_base‖ (how much of the fine-tuning change is lost; 1 for a delta
//! that keeps nothing), also ‖W_rec − W_ft‖ / ‖W_ft‖, and BitDelta's scales.

use candle_core::{DType, Device, Tensor};
use deltaserve_format::{DeltaFile, DeltaHeader, DeltaSummary};
use deltaserve_model::{Checkpoint, ForwardOptions, LinearDelta, Model, Proj, TenantWeights};
use rayon::prelude::*;
use serde::Serialize;

use crate::data::{EvalDataset, EvalSequence, Scored};
use crate::error::{EvalError, Result};
use crate::stats::{kl, nll, row_norm, HostRows, RowNorm};

/// Storage of a full checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelInfo {
    /// Bytes of its weight files.
    pub size_bytes: u64,
    /// Parameters stored.
    pub params: u64,
    /// Bits per stored parameter (16 for bf16/f16 checkpoints).
    pub bits_per_param: f64,
}

impl ModelInfo {
    /// Sizes of a checkpoint's weight files and tensors.
    pub fn from_checkpoint(ckpt: &Checkpoint) -> ModelInfo {
        let size_bytes = ckpt
            .weight_files()
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum();
        let (mut params, mut bytes) = (0u64, 0u64);
        for name in ckpt.tensor_names() {
            if let Ok(raw) = ckpt.raw(name) {
                params += raw.shape.iter().product::<usize>() as u64;
                bytes += raw.data.len() as u64;
            }
        }
        let bits_per_param = if params == 0 {
            0.0
        } else {
            (bytes * 8) as f64 / params as f64
        };
        ModelInfo {
            size_bytes,
            params,
            bits_per_param,
        }
    }
}

/// One delta to evaluate: its in-memory tenant and what its file says about it.
pub struct DeltaInput<'a> {
    /// Name in tables (e.g. the file stem).
    pub name: String,
    /// The tenant built from the delta (by the codecs crate).
    pub tenant: &'a TenantWeights,
    /// The delta file's header (method, calibration record).
    pub header: DeltaHeader,
    /// Storage accounting from the file.
    pub summary: DeltaSummary,
    /// The file's size in bytes.
    pub file_size: u64,
}

impl<'a> DeltaInput<'a> {
    /// Takes header, summary and size from an opened delta file.
    pub fn from_file(name: impl Into<String>, file: &DeltaFile, tenant: &'a TenantWeights) -> Self {
        Self {
            name: name.into(),
            tenant,
            header: file.header().clone(),
            summary: file.summary(),
            file_size: file.file_size(),
        }
    }
}

/// Knobs of a comparison.
#[derive(Debug, Clone, Copy)]
pub struct CompareOptions {
    /// Tokens per forward call; `None` picks one that keeps a call's logits near 256 MiB.
    pub batch_tokens: Option<usize>,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// Compute the per-tensor reconstruction errors.
    pub weight_errors: bool,
}

impl Default for CompareOptions {
    fn default() -> Self {
        Self {
            batch_tokens: None,
            progress: false,
            weight_errors: true,
        }
    }
}

/// Everything a comparison needs, already loaded (the `demo` command keeps serving the same
/// models and tenants afterwards).
pub struct CompareInputs<'a> {
    /// The base model (deltas apply to it).
    pub base: &'a Model,
    /// The base checkpoint's storage.
    pub base_info: ModelInfo,
    /// The full fine-tune: the reference distribution.
    pub finetuned: &'a Model,
    /// The fine-tune checkpoint's storage.
    pub finetuned_info: ModelInfo,
    /// Deltas of the fine-tune against the base.
    pub deltas: Vec<DeltaInput<'a>>,
    /// Data sets, each reported on its own.
    pub datasets: &'a [EvalDataset],
    /// Knobs.
    pub options: CompareOptions,
}

/// What kind of model a row is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// The base checkpoint.
    Base,
    /// The full fine-tune.
    Finetuned,
    /// A delta applied to the base.
    Delta,
}

/// One compared model and its storage.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelEntry {
    /// Name in tables: `base`, `finetuned`, or the delta's name.
    pub name: String,
    /// Base, fine-tune or delta.
    pub kind: ModelKind,
    /// The delta's compression method (`bitdelta`, ...).
    pub method: Option<String>,
    /// Bytes on disk (weight files, or the delta file).
    pub size_bytes: u64,
    /// Bits per parameter of the compressed weights (for a full model: of all its weights).
    pub bits_per_param: f64,
    /// Bits per parameter over every tensor the file stores (compressed and full).
    pub bits_per_param_all: f64,
    /// Whether the delta's scales were calibrated (it has a calibration record).
    pub calibrated: Option<bool>,
    /// The delta header's calibration record, as written by the calibrator.
    pub calibration: Option<serde_json::Value>,
}

/// One model's numbers on one data set.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelMetrics {
    /// The model's name (as in [`ModelEntry::name`]).
    pub model: String,
    /// exp(mean nll per scored target).
    pub ppl: f64,
    /// Mean nll per scored target, nats.
    pub mean_nll: f64,
    /// Mean KL(fine-tune ‖ model) per scored position, nats.
    pub kl: f64,
    /// Share of scored positions whose argmax token equals the fine-tune's.
    pub top1_agreement: f64,
}

/// One data set's results.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatasetReport {
    /// Its name (file name).
    pub name: String,
    /// Which tokens were scored.
    pub scored: Scored,
    /// Sequences evaluated.
    pub sequences: usize,
    /// Tokens in them.
    pub tokens: usize,
    /// Positions scored.
    pub scored_targets: usize,
    /// Truncations, caps, fallbacks.
    pub notes: Vec<String>,
    /// One entry per model, in [`CompareReport::models`] order.
    pub metrics: Vec<ModelMetrics>,
}

/// How one delta reconstructs one projection weight.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TensorError {
    /// Checkpoint name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// Decoder layer.
    pub layer: usize,
    /// Short projection name: `q`, `k`, `v`, `o`, `gate`, `up`, `down`.
    pub proj: &'static str,
    /// How the delta stores it: `sign`, `dense`, or `none` (left as the base).
    pub kind: &'static str,
    /// ‖W_rec − W_ft‖_F / ‖W_ft − W_base‖_F.
    pub rel_err: f64,
    /// ‖W_rec − W_ft‖_F / ‖W_ft‖_F.
    pub rel_err_vs_weight: f64,
    /// ‖W_ft − W_base‖_F.
    pub delta_norm: f64,
    /// The scale the delta stores (after calibration, if it was calibrated).
    pub scale: Option<f64>,
    /// BitDelta's initial scale, mean |W_ft − W_base| (arXiv 2402.10193, eq. 2), computed here.
    pub scale_init: Option<f64>,
    /// The scale before calibration as the calibration record states it, if it does.
    pub scale_before: Option<f64>,
    /// `rel_err` the same signs would have with `scale_init`.
    pub rel_err_init: Option<f64>,
}

/// One delta's per-tensor errors.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeltaWeights {
    /// The delta's name.
    pub delta: String,
    /// Whether the delta's scales were calibrated (its header has a calibration record).
    pub calibrated: bool,
    /// One entry per (layer, projection), layer-major in [`Proj::ALL`] order.
    pub tensors: Vec<TensorError>,
}

/// The result of [`compare`]: print it with [`CompareReport::table`], save it with
/// [`CompareReport::to_json`] or [`CompareReport::write_markdown`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompareReport {
    /// Base, fine-tune, then the deltas in the order given.
    pub models: Vec<ModelEntry>,
    /// Per data set.
    pub datasets: Vec<DatasetReport>,
    /// Per delta.
    pub weights: Vec<DeltaWeights>,
    /// Where each model and data set came from, as (name, path or description); filled by
    /// callers that know (the CLI), listed in the Markdown report.
    pub sources: Vec<(String, String)>,
}

/// Short name of a projection.
pub fn proj_short(p: Proj) -> &'static str {
    match p {
        Proj::Q => "q",
        Proj::K => "k",
        Proj::V => "v",
        Proj::O => "o",
        Proj::Gate => "gate",
        Proj::Up => "up",
        Proj::Down => "down",
    }
}

/// Running sums for one model on one data set.
#[derive(Debug, Clone, Copy, Default)]
struct Acc {
    nll: f64,
    kl: f64,
    agree: usize,
    count: usize,
}

impl Acc {
    fn add(self, o: Acc) -> Acc {
        Acc {
            nll: self.nll + o.nll,
            kl: self.kl + o.kl,
            agree: self.agree + o.agree,
            count: self.count + o.count,
        }
    }
}

/// The scored rows of a batch in host memory, with the fine-tune's normalisers.
struct BatchRef {
    /// Per sequence: (row indices into its logits, target token per row).
    rows: Vec<(Vec<usize>, Vec<u32>)>,
    /// The fine-tune's rows, per sequence.
    ft: Vec<HostRows>,
    /// The fine-tune's normalisers, per sequence and row.
    ft_norm: Vec<Vec<RowNorm>>,
}

fn scored_rows(seq: &EvalSequence) -> (Vec<usize>, Vec<u32>) {
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (t, (&tok, &s)) in seq.tokens.iter().zip(&seq.scored).enumerate().skip(1) {
        if s {
            rows.push(t - 1);
            targets.push(tok);
        }
    }
    (rows, targets)
}

fn forward_all(
    model: &Model,
    tenant: Option<&TenantWeights>,
    seqs: &[&EvalSequence],
) -> Result<Vec<Tensor>> {
    let windows: Vec<&[u32]> = seqs.iter().map(|s| s.tokens.as_slice()).collect();
    Ok(model.window_logits(&windows, tenant, ForwardOptions::default())?)
}

/// Sums nll, KL(ft ‖ model) and top-1 agreement of one model's logits over a batch.
fn accumulate(batch: &BatchRef, logits: &[Tensor], model_name: &str) -> Result<Acc> {
    let mut acc = Acc::default();
    for (i, lg) in logits.iter().enumerate() {
        let (rows, targets) = &batch.rows[i];
        if rows.is_empty() {
            continue;
        }
        let host = HostRows::gather(lg, rows)?;
        let ft = &batch.ft[i];
        if host.vocab != ft.vocab {
            return Err(EvalError::Input(format!(
                "{model_name} has a vocabulary of {} and the fine-tune {}; KL and agreement need the same vocabulary",
                host.vocab, ft.vocab
            )));
        }
        if let Some(&bad) = targets.iter().find(|&&t| t as usize >= host.vocab) {
            return Err(EvalError::Input(format!(
                "token id {bad} is outside {model_name}'s vocabulary of {}",
                host.vocab
            )));
        }
        let norms = &batch.ft_norm[i];
        let part = (0..rows.len())
            .into_par_iter()
            .map(|r| {
                let row = host.row(r);
                let n = row_norm(row);
                Acc {
                    nll: nll(row, n, targets[r] as usize),
                    kl: kl(ft.row(r), norms[r], row, n),
                    agree: usize::from(n.argmax == norms[r].argmax),
                    count: 1,
                }
            })
            .reduce(Acc::default, Acc::add);
        acc = acc.add(part);
    }
    Ok(acc)
}

/// Groups sequences into forward calls of at most `budget` tokens (one sequence at least).
fn batches(seqs: &[EvalSequence], budget: usize) -> Vec<Vec<&EvalSequence>> {
    let mut out: Vec<Vec<&EvalSequence>> = Vec::new();
    let mut cur: Vec<&EvalSequence> = Vec::new();
    let mut cur_tokens = 0;
    for s in seqs.iter().filter(|s| s.scored_targets() > 0) {
        if !cur.is_empty() && cur_tokens + s.tokens.len() > budget {
            out.push(std::mem::take(&mut cur));
            cur_tokens = 0;
        }
        cur_tokens += s.tokens.len();
        cur.push(s);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Runs every model on every data set and measures every delta's weights.
pub fn compare(inputs: &CompareInputs<'_>) -> Result<CompareReport> {
    let base_cfg = inputs.base.config();
    let ft_cfg = inputs.finetuned.config();
    if base_cfg.num_hidden_layers != ft_cfg.num_hidden_layers
        || base_cfg.hidden_size != ft_cfg.hidden_size
    {
        return Err(EvalError::Input(format!(
            "the base ({} layers, hidden {}) and the fine-tune ({} layers, hidden {}) are not the same architecture",
            base_cfg.num_hidden_layers, base_cfg.hidden_size, ft_cfg.num_hidden_layers, ft_cfg.hidden_size
        )));
    }
    let models = model_entries(inputs);
    let vocab = ft_cfg.vocab_size.max(base_cfg.vocab_size);
    let budget = inputs
        .options
        .batch_tokens
        .unwrap_or(((256usize << 20) / (vocab * 4)).max(256));

    let total_work: usize =
        inputs.datasets.iter().map(|d| d.tokens()).sum::<usize>() * (models.len() - 1).max(1);
    let bar = if inputs.options.progress {
        let b = indicatif::ProgressBar::new(total_work as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix:>10} [{bar:30}] {pos}/{len} tokens·models {elapsed}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b.set_prefix("evaluating");
        b
    } else {
        indicatif::ProgressBar::hidden()
    };

    let mut datasets = Vec::with_capacity(inputs.datasets.len());
    for ds in inputs.datasets {
        // accs[0] base, accs[1] fine-tune, accs[2..] deltas.
        let mut accs = vec![Acc::default(); models.len()];
        for batch in batches(&ds.sequences, budget) {
            let batch_tokens: usize = batch.iter().map(|s| s.tokens.len()).sum();
            let ft_logits = forward_all(inputs.finetuned, None, &batch)?;
            let rows: Vec<(Vec<usize>, Vec<u32>)> = batch.iter().map(|s| scored_rows(s)).collect();
            let ft: Vec<HostRows> = ft_logits
                .iter()
                .zip(&rows)
                .map(|(lg, (r, _))| HostRows::gather(lg, r))
                .collect::<Result<_>>()?;
            let ft_norm: Vec<Vec<RowNorm>> = ft
                .iter()
                .map(|h| {
                    (0..h.len())
                        .into_par_iter()
                        .map(|r| row_norm(h.row(r)))
                        .collect()
                })
                .collect();
            let bref = BatchRef { rows, ft, ft_norm };
            // The fine-tune against itself, through the same code: KL exactly 0, agreement exactly 1.
            accs[1] = accs[1].add(accumulate(&bref, &ft_logits, "finetuned")?);
            drop(ft_logits);
            accs[0] = accs[0].add(accumulate(
                &bref,
                &forward_all(inputs.base, None, &batch)?,
                "base",
            )?);
            bar.inc(batch_tokens as u64);
            for (d, delta) in inputs.deltas.iter().enumerate() {
                let logits = forward_all(inputs.base, Some(delta.tenant), &batch)?;
                accs[2 + d] = accs[2 + d].add(accumulate(&bref, &logits, &delta.name)?);
                bar.inc(batch_tokens as u64);
            }
        }
        let metrics = models
            .iter()
            .zip(&accs)
            .map(|(m, a)| {
                let n = a.count.max(1) as f64;
                ModelMetrics {
                    model: m.name.clone(),
                    ppl: (a.nll / n).exp(),
                    mean_nll: a.nll / n,
                    kl: a.kl / n,
                    top1_agreement: a.agree as f64 / n,
                }
            })
            .collect();
        datasets.push(DatasetReport {
            name: ds.name.clone(),
            scored: ds.scored,
            sequences: ds.sequences.len(),
            tokens: ds.tokens(),
            scored_targets: ds.scored_targets(),
            notes: ds.notes.clone(),
            metrics,
        });
    }
    bar.finish_and_clear();

    let weights = if inputs.options.weight_errors {
        inputs
            .deltas
            .iter()
            .map(|d| {
                Ok(DeltaWeights {
                    delta: d.name.clone(),
                    calibrated: d.header.calibration.is_some(),
                    tensors: weight_errors(
                        inputs.base,
                        inputs.finetuned,
                        d.tenant,
                        d.header.calibration.as_ref(),
                    )?,
                })
            })
            .collect::<Result<Vec<_>>>()?
    } else {
        Vec::new()
    };
    Ok(CompareReport {
        models,
        datasets,
        weights,
        sources: Vec::new(),
    })
}

fn model_entries(inputs: &CompareInputs<'_>) -> Vec<ModelEntry> {
    let full = |name: &str, kind, info: &ModelInfo| ModelEntry {
        name: name.into(),
        kind,
        method: None,
        size_bytes: info.size_bytes,
        bits_per_param: info.bits_per_param,
        bits_per_param_all: info.bits_per_param,
        calibrated: None,
        calibration: None,
    };
    let mut models = vec![
        full("base", ModelKind::Base, &inputs.base_info),
        full("finetuned", ModelKind::Finetuned, &inputs.finetuned_info),
    ];
    for d in &inputs.deltas {
        let s = &d.summary;
        let all_params = s.compressed_params + s.full_params;
        models.push(ModelEntry {
            name: d.name.clone(),
            kind: ModelKind::Delta,
            method: Some(d.header.method.clone()),
            size_bytes: d.file_size,
            bits_per_param: s.bits_per_param(),
            bits_per_param_all: if all_params == 0 {
                0.0
            } else {
                (s.tensor_bytes() * 8) as f64 / all_params as f64
            },
            calibrated: Some(d.header.calibration.is_some()),
            calibration: d.header.calibration.clone(),
        });
    }
    models
}

fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// Per-tensor reconstruction errors of one tenant's linear deltas.
pub fn weight_errors(
    base: &Model,
    finetuned: &Model,
    tenant: &TenantWeights,
    calibration: Option<&serde_json::Value>,
) -> Result<Vec<TensorError>> {
    let mut out = Vec::new();
    for (l, (bl, fl)) in base.layers.iter().zip(&finetuned.layers).enumerate() {
        for proj in Proj::ALL {
            let k = proj.index();
            let name = format!("model.layers.{l}.{}.weight", proj.module());
            let wb = host_f32(&bl.linears[k].weight)?;
            let wf = host_f32(&fl.linears[k].weight)?;
            if wb.len() != wf.len() {
                return Err(EvalError::Input(format!(
                    "tensor {name}: {:?} in the base but {:?} in the fine-tune",
                    bl.linears[k].weight.dims(),
                    fl.linears[k].weight.dims()
                )));
            }
            let diff: Vec<f32> = wf.iter().zip(&wb).map(|(f, b)| f - b).collect();
            let delta_sq: f64 = diff.par_iter().map(|&d| (d as f64) * (d as f64)).sum();
            let weight_sq: f64 = wf.par_iter().map(|&w| (w as f64) * (w as f64)).sum();
            let abs_mean =
                diff.par_iter().map(|&d| (d as f64).abs()).sum::<f64>() / diff.len().max(1) as f64;
            let delta = tenant.layers.get(l).and_then(|ld| ld.linears[k].as_ref());
            let (kind, err_sq, scale, rel_err_init) = match delta {
                None => ("none", delta_sq, None, None),
                Some(d @ (LinearDelta::Dense { .. } | LinearDelta::LowRank { .. })) => {
                    let rec = host_f32(&d.to_dense_f32()?)?;
                    check_len(&name, rec.len(), diff.len())?;
                    let e: f64 = rec
                        .par_iter()
                        .zip(&diff)
                        .map(|(&r, &d)| ((r - d) as f64).powi(2))
                        .sum();
                    let kind = match d {
                        LinearDelta::LowRank { .. } => "lowrank",
                        _ => "dense",
                    };
                    (kind, e, None, None)
                }
                Some(LinearDelta::Sign { bits, scale }) => {
                    let words = bits.to_host_words()?;
                    let signs = deltaserve_format::unpack_signs(&words, bits.n(), bits.k());
                    check_len(&name, signs.len(), diff.len())?;
                    let scale = host_f32(scale)?.first().copied().unwrap_or(0.0) as f64;
                    // ‖αS − Δ‖² = ‖Δ‖² − 2α⟨S, Δ⟩ + α²·n, for both the stored and the initial α.
                    let dot: f64 = signs
                        .par_iter()
                        .zip(&diff)
                        .map(|(&s, &d)| s as f64 * d as f64)
                        .sum();
                    let n = signs.len() as f64;
                    let err = |a: f64| (delta_sq - 2.0 * a * dot + a * a * n).max(0.0);
                    let init = (delta_sq > 0.0).then(|| err(abs_mean).sqrt() / delta_sq.sqrt());
                    ("sign", err(scale), Some(scale), init)
                }
            };
            let err = err_sq.sqrt();
            let is_sign = kind == "sign";
            out.push(TensorError {
                scale_before: if is_sign {
                    recorded_scale_before(calibration, &name, l, proj)
                } else {
                    None
                },
                name,
                layer: l,
                proj: proj_short(proj),
                kind,
                rel_err: if delta_sq > 0.0 {
                    err / delta_sq.sqrt()
                } else if err == 0.0 {
                    0.0
                } else {
                    f64::INFINITY
                },
                rel_err_vs_weight: if weight_sq > 0.0 {
                    err / weight_sq.sqrt()
                } else {
                    0.0
                },
                delta_norm: delta_sq.sqrt(),
                scale,
                scale_init: is_sign.then_some(abs_mean),
                rel_err_init,
            });
        }
    }
    Ok(out)
}

fn check_len(name: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(EvalError::Input(format!(
            "tensor {name}: the delta reconstructs {got} values, the weight has {want}"
        )));
    }
    Ok(())
}

/// The pre-calibration scale of a tensor, if the calibration record states it.
///
/// Accepted shapes (whichever the calibrator writes): `{"scales_before": {name: x}}`,
/// `{"initial_scales": {name: x}}`, or `{"scales": {name: {"before": x, "after": y}}}`; names may
/// be the weight's checkpoint name or its module path (`model.layers.0.self_attn.q_proj`).
fn recorded_scale_before(
    calibration: Option<&serde_json::Value>,
    name: &str,
    layer: usize,
    proj: Proj,
) -> Option<f64> {
    let cal = calibration?;
    let module = format!("model.layers.{layer}.{}", proj.module());
    let lookup = |map: &serde_json::Value| -> Option<f64> {
        let v = map.get(name).or_else(|| map.get(&module))?;
        v.as_f64()
            .or_else(|| v.get("before").and_then(|b| b.as_f64()))
    };
    ["scales_before", "initial_scales", "scale_before", "scales"]
        .iter()
        .find_map(|k| cal.get(*k).and_then(lookup))
}
