//! The CUDA kernels against the reference (`reference.rs`, f64 sums) on random inputs of awkward
//! sizes: K not a multiple of 32 or of the 512-column chunk, N not a multiple of any tile, rows of
//! one tenant split over several groups, base-only rows, more groups than one launch takes.
//!
//! Run on a GPU machine: `cargo test --release --features cuda -p deltaserve-kernels --test cuda`.
//! Without a CUDA device every test here FAILS (it does not skip): a build with the feature on
//! is meant to be checked on a GPU.
//!
//! Error bounds, as relative Frobenius error ‖y − ref‖ / ‖ref‖, with `ref` computed in f64 from the
//! same (rounded) inputs:
//! - f32 inputs (CUDA cores, f32 sums): 1e-5, as for the CPU kernels;
//! - f64 inputs: 1e-12;
//! - bf16 outputs: 8e-3. The output is rounded to 8 significant bits (relative error up to 2⁻⁹ ≈
//!   2e-3 per element, ~1.1e-3 in the Frobenius norm); the tensor-core path adds ~1e-5 (the
//!   accumulator loses ~8 bits to the offset explained in `sign_matmul.cu`);
//! - f16 outputs: 3e-3 (11 significant bits).
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor, Var};
use deltaserve_kernels::cuda::{
    delta_linear_fused, fused_ok, sign_matmul_t_with, tenant_delta_matmul_add_with,
    tenant_delta_matmul_with, Bf16Path,
};
use deltaserve_kernels::reference::{
    base_plus_delta_ref, sign_matmul_n_ref, sign_matmul_t_ref, tenant_delta_matmul_ref,
};
use deltaserve_kernels::{
    sign_matmul_n, sign_matmul_t, tenant_delta_matmul, words_per_row, SignBits, SignDelta,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const KS: [usize; 8] = [1, 31, 33, 100, 257, 1000, 4096, 4096 + 17];
const NS: [usize; 4] = [1, 3, 65, 300];
const MS: [usize; 5] = [1, 2, 5, 17, 64];

fn gpu() -> Device {
    Device::new_cuda(0).unwrap_or_else(|e| {
        panic!(
            "tests/cuda.rs needs a CUDA device (the crate was built with feature `cuda`), \
             but none could be opened: {e}"
        )
    })
}

fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F64 => 1e-12,
        DType::BF16 => 8e-3,
        DType::F16 => 3e-3,
        _ => unreachable!(),
    }
}

fn random_words(rng: &mut StdRng, n: usize, k: usize) -> Vec<u32> {
    // Padding bits are random too: every kernel must ignore them.
    (0..n * words_per_row(k)).map(|_| rng.gen()).collect()
}

