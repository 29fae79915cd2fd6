//! Code generated from `proto/fedgate/v1/fedgate.proto` by `build.rs`.

#![allow(clippy::all, missing_docs)]

/// Version 1 of the fedgate protocol.
pub mod v1 {
    tonic::include_proto!("fedgate.v1");

    /// The encoded descriptors of the protocol, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("fedgate_descriptor");
}

/// The lowercase word for a member state.
pub fn state_word(state: i32) -> &'static str {
    match v1::MemberState::try_from(state).unwrap_or(v1::MemberState::Unspecified) {
        v1::MemberState::Ok => "ok",
        v1::MemberState::Pruned => "pruned",
        v1::MemberState::Unavailable => "unavailable",
        v1::MemberState::TimedOut => "timed out",
        v1::MemberState::Denied => "denied",
        v1::MemberState::Busy => "busy",
        v1::MemberState::Error => "error",
        v1::MemberState::Cancelled => "cancelled",
        v1::MemberState::Cached => "cached",
        v1::MemberState::Stale => "stale",
        v1::MemberState::Running => "running",
        v1::MemberState::Unspecified => "unknown",
    }
}

/// A member state as one lowercase identifier (`timed_out`), for JSON and metrics.
pub fn state_code(state: i32) -> &'static str {
    match v1::MemberState::try_from(state).unwrap_or(v1::MemberState::Unspecified) {
        v1::MemberState::TimedOut => "timed_out",
        _ => state_word(state),
    }
}

/// A server-streaming gRPC response.
pub type ResponseStream<T> =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, tonic::Status>> + Send>>;

/// The deadline a gRPC caller set, if any (`grpc-timeout` header).
pub fn grpc_timeout<T>(req: &tonic::Request<T>) -> Option<std::time::Duration> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => std::time::Duration::from_secs(n * 3600),
        "M" => std::time::Duration::from_secs(n * 60),
        "S" => std::time::Duration::from_secs(n),
        "m" => std::time::Duration::from_millis(n),
        "u" => std::time::Duration::from_micros(n),
        "n" => std::time::Duration::from_nanos(n),
        _ => return None,
    })
}
