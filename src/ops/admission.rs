//! Fair admission of client queries by principal class (office, city, county).
//!
//! A gateway runs at most `limits.max_concurrent_queries` queries at once. Each class
//! may have slots reserved for it that no other class can take, a cap on how many
//! slots it may hold in all, and a sustained rate with a burst. Whatever is not
//! reserved is shared, first come first served. A query that finds no slot is refused
//! at once with a hint of when to retry; nothing waits in a queue, so a surge from one
//! class turns into fast refusals for that class, not into latency for everyone.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::trust::identity::Kind;

pub use crate::config::limits::{ClassLimits, Rate};

/// Why a query was not admitted, and when trying again may succeed.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// For the caller.
    pub reason: String,
    /// When to retry.
    pub retry_after: Duration,
}

/// A pause to suggest when all slots are busy: queries do not announce their end, so
/// this is a hint, not a promise.
const BUSY_RETRY: Duration = Duration::from_millis(200);

#[derive(Debug, Default)]
struct Usage {
    reserved: usize,
    shared: usize,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Debug, Default)]
struct State {
    usage: BTreeMap<Kind, Usage>,
    shared_in_use: usize,
    buckets: BTreeMap<Kind, Bucket>,
}

/// The admission controller of one gateway's client queries.
#[derive(Debug)]
pub struct Admission {
    total: usize,
    shared: usize,
    classes: BTreeMap<Kind, ClassLimits>,
    state: Mutex<State>,
}

/// A slot held by one running query; dropping it frees the slot.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    class: Kind,
    shared: bool,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut s = self.admission.lock();
        let u = s.usage.entry(self.class).or_default();
        if self.shared {
            u.shared -= 1;
            s.shared_in_use -= 1;
        } else {
            u.reserved -= 1;
        }
    }
}

