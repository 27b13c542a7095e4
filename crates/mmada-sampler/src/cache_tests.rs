//! The key/value cache of the block sampler ([`crate::CacheMode`]) on a tiny real
//! [`LladaModel`]: a refresh at every step is the uncached sampler bit for bit (every canvas
//! of the trace), cached decoding is batch / left-padding invariant for prompts of 1–40 ids
//! at batch 1, 2 and 5, the counters (refreshes, cache hits, positions computed) are those of
//! the schedule, and a denoiser without a cache runs uncached and reports no hit.

use burn::tensor::{Int, Tensor};
use mmada_model::backend::Cpu;
use mmada_model::{Attention, Denoiser, LladaModel};

use crate::model_tests::{MASK, left_padded, tiny_model};
use crate::{CacheMode, GenerateConfig, GenerateOutput, SeededRng, generate, host};

fn run(
    model: &impl Denoiser<Cpu>,
    rows: &[Vec<i64>],
    c: &GenerateConfig,
    trace: bool,
) -> GenerateOutput<Cpu> {
    let (p, m) = left_padded(rows);
    generate(model, p, m, c, &mut SeededRng::new(1), trace).unwrap()
}

fn prompts(n: usize, salt: usize) -> Vec<Vec<i64>> {
    (0..n)
        .map(|k| {
            let len = k + 1;
            (0..len)
                .map(|i| ((k * 37 + i * 11 + salt) % 250) as i64 + 1)
                .collect()
        })
        .collect()
}

fn base() -> GenerateConfig {
    GenerateConfig {
        steps: 8,
        gen_length: 16,
        block_length: 8,
        ..GenerateConfig::new(MASK)
    }
}

/// `refresh_every: 1` runs every step as a refresh, i.e. the uncached forward: every canvas
/// of the trace equals `cache: none`, for the fixed schedule, threshold decoding, CFG with key
/// padding, a vicinity and temperature sampling.
#[test]
fn refresh_every_step_is_the_uncached_sampler_exactly() {
    let (_, model) = tiny_model();
    let rows = vec![
        vec![5, 6, 7, 8, 9],
        vec![11, 12],
        vec![40, 41, 42, 43, 44, 45, 46],
    ];
    let variants = [
        base(),
        GenerateConfig {
            threshold: Some(0.9),
            ..base()
        },
        GenerateConfig {
            cfg_scale: 1.5,
            vicinity: 2,
            ..base()
        },
        GenerateConfig {
            temperature: 1.0,
            steps: 16,
            ..base()
        },
    ];
    for (i, v) in variants.iter().enumerate() {
        let none = run(&model, &rows, v, true);
        assert_eq!((none.refreshes, none.cache_hits), (0, 0));
        for mode in [CacheMode::Prefix, CacheMode::Dual] {
            let c = GenerateConfig {
                cache: mode,
                refresh_every: 1,
                ..v.clone()
            };
            let out = run(&model, &rows, &c, true);
            assert_eq!(
                out.trace.as_ref().unwrap().canvases,
                none.trace.as_ref().unwrap().canvases,
                "variant {i}, {mode:?}"
            );
            assert_eq!(out.nfe, none.nfe, "variant {i}, {mode:?}");
            assert_eq!((out.refreshes, out.cache_hits), (out.nfe, 0));
            assert_eq!(out.positions, none.positions);
        }
    }
}

