//! The hub: one change stream on the messages collection for the whole process.
//!
//! Why it exists: every open change stream holds a pool connection while its
//! `getMore` waits, and the driver's pool has 10 by default; a stream per subscriber
//! stalls past ten subscribers (SERVER-32946). So one stream per collection per
//! process feeds a bounded ring of recent events, and local followers read the ring at
//! their own pace, as on the memory medium.
//!
//! Failures: the driver resumes once by itself on a resumable error, from its cached
//! token (change-streams spec). What fails after that is ours: the hub reopens from
//! the last token it saw, read with `resume_token()` after every `next_if_any()`
//! (including empty batches, so a quiet collection keeps a fresh
//! `postBatchResumeToken`). If the history is gone (286 ChangeStreamHistoryLost, 280,
//! 260), the collection was dropped, the server closed the cursor, or the connection
//! to the server was lost under the stream (see `Inner::stream_interruptions`), it
//! opens a fresh stream and then puts a [`RingItem::Gap`] in the ring: followers that
//! reach it rebuild their position from the collection by `ts`. An event that arrives
//! once the connection was lost is not put in the ring: the catch-up after the gap
//! reads it from the collection (in the ring too, it would come again to a follower
//! whose catch-up delivered it already and no longer remembers its id).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use bson::{doc, Document, RawDocumentBuf, Timestamp};
use mongodb::change_stream::event::{ChangeStreamEvent, OperationType, ResumeToken};
use mongodb::change_stream::ChangeStream;
use tokio::sync::watch;

use super::errors::{is_history_lost, CHANGE_STREAM_NOT_ON_STANDALONE};
use super::work::Settled;
use super::{decode_raw, Inner};
use crate::config::HubSelection;
use crate::filter::Filter;
use crate::message::Message;

/// A change stream whose documents stay as the server sent them: a message is decoded
/// from those bytes once (see [`decode_raw`]), not into a `Document` first.
pub(crate) type Events = ChangeStream<ChangeStreamEvent<RawDocumentBuf>>;

/// One entry of the ring.
pub(crate) enum RingItem {
    /// A message, with its event's resume token and cluster time.
    Message {
        message: Arc<Message>,
        token: bson::Bson,
        cluster_time: Option<Timestamp>,
    },
    /// A document that is not a readable message (dead-lettered by the hub).
    Bad { cluster_time: Option<Timestamp> },
    /// The hub lost its history and restarted: events may be missing before this point.
    Gap,
}

impl RingItem {
    pub(crate) fn cluster_time(&self) -> Option<Timestamp> {
        match self {
            RingItem::Message { cluster_time, .. } | RingItem::Bad { cluster_time } => {
                *cluster_time
            }
            RingItem::Gap => None,
        }
    }
}

/// The most entries one [`Segment`] holds.
const SEGMENT_MAX: usize = 256;

/// A run of consecutive ring entries. Each slot is filled once, by the hub, and read
/// without the ring's lock. The ring and the followers that read from a segment share
/// it: a follower keeps the segments whose messages a catch-up scan could read again
/// (see `follower.rs`), so the ids of the safety window are kept once per process, not
/// once per subscriber, and a follower that falls behind the ring still has them.
pub(crate) struct Segment {
    /// The sequence number of `slots[0]`.
    first_seq: u64,
    slots: Box<[OnceLock<RingItem>]>,
    /// How many slots are filled (stored after the slot is).
    filled: AtomicUsize,
}

impl Segment {
    fn new(first_seq: u64, len: usize) -> Self {
        Segment {
            first_seq,
            slots: (0..len).map(|_| OnceLock::new()).collect(),
            filled: AtomicUsize::new(0),
        }
    }

    /// The sequence number of its first entry.
    pub(crate) fn first_seq(&self) -> u64 {
        self.first_seq
    }

    /// The entry with sequence number `seq`, once it is in the ring.
    pub(crate) fn get(&self, seq: u64) -> Option<&RingItem> {
        let index = usize::try_from(seq.checked_sub(self.first_seq)?).ok()?;
        if index >= self.filled.load(Ordering::Acquire) {
            return None;
        }
        self.slots.get(index)?.get()
    }

