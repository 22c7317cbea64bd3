//! `deltaserve demo`: the main job on the shipped demo family (`assets/demo/`).
//!
//! Compresses the shipped fine-tune against the shipped base (BitDelta), calibrates its scales on
//! the CPU, compares base / fine-tune / delta before and after calibration on held-out data
//! (table + Markdown report with plots), then serves the base and every demo tenant.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use deltaserve_codecs::bitdelta::{compress, CompressOptions};
use deltaserve_eval::{CompareInputs, CompareOptions, CompareReport, DeltaInput, ModelInfo};
use deltaserve_model::{Checkpoint, TextCodec};
use deltaserve_train::{calibrate, format_table, CalibrateJob, DistillConfig};

use super::common::{load_model, parse_dtype};

/// Names of the two deltas in the comparison: before and after calibration.
const DELTA_NAMES: [&str; 2] = ["bitdelta", "bitdelta-calibrated"];

#[derive(ClapArgs)]
pub struct Args {
    /// The demo family: base/, docstring2code/, deltas/, data/ (default: assets/demo of this repository).
    #[arg(long)]
    assets: Option<PathBuf>,
    /// Where the delta files and the report go.
    #[arg(long, default_value = "demo-out")]
    out: PathBuf,
    /// Calibration steps (`deltaserve calibrate` defaults to the reference's 200; the demo's model
    /// is small and 100 steps already close nearly all of the gap, in about two minutes on 2 cores).
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// At most this many tokens of each evaluation set (0 = all).
    #[arg(long, default_value_t = 16384)]
    eval_tokens: usize,
    /// Stop after the report instead of starting the server.
    #[arg(long)]
    no_serve: bool,
    /// Write the comparison as JSON to this file too.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Address the server listens on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port the server listens on.
    #[arg(long, default_value_t = 8000)]
    port: u16,
}

/// The shipped family: next to the working directory, else where this binary was built from.
fn find_assets(given: Option<PathBuf>) -> Result<PathBuf> {
    let candidates = match given {
        Some(p) => vec![p],
        None => vec![
            PathBuf::from("assets/demo"),
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/demo"),
        ],
    };
    candidates
        .iter()
        .find(|p| p.join("base").join("config.json").exists())
        .cloned()
        .with_context(|| {
            format!(
                "demo models not found (looked in {}); run from the repository root or pass --assets",
                candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            )
        })
}

pub fn run(a: Args) -> Result<()> {
    let assets = find_assets(a.assets.clone())?;
    let base_dir = assets.join("base");
    let ft_name = "docstring2code";
    let ft_dir = assets.join(ft_name);
    let data = assets.join("data");
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;

    // 1. Compress.
    eprintln!(
        "== 1/4 compress {ft_name} against the base (BitDelta: sign bits + one scale per matrix)"
    );
    let base_ckpt = Checkpoint::open(&base_dir)?;
    let ft_ckpt = Checkpoint::open(&ft_dir)?;
    let raw = a.out.join(format!("{ft_name}.delta"));
    let report = compress(
        &base_ckpt,
        &ft_ckpt,
        &CompressOptions {
            out: raw.clone(),
            force: true,
            progress: true,
        },
    )?;
    eprintln!("{report}");

    // 2. Calibrate.
    eprintln!(
        "== 2/4 calibrate the scales on {} ({} steps, CPU)",
        data.join("calib.txt").display(),
        a.steps
    );
    let calibrated = a.out.join(format!("{ft_name}.calibrated.delta"));
    let mut job = CalibrateJob::new(
        base_dir.clone(),
        ft_dir.clone(),
        raw.clone(),
        vec![data.join("calib.txt")],
        calibrated.clone(),
    );
    job.overwrite = true;
    job.seq_len = a.seq_len;
    job.distill = DistillConfig {
        steps: a.steps,
        ..Default::default()
    };
    let outcome = calibrate(&job, &mut super::calibrate::calibrate_bar()).context("calibrating")?;
    eprint!("{}", format_table(&outcome.table));
    eprintln!("{:.3} s/step", outcome.seconds_per_step);

    // 3. Compare on held-out data.
    eprintln!(
        "== 3/4 compare base, fine-tune and the delta before/after calibration on held-out data"
    );
    let report = compare(
        &a,
        &base_dir,
        &ft_dir,
        &[raw, calibrated.clone()],
        &[
            data.join(format!("{ft_name}_heldout.jsonl")),
            data.join("heldout_code.txt"),
        ],
    )?;
    print!("{}", report.table());
    print_gap_closed(&report);
    let files = report.write_markdown(&a.out.join("report"))?;
    eprintln!("report: {}", files.markdown.display());
    if let Some(j) = &a.json {
        deltaserve_format::write_atomic(j, true, |w| w.write_all(report.to_json().as_bytes()))?;
    }
    if a.no_serve {
        return Ok(());
    }

    // 4. Serve the base and every demo tenant.
    eprintln!("== 4/4 serve the base and every demo tenant");
    let tenants = a.out.join("tenants");
    std::fs::create_dir_all(&tenants)?;
    let link = |src: &Path, name: &str| -> Result<()> {
        let dst = tenants.join(name);
        let _ = std::fs::remove_file(&dst);
        std::fs::copy(src, &dst).with_context(|| format!("copying {}", src.display()))?;
        Ok(())
    };
    link(&calibrated, &format!("{ft_name}.delta"))?;
    if let Ok(rd) = std::fs::read_dir(assets.join("deltas")) {
        for e in rd.flatten() {
            if e.path().extension().is_some_and(|x| x == "delta") {
                link(&e.path(), &e.file_name().to_string_lossy())?;
            }
        }
    }
    let mut cfg = deltaserve_server::ServeConfig::new(&base_dir);
    cfg.deltas = Some(tenants);
    cfg.host = a.host.clone();
    cfg.port = a.port;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    runtime.block_on(deltaserve_server::serve(cfg, |server| {
        println!(
            "\ndeltaserve demo: serving {} and {} tenants. Open http://{}/ to chat with them side by side (Ctrl-C stops).",
            server.engine().base_name(),
            server.engine().models().len().saturating_sub(1),
            server.addr()
        );
    }))
}

