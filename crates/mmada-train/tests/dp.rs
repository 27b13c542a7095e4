//! Data parallelism (`mmada_train::dist`) on the CPU: 2 Flex workers (threads) equal 1 device
//! with the doubled batch; a missing or failing rank ends every rank with an error (no hang);
//! 2 processes on 127.0.0.1 through burn-collective's global orchestrator equal 1 process;
//! killing one process ends the other with a clear error.

use mmada_train::recipe::Recipe as _;
use mmada_train::trainer::TrainLoop as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mmada_model::backend::{Cpu, CpuAutodiff};
use mmada_model::{FloatDType, load_checkpoint};
use mmada_train::dist::{DistConfig, DistError, launch, param_hash};
use mmada_train::recipe::SftRecipe;
use mmada_train::sft::{Sft, SftOptions, SftOutcome};

fn arith_recipe(dir: &Path, name: &str, lm_batch: usize, steps: u64) -> SftRecipe {
    let data = dir.join("data");
    if !data.join("arith.jsonl").is_file() {
        mmada_train::synth::write_arithmetic(&data, 200, 7).unwrap();
    }
    let text = format!(
        r#"
run: {{name: {name}, output_dir: "{out}", seed: 3}}
model:
  preset: tiny
  overrides: {{d_model: 32, n_layers: 2, n_heads: 2, n_kv_heads: 2, mlp_hidden_size: 64}}
tokenizer: {{path: "{tok}"}}
data:
  layout: {{max_seq_length: 32, max_lm_len: 40}}
  lm:
    batch_size: {lm_batch}
    sources:
      - inline:
          name: arithmetic
          task: chat
          source: {{path: "{jsonl}"}}
          format: jsonl
          fields: {{question: question, answer: answer}}
          license: MIT
          split: train
optimizer: {{lr: 1.0e-3, max_grad_norm: 1.0}}
schedule: {{kind: cosine, warmup_steps: 2, min_lr_scale: 0.1}}
train: {{max_steps: {steps}}}
checkpoint: {{every: 0, keep_last: 2}}
"#,
        out = dir.join("runs").display(),
        tok = data.join("tokenizer.json").display(),
        jsonl = data.join("arith.jsonl").display(),
    );
    SftRecipe::parse(&text, name, &[]).unwrap()
}

fn opts() -> SftOptions {
    SftOptions {
        resume: None,
        stop: None,
        stop_after: None,
        base_dir: PathBuf::from("/"),
        ..Default::default()
    }
}

fn weights(ckpt: &Path) -> Vec<(String, Vec<f32>)> {
    let (_, m) =
        load_checkpoint::<Cpu>(&ckpt.join("model"), &Default::default(), FloatDType::F32).unwrap();
    m.named_tensors()
        .into_iter()
        .map(|(n, t)| (n, t.to_data().to_vec::<f32>().unwrap()))
        .collect()
}

fn max_abs_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut worst = 0f32;
    for ((na, x), (nb, y)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        assert_eq!(x.len(), y.len(), "{na}");
        for (p, q) in x.iter().zip(y) {
            worst = worst.max((p - q).abs());
        }
    }
    worst
}

fn single(recipe: &SftRecipe) -> SftOutcome {
    Sft::run::<CpuAutodiff>(recipe, &Default::default(), &opts(), &mut |_| {}).unwrap()
}

#[test]
fn two_flex_devices_equal_one_device_with_the_doubled_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let big = single(&arith_recipe(tmp.path(), "big", 4, 5));
    let dist = DistConfig {
        check_every: 1,
        timeout: Duration::from_secs(120),
        ..Default::default()
    };
    let devices = [Default::default(), Default::default()];
    let mut steps = vec![];
    let dp = Sft::run_dp::<CpuAutodiff>(
        &arith_recipe(tmp.path(), "dp", 2, 5),
        &devices,
        &dist,
        &opts(),
        &mut |r| steps.push(r.step),
    )
    .unwrap();
    assert_eq!(
        steps,
        vec![1, 2, 3, 4, 5],
        "on_step runs once per step on rank 0"
    );
    assert_eq!(dp.losses.len(), 5);
    for (s, (a, b)) in big.losses.iter().zip(&dp.losses).enumerate() {
        assert!(
            ((a - b) / a).abs() < 1e-5,
            "step {} loss {a} (1 device × 4) vs {b} (2 devices × 2)",
            s + 1
        );
    }
    let (wa, wb) = (
        weights(big.last_checkpoint.as_ref().unwrap()),
        weights(dp.last_checkpoint.as_ref().unwrap()),
    );
    let worst = max_abs_diff(&wa, &wb);
    println!(
        "2 devices × 2 vs 1 × 4, 5 steps: max |Δw| = {worst:e}; losses {:?} vs {:?}",
        big.losses, dp.losses
    );
    assert!(worst < 1e-5, "weights differ by {worst}");

    // the shard loss scaling matters: 2 devices with the batch *not* doubled train differently
    let half = single(&arith_recipe(tmp.path(), "half", 2, 5));
    let w_half = weights(half.last_checkpoint.as_ref().unwrap());
    assert!(
        max_abs_diff(&w_half, &wb) > 1e-4,
        "the comparison cannot tell batch 2 from batch 4"
    );
    // metrics.jsonl is written once (rank 0), one row per step
    let rows = std::fs::read_to_string(dp.run_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(rows.lines().count(), 5, "{rows}");
}

