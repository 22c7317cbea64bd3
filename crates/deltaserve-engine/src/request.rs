//! What goes into the engine and what comes out of it.

use crate::error::EngineError;
use crate::sampler::SamplingParams;

/// One generation request, already tokenized and checked by the caller's validation.
#[derive(Debug, Clone)]
pub struct Request {
    /// The base's name or a tenant's name.
    pub model: String,
    /// Prompt token ids (not empty).
    pub prompt: Vec<u32>,
    /// Most tokens to generate (at least 1).
    pub max_tokens: usize,
    /// Sampling settings; every request samples with its own seeded generator.
    pub params: SamplingParams,
    /// Token ids that end generation; `None` takes the model's (EOS and friends).
    pub stop_ids: Option<Vec<u32>>,
    /// Strings that end generation; the text stops before them.
    pub stop: Vec<String>,
}

/// Why generation ended, with OpenAI's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    /// `"stop"` or `"length"`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Tokens generated (a final stop token included).
    pub completion_tokens: usize,
}

/// One message of a request's event stream. A stream ends with one `Done` or one `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A generated token and the text it completes (empty while a character or a possible stop
    /// string is incomplete).
    Token {
        /// The token id.
        id: u32,
        /// New text.
        text: String,
    },
    /// Generation ended.
    Done {
        /// Why.
        finish_reason: FinishReason,
        /// Token counts.
        usage: Usage,
        /// Text that was held back (it might have begun a stop string) and belongs at the end.
        tail: String,
    },
    /// The request failed; nothing more follows.
    Error(EngineError),
}

/// A whole generation, collected from the event stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// The generated text (without stop token or stop string).
    pub text: String,
    /// The generated token ids (a final stop token excluded).
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Token counts.
    pub usage: Usage,
}
