//! Work and requests over MQTT: pushed to one worker of a service by a shared
//! subscription, never stored for a claim.
//!
//! Why it exists: MQTT 5's shared subscriptions (`$share/<service>/…`) give each
//! message to one member of the group, which is "exactly one instance of the service"
//! without a queue in a database. Each worker has a connection of its own with Receive
//! Maximum 1, so the broker sends it the next job only after it acknowledged the last
//! one; the acknowledgement (PUBACK) is sent when the job is settled, so a job is never
//! acknowledged before its handler finished. A failed job stays unacknowledged and runs
//! again in the same worker after its back-off; after its last attempt it goes to the
//! dead letters. A request's outcome goes to the request's Response Topic with its
//! Correlation Data. The worker's presence is a retained message that its Will deletes
//! if the connection dies, so publishers know whether anyone takes the work. A worker
//! that stops (or whose bus shuts down) leaves its shared subscriptions and hands back
//! what it holds and what the broker had queued for it: to another worker of the
//! service, or to the dead letters if it was the last one.

use std::sync::Arc;

use bson::doc;
use bytes::Bytes;
use futures::StreamExt;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use tokio::sync::mpsc;

use super::connection::{clearing_will, Conn, Inbound, Session};
use super::{lock, short_id, Inner};
use crate::error::{Error, PayloadError, Result};
use crate::medium::{ClaimRequest, Settlement, WorkStream};
use crate::message::{now_nanos, Message, State};

/// A job held by a worker of this process until it is settled.
pub(crate) struct Job {
    conn: Arc<Conn>,
    inbound: Arc<Inbound>,
    /// The job as last handed to the worker.
    message: Message,
    /// Sends the job back to its worker for another attempt.
    again: mpsc::UnboundedSender<Message>,
}

impl Job {
    fn topic(&self) -> String {
        String::from_utf8_lossy(&self.inbound.publish.topic).into_owned()
    }

    fn properties(&self) -> Option<&PublishProperties> {
        self.inbound.publish.properties.as_ref()
    }
}

struct Worker {
    inner: Arc<Inner>,
    conn: Arc<Conn>,
    /// Taken by the stop that drains it.
    rx: Option<mpsc::UnboundedReceiver<Inbound>>,
    again_tx: mpsc::UnboundedSender<Message>,
    again: mpsc::UnboundedReceiver<Message>,
    presence: String,
    /// Set when the worker stops (see [`Stopping`]).
    leaving: Arc<std::sync::atomic::AtomicBool>,
    /// The shared subscriptions, left first when the worker stops.
    filters: Vec<String>,
    service: String,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let stopping = Stopping {
            inner: Arc::clone(&self.inner),
            conn: Arc::clone(&self.conn),
            leaving: Arc::clone(&self.leaving),
            rx: self.rx.take(),
            presence: self.presence.clone(),
            filters: std::mem::take(&mut self.filters),
            service: self.service.clone(),
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let stop = runtime.spawn(stopping.run());
            let mut stops = lock(&self.inner.stopping);
            stops.retain(|s| !s.is_finished());
            stops.push(stop);
        }
        self.inner
            .live_workers
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// How long a stopping worker spends handing its jobs back.
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A worker that stops: it is no longer present, leaves its shared subscriptions,
/// hands back what the broker had queued for it (up to a fence) and what it holds,
/// then closes. Mosquitto hands a shared subscription's messages round-robin and
/// discards what it queued for a connection that goes away, so this is what keeps a
/// clean stop from losing jobs.
struct Stopping {
    inner: Arc<Inner>,
    conn: Arc<Conn>,
    /// Set when the stop begins: the presence is not announced again after it.
    leaving: Arc<std::sync::atomic::AtomicBool>,
    rx: Option<mpsc::UnboundedReceiver<Inbound>>,
    presence: String,
    filters: Vec<String>,
    service: String,
}

impl Stopping {
    async fn run(mut self) {
        self.leaving
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // What it holds first: a held job takes the connection's only delivery slot
        // (Receive Maximum 1), so nothing queued behind it, the fence included, can
        // arrive before it is acknowledged.
        hand_back(&self.inner, Some(&self.conn)).await;
        let drained = tokio::time::timeout(STOP_WAIT, self.drain()).await;
        if drained.is_err() {
            tracing::warn!(client_id = %self.conn.client_id(), "worker stop: jobs not all handed back in time");
        }
        self.conn.close().await;
    }

