//! The trainer core that SFT ([`crate::sft`]) and UniGRPO ([`crate::unigrpo`]) share: the
//! run directory, start checks, resume, the checkpoint save, and the step skeleton
//!
//! ```text
//! micro-batches → loss → backward (accumulate) → reduce → clip → optimizer   Session::update
//!   → metrics over ranks + stop requests + replica check                    Session::sync
//!   → log (metrics.jsonl, wandb)                                             Session::log
//!   → checkpoint (rank 0) → barrier → stop                                   Session::finish_step
//! ```
//!
//! A trainer opens a [`Session`] ([`Session::open`]: tokenizer, run directory, resume point,
//! model, AdamW state), adds what only it has (SFT: data; UniGRPO: prompts, rewards, the
//! reference model), calls [`Session::begin`] (start checks, `config.resolved.yaml`, wandb,
//! `metrics.jsonl`), then runs its step loop with the methods above and ends with
//! [`Session::end`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;
use mmada_data::TextTokenizer;
use mmada_model::checkpoint::SaveOptions;
use mmada_model::{LladaModel, ModelConfig, save_checkpoint};

use crate::data::{derive_seed, purpose};
use crate::dist::Worker;
use crate::error::TrainError;
use crate::guard::{self, NonFiniteError, NonFiniteGuard};
use crate::optim::{self, AdamWOptim};
use crate::recipe::{
    CheckpointSection, LoggingSection, MixedPrecision, ModelSection, OptimizerSection, Recipe,
    RunConfig, Sharding, TokenizerSection,
};
use crate::run_dir::{RunDir, TrainerState, read_state, resolve, write_atomic};
use crate::wandb_log::TrainerWandb;

/// Where to resume from.
#[derive(Debug, Clone)]
pub enum Resume {
    /// The checkpoint `latest` names in the run directory.
    Latest,
    /// A checkpoint directory (`…/checkpoints/step-000100`).
    Path(PathBuf),
}

/// Run options outside the recipe (the same for every trainer).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Resume instead of starting fresh.
    pub resume: Option<Resume>,
    /// Set to request a clean stop: the loop saves a checkpoint after the current step and
    /// returns (SIGINT / SIGTERM in the binary).
    pub stop: Option<Arc<AtomicBool>>,
    /// Stop after this many steps of this invocation (tests of resume).
    pub stop_after: Option<u64>,
    /// Folder that relative recipe paths are resolved against.
    pub base_dir: PathBuf,
    /// wandb server + key instead of `WANDB_BASE_URL` / `WANDB_API_KEY` (tests).
    pub wandb_endpoint: Option<mmada_wandb::Endpoint>,
    /// Test hook of the non-finite guard ([`crate::guard`]): at these steps (0-based, the
    /// value of `state.step` when the step starts) global rank 0 reports a NaN loss for its
    /// first optimizer update, as a diverged forward pass would. Empty outside tests.
    pub test_nonfinite_steps: Vec<u64>,
}

/// The recipe sections every trainer has, borrowed from its recipe.
#[derive(Debug, Clone, Copy)]
pub struct CommonSections<'a> {
    /// `run:`.
    pub run: &'a RunConfig,
    /// `model:`.
    pub model: &'a ModelSection,
    /// `tokenizer:`.
    pub tokenizer: &'a TokenizerSection,
    /// `optimizer:`.
    pub optimizer: &'a OptimizerSection,
    /// `checkpoint:`.
    pub checkpoint: &'a CheckpointSection,
    /// `logging:`.
    pub logging: &'a LoggingSection,
    /// `train.mixed_precision`.
    pub mixed_precision: MixedPrecision,
    /// `train.max_steps`.
    pub max_steps: u64,
    /// `train.device`.
    pub device: &'a str,
    /// `train.max_nonfinite_steps` ([`crate::guard`]).
    pub max_nonfinite_steps: u32,
    /// `train.sharding`.
    pub sharding: Sharding,
    /// `lora:` (absent: full fine-tuning).
    pub lora: Option<&'a crate::recipe::LoraSection>,
}

/// A trainer's recipe: the shared sections, for [`Session`] and the binary.
pub trait TrainRecipe: Recipe {
    /// The shared sections.
    fn common(&self) -> CommonSections<'_>;
}

/// `impl TrainRecipe` for a recipe type with the shared sections at the usual keys (`run`,
/// `model`, `tokenizer`, `optimizer`, `checkpoint`, `logging`, `train.{mixed_precision,
/// max_steps, device}`).
macro_rules! impl_train_recipe {
    ($recipe:ty) => {
        impl $crate::trainer::TrainRecipe for $recipe {
            fn common(&self) -> $crate::trainer::CommonSections<'_> {
                $crate::trainer::CommonSections {
                    run: &self.run,
                    model: &self.model,
                    tokenizer: &self.tokenizer,
                    optimizer: &self.optimizer,
                    checkpoint: &self.checkpoint,
                    logging: &self.logging,
                    mixed_precision: self.train.mixed_precision,
                    max_steps: self.train.max_steps,
                    device: &self.train.device,
                    max_nonfinite_steps: self.train.max_nonfinite_steps,
                    sharding: self.train.sharding,
                    lora: self.lora.as_ref(),
                }
            }
        }
    };
}
pub(crate) use impl_train_recipe;

