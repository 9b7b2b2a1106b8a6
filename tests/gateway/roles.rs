//! The role of every route, walked from the OpenAPI document the gateway serves (built
//! from the same handlers as its router, so a route added there is walked here too).
//!
//! An operation whose `bearer` requirement names the `admin` role must refuse a request
//! without a token or with an unknown one (401), and a service token (403, "needs an
//! admin token"), before it reads the path, the query or the body (the requests carry
//! none that would pass), and must document both answers; an admin token must get past
//! the check. Any other operation with a `bearer` requirement must refuse a request
//! without a token (401) and not refuse a service token as a non-admin; an operation
//! without one must answer without a token. So the document and the handlers' role
//! extractors agree, route by route, both ways.

use libtest_mimic::Trial;
use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::{block_on, Gw, Place, ADMIN, BILLING, GUARD};

pub fn trials() -> Vec<Trial> {
    vec![Trial::test(
        "memory::every_route_has_the_role_its_document_names",
        || block_on(every_route_has_the_role_its_document_names()),
    )]
}

/// The methods an OpenAPI path item may hold.
const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// `path` with its parameters filled in: names the catalog knows, ids nothing holds.
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|segment| match segment {
            "{service}" => "billing",
            "{action}" | "{topic}" => "reload",
            s if s.starts_with('{') => "no-such-id",
            s => s,
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// The status of a request without a body, and its JSON body when it is an error (the
/// body of a success is not read: it may be an endless event stream).
async fn answer(gw: &Gw, method: &Method, path: &str, token: Option<&str>) -> (StatusCode, Value) {
    let mut request = gw.http.request(method.clone(), gw.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = tokio::time::timeout(GUARD, request.send())
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no answer within the hang guard"))
        .unwrap_or_else(|e| panic!("{method} {path}: {e:?}"));
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return (status, Value::Null);
    }
    let body = tokio::time::timeout(GUARD, response.bytes())
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no error body within the hang guard"))
        .unwrap_or_default();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// Whether an answer is the refusal of a token without the admin role.
fn refused_as_not_admin((status, body): &(StatusCode, Value)) -> bool {
    *status == StatusCode::FORBIDDEN
        && body["code"] == "forbidden"
        && body["message"]
            .as_str()
            .is_some_and(|m| m.contains("needs an admin token"))
}

async fn every_route_has_the_role_its_document_names() {
    let gw = Gw::start(&Place::Memory).await;
    let (status, document) = gw.call(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK, "{document}");
    let paths = document["paths"].as_object().expect("the document's paths");
    let (mut admin, mut secured, mut open) = (0, 0, 0);
    for (template, item) in paths {
        for method in METHODS {
            let Some(operation) = item.get(method) else {
                continue;
            };
            let what = format!("{} {template}", method.to_uppercase());
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).expect("a method");
            let path = concrete(template);
            let requirements = operation["security"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let roles: Vec<&str> = requirements
                .iter()
                .filter_map(|r| r["bearer"].as_array())
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let documented = |status: &str| operation["responses"][status].is_object();
            if requirements.is_empty() {
                open += 1;
                let anonymous = answer(&gw, &method, &path, None).await;
                assert_ne!(
                    anonymous.0,
                    StatusCode::UNAUTHORIZED,
                    "{what} names no bearer requirement but refuses a request without a token: {}",
                    anonymous.1
                );
                continue;
            }
            assert!(
                documented("401"),
                "{what} takes a token: its 401 is documented"
            );
            for token in [None, Some("not-a-token")] {
                let (status, body) = answer(&gw, &method, &path, token).await;
                assert_eq!(
                    status,
                    StatusCode::UNAUTHORIZED,
                    "{what} with {token:?}: {body}"
                );
                assert_eq!(
                    body["code"], "unauthorized",
                    "{what} with {token:?}: {body}"
                );
            }
            let as_service = answer(&gw, &method, &path, Some(BILLING)).await;
            if roles.contains(&"admin") {
                admin += 1;
                assert!(
                    documented("403"),
                    "{what} is for admin tokens: its 403 is documented"
                );
                assert!(
                    refused_as_not_admin(&as_service),
                    "{what} is documented for admin tokens only, but a service token got {} {}",
                    as_service.0,
                    as_service.1
                );
                let as_admin = answer(&gw, &method, &path, Some(ADMIN)).await;
                assert!(
                    as_admin.0 != StatusCode::UNAUTHORIZED && !refused_as_not_admin(&as_admin),
                    "{what}: an admin token gets past the role check, not {} {}",
                    as_admin.0,
                    as_admin.1
                );
            } else {
                secured += 1;
                assert!(
                    !refused_as_not_admin(&as_service),
                    "{what} refuses a service token as not admin, but its document does not \
                     name the admin role: {}",
                    as_service.1
                );
            }
        }
    }
    eprintln!(
        "routes walked: {admin} for admin tokens, {secured} for other tokens, {open} without one"
    );
    assert!(
        admin > 0 && secured > 0 && open > 0,
        "the document holds routes of every kind"
    );
    gw.stop().await;
}
