//! Block-wise asymmetric quantization whose blocks match QA-HiRA's adapter (arXiv 2407.17029,
//! §3.3), the `blockq` codec that stores it in a delta file, and the fold of a trained QA-HiRA
//! adapter into it.
//!
//! A weight `(rows, cols)` is cut into `block_rows × block_cols` tiles; each tile stores `bits`-bit
//! codes `c` and one (scale, offset) pair, `w ≈ scale · c + offset` (min-max round-to-nearest,
//! the INT-with-zero-point format QA-LoRA folds into). A QA-HiRA adapter with groups
//! `g_o = block_rows`, `g_i = block_cols` changes the weight by a value that is constant on each
//! tile (`deltaserve_train::adapters`), so adding it to the tile's offset reproduces
//! `dequantize(Q) + ΔW` exactly up to f32 rounding of one addition: the fine-tuned model is again
//! a quantized model, with no adapter left at inference.
//!
//! On disk (`deltaserve quantize --method blockq:bits=B,rows=R,cols=C`): one [`INFO`] (`blockq`)
//! coded entry per projection in the quantized base's `quantization.delta`, `value: finetuned`;
//! [`fold_adapter`] turns that file plus a QA-HiRA adapter delta into the merged model's
//! `quantization.delta` (same codes, new offsets), which `deltaserve merge` writes.
//!
//! Why not NormalFloat: NF stores `absmax · level[c]` with no offset, so a constant shift of a
//! block is not representable and the adapter could only be absorbed by re-quantizing (lossy).
//! Scales and offsets are F32 (not F16 as GPTQ's formats) so that the fold adds the adapter
//! without a second rounding of the offset to a coarser grid.

use std::path::Path;

use deltaserve_format::{BaseFingerprint, DeltaFile, DeltaHeader, Dtype, OwnedTensor, TensorEntry};

use crate::codec::{
    decode_dense, pack_codes, packed_len, unpack_codes, Codec, CodecInfo, CodedView, Decoded,
    Encoded, EncodedBuilder, MatrixInput, Setting, SpecArgs,
};
use crate::error::{CodecError, Result};

/// A block-quantized matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockQuantized {
    /// Rows (`out_features`).
    pub rows: usize,
    /// Columns (`in_features`).
    pub cols: usize,
    /// Rows per block (QA-HiRA's `g_o`).
    pub block_rows: usize,
    /// Columns per block (QA-HiRA's `g_i`).
    pub block_cols: usize,
    /// Bits per code, 1..=8.
    pub bits: u8,
    /// One code per weight, row-major.
    pub codes: Vec<u8>,
    /// One scale per block, blocks row-major (`rows/block_rows` × `cols/block_cols`).
    pub scales: Vec<f32>,
    /// One offset per block.
    pub offsets: Vec<f32>,
}

fn bad(detail: String) -> CodecError {
    CodecError::BadOption {
        option: "qahira",
        detail,
    }
}

impl BlockQuantized {
    /// Blocks per row of blocks.
    pub fn blocks_per_row(&self) -> usize {
        self.cols / self.block_cols
    }

    fn block_of(&self, r: usize, c: usize) -> usize {
        (r / self.block_rows) * self.blocks_per_row() + c / self.block_cols
    }

