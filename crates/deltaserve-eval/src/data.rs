//! Evaluation data: plain text, or JSONL with a `text` field or chat `messages`, turned into
//! token sequences with a mask of which next-token predictions count.
//!
//! - Plain text (any file not ending in `.jsonl`): the whole file is tokenized as one stream with
//!   the tokenizer's special tokens (as `tokenizer(text)` does in transformers), then cut into
//!   consecutive, non-overlapping sequences of `seq_len` tokens. Every prediction counts.
//! - JSONL `{"text": ...}`: each record the same way, on its own.
//! - JSONL `{"messages": [{"role", "content"}, ...]}`: rendered with the chat template; only the
//!   assistant's tokens count (its reply, the whitespace opening it, and the end-of-turn token the template puts right
//!   after it), as the demo fine-tunes were trained and as `scripts/demo/train_family.py` scores
//!   them. Records longer than `seq_len` are truncated.

use std::path::{Path, PathBuf};

use deltaserve_model::{ChatMessage, TextCodec};
use serde::Serialize;

use crate::error::{EvalError, Result};

/// One sequence to evaluate and which of its tokens are scored as targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalSequence {
    /// Token ids, at most the evaluation's `seq_len`.
    pub tokens: Vec<u32>,
    /// `scored[t]`: whether predicting `tokens[t]` (from positions `..t`) counts; `scored[0]` is
    /// always false.
    pub scored: Vec<bool>,
}

impl EvalSequence {
    /// A sequence whose every prediction counts.
    pub fn all(tokens: Vec<u32>) -> Self {
        let scored = (0..tokens.len()).map(|t| t > 0).collect();
        Self { tokens, scored }
    }

    /// Number of scored targets.
    pub fn scored_targets(&self) -> usize {
        self.scored.iter().filter(|&&s| s).count()
    }
}

/// Which tokens of a data set are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scored {
    /// Every token after the first of each sequence.
    AllTokens,
    /// Assistant turns of chat records only.
    AssistantTokens,
    /// Chat records, but some fell back to all tokens (the template's output could not be split
    /// into turns); `notes` says how many.
    Mixed,
}

impl Scored {
    /// Words for tables and reports.
    pub fn describe(self) -> &'static str {
        match self {
            Scored::AllTokens => "all tokens",
            Scored::AssistantTokens => "assistant tokens",
            Scored::Mixed => "assistant tokens (some records: all tokens)",
        }
    }
}

/// A named set of sequences.
#[derive(Debug, Clone)]
pub struct EvalDataset {
    /// Short name for tables (the file name).
    pub name: String,
    /// Where it came from, if a file.
    pub path: Option<PathBuf>,
    /// Which tokens are scored.
    pub scored: Scored,
    /// The sequences.
    pub sequences: Vec<EvalSequence>,
    /// Things a reader should know (truncations, fallbacks, caps).
    pub notes: Vec<String>,
}

impl EvalDataset {
    /// A data set from token sequences in which every prediction counts.
    pub fn from_token_windows(name: impl Into<String>, windows: Vec<Vec<u32>>) -> Self {
        Self {
            name: name.into(),
            path: None,
            scored: Scored::AllTokens,
            sequences: windows
                .into_iter()
                .filter(|w| w.len() >= 2)
                .map(EvalSequence::all)
                .collect(),
            notes: Vec::new(),
        }
    }

    /// Tokens over all sequences.
    pub fn tokens(&self) -> usize {
        self.sequences.iter().map(|s| s.tokens.len()).sum()
    }

    /// Scored targets over all sequences.
    pub fn scored_targets(&self) -> usize {
        self.sequences.iter().map(|s| s.scored_targets()).sum()
    }
}

/// Cuts a token stream into consecutive sequences of at most `seq_len` tokens (a trailing piece
/// of one token, which has nothing to predict, is dropped).
pub fn chunk_tokens(ids: &[u32], seq_len: usize) -> Vec<EvalSequence> {
    ids.chunks(seq_len.max(2))
        .filter(|c| c.len() >= 2)
        .map(|c| EvalSequence::all(c.to_vec()))
        .collect()
}

