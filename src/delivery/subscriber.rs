//! The consumer side: a stream of deliveries, each acknowledged explicitly.

use std::fmt;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::{Future, Stream, StreamExt};
use serde::de::DeserializeOwned;
use tracing::Instrument;

use super::checkpoint::AckTracker;
use crate::catalog::Catalog;
use crate::error::{Error, Result};
use crate::filter::{Position, SharedPosition};
use crate::medium::{Event, EventStream, Medium};
use crate::message::Message;

/// Keeps messages the catalog does not declare away from consumers: each one is
/// logged and dead-lettered, and consumption goes on.
pub(crate) struct Screen {
    pub(crate) catalog: Catalog,
    pub(crate) medium: Arc<dyn Medium>,
}

/// A kind of message a [`Screen`] admitted, and the catalog's generation then: a
/// subscription keeps the last one (see [`Deliveries::admitted`]), and the same sender,
/// owner and action pass again without a catalog lookup while the catalog has not
/// changed (a subscription mostly sees a few kinds over and over).
pub(crate) struct Admitted {
    generation: u64,
    sender: String,
    owner: String,
    action: String,
}

impl Admitted {
    fn of(generation: u64, message: &Message) -> Self {
        Admitted {
            generation,
            sender: message.source_service.clone(),
            owner: owner(message).to_string(),
            action: message.action.clone(),
        }
    }

    fn covers(&self, generation: u64, message: &Message) -> bool {
        self.generation == generation
            && self.action == message.action
            && self.sender == message.source_service
            && self.owner == owner(message)
    }
}

/// The service whose catalog entry declares a message's action.
fn owner(message: &Message) -> &str {
    message
        .dest_service
        .as_deref()
        .unwrap_or(&message.source_service)
}

/// What the catalog said of a message.
enum Verdict {
    /// Declared: deliver it; the kind passes at once from now on, while the catalog's
    /// generation is the one recorded.
    Declared(Admitted),
    /// The catalog could not be read: deliver it unchecked (the next one is looked up).
    Unchecked,
    /// Not declared: dead-lettered, not delivered.
    Refused,
}

impl Screen {
    /// Whether the message is of the kind `admitted`, the catalog unchanged since: it
    /// passes without a lookup.
    fn admits_at_once(&self, admitted: Option<&Admitted>, message: &Message) -> bool {
        admitted.is_some_and(|a| a.covers(self.catalog.generation(), message))
    }

    async fn admit(&self, subscription: &str, message: &Message) -> Verdict {
        let generation = self.catalog.generation();
        match self.catalog.screen(message).await {
            Ok(()) => Verdict::Declared(Admitted::of(generation, message)),
            Err(error @ (Error::UnknownAction { .. } | Error::UnknownSender { .. })) => {
                tracing::warn!(subscription, message_id = %message.id, %error, "undeclared message dead-lettered");
                metrics::counter!(crate::metrics::DEAD_LETTERED, "reason" => "undeclared")
                    .increment(1);
                match bson::to_document(message) {
                    Ok(document) => {
                        let written = match self.medium.dead_letter_store_or_unsupported() {
                            Ok(dead) => dead.dead_letter(document, error.to_string()).await,
                            Err(unsupported) => Err(unsupported),
                        };
                        if let Err(error) = written {
                            tracing::warn!(message_id = %message.id, %error, "dead letter not written");
                        }
                    }
                    Err(error) => {
                        tracing::warn!(message_id = %message.id, %error, "dead letter not encodable")
                    }
                }
                Verdict::Refused
            }
            Err(error) => {
                // The catalog cannot be read now: deliver rather than hold the stream.
                tracing::warn!(subscription, message_id = %message.id, %error, "catalog unavailable: delivered unchecked");
                Verdict::Unchecked
            }
        }
    }
}

/// One message handed to a subscriber, to be acknowledged with [`Delivery::ack`].
///
/// Dereferences to the [`Message`]. For a named subscription, a delivery that is
/// dropped without an ack holds the checkpoint back: the message (and the ones after
/// it) come again when the subscription is next created: delivery is at least once.
pub struct Delivery {
    message: Arc<Message>,
    position: SharedPosition,
    ack: Option<(Arc<AckTracker>, u64)>,
}

impl Delivery {
    /// The message.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// The message's position in the medium's order.
    pub fn position(&self) -> &Position {
        self.position.get()
    }

