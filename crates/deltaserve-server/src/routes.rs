//! The handlers: parse and validate, submit to the engine, shape the answer. Nothing else.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::path::PathBuf;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use deltaserve_engine::{Engine, Event, FinishReason};
use futures_util::stream::{self, Stream};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::error::ApiError;
use crate::openai::{
    AddDelta, ChatChoice, ChatChunk, ChatChunkChoice, ChatDelta, ChatMessageOut, ChatRequest,
    ChatResponse, CompletionChoice, CompletionRequest, CompletionResponse, ModelCard, ModelList,
    Usage,
};
use crate::validation::{
    parse_json, parse_request, validate_chat, validate_completion, Endpoint, ValidRequest,
};
use crate::AppState;

/// The web page, built into the binary.
const INDEX_HTML: &str = include_str!("web/index.html");

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn request_id(prefix: &str) -> String {
    format!("{prefix}-{:024x}", rand::random::<u128>() >> 32)
}

/// Bearer-token check for `/v1/*` when the server has a key.
pub(crate) async fn require_key(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    if let Some(key) = &state.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(req).await
}

/// Compares secrets without an early exit whose timing would leak the matching prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(crate) async fn index() -> Html<&'static str> {
    Html(INDEX_HTML)
}

pub(crate) async fn health(State(state): State<AppState>) -> Response {
    if state.engine.is_accepting() {
        Json(serde_json::json!({"status": "ok"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "shutting_down"})),
        )
            .into_response()
    }
}

pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    let body = crate::metrics::render(&state.engine.metrics());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

pub(crate) async fn not_found() -> ApiError {
    ApiError::NoRoute(
        "no such endpoint; see /v1/models, /v1/completions, /v1/chat/completions".into(),
    )
}

fn model_cards(engine: &Engine) -> Vec<ModelCard> {
    let root = engine.base_name().to_string();
    engine
        .models()
        .into_iter()
        .map(|m| ModelCard {
            id: m.name,
            object: "model",
            created: m.created,
            owned_by: "deltaserve",
            root: root.clone(),
            parent: m.parent,
        })
        .collect()
}

pub(crate) async fn list_models(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: model_cards(&state.engine),
    })
}

pub(crate) async fn get_model(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ModelCard>, ApiError> {
    model_cards(&state.engine)
        .into_iter()
        .find(|m| m.id == id)
        .map(Json)
        .ok_or_else(|| deltaserve_engine::EngineError::UnknownModel { name: id }.into())
}

/// Runs validation on a blocking thread: tokenizing and rendering templates is CPU work.
async fn validated(
    engine: &Engine,
    f: impl FnOnce(&Engine) -> Result<ValidRequest, ApiError> + Send + 'static,
) -> Result<ValidRequest, ApiError> {
    let engine = engine.clone();
    tokio::task::spawn_blocking(move || f(&engine))
        .await
        .map_err(|e| ApiError::Internal(format!("validation task failed: {e}")))?
}

pub(crate) async fn completions(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (mut req, params): (CompletionRequest, _) = parse_request(&body)?;
    req.params = params;
    let valid = validated(&state.engine, move |e| validate_completion(e, req)).await?;
    respond(&state.engine, valid).await
}

pub(crate) async fn chat_completions(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (mut req, params): (ChatRequest, _) = parse_request(&body)?;
    req.params = params;
    let valid = validated(&state.engine, move |e| validate_chat(e, req)).await?;
    respond(&state.engine, valid).await
}

/// Submits a checked request and answers whole or as a stream.
async fn respond(engine: &Engine, valid: ValidRequest) -> Result<Response, ApiError> {
    let model = valid.request.model.clone();
    let rx = engine.submit(valid.request)?;
    let chunks = Chunks::new(valid.endpoint, model, valid.include_usage);
    if valid.stream {
        Ok(Sse::new(sse_stream(rx, chunks))
            .keep_alive(KeepAlive::default())
            .into_response())
    } else {
        whole(rx, chunks).await
    }
}

/// Collects a whole answer. Dropping this future (client gone) drops `rx`, which cancels it.
async fn whole(mut rx: UnboundedReceiver<Event>, chunks: Chunks) -> Result<Response, ApiError> {
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token { text: t, .. } => text.push_str(&t),
            Event::Done {
                finish_reason,
                usage,
                tail,
            } => {
                text.push_str(&tail);
                return Ok(chunks.whole(text, finish_reason, usage.into()));
            }
            Event::Error(e) => return Err(e.into()),
        }
    }
    Err(ApiError::Internal(
        "the engine stopped before the request finished".into(),
    ))
}

/// The request's events as server-sent events, in OpenAI's chunk format, ending with `[DONE]`.
fn sse_stream(
    rx: UnboundedReceiver<Event>,
    chunks: Chunks,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    struct State {
        rx: UnboundedReceiver<Event>,
        chunks: Chunks,
        pending: VecDeque<SseEvent>,
        finished: bool,
    }
    let first = chunks.opening();
    let state = State {
        rx,
        chunks,
        pending: first.into_iter().collect(),
        finished: false,
    };
    stream::unfold(state, |mut st| async move {
        loop {
            if let Some(ev) = st.pending.pop_front() {
                return Some((Ok(ev), st));
            }
            if st.finished {
                return None;
            }
            let last = match st.rx.recv().await {
                Some(Event::Token { text, .. }) => {
                    if !text.is_empty() {
                        st.pending.push_back(st.chunks.text(text, None));
                    }
                    continue;
                }
                Some(Event::Done {
                    finish_reason,
                    usage,
                    tail,
                }) => {
                    st.pending
                        .push_back(st.chunks.text(tail, Some(finish_reason)));
                    if st.chunks.include_usage {
                        st.pending.push_back(st.chunks.usage(usage.into()));
                    }
                    None
                }
                Some(Event::Error(e)) => Some(ApiError::from(e)),
                None => Some(ApiError::Internal(
                    "the engine stopped before the request finished".into(),
                )),
            };
            if let Some(err) = last {
                st.pending.push_back(json_event(&err.body()));
            }
            st.pending.push_back(SseEvent::default().data("[DONE]"));
            st.finished = true;
        }
    })
}

