//! Hugging Face safetensors checkpoints: load and save with the upstream tensor names.
//!
//! The only module of this crate that touches the file system.
//!
//! * Names: `model.transformer.{wte,blocks.{i}.*,ln_f,ff_out}.weight` (spec §1.6), the names
//!   upstream `LLaDAModelLM.save_pretrained` writes.
//! * Layout: Linear weights are stored `[out, in]` (torch) and transposed into burn's
//!   `[in, out]` on load, back on save.
//! * Files: a single `model.safetensors`, or shards `model-0000k-of-0000n.safetensors` with a
//!   `model.safetensors.index.json` (`metadata.total_size` = bytes of tensor data,
//!   `weight_map` name → shard).
//! * Dtypes: BF16, F16, F32 (and F64) on disk, converted to the requested float dtype.
//! * Memory: tensors are read one at a time with positional reads into a buffer of one tensor,
//!   converted, and handed to the backend; the file is never mapped or read whole, so peak
//!   memory is the model plus about one tensor (mapped pages would count in the resident
//!   set too). Saving likewise materialises one tensor at a time.
//! * Atomicity: a checkpoint directory is written under a temporary sibling name and renamed
//!   into place once every file is complete.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Tensor, TensorData};
use serde_json::{Value, json};

use crate::config::{ConfigError, ModelConfig};
use crate::model::{LladaModel, NamedTensor, ParamSource};

/// The prefix of every tensor name in LLaDA / MMaDA checkpoints.
pub const HF_PREFIX: &str = "model.transformer.";
/// Single-file weights name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Shard index name.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Files copied verbatim from a source checkpoint when saving (tokenizer, remote code).
pub const SIDECAR_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "configuration_llada.py",
    "modeling_llada.py",
    "configuration_mmada.py",
    "modeling_mmada.py",
];

/// Error loading or saving a checkpoint. Every variant names the file and, where there is
/// one, the tensor.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Reading `config.json` failed.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// An OS error on a file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Neither `model.safetensors` nor `model.safetensors.index.json` is present.
    #[error(
        "{dir}: no weights found (expected {SINGLE_FILE} or {INDEX_FILE}; PyTorch .bin checkpoints must be converted to safetensors first)"
    )]
    NoWeights {
        /// The directory.
        dir: PathBuf,
    },
    /// The file is not a valid safetensors file, or is truncated (names the file and the
    /// first tensor past its end), or reading it failed.
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
    /// The shard index is malformed or inconsistent with the shards.
    #[error("{path}: invalid shard index: {reason}")]
    BadIndex {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tensor the config requires is absent.
    #[error(
        "{path}: missing tensor `{tensor}` (expected shape {expected:?}); is this a LLaDA/MMaDA checkpoint matching config.json?"
    )]
    MissingTensor {
        /// The checkpoint.
        path: PathBuf,
        /// The HF name.
        tensor: String,
        /// The shape the config implies.
        expected: Vec<usize>,
    },
    /// Tensors present in the checkpoint that the model does not have.
    #[error(
        "{path}: unexpected tensors not used by the model: {tensors:?} (does config.json match the weights?)"
    )]
    UnexpectedTensors {
        /// The checkpoint.
        path: PathBuf,
        /// Their names.
        tensors: Vec<String>,
    },
    /// A tensor has a different shape than the config implies.
    #[error("{path}: tensor `{tensor}` has shape {found:?} but config.json implies {expected:?}")]
    ShapeMismatch {
        /// The file holding it.
        path: PathBuf,
        /// The HF name.
        tensor: String,
        /// Shape from the config.
        expected: Vec<usize>,
        /// Shape in the file.
        found: Vec<usize>,
    },
    /// A tensor is stored in a dtype we do not read.
    #[error("{path}: tensor `{tensor}` has dtype {dtype}; supported: BF16, F16, F32, F64")]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// The HF name.
        tensor: String,
        /// The dtype string of the header.
        dtype: String,
    },
    /// The destination exists and overwriting was not requested.
    #[error(
        "{path} already exists and is not empty (pass `--overwrite` on the command line, `SaveOptions::overwrite` in code, to replace it)"
    )]
    Exists {
        /// The destination.
        path: PathBuf,
    },
    /// Writing a safetensors file failed.
    #[error("{path}: cannot write safetensors: {reason}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The writer's message.
        reason: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// On-disk element type of a safetensors tensor that we read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskDtype {
    /// bfloat16 (the released LLaDA/MMaDA checkpoints).
    BF16,
    /// IEEE half.
    F16,
    /// IEEE single.
    F32,
    /// IEEE double (read only).
    F64,
}

