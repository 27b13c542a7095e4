//! The LM head and its log-probabilities only where a loss needs them, in row chunks.
//!
//! Every masked-diffusion loss (spec §3.1–§3.3) and every UniGRPO log-probability (spec §5.1
//! step 3) reads `log softmax(logits)[target]` at a few positions: the masked ones. Computing
//! the head at every position and keeping `[batch · seq, vocab]` logits (and their gradient)
//! for the backward is the largest activation of a training step (JetEngine's README: ~38 GB
//! at batch 32 × 1024 for LLaDA-8B). [`Scores::Hidden`] instead gathers the final hidden
//! states of the scored positions and runs the head over them `chunk_rows` rows at a time,
//! outside the autodiff graph; the gradient is computed in the same pass, analytically:
//!
//! `∂ logp_n / ∂ logits_n = onehot(target_n) − softmax(logits_n)` (the log-softmax backward,
//! as `torch.nn.functional.log_softmax`'s), so for a loss with upstream `u_n = ∂L/∂logp_n`
//! and `G = u ⊙ (onehot − p)` (`[rows, vocab]`, one chunk at a time):
//! `∂L/∂h = G · Wᵀ`, `∂L/∂W = hᵀ · G`, `∂L/∂b = Σ_rows G`.
//!
//! The result re-enters the graph as a zero-valued surrogate `z − stop_grad(z)` with
//! `z = Σ h ⊙ ∂L/∂h + Σ W ⊙ ∂L/∂W (+ Σ b ⊙ ∂L/∂b)`, linear in `h`, `W` and `b`, so any later
//! scaling of the loss (coefficients, gradient accumulation, shard scales) scales the
//! gradient exactly as it would through the full logits. What stays alive until the backward
//! is `∂L/∂h` (`[n, d_model]`) and one `[d_model, vocab]` buffer per loss, instead of several
//! `[batch · seq, vocab]` tensors (the Liger / Apple cut-cross-entropy idea, generic over the
//! backend; on the CPU backend the log-softmax, target gather and `G` of a chunk are one
//! in-place pass over its logits, [`mmada_host::xent`], bit-identical to the tensor ops).
//!
//! Under a mixed-precision compute dtype the head's three matmuls run in that dtype (as under
//! PyTorch autocast) and the softmax in f32.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Int, Tensor, TensorData};
use burn::tensor::{IndexingUpdateOp, s};
use mmada_model::LmHead;
use mmada_model::model::{float_dtype, stop_grad};

/// Default rows per head chunk (`loss.ce_chunk_rows`, `grpo.ce_chunk_rows`): 512 rows ×
/// 126 464 vocab × 4 bytes = 0.26 GB per `[rows, vocab]` f32 buffer for LLaDA's vocabulary
/// (the tensor-op head pass keeps about four such buffers per chunk; the CPU backend's fused
/// pass one, rewritten in place). Measured on the CPU (`benches/model.rs`' training steps:
/// d_model 256, vocab 58 560, batch 4 × 256, 3 steps in a child process, 2026-12-07): peak
/// RSS of the SFT step 708 / 709 / 725 MB with chunks of 256 / 512 / 1 024 rows, of the
/// pretraining step 725 / 726 / 780 MB; 512-row chunks make the SFT step about 5 % faster than
/// 256 (fewer, larger head matmuls).
pub const DEFAULT_CE_CHUNK_ROWS: usize = 512;

/// What a loss reads its log-probabilities from.
#[derive(Debug, Clone)]
pub enum Scores<B: Backend> {
    /// Full logits `[batch, seq, vocab]` (the model's `forward`). Only the scored rows go
    /// through `log_softmax`; the gradient flows through the logits.
    Logits(Tensor<B, 3>),
    /// Final hidden states `[batch, seq, d_model]` and the LM head: logits only at the scored
    /// positions, `chunk_rows` rows at a time (see the module docs).
    Hidden {
        /// `[batch, seq, d_model]`.
        hidden: Tensor<B, 3>,
        /// The head (on the model's graph).
        head: LmHead<B>,
        /// Rows per chunk (≥ 1).
        chunk_rows: usize,
    },
}

impl<B: Backend> From<Tensor<B, 3>> for Scores<B> {
    fn from(logits: Tensor<B, 3>) -> Self {
        Scores::Logits(logits)
    }
}

