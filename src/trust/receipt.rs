//! Signed receipts: evidence that a member answered exactly this, at that time.
//!
//! When a query asks for a receipt, each member signs, with its gateway key, an
//! [`AnswerStatement`] of its answer to its sub-query (the query id, origin, purpose and
//! incident, the sub-query's hash, the digest and count of the rows it sent, its audit
//! record's hash, the time), and the coordinator signs its own over the client's query
//! and the digest of the final answer, listing the hash of every member statement it
//! includes. The [`Receipt`] travels in the query's summary; [`verify`] checks it
//! offline against the region CA and, given the answer, its digest.
//!
//! The rows' digest ([`RowsDigest`]) is over values, not bytes on the wire: for every
//! row, each column's value as Arrow displays it (or a null marker), so the same rows
//! give the same digest however they were batched or encoded, and an answer saved by
//! `fedgate query --format arrow` can be checked against its receipt.

use std::fmt::Write as _;
use std::time::SystemTime;

use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use prost::Message;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::proto::v1::{AnswerStatement, Receipt, SignedStatement};
use crate::trust::statement::{self, at_millis};
use crate::trust::tls::TlsMaterial;

/// The context of a member's statement.
pub const MEMBER_CONTEXT: &str = "fedgate answer statement v1 member";
/// The context of the coordinator's statement.
pub const COORDINATOR_CONTEXT: &str = "fedgate answer statement v1 coordinator";

/// The largest receipt read.
const MAX_RECEIPT: usize = 4 * 1024 * 1024;

/// The largest member statement a coordinator takes into a receipt.
pub const MAX_STATEMENT: usize = 16 * 1024;

/// How far a member's statement may be from the coordinator's in time (the member
/// signs first; an answer takes at most the longest deadline).
const MEMBER_BEFORE: std::time::Duration = std::time::Duration::from_secs(3600);
const SKEW_MS: u64 = 30_000;

/// The digest of rows, fed batch by batch.
pub struct RowsDigest {
    hash: Sha256,
    rows: u64,
    text: String,
}

/// A column's type as the digest names it: a dictionary by its values' type (a
/// dictionary may be unpacked on its way, and holds the same values).
fn digest_type(t: &datafusion::arrow::datatypes::DataType) -> String {
    match t {
        datafusion::arrow::datatypes::DataType::Dictionary(_, v) => v.to_string(),
        other => other.to_string(),
    }
}

impl RowsDigest {
    /// A digest of rows of `schema`: its columns' names and types come first.
    pub fn new(schema: &datafusion::arrow::datatypes::Schema) -> RowsDigest {
        let mut hash = Sha256::new();
        hash.update((schema.fields().len() as u32).to_le_bytes());
        for f in schema.fields() {
            for part in [f.name().clone(), digest_type(f.data_type())] {
                hash.update((part.len() as u64).to_le_bytes());
                hash.update(part.as_bytes());
            }
        }
        RowsDigest {
            hash,
            rows: 0,
            text: String::new(),
        }
    }

    /// Adds a batch's rows: per row, its number of columns (4 bytes, little-endian),
    /// then per column `0x00` for null, or `0x01`, the length of the value as Arrow
    /// displays it (8 bytes, little-endian) and that text. Every part has its length,
    /// so no two different sequences of rows are fed alike.
    pub fn update(&mut self, b: &RecordBatch) -> Result<()> {
        let options = FormatOptions::default();
        let formatters = b
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::Internal(format!("digest of an answer: {e}")))?;
        let columns = (b.num_columns() as u32).to_le_bytes();
        let nulls: Vec<_> = b.columns().iter().map(|c| c.logical_nulls()).collect();
        for row in 0..b.num_rows() {
            self.hash.update(columns);
            for (f, n) in formatters.iter().zip(&nulls) {
                if n.as_ref().is_some_and(|n| n.is_null(row)) {
                    self.hash.update([0u8]);
                } else {
                    self.text.clear();
                    write!(self.text, "{}", f.value(row))
                        .map_err(|e| Error::Internal(format!("digest of an answer: {e}")))?;
                    self.hash.update([1u8]);
                    self.hash.update((self.text.len() as u64).to_le_bytes());
                    self.hash.update(self.text.as_bytes());
                }
            }
        }
        self.rows += b.num_rows() as u64;
        Ok(())
    }

    /// The digest (hex) and the number of rows.
    pub fn finish(self) -> (String, u64) {
        (hex::encode(self.hash.finalize()), self.rows)
    }
}

