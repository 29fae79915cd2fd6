//! The validated settings of limits that other parts of the gateway act on: member
//! breakers, answer caching, admission classes. They live here so that configuration
//! depends on no module that uses it; their behaviour is implemented beside the code
//! that uses them.

use super::problems::Problems;
use super::raw::*;
use std::collections::BTreeMap;
use std::path::Path;
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

/// What one class may use (`[[admission]]` and `[[subquery_admission]]` in the
/// member file).
#[derive(Debug, Clone, PartialEq)]
pub struct ClassLimits {
    /// Slots only this class may use.
    pub reserved: usize,
    /// Most slots this class may hold, reserved and shared together.
    pub max_concurrent: Option<usize>,
    /// Most slots one origin (principal) of this class may hold.
    pub max_per_origin: Option<usize>,
    /// Sub-queries of this class run on the owner's low-priority lane.
    pub low_priority: bool,
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

/// Limits of a gateway, with defaults applied.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Deadline for queries that state none.
    pub default_timeout: Duration,
    /// Longest deadline a caller may ask for.
    pub max_timeout: Duration,
    /// Queries coordinated at once.
    pub max_concurrent_queries: usize,
    /// Sub-queries answered for peers at once.
    pub max_concurrent_subqueries: usize,
    /// Most hops a sub-query may have taken.
    pub max_hops: u32,
    /// When a member's circuit breaker opens and for how long.
    pub breaker: BreakerSettings,
    /// Retries of a sub-query whose member could not be reached, within the retry
    /// budget.
    pub retries: u32,
    /// Bytes of member answers cached as coordinator.
    pub result_cache_bytes: u64,
    /// Memory one query may use at this coordinator, and one sub-query in this
    /// member's own engine.
    pub query_memory_bytes: u64,
    /// Most rows one answer may have.
    pub max_rows: Option<u64>,
    /// Admission limits of client queries per principal class.
    pub classes: BTreeMap<crate::trust::identity::Kind, ClassLimits>,
    /// Admission limits of sub-queries per class of their origin.
    pub subquery_classes: BTreeMap<crate::trust::identity::Kind, ClassLimits>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            default_timeout: Duration::from_secs(30),
            max_timeout: Duration::from_secs(300),
            max_concurrent_queries: 64,
            max_concurrent_subqueries: 128,
            max_hops: 3,
            breaker: Default::default(),
            retries: 1,
            result_cache_bytes: 64 * 1024 * 1024,
            query_memory_bytes: 1024 * 1024 * 1024,
            max_rows: None,
            classes: BTreeMap::new(),
            subquery_classes: BTreeMap::new(),
        }
    }
}

/// A duration setting: `None` when absent or wrong (wrong ones are reported).
pub(super) fn duration_setting(
    path: &Path,
    key: String,
    v: &Option<String>,
    pr: &mut Problems,
) -> Option<Duration> {
    let s = v.as_ref()?;
    match humantime::parse_duration(s) {
        Ok(d) => Some(d),
        Err(e) => {
            pr.add(
                path,
                key,
                format!("{s:?} is not a duration like \"30s\": {e}"),
            );
            None
        }
    }
}

pub(super) fn cache_policy(
    path: &Path,
    key: &str,
    d: &RawDataset,
    pr: &mut Problems,
) -> Option<CachePolicy> {
    let fresh = duration_setting(
        path,
        format!("{key}.cache_fresh_for"),
        &d.cache_fresh_for,
        pr,
    );
    let stale = duration_setting(
        path,
        format!("{key}.cache_stale_for"),
        &d.cache_stale_for,
        pr,
    );
    if d.cache_stale_for.is_some() && d.cache_fresh_for.is_none() {
        pr.add(
            path,
            format!("{key}.cache_stale_for"),
            "needs cache_fresh_for (answers are cached only for datasets that set it)",
        );
    }
    if fresh.is_some_and(|f| f.is_zero()) {
        pr.add(
            path,
            format!("{key}.cache_fresh_for"),
            "must be greater than zero (leave it out to cache nothing)",
        );
        return None;
    }
    Some(CachePolicy {
        fresh_for: fresh?,
        stale_for: stale.unwrap_or_default(),
    })
}

