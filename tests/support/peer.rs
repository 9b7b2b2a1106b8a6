//! A scripted MongoDB wire-protocol peer for tests.
//!
//! It speaks OP_MSG on a loopback port, answers `hello` as a replica-set primary (or,
//! if asked, as a standalone server), records every other command it receives, and
//! replies to each one as the test scripts it. It is a test fixture, not a database:
//! it never evaluates a query, a filter or an update. A command that no script rule
//! answers gets `CommandNotFound` (59), so an unexpected command fails loudly.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use intracom::bson::{doc, Bson, Document, Timestamp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const OP_MSG: i32 = 2013;

/// What the peer does with one command.
pub enum Reply {
    /// Answer with this document.
    Doc(Document),
    /// Answer with this document after a pause (an awaiting `getMore`).
    After(Duration, Document),
    /// Close the connection without answering (a dropped connection).
    Drop,
}

type Rule = Box<dyn FnMut(&Document) -> Option<Reply> + Send>;

struct Shared {
    standalone: bool,
    /// Answer an application's `hello` with CommandNotFound, as servers before 4.4.2 do.
    no_hello: std::sync::atomic::AtomicBool,
    /// `lastWrite.opTime.ts` in `hello`, as a replica-set member reports its newest write.
    last_write: Mutex<Option<Timestamp>>,
    log: Mutex<Vec<Document>>,
    /// Rules by command name, consulted in order; a rule answering `None` passes.
    rules: Mutex<Vec<(String, Rule)>>,
    /// Incremented to drop every open connection.
    generation: watch::Sender<u64>,
    refusing: std::sync::atomic::AtomicBool,
    request_ids: AtomicI32,
    cursor_ids: AtomicU64,
    /// The server's clock (`hello.localTime`): these seconds at this instant, moving on
    /// in real time.
    /// (`None`: the real clock.)
    clock: Mutex<Option<(u32, std::time::Instant)>>,
}

/// A running peer. Dropping it stops accepting connections.
pub struct Peer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.task.abort();
        self.shared.generation.send_modify(|g| *g += 1);
    }
}

impl Peer {
    /// A peer that presents itself as the primary of replica set `rs0`.
    pub async fn replica_set() -> Peer {
        Self::start(false).await
    }

    /// A peer that presents itself as a standalone server (no `setName`).
    pub async fn standalone() -> Peer {
        Self::start(true).await
    }