/// A training loop ([`crate::sft::Sft`], [`crate::unigrpo::UniGrpo`]): what one rank runs,
/// and the two ways to launch it.
pub trait TrainLoop {
    /// The recipe.
    type Recipe: TrainRecipe + Sync;
    /// What `on_step` receives after every step.
    type Report;
    /// What a run returns.
    type Outcome: Send;

    /// The loop of one data-parallel rank (or the only one).
    ///
    /// # Errors
    /// [`TrainError`] naming the file, key, tensor or row at fault.
    fn run_rank<B: AutodiffBackend>(
        recipe: &Self::Recipe,
        worker: Worker<B>,
        opts: &RunOptions,
        on_step: &mut dyn FnMut(&Self::Report),
    ) -> Result<Self::Outcome, TrainError>;

    /// Run (or resume) the recipe on one `device`; `on_step` is called after every step
    /// (the binary draws its progress bar there).
    ///
    /// # Errors
    /// [`TrainError`] naming the file, key, tensor or row at fault.
    fn run<B: AutodiffBackend>(
        recipe: &Self::Recipe,
        device: &B::Device,
        opts: &RunOptions,
        on_step: &mut dyn FnMut(&Self::Report),
    ) -> Result<Self::Outcome, TrainError> {
        Self::run_rank(recipe, Worker::<B>::single(device.clone()), opts, on_step)
    }

    /// Data-parallel run (see [`crate::dist`] and [`crate::shard`]): one worker thread per
    /// device of `devices` on this node (`dist` says how many nodes and which one this is).
    /// Rank 0 alone writes checkpoints, `metrics.jsonl` and wandb (the others wait at a
    /// barrier); every rank resumes from the same checkpoint (a shared run directory).
    /// Returns this node's local rank 0 outcome (the checkpoint paths only on global rank
    /// 0); `on_step` runs on the calling thread (local rank 0). With one device and one node
    /// this is [`TrainLoop::run`].
    ///
    /// # Errors
    /// [`TrainError`]; [`TrainError::Dist`] for timeouts (a dead rank), diverged replicas,
    /// bad flags.
    fn run_dp<B>(
        recipe: &Self::Recipe,
        devices: &[B::Device],
        dist: &crate::dist::DistConfig,
        opts: &RunOptions,
        on_step: &mut dyn FnMut(&Self::Report),
    ) -> Result<Self::Outcome, TrainError>
    where
        B: AutodiffBackend,
        B::InnerBackend: burn::tensor::backend::Backend<Device = B::Device>,
    {
        crate::dist::launch::<B, _, TrainError>(
            devices,
            devices,
            dist,
            |w| Self::run_rank(recipe, w, opts, on_step),
            |w| Self::run_rank(recipe, w, opts, &mut |_| {}),
        )
    }
}

/// A recipe path that may be a Hugging Face id: `base`-relative when that exists locally (or
/// is absolute), else `lookup` of the path as written (`GSAI-ML/LLaDA-8B-Instruct`,
/// [`mmada_data::hub`]: the local HF cache, else a download; `HF_HOME`, `HF_ENDPOINT`,
/// `HF_TOKEN`, `HF_HUB_OFFLINE` honoured).
fn resolve_hub(
    base: &Path,
    p: &Path,
    lookup: fn(&Path) -> mmada_data::Result<PathBuf>,
) -> Result<PathBuf, TrainError> {
    let local = resolve(base, p);
    if local.exists() || p.is_absolute() {
        return Ok(local);
    }
    let found = lookup(p)?;
    // not a Hub id either: the base-relative path, for the caller's "not found" error
    Ok(if found == p { local } else { found })
}

/// `model.checkpoint`: a local folder (relative to `base`) or a Hub model id, whose weights
/// and sidecar files are fetched into the HF cache ([`resolve_hub`]).
///
/// # Errors
/// [`TrainError::DataCrate`] ([`mmada_data::DataError::Hub`]) when the id cannot be had.
pub fn resolve_checkpoint(base: &Path, p: &Path) -> Result<PathBuf, TrainError> {
    resolve_hub(base, p, mmada_data::hub::local_or_model)
}

/// Load the tokenizer of a `tokenizer:` section (a file, or a folder holding
/// `tokenizer.json`; relative to `base`), adding the MMaDA tokens if asked.
///
/// # Errors
/// The data crate's tokenizer errors.
pub fn load_tokenizer(
    section: &TokenizerSection,
    base: &Path,
) -> Result<TextTokenizer, TrainError> {
    let p = resolve_hub(base, &section.path, mmada_data::hub::local_or_tokenizer)?;
    let file = if p.is_dir() {
        p.join("tokenizer.json")
    } else {
        p
    };
    Ok(if section.add_mmada_tokens {
        TextTokenizer::from_file_with_mmada_tokens(&file)?
    } else {
        TextTokenizer::from_file(&file)?
    })
}

