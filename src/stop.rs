//! A stop signal that is cheap to check on a hot path.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

/// A [`CancellationToken`] with a flag beside it: `is_stopped` is an atomic load, where
/// the token's own `is_cancelled` takes its lock, and every subscriber of a bus checks
/// the one token (a lock they would all contend for, once per delivery).
#[derive(Clone, Debug, Default)]
pub(crate) struct Stop {
    token: CancellationToken,
    stopped: Arc<AtomicBool>,
}

impl Stop {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Stops: the flag first, so that whoever is woken by the token sees it set.
    pub(crate) fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.token.cancel();
    }

    pub(crate) fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// The token, to wait on (`cancelled()`) while idle.
    pub(crate) fn token(&self) -> &CancellationToken {
        &self.token
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stopping_sets_the_flag_and_wakes_a_waiter() {
        let stop = Stop::new();
        let waiter = {
            let token = stop.token().clone();
            tokio::spawn(async move { token.cancelled().await })
        };
        assert!(!stop.is_stopped());
        stop.clone().stop();
        assert!(stop.is_stopped());
        assert!(stop.token().is_cancelled());
        waiter.await.expect("woken");
    }
}
