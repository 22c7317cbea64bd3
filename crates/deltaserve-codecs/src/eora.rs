//! EoRA (Liu et al., arXiv 2410.21271): a training-free rank-`r` correction of a codec's
//! compression error, fitted in the eigenspace of the layer's input activations.
//!
//! With `E = W − Ŵ` the error of the compressed weight and `H = Σ xᵀx = Q Λ Qᵀ` the Gram matrix
//! of the layer's calibration inputs, the layer's output error on those inputs is
//! `‖E Xᵀ‖_F = ‖E Q Λ^{1/2}‖_F`. EoRA (§3, eq. 4-6) therefore projects the error,
//! `E' = E Q Λ^{1/2}`, takes its best rank-`r` approximation `U_r Σ_r V_rᵀ` (Eckart-Young), and
//! projects back: `B = U_r Σ_r^{1/2}` (out × r), `A = Σ_r^{1/2} V_rᵀ Λ^{-1/2} Qᵀ` (r × in).
//! `B·A` is then the rank-`r` matrix that minimises the output error `‖(E − BA) Xᵀ‖_F`, where a
//! plain SVD of `E` would minimise the weight error instead.
//!
//! Eigenvalues: as in the EoRA reference (GPTQModel `eora.py`), non-positive eigenvalues are
//! replaced by the smallest positive one; we also floor them at `1e-10·λ_max` so that a
//! rank-deficient `H` (fewer calibration tokens than inputs) cannot blow up `Λ^{-1/2}`.
//! Factors are stored in f16 as the reference stores them; [`LowRankCorrection::round_f16`]
//! rounds them so the encoder's error accounting matches what is decoded.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use deltaserve_format::{
    pack_signs, unpack_signs, words_per_row, BaseFingerprint, DeltaFile, DeltaHeader, FinetuneInfo,
    FullValue, OwnedTensor, TensorEntry,
};
use faer::{Mat, Side};
use half::f16;

use crate::codec::{
    float_tensor, parse_codec, Codec, CodecInfo, CodedView, Decoded, Encoded, EncodedBuilder,
    MatrixInput, Setting, SpecArgs,
};
use crate::error::{CodecError, Result};
use crate::numeric::FloatDtype;

/// A rank-`r` correction `B·A`.
#[derive(Debug, Clone, PartialEq)]
pub struct LowRankCorrection {
    /// Output rows.
    pub rows: usize,
    /// Input columns.
    pub cols: usize,
    /// The rank.
    pub rank: usize,
    /// (rows, rank) row-major.
    pub b: Vec<f32>,
    /// (rank, cols) row-major.
    pub a: Vec<f32>,
}

impl LowRankCorrection {
    /// Rounds both factors to f16 (what is stored).
    pub fn round_f16(&mut self) {
        for v in self.a.iter_mut().chain(self.b.iter_mut()) {
            *v = f16::from_f32(*v).to_f32();
        }
    }

    /// Adds `B·A` to `w` ((rows, cols) row-major), accumulating each entry in f64.
    pub fn add_to(&self, w: &mut [f32]) {
        for (r, row) in w.chunks_mut(self.cols).enumerate() {
            let b = &self.b[r * self.rank..][..self.rank];
            for (c, v) in row.iter_mut().enumerate() {
                let mut s = 0f64;
                for (k, &bk) in b.iter().enumerate() {
                    s += bk as f64 * self.a[k * self.cols + c] as f64;
                }
                *v = (*v as f64 + s) as f32;
            }
        }
    }

    /// Bits per weight of the f16 factors on a `[rows, cols]` matrix.
    pub fn bits_per_param(rows: usize, cols: usize, rank: usize) -> f64 {
        16.0 * (rank * (rows + cols)) as f64 / (rows * cols) as f64
    }
}

/// Why EoRA could not run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EoraError {
    /// `H` is not `cols × cols`.
    #[error("EoRA: the activation Gram matrix has {h} values but the weight has {cols} columns (needs cols² = {})", cols * cols)]
    Shape {
        /// Values in `H`.
        h: usize,
        /// Columns of the weight.
        cols: usize,
    },
    /// The eigen- or singular value decomposition did not converge (NaN/Inf inputs).
    #[error("EoRA: {0} did not converge; check the error matrix and the calibration activations for NaN/Inf")]
    NoConvergence(&'static str),
}