fn compare(
    a: &Args,
    base_dir: &Path,
    ft_dir: &Path,
    deltas: &[PathBuf],
    data: &[PathBuf],
) -> Result<CompareReport> {
    let device = candle_core::Device::Cpu;
    let dtype = parse_dtype("auto", &device)?;
    let base = load_model(&base_dir.to_string_lossy(), &device, dtype)?;
    let ft = load_model(&ft_dir.to_string_lossy(), &device, dtype)?;
    let loaded = deltas
        .iter()
        .map(|p| super::eval::load_delta(p, &base, dtype, &device))
        .collect::<Result<Vec<_>>>()?;
    let codec = TextCodec::from_dir(&ft.dir, &ft.model.config().eos_token_ids)?;
    let max = (a.eval_tokens > 0).then_some(a.eval_tokens);
    let datasets = data
        .iter()
        .map(|p| deltaserve_eval::load_dataset(p, &codec, 512, max))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let names = DELTA_NAMES;
    let inputs = CompareInputs {
        base: &base.model,
        base_info: ModelInfo::from_checkpoint(&base.ckpt),
        finetuned: &ft.model,
        finetuned_info: ModelInfo::from_checkpoint(&ft.ckpt),
        deltas: loaded
            .iter()
            .zip(names)
            .map(|((f, t), n)| DeltaInput::from_file(n, f, t))
            .collect(),
        datasets: &datasets,
        options: CompareOptions {
            batch_tokens: None,
            progress: true,
            weight_errors: true,
        },
    };
    Ok(deltaserve_eval::compare(&inputs)?)
}

/// How much of the base→fine-tune perplexity gap each delta closes, per data set.
pub fn gap_closed(report: &CompareReport) -> Vec<(String, String, f64)> {
    let mut out = Vec::new();
    for set in &report.datasets {
        let ppl = |model: &str| set.metrics.iter().find(|m| m.model == model).map(|m| m.ppl);
        let (Some(b), Some(f)) = (ppl("base"), ppl("finetuned")) else {
            continue;
        };
        for d in DELTA_NAMES {
            if let Some(x) = ppl(d) {
                out.push((set.name.clone(), d.to_string(), (b - x) / (b - f)));
            }
        }
    }
    out
}

fn print_gap_closed(report: &CompareReport) {
    for (set, delta, frac) in gap_closed(report) {
        println!(
            "{set}: {delta} closes {:.1}% of the base -> fine-tune perplexity gap",
            100.0 * frac
        );
    }
}
