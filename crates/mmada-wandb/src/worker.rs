//! The sender thread: batches rows, talks to the server, retries, spools.

use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::FinishReport;
use crate::protocol::{
    self, Bucket, HISTORY_FILE, OUTPUT_FILE, Rng, RunMeta, SUMMARY_FILE, UPSERT_BUCKET_QUERY,
    VIEWER_QUERY,
};
use crate::spool::{self, SharedSpool, SpoolRecord};
use crate::transport::{Outcome, Transport};

/// Rows per file_stream request at most.
const MAX_ROWS_PER_REQUEST: usize = 1000;
/// Bytes of history content per request at most (the server limit is 10 MiB).
const MAX_REQUEST_BYTES: usize = 8 << 20;
/// Rows kept in memory at most; beyond that they are spooled and read back later.
const MAX_PENDING_ROWS: usize = 50_000;
/// Rows read back from the spool at a time.
const SPOOL_LOAD_CAP: u64 = 10_000;
/// Console lines kept in memory at most (console is best effort and not spooled).
const MAX_CONSOLE_LINES: usize = 10_000;

/// Messages from the handle to the thread.
pub(crate) enum Msg {
    Row {
        line: u64,
        row: Map<String, Value>,
    },
    Summary(Map<String, Value>),
    Console {
        line: u64,
        text: String,
    },
    Preempting,
    Finish {
        exitcode: i32,
        summary: Map<String, Value>,
        reply: Sender<FinishReport>,
    },
}

/// State shared between the handle and the thread.
#[derive(Default)]
pub(crate) struct Shared {
    /// History lines handed out by `log()` so far (absolute line numbers).
    pub logged_lines: AtomicU64,
    /// Set once any row of this process went to the spool.
    pub spool_has_rows: AtomicBool,
    /// The server asked the run to stop (`"stopped": true`).
    pub stop_requested: AtomicBool,
    /// Rows spooled (by `log()` or the thread).
    pub rows_spooled: AtomicU64,
    /// Rows the server accepted.
    pub rows_delivered: AtomicU64,
    /// Storage id / entity / project once UpsertBucket succeeded.
    pub bucket: Mutex<Option<Bucket>>,
    /// Rows that found the queue full: `log()` only pushes here (no file I/O on the training
    /// thread); the spooler thread or the sender writes them to the spool.
    pub overflow: Mutex<Vec<(u64, Map<String, Value>)>>,
    /// Wakes the spooler thread.
    pub overflow_cv: Condvar,
    /// Tells the spooler thread to exit.
    pub spooler_stop: AtomicBool,
}

fn lock_overflow(shared: &Shared) -> std::sync::MutexGuard<'_, Vec<(u64, Map<String, Value>)>> {
    shared.overflow.lock().unwrap_or_else(|p| p.into_inner())
}

/// Moves the overflow rows into the spool. The spool lock is taken first and held while the
/// rows are taken, so once this returns every row pushed before the call is in the file.
pub(crate) fn drain_overflow(shared: &Shared, spool: &SharedSpool, run_id: &str) {
    let mut s = spool::lock(spool);
    let rows = std::mem::take(&mut *lock_overflow(shared));
    if rows.is_empty() {
        return;
    }
    let n = rows.len() as u64;
    let recs: Vec<SpoolRecord> = rows
        .into_iter()
        .map(|(line, row)| SpoolRecord::History {
            run_id: run_id.to_string(),
            line,
            row,
        })
        .collect();
    if s.append(&recs) {
        shared.spool_has_rows.store(true, Ordering::Release);
        shared.rows_spooled.fetch_add(n, Ordering::Relaxed);
    }
}

/// The spooler thread: writes overflow rows to the spool within ~200 ms, even while the sender
/// is stuck in a request.
pub(crate) fn spooler(shared: Arc<Shared>, spool: SharedSpool, run_id: String) {
    loop {
        {
            let g = lock_overflow(&shared);
            let _ = shared
                .overflow_cv
                .wait_timeout_while(g, Duration::from_millis(200), |v| {
                    v.is_empty() && !shared.spooler_stop.load(Ordering::Acquire)
                })
                .unwrap_or_else(|p| p.into_inner());
        }
        drain_overflow(&shared, &spool, &run_id);
        if shared.spooler_stop.load(Ordering::Acquire) {
            return;
        }
    }
}

/// Timing knobs (from `WandbConfig`).
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub flush_interval: Duration,
    pub heartbeat: Duration,
    pub retry_base: Duration,
    pub retry_max: Duration,
    pub spool_after_failures: u32,
    pub finish_timeout: Duration,
}

