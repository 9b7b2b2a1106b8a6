//! One MQTT 5 connection: rumqttc's event loop driven by a task of its own, with what
//! the medium needs on top of it.
//!
//! Why it exists: rumqttc hands a publish to its event loop and returns; the medium
//! must know when the broker took it (the PUBACK, with its reason code) to report
//! `Stored`, or to keep the message in the outbox when the broker is unreachable. It
//! must also never acknowledge a message on a connection other than the one it arrived
//! on: after a reconnect the broker re-sends what was not acknowledged, with packet ids
//! that may be reused, so an ack from the old connection could acknowledge a different
//! message. So:
//!
//! - publishes and subscriptions wait for their PUBACK / SUBACK, matched by packet id
//!   (the event loop reports the id it gave each request, in request order);
//! - every connection attempt is an *epoch*; a received message carries its epoch, and
//!   an ack from an earlier epoch is dropped (the broker sends the message again);
//! - on a connection error every waiting publish fails as unavailable, and rumqttc's own
//!   re-sending of those publishes is cancelled (the caller's outbox re-sends them);
//! - subscriptions are made again after every reconnect;
//! - a session taken over by another client with the same id is not taken back.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{
    ConnectProperties, DisconnectReasonCode, Filter as TopicFilter, LastWill, Packet, PubAckReason,
    Publish, PublishProperties, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{
    AsyncClient, ClientError, ConnectionError, Event, EventLoop, MqttOptions, Request, StateError,
};
use rumqttc::Outgoing;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::unavailable;
use crate::error::{Error, Result};

/// How many requests wait in rumqttc's channel at most.
const CHANNEL: usize = 1024;

/// What a connection needs to know to connect.
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) tls: Option<rumqttc::TlsConfiguration>,
    pub(crate) credentials: Option<(String, String)>,
    pub(crate) keep_alive: Duration,
    /// The largest packet this client accepts (sent in CONNECT).
    pub(crate) max_incoming: u32,
}

/// One connection's identity and session.
pub(crate) struct Session {
    pub(crate) client_id: String,
    /// Keep the session (and what the broker queued for it) across connections.
    pub(crate) persistent: bool,
    /// Session expiry in seconds when persistent.
    pub(crate) expiry_secs: u32,
    /// How many unacknowledged QoS 1 messages the broker may send us at once.
    pub(crate) receive_maximum: u16,
    /// A message the broker publishes if the connection ends without a DISCONNECT.
    pub(crate) will: Option<LastWill>,
}

/// The state of the link, as the medium sees it.
#[derive(Clone, Debug, Default)]
pub(crate) struct Link {
    pub(crate) up: bool,
    /// The broker's maximum packet size, from its CONNACK.
    pub(crate) max_packet: Option<u32>,
    /// The broker ended the session for good (taken over, or this side closed it).
    pub(crate) ended: bool,
    /// The last error, for messages.
    pub(crate) last_error: Option<String>,
    /// The broker refused the first connection (credentials, TLS): trying again will
    /// not help.
    pub(crate) refused: bool,
}

/// A message received on this connection.
pub(crate) struct Inbound {
    pub(crate) publish: Publish,
    epoch: u64,
}

impl Inbound {
    /// The connection attempt it arrived on.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }
}

/// The outcome of a request, told to its caller: for a publish, `Ok(matched)` where
/// `matched` is false when the broker said no subscription matched it (PUBACK reason
/// 0x10: MQTT keeps nothing for nobody, so the message is gone).
type Confirm = oneshot::Sender<std::result::Result<bool, String>>;

