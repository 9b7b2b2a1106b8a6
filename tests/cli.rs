//! The `intracom` command on the memory medium: no server needed.

use assert_cmd::Command;

fn intracom() -> Command {
    let mut cmd = Command::cargo_bin("intracom").expect("the intracom binary");
    // A clean environment: no config file, no overrides from the machine.
    cmd.env_remove("INTRACOM_CONFIG");
    for (key, _) in std::env::vars() {
        if key.starts_with("COMMON_INTRACOM_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn demo_shows_the_four_patterns() {
    let output = intracom().arg("demo").output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let out = stdout(&output);
    for expected in [
        "billing-1  got `reload`",
        "users-1    got `reload`",
        "mailer-a   got `reload`",
        "got `user.deleted` from users (fire_and_forget)",
        "got invoice 42 for 99.50",
        "sent mail to alice@example.com",
        "sent mail to bob@example.com",
        "will retry",
        "sent mail to carol@example.com (attempt 2)",
    ] {
        assert!(out.contains(expected), "missing `{expected}` in:\n{out}");
    }
}

#[test]
fn every_command_has_help() {
    for args in [
        vec!["--help"],
        vec!["tail", "--help"],
        vec!["publish", "--help"],
        vec!["request", "--help"],
        vec!["catalog", "--help"],
        vec!["catalog", "add", "--help"],
        vec!["stats", "--help"],
        vec!["dead", "--help"],
        vec!["dead", "purge", "--help"],
        vec!["doctor", "--help"],
        vec!["demo", "--help"],
    ] {
        let output = intracom().args(&args).output().unwrap();
        assert!(output.status.success(), "{args:?}: {}", stderr(&output));
        assert!(stdout(&output).contains("Usage: intracom"), "{args:?}");
    }
}

#[test]
fn bad_config_names_the_key_and_exits_non_zero() {
    let output = intracom()
        .env("COMMON_INTRACOM_MEDIUM", "kafka")
        .arg("config")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(
        err.contains("common.intracom.medium") && err.contains("kafka"),
        "{err}"
    );
    assert!(err.contains("hint:"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("service.properties");
    std::fs::write(&file, "common.intracom.timeout_ms=soon\n").unwrap();
    let output = intracom()
        .arg("--config")
        .arg(&file)
        .arg("config")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("common.intracom.timeout_ms"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn config_prints_what_the_library_resolves() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("service.properties");
    std::fs::write(
        &file,
        "common.intracom.senders.list=custom1\ncommon.intracom.actions.custom1=load,clear\n",
    )
    .unwrap();
    let output = intracom()
        .env("INTRACOM_CONFIG", &file)
        .env("COMMON_INTRACOM_TIMEOUT_MS", "1000")
        .env("COMMON_INTRACOM_DB_URI", "mongodb://app:secret@db:27017")
        .arg("config")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let out = stdout(&output);
    assert!(out.contains("common.intracom.timeout_ms=1000"), "{out}");
    assert!(
        out.contains("common.intracom.actions.custom1=load,clear"),
        "{out}"
    );
    assert!(
        out.contains("mongodb://app:***@db:27017") && !out.contains("secret"),
        "{out}"
    );
}

#[test]
fn commands_that_need_a_database_say_so_on_the_memory_medium() {
    for args in [
        vec!["stats"],
        vec!["tail"],
        vec!["dead", "list"],
        vec!["doctor"],
    ] {
        let output = intracom().args(&args).output().unwrap();
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        let err = stderr(&output);
        assert!(
            err.contains("needs a shared medium") && err.contains("--uri"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn bad_arguments_are_one_line_with_a_hint() {
    let output = intracom()
        .args([
            "publish",
            "reload",
            "--from",
            "billing",
            "--body",
            "{not json",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(err.starts_with("error: --body is not JSON"), "{err}");
    assert!(err.contains("hint:"), "{err}");
    let output = intracom()
        .args([
            "tail",
            "--since",
            "whenever",
            "--uri",
            "mongodb://127.0.0.1:1",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("--since"), "{}", stderr(&output));
    let output = intracom().arg("no-such-command").output().unwrap();
    assert_eq!(output.status.code(), Some(2), "clap's usage error");
}

#[test]
fn an_unreachable_database_is_a_clear_error() {
    let output = intracom()
        .args([
            "stats",
            "--uri",
            "mongodb://127.0.0.1:1/?serverSelectionTimeoutMS=500&connectTimeoutMS=200",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(err.contains("unavailable"), "{err}");
    assert!(
        err.contains("hint: check that MongoDB is reachable"),
        "{err}"
    );
}

/// `--via-gateways` goes with `--processes` and names at least one gateway (the
/// arguments are refused before anything starts); the fleet, through gateways or not,
/// measures the MongoDB medium.
#[test]
fn bench_via_gateways_needs_processes_and_a_gateway() {
    let alone = intracom()
        .args(["bench", "--via-gateways", "2"])
        .output()
        .unwrap();
    assert!(!alone.status.success());
    assert!(stderr(&alone).contains("--processes"), "{}", stderr(&alone));
    let none = intracom()
        .args(["bench", "--processes", "1", "--via-gateways", "0"])
        .output()
        .unwrap();
    assert!(!none.status.success());
    assert!(
        stderr(&none).contains("--via-gateways"),
        "{}",
        stderr(&none)
    );
    let memory = intracom()
        .args(["bench", "--processes", "1", "--via-gateways", "1"])
        .output()
        .unwrap();
    assert!(!memory.status.success());
    assert!(
        stderr(&memory).contains("measure the MongoDB medium"),
        "{}",
        stderr(&memory)
    );
}

/// `intracom bench --tiny` on the memory medium: runs its figures and prints the table;
/// `--json` parses. No figure is judged (timing belongs to the bench).
#[test]
fn bench_runs_once_with_tiny_sizes_on_memory() {
    let output = intracom().args(["bench", "--tiny"]).output().unwrap();
    let out = stdout(&output);
    assert!(output.status.success(), "{out}\n{}", stderr(&output));
    assert!(out.contains("medium memory"), "{out}");
    assert!(out.contains("tokio::sync::broadcast"), "{out}");
    let output = intracom()
        .args(["bench", "--tiny", "--json"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("--json prints one JSON document");
    assert_eq!(report["medium"], "memory");
    assert!(
        !report["figures"].as_array().expect("figures").is_empty(),
        "{report}"
    );
}

#[test]
fn help_ends_with_examples_and_the_environment() {
    let output = intracom().arg("--help").output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let out = stdout(&output);
    let commands = out.find("Commands:").expect("the commands");
    let examples = out.find("Examples:").expect("examples after the options");
    let environment = out.find("Environment:").expect("the environment");
    assert!(commands < examples && examples < environment, "{out}");
    for name in [
        "intracom tail --name",
        "INTRACOM_CONFIG",
        "COMMON_INTRACOM_DB_URI",
        "INTRACOM_LOG",
    ] {
        assert!(
            out[environment.min(examples)..].contains(name),
            "`{name}` in:\n{out}"
        );
    }
}

/// The output of these commands, read by a process that has already gone away (as
/// `intracom config | head -1` leaves it): each ends with status 0 and says nothing.
#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    for args in [
        vec!["config"],
        vec!["demo"],
        vec!["--help"],
        vec!["tail", "--help"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let mut cmd = std::process::Command::new(assert_cmd::cargo::cargo_bin("intracom"));
        cmd.env_remove("INTRACOM_CONFIG");
        for (key, _) in std::env::vars() {
            if key.starts_with("COMMON_INTRACOM_") {
                cmd.env_remove(key);
            }
        }
        let output = cmd
            .args(&args)
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let err = stderr(&output);
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe"),
            "{args:?}: {err}"
        );
        assert_eq!(output.status.code(), Some(0), "{args:?}: {err}");
    }
}

/// A build without the gateway, asked to serve, names the feature to build with.
#[cfg(not(feature = "gateway"))]
#[test]
fn serve_without_the_gateway_names_the_feature() {
    for args in [
        vec!["serve"],
        vec!["serve", "--listen", "127.0.0.1:0", "--tokens", "t"],
        vec!["token", "new", "--admin"],
    ] {
        let output = intracom().args(&args).output().unwrap();
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        let err = stderr(&output);
        assert!(
            err.contains("without the HTTP gateway")
                && err.contains("cargo install intracom --features gateway"),
            "{args:?}: {err}"
        );
    }
}

/// A build without MQTT, asked for it by flag or by configuration, names the feature.
#[cfg(not(feature = "mqtt"))]
#[test]
fn mqtt_without_the_feature_names_it() {
    let by_flag = intracom()
        .args(["--medium", "mqtt", "tail"])
        .output()
        .unwrap();
    let by_config = intracom()
        .env("COMMON_INTRACOM_MEDIUM", "mqtt")
        .arg("stats")
        .output()
        .unwrap();
    for output in [by_flag, by_config] {
        assert_eq!(output.status.code(), Some(1));
        let err = stderr(&output);
        assert!(
            err.contains("without the MQTT medium")
                && err.contains("cargo install intracom --features mqtt"),
            "{err}"
        );
    }
}
