//! Real servers for the tests, started and stopped by the test binary itself.
//!
//! Why it exists: every promise of the MongoDB medium is proven against real servers,
//! not against our own fakes (DESIGN §7). mongod cannot be installed on our machines;
//! two MongoDB-wire-compatible servers on MongoDB's own storage engine can, and the
//! README's test command (`scripts/test`) installs them into `~/.cache/intracom`:
//!
//! - `secantusd-rs` (crates.io `secantus-mdb`), found at `$INTRACOM_SECANTUSD_RS` or
//!   `~/.cache/intracom/secantus-rs/bin/secantusd-rs`;
//! - `secantusd-py` (PyPI `SecantusDB`), found at `$INTRACOM_SECANTUSD_PY` or
//!   `~/.cache/intracom/secantus-py/bin/secantusd-py`;
//! - a real mongod (replica set) when `INTRACOM_TEST_MONGODB_URI` names one: it is
//!   used as it is, never started or stopped here.
//!
//! Each server is started on an ephemeral port (`--port 0`, the port read from its
//! log) with a fresh data directory, and stopped by its own pid: a server a test owns
//! when the test drops it, a server shared by the binary's tests when the binary ends
//! ([`stop_shared`]), and in any case when the test process dies (the child gets
//! `SIGKILL` from the kernel when its parent goes: `PR_SET_PDEATHSIG`).
//!
//! A server that cannot be had is a reason, not a failure: the tests that need it are
//! reported as ignored with that reason (see [`Target::unavailable`]).

#![allow(dead_code)]

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The MongoDB-compatible servers the suite runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// SecantusDB's Rust server.
    SecantusRs,
    /// SecantusDB's Python server.
    SecantusPy,
}

impl Kind {
    /// Both SecantusDB servers.
    pub const ALL: [Kind; 2] = [Kind::SecantusRs, Kind::SecantusPy];

    /// The short name used in test names (`rs::…`, `py::…`).
    pub fn short(self) -> &'static str {
        match self {
            Kind::SecantusRs => "rs",
            Kind::SecantusPy => "py",
        }
    }

    fn program(self) -> &'static str {
        match self {
            Kind::SecantusRs => "secantusd-rs",
            Kind::SecantusPy => "secantusd-py",
        }
    }

    fn env(self) -> &'static str {
        match self {
            Kind::SecantusRs => "INTRACOM_SECANTUSD_RS",
            Kind::SecantusPy => "INTRACOM_SECANTUSD_PY",
        }
    }

    fn default_path(self) -> Option<PathBuf> {
        let cache = cache_dir()?;
        Some(match self {
            Kind::SecantusRs => cache.join("secantus-rs/bin/secantusd-rs"),
            Kind::SecantusPy => cache.join("secantus-py/bin/secantusd-py"),
        })
    }

    /// The server's executable, or why there is none.
    pub fn executable(self) -> Result<PathBuf, String> {
        if let Some(path) = std::env::var_os(self.env()).filter(|p| !p.is_empty()) {
            let path = PathBuf::from(path);
            return if path.is_file() {
                Ok(path)
            } else {
                Err(format!(
                    "{} names {}, which does not exist",
                    self.env(),
                    path.display()
                ))
            };
        }
        match self.default_path() {
            Some(path) if path.is_file() => Ok(path),
            Some(path) => Err(format!(
                "{} not installed at {}: scripts/test installs it",
                self.program(),
                path.display()
            )),
            None => Err("HOME is not set: cannot find the test servers".into()),
        }
    }
}

/// Where `scripts/test` installs the test servers: `$INTRACOM_CACHE`, or
/// `~/.cache/intracom`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("INTRACOM_CACHE").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME")?;
    Some(Path::new(&home).join(".cache/intracom"))
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.program())
    }
}

/// How a server is started.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// `--oplog-max-entries`: a tiny oplog makes history loss (286) happen for real.
    pub oplog_max_entries: Option<u64>,
}

/// A server process this test binary started.
pub struct Server {
    kind: Kind,
    options: Options,
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    /// How many times it was started (each start logs to its own file).
    starts: u32,
}

