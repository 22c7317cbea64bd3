//! `deltaserve compress`: a fine-tune and its base in, a `.delta` file out.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use deltaserve_codecs::bitdelta::{compress, CompressOptions};
use deltaserve_codecs::codec::MethodSpec;
use deltaserve_codecs::coded::compress_coded;
use deltaserve_model::Checkpoint;

#[derive(ClapArgs)]
pub struct Args {
    /// The base model the fine-tune was trained from: a Hugging Face directory or a Hub id in the
    /// local cache.
    #[arg(long)]
    base: String,
    /// The fine-tuned model: a Hugging Face directory or a Hub id in the local cache.
    #[arg(long)]
    finetuned: String,
    /// Compression method spec, NAME or NAME:KEY=VALUE,KEY=VALUE. Every method codes the
    /// attention and MLP projections and stores the other tensors as the fine-tune's values.
    /// bitdelta (default): one sign bit per weight plus one scale per matrix.
    /// lowrank: truncated SVD, e.g. lowrank:rank=16 or lowrank:energy=0.9 (dtype=f16|bf16|f32,
    /// power=N, oversample=N). lowrank-mixed: Delta-CoMe, e.g.
    /// lowrank-mixed:ranks=2/32/64,bits=8/3/2. dare: drop and rescale, e.g. dare:p=0.9,seed=0.
    /// deltadq: group-wise dropout + quantization, e.g. deltadq:ratio=32 or
    /// deltadq:keep=8,bits=4 (group=N fixes the group size). A bad spec lists the valid settings.
    #[arg(long, default_value = "bitdelta")]
    method: String,
    /// Calibration text for data-aware methods (gptq, eora): a .txt or .jsonl file or a
    /// directory of them. The fine-tune runs over it to collect each projection's input
    /// statistics Σ xᵀx.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Calibration tokens to use at most (with --data).
    #[arg(long, default_value_t = 32768)]
    calib_tokens: usize,
    /// Average bits per compressed weight: instead of one --method for every matrix, pick per
    /// matrix among the --candidate codecs the one that minimises the summed reconstruction
    /// error ‖W_rec − W_ft‖² under this average (an integer program, solved exactly).
    #[arg(long, value_name = "B")]
    budget_bits: Option<f64>,
    /// A codec spec --budget-bits may choose (repeat the flag). Default: bitdelta,
    /// lowrank:rank=8, lowrank:rank=32, rtn:bits=4,group=128, rtn:bits=8, and with --data also
    /// gptq:bits=4,group=128 and eora:rank=8+bitdelta.
    #[arg(long = "candidate", value_name = "SPEC")]
    candidates: Vec<String>,
    /// The delta file to write (conventionally NAME.delta).
    #[arg(long)]
    out: PathBuf,
    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
    /// Do not draw a progress bar.
    #[arg(long)]
    quiet: bool,
}

pub fn run(a: Args) -> Result<()> {
    // A bad method spec fails before any checkpoint is opened.
    let method = MethodSpec::parse(&a.method)?;
    let open = |spec: &str, what: &str| -> Result<Checkpoint> {
        let dir = deltaserve_model::resolve_model_dir(spec)
            .with_context(|| format!("--{what} {spec}"))?;
        Checkpoint::open(&dir)
            .with_context(|| format!("opening the {what} model {}", dir.display()))
    };
    let base = open(&a.base, "base")?;
    let finetuned = open(&a.finetuned, "finetuned")?;
    let opts = CompressOptions {
        out: a.out.clone(),
        force: a.force,
        progress: !a.quiet,
    };
    let calibration = match &a.data {
        Some(d) => Some(super::quantize::calibration(
            &finetuned,
            d,
            256,
            a.calib_tokens,
            !a.quiet,
        )?),
        None => None,
    };
    if let Some(bits) = a.budget_bits {
        if !matches!(method, MethodSpec::BitDelta) {
            anyhow::bail!("--budget-bits chooses the codec per matrix; give --candidate SPEC instead of --method");
        }
        let specs: Vec<String> = if a.candidates.is_empty() {
            deltaserve_codecs::budget_choice::default_candidates(calibration.is_some())
                .into_iter()
                .map(str::to_owned)
                .collect()
        } else {
            a.candidates.clone()
        };
        let candidates = specs
            .iter()
            .map(|s| {
                deltaserve_codecs::budget_choice::parse_candidate(s)
                    .with_context(|| format!("--candidate {s}"))
            })
            .collect::<Result<Vec<_>>>()?;
        let plan = deltaserve_codecs::budget_choice::plan_budget(
            &base,
            &finetuned,
            candidates,
            calibration.as_ref(),
            bits,
        )?;
        let report = compress_coded(&base, &finetuned, &plan.codec, calibration.as_ref(), &opts)?;
        eprint!("{}", plan.summary());
        eprintln!("{report}");
        return Ok(());
    } else if !a.candidates.is_empty() {
        anyhow::bail!("--candidate is only used with --budget-bits B");
    }
    let report = match &method {
        MethodSpec::BitDelta => compress(&base, &finetuned, &opts),
        MethodSpec::Coded(codec) => compress_coded(
            &base,
            &finetuned,
            codec.as_ref(),
            calibration.as_ref(),
            &opts,
        ),
    }
    .with_context(|| {
        format!(
            "compressing {} against {}",
            finetuned.dir().display(),
            base.dir().display()
        )
    })?;
    eprintln!("{report}");
    Ok(())
}