/// The digest of `batches` of `schema`.
pub fn digest_of(
    schema: &datafusion::arrow::datatypes::Schema,
    batches: &[RecordBatch],
) -> Result<(String, u64)> {
    let mut d = RowsDigest::new(schema);
    for b in batches {
        d.update(b)?;
    }
    Ok(d.finish())
}

/// Signs a statement with the gateway's key, under the context its kind names.
pub fn sign(material: &TlsMaterial, st: &AnswerStatement) -> Result<Vec<u8>> {
    let context = match st.kind.as_str() {
        "member" => MEMBER_CONTEXT,
        "coordinator" => COORDINATOR_CONTEXT,
        other => return Err(Error::Internal(format!("statement kind {other:?}"))),
    };
    Ok(statement::sign(material, context, st.encode_to_vec())?.encode_to_vec())
}

/// Reads a statement without checking its signature (the coordinator compares its
/// digest with the rows it received as they end; [`check_member`] checks the rest
/// before the statement goes into a receipt).
pub fn read_unchecked(encoded: &[u8]) -> std::result::Result<AnswerStatement, String> {
    let signed = statement::decode(encoded, MAX_STATEMENT)?;
    AnswerStatement::decode(signed.body.as_slice()).map_err(|e| e.to_string())
}

/// What a coordinator expects of a member's statement of its answer.
pub struct Expected<'a> {
    /// The member's name and its identity in the region file.
    pub member: &'a str,
    /// Its identity URI.
    pub signer: &'a str,
    /// The query's id, origin, purpose and incident number.
    pub query_id: &'a str,
    /// The caller.
    pub origin: &'a str,
    /// The coordinator (the asking gateway).
    pub via: &'a str,
    /// The purpose stated.
    pub purpose: &'a str,
    /// The incident number stated (empty for none).
    pub incident: &'a str,
    /// SHA-256 of the sub-query sent to the member.
    pub query_sha256: &'a str,
}

/// Checks a member's statement before a coordinator lists it in a receipt: its size,
/// signature (member context), signer and every field it binds, and its time (within
/// the clock skew of now).
pub fn check_member(
    material: &TlsMaterial,
    encoded: &[u8],
    e: &Expected<'_>,
    now_ms: u64,
) -> std::result::Result<AnswerStatement, String> {
    if encoded.len() > MAX_STATEMENT {
        return Err(format!("it is longer than {MAX_STATEMENT} bytes"));
    }
    let s = open(material, encoded, "member")?;
    let fields = [
        ("member", s.member.as_str(), e.member),
        ("signer", &s.signer, e.signer),
        ("query id", &s.query_id, e.query_id),
        ("origin", &s.origin, e.origin),
        ("asking gateway", &s.via, e.via),
        ("purpose", &s.purpose, e.purpose),
        ("incident", &s.incident, e.incident),
        ("sub-query hash", &s.query_sha256, e.query_sha256),
    ];
    if let Some((field, got, want)) = fields.into_iter().find(|(_, a, b)| a != b) {
        return Err(format!("its {field} is {got:?}, not {want:?}"));
    }
    if s.time_ms > now_ms + SKEW_MS
        || s.time_ms + MEMBER_BEFORE.as_millis() as u64 + SKEW_MS < now_ms
    {
        return Err("its time is not the time of this answer (check the member's clock)".into());
    }
    Ok(s)
}

/// The SHA-256 (hex) of an encoded statement, as the coordinator lists it.
pub fn part_hash(encoded: &[u8]) -> String {
    hex::encode(Sha256::digest(encoded))
}

/// One check of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub what: String,
    /// What failed (`None`: it holds).
    pub failure: Option<String>,
}

