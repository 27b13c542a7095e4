//! Replaying the spool to the server (`mmada-train wandb-sync RUN_DIR`).

use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::protocol::{self, HISTORY_FILE, Rng, RunMeta, SUMMARY_FILE, UPSERT_BUCKET_QUERY};
use crate::spool::{self, SPOOL_FILE, SpoolRecord};
use crate::transport::{Transport, with_retries};
use crate::{Endpoint, WandbError};

/// Retry and batching settings of [`sync`].
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// Attempts per request before giving up (429/5xx/network errors only).
    pub max_attempts: u32,
    /// First retry wait (doubles per attempt, +0–25 % jitter).
    pub retry_base: Duration,
    /// Longest retry wait.
    pub retry_max: Duration,
    /// Per-request timeout.
    pub request_timeout: Duration,
    /// History rows per file_stream request.
    pub rows_per_request: usize,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            max_attempts: 8,
            retry_base: Duration::from_secs(2),
            retry_max: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
            rows_per_request: 1000,
        }
    }
}

/// What [`sync`] did for one run found in the spool.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncedRun {
    /// The run id.
    pub run_id: String,
    /// Entity / project the run was written to (from the server's reply).
    pub entity: String,
    /// The project.
    pub project: String,
    /// History rows sent by this sync.
    pub rows_sent: u64,
    /// Whether the summary was sent.
    pub summary_sent: bool,
    /// The exit code sent with `complete`, if the spool recorded the end of the run.
    pub exitcode: Option<i32>,
}

/// What [`sync`] did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SyncReport {
    /// Runs that had something to send.
    pub runs: Vec<SyncedRun>,
    /// Runs found that were already fully delivered.
    pub runs_already_synced: usize,
    /// Spool lines that could not be parsed (e.g. a torn last line after a crash).
    pub skipped_lines: usize,
}

#[derive(Default)]
struct Replay {
    meta: Option<RunMeta>,
    rows: BTreeMap<u64, (Map<String, Value>, bool)>,
    summary: Option<(Map<String, Value>, bool)>,
    preempting: Option<bool>,
    finish: Option<(i32, bool)>,
}

impl Replay {
    fn undelivered_rows(&self) -> impl Iterator<Item = (&u64, &Map<String, Value>)> {
        self.rows
            .iter()
            .filter(|(_, (_, d))| !*d)
            .map(|(l, (r, _))| (l, r))
    }

    fn has_work(&self) -> bool {
        self.undelivered_rows().next().is_some()
            || self.summary.as_ref().is_some_and(|(_, d)| !*d)
            || self.finish.is_some_and(|(_, d)| !d)
            || self.preempting == Some(false)
    }
}

