//! The codec interface: how one delta matrix is encoded into a `coded` entry of a delta file,
//! decoded back, and how a codec is named on the command line.
//!
//! # Contract (for everyone adding a codec)
//!
//! A codec is a value implementing [`Codec`], built from a command-line *spec* by the
//! [`CodecInfo::build`] function of its entry in [`CODECS`]. To add one: write a module with a
//! `pub const INFO: CodecInfo`, add it to [`CODECS`], document its parts and params under
//! "Codecs" in docs/FORMAT.md. Nothing else changes: `compress --method`, `load_tenant`,
//! `merge`, `inspect` and `eval` find it through this registry.
//!
//! - **Spec.** `name` or `name:key=value,key=value` (e.g. `lowrank:rank=16`,
//!   `dare:p=0.9,seed=1`). [`SpecArgs`] hands out the settings typed; a setting the codec does
//!   not take, a malformed value, or an unknown name is a one-line [`CodecError::BadOption`]
//!   that lists the valid names or settings. `bitdelta` is not a codec of this registry: it has
//!   its own streaming pipeline ([`crate::bitdelta::compress`]) and stays the default;
//!   [`MethodSpec::parse`] routes it there.
//! - **Encode.** [`Codec::encode`] gets one `[rows, cols]` weight of base and fine-tune as f32
//!   row-major slices ([`MatrixInput`], with the base's dtype and, for data-aware codecs, the
//!   calibration statistics [`Calibration`]) and returns an [`Encoded`]: a
//!   [`TensorEntry::Coded`] whose `codec` is the codec's registry name and whose parts are named
//!   `"{weight}.{role}"`, plus exactly those container tensors. Encoding is deterministic for a
//!   given spec (random codecs take a `seed` setting and record it in `params`). A codec never
//!   stores anything outside its parts; everything the decoder needs is in parts and `params`.
//! - **Size.** The bits a codec costs are the bytes of its parts, nothing else:
//!   [`Encoded::stored_bytes`] is what the file holds for the weight (tested against the file
//!   written), and [`Encoded::bits_per_param`] is `8 · stored_bytes / (rows · cols)`.
//! - **Decode.** [`CodecInfo::decode`] turns the entry back into the matrix the parts encode
//!   ([`Decoded`]): `W_ft − W_base` when the entry's `value` is `difference`, `W_ft` when it is
//!   `finetuned`. Low-rank codecs may return factors ([`Decoded::LowRank`]); everything else
//!   returns a dense f32 matrix. [`decode`] dispatches on the entry's codec name.
//! - **Serve.** `load_tenant` turns `lowrank` entries into `LinearDelta::LowRank` (applied
//!   unexpanded, the fast path) and every other codec into `LinearDelta::Dense` by decoding on
//!   load.
//! - **Errors.** Encode and decode return [`CodecError`]; inputs a user controls never panic.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use deltaserve_format::{CodedPart, DeltaFile, Dtype, FullValue, OwnedTensor, TensorEntry};

use crate::error::{CodecError, Result};
use crate::numeric::FloatDtype;

/// One weight matrix to encode: base and fine-tune as f32, row-major `[rows, cols]`.
#[derive(Debug, Clone, Copy)]
pub struct MatrixInput<'a> {
    /// The weight's checkpoint name (`model.layers.0.mlp.up_proj.weight`); parts are named
    /// `"{name}.{role}"`.
    pub name: &'a str,
    /// `out_features`.
    pub rows: usize,
    /// `in_features`.
    pub cols: usize,
    /// The base's values, `rows * cols`.
    pub base: &'a [f32],
    /// The fine-tune's values, `rows * cols`.
    pub finetuned: &'a [f32],
    /// The base weight's dtype, recorded as the entry's `dtype` (what the weight is
    /// materialised in).
    pub base_dtype: Dtype,
    /// Input statistics for data-aware codecs; `None` when no calibration data was given.
    pub calibration: Option<&'a Calibration>,
}

