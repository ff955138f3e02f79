//! OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the right status.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// One error answer. Built by the request checks, the scheduler front door and the fallbacks.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: invalid_request_error, rate_limit_error, server_error, ...
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), kind, param: None, code: None, retry_after: None }
    }
    /// 400 invalid_request_error.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }
    /// 400 about one field.
    pub fn param(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::invalid(message).with_param(param)
    }
    pub fn server(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        let mut e =
            Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message).with_code("service_unavailable");
        e.retry_after = Some(1);
        e
    }
    pub fn with_param(mut self, p: impl Into<String>) -> Self {
        self.param = Some(p.into());
        self
    }
    pub fn with_code(mut self, c: &'static str) -> Self {
        self.code = Some(c);
        self
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }

    /// The same error as the JSON of an SSE `data:` line (an error after the stream started).
    pub fn sse_data(&self) -> String {
        self.body().to_string()
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        r
    }
}

/// The error a bare status (from an extractor or the router) stands for.
pub fn from_status(status: StatusCode, detail: &str) -> ApiError {
    let detail = detail.trim();
    match status {
        StatusCode::NOT_FOUND => ApiError::new(
            status,
            "invalid_request_error",
            "Unknown request URL; see /v1/models, /v1/chat/completions, /v1/completions, /health, /metrics",
        )
        .with_code("unknown_url"),
        StatusCode::METHOD_NOT_ALLOWED => {
            ApiError::new(status, "invalid_request_error", "Method not allowed for this URL")
                .with_code("method_not_allowed")
        }
        StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::new(status, "invalid_request_error", "Request body is larger than the server's limit")
                .with_code("request_too_large")
        }
        s if s.is_client_error() => {
            let msg = if detail.is_empty() {
                s.canonical_reason().unwrap_or("bad request").to_string()
            } else {
                detail.to_string()
            };
            ApiError::new(s, "invalid_request_error", msg)
        }
        s => {
            let msg = if detail.is_empty() {
                s.canonical_reason().unwrap_or("server error").to_string()
            } else {
                detail.to_string()
            };
            ApiError::new(s, "server_error", msg)
        }
    }
}
