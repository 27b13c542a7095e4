//! Streaming readers (jsonl, json array, parquet, Arrow IPC) and the mapping of records
//! onto [`Example`]. Memory is constant in the dataset size: one line, one array element
//! or one record batch at a time.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use serde_json::{Map, Value};

use crate::error::{DataError, Location, Result};
use crate::example::{Example, ImageRef, Message, Role, Task};
use crate::manifest::{FieldMap, Format, ImageCheck, Manifest, OnError};

/// One raw record: its location and its JSON value (columnar rows are converted to JSON
/// objects with only the columns the field map uses).
#[derive(Debug, Clone)]
pub struct RawRecord {
    /// Where it came from.
    pub at: Location,
    /// The record.
    pub value: Value,
}

/// Counts of a read, reported at the end (`on_error: skip` counts what it skipped).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// Files opened.
    pub files: usize,
    /// Records turned into examples.
    pub examples: u64,
    /// Records skipped (malformed, missing / wrong field, missing image).
    pub skipped_records: u64,
    /// Files skipped because they were empty.
    pub skipped_files: u64,
    /// The first few skip reasons (at most [`ReadStats::MAX_REASONS`]).
    pub reasons: Vec<String>,
}

impl ReadStats {
    /// How many skip reasons are kept.
    pub const MAX_REASONS: usize = 20;

    fn note(&mut self, e: &DataError) {
        if self.reasons.len() < Self::MAX_REASONS {
            self.reasons.push(e.to_string());
        }
    }
}

type RecordIter = Box<dyn Iterator<Item = Result<RawRecord>>>;

/// Streams the examples of a manifest's files.
///
/// Errors are yielded as `Err` items; with `on_error: fail` the stream ends after the first
/// error, with `skip` bad records are counted in [`ExampleStream::stats`] and skipped
/// (structural errors that make the rest of a file unreadable still end that file with an
/// error).
pub struct ExampleStream {
    manifest: Manifest,
    files: Vec<PathBuf>,
    next_file: usize,
    current: Option<(PathBuf, RecordIter, u64)>,
    stats: ReadStats,
    failed: bool,
    image_root: Option<PathBuf>,
    columns: Vec<String>,
}

impl ExampleStream {
    /// Opens a stream over `files` (e.g. from [`Manifest::resolve_files`]); `data_root`
    /// resolves a relative `image_root`.
    pub fn new(manifest: Manifest, files: Vec<PathBuf>, data_root: Option<&Path>) -> Self {
        let image_root = manifest.image_root.as_ref().map(|r| match data_root {
            Some(d) if !Path::new(r).is_absolute() => d.join(r),
            _ => PathBuf::from(r),
        });
        let columns = top_level_columns(&manifest.fields);
        Self {
            manifest,
            files,
            next_file: 0,
            current: None,
            stats: ReadStats::default(),
            failed: false,
            image_root,
            columns,
        }
    }

    /// Resolves the manifest's files against `data_root` and opens the stream.
    pub fn open(manifest: Manifest, data_root: Option<&Path>) -> Result<Self> {
        let files = manifest.resolve_files(data_root)?;
        Ok(Self::new(manifest, files, data_root))
    }

    /// Counts so far (complete once the iterator returned `None`).
    pub fn stats(&self) -> &ReadStats {
        &self.stats
    }

    /// The manifest being read.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn skip_bad(&self) -> bool {
        self.manifest.on_error == OnError::Skip
    }

    fn open_file(&self, path: &Path) -> Result<RecordIter> {
        let name = self.manifest.name.clone();
        let io = |source| DataError::Io {
            context: format!("manifest `{name}`"),
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let at = Location {
            manifest: self.manifest.name.clone(),
            file: path.to_path_buf(),
            row: 0,
            unit: "line",
        };
        Ok(match self.manifest.format {
            Format::Jsonl => Box::new(JsonlRecords {
                reader: BufReader::new(file),
                at,
                buf: String::new(),
            }),
            Format::Json => Box::new(JsonArrayRecords::new(BufReader::new(file), at)),
            Format::Parquet => Box::new(ColumnarRecords::parquet(file, at, self.columns.clone())?),
            Format::Arrow => Box::new(ColumnarRecords::arrow(file, at, self.columns.clone())?),
        })
    }
}

