//! The last hour of each member's sub-queries, minute by minute, as this coordinator
//! saw them: how many, how many did not answer fully, and their latency
//! distribution. The status board draws it (`/v1/board/charts.svg`) and
//! `/v1/history` serves it as JSON.
//!
//! Prometheus' histograms (`fedgate_member_call_duration_seconds`) hold the same
//! calls for a monitoring system to keep; this is what a gateway shows by itself,
//! without one. Memory stays bounded: at most [`MINUTES`] minutes per member, each a
//! low-precision [`hdrhistogram`] of about 1.7 KiB, and only minutes that had calls.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::Serialize;

/// How many minutes are kept.
pub const MINUTES: u64 = 60;

/// Latencies are kept from 1 µs up to this (longer ones count as this).
const MAX_MICROS: u64 = 3_600_000_000;

/// One member's calls in one minute.
#[derive(Debug)]
struct Minute {
    /// Minutes since the Unix epoch.
    at: u64,
    calls: u64,
    failures: u64,
    /// Latency in microseconds, one significant digit (quantiles within about 6%).
    latency: Histogram<u32>,
}

/// One minute of one member, as served.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MinuteStats {
    /// The minute's start, seconds since the Unix epoch.
    pub start: u64,
    /// Sub-queries whose outcome was recorded in it.
    pub calls: u64,
    /// Those that did not answer fully.
    pub failures: u64,
    /// Median latency, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile latency, milliseconds.
    pub p99_ms: f64,
}

/// Each member's last hour.
#[derive(Debug, Default)]
pub struct History {
    members: Mutex<BTreeMap<String, VecDeque<Minute>>>,
}

fn minute_of(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() / 60
}

impl History {
    /// An empty history.
    pub fn new() -> History {
        History::default()
    }

    /// Records one call to `member` that ended at `at`.
    pub fn record(&self, member: &str, at: SystemTime, elapsed: Duration, failed: bool) {
        let now = minute_of(at);
        let mut members = self.members.lock().unwrap_or_else(|p| p.into_inner());
        let minutes = match members.get_mut(member) {
            Some(m) => m,
            None => members.entry(member.to_string()).or_default(),
        };
        // Calls end in order closely enough that the newest minute is the one to
        // add to; a call reported late for an older minute joins the newest, which
        // moves it by at most the time it took to report.
        if minutes.back().is_none_or(|m| m.at < now) {
            let latency = Histogram::new_with_bounds(1, MAX_MICROS, 1)
                .expect("the bounds and precision are valid constants");
            minutes.push_back(Minute {
                at: now,
                calls: 0,
                failures: 0,
                latency,
            });
        }
        while minutes.front().is_some_and(|m| m.at + MINUTES <= now) {
            minutes.pop_front();
        }
        let m = minutes.back_mut().expect("a minute was just added");
        m.calls += 1;
        m.failures += u64::from(failed);
        let micros = (elapsed.as_micros() as u64).clamp(1, MAX_MICROS);
        m.latency.saturating_record(micros);
    }

    /// Every member's minutes within the hour before `now`, oldest first. Members
    /// without calls in that hour are left out.
    pub fn series(&self, now: SystemTime) -> BTreeMap<String, Vec<MinuteStats>> {
        let now = minute_of(now);
        let mut members = self.members.lock().unwrap_or_else(|p| p.into_inner());
        members.retain(|_, minutes| {
            while minutes.front().is_some_and(|m| m.at + MINUTES <= now) {
                minutes.pop_front();
            }
            !minutes.is_empty()
        });
        members
            .iter()
            .map(|(name, minutes)| {
                let stats = minutes
                    .iter()
                    .map(|m| MinuteStats {
                        start: m.at * 60,
                        calls: m.calls,
                        failures: m.failures,
                        p50_ms: m.latency.value_at_quantile(0.5) as f64 / 1000.0,
                        p99_ms: m.latency.value_at_quantile(0.99) as f64 / 1000.0,
                    })
                    .collect();
                (name.clone(), stats)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(minute: u64, second: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(minute * 60 + second)
    }

    #[test]
    fn calls_are_counted_per_minute_with_their_quantiles() {
        let h = History::new();
        // Minute 1000: 100 calls of 1..=100 ms, two of them failed.
        for i in 1..=100u64 {
            h.record("hefei", at(1000, i % 60), Duration::from_millis(i), i > 98);
        }
        h.record("hefei", at(1002, 5), Duration::from_secs(2), false);
        h.record("anji", at(1002, 6), Duration::from_micros(300), false);
        let s = h.series(at(1002, 30));
        assert_eq!(s.len(), 2);
        let hefei = &s["hefei"];
        assert_eq!(hefei.len(), 2, "minutes without calls are not listed");
        assert_eq!(hefei[0].start, 1000 * 60);
        assert_eq!((hefei[0].calls, hefei[0].failures), (100, 2));
        // One significant digit of precision: within 6.25% of the true quantiles.
        assert!((47.0..=53.2).contains(&hefei[0].p50_ms), "{:?}", hefei[0]);
        assert!((93.0..=105.2).contains(&hefei[0].p99_ms), "{:?}", hefei[0]);
        assert_eq!((hefei[1].calls, hefei[1].failures), (1, 0));
        assert!(
            (1875.0..=2125.0).contains(&hefei[1].p99_ms),
            "{:?}",
            hefei[1]
        );
        assert!(
            (0.28..=0.32).contains(&s["anji"][0].p50_ms),
            "{:?}",
            s["anji"]
        );
    }

    #[test]
    fn only_the_last_hour_is_kept() {
        let h = History::new();
        for minute in 0..150 {
            h.record("suzhou", at(minute, 0), Duration::from_millis(3), false);
        }
        h.record("hefei", at(10, 0), Duration::from_millis(3), false);
        let s = h.series(at(149, 59));
        assert_eq!(s["suzhou"].len(), MINUTES as usize);
        assert_eq!(s["suzhou"][0].start, (150 - MINUTES) * 60);
        assert!(
            !s.contains_key("hefei"),
            "a member silent for an hour is dropped"
        );
        // Nothing is kept past the hour, even when no call arrives to push it out.
        assert!(h.series(at(300, 0)).is_empty());
        assert!(h.members.lock().unwrap().is_empty());
    }

    #[test]
    fn latencies_beyond_the_range_are_clamped_not_lost() {
        let h = History::new();
        h.record("x", at(5, 0), Duration::ZERO, false);
        h.record("x", at(5, 1), Duration::from_secs(7200), true);
        let s = h.series(at(5, 2));
        assert_eq!((s["x"][0].calls, s["x"][0].failures), (2, 1));
        assert!(s["x"][0].p99_ms >= 3_000_000.0, "{:?}", s["x"]);
    }
}
