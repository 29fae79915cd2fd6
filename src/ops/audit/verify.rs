//! Verification of an audit log from its raw bytes: every record's hash recomputed from
//! the exact bytes written, the chain of `seq` and `prev` followed, the first break
//! reported at its record with what was found there, a torn last record told apart from
//! tampering, and a witnessed record checked against its receipt.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::AuditEntry;
use super::GENESIS;
use super::HASH_MARKER;
use super::RECORD_START;
use super::Receipt;
use crate::error::{Error, Result};

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

pub(super) fn verify_file(path: &Path, expected: Option<&Receipt>) -> Result<VerifyReport> {
    let file = File::open(path)
        .map_err(|e| Error::Config(format!("audit log {}: cannot open it: {e}", path.display())))?;
    let scan = scan_reader(BufReader::new(file), expected)
        .map_err(|e| Error::Config(format!("audit log {}: cannot read it: {e}", path.display())))?;
    Ok(scan.report)
}

/// A record as parsed, to check its shape and read `seq` and `prev`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StoredRecord {
    pub(super) seq: u64,
    pub(super) prev: String,
    /// Parsed so that a line whose entry has the wrong shape is reported (and for
    /// the export).
    pub(super) entry: AuditEntry,
    pub(super) hash: String,
}

/// A scan's outcome, with what `open` needs to recover.
pub(super) struct Scan {
    pub(super) report: VerifyReport,
    /// Bytes from the start of the file that hold verified records.
    pub(super) valid_len: u64,
    /// Whether the only problem is an incomplete record at the end.
    pub(super) incomplete: bool,
    /// Length of that incomplete record.
    pub(super) tail_len: u64,
}

/// A problem found while scanning, before its description is final.
pub(super) enum Break {
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
pub(super) struct Scanner<'a> {
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
        match check_next(line, &self.head, self.lines) {
            Ok((receipt, _)) => {
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
}

/// Checks `line` (line `at` of the file) as the record after `head`: its hash covers
/// its bytes, it is a well-formed record, it has the next seq and follows `head`'s hash.
/// The verifier and the export both ask this, so they accept exactly the same records.
pub(super) fn check_next(
    line: &[u8],
    head: &Receipt,
    at: u64,
) -> Result<(Receipt, StoredRecord), Break> {
    let seq = head.seq + 1;
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
    if record.prev != head.hash {
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
                head.hash
            )
        };
        return Err(broken(problem));
    }
    Ok((
        Receipt {
            seq,
            hash: computed,
        },
        record,
    ))
}

impl Scanner<'_> {
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
pub(super) fn out_of_place(seq: u64, found: u64, seen_on: Option<u64>) -> String {
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
pub(super) fn records_are(first: u64, last: u64) -> String {
    if first == last {
        format!("record {first} is")
    } else {
        format!("records {first}..{last} are")
    }
}

/// The seq a line claims, read from its `{"seq":N` prefix without parsing the rest.
pub(super) fn leading_seq(line: &[u8]) -> Option<u64> {
    let rest = line.strip_prefix(RECORD_START)?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

/// The position of the last occurrence of `needle` in `haystack`.
pub(super) fn find_last(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).rposition(|w| w == needle)
}

pub(super) fn scan_bytes(bytes: &[u8], witness: Option<&Receipt>) -> Scan {
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

pub(super) fn scan_reader(mut reader: impl BufRead, witness: Option<&Receipt>) -> io::Result<Scan> {
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
