//! One member's scan as a stream: connect, wait for the member, read its batches and shape
//! them into the canonical schema; replay a cached answer (or a stale one when the member
//! fails and the policy allows it), tee a fresh answer into the cache, and account its
//! bytes. Failures end the stream with the member's status recorded.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use datafusion::arrow::array::RecordBatchOptions;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::error::Result as DfResult;
use futures::future::BoxFuture;
use futures::{FutureExt, Stream, StreamExt};

use super::client::MemberStream;
use super::results::{CachePolicy, CachedAnswer, LeaderGuard, ResultCache, ResultKey};
use super::state::QueryState;
use crate::error::{Error, MemberFailure, Result};

pub(crate) enum Phase {
    /// An identical sub-query is in flight: wait for it, then use its answer from
    /// the cache, or ask the member (the future kept here) if it stored none.
    Waiting(
        BoxFuture<'static, ()>,
        Option<BoxFuture<'static, Result<MemberStream>>>,
    ),
    Connecting(BoxFuture<'static, Result<MemberStream>>),
    Streaming(MemberStream),
    /// Serving a cached answer: fresh, or stale in place of the member's failure.
    Replay {
        batches: std::vec::IntoIter<RecordBatch>,
        age: Duration,
        failure: Option<Error>,
    },
    Done,
}

/// A scan's use of the coordinator's result cache.
pub(crate) struct ScanCache {
    pub(crate) policy: CachePolicy,
    pub(crate) results: Arc<ResultCache>,
    pub(crate) key: ResultKey,
    /// The answer being collected for the cache, while this scan leads its key.
    pub(crate) tee: Option<Tee>,
}

pub(crate) struct Tee {
    pub(crate) batches: Vec<RecordBatch>,
    pub(crate) bytes: u64,
    /// Released (waking identical sub-queries) when the answer is stored or given
    /// up on.
    pub(crate) _guard: LeaderGuard,
}

/// One member's part of a scan: records the member's outcome in the query state,
/// enforces the member deadline, and shapes batches to the expected schema.
pub(crate) struct ScanStream {
    pub(crate) phase: Phase,
    pub(crate) deadline: Pin<Box<tokio::time::Sleep>>,
    pub(crate) member: String,
    pub(crate) dataset: String,
    pub(crate) state: Arc<QueryState>,
    pub(crate) schema: SchemaRef,
    pub(crate) projection: Option<Vec<usize>>,
    pub(crate) received: Arc<std::sync::atomic::AtomicU64>,
    pub(crate) note: Arc<crate::owner::Note>,
    /// A remote member's breaker, told when the member runs out of its budget.
    pub(crate) health: Option<Arc<crate::coordinator::breaker::MemberHealth>>,
    /// The result cache, for datasets whose answers may be reused.
    pub(crate) cache: Option<ScanCache>,
    pub(crate) rows: u64,
    pub(crate) started: Instant,
    /// The member call's span, open for as long as the scan runs.
    pub(crate) _span: tracing::Span,
}

impl ScanStream {
    /// A cached answer fresh enough to serve without asking the member.
    pub(crate) fn fresh_hit(&self, now: Instant) -> Option<Arc<CachedAnswer>> {
        let c = self.cache.as_ref()?;
        c.results.get(&c.key).filter(|h| h.is_fresh(now))
    }

    /// Serves `hit` from now on; `failure` is the member's failure it stands in for.
    pub(crate) fn start_replay(
        &mut self,
        hit: Arc<CachedAnswer>,
        now: Instant,
        failure: Option<Error>,
    ) {
        if let Some(c) = &mut self.cache {
            c.tee = None;
        }
        self.note.set_access(hit.access.clone());
        if let Some(h) = &hit.audit_hash {
            let _ = self.note.audit_hash.set(h.clone());
        }
        self.phase = Phase::Replay {
            batches: hit.batches.clone().into_iter(),
            age: hit.age(now),
            failure,
        };
    }

    /// The next batch of a cached answer, or its end (recorded in the summary).
    fn replay_next(&mut self) -> Poll<Option<DfResult<RecordBatch>>> {
        let Phase::Replay { batches, .. } = &mut self.phase else {
            return Poll::Ready(None);
        };
        match batches.next() {
            Some(b) => match self.shape(b) {
                Ok(b) => {
                    self.rows += b.num_rows() as u64;
                    Poll::Ready(Some(Ok(b)))
                }
                // No second stand-in for a cached answer that does not fit.
                Err(e) => self.give_up(e),
            },
            None => {
                self.finish_replay();
                Poll::Ready(None)
            }
        }
    }

