//! A real medium with faults injected around it, for tests of what the layers above a
//! medium do when it fails: the one way to put a medium of one's own under the bus,
//! since [`Medium`] is sealed.

use std::ops::Deref;
use std::time::Duration;

use async_trait::async_trait;
use bson::{Document, RawDocumentBuf};

use super::{
    Appended, CatalogMap, ClaimRequest, DeadLetter, DeadLetterStore, EventStream, Inspection,
    Medium, NotAppended, ProcessedRecord, QueueStats, Records, Reservation, Settlement, Stats,
    WorkQueue, WorkStream,
};
use crate::error::Result;
use crate::filter::{Filter, Position, StartFrom};
use crate::message::Message;

/// The operation [`Faults::before`] is asked about: one variant per method of
/// [`Medium`] and its ability traits that reaches the medium underneath.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub enum Call<'a> {
    /// [`Medium::append`], [`Medium::append_encoded`] or [`Medium::append_owned`], with
    /// the messages.
    Append(&'a [Message]),
    /// [`Medium::follow`] or [`Medium::follow_durable`].
    Follow,
    /// [`Medium::catalog_load`].
    CatalogLoad,
    /// [`Medium::catalog_add`].
    CatalogAdd,
    /// [`Medium::checkpoint_load`].
    CheckpointLoad,
    /// [`Medium::checkpoint_save`].
    CheckpointSave,
    /// [`WorkQueue::claim`].
    Claim,
    /// [`WorkQueue::receive_work`].
    ReceiveWork,
    /// [`WorkQueue::renew`].
    Renew,
    /// [`WorkQueue::settle`].
    Settle,
    /// [`WorkQueue::bury`].
    Bury,
    /// [`WorkQueue::await_outcome`].
    AwaitOutcome,
    /// [`DeadLetterStore::dead_letter`].
    DeadLetter,
    /// [`DeadLetterStore::dead_list`].
    DeadList,
    /// [`DeadLetterStore::dead_get`].
    DeadGet,
    /// [`DeadLetterStore::dead_remove`].
    DeadRemove,
    /// [`Records::processed_reserve`].
    ProcessedReserve,
    /// [`Records::processed_complete`].
    ProcessedComplete,
    /// [`Records::processed_release`].
    ProcessedRelease,
    /// [`Inspection::stats`].
    Stats,
    /// [`Inspection::queues`].
    Queues,
    /// [`Inspection::queue_purge`].
    QueuePurge,
    /// [`Inspection::processed_get`].
    ProcessedGet,
    /// [`Inspection::processed_remove`].
    ProcessedRemove,
}

/// The faults a [`Faulty`] medium injects. Every method has a default that injects
/// nothing, so a test overrides only what it breaks.
#[async_trait]
pub trait Faults: Send + Sync + 'static {
    /// Runs before each operation reaches the medium underneath: an error fails the
    /// operation with it (the medium underneath is not called), and a wait here holds
    /// the operation up (a send on its way). Default: `Ok(())`.
    async fn before(&self, call: Call<'_>) -> Result<()> {
        let _ = call;
        Ok(())
    }

    /// Runs on what [`WorkQueue::await_outcome`] of the medium underneath returned for
    /// request `id`, and returns what the caller sees instead (say, a time-out when the
    /// outcome arrived). Default: the outcome as it is.
    async fn outcome(&self, id: &str, outcome: Option<Message>) -> Result<Option<Message>> {
        let _ = id;
        Ok(outcome)
    }

    /// Closing: runs before the medium underneath is closed. Default: nothing.
    async fn close(&self) {}
}

/// A medium of this crate with [`Faults`] around it: each operation asks the faults
/// first, then goes to the medium underneath. It has the abilities of the medium
/// underneath, its name and its capabilities.
///
/// It dereferences to the faults, so that a test flips its switches on the medium it
/// handed to the bus.
///
/// ```
/// use std::sync::atomic::{AtomicBool, Ordering};
/// use std::sync::Arc;
/// use intracom::medium::{memory::MemoryMedium, Call, Faults, Faulty};
/// use intracom::{Error, Message, Medium};
///
/// struct Down(AtomicBool);
///
/// #[async_trait::async_trait]
/// impl Faults for Down {
///     async fn before(&self, call: Call<'_>) -> intracom::Result<()> {
///         match call {
///             Call::Append(_) if self.0.load(Ordering::SeqCst) => {
///                 Err(Error::unavailable("down", "connection refused"))
///             }
///             _ => Ok(()),
///         }
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let memory = MemoryMedium::new(Default::default());
/// let medium = Arc::new(Faulty::new(memory, Down(AtomicBool::new(true))));
/// assert!(medium.append(&[Message::broadcast("ping")]).await.is_err());
/// medium.0.store(false, Ordering::SeqCst);
/// assert!(medium.append(&[Message::broadcast("ping")]).await.is_ok());
/// # }
/// ```
pub struct Faulty<M, F> {
    inner: M,
    faults: F,
}

