//! Both trainers send their metrics to wandb through `logging.wandb` (issue 7 acceptance): a
//! quickstart-shaped SFT run and a UniGRPO run against the loopback fake server
//! (`mmada_wandb::testing`, 127.0.0.1:0) produce history rows with the metric names of
//! `metrics.jsonl`, a summary and `complete` + exit code 0. A resumed UniGRPO run continues
//! the same wandb run; without the saved wandb state it asks the server (`RunResumeStatus`)
//! and overwrites the rows logged after the checkpoint instead of duplicating them.

use mmada_train::recipe::Recipe as _;
use mmada_train::trainer::TrainLoop as _;
use std::path::{Path, PathBuf};

use mmada_model::backend::CpuAutodiff;
use mmada_train::recipe::SftRecipe;
use mmada_train::sft::{Resume, Sft, SftOptions};
use mmada_train::unigrpo::{UniGrpo, UniGrpoOptions, UniGrpoRecipe};
use mmada_wandb::testing::{FakeServer, endpoint};
use serde_json::Value;

/// `logging.wandb` with short timings, pointed at nothing (the endpoint comes from the options).
const WANDB: &str = "{project: trainer-probe, entity: probe-entity, flush_interval_secs: 0.1, retry_base_secs: 0.05, retry_max_secs: 0.5, request_timeout_secs: 2.0, finish_timeout_secs: 10.0}";

fn data(dir: &Path) -> PathBuf {
    let d = dir.join("data");
    if !d.join("arith.jsonl").is_file() {
        mmada_train::synth::write_arithmetic(&d, 64, 5).unwrap();
    }
    d
}

