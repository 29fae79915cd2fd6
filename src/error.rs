//! Typed errors, classified by who is at fault and whether a retry can help.
//!
//! Every error a gateway can return to a caller is an [`Error`]. The conversion to a
//! gRPC status happens in exactly one place, [`Error::to_status`], so callers see the
//! same code and wording for the same problem wherever it arose.

use std::time::Duration;

/// Who caused an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The caller sent something wrong (bad SQL, unknown table, no permission).
    Caller,
    /// Another gateway (a member) failed or could not be reached.
    Peer,
    /// Configuration on this gateway is wrong.
    Config,
    /// A bug or resource failure inside this gateway.
    Internal,
}

/// Result alias for the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How a member failed to answer its sub-query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberFailure {
    /// It could not be reached at all.
    Unavailable,
    /// It did not answer within its share of the deadline.
    TimedOut,
    /// It refused under its own access rules.
    Denied,
    /// It refused for load: the slots it gives the origin's class were in use, or
    /// the class was over its rate. It said when to try again.
    Busy(Duration),
    /// It answered with an error.
    Failed,
}

/// The metadata key of a refusal's retry hint, in milliseconds (gRPC's own name).
pub const RETRY_PUSHBACK_METADATA: &str = "grpc-retry-pushback-ms";

/// The metadata key of a status that reports a member's database failing.
pub const DATABASE_METADATA: &str = "fedgate-database";

/// Every error the library reports.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The caller's certificate is fine, but its identity is not one the region knows.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),

    /// The caller may not do this.
    #[error("permission denied: {0}")]
    PermissionDenied(String),

    /// The request itself is malformed (bad SQL, unknown table or column, bad option).
    #[error("invalid query: {0}")]
    InvalidQuery(String),

    /// The caller named something that does not exist (a published service).
    #[error("not found: {0}")]
    NotFound(String),

    /// A member did not answer its sub-query.
    #[error("member {member} {}: {reason}", failure_words(*.failure))]
    Member {
        /// The member's name.
        member: String,
        /// How it failed.
        failure: MemberFailure,
        /// What it or the transport said.
        reason: String,
    },

    /// The query did not finish within its deadline.
    #[error("deadline of {0:?} exceeded")]
    DeadlineExceeded(Duration),

    /// The gateway is at its limit; the caller may retry later.
    #[error("overloaded: {0}")]
    Overloaded(String),

    /// The query is larger than this gateway lets one query be (rows, memory).
    #[error("query too large: {0}")]
    TooLarge(String),

    /// The caller's class has no free slot or is over its rate; retrying after
    /// `retry_after` may succeed.
    #[error("overloaded: {reason}; retry in {} ms", retry_after.as_millis())]
    Busy {
        /// Which limit was hit.
        reason: String,
        /// When to retry.
        retry_after: Duration,
    },

    /// A configuration problem (reported by `fedgate check` with file and key).
    #[error("configuration: {0}")]
    Config(String),

    /// A TLS or certificate problem on this gateway's side.
    #[error("tls: {0}")]
    Tls(String),

    /// A database behind this member failed: down or unreachable (`unavailable`, a
    /// retry may help), or refusing the gateway's login, missing a mapped table or
    /// column, or failing a statement (a problem of the member's own configuration).
    #[error("database {database}: {reason}")]
    Database {
        /// The database's name in the member file.
        database: String,
        /// Whether the database could not be reached at all.
        unavailable: bool,
        /// What the database or the connection said.
        reason: String,
    },

    /// A failure inside the gateway that the caller cannot fix.
    #[error("internal error: {0}")]
    Internal(String),

    /// The caller cancelled the query (a PostgreSQL cancel request).
    #[error("cancelled: {0}")]
    Cancelled(String),
}

fn failure_words(f: MemberFailure) -> &'static str {
    match f {
        MemberFailure::Unavailable => "is unavailable",
        MemberFailure::TimedOut => "timed out",
        MemberFailure::Denied => "denied the request",
        MemberFailure::Busy(_) => "is busy",
        MemberFailure::Failed => "failed",
    }
}