    /// Quantizes `w` (row-major `rows × cols`) with min-max round-to-nearest per block:
    /// `scale = (max − min) / (2^bits − 1)`, `offset = min`, `c = round((w − min) / scale)`.
    pub fn quantize(
        w: &[f32],
        rows: usize,
        cols: usize,
        bits: u8,
        block_rows: usize,
        block_cols: usize,
    ) -> Result<Self> {
        if !(1..=8).contains(&bits) {
            return Err(bad(format!("{bits} bits: expected 1 to 8")));
        }
        if block_rows == 0
            || block_cols == 0
            || !rows.is_multiple_of(block_rows)
            || !cols.is_multiple_of(block_cols)
        {
            return Err(bad(format!(
                "a [{rows}, {cols}] matrix does not divide into {block_rows}x{block_cols} blocks"
            )));
        }
        if w.len() != rows * cols {
            return Err(bad(format!(
                "{} values for a [{rows}, {cols}] matrix",
                w.len()
            )));
        }
        let mut q = Self {
            rows,
            cols,
            block_rows,
            block_cols,
            bits,
            codes: vec![0; rows * cols],
            scales: Vec::new(),
            offsets: Vec::new(),
        };
        let levels = ((1u32 << bits) - 1) as f32;
        let nb = (rows / block_rows) * (cols / block_cols);
        let (mut lo, mut hi) = (vec![f32::INFINITY; nb], vec![f32::NEG_INFINITY; nb]);
        for r in 0..rows {
            for c in 0..cols {
                let b = q.block_of(r, c);
                let x = w[r * cols + c];
                if !x.is_finite() {
                    return Err(bad(format!("value {x} at [{r}, {c}]")));
                }
                lo[b] = lo[b].min(x);
                hi[b] = hi[b].max(x);
            }
        }
        q.scales = lo
            .iter()
            .zip(&hi)
            .map(|(l, h)| if h > l { (h - l) / levels } else { 1.0 })
            .collect();
        q.offsets = lo;
        for r in 0..rows {
            for c in 0..cols {
                let b = q.block_of(r, c);
                let code = ((w[r * cols + c] - q.offsets[b]) / q.scales[b]).round();
                q.codes[r * cols + c] = code.clamp(0.0, levels) as u8;
            }
        }
        Ok(q)
    }

    /// `scale · c + offset` for every weight, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for r in 0..self.rows {
            for c in 0..self.cols {
                let b = self.block_of(r, c);
                out[r * self.cols + c] =
                    self.scales[b] * f32::from(self.codes[r * self.cols + c]) + self.offsets[b];
            }
        }
        out
    }

    /// Folds a block-constant difference `delta` (row-major, e.g. a QA-HiRA adapter's `up·down`)
    /// into the offsets: afterwards `dequantize()` is the old one plus `delta`. Fails, naming
    /// the block, where `delta` varies inside a block by more than `tolerance` (an adapter whose
    /// groups do not match the blocks).
    pub fn fold(&mut self, delta: &[f32], tolerance: f32) -> Result<()> {
        if delta.len() != self.rows * self.cols {
            return Err(bad(format!(
                "a difference of {} values for a [{}, {}] matrix",
                delta.len(),
                self.rows,
                self.cols
            )));
        }
        let nb = self.scales.len();
        let mut value = vec![f32::NAN; nb];
        for r in 0..self.rows {
            for c in 0..self.cols {
                let b = self.block_of(r, c);
                let d = delta[r * self.cols + c];
                if value[b].is_nan() {
                    value[b] = d;
                } else if (d - value[b]).abs() > tolerance {
                    return Err(bad(format!(
                        "the difference is not constant on the {}x{} block at [{}, {}] ({} vs {}); \
                         the adapter's --hira-groups must equal the quantization block",
                        self.block_rows,
                        self.block_cols,
                        r - r % self.block_rows,
                        c - c % self.block_cols,
                        value[b],
                        d
                    )));
                }
            }
        }
        for (o, v) in self.offsets.iter_mut().zip(value) {
            *o += v;
        }
        Ok(())
    }
}

impl BlockQuantized {
    /// Blocks in the matrix (`rows/block_rows × cols/block_cols`).
    pub fn blocks(&self) -> usize {
        (self.rows / self.block_rows) * self.blocks_per_row()
    }

    /// Bits the stored form costs: the packed codes plus an F32 scale and offset per block.
    pub fn stored_bits(&self) -> u64 {
        8 * packed_len(self.rows * self.cols, u32::from(self.bits)) as u64
            + 64 * self.blocks() as u64
    }

    /// The `blockq` parts and params on `builder` (an entry decoding to the weight itself):
    ///
    /// | role | dtype, shape | meaning |
    /// | --- | --- | --- |
    /// | `codes` | U8 `[ceil(rows·cols·bits/8)]` | codes row-major, packed LSB-first ([`pack_codes`]) |
    /// | `scales` | F32 `[rows/block_rows, cols/block_cols]` | each block's step |
    /// | `offsets` | F32 `[rows/block_rows, cols/block_cols]` | each block's value of code 0 |
    ///
    /// Params: `bits`, `block_rows`, `block_cols`.
    pub fn encode_parts(&self, builder: EncodedBuilder) -> EncodedBuilder {
        let grid = vec![self.rows / self.block_rows, self.blocks_per_row()];
        builder
            .finetuned_value()
            .param("bits", self.bits)
            .param("block_rows", self.block_rows)
            .param("block_cols", self.block_cols)
            .part(
                "codes",
                OwnedTensor::new(
                    Dtype::U8,
                    vec![packed_len(self.codes.len(), u32::from(self.bits))],
                    pack_codes(&self.codes, u32::from(self.bits)),
                ),
            )
            .part("scales", OwnedTensor::from_f32(grid.clone(), &self.scales))
            .part("offsets", OwnedTensor::from_f32(grid, &self.offsets))
    }