    fn is_full(&self) -> bool {
        self.filled.load(Ordering::Relaxed) == self.slots.len()
    }

    /// Fills the next slot (the hub is the only writer, under the ring's write lock).
    fn fill(&self, item: RingItem) {
        let index = self.filled.load(Ordering::Relaxed);
        if let Some(slot) = self.slots.get(index) {
            if slot.set(item).is_ok() {
                self.filled.store(index + 1, Ordering::Release);
            }
        }
    }

    /// The newest cluster time among its entries (they are in cluster-time order).
    fn newest_cluster_time(&self) -> Option<Timestamp> {
        let filled = self.filled.load(Ordering::Acquire);
        self.slots[..filled]
            .iter()
            .rev()
            .find_map(|slot| slot.get().and_then(RingItem::cluster_time))
    }
}

/// The recent change events of the process, in stream order, as segments.
pub(crate) struct Ring {
    segments: VecDeque<Arc<Segment>>,
    next_seq: u64,
    /// How many entries are kept at least (`common.intracom.db.stream_buffer`): a
    /// segment is dropped once the others hold that many.
    capacity: usize,
    segment_len: usize,
    /// The largest cluster time among entries that fell off the front.
    pub(crate) dropped_cluster_time: Option<Timestamp>,
}

impl Ring {
    fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Ring {
            segments: VecDeque::new(),
            next_seq: 1,
            capacity,
            segment_len: (capacity / 4).clamp(1, SEGMENT_MAX),
            dropped_cluster_time: None,
        }
    }

    fn push(&mut self, item: RingItem) {
        if self.segments.back().is_none_or(|s| s.is_full()) {
            self.segments
                .push_back(Arc::new(Segment::new(self.next_seq, self.segment_len)));
        }
        if let Some(back) = self.segments.back() {
            back.fill(item);
        }
        self.next_seq += 1;
        while self.segments.len() > 1
            && self
                .segments
                .get(1)
                .is_some_and(|s| (self.next_seq - s.first_seq) as usize >= self.capacity)
        {
            if let Some(old) = self.segments.pop_front() {
                self.dropped_cluster_time =
                    self.dropped_cluster_time.max(old.newest_cluster_time());
            }
        }
    }

    /// The sequence number of the oldest entry kept (of the next one when empty).
    pub(crate) fn first_seq(&self) -> u64 {
        self.segments.front().map_or(self.next_seq, |s| s.first_seq)
    }

    /// The sequence number of the last entry.
    pub(crate) fn tip(&self) -> u64 {
        self.next_seq - 1
    }

    /// The segments from the one holding `seq` on (every segment but the last is full,
    /// so the one holding `seq` is found by arithmetic).
    pub(crate) fn segments_from(&self, seq: u64) -> impl Iterator<Item = &Arc<Segment>> {
        let skip = seq.saturating_sub(self.first_seq()) / self.segment_len as u64;
        self.segments
            .iter()
            .skip(usize::try_from(skip).unwrap_or(usize::MAX))
    }

    /// The `ts` of the newest message kept at or before `seq`, if any.
    pub(crate) fn newest_message_ts_upto(&self, seq: u64) -> Option<Timestamp> {
        let first = self.first_seq();
        (first..=seq.min(self.tip())).rev().find_map(|s| {
            let index = s.saturating_sub(first) / self.segment_len as u64;
            let segment = self.segments.get(usize::try_from(index).ok()?)?;
            match segment.get(s)? {
                RingItem::Message { message, .. } => message.ts,
                _ => None,
            }
        })
    }

    /// Every entry kept, oldest first.
    pub(crate) fn entries(&self) -> impl Iterator<Item = (u64, &RingItem)> {
        self.segments.iter().flat_map(|segment| {
            (0..segment.slots.len()).map_while(move |i| {
                let seq = segment.first_seq + i as u64;
                segment.get(seq).map(|item| (seq, item))
            })
        })
    }
}

/// What the hub's stream selects on the server (see [`hub_pipeline`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Selection {
    /// Every insert and every settle (`common.intracom.db.hub.selection=everything`, or
    /// a monitor subscription: a filter without a service).
    everything: bool,
    /// The services the process's subscriptions and workers follow.
    services: BTreeSet<String>,
    /// The instances they follow (messages to one instance of a service).
    instances: BTreeSet<String>,
    /// The instances whose requests this process waits for (their `instanceSource`).
    askers: BTreeSet<String>,
}