/// Replays `RUN_DIR/wandb-spool.jsonl` to the server: for each run in it, `UpsertBucket`
/// (creating or resuming the run with its recorded config), the rows not yet delivered at their
/// original history offsets (so a replay is idempotent), the summary, and `complete` +
/// `exitcode` if the spool recorded the end of the run. Progress is appended to the spool as
/// `delivered` records, so running it again sends nothing twice. No spool = nothing to do.
pub fn sync(
    run_dir: &Path,
    endpoint: &Endpoint,
    opts: &SyncOptions,
) -> Result<SyncReport, WandbError> {
    let path = run_dir.join(SPOOL_FILE);
    if !path.exists() {
        return Ok(SyncReport::default());
    }
    let (records, skipped) = spool::read_records(&path, 0).map_err(|e| WandbError::io(&path, e))?;
    let mut order: Vec<String> = Vec::new();
    let mut runs: BTreeMap<String, Replay> = BTreeMap::new();
    for rec in records {
        let id = match &rec {
            SpoolRecord::Run { meta, .. } => meta.run_id.clone(),
            SpoolRecord::History { run_id, .. }
            | SpoolRecord::Summary { run_id, .. }
            | SpoolRecord::Preempting { run_id }
            | SpoolRecord::Finish { run_id, .. }
            | SpoolRecord::Delivered { run_id, .. } => run_id.clone(),
        };
        if !runs.contains_key(&id) {
            order.push(id.clone());
        }
        let r = runs.entry(id).or_default();
        match rec {
            SpoolRecord::Run { meta, .. } => {
                // A new segment (e.g. a resumed process): the run is running again.
                let keep_storage = r.meta.as_ref().and_then(|m| m.storage_id.clone());
                let mut meta = meta;
                if meta.storage_id.is_none() {
                    meta.storage_id = keep_storage;
                }
                r.meta = Some(meta);
                r.finish = None;
                r.preempting = None;
            }
            SpoolRecord::History { line, row, .. } => {
                r.rows.insert(line, (row, false));
            }
            SpoolRecord::Summary { summary, .. } => r.summary = Some((summary, false)),
            SpoolRecord::Preempting { .. } => r.preempting = Some(false),
            SpoolRecord::Finish { exitcode, .. } => r.finish = Some((exitcode, false)),
            SpoolRecord::Delivered {
                from,
                to,
                summary,
                complete,
                ..
            } => {
                for (_, (_, d)) in r.rows.range_mut(from..to) {
                    *d = true;
                }
                if summary && let Some((_, d)) = r.summary.as_mut() {
                    *d = true;
                }
                if complete && let Some((_, d)) = r.finish.as_mut() {
                    *d = true;
                }
                if complete && r.preempting.is_some() {
                    r.preempting = Some(true);
                }
            }
        }
    }

    let transport = Transport::new(endpoint, opts.request_timeout)?;
    let mut rng = Rng::new();
    let mut report = SyncReport {
        skipped_lines: skipped,
        ..SyncReport::default()
    };
    let mut spool_writer = spool_appender(&path)?;
    for id in order {
        let r = &runs[&id];
        if !r.has_work() {
            report.runs_already_synced += 1;
            continue;
        }
        let Some(meta) = r.meta.clone() else {
            tracing::warn!(run_id = %id, "spool has rows but no run record for this run; skipped");
            continue;
        };
        let data = with_retries(
            "UpsertBucket",
            opts.max_attempts,
            opts.retry_base,
            opts.retry_max,
            &mut rng,
            || transport.graphql("UpsertBucket", UPSERT_BUCKET_QUERY, meta.upsert_variables()),
        )?;
        let bucket = protocol::parse_bucket(&data).ok_or_else(|| WandbError::Protocol {
            op: "UpsertBucket".into(),
            message: "reply lacks upsertBucket.bucket {id, project {name, entity {name}}}".into(),
        })?;

        // Contiguous batches of undelivered rows.
        let mut batches: Vec<(u64, Vec<String>)> = Vec::new();
        for (line, row) in r.undelivered_rows() {
            let s = Value::Object(row.clone()).to_string();
            match batches.last_mut() {
                Some((from, rows))
                    if *from + rows.len() as u64 == *line
                        && rows.len() < opts.rows_per_request.max(1) =>
                {
                    rows.push(s)
                }
                _ => batches.push((*line, vec![s])),
            }
        }
        let summary = r
            .summary
            .as_ref()
            .filter(|(_, d)| !*d)
            .map(|(s, _)| s.clone());
        let finish = r.finish.filter(|(_, d)| !*d).map(|(c, _)| c);
        let preempting = r.preempting == Some(false);
        if batches.is_empty() {
            batches.push((0, Vec::new()));
        }
        let n_batches = batches.len();
        let mut rows_sent = 0u64;
        for (i, (from, rows)) in batches.into_iter().enumerate() {
            let last = i + 1 == n_batches;
            let mut files = Map::new();
            if !rows.is_empty() {
                files.insert(
                    HISTORY_FILE.into(),
                    json!({"offset": from, "content": rows}),
                );
            }
            if last && let Some(s) = &summary {
                files.insert(
                    SUMMARY_FILE.into(),
                    json!({"offset": 0, "content": [Value::Object(s.clone()).to_string()]}),
                );
            }
            let mut body = Map::new();
            if !files.is_empty() {
                body.insert("files".into(), Value::Object(files));
            }
            if last && preempting {
                body.insert("preempting".into(), Value::Bool(true));
            }
            if last && let Some(code) = finish {
                body.insert("complete".into(), Value::Bool(true));
                body.insert("exitcode".into(), json!(code));
            }
            let body = Value::Object(body);
            with_retries(
                "file_stream",
                opts.max_attempts,
                opts.retry_base,
                opts.retry_max,
                &mut rng,
                || transport.file_stream(&bucket.entity, &bucket.project, &meta.run_id, &body),
            )?;
            let n = rows.len() as u64;
            rows_sent += n;
            spool_writer(&SpoolRecord::Delivered {
                run_id: meta.run_id.clone(),
                from,
                to: from + n,
                summary: last && summary.is_some(),
                complete: last && finish.is_some(),
            })?;
        }
        report.runs.push(SyncedRun {
            run_id: meta.run_id.clone(),
            entity: bucket.entity,
            project: bucket.project,
            rows_sent,
            summary_sent: summary.is_some(),
            exitcode: finish,
        });
    }
    Ok(report)
}

fn spool_appender(
    path: &Path,
) -> Result<impl FnMut(&SpoolRecord) -> Result<(), WandbError> + use<>, WandbError> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| WandbError::io(path, e))?;
    let path = path.to_path_buf();
    Ok(move |rec: &SpoolRecord| {
        f.write_all(spool::serialize_records(std::slice::from_ref(rec)).as_bytes())
            .map_err(|e| WandbError::io(&path, e))
    })
}
