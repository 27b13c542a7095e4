//! Resume (same wandb run, history offsets restored), the recipe config section, and the local
//! metrics log.

mod common;

use common::*;
use mmada_wandb::{
    MetricsLog, RunInit, WandbConfig, WandbError, WandbMode, WandbResumeState, WandbRun,
};
use serde_json::{Value, json};
use std::time::Duration;

#[test]
fn resumed_run_continues_the_same_wandb_run_at_the_checkpoint_offset() {
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = WandbConfig {
        entity: Some("probe-entity".into()),
        ..fast_config("probe-project")
    };
    let init = || RunInit {
        run_config: json!({"lr": 1e-4}),
        endpoint: Some(endpoint(&server.url())),
        ..RunInit::default()
    };

    // Process 1: steps 0..7; the checkpoint is taken after step 4.
    let mut run = WandbRun::start(&cfg, dir.path(), init()).unwrap();
    let run_id = run.run_id().unwrap().to_string();
    assert_eq!(run_id.len(), 8, "generated id like the SDK's");
    let mut state = None;
    for i in 0..7u64 {
        run.log(i, &[("loss", 10.0 + i as f64)]);
        if i == 4 {
            run.summary("best_loss", 14.0);
            assert!(wait_until(Duration::from_secs(5), || run.rows_delivered() == 5));
            state = run.resume_state();
        }
    }
    let state = state.unwrap();
    assert!(run.finish(1).delivered);
    assert_eq!(state.run_id, run_id);
    assert_eq!(state.history_lines, 5);
    assert_eq!(
        state.storage_id.as_deref(),
        Some(&*format!("storage-{run_id}"))
    );
    assert_eq!(state.entity.as_deref(), Some("probe-entity"));
    assert_eq!(state.summary["best_loss"], 14.0);
    assert!(state.runtime_secs > 0.0);

    // The trainer stores it in trainer_state.json and reads it back.
    let saved = serde_json::to_string(&json!({"step": 4, "wandb": state})).unwrap();
    let back: Value = serde_json::from_str(&saved).unwrap();
    let restored: WandbResumeState = serde_json::from_value(back["wandb"].clone()).unwrap();
    // serde_json's default float parsing may move a number by one ulp (`_timestamp`
    // 1796557810.841432 → …8414319): the summary is compared numerically, the rest exactly
    assert_eq!(
        WandbResumeState {
            summary: Default::default(),
            ..restored.clone()
        },
        WandbResumeState {
            summary: Default::default(),
            ..state.clone()
        }
    );
    assert_eq!(restored.summary.len(), state.summary.len());
    for (k, v) in &state.summary {
        let (a, b) = (v.as_f64().unwrap(), restored.summary[k].as_f64().unwrap());
        assert!((a - b).abs() <= 1e-12 * a.abs().max(1.0), "{k}: {a} vs {b}");
    }

    // Process 2 resumes from the checkpoint and re-logs steps 5..10.
    let n_before = server.requests().len();
    let mut run = WandbRun::start(
        &cfg,
        dir.path(),
        RunInit {
            resume: Some(restored),
            ..init()
        },
    )
    .unwrap();
    assert_eq!(run.run_id(), Some(run_id.as_str()));
    for i in 5..10u64 {
        run.log(i, &[("loss", 100.0 + i as f64)]);
    }
    let after = run.resume_state().unwrap();
    assert_eq!(after.history_lines, 10);
    assert!(run.finish(0).delivered);

    let reqs = server.requests()[n_before..].to_vec();
    assert_eq!(reqs[0].kind(), "UpsertBucket");
    let v = &reqs[0].body["variables"];
    assert_eq!(v["name"], run_id.as_str());
    assert_eq!(
        v["id"],
        format!("storage-{run_id}"),
        "storage id sent on resume"
    );
    let fs: Vec<&Req> = reqs.iter().filter(|r| r.is_file_stream()).collect();
    let first_hist = fs
        .iter()
        .find_map(|r| r.body.pointer("/files/wandb-history.jsonl"))
        .unwrap();
    assert_eq!(
        first_hist["offset"], 5,
        "history continues at the checkpoint's line"
    );
    let first_summary = fs
        .iter()
        .find_map(|r| r.body.pointer("/files/wandb-summary.json"))
        .unwrap();
    let s: Value = serde_json::from_str(first_summary["content"][0].as_str().unwrap()).unwrap();
    assert_eq!(s["best_loss"], 14.0, "summary restored and re-sent");

    // Lines 5 and 6 of process 1 are overwritten, not duplicated.
    let hist = server.history(&run_id);
    let steps: Vec<u64> = hist.iter().map(|r| r["_step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (0..10).collect::<Vec<_>>());
    assert_eq!(hist[4]["loss"], 14.0);
    assert_eq!(hist[5]["loss"], 105.0);
    assert_eq!(hist[6]["loss"], 106.0);
    // _runtime continues from the saved runtime.
    assert!(hist[5]["_runtime"].as_f64().unwrap() >= state.runtime_secs);
    assert_eq!(server.exitcode(&run_id), Some(0));
}

#[test]
fn resume_state_of_another_project_starts_a_new_run() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = WandbConfig {
        mode: WandbMode::Offline,
        ..fast_config("new-project")
    };
    let old = WandbResumeState {
        run_id: "oldrun01".into(),
        storage_id: None,
        entity: None,
        project: "old-project".into(),
        history_lines: 7,
        console_lines: 0,
        runtime_secs: 3.0,
        summary: Default::default(),
    };
    let run = WandbRun::start(
        &cfg,
        dir.path(),
        RunInit {
            resume: Some(old),
            ..RunInit::default()
        },
    )
    .unwrap();
    assert_ne!(run.run_id(), Some("oldrun01"));
    assert_eq!(run.resume_state().unwrap().history_lines, 0);
    run.finish(0);
}

#[test]
fn config_section_defaults_unknown_keys_and_validation() {
    // An almost empty section is complete.
    let c: WandbConfig = serde_json::from_value(json!({"project": "llada-sft"})).unwrap();
    assert_eq!(c.mode, WandbMode::Online);
    assert_eq!(c.project, "llada-sft");
    assert_eq!(c.flush_interval_secs, 5.0);
    assert_eq!(c.queue_capacity, 4096);
    c.validate().unwrap();
    let c: WandbConfig = serde_json::from_value(json!({"mode": "disabled"})).unwrap();
    assert_eq!(c.mode, WandbMode::Disabled);

    // Unknown keys are rejected, naming the key.
    let e = serde_json::from_value::<WandbConfig>(json!({"projekt": "x"})).unwrap_err();
    assert!(e.to_string().contains("projekt"), "{e}");
    let e = serde_json::from_value::<WandbConfig>(json!({"mode": "sometimes"})).unwrap_err();
    assert!(e.to_string().contains("sometimes"), "{e}");
    // The API key is not a config key.
    assert!(serde_json::from_value::<WandbConfig>(json!({"api_key": "k"})).is_err());

    // validate() names the bad key.
    let bad = |f: &dyn Fn(&mut WandbConfig), key: &str| {
        let mut c = WandbConfig::default();
        f(&mut c);
        match c.validate() {
            Err(WandbError::InvalidConfig { key: k, .. }) => assert_eq!(k, key),
            other => panic!("expected InvalidConfig({key}), got {other:?}"),
        }
    };
    bad(&|c| c.project = " ".into(), "project");
    bad(&|c| c.flush_interval_secs = 0.0, "flush_interval_secs");
    bad(&|c| c.heartbeat_secs = f64::NAN, "heartbeat_secs");
    bad(&|c| c.queue_capacity = 0, "queue_capacity");
    bad(&|c| c.run_id = Some("has space".into()), "run_id");
    bad(&|c| c.base_url = Some("ftp://x".into()), "base_url");
    bad(&|c| c.retry_max_secs = 1.0, "retry_max_secs");
    bad(&|c| c.tags = vec![String::new()], "tags");
    let c = WandbConfig {
        flush_interval_secs: -1.0,
        ..WandbConfig::default()
    };
    let msg = c.validate().unwrap_err().to_string();
    assert!(msg.contains("flush_interval_secs"), "{msg}");

    // start() validates too.
    let dir = tempfile::tempdir().unwrap();
    let e = WandbRun::start(&c, dir.path(), RunInit::default()).unwrap_err();
    assert!(matches!(
        e,
        WandbError::InvalidConfig {
            key: "flush_interval_secs",
            ..
        }
    ));

    // Environment overrides, as with the SDK.
    let mut c = WandbConfig::default();
    c.apply_env_from(|k| match k {
        "WANDB_MODE" => Some("offline".into()),
        "WANDB_PROJECT" => Some("envproj".into()),
        _ => None,
    })
    .unwrap();
    assert_eq!(
        (c.mode, c.project.as_str()),
        (WandbMode::Offline, "envproj")
    );
    // the run's display fields, as the SDK reads them
    c.apply_env_from(|k| match k {
        "WANDB_NAME" => Some("my run".into()),
        "WANDB_TAGS" => Some("sft, quickstart,,cpu".into()),
        "WANDB_NOTES" => Some("a note".into()),
        "WANDB_RUN_GROUP" => Some("ablation".into()),
        "WANDB_JOB_TYPE" => Some("train".into()),
        _ => None,
    })
    .unwrap();
    assert_eq!(c.name.as_deref(), Some("my run"));
    assert_eq!(c.tags, ["sft", "quickstart", "cpu"]);
    assert_eq!(c.notes.as_deref(), Some("a note"));
    assert_eq!(c.group.as_deref(), Some("ablation"));
    assert_eq!(c.job_type.as_deref(), Some("train"));
    assert_eq!(c.project, "envproj", "unset variables change nothing");
    let e = c
        .apply_env_from(|k| (k == "WANDB_MODE").then(|| "bogus".into()))
        .unwrap_err();
    assert!(e.to_string().contains("mode"));
    // the local files' folder and the resume policy
    assert_eq!(c.resume, mmada_wandb::WandbResume::Auto);
    let run = std::path::Path::new("runs/quickstart");
    assert_eq!(c.local_dir(run), run, "default: the run directory");
    c.apply_env_from(|k| match k {
        "WANDB_DIR" => Some("/scratch/wandb".into()),
        "WANDB_RESUME" => Some("must".into()),
        _ => None,
    })
    .unwrap();
    assert_eq!(c.resume, mmada_wandb::WandbResume::Must);
    assert_eq!(
        c.local_dir(run),
        std::path::Path::new("/scratch/wandb/quickstart")
    );
    for (v, want) in [
        ("allow", mmada_wandb::WandbResume::Allow),
        ("never", mmada_wandb::WandbResume::Never),
        ("auto", mmada_wandb::WandbResume::Auto),
    ] {
        c.apply_env_from(|k| (k == "WANDB_RESUME").then(|| v.into()))
            .unwrap();
        assert_eq!(c.resume, want, "{v}");
    }
    let e = c
        .apply_env_from(|k| (k == "WANDB_RESUME").then(|| "sometimes".into()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("WANDB_RESUME") && e.contains("must"), "{e}");
}

#[test]
fn missing_api_key_is_a_clear_error_and_keys_are_redacted() {
    let k = mmada_wandb::ApiKey::new(KEY);
    assert!(!format!("{k:?}").contains(KEY));
    let ep = endpoint("http://127.0.0.1:9");
    assert!(!format!("{ep:?}").contains(KEY));
    let e = mmada_wandb::Endpoint::new("not-a-url", k).unwrap_err();
    assert!(matches!(e, WandbError::InvalidBaseUrl { .. }));
}

#[test]
fn metrics_log_writes_one_object_per_step_and_trims_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = MetricsLog::open(dir.path()).unwrap();
    for s in 0..4u64 {
        m.log(
            s,
            &[("train/loss", 1.0 / (s + 1) as f64), ("bad", f64::NAN)],
        )
        .unwrap();
    }
    drop(m);
    let read = || -> Vec<Value> {
        std::fs::read_to_string(dir.path().join(mmada_wandb::METRICS_FILE))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let rows = read();
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[1]["step"], 1);
    assert_eq!(rows[1]["train/loss"], 0.5);
    assert_eq!(rows[1]["bad"], Value::Null);
    assert!(rows[1]["timestamp"].as_f64().unwrap() > 1.7e9);

    // Resume from a checkpoint at step 1: steps 2 and 3 will be logged again.
    let mut m = MetricsLog::open_resumed(dir.path(), 1).unwrap();
    m.log(2, &[("train/loss", 0.25)]).unwrap();
    let steps: Vec<u64> = read().iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![0, 1, 2]);
}

