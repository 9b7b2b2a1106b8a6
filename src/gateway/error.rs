//! The gateway's one error type, and the JSON body of every error response.
//!
//! Why it exists: a client in any language must be able to tell, from the response
//! alone, what went wrong and what to do. Every failure of every route becomes
//! `{"code": "...", "message": "..."}` with the HTTP status that says who must act
//! (4xx: the caller; 5xx: the bus or an upstream service). The bus's own errors keep
//! their message, which names the service, action or key at fault.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The body of every error response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// A stable, machine-readable code (`unauthorized`, `forbidden`, `unknown_action`,
    /// `too_large`, `timeout`, …).
    pub code: String,
    /// What went wrong, for a person.
    pub message: String,
}

/// Everything a route can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// An error of the bus (catalog refusal, invalid message, unavailable medium…).
    #[error(transparent)]
    Bus(#[from] crate::Error),
    /// No bearer token, or one the gateway does not know: 401.
    #[error("{0}")]
    Unauthorized(String),
    /// A known token asking for what its identity may not do: 403.
    #[error("{0}")]
    Forbidden(String),
    /// The named thing does not exist: 404.
    #[error("{0}")]
    NotFound(String),
    /// A request the gateway cannot read (bad JSON, bad parameter, bad `Last-Event-ID`): 400.
    #[error("{0}")]
    BadRequest(String),
    /// A request body over the limit, refused before it was read: 413.
    #[error(
        "the request body is over the limit of {limit} bytes (common.intracom.max_message_bytes)"
    )]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The request conflicts with the state of the bus (a record being written): 409.
    #[error("{0}")]
    Conflict(String),
    /// A fault of the gateway itself: 500.
    #[error("internal error: {0}")]
    Internal(String),
    /// The gateway is at a limit of its own (SSE streams open at once): 503, try later.
    #[error("{0}")]
    Busy(String),
    /// The token already holds its share (429 `too_many_requests`): wait for one of its
    /// requests or streams to end.
    #[error("{0}")]
    TooMany(String),
    /// An SSE event id the gateway did not issue, or cannot read (400 `bad_event_id`):
    /// resubscribe without it (`from=`, or a named subscription's checkpoint).
    #[error("{0}")]
    BadEventId(String),
    /// A request body whose JSON holds more values, or nests deeper, than the gateway
    /// parses (413 `too_complex`).
    #[error("{0}")]
    TooComplex(String),
    /// The request body did not arrive in time (408 `request_timeout`).
    #[error("{0}")]
    SlowBody(String),
    /// An `Idempotency-Key` used before for another request (another body, target or
    /// type): 422, nothing sent. Code `idempotency_key_reused`.
    #[error("{0}")]
    KeyReused(String),
}

impl ApiError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        use crate::Error as E;
        match self {
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::BadEventId(_) => StatusCode::BAD_REQUEST,
            ApiError::TooComplex(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::SlowBody(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::KeyReused(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Bus(error) => match error {
                E::UnknownSender { .. } | E::UnknownAction { .. } => StatusCode::FORBIDDEN,
                E::InvalidMessage { .. } | E::Payload(_) => StatusCode::BAD_REQUEST,
                E::TooLarge { .. } | E::PacketTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                E::Unavailable { .. }
                | E::StoreUnavailable { .. }
                | E::OutboxFull { .. }
                | E::Shutdown
                | E::NoWorker { .. } => StatusCode::SERVICE_UNAVAILABLE,
                E::Medium { .. } | E::Remote { .. } | E::StoreRefused { .. } => {
                    StatusCode::BAD_GATEWAY
                }
                E::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
                E::ReservationLost { .. } => StatusCode::CONFLICT,
                E::Unsupported { .. } => StatusCode::NOT_IMPLEMENTED,
                E::Config { .. } | E::ConfigFile { .. } | E::Lost { .. } | E::Io { .. } => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            },
        }
    }

    /// The machine-readable code of this error.
    pub fn code(&self) -> &'static str {
        use crate::Error as E;
        match self {
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::TooLarge { .. } => "too_large",
            ApiError::Conflict(_) => "conflict",
            ApiError::Internal(_) => "internal",
            ApiError::Busy(_) => "busy",
            ApiError::TooMany(_) => "too_many_requests",
            ApiError::BadEventId(_) => "bad_event_id",
            ApiError::TooComplex(_) => "too_complex",
            ApiError::SlowBody(_) => "request_timeout",
            ApiError::KeyReused(_) => "idempotency_key_reused",
            ApiError::Bus(error) => match error {
                E::UnknownSender { .. } => "unknown_sender",
                E::UnknownAction { .. } => "unknown_action",
                E::InvalidMessage { .. } => "invalid_message",
                E::Payload(_) => "bad_payload",
                E::TooLarge { .. } | E::PacketTooLarge { .. } => "too_large",
                E::Unavailable { .. } => "unavailable",
                E::StoreUnavailable { .. } => "store_unavailable",
                E::StoreRefused { .. } => "store_refused",
                E::NoWorker { .. } => "no_worker",
                E::OutboxFull { .. } => "outbox_full",
                E::Shutdown => "shutting_down",
                E::Medium { .. } => "medium_refused",
                E::Remote { .. } => "remote_error",
                E::Timeout { .. } => "timeout",
                E::ReservationLost { .. } => "reservation_lost",
                E::Unsupported { .. } => "unsupported",
                E::Config { .. } | E::ConfigFile { .. } => "config",
                E::Lost { .. } => "lost",
                E::Io { .. } => "io",
            },
        }
    }

    /// The JSON body of this error.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            code: self.code().to_string(),
            message: self.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(code = self.code(), error = %self, "gateway request failed");
        } else {
            tracing::debug!(code = self.code(), error = %self, "gateway request refused");
        }
        let mut response = (status, axum::Json(self.body())).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"intracom\""),
            );
        }
        response
    }
}

/// Short for the result of a route.
pub type ApiResult<T> = std::result::Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_io_failure_is_the_gateway_s_not_unsupported() {
        let error = ApiError::Bus(crate::Error::io(
            "gateway: listening on 127.0.0.1:8080",
            std::io::Error::from(std::io::ErrorKind::AddrInUse),
        ));
        assert_eq!(error.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(error.code(), "io");
        let text = error.to_string();
        assert!(
            text.starts_with("gateway: listening on 127.0.0.1:8080: "),
            "{text}"
        );
        assert!(!text.contains("does not support"), "{text}");
    }
}
