//! `deltaserve decompose`: LQ-LoRA (arXiv 2311.12023) on a base model — every attention/MLP
//! projection becomes W ≈ Q + L1·L2, Q in NormalFloat with the (bits, block size) of each
//! matrix chosen by an integer program so that Q averages `--budget-bits` bits per parameter.
//!
//! `--out DIR` is a Hugging Face directory holding the *dequantized* Q in the model's dtype
//! (every loader reads it; it saves no memory until an engine learns to dequantize on load from
//! the packed codes, which sit beside it in `nf_codes.safetensors` for exact bit accounting),
//! `decompose.json` (the chosen configuration, bits and error of each matrix) and, for
//! `--rank > 0`, `lqlora_init.delta`: L1/L2 as a `lowrank` delta against DIR itself, so
//! `generate --model DIR --delta DIR/lqlora_init.delta`, `eval` and `serve` run Q + L1L2, and
//! `finetune` starts its adapters from it. `--rank 0` quantizes only (NF under the same ILP),
//! the baseline LQ-LoRA is compared with.
//!
//! `--init apiq --data PATH` initialises Q and L1/L2 to preserve each projection's *outputs*
//! on calibration data instead of its weights (ApiQ, arXiv 2402.05147; the closed-form
//! alternation in the metric of XᵀX that `deltaserve_codecs::apiq` documents), stage by stage
//! with the inputs of the partly decomposed model; bits are allocated by the same ILP over the
//! same NF configurations, so rows compare at equal bits.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::Args as ClapArgs;
use deltaserve_codecs::apiq::{ApiqCheckpointOptions, ApiqOptions};
use deltaserve_codecs::lqlora::{decompose_checkpoint, DecomposeOptions, LqOptions};
use deltaserve_codecs::nf::NfConfig;
use deltaserve_codecs::numeric::FloatDtype;
use deltaserve_model::{Model, TextCodec};

#[derive(ClapArgs)]
pub struct Args {
    /// The model to decompose: a Hugging Face directory or a Hub id in the local cache.
    #[arg(long)]
    model: String,
    /// Rank r of L1·L2 (LQ-LoRA uses 64 for 7B models; the 256-wide demo models want ~8).
    /// 0 quantizes only: NF with the same bit allocation, no low-rank part.
    #[arg(long, default_value_t = 64)]
    rank: usize,
    /// Average bits per parameter of Q over the projection weights (codes, 8-bit block scales
    /// and FP32 second-level scales); L1/L2 are extra and reported separately. LQ-LoRA uses
    /// 2.5–4.25.
    #[arg(long)]
    budget_bits: f64,
    /// The NF configurations to choose from: comma-separated `nfB-bN` (B bits, 2–8; N weights per
    /// block, a power of two 16–256), or `lqlora` for b ∈ {2,3,4,8} × N ∈ {16,…,256}.
    #[arg(long, default_value = "lqlora")]
    configs: String,
    /// How Q and L1/L2 are initialised: `lqlora` (preserve the weights: ‖W − Q − L1L2‖,
    /// Fisher-weighted with --fisher) or `apiq` (preserve each projection's outputs on --data:
    /// ‖X W − X_q (Q + L1L2)‖ with X_q the inputs after the already-decomposed projections;
    /// ApiQ, arXiv 2402.05147). `apiq` needs --data.
    #[arg(long, default_value = "lqlora", value_parser = ["lqlora", "apiq"])]
    init: String,
    /// Weight errors and the SVD by a diagonal Fisher estimate from --data (LQ-LoRA §3.3).
    /// With --init apiq: only the bit allocation uses the Fisher-weighted errors.
    #[arg(long, requires = "data")]
    fisher: bool,
    /// Calibration text for --fisher and --init apiq: a .txt or .jsonl file or a directory of
    /// them (e.g. assets/demo/data/calib.txt).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Tokens per calibration window (one Fisher gradient, or one sequence of activations).
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Calibration windows for --init apiq (each --seq-len tokens).
    #[arg(long, default_value_t = 32)]
    apiq_windows: usize,
    /// --init apiq: damping of XᵀX as a fraction of its mean diagonal (GPTQ's percdamp).
    #[arg(long, default_value_t = 0.01)]
    apiq_damp: f64,
    /// --init apiq: round Q with GPTQ-style error feedback under XᵀX instead of plainly to the
    /// nearest NF value (lowers the calibration error; on the demo model it raised held-out
    /// perplexity, see BENCHMARKS.md).
    #[arg(long)]
    apiq_error_feedback: bool,
    /// --init apiq: use the full-precision model's inputs for every projection instead of the
    /// inputs after the already-decomposed ones (turns off ApiQ's sequential propagation).
    #[arg(long)]
    apiq_parallel: bool,
    /// Fisher windows to average.
    #[arg(long, default_value_t = 64)]
    fisher_windows: usize,
    /// Most alternations of SVD and quantization per matrix (stops earlier when the error
    /// stops falling).
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Storage dtype of L1/L2: f16, bf16 or f32.
    #[arg(long, default_value = "f16")]
    factor_dtype: String,
    /// Seconds the bit-allocation ILP may search before taking its best allocation.
    #[arg(long, default_value_t = 60.0)]
    ilp_time_limit: f64,
    /// The directory to create.
    #[arg(long)]
    out: PathBuf,
    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
    /// Do not draw progress bars.
    #[arg(long)]
    quiet: bool,
}

