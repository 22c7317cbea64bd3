//! Tenants in one batch: each sequence's result equals running it alone, and a sign delta applied
//! on the fly equals the same delta merged into dense weights.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{max_abs, max_abs_diff, model_dir};
use deltaserve_kernels::SignBits;
use deltaserve_model::{
    Checkpoint, ForwardOptions, LinearDelta, LogitsWanted, Model, Proj, SeqInput, TenantWeights,
};
use rand::{Rng, SeedableRng};

fn model() -> Model {
    let ckpt = Checkpoint::open(model_dir("llama")).unwrap();
    Model::load(&ckpt, DType::F32, &common::device()).unwrap()
}

/// A tenant with random sign deltas on every projection, a dense delta on one, and its own norm.
fn random_tenant(model: &Model, seed: u64) -> TenantWeights {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut t = TenantWeights::empty(model.layers.len());
    for (l, layer) in model.layers.iter().enumerate() {
        for p in Proj::ALL {
            let (n, k) = layer.linears[p.index()].weight.dims2().unwrap();
            let words: Vec<u32> = (0..n * k.div_ceil(32))
                .map(|i| {
                    let w: u32 = rng.gen();
                    // Keep padding bits zero, as the format requires.
                    let used = k - 32 * (i % k.div_ceil(32));
                    if used < 32 {
                        w & ((1u32 << used) - 1)
                    } else {
                        w
                    }
                })
                .collect();
            let bits = SignBits::from_words(words, n, k, &m_dev(model)).unwrap();
            let scale = Tensor::new(&[0.01f32 + 0.01 * rng.gen::<f32>()], &m_dev(model)).unwrap();
            t.layers[l].linears[p.index()] = Some(LinearDelta::Sign { bits, scale });
        }
        t.layers[l].input_layernorm = Some((layer.input_layernorm.clone() * 1.1).unwrap());
        if l == 0 {
            let (n, k) = layer.linears[Proj::Up.index()].weight.dims2().unwrap();
            let diff = Tensor::randn(0f32, 0.02, (n, k), &m_dev(model)).unwrap();
            t.layers[l].linears[Proj::Up.index()] = Some(LinearDelta::Dense { diff });
            // A rank-3 difference on down_proj: the forward applies it without expanding it.
            let (n, k) = layer.linears[Proj::Down.index()].weight.dims2().unwrap();
            let down = Tensor::randn(0f32, 0.1, (3, k), &m_dev(model)).unwrap();
            let up = Tensor::randn(0f32, 0.1, (n, 3), &m_dev(model)).unwrap();
            t.layers[l].linears[Proj::Down.index()] = Some(LinearDelta::LowRank { down, up });
        }
    }
    t.norm = Some((model.norm.clone() * 0.9).unwrap());
    t
}

/// The same tenant folded into dense weights: W + s·S (or W + diff), norms replaced.
fn merged(model: &Model, t: &TenantWeights) -> Model {
    let mut m = model.clone();
    for (l, layer) in m.layers.iter_mut().enumerate() {
        for p in Proj::ALL {
            let lin = &mut layer.linears[p.index()];
            match &t.layers[l].linears[p.index()] {
                Some(LinearDelta::Sign { bits, scale }) => {
                    let (n, k) = (bits.n(), bits.k());
                    let signs = deltaserve_kernels::reference::unpack_to_f32(
                        &bits.to_host_words().unwrap(),
                        n,
                        k,
                    );
                    let s = Tensor::from_vec(signs, (n, k), &m_dev(model)).unwrap();
                    lin.weight = (&lin.weight + s.broadcast_mul(scale).unwrap()).unwrap();
                }
                Some(LinearDelta::Dense { diff }) => lin.weight = (&lin.weight + diff).unwrap(),
                Some(LinearDelta::LowRank { down, up }) => {
                    lin.weight = (&lin.weight + up.matmul(down).unwrap()).unwrap()
                }
                None => {}
            }
        }
        if let Some(w) = &t.layers[l].input_layernorm {
            layer.input_layernorm = w.clone();
        }
    }
    if let Some(n) = &t.norm {
        m.norm = n.clone();
    }
    m
}

