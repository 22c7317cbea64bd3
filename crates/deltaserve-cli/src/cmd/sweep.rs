//! `deltaserve eval sweep`: compress one fine-tune with many methods and settings, evaluate
//! every delta on held-out data, and write one table and one plot of perplexity and KL against
//! bits per parameter with the Pareto front (`sweep.md`, `pareto.png`, `sweep.json`).
//!
//! Any `--method` spec `compress` takes works here, so a codec added to the registry
//! (`deltaserve_codecs::codec::CODECS`) joins the sweep by naming it; deltas made elsewhere
//! (calibrated BitDelta, a GPTQ baseline made with calibration data) join with `--delta`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use deltaserve_codecs::bitdelta::{compress, CompressOptions};
use deltaserve_codecs::codec::MethodSpec;
use deltaserve_codecs::coded::compress_coded;
use deltaserve_eval::{CompareInputs, CompareOptions, DeltaInput, ModelInfo};
use deltaserve_format::write_atomic;
use deltaserve_model::{Checkpoint, TextCodec};

use super::common::{load_model, parse_dtype};
use super::eval::load_delta;

/// The methods swept when none are given: every codec at several settings.
pub const DEFAULT_METHODS: &[&str] = &[
    "bitdelta",
    "lowrank:rank=2",
    "lowrank:rank=8",
    "lowrank:rank=32",
    "lowrank:rank=64",
    "lowrank:energy=0.5",
    "lowrank-mixed:ranks=2/32/64,bits=8/3/2",
    "lowrank-mixed:ranks=2/8/16,bits=8/3/2",
    "lowrank-mixed:ranks=4/64/128,bits=8/4/2",
    "dare:p=0.9",
    "dare:p=0.99",
    "dare:p=0.9,mask=seed",
    "deltadq:ratio=16",
    "deltadq:ratio=32",
    "deltadq:ratio=64",
    "deltadq:ratio=128",
];

#[derive(ClapArgs)]
pub struct SweepArgs {
    /// The base model directory (or Hub id in the local cache).
    #[arg(long)]
    base: String,
    /// The full fine-tune: what is compressed, and the reference for KL and top-1 agreement.
    #[arg(long)]
    finetuned: String,
    /// Method specs to compress with, as `compress --method` takes them (several allowed;
    /// default: bitdelta, lowrank, lowrank-mixed, dare and deltadq at several settings each).
    #[arg(long, num_args = 1..)]
    method: Vec<String>,
    /// Existing delta files to include as well (e.g. a calibrated BitDelta delta).
    #[arg(long, num_args = 1..)]
    delta: Vec<PathBuf>,
    /// Held-out evaluation data (plain text or JSONL, as `eval compare` takes it).
    #[arg(long, num_args = 1.., required = true)]
    data: Vec<PathBuf>,
    /// Directory for the deltas (one per method, named after its spec) and the report.
    #[arg(long)]
    out: PathBuf,
    /// Recompress deltas that already exist in --out (by default they are reused).
    #[arg(long)]
    force: bool,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Evaluate at most this many tokens per data file.
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype: auto (f32 on CPU, bf16 on CUDA), f32, bf16, f16.
    #[arg(long, default_value = "auto")]
    dtype: String,
}

/// A file name for a spec: `lowrank:rank=8` → `lowrank_rank-8.delta`.
fn file_name(spec: &str) -> String {
    let s: String = spec
        .chars()
        .map(|c| match c {
            ':' | ',' => '_',
            '=' => '-',
            '/' => '+',
            c if c.is_ascii_alphanumeric() || c == '.' || c == '-' => c,
            _ => '_',
        })
        .collect();
    format!("{s}.delta")
}

