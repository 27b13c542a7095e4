//! The non-finite guard: a step whose loss or gradient norm is not finite (NaN, ±inf) does
//! not touch the weights, and a run that keeps producing them stops with an error instead of
//! training on (and checkpointing) garbage.
//!
//! * **Skip.** [`Session::guarded_update`](crate::trainer::Session::guarded_update) makes the
//!   gradients of a rank whose local loss is non-finite NaN ([`poison_grads`]) before the
//!   gradient all-reduce, so the global gradient norm, computed after the all-reduce, is
//!   non-finite on *every* rank at once: all ranks take the same decision with no extra
//!   collective. `Session::update` then skips the AdamW step (weights and optimizer state
//!   unchanged, like PyTorch's `GradScaler` on an overflow).
//! * **Count.** A step with at least one skipped update is a non-finite step
//!   ([`NonFiniteGuard::record`]); the run's total is the metric `nonfinite_steps`
//!   (`metrics.jsonl`, wandb) and is kept in `trainer_state.json` (`extra.nonfinite_steps`)
//!   across resumes.
//! * **Stop.** `train.max_nonfinite_steps` (K, default 5) consecutive non-finite steps end the
//!   run with [`NonFiniteError::Streak`] (the binary exits 1).
//! * **Checkpoints.** No checkpoint is written at a non-finite step (its weights are the ones
//!   that produced the non-finite loss), and none from a model holding a non-finite parameter
//!   ([`first_nonfinite_param`], [`NonFiniteError::Tensor`]), so `checkpoint.keep_last` never
//!   rotates a finite checkpoint out in favour of a broken one.
//!
//! LLaDA's recovery (its README FAQ: a NaN at 1.2T tokens, resumed from the last checkpoint
//! with a lower learning rate) is what the error message proposes; it is not automatic.

use std::path::PathBuf;

use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, ElementConversion};
use mmada_model::LladaModel;
use mmada_model::model::ParamRef;

/// The `trainer_state.json` extra that holds the run's non-finite step count.
pub const STATE_KEY: &str = "nonfinite_steps";

/// The default of `train.max_nonfinite_steps`.
pub const DEFAULT_MAX_NONFINITE_STEPS: u32 = 5;

/// Why the guard stopped a run.
#[derive(Debug, thiserror::Error)]
pub enum NonFiniteError {
    /// Too many consecutive non-finite steps.
    #[error(
        "the loss or gradient norm was non-finite (NaN/inf) for {count} consecutive steps ({first}..={last}; train.max_nonfinite_steps = {max}): stopping. The updates of those steps were skipped and no checkpoint was written for them; the last checkpoint is {last_checkpoint}. Resume from it (--resume latest, or --resume DIR for an earlier one) with a lower optimizer.lr or a larger optimizer warm-up, or check the data of those steps"
    )]
    Streak {
        /// Consecutive non-finite steps.
        count: u32,
        /// First step of the streak (1-based, as in `metrics.jsonl`).
        first: u64,
        /// Last step of the streak.
        last: u64,
        /// `train.max_nonfinite_steps`.
        max: u32,
        /// The newest checkpoint of the run directory, or a note that there is none.
        last_checkpoint: String,
    },
    /// A parameter holds a non-finite value: the checkpoint was not written.
    #[error(
        "parameter `{name}` holds non-finite values (NaN/inf) at step {step}: checkpoint not written (the last checkpoint is {last_checkpoint}); resume from it with a lower optimizer.lr"
    )]
    Tensor {
        /// Hugging Face name of the parameter.
        name: String,
        /// The step whose checkpoint was refused.
        step: u64,
        /// The newest checkpoint of the run directory, or a note that there is none.
        last_checkpoint: String,
    },
}

/// Counts non-finite steps and decides when the run stops.
#[derive(Debug, Clone)]
pub struct NonFiniteGuard {
    max_consecutive: u32,
    consecutive: u32,
    first_of_streak: u64,
    total: u64,
    pending: bool,
}

impl NonFiniteGuard {
    /// A guard stopping after `max_consecutive` (≥ 1) consecutive non-finite steps, with
    /// `total` non-finite steps already counted (resume).
    pub fn new(max_consecutive: u32, total: u64) -> Self {
        NonFiniteGuard {
            max_consecutive: max_consecutive.max(1),
            consecutive: 0,
            first_of_streak: 0,
            total,
            pending: false,
        }
    }

    /// Note an optimizer update of the current step whose gradient norm was `norm`
    /// (`Session::guarded_update` calls this; a non-finite norm means the update was skipped).
    pub fn note_update(&mut self, norm: f32) {
        self.pending |= !norm.is_finite();
    }

