//! The smaller points of a gateway under hostile or careless clients: an
//! `Idempotency-Key` reused for another request, a request whose client went away,
//! integers JSON has and BSON has not, names with invisible characters, the headers
//! every response carries, unknown tokens counted.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use intracom::bson::Document;
use intracom::gateway::{Gateway, Tls};
use intracom::Intracom;
use libtest_mimic::Trial;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{
    block_on, check, config, eventually, tokens, Check, Gw, Place, ADMIN, BILLING, GUARD, USERS,
};

/// The checks of this file that run on every place.
pub fn checks() -> Vec<Check> {
    vec![
        check!(an_idempotency_key_reused_for_another_request_is_refused),
        check!(a_request_whose_client_left_is_abandoned_not_run),
        check!(integers_beyond_64_bits_are_refused),
        check!(names_with_invisible_characters_are_refused),
        check!(every_response_carries_the_security_headers),
    ]
}

/// The checks of this file on the memory medium only.
pub fn trials() -> Vec<Trial> {
    vec![
        Trial::test("memory::hsts_over_https_only", || {
            block_on(hsts_over_https_only())
        }),
        Trial::test("memory::unknown_tokens_are_counted", || {
            block_on(unknown_tokens_are_counted())
        }),
    ]
}

/// POST `body` (raw text) to `path` with `token` and optional headers.
async fn post_raw(
    gw: &Gw,
    path: &str,
    token: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, Value) {
    let mut request = gw
        .http
        .post(gw.url(path))
        .bearer_auth(token)
        .header("Content-Type", "application/json")
        .body(body.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = tokio::time::timeout(GUARD, request.send())
        .await
        .expect("hang guard")
        .expect("an answer");
    let status = response.status();
    let bytes = response.bytes().await.unwrap_or_default();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn keyed(gw: &Gw, key: &str, body: Value) -> (StatusCode, Value) {
    post_raw(
        gw,
        "/publish",
        BILLING,
        &[("Idempotency-Key", key)],
        &body.to_string(),
    )
    .await
}

async fn an_idempotency_key_reused_for_another_request_is_refused(place: &Place) {
    let gw = Gw::start(place).await;
    let key = "reload-tenant-7";
    let body = json!({ "action": "reload", "query": { "tenant": 7, "region": "eu" } });
    let (status, first) = keyed(&gw, key, body.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");

    // A second gateway of the same bus: what a key was used for is kept on the medium,
    // not in the gateway that stored it.
    let other_bus = gw.peer("gateway").await;
    let other = Gw::over(Gateway::new(other_bus.clone(), tokens()), other_bus, None);
    for (who, gateway) in [("the same gateway", &gw), ("another gateway", &other)] {
        // The same request again (its object's keys in another order): a duplicate.
        let same = json!({ "query": { "region": "eu", "tenant": 7 }, "action": "reload" });
        let (status, again) = keyed(gateway, key, same).await;
        assert_eq!(
            (status, &again["status"], &again["id"]),
            (StatusCode::OK, &json!("duplicate"), &first["id"]),
            "{who}: {again}"
        );
        // Another payload, another action, another target or priority: refused.
        for changed in [
            json!({ "action": "reload", "query": { "tenant": 8, "region": "eu" } }),
            json!({ "action": "marker", "query": { "tenant": 7, "region": "eu" } }),
            json!({ "action": "reload", "query": { "tenant": 7, "region": "eu" }, "priority": 1 }),
            json!({ "action": "reload" }),
        ] {
            let (status, refused) = keyed(gateway, key, changed.clone()).await;
            assert_eq!(
                status,
                StatusCode::UNPROCESSABLE_ENTITY,
                "{who}, {changed}: {refused}"
            );
            assert_eq!(refused["code"], "idempotency_key_reused", "{refused}");
        }
    }
    // Nothing of the refused requests was sent: a monitor from the start sees the one
    // message and the marker, and nothing else before a second marker. (On servers that
    // stamp every write of a second alike, a catch-up delivers a second's messages in id
    // order: the key's id may come after the first marker's.)
    let mut monitor = gw
        .subscribe("/subscribe/*?monitor=true&from=beginning", ADMIN, None)
        .await;
    let marker = gw.publish(BILLING, json!({ "action": "marker" })).await;
    let mut seen = Vec::new();
    while !(seen.iter().any(|(id, _)| *id == marker.as_str())
        && seen.iter().any(|(id, _)| *id == first["id"]))
    {
        let (_, m) = monitor.message("the messages").await;
        seen.push((m["id"].clone(), m["query"].clone()));
    }
    let last = gw.publish(BILLING, json!({ "action": "marker" })).await;
    loop {
        let (_, m) = monitor.message("the messages").await;
        if m["id"] == last.as_str() {
            break;
        }
        seen.push((m["id"].clone(), m["query"].clone()));
    }
    seen.retain(|(id, _)| *id != marker.as_str());
    assert_eq!(
        seen,
        [(first["id"].clone(), json!({ "tenant": 7, "region": "eu" }))]
    );
    other.stop().await;
    gw.stop().await;
}

async fn a_request_whose_client_left_is_abandoned_not_run(place: &Place) {
    let gw = Gw::start(place).await;
    let billing = gw.peer("billing").await;
    let depth = |bus: Intracom| async move {
        let queues = bus
            .medium()
            .inspection()
            .expect("queue counts")
            .queues()
            .await
            .expect("the queues");
        queues
            .iter()
            .find(|q| q.service == "billing" && q.action == "invoice.get")
            .map_or(0, |q| q.depth + q.in_flight)
    };

    // A client sends a request no worker serves yet, then goes away.
    let address = gw.base.trim_start_matches("http://").to_string();
    let mut client = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    let body = r#"{"invoice": 1}"#;
    let request = format!(
        "POST /request/billing/invoice.get?timeout_ms=300000 HTTP/1.1\r\nHost: {address}\r\n\
         Authorization: Bearer {USERS}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    client
        .write_all(request.as_bytes())
        .await
        .expect("the request");
    eventually("the request waits in billing's queue", || {
        let bus = billing.clone();
        async move { depth(bus).await == 1 }
    })
    .await;
    drop(client);
    // Marked abandoned (state: error) well before its own time-out of 5 minutes.
    eventually("the abandoned request leaves the queue", || {
        let bus = billing.clone();
        async move { depth(bus).await == 0 }
    })
    .await;

    // A worker that starts now runs only the request that still has a caller.
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&runs);
    let worker = billing
        .serve("billing", "invoice.get", move |q: Document| {
            let counted = Arc::clone(&counted);
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                Ok::<_, String>(q)
            }
        })
        .expect("worker");
    let (status, answer) = gw
        .post(
            "/request/billing/invoice.get",
            USERS,
            json!({ "invoice": 2 }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["result"]["invoice"], 2, "{answer}");
    assert_eq!(depth(billing.clone()).await, 0);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the abandoned request was not run"
    );
    worker.stop().await;
    billing.shutdown().await;
    gw.stop().await;
}

async fn integers_beyond_64_bits_are_refused(place: &Place) {
    let gw = Gw::start(place).await;
    for number in [
        "18446744073709551615",
        "9223372036854775808",
        "-9223372036854775809",
        "1000000000000000000000000000000",
    ] {
        let body = format!(r#"{{"action": "reload", "query": {{"n": {number}}}}}"#);
        let (status, answer) = post_raw(&gw, "/publish", BILLING, &[], &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{number}: {answer}");
        assert!(
            answer["message"]
                .as_str()
                .is_some_and(|m| m.contains("64-bit")),
            "{number}: {answer}"
        );
        let body = format!(r#"{{"n": [{number}]}}"#);
        let (status, answer) =
            post_raw(&gw, "/request/billing/invoice.get", USERS, &[], &body).await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "request {number}: {answer}"
        );
    }
    // The extremes of i64 are integers, and a float written as one stays a float.
    let mut monitor = gw
        .subscribe("/subscribe/reload?monitor=true", ADMIN, None)
        .await;
    let body = r#"{"action": "reload", "query": {"max": 9223372036854775807, "min": -9223372036854775808, "f": 1e30, "g": 18446744073709551615.0}}"#;
    let (status, answer) = post_raw(&gw, "/publish", BILLING, &[], body).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    let (_, m) = monitor.message("the message").await;
    assert_eq!(m["query"]["max"], json!(i64::MAX), "{m}");
    assert_eq!(m["query"]["min"], json!(i64::MIN), "{m}");
    assert_eq!(m["query"]["f"], json!(1e30), "{m}");
    assert_eq!(m["query"]["g"], json!(18446744073709551615.0), "{m}");
    gw.stop().await;
}

async fn names_with_invisible_characters_are_refused(place: &Place) {
    let gw = Gw::start(place).await;
    for c in [
        '\u{200B}', '\u{200D}', '\u{202E}', '\u{2066}', '\u{2069}', '\u{FEFF}',
    ] {
        let name = format!("bill{c}ing");
        let (status, answer) = gw
            .post("/publish", USERS, json!({ "to": name, "action": "reload" }))
            .await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "U+{:04X}: {answer}",
            u32::from(c)
        );
        assert!(
            answer["message"]
                .as_str()
                .is_some_and(|m| m.contains("invisible or format character")),
            "{answer}"
        );
        let encoded: String = name
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let (status, answer) = gw
            .post(&format!("/request/{encoded}/invoice.get"), USERS, json!({}))
            .await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "request to {name:?}: {answer}"
        );
    }
    gw.stop().await;
}

/// Asserts the headers every API answer carries.
fn api_headers(what: &str, headers: &reqwest::header::HeaderMap) {
    assert_eq!(
        headers.get("x-content-type-options").map(|v| v.as_bytes()),
        Some(&b"nosniff"[..]),
        "{what}: {headers:?}"
    );
    assert_eq!(
        headers.get("cache-control").map(|v| v.as_bytes()),
        Some(&b"no-store"[..]),
        "{what}: {headers:?}"
    );
    assert!(
        headers.get("strict-transport-security").is_none(),
        "{what}: no HSTS over plain HTTP: {headers:?}"
    );
}

async fn every_response_carries_the_security_headers(place: &Place) {
    let gw = Gw::start(place).await;
    let get = |path: &str, token: Option<&str>| {
        let mut request = gw.http.get(gw.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    for (path, token, status) in [
        ("/healthz", None, StatusCode::OK),
        ("/metrics", None, StatusCode::OK),
        ("/openapi.json", None, StatusCode::OK),
        ("/catalog", Some(BILLING), StatusCode::OK),
        ("/catalog", None, StatusCode::UNAUTHORIZED),
        ("/catalog", Some("not-a-token"), StatusCode::UNAUTHORIZED),
        ("/stats", Some(BILLING), StatusCode::FORBIDDEN),
        ("/no/such/route", None, StatusCode::NOT_FOUND),
    ] {
        let response = get(path, token).await.expect("an answer");
        assert_eq!(response.status(), status, "{path}");
        api_headers(path, response.headers());
    }
    let response = gw
        .http
        .post(gw.url("/publish"))
        .bearer_auth(BILLING)
        .json(&json!({ "action": "reload" }))
        .send()
        .await
        .expect("publish");
    assert_eq!(response.status(), StatusCode::CREATED);
    api_headers("POST /publish", response.headers());
    let response = gw
        .http
        .post(gw.url("/publish"))
        .bearer_auth(BILLING)
        .body("{")
        .send()
        .await
        .expect("bad JSON");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    api_headers("bad JSON", response.headers());
    // An event stream is not stored either.
    let response = get("/subscribe/reload", Some(BILLING))
        .await
        .expect("subscribe");
    assert_eq!(response.status(), StatusCode::OK);
    api_headers("/subscribe", response.headers());
    drop(response);
    // The console's assets may be kept and revalidated, and are not sniffed.
    for path in ["/", "/console/app.js", "/console/style.css"] {
        let response = get(path, None).await.expect("an asset");
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let headers = response.headers();
        assert_eq!(
            headers.get("x-content-type-options").map(|v| v.as_bytes()),
            Some(&b"nosniff"[..]),
            "{path}"
        );
        assert_eq!(
            headers.get("cache-control").map(|v| v.as_bytes()),
            Some(&b"no-cache"[..]),
            "{path}"
        );
    }
    gw.stop().await;
}

async fn hsts_over_https_only() {
    use tokio_rustls::rustls;

    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
        .expect("a self-signed certificate");
    let dir = tempfile::tempdir().expect("a directory");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).expect("cert.pem");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("key.pem");
    let bus = Intracom::connect(config("gateway")).await.expect("bus");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let address = listener.local_addr().expect("its address");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(Gateway::new(bus.clone(), tokens()).serve(
        listener,
        Some(Tls::new(&cert, &key)),
        async move {
            let _ = stopped.await;
        },
    ));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).expect("the root");
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    for (path, token) in [
        ("/healthz", None),
        ("/catalog", Some("not-a-token")),
        ("/", None),
    ] {
        let tcp = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
        let mut tls = tokio::time::timeout(GUARD, connector.connect(name, tcp))
            .await
            .expect("handshake: hang guard")
            .expect("the TLS handshake");
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n");
        tls.write_all(request.as_bytes()).await.expect("write");
        let mut answer = Vec::new();
        tokio::time::timeout(GUARD, tls.read_to_end(&mut answer))
            .await
            .expect("read: hang guard")
            .expect("read");
        let answer = String::from_utf8_lossy(&answer).to_lowercase();
        let head = answer.split("\r\n\r\n").next().unwrap_or_default();
        assert!(
            head.contains("\r\nstrict-transport-security: max-age=31536000"),
            "{path}: {head}"
        );
        assert!(
            head.contains("\r\nx-content-type-options: nosniff"),
            "{path}: {head}"
        );
    }
    let _ = stop.send(());
    tokio::time::timeout(GUARD, server)
        .await
        .expect("stop: hang guard")
        .expect("the server task")
        .expect("served");
    bus.shutdown().await;
}

/// The value of the counter `name` (without labels) in a Prometheus text.
fn counter(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| {
            let (key, value) = line.split_once(' ')?;
            (key == name).then(|| value.trim().parse::<f64>().ok())?
        })
        .map_or(0, |v| v as u64)
}

async fn unknown_tokens_are_counted() {
    let gw = Gw::start(&Place::Memory).await;
    let metrics = || async {
        let response = gw
            .http
            .get(gw.url("/metrics"))
            .send()
            .await
            .expect("metrics");
        assert_eq!(response.status(), StatusCode::OK);
        response.text().await.expect("the text")
    };
    let name = "intracom_gateway_unknown_tokens_total";
    let before = counter(&metrics().await, name);
    for i in 0..40 {
        let (status, _) = gw.get("/catalog", &format!("guessed-token-{i}")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    // Other tests of this process may add theirs: at least these 40.
    let after = counter(&metrics().await, name);
    assert!(after >= before + 40, "{name}: {before} then {after}");
    gw.stop().await;
}
