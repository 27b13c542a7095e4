//! UniGRPO across modalities (issue 22): one recipe with a `text`, an `mmu` and a `t2i` task,
//! three kinds of reward (rule-based text rewards, built-in image rewards, an `http` reward
//! that receives base64 PNGs), per-task metrics, bit-exact resume, `cpu:2` = one device,
//! zero-variance t2i groups, recipe errors. Tiny model, tiny MAGVIT-v2 fixture (resolution 32:
//! 4 image tokens), generated solid-colour PNGs; everything on the CPU.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use mmada_model::backend::CpuAutodiff;
use mmada_train::recipe::Recipe as _;
use mmada_train::trainer::TrainLoop as _;
use mmada_train::unigrpo::{Resume, UniGrpo, UniGrpoOptions, UniGrpoRecipe};

fn vq_weights() -> PathBuf {
    match std::env::var_os("MMADA_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"),
    }
    .join("magvitv2/weights")
}

const COLORS: [(&str, [u8; 3]); 4] = [
    ("red", [230, 20, 20]),
    ("green", [20, 210, 30]),
    ("blue", [25, 30, 220]),
    ("yellow", [235, 225, 20]),
];

/// Solid-colour 32×32 PNGs, an mmu manifest (image + question + colour answer) and a caption
/// file (`a red square`, …).
fn write_data(data: &Path) {
    if data.join("captions.jsonl").is_file() {
        return;
    }
    mmada_train::synth::write_arithmetic(data, 64, 11).unwrap();
    std::fs::create_dir_all(data.join("images")).unwrap();
    let (mut mmu, mut cap) = (String::new(), String::new());
    for (name, rgb) in COLORS {
        let p = data.join(format!("images/{name}.png"));
        image::RgbImage::from_pixel(32, 32, image::Rgb(rgb))
            .save(&p)
            .unwrap();
        mmu.push_str(&format!(
            "{{\"image\": \"{}\", \"question\": \"colour?\", \"answer\": \"{name}\"}}\n",
            p.display()
        ));
        cap.push_str(&format!("{{\"caption\": \"a {name} square\"}}\n"));
    }
    std::fs::write(data.join("mmu.jsonl"), mmu).unwrap();
    std::fs::write(data.join("captions.jsonl"), cap).unwrap();
}

/// A loopback reward server: decodes each item's `image.png_base64` and answers its mean red
/// channel / 255 (`null` without an image). Returns the URL and the number of images seen.
fn redness_server() -> (String, Arc<AtomicUsize>) {
    use base64::Engine as _;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/redness", listener.local_addr().unwrap());
    let seen = Arc::new(AtomicUsize::new(0));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let mut reader = BufReader::new(stream);
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
            }
            let mut req = vec![0u8; len];
            reader.read_exact(&mut req).unwrap();
            let v: serde_json::Value = serde_json::from_slice(&req).unwrap();
            let rewards: Vec<serde_json::Value> = v["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|it| {
                    let Some(img) = it.get("image") else {
                        return serde_json::Value::Null;
                    };
                    let png = base64::engine::general_purpose::STANDARD
                        .decode(img["png_base64"].as_str().unwrap())
                        .unwrap();
                    let rgb = image::load_from_memory(&png).unwrap().to_rgb8();
                    assert_eq!(rgb.dimensions(), (32, 32));
                    seen2.fetch_add(1, Ordering::SeqCst);
                    let red: f64 = rgb.pixels().map(|p| f64::from(p[0])).sum::<f64>() / 1024.0;
                    serde_json::json!(red / 255.0)
                })
                .collect();
            let body = serde_json::json!({ "rewards": rewards }).to_string();
            let mut stream = reader.into_inner();
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, seen)
}

/// Text (arithmetic), mmu (colour questions about the PNGs) and t2i (colour captions) tasks,
/// one prompt group each per step (`generation_batch_size` 6, G = 2); `url` = the http
/// reward's server.
fn tasks_recipe(dir: &Path, name: &str, url: &str, sets: &[&str]) -> UniGrpoRecipe {
    try_tasks_recipe(dir, name, url, sets).unwrap()
}

