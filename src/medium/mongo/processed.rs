//! Reading and removing idempotency records (`processed`) one at a time: the
//! idempotency store as the gateway serves it (`GET`/`DELETE /idempotency/{messageId}`).
//! Reserving and completing records is in `work.rs`.

use bson::doc;

use super::errors::to_error;
use super::Inner;
use crate::error::Result;
use crate::medium::ProcessedRecord;

pub(crate) async fn get(
    inner: &Inner,
    consumer: &str,
    id: &str,
) -> Result<Option<ProcessedRecord>> {
    let found = inner
        .processed
        .find_one(doc! { "consumer": consumer, "messageId": id })
        .await
        .map_err(to_error)?;
    Ok(found.map(|record| ProcessedRecord {
        consumer: consumer.to_string(),
        id: id.to_string(),
        done: record.get_str("state") != Ok("running"),
        result: record.get_document("result").ok().cloned(),
        at: record.get_datetime("at").ok().copied(),
    }))
}

pub(crate) async fn remove(inner: &Inner, consumer: &str, id: &str) -> Result<u64> {
    let removed = inner
        .processed
        .delete_one(doc! { "consumer": consumer, "messageId": id })
        .await
        .map_err(to_error)?;
    Ok(removed.deleted_count)
}
