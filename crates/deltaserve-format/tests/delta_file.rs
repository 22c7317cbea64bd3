//! Write → read round trips, and every way a delta file can be bad.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use deltaserve_format::*;
use proptest::prelude::*;
use safetensors::tensor::TensorView;

const ROWS: usize = 4;
const COLS: usize = 70;

fn base() -> BaseFingerprint {
    let b = FingerprintBuilder::new();
    b.add_tensor("w", "BF16", &[ROWS, COLS], &[7u8; ROWS * COLS * 2]);
    b.add_tensor("norm", "BF16", &[COLS], &[1u8; COLS * 2]);
    b.finish()
}

fn delta_values() -> Vec<f32> {
    (0..ROWS * COLS)
        .map(|i| ((i * 37) % 11) as f32 - 5.0)
        .collect()
}

/// A small but complete delta: one sign matrix, one full tensor, every optional field set.
fn sample() -> (DeltaHeader, Vec<(String, OwnedTensor)>) {
    let finetuned = FinetuneInfo {
        config: Some(serde_json::json!({"hidden_size": COLS, "model_type": "llama"})),
        tokenizer_json: Some("{\"version\":\"1.0\"}".into()),
        tokenizer_config: Some(serde_json::json!({"eos_token": "</s>"})),
        chat_template: Some("{{ messages }}".into()),
    };
    let mut header = DeltaHeader::new("bitdelta", base(), finetuned);
    header.tensors.insert(
        "w".into(),
        TensorEntry::sign("w", [ROWS, COLS], Dtype::BF16),
    );
    header.tensors.insert(
        "norm".into(),
        TensorEntry::full("norm", FullValue::Finetuned, vec![COLS], Dtype::BF16),
    );
    header.calibration = Some(serde_json::json!({"steps": 10, "loss": [0.5, 0.25]}));
    header.extra.insert("note".into(), "test".into());
    let tensors = vec![
        (
            "w.signs".to_string(),
            OwnedTensor::from_u32(
                vec![ROWS, words_per_row(COLS)],
                &pack_signs(&delta_values(), ROWS, COLS),
            ),
        ),
        ("w.scale".to_string(), OwnedTensor::scale(0.125)),
        (
            "norm".to_string(),
            OwnedTensor::new(
                Dtype::BF16,
                vec![COLS],
                (0..COLS * 2).map(|i| i as u8).collect(),
            ),
        ),
    ];
    (header, tensors)
}

fn write_sample(dir: &Path) -> PathBuf {
    let path = dir.join("sample.delta");
    let (header, tensors) = sample();
    write_delta(&path, &header, tensors, false).unwrap();
    path
}

/// Writes a container with arbitrary metadata JSON, bypassing `write_delta`'s checks.
fn write_raw(path: &Path, header_json: Option<String>, tensors: &[(String, OwnedTensor)]) {
    let views = tensors.iter().map(|(n, t)| {
        (
            n.clone(),
            TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap(),
        )
    });
    let metadata = header_json.map(|j| HashMap::from([(METADATA_KEY.to_string(), j)]));
    safetensors::serialize_to_file(views, metadata, path).unwrap();
}

fn sample_json() -> serde_json::Value {
    serde_json::from_str(&sample().0.to_json()).unwrap()
}

#[test]
fn write_then_read_round_trips_header_and_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_sample(dir.path());
    let (header, tensors) = sample();

    let file = DeltaFile::open(&path).unwrap();
    assert_eq!(file.header(), &header);
    assert_eq!(file.file_size(), std::fs::metadata(&path).unwrap().len());
    for (name, t) in &tensors {
        let (bytes, dtype, shape) = file.tensor_bytes(name).unwrap();
        assert_eq!(
            (bytes, dtype, shape),
            (t.data.as_slice(), t.dtype, t.shape.as_slice())
        );
    }

    let w = file.entry("w").unwrap();
    assert_eq!(file.scale(w).unwrap(), 0.125);
    let signs = unpack_signs(&file.sign_words(w).unwrap(), ROWS, COLS);
    let expected: Vec<f32> = delta_values()
        .iter()
        .map(|&v| if v >= 0.0 { 1.0 } else { -1.0 })
        .collect();
    assert_eq!(signs, expected);

    let norm = file.entry("norm").unwrap();
    let err = file.scale(norm).unwrap_err();
    assert!(matches!(err, FormatError::WrongEntryKind { .. }), "{err}");
    assert!(matches!(
        file.entry("nope").unwrap_err(),
        FormatError::NoSuchEntry { .. }
    ));
    assert!(matches!(
        file.tensor_bytes("nope").unwrap_err(),
        FormatError::NoSuchTensor { .. }
    ));
}

#[test]
fn summary_from_file_matches_summary_from_header() {
    let dir = tempfile::tempdir().unwrap();
    let file = DeltaFile::open(write_sample(dir.path())).unwrap();
    let summary = file.summary();
    assert_eq!(summary, file.header().summary());
    // 4 rows x 3 words x 4 bytes of signs + a 4-byte scale, over 280 parameters.
    assert_eq!(summary.compressed_bytes, 52);
    assert_eq!(summary.compressed_params, (ROWS * COLS) as u64);
    assert_eq!(summary.full_bytes, (COLS * 2) as u64);
    assert!((summary.bits_per_param() - 52.0 * 8.0 / 280.0).abs() < 1e-12);
}