impl Iterator for ExampleStream {
    type Item = Result<Example>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        loop {
            if self.current.is_none() {
                let path = self.files.get(self.next_file)?.clone();
                self.next_file += 1;
                self.stats.files += 1;
                match self.open_file(&path) {
                    Ok(it) => self.current = Some((path, it, 0)),
                    Err(e) => {
                        self.failed = true;
                        return Some(Err(e));
                    }
                }
            }
            let (path, it, count) = self.current.as_mut()?;
            match it.next() {
                None => {
                    let empty = *count == 0;
                    let path = path.clone();
                    self.current = None;
                    if empty {
                        let e = DataError::EmptyFile {
                            manifest: self.manifest.name.clone(),
                            file: path,
                        };
                        if self.skip_bad() {
                            self.stats.skipped_files += 1;
                            self.stats.note(&e);
                            continue;
                        }
                        self.failed = true;
                        return Some(Err(e));
                    }
                }
                Some(Err(e)) => {
                    *count += 1;
                    let fatal = matches!(e, DataError::Columnar { .. } | DataError::Io { .. });
                    if self.skip_bad() && !fatal {
                        self.stats.skipped_records += 1;
                        self.stats.note(&e);
                        continue;
                    }
                    self.failed = true;
                    return Some(Err(e));
                }
                Some(Ok(rec)) => {
                    *count += 1;
                    let base = rec.at.file.parent().map(Path::to_path_buf);
                    let root = self.image_root.clone().or(base);
                    match map_record(&self.manifest, &rec, root.as_deref()) {
                        Ok(ex) => {
                            self.stats.examples += 1;
                            return Some(Ok(ex));
                        }
                        Err(e) => {
                            if self.skip_bad() {
                                self.stats.skipped_records += 1;
                                self.stats.note(&e);
                                continue;
                            }
                            self.failed = true;
                            return Some(Err(e));
                        }
                    }
                }
            }
        }
    }
}

/// The distinct top-level keys the field map reads (the columns to project).
fn top_level_columns(f: &FieldMap) -> Vec<String> {
    let mut cols: Vec<String> = [
        &f.text,
        &f.question,
        &f.reasoning,
        &f.answer,
        &f.conversations,
        &f.caption,
        &f.image,
        &f.image_bytes,
        &f.image_codes,
        &f.id,
    ]
    .into_iter()
    .flatten()
    .map(|p| p.split('.').next().unwrap_or(p).to_string())
    .collect();
    cols.sort();
    cols.dedup();
    cols
}

// ---------------------------------------------------------------- jsonl

struct JsonlRecords<R> {
    reader: R,
    at: Location,
    buf: String,
}

impl<R: BufRead> Iterator for JsonlRecords<R> {
    type Item = Result<RawRecord>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            self.buf.clear();
            self.at.row += 1;
            match self.reader.read_line(&mut self.buf) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(source) => {
                    return Some(Err(DataError::Io {
                        context: format!("manifest `{}` line {}", self.at.manifest, self.at.row),
                        path: self.at.file.clone(),
                        source,
                    }));
                }
            }
            // `trim` drops the `\r` of CRLF line ends; a UTF-8 byte order mark (Windows
            // editors, Excel exports) may open the file
            let mut line = self.buf.trim();
            if self.at.row == 1 {
                line = line.trim_start_matches('\u{feff}').trim_start();
            }
            if line.is_empty() {
                continue;
            }
            return Some(
                serde_json::from_str::<Value>(line)
                    .map(|value| RawRecord {
                        at: self.at.clone(),
                        value,
                    })
                    .map_err(|e| DataError::Malformed {
                        at: Box::new(self.at.clone()),
                        message: e.to_string(),
                    }),
            );
        }
    }
}

// ---------------------------------------------------------------- json array

/// Splits a top-level JSON array into elements without loading the whole file: a small
/// scanner finds each element's bytes (tracking strings, escapes and nesting), then serde
/// parses the element.
struct JsonArrayRecords<R: Read> {
    bytes: std::iter::Peekable<std::io::Bytes<R>>,
    at: Location,
    line: u64,
    state: ArrayState,
}

#[derive(PartialEq)]
enum ArrayState {
    Start,
    InArray,
    Done,
}

impl<R: BufRead> JsonArrayRecords<R> {
    fn new(reader: R, mut at: Location) -> Self {
        at.unit = "line";
        Self {
            bytes: reader.bytes().peekable(),
            at,
            line: 1,
            state: ArrayState::Start,
        }
    }

    fn err(&mut self, message: String) -> Option<Result<RawRecord>> {
        self.state = ArrayState::Done;
        let mut at = self.at.clone();
        at.row = self.line;
        Some(Err(DataError::Columnar {
            manifest: at.manifest.clone(),
            file: at.file.clone(),
            message: format!("line {}: {message}", self.line),
        }))
    }

    fn next_byte(&mut self) -> Option<std::io::Result<u8>> {
        let b = self.bytes.next()?;
        if let Ok(b'\n') = b {
            self.line += 1;
        }
        Some(b)
    }

    fn skip_ws(&mut self) -> std::io::Result<Option<u8>> {
        loop {
            match self.bytes.peek() {
                None => return Ok(None),
                Some(Ok(b)) if b.is_ascii_whitespace() => {
                    let _ = self.next_byte();
                }
                Some(Ok(b)) => return Ok(Some(*b)),
                Some(Err(_)) => {
                    return match self.next_byte() {
                        Some(Err(e)) => Err(e),
                        _ => Ok(None),
                    };
                }
            }
        }
    }
}

