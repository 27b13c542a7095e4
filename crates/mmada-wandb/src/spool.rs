//! The JSONL spool (`wandb-spool.jsonl` in the run directory): everything that could not be
//! sent yet, replayed later by [`crate::sync`].
//!
//! One JSON object per line, tagged by `type`:
//! - `run`: run metadata (id, project, entity, names, tags, the resolved recipe) — written first
//!   in each process that uses the spool (a *segment*), again when the server assigned ids;
//! - `history`: one history row with its line number (`line` = file_stream offset);
//! - `summary`: the whole summary object;
//! - `preempting`, `finish` (with `exitcode`);
//! - `delivered`: lines `[from, to)` (and optionally the summary / `complete`) that reached the
//!   server after all, so `sync` does not send them again.
//!
//! Never contains the API key.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::protocol::{RunMeta, unix_now};

/// File name of the spool inside the run directory.
pub const SPOOL_FILE: &str = "wandb-spool.jsonl";

/// One spool line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum SpoolRecord {
    Run {
        #[serde(flatten)]
        meta: RunMeta,
        time: f64,
    },
    History {
        run_id: String,
        line: u64,
        row: Map<String, Value>,
    },
    Summary {
        run_id: String,
        summary: Map<String, Value>,
    },
    Preempting {
        run_id: String,
    },
    Finish {
        run_id: String,
        exitcode: i32,
    },
    Delivered {
        run_id: String,
        from: u64,
        to: u64,
        #[serde(default)]
        summary: bool,
        #[serde(default)]
        complete: bool,
    },
}

/// Appends records for one run; shared by `log()` (queue full) and the sender thread.
pub(crate) struct Spool {
    path: PathBuf,
    file: Option<File>,
    meta: RunMeta,
    segment_start: Option<u64>,
    warned: bool,
}

pub(crate) type SharedSpool = Arc<Mutex<Spool>>;

/// Locks the spool even if a panicking thread poisoned the mutex (the file stays consistent:
/// each record is one `write_all`).
pub(crate) fn lock(s: &SharedSpool) -> std::sync::MutexGuard<'_, Spool> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

impl Spool {
    pub(crate) fn new(run_dir: &Path, meta: RunMeta) -> Self {
        Spool {
            path: run_dir.join(SPOOL_FILE),
            file: None,
            meta,
            segment_start: None,
            warned: false,
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Byte offset where this process's records start, once anything was written.
    pub(crate) fn segment_start(&self) -> Option<u64> {
        self.segment_start
    }

    fn open(&mut self) -> std::io::Result<&mut File> {
        if self.file.is_none() {
            let mut f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            let start = f.seek(SeekFrom::End(0))?;
            let header = SpoolRecord::Run {
                meta: self.meta.clone(),
                time: unix_now(),
            };
            let mut line = serde_json::to_string(&header).map_err(std::io::Error::other)?;
            line.push('\n');
            f.write_all(line.as_bytes())?;
            self.segment_start = Some(start);
            self.file = Some(f);
        }
        Ok(self.file.as_mut().expect("opened above"))
    }

    /// Appends already serialised lines (each ending in `\n`) in one write. Returns false (and
    /// logs once) if the disk refused.
    pub(crate) fn append_raw(&mut self, lines: &str) -> bool {
        if lines.is_empty() {
            return true;
        }
        let res = self.open().and_then(|f| f.write_all(lines.as_bytes()));
        match res {
            Ok(()) => true,
            Err(e) => {
                if !self.warned {
                    self.warned = true;
                    tracing::error!(path = %self.path.display(), error = %e, "cannot write the wandb spool; rows are lost for wandb (metrics.jsonl still has them)");
                }
                false
            }
        }
    }

    /// Appends records.
    pub(crate) fn append(&mut self, records: &[SpoolRecord]) -> bool {
        self.append_raw(&serialize_records(records))
    }

    /// Records the server-assigned storage id / entity (rewritten as a `run` record if the
    /// header was already written).
    pub(crate) fn set_bucket(&mut self, storage_id: &str, entity: &str, project: &str) {
        self.meta.storage_id = Some(storage_id.to_string());
        self.meta.entity = Some(entity.to_string());
        self.meta.project = project.to_string();
        if self.file.is_some() {
            let rec = SpoolRecord::Run {
                meta: self.meta.clone(),
                time: unix_now(),
            };
            self.append(&[rec]);
        }
    }
}

pub(crate) fn serialize_records(records: &[SpoolRecord]) -> String {
    let mut out = String::new();
    for r in records {
        if let Ok(s) = serde_json::to_string(r) {
            out.push_str(&s);
            out.push('\n');
        }
    }
    out
}

/// Reads the records of a spool file from byte `from`. Lines that do not parse (a torn last
/// line after a crash) are skipped and counted.
pub(crate) fn read_records(path: &Path, from: u64) -> std::io::Result<(Vec<SpoolRecord>, usize)> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(from))?;
    let mut out = Vec::new();
    let mut skipped = 0;
    for line in BufReader::new(f).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<SpoolRecord>(&line) {
            Ok(r) => out.push(r),
            Err(_) => skipped += 1,
        }
    }
    Ok((out, skipped))
}
