//! BitDelta (Liu et al., arXiv 2402.10193): each attention and MLP projection's fine-tune delta
//! `D = W_ft − W_base` becomes its sign matrix plus one scale, `W_ft ≈ W_base + α·sign(D)` with
//! `α = mean|D|` (eq. 2, the L2-optimal scale for a fixed sign matrix).
//!
//! Choices follow the reference implementation (FasterDecoding/BitDelta, `bitdelta/diff.py`):
//! - compressed: every 2-D `*.weight` whose module path contains `mlp` or `self_attn` and whose
//!   own name contains `proj` (q/k/v/o and gate/up/down of every layer; [`is_compressed`]);
//! - `D` is computed as the reference does on its bf16 model: `finetune − base` in the weights'
//!   dtype (the f32 difference rounded once to bf16/f16; kept in f32 when the two dtypes differ);
//! - sign bit 1 ⇔ `D ≥ 0` (the reference's `mask[diff < 0] = 0`), packed by `deltaserve-format`;
//! - everything else (embeddings, norms, `lm_head`, and the projections' biases, which the
//!   reference drops) is stored as the fine-tune's own values.
//!
//! [`compress`] streams: both checkpoints stay memory-mapped, each thread takes one tensor at a
//! time and walks it in row blocks, hashing each base block for the fingerprint and compressing
//! it while it is in cache (so the base is read once), and results go straight to their place in
//! the output file ([`DeltaStreamWriter`]). At most one tensor per thread is in flight.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use deltaserve_format::{
    words_per_row, BaseFingerprint, DeltaHeader, DeltaStreamWriter, Dtype, FingerprintBuilder,
    FullValue, TensorEntry, TensorHasher, TensorSpec,
};
use deltaserve_model::{Checkpoint, RawTensor};
use rayon::prelude::*;

use crate::error::{CodecError, Result};
use crate::files::finetune_files;
use crate::numeric::{sum_abs_f64, FloatDtype};
use crate::progress::Progress;

/// The method name recorded in delta headers.
pub const METHOD: &str = "bitdelta";

/// Values per row block: the unit a matrix is streamed in (fits in L2 with its inputs). Kept
/// below the format crate's threshold for packing in parallel, so packing stays on its thread.
const BLOCK_VALUES: usize = 1 << 15;

/// Whether BitDelta compresses the checkpoint tensor `name` of this shape: a 2-D `*.weight` of a
/// module whose own name contains `proj` and whose parent's path contains `mlp` or `self_attn`
/// (the reference's `named_modules` / `named_children` filter).
///
/// ```
/// use deltaserve_codecs::bitdelta::is_compressed;
/// assert!(is_compressed("model.layers.3.self_attn.q_proj.weight", &[64, 64]));
/// assert!(is_compressed("model.layers.3.mlp.down_proj.weight", &[64, 160]));
/// assert!(!is_compressed("model.layers.3.self_attn.q_proj.bias", &[64]));
/// assert!(!is_compressed("model.layers.3.input_layernorm.weight", &[64]));
/// assert!(!is_compressed("lm_head.weight", &[512, 64]));
/// ```
pub fn is_compressed(name: &str, shape: &[usize]) -> bool {
    let Some(module) = name.strip_suffix(".weight") else {
        return false;
    };
    let Some((parent, child)) = module.rsplit_once('.') else {
        return false;
    };
    shape.len() == 2
        && shape.iter().all(|&d| d > 0)
        && (parent.contains("mlp") || parent.contains("self_attn"))
        && child.contains("proj")
}

/// What [`compress`] should do besides compressing.
#[derive(Debug, Clone)]
pub struct CompressOptions {
    /// The delta file to write.
    pub out: PathBuf,
    /// Replace `out` if it exists.
    pub force: bool,
    /// Show a progress bar on stderr (drawn only when stderr is a terminal).
    pub progress: bool,
}

/// What [`compress`] did, for the summary line.
#[derive(Debug, Clone, PartialEq)]
pub struct CompressReport {
    /// The delta written.
    pub out: PathBuf,
    /// The base's fingerprint, as recorded in the delta.
    pub base: BaseFingerprint,
    /// Matrices stored as signs + scale.
    pub tensors_compressed: usize,
    /// Tensors stored as the fine-tune's values.
    pub tensors_full: usize,
    /// Parameters of the compressed matrices.
    pub compressed_params: u64,
    /// Parameters of the whole fine-tune.
    pub total_params: u64,
    /// Size of the fine-tune's weight files.
    pub bytes_in: u64,
    /// Size of the delta file.
    pub bytes_out: u64,
    /// Bits per parameter of the compressed matrices (signs, padding and scales).
    pub bits_per_param: f64,
    /// Wall-clock time.
    pub elapsed: Duration,
}

