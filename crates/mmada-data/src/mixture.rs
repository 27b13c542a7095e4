//! Deterministic, rank-shardable, resumable weighted mixtures.
//!
//! A mixture yields *picks* `(source, index)`. Pick number `g` (global, across ranks)
//! chooses its source with a counter-based RNG of `(seed, stream, g)` weighted by the
//! source weights; within a source, examples are visited in a seeded permutation per epoch
//! (`(seed, source, epoch)`). Rank `r` of `W` takes the picks with `g ≡ r (mod W)`, so ranks
//! are disjoint and together equal the 1-rank stream. The state is the small
//! [`MixtureCursor`]; resuming from it continues the same sequence.
//!
//! The RNG is SplitMix64 (stable, no dependency), so orders never change with a `rand`
//! upgrade (architecture doc "Randomness": each consumer derives its own RNG).
//!
//! Two ways to choose sources ([`Mixing`]): per row (every pick draws its own source, the
//! default) or per batch (MMaDA stage 2.2, spec §3.4: one source per micro-step for the whole
//! sub-batch, drawn with `(seed, stream, batch number)`), through [`Mixture::take_batch`].

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// SplitMix64 finaliser: a stable 64-bit hash.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Hash of a tuple of words (order-sensitive).
pub fn hash_words(words: &[u64]) -> u64 {
    words
        .iter()
        .fold(0x005E_ED0F_DA7A_u64, |h, &w| mix64(h ^ mix64(w)))
}

/// Uniform `f64` in `[0, 1)` from a hash.
fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// How a mixture chooses sources for the rows of a batch ([`Mixture::take_batch`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mixing {
    /// Every row draws its own source by weight.
    #[default]
    PerRow,
    /// One source per batch (micro-step), drawn by weight, for every row of the batch: the
    /// stage-2.2 sampling of upstream `train_mmada_stage4.py` (spec §3.4), e.g. the mmu stream
    /// between mmu-CoT / VQA / CLEVR / Geo170K ∝ 3.5 : 5.5 : 0.5 : 0.5.
    PerBatch,
}

/// One member of a mixture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixtureSource {
    /// Name (manifest name).
    pub name: String,
    /// Number of examples (`> 0`).
    pub len: u64,
    /// Relative weight (`> 0`; weights are normalised).
    pub weight: f64,
    /// Visit in a seeded permutation per epoch (`true`) or in file order.
    #[serde(default = "yes")]
    pub shuffle: bool,
}

fn yes() -> bool {
    true
}

/// One pick of the mixture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pick {
    /// Global pick number `g` (over all ranks).
    pub step: u64,
    /// Source index in the mixture.
    pub source: usize,
    /// Example index within the source.
    pub index: u64,
    /// Epoch of that source (how many times it has been exhausted before).
    pub epoch: u64,
}

/// The serialisable state of a [`Mixture`] (small: one counter per source).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MixtureCursor {
    /// Seed the mixture was built with (checked on resume).
    pub seed: u64,
    /// Next global pick number.
    pub step: u64,
    /// Examples drawn so far from each source (over all ranks).
    pub drawn: Vec<u64>,
    /// Batches taken so far ([`Mixture::take_batch`]); the source of batch `b` under
    /// [`Mixing::PerBatch`] is a function of `(seed, stream, b)`. Absent in cursors written
    /// before per-batch mixing existed (read as 0).
    #[serde(default)]
    pub batches: u64,
}

/// A seeded weighted mixture over sources, for one rank.
#[derive(Debug, Clone)]
pub struct Mixture {
    sources: Vec<MixtureSource>,
    cumulative: Vec<f64>,
    seed: u64,
    stream: u64,
    rank: u64,
    world: u64,
    cursor: MixtureCursor,
    perm_cache: Vec<Option<(u64, Vec<u64>)>>,
    mixing: Mixing,
}

impl Mixture {
    /// Builds a mixture. `stream` separates independent mixtures under one seed (e.g. the
    /// text, mmu and t2i streams); `rank < world`.
    pub fn new(
        sources: Vec<MixtureSource>,
        seed: u64,
        stream: u64,
        rank: u64,
        world: u64,
    ) -> Result<Self> {
        if sources.is_empty() {
            return Err(DataError::Mixture("no sources".into()));
        }
        if world == 0 || rank >= world {
            return Err(DataError::Mixture(format!(
                "rank {rank} is not in 0..world_size {world}"
            )));
        }
        let mut total = 0.0;
        let mut cumulative = Vec::with_capacity(sources.len());
        for s in &sources {
            if s.len == 0 {
                return Err(DataError::Mixture(format!("source `{}` is empty", s.name)));
            }
            if !(s.weight.is_finite() && s.weight > 0.0) {
                return Err(DataError::Mixture(format!(
                    "source `{}` has weight {} (must be > 0)",
                    s.name, s.weight
                )));
            }
            total += s.weight;
            cumulative.push(total);
        }
        for c in &mut cumulative {
            *c /= total;
        }
        let n = sources.len();
        Ok(Self {
            cumulative,
            seed,
            stream,
            rank,
            world,
            cursor: MixtureCursor {
                seed,
                step: 0,
                drawn: vec![0; n],
                batches: 0,
            },
            perm_cache: vec![None; n],
            sources,
            mixing: Mixing::PerRow,
        })
    }

