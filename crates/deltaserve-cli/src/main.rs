//! The `deltaserve` command: one module per subcommand under `cmd/`.

mod cmd;

use clap::{Parser, Subcommand};

/// Store and serve many fine-tuned LLMs as ~1-bit deltas against one shared base model.
#[derive(Parser)]
#[command(name = "deltaserve", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The main job on the shipped demo family: compress, calibrate, compare, then serve.
    Demo(cmd::demo::Args),
    /// Generate text from a model (optionally with a delta applied) and stream it to stdout.
    Generate(cmd::generate::Args),
    /// Compress a fine-tune against its base into a .delta file (BitDelta: ~1 bit per weight).
    Compress(cmd::compress::Args),
    /// Write base + delta as a complete Hugging Face checkpoint directory.
    Merge(cmd::merge::Args),
    /// Calibrate a delta's scales so base + delta matches the fine-tune's logits (scale distillation).
    Calibrate(cmd::calibrate::Args),
    /// Fine-tune a LoRA / Q-BaRA / QA-HiRA adapter on a frozen base; writes it as a lowrank delta.
    Finetune(cmd::finetune::Args),
    /// LQ-LoRA: quantize a base to NF under a bit budget (ILP) plus a low-rank L1·L2 delta.
    Decompose(cmd::decompose::Args),
    /// Quantize a model (RTN-8 or GPTQ-4) into a Hugging Face directory usable as a quantized base.
    Quantize(cmd::quantize::Args),
    /// Show what a .delta file holds: method, base fingerprint, tensors, scales, bits per parameter.
    Inspect(cmd::inspect::Args),
    /// Serve a base model and its deltas (tenants) over an OpenAI-compatible HTTP API and a web page.
    Serve(cmd::serve::Args),
    /// Write a random Llama-shaped checkpoint (or a noisy fine-tune of one) for tests and benchmarks.
    RandomModel(cmd::random_model::Args),
    /// Evaluate: perplexity (`eval ppl`), or base vs fine-tune vs deltas (`eval compare`).
    Eval(cmd::eval::Args),
    /// Benchmarks: `bench kernels` times the packed-delta products against the bandwidth floor.
    Bench(cmd::bench::Args),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(a) => cmd::demo::run(a),
        Command::Generate(a) => cmd::generate::run(a),
        Command::Compress(a) => cmd::compress::run(a),
        Command::Merge(a) => cmd::merge::run(a),
        Command::Calibrate(a) => cmd::calibrate::run(a),
        Command::Finetune(a) => cmd::finetune::run(a),
        Command::Inspect(a) => cmd::inspect::run(a),
        Command::Quantize(a) => cmd::quantize::run(a),
        Command::Decompose(a) => cmd::decompose::run(a),
        Command::RandomModel(a) => cmd::random_model::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Serve(a) => cmd::serve::run(a),
        Command::Eval(a) => cmd::eval::run(a),
    };
    if let Err(e) = result {
        // One line: the error and its causes, outermost first.
        let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
        eprintln!("error: {}", chain.join(": "));
        std::process::exit(1);
    }
}
