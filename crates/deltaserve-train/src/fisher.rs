//! The diagonal empirical Fisher of a base model's projection weights.
//!
//! LQ-LoRA (arXiv 2311.12023, §3.3) weights each weight's reconstruction error by
//! F_ij = (1/D) Σ_d (∂ℓ(x_d)/∂W_ij)², the squared gradient of the causal-LM loss of calibration
//! sequence x_d, averaged over the D sequences (one gradient per sequence, as their reference
//! computes it with batch size 1). [`empirical_fisher`] turns every attention and MLP projection
//! of a [`Model`] into a candle `Var`, runs the differentiable forward
//! (`ForwardOptions { differentiable: true }`: candle's fused rope/softmax have no backward) on
//! each window, back-propagates the mean next-token NLL of that window and accumulates the
//! squared gradients in f32.
//!
//! Embeddings, norms and the LM head are not quantized by `deltaserve decompose`, so they get
//! no Fisher entry.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var};
use deltaserve_model::{ForwardOptions, Model, Proj};

use crate::loss::log_softmax;
use crate::{Result, TrainError};

/// The estimate: for every projection weight (HF name, `model.layers.{l}.{module}.weight`) the
/// mean squared gradient, row-major `[out, in]`.
#[derive(Debug, Clone)]
pub struct FisherEstimate {
    /// Tensor name → per-weight Fisher values.
    pub per_weight: BTreeMap<String, Vec<f32>>,
    /// Windows averaged.
    pub windows: usize,
    /// Tokens predicted over all windows.
    pub predictions: usize,
}

/// Estimates the diagonal Fisher of every projection of `model` on `windows` (token windows of
/// at least two tokens). `on_window` is called after each window (for a progress bar).
///
/// The model is cloned and converted to F32 `Var`s; the caller's model is left untouched.
pub fn empirical_fisher(
    model: &Model,
    windows: &[Vec<u32>],
    mut on_window: impl FnMut(usize),
) -> Result<FisherEstimate> {
    let usable: Vec<&Vec<u32>> = windows.iter().filter(|w| w.len() >= 2).collect();
    if usable.is_empty() {
        return Err(TrainError::NoData {
            what: "no window of at least 2 tokens for the Fisher estimate".into(),
        });
    }
    let mut m = model.clone();
    let mut vars: Vec<(String, Var)> = Vec::new();
    for (l, layer) in m.layers.iter_mut().enumerate() {
        for p in Proj::ALL {
            let lin = &mut layer.linears[p.index()];
            let v = Var::from_tensor(&lin.weight.to_dtype(DType::F32)?)?;
            // The forward runs in the model's dtype; the Var's gradient arrives in F32 through
            // the cast's backward.
            lin.weight = v.as_tensor().to_dtype(model.dtype())?;
            vars.push((format!("model.layers.{l}.{}.weight", p.module()), v));
        }
    }
    let mut acc: Vec<Vec<f32>> = vars
        .iter()
        .map(|(_, v)| vec![0.0; v.elem_count()])
        .collect();
    let mut predictions = 0usize;
    for (i, w) in usable.iter().enumerate() {
        let logits = m
            .window_logits(
                &[w.as_slice()],
                None,
                ForwardOptions {
                    differentiable: true,
                },
            )?
            .remove(0);
        let loss = mean_nll(&logits, w)?;
        let grads = loss.backward()?;
        for ((name, v), a) in vars.iter().zip(acc.iter_mut()) {
            let g = grads.get(v.as_tensor()).ok_or_else(|| {
                TrainError::Setting(format!(
                    "no gradient reached {name}; the Fisher estimate needs the differentiable forward"
                ))
            })?;
            let g: Vec<f32> = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            for (x, y) in a.iter_mut().zip(g) {
                *x += y * y;
            }
        }
        predictions += w.len() - 1;
        on_window(i + 1);
    }
    let d = usable.len() as f32;
    let per_weight = vars
        .into_iter()
        .zip(acc)
        .map(|((name, _), mut a)| {
            a.iter_mut().for_each(|x| *x /= d);
            (name, a)
        })
        .collect();
    Ok(FisherEstimate {
        per_weight,
        windows: usable.len(),
        predictions,
    })
}

/// Mean of −log p(tokens[i+1] | tokens[..=i]) over a window, from its `(T, vocab)` logits.
fn mean_nll(logits: &Tensor, tokens: &[u32]) -> candle_core::Result<Tensor> {
    let t = tokens.len();
    let lp = log_softmax(&logits.narrow(0, 0, t - 1)?.to_dtype(DType::F32)?)?;
    let targets = Tensor::new(&tokens[1..], logits.device())?.unsqueeze(1)?;
    lp.gather(&targets, 1)?.mean_all()?.neg()
}
