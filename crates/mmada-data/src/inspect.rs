//! What `mmada-train data inspect` and `mmada-train data check` print (issue 3 item 7):
//! a scan of one manifest that renders the first N examples (template text with special
//! tokens visible, token counts, prompt / answer split) and gathers length statistics, and
//! a per-source check that reads every record. The library returns values; the binary
//! prints their [`Display`](std::fmt::Display) form.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::Result;
use crate::example::{Example, ImageRef, Task};
use crate::layout::Sample;
use crate::manifest::Manifest;
use crate::pipeline::{LayoutConfig, LengthStats, content_len, layout_example, render_sample};
use crate::reader::{ExampleStream, ReadStats};
use crate::tokenizer::TextTokenizer;

/// Options of [`scan_manifest`].
#[derive(Debug, Clone)]
pub struct ScanOptions {
    /// Examples to render (the first `n`).
    pub n: usize,
    /// Stop after this many examples (`None` = read every record, as `data check` does).
    pub limit: Option<u64>,
    /// Layout settings (lengths, chat template).
    pub layout: LayoutConfig,
    /// Image tokens standing in for an image that is not tokenized yet (a path or bytes),
    /// so mmu / t2i rows can be laid out and counted: `(R/16)²`, 1024 at 512 px.
    pub placeholder_image_tokens: usize,
    /// Rendered texts longer than this many characters are cut (with a note).
    pub max_chars: usize,
}

impl Default for ScanOptions {
    fn default() -> Self {
        Self {
            n: 3,
            limit: None,
            layout: LayoutConfig::default(),
            placeholder_image_tokens: 1024,
            max_chars: 4000,
        }
    }
}

/// Token counts of one laid-out example.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TokenCounts {
    /// Laid-out length `L` (with padding).
    pub total: usize,
    /// Tokens without the trailing EOS padding (one EOS counted).
    pub content: usize,
    /// Prompt tokens.
    pub prompt: usize,
    /// Answer tokens without padding (`content − prompt`).
    pub answer: usize,
    /// Whether the layout cut the example.
    pub truncated: bool,
}

/// One rendered example.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RenderedExample {
    /// 0-based index in the stream.
    pub index: u64,
    /// `manifest …, file …, line …`.
    pub location: String,
    /// Record id.
    pub id: Option<String>,
    /// The image, described (`path …`, `N bytes`, `N codes`), when there is one.
    pub image: Option<String>,
    /// Prompt text as the chat template writes it (special tokens as text).
    pub prompt: String,
    /// Answer text.
    pub answer: String,
    /// With a tokenizer: the laid-out ids decoded with special tokens visible, image runs
    /// and padding collapsed, the prompt / answer split marked `⟦ANSWER⟧`.
    pub rendered: Option<String>,
    /// With a tokenizer: token counts.
    pub tokens: Option<TokenCounts>,
    /// With a tokenizer: why the example could not be laid out.
    pub layout_error: Option<String>,
}

/// How the images of a manifest are stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ImageCounts {
    /// `ImageRef::Path`.
    pub paths: u64,
    /// `ImageRef::Bytes`.
    pub bytes: u64,
    /// `ImageRef::Codes` (pre-tokenized).
    pub codes: u64,
}

/// The result of [`scan_manifest`].
#[derive(Debug, Clone, Serialize)]
pub struct ManifestScan {
    /// Manifest name.
    pub name: String,
    /// Task.
    pub task: Task,
    /// Data files read.
    pub files: Vec<PathBuf>,
    /// Examples read (after skips).
    pub examples: u64,
    /// Reader counts (skipped records / files and the first reasons).
    #[serde(skip)]
    pub read: ReadStats,
    /// Image storage counts.
    pub images: ImageCounts,
    /// The first `n` examples, rendered.
    pub rendered: Vec<RenderedExample>,
    /// With a tokenizer: laid-out length statistics over all examples read.
    pub stats: Option<LengthStats>,
    /// With a tokenizer: examples whose layout failed (e.g. no text for the task).
    pub layout_errors: u64,
    /// The first layout error.
    pub first_layout_error: Option<String>,
    /// Whether the scan stopped at [`ScanOptions::limit`].
    pub limited: bool,
    /// [`ScanOptions::placeholder_image_tokens`] when images had no codes.
    pub placeholder_image_tokens: Option<usize>,
}