impl Selection {
    fn everything() -> Self {
        Selection {
            everything: true,
            ..Selection::default()
        }
    }

    /// A selection of every kind of clause, to check that the server takes the
    /// pipeline (`intracom admin check`).
    pub(crate) fn probe(mode: HubSelection) -> Self {
        match mode {
            HubSelection::Everything => Selection::everything(),
            HubSelection::Targeted => Selection {
                everything: false,
                services: ["intracom-check".to_string()].into(),
                instances: ["intracom-check-1".to_string()].into(),
                askers: ["intracom-check-1".to_string()].into(),
            },
        }
    }

    /// Whether everything `other` selects is selected.
    fn includes(&self, other: &Selection) -> bool {
        self.everything
            || (!other.everything
                && self.services.is_superset(&other.services)
                && self.instances.is_superset(&other.instances)
                && self.askers.is_superset(&other.askers))
    }

    fn union(&self, other: &Selection) -> Selection {
        Selection {
            everything: self.everything || other.everything,
            services: self.services.union(&other.services).cloned().collect(),
            instances: self.instances.union(&other.instances).cloned().collect(),
            askers: self.askers.union(&other.askers).cloned().collect(),
        }
    }

    /// Whether every message `filter` can accept is selected.
    fn covers(&self, filter: &Filter) -> bool {
        if self.everything {
            return true;
        }
        let Some(service) = &filter.service else {
            return false;
        };
        self.services.contains(service)
            && filter
                .instance
                .as_ref()
                .is_none_or(|i| self.instances.contains(i))
    }
}

/// The followers and askers of the process, from which the selection is made.
#[derive(Default)]
struct Registry {
    /// Each live follower's service (`None`: a monitor) and instance, by registration.
    followers: HashMap<u64, (Option<String>, Option<String>)>,
    next_id: u64,
    askers: BTreeSet<String>,
    /// The selection wanted now, and its generation (moves on each change).
    wanted: Selection,
    generation: u64,
}

impl Registry {
    fn selection(&self) -> Selection {
        let mut selection = Selection {
            askers: self.askers.clone(),
            ..Selection::default()
        };
        for (service, instance) in self.followers.values() {
            match service {
                None => selection.everything = true,
                Some(service) => {
                    selection.services.insert(service.clone());
                    if let Some(instance) = instance {
                        selection.instances.insert(instance.clone());
                    }
                }
            }
        }
        selection
    }

    /// Recomputes the wanted selection; returns whether it changed.
    fn update(&mut self) -> bool {
        let selection = self.selection();
        if selection == self.wanted {
            return false;
        }
        self.wanted = selection;
        self.generation += 1;
        true
    }
}

/// The selection the running stream was opened with.
#[derive(Clone, Default)]
pub(crate) struct Applied {
    generation: u64,
    selection: Selection,
    /// The ring's tip when the stream was opened: entries after it come from this
    /// stream (or a later one, whose selection covers every follower registered then).
    pub(crate) seq: u64,
}