/// [`tasks_recipe`] without the unwrap: the parse error as text.
fn try_tasks_recipe(
    dir: &Path,
    name: &str,
    url: &str,
    sets: &[&str],
) -> Result<UniGrpoRecipe, String> {
    let data = dir.join("data");
    write_data(&data);
    let text = format!(
        r##"
run: {{name: {name}, output_dir: "{out}", seed: 9}}
model:
  preset: tiny
  overrides: {{d_model: 32, n_layers: 2, n_heads: 2, n_kv_heads: 2, mlp_hidden_size: 64}}
tokenizer: {{path: "{tok}"}}
image_tokenizer: {{checkpoint: "{vq}", resolution: 32}}
grpo:
  num_generations: 2
  generation_batch_size: 6
  num_iterations: 2
  beta: 0.04
  max_completion_length: 8
rollout: {{steps: 4, block_length: 8, temperature: 1.0, sample_vocab: 99}}
tasks:
  - name: arith
    kind: text
    prompts:
      inline:
        name: arithmetic
        task: chat
        source: {{path: "{arith}"}}
        format: jsonl
        fields: {{question: question, answer: answer}}
        license: MIT
        split: train
      cot: false
      max_prompt_length: 32
    reward_funcs:
      - {{kind: regex, params: {{pattern: "[0-9]"}}}}
      - {{kind: length, params: {{min: 0, max: 0, margin: 8, unit: chars}}}}
  - name: vqa
    kind: mmu
    prompts:
      inline:
        name: colours
        task: mmu
        source: {{path: "{mmu}"}}
        format: jsonl
        fields: {{image: image, question: question, answer: answer}}
        license: MIT
        split: train
      cot: false
      max_prompt_length: 32
    max_completion_length: 4
    rollout: {{steps: 4, block_length: 4, temperature: 1.0, sample_vocab: 99}}
    reward_funcs:
      - {{kind: regex, params: {{pattern: "[aeiou]"}}}}
  - name: paint
    kind: t2i
    prompts:
      inline:
        name: captions
        task: lm
        source: {{path: "{cap}"}}
        format: jsonl
        fields: {{text: caption}}
        license: MIT
        split: train
      max_prompt_length: 12
    maskgit: {{timesteps: 4, guidance_scale: 1.5}}
    reward_funcs:
      - {{kind: caption_color}}
      - {{kind: image_brightness, weight: 0.5}}
      - {{kind: http, name: redness, weight: 0.1, params: {{url: "{url}", timeout_s: 30}}}}
optimizer: {{lr: 1.0e-3, weight_decay: 0.0}}
schedule: {{kind: constant}}
train: {{max_steps: 3}}
checkpoint: {{every: 1, keep_last: 0, model_dtype: f32}}
"##,
        out = dir.join("runs").display(),
        tok = data.join("tokenizer.json").display(),
        vq = vq_weights().display(),
        arith = data.join("arith.jsonl").display(),
        mmu = data.join("mmu.jsonl").display(),
        cap = data.join("captions.jsonl").display(),
    );
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    UniGrpoRecipe::parse(&text, "tasks.yaml", &sets).map_err(|e| e.to_string())
}

