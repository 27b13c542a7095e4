//! Masked-diffusion losses, all built on one weighted token cross-entropy.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use mmada_model::model::MASKED_SCORE;
use mmada_model::{Attention, HiddenStates};

use crate::head::{DEFAULT_CE_CHUNK_ROWS, Scores};

use crate::noise::Noised;
use crate::{DiffusionError, check_len};

/// `Σ_n w_n · CE(logits[pos_n], target_n)` → `[1]` (f32).
///
/// `scores`: logits `[batch, seq, vocab]` or hidden states + head ([`Scores`]); `positions`:
/// flat indices `b·seq + i` of the scored tokens; `targets`: their labels; `weights`: their
/// weights. Only the selected rows go through `log_softmax` (in f32). With no position the
/// result is a zero that stays on the autodiff graph.
///
/// # Panics
/// When `positions`, `targets` and `weights` differ in length (a programming error).
pub fn weighted_token_ce<B: Backend>(
    scores: impl Into<Scores<B>>,
    positions: &[usize],
    targets: &[i64],
    weights: &[f32],
) -> Tensor<B, 1> {
    scores.into().weighted_ce(positions, targets, weights)
}

/// LLaDA pretraining loss (GUIDELINES.md, spec §3.1): `Σ_masked CE/p_mask / (B·L)`.
///
/// `logits`: `[batch, seq, vocab]` of the model on `noised.noisy`; `x0`: clean ids
/// `[batch · seq]`.
///
/// # Errors
/// [`DiffusionError::Length`] when the inputs do not match the logits' shape.
pub fn pretrain_loss<B: Backend>(
    scores: impl Into<Scores<B>>,
    x0: &[i64],
    noised: &Noised,
) -> Result<Tensor<B, 1>, DiffusionError> {
    let scores = scores.into();
    let [b, l] = scores.batch_seq();
    check_len("x0", x0.len(), b * l)?;
    check_len("masked", noised.masked.len(), b * l)?;
    check_len("p_mask", noised.p_mask.len(), b)?;
    let (mut pos, mut tg, mut w) = (vec![], vec![], vec![]);
    for (k, &m) in noised.masked.iter().enumerate() {
        if m {
            pos.push(k);
            tg.push(x0[k]);
            w.push(1.0 / (noised.p_mask[k / l] * (b * l) as f32));
        }
    }
    Ok(scores.weighted_ce(&pos, &tg, &w))
}

/// LLaDA SFT loss (GUIDELINES.md, spec §3.2): `(1/B) Σ_b Σ_masked CE/(p_b · answer_len_b)`,
/// `answer_len_b = L − prompt_len_b` (EOS padding counts as answer).
///
/// # Errors
/// [`DiffusionError::Length`] when the inputs do not match the logits' shape;
/// [`DiffusionError::Range`] when a prompt fills its whole row.
pub fn sft_loss<B: Backend>(
    scores: impl Into<Scores<B>>,
    x0: &[i64],
    noised: &Noised,
    prompt_lengths: &[usize],
) -> Result<Tensor<B, 1>, DiffusionError> {
    let scores = scores.into();
    let [b, l] = scores.batch_seq();
    check_len("x0", x0.len(), b * l)?;
    check_len("masked", noised.masked.len(), b * l)?;
    check_len("p_mask", noised.p_mask.len(), b)?;
    check_len("prompt_lengths", prompt_lengths.len(), b)?;
    let (mut pos, mut tg, mut w) = (vec![], vec![], vec![]);
    for (k, &m) in noised.masked.iter().enumerate() {
        if m {
            let row = k / l;
            let ans = l
                .checked_sub(prompt_lengths[row])
                .filter(|a| *a > 0)
                .ok_or(DiffusionError::Range {
                    what: "prompt_lengths",
                    value: prompt_lengths[row].to_string(),
                    why: "a prompt must leave at least one answer position in its row",
                })?;
            pos.push(k);
            tg.push(x0[k]);
            w.push(1.0 / (noised.p_mask[row] * ans as f32 * b as f32));
        }
    }
    Ok(scores.weighted_ce(&pos, &tg, &w))
}

