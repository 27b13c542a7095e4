//! Image preprocessing: Pillow-exact bicubic resize, centre crop, squash and
//! normalisation against `tests/fixtures/magvitv2/preprocess`; decoding; the code cache and
//! [`ImageTokenizer`] with a fake coder; real images from `../shared/data`.

mod common;

use std::cell::Cell;
use std::path::PathBuf;

use mmada_data::codes::{CodeCache, cache_key};
use mmada_data::image::{
    RgbImage, center_crop, center_crop_offset, decode_image, image_transform, normalize,
    open_image, preprocess_u8, resize_bicubic, resize_shorter_side, shorter_side_size,
};
use mmada_data::{
    DataError, Example, ImageCoder, ImageRef, ImageTokenizer, Pixels, Preprocess, ResizeMode,
};

fn preprocess_dir() -> PathBuf {
    common::fixtures().join("magvitv2/preprocess")
}

struct Tensors(Vec<u8>);

impl Tensors {
    fn open() -> Self {
        let p = preprocess_dir().join("tensors.safetensors");
        Tensors(std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
    }
    fn get(&self, name: &str) -> (Vec<usize>, Vec<u8>) {
        let st = safetensors::SafeTensors::deserialize(&self.0).expect("fixture");
        let t = st.tensor(name).expect(name);
        (t.shape().to_vec(), t.data().to_vec())
    }
    fn rgb(&self, name: &str) -> RgbImage {
        let (shape, data) = self.get(name);
        assert_eq!(shape.len(), 3, "{name}");
        assert_eq!(shape[2], 3, "{name}");
        RgbImage::from_raw(shape[1] as u32, shape[0] as u32, data).expect("rgb")
    }
    fn f32s(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let (shape, data) = self.get(name);
        let v = data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        (shape, v)
    }
}

/// (max |diff|, number of differing values).
fn diff_u8(a: &RgbImage, b: &RgbImage) -> (u8, usize) {
    assert_eq!(a.dimensions(), b.dimensions());
    let mut max = 0;
    let mut n = 0;
    for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
        let d = x.abs_diff(*y);
        max = max.max(d);
        n += usize::from(d > 0);
    }
    (max, n)
}

fn meta_resolution() -> u32 {
    // `image_transform(.., resolution=64)`: the cropped tensor's side.
    let t = Tensors::open();
    t.get("cropped_uint8").0[0] as u32
}

#[test]
fn pillow_bicubic_parity_shorter_side_crop_and_squash() {
    let t = Tensors::open();
    let r = meta_resolution();
    assert_eq!(r, 64);
    let decoded = t.rgb("decoded_rgb_uint8");
    assert_eq!(decoded.dimensions(), (191, 89));

    // Resize shorter side: long side int(64·191/89) = 137.
    assert_eq!(shorter_side_size(191, 89, r), (137, 64));
    let resized = resize_shorter_side(&decoded, r).unwrap();
    let want = t.rgb("resized_uint8");
    assert_eq!(resized.dimensions(), want.dimensions());
    assert_eq!(diff_u8(&resized, &want), (0, 0), "resized_uint8");
    assert!(resized.as_raw() == want.as_raw());

    // Centre crop at left = round_half_even(36.5) = 36, top 0.
    assert_eq!(center_crop_offset(137, 64), 36);
    let cropped = center_crop(&resized, r).unwrap();
    let want = t.rgb("cropped_uint8");
    assert!(cropped.as_raw() == want.as_raw(), "cropped_uint8");
    let p = Preprocess {
        resolution: r,
        mode: ResizeMode::CenterCrop,
    };
    assert!(preprocess_u8(&decoded, &p).unwrap().as_raw() == want.as_raw());

    // Normalised tensor, bit-exact.
    let (shape, want) = t.f32s("image_transform");
    let px = image_transform(&decoded, &p).unwrap();
    assert_eq!(px.shape.to_vec(), shape);
    assert_eq!(px.data.len(), want.len());
    for (i, (a, b)) in px.data.iter().zip(&want).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "image_transform[{i}]: {a} vs {b}");
    }

    // Squash: bicubic straight to 64×64.
    let sq = Preprocess {
        resolution: r,
        mode: ResizeMode::Squash,
    };
    let squashed = preprocess_u8(&decoded, &sq).unwrap();
    let want = t.rgb("squash_resized_uint8");
    assert_eq!(diff_u8(&squashed, &want), (0, 0), "squash_resized_uint8");
    let (_, want) = t.f32s("image_transform_squash");
    let px = image_transform(&decoded, &sq).unwrap();
    assert!(
        px.data
            .iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
}

