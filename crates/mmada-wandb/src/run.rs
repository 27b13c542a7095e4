//! The handle the trainer holds: [`WandbRun`].

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::WandbMode;
use crate::protocol::{self, RunMeta};
use crate::spool::{self, SharedSpool, Spool, SpoolRecord};
use crate::transport::Transport;
use crate::worker::{Msg, Settings, Shared, Worker};
use crate::{Endpoint, WandbConfig, WandbError};

/// What the trainer saves in `trainer_state.json` so that a resumed training run continues the
/// same wandb run: the run id, where the history continues, and the runtime so far.
///
/// Resuming re-logs the steps after the checkpoint at the same history lines, so the rows that
/// an interrupted run sent after its last checkpoint are overwritten, not duplicated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WandbResumeState {
    /// The wandb run id (the short id in the run's URL).
    pub run_id: String,
    /// The server's storage id of the run (`bucket.id`), once known.
    #[serde(default)]
    pub storage_id: Option<String>,
    /// The entity the run lives in, once known.
    #[serde(default)]
    pub entity: Option<String>,
    /// The project.
    pub project: String,
    /// History lines logged so far (= the file_stream offset of the next row).
    pub history_lines: u64,
    /// Console lines logged so far.
    #[serde(default)]
    pub console_lines: u64,
    /// `_runtime` so far, in seconds.
    pub runtime_secs: f64,
    /// The summary so far (last values + explicit summary keys).
    #[serde(default)]
    pub summary: Map<String, Value>,
}

/// What [`WandbRun::finish`] achieved.
#[derive(Debug, Clone, PartialEq)]
pub struct FinishReport {
    /// The server accepted the final request (`complete` + `exitcode`).
    pub delivered: bool,
    /// History rows logged by this process (absolute line count, resume included).
    pub rows_logged: u64,
    /// History rows the server accepted from this process.
    pub rows_delivered: u64,
    /// History rows written to the spool (to be replayed by [`crate::sync`]).
    pub rows_spooled: u64,
    /// The spool file, if this process wrote to it.
    pub spool_path: Option<PathBuf>,
}

/// Extra inputs of [`WandbRun::start`] besides the config and the run directory.
#[derive(Debug, Clone, Default)]
pub struct RunInit {
    /// The resolved recipe, sent as the run config (keys become wandb config keys).
    pub run_config: Value,
    /// State saved by an earlier process of the same training run (see [`WandbResumeState`]).
    pub resume: Option<WandbResumeState>,
    /// Where to send requests; `None` = [`Endpoint::from_env`] (online mode only).
    pub endpoint: Option<Endpoint>,
}

struct Inner {
    tx: SyncSender<Msg>,
    shared: Arc<Shared>,
    spool: SharedSpool,
    thread: Option<JoinHandle<()>>,
    spooler: Option<JoinHandle<()>>,
    run_id: String,
    project: String,
    entity: Option<String>,
    storage_id: Option<String>,
    next_line: u64,
    console_line: u64,
    console_enabled: bool,
    started: Instant,
    runtime_offset: f64,
    summary: Map<String, Value>,
    finish_wait: Duration,
}

/// A wandb run fed from the training loop.
///
/// [`WandbRun::log`] never blocks: it stamps the row (`_step`, `_runtime`, `_timestamp`) and
/// hands it to a background thread through a bounded queue; when the queue is full the row is
/// appended to the spool instead. The thread creates/resumes the run (`UpsertBucket`), posts
/// batches to file_stream every `flush_interval_secs`, retries 429/5xx/network errors with
/// exponential backoff and jitter (honouring `Retry-After`), stops on other 4xx (logged once),
/// and spools whatever it cannot deliver. Dropping the handle without [`WandbRun::finish`]
/// finishes with exit code 1.
pub struct WandbRun {
    mode: WandbMode,
    inner: Option<Inner>,
}

impl std::fmt::Debug for WandbRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WandbRun")
            .field("mode", &self.mode)
            .field("run_id", &self.inner.as_ref().map(|i| &i.run_id))
            .finish()
    }
}

impl WandbRun {
    /// A run that does nothing (what `mode: disabled` gives).
    pub fn disabled() -> Self {
        WandbRun {
            mode: WandbMode::Disabled,
            inner: None,
        }
    }

