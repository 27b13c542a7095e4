//! The `logging.wandb` section of a training recipe.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::WandbError;

/// Where the metrics go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WandbMode {
    /// Send to the server in a background thread; whatever cannot be sent lands in the spool.
    #[default]
    Online,
    /// No network at all: everything goes to the spool (`wandb-spool.jsonl`) for a later `sync`.
    Offline,
    /// Nothing is sent or spooled.
    Disabled,
}

impl std::str::FromStr for WandbMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "online" | "run" => Ok(WandbMode::Online),
            "offline" | "dryrun" => Ok(WandbMode::Offline),
            "disabled" | "off" => Ok(WandbMode::Disabled),
            other => Err(format!(
                "unknown wandb mode `{other}` (expected online, offline or disabled)"
            )),
        }
    }
}

/// What to do with an existing wandb run (`logging.wandb.resume`, environment `WANDB_RESUME`,
/// the Python SDK's `resume=` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WandbResume {
    /// Default: a resumed training run continues the wandb run saved in its checkpoint; a
    /// fresh one starts a new wandb run (or the one named by `run_id`).
    #[default]
    Auto,
    /// As `auto`, and a fresh training run with an explicit `run_id` continues that wandb run
    /// when the server has it (its history offset asked from the server).
    Allow,
    /// There must be a wandb run to continue (saved in the checkpoint, or `run_id` on the
    /// server); otherwise the run does not start.
    Must,
    /// Always a new wandb run, even when resuming training from a checkpoint.
    Never,
}

impl std::str::FromStr for WandbResume {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "true" => Ok(WandbResume::Auto),
            "allow" => Ok(WandbResume::Allow),
            "must" => Ok(WandbResume::Must),
            "never" | "false" => Ok(WandbResume::Never),
            other => Err(format!(
                "unknown wandb resume `{other}` (expected auto, allow, must or never)"
            )),
        }
    }
}

/// The wandb settings of a recipe (`logging.wandb`).
///
/// Every field has a default, so `logging: { wandb: { project: my-proj } }` is a complete section.
/// Unknown keys are rejected when deserialising. The API key is deliberately **not** a field: it
/// comes from `WANDB_API_KEY` or `~/.netrc` only, so it never ends up in `config.resolved.yaml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WandbConfig {
    /// `online` (default), `offline` or `disabled`. The environment variable `WANDB_MODE`
    /// overrides it when [`WandbConfig::apply_env`] is called.
    pub mode: WandbMode,
    /// The wandb project (required unless disabled).
    pub project: String,
    /// The entity (user or team); `None` = the key owner's default entity.
    pub entity: Option<String>,
    /// Display name of the run; `None` = the run directory's name.
    pub name: Option<String>,
    /// Run tags.
    pub tags: Vec<String>,
    /// Run notes (description).
    pub notes: Option<String>,
    /// Run group.
    pub group: Option<String>,
    /// Job type.
    pub job_type: Option<String>,
    /// Explicit run id (8–64 chars of `[a-z0-9_-]`); `None` = generated, or the id restored from
    /// the resume state.
    pub run_id: Option<String>,
    /// Server base URL; `None` = `WANDB_BASE_URL`, else `https://api.wandb.ai`.
    pub base_url: Option<String>,
    /// Folder for the local wandb files (the spool, `wandb-spool.jsonl`): they go to
    /// `dir/<run directory name>/`. `None` (default) = the run directory itself. `WANDB_DIR`
    /// overrides it.
    pub dir: Option<PathBuf>,
    /// What to do with an existing wandb run (see [`WandbResume`]); `WANDB_RESUME` overrides it.
    pub resume: WandbResume,
    /// Seconds between two file_stream flushes (history rows are batched in between).
    pub flush_interval_secs: f64,
    /// Seconds without any request after which an empty `{}` heartbeat is posted.
    pub heartbeat_secs: f64,
    /// Capacity of the queue between `log()` and the sender thread; when full, rows go straight
    /// to the spool instead of blocking.
    pub queue_capacity: usize,
    /// First retry wait in seconds (doubles each attempt, +0–25 % jitter).
    pub retry_base_secs: f64,
    /// Longest retry wait in seconds.
    pub retry_max_secs: f64,
    /// Per-request timeout in seconds.
    pub request_timeout_secs: f64,
    /// After this many failed attempts in a row, rows held in memory are written to the spool
    /// (they are read back from there once the server answers again).
    pub spool_after_failures: u32,
    /// How long `finish()` keeps trying to deliver before spooling what is left.
    pub finish_timeout_secs: f64,
    /// Also stream console lines passed to `WandbRun::console` as `output.log`.
    pub console: bool,
}