#[test]
fn replica_hash_sees_one_changed_parameter() {
    use mmada_model::ModelConfig;
    let mut json = ModelConfig::preset("tiny").unwrap().to_hf_json();
    for (k, v) in [
        ("d_model", 32),
        ("n_layers", 1),
        ("n_heads", 2),
        ("n_kv_heads", 2),
        ("mlp_hidden_size", 64),
    ] {
        json[k] = v.into();
    }
    let cfg = ModelConfig::from_json_str(&json.to_string(), "test").unwrap();
    let dev = Default::default();
    let a = mmada_model::init::init_model::<Cpu>(&cfg, 1, &dev, FloatDType::F32);
    let b = mmada_model::init::init_model::<Cpu>(&cfg, 1, &dev, FloatDType::F32);
    let c = mmada_model::init::init_model::<Cpu>(&cfg, 2, &dev, FloatDType::F32);
    assert_eq!(
        param_hash(&a),
        param_hash(&b),
        "same seed, different ParamIds"
    );
    assert_ne!(param_hash(&a), param_hash(&c));
}

/// Run `f` on a helper thread; fail (instead of hanging the suite) if it takes over `limit`.
fn bounded<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("did not return within {limit:?}: a rank hangs"))
}

#[test]
fn a_missing_rank_times_out_and_a_failing_rank_aborts_its_peers() {
    // rank 1 never takes part: rank 0's all-reduce hits the deadline
    let err = bounded(Duration::from_secs(60), || {
        let cfg = DistConfig {
            timeout: Duration::from_secs(2),
            ..Default::default()
        };
        let devices = [Default::default(), Default::default()];
        launch::<CpuAutodiff, (), DistError>(
            &devices,
            &devices,
            &cfg,
            |mut w| w.reducer.sum(&[1.0]).map(|_| ()),
            |_w| Ok(()),
        )
        .unwrap_err()
    });
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            DistError::Timeout {
                rank: 0,
                secs: 2,
                ..
            }
        ),
        "{msg}"
    );
    assert!(msg.contains("did not complete within 2 s"), "{msg}");

    // rank 1 fails: rank 0, waiting in an all-reduce, stops through the abort flag, and the
    // root cause (rank 1's error) is what comes back
    let err = bounded(Duration::from_secs(60), || {
        let cfg = DistConfig {
            timeout: Duration::from_secs(600),
            ..Default::default()
        };
        let devices = [Default::default(), Default::default()];
        launch::<CpuAutodiff, (), DistError>(
            &devices,
            &devices,
            &cfg,
            |mut w| {
                let r = w.reducer.sum(&[1.0]);
                assert!(matches!(r, Err(DistError::Aborted { rank: 0 })), "{r:?}");
                r.map(|_| ())
            },
            |_w| Err(DistError::Config("rank 1 broke on purpose".into())),
        )
        .unwrap_err()
    });
    assert!(err.to_string().contains("rank 1 broke on purpose"), "{err}");

    // and a clean session still works afterwards in the same process
    let sums = bounded(Duration::from_secs(60), || {
        let cfg = DistConfig::default();
        let devices = [Default::default(), Default::default()];
        launch::<CpuAutodiff, Vec<f32>, DistError>(
            &devices,
            &devices,
            &cfg,
            |mut w| {
                let r = w.reducer.sum(&[1.0, 2.0]);
                w.reducer.finish()?;
                r
            },
            |mut w| {
                let r = w.reducer.sum(&[10.0, 20.0]);
                w.reducer.finish()?;
                r
            },
        )
        .unwrap()
    });
    assert_eq!(sums, vec![11.0, 22.0]);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `mmada-train sft` as node `rank` of 2 on 127.0.0.1.
