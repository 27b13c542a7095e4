//! Checkpoint format: the module's `state_dict` layout against the real `showlab/magvitv2`
//! key list and the tiny weights, config parsing, and every loading error naming its tensor.

mod common;

use std::path::{Path, PathBuf};

use common::{Cpu, Fixture, host_int, magvit_root, ordered_entries};
use mmada_vq::checkpoint::{HF_WEIGHTS_FILE, weights_file};
use mmada_vq::{MagvitConfig, MagvitV2, VqError, ZeroInit, load_dir, load_weights};
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use serde_json::Value;

fn layout_of(entries: &[(String, Value)]) -> Vec<(String, Vec<usize>, String)> {
    entries
        .iter()
        .map(|(k, v)| {
            let shape = v["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            (k.clone(), shape, v["dtype"].as_str().unwrap().to_string())
        })
        .collect()
}

fn ours(model: &MagvitV2<Cpu>) -> Vec<(String, Vec<usize>, String)> {
    model
        .state_dict_layout()
        .into_iter()
        .map(|e| (e.name, e.shape, e.dtype.to_string()))
        .collect()
}

fn assert_same_layout(
    ours: &[(String, Vec<usize>, String)],
    want: &[(String, Vec<usize>, String)],
) {
    for (i, (a, b)) in ours.iter().zip(want).enumerate() {
        assert_eq!(a, b, "state_dict entry {i}");
    }
    assert_eq!(ours.len(), want.len(), "number of state_dict entries");
}

/// A module built with the real (default) config has exactly the 382 names, shapes and
/// dtypes of the released checkpoint, in upstream `state_dict` order.
#[test]
fn real_config_has_exact_upstream_state_dict() {
    let path = magvit_root().join("real_state_dict_keys.json");
    let want = layout_of(&ordered_entries(&path, "keys"));
    let top: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(want.len() as u64, top["num_tensors"].as_u64().unwrap());

    let cfg = MagvitConfig::from_json(
        r#"{"_class_name": "MAGVITv2", "_diffusers_version": "0.32.2"}"#,
        Path::new("config.json"),
    )
    .unwrap();
    assert_eq!(cfg, MagvitConfig::real());
    let model =
        MagvitV2::<Cpu>::from_source(&cfg, &mut ZeroInit::new(&Default::default())).unwrap();
    assert_same_layout(&ours(&model), &want);
    assert_eq!(
        model.num_params() as u64,
        top["num_parameters_excluding_buffers"].as_u64().unwrap()
    );
    let values: usize = want
        .iter()
        .map(|(_, s, _)| s.iter().product::<usize>())
        .sum();
    assert_eq!(values as u64, top["num_values"].as_u64().unwrap());
    assert_eq!(cfg.downsample_factor(), 16);
}

/// The tiny config of the fixture gives the fixture's key list, and loading uses every
/// tensor of its weights file.
#[test]
fn tiny_config_layout_matches_fixture() {
    let dir = magvit_root().join("weights");
    let want = layout_of(&ordered_entries(
        &dir.join("config.json"),
        "state_dict_keys",
    ));
    let (cfg, model) = load_dir::<Cpu>(&dir, &Default::default()).unwrap();
    assert_eq!(cfg.encoder.ch, 32);
    assert_eq!(cfg.decoder.num_res_blocks, vec![1, 1, 2, 1, 1]);
    assert_same_layout(&ours(&model), &want);
    let fx = Fixture::open(&weights_file(&dir).unwrap());
    let mut names = fx.names();
    names.sort();
    let mut ours: Vec<String> = want.into_iter().map(|e| e.0).collect();
    ours.sort();
    assert_eq!(names, ours);
}

/// Owned copy of a safetensors file's tensors, to write modified checkpoints.
struct Owned(Vec<(String, Dtype, Vec<usize>, Vec<u8>)>);

impl Owned {
    fn read(path: &Path) -> Self {
        let bytes = std::fs::read(path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut v: Vec<_> = st
            .tensors()
            .into_iter()
            .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        Owned(v)
    }
    fn get(&mut self, name: &str) -> &mut (String, Dtype, Vec<usize>, Vec<u8>) {
        self.0.iter_mut().find(|t| t.0 == name).unwrap()
    }
    fn remove(&mut self, name: &str) {
        let n = self.0.len();
        self.0.retain(|t| t.0 != name);
        assert_eq!(self.0.len(), n - 1, "{name} present");
    }
    /// Write as `<dir>/<file>` next to the tiny `config.json`.
    fn write(&self, dir: &Path, file: &str) -> PathBuf {
        std::fs::copy(
            magvit_root().join("weights/config.json"),
            dir.join("config.json"),
        )
        .unwrap();
        let views: Vec<(String, TensorView<'_>)> = self
            .0
            .iter()
            .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        let path = dir.join(file);
        safetensors::serialize_to_file(views, None, &path).unwrap();
        path
    }
}

fn tiny() -> Owned {
    Owned::read(&magvit_root().join("weights/model.safetensors"))
}

fn load_err(o: &Owned) -> VqError {
    let tmp = tempfile::tempdir().unwrap();
    o.write(tmp.path(), "model.safetensors");
    load_dir::<Cpu>(tmp.path(), &Default::default())
        .map(|_| ())
        .expect_err("loading must fail")
}

#[test]
fn hf_file_name_is_loaded_and_preferred() {
    let tmp = tempfile::tempdir().unwrap();
    let o = tiny();
    o.write(tmp.path(), HF_WEIGHTS_FILE);
    assert_eq!(
        weights_file(tmp.path()).unwrap(),
        tmp.path().join(HF_WEIGHTS_FILE)
    );
    let (_, model) = load_dir::<Cpu>(tmp.path(), &Default::default()).unwrap();
    // Same weights: the fixture codes decode to the same pixels as from the original folder.
    let codes =
        Fixture::open(&magvit_root().join("decode_rect/tensors.safetensors")).int_tensor2("codes");
    let (_, orig) = load_dir::<Cpu>(&magvit_root().join("weights"), &Default::default()).unwrap();
    let g = mmada_vq::Grid::new(4, 6);
    let a = model.decode(codes.clone(), g).unwrap();
    let b = orig.decode(codes, g).unwrap();
    assert_eq!(common::host(&a), common::host(&b));
    let e = load_dir::<Cpu>(&tmp.path().join("nope"), &Default::default()).unwrap_err();
    assert!(matches!(e, VqError::NoWeights { .. }), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    for name in [
        "decoder.up.3.block.0.nin_shortcut.weight",
        "encoder.mid.attn_1.proj_out.bias",
        "quantize.power_vals",
        "quantize.embedding",
    ] {
        let mut o = tiny();
        o.remove(name);
        let e = load_err(&o);
        assert!(
            matches!(&e, VqError::MissingTensor { tensor, .. } if tensor == name),
            "{name}: {e}"
        );
        assert!(e.to_string().contains(name), "{e}");
    }
}

#[test]
fn wrong_shape_is_named() {
    let mut o = tiny();
    let t = o.get("encoder.conv_in.weight");
    assert_eq!(t.2, vec![32, 3, 3, 3]);
    t.2 = vec![32, 3, 9, 1];
    let e = load_err(&o);
    assert!(
        matches!(&e, VqError::ShapeMismatch { tensor, expected, found, .. }
            if tensor == "encoder.conv_in.weight" && expected == &vec![32, 3, 3, 3] && found == &vec![32, 3, 9, 1]),
        "{e}"
    );
    assert!(e.to_string().contains("encoder.conv_in.weight"));
}

#[test]
fn wrong_dtype_is_named() {
    let mut o = tiny();
    let t = o.get("decoder.norm_out.bias");
    t.1 = Dtype::I32;
    let e = load_err(&o);
    assert!(
        matches!(&e, VqError::UnsupportedDtype { tensor, .. } if tensor == "decoder.norm_out.bias"),
        "{e}"
    );
}

#[test]
fn wrong_buffer_values_are_named() {
    let mut o = tiny();
    let t = o.get("quantize.power_vals");
    assert_eq!(t.1, Dtype::I64);
    // Reverse the bit order (LSB first): a different code layout, which must not load.
    let mut v: Vec<[u8; 8]> = t.3.chunks_exact(8).map(|c| c.try_into().unwrap()).collect();
    v.reverse();
    t.3 = v.concat();
    let e = load_err(&o);
    assert!(
        matches!(&e, VqError::BufferMismatch { tensor, index: 0, .. } if tensor == "quantize.power_vals"),
        "{e}"
    );
}

#[test]
fn unexpected_tensor_is_named() {
    let mut o = tiny();
    o.0.push((
        "encoder.down.0.attn.0.q.weight".into(),
        Dtype::F32,
        vec![1],
        vec![0; 4],
    ));
    let e = load_err(&o);
    assert!(
        matches!(&e, VqError::UnexpectedTensors { tensors, .. } if tensors == &vec!["encoder.down.0.attn.0.q.weight".to_string()]),
        "{e}"
    );
}

#[test]
fn truncated_file_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tiny().write(tmp.path(), "model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let cfg = MagvitConfig::from_dir(tmp.path()).unwrap();
    let e = load_weights::<Cpu>(&path, &cfg, &Default::default()).unwrap_err();
    assert!(
        matches!(
            e,
            VqError::Safetensors(mmada_safetensors::SafetensorsError::Truncated { .. })
        ),
        "{e}"
    );
}

#[test]
fn config_errors() {
    let p = Path::new("config.json");
    // ch 16 cannot be split into GroupNorm(32) groups (fixture README quirk 9).
    let e = MagvitConfig::from_json(r#"{"encoder": {"ch": 16}}"#, p).unwrap_err();
    assert!(
        matches!(e, VqError::InvalidConfig(ref s) if s.contains("encoder.ch")),
        "{e}"
    );
    let e = MagvitConfig::from_json(r#"{"decoder": {"num_res_blocks": [1, 2]}}"#, p).unwrap_err();
    assert!(
        matches!(e, VqError::InvalidConfig(ref s) if s.contains("num_res_blocks")),
        "{e}"
    );
    let e = MagvitConfig::from_json(r#"{"encoder": {"chh": 32}}"#, p).unwrap_err();
    assert!(matches!(e, VqError::ConfigParse { .. }), "{e}");
    let e = MagvitConfig::from_json(r#"{"quantizer": {"codebook_dim": 12}}"#, p).unwrap_err();
    assert!(
        matches!(e, VqError::InvalidConfig(ref s) if s.contains("z_channels")),
        "{e}"
    );
    // A partial section keeps the real defaults of the other fields.
    let c = MagvitConfig::from_json(r#"{"decoder": {"ch": 64}}"#, p).unwrap();
    assert_eq!(c.decoder.ch_mult, vec![1, 1, 2, 2, 4]);
    assert_eq!(c.encoder, MagvitConfig::real().encoder);
}

/// Per-level attention (`attn_resolutions` reached) creates `down.{i}.attn.{b}` /
/// `up.{i}.attn.{b}` after every block of that level, like upstream.
#[test]
fn per_level_attention_follows_attn_resolutions() {
    let cfg = MagvitConfig::from_json(
        r#"{"encoder": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": [2, 1], "attn_resolutions": [16], "resolution": 32},
            "decoder": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": [1, 2], "attn_resolutions": [16], "resolution": 32}}"#,
        Path::new("config.json"),
    )
    .unwrap();
    let dev = Default::default();
    let model = MagvitV2::<Cpu>::random(&cfg, 7, &dev).unwrap();
    let names: Vec<String> = model
        .state_dict_layout()
        .into_iter()
        .map(|e| e.name)
        .collect();
    let attn: Vec<&String> = names
        .iter()
        .filter(|n| n.contains(".attn.") && n.ends_with(".q.weight"))
        .collect();
    assert_eq!(
        attn,
        vec![
            "encoder.down.1.attn.0.q.weight",
            "decoder.up.1.attn.0.q.weight",
            "decoder.up.1.attn.1.q.weight"
        ]
    );
    let pixels = burn::tensor::Tensor::<Cpu, 4>::zeros([1, 3, 32, 32], &dev);
    let (codes, grid) = model.encode_with_grid(pixels).unwrap();
    assert_eq!(grid, mmada_vq::Grid::new(16, 16));
    assert!(host_int(&codes).iter().all(|&c| (0..8192).contains(&c)));
    let out = model.decode(codes, grid).unwrap();
    assert_eq!(out.dims(), [1, 3, 32, 32]);
}
