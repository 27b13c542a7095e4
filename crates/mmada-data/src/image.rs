//! Images: decoding, the upstream preprocessing (Pillow-exact bicubic resize, shorter-side
//! resize + centre crop, the "squash" variant, normalisation to `[-1, 1]`), and the
//! [`ImageCoder`] trait that turns pixels into image-tokenizer codes.
//!
//! Upstream (Show-o `training/utils.py`, identical in MMaDA `training/utils.py`, `app.py`,
//! `training/data.py`):
//!
//! ```python
//! def image_transform(image, resolution=256, normalize=True):
//!     image = transforms.Resize(resolution, interpolation=InterpolationMode.BICUBIC)(image)
//!     image = transforms.CenterCrop((resolution, resolution))(image)
//!     image = transforms.ToTensor()(image)
//!     image = transforms.Normalize(mean=[0.5]*3, std=[0.5]*3)(image)
//! def image_transform_squash(image, resolution=256, normalize=True):
//!     image = transforms.Resize((resolution, resolution), interpolation=BICUBIC)(image)
//!     ...
//! ```
//!
//! torchvision's `Resize` on a PIL image calls Pillow `Image.resize(.., BICUBIC)`; this
//! module ports Pillow's `libImaging/Resample.c` fixed-point algorithm so the resized
//! pixels are bit-identical (fixture `magvitv2/preprocess`). JPEG decoding itself goes
//! through the `image` crate (zune-jpeg), which may differ from libjpeg-turbo by a few
//! levels on some pixels; the resize/crop/normalise steps are exact given the same RGB.

use std::path::Path;

pub use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// Decodes jpeg / png / webp bytes to 8-bit RGB (Pillow `Image.open(..).convert("RGB")`:
/// grey is replicated, alpha is dropped without compositing).
///
/// # Errors
/// [`DataError::ImageDecode`] when the format is unknown or the data is corrupt.
pub fn decode_image(bytes: &[u8]) -> Result<RgbImage> {
    let img = image::load_from_memory(bytes).map_err(|e| DataError::ImageDecode {
        image: "<bytes>".into(),
        message: e.to_string(),
    })?;
    Ok(img.to_rgb8())
}

/// Reads and decodes an image file (see [`decode_image`]).
///
/// # Errors
/// [`DataError::Io`] when the file cannot be read, [`DataError::ImageDecode`] when it
/// does not decode.
pub fn open_image(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        context: "image".into(),
        path: path.to_path_buf(),
        source,
    })?;
    decode_image(&bytes).map_err(|e| match e {
        DataError::ImageDecode { message, .. } => DataError::ImageDecode {
            image: path.display().to_string(),
            message,
        },
        other => other,
    })
}

// ------------------------------------------------------------ Pillow bicubic resample

/// Fixed-point precision of Pillow's 8-bit resampling (`PRECISION_BITS = 32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;

/// Pillow `bicubic_filter` with `a = -0.5` (`Resample.c`), support 2.
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output pixel: first input index and the quantised weights.
struct Coeffs {
    ksize: usize,
    /// `(xmin, count)` per output index.
    bounds: Vec<(usize, usize)>,
    /// `out_size · ksize` fixed-point weights.
    kk: Vec<i64>,
}

/// Pillow `precompute_coeffs` (box = the whole input) followed by `normalize_coeffs_8bpc`:
/// `scale = in/out`, `filterscale = max(scale, 1)` (antialiasing on downscale), support
/// `2·filterscale`, centre `(i + 0.5)·scale`, taps `[int(c − s + 0.5), int(c + s + 0.5))`
/// clipped to the input, weights `k((x − c + 0.5)/filterscale)` normalised to sum 1, then
/// `(int)(±0.5 + w·2²²)` (rounding half away from zero, C truncation).
fn precompute_coeffs(in_size: usize, out_size: usize) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut kk = vec![0i64; out_size * ksize];
    let mut w = vec![0f64; ksize];
    let ss = 1.0 / filterscale;
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C `(int)` truncates toward zero; values can be negative before the clip.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64).max(0) as usize;
        let n = xmax.saturating_sub(xmin).min(ksize);
        let mut ww = 0.0;
        for (x, wx) in w.iter_mut().enumerate().take(n) {
            let v = bicubic_filter((x as f64 + xmin as f64 - center + 0.5) * ss);
            *wx = v;
            ww += v;
        }
        let k = &mut kk[xx * ksize..(xx + 1) * ksize];
        for x in 0..n {
            let v = if ww != 0.0 { w[x] / ww } else { w[x] };
            let f = v * f64::from(1u32 << PRECISION_BITS);
            k[x] = if v < 0.0 {
                (-0.5 + f) as i32 as i64
            } else {
                (0.5 + f) as i32 as i64
            };
        }
        bounds.push((xmin, n));
    }
    Coeffs { ksize, bounds, kk }
}

