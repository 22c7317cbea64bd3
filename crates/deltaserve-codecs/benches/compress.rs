//! BitDelta compression throughput on a ~1 GB random bf16 base/fine-tune pair, against the
//! speed of simply reading both files (the limit: compression must read every byte of both).
//!
//! ```text
//! cargo bench -p deltaserve-codecs --bench compress
//! ```
//!
//! Writes the pair (about 2.2 GB) to a temporary directory under `$TMPDIR` (default `/tmp`)
//! and deletes it at the end. Page caches cannot be dropped here, so both files are read twice
//! first (with all threads, as compression reads them) and the warm time is the one reported;
//! compression then runs warm too. `RAYON_NUM_THREADS` sets the thread count of both.
//! Throughput is fine-tune bytes over wall time (GB = 1e9 bytes).
//!
//! With `DELTASERVE_BENCH_DIR=DIR` the pair is written to (or, if already there, reused from)
//! `DIR` and kept, for profiling.
//!
//! Heap growth is sampled from `/proc/self/status` (`RssAnon`) every 5 ms while compressing; the
//! memory-mapped checkpoints are file pages and do not count.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deltaserve_codecs::bitdelta::{compress, CompressOptions};
use deltaserve_model::random::{RandomCheckpoint, RandomShape};
use deltaserve_model::Checkpoint;

/// 10 layers of hidden 2048 / MLP 5632 plus an 8192-token vocabulary: 547 M parameters,
/// 1.09 GB in bf16.
const SHAPE: RandomShape = RandomShape {
    hidden: 2048,
    intermediate: 5632,
    layers: 10,
    heads: 16,
    kv_heads: 16,
    vocab: 8192,
    max_positions: 2048,
};

const RUNS: usize = 3;

fn files(dir: &Path) -> Vec<PathBuf> {
    let ckpt = Checkpoint::open(dir).expect("open the random checkpoint");
    ckpt.weight_files()
        .iter()
        .map(|p| p.to_path_buf())
        .collect()
}

/// Reads every file to the end in 8 MiB pieces spread over all rayon threads (`pread`), as
/// compression reads them with all threads; returns bytes and time.
fn read_all(paths: &[PathBuf]) -> (u64, Duration) {
    use rayon::prelude::*;
    use std::os::unix::fs::FileExt;
    const PIECE: u64 = 8 << 20;
    let start = Instant::now();
    let pieces: Vec<(std::fs::File, u64, u64)> = paths
        .iter()
        .flat_map(|p| {
            let len = std::fs::metadata(p).expect("stat").len();
            (0..len.div_ceil(PIECE)).map(move |i| {
                let f = std::fs::File::open(p).expect("open");
                (f, i * PIECE, PIECE.min(len - i * PIECE))
            })
        })
        .collect();
    let total: u64 = pieces
        .par_iter()
        .map_init(
            || vec![0u8; PIECE as usize],
            |buf, (f, offset, len)| {
                f.read_exact_at(&mut buf[..*len as usize], *offset)
                    .expect("read");
                std::hint::black_box(&buf);
                *len
            },
        )
        .sum();
    (total, start.elapsed())
}

/// Anonymous (heap) resident memory in bytes, from /proc/self/status; 0 where unavailable.
fn rss_anon() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn write_pair(base_dir: &Path, ft_dir: &Path) {
    let t = Instant::now();
    RandomCheckpoint {
        shape: SHAPE,
        bf16: true,
        seed: 1,
        finetune_of: None,
        max_shard_bytes: 400_000_000,
        tokenizer_from: None,
    }
    .write(base_dir)
    .expect("write base");
    let base = Checkpoint::open(base_dir).expect("open base");
    RandomCheckpoint {
        shape: SHAPE,
        bf16: true,
        seed: 2,
        finetune_of: Some((&base, 0.01)),
        max_shard_bytes: 400_000_000,
        tokenizer_from: None,
    }
    .write(ft_dir)
    .expect("write fine-tune");
    eprintln!("wrote the pair in {:.1}s", t.elapsed().as_secs_f64());
}

