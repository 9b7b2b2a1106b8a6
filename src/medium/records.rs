//! Idempotency records kept in process memory: the memory medium's store, and the
//! fall-back of the bus when a medium's store cannot be reached. Same rules as the
//! `processed` collection: one record per (consumer, message id), reserved with a lease
//! while a handler runs, done with its result after, expired after the retention.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bson::Document;

use super::{ProcessedRecord, Reservation};

type Key = (String, String);

enum State {
    Running { owner: String, until: Instant },
    Done(Option<Document>),
}

struct Record {
    state: State,
    expires: Instant,
    /// When it was reserved, or done.
    at: bson::DateTime,
}

#[derive(Default)]
struct Records {
    map: HashMap<Key, Record>,
    /// Keys oldest first, to drop the oldest past the capacity.
    order: VecDeque<Key>,
}

pub(crate) struct LocalRecords {
    records: Mutex<Records>,
    capacity: usize,
    retention: Duration,
}

impl LocalRecords {
    pub(crate) fn new(capacity: usize, retention: Duration) -> Self {
        LocalRecords {
            records: Mutex::new(Records::default()),
            capacity: capacity.max(1),
            retention,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Records> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn reserve(
        &self,
        consumer: &str,
        id: &str,
        owner: &str,
        lease: Duration,
    ) -> Reservation {
        let now = Instant::now();
        let key = (consumer.to_string(), id.to_string());
        let mut records = self.lock();
        let free = match records.map.get(&key) {
            None => true,
            Some(record) if record.expires <= now => true,
            Some(Record {
                state: State::Done(result),
                ..
            }) => return Reservation::Done(result.clone()),
            Some(Record {
                state:
                    State::Running {
                        owner: holder,
                        until,
                    },
                ..
            }) => holder == owner || *until <= now,
        };
        if !free {
            return Reservation::Busy;
        }
        let fresh = !records.map.contains_key(&key);
        records.map.insert(
            key.clone(),
            Record {
                state: State::Running {
                    owner: owner.to_string(),
                    until: now + lease,
                },
                expires: crate::deadline::later(now, self.retention),
                at: bson::DateTime::now(),
            },
        );
        if fresh {
            records.order.push_back(key);
            while records.order.len() > self.capacity {
                if let Some(old) = records.order.pop_front() {
                    records.map.remove(&old);
                }
            }
        }
        Reservation::Reserved
    }

    /// Marks `owner`'s reservation done; false when `owner` no longer holds it (its
    /// lease lapsed and another owner took it over, or it is gone).
    pub(crate) fn complete(
        &self,
        consumer: &str,
        id: &str,
        owner: &str,
        result: Option<Document>,
    ) -> bool {
        let mut records = self.lock();
        if let Some(record) = records.map.get_mut(&(consumer.to_string(), id.to_string())) {
            if matches!(&record.state, State::Running { owner: holder, .. } if holder == owner) {
                record.state = State::Done(result);
                record.at = bson::DateTime::now();
                return true;
            }
        }
        false
    }

    pub(crate) fn release(&self, consumer: &str, id: &str, owner: &str) {
        let key = (consumer.to_string(), id.to_string());
        let mut records = self.lock();
        if matches!(records.map.get(&key), Some(Record { state: State::Running { owner: holder, .. }, .. }) if holder == owner)
        {
            records.map.remove(&key);
            records.order.retain(|k| *k != key);
        }
    }

    /// The result of a done record, if the message is done.
    pub(crate) fn done(&self, consumer: &str, id: &str) -> Option<Option<Document>> {
        let records = self.lock();
        match records.map.get(&(consumer.to_string(), id.to_string())) {
            Some(Record {
                state: State::Done(result),
                expires,
                ..
            }) if *expires > Instant::now() => Some(result.clone()),
            _ => None,
        }
    }

    /// The record of (`consumer`, `id`), unless it expired.
    pub(crate) fn get(&self, consumer: &str, id: &str) -> Option<ProcessedRecord> {
        let records = self.lock();
        let record = records
            .map
            .get(&(consumer.to_string(), id.to_string()))
            .filter(|r| r.expires > Instant::now())?;
        let (done, result) = match &record.state {
            State::Done(result) => (true, result.clone()),
            State::Running { .. } => (false, None),
        };
        Some(ProcessedRecord {
            consumer: consumer.to_string(),
            id: id.to_string(),
            done,
            result,
            at: Some(record.at),
        })
    }

    /// Removes the record of (`consumer`, `id`) whatever its state; true if there was one.
    pub(crate) fn remove(&self, consumer: &str, id: &str) -> bool {
        let key = (consumer.to_string(), id.to_string());
        let mut records = self.lock();
        let removed = records.map.remove(&key).is_some();
        if removed {
            records.order.retain(|k| *k != key);
        }
        removed
    }

    /// The done records, unexpired (to write them to a store that is back; each is
    /// removed once the store has it).
    pub(crate) fn done_records(&self) -> Vec<(String, String, Option<Document>)> {
        let now = Instant::now();
        self.lock()
            .map
            .iter()
            .filter_map(|((consumer, id), record)| match &record.state {
                State::Done(result) if record.expires > now => {
                    Some((consumer.clone(), id.clone(), result.clone()))
                }
                _ => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_a_lapsed_lease_is_taken_over() {
        let r = LocalRecords::new(10, Duration::from_secs(60));
        // a's lease: a second, for `b` to find it busy even on a loaded machine.
        assert_eq!(
            r.reserve("c", "m", "a", Duration::from_secs(1)),
            Reservation::Reserved
        );
        assert_eq!(
            r.reserve("c", "m", "b", Duration::from_secs(60)),
            Reservation::Busy
        );
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(
            r.reserve("c", "m", "b", Duration::from_secs(60)),
            Reservation::Reserved,
            "a's lease lapsed"
        );
        r.complete("c", "m", "a", None);
        assert_eq!(
            r.reserve("c", "m", "x", Duration::from_secs(1)),
            Reservation::Busy,
            "a lost it: its completion does not count"
        );
        r.complete("c", "m", "b", Some(bson::doc! { "n": 1 }));
        assert_eq!(
            r.reserve("c", "m", "x", Duration::from_secs(1)),
            Reservation::Done(Some(bson::doc! { "n": 1 }))
        );
        assert_eq!(
            r.reserve("other", "m", "x", Duration::from_secs(1)),
            Reservation::Reserved,
            "per consumer"
        );
        r.release("other", "m", "x");
        assert_eq!(
            r.reserve("other", "m", "y", Duration::from_secs(1)),
            Reservation::Reserved,
            "released: runs again"
        );
        assert!(r.get("c", "m").is_some_and(|record| record.done));
        assert!(r.get("other", "m").is_some_and(|record| !record.done));
        assert!(r.remove("other", "m"));
        assert!(r.get("other", "m").is_none());
        assert_eq!(r.done_records().len(), 1);
    }
}
