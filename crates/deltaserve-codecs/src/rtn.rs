//! Round-to-nearest (RTN) integer quantization of a whole weight matrix, and the uniform grid
//! that RTN and GPTQ ([`crate::gptq`]) share.
//!
//! The grid is the one of the GPTQ reference (IST-DASLab/gptq, `quant.py`, `Quantizer`): for
//! each output row and each group of `group_size` consecutive input columns, `maxq = 2^bits − 1`,
//! `xmin = min(0, min w)`, `xmax = max(0, max w)`, `scale = (xmax − xmin) / maxq`, and
//! - **asymmetric** (the default here, as in the reference): `zero = round(−xmin / scale)`;
//! - **symmetric**: `xmax = max(|xmin|, xmax)`, `xmin = −xmax`, `zero = (maxq + 1) / 2`.
//!
//! A weight quantizes to `q = clamp(round(w / scale) + zero, 0, maxq)` and dequantizes to
//! `scale · (q − zero)`. An all-zero group gets `xmin = −1, xmax = 1` so its scale is not zero.
//! Scales are stored as f16 (what GPTQ's packed formats store); the quantizer rounds each scale
//! to f16 *before* using it, so the codes are optimal for the stored scale and decoding is exact.
//!
//! This is not the BitDelta paper's own baseline code (the paper cites RTN and GPTQ without
//! fixing a grid); it is the common min/max grid, documented so the numbers can be reproduced.

use half::f16;

/// How a matrix is quantized on the uniform grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GridSpec {
    /// Bits per code, 1..=8.
    pub bits: u8,
    /// Columns per group; `None` is one group per output row (per-channel).
    pub group_size: Option<usize>,
    /// Symmetric grid (zero point fixed at the middle code) instead of min/max asymmetric.
    pub symmetric: bool,
    /// Round scales to f16 before use (what the codecs store). Off only to compare with a
    /// float64 reference that keeps exact scales.
    pub f16_scales: bool,
}

impl GridSpec {
    /// The largest code, `2^bits − 1`.
    pub fn maxq(&self) -> u32 {
        (1u32 << self.bits) - 1
    }

    /// The group width for a matrix with `cols` columns.
    pub fn group_cols(&self, cols: usize) -> usize {
        self.group_size.unwrap_or(cols).clamp(1, cols.max(1))
    }

    /// Number of groups per row.
    pub fn groups(&self, cols: usize) -> usize {
        cols.div_ceil(self.group_cols(cols))
    }

    /// Bits per weight this grid costs on a `[rows, cols]` matrix, counting the codes, one f16
    /// scale per group and (asymmetric) one 8-bit zero point per group.
    pub fn bits_per_param(&self, rows: usize, cols: usize) -> f64 {
        let groups = (rows * self.groups(cols)) as f64;
        let side = if self.symmetric { 16.0 } else { 24.0 };
        let codes = packed_len(rows * cols, self.bits) as f64 * 8.0;
        (codes + groups * side) / (rows * cols) as f64
    }
}

/// The scale and zero point of one group (GPTQ `Quantizer.find_params`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupParams {
    /// The step between codes.
    pub scale: f64,
    /// The code that decodes to 0.
    pub zero: f64,
}

impl GroupParams {
    /// Fits the grid to `values` (one group of one row).
    pub fn fit(values: impl Iterator<Item = f64>, spec: &GridSpec) -> GroupParams {
        let maxq = spec.maxq() as f64;
        let (mut xmin, mut xmax) = (0f64, 0f64);
        for v in values {
            xmin = xmin.min(v);
            xmax = xmax.max(v);
        }
        if spec.symmetric {
            xmax = xmax.max(-xmin);
            if xmin < 0.0 {
                xmin = -xmax;
            }
        }
        if xmin == 0.0 && xmax == 0.0 {
            xmin = -1.0;
            xmax = 1.0;
        }
        let mut scale = (xmax - xmin) / maxq;
        if spec.f16_scales {
            scale = f16::from_f64(scale).to_f64();
            if scale == 0.0 {
                // Below f16's range: the smallest positive f16 keeps every code finite.
                scale = f16::from_bits(1).to_f64();
            }
        }
        let zero = if spec.symmetric {
            (maxq + 1.0) / 2.0
        } else {
            (-xmin / scale).round_ties_even()
        };
        GroupParams { scale, zero }
    }

    /// The code of `w` (torch.round rounds half to even).
    #[inline]
    pub fn code(&self, w: f64, maxq: u32) -> u8 {
        ((w / self.scale).round_ties_even() + self.zero).clamp(0.0, maxq as f64) as u8
    }

    /// The value code `q` stands for.
    #[inline]
    pub fn value(&self, q: u8) -> f64 {
        self.scale * (q as f64 - self.zero)
    }
}

