//! UniGRPO phases 3–5: noising the completions, old-policy (and reference) log-probs, and
//! the μ clipped-objective updates.

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor, TensorData};
use mmada_diffusion::Scores;
use mmada_diffusion::grpo::{
    GroupAdvantages, GrpoBatch, TailPad, completion_mask, noise_completion, noise_d1, noise_image,
    unigrpo_loss_scores,
};
use mmada_diffusion::noise::ImageMaskDraw;
use mmada_model::model::HiddenStates;
use mmada_model::{Attention, LladaModel};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::purpose;
use super::rollout::Rollout;
use crate::data::derive_seed;
use crate::error::TrainError;
use crate::recipe::{Estimator, T2iPadAttention, TaskKind, TaskSpec, UniGrpoRecipe};
use crate::recompute::Recompute;
use crate::schedule::Schedule;
use crate::trainer::{Session, accumulate, accumulate_grads};

/// The noised training rows of a step: `batches[n][k]` is prompt group `k` (of this rank)
/// in inner iteration `n`.
pub struct Noised {
    /// `[μ][groups of this rank]` batches.
    pub batches: Vec<Vec<GrpoBatch>>,
    /// Non-empty groups per iteration over the whole step (every rank; the 1-device divisor).
    pub nonempty: Vec<usize>,
    /// Sum and count of the mask ratios drawn (`mask_ratio/mean`).
    pub ratio_sum: [f32; 2],
    /// Per prompt group `k`: `Some(ipad_id)` when its task hides the caption's `[iPAD]`
    /// padding from attention (`t2i_attention: hard`), as its rollout did; `None` = full.
    pub hidden_pad: Vec<Option<i64>>,
}

/// The EOS tail of a completion row: d1 scores through the first EOS (TRL
/// `completion_mask`), so `post_num` is at least 1 there.
fn tail(recipe: &UniGrpoRecipe, eos: i64) -> TailPad {
    let g = &recipe.grpo;
    TailPad {
        pad_id: eos,
        post_num: if g.estimator == Estimator::D1 {
            g.post_num.max(1)
        } else {
            g.post_num
        },
    }
}

/// Phase 3: the noised row of every (inner iteration, completion). Completion `j` draws
/// from `derive_seed(seed, NOISE, step, j)`: the μ mask ratios first (structured estimator),
/// then per iteration its mask (or, for d1, a fresh prompt mask). The number of non-empty
/// groups per iteration is summed over ranks.
///
/// A t2i completion (`tasks[i].kind: t2i`) is noised with the t2i conventions of SFT
/// ([`noise_image`]): the ratio of the schedule is `τ`, `γ(τ)` of the task's
/// `mask_schedule` the share of its `N` image tokens masked (at least one), chosen by `N`
/// uniform scores per iteration; the masked image tokens are scored.
///
/// # Errors
/// Inconsistent rows; collective errors.
pub fn noise<B: AutodiffBackend>(
    recipe: &UniGrpoRecipe,
    session: &mut Session<'_, B>,
    rollouts: &[Rollout],
    adv: &GroupAdvantages,
    groups: usize,
) -> Result<Noised, TrainError> {
    noise_tasks(recipe, &recipe.task_specs(), session, rollouts, adv, groups)
}

