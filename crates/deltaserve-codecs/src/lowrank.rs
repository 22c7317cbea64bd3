//! Low-rank deltas: `D = W_ft − W_base ≈ up · down` from a truncated SVD, and Delta-CoMe's
//! mixed-precision variant (Ping et al., arXiv 2406.08903).
//!
//! **`lowrank`** keeps the top `r` singular triplets, `r` given (`rank=N`) or the smallest
//! rank whose singular values hold a fraction `F` of `‖D‖²_F` (`energy=F`; Eckart–Young: the
//! squared error is then the tail energy `Σ_{i>r} σ_i²`). The factors split the singular values
//! evenly, `up = U_r·√Σ_r` (`[rows, r]`) and `down = √Σ_r·V_rᵀ` (`[r, cols]`), so both have the
//! same scale and round alike to f16 (the default storage; `dtype=bf16|f32` also). Entry:
//! `codec "lowrank"`, parts `down`, `up`, params `rank` (the shared convention with adapters);
//! it loads as `LinearDelta::LowRank`, applied unexpanded.
//!
//! **`lowrank-mixed`** (Delta-CoMe) keeps more singular vectors but stores those of larger
//! singular values at more bits: groups of ranks `ranks=r1/r2/…` at `bits=b1/b2/…` (default
//! `2/32/64` at `8/3/2`, the paper's 8+3+2 allocation; a group's width is the paper's choice,
//! the rank counts are ours, sized so the demo's 256-wide matrices keep 98 directions at about
//! 1.7 bits per parameter). Each singular vector (a column of `up`, a row of `down`) is
//! quantised on its own, uniform asymmetric round-to-nearest between its min and max. The
//! paper quantises the vectors with GPTQ using calibration data; we use round-to-nearest
//! (training- and data-free) and write that choice down here. Parts per group `i`:
//! `up{i}.codes` / `down{i}.codes` (U8, the codes of the group's vectors one after another,
//! packed by [`crate::codec::pack_codes`]), `up{i}.scale`, `up{i}.min`, `down{i}.scale`,
//! `down{i}.min` (F32, one per vector); params `ranks`, `bits`. Decodes to factors, so it too
//! loads as `LinearDelta::LowRank`.
//!
//! The SVD is randomised (Halko, Martinsson & Tropp 2011, Alg. 4.4 with subspace iteration):
//! a seeded sketch of `r + oversample` columns, `power` QR-stabilised power iterations, then an
//! exact SVD of the small projected matrix (faer). Matrices whose sketch would be more than
//! half their smaller side use faer's exact thin SVD instead.

use faer::Mat;
use rand::{Rng, SeedableRng};

use crate::codec::{
    float_tensor, pack_codes, packed_len, unpack_codes, Codec, CodecInfo, CodedView, Decoded,
    Encoded, EncodedBuilder, MatrixInput, Setting, SpecArgs,
};
use crate::error::{CodecError, Result};
use crate::numeric::FloatDtype;
use deltaserve_format::OwnedTensor;

/// The `lowrank` registry entry.
pub const INFO: CodecInfo = CodecInfo {
    name: "lowrank",
    summary: "truncated (randomised) SVD of each delta, up·down factors; loads as a LowRank delta",
    settings: &[
        Setting {
            key: "rank",
            help: "N: keep the top N singular vectors (default 16 unless energy is given)",
        },
        Setting {
            key: "energy",
            help: "F: keep the fewest vectors holding fraction F of the delta's squared norm",
        },
        Setting {
            key: "dtype",
            help: "f16|bf16|f32: storage of the factors (default f16)",
        },
        Setting {
            key: "power",
            help: "N: power iterations of the randomised SVD (default 2)",
        },
        Setting {
            key: "oversample",
            help: "N: extra sketch columns of the randomised SVD (default 8)",
        },
    ],
    build: build_lowrank,
    decode: decode_lowrank,
};

