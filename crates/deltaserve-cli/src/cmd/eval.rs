//! `deltaserve eval ppl` and `deltaserve eval compare`: perplexity of one model, and base,
//! fine-tune and deltas side by side (table, JSON, Markdown report with plots).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use clap::{Args as ClapArgs, Subcommand};
use deltaserve_eval::{CompareInputs, CompareOptions, DeltaInput, ModelInfo, PplSettings};
use deltaserve_format::DeltaFile;
use deltaserve_model::{TenantWeights, TextCodec};

use super::common::{load_model, parse_dtype, Loaded};

#[derive(ClapArgs)]
pub struct Args {
    #[command(subcommand)]
    command: EvalCommand,
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Sliding-window perplexity of a model (optionally with a delta) on a text file, computed as
    /// Hugging Face's perplexity guide does.
    Ppl(PplArgs),
    /// Base, fine-tune and deltas on the same data: perplexity, KL(fine-tune ‖ model), top-1
    /// agreement, size, bits per parameter, and per-layer reconstruction error.
    Compare(CompareArgs),
    /// Compress the fine-tune with many methods and settings (any `compress --method` spec),
    /// evaluate every delta, and write one table and one plot of perplexity and KL against
    /// bits per parameter with the Pareto front (sweep.md, pareto.png, sweep.json in --out).
    Sweep(super::sweep::SweepArgs),
}

#[derive(ClapArgs)]
struct PplArgs {
    /// Model directory (Hugging Face layout) or a Hub id found in the local Hugging Face cache.
    #[arg(long)]
    model: String,
    /// A delta file to apply to the model (the model is then its base).
    #[arg(long)]
    delta: Option<PathBuf>,
    /// Plain-text file, tokenized as one stream with the tokenizer's special tokens.
    #[arg(long)]
    data: PathBuf,
    /// Tokens per window (clamped to the model's context).
    #[arg(long, default_value_t = 2048)]
    seq_len: usize,
    /// Tokens the window moves each step; the overlap is context only.
    /// Default: 512, or a quarter of --seq-len when that is smaller.
    #[arg(long)]
    stride: Option<usize>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype: auto (f32 on CPU, bf16 on CUDA), f32, bf16, f16.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Print JSON instead of a sentence.
    #[arg(long)]
    json: bool,
}

