//! NormalFloat (NF) quantization with double-quantized block scales (QLoRA / LQ-LoRA).
//!
//! **Code values.** NF-b (QLoRA, Dettmers et al., arXiv 2305.14314, §3 eq. 4; LQ-LoRA,
//! arXiv 2311.12023, §2) places its 2^b levels at quantiles of a standard normal, rescaled
//! to [-1, 1]: with δ = 0.9677083 (QLoRA's offset, chosen so the outermost quantile is finite),
//! the negative side takes the quantiles `linspace(1-δ, ½, 2^(b-1))` without the last, the
//! non-negative side `linspace(½, δ, 2^(b-1)+1)`, and every quantile q becomes
//! Φ⁻¹(q) / Φ⁻¹(δ). That gives 2^(b-1) − 1 negative levels, an exact zero and 2^(b-1)
//! positive ones, with -1 and +1 at the ends (for b = 4 exactly bitsandbytes' NF4 table).
//!
//! **Blocks.** A matrix is read row-major and cut into blocks of `block_size` (B₀)
//! consecutive weights (LQ-LoRA's `A.view(-1, B1, B0)`); each block's absmax s_j is its scale
//! and every weight is stored as the index of the code value nearest to w / ŝ_j.
//!
//! **Double quantization** (QLoRA §3 "Double Quantization", in LQ-LoRA's variant): the block
//! scales are themselves quantized to 8-bit unsigned integers. A per-matrix offset
//! m = min_j s_j is subtracted (so all shifted scales are ≥ 0 and the smallest block keeps
//! its exact scale), the shifted scales are grouped [`SCALE_GROUP`] = 256 at a time, each
//! group stores its absmax c_g as an FP32 number, and each scale becomes
//! q_j = round(255 · (s_j − m) / c_g). Dequantized: ŝ_j = q_j · c_g / 255 + m. Weights are
//! quantized against ŝ_j (the scale the decoder will see), not s_j.
//!
//! **Bits** ([`NfConfig::storage_bits`]), exact for a matrix of n weights:
//! `n·b` (codes) + `⌈n/B₀⌉·8` (scale codes) + `⌈⌈n/B₀⌉/256⌉·32` (group absmaxes) + 32 (the
//! offset). Per parameter that is b + 8/B₀ + 32/(256·B₀) + o(1): NF4 with B₀ = 64 is
//! 4.127 bits, NF3/B₀=64 3.127, NF2/B₀=64 2.127.

use rayon::prelude::*;

use crate::CodecError;

/// QLoRA's δ: the outermost quantile, so the largest code value is Φ⁻¹(δ)/Φ⁻¹(δ) = 1.
pub const NF_OFFSET: f64 = 0.9677083;
/// Bits of each quantized block scale (QLoRA's 8-bit double quantization).
pub const SCALE_BITS: u32 = 8;
/// How many block scales share one second-level FP32 scale (QLoRA: 256).
pub const SCALE_GROUP: usize = 256;
/// Bits of a second-level scale (FP32) and of the per-matrix offset.
pub const GROUP_SCALE_BITS: u32 = 32;
/// Code widths supported.
pub const MIN_BITS: u32 = 2;
/// Code widths supported.
pub const MAX_BITS: u32 = 8;
/// Smallest block size.
pub const MIN_BLOCK: usize = 16;
/// Largest block size.
pub const MAX_BLOCK: usize = 256;

/// One NF quantization configuration: code width and first-level block size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NfConfig {
    /// Bits per weight code, 2..=8.
    pub bits: u32,
    /// Weights per first-level block (one 8-bit scale each), a power of two in 16..=256.
    pub block_size: usize,
}

impl NfConfig {
    /// A checked configuration; the error names the bad value and the allowed range.
    pub fn new(bits: u32, block_size: usize) -> Result<Self, CodecError> {
        if !(MIN_BITS..=MAX_BITS).contains(&bits) {
            return Err(CodecError::BadOption {
                option: "NF bits",
                detail: format!("{bits} is not supported; use {MIN_BITS} to {MAX_BITS}"),
            });
        }
        if !(MIN_BLOCK..=MAX_BLOCK).contains(&block_size) || !block_size.is_power_of_two() {
            return Err(CodecError::BadOption {
                option: "NF block size",
                detail: format!(
                    "{block_size} is not supported; use a power of two from {MIN_BLOCK} to {MAX_BLOCK}"
                ),
            });
        }
        Ok(Self { bits, block_size })
    }

    /// Exact storage of a matrix of `numel` weights in this configuration, in bits.
    pub fn storage_bits(&self, numel: usize) -> u64 {
        let blocks = numel.div_ceil(self.block_size) as u64;
        let groups = blocks.div_ceil(SCALE_GROUP as u64);
        numel as u64 * self.bits as u64
            + blocks * SCALE_BITS as u64
            + groups * GROUP_SCALE_BITS as u64
            + GROUP_SCALE_BITS as u64
    }

    /// Bits per parameter for a large matrix (the o(1) terms dropped).
    pub fn bits_per_param(&self) -> f64 {
        self.bits as f64
            + SCALE_BITS as f64 / self.block_size as f64
            + GROUP_SCALE_BITS as f64 / (SCALE_GROUP * self.block_size) as f64
    }

