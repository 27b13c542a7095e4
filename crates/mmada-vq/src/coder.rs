//! [`VqCoder`]: MAGVIT-v2 as the data pipeline's [`mmada_data::ImageCoder`] (feature `data`).
//!
//! **Why here.** The crate charter keeps `mmada-data` free of burn models: it only knows the
//! `ImageCoder` trait (pixels → codes). Both binaries (`mmada-train` for SFT image rows and
//! `pretokenize`, `mmada-infer` for `--mode mmu` / `--mode t2i`) need the *same* adapter, the
//! same cache id and the same checkpoint resolution (local folder or Hugging Face repo id).
//! Putting it in this crate behind an optional feature keeps one copy next to the model it
//! wraps, adds no crate, and leaves `mmada-vq` itself independent of the data crate unless a
//! binary asks for it (`mmada-vq = { features = ["data"] }`).
//!
//! Encoding follows Show-o `MAGVITv2.get_code` (spec §2.3): pixels `[B, 3, R, R]` in
//! `[-1, 1]` → codes `[B, (R/16)²]`, row-major. Decoding follows `decode_code` + the upstream
//! truncating uint8 conversion (`clamp((x+1)/2, 0, 1)·255`).

use std::io::Read;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use mmada_data::codes::fnv1a128;
use mmada_data::{ImageCoder, Pixels};

use crate::checkpoint::weights_file;
use crate::error::io_err;
use crate::{Grid, MagvitConfig, MagvitV2, RgbImage, VqError, load_dir};

/// Images per encoder / decoder call (bounds activation memory at 512 px).
pub const DEFAULT_BATCH: usize = 8;

/// Where a MAGVIT-v2 checkpoint comes from: `--vq-checkpoint` / recipe `image_tokenizer.checkpoint`.
///
/// A string naming an existing local folder is a folder (`config.json` +
/// `pytorch_model.safetensors` or `model.safetensors`); otherwise, with the `hub` feature,
/// an `owner/name` Hugging Face repository id such as [`crate::HF_REPO`].
///
/// # Errors
/// [`VqError::NoWeights`] when the folder does not exist and the string is not a repo id
/// (or the `hub` feature is off); [`VqError::Hub`] when the download fails.
pub fn resolve_checkpoint(spec: &str) -> Result<PathBuf, VqError> {
    let p = Path::new(spec);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    #[cfg(feature = "hub")]
    {
        let looks_like_repo = spec.split('/').count() == 2
            && !spec.starts_with('.')
            && !spec.starts_with('/')
            && !spec.contains('\\');
        if looks_like_repo {
            return crate::checkpoint::download(spec);
        }
    }
    Err(VqError::NoWeights {
        dir: p.to_path_buf(),
    })
}

/// A stable identity of a checkpoint for the code cache: `magvitv2:<32 hex>`, the FNV-1a-128
/// of the architecture (its `Debug` form) and of every 8 MiB chunk of the weights file, so a
/// different or re-trained tokenizer never reads stale codes.
///
/// # Errors
/// [`VqError::Io`] when the weights file cannot be read.
pub fn checkpoint_id(cfg: &MagvitConfig, weights: &Path) -> Result<String, VqError> {
    let mut f = std::fs::File::open(weights).map_err(io_err(weights))?;
    let mut acc = Vec::new();
    acc.extend_from_slice(&fnv1a128(format!("{cfg:?}").as_bytes()).to_le_bytes());
    let mut buf = vec![0u8; 8 << 20];
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = f.read(&mut buf[filled..]).map_err(io_err(weights))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        acc.extend_from_slice(&fnv1a128(&buf[..filled]).to_le_bytes());
        if filled < buf.len() {
            break;
        }
    }
    Ok(format!("magvitv2:{:032x}", fnv1a128(&acc)))
}

/// MAGVIT-v2 behind the data pipeline's [`ImageCoder`] trait, plus code → image decoding.
pub struct VqCoder<B: Backend> {
    model: MagvitV2<B>,
    device: B::Device,
    id: String,
    batch: usize,
}

impl<B: Backend> VqCoder<B> {
    /// Wraps a loaded model; `id` keys the code cache (see [`checkpoint_id`]).
    pub fn new(model: MagvitV2<B>, device: B::Device, id: impl Into<String>) -> Self {
        Self {
            model,
            device,
            id: id.into(),
            batch: DEFAULT_BATCH,
        }
    }