fn describe_image(img: &ImageRef) -> String {
    match img {
        ImageRef::Path(p) => format!("path {}", p.display()),
        ImageRef::Bytes(b) => format!("{} bytes", b.len()),
        ImageRef::Codes(c) => format!("{} codes", c.len()),
    }
}

fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_string(),
        Some((i, _)) => format!("{}… [{} more chars]", &s[..i], s[i..].chars().count()),
    }
}

fn counts(s: &Sample, eos: u32) -> TokenCounts {
    let content = content_len(s, eos);
    TokenCounts {
        total: s.len(),
        content,
        prompt: s.prompt_len,
        answer: content.saturating_sub(s.prompt_len),
        truncated: s.truncated,
    }
}

/// Reads a manifest's examples (files resolved against `data_root`), renders the first
/// `opts.n`, and — with a tokenizer — lays every example out for token counts and
/// [`LengthStats`]. Images that are paths or bytes are laid out with
/// `opts.placeholder_image_tokens` placeholder codes (nothing is encoded).
///
/// # Errors
/// The reader's errors (naming manifest, file, line and field) under `on_error: fail`;
/// file resolution errors. Layout failures are counted, not returned.
pub fn scan_manifest(
    manifest: Manifest,
    data_root: Option<&Path>,
    tok: Option<&TextTokenizer>,
    opts: &ScanOptions,
) -> Result<ManifestScan> {
    let name = manifest.name.clone();
    let task = manifest.task;
    let files = manifest.resolve_files(data_root)?;
    let mut stream = ExampleStream::new(manifest, files.clone(), data_root);
    let mut scan = ManifestScan {
        name,
        task,
        files,
        examples: 0,
        read: ReadStats::default(),
        images: ImageCounts::default(),
        rendered: vec![],
        stats: None,
        layout_errors: 0,
        first_layout_error: None,
        limited: false,
        placeholder_image_tokens: None,
    };
    let mut samples: Vec<Sample> = vec![];
    for ex in stream.by_ref() {
        let mut ex: Example = ex?;
        let index = scan.examples;
        scan.examples += 1;
        let image_desc = ex.image.as_ref().map(describe_image);
        match &ex.image {
            Some(ImageRef::Path(_)) => scan.images.paths += 1,
            Some(ImageRef::Bytes(_)) => scan.images.bytes += 1,
            Some(ImageRef::Codes(_)) => scan.images.codes += 1,
            None => {}
        }
        if matches!(ex.image, Some(ImageRef::Path(_) | ImageRef::Bytes(_))) {
            ex.image = Some(ImageRef::Codes(vec![0; opts.placeholder_image_tokens]));
            scan.placeholder_image_tokens = Some(opts.placeholder_image_tokens);
        }
        let mut sample = None;
        let mut layout_error = None;
        if let Some(tok) = tok {
            match layout_example(&ex, tok, &opts.layout, false) {
                Ok(s) => sample = Some(s),
                Err(e) => {
                    scan.layout_errors += 1;
                    let msg = e.to_string();
                    if scan.first_layout_error.is_none() {
                        scan.first_layout_error = Some(msg.clone());
                    }
                    layout_error = Some(msg);
                }
            }
        }
        if (index as usize) < opts.n {
            let (prompt, answer) = match task {
                Task::T2i => (ex.caption.clone().unwrap_or_default(), String::new()),
                Task::Lm => (ex.text.clone().unwrap_or_default(), String::new()),
                _ => opts
                    .layout
                    .template
                    .prompt_and_answer(&ex, task == Task::Cot)
                    .unwrap_or_default(),
            };
            let (rendered, tokens) = match (tok, &sample) {
                (Some(tok), Some(s)) => (
                    Some(cut(&render_sample(s, tok)?, opts.max_chars)),
                    Some(counts(s, tok.layout().eos_id)),
                ),
                _ => (None, None),
            };
            scan.rendered.push(RenderedExample {
                index,
                location: ex.source.to_string(),
                id: ex.id.clone(),
                image: image_desc,
                prompt: cut(&prompt, opts.max_chars),
                answer: cut(&answer, opts.max_chars),
                rendered,
                tokens,
                layout_error,
            });
        }
        if let Some(s) = sample {
            samples.push(s);
        }
        if opts.limit.is_some_and(|l| scan.examples >= l) {
            scan.limited = true;
            break;
        }
    }
    scan.read = stream.stats().clone();
    if let Some(tok) = tok {
        scan.stats = Some(LengthStats::of(&samples, tok.layout().eos_id));
    }
    Ok(scan)
}

