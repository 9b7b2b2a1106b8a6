//! One subscriber's way through the messages collection.
//!
//! A follower is in one of three modes:
//! - **ring**: reading the hub's ring of recent change events (the steady state);
//! - **stream**: resuming from a saved position on a temporary change stream of its
//!   own, exact in order, until it has caught up. The stream starts a safety window
//!   before the position (`startAtOperationTime`): the events up to the position's own
//!   were delivered before the restart, and are only remembered (see `Replay`), so
//!   that a later catch-up by `ts` does not deliver them again; where the server cannot
//!   start there, it resumes after the saved token (`resumeAfter`). It then hands
//!   over to the ring at the first event whose `clusterTime` is at or after its last
//!   one, skipping the ids it already delivered (`clusterTime` is not unique: one
//!   transaction, or from 8.0 a batch, shares it), and closes its stream;
//! - **scan**: querying the collection by `ts` when there is no usable token (start
//!   from the beginning, history lost, ring overrun, a position saved during a
//!   catch-up) or no change streams at all (standalone server: poll mode). `ts` is
//!   stamped by `$currentDate` before commit, so two concurrent writes can commit in
//!   the other order (DOCS-12300), within a safety window
//!   (`common.intracom.db.safety_window_ms`). Following change streams, a pass reads
//!   only the settled past, stamped more than the window before the server's clock, in
//!   `(ts, _id)` order: all of it committed before the pass, so the pass misses none of
//!   it and its positions are exact. The scan hands over to the ring at the ring's tip
//!   read when it began, once that tip is settled too (see [`Follower::scan`]).
//!   Polling, a pass reads to the newest message, and the next looks back a window and
//!   skips the ids it delivered.
//!
//! De-duplication without a copy per subscriber: the ids a scan must skip are those
//! delivered within the safety window. What came from the ring is not copied: the
//! follower keeps the ring's segments it read from (shared, `Arc`), for as long as they
//! hold messages stamped within the window of the newest one it saw, and turns them
//! into ids only when it leaves the ring (a gap, or an overrun: the segments outlive
//! their eviction from the ring while a follower holds them). Only what a scan or a
//! resumed stream delivered is remembered id by id, for the window. So a subscriber
//! keeping up costs a few pointers, whatever the rate.
//!
//! Messages older than the retention (`at` + `timeout_ms`) are not delivered even
//! when the oplog still has their insert event or the TTL monitor has not yet
//! deleted them (it runs about every 60 s): they are counted and reported as lost.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::ops::Bound::{Excluded, Unbounded};
use std::sync::Arc;
use std::time::Duration;

use bson::{doc, Bson, Document, RawDocumentBuf, Timestamp};
use futures::TryStreamExt;
use mongodb::change_stream::event::ResumeToken;
use tokio::sync::watch;

use super::errors::{is_history_lost, is_transient, to_error};
use super::hub::{self, Events, Hub, RingItem, Segment};
use super::{decode_raw, Inner};
use crate::config::Retention;
use crate::error::Result;
use crate::filter::{Filter, Position, SharedPosition, StartFrom};
use crate::medium::Event;
use crate::message::Message;

const SCAN_BATCH: i64 = 500;

/// A ring segment a follower read from: entries `from..=to`, whose newest stamp is
/// `newest`.
struct Held {
    segment: Arc<Segment>,
    from: u64,
    to: u64,
    newest: Option<Timestamp>,
}

enum Mode {
    Ring {
        cursor: u64,
    },
    Stream {
        stream: Box<Events>,
        last_cluster_time: Timestamp,
        /// `Inner::stream_interruptions` before the stream was opened.
        generation: u64,
        /// While the stream reads the events before the checkpoint (see [`Replay`]).
        replay: Option<Box<Replay>>,
    },
    /// Opening a resumed stream again from the checkpoint (its reading of the events
    /// before the checkpoint was interrupted): retried with back-off.
    Resume {
        position: Position,
    },
    Scan {
        lower: Timestamp,
        tip_before: Option<Handover>,
    },
}

/// Where a catch-up scan joins the ring: at the ring's tip read when it began, once
/// every message committed before then is settled (stamped more than a safety window
/// before the server's clock) and so read by a pass that delivers settled messages only.
#[derive(Clone, Copy, Debug)]
struct Handover {
    /// The ring's tip when the catch-up began.
    tip: u64,
    /// The server's clock (whole seconds) read just after.
    server_secs: u32,
}

/// The most ids a position names as delivered besides what its own place covers (`a`):
/// beyond it the position names none, and a restart from it may deliver some again.
const AHEAD_CAP: usize = 1024;

/// A resumed follower's stream starts a safety window before its checkpoint, not
/// after it: the events up to the checkpoint's own are what the subscription was
/// delivered before it restarted (a stream delivers in commit order, and the checkpoint
/// only moves over acked deliveries). They are not delivered again, only remembered as
/// delivered, so that a catch-up by `ts` later (a lost connection, a gap in the ring)
/// skips them, as it skips what this process delivered. Without them a resumed
/// follower knows only its checkpoint's own id, and a catch-up within a safety window
/// of the restart delivers again what was acked before it.
struct Replay {
    /// The checkpoint's event's cluster time, when the checkpoint came from a stream.
    cluster_time: Option<Timestamp>,
    /// The checkpoint's message.
    id: String,
    /// The checkpoint, to resume from it otherwise if the stream cannot get there.
    position: Position,
}

impl Replay {
    /// Whether a message whose event comes before the checkpoint's was delivered before
    /// the checkpoint's. From a stream, yes: it delivered in commit order. From a scan
    /// (a checkpoint saved during a catch-up by `ts`), only what is at or before the
    /// checkpoint in `(ts, _id)` order: a pass delivers in that order, and a message
    /// after it was not read before it (it was delivered later, by a later pass or the
    /// stream, or not yet: it is delivered now). A message whose event comes after the
    /// checkpoint's is delivered, though it may sort before it: committed after the
    /// checkpoint's message, it may not have been read before it (a scan's passes do
    /// not say), so it may come again rather than be lost.
    fn delivered_before(&self, ts: Timestamp, id: &str) -> bool {
        self.cluster_time.is_some() || (ts, id) <= (self.position.ts, self.id.as_str())
    }
}