/// A matrix on the uniform grid: one code per weight plus per-group scales and zero points.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedMatrix {
    /// Output rows.
    pub rows: usize,
    /// Input columns.
    pub cols: usize,
    /// The grid.
    pub spec: GridSpec,
    /// (rows, cols) codes, one per byte (see [`pack_codes`] for storage).
    pub codes: Vec<u8>,
    /// (rows, groups) scales.
    pub scales: Vec<f64>,
    /// (rows, groups) zero points (whole numbers in `0..=maxq` for the asymmetric grid).
    pub zeros: Vec<f64>,
    /// `Some(p)`: code column `j` (and its group) belongs to weight column `p[j]` (GPTQ
    /// act-order); `None`: the identity.
    pub col_order: Option<Vec<u32>>,
}

impl QuantizedMatrix {
    /// The dequantized matrix, (rows, cols) row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let g = self.spec.group_cols(self.cols);
        let groups = self.spec.groups(self.cols);
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, row) in out.chunks_mut(self.cols.max(1)).enumerate() {
            for (c, v) in row.iter_mut().enumerate() {
                let k = r * groups + c / g;
                let p = GroupParams {
                    scale: self.scales[k],
                    zero: self.zeros[k],
                };
                *v = p.value(self.codes[r * self.cols + c]) as f32;
            }
            if let Some(order) = &self.col_order {
                let coded = row.to_vec();
                for (j, &dst) in order.iter().enumerate() {
                    row[dst as usize] = coded[j];
                }
            }
        }
        out
    }
}

/// RTN: every weight to its nearest grid point, groups fitted to the weights themselves.
/// `w` is (rows, cols) row-major.
pub fn quantize_rtn(w: &[f32], rows: usize, cols: usize, spec: &GridSpec) -> QuantizedMatrix {
    assert_eq!(
        w.len(),
        rows * cols,
        "quantize_rtn: data is not rows × cols"
    );
    let g = spec.group_cols(cols);
    let groups = spec.groups(cols);
    let maxq = spec.maxq();
    let mut codes = vec![0u8; rows * cols];
    let mut scales = vec![0f64; rows * groups];
    let mut zeros = vec![0f64; rows * groups];
    for r in 0..rows {
        let row = &w[r * cols..][..cols];
        for (j, chunk) in row.chunks(g).enumerate() {
            let p = GroupParams::fit(chunk.iter().map(|&v| v as f64), spec);
            scales[r * groups + j] = p.scale;
            zeros[r * groups + j] = p.zero;
            for (c, &v) in chunk.iter().enumerate() {
                codes[r * cols + j * g + c] = p.code(v as f64, maxq);
            }
        }
    }
    QuantizedMatrix {
        rows,
        cols,
        spec: *spec,
        codes,
        scales,
        zeros,
        col_order: None,
    }
}

/// Bytes that `n` codes of `bits` bits take when packed.
pub fn packed_len(n: usize, bits: u8) -> usize {
    (n * bits as usize).div_ceil(8)
}

/// Packs codes of `bits` bits into a little-endian bit stream: code `i` occupies bits
/// `i·bits .. (i+1)·bits` of the stream, bit 0 being the least significant bit of byte 0.
/// For 4 bits, byte `k` holds code `2k` in its low nibble and `2k+1` in its high nibble.
pub fn pack_codes(codes: &[u8], bits: u8) -> Vec<u8> {
    let mut out = vec![0u8; packed_len(codes.len(), bits)];
    if bits == 8 {
        out.copy_from_slice(codes);
        return out;
    }
    let mask = ((1u16 << bits) - 1) as u8;
    for (i, &q) in codes.iter().enumerate() {
        let bit = i * bits as usize;
        let v = ((q & mask) as u16) << (bit % 8);
        out[bit / 8] |= v as u8;
        if bit % 8 + bits as usize > 8 {
            out[bit / 8 + 1] |= (v >> 8) as u8;
        }
    }
    out
}

/// Inverse of [`pack_codes`]: the first `n` codes of the stream.
pub fn unpack_codes(packed: &[u8], bits: u8, n: usize) -> Vec<u8> {
    if bits == 8 {
        return packed[..n].to_vec();
    }
    let mask = ((1u16 << bits) - 1) as u16;
    (0..n)
        .map(|i| {
            let bit = i * bits as usize;
            let lo = packed[bit / 8] as u16;
            let hi = packed.get(bit / 8 + 1).copied().unwrap_or(0) as u16;
            (((lo | (hi << 8)) >> (bit % 8)) & mask) as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_unpack_round_trips_every_width() {
        for bits in 1..=8u8 {
            let codes: Vec<u8> = (0..37u32)
                .map(|i| ((i * 7 + 3) % (1 << bits)) as u8)
                .collect();
            let packed = pack_codes(&codes, bits);
            assert_eq!(packed.len(), packed_len(37, bits));
            assert_eq!(unpack_codes(&packed, bits, 37), codes, "bits {bits}");
        }
    }

    #[test]
    fn four_bit_nibble_order() {
        assert_eq!(pack_codes(&[0x1, 0xF, 0x3], 4), vec![0xF1, 0x03]);
    }
}
