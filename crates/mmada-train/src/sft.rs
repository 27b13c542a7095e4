//! The SFT trainer: masked-diffusion fine-tuning over `[t2i | lm | mmu]` micro-batches
//! (spec §3.2–3.4), with AdamW, LR schedule, global-norm clipping, gradient accumulation,
//! held-out evaluation, atomic checkpoints and exact resume.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::FloatDType;
use burn::tensor::backend::AutodiffBackend;
use mmada_data::TextTokenizer;
use mmada_diffusion::unified_loss;
use mmada_model::checkpoint::{DiskDtype, SaveOptions};
use mmada_model::{LladaModel, ModelConfig, load_checkpoint, save_checkpoint};
use serde_json::json;

use crate::data::{TrainData, derive_seed, purpose};
use crate::dist::{DistConfig, Worker};
use crate::optim::{self, AdamWOptim};
use crate::recipe::SftRecipe;
use crate::run_dir::{RunDir, TrainerState, read_state, resolve, write_atomic};
use crate::schedule::Schedule;

/// Any error of a training run, with the context that names its source.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Recipe problem.
    #[error(transparent)]
    Recipe(#[from] crate::recipe::RecipeError),
    /// Data problem.
    #[error(transparent)]
    Data(#[from] crate::data::TrainDataError),
    /// Tokenizer or data-crate problem.
    #[error(transparent)]
    DataCrate(#[from] mmada_data::DataError),
    /// Model checkpoint problem.
    #[error(transparent)]
    Checkpoint(#[from] mmada_model::CheckpointError),
    /// Model config problem.
    #[error(transparent)]
    Config(#[from] mmada_model::ConfigError),
    /// Optimizer state problem.
    #[error(transparent)]
    Optim(#[from] optim::OptimStateError),
    /// Run directory problem.
    #[error(transparent)]
    RunDir(#[from] crate::run_dir::RunDirError),
    /// Loss inputs inconsistent.
    #[error(transparent)]
    Diffusion(#[from] mmada_diffusion::DiffusionError),
    /// The tokenizer does not fit the model.
    #[error("tokenizer {tokenizer} does not fit the model: {message}")]
    Mismatch {
        /// Tokenizer path.
        tokenizer: String,
        /// What differs and how to fix it.
        message: String,
    },
    /// Data-parallel machinery (collective timeout, diverged replicas, bad flags).
    #[error(transparent)]
    Dist(#[from] crate::dist::DistError),
    /// Anything else, with its context.
    #[error("{0}")]
    Other(String),
}

/// Where to resume from.
#[derive(Debug, Clone)]
pub enum Resume {
    /// The checkpoint `latest` names in the run directory.
    Latest,
    /// A checkpoint directory (`…/checkpoints/step-000100`).
    Path(PathBuf),
}

/// The checkpoint a run continues from: `None` for a fresh start (refused when `run` already
/// holds checkpoints, so nothing is overwritten), the `latest` one, or a given path (relative
/// to `base`).
///
/// # Errors
/// [`TrainError::Other`] for a fresh start over checkpoints; [`TrainError`] from the run
/// directory when `latest` is missing.
pub(crate) fn resume_dir(
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

/// Rank 0's outputs of a run (other ranks: wandb off, no metrics file).
pub(crate) struct RunOutputs {
    /// wandb (disabled off rank 0 or without `logging.wandb`).
    pub wandb: crate::wandb_log::TrainerWandb,
    /// `metrics.jsonl`, opened for appending on rank 0.
    pub metrics: Option<std::fs::File>,
    /// Its path (for errors).
    pub metrics_path: PathBuf,
}

/// The start of a run shared by the SFT and UniGRPO loops, once model and state are loaded:
/// with several ranks the start checks ([`crate::dist::check_start`]: world, step, recipe
/// sections, replicas); on rank 0 `config.resolved.yaml`, wandb and `metrics.jsonl`.
///
/// # Errors
/// [`TrainError::Dist`] from the start checks; I/O and wandb errors naming the file.
#[allow(clippy::too_many_arguments)]
pub(crate) fn begin_run<B: AutodiffBackend>(
    worker: &mut Worker<B>,
    model: &LladaModel<B>,
    state: &TrainerState,
    recipe_json: serde_json::Value,
    recipe_yaml: &str,
    wandb: Option<&mmada_wandb::WandbConfig>,
    run: &RunDir,
    resumed: bool,
    endpoint: Option<mmada_wandb::Endpoint>,
) -> Result<RunOutputs, TrainError> {
    let lead = worker.rank() == 0;
    if worker.world() > 1 {
        let config = crate::dist::config_sections(&recipe_json, worker.check_every);
        crate::dist::check_start::<B>(worker.reducer.as_mut(), model, state.step, &config)?;
    }
    if lead {
        write_atomic(
            &run.root().join("config.resolved.yaml"),
            recipe_yaml.as_bytes(),
        )?;
    }
    // only rank 0 talks to wandb (other ranks would open runs of their own)
    let wandb = crate::wandb_log::TrainerWandb::start(
        wandb.filter(|_| lead),
        recipe_json,
        run.root(),
        state,
        resumed,
        endpoint,
    )?;
    let metrics_path = run.metrics_path();
    let metrics = if lead {
        Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&metrics_path)
                .map_err(|e| TrainError::Other(format!("{}: {e}", metrics_path.display())))?,
        )
    } else {
        None
    };
    Ok(RunOutputs {
        wandb,
        metrics,
        metrics_path,
    })
}

/// Run options outside the recipe.
#[derive(Debug, Clone, Default)]
pub struct SftOptions {
    /// Resume instead of starting fresh.
    pub resume: Option<Resume>,
    /// Set to request a clean stop: the loop saves a checkpoint after the current step and
    /// returns (SIGINT / SIGTERM in the binary).
    pub stop: Option<Arc<AtomicBool>>,
    /// Stop after this many optimizer steps of this invocation (tests of resume).
    pub stop_after: Option<u64>,
    /// Folder that relative recipe paths are resolved against.
    pub base_dir: PathBuf,
    /// wandb server + key instead of `WANDB_BASE_URL` / `WANDB_API_KEY` (tests).
    pub wandb_endpoint: Option<mmada_wandb::Endpoint>,
}

/// What one optimizer step did (for progress bars and tests).
#[derive(Debug, Clone)]
pub struct StepReport {
    /// Steps completed (1-based).
    pub step: u64,
    /// Total steps.
    pub max_steps: u64,
    /// Weighted total loss.
    pub loss: f32,
    /// `step_loss_t2i` / `_lm` / `_mmu` (averaged over micro-batches; `None` for absent streams).
    pub loss_t2i: Option<f32>,
    /// lm loss.
    pub loss_lm: Option<f32>,
    /// mmu loss.
    pub loss_mmu: Option<f32>,
    /// LR used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    /// Tokens (rows × seq) per second.
    pub tokens_per_sec: f64,
    /// Rows per second.
    pub samples_per_sec: f64,
    /// Mean mask ratio.
    pub avg_masking_rate: f64,
    /// Held-out loss when evaluated at this step.
    pub eval_loss: Option<f32>,
}

/// Result of [`run_sft`].
#[derive(Debug, Clone)]
pub struct SftOutcome {
    /// The run directory.
    pub run_dir: PathBuf,
    /// Optimizer steps completed in total (including resumed ones).
    pub final_step: u64,
    /// Loss of every step of the run so far (including before a resume).
    pub losses: Vec<f32>,
    /// Held-out losses `(step, loss)` evaluated in this invocation.
    pub eval_losses: Vec<(u64, f32)>,
    /// The newest checkpoint written.
    pub last_checkpoint: Option<PathBuf>,
    /// Whether a stop request ended the run early.
    pub interrupted: bool,
}

/// Load the recipe's tokenizer (file or directory), adding the MMaDA tokens if asked.
///
/// # Errors
/// The data crate's tokenizer errors.
pub fn load_tokenizer(recipe: &SftRecipe, base: &Path) -> Result<TextTokenizer, TrainError> {
    let p = resolve(base, &recipe.tokenizer.path);
    let file = if p.is_dir() {
        p.join("tokenizer.json")
    } else {
        p
    };
    Ok(if recipe.tokenizer.add_mmada_tokens {
        TextTokenizer::from_file_with_mmada_tokens(&file)?
    } else {
        TextTokenizer::from_file(&file)?
    })
}

/// The model config: the preset with overrides, sized to the tokenizer; or the checkpoint's,
/// checked against the tokenizer.
///
/// # Errors
/// [`TrainError::Mismatch`] when a checkpoint's vocabulary or mask id disagrees with the tokenizer.
pub fn model_config(
    recipe: &SftRecipe,
    tok: &TextTokenizer,
    base: &Path,
) -> Result<ModelConfig, TrainError> {
    let t = tok.layout();
    let total = t.total_vocab() as usize;
    if let Some(preset) = &recipe.model.preset {
        let mut json = ModelConfig::preset(preset)?.to_hf_json();
        for (k, v) in &recipe.model.overrides {
            json[k] = v.clone();
        }
        json["vocab_size"] = total.into();
        json["embedding_size"] = total.into();
        json["mask_token_id"] = t.mask_id.into();
        json["eos_token_id"] = t.eos_id.into();
        json["pad_token_id"] = t.pad_id.into();
        json["llm_vocab_size"] = t.image_code_offset.into();
        json["codebook_size"] = t.codebook_size.into();
        Ok(ModelConfig::from_json_str(
            &json.to_string(),
            "model.overrides",
        )?)
    } else {
        let dir = resolve(base, recipe.model.checkpoint.as_ref().expect("validated"));
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let tokp = recipe.tokenizer.path.display().to_string();
        if total > cfg.embedding_size {
            return Err(TrainError::Mismatch {
                tokenizer: tokp,
                message: format!(
                    "it needs {total} ids (text + image codes) but the model has {} embedding rows",
                    cfg.embedding_size
                ),
            });
        }
        if let Some(m) = cfg.mask_token_id
            && m != t.mask_id
        {
            return Err(TrainError::Mismatch {
                tokenizer: tokp,
                message: format!(
                    "its mask id is {} but config.json says mask_token_id {m}",
                    t.mask_id
                ),
            });
        }
        Ok(cfg)
    }
}

fn float_dtype(s: &str) -> FloatDType {
    if s == "bf16" {
        FloatDType::BF16
    } else {
        FloatDType::F32
    }
}

struct Ctx<'a, B: AutodiffBackend> {
    recipe: &'a SftRecipe,
    cfg: ModelConfig,
    run: RunDir,
    device: B::Device,
}

impl<B: AutodiffBackend> Ctx<'_, B> {
    fn save(
        &self,
        data: &TrainData,
        model: &LladaModel<B>,
        optim: &AdamWOptim<B>,
        state: &TrainerState,
    ) -> Result<PathBuf, TrainError> {
        let tmp = self.run.begin_checkpoint(state.step)?;
        let dtype = if self.recipe.checkpoint.model_dtype == "bf16" {
            DiskDtype::BF16
        } else {
            DiskDtype::F32
        };
        let model_dir = tmp.join("model");
        save_checkpoint(
            model,
            &self.cfg,
            &model_dir,
            &SaveOptions {
                dtype,
                ..Default::default()
            },
        )?;
        data.tokenizer()
            .inner()
            .save(model_dir.join("tokenizer.json"), false)
            .map_err(|e| {
                TrainError::Other(format!(
                    "saving tokenizer.json into {}: {e}",
                    model_dir.display()
                ))
            })?;
        optim::save_state(optim, model, &tmp.join("optimizer.safetensors"))?;
        let text = serde_json::to_string_pretty(state).expect("state serialises");
        write_atomic(&tmp.join("trainer_state.json"), text.as_bytes())?;
        Ok(self
            .run
            .commit_checkpoint(&tmp, state.step, self.recipe.checkpoint.keep_last)?)
    }

    fn eval_loss(
        &self,
        data: &TrainData,
        model: &LladaModel<B>,
    ) -> Result<Option<f32>, TrainError> {
        let samples = data.eval_samples();
        if samples.is_empty() {
            return Ok(None);
        }
        let valid = model.valid();
        let bs = self.recipe.data.lm.batch_size.max(1);
        let (mut sum, mut n) = (0f64, 0usize);
        for (k, chunk) in samples.chunks(bs).enumerate() {
            let rows = vec![(crate::data::StreamKind::Lm, chunk.to_vec())];
            let (batch, _) = data.noise(&rows, 0, (k * bs) as u64, purpose::EVAL_MASK)?;
            let l = unified_loss(
                &valid,
                &batch,
                self.recipe.loss.t2i_attention.into(),
                &self.device,
            )?;
            sum += f64::from(l.lm.into_scalar().elem::<f32>()) * chunk.len() as f64;
            n += chunk.len();
        }
        Ok(Some((sum / n as f64) as f32))
    }
}

use burn::tensor::ElementConversion;

/// Run (or resume) SFT as the recipe says, on `device`. `on_step` is called after every
/// optimizer step (the binary draws its progress bar there).
///
/// # Errors
/// [`TrainError`] naming the file, key, tensor or row at fault.
pub fn run_sft<B: AutodiffBackend>(
    recipe: &SftRecipe,
    device: &B::Device,
    opts: &SftOptions,
    on_step: &mut dyn FnMut(&StepReport),
) -> Result<SftOutcome, TrainError> {
    sft_worker(recipe, Worker::<B>::single(device.clone()), opts, on_step)
}

/// Data-parallel SFT (see [`crate::dist`]): one worker thread per device of `devices` on this
/// node (`dist` says how many nodes and which one this is). The recipe's batch sizes are per
/// device; the global batch is `batch_size × world × grad_accum`. Every rank trains on its
/// shard of the same global batch, gradients are averaged before the step, replicas are
/// compared every `dist.check_every` steps; rank 0 writes checkpoints, `metrics.jsonl` and
/// wandb, with losses averaged over ranks. Returns this node's local rank 0 outcome (the
/// checkpoint paths only on global rank 0). `on_step` runs on the calling thread (local rank 0).
///
/// With one device and one node this is [`run_sft`].
///
/// # Errors
/// [`TrainError`]; [`TrainError::Dist`] for timeouts (a dead rank), diverged replicas, bad flags.
pub fn run_sft_dp<B>(
    recipe: &SftRecipe,
    devices: &[B::Device],
    dist: &DistConfig,
    opts: &SftOptions,
    on_step: &mut dyn FnMut(&StepReport),
) -> Result<SftOutcome, TrainError>
where
    B: AutodiffBackend,
    B::InnerBackend: burn::tensor::backend::Backend<Device = B::Device>,
{
    crate::dist::launch::<B, _, TrainError>(
        devices,
        devices,
        dist,
        |w| sft_worker(recipe, w, opts, on_step),
        |w| sft_worker(recipe, w, opts, &mut |_| {}),
    )
}

/// The SFT loop of one data-parallel rank (or the only one).
fn sft_worker<B: AutodiffBackend>(
    recipe: &SftRecipe,
    mut worker: Worker<B>,
    opts: &SftOptions,
    on_step: &mut dyn FnMut(&StepReport),
) -> Result<SftOutcome, TrainError> {
    let device = &worker.device.clone();
    let (rank, world) = (worker.rank(), worker.world());
    let lead = rank == 0;
    let base = &opts.base_dir;
    let tok = load_tokenizer(recipe, base)?;
    let run = RunDir::create(&resolve(base, &recipe.run.output_dir).join(&recipe.run.name))?;
    let resume_dir = resume_dir(&run, opts.resume.as_ref(), base)?;
    let dtype = float_dtype(&recipe.model.dtype);
    let (cfg, model, state) = match &resume_dir {
        Some(dir) => {
            let state = read_state(dir)?;
            if lead {
                tracing::info!("resuming from {} at step {}", dir.display(), state.step);
            }
            let (cfg, model) = load_checkpoint::<B>(&dir.join("model"), device, dtype)?;
            (cfg, model, Some(state))
        }
        None => {
            let cfg = model_config(recipe, &tok, base)?;
            let model = match &recipe.model.checkpoint {
                Some(dir) => {
                    mmada_model::load_weights::<B>(&resolve(base, dir), &cfg, device, dtype)?
                }
                None => mmada_model::init::init_model::<B>(
                    &cfg,
                    derive_seed(recipe.run.seed, 0, 0, 0),
                    device,
                    dtype,
                ),
            };
            (cfg, model, None)
        }
    };
    // train.mixed_precision: bf16 compute over the f32 master weights (not saved: the
    // checkpoint holds the parameters in checkpoint.model_dtype)
    let model = model.with_compute_dtype(recipe.train.mixed_precision.compute_dtype());
    // every rank draws the same global micro-batches (per-device batch × world) and keeps
    // its shard after noising (crate::dist)
    // images of mmu / t2i rows: encoded once here (data.image_tokenizer)
    let coder =
        crate::data::load_image_coder::<B>(recipe.data.image_tokenizer.as_ref(), base, device)?;
    let coder = coder.as_ref().map(|c| c as &dyn mmada_data::ImageCoder);
    let mut data = if world > 1 {
        let global = crate::dist::global_batch_recipe(recipe, world);
        TrainData::load_with_images(
            &global.data,
            &recipe.loss,
            recipe.run.seed,
            tok,
            base,
            coder,
        )?
    } else {
        TrainData::load_with_images(
            &recipe.data,
            &recipe.loss,
            recipe.run.seed,
            tok,
            base,
            coder,
        )?
    };
    let mut optim = optim::adamw::<B>(&recipe.optimizer);
    let mut state = match state {
        Some(s) => {
            data.resume(&s.data)?;
            optim = optim::load_state(
                optim,
                &model,
                &resume_dir
                    .as_ref()
                    .expect("resume")
                    .join("optimizer.safetensors"),
            )?;
            s
        }
        None => TrainerState {
            step: 0,
            seed: recipe.run.seed,
            data: data.cursor(),
            losses: vec![],
            extra: Default::default(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        },
    };
    let RunOutputs {
        mut wandb,
        mut metrics,
        metrics_path,
    } = begin_run(
        &mut worker,
        &model,
        &state,
        serde_json::to_value(recipe).expect("recipe serialises"),
        &recipe.to_yaml(),
        recipe.logging.wandb.as_ref(),
        &run,
        resume_dir.is_some(),
        opts.wandb_endpoint.clone(),
    )?;

    let ctx = Ctx::<B> {
        recipe,
        cfg,
        run,
        device: device.clone(),
    };
    let schedule = Schedule::new(
        &recipe.schedule,
        recipe.optimizer.lr,
        recipe.train.max_steps,
    );
    let accum = recipe.train.grad_accum as usize;
    let t2i_att = recipe.loss.t2i_attention.into();
    let mut model = model;
    let mut outcome = SftOutcome {
        run_dir: ctx.run.root().to_path_buf(),
        final_step: state.step,
        losses: state.losses.clone(),
        eval_losses: vec![],
        last_checkpoint: None,
        interrupted: false,
    };
    let mut ran = 0u64;
    while state.step < recipe.train.max_steps {
        let t0 = Instant::now();
        let step = state.step;
        let lr = schedule.lr(step);
        let mut acc: Option<GradientsParams> = None;
        let (mut l_total, mut l_t2i, mut l_lm, mut l_mmu) = (0f32, 0f32, 0f32, 0f32);
        let mut stats = crate::data::NoiseStats::default();
        let mut first_row = 0u64;
        let mut present = [false; 3];
        for _ in 0..accum {
            let rows = data.next_rows();
            let n_rows: usize = rows.iter().map(|(_, r)| r.len()).sum();
            for (name, r) in &rows {
                if !r.is_empty() {
                    present[name.index()] = true;
                }
            }
            let (batch, st) = data.noise(&rows, step, first_row, purpose::MASK)?;
            first_row += n_rows as u64;
            stats.add(&st);
            let losses = if world > 1 {
                let (shard, scale) = crate::dist::shard_batch(&batch, rank, world);
                scale.apply(unified_loss(&model, &shard, t2i_att, device)?)
            } else {
                unified_loss(&model, &batch, t2i_att, device)?
            };
            let total = losses.total(
                recipe.loss.t2i_coeff,
                recipe.loss.lm_coeff,
                recipe.loss.mmu_coeff,
            ) / accum as f32;
            l_t2i += losses.t2i.into_scalar().elem::<f32>() / accum as f32;
            l_lm += losses.lm.into_scalar().elem::<f32>() / accum as f32;
            l_mmu += losses.mmu.into_scalar().elem::<f32>() / accum as f32;
            l_total += total.clone().into_scalar().elem::<f32>();
            let grads = GradientsParams::from_grads(total.backward(), &model);
            acc = Some(match acc {
                None => grads,
                Some(a) => optim::add_grads(&model, a, grads),
            });
        }
        let mut grads = acc.expect("at least one micro-batch");
        if world > 1 {
            grads = worker.reducer.mean_grads(&model, grads)?;
        }
        let grad_norm = optim::clip_global_norm(&model, &mut grads, recipe.optimizer.max_grad_norm);
        model = optim::step(&mut optim, model, grads, lr);
        state.step += 1;
        ran += 1;
        // a signal, or the run stopped from the wandb UI (any rank's request stops every rank)
        let mut stop_requested =
            opts.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)) || wandb.stop_requested();
        if world > 1 {
            let m = crate::dist::mean_metrics::<B>(
                worker.reducer.as_mut(),
                [l_total, l_t2i, l_lm, l_mmu],
                stop_requested,
            )?;
            [l_total, l_t2i, l_lm, l_mmu] = m.0;
            stop_requested = m.1;
            if worker.check_every > 0 && state.step % worker.check_every == 0 {
                crate::dist::check_replicas(worker.reducer.as_mut(), &model, state.step)?;
            }
        }
        state.losses.push(l_total);
        state.data = data.cursor();
        let secs = t0.elapsed().as_secs_f64();
        let mut report = StepReport {
            step: state.step,
            max_steps: recipe.train.max_steps,
            loss: l_total,
            loss_t2i: present[0].then_some(l_t2i),
            loss_lm: present[1].then_some(l_lm),
            loss_mmu: present[2].then_some(l_mmu),
            lr,
            grad_norm,
            tokens_per_sec: stats.tokens as f64 / secs,
            // per device (upstream `samples/sec/gpu`); tokens_per_sec is the global throughput
            samples_per_sec: first_row as f64 / secs / world as f64,
            avg_masking_rate: stats.avg_masking_rate(),
            eval_loss: None,
        };
        let eval_due = recipe.train.eval_every > 0
            && (state.step % recipe.train.eval_every == 0 || state.step == recipe.train.max_steps);
        if lead && eval_due {
            report.eval_loss = ctx.eval_loss(&data, &model)?;
            if let Some(e) = report.eval_loss {
                outcome.eval_losses.push((state.step, e));
            }
        }
        if let Some(metrics) = metrics.as_mut()
            && (state.step % recipe.train.log_every == 0 || state.step == recipe.train.max_steps)
        {
            let mut row = json!({
                "step": state.step,
                "loss": report.loss,
                "lr": report.lr,
                "grad_norm": report.grad_norm,
                "avg_masking_rate": report.avg_masking_rate,
                "samples/sec/gpu": report.samples_per_sec,
                "tokens_per_sec": report.tokens_per_sec,
            });
            for (k, v) in [
                ("step_loss_t2i", report.loss_t2i),
                ("step_loss_lm", report.loss_lm),
                ("step_loss_mmu", report.loss_mmu),
                ("eval_loss", report.eval_loss),
            ] {
                if let Some(v) = v {
                    row[k] = json!(v);
                }
            }
            writeln!(metrics, "{row}")
                .map_err(|e| TrainError::Other(format!("{}: {e}", metrics_path.display())))?;
            wandb.log_row(state.step, &row);
        }
        on_step(&report);
        let stop_after = opts.stop_after.is_some_and(|n| ran >= n);
        let periodic = recipe.checkpoint.every > 0 && state.step % recipe.checkpoint.every == 0;
        let last = state.step == recipe.train.max_steps;
        let save_due = periodic || last || stop_requested || stop_after;
        if lead && save_due {
            wandb.record(&mut state);
            outcome.last_checkpoint = Some(ctx.save(&data, &model, &optim, &state)?);
        }
        if world > 1 && (eval_due || save_due) {
            // the other ranks waited for rank 0's evaluation / checkpoint: a long deadline
            worker.reducer.barrier()?;
        }
        if stop_requested || stop_after {
            outcome.interrupted = stop_requested;
            if stop_requested {
                wandb.preempting();
            }
            break;
        }
    }
    if world > 1 {
        crate::dist::end_run(worker.reducer.as_mut(), &model, state.step)?;
    }
    let final_loss = state.losses.last().map_or(f64::NAN, |l| f64::from(*l));
    wandb.finish(
        &[("final_loss", final_loss)],
        i32::from(outcome.interrupted),
    );
    outcome.final_step = state.step;
    outcome.losses = state.losses;
    Ok(outcome)
}