impl MatrixInput<'_> {
    /// `D = W_ft − W_base`, computed in f32 (delta codecs quantise this).
    pub fn delta(&self) -> Vec<f32> {
        self.finetuned
            .iter()
            .zip(self.base)
            .map(|(f, b)| f - b)
            .collect()
    }

    /// `rows * cols`.
    pub fn numel(&self) -> usize {
        self.rows * self.cols
    }

    /// The conventional container name of part `role`.
    pub fn part_name(&self, role: &str) -> String {
        format!("{}.{role}", self.name)
    }

    /// The calibration statistics a data-aware codec (`codec`, for the message) requires.
    pub fn required_calibration(&self, codec: &str) -> Result<&Calibration> {
        self.calibration.ok_or_else(|| CodecError::BadOption {
            option: "--method",
            detail: format!(
                "{codec} needs calibration statistics for {}; give calibration data (--data)",
                self.name
            ),
        })
    }
}

/// Calibration statistics of one linear layer's input, for data-aware codecs (GPTQ, EoRA,
/// DeltaDQ's group-size criterion).
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    /// `XᵀX` over the calibration tokens, `[cols, cols]` row-major (the unnormalised Gram
    /// matrix of the layer's inputs; GPTQ's `H / 2`).
    pub gram: Vec<f32>,
    /// Tokens summed into `gram`.
    pub tokens: usize,
}

/// Calibration statistics by weight name.
pub type CalibrationSet = HashMap<String, Calibration>;

/// The result of encoding one matrix: its header entry and the container tensors it names.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// A [`TensorEntry::Coded`] entry.
    pub entry: TensorEntry,
    /// Exactly the container tensors the entry's parts name.
    pub tensors: Vec<(String, OwnedTensor)>,
}

impl Encoded {
    /// Bytes the file stores for this weight (all parts).
    pub fn stored_bytes(&self) -> u64 {
        self.tensors.iter().map(|(_, t)| t.data.len() as u64).sum()
    }

    /// Stored bits per parameter of the weight.
    pub fn bits_per_param(&self) -> f64 {
        let numel: usize = self.entry.shape().iter().product();
        self.stored_bytes() as f64 * 8.0 / numel.max(1) as f64
    }
}

/// Builds [`Encoded`] values: a coded entry and its parts, kept consistent by construction.
#[derive(Debug)]
pub struct EncodedBuilder {
    codec: &'static str,
    name: String,
    shape: [usize; 2],
    dtype: Dtype,
    value: FullValue,
    parts: BTreeMap<String, CodedPart>,
    params: BTreeMap<String, serde_json::Value>,
    tensors: Vec<(String, OwnedTensor)>,
}

impl EncodedBuilder {
    /// An entry of codec `codec` for `m`, decoding to `W_ft − W_base`.
    pub fn new(codec: &'static str, m: &MatrixInput<'_>) -> EncodedBuilder {
        EncodedBuilder {
            codec,
            name: m.name.to_owned(),
            shape: [m.rows, m.cols],
            dtype: m.base_dtype,
            value: FullValue::Difference,
            parts: BTreeMap::new(),
            params: BTreeMap::new(),
            tensors: Vec::new(),
        }
    }

    /// Makes the entry decode to `W_ft` itself (baselines quantising the whole fine-tune).
    pub fn finetuned_value(mut self) -> Self {
        self.value = FullValue::Finetuned;
        self
    }

    /// Records a setting in the entry's `params`.
    pub fn param(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.params.insert(key.to_owned(), value.into());
        self
    }

    /// Adds part `role`, stored as container tensor `"{weight}.{role}"`.
    pub fn part(mut self, role: &str, tensor: OwnedTensor) -> Self {
        let name = format!("{}.{role}", self.name);
        self.parts.insert(
            role.to_owned(),
            CodedPart {
                tensor: name.clone(),
                dtype: tensor.dtype.to_string(),
                shape: tensor.shape.clone(),
            },
        );
        self.tensors.push((name, tensor));
        self
    }

    /// The finished entry and tensors.
    pub fn build(self) -> Encoded {
        Encoded {
            entry: TensorEntry::Coded {
                codec: self.codec.to_owned(),
                shape: self.shape,
                dtype: self.dtype.to_string(),
                value: self.value,
                parts: self.parts,
                params: self.params,
            },
            tensors: self.tensors,
        }
    }
}