/// The EoRA correction of `err` ((rows, cols) row-major, `W − Ŵ`) given `h` ((cols, cols)
/// row-major, `Σ xᵀx` of the layer's inputs). `rank` is capped at `min(rows, cols)`.
pub fn eora_correction(
    err: &[f32],
    rows: usize,
    cols: usize,
    h: &[f64],
    rank: usize,
) -> std::result::Result<LowRankCorrection, EoraError> {
    assert_eq!(
        err.len(),
        rows * cols,
        "eora_correction: data is not rows × cols"
    );
    if h.len() != cols * cols {
        return Err(EoraError::Shape { h: h.len(), cols });
    }
    let rank = rank.min(rows).min(cols);
    let hm = Mat::from_fn(cols, cols, |i, j| h[i * cols + j]);
    let evd = hm
        .self_adjoint_eigen(Side::Lower)
        .map_err(|_| EoraError::NoConvergence("the eigendecomposition of H"))?;
    let q = evd.U();
    let s = evd.S().column_vector();
    let lmax = (0..cols).map(|i| s[i]).fold(0f64, f64::max);
    let min_pos = (0..cols)
        .map(|i| s[i])
        .filter(|&l| l > 0.0)
        .fold(f64::INFINITY, f64::min);
    let floor = if min_pos.is_finite() {
        min_pos.max(1e-10 * lmax)
    } else {
        1.0
    };
    let sqrt_l: Vec<f64> = (0..cols).map(|i| s[i].max(floor).sqrt()).collect();

    // E' = E · Q · Λ^{1/2}
    let e = Mat::from_fn(rows, cols, |i, j| err[i * cols + j] as f64);
    let mut scaled_q = q.to_owned();
    for (j, &sl) in sqrt_l.iter().enumerate() {
        for i in 0..cols {
            scaled_q[(i, j)] *= sl;
        }
    }
    let ep = &e * &scaled_q;
    let svd = ep
        .thin_svd()
        .map_err(|_| EoraError::NoConvergence("the SVD of the projected error"))?;
    let (u, sv, v) = (svd.U(), svd.S().column_vector(), svd.V());

    // B = U_r Σ_r^{1/2};  A = Σ_r^{1/2} V_rᵀ Λ^{-1/2} Qᵀ
    let mut b = vec![0f32; rows * rank];
    for i in 0..rows {
        for k in 0..rank {
            b[i * rank + k] = (u[(i, k)] * sv[k].sqrt()) as f32;
        }
    }
    // V_rᵀ Λ^{-1/2}: (rank, cols) in the eigenbasis, then times Qᵀ.
    let vt_scaled = Mat::from_fn(rank, cols, |k, j| v[(j, k)] * sv[k].sqrt() / sqrt_l[j]);
    let a_m = &vt_scaled * q.transpose();
    let mut a = vec![0f32; rank * cols];
    for k in 0..rank {
        for j in 0..cols {
            a[k * cols + j] = a_m[(k, j)] as f32;
        }
    }
    Ok(LowRankCorrection {
        rows,
        cols,
        rank,
        b,
        a,
    })
}

/// What EoRA wraps.
#[derive(Debug)]
enum Inner {
    /// BitDelta's sign + scale of `D = W_ft − W_base` (eq. 1-2 of arXiv 2402.10193), stored as
    /// parts here because BitDelta's own `sign` entries are not coded entries.
    BitDelta,
    /// A codec of the registry.
    Codec(Box<dyn Codec>),
}

/// The `eora` codec: any codec plus EoRA's rank-`r` correction of its error.
///
/// Entry: `codec: "eora"`, `value` = the inner codec's. Parts: the inner codec's parts under
/// roles `inner.<role>` (container tensors keep the inner codec's names), plus `eora_b` F16
/// `[rows, rank]` and `eora_a` F16 `[rank, cols]`. Params: `rank`, `inner` (the inner codec's
/// name, `bitdelta` for sign + scale parts `inner.signs` U32 `[rows, ceil(cols/32)]` and
/// `inner.scale` F32 `[1]`), `inner_params` (its params). Decodes to inner + `eora_b · eora_a`;
/// the extra bits per parameter are `16 · rank · (rows + cols) / (rows · cols)`.
#[derive(Debug)]
pub struct Eora {
    /// The correction's rank.
    pub rank: usize,
    inner: Inner,
}

