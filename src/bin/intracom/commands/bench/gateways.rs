//! The gateways of `intracom bench --processes … --via-gateways N`: N `intracom serve`
//! processes on the run's database, each on a free loopback port, with a tokens file
//! holding one service token per fleet process (minted as `intracom token new
//! --service fleet-<i>` does) and one event key file. A fleet process then runs on the `http` medium, its URL
//! list starting at gateway `i mod N` (round-robin) and going on with the others.

use crate::output::Failure;

/// What one gateway's counters say, read from its `/metrics`.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct GatewayReading {
    /// CPU seconds of the gateway processes, summed (from `/proc/<pid>/stat`).
    pub cpu_seconds: Option<f64>,
    /// Change events the gateways' hubs read, summed (`intracom_hub_events_total`).
    pub hub_events: Option<f64>,
}

#[cfg(all(feature = "gateway", feature = "http"))]
pub(crate) use imp::Gateways;

#[cfg(not(all(feature = "gateway", feature = "http")))]
pub(crate) use stub::Gateways;

/// Whether this build can run the fleet through gateways.
pub(crate) const BUILT: bool = cfg!(all(feature = "gateway", feature = "http"));

/// The refusal of `--via-gateways` in a build without the features.
pub(crate) fn not_built() -> Failure {
    crate::output::fail(
        "--via-gateways needs an intracom built with the `gateway` and `http` features",
        "cargo install intracom --features gateway,http (or cargo run --features gateway,http -- bench …)",
    )
}

#[cfg(not(all(feature = "gateway", feature = "http")))]
mod stub {
    use super::{not_built, GatewayReading};
    use crate::output::Failure;
    use intracom::Config;

    /// No gateways in this build: starting them is refused.
    pub(crate) struct Gateways;

    impl Gateways {
        pub(crate) async fn start(
            _: &Config,
            _: &str,
            _: &str,
            _: usize,
            _: usize,
        ) -> Result<Gateways, Failure> {
            Err(not_built())
        }

        pub(crate) fn probe_env(&self, _: usize) -> Vec<(String, String)> {
            Vec::new()
        }

        pub(crate) async fn read(&self) -> GatewayReading {
            GatewayReading::default()
        }

        pub(crate) fn stop(&mut self) {}
    }
}

#[cfg(all(feature = "gateway", feature = "http"))]
mod imp {
    use std::io::{BufRead, BufReader};
    use std::path::PathBuf;
    use std::process::{Child, Stdio};
    use std::time::Duration;

    use intracom::gateway::{Identity, Tokens};
    use intracom::Config;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::mpsc;

    use super::super::fleet::{proc_cpu_seconds, reap, service, ticks_per_second, SELECTION_ENV};
    use super::super::CONFIG_FILE;
    use super::GatewayReading;
    use crate::output::{fail, Failure};

    /// How long a gateway may take to listen.
    const PATIENCE: Duration = Duration::from_secs(60);
    /// The line `intracom serve` prints once its bus is connected and it listens.
    const LISTENING: &str = "intracom gateway on ";

    /// The running gateways of one fleet run.
    pub(crate) struct Gateways {
        children: Vec<Child>,
        /// `http://127.0.0.1:<port>` of each gateway, in order.
        urls: Vec<String>,
        /// The token of each fleet process (bound to its service).
        tokens: Vec<String>,
        /// The tokens file's directory, removed at the end.
        dir: PathBuf,
        ticks_per_second: f64,
    }

    impl Gateways {
        /// Starts `n` gateways on `database` for a fleet of `p` processes and waits until
        /// each listens.
        pub(crate) async fn start(
            base: &Config,
            database: &str,
            selection: &str,
            n: usize,
            p: usize,
        ) -> Result<Gateways, Failure> {
            let dir = std::env::temp_dir().join(format!(
                "intracom-bench-gateways-{}-{}",
                std::process::id(),
                intracom::message::new_id().to_lowercase()
            ));
            let mut gateways = Gateways {
                children: Vec::new(),
                urls: Vec::new(),
                tokens: Vec::new(),
                dir,
                ticks_per_second: ticks_per_second(),
            };
            let cannot = |what: &str, e: &dyn std::fmt::Display| {
                fail(
                    format!("gateways: cannot {what}: {e}"),
                    "check the temporary directory ($TMPDIR) and the process limits",
                )
            };
            std::fs::create_dir_all(&gateways.dir)
                .map_err(|e| cannot("create the tokens file's directory", &e))?;
            let mut lines = String::new();
            for i in 0..p {
                let token = Tokens::generate()?;
                lines.push_str(&Tokens::line(&token, &Identity::service(service(i))));
                lines.push('\n');
                gateways.tokens.push(token);
            }
            let tokens_file = gateways.dir.join("tokens");
            std::fs::write(&tokens_file, lines).map_err(|e| cannot("write the tokens file", &e))?;
            // One event key for all: as the guide sets gateways up (a follower may resume
            // on any of them).
            let keys_file = gateways.dir.join("event-keys");
            std::fs::write(&keys_file, format!("{}\n", Tokens::generate()?))
                .map_err(|e| cannot("write the event key file", &e))?;
            let exe = std::env::current_exe().map_err(|e| cannot("find this executable", &e))?;
            let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Option<String>)>();
            for k in 0..n {
                let mut command = std::process::Command::new(&exe);
                command
                    .arg("--uri")
                    .arg(&base.db.uri)
                    .arg("--database")
                    .arg(database)
                    .arg("serve")
                    .arg("--listen")
                    .arg("127.0.0.1:0")
                    .arg("--tokens")
                    .arg(&tokens_file)
                    .arg("--event-key-file")
                    .arg(&keys_file)
                    .env(SELECTION_ENV, selection)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped());
                if let Some(Some(file)) = CONFIG_FILE.get() {
                    command.arg("--config").arg(file);
                }
                let mut child = command.spawn().map_err(|e| cannot("start a gateway", &e))?;
                if let Some(stderr) = child.stderr.take() {
                    let tx = tx.clone();
                    // The listening line goes to the bench; the rest to its stderr.
                    std::thread::spawn(move || {
                        for line in BufReader::new(stderr).lines() {
                            let Ok(line) = line else { break };
                            match line.find(LISTENING) {
                                Some(at) => {
                                    let rest = &line[at + LISTENING.len()..];
                                    let url = rest.split_whitespace().next().unwrap_or("");
                                    let _ = tx.send((k, Some(url.to_string())));
                                }
                                None => eprintln!("gateway {k}: {line}"),
                            }
                        }
                        let _ = tx.send((k, None));
                    });
                }
                gateways.children.push(child);
            }
            drop(tx);
            let mut urls: Vec<Option<String>> = vec![None; n];
            while urls.iter().any(Option::is_none) {
                match tokio::time::timeout(PATIENCE, rx.recv()).await {
                    Ok(Some((k, Some(url)))) => urls[k] = Some(url),
                    Ok(Some((k, None))) if urls[k].is_none() => {
                        gateways.stop();
                        return Err(fail(
                            format!("gateway {k} ended before it listened (its errors are above)"),
                            "run `intracom serve` alone with INTRACOM_LOG=debug to see why",
                        ));
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => {
                        gateways.stop();
                        return Err(fail(
                            format!(
                                "the gateways did not listen within {} s",
                                PATIENCE.as_secs()
                            ),
                            "run `intracom serve` alone with INTRACOM_LOG=debug to see why",
                        ));
                    }
                }
            }
            gateways.urls = urls.into_iter().flatten().collect();
            Ok(gateways)
        }

