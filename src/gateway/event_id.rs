//! SSE event ids: a position in the medium, signed by the gateway.
//!
//! Why it exists: an event id comes back from the client (`Last-Event-ID`, `?after=`),
//! so it is data the client controls. The gateway only decodes what it issued: each id
//! carries an HMAC-SHA256 tag under a key of the gateway's ([`EventKeys`]), checked
//! before a byte of the position is decoded, and its size is bounded before anything
//! is done with it. A forged, truncated, oversized or foreign id is refused with 400
//! `bad_event_id`; it never reaches the BSON decoder nor the medium. Gateways that serve
//! one bus share the keys (`--event-key-file`), so a client resumes on any of them and
//! after a restart.
//!
//! An id is `base64url(1 ‖ BSON of the position ‖ first 16 bytes of the HMAC)`, the
//! HMAC taken over the version byte and the BSON.

use std::fmt;
use std::path::Path;

use base64::Engine;
use bson::{RawBsonRef, RawDocument};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::error::{Error, Result};
use crate::filter::Position;

/// The longest event id accepted, in characters (an id the gateway issues is a few
/// hundred at most: a timestamp and a change-stream token).
pub const MAX_EVENT_ID_LEN: usize = 4096;

/// How deep a position's BSON may nest (a change-stream token is two levels).
const MAX_DEPTH: usize = 8;

/// The format version, first byte of every id.
const VERSION: u8 = 1;

/// Bytes of the HMAC kept in an id (128 bits).
const TAG_LEN: usize = 16;

/// The shortest key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// The keys that sign and verify event ids: the first signs, every one verifies (to
/// rotate: put the new key first, keep the old one until clients have moved on).
#[derive(Clone)]
pub struct EventKeys {
    macs: Vec<HmacSha256>,
    /// Made up at start-up: ids do not survive a restart nor pass to another gateway.
    ephemeral: bool,
}

impl fmt::Debug for EventKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventKeys")
            .field("keys", &self.macs.len())
            .field("ephemeral", &self.ephemeral)
            .finish()
    }
}

/// Why an event id was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BadEventId {
    /// Longer than [`MAX_EVENT_ID_LEN`].
    #[error("the event id is {0} characters long, over the limit of {MAX_EVENT_ID_LEN}")]
    TooLong(usize),
    /// Not base64url, or too short to hold a tag.
    #[error("the event id is not one this gateway issues (not base64url of a signed position)")]
    Malformed,
    /// The tag does not verify under any key.
    #[error("the event id was not issued by a gateway of this bus (its signature does not verify: forged, altered, or signed with another key)")]
    Forged,
    /// Signed, but not a position this version reads.
    #[error("the event id does not hold a position: {0}")]
    NotAPosition(String),
}

impl EventKeys {
    /// One random key, for a gateway that was given none: its ids stop verifying when
    /// it restarts, and another gateway does not take them.
    pub fn ephemeral() -> Self {
        let mut key = [0u8; 32];
        if getrandom::fill(&mut key).is_err() {
            // No random source (never on Linux): a key that still differs per process.
            use sha2::Digest;
            let seed = format!(
                "{:?} {} {:p}",
                std::time::SystemTime::now(),
                std::process::id(),
                &key
            );
            key = Sha256::digest(seed.as_bytes()).into();
        }
        EventKeys {
            macs: vec![mac_of(&key)],
            ephemeral: true,
        }
    }

    /// Keys from text: one per line (blank lines and `#` comments skipped), each at
    /// least [`MIN_KEY_LEN`] bytes, used as written (e.g. 32 random bytes in base64:
    /// `head -c 32 /dev/urandom | base64`). The first line signs.
    pub fn parse(text: &str) -> Result<Self> {
        let mut macs = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line.len() < MIN_KEY_LEN {
                return Err(Error::config(
                    format!("event key, line {}", number + 1),
                    "(hidden)",
                    format!(
                        "a key is at least {MIN_KEY_LEN} bytes (this one is {}): e.g. `head -c 32 /dev/urandom | base64`",
                        line.len()
                    ),
                ));
            }
            macs.push(mac_of(line.as_bytes()));
        }
        if macs.is_empty() {
            return Err(Error::config(
                "event key",
                "(empty)",
                "no key: one key per line, at least 32 bytes each",
            ));
        }
        Ok(EventKeys {
            macs,
            ephemeral: false,
        })
    }

    /// Keys from a file ([`EventKeys::parse`]).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        super::read_file(path.as_ref(), Self::parse)
    }

    /// Whether the keys were made up at start-up ([`EventKeys::ephemeral`]).
    pub fn is_ephemeral(&self) -> bool {
        self.ephemeral
    }

    /// The event id of `position`, signed with the first key.
    pub fn sign(&self, position: &Position) -> String {
        let mut bytes = vec![VERSION];
        // A position is a timestamp and a document: it always encodes.
        if let Ok(encoded) = bson::to_vec(position) {
            bytes.extend_from_slice(&encoded);
        }
        let tag = self.tag(&self.macs[0], &bytes);
        bytes.extend_from_slice(&tag[..TAG_LEN]);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    fn tag(&self, mac: &HmacSha256, message: &[u8]) -> [u8; 32] {
        let mut mac = mac.clone();
        mac.update(message);
        mac.finalize().into_bytes().into()
    }

    /// The position an event id holds, once its size, its encoding and its signature
    /// are checked (in that order: nothing is decoded before the signature verifies).
    pub fn verify(&self, id: &str) -> std::result::Result<Position, BadEventId> {
        let id = id.trim();
        if id.len() > MAX_EVENT_ID_LEN {
            return Err(BadEventId::TooLong(id.len()));
        }
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(id)
            .map_err(|_| BadEventId::Malformed)?;
        if bytes.len() < 1 + TAG_LEN + 5 || bytes[0] != VERSION {
            return Err(BadEventId::Malformed);
        }
        let (signed, tag) = bytes.split_at(bytes.len() - TAG_LEN);
        let verified = self.macs.iter().any(|mac| {
            let expected = self.tag(mac, signed);
            constant_time_eq(&expected[..TAG_LEN], tag)
        });
        if !verified {
            return Err(BadEventId::Forged);
        }
        let body = &signed[1..];
        check_depth(body, MAX_DEPTH).map_err(BadEventId::NotAPosition)?;
        bson::from_slice(body).map_err(|e| BadEventId::NotAPosition(e.to_string()))
    }
}

