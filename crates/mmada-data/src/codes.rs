//! Image rows → codes: [`ImageTokenizer`] turns `ImageRef::Path` / `ImageRef::Bytes` of
//! examples into `ImageRef::Codes` before layout (issue 8 item 4), through any
//! [`ImageCoder`], with an optional on-disk [`CodeCache`] keyed by the image file's hash,
//! the preprocessing settings and the coder id, so an epoch encodes each image once.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{DataError, Result};
use crate::example::{Example, ImageRef};
use crate::image::{ImageCoder, Pixels, Preprocess, ResizeMode, decode_image, image_transform};

/// 128-bit FNV-1a over the bytes (a cache key, not a security hash).
pub fn fnv1a128(bytes: &[u8]) -> u128 {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013B;
    let mut h = OFFSET;
    for &b in bytes {
        h ^= u128::from(b);
        h = h.wrapping_mul(PRIME);
    }
    h
}

/// The cache key of an image: hash of the encoded file bytes, the preprocessing settings
/// and the coder id, as 32 hex digits.
pub fn cache_key(image_bytes: &[u8], p: &Preprocess, coder_id: &str) -> String {
    let mode = match p.mode {
        ResizeMode::CenterCrop => "crop",
        ResizeMode::Squash => "squash",
    };
    let file = fnv1a128(image_bytes);
    let settings = format!("{file:032x}|{}|{mode}|{coder_id}", p.resolution);
    format!("{:032x}", fnv1a128(settings.as_bytes()))
}

const MAGIC: &[u8; 8] = b"MMCODES1";

/// An on-disk cache of image codes: one small file `<key>.codes` per image (magic,
/// `u32` count, little-endian `u32` codes), written atomically (temporary file + rename)
/// so concurrent ranks can share a folder.
#[derive(Debug, Clone)]
pub struct CodeCache {
    dir: PathBuf,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl CodeCache {
    /// Opens (creating it when needed) a cache folder.
    ///
    /// # Errors
    /// [`DataError::Io`] when the folder cannot be created.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|source| DataError::Io {
            context: "image code cache".into(),
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// The cache folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.codes"))
    }

    /// The cached codes of `key`; `None` when absent or unreadable / corrupt (a corrupt
    /// entry is simply recomputed and overwritten).
    pub fn get(&self, key: &str) -> Option<Vec<u32>> {
        let bytes = std::fs::read(self.path(key)).ok()?;
        let rest = bytes.strip_prefix(MAGIC.as_slice())?;
        let (n, rest) = rest.split_first_chunk::<4>()?;
        let n = u32::from_le_bytes(*n) as usize;
        if rest.len() != n * 4 {
            return None;
        }
        Some(
            rest.chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
    }

    /// Stores codes under `key`.
    ///
    /// # Errors
    /// [`DataError::Io`] when the file cannot be written.
    pub fn put(&self, key: &str, codes: &[u32]) -> Result<()> {
        let mut buf = Vec::with_capacity(12 + 4 * codes.len());
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&(codes.len() as u32).to_le_bytes());
        for c in codes {
            buf.extend_from_slice(&c.to_le_bytes());
        }
        let tmp = self.dir.join(format!(
            ".{key}.{}.{}.tmp",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let io = |path: &Path, source| DataError::Io {
            context: "image code cache".into(),
            path: path.to_path_buf(),
            source,
        };
        std::fs::write(&tmp, &buf).map_err(|e| io(&tmp, e))?;
        let dst = self.path(key);
        std::fs::rename(&tmp, &dst).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io(&dst, e)
        })
    }
}

/// Counts of an [`ImageTokenizer`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenizeStats {
    /// Images run through the coder.
    pub encoded: u64,
    /// Images answered by the cache.
    pub cache_hits: u64,
    /// Examples that already carried codes (or no image).
    pub untouched: u64,
}

