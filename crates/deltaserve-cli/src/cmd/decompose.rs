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

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::Args as ClapArgs;
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
    /// Weight errors and the SVD by a diagonal Fisher estimate from --data (LQ-LoRA §3.3).
    #[arg(long, requires = "data")]
    fisher: bool,
    /// Calibration text for --fisher: a .txt or .jsonl file or a directory of them
    /// (e.g. assets/demo/data/calib.txt).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Tokens per Fisher window (one gradient per window).
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
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

pub fn run(a: Args) -> Result<()> {
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
        let want = a.seq_len * a.fisher_windows;
        let mut tokens: Vec<u32> = Vec::new();
        'files: for (path, jsonl) in deltaserve_train::data::list_files(std::slice::from_ref(data))
            .with_context(|| format!("--data {}", data.display()))?
        {
            for doc in deltaserve_train::data::read_documents(&path, jsonl)? {
                if !tokens.is_empty() {
                    tokens.extend(eos.first());
                }
                tokens.extend(deltaserve_train::data::tokenize(&doc, &codec)?);
                if tokens.len() >= want {
                    break 'files;
                }
            }
        }
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
    let report = decompose_checkpoint(&ckpt, fisher.as_ref(), &opts)
        .with_context(|| format!("decomposing {}", dir.display()))?;
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
