//! The gateway's connections: how many, how long idle, and which one gives way.
//!
//! Why it exists: an HTTP server that keeps every socket it accepted for as long as the
//! client likes is starved by idle or half-sent connections, with no token needed
//! (slowloris). Each accepted connection is registered here and its socket wrapped
//! ([`Tracked`]), so that the gateway can close it. A connection is *busy* while a
//! request on it is being served (an SSE stream included), *idle* otherwise (waiting for
//! its first request, between keep-alive requests, or in the middle of sending headers).
//!
//! The rules, as nginx applies them to its "reusable" connections:
//! - an idle connection is closed once idle for [`GatewayOptions::idle_timeout`]
//!   (a reaper looks every second);
//! - at most [`GatewayOptions::max_connections`] are open: a new connection over the cap
//!   closes the connection idle the longest, so idle sockets cannot keep a new client
//!   (a health probe, say) out; when every connection is busy, the new one is closed at
//!   once (and counted in `intracom_gateway_connections_refused_total`).
//!
//! Reading the request headers is bounded by hyper's header-read time-out and by
//! axum-server's first-request time-out (both [`GatewayOptions::header_read_timeout`]);
//! HTTP/2 streams per connection by [`GatewayOptions::max_h2_streams`].
//!
//! [`GatewayOptions::idle_timeout`]: super::GatewayOptions::idle_timeout
//! [`GatewayOptions::max_connections`]: super::GatewayOptions::max_connections
//! [`GatewayOptions::header_read_timeout`]: super::GatewayOptions::header_read_timeout
//! [`GatewayOptions::max_h2_streams`]: super::GatewayOptions::max_h2_streams

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// One open connection.
pub(crate) struct Conn {
    id: u64,
    /// Requests being served on it now (an SSE response counts until it ends).
    busy: AtomicUsize,
    /// When it last became idle (opened, or its last request ended), as ms since the
    /// tracker's start.
    idle_since_ms: AtomicU64,
    /// Cancelled to close it.
    close: CancellationToken,
    tracker: Weak<Tracker>,
}

/// Every open connection of one gateway.
pub(crate) struct Tracker {
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    max: usize,
    idle_timeout: Duration,
    start: Instant,
}

impl Tracker {
    pub(crate) fn new(max: usize, idle_timeout: Duration) -> Arc<Self> {
        // Served from the start, at 0 until a connection is closed or refused.
        for name in [
            crate::metrics::GATEWAY_CONNECTIONS_EVICTED,
            crate::metrics::GATEWAY_CONNECTIONS_REFUSED,
            crate::metrics::GATEWAY_CONNECTIONS_IDLE_CLOSED,
        ] {
            metrics::counter!(name).increment(0);
        }
        Arc::new(Tracker {
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            max: max.max(1),
            idle_timeout,
            start: Instant::now(),
        })
    }

    fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// How many connections are open.
    pub(crate) fn open(&self) -> usize {
        self.conns().len()
    }

    /// Registers a new connection; `None` when it must be closed at once (the cap is
    /// reached and no connection is idle).
    fn admit(self: &Arc<Self>) -> Option<Arc<Conn>> {
        let mut conns = self.conns();
        if conns.len() >= self.max {
            // The connection idle the longest gives way (one not yet closing).
            let victim = conns
                .values()
                .filter(|c| c.busy.load(Ordering::Acquire) == 0 && !c.close.is_cancelled())
                .min_by_key(|c| c.idle_since_ms.load(Ordering::Acquire))
                .cloned();
            match victim {
                Some(victim) => {
                    victim.close.cancel();
                    conns.remove(&victim.id);
                    metrics::counter!(crate::metrics::GATEWAY_CONNECTIONS_EVICTED).increment(1);
                    tracing::debug!(
                        connection = victim.id,
                        "gateway: connection cap reached: the connection idle the longest is closed"
                    );
                }
                None => {
                    metrics::counter!(crate::metrics::GATEWAY_CONNECTIONS_REFUSED).increment(1);
                    tracing::warn!(
                        max_connections = self.max,
                        "gateway: connection refused: every connection is busy (max_connections)"
                    );
                    return None;
                }
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            id,
            busy: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(self.now_ms()),
            close: CancellationToken::new(),
            tracker: Arc::downgrade(self),
        });
        conns.insert(id, Arc::clone(&conn));
        metrics::gauge!(crate::metrics::GATEWAY_CONNECTIONS).set(conns.len() as f64);
        Some(conn)
    }

    fn forget(&self, id: u64) {
        let mut conns = self.conns();
        conns.remove(&id);
        metrics::gauge!(crate::metrics::GATEWAY_CONNECTIONS).set(conns.len() as f64);
    }

    /// Closes the connections idle for longer than the idle time-out, every second,
    /// until `stop`.
    pub(crate) async fn reap(self: Arc<Self>, stop: CancellationToken) {
        let every = Duration::from_secs(1).min(self.idle_timeout.max(Duration::from_millis(50)));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let now = self.now_ms();
            let limit = self.idle_timeout.as_millis() as u64;
            let mut conns = self.conns();
            conns.retain(|_, c| {
                let idle = c.busy.load(Ordering::Acquire) == 0
                    && now.saturating_sub(c.idle_since_ms.load(Ordering::Acquire)) >= limit;
                if idle {
                    c.close.cancel();
                    metrics::counter!(crate::metrics::GATEWAY_CONNECTIONS_IDLE_CLOSED).increment(1);
                }
                !idle
            });
            metrics::gauge!(crate::metrics::GATEWAY_CONNECTIONS).set(conns.len() as f64);
        }
    }
}

