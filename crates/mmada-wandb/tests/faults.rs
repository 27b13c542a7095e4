//! Fault acceptance tests: 5xx retries, a server that stops answering, connection refused at
//! start, offline mode, and replay with `sync`.

mod common;

use common::*;
use mmada_wandb::{RunInit, WandbConfig, WandbMode, WandbRun, sync};
use serde_json::Value;
use std::time::{Duration, Instant};

fn start(cfg: &WandbConfig, dir: &std::path::Path, url: &str) -> WandbRun {
    WandbRun::start(
        cfg,
        dir,
        RunInit {
            run_config: serde_json::json!({"lr": 1e-4, "model": {"layers": 2}}),
            endpoint: Some(endpoint(url)),
            ..RunInit::default()
        },
    )
    .unwrap()
}

fn steps_of(hist: &[Value]) -> Vec<u64> {
    hist.iter().map(|r| r["_step"].as_u64().unwrap()).collect()
}

/// The waits between the failed attempts and the retry after them.
fn gaps(server: &FakeServer) -> Vec<f64> {
    let fs: Vec<Req> = server
        .requests()
        .into_iter()
        .filter(|r| r.is_file_stream())
        .collect();
    fs.windows(2)
        .take(3)
        .map(|w| (w[1].at - w[0].at).as_secs_f64())
        .collect()
}

