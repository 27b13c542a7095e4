//! The block sampler on a tiny real [`LladaModel`] (d_model 64, 2 layers, 384-id head): batch
//! invariance with left padding + key-padding attention (also through
//! [`generate_completions`]), and the `sample_vocab` restriction on a head wider than the
//! tokenizer.

use burn::tensor::{Bool, Int, Tensor, TensorData};
use mmada_model::backend::Cpu;
use mmada_model::{FloatDType, LladaModel, ModelConfig};

use crate::{GenerateConfig, SeededRng, generate, generate_completions, host};

pub(crate) const MASK: u32 = 300;
const PAD: i64 = 281;

pub(crate) fn tiny_model() -> (ModelConfig, LladaModel<Cpu>) {
    let cfg = ModelConfig::tiny();
    let model = mmada_model::init::init_model::<Cpu>(&cfg, 3, &Default::default(), FloatDType::F32);
    (cfg, model)
}

/// Left-pads `rows` with [`PAD`] and returns the prompt and the key-padding mask.
pub(crate) fn left_padded(
    rows: &[Vec<i64>],
) -> (Tensor<Cpu, 2, Int>, Option<Tensor<Cpu, 2, Bool>>) {
    let lp = rows.iter().map(Vec::len).max().unwrap();
    let mut ids = Vec::new();
    let mut keep = Vec::new();
    for r in rows {
        ids.extend(std::iter::repeat_n(PAD, lp - r.len()));
        ids.extend(r);
        keep.extend(std::iter::repeat_n(false, lp - r.len()));
        keep.extend(std::iter::repeat_n(true, r.len()));
    }
    let d = Default::default();
    let mask = keep
        .iter()
        .any(|k| !k)
        .then(|| Tensor::from_data(TensorData::new(keep, [rows.len(), lp]), &d));
    (
        Tensor::from_data(TensorData::new(ids, [rows.len(), lp]), &d),
        mask,
    )
}

/// The generated ids of each prompt, decoding the prompts in batches of `batch`.
fn decode_in_batches(
    model: &LladaModel<Cpu>,
    prompts: &[Vec<i64>],
    c: &GenerateConfig,
    batch: usize,
) -> Vec<Vec<i64>> {
    let mut all = Vec::new();
    for chunk in prompts.chunks(batch) {
        let (p, m) = left_padded(chunk);
        let lp = p.dims()[1];
        let out = generate(model, p, m, c, &mut SeededRng::new(0), false).unwrap();
        let l = lp + c.gen_length;
        let ids = host::ints(out.ids).unwrap();
        for r in 0..chunk.len() {
            all.push(ids[r * l + lp..(r + 1) * l].to_vec());
        }
    }
    all
}

#[test]
fn greedy_tokens_do_not_depend_on_the_batch() {
    let (_, model) = tiny_model();
    // 5 prompts of lengths 3, 7, 5, 1, 9 (ids below the mask id, none equal to the pad id)
    let prompts: Vec<Vec<i64>> = [3usize, 7, 5, 1, 9]
        .iter()
        .enumerate()
        .map(|(k, &n)| {
            (0..n)
                .map(|i| ((k * 37 + i * 11) % 250) as i64 + 1)
                .collect()
        })
        .collect();
    let c = GenerateConfig {
        steps: 8,
        gen_length: 16,
        block_length: 8,
        ..GenerateConfig::new(MASK)
    };
    let one = decode_in_batches(&model, &prompts, &c, 1);
    let two = decode_in_batches(&model, &prompts, &c, 2);
    let five = decode_in_batches(&model, &prompts, &c, 5);
    assert_eq!(one, two);
    assert_eq!(one, five);
    assert!(
        one.iter()
            .all(|r| r.len() == 16 && !r.contains(&i64::from(MASK)))
    );
    // the answers differ between prompts (the model is not constant)
    assert!(one.iter().any(|r| r != &one[0]), "{one:?}");
}

#[test]
fn temperature_two_on_a_wide_head_stays_inside_the_tokenizer() {
    let (cfg, model) = tiny_model();
    // head of 384 ids (text + image codes); the tokenizer has llm_vocab_size = 320 ids
    let tok_len = cfg.llm_vocab_size.unwrap();
    assert!(cfg.embedding_size > tok_len);
    let mut c = GenerateConfig {
        steps: 32,
        gen_length: 32,
        block_length: 32,
        temperature: 2.0,
        ..GenerateConfig::new(MASK)
    };
    let (p, m) = left_padded(&[vec![5, 6, 7], vec![9]]);
    // unrestricted, a near-flat head samples ids above the tokenizer
    let wide = generate(
        &model,
        p.clone(),
        m.clone(),
        &c,
        &mut SeededRng::new(0),
        false,
    )
    .unwrap();
    let ids = host::ints(wide.ids).unwrap();
    assert!(ids.iter().any(|&t| t >= tok_len as i64), "{ids:?}");
    c.sample_vocab = Some(tok_len);
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..3 {
        let out = generate(
            &model,
            p.clone(),
            m.clone(),
            &c,
            &mut SeededRng::new(seed),
            false,
        )
        .unwrap();
        let ids = host::ints(out.ids).unwrap();
        for r in 0..2 {
            let row = &ids[r * 35 + 3..(r + 1) * 35];
            assert!(
                row.iter()
                    .all(|&t| (0..tok_len as i64).contains(&t) && t != i64::from(MASK)),
                "{row:?}"
            );
            seen.extend(row.iter().copied());
        }
    }
    assert!(
        seen.len() > 50,
        "temperature 2 should spread over many ids: {}",
        seen.len()
    );
}

