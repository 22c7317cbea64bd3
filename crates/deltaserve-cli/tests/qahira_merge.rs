//! QA-HiRA end to end (arXiv 2407.17029 §3.3) on the tiny f32 Llama fixture:
//! `quantize --method blockq` → `finetune --adapter qahira` on that quantized base →
//! `merge`, which must write a *quantized* model: the base's codes byte for byte with new
//! offsets, computing what the quantized base plus the adapter computes, with no adapter left.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use deltaserve_codecs::codec::decode_dense;
use deltaserve_codecs::load_tenant;
use deltaserve_format::{fingerprint_safetensors, DeltaFile, TensorEntry};
use deltaserve_model::{Checkpoint, ForwardOptions, Model, TenantWeights};

/// Largest |logit difference| between the merged quantized model and quantized base + adapter,
/// f32 on the CPU. Both use the same weights up to one f32 rounding per weight (the merged
/// weight is `scale·c + (offset + Δ)`, the other `(scale·c + offset) + Δ`, ≈ 1e-8 here); they
/// then differ in summation order (one product vs base product + adapter product), ≈ 1e-6 of
/// the logits' size. A wrong fold (an offset of the wrong block, a missing projection) moves
/// logits by the adapter's whole effect, which the test requires to be > 100 × this.
const TOLERANCE: f32 = 1e-4;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/llama")
}

fn run(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_deltaserve"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("running the deltaserve binary");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let (success, text) = run(dir, args);
    assert!(success, "deltaserve {args:?}\n{text}");
    text
}

/// The error of a command that must fail: one line (after the "Error:" prefix anyhow prints).
fn fails(dir: &Path, args: &[&str]) -> String {
    let (success, text) = run(dir, args);
    assert!(!success, "deltaserve {args:?} should fail\n{text}");
    let text = text.trim().to_owned();
    assert!(!text.contains("panicked"), "{text}");
    text
}