/// A follower's place in the hub's selection, for as long as the follower lives.
pub(crate) struct Registration {
    hub: Arc<Hub>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut registry = lock(&self.hub.registry);
        registry.followers.remove(&self.id);
        if registry.update() {
            self.hub.changed.notify_one();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) struct Hub {
    pub(crate) ring: RwLock<Ring>,
    pub(crate) tip: watch::Sender<u64>,
    /// `targeted`: the selection follows the registry; `everything`: fixed.
    mode: HubSelection,
    registry: Mutex<Registry>,
    /// Wakes the hub's task when the wanted selection changed.
    changed: tokio::sync::Notify,
    applied: watch::Sender<Applied>,
}

/// What a follower must do before it relies on the ring (see [`Hub::register`]).
pub(crate) enum Joined {
    /// The running stream selected its messages since before `now`.
    Covered,
    /// The stream is (or will be) reopened with a selection that covers it: wait for
    /// [`Hub::applied`] of this generation, then read positions in the ring.
    Widened(u64),
}

impl Hub {
    /// Adds a follower to the selection. `now` is the ring sequence number from which
    /// the follower would read.
    pub(crate) fn register(
        self: &Arc<Self>,
        filter: &Filter,
        now: u64,
    ) -> (Option<Registration>, Joined) {
        if self.mode == HubSelection::Everything {
            return (None, Joined::Covered);
        }
        let mut registry = lock(&self.registry);
        let id = registry.next_id;
        registry.next_id += 1;
        registry
            .followers
            .insert(id, (filter.service.clone(), filter.instance.clone()));
        if registry.update() {
            self.changed.notify_one();
        }
        let applied = self.applied.borrow();
        let joined = if applied.generation == registry.generation
            && applied.selection.covers(filter)
            && applied.seq <= now
        {
            Joined::Covered
        } else {
            Joined::Widened(registry.generation)
        };
        drop(applied);
        let registration = Registration {
            hub: Arc::clone(self),
            id,
        };
        (Some(registration), joined)
    }

    /// Adds an instance whose requests' outcomes this process waits for; returns the
    /// generation to wait for ([`Hub::applied`]) when the running stream does not
    /// select them yet.
    pub(crate) fn ask(&self, instance: &str) -> Option<u64> {
        if self.mode == HubSelection::Everything {
            return None;
        }
        let mut registry = lock(&self.registry);
        if !registry.askers.contains(instance) {
            registry.askers.insert(instance.to_string());
            if registry.update() {
                self.changed.notify_one();
            }
        }
        let applied = self.applied.borrow();
        (applied.generation != registry.generation || !applied.selection.askers.contains(instance))
            .then_some(registry.generation)
    }

    /// Waits until the stream runs with a selection of `generation` or later (or the
    /// medium closes); returns the ring's tip when it was opened.
    pub(crate) async fn applied(&self, inner: &Inner, generation: u64) -> u64 {
        let mut applied = self.applied.subscribe();
        tokio::select! {
            _ = inner.closed.cancelled() => 0,
            seq = applied.wait_for(|a| a.generation >= generation) => {
                seq.map(|a| a.seq).unwrap_or(0)
            }
        }
    }

    /// The selection to open the stream with after a failure, and its generation: what
    /// the running stream selects and what is wanted now.
    fn wanted(&self) -> (u64, Selection) {
        if self.mode == HubSelection::Everything {
            return (0, Selection::everything());
        }
        let registry = lock(&self.registry);
        let applied = self.applied.borrow();
        (
            registry.generation,
            applied.selection.union(&registry.wanted),
        )
    }

    /// The selection to reopen the stream with now, when the wanted one selects more
    /// than the running stream: the union of both (the stream narrows later, see
    /// [`Hub::narrowed`]). When the running stream selects all that is wanted, its
    /// generation is brought up to the wanted one instead, without a reopening.
    fn widened(&self) -> Option<(u64, Selection)> {
        if self.mode == HubSelection::Everything {
            return None;
        }
        let registry = lock(&self.registry);
        let applied = self.applied.borrow().clone();
        if applied.selection.includes(&registry.wanted) {
            if applied.generation != registry.generation {
                let generation = registry.generation;
                self.applied.send_modify(|a| a.generation = generation);
            }
            return None;
        }
        Some((
            registry.generation,
            applied.selection.union(&registry.wanted),
        ))
    }

    /// The narrower selection to reopen the stream with, when the running stream
    /// selects more than is wanted (a follower left).
    ///
    /// Why narrowing waits and may fail: mongod resumes after an event's token only if
    /// that event passes the new stream's `$match` (a resume token that is not found
    /// fails the resume), so a narrower stream cannot always resume where the wider one
    /// is. Widening always can (the last event passes a wider `$match`). A narrowing that
    /// the server refuses keeps the running stream, and is tried again later.
    fn narrowed(&self) -> Option<(u64, Selection)> {
        if self.mode == HubSelection::Everything {
            return None;
        }
        let registry = lock(&self.registry);
        let applied = self.applied.borrow();
        (applied.selection != registry.wanted && applied.selection.includes(&registry.wanted))
            .then(|| (registry.generation, registry.wanted.clone()))
    }