/// With the cache refreshed at block starts only, prompts of lengths 1–40 give the same
/// tokens decoded one at a time, in pairs and in fives (left padding + key padding, per-row
/// prompt lengths), for the prefix and the dual cache; the cache is used (hits counted).
#[test]
fn cached_decoding_does_not_depend_on_the_batch() {
    let (_, model) = tiny_model();
    let all = prompts(40, 3);
    for (mode, threshold) in [(CacheMode::Prefix, None), (CacheMode::Dual, Some(0.9))] {
        let c = GenerateConfig {
            cache: mode,
            threshold,
            ..base()
        };
        let mut answers: Vec<Vec<Vec<i64>>> = Vec::new();
        for batch in [1usize, 2, 5] {
            let mut got = Vec::new();
            let (mut hits, mut nfe) = (0, 0);
            for chunk in all.chunks(batch) {
                let out = run(&model, chunk, &c, false);
                assert_eq!(out.nfe, out.refreshes + out.cache_hits);
                hits += out.cache_hits;
                nfe += out.nfe;
                let lp = chunk.iter().map(Vec::len).max().unwrap();
                let l = lp + c.gen_length;
                let ids = host::ints(out.ids).unwrap();
                for r in 0..chunk.len() {
                    got.push(ids[r * l + lp..(r + 1) * l].to_vec());
                }
            }
            eprintln!("{mode:?} batch {batch}: nfe {nfe}, cache hits {hits}");
            assert!(
                hits > nfe / 3,
                "{mode:?} batch {batch}: {hits} cache hits of {nfe}"
            );
            answers.push(got);
        }
        for (k, want) in answers[0].iter().enumerate() {
            assert!(!want.contains(&i64::from(MASK)), "{mode:?} prompt {k}");
            assert_eq!(&answers[1][k], want, "{mode:?}: prompt {k}, batch 2 vs 1");
            assert_eq!(&answers[2][k], want, "{mode:?}: prompt {k}, batch 5 vs 1");
        }
    }
}

/// The counters follow the schedule: one refresh per block (plus one every `refresh_every`
/// steps), the other steps hit the cache, and the positions run through the network are the
/// canvas at a refresh, `[block start, end)` for the prefix cache and the block (widened by
/// the vicinity) for the dual cache.
#[test]
fn counters_follow_the_schedule() {
    let (_, model) = tiny_model();
    let rows = vec![vec![5, 6, 7, 8]];
    let (lp, g, bl, spb) = (4, 16, 8, 4);
    let l = lp + g;
    let c = GenerateConfig { steps: 8, ..base() };
    let none = run(&model, &rows, &c, false);
    assert_eq!((none.nfe, none.positions, none.committed), (8, 8 * l, g));
    assert_eq!(none.tokens_per_forward(1), 2.0);
    let prefix = run(
        &model,
        &rows,
        &GenerateConfig {
            cache: CacheMode::Prefix,
            ..c.clone()
        },
        false,
    );
    assert_eq!((prefix.refreshes, prefix.cache_hits), (2, 6));
    // block 0 queries [4, 20), block 1 [12, 20)
    assert_eq!(prefix.positions, 2 * l + 3 * (l - lp) + 3 * (l - lp - bl));
    let dual = run(
        &model,
        &rows,
        &GenerateConfig {
            cache: CacheMode::Dual,
            vicinity: 1,
            ..c.clone()
        },
        false,
    );
    // block 0 queries [3, 13), block 1 [11, 20)
    assert_eq!(dual.positions, 2 * l + 3 * (bl + 2) + 3 * (bl + 1));
    let every2 = run(
        &model,
        &rows,
        &GenerateConfig {
            cache: CacheMode::Dual,
            refresh_every: 2,
            ..c.clone()
        },
        false,
    );
    assert_eq!((every2.refreshes, every2.cache_hits), (4, 4));
    assert_eq!(dual.committed, g);
    assert_eq!(spb, c.steps_per_block());
}

/// A denoiser whose `window_logits_caching` has no cache (the trait default): `cache: prefix`
/// decodes exactly as `none` and reports no refresh and no hit.
struct NoCache(LladaModel<Cpu>);
impl Denoiser<Cpu> for NoCache {
    fn logits(&self, ids: Tensor<Cpu, 2, Int>, attention: &Attention<Cpu>) -> Tensor<Cpu, 3> {
        self.0.logits(ids, attention)
    }
}

#[test]
fn a_denoiser_without_a_cache_runs_uncached_and_reports_no_hit() {
    let (_, model) = tiny_model();
    let wrapped = NoCache(model);
    let rows = prompts(3, 9);
    let none = run(&wrapped, &rows, &base(), true);
    let c = GenerateConfig {
        cache: CacheMode::Prefix,
        ..base()
    };
    let out = run(&wrapped, &rows, &c, true);
    assert_eq!(out.trace.unwrap().canvases, none.trace.unwrap().canvases);
    assert_eq!(
        (out.refreshes, out.cache_hits, out.positions),
        (0, 0, none.positions)
    );
}