    async fn drain(&mut self) {
        let conn = &self.conn;
        if let Err(error) = conn
            .publish(
                &self.presence,
                Bytes::new(),
                true,
                PublishProperties::default(),
            )
            .await
        {
            tracing::debug!(%error, "worker presence not removed (its Will removes it)");
        }
        for filter in &self.filters {
            if let Err(error) = conn.unsubscribe(filter).await {
                tracing::debug!(%error, %filter, "shared subscription not left");
                return;
            }
        }
        let Some(rx) = self.rx.as_mut() else { return };
        let fence = self.inner.topics.fence(conn.client_id());
        let token = short_id();
        if conn
            .publish(
                &fence,
                Bytes::from(token.clone().into_bytes()),
                false,
                PublishProperties::default(),
            )
            .await
            .is_err()
        {
            return;
        }
        while let Some(inbound) = rx.recv().await {
            if inbound.publish.topic.as_ref() == fence.as_bytes() {
                conn.ack(&inbound).await;
                if inbound.publish.payload.as_ref() == token.as_bytes() {
                    return;
                }
                continue;
            }
            let Ok(message) = bson::from_slice::<Message>(&inbound.publish.payload) else {
                conn.ack(&inbound).await;
                continue;
            };
            let job = Job {
                conn: Arc::clone(conn),
                inbound: Arc::new(inbound),
                message,
                again: mpsc::unbounded_channel().0,
            };
            give_back(&self.inner, job, &self.service).await;
        }
    }
}

/// Republishes the jobs held by `conn` (all workers when `None`) to their work topic,
/// then acknowledges them: a worker that stops does not take its jobs with it.
async fn hand_back(inner: &Inner, conn: Option<&Arc<Conn>>) {
    let held: Vec<Job> = {
        let mut jobs = lock(&inner.jobs);
        let ids: Vec<String> = jobs
            .iter()
            .filter(|(_, j)| conn.is_none_or(|c| Arc::ptr_eq(c, &j.conn)))
            .map(|(id, _)| id.clone())
            .collect();
        ids.into_iter().filter_map(|id| jobs.remove(&id)).collect()
    };
    for job in held {
        let service = job.message.dest_service.clone().unwrap_or_default();
        give_back(inner, job, &service).await;
    }
}

/// Gives one job back: to the other workers of its service if one is present, else to
/// the dead letters (`intracom dead retry` sends it again); then acknowledges it.
async fn give_back(inner: &Inner, job: Job, service: &str) {
    let id = job.message.id.clone();
    let me = super::topics::sanitize(job.conn.client_id());
    let others = inner.worker_present(service, &job.message.action, Some(&me));
    let mut handed = false;
    if others {
        let mut properties = job.properties().cloned().unwrap_or_default();
        properties.subscription_identifiers.clear();
        properties.topic_alias = None;
        let sent = match bson::to_vec(&job.message) {
            Ok(payload) => {
                job.conn
                    .publish_matched(&job.topic(), Bytes::from(payload), false, properties)
                    .await
            }
            Err(error) => Err(PayloadError::from(error).into()),
        };
        match sent {
            Ok(true) => handed = true,
            // The other worker left meanwhile: the broker dropped it; dead-letter it.
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(message_id = %id, %error, "stopping worker: job not handed back to another worker")
            }
        }
    }
    let outcome = if handed {
        Ok("handed back to another worker")
    } else {
        match bson::to_document(&job.message) {
            Ok(document) => inner
                .write_dead(
                    document,
                    format!("the last worker of `{service}` stopped with this job"),
                )
                .await
                .map(|()| "dead-lettered: no other worker"),
            Err(error) => Err(PayloadError::from(error).into()),
        }
    };
    match outcome {
        Ok(what) => {
            job.conn.ack(&job.inbound).await;
            tracing::info!(message_id = %id, "stopping worker: job {what}");
        }
        Err(error) => {
            tracing::warn!(message_id = %id, %error, "stopping worker: job not handed back")
        }
    }
}

/// At close: every worker of this process hands its jobs back.
pub(crate) async fn hand_back_all(inner: &Inner) {
    hand_back(inner, None).await;
}

