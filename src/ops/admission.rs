//! Fair admission by principal class (office, city, county), at both doors of a
//! gateway: client queries where a caller asks (`[[admission]]`, out of
//! `limits.max_concurrent_queries`) and sub-queries that other gateways send to this
//! data owner, by the class of the query's origin (`[[subquery_admission]]`, out of
//! `limits.max_concurrent_subqueries`).
//!
//! Each class may have slots reserved for it that no other class can take, a cap on
//! how many slots it may hold in all, a cap per origin (so that within a class one
//! city cannot take what its peers are owed), and a sustained rate with a burst.
//! Whatever is not reserved is shared, first come first served. A query that finds no
//! slot is refused at once with a hint of when to retry; nothing waits in a queue, so
//! a surge from one class turns into fast refusals for that class, not into latency
//! for everyone.

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
    refused: u64,
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
    /// Slots held per origin (principal URI); an origin holding none is removed.
    origins: BTreeMap<String, usize>,
}

/// The admission controller of one door of a gateway.
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
    origin: String,
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
        if let Some(n) = s.origins.get_mut(&self.origin) {
            *n -= 1;
            if *n == 0 {
                s.origins.remove(&self.origin);
            }
        }
    }
}

/// One class's share of a door and its use now, for the board and metrics.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ClassLoad {
    /// `office`, `city` or `county`.
    pub class: &'static str,
    /// Slots only this class may use.
    pub reserved: usize,
    /// Most slots the class may hold, if capped.
    pub max_concurrent: Option<usize>,
    /// Most slots one origin of the class may hold, if capped.
    pub max_per_origin: Option<usize>,
    /// Slots held now, reserved and shared together.
    pub in_use: usize,
    /// Queries refused since the limits last changed.
    pub refused: u64,
}

