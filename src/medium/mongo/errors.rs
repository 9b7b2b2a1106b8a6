//! How driver errors map onto intracom's errors.
//!
//! `mongodb::error::Error::is_network_error`, `code()` and `is_resumable` are private to
//! the driver, so classification reads `*err.kind` and the error labels.

use mongodb::error::{ErrorKind, WriteFailure};

use crate::error::Error;

/// The server does not know the command.
pub(crate) const COMMAND_NOT_FOUND: i32 = 59;
/// Duplicate key (a message with this `_id` exists).
pub(crate) const DUPLICATE_KEY: i32 = 11000;
/// Change stream history is gone: the resume point fell off the oplog.
pub(crate) const CHANGE_STREAM_HISTORY_LOST: i32 = 286;
/// The change stream cannot continue (e.g. the collection was dropped or renamed).
pub(crate) const CHANGE_STREAM_FATAL: i32 = 280;
/// The resume token is not valid for this collection or server.
pub(crate) const INVALID_RESUME_TOKEN: i32 = 260;
/// `$changeStream` on a standalone server: change streams need a replica set.
pub(crate) const CHANGE_STREAM_NOT_ON_STANDALONE: i32 = 40573;
/// The collection or index already exists (`NamespaceExists`).
pub(crate) const NAMESPACE_EXISTS: i32 = 48;
/// An index exists with other options (`IndexOptionsConflict`).
pub(crate) const INDEX_OPTIONS_CONFLICT: i32 = 85;
/// An index with the same name exists with another spec (`IndexKeySpecsConflict`): what
/// current servers answer when a TTL index is requested with a new `expireAfterSeconds`.
pub(crate) const INDEX_KEY_SPECS_CONFLICT: i32 = 86;

/// Server error codes that say "not now": no writable primary (an election, a step-down,
/// a shutdown), a host or network failure, a time limit. The driver's list of
/// retryable codes (the retryable reads and writes specifications). A command the
/// driver does not retry by itself (a raw `update`, a `findAndModify` without a
/// transaction number) reports them without the `RetryableWriteError` label.
pub(crate) const TRANSIENT_CODES: [i32; 13] = [
    11600, 11602, 10107, 13435, 13436, 189, 91, 7, 6, 89, 9001, 134, 262,
];

/// Whether a server error code says "not now" ([`TRANSIENT_CODES`]).
pub(crate) fn is_transient_code(code: i32) -> bool {
    TRANSIENT_CODES.contains(&code)
}

/// The server error code, if the error carries one.
pub(crate) fn code(err: &mongodb::error::Error) -> Option<i32> {
    match &*err.kind {
        ErrorKind::Command(c) => Some(c.code),
        ErrorKind::Write(WriteFailure::WriteError(w)) => Some(w.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => Some(w.code),
        _ => None,
    }
}

/// Whether the same operation may succeed later: network trouble, no reachable
/// primary, a pool cleared after a failure, a server error the driver labels as
/// retryable, or one whose code says "not now" ([`TRANSIENT_CODES`]).
pub(crate) fn is_transient(err: &mongodb::error::Error) -> bool {
    matches!(
        &*err.kind,
        ErrorKind::Io(_)
            | ErrorKind::ConnectionPoolCleared { .. }
            | ErrorKind::ServerSelection { .. }
    ) || code(err).is_some_and(is_transient_code)
        || err.contains_label("RetryableWriteError")
        || err.contains_label("ResumableChangeStreamError")
        || err.contains_label("TransientTransactionError")
}

/// Whether a change stream cannot be resumed from its token (its history is gone, the
/// token is invalid, or the stream is fatally broken): the follower must rebuild its
/// position from the messages collection.
pub(crate) fn is_history_lost(err: &mongodb::error::Error) -> bool {
    matches!(
        code(err),
        Some(CHANGE_STREAM_HISTORY_LOST | CHANGE_STREAM_FATAL | INVALID_RESUME_TOKEN)
    )
}

/// intracom's error for a driver error, which it keeps as its source.
pub(crate) fn to_error(err: mongodb::error::Error) -> Error {
    let transient = is_transient(&err);
    let reason = err.to_string();
    let source = Some(Box::new(err) as Box<dyn std::error::Error + Send + Sync>);
    if transient {
        Error::Unavailable {
            medium: "db",
            reason,
            source,
        }
    } else {
        Error::Medium {
            medium: "db",
            reason,
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use mongodb::error::{CommandError, ErrorKind};

    use super::*;

    fn command_error(code: i32) -> mongodb::error::Error {
        let command: CommandError = bson::from_document(bson::doc! {
            "code": code, "codeName": "Test", "errmsg": "test failure",
        })
        .expect("a command error");
        mongodb::error::Error::from(ErrorKind::Command(command))
    }

    #[test]
    fn a_server_refusal_keeps_the_driver_error_and_its_code() {
        let error = to_error(command_error(DUPLICATE_KEY));
        assert!(
            matches!(error, Error::Medium { medium: "db", .. }),
            "{error}"
        );
        assert!(!error.is_retryable());
        assert_eq!(error.server_code(), Some(DUPLICATE_KEY));
        assert!(error.driver_error().is_some());
        assert!(error.source().is_some());
        assert!(error.labels().is_empty());
        assert!(!error.has_label("RetryableWriteError"));
        assert!(error.to_string().contains("test failure"), "{error}");
    }

    #[test]
    fn a_transient_error_stays_retryable_with_its_source() {
        let error = to_error(command_error(11600));
        assert!(error.is_retryable(), "{error}");
        assert_eq!(error.server_code(), Some(11600));
        let io = to_error(mongodb::error::Error::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        )));
        assert!(
            matches!(io, Error::Unavailable { medium: "db", .. }),
            "{io}"
        );
        assert_eq!(io.server_code(), None);
        let driver = io.driver_error().expect("the driver's error");
        assert!(matches!(*driver.kind, ErrorKind::Io(_)));
    }

    #[test]
    fn errors_without_a_driver_error_have_no_code_or_labels() {
        let error = Error::unavailable("mqtt", "connection lost");
        assert!(error.driver_error().is_none());
        assert_eq!(error.server_code(), None);
        assert!(error.labels().is_empty());
        assert!(error.source().is_none());
    }
}
