//! Text in and out: `tokenizer.json` (the `tokenizers` crate), the chat template of
//! `tokenizer_config.json` (rendered with minijinja, with Python string methods enabled as
//! transformers' Jinja environment has them), and stop tokens from `generation_config.json`.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::token_ids;
use crate::error::{ModelError, Result};

/// One chat message, OpenAI/transformers shaped.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// A model directory's tokenizer, chat template and stop tokens.
pub struct TextCodec {
    tokenizer: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    stop_ids: Vec<u32>,
    path: PathBuf,
}

fn special_token(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::BadFile {
        path: path.into(),
        msg: e.to_string(),
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ModelError::BadFile {
            path: path.into(),
            msg: format!("invalid JSON: {e}"),
        })
}

impl TextCodec {
    /// Loads `tokenizer.json` (required), `tokenizer_config.json` and `generation_config.json`
    /// (optional) from a model directory. `config_eos` are the ids from config.json.
    pub fn from_dir(dir: &Path, config_eos: &[u32]) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(ModelError::MissingFile {
                path,
                what: "tokenizer",
                hint: "the model directory needs tokenizer.json (the Hugging Face fast tokenizer file)",
            });
        }
        let tokenizer =
            tokenizers::Tokenizer::from_file(&path).map_err(|e| ModelError::BadFile {
                path: path.clone(),
                msg: format!("cannot load tokenizer: {e}"),
            })?;
        let tc = read_json(&dir.join("tokenizer_config.json"))?;
        let chat_template = tc.as_ref().and_then(|c| match c.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            _ => None,
        });
        let chat_template =
            chat_template.or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok());
        let bos_token = special_token(tc.as_ref().and_then(|c| c.get("bos_token")));
        let eos_token = special_token(tc.as_ref().and_then(|c| c.get("eos_token")));
        let gen = read_json(&dir.join("generation_config.json"))?;
        let mut stop_ids = gen
            .as_ref()
            .map(|g| token_ids(&g.get("eos_token_id").cloned()))
            .unwrap_or_default();
        stop_ids.extend_from_slice(config_eos);
        if let Some(id) = eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
            stop_ids.push(id);
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        Ok(Self {
            tokenizer,
            chat_template,
            bos_token,
            eos_token,
            stop_ids,
            path,
        })
    }

    /// Token ids that end generation.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// Whether a chat template is available.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// The raw chat template.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Tokenizes text; `add_special` adds the tokenizer's own BOS/EOS as its post-processor says.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, add_special)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", self.path.display())))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Turns ids back into text.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", self.path.display())))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Renders messages through the chat template, as transformers' `apply_chat_template` does.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            ModelError::Tokenizer(format!(
                "{}: tokenizer_config.json has no chat_template; drop --chat or use a chat model",
                self.path.display()
            ))
        })?;
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| ModelError::Tokenizer(format!("chat template: {e}")))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| ModelError::Tokenizer(format!("chat template: {e}")))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
        .map_err(|e| ModelError::Tokenizer(format!("rendering the chat template: {e}")))
    }
}
