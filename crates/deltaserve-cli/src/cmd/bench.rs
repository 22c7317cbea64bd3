//! `deltaserve bench kernels`: the multi-tenant packed-delta product on Llama-2-7B-shaped matrices
//! and batch mixes, against the copy-bandwidth floor and against cuBLAS (candle's matmul) on
//! merged dense bf16 weights, plus a whole decode step (base GEMV + delta part).
//!
//! Method:
//! - the floor is bytes / measured copy bandwidth, where the copy bandwidth comes from a large
//!   device-to-device copy in the same run, counting bytes read plus bytes written;
//! - the bytes of the delta product are what it must read and write: every distinct delta's bits,
//!   `x` and the output (the kernel's own scratch, `x` rearranged, stays in L2 and is not counted);
//! - inputs are random (never zeros), and every timed call rotates through enough copies of the
//!   deltas and weights (at least 200 MB, four times the H100's L2) that they come from memory;
//! - on CUDA, a round of calls is captured into a CUDA graph and each replay is timed with events
//!   (median of `--iters` replays), so launch gaps do not count; if capture fails, the calls are
//!   timed back to back with events instead (the output says which). On the CPU: host clock,
//!   median of `--iters` calls.
//! - on CUDA, the other kernels run in the same process beside the default one, so every
//!   comparison is same run, same card: "ours" is the default tensor-core path (int8 kernel for
//!   groups of at most 2 rows, else the bf16 split-K kernel), "bf16" the second pass's default
//!   (`Bf16Path::Bf16`: the bf16 split-K kernel with 4 warps everywhere); the decode step is timed
//!   unfused (base GEMV, delta, add: as the model runs it), with the add fused into the delta
//!   kernel's store (base GEMV, then `tenant_delta_matmul_add`), and as one kernel
//!   (`cuda::delta_linear_fused`: `W_base + scale · S` formed in registers, up to 8 tenants;
//!   `delta_linear` takes it only where it wins), and as `delta_linear` itself ("dl": what the
//!   model runs; with several tenants, the base and delta products side by side on two streams).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Args as ClapArgs, Subcommand};
use deltaserve_kernels::{
    tenant_delta_matmul, tenant_delta_matmul_add, words_per_row, SignBits, SignDelta,
};

#[derive(ClapArgs)]
pub struct Args {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// The packed-delta product per shape and batch mix: time, GB/s, fraction of the copy
    /// bandwidth, cuBLAS on merged weights side by side, and a whole decode step.
    Kernels(KernelArgs),
    /// Serving throughput and latency percentiles for several tenant counts next to the base
    /// model alone, through the engine's continuous-batching scheduler (see bench_serve.rs).
    Serve(super::bench_serve::ServeArgs),
}

#[derive(ClapArgs)]
struct KernelArgs {
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Timed repetitions per measurement (median reported); default 50 on CUDA, 5 on the CPU.
    #[arg(long)]
    iters: Option<usize>,
    /// Matrix shapes, out x in (N x K), comma-separated.
    #[arg(long, default_value = "4096x4096,11008x4096,4096x11008")]
    shapes: String,
    /// Batch mixes, rows x distinct tenants, comma-separated (row i uses tenant i mod tenants).
    #[arg(long, default_value = "1x1,8x1,8x8,32x1,32x8,32x32")]
    mixes: String,
    /// Prefill row counts (one tenant, tensor-core path) timed against cuBLAS on the merged
    /// weights, comma-separated; empty to skip.
    #[arg(long, default_value = "512,2048")]
    prefill: String,
    /// Also write every number as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also time the CUDA-core kernel (`Bf16Path::Simple`, what f32 inputs take): 10-40x slower
    /// than the tensor-core kernels, so off by default to save GPU time.
    #[arg(long)]
    cuda_core: bool,
}

