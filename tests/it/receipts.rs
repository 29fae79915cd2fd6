//! Signed receipts over real mutual TLS: each member's statement of what it answered
//! and the coordinator's over the answer, checked offline against the region CA, and
//! every kind of tampering found.

use fedgate::proto::v1::{AnswerStatement, QueryRequest, Receipt, SignedStatement};
use fedgate::trust::receipt::{self, Check};
use fedgate::trust::tls::TlsMaterial;
use prost::Message;

use crate::support::{OFFICE, Region};

const SQL: &str = "SELECT member, county_code, pop_total FROM census \
                   WHERE member IN ('hangzhou', 'suzhou', 'anji') ORDER BY county_code";

fn material(region: &Region, who: &str) -> TlsMaterial {
    region.material(who)
}

fn failures(checks: &[Check]) -> Vec<String> {
    checks
        .iter()
        .filter_map(|c| c.failure.as_ref().map(|f| format!("{}: {f}", c.what)))
        .collect()
}

fn statement(encoded: &[u8]) -> (SignedStatement, AnswerStatement) {
    let s = SignedStatement::decode(encoded).unwrap();
    let b = AnswerStatement::decode(s.body.as_slice()).unwrap();
    (s, b)
}

#[tokio::test]
async fn a_receipt_verifies_offline_and_every_kind_of_tampering_is_found() {
    let region = Region::start_only(Some(&["hangzhou", "suzhou", "anji"])).await;
    let ca = material(&region, "anji");
    let a = region
        .client(OFFICE)
        .query_with(QueryRequest {
            sql: SQL.into(),
            receipt: true,
            purpose: "planning: R-1".into(),
            ..QueryRequest::default()
        })
        .await
        .unwrap();
    let encoded = a.summary.receipt.clone();
    assert!(!encoded.is_empty(), "a receipt was asked for");
    let checks = receipt::verify(&ca, &encoded, Some((&a.schema, &a.batches)));
    assert_eq!(failures(&checks), Vec::<String>::new(), "{checks:#?}");

    // What it says: three members' statements, each of its own rows, and the
    // coordinator's over the whole answer.
    let r = Receipt::decode(encoded.as_slice()).unwrap();
    let (_, c) = statement(&r.coordinator);
    assert_eq!(c.signer, "fedgate://yrd/office/coordination");
    assert_eq!(c.query_id, a.summary.query_id);
    assert_eq!(c.rows, a.summary.rows);
    assert_eq!(c.purpose, "planning: R-1");
    let mut signers: Vec<(String, u64)> = r
        .members
        .iter()
        .map(|m| {
            let (_, s) = statement(m);
            assert_eq!(s.via, c.signer);
            assert_eq!(s.query_id, c.query_id);
            (s.member, s.rows)
        })
        .collect();
    signers.sort();
    let rows_of = |m: &str| {
        a.summary
            .members
            .iter()
            .find(|s| s.member == m)
            .unwrap()
            .rows
    };
    assert_eq!(
        signers,
        vec![
            ("anji".to_string(), rows_of("anji")),
            ("hangzhou".to_string(), rows_of("hangzhou")),
            ("suzhou".to_string(), rows_of("suzhou")),
        ]
    );
    // The coordinator names its own audit record, and each member its own.
    let hashes: Vec<String> = crate::support::audit_records(&region.audit_log(OFFICE))
        .iter()
        .map(|r| r["hash"].as_str().unwrap().to_string())
        .collect();
    assert!(hashes.contains(&c.audit_hash));

    let tampered = |f: &dyn Fn(&mut Receipt)| {
        let mut r = Receipt::decode(encoded.as_slice()).unwrap();
        f(&mut r);
        r.encode_to_vec()
    };
    let first_member = r.members[0].clone();
    let anji = material(&region, "anji");
    let cases: Vec<(&str, Vec<u8>, Option<Vec<_>>, &str)> = vec![
        (
            "coordinator's statement altered",
            tampered(&|r| {
                let (mut s, mut b) = statement(&r.coordinator);
                b.rows += 1;
                s.body = b.encode_to_vec();
                r.coordinator = s.encode_to_vec();
            }),
            None,
            "signature does not verify",
        ),
        (
            "a member's statement altered",
            tampered(&|r| {
                let (mut s, mut b) = statement(&r.members[0]);
                b.rows_sha256 = "0".repeat(64);
                s.body = b.encode_to_vec();
                r.members[0] = s.encode_to_vec();
            }),
            None,
            "signature does not verify",
        ),
        (
            "a member's statement forged with another member's key",
            tampered(&|r| {
                let (_, mut b) = statement(&r.members[0]);
                b.rows = 0;
                b.signer = "fedgate://yrd/county/anji".into();
                r.members[0] = receipt::sign(&anji, &b).unwrap();
            }),
            None,
            "does not list it",
        ),
        (
            "a member's statement passed off under another identity",
            tampered(&|r| {
                let (_, mut b) = statement(&r.members[0]);
                b.signer = "fedgate://yrd/city/hangzhou".into();
                let signed = receipt::sign(&anji, &b).unwrap();
                r.members[0] = signed;
            }),
            None,
            "not by fedgate://yrd/city/hangzhou",
        ),
        (
            "a member's statement removed",
            tampered(&|r| {
                r.members.remove(0);
            }),
            None,
            "missing",
        ),
        (
            "a member's statement used twice",
            tampered(&|r| {
                r.members[1] = first_member.clone();
            }),
            None,
            "missing",
        ),
        (
            "a member's statement appended again",
            tampered(&|r| {
                r.members.push(first_member.clone());
            }),
            None,
            "appears twice",
        ),
        (
            "the answer with a row dropped",
            encoded.clone(),
            Some({
                let mut b = a.batches.clone();
                let last = b.len() - 1;
                let n = b[last].num_rows();
                b[last] = b[last].slice(0, n - 1);
                b
            }),
            "rows, the receipt says",
        ),
        (
            "the answer with a value changed",
            encoded.clone(),
            Some({
                use datafusion::arrow::array::{ArrayRef, Int64Array};
                let mut b = a.batches.clone();
                let i = b[0].schema().index_of("pop_total").unwrap();
                let col = b[0]
                    .column(i)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .unwrap()
                    .iter()
                    .enumerate()
                    .map(|(k, v)| if k == 0 { v.map(|x| x + 1) } else { v })
                    .collect::<Int64Array>();
                let mut cols = b[0].columns().to_vec();
                cols[i] = std::sync::Arc::new(col) as ArrayRef;
                b[0] = datafusion::arrow::record_batch::RecordBatch::try_new(b[0].schema(), cols)
                    .unwrap();
                b
            }),
            "differ from those the receipt was signed for",
        ),
        (
            "not a receipt",
            b"not a receipt".to_vec(),
            None,
            "not a receipt",
        ),
    ];
    for (name, bytes, answer, want) in cases {
        let checks = receipt::verify(
            &ca,
            &bytes,
            answer.as_deref().map(|b| (a.schema.as_ref(), b)),
        );
        let f = failures(&checks);
        assert!(
            f.iter().any(|x| x.contains(want)),
            "{name}: {f:#?} should say {want}"
        );
    }

    // A member statement from another query's receipt does not pass for this one.
    let other = region
        .client(OFFICE)
        .query_with(QueryRequest {
            sql: SQL.into(),
            receipt: true,
            purpose: "planning: R-1".into(),
            ..QueryRequest::default()
        })
        .await
        .unwrap();
    let foreign = Receipt::decode(other.summary.receipt.as_slice())
        .unwrap()
        .members[0]
        .clone();
    let swapped = tampered(&|r| r.members[0] = foreign.clone());
    let f = failures(&receipt::verify(&ca, &swapped, None));
    assert!(f.iter().any(|x| x.contains("query id")), "{f:#?}");

    // Without asking, there is none.
    let plain = region.client(OFFICE).query(SQL, false, None).await.unwrap();
    assert!(plain.summary.receipt.is_empty());

    // A member whose answer a LIMIT cut before its end signed nothing: no receipt
    // claims its rows.
    let cut = region
        .client(OFFICE)
        .query_with(QueryRequest {
            sql: "SELECT county_code FROM census WHERE member IN ('hangzhou', 'suzhou', 'anji') \
                  LIMIT 1"
                .into(),
            receipt: true,
            ..QueryRequest::default()
        })
        .await;
    match cut {
        Err(f) => assert!(
            f.status.message().contains("no receipt"),
            "{}",
            f.status.message()
        ),
        // Every member may have finished before the limit was met; then each stated
        // its answer and the receipt holds.
        Ok(a) => {
            let checks = receipt::verify(&ca, &a.summary.receipt, Some((&a.schema, &a.batches)));
            assert_eq!(failures(&checks), Vec::<String>::new());
        }
    }
}