/// A door's slots and their use now.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Load {
    /// All slots.
    pub total: usize,
    /// Slots not reserved for any class.
    pub shared: usize,
    /// Shared slots held now.
    pub shared_in_use: usize,
    /// Every class with limits or use, office, city, county in that order.
    pub classes: Vec<ClassLoad>,
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

    /// Whether this controller enforces exactly these limits (a reload keeps it, and
    /// the slots held, when they are unchanged).
    pub fn has_limits(&self, total: usize, classes: &BTreeMap<Kind, ClassLimits>) -> bool {
        self.total == total && &self.classes == classes
    }

    /// Whether queries of `class` run on the data owner's low-priority lane.
    pub fn low_priority(&self, class: Kind) -> bool {
        self.classes.get(&class).is_some_and(|l| l.low_priority)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a query of `class` from `origin` (a principal URI) at `now`, or says why
    /// not. The refusal names only the caller's own class and origin.
    pub fn try_admit(
        self: &Arc<Self>,
        class: Kind,
        origin: &str,
        now: Instant,
    ) -> Result<Ticket, Refusal> {
        let mut s = self.lock();
        let decided = self.decide(&mut s, class, origin, now);
        match decided {
            Ok(use_shared) => {
                let u = s.usage.entry(class).or_default();
                if use_shared {
                    u.shared += 1;
                    s.shared_in_use += 1;
                } else {
                    u.reserved += 1;
                }
                *s.origins.entry(origin.to_string()).or_default() += 1;
                Ok(Ticket {
                    admission: self.clone(),
                    class,
                    origin: origin.to_string(),
                    shared: use_shared,
                })
            }
            Err(r) => {
                s.usage.entry(class).or_default().refused += 1;
                Err(r)
            }
        }
    }

    /// Whether a query may run, and if so whether on a shared slot.
    fn decide(
        &self,
        s: &mut State,
        class: Kind,
        origin: &str,
        now: Instant,
    ) -> Result<bool, Refusal> {
        let limits = self.classes.get(&class);
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
        if let Some(max) = limits.and_then(|l| l.max_per_origin) {
            let mine = s.origins.get(origin).copied().unwrap_or(0);
            if mine >= max {
                return Err(Refusal {
                    reason: format!(
                        "{origin} is running {mine} queries here, the most one {} caller may \
                         run at once, so that others of its class keep their turn",
                        class.as_str()
                    ),
                    retry_after: BUSY_RETRY,
                });
            }
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
        Ok(use_shared)
    }

    /// Queries running now, per class.
    pub fn in_use(&self) -> BTreeMap<Kind, usize> {
        self.lock()
            .usage
            .iter()
            .map(|(k, u)| (*k, u.reserved + u.shared))
            .collect()
    }

    /// The door's slots, each class's share and its use now.
    pub fn load(&self) -> Load {
        let s = self.lock();
        let classes = [Kind::Office, Kind::City, Kind::County]
            .into_iter()
            .filter(|k| self.classes.contains_key(k) || s.usage.contains_key(k))
            .map(|k| {
                let l = self.classes.get(&k);
                let u = s.usage.get(&k);
                ClassLoad {
                    class: k.as_str(),
                    reserved: l.map_or(0, |l| l.reserved),
                    max_concurrent: l.and_then(|l| l.max_concurrent),
                    max_per_origin: l.and_then(|l| l.max_per_origin),
                    in_use: u.map_or(0, |u| u.reserved + u.shared),
                    refused: u.map_or(0, |u| u.refused),
                }
            })
            .collect();
        Load {
            total: self.total,
            shared: self.shared,
            shared_in_use: s.shared_in_use,
            classes,
        }
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
            max_per_origin: None,
            low_priority: false,
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
            .map(|_| a.try_admit(Kind::City, "city", now).unwrap())
            .collect();
        let r = a.try_admit(Kind::City, "city", now).unwrap_err();
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
        let county = a.try_admit(Kind::County, "county", now).unwrap();
        let office = a.try_admit(Kind::Office, "office", now).unwrap();
        // Reserved slots used up and the shared ones taken: the county is refused too.
        assert!(a.try_admit(Kind::County, "county", now).is_err());
        drop(cities);
        let _second_county = a.try_admit(Kind::County, "county", now).unwrap();
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
                    max_per_origin: None,
                    low_priority: false,
                    rate: None,
                },
            )]),
        );
        let now = Instant::now();
        let _t = [
            a.try_admit(Kind::City, "city", now).unwrap(),
            a.try_admit(Kind::City, "city", now).unwrap(),
        ];
        let r = a.try_admit(Kind::City, "city", now).unwrap_err();
        assert!(r.reason.contains("their most at once"), "{}", r.reason);
        assert!(a.try_admit(Kind::County, "county", now).is_ok());
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
                    max_per_origin: None,
                    low_priority: false,
                    rate: Some(Rate {
                        per_second: 4.0,
                        burst: 2.0,
                    }),
                },
            )]),
        );
        let t0 = Instant::now();
        drop(a.try_admit(Kind::Office, "office", t0).unwrap());
        drop(a.try_admit(Kind::Office, "office", t0).unwrap());
        let r = a.try_admit(Kind::Office, "office", t0).unwrap_err();
        assert_eq!(r.retry_after, Duration::from_millis(250));
        assert!(
            r.reason.contains("rate of 4 queries per second"),
            "{}",
            r.reason
        );
        drop(
            a.try_admit(Kind::Office, "office", t0 + Duration::from_millis(250))
                .unwrap(),
        );
        assert!(
            a.try_admit(Kind::Office, "office", t0 + Duration::from_millis(250))
                .is_err()
        );
    }

    #[test]
    fn one_origin_cannot_take_what_its_class_owes_the_others() {
        let a = Admission::new(
            6,
            BTreeMap::from([(
                Kind::City,
                ClassLimits {
                    reserved: 4,
                    max_concurrent: None,
                    max_per_origin: Some(2),
                    low_priority: false,
                    rate: None,
                },
            )]),
        );
        let now = Instant::now();
        let shanghai = "fedgate://yrd/city/shanghai";
        let _two = [
            a.try_admit(Kind::City, shanghai, now).unwrap(),
            a.try_admit(Kind::City, shanghai, now).unwrap(),
        ];
        let r = a.try_admit(Kind::City, shanghai, now).unwrap_err();
        assert!(
            r.reason
                .starts_with("fedgate://yrd/city/shanghai is running 2 queries here"),
            "{}",
            r.reason
        );
        // Another city still finds the class's slots.
        let hefei = a
            .try_admit(Kind::City, "fedgate://yrd/city/hefei", now)
            .unwrap();
        drop(hefei);
        // The per-origin count follows the tickets.
        drop(_two);
        assert!(a.try_admit(Kind::City, shanghai, now).is_ok());
    }

    #[test]
    fn the_load_shows_each_share_its_use_and_its_refusals() {
        let a = Admission::new(3, BTreeMap::from([(Kind::County, limits(1))]));
        let now = Instant::now();
        let held = [
            a.try_admit(Kind::City, "c1", now).unwrap(),
            a.try_admit(Kind::City, "c2", now).unwrap(),
        ];
        assert!(a.try_admit(Kind::City, "c3", now).is_err());
        assert!(a.try_admit(Kind::City, "c3", now).is_err());
        let county = a.try_admit(Kind::County, "k1", now).unwrap();
        let load = a.load();
        assert_eq!((load.total, load.shared, load.shared_in_use), (3, 2, 2));
        let city = load.classes.iter().find(|c| c.class == "city").unwrap();
        assert_eq!((city.reserved, city.in_use, city.refused), (0, 2, 2));
        let c = load.classes.iter().find(|c| c.class == "county").unwrap();
        assert_eq!((c.reserved, c.in_use, c.refused), (1, 1, 0));
        assert!(load.classes.iter().all(|c| c.class != "office"));
        drop((held, county));
        assert_eq!(a.load().shared_in_use, 0);
    }

    proptest! {
        /// Under any sequence of arrivals and departures from two origins per class:
        /// the total never exceeds the capacity, no origin holds more than its cap,
        /// and a class holding fewer than its reserved slots is refused only when the
        /// origin asking is at its own cap.
        #[test]
        fn reserved_shares_are_always_available(
            reserved in proptest::collection::vec(0usize..3, 3),
            extra in 0usize..4,
            per_origin in proptest::option::of(1usize..3),
            ops in proptest::collection::vec((0usize..6, any::<bool>()), 1..200),
        ) {
            let total = reserved.iter().sum::<usize>() + extra;
            let classes = KINDS
                .iter()
                .zip(&reserved)
                .map(|(k, r)| (*k, ClassLimits { max_per_origin: per_origin, ..limits(*r) }))
                .collect();
            let a = Admission::new(total, classes);
            let now = Instant::now();
            // Six origins: 2k and 2k+1 are of class k.
            let mut held: Vec<Vec<Ticket>> = (0..6).map(|_| Vec::new()).collect();
            for (origin, arrive) in ops {
                let class = origin / 2;
                if arrive {
                    let class_before = held[2 * class].len() + held[2 * class + 1].len();
                    let mine = held[origin].len();
                    match a.try_admit(KINDS[class], &format!("o{origin}"), now) {
                        Ok(t) => held[origin].push(t),
                        Err(r) => prop_assert!(
                            class_before >= reserved[class] || per_origin.is_some_and(|p| mine >= p),
                            "{}", r.reason
                        ),
                    }
                } else {
                    held[origin].pop();
                }
                let running: usize = held.iter().map(Vec::len).sum();
                prop_assert!(running <= total);
                for (o, h) in held.iter().enumerate() {
                    prop_assert!(per_origin.is_none_or(|p| h.len() <= p));
                    if o % 2 == 0 {
                        let class_held = h.len() + held[o + 1].len();
                        prop_assert_eq!(
                            a.in_use().get(&KINDS[o / 2]).copied().unwrap_or(0),
                            class_held
                        );
                    }
                }
            }
        }
    }
}