/// A random (dims) tensor on the CPU in `dtype`, and its values as f32 after rounding to `dtype`.
fn random_x(rng: &mut StdRng, dims: &[usize], dtype: DType) -> (Tensor, Vec<f32>) {
    let len: usize = dims.iter().product();
    let v: Vec<f32> = (0..len).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
    let t = Tensor::from_vec(v, dims, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let rounded = flat(&t);
    (t, rounded)
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    assert!(
        got.iter().all(|v| v.is_finite()),
        "non-finite output (an unwritten element?)"
    );
    let d: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
        .sum();
    let r: f64 = want.iter().map(|b| f64::from(*b).powi(2)).sum();
    if r == 0.0 {
        d.sqrt()
    } else {
        (d / r).sqrt()
    }
}

/// Asserts that `got` is within `tol` of `want` (relative error) and that every base-only row (a
/// `None` slot) is exactly zero; returns the error. `what` names the case in the messages.
fn check_delta_rows(
    got: &[f32],
    want: &[f32],
    row_slot: &[Option<u32>],
    n: usize,
    tol: f64,
    what: &str,
) -> f64 {
    let err = rel_err(got, want);
    assert!(err < tol, "{what}: {err:.2e}");
    for (row, slot) in row_slot.iter().enumerate() {
        if slot.is_none() {
            assert!(
                got[row * n..(row + 1) * n].iter().all(|v| *v == 0.0),
                "{what}: base-only row {row} not zero"
            );
        }
    }
    err
}

/// One decode batch on `path`, both forms: `tenant_delta_matmul_with` against `want` (the f64
/// reference) by [`check_delta_rows`], and `tenant_delta_matmul_add_with` with base `b` against the
/// f64 sum of the rounded base `br` and `want`. Poisons the output first; returns the first error.
#[allow(clippy::too_many_arguments)]
fn check_product_and_add(
    dev: &Device,
    x: &Tensor,
    b: &Tensor,
    br: &[f32],
    row_slot: &[Option<u32>],
    refs: &[&SignDelta],
    path: Bf16Path,
    want: &[f32],
    what: &str,
) -> f64 {
    let n = br.len() / row_slot.len();
    poison(dev, br.len(), DType::BF16);
    let y = tenant_delta_matmul_with(x, row_slot, refs, path).unwrap();
    let err = check_delta_rows(&flat(&y), want, row_slot, n, tol(DType::BF16), what);
    let y = tenant_delta_matmul_add_with(b, x, row_slot, refs, path).unwrap();
    let want_add: Vec<f32> = want.iter().zip(br).map(|(d, b)| d + b).collect();
    let err_add = rel_err(&flat(&y), &want_add);
    assert!(err_add < tol(DType::BF16), "+ base {what}: {err_add:.2e}");
    err
}

/// Allocates and frees a NaN buffer of `len` values of `dtype` on the GPU, so that the next
/// allocation of that size likely reuses it: an output element a kernel forgets to write then
/// reads as NaN and fails `rel_err`.
fn poison(dev: &Device, len: usize, dtype: DType) {
    let nan = Tensor::full(f32::NAN, len.max(1), dev).unwrap();
    drop(nan.to_dtype(dtype).unwrap());
}

fn signs_on(words: &[u32], n: usize, k: usize, dev: &Device) -> SignBits {
    SignBits::from_words(words.to_vec(), n, k, dev).unwrap()
}

#[test]
fn sign_matmul_t_matches_reference_every_path_and_awkward_size() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(1);
    let mut worst = [0f64; 4];
    for &k in &KS {
        for &n in &NS {
            let words = random_words(&mut rng, n, k);
            let signs = signs_on(&words, n, k, &dev);
            for &m in &MS {
                for (i, (dtype, path)) in [
                    (DType::F32, Bf16Path::TensorCore),
                    (DType::BF16, Bf16Path::TensorCore),
                    (DType::BF16, Bf16Path::Simple),
                    (DType::F16, Bf16Path::TensorCore),
                ]
                .into_iter()
                .enumerate()
                {
                    let (x, xr) = random_x(&mut rng, &[m, k], dtype);
                    let x = x.to_device(&dev).unwrap();
                    poison(&dev, m * n, dtype);
                    let y = if path == Bf16Path::TensorCore {
                        sign_matmul_t(&x, &signs).unwrap()
                    } else {
                        sign_matmul_t_with(&x, &signs, path).unwrap()
                    };
                    assert_eq!(y.dims(), [m, n]);
                    assert_eq!(y.dtype(), dtype);
                    let err = rel_err(&flat(&y), &sign_matmul_t_ref(&xr, &words, n, k));
                    worst[i] = worst[i].max(err);
                    assert!(
                        err < tol(dtype),
                        "{dtype:?} {path:?} M={m} N={n} K={k}: relative error {err:.2e}"
                    );
                }
            }
        }
    }
    println!("worst relative errors: f32 {:.1e}, bf16 tensor cores {:.1e}, bf16 simple {:.1e}, f16 {:.1e}", worst[0], worst[1], worst[2], worst[3]);
}

#[test]
fn prefill_sizes_span_several_groups_and_launches() {
    // 1100 rows: 35 groups of 32, so two launches of the tensor-core kernel.
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(2);
    for (m, n, k) in [(300, 65, 257), (1100, 65, 1000), (96, 300, 4096)] {
        let words = random_words(&mut rng, n, k);
        let signs = signs_on(&words, n, k, &dev);
        for dtype in [DType::BF16, DType::F32] {
            let (x, xr) = random_x(&mut rng, &[m, k], dtype);
            poison(&dev, m * n, dtype);
            let y = sign_matmul_t(&x.to_device(&dev).unwrap(), &signs).unwrap();
            let err = rel_err(&flat(&y), &sign_matmul_t_ref(&xr, &words, n, k));
            assert!(err < tol(dtype), "{dtype:?} M={m} N={n} K={k}: {err:.2e}");
        }
    }
}

