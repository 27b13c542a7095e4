//! Loading MAGVIT-v2 weights in the upstream format: one float32 safetensors file with the
//! upstream `state_dict` names (`encoder.*`, `decoder.*`, and the buffers
//! `quantize.embedding` `[2^D, D]` f32 and `quantize.power_vals` `[D]` int64).
//!
//! * The HF repository `showlab/magvitv2` stores it as `pytorch_model.safetensors` (Show-o
//!   `models/modeling_utils.py`: `SAFETENSORS_WEIGHTS_NAME`), next to a `config.json` without
//!   architecture fields; the tiny test checkpoint uses `model.safetensors` and a `config.json`
//!   with `encoder` / `decoder` / `quantizer` sections ([`MagvitConfig::from_json`]).
//! * Strict like upstream `from_pretrained`: every tensor of the architecture must be present
//!   with its exact shape and dtype, no other tensor may be present, and the two buffers must
//!   hold the values the quantizer implies. Errors name the file and the tensor.
//! * Memory: the header is parsed by `mmada-safetensors`; each tensor is read with one positional read into a
//!   buffer of its own size and handed to the backend, so peak memory is the model plus one
//!   tensor.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::config::MagvitConfig;
use crate::error::VqError;
use crate::lfq::Lfq;
use crate::model::MagvitV2;
use crate::params::{Init, ParamSource};

/// Weights file name in the HF repository `showlab/magvitv2`.
pub const HF_WEIGHTS_FILE: &str = "pytorch_model.safetensors";
/// Alternative weights file name (the tiny test checkpoint).
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The HF repository of the released tokenizer.
pub const HF_REPO: &str = "showlab/magvitv2";
/// Name of the LFQ codebook buffer.
pub const EMBEDDING_BUFFER: &str = "quantize.embedding";
/// Name of the LFQ bit-weight buffer.
pub const POWER_VALS_BUFFER: &str = "quantize.power_vals";

pub use mmada_safetensors::{SafetensorsFile, TensorEntry};

/// Look-ups of the tensors this loader requires.
trait Entries {
    /// Look up `name`, checking its shape and that its dtype is one of `dtypes`.
    ///
    /// # Errors
    /// [`VqError::MissingTensor`], [`VqError::ShapeMismatch`], [`VqError::UnsupportedDtype`].
    fn entry(
        &self,
        name: &str,
        shape: &[usize],
        dtypes: &'static str,
    ) -> Result<&TensorEntry, VqError>;
}

impl Entries for SafetensorsFile {
    fn entry(
        &self,
        name: &str,
        shape: &[usize],
        dtypes: &'static str,
    ) -> Result<&TensorEntry, VqError> {
        let e = self
            .tensors
            .get(name)
            .ok_or_else(|| VqError::MissingTensor {
                path: self.path().to_path_buf(),
                tensor: name.to_string(),
                expected: shape.to_vec(),
            })?;
        if e.shape != shape {
            return Err(VqError::ShapeMismatch {
                path: self.path().to_path_buf(),
                tensor: name.to_string(),
                expected: shape.to_vec(),
                found: e.shape.clone(),
            });
        }
        if !dtypes.split(" or ").any(|d| d == e.dtype) {
            return Err(VqError::UnsupportedDtype {
                path: self.path().to_path_buf(),
                tensor: name.to_string(),
                dtype: e.dtype.clone(),
                expected: dtypes,
            });
        }
        Ok(e)
    }
}

/// A [`ParamSource`] reading from one safetensors file; remembers which tensors were used.
#[derive(Debug)]
pub struct FileSource<'a, B: Backend> {
    file: &'a SafetensorsFile,
    device: B::Device,
    used: BTreeSet<String>,
}

impl<'a, B: Backend> FileSource<'a, B> {
    /// Read parameters from `file` onto `device`.
    pub fn new(file: &'a SafetensorsFile, device: &B::Device) -> Self {
        Self {
            file,
            device: device.clone(),
            used: BTreeSet::new(),
        }
    }

    /// Names read so far.
    pub fn used(&self) -> &BTreeSet<String> {
        &self.used
    }
}

impl<B: Backend> ParamSource<B> for FileSource<'_, B> {
    fn tensor<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        _init: Init,
    ) -> Result<Tensor<B, D>, VqError> {
        self.file.entry(name, &shape, "F32")?;
        let bytes = self.file.read_bytes(name)?;
        self.used.insert(name.to_string());
        let data = TensorData::from_bytes_vec(bytes, shape.to_vec(), burn::tensor::DType::F32);
        Ok(Tensor::from_data(data, &self.device))
    }
}

