//! Batch sharding and loss scaling for data parallelism (the collectives themselves are in
//! [`crate::dist`], which knows no trainer type).
//!
//! * **SFT.** Every rank draws the same *global* micro-batch ([`global_data_section`]: each
//!   stream's per-device `batch_size` × world) and noises it whole — the noise of row `i`
//!   depends only on `(seed, step, i)` — then keeps its shard ([`shard_batch`]): row `i` of
//!   every stream goes to rank `i mod world`. The shard loss of stream `s` is multiplied by
//!   `world · local_norm_s / global_norm_s` ([`ShardScale`]; lm / mmu normalise by rows, t2i
//!   by masked image tokens), so the *mean* over ranks of the shard gradients is exactly the
//!   gradient of the 1-device loss on the whole global batch (up to float summation order).
//! * **UniGRPO.** Prompt group `k` of a step belongs to rank `k mod world`
//!   ([`groups_of_rank`]); a group's loss is scaled by `world / non-empty groups of the step`
//!   ([`group_loss_scale`]), so the mean all-reduce gives the 1-device gradient.

use burn::tensor::backend::Backend;
use mmada_diffusion::{UnifiedBatch, UnifiedLoss};

/// Per-stream multipliers that turn a shard's SFT losses into its share of the global loss
/// (see the module docs): `world · local / global` of rows (lm, mmu) or masked image tokens
/// (t2i); 0 when the global count is 0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShardScale {
    /// t2i multiplier.
    pub t2i: f32,
    /// lm multiplier.
    pub lm: f32,
    /// mmu multiplier.
    pub mmu: f32,
}

impl ShardScale {
    /// Scale the three stream losses.
    pub fn apply<B: Backend>(&self, l: UnifiedLoss<B>) -> UnifiedLoss<B> {
        UnifiedLoss {
            t2i: l.t2i * self.t2i,
            lm: l.lm * self.lm,
            mmu: l.mmu * self.mmu,
        }
    }
}

/// Image tokens that the t2i loss averages over (labels ≠ −100 after the text prefix, as
/// `mmada_diffusion::unified_loss` counts them).
fn t2i_targets(b: &UnifiedBatch, rows: impl Iterator<Item = usize>) -> usize {
    let l = b.seq;
    rows.map(|r| {
        ((b.max_seq_length + 1)..l)
            .filter(|&i| b.labels[r * l + i] != -100)
            .count()
    })
    .sum()
}

/// Rank `rank`'s shard of a noised global micro-batch: row `i` of every stream (`t2i | lm |
/// mmu`, in batch order) goes to rank `i mod world`; sequence length, masks and per-row values
/// are kept as noised for the whole batch. Returns the shard and its [`ShardScale`].
///
/// # Panics
/// When `rank >= world`.
pub fn shard_batch(b: &UnifiedBatch, rank: usize, world: usize) -> (UnifiedBatch, ShardScale) {
    assert!(rank < world, "rank {rank} not in 0..{world}");
    let l = b.seq;
    let pick = |n: usize| (0..n).filter(|i| i % world == rank).collect::<Vec<usize>>();
    let (t2i, lm, mmu) = (pick(b.n_t2i), pick(b.n_lm), pick(b.n_mmu));
    let rows: Vec<usize> = t2i
        .iter()
        .copied()
        .chain(lm.iter().map(|i| b.n_t2i + i))
        .chain(mmu.iter().map(|i| b.n_t2i + b.n_lm + i))
        .collect();
    let take_rows = |v: &[i64]| -> Vec<i64> {
        rows.iter()
            .flat_map(|&r| v[r * l..(r + 1) * l].iter().copied())
            .collect()
    };
    fn per_row<T: Copy>(v: &[T], idx: &[usize], l: usize) -> Vec<T> {
        idx.iter()
            .flat_map(|&r| v[r * l..(r + 1) * l].iter().copied())
            .collect()
    }
    let shard = UnifiedBatch {
        ids: take_rows(&b.ids),
        labels: take_rows(&b.labels),
        seq: l,
        n_t2i: t2i.len(),
        n_lm: lm.len(),
        n_mmu: mmu.len(),
        max_seq_length: b.max_seq_length,
        t2i_masks: per_row(&b.t2i_masks, &t2i, l),
        p_mask_lm: per_row(&b.p_mask_lm, &lm, l),
        p_mask_mmu: per_row(&b.p_mask_mmu, &mmu, l),
        answer_lengths_lm: b.answer_lengths_lm.as_ref().map(|a| per_row(a, &lm, l)),
        answer_lengths_mmu: per_row(&b.answer_lengths_mmu, &mmu, l),
        mask_id: b.mask_id,
    };
    let ratio = |local: usize, global: usize| {
        if global == 0 {
            0.0
        } else {
            (world * local) as f32 / global as f32
        }
    };
    let scale = ShardScale {
        t2i: ratio(
            t2i_targets(b, t2i.iter().copied()),
            t2i_targets(b, 0..b.n_t2i),
        ),
        lm: ratio(lm.len(), b.n_lm),
        mmu: ratio(mmu.len(), b.n_mmu),
    };
    (shard, scale)
}