pub fn run(args: Args) -> Result<()> {
    match args.command {
        BenchCommand::Kernels(a) => kernels(a),
        BenchCommand::Serve(a) => super::bench_serve::run(a),
    }
}

/// Bytes of data that every timed call rotates through, at least: 4x the H100's 50 MB L2.
const ROTATE_BYTES: usize = 200 << 20;
/// At most this many copies of a delta set are rotated through.
const MAX_POOL: usize = 128;
/// On the CPU, the dense comparison is skipped when its merged weights would exceed this.
const CPU_DENSE_LIMIT: usize = 1 << 30;

struct Row {
    n: usize,
    k: usize,
    rows: usize,
    tenants: usize,
    /// Bytes the delta product must move: distinct deltas' bits + x + output.
    delta_bytes: usize,
    ours_us: f64,
    ours_gbps: f64,
    /// floor / measured, floor = delta_bytes / copy bandwidth.
    ours_frac_of_floor: f64,
    cuda_core_us: Option<f64>,
    /// The second pass's default, the bf16 split-K kernel with 4 warps (`Bf16Path::Bf16`; CUDA
    /// only).
    bf16_us: Option<f64>,
    dense_us: Option<f64>,
    dense_gbps: Option<f64>,
    base_us: Option<f64>,
    step_us: Option<f64>,
    /// The step with the add fused (`tenant_delta_matmul_add`) and the one-kernel step
    /// (`cuda::delta_linear_fused`).
    step_add_us: Option<f64>,
    step_fused_us: Option<f64>,
    /// `delta_linear` itself, the path the model takes (CUDA only): the fused kernel for one
    /// tenant, the two products side by side on two streams otherwise.
    step_dl_us: Option<f64>,
    step_floor_us: Option<f64>,
}

impl Row {
    /// The fastest decode step measured (fused when there is one).
    fn best_step_us(&self) -> Option<f64> {
        [
            self.step_us,
            self.step_add_us,
            self.step_fused_us,
            self.step_dl_us,
        ]
        .into_iter()
        .flatten()
        .reduce(f64::min)
    }
}

struct Report {
    device: String,
    timing: String,
    copy_gbps: f64,
    rows: Vec<Row>,
}