pub(crate) struct Follower {
    inner: Arc<Inner>,
    hub: Option<Arc<Hub>>,
    tip: Option<watch::Receiver<u64>>,
    filter: Filter,
    mode: Mode,
    ready: VecDeque<Event>,
    /// Expired messages skipped since the last report.
    lost: u64,
    /// Every message stamped at or below this was handled (delivered, or not this
    /// follower's): a scan covered it, or it came before the follower started.
    floor: Option<Timestamp>,
    /// Every message at or below this `(ts, _id)` was handled: the settled scan
    /// position this follower resumed from.
    key_floor: Option<(Timestamp, String)>,
    /// Ids the saved position this follower resumed from named as delivered besides
    /// its own place (`a`): each event position names them until the follower reads
    /// their event (they may come after it) or the window passes them.
    carried: Recent,
    /// Whether it was said that a position could not name what was delivered above it.
    warned_ahead: bool,
    /// For a follower that started now: messages stamped below this came before it (a
    /// scan after a gap met before its first event reads from there, not from the
    /// beginning of what is retained).
    start_floor: Option<Timestamp>,
    /// The newest `ts` examined.
    last_ts: Timestamp,
    /// Ids delivered by scans and resumed streams within the safety window.
    recent: Recent,
    /// The ring segments read since the follower last joined the ring, from the oldest
    /// that may hold a message stamped within the safety window of `last_ts`.
    held: VecDeque<Held>,
    backoff: crate::backoff::Backoff,
    /// Its place in the hub's selection (targeted selection), for as long as it lives.
    registration: Option<hub::Registration>,
    /// Capped retention, resuming from a saved position: the stamp of the oldest message
    /// the collection still held then. A message stamped before it was pushed out of
    /// the collection, although the oplog may still have its insert event: it is
    /// reported as lost, not delivered, as a TTL-expired one is.
    capped_floor: Option<Timestamp>,
}

/// Ids delivered within the safety window of the newest one.
#[derive(Default)]
struct Recent {
    /// In arrival order, which is `ts` order but for writes that committed out of order.
    order: VecDeque<(Timestamp, String)>,
    /// Each id remembered, with its stamp.
    ids: HashMap<String, Timestamp>,
    /// The same ids in `(ts, _id)` order: what a scan's position names as delivered
    /// above it (see [`Recent::above`]).
    by_key: BTreeSet<(Timestamp, String)>,
    newest: Option<Timestamp>,
}

impl Recent {
    fn contains(&self, id: &str) -> bool {
        !self.ids.is_empty() && self.ids.contains_key(id)
    }

    fn insert(&mut self, ts: Timestamp, id: &str, window_secs: u32) {
        if !self.ids.contains_key(id) {
            self.ids.insert(id.to_string(), ts);
            self.order.push_back((ts, id.to_string()));
            self.by_key.insert((ts, id.to_string()));
        }
        self.advance(ts, window_secs);
    }

    /// Forgets an id before the window moves past it.
    fn remove(&mut self, id: &str) {
        if let Some(ts) = self.ids.remove(id) {
            self.by_key.remove(&(ts, id.to_string()));
        }
    }

    /// Moves the window on to `ts` (forgetting what falls out of it) without
    /// remembering an id.
    fn advance(&mut self, ts: Timestamp, window_secs: u32) {
        let newest = self.newest.map_or(ts, |n| n.max(ts));
        self.newest = Some(newest);
        let floor = newest.time.saturating_sub(window_secs);
        while self.order.front().is_some_and(|(t, _)| t.time < floor) {
            if let Some((t, old)) = self.order.pop_front() {
                if self.ids.get(&old) == Some(&t) {
                    self.ids.remove(&old);
                    self.by_key.remove(&(t, old));
                }
            }
        }
    }

    /// The ids remembered that sort after `(ts, id)`, at most `cap` of them (`None` when
    /// there are more).
    fn above(&self, ts: Timestamp, id: &str, cap: usize) -> Option<Vec<String>> {
        let mut ids = Vec::new();
        for (_, i) in self
            .by_key
            .range((Excluded((ts, id.to_string())), Unbounded))
        {
            if ids.len() == cap {
                return None;
            }
            ids.push(i.clone());
        }
        Some(ids)
    }

    /// Every id remembered, at most `cap` of them (`None` when there are more).
    fn all(&self, cap: usize) -> Option<Vec<String>> {
        (self.ids.len() <= cap).then(|| self.by_key.iter().map(|(_, i)| i.clone()).collect())
    }
}

/// The server-side form of a filter, for a `find` (`prefix` "") or a change stream
/// `$match` on inserts (`prefix` "fullDocument.").
pub(crate) fn filter_query(filter: &Filter, prefix: &str) -> Document {
    let f = |name: &str| format!("{prefix}{name}");
    let mut query = Document::new();
    let mut and = Vec::new();
    if let Some(service) = &filter.service {
        query.insert(f("serviceNameDest"), doc! { "$in": [Bson::Null, service] });
        let own_instance = match &filter.instance {
            Some(instance) => doc! { f("instanceDest"): instance },
            None => doc! { f("instanceDest"): { "$in": [] } },
        };
        and.push(doc! { "$or": [ { f("instanceDest"): { "$exists": false } }, own_instance ] });
        if filter.work {
            query.insert(f("delivery"), "one");
        } else {
            query.insert(f("delivery"), doc! { "$ne": "one" });
        }
    }
    if let Some(instance) = &filter.exclude_instance {
        query.insert(f("instanceSource"), doc! { "$ne": instance });
    }
    if let Some(actions) = &filter.actions {
        query.insert(
            f("action"),
            doc! { "$in": actions.iter().collect::<Vec<_>>() },
        );
    }
    if let Some(sources) = &filter.sources {
        query.insert(
            f("serviceNameSource"),
            doc! { "$in": sources.iter().collect::<Vec<_>>() },
        );
    }
    if let Some(types) = &filter.types {
        query.insert(
            f("type"),
            doc! { "$in": types.iter().map(|t| t.as_str()).collect::<Vec<_>>() },
        );
    }
    if !and.is_empty() {
        query.insert("$and", and);
    }
    query
}

/// The comment of the query that anchors a follower of the shared stream starting now
/// ([`Follower::newest_ts`]).
pub(crate) const ANCHOR_COMMENT: &str = "intracom: where a subscription starts";

/// How an unreadable document is remembered among the ids of the safety window: its
/// `_id` if it is a string (a message's is), else a form no message id can take.
fn unreadable_key(id: &Bson) -> String {
    match id {
        Bson::String(id) => id.clone(),
        other => format!("\u{0}{other}"),
    }
}

fn minus_window(ts: Timestamp, window_secs: u32) -> Timestamp {
    Timestamp {
        time: ts.time.saturating_sub(window_secs),
        increment: 0,
    }
}