fn metric_rows(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn model_bytes(ckpt: &Path) -> Vec<u8> {
    std::fs::read(ckpt.join("model/model.safetensors")).unwrap()
}

/// Max |Δw| over every tensor of two checkpoints.
fn max_weight_diff(a: &Path, b: &Path) -> f32 {
    use safetensors::SafeTensors;
    let (ba, bb) = (model_bytes(a), model_bytes(b));
    let (ta, tb) = (
        SafeTensors::deserialize(&ba).unwrap(),
        SafeTensors::deserialize(&bb).unwrap(),
    );
    let f = |d: &[u8]| -> Vec<f32> {
        d.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let mut m = 0f32;
    for n in ta.names() {
        let (x, y) = (
            f(ta.tensor(n).unwrap().data()),
            f(tb.tensor(n).unwrap().data()),
        );
        for (p, q) in x.iter().zip(&y) {
            m = m.max((p - q).abs());
        }
    }
    m
}

/// The three-task recipe trains, logs every reward of every task separately (and each
/// task's total), sends the t2i images to the http reward, and a run stopped after 2 steps
/// and resumed ends bit-identical to the straight run.
#[test]
fn text_mmu_t2i_tasks_train_log_each_reward_and_resume_bit_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (url, seen) = redness_server();
    let dev = Default::default();
    let full = tasks_recipe(tmp.path(), "full", &url, &[]);
    let a =
        UniGrpo::run::<CpuAutodiff>(&full, &dev, &UniGrpoOptions::default(), &mut |_| {}).unwrap();
    assert_eq!(a.final_step, 3);
    // 3 steps × 1 t2i group × G = 2 images reached the server
    assert_eq!(seen.load(Ordering::SeqCst), 6);
    let rows = metric_rows(&a.run_dir);
    assert_eq!(rows.len(), 3);
    eprintln!("step 1 metrics: {}", rows[0]);
    for row in &rows {
        for k in [
            "reward",
            "loss",
            "kl",
            "grad_norm",
            "rewards/arith/regex/mean",
            "rewards/arith/length/mean",
            "rewards/vqa/regex/mean",
            "rewards/paint/caption_color/mean",
            "rewards/paint/image_brightness/mean",
            "rewards/paint/redness/mean",
            "reward/arith",
            "reward/vqa",
            "reward/paint",
        ] {
            assert!(
                row[k].as_f64().is_some_and(f64::is_finite),
                "{k} = {} in {row}",
                row[k]
            );
        }
        // a task's rewards see only its completions: the paint rewards are in [0, 1] and
        // its total is their weighted sum (caption_color 1, brightness 0.5, redness 0.1)
        let g = |k: &str| row[k].as_f64().unwrap();
        for k in [
            "rewards/paint/caption_color/mean",
            "rewards/paint/image_brightness/mean",
            "rewards/paint/redness/mean",
        ] {
            assert!((0.0..=1.0).contains(&g(k)), "{k} {}", g(k));
        }
        let want = g("rewards/paint/caption_color/mean")
            + 0.5 * g("rewards/paint/image_brightness/mean")
            + 0.1 * g("rewards/paint/redness/mean");
        assert!((g("reward/paint") - want).abs() < 1e-5, "{row}");
        assert!((g("reward/vqa") - g("rewards/vqa/regex/mean")).abs() < 1e-6);
        // the overall reward is the mean over the three equal-sized tasks
        let mean3 = (g("reward/arith") + g("reward/vqa") + g("reward/paint")) / 3.0;
        assert!((g("reward") - mean3).abs() < 1e-5, "{row}");
        // completion lengths: t2i = its 4 image tokens, mmu ≤ 4, text ≤ 8
        assert_eq!(g("completions/paint/mean_length"), 4.0);
        assert!(g("completions/vqa/mean_length") <= 4.0);
        assert!(g("completions/arith/mean_length") <= 8.0);
        assert!(g("num_train_rows") > 0.0);
    }
    assert!(rows.iter().any(|r| r["grad_norm"].as_f64().unwrap() > 1e-4));
    let ckpt = a.last_checkpoint.clone().unwrap();
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("trainer_state.json")).unwrap())
            .unwrap();
    assert_eq!(state["extra"]["task_cursors"], serde_json::json!([3, 3, 3]));

    // 2 steps, then resume for the third: bit-identical
    let part = tasks_recipe(tmp.path(), "part", &url, &[]);
    let stop = UniGrpoOptions {
        stop_after: Some(2),
        ..Default::default()
    };
    let b1 = UniGrpo::run::<CpuAutodiff>(&part, &dev, &stop, &mut |_| {}).unwrap();
    assert_eq!(b1.final_step, 2);
    let resume = UniGrpoOptions {
        resume: Some(Resume::Latest),
        ..Default::default()
    };
    let b = UniGrpo::run::<CpuAutodiff>(&part, &dev, &resume, &mut |_| {}).unwrap();
    assert_eq!(b.final_step, 3);
    let rb = metric_rows(&b.run_dir);
    for (x, y) in rows.iter().zip(&rb) {
        for k in ["reward", "loss", "kl", "rewards/paint/caption_color/mean"] {
            assert_eq!(x[k], y[k], "step {}: {k}", x["step"]);
        }
    }
    assert!(
        model_bytes(&ckpt) == model_bytes(b.last_checkpoint.as_ref().unwrap()),
        "resumed weights differ"
    );
    // the test can fail: training moved the weights
    let moved = max_weight_diff(&ckpt, &ckpt.parent().unwrap().join("step-000001"));
    assert!(moved > 1e-5, "weights moved only {moved}");
}

