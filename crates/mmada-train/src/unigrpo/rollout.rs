//! UniGRPO phases 1–2: prompts, rollouts through the shared sampler, rewards gathered over
//! ranks and group advantages.

use std::path::Path;

use burn::tensor::backend::{AutodiffBackend, Backend};
use mmada_data::{Example, ExampleStream, TextTokenizer};
use mmada_diffusion::grpo::{GroupAdvantages, group_advantages};
use mmada_model::LladaModel;
use mmada_rewards::{RewardBreakdown, RewardInput, RewardSet};
use mmada_sampler::{GenerateConfig, SeededRng, generate_completions};

use super::purpose;
use crate::data::derive_seed;
use crate::dist::GradReducer;
use crate::error::TrainError;
use crate::recipe::{PromptsSection, UniGrpoRecipe, resolve_manifest};
use crate::run_dir::resolve;

/// Load the prompts of `prompts:` (examples with a question or messages).
///
/// # Errors
/// Manifest / reader errors naming the file and line; [`TrainError::Other`] when no example
/// has a question.
pub fn load_prompts(p: &PromptsSection, base: &Path) -> Result<Vec<Example>, TrainError> {
    let m = resolve_manifest(
        p.manifest.as_deref(),
        p.inline.as_ref(),
        p.path.as_deref(),
        base,
    )?;
    let root = p.data_root.as_ref().map(|r| resolve(base, r));
    let root = root.or_else(|| Some(base.to_path_buf()));
    let stream = ExampleStream::open(m, root.as_deref())?;
    let max = p.max_examples.unwrap_or(usize::MAX);
    let mut out = vec![];
    for ex in stream {
        let ex = ex?;
        if ex.question.is_some() || !ex.messages.is_empty() {
            out.push(ex);
        }
        if out.len() >= max {
            break;
        }
    }
    if out.is_empty() {
        return Err(TrainError::Other(
            "prompts: the source has no example with a question or messages".into(),
        ));
    }
    Ok(out)
}

/// The prompt text of an example: chat-templated (with the CoT instruction when
/// `prompts.cot`) or the raw question.
pub fn prompt_text(p: &PromptsSection, ex: &Example) -> String {
    match p.template.chat() {
        Some(t) => t
            .prompt_and_answer(ex, p.cot)
            .map(|(p, _)| p)
            .unwrap_or_default(),
        None => ex.question.clone().unwrap_or_default(),
    }
}

/// The example fields a reward function may read (`question`, `answer`, `reasoning`, `id`).
fn reward_fields(ex: &Example) -> serde_json::Map<String, serde_json::Value> {
    let mut f = serde_json::Map::new();
    for (k, v) in [
        ("question", &ex.question),
        ("answer", &ex.answer),
        ("reasoning", &ex.reasoning),
        ("id", &ex.id),
    ] {
        if let Some(v) = v {
            f.insert(k.into(), v.clone().into());
        }
    }
    f
}

/// One rolled-out completion.
pub struct Rollout {
    /// Global completion index in the step (`slot · G + r`), the same on any number of ranks.
    pub index: usize,
    /// Prompt length `Lp` (`<BOS>` + the prompt tokens, cut to `prompts.max_prompt_length`).
    pub prompt_len: usize,
    /// `[prompt | completion through its EOS / EOT | EOS …]`, length
    /// `Lp + max_completion_length`.
    pub row: Vec<i64>,
    /// What the reward functions see: the completion ids and text before the first EOS /
    /// EOT, and whether one was generated (`terminated`).
    pub input: RewardInput,
}

/// What the rollout phase needs besides the policy.
pub struct RolloutCtx<'a> {
    /// The recipe.
    pub recipe: &'a UniGrpoRecipe,
    /// The tokenizer.
    pub tok: &'a TextTokenizer,
    /// The sampler settings of `rollout:`.
    pub gen_cfg: &'a GenerateConfig,
    /// The prompt examples.
    pub examples: &'a [Example],
}

