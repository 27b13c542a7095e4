//! `metrics.jsonl`: the local, always-on record of every logged step.

use serde_json::{Map, Value};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use crate::WandbError;
use crate::protocol;

/// File name of the local metrics log inside the run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Appends one JSON object per logged step to `RUN_DIR/metrics.jsonl`:
/// `{"step": 12, "timestamp": 1796014454.55, "train/loss": 0.5, ...}`. Needs no network and no
/// wandb config. Each line is written with a single `write` call, so a crash leaves at most one
/// torn last line.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens `run_dir/metrics.jsonl` for appending (creating the directory and file).
    pub fn open(run_dir: &Path) -> Result<Self, WandbError> {
        std::fs::create_dir_all(run_dir).map_err(|e| WandbError::io(run_dir, e))?;
        let path = run_dir.join(METRICS_FILE);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| WandbError::io(&path, e))?;
        Ok(MetricsLog { path, file })
    }

    /// Opens the log of a resumed run: drops the lines with `step > last_step` (steps that the
    /// interrupted process logged after its last checkpoint and that will be logged again) and
    /// any torn line, then appends.
    pub fn open_resumed(run_dir: &Path, last_step: u64) -> Result<Self, WandbError> {
        let path = run_dir.join(METRICS_FILE);
        if path.exists() {
            let f = File::open(&path).map_err(|e| WandbError::io(&path, e))?;
            let mut kept = String::new();
            for line in BufReader::new(f).lines() {
                let line = line.map_err(|e| WandbError::io(&path, e))?;
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if v.get("step")
                    .and_then(Value::as_u64)
                    .is_some_and(|s| s <= last_step)
                {
                    kept.push_str(&line);
                    kept.push('\n');
                }
            }
            let tmp = run_dir.join(format!("{METRICS_FILE}.tmp"));
            std::fs::write(&tmp, kept).map_err(|e| WandbError::io(&tmp, e))?;
            std::fs::rename(&tmp, &path).map_err(|e| WandbError::io(&path, e))?;
        }
        Self::open(run_dir)
    }

    /// The file written to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one step. Non-finite values are written as `null`.
    pub fn log(&mut self, step: u64, metrics: &[(&str, f64)]) -> Result<(), WandbError> {
        let mut m = Map::with_capacity(metrics.len());
        for (k, v) in metrics {
            m.insert((*k).to_string(), protocol::metric_value(*v));
        }
        self.log_map(step, &m)
    }

    /// Appends one step with arbitrary JSON values (`step` and `timestamp` are set here).
    pub fn log_map(&mut self, step: u64, metrics: &Map<String, Value>) -> Result<(), WandbError> {
        let mut row = Map::with_capacity(metrics.len() + 2);
        row.insert("step".into(), Value::from(step));
        row.insert(
            "timestamp".into(),
            protocol::metric_value(protocol::unix_now()),
        );
        for (k, v) in metrics {
            if k != "step" && k != "timestamp" {
                row.insert(k.clone(), v.clone());
            }
        }
        let mut line = Value::Object(row).to_string();
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| WandbError::io(&self.path, e))
    }
}