/// At a gateway that is itself a member, its own answer is stated and signed like any
/// other member's.
#[tokio::test]
async fn the_coordinators_own_data_is_stated_like_a_members() {
    let region = Region::start_only(Some(&["hangzhou", "anji"])).await;
    let ca = material(&region, "anji");
    let a = region
        .client_as("hangzhou", "hangzhou")
        .query_with(QueryRequest {
            sql: "SELECT member, count(*) AS n FROM census \
                  WHERE member IN ('hangzhou', 'anji') GROUP BY member ORDER BY member"
                .into(),
            receipt: true,
            ..QueryRequest::default()
        })
        .await
        .unwrap();
    let checks = receipt::verify(&ca, &a.summary.receipt, Some((&a.schema, &a.batches)));
    assert_eq!(failures(&checks), Vec::<String>::new(), "{checks:#?}");
    let r = Receipt::decode(a.summary.receipt.as_slice()).unwrap();
    let mut members: Vec<String> = r.members.iter().map(|m| statement(m).1.signer).collect();
    members.sort();
    assert_eq!(
        members,
        vec!["fedgate://yrd/city/hangzhou", "fedgate://yrd/county/anji"]
    );
}

/// The JSON API returns the receipt in its summary when the body asks for one.
#[tokio::test]
async fn the_json_api_returns_a_receipt_when_asked() {
    use base64::Engine as _;
    let region = Region::start_only(Some(&["hangzhou"])).await;
    let body = serde_json::json!({
        "sql": "SELECT count(*) AS n FROM census WHERE member = 'hangzhou'",
        "receipt": true,
    })
    .to_string();
    let (status, text) =
        crate::frontends::http_request(&region, OFFICE, OFFICE, "POST", "/v1/query", &body).await;
    assert_eq!(status, 200, "{text}");
    let json: serde_json::Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap())
        .unwrap_or_else(|e| panic!("{e}: {text}"));
    let encoded = base64::engine::general_purpose::STANDARD
        .decode(json["summary"]["receipt"].as_str().expect("a receipt"))
        .unwrap();
    let checks = receipt::verify(&material(&region, "hangzhou"), &encoded, None);
    assert_eq!(failures(&checks), Vec::<String>::new(), "{checks:#?}");
    assert_eq!(
        checks
            .iter()
            .filter(|c| c.what.contains("statement"))
            .count(),
        3,
        "the coordinator's, Hangzhou's, and the list: {checks:#?}"
    );
}