fn kernels(args: KernelArgs) -> Result<()> {
    let device = deltaserve_model::parse_device(&args.device)?;
    let on_cuda = device.is_cuda();
    let iters = args.iters.unwrap_or(if on_cuda { 50 } else { 5 }).max(1);
    let shapes = parse_pairs(&args.shapes, "--shapes")?;
    let mixes = parse_pairs(&args.mixes, "--mixes")?;
    let prefill: Vec<usize> = args
        .prefill
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            p.trim()
                .parse()
                .with_context(|| format!("--prefill {p}: not a number"))
        })
        .collect::<Result<_>>()?;
    for &(rows, tenants) in &mixes {
        if tenants == 0 || rows < tenants {
            bail!("--mixes {rows}x{tenants}: need 1 <= tenants <= rows");
        }
    }
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &device {
        // No per-tensor events: one stream, and nothing that graph capture cannot take.
        // SAFETY: this command uses a single stream.
        unsafe { d.disable_event_tracking() };
    }
    let mut clock = Clock::new(&device);

    let copy_bytes: usize = if on_cuda { 1 << 30 } else { 256 << 20 };
    let copy_us = if on_cuda {
        let big = Tensor::rand(0f32, 1f32, copy_bytes / 4, &device)?;
        clock.time(iters.min(20), 1, |_| {
            let _c = big.copy()?;
            Ok(())
        })?
    } else {
        // Into a buffer that is already mapped: a fresh allocation would time page faults.
        let src: Vec<u8> = (0..copy_bytes).map(|i| i as u8).collect();
        let mut dst = vec![0u8; copy_bytes];
        clock.time(iters.min(20), 1, |_| {
            // black_box: the copy is never read, and would otherwise be optimised away.
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&mut dst);
            Ok(())
        })?
    };
    let copy_gbps = 2.0 * copy_bytes as f64 / copy_us / 1e3;
    println!(
        "device {} | copy bandwidth {:.0} GB/s ({} MiB {} copy, read + write, {:.1} us) | timing: {}",
        args.device,
        copy_gbps,
        copy_bytes >> 20,
        if on_cuda { "device-to-device" } else { "host memory" },
        copy_us,
        clock.method()
    );

    let mut report = Report {
        device: args.device.clone(),
        timing: String::new(),
        copy_gbps,
        rows: Vec::new(),
    };
    let mut rng = SplitMix(0x5eed_de17a);
    for &(n, k) in &shapes {
        let wpr = words_per_row(k);
        let delta_bits = n * wpr * 4;
        let dense_bytes = n * k * 2;
        let max_tenants = mixes.iter().map(|m| m.1).max().unwrap_or(1);
        let pool_len = ROTATE_BYTES
            .div_ceil(delta_bits)
            .max(max_tenants)
            .min(MAX_POOL.max(max_tenants));
        let mut pool = Vec::with_capacity(pool_len);
        for i in 0..pool_len {
            let words: Vec<u32> = (0..n * wpr).map(|_| rng.next() as u32).collect();
            let scale = 0.001 + 0.0001 * i as f32;
            // The layout `serve` keeps on this device (row-interleaved on an AVX-512 CPU).
            let bits = SignBits::for_serving(words, n, k, &device)?;
            pool.push(SignDelta::new(bits, scale));
        }
        let dense_len = if on_cuda {
            ROTATE_BYTES.div_ceil(dense_bytes).max(max_tenants)
        } else {
            max_tenants
        };
        let dense_ok = on_cuda || dense_len * dense_bytes <= CPU_DENSE_LIMIT;
        let mut dense = Vec::new();
        if dense_ok {
            for _ in 0..dense_len {
                dense.push(Tensor::randn(0f32, 0.02, (n, k), &device)?.to_dtype(DType::BF16)?);
            }
        }
        println!("\n## {n}x{k} (out x in): one delta = {:.2} MB of bits, dense bf16 = {:.1} MB; {} deltas and {} dense matrices rotated",
            delta_bits as f64 / 1e6, dense_bytes as f64 / 1e6, pool_len, dense.len());
        println!(
            "{:>4} {:>7} | {:>9} {:>9} {:>7} {:>7} | {:>8} {:>6} {:>9} {:>8} | {:>10} {:>8} {:>7} | {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6}",
            "rows", "tenants", "bytes MB", "ours us", "GB/s", "%copy", "bf16 us", "%copy", "bf16/ours", "cudacore",
            "cuBLAS us", "GB/s", "speedup", "base us", "step us", "+add", "fused", "dl", "floor us", "x best"
        );
        for &(rows, tenants) in &mixes {
            let x = Tensor::randn(0f32, 1f32, (rows, k), &device)?.to_dtype(DType::BF16)?;
            let slots: Vec<Option<u32>> = (0..rows).map(|i| Some((i % tenants) as u32)).collect();
            let sets = (pool.len() / tenants).max(1);
            let set = |i: usize| -> Vec<&SignDelta> {
                let first = (i % sets) * tenants;
                pool[first..first + tenants].iter().collect()
            };
            let bytes = tenants * delta_bits + rows * k * 2 + rows * n * 2;
            let ours_us = clock.time(iters, sets, |i| {
                let _y = tenant_delta_matmul(&x, &slots, &set(i))?;
                Ok(())
            })?;
            let cuda_core_us = if args.cuda_core {
                path_time(&mut clock, iters, sets, &x, &slots, &set, Path::Simple)?
            } else {
                None
            };
            let bf16_us = path_time(&mut clock, iters, sets, &x, &slots, &set, Path::Bf16)?;
            let floor_us = bytes as f64 / copy_gbps / 1e3;

            // cuBLAS on merged weights: one matmul per tenant over its rows.
            let (mut dense_us, mut dense_gbps) = (None, None);
            let (mut base_us, mut step_us, mut step_floor_us) = (None, None, None);
            let (mut step_add_us, mut step_fused_us, mut step_dl_us) = (None, None, None);
            if dense_ok {
                let xs: Vec<Tensor> = (0..tenants)
                    .map(|t| {
                        let idx: Vec<u32> = (t..rows).step_by(tenants).map(|r| r as u32).collect();
                        let idx = Tensor::new(idx.as_slice(), &device)?;
                        x.index_select(&idx, 0)
                    })
                    .collect::<candle_core::Result<_>>()?;
                let dsets = (dense.len() / tenants).max(1);
                let us = clock.time(iters, dsets, |i| {
                    let first = (i % dsets) * tenants;
                    for (t, xt) in xs.iter().enumerate() {
                        let _y = xt.matmul(&dense[first + t].t()?)?;
                    }
                    Ok(())
                })?;
                dense_us = Some(us);
                dense_gbps =
                    Some((tenants * dense_bytes + rows * k * 2 + rows * n * 2) as f64 / us / 1e3);

                // A decode step of one linear layer: base GEMV for the whole batch + delta part.
                let bsets = dense.len();
                base_us = Some(clock.time(iters, bsets, |i| {
                    let _y = x.matmul(&dense[i % bsets].t()?)?;
                    Ok(())
                })?);
                let rounds = sets.max(bsets);
                step_us = Some(clock.time(iters, rounds, |i| {
                    let base = x.matmul(&dense[i % bsets].t()?)?;
                    let delta = tenant_delta_matmul(&x, &slots, &set(i))?;
                    let _y = base.add(&delta)?;
                    Ok(())
                })?);
                step_floor_us = Some((dense_bytes + bytes) as f64 / copy_gbps / 1e3);
                step_add_us = Some(clock.time(iters, rounds, |i| {
                    let base = x.matmul(&dense[i % bsets].t()?)?;
                    let _y = tenant_delta_matmul_add(&base, &x, &slots, &set(i))?;
                    Ok(())
                })?);
                step_fused_us = fused_time(&mut clock, iters, rounds, &x, &slots, &set, &|i| {
                    &dense[i % bsets]
                })?;
                if on_cuda {
                    step_dl_us = Some(clock.time(iters, rounds, |i| {
                        let _y = deltaserve_kernels::delta_linear(
                            &x,
                            &dense[i % bsets],
                            &slots,
                            &set(i),
                        )?;
                        Ok(())
                    })?);
                }
            }
            let row = Row {
                n,
                k,
                rows,
                tenants,
                delta_bytes: bytes,
                ours_us,
                ours_gbps: bytes as f64 / ours_us / 1e3,
                ours_frac_of_floor: floor_us / ours_us,
                cuda_core_us,
                bf16_us,
                dense_us,
                dense_gbps,
                base_us,
                step_us,
                step_add_us,
                step_fused_us,
                step_dl_us,
                step_floor_us,
            };
            println!(
                "{:>4} {:>7} | {:>9.2} {:>9.1} {:>7.0} {:>6.0}% | {:>8} {:>5}% {:>9} {:>8} | {:>10} {:>8} {:>7} | {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6}",
                rows,
                tenants,
                bytes as f64 / 1e6,
                row.ours_us,
                row.ours_gbps,
                100.0 * row.ours_frac_of_floor,
                opt(row.bf16_us, 1),
                opt(row.bf16_us.map(|t| 100.0 * floor_us / t), 0),
                opt(row.bf16_us.map(|t| t / row.ours_us), 2),
                opt(row.cuda_core_us, 1),
                opt(row.dense_us, 1),
                opt(row.dense_gbps, 0),
                opt(row.dense_us.map(|d| d / row.ours_us), 1),
                opt(row.base_us, 1),
                opt(row.step_us, 1),
                opt(row.step_add_us, 1),
                opt(row.step_fused_us, 1),
                opt(row.step_dl_us, 1),
                opt(row.step_floor_us, 1),
                opt(row.best_step_us().zip(row.step_floor_us).map(|(s, f)| s / f), 2),
            );
            report.rows.push(row);
        }
        if !prefill.is_empty() && dense_ok {
            println!("prefill, one tenant (x . S^T through sign_matmul_t, scale not applied) against cuBLAS on merged weights:");
            println!(
                "{:>6} | {:>9} {:>8} | {:>10} {:>8}",
                "rows", "ours us", "TFLOP/s", "cuBLAS us", "TFLOP/s"
            );
            for &rows in &prefill {
                let x = Tensor::randn(0f32, 1f32, (rows, k), &device)?.to_dtype(DType::BF16)?;
                let flops = 2.0 * (rows * n * k) as f64;
                let plen = pool.len();
                let ours = clock.time(iters.min(20), plen, |i| {
                    let _y = deltaserve_kernels::sign_matmul_t(&x, pool[i % plen].signs())?;
                    Ok(())
                })?;
                let dlen = dense.len();
                let dense_us = clock.time(iters.min(20), dlen, |i| {
                    let _y = x.matmul(&dense[i % dlen].t()?)?;
                    Ok(())
                })?;
                println!(
                    "{:>6} | {:>9.1} {:>8.0} | {:>10.1} {:>8.0}",
                    rows,
                    ours,
                    flops / ours / 1e6,
                    dense_us,
                    flops / dense_us / 1e6
                );
            }
        }
    }
    report.timing = clock.method().to_string();
    print_goals(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report.to_json())?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

