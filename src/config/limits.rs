//! The validated settings of limits that other parts of the gateway act on: member
//! breakers, answer caching, admission classes. They live here so that configuration
//! depends on no module that uses it; their behaviour is implemented beside the code
//! that uses them.

use std::time::Duration;

/// How a coordinator treats failing members (from `[limits]` in the member file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive failures that open the breaker.
    pub failures: u32,
    /// How long an open breaker refuses before a health probe may close it.
    pub open_for: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            failures: 5,
            open_for: Duration::from_secs(10),
        }
    }
}

/// How long a dataset's member answers may be reused (from the region file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachePolicy {
    /// Served without asking the member for this long.
    pub fresh_for: Duration,
    /// Served for this long after that, but only in place of a failed member.
    pub stale_for: Duration,
}

/// What one class may use (`[[admission]]` in the member file).
#[derive(Debug, Clone, PartialEq)]
pub struct ClassLimits {
    /// Slots only this class may use.
    pub reserved: usize,
    /// Most slots this class may hold, reserved and shared together.
    pub max_concurrent: Option<usize>,
    /// Sustained queries per second, with the burst allowed above it.
    pub rate: Option<Rate>,
}

/// A token bucket's parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_second: f64,
    /// Most tokens held.
    pub burst: f64,
}
