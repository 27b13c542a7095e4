//! wandb logging of the trainers: the one code path that SFT ([`crate::sft`]) and UniGRPO
//! ([`crate::unigrpo`]) share — start or continue the wandb run of `logging.wandb`, send each
//! `metrics.jsonl` row as a history row at the trainer's step, keep the resume state in the
//! checkpoint's `trainer_state.json`, mark `preempting` on a stop request, finish with the exit
//! code.
//!
//! Resume: the state saved under `extra.wandb` continues the same wandb run at the saved history
//! offset. When a resumed training run has no saved state (a recipe that newly enables wandb, a
//! lost field) and an explicit run id (`logging.wandb.run_id` or `WANDB_RUN_ID`) in online mode,
//! the server is asked (`RunResumeStatus`, [`mmada_wandb::query_resume_status`]) where that run
//! stands; rows logged after the checkpoint's step are overwritten, not duplicated.
//! `logging.wandb.resume` / `WANDB_RESUME` change this as the SDK's `resume=` does
//! ([`mmada_wandb::WandbResume`]): `never` starts a new wandb run, `allow` and `must` ask the
//! server about an explicit run id even for a fresh training run, `must` refuses to start
//! without a run to continue.

use std::path::Path;

use mmada_wandb::{
    Endpoint, RunInit, WandbConfig, WandbMode, WandbResume, WandbResumeState, WandbRun,
};
use serde_json::Value;

use crate::error::TrainError;
use crate::run_dir::TrainerState;

/// Key of the wandb resume state in [`TrainerState::extra`].
pub const STATE_KEY: &str = "wandb";

/// The wandb run of a training run (a no-op when `logging.wandb` is absent or disabled).
#[derive(Debug)]
pub struct TrainerWandb {
    run: WandbRun,
}

impl TrainerWandb {
    /// No wandb (before a run starts, and on ranks other than 0).
    pub fn disabled() -> Self {
        TrainerWandb {
            run: WandbRun::disabled(),
        }
    }

    /// Starts (or continues) the wandb run. `section` is `logging.wandb` (`None` → disabled);
    /// `WANDB_MODE` / `WANDB_PROJECT` / `WANDB_ENTITY` / `WANDB_RUN_ID` override it. `run_config`
    /// is the resolved recipe (sent as the run config); `state` the trainer state (restored from
    /// the checkpoint when `resumed`); `endpoint` overrides `WANDB_BASE_URL` + `WANDB_API_KEY`
    /// (tests).
    ///
    /// # Errors
    /// [`TrainError::Other`] naming `logging.wandb`: an invalid section, no API key in online
    /// mode, or a resume whose run cannot be looked up on the server (say how to go on).
    pub fn start(
        section: Option<&WandbConfig>,
        run_config: Value,
        run_root: &Path,
        state: &TrainerState,
        resumed: bool,
        endpoint: Option<Endpoint>,
    ) -> Result<Self, TrainError> {
        let Some(w) = section else {
            return Ok(Self::disabled());
        };
        let err = |e: mmada_wandb::WandbError| TrainError::Other(format!("logging.wandb: {e}"));
        let mut w = w.clone();
        w.apply_env().map_err(err)?;
        let saved = state
            .extra
            .get(STATE_KEY)
            .and_then(|v| serde_json::from_value::<WandbResumeState>(v.clone()).ok());
        let policy = w.resume;
        let saved = saved.filter(|_| policy != WandbResume::Never);
        let ask_server = match policy {
            WandbResume::Auto => resumed,
            WandbResume::Allow | WandbResume::Must => true,
            WandbResume::Never => false,
        };
        let resume = match saved {
            Some(s) => Some(s),
            None if ask_server && w.mode == WandbMode::Online => {
                Self::lookup(&w, endpoint.as_ref(), state.step)?
            }
            None => None,
        };
        if policy == WandbResume::Must && resume.is_none() {
            return Err(TrainError::Other(format!(
                "logging.wandb: resume is `must` (WANDB_RESUME) but there is no wandb run to continue: {}; set logging.wandb.run_id / WANDB_RUN_ID to a run the server has (online mode), or unset WANDB_RESUME",
                if w.run_id.is_some() {
                    "the checkpoint saved none and the server does not have the named run"
                } else {
                    "the checkpoint saved none and no run id is named"
                }
            )));
        }
        let init = RunInit {
            run_config,
            resume,
            endpoint,
        };
        Ok(TrainerWandb {
            run: WandbRun::start(&w, run_root, init).map_err(err)?,
        })
    }