#[test]
fn five_hundred_three_times_then_ok_delivers_every_row_once() {
    let server = FakeServer::start_with(Faults {
        fail_file_stream: 3,
        fail_status: 500,
        ..Faults::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = WandbConfig {
        run_id: Some("retry500".into()),
        entity: Some("probe-entity".into()),
        retry_base_secs: 0.1,
        retry_max_secs: 2.0,
        spool_after_failures: 10, // rows stay in memory across the retries
        ..fast_config("p")
    };
    let mut run = start(&cfg, dir.path(), &server.url());
    for i in 0..20 {
        run.log(i, &[("loss", 1.0 / (i + 1) as f64)]);
    }
    let report = run.finish(0);
    assert!(report.delivered, "{report:?}");
    assert_eq!(report.rows_delivered, 20);

    let fs: Vec<Req> = server
        .requests()
        .into_iter()
        .filter(|r| r.is_file_stream())
        .collect();
    let statuses: Vec<u16> = fs.iter().map(|r| r.status).collect();
    assert_eq!(&statuses[..4], &[500, 500, 500, 200], "{statuses:?}");
    // The retried request is the same request (same offset, same rows or more).
    let first = &fs[0].body["files"]["wandb-history.jsonl"];
    for r in &fs[1..4] {
        let h = &r.body["files"]["wandb-history.jsonl"];
        assert_eq!(h["offset"], first["offset"]);
        let a = first["content"].as_array().unwrap();
        assert_eq!(&h["content"].as_array().unwrap()[..a.len()], &a[..]);
    }
    // Exponential backoff: ~0.1, ~0.2, ~0.4 s (+0-25 % jitter).
    let g = gaps(&server);
    eprintln!("retry gaps: {g:?}");
    assert!(g[0] >= 0.1 && g[0] < 0.3, "{g:?}");
    assert!(g[1] >= 0.2 && g[1] < 0.45, "{g:?}");
    assert!(g[2] >= 0.4 && g[2] < 0.75, "{g:?}");
    // Exactly once: the accepted requests carried each line once; history is steps 0..20.
    let mut lines = server.accepted_lines("retry500");
    assert_eq!(lines.len(), 20, "{lines:?}");
    lines.sort();
    assert_eq!(lines, (0..20).collect::<Vec<u64>>());
    assert_eq!(
        steps_of(&server.history("retry500")),
        (0..20).collect::<Vec<_>>()
    );
    assert_eq!(server.exitcode("retry500"), Some(0));
    assert!(!dir.path().join(mmada_wandb::SPOOL_FILE).exists());
}

#[test]
fn retries_via_the_spool_honour_retry_after_and_deliver_once() {
    // 429 with Retry-After: 1 three times; rows move to the spool after the first failure and
    // are read back from it once the server answers.
    let server = FakeServer::start_with(Faults {
        fail_file_stream: 3,
        fail_status: 429,
        retry_after: Some("1".into()),
        ..Faults::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = WandbConfig {
        run_id: Some("retry429".into()),
        entity: Some("probe-entity".into()),
        retry_base_secs: 0.05,
        spool_after_failures: 1,
        ..fast_config("p")
    };
    let mut run = start(&cfg, dir.path(), &server.url());
    for i in 0..15 {
        run.log(i, &[("loss", i as f64)]);
    }
    // Rows logged while the server refuses.
    assert!(wait_until(Duration::from_secs(5), || {
        server.requests().iter().filter(|r| r.status == 429).count() >= 2
    }));
    for i in 15..30 {
        run.log(i, &[("loss", i as f64)]);
    }
    let report = run.finish(0);
    assert!(report.delivered, "{report:?}");
    let g = gaps(&server);
    eprintln!("Retry-After gaps: {g:?}");
    assert!(
        g.iter().all(|&x| x >= 0.95),
        "Retry-After: 1 honoured over a 0.05 s backoff: {g:?}"
    );
    assert!(report.rows_spooled >= 15, "{report:?}");
    let mut lines = server.accepted_lines("retry429");
    assert_eq!(lines.len(), 30, "each row accepted exactly once: {lines:?}");
    lines.sort();
    assert_eq!(lines, (0..30).collect::<Vec<u64>>());
    assert_eq!(
        steps_of(&server.history("retry429")),
        (0..30).collect::<Vec<_>>()
    );
    assert_eq!(server.exitcode("retry429"), Some(0));

    // The spool records the delivery, so a later sync sends nothing.
    let n_before = server.requests().len();
    let rep = sync(dir.path(), &endpoint(&server.url()), &fast_sync()).unwrap();
    assert!(rep.runs.is_empty(), "{rep:?}");
    assert_eq!(rep.runs_already_synced, 1);
    assert_eq!(server.requests().len(), n_before);
}

#[test]
fn connection_refused_at_start_then_sync_to_a_working_server() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = WandbConfig {
        run_id: Some("refused1".into()),
        name: Some("refused-run".into()),
        tags: vec!["t1".into()],
        finish_timeout_secs: 0.5,
        spool_after_failures: 2,
        ..fast_config("probe-project")
    };
    let mut run = start(&cfg, dir.path(), &refused_url());
    let t = Instant::now();
    for i in 0..40 {
        run.log(i, &[("train/loss", 2.0 - i as f64 / 40.0)]);
        std::thread::sleep(Duration::from_millis(5));
    }
    run.summary("best_loss", 1.025);
    eprintln!("40 steps with the server down took {:?}", t.elapsed());
    let report = run.finish(0);
    assert!(!report.delivered);
    assert_eq!(report.rows_spooled, 40);
    assert_eq!(
        report.spool_path.as_deref(),
        Some(dir.path().join(mmada_wandb::SPOOL_FILE).as_path())
    );
    assert_eq!(
        spooled_lines(dir.path(), "refused1"),
        (0..40).collect::<Vec<u64>>()
    );
    assert_key_absent(dir.path());

    let server = FakeServer::start();
    let rep = sync(dir.path(), &endpoint(&server.url()), &fast_sync()).unwrap();
    assert_eq!(rep.runs.len(), 1);
    let r = &rep.runs[0];
    assert_eq!(
        (r.run_id.as_str(), r.rows_sent, r.exitcode),
        ("refused1", 40, Some(0))
    );
    assert!(r.summary_sent);
    let reqs = server.requests();
    assert_eq!(reqs[0].kind(), "UpsertBucket");
    let v = &reqs[0].body["variables"];
    assert_eq!(v["name"], "refused1");
    assert_eq!(v["project"], "probe-project");
    assert_eq!(v["displayName"], "refused-run");
    assert_eq!(v["tags"], serde_json::json!(["t1"]));
    let cfgv: Value = serde_json::from_str(v["config"].as_str().unwrap()).unwrap();
    assert_eq!(cfgv["lr"]["value"], 1e-4);
    // 40 rows in batches of 7 at contiguous offsets, complete + exitcode with the last one.
    let fs: Vec<&Req> = reqs.iter().filter(|r| r.is_file_stream()).collect();
    assert_eq!(fs.len(), 6);
    let offs: Vec<u64> = fs
        .iter()
        .map(|r| {
            r.body["files"]["wandb-history.jsonl"]["offset"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(offs, vec![0, 7, 14, 21, 28, 35]);
    assert_eq!(fs[5].body["complete"], true);
    assert_eq!(fs[5].body["exitcode"], 0);
    assert!(fs[..5].iter().all(|r| r.body.get("complete").is_none()));
    assert_eq!(
        steps_of(&server.history("refused1")),
        (0..40).collect::<Vec<_>>()
    );
    assert_eq!(server.summary("refused1").unwrap()["best_loss"], 1.025);
    assert_eq!(server.exitcode("refused1"), Some(0));

    // A second sync finds nothing left to send.
    let n = server.requests().len();
    let rep2 = sync(dir.path(), &endpoint(&server.url()), &fast_sync()).unwrap();
    assert!(rep2.runs.is_empty());
    assert_eq!(server.requests().len(), n);
}

#[test]
fn offline_mode_sends_nothing_and_syncs_later() {
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = WandbConfig {
        mode: WandbMode::Offline,
        run_id: Some("offline1".into()),
        ..fast_config("p")
    };
    let mut run = start(&cfg, dir.path(), &server.url());
    for i in 0..12 {
        run.log(i, &[("loss", i as f64)]);
    }
    run.mark_preempting();
    let report = run.finish(3);
    assert!(!report.delivered);
    assert_eq!(report.rows_spooled, 12);
    assert!(
        server.requests().is_empty(),
        "offline mode makes no request"
    );

    let rep = sync(dir.path(), &endpoint(&server.url()), &fast_sync()).unwrap();
    assert_eq!(rep.runs[0].rows_sent, 12);
    assert_eq!(rep.runs[0].exitcode, Some(3));
    let last = server
        .requests()
        .into_iter()
        .rfind(|r| r.is_file_stream())
        .unwrap();
    assert_eq!(last.body["preempting"], true);
    assert_eq!(server.exitcode("offline1"), Some(3));
    assert_eq!(
        steps_of(&server.history("offline1")),
        (0..12).collect::<Vec<_>>()
    );
}

#[test]
fn disabled_mode_does_nothing() {
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = WandbConfig {
        mode: WandbMode::Disabled,
        ..fast_config("p")
    };
    let mut run = start(&cfg, dir.path(), &server.url());
    run.log(0, &[("loss", 1.0)]);
    assert!(run.resume_state().is_none());
    let rep = run.finish(0);
    assert_eq!(rep.rows_logged, 0);
    std::thread::sleep(Duration::from_millis(100));
    assert!(server.requests().is_empty());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
