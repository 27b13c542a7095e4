//! Sequence layouts of spec §2.4, token by token on small inputs (tiny vocabulary), and
//! against the upstream rows of `sft_loss/mmada_forward_process`.

mod common;

use mmada_data::layout::{
    chat_layout, drop_caption, lm_layout, mmu_generation_prompt, mmu_layout, sft_layout, t2i_layout,
};
use mmada_data::{IGNORE_ID, TextSplit, TokenLayout, collate};

fn tiny() -> TokenLayout {
    let text = std::fs::read_to_string(common::fixtures().join("tiny_vocab.json"))
        .expect("tests/fixtures/tiny_vocab.json");
    TokenLayout::from_tiny_vocab_json(&text).unwrap()
}

// tiny ids: bos 280, eos 281, soi 284, eoi 285, t2i 288, mmu 289, [iPAD] 293,
// start/end header 303/304, eot 305, image code c -> 320 + c.
const B: u32 = 280;
const E: u32 = 281;
const H: u32 = 304;

#[test]
fn tiny_layout_from_fixture_vocab() {
    let t = tiny();
    assert_eq!(
        (t.mask_id, t.bos_id, t.eos_id, t.pad_id, t.eot_id),
        (300, 280, 281, 281, 305)
    );
    assert_eq!(
        (t.soi_id, t.eoi_id, t.t2i_id, t.mmu_id),
        (284, 285, 288, 289)
    );
    assert_eq!((t.image_code_offset, t.codebook_size), (320, 64));
    assert_eq!((t.ipad_id, t.end_header_id), (293, 304));
}

#[test]
fn lm_layout_pads_with_eos_and_truncates_without_eos() {
    let t = tiny();
    let s = lm_layout(&[10, 11, 12], 8, true, &t);
    assert_eq!(s.ids, vec![B, 10, 11, 12, E, E, E, E]);
    assert_eq!(s.labels, vec![280, 10, 11, 12, 281, 281, 281, 281]);
    assert_eq!((s.prompt_len, s.answer_len, s.truncated), (0, 8, false));
    assert!(s.attention_mask.iter().all(|&a| a));
    // BOS already present: not doubled.
    assert_eq!(lm_layout(&[B, 10], 4, true, &t).ids, vec![B, 10, E, E]);
    // Too long: cut, no EOS forced.
    let s = lm_layout(&[10, 11, 12, 13, 14], 4, true, &t);
    assert_eq!((s.ids, s.truncated), (vec![B, 10, 11, 12], true));
    // Unpadded.
    assert_eq!(lm_layout(&[10], 8, false, &t).ids, vec![B, 10, E]);
}

#[test]
fn chat_layout_prompt_ends_at_last_end_header() {
    let t = tiny();
    // <sh> user <eh> \n q <eot> <sh> assistant <eh> \n a1 a2
    let text = [303, 1, H, 9, 20, 305, 303, 2, H, 9, 30, 31];
    let s = chat_layout(&text, 16, true, &t);
    let mut want = vec![B];
    want.extend(text);
    want.extend([E; 3]);
    assert_eq!(s.ids, want);
    assert_eq!(
        s.prompt_len, 10,
        "BOS + up to and including the 2nd <|end_header_id|>"
    );
    assert_eq!(
        s.answer_len, 6,
        "\\n a1 a2 EOS + EOS padding count as answer"
    );
    assert_eq!(
        s.prompt_mask.iter().filter(|&&m| m).count(),
        10,
        "prompt mask = first 10"
    );
    assert!(s.prompt_mask[..10].iter().all(|&m| m) && s.prompt_mask[10..].iter().all(|&m| !m));
    // No header: prompt length 0.
    assert_eq!(chat_layout(&[5, 6], 4, true, &t).prompt_len, 0);
}

#[test]
fn sft_layout_eos_padded_answer() {
    let t = tiny();
    let s = sft_layout(&[7, 8], &[40, 41, 42], 10, true, &t).unwrap();
    assert_eq!(s.ids, vec![B, 7, 8, 40, 41, 42, E, E, E, E]);
    assert_eq!((s.prompt_len, s.answer_len), (3, 7));
    let s = sft_layout(&[7, 8], &[40, 41, 42], 5, true, &t).unwrap();
    assert_eq!((s.ids, s.truncated), (vec![B, 7, 8, 40, 41], true));
    assert!(sft_layout(&[7, 8, 9, 10], &[1], 5, true, &t).is_err());
}

