//! `GET /metrics`: the engine's counters in Prometheus' text format, every name prefixed
//! `deltaserve_`.

use std::fmt::Write;

use deltaserve_engine::{MetricsSnapshot, TTFT_BUCKETS};

/// Escapes a label value (backslash, quote, newline).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders a snapshot as Prometheus text exposition format 0.0.4.
pub fn render(m: &MetricsSnapshot) -> String {
    let mut out = String::new();
    let mut one = |name: &str, kind: &str, help: &str, value: String| {
        let _ = writeln!(out, "# HELP deltaserve_{name} {help}\n# TYPE deltaserve_{name} {kind}\ndeltaserve_{name} {value}");
    };
    one(
        "queue_depth",
        "gauge",
        "Requests waiting to be scheduled.",
        m.queue_depth.to_string(),
    );
    one(
        "running_sequences",
        "gauge",
        "Sequences in the running batch.",
        m.running.to_string(),
    );
    one(
        "batch_size",
        "gauge",
        "Sequences in the last forward step.",
        m.batch_sequences.to_string(),
    );
    one(
        "batch_tokens",
        "gauge",
        "Tokens in the last forward step.",
        m.batch_tokens.to_string(),
    );
    one(
        "steps_total",
        "counter",
        "Forward steps run.",
        m.steps.to_string(),
    );
    one(
        "step_sequences_total",
        "counter",
        "Sequences summed over forward steps.",
        m.step_sequences.to_string(),
    );
    one(
        "step_tokens_total",
        "counter",
        "Tokens summed over forward steps.",
        m.step_tokens.to_string(),
    );
    one(
        "step_tenants_total",
        "counter",
        "Distinct tenants summed over forward steps (each step reads each one's delta once).",
        m.step_tenants.to_string(),
    );
    one(
        "forward_seconds_total",
        "counter",
        "Seconds spent in forward steps.",
        m.forward_seconds.to_string(),
    );
    one(
        "prompt_tokens_total",
        "counter",
        "Prompt tokens prefilled.",
        m.prompt_tokens.to_string(),
    );
    one(
        "generated_tokens_total",
        "counter",
        "Tokens generated.",
        m.generated_tokens.to_string(),
    );
    one(
        "tokens_per_second",
        "gauge",
        "Generated tokens per second, last second of work.",
        m.tokens_per_second.to_string(),
    );
    one(
        "delta_cache_hits_total",
        "counter",
        "Requests whose delta was in memory.",
        m.delta_hits.to_string(),
    );
    one(
        "delta_cache_misses_total",
        "counter",
        "Requests whose delta was not in memory.",
        m.delta_misses.to_string(),
    );
    one(
        "delta_cache_loads_total",
        "counter",
        "Delta loads started.",
        m.delta_loads.to_string(),
    );
    one(
        "delta_cache_load_failures_total",
        "counter",
        "Delta loads that failed.",
        m.delta_load_failures.to_string(),
    );
    one(
        "delta_cache_evictions_total",
        "counter",
        "Deltas evicted to make room.",
        m.delta_evictions.to_string(),
    );
    one(
        "delta_cache_bytes",
        "gauge",
        "Bytes of deltas in memory or being loaded.",
        m.delta_bytes.to_string(),
    );
    one(
        "delta_cache_resident",
        "gauge",
        "Deltas in memory.",
        m.delta_resident.to_string(),
    );
    one(
        "kv_cache_reserved_bytes",
        "gauge",
        "KV cache bytes reserved by running sequences.",
        m.kv_reserved_bytes.to_string(),
    );
    one(
        "kv_cache_used_bytes",
        "gauge",
        "KV cache bytes held.",
        m.kv_used_bytes.to_string(),
    );

    let _ = writeln!(
        out,
        "# HELP deltaserve_time_to_first_token_seconds Time from request to first generated token."
    );
    let _ = writeln!(
        out,
        "# TYPE deltaserve_time_to_first_token_seconds histogram"
    );
    let h = &m.time_to_first_token;
    for (le, count) in TTFT_BUCKETS.iter().zip(&h.cumulative) {
        let _ = writeln!(
            out,
            "deltaserve_time_to_first_token_seconds_bucket{{le=\"{le}\"}} {count}"
        );
    }
    let total = h.cumulative.last().copied().unwrap_or(0);
    let _ = writeln!(
        out,
        "deltaserve_time_to_first_token_seconds_bucket{{le=\"+Inf\"}} {total}"
    );
    let _ = writeln!(
        out,
        "deltaserve_time_to_first_token_seconds_sum {}",
        h.sum_seconds
    );
    let _ = writeln!(out, "deltaserve_time_to_first_token_seconds_count {total}");

    let _ = writeln!(
        out,
        "# HELP deltaserve_requests_total Requests accepted, per model."
    );
    let _ = writeln!(out, "# TYPE deltaserve_requests_total counter");
    for (model, n) in &m.requests {
        let _ = writeln!(
            out,
            "deltaserve_requests_total{{model=\"{}\"}} {n}",
            label(model)
        );
    }
    let _ = writeln!(
        out,
        "# HELP deltaserve_requests_finished_total Requests finished, per finish reason."
    );
    let _ = writeln!(out, "# TYPE deltaserve_requests_finished_total counter");
    for (reason, n) in &m.finished {
        let _ = writeln!(
            out,
            "deltaserve_requests_finished_total{{reason=\"{reason}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP deltaserve_request_failures_total Requests refused or failed, per cause."
    );
    let _ = writeln!(out, "# TYPE deltaserve_request_failures_total counter");
    for (err, n) in &m.failures {
        let _ = writeln!(
            out,
            "deltaserve_request_failures_total{{err=\"{err}\"}} {n}"
        );
    }
    out
}