/// Pillow `clip8`: `acc >> 22` clamped to `[0, 255]`.
#[inline]
fn clip8(acc: i64) -> u8 {
    if acc >= (1i64 << PRECISION_BITS << 8) {
        255
    } else if acc <= 0 {
        0
    } else {
        (acc >> PRECISION_BITS) as u8
    }
}

/// Pillow `Image.resize((width, height), Image.BICUBIC)` on an RGB image, bit-exact:
/// `ImagingResampleInner` with the bicubic filter (`a = −0.5`, antialiased when
/// downscaling), horizontal pass first into an 8-bit intermediate, then the vertical pass;
/// accumulators start at `2²¹` and end with `clip8(acc >> 22)`. An unchanged axis is not
/// resampled; an unchanged size returns a copy (as Pillow).
///
/// # Errors
/// [`DataError::ImagePreprocess`] when a size is zero.
pub fn resize_bicubic(img: &RgbImage, width: u32, height: u32) -> Result<RgbImage> {
    let (in_w, in_h) = img.dimensions();
    if width == 0 || height == 0 || in_w == 0 || in_h == 0 {
        return Err(DataError::ImagePreprocess(format!(
            "cannot resize {in_w}x{in_h} to {width}x{height}"
        )));
    }
    let (in_w, in_h, out_w, out_h) = (
        in_w as usize,
        in_h as usize,
        width as usize,
        height as usize,
    );
    let src = img.as_raw();
    // Horizontal pass (`ImagingResampleHorizontal_8bpc`) over every input row.
    let tmp: Vec<u8> = if out_w != in_w {
        let c = precompute_coeffs(in_w, out_w);
        let mut out = vec![0u8; in_h * out_w * 3];
        for y in 0..in_h {
            let row = &src[y * in_w * 3..(y + 1) * in_w * 3];
            for xx in 0..out_w {
                let (xmin, n) = c.bounds[xx];
                let k = &c.kk[xx * c.ksize..xx * c.ksize + n];
                let mut acc = [1i64 << (PRECISION_BITS - 1); 3];
                for (x, &kx) in k.iter().enumerate() {
                    let p = &row[(xmin + x) * 3..(xmin + x) * 3 + 3];
                    for ch in 0..3 {
                        acc[ch] += i64::from(p[ch]) * kx;
                    }
                }
                let o = (y * out_w + xx) * 3;
                for ch in 0..3 {
                    out[o + ch] = clip8(acc[ch]);
                }
            }
        }
        out
    } else {
        src.clone()
    };
    // Vertical pass (`ImagingResampleVertical_8bpc`).
    let out: Vec<u8> = if out_h != in_h {
        let c = precompute_coeffs(in_h, out_h);
        let mut out = vec![0u8; out_h * out_w * 3];
        for yy in 0..out_h {
            let (ymin, n) = c.bounds[yy];
            let k = &c.kk[yy * c.ksize..yy * c.ksize + n];
            for xx in 0..out_w {
                let mut acc = [1i64 << (PRECISION_BITS - 1); 3];
                for (y, &ky) in k.iter().enumerate() {
                    let o = ((ymin + y) * out_w + xx) * 3;
                    for ch in 0..3 {
                        acc[ch] += i64::from(tmp[o + ch]) * ky;
                    }
                }
                let o = (yy * out_w + xx) * 3;
                for ch in 0..3 {
                    out[o + ch] = clip8(acc[ch]);
                }
            }
        }
        out
    } else {
        tmp
    };
    RgbImage::from_raw(width, height, out)
        .ok_or_else(|| DataError::ImagePreprocess("resize buffer size mismatch".into()))
}

// ------------------------------------------------------------ upstream transforms

/// How an image is brought to `R × R`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    /// `image_transform`: shorter side → `R` (bicubic), centre crop `R × R`.
    #[default]
    CenterCrop,
    /// `image_transform_squash`: bicubic straight to `R × R` (aspect ratio not kept);
    /// MMaDA `inference_mmu.py` uses it for ai2d / clevr / docvqa / geo / llava images.
    Squash,
}

/// Preprocessing settings (part of the code-cache key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preprocess {
    /// Output side `R` (256 in stages 1.1/1.2, 512 from stage 1.3 on).
    pub resolution: u32,
    /// Crop or squash.
    #[serde(default)]
    pub mode: ResizeMode,
}

impl Default for Preprocess {
    fn default() -> Self {
        Self {
            resolution: 512,
            mode: ResizeMode::CenterCrop,
        }
    }
}

