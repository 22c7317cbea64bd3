//! Single-sequence generation: prefill the prompt, then decode token by token until a stop token
//! or the token limit. The server's scheduler runs many of these steps in one batch; this is the
//! simple loop the CLI, evaluation and tests use.

use std::time::{Duration, Instant};

use deltaserve_model::{ForwardOptions, LogitsWanted, Model, Result, SeqInput, TenantWeights};

use crate::sampler::{Sampler, SamplingParams};

/// What a generation produced, with timings.
#[derive(Debug, Clone)]
pub struct Generation {
    /// New token ids (without the prompt; includes the stop token if one was produced).
    pub tokens: Vec<u32>,
    /// Whether a stop token ended it.
    pub stopped: bool,
    /// Time spent on the prompt.
    pub prefill: Duration,
    /// Time spent on the remaining tokens.
    pub decode: Duration,
}

/// Generates up to `max_tokens` tokens after `prompt`, calling `on_token` for each new one.
pub fn generate(
    model: &Model,
    tenant: Option<&TenantWeights>,
    prompt: &[u32],
    max_tokens: usize,
    params: SamplingParams,
    stop_ids: &[u32],
    mut on_token: impl FnMut(u32),
) -> Result<Generation> {
    let mut cache = model.new_cache();
    let mut sampler = Sampler::new(params);
    let mut tokens = Vec::new();
    let t0 = Instant::now();
    let mut prefill = Duration::ZERO;
    let mut next_input: Vec<u32> = prompt.to_vec();
    let mut stopped = false;
    while tokens.len() < max_tokens {
        let logits = model.forward(
            &mut [SeqInput {
                tokens: &next_input,
                cache: Some(&mut cache),
                tenant,
                logits: LogitsWanted::Last,
            }],
            ForwardOptions::default(),
        )?;
        let row: Vec<f32> = logits[0].squeeze(0)?.to_vec1()?;
        if tokens.is_empty() {
            prefill = t0.elapsed();
        }
        let next = sampler.sample(&row);
        tokens.push(next);
        on_token(next);
        if stop_ids.contains(&next) {
            stopped = true;
            break;
        }
        next_input = vec![next];
    }
    let decode = t0.elapsed().saturating_sub(prefill);
    Ok(Generation {
        tokens,
        stopped,
        prefill,
        decode,
    })
}