/// The `lowrank-mixed` registry entry.
pub const MIXED_INFO: CodecInfo = CodecInfo {
    name: "lowrank-mixed",
    summary: "Delta-CoMe: singular vectors of larger singular values at more bits",
    settings: &[
        Setting {
            key: "ranks",
            help: "R1/R2/..: vectors per precision group, largest singular values first (default 2/32/64)",
        },
        Setting {
            key: "bits",
            help: "B1/B2/..: bits of each group, 1..8 (default 8/3/2)",
        },
        Setting {
            key: "power",
            help: "N: power iterations of the randomised SVD (default 2)",
        },
    ],
    build: build_mixed,
    decode: decode_mixed,
};

/// How many singular vectors to keep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RankTarget {
    /// Exactly this many (capped at the matrix's smaller side).
    Rank(usize),
    /// The fewest holding this fraction of `‖D‖²_F`.
    Energy(f64),
}

/// Settings of the randomised SVD.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SvdOptions {
    /// Power iterations.
    pub power: usize,
    /// Extra sketch columns.
    pub oversample: usize,
    /// Seed of the sketch.
    pub seed: u64,
}

impl Default for SvdOptions {
    fn default() -> Self {
        SvdOptions {
            power: 2,
            oversample: 8,
            seed: 0,
        }
    }
}

/// A truncated SVD `D ≈ U·diag(s)·Vᵀ`.
#[derive(Debug, Clone)]
pub struct Truncated {
    /// `[rows, r]`, orthonormal columns.
    pub u: Mat<f32>,
    /// The `r` largest singular values, descending.
    pub s: Vec<f32>,
    /// `[cols, r]`, orthonormal columns.
    pub v: Mat<f32>,
}

fn svd_err(e: impl std::fmt::Debug) -> CodecError {
    CodecError::BadOption {
        option: "--method",
        detail: format!("the SVD did not converge ({e:?}); the delta may hold NaN or infinity"),
    }
}

/// The thin SVD of `a` with singular values descending.
fn thin_svd(a: &Mat<f32>) -> Result<(Mat<f32>, Vec<f32>, Mat<f32>)> {
    let svd = a.thin_svd().map_err(svd_err)?;
    let s: Vec<f32> = svd.S().column_vector().iter().copied().collect();
    Ok((svd.U().to_owned(), s, svd.V().to_owned()))
}

/// An orthonormal basis of `y`'s columns.
fn orthonormal(y: &Mat<f32>) -> Mat<f32> {
    y.qr().compute_thin_Q()
}

/// `D` (row-major `[rows, cols]`) as a faer matrix.
pub fn to_mat(d: &[f32], rows: usize, cols: usize) -> Mat<f32> {
    Mat::from_fn(rows, cols, |i, j| d[i * cols + j])
}

/// The top-`k` SVD of `d` by the randomised range finder with `opts.power` subspace iterations
/// (Halko et al. 2011, Alg. 4.4), or the exact thin SVD when `k` is large for the matrix.
/// Returns up to `k` triplets.
pub fn top_svd(d: &Mat<f32>, k: usize, opts: &SvdOptions) -> Result<Truncated> {
    let (rows, cols) = (d.nrows(), d.ncols());
    let side = rows.min(cols);
    let sketch = (k + opts.oversample).min(side);
    let (u, s, v) = if 2 * sketch >= side {
        thin_svd(d)?
    } else {
        let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
        // Uniform ±1-range entries: any i.i.d. sub-Gaussian sketch works (Halko §4.6).
        let omega = Mat::from_fn(cols, sketch, |_, _| rng.gen_range(-1.0f32..1.0));
        let mut q = orthonormal(&(d * &omega));
        for _ in 0..opts.power {
            let z = orthonormal(&(d.transpose() * &q));
            q = orthonormal(&(d * &z));
        }
        let b = q.transpose() * d; // [sketch, cols]
        let (ub, s, v) = thin_svd(&b)?;
        (&q * &ub, s, v)
    };
    let r = k.min(s.len());
    Ok(Truncated {
        u: u.subcols(0, r).to_owned(),
        s: s[..r].to_vec(),
        v: v.subcols(0, r).to_owned(),
    })
}