/// How the padded prompt of t2i rows is hidden from attention during unified training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum T2iAttention {
    /// The current upstream code: a *float* bias of 1.0 (valid pair) / 0.0 (pad pair) added to
    /// the scores, so pads are only down-weighted by e⁻¹; other rows get a constant +1
    /// (spec §3.3 caveat; reproduces `fixtures/sft_loss/mmada_forward_process`).
    #[default]
    UpstreamSoftBias,
    /// Plain full attention, pads visible: the regime the released MMaDA-8B-Base / MixCoT
    /// checkpoints were trained in (before upstream commit `0ef94ba`).
    Full,
    /// A hard pairwise mask on t2i rows (`finfo.min` for pad pairs): what the upstream code
    /// intended.
    Hard,
}

/// One `[t2i | lm | mmu]` batch as `MMadaModelLM.forward_process` takes it
/// (`models/modeling_mmada.py`), already noised. All arrays are row-major host data.
#[derive(Debug, Clone)]
pub struct UnifiedBatch {
    /// Model input ids `[rows · seq]` (noised), rows ordered t2i, lm, mmu.
    pub ids: Vec<i64>,
    /// Labels `[rows · seq]`, −100 = ignored.
    pub labels: Vec<i64>,
    /// Sequence length (all streams padded to it).
    pub seq: usize,
    /// Rows of each stream.
    pub n_t2i: usize,
    /// lm rows.
    pub n_lm: usize,
    /// mmu rows.
    pub n_mmu: usize,
    /// Text prompt length `P` of t2i rows: image positions start after `P + 1` (spec §2.4 c).
    pub max_seq_length: usize,
    /// `[n_t2i · seq]` valid (non-`[iPAD]`) positions of t2i rows.
    pub t2i_masks: Vec<bool>,
    /// `[n_lm · seq]` p_mask per position.
    pub p_mask_lm: Vec<f32>,
    /// `[n_mmu · seq]` p_mask per position.
    pub p_mask_mmu: Vec<f32>,
    /// `[n_lm · seq]` answer length per position (chat data, stage ≥ 1.3), or `None` for the
    /// pretraining normalisation `B_lm · seq`.
    pub answer_lengths_lm: Option<Vec<f32>>,
    /// `[n_mmu · seq]` answer length per position.
    pub answer_lengths_mmu: Vec<f32>,
    /// The mask token id (`masked = ids == mask_id`).
    pub mask_id: i64,
}

/// The three losses of one unified batch, each `[1]`.
#[derive(Debug, Clone)]
pub struct UnifiedLoss<B: Backend> {
    /// MaskGIT mean CE over non-ignored image-slice labels of t2i rows.
    pub t2i: Tensor<B, 1>,
    /// Text diffusion loss of lm rows.
    pub lm: Tensor<B, 1>,
    /// SFT-style loss of mmu rows.
    pub mmu: Tensor<B, 1>,
}

impl<B: Backend> UnifiedLoss<B> {
    /// `t2i_coeff·t2i + lm_coeff·lm + mmu_coeff·mmu`.
    pub fn total(&self, t2i_coeff: f32, lm_coeff: f32, mmu_coeff: f32) -> Tensor<B, 1> {
        self.t2i.clone() * t2i_coeff + self.lm.clone() * lm_coeff + self.mmu.clone() * mmu_coeff
    }
}

/// MMaDA's unified loss (`MMadaModelLM.forward_process`, spec §3.3): one forward over
/// `[t2i | lm | mmu]`, then
/// * t2i: `mean CE(logits[:n_t2i, P+1:], labels[:n_t2i, P+1:])` over labels ≠ −100,
/// * lm: `Σ_masked CE/p/ans / n_lm` (or `/ (n_lm·seq)` without answer lengths),
/// * mmu: `Σ_masked CE/p/ans / n_mmu`,
///
/// where masked = `ids == mask_id` and ignored labels contribute 0. A stream with no rows
/// has loss 0. The head runs only at the scored positions, [`DEFAULT_CE_CHUNK_ROWS`] rows at
/// a time ([`unified_loss_chunked`] sets the chunk).
///
/// # Errors
/// [`DiffusionError::Length`] when an array does not match the batch shape.
pub fn unified_loss<B: Backend, M: HiddenStates<B>>(
    model: &M,
    batch: &UnifiedBatch,
    t2i_attention: T2iAttention,
    device: &B::Device,
) -> Result<UnifiedLoss<B>, DiffusionError> {
    unified_loss_chunked(model, batch, t2i_attention, DEFAULT_CE_CHUNK_ROWS, device)
}