    /// Close step `step` (1-based): count it as non-finite when one of its updates was
    /// skipped or `loss_finite` is false. Returns whether it was non-finite.
    pub fn record(&mut self, step: u64, loss_finite: bool) -> bool {
        let bad = std::mem::take(&mut self.pending) || !loss_finite;
        if bad {
            if self.consecutive == 0 {
                self.first_of_streak = step;
            }
            self.consecutive += 1;
            self.total += 1;
        } else {
            self.consecutive = 0;
        }
        bad
    }

    /// Whether the last recorded step was non-finite.
    pub fn in_streak(&self) -> bool {
        self.consecutive > 0
    }

    /// Non-finite steps of the run so far (the metric `nonfinite_steps`).
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The error that stops the run when the streak has reached `train.max_nonfinite_steps`,
    /// else `None`. `last_checkpoint` names the newest checkpoint for the message.
    pub fn exhausted(&self, step: u64, last_checkpoint: Option<PathBuf>) -> Option<NonFiniteError> {
        (self.consecutive >= self.max_consecutive).then(|| NonFiniteError::Streak {
            count: self.consecutive,
            first: self.first_of_streak,
            last: step,
            max: self.max_consecutive,
            last_checkpoint: describe_checkpoint(last_checkpoint),
        })
    }
}

/// A checkpoint path for messages, or "none (no checkpoint was written yet)".
pub fn describe_checkpoint(p: Option<PathBuf>) -> String {
    p.map_or_else(
        || "none (no checkpoint was written yet)".into(),
        |p| p.display().to_string(),
    )
}

/// Make every gradient of `grads` NaN: a rank with a non-finite loss makes the all-reduced
/// gradients, and so the global norm, non-finite on every rank (see the module docs).
pub fn poison_grads<B: AutodiffBackend>(model: &LladaModel<B>, grads: &mut GradientsParams) {
    crate::optim::scale_grads(model, grads, f32::NAN);
}

/// Whether a tensor's values are all finite: `Σ 0·x` is NaN when any `x` is NaN or ±inf.
fn all_finite<B: Backend, const D: usize>(t: burn::tensor::Tensor<B, D>) -> bool {
    t.cast(DType::F32)
        .mul_scalar(0.0)
        .sum()
        .into_scalar()
        .elem::<f32>()
        .is_finite()
}

/// The Hugging Face name of the first parameter of `model` holding a NaN or ±inf, if any
/// (one reduction per parameter).
pub fn first_nonfinite_param<B: Backend>(model: &LladaModel<B>) -> Option<String> {
    model.params().into_iter().find_map(|(name, p)| {
        let ok = match p {
            ParamRef::Linear(w) | ParamRef::Matrix(w) => all_finite(w.val()),
            ParamRef::Vector(w) => all_finite(w.val()),
        };
        (!ok).then_some(name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streak_counts_and_stops_at_k() {
        let mut g = NonFiniteGuard::new(3, 0);
        assert!(!g.record(1, true));
        g.note_update(f32::NAN);
        g.note_update(1.0);
        assert!(
            g.record(2, true),
            "a skipped update makes the step non-finite"
        );
        assert!(g.record(3, false), "a non-finite loss alone counts");
        assert!(g.exhausted(3, None).is_none());
        assert!(!g.record(4, true), "a finite step ends the streak");
        assert!(!g.in_streak());
        for s in 5..=7 {
            g.note_update(f32::INFINITY);
            assert!(g.record(s, true));
        }
        assert_eq!(g.total(), 5);
        let e = g.exhausted(7, Some("runs/x/checkpoints/step-000004".into()));
        let msg = e.expect("3 consecutive").to_string();
        assert!(
            msg.contains("3 consecutive steps (5..=7")
                && msg.contains("train.max_nonfinite_steps = 3")
                && msg.contains("step-000004")
                && msg.contains("optimizer.lr"),
            "{msg}"
        );
        // resumed totals carry on
        let g = NonFiniteGuard::new(5, 7);
        assert_eq!(g.total(), 7);
    }

    #[test]
    fn finds_the_non_finite_parameter() {
        use mmada_model::backend::Cpu;
        let cfg = mmada_model::ModelConfig::tiny();
        let device = Default::default();
        let model =
            mmada_model::init::init_model::<Cpu>(&cfg, 1, &device, mmada_model::FloatDType::F32);
        assert_eq!(first_nonfinite_param(&model), None);
        let mut bad = model.clone();
        let w = bad.blocks[0].ff_out.weight.val();
        let mut v = w.to_data().to_vec::<f32>().unwrap();
        v[3] = f32::INFINITY;
        let t = burn::tensor::Tensor::<Cpu, 2>::from_data(
            burn::tensor::TensorData::new(v, w.dims()),
            &device,
        );
        bad.blocks[0].ff_out.weight = burn::module::Param::from_tensor(t);
        assert_eq!(
            first_nonfinite_param(&bad).as_deref(),
            Some("blocks.0.ff_out.weight")
        );
    }
}
