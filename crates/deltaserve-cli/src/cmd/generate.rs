//! `deltaserve generate`: stream a completion to stdout.

use std::io::Write;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use deltaserve_engine::SamplingParams;
use deltaserve_model::{ChatMessage, TextCodec};

use super::common::{load_model, parse_dtype};

#[derive(ClapArgs)]
pub struct Args {
    /// Model directory (Hugging Face layout) or a Hub id found in the local Hugging Face cache.
    #[arg(long)]
    model: String,
    /// A delta file (made by `deltaserve compress`/`calibrate` against --model) to apply on the fly:
    /// the packed-delta forward runs, the delta is never expanded.
    #[arg(long)]
    delta: Option<std::path::PathBuf>,
    /// The prompt text.
    #[arg(long, required_unless_present = "random_prompt", default_value = "")]
    prompt: String,
    /// Use N random token ids as the prompt instead of text (speed measurements on random models).
    #[arg(long)]
    random_prompt: Option<usize>,
    /// Most new tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Wrap the prompt as a user message with the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype: auto (f32 on CPU, bf16 on CUDA), f32, bf16, f16.
    #[arg(long, default_value = "auto")]
    dtype: String,
}

pub fn run(a: Args) -> Result<()> {
    let device = deltaserve_model::parse_device(&a.device)?;
    let dtype = parse_dtype(&a.dtype, &device)?;
    let loaded = load_model(&a.model, &device, dtype)?;
    let tenant = match &a.delta {
        Some(path) => Some(super::eval::load_delta(path, &loaded, dtype, &device)?.1),
        None => None,
    };
    let codec = TextCodec::from_dir(&loaded.dir, &loaded.model.config().eos_token_ids)?;
    let text = if a.chat {
        codec.render_chat(
            &[ChatMessage {
                role: "user".into(),
                content: a.prompt.clone(),
            }],
            true,
        )?
    } else {
        a.prompt.clone()
    };
    let prompt = match a.random_prompt {
        Some(n) => {
            let vocab = loaded
                .model
                .config()
                .vocab_size
                .min(codec.vocab_size())
                .max(2) as u64;
            // A fixed linear congruential sequence: reproducible without another dependency.
            (0..n as u64)
                .map(|i| {
                    ((i.wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407)
                        >> 33)
                        % vocab) as u32
                })
                .collect()
        }
        None => codec.encode(&text, !a.chat)?,
    };
    anyhow::ensure!(!prompt.is_empty(), "--prompt is empty after tokenization");
    let params = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        seed: a.seed,
    };
    let mut out = std::io::stdout().lock();
    let mut ids: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let stop_ids = codec.stop_ids().to_vec();
    let gen = deltaserve_engine::generate(
        &loaded.model,
        tenant.as_ref(),
        &prompt,
        a.max_tokens,
        params,
        &stop_ids,
        |t| {
            if stop_ids.contains(&t) {
                return;
            }
            ids.push(t);
            // Decode the whole continuation and print what is new, so multi-byte characters that span
            // tokens come out whole.
            if let Ok(text) = codec.decode(&ids) {
                if text.len() > printed && text.is_char_boundary(printed) {
                    let _ = out.write_all(&text.as_bytes()[printed..]);
                    let _ = out.flush();
                    printed = text.len();
                }
            }
        },
    )
    .context("generating")?;
    let _ = writeln!(out);
    let n_dec = gen.tokens.len().saturating_sub(1);
    eprintln!(
        "prefill: {} tokens in {:.3}s ({:.1} tok/s); decode: {} tokens in {:.3}s ({:.1} tok/s){}",
        prompt.len(),
        gen.prefill.as_secs_f64(),
        prompt.len() as f64 / gen.prefill.as_secs_f64().max(1e-9),
        n_dec,
        gen.decode.as_secs_f64(),
        n_dec as f64 / gen.decode.as_secs_f64().max(1e-9),
        if gen.stopped {
            "; stopped at a stop token"
        } else {
            ""
        }
    );
    Ok(())
}