impl Report {
    fn to_json(&self) -> serde_json::Value {
        let rows: Vec<serde_json::Value> = self
            .rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "n": r.n, "k": r.k, "rows": r.rows, "tenants": r.tenants,
                    "delta_bytes": r.delta_bytes, "ours_us": r.ours_us, "ours_gbps": r.ours_gbps,
                    "ours_frac_of_floor": r.ours_frac_of_floor, "cuda_core_us": r.cuda_core_us,
                    "bf16_us": r.bf16_us,
                    "dense_us": r.dense_us, "dense_gbps": r.dense_gbps, "base_us": r.base_us,
                    "step_us": r.step_us,
                    "step_add_us": r.step_add_us, "step_fused_us": r.step_fused_us,
                    "step_dl_us": r.step_dl_us,
                    "step_floor_us": r.step_floor_us,
                })
            })
            .collect();
        serde_json::json!({
            "device": self.device, "timing": self.timing, "copy_gbps": self.copy_gbps,
            "rows": rows,
        })
    }
}

/// The goals, each with whether this run meets it.
fn print_goals(report: &Report) {
    println!("\nGoals (issue 5):");
    let full: Vec<&Row> = report
        .rows
        .iter()
        .filter(|r| r.rows == 32 && r.tenants == 32)
        .collect();
    if !full.is_empty() {
        let worst = full
            .iter()
            .map(|r| r.ours_frac_of_floor)
            .fold(f64::INFINITY, f64::min);
        let list: Vec<String> = full
            .iter()
            .map(|r| format!("{}x{} {:.0}%", r.n, r.k, 100.0 * r.ours_frac_of_floor))
            .collect();
        println!(
            "- delta part >= 75% of copy bandwidth (32 rows, 32 tenants): {} -> {}",
            list.join(", "),
            if worst >= 0.75 { "met" } else { "NOT met" }
        );
    }
    let steps: Vec<f64> = report
        .rows
        .iter()
        .filter_map(|r| r.best_step_us().zip(r.step_floor_us).map(|(s, f)| s / f))
        .collect();
    if !steps.is_empty() {
        let worst = steps.iter().copied().fold(0.0, f64::max);
        println!(
            "- whole decode step (fused where faster) within 1.3x of (base + D x delta bytes) / bandwidth: worst {:.2}x over all shapes and mixes -> {}",
            worst,
            if worst <= 1.3 { "met" } else { "NOT met" }
        );
    }
    println!("- >= 10x faster than BitDelta's Triton kernel: see scripts/reference/bitdelta_triton_bench.py (same shapes and mixes)");
}

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.decimals$}"))
}

