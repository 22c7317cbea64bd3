//! `compress --budget-bits B`: one codec per projection matrix, chosen so that the summed
//! reconstruction error `Σ ‖W_rec − W_ft‖²_F` is smallest while the average storage over the
//! compressed weights stays at most `B` bits per parameter.
//!
//! Every candidate codec encodes every matrix once; each (matrix, candidate) gives a choice of
//! (bits actually stored, squared Frobenius error of the reconstructed fine-tuned weight) for
//! [`crate::budget`]'s multiple-choice knapsack ILP. The result is a [`PerMatrix`] codec that
//! dispatches each matrix to its chosen codec; [`crate::coded::compress_coded`] writes the file
//! with it (each entry carries its own codec, so loaders need nothing new). `bitdelta` is
//! offered as a candidate through [`BitDeltaEntry`], which writes BitDelta's own `sign` entries.

use std::collections::HashMap;

use deltaserve_format::{pack_signs, unpack_signs, words_per_row, OwnedTensor, TensorEntry};
use deltaserve_model::Checkpoint;
use rayon::prelude::*;

use crate::budget::{solve_with, Allocation, BudgetOptions, Choice, Item};
use crate::codec::{CalibrationSet, Codec, Encoded, MatrixInput};
use crate::eora::decode_encoded;
use crate::error::{CodecError, Result};
use crate::numeric::FloatDtype;

/// BitDelta of one matrix as a codec (eq. 1-2 of arXiv 2402.10193 on the f32 difference), for
/// budgets: writes a `sign` entry exactly as [`crate::bitdelta::compress`] lays it out.
#[derive(Debug, Clone, Copy, Default)]
pub struct BitDeltaEntry;

impl BitDeltaEntry {
    /// The entry, its tensors, and `D̂ = scale · sign(D)`.
    fn encode_and_decode(m: &MatrixInput<'_>) -> (Encoded, Vec<f32>) {
        let d = m.delta();
        let scale =
            (d.iter().map(|&v| f64::from(v.abs())).sum::<f64>() / d.len().max(1) as f64) as f32;
        let words = pack_signs(&d, m.rows, m.cols);
        let decoded = unpack_signs(&words, m.rows, m.cols)
            .into_iter()
            .map(|s| s * scale)
            .collect();
        let entry = TensorEntry::sign(m.name, [m.rows, m.cols], m.base_dtype);
        let tensors = vec![
            (
                format!("{}.signs", m.name),
                OwnedTensor::from_u32(vec![m.rows, words_per_row(m.cols)], &words),
            ),
            (format!("{}.scale", m.name), OwnedTensor::scale(scale)),
        ];
        (Encoded { entry, tensors }, decoded)
    }
}

impl Codec for BitDeltaEntry {
    fn name(&self) -> &'static str {
        crate::bitdelta::METHOD
    }

    fn spec(&self) -> String {
        crate::bitdelta::METHOD.to_owned()
    }

    fn encode(&self, m: &MatrixInput<'_>) -> Result<Encoded> {
        Ok(Self::encode_and_decode(m).0)
    }
}

/// Parses a candidate spec: `bitdelta` or any registry codec's spec.
pub fn parse_candidate(spec: &str) -> Result<Box<dyn Codec>> {
    if spec.trim() == crate::bitdelta::METHOD {
        Ok(Box::new(BitDeltaEntry))
    } else {
        crate::codec::parse_codec(spec)
    }
}

/// The candidates `--budget-bits` uses when none are given: BitDelta, low-rank deltas at two
/// ranks and RTN of the fine-tune at 4 and 8 bits; with calibration data also GPTQ-4 and
/// EoRA on BitDelta.
pub fn default_candidates(with_calibration: bool) -> Vec<&'static str> {
    let mut c = vec![
        "bitdelta",
        "lowrank:rank=8",
        "lowrank:rank=32",
        "rtn:bits=4,group=128",
        "rtn:bits=8",
    ];
    if with_calibration {
        c.extend(["gptq:bits=4,group=128", "eora:rank=8+bitdelta"]);
    }
    c
}

/// A codec that encodes each matrix with the candidate chosen for it.
#[derive(Debug)]
pub struct PerMatrix {
    candidates: Vec<Box<dyn Codec>>,
    picks: HashMap<String, usize>,
    spec: String,
}

impl Codec for PerMatrix {
    fn name(&self) -> &'static str {
        "budget"
    }

    fn spec(&self) -> String {
        self.spec.clone()
    }

    fn needs_calibration(&self) -> bool {
        self.candidates.iter().any(|c| c.needs_calibration())
    }

    fn encode(&self, m: &MatrixInput<'_>) -> Result<Encoded> {
        let &k = self
            .picks
            .get(m.name)
            .ok_or_else(|| CodecError::BadOption {
                option: "--budget-bits",
                detail: format!("{} was not planned; this is a bug", m.name),
            })?;
        self.candidates[k].encode(m)
    }
}

/// One matrix's options and the pick.
#[derive(Debug, Clone, PartialEq)]
pub struct MatrixChoice {
    /// The weight.
    pub name: String,
    /// Parameters.
    pub params: u64,
    /// (bits, squared error) per candidate, in candidate order.
    pub options: Vec<Choice>,
    /// Index of the chosen candidate.
    pub pick: usize,
}

/// What the budget planner chose.
#[derive(Debug)]
pub struct BudgetPlan {
    /// The codec to compress with.
    pub codec: PerMatrix,
    /// Candidate specs, in order.
    pub specs: Vec<String>,
    /// Per matrix.
    pub matrices: Vec<MatrixChoice>,
    /// The solver's answer.
    pub allocation: Allocation,
}