#[test]
fn t2i_layout_left_pads_with_ipad_to_p_plus_one() {
    let t = tiny();
    // P = 6: text part 7 tokens; N = 3.
    let s = t2i_layout(&[10, 11], &[0, 5, 63], 6, false, &t).unwrap();
    assert_eq!(
        s.ids,
        vec![293, 293, 288, B, 10, 11, E, 284, 320, 325, 383, 285]
    );
    assert_eq!(s.len(), 6 + 1 + 1 + 3 + 1);
    assert_eq!(
        s.attention_mask,
        vec![
            false, false, true, true, true, true, true, true, true, true, true, true
        ]
    );
    assert_eq!(&s.labels[..3], &[IGNORE_ID, IGNORE_ID, 288]);
    assert_eq!(s.labels[7..], [284, 320, 325, 383, 285]);
    assert_eq!((s.prompt_len, s.answer_len), (8, 3));
    assert_eq!(
        s.prompt_mask
            .iter()
            .map(|&m| u8::from(m))
            .collect::<Vec<_>>(),
        vec![1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1]
    );
    // Caption dropout: <t2i> <bos> <eos>.
    let d = t2i_layout(&[10, 11], &[1, 2, 3], 6, true, &t).unwrap();
    assert_eq!(&d.ids[..7], &[293, 293, 293, 293, 288, B, E]);
    // ... and the same from a laid-out captioned row (the trainer's condition dropout).
    let captioned = t2i_layout(&[10, 11], &[1, 2, 3], 6, false, &t).unwrap();
    assert_eq!(drop_caption(&captioned, 6, &t).unwrap(), d);
    let text = sft_layout(&[5, 6], &[7], 8, true, &t).unwrap();
    assert!(
        drop_caption(&text, 6, &t).is_err(),
        "only t2i rows have a caption"
    );
    // Truncation: cut to P tokens then EOS forced, no padding.
    let s = t2i_layout(&[10, 11, 12, 13, 14, 15], &[1], 6, false, &t).unwrap();
    assert_eq!(&s.ids[..7], &[288, B, 10, 11, 12, 13, E]);
    assert!(s.truncated && s.attention_mask.iter().all(|&a| a));
    // Out-of-codebook code.
    assert!(t2i_layout(&[1], &[64], 6, false, &t).is_err());
}

#[test]
fn mmu_layout_eos_pads_text_to_p() {
    let t = tiny();
    let text = [303, 1, H, 9, 20, 305, 303, 2, H, 9, 30];
    let s = mmu_layout(&[3, 4], TextSplit::LastEndHeader(&text), 16, &t).unwrap();
    let mut want = vec![289, 284, 323, 324, 285, B];
    want.extend(text);
    want.extend([E; 4]);
    assert_eq!(s.ids, want);
    assert_eq!(s.len(), 2 + 3 + 16);
    assert_eq!(s.prompt_len, 5 + 10, "image block + BOS..last <eh>");
    assert_eq!(s.answer_len, 21 - 15);
    assert!(s.labels[..5].iter().all(|&l| l == IGNORE_ID));
    assert_eq!(s.labels[5], 280);
    // Truncated: P-1 tokens + forced EOS.
    let s = mmu_layout(&[3], TextSplit::LastEndHeader(&[1, 2, 3, 4, 5]), 4, &t).unwrap();
    assert_eq!(&s.ids[4..], &[B, 1, 2, E]);
    assert!(s.truncated);
    // Generation prompt: no padding.
    let g = mmu_generation_prompt(&[3], &[303, 1, H], &t).unwrap();
    assert_eq!(g, vec![289, 284, 323, 285, B, 303, 1, H]);
}

#[test]
fn collate_pads_text_rows_with_eos_answer() {
    let t = tiny();
    let a = sft_layout(&[7], &[40], 10, false, &t).unwrap();
    let b = sft_layout(&[7, 8], &[40, 41, 42], 10, false, &t).unwrap();
    let batch = collate(vec![a, b], None, &t).unwrap();
    assert_eq!(batch.seq_len, 7);
    assert_eq!(batch.row(0), &[B, 7, 40, E, E, E, E]);
    assert_eq!(batch.answer_lens, vec![5, 4]);
    assert_eq!(batch.prompt_lens, vec![2, 3]);
    // t2i rows cannot be re-padded.
    let x = t2i_layout(&[1], &[1, 2], 4, false, &t).unwrap();
    let y = lm_layout(&[1; 20], 30, false, &t);
    assert!(collate(vec![x, y], None, &t).is_err());
}

