//! `intracom stats`.

use std::sync::Arc;

use intracom::medium::BrokerReport;
use intracom::{Config, Intracom};

use super::open;
use crate::output::{fail, Outcome};

pub(crate) async fn stats(config: &Config, as_json: bool) -> Outcome {
    let bus = open(config, "stats").await?;
    let medium = Arc::clone(bus.medium());
    let Some(inspection) = medium.inspection() else {
        // A broker keeps no history to count: it tells what it can about itself.
        if let Some(broker) = medium.broker_report() {
            return mqtt_stats(config, bus, broker, as_json).await;
        }
        bus.shutdown().await;
        return Err(fail(
            format!("medium `{}` keeps no counts to show", medium.name()),
            "pass --uri mongodb://… or --medium mqtt --url mqtt://…",
        ));
    };
    let stats = inspection.stats().await?;
    bus.shutdown().await;
    if as_json {
        let pairs = |rows: &[(String, u64)]| {
            rows.iter()
                .map(|(k, n)| serde_json::json!({ "key": k, "count": n }))
                .collect::<Vec<_>>()
        };
        let lag: Vec<_> = stats
            .lag
            .iter()
            .map(|(n, m, s)| serde_json::json!({ "subscription": n, "messages": m, "seconds": s }))
            .collect();
        out!(
            "{}",
            serde_json::json!({
                "total": stats.total, "by_service": pairs(&stats.by_service), "by_action": pairs(&stats.by_action),
                "by_type": pairs(&stats.by_type), "by_state": pairs(&stats.by_state),
                "queue_depth": stats.queue_depth, "dead": stats.dead, "lag": lag,
            })
        );
        return Ok(());
    }
    out!("messages retained: {}", stats.total);
    for (title, rows) in [
        ("by service", &stats.by_service),
        ("by action", &stats.by_action),
        ("by type", &stats.by_type),
        ("by state", &stats.by_state),
    ] {
        out!("{title}:");
        for (key, n) in rows.iter() {
            out!("  {key:<32} {n:>10}");
        }
    }
    out!("queue depth (pending work): {}", stats.queue_depth);
    out!("dead letters: {}", stats.dead);
    out!("subscription lag:");
    for (name, messages, seconds) in &stats.lag {
        out!("  {name:<32} {messages:>10} messages  {seconds:>6} s behind");
    }
    Ok(())
}

/// What an MQTT broker can tell: it keeps no history, so no counts by field or lag.
pub(crate) async fn mqtt_stats(
    config: &Config,
    bus: Intracom,
    medium: &dyn BrokerReport,
    as_json: bool,
) -> Outcome {
    let dead = bus.dead_letters().list(usize::MAX).await?.len();
    bus.catalog().refresh().await?;
    let services = bus.catalog().snapshot().len();
    let workers = medium.workers();
    let broker = medium.broker_stats().await?;
    let max_packet = medium.max_packet_size();
    bus.shutdown().await;
    let missing = "counts by service/action/type/state, queue depth and lag need a stored history, which a broker does not keep";
    if as_json {
        let workers: Vec<_> = workers
            .iter()
            .map(|w| serde_json::json!({ "service": w.service, "workers": w.connections }))
            .collect();
        let broker: serde_json::Map<String, serde_json::Value> = broker
            .iter()
            .map(|b| (b.topic.clone(), serde_json::Value::String(b.value.clone())))
            .collect();
        out!(
            "{}",
            serde_json::json!({
                "medium": "mqtt", "url": config.mqtt.url, "topic_prefix": config.mqtt.topic_prefix,
                "max_packet_size": max_packet, "services": services, "workers": workers,
                "dead": dead, "broker": broker, "not_available": missing,
            })
        );
        return Ok(());
    }
    out!(
        "medium: mqtt, {} (topics under {}/)",
        config.mqtt.url,
        config.mqtt.topic_prefix
    );
    match max_packet {
        Some(n) => out!("broker maximum packet size: {n} bytes"),
        None => out!("broker maximum packet size: not set (MQTT's 256 MB)"),
    }
    out!("services in the catalog: {services}");
    out!("workers present:");
    for w in &workers {
        out!("  {:<32} {:>10}", w.service, w.connections);
    }
    out!("dead letters: {dead}");
    if !broker.is_empty() {
        out!("broker ($SYS):");
        for b in &broker {
            out!("  {:<40} {}", b.topic, b.value);
        }
    }
    out!("not available on MQTT: {missing}");
    Ok(())
}
