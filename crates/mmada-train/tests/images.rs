//! Image rows end to end in SFT (issue 8 item 4, issue 4 t2i options): tiny PNGs generated
//! here, the tiny MAGVIT-v2 weights of `tests/fixtures/magvitv2/weights`, mmu + t2i streams,
//! the on-disk code cache, caption dropout, and pre-tokenized code tables (parquet).

use mmada_train::recipe::Recipe as _;
use mmada_train::trainer::TrainLoop as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use mmada_data::code_table::{CodeTable, read_table, write_table};
use mmada_data::layout::drop_caption;
use mmada_data::{ImageCoder, Pixels, StreamError, StreamKind, TextTokenizer};
use mmada_model::backend::{Cpu, CpuAutodiff};
use mmada_train::data::{ImageStats, TrainData, TrainDataError, caption_dropped, load_image_coder};
use mmada_train::recipe::SftRecipe;
use mmada_train::sft::{Sft, SftOptions, load_tokenizer};

fn vq_weights() -> PathBuf {
    match std::env::var_os("MMADA_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"),
    }
    .join("magvitv2/weights")
}

/// Four 40×36 PNGs (not square, so crop and squash differ), distinct colour gradients.
fn write_pngs(dir: &Path) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    (0..4u32)
        .map(|k| {
            let img = image::RgbImage::from_fn(40, 36, |x, y| {
                image::Rgb([
                    ((x * 6 + k * 50) % 256) as u8,
                    ((y * 7 + k * 90) % 256) as u8,
                    (((x + y) * 3 + k * 20) % 256) as u8,
                ])
            });
            let p = dir.join(format!("img{k}.png"));
            img.save(&p).unwrap();
            p
        })
        .collect()
}

/// A recipe with an mmu and a t2i stream over the PNGs (resolution 32: 2×2 = 4 codes).
fn recipe(dir: &Path, extra_sets: &[&str]) -> SftRecipe {
    let data = dir.join("data");
    if !data.join("tokenizer.json").is_file() {
        mmada_train::synth::write_arithmetic(&data, 8, 1).unwrap();
    }
    let pngs = write_pngs(&data.join("images"));
    let mut mmu = String::new();
    let mut t2i = String::new();
    for (k, p) in pngs.iter().enumerate() {
        mmu.push_str(&format!(
            "{{\"image\": \"{}\", \"question\": \"1+{k}\", \"answer\": \"{k}\"}}\n",
            p.display()
        ));
        t2i.push_str(&format!(
            "{{\"image\": \"{}\", \"caption\": \"2+{k}\"}}\n",
            p.display()
        ));
    }
    std::fs::write(data.join("mmu.jsonl"), mmu).unwrap();
    std::fs::write(data.join("t2i.jsonl"), t2i).unwrap();
    let text = format!(
        r#"
run: {{name: img, output_dir: "{out}", seed: 5}}
model:
  preset: tiny
  overrides: {{d_model: 32, n_layers: 2, n_heads: 2, n_kv_heads: 2, mlp_hidden_size: 64}}
tokenizer: {{path: "{tok}"}}
data:
  layout: {{max_seq_length: 64, max_lm_len: 64}}
  filter_overlong: false
  image_tokenizer:
    checkpoint: "{vq}"
    resolution: 32
    cache_dir: "{cache}"
  mmu:
    batch_size: 2
    sources:
      - inline:
          name: tiny_mmu
          task: mmu
          source: {{path: "{mmu}"}}
          format: jsonl
          fields: {{image: image, question: question, answer: answer}}
          license: MIT
          split: train
  t2i:
    batch_size: 2
    sources:
      - inline:
          name: tiny_t2i
          task: t2i
          source: {{path: "{t2i}"}}
          format: jsonl
          fields: {{image: image, caption: caption}}
          license: MIT
          split: train
loss: {{mask_schedule: pow2, cond_dropout_prob: 0.5, min_masking_rate: 0.1}}
optimizer: {{lr: 1.0e-3}}
schedule: {{kind: constant}}
train: {{max_steps: 4}}
checkpoint: {{every: 0, keep_last: 1}}
"#,
        out = dir.join("runs").display(),
        tok = data.join("tokenizer.json").display(),
        vq = vq_weights().display(),
        cache = dir.join("code_cache").display(),
        mmu = data.join("mmu.jsonl").display(),
        t2i = data.join("t2i.jsonl").display(),
    );
    let sets: Vec<String> = extra_sets.iter().map(|s| s.to_string()).collect();
    SftRecipe::parse(&text, "images.yaml", &sets).unwrap()
}