    /// Loads the checkpoint named by `spec` (local folder or HF repo id, see
    /// [`resolve_checkpoint`]) onto `device`, strictly (every tensor present with its shape).
    ///
    /// # Errors
    /// As [`resolve_checkpoint`], [`load_dir`] and [`checkpoint_id`].
    pub fn load(spec: &str, device: &B::Device) -> Result<Self, VqError> {
        let dir = resolve_checkpoint(spec)?;
        let (cfg, model) = load_dir::<B>(&dir, device)?;
        let id = checkpoint_id(&cfg, &weights_file(&dir)?)?;
        Ok(Self::new(model, device.clone(), id))
    }

    /// Images per encoder / decoder call (default [`DEFAULT_BATCH`], at least 1).
    pub fn with_batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// The wrapped model.
    pub fn model(&self) -> &MagvitV2<B> {
        &self.model
    }

    /// The latent grid of an `height × width` image (`(H/16, W/16)` for the real config).
    ///
    /// # Errors
    /// [`VqError::BadInput`] when a side is not a multiple of the downsampling factor.
    pub fn grid(&self, height: usize, width: usize) -> Result<Grid, VqError> {
        self.model.latent_grid(height, width)
    }

    /// Encodes same-size images `[3, H, W]` in `[-1, 1]` to codes `(H/16)·(W/16)` each,
    /// row-major, `DEFAULT_BATCH` images per model call.
    ///
    /// # Errors
    /// [`VqError::BadInput`] for mixed sizes, a wrong channel count or a size not divisible
    /// by the downsampling factor.
    pub fn encode_pixels(&self, images: &[Pixels]) -> Result<Vec<Vec<u32>>, VqError> {
        let Some(first) = images.first() else {
            return Ok(vec![]);
        };
        let [c, h, w] = first.shape;
        let mut out = Vec::with_capacity(images.len());
        for chunk in images.chunks(self.batch) {
            let mut data = Vec::with_capacity(chunk.len() * c * h * w);
            for p in chunk {
                if p.shape != first.shape {
                    return Err(VqError::BadInput {
                        what: "images",
                        reason: format!(
                            "one call needs same-size images, got {:?} and {:?}",
                            first.shape, p.shape
                        ),
                    });
                }
                data.extend_from_slice(&p.data);
            }
            let pixels = Tensor::<B, 4>::from_data(
                TensorData::new(data, [chunk.len(), c, h, w]),
                &self.device,
            );
            let codes: Tensor<B, 2, Int> = self.model.encode(pixels)?;
            let [b, n] = codes.dims();
            let flat = int_values(codes)?;
            out.extend(
                (0..b).map(|i| flat[i * n..(i + 1) * n].iter().map(|&v| v as u32).collect()),
            );
        }
        Ok(out)
    }

    /// Decodes code rows (each `grid.len()` codes in `[0, codebook_size)`) to RGB images of
    /// `16·h × 16·w` pixels with the upstream truncating conversion.
    ///
    /// # Errors
    /// [`VqError::BadInput`] when a row does not fill `grid`, [`VqError::CodeOutOfRange`].
    pub fn decode_codes(&self, rows: &[Vec<u32>], grid: Grid) -> Result<Vec<RgbImage>, VqError> {
        let mut out = Vec::with_capacity(rows.len());
        for chunk in rows.chunks(self.batch) {
            let n = grid.len();
            let mut data = Vec::with_capacity(chunk.len() * n);
            for (i, r) in chunk.iter().enumerate() {
                if r.len() != n {
                    return Err(VqError::BadInput {
                        what: "codes",
                        reason: format!("row {i} has {} codes, the grid needs {n}", r.len()),
                    });
                }
                data.extend(r.iter().map(|&c| i64::from(c)));
            }
            let codes = Tensor::<B, 2, Int>::from_data(
                TensorData::new(data, [chunk.len(), n]),
                &self.device,
            );
            out.extend(self.model.decode_to_images(codes, grid)?);
        }
        Ok(out)
    }
}

fn int_values<B: Backend>(t: Tensor<B, 2, Int>) -> Result<Vec<i64>, VqError> {
    t.into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .map_err(|e| VqError::BadInput {
            what: "codes",
            reason: format!("cannot read codes back from the device: {e:?}"),
        })
}

impl<B: Backend> ImageCoder for VqCoder<B> {
    fn id(&self) -> String {
        self.id.clone()
    }

    fn encode(
        &self,
        images: &[Pixels],
    ) -> Result<Vec<Vec<u32>>, Box<dyn std::error::Error + Send + Sync>> {
        Ok(self.encode_pixels(images)?)
    }
}
