//! `compare` on a tiny random base and a perturbed "fine-tune": the report's invariants, its
//! JSON, and the Markdown report with its PNG plots.

mod common;

use deltaserve_eval::{
    compare, CompareInputs, CompareOptions, CompareReport, DeltaInput, EvalDataset, ModelInfo,
    ModelKind,
};
use deltaserve_format::{BaseFingerprint, DeltaHeader, FinetuneInfo};
use deltaserve_model::TenantWeights;

fn header(calibration: Option<serde_json::Value>) -> DeltaHeader {
    let fp = BaseFingerprint {
        algorithm: "blake3-v1".into(),
        hex: "00".repeat(32),
        tensors: 0,
    };
    let mut h = DeltaHeader::new("bitdelta", fp, FinetuneInfo::default());
    h.calibration = calibration;
    h
}

fn delta<'a>(
    name: &str,
    tenant: &'a TenantWeights,
    calibration: Option<serde_json::Value>,
) -> DeltaInput<'a> {
    let h = header(calibration);
    DeltaInput {
        name: name.into(),
        tenant,
        summary: h.summary(),
        header: h,
        file_size: 1234,
    }
}

fn data() -> Vec<EvalDataset> {
    let v = common::VOCAB as u32;
    let a: Vec<Vec<u32>> = (0..3)
        .map(|s| (0..40u32).map(|i| (i * 7 + s * 13 + 1) % v).collect())
        .collect();
    let b: Vec<Vec<u32>> = vec![(0..25u32).map(|i| (i * i + 3) % v).collect()];
    vec![
        EvalDataset::from_token_windows("stream-a", a),
        EvalDataset::from_token_windows("stream-b", b),
    ]
}

fn run(
    tiny: &common::Tiny,
    deltas: Vec<DeltaInput<'_>>,
    datasets: &[EvalDataset],
) -> CompareReport {
    compare(&CompareInputs {
        base: &tiny.base,
        base_info: ModelInfo::from_checkpoint(&tiny.base_ckpt),
        finetuned: &tiny.finetuned,
        finetuned_info: ModelInfo::from_checkpoint(&tiny.ft_ckpt),
        deltas,
        datasets,
        // Small batches so several forward calls are made and summed.
        options: CompareOptions {
            batch_tokens: Some(50),
            progress: false,
            weight_errors: true,
        },
    })
    .unwrap()
}

#[test]
fn a_model_against_itself_has_zero_kl_and_full_agreement() {
    let tiny = common::tiny_pair(0.2);
    let datasets = data();
    // The base as its own "fine-tune".
    let r = compare(&CompareInputs {
        base: &tiny.base,
        base_info: ModelInfo::from_checkpoint(&tiny.base_ckpt),
        finetuned: &tiny.base,
        finetuned_info: ModelInfo::from_checkpoint(&tiny.base_ckpt),
        deltas: vec![],
        datasets: &datasets,
        options: CompareOptions::default(),
    })
    .unwrap();
    for ds in &r.datasets {
        for m in &ds.metrics {
            assert_eq!(m.kl, 0.0, "{} on {}", m.model, ds.name);
            assert_eq!(m.top1_agreement, 1.0, "{} on {}", m.model, ds.name);
        }
        assert_eq!(ds.metrics[0].ppl, ds.metrics[1].ppl);
    }
}