    async fn start(standalone: bool) -> Peer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let (generation, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            standalone,
            no_hello: std::sync::atomic::AtomicBool::new(false),
            last_write: Mutex::new(None),
            log: Mutex::new(Vec::new()),
            rules: Mutex::new(Vec::new()),
            generation,
            refusing: std::sync::atomic::AtomicBool::new(false),
            request_ids: AtomicI32::new(1),
            cursor_ids: AtomicU64::new(100),
            clock: Mutex::new(None),
        });
        let accept_shared = Arc::clone(&shared);
        let task = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                if accept_shared.refusing.load(Ordering::SeqCst) {
                    drop(socket);
                    continue;
                }
                let shared = Arc::clone(&accept_shared);
                tokio::spawn(async move { serve(shared, socket).await });
            }
        });
        Peer { addr, shared, task }
    }

    /// A URI for the driver: direct connection, short timeouts so failure tests are quick.
    pub fn uri(&self) -> String {
        format!(
            "mongodb://{}/?directConnection=true&serverSelectionTimeoutMS=3000&connectTimeoutMS=2000&heartbeatFrequencyMS=500",
            self.addr
        )
    }

    /// Adds a rule for a command name. Rules are consulted in the order added; the first
    /// one that returns `Some` answers.
    pub fn on<F>(&self, command: &str, rule: F)
    where
        F: FnMut(&Document) -> Option<Reply> + Send + 'static,
    {
        self.shared
            .rules
            .lock()
            .unwrap()
            .push((command.to_string(), Box::new(rule)));
    }

    /// Answers the next commands of this name with these replies, one each, in order.
    pub fn queue(&self, command: &str, replies: Vec<Reply>) {
        let mut replies: VecDeque<Reply> = replies.into();
        self.on(command, move |_| replies.pop_front());
    }

    /// Answers every command of this name with this document.
    pub fn always(&self, command: &str, reply: Document) {
        self.on(command, move |_| Some(Reply::Doc(reply.clone())));
    }

    /// The commands received so far (not the driver's handshake and monitoring `hello`s).
    pub fn commands(&self) -> Vec<Document> {
        self.shared.log.lock().unwrap().clone()
    }

    /// The commands of one name received so far.
    pub fn commands_named(&self, name: &str) -> Vec<Document> {
        self.commands()
            .into_iter()
            .filter(|c| command_name(c) == name)
            .collect()
    }

    /// Closes every open connection.
    pub fn drop_connections(&self) {
        self.shared.generation.send_modify(|g| *g += 1);
    }

    /// Plays a server older than 4.4.2: an application's `hello` (one not sent to
    /// `admin` by the driver's handshake) gets CommandNotFound; `isMaster` works.
    pub fn without_hello(&self) {
        self.shared.no_hello.store(true, Ordering::SeqCst);
    }

    /// Sets the server's clock (`hello.localTime`) to these seconds since the epoch; it
    /// moves on in real time.
    pub fn set_clock(&self, secs: u32) {
        *self.shared.clock.lock().unwrap() = Some((secs, std::time::Instant::now()));
    }

    /// Reports this newest write in `hello.lastWrite.opTime`.
    pub fn set_last_write(&self, ts: Timestamp) {
        *self.shared.last_write.lock().unwrap() = Some(ts);
    }

    /// Refuses (closes at once) new connections until told otherwise.
    pub fn refuse_connections(&self, refuse: bool) {
        self.shared.refusing.store(refuse, Ordering::SeqCst);
        if refuse {
            self.drop_connections();
        }
    }

    /// A fresh cursor id.
    pub fn cursor_id(&self) -> i64 {
        self.shared.cursor_ids.fetch_add(1, Ordering::SeqCst) as i64
    }

    /// Waits (bounded) until `count` commands of this name have arrived.
    pub async fn wait_for(&self, name: &str, count: usize) -> Vec<Document> {
        for _ in 0..600 {
            let seen = self.commands_named(name);
            if seen.len() >= count {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "the peer did not receive {count} `{name}` command(s); received: {:#?}",
            self.commands()
        );
    }

    /// Scripts the set-up commands of the MongoDB medium to succeed on an empty database.
    pub fn accept_setup(&self) {
        self.always("listCollections", doc! { "cursor": { "id": 0i64, "ns": "intracom.$cmd.listCollections", "firstBatch": [] }, "ok": 1 });
        self.always("create", ok());
        self.always("createIndexes", ok());
        self.always("collMod", ok());
        // Where a subscription that starts now starts, when the process has seen no
        // message yet: the newest stamp of an empty collection (none).
        self.on("find", |c| {
            (c.get_str("comment") == Ok("intracom: where a subscription starts")).then(|| {
                Reply::Doc(doc! {
                    "cursor": { "id": 0i64, "ns": "intracom.messages", "firstBatch": [] },
                    "ok": 1,
                })
            })
        });
    }
}

/// `{ok: 1}`.
pub fn ok() -> Document {
    doc! { "ok": 1 }
}

/// A server error reply.
pub fn error(code: i32, name: &str, message: &str) -> Document {
    doc! { "ok": 0, "code": code, "codeName": name, "errmsg": message }
}

/// The first key of a command: its name.
pub fn command_name(command: &Document) -> &str {
    command.keys().next().map(String::as_str).unwrap_or("")
}

