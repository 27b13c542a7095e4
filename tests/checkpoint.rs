//! Checkpoint I/O: round trips (f32 / bf16, single / sharded) and bad input.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::fixture_root;
use mmada_model::backend::Cpu;
use mmada_model::checkpoint::{CheckpointFiles, DiskDtype, INDEX_FILE, SINGLE_FILE, SaveOptions};
use mmada_model::{CheckpointError, FloatDType, ModelConfig, load_checkpoint, save_checkpoint};
use serde_json::Value;

/// name → (dtype, shape, raw bytes) of every tensor under a checkpoint (single or sharded).
fn raw_tensors(dir: &Path) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let mut files = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            files.push(p);
        }
    }
    let mut out = BTreeMap::new();
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        // An independent reader (the reference safetensors crate) must accept our files.
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(
            meta.metadata()
                .as_ref()
                .and_then(|m| m.get("format"))
                .map(String::as_str),
            Some("pt"),
            "transformers requires __metadata__.format = pt"
        );
        for (name, t) in st.tensors() {
            let prev = out.insert(
                name.clone(),
                (
                    format!("{:?}", t.dtype()),
                    t.shape().to_vec(),
                    t.data().to_vec(),
                ),
            );
            assert!(prev.is_none(), "tensor {name} stored twice");
        }
    }
    out
}

fn fixture_weights() -> std::path::PathBuf {
    fixture_root().join("weights")
}

#[test]
fn f32_round_trip_is_byte_identical() {
    let dev = Default::default();
    let (cfg, model) = load_checkpoint::<Cpu>(&fixture_weights(), &dev, FloatDType::F32).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("f32");
    let opts = SaveOptions {
        dtype: DiskDtype::F32,
        copy_sidecars_from: Some(fixture_weights()),
        ..Default::default()
    };
    save_checkpoint(&model, &cfg, &out, &opts).unwrap();
    let orig = raw_tensors(&fixture_weights());
    let saved = raw_tensors(&out);
    assert_eq!(orig.len(), 3 + 9 * cfg.n_layers);
    assert_eq!(
        orig.keys().collect::<Vec<_>>(),
        saved.keys().collect::<Vec<_>>()
    );
    for (name, (dt, shape, bytes)) in &orig {
        let (dt2, shape2, bytes2) = &saved[name];
        assert_eq!((dt, shape), (dt2, shape2), "{name}");
        assert!(
            bytes == bytes2,
            "{name}: tensor data differs after f32 round trip"
        );
    }
    // config.json keeps every upstream key and value; sidecars copied
    let a: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_weights().join("config.json")).unwrap(),
    )
    .unwrap();
    let b: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    for (k, v) in a.as_object().unwrap() {
        if k == "init_device" {
            continue;
        }
        assert_eq!(&b[k], v, "config.json key `{k}` changed");
    }
    assert!(out.join("generation_config.json").is_file());
    // and it loads again
    let (cfg2, _) = load_checkpoint::<Cpu>(&out, &dev, FloatDType::F32).unwrap();
    assert_eq!(cfg2.d_model, cfg.d_model);
}

