//! UniGRPO phases 1–2: prompts, rollouts through the shared samplers (the block sampler for
//! `text` / `mmu` tasks, MaskGIT for `t2i` tasks), rewards gathered over ranks and group
//! advantages.

use std::path::Path;

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Bool, Int, Tensor, TensorData};
use mmada_data::{Example, ExampleStream, ImageRef, TextTokenizer};
use mmada_diffusion::grpo::{GroupAdvantages, group_advantages};
use mmada_model::LladaModel;
use mmada_rewards::{RewardBreakdown, RewardImage, RewardInput, RewardSet};
use mmada_sampler::{
    GenerateConfig, SeededRng, T2iConfig, T2iInputs, generate_completions, t2i_generate,
};

use super::purpose;
use crate::data::derive_seed;
use crate::dist::GradReducer;
use crate::error::TrainError;
use crate::recipe::{
    PromptsSection, T2iPadAttention, TaskKind, TaskSpec, UniGrpoRecipe, resolve_manifest,
};
use crate::run_dir::resolve;

/// Load the prompts of `prompts:` (examples with a question or messages).
///
/// # Errors
/// Manifest / reader errors naming the file and line; [`TrainError::Other`] when no example
/// has a question.
pub fn load_prompts(p: &PromptsSection, base: &Path) -> Result<Vec<Example>, TrainError> {
    load_task_prompts(p, TaskKind::Text, "prompts", base)
}

/// The caption of a t2i prompt example: `caption`, else `question`, else `text`.
pub fn caption_of(ex: &Example) -> Option<&str> {
    ex.caption
        .as_deref()
        .or(ex.question.as_deref())
        .or(ex.text.as_deref())
}

/// Load the prompts of a task (`key` names its `prompts:` in errors): `text` examples with a
/// question or messages, `mmu` ones that also have an image, `t2i` ones with a caption
/// ([`caption_of`]).
///
/// # Errors
/// Manifest / reader errors naming the file and line; [`TrainError::Other`] naming `key`
/// when no example qualifies.
pub fn load_task_prompts(
    p: &PromptsSection,
    kind: TaskKind,
    key: &str,
    base: &Path,
) -> Result<Vec<Example>, TrainError> {
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
        let text = ex.question.is_some() || !ex.messages.is_empty();
        let keep = match kind {
            TaskKind::Text => text,
            TaskKind::Mmu => text && ex.image.is_some(),
            TaskKind::T2i => caption_of(&ex).is_some(),
        };
        if keep {
            out.push(ex);
        }
        if out.len() >= max {
            break;
        }
    }
    if out.is_empty() {
        let need = match kind {
            TaskKind::Text => "a question or messages",
            TaskKind::Mmu => "a question (or messages) and an image",
            TaskKind::T2i => "a caption (fields `caption`, `question` or `text`)",
        };
        return Err(TrainError::Other(format!(
            "{key}: the source has no example with {need}"
        )));
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
    /// EOT, and whether one was generated (`terminated`); for a t2i rollout the image codes
    /// (`completion_ids`), the caption (`prompt`) and the decoded image (`image`).
    pub input: RewardInput,
    /// Index of the task in [`crate::recipe::UniGrpoRecipe::task_specs`] (0 for the
    /// single-task recipe).
    pub task: usize,
    /// Completion capacity: `max_completion_length` (text / mmu), the image tokens `N`
    /// (t2i: the completion is `row[prompt_len .. prompt_len + N]`, then `<|eoi|>`).
    pub completion_len: usize,
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
    let recipe = ctx.recipe;
    let mut rollouts: Vec<Rollout> = Vec::with_capacity(slots.len() * recipe.grpo.num_generations);
    for &slot in slots {
        let ex = &ctx.examples[(cursor + slot) % ctx.examples.len()];
        let g = TextGroup {
            prompts: &recipe.prompts,
            gen_cfg: ctx.gen_cfg,
            gen_len: recipe.grpo.max_completion_length,
            image: None,
            task: 0,
        };
        g.roll_out(
            recipe,
            ctx.tok,
            policy,
            ex,
            slot,
            step,
            device,
            &mut counters,
            &mut rollouts,
        )?;
    }
    Ok((rollouts, counters))
}