    /// Reads a `blockq` entry back (the parts of [`BlockQuantized::encode_parts`]), checking
    /// params, part sizes and that every code fits its bits.
    pub fn from_coded(v: &CodedView<'_>) -> Result<Self> {
        let [rows, cols] = v.shape;
        let bits = v.param_u64("bits")?;
        if !(1..=8).contains(&bits) {
            return Err(v.bad(format!("param bits={bits} is not in 1..=8")));
        }
        let (br, bc) = (
            v.param_u64("block_rows")? as usize,
            v.param_u64("block_cols")? as usize,
        );
        if br == 0 || bc == 0 || !rows.is_multiple_of(br) || !cols.is_multiple_of(bc) {
            return Err(v.bad(format!(
                "blocks of {br}x{bc} do not tile a [{rows}, {cols}] matrix"
            )));
        }
        let n = rows * cols;
        let codes = unpack_codes(
            v.part_u8("codes", packed_len(n, bits as u32))?,
            bits as u32,
            n,
        );
        if let Some(&c) = codes.iter().find(|&&c| u32::from(c) >= 1 << bits) {
            return Err(v.bad(format!("code {c} exceeds {bits} bits")));
        }
        let nb = (rows / br) * (cols / bc);
        Ok(Self {
            rows,
            cols,
            block_rows: br,
            block_cols: bc,
            bits: bits as u8,
            codes,
            scales: v.part_f32("scales", nb)?,
            offsets: v.part_f32("offsets", nb)?,
        })
    }
}

/// The file of a quantized base directory that holds its codes (`deltaserve quantize --out`).
pub const CODES_FILE: &str = "quantization.delta";

/// The `blockq` codec: [`BlockQuantized`] of the whole weight (`value: finetuned`), the base a
/// QA-HiRA adapter folds into. Used by `deltaserve quantize --method blockq:...`; as a
/// `compress` method it quantizes the fine-tune itself, like `rtn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockQuant {
    /// Bits per code, 1..=8.
    pub bits: u8,
    /// Rows per block (the adapter's `g_o`, second number of `--hira-groups`).
    pub block_rows: usize,
    /// Columns per block (the adapter's `g_i`, first number of `--hira-groups`).
    pub block_cols: usize,
}

/// Registry entry of [`BlockQuant`].
pub const INFO: CodecInfo = CodecInfo {
    name: "blockq",
    summary: "min/max round-to-nearest of the whole weight in ROWS x COLS blocks, F32 scale and \
              offset per block (the base a QA-HiRA adapter folds into)",
    settings: &[
        Setting {
            key: "bits",
            help: "N: bits per code, 1..=8 (default 4)",
        },
        Setting {
            key: "rows",
            help: "N: rows (output features) per block, = OUT of finetune --hira-groups IN,OUT (default 8)",
        },
        Setting {
            key: "cols",
            help: "N: columns (input features) per block, = IN of finetune --hira-groups IN,OUT (default 4)",
        },
    ],
    build: build_blockq,
    decode: decode_blockq,
};

fn build_blockq(args: &mut SpecArgs) -> Result<Box<dyn Codec>> {
    let bits = args.usize("bits")?.unwrap_or(4);
    if !(1..=8).contains(&bits) {
        return Err(args.invalid(format!("bits={bits} is not in 1..=8")));
    }
    Ok(Box::new(BlockQuant {
        bits: bits as u8,
        block_rows: args.usize("rows")?.unwrap_or(8),
        block_cols: args.usize("cols")?.unwrap_or(4),
    }))
}

fn decode_blockq(v: &CodedView<'_>) -> Result<Decoded> {
    Ok(Decoded::Dense(BlockQuantized::from_coded(v)?.dequantize()))
}

