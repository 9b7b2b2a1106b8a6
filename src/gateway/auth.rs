//! Who is calling: bearer tokens bound to a service identity, kept hashed.
//!
//! Why it exists: producers and consumers must be authenticated. Over
//! HTTP anyone can claim to be any service, so the identity comes from the token, not
//! from the request: a token bound to `service:billing` publishes, subscribes and asks
//! only as `billing` (and the catalog still decides what `billing` may send); an
//! `admin` token manages queues, dead letters and the stores. A token may carry both.
//!
//! The gateway never stores a token, only its SHA-256, in a tokens file:
//!
//! ```text
//! # <sha-256 of the token, hex>  <roles: service:<name> and/or admin, comma separated>
//! 3f1c…9a0e  service:billing
//! 77d2…41bb  admin
//! 0b8e…c3d1  admin,service:ops
//! ```
//!
//! `intracom token new --service billing` prints a fresh token and its line. A request
//! without a token, or with one the file does not hold, gets 401; a known token asking
//! for another service's identity, or for an admin route without `admin`, gets 403.
//! Lookups hash the presented token and compare it with every entry in constant time.
//!
//! A route states its role by the extractor it takes, so that none can be written
//! without one: [`Admin`] (admin tokens), [`ServiceCaller`] (tokens bound to a
//! service) or [`AnyCaller`] (any known token; the route decides per request). Each
//! authenticates the request and refuses it before the path, the query or the body is
//! read. The OpenAPI document names the `admin` role in the `bearer` requirement of
//! every admin route; the gateway's tests check, route by route, that the document and
//! the extractors agree.

use std::fmt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};

use super::error::{ApiError, ApiResult};
use super::AppState;
use crate::error::{Error, Result};

/// What a token may do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Identity {
    /// The service the token acts as (publish, subscribe, request, ack).
    pub service: Option<String>,
    /// Whether the token manages queues, dead letters, the stores and the stats.
    pub admin: bool,
}

impl Identity {
    /// A token that acts as `service`.
    pub fn service(service: impl Into<String>) -> Self {
        Identity {
            service: Some(service.into()),
            admin: false,
        }
    }

    /// An admin token.
    pub fn admin() -> Self {
        Identity {
            service: None,
            admin: true,
        }
    }

    /// The same identity with the admin role added.
    pub fn and_admin(mut self) -> Self {
        self.admin = true;
        self
    }

    fn parse(roles: &str) -> std::result::Result<Self, String> {
        let mut identity = Identity::default();
        for role in roles.split(',').map(str::trim) {
            match role.split_once(':') {
                None if role == "admin" => identity.admin = true,
                Some(("service", name)) if identity.service.is_none() => {
                    crate::message::check_name("service", name).map_err(|e| e.to_string())?;
                    identity.service = Some(name.to_string());
                }
                Some(("service", _)) => return Err("a token acts as one service at most".into()),
                _ => return Err(format!("unknown role `{role}` (service:<name> or admin)")),
            }
        }
        Ok(identity)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut roles = Vec::new();
        if self.admin {
            roles.push("admin".to_string());
        }
        if let Some(service) = &self.service {
            roles.push(format!("service:{service}"));
        }
        f.write_str(&roles.join(","))
    }
}

struct Entry {
    hash: [u8; 32],
    identity: Identity,
}

/// The tokens the gateway accepts, as SHA-256 hashes with their identity.
#[derive(Default)]
pub struct Tokens {
    entries: Vec<Entry>,
    /// The log lines about unknown tokens, rate-limited.
    unknown: RateLimitedLog,
}

/// How often at most a refused unknown token is logged; the refusals in between are
/// counted and told in the next line (and each is counted in
/// `intracom_gateway_unknown_tokens_total`).
const UNKNOWN_TOKEN_LOG_EVERY: Duration = Duration::from_secs(10);

/// A log line at most every `UNKNOWN_TOKEN_LOG_EVERY`, with the count of the events
/// not logged since the last line: a client sending bad tokens in a loop cannot fill
/// the log.
#[derive(Default)]
struct RateLimitedLog {
    state: Mutex<LogWindow>,
}

