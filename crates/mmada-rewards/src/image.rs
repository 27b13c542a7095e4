//! Images in reward inputs and the built-in image rewards that need no model.
//!
//! * [`RewardImage`]: an RGB image attached to a [`RewardInput`] (the decoded completion of a
//!   text-to-image rollout, or the prompt image of an understanding task). In JSON (the `http`
//!   reward's request body) it is `{"width": w, "height": h, "png_base64": "…"}`: a PNG,
//!   base64-encoded (standard alphabet, padded), which CLIP / ImageReward servers decode with
//!   `PIL.Image.open(io.BytesIO(base64.b64decode(s)))` (see `scripts/reward_server.py`).
//! * `kind: image_color` ([`ImageColor`]): closeness of the image's mean colour to a target
//!   colour given in the params (or, with `measure: pixels`, the share of its pixels of that
//!   colour).
//! * `kind: caption_color` ([`ImageColor`] with the target read from the caption): the colour
//!   named in the prompt / caption ("a red square" → red).
//! * `kind: image_brightness` ([`ImageBrightness`]): closeness of the mean luma to a target.
//!
//! All three score in `[0, 1]` and return `None` for an item without an image (or, for
//! `caption_color`, without a colour word), so they mix with text rewards in one recipe.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::{Reward, RewardError, RewardInput};

/// An RGB image, 8 bits per channel, row-major (`rgb.len() == 3·width·height`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewardImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Interleaved `R G B` bytes, `[height, width, 3]` row-major.
    pub rgb: Vec<u8>,
}

impl RewardImage {
    /// An image from interleaved RGB bytes.
    ///
    /// # Errors
    /// [`RewardError::Config`] when `rgb.len() != 3·width·height` or a side is 0.
    pub fn new(width: u32, height: u32, rgb: Vec<u8>) -> Result<Self, RewardError> {
        if width == 0 || height == 0 || rgb.len() != 3 * width as usize * height as usize {
            return Err(RewardError::Config {
                key: "image".into(),
                message: format!(
                    "{} bytes do not make a {width}×{height} RGB image (need 3·w·h > 0)",
                    rgb.len()
                ),
            });
        }
        Ok(Self { width, height, rgb })
    }

    /// The mean of each channel over all pixels, `[R, G, B]` in `[0, 255]`.
    pub fn mean_rgb(&self) -> [f32; 3] {
        let mut s = [0f64; 3];
        for px in self.rgb.chunks_exact(3) {
            for c in 0..3 {
                s[c] += f64::from(px[c]);
            }
        }
        let n = (self.rgb.len() / 3).max(1) as f64;
        [(s[0] / n) as f32, (s[1] / n) as f32, (s[2] / n) as f32]
    }

    /// Mean luma in `[0, 1]` (ITU-R BT.601 weights `0.299 R + 0.587 G + 0.114 B`, the
    /// weights of PIL's `convert("L")`).
    pub fn mean_luma(&self) -> f32 {
        let [r, g, b] = self.mean_rgb();
        (0.299 * r + 0.587 * g + 0.114 * b) / 255.0
    }

    /// The image as PNG bytes.
    ///
    /// # Errors
    /// [`RewardError::Config`] when the encoder fails (it does not for a valid image).
    pub fn png(&self) -> Result<Vec<u8>, RewardError> {
        let mut out = std::io::Cursor::new(Vec::new());
        image::write_buffer_with_format(
            &mut out,
            &self.rgb,
            self.width,
            self.height,
            image::ExtendedColorType::Rgb8,
            image::ImageFormat::Png,
        )
        .map_err(|e| RewardError::Config {
            key: "image".into(),
            message: format!("PNG encoding failed: {e}"),
        })?;
        Ok(out.into_inner())
    }

    /// Decodes a PNG (or any format the `image` crate reads here: PNG, JPEG, WebP).
    ///
    /// # Errors
    /// [`RewardError::Config`] naming the decoder's message.
    pub fn from_png(bytes: &[u8]) -> Result<Self, RewardError> {
        let img = image::load_from_memory(bytes)
            .map_err(|e| RewardError::Config {
                key: "image.png_base64".into(),
                message: format!("not a decodable image: {e}"),
            })?
            .to_rgb8();
        let (w, h) = img.dimensions();
        Self::new(w, h, img.into_raw())
    }
}

#[derive(Serialize, Deserialize)]
struct ImageJson {
    width: u32,
    height: u32,
    png_base64: String,
}