/// A decoded matrix.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// The matrix, `[rows, cols]` row-major.
    Dense(Vec<f32>),
    /// `up · down` with `down: [rank, cols]` and `up: [rows, rank]`, row-major.
    LowRank {
        /// The rank.
        rank: usize,
        /// `[rank, cols]`.
        down: Vec<f32>,
        /// `[rows, rank]`.
        up: Vec<f32>,
    },
}

impl Decoded {
    /// The dense `[rows, cols]` matrix (multiplies out factors, accumulating in f64).
    pub fn into_dense(self, rows: usize, cols: usize) -> Vec<f32> {
        match self {
            Decoded::Dense(d) => d,
            Decoded::LowRank { rank, down, up } => {
                let mut out = vec![0f32; rows * cols];
                let mut acc = vec![0f64; cols];
                for (r, row) in out.chunks_mut(cols).enumerate() {
                    acc.iter_mut().for_each(|a| *a = 0.0);
                    for k in 0..rank {
                        let u = f64::from(up[r * rank + k]);
                        for (a, &d) in acc.iter_mut().zip(&down[k * cols..][..cols]) {
                            *a += u * f64::from(d);
                        }
                    }
                    for (o, a) in row.iter_mut().zip(&acc) {
                        *o = *a as f32;
                    }
                }
                out
            }
        }
    }
}

/// A compression method for one matrix. Built from a spec by its [`CodecInfo`].
pub trait Codec: Send + Sync + fmt::Debug {
    /// The registry name, written as the entries' `codec` (`"lowrank"`).
    fn name(&self) -> &'static str;
    /// The spec with every setting spelled out (`"lowrank:rank=16,dtype=f16"`), for headers,
    /// reports and sweep labels.
    fn spec(&self) -> String;
    /// Whether [`Codec::encode`] needs [`MatrixInput::calibration`]; the pipeline refuses to run
    /// a codec that needs it without calibration data.
    fn needs_calibration(&self) -> bool {
        false
    }
    /// Encodes one matrix (see the module docs for the contract).
    fn encode(&self, m: &MatrixInput<'_>) -> Result<Encoded>;
}

/// One setting a codec takes, for `--help` and error messages.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// The key (`rank`).
    pub key: &'static str,
    /// What values mean, with the default (`"N: keep the top N singular vectors"`).
    pub help: &'static str,
}

/// A registry entry: how to build a codec from its spec and how to decode its entries.
#[derive(Clone, Copy)]
pub struct CodecInfo {
    /// Spec name and entry `codec` name.
    pub name: &'static str,
    /// One line for `--help`.
    pub summary: &'static str,
    /// The settings the spec takes.
    pub settings: &'static [Setting],
    /// Builds the codec; every setting must be taken from the [`SpecArgs`] (leftovers are
    /// reported as unknown by [`parse_codec`]).
    pub build: fn(&mut SpecArgs) -> Result<Box<dyn Codec>>,
    /// Decodes an entry of this codec.
    pub decode: fn(&CodedView<'_>) -> Result<Decoded>,
}

impl fmt::Debug for CodecInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CodecInfo")
            .field("name", &self.name)
            .finish()
    }
}

