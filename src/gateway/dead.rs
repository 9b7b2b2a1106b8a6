//! Dead letters over HTTP: `POST /retry/{messageId}` and `/dead` to list,
//! show and purge them. Admin tokens only.
//!
//! Why it exists: what the bus could not deliver or do waits in the dead letters until
//! an operator decides; the web console's buttons and any script call these routes.

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::Admin;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{Path, Query};
use super::model::{json_of, rfc3339, Receipt, Removed};
use super::AppState;
use crate::medium::DeadLetter;

/// A dead letter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeadLetterJson {
    /// The id of the original message.
    pub id: String,
    /// Why it is here.
    pub reason: String,
    /// When it was dead-lettered, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    /// The original document's action, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// The original document's sender, if it has one.
    #[serde(
        rename = "serviceNameSource",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub source_service: Option<String>,
    /// The original document's target service, if it has one.
    #[serde(
        rename = "serviceNameDest",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub dest_service: Option<String>,
    /// The original document, as relaxed extended JSON.
    #[schema(value_type = Object)]
    pub document: serde_json::Value,
}

impl From<&DeadLetter> for DeadLetterJson {
    fn from(letter: &DeadLetter) -> Self {
        let text = |key: &str| letter.document.get_str(key).ok().map(str::to_string);
        DeadLetterJson {
            id: letter.id.clone(),
            reason: letter.reason.clone(),
            at: letter.at.map(rfc3339),
            action: text("action"),
            source_service: text("serviceNameSource"),
            dest_service: text("serviceNameDest"),
            document: json_of(&letter.document),
        }
    }
}

/// How many dead letters to list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// At most this many, oldest first: 1 to 10 000 (default 100). Anything else is
    /// refused with 400.
    #[param(minimum = 1, maximum = 10000)]
    pub limit: Option<u32>,
}

/// The most dead letters one `GET /dead` lists.
const MAX_LIST: u32 = 10_000;

/// The dead letters, oldest first.
#[utoipa::path(
    get,
    path = "/dead",
    tag = "dead letters",
    security(("bearer" = ["admin"])),
    params(ListParams),
    responses(
        (status = 200, description = "The dead letters", body = [DeadLetterJson]),
        (status = 400, description = "Bad parameters (a limit outside 1..=10000)", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
    )
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    _admin: Admin,
    Query(params): Query<ListParams>,
) -> ApiResult<axum::Json<Vec<DeadLetterJson>>> {
    let limit = match params.limit.unwrap_or(100) {
        limit @ 1..=MAX_LIST => limit as usize,
        other => {
            return Err(ApiError::BadRequest(format!(
                "limit must be between 1 and {MAX_LIST}, not {other}"
            )))
        }
    };
    let letters = state.bus().dead_letters().list(limit).await?;
    Ok(axum::Json(
        letters.iter().map(DeadLetterJson::from).collect(),
    ))
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("no dead letter `{id}`"))
}

/// One dead letter.
#[utoipa::path(
    get,
    path = "/dead/{messageId}",
    tag = "dead letters",
    security(("bearer" = ["admin"])),
    params(("messageId" = String, Path, description = "The id of the original message")),
    responses(
        (status = 200, description = "The dead letter", body = DeadLetterJson),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 404, description = "No such dead letter", body = ErrorBody),
    )
)]
pub(crate) async fn show(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<DeadLetterJson>> {
    let letter = state.bus().dead_letters().get(&id).await?;
    let letter = letter.ok_or_else(|| not_found(&id))?;
    Ok(axum::Json(DeadLetterJson::from(&letter)))
}

/// Removes one dead letter.
#[utoipa::path(
    delete,
    path = "/dead/{messageId}",
    tag = "dead letters",
    security(("bearer" = ["admin"])),
    params(("messageId" = String, Path, description = "The id of the original message")),
    responses(
        (status = 200, description = "Removed", body = Removed),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 404, description = "No such dead letter", body = ErrorBody),
    )
)]
pub(crate) async fn purge_one(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Removed>> {
    match state.bus().dead_letters().purge(Some(&id)).await? {
        0 => Err(not_found(&id)),
        removed => {
            tracing::info!(message_id = %id, "gateway: dead letter purged");
            Ok(axum::Json(Removed { removed }))
        }
    }
}

/// Removes every dead letter.
#[utoipa::path(
    delete,
    path = "/dead",
    tag = "dead letters",
    security(("bearer" = ["admin"])),
    responses(
        (status = 200, description = "Removed", body = Removed),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
    )
)]
pub(crate) async fn purge_all(
    State(state): State<AppState>,
    _admin: Admin,
) -> ApiResult<axum::Json<Removed>> {
    let removed = state.bus().dead_letters().purge(None).await?;
    tracing::info!(removed, "gateway: dead letters purged");
    Ok(axum::Json(Removed { removed }))
}

/// Sends a dead letter again: a new message (`retryOf` naming the original, work
/// starting over) through the same checks as any publish; the dead letter is removed.
/// The new id is derived from the dead letter: retrying it again after a failed
/// removal (503) stores nothing new (200, `duplicate`).
#[utoipa::path(
    post,
    path = "/retry/{messageId}",
    tag = "dead letters",
    security(("bearer" = ["admin"])),
    params(("messageId" = String, Path, description = "The id of the original message")),
    responses(
        (status = 201, description = "Sent again", body = Receipt),
        (status = 200, description = "Sent by an earlier retry of this dead letter, whose removal failed: nothing new was sent, the dead letter is removed now", body = Receipt),
        (status = 202, description = "The medium is unavailable: the new message waits in the outbox", body = Receipt),
        (status = 400, description = "The dead letter is not a message that can be sent", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin token, or the catalog refuses it now", body = ErrorBody),
        (status = 404, description = "No such dead letter", body = ErrorBody),
        (status = 503, description = "The medium is unavailable (if the message was sent, retrying again does not send it twice)", body = ErrorBody),
    )
)]
pub(crate) async fn retry(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, axum::Json<Receipt>)> {
    let published = state.bus().dead_letters().retry_if_present(&id).await?;
    let mut receipt = Receipt::from(published.ok_or_else(|| not_found(&id))?);
    receipt.retry_of = Some(id);
    Ok((receipt.status_code(), axum::Json(receipt)))
}