impl CompressReport {
    /// The fine-tune in bf16 (2 bytes per parameter) over the delta's size.
    pub fn ratio_vs_bf16(&self) -> f64 {
        (2 * self.total_params) as f64 / self.bytes_out.max(1) as f64
    }

    /// The fine-tune's weight files over the delta's size.
    pub fn ratio_vs_file(&self) -> f64 {
        self.bytes_in as f64 / self.bytes_out.max(1) as f64
    }

    /// Fine-tune bytes read per second.
    pub fn throughput_gb_s(&self) -> f64 {
        self.bytes_in as f64 / 1e9 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl std::fmt::Display for CompressReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "wrote {}", self.out.display())?;
        writeln!(
            f,
            "  tensors: {} compressed (sign + scale), {} stored in full",
            self.tensors_compressed, self.tensors_full
        )?;
        writeln!(
            f,
            "  size: {} in (fine-tune files) -> {} out; {:.3} bits/param on the {} compressed parameters",
            human_bytes(self.bytes_in),
            human_bytes(self.bytes_out),
            self.bits_per_param,
            self.compressed_params
        )?;
        writeln!(
            f,
            "  ratio: {:.2}x against the fine-tune in bf16, {:.2}x against its files",
            self.ratio_vs_bf16(),
            self.ratio_vs_file()
        )?;
        writeln!(f, "  base fingerprint: {}", self.base.short())?;
        write!(
            f,
            "  time: {:.2}s ({:.2} GB/s of fine-tune read)",
            self.elapsed.as_secs_f64(),
            self.throughput_gb_s()
        )
    }
}

/// `1234567` as `1.23 MB`.
pub fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    match bytes {
        0..1_000 => format!("{bytes} B"),
        1_000..1_000_000 => format!("{:.2} kB", b / 1e3),
        1_000_000..1_000_000_000 => format!("{:.2} MB", b / 1e6),
        _ => format!("{:.2} GB", b / 1e9),
    }
}

/// How one tensor of the pair is handled (shared with the coded pipeline, [`crate::coded`]).
pub(crate) enum Work<'a> {
    /// Compressed to signs + scale.
    Sign {
        name: &'a str,
        base: RawTensor<'a>,
        finetuned: RawTensor<'a>,
    },
    /// Stored as the fine-tune's value; the base's tensor of that name, if any, is hashed.
    Full {
        name: &'a str,
        base: Option<RawTensor<'a>>,
        finetuned: RawTensor<'a>,
    },
    /// Only in the base (the `lm_head` of a base whose fine-tune ties it): hashed.
    BaseOnly { name: &'a str, base: RawTensor<'a> },
}

impl Work<'_> {
    /// Bytes this work reads from both checkpoints.
    pub(crate) fn bytes(&self) -> u64 {
        match self {
            Work::Sign { base, .. } => base.data.len() as u64 + self.finetuned_bytes(),
            Work::Full { base, .. } => {
                base.map_or(0, |b| b.data.len() as u64) + self.finetuned_bytes()
            }
            Work::BaseOnly { base, .. } => base.data.len() as u64,
        }
    }

    pub(crate) fn finetuned_bytes(&self) -> u64 {
        match self {
            Work::Sign { finetuned, .. } | Work::Full { finetuned, .. } => {
                finetuned.data.len() as u64
            }
            Work::BaseOnly { .. } => 0,
        }
    }
}

