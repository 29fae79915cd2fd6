//! Incident declarations over real mutual TLS: the sample region's scenario (a road
//! collapse in Hangzhou's Yuhang district, near Anji county), and what a caller with a
//! county's grant, a compromised gateway, or a forged declaration can make of it.
//!
//! Hangzhou's rules give a county only aggregates of its pipelines in peacetime, and
//! the pipe sections within the scope of an incident the regional office declared,
//! while it is in force. The rows expected are read from the departments' own CSV
//! files (loaded into PostgreSQL and MariaDB), never from fedgate.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use fedgate::proto::v1::{DeclareRequest, ExecuteRequest, IncidentDeclaration, QueryRequest};
use fedgate::tools::incident::{self as tool, Draft};
use fedgate::trust::tls::TlsMaterial;
use prost::Message;

use crate::support::{Region, audit_records, column_strings, read_csv};

const NUMBER: &str = "HZ-2026-0107";
const ROAD: &str = "解放路";
const DISTRICT: &str = "330110";
const PURPOSE: &str = "emergency-response: HZ-2026-0107";
const ROWS: &str = "SELECT pipe_id, department, county_code, road FROM underground_pipelines \
                    WHERE member = 'hangzhou' ORDER BY pipe_id";

fn material(region: &Region, who: &str) -> TlsMaterial {
    region.material(who)
}

fn draft() -> Draft {
    Draft {
        number: NUMBER.into(),
        summary: "Road collapse on 解放路, Yuhang district; pipes under it".into(),
        datasets: vec!["underground_pipelines".into()],
        scope: vec![
            ("county_code".into(), vec![DISTRICT.into()]),
            ("road".into(), vec![ROAD.into()]),
        ],
        purposes: vec!["emergency-response".into()],
        starts: None,
        lasts: Some(Duration::from_secs(3600)),
    }
}

/// The ids of Hangzhou's pipe sections under the road in the district, from the three
/// departments' files (the power company's district names through its code table).
fn expected_sections(region: &Region) -> BTreeSet<String> {
    let data = region.data().join("hangzhou");
    let (_, codes) = read_csv(&data.join("district_codes.csv"));
    let code_of = |name: &str| {
        codes
            .iter()
            .find(|r| r[0] == name)
            .map(|r| r[1].clone())
            .unwrap_or_default()
    };
    let mut out = BTreeSet::new();
    let mut take =
        |file: &str, id: &str, district: &str, road: &str, f: &dyn Fn(&str) -> String| {
            let (h, rows) = read_csv(&data.join("pipelines").join(file));
            let col = |n: &str| h.iter().position(|c| c == n).unwrap();
            let (i, d, r) = (col(id), col(district), col(road));
            for row in rows {
                if f(&row[d]) == DISTRICT && row[r] == ROAD {
                    out.insert(f_id(file, &row[i]));
                }
            }
        };
    take(
        "water_mains.csv",
        "pipe_no",
        "district_code",
        "road",
        &|s| s.to_string(),
    );
    take("gas_lines.csv", "id", "qx_dm", "street", &|s| s.to_string());
    take("cable_ducts.csv", "duct_id", "area", "road_name", &|s| {
        code_of(s)
    });
    out
}

/// The canonical id of a section: the gas company's numbers get a `G` (its mapping).
fn f_id(file: &str, id: &str) -> String {
    if file == "gas_lines.csv" {
        format!("G{id}")
    } else {
        id.to_string()
    }
}

fn under(sql: &str, incident: &[u8], purpose: &str) -> QueryRequest {
    QueryRequest {
        sql: sql.into(),
        purpose: purpose.into(),
        incident: incident.to_vec(),
        ..QueryRequest::default()
    }
}

