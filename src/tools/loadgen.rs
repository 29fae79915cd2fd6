//! A load generator for a gateway's `Federation.Query` (or a published service's
//! `Federation.Invoke`), used by `fedgate bench` and by the benchmarks.
//!
//! Two modes. **Closed loop**: a fixed number of callers, each sending its next query
//! when the previous one has been answered; it measures service time. **Open loop**:
//! queries start at a fixed arrival rate whatever the gateway does, and each latency
//! is measured from the moment the query was *due*, not from when it was sent. A
//! gateway that stalls therefore shows the whole wait of every query scheduled
//! behind the stall, which is the coordinated-omission correction (the one wrk2
//! makes); a closed loop can only make it approximately, with HdrHistogram's
//! `record_correct` and an expected interval the caller states.
//!
//! Every answer is checked: the gRPC status must be OK, the answer must end with
//! its summary, and every member must be `ok` or `pruned` (a partial answer is an
//! error unless the run allows it). Failures are counted by status code; the report
//! never hides them in the latency figures.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::Mutex;

use crate::proto::v1::{InvokeRequest, MemberState, ParamValue, QueryRequest, param_value};
use crate::tools::client::Client;

/// How queries are sent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// `concurrency` callers, each waiting for its answer before the next query.
    Closed {
        /// Callers.
        concurrency: usize,
        /// Stated interval between one caller's queries, for `record_correct`.
        expected_interval: Option<Duration>,
    },
    /// Queries start at `rate` per second, latency measured from the due time.
    Open {
        /// Arrivals per second.
        rate: f64,
    },
}

/// What to send, how, and for how long.
#[derive(Debug, Clone)]
pub struct Load {
    /// SQL templates, used in turn. `{n}` in a template is replaced by a number drawn
    /// from `range` for every query (a different key per lookup, say), `{n+K}` by
    /// that number plus K.
    pub sql: Vec<String>,
    /// Range (inclusive) of `{n}`.
    pub range: (i64, i64),
    /// Closed or open loop.
    pub mode: Mode,
    /// Measured time (queries still running at its end are awaited and counted).
    pub duration: Duration,
    /// Stop after this many measured queries, if sooner.
    pub max_requests: Option<u64>,
    /// Unmeasured time before, to open connections and warm caches.
    pub warmup: Duration,
    /// Each query's deadline.
    pub timeout: Duration,
    /// Count partial answers as answers.
    pub allow_partial: bool,
    /// Seed of the `{n}` sequence, so that runs can be repeated.
    pub seed: u64,
    /// Call this published service instead of sending `sql`.
    pub service: Option<ServiceCall>,
    /// Ask for a signed receipt with every answer.
    pub receipt: bool,
}

/// A published service called with one parameter, a key drawn from the load's range
/// for every call (as `{n}` is for SQL).
#[derive(Debug, Clone)]
pub struct ServiceCall {
    /// The service's name in the region file.
    pub name: String,
    /// The name of the parameter.
    pub param: String,
    /// Send the key as text (for a `utf8` parameter) rather than as an `int64`.
    pub text: bool,
}

impl Default for Load {
    fn default() -> Self {
        Load {
            sql: Vec::new(),
            range: (1, 1_000_000),
            mode: Mode::Closed {
                concurrency: 1,
                expected_interval: None,
            },
            duration: Duration::from_secs(10),
            max_requests: None,
            warmup: Duration::from_secs(1),
            timeout: Duration::from_secs(30),
            allow_partial: false,
            seed: 1,
            service: None,
            receipt: false,
        }
    }
}

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Latency {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest.
    pub max: u64,
    /// Mean.
    pub mean: f64,
}

