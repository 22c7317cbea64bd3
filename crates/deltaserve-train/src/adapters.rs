//! The three adapter shapes `deltaserve finetune` trains, and how each becomes the
//! `LinearDelta::LowRank { down, up }` the model's forward applies unexpanded.
//!
//! For a projection `W (out, in)` and nominal rank `r`, with scaling `s = α / r` (LoRA, Hu et al.
//! 2021, eq. 3; the same `s` for every variant, as the Q-BaRA/QA-HiRA reference code does):
//!
//! - **LoRA**: `ΔW = s · B · A`, `A (r, in)` Kaiming-uniform, `B (out, r)` zero.
//!   Trainable parameters `r · (in + out)`.
//! - **Q-BaRA** (arXiv 2407.17029, §3.2, "balanced-rank adaptation"): the adapter's input is
//!   simplified by averaging groups of `λ` consecutive input features (AvgPool1d(λ)), its output by
//!   repeating each output `λ` times (repeat_interleave), which frees parameters for a rank `λ·r`
//!   at the same count: `A (λr, in/λ)`, `B (out/λ, λr)`, `λr·in/λ + out/λ·λr = r·(in + out)`.
//!   `ΔW = s · R_λ(B) · P_λ(A)` with `P_λ(A) = repeat_interleave(A, λ, cols) / λ` (the pooling
//!   folded into `down`) and `R_λ(B) = repeat_interleave(B, λ, rows)` (the repetition folded into
//!   `up`): an ordinary low-rank delta of rank `λr`. We use `λ = 2`, the reference's value for LLaMA.
//! - **QA-HiRA** (arXiv 2407.17029, §3.3): one matrix `M (out/g_o, in/g_i)`, input pooled over
//!   groups of `g_i`, output repeated `g_o` times: `ΔW[o, i] = s · M[o / g_o, i / g_i] / g_i`.
//!   `ΔW` is constant on every `g_o × g_i` tile, so when the base is quantized block-wise with
//!   those tiles as blocks and a per-block offset (zero point), the fine-tune folds exactly into
//!   the offsets (`deltaserve_codecs::qahira`): a quantized model with no adapter left. As a
//!   low-rank delta: `down = s/g_i · repeat_interleave(M, g_i, cols)` `(out/g_o, in)`,
//!   `up = repeat_interleave(I, g_o, rows)` `(out, out/g_o)`, rank `out/g_o`. Trainable
//!   parameters `out·in / (g_o·g_i)`; the reference uses `g_i = 4`, `g_o = 8`.
//!
//! Choices where the paper is vague (written down as the brief asks):
//! - QA-HiRA's `M` starts at zero (the reference initialises it Kaiming-uniform, which moves the
//!   model away from the base before any training); with a single matrix the gradient at zero is
//!   not zero, so training starts as LoRA's does, exactly at the base.
//! - QA-HiRA's quantization blocks are 2-D tiles `g_o × g_i` with an asymmetric (scale, offset)
//!   pair each, so the fold is exact; NormalFloat (absmax, no offset) could only absorb the
//!   adapter by re-quantizing.
//! - Dimensions not divisible by `λ`, `g_i` or `g_o` are refused with the projection named.

use candle_core::{DType, Device, Tensor};
use deltaserve_model::Proj;

use crate::error::{Result, TrainError};

/// Which adapter `--adapter` trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterKind {
    /// Plain LoRA.
    Lora,
    /// Q-BaRA: pooled inputs, repeated outputs, rank λ·r.
    Qbara,
    /// QA-HiRA: one block-aligned matrix.
    Qahira,
}

impl std::str::FromStr for AdapterKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "lora" => Ok(Self::Lora),
            "qbara" => Ok(Self::Qbara),
            "qahira" => Ok(Self::Qahira),
            other => Err(format!("--adapter {other}: expected lora, qbara or qahira")),
        }
    }
}

impl std::fmt::Display for AdapterKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Lora => "lora",
            Self::Qbara => "qbara",
            Self::Qahira => "qahira",
        })
    }
}

