//! Deadlines from durations that users, configurations and messages choose: one too
//! long to add to the clock means "not in this century", never a panic (`Instant +
//! Duration` panics on overflow, and `--timeout 300000000000y` parses).

use std::time::Duration;

/// How far "never" is.
const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// `after` from now on tokio's clock.
pub(crate) fn after(after: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(after).unwrap_or(now + FAR)
}

/// `after` from now on the standard clock.
pub(crate) fn std_after(after: Duration) -> std::time::Instant {
    later(std::time::Instant::now(), after)
}

/// `after` from `now` on the standard clock.
pub(crate) fn later(now: std::time::Instant, after: Duration) -> std::time::Instant {
    now.checked_add(after).unwrap_or(now + FAR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_duration_past_the_clocks_range_is_a_far_deadline() {
        let now = tokio::time::Instant::now();
        let far = after(Duration::MAX);
        assert!(far >= now + FAR);
        let soon = after(Duration::from_secs(5));
        assert!(soon >= now + Duration::from_secs(5) && soon < far);
        let std_now = std::time::Instant::now();
        assert!(std_after(Duration::MAX) >= std_now + FAR);
    }
}
