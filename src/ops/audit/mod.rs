//! A hash-chained, tamper-evident audit log.
//!
//! Every member gateway appends one [`AuditEntry`] per sub-query it answered or
//! refused, and the coordinator one per client query. [`AuditLog`] appends records;
//! [`verify`] (and `fedgate audit verify FILE`) checks a log without changing it.
//!
//! # On-disk format and hash scheme
//!
//! The log is a file of JSON lines, one record per line, each ending with `\n`:
//!
//! ```text
//! {"seq":1,"prev":"0000…0000","entry":{"kind":"sub_query",…},"hash":"9f2c…"}
//! ```
//!
//! `seq` counts records from 1 without gaps, and `prev` is the `hash` of the record
//! before it ([`GENESIS`], 64 zeros, for record 1). `hash` is the lowercase hex
//! SHA-256 of the line's exact bytes from its opening `{` up to but excluding the
//! `,"hash":"` that ends it, so it covers `seq`, `prev` and the entry as written.
//! The verifier recomputes it from the raw bytes of each line and never from values it
//! parsed and serialized again, so any edit is detected, even one that leaves the JSON
//! meaning unchanged (an escaped character, added white space). A record can be checked
//! by hand with standard tools:
//!
//! ```text
//! sed -n 5p audit.log | sed 's/,"hash":"[0-9a-f]*"}$//' | tr -d '\n' | sha256sum
//! ```
//!
//! # What the chain proves, and what it does not
//!
//! The hashes are not keyed. Within one file the chain shows that no record was
//! altered, removed from the middle, inserted or reordered, *unless* every record from
//! the edit to the end was rewritten with new hashes, which anyone who can write the
//! file can do. Removing whole records from the end leaves a valid shorter chain. Both
//! are caught only against a receipt kept somewhere else: every append returns a
//! [`Receipt`] (seq and hash); the coordinator keeps each member's in its own record
//! ([`MemberOutcome::audit_hash`]), and [`verify_against`] checks that a log still
//! contains a witnessed record with its witnessed hash.
//!
//! # Crashes
//!
//! Each record is written with one write call, and is on disk (`sync_data`, shared by
//! the appends that arrive together: group commit) before its append returns, so a
//! gateway that is killed leaves at most one incomplete record at the end of the file,
//! and every record whose receipt was handed out is complete. [`verify`]
//! reports it; [`AuditLog::open`] cuts it off and appends a [`EntryKind::Recovered`]
//! record saying how many bytes were discarded, so the cut itself is on the record.
//! Any other break makes `open` fail: a gateway never silently starts a new chain.

use std::fmt;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

pub mod export;
mod verify;

use verify::scan_reader;
pub use verify::{
    Broken, VerifyReport, verify, verify_against, verify_bytes, verify_bytes_against,
};

/// The `prev` of record 1 and the hash of the head of an empty log: 64 zeros.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The bytes that end a record's hashed part and begin its hash.
const HASH_MARKER: &[u8] = b",\"hash\":\"";

/// The bytes every record line begins with.
const RECORD_START: &[u8] = b"{\"seq\":";

/// What an audit record describes.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// A member's answer to, or refusal of, one sub-query from a coordinator.
    #[default]
    SubQuery,
    /// A coordinator's handling of one client query.
    Query,
    /// The log was reopened after a crash and an incomplete record was cut off.
    Recovered,
    /// A member showed the database statements a sub-query would run (`Peer.Explain`),
    /// or refused to. Nothing was read, but what a caller learns of the statements is
    /// on the record like an answer.
    Explain,
    /// A member took an incident declaration (a declaration, renewal or end) into its
    /// register: what it says is in [`AuditEntry::declaration`].
    Declaration,
}

/// How a query or sub-query ended.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Rows were returned.
    Answered,
    /// Access rules refused it. This is the default so that an entry whose decision
    /// was never set does not claim that data was released.
    #[default]
    Refused,
    /// It was permitted but failed while running.
    Failed,
    /// The caller went away or the deadline passed before it finished.
    Cancelled,
}

