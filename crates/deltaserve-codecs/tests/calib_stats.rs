//! Calibration statistics: `Σ xᵀx` of the first layer's q/k/v input against a float64
//! computation written here (embedding rows → RMSNorm → Gram), and the shape of the whole set.

use candle_core::{DType, Device};
use deltaserve_codecs::calib_stats::{collect_calibration, weight_name, CalibStatsOptions};
use deltaserve_model::random::{RandomCheckpoint, RandomShape};
use deltaserve_model::{Checkpoint, Model, Proj};

#[test]
fn gram_of_first_layer_input_matches_float64_reference() {
    let dir = tempfile::tempdir().unwrap();
    let shape = RandomShape::preset("tiny").unwrap();
    RandomCheckpoint {
        shape,
        bf16: false,
        seed: 3,
        finetune_of: None,
        max_shard_bytes: usize::MAX,
        tokenizer_from: None,
    }
    .write(dir.path())
    .unwrap();
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let model = Model::load(&ckpt, DType::F32, &Device::Cpu).unwrap();
    let tokens: Vec<u32> = (0..50u32).map(|i| (i * 37 + 11) % 512).collect();
    let opts = CalibStatsOptions {
        seq_len: 16,
        max_tokens: 40,
        progress: false,
    };
    let set = collect_calibration(&model, &tokens, &opts).unwrap();
    assert_eq!(set.len(), shape.layers * 7);
    let q = &set[&weight_name(0, Proj::Q)];
    assert_eq!(q.tokens, 40);
    assert_eq!(q, &set[&weight_name(0, Proj::K)]);
    assert_eq!(q, &set[&weight_name(0, Proj::V)]);
    assert_eq!(
        set[&weight_name(1, Proj::Gate)],
        set[&weight_name(1, Proj::Up)]
    );
    let h = shape.hidden;
    assert_eq!(
        set[&weight_name(1, Proj::Down)].gram.len(),
        shape.intermediate.pow(2)
    );

    // Reference: x_t = RMSNorm(embed[t]) ⊙ input_layernorm, in f64, over the first 40 tokens.
    let embed: Vec<Vec<f32>> = model.embed_tokens.to_vec2().unwrap();
    let norm: Vec<f32> = model.layers[0].input_layernorm.to_vec1().unwrap();
    let eps = model.config().rms_norm_eps;
    let mut want = vec![0f64; h * h];
    for &t in &tokens[..40] {
        let e: Vec<f64> = embed[t as usize].iter().map(|&v| f64::from(v)).collect();
        let ms = e.iter().map(|v| v * v).sum::<f64>() / h as f64;
        let x: Vec<f64> = e
            .iter()
            .zip(&norm)
            .map(|(v, &g)| v / (ms + eps).sqrt() * f64::from(g))
            .collect();
        for i in 0..h {
            for j in 0..h {
                want[i * h + j] += x[i] * x[j];
            }
        }
    }
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    let max = q
        .gram
        .iter()
        .zip(&want)
        .map(|(&g, w)| (f64::from(g) - w).abs())
        .fold(0f64, f64::max);
    // f32 products summed over 16-token windows: ~1e-6 relative; 1e-5 leaves room.
    assert!(
        max <= 1e-5 * scale,
        "max abs diff {max:e} (scale {scale:e})"
    );
}

#[test]
fn empty_calibration_data_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    RandomCheckpoint {
        shape: RandomShape::preset("tiny").unwrap(),
        bf16: false,
        seed: 1,
        finetune_of: None,
        max_shard_bytes: usize::MAX,
        tokenizer_from: None,
    }
    .write(dir.path())
    .unwrap();
    let model = Model::load(
        &Checkpoint::open(dir.path()).unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let err = collect_calibration(&model, &[], &CalibStatsOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("no tokens") && !err.contains('\n'), "{err}");
}
