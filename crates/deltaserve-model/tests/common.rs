//! Reading the reference fixtures that `scripts/reference/make_fixtures.py` wrote with transformers.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};

/// The fixture version these tests understand.
pub const FIXTURE_VERSION: &str = "1";

/// The device tests run on: `DELTASERVE_TEST_DEVICE` (`cpu`, `cuda:0`), default CPU. Asking for
/// CUDA where there is none fails the test; it never passes silently.
pub fn device() -> Device {
    let spec = std::env::var("DELTASERVE_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    deltaserve_model::parse_device(&spec)
        .unwrap_or_else(|e| panic!("DELTASERVE_TEST_DEVICE={spec}: {e}"))
}

pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures_dir().join("models").join(name)
}

/// A reference file: its tensors and its string metadata.
pub struct Reference {
    pub tensors: HashMap<String, Tensor>,
    pub meta: HashMap<String, String>,
}

impl Reference {
    pub fn load(name: &str) -> Reference {
        let path = model_dir(name).join("reference.safetensors");
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, md) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta: HashMap<String, String> = md.metadata().clone().unwrap_or_default();
        let version = meta
            .get("fixture_version")
            .map(String::as_str)
            .unwrap_or("?");
        assert_eq!(
            version,
            FIXTURE_VERSION,
            "{}: fixture version {version}; HINT: re-run scripts/reference/make_fixtures.py",
            path.display()
        );
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
        Reference { tensors, meta }
    }

    pub fn ids(&self, key: &str) -> Vec<Vec<u32>> {
        let t = &self.tensors[key];
        let t = if t.rank() == 1 {
            t.unsqueeze(0).unwrap()
        } else {
            t.clone()
        };
        t.to_dtype(candle_core::DType::I64)
            .unwrap()
            .to_vec2::<i64>()
            .unwrap()
            .into_iter()
            .map(|r| r.into_iter().map(|x| x as u32).collect())
            .collect()
    }
}

/// A tensor's values on the host, flattened.
pub fn host(t: &Tensor) -> Vec<f32> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Max |a-b| over all elements.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (host(a), host(b));
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Max |a| over all elements (the logit scale tolerances are relative to).
pub fn max_abs(a: &Tensor) -> f32 {
    host(a).iter().fold(0.0, |m, x| m.max(x.abs()))
}

/// Root-mean-square of a-b.
pub fn rms_diff(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (host(a), host(b));
    assert_eq!(a.len(), b.len());
    let s: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum();
    (s / a.len() as f64).sqrt() as f32
}