/// The `data:` section every rank draws its data with: each stream's `batch_size` (per
/// device) multiplied by `world`, so that one draw is the global micro-batch.
pub fn global_data_section(
    data: &crate::recipe::DataSection,
    world: usize,
) -> crate::recipe::DataSection {
    let mut d = data.clone();
    for s in [&mut d.t2i, &mut d.lm, &mut d.mmu] {
        s.batch_size *= world;
    }
    d
}

/// The prompt groups (slots `0..groups` of a step) that rank `rank` of `world` rolls out,
/// scores and noises: `k ≡ rank (mod world)`, so a group never straddles devices.
pub fn groups_of_rank(groups: usize, rank: usize, world: usize) -> Vec<usize> {
    (0..groups).filter(|k| k % world == rank).collect()
}

/// The multiplier of one prompt group's loss on a rank: `world / nonempty`, where `nonempty`
/// is the number of non-empty groups of the inner iteration summed over every rank, so that
/// the mean all-reduce of the ranks' gradients is the 1-device mean over groups.
pub fn group_loss_scale(world: usize, nonempty: usize) -> f32 {
    world as f32 / nonempty as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> UnifiedBatch {
        // 1 t2i row, 3 lm rows, seq 4, prefix length 1
        let l = 4;
        let rows = 4;
        UnifiedBatch {
            ids: (0..(rows * l) as i64).collect(),
            labels: vec![
                -100, -100, 5, 6, // t2i: 2 image targets
                1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4,
            ],
            seq: l,
            n_t2i: 1,
            n_lm: 3,
            n_mmu: 0,
            max_seq_length: 1,
            t2i_masks: vec![true; l],
            p_mask_lm: (0..3 * l).map(|i| i as f32).collect(),
            p_mask_mmu: vec![],
            answer_lengths_lm: Some((0..3 * l).map(|i| 100.0 + i as f32).collect()),
            answer_lengths_mmu: vec![],
            mask_id: 99,
        }
    }

    #[test]
    fn shards_are_disjoint_strided_and_rescaled() {
        let b = batch();
        let (s0, k0) = shard_batch(&b, 0, 2);
        let (s1, k1) = shard_batch(&b, 1, 2);
        // rank 0: t2i row 0, lm rows 0 and 2; rank 1: lm row 1
        assert_eq!((s0.n_t2i, s0.n_lm, s1.n_t2i, s1.n_lm), (1, 2, 0, 1));
        assert_eq!(s0.ids[..4], [0, 1, 2, 3]);
        assert_eq!(s0.ids[4..8], [4, 5, 6, 7]);
        assert_eq!(s0.ids[8..12], [12, 13, 14, 15]);
        assert_eq!(s1.ids, vec![8, 9, 10, 11]);
        assert_eq!(s1.p_mask_lm, vec![4.0, 5.0, 6.0, 7.0]);
        assert_eq!(s1.answer_lengths_lm.as_ref().unwrap()[0], 104.0);
        // lm: 2·2/3 and 2·1/3 (mean over ranks = 1), t2i: all targets on rank 0
        assert_eq!(k0.lm, 4.0 / 3.0);
        assert_eq!(k1.lm, 2.0 / 3.0);
        assert_eq!((k0.t2i, k1.t2i), (2.0, 0.0));
        assert_eq!(k0.mmu, 0.0);
        // world 1 keeps everything, scale 1
        let (s, k) = shard_batch(&b, 0, 1);
        assert_eq!(
            (&s.ids, &s.labels, &s.p_mask_lm),
            (&b.ids, &b.labels, &b.p_mask_lm)
        );
        assert_eq!(
            k,
            ShardScale {
                t2i: 1.0,
                lm: 1.0,
                mmu: 0.0
            }
        );
    }

    #[test]
    fn prompt_groups_are_strided_over_ranks() {
        assert_eq!(groups_of_rank(5, 0, 2), vec![0, 2, 4]);
        assert_eq!(groups_of_rank(5, 1, 2), vec![1, 3]);
        assert!(groups_of_rank(2, 2, 3).is_empty());
        // 3 non-empty groups on 2 ranks: the mean over ranks of (scale × group losses) is
        // the 1-device mean over the 3 groups
        assert_eq!(group_loss_scale(2, 3) / 2.0, 1.0 / 3.0);
    }
}
