//! Per-query state shared by the member scans of one query: who was asked, who
//! answered, with how many rows, and why the others did not.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, MemberFailure};
use crate::proto::v1::{MemberState, MemberStatus};
use crate::trust::identity::Principal;

/// Everything a query's member scans need to know and report.
#[derive(Debug)]
pub struct QueryState {
    /// Correlates logs at the coordinator and at members.
    pub query_id: String,
    /// The original caller.
    pub origin: Principal,
    /// This gateway's own identity (the first element of every forwarded path).
    pub coordinator: Principal,
    /// When the query started.
    pub started: Instant,
    /// When member answers must be complete (leaves time to merge before the
    /// caller's deadline).
    pub member_deadline: Instant,
    /// Whether missing members are reported instead of failing the query.
    pub allow_partial: bool,
    /// The purpose the caller stated; it travels with every sub-query.
    pub purpose: Option<String>,
    /// The origin's assertion (an encoded `SignedOriginAssertion`) when this gateway
    /// is not the origin's own; it travels with every sub-query.
    pub assertion: Option<Arc<Vec<u8>>>,
    /// The incident the query is asked under (an encoded signed declaration); it
    /// travels with every sub-query, and no answer under it is cached.
    pub incident: Option<Arc<Vec<u8>>>,
    /// Whether members are asked for signed statements of their answers.
    pub receipt: bool,
    /// With a receipt asked for: every member scan that ended, with the sub-query's
    /// hash and the member's statement (none when its answer ended before it).
    statements: Mutex<Vec<Stated>>,
    /// The query's span, parent of its member calls.
    pub span: tracing::Span,
    /// Region member names in file order, for a stable summary.
    order: Vec<String>,
    members: Mutex<BTreeMap<String, Entry>>,
}

/// One member scan's part of a receipt.
#[derive(Debug, Clone)]
pub struct Stated {
    /// The member asked.
    pub member: String,
    /// SHA-256 of the sub-query sent.
    pub sub_query_sha256: String,
    /// Its signed statement, when its answer reached its end.
    pub statement: Option<Vec<u8>>,
}

#[derive(Debug, Clone)]
struct Entry {
    state: MemberState,
    rows: u64,
    bytes: u64,
    elapsed: Duration,
    reason: String,
    datasets: BTreeSet<String>,
    access: BTreeSet<String>,
    audit_hashes: Vec<String>,
    /// The member's own time as it reported it (the longest of its sub-queries).
    member_elapsed_us: u64,
    /// Why earlier attempts failed, for sub-queries that were retried.
    retries: Vec<String>,
    /// Age of the oldest cached answer served for this member.
    age: Option<Duration>,
    /// Sub-queries asked and not yet finished, for progress reports.
    open: u32,
}

/// Severity of a state: when one member gets several sub-queries, the summary
/// shows the worst outcome.
fn severity(s: MemberState) -> u8 {
    match s {
        MemberState::Unspecified | MemberState::Running => 0,
        MemberState::Pruned => 1,
        MemberState::Cancelled => 2,
        MemberState::Ok => 2,
        MemberState::Cached => 2,
        MemberState::Stale => 3,
        MemberState::Denied => 4,
        MemberState::Busy => 4,
        MemberState::TimedOut => 5,
        MemberState::Unavailable => 6,
        MemberState::Error => 7,
    }
}

impl QueryState {
    /// Starts a query's state.
    pub fn new(
        query_id: String,
        origin: Principal,
        coordinator: Principal,
        member_budget: Duration,
        allow_partial: bool,
        order: Vec<String>,
    ) -> QueryState {
        let started = Instant::now();
        QueryState {
            query_id,
            origin,
            coordinator,
            started,
            member_deadline: started + member_budget,
            allow_partial,
            purpose: None,
            assertion: None,
            incident: None,
            receipt: false,
            statements: Mutex::new(Vec::new()),
            span: tracing::Span::none(),
            order,
            members: Mutex::new(BTreeMap::new()),
        }
    }

    fn update(&self, member: &str, dataset: &str, f: impl FnOnce(&mut Entry)) {
        let mut m = self.members.lock().unwrap_or_else(|p| p.into_inner());
        let e = m.entry(member.to_string()).or_insert_with(|| Entry {
            state: MemberState::Unspecified,
            rows: 0,
            bytes: 0,
            elapsed: Duration::ZERO,
            reason: String::new(),
            datasets: BTreeSet::new(),
            access: BTreeSet::new(),
            audit_hashes: Vec::new(),
            member_elapsed_us: 0,
            retries: Vec::new(),
            age: None,
            open: 0,
        });
        e.datasets.insert(dataset.to_string());
        f(e);
    }

    fn set_state(e: &mut Entry, s: MemberState, reason: String) {
        // A member asked for several datasets shows its worst outcome. Ok, Cached
        // and Cancelled rank equal: a later definite outcome replaces a pending one.
        if severity(s) > severity(e.state)
            || (severity(s) == severity(e.state)
                && matches!(s, MemberState::Ok | MemberState::Cached)
                && e.state == MemberState::Cancelled)
        {
            e.state = s;
            e.reason = reason;
        }
    }

