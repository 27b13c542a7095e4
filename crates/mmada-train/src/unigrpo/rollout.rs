//! UniGRPO phases 1–2: prompts, rollouts through the shared sampler, rewards gathered over
//! ranks and group advantages.

use std::path::Path;

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use mmada_data::manifest::Manifest;
use mmada_data::{Example, ExampleStream, TextTokenizer};
use mmada_diffusion::grpo::{GroupAdvantages, group_advantages};
use mmada_model::LladaModel;
use mmada_rewards::{RewardBreakdown, RewardInput, RewardSet};
use mmada_sampler::{GenerateConfig, SeededRng, generate};

use super::purpose;
use crate::data::derive_seed;
use crate::dist::GradReducer;
use crate::error::TrainError;
use crate::recipe::{PromptsSection, UniGrpoRecipe};
use crate::run_dir::resolve;

/// Load the prompts of `prompts:` (examples with a question or messages).
///
/// # Errors
/// Manifest / reader errors naming the file and line; [`TrainError::Other`] when no example
/// has a question.
pub fn load_prompts(p: &PromptsSection, base: &Path) -> Result<Vec<Example>, TrainError> {
    let mut m = match (&p.manifest, &p.inline) {
        (Some(path), _) => Manifest::from_file(&resolve(base, path))?,
        (None, Some(m)) => m.clone(),
        (None, None) => unreachable!("validated"),
    };
    if let Some(path) = &p.path {
        m.source.path = Some(path.clone());
        m.source.hf_repo = None;
    }
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
    /// `<BOS>` + the prompt tokens (cut to `prompts.max_prompt_length`).
    pub prompt_ids: Vec<i64>,
    /// `[prompt | completion up to EOS | EOS …]`, length `Lp + max_completion_length`.
    pub row: Vec<i64>,
    /// Completion tokens before the first EOS.
    pub completion_len: usize,
    /// Whether the completion ended (an EOS was generated).
    pub terminated: bool,
    /// What the reward functions see.
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

/// Phase 1: sample `G` completions of each of this rank's prompt groups (`slots`, prompt
/// `cursor + slot` of the examples) with the policy, without graph; group `slot` draws from
/// `derive_seed(seed, ROLLOUT, step, slot)`.
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
    let (recipe, tok) = (ctx.recipe, ctx.tok);
    let layout = *tok.layout();
    let g = recipe.grpo.num_generations;
    let gen_len = recipe.grpo.max_completion_length;
    let eos = i64::from(layout.eos_id);
    let mut rollouts: Vec<Rollout> = Vec::with_capacity(slots.len() * g);
    for &slot in slots {
        let ex = &ctx.examples[(cursor + slot) % ctx.examples.len()];
        let text = prompt_text(&recipe.prompts, ex);
        let mut ids: Vec<i64> = vec![i64::from(layout.bos_id)];
        ids.extend(tok.encode(&text)?.into_iter().map(i64::from));
        let maxp = recipe.prompts.max_prompt_length.max(1);
        if ids.len() > maxp {
            ids = ids[ids.len() - maxp..].to_vec();
        }
        let lp = ids.len();
        let rep: Vec<i32> = (0..g).flat_map(|_| ids.iter().map(|&x| x as i32)).collect();
        let prompt = Tensor::<B, 2, Int>::from_data(TensorData::new(rep, [g, lp]), device);
        let mut rng = SeededRng::new(derive_seed(
            recipe.run.seed,
            purpose::ROLLOUT,
            step,
            slot as u64,
        ));
        let out = generate(policy, prompt, None, ctx.gen_cfg, &mut rng, false)?;
        let canvas: Vec<i64> = out
            .ids
            .into_data()
            .convert::<i64>()
            .to_vec::<i64>()
            .expect("int tensor");
        for r in 0..g {
            let comp = &canvas[r * (lp + gen_len) + lp..(r + 1) * (lp + gen_len)];
            let end = comp.iter().position(|&x| x == eos);
            let clen = end.unwrap_or(gen_len);
            let mut row = ids.clone();
            row.extend_from_slice(&comp[..clen]);
            row.resize(lp + gen_len, eos);
            let cids: Vec<u32> = comp[..clen].iter().map(|&x| x as u32).collect();
            let completion = tok.decode(&cids)?;
            rollouts.push(Rollout {
                index: slot * g + r,
                prompt_ids: ids.clone(),
                row,
                completion_len: clen,
                terminated: end.is_some(),
                input: RewardInput {
                    prompt: text.clone(),
                    completion,
                    completion_ids: cids,
                    terminated: end.is_some(),
                    fields: reward_fields(ex),
                },
            });
        }
    }
    Ok(rollouts)
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
                r.completion_len as f32,
                f32::from(u8::from(r.terminated)),
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