impl Worker {
    async fn next(mut self) -> Option<(Result<Message>, Self)> {
        loop {
            let inbound = tokio::select! {
                _ = self.inner.closed.cancelled() => return None,
                again = self.again.recv() => {
                    let mut message = again?;
                    // Another attempt of a job this worker holds.
                    message.attempts += 1;
                    if let Some(job) = lock(&self.inner.jobs).get_mut(&message.id) {
                        job.message = message.clone();
                    }
                    return Some((Ok(message), self));
                }
                inbound = async {
                    match self.rx.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => None,
                    }
                } => inbound,
            };
            let Some(inbound) = inbound else {
                return Some((
                    Err(Error::unavailable("mqtt", "the worker's connection ended")),
                    self,
                ));
            };
            if self
                .inner
                .topics
                .kind(&String::from_utf8_lossy(&inbound.publish.topic))
                == Some("fence")
            {
                // A stop's fence from an earlier connection of this worker: not a job.
                self.conn.ack(&inbound).await;
                continue;
            }
            let mut message = match bson::from_slice::<Message>(&inbound.publish.payload) {
                Ok(message) => message,
                Err(error) => {
                    // Acknowledged even if it could not be dead-lettered: an
                    // unacknowledged message holds the worker's only delivery slot
                    // (the broker sends it again only on a new connection).
                    if let Err(dead) = self
                        .inner
                        .dead_letter_unreadable(&inbound.publish, &error)
                        .await
                    {
                        tracing::error!(error = %dead, "unreadable job dropped: its dead letter was not written");
                    }
                    self.conn.ack(&inbound).await;
                    continue;
                }
            };
            if message.state.unwrap_or(State::Pending) != State::Pending {
                self.conn.ack(&inbound).await;
                continue;
            }
            message.attempts += 1;
            let job = Job {
                conn: Arc::clone(&self.conn),
                inbound: Arc::new(inbound),
                message: message.clone(),
                again: self.again_tx.clone(),
            };
            let duplicate = {
                let mut jobs = lock(&self.inner.jobs);
                if jobs.contains_key(&message.id) {
                    Some(job)
                } else {
                    jobs.insert(message.id.clone(), job);
                    None
                }
            };
            if let Some(copy) = duplicate {
                // A second copy (an outbox that sent it again after a lost PUBACK) while
                // a worker of this process holds the first: that one settles it.
                tracing::debug!(message_id = %message.id, "a copy of a job held here: acknowledged, not run twice");
                self.conn.ack(&copy.inbound).await;
                continue;
            }
            return Some((Ok(message), self));
        }
    }
}

/// Subscribes a worker to the shared subscriptions of `request`'s actions and
/// announces it.
pub(crate) async fn receive(inner: &Arc<Inner>, request: &ClaimRequest) -> Result<WorkStream> {
    let mut filters = Vec::new();
    for action in &request.actions {
        filters.push(inner.topics.work_share(&request.service, action)?);
    }
    let client_id = format!(
        "{}w-{}-{}",
        inner.config.mqtt.client_id_prefix,
        request.service,
        short_id()
    );
    let presence = inner.topics.worker(&request.service, &client_id)?;
    let (conn, rx) = inner
        .open(Session {
            client_id,
            persistent: false,
            expiry_secs: 0,
            receive_maximum: 1,
            will: Some(clearing_will(&presence)),
        })
        .await?;
    let filter_paths: Vec<String> = filters.iter().map(|f| f.path.clone()).collect();
    let fence = inner.topics.fence(conn.client_id());
    let announced = async {
        conn.subscribe(filters, true).await?;
        conn.subscribe(
            vec![rumqttc::v5::mqttbytes::v5::Filter::new(
                fence,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            )],
            true,
        )
        .await?;
        conn.publish(
            &presence,
            Bytes::from(request.actions.join("\n").into_bytes()),
            true,
            PublishProperties::default(),
        )
        .await
    };
    if let Err(error) = announced.await {
        conn.close().await;
        return Err(error);
    }
    tracing::debug!(client_id = %conn.client_id(), service = %request.service, actions = ?request.actions, "mqtt worker subscribed");
    let leaving = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn(announce_again(
        Arc::downgrade(&conn),
        presence.clone(),
        Bytes::from(request.actions.join("\n").into_bytes()),
        Arc::clone(&leaving),
    ));
    let (again_tx, again) = mpsc::unbounded_channel();
    inner.live_workers.send_modify(|n| *n += 1);
    let worker = Worker {
        inner: Arc::clone(inner),
        conn,
        rx: Some(rx),
        again_tx,
        again,
        presence,
        leaving,
        filters: filter_paths,
        service: request.service.clone(),
    };
    Ok(futures::stream::unfold(worker, Worker::next).boxed())
}

/// Announces a worker again after each reconnection of its connection: a lost
/// connection fires its Will, which deletes the presence, and the worker is back.
async fn announce_again(
    conn: std::sync::Weak<Conn>,
    topic: String,
    actions: Bytes,
    leaving: Arc<std::sync::atomic::AtomicBool>,
) {
    let Some(mut link) = conn.upgrade().map(|c| c.link_changes()) else {
        return;
    };
    let mut was_up = link.borrow_and_update().up;
    while link.changed().await.is_ok() {
        let (up, ended) = {
            let link = link.borrow_and_update();
            (link.up, link.ended)
        };
        if ended || leaving.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        if up && !was_up {
            let Some(conn) = conn.upgrade() else { return };
            match conn
                .publish(&topic, actions.clone(), true, PublishProperties::default())
                .await
            {
                Ok(()) => {
                    tracing::info!(client_id = %conn.client_id(), "mqtt worker reconnected: presence announced again")
                }
                Err(error) => {
                    tracing::warn!(client_id = %conn.client_id(), %error, "mqtt worker reconnected, presence not announced (the next reconnection tries again)")
                }
            }
        }
        was_up = up;
    }
}