    /// The same mixture choosing sources per row or per batch in [`Mixture::take_batch`].
    pub fn with_mixing(mut self, mixing: Mixing) -> Self {
        self.mixing = mixing;
        self
    }

    /// How [`Mixture::take_batch`] chooses sources.
    pub fn mixing(&self) -> Mixing {
        self.mixing
    }

    /// The sources.
    pub fn sources(&self) -> &[MixtureSource] {
        &self.sources
    }

    /// The current cursor (save it in the checkpoint).
    pub fn cursor(&self) -> &MixtureCursor {
        &self.cursor
    }

    /// Continues from a saved cursor (same sources, seed and stream).
    pub fn resume(&mut self, cursor: MixtureCursor) -> Result<()> {
        if cursor.seed != self.seed || cursor.drawn.len() != self.sources.len() {
            return Err(DataError::Mixture(format!(
                "cursor (seed {}, {} sources) does not match this mixture (seed {}, {} sources)",
                cursor.seed,
                cursor.drawn.len(),
                self.seed,
                self.sources.len()
            )));
        }
        self.cursor = cursor;
        Ok(())
    }

    fn choose_source(&self, step: u64) -> usize {
        self.by_weight(unit(hash_words(&[
            self.seed,
            0x004D_4958,
            self.stream,
            step,
        ])))
    }

    /// The source of batch `batch` under [`Mixing::PerBatch`] (independent of the rank, so
    /// every rank's shard of a global batch comes from the same source).
    pub fn batch_source(&self, batch: u64) -> usize {
        self.by_weight(unit(hash_words(&[
            self.seed,
            0x4241_5443,
            self.stream,
            batch,
        ])))
    }

    fn by_weight(&self, u: f64) -> usize {
        self.cumulative
            .iter()
            .position(|&c| u < c)
            .unwrap_or(self.sources.len() - 1)
    }

    fn index_in_source(&mut self, s: usize, k: u64) -> (u64, u64) {
        let len = self.sources[s].len;
        let epoch = k / len;
        let pos = k % len;
        if !self.sources[s].shuffle {
            return (pos, epoch);
        }
        let stale = !matches!(&self.perm_cache[s], Some((e, _)) if *e == epoch);
        if stale {
            // Fisher–Yates with a counter-based RNG; memory O(len) per cached source.
            let mut perm: Vec<u64> = (0..len).collect();
            for i in (1..len).rev() {
                let h = hash_words(&[self.seed, 0x5045_524D, self.stream, s as u64, epoch, i]);
                let j = h % (i + 1);
                perm.swap(i as usize, j as usize);
            }
            self.perm_cache[s] = Some((epoch, perm));
        }
        let idx = match &self.perm_cache[s] {
            Some((_, p)) => p[pos as usize],
            None => pos,
        };
        (idx, epoch)
    }

    /// The next pick of this rank. Never ends (sources restart with a new epoch).
    pub fn next_pick(&mut self) -> Pick {
        loop {
            let g = self.cursor.step;
            let s = self.choose_source(g);
            let k = self.cursor.drawn[s];
            self.cursor.drawn[s] += 1;
            self.cursor.step += 1;
            if g % self.world == self.rank {
                let (index, epoch) = self.index_in_source(s, k);
                return Pick {
                    step: g,
                    source: s,
                    index,
                    epoch,
                };
            }
        }
    }

    /// `n` picks.
    pub fn take_picks(&mut self, n: usize) -> Vec<Pick> {
        (0..n).map(|_| self.next_pick()).collect()
    }

    /// The `n` rows of this rank for the next batch (one micro-step of the stream), as the
    /// mixing mode says: [`Mixing::PerRow`] is [`Mixture::take_picks`]; [`Mixing::PerBatch`]
    /// draws one source for the batch with [`Mixture::batch_source`] and takes every row of
    /// the global batch from it: the next `n · world` global picks, of which this rank keeps
    /// the `n` with `g ≡ rank (mod world)`. Every call counts as one batch, also with `n = 0`,
    /// so batch `b` is the `b`-th micro-step whatever the row counts.
    pub fn take_batch(&mut self, n: usize) -> Vec<Pick> {
        let b = self.cursor.batches;
        self.cursor.batches += 1;
        match self.mixing {
            Mixing::PerRow => self.take_picks(n),
            Mixing::PerBatch => {
                let s = self.batch_source(b);
                let mut out = Vec::with_capacity(n);
                for _ in 0..n as u64 * self.world {
                    let g = self.cursor.step;
                    let k = self.cursor.drawn[s];
                    self.cursor.drawn[s] += 1;
                    self.cursor.step += 1;
                    if g % self.world == self.rank {
                        let (index, epoch) = self.index_in_source(s, k);
                        out.push(Pick {
                            step: g,
                            source: s,
                            index,
                            epoch,
                        });
                    }
                }
                out
            }
        }
    }
}
