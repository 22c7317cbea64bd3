//! Sliding-window perplexity: the guide's loop by hand in f64 on a fake model, and transformers'
//! number on the reference fixture.

mod common;

use candle_core::{DType, Device, Tensor};
use deltaserve_eval::{perplexity, perplexity_with, PplSettings};
use deltaserve_model::{Checkpoint, Model};

const V: usize = 7;

/// A fake model whose logits at a window position depend on the token there, the position in
/// the window and the window's first token, so getting context or alignment wrong changes them.
fn fake_logit(window: &[u32], t: usize, v: usize) -> f64 {
    let x = window[t] as f64;
    let c = window[0] as f64;
    ((x * 1.3 + v as f64 * 0.7 + t as f64 * 0.11 + c * 0.05).sin() * 2.5) as f32 as f64
}

fn fake_logits(window: &[u32]) -> Tensor {
    let data: Vec<f32> = (0..window.len())
        .flat_map(|t| (0..V).map(move |v| (t, v)))
        .map(|(t, v)| fake_logit(window, t, v) as f32)
        .collect();
    Tensor::from_vec(data, (window.len(), V), &Device::Cpu).unwrap()
}

/// The guide's loop, written out with labels and −100 as in Python, in f64.
fn guide_by_hand(ids: &[u32], max_length: usize, stride: usize) -> (f64, usize, usize, usize) {
    let n = ids.len();
    let (mut nll_sum, mut n_tokens, mut prev_end, mut windows, mut scored) =
        (0f64, 0usize, 0usize, 0usize, 0usize);
    let mut begin = 0;
    while begin < n {
        let end = (begin + max_length).min(n);
        let trg_len = end - prev_end;
        let input = &ids[begin..end];
        let mut labels: Vec<i64> = input.iter().map(|&t| t as i64).collect();
        let masked = labels.len().saturating_sub(trg_len);
        for l in labels.iter_mut().take(masked) {
            *l = -100;
        }
        // Shift: logits[t] predicts labels[t + 1].
        let (mut sum, mut cnt) = (0f64, 0usize);
        for t in 0..input.len() - 1 {
            let y = labels[t + 1];
            if y == -100 {
                continue;
            }
            let row: Vec<f64> = (0..V).map(|v| fake_logit(input, t, v)).collect();
            let lse = row.iter().map(|x| x.exp()).sum::<f64>().ln();
            sum += lse - row[y as usize];
            cnt += 1;
        }
        let loss = sum / cnt as f64;
        scored += cnt;
        let num_valid = labels.iter().filter(|&&l| l != -100).count();
        let num_loss_tokens = num_valid - 1; // the guide subtracts batch_size
        nll_sum += loss * num_loss_tokens as f64;
        n_tokens += num_loss_tokens;
        windows += 1;
        prev_end = end;
        if end == n {
            break;
        }
        begin += stride;
    }
    ((nll_sum / n_tokens as f64).exp(), n_tokens, windows, scored)
}

#[test]
fn windowing_matches_the_guide_loop_by_hand() {
    let ids: Vec<u32> = (0..21u32).map(|i| (i * 5 + 3) % V as u32).collect();
    // seq 8, stride 5 over 21 tokens: windows [0,8) [5,13) [10,18) [15,21); the last is shorter
    // than the window and scores only 3 new targets, fewer than the stride.
    for &(seq_len, stride, per_batch) in &[
        (8, 5, 1),
        (8, 5, 3),
        (8, 8, 2),
        (21, 4, 1),
        (64, 16, 1),
        (6, 1, 4),
    ] {
        let (want, tokens, windows, scored) = guide_by_hand(&ids, seq_len, stride);
        let mut calls = 0;
        let got = perplexity_with(&ids, PplSettings { seq_len, stride }, per_batch, |ws| {
            calls += 1;
            assert!(ws.len() <= per_batch);
            Ok(ws.iter().map(|w| fake_logits(w)).collect())
        })
        .unwrap();
        let rel = (got.ppl - want).abs() / want;
        assert!(
            rel < 1e-6,
            "seq {seq_len} stride {stride}: ppl {} vs by hand {want} (rel {rel:.2e})",
            got.ppl
        );
        assert_eq!(got.loss_tokens, tokens, "seq {seq_len} stride {stride}");
        assert_eq!(got.windows, windows);
        // With stride < seq_len every token after the first is a target exactly once; with
        // stride == seq_len each window's first token is never predicted (as in the guide).
        assert_eq!(got.scored_targets, scored);
        if stride < seq_len {
            assert_eq!(got.scored_targets, ids.len() - 1);
        }
        assert_eq!(calls, windows.div_ceil(per_batch));
    }
}