/// Anji (a county) asks at its own gateway; Hangzhou answers for its three departments'
/// databases; the regional office declares.
#[tokio::test]
async fn a_declared_incident_opens_its_scope_only_while_in_force_and_the_review_lists_every_access()
{
    let region = Region::start_with_database(Some(&["hangzhou", "anji", "suzhou"]), &|_| {}).await;
    let anji = region.client_as("anji", "anji");
    let office = material(&region, "coordination");
    let expected = expected_sections(&region);
    assert!(
        expected.len() >= 10,
        "the scenario's road has sections: {expected:?}"
    );
    let mut made = Vec::new();

    // Peacetime: a county sees aggregates of Hangzhou's pipelines, not sections.
    let refused = anji
        .query_with(under(ROWS, &[], PURPOSE))
        .await
        .unwrap_err();
    assert!(
        refused.status.message().contains("aggregate"),
        "{}",
        refused.status.message()
    );
    let counts = anji
        .query_with(under(
            "SELECT department, count(*) AS n FROM underground_pipelines \
             WHERE member = 'hangzhou' GROUP BY department",
            &[],
            "",
        ))
        .await
        .unwrap();
    assert_eq!(
        counts.batches.iter().map(|b| b.num_rows()).sum::<usize>(),
        3
    );

    // The office declares; the query states the incident and gets exactly the
    // sections under the road in the district, from all three departments.
    let declared = tool::declare(&office, &draft(), SystemTime::now()).unwrap();
    let a = anji
        .query_with(under(ROWS, &declared, PURPOSE))
        .await
        .unwrap();
    made.push(a.summary.query_id.clone());
    let got: BTreeSet<String> = column_strings(&a.batches, "pipe_id").into_iter().collect();
    assert_eq!(got, expected);
    let departments: BTreeSet<String> = column_strings(&a.batches, "department")
        .into_iter()
        .collect();
    assert_eq!(
        departments.len(),
        3,
        "water, gas and power: {departments:?}"
    );
    assert!(
        column_strings(&a.batches, "road").iter().all(|r| r == ROAD)
            && column_strings(&a.batches, "county_code")
                .iter()
                .all(|c| c == DISTRICT)
    );
    let hz = a
        .summary
        .members
        .iter()
        .find(|m| m.member == "hangzhou")
        .unwrap();
    assert!(
        hz.access.contains("under incident HZ-2026-0107"),
        "{}",
        hz.access
    );

    // Nothing outside the scope is reachable: not by a filter, not by an expression
    // that would fail on any row outside it (the scope's rows are computed first, so
    // the caller's expressions never see another row), not without the purpose.
    for (sql, want) in [
        (
            "SELECT count(*) AS n FROM underground_pipelines \
             WHERE member = 'hangzhou' AND road <> '解放路'",
            0,
        ),
        (
            "SELECT count(*) AS n FROM underground_pipelines WHERE member = 'hangzhou' \
             AND CASE WHEN road = '解放路' AND county_code = '330110' THEN 0 ELSE 1 / 0 END = 0",
            expected.len(),
        ),
    ] {
        let a = anji
            .query_with(under(sql, &declared, PURPOSE))
            .await
            .unwrap();
        made.push(a.summary.query_id.clone());
        assert_eq!(
            column_strings(&a.batches, "n"),
            vec![want.to_string()],
            "{sql}"
        );
    }
    let refused = anji
        .query_with(under(ROWS, &declared, "curiosity: 1"))
        .await
        .unwrap_err();
    assert!(
        refused
            .status
            .message()
            .contains("covers the purposes emergency-response"),
        "{}",
        refused.status.message()
    );
    made.push(refused.summary.map(|s| s.query_id).unwrap_or_default());

    // Suzhou has no emergency rule: it answers under its peacetime rules, and the
    // declaration opens nothing there.
    let a = anji
        .query_with(under(
            "SELECT count(*) AS n FROM underground_pipelines WHERE member = 'suzhou'",
            &declared,
            PURPOSE,
        ))
        .await
        .unwrap();
    made.push(a.summary.query_id.clone());
    let sz = a
        .summary
        .members
        .iter()
        .find(|m| m.member == "suzhou")
        .unwrap();
    assert!(!sz.access.contains("under incident"), "{}", sz.access);

    // Every record at Hangzhou under the incident carries its number.
    let records: Vec<serde_json::Value> = audit_records(&region.audit_log("hangzhou"))
        .into_iter()
        .filter(|r| r["entry"]["kind"] == "sub_query")
        .filter(|r| made.contains(&r["entry"]["query_id"].as_str().unwrap().to_string()))
        .collect();
    assert!(!records.is_empty());
    assert!(
        records.iter().all(|r| r["entry"]["incident"] == NUMBER),
        "{records:#?}"
    );

    // The end, delivered through a gateway: Hangzhou keeps it, Suzhou honours no
    // declaration of the office. The first declaration then opens nothing.
    let end = {
        let d = fedgate::trust::incident::verify(&office, &declared, SystemTime::now()).unwrap();
        tool::follow_up(&office, &d, None, SystemTime::now()).unwrap()
    };
    let outcomes = anji
        .raw()
        .declare(DeclareRequest {
            declaration: end.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .members;
    let state = |m: &str| {
        outcomes
            .iter()
            .find(|o| o.member == m)
            .map(|o| (o.state.clone(), o.reason.clone()))
            .unwrap()
    };
    assert_eq!(state("hangzhou").0, "kept", "{outcomes:?}");
    assert_eq!(state("suzhou").0, "not_accepted", "{outcomes:?}");
    assert!(
        state("suzhou").1.contains("honours declarations of"),
        "{outcomes:?}"
    );
    let refused = anji
        .query_with(under(ROWS, &declared, PURPOSE))
        .await
        .unwrap_err();
    assert!(
        refused.status.message().contains("is not in force"),
        "{}",
        refused.status.message()
    );
    made.push(refused.summary.map(|s| s.query_id).unwrap_or_default());

    // The end outlives a restart of Hangzhou's gateway (it is in its register).
    let mut region = region;
    region.stop("hangzhou").await;
    region.restart("hangzhou").await;
    let anji = region.client_as("anji", "anji");
    let refused = anji
        .query_with(under(ROWS, &declared, PURPOSE))
        .await
        .unwrap_err();
    assert!(refused.status.message().contains("is not in force"));
    made.push(refused.summary.map(|s| s.query_id).unwrap_or_default());

    // The after-action review over Hangzhou's and Anji's logs lists exactly the
    // queries made under the incident (answered and refused), the declaration and
    // the end as Hangzhou took them, and flags nothing.
    let logs = vec![
        ("hangzhou".to_string(), region.audit_log("hangzhou")),
        ("anji".to_string(), region.audit_log("anji")),
    ];
    let review = tool::review(NUMBER, &logs).unwrap();
    assert!(!review.flagged(), "{}", tool::review_text(&review));
    let kinds: Vec<String> = review
        .declarations
        .iter()
        .filter(|d| d.log == "hangzhou")
        .map(|d| d.entry.declaration.as_ref().unwrap().kind.clone())
        .collect();
    assert_eq!(kinds, vec!["declare", "end"]);
    let coordinator: BTreeSet<String> = review
        .accesses
        .iter()
        .filter(|a| a.log == "anji" && a.entry.kind == fedgate::ops::audit::EntryKind::Query)
        .map(|a| a.entry.query_id.clone())
        .collect();
    let asked: BTreeSet<String> = made.iter().cloned().collect();
    assert_eq!(coordinator, asked, "{}", tool::review_text(&review));
    let at_hangzhou: BTreeSet<String> = review
        .accesses
        .iter()
        .filter(|a| a.log == "hangzhou")
        .map(|a| a.entry.query_id.clone())
        .collect();
    let hangzhou_asked: BTreeSet<String> = made
        .iter()
        .filter(|q| !q.is_empty())
        .cloned()
        .collect::<BTreeSet<_>>()
        .intersection(&at_hangzhou)
        .cloned()
        .collect();
    assert_eq!(at_hangzhou, hangzhou_asked);
    let text = tool::review_text(&review);
    assert!(
        text.contains("REFUSED") && text.contains("0 access(es) outside"),
        "{text}"
    );
}

/// Declarations that must open nothing: expired, from a declarer Hangzhou does not
/// honour, altered after signing, or naming a declarer other than its signer; and a
/// compromised gateway calling Hangzhou directly with an altered one.
#[tokio::test]
async fn forged_altered_expired_and_unhonoured_declarations_open_nothing() {
    let region = Region::start_with_database(Some(&["hangzhou", "anji"]), &|_| {}).await;
    let anji = region.client_as("anji", "anji");
    let office = material(&region, "coordination");
    let county = material(&region, "anji");
    let now = SystemTime::now();

    let expired = tool::declare(
        &office,
        &Draft {
            starts: Some(now - Duration::from_secs(3 * 3600)),
            ..draft()
        },
        now,
    )
    .unwrap();
    let unhonoured = tool::declare(&county, &draft(), now).unwrap();
    let genuine = tool::declare(&office, &draft(), now).unwrap();
    // The road changed after signing: the signature no longer verifies.
    let altered = {
        let mut s = fedgate::proto::v1::SignedStatement::decode(genuine.as_slice()).unwrap();
        let mut b = IncidentDeclaration::decode(s.body.as_slice()).unwrap();
        b.scope[1].values = vec!["文一路".into()];
        s.body = b.encode_to_vec();
        s.encode_to_vec()
    };
    // Anji's key, the office named as declarer.
    let impostor = {
        let mut b = IncidentDeclaration::decode(
            fedgate::proto::v1::SignedStatement::decode(genuine.as_slice())
                .unwrap()
                .body
                .as_slice(),
        )
        .unwrap();
        b.declarer = "fedgate://yrd/office/coordination".into();
        fedgate::trust::statement::sign(
            &county,
            fedgate::trust::incident::CONTEXT,
            b.encode_to_vec(),
        )
        .unwrap()
        .encode_to_vec()
    };
    for (name, d, want) in [
        ("expired", &expired, "is not in force"),
        (
            "unhonoured",
            &unhonoured,
            "honours declarations of fedgate://yrd/office/coordination",
        ),
        ("altered", &altered, "signature does not verify"),
        ("impostor", &impostor, "not by the declarer it names"),
    ] {
        let e = anji.query_with(under(ROWS, d, PURPOSE)).await.unwrap_err();
        assert!(
            e.status.message().contains(want),
            "{name}: {}",
            e.status.message()
        );
    }

    // A compromised gateway (Anji's certificate) skips its own checks and sends the
    // altered declaration straight to Hangzhou: Hangzhou checks it itself.
    let ch = fedgate::trust::tls::Connector::new(
        county.client_config().unwrap(),
        "127.0.0.1",
        region.port("hangzhou"),
        None,
    )
    .channel(Duration::from_secs(5))
    .unwrap();
    let mut peer = fedgate::proto::v1::peer_client::PeerClient::new(ch);
    for (d, want) in [
        (&altered, "signature does not verify"),
        (&expired, "is not in force"),
    ] {
        let e = peer
            .execute(ExecuteRequest {
                sql: "SELECT pipe_id FROM underground_pipelines".into(),
                origin: "fedgate://yrd/county/anji".into(),
                hops: 1,
                path: vec!["fedgate://yrd/county/anji".into()],
                budget_ms: 10_000,
                query_id: format!("direct-{want}"),
                purpose: PURPOSE.into(),
                origin_assertion: Vec::new(),
                incident: d.clone(),
                receipt: false,
            })
            .await
            .unwrap_err();
        assert!(e.message().contains(want), "{}", e.message());
    }
    // The compromised gateway holds the office's assertion for a query through it
    // (made for no incident) and adds a genuine declaration: Hangzhou refuses, since
    // the assertion binds the declaration the origin stated (here none).
    let sql = "SELECT pipe_id FROM underground_pipelines";
    let vouched = region
        .client_as("coordination", "coordination")
        .vouch("anji", Some(sql), None, PURPOSE)
        .await
        .unwrap();
    let e = peer
        .execute(ExecuteRequest {
            sql: sql.into(),
            origin: "fedgate://yrd/office/coordination".into(),
            hops: 1,
            path: vec!["fedgate://yrd/county/anji".into()],
            budget_ms: 10_000,
            query_id: "added-incident".into(),
            purpose: PURPOSE.into(),
            origin_assertion: vouched,
            incident: genuine.clone(),
            receipt: false,
        })
        .await
        .unwrap_err();
    assert!(
        e.message().contains("another incident declaration"),
        "{}",
        e.message()
    );

    // Delivered directly too: refused, and nothing is kept.
    let e = peer
        .declare(DeclareRequest {
            declaration: altered.clone(),
        })
        .await
        .unwrap_err();
    assert!(
        e.message().contains("signature does not verify"),
        "{}",
        e.message()
    );
    // Only the expired one is kept (genuine, from the honoured declarer, though no
    // longer in force): the altered, impostor and unhonoured ones are not.
    let kept: Vec<serde_json::Value> = audit_records(&region.audit_log("hangzhou"))
        .into_iter()
        .filter(|r| r["entry"]["kind"] == "declaration")
        .collect();
    assert_eq!(kept.len(), 1, "{kept:#?}");
    let ends = kept[0]["entry"]["declaration"]["ends"].as_str().unwrap();
    let ends = chrono::DateTime::parse_from_rfc3339(ends).unwrap();
    assert!(
        SystemTime::from(ends) < now,
        "the kept one is the expired one"
    );

    // Each refusal is on Hangzhou's record with the incident number.
    let refused: Vec<serde_json::Value> = audit_records(&region.audit_log("hangzhou"))
        .into_iter()
        .filter(|r| r["entry"]["incident"] == NUMBER && r["entry"]["decision"] == "refused")
        .collect();
    assert!(refused.len() >= 3, "{refused:#?}");
}