/// CPU time (user + system) this process has used, from /proc/self/stat; 0 where unavailable.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn main() {
    let Some(root) = std::env::var_os("DELTASERVE_BENCH_DIR").map(PathBuf::from) else {
        // Measure in a fresh process, so the memory the generator used does not hide the
        // compressor's, and delete the pair afterwards.
        let tmp = tempfile::Builder::new()
            .prefix("deltaserve-bench-")
            .tempdir()
            .expect("temp dir");
        write_pair(&tmp.path().join("base"), &tmp.path().join("finetuned"));
        let status = std::process::Command::new(std::env::current_exe().expect("own path"))
            .args(std::env::args_os().skip(1))
            .env("DELTASERVE_BENCH_DIR", tmp.path())
            .status()
            .expect("run the measuring process");
        assert!(status.success(), "measuring process: {status}");
        return;
    };
    let base_dir = root.join("base");
    let ft_dir = root.join("finetuned");
    if !ft_dir.join("config.json").is_file() {
        write_pair(&base_dir, &ft_dir);
    }
    let tmp = tempfile::Builder::new()
        .prefix("deltaserve-bench-out-")
        .tempdir()
        .expect("temp dir");
    let out = tmp.path().join("ft.delta");
    let base = Checkpoint::open(&base_dir).expect("open base");

    let base_files = files(&base_dir);
    let ft_files = files(&ft_dir);
    let both: Vec<PathBuf> = base_files.iter().chain(&ft_files).cloned().collect();
    let ft_bytes: u64 = ft_files
        .iter()
        .map(|p| std::fs::metadata(p).expect("stat").len())
        .sum();
    let finetuned = Checkpoint::open(&ft_dir).expect("open fine-tune");
    let largest = finetuned
        .tensor_names()
        .iter()
        .map(|n| finetuned.raw(n).map(|r| r.data.len()).unwrap_or(0))
        .max()
        .unwrap_or(0);
    // Compression first, so that its heap growth is measured before anything else here has
    // allocated (the allocator keeps freed memory, which would hide it).
    let mut times = Vec::new();
    let mut bytes_out = 0;
    for run in 0..RUNS {
        // Sample heap memory while compressing (the mapped checkpoints are file pages, not heap).
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let before = rss_anon();
        let sampler = {
            let (stop, peak) = (stop.clone(), peak.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(rss_anon(), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        let opts = CompressOptions {
            out: out.clone(),
            force: true,
            progress: false,
        };
        let cpu0 = cpu_seconds();
        let report = compress(&base, &finetuned, &opts).expect("compress");
        let cpu = cpu_seconds() - cpu0;
        stop.store(true, Ordering::Relaxed);
        sampler.join().expect("sampler thread");
        let heap = peak.load(Ordering::Relaxed).saturating_sub(before);
        println!(
            "compress run {}: {:.3}s (cpu {:.2}s) = {:.2} GB/s of fine-tune read; heap growth {:.0} MB \
             ({:.2}x the largest tensor, {:.0} MB); {:.3} bits/param, {:.2}x vs bf16, delta {:.1} MB",
            run + 1,
            report.elapsed.as_secs_f64(),
            cpu,
            report.throughput_gb_s(),
            heap as f64 / 1e6,
            heap as f64 / largest as f64,
            largest as f64 / 1e6,
            report.bits_per_param,
            report.ratio_vs_bf16(),
            report.bytes_out as f64 / 1e6
        );
        times.push(report.elapsed);
        bytes_out = report.bytes_out;
    }

    let (_, first) = read_all(&both);
    let (both_bytes, warm) = read_all(&both);
    let read_gbs = ft_bytes as f64 / 1e9 / warm.as_secs_f64();
    println!(
        "read both files ({} threads): {:.2} GB in {:.3}s warm ({:.3}s first) = {:.2} GB/s of \
         fine-tune read ({:.2} GB/s of all bytes)",
        rayon::current_num_threads(),
        both_bytes as f64 / 1e9,
        warm.as_secs_f64(),
        first.as_secs_f64(),
        read_gbs,
        both_bytes as f64 / 1e9 / warm.as_secs_f64()
    );
    let t = Instant::now();
    let fp = deltaserve_format::fingerprint_safetensors(&base_files).expect("fingerprint");
    let fp_time = t.elapsed();
    println!(
        "fingerprint of the base alone (blake3, all threads): {:.3}s = {:.2} GB/s ({} tensors)",
        fp_time.as_secs_f64(),
        (both_bytes - ft_bytes) as f64 / 1e9 / fp_time.as_secs_f64(),
        fp.tensors
    );
    // Part of every compression: the delta is fsynced before it is renamed into place.
    let blob = vec![1u8; bytes_out as usize];
    let t = Instant::now();
    deltaserve_format::write_atomic(&tmp.path().join("blob"), true, |w| w.write_all(&blob))
        .expect("write");
    println!(
        "write + fsync + rename of {:.1} MB (the delta's size): {:.3}s",
        bytes_out as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );

    times.sort();
    let median = times[times.len() / 2];
    let gbs = ft_bytes as f64 / 1e9 / median.as_secs_f64();
    println!(
        "compress median of {RUNS}: {:.3}s = {:.2} GB/s of fine-tune read ({} threads) = {:.0}% of \
         the read limit ({:.2} GB/s)",
        median.as_secs_f64(),
        gbs,
        rayon::current_num_threads(),
        100.0 * gbs / read_gbs,
        read_gbs
    );
}