/// Checks that base and fine-tune are the same model up to training: same architecture, model
/// type, layer count and hidden size. Tensor shapes are checked while planning.
pub fn check_pair(base: &Checkpoint, finetuned: &Checkpoint) -> Result<()> {
    let incompatible = |field, b: String, f: String| CodecError::Incompatible {
        base_dir: base.dir().to_owned(),
        finetuned_dir: finetuned.dir().to_owned(),
        field,
        base: b,
        finetuned: f,
    };
    let json = |c: &Checkpoint, key: &str| {
        c.config_json()
            .get(key)
            .map_or_else(|| "absent".to_owned(), |v| v.to_string())
    };
    for field in ["architectures", "model_type"] {
        let (b, f) = (json(base, field), json(finetuned, field));
        if b != f {
            return Err(incompatible(field, b, f));
        }
    }
    let (b, f) = (base.config(), finetuned.config());
    if b.num_hidden_layers != f.num_hidden_layers {
        return Err(incompatible(
            "num_hidden_layers",
            b.num_hidden_layers.to_string(),
            f.num_hidden_layers.to_string(),
        ));
    }
    if b.hidden_size != f.hidden_size {
        return Err(incompatible(
            "hidden_size",
            b.hidden_size.to_string(),
            f.hidden_size.to_string(),
        ));
    }
    Ok(())
}

/// Decides, for every tensor of either checkpoint, what to do with it; fails on the first
/// tensor that cannot be handled.
pub(crate) fn plan<'a>(base: &'a Checkpoint, finetuned: &'a Checkpoint) -> Result<Vec<Work<'a>>> {
    let mut work = Vec::new();
    let ft_names: HashSet<&str> = finetuned.tensor_names().into_iter().collect();
    for name in finetuned.tensor_names() {
        let ft = finetuned.raw(name)?;
        if is_compressed(name, ft.shape) {
            if !base.contains(name) {
                return Err(CodecError::MissingTensor {
                    tensor: name.to_owned(),
                    has: "fine-tune",
                    lacks: "base",
                    dir: base.dir().to_owned(),
                });
            }
            let b = base.raw(name)?;
            if b.shape != ft.shape {
                return Err(CodecError::ShapeMismatch {
                    tensor: name.to_owned(),
                    base_shape: b.shape.to_vec(),
                    finetuned_shape: ft.shape.to_vec(),
                    base_dir: base.dir().to_owned(),
                    finetuned_dir: finetuned.dir().to_owned(),
                });
            }
            for (raw, dir) in [(&b, base.dir()), (&ft, finetuned.dir())] {
                if FloatDtype::from_safetensors(raw.dtype).is_none() {
                    return Err(CodecError::UnsupportedDtype {
                        tensor: name.to_owned(),
                        dir: dir.to_owned(),
                        dtype: raw.dtype.to_string(),
                    });
                }
            }
            work.push(Work::Sign {
                name,
                base: b,
                finetuned: ft,
            });
        } else {
            let b = if base.contains(name) {
                Some(base.raw(name)?)
            } else {
                None
            };
            work.push(Work::Full {
                name,
                base: b,
                finetuned: ft,
            });
        }
    }
    for name in base.tensor_names() {
        if ft_names.contains(name) {
            continue;
        }
        // A fine-tune may tie lm_head to the embeddings where its base did not; every other
        // base tensor must be in the fine-tune.
        if name == "lm_head.weight" && finetuned.config().tie_word_embeddings {
            work.push(Work::BaseOnly {
                name,
                base: base.raw(name)?,
            });
        } else {
            return Err(CodecError::MissingTensor {
                tensor: name.to_owned(),
                has: "base",
                lacks: "fine-tune",
                dir: finetuned.dir().to_owned(),
            });
        }
    }
    Ok(work)
}