/// Registry entry of [`Eora`].
pub const INFO: CodecInfo = CodecInfo {
    name: "eora",
    summary: "EoRA: another codec plus a rank-r correction of its error in the eigenspace of \
              the layer's inputs (eora:rank=8+bitdelta, eora:rank=4+gptq:bits=4; needs \
              calibration data)",
    settings: &[Setting {
        key: "rank",
        help: "N: rank of the correction (default 8); the wrapped codec follows a +",
    }],
    build: build_eora,
    decode: decode_eora,
};

fn build_eora(args: &mut SpecArgs) -> Result<Box<dyn Codec>> {
    let rank = args.usize("rank")?.unwrap_or(8);
    let inner = args.inner_spec().ok_or_else(|| {
        args.invalid(
            "eora wraps a codec: write eora:rank=8+bitdelta (or +gptq, +lowrank:rank=4, ...)",
        )
    })?;
    let inner = if inner == crate::bitdelta::METHOD {
        Inner::BitDelta
    } else {
        let codec = parse_codec(&inner)?;
        if codec.name() == INFO.name {
            return Err(args.invalid("eora cannot wrap eora"));
        }
        Inner::Codec(codec)
    };
    Ok(Box::new(Eora { rank, inner }))
}

static SCRATCH: AtomicUsize = AtomicUsize::new(0);

/// Decodes a freshly encoded coded entry to its dense matrix. Decoders read from a delta file, so the
/// entry goes through a scratch file in the temp directory (small: one matrix).
pub fn decode_encoded(name: &str, enc: &Encoded) -> Result<Vec<f32>> {
    let path = std::env::temp_dir().join(format!(
        ".deltaserve-eora-{}-{}.delta",
        std::process::id(),
        SCRATCH.fetch_add(1, Ordering::Relaxed)
    ));
    let base = BaseFingerprint {
        algorithm: deltaserve_format::FINGERPRINT_ALGORITHM.to_owned(),
        hex: "0".repeat(64),
        tensors: 0,
    };
    let mut header = DeltaHeader::new("eora-scratch", base, FinetuneInfo::default());
    header.tensors.insert(name.to_owned(), enc.entry.clone());
    let result = (|| {
        deltaserve_format::write_delta(&path, &header, enc.tensors.clone(), true)?;
        let delta = DeltaFile::open(&path)?;
        crate::codec::decode_dense(&delta, name, &enc.entry)
    })();
    let _ = std::fs::remove_file(&path);
    result
}

