//! Turns an OpenAI request body into a checked [`ValidRequest`] before anything is queued
//! (TGI's `router/src/validation.rs`): JSON shape, parameter ranges, the prompt rendered and
//! tokenized with the model's own tokenizer and chat template, and its length against the context.

use axum::body::Bytes;
use deltaserve_engine::{Engine, Request, SamplingParams};
use deltaserve_model::ChatMessage;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::openai::{ChatRequest, CommonParams, CompletionRequest, Content, Prompt, StringOrList};

/// OpenAI's default `max_tokens` for text completions.
pub const DEFAULT_COMPLETION_TOKENS: usize = 16;
/// OpenAI allows at most this many stop strings.
pub const MAX_STOP_STRINGS: usize = 4;

/// Which endpoint a request came through (it decides the response shape).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/completions`
    Completion,
    /// `/v1/chat/completions`
    Chat,
}

/// A request that passed every check, ready for [`Engine::submit`].
#[derive(Debug, Clone)]
pub struct ValidRequest {
    /// Which endpoint.
    pub endpoint: Endpoint,
    /// What the engine runs.
    pub request: Request,
    /// Answer with server-sent events.
    pub stream: bool,
    /// Add a usage chunk at the end of a stream.
    pub include_usage: bool,
}

/// Parses a JSON body into `T`, naming the field that is wrong.
pub fn parse_json<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    from_value(value)
}

/// Parses a request with the sampling fields both endpoints share.
pub fn parse_request<T: DeserializeOwned>(body: &Bytes) -> Result<(T, CommonParams), ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    Ok((from_value(value.clone())?, from_value(value)?))
}

fn from_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if matches!(path.as_str(), "." | "?" | "") {
            ApiError::bad_request(format!(
                "the request body does not fit this endpoint: {inner}"
            ))
        } else {
            ApiError::bad_param(&path, format!("`{path}`: {inner}"))
        }
    })
}

/// Checks a completion request and tokenizes its prompt.
pub fn validate_completion(
    engine: &Engine,
    req: CompletionRequest,
) -> Result<ValidRequest, ApiError> {
    let codec = engine.codec(&req.model)?;
    let prompt = match req.prompt {
        Prompt::Text(t) => encode(&codec, &t, true)?,
        Prompt::Texts(mut v) if v.len() == 1 => encode(&codec, &v.remove(0), true)?,
        Prompt::Tokens(ids) => ids,
        Prompt::TokenLists(mut v) if v.len() == 1 => v.remove(0),
        _ => {
            return Err(ApiError::bad_param(
                "prompt",
                "`prompt`: only one prompt per request is served",
            ))
        }
    };
    check_token_ids(
        &prompt,
        codec
            .vocab_size()
            .max(engine.base().model.config().vocab_size),
    )?;
    finish(engine, Endpoint::Completion, req.model, prompt, req.params)
}

/// Checks a chat request, renders it with the model's chat template and tokenizes it.
pub fn validate_chat(engine: &Engine, req: ChatRequest) -> Result<ValidRequest, ApiError> {
    let codec = engine.codec(&req.model)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_param(
            "messages",
            "`messages` must not be empty",
        ));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.into_iter().enumerate() {
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        (kind, _) => {
                            return Err(ApiError::bad_param(
                                &format!("messages[{i}].content"),
                                format!("`messages[{i}].content`: content parts of type `{kind}` are not served; only `text`"),
                            ))
                        }
                    }
                }
                text
            }
        };
        messages.push(ChatMessage {
            role: m.role,
            content,
        });
    }
    if !codec.has_chat_template() {
        return Err(ApiError::bad_param(
            "model",
            format!("`{}` has no chat template; use /v1/completions", req.model),
        ));
    }
    let text = codec
        .render_chat(&messages, true)
        .map_err(|e| ApiError::bad_param("messages", e.to_string()))?;
    let prompt = encode(&codec, &text, false)?;
    finish(engine, Endpoint::Chat, req.model, prompt, req.params)
}

