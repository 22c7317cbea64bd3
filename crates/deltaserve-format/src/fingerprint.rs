//! The base fingerprint: which base model a delta was made against.
//!
//! A delta is useless (silently wrong) on any other base, so every delta records a BLAKE3
//! fingerprint of its base checkpoint and loaders compare it before serving.
//!
//! Algorithm `blake3-v1` (`u64le(x)` is x as 8 little-endian bytes; strings are UTF-8):
//!
//! ```text
//! tensor_digest = BLAKE3( u64le(len(name)) || name
//!                      || u64le(len(dtype)) || dtype          // safetensors name, "BF16"
//!                      || u64le(ndim) || u64le(dim_0) || ... || u64le(dim_{ndim-1})
//!                      || u64le(len(data)) || data )          // raw little-endian bytes
//! fingerprint   = BLAKE3( u64le(n_tensors)
//!                      || for each tensor, sorted by name bytes (ties by digest):
//!                             u64le(len(name)) || name || tensor_digest )
//! ```
//!
//! The result depends on the tensors only, not on the files: a sharded checkpoint and the same
//! weights in one file have the same fingerprint. Each tensor is hashed on its own, so a
//! compressor can hash base tensors in any order, on any thread, while it streams through them.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{FormatError, Result};

/// The name of the fingerprint algorithm implemented here.
pub const FINGERPRINT_ALGORITHM: &str = "blake3-v1";

/// Tensors larger than this are hashed with BLAKE3's own rayon parallelism (same digest).
const PARALLEL_HASH_MIN_BYTES: usize = 1 << 20;

/// The fingerprint of a base checkpoint, as recorded in a delta's header.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BaseFingerprint {
    /// The algorithm, [`FINGERPRINT_ALGORITHM`] (`"blake3-v1"`).
    pub algorithm: String,
    /// The 32-byte fingerprint as 64 lowercase hex digits.
    pub hex: String,
    /// How many tensors were hashed.
    pub tensors: usize,
}

impl BaseFingerprint {
    /// The first 12 hex digits, for messages and listings.
    pub fn short(&self) -> &str {
        self.hex.get(..12).unwrap_or(&self.hex)
    }
}

/// The digest of one named tensor; the unit that [`FingerprintBuilder`] combines.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TensorHash {
    name: String,
    digest: [u8; 32],
}

impl TensorHash {
    /// Hashes one tensor: its name, safetensors dtype name (`"BF16"`), shape and raw
    /// little-endian bytes, each length-prefixed (see the [module docs](self)).
    pub fn compute(name: &str, dtype: &str, shape: &[usize], bytes: &[u8]) -> TensorHash {
        let mut hasher = blake3::Hasher::new();
        update_framed(&mut hasher, name.as_bytes());
        update_framed(&mut hasher, dtype.as_bytes());
        hasher.update(&u64le(shape.len()));
        for &dim in shape {
            hasher.update(&u64le(dim));
        }
        hasher.update(&u64le(bytes.len()));
        if bytes.len() >= PARALLEL_HASH_MIN_BYTES {
            hasher.update_rayon(bytes);
        } else {
            hasher.update(bytes);
        }
        TensorHash {
            name: name.to_owned(),
            digest: *hasher.finalize().as_bytes(),
        }
    }

    /// The tensor's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tensor's 32-byte digest.
    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }
}

/// Collects [`TensorHash`]es in any order, from any thread, and combines them.
///
/// ```
/// use deltaserve_format::{FingerprintBuilder, TensorHash};
/// use rayon::prelude::*;
///
/// let builder = FingerprintBuilder::new();
/// (0..4).into_par_iter().for_each(|i| {
///     let bytes = [i as u8; 8];
///     builder.insert(TensorHash::compute(&format!("t{i}"), "U8", &[8], &bytes));
/// });
/// let fingerprint = builder.finish();
/// assert_eq!(fingerprint.tensors, 4);
/// assert_eq!(fingerprint.hex.len(), 64);
/// ```
#[derive(Debug, Default)]
pub struct FingerprintBuilder {
    hashes: Mutex<Vec<TensorHash>>,
}

impl FingerprintBuilder {
    /// An empty builder.
    pub fn new() -> FingerprintBuilder {
        FingerprintBuilder::default()
    }

    /// Hashes a tensor and adds it; callable from many threads at once.
    pub fn add_tensor(&self, name: &str, dtype: &str, shape: &[usize], bytes: &[u8]) {
        self.insert(TensorHash::compute(name, dtype, shape, bytes));
    }

    /// Adds a tensor hashed elsewhere; callable from many threads at once.
    pub fn insert(&self, hash: TensorHash) {
        // A panic elsewhere while holding the lock leaves the Vec intact, so poison is harmless.
        let mut hashes = self.hashes.lock().unwrap_or_else(|p| p.into_inner());
        hashes.push(hash);
    }