#[test]
fn jpeg_decode_close_to_libjpeg_turbo() {
    // The fixture's JPEG through the `image` crate vs Pillow/libjpeg-turbo: the decoders
    // may round differently, so only a small difference is allowed. The measured numbers
    // are printed for the report.
    let t = Tensors::open();
    let (_, jpeg) = t.get("jpeg_bytes");
    let ours = decode_image(&jpeg).unwrap();
    let want = t.rgb("decoded_rgb_uint8");
    let (max, n) = diff_u8(&ours, &want);
    eprintln!(
        "jpeg decode vs Pillow: max |diff| {max}, {n}/{} values differ",
        want.as_raw().len()
    );
    assert!(max <= 8, "max diff {max}");
    assert!((n as f64) < 0.2 * want.as_raw().len() as f64);
}

#[test]
fn resize_edge_cases() {
    // Same size: a copy.
    let img = RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 40, y as u8 * 70, 7]));
    assert_eq!(resize_bicubic(&img, 5, 3).unwrap(), img);
    // A constant image stays constant under any resize (weights sum to 1 in fixed point).
    let flat = RgbImage::from_pixel(37, 23, image::Rgb([200, 13, 255]));
    for (w, h) in [(1, 1), (10, 50), (100, 7), (37, 5)] {
        let r = resize_bicubic(&flat, w, h).unwrap();
        assert_eq!(r.dimensions(), (w, h));
        assert!(r.pixels().all(|p| p.0 == [200, 13, 255]), "{w}x{h}");
    }
    // Zero sizes are errors, not panics.
    assert!(matches!(
        resize_bicubic(&flat, 0, 4),
        Err(DataError::ImagePreprocess(_))
    ));
    assert!(matches!(
        center_crop(&flat, 30),
        Err(DataError::ImagePreprocess(_))
    ));
    // Round-half-to-even offsets: 73/2 = 36.5 → 36, 75/2 = 37.5 → 38, 74/2 = 37.
    assert_eq!(center_crop_offset(137, 64), 36);
    assert_eq!(center_crop_offset(139, 64), 38);
    assert_eq!(center_crop_offset(138, 64), 37);
    assert_eq!(center_crop_offset(64, 64), 0);
    // Long side truncated: int(256·640/427) = 383 (383.7…), portrait keeps orientation.
    assert_eq!(shorter_side_size(640, 427, 256), (383, 256));
    assert_eq!(shorter_side_size(427, 640, 256), (256, 383));
    // Normalisation: 0 → −1, 255 → 1, 128 → 0.00392157 (float32 of (128/255 − 0.5)/0.5).
    let px = normalize(&RgbImage::from_raw(1, 1, vec![0, 255, 128]).unwrap());
    assert_eq!(px.shape, [3, 1, 1]);
    assert_eq!(px.data, vec![-1.0, 1.0, (128f32 / 255.0 - 0.5) / 0.5]);
}

#[test]
fn undecodable_bytes_are_an_error() {
    assert!(matches!(
        decode_image(b"not an image"),
        Err(DataError::ImageDecode { .. })
    ));
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("broken.png");
    std::fs::write(&p, b"\x89PNG\r\n\x1a\nbroken").unwrap();
    let e = open_image(&p).unwrap_err();
    assert!(e.to_string().contains("broken.png"), "{e}");
    assert!(matches!(
        open_image(&dir.path().join("missing.jpg")),
        Err(DataError::Io { .. })
    ));
}

/// A coder that returns, per image, the first 4 quantised pixel values and counts calls.
struct FakeCoder {
    calls: Cell<usize>,
    images: Cell<usize>,
}

impl ImageCoder for FakeCoder {
    fn id(&self) -> String {
        "fake:v1".into()
    }
    fn encode(
        &self,
        images: &[Pixels],
    ) -> Result<Vec<Vec<u32>>, Box<dyn std::error::Error + Send + Sync>> {
        self.calls.set(self.calls.get() + 1);
        self.images.set(self.images.get() + images.len());
        Ok(images
            .iter()
            .map(|p| {
                assert_eq!(p.shape, [3, 16, 16]);
                p.data[..4]
                    .iter()
                    .map(|v| ((v + 1.0) * 100.0) as u32)
                    .collect()
            })
            .collect())
    }
}