fn node(recipe: &Path, rank: usize, coord: u16, data_port: u16, extra: &[&str]) -> Child {
    node_env(recipe, rank, coord, data_port, extra, &[])
}

/// [`node`] with environment variables.
fn node_env(
    recipe: &Path,
    rank: usize,
    coord: u16,
    data_port: u16,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Child {
    Command::new(env!("CARGO_BIN_EXE_mmada-train"))
        .args(["sft", "--recipe"])
        .arg(recipe)
        .args(["--nodes", "2", "--node-rank", &rank.to_string()])
        .args(["--coordinator", &format!("127.0.0.1:{coord}")])
        .args(["--data-port", &data_port.to_string()])
        .args(extra)
        .env("RUST_LOG", "info")
        .env_remove("MMADA_RUN_TOKEN")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A node that does not present the run's token (`MMADA_RUN_TOKEN`) is refused by the
/// orchestrator of node 0: it never registers and nothing trains; both processes end on a
/// stop signal (grace 2 s) instead of waiting.
#[test]
fn a_node_without_the_run_token_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = arith_recipe(tmp.path(), "token", 2, 3);
    let path = tmp.path().join("token.yaml");
    std::fs::write(&path, recipe.to_yaml()).unwrap();
    let (coord, p0, p1) = (free_port(), free_port(), free_port());
    let extra = ["--collective-timeout", "600"];
    let grace = ("MMADA_STOP_GRACE_SECS", "2");
    let n0 = node_env(
        &path,
        0,
        coord,
        p0,
        &extra,
        &[("MMADA_RUN_TOKEN", "right"), grace],
    );
    let n1 = node_env(
        &path,
        1,
        coord,
        p1,
        &extra,
        &[("MMADA_RUN_TOKEN", "wrong"), grace],
    );
    std::thread::sleep(Duration::from_secs(8));
    for c in [&n0, &n1] {
        let ok = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }
    let (ok1, log1) = wait_output(n1, Duration::from_secs(60), "node 1 without the token");
    let (ok0, log0) = wait_output(n0, Duration::from_secs(60), "node 0");
    assert!(!ok0 && !ok1, "node 0:\n{log0}\nnode 1:\n{log1}");
    assert!(
        log0.contains("refused a peer without the run token"),
        "node 0 did not refuse node 1:\n{log0}"
    );
    assert!(
        log1.contains("Failed to connect"),
        "node 1 was not refused:\n{log1}"
    );
    assert!(
        metrics_losses(&tmp.path().join("runs/token")).is_empty(),
        "a step ran:\n{log0}"
    );
}

/// Wait for a child with a deadline; kill it and fail if it does not exit.
fn wait_output(mut c: Child, limit: Duration, who: &str) -> (bool, String) {
    let start = Instant::now();
    loop {
        if let Some(status) = c.try_wait().unwrap() {
            let mut s = String::new();
            c.stderr.take().unwrap().read_to_string(&mut s).unwrap();
            let mut o = String::new();
            c.stdout.take().unwrap().read_to_string(&mut o).unwrap();
            return (status.success(), format!("{o}{s}"));
        }
        if start.elapsed() > limit {
            let _ = c.kill();
            let mut s = String::new();
            let _ = c.stderr.take().unwrap().read_to_string(&mut s);
            panic!("{who} did not exit within {limit:?} (hang); stderr:\n{s}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn metrics_losses(run_dir: &Path) -> Vec<f32> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap() as f32
        })
        .collect()
}

#[test]
fn two_processes_on_localhost_equal_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let one = single(&arith_recipe(tmp.path(), "one", 4, 3));
    let recipe = arith_recipe(tmp.path(), "two", 2, 3);
    let path = tmp.path().join("two.yaml");
    std::fs::write(&path, recipe.to_yaml()).unwrap();
    // node 1 names the same tokenizer through another path: paths may differ between nodes
    let mut other = recipe.clone();
    other.tokenizer.path = tmp.path().join("data/./tokenizer.json");
    let path1 = tmp.path().join("two_node1.yaml");
    std::fs::write(&path1, other.to_yaml()).unwrap();
    let (coord, p0, p1) = (free_port(), free_port(), free_port());
    let extra = ["--collective-timeout", "120", "--check-every", "1"];
    // both nodes present the run's shared token (MMADA_RUN_TOKEN)
    let n0 = node_env(
        &path,
        0,
        coord,
        p0,
        &extra,
        &[("MMADA_RUN_TOKEN", "s3cret")],
    );
    let n1 = node_env(
        &path1,
        1,
        coord,
        p1,
        &extra,
        &[("MMADA_RUN_TOKEN", "s3cret")],
    );
    let (ok1, log1) = wait_output(n1, Duration::from_secs(600), "node 1");
    let (ok0, log0) = wait_output(n0, Duration::from_secs(600), "node 0");
    assert!(ok0 && ok1, "node 0:\n{log0}\nnode 1:\n{log1}");
    assert!(log0.contains("global batch 4 rows"), "{log0}");
    let run_dir = tmp.path().join("runs/two");
    let losses = metrics_losses(&run_dir);
    assert_eq!(losses.len(), 3, "metrics.jsonl written once per step");
    for (a, b) in one.losses.iter().zip(&losses) {
        assert!(
            ((a - b) / a).abs() < 1e-5,
            "loss {a} (1 process) vs {b} (2 nodes)"
        );
    }
    let w1 = weights(one.last_checkpoint.as_ref().unwrap());
    let w2 = weights(&run_dir.join("checkpoints/step-000003"));
    let worst = max_abs_diff(&w1, &w2);
    println!(
        "2 nodes × 1 device × 2 vs 1 process × 4, 3 steps: max |Δw| = {worst:e}; losses {:?} vs {losses:?}",
        one.losses
    );
    assert!(worst < 1e-5, "weights differ by {worst}");
}

#[test]
fn killing_one_process_ends_the_other_with_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = arith_recipe(tmp.path(), "kill", 2, 100_000);
    let path = tmp.path().join("kill.yaml");
    std::fs::write(&path, recipe.to_yaml()).unwrap();
    let (coord, p0, p1) = (free_port(), free_port(), free_port());
    let extra = ["--collective-timeout", "5"];
    let n0 = node(&path, 0, coord, p0, &extra);
    let mut n1 = node(&path, 1, coord, p1, &extra);
    // wait until training runs (rank 0 logs step rows), then kill node 1
    let run_dir = tmp.path().join("runs/kill");
    let start = Instant::now();
    while metrics_losses(&run_dir).len() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "training did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    n1.kill().unwrap();
    let _ = n1.wait();
    let (ok0, log0) = wait_output(
        n0,
        Duration::from_secs(120),
        "node 0 after node 1 was killed",
    );
    assert!(!ok0, "node 0 succeeded without its peer:\n{log0}");
    assert!(
        log0.contains("did not complete within 5 s") || log0.contains("failed in burn-collective"),
        "no clear error:\n{log0}"
    );
}

