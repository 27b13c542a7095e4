//! Activation checkpointing per transformer block (`train.activation_checkpointing: true`).
//!
//! The forward runs every block on the autodiff backend's *inner* backend, so no graph is
//! recorded and only each block's input `[batch, seq, d_model]` is kept. The loss is built
//! on a tracked leaf that holds the last block's output (`ln_f`, the LM head and the loss are
//! recorded as usual). [`Recompute::backward`] then walks the blocks from the last to the
//! first: it re-runs block `i` on its saved input (now a tracked leaf) and back-propagates
//! the gradient of the block's output through it with the surrogate `Σ y ⊙ g` (whose gradient
//! with respect to `y` is exactly `g`), which yields the block's parameter gradients and the
//! gradient of its input, the `g` of block `i − 1`; the embedding lookup closes the chain.
//! This is `torch.utils.checkpoint` applied to every `LLaDALlamaBlock`, as upstream's
//! `activation_checkpointing` (`models/modeling_llada.py`, `ActivationCheckpointingStrategy
//! .whole_layer`) and FSDP's per-layer checkpoint wrapper do.
//!
//! Memory: the step's activations are the `n_layers` block inputs plus *one* block's graph,
//! instead of `n_layers` block graphs (see `crate::plan`'s activation lines). Cost: one extra
//! forward of every block (about a third more compute per step).
//!
//! burn 0.21's own `Autodiff<B, BalancedCheckpointing>` recomputes only memory-bound ops
//! (element-wise, casts) and keeps every matmul output, so it does not bound the activations
//! per block: see `docs/activation-checkpointing.md`.

use std::cell::RefCell;

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor};
use mmada_model::model::{Attention, Denoiser, HiddenStates, LladaModel, LmHead, rope_tables};

use crate::optim::{add_grads_of, param_infos};

/// A [`HiddenStates`] view of a model that records only block inputs in the forward; the
/// loss built on it is back-propagated with [`Recompute::backward`], never with
/// `Tensor::backward` directly (the blocks' parameters would get no gradient).
///
/// Every call of [`HiddenStates::hidden`] (a loss may call it once per stream) keeps its own
/// block inputs until [`Recompute::backward`].
pub struct Recompute<'m, B: AutodiffBackend> {
    model: &'m LladaModel<B>,
    saved: RefCell<Vec<Saved<B>>>,
}

/// One forward's checkpoints.
struct Saved<B: AutodiffBackend> {
    /// The input ids `[batch, seq]` (the embedding's backward needs them).
    ids: Tensor<B, 2, Int>,
    /// RoPE `(cos, sin)` tables `[seq, head_dim]`.
    rope: (Tensor<B, 2>, Tensor<B, 2>),
    /// The additive attention bias `[batch|1, 1, seq, seq]`, if any.
    bias: Option<Tensor<B, 4>>,
    /// Block inputs `[batch, seq, d_model]`, block `i`'s at index `i`.
    inputs: Vec<Tensor<B::InnerBackend, 3>>,
    /// The last block's output as a tracked leaf (the input of `ln_f`).
    top: Tensor<B, 3>,
}

impl<'m, B: AutodiffBackend> Recompute<'m, B> {
    /// Wrap `model` for one loss evaluation.
    pub fn new(model: &'m LladaModel<B>) -> Self {
        Self {
            model,
            saved: RefCell::new(Vec::new()),
        }
    }

