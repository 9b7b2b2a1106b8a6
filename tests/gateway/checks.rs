//! The checks that run on every place: memory and each MongoDB server.

use std::time::Duration;

use intracom::bson::{doc, Document};
use intracom::gateway::GatewayOptions;
use intracom::idempotency::Once;
use intracom::WorkOptions;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use super::{check, eventually, Check, Gw, Place, ADMIN, BILLING, GUARD, MAX_BYTES, OPS, USERS};

pub fn checks() -> Vec<Check> {
    vec![
        check!(publish_reaches_an_sse_subscriber),
        check!(last_event_id_resumes_50_messages_in_order),
        check!(request_reply_answers_fails_and_times_out),
        check!(idempotency_keys_belong_to_their_sender),
        check!(unauthorized_forbidden_and_too_large),
        check!(a_slow_client_falls_behind_alone),
        check!(a_takeover_tells_the_old_stream),
        check!(sse_streams_are_limited_and_freed),
        check!(latency_counts_live_deliveries),
        check!(named_subscriptions_resume_after_their_acks),
        check!(a_named_monitor_checkpoint_passes_what_its_filter_drops),
        check!(a_subscription_name_belongs_to_its_service),
        check!(queues_and_dead_letters),
        check!(idempotency_store),
    ]
}

async fn post_keyed(gw: &Gw, key: &str, body: Value) -> (StatusCode, Value) {
    post_keyed_as(gw, BILLING, key, body).await
}

async fn post_keyed_as(gw: &Gw, token: &str, key: &str, body: Value) -> (StatusCode, Value) {
    let response = gw
        .http
        .post(gw.url("/publish"))
        .bearer_auth(token)
        .header("Idempotency-Key", key)
        .json(&body)
        .send()
        .await
        .expect("publish");
    let status = response.status();
    (status, response.json().await.expect("a JSON receipt"))
}

/// Asserts a JSON error with this status and code.
fn refused(answer: (StatusCode, Value), status: StatusCode, code: &str) {
    assert_eq!(answer.0, status, "{}", answer.1);
    assert_eq!(answer.1["code"], code, "{}", answer.1);
    assert!(
        answer.1["message"].as_str().is_some_and(|m| !m.is_empty()),
        "a readable message: {}",
        answer.1
    );
}

async fn publish_reaches_an_sse_subscriber(place: &Place) {
    let gw = Gw::start(place).await;
    let mut users = gw.subscribe("/subscribe/*", USERS, None).await;
    let mut reloads = gw.subscribe("/subscribe/reload", BILLING, None).await;

    let id = gw
        .publish(
            BILLING,
            json!({ "to": "users", "action": "user.deleted", "query": { "user": 12 } }),
        )
        .await;
    let (event_id, m) = users.message("the targeted message").await;
    assert_eq!(m["id"], id);
    assert_eq!(m["serviceNameSource"], "billing");
    assert_eq!(m["serviceNameDest"], "users");
    assert_eq!(m["type"], "fire_and_forget");
    assert_eq!(m["action"], "user.deleted");
    assert_eq!(m["query"]["user"], 12);
    assert!(
        m["ts"]["t"].as_u64().is_some(),
        "stamped by the medium: {m}"
    );
    super::event_keys()
        .verify(&event_id)
        .expect("the event id is a signed position");

    // The same Idempotency-Key twice stores one message.
    let body = json!({ "action": "reload", "query": { "tenant": 7 } });
    let (status, first) = post_keyed(&gw, "reload-tenant-7", body.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert_eq!(
        first["id"],
        intracom::gateway::idempotent_id("billing", "reload-tenant-7")
    );
    assert_eq!(first["status"], "stored");
    let (status, again) = post_keyed(&gw, "reload-tenant-7", body).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["status"], "duplicate");
    assert_eq!(again["id"], first["id"]);
    let keyed = first["id"].clone();
    let marker = gw.publish(BILLING, json!({ "action": "reload" })).await;
    for (who, stream) in [("users", &mut users), ("billing", &mut reloads)] {
        let (_, m) = stream.message(who).await;
        assert_eq!(m["id"], keyed, "{who}");
        assert_eq!(m["serviceNameDest"], Value::Null, "a broadcast");
        let (_, m) = stream.message(who).await;
        assert_eq!(m["id"], marker, "{who}: the retried POST was stored once");
    }
    // A message to one instance reaches a subscriber that names that instance only.
    let mut instance = gw
        .subscribe("/subscribe/user.deleted?instance=users-7", USERS, None)
        .await;
    let to_other = gw
        .publish(
            BILLING,
            json!({ "to": "users", "instance": "users-8", "action": "user.deleted" }),
        )
        .await;
    let to_it = gw
        .publish(
            BILLING,
            json!({ "to": "users", "instance": "users-7", "action": "user.deleted" }),
        )
        .await;
    let (_, m) = instance.message("to users-7").await;
    assert_eq!(m["id"], to_it, "not {to_other}");
    assert_eq!(m["instanceDest"], "users-7");
    gw.stop().await;
}

