//! `intracom tail`.

use std::time::{SystemTime, UNIX_EPOCH};

use clap::Args;
use futures::StreamExt;
use intracom::bson::{Bson, Timestamp};
use intracom::{Config, MediumKind, Message, MessageType, Position, StartFrom, Subscription};

use super::open;
use crate::output::{fail, try_write_out, Failure, Outcome};

#[derive(Args)]
pub(crate) struct TailArgs {
    /// Only messages from or to this service.
    #[arg(long)]
    service: Option<String>,
    /// Only these actions (repeatable).
    #[arg(long)]
    action: Vec<String>,
    /// Only this type (broadcast, fire_and_forget, async, sync, response).
    #[arg(long = "type", value_name = "TYPE")]
    kind: Option<String>,
    /// Only this state (pending, done, error) as published.
    #[arg(long)]
    state: Option<String>,
    /// Start in the past: a duration (`10m`), a time (`2026-11-24T07:00:00Z`) or a
    /// position (`<seconds>:<increment>`, a BSON Timestamp).
    #[arg(long)]
    since: Option<String>,
    /// Stop after this many messages.
    #[arg(long)]
    count: Option<usize>,
    /// Print JSON (relaxed extended JSON, one message per line).
    #[arg(long)]
    json: bool,
    /// Follow as this named subscription: resume after its checkpoint (--since applies
    /// only when it has none yet) and ack each message once it is printed, so that the
    /// next `tail --name` goes on after the last message printed. At least once: on
    /// MongoDB, a checkpoint saved while catching up from the collection (--since, or
    /// after falling behind) resumes with a look-back of
    /// common.intracom.db.safety_window_ms, and the messages of that window before it
    /// come again. Acking moves the checkpoint: give tail a name of its own, not the
    /// name of a service's subscription.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
}

/// Where `tail` reads, for its first line.
pub(crate) fn source(config: &Config) -> String {
    match config.medium {
        MediumKind::Mqtt => format!("{}/# on {}", config.mqtt.topic_prefix, config.mqtt.url),
        MediumKind::Http => format!("the gateway at {}", config.http.urls.join(", ")),
        _ => format!("{} on {}", config.db.messages, config.db.redacted_uri()),
    }
}

pub(crate) fn parse_since(since: &str) -> Result<StartFrom, Failure> {
    let hint = "--since takes a duration (10m), a time (2026-11-24T07:00:00Z) or a position (1795500000:3)";
    let secs = if let Some((t, i)) = since
        .split_once(':')
        .filter(|(t, _)| t.chars().all(|c| c.is_ascii_digit()))
    {
        let time = t
            .parse()
            .map_err(|_| fail(format!("bad position `{since}`"), hint))?;
        let increment = i
            .parse()
            .map_err(|_| fail(format!("bad position `{since}`"), hint))?;
        return Ok(StartFrom::After(Position::new(
            Timestamp { time, increment },
            None,
        )));
    } else if let Ok(ago) = humantime::parse_duration(since) {
        SystemTime::now().checked_sub(ago).unwrap_or(UNIX_EPOCH)
    } else if let Ok(at) = humantime::parse_rfc3339_weak(since) {
        at
    } else {
        return Err(fail(format!("cannot read --since `{since}`"), hint));
    };
    let time = secs
        .duration_since(UNIX_EPOCH)
        .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
        .unwrap_or(0);
    // Just before the first message of that second.
    Ok(StartFrom::After(Position::new(
        Timestamp {
            time: time.saturating_sub(1),
            increment: u32::MAX,
        },
        None,
    )))
}