impl<R: BufRead> Iterator for JsonArrayRecords<R> {
    type Item = Result<RawRecord>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.state == ArrayState::Done {
            return None;
        }
        if self.state == ArrayState::Start {
            // a UTF-8 byte order mark may open the file
            if let Some(Ok(0xEF)) = self.bytes.peek() {
                let bom: Vec<_> = (0..3).map_while(|_| self.next_byte()).collect();
                if !matches!(bom[..], [Ok(0xEF), Ok(0xBB), Ok(0xBF)]) {
                    return self.err("the file starts with 0xEF but not with a UTF-8 byte order mark (EF BB BF); expected a JSON array".into());
                }
            }
            match self.skip_ws() {
                Ok(None) => {
                    self.state = ArrayState::Done;
                    return None; // empty file
                }
                Ok(Some(b'[')) => {
                    let _ = self.next_byte();
                    self.state = ArrayState::InArray;
                }
                Ok(Some(b)) => {
                    return self.err(format!(
                        "expected a JSON array (`[`), found `{}`",
                        b as char
                    ));
                }
                Err(e) => return self.err(e.to_string()),
            }
        }
        // Element start (or the closing bracket).
        match self.skip_ws() {
            Ok(None) => return self.err("unexpected end of file inside the array".into()),
            Ok(Some(b']')) => {
                self.state = ArrayState::Done;
                return None;
            }
            Ok(Some(_)) => {}
            Err(e) => return self.err(e.to_string()),
        }
        let start_line = self.line;
        let mut buf = Vec::new();
        let mut depth: i64 = 0;
        let mut in_str = false;
        let mut escape = false;
        loop {
            let b = match self.next_byte() {
                None => return self.err("unexpected end of file inside an element".into()),
                Some(Err(e)) => return self.err(e.to_string()),
                Some(Ok(b)) => b,
            };
            if in_str {
                buf.push(b);
                if escape {
                    escape = false;
                } else if b == b'\\' {
                    escape = true;
                } else if b == b'"' {
                    in_str = false;
                }
                continue;
            }
            match b {
                b'"' => in_str = true,
                b'{' | b'[' => depth += 1,
                b'}' | b']' if depth > 0 => depth -= 1,
                b']' => {
                    // end of the array right after this element
                    self.state = ArrayState::Done;
                    break;
                }
                b',' if depth == 0 => break,
                _ => {}
            }
            buf.push(b);
        }
        let mut at = self.at.clone();
        at.row = start_line;
        Some(
            serde_json::from_slice::<Value>(&buf)
                .map(|value| RawRecord {
                    at: at.clone(),
                    value,
                })
                .map_err(|e| DataError::Malformed {
                    at: Box::new(at),
                    message: e.to_string(),
                }),
        )
    }
}

// ---------------------------------------------------------------- parquet / arrow

struct ColumnarRecords {
    batches: Box<dyn Iterator<Item = std::result::Result<RecordBatch, String>>>,
    batch: Option<RecordBatch>,
    row_in_batch: usize,
    at: Location,
    columns: Vec<String>,
    /// A decoder failed (an error or a panic): the file ends there.
    failed: bool,
}

/// Runs a call into the arrow / parquet decoders, a panic becoming an error message: the
/// arrow crates panic instead of erroring on some damaged files (found by
/// `props::columnar_rows_read_back_and_damaged_files_are_errors`: arrow-ipc 60.1 slices a
/// buffer by a corrupt length, `arrow-buffer/src/buffer/immutable.rs:299`).
fn no_panic<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    crate::error::catch_panic(f, "a panic in the decoder")
        .map_err(|why| format!("damaged file: the decoder failed ({why})"))
}

impl ColumnarRecords {
    fn parquet(file: File, mut at: Location, columns: Vec<String>) -> Result<Self> {
        at.unit = "row";
        let err = |e: String| DataError::Columnar {
            manifest: at.manifest.clone(),
            file: at.file.clone(),
            message: e,
        };
        let reader = no_panic(|| {
            parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
                .and_then(|b| b.with_batch_size(256).build())
                .map_err(|e| e.to_string())
        })
        .and_then(|r| r)
        .map_err(err)?;
        Ok(Self {
            batches: Box::new(reader.map(|b| b.map_err(|e| e.to_string()))),
            batch: None,
            row_in_batch: 0,
            at,
            columns,
            failed: false,
        })
    }

    fn arrow(file: File, mut at: Location, columns: Vec<String>) -> Result<Self> {
        at.unit = "row";
        // Arrow IPC *file* format first (magic `ARROW1`), else the streaming format (HF
        // `datasets` cache files).
        let batches: Box<dyn Iterator<Item = std::result::Result<RecordBatch, String>>> =
            match no_panic(|| {
                arrow_ipc::reader::FileReader::try_new(
                    file.try_clone().map_err(|source| DataError::Io {
                        context: format!("manifest `{}`", at.manifest),
                        path: at.file.clone(),
                        source,
                    })?,
                    None,
                )
                .map_err(|e| DataError::Columnar {
                    manifest: at.manifest.clone(),
                    file: at.file.clone(),
                    message: e.to_string(),
                })
            }) {
                Ok(Ok(r)) => Box::new(r.map(|b| b.map_err(|e| e.to_string()))),
                Ok(Err(e @ DataError::Io { .. })) => return Err(e),
                _ => {
                    // The FileReader attempt moved the shared offset.
                    let mut file = file;
                    std::io::Seek::rewind(&mut file).map_err(|source| DataError::Io {
                        context: format!("manifest `{}`", at.manifest),
                        path: at.file.clone(),
                        source,
                    })?;
                    let r = no_panic(|| {
                        arrow_ipc::reader::StreamReader::try_new(BufReader::new(file), None)
                            .map_err(|e| e.to_string())
                    })
                    .and_then(|r| r)
                    .map_err(|e| DataError::Columnar {
                        manifest: at.manifest.clone(),
                        file: at.file.clone(),
                        message: format!("not an Arrow IPC file or stream: {e}"),
                    })?;
                    Box::new(r.map(|b| b.map_err(|e| e.to_string())))
                }
            };
        Ok(Self {
            batches,
            batch: None,
            row_in_batch: 0,
            at,
            columns,
            failed: false,
        })
    }

