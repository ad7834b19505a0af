//! Retry policy: exponential backoff with jitter and a maximum number of attempts.
//! Policy only; the dispatcher is the mechanism.

use std::time::Duration;

/// When to try a failed message again, and when to give up.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Total attempts, the first included; after that the message is dead-lettered.
    pub max_attempts: u32,
    /// Delay before the second attempt.
    pub initial_delay: Duration,
    /// Upper bound for any delay.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// 5 attempts, 100 ms doubling up to 30 s.
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// A policy with `max_attempts` attempts and delays doubling from `initial` up to `max`.
    pub fn exponential(max_attempts: u32, initial: Duration, max: Duration) -> Self {
        Self {
            max_attempts: max_attempts.max(1),
            initial_delay: initial,
            max_delay: max.max(initial),
        }
    }

    /// The delay before the next attempt after `failed_attempts` failures, or `None` when
    /// the message has used its attempts. Equal jitter: the delay lies in `[d/2, d]`
    /// where `d = min(max, initial * 2^(failed_attempts - 1))`, so instances that fail
    /// together do not retry together, and no retry comes sooner than half the backoff.
    pub fn next_delay(&self, failed_attempts: u32) -> Option<Duration> {
        if failed_attempts >= self.max_attempts {
            return None;
        }
        let d = self.backoff(failed_attempts);
        let half = d / 2;
        let jitter = half.mul_f64(fastrand::f64());
        Some(half + jitter)
    }

    /// The un-jittered backoff after `failed_attempts` failures.
    pub fn backoff(&self, failed_attempts: u32) -> Duration {
        let exp = failed_attempts.saturating_sub(1).min(30);
        self.initial_delay
            .saturating_mul(1u32 << exp)
            .min(self.max_delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn gives_up_after_max_attempts() {
        let p = RetryPolicy::exponential(3, Duration::from_millis(10), Duration::from_secs(1));
        assert!(p.next_delay(1).is_some());
        assert!(p.next_delay(2).is_some());
        assert!(p.next_delay(3).is_none());
    }

    #[test]
    fn backoff_doubles_then_caps() {
        let p =
            RetryPolicy::exponential(100, Duration::from_millis(10), Duration::from_millis(100));
        assert_eq!(p.backoff(1), Duration::from_millis(10));
        assert_eq!(p.backoff(2), Duration::from_millis(20));
        assert_eq!(p.backoff(4), Duration::from_millis(80));
        assert_eq!(p.backoff(5), Duration::from_millis(100));
        assert_eq!(p.backoff(99), Duration::from_millis(100));
    }

    proptest! {
        #[test]
        fn delays_stay_within_half_and_full_backoff(
            attempts in 1u32..60, init_ms in 1u64..1000, max_ms in 1u64..100_000
        ) {
            let p = RetryPolicy::exponential(1000, Duration::from_millis(init_ms), Duration::from_millis(max_ms));
            let d = p.next_delay(attempts).unwrap();
            let full = p.backoff(attempts);
            prop_assert!(d <= full);
            prop_assert!(d >= full / 2);
            prop_assert!(full <= p.max_delay);
        }
    }
}