/// One text-completion group (`text` and `mmu` tasks): the prompt, the block sampler's
/// settings and the completion length.
struct TextGroup<'a> {
    prompts: &'a PromptsSection,
    gen_cfg: &'a GenerateConfig,
    gen_len: usize,
    /// `mmu`: the prompt image's codes, and the image the rewards see.
    image: Option<(&'a [u32], Option<&'a RewardImage>)>,
    task: usize,
}

impl TextGroup<'_> {
    /// `G` completions of `ex` through [`generate_completions`]; group `slot` draws from
    /// `derive_seed(seed, ROLLOUT, step, slot)`.
    #[allow(clippy::too_many_arguments)]
    fn roll_out<B: Backend>(
        &self,
        recipe: &UniGrpoRecipe,
        tok: &TextTokenizer,
        policy: &LladaModel<B>,
        ex: &Example,
        slot: usize,
        step: u64,
        device: &B::Device,
        counters: &mut RolloutCounters,
        rollouts: &mut Vec<Rollout>,
    ) -> Result<(), TrainError> {
        let layout = *tok.layout();
        let g = recipe.grpo.num_generations;
        let gen_len = self.gen_len;
        let text = prompt_text(self.prompts, ex);
        let mut ids = prompt_ids(tok, &text, self.prompts.max_prompt_length)?;
        if let Some((codes, _)) = self.image {
            // spec §2.4 d, inference form: <|mmu|> <|soi|> codes <|eoi|> + the chat prompt
            let text_ids = std::mem::take(&mut ids);
            ids = mmada_data::layout::mmu_generation_prompt(codes, &text_ids, &layout)?;
        }
        let mut rng = SeededRng::new(derive_seed(
            recipe.run.seed,
            purpose::ROLLOUT,
            step,
            slot as u64,
        ));
        let out = generate_completions(
            policy,
            &vec![ids.clone(); g],
            self.gen_cfg,
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
                    image: self.image.and_then(|(_, img)| img.cloned()),
                },
                task: self.task,
                completion_len: gen_len,
            });
        }
        Ok(())
    }
}

/// A task ready to roll out: its resolved settings, rewards, prompts and sampler.
pub struct Task {
    /// The resolved recipe entry.
    pub spec: TaskSpec,
    /// Its rewards.
    pub rewards: RewardSet,
    /// Its prompt examples (`mmu`: images replaced by their codes).
    pub examples: Vec<Example>,
    /// `mmu`: the prompt image each reward sees (preprocessed to the tokenizer's resolution),
    /// per example; empty otherwise.
    pub prompt_images: Vec<Option<RewardImage>>,
    /// `text` / `mmu`: the block sampler.
    pub gen_cfg: Option<GenerateConfig>,
    /// `t2i`: the MaskGIT sampler (`seq_len` = image tokens `N`).
    pub t2i: Option<T2iConfig>,
}

/// What the multi-task rollout phase needs besides the policy.
pub struct TasksCtx<'a, B: Backend> {
    /// The recipe.
    pub recipe: &'a UniGrpoRecipe,
    /// The tokenizer.
    pub tok: &'a TextTokenizer,
    /// The tasks, in recipe order.
    pub tasks: &'a [Task],
    /// The image tokenizer (decodes t2i completions), when the recipe has one.
    pub coder: Option<&'a mmada_vq::VqCoder<B>>,
    /// The latent grid of a t2i image (`image_tokenizer.resolution / 16` squared).
    pub grid: Option<mmada_vq::Grid>,
}

/// The task of group `slot` (slots are assigned in task order).
pub fn task_of_slot(tasks: &[Task], slot: usize) -> usize {
    tasks
        .iter()
        .position(|t| (t.spec.first_slot..t.spec.first_slot + t.spec.groups).contains(&slot))
        .unwrap_or(0)
}