impl<B: Backend> Scores<B> {
    /// `[batch, seq]`.
    pub fn batch_seq(&self) -> [usize; 2] {
        match self {
            Scores::Logits(t) => {
                let [b, l, _] = t.dims();
                [b, l]
            }
            Scores::Hidden { hidden, .. } => {
                let [b, l, _] = hidden.dims();
                [b, l]
            }
        }
    }

    fn device(&self) -> B::Device {
        match self {
            Scores::Logits(t) => t.device(),
            Scores::Hidden { hidden, .. } => hidden.device(),
        }
    }

    /// `log softmax(logits[pos_n])[target_n]` → `[n]` f32. For [`Scores::Logits`] on the
    /// graph; for [`Scores::Hidden`] values only (no gradient: see [`Scores::backprop`]).
    ///
    /// # Panics
    /// When `positions` and `targets` differ in length (a programming error).
    pub fn logprobs(&self, positions: &[usize], targets: &[i64]) -> Tensor<B, 1> {
        assert_eq!(positions.len(), targets.len());
        let device = self.device();
        let n = positions.len();
        if n == 0 {
            return Tensor::from_data(
                TensorData::new(Vec::<f32>::new(), [0]),
                (&device, DType::F32),
            );
        }
        match self {
            Scores::Logits(logits) => {
                let tg = targets_tensor::<B>(targets, &device);
                let [b, l, v] = logits.dims();
                let rows = logits
                    .clone()
                    .reshape([b * l, v])
                    .select(0, index_tensor::<B>(positions, &device))
                    .cast(FloatDType::F32);
                log_softmax(rows, 1).gather(1, tg).reshape([n])
            }
            Scores::Hidden {
                hidden,
                head,
                chunk_rows,
            } => {
                let h = stop_grad(gather_rows(hidden.clone(), positions));
                head_pass(&h, &head.detach(), targets, None, *chunk_rows).0
            }
        }
    }

    /// `Σ_n w_n · CE(logits[pos_n], target_n)` → `[1]` f32, on the graph (both variants).
    /// With no position the result is a zero that stays on the graph.
    ///
    /// # Panics
    /// When `positions`, `targets` and `weights` differ in length (a programming error).
    pub fn weighted_ce(
        &self,
        positions: &[usize],
        targets: &[i64],
        weights: &[f32],
    ) -> Tensor<B, 1> {
        assert!(positions.len() == targets.len() && targets.len() == weights.len());
        let device = self.device();
        let n = positions.len();
        if n == 0 {
            return match self {
                Scores::Logits(t) => (t.clone().cast(FloatDType::F32).sum() * 0.0).reshape([1]),
                Scores::Hidden { hidden, .. } => {
                    (hidden.clone().cast(FloatDType::F32).sum() * 0.0).reshape([1])
                }
            };
        }
        let w = Tensor::<B, 1>::from_data(
            TensorData::new(weights.to_vec(), [n]),
            (&device, DType::F32),
        );
        match self {
            Scores::Logits(_) => (self.logprobs(positions, targets) * w)
                .sum()
                .neg()
                .reshape([1]),
            Scores::Hidden {
                hidden,
                head,
                chunk_rows,
            } => {
                let h = gather_rows(hidden.clone(), positions);
                let tracked = h.is_require_grad() || head.weight.is_require_grad();
                let u = tracked.then(|| w.clone().neg());
                let (logp, grads) = head_pass(
                    &stop_grad(h.clone()),
                    &head.detach(),
                    targets,
                    u,
                    *chunk_rows,
                );
                let value = (logp * w).sum().neg().reshape([1]);
                match grads {
                    Some(g) => value + attach(h, head, g),
                    None => value,
                }
            }
        }
    }

    /// A `[1]` tensor of value 0 whose gradient is `Σ_n u_n · ∂ logp_n / ∂θ`: the backward of
    /// any loss through the log-probabilities of [`Scores::logprobs`], given its upstream
    /// `u = ∂L/∂logp` (`[n]`). For [`Scores::Logits`] it is `Σ u ⊙ logp − stop_grad(..)`.
    /// `u` is taken as values: no gradient flows into it.
    ///
    /// # Panics
    /// When `positions`, `targets` and `u` differ in length (a programming error).
    pub fn backprop(&self, positions: &[usize], targets: &[i64], u: Tensor<B, 1>) -> Tensor<B, 1> {
        assert!(positions.len() == targets.len() && targets.len() == u.dims()[0]);
        match self {
            Scores::Logits(_) => {
                let z = (self.logprobs(positions, targets) * u).sum().reshape([1]);
                z.clone() - stop_grad(z)
            }
            Scores::Hidden {
                hidden,
                head,
                chunk_rows,
            } => {
                let h = gather_rows(hidden.clone(), positions);
                let (_, grads) = head_pass(
                    &stop_grad(h.clone()),
                    &head.detach(),
                    targets,
                    Some(u),
                    *chunk_rows,
                );
                attach(h, head, grads.expect("upstream given"))
            }
        }
    }
}

