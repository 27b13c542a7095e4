//! Mixture determinism, resume and rank sharding.

use std::collections::HashSet;

use mmada_data::{Mixture, MixtureSource, Pick};

fn sources() -> Vec<MixtureSource> {
    // Stage-2.2 mmu-stream style weights 3.5 : 5.5 : 0.5 : 0.5.
    [
        ("cot", 40, 3.5),
        ("vqa", 100, 5.5),
        ("clevr", 7, 0.5),
        ("geo", 5, 0.5),
    ]
    .into_iter()
    .map(|(n, len, w)| MixtureSource {
        name: n.into(),
        len,
        weight: w,
        shuffle: true,
    })
    .collect()
}

fn picks(seed: u64, rank: u64, world: u64, n: usize) -> Vec<Pick> {
    Mixture::new(sources(), seed, 1, rank, world)
        .unwrap()
        .take_picks(n)
}

#[test]
fn same_seed_same_order_other_seed_differs() {
    let a = picks(7, 0, 1, 500);
    assert_eq!(a, picks(7, 0, 1, 500));
    assert_ne!(a, picks(8, 0, 1, 500));
    // Weights are respected: vqa ≈ 55 %, geo ≈ 5 %.
    let count = |s| a.iter().filter(|p| p.source == s).count();
    assert!((230..320).contains(&count(1)), "vqa {}", count(1));
    assert!((10..45).contains(&count(3)), "geo {}", count(3));
    // Within a source an epoch is a permutation: the first 5 geo picks cover 0..5.
    let geo: HashSet<u64> = a
        .iter()
        .filter(|p| p.source == 3)
        .take(5)
        .map(|p| p.index)
        .collect();
    assert_eq!(geo, (0..5).collect());
    let geo_epochs: Vec<u64> = a
        .iter()
        .filter(|p| p.source == 3)
        .map(|p| p.epoch)
        .collect();
    assert_eq!(&geo_epochs[..6], &[0, 0, 0, 0, 0, 1]);
}

#[test]
fn resume_from_cursor_continues_identically() {
    let mut m = Mixture::new(sources(), 11, 1, 0, 1).unwrap();
    let _ = m.take_picks(137);
    let json = serde_json::to_string(m.cursor()).unwrap();
    let rest = m.take_picks(300);
    let mut r = Mixture::new(sources(), 11, 1, 0, 1).unwrap();
    r.resume(serde_json::from_str(&json).unwrap()).unwrap();
    assert_eq!(r.take_picks(300), rest);
    assert!(json.len() < 100, "cursor is small: {json}");
    // A cursor of another seed is rejected.
    let mut other = Mixture::new(sources(), 12, 1, 0, 1).unwrap();
    assert!(other.resume(serde_json::from_str(&json).unwrap()).is_err());
}

#[test]
fn two_ranks_are_disjoint_and_union_to_one_rank() {
    let one = picks(3, 0, 1, 400);
    let r0 = picks(3, 0, 2, 200);
    let r1 = picks(3, 1, 2, 200);
    let steps0: HashSet<u64> = r0.iter().map(|p| p.step).collect();
    let steps1: HashSet<u64> = r1.iter().map(|p| p.step).collect();
    assert!(steps0.is_disjoint(&steps1));
    let mut merged: Vec<Pick> = r0.into_iter().chain(r1).collect();
    merged.sort_by_key(|p| p.step);
    assert_eq!(merged, one);
    // Within an epoch no (source, index) is served twice across ranks.
    let first_epoch: Vec<(usize, u64)> = merged
        .iter()
        .filter(|p| p.epoch == 0)
        .map(|p| (p.source, p.index))
        .collect();
    let uniq: HashSet<_> = first_epoch.iter().collect();
    assert_eq!(uniq.len(), first_epoch.len());
}

#[test]
fn bad_mixtures_are_errors() {
    assert!(Mixture::new(vec![], 1, 0, 0, 1).is_err());
    assert!(Mixture::new(sources(), 1, 0, 2, 2).is_err());
    let mut s = sources();
    s[0].weight = 0.0;
    assert!(Mixture::new(s, 1, 0, 0, 1).is_err());
}
