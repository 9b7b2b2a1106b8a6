//! The checks on the memory medium only, several with an outside tool: the MessageStore
//! over the outbox of a medium that goes down, TLS, the `intracom serve` command,
//! schemathesis over the OpenAPI document, the web console in a headless chromium, the
//! Node.js example.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use intracom::bson::{self, doc, Document};
use intracom::gateway::{Gateway, GatewayOptions, Tls};
use intracom::{Intracom, Message};
use libtest_mimic::Trial;
use reqwest::StatusCode;
use serde_json::{json, Value};

use super::flaky::{Flaky, FlakyMedium};
use super::servers::{cache_dir, spawn_kept};
use super::{block_on, config, eventually, tokens, Gw, Place, ADMIN, BILLING, GUARD, OPS, USERS};

/// The trials of this file; a missing tool makes its trial ignored with the reason.
pub fn trials() -> Vec<Trial> {
    let mut trials = vec![
        Trial::test("memory::message_store_over_the_outbox", || {
            block_on(message_store_over_the_outbox())
        }),
        Trial::test("memory::a_message_being_sent_is_not_removed", || {
            block_on(a_message_being_sent_is_not_removed())
        }),
        Trial::test("memory::a_dead_letter_retried_twice_is_sent_once", || {
            block_on(a_dead_letter_retried_twice_is_sent_once())
        }),
        Trial::test("memory::metric_labels_stay_bounded", || {
            block_on(metric_labels_stay_bounded())
        }),
        Trial::test(
            "memory::an_ack_whose_save_failed_is_saved_when_sent_again",
            || block_on(an_ack_whose_save_failed_is_saved_when_sent_again()),
        ),
        Trial::test("memory::a_late_reconnect_is_told_what_was_lost", || {
            block_on(a_late_reconnect_is_told_what_was_lost())
        }),
        Trial::test(
            "memory::https_with_rustls",
            || block_on(https_with_rustls()),
        ),
        Trial::test("memory::intracom_serve_and_token_commands", || {
            block_on(intracom_serve_and_token_commands())
        }),
        Trial::test(
            "memory::an_instance_too_long_to_derive_from_is_refused_at_start",
            || block_on(an_instance_too_long_to_derive_from_is_refused_at_start()),
        ),
    ];
    trials.push(with_tool(
        "memory::openapi_survives_schemathesis",
        schemathesis(),
        |st| block_on(openapi_survives_schemathesis(st)),
    ));
    trials.push(with_tool(
        "memory::console_in_headless_chromium",
        node().and_then(|node| Ok((node, chromium()?, playwright()?))),
        |tools| block_on(console_in_headless_chromium(tools)),
    ));
    trials.push(with_tool("memory::node_example", node(), |node| {
        block_on(node_example(node))
    }));
    trials
}

fn with_tool<T: Send + 'static>(
    name: &str,
    tool: Result<T, String>,
    run: impl FnOnce(T) -> Result<(), libtest_mimic::Failed> + Send + 'static,
) -> Trial {
    match tool {
        Ok(tool) => Trial::test(name, move || run(tool)),
        Err(reason) => Trial::test(name, || Ok(()))
            .with_ignored_flag(true)
            .with_kind(reason),
    }
}

/// A tool named by an environment variable, or found at its place in the cache.
fn tool(env: &str, cached: &str, what: &str) -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.exists() {
            Ok(path)
        } else {
            Err(format!(
                "{env} names {}, which does not exist",
                path.display()
            ))
        };
    }
    let path = cache_dir()
        .map(|c| c.join(cached))
        .ok_or_else(|| "HOME is not set".to_string())?;
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "{what} not installed at {}: scripts/test installs it",
            path.display()
        ))
    }
}

/// A program on the PATH.
fn on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|path| path.is_file())
    })
}

fn schemathesis() -> Result<PathBuf, String> {
    tool(
        "INTRACOM_SCHEMATHESIS",
        "schemathesis/bin/st",
        "schemathesis",
    )
}

fn playwright() -> Result<PathBuf, String> {
    tool(
        "INTRACOM_PLAYWRIGHT",
        "node/node_modules/playwright-core",
        "playwright-core",
    )
}

