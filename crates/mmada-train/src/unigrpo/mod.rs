//! The UniGRPO trainer (spec §5): rollouts through the shared sampler, pluggable rewards,
//! group advantages, structured noising of the completions, μ inner updates of the clipped
//! objective with a k3 KL penalty, atomic checkpoints with exact resume, TRL-named metrics.
//!
//! One step (paper Algorithm 1, dLLM-RL `rl.py`), one function per phase:
//! 1. [`rollout::roll_out`]: take `generation_batch_size / num_generations` prompts; sample
//!    `num_generations` completions of each with the shared sampler on `model.valid()` (no
//!    graph);
//! 2. [`rollout::score`]: score them with the recipe's `reward_funcs` (weighted sum) → group
//!    advantages;
//! 3. [`update::noise`]: for each inner iteration `n = 1..μ` and completion: a mask ratio
//!    (Algorithm 1 uniformly spaced, or dLLM-RL `U[lower_p, upper_p]`), a random mask of the
//!    completion, the noised row;
//! 4. [`update::old_logprobs`]: old-policy log-probs of every noised row with the pre-update
//!    weights (and reference log-probs when `kl_reference: reference_model`), without graph;
//! 5. [`update::update`]: μ optimizer updates, update `n` on the rows of iteration `n` (the
//!    same masks for old and new policy);
//! 6. [`metrics`]: the TRL-named metrics row, then the shared step end
//!    ([`crate::trainer::Session`]).
//!
//! `grpo.estimator: d1` replaces step 3 by the d1 one-step estimator (d1
//! `diffu-grpo/diffu_grpo_trainer.py`: completion fully masked, prompt tokens masked with
//! probability `p_mask_prompt`, [`mmada_diffusion::grpo::noise_d1`]).
//!
//! Metrics go to `metrics.jsonl` and, with `logging.wandb`, to wandb through the path SFT uses
//! ([`crate::wandb_log`]); the step time is split into `time/rollout_s`, `time/logprob_s`
//! (old-policy / reference forward passes) and `time/backward_s` (μ training forward +
//! backward + optimizer steps), with `time/update_s` = noising + log-probs + updates.

use std::path::PathBuf;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use mmada_model::LladaModel;
use mmada_rewards::{RewardRegistry, RewardSet};
use mmada_sampler::GenerateConfig;
use serde_json::json;

use crate::dist::Worker;
use crate::schedule::Schedule;
use crate::trainer::{Combine, RunOptions, Session, TrainLoop, TrainRecipe};

pub mod metrics;
pub mod rollout;
pub mod update;

pub use crate::error::TrainError;
pub use crate::recipe::{
    GrpoSection, GrpoTrainSection, PromptsSection, TaskKind, TaskSection, UniGrpoRecipe,
};
pub use crate::trainer::Resume;
pub use metrics::GrpoStepReport;

/// Run options outside the recipe (see [`RunOptions`]).
pub type UniGrpoOptions = RunOptions;

/// Seed purposes of the UniGRPO streams (see [`crate::data::derive_seed`]).
pub mod purpose {
    /// Rollout sampling (index = prompt slot in the step).
    pub const ROLLOUT: u64 = 32;
    /// Completion noising (index = completion in the step).
    pub const NOISE: u64 = 33;
}

crate::trainer::impl_train_recipe!(UniGrpoRecipe);

impl UniGrpoRecipe {
    /// The rollout sampler config ([`UniGrpoRecipe::rollout_section`] with the tokenizer's
    /// ids; sampled ids restricted to the tokenizer, at most `embedding_size`, unless
    /// `rollout.full_vocab` or `rollout.sample_vocab` say otherwise), the same conversion
    /// `mmada-infer` makes of its `sampling:` section.
    ///
    /// # Errors
    /// [`TrainError::Rollout`] naming the key.
    pub fn generate_config(
        &self,
        tok: &mmada_data::TextTokenizer,
        embedding_size: usize,
    ) -> Result<GenerateConfig, TrainError> {
        let vocab = tok.len().min(embedding_size);
        Ok(self.rollout_section().to_config(tok.layout(), vocab)?)
    }
}