/// A bf16 kernel to time beside the default one (the CUDA paths of `Bf16Path`).
#[derive(Clone, Copy)]
enum Path {
    Simple,
    Bf16,
}

#[cfg(feature = "cuda")]
impl Path {
    fn bf16_path(self) -> deltaserve_kernels::cuda::Bf16Path {
        use deltaserve_kernels::cuda::Bf16Path;
        match self {
            Path::Simple => Bf16Path::Simple,
            Path::Bf16 => Bf16Path::Bf16,
        }
    }
}

/// The delta product on another kernel; `None` off CUDA.
#[cfg(feature = "cuda")]
fn path_time<'a>(
    clock: &mut Clock,
    iters: usize,
    sets: usize,
    x: &Tensor,
    slots: &[Option<u32>],
    set: &dyn Fn(usize) -> Vec<&'a SignDelta>,
    path: Path,
) -> Result<Option<f64>> {
    use deltaserve_kernels::cuda::tenant_delta_matmul_with;
    if !x.device().is_cuda() {
        return Ok(None);
    }
    Ok(Some(clock.time(iters, sets, |i| {
        let _y = tenant_delta_matmul_with(x, slots, &set(i), path.bf16_path())?;
        Ok(())
    })?))
}

/// The one-kernel decode step (`delta_linear_fused`: `W_base + scale · S` formed in registers);
/// `None` off CUDA or where the fused kernel does not apply.
#[cfg(feature = "cuda")]
fn fused_time<'a>(
    clock: &mut Clock,
    iters: usize,
    rounds: usize,
    x: &Tensor,
    slots: &[Option<u32>],
    set: &dyn Fn(usize) -> Vec<&'a SignDelta>,
    w: &dyn Fn(usize) -> &'a Tensor,
) -> Result<Option<f64>> {
    use deltaserve_kernels::cuda::{delta_linear_fused, fused_ok};
    if !x.device().is_cuda() || !fused_ok(x, w(0), slots, &set(0)) {
        return Ok(None);
    }
    Ok(Some(clock.time(iters, rounds, |i| {
        let _y = delta_linear_fused(x, w(i), slots, &set(i))?;
        Ok(())
    })?))
}

