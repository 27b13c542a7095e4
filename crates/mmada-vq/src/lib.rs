//! MAGVIT-v2 image tokenizer of Show-o / MMaDA (`showlab/magvitv2`) in burn: encoder,
//! lookup-free quantizer (LFQ), decoder, checkpoint loading and image conversion.
//!
//! Ported from Show-o `models/modeling_magvitv2.py` (`VQGANEncoder`, `LFQuantizer`,
//! `VQGANDecoder`, `MAGVITv2`) and `models/common_modules.py` (`ResnetBlock`, `AttnBlock`,
//! `Downsample`, `Upsample`, `Normalize`, `nonlinearity`); see `shared/docs/mmada-spec.md`
//! §2.3 and `fixtures/magvitv2/README.md`.
//!
//! * [`MagvitV2::encode`]: pixels `[B, 3, H, W]` in `[-1, 1]` → codes `[B, (H/16)·(W/16)]`
//!   in `[0, 8192)`, row-major, channel 0 = most significant bit, strict `z > 0`.
//! * [`MagvitV2::decode`]: codes `[B, h·w]` + [`Grid`] `(h, w)` → pixels `[B, 3, 16h, 16w]`.
//! * [`pixels_to_images`]: the upstream truncating uint8 conversion to [`RgbImage`]s.
//! * [`load_dir`]: a checkpoint folder (`pytorch_model.safetensors` or `model.safetensors`,
//!   float32, the upstream `state_dict` names incl. the two quantizer buffers); errors name
//!   the file and tensor. [`MagvitConfig::default`] is the real architecture.
//!
//! * [`coder::VqCoder`] (feature `data`): the model as the data pipeline's
//!   `mmada_data::ImageCoder`, shared by `mmada-train` and `mmada-infer`.
//!
//! Everything is generic over the burn [`Backend`](burn::tensor::backend::Backend).
//! Preprocessing (Pillow-exact bicubic resize, centre crop) is in the data crate.
//! MMaDA's LLM token id of a code is `code + len(text_tokenizer)`; that offset belongs to
//! `TokenLayout` (mmada-model), not here.

pub mod checkpoint;
#[cfg(feature = "data")]
pub mod coder;
pub mod config;
pub mod decoder;
pub mod encoder;
pub mod error;
pub mod image;
pub mod layers;
pub mod lfq;
pub mod model;
pub mod params;

#[cfg(feature = "hub")]
pub use checkpoint::download;
pub use checkpoint::{HF_REPO, load_dir, load_weights};
#[cfg(feature = "data")]
pub use coder::{VqCoder, checkpoint_id, resolve_checkpoint};
pub use config::{DecoderConfig, EncoderConfig, MagvitConfig, QuantizerConfig};
pub use error::VqError;
pub use image::{RgbImage, images_to_pixels, pixel_to_u8, pixels_to_images, pixels_to_u8};
pub use lfq::{Grid, Lfq, LfqLosses};
pub use model::{MagvitV2, StateDictEntry};
pub use params::{Init, ParamSource, RandomInit, ZeroInit};