fn finetune(model: &str, groups: &str, out: &str) -> Vec<String> {
    [
        "finetune",
        "--model",
        model,
        "--data",
        "train.txt",
        "--out",
        out,
        "--adapter",
        "qahira",
        "--hira-groups",
        groups,
        "--steps",
        "4",
        "--batch",
        "4",
        "--seq",
        "32",
        "--lr",
        "1e-2",
        "--save-every",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn logits(model: &Model, tenant: Option<&TenantWeights>, seqs: &[Vec<u32>]) -> Vec<Tensor> {
    let windows: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
    model
        .window_logits(&windows, tenant, ForwardOptions::default())
        .unwrap()
}

fn max_diff(a: &[Tensor], b: &[Tensor]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            (x - y)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .fold(0f32, f32::max)
}

/// Part `role` of every blockq entry, by weight name.
fn parts(codes: &DeltaFile, role: &str) -> Vec<(String, Vec<u8>)> {
    codes
        .header()
        .tensors
        .iter()
        .filter(|(_, e)| matches!(e, TensorEntry::Coded { .. }))
        .map(|(n, e)| (n.clone(), codes.part(e, role).unwrap().0.to_vec()))
        .collect()
}

#[test]
fn merging_a_qahira_adapter_into_a_blockq_base_writes_a_quantized_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/demo/data/heldout_code.txt"),
    )
    .unwrap();
    std::fs::write(dir.join("train.txt"), &text[..4000]).unwrap();
    let fx = fixture();
    let fx = fx.to_str().unwrap();

    // 4-bit codes in blocks of 8 rows x 4 columns, the adapter's --hira-groups 4,8.
    ok(
        dir,
        &[
            "quantize",
            "--model",
            fx,
            "--method",
            "blockq:bits=4,rows=8,cols=4",
            "--out",
            "q",
            "--quiet",
        ],
    );
    let args = finetune("q", "4,8", "a.delta");
    ok(dir, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let merged = ok(
        dir,
        &[
            "merge", "--base", "q", "--delta", "a.delta", "--out", "m", "--quiet",
        ],
    );
    assert!(merged.contains("folded"), "{merged}");
    for f in ["config.json", "model.safetensors", "quantization.delta"] {
        assert!(dir.join("m").join(f).is_file(), "m/{f} missing");
    }

    // The codes are the base's byte for byte; scales too; offsets moved; the same bits.
    let qcodes = DeltaFile::open(dir.join("q/quantization.delta")).unwrap();
    let mcodes = DeltaFile::open(dir.join("m/quantization.delta")).unwrap();
    assert_eq!(parts(&qcodes, "codes"), parts(&mcodes, "codes"));
    assert_eq!(parts(&qcodes, "scales"), parts(&mcodes, "scales"));
    let (qo, mo) = (parts(&qcodes, "offsets"), parts(&mcodes, "offsets"));
    assert_eq!(qo.len(), 14, "every projection of the 2-layer fixture");
    assert!(
        qo.iter().zip(&mo).all(|(a, b)| a.1 != b.1),
        "every projection's offsets change"
    );
    let (qs, ms) = (qcodes.summary(), mcodes.summary());
    assert_eq!(qs.tensors, ms.tensors, "every entry stores the same bytes");
    assert_eq!(qs.bits_per_param(), ms.bits_per_param());
    // 4-bit codes + an F32 scale and offset per 8x4 block: 4 + 64/32 bits per weight.
    assert_eq!(ms.bits_per_param(), 6.0);
    assert_eq!(qs.tensor_bytes(), ms.tensor_bytes());
    assert_eq!(mcodes.header().method, "blockq:bits=4,rows=8,cols=4");
    assert!(mcodes.header().extra.contains_key("qahira_fold"));

    // No adapter is left: the merged weights are exactly what the merged codes decode to (f32).
    let mckpt = Checkpoint::open(dir.join("m")).unwrap();
    for (name, entry) in &mcodes.header().tensors {
        if let TensorEntry::Coded { .. } = entry {
            let decoded = decode_dense(&mcodes, name, entry).unwrap();
            let raw = mckpt.raw(name).unwrap();
            let stored: Vec<f32> = raw
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            assert_eq!(stored, decoded, "{name}");
        }
    }

    // Logits: merged quantized model == quantized base + adapter; the adapter mattered.
    let qckpt = Checkpoint::open(dir.join("q")).unwrap();
    let qmodel = Model::load(&qckpt, DType::F32, &Device::Cpu).unwrap();
    let mmodel = Model::load(&mckpt, DType::F32, &Device::Cpu).unwrap();
    let fp = fingerprint_safetensors(&qckpt.weight_files()).unwrap();
    let adapter = DeltaFile::open(dir.join("a.delta")).unwrap();
    let tenant = load_tenant(&adapter, &qckpt, &fp, DType::F32, &Device::Cpu).unwrap();
    let seqs: Vec<Vec<u32>> = (0..3)
        .map(|i| {
            (0..24)
                .map(|t| ((t * 7 + i * 13) % 500) as u32 + 4)
                .collect()
        })
        .collect();
    let with_adapter = logits(&qmodel, Some(&tenant), &seqs);
    let folded = logits(&mmodel, None, &seqs);
    let base = logits(&qmodel, None, &seqs);
    let worst = max_diff(&with_adapter, &folded);
    let moved = max_diff(&with_adapter, &base);
    eprintln!("max |logit| difference merged vs base+adapter: {worst:e}; adapter moved logits by up to {moved}");
    assert!(worst < TOLERANCE, "{worst}");
    assert!(
        moved > 100.0 * TOLERANCE,
        "the adapter barely changed logits ({moved})"
    );

    // --quantized no: today's dense merge (base weights + adapter), no codes file.
    ok(
        dir,
        &[
            "merge",
            "--base",
            "q",
            "--delta",
            "a.delta",
            "--out",
            "dense",
            "--quantized",
            "no",
            "--quiet",
        ],
    );
    assert!(!dir.join("dense/quantization.delta").exists());
    let dense = Model::load(
        &Checkpoint::open(dir.join("dense")).unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert!(max_diff(&with_adapter, &logits(&dense, None, &seqs)) < TOLERANCE);
    // An existing --out is not replaced without --force; with it, it is.
    let e = fails(
        dir,
        &["merge", "--base", "q", "--delta", "a.delta", "--out", "m"],
    );
    assert!(e.contains("already exists") && e.contains("--force"), "{e}");
    ok(
        dir,
        &[
            "merge", "--base", "q", "--delta", "a.delta", "--out", "m", "--force", "--quiet",
        ],
    );

    // Mismatched blocks: finetune refuses before training, naming the groups that would fold.
    let args = finetune("q", "8,8", "bad.delta");
    let e = fails(dir, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(e.contains("--hira-groups 4,8"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    // An 8x8 adapter trained on the same weights without the codes file (same fingerprint)
    // cannot fold into 8x4 codes: merge says so in one line, and writes nothing.
    std::fs::create_dir(dir.join("q_plain")).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        if dir.join("q").join(f).is_file() {
            std::fs::copy(dir.join("q").join(f), dir.join("q_plain").join(f)).unwrap();
        }
    }
    let args = finetune("q_plain", "8,8", "bad.delta");
    ok(dir, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let e = fails(
        dir,
        &[
            "merge",
            "--base",
            "q",
            "--delta",
            "bad.delta",
            "--out",
            "bad",
        ],
    );
    assert!(
        e.contains("8x8") && e.contains("8x4") && e.contains("--hira-groups 4,8"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(!dir.join("bad").exists());
    // --quantized yes needs a base with codes.
    let e = fails(
        dir,
        &[
            "merge",
            "--base",
            "q_plain",
            "--delta",
            "bad.delta",
            "--out",
            "bad",
            "--quantized",
            "yes",
        ],
    );
    assert!(
        e.contains("quantization.delta") && e.contains("blockq"),
        "{e}"
    );
}