impl<M: Medium, F: Faults> Faulty<M, F> {
    /// `inner` with `faults` around it.
    pub fn new(inner: M, faults: F) -> Self {
        Faulty { inner, faults }
    }

    /// The medium underneath, reached without the faults.
    pub fn inner(&self) -> &M {
        &self.inner
    }

    /// The faults.
    pub fn faults(&self) -> &F {
        &self.faults
    }

    /// The work queue underneath (only called where [`Medium::work`] said there is one).
    fn work_below(&self) -> Result<&dyn WorkQueue> {
        (&self.inner as &dyn Medium).work_or_unsupported()
    }

    fn dead_below(&self) -> Result<&dyn DeadLetterStore> {
        (&self.inner as &dyn Medium).dead_letter_store_or_unsupported()
    }

    fn records_below(&self) -> Result<&dyn Records> {
        (&self.inner as &dyn Medium).records_or_unsupported()
    }

    fn inspection_below(&self, what: &str) -> Result<&dyn Inspection> {
        (&self.inner as &dyn Medium).inspection_or_unsupported(what)
    }
}

impl<M, F> Deref for Faulty<M, F> {
    type Target = F;

    fn deref(&self) -> &F {
        &self.faults
    }
}

#[async_trait]
impl<M: Medium, F: Faults> Medium for Faulty<M, F> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn max_message_bytes(&self) -> usize {
        self.inner.max_message_bytes()
    }

    fn capabilities(&self) -> super::Capabilities {
        self.inner.capabilities()
    }

    fn work(&self) -> Option<&dyn WorkQueue> {
        self.inner.work().map(|_| self as &dyn WorkQueue)
    }

    fn dead_letter_store(&self) -> Option<&dyn DeadLetterStore> {
        self.inner
            .dead_letter_store()
            .map(|_| self as &dyn DeadLetterStore)
    }

    fn records(&self) -> Option<&dyn Records> {
        self.inner.records().map(|_| self as &dyn Records)
    }

    fn inspection(&self) -> Option<&dyn Inspection> {
        self.inner.inspection().map(|_| self as &dyn Inspection)
    }

    fn sends_encoded(&self) -> bool {
        self.inner.sends_encoded()
    }

    fn keeps_decoded(&self) -> bool {
        self.inner.keeps_decoded()
    }

    async fn append(&self, messages: &[Message]) -> Result<Vec<Appended>> {
        self.faults.before(Call::Append(messages)).await?;
        self.inner.append(messages).await
    }

    async fn append_encoded(
        &self,
        messages: &[Message],
        encoded: &[RawDocumentBuf],
    ) -> Result<Vec<Appended>> {
        self.faults.before(Call::Append(messages)).await?;
        self.inner.append_encoded(messages, encoded).await
    }

    async fn append_owned(
        &self,
        messages: Vec<Message>,
        encoded: &[RawDocumentBuf],
    ) -> std::result::Result<Vec<Appended>, NotAppended> {
        if let Err(error) = self.faults.before(Call::Append(&messages)).await {
            return Err(NotAppended { error, messages });
        }
        self.inner.append_owned(messages, encoded).await
    }

    async fn follow(&self, from: StartFrom, filter: Filter) -> Result<EventStream> {
        self.faults.before(Call::Follow).await?;
        self.inner.follow(from, filter).await
    }

    async fn anchor(&self, internal: super::sealed::Internal) -> Result<Option<Position>> {
        self.inner.anchor(internal).await
    }

    async fn follow_durable(
        &self,
        name: &str,
        from: StartFrom,
        filter: Filter,
    ) -> Result<EventStream> {
        self.faults.before(Call::Follow).await?;
        self.inner.follow_durable(name, from, filter).await
    }

    async fn catalog_load(&self) -> Result<CatalogMap> {
        self.faults.before(Call::CatalogLoad).await?;
        self.inner.catalog_load().await
    }

    async fn catalog_add(&self, service: &str, actions: &[String]) -> Result<()> {
        self.faults.before(Call::CatalogAdd).await?;
        self.inner.catalog_add(service, actions).await
    }

    async fn checkpoint_load(&self, name: &str) -> Result<Option<Position>> {
        self.faults.before(Call::CheckpointLoad).await?;
        self.inner.checkpoint_load(name).await
    }

    async fn checkpoint_save(&self, name: &str, position: &Position) -> Result<()> {
        self.faults.before(Call::CheckpointSave).await?;
        self.inner.checkpoint_save(name, position).await
    }

    async fn close(&self) {
        self.faults.close().await;
        self.inner.close().await
    }
}

