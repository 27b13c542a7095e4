//! Weights & Biases run logging over plain HTTP, without the Python SDK.
//!
//! - [`WandbRun`]: the handle the trainer holds. `start(config, run_dir, init)` → `log(step,
//!   metrics)` (never blocks) → `summary` / `console` / `mark_preempting` → `finish(exitcode)`.
//!   A background thread speaks the wandb protocol (`UpsertBucket`, file_stream history rows
//!   with `_step`/`_runtime`/`_timestamp` at contiguous offsets, summary, heartbeats,
//!   `preempting`, `complete` + `exitcode`), retries 429/5xx/network errors with exponential
//!   backoff + jitter honouring `Retry-After`, and spools what it cannot deliver.
//! - [`WandbConfig`]: the recipe section `logging.wandb` (`mode: online | offline | disabled`).
//! - [`WandbResumeState`]: saved in `trainer_state.json`; a resumed run continues the same
//!   wandb run at the same history offset.
//! - [`sync`]: replays `RUN_DIR/wandb-spool.jsonl` (offline runs, outages) to the server; what
//!   `mmada-train wandb-sync RUN_DIR` calls.
//! - [`query_resume_status`]: `RunResumeStatus`, the server's view of an existing run (history
//!   line count and tail, summary, runtime) as a [`WandbResumeState`], for a trainer that resumes
//!   without a saved one.
//! - `testing`: a loopback fake server and helpers for tests (always compiled, so the
//!   crate has one feature set under `cargo build` and `cargo test`).
//! - [`MetricsLog`]: the local `RUN_DIR/metrics.jsonl`, independent of wandb.
//!
//! The API key comes from `WANDB_API_KEY` or `~/.netrc` only ([`Endpoint::from_env`]); it is
//! never printed, logged or written anywhere ([`ApiKey`]'s `Debug` is redacted; the spool and the
//! resume state do not contain it). The protocol is documented in
//! `shared/docs/wandb-protocol.md`.

mod auth;
mod config;
mod error;
mod metrics_log;
mod protocol;
mod resume_status;
mod run;
mod spool;
mod sync;
mod transport;
mod worker;

pub mod testing;

pub use auth::{ApiKey, DEFAULT_BASE_URL, Endpoint};
pub use config::{WandbConfig, WandbMode, WandbResume};
pub use error::WandbError;
pub use metrics_log::{METRICS_FILE, MetricsLog};
pub use protocol::{encode_config, generate_run_id};
pub use resume_status::query_resume_status;
pub use run::{FinishReport, RunInit, WandbResumeState, WandbRun};
pub use spool::SPOOL_FILE;
pub use sync::{SyncOptions, SyncReport, SyncedRun, sync};

/// Installs rustls' ring crypto provider as the process default if none is installed yet.
/// [`WandbRun::start`] and [`sync`] call it; binaries that build other rustls clients may call it
/// first.
pub fn install_crypto_provider() {
    transport::install_crypto_provider();
}