    /// Gradients of `loss` (a scalar `[1]` built on this view's hidden states) with respect
    /// to every parameter of the model, equal to `GradientsParams::from_grads(loss.backward(),
    /// model)` on the un-checkpointed model up to float summation order.
    pub fn backward(self, loss: Tensor<B, 1>) -> GradientsParams {
        let model = self.model;
        let mut grads = loss.backward();
        let saved = self.saved.into_inner();
        let tops: Vec<_> = saved
            .iter()
            .map(|s| s.top.grad_remove(&mut grads))
            .collect();
        // ln_f, the LM head, and anything else the loss touched directly
        let mut out = GradientsParams::from_grads(grads, model);
        let compute = model.effective_compute_dtype();
        // the parameter table once per backward, not once per block
        let infos = param_infos(model);
        for (s, g) in saved.into_iter().zip(tops) {
            let Some(mut g) = g else { continue };
            for (block, x) in model.blocks.iter().zip(s.inputs).rev() {
                let x = Tensor::<B, 3>::from_inner(x).require_grad();
                let y = block.forward_in(x.clone(), &s.rope, s.bias.as_ref(), compute);
                let mut grads = (y * Tensor::from_inner(g)).sum().backward();
                g = x
                    .grad_remove(&mut grads)
                    .expect("a block's input reaches its output");
                out = add_grads_of::<B>(&infos, out, GradientsParams::from_grads(grads, block));
            }
            if model.wte.weight.is_require_grad() {
                // (a frozen embedding, e.g. under LoRA, has nothing to receive)
                let e = model.wte.forward(s.ids);
                let grads = (e * Tensor::from_inner(g)).sum().backward();
                out =
                    add_grads_of::<B>(&infos, out, GradientsParams::from_grads(grads, &model.wte));
            }
        }
        out
    }
}

impl<B: AutodiffBackend> HiddenStates<B> for Recompute<'_, B> {
    /// [`LladaModel::hidden`] with the blocks run untracked; see the module docs.
    fn hidden(&self, ids: Tensor<B, 2, Int>, attention: &Attention<B>) -> Tensor<B, 3> {
        let m = self.model;
        let [_, l] = ids.dims();
        let device = ids.device();
        let rope = rope_tables::<B>(l, m.head_dim(), m.rope_theta, &device);
        let bias = attention.bias(l);
        let compute = m.effective_compute_dtype();
        // Untracked autodiff tensors, not the inner backend: Flex's own softmax rounds
        // differently from the autodiff backend's, and the recomputation must see the very
        // values of the tracked forward.
        let mut x = m.wte.clone().no_grad().forward(ids.clone());
        let mut inputs = Vec::with_capacity(m.blocks.len());
        for block in &m.blocks {
            inputs.push(x.clone().inner());
            x = block
                .clone()
                .no_grad()
                .forward_in(x, &rope, bias.as_ref(), compute);
        }
        let top = x.require_grad();
        let hidden = m.ln_f.forward(top.clone());
        self.saved.borrow_mut().push(Saved {
            ids,
            rope,
            bias,
            inputs,
            top,
        });
        hidden
    }

    fn lm_head(&self) -> LmHead<B> {
        self.model.lm_head()
    }
}

