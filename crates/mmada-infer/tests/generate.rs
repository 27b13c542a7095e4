//! `mmada-infer generate` and `loglik` on a tiny random checkpoint made in a temp dir,
//! cross-checked against the sampler library; config file; bad input.

mod common;

use burn::tensor::{Int, Tensor, TensorData};
use common::{CODEBOOK, MASK, TOK_LEN, jsonl, run};
use mmada_data::{ChatTemplate, Message, Role, TextTokenizer};
use mmada_model::backend::Cpu;
use mmada_model::{FloatDType, LladaModel};
use mmada_sampler::{GenerateConfig, LoglikConfig, SeededRng, StratifiedMasks};

const PROMPTS: [&str; 3] = ["What is 2 + 3?", "Hi", "Compute 12 * 11 and explain."];

fn prompt_ids(tok: &TextTokenizer, user: &str) -> Vec<i64> {
    let text = ChatTemplate::mmada().render(
        &[Message {
            role: Role::User,
            content: user.into(),
        }],
        true,
    );
    let mut ids = vec![i64::from(tok.layout().bos_id)];
    ids.extend(tok.encode(&text).unwrap().into_iter().map(i64::from));
    ids
}

fn load(dir: &std::path::Path) -> (LladaModel<Cpu>, TextTokenizer) {
    let (_, model) =
        mmada_model::load_checkpoint::<Cpu>(dir, &Default::default(), FloatDType::F32).unwrap();
    (model, TextTokenizer::from_dir(dir).unwrap())
}

fn ids_of(rec: &serde_json::Value) -> Vec<i64> {
    rec["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect()
}

/// The binary (3 prompts of different lengths in one left-padded batch, full vocabulary)
/// gives exactly the ids of the library sampler run on each prompt alone; NFE = steps.
#[test]
fn generate_matches_library_and_is_batch_invariant() {
    let (tmp, dir) = common::checkpoint(1);
    let out = tmp.path().join("gen.jsonl");
    let d = dir.to_str().unwrap();
    let mut args = vec![
        "generate",
        "--checkpoint",
        d,
        "--gen-length",
        "16",
        "--steps",
        "8",
        "--block-length",
        "8",
        "--batch-size",
        "3",
        "--full-vocab",
        "--out",
        out.to_str().unwrap(),
    ];
    for p in PROMPTS {
        args.extend(["--prompt", p]);
    }
    let r = run(&args);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stderr.contains("nfe=8"), "{}", r.stderr);
    assert!(r.stderr.contains("tokens_per_s="), "{}", r.stderr);
    let recs = jsonl(&out);
    assert_eq!(recs.len(), 3);
    // stdout: one block per prompt with the decoded text
    for (i, rec) in recs.iter().enumerate() {
        assert_eq!(rec["prompt"], PROMPTS[i]);
        assert_eq!(rec["nfe"], 8);
        assert_eq!(rec["batch"], 3);
        assert!(r.stdout.contains(&format!(
            "### {}\n{}\n",
            i + 1,
            rec["output"].as_str().unwrap()
        )));
    }

    let (model, tok) = load(&dir);
    let mut cfg = GenerateConfig::from_layout(tok.layout());
    cfg.gen_length = 16;
    cfg.steps = 8;
    cfg.block_length = 8;
    for (i, p) in PROMPTS.iter().enumerate() {
        let ids = prompt_ids(&tok, p);
        let n = ids.len();
        let prompt =
            Tensor::<Cpu, 2, Int>::from_data(TensorData::new(ids, [1, n]), &Default::default());
        let o = mmada_sampler::generate(&model, prompt, None, &cfg, &mut SeededRng::new(0), false)
            .unwrap();
        assert_eq!(o.nfe, 8);
        let canvas: Vec<i64> = o.ids.into_data().convert::<i64>().into_vec().unwrap();
        assert_eq!(ids_of(&recs[i]), canvas[n..].to_vec(), "prompt {i}");
    }

    // the same prompts from a .txt file (one per line, blank lines skipped) and the sampler
    // settings through --set: the same ids
    let txt = tmp.path().join("prompts.txt");
    std::fs::write(
        &txt,
        format!("{}\n\n{}\n{}\n", PROMPTS[0], PROMPTS[1], PROMPTS[2]),
    )
    .unwrap();
    let out2 = tmp.path().join("gen2.jsonl");
    let r = run(&[
        "generate",
        "--checkpoint",
        d,
        "--set",
        "sampling.gen_length=16",
        "--set",
        "sampling.steps=8",
        "--set",
        "sampling.block_length=8",
        "--set",
        "sampling.batch_size=3",
        "--full-vocab",
        "--prompts",
        txt.to_str().unwrap(),
        "--out",
        out2.to_str().unwrap(),
    ]);
    assert!(r.ok, "{}", r.stderr);
    let again = jsonl(&out2);
    assert_eq!(again.len(), 3);
    for (a, b) in recs.iter().zip(&again) {
        assert_eq!((&a["prompt"], ids_of(a)), (&b["prompt"], ids_of(b)));
    }
}