/// Sampler counters of a rollout phase (this rank's prompt groups), summed over its
/// [`generate_completions`] calls (one per group).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RolloutCounters {
    /// Denoiser calls.
    pub nfe: usize,
    /// Calls that refreshed the key/value cache (`rollout.cache`; 0 without one).
    pub refreshes: usize,
    /// Calls run against the cache.
    pub cache_hits: usize,
    /// Tokens committed, over all completions.
    pub committed: usize,
    /// Σ over calls of the rows decoded together (`G` per group call): the denominator of
    /// [`RolloutCounters::tokens_per_forward`].
    pub row_forwards: usize,
}

impl RolloutCounters {
    /// Tokens committed per completion per denoiser call (dInfer's TPF; `gen_length / steps`
    /// with the fixed schedule, more with `rollout.threshold`).
    pub fn tokens_per_forward(&self) -> f64 {
        self.committed as f64 / self.row_forwards.max(1) as f64
    }
}

/// [`roll_out_counted`] without the counters.
///
/// # Errors
/// Tokenizer and sampler errors.
pub fn roll_out<B: Backend>(
    ctx: &RolloutCtx<'_>,
    policy: &LladaModel<B>,
    slots: &[usize],
    cursor: usize,
    step: u64,
    device: &B::Device,
) -> Result<Vec<Rollout>, TrainError> {
    Ok(roll_out_counted(ctx, policy, slots, cursor, step, device)?.0)
}

/// Phase 1: sample `G` completions of each of this rank's prompt groups (`slots`, prompt
/// `cursor + slot` of the examples) with the policy, without graph, through the shared
/// generation layer ([`generate_completions`], as `mmada-infer generate`): a completion ends
/// at the first EOS or EOT. Group `slot` draws from `derive_seed(seed, ROLLOUT, step, slot)`.
/// The training row keeps the generated ids through the stop token (an EOT stays, as
/// generated) and pads with EOS. Returns the rollouts and the sampler's counters.
///
/// # Errors
/// Tokenizer and sampler errors.
pub fn roll_out_counted<B: Backend>(
    ctx: &RolloutCtx<'_>,
    policy: &LladaModel<B>,
    slots: &[usize],
    cursor: usize,
    step: u64,
    device: &B::Device,
) -> Result<(Vec<Rollout>, RolloutCounters), TrainError> {
    let mut counters = RolloutCounters::default();
    let (recipe, tok) = (ctx.recipe, ctx.tok);
    let layout = *tok.layout();
    let g = recipe.grpo.num_generations;
    let gen_len = recipe.grpo.max_completion_length;
    let mut rollouts: Vec<Rollout> = Vec::with_capacity(slots.len() * g);
    for &slot in slots {
        let ex = &ctx.examples[(cursor + slot) % ctx.examples.len()];
        let text = prompt_text(&recipe.prompts, ex);
        let ids = prompt_ids(tok, &text, recipe.prompts.max_prompt_length)?;
        let mut rng = SeededRng::new(derive_seed(
            recipe.run.seed,
            purpose::ROLLOUT,
            step,
            slot as u64,
        ));
        let out = generate_completions(
            policy,
            &vec![ids.clone(); g],
            ctx.gen_cfg,
            &[layout.eos_id, layout.eot_id],
            layout.pad_id,
            &mut rng,
            device,
        )?;
        counters.nfe += out.nfe;
        counters.refreshes += out.refreshes;
        counters.cache_hits += out.cache_hits;
        counters.committed += out.committed;
        counters.row_forwards += out.rows.len() * out.nfe;
        for (r, c) in out.rows.into_iter().enumerate() {
            let kept = if c.terminated {
                c.ids.len() + 1
            } else {
                gen_len
            };
            let mut row: Vec<i64> = ids.iter().map(|&x| i64::from(x)).collect();
            row.extend(c.generated[..kept].iter().map(|&x| i64::from(x)));
            row.resize(ids.len() + gen_len, i64::from(layout.eos_id));
            rollouts.push(Rollout {
                index: slot * g + r,
                prompt_len: ids.len(),
                row,
                input: RewardInput {
                    prompt: text.clone(),
                    completion: tok.decode(&c.ids)?,
                    completion_ids: c.ids,
                    terminated: c.terminated,
                    fields: reward_fields(ex),
                },
            });
        }
    }
    Ok((rollouts, counters))
}