impl Follower {
    /// `now` is the ring sequence number where a [`StartFrom::Now`] follower starts.
    pub(crate) async fn start(
        inner: Arc<Inner>,
        hub: Option<Arc<Hub>>,
        from: StartFrom,
        filter: Filter,
        now: u64,
    ) -> Result<Self> {
        let tip = hub.as_ref().map(|h| h.tip.subscribe());
        let mut follower = Follower {
            inner,
            hub,
            tip,
            filter,
            mode: Mode::Scan {
                lower: Timestamp {
                    time: 0,
                    increment: 0,
                },
                tip_before: None,
            },
            ready: VecDeque::new(),
            lost: 0,
            floor: None,
            key_floor: None,
            carried: Recent::default(),
            warned_ahead: false,
            start_floor: None,
            last_ts: Timestamp {
                time: 0,
                increment: 0,
            },
            recent: Recent::default(),
            held: VecDeque::new(),
            backoff: crate::backoff::FOLLOWER.start(),
            registration: None,
            capped_floor: None,
        };
        // The hub's stream must select this follower's messages before the follower
        // reads a position in the ring. When the running stream did not select them
        // since `now`, it is reopened (from its last token) with a selection that does,
        // and the follower reads the ring only after that reopening: a follower that
        // starts now reads the collection from the moment of this call up to there.
        let mut widened = None;
        if let Some(hub) = follower.hub.clone() {
            let (registration, joined) = hub.register(&follower.filter, now);
            follower.registration = registration;
            if let hub::Joined::Widened(generation) = joined {
                widened = Some(hub.applied(&follower.inner, generation).await);
            }
        }
        follower.mode = match (from, widened) {
            (StartFrom::Now, Some(reopened)) => {
                // The ring after `reopened` holds every event of this follower after
                // the reopened stream's token, which can come before this call. Now is
                // the newest stamp read here: what is stamped at or before the safety
                // window before it is skipped, and the ids stamped within that window
                // are remembered as delivered (they committed before this call);
                // what commits later is delivered, whatever its stamp.
                let newest = Self::newest_ts(&follower.inner, None).await?;
                follower.prime(newest).await?;
                follower.floor = Some(minus_window(newest, follower.window_secs()));
                Mode::Ring { cursor: reopened }
            }
            (from, _) => match from {
                StartFrom::Now => match &follower.hub {
                    Some(hub) => {
                        // What came before: the newest message the ring holds up to `now`
                        // or, with none there, the newest stamp in the collection. A scan
                        // after a gap met before this follower's first event starts there,
                        // not at the beginning of what is retained.
                        let seen = hub.ring().newest_message_ts_upto(now);
                        let anchor = match seen {
                            Some(ts) => ts,
                            None => Self::newest_ts(&follower.inner, Some(ANCHOR_COMMENT)).await?,
                        };
                        if anchor > follower.last_ts {
                            follower.start_floor = Some(anchor);
                            follower.last_ts = anchor;
                        }
                        Mode::Ring { cursor: now }
                    }
                    None => {
                        // Poll mode: start after the newest stamp, and remember the ids of the
                        // safety window so they are not delivered as new.
                        let newest = Self::newest_ts(&follower.inner, None).await?;
                        follower.prime(newest).await?;
                        Mode::Scan {
                            lower: newest,
                            tip_before: None,
                        }
                    }
                },
                StartFrom::Beginning => Mode::Scan {
                    lower: Timestamp {
                        time: 0,
                        increment: 0,
                    },
                    tip_before: None,
                },
                StartFrom::After(position) => follower.resume(position, true).await?,
            },
        };
        Ok(follower)
    }

    fn window_secs(&self) -> u32 {
        u32::try_from(self.inner.db_config.safety_window_ms.div_ceil(1000)).unwrap_or(u32::MAX)
    }

    /// Where a follower from a saved position starts. With `replay`, its stream starts a
    /// safety window before the checkpoint (see [`Replay`]); without it (or when the
    /// server cannot start there), after the checkpoint's resume token.
    async fn resume(&mut self, position: Position, replay: bool) -> Result<Mode> {
        let token = position.token.clone().unwrap_or_default();
        let window = self.window_secs();
        if let Ok(id) = token.get_str("id") {
            self.recent.insert(position.ts, id, window);
        }
        self.last_ts = self.last_ts.max(position.ts);
        // What the position says was handled besides its own place (see
        // `position_of`).
        if let Ok(f) = token.get_timestamp("f") {
            self.floor = Some(self.floor.map_or(f, |floor| floor.max(f)));
        }
        if let (Ok(kt), Ok(ki)) = (token.get_timestamp("kt"), token.get_str("ki")) {
            self.raise_key_floor(kt, ki);
        }
        if let Ok(ids) = token.get_array("a") {
            let at = token.get_timestamp("at").unwrap_or(position.ts);
            for id in ids.iter().filter_map(Bson::as_str) {
                self.recent.insert(at, id, window);
                self.carried.insert(at, id, window);
            }
        }
        if self.inner.db_config.retention == Retention::Capped {
            self.capped_floor = Self::oldest_ts(&self.inner).await?;
        }
        if let (Ok(true), Ok(id)) = (token.get_bool("s"), token.get_str("id")) {
            // A settled scan's position: everything at or below it was handled, and
            // above it only what it names. The collection is read from there, not the
            // oplog: a stream from so far back may outlive the oplog's history under
            // it (a server that drops the entries a lagging cursor has not read yet,
            // instead of failing it, would leave a gap).
            self.raise_key_floor(position.ts, id);
            self.report_if_expired(position.ts);
            tracing::debug!("resuming from a catch-up's saved position: reading the collection");
            return Ok(Mode::Scan {
                lower: minus_window(position.ts, window),
                tip_before: None,
            });
        }
        let resume_token = token
            .get("rt")
            .cloned()
            .and_then(|rt| bson::from_bson::<ResumeToken>(rt).ok());
        let cluster_time = token.get_timestamp("ct").ok();
        if self.hub.is_some() {
            // Inserts this subscriber wants, and the events that end the stream (a drop
            // of the collection after the saved position): those must reach us, or the
            // stream would look silent instead of ended.
            let mut inserts = filter_query(&self.filter, "fullDocument.");
            inserts.insert("operationType", "insert");
            let pipeline = vec![doc! { "$match": { "$or": [inserts, hub::ending_events()] } }];
            let generation = self.inner.stream_interruptions();
            let id = token.get_str("id").ok().map(str::to_string);
            if let (true, Some(id)) = (replay, id) {
                // A message's stamp is a tick of the server's clock taken before its
                // write's oplog time (`$currentDate` runs as the update is applied, the
                // oplog time is taken as the write is logged): every message a catch-up
                // from this checkpoint could read again (stamped after the window
                // before it) has its event at or after this start.
                match hub::open_at(
                    &self.inner,
                    pipeline.clone(),
                    minus_window(position.ts, window),
                )
                .await
                {
                    Ok(stream) => {
                        tracing::debug!(
                            "resuming from a saved position: reading the window before it"
                        );
                        return Ok(Mode::Stream {
                            stream: Box::new(stream),
                            last_cluster_time: cluster_time.unwrap_or(Timestamp {
                                time: 0,
                                increment: 0,
                            }),
                            generation,
                            replay: Some(Box::new(Replay {
                                cluster_time,
                                id,
                                position,
                            })),
                        });
                    }
                    Err(e) if is_transient(&e) => return Err(to_error(e)),
                    Err(e) => {
                        // History gone for the window (a small oplog), or a server
                        // that does not start at an operation time: resume after the
                        // token, or read the collection. A catch-up within a window of
                        // this restart may then deliver again what was acked before it.
                        tracing::warn!(error = %e, "the window before the saved position cannot be read from the change stream: resuming without it");
                    }
                }
            }
            if let (Some(rt), Some(ct)) = (resume_token, cluster_time) {
                match hub::open(&self.inner, pipeline, Some(rt)).await {
                    Ok(stream) => {
                        tracing::debug!("resuming from a saved resume token");
                        return Ok(Mode::Stream {
                            stream: Box::new(stream),
                            last_cluster_time: ct,
                            generation,
                            replay: None,
                        });
                    }
                    Err(e) if is_history_lost(&e) => {
                        tracing::warn!(error = %e, "saved resume token is past the oplog: catching up from the collection by ts");
                        self.inner.count_history_lost();
                        self.report_if_expired(position.ts);
                    }
                    Err(e) if is_transient(&e) => return Err(to_error(e)),
                    Err(e) => {
                        // The server refuses the token for another reason (a position
                        // from elsewhere: another deployment, a hand-made or damaged one):
                        // its `ts` is still a place in the collection to read from.
                        tracing::warn!(error = %e, "saved resume token refused by the server: catching up from the collection by ts");
                        self.inner.count_fallback();
                        self.report_if_expired(position.ts);
                    }
                }
            }
        }
        if self.capped_floor.is_some() {
            // Read from the collection: what was pushed out is not there to count.
            self.report_if_expired(position.ts);
        }
        Ok(Mode::Scan {
            lower: minus_window(position.ts, self.window_secs()),
            tip_before: None,
        })
    }