        /// The environment of fleet process `i`: the `http` medium's URL list, starting
        /// at gateway `i mod N` and going on with the others, and its service's token.
        pub(crate) fn probe_env(&self, i: usize) -> Vec<(String, String)> {
            let n = self.urls.len().max(1);
            let urls: Vec<&str> = (0..self.urls.len())
                .map(|k| self.urls[(i + k) % n].as_str())
                .collect();
            vec![
                ("COMMON_INTRACOM_HTTP_URL".into(), urls.join(",")),
                (
                    "COMMON_INTRACOM_HTTP_TOKEN".into(),
                    self.tokens.get(i).cloned().unwrap_or_default(),
                ),
            ]
        }

        /// The gateways' CPU time and the events their hubs read so far, summed.
        pub(crate) async fn read(&self) -> GatewayReading {
            let mut cpu = Some(0.0);
            for child in &self.children {
                cpu = cpu
                    .zip(proc_cpu_seconds(child.id(), self.ticks_per_second))
                    .map(|(a, b)| a + b);
            }
            let mut events = Some(0.0);
            for url in &self.urls {
                let read = hub_events(url).await;
                events = events.zip(read).map(|(a, b)| a + b);
            }
            GatewayReading {
                cpu_seconds: cpu,
                hub_events: events,
            }
        }

        /// Asks each gateway to stop (SIGTERM: it closes its bus), then reaps it; kills
        /// one still running after 10 s. Removes the tokens file.
        pub(crate) fn stop(&mut self) {
            for child in &self.children {
                let _ = std::process::Command::new("kill")
                    .arg("-TERM")
                    .arg(child.id().to_string())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
            for child in &mut self.children {
                reap(child);
            }
            self.children.clear();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    impl Drop for Gateways {
        fn drop(&mut self) {
            for child in &mut self.children {
                let _ = child.kill();
                let _ = child.wait();
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// `intracom_hub_events_total` of the gateway at `url` (its labels summed), from
    /// its `/metrics` (a plain HTTP/1.0 GET on the loopback address it printed).
    async fn hub_events(url: &str) -> Option<f64> {
        let address = url.strip_prefix("http://")?;
        let read = async {
            let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
            stream
                .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
                .await
                .ok()?;
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer).await.ok()?;
            Some(answer)
        };
        let answer = tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .ok()??;
        let text = String::from_utf8_lossy(&answer);
        let (head, body) = text.split_once("\r\n\r\n")?;
        if !head.starts_with("HTTP/1.") || !head.split_whitespace().nth(1)?.starts_with('2') {
            return None;
        }
        Some(sum_of(body, super::super::fleet::HUB_EVENTS_METRIC))
    }

    /// The sum of a counter's samples in Prometheus text (0 when it has none yet: the
    /// exporter lists a counter once it was first incremented).
    fn sum_of(text: &str, name: &str) -> f64 {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    #[cfg(test)]
    mod tests {
        use super::sum_of;

        #[test]
        fn sum_of_adds_a_counter_s_labelled_samples() {
            let text = "# TYPE intracom_hub_events_total counter\n\
                intracom_hub_events_total{operation=\"insert\"} 12\n\
                intracom_hub_events_total{operation=\"update\"} 3\n\
                intracom_hub_events_total_other 100\n\
                intracom_hub_selections_total 4\n";
            assert_eq!(sum_of(text, "intracom_hub_events_total"), 15.0);
            assert_eq!(sum_of("", "intracom_hub_events_total"), 0.0);
        }
    }
}
