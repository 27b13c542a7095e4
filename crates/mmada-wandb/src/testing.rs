//! Test support: a loopback fake wandb server (127.0.0.1 only) that
//! records every request, applies file_stream updates with the server's overwrite semantics,
//! answers `Viewer`, `UpsertBucket` and `RunResumeStatus` from its in-memory runs, and can be
//! told to fail or hang; plus short client timings and spool helpers.
//!
//! Used by this crate's integration tests and by trainer tests in other crates. It is
//! compiled always (no feature): a test-only feature would give the crate, and every crate
//! above it, a second build under `cargo test`.
//!
//! ```ignore
//! use crate::testing::{FakeServer, endpoint, fast_config};
//! let server = FakeServer::start();            // binds 127.0.0.1:0
//! let init = crate::RunInit { endpoint: Some(endpoint(&server.url())), ..Default::default() };
//! // ... run, then inspect server.history(run_id), server.exitcode(run_id), server.requests()
//! ```
//!
//! Everything here panics on malformed traffic (it is meant for tests only); the server thread
//! lives at most two minutes.
#![allow(missing_docs, clippy::missing_panics_doc)]

use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A fake 40-hex API key.
pub const KEY: &str = "0123456789abcdef0123456789abcdef01234567";

/// The longest a fake server lives (bounded loops).
const SERVER_LIFETIME: Duration = Duration::from_secs(120);

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Req {
    pub method: String,
    pub path: String,
    /// Lower-cased header names.
    pub headers: BTreeMap<String, String>,
    pub body: Value,
    pub op: Option<String>,
    pub status: u16,
    pub at: Instant,
}

impl Req {
    pub fn is_file_stream(&self) -> bool {
        self.path.ends_with("/file_stream")
    }
    /// `Viewer`, `UpsertBucket`, ... or `file_stream`.
    pub fn kind(&self) -> String {
        self.op.clone().unwrap_or_else(|| {
            if self.is_file_stream() {
                "file_stream".into()
            } else {
                self.path.clone()
            }
        })
    }
}

/// How the server answers the next requests.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Answer this many file_stream POSTs with `fail_status` before answering normally.
    pub fail_file_stream: u32,
    pub fail_status: u16,
    /// `Retry-After` value sent with those failures.
    pub retry_after: Option<String>,
    /// Read requests but never answer (until the server is stopped or unhung).
    pub hang: bool,
    /// Answer every file_stream with this status (e.g. 403).
    pub always_file_stream: Option<u16>,
    /// Answer file_stream with `"stopped": true` (the user pressed stop in the UI).
    pub reply_stopped: bool,
}

#[derive(Default)]
pub struct State {
    pub requests: Vec<Req>,
    pub faults: Faults,
    /// Applied history lines per run id: `file[offset + i] = content[i]`.
    pub history: BTreeMap<String, Vec<Option<String>>>,
    pub summary: BTreeMap<String, String>,
    pub console: BTreeMap<String, Vec<String>>,
    pub complete: BTreeMap<String, i64>,
    /// History lines each successful request carried, per run (to check exactly-once delivery).
    pub accepted_lines: BTreeMap<String, Vec<u64>>,
    /// Runs created by `UpsertBucket`: run id → (storage id, encoded config).
    pub buckets: BTreeMap<String, (String, String)>,
}

pub struct FakeServer {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl FakeServer {
    pub fn start() -> Self {
        Self::start_with(Faults::default())
    }

