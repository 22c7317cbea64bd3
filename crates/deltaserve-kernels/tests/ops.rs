//! The candle ops: forward against the reference for every input dtype and layout, gradients
//! against autograd through a dense `x.matmul(Sᵀ)` and against finite differences.

use candle_core::{DType, Device, Tensor, Var};
use deltaserve_kernels::reference::{
    base_plus_delta_ref, sign_matmul_t_ref, tenant_delta_matmul_ref, unpack_to_f32,
};
use deltaserve_kernels::{
    delta_linear, sign_matmul_n, sign_matmul_t, tenant_delta_matmul, tenant_delta_matmul_add,
    words_per_row, SignBits, SignDelta,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Relative error allowed for `f32` inputs (see `matches_reference.rs` for why 1e-5).
const F32_TOL: f64 = 1e-5;
/// For `bf16`/`f16` inputs the output is rounded to 8 (11) mantissa bits: 2⁻⁸ ≈ 4e-3 relative per
/// element.
const HALF_TOL: f64 = 1e-2;

fn random_signs(rng: &mut StdRng, n: usize, k: usize) -> (Vec<u32>, SignBits) {
    let words: Vec<u32> = (0..n * words_per_row(k)).map(|_| rng.gen()).collect();
    let bits = SignBits::from_words(words.clone(), n, k, &Device::Cpu).unwrap();
    (words, bits)
}

fn random_tensor(rng: &mut StdRng, dims: &[usize]) -> Tensor {
    let len = dims.iter().product();
    let v: Vec<f32> = (0..len).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let d: f64 = a
        .iter()
        .zip(b)
        .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
        .sum();
    let r: f64 = b.iter().map(|b| f64::from(*b).powi(2)).sum();
    (d / r).sqrt()
}

/// `S` as a dense `(N, K)` tensor of ±1.
fn dense(words: &[u32], n: usize, k: usize) -> Tensor {
    Tensor::from_vec(unpack_to_f32(words, n, k), (n, k), &Device::Cpu).unwrap()
}

#[test]
fn sign_matmul_t_op_matches_reference_every_dtype() {
    let mut rng = StdRng::seed_from_u64(10);
    let (n, k) = (65, 100);
    let (words, signs) = random_signs(&mut rng, n, k);
    // (B, T, K) input: leading dimensions are batch dimensions.
    let x = random_tensor(&mut rng, &[2, 3, k]);
    for (dtype, tol) in [
        (DType::F32, F32_TOL),
        (DType::BF16, HALF_TOL),
        (DType::F16, HALF_TOL),
    ] {
        let xd = x.to_dtype(dtype).unwrap();
        let y = sign_matmul_t(&xd, &signs).unwrap();
        assert_eq!(y.dims(), [2, 3, n]);
        assert_eq!(y.dtype(), dtype);
        let reference = sign_matmul_t_ref(&flat(&xd), &words, n, k);
        let err = rel_err(&flat(&y), &reference);
        assert!(err < tol, "{dtype:?}: relative error {err:.2e}");
    }
}

#[test]
fn sign_matmul_t_op_gathers_strided_inputs() {
    let mut rng = StdRng::seed_from_u64(11);
    let (n, k) = (3, 33);
    let (words, signs) = random_signs(&mut rng, n, k);
    // A transposed (K, 5) tensor is a non-contiguous (5, K) view; a narrowed one has an offset.
    let xt = random_tensor(&mut rng, &[k, 5]).t().unwrap();
    let xn = random_tensor(&mut rng, &[7, k]).narrow(0, 2, 4).unwrap();
    for x in [xt, xn] {
        assert!(!x.is_contiguous() || x.layout().start_offset() > 0);
        let y = sign_matmul_t(&x, &signs).unwrap();
        let reference = sign_matmul_t_ref(&flat(&x), &words, n, k);
        assert!(rel_err(&flat(&y), &reference) < F32_TOL);
    }
}

/// Autograd through `sign_matmul_t` gives the same `dL/dx` and `dL/ds` as through a dense
/// `x.matmul(Sᵀ)`, for a loss with two delta layers in a row (the trainer's situation).
#[test]
fn gradient_reaches_x_and_scale_through_sign_matmul_t() {
    let mut rng = StdRng::seed_from_u64(12);
    let (k, h, n) = (37, 65, 9);
    let (w1, s1) = random_signs(&mut rng, h, k);
    let (w2, s2) = random_signs(&mut rng, n, h);
    let x0 = random_tensor(&mut rng, &[2, 3, k]);
    let target = random_tensor(&mut rng, &[2, 3, n]);

    let run = |packed: bool| {
        let x = Var::from_tensor(&x0).unwrap();
        let scale = Var::new(&[0.7f32], &Device::Cpu).unwrap();
        let layer = |x: &Tensor, words: &[u32], signs: &SignBits, rows: usize, cols: usize| {
            let y = if packed {
                sign_matmul_t(x, signs).unwrap()
            } else {
                x.broadcast_matmul(&dense(words, rows, cols).t().unwrap())
                    .unwrap()
            };
            y.broadcast_mul(scale.as_tensor()).unwrap()
        };
        let hidden = layer(x.as_tensor(), &w1, &s1, h, k).tanh().unwrap();
        let out = layer(&hidden, &w2, &s2, n, h);
        let loss = (out - &target).unwrap().sqr().unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let gx = grads.get(x.as_tensor()).expect("no gradient for x").clone();
        let gs = grads
            .get(scale.as_tensor())
            .expect("no gradient for the scale")
            .clone();
        (flat(&gx), flat(&gs))
    };
    let (gx, gs) = run(true);
    let (gx_dense, gs_dense) = run(false);
    assert!(gx.iter().any(|v| *v != 0.0), "gradient for x is zero");
    assert!(
        rel_err(&gx, &gx_dense) < 1e-5,
        "dL/dx: {:.2e}",
        rel_err(&gx, &gx_dense)
    );
    assert!(
        rel_err(&gs, &gs_dense) < 1e-5,
        "dL/ds: {gs:?} vs {gs_dense:?}"
    );
}

/// Central differences of `L(x) = Σ r ⊙ tanh(x · Sᵀ)` against the gradient autograd gives.
#[test]
fn sign_matmul_t_gradient_matches_finite_differences() {
    let mut rng = StdRng::seed_from_u64(13);
    let (m, k, n) = (2, 7, 3);
    let (_, signs) = random_signs(&mut rng, n, k);
    let x0 = random_tensor(&mut rng, &[m, k])
        .to_dtype(DType::F64)
        .unwrap();
    let r = random_tensor(&mut rng, &[m, n]);
    // The op computes in f32; the loss around it is in f64 so the difference quotient is clean.
    let loss = |x: &Tensor| -> Tensor {
        let y = sign_matmul_t(&x.to_dtype(DType::F32).unwrap(), &signs).unwrap();
        let y = (y.to_dtype(DType::F64).unwrap() * 0.1)
            .unwrap()
            .tanh()
            .unwrap();
        (y * r.to_dtype(DType::F64).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let x = Var::from_tensor(&x0).unwrap();
    let grad = flat(
        loss(x.as_tensor())
            .backward()
            .unwrap()
            .get(x.as_tensor())
            .unwrap(),
    );
    let base: Vec<f64> = x0.flatten_all().unwrap().to_vec1().unwrap();
    let eps = 1e-2;
    for (i, g) in grad.iter().enumerate() {
        let at = |d: f64| {
            let mut v = base.clone();
            v[i] += d;
            loss(&Tensor::from_vec(v, (m, k), &Device::Cpu).unwrap())
                .to_scalar::<f64>()
                .unwrap()
        };
        let fd = (at(eps) - at(-eps)) / (2.0 * eps);
        assert!(
            (fd - f64::from(*g)).abs() < 1e-4 * (1.0 + fd.abs()),
            "dL/dx[{i}]: autograd {g}, finite difference {fd}"
        );
    }
}

/// `sign_matmul_n` is the adjoint of `sign_matmul_t`: ⟨x·Sᵀ, g⟩ = ⟨x, g·S⟩.
#[test]
fn sign_matmul_n_is_the_adjoint_of_sign_matmul_t() {
    let mut rng = StdRng::seed_from_u64(14);
    let (m, k, n) = (5, 257, 65);
    let (_, signs) = random_signs(&mut rng, n, k);
    let x = random_tensor(&mut rng, &[m, k]);
    let g = random_tensor(&mut rng, &[m, n]);
    let lhs = (sign_matmul_t(&x, &signs).unwrap() * &g)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let rhs = (sign_matmul_n(&g, &signs).unwrap() * &x)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        (lhs - rhs).abs() < 1e-3 * lhs.abs().max(1.0),
        "{lhs} vs {rhs}"
    );
    // And its own gradient is sign_matmul_t (second-order use).
    let gv = Var::from_tensor(&g).unwrap();
    let loss = (sign_matmul_n(gv.as_tensor(), &signs).unwrap() * &x)
        .unwrap()
        .sum_all()
        .unwrap();
    let grad = flat(loss.backward().unwrap().get(gv.as_tensor()).unwrap());
    assert!(rel_err(&grad, &flat(&sign_matmul_t(&x, &signs).unwrap())) < F32_TOL);
}

#[test]
fn tenant_delta_matmul_op_matches_reference_mixed_slots() {
    let mut rng = StdRng::seed_from_u64(15);
    let (n, k) = (65, 100);
    let deltas: Vec<SignDelta> = [0.25f32, -1.5, 0.01]
        .iter()
        .map(|s| SignDelta::new(random_signs(&mut rng, n, k).1, *s))
        .collect();
    let refs: Vec<&SignDelta> = deltas.iter().collect();
    let row_slot = [Some(2), None, Some(0), Some(2), Some(2), None, Some(0)];
    let x = random_tensor(&mut rng, &[row_slot.len(), k]);
    for (dtype, tol) in [(DType::F32, F32_TOL), (DType::BF16, HALF_TOL)] {
        let xd = x.to_dtype(dtype).unwrap();
        let y = tenant_delta_matmul(&xd, &row_slot, &refs).unwrap();
        assert_eq!((y.dims(), y.dtype()), (&[row_slot.len(), n][..], dtype));
        let reference = tenant_delta_matmul_ref(&flat(&xd), &row_slot, &deltas, n, k).unwrap();
        let err = rel_err(&flat(&y), &reference);
        assert!(err < tol, "{dtype:?}: relative error {err:.2e}");
    }
}

#[test]
fn tenant_delta_matmul_add_is_base_plus_the_reference_delta() {
    let mut rng = StdRng::seed_from_u64(17);
    let (n, k) = (65, 100);
    let deltas: Vec<SignDelta> = [0.25f32, -1.5]
        .iter()
        .map(|s| SignDelta::new(random_signs(&mut rng, n, k).1, *s))
        .collect();
    let refs: Vec<&SignDelta> = deltas.iter().collect();
    let row_slot = [Some(1), None, Some(0), Some(1)];
    let x = random_tensor(&mut rng, &[row_slot.len(), k]);
    let base = random_tensor(&mut rng, &[row_slot.len(), n]);
    let delta = tenant_delta_matmul_ref(&flat(&x), &row_slot, &deltas, n, k).unwrap();
    // Independent sum in f64: base + reference delta.
    let want: Vec<f32> = flat(&base)
        .iter()
        .zip(&delta)
        .map(|(b, d)| (f64::from(*b) + f64::from(*d)) as f32)
        .collect();
    let y = tenant_delta_matmul_add(&base, &x, &row_slot, &refs).unwrap();
    let err = rel_err(&flat(&y), &want);
    assert!(err < F32_TOL, "relative error {err:.2e}");
    // Base-only row 1 is the base itself.
    assert_eq!(flat(&y)[n..2 * n], flat(&base)[n..2 * n]);
    let wrong = random_tensor(&mut rng, &[row_slot.len(), n + 1]);
    let err = tenant_delta_matmul_add(&wrong, &x, &row_slot, &refs)
        .unwrap_err()
        .to_string();
    assert!(err.contains("base is") && err.contains("66"), "{err}");
}

#[test]
fn delta_linear_is_the_base_product_plus_the_delta() {
    let mut rng = StdRng::seed_from_u64(18);
    let (n, k) = (33, 70);
    let deltas: Vec<SignDelta> = [0.5f32, -0.125]
        .iter()
        .map(|s| SignDelta::new(random_signs(&mut rng, n, k).1, *s))
        .collect();
    let refs: Vec<&SignDelta> = deltas.iter().collect();
    let row_slot = [None, Some(0), Some(1), Some(0)];
    let m = row_slot.len();
    let x = random_tensor(&mut rng, &[m, k]);
    let w = random_tensor(&mut rng, &[n, k]);
    let (xs, ws) = (flat(&x), flat(&w));
    let delta = tenant_delta_matmul_ref(&xs, &row_slot, &deltas, n, k).unwrap();
    // x · Wᵀ in f64 loops, independent of candle's matmul.
    let want = base_plus_delta_ref(&xs, &ws, &delta, m, n, k);
    let y = delta_linear(&x, &w, &row_slot, &refs).unwrap();
    let err = rel_err(&flat(&y), &want);
    assert!(err < F32_TOL, "relative error {err:.2e}");
    let err = delta_linear(&x, &w.narrow(0, 0, n - 1).unwrap(), &row_slot, &refs)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("w_base [32, 70]") && err.contains("[33, 70]"),
        "{err}"
    );
}

#[test]
fn ops_reject_mismatched_shapes_with_a_message() {
    let mut rng = StdRng::seed_from_u64(16);
    let (_, signs) = random_signs(&mut rng, 3, 33);
    let delta = SignDelta::new(signs.clone(), 1.0);
    let x = random_tensor(&mut rng, &[2, 32]);
    let err = sign_matmul_t(&x, &signs).unwrap_err().to_string();
    assert!(
        err.contains("last dim") && err.contains("33") && err.contains("32"),
        "{err}"
    );
    let x = random_tensor(&mut rng, &[2, 33]);
    let err = tenant_delta_matmul(&x, &[Some(0), Some(3)], &[&delta])
        .unwrap_err()
        .to_string();
    assert!(err.contains("row 1 uses slot 3"), "{err}");
    let err = tenant_delta_matmul(&x, &[None], &[&delta])
        .unwrap_err()
        .to_string();
    assert!(err.contains("row_slot has 1 entries"), "{err}");
    let other = SignDelta::new(random_signs(&mut rng, 4, 33).1, 1.0);
    let err = tenant_delta_matmul(&x, &[Some(0), None], &[&delta, &other])
        .unwrap_err()
        .to_string();
    assert!(err.contains("delta 1 is [4, 33]"), "{err}");
    let words = Tensor::zeros((3, 1), DType::U32, &Device::Cpu).unwrap();
    let err = SignBits::new(words, 3, 33).unwrap_err().to_string();
    assert!(err.contains("[3, 2]"), "{err}");
}

#[test]
fn sign_matmul_ops_take_f64_and_match_a_dense_product() {
    // f64 exists for gradient checks by finite differences on whole models (deltaserve-train).
    let mut rng = StdRng::seed_from_u64(14);
    let (n, k) = (5, 37);
    let (words, signs) = random_signs(&mut rng, n, k);
    let s = dense(&words, n, k).to_dtype(DType::F64).unwrap();
    let x = random_tensor(&mut rng, &[3, k])
        .to_dtype(DType::F64)
        .unwrap();
    let y = sign_matmul_t(&x, &signs).unwrap();
    assert_eq!(y.dtype(), DType::F64);
    let want = x.matmul(&s.t().unwrap()).unwrap();
    let diff = (y - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(diff < 1e-12, "sign_matmul_t f64: max abs diff {diff:e}");
    let g = random_tensor(&mut rng, &[3, n])
        .to_dtype(DType::F64)
        .unwrap();
    let back = sign_matmul_n(&g, &signs).unwrap();
    let want = g.matmul(&s).unwrap();
    let diff = (back - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(diff < 1e-12, "sign_matmul_n f64: max abs diff {diff:e}");
}

/// `SignBits::for_serving` (the interleaved layout on an AVX-512 CPU) is the same matrix: every op
/// gives the reference's products on it, `g · S` and the `f64` path give exactly what the row-major
/// bits give, and the words come back row-major. Shapes cover a short last group of 16 rows,
/// exactly one group, and K past a word boundary.
#[test]
fn serving_layout_gives_the_same_products() {
    use deltaserve_kernels::cpu::SimdLevel;
    use deltaserve_kernels::SignLayout;
    let mut rng = StdRng::seed_from_u64(19);
    for (n, k) in [(65, 100), (16, 32), (300, 1000), (5, 33)] {
        let (words, rm) = random_signs(&mut rng, n, k);
        let sv = SignBits::for_serving(words.clone(), n, k, &Device::Cpu).unwrap();
        let want_layout = if SimdLevel::detect() == SimdLevel::Avx512 {
            SignLayout::Interleaved
        } else {
            SignLayout::RowMajor
        };
        assert_eq!(sv.layout(), want_layout);
        assert_eq!(sv.to_host_words().unwrap(), words, "{n}x{k}");

        let x = random_tensor(&mut rng, &[3, k]);
        let y = sign_matmul_t(&x, &sv).unwrap();
        let reference = sign_matmul_t_ref(&flat(&x), &words, n, k);
        assert!(rel_err(&flat(&y), &reference) < F32_TOL, "{n}x{k} x·Sᵀ");
        let x64 = x.to_dtype(DType::F64).unwrap();
        let (a, b) = (
            sign_matmul_t(&x64, &sv).unwrap(),
            sign_matmul_t(&x64, &rm).unwrap(),
        );
        assert_eq!(flat(&a), flat(&b), "{n}x{k} f64 x·Sᵀ");

        let g = random_tensor(&mut rng, &[2, n]);
        let (a, b) = (
            sign_matmul_n(&g, &sv).unwrap(),
            sign_matmul_n(&g, &rm).unwrap(),
        );
        assert_eq!(flat(&a), flat(&b), "{n}x{k} g·S");

        // A batch mixing both layouts: base-only rows, two rows of the interleaved delta.
        let deltas = [
            SignDelta::new(sv.clone(), 0.5),
            SignDelta::new(rm.clone(), -2.0),
        ];
        let refs: Vec<&SignDelta> = deltas.iter().collect();
        let row_slot = [Some(0), None, Some(1), Some(0)];
        let x = random_tensor(&mut rng, &[row_slot.len(), k]);
        let y = tenant_delta_matmul(&x, &row_slot, &refs).unwrap();
        let reference = tenant_delta_matmul_ref(&flat(&x), &row_slot, &deltas, n, k).unwrap();
        let err = rel_err(&flat(&y), &reference);
        assert!(err < F32_TOL, "{n}x{k} tenants: relative error {err:.2e}");
    }
}
