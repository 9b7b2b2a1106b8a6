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
        let limits = req.extensions().get::<BodyLimits>().copied();
        let read = Bytes::from_request(req, state);
        let read = match limits {
            Some(limits) => tokio::time::timeout(limits.read_timeout, read)
                .await
                .map_err(|_| {
                    ApiError::SlowBody(format!(
                        "the request body did not arrive within {} ms (body_read_timeout)",
                        limits.read_timeout.as_millis()
                    ))
                })?,
            None => read.await,
        };
        let bytes = read.map_err(|rejection| match (rejection.status(), limits) {
            (StatusCode::PAYLOAD_TOO_LARGE, Some(limits)) => ApiError::TooLarge {
                limit: limits.bytes,
            },
            _ => ApiError::BadRequest(format!("cannot read the request body: {rejection}")),
        })?;
        if let Some(limits) = limits {
            check_json_shape(&bytes, limits.json_values, limits.json_depth)?;
        }
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

/// What a request body may be: its bytes, the values and depth of its JSON, the time
/// to read it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BodyLimits {
    pub(crate) bytes: usize,
    pub(crate) json_values: usize,
    pub(crate) json_depth: usize,
    pub(crate) read_timeout: std::time::Duration,
}

/// Refuses, with 413 and before reading anything, a request whose `Content-Length` is
/// over the limit; a body without a length (chunked) is cut at the limit by axum's
/// `DefaultBodyLimit` and refused with 413 by the extractors.
pub(crate) async fn limit_body(limits: BodyLimits, mut req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.bytes as u64) {
        return ApiError::TooLarge {
            limit: limits.bytes,
        }
        .into_response();
    }
    req.extensions_mut().insert(limits);
    next.run(req).await
}

/// Refuses a JSON text with more than `max_values` values (every scalar, array and
/// object, at every level) or nested deeper than `max_depth`, reading its bytes once
/// and building nothing. Parsing costs memory per value (a `serde_json::Value` and then
/// a BSON value each, several times the 2 bytes of `0,`): this bounds it by the count,
/// before anything is parsed. What is not JSON is left for the parser to refuse.
pub(crate) fn check_json_shape(
    bytes: &[u8],
    max_values: usize,
    max_depth: usize,
) -> Result<(), ApiError> {
    let mut values = 0usize;
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    // Whether the bytes since the last structural character started a scalar.
    let mut in_scalar = false;
    for &b in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => {
                in_string = true;
                values += 1;
                in_scalar = false;
            }
            b'[' | b'{' => {
                values += 1;
                depth += 1;
                in_scalar = false;
                if depth > max_depth {
                    return Err(ApiError::TooComplex(format!(
                        "the request body's JSON nests deeper than {max_depth} levels (max_json_depth)"
                    )));
                }
            }
            b']' | b'}' => {
                depth = depth.saturating_sub(1);
                in_scalar = false;
            }
            b',' | b':' | b' ' | b'\t' | b'\n' | b'\r' => in_scalar = false,
            _ => {
                if !in_scalar {
                    in_scalar = true;
                    values += 1;
                }
            }
        }
        if values > max_values {
            return Err(ApiError::TooComplex(format!(
                "the request body's JSON holds more than {max_values} values (max_json_values)"
            )));
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::check_json_shape;

    fn values(text: &str) -> usize {
        // The smallest limit that passes.
        (0..10_000)
            .find(|&n| check_json_shape(text.as_bytes(), n, 64).is_ok())
            .unwrap()
    }

    #[test]
    fn every_value_is_counted_once() {
        assert_eq!(values("{}"), 1);
        assert_eq!(values(r#"{"a": 1}"#), 3); // the object, the key, 1
        assert_eq!(values("[0,0,0]"), 4);
        assert_eq!(values(r#"["a,b\"]", -1.5e3, true, null]"#), 5);
        assert_eq!(values(r#"{"k": {"$numberLong": "7"}}"#), 5);
    }

    #[test]
    fn depth_is_bounded() {
        let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
        assert!(check_json_shape(deep.as_bytes(), 1000, 64).is_err());
        let ok = format!("{}{}", "[".repeat(64), "]".repeat(64));
        assert!(check_json_shape(ok.as_bytes(), 1000, 64).is_ok());
        // Brackets inside strings are not nesting.
        assert!(check_json_shape(br#"["[[[[[[[[[["]"#, 10, 2).is_ok());
    }
}
