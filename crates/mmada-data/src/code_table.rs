//! Pre-tokenized image codes: `mmada-train data pretokenize` ([`pretokenize`]) writes one
//! parquet row per distinct image and preprocessing (issue 8 item 4), and the training data
//! reads such tables back ([`CodeTable`], recipe `data.image_tokenizer.codes`) so large
//! datasets are encoded once, offline. The sibling of the per-image [`crate::CodeCache`].
//!
//! Parquet schema (one row per image and preprocessing):
//!
//! | column | type | meaning |
//! |---|---|---|
//! | `source` | utf8 | image path as the manifest resolved it, or `manifest:file:line` for inline bytes |
//! | `file_hash` | utf8 | FNV-1a-128 of the encoded image file bytes, 32 hex digits ([`crate::codes::fnv1a128`]) |
//! | `resolution` | uint32 | preprocessing side `R` |
//! | `mode` | utf8 | `center_crop` or `squash` |
//! | `coder` | utf8 | the image tokenizer id (`magvitv2:<weights hash>`) |
//! | `codes` | `list<uint32>` | `(R/16)²` codes, row-major |
//!
//! Lookups go by `(file_hash, resolution, mode)`, so a moved or renamed file still hits.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::codes::fnv1a128;
use crate::error::DataError;
use crate::example::{Example, ImageRef, Task};
use crate::image::{ImageCoder, Pixels, Preprocess, ResizeMode, decode_image, image_transform};
use crate::manifest::Manifest;
use crate::reader::ExampleStream;
use arrow_array::builder::{ListBuilder, StringBuilder, UInt32Builder};
use arrow_array::cast::AsArray;
use arrow_array::types::UInt32Type;
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema};

/// Errors reading or writing a code table (and of [`pretokenize`]).
#[derive(Debug, thiserror::Error)]
pub enum CodeTableError {
    /// File system error.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// Parquet / Arrow error, or a column with the wrong name or type.
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Reading a manifest or an image failed (names manifest / file / line).
    #[error(transparent)]
    Data(#[from] DataError),
    /// The image coder failed.
    #[error("image tokenizer `{coder}`: {message}")]
    Coder {
        /// Coder id.
        coder: String,
        /// Its message.
        message: String,
    },
    /// The table's codes were made by another image tokenizer than the configured one.
    #[error(
        "{path}: row {row} ({source_name}) was encoded by `{table_coder}` but the configured image tokenizer is `{coder}`: re-run `mmada-train data pretokenize` with this checkpoint, or drop the table from `data.image_tokenizer.codes`"
    )]
    CoderMismatch {
        /// The table file.
        path: PathBuf,
        /// Row in the table.
        row: usize,
        /// Its `source` column.
        source_name: String,
        /// Its `coder` column.
        table_coder: String,
        /// The configured coder id.
        coder: String,
    },
}

/// One image's codes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeRow {
    /// Image path (or `manifest:file:line` for inline bytes).
    pub source: String,
    /// FNV-1a-128 of the file bytes, 32 hex digits.
    pub file_hash: String,
    /// Preprocessing side.
    pub resolution: u32,
    /// Crop or squash.
    pub mode: ResizeMode,
    /// Image tokenizer id.
    pub coder: String,
    /// Codes, row-major.
    pub codes: Vec<u32>,
}

/// The hash column value of image file bytes.
pub fn file_hash(bytes: &[u8]) -> String {
    format!("{:032x}", fnv1a128(bytes))
}

fn mode_str(m: ResizeMode) -> &'static str {
    match m {
        ResizeMode::CenterCrop => "center_crop",
        ResizeMode::Squash => "squash",
    }
}

fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("source", DataType::Utf8, false),
        Field::new("file_hash", DataType::Utf8, false),
        Field::new("resolution", DataType::UInt32, false),
        Field::new("mode", DataType::Utf8, false),
        Field::new("coder", DataType::Utf8, false),
        Field::new(
            "codes",
            DataType::List(Arc::new(Field::new("item", DataType::UInt32, true))),
            false,
        ),
    ]))
}

