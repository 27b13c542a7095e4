//! The SFT trainer: masked-diffusion fine-tuning over `[t2i | lm | mmu]` micro-batches
//! (spec §3.2–3.4), with AdamW, LR schedule, global-norm clipping, gradient accumulation,
//! held-out evaluation, atomic checkpoints and exact resume.
//!
//! One optimizer step: `grad_accum` micro-batches, each drawn from the mixtures
//! ([`TrainData::next_rows`]), noised by the unified forward process
//! ([`TrainData::noise`]) and scored by [`mmada_diffusion::unified_loss_chunked`]; then the shared
//! step skeleton of [`crate::trainer::Session`].

use std::path::PathBuf;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::ElementConversion;
use burn::tensor::backend::AutodiffBackend;
use mmada_diffusion::{UnifiedBatch, unified_loss_chunked};
use mmada_model::LladaModel;
use serde_json::json;

use crate::data::{StreamKind, TrainData, purpose};
use crate::dist::Worker;
use crate::recipe::SftRecipe;
use crate::recompute::Recompute;
use crate::schedule::Schedule;
use crate::trainer::{
    Combine, RunOptions, Session, TrainLoop, TrainRecipe, accumulate, accumulate_grads,
};

pub use crate::error::TrainError;
pub use crate::trainer::{Resume, load_tokenizer, model_config};

/// Run options outside the recipe (see [`RunOptions`]).
pub type SftOptions = RunOptions;

crate::trainer::impl_train_recipe!(SftRecipe);

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
    /// Steps of the run so far whose update was skipped for a NaN/inf loss or gradient norm
    /// ([`crate::guard`]).
    pub nonfinite_steps: u64,
}

impl StepReport {
    /// The `metrics.jsonl` / wandb row (upstream metric names).
    pub fn metrics_row(&self) -> serde_json::Value {
        let mut row = json!({
            "step": self.step,
            "loss": self.loss,
            "lr": self.lr,
            "grad_norm": self.grad_norm,
            "avg_masking_rate": self.avg_masking_rate,
            "samples/sec/gpu": self.samples_per_sec,
            "tokens_per_sec": self.tokens_per_sec,
            "nonfinite_steps": self.nonfinite_steps,
        });
        for (k, v) in [
            ("step_loss_t2i", self.loss_t2i),
            ("step_loss_lm", self.loss_lm),
            ("step_loss_mmu", self.loss_mmu),
            ("eval_loss", self.eval_loss),
        ] {
            if let Some(v) = v {
                row[k] = json!(v);
            }
        }
        row
    }
}

/// Result of an SFT run ([`Sft`]).
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

/// The SFT loop: [`TrainLoop::run`] on one device, [`TrainLoop::run_dp`] data-parallel.
///
/// Data parallelism: the recipe's batch sizes are per device; the global batch is
/// `batch_size × world × grad_accum`. Every rank trains on its shard of the same global batch
/// ([`crate::shard`]), gradients are averaged before the step, replicas are compared every
/// `dist.check_every` steps; rank 0 writes checkpoints, `metrics.jsonl` and wandb, with
/// losses averaged over ranks.
#[derive(Debug, Clone, Copy)]
pub struct Sft;

impl TrainLoop for Sft {
    type Recipe = SftRecipe;
    type Report = StepReport;
    type Outcome = SftOutcome;

    fn run_rank<B: AutodiffBackend>(
        recipe: &SftRecipe,
        worker: Worker<B>,
        opts: &RunOptions,
        on_step: &mut dyn FnMut(&StepReport),
    ) -> Result<SftOutcome, TrainError> {
        let (mut s, mut model) = Session::open(worker, recipe.common(), opts)?;
        let device = s.device();
        let world = s.worker.world();
        // images of mmu / t2i rows: encoded once here (data.image_tokenizer)
        let coder = crate::data::load_image_coder::<B>(
            recipe.data.image_tokenizer.as_ref(),
            &opts.base_dir,
            &device,
        )?;
        let coder = coder.as_ref().map(|c| c as &dyn mmada_data::ImageCoder);
        // every rank draws the same global micro-batches (per-device batch × world) and keeps
        // its shard after noising (crate::shard)
        let mut data = TrainData::load_with_images(
            &crate::shard::global_data_section(&recipe.data, world),
            &recipe.loss,
            recipe.run.seed,
            s.tok.clone(),
            &opts.base_dir,
            coder,
        )?;
        if s.resumed_from.is_some() {
            data.resume(&s.state.data)?;
        } else {
            s.state.data = data.cursor();
        }
        s.begin(&model, recipe)?;
        let schedule = Schedule::new(
            &recipe.schedule,
            recipe.optimizer.lr,
            recipe.train.max_steps,
        );
        let mut eval_losses = vec![];
        while s.state.step < recipe.train.max_steps {
            let t0 = Instant::now();
            let lr = schedule.lr(s.state.step);
            let (grads, mut st) = accumulate_step(recipe, &mut data, &model, &s)?;
            let grad_norm;
            if s.test_injects_nonfinite() {
                st.losses[0] = f32::NAN;
            }
            (model, grad_norm) = s.guarded_update(model, grads, lr, st.losses[0])?;
            let stop = s.sync(&model, &mut st.losses, Combine::Mean)?;
            let [loss, l_t2i, l_lm, l_mmu] = st.losses;
            s.state.losses.push(loss);
            s.state.data = data.cursor();
            let secs = t0.elapsed().as_secs_f64();
            let mut report = StepReport {
                step: s.state.step,
                max_steps: recipe.train.max_steps,
                loss,
                loss_t2i: st.present[0].then_some(l_t2i),
                loss_lm: st.present[1].then_some(l_lm),
                loss_mmu: st.present[2].then_some(l_mmu),
                lr,
                grad_norm,
                tokens_per_sec: st.noise.tokens as f64 / secs,
                // per device (upstream `samples/sec/gpu`); tokens_per_sec is the global throughput
                samples_per_sec: st.rows as f64 / secs / world as f64,
                avg_masking_rate: st.noise.avg_masking_rate(),
                eval_loss: None,
                nonfinite_steps: s.guard.total(),
            };
            let every = recipe.train.eval_every;
            let eval_due = every > 0
                && (s.state.step.is_multiple_of(every) || s.state.step == recipe.train.max_steps);
            if s.lead() && eval_due {
                report.eval_loss = eval_loss(recipe, &data, &model, &device)?;
                if let Some(e) = report.eval_loss {
                    eval_losses.push((s.state.step, e));
                }
            }
            if s.log_due(recipe.train.log_every) {
                s.log(&report.metrics_row())?;
            }
            on_step(&report);
            if s.finish_step(&model, None, stop, eval_due)? {
                break;
            }
        }
        let final_loss = s.state.losses.last().map_or(f64::NAN, |l| f64::from(*l));
        let end = s.end(&model, &[("final_loss", final_loss)])?;
        Ok(SftOutcome {
            run_dir: end.run_dir,
            final_step: end.state.step,
            losses: end.state.losses,
            eval_losses,
            last_checkpoint: end.last_checkpoint,
            interrupted: end.interrupted,
        })
    }
}

