//! Tests of the audit log and its verifier: the documented format, every kind of tampering
//! detected at its record, torn records recovered, concurrent appends kept linear, and a
//! property test over single-byte edits.

use super::verify::find_last;
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
        incident: None,
        declaration: None,
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
    assert_eq!(log.written(), 400);
    // Group commit: appends that arrive while a sync runs share the next one. Eight
    // threads appending at once on a real disk always overlap some syncs.
    assert!(
        log.syncs() < 400,
        "{} syncs for 400 concurrent appends",
        log.syncs()
    );
    // Every receipt handed out was on disk: reopening finds all 400 records.
    drop(log);
    let reopened = AuditLog::open(&path).unwrap();
    assert_eq!(reopened.head().seq, 400);
}

#[test]
fn a_record_appended_unawaited_is_in_the_chain_and_synced_by_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = AuditLog::open(&path).unwrap();
    let first = log.append_unawaited(&entry(1)).unwrap();
    assert_eq!(log.syncs(), 0);
    // In the file, in chain order, at once.
    assert_eq!(verify(&path).unwrap().records, 1);
    let second = log.append(&entry(2)).unwrap();
    assert_eq!((first.seq, second.seq), (1, 2));
    assert_eq!(log.syncs(), 1, "one sync covers both");
    let third = log.append_unawaited(&entry(3)).unwrap();
    drop(log);
    let report = verify(&path).unwrap();
    assert_eq!((report.records, report.head), (3, third));
}

#[test]
fn appends_one_at_a_time_sync_each_record() {
    let dir = tempfile::tempdir().unwrap();
    let (path, receipts) = file_log(dir.path(), 5);
    let log = AuditLog::open(&path).unwrap();
    assert_eq!(log.syncs(), 0, "opening a sound log syncs nothing");
    let r = log.append(&entry(6)).unwrap();
    assert_eq!(r.seq, receipts.len() as u64 + 1);
    assert_eq!(log.syncs(), 1);
}

fn text() -> impl Strategy<Value = String> {
    "[ -~\u{e9}\u{4e2d}\u{1f600}\"\\\\\n\t\u{0}]{0,16}"
}