    /// The position, less what a medium adds only for a restart from a checkpoint (see
    /// `SharedPosition::compact`): what an SSE event id carries.
    #[cfg(feature = "gateway")]
    pub(crate) fn compact_position(&self) -> &Position {
        self.position.compact()
    }

    /// Decodes the payload into a typed value.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T> {
        self.message.decode()
    }

    /// Acknowledges the message. For a named subscription this moves the checkpoint
    /// once every earlier delivery is acknowledged too; the call returns after the
    /// checkpoint is saved. For an unnamed subscription it does nothing.
    ///
    /// An error (the medium is unreachable) is retryable: acking a later message saves
    /// a checkpoint that covers this one.
    pub async fn ack(self) -> Result<()> {
        self.ack_kept().await
    }

    /// Acks without giving the delivery up: when the checkpoint's save fails, the
    /// delivery stays recorded as acked, and acking it again tries the save again.
    /// (The gateway keeps it for a client's retry.)
    pub(crate) async fn ack_kept(&self) -> Result<()> {
        match &self.ack {
            Some((tracker, number)) => tracker.ack(*number).await,
            None => Ok(()),
        }
    }

    /// Lets the checkpoint pass a delivery that its consumer filters out unseen,
    /// without saving it now (the next ack's save covers it): an unacked delivery
    /// would hold the checkpoint back for good. (The gateway's monitor filter.)
    #[cfg(feature = "gateway")]
    pub(crate) fn pass(self) {
        if let Some((tracker, number)) = &self.ack {
            tracker.pass(*number);
        }
    }
}

impl Deref for Delivery {
    type Target = Message;
    fn deref(&self) -> &Message {
        &self.message
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("position", &self.position)
            .finish()
    }
}

/// A subscription's stream of deliveries: a [`futures::Stream`] of
/// `Result<Delivery, Error>`.
///
/// Items come in the medium's order. An `Err` item that [`Error::is_report`] (e.g.
/// [`Error::Lost`]: messages expired before this subscriber read them) does not end the
/// stream; the stream ends (`None`) when the bus shuts down.
///
/// A slow subscriber does not slow anyone else down and does not make memory grow: it
/// reads the medium at its own pace. If it falls so far behind that the medium has
/// dropped messages it had not read yet (retention), it receives [`Error::Lost`] with
/// the count, then continues with the oldest message still retained.
pub struct Subscriber {
    name: Option<String>,
    inner: UntilStopped,
    tracker: Option<Arc<AckTracker>>,
}

/// What a subscription needs to turn the medium's events into deliveries.
struct Deliverer {
    label: Arc<str>,
    lost: metrics::Counter,
    delivered: metrics::Counter,
    latency: metrics::Histogram,
    acks: Option<Arc<AckTracker>>,
    screen: Option<Screen>,
}

/// What became of an event handed to [`Deliverer::deliver_now`].
enum Outcome {
    /// The item to hand out.
    Ready(Result<Delivery>),
    /// The catalog must be read before the message can be admitted (with how its
    /// latency is to be recorded once delivered).
    Screen(Arc<Message>, SharedPosition, Sample),
}

/// How a delivery's stamp-to-delivery latency is recorded ([`Deliveries::sample`]).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Sample {
    /// Not by this delivery: a later measure counts it (or the message has no stamp).
    Later,
    /// Measured at the delivery, and counted for this many deliveries.
    Measure(usize),
    /// The subscription's last measure, in seconds: the message was stamped in the
    /// same millisecond as the one measured last (stamps have that resolution).
    Last(f64),
}

impl Deliverer {
    /// Turns an event into an item without waiting, unless the message's kind must be
    /// looked up in the catalog first (see [`Deliverer::screen_then_deliver`]):
    /// `admitted` is the kind the subscription's screen admitted last.
    /// The latency of an item handed out at once is recorded by the caller; `sample`
    /// goes with a message that waits for the catalog.
    fn deliver_now(
        &self,
        event: Result<Event>,
        admitted: Option<&Admitted>,
        sample: Sample,
    ) -> Outcome {
        match event {
            Err(error) => Outcome::Ready(Err(error)),
            Ok(Event::Lost { count }) => {
                tracing::warn!(subscription = %self.label, count, "messages expired before delivery");
                self.lost.increment(count.max(1));
                Outcome::Ready(Err(Error::Lost {
                    subscription: self.label.to_string(),
                    count,
                }))
            }
            Ok(Event::Message(message, position)) => match &self.screen {
                Some(screen) if !screen.admits_at_once(admitted, &message) => {
                    Outcome::Screen(message, position, sample)
                }
                _ => Outcome::Ready(Ok(self.delivery(message, position))),
            },
        }
    }

