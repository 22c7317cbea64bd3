//! Data loading with the fixture's tokenizer and chat template (`<|user|>\n…<|end|>\n<|assistant|>\n…<|end|>\n`).

mod common;

use deltaserve_eval::{encode_chat, load_dataset, Scored};
use deltaserve_model::{ChatMessage, TextCodec};

fn codec() -> TextCodec {
    TextCodec::from_dir(&common::fixture_dir("llama"), &[3]).unwrap()
}

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
    }
}

/// The demo trainer's targets (`scripts/demo/train_family.py`, `encode_chat`): every token after
/// the last `<|assistant|>` up to and including the closing `<|end|>`.
fn trainer_targets(ids: &[u32]) -> Vec<bool> {
    const ASSISTANT: u32 = 2;
    const END: u32 = 3;
    let a = ids.iter().rposition(|&t| t == ASSISTANT).unwrap();
    let e = ids.iter().rposition(|&t| t == END).unwrap();
    (0..ids.len()).map(|t| t > a && t <= e).collect()
}

#[test]
fn chat_scores_the_assistant_reply_and_its_end_token() {
    let c = codec();
    let convo = [
        msg("user", "Write a function that adds two numbers."),
        msg("assistant", "def add(a, b):\n    return a + b"),
    ];
    let (seq, split) = encode_chat(&c, &convo).unwrap();
    assert!(split);
    let whole = c
        .encode(&c.render_chat(&convo, false).unwrap(), false)
        .unwrap();
    assert_eq!(
        seq.tokens, whole,
        "piecewise tokenization equals the whole text's here"
    );
    assert_eq!(seq.scored, trainer_targets(&whole));
    assert!(seq.scored_targets() > 5);
}

#[test]
fn every_assistant_turn_is_scored() {
    let c = codec();
    let convo = [
        msg("user", "a"),
        msg("assistant", "first reply"),
        msg("user", "b"),
        msg("assistant", "second reply"),
    ];
    let (seq, split) = encode_chat(&c, &convo).unwrap();
    assert!(split);
    let text: Vec<String> = seq
        .tokens
        .iter()
        .zip(&seq.scored)
        .filter(|(_, &s)| s)
        .map(|(&t, _)| c.decode(&[t]).unwrap_or_default())
        .collect();
    let joined = text.concat();
    assert!(
        joined.contains("first reply") && joined.contains("second reply"),
        "{joined:?}"
    );
    assert!(!joined.contains('a') || joined.contains("reply"));
    // Two end-of-turn tokens are targets, the user's is not.
    let ends = seq
        .tokens
        .iter()
        .zip(&seq.scored)
        .filter(|(&t, &s)| t == 3 && s)
        .count();
    assert_eq!(ends, 2);
}

#[test]
fn files_load_as_text_or_jsonl() {
    let c = codec();
    let dir = tempfile::tempdir().unwrap();
    let txt = dir.path().join("code.txt");
    std::fs::write(&txt, "def f(x):\n    return x * 2\n".repeat(20)).unwrap();
    let ds = load_dataset(&txt, &c, 32, None).unwrap();
    assert_eq!(ds.scored, Scored::AllTokens);
    assert_eq!(ds.name, "code.txt");
    let all = c
        .encode(&std::fs::read_to_string(&txt).unwrap(), true)
        .unwrap();
    assert_eq!(ds.tokens(), all.len() - usize::from(all.len() % 32 == 1));
    assert!(ds.sequences.iter().all(|s| s.tokens.len() <= 32));

    let capped = load_dataset(&txt, &c, 32, Some(40)).unwrap();
    assert_eq!(capped.tokens(), 40);
    assert_eq!(capped.notes.len(), 1);

    let jsonl = dir.path().join("chat.jsonl");
    let rec = serde_json::json!({"messages": [
        {"role": "user", "content": "Add two numbers."},
        {"role": "assistant", "content": "def add(a, b):\n    return a + b"}
    ]});
    std::fs::write(&jsonl, format!("{rec}\n\n{rec}\n")).unwrap();
    let ds = load_dataset(&jsonl, &c, 512, None).unwrap();
    assert_eq!(ds.scored, Scored::AssistantTokens);
    assert_eq!(ds.sequences.len(), 2);
    // Truncation keeps the first seq_len tokens and says so.
    let full_len = ds.sequences[0].tokens.len();
    let short = load_dataset(&jsonl, &c, full_len - 3, None).unwrap();
    assert!(short
        .sequences
        .iter()
        .all(|s| s.tokens.len() == full_len - 3));
    assert!(short.notes.iter().any(|n| n.contains("truncated")));

    let mixed = dir.path().join("mixed.jsonl");
    std::fs::write(
        &mixed,
        format!("{rec}\n{}\n", serde_json::json!({"text": "x = 1\n"})),
    )
    .unwrap();
    assert_eq!(
        load_dataset(&mixed, &c, 512, None).unwrap().scored,
        Scored::Mixed
    );

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"ok\"}\n{\"neither\": 1}\n").unwrap();
    let err = load_dataset(&bad, &c, 512, None).unwrap_err().to_string();
    assert!(err.contains("bad.jsonl") && err.contains("line 2"), "{err}");
}
