//! The memory medium behind switches: while `down`, appends and catalog reads fail as a
//! lost network would, so that publishes go to the outbox (the MessageStore the
//! gateway shows) and the readiness probe fails; while `held`, appends wait (a send on
//! its way); other switches fail one operation each.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use intracom::bson::Document;
use intracom::filter::{Filter, Position, StartFrom};
use intracom::medium::memory::MemoryMedium;
use intracom::medium::{
    Appended, CatalogMap, ClaimRequest, DeadLetter, EventStream, ProcessedRecord, QueueStats,
    Reservation, Settlement, Stats,
};
use intracom::{Error, Medium, Message, Result};

pub struct Flaky {
    pub inner: MemoryMedium,
    pub down: AtomicBool,
    hold: tokio::sync::watch::Sender<bool>,
    held: AtomicUsize,
    /// While set, removing dead letters fails as a lost network would.
    pub dead_remove_down: AtomicBool,
    /// While set, loading or saving a checkpoint fails as a lost network would.
    pub checkpoint_down: AtomicBool,
}

impl Flaky {
    pub fn new() -> Self {
        Flaky {
            inner: MemoryMedium::new(Default::default()),
            down: AtomicBool::new(false),
            hold: tokio::sync::watch::Sender::new(false),
            held: AtomicUsize::new(0),
            dead_remove_down: AtomicBool::new(false),
            checkpoint_down: AtomicBool::new(false),
        }
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// While held, an append waits until released.
    pub fn set_held(&self, held: bool) {
        self.hold.send_replace(held);
    }

    /// How many appends wait now.
    pub fn held_appends(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    fn checkpoints_reachable(&self) -> Result<()> {
        refused_while(&self.checkpoint_down)
    }

    fn reachable(&self) -> Result<()> {
        refused_while(&self.down)
    }
}

/// An error as a lost network gives while `switch` is set.
fn refused_while(switch: &AtomicBool) -> Result<()> {
    if switch.load(Ordering::SeqCst) {
        return Err(Error::unavailable("flaky", "connection refused"));
    }
    Ok(())
}

#[async_trait]
impl Medium for Flaky {
    fn name(&self) -> &'static str {
        "flaky"
    }
    fn max_message_bytes(&self) -> usize {
        self.inner.max_message_bytes()
    }
    async fn append(&self, messages: &[Message]) -> Result<Vec<Appended>> {
        let mut hold = self.hold.subscribe();
        if *hold.borrow_and_update() {
            self.held.fetch_add(1, Ordering::SeqCst);
            let _ = hold.wait_for(|held| !*held).await;
            self.held.fetch_sub(1, Ordering::SeqCst);
        }
        self.reachable()?;
        self.inner.append(messages).await
    }
    async fn follow(&self, from: StartFrom, filter: Filter) -> Result<EventStream> {
        self.inner.follow(from, filter).await
    }
    async fn catalog_load(&self) -> Result<CatalogMap> {
        self.reachable()?;
        self.inner.catalog_load().await
    }
    async fn catalog_add(&self, service: &str, actions: &[String]) -> Result<()> {
        self.inner.catalog_add(service, actions).await
    }
    async fn checkpoint_load(&self, name: &str) -> Result<Option<Position>> {
        self.checkpoints_reachable()?;
        self.inner.checkpoint_load(name).await
    }
    async fn checkpoint_save(&self, name: &str, position: &Position) -> Result<()> {
        self.checkpoints_reachable()?;
        self.inner.checkpoint_save(name, position).await
    }
    async fn dead_letter(&self, document: Document, reason: String) -> Result<()> {
        self.inner.dead_letter(document, reason).await
    }
    async fn claim(&self, request: &ClaimRequest) -> Result<Option<Message>> {
        self.inner.claim(request).await
    }
    async fn renew(&self, id: &str, owner: &str, lease: Duration) -> Result<bool> {
        self.inner.renew(id, owner, lease).await
    }
    async fn settle(&self, id: &str, owner: Option<&str>, s: Settlement) -> Result<bool> {
        self.inner.settle(id, owner, s).await
    }
    async fn bury(&self, id: &str, owner: &str, reason: &str) -> Result<bool> {
        self.inner.bury(id, owner, reason).await
    }
    async fn await_outcome(&self, id: &str, timeout: Duration) -> Result<Option<Message>> {
        self.inner.await_outcome(id, timeout).await
    }
    async fn dead_list(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        self.inner.dead_list(limit).await
    }
    async fn dead_get(&self, id: &str) -> Result<Option<DeadLetter>> {
        self.inner.dead_get(id).await
    }
    async fn dead_remove(&self, id: Option<&str>) -> Result<u64> {
        refused_while(&self.dead_remove_down)?;
        self.inner.dead_remove(id).await
    }
    async fn processed_reserve(
        &self,
        consumer: &str,
        id: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<Reservation> {
        self.inner
            .processed_reserve(consumer, id, owner, lease)
            .await
    }
    async fn processed_complete(
        &self,
        consumer: &str,
        id: &str,
        owner: &str,
        result: Option<Document>,
    ) -> Result<()> {
        self.inner
            .processed_complete(consumer, id, owner, result)
            .await
    }
    async fn processed_release(&self, consumer: &str, id: &str, owner: &str) -> Result<()> {
        self.inner.processed_release(consumer, id, owner).await
    }
    async fn stats(&self) -> Result<Stats> {
        self.inner.stats().await
    }
    async fn queues(&self) -> Result<Vec<QueueStats>> {
        self.inner.queues().await
    }
    async fn processed_get(&self, consumer: &str, id: &str) -> Result<Option<ProcessedRecord>> {
        self.inner.processed_get(consumer, id).await
    }
    async fn close(&self) {
        self.inner.close().await
    }
}