    /// A short label, `nf3-b64`.
    pub fn label(&self) -> String {
        format!("nf{}-b{}", self.bits, self.block_size)
    }

    /// The grid LQ-LoRA's ILP chooses from (paper §3.2): b ∈ {2, 3, 4, 8} × B₀ ∈ {16, 32, 64,
    /// 128, 256} — 20 configurations from 2.03 to 8.5 bits/param.
    pub fn lqlora_grid() -> Vec<NfConfig> {
        let mut v = Vec::new();
        for bits in [2, 3, 4, 8] {
            for block_size in [16, 32, 64, 128, 256] {
                v.push(NfConfig { bits, block_size });
            }
        }
        v
    }
}

impl std::fmt::Display for NfConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label())
    }
}

/// Φ⁻¹, the standard normal quantile function.
///
/// Acklam's rational approximation (relative error 1.15e-9) followed by one Halley step on
/// Φ(x) − p with `libm::erfc`, which brings it to full double precision.
pub fn probit(p: f64) -> f64 {
    assert!(p > 0.0 && p < 1.0, "probit({p}) outside (0, 1)");
    const A: [f64; 6] = [
        -3.969683028665376e+01,
        2.209460984245205e+02,
        -2.759285104469687e+02,
        1.383_577_518_672_69e2,
        -3.066479806614716e+01,
        2.506628277459239e+00,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e+01,
        1.615858368580409e+02,
        -1.556989798598866e+02,
        6.680131188771972e+01,
        -1.328068155288572e+01,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-03,
        -3.223964580411365e-01,
        -2.400758277161838e+00,
        -2.549732539343734e+00,
        4.374664141464968e+00,
        2.938163982698783e+00,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-03,
        3.224671290700398e-01,
        2.445134137142996e+00,
        3.754408661907416e+00,
    ];
    let plow = 0.02425;
    let x = if p < plow {
        let q = (-2.0 * p.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else if p <= 1.0 - plow {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        let q = (-2.0 * (1.0 - p).ln()).sqrt();
        -(((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    // Halley refinement: e = Φ(x) − p, u = e·√(2π)·exp(x²/2).
    let e = 0.5 * libm::erfc(-x / std::f64::consts::SQRT_2) - p;
    let u = e * (2.0 * std::f64::consts::PI).sqrt() * (x * x / 2.0).exp();
    x - u / (1.0 + x * u / 2.0)
}

/// The 2^bits NF code values, ascending, in [-1, 1] with an exact 0 (see the module docs).
pub fn code_values(bits: u32) -> Vec<f64> {
    let half = 1usize << (bits - 1);
    let linspace = |a: f64, b: f64, n: usize| -> Vec<f64> {
        (0..n)
            .map(|i| a + (b - a) * i as f64 / (n - 1) as f64)
            .collect()
    };
    let mut q = linspace(1.0 - NF_OFFSET, 0.5, half);
    q.pop(); // the duplicated ½
    q.extend(linspace(0.5, NF_OFFSET, half + 1));
    let norm = probit(NF_OFFSET);
    q.into_iter()
        .map(|p| if p == 0.5 { 0.0 } else { probit(p) / norm })
        .collect()
}

/// A code table ready for quantizing: values and the midpoints between neighbours.
#[derive(Debug, Clone)]
struct Codebook {
    values: Vec<f32>,
    mids: Vec<f32>,
}

impl Codebook {
    fn new(bits: u32) -> Self {
        let v = code_values(bits);
        let mids = v.windows(2).map(|w| ((w[0] + w[1]) / 2.0) as f32).collect();
        Self {
            values: v.into_iter().map(|x| x as f32).collect(),
            mids,
        }
    }

    /// Index of the nearest value; a tie (x exactly on a midpoint) goes to the lower value,
    /// as `torch.bucketize(right=False)` in the reference implementation.
    #[inline]
    fn encode(&self, x: f32) -> u8 {
        self.mids.partition_point(|&m| m < x) as u8
    }
}

/// A matrix in NF with double-quantized scales: everything a decoder needs, unpacked.
#[derive(Debug, Clone, PartialEq)]
pub struct NfTensor {
    /// The configuration.
    pub config: NfConfig,
    /// Number of weights (row-major).
    pub numel: usize,
    /// One code per weight, `< 2^bits` (unpacked; [`pack_bits`] packs them).
    pub codes: Vec<u8>,
    /// One 8-bit code per block scale.
    pub scale_codes: Vec<u8>,
    /// One FP32 absmax per group of [`SCALE_GROUP`] shifted block scales.
    pub group_scales: Vec<f32>,
    /// The per-matrix offset m = min block absmax.
    pub offset: f32,
}

impl NfTensor {
    /// Quantizes `w` (row-major) in `config`.
    pub fn quantize(w: &[f32], config: NfConfig) -> Self {
        let bs = config.block_size;
        let absmax: Vec<f32> = w
            .par_chunks(bs)
            .map(|b| b.iter().fold(0.0f32, |m, x| m.max(x.abs())))
            .collect();
        let offset = absmax.iter().copied().fold(f32::INFINITY, f32::min);
        let offset = if offset.is_finite() { offset } else { 0.0 };
        let max_code = ((1u32 << SCALE_BITS) - 1) as f32;
        let group_scales: Vec<f32> = absmax
            .chunks(SCALE_GROUP)
            .map(|g| g.iter().fold(0.0f32, |m, &s| m.max(s - offset)))
            .collect();
        let scale_codes: Vec<u8> = absmax
            .iter()
            .enumerate()
            .map(|(j, &s)| {
                let c = group_scales[j / SCALE_GROUP];
                if c > 0.0 {
                    ((s - offset) / c * max_code).round().clamp(0.0, max_code) as u8
                } else {
                    0
                }
            })
            .collect();
        let mut t = NfTensor {
            config,
            numel: w.len(),
            codes: Vec::new(),
            scale_codes,
            group_scales,
            offset,
        };
        let scales = t.block_scales();
        let book = Codebook::new(config.bits);
        let zero = book.encode(0.0);
        let mut codes = vec![0u8; w.len()];
        codes
            .par_chunks_mut(bs)
            .zip(w.par_chunks(bs))
            .zip(scales.par_iter())
            .for_each(|((out, block), &s)| {
                if s > 0.0 {
                    let inv = 1.0 / s;
                    for (o, &x) in out.iter_mut().zip(block) {
                        *o = book.encode(x * inv);
                    }
                } else {
                    out.fill(zero);
                }
            });
        t.codes = codes;
        t
    }

    /// The dequantized block scales ŝ_j = q_j · c_g / 255 + m.
    pub fn block_scales(&self) -> Vec<f32> {
        let max_code = ((1u32 << SCALE_BITS) - 1) as f32;
        self.scale_codes
            .iter()
            .enumerate()
            .map(|(j, &q)| q as f32 * (self.group_scales[j / SCALE_GROUP] / max_code) + self.offset)
            .collect()
    }

    /// The dequantized weights, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.numel];
        self.dequantize_into(&mut out);
        out
    }

    /// Dequantizes into `out` (length `numel`).
    pub fn dequantize_into(&self, out: &mut [f32]) {
        assert_eq!(out.len(), self.numel);
        let book = Codebook::new(self.config.bits);
        let scales = self.block_scales();
        let bs = self.config.block_size;
        out.par_chunks_mut(bs)
            .zip(self.codes.par_chunks(bs))
            .zip(scales.par_iter())
            .for_each(|((o, c), &s)| {
                for (y, &k) in o.iter_mut().zip(c) {
                    *y = book.values[k as usize] * s;
                }
            });
    }

    /// Exact storage in bits (see the module docs); equals `config.storage_bits(numel)`.
    pub fn storage_bits(&self) -> u64 {
        self.codes.len() as u64 * self.config.bits as u64
            + self.scale_codes.len() as u64 * SCALE_BITS as u64
            + self.group_scales.len() as u64 * GROUP_SCALE_BITS as u64
            + GROUP_SCALE_BITS as u64
    }
}

/// Packs `codes` (each `< 2^bits`) into a little-endian bit stream, `bits` per code.
pub fn pack_bits(codes: &[u8], bits: u32) -> Vec<u8> {
    let mut out = vec![0u8; (codes.len() * bits as usize).div_ceil(8)];
    let mut pos = 0usize;
    for &c in codes {
        let v = c as u16;
        let (byte, shift) = (pos / 8, pos % 8);
        let w = v << shift;
        out[byte] |= w as u8;
        if shift + bits as usize > 8 {
            out[byte + 1] |= (w >> 8) as u8;
        }
        pos += bits as usize;
    }
    out
}

/// Unpacks `n` codes of `bits` bits from [`pack_bits`]' stream.
pub fn unpack_bits(bytes: &[u8], bits: u32, n: usize) -> Vec<u8> {
    let mask = (1u16 << bits) - 1;
    (0..n)
        .map(|i| {
            let pos = i * bits as usize;
            let (byte, shift) = (pos / 8, pos % 8);
            let lo = bytes[byte] as u16;
            let hi = bytes.get(byte + 1).copied().unwrap_or(0) as u16;
            (((lo | (hi << 8)) >> shift) & mask) as u8
        })
        .collect()
}

/// Σ (a − b)² in f64.
pub fn sq_error(a: &[f32], b: &[f32]) -> f64 {
    a.par_iter()
        .zip(b.par_iter())
        .map(|(&x, &y)| {
            let d = x as f64 - y as f64;
            d * d
        })
        .sum()
}

/// Σ f·(a − b)² in f64 (the Fisher-weighted error of LQ-LoRA eq. 6).
pub fn weighted_sq_error(a: &[f32], b: &[f32], f: &[f32]) -> f64 {
    a.par_iter()
        .zip(b.par_iter())
        .zip(f.par_iter())
        .map(|((&x, &y), &w)| {
            let d = x as f64 - y as f64;
            w as f64 * d * d
        })
        .sum()
}
