//! What an operator reads and repairs: counts, queues, idempotency records.

use std::collections::HashMap;
use std::time::Instant;

use async_trait::async_trait;
use bson::doc;

use crate::error::Result;
use crate::medium::{Count, Inspection, Lag, ProcessedRecord, QueueStats, Stats};
use crate::message::{now_nanos, State};

use super::{lock, read, write, MemoryMedium};

#[async_trait]
impl Inspection for MemoryMedium {
    async fn stats(&self) -> Result<Stats> {
        let mut stats = Stats::default();
        let checkpoints = lock(&self.shared.checkpoints).clone();
        stats.dead = lock(&self.shared.dead).len() as u64;
        let log = read(&self.shared.log);
        let live_first = log.live_first_seq(Instant::now());
        let live = log
            .entries
            .range((live_first - log.first_seq) as usize..)
            .collect::<Vec<_>>();
        let mut by_service: HashMap<&str, u64> = HashMap::new();
        let mut by_action: HashMap<&str, u64> = HashMap::new();
        let mut by_type: HashMap<&str, u64> = HashMap::new();
        let mut by_state: HashMap<&str, u64> = HashMap::new();
        for entry in &live {
            let m = &entry.message;
            *by_service.entry(&m.source_service).or_default() += 1;
            *by_action.entry(&m.action).or_default() += 1;
            *by_type.entry(m.kind.as_str()).or_default() += 1;
            let state = log.work.get(&m.id).map(|w| w.state).or(m.state);
            if let Some(state) = state {
                *by_state.entry(state.as_str()).or_default() += 1;
            }
        }
        stats.total = live.len() as u64;
        stats.by_service = largest_first(by_service);
        stats.by_action = largest_first(by_action);
        stats.by_type = largest_first(by_type);
        stats.by_state = largest_first(by_state);
        stats.queue_depth = log.queues.values().map(|q| q.len() as u64).sum();
        let newest = live.last().and_then(|e| e.message.ts);
        let mut names: Vec<_> = checkpoints.into_iter().collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, position) in names {
            let after = position
                .token
                .as_ref()
                .and_then(|t| t.get_i64("seq").ok())
                .and_then(|s| u64::try_from(s).ok())
                .or_else(|| log.seq_at_or_before(position.ts))
                .unwrap_or(0);
            let behind = (log.next_seq - 1).saturating_sub(after.max(live_first - 1));
            let seconds = newest.map_or(0, |n| u64::from(n.time.saturating_sub(position.ts.time)));
            stats.lag.push(Lag::new(name, behind, seconds));
        }
        Ok(stats)
    }

    async fn queues(&self) -> Result<Vec<QueueStats>> {
        let now = bson::DateTime::now();
        let mut queues: std::collections::BTreeMap<(String, String), QueueStats> =
            Default::default();
        let mut count = |service: &str, action: &str, add: fn(&mut QueueStats)| {
            add(queues
                .entry((service.to_string(), action.to_string()))
                .or_insert_with(|| QueueStats::new(service, action)))
        };
        {
            let log = read(&self.shared.log);
            for work in log.work.values() {
                let Some(service) = &work.message.dest_service else {
                    continue;
                };
                if work.state != State::Pending {
                    continue;
                }
                let held = work
                    .lease
                    .as_ref()
                    .is_some_and(|l| l.owner != "backoff" && l.until() > now);
                if held {
                    count(service, &work.message.action, |q| q.in_flight += 1);
                } else {
                    count(service, &work.message.action, |q| q.depth += 1);
                }
            }
        }
        for letter in lock(&self.shared.dead).iter() {
            let d = &letter.document;
            if let (Ok("one"), Ok(service), Ok(action)) = (
                d.get_str("delivery"),
                d.get_str("serviceNameDest"),
                d.get_str("action"),
            ) {
                count(service, action, |q| q.dead += 1);
            }
        }
        Ok(queues.into_values().collect())
    }

    async fn queue_purge(&self, service: &str, action: &str) -> Result<u64> {
        let now = bson::DateTime::now();
        let purged = {
            let mut guard = write(&self.shared.log);
            let log = &mut *guard;
            let ids: Vec<String> = log
                .queues
                .get(service)
                .map(|queue| queue.iter().map(|(_, _, id)| id.clone()).collect())
                .unwrap_or_default();
            let mut purged = Vec::new();
            for id in ids {
                let Some(work) = log.work.get_mut(&id) else {
                    continue;
                };
                let held = work
                    .lease
                    .as_ref()
                    .is_some_and(|l| l.owner != "backoff" && l.until() > now);
                if work.message.action != action || work.state != State::Pending || held {
                    continue;
                }
                work.state = State::Error;
                work.lease = None;
                work.response = Some(doc! { "error": "purged", "purged": true });
                work.response_ts = Some(now_nanos());
                purged.push(id);
            }
            for id in &purged {
                log.dequeue(id);
            }
            purged.len() as u64
        };
        if purged > 0 {
            self.shared.outcomes.send_modify(|n| *n += 1);
        }
        Ok(purged)
    }

    async fn processed_get(&self, consumer: &str, id: &str) -> Result<Option<ProcessedRecord>> {
        Ok(self.shared.processed.get(consumer, id))
    }

    async fn processed_remove(&self, consumer: &str, id: &str) -> Result<u64> {
        Ok(u64::from(self.shared.processed.remove(consumer, id)))
    }
}

pub(super) fn largest_first(counts: HashMap<&str, u64>) -> Vec<Count> {
    let mut rows: Vec<Count> = counts.into_iter().map(|(k, n)| Count::new(k, n)).collect();
    rows.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.key.cmp(&b.key)));
    rows
}