fn encode(
    codec: &deltaserve_model::TextCodec,
    text: &str,
    add_special: bool,
) -> Result<Vec<u32>, ApiError> {
    codec
        .encode(text, add_special)
        .map_err(|e| ApiError::bad_param("prompt", e.to_string()))
}

fn check_token_ids(ids: &[u32], vocab: usize) -> Result<(), ApiError> {
    match ids.iter().find(|&&t| t as usize >= vocab) {
        Some(bad) => Err(ApiError::bad_param(
            "prompt",
            format!("`prompt`: token id {bad} is outside the vocabulary of {vocab}"),
        )),
        None => Ok(()),
    }
}

/// The parameter checks both endpoints share.
fn finish(
    engine: &Engine,
    endpoint: Endpoint,
    model: String,
    prompt: Vec<u32>,
    p: CommonParams,
) -> Result<ValidRequest, ApiError> {
    if prompt.is_empty() {
        return Err(ApiError::bad_param(
            "prompt",
            "the prompt is empty after tokenization",
        ));
    }
    let context = engine.context_len();
    if prompt.len() >= context {
        return Err(ApiError::bad_param(
            "prompt",
            format!(
                "this model's maximum context length is {context} tokens, but the prompt has {} tokens; shorten it",
                prompt.len()
            ),
        ));
    }
    if let Some(n) = p.n {
        if n != 1 {
            return Err(ApiError::bad_param(
                "n",
                format!("`n` must be 1 (one choice per request). Given: {n}"),
            ));
        }
    }
    let (max_field, max_value) = match (p.max_tokens, p.max_completion_tokens) {
        (Some(m), _) => ("max_tokens", Some(m)),
        (None, Some(m)) => ("max_completion_tokens", Some(m)),
        (None, None) => ("max_tokens", None),
    };
    let room = engine.max_new_tokens(prompt.len());
    let max_tokens = match max_value {
        Some(m) if m < 1 => {
            return Err(ApiError::bad_param(max_field, format!("`{max_field}` must be at least 1. Given: {m}")))
        }
        Some(m) if m as u64 > room as u64 => {
            return Err(ApiError::bad_param(
                max_field,
                format!(
                    "`{max_field}` must be <= {room} for this prompt: the context is {context} tokens and the \
                     prompt has {}. Given: {m}",
                    prompt.len()
                ),
            ))
        }
        Some(m) => m as usize,
        None if endpoint == Endpoint::Completion => DEFAULT_COMPLETION_TOKENS.min(room),
        None => room,
    };
    let temperature = p.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_param(
            "temperature",
            format!("`temperature` must be in [0, 2]. Given: {temperature}"),
        ));
    }
    let top_p = p.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad_param(
            "top_p",
            format!("`top_p` must be in (0, 1]. Given: {top_p}"),
        ));
    }
    let top_k = match p.top_k.unwrap_or(0) {
        -1 | 0 => 0,
        k if k > 0 => k as usize,
        k => {
            return Err(ApiError::bad_param(
                "top_k",
                format!("`top_k` must be >= 1, or 0 or -1 for off. Given: {k}"),
            ))
        }
    };
    let stop = match p.stop {
        None => Vec::new(),
        Some(StringOrList::One(s)) => vec![s],
        Some(StringOrList::Many(v)) => v,
    };
    if stop.len() > MAX_STOP_STRINGS {
        return Err(ApiError::bad_param(
            "stop",
            format!(
                "`stop` takes at most {MAX_STOP_STRINGS} strings. Given: {}",
                stop.len()
            ),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::bad_param(
            "stop",
            "`stop` strings must not be empty",
        ));
    }
    // Without a seed every request samples differently, as OpenAI's do.
    let seed = p.seed.map_or_else(rand::random::<u64>, |s| s as u64);
    Ok(ValidRequest {
        endpoint,
        request: Request {
            model,
            prompt,
            max_tokens,
            params: SamplingParams {
                temperature: temperature as f32,
                top_p: top_p as f32,
                top_k,
                seed,
            },
            stop_ids: p.ignore_eos.then(Vec::new),
            stop,
        },
        stream: p.stream,
        include_usage: p.stream_options.is_some_and(|o| o.include_usage),
    })
}