    /// Everything at or below `(ts, id)` was handled.
    fn raise_key_floor(&mut self, ts: Timestamp, id: &str) {
        if self
            .key_floor
            .as_ref()
            .is_none_or(|(t, i)| (*t, i.as_str()) < (ts, id))
        {
            self.key_floor = Some((ts, id.to_string()));
        }
    }

    /// After losing the change-stream history, messages after a position older than the
    /// retention (or, capped, older than the oldest message kept) may have been deleted:
    /// say so (the count is unknown).
    fn report_if_expired(&mut self, ts: Timestamp) {
        if self
            .inner
            .retention_secs()
            .is_some_and(|r| u64::from(ts.time) + r < now_secs())
            || self.capped_floor.is_some_and(|floor| ts < floor)
        {
            self.ready.push_back(Event::Lost { count: 0 });
        }
    }

    /// The stamp of the oldest message in the collection, if any.
    async fn oldest_ts(inner: &Inner) -> Result<Option<Timestamp>> {
        let _op = inner.op()?;
        let oldest = inner
            .messages
            .find_one(doc! {})
            .sort(doc! { "ts": 1 })
            .projection(doc! { "ts": 1 })
            .await
            .map_err(to_error)?;
        Ok(oldest.and_then(|d| d.get_timestamp("ts").ok()))
    }

    /// The newest stamp in the collection (0 when it is empty). `comment` names the
    /// query in the server's logs and profiler: [`ANCHOR_COMMENT`] for a follower of the
    /// shared stream that starts now while the process's ring holds no message.
    async fn newest_ts(inner: &Inner, comment: Option<&str>) -> Result<Timestamp> {
        let _op = inner.op()?;
        let mut find = inner
            .messages
            .find_one(doc! {})
            .sort(doc! { "ts": -1 })
            .projection(doc! { "ts": 1 });
        if let Some(comment) = comment {
            find = find.comment(comment);
        }
        let newest = find.await.map_err(to_error)?;
        Ok(newest
            .and_then(|d| d.get_timestamp("ts").ok())
            .unwrap_or(Timestamp {
                time: 0,
                increment: 0,
            }))
    }

    /// A position after every message the collection holds now ([`Medium::anchor`]):
    /// the newest stamp, with the ids stamped within the safety window before it named
    /// as delivered (what [`StartFrom::Now`] in poll mode remembers), so that a
    /// follower resumed from it reads the window again for what commits later and
    /// skips what was there. `None` when the window holds more ids than a position
    /// names.
    ///
    /// [`Medium::anchor`]: crate::medium::Medium::anchor
    pub(crate) async fn anchor(inner: &Inner) -> Result<Option<Position>> {
        let newest = Self::newest_ts(inner, None).await?;
        let window =
            u32::try_from(inner.db_config.safety_window_ms.div_ceil(1000)).unwrap_or(u32::MAX);
        let _op = inner.op()?;
        let mut cursor = inner
            .messages
            .find(doc! { "ts": { "$gt": minus_window(newest, window) } })
            .projection(doc! { "ts": 1 })
            .limit(AHEAD_CAP as i64 + 1)
            .await
            .map_err(to_error)?;
        let mut ids = Vec::new();
        while let Some(d) = cursor.try_next().await.map_err(to_error)? {
            if ids.len() == AHEAD_CAP {
                return Ok(None);
            }
            if let Ok(id) = d.get_str("_id") {
                ids.push(Bson::String(id.to_string()));
            }
        }
        Ok(Some(Position::new(
            newest,
            Some(doc! { "a": ids, "at": newest }),
        )))
    }

    async fn prime(&mut self, newest: Timestamp) -> Result<()> {
        let window = self.window_secs();
        let _op = self.inner.op()?;
        let mut cursor = self
            .inner
            .messages
            .find(doc! { "ts": { "$gt": minus_window(newest, window) } })
            .projection(doc! { "ts": 1 })
            .await
            .map_err(to_error)?;
        while let Some(d) = cursor.try_next().await.map_err(to_error)? {
            if let (Ok(id), Ok(ts)) = (d.get_str("_id"), d.get_timestamp("ts")) {
                self.recent.insert(ts, id, window);
            }
        }
        self.last_ts = newest;
        Ok(())
    }

    /// Accepts a decoded message: de-duplication, expiry, filter. Returns whether it was
    /// new to this follower (delivered, or skipped as expired or filtered out). A
    /// message from the ring is not remembered by id: the held segment remembers it
    /// (see the module docs).
    ///
    /// `settled`: a scan's delivery of a message stamped more than a safety window
    /// before the server's clock when the pass began, read in `(ts, _id)` order (see
    /// [`Follower::position_of`]).
    fn offer(
        &mut self,
        message: Arc<Message>,
        token: Option<&Bson>,
        cluster_time: Option<Timestamp>,
        from_ring: bool,
        settled: bool,
    ) -> bool {
        let Some(ts) = message.ts else { return false };
        self.last_ts = self.last_ts.max(ts);
        if cluster_time.is_some() {
            // Its event is read: a position after it need not name it.
            self.carried.remove(&message.id);
            self.carried.advance(ts, self.window_secs());
        }
        // A scan (after a gap met before this follower's first event) leaves out what
        // is stamped before it started; the ring after its start is all after it. (A
        // message stamped as the start was is delivered: on mongod that is the newest
        // one before it, once, and on servers that stamp whole seconds, one of the same
        // second, which may be after it.)
        if self.recent.contains(&message.id)
            || self.floor.is_some_and(|f| ts <= f)
            || self
                .key_floor
                .as_ref()
                .is_some_and(|(t, i)| (ts, message.id.as_str()) <= (*t, i.as_str()))
            || (!from_ring && self.start_floor.is_some_and(|f| ts < f))
        {
            return false;
        }
        if from_ring {
            self.recent.advance(ts, self.window_secs());
        } else {
            self.recent.insert(ts, &message.id, self.window_secs());
        }
        if self.inner.is_expired(&message) {
            self.lost += 1;
            return true;
        }
        if !self.filter.matches(&message) {
            return true;
        }
        if self.lost > 0 {
            self.ready.push_back(Event::Lost { count: self.lost });
            self.lost = 0;
        }
        let position = self.position_of(&message, token, cluster_time, settled);
        let position = match cluster_time {
            Some(_) => self.with_window(position, &message, from_ring),
            None => SharedPosition::new(position),
        };
        self.ready.push_back(Event::Message(message, position));
        true
    }

