//! The topic layout of the MQTT medium, and the rules MQTT puts on topic names.
//!
//! Why it exists: every pattern of the bus maps to topics (see the table in the module
//! docs of [`super`]); publishers, followers, workers and the admin reads must agree on
//! them, and a name that MQTT forbids must be refused before anything is sent.

use rumqttc::v5::mqttbytes::v5::Filter as TopicFilter;
use rumqttc::v5::mqttbytes::QoS;

use crate::error::{Error, Result};
use crate::filter::Filter;
use crate::message::{DeliveryMode, Message, State};

/// The topics of one bus (one topic prefix).
#[derive(Clone, Debug)]
pub(crate) struct Topics {
    prefix: String,
}

/// Checks one topic level made of a name (service, instance, action, id).
pub(crate) fn check_level(field: &str, value: &str) -> Result<()> {
    let rule = if value.contains('+') || value.contains('#') {
        Some("`+` and `#` are wildcards, not allowed in an MQTT topic name (MQTT 5 §4.7.1)")
    } else if value.contains('\0') {
        Some("NUL is not allowed in an MQTT topic (MQTT 5 §1.5.4)")
    } else if value.contains('/') {
        Some("`/` separates MQTT topic levels, so it cannot be part of a name")
    } else if value.is_empty() {
        Some("an empty name would make an empty topic level")
    } else {
        None
    };
    match rule {
        Some(rule) => Err(Error::invalid(format!(
            "`{field}` is `{}`: {rule}",
            value.escape_debug()
        ))),
        None => Ok(()),
    }
}

impl Topics {
    pub(crate) fn new(prefix: &str) -> Self {
        Topics {
            prefix: prefix.to_string(),
        }
    }

    /// The topic a message is published to; refuses names MQTT forbids.
    pub(crate) fn for_message(&self, message: &Message) -> Result<String> {
        let p = &self.prefix;
        check_level("action", &message.action)?;
        if let Some(service) = &message.dest_service {
            check_level("serviceNameDest", service)?;
        }
        if let Some(instance) = &message.dest_instance {
            check_level("instanceDest", instance)?;
        }
        let action = &message.action;
        Ok(
            match (
                message.delivery,
                &message.dest_service,
                &message.dest_instance,
            ) {
                (DeliveryMode::One, None, _) => {
                    return Err(Error::invalid(
                        "work (`delivery: one`) needs a target service (`serviceNameDest`)",
                    ))
                }
                (DeliveryMode::One, Some(service), _) => {
                    if message.state.unwrap_or(State::Pending) == State::Pending {
                        format!("{p}/work/{service}/{action}")
                    } else {
                        format!("{p}/done/{service}/{action}")
                    }
                }
                (_, None, _) => format!("{p}/all/{action}"),
                (_, Some(service), None) => format!("{p}/svc/{service}/{action}"),
                (_, Some(service), Some(instance)) => {
                    format!("{p}/inst/{service}/{instance}/{action}")
                }
            },
        )
    }

    /// The filters a follower subscribes to (the medium's own filter runs on top).
    pub(crate) fn for_filter(&self, filter: &Filter) -> Result<Vec<TopicFilter>> {
        let p = &self.prefix;
        let Some(service) = &filter.service else {
            // A monitor sees every message (not the catalog, dead letters or fences).
            return Ok(["all/#", "svc/#", "inst/#", "work/#", "done/#", "reply/#"]
                .iter()
                .map(|t| qos1(format!("{p}/{t}")))
                .collect());
        };
        check_level("service", service)?;
        let actions: Vec<String> = match &filter.actions {
            Some(actions) => {
                for action in actions {
                    check_level("action", action)?;
                }
                actions.iter().cloned().collect()
            }
            None => vec!["+".to_string()],
        };
        let mut out = Vec::new();
        for action in &actions {
            if filter.work {
                out.push(qos1(format!("{p}/work/{service}/{action}")));
                continue;
            }
            out.push(qos1(format!("{p}/all/{action}")));
            out.push(qos1(format!("{p}/svc/{service}/{action}")));
            if let Some(instance) = &filter.instance {
                check_level("instance", instance)?;
                out.push(qos1(format!("{p}/inst/{service}/{instance}/{action}")));
            }
        }
        Ok(out)
    }

    /// The shared subscription of a service's workers for one action.
    pub(crate) fn work_share(&self, service: &str, action: &str) -> Result<TopicFilter> {
        check_level("service", service)?;
        check_level("action", action)?;
        Ok(qos1(format!(
            "$share/{service}/{}/work/{service}/{action}",
            self.prefix
        )))
    }

    /// Where the outcomes of this connection's requests come back.
    pub(crate) fn reply(&self, client_id: &str) -> String {
        format!("{}/reply/{}", self.prefix, sanitize(client_id))
    }

    /// A topic only this connection subscribes to, to fence the broker's queue.
    pub(crate) fn fence(&self, client_id: &str) -> String {
        format!("{}/fence/{}", self.prefix, sanitize(client_id))
    }