/// The held-out loss: every evaluation sample once, in chunks of `data.lm.batch_size`, with
/// the evaluation masks (`purpose::EVAL_MASK`, independent of the step); `None` without
/// held-out samples.
fn eval_loss<B: AutodiffBackend>(
    recipe: &SftRecipe,
    data: &TrainData,
    model: &LladaModel<B>,
    device: &B::Device,
) -> Result<Option<f32>, TrainError> {
    let samples = data.eval_samples();
    if samples.is_empty() {
        return Ok(None);
    }
    let valid = model.valid();
    let bs = recipe.data.lm.batch_size.max(1);
    let (mut sum, mut n) = (0f64, 0usize);
    for (k, chunk) in samples.chunks(bs).enumerate() {
        let rows = vec![(StreamKind::Lm, chunk.to_vec())];
        let (batch, _) = data.noise(&rows, 0, (k * bs) as u64, purpose::EVAL_MASK)?;
        let att = recipe.loss.t2i_attention.into();
        let l = unified_loss_chunked(&valid, &batch, att, recipe.loss.ce_chunk_rows, device)?;
        sum += f64::from(l.lm.into_scalar().elem::<f32>()) * chunk.len() as f64;
        n += chunk.len();
    }
    Ok(Some((sum / n as f64) as f32))
}

/// One optimizer step's forward/backward work: `grad_accum` micro-batches (this rank's
/// shard of each), their summed gradients and the step statistics (losses averaged over the
/// micro-batches, `[total, t2i, lm, mmu]`).
fn accumulate_step<B: AutodiffBackend>(
    recipe: &SftRecipe,
    data: &mut TrainData,
    model: &LladaModel<B>,
    session: &Session<'_, B>,
) -> Result<(GradientsParams, MicroStats), TrainError> {
    let (rank, world) = (session.worker.rank(), session.worker.world());
    let device = session.device();
    let accum = recipe.train.grad_accum as usize;
    let t2i_att = recipe.loss.t2i_attention.into();
    let chunk = recipe.loss.ce_chunk_rows;
    let step = session.state.step;
    let mut acc: Option<GradientsParams> = None;
    let mut st = MicroStats::default();
    for _ in 0..accum {
        let rows = data.next_rows();
        for (kind, r) in &rows {
            st.present[kind.index()] |= !r.is_empty();
        }
        let n_rows: usize = rows.iter().map(|(_, r)| r.len()).sum();
        let (batch, noise) = data.noise(&rows, step, st.rows, purpose::MASK)?;
        st.rows += n_rows as u64;
        st.noise.add(&noise);
        let recompute = recipe
            .train
            .activation_checkpointing
            .then(|| Recompute::new(model));
        let loss_of = |b: &UnifiedBatch| match &recompute {
            Some(r) => unified_loss_chunked(r, b, t2i_att, chunk, &device),
            None => unified_loss_chunked(model, b, t2i_att, chunk, &device),
        };
        let losses = if world > 1 {
            let (shard, scale) = crate::shard::shard_batch(&batch, rank, world);
            scale.apply(loss_of(&shard)?)
        } else {
            loss_of(&batch)?
        };
        let l = &recipe.loss;
        let total = losses.total(l.t2i_coeff, l.lm_coeff, l.mmu_coeff) / accum as f32;
        let a = accum as f32;
        st.losses[1] += losses.t2i.into_scalar().elem::<f32>() / a;
        st.losses[2] += losses.lm.into_scalar().elem::<f32>() / a;
        st.losses[3] += losses.mmu.into_scalar().elem::<f32>() / a;
        st.losses[0] += total.clone().into_scalar().elem::<f32>();
        acc = Some(match recompute {
            Some(r) => accumulate_grads(model, acc, r.backward(total)),
            None => accumulate(model, acc, total),
        });
    }
    Ok((acc.expect("at least one micro-batch"), st))
}

/// Statistics of one optimizer step's micro-batches.
#[derive(Default)]
struct MicroStats {
    /// `[total, t2i, lm, mmu]`, averaged over micro-batches.
    losses: [f32; 4],
    /// Which streams had rows (`[t2i, lm, mmu]`).
    present: [bool; 3],
    /// Rows drawn (global micro-batches).
    rows: u64,
    noise: crate::data::NoiseStats,
}