    /// The next record, or the decoder's error.
    fn next_record(&mut self) -> Option<Result<RawRecord>> {
        loop {
            if let Some(b) = &self.batch
                && self.row_in_batch < b.num_rows()
            {
                let r = self.row_in_batch;
                self.row_in_batch += 1;
                let mut obj = Map::new();
                for name in &self.columns {
                    if let Some(col) = b.column_by_name(name) {
                        match arrow_to_json(col.as_ref(), r) {
                            Ok(v) => {
                                obj.insert(name.clone(), v);
                            }
                            Err(message) => {
                                let at = self.at.clone();
                                self.at.row += 1;
                                return Some(Err(DataError::Malformed {
                                    at: Box::new(at),
                                    message: format!("column `{name}`: {message}"),
                                }));
                            }
                        }
                    }
                }
                let at = self.at.clone();
                self.at.row += 1;
                return Some(Ok(RawRecord {
                    at,
                    value: Value::Object(obj),
                }));
            }
            match self.batches.next()? {
                Ok(b) => {
                    self.batch = Some(b);
                    self.row_in_batch = 0;
                }
                Err(message) => {
                    // the decoders may yield the same error for ever: the file ends here
                    self.failed = true;
                    return Some(Err(DataError::Columnar {
                        manifest: self.at.manifest.clone(),
                        file: self.at.file.clone(),
                        message,
                    }));
                }
            }
        }
    }
}

impl Iterator for ColumnarRecords {
    type Item = Result<RawRecord>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match no_panic(|| self.next_record()) {
            Ok(r) => r,
            Err(message) => {
                self.failed = true;
                Some(Err(DataError::Columnar {
                    manifest: self.at.manifest.clone(),
                    file: self.at.file.clone(),
                    message,
                }))
            }
        }
    }
}

/// Converts one cell of an Arrow array to JSON (binary → array of byte numbers).
fn arrow_to_json(a: &dyn Array, i: usize) -> std::result::Result<Value, String> {
    if a.is_null(i) {
        return Ok(Value::Null);
    }
    macro_rules! prim {
        ($t:ty) => {
            Value::from(a.as_primitive::<$t>().value(i))
        };
    }
    use arrow_array::types::*;
    Ok(match a.data_type() {
        DataType::Null => Value::Null,
        DataType::Boolean => Value::Bool(a.as_boolean().value(i)),
        DataType::Int8 => prim!(Int8Type),
        DataType::Int16 => prim!(Int16Type),
        DataType::Int32 => prim!(Int32Type),
        DataType::Int64 => prim!(Int64Type),
        DataType::UInt8 => prim!(UInt8Type),
        DataType::UInt16 => prim!(UInt16Type),
        DataType::UInt32 => prim!(UInt32Type),
        DataType::UInt64 => prim!(UInt64Type),
        DataType::Float32 => prim!(Float32Type),
        DataType::Float64 => prim!(Float64Type),
        DataType::Utf8 => Value::String(a.as_string::<i32>().value(i).to_string()),
        DataType::LargeUtf8 => Value::String(a.as_string::<i64>().value(i).to_string()),
        DataType::Utf8View => Value::String(a.as_string_view().value(i).to_string()),
        DataType::Binary => bytes_value(a.as_binary::<i32>().value(i)),
        DataType::LargeBinary => bytes_value(a.as_binary::<i64>().value(i)),
        DataType::BinaryView => bytes_value(a.as_binary_view().value(i)),
        DataType::List(_) => {
            let l = a.as_list::<i32>().value(i);
            list_value(l.as_ref())?
        }
        DataType::LargeList(_) => {
            let l = a.as_list::<i64>().value(i);
            list_value(l.as_ref())?
        }
        DataType::FixedSizeList(_, _) => {
            let l = a.as_fixed_size_list().value(i);
            list_value(l.as_ref())?
        }
        DataType::Struct(fields) => {
            let s = a.as_struct();
            let mut obj = Map::new();
            for (f, col) in fields.iter().zip(s.columns()) {
                obj.insert(f.name().clone(), arrow_to_json(col.as_ref(), i)?);
            }
            Value::Object(obj)
        }
        other => return Err(format!("unsupported Arrow type {other}")),
    })
}

fn bytes_value(b: &[u8]) -> Value {
    Value::Array(b.iter().map(|x| Value::from(*x)).collect())
}

