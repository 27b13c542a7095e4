//! MMaDA's unified forward process over plain rows: clean `[t2i | lm | mmu]` rows in, one
//! noised [`UnifiedBatch`] out (the input of [`crate::unified_loss`]).
//!
//! Every row is noised on its own, from an RNG seeded with the row's own seed
//! (`StdRng::seed_from_u64(row.seed)`), so a row's masks depend only on that seed: the caller
//! decides it (the trainer derives it from run seed, purpose, step and row index), which
//! makes resume, gradient-accumulation splits and data-parallel shards draw the same masks.
//!
//! * t2i rows (spec §3.3, `training/utils.py::mask_or_random_replace_tokens`): MaskGIT image
//!   masking of the image-code positions only ([`ImageMaskDraw::sample`] then
//!   [`image_mask_with`]); masked positions keep their code as label, the other image
//!   positions get label −100, text and special positions keep the row's labels.
//! * lm / mmu rows (LLaDA `forward_process` with prompt protection, spec §3.1–3.2):
//!   [`MaskDraw::sample`] then [`forward_process`] with the row's prompt length; labels are
//!   the clean ids, `p_mask` and the answer length are repeated over the row's positions.

use rand::SeedableRng;
use rand::rngs::StdRng;

use mmada_model::tokens::TokenLayout;

use crate::loss::UnifiedBatch;
use crate::noise::{DEFAULT_EPS, ImageMaskDraw, MaskDraw, forward_process, image_mask_with};
use crate::schedule::MaskSchedule;
use crate::{DiffusionError, check_len};

/// Which loss a row feeds, in batch order: t2i rows first, then lm, then mmu
/// (`MMadaModelLM.forward_process` takes `[t2i | lm | mmu]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RowKind {
    /// Text-to-image: MaskGIT masking of the image codes, mean CE over them.
    T2i,
    /// Text (plain LM, chat, CoT): LLaDA masking of the answer.
    Lm,
    /// Multimodal understanding: LLaDA masking of the answer after the image prompt.
    Mmu,
}

impl RowKind {
    /// `t2i`, `lm` or `mmu`.
    pub fn as_str(self) -> &'static str {
        match self {
            RowKind::T2i => "t2i",
            RowKind::Lm => "lm",
            RowKind::Mmu => "mmu",
        }
    }
}

impl std::fmt::Display for RowKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One clean row of length `seq`, as a collated batch holds it (`mmada_data::collate`).
#[derive(Debug, Clone, Copy)]
pub struct PlainRow<'a> {
    /// Which loss the row feeds.
    pub kind: RowKind,
    /// Clean ids `x0`, `[seq]`.
    pub ids: &'a [u32],
    /// Labels `[seq]`, −100 = ignored. t2i rows: the labels of the text / special
    /// positions (image positions are overwritten); lm / mmu rows: not read (the labels
    /// of text rows are the clean ids, as upstream).
    pub labels: &'a [i64],
    /// Valid (non-`[iPAD]`) positions `[seq]`; read for t2i rows only (the pairwise
    /// attention mask of [`crate::T2iAttention`]).
    pub attention: &'a [bool],
    /// Leading prompt positions that are never masked (lm / mmu rows); `≤ seq`.
    pub prompt_len: usize,
    /// Answer length of the row (lm / mmu: `seq − prompt_len` when EOS padding counts as
    /// answer, spec §3.2), the loss normaliser.
    pub answer_len: usize,
    /// Seed of the row's RNG (`StdRng::seed_from_u64`).
    pub seed: u64,
}

/// The options of the unified forward process (upstream `training.*` / `mask_schedule.*`
/// and the ids of the token layout).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UnifiedNoiseConfig {
    /// `ε` of `p_mask = (1 − ε)·t + ε` for lm / mmu rows.
    pub eps: f32,
    /// Minimum image masking rate of t2i rows (upstream `training.min_masking_rate`).
    pub min_masking_rate: f32,
    /// t2i mask-ratio schedule `γ(τ)` (upstream `mask_schedule.schedule`).
    pub mask_schedule: MaskSchedule,
    /// lm rows: normalise by the answer length (chat / SFT data) or by `n_lm · seq`
    /// (pretraining text), see [`UnifiedBatch::answer_lengths_lm`].
    pub lm_answer_normalised: bool,
    /// Text prompt length `P` of t2i rows (upstream `max_seq_length`).
    pub max_seq_length: usize,
    /// The mask token id.
    pub mask_id: u32,
    /// First image-code id: image token `c` is id `image_code_offset + c`.
    pub image_code_offset: u32,
    /// Number of image codes.
    pub codebook_size: u32,
}