    fn finish_replay(&mut self) {
        if let Phase::Replay { age, failure, .. } = std::mem::replace(&mut self.phase, Phase::Done)
        {
            self.record_bytes();
            match failure {
                None => self
                    .state
                    .cached(&self.member, &self.dataset, self.rows, age),
                Some(e) => self
                    .state
                    .stale(&self.member, &self.dataset, self.rows, age, &e),
            }
        }
    }

    /// Keeps a copy of a member's batch for the cache, until the answer outgrows
    /// what one entry may hold.
    fn tee(&mut self, b: &RecordBatch) {
        let Some(c) = &mut self.cache else { return };
        let Some(t) = &mut c.tee else { return };
        let size = b.get_array_memory_size() as u64;
        if t.bytes + size > c.results.max_entry_bytes() {
            c.tee = None;
        } else {
            t.bytes += size;
            t.batches.push(b.clone());
        }
    }

    /// Stores a complete answer collected by [`ScanStream::tee`].
    fn store(&mut self) {
        let Some(c) = &mut self.cache else { return };
        let Some(t) = c.tee.take() else { return };
        c.results.insert(
            c.key.clone(),
            CachedAnswer {
                rows: t.batches.iter().map(|b| b.num_rows() as u64).sum(),
                batches: t.batches,
                bytes: t.bytes,
                stored: Instant::now(),
                access: self.note.access(),
                audit_hash: self.note.audit_hash.get().cloned(),
                policy: c.policy,
            },
        );
        // The guard drops here, after the answer is stored.
    }

    /// A cached answer that may stand in for this member's failure `e`: only when
    /// no row of the member's own answer was passed on, and never for a refusal.
    fn stale_for(&mut self, e: &Error) -> Option<Arc<CachedAnswer>> {
        let c = self.cache.as_mut()?;
        c.tee = None;
        let denied = matches!(
            e,
            Error::Member {
                failure: MemberFailure::Denied,
                ..
            }
        );
        if self.rows > 0 || denied {
            return None;
        }
        c.results
            .get(&c.key)
            .filter(|h| h.is_usable_stale(Instant::now()))
    }
}

impl ScanStream {
    /// Moves the byte count and the member's note into the query state (once, when
    /// the scan ends).
    fn record_bytes(&self) {
        let n = self.received.swap(0, std::sync::atomic::Ordering::Relaxed);
        if n > 0 {
            self.state.received(&self.member, &self.dataset, n);
        }
        self.state.noted(&self.member, &self.dataset, &self.note);
    }
}

impl ScanStream {
    /// The member failed: its stale answer stands in if there is one, else the
    /// failure is recorded.
    fn fail(&mut self, e: Error) -> Poll<Option<DfResult<RecordBatch>>> {
        if let Some(hit) = self.stale_for(&e) {
            tracing::warn!(query_id = %self.state.query_id, member = %self.member, error = %e, "Member failed; serving its cached answer");
            self.start_replay(hit, Instant::now(), Some(e));
            return self.replay_next();
        }
        self.give_up(e)
    }

    /// Records the failure and ends this member's part (the query fails unless
    /// partial answers are allowed).
    fn give_up(&mut self, e: Error) -> Poll<Option<DfResult<RecordBatch>>> {
        self.phase = Phase::Done;
        self.record_bytes();
        self.state.failed(
            &self.member,
            &self.dataset,
            &e,
            self.rows,
            self.started.elapsed(),
        );
        tracing::warn!(query_id = %self.state.query_id, member = %self.member, error = %e, "Member did not answer");
        if self.state.allow_partial {
            Poll::Ready(None)
        } else {
            Poll::Ready(Some(Err(e.into_datafusion())))
        }
    }

    fn timed_out(&mut self) -> Poll<Option<DfResult<RecordBatch>>> {
        let budget = self
            .state
            .member_deadline
            .saturating_duration_since(self.started);
        if let Some(h) = &self.health {
            h.timed_out(Instant::now(), budget);
        }
        let e = Error::Member {
            member: self.member.clone(),
            failure: MemberFailure::TimedOut,
            reason: format!("no complete answer within its budget of {budget:?}"),
        };
        self.fail(e)
    }