/// [`unified_loss`] with the LM head applied `ce_chunk_rows` rows at a time (recipe
/// `loss.ce_chunk_rows`; see [`crate::head`]), or over full logits when `ce_chunk_rows` is 0.
/// Each non-empty stream keeps one `[d_model, vocab]` f32 gradient buffer until the
/// backward.
///
/// # Errors
/// [`DiffusionError::Length`] when an array does not match the batch shape.
pub fn unified_loss_chunked<B: Backend, M: HiddenStates<B>>(
    model: &M,
    batch: &UnifiedBatch,
    t2i_attention: T2iAttention,
    ce_chunk_rows: usize,
    device: &B::Device,
) -> Result<UnifiedLoss<B>, DiffusionError> {
    let (l, rows) = (batch.seq, batch.n_t2i + batch.n_lm + batch.n_mmu);
    check_len("ids", batch.ids.len(), rows * l)?;
    check_len("labels", batch.labels.len(), rows * l)?;
    check_len("t2i_masks", batch.t2i_masks.len(), batch.n_t2i * l)?;
    check_len("p_mask_lm", batch.p_mask_lm.len(), batch.n_lm * l)?;
    check_len("p_mask_mmu", batch.p_mask_mmu.len(), batch.n_mmu * l)?;
    check_len(
        "answer_lengths_mmu",
        batch.answer_lengths_mmu.len(),
        batch.n_mmu * l,
    )?;
    if let Some(a) = &batch.answer_lengths_lm {
        check_len("answer_lengths_lm", a.len(), batch.n_lm * l)?;
    }

    let attention = match t2i_attention {
        T2iAttention::Full => Attention::Full,
        T2iAttention::UpstreamSoftBias | T2iAttention::Hard => {
            let (on, off) = match t2i_attention {
                T2iAttention::Hard => (0.0, MASKED_SCORE),
                _ => (1.0, 0.0),
            };
            let mut bias = vec![on; rows * l * l];
            for r in 0..batch.n_t2i {
                let m = &batch.t2i_masks[r * l..(r + 1) * l];
                for i in 0..l {
                    for j in 0..l {
                        bias[(r * l + i) * l + j] = if m[i] && m[j] { on } else { off };
                    }
                }
            }
            Attention::Bias(Tensor::from_data(
                TensorData::new(bias, [rows, 1, l, l]),
                (device, DType::F32),
            ))
        }
    };
    let ids: Vec<i32> = batch.ids.iter().map(|&x| x as i32).collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [rows, l]), device);
    let scores = if ce_chunk_rows == 0 {
        Scores::Logits(model.logits(ids, &attention))
    } else {
        Scores::Hidden {
            hidden: model.hidden(ids, &attention),
            head: model.lm_head(),
            chunk_rows: ce_chunk_rows,
        }
    };

    // t2i: mean over non-ignored labels of the image slice
    let (mut pos, mut tg) = (vec![], vec![]);
    for r in 0..batch.n_t2i {
        for i in (batch.max_seq_length + 1)..l {
            let k = r * l + i;
            if batch.labels[k] != -100 {
                pos.push(k);
                tg.push(batch.labels[k]);
            }
        }
    }
    let w = vec![1.0 / pos.len().max(1) as f32; pos.len()];
    let t2i = scores.weighted_ce(&pos, &tg, &w);

    let stream = |first_row: usize, n: usize, p: &[f32], ans: Option<&[f32]>| {
        let (mut pos, mut tg, mut w) = (vec![], vec![], vec![]);
        for r in 0..n {
            for i in 0..l {
                let k = (first_row + r) * l + i;
                let local = r * l + i;
                if batch.ids[k] == batch.mask_id && batch.labels[k] != -100 {
                    pos.push(k);
                    tg.push(batch.labels[k]);
                    let norm = match ans {
                        Some(a) => a[local] * n as f32,
                        None => (n * l) as f32,
                    };
                    w.push(1.0 / (p[local] * norm));
                }
            }
        }
        scores.weighted_ce(&pos, &tg, &w)
    };
    let lm = stream(
        batch.n_t2i,
        batch.n_lm,
        &batch.p_mask_lm,
        batch.answer_lengths_lm.as_deref(),
    );
    let mmu = stream(
        batch.n_t2i + batch.n_lm,
        batch.n_mmu,
        &batch.p_mask_mmu,
        Some(&batch.answer_lengths_mmu),
    );
    Ok(UnifiedLoss { t2i, lm, mmu })
}