pub(super) fn validate_limits(path: &Path, raw: &RawLimits, pr: &mut Problems) -> Limits {
    let mut l = Limits::default();
    let mut dur = |key: &str, v: &Option<String>, slot: &mut Duration| {
        if let Some(s) = v {
            match humantime::parse_duration(s) {
                Ok(d) if !d.is_zero() => *slot = d,
                Ok(_) => pr.add(path, format!("limits.{key}"), "must be greater than zero"),
                Err(e) => pr.add(
                    path,
                    format!("limits.{key}"),
                    format!("{s:?} is not a duration like \"30s\": {e}"),
                ),
            }
        }
    };
    dur(
        "default_timeout",
        &raw.default_timeout,
        &mut l.default_timeout,
    );
    dur("max_timeout", &raw.max_timeout, &mut l.max_timeout);
    dur(
        "breaker_open_for",
        &raw.breaker_open_for,
        &mut l.breaker.open_for,
    );
    if l.default_timeout > l.max_timeout {
        pr.add(
            path,
            "limits.default_timeout",
            "is longer than limits.max_timeout",
        );
    }
    if let Some(n) = raw.max_concurrent_queries {
        l.max_concurrent_queries = n.max(1);
    }
    if let Some(n) = raw.max_concurrent_subqueries {
        l.max_concurrent_subqueries = n.max(1);
    }
    if let Some(n) = raw.max_hops {
        l.max_hops = n.max(1);
    }
    match raw.breaker_failures {
        Some(0) => pr.add(
            path,
            "limits.breaker_failures",
            "must be at least 1 (a breaker that opens without failures would refuse every member)",
        ),
        Some(n) => l.breaker.failures = n,
        None => {}
    }
    if let Some(n) = raw.result_cache_bytes {
        l.result_cache_bytes = n;
    }
    match raw.query_memory_bytes {
        Some(n) if n < 1024 * 1024 => pr.add(
            path,
            "limits.query_memory_bytes",
            format!("{n} is less than 1 MiB; no query could merge in that"),
        ),
        Some(n) => l.query_memory_bytes = n,
        None => {}
    }
    match raw.max_rows {
        Some(0) => pr.add(path, "limits.max_rows", "must be at least 1"),
        n => l.max_rows = n,
    }
    match raw.retries {
        Some(n) if n > 3 => pr.add(
            path,
            "limits.retries",
            format!("{n} is more than 3: retries multiply the load on a member that is failing"),
        ),
        Some(n) => l.retries = n,
        None => {}
    }
    l
}

/// Validates one door's classes: `section` is `admission` (client queries, out of
/// `limits.max_concurrent_queries`) or `subquery_admission` (sub-queries by their
/// origin's class, out of `limits.max_concurrent_subqueries`).
pub(super) fn validate_admission(
    path: &Path,
    section: &str,
    raw: &[RawAdmission],
    total: (&str, usize),
    pr: &mut Problems,
) -> BTreeMap<crate::trust::identity::Kind, ClassLimits> {
    let mut out = BTreeMap::new();
    for (i, a) in raw.iter().enumerate() {
        let key = format!("{section}[{i}]");
        let Some(kind) = crate::trust::identity::Kind::parse(&a.class) else {
            pr.add(
                path,
                format!("{key}.class"),
                format!(
                    "{:?} is not a principal class (office, city or county)",
                    a.class
                ),
            );
            continue;
        };
        if let Some(max) = a.max_concurrent
            && (max == 0 || max < a.reserved)
        {
            pr.add(
                path,
                format!("{key}.max_concurrent"),
                format!(
                    "{max} must be at least 1 and at least the {} reserved",
                    a.reserved
                ),
            );
        }
        if a.max_per_origin == Some(0) {
            pr.add(
                path,
                format!("{key}.max_per_origin"),
                "0 must be at least 1: an origin with no slot could never ask",
            );
        }
        let low_priority = match a.priority.as_deref() {
            None | Some("normal") => false,
            Some("low") if section == "subquery_admission" => true,
            Some("low") => {
                pr.add(
                    path,
                    format!("{key}.priority"),
                    "applies to sub-queries only: set it in [[subquery_admission]], where \
                     the data owner's engine runs them",
                );
                false
            }
            Some(other) => {
                pr.add(
                    path,
                    format!("{key}.priority"),
                    format!("{other:?} is not a priority (normal or low)"),
                );
                false
            }
        };
        let rate = match a.rate_per_second {
            Some(r) if !(r.is_finite() && r > 0.0) => {
                pr.add(
                    path,
                    format!("{key}.rate_per_second"),
                    format!("{r} must be a positive number"),
                );
                None
            }
            Some(r) => {
                let burst = a.burst.unwrap_or(r.max(1.0));
                if !(burst.is_finite() && burst >= 1.0) {
                    pr.add(
                        path,
                        format!("{key}.burst"),
                        format!("{burst} must be at least 1"),
                    );
                }
                Some(Rate {
                    per_second: r,
                    burst,
                })
            }
            None => {
                if a.burst.is_some() {
                    pr.add(path, format!("{key}.burst"), "needs rate_per_second");
                }
                None
            }
        };
        let limits = ClassLimits {
            reserved: a.reserved,
            max_concurrent: a.max_concurrent,
            max_per_origin: a.max_per_origin,
            low_priority,
            rate,
        };
        match out.entry(kind) {
            std::collections::btree_map::Entry::Occupied(_) => pr.add(
                path,
                format!("{key}.class"),
                format!("{} is listed twice", a.class),
            ),
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(limits);
            }
        }
    }
    let reserved: usize = out.values().map(|c| c.reserved).sum();
    let (limit, total) = total;
    if reserved > total {
        pr.add(
            path,
            section,
            format!("the classes reserve {reserved} slots, more than limits.{limit} ({total})"),
        );
    }
    out
}
