//! The run directory and its checkpoints (architecture.md "Run directory").
//!
//! ```text
//! runs/<name>/
//!   config.resolved.yaml
//!   metrics.jsonl
//!   checkpoints/
//!     step-000100/{model/, optimizer.safetensors, trainer_state.json}
//!     latest            names the newest complete checkpoint
//! ```
//! A checkpoint is written under `.step-000100.tmp-<pid>` and renamed when complete; `latest`
//! is replaced atomically afterwards, so a crash at any point leaves the previous checkpoint
//! intact and `latest` naming a complete one.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::DataCursor;

/// `p` relative to `base` (recipe paths are relative to the recipe's folder or the working
/// directory); an absolute `p` is kept.
pub fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// Error in the run directory.
#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    /// File-system error.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// Nothing to resume from.
    #[error("{0}: no checkpoint to resume from (no `latest` file); start without --resume")]
    NoCheckpoint(PathBuf),
    /// A malformed trainer state.
    #[error("{path}: invalid trainer state: {message}")]
    BadState {
        /// The file.
        path: PathBuf,
        /// Parser message.
        message: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RunDirError + '_ {
    move |source| RunDirError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Everything besides model and optimizer tensors needed to continue a run exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    /// The run seed (all RNG streams derive from it and the step).
    pub seed: u64,
    /// Data mixture cursors.
    pub data: DataCursor,
    /// Step losses so far (the loss trajectory, for resume checks and plots). A non-finite
    /// loss (a step the guard skipped, [`crate::guard`]) is written as JSON `null` and read
    /// back as NaN.
    #[serde(deserialize_with = "losses_with_nulls")]
    pub losses: Vec<f32>,
    /// Free-form extras (wandb run id and offsets when configured).
    #[serde(default)]
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// `mmada-train` version that wrote it.
    pub version: String,
}

/// `losses` with `null` for NaN (serde_json writes non-finite floats as `null`).
fn losses_with_nulls<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
    let v: Vec<Option<f32>> = Deserialize::deserialize(d)?;
    Ok(v.into_iter().map(|x| x.unwrap_or(f32::NAN)).collect())
}

impl TrainerState {
    /// The state of a fresh run with seed `seed` (step 0, no losses, empty data cursor).
    pub fn new(seed: u64) -> Self {
        TrainerState {
            step: 0,
            seed,
            data: Default::default(),
            losses: vec![],
            extra: Default::default(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

/// A run directory.
#[derive(Debug, Clone)]
pub struct RunDir {
    root: PathBuf,
}

/// Write `bytes` to `path` atomically (temporary file in the same folder, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RunDirError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    {
        let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    fs::rename(&tmp, path).map_err(io(path))
}

impl RunDir {
    /// Open (creating) `root`.
    ///
    /// # Errors
    /// [`RunDirError::Io`].
    pub fn create(root: &Path) -> Result<Self, RunDirError> {
        fs::create_dir_all(root.join("checkpoints")).map_err(io(root))?;
        Ok(RunDir {
            root: root.to_path_buf(),
        })
    }

    /// The root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `checkpoints/`.
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    /// `metrics.jsonl`.
    pub fn metrics_path(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }

    /// The directory name of the checkpoint at `step`.
    pub fn step_dir(&self, step: u64) -> PathBuf {
        self.checkpoints().join(format!("step-{step:06}"))
    }

    /// A fresh temporary directory for the checkpoint at `step` (removed first if left over).
    ///
    /// # Errors
    /// [`RunDirError::Io`].
    pub fn begin_checkpoint(&self, step: u64) -> Result<PathBuf, RunDirError> {
        let tmp = self
            .checkpoints()
            .join(format!(".step-{step:06}.tmp-{}", std::process::id()));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        Ok(tmp)
    }

    /// Publish a completed temporary checkpoint: rename it to `step-NNNNNN`, point `latest` at
    /// it, then delete all but the newest `keep_last` (0 keeps all).
    ///
    /// # Errors
    /// [`RunDirError::Io`].
    pub fn commit_checkpoint(
        &self,
        tmp: &Path,
        step: u64,
        keep_last: usize,
    ) -> Result<PathBuf, RunDirError> {
        let dst = self.step_dir(step);
        if dst.exists() {
            fs::remove_dir_all(&dst).map_err(io(&dst))?;
        }
        fs::rename(tmp, &dst).map_err(io(&dst))?;
        let name = dst
            .file_name()
            .expect("named")
            .to_string_lossy()
            .into_owned();
        write_atomic(
            &self.checkpoints().join("latest"),
            format!("{name}\n").as_bytes(),
        )?;
        if keep_last > 0 {
            let mut steps = self.list_checkpoints()?;
            steps.sort();
            let n = steps.len();
            for s in steps.into_iter().take(n.saturating_sub(keep_last)) {
                let d = self.step_dir(s);
                fs::remove_dir_all(&d).map_err(io(&d))?;
            }
        }
        Ok(dst)
    }

    /// Steps of the complete checkpoints present.
    ///
    /// # Errors
    /// [`RunDirError::Io`].
    pub fn list_checkpoints(&self) -> Result<Vec<u64>, RunDirError> {
        let dir = self.checkpoints();
        let mut out = vec![];
        for e in fs::read_dir(&dir).map_err(io(&dir))? {
            let name = e
                .map_err(io(&dir))?
                .file_name()
                .to_string_lossy()
                .into_owned();
            if let Some(s) = name.strip_prefix("step-").and_then(|s| s.parse().ok()) {
                out.push(s);
            }
        }
        Ok(out)
    }

    /// The checkpoint `latest` names.
    ///
    /// # Errors
    /// [`RunDirError::NoCheckpoint`] when there is none.
    pub fn latest(&self) -> Result<PathBuf, RunDirError> {
        let f = self.checkpoints().join("latest");
        let name =
            fs::read_to_string(&f).map_err(|_| RunDirError::NoCheckpoint(self.root.clone()))?;
        let dir = self.checkpoints().join(name.trim());
        if !dir.join("trainer_state.json").is_file() {
            return Err(RunDirError::NoCheckpoint(self.root.clone()));
        }
        Ok(dir)
    }
}

/// Read `trainer_state.json` of a checkpoint directory.
///
/// # Errors
/// [`RunDirError`].
pub fn read_state(ckpt: &Path) -> Result<TrainerState, RunDirError> {
    let p = ckpt.join("trainer_state.json");
    let text = fs::read_to_string(&p).map_err(io(&p))?;
    serde_json::from_str(&text).map_err(|e| RunDirError::BadState {
        path: p,
        message: e.to_string(),
    })
}