#[test]
fn written_file_is_plain_safetensors_with_aligned_data() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(write_sample(dir.path())).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), 3);
    let (n, metadata) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(n % 8, 0);
    assert!(metadata
        .metadata()
        .as_ref()
        .unwrap()
        .contains_key("deltaserve"));
    for name in st.names() {
        let info = metadata.info(name).unwrap();
        let align = info.dtype.bitsize() / 8;
        assert_eq!(info.data_offsets.0 % align, 0, "{name} misaligned");
    }
}

#[test]
fn open_rejects_unknown_major_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.delta");
    let mut json = sample_json();
    json["format_version"] = "2.0".into();
    write_raw(&path, Some(json.to_string()), &sample().1);
    let err = DeltaFile::open(&path).unwrap_err();
    assert!(
        matches!(err, FormatError::NewerMajorVersion { found: 2, .. }),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "delta {}: format major version 2 is newer than this deltaserve supports (1); upgrade deltaserve",
            path.display()
        )
    );
}

#[test]
fn open_accepts_newer_minor_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.delta");
    let mut json = sample_json();
    json["format_version"] = "1.9".into();
    json["added_in_1_9"] = serde_json::json!([1, 2, 3]);
    write_raw(&path, Some(json.to_string()), &sample().1);
    let file = DeltaFile::open(&path).unwrap();
    assert_eq!(file.header().format_version, "1.9");
}

#[test]
fn open_rejects_every_truncation() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(write_sample(dir.path())).unwrap();
    let path = dir.path().join("cut.delta");
    for len in 0..bytes.len() {
        std::fs::write(&path, &bytes[..len]).unwrap();
        let err = DeltaFile::open(&path).unwrap_err();
        assert!(
            matches!(err, FormatError::NotSafetensors { .. }),
            "cut at {len}: {err}"
        );
    }
    let err = DeltaFile::open(&path).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!(
            "delta {} is truncated or not a safetensors file: ",
            path.display()
        )),
        "{err}"
    );
}

#[test]
fn open_rejects_random_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("garbage.delta");
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let garbage: Vec<u8> = (0..4096)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    std::fs::write(&path, &garbage).unwrap();
    let err = DeltaFile::open(&path).unwrap_err();
    assert!(matches!(err, FormatError::NotSafetensors { .. }), "{err}");
}

#[test]
fn open_rejects_missing_file_with_its_path() {
    let err = DeltaFile::open("/nonexistent/dir/x.delta").unwrap_err();
    assert!(matches!(err, FormatError::Io { .. }), "{err}");
    assert!(
        err.to_string().contains("/nonexistent/dir/x.delta"),
        "{err}"
    );
}

#[test]
fn open_rejects_plain_safetensors_without_header() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    write_raw(&path, None, &sample().1);
    let err = DeltaFile::open(&path).unwrap_err();
    assert!(matches!(err, FormatError::NotADelta { .. }), "{err}");
}

#[test]
fn open_rejects_missing_tensor_named_by_an_entry() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.delta");
    let tensors: Vec<_> = sample()
        .1
        .into_iter()
        .filter(|(n, _)| n != "w.scale")
        .collect();
    write_raw(&path, Some(sample().0.to_json()), &tensors);
    let err = DeltaFile::open(&path).unwrap_err();
    assert!(matches!(err, FormatError::MissingTensor { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "delta {}: entry \"w\" names tensor \"w.scale\", which is not in the file",
            path.display()
        )
    );
}

#[test]
fn open_rejects_wrong_signs_shape() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.delta");
    let mut tensors = sample().1;
    tensors[0].1 = OwnedTensor::from_u32(vec![ROWS, 2], &[0; ROWS * 2]);
    write_raw(&path, Some(sample().0.to_json()), &tensors);
    let err = DeltaFile::open(&path).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "delta {}: tensor \"w.signs\" has shape [4, 2], expected [4, 3] for a [4, 70] matrix",
            path.display()
        )
    );
}