/// torchvision `_compute_resized_output_size` for `Resize(R)`: the shorter side becomes
/// `R`, the longer `int(R · long / short)` (float64 division, truncated). Returns
/// `(width, height)`.
pub fn shorter_side_size(width: u32, height: u32, resolution: u32) -> (u32, u32) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    let new_long = if short == 0 {
        0
    } else {
        (f64::from(resolution) * f64::from(long) / f64::from(short)) as u32
    };
    if width <= height {
        (resolution, new_long)
    } else {
        (new_long, resolution)
    }
}

/// torchvision `CenterCrop` offset: `int(round((size − crop) / 2))` with Python's
/// round-half-to-even (`round(36.5) = 36`).
pub fn center_crop_offset(size: u32, crop: u32) -> u32 {
    let d = size.saturating_sub(crop);
    let h = d / 2;
    if d % 2 == 1 && h % 2 == 1 { h + 1 } else { h }
}

/// Resize with the shorter side to `resolution` (torchvision `Resize(R, BICUBIC)` on a PIL
/// image = [`resize_bicubic`] to [`shorter_side_size`]).
///
/// # Errors
/// [`DataError::ImagePreprocess`] for an empty image or `resolution == 0`.
pub fn resize_shorter_side(img: &RgbImage, resolution: u32) -> Result<RgbImage> {
    let (w, h) = shorter_side_size(img.width(), img.height(), resolution);
    resize_bicubic(img, w, h)
}

/// Crops the centre `size × size` window ([`center_crop_offset`] on both axes).
///
/// # Errors
/// [`DataError::ImagePreprocess`] when the image is smaller than `size` (torchvision
/// would pad; the upstream transforms never need it after [`resize_shorter_side`]).
pub fn center_crop(img: &RgbImage, size: u32) -> Result<RgbImage> {
    let (w, h) = img.dimensions();
    if w < size || h < size {
        return Err(DataError::ImagePreprocess(format!(
            "cannot centre-crop {w}x{h} to {size}x{size}"
        )));
    }
    let left = center_crop_offset(w, size);
    let top = center_crop_offset(h, size);
    Ok(image::imageops::crop_imm(img, left, top, size, size).to_image())
}

/// The upstream pixel preprocessing up to uint8: `image_transform` (shorter side →
/// `R`, centre crop) or `image_transform_squash` (straight to `R × R`).
///
/// # Errors
/// [`DataError::ImagePreprocess`] for an empty image or `resolution == 0`.
pub fn preprocess_u8(img: &RgbImage, p: &Preprocess) -> Result<RgbImage> {
    match p.mode {
        ResizeMode::CenterCrop => {
            center_crop(&resize_shorter_side(img, p.resolution)?, p.resolution)
        }
        ResizeMode::Squash => resize_bicubic(img, p.resolution, p.resolution),
    }
}

/// A host image tensor `[3, H, W]` (CHW, float32) in `[-1, 1]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Pixels {
    /// `3·H·W` values, channel-major.
    pub data: Vec<f32>,
    /// `[3, H, W]`.
    pub shape: [usize; 3],
}

/// torchvision `ToTensor` + `Normalize(0.5, 0.5)`: `(u8 / 255 − 0.5) / 0.5` in float32,
/// HWC → CHW.
pub fn normalize(img: &RgbImage) -> Pixels {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let raw = img.as_raw();
    let mut data = vec![0f32; 3 * h * w];
    for (i, px) in raw.chunks_exact(3).enumerate() {
        for (c, &v) in px.iter().enumerate() {
            data[c * h * w + i] = (f32::from(v) / 255.0 - 0.5) / 0.5;
        }
    }
    Pixels {
        data,
        shape: [3, h, w],
    }
}

/// [`preprocess_u8`] then [`normalize`]: the upstream `image_transform` /
/// `image_transform_squash` output `[3, R, R]`.
///
/// # Errors
/// See [`preprocess_u8`].
pub fn image_transform(img: &RgbImage, p: &Preprocess) -> Result<Pixels> {
    Ok(normalize(&preprocess_u8(img, p)?))
}

// ------------------------------------------------------------ image → codes

/// An image tokenizer: `[3, R, R]` pixels in `[-1, 1]` → codebook indices (row-major over
/// the latent grid). Implemented over `mmada-vq`'s MAGVIT-v2 by the crates that may depend
/// on it (see the charter in `crates/README.md`); the data pipeline only sees this trait.
pub trait ImageCoder {
    /// A stable identifier of the coder and its weights (part of the code-cache key), e.g.
    /// `magvitv2:<weights hash>`.
    fn id(&self) -> String;

    /// Encodes same-size images; returns one code list per image.
    ///
    /// # Errors
    /// Any error of the underlying tokenizer, boxed.
    fn encode(
        &self,
        images: &[Pixels],
    ) -> std::result::Result<Vec<Vec<u32>>, Box<dyn std::error::Error + Send + Sync>>;
}