#[cfg(not(feature = "cuda"))]
fn path_time<'a>(
    _: &mut Clock,
    _: usize,
    _: usize,
    _: &Tensor,
    _: &[Option<u32>],
    _: &dyn Fn(usize) -> Vec<&'a SignDelta>,
    _: Path,
) -> Result<Option<f64>> {
    Ok(None)
}

#[cfg(not(feature = "cuda"))]
fn fused_time<'a>(
    _: &mut Clock,
    _: usize,
    _: usize,
    _: &Tensor,
    _: &[Option<u32>],
    _: &dyn Fn(usize) -> Vec<&'a SignDelta>,
    _: &dyn Fn(usize) -> &'a Tensor,
) -> Result<Option<f64>> {
    Ok(None)
}

fn parse_pairs(spec: &str, flag: &str) -> Result<Vec<(usize, usize)>> {
    spec.split(',')
        .map(|p| {
            let (a, b) = p
                .trim()
                .split_once('x')
                .with_context(|| format!("{flag} {p}: expected AxB"))?;
            Ok((
                a.parse()
                    .with_context(|| format!("{flag} {p}: {a} is not a number"))?,
                b.parse()
                    .with_context(|| format!("{flag} {p}: {b} is not a number"))?,
            ))
        })
        .collect()
}

