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
//! Each record is written with one write call and then `sync_data`, so a gateway that
//! is killed leaves at most one incomplete record at the end of the file. [`verify`]
//! reports it; [`AuditLog::open`] cuts it off and appends a [`EntryKind::Recovered`]
//! record saying how many bytes were discarded, so the cut itself is on the record.
//! Any other break makes `open` fail: a gateway never silently starts a new chain.

use std::fmt;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

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

/// The result of checking a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Complete records that verify, counted from the start up to the first problem.
    pub records: u64,
    /// The last record that verifies (seq 0 and [`GENESIS`] if none does).
    pub head: Receipt,
    /// The first problem, if any.
    pub broken: Option<Broken>,
}

/// The first place where a chain does not verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    /// The 1-based record number expected at that position.
    pub seq: u64,
    /// The 1-based line of the file.
    pub line: u64,
    /// What is wrong, for a person.
    pub problem: String,
}

/// An append-only audit log file. Share it as `Arc<AuditLog>`.
///
/// The file is locked (advisory, `flock`) while it is open, so a second gateway
/// pointed at the same file fails at start instead of forking the chain.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    inner: Mutex<Inner>,
    /// Records appended by this process (for metrics).
    written: std::sync::atomic::AtomicU64,
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
        let log = AuditLog {
            written: Default::default(),
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
    /// The record is serialized and hashed, the whole line is handed to the OS in one
    /// write call (`write_all` only writes again if the OS takes part of it, as when
    /// the disk fills), and the data is on disk (`sync_data`) before this returns, all
    /// under a mutex so that concurrent appends keep the chain linear. On an error
    /// nothing was appended; a caller should then treat the query as not audited
    /// (and refuse it rather than answer it unrecorded).
    pub fn append(&self, entry: &AuditEntry) -> Result<Receipt> {
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
        let written = inner
            .file
            .write_all(&line)
            .and_then(|()| inner.file.sync_data());
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
        self.written
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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

    /// Records appended since the log was opened.
    pub fn written(&self) -> u64 {
        self.written.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The file this log writes.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Checks the log at `path` without modifying it.
pub fn verify(path: &Path) -> Result<VerifyReport> {
    verify_file(path, None)
}

/// Checks the log at `path` as [`verify`] does, and also that it holds the witnessed
/// record `expected` (a receipt kept elsewhere) with that hash.
///
/// Records after the witnessed one are fine (the log grew since); a log that ends
/// before it, or holds a different hash at its seq, is reported as broken. This is
/// the only way to detect whole records removed from the end.
pub fn verify_against(path: &Path, expected: &Receipt) -> Result<VerifyReport> {
    verify_file(path, Some(expected))
}

/// Checks a log held in memory.
pub fn verify_bytes(bytes: &[u8]) -> VerifyReport {
    scan_bytes(bytes, None).report
}

/// Checks a log held in memory against a witnessed record, as [`verify_against`].
pub fn verify_bytes_against(bytes: &[u8], expected: &Receipt) -> VerifyReport {
    scan_bytes(bytes, Some(expected)).report
}

fn verify_file(path: &Path, expected: Option<&Receipt>) -> Result<VerifyReport> {
    let file = File::open(path)
        .map_err(|e| Error::Config(format!("audit log {}: cannot open it: {e}", path.display())))?;
    let scan = scan_reader(BufReader::new(file), expected)
        .map_err(|e| Error::Config(format!("audit log {}: cannot read it: {e}", path.display())))?;
    Ok(scan.report)
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

/// A record as parsed, to check its shape and read `seq` and `prev`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredRecord {
    seq: u64,
    prev: String,
    // Parsed only so that a line whose entry has the wrong shape is reported.
    #[allow(dead_code)]
    entry: AuditEntry,
    hash: String,
}

/// A scan's outcome, with what `open` needs to recover.
struct Scan {
    report: VerifyReport,
    /// Bytes from the start of the file that hold verified records.
    valid_len: u64,
    /// Whether the only problem is an incomplete record at the end.
    incomplete: bool,
    /// Length of that incomplete record.
    tail_len: u64,
}

/// A problem found while scanning, before its description is final.
enum Break {
    /// Fully described.
    Final(Broken),
    /// An intact record sits where another belongs. Whether the missing record turns
    /// up later in the file decides between "deleted" and "out of order", so the
    /// scan keeps reading seq numbers after the break.
    OutOfPlace {
        seq: u64,
        line: u64,
        found: u64,
        seen_on: Option<u64>,
    },
}

/// Verifies a log one line at a time, so a large log needs no more memory than its
/// longest record.
struct Scanner<'a> {
    witness: Option<&'a Receipt>,
    records: u64,
    head: Receipt,
    valid_len: u64,
    lines: u64,
    fault: Option<Break>,
}

impl<'a> Scanner<'a> {
    fn new(witness: Option<&'a Receipt>) -> Self {
        Scanner {
            witness,
            records: 0,
            head: Receipt::genesis(),
            valid_len: 0,
            lines: 0,
            fault: None,
        }
    }

    /// Whether further lines can no longer change the report.
    fn done(&self) -> bool {
        matches!(self.fault, Some(Break::Final(_)))
    }

    /// Takes one complete line, without its `\n`.
    fn line(&mut self, line: &[u8]) {
        self.lines += 1;
        match &mut self.fault {
            Some(Break::Final(_)) => return,
            Some(Break::OutOfPlace { seq, seen_on, .. }) => {
                if seen_on.is_none() && leading_seq(line) == Some(*seq) {
                    *seen_on = Some(self.lines);
                }
                return;
            }
            None => {}
        }
        match self.check(line) {
            Ok(receipt) => {
                if let Some(w) = self.witness
                    && w.seq == receipt.seq
                    && w.hash != receipt.hash
                {
                    self.fault = Some(Break::Final(Broken {
                        seq: receipt.seq,
                        line: self.lines,
                        problem: format!(
                            "record {} has hash {} but hash {} was witnessed: the log was \
                             rewritten at or before this record",
                            receipt.seq, receipt.hash, w.hash
                        ),
                    }));
                    return;
                }
                self.records += 1;
                self.valid_len += line.len() as u64 + 1;
                self.head = receipt;
            }
            Err(fault) => self.fault = Some(fault),
        }
    }

    /// Checks the line expected to hold the next record.
    fn check(&self, line: &[u8]) -> Result<Receipt, Break> {
        let seq = self.records + 1;
        let at = self.lines;
        let broken = |problem: String| {
            Break::Final(Broken {
                seq,
                line: at,
                problem,
            })
        };
        if line.is_empty() {
            return Err(broken("the line is empty, not an audit record".into()));
        }
        let Some(marker) = find_last(line, HASH_MARKER) else {
            return Err(broken(
                "the line is not an audit record (it does not end with a hash)".into(),
            ));
        };
        let (body, rest) = line.split_at(marker);
        let stored = &rest[HASH_MARKER.len()..];
        let computed = hex::encode(Sha256::digest(body));
        if stored.len() != computed.len() + 2 || !stored.ends_with(b"\"}") {
            return Err(broken(format!(
                "record {seq} was altered: its hash field is damaged"
            )));
        }
        if &stored[..computed.len()] != computed.as_bytes() {
            return Err(broken(format!(
                "record {seq} was altered: its contents no longer match its hash"
            )));
        }
        if !body.starts_with(RECORD_START) {
            return Err(broken(
                "the line has a valid hash but is not an audit record".into(),
            ));
        }
        let record: StoredRecord = serde_json::from_slice(line).map_err(|e| {
            broken(format!(
                "the line has a valid hash but is not a well-formed audit record: {e}"
            ))
        })?;
        if record.hash != computed {
            return Err(broken(
                "the line has a valid hash but is not a well-formed audit record".into(),
            ));
        }
        if record.seq != seq {
            return Err(Break::OutOfPlace {
                seq,
                line: at,
                found: record.seq,
                seen_on: None,
            });
        }
        if record.prev != self.head.hash {
            let problem = if seq == 1 {
                format!(
                    "record 1 does not start a chain: its prev is {}, not the genesis value",
                    record.prev
                )
            } else {
                format!(
                    "record {seq} does not follow record {}: its prev is {} but record {} \
                     has hash {}; a record before it was replaced, or records from another \
                     log were spliced in",
                    seq - 1,
                    record.prev,
                    seq - 1,
                    self.head.hash
                )
            };
            return Err(broken(problem));
        }
        Ok(Receipt {
            seq,
            hash: computed,
        })
    }

    /// Ends the scan; `tail` is what follows the last `\n` (an incomplete record).
    fn finish(self, tail: &[u8]) -> Scan {
        let mut incomplete = false;
        let next = self.records + 1;
        let broken = match self.fault {
            Some(Break::Final(b)) => Some(b),
            Some(Break::OutOfPlace {
                seq,
                line,
                found,
                seen_on,
            }) => Some(Broken {
                seq,
                line,
                problem: out_of_place(seq, found, seen_on),
            }),
            None => {
                let line = self.lines + 1;
                match self.witness {
                    Some(w) if w.seq == 0 && w.hash != GENESIS => Some(Broken {
                        seq: 1,
                        line: 1,
                        problem: format!(
                            "the witnessed head seq 0 must have the genesis hash (64 zeros), \
                             not {}",
                            w.hash
                        ),
                    }),
                    Some(w) if w.seq > self.records => Some(Broken {
                        seq: next,
                        line,
                        problem: format!(
                            "log ends at record {}{} but record {} with hash {} was \
                             witnessed: {} missing from the end",
                            self.records,
                            if tail.is_empty() {
                                ""
                            } else {
                                " (followed by an incomplete record)"
                            },
                            w.seq,
                            w.hash,
                            records_are(next, w.seq)
                        ),
                    }),
                    _ if !tail.is_empty() => {
                        incomplete = true;
                        let before = if self.records == 0 {
                            "no complete record precedes it".to_string()
                        } else {
                            format!("records 1..{} verify", self.records)
                        };
                        Some(Broken {
                            seq: next,
                            line,
                            problem: format!(
                                "record {next} is incomplete: the file ends mid-record ({} \
                                 bytes), as when a gateway stops while writing; {before}",
                                tail.len()
                            ),
                        })
                    }
                    _ => None,
                }
            }
        };
        Scan {
            report: VerifyReport {
                records: self.records,
                head: self.head,
                broken,
            },
            valid_len: self.valid_len,
            incomplete,
            tail_len: tail.len() as u64,
        }
    }
}

/// Describes an intact record `found` at the place of record `seq`.
fn out_of_place(seq: u64, found: u64, seen_on: Option<u64>) -> String {
    // Records 1..seq-1 have verified, so an earlier number here is a second copy.
    if found < seq {
        let next = match seen_on {
            Some(other) => format!(" (record {seq} is on line {other})"),
            None => String::new(),
        };
        return format!(
            "record {found} appears again where record {seq} belongs: a record was \
             duplicated{next}"
        );
    }
    if let Some(other) = seen_on {
        return format!(
            "records are out of order: this line holds record {found} where record {seq} \
             belongs, and record {seq} is on line {other}"
        );
    }
    let after = if seq == 1 {
        "at the start of the log".to_string()
    } else {
        format!("right after record {}", seq - 1)
    };
    format!(
        "{} missing: record {found} comes {after}; records were deleted",
        records_are(seq, found - 1)
    )
}

/// "record 5 is" or "records 5..7 are".
fn records_are(first: u64, last: u64) -> String {
    if first == last {
        format!("record {first} is")
    } else {
        format!("records {first}..{last} are")
    }
}

/// The seq a line claims, read from its `{"seq":N` prefix without parsing the rest.
fn leading_seq(line: &[u8]) -> Option<u64> {
    let rest = line.strip_prefix(RECORD_START)?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

/// The position of the last occurrence of `needle` in `haystack`.
fn find_last(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).rposition(|w| w == needle)
}

fn scan_bytes(bytes: &[u8], witness: Option<&Receipt>) -> Scan {
    let mut scanner = Scanner::new(witness);
    let mut rest = bytes;
    while let Some(end) = rest.iter().position(|&b| b == b'\n') {
        scanner.line(&rest[..end]);
        rest = &rest[end + 1..];
        if scanner.done() {
            break;
        }
    }
    scanner.finish(rest)
}

fn scan_reader(mut reader: impl BufRead, witness: Option<&Receipt>) -> io::Result<Scan> {
    let mut scanner = Scanner::new(witness);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 || scanner.done() {
            return Ok(scanner.finish(&[]));
        }
        match buf.strip_suffix(b"\n") {
            Some(line) => scanner.line(line),
            None => return Ok(scanner.finish(&buf)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use proptest::prelude::*;

    fn entry(i: u64) -> AuditEntry {
        AuditEntry {
            kind: EntryKind::SubQuery,
            time: AuditEntry::now_utc(),
            query_id: format!("q-{i}"),
            via: "fedgate://yrd/city/hangzhou".into(),
            origin: "fedgate://yrd/office/health".into(),
            purpose: Some("surveillance".into()),
            datasets: vec!["fever_clinics".into()],
            sql_sha256: sql_hash(&format!("SELECT count(*) FROM fever_clinics -- {i}")),
            decision: Decision::Answered,
            rule: Some("access[2]".into()),
            level: Some("masked".into()),
            reason: None,
            rows: i,
            bytes: i * 100,
            members: vec![],
        }
    }

    /// A log of `entries` built in memory, and the receipt of each record.
    fn memory_log(entries: &[AuditEntry]) -> (Vec<u8>, Vec<Receipt>) {
        let mut bytes = Vec::new();
        let mut receipts = Vec::new();
        let mut prev = GENESIS.to_string();
        for (i, e) in entries.iter().enumerate() {
            let seq = i as u64 + 1;
            let (line, hash) = frame(seq, &prev, &serde_json::to_string(e).unwrap());
            bytes.extend_from_slice(&line);
            receipts.push(Receipt {
                seq,
                hash: hash.clone(),
            });
            prev = hash;
        }
        (bytes, receipts)
    }

    fn numbered_log(n: u64) -> (Vec<u8>, Vec<Receipt>) {
        memory_log(&(1..=n).map(entry).collect::<Vec<_>>())
    }

    /// The lines of a log, each with its `\n`.
    fn lines(bytes: &[u8]) -> Vec<Vec<u8>> {
        bytes
            .split_inclusive(|&b| b == b'\n')
            .map(<[u8]>::to_vec)
            .collect()
    }

    /// A log file of `n` records written through `AuditLog`, and their receipts.
    fn file_log(dir: &Path, n: u64) -> (PathBuf, Vec<Receipt>) {
        let path = dir.join("audit").join("member.log");
        let log = AuditLog::open(&path).unwrap();
        let receipts = (1..=n).map(|i| log.append(&entry(i)).unwrap()).collect();
        (path, receipts)
    }

    fn broken(report: &VerifyReport) -> &Broken {
        report.broken.as_ref().expect("the log should be broken")
    }

    #[test]
    fn audit_log_is_send_and_sync() {
        fn shared<T: Send + Sync>() {}
        shared::<AuditLog>();
    }

    #[test]
    fn fresh_log_verifies_and_head_is_the_last_receipt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a").join("b").join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        assert_eq!(log.head(), Receipt::genesis());
        assert_eq!(log.path(), path);
        let receipts: Vec<Receipt> = (1..=5).map(|i| log.append(&entry(i)).unwrap()).collect();
        assert_eq!(
            receipts.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
        assert_eq!(log.head(), receipts[4]);
        let report = verify(&path).unwrap();
        assert_eq!(
            report,
            VerifyReport {
                records: 5,
                head: receipts[4].clone(),
                broken: None
            }
        );
        // Every record's receipt is witnessed by the file.
        for r in &receipts {
            assert_eq!(verify_against(&path, r).unwrap().broken, None);
        }
    }

    #[test]
    fn reopening_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let (path, receipts) = file_log(dir.path(), 3);
        let log = AuditLog::open(&path).unwrap();
        assert_eq!(log.head(), receipts[2]);
        let r4 = log.append(&entry(4)).unwrap();
        assert_eq!(r4.seq, 4);
        let report = verify(&path).unwrap();
        assert_eq!(report.records, 4);
        assert_eq!(report.head, r4);
        assert_eq!(report.broken, None);
    }

    #[test]
    fn a_second_open_of_the_same_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let first = AuditLog::open(&path).unwrap();
        let Err(Error::Config(msg)) = AuditLog::open(&path) else {
            panic!("a second open should be a configuration error");
        };
        assert!(msg.contains("already open"), "{msg}");
        drop(first);
        AuditLog::open(&path).unwrap();
    }

    #[test]
    fn empty_log_verifies_with_the_genesis_head() {
        let report = verify_bytes(b"");
        assert_eq!(report.records, 0);
        assert_eq!(report.head, Receipt::genesis());
        assert_eq!(report.broken, None);
    }

    #[test]
    fn records_have_the_documented_format_and_hash() {
        let (bytes, receipts) = numbered_log(2);
        let text = String::from_utf8(bytes).unwrap();
        let second = text.lines().nth(1).unwrap();
        assert!(second.starts_with(&format!(
            "{{\"seq\":2,\"prev\":\"{}\",\"entry\":{{\"kind\":\"sub_query\",",
            receipts[0].hash
        )));
        assert!(second.contains("\"decision\":\"answered\""));
        let (body, _) = second.rsplit_once(",\"hash\":\"").unwrap();
        let expected = hex::encode(Sha256::digest(body.as_bytes()));
        assert_eq!(receipts[1].hash, expected);
        assert!(second.ends_with(&format!(",\"hash\":\"{expected}\"}}")));
    }

    #[test]
    fn entries_round_trip_and_reject_unknown_fields() {
        let mut e = entry(7);
        e.kind = EntryKind::Query;
        e.members = vec![MemberOutcome {
            member: "suzhou".into(),
            state: "ok".into(),
            rows: 3,
            audit_hash: Some("ab".repeat(32)),
        }];
        let json = serde_json::to_string(&e).unwrap();
        assert!(json.contains("\"kind\":\"query\""));
        assert_eq!(serde_json::from_str::<AuditEntry>(&json).unwrap(), e);
        let extra = json.replacen('{', "{\"extra\":1,", 1);
        assert!(serde_json::from_str::<AuditEntry>(&extra).is_err());
        assert_eq!(AuditEntry::default().decision, Decision::Refused);
    }

    #[test]
    fn now_utc_is_rfc3339_with_milliseconds() {
        let t = AuditEntry::now_utc();
        assert_eq!(t.len(), "2026-05-01T08:30:12.345Z".len(), "{t}");
        assert!(t.ends_with('Z'), "{t}");
        assert_eq!(&t[19..20], ".", "{t}");
        assert!(chrono::DateTime::parse_from_rfc3339(&t).is_ok());
    }

    #[test]
    fn an_edited_byte_in_a_middle_entry_is_detected_at_that_record() {
        let dir = tempfile::tempdir().unwrap();
        let (path, receipts) = file_log(dir.path(), 5);
        let mut bytes = fs::read(&path).unwrap();
        let start: usize = lines(&bytes)[..2].iter().map(Vec::len).sum();
        // Record 3 says it returned 3 rows; make it 4.
        let at = start + find_last(&lines(&bytes)[2], b"\"rows\":3").unwrap() + 7;
        assert_eq!(bytes[at], b'3');
        bytes[at] = b'4';
        fs::write(&path, &bytes).unwrap();
        let report = verify(&path).unwrap();
        let b = broken(&report);
        assert_eq!((b.seq, b.line), (3, 3));
        assert!(b.problem.contains("record 3 was altered"), "{}", b.problem);
        assert_eq!(report.records, 2);
        assert_eq!(report.head, receipts[1]);
    }

    #[test]
    fn a_json_equivalent_rewrite_is_still_detected() {
        let (bytes, _) = numbered_log(3);
        // `\u0071` is `q`: the parsed entry is unchanged, the bytes are not.
        let text = String::from_utf8(bytes).unwrap();
        let edited = text.replacen("\"q-2\"", "\"\\u0071-2\"", 1);
        let parsed: Vec<serde_json::Value> = edited
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(parsed[1]["entry"]["query_id"], "q-2");
        let report = verify_bytes(edited.as_bytes());
        let b = broken(&report);
        assert_eq!(b.seq, 2);
        assert!(b.problem.contains("altered"), "{}", b.problem);
    }

    #[test]
    fn a_deleted_middle_record_is_detected() {
        let (bytes, receipts) = numbered_log(5);
        let mut l = lines(&bytes);
        l.remove(2);
        let report = verify_bytes(&l.concat());
        let b = broken(&report);
        assert_eq!((b.seq, b.line), (3, 3));
        assert!(
            b.problem
                .contains("record 3 is missing: record 4 comes right after record 2"),
            "{}",
            b.problem
        );
        assert_eq!(report.records, 2);
        assert_eq!(report.head, receipts[1]);

        let mut l = lines(&bytes);
        l.drain(1..3);
        let b = verify_bytes(&l.concat()).broken.unwrap();
        assert!(
            b.problem.contains("records 2..3 are missing"),
            "{}",
            b.problem
        );
    }

    #[test]
    fn swapped_records_are_detected() {
        let (bytes, receipts) = numbered_log(5);
        let mut l = lines(&bytes);
        l.swap(1, 2);
        let report = verify_bytes(&l.concat());
        let b = broken(&report);
        assert_eq!((b.seq, b.line), (2, 2));
        assert!(b.problem.contains("out of order"), "{}", b.problem);
        assert!(b.problem.contains("record 2 is on line 3"), "{}", b.problem);
        assert_eq!(report.records, 1);
        assert_eq!(report.head, receipts[0]);
    }

    #[test]
    fn a_duplicated_record_is_detected() {
        let (bytes, _) = numbered_log(3);
        let mut l = lines(&bytes);
        l.insert(2, l[1].clone());
        let b = verify_bytes(&l.concat()).broken.unwrap();
        assert_eq!(b.seq, 3);
        assert!(
            b.problem.contains("record 2 appears again"),
            "{}",
            b.problem
        );
    }

    #[test]
    fn a_line_that_is_not_a_record_is_detected() {
        let (bytes, _) = numbered_log(3);
        let mut l = lines(&bytes);
        l.insert(1, b"hello\n".to_vec());
        let report = verify_bytes(&l.concat());
        let b = broken(&report);
        assert_eq!((b.seq, b.line), (2, 2));
        assert!(b.problem.contains("not an audit record"), "{}", b.problem);
        assert_eq!(report.records, 1);

        let mut l = lines(&bytes);
        l.insert(3, b"\n".to_vec());
        let b = verify_bytes(&l.concat()).broken.unwrap();
        assert_eq!((b.seq, b.line), (4, 4));
        assert!(b.problem.contains("empty"), "{}", b.problem);
    }

    #[test]
    fn a_record_from_another_chain_is_detected() {
        let (bytes, _) = numbered_log(3);
        let (other, _) = memory_log(&[entry(9), entry(8), entry(7)]);
        let mut l = lines(&bytes);
        l[1] = lines(&other)[1].clone();
        let b = verify_bytes(&l.concat()).broken.unwrap();
        assert_eq!(b.seq, 2);
        assert!(
            b.problem.contains("record 2 does not follow record 1"),
            "{}",
            b.problem
        );
    }

    #[test]
    fn a_torn_last_record_is_incomplete_and_the_records_before_it_verify() {
        let (bytes, receipts) = numbered_log(5);
        let last = lines(&bytes)[4].len();
        let torn = &bytes[..bytes.len() - last / 2];
        let report = verify_bytes(torn);
        let b = broken(&report);
        assert_eq!((b.seq, b.line), (5, 5));
        assert!(
            b.problem
                .starts_with("record 5 is incomplete: the file ends mid-record ("),
            "{}",
            b.problem
        );
        assert!(
            b.problem
                .ends_with("as when a gateway stops while writing; records 1..4 verify"),
            "{}",
            b.problem
        );
        assert_eq!(report.records, 4);
        assert_eq!(report.head, receipts[3]);

        // Only the final newline missing is still an incomplete record.
        let report = verify_bytes(&bytes[..bytes.len() - 1]);
        assert!(broken(&report).problem.contains("record 5 is incomplete"));
    }

    #[test]
    fn open_recovers_a_torn_last_record() {
        let dir = tempfile::tempdir().unwrap();
        let (path, receipts) = file_log(dir.path(), 5);
        let bytes = fs::read(&path).unwrap();
        // Keep the first 10 bytes of record 5, as if the gateway died writing it.
        let kept: usize = lines(&bytes)[..4].iter().map(Vec::len).sum();
        let torn = 10;
        fs::write(&path, &bytes[..kept + torn]).unwrap();

        let log = AuditLog::open(&path).unwrap();
        let head = log.head();
        assert_eq!(head.seq, 5);
        assert_ne!(head, receipts[4]);
        let r6 = log.append(&entry(6)).unwrap();
        assert_eq!(r6.seq, 6);
        drop(log);

        let report = verify(&path).unwrap();
        assert_eq!(report.broken, None);
        assert_eq!(report.records, 6);
        assert_eq!(report.head, r6);
        let after = fs::read(&path).unwrap();
        // Records 1..4 are untouched.
        assert_eq!(after[..kept], bytes[..kept]);
        let fifth: serde_json::Value = serde_json::from_slice(&lines(&after)[4]).unwrap();
        assert_eq!(fifth["entry"]["kind"], "recovered");
        assert_eq!(fifth["entry"]["bytes"], torn as u64);
        assert!(
            fifth["entry"]["reason"]
                .as_str()
                .unwrap()
                .contains(&format!("discarded {torn} bytes of incomplete record 5"))
        );
        assert_eq!(fifth["prev"], receipts[3].hash.as_str());
    }

    #[test]
    fn open_refuses_a_tampered_log_and_leaves_it_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = file_log(dir.path(), 4);
        let text = fs::read_to_string(&path).unwrap();
        let tampered = text.replacen("\"q-2\"", "\"q-9\"", 1);
        assert_ne!(text, tampered);
        fs::write(&path, &tampered).unwrap();
        let Err(Error::Config(msg)) = AuditLog::open(&path) else {
            panic!("opening a tampered log should be a configuration error");
        };
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("record 2 (line 2)"), "{msg}");
        assert!(msg.contains("record 2 was altered"), "{msg}");
        assert!(msg.contains("move the file aside"), "{msg}");
        assert_eq!(fs::read_to_string(&path).unwrap(), tampered);
    }

    #[test]
    fn whole_records_cut_from_the_end_are_detected_only_against_a_witnessed_head() {
        let (bytes, receipts) = numbered_log(6);
        let kept: usize = lines(&bytes)[..4].iter().map(Vec::len).sum();
        let cut = &bytes[..kept];

        let alone = verify_bytes(cut);
        assert_eq!(alone.broken, None);
        assert_eq!(alone.records, 4);

        let report = verify_bytes_against(cut, &receipts[5]);
        let b = broken(&report);
        assert_eq!((b.seq, b.line), (5, 5));
        assert_eq!(
            b.problem,
            format!(
                "log ends at record 4 but record 6 with hash {} was witnessed: records \
                 5..6 are missing from the end",
                receipts[5].hash
            )
        );
        assert_eq!(report.records, 4);

        // A record witnessed earlier is still there: fine.
        assert_eq!(verify_bytes_against(cut, &receipts[2]).broken, None);
        assert_eq!(verify_bytes_against(&bytes, &receipts[5]).broken, None);
        // A witnessed hash that differs means the chain was rewritten.
        let wrong = Receipt {
            seq: 3,
            hash: receipts[4].hash.clone(),
        };
        let report = verify_bytes_against(cut, &wrong);
        let b = broken(&report);
        assert_eq!(b.seq, 3);
        assert!(b.problem.contains("was witnessed"), "{}", b.problem);
        assert_eq!(report.records, 2);
    }

    #[test]
    fn verify_against_reads_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let (path, receipts) = file_log(dir.path(), 3);
        let bytes = fs::read(&path).unwrap();
        let kept = bytes.len() - lines(&bytes)[2].len();
        fs::write(&path, &bytes[..kept]).unwrap();
        assert_eq!(verify(&path).unwrap().broken, None);
        let b = verify_against(&path, &receipts[2]).unwrap().broken.unwrap();
        assert!(
            b.problem.starts_with("log ends at record 2 but record 3"),
            "{}",
            b.problem
        );
    }

    #[test]
    fn concurrent_appends_keep_the_chain_linear() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = Arc::new(AuditLog::open(&path).unwrap());
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    (0..50u64)
                        .map(|i| log.append(&entry(t * 1000 + i)).unwrap().seq)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut seqs: Vec<u64> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=400).collect::<Vec<_>>());
        let report = verify(&path).unwrap();
        assert_eq!(report.broken, None);
        assert_eq!(report.records, 400);
        assert_eq!(report.head, log.head());
    }

    fn text() -> impl Strategy<Value = String> {
        "[ -~\u{e9}\u{4e2d}\u{1f600}\"\\\\\n\t\u{0}]{0,16}"
    }

    prop_compose! {
        fn any_entry()(
            (kind, decision) in (
                prop_oneof![Just(EntryKind::SubQuery), Just(EntryKind::Query), Just(EntryKind::Recovered), Just(EntryKind::Explain)],
                prop_oneof![Just(Decision::Answered), Just(Decision::Refused), Just(Decision::Failed), Just(Decision::Cancelled)],
            ),
            (time, query_id, via, origin, sql) in (text(), text(), text(), text(), text()),
            (purpose, rule, level, reason) in (
                proptest::option::of(text()),
                proptest::option::of(text()),
                proptest::option::of(text()),
                proptest::option::of(text()),
            ),
            datasets in proptest::collection::vec(text(), 0..3),
            (rows, bytes) in (any::<u64>(), any::<u64>()),
            members in proptest::collection::vec(
                (text(), text(), any::<u64>(), proptest::option::of("[0-9a-f]{64}")),
                0..3,
            ),
        ) -> AuditEntry {
            AuditEntry {
                kind,
                time,
                query_id,
                via,
                origin,
                purpose,
                datasets,
                sql_sha256: sql_hash(&sql),
                decision,
                rule,
                level,
                reason,
                rows,
                bytes,
                members: members
                    .into_iter()
                    .map(|(member, state, rows, audit_hash)| MemberOutcome { member, state, rows, audit_hash })
                    .collect(),
            }
        }
    }

    proptest! {
        #[test]
        fn any_single_byte_edit_is_detected_at_its_record(
            entries in proptest::collection::vec(any_entry(), 1..5),
            at in any::<proptest::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let (bytes, receipts) = memory_log(&entries);
            let clean = verify_bytes(&bytes);
            prop_assert!(clean.broken.is_none(), "{:?}", clean.broken);
            prop_assert_eq!(clean.records, entries.len() as u64);

            let at = at.index(bytes.len());
            let mut edited = bytes.clone();
            edited[at] = byte;
            let report = verify_bytes(&edited);
            if byte == bytes[at] {
                prop_assert_eq!(report, clean);
            } else {
                // The record holding the edited byte (its final `\n` included).
                let record = bytes[..at].iter().filter(|&&b| b == b'\n').count() as u64 + 1;
                let b = report.broken.as_ref();
                prop_assert!(b.is_some(), "edit at byte {} went unnoticed", at);
                let b = b.unwrap();
                prop_assert_eq!(b.seq, record, "{}", b.problem);
                prop_assert_eq!(report.records, record - 1);
                let head = if record == 1 { Receipt::genesis() } else { receipts[record as usize - 2].clone() };
                prop_assert_eq!(&report.head, &head);
            }
        }
    }
}
