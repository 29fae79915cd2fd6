//! What a gateway reports about itself: Prometheus metrics (`/metrics`) and the
//! recent queries and member outcomes behind the status board (`/v1/status`).
//!
//! One [`Observer`] per gateway outlives configuration reloads, so counters and the
//! recent-query list carry across them. Metrics are kept in a recorder of this
//! gateway's own (not the process-wide one), so several gateways in one process (the
//! demo, the tests) report only their own numbers.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use metrics::{Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use serde::Serialize;

use crate::config::Region;
use crate::proto::state_code;
use crate::proto::v1::{MemberState, QuerySummary};
use crate::trust::identity::Principal;

static META: Metadata<'static> = Metadata::new("fedgate", Level::INFO, Some("fedgate"));

/// Latency buckets in seconds: from a cached answer on loopback to a long deadline.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0,
];

/// How many finished queries the status board lists.
pub const RECENT: usize = 50;

/// One member's part in a recent query.
#[derive(Debug, Clone, Serialize)]
pub struct RecentMember {
    /// Member name.
    pub member: String,
    /// Its state (`ok`, `timed_out`, ...).
    pub state: &'static str,
    /// Rows it delivered.
    pub rows: u64,
    /// How long it took.
    pub elapsed_ms: f64,
    /// Why it did not answer fully, if so.
    pub reason: String,
    /// Age of a cached answer.
    pub age_ms: u64,
}

/// A finished (or refused) query, as the status board lists it.
#[derive(Debug, Clone, Serialize)]
pub struct Recent {
    /// The coordinator's query id (empty for queries refused before planning).
    pub query_id: String,
    /// When it arrived (RFC 3339, UTC).
    pub started_at: String,
    /// Who asked.
    pub origin: String,
    /// The SQL (for a service: the service's SQL).
    pub sql: String,
    /// The published service called, if any.
    pub service: Option<String>,
    /// Rows answered.
    pub rows: u64,
    /// Time to the end of the answer.
    pub elapsed_ms: f64,
    /// Whether some member's rows are missing.
    pub partial: bool,
    /// `answered`, `failed`, `refused` or `cancelled`.
    pub outcome: &'static str,
    /// The error, if the query failed or was refused.
    pub error: Option<String>,
    /// Per member outcomes.
    pub members: Vec<RecentMember>,
}

/// What this coordinator has seen of one member.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MemberSeen {
    /// Sub-queries whose outcome was recorded (pruned members are not counted).
    pub calls: u64,
    /// Those that did not answer fully.
    pub failures: u64,
    /// The state of the last one.
    pub last_state: Option<&'static str>,
    /// Its latency.
    pub last_latency_ms: Option<f64>,
    /// The last failure's reason.
    pub last_error: Option<String>,
}

/// A finished client query, as reported to [`Observer::finished`].
pub struct Finished<'a> {
    /// Who asked.
    pub origin: &'a Principal,
    /// The SQL run.
    pub sql: &'a str,
    /// The service called, if any.
    pub service: Option<&'a str>,
    /// When it arrived.
    pub started_at: SystemTime,
    /// How long it took.
    pub elapsed: Duration,
    /// `answered`, `failed`, `refused` or `cancelled`.
    pub outcome: &'static str,
    /// The error, if any.
    pub error: Option<String>,
    /// The summary, if the query ran.
    pub summary: Option<&'a QuerySummary>,
}

/// A gateway's metrics and recent history.
pub struct Observer {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    recent: Mutex<VecDeque<Recent>>,
    members: Mutex<BTreeMap<String, MemberSeen>>,
    history: crate::ops::history::History,
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}

impl Default for Observer {
    fn default() -> Self {
        Self::new()
    }
}

fn key(name: &'static str, labels: &[(&'static str, String)]) -> Key {
    Key::from_parts(
        name,
        labels
            .iter()
            .map(|(k, v)| Label::new(*k, v.clone()))
            .collect::<Vec<_>>(),
    )
}

impl Observer {
    /// A fresh observer.
    pub fn new() -> Observer {
        let recorder = PrometheusBuilder::new()
            .set_buckets(BUCKETS)
            .expect("the bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        let o = Observer {
            recorder,
            handle,
            recent: Mutex::new(VecDeque::new()),
            members: Mutex::new(BTreeMap::new()),
            history: crate::ops::history::History::new(),
        };
        o.describe();
        // Counters without labels exist from the start, at zero, so a dashboard
        // shows 0 rather than no data (cache counters stay 0 when no dataset caches).
        for name in [
            "fedgate_cache_hits_total",
            "fedgate_cache_misses_total",
            "fedgate_bytes_received_total",
        ] {
            o.count(name, &[], 0);
        }
        o
    }