impl DiskDtype {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "BF16" => Some(Self::BF16),
            "F16" => Some(Self::F16),
            "F32" => Some(Self::F32),
            "F64" => Some(Self::F64),
            _ => None,
        }
    }
    /// The header string (`"BF16"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BF16 => "BF16",
            Self::F16 => "F16",
            Self::F32 => "F32",
            Self::F64 => "F64",
        }
    }
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::BF16 | Self::F16 => 2,
            Self::F32 => 4,
            Self::F64 => 8,
        }
    }
    fn burn(self) -> DType {
        match self {
            Self::BF16 => DType::BF16,
            Self::F16 => DType::F16,
            Self::F32 => DType::F32,
            Self::F64 => DType::F64,
        }
    }
    fn st(self) -> safetensors::Dtype {
        match self {
            Self::BF16 => safetensors::Dtype::BF16,
            Self::F16 => safetensors::Dtype::F16,
            Self::F32 => safetensors::Dtype::F32,
            Self::F64 => safetensors::Dtype::F64,
        }
    }
}

pub use mmada_safetensors::{SafetensorsError, SafetensorsFile, TensorEntry};

/// Read tensor `name` of `file` (which must be in its header) and convert it to `dtype`
/// (row-major, torch layout).
///
/// # Errors
/// [`CheckpointError::UnsupportedDtype`], [`CheckpointError::Io`].
pub fn read_tensor(
    file: &SafetensorsFile,
    name: &str,
    dtype: FloatDType,
) -> Result<TensorData, CheckpointError> {
    let e = &file.tensors[name];
    let disk = DiskDtype::parse(&e.dtype).ok_or_else(|| CheckpointError::UnsupportedDtype {
        path: file.path().to_path_buf(),
        tensor: name.to_string(),
        dtype: e.dtype.clone(),
    })?;
    let bytes = file.read_bytes(name)?;
    Ok(convert_bytes(
        bytes,
        disk,
        e.shape.clone(),
        DType::from(dtype),
    ))
}

/// Convert little-endian `bytes` of `from` into a [`TensorData`] of `to`, without a copy when
/// the dtypes agree.
fn convert_bytes(bytes: Vec<u8>, from: DiskDtype, shape: Vec<usize>, to: DType) -> TensorData {
    if from.burn() == to {
        return TensorData::from_bytes_vec(bytes, shape, to);
    }
    let f32s: Vec<f32> = match from {
        DiskDtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        DiskDtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        DiskDtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DiskDtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect(),
    };
    drop(bytes);
    let data = TensorData::new(f32s, shape);
    if to == DType::F32 {
        data
    } else {
        data.convert_dtype(to)
    }
}

/// A checkpoint directory (or a single `.safetensors` file): its files and which file holds
/// which tensor.
#[derive(Debug)]
pub struct CheckpointFiles {
    root: PathBuf,
    files: Vec<SafetensorsFile>,
    /// HF name → index into `files`.
    location: HashMap<String, usize>,
}