/// splitmix64: fast random sign bits without a dependency.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Times a closure of the call index: the median time of one call, in microseconds.
enum Clock {
    Host,
    #[cfg(feature = "cuda")]
    Cuda {
        device: candle_core::CudaDevice,
        graphs: bool,
        fell_back: bool,
    },
}

impl Clock {
    fn new(device: &Device) -> Self {
        match device {
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => Clock::Cuda {
                device: d.clone(),
                graphs: true,
                fell_back: false,
            },
            _ => Clock::Host,
        }
    }

    fn method(&self) -> &'static str {
        match self {
            Clock::Host => "host clock, median of single calls",
            #[cfg(feature = "cuda")]
            Clock::Cuda {
                fell_back: false, ..
            } => "CUDA graph of one rotation of calls, replays timed with events, median",
            #[cfg(feature = "cuda")]
            Clock::Cuda {
                fell_back: true, ..
            } => {
                "CUDA events around back-to-back calls (graph capture failed at least once), median"
            }
        }
    }

    /// `sets`: how many different inputs `f(i)` rotates through (`i % sets`).
    fn time(
        &mut self,
        iters: usize,
        sets: usize,
        mut f: impl FnMut(usize) -> candle_core::Result<()>,
    ) -> Result<f64> {
        match self {
            Clock::Host => {
                let _ = sets; // the host clock times single calls
                for i in 0..2 {
                    f(i)?;
                }
                let mut samples = Vec::with_capacity(iters);
                for i in 0..iters {
                    let t = Instant::now();
                    f(i)?;
                    samples.push(t.elapsed().as_secs_f64() * 1e6);
                }
                Ok(median(samples))
            }
            #[cfg(feature = "cuda")]
            Clock::Cuda {
                device,
                graphs,
                fell_back,
            } => cuda_time(device, graphs, fell_back, iters, sets, &mut f),
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_time(
    device: &candle_core::CudaDevice,
    graphs: &mut bool,
    fell_back: &mut bool,
    iters: usize,
    sets: usize,
    f: &mut dyn FnMut(usize) -> candle_core::Result<()>,
) -> Result<f64> {
    use candle_core::backend::BackendDevice;
    use candle_core::cuda_backend::cudarc::driver::sys;

    let stream = device.cuda_stream();
    let ctx = stream.context().clone();
    // One round visits every input set; at least 8 calls so that a replay is not too short.
    let calls = sets * 8usize.div_ceil(sets);
    for i in 0..calls.min(sets.max(2)) {
        f(i)?;
    }
    device.synchronize()?;
    let event = || ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT));
    let (start, end) = (event()?, event()?);
    let mut samples = Vec::with_capacity(iters);
    if *graphs {
        stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)?;
        let body = (0..calls).try_for_each(&mut *f);
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        match (body, graph) {
            (Ok(()), Ok(Some(graph))) => {
                graph.launch()?;
                stream.synchronize()?;
                for _ in 0..iters {
                    start.record(&stream)?;
                    graph.launch()?;
                    end.record(&stream)?;
                    samples.push(f64::from(start.elapsed_ms(&end)?) * 1e3 / calls as f64);
                }
                ctx.check_err()?;
                return Ok(median(samples));
            }
            (body, graph) => {
                eprintln!(
                    "graph capture failed ({:?} / {:?}); timing back-to-back calls instead",
                    body.err().map(|e| e.to_string()),
                    graph.err()
                );
                let _ = ctx.check_err();
                *graphs = false;
                *fell_back = true;
            }
        }
    }
    for _ in 0..iters {
        start.record(&stream)?;
        for i in 0..calls {
            f(i)?;
        }
        end.record(&stream)?;
        samples.push(f64::from(start.elapsed_ms(&end)?) * 1e3 / calls as f64);
    }
    Ok(median(samples))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