/// Two Flex devices (`cpu:2`; the 3 groups split 2 + 1 over the ranks, so the text and t2i
/// groups are on rank 0 and the mmu group on rank 1) equal one device: the same rewards per
/// step and weights within 1e-5.
#[test]
fn tasks_on_two_devices_equal_one_device() {
    use mmada_train::dist::DistConfig;
    let tmp = tempfile::tempdir().unwrap();
    let (url, _) = redness_server();
    let dev = Default::default();
    let one = tasks_recipe(tmp.path(), "one", &url, &["train.max_steps=2"]);
    let a =
        UniGrpo::run::<CpuAutodiff>(&one, &dev, &UniGrpoOptions::default(), &mut |_| {}).unwrap();
    let two = tasks_recipe(tmp.path(), "two", &url, &["train.max_steps=2"]);
    let dist = DistConfig {
        check_every: 1,
        timeout: std::time::Duration::from_secs(120),
        ..Default::default()
    };
    let b = UniGrpo::run_dp::<CpuAutodiff>(
        &two,
        &[Default::default(); 2],
        &dist,
        &UniGrpoOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(a.rewards, b.rewards, "rewards per step");
    let (ra, rb) = (metric_rows(&a.run_dir), metric_rows(&b.run_dir));
    for (x, y) in ra.iter().zip(&rb) {
        for k in [
            "rewards/paint/caption_color/mean",
            "rewards/vqa/regex/mean",
            "rewards/arith/regex/mean",
            "num_train_rows",
        ] {
            assert_eq!(x[k], y[k], "{k}");
        }
        for k in ["loss", "grad_norm"] {
            let (p, q) = (x[k].as_f64().unwrap(), y[k].as_f64().unwrap());
            assert!((p - q).abs() <= 1e-5 * p.abs().max(1e-3), "{k}: {p} vs {q}");
        }
    }
    let (ca, cb) = (a.last_checkpoint.unwrap(), b.last_checkpoint.unwrap());
    let diff = max_weight_diff(&ca, &cb);
    assert!(diff <= 1e-5, "max |Δw| {diff} between 1 and 2 devices");
    let moved = max_weight_diff(&ca, &ca.parent().unwrap().join("step-000001"));
    assert!(moved > 1e-5, "weights moved only {moved}");
}

/// A t2i-only run whose reward cannot tell the images apart (`length` of the empty text
/// completion) has zero-variance groups: advantage 0, loss 0, gradient exactly 0, weights
/// unchanged (AdamW without weight decay); the same run with `caption_color` gets a gradient.
#[test]
fn zero_variance_t2i_groups_give_zero_gradient() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Default::default();
    let only_t2i = [
        "tasks=[{name: paint, kind: t2i, prompts: {inline: {name: captions, task: lm, source: {path: PATH}, format: jsonl, fields: {text: caption}, license: MIT, split: train}, max_prompt_length: 12}, maskgit: {timesteps: 4}, reward_funcs: [REWARD]}]",
        "grpo.generation_batch_size=4",
        "train.max_steps=1",
    ];
    let cap = tmp.path().join("data/captions.jsonl");
    let run = |name: &str, reward: &str| {
        let _ = tasks_recipe(tmp.path(), "init", "http://unused", &[]);
        let sets: Vec<String> = only_t2i
            .iter()
            .map(|s| {
                s.replace("PATH", &format!("\"{}\"", cap.display()))
                    .replace("REWARD", reward)
            })
            .collect();
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let r = tasks_recipe(tmp.path(), name, "http://unused", &sets);
        let out =
            UniGrpo::run::<CpuAutodiff>(&r, &dev, &UniGrpoOptions::default(), &mut |_| {}).unwrap();
        metric_rows(&out.run_dir).remove(0)
    };
    let flat = run(
        "flat",
        "{kind: length, params: {min: 0, max: 0, margin: 8, unit: chars}}",
    );
    assert_eq!(flat["frac_reward_zero_std"].as_f64(), Some(1.0), "{flat}");
    assert_eq!(flat["grad_norm"].as_f64(), Some(0.0), "{flat}");
    assert_eq!(flat["loss"].as_f64(), Some(0.0), "{flat}");
    let live = run("live", "{kind: caption_color}");
    assert!(
        live["frac_reward_zero_std"].as_f64().unwrap() < 1.0
            && live["grad_norm"].as_f64().unwrap() > 1e-6,
        "{live}"
    );
}