impl CheckpointFiles {
    /// Open the weights of a checkpoint: `path` is a directory with `model.safetensors` or
    /// `model.safetensors.index.json`, or a `.safetensors` file.
    ///
    /// # Errors
    /// [`CheckpointError::NoWeights`], [`CheckpointError::BadIndex`] and the errors of
    /// [`SafetensorsFile::open`].
    pub fn open(path: &Path) -> Result<Self, CheckpointError> {
        let mut files = Vec::new();
        let mut location = HashMap::new();
        if path.is_file() {
            let f = SafetensorsFile::open(path)?;
            for name in f.tensors.keys() {
                location.insert(name.clone(), 0);
            }
            files.push(f);
            return Ok(Self {
                root: path.to_path_buf(),
                files,
                location,
            });
        }
        let single = path.join(SINGLE_FILE);
        let index = path.join(INDEX_FILE);
        if index.is_file() {
            let bad = |reason: String| CheckpointError::BadIndex {
                path: index.clone(),
                reason,
            };
            let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
            let v: Value =
                serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
            let map = v["weight_map"]
                .as_object()
                .ok_or_else(|| bad("no `weight_map` object".into()))?;
            let mut shard_ids: BTreeMap<String, usize> = BTreeMap::new();
            for (name, shard) in map {
                let shard = shard
                    .as_str()
                    .ok_or_else(|| bad(format!("weight_map[`{name}`] is not a file name")))?;
                if shard.contains('/') || shard.contains("..") {
                    return Err(bad(format!(
                        "weight_map[`{name}`] = {shard:?} is not a file in the checkpoint"
                    )));
                }
                let id = match shard_ids.get(shard) {
                    Some(&id) => id,
                    None => {
                        if !path.join(shard).is_file() {
                            return Err(bad(format!(
                                "weight_map[`{name}`] = {shard:?}: no such file in the checkpoint"
                            )));
                        }
                        let f = SafetensorsFile::open(&path.join(shard))?;
                        files.push(f);
                        shard_ids.insert(shard.to_string(), files.len() - 1);
                        files.len() - 1
                    }
                };
                if !files[id].tensors.contains_key(name) {
                    return Err(bad(format!(
                        "weight_map says `{name}` is in {shard}, but that shard does not contain it"
                    )));
                }
                location.insert(name.clone(), id);
            }
            for f in &files {
                for name in f.tensors.keys() {
                    if !location.contains_key(name) {
                        return Err(bad(format!(
                            "{} contains `{name}`, which weight_map does not list",
                            f.path().display()
                        )));
                    }
                }
            }
            if let Some(total) = v["metadata"]["total_size"].as_u64() {
                let actual: u64 = files
                    .iter()
                    .flat_map(|f| f.tensors.values())
                    .map(|e| e.end - e.start)
                    .sum();
                if total != actual {
                    return Err(bad(format!(
                        "metadata.total_size is {total} but the shards hold {actual} bytes of tensors"
                    )));
                }
            }
        } else if single.is_file() {
            let f = SafetensorsFile::open(&single)?;
            for name in f.tensors.keys() {
                location.insert(name.clone(), 0);
            }
            files.push(f);
        } else {
            return Err(CheckpointError::NoWeights {
                dir: path.to_path_buf(),
            });
        }
        Ok(Self {
            root: path.to_path_buf(),
            files,
            location,
        })
    }

    /// Every tensor: name → (entry, file path).
    pub fn entries(&self) -> impl Iterator<Item = (&str, &TensorEntry, &Path)> {
        self.location
            .iter()
            .map(|(n, &i)| (n.as_str(), &self.files[i].tensors[n], self.files[i].path()))
    }

    /// The entry of tensor `name`, if present.
    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.location
            .get(name)
            .map(|&i| &self.files[i].tensors[name])
    }

    /// Check every tensor the config implies against the files, without reading data.
    /// Returns the problems found (missing, wrong shape, unsupported dtype, unexpected).
    pub fn verify(&self, cfg: &ModelConfig) -> Vec<CheckpointError> {
        let mut problems = Vec::new();
        let expected = expected_tensors(cfg);
        for (name, shape) in &expected {
            match self.location.get(name) {
                None => problems.push(CheckpointError::MissingTensor {
                    path: self.root.clone(),
                    tensor: name.clone(),
                    expected: shape.clone(),
                }),
                Some(&i) => {
                    let e = &self.files[i].tensors[name];
                    if &e.shape != shape {
                        problems.push(CheckpointError::ShapeMismatch {
                            path: self.files[i].path().to_path_buf(),
                            tensor: name.clone(),
                            expected: shape.clone(),
                            found: e.shape.clone(),
                        });
                    }
                    if DiskDtype::parse(&e.dtype).is_none() {
                        problems.push(CheckpointError::UnsupportedDtype {
                            path: self.files[i].path().to_path_buf(),
                            tensor: name.clone(),
                            dtype: e.dtype.clone(),
                        });
                    }
                }
            }
        }
        let names: BTreeSet<&String> = expected.iter().map(|(n, _)| n).collect();
        let mut extra: Vec<String> = self
            .location
            .keys()
            .filter(|n| !names.contains(n))
            .cloned()
            .collect();
        if !extra.is_empty() {
            extra.sort();
            problems.push(CheckpointError::UnexpectedTensors {
                path: self.root.clone(),
                tensors: extra,
            });
        }
        problems
    }
}

