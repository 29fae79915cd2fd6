//! What a coordinator remembers about each remote member between queries: a circuit
//! breaker, so a member that keeps failing is reported unavailable at once instead of
//! being waited on by every query, and a retry budget, so retries cannot multiply the
//! load on a member that is already struggling.
//!
//! Both are pure state machines over explicit instants; the member client
//! (`federation/client.rs`) and the member scan (`federation/table.rs`) feed them.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use crate::config::limits::BreakerSettings;

/// A time-out counts against a member only when the member had at least this long.
/// A caller that gives a query 20 ms says more about itself than about the members
/// it cut off, and must not open breakers for everyone else.
pub const MIN_BUDGET_FOR_BLAME: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
enum State {
    Closed {
        failures: u32,
        last: String,
    },
    Open {
        until: Instant,
        last: String,
    },
    /// The cool-down is over and one caller is probing the member's health; everyone
    /// else is still refused until the probe says how it went.
    Probing {
        last: String,
    },
}

/// What the breaker lets a caller do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BreakerVerdict {
    /// Send the sub-query.
    Go,
    /// Check the member's health first; report the result with [`Breaker::success`]
    /// or [`Breaker::failure`].
    Probe,
    /// Do not contact the member.
    Refuse {
        /// Why, for the query summary.
        reason: String,
    },
}

