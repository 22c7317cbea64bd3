//! Every bad input stops with one clear error before anything is written, and the input delta is
//! byte-identical afterwards.

mod common;

use std::path::Path;

use deltaserve_train::{calibrate, CalibrateJob, DistillConfig, Quiet, TrainError};

fn job(pair: &common::Pair) -> CalibrateJob {
    let mut job = CalibrateJob::new(
        pair.base.clone(),
        pair.finetuned.clone(),
        pair.delta.clone(),
        vec![pair.data.clone()],
        pair.path("out.delta"),
    );
    job.seq_len = 32;
    job.max_val_windows = 4;
    job.distill = DistillConfig {
        steps: 4,
        ..Default::default()
    };
    job
}

/// Runs `job`, expects an error, checks the input delta is unchanged and no output was written.
fn fails(pair: &common::Pair, job: &CalibrateJob) -> (TrainError, String) {
    let before = std::fs::read(&pair.delta).unwrap();
    let err = calibrate(job, &mut Quiet).expect_err("calibration should fail");
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "error is not one line: {msg}");
    assert_eq!(
        std::fs::read(&pair.delta).unwrap(),
        before,
        "input delta changed ({msg})"
    );
    if job.out != job.delta {
        assert!(!job.out.exists(), "an output was written ({msg})");
    }
    let leftovers: Vec<_> = std::fs::read_dir(pair.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    (err, msg)
}

#[test]
fn no_data_is_named() {
    let pair = common::pair();
    let mut j = job(&pair);
    std::fs::write(pair.path("empty.txt"), "  \n").unwrap();
    j.data = vec![pair.path("empty.txt")];
    let (err, msg) = fails(&pair, &j);
    assert!(
        matches!(err, TrainError::NoData { .. }) && msg.contains("empty.txt"),
        "{msg}"
    );

    j.data = vec![];
    let (err, _) = fails(&pair, &j);
    assert!(matches!(err, TrainError::NoData { .. }));

    std::fs::create_dir(pair.path("nothing")).unwrap();
    j.data = vec![pair.path("nothing")];
    let (_, msg) = fails(&pair, &j);
    assert!(
        msg.contains("nothing") && msg.contains("no calibration data"),
        "{msg}"
    );

    j.data = vec![pair.path("missing.txt")];
    let (_, msg) = fails(&pair, &j);
    assert!(
        msg.contains("missing.txt") && msg.contains("no such file"),
        "{msg}"
    );
}

#[test]
fn data_shorter_than_one_window_says_how_many_tokens() {
    let pair = common::pair();
    let mut j = job(&pair);
    // One byte per token with the fixture's byte-level tokenizer.
    std::fs::write(pair.path("short.txt"), "twenty bytes of text").unwrap();
    j.data = vec![pair.path("short.txt")];
    let (err, msg) = fails(&pair, &j);
    assert!(
        matches!(err, TrainError::TooShort { found: 20, .. }),
        "{msg}"
    );
    assert!(
        msg.contains("20 tokens") && msg.contains("at least 36") && msg.contains("--seq-len 32"),
        "{msg}"
    );
}

#[test]
fn delta_from_another_base_is_rejected() {
    let pair = common::pair();
    let other = pair.path("other_base");
    common::write_model(&other, &common::random_base(7), &common::config());
    let mut j = job(&pair);
    j.base = other;
    let (err, msg) = fails(&pair, &j);
    assert!(matches!(err, TrainError::Format(_)), "{msg}");
    assert!(msg.contains("other_base") && msg.contains("base"), "{msg}");
}

#[test]
fn delta_from_another_finetune_is_rejected() {
    let pair = common::pair();
    // Same config.json, other weights: caught by the signs.
    let other = pair.path("other_ft");
    common::write_model(
        &other,
        &common::finetune_of(&common::random_base(1), 9),
        &common::config(),
    );
    let mut j = job(&pair);
    j.finetuned = other.clone();
    let (err, msg) = fails(&pair, &j);
    assert!(matches!(err, TrainError::WrongFinetune { .. }), "{msg}");
    assert!(msg.contains("other_ft") && msg.contains("signs"), "{msg}");

    // Another config.json: caught by the header's copy.
    let mut cfg = common::config();
    cfg["rms_norm_eps"] = 1e-6.into();
    std::fs::write(other.join("config.json"), cfg.to_string()).unwrap();
    let (_, msg) = fails(&pair, &j);
    assert!(
        msg.contains("config.json") && msg.contains("`rms_norm_eps`"),
        "{msg}"
    );
}

#[test]
fn infinite_learning_rate_stops_at_the_step_that_diverged() {
    let pair = common::pair();
    let mut j = job(&pair);
    j.distill.lr = f64::INFINITY;
    let (err, msg) = fails(&pair, &j);
    assert!(
        matches!(err, TrainError::NonFinite { step: 2, .. }),
        "{msg}"
    );
    assert!(msg.contains("step 2 of 4") && msg.contains("--lr"), "{msg}");
}

#[test]
fn poisoned_finetune_stops_at_the_first_step() {
    let pair = common::pair();
    let poisoned = pair.path("poisoned");
    let mut t = common::finetune_of(&common::random_base(1), 2);
    for (name, _, v) in &mut t {
        if name == "lm_head.weight" {
            v[5] = f32::NAN;
        }
    }
    common::write_model(&poisoned, &t, &common::config());
    let mut j = job(&pair);
    j.finetuned = poisoned;
    let (err, msg) = fails(&pair, &j);
    assert!(
        matches!(err, TrainError::NonFinite { step: 1, .. }),
        "{msg}"
    );
}

#[test]
fn output_is_never_the_input_and_never_overwritten_without_force() {
    let pair = common::pair();
    let mut j = job(&pair);
    j.out = pair.delta.clone();
    j.overwrite = true;
    let (_, msg) = fails(&pair, &j);
    assert!(msg.contains("input delta"), "{msg}");

    let mut j = job(&pair);
    std::fs::write(&j.out, b"keep me").unwrap();
    let err = calibrate(&j, &mut Quiet).unwrap_err().to_string();
    assert!(err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(&j.out).unwrap(), b"keep me");
    j.overwrite = true;
    calibrate(&j, &mut Quiet).unwrap();
    assert!(deltaserve_format::DeltaFile::open(Path::new(&j.out)).is_ok());
}
