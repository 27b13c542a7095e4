//! `mmada-infer generate --mode t2i` and `--mode mmu` on a tiny random MMaDA checkpoint (head
//! = text ids + 8192 image codes) with the tiny MAGVIT-v2 weights of
//! `tests/fixtures/magvitv2/weights`; cross-checked against the sampler and VQ libraries.

mod common;

use std::path::{Path, PathBuf};

use burn::tensor::{Int, Tensor, TensorData};
use common::{TOK_LEN, jsonl, run};
use mmada_data::image::{image_transform, open_image};
use mmada_data::layout::mmu_generation_prompt;
use mmada_data::{ChatTemplate, Message, Preprocess, ResizeMode, Role, TextTokenizer};
use mmada_model::backend::Cpu;
use mmada_model::{FloatDType, SaveOptions};
use mmada_sampler::{GenerateConfig, SeededRng};
use mmada_vq::{Grid, VqCoder};

fn vq_dir() -> PathBuf {
    match std::env::var_os("MMADA_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"),
    }
    .join("magvitv2/weights")
}

/// A tiny checkpoint whose head holds the full MAGVIT-v2 codebook (ids `TOK_LEN..TOK_LEN+8192`).
fn mmada_checkpoint(dir: &Path, seed: u64) {
    let mut cfg = common::tiny_config();
    cfg.vocab_size = TOK_LEN + 8192;
    cfg.embedding_size = TOK_LEN + 8192;
    cfg.codebook_size = Some(8192);
    let model =
        mmada_model::init::init_model::<Cpu>(&cfg, seed, &Default::default(), FloatDType::F32);
    mmada_model::save_checkpoint(
        &model,
        &cfg,
        dir,
        &SaveOptions {
            dtype: mmada_model::DiskDtype::F32,
            ..Default::default()
        },
    )
    .unwrap();
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_string(&common::tokenizer_json(0, false)).unwrap(),
    )
    .unwrap();
}

fn png(path: &Path, k: u32) {
    image::RgbImage::from_fn(48, 40, |x, y| {
        image::Rgb([
            ((x * 5 + k * 70) % 256) as u8,
            ((y * 6 + k * 30) % 256) as u8,
            ((x * y + k * 11) % 256) as u8,
        ])
    })
    .save(path)
    .unwrap();
}

#[test]
fn t2i_writes_pngs_of_the_configured_size_and_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("model");
    mmada_checkpoint(&ckpt, 4);
    let vq = vq_dir();
    let gen_ = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--mode",
            "t2i",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--vq-checkpoint",
            vq.to_str().unwrap(),
            "--resolution",
            "64",
            "--t2i-text-len",
            "16",
            "--timesteps",
            "4",
            "--prompt",
            "a red square",
            "--prompt",
            "two blue dots",
            "--seed",
            "3",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        let r = run(&args);
        assert!(r.ok, "{}", r.stderr);
        jsonl(&out.join("codes.jsonl"))
    };
    let out = tmp.path().join("imgs");
    let recs = gen_(&out, &["--guidance-scale", "0"]);
    assert_eq!(recs.len(), 2);
    let coder = VqCoder::<Cpu>::load(vq.to_str().unwrap(), &Default::default()).unwrap();
    for (i, rec) in recs.iter().enumerate() {
        let file = out.join(rec["file"].as_str().unwrap());
        assert_eq!(file, out.join(format!("{i:04}.png")));
        let img = image::open(&file).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (64, 64), "configured --resolution");
        assert_eq!(rec["grid"], serde_json::json!([4, 4]));
        assert_eq!(rec["nfe"], 4);
        let codes: Vec<u32> = rec["codes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(codes.len(), 16);
        assert!(codes.iter().all(|&c| c < 8192));
        // the PNG is exactly the MAGVIT-v2 decoding of the recorded codes
        let want = coder.decode_codes(&[codes], Grid::new(4, 4)).unwrap();
        assert_eq!(img, want[0], "prompt {i}");
    }
    // Same seed → same codes; guidance (a second, unconditional forward) changes them.
    let again = gen_(&tmp.path().join("again"), &["--guidance-scale", "0"]);
    assert_eq!(recs[0]["codes"], again[0]["codes"]);
    assert_eq!(recs[1]["codes"], again[1]["codes"]);
    let cfg = gen_(&tmp.path().join("cfg"), &["--guidance-scale", "3.5"]);
    assert_ne!(recs[0]["codes"], cfg[0]["codes"]);
    // the default guidance is inference_t2i.py's 3.5
    let default = gen_(&tmp.path().join("default"), &[]);
    assert_eq!(default[0]["codes"], cfg[0]["codes"]);
    assert_eq!(default[1]["codes"], cfg[1]["codes"]);
    // no --out → a clear error
    let r = run(&[
        "generate",
        "--mode",
        "t2i",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--vq-checkpoint",
        vq.to_str().unwrap(),
        "--prompt",
        "x",
    ]);
    assert!(!r.ok && r.stderr.contains("--out DIR"), "{}", r.stderr);
}