/// Flat positions `b·seq + i` as an index tensor.
fn index_tensor<B: Backend>(positions: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let idx: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
    Tensor::from_data(TensorData::new(idx, [positions.len()]), device)
}

/// Targets as a `[n, 1]` index tensor (for `gather` / `scatter` along the vocabulary).
fn targets_tensor<B: Backend>(targets: &[i64], device: &B::Device) -> Tensor<B, 2, Int> {
    let tg: Vec<i32> = targets.iter().map(|&t| t as i32).collect();
    Tensor::from_data(TensorData::new(tg, [targets.len(), 1]), device)
}

/// Rows `positions` of `hidden` `[batch, seq, d]` → `[n, d]` (on the graph).
fn gather_rows<B: Backend>(hidden: Tensor<B, 3>, positions: &[usize]) -> Tensor<B, 2> {
    let [b, l, d] = hidden.dims();
    let device = hidden.device();
    hidden
        .reshape([b * l, d])
        .select(0, index_tensor::<B>(positions, &device))
}

/// The targets (and upstream) of a head pass, where its log-softmax reads them.
enum Labels<'a, B: Backend> {
    /// The fused host pass: the targets `[n]` and the upstream `[n]` as host values.
    Host {
        targets: &'a [i64],
        u: Option<Vec<f32>>,
    },
    /// The tensor ops: the targets as a `[n, 1]` index tensor.
    Ops(Tensor<B, 2, Int>),
}

/// Gradients of one head pass: `∂L/∂h` `[n, d]`, `∂L/∂W` `[d, vocab]`, `∂L/∂b` `[vocab]`, f32.
struct HeadGrads<B: Backend> {
    h: Tensor<B, 2>,
    w: Tensor<B, 2>,
    b: Option<Tensor<B, 1>>,
}

/// The chunked pass over detached `h` `[n, d]` and `head`: per-token log-probs `[n]` (f32)
/// and, given the upstream `u` `[n]`, the gradients (module docs). On the CPU backend
/// ([`mmada_model::backend::is_host`]) each chunk's log-softmax, target gather and `G` are
/// one in-place pass over its logits ([`mmada_host::xent`], bit-identical to the ops).
fn head_pass<B: Backend>(
    h: &Tensor<B, 2>,
    head: &LmHead<B>,
    targets: &[i64],
    u: Option<Tensor<B, 1>>,
    chunk_rows: usize,
) -> (Tensor<B, 1>, Option<HeadGrads<B>>) {
    let fused = mmada_model::backend::is_host::<B>();
    head_pass_with(h, head, targets, u, chunk_rows, fused)
}

