//! The key/value cache of fast decoding and the model's cached forward.
//!
//! Semantics of NVlabs/Fast-dLLM `llada/generate.py` (`generate_with_prefix_cache`,
//! `generate_with_dual_cache`) and its `llada/model/modeling_llada.py` (`past_key_values`,
//! `replace_position`): a **refresh** runs the whole canvas through the network, exactly as the
//! uncached forward, and keeps the keys and values of every layer at every position
//! ([`LladaModel::hidden_caching`]); a **cached step** runs only a range of query positions
//! ([`LladaModel::hidden_cached`]) whose keys and values are recomputed and spliced into the
//! cached ones, so the queries attend to the whole canvas while the other positions cost
//! nothing. LLaDA attends bidirectionally, so a cached key is stale once its position's
//! inputs changed (a token unmasked elsewhere): the cache is an approximation that the sampler
//! refreshes at every block start and optionally every few steps; refreshing at every step is
//! the uncached computation bit for bit.
//!
//! * Prefix cache: queries = the current block and everything after it (`[block_start, seq)`);
//!   the prefix (prompt and decoded blocks) comes from the cache.
//! * Dual cache: queries = the current block only; the prefix **and** the masked suffix come
//!   from the cache.
//! * Vicinity refresh (dInfer): the query range widened by a few positions around the block.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use crate::model::{Attention, LladaModel, rope_tables};

/// A cache that does not fit the call it is used with. These are faults of the caller (the
/// sampler passes the canvas it refreshed the cache on); the message names the mismatch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvCacheError {
    /// The cache was filled for another batch size or canvas length than the call's ids.
    #[error(
        "KV cache holds [batch {cache_batch}, seq {cache_seq}] but the ids are [{batch}, {seq}]; \
         refresh the cache on this canvas"
    )]
    Shape {
        /// Rows of the cache.
        cache_batch: usize,
        /// Positions of the cache.
        cache_seq: usize,
        /// Rows of the ids.
        batch: usize,
        /// Positions of the ids.
        seq: usize,
    },
    /// The cache has another number of layers than the model.
    #[error("KV cache has {cache} layers, the model {model}; it was filled by another model")]
    Layers {
        /// Layers in the cache.
        cache: usize,
        /// Blocks of the model.
        model: usize,
    },
    /// The query range is empty or runs past the canvas.
    #[error("query range {start}..{start}+{len} is empty or outside the canvas of {seq} positions")]
    QueryRange {
        /// First query position.
        start: usize,
        /// Number of query positions.
        len: usize,
        /// Canvas length.
        seq: usize,
    },
    /// The logits window is not inside the query range (only queries get hidden states).
    #[error(
        "logits window {}..{} is not inside the query range {}..{}",
        window.0, window.0 + window.1, query.0, query.0 + query.1
    )]
    WindowOutsideQueries {
        /// `(start, len)` of the window.
        window: (usize, usize),
        /// `(start, len)` of the queries.
        query: (usize, usize),
    },
}

/// Keys and values of every layer at every canvas position, filled by a refresh
/// ([`LladaModel::hidden_caching`]).
///
/// Per layer `(k, v)`, each `[batch, n_kv_heads, seq, head_dim]`: the keys after RoPE, before
/// the grouped-query repeat, in the dtype the projections ran in (the compute dtype under
/// mixed precision). The RoPE tables of the canvas (`[seq, head_dim]` f32) are kept with them.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<(Tensor<B, 4>, Tensor<B, 4>)>,
    rope: (Tensor<B, 2>, Tensor<B, 2>),
    batch: usize,
    seq: usize,
}

impl<B: Backend> KvCache<B> {
    /// Rows (batch size, `2B` under classifier-free guidance).
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Canvas positions covered.
    pub fn seq_len(&self) -> usize {
        self.seq
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Bytes held by the keys and values (elements × element size).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|(k, v)| {
                k.shape().num_elements() * k.dtype().size()
                    + v.shape().num_elements() * v.dtype().size()
            })
            .sum()
    }
}

/// What one block does with the keys and values of its positions (after RoPE).
pub(crate) enum KvUse<'a, B: Backend> {
    /// Attend to them only (the uncached forward).
    Keep,
    /// Attend to them and push a copy (a cache refresh).
    Store(&'a mut Vec<(Tensor<B, 4>, Tensor<B, 4>)>),
    /// The block's positions are the queries `start .. start + q` of the canvas: their keys and
    /// values replace the cached ones there, and the queries attend to the whole canvas.
    Splice {
        /// Cached keys `[batch, n_kv_heads, seq, head_dim]`.
        k: &'a Tensor<B, 4>,
        /// Cached values, same shape.
        v: &'a Tensor<B, 4>,
        /// First query position.
        start: usize,
    },
}

