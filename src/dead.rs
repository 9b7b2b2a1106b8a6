//! The dead letters: messages that could not be delivered or done, kept with the reason.
//!
//! Why it exists: a bus that drops what it cannot handle loses data silently. Work that
//! used up its attempts, documents that are not readable messages, and messages whose
//! action the catalog does not declare all land here (the `dead` collection on
//! MongoDB), where an operator can list and inspect them, send one again, or purge them.

use crate::bus::{Intracom, Published};
use crate::error::{Error, Result};
use crate::medium::{DeadLetter, DeadLetterStore};
use crate::message::{DeliveryMode, Message, State};

/// The dead letters of a bus; from [`Intracom::dead_letters`].
#[derive(Clone, Debug)]
pub struct DeadLetters {
    bus: Intracom,
}

impl DeadLetters {
    /// The medium's dead letters ([`Error::Unsupported`] for a medium that keeps none).
    fn store(&self) -> Result<&dyn DeadLetterStore> {
        self.bus.medium().dead_letter_store_or_unsupported()
    }

    /// The oldest dead letters, at most `limit` (none for 0).
    pub async fn list(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        self.store()?.dead_list(limit).await
    }

    /// One dead letter by the id of its message.
    pub async fn get(&self, id: &str) -> Result<Option<DeadLetter>> {
        self.store()?.dead_get(id).await
    }

    /// Publishes the message again under a new id with `retryOf` naming the original
    /// (work starts over: pending, no attempts), then removes the dead letter. The new
    /// message goes through the same checks as any publish. No dead letter `id` is
    /// [`Error::InvalidMessage`]; [`DeadLetters::retry_if_present`] tells it apart.
    ///
    /// The new id is derived from the dead letter (its id and when it was
    /// dead-lettered): if the publish went through but the removal failed (the medium
    /// went away meanwhile), retrying again stores nothing new
    /// ([`crate::PublishStatus::Duplicate`]), and the work is not done twice.
    pub async fn retry(&self, id: &str) -> Result<Published> {
        self.retry_if_present(id)
            .await?
            .ok_or_else(|| Error::invalid(format!("no dead letter `{id}`")))
    }

    /// [`DeadLetters::retry`], with `None` when there is no dead letter `id` (one
    /// lookup: a dead letter removed meanwhile is `None`, not an error).
    pub async fn retry_if_present(&self, id: &str) -> Result<Option<Published>> {
        let Some(letter) = self.get(id).await? else {
            return Ok(None);
        };
        let original: Message = bson::from_document(letter.document.clone()).map_err(|e| {
            Error::invalid(format!(
                "dead letter `{id}` is not a message and cannot be sent again: {e}"
            ))
        })?;
        let mut again = original;
        again.id = retry_id(&letter);
        again.retry_of = Some(letter.id.clone());
        again.result = None;
        again.response = None;
        again.response_ts = None;
        again.last_error = None;
        again.state = (again.delivery == DeliveryMode::One).then_some(State::Pending);
        // Sent by this bus on behalf of the original sender.
        let published = self.bus.publish(again).await?;
        self.store()?.dead_remove(Some(&letter.id)).await?;
        tracing::info!(original = %letter.id, message_id = %published.id, status = ?published.status, "dead letter sent again");
        Ok(Some(published))
    }

    /// Removes one dead letter, or all of them with `None`; returns how many.
    pub async fn purge(&self, id: Option<&str>) -> Result<u64> {
        self.store()?.dead_remove(id).await
    }
}

/// The id of the message that sends `letter` again: a ULID whose time part is when the
/// letter was dead-lettered and whose 80 other bits are a hash (FNV-1a) of the original
/// id. The same dead letter always gives the same id; the same message dead-lettered
/// again later gives another.
fn retry_id(letter: &DeadLetter) -> String {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    let hash = letter.id.bytes().fold(OFFSET, |hash, byte| {
        (hash ^ u128::from(byte)).wrapping_mul(PRIME)
    });
    let ms = letter
        .at
        .map_or(0, |at| u64::try_from(at.timestamp_millis()).unwrap_or(0));
    ulid::Ulid::from_parts(ms, hash).to_string()
}

impl Intracom {
    /// The dead letters.
    pub fn dead_letters(&self) -> DeadLetters {
        DeadLetters { bus: self.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(id: &str, at: i64) -> DeadLetter {
        DeadLetter {
            id: id.into(),
            document: bson::Document::new(),
            reason: "failed".into(),
            at: Some(bson::DateTime::from_millis(at)),
        }
    }

    #[test]
    fn a_dead_letter_is_sent_again_under_one_id() {
        let id = retry_id(&letter("01JABCDEF", 1_795_500_000_000));
        assert_eq!(id, retry_id(&letter("01JABCDEF", 1_795_500_000_000)));
        assert_ne!(id, retry_id(&letter("01JABCDEG", 1_795_500_000_000)));
        assert_ne!(id, retry_id(&letter("01JABCDEF", 1_795_500_000_001)));
        crate::message::check_name("id", &id).unwrap();
        assert_eq!(
            ulid::Ulid::from_string(&id).unwrap().timestamp_ms(),
            1_795_500_000_000
        );
    }
}