async fn last_event_id_resumes_50_messages_in_order(place: &Place) {
    let gw = Gw::start(place).await;
    let mut sub = gw.subscribe("/subscribe/reload", USERS, None).await;
    let first = gw
        .publish(BILLING, json!({ "action": "reload", "query": { "n": 0 } }))
        .await;
    let (last_event_id, m) = sub.message("the first message").await;
    assert_eq!(m["id"], first);
    drop(sub);

    let mut published = Vec::new();
    for n in 1..=50 {
        published.push(
            gw.publish(BILLING, json!({ "action": "reload", "query": { "n": n } }))
                .await,
        );
    }
    let mut resumed = gw
        .subscribe("/subscribe/reload", USERS, Some(&last_event_id))
        .await;
    let mut received = Vec::new();
    for n in 1..=50 {
        let (_, m) = resumed
            .message(&format!("message {n} after the reconnect"))
            .await;
        received.push(m["id"].as_str().unwrap_or_default().to_string());
    }
    assert_eq!(
        received, published,
        "all 50, in order, and nothing before them"
    );
    let live = gw.publish(BILLING, json!({ "action": "reload" })).await;
    assert_eq!(
        resumed.message("live after the catch-up").await.1["id"],
        live
    );

    // `?after=` does the same for clients that cannot set the header.
    let mut after = gw
        .subscribe(
            &format!("/subscribe/reload?after={last_event_id}"),
            USERS,
            None,
        )
        .await;
    assert_eq!(after.message("after=").await.1["id"], published[0]);

    let bad = gw
        .http
        .get(gw.url("/subscribe/reload"))
        .bearer_auth(USERS)
        .header("Last-Event-ID", "not-a-position")
        .send()
        .await
        .expect("subscribe");
    let status = bad.status();
    refused(
        (status, bad.json().await.expect("JSON")),
        StatusCode::BAD_REQUEST,
        "bad_event_id",
    );
    gw.stop().await;
}