impl UnifiedNoiseConfig {
    /// The ids of `layout`, t2i text length `max_seq_length`, and the upstream defaults:
    /// `ε = 1e-3`, `min_masking_rate = 0`, cosine schedule, answer-normalised lm rows.
    pub fn new(layout: &TokenLayout, max_seq_length: usize) -> Self {
        UnifiedNoiseConfig {
            eps: DEFAULT_EPS,
            min_masking_rate: 0.0,
            mask_schedule: MaskSchedule::Cosine,
            lm_answer_normalised: true,
            max_seq_length,
            mask_id: layout.mask_id,
            image_code_offset: layout.image_code_offset,
            codebook_size: layout.codebook_size,
        }
    }

    fn is_image_code(&self, id: u32) -> bool {
        id.checked_sub(self.image_code_offset)
            .is_some_and(|c| c < self.codebook_size)
    }
}

/// Counts from noising one micro-batch (for `avg_masking_rate` and throughput).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoiseStats {
    /// Masked text tokens.
    pub text_masked: usize,
    /// Answer (maskable) text tokens.
    pub text_answer_tokens: usize,
    /// Sum of `p_mask` over text rows.
    pub p_mask_sum: f64,
    /// Text rows.
    pub text_rows: usize,
    /// Masked image tokens.
    pub t2i_masked: usize,
    /// Image tokens.
    pub t2i_image_tokens: usize,
    /// Tokens in the batch (rows × seq).
    pub tokens: usize,
    /// t2i rows whose caption was replaced by the empty prompt (condition dropout). A data
    /// step before noising: [`unified_forward_process`] leaves it 0 and the caller that
    /// drops captions adds its count.
    pub t2i_captions_dropped: usize,
}

impl NoiseStats {
    /// Accumulate.
    pub fn add(&mut self, o: &NoiseStats) {
        self.text_masked += o.text_masked;
        self.text_answer_tokens += o.text_answer_tokens;
        self.p_mask_sum += o.p_mask_sum;
        self.text_rows += o.text_rows;
        self.t2i_masked += o.t2i_masked;
        self.t2i_image_tokens += o.t2i_image_tokens;
        self.tokens += o.tokens;
        self.t2i_captions_dropped += o.t2i_captions_dropped;
    }

    /// Mean `p_mask` over text rows (upstream `avg_masking_rate` is the mean mask ratio);
    /// without text rows the fraction of masked image tokens.
    pub fn avg_masking_rate(&self) -> f64 {
        if self.text_rows > 0 {
            self.p_mask_sum / self.text_rows as f64
        } else if self.t2i_image_tokens > 0 {
            self.t2i_masked as f64 / self.t2i_image_tokens as f64
        } else {
            0.0
        }
    }
}