#[test]
fn mmu_answers_are_deterministic_and_follow_the_image() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("model");
    mmada_checkpoint(&ckpt, 5);
    let vq = vq_dir();
    let (a, b) = (tmp.path().join("a.png"), tmp.path().join("b.png"));
    png(&a, 0);
    png(&b, 1);
    let gen_ = |image: &Path, name: &str| {
        let out = tmp.path().join(name);
        let r = run(&[
            "generate",
            "--mode",
            "mmu",
            "--image",
            image.to_str().unwrap(),
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--vq-checkpoint",
            vq.to_str().unwrap(),
            "--resolution",
            "32",
            "--template",
            "mmada",
            "--prompt",
            "What is this?",
            "--gen-length",
            "8",
            "--steps",
            "4",
            "--block-length",
            "8",
            "--full-vocab",
            "--seed",
            "1",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(r.ok, "{}", r.stderr);
        jsonl(&out).remove(0)
    };
    let ra = gen_(&a, "a.jsonl");
    let ra2 = gen_(&a, "a2.jsonl");
    let rb = gen_(&b, "b.jsonl");
    assert_eq!(ra["ids"], ra2["ids"], "same image + seed → same answer");
    assert_eq!(ra["image_codes"], ra2["image_codes"]);
    assert_ne!(
        ra["image_codes"], rb["image_codes"],
        "another image → another canvas"
    );

    // The binary's answer = the library sampler on `<|mmu|> <|soi|> codes <|eoi|>` + chat ids.
    let coder = VqCoder::<Cpu>::load(vq.to_str().unwrap(), &Default::default()).unwrap();
    let px = image_transform(
        &open_image(&a).unwrap(),
        &Preprocess {
            resolution: 32,
            mode: ResizeMode::Squash,
        },
    )
    .unwrap();
    let codes = coder.encode_pixels(&[px]).unwrap().remove(0);
    let got: Vec<u32> = ra["image_codes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(got, codes);
    let tok = TextTokenizer::from_dir(&ckpt).unwrap();
    let chat = ChatTemplate::mmada().render(
        &[Message {
            role: Role::User,
            content: "What is this?".into(),
        }],
        true,
    );
    let mut chat_ids = vec![tok.layout().bos_id];
    chat_ids.extend(tok.encode(&chat).unwrap());
    let prompt = mmu_generation_prompt(&codes, &chat_ids, tok.layout()).unwrap();
    assert_eq!(prompt[0], tok.layout().mmu_id);
    assert_eq!(prompt[1], tok.layout().soi_id);
    assert_eq!(prompt[2 + codes.len()], tok.layout().eoi_id);
    let n = prompt.len();
    let ids: Vec<i64> = prompt.iter().map(|&x| i64::from(x)).collect();
    let (_, model) =
        mmada_model::load_checkpoint::<Cpu>(&ckpt, &Default::default(), FloatDType::F32).unwrap();
    let mut cfg = GenerateConfig::from_layout(tok.layout());
    cfg.gen_length = 8;
    cfg.steps = 4;
    cfg.block_length = 8;
    let t = Tensor::<Cpu, 2, Int>::from_data(TensorData::new(ids, [1, n]), &Default::default());
    let o = mmada_sampler::generate(&model, t, None, &cfg, &mut SeededRng::new(1), false).unwrap();
    let canvas: Vec<i64> = o.ids.into_data().convert::<i64>().into_vec().unwrap();
    let bin: Vec<i64> = ra["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(bin, canvas[n..].to_vec());
    // --image without --mode mmu is refused
    let r = run(&[
        "generate",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--image",
        a.to_str().unwrap(),
        "--prompt",
        "x",
    ]);
    assert!(!r.ok && r.stderr.contains("--mode mmu"), "{}", r.stderr);
}