    /// An event's position, which also names the ids delivered within the safety window
    /// before it (`a`, at most [`AHEAD_CAP`]): should the oplog no longer hold that
    /// window when a restart resumes from it, the restart reads the collection from a
    /// window before it and skips them, instead of delivering them again. Made only when
    /// read (a named subscription's checkpoint), from the ring segments the follower holds
    /// anyway and the few ids it remembers, not copied for every delivery.
    fn with_window(&self, base: Position, message: &Message, from_ring: bool) -> SharedPosition {
        let ts = base.ts;
        let window = self.window_secs();
        let since = ts.time.saturating_sub(window);
        let remembered: Option<Vec<(Timestamp, String)>> = (self.recent.ids.len() <= AHEAD_CAP)
            .then(|| {
                self.recent
                    .ids
                    .iter()
                    .filter(|(id, t)| t.time >= since && **id != message.id)
                    .map(|(id, t)| (*t, id.clone()))
                    .collect()
            });
        let Some(remembered) = remembered else {
            return SharedPosition::new(base);
        };
        let held: Vec<(Arc<Segment>, u64, u64)> = if from_ring {
            self.held
                .iter()
                .map(|h| (Arc::clone(&h.segment), h.from, h.to))
                .collect()
        } else {
            Vec::new()
        };
        if remembered.is_empty() && held.is_empty() {
            return SharedPosition::new(base);
        }
        let own = message.id.clone();
        // Only this follower's messages: the others are not delivered again anyway.
        let filter = self.filter.clone();
        SharedPosition::lazily(base, move |base| {
            let mut token = base.token.clone().unwrap_or_default();
            let mut ids: Vec<String> = token
                .get_array("a")
                .map(|a| {
                    a.iter()
                        .filter_map(Bson::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            let mut newest = token.get_timestamp("at").ok();
            let mut note = |t: Timestamp, id: &str| {
                if t.time >= since && id != own && !ids.iter().any(|i| i == id) {
                    ids.push(id.to_string());
                    newest = Some(newest.map_or(t, |n| n.max(t)));
                }
            };
            for (t, id) in &remembered {
                note(*t, id);
            }
            for (segment, from, to) in &held {
                for seq in *from..=*to {
                    if let Some(RingItem::Message { message, .. }) = segment.get(seq) {
                        if let (Some(t), true) = (message.ts, filter.matches(message)) {
                            note(t, &message.id);
                        }
                    }
                }
            }
            if ids.len() <= AHEAD_CAP && !ids.is_empty() {
                token.insert("a", ids);
                if let Some(newest) = newest {
                    token.insert("at", newest);
                }
            }
            Position::new(ts, Some(token))
        })
    }

    /// The position of a delivery, from which a restart delivers exactly what came
    /// after it: its message id, and
    /// - from a change stream (the ring, or a stream of its own): the event's resume
    ///   token and cluster time (`rt`, `ct`): every event up to it was handled;
    /// - from a settled scan (`s`): every message up to its `(ts, _id)` was handled,
    ///   for all of them committed before the pass read there;
    /// - `f` (and `kt`/`ki`): every message stamped at or below `f` (at or below
    ///   `(kt, ki)`) was handled;
    /// - `a` (with `at`, the newest stamp among them): ids delivered that the above does
    ///   not cover: for a settled scan, those above it (delivered before the scan, from
    ///   the ring); for an event, those a restart named (their event may come after it).
    ///
    /// A scan of the unsettled past (polling a server without change streams) gives
    /// none of `s`, `a`: a restart from it reads a safety window again and may deliver
    /// again what was delivered after it sorted below it.
    fn position_of(
        &mut self,
        message: &Message,
        token: Option<&Bson>,
        cluster_time: Option<Timestamp>,
        settled: bool,
    ) -> Position {
        let ts = message.ts.unwrap_or(Timestamp {
            time: 0,
            increment: 0,
        });
        let mut t = doc! { "id": &message.id };
        if let Some(token) = token {
            t.insert("rt", token.clone());
        }
        if let Some(ct) = cluster_time {
            t.insert("ct", ct);
        }
        let besides = if settled {
            let above = self.recent.above(ts, &message.id, AHEAD_CAP);
            if above.is_some() {
                t.insert("s", true);
            }
            above.map(|ids| (ids, self.recent.newest))
        } else if cluster_time.is_some() && !self.carried.ids.is_empty() {
            self.carried
                .all(AHEAD_CAP)
                .map(|ids| (ids, self.carried.newest))
        } else {
            Some((Vec::new(), None))
        };
        match besides {
            Some((ids, newest)) if !ids.is_empty() => {
                t.insert("a", ids);
                if let Some(newest) = newest {
                    t.insert("at", newest);
                }
            }
            Some(_) => {}
            None => {
                if !self.warned_ahead {
                    self.warned_ahead = true;
                    tracing::warn!(
                        cap = AHEAD_CAP,
                        "more deliveries within the safety window than a saved position names: a restart from this position may deliver some of them again"
                    );
                }
            }
        }
        if let Some(f) = self.floor {
            t.insert("f", f);
        }
        if let Some((kt, ki)) = &self.key_floor {
            t.insert("kt", *kt);
            t.insert("ki", ki.as_str());
        }
        Position::new(ts, Some(t))
    }

    /// Reads the ring from the cursor; switches to a scan on a gap or an overrun.
    fn fill_from_ring(&mut self, mut cursor: u64) -> Mode {
        let Some(hub) = self.hub.clone() else {
            return Mode::Ring { cursor };
        };
        let batch = SCAN_BATCH as u64;
        // The segments of the next batch, taken out from under the ring's lock: their
        // entries are read without it.
        let segments: Vec<Arc<Segment>> = {
            let ring = hub.ring();
            if cursor + 1 < ring.first_seq() {
                let behind = ring.tip().saturating_sub(cursor);
                drop(ring);
                tracing::warn!(
                    behind,
                    "subscriber fell behind the change-event buffer: catching up from the collection"
                );
                self.inner.count_fallback();
                return self.leave_ring();
            }
            ring.segments_from(cursor + 1)
                .take_while(|s| s.first_seq() <= cursor + batch)
                .cloned()
                .collect()
        };
        let mut seq = cursor + 1;
        for segment in segments {
            while seq <= cursor + batch {
                let Some(item) = segment.get(seq) else { break };
                match item {
                    RingItem::Gap => {
                        self.inner.count_fallback();
                        return self.leave_ring();
                    }
                    RingItem::Message {
                        message,
                        token,
                        cluster_time,
                    } => {
                        self.offer(Arc::clone(message), Some(token), *cluster_time, true, false);
                        self.hold(&segment, seq, message.ts);
                    }
                    RingItem::Bad { .. } => {}
                }
                seq += 1;
            }
        }
        cursor = seq - 1;
        Mode::Ring { cursor }
    }

    /// Keeps the segment of a ring entry just read, and lets go of the oldest segments
    /// once no message in them is stamped within the safety window of `last_ts`.
    fn hold(&mut self, segment: &Arc<Segment>, seq: u64, ts: Option<Timestamp>) {
        match self.held.back_mut() {
            Some(held) if Arc::ptr_eq(&held.segment, segment) => {
                held.to = seq;
                held.newest = held.newest.max(ts);
            }
            _ => self.held.push_back(Held {
                segment: Arc::clone(segment),
                from: seq,
                to: seq,
                newest: ts,
            }),
        }
        let floor = self.last_ts.time.saturating_sub(self.window_secs());
        while self.held.len() > 1
            && self
                .held
                .front()
                .is_some_and(|h| h.newest.is_none_or(|t| t.time < floor))
        {
            self.held.pop_front();
        }
    }

    /// Leaves the ring for a scan from the safety window before `last_ts`: the messages
    /// read from the held segments become ids to skip.
    fn leave_ring(&mut self) -> Mode {
        let window = self.window_secs();
        for held in std::mem::take(&mut self.held) {
            for seq in held.from..=held.to {
                if let Some(RingItem::Message { message, .. }) = held.segment.get(seq) {
                    if let Some(ts) = message.ts {
                        self.recent.insert(ts, &message.id, window);
                    }
                }
            }
        }
        self.scan_from_last()
    }

    /// Leaves a resumed stream that cannot go on (`why`) for a scan of the collection.
    fn catch_up(&mut self, why: &'static str) -> Mode {
        tracing::warn!(why, "catching up from the collection by ts");
        self.inner.count_fallback();
        self.scan_from_last()
    }

    fn scan_from_last(&mut self) -> Mode {
        Mode::Scan {
            lower: minus_window(self.last_ts, self.window_secs()),
            tip_before: None,
        }
    }

    /// A catch-up by `ts`, one pass at a time. Returns the next mode.
    ///
    /// Following change streams, a pass delivers only the settled past: what is stamped
    /// more than a safety window before the server's clock when the pass begins
    /// committed before it began (`ts` is stamped before commit, and a write commits
    /// within the window), so the pass reads it all, in `(ts, _id)` order, and a
    /// position from it is exact (see [`Follower::position_of`]). The catch-up joins
    /// the ring at the tip read when it began, once that tip is settled: every message
    /// committed before it is delivered by a pass, every later one is in the ring after
    /// it, and the ring skips what is stamped at or below the last pass's bound. Until
    /// then it waits, a second at a time, delivering what settles.
    ///
    /// Polling a server without change streams, a pass reads to the newest message and
    /// the next looks back a safety window, skipping the ids it delivered.
    async fn scan(&mut self, lower: Timestamp, handover: Option<Handover>) -> Result<Mode> {
        let Some(hub) = self.hub.clone() else {
            return self.poll(lower).await;
        };
        let handover = match handover {
            Some(handover) => handover,
            None => {
                let tip = hub.ring().tip();
                Handover {
                    tip,
                    server_secs: Self::server_secs(&self.inner).await?,
                }
            }
        };
        let now = Self::server_secs(&self.inner).await?;
        let upper = Timestamp {
            time: now.saturating_sub(self.window_secs().saturating_add(1)),
            increment: u32::MAX,
        };
        let fresh = if upper > lower {
            self.pass(lower, Some(upper), true).await?
        } else {
            0
        };
        let lower = lower.max(upper);
        if handover.tip + 1 < hub.ring().first_seq() {
            // The ring moved past the hand-over point: another one, later.
            tracing::debug!(
                fresh,
                "the change-event buffer moved past the catch-up's hand-over point"
            );
            return Ok(Mode::Scan {
                lower,
                tip_before: None,
            });
        }
        if upper.time >= handover.server_secs {
            self.floor = Some(self.floor.map_or(upper, |f| f.max(upper)));
            tracing::debug!(fresh, "scan caught up: following the change stream");
            return Ok(Mode::Ring {
                cursor: handover.tip,
            });
        }
        let wait = Duration::from_secs(u64::from(handover.server_secs - upper.time))
            .min(Duration::from_secs(1));
        tokio::select! {
            _ = self.inner.closed.cancelled() => {}
            _ = tokio::time::sleep(wait) => {}
        }
        Ok(Mode::Scan {
            lower,
            tip_before: Some(handover),
        })
    }

    /// Polling a server without change streams: a pass to the newest message, then,
    /// when it found nothing new, a pause.
    async fn poll(&mut self, lower: Timestamp) -> Result<Mode> {
        let fresh = self.pass(lower, None, false).await?;
        if fresh == 0 {
            let pause = Duration::from_millis(self.inner.db_config.poll_interval_ms);
            tokio::select! {
                _ = self.inner.closed.cancelled() => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
        Ok(Mode::Scan {
            lower: minus_window(self.last_ts.max(lower), self.window_secs()),
            tip_before: None,
        })
    }

    /// The server's clock, in whole seconds (`hello.localTime`): what a catch-up judges
    /// settled by, not this process's clock, which may be skewed. A server that does not
    /// say (none known) is judged by this process's clock.
    async fn server_secs(inner: &Inner) -> Result<u32> {
        let _op = inner.op()?;
        let hello = match inner.db.run_command(doc! { "hello": 1 }).await {
            Ok(hello) => hello,
            // Before 4.4.2 (CommandNotFound): the legacy name.
            Err(e) if super::errors::code(&e) == Some(59) => inner
                .db
                .run_command(doc! { "isMaster": 1 })
                .await
                .map_err(to_error)?,
            Err(e) => return Err(to_error(e)),
        };
        let secs = match hello.get_datetime("localTime") {
            Ok(at) => u64::try_from(at.timestamp_millis() / 1000).unwrap_or(0),
            Err(_) => now_secs(),
        };
        Ok(u32::try_from(secs).unwrap_or(u32::MAX))
    }

    /// One scan pass: every matching message stamped after `lower` (and at or below
    /// `upper`), in `(ts, _id)` order. Returns how many were new to this follower.
    ///
    /// Pages are keyed on `(ts, _id)`, not on `ts` alone: a `ts` is unique per node,
    /// not across the shards of a cluster (each primary ticks its own clock), so a
    /// page boundary inside a run of equal stamps must not drop the rest of the run.
    async fn pass(
        &mut self,
        lower: Timestamp,
        upper: Option<Timestamp>,
        settled: bool,
    ) -> Result<usize> {
        let filter = filter_query(&self.filter, "");
        // The last (ts, _id) of the previous page.
        let mut after: Option<(Timestamp, Bson)> = None;
        // New to this follower: the look-back window re-reads what was delivered.
        let mut fresh = 0usize;
        loop {
            let above = |ts: Timestamp| match upper {
                Some(upper) => doc! { "$gt": ts, "$lte": upper },
                None => doc! { "$gt": ts },
            };
            let page = match &after {
                None => doc! { "ts": above(lower) },
                Some((ts, id)) => doc! { "$or": [
                    { "ts": above(*ts) },
                    { "ts": *ts, "_id": { "$gt": id.clone() } },
                ] },
            };
            let query = if filter.is_empty() {
                page
            } else {
                doc! { "$and": [filter.clone(), page] }
            };
            let op = self.inner.op()?;
            let batch: Vec<RawDocumentBuf> = self
                .inner
                .messages
                .clone_with_type::<RawDocumentBuf>()
                .find(query)
                .sort(doc! { "ts": 1, "_id": 1 })
                .limit(SCAN_BATCH)
                .await
                .map_err(to_error)?
                .try_collect()
                .await
                .map_err(to_error)?;
            drop(op);
            let full = batch.len() as i64 == SCAN_BATCH;
            for document in batch {
                // Whether `after` holds this document's (ts, _id).
                let mut keyed = false;
                if let (Ok(ts), Ok(Some(id))) = (document.get_timestamp("ts"), document.get("_id"))
                {
                    if let Ok(id) = Bson::try_from(id) {
                        after = Some((ts, id));
                        keyed = true;
                    }
                }
                match decode_raw(&document) {
                    Ok(message) => {
                        if self.offer(Arc::new(message), None, None, false, settled) {
                            fresh += 1;
                        }
                    }
                    Err(reason) => {
                        // Scans read the safety window again (polling, catching up): an
                        // unreadable document is dead-lettered and counted once.
                        let key = after
                            .as_ref()
                            .filter(|_| keyed)
                            .map(|(ts, id)| (*ts, unreadable_key(id)));
                        if key.as_ref().is_some_and(|(_, k)| self.recent.contains(k)) {
                            continue;
                        }
                        if let Some((ts, k)) = &key {
                            self.recent.insert(*ts, k, self.window_secs());
                        }
                        self.inner.count_unreadable();
                        self.inner.dead_letter_raw(&document, reason).await;
                    }
                }
            }
            if !full {
                break;
            }
        }
        Ok(fresh)
    }

    /// Offers a resumed stream's insert event; returns its cluster time.
    async fn take_event(
        &mut self,
        event: mongodb::change_stream::event::ChangeStreamEvent<RawDocumentBuf>,
        last_cluster_time: Timestamp,
    ) -> Timestamp {
        let ct = event.cluster_time.unwrap_or(last_cluster_time);
        let token = bson::to_bson(&event.id).ok();
        if let Some(raw) = &event.full_document {
            match decode_raw(raw) {
                Ok(message) => {
                    if Self::pushed_out(&self.inner, self.capped_floor, &message).await {
                        // Capped: counted as lost (reported before the next delivery)
                        // and remembered, as an expired one is.
                        if let Some(ts) = message.ts {
                            self.last_ts = self.last_ts.max(ts);
                            if !self.recent.contains(&message.id) {
                                self.recent.insert(ts, &message.id, self.window_secs());
                                self.lost += 1;
                            }
                        }
                    } else {
                        self.offer(Arc::new(message), token.as_ref(), Some(ct), false, false);
                    }
                }
                Err(reason) => {
                    self.inner.count_unreadable();
                    self.inner.dead_letter_raw(raw, reason).await;
                }
            }
        }
        ct
    }

    /// Capped retention, resuming: whether a message the stream read from the oplog was
    /// pushed out of the collection. Stamped before the oldest message kept, it was; on
    /// servers that stamp whole seconds the oldest kept may share its stamp, and then
    /// the collection is asked. (Eviction follows insertion order, not stamps.)
    async fn pushed_out(inner: &Inner, floor: Option<Timestamp>, message: &Message) -> bool {
        let (Some(floor), Some(ts)) = (floor, message.ts) else {
            return false;
        };
        if ts < floor {
            return true;
        }
        if ts > floor {
            return false;
        }
        let Ok(_op) = inner.op() else {
            return false;
        };
        matches!(
            inner
                .messages
                .count_documents(doc! { "_id": &message.id })
                .await,
            Ok(0)
        )
    }

    /// Hands a caught-up temporary stream over to the ring, if the ring covers what
    /// follows `last_cluster_time`.
    fn handover_from_stream(&mut self, last_cluster_time: Timestamp) -> Option<Mode> {
        let hub = self.hub.clone()?;
        if self.registration.is_some() {
            // Targeted selection: the ring before the stream's last reopening may lack
            // this follower's messages, and where that reopening falls among the
            // resumed stream's events is not known. A catch-up pass from the window
            // before the newest stamp hands over at a tip read after it (what the
            // stream delivered is skipped by id).
            return Some(self.scan_from_last());
        }
        let ring = hub.ring();
        if ring
            .dropped_cluster_time
            .is_some_and(|d| d >= last_cluster_time)
        {
            return None;
        }
        let first_after = ring
            .entries()
            .find(|(_, item)| {
                item.cluster_time()
                    .is_some_and(|ct| ct >= last_cluster_time)
            })
            .map(|(seq, _)| seq);
        let cursor = match first_after {
            Some(seq) => seq - 1,
            None => ring.tip(),
        };
        Some(Mode::Ring { cursor })
    }

    async fn step(&mut self) -> Result<()> {
        let mode = std::mem::replace(
            &mut self.mode,
            Mode::Ring { cursor: 0 }, // replaced below on every path
        );
        self.mode = match mode {
            Mode::Ring { cursor } => {
                if let Some(tip) = self.tip.as_mut() {
                    tip.borrow_and_update();
                }
                let next = self.fill_from_ring(cursor);
                if matches!(next, Mode::Ring { cursor: c } if c == cursor) && self.ready.is_empty()
                {
                    if let Some(tip) = self.tip.as_mut() {
                        tokio::select! {
                            _ = self.inner.closed.cancelled() => {}
                            _ = tip.changed() => {}
                        }
                    }
                }
                next
            }
            Mode::Stream {
                mut stream,
                last_cluster_time,
                generation,
                mut replay,
            } => {
                let next = tokio::select! {
                    _ = self.inner.closed.cancelled() => return Ok(()),
                    next = stream.next_if_any() => next,
                };
                if self.inner.stream_interruptions() != generation {
                    // The driver may have resumed this stream by itself after a lost
                    // connection; it is not trusted to be gapless (see
                    // `Inner::stream_interruptions`). The scan re-reads what it held.
                    // One still reading the window before its checkpoint reads it
                    // again first.
                    self.mode = match replay {
                        Some(replay) => Mode::Resume {
                            position: replay.position,
                        },
                        None => self.catch_up("connection lost under a resumed stream"),
                    };
                    return Ok(());
                }
                if let Some(r) = replay.take() {
                    let before_checkpoint =
                        |event: &mongodb::change_stream::event::ChangeStreamEvent<
                            RawDocumentBuf,
                        >| {
                            !hub::is_ending(&event.operation_type)
                                && match r.cluster_time {
                                    Some(checkpoint) => {
                                        event.cluster_time.is_some_and(|ct| ct <= checkpoint)
                                    }
                                    None => true,
                                }
                        };
                    match next {
                        Ok(Some(event)) if before_checkpoint(&event) => {
                            // At or before the checkpoint's event: delivered before the
                            // restart (see `Replay::delivered_before`). Remembered, not
                            // delivered.
                            let window = self.window_secs();
                            let mut at_checkpoint = false;
                            let mut known = true;
                            if let Some(raw) = &event.full_document {
                                if let (Ok(id), Ok(ts)) =
                                    (raw.get_str("_id"), raw.get_timestamp("ts"))
                                {
                                    at_checkpoint = id == r.id;
                                    known = at_checkpoint || r.delivered_before(ts, id);
                                    if known {
                                        self.recent.insert(ts, id, window);
                                        self.last_ts = self.last_ts.max(ts);
                                    }
                                }
                            }
                            let last_cluster_time = if at_checkpoint {
                                event
                                    .cluster_time
                                    .unwrap_or(last_cluster_time)
                                    .max(last_cluster_time)
                            } else {
                                last_cluster_time
                            };
                            if !known {
                                self.take_event(event, last_cluster_time).await;
                            }
                            self.mode = Mode::Stream {
                                stream,
                                last_cluster_time,
                                generation,
                                replay: (!at_checkpoint).then_some(r),
                            };
                            return Ok(());
                        }
                        Ok(None) if stream.is_alive() && r.cluster_time.is_some() => {
                            // Not caught up before it reached the checkpoint: no hand-over.
                            self.mode = Mode::Stream {
                                stream,
                                last_cluster_time,
                                generation,
                                replay: Some(r),
                            };
                            return Ok(());
                        }
                        other => {
                            // The stream did not come to the checkpoint's event: past its
                            // cluster time without it (a server that started later than
                            // asked, its history gone, instead of failing), caught up
                            // without it, an ending event (the collection dropped in the
                            // window before it), a closed cursor or an error. Resumed
                            // after the checkpoint's token instead, the server says
                            // whether it still has it (without one, the collection is
                            // read from the checkpoint's `ts`).
                            let what = match &other {
                                Ok(Some(event)) if hub::is_ending(&event.operation_type) => {
                                    format!("{:?}", event.operation_type)
                                }
                                Ok(Some(_)) => {
                                    "passed the saved position without its event".to_string()
                                }
                                Ok(None) if stream.is_alive() => {
                                    "caught up without the saved position's event".to_string()
                                }
                                Ok(None) => "cursor closed".to_string(),
                                Err(e) => e.to_string(),
                            };
                            tracing::warn!(%what, "the window before the saved position was not read to its end: resuming without it");
                            self.mode = match self.resume(r.position.clone(), false).await {
                                Ok(mode) => mode,
                                Err(_) => Mode::Resume {
                                    position: r.position,
                                },
                            };
                            return Ok(());
                        }
                    }
                }
                match next {
                    Ok(Some(event)) if hub::is_ending(&event.operation_type) => {
                        // Everything up to the drop came through this stream; what the
                        // re-created collection holds is read from it by `ts`.
                        tracing::debug!(operation = ?event.operation_type, "ending event");
                        self.catch_up("the messages collection was dropped or renamed after the saved position")
                    }
                    Ok(Some(event)) => {
                        let ct = self.take_event(event, last_cluster_time).await;
                        Mode::Stream {
                            stream,
                            last_cluster_time: ct,
                            generation,
                            replay: None,
                        }
                    }
                    Ok(None) if !stream.is_alive() => {
                        // The server closed the cursor: the end of this stream, not
                        // silence. Whatever follows is read from the collection.
                        self.catch_up("resumed stream closed by the server")
                    }
                    Ok(None) => match self.handover_from_stream(last_cluster_time) {
                        Some(ring) => {
                            tracing::debug!(
                                "resumed stream caught up: following the shared change stream"
                            );
                            ring
                        }
                        None => Mode::Stream {
                            stream,
                            last_cluster_time,
                            generation,
                            replay: None,
                        },
                    },
                    Err(e) if is_history_lost(&e) => {
                        tracing::warn!(error = %e, "resumed stream lost its history: catching up from the collection by ts");
                        self.inner.count_history_lost();
                        self.scan_from_last()
                    }
                    Err(e) => {
                        // The driver already tried to resume once; rebuild from our position.
                        tracing::warn!(error = %e, "resumed stream failed: catching up from the collection by ts");
                        self.scan_from_last()
                    }
                }
            }
            Mode::Resume { position } => match self.resume(position.clone(), true).await {
                Ok(next) => {
                    self.backoff.reset();
                    next
                }
                Err(error) => {
                    tracing::warn!(%error, backoff_ms = self.backoff.delay().as_millis() as u64, "resuming from the saved position failed: retrying");
                    self.backoff.sleep(&self.inner.closed).await;
                    Mode::Resume { position }
                }
            },
            Mode::Scan { lower, tip_before } => match self.scan(lower, tip_before).await {
                Ok(next) => {
                    self.backoff.reset();
                    next
                }
                Err(crate::Error::Shutdown) => {
                    // The medium closes (refusing operations, then cancelling `closed`
                    // right after): the follower ends at its next read.
                    self.inner.closed.cancelled().await;
                    self.mode = Mode::Scan { lower, tip_before };
                    return Ok(());
                }
                Err(error) => {
                    let retryable = error.is_retryable();
                    if retryable {
                        tracing::warn!(%error, backoff_ms = self.backoff.delay().as_millis() as u64, "scan failed: retrying");
                    } else {
                        tracing::error!(%error, backoff_ms = self.backoff.delay().as_millis() as u64, "scan refused: the subscriber is told, and it is tried again");
                    }
                    self.backoff.sleep(&self.inner.closed).await;
                    self.mode = Mode::Scan { lower, tip_before };
                    // Refused for good (not authorized, say): the consumer hears of it
                    // instead of a silence; a next read tries again.
                    if !retryable {
                        return Err(error);
                    }
                    return Ok(());
                }
            },
        };
        Ok(())
    }

    pub(crate) async fn next(mut self) -> Option<(Result<Event>, Self)> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Some((Ok(event), self));
            }
            if self.inner.closed.is_cancelled() {
                return None;
            }
            if let Err(error) = self.step().await {
                return Some((Err(error), self));
            }
        }
    }
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_query_mirrors_filter_matches() {
        let filter = Filter {
            service: Some("billing".into()),
            instance: Some("billing-1".into()),
            actions: Some(["reload".to_string()].into()),
            ..Filter::default()
        };
        let q = filter_query(&filter, "fullDocument.");
        assert_eq!(
            q.get_document("fullDocument.serviceNameDest").unwrap(),
            &doc! { "$in": [Bson::Null, "billing"] }
        );
        assert_eq!(
            q.get_document("fullDocument.delivery").unwrap(),
            &doc! { "$ne": "one" }
        );
        assert_eq!(
            q.get_document("fullDocument.action").unwrap(),
            &doc! { "$in": ["reload"] }
        );
        assert!(
            filter_query(&Filter::monitor(), "").is_empty(),
            "a monitor takes everything"
        );
    }

    #[test]
    fn recent_ids_keep_only_the_window() {
        let mut r = Recent::default();
        r.insert(
            Timestamp {
                time: 100,
                increment: 1,
            },
            "a",
            5,
        );
        r.insert(
            Timestamp {
                time: 103,
                increment: 1,
            },
            "b",
            5,
        );
        assert!(r.contains("a") && r.contains("b"));
        r.insert(
            Timestamp {
                time: 110,
                increment: 1,
            },
            "c",
            5,
        );
        assert!(!r.contains("a") && !r.contains("b") && r.contains("c"));
    }
}