/// [`head_pass`], with the fused host pass (`fused`, CPU backend only) or the tensor ops.
fn head_pass_with<B: Backend>(
    h: &Tensor<B, 2>,
    head: &LmHead<B>,
    targets: &[i64],
    u: Option<Tensor<B, 1>>,
    chunk_rows: usize,
    fused: bool,
) -> (Tensor<B, 1>, Option<HeadGrads<B>>) {
    let [n, d] = h.dims();
    let v = head.vocab();
    let device = h.device();
    let chunk = chunk_rows.max(1);
    // the fused pass reads targets and upstream on the host, the tensor ops as tensors
    let labels = if fused {
        Labels::Host {
            targets,
            u: u.as_ref().map(|u| {
                u.clone()
                    .cast(FloatDType::F32)
                    .into_data()
                    .to_vec::<f32>()
                    .expect("f32 upstream")
            }),
        }
    } else {
        Labels::Ops(targets_tensor::<B>(targets, &device))
    };
    let mm = head.matmul_dtype();
    let w_mm = head.weight.clone().cast(mm);
    // the head with its weight cast once, not once per chunk (`LmHead::logits` casts only
    // what is not yet in the compute dtype)
    let head = LmHead {
        weight: w_mm.clone(),
        bias: head.bias.clone(),
        compute: head.compute,
    };
    let mut logps = Vec::with_capacity(n.div_ceil(chunk));
    let mut g_h = Vec::new();
    let mut g_w: Option<Tensor<B, 2>> = None;
    let mut g_b: Option<Tensor<B, 2>> = None;
    let mut start = 0;
    while start < n {
        let end = (start + chunk).min(n);
        let c = end - start;
        let hc = h.clone().slice(s![start..end, ..]);
        let logits = head.logits(hc.clone()).cast(FloatDType::F32);
        // G = u ⊙ (onehot − p)
        let g = match &labels {
            Labels::Host { targets, u: u_host } => {
                // the logits' buffer is moved out (it is uniquely owned), rewritten in place
                // as G and moved back in
                let mut data = logits.into_data();
                let mut lp = vec![0f32; c];
                mmada_host::xent::log_softmax_gather_grad(
                    data.as_mut_slice::<f32>().expect("f32 logits"),
                    v,
                    &targets[start..end],
                    u_host.as_deref().map(|u| &u[start..end]),
                    &mut lp,
                );
                logps.push(Tensor::from_data(
                    TensorData::new(lp, [c]),
                    (&device, DType::F32),
                ));
                u.is_some()
                    .then(|| Tensor::<B, 2>::from_data(data, (&device, DType::F32)))
            }
            Labels::Ops(targets) => {
                let tg = targets.clone().slice(s![start..end, ..]);
                let logp_all = log_softmax(logits, 1);
                logps.push(logp_all.clone().gather(1, tg.clone()).reshape([c]));
                u.as_ref().map(|u| {
                    let uc = u.clone().slice(s![start..end]).reshape([c, 1]);
                    (logp_all.exp() * uc.clone().neg()).scatter(1, tg, uc, IndexingUpdateOp::Add)
                })
            }
        };
        if let Some(g) = g {
            let g_mm = g.clone().cast(mm);
            g_h.push(
                g_mm.clone()
                    .matmul(w_mm.clone().transpose())
                    .cast(FloatDType::F32),
            );
            let gw = hc.cast(mm).transpose().matmul(g_mm).cast(FloatDType::F32);
            g_w = Some(match g_w {
                None => gw,
                Some(acc) => acc + gw,
            });
            if head.bias.is_some() {
                let gb = g.sum_dim(0);
                g_b = Some(match g_b {
                    None => gb,
                    Some(acc) => acc + gb,
                });
            }
        }
        start = end;
    }
    let logp = if logps.is_empty() {
        Tensor::from_data(
            TensorData::new(Vec::<f32>::new(), [0]),
            (&device, DType::F32),
        )
    } else {
        Tensor::cat(logps, 0)
    };
    let grads = u.map(|_| HeadGrads {
        h: if g_h.is_empty() {
            Tensor::zeros([0, d], (&device, DType::F32))
        } else {
            Tensor::cat(g_h, 0)
        },
        w: g_w.unwrap_or_else(|| Tensor::zeros([d, v], (&device, DType::F32))),
        b: g_b.map(|t| t.reshape([v])),
    });
    (logp, grads)
}

/// The zero-valued surrogate `z − stop_grad(z)` carrying `grads` into the graph of `h` and
/// `head` (module docs).
fn attach<B: Backend>(h: Tensor<B, 2>, head: &LmHead<B>, g: HeadGrads<B>) -> Tensor<B, 1> {
    let cast_like = |t: Tensor<B, 2>, like: DType| t.cast(float_dtype(like));
    let gh = cast_like(g.h, h.dtype());
    let gw = cast_like(g.w, head.weight.dtype());
    let mut z = (h * gh).cast(FloatDType::F32).sum()
        + (head.weight.clone() * gw).cast(FloatDType::F32).sum();
    if let (Some(b), Some(gb)) = (&head.bias, g.b) {
        z = z
            + (b.clone() * gb.cast(float_dtype(b.dtype())))
                .cast(FloatDType::F32)
                .sum();
    }
    let z = z.reshape([1]);
    z.clone() - stop_grad(z)
}

#[cfg(test)]
mod tests {
    use burn::backend::Autodiff;
    use burn::module::AutodiffModule;
    use mmada_model::backend::Cpu;
    use mmada_model::config::ModelConfig;
    use mmada_model::init::init_model;
    use mmada_model::{Attention, LladaModel};

