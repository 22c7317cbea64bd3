//! Rotary position embeddings as transformers computes them (`LlamaRotaryEmbedding`, with the
//! `llama3` frequency scaling of `_compute_llama3_parameters`), in the half-split layout
//! (`rotate_half`), not the interleaved one.

use candle_core::{DType, Device, Tensor, D};

use crate::config::ModelConfig;
use crate::error::Result;

/// cos/sin tables for every position up to the context length.
#[derive(Debug, Clone)]
pub struct RotaryTables {
    /// (max_pos, head_dim/2)
    cos: Tensor,
    /// (max_pos, head_dim/2)
    sin: Tensor,
}

/// Inverse frequencies, in f32 as transformers computes them.
pub fn inverse_frequencies(cfg: &ModelConfig) -> Vec<f32> {
    let dim = cfg.head_dim;
    let base = cfg.rope_theta as f32;
    let mut inv: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / dim as f32))
        .collect();
    if let Some(s) = &cfg.rope_llama3 {
        // transformers `_compute_llama3_parameters`: long wavelengths are divided by `factor`, short ones
        // kept, and the band between them interpolated smoothly.
        let old = s.original_max_position_embeddings as f32;
        let (factor, low, high) = (
            s.factor as f32,
            s.low_freq_factor as f32,
            s.high_freq_factor as f32,
        );
        let low_wavelen = old / low;
        let high_wavelen = old / high;
        for f in inv.iter_mut() {
            let wavelen = 2.0 * std::f32::consts::PI / *f;
            let scaled = if wavelen > low_wavelen {
                *f / factor
            } else {
                *f
            };
            // transformers: is_medium = ~(wavelen < high) & ~(wavelen > low); NaN-free here.
            let is_medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
            *f = if is_medium {
                let smooth = (old / wavelen - low) / (high - low);
                (1.0 - smooth) * scaled / factor + smooth * scaled
            } else {
                scaled
            };
        }
    }
    inv
}

impl RotaryTables {
    /// Builds the tables in f32 and stores them in `dtype` (transformers casts cos/sin to the
    /// activations' dtype before use).
    pub fn new(cfg: &ModelConfig, dtype: DType, device: &Device) -> Result<Self> {
        let inv = inverse_frequencies(cfg);
        let half = inv.len();
        let max = cfg.max_position_embeddings;
        let mut cos = Vec::with_capacity(max * half);
        let mut sin = Vec::with_capacity(max * half);
        for p in 0..max {
            for &f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (max, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (max, half), device)?.to_dtype(dtype)?;
        Ok(Self { cos, sin })
    }

    /// Rotates `x`: (heads, T, head_dim) for positions `start..start+T`.
    /// `differentiable` picks plain tensor ops over candle's fused kernel, which has no backward pass.
    pub fn apply(&self, x: &Tensor, start: usize, differentiable: bool) -> Result<Tensor> {
        let (_h, t, _d) = x.dims3()?;
        let cos = self.cos.narrow(0, start, t)?;
        let sin = self.sin.narrow(0, start, t)?;
        if differentiable {
            // The fused kernel with the backward pass attached (candle's `rope` has none).
            return Ok(crate::grad::rope(&x.unsqueeze(0)?, &cos, &sin)?.squeeze(0)?);
        }
        let x4 = x.contiguous()?.unsqueeze(0)?;
        Ok(candle_nn::rotary_emb::rope(&x4, &cos.contiguous()?, &sin.contiguous()?)?.squeeze(0)?)
    }

    /// [`RotaryTables::apply`] written with plain tensor ops (`x·cos + rotate_half(x)·sin`, as
    /// transformers' `apply_rotary_pos_emb`): the reference the fused path is tested against.
    pub fn apply_plain(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let (_h, t, _d) = x.dims3()?;
        let cos = self.cos.narrow(0, start, t)?;
        let sin = self.sin.narrow(0, start, t)?;
        let cos = Tensor::cat(&[&cos, &cos], D::Minus1)?.unsqueeze(0)?;
        let sin = Tensor::cat(&[&sin, &sin], D::Minus1)?.unsqueeze(0)?;
        let half = x.dim(D::Minus1)? / 2;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
    }
}