/// Phase 1 for a recipe with tasks: group `slot` belongs to task `t` ([`task_of_slot`]) and
/// rolls out prompt `(cursors[t] + slot − first_slot) mod examples` of that task, `G`
/// completions, with the task's sampler; the seed of the group is
/// `derive_seed(seed, ROLLOUT, step, slot)` whatever its task, so ranks and resumes agree.
/// A group never mixes tasks.
///
/// * `text` / `mmu`: as [`roll_out_counted`] (`mmu`: the image codes lead the prompt).
/// * `t2i`: the t2i prompt of the caption (spec §2.4 c: `[iPAD]* <|t2i|> <BOS> caption <EOS>`,
///   `P + 1` tokens with `P = prompts.max_prompt_length`, `<|soi|>`, `N` masks, `<|eoi|>`),
///   `G` rows through [`t2i_generate`] (CFG with the empty caption when
///   `maskgit.guidance_scale > 0`; the task's `t2i_attention`: full attention by default, the
///   released checkpoints' regime, spec §3.3, or the `[iPAD]` padding hidden with `hard`, as
///   the update then sees it too); the sampled codes fill the image slot of the row and
///   are decoded by the image tokenizer into the reward input's image.
///
/// # Errors
/// Tokenizer, layout, sampler and image-tokenizer errors.
pub fn roll_out_tasks<B: Backend>(
    ctx: &TasksCtx<'_, B>,
    policy: &LladaModel<B>,
    slots: &[usize],
    cursors: &[usize],
    step: u64,
    device: &B::Device,
) -> Result<(Vec<Rollout>, RolloutCounters), TrainError> {
    let mut counters = RolloutCounters::default();
    let recipe = ctx.recipe;
    let mut rollouts = Vec::with_capacity(slots.len() * recipe.grpo.num_generations);
    for &slot in slots {
        let ti = task_of_slot(ctx.tasks, slot);
        let task = &ctx.tasks[ti];
        let k = (cursors[ti] + slot - task.spec.first_slot) % task.examples.len();
        let ex = &task.examples[k];
        match task.spec.kind {
            TaskKind::Text | TaskKind::Mmu => {
                let image = match (task.spec.kind, &ex.image) {
                    (TaskKind::Mmu, Some(ImageRef::Codes(c))) => Some((
                        c.as_slice(),
                        task.prompt_images.get(k).and_then(Option::as_ref),
                    )),
                    (TaskKind::Mmu, _) => {
                        return Err(TrainError::Other(format!(
                            "{}.prompts: example {k} has no image codes (give image_tokenizer.checkpoint to encode image files)",
                            task.spec.key
                        )));
                    }
                    _ => None,
                };
                let g = TextGroup {
                    prompts: &task.spec.prompts,
                    gen_cfg: task.gen_cfg.as_ref().expect("text task has a sampler"),
                    gen_len: task.spec.max_completion_length,
                    image,
                    task: ti,
                };
                g.roll_out(
                    recipe,
                    ctx.tok,
                    policy,
                    ex,
                    slot,
                    step,
                    device,
                    &mut counters,
                    &mut rollouts,
                )?;
            }
            TaskKind::T2i => {
                t2i_group(
                    ctx,
                    ti,
                    policy,
                    ex,
                    slot,
                    step,
                    device,
                    &mut counters,
                    &mut rollouts,
                )?;
            }
        }
    }
    Ok((rollouts, counters))
}

/// The t2i prompt ids of `caption` (empty + `drop` for the unconditional row), with the `n`
/// image positions set to the mask id: `[L]` with `L = P + 1 + 1 + n + 1`.
fn t2i_prompt(
    tok: &TextTokenizer,
    caption: &str,
    drop: bool,
    p: usize,
    n: usize,
) -> Result<Vec<i64>, TrainError> {
    let t = tok.layout();
    let ids = if drop { vec![] } else { tok.encode(caption)? };
    let s = mmada_data::layout::t2i_layout(&ids, &vec![0; n], p, drop, t)?;
    let img = s.ids.len() - n - 1;
    Ok(s.ids
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            if (img..img + n).contains(&i) {
                i64::from(t.mask_id)
            } else {
                i64::from(x)
            }
        })
        .collect())
}