/// Writes `rows` to a parquet file (zstd), through a temporary file and a rename.
///
/// # Errors
/// [`CodeTableError`] on I/O or encoding failures.
pub fn write_table(path: &Path, rows: &[CodeRow]) -> Result<(), CodeTableError> {
    let fmt = |e: &dyn std::fmt::Display| CodeTableError::Format {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let mut source = StringBuilder::new();
    let mut hash = StringBuilder::new();
    let mut res = UInt32Builder::new();
    let mut mode = StringBuilder::new();
    let mut coder = StringBuilder::new();
    let mut codes = ListBuilder::new(UInt32Builder::new());
    for r in rows {
        source.append_value(&r.source);
        hash.append_value(&r.file_hash);
        res.append_value(r.resolution);
        mode.append_value(mode_str(r.mode));
        coder.append_value(&r.coder);
        codes.values().append_slice(&r.codes);
        codes.append(true);
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(source.finish()),
        Arc::new(hash.finish()),
        Arc::new(res.finish()),
        Arc::new(mode.finish()),
        Arc::new(coder.finish()),
        Arc::new(codes.finish()),
    ];
    let batch = RecordBatch::try_new(schema(), cols).map_err(|e| fmt(&e))?;
    let tmp = path.with_extension("parquet.tmp");
    let io = |p: &Path, source| CodeTableError::Io {
        path: p.to_path_buf(),
        source,
    };
    let f = File::create(&tmp).map_err(|e| io(&tmp, e))?;
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
        .build();
    let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), Some(props))
        .map_err(|e| fmt(&e))?;
    w.write(&batch).map_err(|e| fmt(&e))?;
    w.close().map_err(|e| fmt(&e))?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))
}

/// Reads every row of a code table.
///
/// # Errors
/// [`CodeTableError`] when the file is missing, not parquet, or lacks a column / has another type.
pub fn read_table(path: &Path) -> Result<Vec<CodeRow>, CodeTableError> {
    // parquet 60.1 panics on some damaged files (`file/metadata/mod.rs:1043`, "column start
    // and length should not be negative"; found by `props::any_code_table_file_reads_or_names_the_file`)
    crate::error::catch_panic(
        || read_table_unguarded(path),
        "a panic in the parquet decoder",
    )
    .unwrap_or_else(|why| {
        Err(CodeTableError::Format {
            path: path.to_path_buf(),
            message: format!("damaged file: the parquet decoder failed ({why})"),
        })
    })
}