/// The truncated SVD of `d` at `target`. For an energy target the sketch grows (doubling from
/// 32) until the kept singular values reach the fraction of `‖D‖²_F`, or the exact SVD is used.
pub fn truncated_svd(d: &Mat<f32>, target: RankTarget, opts: &SvdOptions) -> Result<Truncated> {
    let side = d.nrows().min(d.ncols());
    match target {
        RankTarget::Rank(r) => top_svd(d, r.min(side), opts),
        RankTarget::Energy(frac) => {
            let total: f64 = (0..d.ncols())
                .flat_map(|j| {
                    d.col(j)
                        .iter()
                        .map(|&x| f64::from(x) * f64::from(x))
                        .collect::<Vec<_>>()
                })
                .sum();
            let goal = frac * total;
            let mut k = 32.min(side);
            loop {
                let t = top_svd(d, k, opts)?;
                let mut acc = 0f64;
                let reached = t.s.iter().position(|&s| {
                    acc += f64::from(s) * f64::from(s);
                    acc >= goal * (1.0 - 1e-6)
                });
                if let Some(i) = reached {
                    return Ok(cut(t, i + 1));
                }
                if k >= side {
                    return Ok(t);
                }
                k = (2 * k).min(side);
            }
        }
    }
}

fn cut(t: Truncated, r: usize) -> Truncated {
    Truncated {
        u: t.u.subcols(0, r).to_owned(),
        s: t.s[..r].to_vec(),
        v: t.v.subcols(0, r).to_owned(),
    }
}

/// `(up, down)` row-major: `up = U·√s` `[rows, r]`, `down = √s·Vᵀ` `[r, cols]`.
pub fn factors(t: &Truncated) -> (Vec<f32>, Vec<f32>) {
    let (rows, cols, r) = (t.u.nrows(), t.v.nrows(), t.s.len());
    let root: Vec<f32> = t.s.iter().map(|s| s.max(0.0).sqrt()).collect();
    let mut up = vec![0f32; rows * r];
    for i in 0..rows {
        for k in 0..r {
            up[i * r + k] = t.u[(i, k)] * root[k];
        }
    }
    let mut down = vec![0f32; r * cols];
    for k in 0..r {
        for j in 0..cols {
            down[k * cols + j] = root[k] * t.v[(j, k)];
        }
    }
    (up, down)
}

/// The `lowrank` codec.
#[derive(Debug, Clone, PartialEq)]
pub struct LowRank {
    /// How many singular vectors to keep.
    pub target: RankTarget,
    /// Storage of the factors.
    pub dtype: FloatDtype,
    /// Randomised-SVD settings.
    pub svd: SvdOptions,
}

fn build_lowrank(a: &mut SpecArgs) -> Result<Box<dyn Codec>> {
    let rank = a.usize("rank")?;
    let energy = a.f64_in("energy", 0.0, 1.0, true)?;
    let target = match (rank, energy) {
        (Some(_), Some(_)) => return Err(a.invalid("give rank or energy, not both")),
        (Some(r), None) => RankTarget::Rank(r),
        (None, Some(e)) => RankTarget::Energy(e),
        (None, None) => RankTarget::Rank(16),
    };
    let d = SvdOptions::default();
    Ok(Box::new(LowRank {
        target,
        dtype: a.float_dtype("dtype")?.unwrap_or(FloatDtype::F16),
        svd: SvdOptions {
            power: a.u64("power")?.map_or(d.power, |p| p as usize),
            oversample: a.u64("oversample")?.map_or(d.oversample, |p| p as usize),
            seed: 0,
        },
    }))
}