    /// Casts a member's batch to the canonical types and drops columns not asked for.
    fn shape(&self, b: RecordBatch) -> Result<RecordBatch> {
        let b = match &self.projection {
            Some(p) if !p.is_empty() => b.project(p).map_err(|e| Error::Member {
                member: self.member.clone(),
                failure: MemberFailure::Failed,
                reason: format!("answer lacks expected columns: {e}"),
            })?,
            _ => b,
        };
        if self.schema.fields().is_empty() {
            let opts = RecordBatchOptions::new().with_row_count(Some(b.num_rows()));
            return RecordBatch::try_new_with_options(self.schema.clone(), vec![], &opts)
                .map_err(|e| Error::Internal(e.to_string()));
        }
        if b.schema() == self.schema {
            return Ok(b);
        }
        if b.num_columns() != self.schema.fields().len() {
            return Err(Error::Member {
                member: self.member.clone(),
                failure: MemberFailure::Failed,
                reason: format!(
                    "answered {} columns, expected {}",
                    b.num_columns(),
                    self.schema.fields().len()
                ),
            });
        }
        let cols = b
            .columns()
            .iter()
            .zip(self.schema.fields())
            .map(|(c, f)| cast(c, f.data_type()))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::Member {
                member: self.member.clone(),
                failure: MemberFailure::Failed,
                reason: format!("answer does not fit the canonical schema: {e}"),
            })?;
        RecordBatch::try_new(self.schema.clone(), cols).map_err(|e| Error::Member {
            member: self.member.clone(),
            failure: MemberFailure::Failed,
            reason: format!("answer does not fit the canonical schema: {e}"),
        })
    }
}

impl Stream for ScanStream {
    type Item = DfResult<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        // Past its budget a member is cancelled, even if its answer is ready now:
        // the time left belongs to the merge.
        if !matches!(this.phase, Phase::Done | Phase::Replay { .. })
            && Instant::now() >= this.state.member_deadline
        {
            return this.timed_out();
        }
        loop {
            match &mut this.phase {
                Phase::Done => return Poll::Ready(None),
                Phase::Replay { .. } => return this.replay_next(),
                Phase::Waiting(wait, connect) => match wait.poll_unpin(cx) {
                    Poll::Ready(()) => {
                        let connect = connect.take();
                        let now = Instant::now();
                        match (this.fresh_hit(now), connect) {
                            (Some(hit), _) => this.start_replay(hit, now, None),
                            (None, Some(c)) => this.phase = Phase::Connecting(c),
                            (None, None) => {
                                return this.fail(Error::Internal(
                                    "a waiting member scan lost its request".into(),
                                ));
                            }
                        }
                    }
                    Poll::Pending => break,
                },
                Phase::Connecting(f) => match f.poll_unpin(cx) {
                    Poll::Ready(Ok(s)) => this.phase = Phase::Streaming(s),
                    Poll::Ready(Err(e)) => return this.fail(e),
                    Poll::Pending => break,
                },
                Phase::Streaming(s) => match s.poll_next_unpin(cx) {
                    Poll::Ready(Some(Ok(b))) => {
                        this.tee(&b);
                        match this.shape(b) {
                            Ok(b) => {
                                this.rows += b.num_rows() as u64;
                                return Poll::Ready(Some(Ok(b)));
                            }
                            Err(e) => return this.fail(e),
                        }
                    }
                    Poll::Ready(Some(Err(e))) => return this.fail(e),
                    Poll::Ready(None) => {
                        this.phase = Phase::Done;
                        this.store();
                        this.record_bytes();
                        this.state.answered(
                            &this.member,
                            &this.dataset,
                            this.rows,
                            this.started.elapsed(),
                        );
                        return Poll::Ready(None);
                    }
                    Poll::Pending => break,
                },
            }
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            return this.timed_out();
        }
        Poll::Pending
    }
}

impl Drop for ScanStream {
    fn drop(&mut self) {
        // Dropped before the end: the coordinator needed no more rows (a LIMIT was
        // met) or the query ended for another reason. The member was not at fault.
        if matches!(self.phase, Phase::Replay { .. }) {
            self.finish_replay();
        } else if !matches!(self.phase, Phase::Done) {
            self.record_bytes();
            self.state.answered(
                &self.member,
                &self.dataset,
                self.rows,
                self.started.elapsed(),
            );
        }
    }
}