/// [`noise`] with the resolved tasks of the recipe (`specs[r.task]` of each rollout).
///
/// # Errors
/// As [`noise`].
pub fn noise_tasks<B: AutodiffBackend>(
    recipe: &UniGrpoRecipe,
    specs: &[TaskSpec],
    session: &mut Session<'_, B>,
    rollouts: &[Rollout],
    adv: &GroupAdvantages,
    groups: usize,
) -> Result<Noised, TrainError> {
    let grpo = &recipe.grpo;
    let (g, mu) = (grpo.num_generations, grpo.num_iterations);
    let layout = *session.tok.layout();
    let (eos, mask_id) = (i64::from(layout.eos_id), i64::from(layout.mask_id));
    let tail = tail(recipe, eos);
    let d1 = grpo.estimator == Estimator::D1;
    let mask_sched = grpo.mask_schedule();
    let step = session.state.step;
    let mut rngs: Vec<StdRng> = rollouts
        .iter()
        .map(|r| {
            StdRng::seed_from_u64(derive_seed(
                recipe.run.seed,
                purpose::NOISE,
                step,
                r.index as u64,
            ))
        })
        .collect();
    let ratios: Vec<Vec<f32>> = if d1 {
        vec![vec![1.0; mu]; rollouts.len()]
    } else {
        rngs.iter_mut()
            .map(|rng| {
                let u: Vec<f32> = (0..mask_sched.draws_needed(mu))
                    .map(|_| rng.random::<f32>())
                    .collect();
                mask_sched.ratios(mu, &u)
            })
            .collect::<Result<_, _>>()?
    };
    let ipad = i64::from(layout.ipad_id);
    let hidden_pad: Vec<Option<i64>> = (0..groups)
        .map(|grp| {
            let spec = &specs[rollouts[grp * g].task];
            (spec.kind == TaskKind::T2i && spec.t2i_attention == T2iPadAttention::Hard)
                .then_some(ipad)
        })
        .collect();
    let mut batches: Vec<Vec<GrpoBatch>> = vec![Vec::new(); mu];
    let mut ratio_sum = [0f32; 2];
    for (n, iter_batches) in batches.iter_mut().enumerate() {
        for grp in 0..groups {
            let lp = rollouts[grp * g].prompt_len;
            let mut b = GrpoBatch::new(rollouts[grp * g].row.len());
            for j in grp * g..(grp + 1) * g {
                let r = &rollouts[j];
                let gen_len = r.completion_len;
                let spec = &specs[r.task];
                let row = if spec.kind == TaskKind::T2i {
                    let draw = ImageMaskDraw {
                        tau: ratios[j][n],
                        scores: (0..gen_len).map(|_| rngs[j].random::<f32>()).collect(),
                    };
                    noise_image(&r.row, lp, &draw, &spec.mask_schedule, mask_id)?
                } else if d1 {
                    // d1: a fresh prompt mask per inner iteration (d1's per-iteration mask
                    // seeds), the completion fully masked
                    let u: Vec<f32> = (0..lp).map(|_| rngs[j].random::<f32>()).collect();
                    noise_d1(&r.row, lp, &u, grpo.p_mask_prompt, mask_id, Some(tail))?
                } else {
                    let u: Vec<f32> = (0..gen_len).map(|_| rngs[j].random::<f32>()).collect();
                    let m = completion_mask(ratios[j][n], &u);
                    noise_completion(&r.row, lp, &m, mask_id, Some(tail))?
                };
                ratio_sum[0] += ratios[j][n];
                ratio_sum[1] += 1.0;
                b.push(row, &r.row, adv.advantages[r.index], r.index)?;
            }
            iter_batches.push(b);
        }
    }
    let local: Vec<f32> = batches
        .iter()
        .map(|bs| bs.iter().filter(|b| b.rows() > 0).count() as f32)
        .collect();
    let nonempty: Vec<usize> = if session.worker.world() > 1 {
        session
            .worker
            .reducer
            .sum_labeled("non-empty group count", &local, false)?
            .into_iter()
            .map(|x| x.round() as usize)
            .collect()
    } else {
        local.iter().map(|&x| x as usize).collect()
    };
    Ok(Noised {
        batches,
        nonempty,
        ratio_sum,
        hidden_pad,
    })
}