#[test]
fn leading_dims_strided_inputs_and_f64() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(3);
    let (n, k) = (65, 100);
    let words = random_words(&mut rng, n, k);
    let signs = signs_on(&words, n, k, &dev);
    // (B, T, K) input.
    let (x, xr) = random_x(&mut rng, &[2, 3, k], DType::BF16);
    let y = sign_matmul_t(&x.to_device(&dev).unwrap(), &signs).unwrap();
    assert_eq!(y.dims(), [2, 3, n]);
    let err = rel_err(&flat(&y), &sign_matmul_t_ref(&xr, &words, n, k));
    assert!(err < tol(DType::BF16), "3-d input: {err:.2e}");
    // A transposed (strided) view is gathered first.
    for dtype in [DType::BF16, DType::F32] {
        let (xt, _) = random_x(&mut rng, &[k, 5], dtype);
        let xt = xt.to_device(&dev).unwrap().t().unwrap();
        assert!(!xt.is_contiguous());
        let xr = flat(&xt.contiguous().unwrap());
        let y = sign_matmul_t(&xt, &signs).unwrap();
        let err = rel_err(&flat(&y), &sign_matmul_t_ref(&xr, &words, n, k));
        assert!(err < tol(dtype), "strided {dtype:?}: {err:.2e}");
    }
    // f64 (gradient checks) against the CPU op in f64.
    let x64: Vec<f64> = (0..4 * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let x64 = Tensor::from_vec(x64, (4, k), &Device::Cpu).unwrap();
    let cpu_signs = signs_on(&words, n, k, &Device::Cpu);
    let want: Vec<f64> = sign_matmul_t(&x64, &cpu_signs)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let got: Vec<f64> = sign_matmul_t(&x64.to_device(&dev).unwrap(), &signs)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let d: f64 = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f64>()
        .sqrt();
    let r: f64 = want.iter().map(|b| b * b).sum::<f64>().sqrt();
    assert!(d / r < tol(DType::F64), "f64: {:.2e}", d / r);
}

#[test]
fn sign_matmul_n_matches_reference() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(4);
    for &k in &KS {
        for &n in &NS {
            let words = random_words(&mut rng, n, k);
            let signs = signs_on(&words, n, k, &dev);
            for &m in &[1usize, 5, 64] {
                for dtype in [DType::F32, DType::BF16, DType::F16] {
                    let (g, gr) = random_x(&mut rng, &[m, n], dtype);
                    poison(&dev, m * k, dtype);
                    let y = sign_matmul_n(&g.to_device(&dev).unwrap(), &signs).unwrap();
                    assert_eq!(y.dims(), [m, k]);
                    let err = rel_err(&flat(&y), &sign_matmul_n_ref(&gr, &words, n, k));
                    assert!(
                        err < tol(dtype),
                        "{dtype:?} M={m} N={n} K={k}: relative error {err:.2e}"
                    );
                }
            }
        }
    }
}

#[test]
fn gradient_flows_through_the_cuda_op() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(5);
    let (m, n, k) = (3, 65, 257);
    let words = random_words(&mut rng, n, k);
    let signs = signs_on(&words, n, k, &dev);
    let (x, _) = random_x(&mut rng, &[m, k], DType::F32);
    let x = Var::from_tensor(&x.to_device(&dev).unwrap()).unwrap();
    let (w, wr) = random_x(&mut rng, &[m, n], DType::F32);
    let loss = sign_matmul_t(x.as_tensor(), &signs)
        .unwrap()
        .mul(&w.to_device(&dev).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let gx = grads.get(x.as_tensor()).expect("x gets a gradient");
    // d/dx sum(w ⊙ x·Sᵀ) = w · S
    let err = rel_err(&flat(gx), &sign_matmul_n_ref(&wr, &words, n, k));
    assert!(err < 1e-5, "gradient: {err:.2e}");
}

/// Deltas and a mixed slot assignment with base-only rows.
fn tenant_case(
    rng: &mut StdRng,
    dev: &Device,
    m: usize,
    n: usize,
    k: usize,
    num_deltas: usize,
) -> (Vec<SignDelta>, Vec<SignDelta>, Vec<Option<u32>>) {
    let mut on_gpu = Vec::new();
    let mut on_cpu = Vec::new();
    for _ in 0..num_deltas {
        let words = random_words(rng, n, k);
        let scale = rng.gen_range(0.001f32..0.05);
        on_gpu.push(SignDelta::from_words(words.clone(), n, k, scale, dev).unwrap());
        on_cpu.push(SignDelta::from_words(words, n, k, scale, &Device::Cpu).unwrap());
    }
    let row_slot = (0..m)
        .map(|_| {
            if rng.gen_bool(0.2) {
                None
            } else {
                Some(rng.gen_range(0..num_deltas as u32))
            }
        })
        .collect();
    (on_gpu, on_cpu, row_slot)
}