#[test]
fn bf16_single_and_sharded_round_trips_are_bit_identical() {
    let dev = Default::default();
    let (cfg, model) = load_checkpoint::<Cpu>(&fixture_weights(), &dev, FloatDType::F32).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let single = tmp.path().join("bf16");
    save_checkpoint(&model, &cfg, &single, &SaveOptions::default()).unwrap();
    assert!(single.join(SINGLE_FILE).is_file());
    let sharded = tmp.path().join("bf16_sharded");
    let opts = SaveOptions {
        max_shard_bytes: Some(60_000),
        ..Default::default()
    };
    save_checkpoint(&model, &cfg, &sharded, &opts).unwrap();
    assert!(!sharded.join(SINGLE_FILE).exists());

    // index: correct total_size, weight_map complete, names as upstream
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(sharded.join(INDEX_FILE)).unwrap()).unwrap();
    let a = raw_tensors(&single);
    let b = raw_tensors(&sharded);
    assert_eq!(
        a, b,
        "sharded and single-file bf16 checkpoints hold the same tensors"
    );
    let total: usize = a.values().map(|(_, _, d)| d.len()).sum();
    assert_eq!(
        index["metadata"]["total_size"].as_u64().unwrap() as usize,
        total
    );
    let wm = index["weight_map"].as_object().unwrap();
    assert_eq!(wm.len(), a.len());
    let shards: std::collections::BTreeSet<_> = wm
        .values()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert!(shards.len() >= 3, "expected several shards, got {shards:?}");
    let n = shards.len();
    for (k, s) in shards.iter().enumerate() {
        assert_eq!(s, &format!("model-{:05}-of-{:05}.safetensors", k + 1, n));
    }
    for (_, (dt, _, _)) in a.iter() {
        assert_eq!(dt, "BF16");
    }
    // bf16 values are the round-to-nearest-even of the f32 originals
    let orig = raw_tensors(&fixture_weights());
    for (name, (_, _, f32_bytes)) in &orig {
        let bf: Vec<u8> = f32_bytes
            .chunks_exact(4)
            .flat_map(|c| {
                half::bf16::from_f32(f32::from_le_bytes(c.try_into().unwrap()))
                    .to_bits()
                    .to_le_bytes()
            })
            .collect();
        assert!(
            bf == a[name].2,
            "{name}: bf16 conversion differs from RNE rounding"
        );
    }

    // load -> save -> load is bit-identical, loading into f32 and into bf16
    for (dtype, tag) in [(FloatDType::F32, "f32"), (FloatDType::BF16, "bf16")] {
        let (cfg2, m2) = load_checkpoint::<Cpu>(&sharded, &dev, dtype).unwrap();
        assert_eq!(m2.dtype(), burn::tensor::DType::from(dtype));
        let again = tmp.path().join(format!("again_{tag}"));
        save_checkpoint(&m2, &cfg2, &again, &opts).unwrap();
        assert_eq!(raw_tensors(&again), b, "bf16 -> {tag} -> bf16 changed bits");
    }
}

#[test]
fn save_refuses_to_clobber_and_overwrites_atomically() {
    let dev = Default::default();
    let (cfg, model) = load_checkpoint::<Cpu>(&fixture_weights(), &dev, FloatDType::F32).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ckpt");
    save_checkpoint(&model, &cfg, &out, &SaveOptions::default()).unwrap();
    let err = save_checkpoint(&model, &cfg, &out, &SaveOptions::default()).unwrap_err();
    assert!(matches!(err, CheckpointError::Exists { .. }), "{err}");
    let opts = SaveOptions {
        overwrite: true,
        dtype: DiskDtype::F32,
        ..Default::default()
    };
    save_checkpoint(&model, &cfg, &out, &opts).unwrap();
    assert_eq!(raw_tensors(&out).values().next().unwrap().0, "F32");
    // no temporary directories left behind
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("ckpt")]);
}