impl Codec for LowRank {
    fn name(&self) -> &'static str {
        INFO.name
    }

    fn spec(&self) -> String {
        let target = match self.target {
            RankTarget::Rank(r) => format!("rank={r}"),
            RankTarget::Energy(e) => format!("energy={e}"),
        };
        format!(
            "lowrank:{target},dtype={}",
            crate::codec::dtype_key(self.dtype)
        )
    }

    fn encode(&self, m: &MatrixInput<'_>) -> Result<Encoded> {
        let d = to_mat(&m.delta(), m.rows, m.cols);
        let t = truncated_svd(&d, self.target, &self.svd)?;
        let t = if t.s.is_empty() {
            // A zero-sized part is not representable; a rank-1 zero keeps the entry valid.
            Truncated {
                u: Mat::zeros(m.rows, 1),
                s: vec![0.0],
                v: Mat::zeros(m.cols, 1),
            }
        } else {
            t
        };
        let r = t.s.len();
        let (up, down) = factors(&t);
        let mut b = EncodedBuilder::new(INFO.name, m)
            .param("rank", r)
            .part("down", float_tensor(self.dtype, vec![r, m.cols], &down))
            .part("up", float_tensor(self.dtype, vec![m.rows, r], &up));
        if let RankTarget::Energy(e) = self.target {
            b = b.param("energy", e);
        }
        Ok(b.build())
    }
}

fn decode_lowrank(v: &CodedView<'_>) -> Result<Decoded> {
    let [rows, cols] = v.shape;
    let rank = v.param_u64("rank")? as usize;
    Ok(Decoded::LowRank {
        rank,
        down: v.part_f32("down", rank * cols)?,
        up: v.part_f32("up", rows * rank)?,
    })
}

/// Delta-CoMe's mixed-precision low-rank codec.
#[derive(Debug, Clone, PartialEq)]
pub struct MixedLowRank {
    /// Vectors per group, largest singular values first.
    pub ranks: Vec<usize>,
    /// Bits per group (1..=8).
    pub bits: Vec<usize>,
    /// Randomised-SVD settings.
    pub svd: SvdOptions,
}

fn build_mixed(a: &mut SpecArgs) -> Result<Box<dyn Codec>> {
    let ranks = a.usize_list("ranks")?.unwrap_or_else(|| vec![2, 32, 64]);
    let bits = a.usize_list("bits")?.unwrap_or_else(|| vec![8, 3, 2]);
    if ranks.len() != bits.len() {
        return Err(a.invalid(format!(
            "ranks has {} groups but bits has {}; give one bit-width per group",
            ranks.len(),
            bits.len()
        )));
    }
    if let Some(b) = bits.iter().find(|&&b| b > 8) {
        return Err(a.invalid(format!("bits={b}: each group takes 1 to 8 bits")));
    }
    Ok(Box::new(MixedLowRank {
        ranks,
        bits,
        svd: SvdOptions {
            power: a.u64("power")?.map_or(2, |p| p as usize),
            ..SvdOptions::default()
        },
    }))
}

/// Uniform asymmetric round-to-nearest of one vector at `bits`: codes, scale, min.
/// `x ≈ min + code·scale`, `scale = (max − min)/(2^bits − 1)`.
pub fn quantize_vector(x: &[f32], bits: u32) -> (Vec<u8>, f32, f32) {
    let lo = x.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let levels = ((1u32 << bits) - 1) as f32;
    let scale = if hi > lo { (hi - lo) / levels } else { 0.0 };
    let codes = x
        .iter()
        .map(|&v| {
            if scale == 0.0 {
                0
            } else {
                ((v - lo) / scale).round().clamp(0.0, levels) as u8
            }
        })
        .collect();
    (codes, scale, lo)
}