/// Sends a request's outcome to its Response Topic, if it has one.
async fn reply(conn: &Conn, inbound: &Inbound, outcome: &Message) -> Result<()> {
    let Some(properties) = inbound.publish.properties.as_ref() else {
        return Ok(());
    };
    let Some(topic) = properties.response_topic.clone() else {
        return Ok(());
    };
    let payload = Bytes::from(bson::to_vec(outcome).map_err(PayloadError::from)?);
    let reply = PublishProperties {
        correlation_data: properties.correlation_data.clone(),
        message_expiry_interval: properties.message_expiry_interval,
        content_type: Some("application/bson".into()),
        ..PublishProperties::default()
    };
    conn.publish(&topic, payload, false, reply).await
}

/// The held job `id`, as its outcome would be stored, with its connection and packet.
fn held(inner: &Inner, id: &str) -> Option<(Message, Arc<Conn>, Arc<Inbound>)> {
    let jobs = lock(&inner.jobs);
    let job = jobs.get(id)?;
    Some((
        job.message.clone(),
        Arc::clone(&job.conn),
        Arc::clone(&job.inbound),
    ))
}

/// Answers (if it is a request), forgets and acknowledges a held job. Answered first,
/// acknowledged after: a crash in between answers twice, never none.
async fn finish(
    inner: &Inner,
    id: &str,
    conn: &Conn,
    inbound: &Inbound,
    outcome: &Message,
) -> Result<()> {
    if let Err(error) = reply(conn, inbound, outcome).await {
        if error.is_retryable() {
            // The worker's loop tries again while it holds the job.
            return Err(error);
        }
        // Refused for good (an ACL, a reply over the broker's limit): the job is still
        // acknowledged, or it would hold the worker's only delivery slot forever.
        tracing::error!(message_id = %id, %error, "the request's outcome cannot be sent: its caller will time out");
    }
    lock(&inner.jobs).remove(id);
    conn.ack(inbound).await;
    Ok(())
}

/// Ends a job held by a worker of this process.
pub(crate) async fn settle(inner: &Inner, id: &str, settlement: Settlement) -> Result<bool> {
    if let Settlement::Retry { error, after } = settlement {
        let mut jobs = lock(&inner.jobs);
        let Some(job) = jobs.get_mut(id) else {
            return Ok(false);
        };
        // The job stays unacknowledged; its worker runs it again after the back-off.
        job.message.last_error = Some(error);
        let (again, tx) = (job.message.clone(), job.again.clone());
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = tx.send(again);
        });
        return Ok(true);
    }
    let Some((mut outcome, conn, inbound)) = held(inner, id) else {
        return Ok(false);
    };
    match settlement {
        Settlement::Done(result) => {
            outcome.state = Some(State::Done);
            outcome.result = result;
        }
        Settlement::Failed(error) => {
            outcome.state = Some(State::Error);
            outcome.response = Some(error);
        }
        Settlement::Retry { .. } => return Ok(false),
    }
    outcome.response_ts = Some(now_nanos());
    finish(inner, id, &conn, &inbound, &outcome).await?;
    Ok(true)
}

/// Moves a job that used up its attempts to the dead letters.
pub(crate) async fn bury(inner: &Inner, id: &str, reason: &str) -> Result<bool> {
    let Some((mut outcome, conn, inbound)) = held(inner, id) else {
        return Ok(false);
    };
    outcome.state = Some(State::Error);
    outcome.response = Some(doc! { "error": reason, "dead": true });
    outcome.response_ts = Some(now_nanos());
    let written = match bson::to_document(&outcome) {
        Ok(document) => inner.write_dead(document, reason.to_string()).await,
        Err(error) => Err(PayloadError::from(error).into()),
    };
    match written {
        Ok(()) => {}
        Err(error) if error.is_retryable() => return Err(error),
        // Acknowledged all the same, or it would hold the worker's only delivery slot.
        Err(error) => {
            tracing::error!(message_id = %id, %error, "job dropped: its dead letter cannot be written")
        }
    }
    finish(inner, id, &conn, &inbound, &outcome).await?;
    Ok(true)
}