impl<B: Backend> KvUse<'_, B> {
    /// `k`, `v`: `[batch, n_kv_heads, q, head_dim]` → the keys and values to attend to.
    pub(crate) fn apply(self, k: Tensor<B, 4>, v: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        match self {
            KvUse::Keep => (k, v),
            KvUse::Store(out) => {
                out.push((k.clone(), v.clone()));
                (k, v)
            }
            KvUse::Splice {
                k: ck,
                v: cv,
                start,
            } => (splice(ck, k, start), splice(cv, v, start)),
        }
    }
}

/// `cached[.., 0..start] ++ fresh ++ cached[.., start + q..]` along the position axis (2).
fn splice<B: Backend>(cached: &Tensor<B, 4>, fresh: Tensor<B, 4>, start: usize) -> Tensor<B, 4> {
    let seq = cached.dims()[2];
    let q = fresh.dims()[2];
    if q == seq {
        return fresh;
    }
    let mut parts = Vec::with_capacity(3);
    if start > 0 {
        parts.push(cached.clone().narrow(2, 0, start));
    }
    parts.push(fresh);
    if start + q < seq {
        parts.push(cached.clone().narrow(2, start + q, seq - start - q));
    }
    Tensor::cat(parts, 2)
}

impl<B: Backend> LladaModel<B> {
    /// [`LladaModel::hidden`] (`[batch, seq, d_model]`, the same ops, so the same bits) and the
    /// [`KvCache`] of the canvas: a cache refresh.
    pub fn hidden_caching(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention: &Attention<B>,
    ) -> (Tensor<B, 3>, KvCache<B>) {
        let [b, l] = input_ids.dims();
        let device = input_ids.device();
        let x = self.wte.forward(input_ids);
        let hd = self.head_dim();
        let rope = rope_tables::<B>(l, hd, self.rope_theta, &device);
        let bias = attention.bias(l);
        let compute = self.effective_compute_dtype();
        let mut layers = Vec::with_capacity(self.blocks.len());
        let mut x = x;
        for block in &self.blocks {
            x = block.forward_kv(x, &rope, bias.as_ref(), compute, KvUse::Store(&mut layers));
        }
        let cache = KvCache {
            layers,
            rope,
            batch: b,
            seq: l,
        };
        (self.ln_f.forward(x), cache)
    }

    /// Final hidden states `[batch, len, d_model]` of the query positions `start .. start + len`
    /// only. `input_ids`: the whole canvas `[batch, seq]` (only the query columns are read);
    /// `attention`: the canvas's mask, as for [`LladaModel::hidden`]. The queries' keys and
    /// values are recomputed; every other position's come from `cache` (see the module
    /// documentation). When the cached positions are unchanged since the refresh and the
    /// query range is the whole canvas the result is that of `hidden`.
    ///
    /// # Errors
    /// [`KvCacheError`] when `cache` was filled for another batch, canvas length or model, or
    /// the query range is empty or outside the canvas.
    pub fn hidden_cached(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention: &Attention<B>,
        cache: &KvCache<B>,
        start: usize,
        len: usize,
    ) -> Result<Tensor<B, 3>, KvCacheError> {
        let [b, l] = input_ids.dims();
        if b != cache.batch || l != cache.seq {
            return Err(KvCacheError::Shape {
                cache_batch: cache.batch,
                cache_seq: cache.seq,
                batch: b,
                seq: l,
            });
        }
        if cache.layers.len() != self.blocks.len() {
            return Err(KvCacheError::Layers {
                cache: cache.layers.len(),
                model: self.blocks.len(),
            });
        }
        if len == 0 || start + len > l {
            return Err(KvCacheError::QueryRange { start, len, seq: l });
        }
        let x = self.wte.forward(input_ids.narrow(1, start, len));
        let rope = (
            cache.rope.0.clone().narrow(0, start, len),
            cache.rope.1.clone().narrow(0, start, len),
        );
        // [batch, 1, 1 | seq, seq] → the query rows only
        let bias = attention.bias(l).map(|t| {
            if t.dims()[2] == l && len != l {
                t.narrow(2, start, len)
            } else {
                t
            }
        });
        let compute = self.effective_compute_dtype();
        let mut x = x;
        for (block, (k, v)) in self.blocks.iter().zip(&cache.layers) {
            let kv = KvUse::Splice { k, v, start };
            x = block.forward_kv(x, &rope, bias.as_ref(), compute, kv);
        }
        Ok(self.ln_f.forward(x))
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Int, Tensor, TensorData};

    use super::*;
    use crate::backend::Cpu;
    use crate::config::ModelConfig;
    use crate::{Denoiser, FloatDType};

    fn model(n_kv_heads: Option<usize>) -> LladaModel<Cpu> {
        let mut cfg = ModelConfig::tiny();
        if let Some(k) = n_kv_heads {
            cfg.n_kv_heads = k;
        }
        crate::init::init_model::<Cpu>(&cfg, 7, &Default::default(), FloatDType::F32)
    }