    /// Combines the tensors added so far into the fingerprint; order of insertion does not matter.
    pub fn finish(self) -> BaseFingerprint {
        let mut hashes = self.hashes.into_inner().unwrap_or_else(|p| p.into_inner());
        hashes.sort_by(|a, b| {
            a.name
                .as_bytes()
                .cmp(b.name.as_bytes())
                .then(a.digest.cmp(&b.digest))
        });
        let mut hasher = blake3::Hasher::new();
        hasher.update(&u64le(hashes.len()));
        for hash in &hashes {
            update_framed(&mut hasher, hash.name.as_bytes());
            hasher.update(&hash.digest);
        }
        BaseFingerprint {
            algorithm: FINGERPRINT_ALGORITHM.to_owned(),
            hex: hasher.finalize().to_hex().to_string(),
            tensors: hashes.len(),
        }
    }
}

/// Fingerprints a checkpoint stored in one or more safetensors files (shards), memory-mapping
/// each file and hashing its tensors in parallel.
pub fn fingerprint_safetensors<P: AsRef<Path> + Sync>(files: &[P]) -> Result<BaseFingerprint> {
    let builder = FingerprintBuilder::new();
    let mut seen: std::collections::HashMap<String, PathBuf> = std::collections::HashMap::new();
    for file in files {
        let path = file.as_ref();
        let mmap = crate::read::map_file(path)?;
        let tensors = safetensors::SafeTensors::deserialize(&mmap).map_err(|e| {
            FormatError::BadCheckpoint {
                path: path.to_owned(),
                detail: e.to_string(),
            }
        })?;
        for name in tensors.names() {
            if let Some(first) = seen.insert(name.to_owned(), path.to_owned()) {
                return Err(FormatError::DuplicateCheckpointTensor {
                    name: name.to_owned(),
                    first,
                    second: path.to_owned(),
                });
            }
        }
        tensors.tensors().par_iter().for_each(|(name, view)| {
            builder.add_tensor(name, &view.dtype().to_string(), view.shape(), view.data());
        });
    }
    Ok(builder.finish())
}

/// Hashes one tensor incrementally, for callers that stream through its bytes in pieces (a
/// compressor that hashes each block of a base tensor while it is in cache). Gives the same
/// digest as [`TensorHash::compute`] over the concatenated pieces.
///
/// ```
/// use deltaserve_format::{TensorHash, TensorHasher};
///
/// let bytes = [7u8; 10];
/// let mut hasher = TensorHasher::new("w", "U8", &[10], bytes.len());
/// hasher.update(&bytes[..3]);
/// hasher.update(&bytes[3..]);
/// assert_eq!(hasher.finish(), TensorHash::compute("w", "U8", &[10], &bytes));
/// ```
#[derive(Debug, Clone)]
pub struct TensorHasher {
    name: String,
    hasher: blake3::Hasher,
    declared: usize,
    seen: usize,
}

impl TensorHasher {
    /// Starts a tensor of `len` bytes (the framing hashes the length first).
    pub fn new(name: &str, dtype: &str, shape: &[usize], len: usize) -> TensorHasher {
        let mut hasher = blake3::Hasher::new();
        update_framed(&mut hasher, name.as_bytes());
        update_framed(&mut hasher, dtype.as_bytes());
        hasher.update(&u64le(shape.len()));
        for &dim in shape {
            hasher.update(&u64le(dim));
        }
        hasher.update(&u64le(len));
        TensorHasher {
            name: name.to_owned(),
            hasher,
            declared: len,
            seen: 0,
        }
    }

    /// Hashes the next piece of the tensor's bytes (on the calling thread).
    pub fn update(&mut self, bytes: &[u8]) {
        self.seen += bytes.len();
        self.hasher.update(bytes);
    }

    /// The tensor's hash.
    ///
    /// # Panics
    /// If the pieces did not add up to the length given to [`TensorHasher::new`]: a caller bug
    /// that would otherwise give a fingerprint no reader can reproduce.
    pub fn finish(self) -> TensorHash {
        assert_eq!(
            self.seen, self.declared,
            "TensorHasher for {}: {} bytes hashed, {} declared",
            self.name, self.seen, self.declared
        );
        TensorHash {
            name: self.name,
            digest: *self.hasher.finalize().as_bytes(),
        }
    }
}

fn u64le(x: usize) -> [u8; 8] {
    (x as u64).to_le_bytes()
}

