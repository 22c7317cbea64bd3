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

use deltaserve_format::{Dtype, OwnedTensor};
use half::f16;

use crate::codec::{
    float_tensor, pack_codes, packed_len, unpack_codes, Codec, CodecInfo, CodedView, Decoded,
    Encoded, EncodedBuilder, MatrixInput, Setting, SpecArgs,
};
use crate::error::Result;
use crate::numeric::FloatDtype;

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
        let codes = packed_len(rows * cols, u32::from(self.bits)) as f64 * 8.0;
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

/// The `rtn` codec: RTN of the whole fine-tuned weight (`value: finetuned`), the BitDelta
/// paper's 8-bit baseline. Parts and params are those of every grid codec ([`encode_grid`]).
#[derive(Debug, Clone)]
pub struct Rtn {
    /// The grid.
    pub spec: GridSpec,
}

/// Registry entry of [`Rtn`].
pub const INFO: CodecInfo = CodecInfo {
    name: "rtn",
    summary: "round-to-nearest of the whole fine-tuned weight on a min/max grid (baseline)",
    settings: &[
        Setting {
            key: "bits",
            help: "N: bits per weight, 1..=8 (default 8)",
        },
        Setting {
            key: "group",
            help: "N: columns per group with its own scale (default: one group per row)",
        },
        Setting {
            key: "sym",
            help: "0|1: symmetric grid, zero point fixed at the middle code (default 0)",
        },
    ],
    build: build_rtn,
    decode: decode_grid,
};

/// Takes `bits`, `group` and `sym` from a spec.
pub(crate) fn grid_from_spec(
    args: &mut SpecArgs,
    bits: u8,
    group: Option<usize>,
) -> Result<GridSpec> {
    let bits = args.usize("bits")?.map_or(bits as usize, |b| b);
    if !(1..=8).contains(&bits) {
        return Err(args.invalid(format!("bits={bits} is not in 1..=8")));
    }
    let group = args.usize("group")?.or(group);
    let symmetric = args.switch("sym")?.unwrap_or(false);
    Ok(GridSpec {
        bits: bits as u8,
        group_size: group,
        symmetric,
        f16_scales: true,
    })
}

fn build_rtn(args: &mut SpecArgs) -> Result<Box<dyn Codec>> {
    Ok(Box::new(Rtn {
        spec: grid_from_spec(args, 8, None)?,
    }))
}

/// `bits=8,group=128,sym=0` (group omitted for per-row).
pub(crate) fn grid_spec_string(spec: &GridSpec) -> String {
    let mut s = format!("bits={}", spec.bits);
    if let Some(g) = spec.group_size {
        s.push_str(&format!(",group={g}"));
    }
    s.push_str(&format!(",sym={}", u8::from(spec.symmetric)));
    s
}

impl Codec for Rtn {
    fn name(&self) -> &'static str {
        INFO.name
    }

    fn spec(&self) -> String {
        format!("rtn:{}", grid_spec_string(&self.spec))
    }

    fn encode(&self, m: &MatrixInput<'_>) -> Result<Encoded> {
        let q = quantize_rtn(m.finetuned, m.rows, m.cols, &self.spec);
        Ok(encode_grid(EncodedBuilder::new(INFO.name, m), &q).build())
    }
}

/// The parts of a matrix on the grid, on an entry that decodes to `W_ft` (`value: finetuned`):
///
/// | role | dtype, shape | meaning |
/// | --- | --- | --- |
/// | `codes` | U8 `[ceil(rows·cols·bits/8)]` | codes row-major, packed LSB-first ([`pack_codes`]) |
/// | `scales` | F16 `[rows, groups]` | each group's scale |
/// | `zeros` | U8 `[rows, groups]` | each group's zero point (asymmetric grid only) |
/// | `perm` | U32 `[cols]` | GPTQ act-order: code column `j` is weight column `perm[j]` |
///
/// Params: `bits`, `group_size` (0 = one group per row), `sym`.
pub fn encode_grid(builder: EncodedBuilder, q: &QuantizedMatrix) -> EncodedBuilder {
    let groups = q.spec.groups(q.cols);
    let scales: Vec<f32> = q.scales.iter().map(|&s| s as f32).collect();
    let mut b = builder
        .finetuned_value()
        .param("bits", q.spec.bits)
        .param("group_size", q.spec.group_size.unwrap_or(0))
        .param("sym", q.spec.symmetric)
        .part(
            "codes",
            OwnedTensor::new(
                Dtype::U8,
                vec![packed_len(q.codes.len(), u32::from(q.spec.bits))],
                pack_codes(&q.codes, u32::from(q.spec.bits)),
            ),
        )
        .part(
            "scales",
            float_tensor(FloatDtype::F16, vec![q.rows, groups], &scales),
        );
    if !q.spec.symmetric {
        let zeros: Vec<u8> = q.zeros.iter().map(|&z| z as u8).collect();
        b = b.part(
            "zeros",
            OwnedTensor::new(Dtype::U8, vec![q.rows, groups], zeros),
        );
    }
    if let Some(order) = &q.col_order {
        b = b.part("perm", OwnedTensor::from_u32(vec![q.cols], order));
    }
    b
}

/// Decodes an `rtn` or `gptq` entry (the parts of [`encode_grid`]).
pub fn decode_grid(v: &CodedView<'_>) -> Result<Decoded> {
    let [rows, cols] = v.shape;
    let bits = v.param_u64("bits")?;
    if !(1..=8).contains(&bits) {
        return Err(v.bad(format!("param bits={bits} is not in 1..=8")));
    }
    let group = v.param_u64("group_size")? as usize;
    let symmetric = v
        .params
        .get("sym")
        .and_then(serde_json::Value::as_bool)
        .ok_or_else(|| v.bad("param \"sym\" missing or not a boolean"))?;
    let spec = GridSpec {
        bits: bits as u8,
        group_size: (group > 0).then_some(group),
        symmetric,
        f16_scales: true,
    };
    let groups = spec.groups(cols);
    let n = rows * cols;
    let codes = unpack_codes(
        v.part_u8("codes", packed_len(n, bits as u32))?,
        bits as u32,
        n,
    );
    if let Some(&bad) = codes.iter().find(|&&c| u32::from(c) > spec.maxq()) {
        return Err(v.bad(format!("code {bad} exceeds {} bits", bits)));
    }
    let scales: Vec<f64> = v
        .part_f32("scales", rows * groups)?
        .into_iter()
        .map(f64::from)
        .collect();
    let zeros: Vec<f64> = if symmetric {
        vec![(spec.maxq() as f64 + 1.0) / 2.0; rows * groups]
    } else {
        v.part_u8("zeros", rows * groups)?
            .iter()
            .map(|&z| f64::from(z))
            .collect()
    };
    let col_order = match v
        .params
        .get("act_order")
        .and_then(serde_json::Value::as_bool)
    {
        Some(true) => {
            let (bytes, dtype, _) = v.part("perm")?;
            if dtype != Dtype::U32 || bytes.len() != cols * 4 {
                return Err(v.bad(format!("part perm must be U32 [{cols}]")));
            }
            let order: Vec<u32> = bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let mut seen = vec![false; cols];
            for &p in &order {
                if p as usize >= cols || std::mem::replace(&mut seen[p as usize], true) {
                    return Err(v.bad("part perm is not a permutation of the columns"));
                }
            }
            Some(order)
        }
        _ => None,
    };
    Ok(Decoded::Dense(
        QuantizedMatrix {
            rows,
            cols,
            spec,
            codes,
            scales,
            zeros,
            col_order,
        }
        .dequantize(),
    ))
}
