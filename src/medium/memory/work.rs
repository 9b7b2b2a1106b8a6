//! Work (`delivery: one`): the state of each work message, its service's queue in
//! claim order, and the claims, leases and settlements on them.

use std::cmp::Reverse;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bson::{doc, Document};

use crate::error::Result;
use crate::medium::{ClaimRequest, DeadLetterStore, Settlement, WorkQueue};
use crate::message::{now_nanos, Lease, Message, State};

use super::{read, write, MemoryMedium};

pub(super) type WorkKey = (Reverse<i32>, u64, String);

/// The mutable part of a work message (the stored message itself never changes).
pub(super) struct Work {
    pub(super) message: Arc<Message>,
    pub(super) seq: u64,
    pub(super) state: State,
    pub(super) attempts: i32,
    pub(super) lease: Option<Lease>,
    pub(super) last_error: Option<String>,
    pub(super) result: Option<Document>,
    pub(super) response: Option<Document>,
    pub(super) response_ts: Option<i64>,
}

impl Work {
    /// The message as it stands now, as a database would return the document.
    pub(super) fn current(&self) -> Message {
        let mut m = (*self.message).clone();
        m.state = Some(self.state);
        m.attempts = self.attempts;
        m.lease.clone_from(&self.lease);
        m.last_error.clone_from(&self.last_error);
        m.result.clone_from(&self.result);
        m.response.clone_from(&self.response);
        m.response_ts = self.response_ts;
        m
    }

    /// Whether `owner` holds the lease of this work.
    pub(super) fn held_by(&self, owner: &str) -> bool {
        self.lease.as_ref().is_some_and(|l| l.owner == owner)
    }

    pub(super) fn key(&self) -> WorkKey {
        (
            Reverse(self.message.priority),
            self.seq,
            self.message.id.clone(),
        )
    }
}

#[async_trait]
impl WorkQueue for MemoryMedium {
    async fn claim(&self, request: &ClaimRequest) -> Result<Option<Message>> {
        if self.shared.closed.is_stopped() {
            return Err(crate::Error::Shutdown);
        }
        let now = bson::DateTime::now();
        let mut guard = write(&self.shared.log);
        let log = &mut *guard;
        let Some(queue) = log.queues.get(&request.service) else {
            return Ok(None);
        };
        let picked = queue.iter().find_map(|(_, _, id)| {
            let work = log.work.get(id)?;
            let free = work.lease.as_ref().is_none_or(|l| l.until() <= now);
            (free && request.actions.contains(&work.message.action)).then(|| id.clone())
        });
        let Some(work) = picked.and_then(|id| log.work.get_mut(&id)) else {
            return Ok(None);
        };
        work.attempts += 1;
        work.lease = Some(lease(&request.owner, now, request.lease));
        Ok(Some(work.current()))
    }

    async fn renew(&self, id: &str, owner: &str, duration: Duration) -> Result<bool> {
        let mut log = write(&self.shared.log);
        match log.work.get_mut(id) {
            Some(work) if work.state == State::Pending && work.held_by(owner) => {
                work.lease = Some(lease(owner, bson::DateTime::now(), duration));
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn settle(&self, id: &str, owner: Option<&str>, settlement: Settlement) -> Result<bool> {
        let finished = {
            let mut guard = write(&self.shared.log);
            let log = &mut *guard;
            let Some(work) = log.work.get_mut(id) else {
                return Ok(false);
            };
            let holds = owner.is_none_or(|o| work.held_by(o));
            if work.state != State::Pending || !holds {
                return Ok(false);
            }
            let finished = !matches!(settlement, Settlement::Retry { .. });
            match settlement {
                Settlement::Done(result) => {
                    work.state = State::Done;
                    work.result = result;
                }
                Settlement::Failed(error) => {
                    work.state = State::Error;
                    work.response = Some(error);
                }
                Settlement::Retry { error, after } => {
                    work.last_error = Some(error);
                    work.lease = Some(lease("backoff", bson::DateTime::now(), after));
                }
            }
            if finished {
                work.lease = None;
                work.response_ts = Some(now_nanos());
                log.dequeue(id);
            }
            finished
        };
        if finished {
            self.shared.outcomes.send_modify(|n| *n += 1);
        }
        Ok(true)
    }

    async fn bury(&self, id: &str, owner: &str, reason: &str) -> Result<bool> {
        let document = {
            let mut guard = write(&self.shared.log);
            let log = &mut *guard;
            let Some(work) = log.work.get_mut(id) else {
                return Ok(false);
            };
            if work.state != State::Pending || !work.held_by(owner) {
                return Ok(false);
            }
            work.state = State::Error;
            work.lease = None;
            work.response = Some(doc! { "error": reason, "dead": true });
            work.response_ts = Some(now_nanos());
            let document =
                bson::to_document(&work.current()).map_err(crate::error::PayloadError::from)?;
            log.dequeue(id);
            document
        };
        self.shared.outcomes.send_modify(|n| *n += 1);
        self.dead_letter(document, reason.to_string()).await?;
        Ok(true)
    }

    async fn await_outcome(&self, id: &str, timeout: Duration) -> Result<Option<Message>> {
        let deadline = crate::deadline::after(timeout);
        let mut outcomes = self.shared.outcomes.subscribe();
        loop {
            outcomes.borrow_and_update();
            {
                let log = read(&self.shared.log);
                if let Some(work) = log.work.get(id) {
                    if work.state != State::Pending {
                        return Ok(Some(work.current()));
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return Ok(None),
                _ = self.shared.closed.token().cancelled() => return Err(crate::Error::Shutdown),
                changed = outcomes.changed() => if changed.is_err() { return Ok(None) },
            }
        }
    }

    async fn work_services(&self, id: &str) -> Result<Option<(String, Option<String>)>> {
        let log = read(&self.shared.log);
        Ok(log.work.get(id).map(|work| {
            (
                work.message.source_service.clone(),
                work.message.dest_service.clone(),
            )
        }))
    }
}

/// A lease for `owner` taken at `at` (the medium's clock) for `d`.
pub(super) fn lease(owner: &str, at: bson::DateTime, d: Duration) -> Lease {
    Lease {
        owner: owner.to_string(),
        at,
        ms: i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
    }
}