struct Finishing {
    exitcode: i32,
    reply: Option<Sender<FinishReport>>,
    deadline: Instant,
}

struct PendingRow {
    json: String,
    in_spool: bool,
}

pub(crate) struct Worker {
    rx: Receiver<Msg>,
    shared: Arc<Shared>,
    spool: SharedSpool,
    transport: Option<Transport>,
    settings: Settings,
    meta: RunMeta,
    bucket: Option<Bucket>,
    viewer_done: bool,
    fatal: bool,
    acked: u64,
    pending: BTreeMap<u64, PendingRow>,
    summary: Map<String, Value>,
    summary_version: u64,
    summary_sent: u64,
    summary_spooled: u64,
    console: BTreeMap<u64, String>,
    console_acked: u64,
    preempt_pending: bool,
    preempt_spooled: bool,
    finishing: Option<Finishing>,
    failures: u32,
    outage_logged: bool,
    next_attempt: Instant,
    next_flush: Instant,
    last_send: Instant,
    gap_warned: bool,
    rng: Rng,
    done: bool,
    delivered_complete: bool,
}

impl Worker {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        rx: Receiver<Msg>,
        shared: Arc<Shared>,
        spool: SharedSpool,
        transport: Option<Transport>,
        settings: Settings,
        meta: RunMeta,
        start_line: u64,
        summary: Map<String, Value>,
        console_start: u64,
    ) -> Self {
        let now = Instant::now();
        let has_summary = !summary.is_empty();
        Worker {
            rx,
            shared,
            spool,
            transport,
            settings,
            meta,
            bucket: None,
            viewer_done: false,
            fatal: false,
            acked: start_line,
            pending: BTreeMap::new(),
            summary,
            // A restored summary is re-sent at once, as the SDK does on resume.
            summary_version: u64::from(has_summary),
            summary_sent: 0,
            summary_spooled: 0,
            console: BTreeMap::new(),
            console_acked: console_start,
            preempt_pending: false,
            preempt_spooled: false,
            finishing: None,
            failures: 0,
            outage_logged: false,
            next_attempt: now,
            next_flush: now,
            last_send: now,
            gap_warned: false,
            rng: Rng::new(),
            done: false,
            delivered_complete: false,
        }
    }

    pub(crate) fn run(mut self) {
        while !self.done {
            let now = Instant::now();
            let wake = self.next_wake();
            match self.rx.recv_timeout(wake.saturating_duration_since(now)) {
                Ok(m) => {
                    self.handle(m);
                    self.drain();
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    if self.finishing.is_none() {
                        // The handle vanished without finish (should not happen: Drop finishes).
                        self.finishing = Some(Finishing {
                            exitcode: 1,
                            reply: None,
                            deadline: Instant::now() + self.settings.finish_timeout,
                        });
                    }
                }
            }
            if self.pending.len() > MAX_PENDING_ROWS {
                self.spill(false);
            }
            if self.due(Instant::now()) {
                self.flush();
            }
        }
    }

    fn next_wake(&self) -> Instant {
        if let Some(f) = &self.finishing {
            return self.next_attempt.min(f.deadline);
        }
        let base = if self.preempt_pending {
            self.next_attempt
        } else {
            self.next_flush.max(self.next_attempt)
        };
        base.min(self.last_send + self.settings.heartbeat)
            .max(self.next_attempt)
    }

    fn due(&self, now: Instant) -> bool {
        if let Some(f) = &self.finishing {
            return now >= self.next_attempt || now >= f.deadline;
        }
        if now < self.next_attempt {
            return false;
        }
        now >= self.next_flush
            || self.preempt_pending
            || now >= self.last_send + self.settings.heartbeat
    }

    fn drain(&mut self) {
        while let Ok(m) = self.rx.try_recv() {
            self.handle(m);
        }
    }

    fn handle(&mut self, m: Msg) {
        match m {
            Msg::Row { line, row } => {
                for (k, v) in &row {
                    self.summary.insert(k.clone(), v.clone());
                }
                self.touch_summary_runtime();
                self.summary_version += 1;
                let json = Value::Object(row).to_string();
                self.pending.insert(
                    line,
                    PendingRow {
                        json,
                        in_spool: false,
                    },
                );
            }
            Msg::Summary(s) => {
                self.summary = s;
                self.touch_summary_runtime();
                self.summary_version += 1;
            }
            Msg::Console { line, text } => {
                let ts = protocol::console_timestamp(protocol::unix_now());
                self.console.insert(line, format!("{ts} {text}"));
                while self.console.len() > MAX_CONSOLE_LINES {
                    self.console.pop_first();
                }
            }
            Msg::Preempting => {
                self.preempt_pending = true;
                self.preempt_spooled = false;
            }
            Msg::Finish {
                exitcode,
                summary,
                reply,
            } => {
                if !summary.is_empty() {
                    self.summary = summary;
                    self.touch_summary_runtime();
                    self.summary_version += 1;
                }
                self.finishing = Some(Finishing {
                    exitcode,
                    reply: Some(reply),
                    deadline: Instant::now() + self.settings.finish_timeout,
                });
                // A pending backoff (or Retry-After) is still honoured, within the deadline.
            }
        }
    }

    fn touch_summary_runtime(&mut self) {
        if let Some(rt) = self.summary.get("_runtime").and_then(Value::as_f64) {
            self.summary
                .insert("_wandb".into(), json!({ "runtime": rt.floor() as i64 }));
        }
    }

    /// Writes everything held in memory that is not in the spool yet to the spool, and drops
    /// the rows from memory (they are read back from the spool when the server answers again).
    fn spill(&mut self, with_finish: bool) {
        drain_overflow(&self.shared, &self.spool, &self.meta.run_id);
        let run_id = self.meta.run_id.clone();
        let mut buf = String::new();
        let mut n_rows = 0u64;
        for (line, r) in &self.pending {
            if r.in_spool {
                continue;
            }
            // The row is already serialised: splice it in without re-parsing.
            buf.push_str(&format!(
                "{{\"type\":\"history\",\"run_id\":{},\"line\":{line},\"row\":{}}}\n",
                Value::String(run_id.clone()),
                r.json
            ));
            n_rows += 1;
        }
        let mut recs = Vec::new();
        if self.summary_version > self.summary_sent
            && self.summary_version > self.summary_spooled
            && !self.summary.is_empty()
        {
            recs.push(SpoolRecord::Summary {
                run_id: run_id.clone(),
                summary: self.summary.clone(),
            });
        }
        if self.preempt_pending && !self.preempt_spooled {
            recs.push(SpoolRecord::Preempting {
                run_id: run_id.clone(),
            });
        }
        if with_finish && let Some(f) = &self.finishing {
            recs.push(SpoolRecord::Finish {
                run_id: run_id.clone(),
                exitcode: f.exitcode,
            });
        }
        buf.push_str(&spool::serialize_records(&recs));
        if buf.is_empty() {
            return;
        }
        let ok = spool::lock(&self.spool).append_raw(&buf);
        if ok {
            if n_rows > 0 {
                self.shared.spool_has_rows.store(true, Ordering::Release);
                self.shared
                    .rows_spooled
                    .fetch_add(n_rows, Ordering::Relaxed);
            }
            self.pending.clear();
            self.summary_spooled = self.summary_version;
            if self.preempt_pending {
                self.preempt_spooled = true;
            }
        }
    }

    /// Reads rows `[acked, logged)` that are missing from memory back from the spool; rows that
    /// are in neither place (the disk refused to spool them) are skipped with one warning.
    fn fill_gaps(&mut self, logged: u64) {
        if self.acked >= logged {
            return;
        }
        drain_overflow(&self.shared, &self.spool, &self.meta.run_id);
        let hi = logged.min(self.acked + SPOOL_LOAD_CAP);
        if (self.acked..hi).all(|l| self.pending.contains_key(&l)) {
            return;
        }
        if self.shared.spool_has_rows.load(Ordering::Acquire) {
            let (path, start) = {
                let s = spool::lock(&self.spool);
                (s.path().to_path_buf(), s.segment_start())
            };
            if let Some(start) = start
                && let Ok((records, _)) = spool::read_records(&path, start)
            {
                for r in records {
                    if let SpoolRecord::History { run_id, line, row } = r
                        && run_id == self.meta.run_id
                        && line >= self.acked
                        && line < hi
                    {
                        self.pending.insert(
                            line,
                            PendingRow {
                                json: Value::Object(row).to_string(),
                                in_spool: true,
                            },
                        );
                    }
                }
            }
        }
        if !self.pending.contains_key(&self.acked) {
            // Every line below `logged` was either queued (and drained) or spooled: what is
            // still missing is lost.
            let next = self
                .pending
                .range(self.acked..)
                .next()
                .map_or(logged, |(l, _)| *l);
            if !self.gap_warned {
                self.gap_warned = true;
                tracing::warn!(
                    from = self.acked,
                    to = next,
                    "wandb history lines missing from memory and spool; skipping them"
                );
            }
            self.acked = next;
        }
    }

    fn on_failure(&mut self, op: &str, after: Option<Duration>, message: &str) {
        self.failures += 1;
        let wait = after.unwrap_or_else(|| {
            protocol::backoff(
                self.failures,
                self.settings.retry_base,
                self.settings.retry_max,
                &mut self.rng,
            )
        });
        if !self.outage_logged {
            self.outage_logged = true;
            tracing::warn!(op, %message, retry_in_s = wait.as_secs_f64(), "wandb request failed; retrying in the background");
        } else {
            tracing::debug!(op, %message, attempt = self.failures, retry_in_s = wait.as_secs_f64(), "wandb retry");
        }
        self.next_attempt = Instant::now() + wait;
        if self.failures >= self.settings.spool_after_failures {
            self.spill(false);
        }
    }

    fn on_fatal(&mut self, op: &str, status: Option<u16>, message: &str) {
        tracing::error!(
            op,
            status,
            %message,
            spool = %spool::lock(&self.spool).path().display(),
            "wandb rejected a request; no more requests are sent for this run. Metrics go to the spool: fix the cause, then replay it with `mmada-train wandb-sync RUN_DIR`"
        );
        self.fatal = true;
    }

    fn on_success(&mut self) {
        if self.outage_logged {
            tracing::info!(
                after_failures = self.failures,
                "wandb requests go through again"
            );
        }
        self.failures = 0;
        self.outage_logged = false;
        self.next_attempt = Instant::now();
        self.last_send = Instant::now();
    }

    fn give_up(&mut self) {
        self.spill(true);
        self.finish_reply(false);
    }

    fn finish_reply(&mut self, delivered: bool) {
        if let Some(f) = self.finishing.take()
            && let Some(reply) = f.reply
        {
            let spool = spool::lock(&self.spool);
            let _ = reply.send(FinishReport {
                delivered,
                rows_logged: self.shared.logged_lines.load(Ordering::Acquire),
                rows_delivered: self.shared.rows_delivered.load(Ordering::Relaxed),
                rows_spooled: self.shared.rows_spooled.load(Ordering::Relaxed),
                spool_path: spool.segment_start().map(|_| spool.path().to_path_buf()),
            });
        }
        self.done = true;
    }

    /// Creates (or resumes) the run on the server. Returns true when done.
    fn ensure_bucket(&mut self, t: &Transport) -> bool {
        if self.bucket.is_some() {
            return true;
        }
        if self.meta.entity.is_none() && !self.viewer_done {
            match t.graphql("Viewer", VIEWER_QUERY, Value::Null) {
                Outcome::Ok(data) => {
                    self.viewer_done = true;
                    if let Some(e) = data.pointer("/viewer/entity").and_then(Value::as_str) {
                        self.meta.entity = Some(e.to_string());
                    }
                }
                Outcome::Retry { after, message } => {
                    self.on_failure("Viewer", after, &message);
                    return false;
                }
                // Optional query: carry on without it (UpsertBucket uses the default entity).
                Outcome::Fatal { .. } => self.viewer_done = true,
            }
        }
        match t.graphql(
            "UpsertBucket",
            UPSERT_BUCKET_QUERY,
            self.meta.upsert_variables(),
        ) {
            Outcome::Ok(data) => match protocol::parse_bucket(&data) {
                Some(b) => {
                    self.meta.storage_id = Some(b.storage_id.clone());
                    self.meta.entity = Some(b.entity.clone());
                    self.meta.project = b.project.clone();
                    spool::lock(&self.spool).set_bucket(&b.storage_id, &b.entity, &b.project);
                    *self.shared.bucket.lock().unwrap_or_else(|p| p.into_inner()) = Some(b.clone());
                    self.bucket = Some(b);
                    self.on_success();
                    true
                }
                None => {
                    self.on_fatal(
                        "UpsertBucket",
                        None,
                        "reply lacks upsertBucket.bucket {id, project {name, entity {name}}}",
                    );
                    false
                }
            },
            Outcome::Retry { after, message } => {
                self.on_failure("UpsertBucket", after, &message);
                false
            }
            Outcome::Fatal { status, message } => {
                self.on_fatal("UpsertBucket", status, &message);
                false
            }
        }
    }

    fn flush(&mut self) {
        let logged = self.shared.logged_lines.load(Ordering::Acquire);
        self.drain();
        let now = Instant::now();
        if let Some(f) = &self.finishing
            && now >= f.deadline
        {
            self.give_up();
            return;
        }
        let Some(t) = self.transport.take() else {
            // Offline: everything goes to the spool.
            if self.finishing.is_some() {
                self.give_up();
            } else {
                self.spill(false);
                self.next_flush = now + self.settings.flush_interval;
            }
            return;
        };
        self.flush_online(&t, logged);
        self.transport = Some(t);
    }

    fn flush_online(&mut self, t: &Transport, logged: u64) {
        let now = Instant::now();
        if self.fatal {
            if self.finishing.is_some() {
                self.give_up();
            } else {
                self.spill(false);
                self.next_flush = now + self.settings.flush_interval;
            }
            return;
        }
        if !self.ensure_bucket(t) {
            if self.fatal {
                self.flush_online(t, logged);
            }
            return;
        }
        self.fill_gaps(logged);
        // Build the request.
        let from = self.acked;
        let mut content: Vec<&str> = Vec::new();
        let mut bytes = 0usize;
        let mut line = from;
        while let Some(r) = self.pending.get(&line) {
            if content.len() >= MAX_ROWS_PER_REQUEST
                || (bytes + r.json.len() > MAX_REQUEST_BYTES && !content.is_empty())
            {
                break;
            }
            bytes += r.json.len();
            content.push(&r.json);
            line += 1;
        }
        let to = line;
        let mut files = Map::new();
        if !content.is_empty() {
            files.insert(
                HISTORY_FILE.into(),
                json!({"offset": from, "content": content}),
            );
        }
        let send_summary = self.summary_version > self.summary_sent && !self.summary.is_empty();
        let summary_version = self.summary_version;
        if send_summary {
            files.insert(
                SUMMARY_FILE.into(),
                json!({"offset": 0, "content": [Value::Object(self.summary.clone()).to_string()]}),
            );
        }
        let console_from = self.console_acked;
        let mut console_lines = Vec::new();
        let mut cl = console_from;
        while let Some(text) = self.console.get(&cl) {
            if console_lines.len() >= MAX_ROWS_PER_REQUEST {
                break;
            }
            console_lines.push(text.clone());
            cl += 1;
        }
        if !console_lines.is_empty() {
            files.insert(
                OUTPUT_FILE.into(),
                json!({"offset": console_from, "content": console_lines}),
            );
        }
        let rows_left = self.pending.range(to..).next().is_some() || to < logged;
        let console_left = self.console.range(cl..).next().is_some();
        let mut body = Map::new();
        if !files.is_empty() {
            body.insert("files".into(), Value::Object(files));
        }
        let send_preempt = self.preempt_pending;
        if send_preempt {
            body.insert("preempting".into(), Value::Bool(true));
        }
        let complete = self.finishing.is_some() && !rows_left && !console_left;
        if let Some(f) = &self.finishing
            && complete
        {
            body.insert("complete".into(), Value::Bool(true));
            body.insert("exitcode".into(), json!(f.exitcode));
        }
        if body.is_empty() && now_before(self.last_send + self.settings.heartbeat) {
            self.next_flush = Instant::now() + self.settings.flush_interval;
            return;
        }
        // An empty body is the heartbeat `{}`.
        let (entity, project) = {
            let b = self.bucket.as_ref().expect("ensured above");
            (b.entity.clone(), b.project.clone())
        };
        let body = Value::Object(body);
        let n_rows = (to - from) as usize;
        match t.file_stream(&entity, &project, &self.meta.run_id, &body) {
            Outcome::Ok(reply) => {
                self.on_success();
                for l in from..to {
                    self.pending.remove(&l);
                }
                self.acked = to;
                self.shared
                    .rows_delivered
                    .fetch_add(n_rows as u64, Ordering::Relaxed);
                if send_summary {
                    self.summary_sent = summary_version;
                }
                for l in console_from..cl {
                    self.console.remove(&l);
                }
                self.console_acked = cl;
                if send_preempt {
                    self.preempt_pending = false;
                }
                if reply.get("stopped").and_then(Value::as_bool) == Some(true) {
                    self.shared.stop_requested.store(true, Ordering::Release);
                }
                let spool_used = spool::lock(&self.spool).segment_start().is_some();
                if spool_used && (n_rows > 0 || send_summary || complete) {
                    spool::lock(&self.spool).append(&[SpoolRecord::Delivered {
                        run_id: self.meta.run_id.clone(),
                        from,
                        to,
                        summary: send_summary,
                        complete,
                    }]);
                }
                if complete {
                    self.delivered_complete = true;
                    self.finish_reply(true);
                    return;
                }
                self.next_flush = if rows_left || console_left || self.finishing.is_some() {
                    Instant::now()
                } else {
                    Instant::now() + self.settings.flush_interval
                };
            }
            Outcome::Retry { after, message } => self.on_failure("file_stream", after, &message),
            Outcome::Fatal { status, message } => {
                self.on_fatal("file_stream", status, &message);
                self.flush_online(t, logged);
            }
        }
    }
}

fn now_before(t: Instant) -> bool {
    Instant::now() < t
}