impl Server {
    /// Starts a server on an ephemeral port with a fresh data directory.
    pub fn start(kind: Kind, options: Options) -> Result<Server, String> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("intracom-{}-", kind.short()))
            .tempdir()
            .map_err(|e| format!("cannot make a data directory: {e}"))?;
        let mut server = Server {
            kind,
            options,
            dir,
            port: 0,
            child: None,
            starts: 0,
        };
        server.launch()?;
        Ok(server)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("server-{}.log", self.starts))
    }

    /// Starts the process (on the known port after the first start) and waits until it
    /// listens.
    fn launch(&mut self) -> Result<(), String> {
        let program = self.kind.executable()?;
        self.starts += 1;
        let log_path = self.log_path();
        let log = std::fs::File::create(&log_path)
            .map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("cannot share the log file: {e}"))?;
        let mut command = Command::new(&program);
        command
            .arg("--host")
            .arg("127.0.0.1")
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--storage-path")
            .arg(self.data_dir())
            .arg("--enable-test-commands")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        match self.kind {
            Kind::SecantusRs => {
                // Small stores: a log file is allocated in full, and the cache is RAM.
                // The listening line is printed at every log level.
                command.args(["--cache-size", "256M", "--log-file-max", "16MB"]);
                command.args(["--log-level", "WARNING"]);
            }
            Kind::SecantusPy => {
                // The listening line is an INFO record: keep the default level.
                command.args(["--cache-size", "256M"]);
            }
        }
        if let Some(n) = self.options.oplog_max_entries {
            command.arg("--oplog-max-entries").arg(n.to_string());
        }
        let child =
            spawn_kept(command).map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut text = String::new();
            if let Ok(mut f) = std::fs::File::open(&log_path) {
                let _ = f.read_to_string(&mut text);
            }
            if let Some(port) = listening_port(&text) {
                if self.port == 0 || self.port == port {
                    self.port = port;
                    return Ok(());
                }
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!(
                        "{} (pid {pid}) exited at start-up with {status}:\n{text}",
                        self.kind
                    ));
                }
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(format!(
                    "{} (pid {pid}) did not listen within 60 s:\n{text}",
                    self.kind
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Which server this is.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The connection string of this server.
    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the process with SIGKILL (a crash: nothing is flushed) and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the process again on the same port with the same data directory.
    pub fn restart(&mut self) -> Result<(), String> {
        if self.child.is_some() {
            self.stop();
        }
        // The port was released by the kill; another process could take it meanwhile,
        // which the start reports as an error rather than a silent other port.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.launch() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() < deadline && e.contains("exited") => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Stops the process: SIGTERM, then SIGKILL if it has not exited after 10 s.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child);
        }
    }

    /// Stops it and removes its data directory now: a server kept in a static is never
    /// dropped, so its `TempDir` would stay behind in /tmp after every run.
    pub fn discard(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(self.dir.path());
    }

    /// The directory of its data and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Keeps the data directory and logs when this server is dropped (a failed run's
    /// evidence, for a replay or a look).
    pub fn keep_dir(&mut self) {
        self.dir.disable_cleanup(true);
    }

    /// Stops the process with SIGSTOP (it holds its connections and answers nothing).
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Lets a paused process go on (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: i32) {
        if let Some(pid) = self.pid().and_then(|p| i32::try_from(p).ok()) {
            // SAFETY: kill(2) on a pid we spawned and have not reaped yet.
            unsafe {
                libc::kill(pid, signal);
            }
        }
    }

    /// What the server logged since its last start (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Stops a child process: SIGTERM, then SIGKILL if it has not exited after 10 s; reaps it.
pub fn terminate(child: &mut Child) {
    let pid = child.id();
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill(2) on a pid we spawned and have not reaped yet.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The port in a "listening on 127.0.0.1:PORT" line.
fn listening_port(log: &str) -> Option<u16> {
    log.lines().find_map(|line| {
        let rest = line.split("listening on ").nth(1)?;
        let port = rest.trim().rsplit(':').next()?;
        port.trim_end_matches(|c: char| !c.is_ascii_digit())
            .parse()
            .ok()
    })
}

/// Where a test's MongoDB comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// One of the SecantusDB servers, started by this binary.
    Secantus(Kind),
    /// The mongod named by `INTRACOM_TEST_MONGODB_URI`.
    Mongod,
}

/// The environment variable naming a real mongod for the suite.
pub const MONGODB_URI_ENV: &str = "INTRACOM_TEST_MONGODB_URI";

impl Target {
    /// Every target, in the order the suite runs them.
    pub fn all() -> Vec<Target> {
        vec![
            Target::Secantus(Kind::SecantusRs),
            Target::Secantus(Kind::SecantusPy),
            Target::Mongod,
        ]
    }

    /// The prefix of test names on this target.
    pub fn short(&self) -> &'static str {
        match self {
            Target::Secantus(kind) => kind.short(),
            Target::Mongod => "mongod",
        }
    }

    /// Why the target cannot be used here, if it cannot (checked without starting it).
    pub fn unavailable(&self) -> Option<String> {
        match self {
            Target::Secantus(kind) => kind.executable().err(),
            Target::Mongod => match std::env::var(MONGODB_URI_ENV) {
                Ok(uri) if !uri.is_empty() => None,
                _ => Some(format!("no mongod: {MONGODB_URI_ENV} is not set")),
            },
        }
    }

    /// The connection string, starting the shared server of this binary on first use.
    pub fn uri(&self) -> Result<String, String> {
        match self {
            Target::Secantus(kind) => shared(*kind).map(|s| s.uri()),
            Target::Mongod => {
                std::env::var(MONGODB_URI_ENV).map_err(|_| format!("{MONGODB_URI_ENV} is not set"))
            }
        }
    }

    /// The SecantusDB server behind this target, if it is one.
    pub fn kind(&self) -> Option<Kind> {
        match self {
            Target::Secantus(kind) => Some(*kind),
            Target::Mongod => None,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Secantus(kind) => kind.fmt(f),
            Target::Mongod => f.write_str("mongod"),
        }
    }
}