#[test]
fn data_parallel_stop_and_resume_continue_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let dist = DistConfig {
        check_every: 1,
        timeout: Duration::from_secs(120),
        ..Default::default()
    };
    let devices = [Default::default(), Default::default()];
    let dp = |recipe: &SftRecipe, o: SftOptions| {
        Sft::run_dp::<CpuAutodiff>(recipe, &devices, &dist, &o, &mut |_| {}).unwrap()
    };
    let straight = dp(&arith_recipe(tmp.path(), "straight", 2, 4), opts());
    let split = arith_recipe(tmp.path(), "split", 2, 4);
    let first = dp(
        &split,
        SftOptions {
            stop_after: Some(2),
            ..opts()
        },
    );
    assert_eq!(first.final_step, 2);
    // every rank resumes from the checkpoint rank 0 wrote (checked collectively at start)
    let second = dp(
        &split,
        SftOptions {
            resume: Some(mmada_train::sft::Resume::Latest),
            ..opts()
        },
    );
    assert_eq!(second.final_step, 4);
    assert_eq!(
        second.losses, straight.losses,
        "resumed loss trajectory differs"
    );
    let (a, b) = (
        weights(straight.last_checkpoint.as_ref().unwrap()),
        weights(second.last_checkpoint.as_ref().unwrap()),
    );
    assert_eq!(
        max_abs_diff(&a, &b),
        0.0,
        "weights differ after a data-parallel resume"
    );
}