/// `t2i_attention: hard` hides the caption's `[iPAD]` padding in the rollout and in every
/// update forward alike: with RoPE's relative positions, 4 more pads (`max_prompt_length` 20
/// → 24; every caption fits in both) then change neither the sampled images (same rewards) nor the loss, KL and gradient
/// norm. With full attention (the default) the pads are seen, and the same change moves them.
#[test]
fn hard_t2i_attention_hides_the_caption_padding_in_rollout_and_update() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Default::default();
    let cap = tmp.path().join("data/captions.jsonl");
    let run = |name: &str, p: usize, attention: &str| {
        let _ = tasks_recipe(tmp.path(), "init", "http://unused", &[]);
        let task = format!(
            "tasks=[{{name: paint, kind: t2i, prompts: {{inline: {{name: captions, task: lm, source: {{path: \"{}\"}}, format: jsonl, fields: {{text: caption}}, license: MIT, split: train}}, max_prompt_length: {p}}}, maskgit: {{timesteps: 4, guidance_scale: 1.5}}, t2i_attention: {attention}, reward_funcs: [{{kind: caption_color}}, {{kind: image_brightness}}]}}]",
            cap.display()
        );
        let sets = [
            task.as_str(),
            "grpo.generation_batch_size=4",
            "train.max_steps=1",
        ];
        let r = tasks_recipe(tmp.path(), name, "http://unused", &sets);
        let out =
            UniGrpo::run::<CpuAutodiff>(&r, &dev, &UniGrpoOptions::default(), &mut |_| {}).unwrap();
        metric_rows(&out.run_dir).remove(0)
    };
    let close = |a: &serde_json::Value, b: &serde_json::Value, k: &str, tol: f64| {
        let (x, y) = (a[k].as_f64().unwrap(), b[k].as_f64().unwrap());
        (x - y).abs() <= tol * x.abs().max(y.abs()).max(1e-3)
    };
    let keys = [
        "rewards/paint/caption_color/mean",
        "rewards/paint/image_brightness/mean",
        "loss",
        "kl",
        "grad_norm",
    ];
    let (h20, h24) = (run("hard20", 20, "hard"), run("hard24", 24, "hard"));
    assert!(h20["grad_norm"].as_f64().unwrap() > 1e-6, "{h20}");
    for k in keys {
        assert!(close(&h20, &h24, k, 1e-4), "{k}: {h20} vs {h24}");
    }
    let (f20, f24) = (run("full20", 20, "full"), run("full24", 24, "full"));
    assert!(
        keys.iter().any(|k| !close(&f20, &f24, k, 1e-2)),
        "full attention sees the pads: {f20} vs {f24}"
    );
}

