//! DARE, drop and rescale (Yu et al., "Language Models are Super Mario", arXiv 2311.03099,
//! eq. 1): each delta weight is dropped with probability `p` and the survivors are rescaled by
//! `1/(1 − p)`, so the delta's expectation is kept, `E[D̃] = D`.
//!
//! The drop decision is a pure function of `(seed, weight name, index)` ([`keep_unit`]:
//! SplitMix64 of a seed mixed with the FNV-1a hash of the name and the element's row-major
//! index, compared with `p`), so a delta is reproducible from its spec and every matrix gets its
//! own mask. Storage, counted in full: the kept values, rescaled, in `dtype` (default f16), in
//! row-major order (part `values`, `[kept]`), plus, with `mask=bitmap` (the default), the mask as
//! one bit per weight (part `mask`, U8, packed by [`crate::codec::pack_codes`] with 1 bit, bit 1
//! = kept), about `1 + 16·(1 − p)` bits per parameter. `mask=seed` stores no mask: the decoder
//! regenerates it from `seed` (recorded in params with `p`), `16·(1 − p)` bits per parameter.
//! Decodes on load to a dense difference.

use deltaserve_format::{Dtype, OwnedTensor};

use crate::codec::{
    dtype_key, float_tensor, pack_codes, packed_len, unpack_codes, Codec, CodecInfo, CodedView,
    Decoded, Encoded, EncodedBuilder, MatrixInput, Setting, SpecArgs,
};
use crate::error::Result;
use crate::numeric::FloatDtype;

/// The `dare` registry entry.
pub const INFO: CodecInfo = CodecInfo {
    name: "dare",
    summary: "DARE: drop each delta weight with rate p, rescale the rest by 1/(1-p)",
    settings: &[
        Setting {
            key: "p",
            help: "P: drop rate in (0, 1) (default 0.9)",
        },
        Setting {
            key: "seed",
            help: "N: seed of the drop mask (default 0)",
        },
        Setting {
            key: "mask",
            help:
                "bitmap|seed: store the mask (1 bit/weight, default) or regenerate it from the seed",
        },
        Setting {
            key: "dtype",
            help: "f16|bf16|f32: storage of the kept values (default f16)",
        },
    ],
    build,
    decode,
};

/// SplitMix64 (Steele, Lea & Flood 2014): a well-mixed 64-bit function of a counter.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a of a weight name: gives each matrix its own random stream.
pub fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// The stream key of matrix `name` under `seed`.
pub fn stream_key(seed: u64, name: &str) -> u64 {
    splitmix64(seed ^ name_hash(name))
}

/// A uniform number in `[0, 1)` for element `index` of the stream `key` (53 random bits).
pub fn keep_unit(key: u64, index: u64) -> f64 {
    (splitmix64(key ^ index.wrapping_mul(0xD6E8_FEB8_6659_FD93)) >> 11) as f64 / (1u64 << 53) as f64
}

/// The DARE codec.
#[derive(Debug, Clone, PartialEq)]
pub struct Dare {
    /// Drop rate.
    pub p: f64,
    /// Mask seed.
    pub seed: u64,
    /// Whether the mask is stored (`true`) or regenerated from the seed.
    pub store_mask: bool,
    /// Storage of the kept values.
    pub dtype: FloatDtype,
}

fn build(a: &mut SpecArgs) -> Result<Box<dyn Codec>> {
    let store_mask = a
        .take("mask", "bitmap or seed", |s| match s {
            "bitmap" => Some(true),
            "seed" => Some(false),
            _ => None,
        })?
        .unwrap_or(true);
    Ok(Box::new(Dare {
        p: a.f64_in("p", 0.0, 1.0, false)?.unwrap_or(0.9),
        seed: a.u64("seed")?.unwrap_or(0),
        store_mask,
        dtype: a.float_dtype("dtype")?.unwrap_or(FloatDtype::F16),
    }))
}

impl Dare {
    /// The mask (kept = true) of matrix `name` with `n` elements.
    pub fn mask(&self, name: &str, n: usize) -> Vec<bool> {
        let key = stream_key(self.seed, name);
        (0..n as u64).map(|i| keep_unit(key, i) >= self.p).collect()
    }
}

impl Codec for Dare {
    fn name(&self) -> &'static str {
        INFO.name
    }

    fn spec(&self) -> String {
        format!(
            "dare:p={},seed={},mask={},dtype={}",
            self.p,
            self.seed,
            if self.store_mask { "bitmap" } else { "seed" },
            dtype_key(self.dtype)
        )
    }

    fn encode(&self, m: &MatrixInput<'_>) -> Result<Encoded> {
        let d = m.delta();
        let mask = self.mask(m.name, d.len());
        let rescale = (1.0 / (1.0 - self.p)) as f32;
        let kept: Vec<f32> = d
            .iter()
            .zip(&mask)
            .filter(|(_, &k)| k)
            .map(|(x, _)| x * rescale)
            .collect();
        let mut b = EncodedBuilder::new(INFO.name, m)
            .param("p", self.p)
            .param("seed", self.seed)
            .param("mask", if self.store_mask { "bitmap" } else { "seed" })
            .part("values", float_tensor(self.dtype, vec![kept.len()], &kept));
        if self.store_mask {
            let bits: Vec<u8> = mask.iter().map(|&k| u8::from(k)).collect();
            let packed = pack_codes(&bits, 1);
            b = b.part(
                "mask",
                OwnedTensor::new(Dtype::U8, vec![packed.len()], packed),
            );
        }
        Ok(b.build())
    }
}

fn decode(v: &CodedView<'_>) -> Result<Decoded> {
    let [rows, cols] = v.shape;
    let n = rows * cols;
    let p = v.param_f64("p")?;
    if !(0.0..1.0).contains(&p) {
        return Err(v.bad(format!("param p = {p} is not a drop rate in [0, 1)")));
    }
    let mask: Vec<bool> = match v.params.get("mask").and_then(|m| m.as_str()) {
        Some("seed") => Dare {
            p,
            seed: v.param_u64("seed")?,
            store_mask: false,
            dtype: FloatDtype::F16,
        }
        .mask(v.name, n),
        _ => unpack_codes(v.part_u8("mask", packed_len(n, 1))?, 1, n)
            .into_iter()
            .map(|b| b == 1)
            .collect(),
    };
    let kept = mask.iter().filter(|&&k| k).count();
    let values = v.part_f32("values", kept)?;
    let mut out = vec![0f32; n];
    let mut next = values.into_iter();
    for (o, &k) in out.iter_mut().zip(&mask) {
        if k {
            *o = next.next().unwrap_or(0.0);
        }
    }
    Ok(Decoded::Dense(out))
}