impl Serialize for RewardImage {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let png = self.png().map_err(serde::ser::Error::custom)?;
        ImageJson {
            width: self.width,
            height: self.height,
            png_base64: base64::engine::general_purpose::STANDARD.encode(png),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for RewardImage {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let j = ImageJson::deserialize(d)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(j.png_base64.as_bytes())
            .map_err(serde::de::Error::custom)?;
        let img = RewardImage::from_png(&bytes).map_err(serde::de::Error::custom)?;
        if (img.width, img.height) != (j.width, j.height) {
            return Err(serde::de::Error::custom(format!(
                "image is {}×{} but width/height say {}×{}",
                img.width, img.height, j.width, j.height
            )));
        }
        Ok(img)
    }
}

/// The colour words `caption_color` recognises, with their sRGB values (CSS named colours;
/// `green` is CSS `lime`, the pure primary, as a solid-colour caption means it).
pub const NAMED_COLORS: &[(&str, [u8; 3])] = &[
    ("red", [255, 0, 0]),
    ("green", [0, 255, 0]),
    ("blue", [0, 0, 255]),
    ("yellow", [255, 255, 0]),
    ("cyan", [0, 255, 255]),
    ("magenta", [255, 0, 255]),
    ("white", [255, 255, 255]),
    ("black", [0, 0, 0]),
    ("gray", [128, 128, 128]),
    ("grey", [128, 128, 128]),
    ("orange", [255, 165, 0]),
    ("purple", [128, 0, 128]),
    ("pink", [255, 192, 203]),
    ("brown", [165, 42, 42]),
];

/// The sRGB value of a colour word of [`NAMED_COLORS`] (case-insensitive).
pub fn named_color(word: &str) -> Option<[u8; 3]> {
    let w = word.to_ascii_lowercase();
    NAMED_COLORS
        .iter()
        .find(|(n, _)| *n == w)
        .map(|(_, rgb)| *rgb)
}

/// The first colour word of [`NAMED_COLORS`] in `text` (whole words, case-insensitive).
pub fn color_in_text(text: &str) -> Option<[u8; 3]> {
    text.split(|c: char| !c.is_ascii_alphabetic())
        .find_map(named_color)
}

/// `1 − ‖mean_rgb − target‖₂ / (255·√3)`: 1 for an image whose mean colour is the target, 0
/// for the opposite corner of the RGB cube.
pub fn color_closeness(img: &RewardImage, target: [u8; 3]) -> f32 {
    let m = img.mean_rgb();
    let d2: f32 = (0..3).map(|c| (m[c] - f32::from(target[c])).powi(2)).sum();
    1.0 - d2.sqrt() / (255.0 * 3f32.sqrt())
}

/// Share of the pixels whose nearest colour of [`NAMED_COLORS`] (by Euclidean RGB distance,
/// the first on ties) is `target`'s nearest one: `1` for an image entirely of that colour,
/// `0` when none of its pixels are.
pub fn color_pixel_share(img: &RewardImage, target: [u8; 3]) -> f32 {
    let nearest = |p: [u8; 3]| -> usize {
        let d = |c: [u8; 3]| -> i32 {
            (0..3)
                .map(|k| (i32::from(p[k]) - i32::from(c[k])).pow(2))
                .sum()
        };
        (0..NAMED_COLORS.len())
            .min_by_key(|&i| d(NAMED_COLORS[i].1))
            .expect("named colours")
    };
    let want = nearest(target);
    let px = img.rgb.chunks_exact(3);
    let n = px.len().max(1);
    let hit = px.filter(|p| nearest([p[0], p[1], p[2]]) == want).count();
    hit as f32 / n as f32
}

/// How [`ImageColor`] compares an image with its target colour (`params.measure`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColorMeasure {
    /// [`color_closeness`] of the mean colour (default).
    #[default]
    Mean,
    /// [`color_pixel_share`]: the share of pixels nearest to the target's named colour.
    Pixels,
}

/// `params:` of `kind: image_color` and `kind: caption_color`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageColorParams {
    /// `mean` (default: closeness of the mean colour) or `pixels` (share of pixels of the
    /// target colour).
    #[serde(default)]
    pub measure: ColorMeasure,
    /// `image_color`: the target colour, a name of [`NAMED_COLORS`] (`red`) or `[r, g, b]`.
    #[serde(default)]
    pub target: Option<ColorSpec>,
    /// `caption_color`: the example field holding the caption (default: the `caption` field,
    /// else the prompt text).
    #[serde(default)]
    pub caption_field: Option<String>,
}

/// A colour in a recipe: a name or `[r, g, b]` (0–255).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ColorSpec {
    /// A colour name.
    Name(String),
    /// sRGB components.
    Rgb([u8; 3]),
}