/// Every tensor a config implies: full HF name and torch shape, in state-dict order.
pub fn expected_tensors(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let d = cfg.d_model;
    let kv = cfg.n_kv_heads * cfg.head_dim();
    let m = cfg.mlp_hidden_size;
    let v = cfg.embedding_size;
    let mut out = vec![(format!("{HF_PREFIX}wte.weight"), vec![v, d])];
    for i in 0..cfg.n_layers {
        for (n, s) in [
            ("attn_out", vec![d, d]),
            ("attn_norm", vec![d]),
            ("ff_norm", vec![d]),
            ("q_proj", vec![d, d]),
            ("k_proj", vec![kv, d]),
            ("v_proj", vec![kv, d]),
            ("ff_proj", vec![m, d]),
            ("up_proj", vec![m, d]),
            ("ff_out", vec![d, m]),
        ] {
            out.push((format!("{HF_PREFIX}blocks.{i}.{n}.weight"), s));
        }
    }
    out.push((format!("{HF_PREFIX}ln_f.weight"), vec![d]));
    out.push((format!("{HF_PREFIX}ff_out.weight"), vec![v, d]));
    out
}

/// A [`ParamSource`] over checkpoint files; records which tensors were used.
struct FileSource<'a, B: Backend> {
    files: &'a CheckpointFiles,
    device: B::Device,
    dtype: FloatDType,
    used: BTreeSet<String>,
    /// Called after each tensor with `(tensors read, tensors in the checkpoint)`.
    on_tensor: &'a mut dyn FnMut(usize, usize),
}

impl<B: Backend> FileSource<'_, B> {
    fn fetch(&mut self, short: &str, shape: Vec<usize>) -> Result<TensorData, CheckpointError> {
        let name = format!("{HF_PREFIX}{short}");
        let Some(&i) = self.files.location.get(&name) else {
            return Err(CheckpointError::MissingTensor {
                path: self.files.root.clone(),
                tensor: name,
                expected: shape,
            });
        };
        let f = &self.files.files[i];
        let e = &f.tensors[&name];
        if e.shape != shape {
            return Err(CheckpointError::ShapeMismatch {
                path: f.path().to_path_buf(),
                tensor: name,
                expected: shape,
                found: e.shape.clone(),
            });
        }
        let data = read_tensor(f, &name, self.dtype)?;
        self.used.insert(name);
        (self.on_tensor)(self.used.len(), self.files.location.len());
        Ok(data)
    }
}

impl<B: Backend> ParamSource<B> for FileSource<'_, B> {
    type Error = CheckpointError;
    fn matrix(&mut self, name: &str, shape: [usize; 2]) -> Result<Tensor<B, 2>, CheckpointError> {
        let data = self.fetch(name, shape.to_vec())?;
        Ok(Tensor::from_data(
            data,
            (&self.device, DType::from(self.dtype)),
        ))
    }
    fn vector(&mut self, name: &str, len: usize) -> Result<Tensor<B, 1>, CheckpointError> {
        let data = self.fetch(name, vec![len])?;
        Ok(Tensor::from_data(
            data,
            (&self.device, DType::from(self.dtype)),
        ))
    }
}

/// Load a checkpoint directory (with `config.json`) into a model whose parameters have float
/// dtype `dtype` on `device`.
///
/// # Errors
/// Config errors, [`CheckpointError::MissingTensor`], [`CheckpointError::ShapeMismatch`],
/// [`CheckpointError::UnexpectedTensors`] and the file errors of [`CheckpointFiles::open`].
pub fn load_checkpoint<B: Backend>(
    dir: &Path,
    device: &B::Device,
    dtype: FloatDType,
) -> Result<(ModelConfig, LladaModel<B>), CheckpointError> {
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let model = load_weights(dir, &cfg, device, dtype)?;
    Ok((cfg, model))
}

