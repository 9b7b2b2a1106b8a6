//! Fair shares: what one token may hold of the gateway at once.
//!
//! Why it exists: the gateway's global caps (connections, SSE streams) protect the
//! process, not its clients from each other: without a share per token, one service
//! opening every SSE stream, or holding hundreds of long `POST /request` calls, leaves
//! nothing to the others. Each token (told apart by the SHA-256 of what the client
//! presents, known or not) may have at most
//! [`GatewayOptions::max_requests_per_token`](super::GatewayOptions) requests in
//! progress and [`GatewayOptions::max_sse_per_token`](super::GatewayOptions) SSE
//! streams open; the next one gets 429 `too_many_requests`. An entry lives only while
//! its token holds something, so made-up tokens cannot grow the table past what is in
//! progress.

use std::collections::HashMap;
use std::sync::Mutex;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::AppState;

/// A token, by the SHA-256 of what the client presented (a request extension).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct TokenKey([u8; 32]);

#[derive(Default)]
struct InUse {
    requests: usize,
    streams: usize,
}

/// What each token holds now.
#[derive(Default)]
pub(crate) struct TokensInUse {
    map: Mutex<HashMap<TokenKey, InUse>>,
}

/// Which count a [`Held`] takes.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Kind {
    Request,
    Stream,
}

impl TokensInUse {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<TokenKey, InUse>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes one `kind` for `key`, unless it already holds `max`.
    pub(crate) fn take<'a>(
        &'a self,
        key: TokenKey,
        kind: Kind,
        max: usize,
    ) -> Result<Held<'a>, usize> {
        let mut map = self.map();
        let entry = map.entry(key).or_default();
        let count = match kind {
            Kind::Request => &mut entry.requests,
            Kind::Stream => &mut entry.streams,
        };
        if *count >= max {
            let held = *count;
            if entry.requests == 0 && entry.streams == 0 {
                map.remove(&key);
            }
            return Err(held);
        }
        *count += 1;
        Ok(Held {
            owner: self,
            key,
            kind,
        })
    }

    fn give_back(&self, key: TokenKey, kind: Kind) {
        let mut map = self.map();
        if let Some(entry) = map.get_mut(&key) {
            match kind {
                Kind::Request => entry.requests = entry.requests.saturating_sub(1),
                Kind::Stream => entry.streams = entry.streams.saturating_sub(1),
            }
            if entry.requests == 0 && entry.streams == 0 {
                map.remove(&key);
            }
        }
    }

    /// Tokens holding something now.
    pub(crate) fn len(&self) -> usize {
        self.map().len()
    }
}

/// One request or stream of a token, given back on drop.
pub(crate) struct Held<'a> {
    owner: &'a TokensInUse,
    key: TokenKey,
    kind: Kind,
}

impl Held<'_> {
    /// The same hold, owned by the gateway's state (for a stream that outlives the
    /// handler).
    pub(crate) fn into_owned(self, state: &AppState) -> OwnedHeld {
        let held = OwnedHeld {
            state: state.clone(),
            key: self.key,
            kind: self.kind,
        };
        std::mem::forget(self);
        held
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.owner.give_back(self.key, self.kind);
    }
}

/// [`Held`], for as long as the holder keeps it.
pub(crate) struct OwnedHeld {
    state: AppState,
    key: TokenKey,
    kind: Kind,
}

impl Drop for OwnedHeld {
    fn drop(&mut self) {
        self.state.tokens_in_use().give_back(self.key, self.kind);
    }
}

/// The key of the bearer token a request presents, if any.
fn token_key(req: &Request) -> Option<TokenKey> {
    let value = req.headers().get(AUTHORIZATION)?.as_bytes();
    Some(TokenKey(Sha256::digest(value).into()))
}

/// 429 for a token over its share.
pub(crate) fn too_many(what: &str, held: usize, max: usize, option: &str) -> ApiError {
    metrics::counter!(crate::metrics::GATEWAY_LIMITED, "limit" => option.to_string()).increment(1);
    ApiError::TooMany(format!(
        "this token has {held} {what} in progress, its share ({option} = {max}): wait for one to end"
    ))
}

/// Holds a request of its token while it is handled: 429 when the token already has
/// its share in progress. Gives the handlers the [`TokenKey`].
pub(crate) async fn per_token(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(key) = token_key(&req) else {
        return next.run(req).await;
    };
    let max = state.options().max_requests_per_token;
    let _held = match state.tokens_in_use().take(key, Kind::Request, max) {
        Ok(held) => held,
        Err(held) => {
            return too_many("requests", held, max, "max_requests_per_token").into_response()
        }
    };
    req.extensions_mut().insert(key);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_s_share_is_given_back_and_forgotten() {
        let in_use = TokensInUse::default();
        let a = TokenKey([1; 32]);
        let b = TokenKey([2; 32]);
        let one = in_use.take(a, Kind::Stream, 2).unwrap();
        let two = in_use.take(a, Kind::Stream, 2).unwrap();
        assert_eq!(in_use.take(a, Kind::Stream, 2).err(), Some(2));
        // Another token, and requests of the same one, are counted apart.
        let other = in_use.take(b, Kind::Stream, 2).unwrap();
        let request = in_use.take(a, Kind::Request, 1).unwrap();
        drop(one);
        let three = in_use.take(a, Kind::Stream, 2).unwrap();
        drop((two, three, other, request));
        assert_eq!(in_use.len(), 0, "nothing held, nothing kept");
    }
}
