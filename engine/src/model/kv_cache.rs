//! `KvCache`: the keys and values of every layer for the tokens seen so far, so a decode step
//! forwards only the new token. Layout per layer: `[batch, kv_heads, seq, head_dim]`, f32.

use candle_core::Tensor;

use super::linear::tensor_bytes;
use crate::error::Result;

/// Per-layer key/value tensors of one sequence (or a batch of equally long sequences).
///
/// Invariant: every present layer holds exactly `len` positions; `len` only changes in
/// [`KvCache::commit`], after every layer of a forward has appended.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// An empty cache for a model of `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: vec![None; num_layers],
            len: 0,
        }
    }

    /// A cache from saved per-layer tensors (`[1, kv_heads, len, head_dim]` each).
    pub fn from_layers(layers: Vec<(Tensor, Tensor)>) -> Result<Self> {
        let len = match layers.first() {
            Some((k, _)) => k.dim(2)?,
            None => 0,
        };
        for (k, v) in &layers {
            debug_assert_eq!(k.dim(2)?, len);
            debug_assert_eq!(v.dim(2)?, len);
        }
        Ok(KvCache {
            layers: layers.into_iter().map(Some).collect(),
            len,
        })
    }

    /// Positions held (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Append this step's keys/values `[b, kvh, t, hd]` to layer `i`; returns the whole
    /// sequence's keys/values for attention.
    pub fn append(&mut self, i: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match &self.layers[i] {
            None => (k.contiguous()?, v.contiguous()?),
            Some((pk, pv)) => (Tensor::cat(&[pk, k], 2)?, Tensor::cat(&[pv, v], 2)?),
        };
        self.layers[i] = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    /// Record that a forward of `t` new positions appended to every layer.
    pub fn commit(&mut self, t: usize) {
        self.len += t;
        debug_assert!(self
            .layers
            .iter()
            .flatten()
            .all(|(k, _)| k.dim(2).ok() == Some(self.len)));
    }

    /// Layer `i`'s keys and values, if any.
    pub fn layer(&self, i: usize) -> Option<&(Tensor, Tensor)> {
        self.layers[i].as_ref()
    }

    /// Drop everything.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.len = 0;
    }

    /// Bytes of cached keys and values.
    pub fn bytes(&self) -> u64 {
        self.layers
            .iter()
            .flatten()
            .map(|(k, v)| tensor_bytes(k) + tensor_bytes(v))
            .sum()
    }
}