    /// The slow path: screens the message against the catalog (which may read it), then
    /// delivers it, or dead-letters it (`None`); and the kind admitted, if the catalog
    /// declared it.
    async fn screen_then_deliver(
        self: Arc<Self>,
        message: Arc<Message>,
        position: SharedPosition,
        sample: Sample,
    ) -> Screened {
        let admitted = match &self.screen {
            Some(screen) => match screen.admit(&self.label, &message).await {
                Verdict::Declared(admitted) => Some(admitted),
                Verdict::Unchecked => None,
                Verdict::Refused => return (None, None),
            },
            None => None,
        };
        if let Some(at) = message.at {
            self.record_latency(at, sample);
        }
        (Some(Ok(self.delivery(message, position))), admitted)
    }

    /// Records the latency of a delivery of a message stamped `at`, as `sample` says;
    /// returns the age measured, if it measured one.
    fn record_latency(&self, at: bson::DateTime, sample: Sample) -> Option<f64> {
        match sample {
            Sample::Later => None,
            Sample::Last(age) => {
                self.latency.record(age);
                None
            }
            Sample::Measure(weight) => {
                let age_ms = bson::DateTime::now().timestamp_millis() - at.timestamp_millis();
                let age = age_ms.max(0) as f64 / 1000.0;
                self.latency.record_many(age, weight);
                Some(age)
            }
        }
    }

    fn delivery(&self, message: Arc<Message>, position: SharedPosition) -> Delivery {
        let ack = self
            .acks
            .as_ref()
            .map(|t| (Arc::clone(t), t.delivered(position.clone())));
        self.delivered.increment(1);
        Delivery {
            message,
            position,
            ack,
        }
    }
}

/// The medium's events made deliveries: on the spot, except a message whose kind the
/// catalog must confirm, which waits in `screening` (later events wait behind it, so
/// the order holds).
struct Deliveries {
    events: EventStream,
    context: Arc<Deliverer>,
    screening: Option<futures::future::BoxFuture<'static, Screened>>,
    /// The kind of message the screen admitted last: kept here, where only this stream
    /// reads and writes it (no lock per delivery).
    admitted: Option<Admitted>,
    /// Whether the stream waited for its last event (the medium had nothing ready).
    awaited: bool,
    /// Stamped deliveries since the last latency sample, and the newest one's stamp.
    unsampled: usize,
    unsampled_at: Option<bson::DateTime>,
    /// The last latency measured: the stamp (in milliseconds) and the age, in seconds.
    last: Option<(i64, f64)>,
}

/// The item of a screened message (`None`: dead-lettered), and the kind admitted.
type Screened = (Option<Result<Delivery>>, Option<Admitted>);

/// In a run of deliveries that are ready one after the other, the latency is measured
/// on every this many (a clock read per delivery was a sixth of a fan-out's cost).
const LATENCY_SAMPLE_EVERY: usize = 16;

impl Deliveries {
    /// How the latency of the delivery of `message` is recorded.
    ///
    /// A delivery that the stream waited for is measured, unless its message was
    /// stamped in the same millisecond as the one measured last: it takes that measure
    /// (a subscription that keeps up with a fast publisher reads the clock about once
    /// a millisecond, a quiet one at every delivery). In a run of messages ready back
    /// to back every [`LATENCY_SAMPLE_EVERY`]th is measured, and counted for itself
    /// and the ones since the previous measure; the rest of a run is measured when the
    /// stream next waits ([`Deliveries::flush_latency`]). The histogram's count is the
    /// number of stamped deliveries.
    fn sample(&mut self, message: &Message) -> Sample {
        let Some(at) = message.at else {
            return Sample::Later;
        };
        if std::mem::take(&mut self.awaited) {
            return match self.last {
                Some((ms, age)) if ms == at.timestamp_millis() => Sample::Last(age),
                _ => Sample::Measure(1),
            };
        }
        self.unsampled += 1;
        if self.unsampled >= LATENCY_SAMPLE_EVERY {
            self.unsampled_at = None;
            Sample::Measure(std::mem::take(&mut self.unsampled))
        } else {
            self.unsampled_at = Some(at);
            Sample::Later
        }
    }