async fn request_reply_answers_fails_and_times_out(place: &Place) {
    let gw = Gw::start(place).await;
    let billing = gw.peer("billing").await;
    let worker = billing
        .serve("billing", "invoice.get", |q: Document| async move {
            if q.get("invoice").and_then(|v| v.as_i32()) == Some(13) {
                return Err("no invoice 13".to_string());
            }
            let mut answer = doc! { "total": 42.5 };
            if let Some(invoice) = q.get("invoice") {
                answer.insert("invoice", invoice.clone());
            }
            Ok(answer)
        })
        .expect("worker");
    let (status, answer) = gw
        .post(
            "/request/billing/invoice.get",
            USERS,
            json!({ "invoice": 42 }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["result"], json!({ "total": 42.5, "invoice": 42 }));

    let failed = gw
        .post(
            "/request/billing/invoice.get",
            USERS,
            json!({ "invoice": 13 }),
        )
        .await;
    assert!(
        failed.1["message"]
            .as_str()
            .unwrap_or_default()
            .contains("no invoice 13"),
        "{}",
        failed.1
    );
    refused(failed, StatusCode::BAD_GATEWAY, "remote_error");

    // Nobody serves `marker`: the time-out passes.
    refused(
        gw.post("/request/billing/marker?timeout_ms=300", USERS, json!({}))
            .await,
        StatusCode::GATEWAY_TIMEOUT,
        "timeout",
    );
    refused(
        gw.post("/request/billing/nope", USERS, json!({})).await,
        StatusCode::FORBIDDEN,
        "unknown_action",
    );
    refused(
        gw.post("/request/billing/invoice.get", USERS, json!([1, 2]))
            .await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    worker.stop().await;
    billing.shutdown().await;
    gw.stop().await;
}

async fn idempotency_keys_belong_to_their_sender(place: &Place) {
    let gw = Gw::start(place).await;
    let mut users = gw.subscribe("/subscribe/*", USERS, None).await;
    let key = "nightly-7";
    let (status, billing) = post_keyed_as(&gw, BILLING, key, json!({ "action": "reload" })).await;
    assert_eq!(status, StatusCode::CREATED, "{billing}");
    // users uses the same key: its own message, stored (not a `duplicate` of
    // billing's, which would suppress it and tell users that billing used the key).
    let (status, own) = post_keyed_as(&gw, USERS, key, json!({ "action": "user.deleted" })).await;
    assert_eq!(status, StatusCode::CREATED, "{own}");
    assert_eq!(own["status"], "stored");
    assert_ne!(own["id"], billing["id"]);
    // Each sender's retry is still one message.
    for (token, action, first) in [(BILLING, "reload", &billing), (USERS, "user.deleted", &own)] {
        let (status, again) = post_keyed_as(&gw, token, key, json!({ "action": action })).await;
        assert_eq!(
            (status, &again["status"], &again["id"]),
            (StatusCode::OK, &json!("duplicate"), &first["id"]),
            "{again}"
        );
    }
    let marker = gw.publish(BILLING, json!({ "action": "marker" })).await;
    let mut received = Vec::new();
    loop {
        let (_, m) = users.message("the keyed messages").await;
        if m["id"] == marker.as_str() {
            break;
        }
        received.push((m["serviceNameSource"].clone(), m["id"].clone()));
    }
    assert_eq!(
        received,
        [
            (json!("billing"), billing["id"].clone()),
            (json!("users"), own["id"].clone())
        ]
    );
    gw.stop().await;
}

async fn unauthorized_forbidden_and_too_large(place: &Place) {
    let gw = Gw::start(place).await;
    let reload = json!({ "action": "reload" });

    let anonymous = gw
        .http
        .post(gw.url("/publish"))
        .json(&reload)
        .send()
        .await
        .expect("publish");
    assert!(anonymous.headers().contains_key("www-authenticate"));
    let status = anonymous.status();
    refused(
        (status, anonymous.json().await.expect("JSON")),
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    refused(
        gw.post("/publish", "not-a-token", reload.clone()).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    refused(
        gw.call(Method::GET, "/stats", None, None).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    let basic = gw
        .http
        .get(gw.url("/catalog"))
        .header("Authorization", "Basic dXNlcjpwYXNz")
        .send()
        .await
        .expect("catalog");
    assert_eq!(basic.status(), StatusCode::UNAUTHORIZED);

    // Another service's identity, or what the catalog does not let it send.
    refused(
        gw.post(
            "/publish",
            BILLING,
            json!({ "action": "reload", "from": "users" }),
        )
        .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    refused(
        gw.post("/publish", USERS, reload.clone()).await,
        StatusCode::FORBIDDEN,
        "unknown_action",
    );
    refused(
        gw.post("/publish", ADMIN, reload.clone()).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    for path in ["/queues", "/dead", "/stats", "/subscribe/*?monitor=true"] {
        refused(
            gw.get(path, BILLING).await,
            StatusCode::FORBIDDEN,
            "forbidden",
        );
    }
    assert_eq!(gw.get("/queues", ADMIN).await.0, StatusCode::OK);
    assert_eq!(gw.get("/catalog", USERS).await.0, StatusCode::OK);
    // The stores: a service token sees its own service's messages only.
    assert_eq!(
        gw.get("/messages", BILLING).await,
        (StatusCode::OK, json!([]))
    );
    // Nothing was published by the refused calls.
    assert_eq!(gw.get("/stats", ADMIN).await.1["counts"]["total"], 0);

    // Over the limit: refused before the body is read, with or without a length.
    let pad = "x".repeat(MAX_BYTES);
    let big = json!({ "action": "reload", "query": { "pad": pad } });
    // A declared length over the limit is refused on the headers: no byte of the body is
    // sent (the body stays open), so the answer cannot be lost to a reset (see below).
    let declared = serde_json::to_vec(&big).expect("JSON").len();
    let unsent = futures::stream::pending::<Result<Vec<u8>, std::io::Error>>();
    let early = tokio::time::timeout(
        GUARD,
        gw.http
            .post(gw.url("/publish"))
            .bearer_auth(BILLING)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::CONTENT_LENGTH, declared)
            .body(reqwest::Body::wrap_stream(unsent))
            .send(),
    )
    .await
    .expect("an answer before any byte of the body")
    .expect("publish with a declared length");
    let status = early.status();
    refused(
        (status, early.json().await.expect("JSON")),
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
    );
    let bytes = serde_json::to_vec(&big).expect("JSON");
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        bytes.chunks(4096).map(|c| Ok(c.to_vec())).collect();
    // Every byte of the body goes out, then the body stays open: the gateway answers
    // while it waits for the end of a body it will not read. (Had the client gone on
    // sending, the gateway closing the connection with bytes unread could reset it and
    // take the answer with it: TCP, not the gateway.)
    let body = futures::StreamExt::chain(futures::stream::iter(chunks), futures::stream::pending());
    let chunked = tokio::time::timeout(
        GUARD,
        gw.http
            .post(gw.url("/publish"))
            .bearer_auth(BILLING)
            .body(reqwest::Body::wrap_stream(body))
            .send(),
    )
    .await
    .expect("an answer before the end of the body")
    .expect("chunked publish");
    let status = chunked.status();
    refused(
        (status, chunked.json().await.expect("JSON")),
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
    );
    // Under the body limit but over the message limit once encoded: refused too.
    let near = json!({ "action": "reload", "query": { "pad": "y".repeat(MAX_BYTES - 100) } });
    refused(
        gw.post("/publish", BILLING, near).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
    );
    refused(
        gw.call(Method::POST, "/publish", Some(BILLING), None).await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    refused(
        gw.post(
            "/publish",
            BILLING,
            json!({ "action": "reload", "surprise": 1 }),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    refused(
        gw.call(Method::PUT, "/publish", Some(BILLING), None).await,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
    refused(
        gw.get("/nowhere", BILLING).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    gw.stop().await;
}

/// The byte budget of one SSE client in [`a_slow_client_falls_behind_alone`].
const BUDGET: usize = 256 * 1024;

async fn a_slow_client_falls_behind_alone(place: &Place) {
    // The stall is long enough for a client that reads (the fast one) on a loaded
    // machine; the slow one never reads until it is cut off.
    let options = GatewayOptions::default()
        .sse_buffer_bytes(BUDGET)
        .sse_stall(Duration::from_secs(10));
    let gw = Gw::with(place, options).await;
    let mut slow = gw.subscribe("/subscribe/reload", USERS, None).await;
    let mut fast = gw.subscribe("/subscribe/reload", BILLING, None).await;
    let reader = tokio::spawn(async move {
        let mut ids = Vec::new();
        loop {
            let (_, m) = fast.message("the fast client").await;
            if m["query"]["last"] == true {
                return ids;
            }
            ids.push(m["id"].as_str().unwrap_or_default().to_string());
        }
    });
    assert_eq!(
        gw.get("/stats", ADMIN).await.1["sseClients"],
        2,
        "a stream counts once its response is there"
    );
    // What the gateway may hold for two clients: each its budget, or one event over it.
    let bound = 2 * (BUDGET + 64 * 1024) as u64;
    let pad = "p".repeat(30 * 1024);
    let mut published = Vec::new();
    let mut most = 0;
    loop {
        let stats = gw.get("/stats", ADMIN).await.1;
        let buffered = stats["sseBufferedBytes"]
            .as_u64()
            .expect("sseBufferedBytes");
        most = most.max(buffered);
        assert!(
            buffered <= bound,
            "the gateway holds {buffered} bytes for two clients (bound {bound})"
        );
        if stats["sseClients"] == 1 {
            break; // the slow client's stream ended; the fast one goes on
        }
        if buffered >= (BUDGET / 2) as u64 {
            // A queue is filling: the slow client's (it stays full until the stall
            // ends it) or the fast one's (it drains). Wait rather than publish more.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        for _ in 0..20 {
            let n = published.len();
            published.push(
                gw.publish(
                    BILLING,
                    json!({ "action": "reload", "query": { "n": n, "pad": pad } }),
                )
                .await,
            );
        }
        assert!(
            published.len() < 4000,
            "the slow client never filled its buffer ({} messages)",
            published.len()
        );
    }
    // It fell behind: what was queued for it is dropped at once, before it reads
    // anything; only its `lagged` notice waits (and the fast client drains its own).
    eventually("the slow client's buffer dropped", || async {
        let buffered = gw.get("/stats", ADMIN).await.1["sseBufferedBytes"].as_u64();
        buffered.is_some_and(|b| b < 4096)
    })
    .await;
    // When it reads at last, it gets what its socket held, then `lagged`, then the end.
    let slow_reader = tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut last_id = None;
        loop {
            let event = slow.expect("the slow client's stream").await;
            match event.event.as_str() {
                "message" => {
                    seen.push(event.json()["id"].as_str().unwrap_or_default().to_string());
                    last_id = event.id.clone();
                }
                "lagged" => {
                    assert_eq!(event.json()["code"], "fell_behind");
                    break;
                }
                other => panic!("unexpected `{other}` event: {event:?}"),
            }
        }
        let after = tokio::time::timeout(GUARD, slow.next())
            .await
            .expect("the end of the slow stream");
        assert!(after.is_none(), "the stream ends after `lagged`: {after:?}");
        (seen, last_id)
    });
    gw.publish(
        BILLING,
        json!({ "action": "reload", "query": { "last": true } }),
    )
    .await;
    let fast_ids = tokio::time::timeout(GUARD, reader)
        .await
        .expect("the fast client: hang guard")
        .expect("the fast client's task");
    assert_eq!(
        fast_ids, published,
        "the fast client got everything, in order"
    );
    let (seen, last_id) = tokio::time::timeout(GUARD, slow_reader)
        .await
        .expect("the slow client: hang guard")
        .expect("the slow client's task");
    eprintln!(
        "slow client: told it fell behind after {} of {} messages; the gateway held at most {most} bytes",
        seen.len(),
        published.len()
    );
    assert!(
        seen.len() < published.len(),
        "the gateway kept only a bounded amount for the slow client ({} of {})",
        seen.len(),
        published.len()
    );
    assert_eq!(
        seen,
        published[..seen.len()],
        "what it got, it got in order"
    );

    // It resumes where it stopped, with no gap.
    let mut resumed = gw
        .subscribe("/subscribe/reload", USERS, last_id.as_deref())
        .await;
    for expected in &published[seen.len()..] {
        assert_eq!(
            &resumed.message("the resumed slow client").await.1["id"],
            expected
        );
    }
    assert_eq!(resumed.message("the marker").await.1["query"]["last"], true);
    gw.stop().await;
}

/// At most `max_sse_clients` streams at once: one more gets 503 `busy`, and a stream
/// that ends frees its place.
async fn sse_streams_are_limited_and_freed(place: &Place) {
    let gw = Gw::with(place, GatewayOptions::default().max_sse_clients(1)).await;
    let path = "/subscribe/reload";
    let first = gw.subscribe(path, USERS, None).await;
    // Only the status is read: a stream that opens never ends by itself.
    let status = || async {
        let response =
            tokio::time::timeout(GUARD, gw.http.get(gw.url(path)).bearer_auth(BILLING).send())
                .await
                .expect("an answer within the hang guard")
                .expect("an answer");
        let status = response.status();
        let body = if status == StatusCode::OK {
            Value::Null
        } else {
            response.json::<Value>().await.unwrap_or(Value::Null)
        };
        (status, body)
    };
    let (code, body) = status().await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["code"], "busy", "{body}");
    drop(first);
    eventually("the ended stream's place is free again", || async {
        status().await.0 == StatusCode::OK
    })
    .await;
    gw.stop().await;
}

async fn a_takeover_tells_the_old_stream(place: &Place) {
    let gw = Gw::start(place).await;
    let path = "/subscribe/reload?name=desk";
    let mut old = gw.subscribe(path, USERS, None).await;
    let mut new = gw.subscribe(path, USERS, None).await;
    let event = old.expect("the old stream's last event").await;
    assert_eq!(event.event, "superseded", "{event:?}");
    assert_eq!(event.json()["code"], "superseded");
    let after = tokio::time::timeout(GUARD, old.next())
        .await
        .expect("the end of the old stream");
    assert!(after.is_none(), "the old stream ends: {after:?}");
    let id = gw.publish(BILLING, json!({ "action": "reload" })).await;
    assert_eq!(new.message("the new stream").await.1["id"], id.as_str());
    gw.stop().await;
}

/// The latency figure covers live deliveries only: a replay's backlog has an age.
async fn latency_counts_live_deliveries(place: &Place) {
    let gw = Gw::start(place).await;
    for n in 0..3 {
        gw.publish(BILLING, json!({ "action": "reload", "query": { "n": n } }))
            .await;
    }
    // The clocks move on past the backlog's stamps (ms), and past the connection's.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut sub = gw
        .subscribe("/subscribe/reload?from=beginning", USERS, None)
        .await;
    for n in 0..3 {
        assert_eq!(sub.message("the backlog").await.1["query"]["n"], n);
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let live = gw.publish(BILLING, json!({ "action": "reload" })).await;
    assert_eq!(sub.message("the live one").await.1["id"], live.as_str());
    let latency = gw.get("/stats", ADMIN).await.1["latency"].clone();
    assert_eq!(latency["delivered"], 1, "{latency}");
    assert_eq!(latency["samples"], 1, "{latency}");
    gw.stop().await;
}

async fn named_subscriptions_resume_after_their_acks(place: &Place) {
    let gw = Gw::start(place).await;
    let path = "/subscribe/reload?name=users-inbox";
    let mut sub = gw.subscribe(path, USERS, None).await;
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(
            gw.publish(BILLING, json!({ "action": "reload", "query": { "n": n } }))
                .await,
        );
    }
    for id in &ids {
        assert_eq!(&sub.message("a named delivery").await.1["id"], id);
    }
    let ack = |id: &str| format!("/ack/{id}?subscription=users-inbox");
    let (status, acked) = gw.post(&ack(&ids[0]), USERS, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{acked}");
    assert_eq!(acked["id"], ids[0].as_str());
    assert_eq!(
        gw.post(&ack(&ids[1]), USERS, json!({})).await.0,
        StatusCode::OK
    );
    refused(
        gw.post(&ack(&ids[1]), USERS, json!({})).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    // Names belong to the token's service: billing has no `users-inbox` streaming.
    refused(
        gw.post(&ack(&ids[2]), BILLING, json!({})).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    refused(
        gw.post(
            &format!("/ack/{}?subscription=elsewhere", ids[2]),
            USERS,
            json!({}),
        )
        .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    refused(
        gw.post(&format!("/ack/{}", ids[2]), USERS, json!({})).await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    drop(sub);

    // The checkpoint is after the second: the unacked third comes again, first.
    let mut again = gw.subscribe(path, USERS, None).await;
    assert_eq!(
        again.message("the unacked message").await.1["id"],
        ids[2].as_str()
    );
    assert_eq!(
        gw.post(&ack(&ids[2]), USERS, json!({})).await.0,
        StatusCode::OK
    );
    let stats = gw.get("/stats", ADMIN).await.1;
    assert!(
        stats["lag"]
            .as_array()
            .is_some_and(|lag| lag.iter().any(|l| l["subscription"] == "users/users-inbox")),
        "the console sees the subscription's lag: {stats}"
    );
    gw.stop().await;
}

/// A named monitor stream with a `service` filter: the messages the filter drops do
/// not hold its checkpoint back (they were recorded for an ack that never comes).
async fn a_named_monitor_checkpoint_passes_what_its_filter_drops(place: &Place) {
    let gw = Gw::start(place).await;
    let path = "/subscribe/*?monitor=true&service=billing&name=audit";
    let ack = |id: &str| format!("/ack/{id}?subscription=audit");
    let reload = |n: i32| json!({ "action": "reload", "query": { "n": n } });
    let mut sub = gw.subscribe(path, OPS, None).await;
    let m0 = gw.publish(BILLING, reload(0)).await;
    assert_eq!(sub.message("billing's first").await.1["id"], m0.as_str());
    assert_eq!(gw.post(&ack(&m0), OPS, json!({})).await.0, StatusCode::OK);
    // Not billing's: the filter drops it.
    gw.publish(USERS, json!({ "action": "user.deleted", "query": {} }))
        .await;
    let m1 = gw.publish(BILLING, reload(1)).await;
    assert_eq!(sub.message("billing's second").await.1["id"], m1.as_str());
    assert_eq!(gw.post(&ack(&m1), OPS, json!({})).await.0, StatusCode::OK);
    drop(sub);

    // The checkpoint is after m1 (not after m0, where the dropped message held it):
    // the next message is a new one, not m1 again.
    let mut again = gw.subscribe(path, OPS, None).await;
    let m2 = gw.publish(BILLING, reload(2)).await;
    assert_eq!(
        again.message("after the checkpoint").await.1["id"],
        m2.as_str()
    );
    gw.stop().await;
}

async fn a_subscription_name_belongs_to_its_service(place: &Place) {
    let gw = Gw::start(place).await;
    let path = "/subscribe/reload?name=inbox";
    let reload = |n: i32| json!({ "action": "reload", "query": { "n": n } });
    let ack = |id: &str| format!("/ack/{id}?subscription=inbox");

    // users reads two messages and acks the first, then goes away.
    let mut users = gw.subscribe(path, USERS, None).await;
    let m0 = gw.publish(BILLING, reload(0)).await;
    let m1 = gw.publish(BILLING, reload(1)).await;
    assert_eq!(users.message("m0").await.1["id"], m0.as_str());
    assert_eq!(users.message("m1").await.1["id"], m1.as_str());
    assert_eq!(gw.post(&ack(&m0), USERS, json!({})).await.0, StatusCode::OK);
    drop(users);
    eventually("users' stream closed", || async {
        gw.get("/stats", ADMIN).await.1["sseClients"] == 0
    })
    .await;

    // billing opens the same name: a subscription of its own, starting now, not
    // users' checkpoint (which would give m1 first).
    let mut billing = gw.subscribe(path, BILLING, None).await;
    let m2 = gw.publish(BILLING, reload(2)).await;
    assert_eq!(
        billing.message("billing's first").await.1["id"],
        m2.as_str(),
        "billing did not resume from users' checkpoint"
    );
    refused(
        gw.post(&ack(&m1), BILLING, json!({})).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_eq!(
        gw.post(&ack(&m2), BILLING, json!({})).await.0,
        StatusCode::OK
    );

    // users comes back while billing still holds `inbox`: no conflict, and its
    // checkpoint did not move: m1 (unacked), then m2.
    let mut users = gw.subscribe(path, USERS, None).await;
    assert_eq!(users.message("m1 again").await.1["id"], m1.as_str());
    assert_eq!(users.message("m2").await.1["id"], m2.as_str());
    let lag = gw.get("/stats", ADMIN).await.1["lag"].clone();
    for name in ["users/inbox", "billing/inbox"] {
        assert!(
            lag.as_array()
                .is_some_and(|l| l.iter().any(|l| l["subscription"] == name)),
            "{name} in {lag}"
        );
    }
    drop(billing);
    gw.stop().await;
}

fn queue<'a>(queues: &'a Value, id: &str) -> &'a Value {
    queues
        .as_array()
        .and_then(|q| q.iter().find(|q| q["id"] == id))
        .unwrap_or_else(|| panic!("no queue {id} in {queues}"))
}

async fn queues_and_dead_letters(place: &Place) {
    let gw = Gw::start(place).await;
    let (status, created) = gw
        .post(
            "/queues/create",
            ADMIN,
            json!({ "service": "users", "action": "user.export" }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["id"], "users/user.export");
    let catalog = gw.get("/catalog", USERS).await.1;
    assert!(catalog.to_string().contains("user.export"), "{catalog}");

    let job = json!({ "to": "users", "action": "user.export", "work": true });
    for _ in 0..3 {
        gw.publish(BILLING, job.clone()).await;
    }
    let queues = gw.get("/queues", ADMIN).await.1;
    let q = queue(&queues, "users/user.export");
    assert_eq!(
        (q["depth"].as_u64(), q["inFlight"].as_u64()),
        (Some(3), Some(0)),
        "{q}"
    );
    let (status, purged) = gw.delete("/queues/users/user.export", ADMIN).await;
    assert_eq!(status, StatusCode::OK, "{purged}");
    assert_eq!(purged["purged"], 3);
    let queues = gw.get("/queues", ADMIN).await.1;
    assert_eq!(queue(&queues, "users/user.export")["depth"], 0);

    // A job that fails for good lands in the dead letters.
    let users = gw.peer("users").await;
    let failing = || {
        users
            .work(
                "users",
                &["user.export"],
                WorkOptions::default()
                    .max_attempts(1)
                    .poll(Duration::from_millis(50)),
                |_job| async { Err::<(), _>("export failed") },
            )
            .expect("worker")
    };
    let worker = failing();
    let dead_id = gw.publish(BILLING, job.clone()).await;
    eventually("the failed job in the dead letters", || async {
        gw.get(&format!("/dead/{dead_id}"), ADMIN).await.0 == StatusCode::OK
    })
    .await;
    worker.stop().await;
    let letter = gw.get(&format!("/dead/{dead_id}"), ADMIN).await.1;
    assert!(
        letter["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("export failed"),
        "{letter}"
    );
    assert_eq!(letter["action"], "user.export");
    // A limit is 1 to 10 000; every medium lists nothing for 0 (MongoDB's
    // `.limit(0)` would mean "no limit").
    for limit in [0, 10_001] {
        refused(
            gw.get(&format!("/dead?limit={limit}"), ADMIN).await,
            StatusCode::BAD_REQUEST,
            "bad_request",
        );
    }
    let none = gw.bus.dead_letters().list(0).await.expect("list(0)");
    assert!(none.is_empty(), "list(0) gave {} dead letters", none.len());
    assert_eq!(
        gw.get("/dead?limit=1", ADMIN)
            .await
            .1
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    let listed = gw.get("/dead?limit=10", ADMIN).await.1;
    assert!(listed
        .as_array()
        .is_some_and(|l| l.iter().any(|d| d["id"] == dead_id.as_str())));
    assert_eq!(
        queue(&gw.get("/queues", ADMIN).await.1, "users/user.export")["dead"],
        1
    );

    let (status, retried) = gw
        .post(&format!("/retry/{dead_id}"), ADMIN, json!({}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{retried}");
    assert_eq!(retried["retryOf"], dead_id.as_str());
    assert_ne!(retried["id"], dead_id.as_str());
    refused(
        gw.get(&format!("/dead/{dead_id}"), ADMIN).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    refused(
        gw.post(&format!("/retry/{dead_id}"), ADMIN, json!({}))
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    let q = gw.get("/queues", ADMIN).await.1;
    assert_eq!(
        queue(&q, "users/user.export")["depth"],
        1,
        "the retried job waits: {q}"
    );

    // It fails again: purge that dead letter, then everything.
    let worker = failing();
    let retried_id = retried["id"].as_str().unwrap_or_default().to_string();
    eventually("the retried job in the dead letters", || async {
        gw.get(&format!("/dead/{retried_id}"), ADMIN).await.0 == StatusCode::OK
    })
    .await;
    worker.stop().await;
    refused(
        gw.delete("/dead/nope", ADMIN).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_eq!(
        gw.delete(&format!("/dead/{retried_id}"), ADMIN).await.1["removed"],
        1
    );
    assert_eq!(gw.delete("/dead", ADMIN).await.1["removed"], 0);
    users.shutdown().await;
    gw.stop().await;
}

async fn idempotency_store(place: &Place) {
    let gw = Gw::start(place).await;
    let mark = |result: i32| json!({ "consumer": "ledger", "messageId": "m-1", "result": { "n": result } });
    let (status, record) = gw.post("/idempotency", ADMIN, mark(1)).await;
    assert_eq!(status, StatusCode::CREATED, "{record}");
    assert_eq!(record["state"], "done");
    assert_eq!(record["result"], json!({ "n": 1 }));
    assert!(record["timestamp"].is_string(), "{record}");
    let (status, again) = gw.post("/idempotency", ADMIN, mark(2)).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["result"], json!({ "n": 1 }), "the first record stays");
    let (status, found) = gw.get("/idempotency/m-1?consumer=ledger", ADMIN).await;
    assert_eq!(
        (status, &found["messageId"]),
        (StatusCode::OK, &json!("m-1"))
    );
    refused(
        gw.get("/idempotency/m-1?consumer=other", ADMIN).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    refused(
        gw.get("/idempotency/m-1", ADMIN).await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );

    // The library's run-once agrees with the store.
    let ledger = gw.bus.idempotent("ledger");
    let once = ledger
        .run_once("m-1", || async { Ok::<_, intracom::Error>(5) })
        .await
        .expect("run_once");
    assert_eq!(once, Once::AlreadyDone(Some(doc! { "n": 1 })));
    let (status, removed) = gw.delete("/idempotency/m-1?consumer=ledger", ADMIN).await;
    assert_eq!((status, &removed["removed"]), (StatusCode::OK, &json!(1)));
    refused(
        gw.get("/idempotency/m-1?consumer=ledger", ADMIN).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    refused(
        gw.delete("/idempotency/m-1?consumer=ledger", ADMIN).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    let once = ledger
        .run_once("m-1", || async { Ok::<_, intracom::Error>(5) })
        .await
        .expect("run_once");
    assert_eq!(once, Once::Ran(5), "forgotten: it runs again");

    // A service token: the records of its own consumers only (`billing`,
    // `billing.<name>`), and an owner's reservation, completion and release.
    let reserve = |consumer: &str, owner: &str| json!({ "consumer": consumer, "owner": owner, "leaseMs": 60_000 });
    refused(
        gw.post(
            "/idempotency/m-2/reservation",
            BILLING,
            reserve("ledger", "a"),
        )
        .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    refused(
        gw.get("/idempotency/m-1?consumer=billingx", BILLING).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    let (status, first) = gw
        .post(
            "/idempotency/m-2/reservation",
            BILLING,
            reserve("billing.ledger", "a"),
        )
        .await;
    assert_eq!(
        (status, &first["reservation"]),
        (StatusCode::OK, &json!("reserved")),
        "{first}"
    );
    let (_, second) = gw
        .post(
            "/idempotency/m-2/reservation",
            BILLING,
            reserve("billing.ledger", "b"),
        )
        .await;
    assert_eq!(
        second["reservation"], "busy",
        "one owner at a time: {second}"
    );
    let (status, _) = gw
        .delete("/idempotency/m-2?consumer=billing.ledger&owner=b", BILLING)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, still) = gw
        .post(
            "/idempotency/m-2/reservation",
            BILLING,
            reserve("billing.ledger", "b"),
        )
        .await;
    assert_eq!(
        still["reservation"], "busy",
        "b's release does not free a's: {still}"
    );
    let (status, done) = gw
        .post(
            "/idempotency",
            BILLING,
            json!({ "consumer": "billing.ledger", "messageId": "m-2", "owner": "a", "result": { "n": 7 } }),
        )
        .await;
    assert_eq!(
        (status, &done["state"]),
        (StatusCode::CREATED, &json!("done")),
        "{done}"
    );
    let (_, found) = gw
        .post(
            "/idempotency/m-2/reservation",
            BILLING,
            reserve("billing.ledger", "c"),
        )
        .await;
    assert_eq!(
        found,
        json!({ "reservation": "done", "result": { "n": { "$numberInt": "7" } } }),
        "canonical extended JSON: the types the handler returned"
    );
    let (_, seen) = gw
        .get("/idempotency/m-2?consumer=billing.ledger", ADMIN)
        .await;
    assert_eq!(
        seen["state"], "done",
        "an admin token sees every record: {seen}"
    );
    refused(
        gw.post(
            "/idempotency",
            BILLING,
            json!({ "consumer": "billing.ledger", "messageId": "m-3", "owner": "z" }),
        )
        .await,
        StatusCode::CONFLICT,
        "reservation_lost",
    );
    gw.stop().await;
}