#[derive(Default)]
struct State {
    /// Bumped at every connection error: acks of earlier epochs are not sent.
    epoch: u64,
    up: bool,
    /// Publishes handed to rumqttc, waiting for their packet id, in order.
    unassigned: VecDeque<Confirm>,
    /// Publishes sent, waiting for their PUBACK, by packet id (several only when the
    /// broker acked out of order and rumqttc had to wait on a colliding id).
    inflight: HashMap<u16, VecDeque<Confirm>>,
    /// A colliding publish rumqttc will send later under this id (already assigned).
    collided: Option<u16>,
    /// Subscribe / unsubscribe requests waiting for their packet id, then their ack.
    sub_unassigned: VecDeque<Confirm>,
    sub_inflight: HashMap<u16, Confirm>,
    unsub_unassigned: VecDeque<Confirm>,
    unsub_inflight: HashMap<u16, Confirm>,
    /// Subscriptions made again after each reconnect.
    subscriptions: Vec<TopicFilter>,
    /// Re-subscriptions queued after a reconnect, ahead of any caller's: their packet
    /// ids are not a caller's.
    automatic: usize,
    automatic_ids: Vec<u16>,
}

impl State {
    fn fail_all(&mut self, why: &str) {
        let waiters = self
            .unassigned
            .drain(..)
            .chain(self.inflight.drain().flat_map(|(_, q)| q))
            .chain(self.sub_unassigned.drain(..))
            .chain(self.sub_inflight.drain().map(|(_, w)| w))
            .chain(self.unsub_unassigned.drain(..))
            .chain(self.unsub_inflight.drain().map(|(_, w)| w));
        for waiter in waiters {
            let _ = waiter.send(Err(why.to_string()));
        }
        self.collided = None;
    }
}

struct Shared {
    state: Mutex<State>,
    link: watch::Sender<Link>,
    closed: CancellationToken,
    client_id: String,
    /// The session is kept across connections (a named subscription).
    persistent: bool,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A live MQTT connection (it reconnects by itself until closed).
pub(crate) struct Conn {
    client: AsyncClient,
    shared: Arc<Shared>,
    driver: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Conn {
    /// Opens a connection and waits (up to `wait`) for the broker's CONNACK. Received
    /// messages go to the returned channel.
    pub(crate) async fn open(
        settings: &Settings,
        session: Session,
        wait: Duration,
    ) -> Result<(Arc<Conn>, mpsc::UnboundedReceiver<Inbound>)> {
        let mut options = MqttOptions::new(&session.client_id, &settings.host, settings.port);
        options
            .set_keep_alive(settings.keep_alive.max(Duration::from_secs(5)))
            .set_clean_start(!session.persistent)
            .set_manual_acks(true)
            .set_connection_timeout(wait.as_secs().max(1));
        let mut properties = ConnectProperties::new();
        properties.session_expiry_interval = session.persistent.then_some(session.expiry_secs);
        properties.receive_maximum = Some(session.receive_maximum.max(1));
        properties.max_packet_size = Some(settings.max_incoming);
        options.set_connect_properties(properties);
        if let Some((user, password)) = &settings.credentials {
            options.set_credentials(user, password);
        }
        if let Some(tls) = &settings.tls {
            options.set_transport(rumqttc::Transport::tls_with_config(tls.clone()));
        }
        if let Some(will) = session.will {
            options.set_last_will(will);
        }
        let (client, eventloop) = AsyncClient::new(options, CHANNEL);
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            link: watch::channel(Link::default()).0,
            closed: CancellationToken::new(),
            client_id: session.client_id,
            persistent: session.persistent,
        });
        let mut link = shared.link.subscribe();
        let driver = tokio::spawn(drive(eventloop, client.clone(), Arc::clone(&shared), tx));
        let conn = Arc::new(Conn {
            client,
            shared,
            driver: Mutex::new(Some(driver)),
        });
        let connected = tokio::time::timeout(wait, async {
            link.wait_for(|l| l.up || l.ended).await.map(|_| ())
        })
        .await;
        let link = conn.link();
        if matches!(connected, Ok(Ok(()))) && link.up {
            return Ok((conn, rx));
        }
        let reason = link
            .last_error
            .unwrap_or_else(|| format!("no CONNACK within {wait:?}"));
        conn.close().await;
        let reason = format!(
            "cannot connect to the broker at {}:{} as `{}`: {reason}",
            settings.host,
            settings.port,
            conn.client_id()
        );
        Err(if link.refused {
            Error::refused("mqtt", reason)
        } else {
            unavailable(reason)
        })
    }

    pub(crate) fn client_id(&self) -> &str {
        &self.shared.client_id
    }