impl BudgetPlan {
    /// A few lines: how many matrices each candidate got, and the bits per parameter reached.
    pub fn summary(&self) -> String {
        let params: u64 = self.matrices.iter().map(|m| m.params).sum();
        let mut out = format!(
            "budget: {:.4} bits/param over {} matrices ({} parameters), summed squared error {:.4e}, solver {:?} in {:.2}s\n",
            self.allocation.total_bits as f64 / params.max(1) as f64,
            self.matrices.len(),
            params,
            self.allocation.total_error,
            self.allocation.status,
            self.allocation.solve_seconds
        );
        for (k, spec) in self.specs.iter().enumerate() {
            let n = self.matrices.iter().filter(|m| m.pick == k).count();
            out.push_str(&format!("  {spec}: {n} matrices\n"));
        }
        out
    }
}

/// Plans `--budget-bits`: encodes every compressed matrix with every candidate, measures bits
/// and error, and solves the knapsack for an average of `avg_bits` bits per parameter.
pub fn plan_budget(
    base: &Checkpoint,
    finetuned: &Checkpoint,
    candidates: Vec<Box<dyn Codec>>,
    calibration: Option<&CalibrationSet>,
    avg_bits: f64,
) -> Result<BudgetPlan> {
    if !(avg_bits.is_finite() && avg_bits > 0.0) {
        return Err(CodecError::BadOption {
            option: "--budget-bits",
            detail: format!("{avg_bits} is not a positive number of bits per parameter"),
        });
    }
    if candidates.is_empty() {
        return Err(CodecError::BadOption {
            option: "--candidate",
            detail: "no candidate codecs to choose from".into(),
        });
    }
    if calibration.is_none() {
        if let Some(c) = candidates.iter().find(|c| c.needs_calibration()) {
            return Err(CodecError::BadOption {
                option: "--candidate",
                detail: format!("{} needs calibration data; add --data PATH", c.spec()),
            });
        }
    }
    crate::bitdelta::check_pair(base, finetuned)?;
    let mut names: Vec<String> = finetuned
        .tensor_names()
        .into_iter()
        .filter(|n| {
            finetuned
                .raw(n)
                .is_ok_and(|t| crate::bitdelta::is_compressed(n, t.shape))
        })
        .map(str::to_owned)
        .collect();
    names.sort();
    let specs: Vec<String> = candidates.iter().map(|c| c.spec()).collect();
    let matrices: Vec<MatrixChoice> = names
        .par_iter()
        .map(|name| -> Result<MatrixChoice> {
            let b = base.raw(name)?;
            let f = finetuned.raw(name)?;
            let as_f32 = |raw: &deltaserve_model::RawTensor<'_>| {
                FloatDtype::from_safetensors(raw.dtype).map(|d| d.decode(raw.data))
            };
            let (Some(bv), Some(fv)) = (as_f32(&b), as_f32(&f)) else {
                return Err(CodecError::UnsupportedDtype {
                    tensor: name.clone(),
                    dir: finetuned.dir().to_owned(),
                    dtype: f.dtype.to_string(),
                });
            };
            let m = MatrixInput {
                name,
                rows: f.shape[0],
                cols: f.shape[1],
                base: &bv,
                finetuned: &fv,
                base_dtype: b.dtype,
                calibration: calibration.and_then(|c| c.get(name.as_str())),
            };
            let mut options = Vec::with_capacity(candidates.len());
            for c in &candidates {
                let (enc, rec) = if c.name() == crate::bitdelta::METHOD {
                    let (enc, d) = BitDeltaEntry::encode_and_decode(&m);
                    let rec = bv.iter().zip(&d).map(|(b, d)| b + d).collect::<Vec<_>>();
                    (enc, rec)
                } else {
                    let enc = c.encode(&m)?;
                    let dec = decode_encoded(name, &enc)?;
                    let rec = match &enc.entry {
                        TensorEntry::Coded {
                            value: deltaserve_format::FullValue::Difference,
                            ..
                        } => bv.iter().zip(&dec).map(|(b, d)| b + d).collect(),
                        _ => dec,
                    };
                    (enc, rec)
                };
                let error: f64 = rec
                    .iter()
                    .zip(&fv)
                    .map(|(r, f)| (f64::from(*r) - f64::from(*f)).powi(2))
                    .sum();
                options.push(Choice {
                    bits: enc.stored_bytes() * 8,
                    error,
                });
            }
            Ok(MatrixChoice {
                name: name.clone(),
                params: (m.rows * m.cols) as u64,
                options,
                pick: 0,
            })
        })
        .collect::<Result<_>>()?;
    let params: u64 = matrices.iter().map(|m| m.params).sum();
    let items: Vec<Item> = matrices
        .iter()
        .map(|m| Item {
            name: m.name.clone(),
            choices: m.options.clone(),
        })
        .collect();
    let budget = (avg_bits * params as f64).floor() as u64;
    let allocation = solve_with(
        &items,
        budget,
        &BudgetOptions {
            params,
            ..BudgetOptions::default()
        },
    )
    .map_err(|e| CodecError::BadOption {
        option: "--budget-bits",
        detail: e.to_string(),
    })?;
    let mut matrices = matrices;
    let mut picks = HashMap::new();
    for (m, &k) in matrices.iter_mut().zip(&allocation.picks) {
        m.pick = k;
        picks.insert(m.name.clone(), k);
    }
    let spec = format!("budget:bits={avg_bits}[{}]", specs.join(" | "));
    Ok(BudgetPlan {
        codec: PerMatrix {
            candidates,
            picks,
            spec,
        },
        specs,
        matrices,
        allocation,
    })
}
