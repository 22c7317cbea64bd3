//! Weights as stored (little-endian BF16, F16 or F32 bytes) to `f32` and back, with the rounding
//! PyTorch uses, so that reconstructions match the reference implementation bit for bit.

use deltaserve_format::Dtype;
use half::{bf16, f16};

/// The floating-point dtypes weights come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatDtype {
    /// IEEE single precision.
    F32,
    /// bfloat16.
    BF16,
    /// IEEE half precision.
    F16,
}

impl FloatDtype {
    /// The float dtype of a safetensors dtype, `None` for integers, F64 and the rest.
    pub fn from_safetensors(dtype: Dtype) -> Option<FloatDtype> {
        match dtype {
            Dtype::F32 => Some(FloatDtype::F32),
            Dtype::BF16 => Some(FloatDtype::BF16),
            Dtype::F16 => Some(FloatDtype::F16),
            _ => None,
        }
    }

    /// Parses a dtype name as the CLI takes it (`f32`, `bf16`, `f16`, any case).
    pub fn parse(name: &str) -> Option<FloatDtype> {
        match name.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Some(FloatDtype::F32),
            "bf16" | "bfloat16" => Some(FloatDtype::BF16),
            "f16" | "float16" => Some(FloatDtype::F16),
            _ => None,
        }
    }

    /// The safetensors dtype.
    pub fn safetensors(self) -> Dtype {
        match self {
            FloatDtype::F32 => Dtype::F32,
            FloatDtype::BF16 => Dtype::BF16,
            FloatDtype::F16 => Dtype::F16,
        }
    }

    /// The name transformers uses in `config.json` (`torch_dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            FloatDtype::F32 => "float32",
            FloatDtype::BF16 => "bfloat16",
            FloatDtype::F16 => "float16",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            FloatDtype::F32 => 4,
            FloatDtype::BF16 | FloatDtype::F16 => 2,
        }
    }

    /// Rounds an `f32` to the nearest value of this dtype (round half to even, as PyTorch's
    /// casts do) and returns it as `f32`.
    #[inline(always)]
    pub fn round(self, x: f32) -> f32 {
        match self {
            FloatDtype::F32 => x,
            FloatDtype::BF16 => round_bf16(x),
            FloatDtype::F16 => f16::from_f32(x).to_f32(),
        }
    }

    /// `out[i] = round(finetuned[i] − base[i])` in `self`, for little-endian `base` of dtype
    /// `base_dtype` and `finetuned` of `ft_dtype` (`out.len()` elements each). The loop is
    /// specialised per dtype triple so the compiler can vectorise it.
    ///
    /// # Panics
    /// If the byte lengths do not match `out.len()`.
    pub fn difference_into(
        self,
        base: &[u8],
        base_dtype: FloatDtype,
        finetuned: &[u8],
        ft_dtype: FloatDtype,
        out: &mut [f32],
    ) {
        assert_eq!(
            base.len(),
            out.len() * base_dtype.size(),
            "difference_into: base length"
        );
        assert_eq!(
            finetuned.len(),
            out.len() * ft_dtype.size(),
            "difference_into: length"
        );
        use FloatDtype::*;
        match (base_dtype, ft_dtype, self) {
            (BF16, BF16, BF16) => {
                diff_loop::<2, 2>(base, finetuned, out, load_bf16, load_bf16, round_bf16)
            }
            (F32, F32, F32) => diff_loop::<4, 4>(base, finetuned, out, load_f32, load_f32, |x| x),
            (F16, F16, F16) => diff_loop::<2, 2>(base, finetuned, out, load_f16, load_f16, |x| {
                f16::from_f32(x).to_f32()
            }),
            _ => {
                let mut b = vec![0f32; out.len()];
                base_dtype.decode_into(base, &mut b);
                ft_dtype.decode_into(finetuned, out);
                for (o, b) in out.iter_mut().zip(&b) {
                    *o = self.round(*o - b);
                }
            }
        }
    }

    /// Decodes little-endian `bytes` (`out.len()` elements of this dtype) into `out`.
    ///
    /// # Panics
    /// If `bytes.len() != out.len() * self.size()`; callers slice by element counts they checked.
    pub fn decode_into(self, bytes: &[u8], out: &mut [f32]) {
        assert_eq!(bytes.len(), out.len() * self.size(), "decode_into: length");
        match self {
            FloatDtype::F32 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            FloatDtype::BF16 => {
                // bf16 is the top half of an f32: a shift, which the compiler vectorises.
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
                }
            }
            FloatDtype::F16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                }
            }
        }
    }

    /// Decodes little-endian `bytes` into a new vector.
    pub fn decode(self, bytes: &[u8]) -> Vec<f32> {
        let mut out = vec![0f32; bytes.len() / self.size()];
        self.decode_into(&bytes[..out.len() * self.size()], &mut out);
        out
    }

    /// Encodes `values` (rounded to this dtype, half to even) as little-endian bytes, appended
    /// to `out`.
    pub fn encode_into(self, values: &[f32], out: &mut Vec<u8>) {
        out.reserve(values.len() * self.size());
        match self {
            FloatDtype::F32 => values.iter().for_each(|v| out.extend(v.to_le_bytes())),
            FloatDtype::BF16 => values
                .iter()
                .for_each(|&v| out.extend(bf16::from_f32(v).to_le_bytes())),
            FloatDtype::F16 => values
                .iter()
                .for_each(|&v| out.extend(f16::from_f32(v).to_le_bytes())),
        }
    }
}

/// Rounds to the nearest bfloat16, half to even, as PyTorch's `round_to_nearest_even`
/// (c10/util/BFloat16.h); NaN stays NaN. Branch-free, so loops over it vectorise.
#[inline(always)]
pub fn round_bf16(x: f32) -> f32 {
    let bits = x.to_bits();
    let rounded = f32::from_bits(bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) & 0xFFFF_0000);
    if x.is_nan() {
        x
    } else {
        rounded
    }
}