impl Default for WandbConfig {
    fn default() -> Self {
        WandbConfig {
            mode: WandbMode::Online,
            project: "mmada-rs".to_string(),
            entity: None,
            name: None,
            tags: Vec::new(),
            notes: None,
            group: None,
            job_type: None,
            run_id: None,
            base_url: None,
            dir: None,
            resume: WandbResume::Auto,
            flush_interval_secs: 5.0,
            heartbeat_secs: 30.0,
            queue_capacity: 4096,
            retry_base_secs: 2.0,
            retry_max_secs: 60.0,
            request_timeout_secs: 30.0,
            spool_after_failures: 3,
            finish_timeout_secs: 60.0,
            console: false,
        }
    }
}

fn positive(key: &'static str, v: f64) -> Result<(), WandbError> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(WandbError::InvalidConfig {
            key,
            reason: format!("must be a finite number > 0, got {v}"),
        })
    }
}

/// Checks a run id: 1–64 characters of `[A-Za-z0-9_-]`.
pub(crate) fn check_run_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 {
        return Err(format!("must have 1 to 64 characters, got {}", id.len()));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(format!("character `{c}` not allowed (use [a-z0-9_-])"));
    }
    Ok(())
}

impl WandbConfig {
    /// Checks every field; the error names the first bad key.
    pub fn validate(&self) -> Result<(), WandbError> {
        if self.mode != WandbMode::Disabled && self.project.trim().is_empty() {
            return Err(WandbError::InvalidConfig {
                key: "project",
                reason: "must not be empty".into(),
            });
        }
        if let Some(e) = &self.entity
            && e.trim().is_empty()
        {
            return Err(WandbError::InvalidConfig {
                key: "entity",
                reason: "must not be empty (omit it to use the default entity)".into(),
            });
        }
        if let Some(t) = self
            .tags
            .iter()
            .find(|t| t.trim().is_empty() || t.len() > 64)
        {
            return Err(WandbError::InvalidConfig {
                key: "tags",
                reason: format!("tag `{t}` must have 1 to 64 characters"),
            });
        }
        if let Some(id) = &self.run_id {
            check_run_id(id).map_err(|reason| WandbError::InvalidConfig {
                key: "run_id",
                reason,
            })?;
        }
        if let Some(u) = &self.base_url {
            crate::auth::check_base_url(u).map_err(|reason| WandbError::InvalidConfig {
                key: "base_url",
                reason,
            })?;
        }
        positive("flush_interval_secs", self.flush_interval_secs)?;
        positive("heartbeat_secs", self.heartbeat_secs)?;
        positive("retry_base_secs", self.retry_base_secs)?;
        positive("retry_max_secs", self.retry_max_secs)?;
        positive("request_timeout_secs", self.request_timeout_secs)?;
        positive("finish_timeout_secs", self.finish_timeout_secs)?;
        if self.retry_max_secs < self.retry_base_secs {
            return Err(WandbError::InvalidConfig {
                key: "retry_max_secs",
                reason: format!(
                    "must be >= retry_base_secs ({}), got {}",
                    self.retry_base_secs, self.retry_max_secs
                ),
            });
        }
        if self.queue_capacity == 0 {
            return Err(WandbError::InvalidConfig {
                key: "queue_capacity",
                reason: "must be at least 1".into(),
            });
        }
        if self.spool_after_failures == 0 {
            return Err(WandbError::InvalidConfig {
                key: "spool_after_failures",
                reason: "must be at least 1".into(),
            });
        }
        Ok(())
    }