/// Counts `encode` calls of the wrapped coder.
struct Counting<'a> {
    inner: &'a dyn ImageCoder,
    images: AtomicU64,
}

impl ImageCoder for Counting<'_> {
    fn id(&self) -> String {
        self.inner.id()
    }
    fn encode(
        &self,
        images: &[Pixels],
    ) -> Result<Vec<Vec<u32>>, Box<dyn std::error::Error + Send + Sync>> {
        self.images
            .fetch_add(images.len() as u64, Ordering::Relaxed);
        self.inner.encode(images)
    }
}

fn tok(r: &SftRecipe) -> TextTokenizer {
    load_tokenizer(&r.tokenizer, Path::new("/")).unwrap()
}

#[test]
fn sft_over_png_rows_trains_and_the_second_load_hits_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let r = recipe(tmp.path(), &[]);
    let coder = load_image_coder::<Cpu>(
        r.data.image_tokenizer.as_ref(),
        Path::new("/"),
        &Default::default(),
    )
    .unwrap()
    .expect("coder configured");

    // First load: every distinct image (4 mmu squash + 4 t2i crop) is encoded exactly once.
    let counting = Counting {
        inner: &coder,
        images: AtomicU64::new(0),
    };
    let d = TrainData::load_with_images(
        &r.data,
        &r.loss,
        r.run.seed,
        tok(&r),
        Path::new("/"),
        Some(&counting),
    )
    .unwrap();
    assert_eq!(counting.images.load(Ordering::Relaxed), 8);
    assert_eq!(
        d.images(),
        ImageStats {
            encoded: 8,
            cache_hits: 0,
            from_tables: 0
        }
    );
    // Second load (the next run, or a re-read epoch): all from the on-disk cache.
    let counting2 = Counting {
        inner: &coder,
        images: AtomicU64::new(0),
    };
    let mut d2 = TrainData::load_with_images(
        &r.data,
        &r.loss,
        r.run.seed,
        tok(&r),
        Path::new("/"),
        Some(&counting2),
    )
    .unwrap();
    assert_eq!(counting2.images.load(Ordering::Relaxed), 0);
    assert_eq!(d2.images().cache_hits, 8);
    // Two epochs of batches (4 rows per stream, 2 per step) never call the coder again.
    for step in 0..4 {
        let rows = d2.next_rows();
        let (b, _) = d2
            .noise(&rows, step, 0, mmada_train::data::purpose::MASK)
            .unwrap();
        assert_eq!((b.n_t2i, b.n_mmu), (2, 2));
        assert_eq!(
            b.seq,
            64 + 1 + 1 + 4 + 1,
            "t2i length P+1+1+N+1 with N = (32/16)²"
        );
    }
    assert_eq!(counting2.images.load(Ordering::Relaxed), 0);

    // The SFT loop over these rows: finite t2i and mmu losses every step.
    let mut reports = vec![];
    let opts = SftOptions {
        base_dir: PathBuf::from("/"),
        ..Default::default()
    };
    let out = Sft::run::<CpuAutodiff>(&r, &Default::default(), &opts, &mut |s| {
        reports.push((s.loss_t2i, s.loss_mmu, s.loss_lm))
    })
    .unwrap();
    assert_eq!(out.losses.len(), 4);
    for (t2i, mmu, lm) in &reports {
        let (t2i, mmu) = (t2i.expect("t2i loss"), mmu.expect("mmu loss"));
        assert!(t2i.is_finite() && t2i > 0.0, "loss_t2i {t2i}");
        assert!(mmu.is_finite() && mmu > 0.0, "loss_mmu {mmu}");
        assert!(lm.is_none());
    }
    eprintln!("image SFT losses (t2i, mmu): {reports:?}");
}