#[derive(Default)]
struct LogWindow {
    /// When the last line was written.
    last: Option<Instant>,
    /// Events since then, not logged.
    suppressed: u64,
}

impl RateLimitedLog {
    /// One more event at `now`: `Some(suppressed)` when a line is due now (with the
    /// events not logged since the last line), `None` when this one is only counted.
    fn note(&self, now: Instant) -> Option<u64> {
        let mut window = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let due = window
            .last
            .is_none_or(|last| now.saturating_duration_since(last) >= UNKNOWN_TOKEN_LOG_EVERY);
        if due {
            window.last = Some(now);
            Some(std::mem::take(&mut window.suppressed))
        } else {
            window.suppressed += 1;
            None
        }
    }
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokens")
            .field("count", &self.entries.len())
            .finish()
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Equal, in a time that depends on the length only.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Tokens {
    /// No tokens: every request that needs one is refused.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads a tokens file (format in the module docs).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        super::read_file(path.as_ref(), Self::parse)
    }

    /// Reads the lines of a tokens file. A bad line is an error naming it.
    pub fn parse(text: &str) -> Result<Self> {
        let mut tokens = Tokens::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |reason: String| Error::config(format!("line {}", number + 1), line, reason);
            let (hash, roles) = line
                .split_once(char::is_whitespace)
                .ok_or_else(|| bad("expected `<sha-256 hex> <roles>`".into()))?;
            let hash = unhex(hash.trim_start_matches("sha256:"))
                .ok_or_else(|| bad("the hash is not 64 hexadecimal digits".into()))?;
            let identity = Identity::parse(roles.trim()).map_err(bad)?;
            tokens.entries.push(Entry { hash, identity });
        }
        Ok(tokens)
    }

    /// Adds a token (kept as its hash only).
    pub fn with_token(mut self, token: &str, identity: Identity) -> Self {
        self.entries.push(Entry {
            hash: digest(token),
            identity,
        });
        self
    }

    /// The SHA-256 of a token, in hex: what a tokens file holds.
    pub fn hash(token: &str) -> String {
        hex(&digest(token))
    }

    /// The tokens-file line for `token` with `identity`.
    pub fn line(token: &str, identity: &Identity) -> String {
        format!("{}  {identity}", Self::hash(token))
    }

    /// A fresh random token: 32 bytes from the operating system, base64url.
    pub fn generate() -> Result<String> {
        use base64::Engine;
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| {
            Error::io(
                "drawing a random token",
                std::io::Error::other(e.to_string()),
            )
        })?;
        Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
    }

    /// The identity of a token, if the gateway knows it. Every entry is compared, in
    /// constant time, so the time taken does not tell which entry matched.
    pub fn identify(&self, token: &str) -> Option<Identity> {
        let presented = digest(token);
        let mut found = None;
        for entry in &self.entries {
            if constant_time_eq(&entry.hash, &presented) && found.is_none() {
                found = Some(entry.identity.clone());
            }
        }
        found
    }

    /// How many tokens are known.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no token is known.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A caller with a known token, whatever its roles: the role of a route open to every
/// token (the catalog), or of one whose role depends on the request
/// (`GET /subscribe/{topic}`: `monitor=true` needs [`Admin`], otherwise a
/// [`ServiceCaller`]; see [`AnyCaller::to_admin`] and [`AnyCaller::to_service`]).
///
/// Every route that takes a token states its role by the extractor it takes:
/// [`Admin`], [`ServiceCaller`] or this one. Each answers 401 for a request without a
/// known bearer token, before any other extractor after it in the handler's arguments
/// reads the path, the query or the body.
#[derive(Clone, Debug)]
pub(crate) struct AnyCaller(Identity);

/// The admin role: a handler that takes it runs only for a token with `admin`; any
/// other known token gets 403 (and a request without one 401). It holds nothing: it is
/// the proof that the check was made, and only [`FromRequestParts`] and
/// [`AnyCaller::to_admin`] make one.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Admin(());

