//! A TCP fault proxy on loopback, one per client process, between it and the server.
//!
//! Faults it makes: reset every open connection (closed by the proxy), black-hole (nothing is
//! forwarded either way; the bytes wait in the proxy, as a partition whose packets TCP
//! retransmits after it heals), added latency on each request, and cutting the reply of
//! the next write command (the server applied it; the client sees the connection
//! close: an unknown outcome).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Default)]
struct Faults {
    /// Nothing moves until then.
    blackhole_until: Mutex<Option<Instant>>,
    /// Added before each chunk towards the server.
    latency_ms: AtomicU64,
    /// Cut the reply to the next write command.
    cut_armed: AtomicBool,
    /// Replies cut so far.
    cuts: AtomicU64,
}

/// A running proxy; dropping it stops it.
pub struct Proxy {
    port: u16,
    faults: Arc<Faults>,
    reset: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.reset.send_modify(|g| *g += 1);
    }
}

impl Proxy {
    /// Listens on an ephemeral loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let faults = Arc::new(Faults::default());
        let (reset, _) = watch::channel(0u64);
        let accept_faults = Arc::clone(&faults);
        let accept_reset = reset.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                let faults = Arc::clone(&accept_faults);
                let reset = accept_reset.subscribe();
                tokio::spawn(async move {
                    connection(inbound, upstream, faults, reset).await;
                });
            }
        });
        Ok(Proxy {
            port,
            faults,
            reset,
            task,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Resets every open connection now.
    pub fn reset(&self) {
        self.reset.send_modify(|g| *g += 1);
    }

    /// Forwards nothing for `d`.
    pub fn blackhole(&self, d: Duration) {
        *self
            .faults
            .blackhole_until
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + d);
    }

    /// Adds `ms` before each chunk towards the server (0: none).
    pub fn latency(&self, ms: u64) {
        self.faults.latency_ms.store(ms, Ordering::SeqCst);
    }

    /// Cuts the reply to the next write command that passes (until disarmed).
    pub fn arm_cut(&self, armed: bool) {
        self.faults.cut_armed.store(armed, Ordering::SeqCst);
    }

    /// Replies cut so far.
    pub fn cuts(&self) -> u64 {
        self.faults.cuts.load(Ordering::SeqCst)
    }

    /// Ends every fault (the black-hole, the latency, an armed cut).
    pub fn heal(&self) {
        *self
            .faults
            .blackhole_until
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
        self.latency(0);
        self.arm_cut(false);
    }
}

impl Faults {
    async fn wait_blackhole(&self) {
        loop {
            let until = *self
                .blackhole_until
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match until {
                Some(t) if Instant::now() < t => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                _ => return,
            }
        }
    }
}

/// The command name of an OP_MSG whose first section is its body, if it is one.
fn command_name(chunk: &[u8]) -> Option<&str> {
    if chunk.len() < 30 || i32::from_le_bytes(chunk[12..16].try_into().ok()?) != 2013 {
        return None;
    }
    if chunk[20] != 0 {
        return None;
    }
    // Body document at 21: length (4), then the first element: type byte, name.
    let name_start = 21 + 4 + 1;
    let end = chunk[name_start..].iter().position(|b| *b == 0)? + name_start;
    std::str::from_utf8(&chunk[name_start..end]).ok()
}

fn is_write(name: &str) -> bool {
    matches!(name, "insert" | "update" | "findAndModify" | "delete")
}

async fn connection(
    inbound: TcpStream,
    upstream: SocketAddr,
    faults: Arc<Faults>,
    mut reset: watch::Receiver<u64>,
) {
    reset.borrow_and_update();
    faults.wait_blackhole().await;
    let outbound = match TcpStream::connect(upstream).await {
        Ok(s) => s,
        Err(_) => return,
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (mut cr, mut cw) = inbound.into_split();
    let (mut sr, mut sw) = outbound.into_split();
    // Set when a write command went up with the cut armed: its reply is dropped.
    let cut = Arc::new(AtomicBool::new(false));
    let up_faults = Arc::clone(&faults);
    let up_cut = Arc::clone(&cut);
    let up = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            up_faults.wait_blackhole().await;
            let latency = up_faults.latency_ms.load(Ordering::SeqCst);
            if latency > 0 {
                tokio::time::sleep(Duration::from_millis(latency)).await;
            }
            if command_name(&buf[..n]).is_some_and(is_write)
                && up_faults.cut_armed.swap(false, Ordering::SeqCst)
            {
                up_cut.store(true, Ordering::SeqCst);
                up_faults.cuts.fetch_add(1, Ordering::SeqCst);
            }
            if sw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let down_faults = Arc::clone(&faults);
    let down = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if cut.load(Ordering::SeqCst) {
                // The server answered the write: the client never hears of it.
                return;
            }
            down_faults.wait_blackhole().await;
            if cw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = reset.changed() => {}
    }
    // Dropping the halves closes both sockets.
}

/// The proxy forwards, and a cut reply closes the connection after the server got the
/// write (a trial, against an echo server).
pub async fn forwards_and_cuts_a_reply() {
    let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = echo.local_addr().expect("addr");
    let received = Arc::new(AtomicU64::new(0));
    let seen = Arc::clone(&received);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    seen.fetch_add(1, Ordering::SeqCst);
                    if s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let proxy = Proxy::start(addr).await.expect("proxy");
    let mut client = TcpStream::connect(("127.0.0.1", proxy.port()))
        .await
        .expect("connect");
    client.write_all(b"hello").await.expect("write");
    let mut buf = [0u8; 5];
    client.read_exact(&mut buf).await.expect("echo");
    assert_eq!(&buf, b"hello");
    // An OP_MSG `insert` with the cut armed: the server gets it, the reply is cut.
    let mut msg = vec![0u8; 16];
    msg[12..16].copy_from_slice(&2013i32.to_le_bytes());
    msg.extend_from_slice(&0u32.to_le_bytes());
    msg.push(0);
    let body = intracom::bson::doc! { "insert": "c", "$db": "d" };
    let mut raw = Vec::new();
    body.to_writer(&mut raw).expect("bson");
    msg.extend_from_slice(&raw);
    let len = msg.len() as i32;
    msg[0..4].copy_from_slice(&len.to_le_bytes());
    assert_eq!(command_name(&msg), Some("insert"));
    proxy.arm_cut(true);
    client.write_all(&msg).await.expect("write");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the reply was not cut: {read:?}"
    );
    assert_eq!(
        received.load(Ordering::SeqCst),
        2,
        "the server got the write"
    );
    assert_eq!(proxy.cuts(), 1);
}
