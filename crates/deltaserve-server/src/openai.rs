//! OpenAI's request and response bodies as plain serde structs. Requests keep every field
//! optional and loosely typed where OpenAI allows several shapes; `validation.rs` decides.

use serde::{Deserialize, Serialize};

/// A string, or a list of them (`prompt`, `stop`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StringOrList {
    /// One string.
    One(String),
    /// Several strings.
    Many(Vec<String>),
}

/// `prompt`: text, a list of texts, or token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// One text.
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
    /// Several texts (only one is served per request).
    Texts(Vec<String>),
    /// Several token-id lists.
    TokenLists(Vec<Vec<u32>>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with `usage`.
    #[serde(default)]
    pub include_usage: bool,
}

/// The sampling and stopping fields both endpoints share.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CommonParams {
    /// Most tokens to generate.
    pub max_tokens: Option<i64>,
    /// Chat's newer name for `max_tokens`.
    pub max_completion_tokens: Option<i64>,
    /// 0 (greedy) to 2; OpenAI's default is 1.
    pub temperature: Option<f64>,
    /// Nucleus mass, (0, 1].
    pub top_p: Option<f64>,
    /// Keep the k most likely tokens; 0 or -1 is off (vLLM's extension).
    pub top_k: Option<i64>,
    /// Random seed.
    pub seed: Option<i64>,
    /// Up to 4 stop strings.
    pub stop: Option<StringOrList>,
    /// Choices per prompt; only 1 is served.
    pub n: Option<i64>,
    /// Stream server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Keep generating past end-of-sequence tokens (vLLM's extension; for benchmarks).
    #[serde(default)]
    pub ignore_eos: bool,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// Base or tenant name.
    pub model: String,
    /// The prompt.
    pub prompt: Prompt,
    /// Everything else: read from the same body separately (serde's `flatten` would lose the
    /// field names in error messages).
    #[serde(skip)]
    pub params: CommonParams,
}

/// A chat message's content: text or a list of parts.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Parts; only `{"type": "text"}` parts are served.
    Parts(Vec<ContentPart>),
}

/// One part of a message's content.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    /// `text`, `image_url`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    pub text: Option<String>,
}

/// One chat message.
#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`.
    pub role: String,
    /// Its content (may be null for assistant messages with tool calls, which are not served).
    pub content: Option<Content>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// Base or tenant name.
    pub model: String,
    /// The conversation.
    pub messages: Vec<Message>,
    /// Everything else: read from the same body separately (serde's `flatten` would lose the
    /// field names in error messages).
    #[serde(skip)]
    pub params: CommonParams,
}

/// `usage`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
}

impl From<deltaserve_engine::Usage> for Usage {
    fn from(u: deltaserve_engine::Usage) -> Self {
        Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
        }
    }
}

/// One choice of a text completion (whole or a streamed chunk).
#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    /// Always 0 (n = 1).
    pub index: u32,
    /// The text (or this chunk's part of it).
    pub text: String,
    /// `stop`, `length`, or null while streaming.
    pub finish_reason: Option<&'static str>,
    /// Not served: always null.
    pub logprobs: Option<()>,
}

/// A text completion, or one chunk of a streamed one (`object` tells which).
#[derive(Debug, Clone, Serialize)]
pub struct CompletionResponse {
    /// `cmpl-…`, the same in every chunk.
    pub id: String,
    /// `text_completion`.
    pub object: &'static str,
    /// Unix time.
    pub created: u64,
    /// The model asked for.
    pub model: String,
    /// One choice (none in a usage-only chunk).
    pub choices: Vec<CompletionChoice>,
    /// Token counts (whole responses, and the last chunk when asked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// An assistant message.
#[derive(Debug, Clone, Serialize)]
pub struct ChatMessageOut {
    /// `assistant`.
    pub role: &'static str,
    /// The text.
    pub content: String,
}

/// A chat choice.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    /// Always 0.
    pub index: u32,
    /// The reply.
    pub message: ChatMessageOut,
    /// `stop` or `length`.
    pub finish_reason: &'static str,
    /// Not served: always null.
    pub logprobs: Option<()>,
}

/// `chat.completion`.
#[derive(Debug, Clone, Serialize)]
pub struct ChatResponse {
    /// `chatcmpl-…`.
    pub id: String,
    /// `chat.completion`.
    pub object: &'static str,
    /// Unix time.
    pub created: u64,
    /// The model asked for.
    pub model: String,
    /// One choice.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: Usage,
}

/// What a streamed chat chunk adds to the message.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatDelta {
    /// `assistant`, in the first chunk only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// A streamed chat choice.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChunkChoice {
    /// Always 0.
    pub index: u32,
    /// The increment.
    pub delta: ChatDelta,
    /// Set in the last chunk.
    pub finish_reason: Option<&'static str>,
    /// Not served: always null.
    pub logprobs: Option<()>,
}

/// `chat.completion.chunk`.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChunk {
    /// `chatcmpl-…`, the same in every chunk.
    pub id: String,
    /// `chat.completion.chunk`.
    pub object: &'static str,
    /// Unix time.
    pub created: u64,
    /// The model asked for.
    pub model: String,
    /// One choice (none in a usage-only chunk).
    pub choices: Vec<ChatChunkChoice>,
    /// Token counts, in the last chunk when asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// One entry of `GET /v1/models`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    /// The name requests use.
    pub id: String,
    /// `model`.
    pub object: &'static str,
    /// Unix time of registration.
    pub created: u64,
    /// `deltaserve`.
    pub owned_by: &'static str,
    /// The base model's name.
    pub root: String,
    /// For a tenant, the base's name; null for the base.
    pub parent: Option<String>,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    /// `list`.
    pub object: &'static str,
    /// The models.
    pub data: Vec<ModelCard>,
}

/// `POST /v1/deltas`.
#[derive(Debug, Clone, Deserialize)]
pub struct AddDelta {
    /// The tenant name to serve it under.
    pub name: String,
    /// Path of the `.delta` file on the server's disk.
    pub path: String,
}
