//! Reading safetensors files one tensor at a time, shared by the model checkpoints
//! (`mmada-model`) and the MAGVIT-v2 image tokenizer (`mmada-vq`).
//!
//! * The header is parsed and validated against the file length on [`SafetensorsFile::open`]:
//!   JSON object, every tensor with a dtype, a shape and `data_offsets` whose span matches
//!   `dtype size × Π shape` for every dtype of the format, no data past the end of the file
//!   (the first such tensor by end offset is named). Format: the `safetensors` crate's
//!   `README` (8-byte little-endian header length, JSON header, data).
//! * Data is read on demand with positional reads ([`SafetensorsFile::read_bytes`]) into a
//!   buffer of one tensor: the file is never mapped or read whole, so a loader's peak memory
//!   is its model plus about one tensor (mapped pages would count in the resident set too).
//! * No conversion here: callers turn the little-endian bytes into their tensors.
//!
//! Writing goes through the reference `safetensors` crate in `mmada-model`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Largest header accepted (as the reference reader: 100 MB).
pub const MAX_HEADER: u64 = 100_000_000;

/// Error reading a safetensors file. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    /// An OS error on the file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid safetensors file.
    #[error("{path}: not a valid safetensors file: {reason}")]
    NotSafetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tensor's data extends past the end of the file.
    #[error(
        "{path}: file is truncated: tensor `{tensor}` needs bytes up to {needed} but the file has {file_len} (re-download the file)"
    )]
    Truncated {
        /// The file.
        path: PathBuf,
        /// The first tensor (by end offset) that does not fit.
        tensor: String,
        /// Bytes needed.
        needed: u64,
        /// Actual file length.
        file_len: u64,
    },
}

/// Bytes per element of a safetensors dtype string (`"BF16"` → 2), `None` for a string the
/// format does not define.
pub fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" => 8,
        _ => return None,
    })
}

/// One tensor's entry in a safetensors header, with absolute file offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    /// The header dtype string (`"BF16"`, `"F32"`, `"I64"`, …), kept even when unknown so a
    /// caller can name it in an error.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    pub start: u64,
    /// Absolute end offset (exclusive).
    pub end: u64,
}

impl TensorEntry {
    /// Number of bytes of data.
    pub fn len_bytes(&self) -> u64 {
        self.end - self.start
    }
}

/// A safetensors file whose header has been read and validated; data is read on demand.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    file: File,
    /// Tensors by name.
    pub tensors: BTreeMap<String, TensorEntry>,
    /// The `__metadata__` map (non-string values kept as their JSON text).
    pub metadata: BTreeMap<String, String>,
}