/// The model config of a `model:` section: the preset with overrides, sized to the tokenizer;
/// or the checkpoint's `config.json`, checked against the tokenizer.
///
/// # Errors
/// [`TrainError::Mismatch`] when a checkpoint's vocabulary or mask id disagrees with the
/// tokenizer; config errors naming `model.overrides` or the file.
pub fn model_config(
    model: &ModelSection,
    tokenizer: &TokenizerSection,
    tok: &TextTokenizer,
    base: &Path,
) -> Result<ModelConfig, TrainError> {
    let t = tok.layout();
    let total = t.total_vocab() as usize;
    if let Some(preset) = &model.preset {
        let mut json = ModelConfig::preset(preset)?.to_hf_json();
        for (k, v) in &model.overrides {
            json[k] = v.clone();
        }
        json["vocab_size"] = total.into();
        json["embedding_size"] = total.into();
        json["mask_token_id"] = t.mask_id.into();
        json["eos_token_id"] = t.eos_id.into();
        json["pad_token_id"] = t.pad_id.into();
        json["llm_vocab_size"] = t.image_code_offset.into();
        json["codebook_size"] = t.codebook_size.into();
        return Ok(ModelConfig::from_json_str(
            &json.to_string(),
            "model.overrides",
        )?);
    }
    let dir = resolve_checkpoint(base, model.checkpoint.as_ref().expect("validated"))?;
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let mismatch = |message: String| TrainError::Mismatch {
        tokenizer: tokenizer.path.display().to_string(),
        message,
    };
    if total > cfg.embedding_size {
        return Err(mismatch(format!(
            "it needs {total} ids (text + image codes) but the model has {} embedding rows",
            cfg.embedding_size
        )));
    }
    if let Some(m) = cfg.mask_token_id
        && m != t.mask_id
    {
        return Err(mismatch(format!(
            "its mask id is {} but config.json says mask_token_id {m}",
            t.mask_id
        )));
    }
    Ok(cfg)
}

/// The model config of a `model:` section without loading any weights, for the memory
/// planner ([`crate::plan`]); returns the config and where it came from.
///
/// * `preset` (e.g. `--model-preset mmada_8b`) wins when given;
/// * `model.checkpoint`: its `config.json` (only that file is read);
/// * `model.preset`: as [`model_config`] (the vocabulary sized to the tokenizer) when the
///   tokenizer can be read, else the preset with `model.overrides` and its own vocabulary.
///
/// # Errors
/// [`TrainError::Other`] naming the missing `config.json` and the `--model-preset` fix;
/// config errors naming the file or `model.overrides`.
pub fn model_config_for_plan(
    model: &ModelSection,
    tokenizer: &TokenizerSection,
    base: &Path,
    preset: Option<&str>,
) -> Result<(ModelConfig, String), TrainError> {
    if let Some(name) = preset {
        return Ok((ModelConfig::preset(name)?, format!("preset {name}")));
    }
    if let Some(dir) = &model.checkpoint {
        let file = resolve_hub(base, dir, mmada_data::hub::local_or_model_config)
            .map_err(|e| {
                TrainError::Other(format!(
                    "model.checkpoint: {e}; the planner reads only config.json (no weights): make it reachable, or pass --model-preset mmada_8b | llada_8b | tiny"
                ))
            })?
            .join("config.json");
        if !file.is_file() {
            return Err(TrainError::Other(format!(
                "model.checkpoint: {} not found: the planner reads only config.json (no weights): put the checkpoint's config.json there, or pass --model-preset mmada_8b | llada_8b | tiny",
                file.display()
            )));
        }
        return Ok((ModelConfig::from_file(&file)?, file.display().to_string()));
    }
    let name = model
        .preset
        .as_deref()
        .expect("validated: preset or checkpoint");
    if let Ok(tok) = load_tokenizer(tokenizer, base) {
        let cfg = model_config(model, tokenizer, &tok, base)?;
        return Ok((
            cfg,
            format!("preset {name} + model.overrides, tokenizer vocabulary"),
        ));
    }
    let mut json = ModelConfig::preset(name)?.to_hf_json();
    for (k, v) in &model.overrides {
        json[k] = v.clone();
    }
    let cfg = ModelConfig::from_json_str(&json.to_string(), "model.overrides")?;
    Ok((
        cfg,
        format!(
            "preset {name} + model.overrides (tokenizer not readable: the preset's vocabulary)"
        ),
    ))
}

/// The checkpoint a run continues from: `None` for a fresh start (refused when `run` already
/// holds checkpoints, so nothing is overwritten), the `latest` one, or a given path (relative
/// to `base`).
///
/// # Errors
/// [`TrainError::Other`] for a fresh start over checkpoints; [`TrainError`] from the run
/// directory when `latest` is missing.
fn resume_dir(
    run: &RunDir,
    resume: Option<&Resume>,
    base: &Path,
) -> Result<Option<PathBuf>, TrainError> {
    match resume {
        None => {
            if !run.list_checkpoints()?.is_empty() {
                return Err(TrainError::Other(format!(
                    "{} already holds checkpoints: resume with --resume latest, or start a new run with --set run.name=NEW (nothing was overwritten)",
                    run.root().display()
                )));
            }
            Ok(None)
        }
        Some(Resume::Latest) => Ok(Some(run.latest()?)),
        Some(Resume::Path(p)) => Ok(Some(resolve(base, p))),
    }
}

/// Add the gradients of `loss` (a `[1]` scalar) to `acc` (micro-batch accumulation).
pub fn accumulate<B: AutodiffBackend>(
    model: &LladaModel<B>,
    acc: Option<GradientsParams>,
    loss: Tensor<B, 1>,
) -> GradientsParams {
    accumulate_grads(
        model,
        acc,
        GradientsParams::from_grads(loss.backward(), model),
    )
}