/// Result of a UniGRPO run ([`UniGrpo`]).
#[derive(Debug, Clone)]
pub struct UniGrpoOutcome {
    /// Run directory.
    pub run_dir: PathBuf,
    /// Steps completed.
    pub final_step: u64,
    /// Newest checkpoint.
    pub last_checkpoint: Option<PathBuf>,
    /// Mean reward per step of this invocation.
    pub rewards: Vec<f32>,
    /// Mean loss per step (all steps of the run, restored on resume).
    pub losses: Vec<f32>,
    /// Whether a stop request ended the run.
    pub interrupted: bool,
}

/// The UniGRPO loop: [`TrainLoop::run`] on one device, [`TrainLoop::run_dp`] data-parallel
/// (see [`crate::dist`] for ranks, reducers and launch, and [`crate::shard`] for the group
/// assignment).
///
/// * **Rollouts.** `grpo.generation_batch_size` is the *global* number of completions per
///   step (TRL's meaning). Prompt group `k` (slot `k` of the step, its `G` completions) is
///   rolled out, scored and noised by rank `k mod world`, so a group never straddles devices;
///   with `generation_batch_size / G` a multiple of the world every rank gets the same number
///   of groups (otherwise some ranks idle during one group's rollout, and with fewer groups
///   than ranks some ranks roll out nothing at all while still holding a replica and taking
///   part in every all-reduce: correct, but wasted devices).
/// * **Advantages.** Rewards (totals and per-function scores) and completion lengths are then
///   all-gathered ([`crate::dist::gather_rows`]) so every rank computes the advantages of the
///   whole batch, which keeps `scale_rewards: batch` exact, and rank 0 logs global metrics.
/// * **Updates.** Each rank's group losses are scaled by `world / non-empty groups of the whole
///   step` (the number of non-empty groups is summed over ranks), so the mean all-reduce of
///   the gradients is exactly the 1-device gradient; clipping and the AdamW step follow on
///   identical gradients, so the replicas stay identical (checked every `dist.check_every`
///   steps).
/// * Every seed is indexed by the global prompt slot / completion index, so a run on `N`
///   devices samples, noises and trains exactly like the same recipe on 1 device (up to
///   float summation order).
#[derive(Debug, Clone, Copy)]
pub struct UniGrpo;

impl TrainLoop for UniGrpo {
    type Recipe = UniGrpoRecipe;
    type Report = GrpoStepReport;
    type Outcome = UniGrpoOutcome;

