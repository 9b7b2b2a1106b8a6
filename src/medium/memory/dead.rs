//! The dead letters the memory medium keeps.

use async_trait::async_trait;
use bson::Document;

use crate::error::Result;
use crate::medium::{DeadLetter, DeadLetterStore};

use super::{lock, MemoryMedium};

#[async_trait]
impl DeadLetterStore for MemoryMedium {
    async fn dead_letter(&self, document: Document, reason: String) -> Result<()> {
        let id = crate::medium::id_of(&document);
        let mut dead = lock(&self.shared.dead);
        if !dead.iter().any(|d| d.id == id) {
            dead.push_back(DeadLetter {
                id,
                document,
                reason,
                at: Some(bson::DateTime::now()),
            });
            while dead.len() > self.shared.options.max_messages {
                dead.pop_front();
            }
        }
        Ok(())
    }

    async fn dead_list(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        Ok(lock(&self.shared.dead)
            .iter()
            .take(limit)
            .cloned()
            .collect())
    }

    async fn dead_get(&self, id: &str) -> Result<Option<DeadLetter>> {
        Ok(lock(&self.shared.dead).iter().find(|d| d.id == id).cloned())
    }

    async fn dead_remove(&self, id: Option<&str>) -> Result<u64> {
        let mut dead = lock(&self.shared.dead);
        let before = dead.len();
        match id {
            Some(id) => dead.retain(|d| d.id != id),
            None => dead.clear(),
        }
        Ok((before - dead.len()) as u64)
    }
}

impl MemoryMedium {
    /// The dead letters kept, oldest first.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        lock(&self.shared.dead).iter().cloned().collect()
    }
}
