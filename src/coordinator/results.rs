//! The coordinator's cache of member answers.
//!
//! Only datasets whose region entry sets `cache_fresh_for` are cached. An answer is
//! kept under the member, the exact member SQL and the caller's scope (the original
//! caller and the stated purpose: what the member authorized), so an answer is never
//! reused for another caller. Each cache belongs to one coordinator, built for one
//! configuration version; a reload builds a new coordinator with an empty cache, so
//! no answer outlives the rules of this gateway it was given under. Within `cache_fresh_for` it is served instead of asking the member
//! (`cached` in the summary); after that, and for `cache_stale_for` more, it is served
//! only when the member fails without having sent a row (`stale`, with its age). A
//! member's refusal is never covered by a cached answer: a rule tightened at the
//! member takes effect at once.
//!
//! Identical sub-queries that arrive while one is in flight wait for it and are
//! answered from its result instead of each asking the member. The cache is bounded
//! in bytes; one answer may take at most an eighth of it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datafusion::arrow::record_batch::RecordBatch;
use tokio::sync::watch;

pub use crate::config::limits::CachePolicy;

impl CachePolicy {
    /// The stricter of two policies, for a sub-query that reads several datasets.
    pub fn min(self, other: CachePolicy) -> CachePolicy {
        CachePolicy {
            fresh_for: self.fresh_for.min(other.fresh_for),
            stale_for: self.stale_for.min(other.stale_for),
        }
    }
}

/// What an answer is cached under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ResultKey {
    /// The member.
    pub member: String,
    /// The member SQL.
    pub sql: String,
    /// The original caller's principal.
    pub origin: String,
    /// The purpose the caller stated.
    pub purpose: Option<String>,
}

/// A complete member answer.
#[derive(Debug)]
pub struct CachedAnswer {
    /// The member's batches as received (before shaping to the scan's schema).
    pub batches: Vec<RecordBatch>,
    /// Their rows.
    pub rows: u64,
    /// Their size in memory.
    pub bytes: u64,
    /// When the member finished the answer.
    pub stored: Instant,
    /// How the member said it shared the data.
    pub access: String,
    /// The hash of the member's audit record for the answer.
    pub audit_hash: Option<String>,
    /// The policy it was stored under.
    pub policy: CachePolicy,
}

impl CachedAnswer {
    /// Its age at `now`.
    pub fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.stored)
    }

    /// Whether it may be served instead of asking the member.
    pub fn is_fresh(&self, now: Instant) -> bool {
        self.age(now) <= self.policy.fresh_for
    }

    /// Whether it may be served in place of a failed member.
    pub fn is_usable_stale(&self, now: Instant) -> bool {
        self.age(now) <= self.policy.fresh_for + self.policy.stale_for
    }
}

struct KeepUntilStale;

impl moka::Expiry<ResultKey, Arc<CachedAnswer>> for KeepUntilStale {
    fn expire_after_create(
        &self,
        _: &ResultKey,
        v: &Arc<CachedAnswer>,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(v.policy.fresh_for + v.policy.stale_for)
    }

    fn expire_after_update(
        &self,
        _: &ResultKey,
        v: &Arc<CachedAnswer>,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.policy.fresh_for + v.policy.stale_for)
    }
}

/// Whether this sub-query asks the member itself or waits for an identical one.
pub enum Flight {
    /// Ask the member; others wait until the guard is dropped.
    Lead(LeaderGuard),
    /// Wait for the sub-query in flight, then look in the cache again.
    Follow(watch::Receiver<bool>),
}

/// Held by the sub-query that asks the member for everyone; dropping it (after the
/// answer was stored, or on failure) releases the ones waiting.
pub struct LeaderGuard {
    cache: Arc<ResultCache>,
    key: ResultKey,
    done: watch::Sender<bool>,
}

impl Drop for LeaderGuard {
    fn drop(&mut self) {
        self.cache
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
        let _ = self.done.send(true);
    }
}

/// The cache of one coordinator (one configuration version).
pub struct ResultCache {
    entries: moka::sync::Cache<ResultKey, Arc<CachedAnswer>>,
    inflight: Mutex<HashMap<ResultKey, watch::Receiver<bool>>>,
    max_entry_bytes: u64,
}

impl std::fmt::Debug for ResultCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ResultCache({} entries)", self.entries.entry_count())
    }
}

/// Memory held by a list of batches.
pub fn batches_bytes(batches: &[RecordBatch]) -> u64 {
    batches
        .iter()
        .map(|b| b.get_array_memory_size() as u64)
        .sum()
}