    fn run_rank<B: AutodiffBackend>(
        recipe: &UniGrpoRecipe,
        worker: Worker<B>,
        opts: &RunOptions,
        on_step: &mut dyn FnMut(&GrpoStepReport),
    ) -> Result<UniGrpoOutcome, TrainError> {
        // rewards and prompts first: a bad reward or prompt file fails before the model loads
        let specs = recipe.task_specs();
        let mut loaded = vec![];
        for spec in &specs {
            let rewards: RewardSet = RewardRegistry::with_builtins()
                .build(&spec.reward_key, &spec.reward_funcs)
                .map_err(|e| TrainError::Other(e.to_string()))?;
            let key = if spec.key.is_empty() {
                "prompts".to_string()
            } else {
                format!("{}.prompts", spec.key)
            };
            let examples =
                rollout::load_task_prompts(&spec.prompts, spec.kind, &key, &opts.base_dir)?;
            loaded.push((rewards, examples));
        }
        let (mut s, mut model) = Session::open(worker, recipe.common(), opts)?;
        let device = s.device();
        let images = specs.iter().any(|t| t.kind != TaskKind::Text);
        let coder = if images {
            crate::data::load_image_coder::<B::InnerBackend>(
                recipe.image_tokenizer.as_ref(),
                &opts.base_dir,
                &device,
            )?
        } else {
            None
        };
        let (tasks, grid) = rollout::build_tasks(
            recipe,
            &s.tok,
            s.cfg.embedding_size,
            s.cfg.codebook_size,
            loaded,
            coder.as_ref(),
            &opts.base_dir,
        )?;
        for t in &tasks {
            // <BOS> + the longest prompt + the completion (mmu adds the image block)
            let canvas = 1 + t.spec.prompts.max_prompt_length + t.spec.max_completion_length;
            if t.spec.kind != TaskKind::T2i && canvas > s.cfg.max_sequence_length {
                tracing::warn!(
                    task = %t.spec.name,
                    max_prompt_length = t.spec.prompts.max_prompt_length,
                    max_completion_length = t.spec.max_completion_length,
                    max_sequence_length = s.cfg.max_sequence_length,
                    "rollouts of the longest prompts are longer than the model's max_sequence_length (RoPE extrapolates): lower prompts.max_prompt_length or grpo.max_completion_length"
                );
            }
        }
        let reward_sets: Vec<(&str, &RewardSet)> = tasks
            .iter()
            .map(|t| (t.spec.name.as_str(), &t.rewards))
            .collect();
        let mut reference = reference_model(recipe, &s, &model)?;
        s.begin(&model, recipe)?;
        let mu = recipe.grpo.num_iterations;
        let schedule = Schedule::new(
            &recipe.schedule,
            recipe.optimizer.lr,
            recipe.train.max_steps * mu as u64,
        );
        let prompts_per_step = recipe.grpo.prompts_per_step();
        let my_groups =
            crate::shard::groups_of_rank(prompts_per_step, s.worker.rank(), s.worker.world());
        let mut rewards_per_step = vec![];
        while s.state.step < recipe.train.max_steps {
            let step = s.state.step;
            let cursor = s
                .state
                .extra
                .get("prompt_cursor")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0) as usize;
            // per-task prompt cursors (`tasks:`); the single task's is `prompt_cursor`
            let cursors: Vec<usize> = match s.state.extra.get("task_cursors") {
                Some(serde_json::Value::Array(v)) if v.len() == tasks.len() => {
                    v.iter().map(|x| x.as_u64().unwrap_or(0) as usize).collect()
                }
                _ if recipe.tasks.is_empty() => vec![cursor],
                _ => vec![0; tasks.len()],
            };
            let t_roll = Instant::now();
            let ctx = rollout::TasksCtx {
                recipe,
                tok: &s.tok,
                tasks: &tasks,
                coder: coder.as_ref(),
                grid,
            };
            let (rollouts, counters) =
                rollout::roll_out_tasks(&ctx, &model.valid(), &my_groups, &cursors, step, &device)?;
            let rollout_s = t_roll.elapsed().as_secs_f64();
            let scored =
                rollout::score_tasks(recipe, &reward_sets, &rollouts, s.worker.reducer.as_mut())?;
            let t_upd = Instant::now();
            let noised = update::noise_tasks(
                recipe,
                &specs,
                &mut s,
                &rollouts,
                &scored.adv,
                my_groups.len(),
            )?;
            let t_lp = Instant::now();
            let chunk = recipe.grpo.ce_chunk_rows;
            let old = update::old_logprobs(&model, reference.as_ref(), &noised, chunk, &device)?;
            let logprob_s = t_lp.elapsed().as_secs_f64();
            let t_bwd = Instant::now();
            let (updated, sums, grad_norm, lr) =
                update::update(recipe, &mut s, model, &noised, &old, &schedule)?;
            model = updated;
            let times = metrics::Times {
                rollout_s,
                update_s: t_upd.elapsed().as_secs_f64(),
                logprob_s,
                backward_s: t_bwd.elapsed().as_secs_f64(),
                rollout: counters,
            };
            let sync_every = recipe.grpo.ref_model_sync_steps;
            if sync_every > 0 && (step + 1).is_multiple_of(sync_every) && reference.is_some() {
                reference = Some(model.valid());
            }
            let mut v = sums.to_vec();
            v.extend_from_slice(&noised.ratio_sum);
            let stop = s.sync(&model, &mut v, Combine::Sum)?;
            s.state.losses.push(v[0]);
            s.state
                .extra
                .insert("prompt_cursor".into(), json!(cursor + prompts_per_step));
            if !recipe.tasks.is_empty() {
                let next: Vec<usize> = cursors
                    .iter()
                    .zip(&tasks)
                    .map(|(c, t)| c + t.spec.groups)
                    .collect();
                s.state.extra.insert("task_cursors".into(), json!(next));
            }
            let step_stats = metrics::StepStats {
                sums: v[..8].try_into().expect("8 sums"),
                ratio_sum: [v[8], v[9]],
                grad_norm,
                lr,
            };
            let report = metrics::report(recipe, &s, &scored, &step_stats, &times);
            if s.log_due(recipe.train.log_every) {
                s.log(&report.metrics)?;
            }
            rewards_per_step.push(report.reward);
            on_step(&report);
            if s.finish_step(&model, reference.as_ref(), stop, false)? {
                break;
            }
        }
        let final_loss = s.state.losses.last().map_or(f64::NAN, |l| f64::from(*l));
        let final_reward = rewards_per_step.last().map_or(f64::NAN, |r| f64::from(*r));
        let end = s.end(
            &model,
            &[("final_loss", final_loss), ("final_reward", final_reward)],
        )?;
        Ok(UniGrpoOutcome {
            run_dir: end.run_dir,
            final_step: end.state.step,
            last_checkpoint: end.last_checkpoint,
            rewards: rewards_per_step,
            losses: end.state.losses,
            interrupted: end.interrupted,
        })
    }
}