    /// A retained catalog entry: the service alone, or one of its actions.
    pub(crate) fn catalog(&self, service: &str, action: Option<&str>) -> Result<String> {
        check_level("service", service)?;
        Ok(match action {
            Some(action) => {
                check_level("action", action)?;
                format!("{}/catalog/{service}/{action}", self.prefix)
            }
            None => format!("{}/catalog/{service}", self.prefix),
        })
    }

    pub(crate) fn catalog_all(&self) -> String {
        format!("{}/catalog/#", self.prefix)
    }

    /// Reads `(service, action)` back from a catalog topic.
    pub(crate) fn parse_catalog<'a>(&self, topic: &'a str) -> Option<(&'a str, Option<&'a str>)> {
        let rest = topic
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix("/catalog/")?;
        Some(match rest.split_once('/') {
            Some((service, action)) => (service, Some(action)),
            None => (rest, None),
        })
    }

    /// A retained dead letter.
    pub(crate) fn dead(&self, id: &str) -> Result<String> {
        check_level("id", id)?;
        Ok(format!("{}/dead/{id}", self.prefix))
    }

    pub(crate) fn dead_all(&self) -> String {
        format!("{}/dead/+", self.prefix)
    }

    /// The retained presence of one worker connection (deleted by its will).
    pub(crate) fn worker(&self, service: &str, client_id: &str) -> Result<String> {
        check_level("service", service)?;
        Ok(format!(
            "{}/workers/{service}/{}",
            self.prefix,
            sanitize(client_id)
        ))
    }

    pub(crate) fn workers_all(&self) -> String {
        format!("{}/workers/#", self.prefix)
    }

    /// Reads `(service, worker)` back from a presence topic.
    pub(crate) fn parse_worker<'a>(&self, topic: &'a str) -> Option<(&'a str, &'a str)> {
        topic
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix("/workers/")?
            .split_once('/')
    }

    /// Which kind of topic this is, by its second part.
    pub(crate) fn kind<'a>(&self, topic: &'a str) -> Option<&'a str> {
        let rest = topic
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix('/')?;
        Some(rest.split('/').next().unwrap_or_default())
    }
}

/// Whether `topic` matches the subscription filter `filter` (`+` one level, `#` the
/// rest).
pub(crate) fn matches(filter: &str, topic: &str) -> bool {
    let mut topic_levels = topic.split('/');
    for level in filter.split('/') {
        match (level, topic_levels.next()) {
            ("#", _) => return true,
            ("+", Some(_)) => {}
            (f, Some(t)) if f == t => {}
            _ => return false,
        }
    }
    topic_levels.next().is_none()
}

fn qos1(path: String) -> TopicFilter {
    TopicFilter::new(path, QoS::AtLeastOnce)
}

/// A client id as one topic level (client ids may hold any character).
pub(crate) fn sanitize(client_id: &str) -> String {
    client_id
        .chars()
        .map(|c| match c {
            '+' | '#' | '/' | '\0' => '_',
            c => c,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_pattern_has_its_topic() {
        let t = Topics::new("site/intracom");
        let mut m = Message::broadcast("reload");
        assert_eq!(t.for_message(&m).unwrap(), "site/intracom/all/reload");
        m = Message::to_service("billing", "invoice.created");
        assert_eq!(
            t.for_message(&m).unwrap(),
            "site/intracom/svc/billing/invoice.created"
        );
        m = Message::to_instance("billing", "billing-2", "reload");
        assert_eq!(
            t.for_message(&m).unwrap(),
            "site/intracom/inst/billing/billing-2/reload"
        );
        m = Message::to_service("billing", "invoice.render").work();
        assert_eq!(
            t.for_message(&m).unwrap(),
            "site/intracom/work/billing/invoice.render"
        );
        m.state = Some(State::Done);
        assert_eq!(
            t.for_message(&m).unwrap(),
            "site/intracom/done/billing/invoice.render"
        );
        assert_eq!(
            t.work_share("billing", "invoice.render").unwrap().path,
            "$share/billing/site/intracom/work/billing/invoice.render"
        );
        assert_eq!(
            t.parse_catalog("site/intracom/catalog/billing/reload"),
            Some(("billing", Some("reload")))
        );
    }

    #[test]
    fn filters_match_topics() {
        assert!(matches("a/dead/+", "a/dead/x"));
        assert!(!matches("a/dead/+", "a/dead/x/y"));
        assert!(matches("$SYS/broker/#", "$SYS/broker/clients/connected"));
        assert!(matches("a/dead/x", "a/dead/x"));
        assert!(!matches("a/dead/x", "a/dead/xy"));
    }

    #[test]
    fn names_mqtt_forbids_are_refused_with_the_rule() {
        let t = Topics::new("intracom");
        for (message, says) in [
            (Message::broadcast("a+b"), "wildcards"),
            (Message::to_service("bill#ing", "x"), "wildcards"),
            (Message::to_instance("billing", "b/1", "x"), "separates"),
            (Message::broadcast("a\0b"), "NUL"),
        ] {
            let e = t.for_message(&message).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
    }
}