/// Load weights (a checkpoint directory or a `.safetensors` file) for a known config.
///
/// # Errors
/// As [`load_checkpoint`], without the config errors.
pub fn load_weights<B: Backend>(
    path: &Path,
    cfg: &ModelConfig,
    device: &B::Device,
    dtype: FloatDType,
) -> Result<LladaModel<B>, CheckpointError> {
    load_weights_observed(path, cfg, device, dtype, &mut |_, _| {})
}

/// [`load_weights`] calling `on_tensor(read, total)` after each tensor is read (`total` = the
/// tensors of the checkpoint), for a progress bar in the binaries.
///
/// # Errors
/// As [`load_weights`].
pub fn load_weights_observed<B: Backend>(
    path: &Path,
    cfg: &ModelConfig,
    device: &B::Device,
    dtype: FloatDType,
    on_tensor: &mut dyn FnMut(usize, usize),
) -> Result<LladaModel<B>, CheckpointError> {
    let files = CheckpointFiles::open(path)?;
    let mut src = FileSource::<B> {
        files: &files,
        device: device.clone(),
        dtype,
        used: BTreeSet::new(),
        on_tensor,
    };
    let model = LladaModel::from_source(cfg, &mut src)?;
    let mut extra: Vec<String> = files
        .location
        .keys()
        .filter(|n| !src.used.contains(*n))
        .cloned()
        .collect();
    if !extra.is_empty() {
        extra.sort();
        return Err(CheckpointError::UnexpectedTensors {
            path: path.to_path_buf(),
            tensors: extra,
        });
    }
    Ok(model)
}

/// How to write a checkpoint.
#[derive(Debug, Clone)]
pub struct SaveOptions {
    /// On-disk dtype of every tensor (BF16 by default, as the released checkpoints).
    pub dtype: DiskDtype,
    /// Split into shards of at most this many bytes of tensor data (HF `max_shard_size`);
    /// `None` writes a single `model.safetensors`.
    pub max_shard_bytes: Option<u64>,
    /// Replace an existing non-empty destination.
    pub overwrite: bool,
    /// Copy the tokenizer / remote-code files ([`SIDECAR_FILES`]) present in this directory.
    pub copy_sidecars_from: Option<PathBuf>,
}

impl Default for SaveOptions {
    fn default() -> Self {
        Self {
            dtype: DiskDtype::BF16,
            max_shard_bytes: None,
            overwrite: false,
            copy_sidecars_from: None,
        }
    }
}

/// A tensor to be written, materialised only when the writer asks for its bytes.
struct LazyTensor<'a, B: Backend> {
    tensor: &'a NamedTensor<B>,
    shape: Vec<usize>,
    dtype: DiskDtype,
}

impl<B: Backend> safetensors::View for LazyTensor<'_, B> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype.st()
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let data = self.tensor.to_data().convert_dtype(self.dtype.burn());
        std::borrow::Cow::Owned(data.into_bytes().to_vec())
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

/// Save `model` with `cfg` as a Hugging Face checkpoint directory at `dir`: `config.json`,
/// weights (single file or shards + index) with the upstream names, and optionally the
/// tokenizer / remote-code files of a source checkpoint.
///
/// The directory is written as `dir` + `.tmp-<pid>` and renamed into place when complete.
///
/// # Errors
/// [`CheckpointError::Exists`] when `dir` exists, is not empty and `overwrite` is false;
/// [`CheckpointError::Io`] / [`CheckpointError::Write`] on file errors.
pub fn save_checkpoint<B: Backend>(
    model: &LladaModel<B>,
    cfg: &ModelConfig,
    dir: &Path,
    opts: &SaveOptions,
) -> Result<(), CheckpointError> {
    if dir.exists() {
        let non_empty = std::fs::read_dir(dir)
            .map_err(io_err(dir))?
            .next()
            .is_some();
        if non_empty && !opts.overwrite {
            return Err(CheckpointError::Exists {
                path: dir.to_path_buf(),
            });
        }
    }
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "checkpoint".into());
    let tmp = dir.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;

    write_weights(model, &tmp, opts)?;
    let config_path = tmp.join("config.json");
    let mut cfg_json = cfg.to_hf_json();
    cfg_json["torch_dtype"] = json!(match opts.dtype {
        DiskDtype::BF16 => "bfloat16",
        DiskDtype::F16 => "float16",
        DiskDtype::F32 => "float32",
        DiskDtype::F64 => "float64",
    });
    let text = serde_json::to_string_pretty(&cfg_json).expect("JSON value serialises");
    std::fs::write(&config_path, text + "\n").map_err(io_err(&config_path))?;
    if let Some(src) = &opts.copy_sidecars_from {
        for f in sidecar_files(src) {
            let from = src.join(&f);
            if from.is_file() {
                let to = tmp.join(&f);
                std::fs::copy(&from, &to).map_err(io_err(&to))?;
            }
        }
    }
    sync_dir(&tmp)?;

    // Swap into place: old → .old, tmp → dir, remove old.
    if dir.exists() {
        let old = dir.with_file_name(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(dir, &old).map_err(io_err(dir))?;
        std::fs::rename(&tmp, dir).map_err(io_err(dir))?;
        std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
    } else {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        std::fs::rename(&tmp, dir).map_err(io_err(dir))?;
    }
    Ok(())
}