/// Temperature 2.0 on a head wider than the tokenizer (125 vs 109 ids): the default run never
/// emits an id outside the tokenizer or the mask id; with --full-vocab image ids do appear.
/// Same seed → same ids; another seed → different ids.
#[test]
fn sampled_ids_stay_inside_the_tokenizer() {
    let (tmp, dir) = common::checkpoint(2);
    let d = dir.to_str().unwrap();
    let gen_ = |extra: &[&str], name: &str| {
        let out = tmp.path().join(name);
        let mut args = vec![
            "generate",
            "--checkpoint",
            d,
            "--gen-length",
            "32",
            "--steps",
            "32",
            "--block-length",
            "32",
            "--temperature",
            "2.0",
            "--batch-size",
            "2",
            "--prompt",
            "a",
            "--prompt",
            "bb",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        let r = run(&args);
        assert!(r.ok, "{}", r.stderr);
        jsonl(&out).iter().flat_map(ids_of).collect::<Vec<i64>>()
    };
    let restricted = gen_(&[], "a.jsonl");
    assert_eq!(restricted.len(), 64);
    assert!(
        restricted
            .iter()
            .all(|&t| (t as usize) < TOK_LEN && t != i64::from(MASK)),
        "{restricted:?}"
    );
    assert_eq!(gen_(&[], "b.jsonl"), restricted);
    assert_ne!(gen_(&["--seed", "7"], "c.jsonl"), restricted);
    let full = gen_(&["--full-vocab"], "d.jsonl");
    let outside = full.iter().filter(|&&t| t as usize >= TOK_LEN).count();
    assert!(
        outside > 0 && full.iter().all(|&t| (t as usize) < TOK_LEN + CODEBOOK),
        "{full:?}"
    );
}

/// All options from a YAML file give the same result as the command line; the command line
/// overrides the file; unknown keys are rejected with their name.
#[test]
fn config_file_and_overrides() {
    let (tmp, dir) = common::checkpoint(3);
    let d = dir.to_str().unwrap();
    let cli_out = tmp.path().join("cli.jsonl");
    let r = run(&[
        "generate",
        "--checkpoint",
        d,
        "--gen-length",
        "8",
        "--steps",
        "4",
        "--block-length",
        "4",
        "--remasking",
        "random",
        "--prompt",
        "xyz",
        "--out",
        cli_out.to_str().unwrap(),
    ]);
    assert!(r.ok, "{}", r.stderr);
    let yaml = tmp.path().join("c.yaml");
    let file_out = tmp.path().join("file.jsonl");
    std::fs::write(
        &yaml,
        format!(
            "model: {{checkpoint: {d}, device: cpu, seed: 0}}\nsampling: {{gen_length: 8, steps: 4, block_length: 4, remasking: random}}\ngenerate: {{prompt: [xyz], out: {}}}\n",
            file_out.display()
        ),
    )
    .unwrap();
    let r = run(&["generate", "--config", yaml.to_str().unwrap()]);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stderr.contains("nfe=4"), "{}", r.stderr);
    assert_eq!(ids_of(&jsonl(&file_out)[0]), ids_of(&jsonl(&cli_out)[0]));
    // command line wins: 8 steps instead of 4
    let r = run(&[
        "generate",
        "--config",
        yaml.to_str().unwrap(),
        "--steps",
        "8",
    ]);
    assert!(r.ok && r.stderr.contains("nfe=8"), "{}", r.stderr);
    assert_eq!(jsonl(&file_out)[0]["nfe"], 8);
    // unknown key
    std::fs::write(&yaml, "sampling: {step: 4}\n").unwrap();
    let r = run(&[
        "generate",
        "--config",
        yaml.to_str().unwrap(),
        "--checkpoint",
        d,
        "--prompt",
        "x",
    ]);
    assert!(
        !r.ok && r.stderr.contains("unknown field `step`"),
        "{}",
        r.stderr
    );
    // preset from the file
    std::fs::write(
        &yaml,
        "sampling: {preset: llada-gsm8k, steps: 32, gen_length: 32}\n",
    )
    .unwrap();
    let r = run(&[
        "generate",
        "--config",
        yaml.to_str().unwrap(),
        "--checkpoint",
        d,
        "--prompt",
        "x",
    ]);
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("steps: 32, gen_length: 32, block_length: 8"),
        "{}",
        r.stderr
    );
}

