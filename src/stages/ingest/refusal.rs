//! Why a request was not accepted, as the HTTP answer the sender acts on: the status says what
//! to do (fix the request, the credential, or come back later), `Retry-After` says when, and the
//! body says what was wrong in one line.

use std::time::Duration;

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};

/// A request refused, with its status and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: String,
    /// Set on 429 and 503: when the sender may try again.
    pub retry_after: Option<Duration>,
}

impl Refusal {
    fn new(status: StatusCode, reason: impl Into<String>) -> Refusal {
        Refusal { status, reason: reason.into(), retry_after: None }
    }

    /// 400: the request can never be accepted as it is.
    pub fn invalid(reason: impl Into<String>) -> Refusal {
        Refusal::new(StatusCode::BAD_REQUEST, reason)
    }

    /// 401: no credential, or one that does not verify (wrong signature, stale timestamp).
    pub fn unauthenticated(reason: impl Into<String>) -> Refusal {
        Refusal::new(StatusCode::UNAUTHORIZED, reason)
    }

    /// 403: a valid credential used for a tenant it does not stand for.
    pub fn forbidden(reason: impl Into<String>) -> Refusal {
        Refusal::new(StatusCode::FORBIDDEN, reason)
    }

    pub fn not_found(reason: impl Into<String>) -> Refusal {
        Refusal::new(StatusCode::NOT_FOUND, reason)
    }

    /// 413: over `ingest.max_body_bytes` or a record over `limits.max_record_bytes`.
    pub fn too_large(reason: impl Into<String>) -> Refusal {
        Refusal::new(StatusCode::PAYLOAD_TOO_LARGE, reason)
    }

    pub fn unsupported(reason: impl Into<String>) -> Refusal {
        Refusal::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, reason)
    }

    /// 429: the tenant is over `ingest.tenant_rate`.
    pub fn too_many(reason: impl Into<String>, retry_after: Duration) -> Refusal {
        Refusal { retry_after: Some(retry_after), ..Refusal::new(StatusCode::TOO_MANY_REQUESTS, reason) }
    }

    /// 503: weir cannot take the events now (saturated, or the broker did not acknowledge them);
    /// nothing of the request counts as accepted.
    pub fn unavailable(reason: impl Into<String>, retry_after: Duration) -> Refusal {
        Refusal { retry_after: Some(retry_after), ..Refusal::new(StatusCode::SERVICE_UNAVAILABLE, reason) }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let body = axum::Json(serde_json::json!({"error": self.reason}));
        let mut response = (self.status, body).into_response();
        if let Some(after) = self.retry_after {
            // Whole seconds, rounded up: `Retry-After: 0` would invite an immediate retry.
            let secs = after.as_millis().div_ceil(1000).max(1) as u64;
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
