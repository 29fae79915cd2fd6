//! Audit records shipped to a SIEM as JSON lines, read back from the log itself.
//!
//! The exporter follows the audit log file: every record that is on disk is checked
//! (its `prev` is the hash before it, its `hash` is recomputed from its bytes) and
//! appended to the sink, a JSON-lines file a log shipper (Fluent Bit, Filebeat, Vector)
//! forwards. It never sits on a query's path: a query waits for its record in the log,
//! never for the sink. A cursor beside the sink (`<sink>.cursor`) says how far it got,
//! so a restarted gateway resumes where it stopped: delivery is at least once (a crash
//! between writing the sink and the cursor repeats those records), and `member` with
//! `seq` identifies a record for deduplication. A log whose chain does not verify is
//! not exported past the break: the export stops, says where, and counts it.
//!
//! # The record, version 1 (`"schema": "fedgate.audit.v1"`)
//!
//! ```text
//! {"schema":"fedgate.audit.v1","@timestamp":"2026-12-05T01:02:03.456Z",
//!  "member":"hangzhou","member_identity":"fedgate://yrd/city/hangzhou",
//!  "seq":12,"prev":"…","hash":"…","entry":{…the log's entry, unchanged…}}
//! ```
//!
//! `entry` is the log's [`AuditEntry`](super::AuditEntry) as written there (kind, time,
//! query id, via, origin, purpose, datasets, SQL hash, decision, rule, level, reason,
//! rows, bytes, members). A new field may appear in `entry` within version 1; a
//! field removed or changed in meaning is a new version.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{AuditLog, GENESIS, Receipt};
use crate::error::{Error, Result};

/// The version of the exported record.
pub const SCHEMA: &str = "fedgate.audit.v1";

/// The most bytes of the log one export round reads.
pub const EXPORT_BATCH_BYTES: u64 = 4 * 1024 * 1024;

/// How often the exporter looks for new records.
pub const EXPORT_POLL: Duration = Duration::from_millis(500);

/// How far the sink has the log: the byte offset after the last exported record, its
/// seq and hash.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Cursor {
    offset: u64,
    seq: u64,
    hash: String,
}

/// The exporter's progress, for metrics and the board.
#[derive(Debug, Default)]
pub struct ExportProgress {
    /// The last record exported.
    pub seq: AtomicU64,
    /// The seq of a record that failed verification (0: none); the export stops there.
    pub broken_at: AtomicU64,
}

/// Follows one audit log into one sink.
pub struct Exporter {
    log: Arc<AuditLog>,
    sink: PathBuf,
    cursor_path: PathBuf,
    cursor: Cursor,
    member: String,
    identity: String,
    /// Shared with metrics.
    pub progress: Arc<ExportProgress>,
}