#[test]
fn an_image_row_without_a_tokenizer_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let r = recipe(tmp.path(), &[]);
    let err = match TrainData::load_with_images(
        &r.data,
        &r.loss,
        r.run.seed,
        tok(&r),
        Path::new("/"),
        None,
    ) {
        Err(e) => e,
        Ok(_) => panic!("loading image rows without a coder must fail"),
    };
    assert!(
        matches!(
            err,
            TrainDataError::Stream(StreamError::NoImageTokenizer { .. })
        ),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("t2i")
            && msg.contains("data.image_tokenizer.checkpoint")
            && msg.contains("t2i.jsonl"),
        "{msg}"
    );
}

#[test]
fn caption_dropout_rate_and_determinism() {
    // rate over many (step, row) draws ≈ p (binomial 4σ bound), identical on re-draw
    for p in [0.1f32, 0.5] {
        let n = 20_000u64;
        let hits = (0..n)
            .filter(|&i| caption_dropped(7, i / 8, i % 8, p))
            .count() as f64;
        let sigma = (n as f64 * f64::from(p) * (1.0 - f64::from(p))).sqrt();
        assert!(
            (hits - n as f64 * f64::from(p)).abs() < 4.0 * sigma,
            "p={p}: {hits} of {n}"
        );
    }
    let a: Vec<bool> = (0..64).map(|i| caption_dropped(7, 3, i, 0.3)).collect();
    let b: Vec<bool> = (0..64).map(|i| caption_dropped(7, 3, i, 0.3)).collect();
    assert_eq!(a, b, "same (seed, step, row) → same draw");
    let c: Vec<bool> = (0..64).map(|i| caption_dropped(8, 3, i, 0.3)).collect();
    assert_ne!(a, c, "another seed → other draws");
    assert!((0..1000).all(|i| !caption_dropped(7, i, 0, 0.0)));
    assert!((0..1000).all(|i| caption_dropped(7, i, 0, 1.0)));

    // Through the data: with p = 1 every t2i row becomes the null-caption layout
    // `[iPAD]* <|t2i|> <BOS> <EOS> <|soi|> img <|eoi|>` with the same codes.
    let tmp = tempfile::tempdir().unwrap();
    let r = recipe(tmp.path(), &["loss.cond_dropout_prob=1.0"]);
    let coder = load_image_coder::<Cpu>(
        r.data.image_tokenizer.as_ref(),
        Path::new("/"),
        &Default::default(),
    )
    .unwrap()
    .unwrap();
    let mut d = TrainData::load_with_images(
        &r.data,
        &r.loss,
        r.run.seed,
        tok(&r),
        Path::new("/"),
        Some(&coder),
    )
    .unwrap();
    let t = *d.tokenizer().layout();
    let rows = d.next_rows();
    let t2i_rows = &rows.iter().find(|(n, _)| *n == StreamKind::T2i).unwrap().1;
    let (b, st) = d
        .noise(&rows, 0, 0, mmada_train::data::purpose::MASK)
        .unwrap();
    assert_eq!(st.t2i_captions_dropped, 2);
    let seq = b.seq;
    for (k, orig) in t2i_rows.iter().enumerate() {
        let row = &b.ids[k * seq..(k + 1) * seq];
        let null = drop_caption(orig, 64, &t).unwrap();
        assert_eq!(row[62..65], [t.t2i_id, t.bos_id, t.eos_id].map(i64::from));
        assert!(row[..62].iter().all(|&x| x == i64::from(t.ipad_id)));
        // image block: the original codes or the mask id
        for (i, &x) in row.iter().enumerate().take(70).skip(66) {
            assert!(x == i64::from(null.ids[i]) || x == b.mask_id);
            assert_eq!(null.ids[i], orig.ids[i]);
        }
        assert_ne!(
            orig.ids[..65],
            null.ids[..65],
            "the caption was really dropped"
        );
    }
    // With p = 0 no row is touched.
    let r0 = recipe(tmp.path(), &["loss.cond_dropout_prob=0.0"]);
    let mut d0 = TrainData::load_with_images(
        &r0.data,
        &r0.loss,
        r0.run.seed,
        tok(&r0),
        Path::new("/"),
        Some(&coder),
    )
    .unwrap();
    let rows = d0.next_rows();
    let (_, st) = d0
        .noise(&rows, 0, 0, mmada_train::data::purpose::MASK)
        .unwrap();
    assert_eq!(st.t2i_captions_dropped, 0);
}