fn png_bytes(img: &RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(vec![]);
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[test]
fn image_tokenizer_with_cache() {
    let dir = tempfile::tempdir().unwrap();
    let a = RgbImage::from_pixel(40, 20, image::Rgb([255, 0, 0]));
    let b = RgbImage::from_pixel(20, 40, image::Rgb([0, 0, 0]));
    let pa = dir.path().join("a.png");
    a.save(&pa).unwrap();
    let p = Preprocess {
        resolution: 16,
        mode: ResizeMode::CenterCrop,
    };
    let coder = FakeCoder {
        calls: Cell::new(0),
        images: Cell::new(0),
    };
    let cache = CodeCache::open(&dir.path().join("cache")).unwrap();
    let mut tok = ImageTokenizer::new(coder, p).with_cache(cache.clone());
    let mk = |image| Example {
        image: Some(image),
        ..Default::default()
    };
    let mut exs = vec![
        mk(ImageRef::Path(pa.clone())),
        mk(ImageRef::Bytes(png_bytes(&b))),
        mk(ImageRef::Codes(vec![9, 9])),
        Example::default(),
    ];
    tok.tokenize(&mut exs).unwrap();
    // Red = (1, −1, −1, 1…) in CHW: the first 4 values are channel R → 2·100 = 200.
    assert_eq!(exs[0].image, Some(ImageRef::Codes(vec![200; 4])));
    assert_eq!(exs[1].image, Some(ImageRef::Codes(vec![0; 4])));
    assert_eq!(exs[2].image, Some(ImageRef::Codes(vec![9, 9])));
    assert_eq!(exs[3].image, None);
    assert_eq!(tok.coder().calls.get(), 1, "one batched coder call");
    assert_eq!(tok.stats().encoded, 2);
    assert_eq!(tok.stats().untouched, 2);
    // Second epoch: everything from the cache, no coder call.
    let mut again = vec![mk(ImageRef::Path(pa.clone()))];
    tok.tokenize(&mut again).unwrap();
    assert_eq!(again[0].image, Some(ImageRef::Codes(vec![200; 4])));
    assert_eq!(tok.coder().calls.get(), 1);
    assert_eq!(tok.stats().cache_hits, 1);
    // The key depends on settings and coder: other settings miss.
    let bytes = std::fs::read(&pa).unwrap();
    let k1 = cache_key(&bytes, &p, "fake:v1");
    assert_eq!(k1.len(), 32);
    assert_eq!(cache.get(&k1), Some(vec![200; 4]));
    let sq = Preprocess {
        mode: ResizeMode::Squash,
        ..p
    };
    assert_ne!(k1, cache_key(&bytes, &sq, "fake:v1"));
    assert_ne!(k1, cache_key(&bytes, &p, "fake:v2"));
    assert_eq!(cache.get(&cache_key(&bytes, &sq, "fake:v1")), None);
    // A corrupt entry is a miss.
    std::fs::write(
        cache.dir().join(format!("{k1}.codes")),
        b"MMCODES1\x05\0\0\0",
    )
    .unwrap();
    assert_eq!(cache.get(&k1), None);

    // An unreadable image names the example's location and the image.
    let mut bad = vec![Example {
        image: Some(ImageRef::Bytes(b"garbage".to_vec())),
        source: mmada_data::Location {
            manifest: "m".into(),
            file: "f.jsonl".into(),
            row: 3,
            unit: "line",
        },
        ..Default::default()
    }];
    let e = tok.tokenize(&mut bad).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, DataError::Image { .. }), "{msg}");
    assert!(
        msg.contains("line 3") && msg.contains("image_bytes"),
        "{msg}"
    );
}

#[test]
fn real_images_from_shared_data() {
    let Some(data) = common::shared_data() else {
        return;
    };
    let dir = data.join("mmada/mmu_validation");
    for (name, mode) in [
        ("geo.jpg", ResizeMode::Squash),
        ("dog.png", ResizeMode::CenterCrop),
        ("sofa_under_water.jpg", ResizeMode::CenterCrop),
    ] {
        let img = open_image(&dir.join(name)).unwrap();
        let p = Preprocess {
            resolution: 256,
            mode,
        };
        let px = image_transform(&img, &p).unwrap();
        assert_eq!(px.shape, [3, 256, 256], "{name}");
        assert!(px.data.iter().all(|v| (-1.0..=1.0).contains(v)), "{name}");
        let spread = px
            .data
            .iter()
            .fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        assert!(spread.1 - spread.0 > 0.5, "{name}: {spread:?}");
    }
    // geo.jpg is the fixture's source image: same bytes.
    let (_, jpeg) = Tensors::open().get("jpeg_bytes");
    assert_eq!(std::fs::read(dir.join("geo.jpg")).unwrap(), jpeg);
}