/// Check the quantizer buffers of `file` against `lfq` (present, shape, dtype, values).
fn check_buffers(file: &SafetensorsFile, lfq: &Lfq) -> Result<(), VqError> {
    let d = lfq.codebook_dim;
    let n = lfq.codebook_size();
    let mismatch =
        |tensor: &str, index: usize, found: f64, expected: f64| VqError::BufferMismatch {
            path: file.path().to_path_buf(),
            tensor: tensor.to_string(),
            index,
            found,
            expected,
        };
    let e = file.entry(EMBEDDING_BUFFER, &[n, d], "F32")?;
    debug_assert_eq!(e.dtype, "F32");
    let bytes = file.read_bytes(EMBEDDING_BUFFER)?;
    for (i, (c, want)) in bytes.chunks_exact(4).zip(lfq.embedding()).enumerate() {
        let got = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        if got != want {
            return Err(mismatch(EMBEDDING_BUFFER, i, got as f64, want as f64));
        }
    }
    let e = file.entry(POWER_VALS_BUFFER, &[d], "I64 or I32")?;
    let bytes = file.read_bytes(POWER_VALS_BUFFER)?;
    let got: Vec<i64> = if e.dtype == "I64" {
        bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect()
    } else {
        bytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64)
            .collect()
    };
    for (i, (g, w)) in got.iter().zip(lfq.power_vals()).enumerate() {
        if *g != w {
            return Err(mismatch(POWER_VALS_BUFFER, i, *g as f64, w as f64));
        }
    }
    Ok(())
}

/// Load the weights file `path` (float32 safetensors, upstream names) into the architecture
/// `cfg` on `device`.
///
/// # Errors
/// [`VqError::InvalidConfig`], the errors of [`SafetensorsFile::open`],
/// [`VqError::MissingTensor`] / [`VqError::ShapeMismatch`] / [`VqError::UnsupportedDtype`]
/// naming the first offending tensor, [`VqError::BufferMismatch`],
/// [`VqError::UnexpectedTensors`].
pub fn load_weights<B: Backend>(
    path: &Path,
    cfg: &MagvitConfig,
    device: &B::Device,
) -> Result<MagvitV2<B>, VqError> {
    cfg.validate()?;
    let file = SafetensorsFile::open(path)?;
    let mut src = FileSource::<B>::new(&file, device);
    let model = MagvitV2::from_source(cfg, &mut src)?;
    check_buffers(&file, &model.quantize)?;
    let mut used = src.used;
    used.insert(EMBEDDING_BUFFER.to_string());
    used.insert(POWER_VALS_BUFFER.to_string());
    let unexpected: Vec<String> = file
        .tensors
        .keys()
        .filter(|k| !used.contains(*k))
        .cloned()
        .collect();
    if !unexpected.is_empty() {
        return Err(VqError::UnexpectedTensors {
            path: path.to_path_buf(),
            tensors: unexpected,
        });
    }
    Ok(model)
}

/// The weights file of a checkpoint folder: `pytorch_model.safetensors` (HF
/// `showlab/magvitv2`) or else `model.safetensors`.
///
/// # Errors
/// [`VqError::NoWeights`].
pub fn weights_file(dir: &Path) -> Result<PathBuf, VqError> {
    [HF_WEIGHTS_FILE, WEIGHTS_FILE]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
        .ok_or_else(|| VqError::NoWeights {
            dir: dir.to_path_buf(),
        })
}

/// Load a checkpoint folder: architecture from `config.json` ([`MagvitConfig::from_dir`]:
/// the real one when the file has no architecture, as the HF repository), weights from
/// [`weights_file`].
///
/// # Errors
/// As [`MagvitConfig::from_dir`], [`weights_file`] and [`load_weights`].
pub fn load_dir<B: Backend>(
    dir: &Path,
    device: &B::Device,
) -> Result<(MagvitConfig, MagvitV2<B>), VqError> {
    let cfg = MagvitConfig::from_dir(dir)?;
    let model = load_weights(&weights_file(dir)?, &cfg, device)?;
    Ok((cfg, model))
}

/// Download (or find in the Hugging Face cache) `config.json` and
/// `pytorch_model.safetensors` of `repo` (normally [`HF_REPO`]) and return the folder
/// holding both, for [`load_dir`].
///
/// # Errors
/// [`VqError::Hub`].
#[cfg(feature = "hub")]
pub fn download(repo: &str) -> Result<PathBuf, VqError> {
    let hub = |file: &str, e: String| VqError::Hub {
        repo: repo.to_string(),
        file: file.to_string(),
        reason: e,
    };
    let (id, revision) = repo.split_once('@').unwrap_or((repo, "main"));
    let r = mmada_data::hub::HubRef {
        repo: id.to_string(),
        revision: revision.to_string(),
    };
    let get = |file: &str| {
        mmada_data::hub::fetch(&r, hf_hub::RepoType::Model, file)
            .map_err(|e| hub(file, e.to_string()))
    };
    get("config.json")?;
    let weights = get(HF_WEIGHTS_FILE)?;
    Ok(weights.parent().map(Path::to_path_buf).unwrap_or_default())
}