    /// Validates `config`, then starts the run: in `online` mode resolves the endpoint (unless
    /// given in `init`) and starts the sender thread; in `offline` mode starts a thread that only
    /// writes the spool in `run_dir` (or [`WandbConfig::local_dir`]); in `disabled` mode does
    /// nothing.
    ///
    /// Network problems never make this fail (they are retried in the background); a missing
    /// API key, an invalid config or an unwritable run directory do.
    pub fn start(config: &WandbConfig, run_dir: &Path, init: RunInit) -> Result<Self, WandbError> {
        config.validate()?;
        if config.mode == WandbMode::Disabled {
            return Ok(WandbRun::disabled());
        }
        let local_dir = config.local_dir(run_dir);
        std::fs::create_dir_all(&local_dir).map_err(|e| WandbError::io(&local_dir, e))?;
        let transport = if config.mode == WandbMode::Online {
            let endpoint = match init.endpoint {
                Some(e) => e,
                None => Endpoint::from_env(config.base_url.as_deref())?,
            };
            Some(Transport::new(
                &endpoint,
                WandbConfig::secs(config.request_timeout_secs),
            )?)
        } else {
            None
        };

        // Continue the saved run only if it belongs to the same project.
        let resume = init.resume.filter(|r| {
            r.project == config.project && config.run_id.as_ref().is_none_or(|id| *id == r.run_id)
        });
        let run_id = match (&resume, &config.run_id) {
            (Some(r), _) => r.run_id.clone(),
            (None, Some(id)) => id.clone(),
            (None, None) => protocol::generate_run_id(),
        };
        let display_name = config.name.clone().or_else(|| {
            run_dir
                .canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        });
        let meta = RunMeta {
            run_id: run_id.clone(),
            project: config.project.clone(),
            entity: config
                .entity
                .clone()
                .or_else(|| resume.as_ref().and_then(|r| r.entity.clone())),
            display_name,
            tags: config.tags.clone(),
            notes: config.notes.clone(),
            group: config.group.clone(),
            job_type: config.job_type.clone(),
            config: init.run_config,
            storage_id: resume.as_ref().and_then(|r| r.storage_id.clone()),
        };
        let (start_line, console_start, runtime_offset, summary) = match &resume {
            Some(r) => (
                r.history_lines,
                r.console_lines,
                r.runtime_secs.max(0.0),
                r.summary.clone(),
            ),
            None => (0, 0, 0.0, Map::new()),
        };

        let shared = Arc::new(Shared::default());
        shared.logged_lines.store(start_line, Ordering::Release);
        let spool: SharedSpool = Arc::new(Mutex::new(Spool::new(&local_dir, meta.clone())));
        let (tx, rx) = mpsc::sync_channel(config.queue_capacity);
        let settings = Settings {
            flush_interval: WandbConfig::secs(config.flush_interval_secs),
            heartbeat: WandbConfig::secs(config.heartbeat_secs),
            retry_base: WandbConfig::secs(config.retry_base_secs),
            retry_max: WandbConfig::secs(config.retry_max_secs),
            spool_after_failures: config.spool_after_failures,
            finish_timeout: WandbConfig::secs(config.finish_timeout_secs),
        };
        let worker = Worker::new(
            rx,
            shared.clone(),
            spool.clone(),
            transport,
            settings,
            meta.clone(),
            start_line,
            summary.clone(),
            console_start,
        );
        let thread = std::thread::Builder::new()
            .name("wandb-sender".into())
            .spawn(move || worker.run())
            .map_err(|e| WandbError::Client(format!("cannot spawn the wandb thread: {e}")))?;
        let spooler = {
            let (sh, sp, id) = (shared.clone(), spool.clone(), run_id.clone());
            std::thread::Builder::new()
                .name("wandb-spooler".into())
                .spawn(move || crate::worker::spooler(sh, sp, id))
                .map_err(|e| WandbError::Client(format!("cannot spawn the wandb thread: {e}")))?
        };
        let finish_wait = WandbConfig::secs(config.finish_timeout_secs)
            + WandbConfig::secs(config.request_timeout_secs) * 2
            + Duration::from_secs(5);
        Ok(WandbRun {
            mode: config.mode,
            inner: Some(Inner {
                tx,
                shared,
                spool,
                thread: Some(thread),
                spooler: Some(spooler),
                run_id,
                project: meta.project,
                entity: meta.entity,
                storage_id: meta.storage_id,
                next_line: start_line,
                console_line: console_start,
                console_enabled: config.console,
                started: Instant::now(),
                runtime_offset,
                summary,
                finish_wait,
            }),
        })
    }