#[test]
fn tenant_delta_matmul_matches_reference_with_mixed_slots() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(6);
    // K = 100, 1000 and 4091 have ceil(K/32) % 4 == 0, which the int8 kernel and the 8-warp
    // bf16 kernel need; the others take the 4-warp bf16 kernel's unaligned form.
    for &k in &[1usize, 33, 100, 257, 1000, 4091, 4096 + 17] {
        for &n in &[3usize, 65, 300] {
            for &m in &MS {
                let (deltas, cpu_deltas, row_slot) = tenant_case(&mut rng, &dev, m, n, k, 3);
                let refs: Vec<&SignDelta> = deltas.iter().collect();
                for (dtype, path) in [
                    (DType::BF16, Bf16Path::TensorCore),
                    (DType::BF16, Bf16Path::Bf16),
                    (DType::BF16, Bf16Path::Simple),
                    (DType::F32, Bf16Path::TensorCore),
                    (DType::F16, Bf16Path::TensorCore),
                ] {
                    let (x, xr) = random_x(&mut rng, &[m, k], dtype);
                    poison(&dev, m * n, dtype);
                    let y = tenant_delta_matmul_with(
                        &x.to_device(&dev).unwrap(),
                        &row_slot,
                        &refs,
                        path,
                    )
                    .unwrap();
                    assert_eq!(y.dims(), [m, n]);
                    let want = tenant_delta_matmul_ref(&xr, &row_slot, &cpu_deltas, n, k).unwrap();
                    check_delta_rows(
                        &flat(&y),
                        &want,
                        &row_slot,
                        n,
                        tol(dtype),
                        &format!("{dtype:?} {path:?} M={m} N={n} K={k} slots {row_slot:?}"),
                    );
                }
            }
        }
    }
}

/// The tensor-core kernels of a decode batch on the same inputs: the default path (with 16-byte
/// aligned sign rows, the binary kernel where every group with a delta has one row, the int8
/// kernel where they have at most 2, else the bf16 kernel with 8 warps on small grids) and
/// `Bf16Path::Bf16` (the bf16 kernel with 4 warps). Aligned K (ceil(K/32) % 4 == 0: 100, 1000,
/// 4091, 4096, 11008) and others; one row per tenant for 32 tenants (the binary kernel with 2
/// feature tiles per warp), 2 rows per tenant, one tenant with 1 and 2 rows, base-only rows
/// (`tenant_case` leaves ~20% of rows on the base), and the `+ base` store. The binary and int8
/// kernels' own error (fixed-point x, 2^-16 of a row's largest |x|) is far below the bf16
/// rounding of the output, so all paths have the bf16 bound; the worst errors are printed.
#[test]
fn int8_and_bf16_decode_kernels_match_reference() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(11);
    let mut cases = Vec::new();
    for &k in &[33usize, 100, 1000, 4091, 4096] {
        for &n in &[3usize, 65, 300] {
            for (m, d) in [(1usize, 1usize), (2, 1), (5, 3), (6, 6), (17, 9)] {
                cases.push((m, n, k, d));
            }
        }
    }
    cases.push((32, 1100, 1000, 32));
    cases.push((32, 1100, 11008, 32));
    // One-row groups with enough blocks for 4 feature tiles: K in whole multiples of 4 chunks
    // (the 5-blocks-per-SM `t4_r1_w4`) and not (2 warps, `t4_r1_w2`), with awkward N and K.
    cases.push((32, 1100, 4096, 32));
    cases.push((24, 1500, 2040, 24));
    cases.push((32, 700, 3000, 32));
    cases.push((64, 300, 4096, 32));
    let mut worst = [0f64; 2];
    for (m, n, k, d) in cases {
        let (deltas, cpu_deltas, row_slot) = tenant_case(&mut rng, &dev, m, n, k, d);
        let refs: Vec<&SignDelta> = deltas.iter().collect();
        let (x, xr) = random_x(&mut rng, &[m, k], DType::BF16);
        let x = x.to_device(&dev).unwrap();
        let want = tenant_delta_matmul_ref(&xr, &row_slot, &cpu_deltas, n, k).unwrap();
        let (b, br) = random_x(&mut rng, &[m, n], DType::BF16);
        let b = b.to_device(&dev).unwrap();
        for (i, path) in [Bf16Path::TensorCore, Bf16Path::Bf16]
            .into_iter()
            .enumerate()
        {
            let what = format!("{path:?} M={m} N={n} K={k} D={d}");
            let err =
                check_product_and_add(&dev, &x, &b, &br, &row_slot, &refs, path, &want, &what);
            worst[i] = worst[i].max(err);
        }
    }
    println!(
        "worst relative errors: default path {:.1e}, bf16 kernel {:.1e}",
        worst[0], worst[1]
    );
}