impl SafetensorsFile {
    /// Open `path` and validate its header against the file length.
    ///
    /// # Errors
    /// [`SafetensorsError::Io`], [`SafetensorsError::NotSafetensors`] (short file, implausible
    /// header length, header not a JSON object, a tensor without dtype / shape / valid
    /// `data_offsets`, offsets inconsistent with dtype and shape),
    /// [`SafetensorsError::Truncated`] (data past the end of the file).
    pub fn open(path: &Path) -> Result<Self, SafetensorsError> {
        let bad = |reason: String| SafetensorsError::NotSafetensors {
            path: path.to_path_buf(),
            reason,
        };
        let io = |source| SafetensorsError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let mut n = [0u8; 8];
        file.read_exact(&mut n).map_err(|_| {
            bad(format!(
                "file is {file_len} bytes, shorter than the 8-byte header length"
            ))
        })?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER {
            return Err(bad(format!(
                "header length {n} is implausible (> {MAX_HEADER} bytes)"
            )));
        }
        if 8 + n > file_len {
            return Err(bad(format!(
                "header length {n} exceeds the file length {file_len}"
            )));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header).map_err(io)?;
        let header: Value =
            serde_json::from_slice(&header).map_err(|e| bad(format!("header is not JSON: {e}")))?;
        let Value::Object(map) = header else {
            return Err(bad("header is not a JSON object".into()));
        };
        let data_start = 8 + n;
        let mut tensors = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for (name, v) in map {
            if name == "__metadata__" {
                if let Value::Object(m) = v {
                    for (k, v) in m {
                        let v = v
                            .as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string());
                        metadata.insert(k, v);
                    }
                }
                continue;
            }
            let dtype = v["dtype"]
                .as_str()
                .ok_or_else(|| bad(format!("tensor `{name}` has no dtype")))?;
            let shape: Vec<usize> = v["shape"]
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect())
                .ok_or_else(|| bad(format!("tensor `{name}` has no valid shape")))?;
            let offs: Vec<u64> = v["data_offsets"]
                .as_array()
                .and_then(|a| a.iter().map(Value::as_u64).collect())
                .filter(|o: &Vec<u64>| o.len() == 2 && o[0] <= o[1])
                .ok_or_else(|| bad(format!("tensor `{name}` has no valid data_offsets")))?;
            if let Some(size) = dtype_size(dtype) {
                let want = shape.iter().product::<usize>() as u64 * size as u64;
                if offs[1] - offs[0] != want {
                    return Err(bad(format!(
                        "tensor `{name}`: {dtype} {shape:?} needs {want} bytes but data_offsets span {}",
                        offs[1] - offs[0]
                    )));
                }
            }
            tensors.insert(
                name,
                TensorEntry {
                    dtype: dtype.to_string(),
                    shape,
                    start: data_start + offs[0],
                    end: data_start + offs[1],
                },
            );
        }
        if let Some((name, e)) = tensors
            .iter()
            .filter(|(_, e)| e.end > file_len)
            .min_by_key(|(_, e)| e.end)
        {
            return Err(SafetensorsError::Truncated {
                path: path.to_path_buf(),
                tensor: name.clone(),
                needed: e.end,
                file_len,
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            tensors,
            metadata,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The raw little-endian bytes of tensor `name`, read with one positional read.
    ///
    /// # Panics
    /// If `name` is not in [`Self::tensors`] (look it up first: callers name a missing
    /// tensor in their own error, with the shape they expected).
    ///
    /// # Errors
    /// [`SafetensorsError::Io`].
    pub fn read_bytes(&self, name: &str) -> Result<Vec<u8>, SafetensorsError> {
        let e = &self.tensors[name];
        let mut bytes = vec![0u8; e.len_bytes() as usize];
        self.file
            .read_exact_at(&mut bytes, e.start)
            .map_err(|source| SafetensorsError::Io {
                path: self.path.clone(),
                source,
            })?;
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A file with `header` (JSON text) followed by `data`.
    fn file(header: &str, data: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
        f.write_all(header.as_bytes()).unwrap();
        f.write_all(data).unwrap();
        f
    }

    #[test]
    fn reads_entries_metadata_and_bytes() {
        let h = r#"{"__metadata__":{"format":"pt","n":3},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"I64","shape":[1],"data_offsets":[8,16]}}"#;
        let mut data = Vec::new();
        data.extend(1.5f32.to_le_bytes());
        data.extend((-2.0f32).to_le_bytes());
        data.extend(7i64.to_le_bytes());
        let f = file(h, &data);
        let st = SafetensorsFile::open(f.path()).unwrap();
        assert_eq!(st.metadata["format"], "pt");
        assert_eq!(st.metadata["n"], "3");
        assert_eq!(st.tensors["a"].shape, vec![2]);
        assert_eq!(st.tensors["b"].start, 8 + h.len() as u64 + 8);
        assert_eq!(st.read_bytes("a").unwrap(), data[..8]);
        assert_eq!(st.read_bytes("b").unwrap(), 7i64.to_le_bytes());
    }

    #[test]
    fn rejects_inconsistent_offsets_naming_the_tensor() {
        let h = r#"{"w":{"dtype":"BF16","shape":[3],"data_offsets":[0,4]}}"#;
        let err = SafetensorsFile::open(file(h, &[0; 4]).path()).unwrap_err();
        assert!(
            matches!(&err, SafetensorsError::NotSafetensors { reason, .. } if reason.contains("`w`") && reason.contains("needs 6 bytes")),
            "{err}"
        );
    }

    #[test]
    fn names_the_first_truncated_tensor() {
        let h = r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#;
        let err = SafetensorsFile::open(file(h, &[0; 10]).path()).unwrap_err();
        match err {
            SafetensorsError::Truncated {
                tensor,
                needed,
                file_len,
                ..
            } => {
                assert_eq!(tensor, "y");
                assert_eq!(needed, 8 + h.len() as u64 + 16);
                assert_eq!(file_len, 8 + h.len() as u64 + 10);
            }
            e => panic!("{e}"),
        }
    }

    #[test]
    fn rejects_short_file_and_bad_header() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[1, 2, 3]).unwrap();
        let err = SafetensorsFile::open(f.path()).unwrap_err();
        assert!(err.to_string().contains("shorter than the 8-byte"), "{err}");
        let err = SafetensorsFile::open(file("[1,2]", &[]).path()).unwrap_err();
        assert!(err.to_string().contains("not a JSON object"), "{err}");
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&1000u64.to_le_bytes()).unwrap();
        let err = SafetensorsFile::open(f.path()).unwrap_err();
        assert!(err.to_string().contains("exceeds the file length"), "{err}");
    }
}
