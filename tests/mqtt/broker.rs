//! Mosquitto for the tests: found, configured, started on an ephemeral port with a
//! persistence directory of its own, restarted on the same port, stopped by its pid.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::servers::{spawn_kept, terminate};

/// The environment variable naming the Mosquitto binary (`scripts/test` sets it).
pub const MOSQUITTO_ENV: &str = "INTRACOM_MOSQUITTO";

/// The largest packet the test broker accepts (its CONNACK says so).
pub const MAX_PACKET: usize = 1024 * 1024;

/// The Mosquitto binary, or why there is none.
pub fn executable() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os(MOSQUITTO_ENV).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "{MOSQUITTO_ENV} names {}, which does not exist",
                path.display()
            ))
        };
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join("mosquitto"))
        .chain([PathBuf::from("/usr/sbin/mosquitto")])
        .find(|p| p.is_file());
    on_path.ok_or_else(|| {
        "no mosquitto: set INTRACOM_MOSQUITTO or install Debian's mosquitto (scripts/test does)"
            .to_string()
    })
}

/// Why the broker cannot be used here, if it cannot.
pub fn unavailable() -> Option<String> {
    executable().err()
}

/// A Mosquitto this test binary started.
pub struct Broker {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    /// The listener's TLS lines, for a broker reached with `mqtts://`.
    tls: Option<String>,
}

impl Broker {
    /// Starts a broker on a free port with persistence in a fresh directory.
    pub fn start() -> Result<Broker, String> {
        Self::start_with(None)
    }

    /// Starts a broker whose listener speaks TLS with this server certificate and key
    /// (PEM files).
    pub fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> Result<Broker, String> {
        Self::start_with(Some(format!(
            "certfile {}\nkeyfile {}\n",
            cert.display(),
            key.display()
        )))
    }

    fn start_with(tls: Option<String>) -> Result<Broker, String> {
        let dir = tempfile::Builder::new()
            .prefix("intracom-mosquitto-")
            .tempdir()
            .map_err(|e| format!("cannot make a directory: {e}"))?;
        let mut broker = Broker {
            dir,
            port: 0,
            child: None,
            tls,
        };
        for _ in 0..5 {
            broker.port = free_port()?;
            match broker.launch() {
                Ok(()) => return Ok(broker),
                Err(e) if e.contains("exited") => continue,
                Err(e) => return Err(e),
            }
        }
        Err("mosquitto did not start on any of 5 free ports".into())
    }

    fn launch(&mut self) -> Result<(), String> {
        let program = executable()?;
        let conf = self.dir.path().join("mosquitto.conf");
        let log = self.dir.path().join("mosquitto.log");
        let mut text = format!(
            "listener {port} 127.0.0.1\n\
             allow_anonymous true\n\
             persistence true\n\
             persistence_location {dir}/\n\
             autosave_interval 1\n\
             max_queued_messages 100000\n\
             max_packet_size {MAX_PACKET}\n\
             log_dest file {log}\n\
             log_type error\nlog_type warning\nlog_type notice\nlog_type information\n",
            port = self.port,
            dir = self.dir.path().display(),
            log = log.display(),
        );
        if let Some(tls) = &self.tls {
            text.push_str(tls);
        }
        // As root Mosquitto would switch to the `mosquitto` user, which cannot write here.
        // SAFETY: getuid has no preconditions.
        if unsafe { libc::getuid() } == 0 {
            text.push_str("user root\n");
        }
        std::fs::File::create(&conf)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(|e| format!("cannot write {}: {e}", conf.display()))?;
        let mut command = Command::new(&program);
        command
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // This start's log only (a restart would find the last one's "running").
        if let Err(error) = std::fs::remove_file(&log) {
            if error.kind() != std::io::ErrorKind::NotFound {
                return Err(format!("cannot remove {}: {error}", log.display()));
            }
        }
        let mut child =
            spawn_kept(command).map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            // Ours, not whatever took the port between `free_port` and the bind: the
            // broker logs that it runs only once its listener is open.
            let running = std::fs::read_to_string(&log).is_ok_and(|text| text.contains(" running"));
            if running && TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                self.child = Some(child);
                return Ok(());
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "mosquitto exited at start-up with {status}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ));
            }
            if Instant::now() > deadline {
                terminate(&mut child);
                return Err("mosquitto did not listen within 20 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The broker's URL.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "mqtts" } else { "mqtt" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Stops it (SIGTERM: Mosquitto saves its persistence file) and waits.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child);
        }
    }

    /// Stops it and removes its directory now: a broker kept in a static is never
    /// dropped, so its `TempDir` would stay behind in /tmp after every run.
    pub fn discard(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(self.dir.path());
    }

    /// Starts it again on the same port with the same persistence directory.
    pub fn restart(&mut self) -> Result<(), String> {
        self.stop();
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
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// The broker shared by this binary's tests.
pub struct Shared {
    url: String,
    broker: Mutex<Broker>,
}

impl Shared {
    pub fn url(&self) -> String {
        self.url.clone()
    }
}

static SHARED: OnceLock<Result<Shared, String>> = OnceLock::new();

/// The shared broker, started on first use.
pub fn shared() -> Result<&'static Shared, String> {
    SHARED
        .get_or_init(|| {
            Broker::start().map(|broker| Shared {
                url: broker.url(),
                broker: Mutex::new(broker),
            })
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Stops the shared broker and removes its directory (once, after the tests ran).
pub fn stop_shared() {
    if let Some(Ok(shared)) = SHARED.get() {
        shared
            .broker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .discard();
    }
}

/// A CA and a server certificate for 127.0.0.1 signed by it, made with `openssl`.
pub struct Certificates {
    pub dir: tempfile::TempDir,
}

impl Certificates {
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }
    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }
    pub fn key(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }
    /// Another CA, which did not sign the server's certificate.
    pub fn stranger_ca(&self) -> PathBuf {
        self.dir.path().join("stranger.pem")
    }
}

/// Why TLS cannot be tested here, if it cannot: `openssl` makes the certificates.
pub fn tls_unavailable() -> Option<String> {
    let found = Command::new("openssl")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    (!found).then(|| "no openssl to make test certificates (Debian: openssl)".to_string())
}

/// Makes the certificates (RSA 2048, valid two days).
pub fn certificates() -> Result<Certificates, String> {
    let dir = tempfile::Builder::new()
        .prefix("intracom-tls-")
        .tempdir()
        .map_err(|e| format!("cannot make a directory: {e}"))?;
    let path = dir.path();
    std::fs::write(
        path.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .map_err(|e| e.to_string())?;
    let steps: [&[&str]; 4] = [
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=intracom test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ],
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "stranger.key",
            "-out",
            "stranger.pem",
            "-days",
            "2",
            "-subj",
            "/CN=another CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ],
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    ];
    for args in steps {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(path)
            .output()
            .map_err(|e| format!("openssl: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Ok(Certificates { dir })
}
