//! The files beside the weights: config, tokenizer, chat template, generation config.
//!
//! A delta always carries the fine-tune's `config.json`, and its tokenizer files only where they
//! differ from the base's; merging writes the delta's copy where there is one and the base's
//! otherwise.

use std::collections::BTreeMap;
use std::path::Path;

use deltaserve_format::FinetuneInfo;
use deltaserve_model::Checkpoint;

use crate::error::{CodecError, Result};

/// The chat template file transformers writes beside `tokenizer_config.json` (4.43 and later).
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

/// Files beside the weights that the header has no field for, with their key in the header's
/// `extra` (stored as JSON values, only when they differ from the base's).
pub const EXTRA_JSON_FILES: &[(&str, &str)] = &[
    ("generation_config.json", "generation_config"),
    ("special_tokens_map.json", "special_tokens_map"),
];

/// Files a merged checkpoint takes from the base when the delta has no copy (the fine-tune's
/// `config.json` is always in the delta).
pub const BASE_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    CHAT_TEMPLATE_FILE,
    "generation_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
];

/// Reads a text file, `None` if it does not exist.
fn read_text(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CodecError::io("read", path)(e)),
    }
}

fn parse_json(path: &Path, text: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| CodecError::BadJson {
        path: path.to_owned(),
        detail: e.to_string(),
    })
}

/// The fine-tune's file `name` if it exists and differs from the base's: as text, compared
/// as JSON when `json` (so formatting differences do not count).
fn differing(
    base: &Path,
    finetuned: &Path,
    name: &str,
    json: bool,
) -> Result<Option<(String, Option<serde_json::Value>)>> {
    let ft_path = finetuned.join(name);
    let Some(ft) = read_text(&ft_path)? else {
        return Ok(None);
    };
    let base_path = base.join(name);
    let base_text = read_text(&base_path)?;
    let ft_value = if json {
        Some(parse_json(&ft_path, &ft)?)
    } else {
        None
    };
    let same = match &base_text {
        None => false,
        Some(b) if b == &ft => true,
        Some(b) if json => parse_json(&base_path, b).ok() == ft_value,
        Some(_) => false,
    };
    Ok((!same).then_some((ft, ft_value)))
}

/// The fine-tune's config and the tokenizer files that differ from the base's, plus the other
/// files (generation config, special tokens map) for the header's `extra`.
pub fn finetune_files(
    base: &Checkpoint,
    finetuned: &Checkpoint,
) -> Result<(FinetuneInfo, BTreeMap<String, serde_json::Value>)> {
    let (b, f) = (base.dir(), finetuned.dir());
    let mut info = FinetuneInfo {
        config: Some(finetuned.config_json().clone()),
        ..FinetuneInfo::default()
    };
    info.tokenizer_json = differing(b, f, "tokenizer.json", true)?.map(|(text, _)| text);
    info.tokenizer_config = differing(b, f, "tokenizer_config.json", true)?.and_then(|(_, v)| v);
    info.chat_template = differing(b, f, CHAT_TEMPLATE_FILE, false)?.map(|(text, _)| text);
    let mut extra = BTreeMap::new();
    for (file, key) in EXTRA_JSON_FILES {
        if let Some((_, Some(value))) = differing(b, f, file, true)? {
            extra.insert((*key).to_owned(), value);
        }
    }
    Ok((info, extra))
}