/// Per-token log-probs `[rows · scored positions]` of `b`'s targets under `m`, without graph.
fn logprobs<IB: Backend>(
    m: &LladaModel<IB>,
    b: &GrpoBatch,
    hidden_pad: Option<i64>,
    chunk_rows: usize,
    device: &IB::Device,
) -> Result<Vec<f32>, TrainError> {
    if b.rows() == 0 {
        return Ok(vec![]);
    }
    Ok(b.logprobs(scores(m, b, hidden_pad, chunk_rows, device))?
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32"))
}

/// The attention of `b`'s forward: full, or with the positions whose clean id is
/// `hidden_pad` (a t2i caption's `[iPAD]`, `t2i_attention: hard`) removed as keys
/// ([`Attention::KeyPadding`] `[rows, L]`).
fn attention<B: Backend>(
    b: &GrpoBatch,
    hidden_pad: Option<i64>,
    device: &B::Device,
) -> Attention<B> {
    match hidden_pad {
        None => Attention::Full,
        Some(pad) => {
            let keep: Vec<bool> = b.labels.iter().map(|&x| x != pad).collect();
            Attention::KeyPadding(Tensor::from_data(
                TensorData::new(keep, [b.rows(), b.seq_len]),
                device,
            ))
        }
    }
}

/// The model's [`Scores::Hidden`] on `b`'s input: the head is applied only at the scored
/// completion tokens, `chunk_rows` rows at a time; full logits when `chunk_rows` is 0.
/// `hidden_pad`: as [`attention`].
fn scores<B: Backend, M: HiddenStates<B>>(
    m: &M,
    b: &GrpoBatch,
    hidden_pad: Option<i64>,
    chunk_rows: usize,
    device: &B::Device,
) -> Scores<B> {
    let att = attention(b, hidden_pad, device);
    if chunk_rows == 0 {
        return Scores::Logits(m.logits(b.input::<B>(device), &att));
    }
    Scores::Hidden {
        hidden: m.hidden(b.input::<B>(device), &att),
        head: m.lm_head(),
        chunk_rows,
    }
}

/// Old-policy and reference log-probs of every noised batch: `[μ][group]`.
pub struct OldLogprobs {
    /// Pre-update policy.
    pub old: Vec<Vec<Vec<f32>>>,
    /// Reference model (`kl_reference: reference_model`), else `None`.
    pub reference: Vec<Vec<Option<Vec<f32>>>>,
}

/// Phase 4: log-probs of every noised row under the pre-update weights (and the reference
/// model), on the same inputs the updates will see.
///
/// # Errors
/// Inconsistent batches.
pub fn old_logprobs<B: AutodiffBackend>(
    model: &LladaModel<B>,
    reference: Option<&LladaModel<B::InnerBackend>>,
    noised: &Noised,
    chunk_rows: usize,
    device: &B::Device,
) -> Result<OldLogprobs, TrainError> {
    // untracked autodiff tensors rather than `model.valid()`: the inner backend's softmax
    // rounds differently, and the first of the μ updates must see a ratio of exactly 1, as
    // upstream does (docs/activation-checkpointing.md)
    let old_model = model.clone().no_grad();
    let mut out = OldLogprobs {
        old: vec![],
        reference: vec![],
    };
    for iter_batches in &noised.batches {
        let mut o = vec![];
        let mut r = vec![];
        for (b, &pad) in iter_batches.iter().zip(&noised.hidden_pad) {
            o.push(logprobs(&old_model, b, pad, chunk_rows, device)?);
            r.push(match reference {
                Some(rm) => Some(logprobs(rm, b, pad, chunk_rows, device)?),
                None => None,
            });
        }
        out.old.push(o);
        out.reference.push(r);
    }
    Ok(out)
}

/// Step statistics of the μ updates, summed over this rank's groups with each group's share
/// of the step: `[loss, policy loss, kl loss, kl, clip low, clip high, clip region, rows]`.
pub type UpdateSums = [f32; 8];

/// Phase 5: μ optimizer updates, update `n` on the rows of iteration `n` (the same masks as
/// the old-policy log-probs). Each group's loss is scaled by `world / non-empty groups`
/// ([`crate::shard::group_loss_scale`]). Returns the model, the statistics, the mean
/// gradient norm over the updates and the last learning rate.
///
/// # Errors
/// Loss input errors; collective errors.
#[allow(clippy::too_many_arguments)]
pub fn update<B: AutodiffBackend>(
    recipe: &UniGrpoRecipe,
    session: &mut Session<'_, B>,
    mut model: LladaModel<B>,
    noised: &Noised,
    old: &OldLogprobs,
    schedule: &Schedule,
) -> Result<(LladaModel<B>, UpdateSums, f32, f64), TrainError> {
    let mu = recipe.grpo.num_iterations;
    let loss_cfg = recipe.grpo.loss_config();
    let device = session.device();
    let world = session.worker.world();
    let step = session.state.step;
    let mut sums = [0f32; 8];
    let (mut gn_sum, mut lr) = (0f32, 0.0);
    for n in 0..mu {
        let nonempty = noised.nonempty[n];
        if nonempty == 0 {
            continue;
        }
        let mut acc: Option<GradientsParams> = None;
        let mut local_loss = 0f32;
        for (k, b) in noised.batches[n].iter().enumerate() {
            if b.rows() == 0 {
                continue;
            }
            let refs = old.reference[n][k].as_deref();
            let recompute = recipe
                .train
                .activation_checkpointing
                .then(|| Recompute::new(&model));
            let chunk = recipe.grpo.ce_chunk_rows;
            let pad = noised.hidden_pad[k];
            let scores = match &recompute {
                Some(r) => scores(r, b, pad, chunk, &device),
                None => scores(&model, b, pad, chunk, &device),
            };
            let out = unigrpo_loss_scores(scores, b, &old.old[n][k], refs, &loss_cfg)?;
            let scale = 1.0 / (nonempty as f32 * mu as f32);
            let l = out.loss.clone().into_scalar().elem::<f32>();
            local_loss += l;
            sums[0] += l * scale;
            sums[1] += out.policy_loss.clone().into_scalar().elem::<f32>() * scale;
            sums[2] += out.kl_loss.clone().into_scalar().elem::<f32>() * scale;
            sums[3] += out.stats.kl_mean * scale;
            sums[4] += out.stats.clip_low * scale;
            sums[5] += out.stats.clip_high * scale;
            sums[6] += out.stats.clip_region * scale;
            sums[7] += out.stats.rows as f32;
            // × world: the mean over ranks of the shard gradients is the 1-device sum
            let loss = out.loss * crate::shard::group_loss_scale(world, nonempty);
            acc = Some(match recompute {
                Some(r) => accumulate_grads(&model, acc, r.backward(loss)),
                None => accumulate(&model, acc, loss),
            });
        }
        // a rank whose groups are all empty this iteration contributes zeros
        lr = schedule.lr(step * mu as u64 + n as u64);
        let gn;
        if session.test_injects_nonfinite() {
            local_loss = f32::NAN;
            sums[0] = f32::NAN;
        }
        (model, gn) = session.guarded_update(model, acc.unwrap_or_default(), lr, local_loss)?;
        gn_sum += gn / mu as f32;
    }
    Ok((model, sums, gn_sum, lr))
}
