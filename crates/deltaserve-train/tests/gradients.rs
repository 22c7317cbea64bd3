//! The gradient reaches every trainable `Var` (candle's fused ops would drop it silently), and the
//! scales' gradients equal central finite differences in f64.

mod common;

use candle_core::{DType, Device, Tensor};
use deltaserve_format::DeltaFile;
use deltaserve_model::{Checkpoint, Model};
use deltaserve_train::{DistillConfig, DistillLoss, ScaleDistiller, TrainableDelta};

fn windows(n: usize, len: usize) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| (0..len).map(|j| ((i * 31 + j * 7) % 256) as u32).collect())
        .collect()
}

/// Loads a pair's base, fine-tune and delta in `dtype`.
fn load(pair: &common::Pair, dtype: DType) -> (Checkpoint, Model, Model, DeltaFile) {
    let base_ckpt = Checkpoint::open(&pair.base).unwrap();
    let base = Model::load(&base_ckpt, dtype, &Device::Cpu).unwrap();
    let teacher = Model::load(
        &Checkpoint::open(&pair.finetuned).unwrap(),
        dtype,
        &Device::Cpu,
    )
    .unwrap();
    let file = DeltaFile::open(&pair.delta).unwrap();
    (base_ckpt, base, teacher, file)
}

fn check_every_var_gets_gradient(train_uncompressed: bool, loss: DistillLoss) {
    let pair = common::pair();
    let (ckpt, base, teacher, file) = load(&pair, DType::F32);
    let student = TrainableDelta::from_delta(&file, &ckpt, &base, train_uncompressed).unwrap();
    let mut names: Vec<String> = student.scales.iter().map(|s| s.name.clone()).collect();
    names.extend(
        student
            .full
            .iter()
            .filter(|f| f.trained)
            .map(|f| f.name.clone()),
    );
    let expected_full = if train_uncompressed {
        3 + 2 * common::LAYERS
    } else {
        0
    };
    assert_eq!(names.len(), 7 * common::LAYERS + expected_full, "{names:?}");

    let cfg = DistillConfig {
        train_uncompressed,
        loss,
        ..Default::default()
    };
    let d = ScaleDistiller::new(&base, &teacher, student, cfg).unwrap();
    let vars = d.trainable_vars();
    let grads = d.loss(&windows(2, 16)).unwrap().backward().unwrap();
    for (name, var) in names.iter().zip(&vars) {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient ({loss})"));
        let norm = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            norm > 0.0 && norm.is_finite(),
            "{name}: gradient norm {norm} ({loss})"
        );
    }
}

#[test]
fn every_trainable_scale_receives_gradient() {
    check_every_var_gets_gradient(false, DistillLoss::Mse);
    check_every_var_gets_gradient(false, DistillLoss::Kl);
}

#[test]
fn every_full_tensor_receives_gradient_with_train_uncompressed() {
    check_every_var_gets_gradient(true, DistillLoss::Mse);
    check_every_var_gets_gradient(true, DistillLoss::Kl);
}

/// Relative error allowed between autograd and central differences. With step h = 1e-4·|s| in
/// f64, truncation error is O(h²) ≈ 1e-8 relative and rounding error ≈ 1e-16·L/(h·|dL/ds|), far
/// below this; the bound is the issue's.
const FD_TOLERANCE: f64 = 1e-4;

fn check_scale_gradients_match_finite_differences(loss: DistillLoss) {
    let pair = common::pair();
    let (ckpt, base, teacher, file) = load(&pair, DType::F64);
    let student = TrainableDelta::from_delta(&file, &ckpt, &base, false).unwrap();
    let cfg = DistillConfig {
        loss,
        ..Default::default()
    };
    let d = ScaleDistiller::new(&base, &teacher, student, cfg).unwrap();
    let batch = windows(2, 12);
    let loss_at = || d.loss(&batch).unwrap().to_scalar::<f64>().unwrap();
    let grads = d.loss(&batch).unwrap().backward().unwrap();
    let mut worst = 0f64;
    for s in &d.student().scales {
        let analytic = grads
            .get(s.var.as_tensor())
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()[0];
        let s0 = s.var.as_tensor().to_vec1::<f64>().unwrap()[0];
        let h = 1e-4 * s0.abs();
        let set = |v: f64| {
            s.var
                .set(&Tensor::new(&[v], &Device::Cpu).unwrap())
                .unwrap()
        };
        set(s0 + h);
        let up = loss_at();
        set(s0 - h);
        let down = loss_at();
        set(s0);
        let numeric = (up - down) / (2.0 * h);
        let rel = (analytic - numeric).abs() / numeric.abs().max(analytic.abs()).max(1e-30);
        worst = worst.max(rel);
        assert!(
            rel < FD_TOLERANCE,
            "{} ({loss}): autograd {analytic:e}, finite difference {numeric:e}, relative error {rel:e}",
            s.name
        );
    }
    eprintln!(
        "{loss}: worst relative error over {} scales: {worst:e}",
        d.student().scales.len()
    );
}

#[test]
fn scale_gradients_match_finite_differences_f64() {
    check_scale_gradients_match_finite_differences(DistillLoss::Mse);
    check_scale_gradients_match_finite_differences(DistillLoss::Kl);
}