/// One audited event: a sub-query at a member, or a client query at a coordinator.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuditEntry {
    /// What the record describes.
    pub kind: EntryKind,
    /// When, in RFC 3339 UTC with milliseconds (see [`AuditEntry::now_utc`]).
    pub time: String,
    /// The query's id, shared by the coordinator's record and its members' records.
    pub query_id: String,
    /// The calling gateway's identity URI (sub-queries), or empty (client queries).
    pub via: String,
    /// The original caller's identity URI.
    pub origin: String,
    /// The purpose the caller declared, if any.
    pub purpose: Option<String>,
    /// The canonical datasets read.
    pub datasets: Vec<String>,
    /// Hex SHA-256 of the SQL actually run (the rewritten SQL or plan text); see
    /// [`sql_hash`]. The SQL itself is not stored, since it can contain personal data.
    pub sql_sha256: String,
    /// How it ended.
    pub decision: Decision,
    /// The access rule that decided, e.g. `access[2]`.
    pub rule: Option<String>,
    /// The access level granted, e.g. `masked` or `aggregate(k=10)`.
    pub level: Option<String>,
    /// Why it was refused or failed, or what a `recovered` record discarded.
    pub reason: Option<String>,
    /// Rows returned.
    pub rows: u64,
    /// Bytes returned (for a `recovered` record: bytes discarded).
    pub bytes: u64,
    /// For client queries: which members were asked and how each answered.
    pub members: Vec<MemberOutcome>,
    /// The incident the query was asked under (its number), whether or not it opened
    /// anything; absent for queries asked under none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incident: Option<String>,
    /// For a `declaration` record: what the declaration says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub declaration: Option<DeclarationRecord>,
}

/// An incident declaration as a member's audit log keeps it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeclarationRecord {
    /// The incident's number.
    pub number: String,
    /// declare, renew or end.
    pub kind: String,
    /// The declarer's identity URI.
    pub declarer: String,
    /// What happened.
    pub summary: String,
    /// Datasets it opens.
    pub datasets: Vec<String>,
    /// Rows it opens, as text (`road IN ('...')`, or `all rows`).
    pub scope: String,
    /// Purpose codes it covers (empty: any).
    pub purposes: Vec<String>,
    /// Its window, RFC 3339 UTC.
    pub starts: String,
    /// The end of its window (for an end: when it ended).
    pub ends: String,
    /// When it was signed.
    pub issued: String,
}

impl AuditEntry {
    /// The current time as the `time` field wants it, e.g. `2026-05-01T08:30:12.345Z`.
    pub fn now_utc() -> String {
        chrono::DateTime::<chrono::Utc>::from(std::time::SystemTime::now())
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    }
}

/// How one member answered its part of a client query, as the coordinator saw it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MemberOutcome {
    /// The member's name.
    pub member: String,
    /// Its state in the query summary (e.g. `ok`, `denied`, `timed_out`).
    pub state: String,
    /// Rows it returned.
    pub rows: u64,
    /// The hash of the member's own audit record for this sub-query, when it reported
    /// one; this is the receipt that later shows whether the member's log was cut.
    pub audit_hash: Option<String>,
}

/// Hex SHA-256 of a SQL text, for [`AuditEntry::sql_sha256`].
pub fn sql_hash(sql: &str) -> String {
    hex::encode(Sha256::digest(sql.as_bytes()))
}

/// Where a record sits in a chain: its seq and its hash.
///
/// Displayed as `SEQ:HASH`, the form `fedgate audit verify --head` accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The record's number, from 1 (0 for the head of an empty log).
    pub seq: u64,
    /// The record's hash, lowercase hex ([`GENESIS`] for an empty log).
    pub hash: String,
}

impl Receipt {
    /// The head of an empty log.
    pub fn genesis() -> Receipt {
        Receipt {
            seq: 0,
            hash: GENESIS.to_string(),
        }
    }
}

impl fmt::Display for Receipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.seq, self.hash)
    }
}

/// An append-only audit log file. Share it as `Arc<AuditLog>`.
///
/// The file is locked (advisory, `flock`) while it is open, so a second gateway
/// pointed at the same file fails at start instead of forking the chain.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    inner: Mutex<Inner>,
    /// Records appended by this process and on disk (for metrics).
    written: AtomicU64,
    /// The last record whose bytes are in the file (not necessarily on disk yet).
    in_file: AtomicU64,
    /// A second handle of the file, for `sync_data` outside the write lock.
    sync_file: File,
    /// Group commit: how far the file is on disk, and whether a sync is running.
    durable: Mutex<Durable>,
    /// Signalled when a sync ends.
    synced: Condvar,
    /// `sync_data` calls made by appends (fewer than appends when they group).
    syncs: AtomicU64,
    /// The exporter's progress, when the records are exported.
    export: std::sync::OnceLock<std::sync::Arc<export::ExportProgress>>,
}

