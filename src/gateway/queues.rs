//! The work queues over the bus: `GET /queues`, `POST /queues/create`,
//! `DELETE /queues/{service}/{action}`.
//!
//! Why it exists: in intracom a queue is not a separate object but the work
//! (`delivery: one`) of one action of one service. Listing queues shows every action
//! the catalog declares, with how much work waits, how much a worker holds, and how
//! much died; creating a queue declares the action in the catalog; deleting one purges
//! the work that waits (each item is settled `state: error` "purged", so a record
//! stays) and says how many. Admin tokens only.

use super::model::Name;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::Admin;
use super::error::{ApiResult, ErrorBody};
use super::extract::{Json, Path};
use super::AppState;
use crate::medium::QueueStats;
use crate::message::check_name;

/// One queue: the work of one action of one service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Queue {
    /// `<service>/<action>`.
    pub id: String,
    /// The service that does the work.
    pub service: String,
    /// The action.
    pub action: String,
    /// Whether the catalog declares the action for the service.
    pub declared: bool,
    /// Work waiting to be claimed (including work waiting out a retry's back-off).
    pub depth: u64,
    /// Work held by a live worker.
    #[serde(rename = "inFlight")]
    pub in_flight: u64,
    /// Dead letters of this queue.
    pub dead: u64,
}

impl Queue {
    fn new(service: &str, action: &str, declared: bool, stats: Option<&QueueStats>) -> Self {
        Queue {
            id: format!("{service}/{action}"),
            service: service.to_string(),
            action: action.to_string(),
            declared,
            depth: stats.map_or(0, |s| s.depth),
            in_flight: stats.map_or(0, |s| s.in_flight),
            dead: stats.map_or(0, |s| s.dead),
        }
    }
}

/// Every declared action, and every action with work or dead letters, with its counts.
pub(crate) async fn all_queues(state: &AppState) -> ApiResult<Vec<Queue>> {
    let bus = state.bus();
    bus.catalog().refresh().await?;
    let catalog = bus.catalog().snapshot();
    let stats = bus.medium().queues().await?;
    let mut queues: Vec<Queue> = catalog
        .iter()
        .flat_map(|(service, actions)| actions.iter().map(move |a| (service, a)))
        .map(|(service, action)| {
            let found = stats
                .iter()
                .find(|s| s.service == *service && s.action == *action);
            Queue::new(service, action, true, found)
        })
        .collect();
    for s in &stats {
        if !queues
            .iter()
            .any(|q| q.service == s.service && q.action == s.action)
        {
            queues.push(Queue::new(&s.service, &s.action, false, Some(s)));
        }
    }
    queues.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(queues)
}

/// The queues: every action the catalog declares, and any other with work or dead
/// letters, with depth, in-flight and dead counts.
#[utoipa::path(
    get,
    path = "/queues",
    tag = "queues",
    security(("bearer" = ["admin"])),
    responses(
        (status = 200, description = "The queues", body = [Queue]),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
    )
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    _admin: Admin,
) -> ApiResult<axum::Json<Vec<Queue>>> {
    Ok(axum::Json(all_queues(&state).await?))
}

/// A queue to create.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewQueue {
    /// The service that will do the work.
    #[schema(value_type = Name)]
    pub service: String,
    /// The action.
    #[schema(value_type = Name)]
    pub action: String,
}

/// Creates a queue: declares the action for the service in the catalog (a no-op when it
/// is declared already).
#[utoipa::path(
    post,
    path = "/queues/create",
    tag = "queues",
    security(("bearer" = ["admin"])),
    responses(
        (status = 201, description = "Declared", body = Queue),
        (status = 400, description = "Bad names", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
    )
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    _admin: Admin,
    Json(queue): Json<NewQueue>,
) -> ApiResult<(StatusCode, axum::Json<Queue>)> {
    state
        .bus()
        .catalog()
        .register(&queue.service, [queue.action.clone()])
        .await?;
    tracing::info!(service = %queue.service, action = %queue.action, "gateway: queue declared");
    // Declared; the counts come from the medium (an error there is the caller's 503).
    let stats = state.bus().medium().queues().await?;
    let found = stats
        .iter()
        .find(|s| s.service == queue.service && s.action == queue.action);
    Ok((
        StatusCode::CREATED,
        axum::Json(Queue::new(&queue.service, &queue.action, true, found)),
    ))
}

/// How many work items a purge ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Purged {
    /// `<service>/<action>`.
    pub id: String,
    /// How many waiting items were purged (held ones are left to their workers).
    pub purged: u64,
}

/// Purges a queue: the work waiting for `action` of `service` is settled as
/// `state: error` ("purged"); work a live worker holds is left alone. The catalog
/// keeps the action.
#[utoipa::path(
    delete,
    path = "/queues/{service}/{action}",
    tag = "queues",
    security(("bearer" = ["admin"])),
    params(
        ("service" = String, Path, description = "The service"),
        ("action" = String, Path, description = "The action"),
    ),
    responses(
        (status = 200, description = "Purged", body = Purged),
        (status = 400, description = "Bad names", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
    )
)]
pub(crate) async fn purge(
    State(state): State<AppState>,
    _admin: Admin,
    Path((service, action)): Path<(String, String)>,
) -> ApiResult<axum::Json<Purged>> {
    check_name("service", &service)?;
    check_name("action", &action)?;
    let purged = state.bus().medium().queue_purge(&service, &action).await?;
    Ok(axum::Json(Purged {
        id: format!("{service}/{action}"),
        purged,
    }))
}