/// The connection a request came on (a request extension set by [`TrackingAcceptor`]).
#[derive(Clone)]
pub(crate) struct ConnRef(pub(crate) Arc<Conn>);

/// A request being served: the connection is busy until it drops.
struct Busy(Arc<Conn>);

impl Busy {
    fn new(conn: Arc<Conn>) -> Self {
        conn.busy.fetch_add(1, Ordering::AcqRel);
        Busy(conn)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(tracker) = self.0.tracker.upgrade() {
                self.0
                    .idle_since_ms
                    .store(tracker.now_ms(), Ordering::Release);
            }
        }
    }
}

/// Marks the request's connection busy until its response body has been sent (or
/// dropped): the layer around every route.
pub(crate) async fn mark_busy(req: Request, next: Next) -> Response {
    let busy = req
        .extensions()
        .get::<ConnRef>()
        .map(|c| Busy::new(Arc::clone(&c.0)));
    let response = next.run(req).await;
    match busy {
        None => response,
        Some(busy) => {
            let (parts, body) = response.into_parts();
            Response::from_parts(parts, Body::new(HoldingBody { body, _busy: busy }))
        }
    }
}

/// A response body that holds its connection busy while it is being sent.
struct HoldingBody {
    body: Body,
    _busy: Busy,
}

impl http_body::Body for HoldingBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A socket the gateway can close: reads end (EOF) and writes fail once its connection
/// is closed; it leaves the tracker when dropped.
pub(crate) struct Tracked<S> {
    inner: S,
    conn: Arc<Conn>,
    closed: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl<S> Tracked<S> {
    fn is_closed(&mut self, cx: &mut Context<'_>) -> bool {
        self.closed.as_mut().poll(cx).is_ready()
    }
}

impl<S> Drop for Tracked<S> {
    fn drop(&mut self) {
        if let Some(tracker) = self.conn.tracker.upgrade() {
            tracker.forget(self.conn.id);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.is_closed(cx) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.is_closed(cx) {
            return Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.is_closed(cx) {
            return Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into()));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The acceptor under TLS (or alone): registers each connection, wraps its socket, and
/// gives its requests the [`ConnRef`].
#[derive(Clone)]
pub(crate) struct TrackingAcceptor {
    pub(crate) tracker: Arc<Tracker>,
}

impl<I, S> axum_server::accept::Accept<I, S> for TrackingAcceptor
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    type Stream = Tracked<I>;
    type Service = WithConn<S>;
    type Future = std::future::Ready<io::Result<(Self::Stream, Self::Service)>>;

    fn accept(&self, stream: I, service: S) -> Self::Future {
        let Some(conn) = self.tracker.admit() else {
            return std::future::ready(Err(io::Error::other(
                "connection cap reached and every connection busy",
            )));
        };
        let closed = Box::pin(conn.close.clone().cancelled_owned());
        let tracked = Tracked {
            inner: stream,
            conn: Arc::clone(&conn),
            closed,
        };
        std::future::ready(Ok((
            tracked,
            WithConn {
                inner: service,
                conn,
            },
        )))
    }
}

/// A connection's service: gives each request the [`ConnRef`].
#[derive(Clone)]
pub(crate) struct WithConn<S> {
    inner: S,
    conn: Arc<Conn>,
}

impl<S, B> tower_service::Service<axum::http::Request<B>> for WithConn<S>
where
    S: tower_service::Service<axum::http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: axum::http::Request<B>) -> Self::Future {
        req.extensions_mut().insert(ConnRef(Arc::clone(&self.conn)));
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_the_cap_the_longest_idle_gives_way_and_busy_ones_do_not() {
        let tracker = Tracker::new(2, Duration::from_secs(60));
        let a = tracker.admit().unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let b = tracker.admit().unwrap();
        // `a` idle the longest: it gives way.
        let c = tracker.admit().unwrap();
        assert!(a.close.is_cancelled());
        assert!(!b.close.is_cancelled());
        assert_eq!(tracker.open(), 2);
        // Both busy: a new connection is refused, nobody closed.
        let _busy_b = Busy::new(Arc::clone(&b));
        let _busy_c = Busy::new(Arc::clone(&c));
        assert!(tracker.admit().is_none());
        assert!(!b.close.is_cancelled() && !c.close.is_cancelled());
    }

    #[tokio::test]
    async fn idle_connections_are_reaped_busy_ones_kept() {
        let tracker = Tracker::new(10, Duration::from_millis(100));
        let idle = tracker.admit().unwrap();
        let busy = tracker.admit().unwrap();
        let _serving = Busy::new(Arc::clone(&busy));
        let stop = CancellationToken::new();
        let reaper = tokio::spawn(Arc::clone(&tracker).reap(stop.clone()));
        tokio::time::timeout(Duration::from_secs(10), idle.close.cancelled())
            .await
            .expect("the idle connection is closed");
        assert!(!busy.close.is_cancelled());
        stop.cancel();
        reaper.await.unwrap();
    }
}