#[test]
fn compare_report_invariants() {
    let tiny = common::tiny_pair(0.2);
    let exact = common::dense_tenant(&tiny.base, &tiny.finetuned);
    let sign = common::sign_tenant(&tiny.base, &tiny.finetuned, 1.0);
    let sign_cal = common::sign_tenant(&tiny.base, &tiny.finetuned, 0.9);
    let empty = TenantWeights::empty(common::LAYERS);
    let cal = serde_json::json!({"method": "test", "scales_before": {}});
    let datasets = data();
    let r = run(
        &tiny,
        vec![
            delta("exact", &exact, None),
            delta("sign", &sign, None),
            delta("sign-cal", &sign_cal, Some(cal)),
            delta("nothing", &empty, None),
        ],
        &datasets,
    );
    let names: Vec<&str> = r.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        ["base", "finetuned", "exact", "sign", "sign-cal", "nothing"]
    );
    assert_eq!(r.models[0].kind, ModelKind::Base);
    assert_eq!(r.models[1].kind, ModelKind::Finetuned);
    assert_eq!(r.models[4].calibrated, Some(true));
    assert_eq!(r.models[3].calibrated, Some(false));
    // Full f32 checkpoints: 32 bits per parameter.
    assert_eq!(r.models[0].bits_per_param, 32.0);
    assert!(r.models[0].size_bytes > 0);

    for ds in &r.datasets {
        let m = |name: &str| ds.metrics.iter().find(|m| m.model == name).unwrap();
        assert_eq!(ds.metrics.len(), 6);
        assert_eq!(m("finetuned").kl, 0.0);
        assert_eq!(m("finetuned").top1_agreement, 1.0);
        // The exact dense delta is the fine-tune up to f32 rounding.
        assert!(m("exact").kl < 1e-6, "exact delta KL {}", m("exact").kl);
        assert!((m("exact").ppl / m("finetuned").ppl - 1.0).abs() < 1e-4);
        // An empty delta is the base.
        assert_eq!(m("nothing").ppl, m("base").ppl);
        assert_eq!(m("nothing").kl, m("base").kl);
        // One bit per weight keeps most of the change: closer to the fine-tune than the base is.
        assert!(
            m("sign").kl < m("base").kl,
            "{}: sign KL {} base KL {}",
            ds.name,
            m("sign").kl,
            m("base").kl
        );
        assert!(m("base").kl > 0.0);
        for x in &ds.metrics {
            assert!(x.ppl.is_finite() && x.ppl > 1.0);
            assert!((0.0..=1.0).contains(&x.top1_agreement));
        }
    }
    assert_eq!(r.datasets[0].scored_targets, 3 * 39);
    assert_eq!(r.datasets[1].scored_targets, 24);

    let w = |name: &str| r.weights.iter().find(|w| w.delta == name).unwrap();
    assert_eq!(r.weights.len(), 4);
    assert_eq!(w("exact").tensors.len(), common::LAYERS * 7);
    for t in &w("exact").tensors {
        assert!(t.rel_err < 1e-6, "{} {}", t.name, t.rel_err);
        assert_eq!(t.kind, "dense");
    }
    for t in &w("nothing").tensors {
        assert_eq!(t.rel_err, 1.0);
        assert_eq!(t.kind, "none");
    }
    for t in &w("sign").tensors {
        // Uniform noise: ‖mean|Δ|·sign(Δ) − Δ‖/‖Δ‖ = sqrt(1 − 3/4) = 0.5 in expectation.
        assert!((0.4..0.6).contains(&t.rel_err), "{} {}", t.name, t.rel_err);
        let init = t.rel_err_init.unwrap();
        assert!(
            (init - t.rel_err).abs() < 1e-5,
            "{}: stored scale is the initial one",
            t.name
        );
        assert!((t.scale.unwrap() / t.scale_init.unwrap() - 1.0).abs() < 1e-5);
    }
    for t in &w("sign-cal").tensors {
        assert!((t.scale.unwrap() / t.scale_init.unwrap() - 0.9).abs() < 1e-5);
        assert!(t.scale_before.is_none(), "the record names no tensor");
    }

    // JSON: every model, every data set, the definitions.
    let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
    assert_eq!(v["models"].as_array().unwrap().len(), 6);
    assert_eq!(v["datasets"].as_array().unwrap().len(), 2);
    for ds in v["datasets"].as_array().unwrap() {
        let ms = ds["metrics"].as_array().unwrap();
        let ft = ms.iter().find(|m| m["model"] == "finetuned").unwrap();
        assert_eq!(ft["kl"].as_f64(), Some(0.0));
        assert_eq!(ft["top1_agreement"].as_f64(), Some(1.0));
        for name in names.iter() {
            assert!(
                ms.iter().any(|m| m["model"] == *name),
                "{name} missing from {}",
                ds["name"]
            );
        }
    }
    assert!(v["definitions"]["rel. error"]
        .as_str()
        .unwrap()
        .contains("W_ft − W_base"));
    assert_eq!(
        v["weights"][0]["tensors"].as_array().unwrap().len(),
        common::LAYERS * 7
    );

    // The table names every model and data set.
    let table = r.table();
    for name in names
        .iter()
        .chain(&["stream-a", "stream-b", "KL(ft‖model)"])
    {
        assert!(table.contains(name), "table lacks {name}:\n{table}");
    }
}

#[test]
fn markdown_report_and_plots_are_written() {
    let tiny = common::tiny_pair(0.2);
    let sign = common::sign_tenant(&tiny.base, &tiny.finetuned, 1.0);
    let sign_cal = common::sign_tenant(&tiny.base, &tiny.finetuned, 0.9);
    let datasets = data();
    let r = run(
        &tiny,
        vec![
            delta("sign", &sign, None),
            delta("sign-cal", &sign_cal, Some(serde_json::json!({}))),
        ],
        &datasets,
    );
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("report");
    let files = r.write_markdown(&dir).unwrap();
    assert_eq!(files.markdown, dir.join("report.md"));
    let md = std::fs::read_to_string(&files.markdown).unwrap();
    for needle in [
        "metrics.png",
        "layer_error.png",
        "scales.png",
        "stream-a",
        "sign-cal",
        "‖W_rec − W_ft‖",
    ] {
        assert!(md.contains(needle), "report.md lacks {needle}");
    }
    let names: Vec<String> = files
        .plots
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["metrics.png", "layer_error.png", "scales.png"]);
    for p in &files.plots {
        let bytes = std::fs::read(p).unwrap();
        assert_eq!(
            &bytes[..8],
            b"\x89PNG\r\n\x1a\n",
            "{} is not a PNG",
            p.display()
        );
        assert!(bytes.len() > 5_000, "{} is suspiciously small", p.display());
    }
    // No temporary files left behind; writing again replaces the files.
    let listing: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(listing.len(), 4, "{listing:?}");
    r.write_markdown(&dir).unwrap();
    if let Ok(keep) = std::env::var("DELTASERVE_KEEP_REPORT") {
        let keep = std::path::PathBuf::from(keep);
        std::fs::create_dir_all(&keep).unwrap();
        for f in std::fs::read_dir(&dir).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), keep.join(f.file_name())).unwrap();
        }
    }
}