/// The sidecar files of a source checkpoint directory: [`SIDECAR_FILES`], plus the Python
/// modules its `config.json` names in `auto_map` (`"AutoModel": "modeling_x.Cls"` →
/// `modeling_x.py`), so transformers' `from_pretrained(trust_remote_code=True)` opens the
/// saved copy as it opened the source. Files that do not exist are skipped by the caller.
pub fn sidecar_files(src: &Path) -> Vec<String> {
    let mut files: Vec<String> = SIDECAR_FILES.iter().map(|f| f.to_string()).collect();
    let auto_map = std::fs::read_to_string(src.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("auto_map").cloned());
    if let Some(serde_json::Value::Object(map)) = auto_map {
        for v in map.values() {
            // "module.Class", or "repo--module.Class" for code in another repository
            let Some(target) = v.as_str() else { continue };
            let local = target.rsplit("--").next().unwrap_or(target);
            if let Some((module, _class)) = local.rsplit_once('.') {
                let file = format!("{module}.py");
                let plain = !file.contains('/') && !file.contains('\\');
                if plain && !files.contains(&file) {
                    files.push(file);
                }
            }
        }
    }
    files
}

fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let p = entry.map_err(io_err(dir))?.path();
        File::open(&p)
            .and_then(|f| f.sync_all())
            .map_err(io_err(&p))?;
    }
    Ok(())
}

/// Write the weight files (and index when sharded) of `model` into `dir`.
fn write_weights<B: Backend>(
    model: &LladaModel<B>,
    dir: &Path,
    opts: &SaveOptions,
) -> Result<(), CheckpointError> {
    let named = model.named_tensors();
    let tensors: Vec<(String, LazyTensor<'_, B>)> = named
        .iter()
        .map(|(n, t)| {
            (
                format!("{HF_PREFIX}{n}"),
                LazyTensor {
                    tensor: t,
                    shape: t.shape(),
                    dtype: opts.dtype,
                },
            )
        })
        .collect();
    let total: u64 = tensors
        .iter()
        .map(|(_, t)| safetensors::View::data_len(t) as u64)
        .sum();
    // Greedy sharding in state-dict order, as HF `shard_checkpoint`.
    let mut shards: Vec<Vec<(String, LazyTensor<'_, B>)>> = vec![Vec::new()];
    let mut current = 0u64;
    for (name, t) in tensors {
        let len = safetensors::View::data_len(&t) as u64;
        if let Some(max) = opts.max_shard_bytes
            && current > 0
            && current + len > max
        {
            shards.push(Vec::new());
            current = 0;
        }
        current += len;
        shards.last_mut().expect("non-empty").push((name, t));
    }
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    if opts.max_shard_bytes.is_none() {
        let path = dir.join(SINGLE_FILE);
        let shard = shards.pop().expect("one shard");
        return safetensors::serialize_to_file(shard, Some(meta), &path).map_err(|e| {
            CheckpointError::Write {
                path,
                reason: e.to_string(),
            }
        });
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    for (k, shard) in shards.into_iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, n);
        for (name, _) in &shard {
            weight_map.insert(name.clone(), file.clone());
        }
        let path = dir.join(&file);
        safetensors::serialize_to_file(shard, Some(meta.clone()), &path).map_err(|e| {
            CheckpointError::Write {
                path,
                reason: e.to_string(),
            }
        })?;
    }
    let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    let path = dir.join(INDEX_FILE);
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&index).expect("JSON") + "\n",
    )
    .map_err(io_err(&path))
}