fn mac_of(key: &[u8]) -> HmacSha256 {
    <HmacSha256 as KeyInit>::new_from_slice(key)
        .expect("HMAC takes a key of any length (RFC 2104: a long one is hashed first)")
}

/// Equal, in a time that depends on the length only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Refuses a BSON document nested deeper than `max` levels, walking the raw bytes
/// without building anything: the depth of recursion here is bounded by `max`, so a
/// deeply nested input cannot overflow the stack (the decoder itself recurses once per
/// level).
pub(crate) fn check_depth(bytes: &[u8], max: usize) -> std::result::Result<(), String> {
    let document = RawDocument::from_bytes(bytes).map_err(|e| e.to_string())?;
    walk_document(document, max)
}

fn walk_document(document: &RawDocument, left: usize) -> std::result::Result<(), String> {
    if left == 0 {
        return Err("nested too deeply".into());
    }
    for element in document.iter() {
        let (_, value) = element.map_err(|e| e.to_string())?;
        walk_value(value, left - 1)?;
    }
    Ok(())
}

fn walk_value(value: RawBsonRef<'_>, left: usize) -> std::result::Result<(), String> {
    match value {
        RawBsonRef::Document(document) => walk_document(document, left),
        RawBsonRef::Array(array) => {
            if left == 0 {
                return Err("nested too deeply".into());
            }
            for item in array.into_iter() {
                walk_value(item.map_err(|e| e.to_string())?, left - 1)?;
            }
            Ok(())
        }
        RawBsonRef::JavaScriptCodeWithScope(code) => walk_document(code.scope, left),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{doc, Timestamp};

    fn keys() -> EventKeys {
        EventKeys::parse("0123456789abcdef0123456789abcdef\n").unwrap()
    }

    #[test]
    fn positions_survive_the_event_id() {
        let position = Position::new(
            Timestamp {
                time: 1_795_500_000,
                increment: 7,
            },
            Some(doc! { "rt": { "_data": "8263A1F2" }, "ct": Timestamp { time: 1, increment: 2 } }),
        );
        let id = keys().sign(&position);
        assert!(id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        assert_eq!(keys().verify(&id).unwrap(), position);
        assert_eq!(keys().verify("not an id"), Err(BadEventId::Malformed));
        assert_eq!(keys().verify("AAAA"), Err(BadEventId::Malformed));
    }

    #[test]
    fn an_id_signed_with_another_key_or_altered_is_forged() {
        let position = Position::new(
            Timestamp {
                time: 5,
                increment: 1,
            },
            None,
        );
        let other = EventKeys::parse("another key of at least thirty-two bytes").unwrap();
        assert_eq!(
            keys().verify(&other.sign(&position)),
            Err(BadEventId::Forged)
        );
        let id = keys().sign(&position);
        let mut bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&id)
            .unwrap();
        bytes[3] ^= 1;
        let altered = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        assert_eq!(keys().verify(&altered), Err(BadEventId::Forged));
        // Rotation: an id of the old key verifies while the old key is listed second.
        let rotated = EventKeys::parse(
            "another key of at least thirty-two bytes\n0123456789abcdef0123456789abcdef",
        )
        .unwrap();
        assert_eq!(rotated.verify(&id).unwrap(), position);
    }

    #[test]
    fn the_size_is_checked_before_anything_else() {
        let long = "A".repeat(MAX_EVENT_ID_LEN + 1);
        assert_eq!(
            keys().verify(&long),
            Err(BadEventId::TooLong(MAX_EVENT_ID_LEN + 1))
        );
    }

    #[test]
    fn deep_nesting_is_refused_without_recursing_into_it() {
        // 100 000 levels would overflow the stack of a recursive decoder.
        let mut document = doc! {};
        for _ in 0..100 {
            document = doc! { "a": document };
        }
        let bytes = bson::to_vec(&document).unwrap();
        assert!(check_depth(&bytes, 8).is_err());
        assert!(check_depth(&bson::to_vec(&doc! {"a": {"b": [1, {"c": 2}]}}).unwrap(), 8).is_ok());
        // Hand-built nesting, far deeper than anything `doc!` builds here: level `l`
        // (0 outermost) is `len, 0x03, "a\0", <level l+1>, 0`, the innermost `{}`.
        let depth = 100_000usize;
        let mut raw = Vec::with_capacity(depth * 8 + 5);
        for level in 0..depth {
            let len = (5 + 8 * (depth - level)) as i32;
            raw.extend_from_slice(&len.to_le_bytes());
            raw.extend_from_slice(&[0x03, b'a', 0]);
        }
        raw.extend_from_slice(&[5, 0, 0, 0, 0]);
        raw.extend(std::iter::repeat_n(0u8, depth));
        assert!(check_depth(&raw, 8).is_err());
    }

    #[test]
    fn a_key_file_needs_long_keys() {
        assert!(EventKeys::parse("short").is_err());
        assert!(EventKeys::parse("# only a comment\n").is_err());
        assert!(!keys().is_ephemeral());
        assert!(EventKeys::ephemeral().is_ephemeral());
    }
}