fn chromium() -> Result<PathBuf, String> {
    match std::env::var_os("INTRACOM_CHROMIUM").filter(|p| !p.is_empty()) {
        Some(path) => Ok(PathBuf::from(path)),
        None => on_path("chromium")
            .ok_or_else(|| "no chromium on the PATH (scripts/test installs Debian's)".into()),
    }
}

fn node() -> Result<PathBuf, String> {
    on_path("node")
        .ok_or_else(|| "no node on the PATH (scripts/test installs Debian's nodejs)".into())
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Runs a program to its end within the hang guard; its status, stdout and stderr.
async fn run(mut command: Command) -> (std::process::ExitStatus, String, String) {
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    let child = spawn_kept(command).expect("start the program");
    let output = tokio::time::timeout(
        GUARD * 3,
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await
    .expect("the program did not finish within the hang guard")
    .expect("its waiting task")
    .expect("its output");
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A gateway whose bus runs on the switchable medium.
async fn over_flaky() -> (Arc<FlakyMedium>, Gw) {
    let flaky = Arc::new(Flaky::new());
    let bus = Intracom::with_medium(config("gateway"), flaky.clone())
        .await
        .expect("bus");
    (
        flaky,
        Gw::over(Gateway::new(bus.clone(), tokens()), bus, None),
    )
}

async fn message_store_over_the_outbox() {
    let (flaky, gw) = over_flaky().await;
    let mut sub = gw.subscribe("/subscribe/reload", BILLING, None).await;
    assert_eq!(gw.get("/messages", ADMIN).await.1, json!([]));

    let probe = |path: &'static str| {
        let gw = &gw;
        async move { gw.call(reqwest::Method::GET, path, None, None).await }
    };
    assert_eq!(probe("/readyz").await.0, StatusCode::OK);

    // The medium is down: not ready (but alive); publishes wait in the outbox, in order.
    flaky.set_down(true);
    let (status, not_ready) = probe("/readyz").await;
    assert_eq!(
        (status, &not_ready["code"]),
        (StatusCode::SERVICE_UNAVAILABLE, &json!("unavailable"))
    );
    assert_eq!(probe("/healthz").await.0, StatusCode::OK);
    let (status, kept) = gw
        .post(
            "/publish",
            BILLING,
            json!({ "action": "reload", "query": { "n": 1 } }),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{kept}");
    assert_eq!(kept["status"], "buffered");
    let (status, stored) = gw
        .post(
            "/messages",
            ADMIN,
            json!({ "action": "reload", "from": "billing", "query": { "n": 2 } }),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{stored}");
    let (status, waiting) = gw.get("/messages", ADMIN).await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&str> = waiting
        .as_array()
        .map(|w| w.iter().filter_map(|m| m["id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        ids,
        [
            kept["id"].as_str().unwrap_or("?"),
            stored["id"].as_str().unwrap_or("?")
        ]
    );
    assert_eq!(waiting[0]["query"]["n"], 1);
    let stats = gw.get("/stats", ADMIN).await.1;
    assert_eq!(
        stats["outbox"], 2,
        "the stats still show while the medium is down: {stats}"
    );
    assert!(
        stats["mediumError"]
            .as_str()
            .is_some_and(|e| e.contains("unavailable")),
        "{stats}"
    );

    // One is taken back before it is sent. (409 while the flusher is trying to send
    // its batch to the downed medium at that moment: asked again.)
    let mut answer = None;
    for _ in 0..300 {
        let (status, removed) = gw
            .delete(
                &format!("/messages/{}", kept["id"].as_str().unwrap_or("?")),
                ADMIN,
            )
            .await;
        if status != StatusCode::CONFLICT {
            answer = Some((status, removed));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, removed) = answer.expect("the outbox lets the message go between two tries");
    assert_eq!((status, &removed["removed"]), (StatusCode::OK, &json!(1)));
    let again = gw
        .delete(
            &format!("/messages/{}", kept["id"].as_str().unwrap_or("?")),
            ADMIN,
        )
        .await;
    assert_eq!(again.0, StatusCode::NOT_FOUND, "{}", again.1);
    assert_eq!(
        gw.post("/messages", ADMIN, json!({ "action": "reload" }))
            .await
            .0,
        StatusCode::BAD_REQUEST,
        "`from` is required"
    );
    assert_eq!(
        gw.post(
            "/messages",
            BILLING,
            json!({ "action": "reload", "from": "users" })
        )
        .await
        .0,
        StatusCode::FORBIDDEN,
        "a service token keeps its own service's messages only"
    );
    assert_eq!(
        gw.get("/messages", USERS).await,
        (StatusCode::OK, json!([])),
        "a service token lists its own service's messages only"
    );
    assert_eq!(
        gw.delete(
            &format!("/messages/{}", stored["id"].as_str().unwrap_or("?")),
            USERS
        )
        .await
        .0,
        StatusCode::NOT_FOUND,
        "nor removes another's"
    );

    // The medium is back: ready; the outbox is sent; only the message left in it arrives.
    flaky.set_down(false);
    assert_eq!(probe("/readyz").await.0, StatusCode::OK);
    let (_, m) = sub.message("the message kept in the store").await;
    assert_eq!(m["id"], stored["id"]);
    assert_eq!(m["query"]["n"], 2);
    eventually("the outbox empties", || async {
        gw.get("/messages", ADMIN).await.1 == json!([])
    })
    .await;
    let marker = gw
        .publish(BILLING, json!({ "action": "reload", "query": { "n": 3 } }))
        .await;
    assert_eq!(
        sub.message("the next message").await.1["id"],
        marker,
        "nothing else came"
    );
    gw.stop().await;
}

/// `DELETE /messages/{id}` while the outbox is handing that message to the medium
/// answers 409, not "removed, it will not be sent" (it is sent).
async fn a_message_being_sent_is_not_removed() {
    let (flaky, gw) = over_flaky().await;
    let mut sub = gw.subscribe("/subscribe/reload", BILLING, None).await;
    flaky.set_down(true);
    let (status, kept) = gw
        .post("/publish", BILLING, json!({ "action": "reload" }))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{kept}");
    let path = format!("/messages/{}", kept["id"].as_str().unwrap_or("?"));

    // The medium is back, and the outbox's send of the message is on its way.
    flaky.set_held(true);
    flaky.set_down(false);
    eventually("the outbox sending", || async { flaky.held_appends() == 1 }).await;
    let (status, answer) = gw.delete(&path, ADMIN).await;
    assert_eq!(
        (status, &answer["code"]),
        (StatusCode::CONFLICT, &json!("conflict")),
        "{answer}"
    );
    assert!(
        answer["message"]
            .as_str()
            .is_some_and(|m| m.contains("being sent")),
        "{answer}"
    );
    flaky.set_held(false);
    assert_eq!(sub.message("the message sent").await.1["id"], kept["id"]);
    eventually("the outbox empties", || async {
        gw.get("/messages", ADMIN).await.1 == json!([])
    })
    .await;
    assert_eq!(gw.delete(&path, ADMIN).await.0, StatusCode::NOT_FOUND);
    gw.stop().await;
}

/// A retry whose publish went through but whose removal of the dead letter failed
/// (503) is retried: the message is stored once, so the work runs once.
async fn a_dead_letter_retried_twice_is_sent_once() {
    use std::sync::atomic::Ordering;
    let (flaky, gw) = over_flaky().await;
    let mut job = Message::to_service("billing", "invoice.render")
        .work()
        .from_service("billing");
    job.id = "dead-job-2".into();
    job.source_instance = "billing-1".into();
    gw.bus
        .medium()
        .dead_letter_store()
        .expect("dead letters")
        .dead_letter(
            bson::to_document(&job).expect("a document"),
            "failed".into(),
        )
        .await
        .expect("dead letter");
    let mut monitor = gw
        .subscribe("/subscribe/invoice.render?monitor=true", ADMIN, None)
        .await;

    flaky.dead_remove_down.store(true, Ordering::SeqCst);
    let (status, failed) = gw.post("/retry/dead-job-2", ADMIN, json!({})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{failed}");
    flaky.dead_remove_down.store(false, Ordering::SeqCst);
    let (status, again) = gw.post("/retry/dead-job-2", ADMIN, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["status"], "duplicate", "{again}");
    assert_eq!(again["retryOf"], "dead-job-2");
    assert_eq!(
        gw.get("/dead/dead-job-2", ADMIN).await.0,
        StatusCode::NOT_FOUND
    );

    let marker = gw
        .publish(
            BILLING,
            json!({ "to": "billing", "action": "invoice.render", "query": { "marker": true } }),
        )
        .await;
    let (_, m) = monitor.message("the retried job").await;
    assert_eq!(
        (&m["id"], &m["retryOf"]),
        (&again["id"], &json!("dead-job-2"))
    );
    assert_eq!(
        monitor.message("the marker").await.1["id"],
        marker.as_str(),
        "the job was stored once"
    );
    gw.stop().await;
}

/// What a client chooses (an HTTP method, a subscription name) never becomes a label
/// value of `/metrics` (the metrics are the process's: other tests add to them, none
/// uses these names).
async fn metric_labels_stay_bounded() {
    let gw = Gw::start(&Place::Memory).await;
    let name = format!("chosen{}", intracom::message::new_id().to_lowercase());
    let mut sub = gw
        .subscribe(&format!("/subscribe/reload?name={name}"), USERS, None)
        .await;
    let id = gw.publish(BILLING, json!({ "action": "reload" })).await;
    assert_eq!(sub.message("the delivery").await.1["id"], id.as_str());
    let (status, acked) = gw
        .post(&format!("/ack/{id}?subscription={name}"), USERS, json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{acked}");
    let invented = reqwest::Method::from_bytes(b"BREWCOFFEE").expect("a method");
    let (status, _) = gw.call(invented, "/healthz", None, None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);

    let text = gw
        .http
        .get(gw.url("/metrics"))
        .send()
        .await
        .expect("/metrics")
        .text()
        .await
        .expect("its text");
    assert!(
        !text.contains(&name),
        "the subscription name is a label value"
    );
    assert!(!text.contains("BREWCOFFEE"), "the method is a label value");
    for line in [
        "intracom_acked_total{subscription=\"gateway:users\"}",
        "intracom_delivered_total{subscription=\"gateway:users\"}",
        "method=\"OTHER\"",
    ] {
        assert!(text.contains(line), "no {line} in\n{text}");
    }
    gw.stop().await;
}

/// An ack whose checkpoint save fails answers 503, and the client's retry saves it
/// (it answered 404 "not waiting": the ack was recorded, the save never retried); a
/// named stream that cannot start leaves no slot open.
async fn an_ack_whose_save_failed_is_saved_when_sent_again() {
    let (flaky, gw) = over_flaky().await;
    let path = "/subscribe/reload?name=inbox";
    let ack = |id: &str| format!("/ack/{id}?subscription=inbox");
    let mut sub = gw.subscribe(path, USERS, None).await;
    let m0 = gw
        .publish(BILLING, json!({ "action": "reload", "query": { "n": 0 } }))
        .await;
    let m1 = gw
        .publish(BILLING, json!({ "action": "reload", "query": { "n": 1 } }))
        .await;
    assert_eq!(sub.message("m0").await.1["id"], m0.as_str());
    assert_eq!(sub.message("m1").await.1["id"], m1.as_str());

    flaky.checkpoint_down.store(true, Ordering::SeqCst);
    let (status, failed) = gw.post(&ack(&m0), USERS, json!({})).await;
    assert_eq!(
        (status, &failed["code"]),
        (StatusCode::SERVICE_UNAVAILABLE, &json!("unavailable")),
        "{failed}"
    );
    let (status, again) = gw.post(&ack(&m0), USERS, json!({})).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "still waiting for its save: {again}"
    );
    flaky.checkpoint_down.store(false, Ordering::SeqCst);
    let (status, acked) = gw.post(&ack(&m0), USERS, json!({})).await;
    assert_eq!(status, StatusCode::OK, "the retry saves: {acked}");
    assert_eq!(
        gw.post(&ack(&m0), USERS, json!({})).await.0,
        StatusCode::NOT_FOUND,
        "saved: no longer waiting"
    );
    drop(sub);
    eventually("the stream closed", || async {
        gw.get("/stats", ADMIN).await.1["sseClients"] == 0
    })
    .await;

    // A stream that cannot start (its checkpoint unreadable) answers 503, and leaves
    // neither a slot taking acks nor a count behind.
    flaky.checkpoint_down.store(true, Ordering::SeqCst);
    let (status, failed) = gw.get(path, USERS).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{failed}");
    let (status, refused) = gw.post(&ack(&m1), USERS, json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .is_some_and(|m| m.contains("is not streaming")),
        "no slot is left open for the stream that did not start: {refused}"
    );
    assert_eq!(gw.get("/stats", ADMIN).await.1["sseClients"], 0);
    flaky.checkpoint_down.store(false, Ordering::SeqCst);

    // The checkpoint is after m0: the unacked m1 comes first on reconnect.
    let mut again = gw.subscribe(path, USERS, None).await;
    assert_eq!(
        again.message("the unacked message").await.1["id"],
        m1.as_str()
    );
    gw.stop().await;
}

async fn a_late_reconnect_is_told_what_was_lost() {
    use intracom::medium::memory::{MemoryMedium, MemoryOptions};
    let mut config = config("gateway");
    config.memory_max_messages = 10;
    let medium = Arc::new(MemoryMedium::new(MemoryOptions::from(&config)));
    let bus = Intracom::with_medium(config, medium.clone())
        .await
        .expect("bus");
    let gw = Gw::over(Gateway::new(bus.clone(), tokens()), bus, Some(medium));
    let mut sub = gw.subscribe("/subscribe/reload", BILLING, None).await;
    gw.publish(BILLING, json!({ "action": "reload" })).await;
    let (last_event_id, _) = sub.message("the first message").await;
    drop(sub);
    let mut published = Vec::new();
    for n in 0..30 {
        published.push(
            gw.publish(BILLING, json!({ "action": "reload", "query": { "n": n } }))
                .await,
        );
    }
    // Only the last 10 are retained: the other 20 are reported, then the rest comes.
    let mut resumed = gw
        .subscribe("/subscribe/reload", BILLING, Some(&last_event_id))
        .await;
    let lost = resumed.expect("the loss report").await;
    assert_eq!(lost.event, "lost", "{lost:?}");
    assert_eq!(lost.json()["count"], 20);
    for expected in &published[20..] {
        assert_eq!(
            &resumed.message("a retained message").await.1["id"],
            expected
        );
    }
    gw.stop().await;
}

/// The gateway acts for each service with an instance derived from its own: a 255-byte
/// instance leaves no room for that, so the gateway refuses to start (254 bytes start).
async fn an_instance_too_long_to_derive_from_is_refused_at_start() {
    for (len, starts) in [(255, false), (254, true)] {
        let mut config = config("gateway");
        config.instance = Some("i".repeat(len));
        let bus = Intracom::connect(config).await.expect("bus");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
        let served = tokio::time::timeout(
            GUARD,
            Gateway::new(bus.clone(), tokens()).serve(listener, None, async {}),
        )
        .await
        .expect("serve: hang guard");
        match (served, starts) {
            (Ok(()), true) => {}
            (Err(intracom::Error::Config { key, reason, .. }), false) => {
                assert_eq!(key, "common.intracom.instance");
                assert!(reason.contains("254 at most"), "{reason}");
            }
            (other, _) => panic!("instance of {len} bytes: {other:?}"),
        }
        bus.shutdown().await;
    }
}

async fn https_with_rustls() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
    let request = |path: &str, token: Option<&str>| {
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n")
    };
    let mut answers = Vec::new();
    for (path, token) in [("/healthz", None), ("/catalog", Some(BILLING))] {
        let tcp = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
        let mut tls = tokio::time::timeout(GUARD, connector.connect(name, tcp))
            .await
            .expect("handshake: hang guard")
            .expect("the TLS handshake with the gateway's certificate");
        tls.write_all(request(path, token).as_bytes())
            .await
            .expect("write");
        let mut answer = String::new();
        tokio::time::timeout(GUARD, tls.read_to_string(&mut answer))
            .await
            .expect("read: hang guard")
            .expect("read");
        answers.push(answer);
    }
    assert!(answers[0].starts_with("HTTP/1.1 200"), "{}", answers[0]);
    assert!(answers[0].contains("\"status\":\"ok\""), "{}", answers[0]);
    assert!(answers[1].starts_with("HTTP/1.1 200"), "{}", answers[1]);
    assert!(answers[1].contains("invoice.get"), "{}", answers[1]);

    // Plain HTTP on the TLS port gets no HTTP answer.
    let mut tcp = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    tcp.write_all(request("/healthz", None).as_bytes())
        .await
        .expect("write");
    let mut plain = Vec::new();
    // The server ends the connection (a TLS alert, or a reset: either way no HTTP).
    let ended = tokio::time::timeout(GUARD, tcp.read_to_end(&mut plain)).await;
    assert!(ended.is_ok(), "the TLS port ends a plain HTTP connection");
    assert!(
        !plain.windows(5).any(|w| w == b"HTTP/"),
        "served in clear: {}",
        String::from_utf8_lossy(&plain)
    );

    let _ = stop.send(());
    server.await.expect("server task").expect("server");
    bus.shutdown().await;
}

async fn intracom_serve_and_token_commands() {
    let binary = env!("CARGO_BIN_EXE_intracom");
    let mut token = Command::new(binary);
    token.args(["token", "new", "--service", "billing"]);
    let (status, out, err) = run(token).await;
    assert!(status.success(), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    let (secret, line) = (lines[0], lines[2]);
    assert!(
        !line.contains(secret),
        "the tokens file keeps the hash only"
    );
    let dir = tempfile::tempdir().expect("a directory");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("# billing\n{line}\n")).expect("tokens file");

    let mut serve = Command::new(binary);
    serve
        .args(["serve", "--listen", "127.0.0.1:0", "--tokens"])
        .arg(&tokens)
        .env("COMMON_INTRACOM_SENDERS_LIST", "billing")
        .env("COMMON_INTRACOM_ACTIONS_BILLING", "reload")
        .env_remove("INTRACOM_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = spawn_kept(serve).expect("intracom serve");
    let stderr = child.stderr.take().expect("its stderr");
    let first_line = tokio::time::timeout(
        GUARD,
        tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            let mut reader = std::io::BufReader::new(stderr);
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 {
                if line.contains("intracom gateway on ") {
                    return line;
                }
                line.clear();
            }
            line
        }),
    )
    .await
    .expect("intracom serve did not start within the hang guard")
    .expect("its reader");
    let base = first_line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {first_line:?}"))
        .to_string();
    let http = reqwest::Client::new();
    let health: Value = http
        .get(format!("{base}/healthz"))
        .send()
        .await
        .expect("healthz")
        .json()
        .await
        .expect("JSON");
    assert_eq!(health["medium"], "memory");
    let published = http
        .post(format!("{base}/publish"))
        .bearer_auth(secret)
        .json(&json!({ "action": "reload" }))
        .send()
        .await
        .expect("publish");
    assert_eq!(published.status(), StatusCode::CREATED);
    let console = http.get(format!("{base}/")).send().await.expect("console");
    let policy = console
        .headers()
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(policy.contains("default-src 'none'"), "{policy}");
    let page = console.text().await.expect("the page");
    assert!(
        page.contains("/console/app.js") && !page.contains("https://"),
        "nothing from elsewhere"
    );

    // SIGTERM stops it cleanly.
    // SAFETY: kill(2) on the child we spawned and have not reaped.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = tokio::time::timeout(GUARD, tokio::task::spawn_blocking(move || child.wait()))
        .await
        .expect("intracom serve did not stop within the hang guard")
        .expect("its waiting task")
        .expect("its status");
    assert!(status.success(), "exit status {status}");
}

async fn openapi_survives_schemathesis(st: PathBuf) {
    let options = GatewayOptions::default().max_request_timeout(Duration::from_millis(500));
    let gw = Gw::with(&Place::Memory, options).await;
    let (status, document) = gw
        .call(reqwest::Method::GET, "/openapi.json", None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(document["openapi"], "3.1.0");
    for path in [
        "/publish",
        "/subscribe/{topic}",
        "/ack/{messageId}",
        "/request/{service}/{action}",
        "/retry/{messageId}",
        "/queues",
        "/queues/create",
        "/queues/{service}/{action}",
        "/messages",
        "/messages/{messageId}",
        "/idempotency",
        "/idempotency/{messageId}",
        "/idempotency/{messageId}/reservation",
        "/dead",
        "/dead/{messageId}",
        "/stats",
        "/catalog",
        "/healthz",
        "/readyz",
        "/metrics",
        "/medium",
        "/medium/append",
        "/medium/follow",
    ] {
        assert!(document["paths"][path].is_object(), "{path} is documented");
    }
    assert!(
        document["components"]["schemas"]["PublishRequest"]["properties"]["action"].is_object(),
        "schemas come from the handlers' types"
    );
    let text = document.to_string();
    for reference in text.split("\"#/components/schemas/").skip(1) {
        let name = reference.split('"').next().unwrap_or_default();
        assert!(
            document["components"]["schemas"][name].is_object(),
            "#/components/schemas/{name} is referenced but not defined"
        );
    }

    // A request's documented answers from upstream (502: the handler failed; 504: no
    // answer in time) are outcomes, not faults of the gateway; every other 5xx is.
    let dir = tempfile::tempdir().expect("a directory");
    let config = dir.path().join("schemathesis.toml");
    std::fs::write(
        &config,
        r#"
[[operations]]
include-path = "/request/{service}/{action}"
checks.not_a_server_error.expected-statuses = ["1xx", "2xx", "3xx", "4xx", "502", "504"]
"#,
    )
    .expect("schemathesis.toml");
    // Once as an operator (admin routes), once as a service (its own publishes,
    // requests and subscriptions; 403 on the admin routes).
    for (who, token, examples) in [("ops", OPS, "30"), ("billing", BILLING, "15")] {
        let mut command = Command::new(&st);
        command
            .arg("--config-file")
            .arg(&config)
            .arg("run")
            .arg(gw.url("/openapi.json"))
            .args(["--header", &format!("Authorization: Bearer {token}")])
            .args(["--checks", "not_a_server_error"])
            .args(["--max-examples", examples, "--seed", "20261124"])
            .args(["--exclude-path", "/subscribe/{topic}"])
            .args(["--exclude-path", "/medium/follow"])
            // One worker: with two, hypothesis describes its lambdas from `ast.parse` in two
            // threads at once, which CPython 3.11 can fail ("AST constructor recursion depth
            // mismatch"), a crash of the tool, not a finding.
            .args(["--request-timeout", "20", "--workers", "1"])
            .current_dir(dir.path())
            .env("NO_COLOR", "1")
            .env("SCHEMATHESIS_HOOKS", "");
        let (status, out, err) = run(command).await;
        assert!(
            status.success(),
            "schemathesis ({who}) found failures:\n{out}\n{err}"
        );
        let summary: Vec<&str> = out
            .lines()
            .filter(|l| l.contains("generated") || l.contains("Tested"))
            .collect();
        eprintln!("schemathesis ({who}): {}", summary.join("; "));
    }
    gw.stop().await;
}

async fn console_in_headless_chromium((node, chromium, playwright): (PathBuf, PathBuf, PathBuf)) {
    let gw = Gw::start(&Place::Memory).await;
    // A dead letter for the console to send again: work for billing that died.
    let mut job = Message::to_service("billing", "invoice.render")
        .work()
        .from_service("billing")
        .body(doc! { "invoice": 7 });
    job.id = "dead-job-1".into();
    job.source_instance = "billing-1".into();
    let document: Document = bson::to_document(&job).expect("a document");
    gw.bus
        .medium()
        .dead_letter_store()
        .expect("dead letters")
        .dead_letter(document, "failed 5 times, last: printer on fire".into())
        .await
        .expect("dead letter");
    // A look-alike of billing (a Cyrillic і): the console shows its code points.
    gw.bus
        .medium()
        .catalog_add("bill\u{456}ng", &["reload".to_string()])
        .await
        .expect("a look-alike in the catalog");
    let mut monitor = gw
        .subscribe("/subscribe/invoice.render?monitor=true", ADMIN, None)
        .await;

    // Kept under target/ for a look after the run (CI keeps it as an artifact).
    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-charts.png");
    let _ = std::fs::remove_file(&screenshot);
    let mut command = Command::new(node);
    command
        .arg(repo("tests/gateway/console.mjs"))
        .env("INTRACOM_URL", &gw.base)
        .env("INTRACOM_ADMIN_TOKEN", ADMIN)
        .env("INTRACOM_BILLING_TOKEN", BILLING)
        .env("INTRACOM_DEAD_ID", "dead-job-1")
        .env("INTRACOM_SCREENSHOT", &screenshot)
        .env("INTRACOM_CHROMIUM", chromium)
        .env("INTRACOM_PLAYWRIGHT", playwright);
    let (status, out, err) = run(command).await;
    assert!(status.success(), "the console test failed:\n{out}\n{err}");
    let report: Value = serde_json::from_str(out.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("no JSON report ({e}):\n{out}\n{err}"));
    assert_eq!(report["medium"], "memory", "{report}");
    assert_eq!(report["pageErrors"], json!([]), "{report}");
    // The charts, as drawn: points with the traffic's values, and the picture.
    let charts = &report["charts"];
    let values = |chart: &str, series: &str| -> Vec<f64> {
        charts[chart]["series"][series]
            .as_array()
            .map(|v| v.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default()
    };
    for (chart, series, at_least) in [
        ("rate", "published", 0.1),
        ("rate", "delivered", 0.1),
        ("depth", "queue depth", 3.0),
        ("latency", "p50", 0.0),
        ("latency", "p99", 0.0),
    ] {
        assert!(
            values(chart, series).iter().any(|v| *v >= at_least),
            "the {chart} chart's {series} has a point of {at_least} or more: {charts}"
        );
        assert!(
            charts[chart]["paths"].as_u64() >= Some(1),
            "the {chart} chart draws a line: {charts}"
        );
    }
    let png = std::fs::read(&screenshot)
        .unwrap_or_else(|e| panic!("the screenshot {}: {e}", screenshot.display()));
    assert!(
        png.starts_with(b"\x89PNG"),
        "a PNG at {}",
        screenshot.display()
    );
    eprintln!(
        "console: charts {charts}; screenshot {}",
        screenshot.display()
    );
    assert_eq!(
        report["elsewhere"],
        json!([]),
        "nothing loaded from another origin: {report}"
    );

    // What the button did, seen through the API.
    let (_, m) = monitor.message("the dead letter sent again").await;
    assert_eq!(m["retryOf"], "dead-job-1");
    assert_eq!(
        gw.get("/dead/dead-job-1", ADMIN).await.0,
        StatusCode::NOT_FOUND
    );
    gw.stop().await;
}

async fn node_example(node: PathBuf) {
    let gw = Gw::start(&Place::Memory).await;
    let billing = gw.peer("billing").await;
    let worker = billing
        .serve("billing", "invoice.get", |q: Document| async move {
            let invoice = q.get("invoice").cloned().unwrap_or(bson::Bson::Null);
            Ok::<_, String>(doc! { "invoice": invoice, "total": 99.5 })
        })
        .expect("worker");
    let mut command = Command::new(node);
    command
        .arg(repo("examples/node/example.mjs"))
        .env("INTRACOM_URL", &gw.base)
        .env("INTRACOM_TOKEN", BILLING);
    let (status, out, err) = run(command).await;
    assert!(
        status.success(),
        "the Node.js example failed:\n{out}\n{err}"
    );
    assert!(out.contains("published "), "{out}");
    assert!(out.contains("received reload from billing"), "{out}");
    assert!(out.contains("invoice 42: total 99.5"), "{out}");
    worker.stop().await;
    billing.shutdown().await;
    gw.stop().await;
}