impl CodecInfo {
    /// `"rank=N, energy=F"`: the settings, for messages (each setting's help starts with its
    /// value's placeholder, `"N: keep the top N …"`).
    pub fn settings_list(&self) -> String {
        if self.settings.is_empty() {
            return "none".to_owned();
        }
        self.settings
            .iter()
            .map(|s| {
                format!(
                    "{}={}",
                    s.key,
                    s.help.split(':').next().unwrap_or("").trim()
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Every codec `compress --method` knows besides `bitdelta`. Add new codecs here.
pub const CODECS: &[CodecInfo] = &[
    crate::lowrank::INFO,
    crate::lowrank::MIXED_INFO,
    crate::dare::INFO,
    crate::deltadq::INFO,
    crate::rtn::INFO,
    crate::gptq::INFO,
    crate::eora::INFO,
    crate::qahira::INFO,
];

/// The registry entry named `name`.
pub fn codec_info(name: &str) -> Option<&'static CodecInfo> {
    CODECS.iter().find(|c| c.name == name)
}

/// Every method name `--method` accepts, `bitdelta` first.
pub fn method_names() -> Vec<&'static str> {
    std::iter::once(crate::bitdelta::METHOD)
        .chain(CODECS.iter().map(|c| c.name))
        .collect()
}

/// A multi-line description of every method and its settings, for `--help`.
pub fn methods_help() -> String {
    let mut out = format!(
        "{}: one sign bit per weight plus one scale per matrix (the default; no settings)\n",
        crate::bitdelta::METHOD
    );
    for c in CODECS {
        out.push_str(&format!("{}: {}\n", c.name, c.summary));
        for s in c.settings {
            out.push_str(&format!("    {}={}\n", s.key, s.help));
        }
    }
    out
}

const BAD_SPEC: &str = "--method";

/// The settings of a spec, handed out typed; what is not taken is an error.
#[derive(Debug)]
pub struct SpecArgs {
    spec: String,
    info: &'static CodecInfo,
    values: BTreeMap<String, String>,
    /// The wrapped codec's spec, after the first `+` (`eora:rank=8+gptq:bits=4`).
    inner: Option<String>,
}

impl SpecArgs {
    fn bad(&self, detail: String) -> CodecError {
        CodecError::BadOption {
            option: BAD_SPEC,
            detail: format!("\"{}\": {detail}", self.spec),
        }
    }

    /// Whether `key` was given.
    pub fn has(&self, key: &str) -> bool {
        self.values.contains_key(key)
    }

    /// Removes `key`, parsed with `parse`; `what` says what a valid value is.
    pub fn take<T>(
        &mut self,
        key: &str,
        what: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<Option<T>> {
        let Some(raw) = self.values.remove(key) else {
            return Ok(None);
        };
        parse(&raw)
            .map(Some)
            .ok_or_else(|| self.bad(format!("{key}={raw} is not {what}")))
    }

    /// A positive integer setting.
    pub fn usize(&mut self, key: &str) -> Result<Option<usize>> {
        self.take(key, "a positive integer", |s| {
            s.parse::<usize>().ok().filter(|&n| n > 0)
        })
    }

    /// An integer setting (0 allowed), e.g. a seed.
    pub fn u64(&mut self, key: &str) -> Result<Option<u64>> {
        self.take(key, "a non-negative integer", |s| s.parse::<u64>().ok())
    }

    /// A `0|1` switch (`false`/`true` also accepted).
    pub fn switch(&mut self, key: &str) -> Result<Option<bool>> {
        self.take(key, "0 or 1", |s| match s {
            "0" | "false" => Some(false),
            "1" | "true" => Some(true),
            _ => None,
        })
    }

    /// A number in the open-closed interval `(lo, hi]` or closed `[lo, hi]` per `closed_lo`.
    pub fn f64_in(
        &mut self,
        key: &str,
        lo: f64,
        hi: f64,
        hi_inclusive: bool,
    ) -> Result<Option<f64>> {
        let what = format!(
            "a number in ({lo}, {hi}{}",
            if hi_inclusive { "]" } else { ")" }
        );
        self.take(key, &what, |s| {
            s.parse::<f64>()
                .ok()
                .filter(|&x| x > lo && (x < hi || (hi_inclusive && x == hi)))
        })
    }

    /// A storage dtype setting: `f16`, `bf16` or `f32`.
    pub fn float_dtype(&mut self, key: &str) -> Result<Option<FloatDtype>> {
        self.take(key, "one of f16, bf16, f32", FloatDtype::parse)
    }

    /// A `/`-separated list of positive integers (`8/3/2`).
    pub fn usize_list(&mut self, key: &str) -> Result<Option<Vec<usize>>> {
        self.take(
            key,
            "a /-separated list of positive integers (8/3/2)",
            |s| {
                s.split('/')
                    .map(|x| x.trim().parse::<usize>().ok().filter(|&n| n > 0))
                    .collect()
            },
        )
    }

    /// The spec after the first `+`, for wrapper codecs (EoRA) that build the codec they wrap
    /// with [`parse_codec`] or route it to BitDelta. Taking it is what makes `+` valid.
    pub fn inner_spec(&mut self) -> Option<String> {
        self.inner.take()
    }

    /// An error about the combination of settings.
    pub fn invalid(&self, detail: impl Into<String>) -> CodecError {
        self.bad(detail.into())
    }

    fn finish(self) -> Result<()> {
        if let Some(inner) = &self.inner {
            return Err(self.bad(format!(
                "{} does not wrap another codec (\"+{inner}\"); only eora:...+<codec> does",
                self.info.name
            )));
        }
        if let Some(key) = self.values.keys().next() {
            return Err(self.bad(format!(
                "unknown setting \"{key}\" for {} (valid: {})",
                self.info.name,
                self.info.settings_list()
            )));
        }
        Ok(())
    }
}

/// Parses `name[:key=value,...]` into a codec of [`CODECS`].
pub fn parse_codec(spec: &str) -> Result<Box<dyn Codec>> {
    let bad = |detail: String| CodecError::BadOption {
        option: BAD_SPEC,
        detail: format!("\"{spec}\": {detail}"),
    };
    // `outer+inner`: everything after the first `+` is the wrapped codec's own spec.
    let (outer, inner) = match spec.split_once('+') {
        Some((o, i)) => (o, Some(i.trim().to_owned())),
        None => (spec, None),
    };
    let (name, rest) = outer.split_once(':').unwrap_or((outer, ""));
    let name = name.trim();
    let info = codec_info(name).ok_or_else(|| CodecError::UnknownMethod {
        method: name.to_owned(),
        known: method_names().join(", "),
    })?;
    let mut values = BTreeMap::new();
    for kv in rest.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').ok_or_else(|| {
            bad(format!(
                "setting \"{kv}\" is not key=value (settings of {name}: {})",
                info.settings_list()
            ))
        })?;
        if values
            .insert(k.trim().to_owned(), v.trim().to_owned())
            .is_some()
        {
            return Err(bad(format!("setting \"{}\" given twice", k.trim())));
        }
    }
    let mut args = SpecArgs {
        spec: spec.to_owned(),
        info,
        values,
        inner,
    };
    let codec = (info.build)(&mut args)?;
    args.finish()?;
    Ok(codec)
}

/// What `--method` asked for.
#[derive(Debug)]
pub enum MethodSpec {
    /// BitDelta's streaming pipeline (the default; its output is unchanged by this registry).
    BitDelta,
    /// A codec of [`CODECS`].
    Coded(Box<dyn Codec>),
}

impl MethodSpec {
    /// Parses a `--method` value. Fails with one line naming the valid methods or settings.
    pub fn parse(spec: &str) -> Result<MethodSpec> {
        let trimmed = spec.trim();
        if trimmed == crate::bitdelta::METHOD {
            return Ok(MethodSpec::BitDelta);
        }
        if let Some(rest) = trimmed.strip_prefix("bitdelta:") {
            return Err(CodecError::BadOption {
                option: BAD_SPEC,
                detail: format!("\"{spec}\": bitdelta takes no settings (got \"{rest}\")"),
            });
        }
        parse_codec(trimmed).map(MethodSpec::Coded)
    }