impl fmt::Display for ManifestScan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "manifest `{}` (task {}): {} file(s), {} example(s){}",
            self.name,
            self.task.as_str(),
            self.files.len(),
            self.examples,
            if self.limited { " (limit reached)" } else { "" }
        )?;
        for r in &self.rendered {
            writeln!(f, "\n── example {} · {}", r.index, r.location)?;
            if let Some(id) = &r.id {
                writeln!(f, "id: {id}")?;
            }
            if let Some(img) = &r.image {
                writeln!(f, "image: {img}")?;
            }
            if let Some(t) = &r.tokens {
                writeln!(
                    f,
                    "tokens: {} laid out, {} content = {} prompt + {} answer{}",
                    t.total,
                    t.content,
                    t.prompt,
                    t.answer,
                    if t.truncated { " (TRUNCATED)" } else { "" }
                )?;
            }
            match &r.rendered {
                Some(text) => writeln!(f, "{text}")?,
                None => {
                    writeln!(f, "[prompt]\n{}", r.prompt)?;
                    if !r.answer.is_empty() {
                        writeln!(f, "[answer]\n{}", r.answer)?;
                    }
                }
            }
            if let Some(e) = &r.layout_error {
                writeln!(f, "layout error: {e}")?;
            }
        }
        writeln!(f)?;
        write_summary(f, self)
    }
}

fn write_summary(f: &mut fmt::Formatter<'_>, s: &ManifestScan) -> fmt::Result {
    let i = s.images;
    if i.paths + i.bytes + i.codes > 0 {
        writeln!(
            f,
            "images: {} path(s), {} inline, {} pre-tokenized{}",
            i.paths,
            i.bytes,
            i.codes,
            s.placeholder_image_tokens
                .map(|n| format!(" (untokenized images laid out as {n} placeholder codes)"))
                .unwrap_or_default()
        )?;
    }
    if s.read.skipped_records + s.read.skipped_files > 0 {
        writeln!(
            f,
            "skipped: {} record(s), {} empty file(s)",
            s.read.skipped_records, s.read.skipped_files
        )?;
        for r in &s.read.reasons {
            writeln!(f, "  {r}")?;
        }
    }
    if let Some(st) = &s.stats {
        writeln!(
            f,
            "lengths over {} laid-out example(s): tokens min {} / mean {:.1} / max {}; prompt min {} / mean {:.1} / max {}; truncated {}",
            st.count,
            st.tokens.min,
            st.tokens.mean,
            st.tokens.max,
            st.prompt.min,
            st.prompt.mean,
            st.prompt.max,
            st.truncated
        )?;
    }
    if s.layout_errors > 0 {
        writeln!(
            f,
            "layout errors: {} (first: {})",
            s.layout_errors,
            s.first_layout_error.as_deref().unwrap_or("-")
        )?;
    }
    Ok(())
}

/// A compact one-source summary (what `data check` prints per source).
pub struct Summary<'a>(pub &'a ManifestScan);

impl fmt::Display for Summary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        writeln!(
            f,
            "`{}` (task {}): {} file(s), {} example(s), {} skipped",
            s.name,
            s.task.as_str(),
            s.files.len(),
            s.examples,
            s.read.skipped_records
        )?;
        write_summary(f, s)
    }
}

/// `data check` of one source: every record is read (no rendering).
///
/// # Errors
/// As [`scan_manifest`].
pub fn check_manifest(
    manifest: Manifest,
    data_root: Option<&Path>,
    tok: Option<&TextTokenizer>,
    layout: &LayoutConfig,
) -> Result<ManifestScan> {
    scan_manifest(
        manifest,
        data_root,
        tok,
        &ScanOptions {
            n: 0,
            limit: None,
            layout: layout.clone(),
            ..ScanOptions::default()
        },
    )
}