/// A caller acting as a service: a handler that takes it runs only for a token bound to
/// a service (`service:<name>`, with or without `admin`); an admin token without one
/// gets 403 (and a request without a token 401).
#[derive(Clone, Debug)]
pub(crate) struct ServiceCaller {
    service: String,
}

impl AnyCaller {
    /// The caller's roles.
    pub(crate) fn identity(&self) -> &Identity {
        &self.0
    }

    /// The admin role, for a route that needs it for some requests only; 403 (as the
    /// [`Admin`] extractor) for a token without it.
    pub(crate) fn to_admin(&self) -> ApiResult<Admin> {
        Admin::of(&self.0)
    }

    /// The caller as its service, for a route that needs one for some requests only;
    /// 403 (as the [`ServiceCaller`] extractor) for a token without one.
    pub(crate) fn to_service(&self) -> ApiResult<ServiceCaller> {
        ServiceCaller::of(&self.0)
    }
}

impl Admin {
    /// The role of `identity`, or the 403 a token without `admin` gets.
    fn of(identity: &Identity) -> ApiResult<Self> {
        if identity.admin {
            Ok(Admin(()))
        } else {
            Err(ApiError::Forbidden(format!(
                "this route needs an admin token (this one is {identity})"
            )))
        }
    }
}

impl ServiceCaller {
    /// The service of `identity`, or the 403 a token without one gets.
    fn of(identity: &Identity) -> ApiResult<Self> {
        match &identity.service {
            Some(service) => Ok(ServiceCaller {
                service: service.clone(),
            }),
            None => Err(ApiError::Forbidden(
                "this token has no service identity (its roles: admin); use a service token".into(),
            )),
        }
    }

    /// The service this caller acts as.
    pub(crate) fn service(&self) -> &str {
        &self.service
    }

    /// The caller's service, checked against the one a request names: 403 for another.
    pub(crate) fn as_service(&self, claimed: Option<&str>) -> ApiResult<&str> {
        match claimed {
            Some(other) if other != self.service => Err(ApiError::Forbidden(format!(
                "this token acts as `{}`, not `{other}`",
                self.service
            ))),
            _ => Ok(&self.service),
        }
    }
}

/// The token of an `Authorization` value whose scheme is `Bearer`, compared without
/// regard to case (RFC 9110 §11.1: an authentication scheme is case-insensitive).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The identity of the request's `Authorization: Bearer` token; 401 without a known one.
fn authenticate(parts: &Parts, state: &AppState) -> ApiResult<Identity> {
    let header = parts
        .headers
        .get(AUTHORIZATION)
        .ok_or_else(|| ApiError::Unauthorized("missing `Authorization: Bearer <token>`".into()))?;
    let token = header
        .to_str()
        .ok()
        .and_then(bearer_token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::Unauthorized("the Authorization header is not `Bearer <token>`".into())
        })?;
    match state.tokens().identify(token) {
        Some(identity) => Ok(identity),
        None => {
            metrics::counter!(crate::metrics::GATEWAY_UNKNOWN_TOKENS).increment(1);
            if let Some(suppressed) = state.tokens().unknown.note(Instant::now()) {
                tracing::info!(
                    not_logged_before = suppressed,
                    "gateway: unknown bearer token refused (at most one line every {}s; \
                         intracom_gateway_unknown_tokens_total counts each)",
                    UNKNOWN_TOKEN_LOG_EVERY.as_secs()
                );
            }
            Err(ApiError::Unauthorized("unknown token".into()))
        }
    }
}

impl FromRequestParts<AppState> for AnyCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Self> {
        authenticate(parts, state).map(AnyCaller)
    }
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Self> {
        Admin::of(&authenticate(parts, state)?)
    }
}