impl Admission {
    /// `total` slots, of which each class's `reserved` are set aside. The caller has
    /// checked (config validation) that the reservations fit in `total`.
    pub fn new(total: usize, classes: BTreeMap<Kind, ClassLimits>) -> Arc<Admission> {
        let reserved: usize = classes.values().map(|c| c.reserved).sum();
        Arc::new(Admission {
            total,
            shared: total.saturating_sub(reserved),
            classes,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a query of `class` at `now`, or says why not.
    pub fn try_admit(self: &Arc<Self>, class: Kind, now: Instant) -> Result<Ticket, Refusal> {
        let limits = self.classes.get(&class);
        let mut s = self.lock();
        let (reserved_in_use, held) = {
            let u = s.usage.entry(class).or_default();
            (u.reserved, u.reserved + u.shared)
        };
        let reserved = limits.map_or(0, |l| l.reserved);
        if let Some(max) = limits.and_then(|l| l.max_concurrent)
            && held >= max
        {
            return Err(Refusal {
                reason: format!(
                    "{} callers are running {held} queries here, their most at once",
                    class.as_str()
                ),
                retry_after: BUSY_RETRY,
            });
        }
        let use_shared = if reserved_in_use < reserved {
            false
        } else if s.shared_in_use < self.shared {
            true
        } else {
            let theirs = if reserved > 0 {
                format!(
                    "{} callers hold all {reserved} slots reserved for them",
                    class.as_str()
                )
            } else {
                format!("no slots are reserved for {} callers", class.as_str())
            };
            return Err(Refusal {
                reason: format!(
                    "this gateway is running its most queries at once ({}); {theirs} and \
                     the {} shared slots are taken",
                    self.total, self.shared
                ),
                retry_after: BUSY_RETRY,
            });
        };
        // The rate is checked last, so a refusal for want of a slot costs no token.
        if let Some(rate) = limits.and_then(|l| l.rate) {
            let b = s.buckets.entry(class).or_insert(Bucket {
                tokens: rate.burst,
                at: now,
            });
            let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
            b.tokens = (b.tokens + elapsed * rate.per_second).min(rate.burst);
            b.at = now;
            if b.tokens < 1.0 {
                let wait = Duration::from_secs_f64((1.0 - b.tokens) / rate.per_second);
                return Err(Refusal {
                    reason: format!(
                        "{} callers are over their rate of {} queries per second (burst {})",
                        class.as_str(),
                        rate.per_second,
                        rate.burst
                    ),
                    retry_after: wait.max(Duration::from_millis(1)),
                });
            }
            b.tokens -= 1.0;
        }
        let u = s.usage.entry(class).or_default();
        if use_shared {
            u.shared += 1;
            s.shared_in_use += 1;
        } else {
            u.reserved += 1;
        }
        Ok(Ticket {
            admission: self.clone(),
            class,
            shared: use_shared,
        })
    }

    /// Queries running now, per class.
    pub fn in_use(&self) -> BTreeMap<Kind, usize> {
        self.lock()
            .usage
            .iter()
            .map(|(k, u)| (*k, u.reserved + u.shared))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KINDS: [Kind; 3] = [Kind::City, Kind::County, Kind::Office];

    fn limits(reserved: usize) -> ClassLimits {
        ClassLimits {
            reserved,
            max_concurrent: None,
            rate: None,
        }
    }

    #[test]
    fn a_class_flooding_the_shared_slots_leaves_the_reserved_ones_alone() {
        let a = Admission::new(
            4,
            BTreeMap::from([(Kind::County, limits(1)), (Kind::Office, limits(1))]),
        );
        let now = Instant::now();
        let cities: Vec<_> = (0..2)
            .map(|_| a.try_admit(Kind::City, now).unwrap())
            .collect();
        let r = a.try_admit(Kind::City, now).unwrap_err();
        assert!(
            r.reason.contains("2 shared slots are taken"),
            "{}",
            r.reason
        );
        assert!(
            r.reason.contains("no slots are reserved for city callers"),
            "{}",
            r.reason
        );
        let county = a.try_admit(Kind::County, now).unwrap();
        let office = a.try_admit(Kind::Office, now).unwrap();
        // Reserved slots used up and the shared ones taken: the county is refused too.
        assert!(a.try_admit(Kind::County, now).is_err());
        drop(cities);
        let _second_county = a.try_admit(Kind::County, now).unwrap();
        assert_eq!(a.in_use()[&Kind::County], 2);
        drop((county, office));
    }

    #[test]
    fn a_class_cap_holds_even_with_free_shared_slots() {
        let a = Admission::new(
            8,
            BTreeMap::from([(
                Kind::City,
                ClassLimits {
                    reserved: 0,
                    max_concurrent: Some(2),
                    rate: None,
                },
            )]),
        );
        let now = Instant::now();
        let _t = [
            a.try_admit(Kind::City, now).unwrap(),
            a.try_admit(Kind::City, now).unwrap(),
        ];
        let r = a.try_admit(Kind::City, now).unwrap_err();
        assert!(r.reason.contains("their most at once"), "{}", r.reason);
        assert!(a.try_admit(Kind::County, now).is_ok());
    }

    #[test]
    fn the_rate_refuses_above_the_burst_and_says_when_a_token_comes() {
        let a = Admission::new(
            8,
            BTreeMap::from([(
                Kind::Office,
                ClassLimits {
                    reserved: 0,
                    max_concurrent: None,
                    rate: Some(Rate {
                        per_second: 4.0,
                        burst: 2.0,
                    }),
                },
            )]),
        );
        let t0 = Instant::now();
        drop(a.try_admit(Kind::Office, t0).unwrap());
        drop(a.try_admit(Kind::Office, t0).unwrap());
        let r = a.try_admit(Kind::Office, t0).unwrap_err();
        assert_eq!(r.retry_after, Duration::from_millis(250));
        assert!(
            r.reason.contains("rate of 4 queries per second"),
            "{}",
            r.reason
        );
        drop(
            a.try_admit(Kind::Office, t0 + Duration::from_millis(250))
                .unwrap(),
        );
        assert!(
            a.try_admit(Kind::Office, t0 + Duration::from_millis(250))
                .is_err()
        );
    }

    proptest! {
        /// Under any sequence of arrivals and departures: the total never exceeds the
        /// capacity, and a class holding fewer than its reserved slots is never refused.
        #[test]
        fn reserved_shares_are_always_available(
            reserved in proptest::collection::vec(0usize..3, 3),
            extra in 0usize..4,
            ops in proptest::collection::vec((0usize..3, any::<bool>()), 1..200),
        ) {
            let total = reserved.iter().sum::<usize>() + extra;
            let classes = KINDS.iter().zip(&reserved).map(|(k, r)| (*k, limits(*r))).collect();
            let a = Admission::new(total, classes);
            let now = Instant::now();
            let mut held: Vec<Vec<Ticket>> = vec![Vec::new(), Vec::new(), Vec::new()];
            for (class, arrive) in ops {
                if arrive {
                    let before = held[class].len();
                    match a.try_admit(KINDS[class], now) {
                        Ok(t) => held[class].push(t),
                        Err(r) => prop_assert!(before >= reserved[class], "{}", r.reason),
                    }
                } else {
                    held[class].pop();
                }
                let running: usize = held.iter().map(Vec::len).sum();
                prop_assert!(running <= total);
                for (i, h) in held.iter().enumerate() {
                    prop_assert_eq!(a.in_use().get(&KINDS[i]).copied().unwrap_or(0), h.len());
                }
            }
        }
    }
}