#[async_trait]
impl<M: Medium, F: Faults> WorkQueue for Faulty<M, F> {
    async fn claim(&self, request: &ClaimRequest) -> Result<Option<Message>> {
        self.faults.before(Call::Claim).await?;
        self.work_below()?.claim(request).await
    }

    async fn receive_work(&self, request: &ClaimRequest) -> Result<Option<WorkStream>> {
        self.faults.before(Call::ReceiveWork).await?;
        self.work_below()?.receive_work(request).await
    }

    async fn renew(&self, id: &str, owner: &str, lease: Duration) -> Result<bool> {
        self.faults.before(Call::Renew).await?;
        self.work_below()?.renew(id, owner, lease).await
    }

    async fn settle(&self, id: &str, owner: Option<&str>, settlement: Settlement) -> Result<bool> {
        self.faults.before(Call::Settle).await?;
        self.work_below()?.settle(id, owner, settlement).await
    }

    async fn bury(&self, id: &str, owner: &str, reason: &str) -> Result<bool> {
        self.faults.before(Call::Bury).await?;
        self.work_below()?.bury(id, owner, reason).await
    }

    async fn await_outcome(&self, id: &str, timeout: Duration) -> Result<Option<Message>> {
        self.faults.before(Call::AwaitOutcome).await?;
        let outcome = self.work_below()?.await_outcome(id, timeout).await?;
        self.faults.outcome(id, outcome).await
    }

    async fn work_services(&self, id: &str) -> Result<Option<(String, Option<String>)>> {
        self.work_below()?.work_services(id).await
    }
}

#[async_trait]
impl<M: Medium, F: Faults> DeadLetterStore for Faulty<M, F> {
    async fn dead_letter(&self, document: Document, reason: String) -> Result<()> {
        self.faults.before(Call::DeadLetter).await?;
        self.dead_below()?.dead_letter(document, reason).await
    }

    async fn dead_list(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        self.faults.before(Call::DeadList).await?;
        self.dead_below()?.dead_list(limit).await
    }

    async fn dead_get(&self, id: &str) -> Result<Option<DeadLetter>> {
        self.faults.before(Call::DeadGet).await?;
        self.dead_below()?.dead_get(id).await
    }

    async fn dead_remove(&self, id: Option<&str>) -> Result<u64> {
        self.faults.before(Call::DeadRemove).await?;
        self.dead_below()?.dead_remove(id).await
    }
}

#[async_trait]
impl<M: Medium, F: Faults> Records for Faulty<M, F> {
    async fn processed_reserve(
        &self,
        consumer: &str,
        id: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<Reservation> {
        self.faults.before(Call::ProcessedReserve).await?;
        self.records_below()?
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
        self.faults.before(Call::ProcessedComplete).await?;
        self.records_below()?
            .processed_complete(consumer, id, owner, result)
            .await
    }

    async fn processed_release(&self, consumer: &str, id: &str, owner: &str) -> Result<()> {
        self.faults.before(Call::ProcessedRelease).await?;
        self.records_below()?
            .processed_release(consumer, id, owner)
            .await
    }
}

#[async_trait]
impl<M: Medium, F: Faults> Inspection for Faulty<M, F> {
    async fn stats(&self) -> Result<Stats> {
        self.faults.before(Call::Stats).await?;
        self.inspection_below("stats")?.stats().await
    }

    async fn queues(&self) -> Result<Vec<QueueStats>> {
        self.faults.before(Call::Queues).await?;
        self.inspection_below("queue counts")?.queues().await
    }

    async fn queue_purge(&self, service: &str, action: &str) -> Result<u64> {
        self.faults.before(Call::QueuePurge).await?;
        self.inspection_below("purging a queue")?
            .queue_purge(service, action)
            .await
    }

    async fn processed_get(&self, consumer: &str, id: &str) -> Result<Option<ProcessedRecord>> {
        self.faults.before(Call::ProcessedGet).await?;
        self.inspection_below("reading idempotency records")?
            .processed_get(consumer, id)
            .await
    }

    async fn processed_remove(&self, consumer: &str, id: &str) -> Result<u64> {
        self.faults.before(Call::ProcessedRemove).await?;
        self.inspection_below("removing idempotency records")?
            .processed_remove(consumer, id)
            .await
    }
}