fn metric_rows(run_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Every key of every metrics.jsonl row arrives in the history row of the same step.
fn assert_history_matches(history: &[Value], rows: &[Value]) {
    assert_eq!(history.len(), rows.len());
    for (h, r) in history.iter().zip(rows) {
        assert_eq!(h["_step"], r["step"]);
        assert!(h["_runtime"].is_number() && h["_timestamp"].is_number());
        for (k, v) in r.as_object().unwrap() {
            if v.is_number() {
                assert!(h.get(k).is_some_and(Value::is_number), "history lacks {k}");
            }
        }
    }
}

fn run_id_of(server: &FakeServer) -> String {
    let reqs = server.requests();
    let up = reqs
        .iter()
        .find(|r| r.kind() == "UpsertBucket")
        .expect("an UpsertBucket");
    up.body["variables"]["name"].as_str().unwrap().to_string()
}

#[test]
fn quickstart_sft_sends_its_metrics() {
    let server = FakeServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let d = data(tmp.path());
    let recipe_path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../recipes/quickstart.yaml");
    // quickstart.yaml with this test's data, shrunk to CI size
    let text = std::fs::read_to_string(&recipe_path)
        .unwrap()
        .replace("runs/quickstart-data/", &format!("{}/", d.display()));
    let sets: Vec<String> = [
        format!("run.output_dir={}", tmp.path().join("runs").display()),
        "model.overrides.d_model=32".into(),
        "model.overrides.n_layers=2".into(),
        "model.overrides.n_heads=2".into(),
        "model.overrides.n_kv_heads=2".into(),
        "model.overrides.mlp_hidden_size=64".into(),
        "data.lm.batch_size=4".into(),
        "data.eval_examples=8".into(),
        "train.max_steps=4".into(),
        "train.log_every=2".into(),
        "train.eval_every=4".into(),
        "checkpoint.every=0".into(),
        format!("logging.wandb={WANDB}"),
    ]
    .to_vec();
    let recipe = SftRecipe::parse(&text, "quickstart.yaml", &sets).unwrap();
    let opts = SftOptions {
        base_dir: PathBuf::from("/"),
        wandb_endpoint: Some(endpoint(&server.url())),
        ..Default::default()
    };
    let out = Sft::run::<CpuAutodiff>(&recipe, &Default::default(), &opts, &mut |_| {}).unwrap();
    assert_eq!(out.final_step, 4);
    let run_id = run_id_of(&server);
    let history = server.history(&run_id);
    let rows = metric_rows(&out.run_dir);
    assert_eq!(rows.len(), 2, "log_every 2 over 4 steps");
    assert_history_matches(&history, &rows);
    // the SFT metric names (upstream names, README)
    for k in [
        "loss",
        "step_loss_lm",
        "lr",
        "grad_norm",
        "avg_masking_rate",
        "samples/sec/gpu",
    ] {
        assert!(history[1][k].is_number(), "{k}");
    }
    assert!(history[1]["eval_loss"].is_number());
    assert_eq!(history[1]["_step"], 4);
    let summary = server.summary(&run_id).unwrap();
    assert!(summary["final_loss"].is_number());
    assert_eq!(server.exitcode(&run_id), Some(0));
    // the resume state is in the last checkpoint
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(out.last_checkpoint.unwrap().join("trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["extra"]["wandb"]["run_id"], run_id.as_str());
    assert_eq!(state["extra"]["wandb"]["history_lines"], 2);
}

fn grpo_recipe(dir: &Path, name: &str, sets: &[String]) -> UniGrpoRecipe {
    let d = data(dir);
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../recipes/quickstart_unigrpo.yaml"),
    )
    .unwrap();
    // quickstart_unigrpo.yaml from a fresh tiny model instead of the quickstart checkpoint
    let mut all: Vec<String> = vec![
        format!("run.name={name}"),
        format!("run.output_dir={}", dir.join("runs").display()),
        "model.checkpoint=null".into(),
        "model.preset=tiny".into(),
        "model.overrides={d_model: 32, n_layers: 2, n_heads: 2, n_kv_heads: 2, mlp_hidden_size: 64}".into(),
        format!("tokenizer.path={}", d.join("tokenizer.json").display()),
        format!("prompts.inline.source.path={}", d.join("arith.jsonl").display()),
        "grpo.num_generations=2".into(),
        "grpo.generation_batch_size=4".into(),
        "grpo.max_completion_length=8".into(),
        "rollout={steps: 4, block_length: 8, temperature: 1.0}".into(),
        "train.max_steps=4".into(),
        "checkpoint.every=2".into(),
        "checkpoint.keep_last=4".into(),
        format!("logging.wandb={WANDB}"),
    ];
    all.extend_from_slice(sets);
    UniGrpoRecipe::parse(&text, "quickstart_unigrpo.yaml", &all).unwrap()
}

#[test]
fn unigrpo_sends_its_metrics_and_resumes_the_same_run() {
    let server = FakeServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let dev = Default::default();
    let r = grpo_recipe(tmp.path(), "grpo", &[]);
    let opts = |resume| UniGrpoOptions {
        resume,
        wandb_endpoint: Some(endpoint(&server.url())),
        ..Default::default()
    };
    let first = UniGrpo::run::<CpuAutodiff>(
        &r,
        &dev,
        &UniGrpoOptions {
            stop_after: Some(2),
            ..opts(None)
        },
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(first.final_step, 2);
    let run_id = run_id_of(&server);
    // the second process resumes the step-2 checkpoint and continues the same wandb run
    let out =
        UniGrpo::run::<CpuAutodiff>(&r, &dev, &opts(Some(Resume::Latest)), &mut |_| {}).unwrap();
    assert_eq!(out.final_step, 4);
    let history = server.history(&run_id);
    let rows = metric_rows(&out.run_dir);
    assert_eq!(rows.len(), 4);
    assert_history_matches(&history, &rows);
    let steps: Vec<u64> = history
        .iter()
        .map(|h| h["_step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4], "one wandb run, contiguous");
    for k in [
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "kl",
        "loss",
        "policy_loss",
        "kl_loss",
        "clip_ratio/region_mean",
        "completions/mean_length",
        "completions/mean_terminated_length",
        "rewards/math_correctness/mean",
        "rewards/length/std",
        "time/rollout_s",
        "time/logprob_s",
        "time/backward_s",
        "rollout_tokens_per_s",
    ] {
        for h in &history {
            assert!(h[k].is_number(), "step {}: {k} = {}", h["_step"], h[k]);
        }
    }
    // the second process continued the run: same storage id, no second run
    let ups: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|q| q.kind() == "UpsertBucket")
        .collect();
    assert!(ups.len() >= 2);
    assert!(
        ups.iter()
            .all(|q| q.body["variables"]["name"] == run_id.as_str())
    );
    assert_eq!(
        ups.last().unwrap().body["variables"]["id"],
        format!("storage-{run_id}").as_str()
    );
    assert!(server.summary(&run_id).unwrap()["final_reward"].is_number());
    assert_eq!(server.exitcode(&run_id), Some(0));
}

#[test]
fn resume_without_saved_wandb_state_asks_the_server() {
    let server = FakeServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let dev = Default::default();
    let id = ["logging.wandb.run_id=grpo-lost-state".to_string()];
    let r = grpo_recipe(tmp.path(), "lost", &id);
    let opts = |resume, stop_after| UniGrpoOptions {
        resume,
        stop_after,
        wandb_endpoint: Some(endpoint(&server.url())),
        ..Default::default()
    };
    // 3 steps (checkpoints at 2 and 3), then resume from step 2 with the wandb state lost:
    // the server has rows of steps 1, 2, 3; the step-3 row must be overwritten, not repeated.
    let first = UniGrpo::run::<CpuAutodiff>(&r, &dev, &opts(None, Some(3)), &mut |_| {}).unwrap();
    assert_eq!(first.final_step, 3);
    assert_eq!(server.history("grpo-lost-state").len(), 3);
    let ck2 = first.run_dir.join("checkpoints/step-000002");
    let state_path = ck2.join("trainer_state.json");
    let mut state: Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    assert!(state["extra"]["wandb"].is_object());
    state["extra"].as_object_mut().unwrap().remove("wandb");
    std::fs::write(&state_path, serde_json::to_string(&state).unwrap()).unwrap();
    std::fs::remove_dir_all(first.run_dir.join("checkpoints/step-000003")).unwrap();

    let n0 = server.requests().len();
    let out =
        UniGrpo::run::<CpuAutodiff>(&r, &dev, &opts(Some(Resume::Path(ck2)), None), &mut |_| {})
            .unwrap();
    assert_eq!(out.final_step, 4);
    let reqs = server.requests()[n0..].to_vec();
    let q = reqs
        .iter()
        .find(|q| q.kind() == "RunResumeStatus")
        .expect("RunResumeStatus asked");
    // variables as in sdk_capture.jsonl (resume_allow)
    assert_eq!(q.body["variables"]["name"], "grpo-lost-state");
    assert_eq!(q.body["variables"]["project"], "trainer-probe");
    assert_eq!(q.body["variables"]["entity"], "probe-entity");
    assert!(
        q.body["query"]
            .as_str()
            .unwrap()
            .contains("bucket(name: $name, missingOk: true)")
    );
    let up = reqs.iter().find(|q| q.kind() == "UpsertBucket").unwrap();
    assert_eq!(up.body["variables"]["id"], "storage-grpo-lost-state");
    let history = server.history("grpo-lost-state");
    let steps: Vec<u64> = history
        .iter()
        .map(|h| h["_step"].as_u64().unwrap())
        .collect();
    assert_eq!(
        steps,
        [1, 2, 3, 4],
        "step 3 overwritten at its line, not duplicated"
    );
    let lines = server.accepted_lines("grpo-lost-state");
    assert_eq!(lines.iter().filter(|&&l| l == 2).count(), 2, "{lines:?}");
    // the runtime continues from the kept row (step 2), it does not restart at 0
    let rt2 = history[1]["_runtime"].as_f64().unwrap();
    assert!(history[2]["_runtime"].as_f64().unwrap() >= rt2);
    assert_eq!(server.exitcode("grpo-lost-state"), Some(0));
}

#[test]
fn wandb_resume_policy_and_local_dir_as_the_sdk() {
    let server = FakeServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let dev = Default::default();
    let opts = |resume, stop_after| UniGrpoOptions {
        resume,
        stop_after,
        wandb_endpoint: Some(endpoint(&server.url())),
        ..Default::default()
    };
    // `never`: resuming training from a checkpoint starts a new wandb run
    let never = ["logging.wandb.resume=never".to_string()];
    let r = grpo_recipe(tmp.path(), "never", &never);
    let first = UniGrpo::run::<CpuAutodiff>(&r, &dev, &opts(None, Some(2)), &mut |_| {}).unwrap();
    let first_id = run_id_of(&server);
    let out = UniGrpo::run::<CpuAutodiff>(&r, &dev, &opts(Some(Resume::Latest), None), &mut |_| {})
        .unwrap();
    assert_eq!((first.final_step, out.final_step), (2, 4));
    let ids: std::collections::BTreeSet<String> = server
        .requests()
        .into_iter()
        .filter(|q| q.kind() == "UpsertBucket")
        .map(|q| q.body["variables"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 2, "two wandb runs: {ids:?}");
    let second_id = ids.iter().find(|i| **i != first_id).unwrap();
    let steps: Vec<u64> = server
        .history(second_id)
        .iter()
        .map(|h| h["_step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [3, 4]);
    // `must` without a run to continue: the run does not start, and says why
    let must = ["logging.wandb.resume=must".to_string()];
    let r = grpo_recipe(tmp.path(), "must", &must);
    let e = UniGrpo::run::<CpuAutodiff>(&r, &dev, &opts(None, None), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`must`") && e.contains("no wandb run to continue") && e.contains("run_id"),
        "{e}"
    );
    // `allow` + an explicit run id that the server has: a fresh training run continues it
    let allow = [
        "logging.wandb.resume=allow".to_string(),
        format!("logging.wandb.run_id={first_id}"),
    ];
    let r = grpo_recipe(tmp.path(), "allow", &allow);
    let n0 = server.requests().len();
    UniGrpo::run::<CpuAutodiff>(&r, &dev, &opts(None, Some(1)), &mut |_| {}).unwrap();
    assert!(
        server.requests()[n0..]
            .iter()
            .any(|q| q.kind() == "RunResumeStatus"),
        "the server was asked about the named run"
    );
    // `dir` (WANDB_DIR): the spool goes to dir/<run name>/, not into the run directory
    let wdir = tmp.path().join("wandb-files");
    let offline = [
        "logging.wandb.mode=offline".to_string(),
        format!("logging.wandb.dir={}", wdir.display()),
    ];
    let r = grpo_recipe(tmp.path(), "local", &offline);
    let out = UniGrpo::run::<CpuAutodiff>(&r, &dev, &opts(None, Some(1)), &mut |_| {}).unwrap();
    assert!(!out.run_dir.join(mmada_wandb::SPOOL_FILE).exists());
    let spool = wdir.join("local").join(mmada_wandb::SPOOL_FILE);
    assert!(
        std::fs::read_to_string(&spool).unwrap().contains("history"),
        "{}",
        spool.display()
    );
}