    fn ids(b: usize, l: usize, salt: usize) -> Tensor<Cpu, 2, Int> {
        let v: Vec<i64> = (0..b * l).map(|i| ((i * 31 + salt) % 290) as i64).collect();
        Tensor::from_data(TensorData::new(v, [b, l]), &Default::default())
    }

    fn floats(t: Tensor<Cpu, 3>) -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec().unwrap()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// A refresh is the uncached forward bit for bit; the cache has one entry per layer.
    #[test]
    fn refresh_equals_the_uncached_forward_exactly() {
        let m = model(None);
        let x = ids(2, 12, 5);
        let keep = vec![
            false, false, true, true, true, true, true, true, true, true, true, true,
        ];
        let mut mask = keep.clone();
        mask.extend(vec![true; 12]);
        let att = Attention::KeyPadding(Tensor::from_data(
            TensorData::new(mask, [2, 12]),
            &Default::default(),
        ));
        let (h, cache) = m.hidden_caching(x.clone(), &att);
        assert_eq!(floats(h), floats(m.hidden(x.clone(), &att)));
        assert_eq!(
            (cache.batch(), cache.seq_len(), cache.num_layers()),
            (2, 12, m.blocks.len())
        );
        let (w, c) = m.window_logits_caching(x.clone(), &att, 4, 5);
        assert!(c.is_some());
        assert_eq!(floats(w), floats(m.window_logits(x, &att, 4, 5)));
    }

    /// With the cache filled on the same canvas, any query range gives the hidden states of the
    /// uncached forward at those positions (up to summation order of the attention), for full
    /// heads and grouped-query heads, with key padding.
    #[test]
    fn cached_queries_on_an_unchanged_canvas_match_the_full_forward() {
        for kv in [None, Some(2)] {
            let m = model(kv);
            let x = ids(3, 14, 11);
            let mut mask = vec![true; 42];
            mask[0] = false;
            mask[14] = false;
            mask[15] = false;
            let att = Attention::KeyPadding(Tensor::from_data(
                TensorData::new(mask, [3, 14]),
                &Default::default(),
            ));
            let full = m.hidden(x.clone(), &att);
            let (_, cache) = m.hidden_caching(x.clone(), &att);
            for (s, n) in [(0, 14), (4, 10), (4, 3), (13, 1), (0, 1)] {
                let h = m.hidden_cached(x.clone(), &att, &cache, s, n).unwrap();
                let want = floats(full.clone().narrow(1, s, n));
                let d = max_diff(&floats(h), &want);
                assert!(d < 1e-5, "kv {kv:?} range {s}+{n}: max diff {d}");
            }
        }
    }

    /// Cached queries see the cached (stale) keys of the other positions, not the new ids
    /// there: changing an id outside the query range changes nothing, inside it does.
    #[test]
    fn positions_outside_the_queries_come_from_the_cache() {
        let m = model(None);
        let x = ids(1, 10, 3);
        let (_, cache) = m.hidden_caching(x.clone(), &Attention::Full);
        let base = floats(
            m.hidden_cached(x.clone(), &Attention::Full, &cache, 6, 4)
                .unwrap(),
        );
        let mut changed: Vec<i64> = x.clone().into_data().convert::<i64>().to_vec().unwrap();
        changed[1] = 250; // outside the queries: read from the cache
        let c = Tensor::<Cpu, 2, Int>::from_data(
            TensorData::new(changed, [1, 10]),
            &Default::default(),
        );
        let same = floats(
            m.hidden_cached(c.clone(), &Attention::Full, &cache, 6, 4)
                .unwrap(),
        );
        assert_eq!(same, base);
        // ... while the uncached forward sees it
        let fresh = floats(m.hidden(c, &Attention::Full).narrow(1, 6, 4));
        assert!(max_diff(&fresh, &base) > 1e-4);
    }

    #[test]
    fn a_cache_of_another_canvas_is_a_typed_error() {
        let m = model(None);
        let (_, cache) = m.hidden_caching(ids(2, 8, 0), &Attention::Full);
        let e = m
            .hidden_cached(ids(2, 9, 0), &Attention::Full, &cache, 0, 4)
            .unwrap_err();
        assert!(
            matches!(
                e,
                KvCacheError::Shape {
                    cache_seq: 8,
                    seq: 9,
                    ..
                }
            ),
            "{e}"
        );
        let e = m
            .hidden_cached(ids(2, 8, 0), &Attention::Full, &cache, 6, 4)
            .unwrap_err();
        assert!(matches!(e, KvCacheError::QueryRange { .. }), "{e}");
        let e = m
            .window_logits_cached(ids(2, 8, 0), &Attention::Full, &cache, (4, 4), 2, 3)
            .unwrap_err();
        assert!(
            matches!(e, KvCacheError::WindowOutsideQueries { .. }),
            "{e}"
        );
        assert!(e.to_string().contains("2..5"), "{e}");
    }
}