#[test]
fn pretokenized_table_round_trip_replaces_the_encoder() {
    let tmp = tempfile::tempdir().unwrap();
    let r = recipe(tmp.path(), &[]);
    let coder = load_image_coder::<Cpu>(
        r.data.image_tokenizer.as_ref(),
        Path::new("/"),
        &Default::default(),
    )
    .unwrap()
    .unwrap();
    // Reference: codes through the encoder.
    let d = TrainData::load_with_images(
        &r.data,
        &r.loss,
        r.run.seed,
        tok(&r),
        Path::new("/"),
        Some(&coder),
    )
    .unwrap();
    assert_eq!(d.images().encoded, 8);

    // `data pretokenize` over the two manifests → one parquet file.
    let out = tmp.path().join("codes.parquet");
    let n = mmada_train::pretok::pretokenize_recipe(&r.data, Path::new("/"), &coder, &out).unwrap();
    assert_eq!(n, 8, "4 images × (mmu squash, t2i crop)");
    let rows = read_table(&out).unwrap();
    assert_eq!(rows.len(), 8);
    assert!(
        rows.iter()
            .all(|x| x.codes.len() == 4 && x.coder == coder.id() && x.resolution == 32)
    );
    // The table alone (no checkpoint) answers every image, with the same rows as encoding.
    let table_only = recipe(
        tmp.path(),
        &[
            "data.image_tokenizer.checkpoint=null",
            "data.image_tokenizer.cache_dir=null",
            &format!("data.image_tokenizer.codes=[\"{}\"]", out.display()),
        ],
    );
    let mut dt = TrainData::load_with_images(
        &table_only.data,
        &table_only.loss,
        table_only.run.seed,
        tok(&table_only),
        Path::new("/"),
        None,
    )
    .unwrap();
    assert_eq!(
        dt.images(),
        ImageStats {
            encoded: 0,
            cache_hits: 0,
            from_tables: 8
        }
    );
    let mut de = TrainData::load_with_images(
        &r.data,
        &r.loss,
        r.run.seed,
        tok(&r),
        Path::new("/"),
        Some(&coder),
    )
    .unwrap();
    let (a, b) = (dt.next_rows(), de.next_rows());
    for ((na, ra), (nb, rb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        for (x, y) in ra.iter().zip(rb) {
            assert_eq!(x.ids, y.ids, "{na}: table codes == encoder codes");
        }
    }
    // A table made by another tokenizer is refused when a checkpoint is configured.
    let mut forged = rows.clone();
    for row in &mut forged {
        row.coder = "magvitv2:other".into();
    }
    let forged_path = tmp.path().join("forged.parquet");
    write_table(&forged_path, &forged).unwrap();
    assert_eq!(CodeTable::read(&forged_path).unwrap().len(), 8);
    let r_forged = recipe(
        tmp.path(),
        &[&format!(
            "data.image_tokenizer.codes=[\"{}\"]",
            forged_path.display()
        )],
    );
    let err = match TrainData::load_with_images(
        &r_forged.data,
        &r_forged.loss,
        r_forged.run.seed,
        tok(&r_forged),
        Path::new("/"),
        Some(&coder),
    ) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("stale table accepted"),
    };
    assert!(
        err.contains("magvitv2:other") && err.contains("pretokenize"),
        "{err}"
    );
}

