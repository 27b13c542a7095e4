//! Acceptance: 10 steps + summary + finish against the fake server; the requests match the
//! sequence and JSON shapes of the real SDK's `fresh_run` capture
//! (`shared/fixtures/wandb/sdk_capture.jsonl`).

mod common;

use base64::Engine as _;
use common::*;
use mmada_wandb::{RunInit, WandbConfig, WandbRun};
use serde_json::{Map, Value, json};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

fn capture() -> Vec<Value> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/fixtures/wandb/sdk_capture.jsonl");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| {
        panic!(
            "the SDK capture {} is needed by this test: {e}",
            p.display()
        )
    });
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["scenario"] == "fresh_run")
        .collect()
}

fn kind(r: &Value) -> String {
    match r["graphql_op"].as_str() {
        Some(op) => op.to_string(),
        None if r["path"].as_str().unwrap().ends_with("/file_stream") => "file_stream".into(),
        None => format!("{} upload", r["method"].as_str().unwrap()),
    }
}

/// `{"k": {"value": v}}` (a JSON string) → `{"k": v}` without `_wandb`.
fn decode_config(s: &str) -> Map<String, Value> {
    let v: Value = serde_json::from_str(s).expect("config is a JSON string");
    v.as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "_wandb")
        .map(|(k, v)| {
            let o = v.as_object().expect("config entry is an object");
            assert_eq!(
                o.keys().collect::<Vec<_>>(),
                vec!["value"],
                "config entry {k} is {{\"value\": ..}}"
            );
            (k.clone(), o["value"].clone())
        })
        .collect()
}