    /// Records that `member` was not asked for `dataset` because the query's filter
    /// on `member` excludes it.
    pub fn pruned(&self, member: &str, dataset: &str) {
        self.update(member, dataset, |e| {
            Self::set_state(
                e,
                MemberState::Pruned,
                "excluded by the query's filter on member".into(),
            )
        });
    }

    /// Records that `member` is asked for `dataset`; until an outcome is recorded the
    /// member counts as cancelled (the query ended before it finished).
    pub fn asked(&self, member: &str, dataset: &str) {
        self.update(member, dataset, |e| {
            e.open += 1;
            Self::set_state(
                e,
                MemberState::Cancelled,
                "the query ended before this member's answer was complete".into(),
            )
        });
    }

    /// Records a sub-query stopped before its end by the coordinator.
    pub fn stopped(&self, member: &str, dataset: &str, rows: u64, elapsed: std::time::Duration) {
        self.update(member, dataset, |e| {
            e.open = e.open.saturating_sub(1);
            e.rows += rows;
            e.elapsed = e.elapsed.max(elapsed);
            Self::set_state(
                e,
                MemberState::Cancelled,
                "stopped early: the query needed no more rows, or ended".into(),
            )
        });
    }

    /// Records a completed sub-query.
    pub fn answered(&self, member: &str, dataset: &str, rows: u64, elapsed: Duration) {
        self.update(member, dataset, |e| {
            e.open = e.open.saturating_sub(1);
            e.rows += rows;
            e.elapsed = e.elapsed.max(elapsed);
            Self::set_state(e, MemberState::Ok, String::new());
        });
    }

    /// Records a sub-query answered from the cache, `age` old.
    pub fn cached(&self, member: &str, dataset: &str, rows: u64, age: Duration) {
        self.update(member, dataset, |e| {
            e.open = e.open.saturating_sub(1);
            e.rows += rows;
            e.age = Some(e.age.map_or(age, |a| a.max(age)));
            Self::set_state(
                e,
                MemberState::Cached,
                format!(
                    "answered from this coordinator's cache ({} ms old)",
                    age.as_millis()
                ),
            );
        });
    }

    /// Records a failed sub-query answered instead with a cached answer `age` old.
    pub fn stale(&self, member: &str, dataset: &str, rows: u64, age: Duration, why: &Error) {
        let why = why.reason();
        self.update(member, dataset, |e| {
            e.open = e.open.saturating_sub(1);
            e.rows += rows;
            e.age = Some(e.age.map_or(age, |a| a.max(age)));
            Self::set_state(
                e,
                MemberState::Stale,
                format!(
                    "{why}; served its cached answer from {} ms ago instead",
                    age.as_millis()
                ),
            );
        });
    }

    /// Records a failed sub-query.
    pub fn failed(&self, member: &str, dataset: &str, err: &Error, rows: u64, elapsed: Duration) {
        let state = match err {
            Error::Member { failure, .. } => match failure {
                MemberFailure::Unavailable => MemberState::Unavailable,
                MemberFailure::TimedOut => MemberState::TimedOut,
                MemberFailure::Denied => MemberState::Denied,
                MemberFailure::Busy(_) => MemberState::Busy,
                MemberFailure::Failed => MemberState::Error,
            },
            _ => MemberState::Error,
        };
        let reason = err.reason();
        self.update(member, dataset, |e| {
            e.open = e.open.saturating_sub(1);
            e.rows += rows;
            e.elapsed = e.elapsed.max(elapsed);
            Self::set_state(e, state, reason);
        });
    }

