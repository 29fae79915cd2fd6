//! Federated answers over a real region, checked against values computed here from
//! the members' own files (never from fedgate's output).

use std::collections::BTreeMap;
use std::time::Duration;

use fedgate::proto::v1::MemberState;

use crate::support::{Region, column_strings, read_csv, states};

fn count_rows(region: &Region, member: &str, file: &str) -> usize {
    read_csv(&region.data().join(member).join(file)).1.len()
}

fn column(region: &Region, member: &str, file: &str, col: &str) -> Vec<String> {
    let (h, rows) = read_csv(&region.data().join(member).join(file));
    let i = h.iter().position(|c| c == col).unwrap();
    rows.into_iter().map(|r| r[i].clone()).collect()
}

/// Parses a population written in 万人 with exactly four decimals, by moving the
/// decimal point in the text (no floating point).
fn wan_to_persons(s: &str) -> i64 {
    let (int, frac) = s.split_once('.').unwrap();
    assert_eq!(frac.len(), 4, "{s}");
    format!("{int}{frac}").parse().unwrap()
}

#[tokio::test]
async fn hospitals_per_member_match_the_source_files_and_hefei_is_not_asked() {
    let region = Region::start().await;
    let answer = region
        .client("shanghai")
        .query(
            "SELECT member, count(*) AS n FROM fever_clinics GROUP BY member ORDER BY member",
            false,
            None,
        )
        .await
        .unwrap();
    let members = column_strings(&answer.batches, "member");
    let counts = column_strings(&answer.batches, "n");
    let got: BTreeMap<_, _> = members.into_iter().zip(counts).collect();
    let mut want = BTreeMap::new();
    for m in ["anji", "hangzhou", "shanghai", "suzhou"] {
        want.insert(
            m.to_string(),
            count_rows(&region, m, "fever_clinics.csv").to_string(),
        );
    }
    assert_eq!(got, want);
    let st = states(&answer.summary);
    assert!(
        !st.contains_key("hefei"),
        "hefei serves no hospital list and must not be asked: {st:?}"
    );
    assert_eq!(st.len(), 4);
    assert!(st.values().all(|s| *s == MemberState::Ok), "{st:?}");
    assert!(!answer.summary.partial);
    // Grouped by member, each member counts its own rows and sends one row.
    assert!(
        answer.summary.members.iter().all(|m| m.rows == 1),
        "{:?}",
        answer.summary.members
    );
    // Each other gateway reports its own time, which the call as the coordinator
    // saw it contains; the coordinator's own data reports none.
    for m in &answer.summary.members {
        if m.member == "shanghai" {
            assert_eq!(m.member_elapsed_us, 0, "{m:?}");
        } else {
            assert!(
                m.member_elapsed_us > 0 && m.member_elapsed_us <= m.elapsed_us,
                "{m:?}"
            );
        }
    }
}

#[tokio::test]
async fn census_totals_match_independent_sums_at_every_gateway() {
    let region = Region::start().await;
    let sum = |m: &str, col: &str| -> i64 {
        column(&region, m, "census_2020.csv", col)
            .iter()
            .map(|v| v.parse::<i64>().unwrap())
            .sum()
    };
    let mut want = BTreeMap::new();
    want.insert("shanghai".to_string(), sum("shanghai", "pop_total"));
    want.insert(
        "hangzhou".to_string(),
        column(&region, "hangzhou", "census_2020.csv", "常住人口_万人")
            .iter()
            .map(|v| wan_to_persons(v))
            .sum(),
    );
    want.insert("suzhou".to_string(), sum("suzhou", "总人口"));
    want.insert("hefei".to_string(), sum("hefei", "population"));
    want.insert("anji".to_string(), sum("anji", "rk"));

    let sql = "SELECT member, sum(pop_total) AS pop FROM census GROUP BY member";
    let mut answers = Vec::new();
    // The same canonical query gives the same answer at any gateway, city or county.
    for gateway in ["hangzhou", "anji"] {
        let a = region
            .client(gateway)
            .query(sql, false, None)
            .await
            .unwrap();
        let got: BTreeMap<String, i64> = column_strings(&a.batches, "member")
            .into_iter()
            .zip(
                column_strings(&a.batches, "pop")
                    .iter()
                    .map(|v| v.parse().unwrap()),
            )
            .collect();
        answers.push(got);
    }
    assert_eq!(answers[0], want);
    assert_eq!(answers[1], want);
}