    pub fn start_with(faults: Faults) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            faults,
            ..State::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            let born = Instant::now();
            let mut conns = Vec::new();
            while !sp.load(Ordering::Acquire) && born.elapsed() < SERVER_LIFETIME {
                match listener.accept() {
                    Ok((s, _)) => {
                        let (st, sp) = (st.clone(), sp.clone());
                        conns.push(std::thread::spawn(move || serve(s, st, sp, born)));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
            sp.store(true, Ordering::Release);
            for c in conns {
                let _ = c.join();
            }
        });
        FakeServer {
            addr,
            state,
            stop,
            handle: Some(handle),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Req> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn set_faults(&self, f: Faults) {
        self.state.lock().unwrap().faults = f;
    }

    /// The applied history of a run, parsed.
    pub fn history(&self, run: &str) -> Vec<Value> {
        let s = self.state.lock().unwrap();
        s.history
            .get(run)
            .map(|v| {
                v.iter()
                    .map(|l| {
                        serde_json::from_str(l.as_deref().expect("no hole in history")).unwrap()
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn summary(&self, run: &str) -> Option<Value> {
        let s = self.state.lock().unwrap();
        s.summary.get(run).map(|l| serde_json::from_str(l).unwrap())
    }

    pub fn exitcode(&self, run: &str) -> Option<i64> {
        self.state.lock().unwrap().complete.get(run).copied()
    }

    pub fn accepted_lines(&self, run: &str) -> Vec<u64> {
        self.state
            .lock()
            .unwrap()
            .accepted_lines
            .get(run)
            .cloned()
            .unwrap_or_default()
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(stream: TcpStream, st: Arc<Mutex<State>>, stop: Arc<AtomicBool>, born: Instant) {
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    // Read the request head (bounded by time).
    let mut head = Vec::new();
    let mut line = String::new();
    let t0 = Instant::now();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if line == "\r\n" || line == "\n" {
                    break;
                }
                head.push(line.trim_end().to_string());
            }
            Err(_) => {
                if stop.load(Ordering::Acquire) || t0.elapsed() > Duration::from_secs(10) {
                    return;
                }
            }
        }
    }
    let Some(request_line) = head.first() else {
        return;
    };
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let headers: BTreeMap<String, String> = head[1..]
        .iter()
        .filter_map(|h| h.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    let t0 = Instant::now();
    let mut got = 0;
    while got < len {
        match reader.read(&mut body[got..]) {
            Ok(0) => return,
            Ok(n) => got += n,
            Err(_) if t0.elapsed() < Duration::from_secs(10) => {}
            Err(_) => return,
        }
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let op = body
        .get("operationName")
        .and_then(Value::as_str)
        .map(str::to_string);

    let (status, extra, reply, hang) = {
        let mut s = st.lock().unwrap();
        let is_fs = path.ends_with("/file_stream");
        let hang = s.faults.hang;
        let (status, extra, reply) = if hang {
            (0, String::new(), String::new())
        } else if is_fs && let Some(code) = s.faults.always_file_stream {
            (code, String::new(), r#"{"error":"forbidden"}"#.to_string())
        } else if is_fs && s.faults.fail_file_stream > 0 {
            s.faults.fail_file_stream -= 1;
            let extra = s
                .faults
                .retry_after
                .as_ref()
                .map(|v| format!("Retry-After: {v}\r\n"))
                .unwrap_or_default();
            (
                s.faults.fail_status,
                extra,
                r#"{"error":"boom"}"#.to_string(),
            )
        } else if is_fs {
            apply_file_stream(&mut s, &path, &body);
            let reply = if s.faults.reply_stopped {
                r#"{"exitcode":null,"limits":{},"stopped":true}"#
            } else {
                r#"{"exitcode":null,"limits":{}}"#
            };
            (200, String::new(), reply.to_string())
        } else if path == "/graphql" {
            (
                200,
                String::new(),
                graphql_reply(&mut s, op.as_deref(), &body).to_string(),
            )
        } else {
            (404, String::new(), "{}".to_string())
        };
        s.requests.push(Req {
            method: method.clone(),
            path: path.clone(),
            headers: headers.clone(),
            body: body.clone(),
            op: op.clone(),
            status,
            at: Instant::now(),
        });
        (status, extra, reply, hang)
    };
    if hang {
        // Never answer; hold the connection until the server stops.
        while !stop.load(Ordering::Acquire) && born.elapsed() < SERVER_LIFETIME {
            std::thread::sleep(Duration::from_millis(10));
        }
        return;
    }
    let reason = match status {
        200 => "OK",
        403 => "Forbidden",
        429 => "Too Many Requests",
        _ => "Error",
    };
    let resp = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{reply}",
        reply.len()
    );
    let _ = out.write_all(resp.as_bytes());
    let _ = out.flush();
}

fn run_of(path: &str) -> String {
    // /files/{entity}/{project}/{run}/file_stream
    path.trim_end_matches("/file_stream")
        .rsplit('/')
        .next()
        .unwrap()
        .to_string()
}

fn apply_file_stream(s: &mut State, path: &str, body: &Value) {
    let run = run_of(path);
    if let Some(h) = body.pointer("/files/wandb-history.jsonl") {
        let off = h["offset"].as_u64().unwrap() as usize;
        let content = h["content"].as_array().unwrap();
        let file = s.history.entry(run.clone()).or_default();
        for (i, c) in content.iter().enumerate() {
            if file.len() <= off + i {
                file.resize(off + i + 1, None);
            }
            file[off + i] = Some(c.as_str().unwrap().to_string());
        }
        s.accepted_lines
            .entry(run.clone())
            .or_default()
            .extend((off..off + content.len()).map(|l| l as u64));
    }
    if let Some(sm) = body.pointer("/files/wandb-summary.json") {
        assert_eq!(sm["offset"], 0, "summary always at offset 0");
        let c = sm["content"].as_array().unwrap();
        assert_eq!(c.len(), 1, "summary is one line");
        s.summary
            .insert(run.clone(), c[0].as_str().unwrap().to_string());
    }
    if let Some(o) = body.pointer("/files/output.log") {
        let off = o["offset"].as_u64().unwrap() as usize;
        let file = s.console.entry(run.clone()).or_default();
        for (i, c) in o["content"].as_array().unwrap().iter().enumerate() {
            if file.len() <= off + i {
                file.resize(off + i + 1, String::new());
            }
            file[off + i] = c.as_str().unwrap().to_string();
        }
    }
    if body.get("complete") == Some(&Value::Bool(true)) {
        s.complete.insert(
            run,
            body["exitcode"].as_i64().expect("exitcode with complete"),
        );
    }
}

/// Lines of `historyTail` in a `RunResumeStatus` reply (the real server sends the last few).
pub const HISTORY_TAIL_LINES: usize = 10;

fn graphql_reply(s: &mut State, op: Option<&str>, body: &Value) -> Value {
    let vars = &body["variables"];
    match op {
        Some("Viewer") => {
            json!({"data": {"viewer": {"id": "VXNlcjox", "entity": "probe-entity", "username": "probe", "email": "probe@example.invalid", "flags": "{}", "teams": {"edges": [{"node": {"name": "probe-entity"}}]}}}})
        }
        Some("UpsertBucket") => {
            let name = vars["name"].as_str().unwrap_or("x");
            let project = vars["project"].as_str().unwrap_or("uncategorized");
            let entity = vars["entity"].as_str().unwrap_or("probe-entity");
            let storage = format!("storage-{name}");
            let history = s.history.get(name).map_or(0, Vec::len);
            s.buckets.insert(
                name.to_string(),
                (
                    storage.clone(),
                    vars["config"].as_str().unwrap_or("{}").to_string(),
                ),
            );
            json!({"data": {"upsertBucket": {"bucket": {
                "id": storage,
                "name": name,
                "displayName": vars["displayName"],
                "description": null,
                "config": vars["config"],
                "sweepName": null,
                "project": {"id": "UHJvamVjdDox", "name": project, "entity": {"id": "RW50aXR5OjE=", "name": entity}},
                "historyLineCount": history
            }, "inserted": history == 0}}})
        }
        Some("RunResumeStatus") => {
            // Shape as in sdk_capture.jsonl (`resume_allow`, phase 2): string-encoded JSON
            // fields, `bucket: null` for an unknown run.
            let name = vars["name"].as_str().unwrap_or("");
            let project = vars["project"].as_str().unwrap_or("uncategorized");
            let entity = vars["entity"].as_str().unwrap_or("probe-entity");
            let bucket = s.buckets.get(name).map(|(storage, config)| {
                let lines: Vec<String> = s
                    .history
                    .get(name)
                    .map(|h| h.iter().map(|l| l.clone().unwrap_or_default()).collect())
                    .unwrap_or_default();
                let tail: Vec<&String> = lines
                    .iter()
                    .skip(lines.len().saturating_sub(HISTORY_TAIL_LINES))
                    .collect();
                json!({
                    "id": storage,
                    "name": name,
                    "displayName": "probe-run",
                    "description": null,
                    "notes": null,
                    "config": config,
                    "sweepName": null,
                    "historyLineCount": lines.len(),
                    "summaryMetrics": s.summary.get(name).cloned().unwrap_or_else(|| "{}".into()),
                    "logLineCount": s.console.get(name).map_or(0, Vec::len),
                    "eventsLineCount": 0,
                    "historyTail": serde_json::to_string(&tail).unwrap(),
                    "eventsTail": "[]",
                    "tags": [],
                    "wandbConfig": "{\"t\": {}}",
                })
            });
            json!({"data": {"model": {
                "id": "UHJvamVjdDox",
                "name": project,
                "entity": {"id": "RW50aXR5OjE=", "name": entity},
                "bucket": bucket,
            }}})
        }
        _ => json!({"data": {}}),
    }
}

/// A port on 127.0.0.1 where nothing listens (connection refused).
pub fn refused_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

/// Short timings for tests.
pub fn fast_config(project: &str) -> crate::WandbConfig {
    crate::WandbConfig {
        project: project.into(),
        flush_interval_secs: 0.1,
        heartbeat_secs: 30.0,
        retry_base_secs: 0.05,
        retry_max_secs: 0.5,
        request_timeout_secs: 2.0,
        finish_timeout_secs: 5.0,
        ..crate::WandbConfig::default()
    }
}

pub fn endpoint(url: &str) -> crate::Endpoint {
    crate::Endpoint::new(url, crate::ApiKey::new(KEY)).unwrap()
}

/// Fast sync options for tests.
pub fn fast_sync() -> crate::SyncOptions {
    crate::SyncOptions {
        max_attempts: 4,
        retry_base: Duration::from_millis(50),
        retry_max: Duration::from_millis(200),
        request_timeout: Duration::from_secs(2),
        rows_per_request: 7,
    }
}

/// Parses the spool: (history lines with their rows, other records).
pub fn spool_records(run_dir: &Path) -> Vec<Value> {
    let p = run_dir.join(crate::SPOOL_FILE);
    std::fs::read_to_string(&p)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("spool line is JSON"))
        .collect()
}

/// History line numbers in the spool for `run`.
pub fn spooled_lines(run_dir: &Path, run: &str) -> Vec<u64> {
    spool_records(run_dir)
        .iter()
        .filter(|r| r["type"] == "history" && r["run_id"] == run)
        .map(|r| r["line"].as_u64().unwrap())
        .collect()
}

/// Asserts that no file under `dir` contains the API key.
pub fn assert_key_absent(dir: &Path) {
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out)
            } else {
                out.push(p)
            }
        }
    }
    let mut files = Vec::new();
    walk(dir, &mut files);
    for f in files {
        let text = String::from_utf8_lossy(&std::fs::read(&f).unwrap()).into_owned();
        assert!(!text.contains(KEY), "API key written to {}", f.display());
        assert!(
            !text.contains("Basic "),
            "auth header written to {}",
            f.display()
        );
    }
}

/// Polls `cond` every 10 ms for at most `max`.
pub fn wait_until(max: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < max {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}
