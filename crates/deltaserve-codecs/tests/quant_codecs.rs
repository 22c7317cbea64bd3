//! The `rtn`, `gptq` and `eora` codecs through a delta file: what is decoded is what the
//! numerics produced, the reported size is the bytes written, and EoRA lowers the layer's
//! output error of the codec it wraps.

use deltaserve_codecs::codec::{decode_dense, parse_codec, Calibration, Encoded, MatrixInput};
use deltaserve_codecs::gptq::{quantize_gptq, GptqConfig};
use deltaserve_codecs::rtn::{quantize_rtn, GridSpec};
use deltaserve_format::{
    BaseFingerprint, DeltaFile, DeltaHeader, Dtype, FinetuneInfo, FINGERPRINT_ALGORITHM,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

const ROWS: usize = 24;
const COLS: usize = 40;
const NAME: &str = "model.layers.0.mlp.up_proj.weight";

struct Case {
    base: Vec<f32>,
    ft: Vec<f32>,
    calib: Calibration,
}

fn case() -> Case {
    let mut rng = StdRng::seed_from_u64(5);
    let mut n = |s: f32| (rng.gen::<f32>() - 0.5) * 2.0 * s;
    let base: Vec<f32> = (0..ROWS * COLS).map(|_| n(0.1)).collect();
    let ft: Vec<f32> = base.iter().map(|b| b + n(0.01)).collect();
    // Gram of 100 anisotropic inputs.
    let x: Vec<f32> = (0..100 * COLS)
        .map(|i| n(1.0) * (1.0 + (i % COLS) as f32 / 4.0))
        .collect();
    let mut gram = vec![0f32; COLS * COLS];
    for s in 0..100 {
        for i in 0..COLS {
            for j in 0..COLS {
                gram[i * COLS + j] += x[s * COLS + i] * x[s * COLS + j];
            }
        }
    }
    Case {
        base,
        ft,
        calib: Calibration { gram, tokens: 100 },
    }
}

fn input<'a>(c: &'a Case) -> MatrixInput<'a> {
    MatrixInput {
        name: NAME,
        rows: ROWS,
        cols: COLS,
        base: &c.base,
        finetuned: &c.ft,
        base_dtype: Dtype::F32,
        calibration: Some(&c.calib),
    }
}

/// Writes `enc` as a one-entry delta, reopens it, checks the stored bytes, returns the decoded
/// matrix.
fn through_file(enc: &Encoded) -> Vec<f32> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.delta");
    let base = BaseFingerprint {
        algorithm: FINGERPRINT_ALGORITHM.to_owned(),
        hex: "0".repeat(64),
        tensors: 0,
    };
    let mut header = DeltaHeader::new("test", base, FinetuneInfo::default());
    header.tensors.insert(NAME.to_owned(), enc.entry.clone());
    deltaserve_format::write_delta(&path, &header, enc.tensors.clone(), false).unwrap();
    let delta = DeltaFile::open(&path).unwrap();
    let in_file: u64 = delta
        .container_tensor_names()
        .iter()
        .map(|n| delta.tensor_bytes(n).unwrap().0.len() as u64)
        .sum();
    assert_eq!(
        enc.stored_bytes(),
        in_file,
        "reported size vs bytes written"
    );
    decode_dense(&delta, NAME, &enc.entry).unwrap()
}

/// ‖(W − Ŵ) Xᵀ‖² = tr(E H Eᵀ), float64.
fn output_error(c: &Case, target: &[f32], got: &[f32]) -> f64 {
    let mut t = 0f64;
    for r in 0..ROWS {
        let e: Vec<f64> = (0..COLS)
            .map(|j| f64::from(target[r * COLS + j] - got[r * COLS + j]))
            .collect();
        for i in 0..COLS {
            for j in 0..COLS {
                t += e[i] * f64::from(c.calib.gram[i * COLS + j]) * e[j];
            }
        }
    }
    t
}

#[test]
fn rtn_codec_decodes_to_the_quantized_finetune_and_size_is_bytes_written() {
    let c = case();
    for (spec, grid) in [
        (
            "rtn",
            GridSpec {
                bits: 8,
                group_size: None,
                symmetric: false,
                f16_scales: true,
            },
        ),
        (
            "rtn:bits=3,group=16,sym=1",
            GridSpec {
                bits: 3,
                group_size: Some(16),
                symmetric: true,
                f16_scales: true,
            },
        ),
    ] {
        let codec = parse_codec(spec).unwrap();
        let enc = codec.encode(&input(&c)).unwrap();
        let decoded = through_file(&enc);
        assert_eq!(
            decoded,
            quantize_rtn(&c.ft, ROWS, COLS, &grid).dequantize(),
            "{spec}"
        );
        // codes + f16 scale (+ u8 zero) per group
        assert!(
            (enc.bits_per_param() - grid.bits_per_param(ROWS, COLS)).abs() < 1e-12,
            "{spec}: {} vs {}",
            enc.bits_per_param(),
            grid.bits_per_param(ROWS, COLS)
        );
    }
    let enc = parse_codec("rtn").unwrap().encode(&input(&c)).unwrap();
    assert_eq!(enc.stored_bytes() as usize, ROWS * COLS + ROWS * 3);
}