impl FromRequestParts<AppState> for ServiceCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Self> {
        ServiceCaller::of(&authenticate(parts, state)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tokens_file_binds_hashes_to_identities() {
        let text = format!(
            "# comment\n\n{}\n{}  admin , service:ops\n",
            Tokens::line("s3cret", &Identity::service("billing")),
            Tokens::hash("root"),
        );
        let tokens = Tokens::parse(&text).unwrap();
        assert_eq!(tokens.len(), 2);
        assert_eq!(
            tokens.identify("s3cret"),
            Some(Identity::service("billing"))
        );
        assert_eq!(
            tokens.identify("root"),
            Some(Identity::service("ops").and_admin())
        );
        assert_eq!(tokens.identify("s3cret "), None);
        assert!(!text.contains("s3cret"), "only hashes are written");
    }

    #[test]
    fn unknown_token_lines_are_rate_limited_and_count_what_they_skip() {
        let log = RateLimitedLog::default();
        let start = Instant::now();
        assert_eq!(log.note(start), Some(0), "the first is logged");
        for _ in 0..99 {
            assert_eq!(log.note(start), None, "the next ones only counted");
        }
        let almost = start + UNKNOWN_TOKEN_LOG_EVERY - Duration::from_millis(1);
        assert_eq!(log.note(almost), None);
        let later = start + UNKNOWN_TOKEN_LOG_EVERY;
        assert_eq!(
            log.note(later),
            Some(100),
            "the next line tells the 100 skipped"
        );
        assert_eq!(log.note(later), None);
        assert_eq!(log.note(later + UNKNOWN_TOKEN_LOG_EVERY), Some(1));
    }

    #[test]
    fn roles_refuse_other_tokens_with_403_and_say_why() {
        let billing = Identity::service("billing");
        let admin = Identity::admin();
        let both = Identity::service("web").and_admin();
        assert!(Admin::of(&admin).is_ok());
        assert!(Admin::of(&both).is_ok());
        match Admin::of(&billing) {
            Err(ApiError::Forbidden(message)) => assert!(
                message.contains("needs an admin token") && message.contains("service:billing"),
                "{message}"
            ),
            other => panic!("a service token is not admin: {other:?}"),
        }
        match ServiceCaller::of(&admin) {
            Err(ApiError::Forbidden(message)) => {
                assert!(message.contains("no service identity"), "{message}")
            }
            other => panic!("an admin token without a service: {other:?}"),
        }
        let web = ServiceCaller::of(&both).unwrap();
        assert_eq!(web.service(), "web");
        let billing = ServiceCaller::of(&billing).unwrap();
        assert_eq!(billing.as_service(None).unwrap(), "billing");
        assert_eq!(billing.as_service(Some("billing")).unwrap(), "billing");
        match billing.as_service(Some("users")) {
            Err(ApiError::Forbidden(message)) => assert!(
                message.contains("acts as `billing`, not `users`"),
                "{message}"
            ),
            other => panic!("another service's identity: {other:?}"),
        }
        let any = AnyCaller(Identity::service("ops"));
        assert!(any.to_service().is_ok());
        assert!(matches!(any.to_admin(), Err(ApiError::Forbidden(_))));
    }

    #[test]
    fn the_bearer_scheme_is_matched_without_case() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bEaReR  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearerabc"), None);
        assert_eq!(bearer_token("Bearer"), None);
    }

    #[test]
    fn bad_lines_are_named() {
        let err = Tokens::parse("abc service:x").unwrap_err().to_string();
        assert!(
            err.contains("line 1") && err.contains("64 hexadecimal"),
            "{err}"
        );
        let line = format!("{} root", Tokens::hash("t"));
        let err = Tokens::parse(&format!("\n{line}")).unwrap_err().to_string();
        assert!(
            err.contains("line 2") && err.contains("unknown role"),
            "{err}"
        );
        let line = format!("{} service:a,service:b", Tokens::hash("t"));
        assert!(Tokens::parse(&line).is_err());
    }

    #[test]
    fn generated_tokens_differ_and_identities_print_as_roles() {
        let (a, b) = (Tokens::generate().unwrap(), Tokens::generate().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert_eq!(
            Identity::service("x").and_admin().to_string(),
            "admin,service:x"
        );
    }
}
