//! Times the parts of one calibration step on a model pair (teacher forward, student forward,
//! backward, optimizer update), to see where a step's time goes.
//!
//!     cargo run --release -p deltaserve-train --example step_timing -- BASE FINETUNED DELTA [STEPS]

use std::time::Instant;

use candle_core::{DType, Device};
use deltaserve_format::DeltaFile;
use deltaserve_model::{Checkpoint, Model};
use deltaserve_train::{DistillConfig, ScaleDistiller, TrainableDelta};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, base, ft, delta, ..] = args.as_slice() else {
        return Err(
            "usage: step_timing BASE FINETUNED DELTA [STEPS] [--train-uncompressed]".into(),
        );
    };
    let steps: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(5);
    let all = args.iter().any(|a| a == "--train-uncompressed");
    let ckpt = Checkpoint::open(base)?;
    let base = Model::load(&ckpt, DType::F32, &Device::Cpu)?;
    let teacher = Model::load(&Checkpoint::open(ft)?, DType::F32, &Device::Cpu)?;
    let file = DeltaFile::open(delta)?;
    let student = TrainableDelta::from_delta(&file, &ckpt, &base, all)?;
    let vocab = base.config().vocab_size as u32;
    let batch: Vec<Vec<u32>> = (0..4)
        .map(|i| (0..128).map(|j| (i * 977 + j * 131) % vocab).collect())
        .collect();
    let d = ScaleDistiller::new(
        &base,
        &teacher,
        student,
        DistillConfig {
            train_uncompressed: all,
            ..Default::default()
        },
    )?;
    let mut t = [0f64; 3];
    for _ in 0..steps {
        let t0 = Instant::now();
        let _ = d.teacher_logits(&batch)?;
        let t1 = Instant::now();
        let loss = d.loss(&batch)?; // teacher + student
        let t2 = Instant::now();
        let _g = loss.backward()?;
        let t3 = Instant::now();
        t[0] += (t1 - t0).as_secs_f64();
        t[1] += (t2 - t1).as_secs_f64() - (t1 - t0).as_secs_f64();
        t[2] += (t3 - t2).as_secs_f64();
    }
    let n = steps as f64;
    println!(
        "per step: teacher {:.3}s, student forward {:.3}s, backward {:.3}s",
        t[0] / n,
        t[1] / n,
        t[2] / n
    );
    Ok(())
}
