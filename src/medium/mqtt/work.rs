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
//! if the connection dies, so publishers know whether anyone takes the work.

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
    rx: mpsc::UnboundedReceiver<Inbound>,
    again_tx: mpsc::UnboundedSender<Message>,
    again: mpsc::UnboundedReceiver<Message>,
    presence: String,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let (inner, conn, presence) = (
            Arc::clone(&self.inner),
            Arc::clone(&self.conn),
            self.presence.clone(),
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { stop(&inner, &conn, &presence).await });
        }
    }
}

/// A worker stops: it is no longer present, what it holds goes back to the work topic
/// for another worker, and its connection closes.
async fn stop(inner: &Inner, conn: &Arc<Conn>, presence: &str) {
    if let Err(error) = conn
        .publish(presence, Bytes::new(), true, PublishProperties::default())
        .await
    {
        tracing::debug!(%error, "worker presence not removed (its Will removes it)");
    }
    hand_back(inner, Some(conn)).await;
    conn.close().await;
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
        let id = job.message.id.clone();
        let payload = match bson::to_vec(&job.message) {
            Ok(p) => Bytes::from(p),
            Err(error) => {
                tracing::warn!(message_id = %id, %error, "job not handed back: not encodable");
                continue;
            }
        };
        let mut properties = job.properties().cloned().unwrap_or_default();
        properties.subscription_identifiers.clear();
        properties.topic_alias = None;
        match job
            .conn
            .publish(&job.topic(), payload, false, properties)
            .await
        {
            Ok(()) => {
                job.conn.ack(&job.inbound).await;
                tracing::info!(message_id = %id, "job handed back by a stopping worker");
            }
            Err(error) => {
                tracing::warn!(message_id = %id, %error, "job not handed back: the broker sends it again only if this session resumes")
            }
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
                inbound = self.rx.recv() => inbound,
            };
            let Some(inbound) = inbound else {
                return Some((
                    Err(Error::Unavailable {
                        medium: "mqtt",
                        reason: "the worker's connection ended".into(),
                    }),
                    self,
                ));
            };
            let mut message = match bson::from_slice::<Message>(&inbound.publish.payload) {
                Ok(message) => message,
                Err(error) => {
                    let topic = String::from_utf8_lossy(&inbound.publish.topic).into_owned();
                    tracing::warn!(%topic, %error, "a payload on a work topic is not a message: dead-lettered");
                    metrics::counter!(crate::metrics::DEAD_LETTERED, "reason" => "unreadable")
                        .increment(1);
                    let document = doc! {
                        "topic": &topic,
                        "payload": bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: inbound.publish.payload.to_vec() },
                    };
                    match self
                        .inner
                        .write_dead(document, format!("not a readable message: {error}"))
                        .await
                    {
                        Ok(()) => self.conn.ack(&inbound).await,
                        Err(error) => {
                            tracing::warn!(%topic, %error, "unreadable job not dead-lettered: not acknowledged")
                        }
                    }
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
            lock(&self.inner.jobs).insert(message.id.clone(), job);
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
    let announced = async {
        conn.subscribe(filters, true).await?;
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
    let (again_tx, again) = mpsc::unbounded_channel();
    let worker = Worker {
        inner: Arc::clone(inner),
        conn,
        rx,
        again_tx,
        again,
        presence,
    };
    Ok(futures::stream::unfold(worker, Worker::next).boxed())
}

/// Sends a request's outcome to its Response Topic, if it has one.
async fn reply(job: &Job, outcome: &Message) -> Result<()> {
    let Some(properties) = job.properties() else {
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
    job.conn.publish(&topic, payload, false, reply).await
}

/// Ends a job held by a worker of this process.
pub(crate) async fn settle(inner: &Inner, id: &str, settlement: Settlement) -> Result<bool> {
    let (outcome, conn, inbound) = {
        let mut jobs = lock(&inner.jobs);
        let Some(job) = jobs.get_mut(id) else {
            return Ok(false);
        };
        let mut outcome = job.message.clone();
        match settlement {
            Settlement::Retry { error, after } => {
                job.message.last_error = Some(error);
                let again = job.message.clone();
                let tx = job.again.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    let _ = tx.send(again);
                });
                return Ok(true);
            }
            Settlement::Done(result) => {
                outcome.state = Some(State::Done);
                outcome.result = result;
            }
            Settlement::Failed(error) => {
                outcome.state = Some(State::Error);
                outcome.response = Some(error);
            }
        }
        outcome.response_ts = Some(now_nanos());
        (outcome, Arc::clone(&job.conn), Arc::clone(&job.inbound))
    };
    let job = Job {
        conn: Arc::clone(&conn),
        inbound: Arc::clone(&inbound),
        message: outcome.clone(),
        again: mpsc::unbounded_channel().0,
    };
    // Answered first, acknowledged after: a crash in between answers twice, never none.
    reply(&job, &outcome).await?;
    lock(&inner.jobs).remove(id);
    conn.ack(&inbound).await;
    Ok(true)
}

/// Moves a job that used up its attempts to the dead letters.
pub(crate) async fn bury(inner: &Inner, id: &str, reason: &str) -> Result<bool> {
    let (outcome, conn, inbound) = {
        let jobs = lock(&inner.jobs);
        let Some(job) = jobs.get(id) else {
            return Ok(false);
        };
        let mut outcome = job.message.clone();
        outcome.state = Some(State::Error);
        outcome.response = Some(doc! { "error": reason, "dead": true });
        outcome.response_ts = Some(now_nanos());
        (outcome, Arc::clone(&job.conn), Arc::clone(&job.inbound))
    };
    let document = bson::to_document(&outcome).map_err(PayloadError::from)?;
    inner.write_dead(document, reason.to_string()).await?;
    let job = Job {
        conn: Arc::clone(&conn),
        inbound: Arc::clone(&inbound),
        message: outcome.clone(),
        again: mpsc::unbounded_channel().0,
    };
    reply(&job, &outcome).await?;
    lock(&inner.jobs).remove(id);
    conn.ack(&inbound).await;
    Ok(true)
}