fn run(model: &Model, tokens: &[u32], tenant: Option<&TenantWeights>) -> Tensor {
    let mut s = [SeqInput {
        tokens,
        cache: None,
        tenant,
        logits: LogitsWanted::All,
    }];
    model
        .forward(&mut s, ForwardOptions::default())
        .unwrap()
        .remove(0)
}

#[test]
fn sign_delta_on_the_fly_equals_merged_weights() {
    let m = model();
    let t = random_tenant(&m, 1);
    let ids: Vec<u32> = (0..11).map(|i| (i * 31 + 7) % 500).collect();
    let fly = run(&m, &ids, Some(&t));
    let dense = run(&merged(&m, &t), &ids, None);
    let diff = max_abs_diff(&fly, &dense);
    assert!(
        diff <= 1e-5 * max_abs(&dense).max(1.0),
        "on the fly vs merged: {diff}"
    );
    // And the delta changes something: base logits differ.
    assert!(max_abs_diff(&fly, &run(&m, &ids, None)) > 1e-3);
}

#[test]
fn mixed_tenant_batch_equals_each_sequence_alone() {
    let m = model();
    let t1 = random_tenant(&m, 2);
    let t2 = random_tenant(&m, 3);
    let seqs: Vec<(Vec<u32>, Option<&TenantWeights>)> = vec![
        ((0..9).map(|i| (i * 13 + 1) % 500).collect(), Some(&t1)),
        ((0..5).map(|i| (i * 7 + 3) % 500).collect(), None),
        ((0..12).map(|i| (i * 29 + 11) % 500).collect(), Some(&t2)),
        ((0..3).map(|i| (i * 5 + 2) % 500).collect(), Some(&t1)),
    ];
    let mut inputs: Vec<SeqInput> = seqs
        .iter()
        .map(|(ids, t)| SeqInput {
            tokens: ids,
            cache: None,
            tenant: *t,
            logits: LogitsWanted::All,
        })
        .collect();
    let batched = m.forward(&mut inputs, ForwardOptions::default()).unwrap();
    for ((ids, t), got) in seqs.iter().zip(&batched) {
        let alone = run(&m, ids, *t);
        let diff = max_abs_diff(got, &alone);
        assert!(
            diff <= 1e-5 * max_abs(&alone).max(1.0),
            "batched vs alone: {diff}"
        );
    }
}

fn m_dev(m: &Model) -> Device {
    m.device().clone()
}

/// `LayerwiseForward::layer_observed`, chained from `embed`, sees every projection input that a
/// whole `forward_observed` sees, bit for bit: a layer-by-layer calibration can keep each layer's
/// input instead of running the layers before it again.
#[test]
fn layer_observed_chain_matches_forward_observed() {
    let model = model();
    let tenant = random_tenant(&model, 7);
    let tokens: Vec<u32> = (0..11).map(|i| (i * 37 + 5) % 200).collect();
    let mut whole: Vec<(usize, Proj, Vec<f32>)> = Vec::new();
    let mut seqs = [SeqInput {
        tokens: &tokens,
        cache: None,
        tenant: Some(&tenant),
        logits: LogitsWanted::Last,
    }];
    model
        .forward_observed(&mut seqs, Default::default(), &mut |l, p, x| {
            whole.push((l, p, common::host(x)))
        })
        .unwrap();
    let lw = model.layerwise(&[&tokens]).unwrap();
    let mut chained: Vec<(usize, Proj, Vec<f32>)> = Vec::new();
    let mut x = lw.embed(Some(&tenant)).unwrap();
    for l in 0..model.layers.len() {
        x = lw
            .layer_observed(l, &x, Some(&tenant), &mut |l, p, x| {
                chained.push((l, p, common::host(x)))
            })
            .unwrap();
    }
    assert_eq!(whole.len(), Proj::ALL.len() * model.layers.len());
    assert_eq!(chained.len(), whole.len());
    for (a, b) in whole.iter().zip(&chained) {
        assert_eq!((a.0, a.1), (b.0, b.1));
        assert_eq!(a.2, b.2, "layer {} {:?}: inputs differ", a.0, a.1);
    }
}