/// A change-stream cursor reply (`firstBatch` for `aggregate`, `nextBatch` for `getMore`).
pub fn cursor_reply(
    id: i64,
    batch_field: &str,
    events: Vec<Document>,
    post_batch_token: &str,
) -> Document {
    doc! {
        "cursor": {
            "id": id,
            "ns": "intracom.messages",
            batch_field: events.into_iter().map(Bson::Document).collect::<Vec<_>>(),
            "postBatchResumeToken": { "_data": post_batch_token },
        },
        "operationTime": Timestamp { time: 1_700_000_000, increment: 1 },
        "ok": 1,
    }
}

/// A stored message document as the server would hold it, stamped.
pub fn stored_message(id: &str, action: &str, ts: Timestamp) -> Document {
    doc! {
        "_id": id,
        "ts": ts,
        "at": intracom::bson::DateTime::now(),
        "serviceNameSource": "billing",
        "instanceSource": "billing-1",
        "serviceNameDest": Bson::Null,
        "type": "broadcast",
        "delivery": "all",
        "action": action,
        "query": { "n": 1 },
        "query_ts": 1i64,
    }
}

/// An insert change event for a stored document.
pub fn insert_event(token: &str, document: Document, cluster_time: Timestamp) -> Document {
    let id = document.get("_id").cloned().unwrap_or(Bson::Null);
    doc! {
        "_id": { "_data": token },
        "operationType": "insert",
        "clusterTime": cluster_time,
        "ns": { "db": "intracom", "coll": "messages" },
        "documentKey": { "_id": id },
        "fullDocument": document,
    }
}

fn local_time(shared: &Shared) -> intracom::bson::DateTime {
    let Some((secs, at)) = *shared.clock.lock().unwrap() else {
        return intracom::bson::DateTime::now();
    };
    intracom::bson::DateTime::from_millis(
        i64::from(secs) * 1000 + i64::try_from(at.elapsed().as_millis()).unwrap_or(0),
    )
}

fn hello(shared: &Shared, addr: &str) -> Document {
    let mut reply = doc! {
        "helloOk": true,
        "isWritablePrimary": true,
        "ismaster": true,
        "maxBsonObjectSize": 16 * 1024 * 1024,
        "maxMessageSizeBytes": 48_000_000,
        "maxWriteBatchSize": 100_000,
        "localTime": local_time(shared),
        "logicalSessionTimeoutMinutes": 30,
        "connectionId": 1,
        "minWireVersion": 0,
        "maxWireVersion": 21,
        "readOnly": false,
        "ok": 1,
    };
    if !shared.standalone {
        reply.insert("setName", "rs0");
        reply.insert("setVersion", 1);
        reply.insert("hosts", vec![addr.to_string()]);
        reply.insert("primary", addr);
        reply.insert("me", addr);
        if let Some(ts) = *shared.last_write.lock().unwrap() {
            reply.insert(
                "lastWrite",
                doc! { "opTime": { "ts": ts, "t": 1i64 }, "lastWriteDate": intracom::bson::DateTime::now() },
            );
        }
    }
    reply
}