impl Error {
    /// Who is at fault.
    pub fn fault(&self) -> Fault {
        match self {
            Error::Unauthenticated(_)
            | Error::PermissionDenied(_)
            | Error::InvalidQuery(_)
            | Error::NotFound(_)
            | Error::Cancelled(_) => Fault::Caller,
            Error::Member { .. } => Fault::Peer,
            Error::DeadlineExceeded(_) => Fault::Peer,
            Error::Overloaded(_) | Error::Internal(_) => Fault::Internal,
            Error::Busy { .. } | Error::TooLarge(_) => Fault::Caller,
            Error::Config(_) | Error::Tls(_) => Fault::Config,
            Error::Database { unavailable, .. } => {
                if *unavailable {
                    Fault::Peer
                } else {
                    Fault::Config
                }
            }
        }
    }

    /// Whether sending the same request again may succeed.
    pub fn retryable(&self) -> bool {
        match self {
            Error::Member { failure, .. } => {
                matches!(
                    failure,
                    MemberFailure::Unavailable | MemberFailure::TimedOut | MemberFailure::Busy(_)
                )
            }
            Error::DeadlineExceeded(_) | Error::Overloaded(_) | Error::Busy { .. } => true,
            Error::Database { unavailable, .. } => *unavailable,
            _ => false,
        }
    }

    /// What went wrong, without the member's name for member errors (the summary
    /// shows the name beside it).
    pub fn reason(&self) -> String {
        match self {
            Error::Member { reason, .. } => reason.clone(),
            other => other.to_string(),
        }
    }

    /// The hint a refusal for load carries: when to ask again.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Busy { retry_after, .. }
            | Error::Member {
                failure: MemberFailure::Busy(retry_after),
                ..
            } => Some(*retry_after),
            _ => None,
        }
    }

    /// The one place where library errors become PostgreSQL error codes (SQLSTATE),
    /// for the PostgreSQL port. A malformed query is told apart by what the planner
    /// said: syntax, an unknown table (dataset) or an unknown column.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            Error::Unauthenticated(_) => "28000",
            Error::PermissionDenied(_) => "42501",
            Error::InvalidQuery(m) => {
                let m = m.to_ascii_lowercase();
                if m.starts_with("unknown dataset")
                    || m.contains("table") && m.contains("not found")
                {
                    "42P01"
                } else if m.contains("no field named")
                    || m.contains("column") && m.contains("not found")
                {
                    "42703"
                } else if m.contains("syntax error")
                    || m.contains("parsererror")
                    || m.contains("expected:")
                {
                    "42601"
                } else if m.starts_with("only queries") {
                    "25006"
                } else if m.contains("binding parameters") {
                    "22023"
                } else {
                    "42000"
                }
            }
            Error::NotFound(_) => "42704",
            Error::Member { failure, .. } => match failure {
                MemberFailure::Unavailable => "08006",
                MemberFailure::TimedOut => "57014",
                MemberFailure::Denied => "42501",
                MemberFailure::Busy(_) => "53300",
                MemberFailure::Failed => "58000",
            },
            Error::DeadlineExceeded(_) => "57014",
            Error::Busy { .. } | Error::Overloaded(_) => "53300",
            Error::TooLarge(_) => "54000",
            Error::Database {
                unavailable: true, ..
            } => "08006",
            Error::Database { .. } | Error::Config(_) | Error::Tls(_) | Error::Internal(_) => {
                "XX000"
            }
            Error::Cancelled(_) => "57014",
        }
    }

    /// The one place where library errors become gRPC statuses.
    pub fn to_status(&self) -> tonic::Status {
        use tonic::Code;
        let code = match self {
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::InvalidQuery(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::Member { failure, .. } => match failure {
                MemberFailure::Unavailable => Code::Unavailable,
                MemberFailure::TimedOut => Code::DeadlineExceeded,
                MemberFailure::Denied => Code::PermissionDenied,
                MemberFailure::Busy(_) => Code::ResourceExhausted,
                MemberFailure::Failed => Code::Aborted,
            },
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::Overloaded(_) | Error::Busy { .. } | Error::TooLarge(_) => {
                Code::ResourceExhausted
            }
            Error::Database {
                unavailable: true, ..
            } => Code::Unavailable,
            Error::Database { .. } => Code::Internal,
            Error::Config(_) | Error::Tls(_) | Error::Internal(_) => Code::Internal,
            Error::Cancelled(_) => Code::Cancelled,
        };
        match self {
            // A member's database, not the member, is unavailable: say so in the
            // metadata, so the coordinator does not read it as a transport failure.
            Error::Database { database, .. } => {
                let mut md = tonic::metadata::MetadataMap::new();
                if let Ok(v) = tonic::metadata::MetadataValue::try_from(database.as_str()) {
                    md.insert(DATABASE_METADATA, v);
                }
                tonic::Status::with_metadata(code, self.to_string(), md)
            }
            // gRPC's own name for "retry after": clients with a retry policy honour
            // it, and others can read it.
            Error::Busy { retry_after, .. }
            | Error::Member {
                failure: MemberFailure::Busy(retry_after),
                ..
            } => {
                let mut md = tonic::metadata::MetadataMap::new();
                md.insert(
                    RETRY_PUSHBACK_METADATA,
                    tonic::metadata::MetadataValue::from(retry_after.as_millis() as u64),
                );
                tonic::Status::with_metadata(code, self.to_string(), md)
            }
            _ => tonic::Status::new(code, self.to_string()),
        }
    }

    /// Classifies an error from the query engine. Errors that carry a [`Error`] (for
    /// example a member failure raised inside a scan) keep their meaning; planning
    /// errors are the caller's fault; execution errors are internal.
    pub fn from_datafusion(e: datafusion::error::DataFusionError) -> Error {
        use datafusion::error::DataFusionError as D;
        if let Some(inner) = find_fedgate_error(&e) {
            return inner;
        }
        match e.find_root() {
            D::SQL(..) | D::Plan(..) | D::SchemaError(..) | D::NotImplemented(..) => {
                Error::InvalidQuery(strip_df_prefix(&e.find_root().to_string()))
            }
            // Type checks DataFusion repeats while optimizing report a caller's
            // mismatched function arguments as internal errors, with planning errors
            // inside (found by the fuzzer: `substr(member, member)` in a derived table
            // ordered by a subquery). They are the caller's query, not a fault here.
            D::Internal(m) if m.contains("Error during planning: ") => Error::InvalidQuery(
                m.split("\nThis issue was likely caused by a bug in DataFusion")
                    .next()
                    .unwrap_or(m)
                    .trim()
                    .to_string(),
            ),
            // What a query's own expressions raise while it plans or runs (an
            // aggregate over a NULL literal, an overflow, a division by zero, a value
            // that does not cast) is the caller's query too, and retrying it does not
            // help. Faults of reading data (I/O, object stores, a database) are not
            // among these: they arrive as other variants, or as fedgate errors.
            D::Execution(m) => Error::InvalidQuery(m.clone()),
            D::ArrowError(a, _)
                if matches!(
                    a.as_ref(),
                    arrow::error::ArrowError::DivideByZero
                        | arrow::error::ArrowError::ArithmeticOverflow(_)
                        | arrow::error::ArrowError::CastError(_)
                        | arrow::error::ArrowError::InvalidArgumentError(_)
                        | arrow::error::ArrowError::ComputeError(_)
                ) =>
            {
                Error::InvalidQuery(a.to_string())
            }
            D::ResourcesExhausted(m) => Error::TooLarge(format!(
                "it needs more memory than one query may use here \
                 (limits.query_memory_bytes): {m}"
            )),
            other => Error::Internal(other.to_string()),
        }
    }

    /// Wraps this error for transport through the query engine.
    pub fn into_datafusion(self) -> datafusion::error::DataFusionError {
        datafusion::error::DataFusionError::External(Box::new(self))
    }
}

