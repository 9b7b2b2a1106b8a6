//! Acks and the checkpoint of a named subscription.
//!
//! Consumers may ack out of order (a handler pool finishes in any order). The
//! checkpoint may only move to a message when every message delivered before it has
//! been acked too; otherwise a restart would skip the unacked one (a gap). So the
//! tracker keeps the delivered, not yet checkpointed messages in delivery order and
//! saves the last one of the acked run at the front. Saves are serialized and never go
//! backwards, whatever the order in which concurrent acks finish.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::error::Result;
use crate::filter::SharedPosition;
use crate::medium::Medium;

pub(crate) struct AckTracker {
    name: String,
    /// The `subscription` label of the ack counter (the name, unless told otherwise).
    label: String,
    medium: Arc<dyn Medium>,
    state: Mutex<State>,
    /// The delivery number of the last saved checkpoint.
    saved: tokio::sync::Mutex<u64>,
    /// Woken when deliveries leave `pending` (the acked run at its front grew).
    passed: tokio::sync::Notify,
}

#[derive(Default)]
struct State {
    next: u64,
    /// Delivered and not yet under the checkpoint: number → (position, acked).
    pending: BTreeMap<u64, (SharedPosition, bool)>,
    /// The end of the acked run: (delivery number, position).
    watermark: Option<(u64, SharedPosition)>,
}

impl AckTracker {
    pub(crate) fn new(name: String, medium: Arc<dyn Medium>) -> Self {
        AckTracker {
            label: name.clone(),
            name,
            medium,
            state: Mutex::new(State {
                next: 1,
                ..State::default()
            }),
            saved: tokio::sync::Mutex::new(0),
            passed: tokio::sync::Notify::new(),
        }
    }