pub(crate) fn line(message: &Message) -> String {
    let at = message
        .at
        .map(|a| a.try_to_rfc3339_string().unwrap_or_default())
        .unwrap_or_default();
    let to = match (&message.dest_service, &message.dest_instance) {
        (None, _) => "*".to_string(),
        (Some(s), None) => s.clone(),
        (Some(s), Some(i)) => format!("{s}/{i}"),
    };
    let state = message
        .state
        .map(|s| format!(" [{}]", format!("{s:?}").to_lowercase()))
        .unwrap_or_default();
    format!(
        "{at}  {}/{} -> {to}  {} {}{state}  {}  ({})",
        message.source_service,
        message.source_instance,
        message.kind.as_str(),
        message.action,
        Bson::Document(message.query.clone()).into_relaxed_extjson(),
        message.id
    )
}

pub(crate) fn json(message: &Message) -> String {
    match intracom::bson::to_bson(message) {
        Ok(b) => b.into_relaxed_extjson().to_string(),
        Err(e) => format!("{{\"error\": \"{e}\"}}"),
    }
}

pub(crate) async fn tail(config: &Config, args: TailArgs) -> Outcome {
    let kind: Option<MessageType> = args.kind.as_deref().map(str::parse).transpose()?;
    let start = args
        .since
        .as_deref()
        .map(parse_since)
        .transpose()?
        .unwrap_or_default();
    let bus = open(config, "tail").await?;
    let mut subscription = Subscription::monitor().start(start);
    if let Some(name) = &args.name {
        subscription = subscription.with_name(name);
    }
    let mut sub = bus.subscribe(subscription).await?;
    if !args.json {
        match &args.name {
            Some(name) => eprintln!(
                "following {} as subscription `{name}` (Ctrl-C to stop)",
                source(config)
            ),
            None => eprintln!("following {} (Ctrl-C to stop)", source(config)),
        }
    }
    let mut shown = 0;
    let outcome = loop {
        let item = tokio::select! {
            item = sub.next() => item,
            _ = tokio::signal::ctrl_c() => break Ok(()),
        };
        let Some(item) = item else { break Ok(()) };
        let delivery = match item {
            Ok(d) => d,
            Err(e) if e.is_report() => {
                eprintln!("note: {e}");
                continue;
            }
            Err(e) => break Err(e.into()),
        };
        let m = delivery.message();
        let wanted = args
            .service
            .as_ref()
            .is_none_or(|s| m.source_service == *s || m.dest_service.as_ref() == Some(s))
            && (args.action.is_empty() || args.action.contains(&m.action))
            && kind.is_none_or(|k| m.kind == k)
            && args.state.as_ref().is_none_or(|s| {
                m.state.map(|x| format!("{x:?}").to_lowercase()).as_deref() == Some(s.as_str())
            });
        if wanted {
            let text = if args.json { json(m) } else { line(m) };
            match try_write_out(format_args!("{text}\n")) {
                Ok(true) => {}
                // The reader has gone (`| head`): this one was not printed, so not acked.
                Ok(false) => break Ok(()),
                Err(e) => {
                    break Err(fail(
                        format!("cannot write the output: {e}"),
                        "check where stdout goes",
                    ))
                }
            }
        }
        // A message passed over by the filters is acked too: the checkpoint of a named
        // subscription cannot move past a message left unacked. (Without a name, acks
        // do nothing.)
        if let Err(e) = delivery.ack().await {
            break Err(e.into());
        }
        if wanted {
            shown += 1;
            if args.count.is_some_and(|c| shown >= c) {
                break Ok(());
            }
        }
    };
    drop(sub);
    bus.shutdown().await;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_reads_durations_times_and_positions() {
        let StartFrom::After(p) = parse_since("1795500000:3").ok().unwrap() else {
            panic!()
        };
        assert_eq!(
            p.ts,
            Timestamp {
                time: 1_795_500_000,
                increment: 3
            }
        );
        let StartFrom::After(p) = parse_since("2026-11-24T07:00:00Z").ok().unwrap() else {
            panic!()
        };
        assert_eq!(p.ts.time, 1_795_503_600 - 1);
        assert!(matches!(parse_since("10m"), Ok(StartFrom::After(_))));
        assert!(parse_since("yesterday-ish").is_err());
    }
}