fn json_event<T: serde::Serialize>(v: &T) -> SseEvent {
    // Our response types always serialise.
    SseEvent::default().data(serde_json::to_string(v).unwrap_or_default())
}

/// Builds the response bodies of one request: the same id, time and model in every chunk.
struct Chunks {
    endpoint: Endpoint,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
}

impl Chunks {
    fn new(endpoint: Endpoint, model: String, include_usage: bool) -> Self {
        let prefix = if endpoint == Endpoint::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        };
        Self {
            endpoint,
            id: request_id(prefix),
            created: unix_now(),
            model,
            include_usage,
        }
    }

    /// Chat streams open with the assistant role.
    fn opening(&self) -> Option<SseEvent> {
        (self.endpoint == Endpoint::Chat).then(|| {
            json_event(&self.chat_chunk(
                vec![ChatChunkChoice {
                    index: 0,
                    delta: ChatDelta {
                        role: Some("assistant"),
                        content: Some(String::new()),
                    },
                    finish_reason: None,
                    logprobs: None,
                }],
                None,
            ))
        })
    }

    fn chat_chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<Usage>) -> ChatChunk {
        ChatChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        }
    }

    fn completion(
        &self,
        choices: Vec<CompletionChoice>,
        usage: Option<Usage>,
    ) -> CompletionResponse {
        CompletionResponse {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        }
    }

    /// A chunk with new text, or the last one with the finish reason.
    fn text(&self, text: String, finish: Option<FinishReason>) -> SseEvent {
        let finish_reason = finish.map(FinishReason::as_str);
        match self.endpoint {
            Endpoint::Completion => json_event(&self.completion(
                vec![CompletionChoice {
                    index: 0,
                    text,
                    finish_reason,
                    logprobs: None,
                }],
                None,
            )),
            Endpoint::Chat => {
                let content = (!text.is_empty() || finish.is_none()).then_some(text);
                json_event(&self.chat_chunk(
                    vec![ChatChunkChoice {
                        index: 0,
                        delta: ChatDelta {
                            role: None,
                            content,
                        },
                        finish_reason,
                        logprobs: None,
                    }],
                    None,
                ))
            }
        }
    }

    /// The usage-only chunk of `stream_options.include_usage`.
    fn usage(&self, usage: Usage) -> SseEvent {
        match self.endpoint {
            Endpoint::Completion => json_event(&self.completion(vec![], Some(usage))),
            Endpoint::Chat => json_event(&self.chat_chunk(vec![], Some(usage))),
        }
    }

    /// A whole (non-streamed) response.
    fn whole(&self, text: String, finish: FinishReason, usage: Usage) -> Response {
        let finish_reason = finish.as_str();
        match self.endpoint {
            Endpoint::Completion => Json(self.completion(
                vec![CompletionChoice {
                    index: 0,
                    text,
                    finish_reason: Some(finish_reason),
                    logprobs: None,
                }],
                Some(usage),
            ))
            .into_response(),
            Endpoint::Chat => Json(ChatResponse {
                id: self.id.clone(),
                object: "chat.completion",
                created: self.created,
                model: self.model.clone(),
                choices: vec![ChatChoice {
                    index: 0,
                    message: ChatMessageOut {
                        role: "assistant",
                        content: text,
                    },
                    finish_reason,
                    logprobs: None,
                }],
                usage,
            })
            .into_response(),
        }
    }
}

/// `POST /v1/deltas`: serve a delta file under a new tenant name (admin).
pub(crate) async fn add_delta(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Response, ApiError> {
    require_admin(&state)?;
    let req: AddDelta = parse_json(&body)?;
    crate::check_tenant_name(&req.name).map_err(|m| ApiError::bad_param("name", m))?;
    let path = PathBuf::from(&req.path);
    if !path.is_file() {
        return Err(ApiError::bad_param(
            "path",
            format!("`path`: {} is not a file on the server", path.display()),
        ));
    }
    let engine = state.engine.clone();
    let name = req.name.clone();
    let tenant = tokio::task::spawn_blocking(move || engine.add_tenant(&name, &path))
        .await
        .map_err(|e| ApiError::Internal(format!("registration task failed: {e}")))??;
    tracing::info!(tenant = %tenant.name, path = %tenant.path.display(), "tenant added");
    let card = ModelCard {
        id: tenant.name.clone(),
        object: "model",
        created: tenant.created,
        owned_by: "deltaserve",
        root: state.engine.base_name().to_string(),
        parent: Some(state.engine.base_name().to_string()),
    };
    Ok((StatusCode::CREATED, Json(card)).into_response())
}

/// `DELETE /v1/deltas/{name}`: stop serving a tenant (admin). Running requests finish first.
pub(crate) async fn remove_delta(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    require_admin(&state)?;
    state.engine.remove_tenant(&name)?;
    tracing::info!(tenant = %name, "tenant removed");
    Ok(Json(serde_json::json!({"id": name, "object": "model", "deleted": true})).into_response())
}

fn require_admin(state: &AppState) -> Result<(), ApiError> {
    // The key itself was checked by `require_key`; without one, nobody may load files.
    match state.api_key {
        Some(_) => Ok(()),
        None => Err(ApiError::Forbidden(
            "adding and removing deltas needs an API key: start the server with --api-key".into(),
        )),
    }
}