impl Codec for MixedLowRank {
    fn name(&self) -> &'static str {
        MIXED_INFO.name
    }

    fn spec(&self) -> String {
        let join = |v: &[usize]| v.iter().map(usize::to_string).collect::<Vec<_>>().join("/");
        format!(
            "lowrank-mixed:ranks={},bits={}",
            join(&self.ranks),
            join(&self.bits)
        )
    }

    fn encode(&self, m: &MatrixInput<'_>) -> Result<Encoded> {
        let side = m.rows.min(m.cols);
        // Groups past the matrix's smaller side are cut (they would have no vectors).
        let mut ranks = Vec::new();
        let mut left = side;
        for &r in &self.ranks {
            let r = r.min(left);
            if r == 0 {
                break;
            }
            ranks.push(r);
            left -= r;
        }
        let total: usize = ranks.iter().sum();
        let d = to_mat(&m.delta(), m.rows, m.cols);
        let t = top_svd(&d, total, &self.svd)?;
        let (up, down) = factors(&t);
        let got = t.s.len();
        let mut b = EncodedBuilder::new(MIXED_INFO.name, m);
        let mut start = 0;
        let mut kept_ranks = Vec::new();
        for (g, (&r, &bits)) in ranks.iter().zip(&self.bits).enumerate() {
            let r = r.min(got - start.min(got));
            if r == 0 {
                break;
            }
            kept_ranks.push(r);
            let (mut uc, mut us, mut um) = (Vec::new(), Vec::new(), Vec::new());
            let (mut dc, mut ds, mut dm) = (Vec::new(), Vec::new(), Vec::new());
            for k in start..start + r {
                let col: Vec<f32> = (0..m.rows).map(|i| up[i * got + k]).collect();
                let (c, s, lo) = quantize_vector(&col, bits as u32);
                uc.extend(c);
                us.push(s);
                um.push(lo);
                let (c, s, lo) = quantize_vector(&down[k * m.cols..][..m.cols], bits as u32);
                dc.extend(c);
                ds.push(s);
                dm.push(lo);
            }
            let codes = |c: &[u8]| {
                let packed = pack_codes(c, bits as u32);
                OwnedTensor::new(deltaserve_format::Dtype::U8, vec![packed.len()], packed)
            };
            b = b
                .part(&format!("up{g}.codes"), codes(&uc))
                .part(&format!("up{g}.scale"), OwnedTensor::from_f32(vec![r], &us))
                .part(&format!("up{g}.min"), OwnedTensor::from_f32(vec![r], &um))
                .part(&format!("down{g}.codes"), codes(&dc))
                .part(
                    &format!("down{g}.scale"),
                    OwnedTensor::from_f32(vec![r], &ds),
                )
                .part(&format!("down{g}.min"), OwnedTensor::from_f32(vec![r], &dm));
            start += r;
        }
        let bits: Vec<usize> = self.bits[..kept_ranks.len()].to_vec();
        Ok(b.param("ranks", kept_ranks).param("bits", bits).build())
    }
}

fn decode_mixed(v: &CodedView<'_>) -> Result<Decoded> {
    let [rows, cols] = v.shape;
    let ranks = v.param_usize_list("ranks")?;
    let bits = v.param_usize_list("bits")?;
    if ranks.len() != bits.len() || bits.iter().any(|&b| !(1..=8).contains(&b)) {
        return Err(v.bad("params ranks and bits must be lists of equal length, bits 1 to 8"));
    }
    let rank: usize = ranks.iter().sum();
    let mut up = vec![0f32; rows * rank];
    let mut down = vec![0f32; rank * cols];
    let mut start = 0;
    for (g, (&r, &b)) in ranks.iter().zip(&bits).enumerate() {
        let b = b as u32;
        let deq = |side: &str, len: usize| -> Result<Vec<Vec<f32>>> {
            let codes = unpack_codes(
                v.part_u8(&format!("{side}{g}.codes"), packed_len(r * len, b))?,
                b,
                r * len,
            );
            let scale = v.part_f32(&format!("{side}{g}.scale"), r)?;
            let min = v.part_f32(&format!("{side}{g}.min"), r)?;
            Ok((0..r)
                .map(|k| {
                    codes[k * len..][..len]
                        .iter()
                        .map(|&c| min[k] + f32::from(c) * scale[k])
                        .collect()
                })
                .collect())
        };
        for (k, col) in deq("up", rows)?.into_iter().enumerate() {
            for (i, x) in col.into_iter().enumerate() {
                up[i * rank + start + k] = x;
            }
        }
        for (k, row) in deq("down", cols)?.into_iter().enumerate() {
            down[(start + k) * cols..][..cols].copy_from_slice(&row);
        }
        start += r;
    }
    Ok(Decoded::LowRank { rank, down, up })
}
