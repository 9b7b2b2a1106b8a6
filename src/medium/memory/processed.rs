//! Idempotency records, kept in memory.

use std::time::Duration;

use async_trait::async_trait;
use bson::Document;

use crate::error::Result;
use crate::medium::{Records, Reservation};

use super::MemoryMedium;

#[async_trait]
impl Records for MemoryMedium {
    async fn processed_reserve(
        &self,
        consumer: &str,
        id: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<Reservation> {
        Ok(self.shared.processed.reserve(consumer, id, owner, lease))
    }

    async fn processed_complete(
        &self,
        consumer: &str,
        id: &str,
        owner: &str,
        result: Option<Document>,
    ) -> Result<()> {
        if self.shared.processed.complete(consumer, id, owner, result) {
            Ok(())
        } else {
            Err(crate::Error::ReservationLost {
                consumer: consumer.to_string(),
                id: id.to_string(),
            })
        }
    }

    async fn processed_release(&self, consumer: &str, id: &str, owner: &str) -> Result<()> {
        self.shared.processed.release(consumer, id, owner);
        Ok(())
    }
}