    fn describe(&self) {
        use metrics::Unit;
        let r = &self.recorder;
        for (name, unit, help) in [
            (
                "fedgate_queries_total",
                Unit::Count,
                "Client queries by caller class and outcome.",
            ),
            (
                "fedgate_query_duration_seconds",
                Unit::Seconds,
                "Client query latency, to the end of the answer.",
            ),
            (
                "fedgate_member_call_duration_seconds",
                Unit::Seconds,
                "Sub-query latency per member, as seen by this coordinator.",
            ),
            (
                "fedgate_member_status_total",
                Unit::Count,
                "Member outcomes in client queries, by member and state.",
            ),
            (
                "fedgate_breaker_state",
                Unit::Count,
                "Circuit breaker per remote member: 0 closed, 1 open, 2 probing.",
            ),
            (
                "fedgate_cache_hits_total",
                Unit::Count,
                "Member parts answered from the result cache (fresh or stale).",
            ),
            (
                "fedgate_cache_misses_total",
                Unit::Count,
                "Member parts of cacheable datasets that went to the member.",
            ),
            (
                "fedgate_bytes_received_total",
                Unit::Bytes,
                "Arrow IPC bytes received from members.",
            ),
            (
                "fedgate_bytes_sent_total",
                Unit::Bytes,
                "Arrow IPC bytes sent, to clients and to peer gateways.",
            ),
            (
                "fedgate_audit_records_total",
                Unit::Count,
                "Records this gateway appended to its audit log.",
            ),
            (
                "fedgate_peer_subqueries_total",
                Unit::Count,
                "Sub-queries answered for other gateways, by outcome.",
            ),
            (
                "fedgate_admission_slots",
                Unit::Count,
                "Slots per door (queries, subqueries) and class: reserved, cap, in_use.",
            ),
            (
                "fedgate_admission_refused_total",
                Unit::Count,
                "Queries refused for load, per door (queries, subqueries) and class.",
            ),
        ] {
            match name {
                "fedgate_query_duration_seconds" | "fedgate_member_call_duration_seconds" => {
                    r.describe_histogram(name.into(), Some(unit), help.into())
                }
                "fedgate_breaker_state" | "fedgate_admission_slots" => {
                    r.describe_gauge(name.into(), Some(unit), help.into())
                }
                _ => r.describe_counter(name.into(), Some(unit), help.into()),
            }
        }
    }