impl ResultCache {
    /// A cache of at most `max_bytes`.
    pub fn new(max_bytes: u64) -> Arc<ResultCache> {
        Arc::new(ResultCache {
            entries: moka::sync::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|k: &ResultKey, v: &Arc<CachedAnswer>| {
                    (v.bytes + k.sql.len() as u64 + 256).min(u32::MAX as u64) as u32
                })
                .expire_after(KeepUntilStale)
                .build(),
            inflight: Mutex::new(HashMap::new()),
            max_entry_bytes: max_bytes / 8,
        })
    }

    /// The largest answer kept.
    pub fn max_entry_bytes(&self) -> u64 {
        self.max_entry_bytes
    }

    /// The answer stored under `key`, fresh or not.
    pub fn get(&self, key: &ResultKey) -> Option<Arc<CachedAnswer>> {
        self.entries.get(key)
    }

    /// Stores a complete answer, if it is small enough.
    pub fn insert(&self, key: ResultKey, answer: CachedAnswer) {
        if answer.bytes <= self.max_entry_bytes {
            self.entries.insert(key, Arc::new(answer));
        }
    }

    /// Leads the sub-query for `key`, or follows the one already in flight.
    pub fn flight(self: &Arc<Self>, key: &ResultKey) -> Flight {
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rx) = inflight.get(key) {
            return Flight::Follow(rx.clone());
        }
        let (tx, rx) = watch::channel(false);
        inflight.insert(key.clone(), rx);
        Flight::Lead(LeaderGuard {
            cache: self.clone(),
            key: key.clone(),
            done: tx,
        })
    }

    /// Answers stored now (after pending evictions ran), for tests and metrics.
    pub fn entry_count(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::Int64Array;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    fn key(origin: &str) -> ResultKey {
        ResultKey {
            member: "hefei".into(),
            sql: "SELECT 1".into(),
            origin: origin.into(),
            purpose: None,
        }
    }

    fn answer(rows: usize, policy: CachePolicy, stored: Instant) -> CachedAnswer {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let b = RecordBatch::try_new(
            schema,
            vec![Arc::new(Int64Array::from_iter_values(0..rows as i64))],
        )
        .unwrap();
        let bytes = batches_bytes(std::slice::from_ref(&b));
        CachedAnswer {
            batches: vec![b],
            rows: rows as u64,
            bytes,
            stored,
            access: String::new(),
            audit_hash: None,
            policy,
        }
    }

    const POLICY: CachePolicy = CachePolicy {
        fresh_for: Duration::from_secs(60),
        stale_for: Duration::from_secs(600),
    };

    #[test]
    fn answers_are_kept_per_caller() {
        let c = ResultCache::new(1 << 20);
        c.insert(key("a"), answer(3, POLICY, Instant::now()));
        assert_eq!(c.get(&key("a")).unwrap().rows, 3);
        assert!(c.get(&key("b")).is_none());
    }

    #[test]
    fn freshness_then_the_stale_window() {
        let t = Instant::now();
        let a = answer(1, POLICY, t);
        assert!(a.is_fresh(t + Duration::from_secs(60)));
        assert!(!a.is_fresh(t + Duration::from_secs(61)));
        assert!(a.is_usable_stale(t + Duration::from_secs(660)));
        assert!(!a.is_usable_stale(t + Duration::from_secs(661)));
    }

    #[test]
    fn an_answer_over_an_eighth_of_the_cache_is_not_kept() {
        let small = answer(10, POLICY, Instant::now());
        let c = ResultCache::new(small.bytes * 8);
        c.insert(key("a"), small);
        let big = answer(10_000, POLICY, Instant::now());
        c.insert(key("b"), big);
        assert!(c.get(&key("a")).is_some());
        assert!(c.get(&key("b")).is_none());
    }

    #[test]
    fn the_bytes_bound_evicts_older_answers() {
        let one = answer(1000, POLICY, Instant::now());
        let c = ResultCache::new(one.bytes * 10);
        for i in 0..100 {
            c.insert(
                key(&format!("caller{i}")),
                answer(1000, POLICY, Instant::now()),
            );
        }
        let kept = c.entry_count();
        assert!((1..=10).contains(&kept), "{kept}");
    }

    #[tokio::test]
    async fn identical_sub_queries_in_flight_wait_for_the_first() {
        let c = ResultCache::new(1 << 20);
        let Flight::Lead(guard) = c.flight(&key("a")) else {
            panic!("the first sub-query leads")
        };
        let Flight::Follow(mut rx) = c.flight(&key("a")) else {
            panic!("an identical one follows")
        };
        assert!(matches!(c.flight(&key("b")), Flight::Lead(_)));
        let waiter = tokio::spawn(async move { rx.wait_for(|d| *d).await.is_ok() });
        c.insert(key("a"), answer(2, POLICY, Instant::now()));
        drop(guard);
        assert!(waiter.await.unwrap());
        assert_eq!(c.get(&key("a")).unwrap().rows, 2);
        // Once the leader is done, the next identical sub-query leads again.
        assert!(matches!(c.flight(&key("a")), Flight::Lead(_)));
    }
}