// ------------------------------------------------------------ upstream fixture

fn fixture_i64(name: &str) -> (Vec<usize>, Vec<i64>) {
    let bytes = std::fs::read(
        common::fixtures().join("sft_loss/mmada_forward_process/tensors.safetensors"),
    )
    .expect("tests/fixtures/sft_loss/mmada_forward_process/tensors.safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let v = st.tensor(name).unwrap();
    let data = match v.dtype() {
        safetensors::Dtype::I64 => v
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        safetensors::Dtype::U8 => v.data().iter().map(|&b| i64::from(b)).collect(),
        d => panic!("{name}: unexpected dtype {d:?}"),
    };
    (v.shape().to_vec(), data)
}

/// Upstream `MMadaModelLM.forward_process` rows [t2i | lm | mmu] (L = 32). x0 is
/// `labels` where not −100, else `input_ids` (the unmasked prompt / padding).
#[test]
fn layouts_match_upstream_forward_process_rows() {
    let (shape, input_ids) = fixture_i64("input_ids");
    assert_eq!(shape, vec![3, 32]);
    let (_, labels) = fixture_i64("labels");
    let (_, t2i_masks) = fixture_i64("t2i_masks");
    let (_, answer_lengths_lm) = fixture_i64("answer_lengths_lm");
    let (_, answer_lengths) = fixture_i64("answer_lengths");
    let x0: Vec<u32> = (0..96)
        .map(|i| {
            let v = if labels[i] == -100 {
                input_ids[i]
            } else {
                labels[i]
            };
            u32::try_from(v).unwrap()
        })
        .collect();
    let row = |r: usize| &x0[r * 32..(r + 1) * 32];
    let mut t = tiny();
    // The fixture pads t2i text with pad_id 281 (the tiny vocab has no [iPAD]).
    t.ipad_id = 281;

    // Row 0, t2i: caption 5 tokens, text part 16 (= P+1 with P = 15), N = 14.
    let caption = [4, 247, 241, 237, 28];
    let codes: Vec<u32> = row(0)[17..31].iter().map(|&x| x - 320).collect();
    let s = t2i_layout(&caption, &codes, 15, false, &t).unwrap();
    assert_eq!(s.ids, row(0), "t2i ids");
    let att: Vec<i64> = s.attention_mask.iter().map(|&a| i64::from(a)).collect();
    assert_eq!(att, t2i_masks, "t2i attention mask");
    assert_eq!(
        &s.labels[..17],
        &labels[..17],
        "t2i text labels (pads -100)"
    );
    assert_eq!(s.labels[31], labels[31], "<|eoi|> label");

    // Row 1, lm chat (LLaDA SFT layout f): prompt 10 ids incl. BOS, answer 11 ids, EOS pad.
    let prompt = &row(1)[1..10];
    let answer = &row(1)[10..21];
    let s = sft_layout(prompt, answer, 32, true, &t).unwrap();
    assert_eq!(s.ids, row(1), "lm ids");
    assert_eq!(
        s.answer_len as i64, answer_lengths_lm[0],
        "answer_lengths_lm"
    );
    assert_eq!(s.prompt_len, 10);

    // Row 2, mmu: image block of N = 6 codes, text part P = 23, prompt 14 = 9 + 5.
    // The fixture's text has no BOS (its first text id is 5); upstream `mmu_prompt`
    // prepends BOS, so our row is the fixture row with BOS inserted after <|eoi|> and one
    // EOS less at the end; prompt length and answer length shift by one accordingly.
    let codes: Vec<u32> = row(2)[2..8].iter().map(|&x| x - 320).collect();
    let prompt = &row(2)[9..14];
    let answer = &row(2)[14..26];
    let s = mmu_layout(&codes, TextSplit::Explicit { prompt, answer }, 23, &t).unwrap();
    let mut want: Vec<u32> = row(2)[..9].to_vec();
    want.push(t.bos_id);
    want.extend(&row(2)[9..31]);
    assert_eq!(s.ids, want, "mmu ids (with BOS)");
    assert_eq!(s.prompt_len, 14 + 1, "fixture prompt 14 + inserted BOS");
    assert_eq!(
        s.answer_len as i64,
        answer_lengths[0] - 1,
        "fixture answer length 18, one EOS less"
    );
    assert!(s.labels[..9].iter().all(|&l| l == IGNORE_ID));
}