/// Bad `tasks:` input names the key and the fix.
#[test]
fn task_recipe_errors_name_the_key_and_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let _ = tasks_recipe(tmp.path(), "ok", "http://x", &[]);
    // the shipped example recipe parses, with 4 : 2 : 2 groups
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes/unigrpo_unified.yaml"),
    )
    .unwrap();
    let r = UniGrpoRecipe::parse(&text, "unigrpo_unified.yaml", &[]).unwrap();
    let groups: Vec<usize> = r.task_specs().iter().map(|t| t.groups).collect();
    assert_eq!(groups, vec![4, 2, 2]);
    let err = |sets: &[&str]| -> String {
        match try_tasks_recipe(tmp.path(), "bad", "http://x", sets) {
            Ok(_) => panic!("{sets:?} was accepted"),
            Err(e) => e,
        }
    };
    let cases: [(&[&str], &[&str]); 9] = [
        (
            &["tasks[0].t2i_attention=hard"],
            &["`tasks[0].t2i_attention`", "only `t2i` tasks"],
        ),
        (
            &["tasks[2].t2i_attention=upstream_soft_bias"],
            &["tasks[2].t2i_attention", "`hard`"],
        ),
        (
            &["prompts={manifest: m.yaml}"],
            &["`prompts`", "each task has its own"],
        ),
        (
            &["tasks[2].rollout={steps: 4}"],
            &["`tasks[2].rollout`", "maskgit"],
        ),
        (
            &["tasks[0].maskgit={timesteps: 4}"],
            &["`tasks[0].maskgit`", "only `t2i` tasks"],
        ),
        (
            &["tasks[1].share=0.01"],
            &["`tasks[1].share`", "raise grpo.generation_batch_size"],
        ),
        (&["tasks[1].name=arith"], &["`tasks[1].name`", "duplicate"]),
        (
            &["image_tokenizer=null"],
            &["`image_tokenizer.checkpoint`", "paint"],
        ),
        (&["grpo.estimator=d1"], &["`grpo.estimator`", "structured"]),
    ];
    for (sets, want) in cases {
        let e = err(sets);
        for w in want {
            assert!(e.contains(w), "{sets:?}: `{w}` not in {e}");
        }
    }
    let e = err(&["tasks[0].kind=video"]);
    assert!(e.contains("tasks[0].kind") && e.contains("t2i"), "{e}");
    let e = err(&["tasks[7].share=2"]);
    assert!(e.contains("valid indices 0..3"), "{e}");
}

/// `image_tokenizer.codes`: the mmu prompts' images are looked up in a pre-tokenized table
/// (`mmada-train data pretokenize` format) before the encoder: a table giving every image
/// the codes `[0, 0, 0, 0]` changes the step's loss; a table from another image tokenizer
/// is refused naming it.
#[test]
fn mmu_prompts_take_their_codes_from_pretokenized_tables() {
    use mmada_data::code_table::{CodeRow, file_hash, write_table};
    let tmp = tempfile::tempdir().unwrap();
    let (url, _) = redness_server();
    let dev = Default::default();
    let data = tmp.path().join("data");
    write_data(&data);
    let coder =
        mmada_vq::VqCoder::<mmada_model::backend::Cpu>::load(vq_weights().to_str().unwrap(), &dev)
            .unwrap();
    let table = |name: &str, coder_id: &str| {
        let rows: Vec<CodeRow> = COLORS
            .iter()
            .map(|(c, _)| {
                let p = data.join(format!("images/{c}.png"));
                CodeRow {
                    source: p.display().to_string(),
                    file_hash: file_hash(&std::fs::read(&p).unwrap()),
                    resolution: 32,
                    mode: mmada_data::ResizeMode::Squash,
                    coder: coder_id.to_string(),
                    codes: vec![0; 4],
                }
            })
            .collect();
        let path = tmp.path().join(name);
        write_table(&path, &rows).unwrap();
        path
    };
    let run = |name: &str, sets: &[String]| {
        let mut all: Vec<&str> = vec!["train.max_steps=1"];
        all.extend(sets.iter().map(String::as_str));
        let r = try_tasks_recipe(tmp.path(), name, &url, &all)?;
        UniGrpo::run::<CpuAutodiff>(&r, &dev, &UniGrpoOptions::default(), &mut |_| {})
            .map(|out| metric_rows(&out.run_dir).remove(0))
            .map_err(|e| e.to_string())
    };
    let encoded = run("encoded", &[]).unwrap();
    let zeros = table("zeros.parquet", &mmada_data::ImageCoder::id(&coder));
    let tabled = run(
        "tabled",
        &[format!("image_tokenizer.codes=[\"{}\"]", zeros.display())],
    )
    .unwrap();
    // the mmu rows' logits (their KL term at the second inner iteration, their advantages)
    // depend on the prompt codes
    let differs = ["loss", "grad_norm", "kl"]
        .iter()
        .any(|k| encoded[k] != tabled[k]);
    assert!(
        differs,
        "the table's codes were not used: {encoded} vs {tabled}"
    );
    let other = table("other.parquet", "some-other-tokenizer");
    let e = run(
        "other",
        &[format!("image_tokenizer.codes=[\"{}\"]", other.display())],
    )
    .unwrap_err();
    assert!(
        e.contains("image_tokenizer.codes") && e.contains("some-other-tokenizer"),
        "{e}"
    );
}