    /// At the end of a run: the deliveries not measured yet take the latency of the
    /// newest of them, measured now (an over-estimate by at most the time the consumer
    /// took to come back for more).
    fn flush_latency(&mut self) {
        if let (Some(at), weight @ 1..) = (self.unsampled_at.take(), self.unsampled) {
            self.unsampled = 0;
            if let Some(age) = self.context.record_latency(at, Sample::Measure(weight)) {
                self.last = Some((at.timestamp_millis(), age));
            }
        }
    }
}

impl Stream for Deliveries {
    type Item = Result<Delivery>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(screening) = this.screening.as_mut() {
                let Poll::Ready((outcome, admitted)) = screening.as_mut().poll(cx) else {
                    return Poll::Pending;
                };
                this.screening = None;
                if admitted.is_some() {
                    this.admitted = admitted;
                }
                match outcome {
                    Some(item) => return Poll::Ready(Some(item)),
                    None => continue,
                }
            }
            let event = match this.events.poll_next_unpin(cx) {
                Poll::Ready(Some(event)) => event,
                Poll::Ready(None) => {
                    this.flush_latency();
                    return Poll::Ready(None);
                }
                Poll::Pending => {
                    this.awaited = true;
                    this.flush_latency();
                    return Poll::Pending;
                }
            };
            let (sample, at) = match &event {
                Ok(Event::Message(message, _)) => (this.sample(message), message.at),
                _ => (Sample::Later, None),
            };
            match this
                .context
                .deliver_now(event, this.admitted.as_ref(), sample)
            {
                Outcome::Ready(item) => {
                    if let (Ok(_), Some(at)) = (&item, at) {
                        if let Some(age) = this.context.record_latency(at, sample) {
                            this.last = Some((at.timestamp_millis(), age));
                        }
                    }
                    return Poll::Ready(Some(item));
                }
                Outcome::Screen(message, position, sample) => {
                    let context = Arc::clone(&this.context);
                    this.screening = Some(Box::pin(
                        context.screen_then_deliver(message, position, sample),
                    ));
                }
            }
        }
    }
}

impl Subscriber {
    /// `metric` is the `subscription` label of the counters (see
    /// `Subscription::metrics_label`); logs name the subscription.
    pub(crate) fn new(
        name: Option<String>,
        metric: Arc<str>,
        events: EventStream,
        tracker: Option<Arc<AckTracker>>,
        screen: Option<Screen>,
        shutdown: crate::stop::Stop,
    ) -> Self {
        // One context per subscription, shared by every event: the metric handles are
        // taken once here (a counter looked up per delivery costs its key's allocation
        // and hashing), so a recorder must be installed before subscribing.
        let context = Arc::new(Deliverer {
            label: name.as_deref().unwrap_or("(anonymous)").into(),
            lost: metrics::counter!(crate::metrics::LOST, "subscription" => metric.to_string()),
            delivered: metrics::counter!(crate::metrics::DELIVERED, "subscription" => metric.to_string()),
            latency: metrics::histogram!(crate::metrics::DELIVERY_LATENCY),
            acks: tracker.clone(),
            screen,
        });
        let inner = UntilStopped {
            wait: Box::pin(shutdown.token().clone().cancelled_owned()),
            stop: shutdown,
            inner: Deliveries {
                events,
                context,
                screening: None,
                admitted: None,
                awaited: true,
                unsampled: 0,
                unsampled_at: None,
                last: None,
            },
            done: false,
        };
        Subscriber {
            name,
            inner,
            tracker,
        }
    }

    /// For a named subscription: how many deliveries wait for an ack (theirs or an
    /// earlier one's) before the checkpoint can pass them. Always 0 when unnamed.
    pub fn in_flight(&self) -> usize {
        self.tracker.as_ref().map_or(0, |t| t.in_flight())
    }

    /// Returns once at most `limit` deliveries are [in flight](Subscriber::in_flight)
    /// (at once when unnamed). (The gateway's pause of a named stream.)
    #[cfg(feature = "gateway")]
    pub(crate) fn in_flight_at_most(&self, limit: usize) -> impl Future<Output = ()> + Send {
        let tracker = self.tracker.clone();
        async move {
            if let Some(tracker) = tracker {
                tracker.in_flight_at_most(limit).await;
            }
        }
    }