/// Missing checkpoint, tokenizer not matching the model, invalid sampler settings.
#[test]
fn bad_input_gives_clear_errors() {
    let (tmp, dir) = common::checkpoint(4);
    let d = dir.to_str().unwrap();
    let r = run(&[
        "generate",
        "--checkpoint",
        "/nonexistent/ck",
        "--prompt",
        "x",
    ]);
    assert!(
        !r.ok
            && r.stderr
                .contains("checkpoint directory /nonexistent/ck does not exist"),
        "{}",
        r.stderr
    );
    let r = run(&["generate", "--prompt", "x"]);
    assert!(!r.ok && r.stderr.contains("no checkpoint"), "{}", r.stderr);
    let r = run(&["generate", "--checkpoint", d]);
    assert!(!r.ok && r.stderr.contains("no prompt"), "{}", r.stderr);
    // a canvas longer than max_sequence_length (1024): warned by default, refused on request
    let long = [
        "generate",
        "--checkpoint",
        d,
        "--prompt",
        "x",
        "--gen-length",
        "1024",
        "--block-length",
        "1024",
        "--steps",
        "1",
    ];
    let r = run(&long);
    assert!(
        r.ok && r
            .stderr
            .contains("canvas longer than the model's max_sequence_length"),
        "{}",
        r.stderr
    );
    let r = run(&[&long[..], &["--long-prompt", "refuse"]].concat());
    assert!(
        !r.ok
            && r.stderr.contains("max_sequence_length 1024")
            && r.stderr.contains("--long-prompt warn"),
        "{}",
        r.stderr
    );

    // tokenizer with more ids than the model's head
    let big = tmp.path().join("big.json");
    std::fs::write(&big, common::tokenizer_json(100, false).to_string()).unwrap();
    let r = run(&[
        "generate",
        "--checkpoint",
        d,
        "--tokenizer",
        big.to_str().unwrap(),
        "--prompt",
        "x",
    ]);
    assert!(
        !r.ok && r.stderr.contains("has 209 tokens but the model's vocabulary (vocab_size 125, embedding_size 125) has only 125 ids"),
        "{}",
        r.stderr
    );
    // tokenizer whose mask id differs from config.json
    let swapped = tmp.path().join("swapped.json");
    std::fs::write(&swapped, common::tokenizer_json(0, true).to_string()).unwrap();
    let r = run(&[
        "generate",
        "--checkpoint",
        d,
        "--tokenizer",
        swapped.to_str().unwrap(),
        "--prompt",
        "x",
    ]);
    assert!(
        !r.ok
            && r.stderr
                .contains("its <|mdm_mask|> is id 100 but config.json mask_token_id is 99"),
        "{}",
        r.stderr
    );
    // checkpoint without a tokenizer
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let r = run(&["generate", "--checkpoint", d, "--prompt", "x"]);
    assert!(
        !r.ok && r.stderr.contains("tokenizer.json not found"),
        "{}",
        r.stderr
    );
    std::fs::write(
        dir.join("tokenizer.json"),
        common::tokenizer_json(0, false).to_string(),
    )
    .unwrap();
    // invalid sampler settings name the field
    let r = run(&[
        "generate",
        "--checkpoint",
        d,
        "--prompt",
        "x",
        "--gen-length",
        "10",
        "--block-length",
        "4",
    ]);
    assert!(
        !r.ok
            && r.stderr
                .contains("gen_length 10 is not divisible by block_length 4"),
        "{}",
        r.stderr
    );
    let r = run(&[
        "generate",
        "--checkpoint",
        d,
        "--prompt",
        "x",
        "--gen-length",
        "8",
        "--block-length",
        "4",
        "--steps",
        "3",
    ]);
    assert!(!r.ok && r.stderr.contains("`steps`"), "{}", r.stderr);
    let r = run(&[
        "generate",
        "--checkpoint",
        d,
        "--prompt",
        "x",
        "--device",
        "tpu",
    ]);
    assert!(
        !r.ok && r.stderr.contains("invalid device `tpu`"),
        "{}",
        r.stderr
    );
    #[cfg(not(feature = "cuda"))]
    {
        let r = run(&[
            "generate",
            "--checkpoint",
            d,
            "--prompt",
            "x",
            "--device",
            "cuda:0",
        ]);
        assert!(
            !r.ok && r.stderr.contains("built without the `cuda` feature"),
            "{}",
            r.stderr
        );
    }
}