/// [`read_table`] without the panic guard.
fn read_table_unguarded(path: &Path) -> Result<Vec<CodeRow>, CodeTableError> {
    let fmt = |message: String| CodeTableError::Format {
        path: path.to_path_buf(),
        message,
    };
    let f = File::open(path).map_err(|source| CodeTableError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
        .map_err(|e| fmt(format!("not a parquet file: {e}")))?
        .build()
        .map_err(|e| fmt(e.to_string()))?;
    let mut out = vec![];
    for batch in reader {
        let batch = batch.map_err(|e| fmt(e.to_string()))?;
        let col = |name: &str| {
            batch.column_by_name(name).cloned().ok_or_else(|| {
                fmt(format!(
                    "missing column `{name}` (expected source, file_hash, resolution, mode, coder, codes as written by `mmada-train data pretokenize`)"
                ))
            })
        };
        let strs = |name: &str| -> Result<Vec<String>, CodeTableError> {
            let c = col(name)?;
            let a = c.as_string_opt::<i32>().ok_or_else(|| {
                fmt(format!(
                    "column `{name}` is {}, expected utf8",
                    c.data_type()
                ))
            })?;
            Ok((0..a.len()).map(|i| a.value(i).to_string()).collect())
        };
        let source = strs("source")?;
        let hash = strs("file_hash")?;
        let mode = strs("mode")?;
        let coder = strs("coder")?;
        let res_col = col("resolution")?;
        let res = res_col.as_primitive_opt::<UInt32Type>().ok_or_else(|| {
            fmt(format!(
                "column `resolution` is {}, expected uint32",
                res_col.data_type()
            ))
        })?;
        let codes_col = col("codes")?;
        let codes = codes_col.as_list_opt::<i32>().ok_or_else(|| {
            fmt(format!(
                "column `codes` is {}, expected list<uint32>",
                codes_col.data_type()
            ))
        })?;
        for i in 0..batch.num_rows() {
            let mode = match mode[i].as_str() {
                "center_crop" => ResizeMode::CenterCrop,
                "squash" => ResizeMode::Squash,
                m => {
                    return Err(fmt(format!(
                        "row {}: mode `{m}`, expected center_crop or squash",
                        out.len()
                    )));
                }
            };
            let v = codes.value(i);
            let v = v.as_primitive_opt::<UInt32Type>().ok_or_else(|| {
                fmt(format!(
                    "column `codes` holds {}, expected uint32",
                    v.data_type()
                ))
            })?;
            out.push(CodeRow {
                source: source[i].clone(),
                file_hash: hash[i].clone(),
                resolution: res.value(i),
                mode,
                coder: coder[i].clone(),
                codes: v.values().to_vec(),
            });
        }
    }
    Ok(out)
}

/// A code table in memory, looked up by `(file hash, resolution, mode)`.
#[derive(Debug, Clone)]
pub struct CodeTable {
    path: PathBuf,
    rows: Vec<CodeRow>,
    index: HashMap<(String, u32, ResizeMode), usize>,
}

impl CodeTable {
    /// Reads a table ([`read_table`]).
    ///
    /// # Errors
    /// As [`read_table`].
    pub fn read(path: &Path) -> Result<Self, CodeTableError> {
        let rows = read_table(path)?;
        Ok(Self::from_rows(path, rows))
    }

    /// A table from rows (`path` names it in errors).
    pub fn from_rows(path: &Path, rows: Vec<CodeRow>) -> Self {
        let index = rows
            .iter()
            .enumerate()
            .map(|(i, r)| ((r.file_hash.clone(), r.resolution, r.mode), i))
            .collect();
        CodeTable {
            path: path.to_path_buf(),
            rows,
            index,
        }
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether the table has no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The row of an image's bytes under `p`, if any.
    pub fn lookup(&self, image_bytes: &[u8], p: &Preprocess) -> Option<&CodeRow> {
        self.index
            .get(&(file_hash(image_bytes), p.resolution, p.mode))
            .map(|&i| &self.rows[i])
    }

    /// Replaces the path / bytes image of every example found in the table by its codes;
    /// returns how many were replaced. Unreadable files are left for the image tokenizer
    /// (which reports them with the row).
    ///
    /// # Errors
    /// [`CodeTableError::CoderMismatch`] when `coder_id` is given and a hit was encoded by
    /// another tokenizer.
    pub fn fill(
        &self,
        examples: &mut [Example],
        p: &Preprocess,
        coder_id: Option<&str>,
    ) -> Result<usize, CodeTableError> {
        let mut n = 0;
        for ex in examples {
            let bytes = match &ex.image {
                Some(ImageRef::Path(path)) => match std::fs::read(path) {
                    Ok(b) => b,
                    Err(_) => continue,
                },
                Some(ImageRef::Bytes(b)) => b.clone(),
                _ => continue,
            };
            let Some(row) = self.lookup(&bytes, p) else {
                continue;
            };
            if let Some(c) = coder_id
                && c != row.coder
            {
                let i = self
                    .rows
                    .iter()
                    .position(|r| std::ptr::eq(r, row))
                    .unwrap_or(0);
                return Err(CodeTableError::CoderMismatch {
                    path: self.path.clone(),
                    row: i,
                    source_name: row.source.clone(),
                    table_coder: row.coder.clone(),
                    coder: c.to_string(),
                });
            }
            ex.image = Some(ImageRef::Codes(row.codes.clone()));
            n += 1;
        }
        Ok(n)
    }
}

/// Images per encoder call in [`pretokenize`].
const ENCODE_BATCH: usize = 16;

/// The preprocessing of a manifest's images: `image_tokenizer.t2i_mode` for t2i data,
/// `mmu_mode` otherwise, at `resolution`.
pub fn preprocess_for(
    task: Option<Task>,
    resolution: u32,
    t2i: ResizeMode,
    mmu: ResizeMode,
) -> Preprocess {
    Preprocess {
        resolution,
        mode: if task == Some(Task::T2i) { t2i } else { mmu },
    }
}

/// `mmada-train data pretokenize`: encodes every distinct image (by file hash and
/// preprocessing) of the manifests, each with its preprocessing, and writes the table to
/// `out` ([`write_table`]). Returns the number of rows written.
///
/// # Errors
/// [`CodeTableError::Data`] naming manifest / file / line for an unreadable record or image,
/// [`CodeTableError::Coder`], and the write errors.
pub fn pretokenize(
    manifests: &[(Manifest, Preprocess)],
    data_root: Option<&Path>,
    coder: &dyn ImageCoder,
    out: &Path,
) -> Result<usize, CodeTableError> {
    pretokenize_observed(manifests, data_root, coder, out, &mut |_| {})
}

/// [`pretokenize`] calling `on_encoded(images encoded so far)` after each encoder batch (for
/// a progress bar in the binary).
///
/// # Errors
/// As [`pretokenize`].
pub fn pretokenize_observed(
    manifests: &[(Manifest, Preprocess)],
    data_root: Option<&Path>,
    coder: &dyn ImageCoder,
    out: &Path,
    on_encoded: &mut dyn FnMut(usize),
) -> Result<usize, CodeTableError> {
    let coder_id = coder.id();
    let mut rows: Vec<CodeRow> = vec![];
    let mut seen = std::collections::HashSet::new();
    // (source, hash, preprocess, pixels) waiting for the encoder
    let mut todo: Vec<(String, String, Preprocess, Pixels)> = vec![];
    let mut flush = |todo: &mut Vec<(String, String, Preprocess, Pixels)>,
                     rows: &mut Vec<CodeRow>|
     -> Result<(), CodeTableError> {
        if todo.is_empty() {
            return Ok(());
        }
        let pixels: Vec<Pixels> = todo.iter().map(|t| t.3.clone()).collect();
        let codes = coder.encode(&pixels).map_err(|e| CodeTableError::Coder {
            coder: coder_id.clone(),
            message: e.to_string(),
        })?;
        if codes.len() != todo.len() {
            return Err(CodeTableError::Coder {
                coder: coder_id.clone(),
                message: format!(
                    "returned {} code lists for {} images",
                    codes.len(),
                    todo.len()
                ),
            });
        }
        for ((source, file_hash, p, _), codes) in todo.drain(..).zip(codes) {
            rows.push(CodeRow {
                source,
                file_hash,
                resolution: p.resolution,
                mode: p.mode,
                coder: coder_id.clone(),
                codes,
            });
        }
        on_encoded(rows.len());
        Ok(())
    };
    for (manifest, p) in manifests {
        let mut stream = ExampleStream::open(manifest.clone(), data_root)?;
        for ex in stream.by_ref() {
            let ex = ex?;
            let bad = |image: String, message: String| DataError::Image {
                at: Box::new(ex.source.clone()),
                field: "image",
                image,
                message,
            };
            let (bytes, source) = match &ex.image {
                Some(ImageRef::Path(path)) => (
                    std::fs::read(path)
                        .map_err(|e| bad(path.display().to_string(), e.to_string()))?,
                    path.display().to_string(),
                ),
                Some(ImageRef::Bytes(b)) => (b.clone(), ex.source.to_string()),
                _ => continue,
            };
            let hash = file_hash(&bytes);
            if !seen.insert((hash.clone(), p.resolution, p.mode)) {
                continue;
            }
            let img = decode_image(&bytes).map_err(|e| bad(source.clone(), e.to_string()))?;
            let px = image_transform(&img, p).map_err(|e| bad(source.clone(), e.to_string()))?;
            // one encoder call holds one image size
            if todo.first().is_some_and(|t| t.3.shape != px.shape) {
                flush(&mut todo, &mut rows)?;
            }
            todo.push((source, hash, *p, px));
            if todo.len() == ENCODE_BATCH {
                flush(&mut todo, &mut rows)?;
            }
        }
    }
    flush(&mut todo, &mut rows)?;
    write_table(out, &rows)?;
    Ok(rows.len())
}

#[cfg(test)]
mod props {
    //! Code tables as files come: a valid table with bytes flipped, cut short or appended
    //! to, and arbitrary bytes, read back as rows or as an error naming the file; never a
    //! panic (`PROPTEST_CASES=10000` for the long run).
    use super::*;
    use proptest::prelude::*;

    fn valid_table() -> &'static [u8] {
        static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        BYTES.get_or_init(|| {
            let tmp = tempfile::tempdir().unwrap();
            let p = tmp.path().join("t.parquet");
            let rows: Vec<CodeRow> = (0..5)
                .map(|i| CodeRow {
                    source: format!("img{i}.png"),
                    file_hash: file_hash(&[i as u8]),
                    resolution: 32,
                    mode: ResizeMode::Squash,
                    coder: "coder".into(),
                    codes: vec![i; 4],
                })
                .collect();
            write_table(&p, &rows).unwrap();
            std::fs::read(&p).unwrap()
        })
    }

    proptest! {
        #[test]
        fn any_code_table_file_reads_or_names_the_file(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
            cut in proptest::option::of(any::<prop::sample::Index>()),
            tail in proptest::collection::vec(any::<u8>(), 0..16),
            raw in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..256)),
        ) {
            let mut bytes = match &raw {
                Some(r) => r.clone(),
                None => valid_table().to_vec(),
            };
            if !bytes.is_empty() {
                for (i, b) in &flips {
                    let i = i.index(bytes.len());
                    bytes[i] ^= b;
                }
                if let Some(c) = cut {
                    bytes.truncate(c.index(bytes.len() + 1));
                }
            }
            bytes.extend_from_slice(&tail);
            let tmp = tempfile::tempdir().unwrap();
            let p = tmp.path().join("codes.parquet");
            std::fs::write(&p, &bytes).unwrap();
            let r = std::panic::catch_unwind(|| read_table(&p));
            prop_assert!(r.is_ok(), "read_table panicked");
            if let Err(e) = r.unwrap() {
                let msg = e.to_string();
                prop_assert!(msg.contains("codes.parquet"), "{}", msg);
            }
        }
    }
}