#[test]
fn gptq_codec_decodes_to_gptq_and_needs_calibration() {
    let c = case();
    let h: Vec<f64> = c.calib.gram.iter().map(|&v| f64::from(v)).collect();
    for (spec, act_order) in [
        ("gptq:group=16", false),
        ("gptq:group=16,act_order=1", true),
    ] {
        let codec = parse_codec(spec).unwrap();
        assert!(codec.needs_calibration());
        let enc = codec.encode(&input(&c)).unwrap();
        let d = GptqConfig::default();
        let cfg = GptqConfig {
            act_order,
            grid: GridSpec {
                group_size: Some(16),
                ..d.grid
            },
            ..d
        };
        let want = quantize_gptq(&c.ft, ROWS, COLS, &h, &cfg)
            .unwrap()
            .dequantize();
        assert_eq!(through_file(&enc), want, "{spec}");
    }
    let mut no_calib = input(&c);
    no_calib.calibration = None;
    let err = parse_codec("gptq").unwrap().encode(&no_calib).unwrap_err();
    assert!(err.to_string().contains("calibration"), "{err}");
}

#[test]
fn eora_adds_its_correction_and_lowers_the_output_error() {
    let c = case();
    let delta: Vec<f32> = c.ft.iter().zip(&c.base).map(|(f, b)| f - b).collect();
    for (spec, inner, target) in [
        ("eora:rank=4+bitdelta", None, &delta),
        (
            "eora:rank=4+rtn:bits=3,group=8",
            Some("rtn:bits=3,group=8"),
            &c.ft,
        ),
        (
            "eora:rank=2+gptq:bits=2,group=16",
            Some("gptq:bits=2,group=16"),
            &c.ft,
        ),
    ] {
        let codec = parse_codec(spec).unwrap();
        assert_eq!(
            codec.spec().split('+').next().unwrap(),
            "eora:rank=".to_owned() + &spec[10..11]
        );
        let enc = codec.encode(&input(&c)).unwrap();
        let with = through_file(&enc);
        let without = match inner {
            Some(s) => through_file(&parse_codec(s).unwrap().encode(&input(&c)).unwrap()),
            None => {
                // BitDelta eq. 1-2, float64 mean.
                let scale = (delta.iter().map(|&d| f64::from(d.abs())).sum::<f64>()
                    / delta.len() as f64) as f32;
                delta
                    .iter()
                    .map(|&d| if d >= 0.0 { scale } else { -scale })
                    .collect()
            }
        };
        let (e_with, e_without) = (
            output_error(&c, target, &with),
            output_error(&c, target, &without),
        );
        assert!(
            e_with < 0.8 * e_without,
            "{spec}: output error {e_with:e} with EoRA vs {e_without:e} without"
        );
        let rank: usize = spec[10..11].parse().unwrap();
        let extra = 16.0 * (rank * (ROWS + COLS)) as f64 / (ROWS * COLS) as f64;
        let inner_bits = match inner {
            Some(s) => parse_codec(s)
                .unwrap()
                .encode(&input(&c))
                .unwrap()
                .bits_per_param(),
            None => (ROWS * COLS.div_ceil(32) * 32 + 32) as f64 / (ROWS * COLS) as f64,
        };
        assert!(
            (enc.bits_per_param() - inner_bits - extra).abs() < 1e-12,
            "{spec}: {} bits vs inner {inner_bits} + EoRA {extra}",
            enc.bits_per_param()
        );
    }
}

#[test]
fn bad_specs_are_one_line_errors() {
    for (spec, needle) in [
        ("eora:rank=4", "eora wraps a codec"),
        ("eora:rank=4+eora:rank=2+rtn", "cannot wrap eora"),
        ("rtn:bits=9", "bits=9"),
        ("rtn+gptq", "does not wrap"),
        ("gptq:damp=-1", "damp=-1"),
    ] {
        let err = parse_codec(spec).unwrap_err().to_string();
        assert!(err.contains(needle), "{spec}: {err}");
        assert!(!err.contains('\n'), "{spec}: {err}");
    }
}
