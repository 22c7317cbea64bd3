//! `deltaserve serve`: one base model, every delta in a directory as a tenant, behind an
//! OpenAI-compatible HTTP API and a web page.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use deltaserve_engine::EngineConfig;
use deltaserve_server::ServeConfig;

use super::common::parse_dtype;

#[derive(ClapArgs)]
pub struct Args {
    /// The base model directory (Hugging Face layout); it is served under its directory's name.
    #[arg(long)]
    base: PathBuf,
    /// Directory of `.delta` files; each is a tenant named after its file stem. Deltas made from
    /// another base are refused with a log line.
    #[arg(long)]
    deltas: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype: auto (f32 on CPU, bf16 on CUDA), f32, bf16, f16.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Most tokens per forward step (prompt chunks plus one per decoding request).
    #[arg(long, default_value_t = 2048)]
    max_batch_tokens: usize,
    /// Memory for tenant deltas (least recently used ones are evicted): 4GiB, 500MB or bytes.
    #[arg(long, default_value = "4GiB")]
    delta_memory: String,
    /// Memory for the KV cache of running requests; requests wait when it is full. Each request
    /// reserves its prompt plus max_tokens up front: 2 · layers · kv_heads · head_dim · dtype bytes
    /// per token (512 KiB for Llama-2-7B in bf16, so 2GiB runs 16 requests of 256 tokens at once;
    /// on an 80 GB H100 with a 7B base, 8GiB–16GiB lets 64–128 such requests batch together).
    #[arg(long, default_value = "2GiB")]
    kv_memory: String,
    /// Requests that may wait; beyond that the server answers 429 with Retry-After.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Require `Authorization: Bearer KEY` on /v1/* (and allow adding/removing deltas at run time).
    #[arg(long, env = "DELTASERVE_API_KEY")]
    api_key: Option<String>,
    /// Seconds in-flight requests may take to finish after SIGINT/SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 30)]
    shutdown_timeout: u64,
}

/// Parses a byte size: `4GiB`, `512MiB`, `2GB`, `500MB`, `64KiB`, or a plain byte count.
pub fn parse_bytes(spec: &str, flag: &str) -> Result<usize> {
    let s = spec.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .with_context(|| format!("{flag} {spec}: expected a size such as 4GiB or 500MB"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0f64.powi(4),
        other => bail!("{flag} {spec}: unknown unit `{other}` (use B, KB, MB, GB, KiB, MiB, GiB)"),
    };
    Ok((value * mult) as usize)
}

pub fn run(a: Args) -> Result<()> {
    let device = deltaserve_model::parse_device(&a.device)?;
    let dtype = parse_dtype(&a.dtype, &device)?;
    if a.max_batch_tokens == 0 {
        bail!("--max-batch-tokens must be at least 1");
    }
    let cfg = ServeConfig {
        base: a.base,
        deltas: a.deltas,
        host: a.host,
        port: a.port,
        device,
        dtype,
        engine: EngineConfig {
            max_batch_tokens: a.max_batch_tokens,
            kv_memory: parse_bytes(&a.kv_memory, "--kv-memory")?,
            delta_memory: parse_bytes(&a.delta_memory, "--delta-memory")?,
            max_queue: a.max_queue,
        },
        api_key: a.api_key.filter(|k| !k.is_empty()),
        shutdown_timeout: Duration::from_secs(a.shutdown_timeout),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    runtime.block_on(deltaserve_server::serve(cfg, |server| {
        let models = server.engine().models();
        eprintln!(
            "deltaserve: serving {} and {} tenants on http://{} (web page at /, API at /v1; Ctrl-C stops)",
            server.engine().base_name(),
            models.len() - 1,
            server.addr()
        );
    }))
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("4GiB", "f").unwrap(), 4 << 30);
        assert_eq!(parse_bytes("500MB", "f").unwrap(), 500_000_000);
        assert_eq!(parse_bytes("1.5 KiB", "f").unwrap(), 1536);
        assert_eq!(parse_bytes("123", "f").unwrap(), 123);
        assert!(parse_bytes("4 parsecs", "f").is_err());
        assert!(parse_bytes("GiB", "f").is_err());
    }
}