impl Codec for BlockQuant {
    fn name(&self) -> &'static str {
        INFO.name
    }

    fn spec(&self) -> String {
        format!(
            "blockq:bits={},rows={},cols={}",
            self.bits, self.block_rows, self.block_cols
        )
    }

    fn encode(&self, m: &MatrixInput<'_>) -> Result<Encoded> {
        let q = BlockQuantized::quantize(
            m.finetuned,
            m.rows,
            m.cols,
            self.bits,
            self.block_rows,
            self.block_cols,
        )
        .map_err(|e| bad(format!("{}: {e}", m.name)))?;
        Ok(q.encode_parts(EncodedBuilder::new(INFO.name, m)).build())
    }
}

/// The QA-HiRA block `(g_o, g_i)` of an adapter delta written by `deltaserve finetune --adapter
/// qahira` (every entry's `params.block`), or `None` for any other delta.
pub fn adapter_block(adapter: &DeltaFile) -> Option<(usize, usize)> {
    let mut block = None;
    for entry in adapter.header().tensors.values() {
        let TensorEntry::Coded { params, .. } = entry else {
            return None;
        };
        if params.get("adapter").and_then(|a| a.as_str()) != Some("qahira") {
            return None;
        }
        let b = params.get("block")?.as_array()?;
        let this = (b.first()?.as_u64()? as usize, b.get(1)?.as_u64()? as usize);
        if *block.get_or_insert(this) != this {
            return None;
        }
    }
    block
}

/// The block `(rows, cols)` of a quantized base's codes when every coded entry is `blockq` with
/// the same block; `None` when it holds another codec (RTN, GPTQ) or no coded entry.
pub fn codes_block(codes: &DeltaFile) -> Option<(usize, usize)> {
    let mut block = None;
    for entry in codes.header().tensors.values() {
        let TensorEntry::Coded { codec, params, .. } = entry else {
            continue;
        };
        if codec != INFO.name {
            return None;
        }
        let this = (
            params.get("block_rows")?.as_u64()? as usize,
            params.get("block_cols")?.as_u64()? as usize,
        );
        if *block.get_or_insert(this) != this {
            return None;
        }
    }
    block
}