#[derive(ClapArgs)]
struct CompareArgs {
    /// The base model directory (deltas apply to it).
    #[arg(long)]
    base: String,
    /// The full fine-tune's directory: the reference every model is compared with.
    #[arg(long)]
    finetuned: String,
    /// Delta files of the fine-tune against the base (several allowed).
    #[arg(long, num_args = 1..)]
    delta: Vec<PathBuf>,
    /// Evaluation data: plain text, or `.jsonl` with a `text` field or chat `messages` (only
    /// assistant tokens are scored). Several files are reported separately.
    #[arg(long, num_args = 1.., required = true)]
    data: Vec<PathBuf>,
    /// Tokens per sequence (plain text is cut into sequences this long; chat records are truncated).
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Evaluate at most this many tokens per data file.
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Tokens per forward call (default: keeps a call's logits near 256 MiB).
    #[arg(long)]
    batch_tokens: Option<usize>,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
    /// Write report.md and PNG plots into this directory.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype: auto (f32 on CPU, bf16 on CUDA), f32, bf16, f16.
    #[arg(long, default_value = "auto")]
    dtype: String,
}

pub fn run(a: Args) -> Result<()> {
    match a.command {
        EvalCommand::Ppl(a) => run_ppl(a),
        EvalCommand::Compare(a) => run_compare(a),
        EvalCommand::Sweep(a) => super::sweep::run(a),
    }
}

/// Opens a delta and builds its tenant for `base`. The one place deltas are loaded here.
pub fn load_delta(
    path: &Path,
    base: &Loaded,
    dtype: DType,
    device: &Device,
) -> Result<(DeltaFile, TenantWeights)> {
    let file = DeltaFile::open(path)?;
    let fingerprint = deltaserve_format::fingerprint_safetensors(&base.ckpt.weight_files())
        .with_context(|| format!("fingerprinting the base {}", base.dir.display()))?;
    let tenant = deltaserve_codecs::load_tenant(&file, &base.ckpt, &fingerprint, dtype, device)
        .with_context(|| format!("loading the delta {}", path.display()))?;
    Ok((file, tenant))
}

fn progress_bar(prefix: &'static str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix:>10} [{bar:30}] {pos}/{len} windows {elapsed}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix(prefix);
    bar
}

fn run_ppl(a: PplArgs) -> Result<()> {
    let device = deltaserve_model::parse_device(&a.device)?;
    let dtype = parse_dtype(&a.dtype, &device)?;
    let loaded = load_model(&a.model, &device, dtype)?;
    let delta = a
        .delta
        .as_deref()
        .map(|p| load_delta(p, &loaded, dtype, &device))
        .transpose()?;
    let codec = TextCodec::from_dir(&loaded.dir, &loaded.model.config().eos_token_ids)?;
    let text = std::fs::read_to_string(&a.data)
        .with_context(|| format!("reading {}", a.data.display()))?;
    // As transformers' `tokenizer(text)`: the tokenizer's own special tokens (BOS) included.
    let ids = codec.encode(&text, true)?;
    let ctx = loaded.model.config().max_position_embeddings;
    let asked = PplSettings {
        seq_len: a.seq_len,
        stride: a.stride.unwrap_or_else(|| 512.min((a.seq_len / 4).max(1))),
    };
    let settings = deltaserve_eval::clamp_to_context(asked, ctx);
    let mut notes = Vec::new();
    if settings != asked {
        notes.push(format!(
            "--seq-len {} exceeds the model's context (max_position_embeddings {ctx}); using seq-len {} stride {}",
            a.seq_len, settings.seq_len, settings.stride
        ));
    }
    if !a.json {
        for n in &notes {
            eprintln!("note: {n}");
        }
    }
    let bar = progress_bar("ppl");
    let r = deltaserve_eval::perplexity_with_progress(
        &loaded.model,
        delta.as_ref().map(|d| &d.1),
        &ids,
        settings,
        &bar,
    )
    .context("computing perplexity")?;
    if a.json {
        let v = serde_json::json!({
            "model": loaded.dir,
            "delta": a.delta,
            "data": a.data,
            "ppl": r.ppl,
            "mean_nll": r.mean_nll,
            "loss_tokens": r.loss_tokens,
            "ppl_token_mean": r.ppl_token_mean,
            "scored_targets": r.scored_targets,
            "tokens": r.tokens,
            "windows": r.windows,
            "seq_len": r.settings.seq_len,
            "stride": r.settings.stride,
            "weighting": "Hugging Face perplexity guide (token-counting version)",
            "notes": notes,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "perplexity {:.4} on {} ({} tokens, {} windows of {} with stride {}, {} loss tokens; \
             Hugging Face perplexity-guide weighting; plain token mean {:.4})",
            r.ppl,
            a.data.display(),
            r.tokens,
            r.windows,
            r.settings.seq_len,
            r.settings.stride,
            r.loss_tokens,
            r.ppl_token_mean
        );
    }
    Ok(())
}

/// A table name for each delta file: its stem, made unique.
fn delta_names(paths: &[PathBuf]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for p in paths {
        let stem = p
            .file_stem()
            .map_or_else(|| "delta".to_string(), |s| s.to_string_lossy().into_owned());
        let mut name = stem.clone();
        let mut i = 2;
        while names.contains(&name) || name == "base" || name == "finetuned" {
            name = format!("{stem}-{i}");
            i += 1;
        }
        names.push(name);
    }
    names
}

fn run_compare(a: CompareArgs) -> Result<()> {
    let device = deltaserve_model::parse_device(&a.device)?;
    let dtype = parse_dtype(&a.dtype, &device)?;
    let base = load_model(&a.base, &device, dtype)?;
    let ft = load_model(&a.finetuned, &device, dtype)?;
    let mut deltas = Vec::with_capacity(a.delta.len());
    for p in &a.delta {
        deltas.push(load_delta(p, &base, dtype, &device)?);
    }
    // The data is tokenized as the fine-tune sees it.
    let codec = TextCodec::from_dir(&ft.dir, &ft.model.config().eos_token_ids)?;
    let ctx = base
        .model
        .config()
        .max_position_embeddings
        .min(ft.model.config().max_position_embeddings);
    let seq_len = if a.seq_len > ctx {
        eprintln!(
            "note: --seq-len {} exceeds the models' context; using {ctx}",
            a.seq_len
        );
        ctx
    } else {
        a.seq_len
    };
    let datasets = a
        .data
        .iter()
        .map(|p| deltaserve_eval::load_dataset(p, &codec, seq_len, a.max_tokens))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let names = delta_names(&a.delta);
    let inputs = CompareInputs {
        base: &base.model,
        base_info: ModelInfo::from_checkpoint(&base.ckpt),
        finetuned: &ft.model,
        finetuned_info: ModelInfo::from_checkpoint(&ft.ckpt),
        deltas: deltas
            .iter()
            .zip(names)
            .map(|((file, tenant), name)| DeltaInput::from_file(name, file, tenant))
            .collect(),
        datasets: &datasets,
        options: CompareOptions {
            batch_tokens: a.batch_tokens,
            progress: true,
            weight_errors: true,
        },
    };
    let mut report = deltaserve_eval::compare(&inputs).context("comparing models")?;
    report
        .sources
        .push(("base".into(), base.dir.display().to_string()));
    report
        .sources
        .push(("finetuned".into(), ft.dir.display().to_string()));
    for (m, p) in report.models[2..].iter().zip(&a.delta) {
        report
            .sources
            .push((m.name.clone(), p.display().to_string()));
    }
    for p in &a.data {
        report
            .sources
            .push(("data".into(), p.display().to_string()));
    }
    if a.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.table());
    }
    if let Some(dir) = &a.report {
        let files = report.write_markdown(dir)?;
        eprintln!("report: {}", files.markdown.display());
        for p in &files.plots {
            eprintln!("plot:   {}", p.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delta_names_are_unique() {
        let paths: Vec<PathBuf> = ["a/x.delta", "b/x.delta", "base.delta"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(delta_names(&paths), vec!["x", "x-2", "base-2"]);
    }
}
