//! UniGRPO phase 6: the step's metrics, with TRL `GRPOTrainer` names where one exists.

use burn::tensor::backend::AutodiffBackend;
use serde_json::json;

use super::rollout::Scored;
use crate::recipe::UniGrpoRecipe;
use crate::trainer::Session;

/// What one RL step did.
#[derive(Debug, Clone, PartialEq)]
pub struct GrpoStepReport {
    /// Steps completed (1-based).
    pub step: u64,
    /// Total steps.
    pub max_steps: u64,
    /// Mean total reward.
    pub reward: f32,
    /// Mean loss over the μ updates.
    pub loss: f32,
    /// Mean policy loss.
    pub policy_loss: f32,
    /// Mean KL loss.
    pub kl_loss: f32,
    /// Fraction of all-equal groups.
    pub frac_reward_zero_std: f32,
    /// Rollout seconds.
    pub rollout_s: f64,
    /// Update seconds (noising + old/reference log-probs + μ updates).
    pub update_s: f64,
    /// Old-policy and reference log-prob seconds (forward passes without graph).
    pub logprob_s: f64,
    /// Training forward + backward + optimizer seconds of the μ updates.
    pub backward_s: f64,
    /// The full metrics row written to `metrics.jsonl`.
    pub metrics: serde_json::Value,
}

/// Wall times of the phases of a step, seconds (rank 0's).
pub struct Times {
    /// Rollouts.
    pub rollout_s: f64,
    /// Noising + log-probs + updates.
    pub update_s: f64,
    /// Old-policy and reference log-probs.
    pub logprob_s: f64,
    /// The μ training forward + backward + optimizer steps.
    pub backward_s: f64,
    /// The rollout sampler's counters (rank 0's groups).
    pub rollout: super::rollout::RolloutCounters,
}

/// The update statistics of a step, combined over ranks.
pub struct StepStats {
    /// `[loss, policy loss, kl loss, kl, clip low, clip high, clip region, rows]`
    /// ([`super::update::UpdateSums`]).
    pub sums: [f32; 8],
    /// Sum and count of the mask ratios.
    pub ratio_sum: [f32; 2],
    /// Mean gradient norm (before clipping) over the μ updates.
    pub grad_norm: f32,
    /// The learning rate of the last update.
    pub lr: f64,
}

fn mean(x: &[f32]) -> f32 {
    x.iter().sum::<f32>() / x.len() as f32
}

/// The report and metrics row of the step just finished (`session.state.step`), over the
/// whole step (every rank's completions).
pub fn report<B: AutodiffBackend>(
    recipe: &UniGrpoRecipe,
    session: &Session<'_, B>,
    scored: &Scored,
    st: &StepStats,
    t: &Times,
) -> GrpoStepReport {
    let [
        loss,
        policy,
        kl_loss,
        kl,
        clip_low,
        clip_high,
        clip_region,
        rows,
    ] = st.sums;
    let (lens, breakdown, adv) = (&scored.lens, &scored.breakdown, &scored.adv);
    let reward = mean(&breakdown.total);
    let term: Vec<f32> = lens
        .iter()
        .zip(&scored.terminated)
        .filter(|(_, t)| **t)
        .map(|(l, _)| *l)
        .collect();
    let gen_tokens = scored.gen_tokens;
    let step = session.state.step;
    let mut row = json!({
        "step": step,
        "reward": reward,
        "reward_std": mean(&adv.group_std),
        "frac_reward_zero_std": adv.frac_zero_std(),
        "loss": loss,
        "policy_loss": policy,
        "kl_loss": kl_loss,
        "kl": kl,
        "clip_ratio/low_mean": clip_low,
        "clip_ratio/high_mean": clip_high,
        "clip_ratio/region_mean": clip_region,
        "grad_norm": st.grad_norm,
        "learning_rate": st.lr,
        "completions/mean_length": mean(lens),
        "completions/min_length": lens.iter().cloned().fold(f32::INFINITY, f32::min),
        "completions/max_length": lens.iter().cloned().fold(0.0, f32::max),
        "completions/mean_terminated_length": if term.is_empty() { 0.0 } else { mean(&term) },
        "completions/clipped_ratio": 1.0 - term.len() as f32 / lens.len() as f32,
        "num_train_rows": rows.round() as usize,
        "mask_ratio/mean": st.ratio_sum[0] / st.ratio_sum[1].max(1.0),
        "time/rollout_s": t.rollout_s,
        "time/update_s": t.update_s,
        "time/logprob_s": t.logprob_s,
        "time/backward_s": t.backward_s,
        // all ranks roll out at the same time: global tokens over rank 0's rollout time
        "rollout_tokens_per_s": gen_tokens as f64 / t.rollout_s.max(1e-9),
        // rollout sampler counters of rank 0's groups (rollout.cache, rollout.threshold)
        "rollout/nfe": t.rollout.nfe,
        "rollout/refreshes": t.rollout.refreshes,
        "rollout/cache_hits": t.rollout.cache_hits,
        "rollout/tokens_per_forward": t.rollout.tokens_per_forward(),
        // updates skipped for a NaN/inf loss or gradient norm (crate::guard)
        "nonfinite_steps": session.guard.total(),
    });
    for (k, name) in breakdown.names.iter().enumerate() {
        let (m, s) = match breakdown.stats(k) {
            Some(s) => (json!(s.mean), json!(s.std)),
            None => (serde_json::Value::Null, serde_json::Value::Null),
        };
        row[format!("rewards/{name}/mean")] = m;
        row[format!("rewards/{name}/std")] = s;
    }
    // per task (recipes with `tasks:`): the mean total reward and completion length of its
    // completions; the reward columns above are already `rewards/<task>/<fn>/…`
    for (t, spec) in recipe.tasks.iter().enumerate() {
        let name = spec
            .name
            .clone()
            .unwrap_or_else(|| spec.kind.as_str().into());
        let of = |v: &[f32]| -> Vec<f32> {
            v.iter()
                .zip(&scored.task)
                .filter(|(_, k)| **k == t)
                .map(|(x, _)| *x)
                .collect()
        };
        let (tot, len) = (of(&breakdown.total), of(lens));
        if !tot.is_empty() {
            row[format!("reward/{name}")] = json!(mean(&tot));
            row[format!("completions/{name}/mean_length")] = json!(mean(&len));
        }
    }
    let inapplicable = breakdown.inapplicable();
    if !inapplicable.is_empty() {
        row["rewards_inapplicable"] = json!(inapplicable);
        if session.lead() {
            tracing::warn!(
                "step {step}: reward(s) {inapplicable:?} returned None for every completion (check their fields/params)"
            );
        }
    }
    GrpoStepReport {
        step,
        max_steps: recipe.train.max_steps,
        reward,
        loss,
        policy_loss: policy,
        kl_loss,
        frac_reward_zero_std: adv.frac_zero_std(),
        rollout_s: t.rollout_s,
        update_s: t.update_s,
        logprob_s: t.logprob_s,
        backward_s: t.backward_s,
        metrics: row,
    }
}