/// Decode groups of 3-8 rows on the default path (with fewer than 8 tenants `ds_prep_bf16`, then
/// the bf16 kernel with one row tile; with 8 tenants, as in issue 5's 32 rows x 8 tenants, the
/// binary path: on compute capability 9.0 the warpgroup kernel `ds_wgb1_bf16_r4` / `_r8`, and
/// with `Bf16Path::BinaryMma`, as on other GPUs, `ds_tcb1_bf16_t1_r4` / `_r8` with its L2
/// prefetch at K >= 8192; and one case of 2-row groups on N >= 8192, `ds_tcb1` too): K % 8 == 0
/// and not (4091, 3050, 1002), x starting one element into its buffer, 1, 2 and 4 feature tiles
/// with 8 or 4 warps, groups of exactly 8 rows, base-only rows in their own group, awkward N, and
/// the `+ base` store; each against the f64 reference.
#[test]
fn decode_groups_of_3_to_8_rows_match_reference() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(12);
    // (rows, features, K, tenants); rows r % 5 == 4 stay on the base unless tenants = 4.
    let cases = [
        (32usize, 1100usize, 4096usize, 8usize),
        (32, 4000, 4088, 8),
        (8, 300, 4091, 1),
        (6, 65, 1002, 2),
        (17, 700, 3050, 3),
        (24, 2000, 11008, 6),
        (32, 500, 4096, 4),
        (32, 1500, 11008, 8),
        (64, 700, 9088, 8),
        // 2-row groups of 16 tenants on N >= 8192: the binary kernel (one-row and 3-8 row groups
        // of 8 tenants above, with and without its L2 prefetch at K >= 8192)
        (32, 8200, 1000, 16),
    ];
    let mut worst = 0f64;
    for (m, n, k, d) in cases {
        let (deltas, cpu_deltas, _) = tenant_case(&mut rng, &dev, 0, n, k, d);
        let row_slot: Vec<Option<u32>> = (0..m)
            .map(|r| (d == 4 || r % 5 != 4).then_some((r % d) as u32))
            .collect();
        let refs: Vec<&SignDelta> = deltas.iter().collect();
        // offset 1: x is a contiguous view starting one element into its buffer (2-byte aligned).
        for offset in [0usize, 1] {
            let (x, xr) = random_x(&mut rng, &[m * k + offset], DType::BF16);
            let x = x
                .to_device(&dev)
                .unwrap()
                .narrow(0, offset, m * k)
                .unwrap()
                .reshape((m, k))
                .unwrap();
            let xr = xr[offset..].to_vec();
            let want = tenant_delta_matmul_ref(&xr, &row_slot, &cpu_deltas, n, k).unwrap();
            let (b, br) = random_x(&mut rng, &[m, n], DType::BF16);
            let b = b.to_device(&dev).unwrap();
            // With 8 or more tenants (the binary path) also BinaryMma: on an H100 the default
            // path runs the warpgroup kernel for 3-8 rows per group, other GPUs ds_tcb1.
            let paths: &[Bf16Path] = if d >= 8 {
                &[Bf16Path::TensorCore, Bf16Path::BinaryMma]
            } else {
                &[Bf16Path::TensorCore]
            };
            for &path in paths {
                let what = format!("{path:?} M={m} N={n} K={k} D={d} offset {offset}");
                let err =
                    check_product_and_add(&dev, &x, &b, &br, &row_slot, &refs, path, &want, &what);
                worst = worst.max(err);
            }
        }
    }
    println!("worst relative error: {worst:.1e}");
}

