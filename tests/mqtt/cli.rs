//! The `intracom` command with `--medium mqtt --url …`, against the test broker.

use std::io::{BufRead, BufReader};
use std::process::{Output, Stdio};
use std::time::Duration;

use assert_cmd::Command;
use intracom::{Message, WorkOptions};

use crate::conformance::HANG_GUARD;
use crate::{check, isolated, space, Check};

pub fn checks() -> Vec<Check> {
    vec![
        check!(cli_tail_publish_request_stats_on_mqtt),
        check!(cli_dead_lists_shows_retries_and_purges_on_mqtt),
    ]
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The command on the test broker, in a space of its own.
struct On {
    url: String,
    space: String,
}

impl On {
    fn new() -> Self {
        On {
            url: crate::broker::shared().expect("mosquitto").url(),
            space: space(),
        }
    }

    fn command(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new(assert_cmd::cargo::cargo_bin("intracom"));
        // A clean environment: no config file, no overrides from the machine.
        cmd.env_remove("INTRACOM_CONFIG");
        for (key, _) in std::env::vars() {
            if key.starts_with("COMMON_INTRACOM_") {
                cmd.env_remove(key);
            }
        }
        cmd.env(
            "COMMON_INTRACOM_MQTT_TOPIC_PREFIX",
            format!("test/{}", self.space),
        )
        .env(
            "COMMON_INTRACOM_MQTT_CLIENT_ID_PREFIX",
            format!("{}-", self.space),
        )
        .env("COMMON_INTRACOM_SENDERS_LIST", "billing,web")
        .env(
            "COMMON_INTRACOM_ACTIONS_BILLING",
            "reload,invoice.get,invoice.render",
        )
        .args(["--medium", "mqtt", "--url", &self.url]);
        cmd
    }

    /// Runs `intracom --medium mqtt --url … <args>` on a blocking thread.
    async fn run(&self, args: &[&str]) -> Output {
        let mut cmd = Command::from_std(self.command());
        cmd.args(args).timeout(HANG_GUARD);
        tokio::task::spawn_blocking(move || cmd.output().expect("the intracom binary runs"))
            .await
            .expect("the command's thread")
    }

    /// A bus in this test's space, as a service would open it.
    async fn bus(&self, service: &str, instance: &str) -> intracom::Intracom {
        let config = intracom::Config::builder()
            .service(service)
            .instance(instance)
            .sender("billing", ["reload", "invoice.get", "invoice.render"])
            .sender("web", Vec::<String>::new())
            .build()
            .unwrap();
        intracom::Intracom::connect(isolated(config, &self.url, &self.space))
            .await
            .unwrap()
    }
}

/// A child process killed if the test fails before it ends.
struct Killed(Option<std::process::Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Query {
    invoice: i64,
}

async fn cli_tail_publish_request_stats_on_mqtt() {
    let on = On::new();
    // tail, started first: it says so on stderr once it follows.
    let mut tail = on.command();
    tail.args(["tail", "--count", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut tail = Killed(Some(tail.spawn().expect("tail runs")));
    let tail_err = tail.0.as_mut().unwrap().stderr.take().unwrap();
    let following = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(tail_err).read_line(&mut line).map(|_| line)
    });
    let line = tokio::time::timeout(HANG_GUARD, following)
        .await
        .expect("tail starts")
        .unwrap()
        .unwrap();
    assert!(line.contains("following test/"), "{line}");

    let published = on
        .run(&[
            "publish",
            "reload",
            "--from",
            "billing",
            "--body",
            r#"{"tenant": 7}"#,
        ])
        .await;
    assert!(published.status.success(), "{}", stderr(&published));
    assert!(
        stdout(&published).contains("stored"),
        "{}",
        stdout(&published)
    );
    let tail = tail.0.take().unwrap();
    let tailed = tokio::task::spawn_blocking(move || tail.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let line = stdout(&tailed);
    assert!(
        line.contains("billing/") && line.contains("reload") && line.contains(r#""tenant":7"#),
        "{line}"
    );

    // A request answered by a service on its own bus.
    let billing = on.bus("billing", "billing-1").await;
    let _server = billing
        .serve("billing", "invoice.get", |q: Query| async move {
            Ok::<_, String>(intracom::bson::doc! { "invoice": q.invoice, "total": 12.5 })
        })
        .unwrap();
    let answered = on
        .run(&[
            "request",
            "billing",
            "invoice.get",
            "--from",
            "web",
            "--body",
            r#"{"invoice": 42}"#,
            "--timeout",
            "30s",
        ])
        .await;
    assert!(answered.status.success(), "{}", stderr(&answered));
    assert!(
        stdout(&answered).contains(r#""total":12.5"#),
        "{}",
        stdout(&answered)
    );

    let stats = on.run(&["stats"]).await;
    assert!(stats.status.success(), "{}", stderr(&stats));
    let text = stdout(&stats);
    assert!(text.contains("medium: mqtt"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("billing") && l.trim_end().ends_with('1')),
        "one billing worker present: {text}"
    );
    assert!(text.contains("dead letters: 0"), "{text}");
    assert!(text.contains("not available on MQTT"), "{text}");

    let since = on.run(&["tail", "--since", "10m"]).await;
    assert!(!since.status.success());
    assert!(stderr(&since).contains("history"), "{}", stderr(&since));
    billing.shutdown().await;
}

async fn cli_dead_lists_shows_retries_and_purges_on_mqtt() {
    let on = On::new();
    let billing = on.bus("billing", "billing-1").await;
    let _worker = billing
        .work(
            "billing",
            &["invoice.render"],
            WorkOptions::default().max_attempts(1),
            |_m: Message| async move { Err::<(), _>("printer on fire") },
        )
        .unwrap();
    let job = billing
        .publish(Message::to_service("billing", "invoice.render").work())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + HANG_GUARD;
    let listed = loop {
        let listed = on.run(&["dead", "list"]).await;
        assert!(listed.status.success(), "{}", stderr(&listed));
        if stdout(&listed).contains(&job.id) {
            break stdout(&listed);
        }
        assert!(tokio::time::Instant::now() < deadline, "no dead letter");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(listed.contains("printer on fire"), "{listed}");
    let shown = on.run(&["dead", "show", &job.id]).await;
    assert!(
        stdout(&shown).contains("invoice.render"),
        "{}",
        stdout(&shown)
    );
    let retried = on.run(&["dead", "retry", &job.id]).await;
    assert!(retried.status.success(), "{}", stderr(&retried));
    assert!(
        stdout(&retried).contains("sent again as"),
        "{}",
        stdout(&retried)
    );
    let purged = on.run(&["dead", "purge", &job.id]).await;
    assert!(
        stdout(&purged).contains("removed 0"),
        "retry removed it: {}",
        stdout(&purged)
    );
    // The retried job fails again and lands in the dead letters; purge them all.
    let deadline = tokio::time::Instant::now() + HANG_GUARD;
    loop {
        if !billing.dead_letters().list(10).await.unwrap().is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the retried job failed again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let purged = on.run(&["dead", "purge", "--all"]).await;
    assert!(stdout(&purged).contains("removed 1"), "{}", stdout(&purged));
    let empty = on.run(&["dead", "list"]).await;
    assert_eq!(stdout(&empty).trim(), "");
    billing.shutdown().await;
}