#[test]
fn open_rejects_wrong_dtypes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.delta");
    let mut tensors = sample().1;
    tensors[1].1 = OwnedTensor::new(Dtype::BF16, vec![1], vec![0, 0]);
    write_raw(&path, Some(sample().0.to_json()), &tensors);
    let err = DeltaFile::open(&path).unwrap_err();
    assert!(matches!(err, FormatError::WrongDtype { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("\"w.scale\" has dtype BF16, expected F32"),
        "{err}"
    );

    let mut tensors = sample().1;
    tensors[2].1 = OwnedTensor::new(Dtype::F16, vec![COLS], vec![0; COLS * 2]);
    write_raw(&path, Some(sample().0.to_json()), &tensors);
    let err = DeltaFile::open(&path).unwrap_err();
    assert!(matches!(err, FormatError::WrongDtype { .. }), "{err}");
}

#[test]
fn open_rejects_unknown_tensor_kind_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.delta");
    let mut json = sample_json();
    json["tensors"]["w"]["kind"] = "lowrank".into();
    write_raw(&path, Some(json.to_string()), &sample().1);
    let err = DeltaFile::open(&path).unwrap_err();
    assert!(
        matches!(err, FormatError::UnknownTensorKind { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("kind \"lowrank\""), "{err}");
}

#[test]
fn sign_words_rejects_padding_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.delta");
    let mut tensors = sample().1;
    let mut words = pack_signs(&delta_values(), ROWS, COLS);
    words[2] |= 1 << 31; // row 0, last word, column 95 >= 70
    tensors[0].1 = OwnedTensor::from_u32(vec![ROWS, 3], &words);
    // write_delta refuses to write it...
    let (header, _) = sample();
    let err = write_delta(&path, &header, tensors.clone(), false).unwrap_err();
    assert!(
        matches!(err, FormatError::PaddingBitsSet { row: 0, .. }),
        "{err}"
    );
    assert!(!path.exists());
    // ...and a reader finds it when another writer did.
    write_raw(&path, Some(header.to_json()), &tensors);
    let file = DeltaFile::open(&path).unwrap();
    let err = file.sign_words(file.entry("w").unwrap()).unwrap_err();
    assert!(
        matches!(err, FormatError::PaddingBitsSet { row: 0, .. }),
        "{err}"
    );
}

#[test]
fn write_delta_checks_tensors_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.delta");
    let (header, tensors) = sample();

    let mut short = tensors.clone();
    short[2].1.data.pop();
    let err = write_delta(&path, &header, short, false).unwrap_err();
    assert!(matches!(err, FormatError::TensorSize { .. }), "{err}");

    let mut twice = tensors.clone();
    twice.push(twice[1].clone());
    let err = write_delta(&path, &header, twice, false).unwrap_err();
    assert!(matches!(err, FormatError::DuplicateTensor { .. }), "{err}");

    let missing: Vec<_> = tensors.iter().skip(1).cloned().collect();
    let err = write_delta(&path, &header, missing, false).unwrap_err();
    assert!(matches!(err, FormatError::MissingTensor { .. }), "{err}");

    assert!(!path.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn write_delta_refuses_to_overwrite_without_flag() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_sample(dir.path());
    let (header, tensors) = sample();
    let err = write_delta(&path, &header, tensors.clone(), false).unwrap_err();
    assert!(matches!(err, FormatError::OutputExists { .. }), "{err}");
    write_delta(&path, &header, tensors, true).unwrap();
}

#[test]
fn check_base_rejects_another_base() {
    let dir = tempfile::tempdir().unwrap();
    let file = DeltaFile::open(write_sample(dir.path())).unwrap();
    file.check_base(&base(), Path::new("/models/base")).unwrap();

    let other = FingerprintBuilder::new();
    other.add_tensor("w", "BF16", &[ROWS, COLS], &[8u8; ROWS * COLS * 2]);
    let other = other.finish();
    let err = file
        .check_base(&other, Path::new("/models/other"))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "delta {} was made for base {} but the model at /models/other has fingerprint {}: \
             use the base it was compressed from",
            file.path().display(),
            &base().hex[..12],
            &other.hex[..12]
        )
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Flipping bytes of a valid delta never panics the reader: it opens or fails cleanly.
    #[test]
    fn open_never_panics_on_corrupted_bytes(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let dir = tempfile::tempdir().unwrap();
        let path = write_sample(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        for (at, x) in flips {
            let i = at % bytes.len();
            bytes[i] ^= x;
        }
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(file) = DeltaFile::open(&path) {
            for (name, entry) in &file.header().tensors {
                let _ = file.entry(name);
                let _ = file.sign_words(entry);
                let _ = file.scale(entry);
            }
            let _ = file.summary();
        }
    }

    /// Any header + sign matrix written is read back identically.
    #[test]
    fn write_read_round_trip_over_shapes(rows in 1usize..6, cols in 1usize..80, scale in -1e3f32..1e3, seed in any::<u64>()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.delta");
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| if (seed >> (i % 64)) & 1 == 1 { 1.0 } else { -1.0 })
            .collect();
        let mut header = DeltaHeader::new("bitdelta", base(), FinetuneInfo::default());
        header.tensors.insert("m".into(), TensorEntry::sign("m", [rows, cols], Dtype::F16));
        let words = pack_signs(&values, rows, cols);
        let tensors = vec![
            ("m.signs".to_string(), OwnedTensor::from_u32(vec![rows, words_per_row(cols)], &words)),
            ("m.scale".to_string(), OwnedTensor::scale(scale)),
        ];
        write_delta(&path, &header, tensors, false).unwrap();
        let file = DeltaFile::open(&path).unwrap();
        prop_assert_eq!(file.header(), &header);
        let entry = file.entry("m").unwrap();
        prop_assert_eq!(file.sign_words(entry).unwrap(), words);
        prop_assert_eq!(file.scale(entry).unwrap(), scale);
    }
}
