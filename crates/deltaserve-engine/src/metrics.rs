//! Counters and gauges the engine keeps while it runs. Plain atomics: the step loop updates
//! them without locks, and the server reads a [`MetricsSnapshot`] to print Prometheus text.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the time-to-first-token histogram buckets.
pub const TTFT_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A histogram with fixed buckets, Prometheus style (cumulative counts are made when read).
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; TTFT_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = TTFT_BUCKETS
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(TTFT_BUCKETS.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Relaxed);
    }

    fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = Vec::with_capacity(self.counts.len());
        let mut acc = 0;
        for c in &self.counts {
            acc += c.load(Relaxed);
            cumulative.push(acc);
        }
        HistogramSnapshot {
            cumulative,
            sum_seconds: self.sum_micros.load(Relaxed) as f64 / 1e6,
        }
    }
}

/// A histogram as read: cumulative counts per bucket of [`TTFT_BUCKETS`], then `+Inf`.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Cumulative counts, one per bucket plus the last for `+Inf` (= the total count).
    pub cumulative: Vec<u64>,
    /// Sum of observations in seconds.
    pub sum_seconds: f64,
}

/// The engine's live counters.
#[derive(Debug, Default)]
pub struct Metrics {
    pub(crate) queue_depth: AtomicU64,
    pub(crate) running: AtomicU64,
    pub(crate) batch_sequences: AtomicU64,
    pub(crate) batch_tokens: AtomicU64,
    pub(crate) steps: AtomicU64,
    pub(crate) step_sequences: AtomicU64,
    pub(crate) step_tokens: AtomicU64,
    pub(crate) step_tenants: AtomicU64,
    pub(crate) forward_micros: AtomicU64,
    pub(crate) prompt_tokens: AtomicU64,
    pub(crate) generated_tokens: AtomicU64,
    pub(crate) tokens_per_second_milli: AtomicU64,
    pub(crate) ttft: Histogram,
    pub(crate) delta_hits: AtomicU64,
    pub(crate) delta_misses: AtomicU64,
    pub(crate) delta_loads: AtomicU64,
    pub(crate) delta_load_failures: AtomicU64,
    pub(crate) delta_evictions: AtomicU64,
    pub(crate) delta_bytes: AtomicU64,
    pub(crate) delta_resident: AtomicU64,
    pub(crate) kv_reserved_bytes: AtomicU64,
    pub(crate) kv_used_bytes: AtomicU64,
    pub(crate) requests: Mutex<BTreeMap<String, u64>>,
    pub(crate) finished: Mutex<BTreeMap<&'static str, u64>>,
    pub(crate) failures: Mutex<BTreeMap<&'static str, u64>>,
}

/// Everything in [`Metrics`] at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsSnapshot {
    /// Requests waiting to be scheduled (gauge).
    pub queue_depth: u64,
    /// Sequences in the running batch (gauge).
    pub running: u64,
    /// Sequences in the last step (gauge).
    pub batch_sequences: u64,
    /// Tokens in the last step (gauge).
    pub batch_tokens: u64,
    /// Forward steps run.
    pub steps: u64,
    /// Sequences summed over steps (divide by `steps` for the mean batch size).
    pub step_sequences: u64,
    /// Tokens summed over steps.
    pub step_tokens: u64,
    /// Distinct tenants summed over steps (the base counts as none): each step's delta part reads
    /// every distinct tenant's delta once, so `step_tenants / steps` is what a step pays for.
    pub step_tenants: u64,
    /// Seconds spent in the forward pass.
    pub forward_seconds: f64,
    /// Prompt tokens prefilled.
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
    /// Generated tokens per second over the last second or so of work (gauge).
    pub tokens_per_second: f64,
    /// Time from submission to first generated token.
    pub time_to_first_token: HistogramSnapshot,
    /// Requests whose delta was in memory when they arrived.
    pub delta_hits: u64,
    /// Requests whose delta was not.
    pub delta_misses: u64,
    /// Delta loads started.
    pub delta_loads: u64,
    /// Delta loads that failed.
    pub delta_load_failures: u64,
    /// Deltas evicted to make room.
    pub delta_evictions: u64,
    /// Bytes of deltas in memory or reserved by loads (gauge).
    pub delta_bytes: u64,
    /// Deltas in memory (gauge).
    pub delta_resident: u64,
    /// KV bytes reserved by running sequences (gauge).
    pub kv_reserved_bytes: u64,
    /// KV bytes actually held (gauge).
    pub kv_used_bytes: u64,
    /// Requests accepted, per model name.
    pub requests: BTreeMap<String, u64>,
    /// Requests finished, per finish reason (`stop`, `length`).
    pub finished: BTreeMap<&'static str, u64>,
    /// Requests that failed or were refused, per [`crate::EngineError::kind`] (plus `cancelled`).
    pub failures: BTreeMap<&'static str, u64>,
}

fn bump<K: Ord>(map: &Mutex<BTreeMap<K, u64>>, key: K) {
    // A poisoned lock only means another thread panicked mid-increment; the counts are still usable.
    let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
    *m.entry(key).or_insert(0) += 1;
}

impl Metrics {
    pub(crate) fn request(&self, model: &str) {
        let mut m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        match m.get_mut(model) {
            Some(n) => *n += 1,
            None => {
                m.insert(model.to_string(), 1);
            }
        }
    }

    pub(crate) fn finished(&self, reason: &'static str) {
        bump(&self.finished, reason);
    }

    pub(crate) fn failure(&self, kind: &'static str) {
        bump(&self.failures, kind);
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let g = |a: &AtomicU64| a.load(Relaxed);
        let lock = |m: &Mutex<BTreeMap<&'static str, u64>>| {
            m.lock().unwrap_or_else(|p| p.into_inner()).clone()
        };
        MetricsSnapshot {
            queue_depth: g(&self.queue_depth),
            running: g(&self.running),
            batch_sequences: g(&self.batch_sequences),
            batch_tokens: g(&self.batch_tokens),
            steps: g(&self.steps),
            step_sequences: g(&self.step_sequences),
            step_tokens: g(&self.step_tokens),
            step_tenants: g(&self.step_tenants),
            forward_seconds: g(&self.forward_micros) as f64 / 1e6,
            prompt_tokens: g(&self.prompt_tokens),
            generated_tokens: g(&self.generated_tokens),
            tokens_per_second: g(&self.tokens_per_second_milli) as f64 / 1e3,
            time_to_first_token: self.ttft.snapshot(),
            delta_hits: g(&self.delta_hits),
            delta_misses: g(&self.delta_misses),
            delta_loads: g(&self.delta_loads),
            delta_load_failures: g(&self.delta_load_failures),
            delta_evictions: g(&self.delta_evictions),
            delta_bytes: g(&self.delta_bytes),
            delta_resident: g(&self.delta_resident),
            kv_reserved_bytes: g(&self.kv_reserved_bytes),
            kv_used_bytes: g(&self.kv_used_bytes),
            requests: self
                .requests
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            finished: lock(&self.finished),
            failures: lock(&self.failures),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(30));
        h.observe(Duration::from_secs(100));
        let s = h.snapshot();
        assert_eq!(s.cumulative[0], 1);
        assert_eq!(s.cumulative[2], 1);
        assert_eq!(s.cumulative[3], 2);
        assert_eq!(*s.cumulative.last().unwrap(), 3);
        assert!((s.sum_seconds - 100.033).abs() < 1e-6);
    }
}
