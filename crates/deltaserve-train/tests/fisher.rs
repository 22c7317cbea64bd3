//! The diagonal empirical Fisher (`deltaserve_train::fisher`, LQ-LoRA arXiv 2311.12023 §3.3:
//! F_ij = (1/D) Σ_d (∂ℓ_d/∂W_ij)², ℓ_d the mean next-token NLL of window d, D the windows of at
//! least two tokens) against central finite differences of that loss, in f64 on a tiny random
//! Llama, for a few weights of every projection. The loss in the reference is written here in
//! plain f64 (log-sum-exp over the logits of the ordinary, non-differentiable forward), so the
//! check shares neither the loss code nor the backward pass with the code under test.

use candle_core::{DType, Device, Tensor};
use deltaserve_model::random::{RandomCheckpoint, RandomShape};
use deltaserve_model::{Checkpoint, ForwardOptions, LogitsWanted, Model, Proj, SeqInput};
use deltaserve_train::fisher::empirical_fisher;

/// Central-difference step. Truncation error ≈ h²/6 · |∂³ℓ| ≈ 1e-11 relative, rounding
/// ≈ ε_f64 · |ℓ| / h ≈ 1e-12 absolute on gradients of size 1e-4 to 1e-1.
const H: f64 = 1e-5;

/// Allowed relative error of each Fisher value against the finite-difference one. The code
/// under test keeps its Var and accumulates in f32 (≈ 1e-7 relative per squared gradient); the
/// reference is good to ≈ 1e-8 relative. 1e-5 leaves a margin of 100 and is still 100 times
/// tighter than the smallest corruption the test shows it catches (a 1e-3 error in a gradient).
const REL_TOL: f64 = 1e-5;

/// Absolute floor for Fisher values that are (near) zero: a gradient of 1e-9 squared.
const ABS_TOL: f64 = 1e-18;

fn tiny_model(dir: &std::path::Path) -> Model {
    RandomCheckpoint {
        shape: RandomShape {
            hidden: 32,
            intermediate: 48,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            vocab: 64,
            max_positions: 64,
        },
        bf16: false,
        seed: 7,
        finetune_of: None,
        max_shard_bytes: usize::MAX,
        tokenizer_from: None,
    }
    .write(dir)
    .unwrap();
    // f32 weights loaded as f64 are exact, so the code under test (which keeps an f32 Var) and
    // the reference see the same weights.
    Model::load(&Checkpoint::open(dir).unwrap(), DType::F64, &Device::Cpu).unwrap()
}

/// Mean −log p(w[i+1] | w[..=i]) over the window, computed in f64 from the logits.
fn window_loss(model: &Model, w: &[u32]) -> f64 {
    let logits = model
        .forward(
            &mut [SeqInput {
                tokens: w,
                cache: None,
                tenant: None,
                logits: LogitsWanted::All,
            }],
            ForwardOptions::default(),
        )
        .unwrap()
        .remove(0)
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    let mut nll = 0f64;
    for (row, &target) in logits.iter().zip(&w[1..]) {
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
        nll += lse - row[target as usize];
    }
    nll / (w.len() - 1) as f64
}

/// `model` with weight `[r, c]` of layer `l`'s projection `p` moved by `by`.
fn nudged(model: &Model, l: usize, p: Proj, r: usize, c: usize, by: f64) -> Model {
    let mut m = model.clone();
    let lin = &mut m.layers[l].linears[p.index()];
    let (rows, cols) = lin.weight.dims2().unwrap();
    let mut v: Vec<f64> = lin.weight.flatten_all().unwrap().to_vec1().unwrap();
    v[r * cols + c] += by;
    lin.weight = Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap();
    m
}

/// One checked weight: where it is, and the finite-difference Fisher value there.
struct Probe {
    name: String,
    index: usize,
    reference: f64,
}

/// The largest of |F − F_fd| / (REL_TOL · F_fd + ABS_TOL) over the probes, where `fisher` looks
/// up the value the code under test gives the probe: ≤ 1 means every probe passes.
fn worst(probes: &[Probe], fisher: impl Fn(&Probe) -> f64) -> f64 {
    probes
        .iter()
        .map(|p| (fisher(p) - p.reference).abs() / (REL_TOL * p.reference + ABS_TOL))
        .fold(0f64, f64::max)
}

#[test]
fn empirical_fisher_equals_squared_finite_difference_gradients() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    // Three windows of different lengths, and one of a single token, which predicts nothing and
    // must not count in D.
    let windows: Vec<Vec<u32>> = vec![
        (0..9).map(|t| (t * 7 + 3) % 64).collect(),
        (0..6).map(|t| (t * 13 + 5) % 64).collect(),
        (0..12).map(|t| (t * 29 + 1) % 64).collect(),
        vec![42],
    ];
    let est = empirical_fisher(&model, &windows, |_| {}).unwrap();
    assert_eq!(est.windows, 3);
    assert_eq!(est.predictions, 8 + 5 + 11);
    assert_eq!(est.per_weight.len(), 2 * Proj::ALL.len());

    let usable: Vec<&Vec<u32>> = windows.iter().filter(|w| w.len() >= 2).collect();
    let mut probes = Vec::new();
    for l in 0..2 {
        for p in Proj::ALL {
            let (rows, cols) = model.layers[l].linears[p.index()].weight.dims2().unwrap();
            let name = format!("model.layers.{l}.{}.weight", p.module());
            assert_eq!(est.per_weight[&name].len(), rows * cols, "{name}");
            for (r, c) in [(0, 0), (rows - 1, cols - 1), (rows / 2 + 1, cols / 3)] {
                let plus = nudged(&model, l, p, r, c, H);
                let minus = nudged(&model, l, p, r, c, -H);
                let reference = usable
                    .iter()
                    .map(|w| {
                        let g = (window_loss(&plus, w) - window_loss(&minus, w)) / (2.0 * H);
                        g * g
                    })
                    .sum::<f64>()
                    / usable.len() as f64;
                assert!(
                    reference > 1e-14,
                    "{name}[{r},{c}]: no gradient to check ({reference:e})"
                );
                probes.push(Probe {
                    name: name.clone(),
                    index: r * cols + c,
                    reference,
                });
            }
        }
    }
    let value = |p: &Probe| f64::from(est.per_weight[&p.name][p.index]);
    let err = worst(&probes, value);
    eprintln!(
        "{} probes; worst error {err:.3} of the tolerance",
        probes.len()
    );
    assert!(
        err <= 1.0,
        "Fisher off the finite differences: {err} x tolerance"
    );

    // The check is tight enough to catch a wrong gradient: one 0.1% too large (Fisher 0.2%), or
    // the gradient of the neighbouring weight, or a sum over windows instead of the mean.
    assert!(worst(&probes, |p| value(p) * 1.001f64.powi(2)) > 1.0);
    assert!(
        worst(&probes, |p| {
            let v = &est.per_weight[&p.name];
            f64::from(v[(p.index + 1) % v.len()])
        }) > 1.0
    );
    assert!(worst(&probes, |p| value(p) * 3.0) > 1.0);
}