#[tokio::test]
async fn a_filter_on_member_prunes_the_others_before_any_call() {
    let region = Region::start().await;
    let a = region
        .client("suzhou")
        .query(
            "SELECT member, county_code FROM census WHERE member IN ('hangzhou', 'hefei') AND pop_total > 0",
            false,
            None,
        )
        .await
        .unwrap();
    let members: std::collections::BTreeSet<_> =
        column_strings(&a.batches, "member").into_iter().collect();
    assert_eq!(
        members.into_iter().collect::<Vec<_>>(),
        vec!["hangzhou", "hefei"]
    );
    assert_eq!(
        a.summary.rows as usize,
        count_rows(&region, "hangzhou", "census_2020.csv")
            + count_rows(&region, "hefei", "census_2020.csv")
    );
    let st = states(&a.summary);
    assert_eq!(st["hangzhou"], MemberState::Ok);
    assert_eq!(st["hefei"], MemberState::Ok);
    for m in ["shanghai", "suzhou", "anji"] {
        assert_eq!(st[m], MemberState::Pruned, "{m}");
    }
    let pruned = a
        .summary
        .members
        .iter()
        .find(|m| m.member == "anji")
        .unwrap();
    assert_eq!(pruned.rows, 0);
}

#[tokio::test]
async fn code_tables_translate_abolished_and_informal_names() {
    let region = Region::start().await;
    let a = region
        .client("hefei")
        .query(
            "SELECT county_published, county_code, count(*) AS n FROM fever_clinics \
             WHERE member IN ('hangzhou', 'suzhou') AND county_published IN ('下城区', '江干区', '工业园区', '高新区') \
             GROUP BY county_published, county_code ORDER BY county_published",
            false,
            None,
        )
        .await
        .unwrap();
    let names = column_strings(&a.batches, "county_published");
    let codes = column_strings(&a.batches, "county_code");
    let got: BTreeMap<_, _> = names.into_iter().zip(codes).collect();
    let want: BTreeMap<String, String> = [
        ("下城区", "330105"),
        ("江干区", "330102"),
        ("工业园区", "320576"),
        ("高新区", "320505"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(got, want);

    // Joined with divisions, 拱墅区 counts its own hospitals and those published
    // under the abolished 下城区.
    let a = region
        .client("shanghai")
        .query(
            "SELECT d.name, count(*) AS n FROM fever_clinics f JOIN divisions d ON f.county_code = d.code \
             WHERE d.code = '330105' GROUP BY d.name",
            false,
            None,
        )
        .await
        .unwrap();
    let published = column(&region, "hangzhou", "fever_clinics.csv", "district");
    let expected = published
        .iter()
        .filter(|d| *d == "拱墅区" || *d == "下城区")
        .count();
    assert_eq!(column_strings(&a.batches, "name"), vec!["拱墅区"]);
    assert_eq!(column_strings(&a.batches, "n"), vec![expected.to_string()]);
}

#[tokio::test]
async fn units_dates_and_booleans_are_converted() {
    let region = Region::start().await;
    let a = region
        .client("anji")
        .query(
            "SELECT pop_total FROM census WHERE county_code = '330106'",
            false,
            None,
        )
        .await
        .unwrap();
    let codes = column(&region, "hangzhou", "census_2020.csv", "区划代码");
    let wan = column(&region, "hangzhou", "census_2020.csv", "常住人口_万人");
    let i = codes.iter().position(|c| c == "330106").unwrap();
    assert_eq!(
        column_strings(&a.batches, "pop_total"),
        vec![wan_to_persons(&wan[i]).to_string()]
    );

    let a = region
        .client("anji")
        .query(
            "SELECT member, min(published_on) AS first, max(published_on) AS last, \
             sum(CASE WHEN is_designated THEN 1 ELSE 0 END) AS designated \
             FROM fever_clinics WHERE member IN ('suzhou', 'hangzhou') GROUP BY member ORDER BY member",
            false,
            None,
        )
        .await
        .unwrap();
    let designated_hz = column(&region, "hangzhou", "fever_clinics.csv", "designated")
        .iter()
        .filter(|v| *v == "是")
        .count();
    let designated_sz = column(&region, "suzhou", "fever_clinics.csv", "is_designated")
        .iter()
        .filter(|v| *v == "1")
        .count();
    assert_eq!(
        column_strings(&a.batches, "designated"),
        vec![designated_hz.to_string(), designated_sz.to_string()]
    );
    let to_iso = |s: &str| s.replace('/', "-");
    let hz_dates = column(&region, "hangzhou", "fever_clinics.csv", "notice_date");
    let mut hz: Vec<String> = hz_dates.iter().map(|d| to_iso(d)).collect();
    hz.sort();
    let sz_dates = column(&region, "suzhou", "fever_clinics.csv", "date");
    let mut sz: Vec<String> = sz_dates
        .iter()
        .map(|d| format!("{}-{}-{}", &d[..4], &d[4..6], &d[6..]))
        .collect();
    sz.sort();
    assert_eq!(
        column_strings(&a.batches, "first"),
        vec![hz[0].clone(), sz[0].clone()]
    );
    assert_eq!(
        column_strings(&a.batches, "last"),
        vec![hz.last().unwrap().clone(), sz.last().unwrap().clone()]
    );
}

#[tokio::test]
async fn a_stopped_member_fails_the_query_by_name_unless_partial_is_allowed() {
    let mut region = Region::start().await;
    region.stop("hefei").await;
    let client = region.client("shanghai");
    let sql = "SELECT member, count(*) AS n FROM census GROUP BY member ORDER BY member";

    let f = client.query(sql, false, None).await.unwrap_err();
    assert_eq!(f.status.code(), tonic::Code::Unavailable, "{f}");
    assert!(
        f.status.message().contains("member hefei is unavailable"),
        "{f}"
    );
    let summary = f.summary.expect("a failed query still reports its members");
    let st = states(&summary);
    assert_eq!(st["hefei"], MemberState::Unavailable);
    // Every member asked appears, whether it finished before the failure or not.
    assert_eq!(st.len(), 5, "{st:?}");
    assert!(
        st.values().all(|s| matches!(
            s,
            MemberState::Ok | MemberState::Cancelled | MemberState::Unavailable
        )),
        "{st:?}"
    );

    let a = client.query(sql, true, None).await.unwrap();
    assert!(a.summary.partial);
    let members = column_strings(&a.batches, "member");
    assert_eq!(members, vec!["anji", "hangzhou", "shanghai", "suzhou"]);
    let hefei = a
        .summary
        .members
        .iter()
        .find(|m| m.member == "hefei")
        .unwrap();
    assert_eq!(hefei.state, MemberState::Unavailable as i32);
    assert!(!hefei.reason.is_empty());
    assert_eq!(hefei.rows, 0);
    // A query that does not need Hefei is unaffected.
    let a = client
        .query("SELECT count(*) AS n FROM fever_clinics", false, None)
        .await
        .unwrap();
    assert!(!a.summary.partial);
}

#[tokio::test]
async fn describe_lists_datasets_fields_and_servers() {
    let region = Region::start().await;
    let d = region.client("anji").describe(None).await.unwrap();
    assert_eq!(d.region, "yrd");
    assert_eq!(d.caller, "fedgate://yrd/office/coordination");
    let fc = d
        .datasets
        .iter()
        .find(|x| x.name == "fever_clinics")
        .unwrap();
    assert_eq!(fc.members, vec!["shanghai", "hangzhou", "suzhou", "anji"]);
    assert!(
        fc.fields
            .iter()
            .any(|f| f.name == "published_on" && f.data_type == "Date32")
    );
    assert_eq!(fc.fields.last().unwrap().name, "member");
    let census = d.datasets.iter().find(|x| x.name == "census").unwrap();
    assert!(census.members.contains(&"hefei".to_string()));
}

/// A gateway that asks a data owner for a sub-query and then stops reading its answer
/// (keeping the stream open) cannot hold the sub-query past its budget: the owner
/// drops it at the deadline, even while it waits to hand over more rows, and records
/// it as cancelled. The attacker here holds Hangzhou's certificate and asks Shanghai.
#[tokio::test]
async fn an_owner_drops_a_sub_query_whose_caller_stops_reading_at_its_deadline() {
    use fedgate::proto::v1::ExecuteRequest;
    use fedgate::proto::v1::peer_client::PeerClient;
    use fedgate::trust::tls::Connector;
    let region = Region::start().await;
    let port = region
        .endpoint("shanghai")
        .rsplit(':')
        .next()
        .unwrap()
        .parse::<u16>()
        .unwrap();
    let ch = Connector::new(
        region.material("hangzhou").client_config().unwrap(),
        "127.0.0.1",
        port,
        None,
    )
    .channel(Duration::from_secs(5))
    .unwrap();
    // Far more than the buffers between the owner and its caller hold (the answer's
    // channel, HTTP/2's window, the sockets): about 80 MB.
    let part = "SELECT repeat(hospital_name, 3000) AS r FROM fever_clinics";
    let sql = [part; 8].join(" UNION ALL ");
    let mut stream = PeerClient::new(ch)
        .execute(ExecuteRequest {
            incident: Vec::new(),
            receipt: false,
            sql: sql.clone(),
            origin: "fedgate://yrd/city/hangzhou".into(),
            hops: 1,
            path: vec!["fedgate://yrd/city/hangzhou".into()],
            budget_ms: 1_500,
            query_id: "stalled-reader".into(),
            purpose: String::new(),
            origin_assertion: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    // The first message arrives; then the caller reads nothing more, and keeps the
    // stream.
    stream.message().await.unwrap().unwrap();
    let record = crate::support::awaited_record(
        &region.audit_log("shanghai"),
        0,
        |r| r["entry"]["kind"] == "sub_query" && r["entry"]["query_id"] == "stalled-reader",
        Duration::from_secs(15),
        "a caller that stopped reading held the sub-query 15 s past its 1.5 s budget",
    )
    .await;
    assert_eq!(record["entry"]["decision"], "cancelled", "{record}");
    // Reading on, the caller gets the chunks that were already on their way, then why
    // the answer ends, never a summary.
    let end = loop {
        match stream.message().await {
            Ok(Some(m)) => assert!(
                !matches!(
                    m.payload,
                    Some(fedgate::proto::v1::execute_response::Payload::Summary(_))
                ),
                "a sub-query cut at its deadline has no summary"
            ),
            Ok(None) => panic!("the answer ended without saying why"),
            Err(e) => break e,
        }
    };
    assert!(end.message().contains("deadline"), "{end:?}");
}

#[tokio::test]
async fn peers_only_answer_member_gateways_and_only_over_canonical_datasets() {
    use fedgate::proto::v1::ExecuteRequest;
    use fedgate::proto::v1::peer_client::PeerClient;
    use fedgate::trust::tls::{Connector, TlsMaterial};
    // A client-only identity of the region (the press office), with a certificate.
    let region = Region::start_patched(None, &|l| {
        crate::support::patch_region(l, |r| {
            let mut press = r
                .members
                .iter()
                .find(|m| m.name == "coordination")
                .unwrap()
                .clone();
            press.name = "press".into();
            press.endpoint = None;
            press.serves = Vec::new();
            r.members.push(press);
        });
        let certs = l.dir.join("certs");
        let ca =
            fedgate::trust::pki::Ca::load(&certs.join("ca.crt"), &certs.join("ca.key")).unwrap();
        let p = fedgate::trust::identity::Principal::parse("fedgate://yrd/office/press").unwrap();
        let issued = ca
            .issue(&p, &fedgate::trust::pki::default_hosts(), 1)
            .unwrap();
        fedgate::trust::pki::write_issued(&issued, &certs, "press").unwrap();
    })
    .await;
    let port = |m: &str| {
        region
            .endpoint(m)
            .rsplit(':')
            .next()
            .unwrap()
            .parse::<u16>()
            .unwrap()
    };
    let certs = region.layout.dir.join("certs");
    let peer_as = |who: &str| {
        let tls = TlsMaterial::load(
            &region.layout.ca,
            &certs.join(format!("{who}.crt")),
            &certs.join(format!("{who}.key")),
        )
        .unwrap();
        let ch = Connector::new(
            tls.client_config().unwrap(),
            "127.0.0.1",
            port("hangzhou"),
            None,
        )
        .channel(std::time::Duration::from_secs(5))
        .unwrap();
        PeerClient::new(ch)
    };
    let req = |sql: &str, path: Vec<&str>| ExecuteRequest {
        incident: Vec::new(),
        receipt: false,
        sql: sql.into(),
        origin: "fedgate://yrd/city/shanghai".into(),
        hops: path.len() as u32,
        path: path.into_iter().map(String::from).collect(),
        budget_ms: 5000,
        query_id: "t".into(),
        purpose: String::new(),
        origin_assertion: Vec::new(),
    };
    let via = vec!["fedgate://yrd/city/shanghai"];

    // A client-only identity is known but not a gateway: it may not call Peer.
    let e = peer_as("press")
        .execute(req("SELECT * FROM census", via.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("only member gateways may call Peer"),
        "{e:?}"
    );

    let mut peer = peer_as("shanghai");
    // Local source tables are not reachable, only canonical datasets.
    let e = peer
        .execute(req("SELECT * FROM clinics", via.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("does not serve dataset \"clinics\""),
        "{e:?}"
    );
    // Statements other than queries are refused.
    let e = peer
        .execute(req("CREATE TABLE x AS SELECT 1", via.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    // A path that already passed through this member is a loop.
    let e = peer
        .execute(req(
            "SELECT 1 FROM census",
            vec!["fedgate://yrd/city/shanghai", "fedgate://yrd/city/hangzhou"],
        ))
        .await
        .unwrap_err();
    assert!(e.message().contains("loop"), "{e:?}");
    // A well-formed sub-query is answered.
    let mut s = peer
        .execute(req("SELECT county_code FROM census", via))
        .await
        .unwrap()
        .into_inner();
    let mut chunks = 0;
    let mut summary = None;
    while let Some(m) = s.message().await.unwrap() {
        match m.payload.unwrap() {
            fedgate::proto::v1::execute_response::Payload::Arrow(_) => chunks += 1,
            fedgate::proto::v1::execute_response::Payload::Summary(x) => summary = Some(x),
        }
    }
    assert!(chunks >= 2, "schema and at least one batch");
    assert_eq!(
        summary.unwrap().rows as usize,
        count_rows(&region, "hangzhou", "census_2020.csv")
    );
}

#[tokio::test]
async fn members_past_their_share_of_the_deadline_are_timed_out_not_waited_for() {
    use fedgate::proto::v1::QuerySummary;
    let region = Region::start().await;
    let client = region.client("hangzhou");
    // A budget smaller than the coordinator's merge reserve (20 ms) leaves members
    // nothing: each is cut off at once instead of being waited for. The query's own
    // deadline (19 ms after planning) normally comes later; on a loaded machine it may
    // come first, and then the members are reported as cut off by it.
    let t = std::time::Duration::from_millis(19);
    let sql = "SELECT count(*) FROM census";
    let cut_off = |s: &QuerySummary| {
        s.partial
            && s.members.len() == 5
            && s.members.iter().all(|m| {
                m.state == MemberState::TimedOut as i32 || m.state == MemberState::Cancelled as i32
            })
    };
    let f = client.query(sql, false, Some(t)).await.unwrap_err();
    assert_eq!(f.status.code(), tonic::Code::DeadlineExceeded, "{f}");
    assert!(cut_off(f.summary.as_ref().unwrap()), "{:?}", f.summary);
    match client.query(sql, true, Some(t)).await {
        Ok(a) => {
            assert!(cut_off(&a.summary), "{:?}", a.summary);
            assert!(
                a.summary
                    .members
                    .iter()
                    .all(|m| m.state == MemberState::TimedOut as i32)
            );
            assert!(
                a.summary.members[0].reason.contains("budget"),
                "{:?}",
                a.summary.members
            );
        }
        Err(f) => {
            assert_eq!(f.status.code(), tonic::Code::DeadlineExceeded, "{f}");
            assert!(cut_off(f.summary.as_ref().unwrap()), "{:?}", f.summary);
        }
    }
}

#[tokio::test]
async fn gateways_answer_the_standard_health_check() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let region = Region::start_only(Some(&["hefei"])).await;
    let (cert, key) = region.office();
    let tls = fedgate::trust::tls::TlsMaterial::load(&region.layout.ca, &cert, &key).unwrap();
    let port: u16 = region
        .endpoint("hefei")
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let ch =
        fedgate::trust::tls::Connector::new(tls.client_config().unwrap(), "127.0.0.1", port, None)
            .channel(std::time::Duration::from_secs(5))
            .unwrap();
    let mut h = HealthClient::new(ch);
    for service in ["fedgate.v1.Federation", "fedgate.v1.Peer"] {
        let r = h
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service}"
        );
    }
}
