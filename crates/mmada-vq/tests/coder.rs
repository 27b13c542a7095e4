//! The production MAGVIT-v2 [`ImageCoder`] adapter ([`mmada_vq::VqCoder`], feature `data`)
//! end to end: image → preprocessing → codes against the fixture `magvitv2/encode` (its
//! `image1` is a synthetic gradient we can regenerate exactly), a real image into an mmu
//! row, decoding back to images, the checkpoint id and local-folder resolution.
//! (Moved from `mmada-data/tests/vq_coder.rs`, which carried a test-only copy of the adapter.)

mod common;

use std::path::PathBuf;

use mmada_data::image::{RgbImage, image_transform, open_image};
use mmada_data::{
    Example, ImageCoder, ImageRef, ImageTokenizer, Preprocess, ResizeMode, TextTokenizer,
};
use mmada_vq::{Grid, VqCoder, resolve_checkpoint};

type Cpu = burn::backend::Flex;

fn weights_dir() -> PathBuf {
    common::magvit_root().join("weights")
}

fn coder() -> VqCoder<Cpu> {
    VqCoder::load(weights_dir().to_str().unwrap(), &Default::default())
        .expect("tiny MAGVIT-v2 weights")
}

/// `../shared/data` when present (`CI=true` makes its absence a failure).
fn shared_data() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
    if p.is_dir() {
        return Some(p);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true and the shared data folder {} is missing",
        p.display()
    );
    eprintln!("SKIP: shared data folder {} not found", p.display());
    None
}

struct Fx(Vec<u8>);

impl Fx {
    fn open() -> Self {
        let p = common::magvit_root().join("encode/tensors.safetensors");
        Fx(std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
    }
    fn raw(&self, name: &str) -> (Vec<usize>, Vec<u8>) {
        let st = safetensors::SafeTensors::deserialize(&self.0).unwrap();
        let t = st.tensor(name).unwrap();
        (t.shape().to_vec(), t.data().to_vec())
    }
    fn f32s(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let (s, d) = self.raw(name);
        (
            s,
            d.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        )
    }
    fn i64s(&self, name: &str) -> (Vec<usize>, Vec<i64>) {
        let (s, d) = self.raw(name);
        (
            s,
            d.chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        )
    }
}

/// The fixture's `image1`: 192×144, `R=(x·255)//(W−1)`, `G=(y·255)//(H−1)`,
/// `B=((x+y)·255)//(W+H−2)`.
fn gradient() -> RgbImage {
    let (w, h) = (192u32, 144u32);
    RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 255 / (w - 1)) as u8,
            (y * 255 / (h - 1)) as u8,
            ((x + y) * 255 / (w + h - 2)) as u8,
        ])
    })
}

#[test]
fn gradient_image_to_codes_matches_upstream() {
    let fx = Fx::open();
    let (shape, pv) = fx.f32s("pixel_values");
    assert_eq!(shape, vec![2, 3, 128, 128]);
    let p = Preprocess {
        resolution: 128,
        mode: ResizeMode::CenterCrop,
    };
    // Preprocessing: bit-exact with the upstream `image_transform` of image1.
    let ours = image_transform(&gradient(), &p).unwrap();
    let per = 3 * 128 * 128;
    let want = &pv[per..2 * per];
    let differing = ours
        .data
        .iter()
        .zip(want)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(differing, 0, "pixel_values[1] bit-exact");

    // Through the data pipeline: an example with PNG bytes becomes codes == fixture codes[1].
    let mut png = std::io::Cursor::new(vec![]);
    gradient()
        .write_to(&mut png, image::ImageFormat::Png)
        .unwrap();
    let mut exs = vec![Example {
        image: Some(ImageRef::Bytes(png.into_inner())),
        ..Default::default()
    }];
    let mut tok = ImageTokenizer::new(coder(), p);
    tok.tokenize(&mut exs).unwrap();
    let (cs, codes) = fx.i64s("codes");
    assert_eq!(cs, vec![2, 64]);
    let want: Vec<u32> = codes[64..].iter().map(|&c| c as u32).collect();
    assert_eq!(exs[0].image, Some(ImageRef::Codes(want)));
}