impl Codec for Eora {
    fn name(&self) -> &'static str {
        INFO.name
    }

    fn spec(&self) -> String {
        let inner = match &self.inner {
            Inner::BitDelta => crate::bitdelta::METHOD.to_owned(),
            Inner::Codec(c) => c.spec(),
        };
        format!("eora:rank={}+{inner}", self.rank)
    }

    fn needs_calibration(&self) -> bool {
        true
    }

    fn encode(&self, m: &MatrixInput<'_>) -> Result<Encoded> {
        let calib = m.required_calibration(INFO.name)?;
        let (rows, cols) = (m.rows, m.cols);
        let mut b = EncodedBuilder::new(INFO.name, m).param("rank", self.rank);
        // Inner encoding, what it decodes to, and what it should have decoded to.
        let (decoded, target, inner_name) = match &self.inner {
            Inner::BitDelta => {
                let d = m.delta();
                // BitDelta eq. 2: scale = mean |D|, summed in f64.
                let scale = (d.iter().map(|&v| f64::from(v.abs())).sum::<f64>()
                    / d.len().max(1) as f64) as f32;
                let words = pack_signs(&d, rows, cols);
                let dec: Vec<f32> = unpack_signs(&words, rows, cols)
                    .into_iter()
                    .map(|s| s * scale)
                    .collect();
                b = b
                    .part(
                        "inner.signs",
                        OwnedTensor::from_u32(vec![rows, words_per_row(cols)], &words),
                    )
                    .part("inner.scale", OwnedTensor::scale(scale))
                    .param("inner_params", serde_json::json!({}));
                (dec, d, crate::bitdelta::METHOD)
            }
            Inner::Codec(c) => {
                let enc = c.encode(m)?;
                let dec = decode_encoded(m.name, &enc)?;
                let TensorEntry::Coded {
                    value,
                    parts,
                    params,
                    ..
                } = &enc.entry
                else {
                    return Err(CodecError::BadOption {
                        option: "--method",
                        detail: format!("eora: {} did not produce a coded entry", c.name()),
                    });
                };
                let target = match value {
                    FullValue::Finetuned => {
                        b = b.finetuned_value();
                        m.finetuned.to_vec()
                    }
                    FullValue::Difference => m.delta(),
                };
                b = b.param(
                    "inner_params",
                    serde_json::to_value(params).unwrap_or_default(),
                );
                let by_tensor: BTreeMap<&str, &str> = parts
                    .iter()
                    .map(|(role, p)| (p.tensor.as_str(), role.as_str()))
                    .collect();
                for (tname, t) in enc.tensors {
                    let role = by_tensor.get(tname.as_str()).copied().unwrap_or("unnamed");
                    b = b.part(&format!("inner.{role}"), t);
                }
                (dec, target, c.name())
            }
        };
        let err: Vec<f32> = target.iter().zip(&decoded).map(|(t, d)| t - d).collect();
        let h: Vec<f64> = calib.gram.iter().map(|&v| f64::from(v)).collect();
        let mut corr = eora_correction(&err, rows, cols, &h, self.rank).map_err(|e| {
            CodecError::BadOption {
                option: "--method",
                detail: format!("{}: {e}", m.name),
            }
        })?;
        corr.round_f16();
        Ok(b.param("inner", inner_name)
            .part(
                "eora_b",
                float_tensor(FloatDtype::F16, vec![rows, corr.rank], &corr.b),
            )
            .part(
                "eora_a",
                float_tensor(FloatDtype::F16, vec![corr.rank, cols], &corr.a),
            )
            .build())
    }
}

fn decode_eora(v: &CodedView<'_>) -> Result<Decoded> {
    let [rows, cols] = v.shape;
    let rank = v.param_u64("rank")? as usize;
    let inner = v
        .params
        .get("inner")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| v.bad("param \"inner\" missing or not a string"))?;
    let TensorEntry::Coded {
        dtype,
        value,
        parts,
        ..
    } = v.entry
    else {
        return Err(v.bad("not a coded entry"));
    };
    let mut w = if inner == crate::bitdelta::METHOD {
        let (bytes, dt, _) = v.part("inner.signs")?;
        if dt != deltaserve_format::Dtype::U32 || bytes.len() != rows * words_per_row(cols) * 4 {
            return Err(v.bad(format!(
                "part inner.signs must be U32 [{rows}, {}]",
                words_per_row(cols)
            )));
        }
        let words: Vec<u32> = bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let scale = v.part_f32("inner.scale", 1)?[0];
        unpack_signs(&words, rows, cols)
            .into_iter()
            .map(|s| s * scale)
            .collect()
    } else {
        let inner_params: BTreeMap<String, serde_json::Value> = v
            .params
            .get("inner_params")
            .and_then(|p| serde_json::from_value(p.clone()).ok())
            .ok_or_else(|| v.bad("param \"inner_params\" missing or not an object"))?;
        let inner_entry = TensorEntry::Coded {
            codec: inner.to_owned(),
            shape: [rows, cols],
            dtype: dtype.clone(),
            value: *value,
            parts: parts
                .iter()
                .filter_map(|(role, p)| {
                    role.strip_prefix("inner.")
                        .map(|r| (r.to_owned(), p.clone()))
                })
                .collect(),
            params: inner_params,
        };
        crate::codec::decode_dense(v.delta, v.name, &inner_entry)?
    };
    let corr = LowRankCorrection {
        rows,
        cols,
        rank,
        b: v.part_f32("eora_b", rows * rank)?,
        a: v.part_f32("eora_a", rank * cols)?,
    };
    corr.add_to(&mut w);
    Ok(Decoded::Dense(w))
}