#[test]
fn ten_steps_summary_finish_match_the_sdk_capture() {
    let cap = capture();
    assert!(cap.len() > 5, "fresh_run records in the capture");
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();

    // The same config the SDK run sent.
    let cap_upsert = cap.iter().find(|r| kind(r) == "UpsertBucket").unwrap();
    let cap_vars = cap_upsert["body"]["variables"].as_object().unwrap();
    let recipe = Value::Object(decode_config(cap_vars["config"].as_str().unwrap()));

    let cfg = WandbConfig {
        run_id: Some("probe0001".into()),
        name: Some("probe-run".into()),
        ..fast_config("probe-project")
    };
    let mut run = WandbRun::start(
        &cfg,
        dir.path(),
        RunInit {
            run_config: recipe.clone(),
            endpoint: Some(endpoint(&server.url())),
            ..RunInit::default()
        },
    )
    .unwrap();
    let mut lr = 3e-4;
    for i in 0..10u64 {
        run.log(i, &[("train/loss", 1.0 / (i + 1) as f64), ("train/lr", lr)]);
        lr *= 0.9;
        if i == 4 {
            // Let one periodic flush happen mid-run.
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    run.summary("best_loss", 0.1);
    run.summary("final/acc", 0.875);
    let report = run.finish(0);
    assert!(report.delivered, "{report:?}");
    assert_eq!(report.rows_logged, 10);
    assert_eq!(report.rows_delivered, 10);
    assert_eq!(report.rows_spooled, 0);
    assert_eq!(report.spool_path, None);

    let reqs = server.requests();
    let ours: Vec<String> = reqs.iter().map(|r| r.kind()).collect();
    let theirs: Vec<String> = cap.iter().map(kind).collect();
    eprintln!("ours:   {ours:?}\ntheirs: {theirs:?}");

    // Sequence: Viewer → UpsertBucket → file_stream ... with `complete` last, as in the capture
    // (the capture's optional requests — CoreWeave, ServerFeatures, CreateRunFiles, uploads, the
    // debounced config re-upsert — are not sent).
    assert_eq!(&ours[..2], &theirs[..2]);
    assert_eq!(ours[..2], ["Viewer", "UpsertBucket"]);
    assert!(ours[2..].iter().all(|k| k == "file_stream"), "{ours:?}");
    assert!(ours.len() >= 4, "a mid-run flush and a final one: {ours:?}");
    let known: BTreeSet<String> = theirs.iter().cloned().collect();
    assert!(ours.iter().all(|k| known.contains(k)));

    // Auth header form on every request: Basic base64("api:" + 40-char key); JSON content type.
    let cap_auth = cap[0]["headers"]["Authorization"].as_str().unwrap();
    assert!(
        cap.iter()
            .filter(|c| c["method"] == "POST")
            .all(|c| c["headers"]["Authorization"] == cap_auth),
        "the SDK authenticates every POST the same way"
    );
    for r in &reqs {
        let auth = r
            .headers
            .get("authorization")
            .expect("authorization header");
        let b64 = auth.strip_prefix("Basic ").expect("Basic auth");
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        let raw = String::from_utf8(raw).unwrap();
        let (user, key) = raw.split_once(':').unwrap();
        assert_eq!(user, "api");
        assert_eq!(key, KEY);
        assert_eq!(
            cap_auth,
            format!("Basic base64(api:<REDACTED {} chars>)", key.len()),
            "same form as the SDK"
        );
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(r.method, "POST");
    }

    // GraphQL bodies: {query, variables, operationName}; Viewer has no variables.
    let viewer = &reqs[0].body;
    let cap_viewer = &cap.iter().find(|r| kind(r) == "Viewer").unwrap()["body"];
    assert_eq!(
        viewer.as_object().unwrap().keys().collect::<BTreeSet<_>>(),
        cap_viewer
            .as_object()
            .unwrap()
            .keys()
            .collect::<BTreeSet<_>>()
    );
    assert!(
        viewer.get("variables").is_none(),
        "no variables, as the SDK"
    );
    assert!(viewer["query"].as_str().unwrap().contains("viewer"));

    // UpsertBucket: same variable names, values as configured, config in the SDK encoding.
    let up = &reqs[1].body;
    assert_eq!(up["operationName"], "UpsertBucket");
    assert_eq!(
        up["query"], cap_upsert["body"]["query"],
        "same mutation text"
    );
    let vars = up["variables"].as_object().unwrap();
    assert_eq!(
        vars.keys().collect::<BTreeSet<_>>(),
        cap_vars.keys().collect::<BTreeSet<_>>()
    );
    for k in ["name", "project", "entity", "displayName", "id"] {
        assert_eq!(vars[k], cap_vars[k], "variable {k}");
    }
    let cfg_str = vars["config"].as_str().expect("config is a JSON string");
    assert_eq!(
        Value::Object(decode_config(cfg_str)),
        Value::Object(decode_config(cap_vars["config"].as_str().unwrap()))
    );
    let cfg_val: Value = serde_json::from_str(cfg_str).unwrap();
    assert!(
        cfg_val["_wandb"]["value"]["t"].is_object(),
        "_wandb.value.t present (resumable by the SDK)"
    );

    // file_stream: URL, body keys, file entries, offsets, history rows, summary, complete.
    let cap_fs: Vec<&Value> = cap.iter().filter(|r| kind(r) == "file_stream").collect();
    let cap_path = cap_fs[0]["path"].as_str().unwrap();
    let cap_top: BTreeSet<String> = cap
        .iter()
        .chain(capture_all_031().iter())
        .filter(|r| kind(r) == "file_stream")
        .flat_map(|r| {
            r["body"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect::<Vec<_>>()
        })
        .collect();
    let fs: Vec<&Req> = reqs.iter().filter(|r| r.is_file_stream()).collect();
    let mut next_offset = 0u64;
    let mut steps = Vec::new();
    for (i, r) in fs.iter().enumerate() {
        assert_eq!(r.path, cap_path, "same file_stream URL");
        assert_eq!(r.status, 200);
        let body = r.body.as_object().unwrap();
        for k in body.keys() {
            assert!(
                cap_top.contains(k),
                "body key {k} not in the SDK's: {cap_top:?}"
            );
        }
        let last = i + 1 == fs.len();
        assert_eq!(
            body.contains_key("complete"),
            last,
            "complete only at the end"
        );
        assert_eq!(body.contains_key("exitcode"), last);
        if let Some(files) = body.get("files") {
            for (name, f) in files.as_object().unwrap() {
                assert!(
                    ["wandb-history.jsonl", "wandb-summary.json"].contains(&name.as_str()),
                    "{name}"
                );
                let f = f.as_object().unwrap();
                assert_eq!(
                    f.keys().collect::<BTreeSet<_>>(),
                    BTreeSet::from([&"content".to_string(), &"offset".to_string()])
                );
                let content = f["content"].as_array().unwrap();
                if name == "wandb-history.jsonl" {
                    assert_eq!(f["offset"], next_offset, "contiguous offsets");
                    next_offset += content.len() as u64;
                    for line in content {
                        let row: Value = serde_json::from_str(line.as_str().unwrap()).unwrap();
                        assert!(row["_step"].is_u64());
                        assert!(row["_runtime"].is_f64());
                        assert!(row["_timestamp"].as_f64().unwrap() > 1.7e9);
                        steps.push(row["_step"].as_u64().unwrap());
                    }
                } else {
                    assert_eq!(f["offset"], 0);
                    assert_eq!(content.len(), 1);
                }
            }
        }
    }
    assert_eq!(
        steps,
        (0..10).collect::<Vec<_>>(),
        "each step exactly once, in order"
    );
    let last = fs.last().unwrap();
    let cap_last = cap_fs.last().unwrap();
    assert_eq!(last.body["complete"], cap_last["body"]["complete"]);
    assert_eq!(last.body["exitcode"], cap_last["body"]["exitcode"]);
    assert_eq!(last.body["complete"], true);
    assert_eq!(last.body["exitcode"], 0);

    // History rows have the same keys as the SDK's rows.
    let cap_row: Value = serde_json::from_str(
        cap_last["body"]["files"]["wandb-history.jsonl"]["content"][0]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let hist = server.history("probe0001");
    assert_eq!(hist.len(), 10);
    assert_eq!(
        hist[0].as_object().unwrap().keys().collect::<BTreeSet<_>>(),
        cap_row.as_object().unwrap().keys().collect::<BTreeSet<_>>()
    );
    assert_eq!(hist[0]["train/loss"], json!(1.0));
    assert_eq!(hist[0]["train/lr"], json!(3e-4));
    assert_eq!(hist[9]["train/loss"], json!(0.1));
    let rt: Vec<f64> = hist
        .iter()
        .map(|r| r["_runtime"].as_f64().unwrap())
        .collect();
    assert!(rt.windows(2).all(|w| w[0] <= w[1]), "runtime grows: {rt:?}");
    assert!(rt[5] - rt[4] >= 0.2, "the sleep shows in _runtime");

    // Summary: the whole object, last values + explicit keys, like the SDK's.
    let summary = server.summary("probe0001").unwrap();
    let cap_summary: Value = serde_json::from_str(
        cap_last["body"]["files"]["wandb-summary.json"]["content"][0]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let ours_keys: BTreeSet<_> = summary.as_object().unwrap().keys().cloned().collect();
    let cap_keys: BTreeSet<_> = cap_summary.as_object().unwrap().keys().cloned().collect();
    assert_eq!(ours_keys, cap_keys);
    assert_eq!(summary["_step"], 9);
    assert_eq!(summary["best_loss"], 0.1);
    assert_eq!(summary["final/acc"], 0.875);
    assert_eq!(summary["train/loss"], 0.1);
    assert!(summary["_wandb"]["runtime"].is_i64());
    assert_eq!(server.exitcode("probe0001"), Some(0));

    // Item 5: the key is in no file of the run directory (there is no spool in a healthy run).
    assert!(!dir.path().join(mmada_wandb::SPOOL_FILE).exists());
    assert_key_absent(dir.path());
}

fn capture_all_031() -> Vec<Value> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/fixtures/wandb/sdk_capture.jsonl");
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["sdk_version"] == "0.31.0")
        .collect()
}

#[test]
fn preempting_is_sent_at_once() {
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = WandbConfig {
        run_id: Some("preempt1".into()),
        entity: Some("probe-entity".into()),
        flush_interval_secs: 30.0,
        ..fast_config("probe-project")
    };
    let mut run = WandbRun::start(
        &cfg,
        dir.path(),
        RunInit {
            endpoint: Some(endpoint(&server.url())),
            ..RunInit::default()
        },
    )
    .unwrap();
    run.log(0, &[("loss", 1.0)]);
    run.mark_preempting();
    // With a 30 s flush interval only `preempting` makes a request go out now.
    assert!(wait_until(Duration::from_secs(5), || {
        server
            .requests()
            .iter()
            .any(|r| r.body.get("preempting") == Some(&Value::Bool(true)))
    }));
    let ops: Vec<String> = server.requests().iter().map(|r| r.kind()).collect();
    assert_eq!(
        ops[0], "UpsertBucket",
        "no Viewer when the entity is configured"
    );
    assert!(run.finish(0).delivered);
    assert_eq!(server.exitcode("preempt1"), Some(0));
}

#[test]
fn console_lines_heartbeat_and_stop_request() {
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = WandbConfig {
        run_id: Some("console1".into()),
        entity: Some("probe-entity".into()),
        console: true,
        heartbeat_secs: 0.3,
        ..fast_config("probe-project")
    };
    let mut run = WandbRun::start(
        &cfg,
        dir.path(),
        RunInit {
            endpoint: Some(endpoint(&server.url())),
            ..RunInit::default()
        },
    )
    .unwrap();
    run.console("RUN console1 start");
    run.log(0, &[("loss", 1.0)]);
    run.console("step 0 loss 1.0000");
    // Nothing to send for a while: an empty `{}` heartbeat goes out, as the SDK's.
    assert!(wait_until(Duration::from_secs(5), || {
        server
            .requests()
            .iter()
            .any(|r| r.is_file_stream() && r.body == json!({}))
    }));
    assert!(!run.stop_requested());
    server.set_faults(Faults {
        reply_stopped: true,
        ..Faults::default()
    });
    run.log(1, &[("loss", 0.5)]);
    assert!(wait_until(Duration::from_secs(5), || run.stop_requested()));
    assert!(run.finish(0).delivered);

    let console = server.state.lock().unwrap().console["console1"].clone();
    assert_eq!(console.len(), 2);
    // "<UTC %Y-%m-%dT%H:%M:%S.%f> <text>" as in the SDK's output.log lines.
    let (ts, text) = console[1].split_once(' ').unwrap();
    assert_eq!(text, "step 0 loss 1.0000");
    assert_eq!(ts.len(), "2026-11-30T04:54:14.550419".len());
    assert_eq!(&ts[10..11], "T");
    assert!(console[0].ends_with(" RUN console1 start"));
}