#[cfg(test)]
mod props {
    //! `model.safetensors.index.json` of any shape next to real shards: the checkpoint opens,
    //! or an error names the index (or the shard file it points at); never a panic
    //! (`PROPTEST_CASES=10000` for the long run).
    use super::*;
    use proptest::prelude::*;

    /// A tiny model saved in 3 shards, once per test process.
    fn shards() -> &'static (tempfile::TempDir, Vec<String>, Vec<String>) {
        static SHARDS: std::sync::OnceLock<(tempfile::TempDir, Vec<String>, Vec<String>)> =
            std::sync::OnceLock::new();
        SHARDS.get_or_init(|| {
            let tmp = tempfile::tempdir().unwrap();
            let cfg = ModelConfig::tiny();
            let model = crate::init::init_model::<crate::backend::Cpu>(
                &cfg,
                1,
                &Default::default(),
                FloatDType::F32,
            );
            let dir = tmp.path().join("ck");
            let opts = SaveOptions {
                max_shard_bytes: Some(60_000),
                ..Default::default()
            };
            save_checkpoint(&model, &cfg, &dir, &opts).unwrap();
            let index: Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join(INDEX_FILE)).unwrap())
                    .unwrap();
            let map = index["weight_map"].as_object().unwrap();
            let names: Vec<String> = map.keys().cloned().collect();
            let mut files: Vec<String> = map
                .values()
                .map(|v| v.as_str().unwrap().to_string())
                .collect();
            files.sort();
            files.dedup();
            (tmp, names, files)
        })
    }

    fn shard_value(files: Vec<String>) -> impl Strategy<Value = Value> {
        prop_oneof![
            proptest::sample::select(files).prop_map(Value::from),
            Just(Value::from("../model.safetensors")),
            Just(Value::from("sub/model-1.safetensors")),
            Just(Value::from("missing.safetensors")),
            Just(Value::from("")),
            Just(Value::Null),
            any::<i64>().prop_map(Value::from),
            Just(serde_json::json!(["x"])),
        ]
    }

    proptest! {
        #[test]
        fn any_shard_index_opens_or_names_the_file(
            picks in proptest::collection::vec((any::<prop::sample::Index>(), any::<bool>()), 0..24),
            extra in proptest::collection::btree_map("[a-z.]{1,12}", Just(()), 0..3),
            shard in proptest::collection::vec(any::<prop::sample::Index>(), 24),
            bad_values in proptest::collection::vec(shard_value(vec!["x".into()]), 24),
            top in prop_oneof![Just(0u8), Just(1), Just(2)],
            raw in any::<String>(),
        ) {
            let (tmp, names, files) = shards();
            let dir = tempfile::tempdir().unwrap();
            for f in files {
                std::fs::copy(tmp.path().join("ck").join(f), dir.path().join(f)).unwrap();
            }
            let mut map = serde_json::Map::new();
            for (i, (pick, keep_right_shard)) in picks.iter().enumerate() {
                let name = pick.get(names).clone();
                let v = if *keep_right_shard {
                    Value::from(shard[i].get(files).clone())
                } else {
                    bad_values[i].clone()
                };
                map.insert(name, v);
            }
            for k in extra.keys() {
                map.insert(format!("model.transformer.{k}"), Value::from(files[0].clone()));
            }
            let text = match top {
                0 => serde_json::json!({"metadata": {"total_size": 1}, "weight_map": map}).to_string(),
                1 => serde_json::json!({"weight_map": [map]}).to_string(),
                _ => raw.clone(),
            };
            std::fs::write(dir.path().join(INDEX_FILE), text).unwrap();
            match CheckpointFiles::open(dir.path()) {
                Ok(f) => prop_assert!(f.location.len() <= names.len()),
                Err(e) => {
                    let msg = e.to_string();
                    prop_assert!(
                        msg.contains(INDEX_FILE) || msg.contains(".safetensors"),
                        "{}",
                        msg
                    );
                }
            }
        }
    }
}