fn check(what: impl Into<String>, failure: Option<String>) -> Check {
    Check {
        what: what.into(),
        failure,
    }
}

/// A statement checked: signature, kind and signer.
fn open(
    material: &TlsMaterial,
    encoded: &[u8],
    kind: &str,
) -> std::result::Result<AnswerStatement, String> {
    let signed: SignedStatement = statement::decode(encoded, MAX_RECEIPT)?;
    let body = AnswerStatement::decode(signed.body.as_slice())
        .map_err(|e| format!("its body is unreadable ({e})"))?;
    let context = if kind == "member" {
        MEMBER_CONTEXT
    } else {
        COORDINATOR_CONTEXT
    };
    let signer = statement::verify(material, context, &signed, at_millis(body.time_ms))
        .map_err(|e| e.to_string())?;
    if body.kind != kind {
        return Err(format!("it is a {} statement, not a {kind} one", body.kind));
    }
    if body.signer != signer.uri() {
        return Err(format!(
            "it is signed by {signer}, not by {} whom it names",
            body.signer
        ));
    }
    Ok(body)
}

/// Checks a receipt offline: every signature against the region CA (each at the time
/// it was signed), that the member statements are exactly the ones the coordinator
/// listed and speak of the same query, and, given the answer's rows, their digest.
/// Every check is returned, passed or failed.
pub fn verify(
    material: &TlsMaterial,
    encoded: &[u8],
    answer: Option<(&datafusion::arrow::datatypes::Schema, &[RecordBatch])>,
) -> Vec<Check> {
    let mut out = Vec::new();
    let receipt = match encoded.len() <= MAX_RECEIPT {
        true => Receipt::decode(encoded).map_err(|e| format!("it is not a receipt ({e})")),
        false => Err(format!("it is longer than {MAX_RECEIPT} bytes")),
    };
    let receipt = match receipt {
        Ok(r) => r,
        Err(e) => {
            out.push(check("the receipt is readable", Some(e)));
            return out;
        }
    };
    let coordinator = match open(material, &receipt.coordinator, "coordinator") {
        Ok(c) => {
            out.push(check(
                format!("the coordinator's statement, signed by {}", c.signer),
                None,
            ));
            c
        }
        Err(e) => {
            out.push(check("the coordinator's statement", Some(e)));
            return out;
        }
    };
    for (k, v) in [
        ("query", &coordinator.query_id),
        ("caller", &coordinator.origin),
        ("purpose", &coordinator.purpose),
        ("incident", &coordinator.incident),
        ("query text's SHA-256", &coordinator.query_sha256),
        ("answer's digest", &coordinator.rows_sha256),
    ] {
        out.push(check(format!("states {k}: {v}"), None));
    }
    out.push(check(
        format!(
            "states {} rows, at {}",
            coordinator.rows,
            crate::trust::incident::rfc3339_ms(coordinator.time_ms)
        ),
        None,
    ));
    if receipt.members.len() != coordinator.parts.len() {
        out.push(check(
            "as many member statements as the coordinator lists",
            Some(format!(
                "the receipt holds {} member statement(s), the coordinator lists {}",
                receipt.members.len(),
                coordinator.parts.len()
            )),
        ));
    }
    let listed: std::collections::BTreeSet<&String> = coordinator.parts.iter().collect();
    let mut seen = std::collections::BTreeSet::new();
    for (i, m) in receipt.members.iter().enumerate() {
        let hash = part_hash(m);
        let what = format!("member statement {}", i + 1);
        match open(material, m, "member") {
            Err(e) => out.push(check(what, Some(e))),
            Ok(s) => {
                let what = format!("{what}, signed by {} ({} rows)", s.signer, s.rows);
                let mismatch = [
                    ("query id", &s.query_id, &coordinator.query_id),
                    ("origin", &s.origin, &coordinator.origin),
                    ("purpose", &s.purpose, &coordinator.purpose),
                    ("incident", &s.incident, &coordinator.incident),
                    ("asking gateway", &s.via, &coordinator.signer),
                ]
                .into_iter()
                .find(|(_, a, b)| a != b)
                .map(|(field, a, b)| {
                    format!("its {field} is {a:?}, the coordinator's statement says {b:?}")
                });
                let early = coordinator
                    .time_ms
                    .saturating_sub(MEMBER_BEFORE.as_millis() as u64 + SKEW_MS);
                let failure = mismatch
                    .or_else(|| {
                        (!listed.contains(&hash)).then(|| {
                            "the coordinator's statement does not list it (added or altered)".into()
                        })
                    })
                    .or_else(|| {
                        (s.time_ms > coordinator.time_ms + SKEW_MS || s.time_ms < early)
                            .then(|| "it was signed at a time apart from the coordinator's".into())
                    })
                    .or_else(|| (!seen.insert(hash.clone())).then(|| "it appears twice".into()));
                out.push(check(what, failure));
            }
        }
        seen.insert(hash);
    }
    if receipt.members.is_empty() {
        out.push(check(
            "no member statement: no member's data is in this answer (every member was pruned)",
            None,
        ));
    }
    let missing = coordinator
        .parts
        .iter()
        .filter(|p| !seen.contains(*p))
        .count();
    out.push(check(
        format!(
            "every member statement the coordinator lists is present ({})",
            coordinator.parts.len()
        ),
        (missing > 0).then(|| format!("{missing} listed statement(s) are missing")),
    ));
    if let Some((schema, batches)) = answer {
        let failure = match digest_of(schema, batches) {
            Ok((d, rows)) if d == coordinator.rows_sha256 && rows == coordinator.rows => None,
            Ok((_, rows)) if rows != coordinator.rows => Some(format!(
                "the answer has {rows} rows, the receipt says {}",
                coordinator.rows
            )),
            Ok(_) => Some("the answer's rows differ from those the receipt was signed for".into()),
            Err(e) => Some(e.to_string()),
        };
        out.push(check(
            "the answer matches the coordinator's digest",
            failure,
        ));
    }
    out
}