fn list_value(l: &dyn Array) -> std::result::Result<Value, String> {
    (0..l.len())
        .map(|j| arrow_to_json(l, j))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map(Value::Array)
}

// ---------------------------------------------------------------- mapping

/// Looks up a dotted path (`a.b.0`) in a JSON value.
pub fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = v;
    for part in path.split('.') {
        cur = match cur {
            Value::Object(m) => m.get(part)?,
            Value::Array(a) => a.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
        if cur.is_null() {
            return None;
        }
    }
    Some(cur)
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Maps one raw record onto an [`Example`] with the manifest's field map. `image_root`
/// resolves relative image paths.
pub fn map_record(m: &Manifest, rec: &RawRecord, image_root: Option<&Path>) -> Result<Example> {
    let f = &m.fields;
    let r = RecordFields {
        rec,
        required: match &f.required {
            Some(r) => r.iter().map(String::as_str).collect(),
            None => default_required(m),
        },
    };
    let mut ex = Example {
        task: Some(m.task),
        source: rec.at.clone(),
        ..Default::default()
    };
    ex.text = r.string("text", &f.text)?;
    ex.question = r.string("question", &f.question)?;
    ex.reasoning = r.string("reasoning", &f.reasoning)?;
    ex.answer = r.string("answer", &f.answer)?;
    ex.caption = r.string("caption", &f.caption)?;
    ex.id = r.string("id", &f.id)?;
    if let Some(marker) = &f.answer_marker {
        split_at_answer_marker(&mut ex, marker);
    }
    if let Some(p) = &f.conversations {
        ex.messages = r.conversations(p)?;
    }
    ex.image = r.image(m, image_root)?;
    // LLaVA: the `<image>` placeholder marks where the image goes; MMaDA puts the image
    // block before the text, so the placeholder is removed.
    if matches!(m.task, Task::Mmu) {
        strip_image_placeholders(&mut ex);
    }
    Ok(ex)
}

/// One record read through a manifest's field map: typed field lookups whose errors name
/// the record, the field and its path.
struct RecordFields<'a> {
    rec: &'a RawRecord,
    /// Fields that must be present (`fields.required`, or [`default_required`]).
    required: Vec<&'a str>,
}

impl RecordFields<'_> {
    fn err(&self, field: &'static str, path: &str, message: String) -> DataError {
        DataError::Field {
            at: Box::new(self.rec.at.clone()),
            field,
            path: path.to_string(),
            message,
        }
    }

    /// A text field: strings as they are, numbers and booleans as their JSON text, the first
    /// of an array of strings for `image`; missing is an error only for required fields.
    fn string(&self, field: &'static str, path: &Option<String>) -> Result<Option<String>> {
        let Some(p) = path else { return Ok(None) };
        match lookup(&self.rec.value, p) {
            None if self.required.contains(&field) => Err(self.err(field, p, "missing".into())),
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            // numbers and booleans are taken as their JSON text (a numeric GSM8K `answer: 42`
            // is "42"; `1.5` is "1.5"; `true` is "true")
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(Value::Bool(b)) => Ok(Some(b.to_string())),
            Some(Value::Array(a))
                if field == "image" && a.first().is_some_and(Value::is_string) =>
            {
                Ok(a[0].as_str().map(str::to_string))
            }
            Some(other) => Err(self.err(
                field,
                p,
                format!("expected a string, found {}", type_name(other)),
            )),
        }
    }

    /// The chat turns at `p` (empty when absent and not required).
    fn conversations(&self, p: &str) -> Result<Vec<Message>> {
        match lookup(&self.rec.value, p) {
            None if self.required.contains(&"conversations") => {
                Err(self.err("conversations", p, "missing".into()))
            }
            None => Ok(Vec::new()),
            Some(Value::Array(turns)) => turns
                .iter()
                .enumerate()
                .map(|(k, t)| {
                    parse_turn(t)
                        .map_err(|msg| self.err("conversations", p, format!("turn {k}: {msg}")))
                })
                .collect(),
            Some(other) => Err(self.err(
                "conversations",
                p,
                format!("expected an array of turns, found {}", type_name(other)),
            )),
        }
    }

    /// An array of integers at `p` that each fit `T`, when present; `expected` names the
    /// type in the error.
    fn ints<T: TryFrom<u64>>(
        &self,
        field: &'static str,
        p: &str,
        expected: &str,
    ) -> Result<Option<Vec<T>>> {
        let Some(v) = lookup(&self.rec.value, p) else {
            return Ok(None);
        };
        v.as_array()
            .and_then(|a| {
                a.iter()
                    .map(|x| x.as_u64().and_then(|c| T::try_from(c).ok()))
                    .collect::<Option<Vec<T>>>()
            })
            .map(Some)
            .ok_or_else(|| {
                self.err(
                    field,
                    p,
                    format!("expected {expected}, found {}", type_name(v)),
                )
            })
    }

    /// The image: codes, then bytes, then a path (resolved against `image_root` and checked
    /// as `image_check` says); missing is an error when an image field is required.
    fn image(&self, m: &Manifest, image_root: Option<&Path>) -> Result<Option<ImageRef>> {
        let f = &m.fields;
        if let Some(p) = &f.image_codes
            && let Some(codes) =
                self.ints::<u32>("image_codes", p, "an array of non-negative integers")?
        {
            return Ok(Some(ImageRef::Codes(codes)));
        }
        if let Some(p) = &f.image_bytes
            && let Some(bytes) = self.ints::<u8>("image_bytes", p, "binary image bytes")?
        {
            return Ok(Some(ImageRef::Bytes(bytes)));
        }
        if let Some(rel) = self.string("image", &f.image)? {
            let path = match image_root {
                Some(r) if !Path::new(&rel).is_absolute() => r.join(&rel),
                _ => PathBuf::from(&rel),
            };
            check_image(m.image_check, &path).map_err(|message| DataError::Image {
                at: Box::new(self.rec.at.clone()),
                field: "image",
                image: path.display().to_string(),
                message,
            })?;
            return Ok(Some(ImageRef::Path(path)));
        }
        let has_image_field =
            f.image.is_some() || f.image_bytes.is_some() || f.image_codes.is_some();
        if has_image_field && self.required.iter().any(|r| r.starts_with("image")) {
            let p = f
                .image_codes
                .as_ref()
                .or(f.image_bytes.as_ref())
                .or(f.image.as_ref())
                .cloned()
                .unwrap_or_default();
            return Err(self.err("image", &p, "missing".into()));
        }
        Ok(None)
    }
}