/// Compresses `finetuned` against `base` with BitDelta and writes the delta to `opts.out`.
///
/// Fails before writing anything if the two are not the same model up to training
/// ([`check_pair`]), if a compressed tensor's shapes differ, if a tensor of one is missing from
/// the other, or if `opts.out` exists and `opts.force` is not set.
pub fn compress(
    base: &Checkpoint,
    finetuned: &Checkpoint,
    opts: &CompressOptions,
) -> Result<CompressReport> {
    let start = Instant::now();
    check_pair(base, finetuned)?;
    let work = plan(base, finetuned)?;

    let (info, extra_files) = finetune_files(base, finetuned)?;
    let mut header = DeltaHeader::new(METHOD, FingerprintBuilder::new().finish(), info);
    header.extra.insert("bitdelta".to_owned(), method_params());
    header.extra.extend(extra_files);
    let mut specs = Vec::with_capacity(work.len() * 2);
    for w in &work {
        match w {
            Work::Sign { name, base, .. } => {
                let [rows, cols] = [base.shape[0], base.shape[1]];
                let entry = TensorEntry::sign(name, [rows, cols], base.dtype);
                if let TensorEntry::Sign { signs, scale, .. } = &entry {
                    specs.push(TensorSpec {
                        name: signs.clone(),
                        dtype: Dtype::U32,
                        shape: vec![rows, words_per_row(cols)],
                    });
                    specs.push(TensorSpec {
                        name: scale.clone(),
                        dtype: Dtype::F32,
                        shape: vec![1],
                    });
                }
                header.tensors.insert(name.to_string(), entry);
            }
            Work::Full {
                name, finetuned, ..
            } => {
                let entry = TensorEntry::full(
                    name,
                    FullValue::Finetuned,
                    finetuned.shape.to_vec(),
                    finetuned.dtype,
                );
                specs.push(TensorSpec {
                    name: name.to_string(),
                    dtype: finetuned.dtype,
                    shape: finetuned.shape.to_vec(),
                });
                header.tensors.insert(name.to_string(), entry);
            }
            Work::BaseOnly { .. } => {}
        }
    }
    let writer = DeltaStreamWriter::create(&opts.out, &header, specs, opts.force)?;

    let total: u64 = work.iter().map(Work::finetuned_bytes).sum();
    let progress = Progress::new(opts.progress, total, "compressing");
    let fingerprint = FingerprintBuilder::new();
    // One tensor per thread, each processed sequentially in row blocks (base bytes hashed and
    // compressed while in cache), so at most `threads` tensors are in flight. Largest first, so
    // the threads finish together.
    let mut order: Vec<&Work<'_>> = work.iter().collect();
    order.sort_by_key(|w| std::cmp::Reverse(w.bytes()));
    order.par_iter().try_for_each(|w| -> Result<()> {
        process(w, &writer, &fingerprint, &header)?;
        progress.inc(w.finetuned_bytes());
        Ok(())
    })?;
    progress.finish();

    header.base = fingerprint.finish();
    writer.finish(&header)?;

    let summary = header.summary();
    let bytes_in = weight_bytes(&finetuned.weight_files())
        .map_err(CodecError::io("read the size of", finetuned.dir()))?;
    let bytes_out = std::fs::metadata(&opts.out)
        .map_err(CodecError::io("read the size of", &opts.out))?
        .len();
    let total_params = work
        .iter()
        .map(|w| match w {
            Work::Sign { finetuned, .. } | Work::Full { finetuned, .. } => {
                finetuned.shape.iter().product::<usize>() as u64
            }
            Work::BaseOnly { .. } => 0,
        })
        .sum();
    Ok(CompressReport {
        out: opts.out.clone(),
        base: header.base.clone(),
        tensors_compressed: work
            .iter()
            .filter(|w| matches!(w, Work::Sign { .. }))
            .count(),
        tensors_full: work
            .iter()
            .filter(|w| matches!(w, Work::Full { .. }))
            .count(),
        compressed_params: summary.compressed_params,
        total_params,
        bytes_in,
        bytes_out,
        bits_per_param: summary.bits_per_param(),
        elapsed: start.elapsed(),
    })
}

/// The method's parameters, recorded under `extra.bitdelta` in the header.
fn method_params() -> serde_json::Value {
    serde_json::json!({
        "compressed": "2-D *.weight of modules named *proj* under *mlp* or *self_attn*",
        "difference": "finetuned - base in the weights' dtype (f32 if the dtypes differ)",
        "sign_bit_one": "difference >= 0",
        "scale_init": "mean(|difference|), accumulated in f64",
        "other_tensors": "stored as the fine-tune's values",
    })
}

/// Does one unit of work: hash the base tensor, compress or copy the fine-tune's.
fn process(
    work: &Work<'_>,
    writer: &DeltaStreamWriter,
    fingerprint: &FingerprintBuilder,
    header: &DeltaHeader,
) -> Result<()> {
    let hasher = |name: &str, raw: &RawTensor<'_>| {
        TensorHasher::new(name, &raw.dtype.to_string(), raw.shape, raw.data.len())
    };
    let hash = |name: &str, raw: &RawTensor<'_>| {
        let mut h = hasher(name, raw);
        h.update(raw.data);
        fingerprint.insert(h.finish());
    };
    match work {
        Work::Sign {
            name,
            base,
            finetuned,
        } => {
            let mut h = hasher(name, base);
            let (words, scale) = compress_matrix_hashing(base, finetuned, Some(&mut h));
            fingerprint.insert(h.finish());
            let Some(TensorEntry::Sign {
                signs, scale: s, ..
            }) = header.tensors.get(*name)
            else {
                unreachable!("every Sign work item has a sign entry. This is a bug.")
            };
            writer.write_tensor(signs, &deltaserve_format::signs::words_to_le_bytes(&words))?;
            writer.write_tensor(s, &scale.to_le_bytes())?;
        }
        Work::Full {
            name,
            base,
            finetuned,
        } => {
            if let Some(b) = base {
                hash(name, b);
            }
            writer.write_tensor(name, finetuned.data)?;
        }
        Work::BaseOnly { name, base } => hash(name, base),
    }
    Ok(())
}

