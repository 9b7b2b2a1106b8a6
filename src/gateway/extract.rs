//! Reading requests: JSON bodies, path and query parameters, each failing with the
//! gateway's JSON error; and the layers that hold every request to the size limit and
//! every error response to the JSON shape.
//!
//! Why it exists: axum's own extractors answer a bad request with a plain-text body,
//! and its router answers an unknown path or method with an empty one. A client of the
//! bus gets `{"code", "message"}` for every error, whichever layer produced it. The
//! extractors keep axum's names (`Json`, `Path`, `Query`) so that the OpenAPI
//! generator recognises them and documents the body and parameters from their types.

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

use super::error::{ApiError, ErrorBody};

/// A JSON request body of type `T`. Any content type is read as JSON (so that
/// `curl -d` works); the body limit applies before anything is parsed.
#[derive(Debug)]
pub struct Json<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let limit = req.extensions().get::<BodyLimit>().map(|l| l.0);
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            match (rejection.status(), limit) {
                (StatusCode::PAYLOAD_TOO_LARGE, Some(limit)) => ApiError::TooLarge { limit },
                _ => ApiError::BadRequest(format!("cannot read the request body: {rejection}")),
            }
        })?;
        super::model::check_integer_literals(&bytes)?;
        serde_json::from_slice(&bytes).map(Json).map_err(|e| {
            ApiError::BadRequest(format!("the request body is not the expected JSON: {e}"))
        })
    }
}

/// Path parameters of type `T`.
#[derive(Debug)]
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| Path(value))
            .map_err(|e| ApiError::BadRequest(format!("bad path parameter: {}", e.body_text())))
    }
}

/// Query parameters of type `T`.
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| Query(value))
            .map_err(|e| ApiError::BadRequest(format!("bad query parameter: {}", e.body_text())))
    }
}

/// The body limit in force, for the extractors' error message.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BodyLimit(pub(crate) usize);

/// Refuses, with 413 and before reading anything, a request whose `Content-Length` is
/// over the limit; a body without a length (chunked) is cut at the limit by axum's
/// `DefaultBodyLimit` and refused with 413 by the extractors.
pub(crate) async fn limit_body(limit: usize, mut req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return ApiError::TooLarge { limit }.into_response();
    }
    req.extensions_mut().insert(BodyLimit(limit));
    next.run(req).await
}

/// Gives every error response the JSON body, whichever layer made it (axum's 404 and
/// 405 have an empty body).
pub(crate) async fn json_errors(req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let detail = axum::body::to_bytes(body, 64 * 1024)
        .await
        .ok()
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .filter(|text| !text.is_empty());
    let reason = status.canonical_reason().unwrap_or("error");
    let code = reason.to_lowercase().replace([' ', '-'], "_");
    let message = match (status, detail) {
        (StatusCode::NOT_FOUND, None) => "no such route: see /openapi.json".to_string(),
        (StatusCode::METHOD_NOT_ALLOWED, None) => {
            "this route does not take that method: see /openapi.json".to_string()
        }
        (_, Some(detail)) => detail,
        (_, None) => reason.to_string(),
    };
    let body = serde_json::to_vec(&ErrorBody { code, message }).unwrap_or_default();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body))
}