/// `<BOS>` + the tokens of `text`, keeping the last `max_len` ids when longer (dLLM-RL
/// `max_prompt_len`).
///
/// # Errors
/// Tokenizer errors.
pub fn prompt_ids(tok: &TextTokenizer, text: &str, max_len: usize) -> Result<Vec<u32>, TrainError> {
    let mut ids = vec![tok.layout().bos_id];
    ids.extend(tok.encode(text)?);
    let maxp = max_len.max(1);
    if ids.len() > maxp {
        ids.drain(..ids.len() - maxp);
    }
    Ok(ids)
}

/// Per-completion values gathered over ranks: total reward, completion length, terminated,
/// then for every reward function its score and whether it applied.
const GATHER_FIXED: usize = 3;

/// The whole step's rewards (every rank's completions) and advantages.
pub struct Scored {
    /// Rewards per function and totals, for every completion of the step.
    pub breakdown: RewardBreakdown,
    /// Completion lengths.
    pub lens: Vec<f32>,
    /// Whether each completion terminated.
    pub terminated: Vec<bool>,
    /// Group advantages.
    pub adv: GroupAdvantages,
}

/// Phase 2: score this rank's completions, all-gather rewards, lengths and terminated flags
/// over ranks ([`crate::dist::gather_rows`]), and compute the group advantages of the whole
/// step (identical on every rank, so `scale_rewards: batch` is exact).
///
/// # Errors
/// Reward errors; collective errors of the gather.
pub fn score<B: AutodiffBackend>(
    recipe: &UniGrpoRecipe,
    rewards: &RewardSet,
    rollouts: &[Rollout],
    reducer: &mut dyn GradReducer<B>,
) -> Result<Scored, TrainError> {
    let g = recipe.grpo.num_generations;
    let n = recipe.grpo.prompts_per_step() * g;
    let inputs: Vec<RewardInput> = rollouts.iter().map(|r| r.input.clone()).collect();
    let local = rewards
        .score(&inputs)
        .map_err(|e| TrainError::Reward(e.to_string()))?;
    let n_rewards = local.names.len();
    let width = GATHER_FIXED + 2 * n_rewards;
    let rows: Vec<(usize, Vec<f32>)> = rollouts
        .iter()
        .enumerate()
        .map(|(j, r)| {
            let mut v = vec![
                local.total[j],
                r.input.completion_ids.len() as f32,
                f32::from(u8::from(r.input.terminated)),
            ];
            for k in 0..n_rewards {
                let s = local.per_reward[k][j];
                v.push(s.unwrap_or(0.0));
                v.push(f32::from(u8::from(s.is_some())));
            }
            (r.index, v)
        })
        .collect();
    let table = crate::dist::gather_rows(reducer, n, width, &rows)?;
    let at = |i: usize, c: usize| table[i * width + c];
    let breakdown = RewardBreakdown {
        names: local.names.clone(),
        weights: local.weights.clone(),
        per_reward: (0..n_rewards)
            .map(|k| {
                (0..n)
                    .map(|i| {
                        let c = GATHER_FIXED + 2 * k;
                        (at(i, c + 1) > 0.5).then(|| at(i, c))
                    })
                    .collect()
            })
            .collect(),
        total: (0..n).map(|i| at(i, 0)).collect(),
    };
    let adv = group_advantages(&breakdown.total, g, recipe.grpo.advantage_options())?;
    Ok(Scored {
        lens: (0..n).map(|i| at(i, 1)).collect(),
        terminated: (0..n).map(|i| at(i, 2) > 0.5).collect(),
        breakdown,
        adv,
    })
}