/// Now, in milliseconds, for statements.
pub fn now_ms() -> u64 {
    statement::millis(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Float64Array, Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    fn batch(ids: &[i64], names: &[Option<&str>], x: &[f64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
            Field::new("x", DataType::Float64, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(ids.to_vec())),
                Arc::new(StringArray::from(names.to_vec())),
                Arc::new(Float64Array::from(x.to_vec())),
            ],
        )
        .unwrap()
    }

    #[test]
    fn the_digest_is_of_values_in_order_not_of_batching() {
        let whole = batch(&[1, 2, 3], &[Some("a"), None, Some("")], &[0.1, 2.0, -0.0]);
        let split = [
            batch(&[1], &[Some("a")], &[0.1]),
            batch(&[2, 3], &[None, Some("")], &[2.0, -0.0]),
        ];
        let schema = whole.schema();
        let a = digest_of(&schema, std::slice::from_ref(&whole)).unwrap();
        assert_eq!(a, digest_of(&schema, &split).unwrap());
        // Other column names give another digest.
        let renamed = Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("other", DataType::Utf8, true),
            Field::new("x", DataType::Float64, false),
        ]);
        assert_ne!(
            a,
            digest_of(&renamed, std::slice::from_ref(&whole)).unwrap()
        );
        assert_eq!(a.1, 3);
        // Null and the empty text differ; so do order and one changed digit; and a
        // value holding what looks like a boundary is still one value.
        let tricky = batch(
            &[1, 2, 3],
            &[Some("a\u{1f}\u{1}b"), None, Some("")],
            &[0.1, 2.0, -0.0],
        );
        assert_ne!(a, digest_of(&schema, &[tricky]).unwrap());
        let other = [
            batch(
                &[1, 2, 3],
                &[Some("a"), Some(""), Some("")],
                &[0.1, 2.0, -0.0],
            ),
            batch(&[2, 1, 3], &[None, Some("a"), Some("")], &[2.0, 0.1, -0.0]),
            batch(&[1, 2, 3], &[Some("a"), None, Some("")], &[0.1, 2.0, 0.0]),
        ];
        for o in other {
            assert_ne!(a, digest_of(&schema, &[o]).unwrap());
        }
    }
}
