//! `intracom config`.

use intracom::Config;

use crate::output::{redact, Outcome};

pub(crate) fn print_config(config: &Config) -> Outcome {
    out!("common.intracom.medium={}", config.medium);
    out!("common.intracom.timeout_ms={}", config.timeout_ms);
    out!("common.intracom.service={}", config.service);
    out!(
        "common.intracom.max_message_bytes={}",
        config.max_message_bytes
    );
    out!(
        "common.intracom.memory.max_messages={}",
        config.memory_max_messages
    );
    out!(
        "common.intracom.request_timeout_ms={}",
        config.request_timeout_ms
    );
    out!(
        "common.intracom.outbox.max_messages={}",
        config.outbox_max_messages
    );
    if let Some(file) = &config.outbox_file {
        out!("common.intracom.outbox.file={}", file.display());
    }
    let db = &config.db;
    out!("common.intracom.db.uri={}", redact(&db.uri));
    out!("common.intracom.db.database={}", db.database);
    for (role, name) in [
        ("messages", &db.messages),
        ("config", &db.config),
        ("checkpoints", &db.checkpoints),
        ("processed", &db.processed),
        ("dead", &db.dead),
    ] {
        out!("common.intracom.db.collection.{role}={name}");
    }
    let retention = match db.retention {
        intracom::Retention::Capped => "capped",
        _ => "ttl",
    };
    out!("common.intracom.db.retention={retention}");
    out!("common.intracom.db.capped_bytes={}", db.capped_bytes);
    out!(
        "common.intracom.db.poll_interval_ms={}",
        db.poll_interval_ms
    );
    out!(
        "common.intracom.db.safety_window_ms={}",
        db.safety_window_ms
    );
    out!("common.intracom.db.stream_buffer={}", db.stream_buffer);
    let mqtt = &config.mqtt;
    out!("common.intracom.mqtt.url={}", mqtt.url);
    out!(
        "common.intracom.mqtt.client_id_prefix={}",
        mqtt.client_id_prefix
    );
    if let Some(user) = &mqtt.username {
        out!("common.intracom.mqtt.username={user}");
    }
    if mqtt.password.is_some() {
        out!("common.intracom.mqtt.password=***");
    }
    out!("common.intracom.mqtt.keep_alive_ms={}", mqtt.keep_alive_ms);
    out!("common.intracom.mqtt.topic_prefix={}", mqtt.topic_prefix);
    out!(
        "common.intracom.mqtt.session_expiry_ms={}",
        mqtt.session_expiry_ms
    );
    if let Some(ca) = &mqtt.ca_file {
        out!("common.intracom.mqtt.ca_file={}", ca.display());
    }
    let senders: Vec<&str> = config.senders.keys().map(String::as_str).collect();
    out!("common.intracom.senders.list={}", senders.join(","));
    for (service, actions) in &config.senders {
        out!("common.intracom.actions.{service}={}", actions.join(","));
    }
    for (action, options) in &config.work {
        if let Some(lease) = options.lease {
            out!(
                "common.intracom.work.{action}.lease_ms={}",
                lease.as_millis()
            );
        }
        if let Some(backoff) = options.backoff {
            out!(
                "common.intracom.work.{action}.backoff_ms={}",
                backoff.as_millis()
            );
        }
        if let Some(attempts) = options.max_attempts {
            out!("common.intracom.work.{action}.max_attempts={attempts}");
        }
    }
    Ok(())
}