/// `acc + grads` per parameter ([`accumulate`] for gradients computed elsewhere, e.g. by
/// `crate::recompute::Recompute::backward`).
pub fn accumulate_grads<B: AutodiffBackend>(
    model: &LladaModel<B>,
    acc: Option<GradientsParams>,
    grads: GradientsParams,
) -> GradientsParams {
    match acc {
        None => grads,
        Some(a) => optim::add_grads(model, a, grads),
    }
}

/// The folder of a run directory holding the base model of a LoRA run initialised from a
/// preset (written once at the start; `base_model_name_or_path` of its adapters).
pub const LORA_BASE_DIR: &str = "base_model";

/// The base model of a run: `model.checkpoint` loaded in `model.dtype`, or the preset
/// initialised with the run seed (the same weights on every call).
///
/// # Errors
/// Checkpoint errors naming the file or tensor.
fn base_model<B: AutodiffBackend>(
    sections: CommonSections<'_>,
    cfg: &ModelConfig,
    base: &Path,
    device: &B::Device,
) -> Result<LladaModel<B>, TrainError> {
    let dtype = sections.model.dtype.float();
    Ok(match &sections.model.checkpoint {
        Some(dir) => {
            mmada_model::load_weights::<B>(&resolve_checkpoint(base, dir)?, cfg, device, dtype)?
        }
        None => mmada_model::init::init_model::<B>(
            cfg,
            derive_seed(sections.run.seed, 0, 0, 0),
            device,
            dtype,
        ),
    })
}

/// How per-rank step scalars combine in [`Session::sync`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combine {
    /// Sum over ranks (values already scaled to their share of the step).
    Sum,
    /// Mean over ranks.
    Mean,
}

/// One training run of one rank: the state every trainer carries through its loop.
pub struct Session<'a, B: AutodiffBackend> {
    /// This rank's place in the job (device, reducer).
    pub worker: Worker<B>,
    /// The run directory.
    pub run: RunDir,
    /// The model's config (written with every checkpoint).
    pub cfg: ModelConfig,
    /// The tokenizer (written with every checkpoint).
    pub tok: TextTokenizer,
    /// Step, losses, data cursor and extras (saved in `trainer_state.json`).
    pub state: TrainerState,
    /// AdamW and its state (with `train.sharding` on several ranks: this rank's shard).
    pub optim: AdamWOptim<B>,
    /// The owner rank of every parameter (in `LladaModel::params` order) when the optimizer
    /// is sharded (`train.sharding` on several ranks); `None`: every rank updates everything.
    pub owners: Option<Vec<usize>>,
    /// The checkpoint this run resumed from.
    pub resumed_from: Option<PathBuf>,
    /// The newest checkpoint written by this invocation.
    pub last_checkpoint: Option<PathBuf>,
    /// Whether a stop request (signal, wandb) ended the run.
    pub interrupted: bool,
    /// The non-finite guard ([`crate::guard`]).
    pub guard: NonFiniteGuard,
    /// Under LoRA: the base model's checkpoint directory, recorded in every adapter's
    /// `adapter_config.json` (`model.checkpoint`, or `base_model/` in the run directory for
    /// a preset-initialised base).
    pub lora_base: Option<PathBuf>,
    /// `model.checkpoint` resolved once (a local folder, or the Hub cache's snapshot): the
    /// source of the sidecar files every checkpoint carries.
    source_checkpoint: Option<PathBuf>,
    sections: CommonSections<'a>,
    opts: &'a RunOptions,
    wandb: TrainerWandb,
    metrics: Option<std::fs::File>,
    ran: u64,
    guard_injected: bool,
}

impl<'a, B: AutodiffBackend> Session<'a, B> {
    /// The base model of the run as it was before training: `model.checkpoint`, or the
    /// preset initialised with the run seed (in `model.dtype`, without adapters). A LoRA
    /// run's resumed KL reference takes its modules to save from it.
    ///
    /// # Errors
    /// Checkpoint errors naming the file or tensor.
    pub fn base_model(&self) -> Result<LladaModel<B>, TrainError> {
        base_model::<B>(
            self.sections,
            &self.cfg,
            &self.opts.base_dir,
            &self.worker.device,
        )
    }