    fn count(&self, name: &'static str, labels: &[(&'static str, String)], n: u64) {
        self.recorder
            .register_counter(&key(name, labels), &META)
            .increment(n);
    }

    fn observe(&self, name: &'static str, labels: &[(&'static str, String)], secs: f64) {
        self.recorder
            .register_histogram(&key(name, labels), &META)
            .record(secs);
    }

    /// Bytes sent to a client (`to = "client"`) or a peer gateway (`"peer"`).
    pub fn bytes_sent(&self, to: &'static str, n: u64) {
        self.count("fedgate_bytes_sent_total", &[("to", to.to_string())], n);
    }

    /// A sub-query answered (or refused) for another gateway.
    pub fn peer_subquery(&self, outcome: &'static str) {
        self.count(
            "fedgate_peer_subqueries_total",
            &[("outcome", outcome.to_string())],
            1,
        );
    }

    /// Records a finished client query: metrics, member outcomes, the recent list.
    pub fn finished(&self, region: &Region, f: Finished<'_>) {
        let class = f.origin.kind().to_string();
        self.count(
            "fedgate_queries_total",
            &[("class", class), ("outcome", f.outcome.to_string())],
            1,
        );
        self.observe(
            "fedgate_query_duration_seconds",
            &[],
            f.elapsed.as_secs_f64(),
        );
        let mut members = Vec::new();
        if let Some(s) = f.summary {
            self.count("fedgate_bytes_received_total", &[], s.bytes_received);
            let mut seen = self.members.lock().unwrap_or_else(|p| p.into_inner());
            for m in &s.members {
                let state = MemberState::try_from(m.state).unwrap_or(MemberState::Unspecified);
                let word = state_code(m.state);
                self.count(
                    "fedgate_member_status_total",
                    &[("member", m.member.clone()), ("state", word.to_string())],
                    1,
                );
                let cacheable = m
                    .datasets
                    .iter()
                    .any(|d| region.dataset(d).is_some_and(|d| d.cache.is_some()));
                if matches!(state, MemberState::Cached | MemberState::Stale) {
                    self.count("fedgate_cache_hits_total", &[], 1);
                } else if cacheable && state != MemberState::Pruned {
                    self.count("fedgate_cache_misses_total", &[], 1);
                }
                members.push(RecentMember {
                    member: m.member.clone(),
                    state: word,
                    rows: m.rows,
                    elapsed_ms: m.elapsed_us as f64 / 1000.0,
                    reason: m.reason.clone(),
                    age_ms: m.age_ms,
                });
                if state == MemberState::Pruned {
                    continue;
                }
                let secs = m.elapsed_us as f64 / 1e6;
                self.observe(
                    "fedgate_member_call_duration_seconds",
                    &[("member", m.member.clone())],
                    secs,
                );
                let e = seen.entry(m.member.clone()).or_default();
                e.calls += 1;
                e.last_state = Some(word);
                e.last_latency_ms = Some(secs * 1000.0);
                let fine = matches!(
                    state,
                    MemberState::Ok | MemberState::Cached | MemberState::Cancelled
                );
                self.history.record(
                    &m.member,
                    SystemTime::now(),
                    Duration::from_micros(m.elapsed_us),
                    !fine,
                );
                if !fine {
                    e.failures += 1;
                    e.last_error = Some(if m.reason.is_empty() {
                        word.to_string()
                    } else {
                        m.reason.clone()
                    });
                }
            }
        }
        let started_at: chrono::DateTime<chrono::Utc> = f.started_at.into();
        let recent = Recent {
            query_id: f.summary.map(|s| s.query_id.clone()).unwrap_or_default(),
            started_at: started_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            origin: f.origin.uri(),
            sql: f.sql.to_string(),
            service: f.service.map(str::to_string),
            rows: f.summary.map_or(0, |s| s.rows),
            elapsed_ms: f.elapsed.as_secs_f64() * 1000.0,
            partial: f.summary.is_some_and(|s| s.partial),
            outcome: f.outcome,
            error: f.error,
            members,
        };
        let mut list = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        list.push_front(recent);
        list.truncate(RECENT);
    }

    /// Recent queries, newest first.
    pub fn recent(&self) -> Vec<Recent> {
        let list = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        list.iter().cloned().collect()
    }

    /// What this coordinator has seen of each member.
    pub fn members(&self) -> BTreeMap<String, MemberSeen> {
        self.members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Each member's calls, minute by minute, over the hour before `now`.
    pub fn history(
        &self,
        now: SystemTime,
    ) -> BTreeMap<String, Vec<crate::ops::history::MinuteStats>> {
        self.history.series(now)
    }

    /// Folds the latency samples recorded since the last call into the histograms'
    /// buckets. Until then the recorder keeps every sample, so a gateway nobody
    /// scrapes would grow without bound: [`crate::gateway::Gateway`] calls this every
    /// few seconds (rendering does it too).
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// The metrics in Prometheus' text format. `breakers` are the remote members'
    /// breaker states now; `admission` each door's slots now; `audit_records` the
    /// audit log's count; `tls` when the gateway's certificate, the CA and the
    /// revocation lists expire.
    pub fn render(
        &self,
        breakers: &[(String, &'static str)],
        admission: &[(&'static str, crate::ops::admission::Load)],
        audit_records: u64,
        tls: &crate::trust::tls::Expiries,
        audit_export: Option<(u64, u64)>,
    ) -> String {
        // The exported record's seq, and the record the export stopped at because the
        // log does not verify there (0: none).
        if let Some((seq, broken_at)) = audit_export {
            self.recorder
                .register_gauge(&key("fedgate_audit_exported_seq", &[]), &META)
                .set(seq as f64);
            self.recorder
                .register_gauge(&key("fedgate_audit_export_broken_at_seq", &[]), &META)
                .set(broken_at as f64);
        }
        // Timestamps, not seconds left, as Prometheus exporters of certificates do: an
        // alert is `fedgate_certificate_expiry_timestamp_seconds - time() < 30 * 86400`.
        for (what, at) in [("gateway", tls.certificate), ("ca", tls.ca)] {
            self.recorder
                .register_gauge(
                    &key(
                        "fedgate_certificate_expiry_timestamp_seconds",
                        &[("certificate", what.to_string())],
                    ),
                    &META,
                )
                .set(at as f64);
        }
        if let Some(next) = tls.crl_next_update {
            self.recorder
                .register_gauge(
                    &key("fedgate_crl_next_update_timestamp_seconds", &[]),
                    &META,
                )
                .set(next as f64);
        }
        for (door, load) in admission {
            let slots = |class: &str, kind: &str, v: usize| {
                self.recorder
                    .register_gauge(
                        &key(
                            "fedgate_admission_slots",
                            &[
                                ("door", door.to_string()),
                                ("class", class.to_string()),
                                ("slots", kind.to_string()),
                            ],
                        ),
                        &META,
                    )
                    .set(v as f64);
            };
            slots("all", "total", load.total);
            slots("shared", "total", load.shared);
            slots("shared", "in_use", load.shared_in_use);
            for c in &load.classes {
                slots(c.class, "reserved", c.reserved);
                slots(c.class, "in_use", c.in_use);
                if let Some(m) = c.max_concurrent {
                    slots(c.class, "cap", m);
                }
                self.recorder
                    .register_counter(
                        &key(
                            "fedgate_admission_refused_total",
                            &[("door", door.to_string()), ("class", c.class.to_string())],
                        ),
                        &META,
                    )
                    .absolute(c.refused);
            }
        }
        for (member, state) in breakers {
            let v = match *state {
                "open" => 1.0,
                "probing" => 2.0,
                _ => 0.0,
            };
            self.recorder
                .register_gauge(
                    &key("fedgate_breaker_state", &[("member", member.clone())]),
                    &META,
                )
                .set(v);
        }
        self.recorder
            .register_counter(&key("fedgate_audit_records_total", &[]), &META)
            .absolute(audit_records);
        self.handle.run_upkeep();
        self.handle.render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v1::MemberStatus;

    #[test]
    fn a_query_shows_in_metrics_and_recent() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.crt"), "").unwrap();
        std::fs::write(
            dir.path().join("region.toml"),
            r#"
region = "yrd"
ca = "ca.crt"
[[members]]
name = "a"
kind = "city"
endpoint = "https://127.0.0.1:1"
serves = ["d"]
[[datasets]]
name = "d"
cache_fresh_for = "1m"
fields = [{ name = "x", type = "int64" }]
"#,
        )
        .unwrap();
        let region = Region::load(&dir.path().join("region.toml")).unwrap();
        let o = Observer::new();
        let origin = Principal::parse("fedgate://yrd/county/anji").unwrap();
        let summary = QuerySummary {
            query_id: "q1".into(),
            rows: 3,
            members: vec![MemberStatus {
                member: "a".into(),
                state: MemberState::TimedOut as i32,
                elapsed_us: 2_000,
                reason: "no answer within 2 ms".into(),
                datasets: vec!["d".into()],
                ..Default::default()
            }],
            bytes_received: 100,
            ..Default::default()
        };
        o.finished(
            &region,
            Finished {
                origin: &origin,
                sql: "SELECT 1",
                service: None,
                started_at: SystemTime::now(),
                elapsed: Duration::from_millis(5),
                outcome: "failed",
                error: Some("member a timed out".into()),
                summary: Some(&summary),
            },
        );
        let slots = crate::ops::admission::Admission::new(
            4,
            BTreeMap::from([(
                crate::trust::identity::Kind::County,
                crate::ops::admission::ClassLimits {
                    reserved: 1,
                    max_concurrent: None,
                    max_per_origin: None,
                    low_priority: false,
                    rate: None,
                },
            )]),
        );
        let _held = slots
            .try_admit(
                crate::trust::identity::Kind::City,
                "c",
                std::time::Instant::now(),
            )
            .unwrap();
        let text = o.render(
            &[("a".into(), "open")],
            &[("subqueries", slots.load())],
            7,
            &crate::trust::tls::Expiries {
                certificate: 1_900_000_000,
                ca: 2_000_000_000,
                crl_next_update: None,
            },
            Some((5, 0)),
        );
        for want in [
            r#"fedgate_queries_total{class="county",outcome="failed"} 1"#,
            r#"fedgate_member_status_total{member="a",state="timed_out"} 1"#,
            r#"fedgate_breaker_state{member="a"} 1"#,
            "fedgate_audit_records_total 7",
            "fedgate_cache_misses_total 1",
            "fedgate_bytes_received_total 100",
            r#"fedgate_member_call_duration_seconds_bucket{member="a",le="0.0025"} 1"#,
            r#"fedgate_admission_slots{door="subqueries",class="county",slots="reserved"} 1"#,
            r#"fedgate_admission_slots{door="subqueries",class="city",slots="in_use"} 1"#,
            r#"fedgate_admission_slots{door="subqueries",class="shared",slots="in_use"} 1"#,
            r#"fedgate_admission_refused_total{door="subqueries",class="city"} 0"#,
            r#"fedgate_certificate_expiry_timestamp_seconds{certificate="gateway"} 1900000000"#,
            r#"fedgate_certificate_expiry_timestamp_seconds{certificate="ca"} 2000000000"#,
            "fedgate_audit_exported_seq 5",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
        let r = o.recent();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].outcome, "failed");
        assert_eq!(r[0].members[0].state, "timed_out");
        let seen = o.members();
        assert_eq!(seen["a"].failures, 1);
        assert_eq!(
            seen["a"].last_error.as_deref(),
            Some("no answer within 2 ms")
        );
    }
}