    /// The canonical spec.
    pub fn spec(&self) -> String {
        match self {
            MethodSpec::BitDelta => crate::bitdelta::METHOD.to_owned(),
            MethodSpec::Coded(c) => c.spec(),
        }
    }
}

/// A coded entry of an open delta, for decoders: typed access to parts and params.
#[derive(Debug, Clone, Copy)]
pub struct CodedView<'a> {
    /// The delta file.
    pub delta: &'a DeltaFile,
    /// The weight's name.
    pub name: &'a str,
    /// The entry (always [`TensorEntry::Coded`]).
    pub entry: &'a TensorEntry,
    /// `[rows, cols]`.
    pub shape: [usize; 2],
    /// The entry's params.
    pub params: &'a BTreeMap<String, serde_json::Value>,
}

impl<'a> CodedView<'a> {
    /// An error naming this entry.
    pub fn bad(&self, detail: impl Into<String>) -> CodecError {
        CodecError::BadCoded {
            delta: self.delta.path().to_owned(),
            tensor: self.name.to_owned(),
            detail: detail.into(),
        }
    }

    /// Part `role`'s bytes, dtype and shape.
    pub fn part(&self, role: &str) -> Result<(&'a [u8], Dtype, &'a [usize])> {
        Ok(self.delta.part(self.entry, role)?)
    }