/// The disk's side of group commit.
#[derive(Debug)]
struct Durable {
    /// Every record up to this one is on disk.
    seq: u64,
    /// An append is running `sync_data` now; the others wait for it.
    syncing: bool,
    /// A sync failed: the records after `seq` may never reach the disk, and no
    /// further record is written.
    failed: Option<String>,
}

#[derive(Debug)]
struct Inner {
    file: File,
    head: Receipt,
    /// Length of the file in bytes, so that a failed write can be cut back off.
    len: u64,
    /// Set when a failed write could not be undone: the file may end in a partial
    /// record, and appending after it would break the chain in the middle.
    failed: Option<String>,
}

impl AuditLog {
    /// Opens the log at `path`, creating it and its parent folders if missing, and
    /// verifies the existing chain.
    ///
    /// If the file ends with an incomplete record (the gateway was killed while
    /// writing), the incomplete bytes are cut off and a [`EntryKind::Recovered`]
    /// record noting how many bytes were discarded is appended; the chain then
    /// continues. A chain broken anywhere else is an [`Error::Config`] naming the
    /// file, the record and the problem: the operator must move the file aside.
    pub fn open(path: &Path) -> Result<AuditLog> {
        let shown = path.display();
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            fs::create_dir_all(dir).map_err(|e| {
                Error::Config(format!(
                    "audit log {shown}: cannot create its folder {}: {e}",
                    dir.display()
                ))
            })?;
        }
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| Error::Config(format!("audit log {shown}: cannot open it: {e}")))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(Error::Config(format!(
                    "audit log {shown} is already open in another gateway; \
                     each gateway needs its own audit log file"
                )));
            }
            Err(TryLockError::Error(e)) => {
                return Err(Error::Config(format!(
                    "audit log {shown}: cannot lock it: {e}"
                )));
            }
        }
        let scan = scan_reader(BufReader::new(&file), None)
            .map_err(|e| Error::Config(format!("audit log {shown}: cannot read it: {e}")))?;
        if let Some(b) = &scan.report.broken
            && !scan.incomplete
        {
            return Err(Error::Config(format!(
                "audit log {shown} is broken at record {} (line {}): {}. \
                 A broken chain is never continued: move the file aside (keep it as \
                 evidence; `fedgate audit verify` describes it) and start the gateway \
                 again to begin a new log",
                b.seq, b.line, b.problem
            )));
        }
        if scan.incomplete {
            // Cut before appending, so the Recovered record follows the last complete
            // record directly, as the chain requires.
            file.set_len(scan.valid_len)
                .and_then(|()| file.sync_data())
                .map_err(|e| {
                    Error::Config(format!(
                        "audit log {shown}: cannot cut off the incomplete record at its end: {e}"
                    ))
                })?;
        }
        let sync_file = file
            .try_clone()
            .map_err(|e| Error::Config(format!("audit log {shown}: cannot open it twice: {e}")))?;
        let log = AuditLog {
            written: Default::default(),
            in_file: AtomicU64::new(scan.report.head.seq),
            sync_file,
            durable: Mutex::new(Durable {
                seq: scan.report.head.seq,
                syncing: false,
                failed: None,
            }),
            synced: Condvar::new(),
            syncs: Default::default(),
            export: Default::default(),
            path: path.to_path_buf(),
            inner: Mutex::new(Inner {
                file,
                head: scan.report.head.clone(),
                len: scan.valid_len,
                failed: None,
            }),
        };
        if scan.incomplete {
            let seq = scan.report.records + 1;
            let discarded = scan.tail_len;
            tracing::warn!(
                path = %shown,
                record = seq,
                discarded,
                "audit log ended with an incomplete record; cut it off"
            );
            log.append(&AuditEntry {
                kind: EntryKind::Recovered,
                time: AuditEntry::now_utc(),
                // The write that was interrupted did not complete.
                decision: Decision::Failed,
                reason: Some(format!(
                    "discarded {discarded} bytes of incomplete record {seq} at the end of \
                     the file: the gateway stopped while writing it"
                )),
                bytes: discarded,
                ..AuditEntry::default()
            })?;
        }
        Ok(log)
    }

    /// Appends one record and returns its receipt.
    ///
    /// The record is serialized and hashed, and the whole line is handed to the OS in
    /// one write call (`write_all` only writes again if the OS takes part of it, as
    /// when the disk fills) under a mutex, so that concurrent appends keep the chain
    /// linear. Then the data is on disk (`sync_data`) before this returns, by group
    /// commit: one append syncs the file for every record written before the sync
    /// began, and the appends that arrive meanwhile wait for it or for the next one.
    /// A burst of appends (a flood of refused queries, say) costs a few syncs instead
    /// of one each, and keeps other queries' records from queueing behind them.
    ///
    /// On an error the query must be treated as not audited (refused rather than
    /// answered unrecorded). A failed write is cut back off the file; a failed sync
    /// stops the log (no record after it is written, every append waiting on it
    /// fails), since the records it should have covered may never reach the disk.
    pub fn append(&self, entry: &AuditEntry) -> Result<Receipt> {
        let timed = tracing::enabled!(target: "fedgate::phases", tracing::Level::DEBUG)
            .then(std::time::Instant::now);
        let receipt = self.write(entry)?;
        let written = timed.map(|at| at.elapsed());
        self.wait_durable(receipt.seq)?;
        self.written.fetch_add(1, Ordering::Relaxed);
        if let (Some(at), Some(written)) = (timed, written) {
            // The record's part of a query's time: writing it, then waiting for the
            // disk (its own sync, or one another record started).
            tracing::debug!(
                target: "fedgate::phases",
                write_us = written.as_micros() as u64,
                durable_us = (at.elapsed() - written).as_micros() as u64,
                "Recorded"
            );
        }
        Ok(receipt)
    }

    /// Appends a record of something that released nothing (a sub-query refused for
    /// load) without waiting for the disk: when this returns the record is in the
    /// file in chain order, so a killed gateway keeps it; it reaches the disk with the
    /// next append's sync or when the log is closed. A flood of such refusals then
    /// costs no sync of its own, and the records of answers do not wait behind them.
    pub fn append_unawaited(&self, entry: &AuditEntry) -> Result<Receipt> {
        let receipt = self.write(entry)?;
        self.written.fetch_add(1, Ordering::Relaxed);
        Ok(receipt)
    }

    /// Waits until record `seq` is on disk, syncing the file if no one else is.
    fn wait_durable(&self, seq: u64) -> Result<()> {
        let mut d = self.durable.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if d.seq >= seq {
                return Ok(());
            }
            if let Some(why) = &d.failed {
                return Err(Error::Internal(format!(
                    "audit log {}: {why}; no further records are written",
                    self.path.display()
                )));
            }
            if d.syncing {
                d = self.synced.wait(d).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            d.syncing = true;
            drop(d);
            // Every record up to `target` was in the file before the sync began.
            let target = self.in_file.load(Ordering::Acquire);
            let r = self.sync_file.sync_data();
            self.syncs.fetch_add(1, Ordering::Relaxed);
            d = self.durable.lock().unwrap_or_else(PoisonError::into_inner);
            d.syncing = false;
            match r {
                Ok(()) => d.seq = d.seq.max(target),
                Err(e) => {
                    d.failed = Some(format!("syncing records up to {target} failed ({e})"));
                    // Stop writes too, so nothing follows records that may be lost.
                    self.inner
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .failed
                        .get_or_insert_with(|| {
                            format!("syncing records up to {target} failed ({e})")
                        });
                }
            }
            self.synced.notify_all();
        }
    }

    /// `sync_data` calls made by appends so far.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// Writes one record into the file (not yet synced) and returns its receipt.
    fn write(&self, entry: &AuditEntry) -> Result<Receipt> {
        // Serialize outside the lock; only the short framing depends on the head.
        let entry_json = serde_json::to_string(entry)
            .map_err(|e| Error::Internal(format!("serializing an audit entry: {e}")))?;
        let mut guard = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let inner = &mut *guard;
        if let Some(why) = &inner.failed {
            return Err(Error::Internal(format!(
                "audit log {}: {why}; no further records are written",
                self.path.display()
            )));
        }
        let seq = inner.head.seq + 1;
        let (line, hash) = frame(seq, &inner.head.hash, &entry_json);
        let written = inner.file.write_all(&line);
        if let Err(e) = written {
            // Part of the line may be in the file. Cut it back off so the next append
            // does not follow a torn record; if even that fails, stop appending.
            if let Err(undo) = inner
                .file
                .set_len(inner.len)
                .and_then(|()| inner.file.sync_data())
            {
                inner.failed = Some(format!(
                    "writing record {seq} failed ({e}) and the partial record could not be \
                     removed ({undo})"
                ));
            }
            return Err(Error::Internal(format!(
                "audit log {}: writing record {seq}: {e}",
                self.path.display()
            )));
        }
        inner.len += line.len() as u64;
        inner.head = Receipt { seq, hash };
        self.in_file.store(seq, Ordering::Release);
        Ok(inner.head.clone())
    }

    /// The last record's seq and hash (seq 0 and [`GENESIS`] for an empty log).
    pub fn head(&self) -> Receipt {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .head
            .clone()
    }

    /// The exporter's progress, if this log is exported.
    pub fn export_progress(&self) -> Option<&std::sync::Arc<export::ExportProgress>> {
        self.export.get()
    }

    /// Every record up to this one is on disk.
    pub fn durable_seq(&self) -> u64 {
        self.durable
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .seq
    }

    /// Records appended since the log was opened.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// The file this log writes.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for AuditLog {
    /// Records appended without waiting reach the disk before the log is closed.
    fn drop(&mut self) {
        let durable = self
            .durable
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        if durable.failed.is_none() && durable.seq < *self.in_file.get_mut() {
            let _ = self.sync_file.sync_data();
        }
    }
}

