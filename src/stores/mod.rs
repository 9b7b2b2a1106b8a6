//! The external stores: the idempotency records and the messages not routed yet, kept
//! by an intracom gateway's REST API (`common.intracom.stores.*`, feature `http`).
//!
//! Why it exists: a service may want one source of truth for its run-once records
//! that its medium does not give (MQTT keeps them in each process), and a place for
//! its publishes that outlives the process while the medium is away. A gateway serves
//! both (`/idempotency`, `/messages`); this is its client. When the gateway cannot be
//! reached, the callers fall back to this process's memory (the idempotency fall-back,
//! the outbox) and write back when it answers again.
//!
//! The calls:
//!
//! - reserve: `POST /idempotency/{messageId}/reservation` `{consumer, owner, leaseMs}`
//!   answers `reserved`, `done` (with the result) or `busy`;
//! - complete: `POST /idempotency` `{consumer, messageId, owner, result}`;
//! - release: `DELETE /idempotency/{messageId}?consumer=…&owner=…`;
//! - keep a message: `POST /messages` with its id, the gateway sends it when its
//!   medium takes it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bson::Document;
use serde::{Deserialize, Serialize};

use crate::config::{Config, IdempotencyStoreKind, MessageStoreKind};
use crate::error::{Error, Result};
use crate::medium::Reservation;
use crate::message::{DeliveryMode, Message, MessageType};

/// The client of a gateway's stores, shared by the handles of one bus.
pub(crate) struct HttpStores {
    client: reqwest::Client,
    base: String,
    token: Option<String>,
    idempotency: bool,
    messages: bool,
    /// Publishes are kept in the outbox because the message store cannot be reached.
    messages_fallback: AtomicBool,
    /// Times the message store fell back to the outbox.
    pub(crate) messages_fallbacks: AtomicU64,
}

impl std::fmt::Debug for HttpStores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpStores")
            .field("base", &self.base)
            .field("idempotency", &self.idempotency)
            .field("messages", &self.messages)
            .finish()
    }
}

/// TLS for an `https://` store: rustls with the ring provider, the system's roots or a
/// CA file.
fn tls_config(config: &Config) -> Result<rustls::ClientConfig> {
    let roots = crate::tls::roots(
        "common.intracom.stores.ca_file",
        config.stores.ca_file.as_deref(),
        true,
        "an https:// store",
    )?;
    let url = config.stores.url.clone().unwrap_or_default();
    crate::tls::client_config(roots, "common.intracom.stores.url", url)
}

/// A TLS configuration for a store reached over plain HTTP: no roots (it is not used).
fn plain_tls(url: &str) -> Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::config("common.intracom.stores.url", url, e))?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth())
}

/// What a reservation call answers.
#[derive(Deserialize)]
struct ReservationAnswer {
    reservation: String,
    #[serde(default)]
    result: Option<serde_json::Value>,
}

/// At most this much of an error answer's body is read.
const ERROR_BODY_BYTES: usize = 4096;

/// At most this much of an error answer's message goes into an error.
const ERROR_CHARS: usize = 200;

/// The first [`ERROR_BODY_BYTES`] of an answer's body (what could be read of them): a
/// store that answers an error with a huge body costs no more than that.
async fn body_head(mut response: reqwest::Response) -> Vec<u8> {
    let mut head = Vec::new();
    while head.len() < ERROR_BODY_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => head.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    head.truncate(ERROR_BODY_BYTES);
    head
}

/// The error body of the gateway.
#[derive(Deserialize)]
struct ErrorAnswer {
    #[serde(default)]
    message: String,
}

#[derive(Serialize)]
struct ReserveBody<'a> {
    consumer: &'a str,
    owner: &'a str,
    #[serde(rename = "leaseMs")]
    lease_ms: u64,
}

#[derive(Serialize)]
struct CompleteBody<'a> {
    consumer: &'a str,
    #[serde(rename = "messageId")]
    message_id: &'a str,
    owner: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<serde_json::Value>,
}

/// A message as `POST /messages` takes it.
#[derive(Serialize)]
struct KeepBody<'a> {
    id: &'a str,
    action: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    to: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    instance: Option<&'a str>,
    query: serde_json::Value,
    #[serde(rename = "type")]
    kind: MessageType,
    work: bool,
    priority: i32,
    from: &'a str,
}

/// A document as canonical extended JSON: the gateway reads it back into the same
/// BSON types (a relaxed `1` would come back as an Int32, whatever it was).
fn json_of(document: &Document) -> serde_json::Value {
    bson::Bson::Document(document.clone()).into_canonical_extjson()
}