    /// Part `role` as f32 values (F32/F16/BF16 parts), checked to have `numel` elements.
    pub fn part_f32(&self, role: &str, numel: usize) -> Result<Vec<f32>> {
        let (bytes, dtype, _) = self.part(role)?;
        let float = FloatDtype::from_safetensors(dtype)
            .ok_or_else(|| self.bad(format!("part {role} has dtype {dtype}, expected a float")))?;
        if bytes.len() != numel * float.size() {
            return Err(self.bad(format!(
                "part {role} holds {} values, expected {numel}",
                bytes.len() / float.size()
            )));
        }
        Ok(float.decode(bytes))
    }

    /// Part `role` as raw U8 bytes, checked to be `len` bytes long.
    pub fn part_u8(&self, role: &str, len: usize) -> Result<&'a [u8]> {
        let (bytes, dtype, _) = self.part(role)?;
        if dtype != Dtype::U8 || bytes.len() != len {
            return Err(self.bad(format!(
                "part {role} is {dtype} of {} bytes, expected U8 of {len}",
                bytes.len()
            )));
        }
        Ok(bytes)
    }

    /// A non-negative integer param.
    pub fn param_u64(&self, key: &str) -> Result<u64> {
        self.params
            .get(key)
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| self.bad(format!("param \"{key}\" missing or not an integer")))
    }

    /// A number param.
    pub fn param_f64(&self, key: &str) -> Result<f64> {
        self.params
            .get(key)
            .and_then(serde_json::Value::as_f64)
            .ok_or_else(|| self.bad(format!("param \"{key}\" missing or not a number")))
    }

    /// A list-of-integers param.
    pub fn param_usize_list(&self, key: &str) -> Result<Vec<usize>> {
        self.params
            .get(key)
            .and_then(serde_json::Value::as_array)
            .and_then(|a| a.iter().map(|v| v.as_u64().map(|x| x as usize)).collect())
            .ok_or_else(|| self.bad(format!("param \"{key}\" missing or not a list of integers")))
    }
}

/// Decodes a coded entry of `delta` to the matrix its parts encode (`W_ft − W_base` or `W_ft`,
/// per the entry's `value`). Fails naming the codec if no registered codec has that name.
pub fn decode(delta: &DeltaFile, name: &str, entry: &TensorEntry) -> Result<Decoded> {
    let TensorEntry::Coded {
        codec,
        shape,
        params,
        ..
    } = entry
    else {
        return Err(CodecError::BadCoded {
            delta: delta.path().to_owned(),
            tensor: name.to_owned(),
            detail: format!("a {} entry is not a coded entry", entry.kind()),
        });
    };
    let info = codec_info(codec).ok_or_else(|| CodecError::BadCoded {
        delta: delta.path().to_owned(),
        tensor: name.to_owned(),
        detail: format!(
            "codec \"{codec}\" is not known to this deltaserve (known: {}); upgrade deltaserve",
            CODECS.iter().map(|c| c.name).collect::<Vec<_>>().join(", ")
        ),
    })?;
    (info.decode)(&CodedView {
        delta,
        name,
        entry,
        shape: *shape,
        params,
    })
}

/// [`decode`], multiplied out to a dense `[rows, cols]` f32 matrix.
pub fn decode_dense(delta: &DeltaFile, name: &str, entry: &TensorEntry) -> Result<Vec<f32>> {
    let [rows, cols] = match entry {
        TensorEntry::Coded { shape, .. } => *shape,
        _ => [0, 0],
    };
    Ok(decode(delta, name, entry)?.into_dense(rows, cols))
}

/// The spec spelling of a storage dtype (`f16`, `bf16`, `f32`).
pub fn dtype_key(dtype: FloatDtype) -> &'static str {
    match dtype {
        FloatDtype::F32 => "f32",
        FloatDtype::BF16 => "bf16",
        FloatDtype::F16 => "f16",
    }
}