    /// Open a run on `worker`: the tokenizer, the run directory, the resume point (refusing
    /// to start over existing checkpoints), the model (resumed, loaded from
    /// `model.checkpoint`, or initialised from the preset with the run seed) with the compute
    /// dtype of `train.mixed_precision`, and AdamW (with its resumed state). Returns the
    /// session and the model.
    ///
    /// # Errors
    /// [`TrainError`] naming the file, key or tensor at fault.
    pub fn open(
        worker: Worker<B>,
        sections: CommonSections<'a>,
        opts: &'a RunOptions,
    ) -> Result<(Self, LladaModel<B>), TrainError> {
        let base = &opts.base_dir;
        let device = worker.device.clone();
        let tok = load_tokenizer(sections.tokenizer, base)?;
        let run =
            RunDir::create(&resolve(base, &sections.run.output_dir).join(&sections.run.name))?;
        let resumed_from = resume_dir(&run, opts.resume.as_ref(), base)?;
        let dtype = sections.model.dtype.float();
        let (cfg, model, state) = match &resumed_from {
            Some(dir) if sections.lora.is_some() => {
                let lora = sections.lora.expect("guarded");
                // LoRA: the frozen base again (model.checkpoint, or the preset with the run
                // seed), then the adapter of the checkpoint
                let state = read_state(dir)?;
                if worker.rank() == 0 {
                    tracing::info!(
                        "resuming LoRA from {} at step {}",
                        dir.display(),
                        state.step
                    );
                }
                let cfg = model_config(sections.model, sections.tokenizer, &tok, base)?;
                let model = base_model::<B>(sections, &cfg, base, &device)?;
                let adapter = dir.join(mmada_model::adapter::CHECKPOINT_ADAPTER_DIR);
                let (model, found) = mmada_model::adapter::load_adapter(model, &adapter)?;
                let same = found.r == lora.r
                    && found.alpha == lora.alpha
                    && found.dropout == lora.dropout
                    && found.modules_to_save == lora.modules_to_save
                    && lora
                        .target_modules
                        .iter()
                        .all(|t| found.target_modules.contains(t))
                    && found.target_modules.len() == lora.target_modules.len();
                if !same {
                    return Err(TrainError::Other(format!(
                        "{}: the checkpoint's adapter (r {}, alpha {}, dropout {}, targets {:?}, modules_to_save {:?}) differs from the recipe's lora: section (r {}, alpha {}, dropout {}, targets {:?}, modules_to_save {:?}): resume with the recipe the run was started with",
                        adapter.display(),
                        found.r,
                        found.alpha,
                        found.dropout,
                        found.target_modules,
                        found.modules_to_save,
                        lora.r,
                        lora.alpha,
                        lora.dropout,
                        lora.target_modules,
                        lora.modules_to_save
                    )));
                }
                (cfg, model, state)
            }
            Some(dir) => {
                let state = read_state(dir)?;
                if worker.rank() == 0 {
                    tracing::info!("resuming from {} at step {}", dir.display(), state.step);
                }
                let (cfg, model) =
                    mmada_model::load_checkpoint::<B>(&dir.join("model"), &device, dtype)?;
                (cfg, model, state)
            }
            None => {
                let cfg = model_config(sections.model, sections.tokenizer, &tok, base)?;
                let model = base_model::<B>(sections, &cfg, base, &device)?;
                let model = match sections.lora {
                    Some(lora) => {
                        if sections.model.checkpoint.is_none() && worker.rank() == 0 {
                            // the adapter needs its base: a preset-initialised one is written
                            // once, next to the checkpoints
                            let dir = run.root().join(LORA_BASE_DIR);
                            let opts = SaveOptions {
                                dtype: sections.model.dtype.disk(),
                                overwrite: true,
                                ..Default::default()
                            };
                            save_checkpoint(&model, &cfg, &dir, &opts)?;
                            let tok_path = dir.join("tokenizer.json");
                            tok.inner()
                                .save(&tok_path, false)
                                .map_err(|e| TrainError::io(&tok_path, e))?;
                        }
                        let seed = derive_seed(sections.run.seed, purpose::LORA_INIT, 0, 0);
                        model.with_lora(lora, seed)?
                    }
                    None => model,
                };
                (cfg, model, TrainerState::new(sections.run.seed))
            }
        };
        let source_checkpoint = match &sections.model.checkpoint {
            Some(dir) => Some(resolve_checkpoint(base, dir)?),
            None => None,
        };
        let lora_base = sections.lora.map(|_| {
            source_checkpoint
                .clone()
                .unwrap_or_else(|| run.root().join(LORA_BASE_DIR))
        });
        // train.mixed_precision: bf16 compute over the f32 master weights (not saved: the
        // checkpoint holds the parameters in checkpoint.model_dtype)
        let model = model.with_compute_dtype(sections.mixed_precision.compute_dtype());
        let mut optim = optim::AdamW::<B>::new(sections.optimizer, sections.run.seed);
        let owners = crate::dist::owners(&model, worker.world(), sections.sharding);
        if let Some(owner) = &owners {
            let mine = optim::param_infos(&model)
                .into_iter()
                .zip(owner)
                .filter(|(_, r)| **r == worker.rank())
                .map(|(i, _)| i.name)
                .collect();
            optim.set_owned(Some(mine));
        }
        if let Some(dir) = &resumed_from {
            optim = optim::load_state(optim, &model, &dir.join("optimizer.safetensors"))?;
        }
        let nonfinite = state
            .extra
            .get(guard::STATE_KEY)
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        let session = Session {
            guard: NonFiniteGuard::new(sections.max_nonfinite_steps, nonfinite),
            lora_base,
            source_checkpoint,
            worker,
            run,
            cfg,
            tok,
            state,
            optim,
            owners,
            resumed_from,
            last_checkpoint: None,
            interrupted: false,
            sections,
            opts,
            wandb: TrainerWandb::disabled(),
            metrics: None,
            ran: 0,
            guard_injected: false,
        };
        Ok((session, model))
    }

    /// Global rank 0 (the rank that writes checkpoints, metrics and wandb).
    pub fn lead(&self) -> bool {
        self.worker.rank() == 0
    }

    /// This rank's device.
    pub fn device(&self) -> B::Device {
        self.worker.device.clone()
    }