/// `train.device: cpu:2` through the binary: one process, 2 CPU workers with batch 2 each =
/// 1 device with batch 4 (3 steps), and the start-up line prints the global batch.
#[test]
fn cli_cpu2_equals_one_device_with_the_doubled_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let one = single(&arith_recipe(tmp.path(), "one", 4, 3));
    let mut recipe = arith_recipe(tmp.path(), "threads", 2, 3);
    recipe.train.device = "cpu:2".into();
    let path = tmp.path().join("threads.yaml");
    std::fs::write(&path, recipe.to_yaml()).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_mmada-train"))
        .args(["sft", "--recipe"])
        .arg(&path)
        .args(["--check-every", "1"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (ok, log) = wait_output(child, Duration::from_secs(600), "cpu:2 run");
    assert!(ok, "{log}");
    assert!(
        log.contains("global batch 4 rows = 2 per device × 2 devices × 1 nodes"),
        "{log}"
    );
    let run_dir = tmp.path().join("runs/threads");
    let losses = metrics_losses(&run_dir);
    assert_eq!(losses.len(), 3);
    for (a, b) in one.losses.iter().zip(&losses) {
        assert!(
            ((a - b) / a).abs() < 1e-5,
            "loss {a} (1 × 4) vs {b} (cpu:2 × 2)"
        );
    }
    let worst = max_abs_diff(
        &weights(one.last_checkpoint.as_ref().unwrap()),
        &weights(&run_dir.join("checkpoints/step-000003")),
    );
    assert!(worst < 1e-5, "weights differ by {worst}");
}

/// GPU check (feature `cuda`, needs a CUDA device; `scripts/gpu_check.sh`): 2 workers that
/// share `cuda:0` (burn-collective's local all-reduce on the CUDA backend) × batch 2 = 1
/// worker on `cuda:0` × batch 4, 5 steps, weights within 1e-5.
#[cfg(feature = "cuda")]
#[test]
fn cuda0_two_workers_equal_one_device_with_the_doubled_batch() {
    type G = mmada_model::backend::CudaAutodiff;
    let dev = burn::backend::cuda::CudaDevice::new(0);
    let tmp = tempfile::tempdir().unwrap();
    let big = Sft::run::<G>(
        &arith_recipe(tmp.path(), "big", 4, 5),
        &dev,
        &opts(),
        &mut |_| {},
    )
    .unwrap();
    let dist = DistConfig {
        check_every: 1,
        timeout: Duration::from_secs(300),
        ..Default::default()
    };
    let dp = Sft::run_dp::<G>(
        &arith_recipe(tmp.path(), "dp", 2, 5),
        &[dev.clone(), dev.clone()],
        &dist,
        &opts(),
        &mut |_| {},
    )
    .unwrap();
    let worst = max_abs_diff(
        &weights(big.last_checkpoint.as_ref().unwrap()),
        &weights(dp.last_checkpoint.as_ref().unwrap()),
    );
    println!(
        "cuda:0 SFT: 2 workers × 2 vs 1 × 4, 5 steps: max |Δw| = {worst:e}; losses {:?} vs {:?}",
        big.losses, dp.losses
    );
    assert!(worst < 1e-5, "weights differ by {worst}");
}

/// Two nodes started with different recipes (here another learning rate) stop at start with
/// an error that says so, instead of training apart or failing later in an unrelated place.
#[test]
fn nodes_with_different_recipes_are_refused_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let a = arith_recipe(tmp.path(), "mix", 2, 3);
    let mut b = a.clone();
    b.optimizer.lr = 2e-3;
    let (pa, pb) = (tmp.path().join("a.yaml"), tmp.path().join("b.yaml"));
    std::fs::write(&pa, a.to_yaml()).unwrap();
    std::fs::write(&pb, b.to_yaml()).unwrap();
    let (coord, p0, p1) = (free_port(), free_port(), free_port());
    let extra = ["--collective-timeout", "60"];
    let n0 = node(&pa, 0, coord, p0, &extra);
    let n1 = node(&pb, 1, coord, p1, &extra);
    let (ok1, log1) = wait_output(n1, Duration::from_secs(300), "node 1");
    let (ok0, log0) = wait_output(n0, Duration::from_secs(300), "node 0");
    assert!(!ok0 && !ok1, "mismatched nodes trained:\n{log0}\n{log1}");
    assert!(
        log0.contains(
            "the nodes run different recipes or flags: `optimizer` (ranks [1] differ from rank 0)"
        ),
        "{log0}"
    );
    assert!(metrics_losses(&tmp.path().join("runs/mix")).is_empty());
}