    use super::*;
    use crate::grpo::{GrpoBatch, GrpoLossConfig, LossNorm, unigrpo_loss, unigrpo_loss_scores};

    type Ad = Autodiff<Cpu>;

    fn model(compute: Option<FloatDType>) -> LladaModel<Ad> {
        init_model::<Ad>(
            &ModelConfig::tiny(),
            7,
            &Default::default(),
            FloatDType::F32,
        )
        .with_compute_dtype(compute)
    }

    fn ids(b: usize, l: usize) -> Tensor<Ad, 2, Int> {
        let v: Vec<i32> = (0..b * l).map(|i| ((i * 37 + 11) % 300) as i32).collect();
        Tensor::from_data(TensorData::new(v, [b, l]), &Default::default())
    }

    /// Every parameter gradient as host vectors, by name.
    fn grads(m: &LladaModel<Ad>, loss: Tensor<Ad, 1>) -> Vec<(String, Vec<f32>)> {
        let g = loss.backward();
        m.named_grads(&g)
            .into_iter()
            .map(|(n, d)| {
                (
                    n,
                    d.map(|d| d.convert::<f32>().to_vec().unwrap())
                        .unwrap_or_default(),
                )
            })
            .collect()
    }

    fn max_rel(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
        let mut worst = 0f32;
        for ((na, ga), (nb, gb)) in a.iter().zip(b) {
            assert_eq!(na, nb);
            assert_eq!(
                ga.len(),
                gb.len(),
                "{na}: gradient present in one path only"
            );
            let scale = gb.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
            for (x, y) in ga.iter().zip(gb) {
                worst = worst.max((x - y).abs() / scale);
            }
        }
        worst
    }

    fn scored(b: usize, l: usize) -> (Vec<usize>, Vec<i64>, Vec<f32>) {
        let pos: Vec<usize> = (0..b * l).filter(|k| k % 3 != 1).collect();
        let tg = pos.iter().map(|&k| ((k * 13) % 384) as i64).collect();
        let w = pos.iter().map(|&k| 0.01 + (k % 5) as f32 * 0.02).collect();
        (pos, tg, w)
    }

    /// The chunked head + CE over hidden states equals the CE over full logits, in value and
    /// in every parameter gradient, for chunk sizes that do and do not divide the rows.
    #[test]
    fn hidden_scores_equal_logit_scores_in_value_and_every_gradient() {
        for compute in [None, Some(FloatDType::BF16)] {
            let (b, l) = (3, 10);
            let (pos, tg, w) = scored(b, l);
            let m = model(compute);
            let full =
                Scores::Logits(m.forward(ids(b, l), &Attention::Full)).weighted_ce(&pos, &tg, &w);
            let want_v = full.clone().into_scalar();
            let want = grads(&m, full);
            for chunk in [1, 7, 1024] {
                let s = Scores::Hidden {
                    hidden: m.hidden(ids(b, l), &Attention::Full),
                    head: m.lm_head(),
                    chunk_rows: chunk,
                };
                let loss = s.weighted_ce(&pos, &tg, &w);
                let got_v = loss.clone().into_scalar();
                let tol = if compute.is_some() { 2e-2 } else { 1e-5 };
                assert!(
                    (got_v - want_v).abs() <= 1e-5 * want_v.abs().max(1.0),
                    "{compute:?} chunk {chunk}: loss {got_v} vs {want_v}"
                );
                let got = grads(&m, loss);
                assert!(
                    got.iter().all(|(_, g)| !g.is_empty()),
                    "every parameter gets a gradient"
                );
                let err = max_rel(&got, &want);
                assert!(
                    err <= tol,
                    "{compute:?} chunk {chunk}: max gradient error {err}"
                );
            }
        }
    }

    /// The fused host pass gives the same bits as the tensor ops: log-probs, `∂L/∂h`, `∂L/∂W`
    /// and `∂L/∂b`, on the CPU backend with and without autodiff (training runs on the
    /// latter), with chunks that leave a partial last chunk (5, 16, 64 of 37 rows) and one that
    /// divides the rows (37), a vocabulary that is not a multiple of the kernel's 16 lanes, and
    /// without an upstream.
    #[test]
    fn fused_host_pass_is_bit_identical_to_the_ops() {
        fused_equals_ops::<Cpu>();
        fused_equals_ops::<Ad>();
    }