impl<B: AutodiffBackend> Denoiser<B> for Recompute<'_, B> {
    fn logits(&self, ids: Tensor<B, 2, Int>, attention: &Attention<B>) -> Tensor<B, 3> {
        self.model.lm_head().logits3(self.hidden(ids, attention))
    }

    fn input_vocab(&self) -> Option<usize> {
        self.model.input_vocab()
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::activation::log_softmax;
    use burn::tensor::{Bool, FloatDType, TensorData};
    use mmada_model::backend::CpuAutodiff as B;
    use mmada_model::{ModelConfig, init::init_model};

    use super::*;
    use crate::optim::param_infos;

    /// A loss that calls `hidden` twice (two canvases, the second with key padding) and
    /// reads the head at a few positions, as the unified loss does per stream.
    fn loss<M: HiddenStates<B>>(m: &M, seed: u64) -> Tensor<B, 1> {
        let dev = Default::default();
        let ids = |rows: usize, l: usize, k: u64| {
            let v: Vec<i64> = (0..rows * l)
                .map(|i| ((i as u64 * 37 + k * 11 + seed) % 300) as i64)
                .collect();
            Tensor::<B, 2, Int>::from_data(TensorData::new(v, [rows, l]), &dev)
        };
        let head = m.lm_head();
        let a = head.logits3(m.hidden(ids(2, 12, 1), &Attention::Full));
        let keep: Vec<bool> = (0..3 * 10).map(|i| i % 10 >= i / 10).collect();
        let keep = Tensor::<B, 2, Bool>::from_data(TensorData::new(keep, [3, 10]), &dev);
        let b = head.logits3(m.hidden(ids(3, 10, 2), &Attention::KeyPadding(keep)));
        let la = log_softmax(a, 2).slice([0..2, 3..9, 0..40]).sum();
        let lb = log_softmax(b, 2).slice([1..3, 0..10, 7..9]).mean();
        la * 0.3 - lb
    }

    /// Every parameter's gradient, by name (each parameter must have one).
    fn flat(m: &LladaModel<B>, g: &GradientsParams) -> Vec<(String, Vec<f32>)> {
        let v = flat_present(m, g);
        assert_eq!(v.len(), param_infos(m).len(), "a parameter has no gradient");
        v
    }

    fn compare(compute: Option<FloatDType>, cfg: ModelConfig) -> f32 {
        let m = init_model::<B>(&cfg, 3, &Default::default(), FloatDType::F32)
            .with_compute_dtype(compute);
        let plain = GradientsParams::from_grads(loss(&m, 0).backward(), &m);
        let r = Recompute::new(&m);
        let l = loss(&r, 0);
        let ckpt = r.backward(l);
        let mut worst = 0f32;
        for ((name, a), (_, b)) in flat(&m, &plain).into_iter().zip(flat(&m, &ckpt)) {
            let scale = a.iter().fold(0f32, |s, x| s.max(x.abs()));
            assert!(scale > 0.0, "{name}: zero gradient, the test cannot tell");
            let mut w = 0f32;
            for (x, y) in a.iter().zip(&b) {
                w = w.max((x - y).abs() / scale);
            }
            worst = worst.max(w);
        }
        worst
    }

    #[test]
    fn checkpointed_gradients_equal_plain_ones() {
        let worst = compare(None, ModelConfig::tiny());
        assert_eq!(worst, 0.0, "max relative difference {worst}");
    }

    /// LoRA (frozen base, f32 adapters, no dropout): only the adapters get gradients, the
    /// same as without checkpointing.
    #[test]
    fn checkpointed_lora_gradients_equal_plain_ones() {
        let lora: mmada_model::lora::LoraConfig =
            serde_json::from_value(serde_json::json!({"r": 4, "alpha": 8.0})).unwrap();
        let m = init_model::<B>(
            &ModelConfig::tiny(),
            3,
            &Default::default(),
            FloatDType::F32,
        )
        .with_lora(&lora, 1)
        .unwrap();
        let plain = GradientsParams::from_grads(loss(&m, 0).backward(), &m);
        let r = Recompute::new(&m);
        let l = loss(&r, 0);
        let ckpt = r.backward(l);
        assert_eq!(
            plain.len(),
            ckpt.len(),
            "the same parameters have gradients"
        );
        assert_eq!(
            plain.len(),
            2 * 7 * 2,
            "A and B of 7 projections × 2 blocks"
        );
        assert_eq!(flat_present(&m, &plain), flat_present(&m, &ckpt));
    }

    /// [`flat`] of the parameters that have a gradient.
    fn flat_present(m: &LladaModel<B>, g: &GradientsParams) -> Vec<(String, Vec<f32>)> {
        type I = <B as AutodiffBackend>::InnerBackend;
        param_infos(m)
            .into_iter()
            .filter_map(|p| {
                let d = if p.dims.len() == 2 {
                    g.get::<I, 2>(p.id).map(|t| t.into_data())
                } else {
                    g.get::<I, 1>(p.id).map(|t| t.into_data())
                }?;
                Some((p.name, d.convert::<f32>().to_vec::<f32>().unwrap()))
            })
            .collect()
    }

    #[test]
    fn checkpointed_gradients_equal_plain_ones_bf16_compute_gqa() {
        let cfg = ModelConfig {
            n_kv_heads: 2,
            n_layers: 3,
            ..ModelConfig::tiny()
        };
        let worst = compare(Some(FloatDType::BF16), cfg);
        assert_eq!(worst, 0.0, "max relative difference {worst}");
    }
}