/// One member's circuit breaker.
#[derive(Debug)]
pub struct Breaker {
    settings: BreakerSettings,
    state: Mutex<State>,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(settings: BreakerSettings) -> Breaker {
        Breaker {
            settings,
            state: Mutex::new(State::Closed {
                failures: 0,
                last: String::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a sub-query may be sent at `now`.
    pub fn admit(&self, now: Instant) -> BreakerVerdict {
        let mut s = self.lock();
        match &*s {
            State::Closed { .. } => BreakerVerdict::Go,
            State::Open { until, last } if now < *until => BreakerVerdict::Refuse {
                reason: format!(
                    "circuit breaker open after {} consecutive failures (last: {last}); \
                     next health probe in {} ms",
                    self.settings.failures,
                    until.duration_since(now).as_millis()
                ),
            },
            State::Open { last, .. } => {
                *s = State::Probing { last: last.clone() };
                BreakerVerdict::Probe
            }
            State::Probing { last } => BreakerVerdict::Refuse {
                reason: format!(
                    "circuit breaker open after {} consecutive failures (last: {last}); \
                     a health probe is under way",
                    self.settings.failures
                ),
            },
        }
    }

    /// The member answered (or its health probe passed): the breaker closes.
    pub fn success(&self) {
        *self.lock() = State::Closed {
            failures: 0,
            last: String::new(),
        };
    }

    /// The member failed in a way that is its own or its link's fault (it could not
    /// be reached, the connection broke, it took longer than a fair budget). Returns
    /// true when this failure opened the breaker.
    pub fn failure(&self, now: Instant, reason: &str) -> bool {
        let mut s = self.lock();
        let open = State::Open {
            until: now + self.settings.open_for,
            last: reason.to_string(),
        };
        match &mut *s {
            State::Closed { failures, last } => {
                *failures += 1;
                *last = reason.to_string();
                if *failures >= self.settings.failures {
                    *s = open;
                    return true;
                }
                false
            }
            // A failed probe, or a failure of a sub-query sent before the breaker
            // opened: either way the cool-down starts again.
            State::Probing { .. } => {
                *s = open;
                true
            }
            State::Open { .. } => {
                *s = open;
                false
            }
        }
    }

    /// A probe that ended without a verdict (the query was dropped): let the next
    /// caller probe instead of refusing everyone until the cool-down passes again.
    pub fn probe_abandoned(&self, now: Instant) {
        let mut s = self.lock();
        if let State::Probing { last } = &*s {
            *s = State::Open {
                until: now,
                last: last.clone(),
            };
        }
    }

    /// Whether sub-queries go out without asking (no state change, unlike
    /// [`Breaker::admit`]).
    pub fn is_closed(&self) -> bool {
        matches!(&*self.lock(), State::Closed { .. })
    }

    /// `closed`, `open` or `probing`, for logs and the status board.
    pub fn state_word(&self) -> &'static str {
        match &*self.lock() {
            State::Closed { .. } => "closed",
            State::Open { .. } => "open",
            State::Probing { .. } => "probing",
        }
    }
}

/// A retry budget in the manner of gRPC's retry throttling (gRFC A6): every failure
/// costs a token, every success earns back a fraction of one, and retries stop while
/// fewer than half the tokens are left. When a member fails most of its sub-queries,
/// retries stop on their own instead of doubling its load.
#[derive(Debug)]
pub struct RetryBudget {
    max: f64,
    ratio: f64,
    tokens: Mutex<f64>,
}

impl RetryBudget {
    /// A full budget of `max` tokens, earning `ratio` of a token per success.
    pub fn new(max: f64, ratio: f64) -> RetryBudget {
        RetryBudget {
            max,
            ratio,
            tokens: Mutex::new(max),
        }
    }

    /// Records a successful sub-query.
    pub fn success(&self) {
        let mut t = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        *t = (*t + self.ratio).min(self.max);
    }

    /// Records a failed attempt and says whether it may be retried.
    pub fn failure_may_retry(&self) -> bool {
        let mut t = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        *t = (*t - 1.0).max(0.0);
        *t > self.max / 2.0
    }
}

impl Default for RetryBudget {
    /// gRFC A6's example values: ten tokens, a tenth of a token per success.
    fn default() -> Self {
        RetryBudget::new(10.0, 0.1)
    }
}

/// A remote member's breaker and retry budget, shared by every query the coordinator
/// sends it.
#[derive(Debug)]
pub struct MemberHealth {
    /// The circuit breaker.
    pub breaker: Breaker,
    /// The retry budget.
    pub retry: RetryBudget,
    /// Retries allowed per sub-query (within the budget).
    pub retries: u32,
}

impl MemberHealth {
    /// Fresh state: breaker closed, budget full.
    pub fn new(settings: BreakerSettings, retries: u32) -> MemberHealth {
        MemberHealth {
            breaker: Breaker::new(settings),
            retry: RetryBudget::default(),
            retries,
        }
    }

    /// A complete answer.
    pub fn success(&self) {
        self.breaker.success();
        self.retry.success();
    }

    /// A sub-query that ran out of its budget: it counts against the member only
    /// when the budget was fair (see [`MIN_BUDGET_FOR_BLAME`]).
    pub fn timed_out(&self, now: Instant, budget: Duration) {
        if budget >= MIN_BUDGET_FOR_BLAME {
            self.breaker
                .failure(now, &format!("no answer within {} ms", budget.as_millis()));
        }
    }
}

/// A pause before retrying: 20 to 40 ms. The spread keeps the retries of many
/// sub-queries that failed together from arriving together.
pub fn retry_pause() -> Duration {
    use std::hash::{BuildHasher, Hasher};
    // `RandomState` is seeded randomly per instance; its hash of nothing is a cheap
    // random number without another dependency.
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    Duration::from_millis(20 + r % 21)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerSettings {
            failures: 3,
            open_for: Duration::from_secs(10),
        })
    }

    #[test]
    fn consecutive_failures_open_the_breaker_and_a_success_resets_the_count() {
        let b = breaker();
        let t = Instant::now();
        assert!(!b.failure(t, "refused"));
        assert!(!b.failure(t, "refused"));
        b.success();
        assert!(!b.failure(t, "refused"));
        assert!(!b.failure(t, "refused"));
        assert_eq!(b.admit(t), BreakerVerdict::Go);
        assert!(b.failure(t, "connection refused"));
        match b.admit(t + Duration::from_secs(3)) {
            BreakerVerdict::Refuse { reason } => {
                assert!(reason.contains("3 consecutive failures"), "{reason}");
                assert!(reason.contains("connection refused"), "{reason}");
                assert!(reason.contains("7000 ms"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(b.state_word(), "open");
    }

    #[test]
    fn after_the_cool_down_one_caller_probes_and_the_others_wait_for_its_verdict() {
        let b = breaker();
        let t = Instant::now();
        for _ in 0..3 {
            b.failure(t, "reset");
        }
        let later = t + Duration::from_secs(10);
        assert_eq!(b.admit(later), BreakerVerdict::Probe);
        assert!(
            matches!(b.admit(later), BreakerVerdict::Refuse { reason } if reason.contains("probe is under way"))
        );
        // A failed probe starts the cool-down again.
        assert!(b.failure(later, "still down"));
        assert!(matches!(
            b.admit(later + Duration::from_secs(9)),
            BreakerVerdict::Refuse { .. }
        ));
        assert_eq!(
            b.admit(later + Duration::from_secs(10)),
            BreakerVerdict::Probe
        );
        b.success();
        assert_eq!(b.admit(later + Duration::from_secs(10)), BreakerVerdict::Go);
        assert_eq!(b.state_word(), "closed");
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_caller_probe() {
        let b = breaker();
        let t = Instant::now();
        for _ in 0..3 {
            b.failure(t, "reset");
        }
        let later = t + Duration::from_secs(11);
        assert_eq!(b.admit(later), BreakerVerdict::Probe);
        b.probe_abandoned(later);
        assert_eq!(b.admit(later), BreakerVerdict::Probe);
    }

    #[test]
    fn the_retry_budget_stops_retries_when_most_attempts_fail_and_recovers_with_successes() {
        let r = RetryBudget::new(10.0, 0.5);
        // Tokens 9, 8, 7, 6 allow a retry; 5 is not more than half.
        for _ in 0..4 {
            assert!(r.failure_may_retry());
        }
        assert!(!r.failure_may_retry());
        for _ in 0..4 {
            r.success();
        }
        // 5 + 2 = 7 tokens, less one: 6 > 5.
        assert!(r.failure_may_retry());
    }

    #[test]
    fn retry_pauses_spread_between_20_and_40_ms() {
        let pauses: std::collections::BTreeSet<_> = (0..200).map(|_| retry_pause()).collect();
        assert!(
            pauses
                .iter()
                .all(|p| *p >= Duration::from_millis(20) && *p <= Duration::from_millis(40))
        );
        assert!(pauses.len() > 5, "{pauses:?}");
    }
}