impl Exporter {
    /// An exporter of `log` into `sink`, resuming from the cursor beside it if that
    /// cursor describes this log (same record at the same place); otherwise from the
    /// first record.
    pub fn new(log: Arc<AuditLog>, sink: &Path, member: &str, identity: &str) -> Result<Exporter> {
        let cursor_path = PathBuf::from(format!("{}.cursor", sink.display()));
        let mut cursor = match std::fs::read(&cursor_path) {
            Ok(bytes) => serde_json::from_slice::<Cursor>(&bytes).unwrap_or_default(),
            Err(_) => Cursor::default(),
        };
        if cursor.seq > 0 && !cursor_matches(log.path(), &cursor) {
            tracing::warn!(
                sink = %sink.display(),
                seq = cursor.seq,
                "the audit export cursor does not match the log (a new log?); exporting it from its first record"
            );
            cursor = Cursor::default();
        }
        if let Some(dir) = sink.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::Config(format!("audit export {}: {e}", sink.display())))?;
        }
        cut_torn_line(sink)
            .map_err(|e| Error::Config(format!("audit export {}: {e}", sink.display())))?;
        let progress = log
            .export
            .get_or_init(|| Arc::new(ExportProgress::default()))
            .clone();
        progress.seq.store(cursor.seq, Ordering::Relaxed);
        Ok(Exporter {
            log,
            sink: sink.to_path_buf(),
            cursor_path,
            cursor,
            member: member.to_string(),
            identity: identity.to_string(),
            progress,
        })
    }

    /// Exports every durable record not exported yet; returns how many.
    pub fn run_once(&mut self) -> Result<u64> {
        if self.progress.broken_at.load(Ordering::Relaxed) != 0 {
            return Ok(0);
        }
        let durable = self.log.durable_seq();
        if durable <= self.cursor.seq {
            return Ok(0);
        }
        let io = |e: std::io::Error| Error::Internal(format!("audit export: {e}"));
        let mut f = std::fs::File::open(self.log.path()).map_err(io)?;
        f.seek(SeekFrom::Start(self.cursor.offset)).map_err(io)?;
        // A bounded batch per round, so that a long backlog (export turned on for an
        // old log) costs a batch of memory at a time, not the whole log; a record
        // longer than the batch is read whole.
        let mut reader = std::io::BufReader::new(f).take(EXPORT_BATCH_BYTES);
        let mut bytes = Vec::new();
        reader.read_to_end(&mut bytes).map_err(io)?;
        if !bytes.contains(&b'\n') && bytes.len() as u64 == EXPORT_BATCH_BYTES {
            use std::io::BufRead;
            reader
                .into_inner()
                .read_until(b'\n', &mut bytes)
                .map_err(io)?;
        }
        let mut out = Vec::new();
        let mut next = self.cursor.clone();
        let mut rest = &bytes[..];
        let mut exported = 0;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            let line = &rest[..end];
            // The same check as `fedgate audit verify`, so nothing it would reject is
            // shipped.
            let head = Receipt {
                seq: next.seq,
                hash: if next.seq == 0 {
                    GENESIS.to_string()
                } else {
                    next.hash.clone()
                },
            };
            let record = match super::verify::check_next(line, &head, 0) {
                Ok((_, r)) => r,
                Err(_) => {
                    let at = next.seq + 1;
                    self.progress.broken_at.store(at, Ordering::Relaxed);
                    tracing::error!(record = at, log = %self.log.path().display(), "audit export stopped: the log does not verify here (`fedgate audit verify` describes it)");
                    break;
                }
            };
            if record.seq > durable {
                break;
            }
            let exported_record = serde_json::json!({
                "schema": SCHEMA,
                "@timestamp": record.entry.time,
                "member": self.member,
                "member_identity": self.identity,
                "seq": record.seq,
                "prev": record.prev,
                "hash": record.hash,
                "entry": record.entry,
            });
            serde_json::to_writer(&mut out, &exported_record)
                .map_err(|e| Error::Internal(format!("audit export: {e}")))?;
            out.push(b'\n');
            next = Cursor {
                offset: next.offset + end as u64 + 1,
                seq: record.seq,
                hash: record.hash,
            };
            exported += 1;
            rest = &rest[end + 1..];
        }
        if exported == 0 {
            return Ok(0);
        }
        let mut sink = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.sink)
            .map_err(io)?;
        sink.write_all(&out).map_err(io)?;
        sink.sync_data().map_err(io)?;
        // The cursor moves only once the records are on disk in the sink.
        let tmp = PathBuf::from(format!("{}.tmp", self.cursor_path.display()));
        std::fs::write(
            &tmp,
            serde_json::to_vec(&next).map_err(|e| Error::Internal(e.to_string()))?,
        )
        .map_err(io)?;
        std::fs::rename(&tmp, &self.cursor_path).map_err(io)?;
        self.cursor = next;
        self.progress.seq.store(self.cursor.seq, Ordering::Relaxed);
        Ok(exported)
    }

    /// Exports every [`EXPORT_POLL`] until the task is dropped.
    pub async fn run(mut self) {
        loop {
            let mut me = self;
            let (back, r) = tokio::task::spawn_blocking(move || {
                let r = me.run_once();
                (me, r)
            })
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
            self = back;
            if let Err(e) = r {
                tracing::warn!(error = %e, sink = %self.sink.display(), "audit export failed; retrying");
            }
            tokio::time::sleep(EXPORT_POLL).await;
        }
    }
}

/// Cuts a line the sink ends with that has no newline: a write the process was
/// stopped in the middle of. Its record, like every one after the cursor, is written
/// again; without the cut the next record would be glued to half a line, which no
/// SIEM could parse.
fn cut_torn_line(sink: &Path) -> std::io::Result<()> {
    let mut f = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(sink)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    // Back from the end in blocks to the last newline (records are small; a torn
    // one is at most one record long).
    let mut end = len;
    let mut block = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(block.len() as u64);
        let n = (end - start) as usize;
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut block[..n])?;
        if let Some(i) = block[..n].iter().rposition(|&b| b == b'\n') {
            let keep = start + i as u64 + 1;
            if keep < len {
                tracing::warn!(sink = %sink.display(), bytes = len - keep, "the audit export sink ended in a torn line (a stop mid-write); cut it, its record is written again");
                f.set_len(keep)?;
                f.sync_data()?;
            }
            return Ok(());
        }
        end = start;
    }
    if len > 0 {
        tracing::warn!(sink = %sink.display(), bytes = len, "the audit export sink holds one torn line (a stop mid-write); cut it, its record is written again");
        f.set_len(0)?;
        f.sync_data()?;
    }
    Ok(())
}

/// Whether the log holds, ending at `cursor.offset`, the record `cursor` names.
fn cursor_matches(log: &Path, cursor: &Cursor) -> bool {
    let Ok(mut f) = std::fs::File::open(log) else {
        return false;
    };
    let Ok(len) = f.metadata().map(|m| m.len()) else {
        return false;
    };
    if cursor.offset == 0 || cursor.offset > len {
        return false;
    }
    // The record ends at `offset - 1` (its `\n`); its hash is the 64 hex characters
    // before the closing `"}`.
    let Some(start) = cursor.offset.checked_sub(67) else {
        return false;
    };
    let mut tail = [0u8; 67];
    if f.seek(SeekFrom::Start(start)).is_err() || f.read_exact(&mut tail).is_err() {
        return false;
    }
    &tail[64..] == b"\"}\n" && tail[..64] == *cursor.hash.as_bytes()
}