#[inline(always)]
fn load_bf16(c: &[u8; 2]) -> f32 {
    f32::from_bits(u32::from(u16::from_le_bytes(*c)) << 16)
}

#[inline(always)]
fn load_f16(c: &[u8; 2]) -> f32 {
    f16::from_bits(u16::from_le_bytes(*c)).to_f32()
}

#[inline(always)]
fn load_f32(c: &[u8; 4]) -> f32 {
    f32::from_le_bytes(*c)
}

#[inline(always)]
fn diff_loop<const B: usize, const F: usize>(
    base: &[u8],
    finetuned: &[u8],
    out: &mut [f32],
    load_base: impl Fn(&[u8; B]) -> f32,
    load_ft: impl Fn(&[u8; F]) -> f32,
    round: impl Fn(f32) -> f32,
) {
    let base = base.chunks_exact(B).map(|c| c.try_into().unwrap_or([0; B]));
    let ft = finetuned
        .chunks_exact(F)
        .map(|c| c.try_into().unwrap_or([0; F]));
    for ((o, b), f) in out.iter_mut().zip(base).zip(ft) {
        *o = round(load_ft(&f) - load_base(&b));
    }
}

/// Sums `|x|` of `values` in `f64`, with eight independent accumulators so the loop vectorises
/// (and so the result does not depend on how the caller splits rows across threads, as long as
/// it sums the per-block results in order).
pub fn sum_abs_f64(values: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let chunks = values.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (lane, &v) in lanes.iter_mut().zip(c) {
            *lane += f64::from(v.abs());
        }
    }
    let mut tail = 0f64;
    for &v in rest {
        tail += f64::from(v.abs());
    }
    lanes.iter().sum::<f64>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_round_is_half_to_even_like_torch() {
        // 1 + 2^-8 lies halfway between bf16 neighbours 1 and 1 + 2^-7: rounds to even (1).
        assert_eq!(FloatDtype::BF16.round(1.0 + 2f32.powi(-8)), 1.0);
        // 1 + 3*2^-8 lies halfway between 1 + 2^-7 and 1 + 2^-6: rounds to even (1 + 2^-6).
        assert_eq!(
            FloatDtype::BF16.round(1.0 + 3.0 * 2f32.powi(-8)),
            1.0 + 2f32.powi(-6)
        );
        assert_eq!(FloatDtype::F32.round(0.1), 0.1);
    }

    #[test]
    fn fast_bf16_rounding_matches_half() {
        let mut x = 0x0001_2345u32;
        for _ in 0..200_000 {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let v = f32::from_bits(x);
            let want = bf16::from_f32(v).to_f32();
            let got = round_bf16(v);
            assert!(
                got.to_bits() == want.to_bits() || (v.is_nan() && got.is_nan()),
                "{v:e}"
            );
        }
        for v in [f32::MAX, f32::MIN, f32::INFINITY, -0.0, 1.0 + 2f32.powi(-8)] {
            assert_eq!(
                round_bf16(v).to_bits(),
                bf16::from_f32(v).to_f32().to_bits(),
                "{v:e}"
            );
        }
    }

    #[test]
    fn difference_matches_per_element_rounding() {
        let base = [1.0f32, -2.5, 0.3, 7.0, 1e-3];
        let ft = [1.01f32, -2.5, 0.1, 7.5, -1e-3];
        for dtype in [FloatDtype::F32, FloatDtype::BF16, FloatDtype::F16] {
            let (mut b, mut f) = (Vec::new(), Vec::new());
            dtype.encode_into(&base, &mut b);
            dtype.encode_into(&ft, &mut f);
            let mut out = [0f32; 5];
            dtype.difference_into(&b, dtype, &f, dtype, &mut out);
            let (bd, fd) = (dtype.decode(&b), dtype.decode(&f));
            let want: Vec<f32> = fd
                .iter()
                .zip(&bd)
                .map(|(f, b)| dtype.round(f - b))
                .collect();
            assert_eq!(out.to_vec(), want, "{dtype:?}");
        }
        // Mixed dtypes: the f32 difference of the two decoded values.
        let (mut b, mut f) = (Vec::new(), Vec::new());
        FloatDtype::BF16.encode_into(&base, &mut b);
        FloatDtype::F32.encode_into(&ft, &mut f);
        let mut out = [0f32; 5];
        FloatDtype::F32.difference_into(&b, FloatDtype::BF16, &f, FloatDtype::F32, &mut out);
        let bd = FloatDtype::BF16.decode(&b);
        let want: Vec<f32> = ft.iter().zip(&bd).map(|(f, b)| f - b).collect();
        assert_eq!(out.to_vec(), want);
    }

    #[test]
    fn decode_encode_round_trip() {
        let values = [0.0f32, -1.5, 3.25, 1e-3, -7e4];
        for dtype in [FloatDtype::F32, FloatDtype::BF16, FloatDtype::F16] {
            let mut bytes = Vec::new();
            dtype.encode_into(&values, &mut bytes);
            let back = dtype.decode(&bytes);
            let rounded: Vec<f32> = values.iter().map(|&v| dtype.round(v)).collect();
            assert_eq!(back, rounded, "{dtype:?}");
        }
    }

    #[test]
    fn sum_abs_matches_naive() {
        let values: Vec<f32> = (0..1003).map(|i| (i as f32 * 0.37).sin()).collect();
        let naive: f64 = values.iter().map(|&v| f64::from(v.abs())).sum();
        assert!((sum_abs_f64(&values) - naive).abs() < 1e-9);
    }
}