#[test]
fn tenant_delta_matmul_many_rows_per_tenant_and_many_tenants() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(7);
    // 70 rows of one tenant (three groups), 40 tenants for 64 rows (more groups than a launch
    // takes), a prefill-sized batch of 600 rows over 5 tenants (more rows than a launch takes).
    for (m, n, k, num_deltas, all_one) in [
        (70, 65, 4096, 1, true),
        (128, 300, 1024, 40, false),
        (64, 300, 257, 40, false),
        (600, 65, 1000, 5, false),
    ] {
        let (deltas, cpu_deltas, mut row_slot) = tenant_case(&mut rng, &dev, m, n, k, num_deltas);
        if all_one {
            row_slot = vec![Some(0); m];
        }
        let refs: Vec<&SignDelta> = deltas.iter().collect();
        for dtype in [DType::BF16, DType::F32] {
            let (x, xr) = random_x(&mut rng, &[m, k], dtype);
            poison(&dev, m * n, dtype);
            let y = tenant_delta_matmul(&x.to_device(&dev).unwrap(), &row_slot, &refs).unwrap();
            let want = tenant_delta_matmul_ref(&xr, &row_slot, &cpu_deltas, n, k).unwrap();
            let err = rel_err(&flat(&y), &want);
            assert!(
                err < tol(dtype),
                "{dtype:?} M={m} N={n} K={k} D={num_deltas}: {err:.2e}"
            );
        }
    }
}

#[test]
fn tenant_delta_matmul_add_fuses_the_base_on_every_tensor_core_kernel() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(8);
    // One row (the int8 kernel on the default path), 17 rows of 3 tenants (the bf16 kernel), the
    // unaligned fallback (K = 257), and 40 tenants (two launches).
    for (m, n, k, num_deltas) in [
        (1, 65, 1000, 1),
        (17, 300, 4091, 3),
        (64, 65, 257, 3),
        (96, 130, 1024, 40),
    ] {
        let (deltas, cpu_deltas, row_slot) = tenant_case(&mut rng, &dev, m, n, k, num_deltas);
        let refs: Vec<&SignDelta> = deltas.iter().collect();
        let (x, xr) = random_x(&mut rng, &[m, k], DType::BF16);
        let (base, br) = random_x(&mut rng, &[m, n], DType::BF16);
        let delta = tenant_delta_matmul_ref(&xr, &row_slot, &cpu_deltas, n, k).unwrap();
        let want: Vec<f32> = br
            .iter()
            .zip(&delta)
            .map(|(b, d)| (f64::from(*b) + f64::from(*d)) as f32)
            .collect();
        let (x, base) = (x.to_device(&dev).unwrap(), base.to_device(&dev).unwrap());
        for path in [Bf16Path::TensorCore, Bf16Path::Bf16] {
            poison(&dev, m * n, DType::BF16);
            let y = tenant_delta_matmul_add_with(&base, &x, &row_slot, &refs, path).unwrap();
            let got = flat(&y);
            let err = rel_err(&got, &want);
            assert!(
                err < tol(DType::BF16),
                "{path:?} M={m} N={n} K={k}: {err:.2e}"
            );
            for (row, slot) in row_slot.iter().enumerate() {
                if slot.is_none() {
                    assert_eq!(
                        got[row * n..(row + 1) * n],
                        br[row * n..(row + 1) * n],
                        "{path:?}: base-only row {row} is not the base"
                    );
                }
            }
        }
        // The public op takes the fused default path.
        let y = deltaserve_kernels::tenant_delta_matmul_add(&base, &x, &row_slot, &refs).unwrap();
        assert!(rel_err(&flat(&y), &want) < tol(DType::BF16));
    }
}