#[test]
fn out_of_vocabulary_prompt_ids_are_typed_errors_before_any_forward() {
    let (cfg, model) = tiny_model();
    let c = GenerateConfig {
        steps: 4,
        gen_length: 4,
        block_length: 4,
        ..GenerateConfig::new(MASK)
    };
    let (p, m) = left_padded(&[vec![5, cfg.embedding_size as i64], vec![7]]);
    let e = generate(&model, p, m, &c, &mut SeededRng::new(0), false).unwrap_err();
    assert_eq!(
        e,
        crate::SamplerError::PromptId {
            row: 0,
            position: 1,
            id: cfg.embedding_size as i64,
            vocab: Some(cfg.embedding_size)
        }
    );
    assert!(e.to_string().contains("tokenizer"), "{e}");
    let mut bad = c.clone();
    bad.mask_id = 1000;
    let (p, m) = left_padded(&[vec![5]]);
    assert!(matches!(
        generate(&model, p, m, &bad, &mut SeededRng::new(0), false),
        Err(crate::SamplerError::IdOutOfVocab {
            what: "mask_id",
            id: 1000,
            vocab: 384
        })
    ));
}

#[test]
fn completions_do_not_depend_on_the_batch_and_match_generate() {
    let (_, model) = tiny_model();
    let d = Default::default();
    let prompts: Vec<Vec<u32>> = [4usize, 1, 6]
        .iter()
        .enumerate()
        .map(|(k, &n)| {
            (0..n)
                .map(|i| ((k * 29 + i * 13) % 250) as u32 + 1)
                .collect()
        })
        .collect();
    let c = GenerateConfig {
        steps: 8,
        gen_length: 16,
        block_length: 8,
        ..GenerateConfig::new(MASK)
    };
    let run = |ps: &[Vec<u32>], stop: &[u32]| {
        generate_completions::<Cpu, _>(&model, ps, &c, stop, PAD as u32, &mut SeededRng::new(0), &d)
            .unwrap()
    };
    let batch = run(&prompts, &[]);
    assert_eq!(
        (batch.nfe, batch.blocks, batch.decoded, batch.padded_len),
        (8, 2, 16, 6)
    );
    for (i, p) in prompts.iter().enumerate() {
        let alone = run(std::slice::from_ref(p), &[]);
        assert_eq!(alone.rows[0], batch.rows[i], "prompt {i}");
        assert_eq!(batch.rows[i].prompt_len, p.len());
        assert_eq!(batch.rows[i].generated.len(), 16);
        assert!(!batch.rows[i].generated.contains(&MASK));
        // one prompt alone is `generate(prompt, None, …)` (no mask for equal lengths)
        let ids: Vec<i64> = p.iter().map(|&t| i64::from(t)).collect();
        let g = generate(
            &model,
            host::int_tensor::<Cpu>(&ids, 1, p.len(), &d),
            None,
            &c,
            &mut SeededRng::new(0),
            false,
        )
        .unwrap();
        let canvas = host::ints(g.ids).unwrap();
        let expected: Vec<u32> = canvas[p.len()..].iter().map(|&t| t as u32).collect();
        assert_eq!(alone.rows[0].generated, expected, "prompt {i}");
    }
    // stop ids taken from the answers: each row is cut before its first one
    let stop = [batch.rows[0].generated[3], batch.rows[2].generated[0]];
    let cut = run(&prompts, &stop);
    for (r, row) in cut.rows.iter().enumerate() {
        assert_eq!(row.generated, batch.rows[r].generated);
        let end = row.generated.iter().position(|t| stop.contains(t));
        assert_eq!(row.ids, row.generated[..end.unwrap_or(16)].to_vec());
        assert_eq!(row.terminated, end.is_some());
    }
    assert!(cut.rows[0].ids.len() <= 3 && cut.rows[0].terminated);
    assert!(cut.rows[2].ids.is_empty() && cut.rows[2].terminated);
}