    fn fused_equals_ops<B: Backend>() {
        let dev = Default::default();
        let (n, d, v) = (37, 24, 1_003);
        let mk = |shape: [usize; 2], seed: u64, scale: f32| {
            let x: Vec<f32> = (0..shape[0] * shape[1])
                .map(|i| {
                    ((i as u64 * 2_654_435_761 + seed) % 10_007) as f32 / 10_007.0 * scale
                        - scale / 2.0
                })
                .collect();
            Tensor::<B, 2>::from_data(TensorData::new(x, shape), &dev)
        };
        let h = mk([n, d], 1, 4.0);
        let head = LmHead {
            weight: mk([d, v], 2, 1.0),
            bias: Some(mk([1, v], 3, 1.0).reshape([v])),
            compute: None,
        };
        let targets: Vec<i64> = (0..n as i64).map(|k| (k * 389 + 7) % v as i64).collect();
        let u: Vec<f32> = (0..n).map(|k| 0.3 - k as f32 * 0.017).collect();
        let bits = |t: Tensor<B, 1>| -> Vec<u32> {
            t.into_data()
                .to_vec::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        };
        for chunk in [5, 16, 37, 64] {
            for with_u in [false, true] {
                let run = |fused| {
                    let u = with_u
                        .then(|| Tensor::<B, 1>::from_data(TensorData::new(u.clone(), [n]), &dev));
                    head_pass_with(&h, &head, &targets, u, chunk, fused)
                };
                let (lp_a, g_a) = run(true);
                let (lp_b, g_b) = run(false);
                assert_eq!(bits(lp_a), bits(lp_b), "chunk {chunk}: log-probs");
                assert_eq!(g_a.is_some(), with_u);
                if let (Some(a), Some(b)) = (g_a, g_b) {
                    let flat = |t: Tensor<B, 2>| {
                        let k = t.dims().iter().product::<usize>();
                        bits(t.reshape([k]))
                    };
                    assert_eq!(flat(a.h), flat(b.h), "chunk {chunk}: ∂L/∂h");
                    assert_eq!(flat(a.w), flat(b.w), "chunk {chunk}: ∂L/∂W");
                    assert_eq!(
                        bits(a.b.unwrap()),
                        bits(b.b.unwrap()),
                        "chunk {chunk}: ∂L/∂b"
                    );
                }
            }
        }
    }

    /// A head with a bias: the bias gradient is the column sum of `G`, as through the logits.
    #[test]
    fn biased_head_gradients_match_the_logits_path() {
        let dev = Default::default();
        let mk = |shape: [usize; 2], seed: u64| {
            let v: Vec<f32> = (0..shape[0] * shape[1])
                .map(|i| ((i as u64 * 2654435761 + seed) % 1000) as f32 / 1000.0 - 0.5)
                .collect();
            Tensor::<Ad, 2>::from_data(TensorData::new(v, shape), &dev).require_grad()
        };
        let h = mk([8, 6], 1);
        let w = mk([6, 11], 2);
        let bias = Tensor::<Ad, 2>::from_data(mk([1, 11], 3).into_data(), &dev)
            .reshape([11])
            .detach()
            .require_grad();
        let head = LmHead {
            weight: w.clone(),
            bias: Some(bias.clone()),
            compute: None,
        };
        let pos = vec![0, 2, 3, 5, 7];
        let tg = vec![1, 10, 4, 4, 0];
        let wt = vec![0.5, 1.0, 0.25, 2.0, 1.0];
        let full =
            Scores::Logits(head.logits(h.clone()).reshape([2, 4, 11])).weighted_ce(&pos, &tg, &wt);
        let gf = full.backward();
        // the second graph is built after the first backward consumed the first
        let chunked = Scores::Hidden {
            hidden: h.clone().reshape([2, 4, 6]),
            head: head.clone(),
            chunk_rows: 2,
        }
        .weighted_ce(&pos, &tg, &wt);
        let gc = chunked.backward();
        for (a, b) in [
            (
                h.grad(&gf).unwrap().into_data(),
                h.grad(&gc).unwrap().into_data(),
            ),
            (
                w.grad(&gf).unwrap().into_data(),
                w.grad(&gc).unwrap().into_data(),
            ),
        ] {
            a.assert_approx_eq::<f32>(&b, burn::tensor::Tolerance::absolute(1e-6));
        }
        bias.grad(&gf).unwrap().into_data().assert_approx_eq::<f32>(
            &bias.grad(&gc).unwrap().into_data(),
            burn::tensor::Tolerance::absolute(1e-6),
        );
    }