#[test]
fn bad_settings_are_refused() {
    let ids = [1u32, 2, 3, 4];
    let f = |ws: &[&[u32]]| Ok(ws.iter().map(|w| fake_logits(w)).collect());
    assert!(perplexity_with(
        &ids,
        PplSettings {
            seq_len: 4,
            stride: 0
        },
        1,
        f
    )
    .is_err());
    assert!(perplexity_with(
        &ids,
        PplSettings {
            seq_len: 4,
            stride: 5
        },
        1,
        f
    )
    .is_err());
    assert!(perplexity_with(
        &ids[..1],
        PplSettings {
            seq_len: 4,
            stride: 2
        },
        1,
        f
    )
    .is_err());
}

#[test]
fn model_perplexity_clamps_seq_len_to_the_context() {
    let tiny = common::tiny_pair(0.05);
    let ids: Vec<u32> = (0..150u32)
        .map(|i| (i * 7 + 1) % common::VOCAB as u32)
        .collect();
    // The tiny model's context is 64 tokens.
    let r = perplexity(
        &tiny.base,
        None,
        &ids,
        PplSettings {
            seq_len: 2048,
            stride: 512,
        },
    )
    .unwrap();
    assert_eq!(
        r.settings,
        PplSettings {
            seq_len: 64,
            stride: 64
        }
    );
    let same = perplexity(
        &tiny.base,
        None,
        &ids,
        PplSettings {
            seq_len: 64,
            stride: 64,
        },
    )
    .unwrap();
    assert_eq!(r.ppl, same.ppl);
    assert!(r.ppl.is_finite() && r.ppl > 1.0);
}

/// Transformers' sliding-window perplexity of the reference Llama fixture (float32 model).
#[test]
fn perplexity_matches_transformers_on_the_fixture() {
    let dir = common::fixture_dir("llama");
    let ref_path = dir.join("reference.safetensors");
    let bytes = std::fs::read(&ref_path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; HINT: the fixture comes from scripts/reference/make_fixtures.py",
            ref_path.display()
        )
    });
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, md) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = md.metadata().clone().unwrap_or_default();
    let get = |k: &str| {
        meta.get(k)
            .unwrap_or_else(|| panic!("metadata `{k}` missing from {}", ref_path.display()))
            .clone()
    };
    let view = st.tensor("ppl_input_ids").unwrap();
    assert_eq!(view.dtype(), safetensors::Dtype::I64);
    let ids: Vec<u32> = view
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect();
    let settings = PplSettings {
        seq_len: get("ppl_seq_len").parse().unwrap(),
        stride: get("ppl_stride").parse().unwrap(),
    };
    let want: f64 = get("ppl").parse().unwrap();
    let want_f64: f64 = get("ppl_f64").parse().unwrap();

    let ckpt = Checkpoint::open(&dir).unwrap();
    let model = Model::load(&ckpt, DType::F32, &Device::Cpu).unwrap();
    let got = perplexity(&model, None, &ids, settings).unwrap();
    let rel = (got.ppl - want).abs() / want;
    let rel64 = (got.ppl - want_f64).abs() / want_f64;
    eprintln!(
        "ppl: ours {:.9} transformers {want:.9} (rel {rel:.2e}); float64 reference {want_f64:.9} (rel {rel64:.2e}); {} loss tokens",
        got.ppl, got.loss_tokens
    );
    if let Some(n) = meta.get("ppl_num_loss_tokens") {
        assert_eq!(
            got.loss_tokens.to_string(),
            *n,
            "loss token count differs from the guide's"
        );
    }
    assert!(
        rel < 1e-4,
        "ppl {} vs transformers {want}: relative difference {rel:.2e}",
        got.ppl
    );
}
