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
                // checked: a hostile shape must not overflow (found by the property tests)
                let want = shape
                    .iter()
                    .try_fold(size as u64, |acc, &d| acc.checked_mul(d as u64));
                let Some(want) = want else {
                    return Err(bad(format!(
                        "tensor `{name}`: {dtype} {shape:?} has more than 2^64 bytes"
                    )));
                };
                if offs[1] - offs[0] != want {
                    return Err(bad(format!(
                        "tensor `{name}`: {dtype} {shape:?} needs {want} bytes but data_offsets span {}",
                        offs[1] - offs[0]
                    )));
                }
            }
            let (Some(start), Some(end)) = (
                data_start.checked_add(offs[0]),
                data_start.checked_add(offs[1]),
            ) else {
                return Err(bad(format!(
                    "tensor `{name}`: data_offsets {offs:?} are past any file length"
                )));
            };
            tensors.insert(
                name,
                TensorEntry {
                    dtype: dtype.to_string(),
                    shape,
                    start,
                    end,
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

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// A header entry: a dtype (known, unknown or missing), a shape and offsets that are
        /// often consistent, sometimes huge or reversed.
        fn entry() -> impl Strategy<Value = serde_json::Value> {
            let dtype = prop_oneof![
                Just(Some("F32".to_string())),
                Just(Some("BF16".to_string())),
                Just(Some("I64".to_string())),
                Just(Some("BOOL".to_string())),
                "[A-Z0-9]{0,5}".prop_map(Some),
                Just(None),
            ];
            let dim = prop_oneof![0u64..5, Just(u64::MAX), Just(1 << 40), any::<u64>()];
            let shape = proptest::collection::vec(dim, 0..4);
            let off = prop_oneof![0u64..64, Just(u64::MAX), any::<u64>()];
            (dtype, shape, off.clone(), off, any::<bool>(), any::<u8>()).prop_map(
                |(dtype, shape, a, b, consistent, junk)| {
                    let mut e = serde_json::Map::new();
                    if let Some(d) = &dtype {
                        e.insert("dtype".into(), d.as_str().into());
                    }
                    match junk % 7 {
                        0 => {
                            e.insert("shape".into(), "no".into());
                        }
                        1 => {
                            e.insert("shape".into(), serde_json::json!([-1, 2.5]));
                        }
                        _ => {
                            e.insert("shape".into(), serde_json::json!(shape));
                        }
                    }
                    let size = dtype.as_deref().and_then(dtype_size).unwrap_or(1) as u64;
                    let n = shape
                        .iter()
                        .try_fold(size, |acc, &d| acc.checked_mul(d))
                        .unwrap_or(1);
                    let offs = if consistent && n < 64 {
                        serde_json::json!([a % 8, a % 8 + n])
                    } else if junk % 5 == 0 {
                        serde_json::json!([a])
                    } else {
                        serde_json::json!([a, b])
                    };
                    e.insert("data_offsets".into(), offs);
                    serde_json::Value::Object(e)
                },
            )
        }

        fn check(header: &[u8], len_field: Option<u64>, data: &[u8]) {
            let mut f = tempfile::NamedTempFile::new().unwrap();
            let n = len_field.unwrap_or(header.len() as u64);
            f.write_all(&n.to_le_bytes()).unwrap();
            f.write_all(header).unwrap();
            f.write_all(data).unwrap();
            f.flush().unwrap();
            let file_len = (8 + header.len() + data.len()) as u64;
            match SafetensorsFile::open(f.path()) {
                Ok(st) => {
                    for (name, e) in &st.tensors {
                        assert!(e.start <= e.end && e.end <= file_len, "{name}: {e:?}");
                        if let Some(size) = dtype_size(&e.dtype) {
                            let want: u64 =
                                e.shape.iter().map(|&d| d as u64).product::<u64>() * size as u64;
                            assert_eq!(e.len_bytes(), want, "{name}");
                        }
                        assert_eq!(st.read_bytes(name).unwrap().len() as u64, e.len_bytes());
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    assert!(
                        msg.contains(&f.path().display().to_string()),
                        "error does not name the file: {msg}"
                    );
                }
            }
        }

        proptest! {
            // PROPTEST_CASES=10000 for the documented long run (crates/README.md)
            /// Structured headers: never a panic; every accepted tensor fits the file and
            /// its dtype × shape; every error names the file.
            #[test]
            fn structured_headers_never_panic(
                entries in proptest::collection::btree_map("[a-z.]{0,6}", entry(), 0..4),
                meta in proptest::option::of(proptest::collection::btree_map("[a-z]{1,4}", any::<i32>(), 0..3)),
                data in proptest::collection::vec(any::<u8>(), 0..80),
            ) {
                let mut h = serde_json::Map::new();
                for (k, v) in entries {
                    h.insert(k, v);
                }
                if let Some(m) = meta {
                    h.insert("__metadata__".into(), serde_json::json!(m));
                }
                let text = serde_json::Value::Object(h).to_string();
                check(text.as_bytes(), None, &data);
            }

            /// Arbitrary bytes as the header, and arbitrary header length fields.
            #[test]
            fn arbitrary_bytes_never_panic(
                header in proptest::collection::vec(any::<u8>(), 0..200),
                len in proptest::option::of(prop_oneof![0u64..300, Just(u64::MAX), any::<u64>()]),
                data in proptest::collection::vec(any::<u8>(), 0..40),
            ) {
                check(&header, len, &data);
            }
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