    /// Applies `WANDB_MODE`, `WANDB_PROJECT`, `WANDB_ENTITY`, `WANDB_RUN_ID`, `WANDB_NAME`,
    /// `WANDB_TAGS` (comma-separated), `WANDB_NOTES`, `WANDB_RUN_GROUP`, `WANDB_JOB_TYPE`,
    /// `WANDB_DIR` and `WANDB_RESUME` from the environment (they win over the recipe, as with
    /// the Python SDK). `WANDB_BASE_URL` is read later, when the endpoint is resolved. Returns an
    /// error naming the variable when `WANDB_MODE` or `WANDB_RESUME` is not a known value.
    pub fn apply_env(&mut self) -> Result<(), WandbError> {
        self.apply_env_from(|k| std::env::var(k).ok())
    }

    /// [`WandbConfig::apply_env`] with an explicit lookup (for tests).
    pub fn apply_env_from(
        &mut self,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<(), WandbError> {
        if let Some(m) = get("WANDB_MODE").filter(|s| !s.is_empty()) {
            self.mode = m.parse().map_err(|reason| WandbError::InvalidConfig {
                key: "mode",
                reason: format!("from WANDB_MODE: {reason}"),
            })?;
        }
        if let Some(p) = get("WANDB_PROJECT").filter(|s| !s.is_empty()) {
            self.project = p;
        }
        if let Some(e) = get("WANDB_ENTITY").filter(|s| !s.is_empty()) {
            self.entity = Some(e);
        }
        if let Some(r) = get("WANDB_RUN_ID").filter(|s| !s.is_empty()) {
            self.run_id = Some(r);
        }
        if let Some(n) = get("WANDB_NAME").filter(|s| !s.is_empty()) {
            self.name = Some(n);
        }
        if let Some(t) = get("WANDB_TAGS").filter(|s| !s.is_empty()) {
            // comma-separated, as the SDK reads it
            self.tags = t
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_string)
                .collect();
        }
        if let Some(n) = get("WANDB_NOTES").filter(|s| !s.is_empty()) {
            self.notes = Some(n);
        }
        if let Some(g) = get("WANDB_RUN_GROUP").filter(|s| !s.is_empty()) {
            self.group = Some(g);
        }
        if let Some(j) = get("WANDB_JOB_TYPE").filter(|s| !s.is_empty()) {
            self.job_type = Some(j);
        }
        if let Some(d) = get("WANDB_DIR").filter(|s| !s.is_empty()) {
            self.dir = Some(PathBuf::from(d));
        }
        if let Some(r) = get("WANDB_RESUME").filter(|s| !s.is_empty()) {
            self.resume = r.parse().map_err(|reason| WandbError::InvalidConfig {
                key: "resume",
                reason: format!("from WANDB_RESUME: {reason}"),
            })?;
        }
        Ok(())
    }

    /// Where the local wandb files (the spool) of the run in `run_dir` live:
    /// `dir/<run_dir's name>` when [`WandbConfig::dir`] is set, else `run_dir`.
    pub fn local_dir(&self, run_dir: &Path) -> PathBuf {
        match &self.dir {
            Some(d) => {
                let name = run_dir
                    .canonicalize()
                    .ok()
                    .and_then(|p| p.file_name().map(|n| n.to_os_string()))
                    .or_else(|| run_dir.file_name().map(|n| n.to_os_string()))
                    .unwrap_or_else(|| "run".into());
                d.join(name)
            }
            None => run_dir.to_path_buf(),
        }
    }

    pub(crate) fn secs(v: f64) -> Duration {
        Duration::from_secs_f64(v.max(0.0))
    }
}