    /// The mode this run was started in.
    pub fn mode(&self) -> WandbMode {
        self.mode
    }

    /// The wandb run id (`None` when disabled).
    pub fn run_id(&self) -> Option<&str> {
        self.inner.as_ref().map(|i| i.run_id.as_str())
    }

    /// Logs one history row for `step` (the trainer's global step becomes `_step`). Never blocks
    /// and never fails: a full queue sends the row to the spool. Non-finite values are sent as
    /// `null` (JSON has no NaN).
    pub fn log(&mut self, step: u64, metrics: &[(&str, f64)]) {
        if self.inner.is_none() {
            return;
        }
        let mut row = Map::with_capacity(metrics.len() + 3);
        for (k, v) in metrics {
            row.insert((*k).to_string(), protocol::metric_value(*v));
        }
        self.log_map(step, row);
    }

    /// [`WandbRun::log`] with arbitrary JSON values (keys starting with `_` other than the ones
    /// this crate sets are passed through as they are).
    pub fn log_map(&mut self, step: u64, mut row: Map<String, Value>) {
        let Some(inner) = self.inner.as_mut() else {
            return;
        };
        let runtime = inner.runtime_offset + inner.started.elapsed().as_secs_f64();
        row.insert("_step".into(), Value::from(step));
        row.insert("_runtime".into(), protocol::metric_value(runtime));
        row.insert(
            "_timestamp".into(),
            protocol::metric_value(protocol::unix_now()),
        );
        for (k, v) in &row {
            inner.summary.insert(k.clone(), v.clone());
        }
        let line = inner.next_line;
        inner.next_line += 1;
        match inner.tx.try_send(Msg::Row { line, row }) {
            Ok(()) => {}
            Err(TrySendError::Full(Msg::Row { line, row }))
            | Err(TrySendError::Disconnected(Msg::Row { line, row })) => {
                // No file I/O here: the spooler thread writes it to the spool.
                let mut ov = inner
                    .shared
                    .overflow
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                let wake = ov.is_empty();
                ov.push((line, row));
                drop(ov);
                if wake {
                    inner.shared.overflow_cv.notify_one();
                }
            }
            Err(_) => unreachable!("a Row message comes back as a Row"),
        }
        inner
            .shared
            .logged_lines
            .store(inner.next_line, Ordering::Release);
    }

    /// Sets a summary key (e.g. `best_loss`); the whole summary is sent with the next flush.
    pub fn summary(&mut self, key: &str, value: impl Into<Value>) {
        let Some(inner) = self.inner.as_mut() else {
            return;
        };
        inner.summary.insert(key.to_string(), value.into());
        // A summary update that finds the queue full is sent with the next one or at finish.
        let _ = inner.tx.try_send(Msg::Summary(inner.summary.clone()));
    }

    /// Streams a console line as `output.log` (only when `console: true`; best effort, not
    /// spooled).
    pub fn console(&mut self, text: &str) {
        let Some(inner) = self.inner.as_mut() else {
            return;
        };
        if !inner.console_enabled {
            return;
        }
        let line = inner.console_line;
        inner.console_line += 1;
        let _ = inner.tx.try_send(Msg::Console {
            line,
            text: text.to_string(),
        });
    }

    /// Tells the server that the run is about to be preempted (SIGTERM from a scheduler), so it
    /// is not marked crashed when heartbeats stop. Sent as soon as possible.
    pub fn mark_preempting(&mut self) {
        if let Some(inner) = self.inner.as_mut()
            && let Err(TrySendError::Full(_)) = inner.tx.try_send(Msg::Preempting)
        {
            spool::lock(&inner.spool).append(&[SpoolRecord::Preempting {
                run_id: inner.run_id.clone(),
            }]);
        }
    }