/// Noises clean rows into one [`UnifiedBatch`] (`MMadaModelLM.forward_process` input,
/// spec §3.3): per row, an RNG `StdRng::seed_from_u64(row.seed)`, then
///
/// * t2i: image positions = ids in `[image_code_offset, image_code_offset + codebook_size)`;
///   `ImageMaskDraw::sample(rng, n_image)` (τ, then one score per image position) and
///   [`image_mask_with`] (`mask_schedule`, `min_masking_rate`); masked positions become
///   `mask_id` with their code as label, unmasked image positions get label −100, other
///   positions keep `row.labels`; `attention` goes to `t2i_masks`.
/// * lm / mmu: `MaskDraw::sample(rng, 1, seq)` (t, then `seq` uniforms) and
///   [`forward_process`] with `eps`, `mask_id` and the prompt `row.prompt_len` protected;
///   labels are the clean ids; `p_mask` and `answer_len` repeated over the row go to the
///   lm / mmu arrays (`answer_lengths_lm` only when `lm_answer_normalised`).
///
/// `rows` must be ordered t2i, lm, mmu and each array must have `seq` elements.
///
/// # Errors
/// [`DiffusionError::Length`] for a row array that is not `seq` long;
/// [`DiffusionError::Range`] for rows out of `[t2i | lm | mmu]` order, a prompt longer than
/// its row, or invalid `min_masking_rate` / schedule parameters.
pub fn unified_forward_process(
    rows: &[PlainRow<'_>],
    seq: usize,
    cfg: &UnifiedNoiseConfig,
) -> Result<(UnifiedBatch, NoiseStats), DiffusionError> {
    for (r, row) in rows.iter().enumerate() {
        check_len("row ids", row.ids.len(), seq)?;
        check_len("row labels", row.labels.len(), seq)?;
        check_len("row attention", row.attention.len(), seq)?;
        if r > 0 && rows[r - 1].kind > row.kind {
            return Err(DiffusionError::Range {
                what: "rows",
                value: format!("row {r} is {} after {}", row.kind, rows[r - 1].kind),
                why: "rows must be ordered t2i | lm | mmu",
            });
        }
        if row.kind != RowKind::T2i && row.prompt_len > seq {
            return Err(DiffusionError::Range {
                what: "prompt_len",
                value: format!("{} (row {r}, seq {seq})", row.prompt_len),
                why: "a prompt cannot be longer than its row",
            });
        }
    }
    let count = |k: RowKind| rows.iter().filter(|r| r.kind == k).count();
    let (n_t2i, n_lm, n_mmu) = (count(RowKind::T2i), count(RowKind::Lm), count(RowKind::Mmu));
    let mask_id = i64::from(cfg.mask_id);
    let mut ids = Vec::with_capacity(rows.len() * seq);
    let mut labels = Vec::with_capacity(rows.len() * seq);
    let mut t2i_masks = Vec::with_capacity(n_t2i * seq);
    let (mut p_lm, mut ans_lm) = (vec![], vec![]);
    let (mut p_mmu, mut ans_mmu) = (vec![], vec![]);
    let mut stats = NoiseStats::default();
    for row in rows {
        let x0: Vec<i64> = row.ids.iter().map(|&x| i64::from(x)).collect();
        let mut rng = StdRng::seed_from_u64(row.seed);
        match row.kind {
            RowKind::T2i => {
                let image_pos: Vec<usize> = (0..seq)
                    .filter(|&i| cfg.is_image_code(row.ids[i]))
                    .collect();
                let draw = ImageMaskDraw::sample(&mut rng, image_pos.len());
                let m = if image_pos.is_empty() {
                    vec![]
                } else {
                    image_mask_with(&draw, &cfg.mask_schedule, cfg.min_masking_rate)?
                };
                let mut row_ids = x0.clone();
                let mut row_labels = row.labels.to_vec();
                for (j, &i) in image_pos.iter().enumerate() {
                    if m[j] {
                        row_ids[i] = mask_id;
                        row_labels[i] = x0[i];
                    } else {
                        row_labels[i] = -100;
                    }
                }
                stats.t2i_masked += m.iter().filter(|x| **x).count();
                stats.t2i_image_tokens += m.len();
                ids.extend(row_ids);
                labels.extend(row_labels);
                t2i_masks.extend_from_slice(row.attention);
            }
            kind @ (RowKind::Lm | RowKind::Mmu) => {
                let draw = MaskDraw::sample(&mut rng, 1, seq);
                let prompt = row.prompt_len;
                let n = forward_process(&x0, 1, seq, &draw, cfg.eps, mask_id, Some(&[prompt]))?;
                stats.text_masked += n.masked.iter().filter(|x| **x).count();
                stats.text_answer_tokens += seq - prompt;
                stats.p_mask_sum += f64::from(n.p_mask[0]);
                stats.text_rows += 1;
                ids.extend(n.noisy);
                labels.extend(x0);
                let ans = row.answer_len as f32;
                let (p, a) = if kind == RowKind::Mmu {
                    (&mut p_mmu, &mut ans_mmu)
                } else {
                    (&mut p_lm, &mut ans_lm)
                };
                p.extend(std::iter::repeat_n(n.p_mask[0], seq));
                a.extend(std::iter::repeat_n(ans, seq));
            }
        }
    }
    stats.tokens = rows.len() * seq;
    let batch = UnifiedBatch {
        ids,
        labels,
        seq,
        n_t2i,
        n_lm,
        n_mmu,
        max_seq_length: cfg.max_seq_length,
        t2i_masks,
        p_mask_lm: p_lm,
        p_mask_mmu: p_mmu,
        answer_lengths_lm: cfg.lm_answer_normalised.then_some(ans_lm),
        answer_lengths_mmu: ans_mmu,
        mask_id,
    };
    Ok((batch, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: u32 = 99;
    const OFF: u32 = 1000;

    fn cfg() -> UnifiedNoiseConfig {
        UnifiedNoiseConfig {
            eps: 1e-3,
            min_masking_rate: 0.0,
            mask_schedule: MaskSchedule::Cosine,
            lm_answer_normalised: true,
            max_seq_length: 3,
            mask_id: MASK,
            image_code_offset: OFF,
            codebook_size: 16,
        }
    }

    /// t2i `[pad, <|t2i|>, w, w, <|soi|>, c0..c3, <|eoi|>]` (P = 3, image slice 5..9),
    /// lm with a 4-token prompt, mmu with image codes inside its 6-token prompt; seq 10.
    struct Rows {
        ids: [[u32; 10]; 3],
        labels: [[i64; 10]; 3],
        attention: [[bool; 10]; 3],
    }

    fn rows() -> Rows {
        Rows {
            ids: [
                [1, 2, 3, 4, 5, OFF + 3, OFF + 7, OFF, OFF + 15, 6],
                [10, 11, 12, 13, 14, 15, 16, 17, 18, 19],
                [7, 5, OFF + 1, OFF + 2, 6, 20, 21, 22, 23, 24],
            ],
            labels: [
                [-100, -100, -100, -100, -100, 0, 0, 0, 0, 6],
                [-100; 10],
                [-100; 10],
            ],
            attention: [
                [false, true, true, true, true, true, true, true, true, true],
                [true; 10],
                [true; 10],
            ],
        }
    }

    fn plain(r: &Rows, seeds: [u64; 3]) -> Vec<PlainRow<'_>> {
        let kinds = [RowKind::T2i, RowKind::Lm, RowKind::Mmu];
        let (prompts, answers) = ([0, 4, 6], [4, 6, 4]);
        (0..3)
            .map(|k| PlainRow {
                kind: kinds[k],
                ids: &r.ids[k],
                labels: &r.labels[k],
                attention: &r.attention[k],
                prompt_len: prompts[k],
                answer_len: answers[k],
                seed: seeds[k],
            })
            .collect()
    }

    #[test]
    fn certain_masking_is_hand_checkable() {
        // ε = 1 → p_mask = 1: every answer position masked; min_masking_rate = 1: every
        // image code masked.
        let r = rows();
        let c = UnifiedNoiseConfig {
            eps: 1.0,
            min_masking_rate: 1.0,
            ..cfg()
        };
        let (b, st) = unified_forward_process(&plain(&r, [1, 2, 3]), 10, &c).unwrap();
        let m = i64::from(MASK);
        assert_eq!((b.n_t2i, b.n_lm, b.n_mmu, b.seq), (1, 1, 1, 10));
        assert_eq!(b.max_seq_length, 3);
        assert_eq!(b.mask_id, m);
        assert_eq!(&b.ids[..10], &[1, 2, 3, 4, 5, m, m, m, m, 6]);
        assert_eq!(
            &b.labels[..10],
            &[-100, -100, -100, -100, -100, 1003, 1007, 1000, 1015, 6]
        );
        assert_eq!(&b.ids[10..20], &[10, 11, 12, 13, m, m, m, m, m, m]);
        assert_eq!(&b.labels[10..20], &[10, 11, 12, 13, 14, 15, 16, 17, 18, 19]);
        // the image codes of the mmu prompt are never masked
        assert_eq!(&b.ids[20..], &[7, 5, 1001, 1002, 6, 20, m, m, m, m]);
        assert_eq!(b.t2i_masks, r.attention[0]);
        assert_eq!(b.p_mask_lm, vec![1.0; 10]);
        assert_eq!(b.p_mask_mmu, vec![1.0; 10]);
        assert_eq!(b.answer_lengths_lm, Some(vec![6.0; 10]));
        assert_eq!(b.answer_lengths_mmu, vec![4.0; 10]);
        assert_eq!((st.t2i_masked, st.t2i_image_tokens), (4, 4));
        assert_eq!((st.text_masked, st.text_answer_tokens), (10, 10));
        assert_eq!(
            (st.text_rows, st.tokens, st.t2i_captions_dropped),
            (2, 30, 0)
        );
        assert_eq!(st.avg_masking_rate(), 1.0);
        let c = UnifiedNoiseConfig {
            lm_answer_normalised: false,
            ..c
        };
        let (b, _) = unified_forward_process(&plain(&r, [1, 2, 3]), 10, &c).unwrap();
        assert_eq!(b.answer_lengths_lm, None);
    }

    #[test]
    fn random_masks_follow_the_row_seed_and_protect_prompts() {
        let r = rows();
        let c = cfg();
        let m = i64::from(MASK);
        let mut differs = false;
        for s in 0..50u64 {
            let seeds = [3 * s, 3 * s + 1, 3 * s + 2];
            let (b, st) = unified_forward_process(&plain(&r, seeds), 10, &c).unwrap();
            // t2i: only image codes are masked, labels follow the mask
            for i in 0..10 {
                let image = (5..9).contains(&i);
                if !image {
                    assert_eq!(b.ids[i], i64::from(r.ids[0][i]), "seed {s} pos {i}");
                    assert_eq!(b.labels[i], r.labels[0][i]);
                } else if b.ids[i] == m {
                    assert_eq!(b.labels[i], i64::from(r.ids[0][i]));
                } else {
                    assert_eq!(b.labels[i], -100);
                }
            }
            let n = (5..9).filter(|&i| b.ids[i] == m).count();
            assert!((1..=4).contains(&n), "MaskGIT masks 1..=N codes, got {n}");
            assert_eq!(st.t2i_masked, n);
            // text: the prompt is never masked, p_mask ∈ [ε, 1], constant over the row
            assert!(b.ids[10..14].iter().all(|&x| x != m));
            assert!(b.ids[20..26].iter().all(|&x| x != m));
            for p in [&b.p_mask_lm, &b.p_mask_mmu] {
                assert!(p.iter().all(|&x| (c.eps..=1.0).contains(&x) && x == p[0]));
            }
            // each text row is exactly `forward_process` on the draws of its own seed
            for (k, (first, pm)) in [(10, b.p_mask_lm[0]), (20, b.p_mask_mmu[0])]
                .into_iter()
                .enumerate()
            {
                let mut rng = StdRng::seed_from_u64(seeds[k + 1]);
                let draw = MaskDraw::sample(&mut rng, 1, 10);
                let x0: Vec<i64> = r.ids[k + 1].iter().map(|&x| i64::from(x)).collect();
                let want =
                    forward_process(&x0, 1, 10, &draw, c.eps, m, Some(&[[4, 6][k]])).unwrap();
                assert_eq!(b.ids[first..first + 10], want.noisy[..]);
                assert_eq!(pm, want.p_mask[0]);
            }
            // same seeds → the same batch; t2i masks are independent of the other rows
            let (again, _) = unified_forward_process(&plain(&r, seeds), 10, &c).unwrap();
            assert_eq!((&again.ids, &again.labels), (&b.ids, &b.labels));
            assert_eq!(again.p_mask_lm, b.p_mask_lm);
            let other = [seeds[0], 999, 998];
            let (o, _) = unified_forward_process(&plain(&r, other), 10, &c).unwrap();
            assert_eq!(o.ids[..10], b.ids[..10]);
            differs |= o.ids[10..] != b.ids[10..];
        }
        assert!(differs, "other seeds must draw other text masks");
    }

    #[test]
    fn bad_rows_are_errors() {
        let r = rows();
        let mut p = plain(&r, [1, 2, 3]);
        p.swap(0, 1);
        let e = unified_forward_process(&p, 10, &cfg()).unwrap_err();
        assert!(e.to_string().contains("t2i | lm | mmu"), "{e}");
        let e = unified_forward_process(&plain(&r, [1, 2, 3]), 9, &cfg()).unwrap_err();
        assert!(
            e.to_string()
                .contains("`row ids` has 10 elements, expected 9"),
            "{e}"
        );
        let mut p = plain(&r, [1, 2, 3]);
        p[1].prompt_len = 11;
        let e = unified_forward_process(&p, 10, &cfg()).unwrap_err();
        assert!(e.to_string().contains("prompt_len"), "{e}");
        let c = UnifiedNoiseConfig {
            min_masking_rate: 1.5,
            ..cfg()
        };
        assert!(unified_forward_process(&plain(&r, [1, 2, 3]), 10, &c).is_err());
        // no rows: an empty batch
        let (b, st) = unified_forward_process(&[], 10, &cfg()).unwrap();
        assert_eq!(
            (b.ids.len(), b.n_t2i + b.n_lm + b.n_mmu, st.tokens),
            (0, 0, 0)
        );
    }
}