    /// Records what `member` said about how it shared `dataset` and the hash of its
    /// audit record.
    pub fn noted(&self, member: &str, dataset: &str, note: &crate::owner::Note) {
        let access = note.access();
        let hash = note.audit_hash.get().cloned();
        let member_elapsed_us = note.elapsed_us.get().copied().unwrap_or(0);
        let retries = note.retries();
        if self.receipt {
            self.statements
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Stated {
                    member: member.to_string(),
                    sub_query_sha256: note.sub_query_sha256.get().cloned().unwrap_or_default(),
                    statement: note.statement.get().cloned(),
                });
        }
        self.update(member, dataset, |e| {
            if !access.is_empty() {
                e.access.insert(access);
            }
            e.audit_hashes.extend(hash);
            e.member_elapsed_us = e.member_elapsed_us.max(member_elapsed_us);
            e.retries.extend(retries);
        });
    }

    /// Every member scan's statement of its answer (with a receipt asked for).
    pub fn statements(&self) -> Vec<Stated> {
        self.statements
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Adds Arrow IPC bytes received from `member`.
    pub fn received(&self, member: &str, dataset: &str, bytes: u64) {
        self.update(member, dataset, |e| e.bytes += bytes);
    }

    /// Total Arrow IPC bytes received from members.
    pub fn bytes_received(&self) -> u64 {
        let m = self.members.lock().unwrap_or_else(|p| p.into_inner());
        m.values().map(|e| e.bytes).sum()
    }

    /// True when any member that should have answered did not.
    pub fn is_partial(&self) -> bool {
        let m = self.members.lock().unwrap_or_else(|p| p.into_inner());
        m.values().any(|e| {
            // A stale answer is complete but old; the summary says how old.
            !matches!(
                e.state,
                MemberState::Ok
                    | MemberState::Pruned
                    | MemberState::Cancelled
                    | MemberState::Cached
                    | MemberState::Stale
            )
        })
    }

    /// The members' states so far, for progress reports: a member asked that has
    /// not finished is `running`.
    pub fn progress(&self) -> Vec<MemberStatus> {
        let running: BTreeSet<String> = {
            let m = self.members.lock().unwrap_or_else(|p| p.into_inner());
            m.iter()
                .filter(|(_, e)| e.open > 0)
                .map(|(n, _)| n.clone())
                .collect()
        };
        let mut v = self.statuses();
        for s in &mut v {
            if running.contains(&s.member) {
                s.state = MemberState::Running as i32;
                s.reason.clear();
            }
        }
        v
    }

    /// One status per member asked or pruned, in region order.
    pub fn statuses(&self) -> Vec<MemberStatus> {
        let m = self.members.lock().unwrap_or_else(|p| p.into_inner());
        let pos = |n: &str| self.order.iter().position(|o| o == n).unwrap_or(usize::MAX);
        let mut v: Vec<_> = m
            .iter()
            .map(|(name, e)| MemberStatus {
                member: name.clone(),
                state: e.state as i32,
                rows: e.rows,
                elapsed_us: e.elapsed.as_micros() as u64,
                reason: if e.reason.is_empty() && !e.retries.is_empty() {
                    // An answer that needed a retry is complete, but the caller
                    // should see that the link is flaky.
                    format!(
                        "answered after {} retried attempt(s); first failure: {}",
                        e.retries.len(),
                        e.retries[0]
                    )
                } else {
                    e.reason.clone()
                },
                datasets: e.datasets.iter().cloned().collect(),
                bytes_received: e.bytes,
                access: e.access.iter().cloned().collect::<Vec<_>>().join("; "),
                audit_hash: e.audit_hashes.join(","),
                age_ms: e.age.map_or(0, |a| a.as_millis() as u64),
                member_elapsed_us: e.member_elapsed_us,
            })
            .collect();
        v.sort_by_key(|s| (pos(&s.member), s.member.clone()));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> QueryState {
        let p = Principal::parse("fedgate://yrd/office/coordination").unwrap();
        let c = Principal::parse("fedgate://yrd/city/shanghai").unwrap();
        QueryState::new(
            "q".into(),
            p,
            c,
            Duration::from_secs(1),
            true,
            vec!["shanghai".into(), "hefei".into()],
        )
    }

    #[test]
    fn the_worst_outcome_of_a_member_is_reported() {
        let s = state();
        s.answered("hefei", "census", 12, Duration::from_millis(3));
        let err = Error::Member {
            member: "hefei".into(),
            failure: MemberFailure::TimedOut,
            reason: "slow".into(),
        };
        s.failed("hefei", "divisions", &err, 0, Duration::from_millis(9));
        s.answered("shanghai", "census", 16, Duration::from_millis(2));
        let st = s.statuses();
        assert_eq!(st[0].member, "shanghai");
        assert_eq!(st[1].state, MemberState::TimedOut as i32);
        assert_eq!(st[1].rows, 12);
        assert_eq!(st[1].reason, "slow");
        assert_eq!(st[1].datasets, vec!["census", "divisions"]);
        assert!(s.is_partial());
    }

    #[test]
    fn members_asked_but_never_finished_are_reported_cancelled() {
        let s = state();
        s.asked("shanghai", "census");
        s.asked("hefei", "census");
        s.answered("hefei", "census", 12, Duration::from_millis(3));
        let st = s.statuses();
        assert_eq!(st[0].state, MemberState::Cancelled as i32);
        assert!(st[0].reason.contains("ended before"));
        assert_eq!(st[1].state, MemberState::Ok as i32);
        assert!(!s.is_partial());
    }

    #[test]
    fn progress_shows_members_with_unfinished_sub_queries_as_running() {
        let s = state();
        s.asked("shanghai", "census");
        s.asked("hefei", "census");
        s.asked("hefei", "divisions");
        s.answered("shanghai", "census", 16, Duration::from_millis(2));
        s.answered("hefei", "census", 12, Duration::from_millis(3));
        let p = s.progress();
        assert_eq!(p[0].state, MemberState::Ok as i32);
        assert_eq!(
            p[1].state,
            MemberState::Running as i32,
            "one of two still open"
        );
        assert_eq!(p[1].rows, 12);
        s.answered("hefei", "divisions", 1, Duration::from_millis(3));
        assert_eq!(s.progress()[1].state, MemberState::Ok as i32);
    }

    #[test]
    fn pruned_members_do_not_make_an_answer_partial() {
        let s = state();
        s.pruned("hefei", "census");
        s.answered("shanghai", "census", 16, Duration::from_millis(2));
        assert!(!s.is_partial());
        assert_eq!(s.statuses()[1].state, MemberState::Pruned as i32);
    }
}