type Slot = OnceLock<Result<SharedServer, String>>;

/// A server shared by the tests of one binary: started on first use, stopped by
/// [`stop_shared`].
pub struct SharedServer {
    uri: String,
    server: Mutex<Server>,
}

impl SharedServer {
    /// The connection string.
    pub fn uri(&self) -> String {
        self.uri.clone()
    }
}

fn slot(kind: Kind) -> &'static Slot {
    static RS: Slot = OnceLock::new();
    static PY: Slot = OnceLock::new();
    match kind {
        Kind::SecantusRs => &RS,
        Kind::SecantusPy => &PY,
    }
}

/// The binary's shared server of this kind, started on first use.
pub fn shared(kind: Kind) -> Result<&'static SharedServer, String> {
    slot(kind)
        .get_or_init(|| {
            Server::start(kind, Options::default()).map(|server| SharedServer {
                uri: server.uri(),
                server: Mutex::new(server),
            })
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Stops the shared servers this binary started and removes their data directories
/// (call once, after the tests ran).
pub fn stop_shared() {
    for kind in Kind::ALL {
        if let Some(Ok(shared)) = slot(kind).get() {
            shared
                .server
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .discard();
        }
    }
}

/// Spawns a server process that the kernel kills if this test process dies
/// (`PR_SET_PDEATHSIG`), forked from a thread that lives as long as the process. Any
/// server a test binary starts (MongoDB-compatible, Mosquitto…) goes through here.
pub fn spawn_kept(command: Command) -> std::io::Result<Child> {
    keeper::spawn(command)
}

/// Starts server processes from one thread that lives as long as the test binary.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the
/// process; test threads come and go, so children are forked from this keeper thread.
mod keeper {
    use super::*;

    type Request = (Command, mpsc::Sender<std::io::Result<Child>>);

    fn sender() -> &'static Mutex<mpsc::Sender<Request>> {
        static SENDER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
        SENDER.get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Request>();
            std::thread::Builder::new()
                .name("server-keeper".into())
                .spawn(move || {
                    for (mut command, reply) in rx {
                        let _ = reply.send(spawn_here(&mut command));
                    }
                    // The channel lives in a static: this loop ends with the process.
                    loop {
                        std::thread::park();
                    }
                })
                .map(|_| ())
                .unwrap_or_else(|e| panic!("cannot start the server keeper thread: {e}"));
            Mutex::new(tx)
        })
    }

    fn spawn_here(command: &mut Command) -> std::io::Result<Child> {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command.spawn()
    }

    pub(super) fn spawn(command: Command) -> std::io::Result<Child> {
        let (tx, rx) = mpsc::channel();
        sender()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send((command, tx))
            .map_err(|_| std::io::Error::other("the server keeper thread is gone"))?;
        rx.recv()
            .map_err(|_| std::io::Error::other("the server keeper thread is gone"))?
    }
}

/// The harness reads the port from either server's log line (a trial of the mongodb
/// test binary, whose harness is libtest-mimic: a `#[test]` here would never run).
pub fn reads_the_port_from_either_server() {
    assert_eq!(
        listening_port("secantusd-rs listening on 127.0.0.1:40349\n"),
        Some(40349)
    );
    assert_eq!(
        listening_port(
            "2026-11-24 10:24:14,013 INFO secantus.server: secantus listening on 127.0.0.1:33275"
        ),
        Some(33275)
    );
}