/// A storage tensor of `values` in `dtype` (values rounded half to even).
pub fn float_tensor(dtype: FloatDtype, shape: Vec<usize>, values: &[f32]) -> OwnedTensor {
    let mut bytes = Vec::with_capacity(values.len() * dtype.size());
    dtype.encode_into(values, &mut bytes);
    OwnedTensor::new(dtype.safetensors(), shape, bytes)
}

/// Packs `bits`-bit codes (each `< 2^bits`, `1 ≤ bits ≤ 8`) into bytes, least significant bit
/// first, as one continuous bit stream: code `i` occupies stream bits `[i·bits, (i+1)·bits)`,
/// stream bit `j` is bit `j % 8` of byte `j / 8`; trailing bits of the last byte are 0.
pub fn pack_codes(codes: &[u8], bits: u32) -> Vec<u8> {
    debug_assert!((1..=8).contains(&bits));
    let mut out = vec![0u8; (codes.len() * bits as usize).div_ceil(8)];
    let mut pos = 0usize;
    for &c in codes {
        let v = u16::from(c) << (pos % 8);
        out[pos / 8] |= v as u8;
        if pos % 8 + bits as usize > 8 {
            out[pos / 8 + 1] |= (v >> 8) as u8;
        }
        pos += bits as usize;
    }
    out
}

/// Inverse of [`pack_codes`]: `n` codes of `bits` bits.
pub fn unpack_codes(bytes: &[u8], bits: u32, n: usize) -> Vec<u8> {
    let mask = (1u16 << bits) - 1;
    (0..n)
        .map(|i| {
            let pos = i * bits as usize;
            let lo = u16::from(bytes[pos / 8]);
            let hi = bytes.get(pos / 8 + 1).map_or(0, |&b| u16::from(b));
            (((lo | (hi << 8)) >> (pos % 8)) & mask) as u8
        })
        .collect()
}

/// Bytes [`pack_codes`] produces for `n` codes of `bits` bits.
pub fn packed_len(n: usize, bits: u32) -> usize {
    (n * bits as usize).div_ceil(8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_codes_round_trips_every_width() {
        for bits in 1..=8u32 {
            let codes: Vec<u8> = (0..37u32)
                .map(|i| ((i * 7 + 3) % (1 << bits)) as u8)
                .collect();
            let packed = pack_codes(&codes, bits);
            assert_eq!(packed.len(), packed_len(codes.len(), bits));
            assert_eq!(
                unpack_codes(&packed, bits, codes.len()),
                codes,
                "bits {bits}"
            );
        }
        // Layout: 3-bit codes 5, 2, 7 → stream 101 010 111 → byte0 = 0b11_010_101, byte1 = 0b1.
        assert_eq!(pack_codes(&[5, 2, 7], 3), vec![0b1101_0101, 0b1]);
    }

    #[test]
    fn bad_specs_are_one_line_and_list_valid_settings() {
        let err = |s: &str| MethodSpec::parse(s).unwrap_err().to_string();
        let e = err("zip");
        assert!(
            e.starts_with(
                "unknown compression method \"zip\" (known: bitdelta, lowrank, lowrank-mixed, dare, deltadq"
            ),
            "{e}"
        );
        let e = err("lowrank:rnk=4");
        assert!(
            e.contains("unknown setting \"rnk\"") && e.contains("rank="),
            "{e}"
        );
        let e = err("lowrank:rank=0");
        assert!(e.contains("rank=0 is not a positive integer"), "{e}");
        let e = err("lowrank:rank");
        assert!(e.contains("not key=value"), "{e}");
        let e = err("bitdelta:x=1");
        assert!(e.contains("takes no settings"), "{e}");
        for s in [
            "zip",
            "lowrank:rnk=4",
            "lowrank:rank=0",
            "dare:p=1.5",
            "deltadq:ratio=3",
        ] {
            assert!(!err(s).contains('\n'), "{s}");
        }
        assert!(matches!(
            MethodSpec::parse("bitdelta"),
            Ok(MethodSpec::BitDelta)
        ));
    }
}