/// One t2i group: `G` MaskGIT samples of the caption, decoded for the rewards.
#[allow(clippy::too_many_arguments)]
fn t2i_group<B: Backend>(
    ctx: &TasksCtx<'_, B>,
    ti: usize,
    policy: &LladaModel<B>,
    ex: &Example,
    slot: usize,
    step: u64,
    device: &B::Device,
    counters: &mut RolloutCounters,
    rollouts: &mut Vec<Rollout>,
) -> Result<(), TrainError> {
    let task = &ctx.tasks[ti];
    let cfg = task.t2i.as_ref().expect("t2i task has a MaskGIT config");
    let (coder, grid) = match (ctx.coder, ctx.grid) {
        (Some(c), Some(g)) => (c, g),
        _ => {
            return Err(TrainError::Other(
                "image_tokenizer.checkpoint: t2i tasks need the image tokenizer".into(),
            ));
        }
    };
    let g = ctx.recipe.grpo.num_generations;
    let n = cfg.seq_len;
    let p = task.spec.prompts.max_prompt_length;
    let caption = caption_of(ex).unwrap_or_default().to_string();
    let cond = t2i_prompt(ctx.tok, &caption, false, p, n)?;
    let l = cond.len();
    let batch = |row: &[i64]| {
        let v: Vec<i64> = (0..g).flat_map(|_| row.iter().copied()).collect();
        Tensor::<B, 2, Int>::from_data(TensorData::new(v, [g, l]), device)
    };
    // `t2i_attention: hard`: the `[iPAD]` padding hidden (the sampler's pairwise mask)
    let ipad = i64::from(ctx.tok.layout().ipad_id);
    let hard = task.spec.t2i_attention == T2iPadAttention::Hard;
    let pad_mask = |row: &[i64]| {
        hard.then(|| {
            let v: Vec<bool> = (0..g)
                .flat_map(|_| row.iter().map(|&x| x != ipad))
                .collect();
            Tensor::<B, 2, Bool>::from_data(TensorData::new(v, [g, l]), device)
        })
    };
    let mut inputs = T2iInputs::new(batch(&cond), pad_mask(&cond));
    if cfg.guidance_scale > 0.0 {
        let uncond = t2i_prompt(ctx.tok, "", true, p, n)?;
        inputs = inputs.with_uncond(batch(&uncond), pad_mask(&uncond));
    }
    let mut rng = SeededRng::new(derive_seed(
        ctx.recipe.run.seed,
        purpose::ROLLOUT,
        step,
        slot as u64,
    ));
    let out = t2i_generate(policy, inputs, cfg, &mut rng, false)?;
    let codes: Vec<i64> = out
        .codes
        .into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .map_err(|e| TrainError::Other(format!("reading t2i codes: {e:?}")))?;
    let k = cfg.codebook_size as i64;
    let rows: Vec<Vec<u32>> = codes
        .chunks(n)
        .map(|c| c.iter().map(|&x| x.clamp(0, k - 1) as u32).collect())
        .collect();
    let images = coder
        .decode_codes(&rows, grid)
        .map_err(|e| TrainError::Other(format!("image_tokenizer: decoding t2i codes: {e}")))?;
    counters.nfe += out.nfe;
    counters.committed += g * n;
    counters.row_forwards += g * out.nfe;
    let img0 = l - n - 1;
    let v0 = cfg.image_token_offset as i64;
    let mut fields = reward_fields(ex);
    fields.insert("caption".into(), caption.clone().into());
    for (r, (c, img)) in rows.into_iter().zip(images).enumerate() {
        let mut row = cond.clone();
        for (j, &code) in c.iter().enumerate() {
            row[img0 + j] = v0 + i64::from(code);
        }
        let (w, h) = img.dimensions();
        rollouts.push(Rollout {
            index: slot * g + r,
            prompt_len: img0,
            row,
            input: RewardInput {
                prompt: caption.clone(),
                completion: String::new(),
                completion_ids: c,
                terminated: true,
                fields: fields.clone(),
                image: Some(
                    RewardImage::new(w, h, img.into_raw())
                        .map_err(|e| TrainError::Reward(e.to_string()))?,
                ),
            },
            task: ti,
            completion_len: n,
        });
    }
    Ok(())
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
/// task, completion capacity, then for every reward column its score and whether it applied.
const GATHER_FIXED: usize = 5;

/// The whole step's rewards (every rank's completions) and advantages.
pub struct Scored {
    /// Rewards per column and totals, for every completion of the step. Columns are the
    /// tasks' reward functions in task order, named `<fn>` in a single-task recipe and
    /// `<task>/<fn>` with `tasks:` (a column is `None` for the completions of other tasks).
    pub breakdown: RewardBreakdown,
    /// Completion lengths.
    pub lens: Vec<f32>,
    /// Whether each completion terminated.
    pub terminated: Vec<bool>,
    /// The task of each completion.
    pub task: Vec<usize>,
    /// Σ completion capacities (generated tokens of the step).
    pub gen_tokens: usize,
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
    score_tasks(recipe, &[("", rewards)], rollouts, reducer)
}

/// [`score`] for several tasks: `sets[t]` = (task name, its rewards); each completion is
/// scored by its task's rewards only (its [`Rollout::task`]).
///
/// # Errors
/// Reward errors (naming the task); collective errors of the gather.
pub fn score_tasks<B: AutodiffBackend>(
    recipe: &UniGrpoRecipe,
    sets: &[(&str, &RewardSet)],
    rollouts: &[Rollout],
    reducer: &mut dyn GradReducer<B>,
) -> Result<Scored, TrainError> {
    let g = recipe.grpo.num_generations;
    let n = recipe.grpo.prompts_per_step() * g;
    // columns: every task's reward functions, in task order
    let mut names = vec![];
    let mut weights = vec![];
    let mut col0 = vec![];
    for (task, set) in sets {
        col0.push(names.len());
        for e in set.entries() {
            names.push(if task.is_empty() {
                e.name.clone()
            } else {
                format!("{task}/{}", e.name)
            });
            weights.push(e.weight);
        }
    }
    let n_cols = names.len();
    let width = GATHER_FIXED + 2 * n_cols;
    let mut rows: Vec<(usize, Vec<f32>)> = Vec::with_capacity(rollouts.len());
    for (t, (task, set)) in sets.iter().enumerate() {
        let mine: Vec<&Rollout> = rollouts.iter().filter(|r| r.task == t).collect();
        if mine.is_empty() {
            continue;
        }
        let inputs: Vec<RewardInput> = mine.iter().map(|r| r.input.clone()).collect();
        let local = set.score(&inputs).map_err(|e| {
            TrainError::Reward(if task.is_empty() {
                e.to_string()
            } else {
                format!("task `{task}`: {e}")
            })
        })?;
        for (j, r) in mine.iter().enumerate() {
            let mut v = vec![0f32; width];
            v[0] = local.total[j];
            v[1] = r.input.completion_ids.len() as f32;
            v[2] = f32::from(u8::from(r.input.terminated));
            v[3] = t as f32;
            v[4] = r.completion_len as f32;
            for k in 0..local.names.len() {
                let c = GATHER_FIXED + 2 * (col0[t] + k);
                let s = local.per_reward[k][j];
                v[c] = s.unwrap_or(0.0);
                v[c + 1] = f32::from(u8::from(s.is_some()));
            }
            rows.push((r.index, v));
        }
    }
    let table = crate::dist::gather_rows(reducer, n, width, &rows)?;
    let at = |i: usize, c: usize| table[i * width + c];
    let breakdown = RewardBreakdown {
        names,
        weights,
        per_reward: (0..n_cols)
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
    let task: Vec<usize> = (0..n).map(|i| at(i, 3).round() as usize).collect();
    let adv = task_advantages(&breakdown.total, &task, g, recipe.grpo.advantage_options())?;
    Ok(Scored {
        lens: (0..n).map(|i| at(i, 1)).collect(),
        terminated: (0..n).map(|i| at(i, 2) > 0.5).collect(),
        task,
        gen_tokens: (0..n).map(|i| at(i, 4).round() as usize).sum(),
        breakdown,
        adv,
    })
}

/// [`group_advantages`] of each task on its own completions (`task[i]` of completion `i`;
/// a group never mixes tasks, so its `G` rows are consecutive and share a task): with
/// `scale_rewards: batch` the std is the task's batch std — rewards of different tasks have
/// different scales (a 0/2 correctness reward, a 0..1 colour reward) and one std across them
/// would shrink the small-scale task's advantages. Group and no scaling are unchanged by the
/// split. Groups keep their step order in the result.
///
/// # Errors
/// Those of [`group_advantages`].
pub fn task_advantages(
    rewards: &[f32],
    task: &[usize],
    g: usize,
    opts: mmada_diffusion::grpo::AdvantageOptions,
) -> Result<GroupAdvantages, TrainError> {
    let n_tasks = task.iter().copied().max().map_or(0, |m| m + 1);
    if n_tasks <= 1 {
        return Ok(group_advantages(rewards, g, opts)?);
    }
    let n = rewards.len();
    let mut out = GroupAdvantages {
        advantages: vec![0.0; n],
        group_mean: vec![0.0; n / g],
        group_std: vec![0.0; n / g],
        zero_std: vec![false; n / g],
    };
    for t in 0..n_tasks {
        let groups: Vec<usize> = (0..n / g).filter(|&k| task[k * g] == t).collect();
        if groups.is_empty() {
            continue;
        }
        let r: Vec<f32> = groups
            .iter()
            .flat_map(|&k| rewards[k * g..(k + 1) * g].iter().copied())
            .collect();
        let a = group_advantages(&r, g, opts)?;
        for (j, &k) in groups.iter().enumerate() {
            out.advantages[k * g..(k + 1) * g].copy_from_slice(&a.advantages[j * g..(j + 1) * g]);
            out.group_mean[k] = a.group_mean[j];
            out.group_std[k] = a.group_std[j];
            out.zero_std[k] = a.zero_std[j];
        }
    }
    Ok(out)
}

/// An image coder borrowed by an [`mmada_data::ImageTokenizer`].
struct Borrowed<'a, C: mmada_data::ImageCoder>(&'a C);

impl<C: mmada_data::ImageCoder> mmada_data::ImageCoder for Borrowed<'_, C> {
    fn id(&self) -> String {
        self.0.id()
    }
    fn encode(
        &self,
        images: &[mmada_data::Pixels],
    ) -> Result<Vec<Vec<u32>>, Box<dyn std::error::Error + Send + Sync>> {
        self.0.encode(images)
    }
}

