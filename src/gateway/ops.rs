//! What an orchestrator and a monitoring system ask: `/healthz` (the process answers),
//! `/readyz` (the medium answers too), `/metrics` (Prometheus text), and `/catalog`.
//!
//! Why it exists: a gateway in front of the bus is deployed like any HTTP service:
//! Kubernetes-style probes decide whether to route to it, and Prometheus scrapes it
//! (latency monitoring with Prometheus/Grafana). Probes and metrics need no
//! token; the catalog needs any valid one.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::AnyCaller;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::AppState;

/// The answer of a probe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok` or `ready`.
    pub status: String,
    /// The medium (`memory`, `db`, `mqtt`).
    pub medium: String,
}

/// The process is up and serving HTTP.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "Alive", body = Health))
)]
pub(crate) async fn healthz(State(state): State<AppState>) -> axum::Json<Health> {
    axum::Json(Health {
        status: "ok".into(),
        medium: state.bus().medium().name().into(),
    })
}

/// How long `/readyz` waits for the medium.
const READY_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// The medium answers: the gateway can publish and deliver now.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "The medium does not answer", body = ErrorBody),
    )
)]
pub(crate) async fn readyz(State(state): State<AppState>) -> ApiResult<axum::Json<Health>> {
    let medium = state.bus().medium();
    if state.bus().is_shut_down() {
        return Err(crate::Error::Shutdown.into());
    }
    // Reading the catalog is one round trip to the medium's store; a probe answers
    // within READY_WITHIN even when the driver would wait longer for a server.
    match tokio::time::timeout(READY_WITHIN, medium.catalog_load()).await {
        Ok(loaded) => {
            loaded?;
        }
        Err(_) => {
            return Err(crate::Error::unavailable(
                medium.name(),
                format!("no answer within {READY_WITHIN:?}"),
            )
            .into())
        }
    }
    Ok(axum::Json(Health {
        status: "ready".into(),
        medium: medium.name().into(),
    }))
}

/// Every intracom metric of this process, in Prometheus's text format (the list is in
/// the README's Metrics section).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "Prometheus text exposition", content_type = "text/plain", body = String),
        (status = 501, description = "Another metrics recorder owns this process", body = ErrorBody),
    )
)]
pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    match state.prometheus() {
        Some(handle) => {
            handle.run_upkeep();
            (
                [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                handle.render(),
            )
                .into_response()
        }
        None => ApiError::Bus(crate::Error::Unsupported {
            medium: "gateway".into(),
            what: "/metrics: another metrics recorder was installed in this process first".into(),
        })
        .into_response(),
    }
}

/// One service of the catalog.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CatalogEntry {
    /// The service.
    pub service: String,
    /// The actions it declares.
    pub actions: Vec<String>,
}

/// The sender/action catalog: which services may send, and the actions each declares.
#[utoipa::path(
    get,
    path = "/catalog",
    tag = "operations",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The catalog", body = [CatalogEntry]),
        (status = 401, description = "No valid token", body = ErrorBody),
    )
)]
pub(crate) async fn catalog(
    State(state): State<AppState>,
    _caller: AnyCaller,
) -> ApiResult<axum::Json<Vec<CatalogEntry>>> {
    let catalog = state.bus().catalog();
    catalog.refresh().await?;
    Ok(axum::Json(
        catalog
            .snapshot()
            .into_iter()
            .map(|(service, actions)| CatalogEntry {
                service,
                actions: actions.into_iter().collect(),
            })
            .collect(),
    ))
}

/// 404 for paths no route serves.
pub(crate) async fn not_found() -> impl IntoResponse {
    ApiError::NotFound("no such route: see /openapi.json".into()).into_response()
}

/// The `method` label of a request: one of a fixed set, whatever method a client
/// sends (HTTP lets a client invent methods; a label per invention would grow
/// `/metrics` without bound).
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// Counts every request by method (a fixed set), route (a route of the API, or
/// `(unmatched)`) and status, and logs it at debug level.
pub(crate) async fn observe(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let method = method_label(req.method());
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "(unmatched)".into());
    let response = next.run(req).await;
    let status = response.status().as_u16();
    tracing::debug!(method, route, status, "gateway request");
    metrics::counter!(
        crate::metrics::GATEWAY_REQUESTS,
        "method" => method,
        "route" => route,
        "status" => status.to_string()
    )
    .increment(1);
    response
}

/// Whether `path` is one of the console's assets (`/`, `/console/…`), which set their
/// own caching.
fn is_console_asset(path: &str) -> bool {
    path == "/" || path.starts_with("/console/")
}

/// Headers every response carries: `X-Content-Type-Options: nosniff` (a browser takes
/// a response for the type it says, never for what it looks like), and, except on the
/// console's assets (which a browser may keep and revalidate), `Cache-Control:
/// no-store`: answers carry messages, records and tokens' views of the bus, which no
/// browser or proxy cache should keep.
pub(crate) async fn security_headers(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let console = is_console_asset(req.uri().path());
    let mut response = next.run(req).await;
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    if !console {
        headers.insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-store"),
        );
    }
    response
}

/// `Strict-Transport-Security` for a gateway served over HTTPS: browsers that saw it
/// use HTTPS only for this host for a year (no `includeSubDomains`: the gateway does
/// not speak for the other hosts of its domain).
pub(crate) async fn strict_transport_security(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let mut response = next.run(req).await;
    response.headers_mut().insert(
        header::STRICT_TRANSPORT_SECURITY,
        header::HeaderValue::from_static("max-age=31536000"),
    );
    response
}
