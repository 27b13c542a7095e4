//! Never lose a run (issue 21): the non-finite guard (a skipped step, a diverging run that
//! stops with its finite checkpoints kept, the same decision on every data-parallel rank),
//! kill -9 during checkpoint writes, and the exit codes of `mmada-train`.

use mmada_train::recipe::Recipe as _;
use mmada_train::trainer::TrainLoop as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mmada_model::backend::{Cpu, CpuAutodiff};
use mmada_model::{FloatDType, load_checkpoint};
use mmada_train::dist::DistConfig;
use mmada_train::recipe::SftRecipe;
use mmada_train::sft::{Resume, Sft, SftOptions, SftOutcome};
use mmada_train::unigrpo::{UniGrpo, UniGrpoOptions, UniGrpoRecipe};

mod common;
use common::sft_recipe;

fn opts(inject: &[u64]) -> SftOptions {
    SftOptions {
        base_dir: PathBuf::from("/"),
        test_nonfinite_steps: inject.to_vec(),
        ..Default::default()
    }
}

fn metric_rows(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn checkpoints(run_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(run_dir.join("checkpoints"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("step-"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Every tensor of a checkpoint's model, and whether all of them are finite.
fn weights(ckpt: &Path) -> Vec<(String, Vec<f32>)> {
    let (_, m) =
        load_checkpoint::<Cpu>(&ckpt.join("model"), &Default::default(), FloatDType::F32).unwrap();
    m.named_tensors()
        .into_iter()
        .map(|(n, t)| (n, t.to_data().to_vec::<f32>().unwrap()))
        .collect()
}

fn all_finite(ckpt: &Path) -> bool {
    weights(ckpt)
        .iter()
        .all(|(_, v)| v.iter().all(|x| x.is_finite()))
}

#[test]
fn a_single_non_finite_step_is_skipped_and_the_run_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let r = sft_recipe(tmp.path(), "one_bad", &[]);
    // step index 2 (the third step) gets a NaN loss on rank 0
    let out = Sft::run::<CpuAutodiff>(&r, &Default::default(), &opts(&[2]), &mut |_| {}).unwrap();
    assert_eq!(out.final_step, 6);
    assert!(!out.interrupted);
    let rows = metric_rows(&out.run_dir);
    let counts: Vec<u64> = rows
        .iter()
        .map(|r| r["nonfinite_steps"].as_u64().unwrap())
        .collect();
    assert_eq!(counts, [0, 0, 1, 1, 1, 1]);
    // the skipped step's norm is NaN (null in JSON); the others are finite numbers
    assert!(rows[2]["grad_norm"].is_null(), "{}", rows[2]);
    for k in [0, 1, 3, 4, 5] {
        assert!(rows[k]["grad_norm"].as_f64().unwrap().is_finite());
        assert!(out.losses[k].is_finite(), "loss of step {}", k + 1);
    }
    // no checkpoint of the non-finite step; every other step has one, all finite: had the
    // NaN gradients been applied, every later weight and loss would be NaN
    assert_eq!(
        checkpoints(&out.run_dir),
        [
            "step-000001",
            "step-000002",
            "step-000004",
            "step-000005",
            "step-000006"
        ]
    );
    assert!(all_finite(out.last_checkpoint.as_ref().unwrap()));
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            out.last_checkpoint
                .as_ref()
                .unwrap()
                .join("trainer_state.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(state["extra"]["nonfinite_steps"], 1);
    assert!(state["losses"][2].is_null(), "{}", state["losses"]);

    // resume over a skipped step: stop after 4 steps (the state holds the NaN loss as
    // `null`), resume, and land on the same losses and weights as the straight run
    let split = sft_recipe(tmp.path(), "one_bad_split", &[]);
    let first = Sft::run::<CpuAutodiff>(
        &split,
        &Default::default(),
        &SftOptions {
            stop_after: Some(4),
            ..opts(&[2])
        },
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(first.final_step, 4);
    let second = Sft::run::<CpuAutodiff>(
        &split,
        &Default::default(),
        &SftOptions {
            resume: Some(Resume::Latest),
            ..opts(&[])
        },
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(second.final_step, 6);
    assert_eq!(second.losses[..2], out.losses[..2]);
    assert!(second.losses[2].is_nan());
    assert_eq!(second.losses[3..], out.losses[3..]);
    assert!(
        weights(second.last_checkpoint.as_ref().unwrap())
            == weights(out.last_checkpoint.as_ref().unwrap()),
        "resumed weights differ"
    );
    let rows = metric_rows(&second.run_dir);
    assert_eq!(rows.last().unwrap()["nonfinite_steps"], 1, "resumed count");
}

#[test]
fn a_non_finite_step_on_one_rank_is_skipped_by_every_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let r = sft_recipe(
        tmp.path(),
        "dp_bad",
        &["train.device=cpu:2", "checkpoint.every=0"],
    );
    let devices = vec![Default::default(); 2];
    let dist = DistConfig {
        check_every: 1,
        ..Default::default()
    };
    // rank 0 alone sees a NaN loss at step index 1; rank 1's loss is finite. Had the ranks
    // decided differently, the replica check of every step (check_every 1) would fail.
    let out: SftOutcome =
        Sft::run_dp::<CpuAutodiff>(&r, &devices, &dist, &opts(&[1]), &mut |_| {}).unwrap();
    assert_eq!(out.final_step, 6);
    let counts: Vec<u64> = metric_rows(&out.run_dir)
        .iter()
        .map(|r| r["nonfinite_steps"].as_u64().unwrap())
        .collect();
    assert_eq!(counts, [0, 1, 1, 1, 1, 1]);
    assert!(
        out.losses[1].is_nan(),
        "the step's mean loss over ranks is NaN"
    );
    assert!(all_finite(out.last_checkpoint.as_ref().unwrap()));
}

/// A UniGRPO recipe on generated arithmetic prompts (character tokenizer).
fn grpo_recipe(dir: &Path, name: &str, sets: &[&str]) -> UniGrpoRecipe {
    let data = dir.join("data");
    if !data.join("arith.jsonl").is_file() {
        mmada_train::synth::write_arithmetic(&data, 64, 11).unwrap();
    }
    let text = format!(
        r##"
run: {{name: {name}, output_dir: "{out}", seed: 9}}
model:
  preset: tiny
  overrides: {{d_model: 32, n_layers: 2, n_heads: 2, n_kv_heads: 2, mlp_hidden_size: 64}}
tokenizer: {{path: "{tok}"}}
prompts:
  inline:
    name: arithmetic
    task: chat
    source: {{path: "{jsonl}"}}
    format: jsonl
    fields: {{question: question, answer: answer}}
    license: MIT
    split: train
  cot: false
  max_prompt_length: 32
grpo:
  num_generations: 2
  generation_batch_size: 4
  num_iterations: 2
  beta: 0.04
  max_completion_length: 8
rollout: {{steps: 4, block_length: 8, temperature: 1.0}}
reward_funcs:
  - kind: length
    params: {{min: 1, max: 4, margin: 4, unit: tokens}}
optimizer: {{lr: 1.0e-3, weight_decay: 0.01}}
train: {{max_steps: 4}}
checkpoint: {{every: 1, keep_last: 0, model_dtype: f32}}
"##,
        out = dir.join("runs").display(),
        tok = data.join("tokenizer.json").display(),
        jsonl = data.join("arith.jsonl").display(),
    );
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    UniGrpoRecipe::parse(&text, name, &sets).unwrap()
}

#[test]
fn unigrpo_skips_a_non_finite_update_and_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let r = grpo_recipe(tmp.path(), "grpo_bad", &[]);
    let o = UniGrpoOptions {
        base_dir: PathBuf::from("/"),
        test_nonfinite_steps: vec![1],
        ..Default::default()
    };
    let out = UniGrpo::run::<CpuAutodiff>(&r, &Default::default(), &o, &mut |_| {}).unwrap();
    assert_eq!(out.final_step, 4);
    let counts: Vec<u64> = metric_rows(&out.run_dir)
        .iter()
        .map(|r| r["nonfinite_steps"].as_u64().unwrap())
        .collect();
    assert_eq!(counts, [0, 1, 1, 1]);
    assert_eq!(
        checkpoints(&out.run_dir),
        ["step-000001", "step-000003", "step-000004"]
    );
    assert!(all_finite(out.last_checkpoint.as_ref().unwrap()));
    assert!(
        out.losses
            .iter()
            .enumerate()
            .all(|(i, l)| i == 1 || l.is_finite())
    );
}

#[test]
fn k_consecutive_non_finite_steps_stop_the_run_with_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let r = sft_recipe(
        tmp.path(),
        "streak",
        &["train.max_steps=10", "train.max_nonfinite_steps=3"],
    );
    let err = Sft::run::<CpuAutodiff>(&r, &Default::default(), &opts(&[2, 3, 4]), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("3 consecutive steps (3..=5")
            && err.contains("train.max_nonfinite_steps = 3")
            && err.contains("step-000002"),
        "{err}"
    );
    let run = tmp.path().join("runs/streak");
    assert_eq!(checkpoints(&run), ["step-000001", "step-000002"]);
    assert_eq!(
        std::fs::read_to_string(run.join("checkpoints/latest"))
            .unwrap()
            .trim(),
        "step-000002"
    );
    // two non-finite steps in a row, then a finite one: the streak restarts, no stop
    let r = sft_recipe(
        tmp.path(),
        "two",
        &["train.max_steps=6", "train.max_nonfinite_steps=3"],
    );
    let out = Sft::run::<CpuAutodiff>(&r, &Default::default(), &opts(&[1, 2, 4, 5]), &mut |_| {})
        .unwrap();
    assert_eq!(out.final_step, 6);
    let rows = metric_rows(&out.run_dir);
    assert_eq!(rows.last().unwrap()["nonfinite_steps"], 4);
    // the last step was non-finite: the run finished, its newest checkpoint is step 4
    assert_eq!(
        out.last_checkpoint.as_ref().unwrap().file_name().unwrap(),
        "step-000004"
    );
    // `train.max_nonfinite_steps: 0` is a recipe error naming the key
    let e = SftRecipe::parse(
        &r.to_yaml(),
        "r.yaml",
        &["train.max_nonfinite_steps=0".into()],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("train.max_nonfinite_steps"), "{e}");
}

fn write_recipe(dir: &Path, r: &SftRecipe, file: &str) -> PathBuf {
    let p = dir.join(file);
    std::fs::write(&p, r.to_yaml()).unwrap();
    p
}

fn train_cmd(recipe: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mmada-train"));
    c.args(["sft", "--recipe"])
        .arg(recipe)
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("WORLD_SIZE")
        .env_remove("RANK")
        .env_remove("NNODES")
        .env_remove("NODE_RANK");
    c
}

/// Wait at most `limit` for a child; kill it and fail on a hang. Returns (status code, log).
fn wait(mut c: Child, limit: Duration, who: &str) -> (Option<i32>, String) {
    let t0 = Instant::now();
    loop {
        if c.try_wait().unwrap().is_some() {
            let out = c.wait_with_output().unwrap();
            let mut log = String::from_utf8_lossy(&out.stdout).to_string();
            log.push_str(&String::from_utf8_lossy(&out.stderr));
            return (out.status.code(), log);
        }
        if t0.elapsed() > limit {
            let _ = c.kill();
            panic!("{who} did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A diverging run through the binary: 3 good steps, then a resume at a learning rate of
/// 1e30. The run must stop with exit status 1 and a message, write no checkpoint holding a
/// non-finite tensor, and keep its earlier finite checkpoints (`keep_last: 3`).
#[test]
fn a_diverging_run_stops_non_zero_and_keeps_its_finite_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let r = sft_recipe(
        tmp.path(),
        "diverge",
        &["train.max_steps=30", "checkpoint.keep_last=3"],
    );
    let path = write_recipe(tmp.path(), &r, "diverge.yaml");
    let (code, log) = wait(
        train_cmd(&path, &["--set", "train.max_steps=3"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        Duration::from_secs(300),
        "good steps",
    );
    assert_eq!(code, Some(0), "{log}");
    for lr in ["1.0e30", ".inf"] {
        let (code, log) = wait(
            train_cmd(
                &path,
                &["--resume", "latest", "--set", &format!("optimizer.lr={lr}")],
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
            Duration::from_secs(300),
            "diverging run",
        );
        assert_eq!(code, Some(1), "lr {lr}: {log}");
        assert!(
            log.contains("non-finite") && log.contains("optimizer.lr"),
            "lr {lr}: {log}"
        );
        let run = tmp.path().join("runs/diverge");
        let names = checkpoints(&run);
        println!("lr {lr}: checkpoints {names:?}");
        for n in &names {
            let ck = run.join("checkpoints").join(n);
            assert!(all_finite(&ck), "lr {lr}: {n} holds a non-finite tensor");
        }
        // the good checkpoints of the first invocation are still there (keep_last 3 with at
        // most one new finite checkpoint of the diverging invocation)
        assert!(
            names.contains(&"step-000003".to_string())
                && names.contains(&"step-000002".to_string()),
            "lr {lr}: {names:?}"
        );
        let latest = std::fs::read_to_string(run.join("checkpoints/latest")).unwrap();
        assert!(all_finite(&run.join("checkpoints").join(latest.trim())));
        // back to the good state for the next learning rate
        for n in names {
            if n.as_str() > "step-000003" {
                std::fs::remove_dir_all(run.join("checkpoints").join(n)).unwrap();
            }
        }
        std::fs::write(run.join("checkpoints/latest"), "step-000003\n").unwrap();
    }
}

/// kill -9 while a checkpoint is being written, several times: the newest complete
/// checkpoint (`latest`) always loads, and the run resumes from it.
#[test]
fn kill_9_during_checkpoint_writes_leaves_a_loadable_newest_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    // a model large enough that a checkpoint write takes a while (≈ 9 MB per checkpoint)
    let r = sft_recipe(
        tmp.path(),
        "kill",
        &[
            "model.overrides={d_model: 256, n_layers: 2, n_heads: 4, n_kv_heads: 4, mlp_hidden_size: 512}",
            "train.max_steps=1000",
            "checkpoint.keep_last=2",
        ],
    );
    let path = write_recipe(tmp.path(), &r, "kill.yaml");
    let ckdir = tmp.path().join("runs/kill/checkpoints");
    let (mut kills, mut mid_write) = (0, 0);
    let mut newest = vec![];
    while kills < 6 {
        let resume = ckdir.join("latest").is_file();
        let args: &[&str] = if resume { &["--resume", "latest"] } else { &[] };
        let mut child = train_cmd(&path, args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // wait for a checkpoint being written (a `.step-….tmp-PID` folder) and kill -9
        let t0 = Instant::now();
        let tmp_name = format!(".tmp-{}", child.id());
        loop {
            let writing = std::fs::read_dir(&ckdir).ok().is_some_and(|d| {
                d.filter_map(Result::ok)
                    .any(|e| e.file_name().to_string_lossy().ends_with(&tmp_name))
            });
            // kill during a write that follows a complete checkpoint (else every run would die
            // in its first write and there would be nothing to resume)
            if writing && ckdir.join("latest").is_file() {
                break;
            }
            assert!(
                child.try_wait().unwrap().is_none(),
                "the run exited before a kill"
            );
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "no checkpoint write seen"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        let left = std::fs::read_dir(&ckdir)
            .unwrap()
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().ends_with(&tmp_name));
        mid_write += usize::from(left);
        // `latest` names a complete checkpoint that loads
        if let Ok(name) = std::fs::read_to_string(ckdir.join("latest")) {
            let ck = ckdir.join(name.trim());
            assert!(all_finite(&ck), "{}", ck.display());
            let state: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(ck.join("trainer_state.json")).unwrap(),
            )
            .unwrap();
            assert!(state["step"].as_u64().unwrap() >= 1);
            assert!(ck.join("optimizer.safetensors").is_file());
            newest.push(state["step"].as_u64().unwrap());
        }
    }
    println!("newest complete checkpoint after each kill: steps {newest:?}");
    assert_eq!(newest.len(), kills, "a kill left no loadable checkpoint");
    assert!(
        newest.windows(2).all(|w| w[0] <= w[1]),
        "resumes lost progress: {newest:?}"
    );
    println!("{kills} kills, {mid_write} of them left a partial checkpoint folder");
    assert!(mid_write >= 1, "no kill landed during a checkpoint write");
    // and a last resume runs two more steps from the newest checkpoint
    let latest = std::fs::read_to_string(ckdir.join("latest")).unwrap();
    let step: u64 = latest.trim().trim_start_matches("step-").parse().unwrap();
    let (code, log) = wait(
        train_cmd(
            &path,
            &[
                "--resume",
                "latest",
                "--set",
                &format!("train.max_steps={}", step + 2),
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap(),
        Duration::from_secs(300),
        "resume after kills",
    );
    assert_eq!(code, Some(0), "{log}");
    assert!(
        ckdir.join(format!("step-{:06}", step + 2)).is_dir(),
        "{log}"
    );
}

/// `mmada-train` exit codes: 0 finished, 130 after a SIGINT stop, 143 after a SIGTERM stop
/// (both after saving a checkpoint), 1 on an error.
#[test]
fn exit_codes_tell_finished_stopped_and_failed_apart() {
    let tmp = tempfile::tempdir().unwrap();
    let r = sft_recipe(tmp.path(), "codes", &["checkpoint.every=0"]);
    let path = write_recipe(tmp.path(), &r, "codes.yaml");
    let (code, log) = wait(
        train_cmd(&path, &["--set", "train.max_steps=2"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        Duration::from_secs(300),
        "finished run",
    );
    assert_eq!(code, Some(0), "{log}");
    let (code, log) = wait(
        train_cmd(&path, &["--set", "train.max_nonfinite_steps=0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        Duration::from_secs(60),
        "bad recipe",
    );
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("Error:"), "{log}");
    for (sig, want) in [("INT", 130), ("TERM", 143)] {
        let name = format!("sig{sig}");
        let child = train_cmd(
            &path,
            &[
                "--set",
                &format!("run.name={name}"),
                "--set",
                "train.max_steps=100000",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
        // wait until it trains (a metrics row), then signal it
        let metrics = tmp.path().join("runs").join(&name).join("metrics.jsonl");
        let t0 = Instant::now();
        while std::fs::metadata(&metrics).map_or(true, |m| m.len() == 0) {
            assert!(t0.elapsed() < Duration::from_secs(120), "no step row");
            std::thread::sleep(Duration::from_millis(20));
        }
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let (code, log) = wait(child, Duration::from_secs(60), &name);
        assert_eq!(code, Some(want), "SIG{sig}: {log}");
        assert!(log.contains("stopped SFT run"), "{log}");
        // the graceful stop saved a checkpoint
        assert_eq!(
            checkpoints(&tmp.path().join("runs").join(&name)).len(),
            1,
            "SIG{sig}"
        );
    }
}

/// A single-node run that inherited `WORLD_SIZE=2 RANK=0` (torchrun / accelerate / Slurm
/// count processes) stops at start with an error naming the variable, instead of waiting
/// for a second node.
#[test]
fn a_disagreeing_world_size_fails_fast() {
    let tmp = tempfile::tempdir().unwrap();
    let r = sft_recipe(tmp.path(), "world", &[]);
    let path = write_recipe(tmp.path(), &r, "world.yaml");
    let t0 = Instant::now();
    let (code, log) = wait(
        train_cmd(&path, &[])
            .env("WORLD_SIZE", "2")
            .env("RANK", "0")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        Duration::from_secs(60),
        "WORLD_SIZE=2 run",
    );
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("WORLD_SIZE=2") && log.contains("NNODES") && log.contains("1 node(s)"),
        "{log}"
    );
    println!("failed after {:?}", t0.elapsed());
    assert!(!tmp.path().join("runs/world/checkpoints").exists());
}

/// A stop signal ends a run that is blocked in a collective: node rank 0 of a 2-node run
/// whose other node never comes waits for it (collective timeout 600 s); a SIGTERM makes it
/// exit 143 once no step has ended for the stop grace (`MMADA_STOP_GRACE_SECS`, 2 s here;
/// default 3 × the longest step, at least 60 s), naming why.
#[test]
fn a_stop_signal_ends_a_run_blocked_in_a_collective() {
    let tmp = tempfile::tempdir().unwrap();
    let r = sft_recipe(tmp.path(), "blocked", &[]);
    let path = write_recipe(tmp.path(), &r, "blocked.yaml");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let coordinator = format!("127.0.0.1:{port}");
    let child = train_cmd(
        &path,
        &[
            "--nodes",
            "2",
            "--node-rank",
            "0",
            "--coordinator",
            &coordinator,
        ],
    )
    .env("MMADA_STOP_GRACE_SECS", "2")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    // let it get to the wait for node 1
    std::thread::sleep(Duration::from_secs(4));
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let t0 = Instant::now();
    let (code, log) = wait(child, Duration::from_secs(60), "blocked run");
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(code, Some(143), "{log}");
    assert!(log.contains("no step ended within 2 s"), "{log}");
    assert!(secs < 30.0, "exited {secs:.1} s after SIGTERM");
}