/// `lqlora` or `nf3-b64,nf4-b64,...`.
fn parse_configs(s: &str) -> Result<Vec<NfConfig>> {
    if s.trim() == "lqlora" {
        return Ok(NfConfig::lqlora_grid());
    }
    s.split(',')
        .map(|c| {
            let c = c.trim();
            let (b, n) = c
                .strip_prefix("nf")
                .and_then(|r| r.split_once("-b"))
                .with_context(|| format!("--configs {c}: expected nfB-bN, e.g. nf3-b64"))?;
            let bits: u32 = b
                .parse()
                .with_context(|| format!("--configs {c}: bits {b} is not a number"))?;
            let block: usize = n
                .parse()
                .with_context(|| format!("--configs {c}: block size {n} is not a number"))?;
            Ok(NfConfig::new(bits, block)?)
        })
        .collect()
}

/// Up to `want` tokens of `data` (documents joined by the first end-of-sequence token).
fn calibration_tokens(
    data: &std::path::Path,
    codec: &TextCodec,
    eos: &[u32],
    want: usize,
) -> Result<Vec<u32>> {
    let mut tokens: Vec<u32> = Vec::new();
    'files: for (path, jsonl) in deltaserve_train::data::list_files(&[data.to_path_buf()])
        .with_context(|| format!("--data {}", data.display()))?
    {
        for doc in deltaserve_train::data::read_documents(&path, jsonl)? {
            if !tokens.is_empty() {
                tokens.extend(eos.first());
            }
            tokens.extend(deltaserve_train::data::tokenize(&doc, codec)?);
            if tokens.len() >= want {
                break 'files;
            }
        }
    }
    tokens.truncate(want);
    Ok(tokens)
}

pub fn run(a: Args) -> Result<()> {
    let apiq = a.init == "apiq";
    if apiq && a.data.is_none() {
        bail!(
            "--init apiq needs --data PATH: calibration text whose activations the \
             initialisation preserves (e.g. --data assets/demo/data/calib.txt)"
        );
    }
    let configs = parse_configs(&a.configs)?;
    let factor_dtype = FloatDtype::parse(&a.factor_dtype).with_context(|| {
        format!(
            "--factor-dtype {}: expected f16, bf16 or f32",
            a.factor_dtype
        )
    })?;
    let (dir, ckpt) = super::common::open_for_output(&a.model, &a.out, a.force)?;

    let fisher = if a.fisher {
        let data = a.data.as_ref().expect("clap requires --data");
        let model = Model::load(&ckpt, DType::F32, &Device::Cpu)
            .with_context(|| format!("loading {} for the Fisher estimate", dir.display()))?;
        let eos = model.config().eos_token_ids.clone();
        let codec = TextCodec::from_dir(ckpt.dir(), &eos)
            .with_context(|| format!("loading the tokenizer of {}", dir.display()))?;
        let tokens = calibration_tokens(data, &codec, &eos, a.seq_len * a.fisher_windows)?;
        let windows: Vec<Vec<u32>> = tokens
            .chunks(a.seq_len)
            .filter(|w| w.len() >= 2)
            .take(a.fisher_windows)
            .map(<[u32]>::to_vec)
            .collect();
        if windows.is_empty() {
            bail!(
                "--data {}: no text to estimate the Fisher information from",
                data.display()
            );
        }
        let bar = if a.quiet {
            indicatif::ProgressBar::hidden()
        } else {
            indicatif::ProgressBar::new(windows.len() as u64)
        };
        bar.set_message("Fisher");
        let est = deltaserve_train::fisher::empirical_fisher(&model, &windows, |i| {
            bar.set_position(i as u64)
        })
        .with_context(|| format!("estimating the Fisher information on {}", data.display()))?;
        bar.finish_and_clear();
        eprintln!(
            "Fisher: {} windows, {} predictions from {}",
            est.windows,
            est.predictions,
            data.display()
        );
        Some(est.per_weight)
    } else {
        None
    };

    let opts = DecomposeOptions {
        out: a.out.clone(),
        force: a.force,
        budget_bits: a.budget_bits,
        configs,
        lq: LqOptions {
            rank: a.rank,
            max_iters: a.iters,
            ..LqOptions::default()
        },
        factor_dtype,
        ilp_time_limit_s: a.ilp_time_limit,
        progress: !a.quiet,
    };
    let report = if apiq {
        let data = a.data.as_ref().expect("checked above");
        let model = Model::load(&ckpt, DType::F32, &Device::Cpu)
            .with_context(|| format!("loading {} for its activations", dir.display()))?;
        let eos = model.config().eos_token_ids.clone();
        let codec = TextCodec::from_dir(ckpt.dir(), &eos)
            .with_context(|| format!("loading the tokenizer of {}", dir.display()))?;
        let tokens = calibration_tokens(data, &codec, &eos, a.seq_len * a.apiq_windows)?;
        if tokens.is_empty() {
            bail!(
                "--data {}: no text to take activations from",
                data.display()
            );
        }
        let apiq_opts = ApiqCheckpointOptions {
            decompose: opts,
            apiq: ApiqOptions {
                damp: a.apiq_damp,
                error_feedback: a.apiq_error_feedback,
                ..ApiqOptions::default()
            },
            sequential: !a.apiq_parallel,
            seq_len: a.seq_len,
        };
        deltaserve_codecs::apiq::decompose_checkpoint(
            &ckpt,
            &model,
            &tokens,
            fisher.as_ref(),
            &apiq_opts,
        )
        .with_context(|| format!("decomposing {} (ApiQ init)", dir.display()))?
    } else {
        decompose_checkpoint(&ckpt, fisher.as_ref(), &opts)
            .with_context(|| format!("decomposing {}", dir.display()))?
    };
    eprintln!("{report}");
    match &report.delta {
        Some(d) => eprintln!(
            "quantized base Q: {} ; initial L1/L2: {} (run Q + L1L2 with --model {} --delta {})",
            a.out.display(),
            d.display(),
            a.out.display(),
            d.display()
        ),
        None => eprintln!("quantized base Q: {}", a.out.display()),
    }
    Ok(())
}