/// `loglik` prints the value of the library estimator with the same seed and settings.
#[test]
fn loglik_matches_library() {
    let (_tmp, dir) = common::checkpoint(5);
    let d = dir.to_str().unwrap();
    let r = run(&[
        "loglik",
        "--checkpoint",
        d,
        "--prompt",
        "2 + 3 =",
        "--answer",
        " 5",
        "--mc-num",
        "8",
        "--mc-batch-size",
        "4",
        "--seed",
        "11",
    ]);
    assert!(r.ok, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(v["nfe"], 2);
    assert_eq!(v["answer_tokens"], 2);
    assert_eq!(v["prompt_tokens"], 8); // BOS + 7 characters, no template
    let (model, tok) = load(&dir);
    let t = |ids: Vec<u32>| {
        let n = ids.len();
        let d: Vec<i64> = ids.into_iter().map(i64::from).collect();
        Tensor::<Cpu, 1, Int>::from_data(TensorData::new(d, [n]), &Default::default())
    };
    let mut p = vec![tok.layout().bos_id];
    p.extend(tok.encode("2 + 3 =").unwrap());
    let cfg = LoglikConfig {
        mc_num: 8,
        batch_size: 4,
        cfg_scale: 0.0,
        mask_id: MASK,
    };
    let expected = mmada_sampler::log_likelihood(
        &model,
        t(p),
        t(tok.encode(" 5").unwrap()),
        &cfg,
        &mut StratifiedMasks::new(SeededRng::new(11)),
    )
    .unwrap();
    let got = v["log_likelihood"].as_f64().unwrap();
    assert!(got < 0.0 && got.is_finite());
    assert_eq!(got, expected.value);
    // a random model over 125 ids: about ln(1/125) per answer token
    assert!((-20.0..-4.0).contains(&got), "{got}");
    let r = run(&[
        "loglik",
        "--checkpoint",
        d,
        "--prompt",
        "x",
        "--answer",
        "y",
        "--mc-num",
        "6",
        "--mc-batch-size",
        "4",
    ]);
    assert!(!r.ok && r.stderr.contains("mc_num"), "{}", r.stderr);
}

/// The fast-decoding options reach the sampler: `--threshold 0` decodes each block in one
/// model call (NFE 2 for 2 blocks instead of 8 steps) with the same ids as the library call;
/// `--remasking margin|entropy` and `--early-stop` are accepted; `--help` lists them.
#[test]
fn threshold_and_rankings_from_the_command_line() {
    let (tmp, dir) = common::checkpoint(1);
    let d = dir.to_str().unwrap();
    let out = tmp.path().join("fast.jsonl");
    let base = [
        "generate",
        "--checkpoint",
        d,
        "--gen-length",
        "16",
        "--steps",
        "8",
        "--block-length",
        "8",
        "--prompt",
        PROMPTS[0],
    ];
    let mut args = base.to_vec();
    args.extend(["--threshold", "0", "--out", out.to_str().unwrap()]);
    let r = run(&args);
    assert!(r.ok, "{}", r.stderr);
    let recs = jsonl(&out);
    assert_eq!(recs[0]["nfe"], 2, "{}", r.stderr);

    let (model, tok) = load(&dir);
    let mut cfg = GenerateConfig::from_layout(tok.layout());
    (cfg.gen_length, cfg.steps, cfg.block_length) = (16, 8, 8);
    cfg.threshold = Some(0.0);
    cfg.sample_vocab = Some(tok.len());
    let ids = prompt_ids(&tok, PROMPTS[0]);
    let n = ids.len();
    let prompt =
        Tensor::<Cpu, 2, Int>::from_data(TensorData::new(ids, [1, n]), &Default::default());
    let o =
        mmada_sampler::generate(&model, prompt, None, &cfg, &mut SeededRng::new(0), false).unwrap();
    assert_eq!(o.nfe, 2);
    let canvas: Vec<i64> = o.ids.into_data().convert::<i64>().into_vec().unwrap();
    assert_eq!(ids_of(&recs[0]), canvas[n..].to_vec());

    for extra in [
        ["--remasking", "margin"],
        ["--remasking", "entropy"],
        ["--early-stop", "true"],
    ] {
        let mut args = base.to_vec();
        args.extend(extra);
        let r = run(&args);
        assert!(r.ok, "{extra:?}: {}", r.stderr);
        assert!(r.stderr.contains("nfe="), "{}", r.stderr);
    }
    let help = run(&["generate", "--help"]);
    for flag in ["--threshold", "--early-stop", "margin", "entropy"] {
        assert!(help.stdout.contains(flag), "{flag} missing from --help");
    }
}

/// `--adapter DIR` (a PEFT adapter over the checkpoint) gives exactly what the merged
/// checkpoint gives: the same greedy ids from `generate` and the same `loglik`; and not what
/// the base alone gives (the adapter is applied).
#[test]
fn adapter_flag_equals_the_merged_checkpoint() {
    use burn::module::Param;
    use burn::tensor::Distribution;
    use mmada_model::lora::{LoraConfig, LoraTarget};

    let (tmp, dir) = common::checkpoint(2);
    let (base, _) = load(&dir);
    let mut lc = LoraConfig::new(4, 8.0);
    lc.target_modules = vec!["q_proj".into(), "v_proj".into(), "ff_out".into()];
    let mut m = base.with_lora(&lc, 1).unwrap();
    <Cpu as burn::tensor::backend::Backend>::seed(&Default::default(), 3);
    for b in &mut m.blocks {
        let lora = b.lora.as_mut().unwrap();
        for t in LoraTarget::ALL {
            if let Some(a) = lora.slot(t).as_mut() {
                let dims = a.lora_b.val().dims();
                a.lora_b = Param::from_tensor(Tensor::random(
                    dims,
                    Distribution::Normal(0.0, 0.5),
                    &Default::default(),
                ));
            }
        }
    }
    let adapter = tmp.path().join("adapter");
    mmada_model::adapter::save_adapter(&m, &lc, &adapter, Some(dir.to_str().unwrap()), false)
        .unwrap();
    let merged = tmp.path().join("merged");
    let opts = mmada_model::SaveOptions {
        dtype: mmada_model::DiskDtype::F32,
        ..Default::default()
    };
    mmada_model::save_checkpoint(&m.merge_lora(), &common::tiny_config(), &merged, &opts).unwrap();
    std::fs::copy(dir.join("tokenizer.json"), merged.join("tokenizer.json")).unwrap();

    let gen_ids = |ckpt: &std::path::Path, adapter: Option<&std::path::Path>| {
        let out = tmp.path().join("gen.jsonl");
        let mut args = vec![
            "generate",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--gen-length",
            "16",
            "--steps",
            "8",
            "--block-length",
            "8",
            "--full-vocab",
            "--prompt",
            PROMPTS[0],
            "--out",
            out.to_str().unwrap(),
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter", a.to_str().unwrap()]);
        }
        let r = run(&args);
        assert!(r.ok, "{}", r.stderr);
        ids_of(&jsonl(&out)[0])
    };
    let loglik = |ckpt: &std::path::Path, adapter: Option<&std::path::Path>| {
        let mut args = vec![
            "loglik",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--prompt",
            "2 + 3 =",
            "--answer",
            " 5",
            "--mc-num",
            "4",
            "--mc-batch-size",
            "4",
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter", a.to_str().unwrap()]);
        }
        let r = run(&args);
        assert!(r.ok, "{}", r.stderr);
        let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
        v["log_likelihood"].as_f64().unwrap()
    };
    let with_adapter = gen_ids(&dir, Some(&adapter));
    assert_eq!(with_adapter, gen_ids(&merged, None));
    assert_ne!(
        with_adapter,
        gen_ids(&dir, None),
        "the adapter changed nothing"
    );
    let (a, b, c) = (
        loglik(&dir, Some(&adapter)),
        loglik(&merged, None),
        loglik(&dir, None),
    );
    assert!(
        (a - b).abs() <= 1e-5 * a.abs().max(1.0),
        "{a} vs merged {b}"
    );
    assert!((a - c).abs() > 1e-3, "adapter {a} vs base {c}");
    // a missing adapter directory is a clear error naming it
    let missing = tmp.path().join("nope");
    let r = run(&[
        "generate",
        "--checkpoint",
        dir.to_str().unwrap(),
        "--prompt",
        "x",
        "--adapter",
        missing.to_str().unwrap(),
    ]);
    assert!(!r.ok && r.stderr.contains("nope"), "{}", r.stderr);
}