impl HttpStores {
    /// The client of the stores `config` names, or none when both are local.
    pub(crate) fn from_config(config: &Config) -> Result<Option<Arc<Self>>> {
        let stores = &config.stores;
        if !stores.any_http() {
            return Ok(None);
        }
        let base = stores.url.clone().ok_or_else(|| {
            Error::config(
                "common.intracom.stores.url",
                "",
                "a store is `http`: name the gateway that keeps it",
            )
        })?;
        let timeout = Duration::from_millis(stores.timeout_ms);
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            // A gateway that went away leaves pooled connections that fail the next
            // call: kept short, so that a restarted gateway is reached at once.
            .pool_idle_timeout(Duration::from_secs(2));
        // Always a TLS configuration of this crate's making: reqwest is built without a
        // rustls provider and would look for a process-wide one otherwise. A plain
        // `http://` store needs no roots.
        let tls = if base.starts_with("https://") {
            tls_config(config)?
        } else {
            plain_tls(&base)?
        };
        builder = builder.tls_backend_preconfigured(tls);
        let client = builder
            .build()
            .map_err(|e| Error::config("common.intracom.stores.url", &base, e))?;
        Ok(Some(Arc::new(HttpStores {
            client,
            base,
            token: stores.token.clone(),
            idempotency: stores.idempotency == IdempotencyStoreKind::Http,
            messages: stores.messages == MessageStoreKind::Http,
            messages_fallback: AtomicBool::new(false),
            messages_fallbacks: AtomicU64::new(0),
        })))
    }

    /// Whether the run-once records are kept here.
    pub(crate) fn keeps_idempotency(&self) -> bool {
        self.idempotency
    }

    /// Whether the messages not routed yet are kept here.
    pub(crate) fn keeps_messages(&self) -> bool {
        self.messages
    }

    fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let request = self.client.request(method, url);
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends a request; the response when its status is a success, else the error it
    /// means (retryable for no answer, a 5xx, 408 or 429).
    async fn send(
        &self,
        store: &'static str,
        url: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response> {
        let response = request.send().await.map_err(|e| Error::StoreUnavailable {
            store,
            url: url.to_string(),
            reason: if e.is_timeout() {
                "no answer in time".into()
            } else {
                "no answer".into()
            },
            source: Some(Box::new(e)),
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = body_head(response).await;
        let reason: String = serde_json::from_slice::<ErrorAnswer>(&body)
            .map(|e| e.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned())
            .chars()
            .take(ERROR_CHARS)
            .collect();
        if status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429 {
            Err(Error::StoreUnavailable {
                store,
                url: url.to_string(),
                reason: format!("HTTP {status}: {reason}"),
                source: None,
            })
        } else {
            Err(Error::StoreRefused {
                store,
                url: url.to_string(),
                status: status.as_u16(),
                reason,
            })
        }
    }

    fn record_url(&self, id: &str) -> String {
        format!("{}/idempotency/{}", self.base, encode_segment(id))
    }

    /// Reserves (`consumer`, `id`) for `owner`, as [`crate::medium::Records`] does.
    pub(crate) async fn reserve(
        &self,
        consumer: &str,
        id: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<Reservation> {
        let url = format!("{}/reservation", self.record_url(id));
        let body = ReserveBody {
            consumer,
            owner,
            lease_ms: u64::try_from(lease.as_millis()).unwrap_or(u64::MAX),
        };
        let request = self.request(reqwest::Method::POST, &url).json(&body);
        let response = self.send("idempotency", &url, request).await?;
        let answer: ReservationAnswer =
            response.json().await.map_err(|e| Error::StoreUnavailable {
                store: "idempotency",
                url: url.clone(),
                reason: "an answer that is not a reservation".into(),
                source: Some(Box::new(e)),
            })?;
        match answer.reservation.as_str() {
            "reserved" => Ok(Reservation::Reserved),
            "busy" => Ok(Reservation::Busy),
            "done" => Ok(Reservation::Done(
                match answer.result.map(bson::Bson::try_from) {
                    Some(Ok(bson::Bson::Document(result))) => Some(result),
                    _ => None,
                },
            )),
            other => Err(Error::StoreRefused {
                store: "idempotency",
                url,
                status: 200,
                reason: format!("unknown reservation state `{other}`"),
            }),
        }
    }

    /// Marks (`consumer`, `id`) done by `owner`, with its result.
    pub(crate) async fn complete(
        &self,
        consumer: &str,
        id: &str,
        owner: &str,
        result: Option<Document>,
    ) -> Result<()> {
        let url = format!("{}/idempotency", self.base);
        let body = CompleteBody {
            consumer,
            message_id: id,
            owner,
            result: result.as_ref().map(json_of),
        };
        let request = self.request(reqwest::Method::POST, &url).json(&body);
        match self.send("idempotency", &url, request).await {
            Ok(_) => Ok(()),
            // The lease lapsed and another owner took it over: its outcome stands, as
            // with the medium's store, and this run's is not recorded.
            Err(Error::StoreRefused {
                status: 409,
                reason,
                ..
            }) => {
                tracing::warn!(consumer, message_id = %id, %reason, "idempotency: reservation lost before completion");
                Err(Error::ReservationLost {
                    consumer: consumer.to_string(),
                    id: id.to_string(),
                })
            }
            Err(error) => Err(error),
        }
    }

    /// Releases `owner`'s reservation of (`consumer`, `id`).
    pub(crate) async fn release(&self, consumer: &str, id: &str, owner: &str) -> Result<()> {
        let url = self.record_url(id);
        let request = self
            .request(reqwest::Method::DELETE, &url)
            .query(&[("consumer", consumer), ("owner", owner)]);
        self.send("idempotency", &url, request).await.map(drop)
    }

    /// Whether the store's API can carry `message` whole: a message a service
    /// publishes (broadcast, fire-and-forget, work), not a request or a reply, whose
    /// correlation the API does not carry.
    pub(crate) fn can_keep(message: &Message) -> bool {
        message.query_id.is_none()
            && message.response.is_none()
            && message.result.is_none()
            && message.retry_of.is_none()
            && matches!(
                message.kind,
                MessageType::Broadcast | MessageType::FireAndForget
            )
    }

    /// Hands `messages` to the gateway's message store, in order; stops at the first
    /// that fails. Returns how many it took (a prefix of `messages`) and the error
    /// that stopped it, if any.
    pub(crate) async fn keep(&self, messages: &[Message]) -> (usize, Option<Error>) {
        let url = format!("{}/messages", self.base);
        for (kept, message) in messages.iter().enumerate() {
            let body = KeepBody {
                id: &message.id,
                action: &message.action,
                to: message.dest_service.as_deref(),
                instance: message.dest_instance.as_deref(),
                query: json_of(&message.query),
                kind: message.kind,
                work: message.delivery == DeliveryMode::One,
                priority: message.priority,
                from: &message.source_service,
            };
            let mut request = self.request(reqwest::Method::POST, &url).json(&body);
            // The API carries the trace context as the W3C headers (the gateway stores
            // them in the message's `trace`); the sending instance and `query_ts` are
            // the gateway's own when it publishes.
            if let Some(trace) = &message.trace {
                request = request.header("traceparent", &trace.traceparent);
                if let Some(state) = &trace.tracestate {
                    request = request.header("tracestate", state);
                }
            }
            if let Err(error) = self.send("messages", &url, request).await {
                return (kept, Some(error));
            }
        }
        (messages.len(), None)
    }

    /// The message store failed: the outbox keeps publishes (logged and counted once
    /// per outage).
    pub(crate) fn messages_fell_back(&self, error: &Error) {
        if !self.messages_fallback.swap(true, Ordering::SeqCst) {
            self.messages_fallbacks.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(crate::metrics::FALLBACK, "kind" => "messages").increment(1);
            if error.is_retryable() {
                tracing::warn!(%error, "message store unreachable: publishes kept in this process's outbox until it answers");
            } else {
                // A refusal (a token, a `from` it may not use): retrying will not help.
                tracing::error!(%error, "message store refused a publish: kept in this process's outbox (check common.intracom.stores.*)");
            }
        }
    }

    /// The message store answered.
    pub(crate) fn messages_answered(&self) {
        if self.messages_fallback.swap(false, Ordering::SeqCst) {
            tracing::info!("message store reachable again");
        }
    }
}

/// `value` as one path segment (percent-encoded outside the unreserved characters).
fn encode_segment(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer of `body` from a one-shot server.
    async fn answer(body: Vec<u8>) -> reqwest::Response {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port");
        let address = listener.local_addr().expect("an address");
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("a connection");
            let mut request = [0_u8; 1024];
            let _ = socket.read(&mut request).await;
            let head = format!(
                "HTTP/1.1 500 Internal Server Error\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(&body).await;
        });
        let url = format!("http://{address}/");
        let tls = plain_tls(&url).expect("a TLS configuration");
        reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .build()
            .expect("a client")
            .get(url)
            .send()
            .await
            .expect("an answer")
    }

    #[tokio::test]
    async fn an_error_body_is_read_up_to_its_limit() {
        let head = body_head(answer(vec![b'x'; 1 << 20]).await).await;
        assert_eq!(head.len(), ERROR_BODY_BYTES);
        let head = body_head(answer(b"short".to_vec()).await).await;
        assert_eq!(head, b"short");
    }

    #[test]
    fn ids_are_one_path_segment() {
        assert_eq!(encode_segment("01ABC-x.y_z~"), "01ABC-x.y_z~");
        assert_eq!(encode_segment("a/b c?é"), "a%2Fb%20c%3F%C3%A9");
    }

    #[test]
    fn requests_and_replies_stay_in_the_outbox() {
        assert!(HttpStores::can_keep(&Message::broadcast("reload")));
        assert!(HttpStores::can_keep(
            &Message::to_service("billing", "x").work()
        ));
        let mut request = Message::to_service("billing", "x");
        request.query_id = Some("q".into());
        assert!(!HttpStores::can_keep(&request));
    }
}