/// The frozen reference model of `kl_reference: reference_model` (β > 0): the resumed
/// checkpoint's `reference/`, else the initial policy; under LoRA the base model (the
/// policy with its adapters off).
fn reference_model<B: AutodiffBackend>(
    recipe: &UniGrpoRecipe,
    s: &Session<'_, B>,
    model: &LladaModel<B>,
) -> Result<Option<LladaModel<B::InnerBackend>>, TrainError> {
    if !recipe.grpo.uses_reference_model() {
        return Ok(None);
    }
    let compute = recipe.train.mixed_precision.compute_dtype();
    if let Some(lora) = &recipe.lora {
        // LoRA: the base with the adapters off, sharing the frozen base tensors (no copy)
        let mut reference = model.valid().without_lora();
        if s.resumed_from.is_some() && !lora.modules_to_save.is_empty() {
            // the modules to save are trained in the policy: the reference keeps the base's
            // (PEFT's `original_module`), rebuilt from the base checkpoint or preset (a
            // fresh run's reference holds them from its start)
            let base = s.base_model()?.valid();
            for m in &lora.modules_to_save {
                match m.as_str() {
                    "wte" => reference.wte = base.wte.clone(),
                    "ln_f" => reference.ln_f = base.ln_f.clone(),
                    "ff_out" => reference.ff_out = base.ff_out.clone(),
                    other => unreachable!("lora.modules_to_save `{other}` passed validation"),
                }
            }
        }
        return Ok(Some(reference.with_compute_dtype(compute)));
    }
    Ok(Some(match &s.resumed_from {
        Some(dir) => {
            let dtype = recipe.model.dtype.float();
            mmada_model::load_checkpoint::<B::InnerBackend>(
                &dir.join("reference"),
                &s.device(),
                dtype,
            )?
            .1
            .with_compute_dtype(compute)
        }
        None => model.valid().with_compute_dtype(compute),
    }))
}
