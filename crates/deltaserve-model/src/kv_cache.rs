//! Per-sequence key/value cache. The engine owns one per running sequence and passes it into
//! [`crate::Model::forward`], so sequences of different tenants and lengths can share a step.

use candle_core::Tensor;

use crate::error::Result;

/// Keys and values of every layer for one sequence.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per layer: keys and values, each (kv_heads, positions, head_dim).
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Number of positions already processed.
    pos: usize,
}

impl KvCache {
    /// An empty cache for a model with `layers` decoder layers.
    pub fn new(layers: usize) -> Self {
        Self {
            layers: vec![None; layers],
            pos: 0,
        }
    }

    /// Positions already in the cache.
    pub fn len(&self) -> usize {
        self.pos
    }

    /// Whether nothing has been processed yet.
    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }

    /// Appends new keys/values of layer `i` and returns all of them.
    pub(crate) fn append(&mut self, i: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let kv = match &self.layers[i] {
            None => (k.clone(), v.clone()),
            Some((pk, pv)) => (Tensor::cat(&[pk, k], 1)?, Tensor::cat(&[pv, v], 1)?),
        };
        self.layers[i] = Some(kv.clone());
        Ok(kv)
    }

    /// Records that `n` more positions were processed (after all layers ran).
    pub(crate) fn advance(&mut self, n: usize) {
        self.pos += n;
    }

    /// Bytes held, for memory budgets.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }
}