#[test]
fn delta_linear_fused_matches_base_plus_reference_delta() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(9);
    let mut worst = 0f64;
    // Fused: M <= 32, K % 8 == 0 and ceil(K/32) % 4 == 0 (K = 1000, 4088, 128, 4096 + 128,
    // 11008: stages of 128 columns, the last one partial for 1000 and 4088), at most 8 groups
    // (7 tenants and base-only rows, 8 tenants of 4 interleaved rows, one group of 5 to 32 rows,
    // 1 to 4 n-tiles of 8 rows); N not a multiple of 32. Not fused (the fallback must agree): 32
    // one-row tenants, K = 257, M = 40.
    // The fused kernel rounds W + scale S to bf16 before the product (relative 2^-9 per weight,
    // ~1e-3 on the output, as a merged bf16 checkpoint): within the bf16 bound.
    // `all`: every row uses this slot (one group: the kernel without per-row group masks, 1 to 4
    // n-tiles, including a batch of base-only rows).
    type Case = (usize, usize, usize, usize, Option<Option<u32>>);
    let cases: [Case; 15] = [
        (1, 65, 1000, 1, None),
        (8, 300, 4088, 3, None),
        (32, 33, 128, 32, None),
        (32, 17, 1000, 5, None),
        (32, 300, 4096 + 128, 1, Some(Some(0))),
        (32, 1100, 1000, 7, None),
        (32, 97, 11008, 8, None),
        (9, 130, 4088, 4, None),
        (19, 70, 1000, 1, None),
        (5, 65, 257, 2, None),
        (40, 65, 1000, 3, None),
        (8, 65, 1000, 2, Some(Some(1))),
        (12, 33, 128, 1, Some(Some(0))),
        (19, 97, 4088, 1, Some(Some(0))),
        (5, 70, 1000, 1, Some(None)),
    ];
    for (m, n, k, num_deltas, all) in cases {
        let (deltas, cpu_deltas, mut row_slot) = tenant_case(&mut rng, &dev, m, n, k, num_deltas);
        if num_deltas == 32 {
            row_slot = (0..m as u32).map(Some).collect();
        }
        if num_deltas == 8 {
            // 8 tenants of 4 rows, interleaved as the bench's 32x8 mix (no base-only group).
            row_slot = (0..m as u32).map(|i| Some(i % 8)).collect();
        }
        if let Some(slot) = all {
            row_slot = vec![slot; m];
        }
        let refs: Vec<&SignDelta> = deltas.iter().collect();
        let (x, xr) = random_x(&mut rng, &[m, k], DType::BF16);
        let (w, wr) = random_base(&mut rng, n, k);
        let delta = tenant_delta_matmul_ref(&xr, &row_slot, &cpu_deltas, n, k).unwrap();
        let want = base_plus_delta_ref(&xr, &wr, &delta, m, n, k);
        let (xd, wd) = (x.to_device(&dev).unwrap(), w.to_device(&dev).unwrap());
        let fusable = fused_ok(&xd, &wd, &row_slot, &refs);
        let mut groups: Vec<Option<u32>> = row_slot.clone();
        groups.sort_unstable();
        groups.dedup();
        assert_eq!(
            fusable,
            k != 257 && m <= 32 && groups.len() <= 8,
            "M={m} K={k}"
        );
        // The routed op, then the fused kernel itself wherever it applies.
        let mut runs = vec![("delta_linear", {
            poison(&dev, m * n, DType::BF16);
            deltaserve_kernels::delta_linear(&xd, &wd, &row_slot, &refs).unwrap()
        })];
        if fusable {
            poison(&dev, m * n, DType::BF16);
            runs.push((
                "fused",
                delta_linear_fused(&xd, &wd, &row_slot, &refs).unwrap(),
            ));
        }
        for (what, y) in runs {
            assert_eq!(y.dims(), [m, n]);
            let err = rel_err(&flat(&y), &want);
            assert!(
                err < tol(DType::BF16),
                "{what} M={m} N={n} K={k} D={num_deltas} slots {row_slot:?}: {err:.2e}"
            );
            if what == "fused" {
                worst = worst.max(err);
            }
        }
    }
    println!("worst relative error of the fused kernel: {worst:.1e}");
}

/// A random `(n, k)` base weight in bf16 on the CPU, and its values as f32.
fn random_base(rng: &mut StdRng, n: usize, k: usize) -> (Tensor, Vec<f32>) {
    let wv: Vec<f32> = (0..n * k).map(|_| rng.gen_range(-0.05f32..0.05)).collect();
    let w = Tensor::from_vec(wv, (n, k), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let wr = flat(&w);
    (w, wr)
}

#[test]
fn delta_linear_overlapped_streams_match_reference_and_keep_base_rows() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(10);
    // Multi-tenant decode batches, which delta_linear runs as the base product on candle's stream
    // beside the delta product on the side stream: one row per tenant (int8 kernel), 4 rows per
    // tenant (bf16 kernel), base-only rows, K = 257 (unaligned bits: the `s` kernel), N not a
    // multiple of any tile, M = 32 (the limit). Each shape is called several times back to back
    // with fresh inputs and checked only afterwards, so that a buffer freed before the side stream
    // finished (and handed to the next call) would show as a wrong result.
    for (m, n, k, num_deltas, interleave) in [
        (8, 300, 4096, 8, true),
        (32, 97, 1000, 8, true),
        (32, 65, 4096 + 17, 32, true),
        (19, 130, 1000, 3, false),
        (5, 33, 257, 2, false),
        (32, 300, 4088, 5, false),
    ] {
        let mut runs = Vec::new();
        for call in 0..4 {
            let (deltas, cpu_deltas, mut row_slot) =
                tenant_case(&mut rng, &dev, m, n, k, num_deltas);
            if interleave {
                row_slot = (0..m as u32).map(|i| Some(i % num_deltas as u32)).collect();
            }
            if call == 3 {
                row_slot[0] = None; // at least one base-only row
            }
            let (x, xr) = random_x(&mut rng, &[m, k], DType::BF16);
            let (w, wr) = random_base(&mut rng, n, k);
            let (xd, wd) = (x.to_device(&dev).unwrap(), w.to_device(&dev).unwrap());
            let refs: Vec<&SignDelta> = deltas.iter().collect();
            poison(&dev, m * n, DType::BF16);
            let y = deltaserve_kernels::delta_linear(&xd, &wd, &row_slot, &refs).unwrap();
            let base = xd.matmul(&wd.t().unwrap()).unwrap();
            runs.push((y, base, xr, wr, cpu_deltas, row_slot, deltas));
        }
        for (y, base, xr, wr, cpu_deltas, row_slot, _deltas) in runs {
            assert_eq!(y.dims(), [m, n]);
            let delta = tenant_delta_matmul_ref(&xr, &row_slot, &cpu_deltas, n, k).unwrap();
            let want = base_plus_delta_ref(&xr, &wr, &delta, m, n, k);
            let got = flat(&y);
            let err = rel_err(&got, &want);
            assert!(
                err < tol(DType::BF16),
                "M={m} N={n} K={k} D={num_deltas} slots {row_slot:?}: {err:.2e}"
            );
            // A base-only row is the base product itself (plus an exact zero).
            let base = flat(&base);
            for (row, slot) in row_slot.iter().enumerate() {
                if slot.is_none() {
                    assert_eq!(
                        got[row * n..(row + 1) * n],
                        base[row * n..(row + 1) * n],
                        "M={m} N={n} K={k}: base-only row {row}"
                    );
                }
            }
        }
    }
}