/// The outcome of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `closed` or `open`.
    pub mode: &'static str,
    /// Callers (closed loop).
    pub concurrency: Option<usize>,
    /// Arrival rate asked for (open loop).
    pub rate: Option<f64>,
    /// Measured wall time, seconds.
    pub elapsed_s: f64,
    /// Queries measured.
    pub requests: u64,
    /// Complete, checked answers.
    pub ok: u64,
    /// Failed queries by gRPC status code (`partial` for partial answers).
    pub errors: BTreeMap<String, u64>,
    /// The first failure's message, for the eye.
    pub first_error: Option<String>,
    /// Complete answers per second of measured time.
    pub throughput: f64,
    /// Latency of complete answers.
    pub latency_us: Latency,
    /// Rows received in measured answers.
    pub rows: u64,
    /// Most queries in flight at once (open loop).
    pub max_in_flight: u64,
}

impl Report {
    /// Failed queries.
    pub fn failed(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// A small, fast, seedable sequence (xorshift*), enough to pick keys.
pub struct Keys(u64);

impl Keys {
    /// The sequence of this seed.
    pub fn new(seed: u64) -> Keys {
        Keys(seed | 1)
    }

    /// The next key in `lo..=hi`.
    pub fn next(&mut self, (lo, hi): (i64, i64)) -> i64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let r = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let span = (hi - lo + 1).max(1) as u64;
        lo + (r % span) as i64
    }
}

struct Shared {
    hist: Mutex<Histogram<u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
    first_error: Mutex<Option<String>>,
    ok: AtomicU64,
    rows: AtomicU64,
}

/// Sends one query and checks the whole answer; `Ok(rows)` or the failure's class
/// and message.
async fn one(client: &Client, load: &Load, sql: String) -> Result<u64, (String, String)> {
    let mut rows = 0u64;
    let sink = |b: datafusion::arrow::record_batch::RecordBatch| {
        rows += b.num_rows() as u64;
        Ok(())
    };
    let answer = match &load.service {
        None => {
            let q = QueryRequest {
                sql,
                allow_partial: load.allow_partial,
                timeout_ms: load.timeout.as_millis() as u64,
                receipt: load.receipt,
                ..Default::default()
            };
            client.query_each(q, sink).await
        }
        Some(call) => {
            // In service mode the "text" of a call is its key (see `template`).
            let key: i64 = sql
                .parse()
                .map_err(|_| ("key".to_string(), format!("not a key: {sql}")))?;
            let q = InvokeRequest {
                service: call.name.clone(),
                params: [(
                    call.param.clone(),
                    ParamValue {
                        value: Some(if call.text {
                            param_value::Value::Text(key.to_string())
                        } else {
                            param_value::Value::Int64(key)
                        }),
                    },
                )]
                .into(),
                allow_partial: load.allow_partial,
                timeout_ms: load.timeout.as_millis() as u64,
                ..Default::default()
            };
            client.invoke_watched(q, sink, |_| {}).await
        }
    };
    match answer {
        Ok((_, summary)) => {
            // A cached answer is a complete one; a stale answer stands in for a
            // member that failed, which only --allow-partial accepts.
            let bad = summary.members.iter().find(|m| {
                m.state != MemberState::Ok as i32
                    && m.state != MemberState::Pruned as i32
                    && m.state != MemberState::Cached as i32
            });
            match bad {
                Some(m) if !load.allow_partial => Err((
                    "member".into(),
                    format!(
                        "member {} answered {}: {}",
                        m.member,
                        crate::tools::client::state_word(m.state),
                        m.reason
                    ),
                )),
                _ => Ok(rows),
            }
        }
        Err(f) => Err((format!("{:?}", f.status.code()), f.to_string())),
    }
}

/// The `i`-th query of a run: the templates in turn, `{n}` filled from `keys`.
pub fn query_text(sql: &[String], range: (i64, i64), i: u64, keys: &mut Keys) -> String {
    let t = &sql[(i % sql.len() as u64) as usize];
    if t.contains("{n") {
        fill(t, keys.next(range))
    } else {
        t.clone()
    }
}

/// `t` with every `{n}` replaced by `n` and every `{n+K}` by `n + K` (one key range
/// shifted per partition, written as the one number a client would write). Any other
/// brace is left as it is.
fn fill(t: &str, n: i64) -> String {
    let mut out = String::with_capacity(t.len() + 8);
    let mut rest = t;
    while let Some(at) = rest.find("{n") {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        let Some(end) = tail.find('}') else {
            break;
        };
        let inner = &tail[2..end];
        let shift = match inner {
            "" => Some(0),
            _ => inner.strip_prefix('+').and_then(|k| k.parse::<i64>().ok()),
        };
        match shift.and_then(|k| n.checked_add(k)) {
            Some(v) => out.push_str(&v.to_string()),
            None => out.push_str(&tail[..=end]),
        }
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    out
}

/// The `i`-th query's SQL, or in service mode its key.
fn template(load: &Load, i: u64, keys: &mut Keys) -> String {
    if load.service.is_some() {
        return keys.next(load.range).to_string();
    }
    query_text(&load.sql, load.range, i, keys)
}

async fn record(shared: &Shared, load: &Load, took: Duration, r: Result<u64, (String, String)>) {
    match r {
        Ok(rows) => {
            shared.ok.fetch_add(1, Ordering::Relaxed);
            shared.rows.fetch_add(rows, Ordering::Relaxed);
            let us = (took.as_micros() as u64).max(1);
            let mut h = shared.hist.lock().await;
            match load.mode {
                Mode::Closed {
                    expected_interval: Some(e),
                    ..
                } => {
                    // Values are clamped into the bounds first, so this cannot fail.
                    let high = h.high();
                    let _ = h.record_correct(us.min(high), e.as_micros() as u64);
                }
                _ => h.saturating_record(us),
            }
        }
        Err((class, message)) => {
            *shared.errors.lock().await.entry(class).or_default() += 1;
            shared.first_error.lock().await.get_or_insert(message);
        }
    }
}

/// Runs `load` against `client` and reports.
pub async fn run(client: &Client, load: &Load) -> Result<Report, String> {
    if load.sql.is_empty() && load.service.is_none() {
        return Err("no SQL to send".into());
    }
    if load.range.0 > load.range.1 {
        return Err(format!("empty range {}..{}", load.range.0, load.range.1));
    }
    // Warm-up: closed loop, one caller, unmeasured; a failure here is reported as it is.
    let mut keys = Keys::new(load.seed);
    let warm_until = Instant::now() + load.warmup;
    let mut i = 0u64;
    while Instant::now() < warm_until {
        let sql = template(load, i, &mut keys);
        one(client, load, sql)
            .await
            .map_err(|(_, m)| format!("warm-up query failed: {m}"))?;
        i += 1;
    }
    let hist = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)
        .map_err(|e| format!("histogram: {e}"))?;
    let shared = Arc::new(Shared {
        hist: Mutex::new(hist),
        errors: Mutex::new(BTreeMap::new()),
        first_error: Mutex::new(None),
        ok: AtomicU64::new(0),
        rows: AtomicU64::new(0),
    });
    let started = Instant::now();
    let end = started + load.duration;
    let mut max_in_flight = 0u64;
    match load.mode {
        Mode::Closed { concurrency, .. } => {
            let issued = Arc::new(AtomicU64::new(0));
            let keys = Arc::new(std::sync::Mutex::new(keys));
            let mut tasks = Vec::new();
            for _ in 0..concurrency.max(1) {
                let (client, load, shared, keys, issued) = (
                    client.clone(),
                    load.clone(),
                    shared.clone(),
                    keys.clone(),
                    issued.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    while Instant::now() < end {
                        let n = issued.fetch_add(1, Ordering::Relaxed);
                        if load.max_requests.is_some_and(|m| n >= m) {
                            break;
                        }
                        let sql = {
                            let mut k = keys.lock().unwrap_or_else(|p| p.into_inner());
                            template(&load, n, &mut k)
                        };
                        let t = Instant::now();
                        let r = one(&client, &load, sql).await;
                        record(&shared, &load, t.elapsed(), r).await;
                    }
                }));
            }
            for t in tasks {
                t.await.map_err(|e| format!("load task: {e}"))?;
            }
            max_in_flight = concurrency as u64;
        }
        Mode::Open { rate } => {
            if rate.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
                return Err(format!("arrival rate {rate} must be positive"));
            }
            let in_flight = Arc::new(AtomicU64::new(0));
            let mut tasks = tokio::task::JoinSet::new();
            let mut n = 0u64;
            loop {
                let due = started + Duration::from_secs_f64(n as f64 / rate);
                if due >= end || load.max_requests.is_some_and(|m| n >= m) {
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
                let sql = template(load, n, &mut keys);
                let (client, load2, shared, in_flight) = (
                    client.clone(),
                    load.clone(),
                    shared.clone(),
                    in_flight.clone(),
                );
                let now = in_flight.fetch_add(1, Ordering::Relaxed) + 1;
                max_in_flight = max_in_flight.max(now);
                tasks.spawn(async move {
                    let r = one(&client, &load2, sql).await;
                    // From the due time, not the send time: see the module comment.
                    record(&shared, &load2, due.elapsed(), r).await;
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                });
                n += 1;
                // Reap finished tasks so a long run does not keep every handle.
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let h = shared.hist.lock().await;
    let errors = shared.errors.lock().await.clone();
    let ok = shared.ok.load(Ordering::Relaxed);
    let first_error = shared.first_error.lock().await.clone();
    let q = |p: f64| {
        if h.is_empty() {
            0
        } else {
            h.value_at_quantile(p)
        }
    };
    Ok(Report {
        mode: match load.mode {
            Mode::Closed { .. } => "closed",
            Mode::Open { .. } => "open",
        },
        concurrency: match load.mode {
            Mode::Closed { concurrency, .. } => Some(concurrency),
            Mode::Open { .. } => None,
        },
        rate: match load.mode {
            Mode::Open { rate } => Some(rate),
            Mode::Closed { .. } => None,
        },
        elapsed_s: elapsed,
        requests: ok + errors.values().sum::<u64>(),
        ok,
        errors,
        first_error,
        throughput: ok as f64 / elapsed,
        latency_us: Latency {
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            max: h.max(),
            mean: if h.is_empty() { 0.0 } else { h.mean() },
        },
        rows: shared.rows.load(Ordering::Relaxed),
        max_in_flight,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_the_key_and_shifted_keys() {
        assert_eq!(fill("id = {n}", 7), "id = 7");
        assert_eq!(
            fill("id = {n+250000} OR id = {n}", 7),
            "id = 250007 OR id = 7"
        );
        assert_eq!(
            fill("x = '{n' AND y = {m} {n+z}", 7),
            "x = '{n' AND y = {m} {n+z}"
        );
    }

    #[test]
    fn keys_stay_in_range_and_repeat_with_the_seed() {
        let (mut a, mut b) = (Keys(7), Keys(7));
        for _ in 0..10_000 {
            let x = a.next((5, 9));
            assert!((5..=9).contains(&x));
            assert_eq!(x, b.next((5, 9)));
        }
        let mut c = Keys(9);
        let seen: std::collections::BTreeSet<i64> = (0..1000).map(|_| c.next((1, 4))).collect();
        assert_eq!(seen.len(), 4, "every key of a small range is drawn");
    }

    #[test]
    fn templates_take_turns_and_fill_in_keys() {
        let load = Load {
            sql: vec!["SELECT {n}".into(), "SELECT 1".into()],
            range: (3, 3),
            ..Default::default()
        };
        let mut k = Keys(1);
        assert_eq!(template(&load, 0, &mut k), "SELECT 3");
        assert_eq!(template(&load, 1, &mut k), "SELECT 1");
    }
}