/// `answer_marker` (GSM8K `####`): the answer's text before the last marker becomes the
/// reasoning (unless the record has one), the text after it the answer.
fn split_at_answer_marker(ex: &mut Example, marker: &str) {
    let Some(ans) = &ex.answer else { return };
    let Some(pos) = ans.rfind(marker) else { return };
    let (r, a) = ans.split_at(pos);
    if ex.reasoning.is_none() {
        ex.reasoning = Some(r.trim_end().to_string());
    }
    ex.answer = Some(a[marker.len()..].trim().to_string());
}

/// Removes LLaVA's `<image>` placeholder (and its line break) from the turns and the question.
fn strip_image_placeholders(ex: &mut Example) {
    for msg in &mut ex.messages {
        if msg.content.contains("<image>") {
            msg.content = msg
                .content
                .replace("<image>\n", "")
                .replace("\n<image>", "")
                .replace("<image>", "");
        }
    }
    if let Some(q) = &ex.question
        && q.contains("<image>")
    {
        ex.question = Some(q.replace("<image>\n", "").replace("<image>", ""));
    }
}

fn default_required(m: &Manifest) -> Vec<&'static str> {
    let f = &m.fields;
    let mut r = Vec::new();
    for (name, p) in [
        ("text", &f.text),
        ("question", &f.question),
        ("answer", &f.answer),
        ("conversations", &f.conversations),
        ("caption", &f.caption),
    ] {
        if p.is_some() {
            r.push(name);
        }
    }
    if matches!(m.task, Task::Mmu | Task::T2i) {
        r.push("image");
    }
    r
}

fn parse_turn(t: &Value) -> std::result::Result<Message, String> {
    let obj = t
        .as_object()
        .ok_or_else(|| format!("expected an object, found {}", type_name(t)))?;
    let (role, content) = match (
        obj.get("from"),
        obj.get("value"),
        obj.get("role"),
        obj.get("content"),
    ) {
        (Some(r), Some(c), _, _) | (_, _, Some(r), Some(c)) => (r, c),
        _ => {
            return Err(
                "expected keys `from`/`value` (LLaVA) or `role`/`content` (ShareGPT)".into(),
            );
        }
    };
    let role = match role.as_str() {
        Some("human" | "user") => Role::User,
        Some("gpt" | "assistant" | "bot") => Role::Assistant,
        Some("system") => Role::System,
        Some(other) => return Err(format!("unknown role `{other}`")),
        None => return Err(format!("role must be a string, found {}", type_name(role))),
    };
    let content = content
        .as_str()
        .ok_or_else(|| format!("content must be a string, found {}", type_name(content)))?
        .to_string();
    Ok(Message { role, content })
}

fn check_image(check: ImageCheck, path: &Path) -> std::result::Result<(), String> {
    match check {
        ImageCheck::None => Ok(()),
        ImageCheck::Exists => {
            if path.is_file() {
                Ok(())
            } else {
                Err("file not found".into())
            }
        }
        ImageCheck::Header => {
            if !path.is_file() {
                return Err("file not found".into());
            }
            image::ImageReader::open(path)
                .map_err(|e| e.to_string())?
                .with_guessed_format()
                .map_err(|e| e.to_string())?
                .into_dimensions()
                .map(|_| ())
                .map_err(|e| format!("cannot decode: {e}"))
        }
    }
}

#[cfg(test)]
mod props {
    //! Property tests of the hand-written readers (`PROPTEST_CASES=10000` for the long run).
    use super::*;
    use proptest::prelude::*;
    use std::io::Cursor;

