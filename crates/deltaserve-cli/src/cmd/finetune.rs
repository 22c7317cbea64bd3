//! `deltaserve finetune`: train a LoRA / Q-BaRA / QA-HiRA adapter on a frozen (possibly
//! quantized) base and write it as a `lowrank` delta that `generate --delta`, `eval`, `merge` and
//! `serve` load like any other delta.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use deltaserve_train::{finetune, AdapterKind, AdapterSpec, FinetuneConfig, FinetuneJob};

use super::common::{parse_dtype, TrainingBar};

/// Fine-tune an adapter on a frozen base. The loss is the causal-LM loss of the data (for chat
/// records, of the assistant's tokens only); AdamW with a cosine schedule; checkpoints with the
/// optimizer state let `--resume` continue exactly where a run stopped.
#[derive(ClapArgs)]
pub struct Args {
    /// Base model directory (kept frozen), e.g. assets/demo/base or a decomposed base from `deltaserve decompose`.
    #[arg(long)]
    model: String,
    /// Training data: text files, JSONL files (`text`, or chat `messages`: only assistant tokens are learned), or directories of them.
    #[arg(long, num_args = 1.., required = true)]
    data: Vec<PathBuf>,
    /// Where the adapter is written, as a delta file of `lowrank` entries against --model.
    #[arg(long)]
    out: PathBuf,
    /// Adapter: lora (B·A), qbara (pooled inputs, repeated outputs, rank 2r at LoRA's parameter count), or qahira (one matrix per quantization block, folds into a block-quantized base).
    #[arg(long, default_value = "lora")]
    adapter: AdapterKind,
    /// Rank r (LoRA's rank; Q-BaRA trains rank 2r with the same parameters; for QA-HiRA it only sets the scaling alpha/r).
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// LoRA alpha: the adapter's delta is scaled by alpha / rank.
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    /// QA-HiRA block as IN,OUT: inputs pooled per IN columns, outputs repeated per OUT rows (the quantization block is OUT x IN).
    #[arg(long, default_value = "4,8")]
    hira_groups: String,
    /// Start from this lowrank delta (e.g. LQ-LoRA's L1·L2 from `deltaserve decompose`); --adapter lora only.
    #[arg(long)]
    init: Option<PathBuf>,
    /// Optimizer steps.
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Peak learning rate of AdamW (cosine-annealed to 0 over --steps).
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Sequences per micro-batch (one forward and backward pass).
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Micro-batches per optimizer step (gradient accumulation): the effective batch is batch x accum.
    #[arg(long, default_value_t = 1)]
    accum: usize,
    /// Tokens per sequence: longer records are truncated, text files cut into pieces of this length.
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Seed of the example order and of the adapter's initialisation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write a checkpoint every this many steps (and always after the last step); 0: only at the end.
    #[arg(long, default_value_t = 50)]
    save_every: usize,
    /// The checkpoint file (adapter, AdamW moments, step, settings); default: OUT with `.ckpt` appended.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Continue from the checkpoint: same settings and data required; the result equals an uninterrupted run.
    #[arg(long)]
    resume: bool,
    /// Stop after this many steps (the checkpoint is written, no adapter); `--resume` continues.
    #[arg(long)]
    stop_after: Option<usize>,
    /// Held-out data (same formats as --data) whose perplexity is reported for the base and the adapter.
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Model dtype: auto (f32 on CPU, bf16 on CUDA), f32, bf16, f16. Adapter parameters stay f32.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Gradient checkpointing per decoder layer: keep only each layer's input during the forward pass and recompute one layer at a time in the backward pass (about one more forward pass of work; activation memory of one layer instead of all). `--checkpoint-layers false` keeps the whole graph.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "true|false")]
    checkpoint_layers: bool,
    /// Tokens per block of the LM head + cross-entropy with --checkpoint-layers (the f32 logits of a block and their gradient exist at once, never the whole batch's); 0: all tokens at once.
    #[arg(long, default_value_t = deltaserve_train::finetune::DEFAULT_LOSS_CHUNK)]
    loss_chunk: usize,
    /// Time the forward, loss, backward and optimizer phases of each step (synchronising the device at each boundary) and report the sums (stderr, and `profile` in --json).
    #[arg(long)]
    profile: bool,
    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_groups(s: &str) -> Result<(usize, usize)> {
    let bad =
        || anyhow::anyhow!("--hira-groups {s}: expected IN,OUT, two positive integers such as 4,8");
    let (a, b) = s.split_once(',').ok_or_else(bad)?;
    let a: usize = a.trim().parse().map_err(|_| bad())?;
    let b: usize = b.trim().parse().map_err(|_| bad())?;
    if a == 0 || b == 0 {
        return Err(bad());
    }
    Ok((a, b))
}

pub fn run(a: Args) -> Result<()> {
    let device = deltaserve_model::parse_device(&a.device)?;
    let dtype = parse_dtype(&a.dtype, &device)?;
    let model = deltaserve_model::resolve_model_dir(&a.model)?;
    let (gi, go) = parse_groups(&a.hira_groups)?;
    if a.adapter == AdapterKind::Qahira {
        // A QA-HiRA adapter folds into a blockq base only with the base's blocks (`merge`).
        deltaserve_codecs::qahira::check_groups_match_base(&model, go, gi)?;
    }
    let mut spec = AdapterSpec::new(a.adapter, a.rank);
    spec.alpha = a.alpha;
    spec.hira_in_group = gi;
    spec.hira_out_group = go;
    let checkpoint = a.checkpoint.clone().unwrap_or_else(|| {
        let mut s = a.out.clone().into_os_string();
        s.push(".ckpt");
        PathBuf::from(s)
    });
    let job = FinetuneJob {
        model,
        data: a.data,
        eval: a.eval,
        out: a.out.clone(),
        overwrite: a.force,
        spec,
        init: a.init,
        config: FinetuneConfig {
            steps: a.steps,
            batch: a.batch,
            accum: a.accum,
            lr: a.lr,
            weight_decay: a.weight_decay,
            seed: a.seed,
            ..Default::default()
        },
        seq_len: a.seq,
        save_every: a.save_every,
        checkpoint,
        resume: a.resume,
        stop_after: a.stop_after,
        device,
        dtype,
        checkpoint_layers: a.checkpoint_layers,
        loss_chunk: a.loss_chunk,
        profile: a.profile,
    };
    let outcome = finetune(
        &job,
        &mut TrainingBar::new("finetune", |r| {
            format!("step {}, loss {:.4}, lr {:.2e}", r.step, r.loss, r.lr)
        }),
    )
    .with_context(|| format!("fine-tuning an adapter on {}", a.model))?;
    if let Some(p) = &outcome.profile {
        let n = outcome.losses.len().max(1) as f64;
        eprintln!(
            "profile, seconds per step: forward {:.4}, loss {:.4}, backward {:.4}, optimizer {:.4}",
            p.forward / n,
            p.loss / n,
            p.backward / n,
            p.optimizer / n
        );
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
        return Ok(());
    }
    println!(
        "{} adapter, {} trainable parameters; {} steps this run ({} done), {:.3} s/step, loss {:.4} -> {:.4}",
        a.adapter,
        outcome.trainable_params,
        outcome.losses.len(),
        outcome.steps_done,
        outcome.seconds_per_step,
        outcome.losses.first().copied().unwrap_or(f64::NAN),
        outcome.losses.last().copied().unwrap_or(f64::NAN),
    );
    if let (Some(b), Some(t)) = (outcome.eval_ppl_base, outcome.eval_ppl_adapter) {
        println!("held-out perplexity: base {b:.4}, base + adapter {t:.4}");
    }
    match &outcome.wrote {
        Some(p) => println!("wrote {}", p.display()),
        None => println!(
            "stopped after step {}; checkpoint {} (continue with --resume)",
            outcome.steps_done,
            job.checkpoint.display()
        ),
    }
    Ok(())
}