/// The most bytes of caller-chosen text (a query id, a purpose) a record keeps.
pub const MAX_CALLER_TEXT: usize = 256;

/// Caller-chosen text as a record keeps it: whole up to [`MAX_CALLER_TEXT`] bytes;
/// longer, its start and the SHA-256 of the whole, so that no caller can grow an owner's
/// log by megabytes per refused request and the record still identifies the text.
pub fn caller_text(s: &str) -> String {
    if s.len() <= MAX_CALLER_TEXT {
        return s.to_string();
    }
    let mut end = 64;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}… ({} bytes, sha256 {})",
        &s[..end],
        s.len(),
        hex::encode(Sha256::digest(s.as_bytes()))
    )
}

/// The last `n` complete lines of the log at `path` (without their `\n`), oldest
/// first, read from the end of the file so a long log costs no more than its tail.
pub fn tail(path: &Path, n: usize) -> Result<Vec<Vec<u8>>> {
    use std::io::{Read, Seek, SeekFrom};
    let io = |e: std::io::Error| Error::Internal(format!("audit log {}: {e}", path.display()));
    let mut f = File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let mut start = len;
    // Chunks from the end, newest first; each newline counted once.
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    let mut newlines = 0usize;
    let mut read = 0u64;
    const CHUNK: u64 = 64 * 1024;
    // However long the records, a page reads at most this much.
    const MAX_READ: u64 = 8 * 1024 * 1024;
    // n complete lines need n + 1 newlines unless the file's start is reached.
    while start > 0 && newlines <= n && read < MAX_READ {
        let from = start.saturating_sub(CHUNK);
        let mut chunk = vec![0u8; (start - from) as usize];
        f.seek(SeekFrom::Start(from)).map_err(io)?;
        f.read_exact(&mut chunk).map_err(io)?;
        newlines += chunk.iter().filter(|&&b| b == b'\n').count();
        read += chunk.len() as u64;
        chunks.push(chunk);
        start = from;
    }
    let mut buf = Vec::with_capacity(read as usize);
    for c in chunks.iter().rev() {
        buf.extend_from_slice(c);
    }
    // Drop an incomplete last line (a record being written) and, unless the file's
    // start was reached, the partial first line.
    if let Some(end) = buf.iter().rposition(|&b| b == b'\n') {
        buf.truncate(end);
    } else {
        return Ok(Vec::new());
    }
    let mut lines: Vec<Vec<u8>> = buf.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
    if start > 0 && !lines.is_empty() {
        lines.remove(0);
    }
    let skip = lines.len().saturating_sub(n);
    Ok(lines.split_off(skip))
}

/// The bytes of record `seq` (with its final `\n`) and its hash.
fn frame(seq: u64, prev: &str, entry_json: &str) -> (Vec<u8>, String) {
    let mut line =
        format!("{{\"seq\":{seq},\"prev\":\"{prev}\",\"entry\":{entry_json}").into_bytes();
    let hash = hex::encode(Sha256::digest(&line));
    line.extend_from_slice(HASH_MARKER);
    line.extend_from_slice(hash.as_bytes());
    line.extend_from_slice(b"\"}\n");
    (line, hash)
}

#[cfg(test)]
mod tests;