    fn set_applied(&self, generation: u64, selection: Selection) {
        let seq = self.ring().tip();
        self.applied.send_replace(Applied {
            generation,
            selection,
            seq,
        });
    }

    fn push(&self, item: RingItem) {
        let tip = {
            let mut ring = self.ring.write().unwrap_or_else(|p| p.into_inner());
            ring.push(item);
            ring.tip()
        };
        self.tip.send_replace(tip);
    }

    pub(crate) fn ring(&self) -> std::sync::RwLockReadGuard<'_, Ring> {
        self.ring.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// The hub's stream: the inserts and settles the selection names, and the events that
/// end a collection's stream. Every clause reads the change event itself, never a
/// looked-up document (no `updateLookup`): an insert event carries the whole document
/// in `fullDocument`, an update event only what it wrote, in
/// `updateDescription.updatedFields`, so a settle writes the asking instance (`asker`,
/// see `work::settle`) beside `state`. (A `$match` on `operationType`,
/// `fullDocument` and `updateDescription` right after `$changeStream` is rewritten into
/// the oplog scan since 5.1; the subscribers' own filters are applied in memory, since
/// one stream serves every subscriber of the process.)
///
/// Targeted, it selects: broadcasts and messages to the followed services, to no
/// instance or to a followed one, once any follower lives; the inserts of requests
/// sent by an asking instance (their waiter keeps the request as stored); the settles
/// that name an asking instance. Everything (or a monitor follower): every insert and
/// every settle.
pub(crate) fn hub_pipeline(selection: &Selection) -> Vec<Document> {
    let mut clauses = Vec::new();
    if selection.everything {
        clauses.push(doc! { "operationType": "insert" });
        // A request settled in place: wakes the caller waiting for it.
        clauses.push(doc! { "operationType": "update", "updateDescription.updatedFields.state": { "$exists": true } });
    } else {
        if !selection.services.is_empty() {
            let mut services = vec![bson::Bson::Null];
            services.extend(
                selection
                    .services
                    .iter()
                    .map(|s| bson::Bson::from(s.as_str())),
            );
            let instances: Vec<&str> = selection.instances.iter().map(String::as_str).collect();
            clauses.push(doc! {
                "operationType": "insert",
                "fullDocument.serviceNameDest": { "$in": services },
                "$or": [
                    { "fullDocument.instanceDest": { "$exists": false } },
                    { "fullDocument.instanceDest": { "$in": instances } },
                ],
            });
        }
        if !selection.askers.is_empty() {
            let askers: Vec<&str> = selection.askers.iter().map(String::as_str).collect();
            clauses.push(doc! {
                "operationType": "insert",
                "fullDocument.instanceSource": { "$in": askers.clone() },
                "fullDocument.delivery": "one",
            });
            clauses.push(doc! {
                "operationType": "update",
                "updateDescription.updatedFields.state": { "$exists": true },
                "updateDescription.updatedFields.asker": { "$in": askers },
            });
        }
    }
    clauses.push(ending_events());
    vec![doc! { "$match": { "$or": clauses } }]
}

/// The events after which a collection's change stream has no more to say: the
/// collection was dropped or renamed (then `invalidate`, and the server closes the
/// cursor), or its database was dropped. A `$match` that filters them out hides the
/// reason, not the end: let them through and handle them.
pub(crate) fn ending_events() -> Document {
    doc! { "operationType": { "$in": ["drop", "rename", "dropDatabase", "invalidate"] } }
}

/// Whether a change event ends the stream (see [`ending_events`]).
pub(crate) fn is_ending(operation: &OperationType) -> bool {
    matches!(
        operation,
        OperationType::Drop
            | OperationType::Rename
            | OperationType::DropDatabase
            | OperationType::Invalidate
    )
}

pub(crate) async fn open(
    inner: &Inner,
    pipeline: Vec<Document>,
    resume: Option<ResumeToken>,
) -> mongodb::error::Result<Events> {
    let stream = inner
        .stream_messages
        .watch()
        .pipeline(pipeline)
        .resume_after(resume)
        .await?;
    Ok(stream.with_type())
}

/// A stream of the events at or after `start` (`startAtOperationTime`: "at or after",
/// so the event at `start` itself comes too).
pub(crate) async fn open_at(
    inner: &Inner,
    pipeline: Vec<Document>,
    start: Timestamp,
) -> mongodb::error::Result<Events> {
    let stream = inner
        .stream_messages
        .watch()
        .pipeline(pipeline)
        .start_at_operation_time(start)
        .await?;
    Ok(stream.with_type())
}

/// What starting the hub found.
pub(crate) enum Started {
    Hub(Arc<Hub>),
    /// The server refused `$changeStream` (40573: not a replica set): poll instead.
    NoChangeStreams,
}

/// Opens the stream (anchoring the hub before returning) and starts its task.
pub(crate) async fn start(inner: Arc<Inner>) -> crate::Result<Started> {
    let generation = inner.stream_interruptions();
    let mode = inner.db_config.hub_selection;
    let initial = match mode {
        HubSelection::Everything => Selection::everything(),
        HubSelection::Targeted => Selection::default(),
    };
    let stream = match open(&inner, hub_pipeline(&initial), None).await {
        Ok(stream) => stream,
        Err(e) if super::errors::code(&e) == Some(CHANGE_STREAM_NOT_ON_STANDALONE) => {
            return Ok(Started::NoChangeStreams)
        }
        Err(e) => return Err(super::errors::to_error(e)),
    };
    let (tip, _) = watch::channel(0);
    let (applied, _) = watch::channel(Applied {
        generation: 0,
        selection: initial,
        seq: 0,
    });
    let hub = Arc::new(Hub {
        ring: RwLock::new(Ring::new(inner.db_config.stream_buffer)),
        tip,
        mode,
        registry: Mutex::new(Registry::default()),
        changed: tokio::sync::Notify::new(),
        applied,
    });
    tracing::info!(collection = %inner.db_config.messages, "change stream opened for this process");
    // Counted as an operation until the task has dropped its stream (the driver kills
    // the cursor when it is dropped), so that closing shuts the driver down after that.
    let op = inner.op()?;
    let task = run(inner, Arc::clone(&hub), stream, generation);
    tokio::spawn(async move {
        task.await;
        drop(op);
    });
    Ok(Started::Hub(hub))
}

/// How the hub's stream is opened again.
enum Reopen {
    /// From the last token: nothing is missed (mongod resumes exactly, or fails the
    /// resume when it no longer has the token).
    Resume(Option<ResumeToken>),
    /// From now, with a [`RingItem::Gap`] after the new anchor: followers catch up from
    /// the collection by `ts`.
    Fresh,
    /// From the last token, with a changed selection (not a failure).
    Select(Option<ResumeToken>),
}

/// `generation` is [`Inner::stream_interruptions`] read before `stream` was opened.
async fn run(inner: Arc<Inner>, hub: Arc<Hub>, mut stream: Events, mut generation: u64) {
    let closed = inner.closed.clone();
    let mut token = stream.resume_token();
    let mut last_narrowing = std::time::Instant::now();
    loop {
        if inner.stream_interruptions() == generation
            && last_narrowing.elapsed() >= NARROWING_PAUSE
            && hub.narrowed().is_some()
        {
            last_narrowing = std::time::Instant::now();
            if let Some((fresh, fresh_token)) = narrow(&inner, &hub, token.clone()).await {
                stream = fresh;
                token = fresh_token;
            }
        }
        // Closed first: once closing, the stream asks the driver for nothing more.
        let next = tokio::select! {
            biased;
            _ = closed.cancelled() => return,
            _ = hub.changed.notified() => None,
            next = stream.next_if_any() => Some(next),
        };
        let interrupted = inner.stream_interruptions() != generation;
        let Some(next) = next else {
            // The selection changed. A wider one: the stream is opened again from the
            // last token it gave (an event's, or the post-batch token of an empty
            // batch), with the new `$match`. A resumed stream starts right after that
            // token and applies its own pipeline to what follows: nothing read is read
            // again, nothing after it missed. A narrower one waits (see `narrow`).
            if hub.widened().is_none() {
                continue;
            }
            let how = if interrupted {
                interruption(&inner)
            } else {
                Reopen::Select(token.clone())
            };
            match reopen(&inner, &hub, how).await {
                Some((fresh, fresh_token, fresh_generation)) => {
                    stream = fresh;
                    token = fresh_token;
                    generation = fresh_generation;
                }
                None => return,
            }
            continue;
        };
        let how = match next {
            Ok(Some(event)) if is_ending(&event.operation_type) => {
                // Nothing after this event can come from this stream. The set-up makes
                // the collection again (a publish would too, without its indexes).
                tracing::warn!(operation = ?event.operation_type, collection = %inner.db_config.messages, "the messages collection was dropped or renamed: restarting the change stream; subscribers catch up from the collection");
                inner.count_fallback();
                let Ok(_op) = inner.op() else { return };
                if let Err(error) = super::setup::ensure(&inner).await {
                    tracing::warn!(%error, "the messages collection was not set up again");
                }
                Reopen::Fresh
            }
            Ok(Some(event)) if interrupted => {
                // An event from a stream that lived through a lost connection (the
                // driver may have resumed it by itself): not trusted, so not put in the
                // ring, where a follower whose catch-up already delivered it would read
                // it again. The gap that follows the restarted stream makes every
                // follower read it from the collection, which has it.
                tracing::debug!(operation = ?event.operation_type, "event after an interruption left to the catch-up");
                interruption(&inner)
            }
            Ok(Some(event)) => {
                inner.count_hub_event();
                token = stream.resume_token().or(Some(event.id.clone()));
                if event.operation_type == OperationType::Update {
                    if let (Some(Ok(id)), Some(update)) = (
                        event.document_key.as_ref().map(|k| k.get_str("_id")),
                        event.update_description,
                    ) {
                        let settled = if update.truncated_arrays.as_ref().is_none_or(Vec::is_empty)
                        {
                            Settled::Fields(update.updated_fields, update.removed_fields)
                        } else {
                            Settled::Read
                        };
                        inner.waiters.settled(id, settled);
                    }
                } else {
                    hub.push(to_item(&inner, event));
                }
                continue;
            }
            // The server closed the cursor without an error: the end, not silence.
            // mongod closes a stream only after `invalidate`; resuming from the token
            // could be closed again at once.
            Ok(None) if !stream.is_alive() => {
                tracing::warn!("the server closed the change stream: restarting it; subscribers catch up from the collection");
                inner.count_fallback();
                Reopen::Fresh
            }
            Ok(None) => {
                // An empty batch: keep the post-batch resume token (quiet collection).
                token = stream.resume_token().or(token);
                if !interrupted {
                    continue;
                }
                interruption(&inner)
            }
            Err(error) if interrupted => {
                tracing::debug!(%error, "change stream failed after an interruption");
                interruption(&inner)
            }
            Err(error) if is_history_lost(&error) => {
                tracing::warn!(%error, "change stream history lost: restarting the stream; subscribers catch up from the collection");
                inner.count_history_lost();
                Reopen::Fresh
            }
            Err(error) => {
                tracing::warn!(%error, "change stream failed: resuming from the last token");
                Reopen::Resume(token.clone())
            }
        };
        match reopen(&inner, &hub, how).await {
            Some((fresh, fresh_token, fresh_generation)) => {
                stream = fresh;
                token = fresh_token;
                generation = fresh_generation;
            }
            None => return,
        }
    }
}

/// The stream lived through a lost connection (see [`Inner::stream_interruptions`]).
fn interruption(inner: &Inner) -> Reopen {
    tracing::warn!("the connection to the server was lost under the change stream: restarting it; subscribers catch up from the collection");
    inner.count_fallback();
    Reopen::Fresh
}

/// Opens the hub's stream again, with back-off, until it opens or the medium closes
/// (`None`). Returns the stream, its token, and the interruption count read before it
/// was opened.
async fn reopen(
    inner: &Inner,
    hub: &Hub,
    mut how: Reopen,
) -> Option<(Events, Option<ResumeToken>, u64)> {
    let mut backoff = crate::backoff::CHANGE_STREAM.start();
    let first = inner.stream_interruptions();
    if matches!(how, Reopen::Select(None)) {
        // No token yet (a server that gave none with the first batch): only a fresh
        // stream and a catch-up are exact.
        how = Reopen::Fresh;
    }
    loop {
        if matches!(how, Reopen::Resume(_) | Reopen::Select(_))
            && inner.stream_interruptions() != first
        {
            // The server went away while we tried: it may not be the one that gave us
            // the token any more (see `Inner::stream_interruptions`).
            how = interruption(inner);
        }
        let generation = inner.stream_interruptions();
        let token = match &how {
            Reopen::Resume(token) | Reopen::Select(token) => token.clone(),
            Reopen::Fresh => None,
        };
        let Ok(op) = inner.op() else { return None };
        let (selection_generation, selection) = hub.wanted();
        // Given up once the medium closes: the driver may be shut down under it.
        let opened = tokio::select! {
            _ = inner.closed.cancelled() => return None,
            opened = open(inner, hub_pipeline(&selection), token.clone()) => opened,
        };
        drop(op);
        match opened {
            Ok(stream) => {
                if matches!(how, Reopen::Fresh) {
                    // After the new anchor, so that a follower's catch-up scan starts
                    // once every later event is bound to reach the ring.
                    hub.push(RingItem::Gap);
                }
                hub.set_applied(selection_generation, selection);
                if matches!(how, Reopen::Select(_)) {
                    inner.count_selection();
                    tracing::debug!(
                        resumed = token.is_some(),
                        "change stream reopened with a new selection"
                    );
                } else {
                    tracing::info!(resumed = token.is_some(), "change stream reopened");
                }
                let token = stream.resume_token().or(token);
                return Some((stream, token, generation));
            }
            Err(error) if is_history_lost(&error) => {
                tracing::warn!(%error, "change stream history lost: restarting the stream; subscribers catch up from the collection");
                inner.count_history_lost();
                how = Reopen::Fresh;
            }
            Err(error) => {
                tracing::warn!(%error, backoff_ms = backoff.delay().as_millis() as u64, "change stream not reopened: retrying");
            }
        }
        if !backoff.sleep(&inner.closed).await {
            return None;
        }
    }
}

/// How long the hub waits between two attempts to narrow its stream.
const NARROWING_PAUSE: Duration = Duration::from_secs(1);

/// Tries to open the stream with a narrower selection after `token` (see
/// [`Hub::narrowed`]); `None` keeps the running stream (the server refused the resume,
/// or failed).
async fn narrow(
    inner: &Inner,
    hub: &Hub,
    token: Option<ResumeToken>,
) -> Option<(Events, Option<ResumeToken>)> {
    let (selection_generation, selection) = hub.narrowed()?;
    let token = token?;
    let _op = inner.op().ok()?;
    let opened = tokio::select! {
        _ = inner.closed.cancelled() => return None,
        opened = open(inner, hub_pipeline(&selection), Some(token.clone())) => opened,
    };
    match opened {
        Ok(stream) => {
            hub.set_applied(selection_generation, selection);
            inner.count_selection();
            tracing::debug!("change stream reopened with a narrower selection");
            let token = stream.resume_token().or(Some(token));
            Some((stream, token))
        }
        Err(error) => {
            tracing::debug!(%error, "change stream not narrowed now: the wider one goes on");
            None
        }
    }
}

fn to_item(inner: &Arc<Inner>, event: ChangeStreamEvent<RawDocumentBuf>) -> RingItem {
    let cluster_time = event.cluster_time;
    let Some(raw) = event.full_document else {
        return RingItem::Bad { cluster_time };
    };
    match decode_raw(&raw) {
        Ok(message) => {
            inner.waiters.stored(&message);
            RingItem::Message {
                message: Arc::new(message),
                token: bson::to_bson(&event.id).unwrap_or(bson::Bson::Null),
                cluster_time,
            }
        }
        Err(reason) => {
            inner.count_unreadable();
            // Keep the stream loop free of round trips: dead-letter in the background.
            let inner = Arc::clone(inner);
            tokio::spawn(async move { inner.dead_letter_raw(&raw, reason).await });
            RingItem::Bad { cluster_time }
        }
    }
}
