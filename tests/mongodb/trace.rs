//! Trace context through the bus on MongoDB: the `trace` field in the collection (its
//! validator, mongosh's view of it) and, with the feature `otel`, one trace from a
//! publish in one service to the handler in another.

use intracom::bson::{doc, Document, Timestamp};
use intracom::{Intracom, Message, Subscription, TraceContext};

use crate::conformance::next;
use crate::servers::Target;
use crate::{catalog, check, database_name, on_server, raw_client, Check};

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

pub fn checks() -> Vec<Check> {
    #[allow(unused_mut)] // pushed to with the feature `otel`
    let mut checks = vec![
        check!(the_validator_accepts_a_message_with_a_trace),
        check!(mongosh_publishes_and_shows_a_trace, mongosh),
    ];
    #[cfg(feature = "otel")]
    checks.push(check!(
        one_trace_from_a_publish_to_a_handler_in_another_service
    ));
    checks
}

/// A hand-written document in the message shape, as mongosh would insert it.
fn by_hand(id: &str) -> Document {
    doc! {
        "_id": id,
        "ts": Timestamp { time: 1, increment: 1 },
        "at": intracom::bson::DateTime::now(),
        "serviceNameSource": "billing",
        "instanceSource": "billing-1",
        "serviceNameDest": "billing",
        "type": "fire_and_forget",
        "delivery": "all",
        "action": "reload",
        "query": {},
        "query_ts": 1_i64,
        "priority": 0,
    }
}

async fn the_validator_accepts_a_message_with_a_trace(t: &Target) {
    let uri = t.uri().expect("server");
    let database = database_name();
    let bus = Intracom::connect(on_server(catalog("billing", "billing-1"), &uri, &database))
        .await
        .expect("bus");
    let messages = raw_client(&uri)
        .await
        .database(&database)
        .collection::<Document>("messages");

    // By hand: the trace field as documented is accepted; one the validator describes
    // otherwise (no traceparent, not a string, not a document) is refused (121).
    let mut traced = by_hand("traced-by-hand");
    traced.insert(
        "trace",
        doc! { "traceparent": TRACEPARENT, "tracestate": "vendor=abc" },
    );
    messages
        .insert_one(traced)
        .await
        .unwrap_or_else(|e| panic!("the validator accepts a message with a trace: {e}"));
    for (n, bad) in [
        intracom::bson::Bson::Document(doc! { "tracestate": "vendor=abc" }),
        intracom::bson::Bson::Document(doc! { "traceparent": 7 }),
        intracom::bson::Bson::Document(doc! { "traceparent": "00-short" }),
        intracom::bson::Bson::String(TRACEPARENT.into()),
    ]
    .into_iter()
    .enumerate()
    {
        let mut refused = by_hand(&format!("bad-trace-{n}"));
        refused.insert("trace", bad.clone());
        assert!(
            messages.insert_one(refused).await.is_err(),
            "the validator refuses trace: {bad}"
        );
    }

    // Through the bus, on a build with or without `otel`: the context a message brings
    // is stored as a sub-document and delivered as it is.
    let mut sub = bus
        .subscribe(Subscription::new().actions(["reload"]))
        .await
        .expect("subscribe");
    let trace = TraceContext::new(TRACEPARENT, Some("vendor=abc".into())).expect("valid");
    let published = bus
        .publish(Message::to_service("billing", "reload").with_trace(trace.clone()))
        .await
        .expect("publish");
    let delivered = next(&mut sub).await;
    assert_eq!(delivered.id, published.id);
    assert_eq!(delivered.trace.as_ref(), Some(&trace));
    let stored = messages
        .find_one(doc! { "_id": &published.id })
        .await
        .expect("find")
        .expect("stored");
    assert_eq!(
        stored.get_document("trace").expect("a trace sub-document"),
        &doc! { "traceparent": TRACEPARENT, "tracestate": "vendor=abc" }
    );
    bus.shutdown().await;
    let _ = raw_client(&uri).await.database(&database).drop().await;
}

/// The admin's kit: `ic.publish({traceparent, tracestate})` stores the context the
/// bus delivers, and a message line shows it.
async fn mongosh_publishes_and_shows_a_trace(t: &Target) {
    let uri = t.uri().expect("server");
    let database = database_name();
    let bus = Intracom::connect(on_server(catalog("billing", "billing-1"), &uri, &database))
        .await
        .expect("bus");
    let mut sub = bus
        .subscribe(Subscription::new().actions(["reload"]))
        .await
        .expect("subscribe");
    let out = crate::mongosh::shell(
        &uri,
        &database,
        &format!(
            r#"ic.publish({{ from: "billing", to: "billing", action: "reload", traceparent: "{TRACEPARENT}", tracestate: "vendor=abc", id: "hand-traced" }});
ic.recent(5);"#
        ),
    )
    .await;
    assert!(out.contains("published: hand-traced"), "{out}");
    let line = out
        .lines()
        .find(|l| l.contains("hand-traced") && !l.starts_with("published"))
        .unwrap_or_else(|| panic!("no message line for hand-traced in:\n{out}"));
    assert!(line.contains(&format!("trace={TRACEPARENT}")), "{line}");
    let delivery = next(&mut sub).await;
    assert_eq!(delivery.id, "hand-traced");
    assert_eq!(
        delivery.trace,
        TraceContext::new(TRACEPARENT, Some("vendor=abc".into()))
    );
    bus.shutdown().await;
    let _ = raw_client(&uri).await.database(&database).drop().await;
}

#[cfg(feature = "otel")]
async fn one_trace_from_a_publish_to_a_handler_in_another_service(t: &Target) {
    let uri = t.uri().expect("server");
    crate::otel::Traced::run(move |traced| async move {
        let database = database_name();
        let users = Intracom::connect(on_server(crate::otel::catalog("users"), &uri, &database))
            .await
            .expect("users");
        let billing =
            Intracom::connect(on_server(crate::otel::catalog("billing"), &uri, &database))
                .await
                .expect("billing");
        crate::otel::one_trace_across_services(&traced, users, billing).await;
        let _ = raw_client(&uri).await.database(&database).drop().await;
    })
    .await;
}