    /// The durable name, if the subscription has one.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Runs `handler` on each message until the bus shuts down, acknowledging each
    /// message whose handler returns `Ok`.
    ///
    /// A handler error is logged and the message is not acknowledged: for a named
    /// subscription it comes again when the subscription is next created. Reports
    /// ([`Error::Lost`]) and failed checkpoint saves are logged and consumption goes on;
    /// any other stream error ends the loop and is returned.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use intracom::{Config, Intracom, Message, Subscription};
    /// let bus = Intracom::connect(Config::builder().service("cache").sender("cache", ["reload"]).build()?).await?;
    /// let sub = bus.subscribe(Subscription::named("cache-reloader")).await?;
    /// let worker = tokio::spawn(sub.handle(|m: Message| async move {
    ///     println!("reloading after {}", m.action);
    ///     Ok::<(), std::io::Error>(())
    /// }));
    /// bus.publish(Message::broadcast("reload")).await?;
    /// bus.shutdown().await;
    /// worker.await.expect("handler task")?;
    /// # Ok::<(), intracom::Error>(()) }).unwrap();
    /// ```
    pub async fn handle<F, Fut, E>(mut self, mut handler: F) -> Result<()>
    where
        F: FnMut(Message) -> Fut,
        Fut: Future<Output = std::result::Result<(), E>>,
        E: fmt::Display,
    {
        while let Some(item) = self.next().await {
            match item {
                Ok(delivery) => {
                    let id = delivery.id.clone();
                    // In a span whose parent is the publisher's trace context.
                    let span = crate::trace::process_span(delivery.message());
                    let handled = span.in_scope(|| handler(delivery.message().clone()));
                    match handled.instrument(span).await {
                        Ok(()) => {
                            if let Err(error) = delivery.ack().await {
                                tracing::warn!(subscription = ?self.name, message_id = %id, %error, "checkpoint not saved");
                            }
                        }
                        Err(error) => {
                            tracing::warn!(subscription = ?self.name, message_id = %id, %error, "handler failed; message not acknowledged");
                        }
                    }
                }
                Err(error) if error.is_report() => {}
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }
}

impl Stream for Subscriber {
    type Item = Result<Delivery>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.poll_next_unpin(cx)
    }
}

/// A stream that ends when the bus stops. The stop flag is checked on every item (an
/// atomic load); the token is polled only when the stream has nothing ready, which
/// registers the wake-up that ends an idle stream.
struct UntilStopped {
    inner: Deliveries,
    stop: crate::stop::Stop,
    wait: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    done: bool,
}

impl Stream for UntilStopped {
    type Item = Result<Delivery>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done || self.stop.is_stopped() {
            self.done = true;
            return Poll::Ready(None);
        }
        match self.inner.poll_next_unpin(cx) {
            Poll::Ready(item) => {
                self.done = item.is_none();
                Poll::Ready(item)
            }
            Poll::Pending => match self.wait.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    self.done = true;
                    Poll::Ready(None)
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscriber")
            .field("name", &self.name)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A recorder that keeps each call recording the latency: (value, count).
    #[derive(Default)]
    struct Samples(Arc<Mutex<Vec<(f64, usize)>>>);

    impl metrics::HistogramFn for Samples {
        fn record(&self, value: f64) {
            self.record_many(value, 1);
        }
        fn record_many(&self, value: f64, count: usize) {
            self.0.lock().unwrap().push((value, count));
        }
    }

    struct Recorder(Arc<Mutex<Vec<(f64, usize)>>>);

    impl metrics::Recorder for Recorder {
        fn describe_counter(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn describe_gauge(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn describe_histogram(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn register_counter(
            &self,
            _: &metrics::Key,
            _: &metrics::Metadata<'_>,
        ) -> metrics::Counter {
            metrics::Counter::noop()
        }
        fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
            metrics::Gauge::noop()
        }
        fn register_histogram(
            &self,
            key: &metrics::Key,
            _: &metrics::Metadata<'_>,
        ) -> metrics::Histogram {
            assert_eq!(key.name(), crate::metrics::DELIVERY_LATENCY);
            metrics::Histogram::from_arc(Arc::new(Samples(Arc::clone(&self.0))))
        }
    }

    fn stamped(n: i64) -> Result<Event> {
        stamped_at(bson::DateTime::now().timestamp_millis() - n)
    }

    fn stamped_at(ms: i64) -> Result<Event> {
        let mut message = Message::broadcast("reload");
        message.at = Some(bson::DateTime::from_millis(ms));
        let ts = bson::Timestamp {
            time: 1,
            increment: 1,
        };
        let position = SharedPosition::new(crate::filter::Position::new(ts, None));
        Ok(Event::Message(Arc::new(message), position))
    }

    #[test]
    fn a_run_of_ready_deliveries_is_sampled_and_every_delivery_counted_once() {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let mut sub = metrics::with_local_recorder(&Recorder(Arc::clone(&samples)), || {
            Subscriber::new(
                None,
                "test".into(),
                Box::pin(rx),
                None,
                None,
                crate::stop::Stop::new(),
            )
        });
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut poll = |sub: &mut Subscriber| match Pin::new(sub).poll_next(&mut cx) {
            Poll::Ready(Some(Ok(_))) => true,
            Poll::Pending => false,
            other => panic!(
                "unexpected {:?}",
                other.map(|o| o.map(|r| r.map(|d| d.message.id.clone())))
            ),
        };
        // Forty messages ready back to back, the first one awaited.
        assert!(!poll(&mut sub));
        for n in 0..40 {
            tx.unbounded_send(stamped(n)).unwrap();
        }
        for _ in 0..40 {
            assert!(poll(&mut sub));
        }
        let counts = |s: &Mutex<Vec<(f64, usize)>>| {
            s.lock()
                .unwrap()
                .iter()
                .map(|(_, c)| *c)
                .collect::<Vec<_>>()
        };
        // The awaited one, then one in sixteen; the rest of the run waits for its end.
        assert_eq!(counts(&samples), [1, 16, 16]);
        assert!(!poll(&mut sub), "the run ends: the stream waits");
        assert_eq!(
            counts(&samples),
            [1, 16, 16, 7],
            "every delivery counted once"
        );
        // A delivery the stream waited for is measured on its own.
        let ms = bson::DateTime::now().timestamp_millis() - 3_000;
        tx.unbounded_send(stamped_at(ms)).unwrap();
        assert!(poll(&mut sub));
        assert_eq!(counts(&samples), [1, 16, 16, 7, 1]);
        // The next, stamped in the same millisecond, takes that measure: no clock read
        // (read, the clock would have moved on by the pause).
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!poll(&mut sub));
        tx.unbounded_send(stamped_at(ms)).unwrap();
        assert!(poll(&mut sub));
        let all = samples.lock().unwrap().clone();
        assert_eq!(all.len(), 6);
        assert_eq!(all[5], all[4], "the last measure, counted once more");
        assert!(all[4].0 >= 3.0, "{all:?}");
        // Stamped in another millisecond: measured.
        assert!(!poll(&mut sub));
        tx.unbounded_send(stamped_at(ms + 1)).unwrap();
        assert!(poll(&mut sub));
        let all = samples.lock().unwrap().clone();
        assert_eq!(all.len(), 7);
        assert!(
            all[6].0 >= all[5].0 + 0.019 - 0.001,
            "measured after the pause: {all:?}"
        );
        let ages: Vec<f64> = all.iter().map(|(v, _)| *v).collect();
        assert!(ages.iter().all(|a| (0.0..10.0).contains(a)), "{ages:?}");
    }

    #[test]
    fn an_admitted_kind_covers_only_the_same_kind_at_the_same_generation() {
        let mut message = Message::broadcast("reload");
        message.source_service = "billing".into();
        let admitted = Admitted::of(7, &message);
        assert!(admitted.covers(7, &message));
        // The catalog changed (a reload may have dropped the action): look it up again.
        assert!(!admitted.covers(8, &message));
        let mut other = message.clone();
        other.action = "invoice.created".into();
        assert!(!admitted.covers(7, &other));
        let mut other = message.clone();
        other.source_service = "users".into();
        assert!(!admitted.covers(7, &other));
        // The same action sent to another service is declared by that service.
        let mut other = message.clone();
        other.dest_service = Some("users".into());
        assert!(!admitted.covers(7, &other));
    }
}