/// Turns the images of examples into codes before layout.
pub struct ImageTokenizer<C: ImageCoder> {
    coder: C,
    preprocess: Preprocess,
    cache: Option<CodeCache>,
    stats: TokenizeStats,
}

impl<C: ImageCoder> ImageTokenizer<C> {
    /// A tokenizer with preprocessing `preprocess` and no cache.
    pub fn new(coder: C, preprocess: Preprocess) -> Self {
        Self {
            coder,
            preprocess,
            cache: None,
            stats: TokenizeStats::default(),
        }
    }

    /// Adds an on-disk code cache.
    pub fn with_cache(mut self, cache: CodeCache) -> Self {
        self.cache = Some(cache);
        self
    }

    /// The coder.
    pub fn coder(&self) -> &C {
        &self.coder
    }

    /// The preprocessing settings.
    pub fn preprocess(&self) -> &Preprocess {
        &self.preprocess
    }

    /// Counts so far.
    pub fn stats(&self) -> TokenizeStats {
        self.stats
    }

    /// Replaces the image of every example that has a path or bytes by its codes.
    /// Cache misses are preprocessed and encoded in one [`ImageCoder::encode`] call.
    /// Examples without an image or with codes are left as they are.
    ///
    /// # Errors
    /// [`DataError::Image`] naming the example's manifest / file / line and the image for
    /// an unreadable or undecodable image; [`DataError::ImageCoder`] when the coder fails
    /// or returns the wrong number of results; cache write errors.
    pub fn tokenize(&mut self, examples: &mut [Example]) -> Result<()> {
        let coder_id = self.coder.id();
        // (example index, cache key, pixels) of the misses.
        let mut todo: Vec<(usize, String, Pixels)> = vec![];
        for (i, ex) in examples.iter_mut().enumerate() {
            let (bytes, name, field) = match &ex.image {
                Some(ImageRef::Path(p)) => {
                    let bytes = std::fs::read(p).map_err(|e| DataError::Image {
                        at: Box::new(ex.source.clone()),
                        field: "image",
                        image: p.display().to_string(),
                        message: e.to_string(),
                    })?;
                    (bytes, p.display().to_string(), "image")
                }
                Some(ImageRef::Bytes(b)) => (b.clone(), "<bytes>".to_string(), "image_bytes"),
                Some(ImageRef::Codes(_)) | None => {
                    self.stats.untouched += 1;
                    continue;
                }
            };
            let key = cache_key(&bytes, &self.preprocess, &coder_id);
            if let Some(codes) = self.cache.as_ref().and_then(|c| c.get(&key)) {
                self.stats.cache_hits += 1;
                ex.image = Some(ImageRef::Codes(codes));
                continue;
            }
            let bad = |message: String| DataError::Image {
                at: Box::new(ex.source.clone()),
                field,
                image: name.clone(),
                message,
            };
            let img = decode_image(&bytes).map_err(|e| bad(e.to_string()))?;
            let px = image_transform(&img, &self.preprocess).map_err(|e| bad(e.to_string()))?;
            todo.push((i, key, px));
        }
        if todo.is_empty() {
            return Ok(());
        }
        let pixels: Vec<Pixels> = todo.iter().map(|(_, _, p)| p.clone()).collect();
        let coder_err = |message: String| DataError::ImageCoder {
            coder: coder_id.clone(),
            message,
        };
        let codes = self
            .coder
            .encode(&pixels)
            .map_err(|e| coder_err(e.to_string()))?;
        if codes.len() != todo.len() {
            return Err(coder_err(format!(
                "returned {} code lists for {} images",
                codes.len(),
                todo.len()
            )));
        }
        for ((i, key, _), c) in todo.into_iter().zip(codes) {
            if let Some(cache) = &self.cache {
                cache.put(&key, &c)?;
            }
            self.stats.encoded += 1;
            examples[i].image = Some(ImageRef::Codes(c));
        }
        Ok(())
    }
}