/// Builds the [`Task`]s of the recipe from the loaded `rewards` / `examples` (one per
/// [`TaskSpec`], in order): the samplers (ids of `tok`, sampled text ids restricted to
/// `embedding_size` as [`UniGrpoRecipe::generate_config`]), and for `mmu` the prompt images
/// encoded with `coder` (with `image_tokenizer.mmu_mode` at its `resolution`; the
/// `cache_dir` code cache is used) and kept, preprocessed, for the rewards. Returns the
/// tasks and the t2i latent grid.
///
/// # Errors
/// A sampler setting the model does not support, image files without `coder`, an image
/// code outside the model's codebook, a head too small for the image codes.
pub fn build_tasks<B: Backend>(
    recipe: &UniGrpoRecipe,
    tok: &TextTokenizer,
    embedding_size: usize,
    codebook_size: Option<usize>,
    loaded: Vec<(RewardSet, Vec<Example>)>,
    coder: Option<&mmada_vq::VqCoder<B>>,
    base: &Path,
) -> Result<(Vec<Task>, Option<mmada_vq::Grid>), TrainError> {
    let layout = *tok.layout();
    let vocab = tok.len().min(embedding_size);
    let section = recipe.image_tokenizer.clone().unwrap_or_default();
    let res = section.resolution as usize;
    let grid =
        match coder {
            Some(c) => Some(c.grid(res, res).map_err(|e| {
                TrainError::Other(format!("image_tokenizer.resolution: {res}: {e}"))
            })?),
            None => None,
        };
    let mut out = vec![];
    for (spec, (rewards, mut examples)) in recipe.task_specs().into_iter().zip(loaded) {
        let mut task = Task {
            rewards,
            examples: vec![],
            prompt_images: vec![],
            gen_cfg: None,
            t2i: None,
            spec,
        };
        let key = task.spec.key.clone();
        match task.spec.kind {
            TaskKind::Text | TaskKind::Mmu => {
                let cfg = task.spec.rollout.to_config(&layout, vocab).map_err(|e| {
                    TrainError::Other(format!(
                        "{}rollout: {e}",
                        if key.is_empty() {
                            String::new()
                        } else {
                            format!("{key}.")
                        }
                    ))
                })?;
                task.gen_cfg = Some(cfg);
            }
            TaskKind::T2i => {
                let grid = grid.ok_or_else(|| {
                    TrainError::Other(format!(
                        "{key}: a t2i task needs image_tokenizer.checkpoint (its images are decoded for the rewards)"
                    ))
                })?;
                let m = &task.spec.maskgit;
                let mut c = T2iConfig::from_layout(&layout, grid.len());
                c.codebook_size = c
                    .codebook_size
                    .min(codebook_size.unwrap_or(c.codebook_size));
                c.timesteps = m.timesteps;
                c.guidance_scale = m.guidance_scale;
                c.temperature = m.temperature;
                c.noise_schedule = m.noise_schedule;
                if c.image_token_offset + c.codebook_size > embedding_size {
                    return Err(TrainError::Other(format!(
                        "{key}: the model's head ({embedding_size} ids) does not hold the image codes [{}, {}): t2i needs an MMaDA-shaped checkpoint",
                        c.image_token_offset,
                        c.image_token_offset + c.codebook_size
                    )));
                }
                c.validate()
                    .map_err(|e| TrainError::Other(format!("{key}.maskgit: {e}")))?;
                task.t2i = Some(c);
            }
        }
        if task.spec.kind == TaskKind::Mmu {
            let p = mmada_data::Preprocess {
                resolution: section.resolution,
                mode: section.mmu_mode,
            };
            for ex in &examples {
                let img = match &ex.image {
                    Some(ImageRef::Path(path)) => Some(mmada_data::image::open_image(path)?),
                    Some(ImageRef::Bytes(b)) => Some(mmada_data::image::decode_image(b)?),
                    _ => None,
                };
                let img = match img {
                    Some(i) => {
                        let i = mmada_data::image::preprocess_u8(&i, &p)?;
                        let (w, h) = i.dimensions();
                        Some(
                            RewardImage::new(w, h, i.into_raw())
                                .map_err(|e| TrainError::Reward(e.to_string()))?,
                        )
                    }
                    None => None,
                };
                task.prompt_images.push(img);
            }
            // pre-tokenized tables (`mmada-train data pretokenize`) answer images first
            for path in &section.codes {
                let table = mmada_data::CodeTable::read(&resolve(base, path))
                    .map_err(|e| TrainError::Other(format!("image_tokenizer.codes: {e}")))?;
                let id = coder.map(mmada_data::ImageCoder::id);
                table
                    .fill(&mut examples, &p, id.as_deref())
                    .map_err(|e| TrainError::Other(format!("image_tokenizer.codes: {e}")))?;
            }
            let files = examples
                .iter()
                .any(|e| matches!(e.image, Some(ImageRef::Path(_) | ImageRef::Bytes(_))));
            if files {
                let Some(coder) = coder else {
                    return Err(TrainError::Other(format!(
                        "{key}.prompts: the prompt images are files: give image_tokenizer.checkpoint to encode them (or image_tokenizer.codes tables that hold them, or `image_codes` fields)"
                    )));
                };
                let mut it = mmada_data::ImageTokenizer::new(Borrowed(coder), p);
                if let Some(d) = &section.cache_dir {
                    it = it.with_cache(mmada_data::CodeCache::open(&resolve(base, d))?);
                }
                it.tokenize(&mut examples)?;
            }
            for (i, ex) in examples.iter().enumerate() {
                if let Some(ImageRef::Codes(c)) = &ex.image
                    && let Some(bad) = c.iter().find(|&&x| x >= layout.codebook_size)
                {
                    return Err(TrainError::Other(format!(
                        "{key}.prompts: example {i} ({}) has image code {bad}, outside the model's codebook ({} codes): the image tokenizer does not match the model",
                        ex.source, layout.codebook_size
                    )));
                }
            }
        }
        task.examples = examples;
        out.push(task);
    }
    Ok((out, grid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mmada_diffusion::grpo::{AdvantageOptions, ScaleRewards};

    /// Two tasks of different reward scales interleaved by group: with batch scaling each
    /// task's advantages are those of the task alone; group scaling is unchanged by the split.
    #[test]
    fn batch_scaling_uses_each_tasks_own_std() {
        let g = 2;
        // groups: text (0, 2), image (0.4, 0.6), text (2, 2), image (0.1, 0.5)
        let rewards = [0.0, 2.0, 0.4, 0.6, 2.0, 2.0, 0.1, 0.5];
        let task = [0, 0, 1, 1, 0, 0, 1, 1];
        let batch = AdvantageOptions {
            scale: ScaleRewards::Batch,
            ..Default::default()
        };
        let a = task_advantages(&rewards, &task, g, batch).unwrap();
        let text = group_advantages(&[0.0, 2.0, 2.0, 2.0], g, batch).unwrap();
        let image = group_advantages(&[0.4, 0.6, 0.1, 0.5], g, batch).unwrap();
        assert_eq!(a.advantages[0..2], text.advantages[0..2]);
        assert_eq!(a.advantages[4..6], text.advantages[2..4]);
        assert_eq!(a.advantages[2..4], image.advantages[0..2]);
        assert_eq!(a.advantages[6..8], image.advantages[2..4]);
        assert_eq!(a.zero_std, [false, false, true, false]);
        // one std over both tasks would give the image groups much smaller advantages
        let joint = group_advantages(&rewards, g, batch).unwrap();
        assert!(joint.advantages[3].abs() < a.advantages[3].abs() / 3.0);
        // group scaling: the same as without the split
        let group = AdvantageOptions::default();
        assert_eq!(
            task_advantages(&rewards, &task, g, group)
                .unwrap()
                .advantages,
            group_advantages(&rewards, g, group).unwrap().advantages
        );
    }
}