/// Loads a data file (format chosen by extension: `.jsonl` or plain text) and tokenizes it.
/// `max_tokens` caps the tokens kept (the last sequence is cut to fit).
pub fn load_dataset(
    path: &Path,
    codec: &TextCodec,
    seq_len: usize,
    max_tokens: Option<usize>,
) -> Result<EvalDataset> {
    if seq_len < 2 {
        return Err(EvalError::Input(format!(
            "--seq-len {seq_len}: a sequence needs at least 2 tokens"
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| EvalError::Data {
        path: path.to_owned(),
        msg: e.to_string(),
    })?;
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let is_jsonl = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("jsonl"));
    let mut ds = if is_jsonl {
        load_jsonl(path, &text, codec, seq_len)?
    } else {
        let ids = codec.encode(&text, true)?;
        EvalDataset {
            name: String::new(),
            path: None,
            scored: Scored::AllTokens,
            sequences: chunk_tokens(&ids, seq_len),
            notes: Vec::new(),
        }
    };
    ds.name = name;
    ds.path = Some(path.to_owned());
    if let Some(cap) = max_tokens {
        cap_tokens(&mut ds, cap);
    }
    if ds.sequences.is_empty() || ds.scored_targets() == 0 {
        return Err(EvalError::Data {
            path: path.to_owned(),
            msg: "no tokens to evaluate after tokenizing".into(),
        });
    }
    Ok(ds)
}

fn cap_tokens(ds: &mut EvalDataset, cap: usize) {
    let total = ds.tokens();
    if total <= cap {
        return;
    }
    let mut left = cap;
    let mut kept = Vec::new();
    for mut s in std::mem::take(&mut ds.sequences) {
        if left < 2 {
            break;
        }
        if s.tokens.len() > left {
            s.tokens.truncate(left);
            s.scored.truncate(left);
        }
        left -= s.tokens.len();
        if s.scored_targets() > 0 {
            kept.push(s);
        }
    }
    ds.sequences = kept;
    ds.notes
        .push(format!("capped at {cap} of {total} tokens (--max-tokens)"));
}

#[derive(serde::Deserialize)]
struct JsonlRecord {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    messages: Option<Vec<ChatMessage>>,
}

fn load_jsonl(path: &Path, text: &str, codec: &TextCodec, seq_len: usize) -> Result<EvalDataset> {
    let bad = |line: usize, msg: String| EvalError::Data {
        path: path.to_owned(),
        msg: format!("line {line}: {msg}"),
    };
    let mut sequences = Vec::new();
    let (mut chat, mut plain, mut fallback, mut truncated) = (0usize, 0usize, 0usize, 0usize);
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let rec: JsonlRecord = serde_json::from_str(line)
            .map_err(|e| bad(i + 1, format!("not a JSON record: {e}")))?;
        match (rec.messages, rec.text) {
            (Some(messages), _) => {
                chat += 1;
                let (mut seq, split) =
                    encode_chat(codec, &messages).map_err(|e| bad(i + 1, e.to_string()))?;
                if !split {
                    fallback += 1;
                }
                if seq.tokens.len() > seq_len {
                    truncated += 1;
                    seq.tokens.truncate(seq_len);
                    seq.scored.truncate(seq_len);
                }
                if seq.scored_targets() > 0 {
                    sequences.push(seq);
                }
            }
            (None, Some(t)) => {
                plain += 1;
                sequences.extend(chunk_tokens(&codec.encode(&t, true)?, seq_len));
            }
            (None, None) => {
                return Err(bad(
                    i + 1,
                    "a record needs a `text` string or a `messages` list".into(),
                ))
            }
        }
    }
    let mut notes = Vec::new();
    if truncated > 0 {
        notes.push(format!(
            "{truncated} chat record(s) longer than {seq_len} tokens were truncated"
        ));
    }
    if fallback > 0 {
        notes.push(format!(
            "{fallback} chat record(s) could not be split into turns by the chat template; all their tokens are scored"
        ));
    }
    let scored = match (chat, plain, fallback) {
        (0, _, _) => Scored::AllTokens,
        (c, 0, 0) if c > 0 => Scored::AssistantTokens,
        _ => Scored::Mixed,
    };
    Ok(EvalDataset {
        name: String::new(),
        path: None,
        scored,
        sequences,
        notes,
    })
}

/// Renders a conversation with the chat template and marks the assistant's tokens.
///
/// Assistant turn `i` starts where `render(messages[..i], add_generation_prompt)` ends (less
/// its trailing whitespace, which the reply's first token may absorb), and runs to the end of
/// its content, found right after; the text is tokenized piece by piece at those boundaries (so
/// the boundaries fall between tokens), and the token right after each assistant content is
/// scored too when it is a stop token (`<|end|>`, `<|eot_id|>`, ...): the model must learn to
/// stop. On the demo's template this scores exactly what `scripts/demo/train_family.py` does. Returns the sequence and whether the split succeeded (if not, all tokens are scored).
pub fn encode_chat(codec: &TextCodec, messages: &[ChatMessage]) -> Result<(EvalSequence, bool)> {
    let whole = codec.render_chat(messages, false)?;
    let Some(spans) = assistant_spans(codec, messages, &whole)? else {
        return Ok((EvalSequence::all(codec.encode(&whole, false)?), false));
    };
    let mut tokens = Vec::new();
    let mut scored = Vec::new();
    let mut pos = 0;
    for (s, e) in spans {
        // The piece after an assistant content starts with its end-of-turn token, if the template has one.
        let ctx = codec.encode(&whole[pos..s], false)?;
        push_piece(
            &mut tokens,
            &mut scored,
            &ctx,
            false,
            (pos > 0).then_some(codec.stop_ids()),
        );
        let content = codec.encode(&whole[s..e], false)?;
        push_piece(&mut tokens, &mut scored, &content, true, None);
        pos = e;
    }
    let rest = codec.encode(&whole[pos..], false)?;
    push_piece(
        &mut tokens,
        &mut scored,
        &rest,
        false,
        (pos > 0).then_some(codec.stop_ids()),
    );
    if let Some(first) = scored.first_mut() {
        *first = false;
    }
    Ok((EvalSequence { tokens, scored }, true))
}

/// Appends a piece's tokens; `stop_ids` given: its first token is scored if it is one of them.
fn push_piece(
    tokens: &mut Vec<u32>,
    scored: &mut Vec<bool>,
    piece: &[u32],
    all: bool,
    stop_ids: Option<&[u32]>,
) {
    for (j, &t) in piece.iter().enumerate() {
        tokens.push(t);
        scored.push(all || (j == 0 && stop_ids.is_some_and(|s| s.contains(&t))));
    }
}

/// Byte spans of assistant contents in `whole`, in order; `None` if the template's output does
/// not decompose turn by turn.
fn assistant_spans(
    codec: &TextCodec,
    messages: &[ChatMessage],
    whole: &str,
) -> Result<Option<Vec<(usize, usize)>>> {
    let mut spans = Vec::new();
    let mut prev_end = 0;
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let content = m.content.trim();
        if content.is_empty() {
            continue;
        }
        let prefix = match codec.render_chat(&messages[..i], true) {
            Ok(p) => p,
            Err(_) => return Ok(None),
        };
        if !whole.starts_with(&prefix) || prefix.len() < prev_end {
            return Ok(None);
        }
        let Some(off) = whole[prefix.len()..].find(content) else {
            return Ok(None);
        };
        // The generation prompt's trailing whitespace (the `\n` of `<|assistant|>\n`) belongs to
        // the reply, as in the demo trainer's targets; the piece boundary then falls right after
        // a special token, where tokenizers split anyway.
        let start = prefix.trim_end().len().max(prev_end);
        let end = prefix.len() + off + content.len();
        spans.push((start, end));
        prev_end = end;
    }
    Ok(Some(spans))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_drop_a_lone_last_token() {
        let ids: Vec<u32> = (0..9).collect();
        let c = chunk_tokens(&ids, 4);
        assert_eq!(c.len(), 2);
        assert_eq!(c[1].tokens, vec![4, 5, 6, 7]);
        assert_eq!(c[0].scored, vec![false, true, true, true]);
    }

    #[test]
    fn cap_cuts_the_last_sequence() {
        let mut ds = EvalDataset::from_token_windows("x", vec![vec![1, 2, 3, 4], vec![5, 6, 7, 8]]);
        cap_tokens(&mut ds, 6);
        assert_eq!(ds.tokens(), 6);
        assert_eq!(ds.sequences[1].tokens, vec![5, 6]);
        assert_eq!(ds.notes.len(), 1);
    }
}