    /// True once the server answered `"stopped": true` (the user pressed "stop" in the UI):
    /// the trainer should save and finish.
    pub fn stop_requested(&self) -> bool {
        self.inner
            .as_ref()
            .is_some_and(|i| i.shared.stop_requested.load(Ordering::Acquire))
    }

    /// History rows the server has accepted so far.
    pub fn rows_delivered(&self) -> u64 {
        self.inner
            .as_ref()
            .map_or(0, |i| i.shared.rows_delivered.load(Ordering::Relaxed))
    }

    /// History rows written to the spool so far.
    pub fn rows_spooled(&self) -> u64 {
        self.inner
            .as_ref()
            .map_or(0, |i| i.shared.rows_spooled.load(Ordering::Relaxed))
    }

    /// The state to save with a checkpoint (`None` when disabled). Call it at the same point
    /// where the trainer records its step, so the history offset matches the checkpoint.
    pub fn resume_state(&self) -> Option<WandbResumeState> {
        let inner = self.inner.as_ref()?;
        let bucket = inner
            .shared
            .bucket
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Some(WandbResumeState {
            run_id: inner.run_id.clone(),
            storage_id: bucket
                .as_ref()
                .map(|b| b.storage_id.clone())
                .or_else(|| inner.storage_id.clone()),
            entity: bucket
                .as_ref()
                .map(|b| b.entity.clone())
                .or_else(|| inner.entity.clone()),
            project: bucket
                .as_ref()
                .map_or_else(|| inner.project.clone(), |b| b.project.clone()),
            history_lines: inner.next_line,
            console_lines: inner.console_line,
            runtime_secs: inner.runtime_offset + inner.started.elapsed().as_secs_f64(),
            summary: inner.summary.clone(),
        })
    }

    /// Finishes the run: delivers what is left plus `complete: true` and `exitcode` (0 =
    /// success), waiting at most about `finish_timeout_secs`; whatever is not delivered by then
    /// goes to the spool together with the exit code, for [`crate::sync`].
    pub fn finish(mut self, exitcode: i32) -> FinishReport {
        self.finish_inner(exitcode)
    }

    fn finish_inner(&mut self, exitcode: i32) -> FinishReport {
        let Some(mut inner) = self.inner.take() else {
            return FinishReport {
                delivered: false,
                rows_logged: 0,
                rows_delivered: 0,
                rows_spooled: 0,
                spool_path: None,
            };
        };
        let (reply_tx, reply_rx) = mpsc::channel();
        let msg = Msg::Finish {
            exitcode,
            summary: inner.summary.clone(),
            reply: reply_tx,
        };
        let fallback = |inner: &Inner| {
            // The thread is gone or stuck: record the end in the spool ourselves.
            crate::worker::drain_overflow(&inner.shared, &inner.spool, &inner.run_id);
            let mut s = spool::lock(&inner.spool);
            s.append(&[
                SpoolRecord::Summary {
                    run_id: inner.run_id.clone(),
                    summary: inner.summary.clone(),
                },
                SpoolRecord::Finish {
                    run_id: inner.run_id.clone(),
                    exitcode,
                },
            ]);
            FinishReport {
                delivered: false,
                rows_logged: inner.next_line,
                rows_delivered: inner.shared.rows_delivered.load(Ordering::Relaxed),
                rows_spooled: inner.shared.rows_spooled.load(Ordering::Relaxed),
                spool_path: Some(s.path().to_path_buf()),
            }
        };
        let report = if inner.tx.send(msg).is_err() {
            fallback(&inner)
        } else {
            match reply_rx.recv_timeout(inner.finish_wait) {
                Ok(report) => {
                    if let Some(t) = inner.thread.take() {
                        let _ = t.join();
                    }
                    report
                }
                Err(_) => {
                    tracing::error!(
                        "the wandb thread did not finish in time; recording the end in the spool"
                    );
                    fallback(&inner)
                }
            }
        };
        inner.shared.spooler_stop.store(true, Ordering::Release);
        inner.shared.overflow_cv.notify_one();
        if let Some(t) = inner.spooler.take() {
            let _ = t.join();
        }
        report
    }
}

impl Drop for WandbRun {
    fn drop(&mut self) {
        if self.inner.is_some() {
            let _ = self.finish_inner(1);
        }
    }
}