    /// The same tracker, counting its acks under `label` instead of its name.
    pub(crate) fn labelled(mut self, label: String) -> Self {
        self.label = label;
        self
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a delivery; returns its number for [`AckTracker::ack`].
    pub(crate) fn delivered(&self, position: SharedPosition) -> u64 {
        let mut state = self.state();
        let number = state.next;
        state.next += 1;
        state.pending.insert(number, (position, false));
        number
    }

    /// Marks a delivery acked and saves the checkpoint if the acked run grew. A
    /// delivery acked before (its save failed, and the ack is asked again) is counted
    /// once, and the save is tried again.
    pub(crate) async fn ack(&self, number: u64) -> Result<()> {
        if self.mark(number) {
            metrics::counter!(crate::metrics::ACKED, "subscription" => self.label.clone())
                .increment(1);
        }
        self.flush().await
    }

    /// Marks a delivery done without saving the checkpoint: the next save (an ack's)
    /// covers it. For deliveries the consumer filters out unseen.
    #[cfg(any(feature = "gateway", test))]
    pub(crate) fn pass(&self, number: u64) {
        self.mark(number);
    }

    /// Marks a delivery acked and moves the watermark over the acked run at the front;
    /// false if the delivery was not pending, or was marked already.
    fn mark(&self, number: u64) -> bool {
        let mut state = self.state();
        match state.pending.get_mut(&number) {
            Some(entry) if !entry.1 => entry.1 = true,
            _ => return false,
        }
        let mut moved = false;
        while let Some(entry) = state.pending.first_entry() {
            if !entry.get().1 {
                break;
            }
            let (n, (position, _)) = entry.remove_entry();
            state.watermark = Some((n, position));
            moved = true;
        }
        drop(state);
        if moved {
            self.passed.notify_waiters();
        }
        true
    }

    /// Saves the current watermark if it is newer than the last save.
    pub(crate) async fn flush(&self) -> Result<()> {
        let mut saved = self.saved.lock().await;
        // Read the watermark under the save lock: a later ack may have moved it further,
        // and saving the newest one serves both.
        let target = self.state().watermark.clone();
        if let Some((number, position)) = target {
            if number > *saved {
                let position = position.get();
                self.medium.checkpoint_save(&self.name, position).await?;
                tracing::trace!(subscription = %self.name, ts = %position.ts, "checkpoint saved");
                *saved = number;
            }
        }
        Ok(())
    }

    /// How many deliveries are waiting for an ack (or for an earlier one).
    pub(crate) fn in_flight(&self) -> usize {
        self.state().pending.len()
    }

    /// Returns once at most `limit` deliveries wait for an ack (or for an earlier one).
    #[cfg(any(feature = "gateway", test))]
    pub(crate) async fn in_flight_at_most(&self, limit: usize) {
        loop {
            let passed = self.passed.notified();
            tokio::pin!(passed);
            passed.as_mut().enable();
            if self.in_flight() <= limit {
                return;
            }
            passed.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::Position;
    use crate::medium::memory::MemoryMedium;
    use bson::Timestamp;

    fn pos(i: u32) -> SharedPosition {
        SharedPosition::new(Position::new(
            Timestamp {
                time: 1,
                increment: i,
            },
            None,
        ))
    }

    #[tokio::test]
    async fn checkpoint_follows_the_contiguous_acked_run() {
        let medium: Arc<dyn Medium> = Arc::new(MemoryMedium::new(Default::default()));
        let t = AckTracker::new("sub".into(), Arc::clone(&medium));
        let n: Vec<u64> = (1..=4).map(|i| t.delivered(pos(i))).collect();
        t.ack(n[1]).await.unwrap();
        t.ack(n[3]).await.unwrap();
        assert_eq!(
            medium.checkpoint_load("sub").await.unwrap(),
            None,
            "1 is not acked: no checkpoint may pass it"
        );
        t.ack(n[0]).await.unwrap();
        assert_eq!(
            medium.checkpoint_load("sub").await.unwrap(),
            Some(pos(2).get().clone())
        );
        assert_eq!(t.in_flight(), 2);
        t.ack(n[2]).await.unwrap();
        assert_eq!(
            medium.checkpoint_load("sub").await.unwrap(),
            Some(pos(4).get().clone())
        );
        t.ack(n[2]).await.unwrap();
        assert_eq!(t.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_passed_delivery_lets_the_next_ack_save_past_it() {
        let medium: Arc<dyn Medium> = Arc::new(MemoryMedium::new(Default::default()));
        let t = AckTracker::new("sub".into(), Arc::clone(&medium));
        let n: Vec<u64> = (1..=3).map(|i| t.delivered(pos(i))).collect();
        t.pass(n[0]);
        assert_eq!(
            medium.checkpoint_load("sub").await.unwrap(),
            None,
            "a pass saves nothing by itself"
        );
        t.pass(n[1]);
        t.ack(n[2]).await.unwrap();
        assert_eq!(
            medium.checkpoint_load("sub").await.unwrap(),
            Some(pos(3).get().clone())
        );
        assert_eq!(t.in_flight(), 0);
    }

    #[tokio::test]
    async fn in_flight_at_most_waits_for_the_acked_run_to_pass() {
        use futures::FutureExt;
        let medium: Arc<dyn Medium> = Arc::new(MemoryMedium::new(Default::default()));
        let t = Arc::new(AckTracker::new("sub".into(), medium));
        let n: Vec<u64> = (1..=3).map(|i| t.delivered(pos(i))).collect();
        let waiting = {
            let t = Arc::clone(&t);
            tokio::spawn(async move { t.in_flight_at_most(2).await })
        };
        // Acking the second does not let the third through: the first holds both.
        t.ack(n[1]).await.unwrap();
        tokio::task::yield_now().await;
        assert!(
            t.in_flight_at_most(2).now_or_never().is_none(),
            "three wait behind the unacked first"
        );
        t.ack(n[0]).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(30), waiting)
            .await
            .expect("woken when the acked run passed")
            .expect("task");
        assert_eq!(t.in_flight(), 1);
        assert!(t.in_flight_at_most(1).now_or_never().is_some());
    }
}