#[test]
fn sofa_jpeg_through_rust_decoder() {
    // image0 of the fixture is `mmu_validation/sofa_under_water.jpg`; our JPEG decoder is not
    // libjpeg-turbo, so pixels may differ by a level here and there. Report and bound it.
    let Some(data) = shared_data() else {
        return;
    };
    let fx = Fx::open();
    let (_, pv) = fx.f32s("pixel_values");
    let p = Preprocess {
        resolution: 128,
        mode: ResizeMode::CenterCrop,
    };
    let img = open_image(&data.join("mmada/mmu_validation/sofa_under_water.jpg")).unwrap();
    let ours = image_transform(&img, &p).unwrap();
    let per = 3 * 128 * 128;
    let (mut max, mut n) = (0f32, 0usize);
    for (a, b) in ours.data.iter().zip(&pv[..per]) {
        let d = (a - b).abs();
        max = max.max(d);
        n += usize::from(d > 0.0);
    }
    let levels = (max * 255.0 / 2.0).round();
    let codes = coder().encode(&[ours]).unwrap();
    let (_, want) = fx.i64s("codes");
    let same = codes[0]
        .iter()
        .zip(&want[..64])
        .filter(|(a, b)| i64::from(**a) == **b)
        .count();
    eprintln!(
        "sofa: pixel max |diff| {levels} levels, {n}/{per} values differ; codes {same}/64 equal"
    );
    assert!(levels <= 8.0, "{levels}");
    assert!(same >= 48, "{same}/64 codes equal");
}

#[test]
fn real_image_into_an_mmu_row() {
    // Issue 8 acceptance (data side): a real image from `mmu_validation` through the data
    // pipeline (decode → squash to 64 px → tiny MAGVIT-v2 → codes) into an mmu row.
    let Some(data) = shared_data() else {
        return;
    };
    let tok =
        TextTokenizer::from_file_with_mmada_tokens(&data.join("tokenizers/gpt2/tokenizer.json"))
            .expect("gpt2 tokenizer");
    let t = *tok.layout();
    let mut exs = vec![Example {
        task: Some(mmada_data::Task::Mmu),
        question: Some("What is in the picture?".into()),
        answer: Some("A dog.".into()),
        image: Some(ImageRef::Path(data.join("mmada/mmu_validation/dog.png"))),
        ..Default::default()
    }];
    let mut it = ImageTokenizer::new(
        coder(),
        Preprocess {
            resolution: 64,
            mode: ResizeMode::Squash,
        },
    );
    it.tokenize(&mut exs).unwrap();
    let Some(ImageRef::Codes(codes)) = &exs[0].image else {
        panic!("codes")
    };
    assert_eq!(codes.len(), 16, "64 px / 16 = 4×4 grid");
    assert!(codes.iter().all(|&c| c < 8192));
    let cfg = mmada_data::LayoutConfig {
        max_seq_length: 64,
        ..Default::default()
    };
    let s = mmada_data::layout_example(&exs[0], &tok, &cfg, false).unwrap();
    // [<|mmu|>, <|soi|>, 16 image tokens, <|eoi|>, text…]
    assert_eq!(s.ids[0], t.mmu_id);
    assert_eq!(s.ids[1], t.soi_id);
    let image_ids: Vec<u32> = codes.iter().map(|&c| t.image_token(c).unwrap()).collect();
    assert_eq!(&s.ids[2..18], image_ids.as_slice());
    assert_eq!(s.ids[18], t.eoi_id);
    assert_eq!(s.len(), 64 + 19);
}

#[test]
fn checkpoint_id_is_stable_and_decode_inverts_shapes() {
    let c = coder();
    let again = coder();
    assert_eq!(c.id(), again.id(), "same weights, same id");
    assert!(
        c.id().starts_with("magvitv2:") && c.id().len() == "magvitv2:".len() + 32,
        "{}",
        c.id()
    );
    // A copy with one changed weight byte gets another id (the cache never serves stale codes).
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(weights_dir().join(f), tmp.path().join(f)).unwrap();
    }
    let w = tmp.path().join("model.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 1; // one byte of tensor data
    std::fs::write(&w, &bytes).unwrap();
    let cfg = mmada_vq::MagvitConfig::from_dir(tmp.path()).unwrap();
    let id2 = mmada_vq::checkpoint_id(&cfg, &w).unwrap();
    assert_ne!(id2, c.id());
    // resolve_checkpoint: a folder is a folder; a missing path that is no repo id is an error.
    assert_eq!(
        resolve_checkpoint(weights_dir().to_str().unwrap()).unwrap(),
        weights_dir()
    );
    let err = resolve_checkpoint("/definitely/not/here").unwrap_err();
    assert!(err.to_string().contains("/definitely/not/here"), "{err}");
    // decode: 4×4 codes → a 64×64 image; re-encoding a decoded image is deterministic.
    let codes: Vec<u32> = (0..16).map(|i| (i * 509) % 8192).collect();
    let imgs = c
        .decode_codes(&[codes.clone(), codes], Grid::new(4, 4))
        .unwrap();
    assert_eq!(imgs.len(), 2);
    assert_eq!(imgs[0].dimensions(), (64, 64));
    assert_eq!(imgs[0], imgs[1]);
    let bad = c
        .decode_codes(&[vec![1, 2, 3]], Grid::new(4, 4))
        .unwrap_err();
    assert!(bad.to_string().contains("3 codes"), "{bad}");
}