#[test]
fn run_resume_status_reports_where_an_existing_run_stands() {
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = WandbConfig {
        entity: Some("probe-entity".into()),
        run_id: Some("status-probe".into()),
        ..fast_config("probe-project")
    };
    let ep = endpoint(&server.url());
    // unknown run → None (a fresh run is created)
    assert_eq!(
        mmada_wandb::query_resume_status(&ep, &cfg, "status-probe", None).unwrap(),
        None
    );
    let mut run = WandbRun::start(
        &cfg,
        dir.path(),
        RunInit {
            endpoint: Some(ep.clone()),
            ..RunInit::default()
        },
    )
    .unwrap();
    for i in 1..=5u64 {
        run.log(i, &[("loss", i as f64)]);
    }
    run.summary("best_loss", 1.0);
    assert!(run.finish(0).delivered);

    let n0 = server.requests().len();
    let s = mmada_wandb::query_resume_status(&ep, &cfg, "status-probe", None)
        .unwrap()
        .unwrap();
    let q = &server.requests()[n0];
    assert_eq!(q.kind(), "RunResumeStatus");
    assert_eq!(
        q.body["variables"],
        json!({"project": "probe-project", "entity": "probe-entity", "name": "status-probe"})
    );
    assert_eq!(s.run_id, "status-probe");
    assert_eq!(s.storage_id.as_deref(), Some("storage-status-probe"));
    assert_eq!(s.history_lines, 5);
    assert_eq!(s.summary["best_loss"], 1.0);
    assert_eq!(s.summary["loss"], 5.0);
    assert!(s.runtime_secs > 0.0);
    // resuming the step-3 checkpoint: rows of steps 4 and 5 are overwritten
    let s3 = mmada_wandb::query_resume_status(&ep, &cfg, "status-probe", Some(3))
        .unwrap()
        .unwrap();
    assert_eq!(s3.history_lines, 3);
    // the state resumes the run there: steps 4.. land at lines 3..
    let mut run = WandbRun::start(
        &cfg,
        dir.path(),
        RunInit {
            endpoint: Some(ep.clone()),
            resume: Some(s3),
            ..RunInit::default()
        },
    )
    .unwrap();
    run.log(4, &[("loss", 40.0)]);
    assert!(run.finish(0).delivered);
    let h = server.history("status-probe");
    assert_eq!(h.len(), 5);
    assert_eq!(h[3]["loss"], 40.0);
    assert_eq!(
        h[4]["_step"], 5,
        "the old step-5 line stays until re-logged"
    );
    // a server that refuses → a clear error, not a guess
    let refused = endpoint(&refused_url());
    let e = mmada_wandb::query_resume_status(&refused, &cfg, "status-probe", None).unwrap_err();
    assert!(e.to_string().contains("RunResumeStatus"), "{e}");
}