    /// UniGRPO over hidden states (two passes, upstream from a log-prob leaf) equals the
    /// logits path in loss, statistics and every gradient, for each loss normalisation.
    #[test]
    fn unigrpo_over_hidden_states_equals_the_logits_path() {
        let (r, l) = (3, 8);
        let mut batch = GrpoBatch::new(l);
        for (row, adv) in [1.0, -0.5, 0.25].into_iter().enumerate().take(r) {
            let noisy: Vec<i64> = (0..l).map(|i| ((row * 31 + i * 7) % 300) as i64).collect();
            let labels: Vec<i64> = (0..l).map(|i| ((row * 17 + i * 5) % 320) as i64).collect();
            let loss_mask: Vec<bool> = (0..l).map(|i| i >= 3 && (i + row) % 2 == 0).collect();
            let noised = crate::grpo::NoisedRow { noisy, loss_mask };
            assert!(batch.push(noised, &labels, adv, row).unwrap());
        }
        let (_, _, rows) = batch.tokens();
        let n = rows.len();
        let old: Vec<f32> = (0..n).map(|i| -6.0 + (i % 4) as f32 * 0.3).collect();
        let refs: Vec<f32> = (0..n).map(|i| -5.8 + (i % 3) as f32 * 0.2).collect();
        let dev = Default::default();
        for norm in [LossNorm::DllmRl, LossNorm::Sequence, LossNorm::Token] {
            let cfg = GrpoLossConfig {
                norm,
                epsilon: 0.2,
                epsilon_high: Some(0.28),
                beta: 0.04,
            };
            let m = model(None);
            let want = unigrpo_loss(
                m.forward(batch.input::<Ad>(&dev), &Attention::Full),
                &batch,
                &old,
                Some(&refs),
                &cfg,
            )
            .unwrap();
            let got = unigrpo_loss_scores(
                Scores::Hidden {
                    hidden: m.hidden(batch.input::<Ad>(&dev), &Attention::Full),
                    head: m.lm_head(),
                    chunk_rows: 4,
                },
                &batch,
                &old,
                Some(&refs),
                &cfg,
            )
            .unwrap();
            assert_eq!(got.stats, want.stats, "{norm:?}");
            let (gv, wv) = (
                got.loss.clone().into_scalar(),
                want.loss.clone().into_scalar(),
            );
            assert!(
                (gv - wv).abs() <= 1e-5 * wv.abs().max(1.0),
                "{norm:?}: loss {gv} vs {wv}"
            );
            let err = max_rel(&grads(&m, got.loss), &grads(&m, want.loss));
            assert!(err <= 1e-5, "{norm:?}: max gradient error {err}");
        }
    }

    /// Log-probs without graph: the same values as through the logits, on the inner backend.
    #[test]
    fn inner_backend_logprobs_match_logits() {
        let m = model(None).valid();
        let (pos, tg, _) = scored(2, 9);
        let dev = Default::default();
        let ids = Tensor::<Cpu, 2, Int>::from_data(ids(2, 9).into_data(), &dev);
        let a = Scores::Logits(m.forward(ids.clone(), &Attention::Full)).logprobs(&pos, &tg);
        let b = Scores::Hidden {
            hidden: m.hidden(ids, &Attention::Full),
            head: m.lm_head(),
            chunk_rows: 5,
        }
        .logprobs(&pos, &tg);
        a.into_data()
            .assert_approx_eq::<f32>(&b.into_data(), burn::tensor::Tolerance::absolute(1e-5));
    }
}

#[cfg(test)]
mod profile {
    use std::time::Instant;

    use burn::backend::Autodiff;
    use burn::tensor::Distribution;
    use mmada_model::backend::Cpu;

    use super::*;

    type Ad = Autodiff<Cpu>;