#[test]
fn errors_name_the_misplaced_tensor() {
    let dev = gpu();
    let signs = SignBits::from_words(vec![0; 2], 2, 3, &Device::Cpu).unwrap();
    let x = Tensor::zeros((1, 3), DType::F32, &dev).unwrap();
    let e = sign_matmul_t(&x, &signs).unwrap_err().to_string();
    assert!(e.contains("sign words"), "{e}");
    let delta = SignDelta::new(signs, 1.0);
    let e = tenant_delta_matmul(&x, &[Some(1)], &[&delta])
        .unwrap_err()
        .to_string();
    assert!(e.contains("slot") || e.contains("sign words"), "{e}");
}

#[test]
fn delta_linear_fused_two_slot_ring_on_wide_outputs() {
    // One-tenant batches on the fused kernel with its 2-slot ring. `cuda::fused` takes 3 slots
    // wherever 8 warps fit, which the shapes above always leave room for (one block per SM); with
    // N > 32 x 132 features (more than one block per SM on an H100) the 3-slot ring would cost
    // warps and the launch takes 2 slots. 64-column stages: K = 1000 and 4088 end on a partial
    // stage. N is not a multiple of 32; the last case is base-only rows.
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(11);
    let mut worst = 0f64;
    let cases: [(usize, usize, usize, Option<u32>); 4] = [
        (32, 4300, 1000, Some(0)),
        (8, 4300, 4088, Some(0)),
        (1, 8500, 128, Some(0)),
        (19, 4300, 1000, None),
    ];
    for (m, n, k, slot) in cases {
        let (deltas, cpu_deltas, _) = tenant_case(&mut rng, &dev, m, n, k, 1);
        let row_slot = vec![slot; m];
        let refs: Vec<&SignDelta> = deltas.iter().collect();
        let (x, xr) = random_x(&mut rng, &[m, k], DType::BF16);
        let (w, wr) = random_base(&mut rng, n, k);
        let delta = tenant_delta_matmul_ref(&xr, &row_slot, &cpu_deltas, n, k).unwrap();
        let want = base_plus_delta_ref(&xr, &wr, &delta, m, n, k);
        let (xd, wd) = (x.to_device(&dev).unwrap(), w.to_device(&dev).unwrap());
        assert!(fused_ok(&xd, &wd, &row_slot, &refs), "M={m} N={n} K={k}");
        poison(&dev, m * n, DType::BF16);
        let y = deltaserve_kernels::delta_linear(&xd, &wd, &row_slot, &refs).unwrap();
        assert_eq!(y.dims(), [m, n]);
        let err = rel_err(&flat(&y), &want);
        assert!(
            err < tol(DType::BF16),
            "M={m} N={n} K={k} slot {slot:?}: {err:.2e}"
        );
        worst = worst.max(err);
    }
    println!("worst relative error of the fused kernel, 2-slot ring: {worst:.1e}");
}