    /// `RunResumeStatus` for a resume without saved state (see the module docs).
    fn lookup(
        w: &WandbConfig,
        endpoint: Option<&Endpoint>,
        step: u64,
    ) -> Result<Option<WandbResumeState>, TrainError> {
        let Some(run_id) = &w.run_id else {
            tracing::warn!(
                "resuming at step {step} without a saved wandb run (no `wandb` in trainer_state.json) and without logging.wandb.run_id / WANDB_RUN_ID: metrics go to a new wandb run"
            );
            return Ok(None);
        };
        let endpoint = match endpoint {
            Some(e) => e.clone(),
            None => Endpoint::from_env(w.base_url.as_deref())
                .map_err(|e| TrainError::Other(format!("logging.wandb: {e}")))?,
        };
        match mmada_wandb::query_resume_status(&endpoint, w, run_id, Some(step)) {
            Ok(Some(s)) => {
                tracing::info!(
                    run_id = %run_id,
                    history_lines = s.history_lines,
                    "continuing wandb run `{run_id}` as the server reports it (RunResumeStatus)"
                );
                Ok(Some(s))
            }
            Ok(None) => {
                tracing::info!(
                    "wandb run `{run_id}` does not exist on the server yet: creating it"
                );
                Ok(None)
            }
            Err(e) => Err(TrainError::Other(format!(
                "logging.wandb: resuming wandb run `{run_id}` without a saved offset, and the server could not say where it stands ({e}); try again, or set WANDB_MODE=offline (metrics are spooled for `mmada-train wandb-sync`) or a new logging.wandb.run_id"
            ))),
        }
    }

    /// Sends one `metrics.jsonl` row (a JSON object; `step` stays a key) as the history row of
    /// `step`. Never blocks.
    pub fn log_row(&mut self, step: u64, row: &Value) {
        if let Value::Object(map) = row {
            self.run.log_map(step, map.clone());
        }
    }

    /// The user pressed "stop" in the wandb UI.
    pub fn stop_requested(&self) -> bool {
        self.run.stop_requested()
    }

    /// Stores the resume state in `state.extra` (call right before writing a checkpoint).
    pub fn record(&self, state: &mut TrainerState) {
        if let Some(ws) = self.run.resume_state() {
            state.extra.insert(
                STATE_KEY.into(),
                serde_json::to_value(ws).expect("resume state serialises"),
            );
        }
    }

    /// Tells the server that the run is being stopped by a signal (not crashed).
    pub fn preempting(&mut self) {
        self.run.mark_preempting();
    }

    /// The wandb run id (`None` when disabled).
    pub fn run_id(&self) -> Option<&str> {
        self.run.run_id()
    }

    /// Sets the final summary keys and finishes with `exitcode` (0 = success, 1 = stopped early).
    pub fn finish(mut self, summary: &[(&str, f64)], exitcode: i32) {
        for (k, v) in summary {
            if v.is_finite() {
                self.run.summary(k, *v);
            }
        }
        let report = self.run.finish(exitcode);
        if report.rows_spooled > 0 {
            tracing::warn!(
                "wandb: {} of {} rows could not be sent and are in {}; replay with `mmada-train wandb-sync RUN_DIR`",
                report.rows_spooled,
                report.rows_logged,
                report
                    .spool_path
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            );
        }
    }
}