    /// The current connection attempt (bumped at each connection loss).
    pub(crate) fn epoch(&self) -> u64 {
        self.shared.state().epoch
    }

    pub(crate) fn link(&self) -> Link {
        self.shared.link.borrow().clone()
    }

    /// Hands a QoS 1 publish to the event loop; the receiver tells when the broker
    /// acknowledged it (or why not). Fails at once when the link is down.
    pub(crate) async fn start_publish(
        &self,
        topic: &str,
        payload: Bytes,
        retain: bool,
        properties: PublishProperties,
    ) -> Result<oneshot::Receiver<std::result::Result<bool, String>>> {
        // Every publish is checked here, not only the bus's: a reply, a job handed back
        // or a dead letter over the broker's limit would make rumqttc drop the whole
        // connection (and every publish in flight on it) instead.
        if let Some(limit) = self.link().max_packet {
            let size = packet_size(topic, &payload, &properties);
            if size > limit as usize {
                return Err(Error::PacketTooLarge {
                    id: format!("on `{topic}`"),
                    size,
                    limit: limit as usize,
                });
            }
        }
        let mut tries = 0u32;
        loop {
            let (tx, rx) = oneshot::channel();
            {
                let mut state = self.shared.state();
                if !state.up {
                    return Err(unavailable(self.down_reason()));
                }
                state.unassigned.push_back(tx);
                match self.client.try_publish_with_properties(
                    topic,
                    QoS::AtLeastOnce,
                    retain,
                    payload.clone(),
                    properties.clone(),
                ) {
                    Ok(()) => return Ok(rx),
                    Err(error) => {
                        state.unassigned.pop_back();
                        self.refused(&error, &mut tries)?;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// rumqttc's `try_*` calls fail alike for a full channel (wait and try again) and
    /// for a closed connection or a refused topic (topics are checked before they get
    /// here, so a refusal that lasts is reported after a bounded wait).
    fn refused(&self, error: &ClientError, tries: &mut u32) -> Result<()> {
        *tries += 1;
        if self.shared.closed.is_cancelled() || self.client_is_gone() {
            return Err(unavailable("the connection was closed"));
        }
        if *tries > 5_000 {
            return Err(unavailable(format!(
                "the connection did not take the request: {error}"
            )));
        }
        Ok(())
    }

    fn client_is_gone(&self) -> bool {
        self.link().ended
    }

    /// Publishes with QoS 1 and waits for the PUBACK.
    pub(crate) async fn publish(
        &self,
        topic: &str,
        payload: Bytes,
        retain: bool,
        properties: PublishProperties,
    ) -> Result<()> {
        self.publish_matched(topic, payload, retain, properties)
            .await
            .map(|_| ())
    }

    /// Publishes with QoS 1, waits for the PUBACK, and tells whether a subscription
    /// matched it (`false`: the broker dropped it, nobody was there to take it).
    pub(crate) async fn publish_matched(
        &self,
        topic: &str,
        payload: Bytes,
        retain: bool,
        properties: PublishProperties,
    ) -> Result<bool> {
        let confirm = self
            .start_publish(topic, payload, retain, properties)
            .await?;
        settle(confirm.await, topic)
    }

    /// The link's changes (up, down, ended), to act on a reconnection.
    pub(crate) fn link_changes(&self) -> watch::Receiver<Link> {
        self.shared.link.subscribe()
    }

    /// Subscribes (QoS 1), waits for the SUBACK, and keeps the filters to subscribe
    /// again after a reconnect when `keep` is set.
    pub(crate) async fn subscribe(&self, filters: Vec<TopicFilter>, keep: bool) -> Result<()> {
        let mut tries = 0u32;
        let rx = loop {
            let (tx, rx) = oneshot::channel();
            {
                let mut state = self.shared.state();
                if !state.up {
                    return Err(unavailable(self.down_reason()));
                }
                state.sub_unassigned.push_back(tx);
                match self.client.try_subscribe_many(filters.clone()) {
                    Ok(()) => {
                        if keep {
                            state.subscriptions.extend(filters.iter().cloned());
                        }
                        break rx;
                    }
                    Err(error) => {
                        state.sub_unassigned.pop_back();
                        self.refused(&error, &mut tries)?;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        match rx.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(reason)) if reason.starts_with("refused:") => Err(Error::refused(
                "mqtt",
                format!("subscription refused by the broker: {reason}"),
            )),
            Ok(Err(reason)) => Err(unavailable(reason)),
            Err(_) => Err(unavailable("the connection was closed")),
        }
    }

    /// Unsubscribes one filter and waits for the UNSUBACK; it is no longer re-made.
    pub(crate) async fn unsubscribe(&self, filter: &str) -> Result<()> {
        let mut tries = 0u32;
        let rx = loop {
            let (tx, rx) = oneshot::channel();
            {
                let mut state = self.shared.state();
                state.subscriptions.retain(|f| f.path != filter);
                if !state.up {
                    return Err(unavailable(self.down_reason()));
                }
                state.unsub_unassigned.push_back(tx);
                match self.client.try_unsubscribe(filter) {
                    Ok(()) => break rx,
                    Err(error) => {
                        state.unsub_unassigned.pop_back();
                        self.refused(&error, &mut tries)?;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        match rx.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(reason)) => Err(unavailable(reason)),
            Err(_) => Err(unavailable("the connection was closed")),
        }
    }

    /// Acknowledges a received message (PUBACK), if it arrived on the current
    /// connection; otherwise the broker sends it again and nothing is sent now.
    pub(crate) async fn ack(&self, inbound: &Inbound) {
        loop {
            {
                let state = self.shared.state();
                if state.epoch != inbound.epoch || !state.up {
                    return;
                }
                match self.client.try_ack(&inbound.publish) {
                    Ok(()) => return,
                    Err(_) if self.shared.closed.is_cancelled() || self.client_is_gone() => return,
                    Err(_) => {}
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Ends the connection: a DISCONNECT after what was queued before it (acks), so
    /// the broker keeps a persistent session as acknowledged; then the driver stops.
    /// Every caller waits for that, bounded.
    pub(crate) async fn close(&self) {
        let mut link = self.shared.link.subscribe();
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            if !self.shared.closed.is_cancelled() {
                self.shared.closed.cancel();
                // A full queue drains as the driver runs; a link that is down ends the
                // driver at its next error.
                while self.client.try_disconnect().is_err() && !self.link().ended {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            let _ = link.wait_for(|l| l.ended).await;
        })
        .await;
        if ended.is_err() {
            tracing::warn!(client_id = %self.shared.client_id, "mqtt connection did not close within 5 s: stopped");
            let driver = self.driver.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(driver) = driver {
                driver.abort();
            }
        }
    }

    fn down_reason(&self) -> String {
        let link = self.link();
        if link.ended {
            return "the connection was closed".into();
        }
        match link.last_error {
            Some(error) => format!("the broker is unreachable ({error})"),
            None => "the broker is unreachable".into(),
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if !self.shared.closed.is_cancelled() {
            self.shared.closed.cancel();
            if self.client.try_disconnect().is_err() {
                if let Some(driver) = self.driver.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    driver.abort();
                }
            }
        }
    }
}

fn settle(
    outcome: std::result::Result<std::result::Result<bool, String>, oneshot::error::RecvError>,
    topic: &str,
) -> Result<bool> {
    match outcome {
        Ok(Ok(matched)) => Ok(matched),
        Ok(Err(reason)) if reason.starts_with("refused:") => Err(Error::refused(
            "mqtt",
            format!("the broker refused the publish on `{topic}`: {reason}"),
        )),
        Ok(Err(reason)) => Err(unavailable(reason)),
        Err(_) => Err(unavailable("the connection was closed")),
    }
}

/// Waits for the PUBACK of a publish started with [`Conn::start_publish`]; `false`
/// when no subscription matched it.
pub(crate) async fn confirmed(
    confirm: oneshot::Receiver<std::result::Result<bool, String>>,
    topic: &str,
) -> Result<bool> {
    settle(confirm.await, topic)
}

/// The size of a PUBLISH packet, as the broker's maximum packet size counts it.
pub(crate) fn packet_size(topic: &str, payload: &Bytes, properties: &PublishProperties) -> usize {
    let packet = Publish::new(
        topic,
        QoS::AtLeastOnce,
        payload.clone(),
        Some(properties.clone()),
    );
    // The packet id's two bytes are not counted by `size` before it is assigned.
    packet.size() + 2
}

/// Drives the event loop until the connection is closed.
async fn drive(
    mut eventloop: EventLoop,
    client: AsyncClient,
    shared: Arc<Shared>,
    inbound: mpsc::UnboundedSender<Inbound>,
) {
    let mut backoff = crate::backoff::MQTT_LINK.start();
    let mut ever_up = false;
    loop {
        // Never dropped half-way: rumqttc's poll may be writing a packet (an ack).
        // Closing sends a DISCONNECT through the same queue, after what came before it.
        let event = eventloop.poll().await;
        match event {
            Ok(Event::Incoming(Packet::ConnAck(connack))) => {
                backoff.reset();
                if ever_up && shared.persistent && !connack.session_present {
                    // The broker lost the session (restarted without persistence, or it
                    // expired): what it had queued for us and not acknowledged is gone.
                    tracing::warn!(client_id = %shared.client_id, "mqtt persistent session lost by the broker: messages it held for this subscription are lost, uncounted");
                    metrics::counter!(crate::metrics::LOST, "subscription" => "(mqtt session lost)").increment(1);
                }
                ever_up = true;
                let subscriptions = {
                    let mut state = shared.state();
                    state.up = true;
                    if !state.subscriptions.is_empty() {
                        state.automatic += 1;
                    }
                    state.subscriptions.clone()
                };
                if !subscriptions.is_empty() {
                    // Re-made before anything else this connection sends; idempotent
                    // when the session kept them.
                    eventloop.pending.push_front(Request::Subscribe(
                        rumqttc::v5::mqttbytes::v5::Subscribe::new_many(subscriptions, None),
                    ));
                }
                let max_packet = connack.properties.as_ref().and_then(|p| p.max_packet_size);
                tracing::debug!(client_id = %shared.client_id, session_present = connack.session_present, ?max_packet, "mqtt connected");
                shared.link.send_modify(|l| {
                    l.up = true;
                    l.max_packet = max_packet;
                    l.last_error = None;
                });
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let epoch = shared.state().epoch;
                let _ = inbound.send(Inbound { publish, epoch });
            }
            Ok(Event::Incoming(Packet::PubAck(puback))) => {
                let waiter = {
                    let mut state = shared.state();
                    let waiter = state
                        .inflight
                        .get_mut(&puback.pkid)
                        .and_then(VecDeque::pop_front);
                    if state
                        .inflight
                        .get(&puback.pkid)
                        .is_some_and(VecDeque::is_empty)
                    {
                        state.inflight.remove(&puback.pkid);
                    }
                    waiter
                };
                if let Some(waiter) = waiter {
                    let outcome = match puback.reason {
                        PubAckReason::Success => Ok(true),
                        PubAckReason::NoMatchingSubscribers => Ok(false),
                        other => Err(format!(
                            "refused: {other:?}{}",
                            puback
                                .properties
                                .and_then(|p| p.reason_string)
                                .map(|s| format!(" ({s})"))
                                .unwrap_or_default()
                        )),
                    };
                    let _ = waiter.send(outcome);
                }
            }
            Ok(Event::Incoming(Packet::SubAck(suback))) => {
                let waiter = {
                    let mut state = shared.state();
                    if let Some(i) = state.automatic_ids.iter().position(|id| *id == suback.pkid) {
                        state.automatic_ids.swap_remove(i);
                        if suback
                            .return_codes
                            .iter()
                            .any(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                        {
                            tracing::warn!(client_id = %shared.client_id, codes = ?suback.return_codes, "mqtt re-subscription refused after a reconnect");
                        }
                        None
                    } else {
                        state.sub_inflight.remove(&suback.pkid)
                    }
                };
                if let Some(waiter) = waiter {
                    let refused: Vec<String> = suback
                        .return_codes
                        .iter()
                        .filter(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                        .map(|c| format!("{c:?}"))
                        .collect();
                    let _ = waiter.send(if refused.is_empty() {
                        Ok(true)
                    } else {
                        Err(format!("refused: {}", refused.join(", ")))
                    });
                }
            }
            Ok(Event::Incoming(Packet::UnsubAck(unsuback))) => {
                if let Some(waiter) = shared.state().unsub_inflight.remove(&unsuback.pkid) {
                    let _ = waiter.send(Ok(true));
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => {
                let mut state = shared.state();
                if state.collided == Some(pkid) {
                    state.collided = None;
                } else if let Some(waiter) = state.unassigned.pop_front() {
                    state.inflight.entry(pkid).or_default().push_back(waiter);
                }
            }
            // The broker closes the socket once it has read the DISCONNECT, so what was
            // sent before it (acks) is processed before a new connection with this id can
            // take the session: keep polling until then (the error below ends the loop).
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {}
            Ok(Event::Outgoing(Outgoing::AwaitAck(pkid))) => {
                let mut state = shared.state();
                if let Some(waiter) = state.unassigned.pop_front() {
                    state.inflight.entry(pkid).or_default().push_back(waiter);
                    state.collided = Some(pkid);
                }
            }
            Ok(Event::Outgoing(Outgoing::Subscribe(pkid))) => {
                let mut state = shared.state();
                if state.automatic > 0 {
                    state.automatic -= 1;
                    state.automatic_ids.push(pkid);
                } else if let Some(waiter) = state.sub_unassigned.pop_front() {
                    state.sub_inflight.insert(pkid, waiter);
                }
            }
            Ok(Event::Outgoing(Outgoing::Unsubscribe(pkid))) => {
                let mut state = shared.state();
                if let Some(waiter) = state.unsub_unassigned.pop_front() {
                    state.unsub_inflight.insert(pkid, waiter);
                }
            }
            Ok(_) => {}
            Err(error) => {
                let taken_over = matches!(
                    &error,
                    ConnectionError::MqttState(StateError::ServerDisconnect {
                        reason_code: DisconnectReasonCode::SessionTakenOver,
                        ..
                    })
                );
                let text = error.to_string();
                {
                    let mut state = shared.state();
                    state.epoch += 1;
                    state.up = false;
                    // Acks queued for the old connection must not reach the new one, and
                    // rumqttc must not re-send publishes the caller was told failed.
                    eventloop.clean();
                    eventloop.pending.retain(|r| {
                        !matches!(
                            r,
                            Request::Publish(_)
                                | Request::PubAck(_)
                                | Request::Subscribe(_)
                                | Request::Unsubscribe(_)
                        )
                    });
                    state.fail_all(&format!("connection lost: {text}"));
                    state.automatic = 0;
                    state.automatic_ids.clear();
                }
                // A first connection the broker refuses (credentials, TLS) will not
                // succeed by trying again: the caller hears it now.
                let refused = matches!(
                    &error,
                    ConnectionError::Tls(_) | ConnectionError::ConnectionRefused(_)
                ) && !ever_up;
                let closing = shared.closed.is_cancelled() || refused;
                shared.link.send_modify(|l| {
                    l.up = false;
                    l.last_error = Some(text.clone());
                    l.ended = closing || taken_over;
                    l.refused = refused;
                });
                if closing || taken_over {
                    if taken_over {
                        tracing::warn!(client_id = %shared.client_id, "mqtt session taken over by another client with the same id: this one stops");
                    }
                    break;
                }
                tracing::debug!(client_id = %shared.client_id, error = %text, "mqtt connection lost: reconnecting");
                backoff.sleep(&shared.closed).await;
            }
        }
    }
    {
        let mut state = shared.state();
        state.up = false;
        state.fail_all("the connection was closed");
    }
    shared.link.send_modify(|l| {
        l.up = false;
        l.ended = true;
    });
    drop(client);
}

/// A retained will that deletes `topic` (an empty retained message) when the
/// connection ends without a DISCONNECT.
pub(crate) fn clearing_will(topic: &str) -> LastWill {
    LastWill::new(topic, Bytes::new(), QoS::AtLeastOnce, true, None)
}