/// Finds a fedgate error wrapped anywhere inside a DataFusion error.
fn find_fedgate_error(e: &datafusion::error::DataFusionError) -> Option<Error> {
    use datafusion::error::DataFusionError as D;
    match e {
        D::External(inner) => inner.downcast_ref::<Error>().cloned(),
        D::Context(_, inner) => find_fedgate_error(inner),
        D::Shared(inner) => find_fedgate_error(inner),
        D::Collection(errs) => errs.iter().find_map(find_fedgate_error),
        D::ArrowError(inner, _) => match inner.as_ref() {
            arrow::error::ArrowError::ExternalError(x) => x.downcast_ref::<Error>().cloned(),
            _ => None,
        },
        _ => None,
    }
}

/// DataFusion prefixes messages with its own category ("Error during planning: ");
/// the caller is told the category by the status code, so keep only the message.
fn strip_df_prefix(s: &str) -> String {
    for p in [
        "Error during planning: ",
        "SQL error: ",
        "Schema error: ",
        "This feature is not implemented: ",
    ] {
        if let Some(rest) = s.strip_prefix(p) {
            return rest.to_string();
        }
    }
    s.to_string()
}

/// The connection failed under a gRPC call rather than the server answering it: tonic
/// reports these with codes Unknown or Cancelled and the transport's words. The
/// commonest is a server ending an aged connection (`[lifecycle] max_connection_age`,
/// GOAWAY) just as a new call starts on it (found by the soak: "connection closed",
/// "not a result of an error"); a read-only call that has delivered nothing yet is
/// safe to send again. In TLS 1.3 a refused client certificate arrives the same way,
/// as an alert on the first read.
///
/// The transport's words may be in the message or only in its sources ("operation was
/// canceled" caused by "transport error: connection closed", the next commonest, found
/// by a soak with a 5 s connection age), so the whole chain is read.
pub fn link_failed(s: &tonic::Status) -> bool {
    if !matches!(s.code(), tonic::Code::Unknown | tonic::Code::Cancelled) {
        return false;
    }
    let mut text = s.message().to_string();
    let mut source = std::error::Error::source(s);
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    ["transport error", "h2 protocol error", "connection closed"]
        .iter()
        .any(|w| text.contains(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_failure_is_told_by_its_message_or_its_sources() {
        use tonic::{Code, Status};
        assert!(link_failed(&Status::new(
            Code::Unknown,
            "h2 protocol error: connection error received: not a result of an error"
        )));
        let mut s = Status::new(Code::Cancelled, "operation was canceled");
        assert!(!link_failed(&s), "a cancel with no word of the transport");
        s.set_source(std::sync::Arc::new(std::io::Error::other(
            "transport error: connection closed",
        )));
        assert!(link_failed(&s));
        // The member's own answers are never taken for a link failure.
        assert!(!link_failed(&Status::new(
            Code::InvalidArgument,
            "transport error"
        )));
    }

    #[test]
    fn a_planning_error_raised_as_internal_is_the_callers_query() {
        let e = Error::from_datafusion(datafusion::error::DataFusionError::Internal(
            "Function 'substr' failed to match any signature, errors: Error during planning: \
             Function 'substr' requires Int64, but received String (DataType: Utf8).\n\
             This issue was likely caused by a bug in DataFusion's code. Please help us"
                .into(),
        ));
        match e {
            Error::InvalidQuery(m) => {
                assert!(
                    m.contains("substr") && !m.contains("bug in DataFusion"),
                    "{m}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            Error::from_datafusion(datafusion::error::DataFusionError::Internal("x".into())),
            Error::Internal(_)
        ));
        // Also found by the fuzzer: `sum(NULL)` fails while it plans.
        assert!(matches!(
            Error::from_datafusion(datafusion::error::DataFusionError::Execution(
                "[return_type] SUM not supported for Null".into()
            )),
            Error::InvalidQuery(_)
        ));
        assert!(matches!(
            Error::from_datafusion(datafusion::error::DataFusionError::ArrowError(
                Box::new(arrow::error::ArrowError::DivideByZero),
                None
            )),
            Error::InvalidQuery(_)
        ));
        assert!(matches!(
            Error::from_datafusion(datafusion::error::DataFusionError::ArrowError(
                Box::new(arrow::error::ArrowError::IoError(
                    "disk".into(),
                    std::io::Error::other("x")
                )),
                None
            )),
            Error::Internal(_)
        ));
    }

    #[test]
    fn member_errors_name_the_member_and_map_to_codes() {
        let e = Error::Member {
            member: "hefei".into(),
            failure: MemberFailure::Unavailable,
            reason: "connection refused".into(),
        };
        assert_eq!(
            e.to_string(),
            "member hefei is unavailable: connection refused"
        );
        assert_eq!(e.to_status().code(), tonic::Code::Unavailable);
        assert!(e.retryable());
        assert_eq!(e.fault(), Fault::Peer);
    }

    #[test]
    fn wrapped_errors_survive_the_engine() {
        let e = Error::Member {
            member: "suzhou".into(),
            failure: MemberFailure::TimedOut,
            reason: "no answer in 2s".into(),
        };
        let df = datafusion::error::DataFusionError::Context(
            "while scanning".into(),
            Box::new(e.into_datafusion()),
        );
        let back = Error::from_datafusion(df);
        assert!(matches!(
            back,
            Error::Member {
                failure: MemberFailure::TimedOut,
                ..
            }
        ));
    }

    #[test]
    fn planning_errors_are_the_callers_fault() {
        let df = datafusion::error::DataFusionError::Plan("table 'x' not found".into());
        let e = Error::from_datafusion(df);
        assert_eq!(e.fault(), Fault::Caller);
        assert_eq!(e.to_string(), "invalid query: table 'x' not found");
    }
}
