//! Every error the API returns, mapped to a status and OpenAI's error body in one place.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use deltaserve_engine::EngineError;
use serde::Serialize;

/// An API error. Handlers return it; [`IntoResponse`] turns it into
/// `{"error": {"message", "type", "param", "code"}}` with the matching status.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON, an out-of-range parameter, a prompt longer than the context: 400.
    #[error("{message}")]
    BadRequest {
        /// What is wrong, naming the field and the limit.
        message: String,
        /// The offending field, if one.
        param: Option<String>,
    },
    /// No such model or tenant: 404.
    #[error("{message}")]
    NotFound {
        /// Which name.
        message: String,
    },
    /// No such route: 404.
    #[error("{0}")]
    NoRoute(String),
    /// Missing or wrong API key: 401.
    #[error("invalid or missing API key; send `Authorization: Bearer <key>`")]
    Unauthorized,
    /// Admin endpoints are off (the server has no key): 403.
    #[error("{0}")]
    Forbidden(String),
    /// The queue is full: 429 with `Retry-After`.
    #[error("{message}")]
    Overloaded {
        /// Details.
        message: String,
    },
    /// The server is shutting down: 503.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// Anything else, including a tenant whose delta failed to load: 500.
    #[error("{0}")]
    Internal(String),
}

/// Seconds a client told to back off should wait.
pub const RETRY_AFTER_SECONDS: u32 = 1;

impl ApiError {
    /// A 400 naming `param`.
    pub fn bad_param(param: &str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            param: Some(param.to_string()),
        }
    }

    /// A 400 without a particular field.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            param: None,
        }
    }

    /// The status this error is returned with.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::NotFound { .. } | ApiError::NoRoute(_) => StatusCode::NOT_FOUND,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OpenAI error body.
    pub fn body(&self) -> ErrorBody {
        let (kind, code, param) = match self {
            ApiError::BadRequest { param, .. } => ("invalid_request_error", None, param.clone()),
            ApiError::NotFound { .. } => (
                "invalid_request_error",
                Some("model_not_found"),
                Some("model".into()),
            ),
            ApiError::NoRoute(_) => ("invalid_request_error", Some("not_found"), None),
            ApiError::Unauthorized => ("authentication_error", Some("invalid_api_key"), None),
            ApiError::Forbidden(_) => ("permission_error", None, None),
            ApiError::Overloaded { .. } => ("overloaded_error", Some("server_overloaded"), None),
            ApiError::ShuttingDown => ("server_error", Some("shutting_down"), None),
            ApiError::Internal(_) => ("server_error", Some("internal_error"), None),
        };
        ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind,
                param,
                code: code.map(str::to_string),
            },
        }
    }
}

/// `{"error": {...}}`.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// OpenAI's error fields.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorDetail {
    /// Human-readable.
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, ...
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The offending request field.
    pub param: Option<String>,
    /// A machine-readable code.
    pub code: Option<String>,
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::UnknownModel { .. } => ApiError::NotFound {
                message: e.to_string(),
            },
            EngineError::Overloaded { .. } => ApiError::Overloaded {
                message: e.to_string(),
            },
            EngineError::Invalid(m) => ApiError::bad_request(m),
            EngineError::Registration { .. } => ApiError::bad_request(e.to_string()),
            EngineError::ShuttingDown => ApiError::ShuttingDown,
            EngineError::DeltaUnavailable { .. } | EngineError::Generation(_) => {
                ApiError::Internal(e.to_string())
            }
            _ => ApiError::Internal(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
            tracing::error!("{self}");
        }
        let mut resp = (status, Json(self.body())).into_response();
        if matches!(self, ApiError::Overloaded { .. } | ApiError::ShuttingDown) {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        }
        if matches!(self, ApiError::Unauthorized) {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}