/// Where [`ImageColor`] takes its target from.
#[derive(Debug, Clone, PartialEq)]
pub enum ColorTarget {
    /// A fixed colour (`image_color`).
    Fixed([u8; 3]),
    /// The colour word of the caption field (or the prompt when `None`) (`caption_color`).
    Caption(Option<String>),
}

/// `kind: image_color` / `kind: caption_color`: [`color_closeness`] of the item's image to
/// the target (or [`color_pixel_share`] with `measure: pixels`); `None` without an image (or
/// a colour word in the caption).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageColor {
    /// The target.
    pub target: ColorTarget,
    /// How the image is compared with it.
    pub measure: ColorMeasure,
}

impl ImageColor {
    /// `image_color`: `params.target` is required.
    ///
    /// # Errors
    /// [`RewardError::Config`] at `params.target` (missing or an unknown name, listing the
    /// names) or `params.caption_field` (not used by this kind).
    pub fn fixed(p: ImageColorParams) -> Result<Self, RewardError> {
        if p.caption_field.is_some() {
            return Err(RewardError::Config {
                key: "params.caption_field".into(),
                message: "image_color has a fixed target; use `kind: caption_color` to read the colour from the caption".into(),
            });
        }
        let names = || {
            NAMED_COLORS
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let rgb = match p.target {
            None => {
                return Err(RewardError::Config {
                    key: "params.target".into(),
                    message: format!("missing: give a colour name ({}) or [r, g, b]", names()),
                });
            }
            Some(ColorSpec::Rgb(rgb)) => rgb,
            Some(ColorSpec::Name(n)) => named_color(&n).ok_or_else(|| RewardError::Config {
                key: "params.target".into(),
                message: format!(
                    "unknown colour `{n}`: valid names are {} (or [r, g, b])",
                    names()
                ),
            })?,
        };
        Ok(Self {
            target: ColorTarget::Fixed(rgb),
            measure: p.measure,
        })
    }

    /// `caption_color`.
    ///
    /// # Errors
    /// [`RewardError::Config`] at `params.target` (not used by this kind).
    pub fn from_caption(p: ImageColorParams) -> Result<Self, RewardError> {
        if p.target.is_some() {
            return Err(RewardError::Config {
                key: "params.target".into(),
                message: "caption_color reads its target from the caption; use `kind: image_color` for a fixed target".into(),
            });
        }
        Ok(Self {
            target: ColorTarget::Caption(p.caption_field),
            measure: p.measure,
        })
    }

    fn target_of(&self, item: &RewardInput) -> Option<[u8; 3]> {
        match &self.target {
            ColorTarget::Fixed(rgb) => Some(*rgb),
            ColorTarget::Caption(field) => {
                let text = match field {
                    Some(f) => item.field_str(f)?,
                    None => item
                        .field_str("caption")
                        .unwrap_or_else(|| item.prompt.clone()),
                };
                color_in_text(&text)
            }
        }
    }
}

impl Reward for ImageColor {
    fn score(&self, batch: &[RewardInput]) -> Result<Vec<Option<f32>>, RewardError> {
        Ok(batch
            .iter()
            .map(|item| {
                let img = item.image.as_ref()?;
                let target = self.target_of(item)?;
                Some(match self.measure {
                    ColorMeasure::Mean => color_closeness(img, target),
                    ColorMeasure::Pixels => color_pixel_share(img, target),
                })
            })
            .collect())
    }
}

/// `params:` of `kind: image_brightness`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageBrightnessParams {
    /// Target mean luma in `[0, 1]` (default 1.0: brighter is better).
    #[serde(default = "one")]
    pub target: f32,
}

fn one() -> f32 {
    1.0
}

/// `kind: image_brightness`: `1 − |mean_luma − target|`; `None` without an image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageBrightness {
    /// Target mean luma in `[0, 1]`.
    pub target: f32,
}

impl ImageBrightness {
    /// Checks the target.
    ///
    /// # Errors
    /// [`RewardError::Config`] at `params.target` outside `[0, 1]`.
    pub fn new(p: ImageBrightnessParams) -> Result<Self, RewardError> {
        if !(0.0..=1.0).contains(&p.target) {
            return Err(RewardError::Config {
                key: "params.target".into(),
                message: format!("{} is invalid: need a mean luma in [0, 1]", p.target),
            });
        }
        Ok(Self { target: p.target })
    }
}

