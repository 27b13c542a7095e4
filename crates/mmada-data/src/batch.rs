//! Batching: pad laid-out samples to a common length with the right pad per layout,
//! filter over-long examples and count truncations.

use mmada_model::tokens::TokenLayout;

use crate::error::{DataError, Result};
use crate::layout::{LayoutKind, Sample};

/// A padded batch of `B` rows of length `L`, row-major (`[B, L]` flattened).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Rows `B`.
    pub batch_size: usize,
    /// Columns `L`.
    pub seq_len: usize,
    /// Token ids `[B, L]`.
    pub ids: Vec<u32>,
    /// Labels `[B, L]` (−100 = ignored).
    pub labels: Vec<i64>,
    /// Prompt mask `[B, L]`.
    pub prompt_mask: Vec<bool>,
    /// Attention mask `[B, L]` (`false` = padding key).
    pub attention_mask: Vec<bool>,
    /// Prompt length per row `[B]`.
    pub prompt_lens: Vec<usize>,
    /// Answer length per row `[B]` (`L − prompt_len` for text rows).
    pub answer_lens: Vec<usize>,
    /// Layout per row `[B]`.
    pub kinds: Vec<LayoutKind>,
    /// How many rows were truncated by their layout.
    pub truncated: usize,
}

/// Counts of [`collate`]: rows filtered for being too long.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Samples dropped by the over-long filter.
    pub filtered_overlong: usize,
    /// Samples cut by their layout (kept).
    pub truncated: usize,
}

/// Drops samples whose *untruncated* layout did not fit (`truncated == true`), as the
/// upstream `ChatDataset` filters examples with ≥ `max_length` tokens. Returns the kept
/// samples and the number dropped.
pub fn filter_overlong(samples: Vec<Sample>) -> (Vec<Sample>, usize) {
    let before = samples.len();
    let kept: Vec<Sample> = samples.into_iter().filter(|s| !s.truncated).collect();
    let dropped = before - kept.len();
    (kept, dropped)
}

/// Pads `samples` to the longest row (or `pad_to` when given, which must be ≥ every row)
/// and stacks them. Text rows are right-padded with EOS (answer padding); t2i rows must
/// all have the same length already.
pub fn collate(samples: Vec<Sample>, pad_to: Option<usize>, t: &TokenLayout) -> Result<Batch> {
    if samples.is_empty() {
        return Err(DataError::Mixture("cannot collate an empty batch".into()));
    }
    let longest = samples.iter().map(Sample::len).max().unwrap_or(0);
    let seq_len = match pad_to {
        Some(p) if p < longest => {
            return Err(DataError::Layout {
                layout: "batch",
                message: format!("pad_to {p} is shorter than the longest row ({longest})"),
            });
        }
        Some(p) => p,
        None => longest,
    };
    let b = samples.len();
    let mut out = Batch {
        batch_size: b,
        seq_len,
        ids: Vec::with_capacity(b * seq_len),
        labels: Vec::with_capacity(b * seq_len),
        prompt_mask: Vec::with_capacity(b * seq_len),
        attention_mask: Vec::with_capacity(b * seq_len),
        prompt_lens: Vec::with_capacity(b),
        answer_lens: Vec::with_capacity(b),
        kinds: Vec::with_capacity(b),
        truncated: 0,
    };
    for mut s in samples {
        s.pad_to(seq_len, t)?;
        out.truncated += usize::from(s.truncated);
        out.ids.extend(&s.ids);
        out.labels.extend(&s.labels);
        out.prompt_mask.extend(&s.prompt_mask);
        out.attention_mask.extend(&s.attention_mask);
        out.prompt_lens.push(s.prompt_len);
        out.answer_lens.push(s.answer_len);
        out.kinds.push(s.kind);
    }
    Ok(out)
}

impl Batch {
    /// Row `i` of the ids.
    pub fn row(&self, i: usize) -> &[u32] {
        &self.ids[i * self.seq_len..(i + 1) * self.seq_len]
    }
}
