//! `--budget-bits`: the per-matrix choice respects the budget, the file holds exactly the bits
//! the plan counted, each matrix carries the codec chosen for it, and a looser budget never
//! gives a larger error.

use deltaserve_codecs::bitdelta::CompressOptions;
use deltaserve_codecs::budget_choice::{parse_candidate, plan_budget};
use deltaserve_codecs::coded::compress_coded;
use deltaserve_format::{DeltaFile, TensorEntry};
use deltaserve_model::random::{RandomCheckpoint, RandomShape};
use deltaserve_model::Checkpoint;

fn pair(dir: &std::path::Path) -> (Checkpoint, Checkpoint) {
    let shape = RandomShape::preset("tiny").unwrap();
    let base_dir = dir.join("base");
    RandomCheckpoint {
        shape,
        bf16: false,
        seed: 7,
        finetune_of: None,
        max_shard_bytes: usize::MAX,
        tokenizer_from: None,
    }
    .write(&base_dir)
    .unwrap();
    let base = Checkpoint::open(&base_dir).unwrap();
    let ft_dir = dir.join("ft");
    RandomCheckpoint {
        shape,
        bf16: false,
        seed: 8,
        finetune_of: Some((&base, 0.05)),
        max_shard_bytes: usize::MAX,
        tokenizer_from: None,
    }
    .write(&ft_dir)
    .unwrap();
    (base, Checkpoint::open(&ft_dir).unwrap())
}

const CANDIDATES: [&str; 4] = [
    "bitdelta",
    "lowrank:rank=2",
    "rtn:bits=4,group=32",
    "rtn:bits=8",
];

#[test]
fn budget_choice_respects_the_budget_and_the_file_holds_the_planned_bits() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = pair(dir.path());
    let mut last_error = f64::INFINITY;
    for avg_bits in [1.5, 3.0, 6.0] {
        let cands = CANDIDATES
            .iter()
            .map(|s| parse_candidate(s).unwrap())
            .collect();
        let plan = plan_budget(&base, &ft, cands, None, avg_bits).unwrap();
        let params: u64 = plan.matrices.iter().map(|m| m.params).sum();
        assert_eq!(plan.matrices.len(), 2 * 7);
        assert!(
            plan.allocation.total_bits as f64 <= avg_bits * params as f64,
            "{avg_bits}: {} bits for {params} params",
            plan.allocation.total_bits
        );
        let planned: u64 = plan.matrices.iter().map(|m| m.options[m.pick].bits).sum();
        assert_eq!(planned, plan.allocation.total_bits);
        assert!(plan.allocation.total_error <= last_error + 1e-12);
        last_error = plan.allocation.total_error;

        let out = dir.path().join(format!("b{avg_bits}.delta"));
        let opts = CompressOptions {
            out: out.clone(),
            force: false,
            progress: false,
        };
        compress_coded(&base, &ft, &plan.codec, None, &opts).unwrap();
        let delta = DeltaFile::open(&out).unwrap();
        let mut stored_bits = 0u64;
        for m in &plan.matrices {
            let entry = delta.entry(&m.name).unwrap();
            let want = CANDIDATES[m.pick].split(':').next().unwrap();
            let (got, tensors): (&str, Vec<String>) = match entry {
                TensorEntry::Sign { signs, scale, .. } => {
                    ("bitdelta", vec![signs.clone(), scale.clone()])
                }
                TensorEntry::Coded { codec, parts, .. } => (
                    codec.as_str(),
                    parts.values().map(|p| p.tensor.clone()).collect(),
                ),
                other => panic!("{}: {other:?}", m.name),
            };
            assert_eq!(got, want, "{}", m.name);
            for t in tensors {
                stored_bits += 8 * delta.tensor_bytes(&t).unwrap().0.len() as u64;
            }
        }
        assert_eq!(
            stored_bits, plan.allocation.total_bits,
            "{avg_bits}: bits in the file"
        );
    }
}

#[test]
fn impossible_budget_and_calibration_needs_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = pair(dir.path());
    let err = plan_budget(
        &base,
        &ft,
        vec![parse_candidate("rtn:bits=8").unwrap()],
        None,
        1.0,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("--budget-bits") && !err.contains('\n'),
        "{err}"
    );
    let err = plan_budget(
        &base,
        &ft,
        vec![parse_candidate("gptq").unwrap()],
        None,
        8.0,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("--data") && !err.contains('\n'), "{err}");
}
