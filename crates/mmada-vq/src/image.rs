//! Conversions between pixel tensors in `[-1, 1]` and 8-bit RGB images.
//!
//! * Tensor → image: MMaDA `inference_t2i.py` / `app.py`:
//!   `clamp((x + 1) / 2, 0, 1) · 255` in float32, permuted to `[B, H, W, 3]`, then numpy
//!   `astype(uint8)`, which **truncates** (no rounding).
//! * Image → tensor: torchvision `ToTensor` (`u8 / 255` in float32) then
//!   `Normalize(0.5, 0.5)` (`(v − 0.5) / 0.5`), as in Show-o `training/utils.py`
//!   `image_transform` after its resize / crop (resizing and cropping live in the data crate).

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::error::VqError;

pub use image::RgbImage;

/// The upstream truncating conversion of one value: `clamp((x + 1) / 2, 0, 1) · 255` as u8.
#[inline]
pub fn pixel_to_u8(x: f32) -> u8 {
    // `as` truncates toward zero (numpy `astype(uint8)` on values in [0, 255]); NaN → 0.
    (((x + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0) as u8
}

/// Pixels `[B, 3, H, W]` → `B·H·W·3` bytes in `[B, H, W, 3]` order (upstream
/// `image_uint8`), and the shape `[B, H, W, 3]`.
///
/// # Errors
/// [`VqError::BadInput`] unless there are 3 channels.
pub fn pixels_to_u8<B: Backend>(pixels: Tensor<B, 4>) -> Result<(Vec<u8>, [usize; 4]), VqError> {
    let [b, c, h, w] = pixels.dims();
    if c != 3 {
        return Err(VqError::BadInput {
            what: "pixels",
            reason: format!("shape {:?} must be [B, 3, H, W]", [b, c, h, w]),
        });
    }
    let data = pixels.permute([0, 2, 3, 1]).into_data();
    let bytes = data.iter::<f32>().map(pixel_to_u8).collect();
    Ok((bytes, [b, h, w, 3]))
}

/// Pixels `[B, 3, H, W]` → one [`RgbImage`] (`W × H`) per batch row, with the upstream
/// truncating conversion ([`pixel_to_u8`]).
///
/// # Errors
/// [`VqError::BadInput`] unless there are 3 channels.
pub fn pixels_to_images<B: Backend>(pixels: Tensor<B, 4>) -> Result<Vec<RgbImage>, VqError> {
    let (bytes, [b, h, w, _]) = pixels_to_u8(pixels)?;
    let per = h * w * 3;
    Ok((0..b)
        .map(|i| {
            RgbImage::from_raw(w as u32, h as u32, bytes[i * per..(i + 1) * per].to_vec())
                .expect("buffer size matches")
        })
        .collect())
}

/// Same-size RGB images → pixels `[B, 3, H, W]` in `[-1, 1]`
/// (`(u8 / 255 − 0.5) / 0.5`, float32, as torchvision `ToTensor` + `Normalize`).
///
/// # Errors
/// [`VqError::BadInput`] for an empty list or images of different sizes.
pub fn images_to_pixels<B: Backend>(
    images: &[RgbImage],
    device: &B::Device,
) -> Result<Tensor<B, 4>, VqError> {
    let Some(first) = images.first() else {
        return Err(VqError::BadInput {
            what: "images",
            reason: "no images".into(),
        });
    };
    let (w, h) = first.dimensions();
    let (w, h) = (w as usize, h as usize);
    let mut out = vec![0f32; images.len() * 3 * h * w];
    for (i, img) in images.iter().enumerate() {
        if img.dimensions() != first.dimensions() {
            return Err(VqError::BadInput {
                what: "images",
                reason: format!(
                    "image {i} is {}×{} but image 0 is {w}×{h}; resize/crop them to one size first",
                    img.width(),
                    img.height()
                ),
            });
        }
        for (x, y, p) in img.enumerate_pixels() {
            for c in 0..3 {
                let v = p.0[c] as f32 / 255.0;
                out[((i * 3 + c) * h + y as usize) * w + x as usize] = (v - 0.5) / 0.5;
            }
        }
    }
    Ok(Tensor::from_data(
        TensorData::new(out, [images.len(), 3, h, w]),
        device,
    ))
}