    /// The start of the loop, once model and state are loaded: with several ranks the start
    /// checks ([`crate::dist::check_start`]: world, step, recipe sections, replicas); on rank
    /// 0 `config.resolved.yaml`, wandb and `metrics.jsonl`.
    ///
    /// # Errors
    /// [`TrainError::Dist`] from the start checks; I/O and wandb errors naming the file.
    pub fn begin(&mut self, model: &LladaModel<B>, recipe: &impl Recipe) -> Result<(), TrainError> {
        let recipe_json = serde_json::to_value(recipe).expect("recipe serialises");
        if self.worker.world() > 1 {
            let config = crate::dist::config_sections(&recipe_json, self.worker.check_every);
            crate::dist::check_start::<B>(
                self.worker.reducer.as_mut(),
                model,
                self.state.step,
                &config,
            )?;
        }
        let lead = self.lead();
        if lead {
            write_atomic(
                &self.run.root().join("config.resolved.yaml"),
                recipe.to_yaml().as_bytes(),
            )?;
        }
        // only rank 0 talks to wandb (other ranks would open runs of their own)
        self.wandb = TrainerWandb::start(
            self.sections.logging.wandb.as_ref().filter(|_| lead),
            recipe_json,
            self.run.root(),
            &self.state,
            self.resumed_from.is_some(),
            self.opts.wandb_endpoint.clone(),
        )?;
        if lead {
            let path = self.run.metrics_path();
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| TrainError::io(&path, e))?;
            self.metrics = Some(file);
        }
        self.seed_lora_dropout();
        Ok(())
    }

    /// Under LoRA with `dropout > 0`: seed the backend RNG (which draws the dropout masks)
    /// for the step about to run, from the run seed, the step and the rank, so a resumed run
    /// draws the masks of the uninterrupted one.
    fn seed_lora_dropout(&self) {
        if self.sections.lora.is_some_and(|l| l.dropout > 0.0) {
            let seed = derive_seed(
                self.sections.run.seed,
                purpose::LORA_DROPOUT,
                self.state.step,
                self.worker.rank() as u64,
            );
            mmada_model::lora::seed_dropout(seed);
        }
    }

    /// Reduce (mean over ranks) → clip (global norm `optimizer.max_grad_norm`) → AdamW step
    /// at `lr`. Returns the updated model and the gradient norm before clipping.
    ///
    /// With `train.sharding` on several ranks: `optimizer` all-reduces the gradients, clips
    /// them (every rank has them all), updates the parameters this rank owns and broadcasts
    /// every parameter from its owner; `optimizer_and_gradients` reduces each gradient to
    /// its owner only, takes the global norm from the owners' per-parameter squared norms (a
    /// small all-reduce), clips and updates the owned parameters, and broadcasts them. Both
    /// give the weights of the unsharded run (see `crate::dist`).
    ///
    /// # Errors
    /// Collective errors of the gradient reduction and the broadcasts.
    pub fn update(
        &mut self,
        model: LladaModel<B>,
        mut grads: GradientsParams,
        lr: f64,
    ) -> Result<(LladaModel<B>, f32), TrainError> {
        let max_norm = self.sections.optimizer.max_grad_norm;
        let Some(owners) = &self.owners else {
            if self.worker.world() > 1 {
                grads = self.worker.reducer.mean_grads(&model, grads)?;
            }
            let norm = optim::clip_global_norm(&model, &mut grads, max_norm);
            if !norm.is_finite() {
                // crate::guard: the norm is the same on every rank (after the all-reduce), so
                // every rank skips this update
                return Ok((model, norm));
            }
            return Ok((optim::step(&mut self.optim, model, grads, lr), norm));
        };
        let reducer = self.worker.reducer.as_mut();
        let norm = match self.sections.sharding {
            Sharding::OptimizerAndGradients => {
                grads = crate::dist::reduce_grads_to_owners(reducer, &model, grads, owners)?;
                let sq = crate::dist::gather_sq_norms(reducer, &model, &grads, owners)?;
                let norm = optim::global_norm(&sq);
                optim::clip_to_norm(&model, &mut grads, norm, max_norm);
                norm
            }
            _ => {
                grads = reducer.mean_grads(&model, grads)?;
                optim::clip_global_norm(&model, &mut grads, max_norm)
            }
        };
        if !norm.is_finite() {
            // crate::guard: the global norm is the same on every rank; nothing was updated, so
            // the replicas stay equal without a broadcast
            return Ok((model, norm));
        }
        let model = optim::step(&mut self.optim, model, grads, lr);
        let model = crate::dist::broadcast_params(reducer, model, owners)?;
        Ok((model, norm))
    }

    /// The test hook [`RunOptions::test_nonfinite_steps`]: true once per listed step, on
    /// global rank 0 only; the loop then replaces its local loss by NaN.
    pub fn test_injects_nonfinite(&mut self) -> bool {
        let inject = self.lead()
            && !self.guard_injected
            && self.opts.test_nonfinite_steps.contains(&self.state.step);
        self.guard_injected |= inject;
        inject
    }

    /// [`Session::update`] behind the non-finite guard ([`crate::guard`]): `local_loss` is
    /// this rank's loss of the update (its share, any scale); when it is not finite the
    /// gradients are made NaN before the all-reduce, so every rank sees a non-finite global
    /// norm and skips the update. The update is noted for the step's verdict
    /// ([`Session::sync`]). Returns the model (unchanged when skipped) and the global norm
    /// before clipping (non-finite when skipped).
    ///
    /// # Errors
    /// Collective errors of the gradient all-reduce.
    pub fn guarded_update(
        &mut self,
        model: LladaModel<B>,
        mut grads: GradientsParams,
        lr: f64,
        local_loss: f32,
    ) -> Result<(LladaModel<B>, f32), TrainError> {
        if !local_loss.is_finite() {
            guard::poison_grads(&model, &mut grads);
        }
        let (model, norm) = self.update(model, grads, lr)?;
        self.guard.note_update(norm);
        Ok((model, norm))
    }

    /// End of the optimizer work of a step: count it, combine this rank's step scalars over
    /// ranks (`values`, in place), learn whether any rank was asked to stop (a signal or the
    /// wandb UI), and compare the replicas every `check_every` steps. Returns the stop request.
    ///
    /// # Errors
    /// Collective errors; [`crate::dist::DistError::Diverged`].
    pub fn sync(
        &mut self,
        model: &LladaModel<B>,
        values: &mut [f32],
        combine: Combine,
    ) -> Result<bool, TrainError> {
        self.state.step += 1;
        self.ran += 1;
        self.guard_injected = false;
        // every rank takes the same decision: it rests on the all-reduced gradient norms
        if self.guard.record(self.state.step, true) {
            if self.lead() {
                tracing::warn!(
                    "step {}: non-finite loss or gradient norm, update skipped ({} such step(s) in this run)",
                    self.state.step,
                    self.guard.total()
                );
            }
            self.state
                .extra
                .insert(guard::STATE_KEY.into(), self.guard.total().into());
        }
        let mut stop = self
            .opts
            .stop
            .as_ref()
            .is_some_and(|s| s.load(Ordering::SeqCst))
            || self.wandb.stop_requested();
        let world = self.worker.world();
        if world > 1 {
            let mut v = values.to_vec();
            v.push(f32::from(u8::from(stop)));
            let r = self.worker.reducer.sum_labeled("step metrics", &v, false)?;
            for (x, s) in values.iter_mut().zip(&r) {
                *x = match combine {
                    Combine::Sum => *s,
                    Combine::Mean => *s / world as f32,
                };
            }
            stop = r[values.len()] > 0.0;
            let every = self.worker.check_every;
            if every > 0 && self.state.step.is_multiple_of(every) {
                crate::dist::check_replicas(self.worker.reducer.as_mut(), model, self.state.step)?;
            }
        }
        Ok(stop)
    }

    /// Whether a metrics row is due at the current step (`log_every`, and the last step).
    pub fn log_due(&self, log_every: u64) -> bool {
        self.state.step.is_multiple_of(log_every.max(1))
            || self.state.step == self.sections.max_steps
    }

    /// Write `row` to `metrics.jsonl` and wandb (rank 0; a no-op elsewhere).
    ///
    /// # Errors
    /// [`TrainError::Io`] naming `metrics.jsonl`.
    pub fn log(&mut self, row: &serde_json::Value) -> Result<(), TrainError> {
        if let Some(metrics) = self.metrics.as_mut() {
            writeln!(metrics, "{row}").map_err(|e| TrainError::io(self.run.metrics_path(), e))?;
            self.wandb.log_row(self.state.step, row);
        }
        Ok(())
    }

    /// The end of a step: a checkpoint when due (`checkpoint.every`, the last step, a stop
    /// request, `stop_after`) written by rank 0 while the other ranks wait at a barrier (also
    /// after a step on which rank 0 alone evaluated: `waited`). Returns whether the loop
    /// stops here.
    ///
    /// # Errors
    /// Checkpoint I/O errors; collective errors of the barrier.
    pub fn finish_step(
        &mut self,
        model: &LladaModel<B>,
        reference: Option<&LladaModel<B::InnerBackend>>,
        stop_requested: bool,
        waited: bool,
    ) -> Result<bool, TrainError> {
        let step = self.state.step;
        let stop_after = self.opts.stop_after.is_some_and(|n| self.ran >= n);
        let every = self.sections.checkpoint.every;
        let periodic = every > 0 && step.is_multiple_of(every);
        let save_due = periodic || step == self.sections.max_steps || stop_requested || stop_after;
        // crate::guard: no checkpoint of a non-finite step, and none holding a non-finite
        // tensor, so keep_last never rotates a finite checkpoint out for a broken one
        let nonfinite = self.guard.in_streak();
        if self.lead() && save_due && nonfinite {
            tracing::warn!(
                "step {step}: non-finite loss or gradient norm, checkpoint not written (the last one is {})",
                guard::describe_checkpoint(self.newest_checkpoint())
            );
        }
        let save = save_due && !nonfinite;
        if save {
            // every rank checks its (identical) replica, so all of them stop together
            let bad = guard::first_nonfinite_param(model).or_else(|| {
                reference
                    .and_then(guard::first_nonfinite_param)
                    .map(|n| format!("reference/{n}"))
            });
            if let Some(name) = bad {
                return Err(NonFiniteError::Tensor {
                    name,
                    step,
                    last_checkpoint: guard::describe_checkpoint(self.newest_checkpoint()),
                }
                .into());
            }
        }
        // a sharded optimizer's state is gathered to rank 0 first (every rank takes part)
        let gathered = match (&self.owners, save) {
            (Some(owners), true) => Some(crate::dist::gather_optimizer(
                self.worker.reducer.as_mut(),
                &self.optim,
                model,
                owners,
            )?),
            _ => None,
        };
        if self.lead() && save {
            self.wandb.record(&mut self.state);
            let optim = gathered.as_ref().unwrap_or(&self.optim);
            self.last_checkpoint = Some(self.save_with(model, reference, optim)?);
        }
        if nonfinite && let Some(e) = self.guard.exhausted(step, self.newest_checkpoint()) {
            return Err(e.into());
        }
        if self.worker.world() > 1 && (save_due || waited) {
            // the other ranks waited for rank 0's evaluation / checkpoint: a long deadline
            self.worker.reducer.barrier()?;
        }
        if stop_requested {
            self.interrupted = true;
            self.wandb.preempting();
        }
        self.seed_lora_dropout();
        Ok(stop_requested || stop_after)
    }

    /// The newest complete checkpoint of the run directory (`latest`), if any.
    pub fn newest_checkpoint(&self) -> Option<PathBuf> {
        self.last_checkpoint
            .clone()
            .or_else(|| self.run.latest().ok())
    }

    /// Write the checkpoint of the current step atomically: `model/` (config.json,
    /// safetensors in `checkpoint.model_dtype`, tokenizer.json), `reference/` when a
    /// reference model is kept, `optimizer.safetensors` (+ `master_weights.safetensors` with
    /// f32 master weights), `trainer_state.json`; then `latest` and `keep_last`.
    ///
    /// # Errors
    /// Checkpoint and run-directory I/O errors naming the file.
    pub fn save(
        &self,
        model: &LladaModel<B>,
        reference: Option<&LladaModel<B::InnerBackend>>,
    ) -> Result<PathBuf, TrainError> {
        self.save_with(model, reference, &self.optim)
    }

    /// [`Session::save`] with the optimizer state of `optim` (the consolidated state of a
    /// sharded optimizer).
    fn save_with(
        &self,
        model: &LladaModel<B>,
        reference: Option<&LladaModel<B::InnerBackend>>,
        optim: &AdamWOptim<B>,
    ) -> Result<PathBuf, TrainError> {
        let step = self.state.step;
        let tmp = self.run.begin_checkpoint(step)?;
        if let Some(lora) = self.sections.lora {
            // LoRA: the PEFT adapter (+ modules to save) instead of the model; the KL
            // reference is the base, not saved
            let base = self.lora_base.as_ref().map(|p| p.display().to_string());
            let dir = tmp.join(mmada_model::adapter::CHECKPOINT_ADAPTER_DIR);
            mmada_model::adapter::save_adapter(model, lora, &dir, base.as_deref(), false)?;
            optim::save_state(optim, model, &tmp.join("optimizer.safetensors"))?;
            let text = serde_json::to_string_pretty(&self.state).expect("state serialises");
            write_atomic(&tmp.join("trainer_state.json"), text.as_bytes())?;
            return Ok(self.run.commit_checkpoint(
                &tmp,
                step,
                self.sections.checkpoint.keep_last,
            )?);
        }
        // the source checkpoint's tokenizer config, generation config and remote code travel
        // with the model (`tokenizer.json` is rewritten below: it may have gained tokens)
        let opts = SaveOptions {
            dtype: self.sections.checkpoint.model_dtype.disk(),
            copy_sidecars_from: self.source_checkpoint.clone(),
            ..Default::default()
        };
        let model_dir = tmp.join("model");
        save_checkpoint(model, &self.cfg, &model_dir, &opts)?;
        let tok_path = model_dir.join("tokenizer.json");
        self.tok
            .inner()
            .save(&tok_path, false)
            .map_err(|e| TrainError::io(&tok_path, e))?;
        if let Some(r) = reference {
            save_checkpoint(r, &self.cfg, &tmp.join("reference"), &opts)?;
        }
        optim::save_state(optim, model, &tmp.join("optimizer.safetensors"))?;
        let text = serde_json::to_string_pretty(&self.state).expect("state serialises");
        write_atomic(&tmp.join("trainer_state.json"), text.as_bytes())?;
        Ok(self
            .run
            .commit_checkpoint(&tmp, step, self.sections.checkpoint.keep_last)?)
    }

    /// The end of the run: the final replica check and leaving the collective (several
    /// ranks), the wandb summary (`summary`) and exit code. Returns the final state.
    ///
    /// # Errors
    /// [`crate::dist::DistError::Diverged`] and collective errors of the final check.
    pub fn end(
        mut self,
        model: &LladaModel<B>,
        summary: &[(&str, f64)],
    ) -> Result<Ended, TrainError> {
        if self.worker.world() > 1 {
            crate::dist::end_run(self.worker.reducer.as_mut(), model, self.state.step)?;
        }
        self.wandb.finish(summary, i32::from(self.interrupted));
        Ok(Ended {
            run_dir: self.run.root().to_path_buf(),
            state: self.state,
            last_checkpoint: self.last_checkpoint,
            interrupted: self.interrupted,
        })
    }
}

/// What [`Session::end`] hands back to the trainer for its outcome.
#[derive(Debug, Clone)]
pub struct Ended {
    /// The run directory.
    pub run_dir: PathBuf,
    /// The final trainer state (step, losses).
    pub state: TrainerState,
    /// The newest checkpoint written by this invocation.
    pub last_checkpoint: Option<PathBuf>,
    /// Whether a stop request ended the run.
    pub interrupted: bool,
}