/// Opens `dir/quantization.delta` if `dir` is a quantized base.
pub fn open_codes(dir: &Path) -> Result<Option<DeltaFile>> {
    let path = dir.join(CODES_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    Ok(Some(DeltaFile::open(&path)?))
}

/// Checks, before training, that a QA-HiRA adapter with groups `(g_o, g_i)` will fold into the
/// base in `dir`: where `dir` holds `blockq` codes, their block must equal the groups. A base
/// without codes (or with RTN/GPTQ codes) passes: the adapter trains, it just cannot fold.
pub fn check_groups_match_base(dir: &Path, g_o: usize, g_i: usize) -> Result<()> {
    let Some(codes) = open_codes(dir)? else {
        return Ok(());
    };
    match codes_block(&codes) {
        Some((br, bc)) if (br, bc) != (g_o, g_i) => Err(CodecError::BadOption {
            option: "--hira-groups",
            detail: format!(
                "{g_i},{g_o} (blocks of {g_o} rows x {g_i} columns) do not match the \
                 {br}x{bc} quantization blocks of {}, so the adapter could not fold into it; \
                 use --hira-groups {bc},{br}",
                dir.display()
            ),
        }),
        _ => Ok(()),
    }
}

/// The merged model's codes, from [`fold_adapter`].
#[derive(Debug)]
pub struct FoldedCodes {
    /// The header of the new `quantization.delta`.
    pub header: DeltaHeader,
    /// Its container tensors.
    pub tensors: Vec<(String, OwnedTensor)>,
    /// Projections whose offsets changed.
    pub folded: usize,
}

/// Folds QA-HiRA adapter `adapter` (made against the quantized base whose codes are `codes`)
/// into those codes: every `blockq` entry keeps its codes and scales, its offsets gain the
/// adapter's block-constant `ΔW` ([`BlockQuantized::fold`]); every other entry is copied. The
/// result's header records `base` (the quantized base the merged model came from) and the
/// adapter in `extra.qahira_fold`.
///
/// Fails, naming the tensor and the fix, when the adapter is not QA-HiRA, its blocks differ from
/// the codes', or it changes a weight the codes do not hold.
pub fn fold_adapter(
    codes: &DeltaFile,
    adapter: &DeltaFile,
    base: BaseFingerprint,
) -> Result<FoldedCodes> {
    let Some(block) = adapter_block(adapter) else {
        return Err(CodecError::BadOption {
            option: "--delta",
            detail: format!(
                "{} is not a QA-HiRA adapter (method {}); only `deltaserve finetune --adapter \
                 qahira` adapters fold into quantized codes (use --quantized no for a dense merge)",
                adapter.path().display(),
                adapter.header().method
            ),
        });
    };
    let Some(qblock) = codes_block(codes) else {
        return Err(CodecError::BadOption {
            option: "--base",
            detail: format!(
                "{} does not hold blockq codes (method {}); quantize the base with \
                 `deltaserve quantize --method blockq:rows={},cols={}` (or use --quantized no)",
                codes.path().display(),
                codes.header().method,
                block.0,
                block.1
            ),
        });
    };
    if qblock != block {
        return Err(CodecError::BadOption {
            option: "--delta",
            detail: format!(
                "the adapter's blocks are {}x{} (--hira-groups {},{}) but the base is quantized \
                 in {}x{} blocks; fine-tune with --hira-groups {},{} (or use --quantized no)",
                block.0, block.1, block.1, block.0, qblock.0, qblock.1, qblock.1, qblock.0
            ),
        });
    }
    for name in adapter.header().tensors.keys() {
        if !matches!(
            codes.header().tensors.get(name),
            Some(TensorEntry::Coded { .. })
        ) {
            return Err(CodecError::BadCoded {
                delta: adapter.path().to_owned(),
                tensor: name.clone(),
                detail: format!(
                    "the adapter changes it but {} holds no codes for it",
                    codes.path().display()
                ),
            });
        }
    }
    let mut header = codes.header().clone();
    header.base = base;
    header.created_by = format!("deltaserve {}", env!("CARGO_PKG_VERSION"));
    header.extra.insert(
        "qahira_fold".into(),
        serde_json::json!({
            "adapter": adapter.path().display().to_string(),
            "adapter_method": adapter.header().method,
            "adapter_base": adapter.header().base.hex,
            "block": [block.0, block.1],
        }),
    );
    let mut tensors = Vec::new();
    let mut folded = 0;
    for (name, entry) in &codes.header().tensors {
        match entry {
            TensorEntry::Coded {
                dtype,
                shape,
                params,
                ..
            } => {
                let view = CodedView {
                    delta: codes,
                    name,
                    entry,
                    shape: *shape,
                    params,
                };
                let mut q = BlockQuantized::from_coded(&view)?;
                if let Some(a) = adapter.header().tensors.get(name) {
                    let delta = decode_dense(adapter, name, a)?;
                    // up is 0/1 with one 1 per row, so `up · down` repeats one value of `down`
                    // per tile exactly; the tolerance only forgives f64→f32 rounding.
                    let max = delta.iter().fold(0f32, |m, d| m.max(d.abs()));
                    q.fold(&delta, max * 1e-6)
                        .map_err(|e| CodecError::BadCoded {
                            delta: adapter.path().to_owned(),
                            tensor: name.clone(),
                            detail: e.to_string(),
                        })?;
                    folded += 1;
                }
                let base_dtype = deltaserve_format::parse_dtype(dtype).unwrap_or(Dtype::F32);
                let m = MatrixInput {
                    name,
                    rows: q.rows,
                    cols: q.cols,
                    base: &[],
                    finetuned: &[],
                    base_dtype,
                    calibration: None,
                };
                let enc = q.encode_parts(EncodedBuilder::new(INFO.name, &m)).build();
                tensors.extend(enc.tensors);
            }
            other => {
                for t in other.expected_tensors() {
                    let (bytes, dtype, shape) = codes.tensor_bytes(t.name)?;
                    tensors.push((
                        t.name.to_owned(),
                        OwnedTensor::new(dtype, shape.to_vec(), bytes.to_vec()),
                    ));
                }
            }
        }
    }
    Ok(FoldedCodes {
        header,
        tensors,
        folded,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| ((i as f32) * 0.713).sin() * 0.1)
            .collect()
    }

    #[test]
    fn quantization_error_is_at_most_half_a_step() {
        let (rows, cols) = (16, 12);
        let w = matrix(rows, cols);
        let q = BlockQuantized::quantize(&w, rows, cols, 4, 8, 4).unwrap();
        let d = q.dequantize();
        for r in 0..rows {
            for c in 0..cols {
                let b = (r / 8) * 3 + c / 4;
                let err = (d[r * cols + c] - w[r * cols + c]).abs();
                assert!(err <= 0.5 * q.scales[b] * (1.0 + 1e-5), "[{r},{c}] {err}");
            }
        }
    }

    #[test]
    fn folding_a_block_constant_difference_adds_it_exactly() {
        let (rows, cols) = (16, 12);
        let w = matrix(rows, cols);
        let mut q = BlockQuantized::quantize(&w, rows, cols, 3, 8, 4).unwrap();
        let before = q.dequantize();
        let delta: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let (r, c) = (i / cols, i % cols);
                ((r / 8) as f32 - 0.5) * 0.01 + (c / 4) as f32 * 0.003
            })
            .collect();
        let codes = q.codes.clone();
        q.fold(&delta, 0.0).unwrap();
        assert_eq!(q.codes, codes, "codes are untouched");
        let after = q.dequantize();
        for i in 0..rows * cols {
            // One extra f32 addition per weight: |error| ≤ 2 ulp of the magnitude.
            let expect = f64::from(before[i]) + f64::from(delta[i]);
            assert!(
                (f64::from(after[i]) - expect).abs() <= 2.0 * f64::from(f32::EPSILON) * 0.2,
                "{i}: {} vs {expect}",
                after[i]
            );
        }
    }

    #[test]
    fn blockq_specs_parse_and_bad_ones_are_one_line() {
        use crate::codec::parse_codec;
        assert_eq!(
            parse_codec("blockq").unwrap().spec(),
            "blockq:bits=4,rows=8,cols=4"
        );
        assert_eq!(
            parse_codec("blockq:bits=3,rows=16,cols=32").unwrap().spec(),
            "blockq:bits=3,rows=16,cols=32"
        );
        for (spec, says) in [
            ("blockq:bits=9", "bits=9 is not in 1..=8"),
            ("blockq:rows=0", "rows=0 is not a positive integer"),
            ("blockq:block=4", "unknown setting \"block\""),
        ] {
            let e = parse_codec(spec).unwrap_err().to_string();
            assert!(e.contains(says) && !e.contains('\n'), "{spec}: {e}");
        }
        // A matrix the blocks do not tile: the error names the weight.
        let codec = parse_codec("blockq:rows=3").unwrap();
        let w = matrix(8, 8);
        let m = MatrixInput {
            name: "model.layers.0.mlp.up_proj.weight",
            rows: 8,
            cols: 8,
            base: &w,
            finetuned: &w,
            base_dtype: Dtype::BF16,
            calibration: None,
        };
        let e = codec.encode(&m).unwrap_err().to_string();
        assert!(e.contains("up_proj") && e.contains("3x4"), "{e}");
    }

    #[test]
    fn stored_bits_are_codes_plus_two_f32_per_block() {
        let q = BlockQuantized::quantize(&matrix(16, 32), 16, 32, 4, 8, 4).unwrap();
        // 512 weights × 4 bits + 16 blocks × 64 bits = 6 bits per weight.
        assert_eq!(q.stored_bits(), 512 * 4 + 16 * 64);
        let codec = BlockQuant {
            bits: 4,
            block_rows: 8,
            block_cols: 4,
        };
        let w = matrix(16, 32);
        let m = MatrixInput {
            name: "w",
            rows: 16,
            cols: 32,
            base: &w,
            finetuned: &w,
            base_dtype: Dtype::F32,
            calibration: None,
        };
        let enc = codec.encode(&m).unwrap();
        assert_eq!(enc.stored_bytes() * 8, q.stored_bits());
        assert_eq!(enc.bits_per_param(), 6.0);
    }

    #[test]
    fn a_difference_that_varies_inside_a_block_is_refused() {
        let w = matrix(8, 8);
        let mut q = BlockQuantized::quantize(&w, 8, 8, 4, 4, 4).unwrap();
        let mut delta = vec![0f32; 64];
        delta[1] = 0.5;
        let e = q.fold(&delta, 1e-6).unwrap_err().to_string();
        assert!(e.contains("not constant") && e.contains("[0, 0]"), "{e}");
        assert!(BlockQuantized::quantize(&w, 8, 8, 4, 3, 4)
            .unwrap_err()
            .to_string()
            .contains("3x4"));
        assert!(BlockQuantized::quantize(&w, 8, 8, 9, 4, 4).is_err());
    }
}
