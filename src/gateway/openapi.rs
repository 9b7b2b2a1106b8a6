//! The OpenAPI document (`/openapi.json`), generated from the handlers.
//!
//! Why it exists: clients in other languages generate their code from it, and the test
//! suite hands it to a property-based tool (schemathesis) that calls every operation
//! with inputs built from it. It is built from the same handlers the router serves
//! (`utoipa-axum`'s `routes!` registers a handler and its `#[utoipa::path]` together),
//! with request bodies, parameters and schemas taken from the handlers' types, so the
//! document cannot drift from the routes.

use axum::Router;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{dead, error, medium, ops, publish, queues, sse, stats, stores, AppState};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "intracom gateway",
        description = "The intracom message bus over HTTP: publish, subscribe (Server-Sent Events), request/reply, queues, dead letters, the message and idempotency stores. Authenticate with `Authorization: Bearer <token>`: an operation whose `bearer` requirement names the `admin` role needs an admin token (another token gets 403). Every error is a JSON `ErrorBody`."
    ),
    components(schemas(error::ErrorBody, sse::StreamNotice, sse::Start)),
    modifiers(&Bearer),
    tags(
        (name = "messages", description = "Publish, subscribe, ack, request"),
        (name = "queues", description = "Work per action of a service (admin)"),
        (name = "dead letters", description = "What could not be delivered or done (admin)"),
        (name = "stores", description = "The MessageStore (outbox) and the IdempotencyStore: admin tokens, and service tokens for their own service's"),
        (name = "operations", description = "Probes, metrics, stats, catalog"),
        (name = "medium", description = "The gateway's medium, operation by operation, for a bus whose medium is this gateway (`common.intracom.medium=http`); documents, messages and positions as canonical extended JSON"),
    )
)]
struct ApiDoc;

/// The `bearer` security scheme the operations name.
struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The API routes and their document.
pub(crate) fn api() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(publish::publish))
        .routes(routes!(publish::request))
        .routes(routes!(sse::subscribe))
        .routes(routes!(sse::ack))
        .routes(routes!(dead::retry))
        .routes(routes!(dead::list, dead::purge_all))
        .routes(routes!(dead::show, dead::purge_one))
        .routes(routes!(queues::list))
        .routes(routes!(queues::create))
        .routes(routes!(queues::purge))
        .routes(routes!(stores::keep, stores::waiting))
        .routes(routes!(stores::drop_waiting))
        .routes(routes!(stores::mark))
        .routes(routes!(stores::check, stores::forget))
        .routes(routes!(stores::reserve))
        .routes(routes!(stats::stats))
        .routes(routes!(ops::catalog))
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::readyz))
        .routes(routes!(ops::metrics))
        .routes(routes!(medium::info))
        .routes(routes!(medium::append))
        .routes(routes!(medium::follow))
        .routes(routes!(medium::catalog_load, medium::catalog_add))
        .routes(routes!(medium::checkpoint_load))
        .routes(routes!(medium::checkpoint_save))
        .routes(routes!(medium::claim))
        .routes(routes!(medium::renew))
        .routes(routes!(medium::settle))
        .routes(routes!(medium::bury))
        .routes(routes!(medium::outcome))
        .routes(routes!(medium::reserve))
        .routes(routes!(medium::complete))
        .routes(routes!(medium::release))
        .routes(routes!(medium::dead_letter))
        .routes(routes!(medium::dead_list))
        .routes(routes!(medium::dead_get))
        .routes(routes!(medium::dead_remove))
        .routes(routes!(medium::stats))
        .routes(routes!(medium::queues))
        .routes(routes!(medium::purge))
        .routes(routes!(medium::processed_get))
        .routes(routes!(medium::processed_remove))
        .split_for_parts()
}