prop_compose! {
    fn any_entry()(
        (kind, decision) in (
            prop_oneof![Just(EntryKind::SubQuery), Just(EntryKind::Query), Just(EntryKind::Recovered), Just(EntryKind::Explain), Just(EntryKind::Declaration)],
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
        (incident, declared) in (proptest::option::of(text()), proptest::option::of((text(), text(), text()))),
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
            incident,
            declaration: declared.map(|(number, scope, ends)| DeclarationRecord {
                number,
                scope,
                ends,
                ..DeclarationRecord::default()
            }),
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

fn sink_lines(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn the_export_ships_each_durable_record_once_and_resumes_from_its_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("audit.log");
    let sink = dir.path().join("siem/audit.jsonl");
    let log = Arc::new(AuditLog::open(&log_path).unwrap());
    let mut receipts = Vec::new();
    for i in 1..=3 {
        receipts.push(log.append(&entry(i)).unwrap());
    }
    let mut ex = export::Exporter::new(
        log.clone(),
        &sink,
        "hangzhou",
        "fedgate://yrd/city/hangzhou",
    )
    .unwrap();
    assert_eq!(ex.run_once().unwrap(), 3);
    assert_eq!(ex.run_once().unwrap(), 0, "nothing new, nothing shipped");
    let lines = sink_lines(&sink);
    assert_eq!(lines.len(), 3);
    for (l, r) in lines.iter().zip(&receipts) {
        assert_eq!(l["schema"], export::SCHEMA);
        assert_eq!(l["member"], "hangzhou");
        assert_eq!(l["seq"], r.seq);
        assert_eq!(l["hash"], r.hash.as_str());
        assert_eq!(l["@timestamp"], l["entry"]["time"]);
    }
    assert_eq!(lines[1]["prev"], receipts[0].hash.as_str());
    assert_eq!(lines[2]["entry"]["rows"], 3);

    // A restarted gateway resumes after the last record shipped.
    drop(ex);
    receipts.push(log.append(&entry(4)).unwrap());
    let mut again = export::Exporter::new(
        log.clone(),
        &sink,
        "hangzhou",
        "fedgate://yrd/city/hangzhou",
    )
    .unwrap();
    assert_eq!(again.run_once().unwrap(), 1);
    let lines = sink_lines(&sink);
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[3]["seq"], 4);
    assert_eq!(
        again
            .progress
            .seq
            .load(std::sync::atomic::Ordering::Relaxed),
        4
    );

    // A cursor that names another log's record (a new log at the same path) starts
    // over rather than skipping the new log's first records.
    drop(again);
    drop(log);
    std::fs::remove_file(&log_path).unwrap();
    let fresh = Arc::new(AuditLog::open(&log_path).unwrap());
    fresh.append(&entry(9)).unwrap();
    let mut third = export::Exporter::new(
        fresh.clone(),
        &sink,
        "hangzhou",
        "fedgate://yrd/city/hangzhou",
    )
    .unwrap();
    assert_eq!(third.run_once().unwrap(), 1);
    assert_eq!(sink_lines(&sink)[4]["seq"], 1);
}

/// A process stopped in the middle of writing the sink leaves half a line: the next
/// exporter cuts it and writes its record again, so every line of the sink parses.
#[test]
fn a_torn_line_at_the_end_of_the_sink_is_cut_and_its_record_written_again() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(AuditLog::open(&dir.path().join("audit.log")).unwrap());
    for i in 1..=2 {
        log.append(&entry(i)).unwrap();
    }
    let sink = dir.path().join("audit.jsonl");
    let mut ex = export::Exporter::new(log.clone(), &sink, "m", "fedgate://yrd/city/m").unwrap();
    assert_eq!(ex.run_once().unwrap(), 2);
    drop(ex);
    // Record 3 reached the sink half-written, and the cursor never moved past 2.
    log.append(&entry(3)).unwrap();
    let whole = std::fs::read_to_string(&sink).unwrap();
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&sink)
            .unwrap();
        f.write_all(br#"{"schema":"fedgate.audit.v1","member":"m","se"#)
            .unwrap();
    }
    let mut again = export::Exporter::new(log.clone(), &sink, "m", "fedgate://yrd/city/m").unwrap();
    assert_eq!(
        std::fs::read_to_string(&sink).unwrap(),
        whole,
        "the torn line is cut"
    );
    assert_eq!(again.run_once().unwrap(), 1);
    let lines = sink_lines(&sink);
    assert_eq!(
        lines
            .iter()
            .map(|l| l["seq"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2, 3]
    );

    // A sink that is one torn line and nothing else is emptied.
    let lone = dir.path().join("lone.jsonl");
    std::fs::write(&lone, b"{\"schema\":").unwrap();
    drop(export::Exporter::new(log.clone(), &lone, "m", "fedgate://yrd/city/m").unwrap());
    assert_eq!(std::fs::read(&lone).unwrap(), b"");
}

#[test]
fn the_export_stops_at_a_record_that_does_not_verify() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("audit.log");
    let entries: Vec<AuditEntry> = (1..=4).map(entry).collect();
    let (bytes, _) = memory_log(&entries);
    // Record 3's row count edited without fixing its hash.
    let text = String::from_utf8(bytes).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines[2] = lines[2].replace("\"rows\":3", "\"rows\":30");
    // A log with the edit cannot be opened (its chain is broken), so the gateway's log
    // holds the intact first two records and the edit appears behind its back.
    std::fs::write(&log_path, lines[..2].join("\n") + "\n").unwrap();
    let log = Arc::new(AuditLog::open(&log_path).unwrap());
    let sink = dir.path().join("audit.jsonl");
    let mut ex = export::Exporter::new(log.clone(), &sink, "m", "fedgate://yrd/city/m").unwrap();
    assert_eq!(ex.run_once().unwrap(), 2);
    // Someone appends the edited record 3 and an intact-looking 4 behind the
    // gateway's back; the durable mark is past them once the gateway appends again.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&log_path)
            .unwrap();
        f.write_all((lines[2..].join("\n") + "\n").as_bytes())
            .unwrap();
    }
    let _ = log.append(&entry(5));
    assert_eq!(ex.run_once().unwrap(), 0);
    assert_eq!(
        ex.progress
            .broken_at
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
    assert_eq!(
        sink_lines(&sink).len(),
        2,
        "nothing past the break is shipped"
    );
}

#[test]
fn the_tail_of_a_log_is_its_last_complete_records() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("audit.log");
    let log = AuditLog::open(&p).unwrap();
    // Enough records that the tail is read in more than one chunk.
    for i in 1..=400 {
        log.append(&entry(i)).unwrap();
    }
    drop(log);
    let seqs = |n| -> Vec<u64> {
        tail(&p, n)
            .unwrap()
            .iter()
            .map(|l| {
                serde_json::from_slice::<serde_json::Value>(l).unwrap()["seq"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    };
    assert_eq!(seqs(3), vec![398, 399, 400]);
    assert_eq!(seqs(400), (1..=400).collect::<Vec<_>>());
    assert_eq!(seqs(1000).len(), 400);
    // A record being written (no newline yet) is not shown.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"seq\":401,\"prev\":\"").unwrap();
    }
    assert_eq!(seqs(1), vec![400]);
}

#[test]
fn caller_text_is_kept_whole_when_short_and_bounded_with_its_hash_when_long() {
    assert_eq!(caller_text("planning:case-7"), "planning:case-7");
    let long = "规".repeat(1_000_000);
    let kept = caller_text(&long);
    assert!(kept.len() < 200, "{}", kept.len());
    assert!(kept.contains("3000000 bytes, sha256 "), "{kept}");
    assert!(kept.contains(&hex::encode(Sha256::digest(long.as_bytes()))));
}