/// Write a copy of the fixture weights with `edit` applied to the tensor map.
fn write_variant(
    dir: &Path,
    edit: impl FnOnce(&mut BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) -> std::path::PathBuf {
    let bytes = std::fs::read(fixture_weights().join(SINGLE_FILE)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut map: BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, (t.dtype(), t.shape().to_vec(), t.data().to_vec())))
        .collect();
    edit(&mut map);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(
        fixture_weights().join("config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = map
        .iter()
        .map(|(n, (d, s, b))| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join(SINGLE_FILE)).unwrap();
    dir.to_path_buf()
}

fn load_err(dir: &Path) -> String {
    match load_checkpoint::<Cpu>(dir, &Default::default(), FloatDType::F32) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_variant(&tmp.path().join("m"), |m| {
        m.remove("model.transformer.blocks.1.up_proj.weight");
    });
    let e = load_err(&dir);
    let cfg = ModelConfig::from_file(&fixture_weights().join("config.json")).unwrap();
    assert!(
        e.contains("missing tensor `model.transformer.blocks.1.up_proj.weight`")
            && e.contains(&format!("[{}, {}]", cfg.mlp_hidden_size, cfg.d_model)),
        "{e}"
    );
}

#[test]
fn unexpected_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_variant(&tmp.path().join("x"), |m| {
        m.insert(
            "model.transformer.blocks.9.q_proj.weight".into(),
            (safetensors::Dtype::F32, vec![2], vec![0; 8]),
        );
    });
    let e = load_err(&dir);
    assert!(
        e.contains("unexpected tensors") && e.contains("model.transformer.blocks.9.q_proj.weight"),
        "{e}"
    );
}

#[test]
fn wrong_shape_names_tensor_and_both_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_variant(&tmp.path().join("s"), |m| {
        let t = m
            .get_mut("model.transformer.blocks.0.k_proj.weight")
            .unwrap();
        t.1 = vec![t.1[0] / 2, t.1[1] * 2];
    });
    let e = load_err(&dir);
    // the sizes from the fixture's config: k_proj is [n_kv_heads · head_dim, d_model]
    let cfg = ModelConfig::from_file(&fixture_weights().join("config.json")).unwrap();
    let (d, kv) = (cfg.d_model, cfg.n_kv_heads * cfg.d_model / cfg.n_heads);
    assert!(
        e.contains("`model.transformer.blocks.0.k_proj.weight`")
            && e.contains(&format!("[{}, {}]", kv / 2, d * 2))
            && e.contains(&format!("[{kv}, {d}]")),
        "{e}"
    );
    // `inspect`-style verification reports the same without loading
    let files = CheckpointFiles::open(&dir).unwrap();
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let problems = files.verify(&cfg);
    assert_eq!(problems.len(), 1, "{problems:?}");
}

#[test]
fn truncated_file_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_variant(&tmp.path().join("t"), |_| {});
    let f = dir.join(SINGLE_FILE);
    let len = std::fs::metadata(&f).unwrap().len();
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..(len as usize - 1000)]).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("truncated")
            && e.contains("model.safetensors")
            && e.contains("model.transformer."),
        "{e}"
    );
    // cut inside the header
    std::fs::write(&f, &bytes[..20]).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("not a valid safetensors file") && e.contains("header length"),
        "{e}"
    );
}

#[test]
fn non_safetensors_file_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_variant(&tmp.path().join("n"), |_| {});
    std::fs::write(
        dir.join(SINGLE_FILE),
        b"PK\x03\x04 this is a zip, not safetensors. ........",
    )
    .unwrap();
    let e = load_err(&dir);
    assert!(e.contains("not a valid safetensors file"), "{e}");
    std::fs::write(dir.join(SINGLE_FILE), b"").unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("not a valid safetensors file") && e.contains("0 bytes"),
        "{e}"
    );
    std::fs::remove_file(dir.join(SINGLE_FILE)).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("no weights found"), "{e}");
}

#[test]
fn config_with_wrong_type_names_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_variant(&tmp.path().join("c"), |_| {});
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    cfg["n_heads"] = Value::String("4".into());
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("`n_heads`") && e.contains("config.json") && e.contains("integer"),
        "{e}"
    );
}

#[test]
fn sharded_index_inconsistencies_are_named() {
    let dev = Default::default();
    let (cfg, model) = load_checkpoint::<Cpu>(&fixture_weights(), &dev, FloatDType::F32).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sh");
    save_checkpoint(
        &model,
        &cfg,
        &dir,
        &SaveOptions {
            max_shard_bytes: Some(60_000),
            ..Default::default()
        },
    )
    .unwrap();
    let ipath = dir.join(INDEX_FILE);
    let mut index: Value = serde_json::from_str(&std::fs::read_to_string(&ipath).unwrap()).unwrap();
    index["metadata"]["total_size"] = Value::from(12345);
    std::fs::write(&ipath, index.to_string()).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("total_size") && e.contains("12345"), "{e}");
    index["metadata"] = Value::Null;
    let name = "model.transformer.ln_f.weight";
    let current = index["weight_map"][name].as_str().unwrap().to_string();
    let wrong = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap().to_string())
        .find(|s| *s != current)
        .unwrap();
    index["weight_map"][name] = Value::from(wrong);
    std::fs::write(&ipath, index.to_string()).unwrap();
    let e = load_err(&dir);
    assert!(e.contains(name), "{e}");
}