async fn serve(shared: Arc<Shared>, mut socket: TcpStream) {
    let local = socket
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let mut generation = shared.generation.subscribe();
    generation.borrow_and_update();
    loop {
        let request = tokio::select! {
            biased;
            _ = generation.changed() => return,
            request = read_message(&mut socket) => request,
        };
        let Some((request_id, command)) = request else {
            return;
        };
        // Connections were dropped while this request was read (`refuse_connections`,
        // `drop_connections`): it was sent after the drop, so nothing answers it and it
        // is not logged as received.
        if generation.has_changed().unwrap_or(true) {
            return;
        }
        let name = command_name(&command).to_string();
        let from_application = command.get_str("$db").is_ok_and(|db| db != "admin");
        let reply = if name == "hello" && from_application && shared.no_hello.load(Ordering::SeqCst)
        {
            shared.log.lock().unwrap().push(command.clone());
            Reply::Doc(error(59, "CommandNotFound", "no such command: 'hello'"))
        } else if name == "hello" || name == "isMaster" || name == "ismaster" {
            if from_application {
                shared.log.lock().unwrap().push(command.clone());
            }
            Reply::Doc(hello(&shared, &local))
        } else {
            shared.log.lock().unwrap().push(command.clone());
            let mut rules = shared.rules.lock().unwrap();
            let mut answer = None;
            for (rule_name, rule) in rules.iter_mut() {
                if *rule_name == name {
                    if let Some(reply) = rule(&command) {
                        answer = Some(reply);
                        break;
                    }
                }
            }
            answer.unwrap_or_else(|| match name.as_str() {
                "ping" | "endSessions" => Reply::Doc(ok()),
                "killCursors" => Reply::Doc(doc! { "cursorsKilled": [], "ok": 1 }),
                _ => Reply::Doc(error(
                    59,
                    "CommandNotFound",
                    &format!("the test peer has no script for `{name}`"),
                )),
            })
        };
        let document = match reply {
            Reply::Doc(d) => d,
            Reply::After(pause, d) => {
                tokio::select! {
                    _ = generation.changed() => return,
                    _ = tokio::time::sleep(pause) => d,
                }
            }
            Reply::Drop => return,
        };
        let id = shared.request_ids.fetch_add(1, Ordering::SeqCst);
        if write_message(&mut socket, id, request_id, &document)
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Reads one OP_MSG; returns the request id and the command with any document
/// sequences (section kind 1) folded in as arrays, as the server sees them.
async fn read_message(socket: &mut TcpStream) -> Option<(i32, Document)> {
    let mut header = [0u8; 16];
    socket.read_exact(&mut header).await.ok()?;
    let length = i32::from_le_bytes(header[0..4].try_into().ok()?) as usize;
    let request_id = i32::from_le_bytes(header[4..8].try_into().ok()?);
    let op_code = i32::from_le_bytes(header[12..16].try_into().ok()?);
    let mut body = vec![0u8; length.checked_sub(16)?];
    socket.read_exact(&mut body).await.ok()?;
    if op_code != OP_MSG {
        return None;
    }
    let flags = u32::from_le_bytes(body[0..4].try_into().ok()?);
    let end = if flags & 1 == 1 {
        body.len() - 4
    } else {
        body.len()
    };
    let mut at = 4;
    let mut command = None;
    let mut sequences = Vec::new();
    while at < end {
        let kind = body[at];
        at += 1;
        let size = i32::from_le_bytes(body[at..at + 4].try_into().ok()?) as usize;
        match kind {
            0 => {
                command = Some(Document::from_reader(&body[at..at + size]).ok()?);
                at += size;
            }
            1 => {
                let section = &body[at + 4..at + size];
                let nul = section.iter().position(|b| *b == 0)?;
                let identifier = String::from_utf8(section[..nul].to_vec()).ok()?;
                let mut docs = Vec::new();
                let mut rest = &section[nul + 1..];
                while !rest.is_empty() {
                    let doc_len = i32::from_le_bytes(rest[0..4].try_into().ok()?) as usize;
                    docs.push(Bson::Document(
                        Document::from_reader(&rest[..doc_len]).ok()?,
                    ));
                    rest = &rest[doc_len..];
                }
                sequences.push((identifier, docs));
                at += size;
            }
            _ => return None,
        }
    }
    let mut command = command?;
    for (identifier, docs) in sequences {
        command.insert(identifier, docs);
    }
    Some((request_id, command))
}

async fn write_message(
    socket: &mut TcpStream,
    request_id: i32,
    response_to: i32,
    document: &Document,
) -> std::io::Result<()> {
    let mut payload = Vec::new();
    document
        .to_writer(&mut payload)
        .map_err(std::io::Error::other)?;
    let length = 16 + 4 + 1 + payload.len();
    let mut out = Vec::with_capacity(length);
    out.extend_from_slice(&(length as i32).to_le_bytes());
    out.extend_from_slice(&request_id.to_le_bytes());
    out.extend_from_slice(&response_to.to_le_bytes());
    out.extend_from_slice(&OP_MSG.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.push(0);
    out.extend_from_slice(&payload);
    socket.write_all(&out).await?;
    socket.flush().await
}