/// BitDelta for one `[rows, cols]` weight: the packed signs of `D = W_ft − W_base` (bit 1 ⇔
/// `D ≥ 0`) and the scale `mean|D|` (eq. 2), summed in f64.
///
/// `D` is the difference the reference computes on its model: in the weights' dtype when both
/// have the same one (the f32 difference rounded once, as PyTorch's bf16 subtraction does),
/// otherwise in f32. The callers have checked that both are `[rows, cols]` float tensors.
pub fn compress_matrix(base: &RawTensor<'_>, finetuned: &RawTensor<'_>) -> (Vec<u32>, f32) {
    compress_matrix_hashing(base, finetuned, None)
}

/// [`compress_matrix`], feeding the base's bytes to `hasher` block by block as they are read,
/// so the base is read from memory once. Runs on the calling thread.
fn compress_matrix_hashing(
    base: &RawTensor<'_>,
    finetuned: &RawTensor<'_>,
    mut hasher: Option<&mut TensorHasher>,
) -> (Vec<u32>, f32) {
    let (rows, cols) = (base.shape[0], base.shape[1]);
    let bd = FloatDtype::from_safetensors(base.dtype).expect("planned as float. This is a bug.");
    let fd =
        FloatDtype::from_safetensors(finetuned.dtype).expect("planned as float. This is a bug.");
    let diff_dtype = if bd == fd { bd } else { FloatDtype::F32 };
    let wpr = words_per_row(cols);
    let block_rows = (BLOCK_VALUES / cols).max(1);
    let mut words = vec![0u32; rows * wpr];
    let mut d = Vec::with_capacity(block_rows * cols);
    let mut total = 0f64;
    for (block, out) in words.chunks_mut(block_rows * wpr).enumerate() {
        let r0 = block * block_rows;
        let nr = out.len() / wpr;
        let n = nr * cols;
        let base_bytes = &base.data[r0 * cols * bd.size()..][..n * bd.size()];
        if let Some(h) = hasher.as_deref_mut() {
            h.update(base_bytes);
        }
        d.resize(n, 0.0);
        diff_dtype.difference_into(
            base_bytes,
            bd,
            &finetuned.data[r0 * cols * fd.size()..][..n * fd.size()],
            fd,
            &mut d,
        );
        out.copy_from_slice(&deltaserve_format::pack_signs(&d, nr, cols));
        // Block sums added in order: the scale does not depend on how work is scheduled.
        total += sum_abs_f64(&d);
    }
    let scale = (total / (rows * cols) as f64) as f32;
    (words, scale)
}

/// Reconstructs a BitDelta weight as the reference's `load_diff` does:
/// `W = cast(f32(W_base) + f32(cast(scale · S)))` with `cast` rounding to `out` (half to even),
/// i.e. PyTorch's in-place `weight.add_((sign * coeff).to(weight.dtype))`. The base is first
/// cast to `out` when it is stored in another dtype. Returns `out`'s little-endian bytes.
pub fn reconstruct_sign(
    base: &RawTensor<'_>,
    words: &[u32],
    scale: f32,
    out: FloatDtype,
) -> Vec<u8> {
    let (rows, cols) = (base.shape[0], base.shape[1]);
    let bd = FloatDtype::from_safetensors(base.dtype).expect("checked as float. This is a bug.");
    let wpr = words_per_row(cols);
    let plus = out.round(scale);
    let minus = out.round(-scale);
    let block_rows = (BLOCK_VALUES / cols).max(1);
    let mut bytes = vec![0u8; rows * cols * out.size()];
    bytes
        .par_chunks_mut(block_rows * cols * out.size())
        .enumerate()
        .for_each(|(block, dst)| {
            let r0 = block * block_rows;
            let nr = dst.len() / (cols * out.size());
            let mut w = vec![0f32; nr * cols];
            bd.decode_into(
                &base.data[r0 * cols * bd.size()..][..nr * cols * bd.size()],
                &mut w,
            );
            for (r, row) in w.chunks_mut(cols).enumerate() {
                let row_words = &words[(r0 + r) * wpr..][..wpr];
                for (c, v) in row.iter_mut().enumerate() {
                    let bit = (row_words[c / 32] >> (c % 32)) & 1;
                    let delta = if bit == 1 { plus } else { minus };
                    *v = out.round(out.round(*v) + delta);
                }
            }
            let mut encoded = Vec::with_capacity(dst.len());
            out.encode_into(&w, &mut encoded);
            dst.copy_from_slice(&encoded);
        });
    bytes
}