/// The adapter's settings, shared by every projection.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdapterSpec {
    /// The variant.
    pub kind: AdapterKind,
    /// Nominal rank `r` (LoRA's rank; Q-BaRA trains rank `λ·r`; QA-HiRA uses it only in `s`).
    pub rank: usize,
    /// LoRA α; the delta is scaled by `α / r`.
    pub alpha: f64,
    /// Q-BaRA's pooling/repetition factor λ.
    pub qbara_factor: usize,
    /// QA-HiRA's input group `g_i` (columns per quantization block).
    pub hira_in_group: usize,
    /// QA-HiRA's output group `g_o` (rows per quantization block).
    pub hira_out_group: usize,
}

impl AdapterSpec {
    /// A spec with the reference code's defaults: α = 16 (its scripts' `lora_alpha`), λ = 2,
    /// `g_i = 4`, `g_o = 8`.
    pub fn new(kind: AdapterKind, rank: usize) -> Self {
        Self {
            kind,
            rank,
            alpha: 16.0,
            qbara_factor: 2,
            hira_in_group: 4,
            hira_out_group: 8,
        }
    }

    /// `s = α / r`.
    pub fn scaling(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Checks the settings and that a projection of shape `(out, in)` can carry this adapter.
    pub fn check(&self, name: &str, out: usize, inp: usize) -> Result<()> {
        let bad = |m: String| Err(TrainError::Setting(m));
        if self.rank == 0 {
            return bad("--rank 0: the rank must be at least 1".into());
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad(format!("--alpha {}: must be a number > 0", self.alpha));
        }
        match self.kind {
            AdapterKind::Lora => Ok(()),
            AdapterKind::Qbara => {
                let l = self.qbara_factor;
                if l == 0 || !out.is_multiple_of(l) || !inp.is_multiple_of(l) {
                    return bad(format!(
                        "--adapter qbara: {name} is [{out}, {inp}], not divisible by the pooling factor {l}"
                    ));
                }
                Ok(())
            }
            AdapterKind::Qahira => {
                let (gi, go) = (self.hira_in_group, self.hira_out_group);
                if gi == 0 || go == 0 || !out.is_multiple_of(go) || !inp.is_multiple_of(gi) {
                    return bad(format!(
                        "--adapter qahira: {name} is [{out}, {inp}], not divisible into {go}x{gi} blocks \
                         (--hira-groups {gi},{go} is IN,OUT); pick groups that divide every projection"
                    ));
                }
                Ok(())
            }
        }
    }

    /// Shapes of the trainable tensors of a projection `(out, in)`: `[A, B]` or `[M]`.
    pub fn param_shapes(&self, out: usize, inp: usize) -> Vec<(usize, usize)> {
        let r = self.rank;
        match self.kind {
            AdapterKind::Lora => vec![(r, inp), (out, r)],
            AdapterKind::Qbara => {
                let l = self.qbara_factor;
                vec![(l * r, inp / l), (out / l, l * r)]
            }
            AdapterKind::Qahira => vec![(out / self.hira_out_group, inp / self.hira_in_group)],
        }
    }

    /// Trainable parameters of a projection `(out, in)`.
    pub fn param_count(&self, out: usize, inp: usize) -> usize {
        self.param_shapes(out, inp).iter().map(|(a, b)| a * b).sum()
    }

    /// Rank of the low-rank delta the forward applies (the `lowrank` entry's `rank`).
    pub fn delta_rank(&self, out: usize) -> usize {
        match self.kind {
            AdapterKind::Lora => self.rank,
            AdapterKind::Qbara => self.qbara_factor * self.rank,
            AdapterKind::Qahira => out / self.hira_out_group,
        }
    }

    /// The `(down, up)` pair of the delta `ΔW = up · down` from the trainable tensors (in the
    /// order of [`AdapterSpec::param_shapes`]), built with differentiable ops only, so the
    /// gradient of anything computed from them reaches the parameters. `out` is the projection's
    /// output size.
    pub fn down_up(&self, params: &[Tensor], out: usize) -> Result<(Tensor, Tensor)> {
        self.down_up_with(params, out, &IdentityCache::default(), None)
    }

    /// [`AdapterSpec::down_up`] taking QA-HiRA's constant `up` (a 0/1 matrix, up to
    /// `out × out/g_o`) from `cache`, in `up_dtype` if given (the model's dtype, so the
    /// forward's cast is a no-op): building it on the host and copying it to the device for every
    /// projection of every step cost more than the rest of the adapter.
    pub fn down_up_with(
        &self,
        params: &[Tensor],
        out: usize,
        cache: &IdentityCache,
        up_dtype: Option<DType>,
    ) -> Result<(Tensor, Tensor)> {
        let s = self.scaling();
        match (self.kind, params) {
            (AdapterKind::Lora, [a, b]) => Ok((a.clone(), (b * s)?)),
            (AdapterKind::Qbara, [a, b]) => {
                let l = self.qbara_factor;
                // P_λ(A): the average pool over λ inputs, as a matrix acting on x.
                let down = (repeat_cols(a, l)? * (1.0 / l as f64))?;
                let up = (repeat_rows(b, l)? * s)?;
                Ok((down, up))
            }
            (AdapterKind::Qahira, [m]) => {
                let (gi, go) = (self.hira_in_group, self.hira_out_group);
                let down = (repeat_cols(m, gi)? * (s / gi as f64))?;
                let up = cache.get(out / go, go, up_dtype.unwrap_or(m.dtype()), m.device())?;
                Ok((down, up))
            }
            _ => Err(TrainError::Setting(format!(
                "adapter {} got {} parameter tensors",
                self.kind,
                params.len()
            ))),
        }
    }
}

/// `repeat_interleave(t, g, dim=1)` for a 2-D `t`, with a backward pass (broadcast + reshape).
pub fn repeat_cols(t: &Tensor, g: usize) -> Result<Tensor> {
    if g == 1 {
        return Ok(t.clone());
    }
    let (r, c) = t.dims2()?;
    Ok(t.unsqueeze(2)?
        .broadcast_as((r, c, g))?
        .reshape((r, c * g))?)
}

/// `repeat_interleave(t, g, dim=0)` for a 2-D `t`, with a backward pass.
pub fn repeat_rows(t: &Tensor, g: usize) -> Result<Tensor> {
    if g == 1 {
        return Ok(t.clone());
    }
    let (r, c) = t.dims2()?;
    Ok(t.unsqueeze(1)?
        .broadcast_as((r, g, c))?
        .reshape((r * g, c))?)
}

/// `repeat_interleave(I_n, g, dim=0)`: `(n·g, n)`, row `o` has its 1 in column `o / g`.
pub fn repeat_identity(n: usize, g: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mut v = vec![0f32; n * g * n];
    for o in 0..n * g {
        v[o * n + o / g] = 1.0;
    }
    Ok(Tensor::from_vec(v, (n * g, n), device)?.to_dtype(dtype)?)
}

/// [`repeat_identity`] matrices made once and reused, keyed by `(n, g, dtype)` (one device).
#[derive(Debug, Default)]
pub struct IdentityCache(
    std::sync::Mutex<std::collections::HashMap<(usize, usize, DType), Tensor>>,
);

impl IdentityCache {
    /// `repeat_identity(n, g)` in `dtype` on `device`, made on first use.
    pub fn get(&self, n: usize, g: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = map.get(&(n, g, dtype)) {
            if t.device().same_device(device) {
                return Ok(t.clone());
            }
        }
        let t = repeat_identity(n, g, dtype, device)?;
        map.insert((n, g, dtype), t.clone());
        Ok(t)
    }
}

/// `(out, in)` of a projection in a model with this config.
pub fn proj_shape(cfg: &deltaserve_model::ModelConfig, p: Proj) -> (usize, usize) {
    let q_out = cfg.num_attention_heads * cfg.head_dim;
    let kv_out = cfg.num_key_value_heads * cfg.head_dim;
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    match p {
        Proj::Q => (q_out, h),
        Proj::K | Proj::V => (kv_out, h),
        Proj::O => (h, q_out),
        Proj::Gate | Proj::Up => (i, h),
        Proj::Down => (h, i),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(t: &Tensor) -> Vec<Vec<f64>> {
        t.to_dtype(DType::F64).unwrap().to_vec2().unwrap()
    }

    #[test]
    fn parameter_counts_are_equal_for_lora_and_qbara() {
        let lora = AdapterSpec::new(AdapterKind::Lora, 8);
        let qbara = AdapterSpec::new(AdapterKind::Qbara, 8);
        assert_eq!(lora.param_count(768, 256), 8 * (768 + 256));
        assert_eq!(qbara.param_count(768, 256), lora.param_count(768, 256));
        assert_eq!(qbara.delta_rank(768), 16);
        let hira = AdapterSpec::new(AdapterKind::Qahira, 8);
        assert_eq!(hira.param_count(768, 256), 768 * 256 / 32);
        assert_eq!(hira.delta_rank(768), 96);
    }

    #[test]
    fn structured_factors_match_the_reference_forward() {
        // The reference forward, in f64 by hand: Q-BaRA `repeat(B · A · avgpool(x))`,
        // QA-HiRA `repeat(M · avgpool(x))`, compared with `up · down · x`.
        let dev = Device::Cpu;
        let (out, inp) = (8usize, 12usize);
        let x: Vec<f64> = (0..inp).map(|i| (i as f64 * 0.37).sin()).collect();
        let xt = Tensor::from_vec(x.clone(), (inp, 1), &dev).unwrap();
        for kind in [AdapterKind::Qbara, AdapterKind::Qahira] {
            let mut spec = AdapterSpec::new(kind, 2);
            spec.hira_in_group = 3;
            spec.hira_out_group = 2;
            let params: Vec<Tensor> = spec
                .param_shapes(out, inp)
                .iter()
                .enumerate()
                .map(|(k, &(a, b))| {
                    let v: Vec<f64> = (0..a * b)
                        .map(|j| ((j * 7 + k * 3) as f64 * 0.11).cos())
                        .collect();
                    Tensor::from_vec(v, (a, b), &dev).unwrap()
                })
                .collect();
            let (down, up) = spec.down_up(&params, out).unwrap();
            let ours = host(&up.matmul(&down.matmul(&xt).unwrap()).unwrap());
            let s = spec.scaling();
            let expect: Vec<f64> = match kind {
                AdapterKind::Qbara => {
                    let l = spec.qbara_factor;
                    let pooled: Vec<f64> = (0..inp / l)
                        .map(|g| x[g * l..(g + 1) * l].iter().sum::<f64>() / l as f64)
                        .collect();
                    let a = host(&params[0]);
                    let b = host(&params[1]);
                    let h: Vec<f64> = a
                        .iter()
                        .map(|row| row.iter().zip(&pooled).map(|(u, v)| u * v).sum())
                        .collect();
                    (0..out)
                        .map(|o| s * b[o / l].iter().zip(&h).map(|(u, v)| u * v).sum::<f64>())
                        .collect()
                }
                _ => {
                    let gi = spec.hira_in_group;
                    let pooled: Vec<f64> = (0..inp / gi)
                        .map(|g| x[g * gi..(g + 1) * gi].iter().sum::<f64>() / gi as f64)
                        .collect();
                    let m = host(&params[0]);
                    (0..out)
                        .map(|o| {
                            s * m[o / spec.hira_out_group]
                                .iter()
                                .zip(&pooled)
                                .map(|(u, v)| u * v)
                                .sum::<f64>()
                        })
                        .collect()
                }
            };
            for o in 0..out {
                assert!(
                    (ours[o][0] - expect[o]).abs() < 1e-12,
                    "{kind} row {o}: {} vs {}",
                    ours[o][0],
                    expect[o]
                );
            }
        }
    }
}