fn update_framed(hasher: &mut blake3::Hasher, bytes: &[u8]) {
    hasher.update(&u64le(bytes.len()));
    hasher.update(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors() -> Vec<(String, &'static str, Vec<usize>, Vec<u8>)> {
        vec![
            (
                "model.embed_tokens.weight".into(),
                "BF16",
                vec![4, 2],
                (0..16).collect(),
            ),
            (
                "model.norm.weight".into(),
                "F32",
                vec![3],
                (100..112).collect(),
            ),
            (
                "lm_head.weight".into(),
                "BF16",
                vec![2, 4],
                (50..66).collect(),
            ),
        ]
    }

    fn fingerprint(ts: &[(String, &str, Vec<usize>, Vec<u8>)]) -> BaseFingerprint {
        let b = FingerprintBuilder::new();
        for (n, d, s, bytes) in ts {
            b.add_tensor(n, d, s, bytes);
        }
        b.finish()
    }

    #[test]
    fn fingerprint_is_independent_of_insertion_order() {
        let ts = tensors();
        let mut reversed = ts.clone();
        reversed.reverse();
        assert_eq!(fingerprint(&ts), fingerprint(&reversed));
    }

    #[test]
    fn one_changed_byte_changes_fingerprint() {
        let ts = tensors();
        let mut changed = ts.clone();
        changed[1].3[5] ^= 1;
        assert_ne!(fingerprint(&ts).hex, fingerprint(&changed).hex);
    }

    #[test]
    fn one_changed_name_changes_fingerprint() {
        let ts = tensors();
        let mut changed = ts.clone();
        changed[0].0 = "model.embed_tokens.weighT".into();
        assert_ne!(fingerprint(&ts).hex, fingerprint(&changed).hex);
    }

    #[test]
    fn dtype_and_shape_are_hashed() {
        let ts = tensors();
        let mut dtype = ts.clone();
        dtype[0].1 = "F16";
        let mut shape = ts.clone();
        shape[0].2 = vec![2, 4];
        let base = fingerprint(&ts).hex;
        assert_ne!(base, fingerprint(&dtype).hex);
        assert_ne!(base, fingerprint(&shape).hex);
    }

    #[test]
    fn incremental_hash_matches_one_shot_on_large_tensors() {
        let bytes: Vec<u8> = (0..2 * PARALLEL_HASH_MIN_BYTES + 13)
            .map(|i| (i % 253) as u8)
            .collect();
        let mut hasher = TensorHasher::new("big", "BF16", &[bytes.len() / 2], bytes.len());
        for piece in bytes.chunks(65_537) {
            hasher.update(piece);
        }
        let one_shot = TensorHash::compute("big", "BF16", &[bytes.len() / 2], &bytes);
        assert_eq!(hasher.finish(), one_shot);
    }

    #[test]
    fn framing_keeps_name_and_bytes_apart() {
        // Without length prefixes, ("ab", [c]) and ("a", [b, c]) would hash the same stream.
        let a = TensorHash::compute("ab", "U8", &[1], b"c");
        let b = TensorHash::compute("a", "U8", &[2], b"bc");
        assert_ne!(a.digest(), b.digest());
    }

    #[test]
    fn large_tensor_parallel_hash_matches_serial() {
        let bytes: Vec<u8> = (0..3 * PARALLEL_HASH_MIN_BYTES)
            .map(|i| (i % 251) as u8)
            .collect();
        let hash = TensorHash::compute("big", "U8", &[bytes.len()], &bytes);
        let mut serial = blake3::Hasher::new();
        update_framed(&mut serial, b"big");
        update_framed(&mut serial, b"U8");
        serial.update(&u64le(1));
        serial.update(&u64le(bytes.len()));
        serial.update(&u64le(bytes.len()));
        serial.update(&bytes);
        assert_eq!(hash.digest(), serial.finalize().as_bytes());
    }

    #[test]
    fn sharded_checkpoint_fingerprints_like_one_file() {
        use safetensors::tensor::TensorView;
        use safetensors::Dtype;
        let dir = tempfile::tempdir().unwrap();
        let ts = tensors();
        fn view<'a>(t: &'a (String, &str, Vec<usize>, Vec<u8>)) -> (String, TensorView<'a>) {
            let dtype = if t.1 == "BF16" {
                Dtype::BF16
            } else {
                Dtype::F32
            };
            (
                t.0.clone(),
                TensorView::new(dtype, t.2.clone(), &t.3).unwrap(),
            )
        }
        let one = dir.path().join("model.safetensors");
        safetensors::serialize_to_file(ts.iter().map(view), None, &one).unwrap();
        let shard1 = dir.path().join("model-00001-of-00002.safetensors");
        let shard2 = dir.path().join("model-00002-of-00002.safetensors");
        safetensors::serialize_to_file(ts[..1].iter().map(view), None, &shard1).unwrap();
        safetensors::serialize_to_file(ts[1..].iter().map(view), None, &shard2).unwrap();

        let whole = fingerprint_safetensors(&[&one]).unwrap();
        assert_eq!(whole, fingerprint(&ts));
        assert_eq!(fingerprint_safetensors(&[&shard2, &shard1]).unwrap(), whole);

        let err = fingerprint_safetensors(&[&one, &shard1]).unwrap_err();
        assert!(
            matches!(err, FormatError::DuplicateCheckpointTensor { .. }),
            "{err}"
        );
    }
}