    fn at() -> Location {
        Location {
            manifest: "m".into(),
            file: "/data/f.json".into(),
            row: 0,
            unit: "line",
        }
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<String>().prop_map(Value::String),
            "[\\[\\]{},\"\\\\:]{0,6}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map("[a-z\"\\\\\\]\\[]{0,4}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// The streaming JSON-array scanner returns exactly the elements serde sees, in
        /// compact or pretty form, with LF or CRLF line ends and an optional BOM.
        #[test]
        fn json_array_scanner_matches_serde(
            items in proptest::collection::vec(json_value(), 0..6),
            pretty in any::<bool>(),
            crlf in any::<bool>(),
            bom in any::<bool>(),
        ) {
            let v = Value::Array(items.clone());
            let mut text = if pretty {
                serde_json::to_string_pretty(&v).unwrap()
            } else {
                serde_json::to_string(&v).unwrap()
            };
            if crlf {
                text = text.replace('\n', "\r\n");
            }
            if bom {
                text.insert(0, '\u{feff}');
            }
            let got: Vec<Value> = JsonArrayRecords::new(Cursor::new(text.into_bytes()), at())
                .map(|r| r.map(|r| r.value))
                .collect::<Result<_>>()
                .unwrap();
            prop_assert_eq!(got, items);
        }

        /// Any bytes: the scanner ends (no panic, no endless loop) and every error names the
        /// file and a line.
        #[test]
        fn json_array_scanner_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..120), open in any::<bool>()) {
            let mut b = bytes;
            if open {
                b.insert(0, b'[');
            }
            let n = b.len();
            let mut count = 0;
            for r in JsonArrayRecords::new(Cursor::new(b), at()) {
                count += 1;
                prop_assert!(count <= n + 1, "more records than bytes");
                if let Err(e) = r {
                    let msg = e.to_string();
                    prop_assert!(msg.contains("/data/f.json") && msg.contains("line"), "{}", msg);
                }
            }
        }

        /// JSONL: valid rows (any line ends, optional BOM, blank lines) read back exactly,
        /// each with its 1-based line; any bytes never panic and errors name file and line.
        #[test]
        fn jsonl_rows_and_any_bytes(
            items in proptest::collection::vec(json_value(), 0..6),
            crlf in any::<bool>(),
            bom in any::<bool>(),
            junk in proptest::collection::vec(any::<u8>(), 0..80),
        ) {
            let eol = if crlf { "\r\n" } else { "\n" };
            let mut text: String = items
                .iter()
                .map(|v| format!("{v}{eol}{eol}"))
                .collect();
            if bom {
                text.insert(0, '\u{feff}');
            }
            let recs: Vec<RawRecord> = JsonlRecords { reader: Cursor::new(text.into_bytes()), at: at(), buf: String::new() }
                .collect::<Result<_>>()
                .unwrap();
            prop_assert_eq!(recs.iter().map(|r| r.value.clone()).collect::<Vec<_>>(), items);
            for (i, r) in recs.iter().enumerate() {
                prop_assert_eq!(r.at.row, 2 * i as u64 + 1);
            }
            for r in (JsonlRecords { reader: Cursor::new(junk), at: at(), buf: String::new() }) {
                if let Err(e) = r {
                    let msg = e.to_string();
                    prop_assert!(msg.contains("/data/f.json") && msg.contains("line"), "{}", msg);
                }
            }
        }

