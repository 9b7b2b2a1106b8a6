//! The dead letters: messages that could not be delivered or done, kept with the reason.
//!
//! Why it exists: a bus that drops what it cannot handle loses data silently. Work that
//! used up its attempts, documents that are not readable messages, and messages whose
//! action the catalog does not declare all land here (the `dead` collection on
//! MongoDB), where an operator can list and inspect them, send one again, or purge them.

use crate::bus::{Intracom, Published};
use crate::error::{Error, Result};
use crate::medium::DeadLetter;
use crate::message::{new_id, DeliveryMode, Message, State};

/// The dead letters of a bus; from [`Intracom::dead_letters`].
#[derive(Clone, Debug)]
pub struct DeadLetters {
    bus: Intracom,
}

impl DeadLetters {
    /// The oldest dead letters, at most `limit` (none for 0).
    pub async fn list(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        self.bus.medium().dead_list(limit).await
    }

    /// One dead letter by the id of its message.
    pub async fn get(&self, id: &str) -> Result<Option<DeadLetter>> {
        self.bus.medium().dead_get(id).await
    }

    /// Publishes the message again under a new id with `retryOf` naming the original
    /// (work starts over: pending, no attempts), then removes the dead letter. The new
    /// message goes through the same checks as any publish.
    pub async fn retry(&self, id: &str) -> Result<Published> {
        let letter = self
            .get(id)
            .await?
            .ok_or_else(|| Error::invalid(format!("no dead letter `{id}`")))?;
        let original: Message = bson::from_document(letter.document.clone()).map_err(|e| {
            Error::invalid(format!(
                "dead letter `{id}` is not a message and cannot be sent again: {e}"
            ))
        })?;
        let mut again = original;
        again.id = new_id();
        again.retry_of = Some(letter.id.clone());
        again.result = None;
        again.response = None;
        again.response_ts = None;
        again.last_error = None;
        again.state = (again.delivery == DeliveryMode::One).then_some(State::Pending);
        // Sent by this bus on behalf of the original sender.
        let published = self.bus.publish(again).await?;
        self.bus.medium().dead_remove(Some(&letter.id)).await?;
        tracing::info!(original = %letter.id, message_id = %published.id, "dead letter sent again");
        Ok(published)
    }

    /// Removes one dead letter, or all of them with `None`; returns how many.
    pub async fn purge(&self, id: Option<&str>) -> Result<u64> {
        self.bus.medium().dead_remove(id).await
    }
}

impl Intracom {
    /// The dead letters.
    pub fn dead_letters(&self) -> DeadLetters {
        DeadLetters { bus: self.clone() }
    }
}
