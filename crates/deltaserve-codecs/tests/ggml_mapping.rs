//! Which of our quantized-base codes candle's GGML block formats (`candle_core::quantized`) hold
//! exactly, and whether candle's quantized matmul computes what the dequantized base computes.
//! The evidence for BENCHMARKS.md "Serving a quantized base without its bf16 copy".
//!
//! - `rtn:bits=4,group=32,sym=1` is GGML's Q4_0 (blocks of 32 weights of a row, one f16 scale
//!   `d`, `w = d·(q − 8)`) and `rtn:bits=8,group=32,sym=1` is Q8_0 (`w = d·q`, `q` = our code
//!   − 128): the same numbers, repacked. The test builds the GGML blocks from our codes and
//!   requires candle's dequantization to equal our decoder bit for bit.
//! - candle's CPU `QMatMul` quantizes the activations to Q8_0 blocks before the dot products
//!   (`k_quants.rs`, `matmul`: `T::VecDotType::from_float`), as llama.cpp does; its CUDA kernels
//!   do the same with Q8_1 unless `set_force_dmmv(true)`. So its output is *not* `x · Wᵀ` of the
//!   dequantized weights: the test measures the difference and requires it to exceed f32
//!   rounding by far, documenting why this is not a drop-in exact path.

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};
use deltaserve_codecs::rtn::{quantize_rtn, GridSpec};
use half::f16;

/// GGML's block of 32 weights, as bytes: `d` (f16, little-endian) then the codes.
fn ggml_blocks(codes: &[u8], scales: &[f64], rows: usize, cols: usize, bits: u8) -> Vec<u8> {
    let groups = cols / 32;
    let mut out = Vec::new();
    for r in 0..rows {
        for g in 0..groups {
            let d = f16::from_f64(scales[r * groups + g]);
            // Our scales are f16 values already (GridSpec::f16_scales): no rounding here.
            assert_eq!(d.to_f64(), scales[r * groups + g]);
            out.extend(d.to_le_bytes());
            let q = &codes[r * cols + g * 32..][..32];
            if bits == 4 {
                // Q4_0: byte j holds weight j (low nibble) and weight j + 16 (high nibble).
                out.extend((0..16).map(|j| q[j] | (q[j + 16] << 4)));
            } else {
                // Q8_0: signed codes, ours minus the symmetric zero point 128.
                out.extend(q.iter().map(|&c| (i16::from(c) - 128) as i8 as u8));
            }
        }
    }
    out
}

#[test]
fn symmetric_rtn_with_groups_of_32_is_ggml_q4_0_and_q8_0_exactly() {
    let (rows, cols) = (48, 256);
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| ((i as f32 * 0.37).sin() + 0.3 * (i as f32 * 0.011).cos()) * 0.05)
        .collect();
    let x: Vec<f32> = (0..4 * cols)
        .map(|i| (i as f32 * 0.73).cos() * 1.5)
        .collect();
    let x = Tensor::from_vec(x, (4, cols), &Device::Cpu).unwrap();
    for (bits, dtype, block_bytes) in [(4u8, GgmlDType::Q4_0, 18), (8, GgmlDType::Q8_0, 34)] {
        let spec = GridSpec {
            bits,
            group_size: Some(32),
            symmetric: true,
            f16_scales: true,
        };
        let q = quantize_rtn(&w, rows, cols, &spec);
        let ours = q.dequantize();
        let bytes = ggml_blocks(&q.codes, &q.scales, rows, cols, bits);
        assert_eq!(bytes.len(), rows * cols / 32 * block_bytes);
        let storage = QStorage::from_data(Cow::Owned(bytes), &Device::Cpu, dtype).unwrap();
        let qt = QTensor::new(storage, (rows, cols)).unwrap();
        let theirs: Vec<f32> = qt
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(theirs, ours, "{dtype:?}: the same weights, bit for bit");

        // The quantized matmul against the exact product with the dequantized weights.
        let wt = Tensor::from_vec(ours, (rows, cols), &Device::Cpu).unwrap();
        let exact: Vec<Vec<f32>> = x.matmul(&wt.t().unwrap()).unwrap().to_vec2().unwrap();
        let qmm = QMatMul::from_qtensor(qt).unwrap();
        let got: Vec<Vec<f32>> = qmm.forward(&x).unwrap().to_vec2().unwrap();
        // Relative to Σ_k |x_k·w_k| of each output (the size of the terms, not of their sum,
        // which cancels): f32 rounding of a 256-term dot product is ~1e-6 of it.
        let xs: Vec<Vec<f32>> = x.to_vec2().unwrap();
        let mut err = 0f32;
        for (i, xrow) in xs.iter().enumerate() {
            for (o, wrow) in theirs.chunks(cols).enumerate() {
                let terms: f32 = xrow.iter().zip(wrow).map(|(a, b)| (a * b).abs()).sum();
                err = err.max((exact[i][o] - got[i][o]).abs() / terms);
            }
        }
        eprintln!(
            "{dtype:?}: {:.2} bits/weight; candle QMatMul vs x·Wᵀ of the same weights: max error {err:.2e} of Σ|x·w|",
            block_bytes as f64 * 8.0 / 32.0
        );
        // 8-bit activation blocks round each x to 1/254 of its block's max: ~1e-3 of Σ|x·w|.
        assert!(err > 1e-4, "{dtype:?}: candle computed exactly ({err:e})");
        assert!(err < 1e-2, "{dtype:?}: {err:e}");
    }
}