        /// Manifest YAML: any text is a manifest or an error naming the manifest file.
        #[test]
        fn manifest_yaml_never_panics(text in any::<String>(), keyed in "(name|task|format|source|fields|split|license|on_error): [a-z{}:\\[\\] ,]{0,20}\n") {
            for t in [text.as_str(), keyed.as_str()] {
                if let Err(e) = crate::Manifest::from_yaml(t, "data_manifests/x.yaml") {
                    let msg = e.to_string();
                    prop_assert!(msg.contains("data_manifests/x.yaml"), "{}", msg);
                }
            }
        }
    }

    /// One generated row of the columnar property test.
    type ColRow = (
        Option<i64>,
        Option<f64>,
        Option<String>,
        Option<bool>,
        Option<Vec<u8>>,
        Option<Vec<Option<i32>>>,
    );

    const COLS: [&str; 6] = ["i", "f", "s", "b", "bin", "list"];

    /// The rows as a record batch with columns `COLS` (every column nullable).
    fn col_batch(rows: &[ColRow]) -> RecordBatch {
        use arrow_array::builder::{Int32Builder, ListBuilder};
        use arrow_array::{
            ArrayRef, BinaryArray, BooleanArray, Float64Array, Int64Array, StringArray,
        };
        use std::sync::Arc;
        let mut list = ListBuilder::new(Int32Builder::new());
        for r in rows {
            match &r.5 {
                Some(v) => {
                    for x in v {
                        list.values().append_option(*x);
                    }
                    list.append(true);
                }
                None => list.append(false),
            }
        }
        let cols: Vec<(&str, ArrayRef)> = vec![
            (
                "i",
                Arc::new(rows.iter().map(|r| r.0).collect::<Int64Array>()),
            ),
            (
                "f",
                Arc::new(rows.iter().map(|r| r.1).collect::<Float64Array>()),
            ),
            (
                "s",
                Arc::new(rows.iter().map(|r| r.2.clone()).collect::<StringArray>()),
            ),
            (
                "b",
                Arc::new(rows.iter().map(|r| r.3).collect::<BooleanArray>()),
            ),
            (
                "bin",
                Arc::new(BinaryArray::from_iter(rows.iter().map(|r| r.4.clone()))),
            ),
            ("list", Arc::new(list.finish())),
        ];
        RecordBatch::try_from_iter(cols).unwrap()
    }

    /// The JSON record the reader must give for `r`.
    fn col_json(r: &ColRow) -> Value {
        let opt = |v: Option<Value>| v.unwrap_or(Value::Null);
        serde_json::json!({
            "i": opt(r.0.map(Value::from)),
            "f": opt(r.1.map(Value::from)),
            "s": opt(r.2.clone().map(Value::from)),
            "b": opt(r.3.map(Value::from)),
            "bin": opt(r.4.as_ref().map(|b| bytes_value(b))),
            "list": opt(r.5.as_ref().map(|l| {
                Value::Array(l.iter().map(|x| opt(x.map(Value::from))).collect())
            })),
        })
    }

    fn col_row() -> impl Strategy<Value = ColRow> {
        (
            proptest::option::of(any::<i64>()),
            proptest::option::of(-1e12f64..1e12),
            proptest::option::of("\\PC{0,12}"),
            proptest::option::of(any::<bool>()),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..6)),
            proptest::option::of(proptest::collection::vec(
                proptest::option::of(any::<i32>()),
                0..4,
            )),
        )
    }

    /// Writes `rows` as parquet, Arrow IPC file and Arrow IPC stream under `dir`.
    fn write_columnar(dir: &Path, rows: &[ColRow]) -> [PathBuf; 3] {
        let batch = col_batch(rows);
        let pq = dir.join("rows.parquet");
        let mut w =
            parquet::arrow::ArrowWriter::try_new(File::create(&pq).unwrap(), batch.schema(), None)
                .unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let ipc = dir.join("rows.arrow");
        let mut w =
            arrow_ipc::writer::FileWriter::try_new(File::create(&ipc).unwrap(), &batch.schema())
                .unwrap();
        w.write(&batch).unwrap();
        w.finish().unwrap();
        let stream = dir.join("rows.stream.arrow");
        let mut w = arrow_ipc::writer::StreamWriter::try_new(
            File::create(&stream).unwrap(),
            &batch.schema(),
        )
        .unwrap();
        w.write(&batch).unwrap();
        w.finish().unwrap();
        [pq, ipc, stream]
    }

    /// Every record of a columnar file (parquet by extension, else Arrow), or the first error.
    fn read_columnar(path: &Path) -> Vec<Result<RawRecord>> {
        let at = Location {
            manifest: "m".into(),
            file: path.to_path_buf(),
            row: 0,
            unit: "row",
        };
        let cols: Vec<String> = COLS.iter().map(|c| c.to_string()).collect();
        let file = File::open(path).unwrap();
        let it = if path.extension().is_some_and(|e| e == "parquet") {
            ColumnarRecords::parquet(file, at, cols)
        } else {
            ColumnarRecords::arrow(file, at, cols)
        };
        match it {
            Ok(it) => it.collect(),
            Err(e) => vec![Err(e)],
        }
    }

    proptest! {
        /// Parquet and Arrow IPC (file and stream) rows of every supported kind, nulls
        /// included, read back as exactly the JSON records they hold, numbered from 0; with
        /// flipped, cut or appended bytes the readers never panic and every error names the
        /// file.
        #[test]
        fn columnar_rows_read_back_and_damaged_files_are_errors(
            rows in proptest::collection::vec(col_row(), 1..8),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            cut in any::<prop::sample::Index>(),
            tail in proptest::collection::vec(any::<u8>(), 0..8),
        ) {
            let tmp = tempfile::tempdir().unwrap();
            for path in write_columnar(tmp.path(), &rows) {
                let got = read_columnar(&path);
                prop_assert_eq!(got.len(), rows.len(), "{}", path.display());
                for (k, (g, r)) in got.iter().zip(&rows).enumerate() {
                    let g = g.as_ref().unwrap();
                    prop_assert_eq!(g.at.row, k as u64);
                    prop_assert_eq!(&g.value, &col_json(r));
                }
                let good = std::fs::read(&path).unwrap();
                let mut damaged = good.clone();
                for (i, x) in &flips {
                    let i = i.index(damaged.len());
                    damaged[i] ^= x | 1;
                }
                let mut cut_file = good[..cut.index(good.len())].to_vec();
                cut_file.extend_from_slice(&tail);
                for bytes in [damaged, cut_file] {
                    std::fs::write(&path, &bytes).unwrap();
                    let shown = path.display().to_string();
                    for rec in read_columnar(&path) {
                        if let Err(e) = rec {
                            prop_assert!(e.to_string().contains(&shown), "{}", e);
                        }
                    }
                }
            }
        }
    }
}