impl Reward for ImageBrightness {
    fn score(&self, batch: &[RewardInput]) -> Result<Vec<Option<f32>>, RewardError> {
        Ok(batch
            .iter()
            .map(|item| {
                let img = item.image.as_ref()?;
                Some(1.0 - (img.mean_luma() - self.target).abs())
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn solid(rgb: [u8; 3]) -> RewardImage {
        RewardImage::new(2, 3, rgb.repeat(6)).unwrap()
    }

    fn item(prompt: &str, img: Option<RewardImage>) -> RewardInput {
        RewardInput {
            prompt: prompt.into(),
            image: img,
            ..Default::default()
        }
    }

    #[test]
    fn png_json_round_trip_and_stats() {
        let mut rgb = vec![];
        for i in 0..12u8 {
            rgb.extend([i * 20, 255 - i * 20, 7]);
        }
        let img = RewardImage::new(4, 3, rgb).unwrap();
        let v = serde_json::to_value(&img).unwrap();
        assert_eq!(
            (v["width"].as_u64(), v["height"].as_u64()),
            (Some(4), Some(3))
        );
        let b = base64::engine::general_purpose::STANDARD
            .decode(v["png_base64"].as_str().unwrap())
            .unwrap();
        assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n");
        let back: RewardImage = serde_json::from_value(v).unwrap();
        assert_eq!(back, img);
        // mean of 0, 20, …, 220 = 110
        assert_eq!(img.mean_rgb(), [110.0, 145.0, 7.0]);
        assert!(RewardImage::new(2, 2, vec![0; 11]).is_err());
    }

    #[test]
    fn color_rewards_score_closeness_and_skip_items_without_image() {
        let red = ImageColor::fixed(ImageColorParams {
            target: Some(ColorSpec::Name("Red".into())),
            ..Default::default()
        })
        .unwrap();
        let batch = [
            item("", Some(solid([255, 0, 0]))),
            item("", Some(solid([0, 255, 255]))),
            item("", Some(solid([255, 255, 0]))),
            item("", None),
        ];
        let s = red.score(&batch).unwrap();
        assert_eq!(s[0], Some(1.0));
        assert_eq!(s[1], Some(0.0));
        // yellow vs red: distance 255 of 255·√3
        assert!((s[2].unwrap() - (1.0 - 1.0 / 3f32.sqrt())).abs() < 1e-6);
        assert_eq!(s[3], None);

        let cap = ImageColor::from_caption(ImageColorParams::default()).unwrap();
        let batch = [
            item("a blue square", Some(solid([0, 0, 255]))),
            item("a BLUE square", Some(solid([0, 0, 0]))),
            item("a square", Some(solid([0, 0, 255]))),
            item("bluest", Some(solid([0, 0, 255]))),
        ];
        let s = cap.score(&batch).unwrap();
        assert_eq!(s[0], Some(1.0));
        assert!((s[1].unwrap() - (1.0 - 1.0 / 3f32.sqrt())).abs() < 1e-6);
        assert_eq!((s[2], s[3]), (None, None), "no whole colour word");

        let e = ImageColor::fixed(ImageColorParams {
            target: Some(ColorSpec::Name("teal".into())),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("params.target") && e.contains("magenta"), "{e}");
        assert!(ImageColor::fixed(ImageColorParams::default()).is_err());

        // measure: pixels — 2 of 6 pixels red-ish (nearest named colour red), 4 blue
        let mut rgb = [230u8, 20, 20].repeat(2);
        rgb.extend([0u8, 0, 250].repeat(4));
        let img = RewardImage::new(3, 2, rgb).unwrap();
        let share = ImageColor::from_caption(ImageColorParams {
            measure: ColorMeasure::Pixels,
            ..Default::default()
        })
        .unwrap();
        let s = share
            .score(&[
                item("a red kite", Some(img.clone())),
                item("blue", Some(img)),
            ])
            .unwrap();
        assert!((s[0].unwrap() - 1.0 / 3.0).abs() < 1e-6, "{s:?}");
        assert!((s[1].unwrap() - 2.0 / 3.0).abs() < 1e-6, "{s:?}");
    }

    #[test]
    fn brightness_is_one_minus_luma_distance() {
        let b = ImageBrightness::new(ImageBrightnessParams { target: 1.0 }).unwrap();
        let s = b
            .score(&[
                item("", Some(solid([255, 255, 255]))),
                item("", Some(solid([0, 0, 0]))),
                item("", Some(solid([255, 0, 0]))),
            ])
            .unwrap();
        assert_eq!((s[0], s[1]), (Some(1.0), Some(0.0)));
        assert!((s[2].unwrap() - 0.299).abs() < 1e-6);
        assert!(ImageBrightness::new(ImageBrightnessParams { target: 1.5 }).is_err());
    }
}