#[test]
fn pretokenize_cli_writes_a_table_training_can_read() {
    let tmp = tempfile::tempdir().unwrap();
    recipe(tmp.path(), &[]); // writes the PNGs, jsonl files and tokenizer
    let data = tmp.path().join("data");
    let manifest = data.join("t2i.yaml");
    std::fs::write(
        &manifest,
        format!(
            "name: tiny_t2i\ntask: t2i\nsource: {{path: \"{}\"}}\nformat: jsonl\nfields: {{image: image, caption: caption}}\nlicense: MIT\nsplit: train\n",
            data.join("t2i.jsonl").display()
        ),
    )
    .unwrap();
    let out = tmp.path().join("t2i_codes.parquet");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_mmada-train"))
        .args(["data", "pretokenize", "--manifest"])
        .arg(&manifest)
        .arg("--out")
        .arg(&out)
        .arg("--vq-checkpoint")
        .arg(vq_weights())
        .args(["--resolution", "32", "--device", "cpu"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.contains("4 image(s)"), "{stdout}");
    let rows = read_table(&out).unwrap();
    assert_eq!(rows.len(), 4);
    assert!(
        rows.iter()
            .all(|x| x.mode == mmada_data::ResizeMode::CenterCrop)
    );
    // The t2i stream reads its codes from the table: only the 4 mmu images are encoded.
    let with_table = recipe(
        tmp.path(),
        &[
            "data.image_tokenizer.cache_dir=null",
            &format!("data.image_tokenizer.codes=[\"{}\"]", out.display()),
        ],
    );
    let coder = load_image_coder::<Cpu>(
        with_table.data.image_tokenizer.as_ref(),
        Path::new("/"),
        &Default::default(),
    )
    .unwrap()
    .unwrap();
    let d = TrainData::load_with_images(
        &with_table.data,
        &with_table.loss,
        with_table.run.seed,
        tok(&with_table),
        Path::new("/"),
        Some(&coder),
    )
    .unwrap();
    assert_eq!(
        d.images(),
        ImageStats {
            encoded: 4,
            cache_hits: 0,
            from_tables: 4
        }
    );
    // A bad resolution is refused before any work.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_mmada-train"))
        .args(["data", "pretokenize", "--manifest"])
        .arg(&manifest)
        .arg("--out")
        .arg(&out)
        .args(["--resolution", "30"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("multiple of 16"));
    // The encoder runs on one device: `--device cpu:2` is refused with the valid choices.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_mmada-train"))
        .args(["data", "pretokenize", "--manifest"])
        .arg(&manifest)
        .arg("--out")
        .arg(&out)
        .arg("--vq-checkpoint")
        .arg(vq_weights())
        .args(["--resolution", "32", "--device", "cpu:2"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--device cpu:2") && err.contains("cuda:N"),
        "{err}"
    );
}

#[test]
fn recipe_image_keys_are_typed_and_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let r = recipe(tmp.path(), &[]);
    assert_eq!(
        r.loss.mask_schedule,
        mmada_diffusion::MaskSchedule::Pow(2.0)
    );
    let it = r.data.image_tokenizer.as_ref().unwrap();
    assert_eq!(it.resolution, 32);
    assert_eq!(it.t2i_mode, mmada_data::ResizeMode::CenterCrop);
    assert_eq!(
        it.mmu_mode,
        mmada_data::ResizeMode::Squash,
        "stage 2.x default"
    );
    let yaml = r.to_yaml();
    let err = |sets: &[&str]| {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        SftRecipe::parse(&yaml, "r.yaml", &sets)
            .expect_err("must be rejected")
            .to_string()
    };
    let e = err(&["loss.cond_dropout_prob=1.5"]);
    assert!(
        e.contains("loss.cond_dropout_prob") && e.contains("[0, 1]"),
        "{e}"
    );
    let e = err(&["loss.min_masking_rate=-0.1"]);
    assert!(e.contains("loss.min_masking_rate"), "{e}");
    let e = err(&["data.image_tokenizer.resolution=30"]);
    assert!(
        e.contains("data.image_tokenizer.resolution") && e.contains("16"),
        "{e}"
    );
    let e = err(&["loss.mask_schedule=cosinus"]);
    assert!(
        e.contains("loss.mask_schedule") && e.contains("powK"),
        "{e}"
    );
    let e = err(&["data.image_tokenizer.mmu_mode=stretch"]);
    assert!(e.contains("data.image_tokenizer.mmu_mode"), "{e}");
    let e = err(&["data.image_tokenizer.chekpoint=x"]);
    assert!(e.contains("chekpoint"), "{e}");
    let ok = |sets: &[&str]| {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        SftRecipe::parse(&yaml, "r.yaml", &sets).unwrap()
    };
    assert_eq!(
        ok(&["loss.mask_schedule=sigmoid"]).loss.mask_schedule,
        mmada_diffusion::MaskSchedule::SIGMOID
    );
    assert_eq!(
        ok(&["loss.mask_schedule=linear"]).loss.mask_schedule,
        mmada_diffusion::MaskSchedule::Linear
    );
}