    /// Manual profile (not a check): `cargo test --workspace --lib -- head::profile
    /// --ignored --nocapture`.
    #[test]
    #[ignore]
    fn head_paths() {
        let (n_all, d, v) = (1024, 256, 58_560);
        let dev = Default::default();
        let h0 = Tensor::<Ad, 2>::random([n_all, d], Distribution::Normal(0., 1.), &dev);
        let w0 = Tensor::<Ad, 2>::random([d, v], Distribution::Normal(0., 0.02), &dev);
        let pos: Vec<usize> = (0..n_all).filter(|k| k % 2 == 0).collect();
        let tg: Vec<i64> = pos.iter().map(|&k| ((k * 13) % v) as i64).collect();
        let wt: Vec<f32> = vec![1.0; pos.len()];
        let t = |name: &str, f: &mut dyn FnMut()| {
            f();
            let s = Instant::now();
            for _ in 0..3 {
                f();
            }
            eprintln!("{name}: {:.3} s", s.elapsed().as_secs_f64() / 3.0);
        };
        for path in ["full", "chunked"] {
            let mut fwd_s = 0.0;
            let mut bwd_s = 0.0;
            for _ in 0..3 {
                let h = h0.clone().require_grad();
                let w = w0.clone().require_grad();
                let head = LmHead {
                    weight: w.clone(),
                    bias: None,
                    compute: None,
                };
                let s0 = Instant::now();
                let hidden = h.clone().reshape([1, n_all, d]);
                let scores = if path == "full" {
                    Scores::Logits(head.logits3(hidden))
                } else {
                    Scores::Hidden {
                        hidden,
                        head,
                        chunk_rows: 1024,
                    }
                };
                let loss = scores.weighted_ce(&pos, &tg, &wt);
                let _ = loss.clone().into_scalar();
                fwd_s += s0.elapsed().as_secs_f64();
                let s1 = Instant::now();
                let g = loss.backward();
                let _ = w.grad(&g).unwrap().slice([0..1, 0..1]).into_data();
                let _ = h.grad(&g).unwrap().slice([0..1, 0..1]).into_data();
                bwd_s += s1.elapsed().as_secs_f64();
            }
            eprintln!(
                "{path}: forward {:.3} s, backward {:.3} s",
                fwd_s / 3.0,
                bwd_s / 3.0
            );
        }
        type I = Cpu;
        let hi = Tensor::<I, 2>::random([512, d], Distribution::Normal(0., 1.), &dev);
        let wi = Tensor::<I, 2>::random([d, v], Distribution::Normal(0., 0.02), &dev);
        let gi = Tensor::<I, 2>::random([512, v], Distribution::Normal(0., 1.), &dev);
        t("h·W [512,256]x[256,58560]", &mut || {
            let _ = hi
                .clone()
                .matmul(wi.clone())
                .slice([0..1, 0..1])
                .into_data();
        });
        t("G·Wᵀ (view)", &mut || {
            let _ = gi
                .clone()
                .matmul(wi.clone().transpose())
                .slice([0..1, 0..1])
                .into_data();
        });
        let wt_rm = Tensor::<I, 2>::from_data(wi.clone().transpose().into_data(), &dev);
        t("G·Wᵀ (row-major copy)", &mut || {
            let _ = gi
                .clone()
                .matmul(wt_rm.clone())
                .slice([0..1, 0..1])
                .into_data();
        });
        t("hᵀ·G (view)", &mut || {
            let _ = hi
                .clone()
                .transpose()
                .matmul(gi.clone())
                .slice([0..1, 0..1])
                .into_data();
        });
        let ht_rm = Tensor::<I, 2>::from_data(hi.clone().transpose().into_data(), &dev);
        t("hᵀ·G (row-major copy)", &mut || {
            let _ = ht_rm
                .clone()
                .matmul(gi.clone())
                .slice([0..1, 0..1])
                .into_data();
        });
        t("log_softmax [512,58560]", &mut || {
            let _ = log_softmax(gi.clone(), 1).slice([0..1, 0..1]).into_data();
        });
        t("exp", &mut || {
            let _ = gi.clone().exp().slice([0..1, 0..1]).into_data();
        });
        let tgi = Tensor::<I, 2, Int>::from_data(
            TensorData::new(
                (0..512).map(|k| (k * 13 % v) as i32).collect::<Vec<_>>(),
                [512, 1],
            ),
            &dev,
        );
        let ui = Tensor::<I, 2>::ones([512, 1], &dev);
        t("scatter add", &mut || {
            let _ = gi
                .clone()
                .scatter(1, tgi.clone(), ui.clone(), IndexingUpdateOp::Add)
                .slice([0..1, 0..1])
                .into_data();
        });
    }
}