/// The compression methods [`compress_with`] knows by bare name (every codec of
/// [`crate::codec::CODECS`] besides BitDelta; settings go after a colon, see
/// [`crate::codec::MethodSpec`]).
pub const METHODS: &[&str] = &[METHOD];

/// Compresses with the method spec `method` (as `--method` takes it: `bitdelta`,
/// `lowrank:rank=16`, …). BitDelta goes through [`compress`] (streaming, unchanged); every other
/// method through [`crate::coded::compress_coded`] without calibration data.
pub fn compress_with(
    method: &str,
    base: &Checkpoint,
    finetuned: &Checkpoint,
    opts: &CompressOptions,
) -> Result<CompressReport> {
    match crate::codec::MethodSpec::parse(method)? {
        crate::codec::MethodSpec::BitDelta => compress(base, finetuned, opts),
        crate::codec::MethodSpec::Coded(codec) => {
            crate::coded::compress_coded(base, finetuned, codec.as_ref(), None, opts)
        }
    }
}

/// A checkpoint's weight-file size (for reports).
pub fn weight_bytes(files: &[&Path]) -> std::io::Result<u64> {
    files
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw<'a>(dtype: Dtype, shape: &'a [usize], data: &'a [u8]) -> RawTensor<'a> {
        RawTensor { dtype, shape, data }
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn compress_matrix_matches_f64_reference_across_blocks() {
        // More rows than one block holds, cols not a multiple of 32, some exact zeros.
        let (rows, cols) = (2 * BLOCK_VALUES / 70 + 3, 70);
        let base: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01)
            .collect();
        let ft: Vec<f32> = base
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if i % 11 == 0 {
                    b
                } else {
                    b + ((i * 13 % 7) as f32 - 3.0) * 1e-3
                }
            })
            .collect();
        let shape = [rows, cols];
        let (bb, fb) = (f32_bytes(&base), f32_bytes(&ft));
        let (words, scale) =
            compress_matrix(&raw(Dtype::F32, &shape, &bb), &raw(Dtype::F32, &shape, &fb));
        let d: Vec<f32> = ft.iter().zip(&base).map(|(f, b)| f - b).collect();
        let mean = d.iter().map(|&x| f64::from(x.abs())).sum::<f64>() / d.len() as f64;
        assert_eq!(scale, mean as f32);
        let signs = deltaserve_format::unpack_signs(&words, rows, cols);
        for (i, (&x, &s)) in d.iter().zip(&signs).enumerate() {
            assert_eq!(s, if x >= 0.0 { 1.0 } else { -1.0 }, "index {i}, D = {x}");
        }
    }

    #[test]
    fn reconstruct_rounds_like_torch_bf16_add() {
        let shape = [1, 3];
        let base = [1.0f32, -2.0, 0.5];
        let mut bytes = Vec::new();
        FloatDtype::BF16.encode_into(&base, &mut bytes);
        // signs + - +; scale 0.003
        let out = reconstruct_sign(
            &raw(Dtype::BF16, &shape, &bytes),
            &[0b101],
            0.003,
            FloatDtype::BF16,
        );
        let got = FloatDtype::BF16.decode(&out);
        let bf = |x: f32| half::bf16::from_f32(x).to_f32();
        let s = bf(0.003);
        assert_eq!(got, vec![bf(1.0 + s), bf(-2.0 - s), bf(0.5 + s)]);
    }

    #[test]
    fn unknown_method_lists_known() {
        let err = CodecError::UnknownMethod {
            method: "zip".into(),
            known: METHODS.join(", "),
        };
        assert_eq!(
            err.to_string(),
            "unknown compression method \"zip\" (known: bitdelta)"
        );
    }
}