pub fn run(a: SweepArgs) -> Result<()> {
    let specs: Vec<String> = if a.method.is_empty() {
        DEFAULT_METHODS.iter().map(|s| s.to_string()).collect()
    } else {
        a.method.clone()
    };
    // Every spec is checked before anything is compressed.
    let methods = specs
        .iter()
        .map(|s| MethodSpec::parse(s).map_err(anyhow::Error::from))
        .collect::<Result<Vec<_>>>()?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let open = |spec: &str, what: &str| -> Result<Checkpoint> {
        let dir = deltaserve_model::resolve_model_dir(spec)
            .with_context(|| format!("--{what} {spec}"))?;
        Checkpoint::open(&dir)
            .with_context(|| format!("opening the {what} model {}", dir.display()))
    };
    let base_ckpt = open(&a.base, "base")?;
    let ft_ckpt = open(&a.finetuned, "finetuned")?;
    let mut paths = Vec::new();
    for (spec, method) in specs.iter().zip(&methods) {
        let out = a.out.join(file_name(spec));
        if out.exists() && !a.force {
            eprintln!("reusing {}", out.display());
        } else {
            let opts = CompressOptions {
                out: out.clone(),
                force: true,
                progress: true,
            };
            let report = match method {
                MethodSpec::BitDelta => compress(&base_ckpt, &ft_ckpt, &opts),
                MethodSpec::Coded(c) => {
                    compress_coded(&base_ckpt, &ft_ckpt, c.as_ref(), None, &opts)
                }
            }
            .with_context(|| format!("compressing with {spec}"))?;
            eprintln!(
                "{spec}: {:.3} bits/param, {:.2}s",
                report.bits_per_param,
                report.elapsed.as_secs_f64()
            );
        }
        paths.push(out);
    }
    paths.extend(a.delta.iter().cloned());

    let device = deltaserve_model::parse_device(&a.device)?;
    let dtype = parse_dtype(&a.dtype, &device)?;
    let base = load_model(&a.base, &device, dtype)?;
    let ft = load_model(&a.finetuned, &device, dtype)?;
    let mut deltas = Vec::with_capacity(paths.len());
    for p in &paths {
        deltas.push(load_delta(p, &base, dtype, &device)?);
    }
    let codec = TextCodec::from_dir(&ft.dir, &ft.model.config().eos_token_ids)?;
    let ctx = base.model.config().max_position_embeddings;
    let seq_len = a.seq_len.min(ctx);
    let datasets = a
        .data
        .iter()
        .map(|p| deltaserve_eval::load_dataset(p, &codec, seq_len, a.max_tokens))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let inputs = CompareInputs {
        base: &base.model,
        base_info: ModelInfo::from_checkpoint(&base.ckpt),
        finetuned: &ft.model,
        finetuned_info: ModelInfo::from_checkpoint(&ft.ckpt),
        deltas: deltas
            .iter()
            .zip(&paths)
            .map(|((file, tenant), p)| {
                let name = p
                    .file_stem()
                    .map_or_else(|| "delta".into(), |s| s.to_string_lossy().into_owned());
                DeltaInput::from_file(name, file, tenant)
            })
            .collect(),
        datasets: &datasets,
        options: CompareOptions {
            batch_tokens: None,
            progress: true,
            weight_errors: false,
        },
    };
    let report = deltaserve_eval::compare(&inputs).context("evaluating the deltas")?;
    let table = deltaserve_eval::pareto_table(&report);
    print!("{table}");
    let mut md = String::from("# Compression sweep\n\n");
    md.push_str(&format!(
        "Base `{}`, fine-tune `{}`; bits/param are over the compressed projections (what \
         each codec stores for them, every part counted); KL is KL(fine-tune ‖ model) in nats \
         per scored position; `*` marks the (bits, KL) Pareto front.\n\n",
        base.dir.display(),
        ft.dir.display()
    ));
    md.push_str(&table);
    md.push_str("![pareto](pareto.png)\n");
    let write = |name: &str, bytes: &[u8]| -> Result<()> {
        let path = a.out.join(name);
        write_atomic(&path, true, |w| w.write_all(bytes))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
        Ok(())
    };
    write("sweep.md", md.as_bytes())?;
    write("sweep.json", report.to_json().as_bytes())?;
    write("pareto.png", &deltaserve_eval::pareto_png(&report)?)?;
    Ok(())
}
